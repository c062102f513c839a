// The process-wide uploader pool (pool.h): the queue of databases by due
// time, the workers, and the shared S3 connection pools.
#include "replicator/pool.h"

#include <algorithm>
#include <condition_variable>
#include <map>
#include <mutex>
#include <set>
#include <system_error>
#include <thread>
#include <tuple>

#include "s3/config.h"
#include "s3/http.h"
#include "s3/log.h"
#include "s3/request_budget.h"

namespace bottomless::replicator {

namespace {
using Clock = PoolMember::Clock;
// A spare worker (above the base count) that found nothing to do for this
// long exits.
constexpr std::chrono::seconds kSpareLinger{10};
}  // namespace

struct UploaderPool::Impl {
    std::mutex mu;  // guards everything below and every member's queued_/rerun_/running_/left_/seq_
    // Idle workers wait on `work` until the queue's first due time (or for
    // good when it is empty). One is notified only when a due time earlier
    // than every sleeper's wake-up time is at the queue's front
    // (wake_for_front), and all when the last member leaves. Not at
    // every step, join or leave: a worker woken for nothing runs on another
    // core, and the process's next munmap (SQLite's and ours, at every
    // close) then has to interrupt that core to flush its TLB; on a VM that
    // doubled the CPU cost of closing an idle database.
    std::condition_variable work;
    std::multiset<int64_t> sleeping;  // the wake-up times (ticks) of the workers waiting on `work`; INT64_MAX: none
    // Where the queue's front may have become due before every sleeper's
    // wake-up time (a schedule(), a worker taking the front): one of them
    // looks now. Without it, a due time queued behind a sleeper's (a step
    // requeued by its worker) waited for that worker's next step.
    void wake_for_front() {
        if (!queue.empty() && !sleeping.empty() && std::get<0>(*queue.begin()) < *sleeping.begin()) work.notify_one();
    }
    std::condition_variable step_done;  // leave() waits on it for the member's running step
    // (due ticks, enqueue sequence, member): earliest first, FIFO among equals.
    std::set<std::tuple<int64_t, uint64_t, PoolMember*>> queue;
    unsigned base = 0;   // the base number of workers
    unsigned live = 0;   // workers alive
    unsigned idle = 0;   // of them, waiting for work
    unsigned busy = 0;   // of them, running a step
    size_t members = 0;  // joined and not left
    uint64_t enqueued = 0, steps = 0, spares = 0;
};

UploaderPool& UploaderPool::instance() {
    // Never destroyed: detached workers may still be waiting when static
    // destructors run at exit.
    static auto* pool = new UploaderPool();
    return *pool;
}

UploaderPool::Impl& UploaderPool::impl() {
    static std::once_flag once;
    std::call_once(once, [this] { impl_ = new Impl(); });
    return *impl_;
}

unsigned UploaderPool::default_threads() {
    // Once: hardware_concurrency() reads /sys on every call, and every open
    // of a database joins the pool.
    static const unsigned n = std::max(2u, std::thread::hardware_concurrency());
    return n;
}

void UploaderPool::start_worker_locked(bool spare) {
    Impl& s = *impl_;
    try {
        std::thread([this, spare] { worker(spare); }).detach();
        ++s.live;
        if (spare) ++s.spares;
    } catch (const std::system_error& e) {
        // Out of threads: the workers there are carry on; with none, no
        // database could ship, which its open must report.
        if (s.live == 0) throw;
        log::warn(std::string("uploader pool: cannot start another worker: ") + e.what());
    }
}

std::unique_ptr<PoolMember> UploaderPool::join(unsigned threads, PoolMember::Step step) {
    Impl& s = impl();
    std::unique_ptr<PoolMember> m(new PoolMember(*this, std::move(step)));
    std::lock_guard lock(s.mu);
    s.base = std::max(s.base, threads ? threads : default_threads());
    ++s.members;
    try {
        // One worker to begin with; the pool grows when a step is taken
        // with no worker left waiting (worker()): a process with a few
        // quiet databases on a many-core machine keeps one or two threads.
        if (s.live == 0) start_worker_locked(false);
    } catch (...) {
        --s.members;
        throw;
    }
    return m;
}

void UploaderPool::schedule(PoolMember& m, Clock::time_point due) {
    Impl& s = *impl_;
    std::lock_guard lock(s.mu);
    if (m.left_) return;
    if (m.running_) {
        // Runs again as soon as this step ends (the step may have read the
        // state before the caller changed it).
        if (due < m.rerun_) {
            m.rerun_ = due;
            m.due_.store(PoolMember::ticks(due));
        }
        return;
    }
    if (due >= m.queued_) return;
    if (m.queued_ != Clock::time_point::max()) s.queue.erase({PoolMember::ticks(m.queued_), m.seq_, &m});
    m.queued_ = due;
    m.seq_ = ++s.enqueued;
    s.queue.emplace(PoolMember::ticks(due), m.seq_, &m);
    m.due_.store(PoolMember::ticks(due));
    s.wake_for_front();
}

void UploaderPool::leave(PoolMember& m) {
    Impl& s = *impl_;
    std::unique_lock lock(s.mu);
    if (m.left_) return;
    m.left_ = true;
    m.due_.store(INT64_MIN);
    if (m.queued_ != Clock::time_point::max()) s.queue.erase({PoolMember::ticks(m.queued_), m.seq_, &m});
    m.queued_ = Clock::time_point::max();
    --s.members;
    if (s.members == 0) s.work.notify_all();  // with no member left, the workers exit
    // The step under way uses the member's owner: wait for it to end.
    s.step_done.wait(lock, [&] { return !m.running_; });
}

void UploaderPool::worker(bool spare) {
    Impl& s = *impl_;
    std::unique_lock lock(s.mu);
    auto idle_since = Clock::now();
    for (;;) {
        if (s.members == 0) break;
        const auto now = Clock::now();
        if (spare && now - idle_since >= kSpareLinger) {
            if (s.live > s.base) {
                // A sleeper may have been left to look at a due step on
                // the strength of this one's wake-up time (wake_for_front).
                s.wake_for_front();
                break;
            }
            spare = false;  // the base count was raised meanwhile: a base worker now
        }
        if (s.queue.empty() || std::get<0>(*s.queue.begin()) > PoolMember::ticks(now)) {
            auto until = s.queue.empty() ? Clock::time_point::max()
                                         : Clock::time_point(Clock::duration(std::get<0>(*s.queue.begin())));
            if (spare) until = std::min(until, idle_since + kSpareLinger);
            ++s.idle;
            const auto sleeper = s.sleeping.insert(until == Clock::time_point::max() ? INT64_MAX : PoolMember::ticks(until));
            if (until == Clock::time_point::max()) s.work.wait(lock);
            else s.work.wait_until(lock, until);
            s.sleeping.erase(sleeper);
            --s.idle;
            continue;
        }
        PoolMember* m = std::get<2>(*s.queue.begin());
        s.queue.erase(s.queue.begin());
        s.wake_for_front();  // the next due, if a sleeper would miss it
        m->queued_ = Clock::time_point::max();
        m->running_ = true;
        // Before the step reads the database's state: a schedule() from now
        // on takes the slow path and asks for a rerun (pool.h, fast path).
        m->due_.store(INT64_MAX);
        ++s.busy;
        // Keep one worker waiting while the pool may grow: this step may
        // stall on the network, and the other databases must still ship.
        // Workers beyond the base count are spares (they exit when idle).
        if (s.idle == 0 && s.live < 2 * s.base) {
            try {
                start_worker_locked(s.live >= s.base);
            } catch (...) {  // the pool goes on with the workers it has
            }
        }
        lock.unlock();
        Clock::time_point next = m->step_();
        lock.lock();
        --s.busy;
        ++s.steps;
        m->running_ = false;
        if (!m->left_) {
            next = std::min(next, m->rerun_);
            m->rerun_ = Clock::time_point::max();
            m->due_.store(INT64_MAX);
            if (next != Clock::time_point::max()) {
                m->queued_ = next;
                m->seq_ = ++s.enqueued;
                s.queue.emplace(PoolMember::ticks(next), m->seq_, m);
                m->due_.store(PoolMember::ticks(next));
            }
        }
        // leave() may wait for running_ (free when no one waits). The
        // requeue needs no notice: this worker looks at the queue next (and
        // wakes a sleeper, above, for what it does not take itself).
        s.step_done.notify_all();
        idle_since = Clock::now();
    }
    --s.live;
}

PoolStats UploaderPool::stats() {
    Impl& s = impl();
    std::lock_guard lock(s.mu);
    PoolStats st;
    st.base_threads = s.base ? s.base : default_threads();
    st.threads = s.live;
    st.busy = s.busy;
    st.members = s.members;
    st.queued = s.queue.size();
    st.steps = s.steps;
    st.spares_started = s.spares;
    return st;
}

PoolMember::~PoolMember() { leave(); }

void PoolMember::schedule(Clock::time_point due) {
    if (ticks(due) >= due_.load()) return;
    pool_.schedule(*this, due);
}

void PoolMember::leave() { pool_.leave(*this); }

std::shared_ptr<s3::http::ConnectionPool> shared_connection_pool(const std::string& endpoint,
                                                                 const std::string& ca_bundle, bool verify_tls) {
    static auto* mu = new std::mutex();
    static auto* pools = new std::map<std::string, std::weak_ptr<s3::http::ConnectionPool>>();
    // Connections are reused only where they lead to the same place with the
    // same TLS checks; credentials and region are per request (signed
    // headers), not per connection.
    const std::string key = endpoint + '\n' + ca_bundle + '\n' + (verify_tls ? "1" : "0");
    std::lock_guard lock(*mu);
    for (auto it = pools->begin(); it != pools->end();) it = it->second.expired() ? pools->erase(it) : std::next(it);
    auto& slot = (*pools)[key];
    auto p = slot.lock();
    if (!p) {
        p = std::make_shared<s3::http::ConnectionPool>();
        slot = p;
    }
    return p;
}

std::shared_ptr<s3::RequestBudget> process_request_budget() {
    // Never destroyed: clients in detached workers may still draw from it at exit.
    static auto* budget = new std::shared_ptr<s3::RequestBudget>(std::make_shared<s3::RequestBudget>());
    return *budget;
}

void use_process_request_budget(s3::ClientConfig& c, double process_rate) {
    auto budget = process_request_budget();
    budget->set_rate(process_rate);
    c.request_budget = std::move(budget);
}

}  // namespace bottomless::replicator
