// The process-wide uploader pool: a few worker threads that run the
// uploader steps of every replicated database of the process, instead of a
// thread per database (10 000 databases must not need 10 000 threads).
//
// Each database is a PoolMember. It schedules itself: a due time (its next
// batch deadline, the end of a back-off, "now" for a wake from a commit that
// filled a batch, a flush, a snapshot request). Workers run the member whose
// due time is earliest; a step returns the member's next due time
// (time_point::max(): only when scheduled again). A member is never run on
// two workers at once, and a schedule() that arrives while it runs makes it
// run again right after. An idle database is in no queue, holds no thread.
//
// Stalls: a step is bounded (the S3 client's retry budget for segment work,
// the stream loop's 2 s; a failing database then backs off on its own
// schedule, out of the queue), but a stalled server can still hold a worker
// for a step's length, and a large snapshot legitimately takes long. So the
// pool keeps one worker idle while it can: when a worker takes a step and
// none is left waiting, a spare is started, up to twice the base count; a
// spare exits after some idle seconds. With `base` workers, up to
// 2*base - 1 databases can be stuck in steps while the others still ship.
//
// Lifetime: the first member starts one worker; the pool grows by the rule
// above (up to `base` for good, spares beyond), and every worker exits when
// the last member leaves (they are detached; none runs a step after leave()
// returned). leave() waits for the member's running step, so a Replicator
// destructor can call it and then free what the step used.
//
// Lock order: the pool's mutex is a leaf (taken by schedule() from the VFS
// hooks' callers and by the workers; never held while a step runs).
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>

namespace bottomless::s3 {
struct ClientConfig;
class RequestBudget;
namespace http {
class ConnectionPool;
}
}  // namespace bottomless::s3

namespace bottomless::replicator {

class UploaderPool;

class PoolMember {
public:
    using Clock = std::chrono::steady_clock;
    // `step` runs on a pool worker; it must not throw, and returns when it
    // wants to run next.
    using Step = std::function<Clock::time_point()>;
    ~PoolMember();  // leave()
    PoolMember(const PoolMember&) = delete;
    PoolMember& operator=(const PoolMember&) = delete;

    // Run the step at `due` or earlier (an earlier due already asked for
    // stands). Cheap when not earlier than what is scheduled (one atomic
    // load); otherwise the pool's mutex briefly. A no-op after leave().
    void schedule(Clock::time_point due);
    void wake() { schedule(Clock::now()); }
    // Out of the pool: waits for a step running on a worker (it must not
    // be called from that step), and no step starts afterwards.
    void leave();

private:
    friend class UploaderPool;
    PoolMember(UploaderPool& pool, Step step) : pool_(pool), step_(std::move(step)) {}
    static int64_t ticks(Clock::time_point t) { return t.time_since_epoch().count(); }

    UploaderPool& pool_;
    const Step step_;
    // The earliest time a step is sure to start (queued, or asked for while
    // running); INT64_MAX: none; INT64_MIN after leave() (every schedule()
    // is then a no-op). Written under the pool's mutex; read without it for
    // the fast path.
    std::atomic<int64_t> due_{INT64_MAX};
    // Guarded by the pool's mutex.
    Clock::time_point queued_ = Clock::time_point::max();  // in the queue at this time (max: not queued)
    Clock::time_point rerun_ = Clock::time_point::max();   // asked for while running
    bool running_ = false;
    bool left_ = false;
    uint64_t seq_ = 0;  // tie-break in the queue: members due at the same time run in join order
};

struct PoolStats {
    unsigned base_threads = 0;  // uploader_threads
    unsigned threads = 0;       // workers alive now (base plus spares)
    unsigned busy = 0;          // running a step now
    size_t members = 0;         // databases in the pool
    size_t queued = 0;          // of them, scheduled to run
    uint64_t steps = 0;         // steps run since the process started
    uint64_t spares_started = 0;
};

class UploaderPool {
public:
    // The process's pool. `threads`: the base number of workers (0: the
    // default, max(2, hardware concurrency), or LIBSQL_BOTTOMLESS_UPLOADER_THREADS
    // as loaded into the configuration). The first join fixes it; a later
    // join asking for more raises it (never lowers it).
    static UploaderPool& instance();
    std::unique_ptr<PoolMember> join(unsigned threads, PoolMember::Step step);
    PoolStats stats();
    static unsigned default_threads();

    UploaderPool() = default;
    UploaderPool(const UploaderPool&) = delete;
    UploaderPool& operator=(const UploaderPool&) = delete;

private:
    friend class PoolMember;
    struct Impl;
    Impl& impl();
    void schedule(PoolMember& m, PoolMember::Clock::time_point due);
    void leave(PoolMember& m);
    void worker(bool spare);
    void start_worker_locked(bool spare);
    Impl* impl_ = nullptr;  // created on first use, never freed (workers may outlive static destructors)
};

// One libcurl connection pool per endpoint (and TLS settings), shared by the
// S3 clients of every database of the process: sockets are kept per worker,
// not per database. Each database keeps its own client (its retry budget,
// request counters and request-rate cap).
std::shared_ptr<s3::http::ConnectionPool> shared_connection_pool(const std::string& endpoint, const std::string& ca_bundle,
                                                             bool verify_tls);

// The process's request budget (s3/request_budget.h): the S3 clients of
// every database and read replica of the process draw from it, so
// max_requests_per_second from the environment caps their requests together.
// Pacing in the order asked: the pool's workers, each running one database's
// step, take turns, so databases share it fairly.
std::shared_ptr<s3::RequestBudget> process_request_budget();
// `c` draws from the process's budget, whose rate becomes `process_rate`
// (ReplicatorConfig::process_max_requests_per_second: every open applies its
// environment's value, so the latest open's is in force; 0: no cap).
void use_process_request_budget(s3::ClientConfig& c, double process_rate);

}  // namespace bottomless::replicator
