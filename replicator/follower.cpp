// A process writing a database another process replicates (follower.h).
#include "replicator/follower.h"

#include <fcntl.h>
#include <signal.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include <cerrno>
#include <cstring>
#include <map>
#include <thread>

#include "replicator/replicator.h"
#include "replicator/replicator_internal.h"
#include "replicator/util.h"
#include "s3/log.h"

namespace bottomless::replicator {

namespace {

// The followers of this process by path. The takeover thread runs while
// there are any; its lock is held only to look up or change an entry.
struct Registry {
    std::mutex mu;
    std::map<std::string, std::weak_ptr<Follower>> followers;
    bool thread_running = false;
};
Registry& registry() {
    static auto* r = new Registry();  // never destroyed: the detached thread may outlive main()
    return *r;
}

bool process_gone(long pid) { return pid > 0 && ::kill(static_cast<pid_t>(pid), 0) != 0 && errno == ESRCH; }


}  // namespace

Follower::Follower(std::string path, ReplicatorConfig config, long leader_pid)
    : path_(std::move(path)), config_(std::move(config)), leader_at_open_(leader_pid) {}

Result<std::shared_ptr<Follower>> Follower::acquire(const std::string& path, const ReplicatorConfig& config,
                                                   long leader_pid) {
    Registry& reg = registry();
    {
        std::lock_guard lock(reg.mu);
        if (auto f = reg.followers[path].lock()) return f;
    }
    auto area = SharedArea::open(path);
    if (!area) return std::move(area).error();
    std::shared_ptr<Follower> f(new Follower(path, config, leader_pid));
    f->area_ = std::move(area).value();
    f->area_->note_follower(static_cast<long>(::getpid()));
    bool start = false;
    {
        std::lock_guard lock(reg.mu);
        auto& slot = reg.followers[path];
        if (auto other = slot.lock()) return other;  // another thread of ours got there first
        slot = f;
        if (!reg.thread_running) start = reg.thread_running = true;
    }
    if (start) std::thread(takeover_loop).detach();
    return f;
}

std::shared_ptr<Follower> Follower::find(const std::string& path) {
    Registry& reg = registry();
    std::lock_guard lock(reg.mu);
    auto it = reg.followers.find(path);
    return it == reg.followers.end() ? nullptr : it->second.lock();
}

Follower::~Follower() {
    std::shared_ptr<Replicator> r;
    bool gave = false;
    {
        std::lock_guard lock(mu_);
        r = std::move(promoted_);
        gave = gave_shm_;
        gave_shm_ = false;
    }
    if (r && gave) r->note_shm(nullptr);
    {
        Registry& reg = registry();
        std::lock_guard lock(reg.mu);
        auto it = reg.followers.find(path_);
        if (it != reg.followers.end() && it->second.expired()) reg.followers.erase(it);
    }
    // Dropping the replicator runs its closing flush (unless connections
    // opened after the takeover still use it).
    r.reset();
}

bool Follower::sync_commits() const { return config_.sync || area_->leader_sync(); }

Status Follower::commit_sync(uint64_t frame, const unsigned char* frame_header, const unsigned char* page,
                             uint32_t page_size) {
    if (auto r = promoted()) return r->commit_sync(frame, frame_header, page, page_size);
    // The commit frame goes to the leader through a side file (one request
    // at a time: this process holds the WAL write lock); the frames before
    // it are in the WAL already, where the leader reads them.
    const std::string req = path_ + "-bottomless-sync";
    {
        Fd fd(::open(req.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0644));
        if (fd.fd < 0 || !pwrite_full(fd.fd, frame_header, kWalFrameHeaderSize, 0) ||
            !pwrite_full(fd.fd, page, page_size, kWalFrameHeaderSize))
            return make_error(ErrorKind::Io, "sync commit refused: cannot write " + req + ": " + std::strerror(errno),
                              "SyncRequest");
    }
    const auto deadline = std::chrono::steady_clock::now() + config_.sync_timeout;
    const uint32_t seq = area_->post_sync_request(read_be32(frame_header + 8), read_be32(frame_header + 12), frame);
    area_->note_follower_commit();  // a leader that has not seen followers yet looks within a second
    auto answer = area_->wait_sync_answer(seq, deadline);
    if (answer && *answer) return {};
    return make_error(ErrorKind::Transport,
                      "sync commit refused: process " + std::to_string(leader_pid()) +
                          " replicates this database and " +
                          (answer ? std::string("could not make the transaction durable in S3")
                                  : "did not answer within " + std::to_string(config_.sync_timeout.count()) +
                                        " ms or exited while shipping it (the bucket may hold it; a new generation "
                                        "follows then)") +
                          "; see bottomless_status() in that process (S3 down or slow?)",
                      "SyncRefused");
}

long Follower::leader_pid() const {
    if (promoted()) return static_cast<long>(::getpid());
    const long pid = area_->leader_pid();
    return pid ? pid : leader_at_open_;
}

void Follower::note_shm(const volatile unsigned char* region0) {
    std::shared_ptr<Replicator> give;
    bool take_back = false;
    {
        std::lock_guard lock(mu_);
        if (region0) {
            ++shm_users_;
            shm0_ = region0;
            if (promoted_ && !gave_shm_) {
                give = promoted_;
                gave_shm_ = true;
            }
        } else if (shm_users_ > 0 && --shm_users_ == 0) {
            shm0_ = nullptr;
            if (promoted_ && gave_shm_) {
                give = promoted_;
                gave_shm_ = false;
                take_back = true;
            }
        }
    }
    if (give) give->note_shm(take_back ? nullptr : region0);
}

std::optional<WalIndexHeader> Follower::wal_index_now() const {
    std::lock_guard lock(mu_);
    WalIndexHeader h;
    if (shm0_ && read_wal_index_settled(shm0_, h)) return h;
    return std::nullopt;
}

bool Follower::tail_keepable(const WalIndexHeader& h) const {
    // What a restart would overwrite unshipped must be in the epoch the
    // leader ships now (one ended epoch at a time, as in the leader's own
    // process) and small enough to copy aside under the write lock.
    const uint64_t n = area_->unshipped_frames(h);
    if (n == 0) return true;
    if (n == UINT64_MAX || h.page_size == 0) return false;
    const uint64_t frame_bytes = h.page_size + kWalFrameHeaderSize;
    return tail_copy_worth_it(n * frame_bytes, uint64_t{h.mx_frame} * frame_bytes, config_.max_pending_bytes);
}

bool Follower::begin_restart(const WalIndexHeader& h, SharedArea::Hold& hold) {
    // Every frame the restart would overwrite is durable (the leader said
    // so) or copied aside now; no snapshot reads them (the byte, shared).
    if (!tail_keepable(h)) return false;
    hold = area_->try_hold_shared();
    if (!hold.held()) return false;
    uint64_t salts = 0, frame = 0;
    area_->durable(salts, frame);
    if (!tail_keepable(h)) {  // a new leader published an older position meanwhile
        hold.release();
        return false;
    }
    if (!area_->covers(h)) {
        // Under the WAL write lock: the epoch's committed frames stay as
        // they are while they are copied.
        if (Status st = keep_epoch_tail(path_, h, frame); !st) {
            log::warn(path_ + ": a WAL restart waits (its unshipped frames could not be kept aside: " +
                      st.error().message + ")");
            hold.release();
            return false;
        }
    }
    area_->note_epoch_end(h.salt1, h.salt2, h.mx_frame);
    area_->note_follower_commit();  // the leader looks at once
    if (auto r = promoted()) r->note_wal_index();
    return true;
}

bool Follower::begin_checkpoint(const WalIndexHeader* h, SharedArea::Hold& hold) {
    // As in the leader's process: a checkpoint only when the WAL could
    // restart after it (its unshipped frames few enough to keep aside), so
    // that SQLite's auto-checkpoint fails in one lock call, and a
    // RESTART/TRUNCATE checkpoint is refused here rather than holding the
    // write lock while its restart is refused.
    if (!h || !tail_keepable(*h)) return false;
    hold = area_->try_hold_shared();
    if (!hold.held()) return false;
    {
        std::shared_ptr<Replicator> r;
        {
            std::lock_guard lock(mu_);
            last_checkpoint_ = *h;
            r = promoted_;
        }
        // A last connection's checkpoint precedes the WAL's deletion: the
        // replicator this process runs must know every commit by then.
        if (r) r->note_wal_index();
    }
    return true;
}

void Follower::note_commit() { area_->note_follower_commit(); }

bool Follower::wal_delete_allowed() const {
    WalIndexHeader h;
    {
        std::lock_guard lock(mu_);
        h = last_checkpoint_;
    }
    return area_->covers(h);
}

std::shared_ptr<Replicator> Follower::promoted() const {
    std::lock_guard lock(mu_);
    return promoted_;
}

Result<WalPosition> Follower::flush(std::chrono::milliseconds timeout) {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    auto target = wal_index_now();
    if (!target) return make_error(ErrorKind::Io, "the wal-index is not mapped yet (no transaction ran)", "NoWalIndex");
    for (;;) {
        if (auto r = promoted()) {
            // Taken over: our own replicator ships it.
            auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
            return r->flush(std::max(left, std::chrono::milliseconds(1)));
        }
        if (area_->covers(*target)) {
            uint64_t salts = 0, frame = 0;
            area_->durable(salts, frame);
            return WalPosition{static_cast<uint32_t>(salts >> 32), static_cast<uint32_t>(salts), frame, 0, 0};
        }
        // The leader polls our commit counter; make sure it moved.
        area_->note_follower_commit();
        if (std::chrono::steady_clock::now() >= deadline) {
            uint64_t salts = 0, frame = 0;
            area_->durable(salts, frame);
            return make_error(ErrorKind::Cancelled,
                              "not durable within " + std::to_string(timeout.count()) + " ms: process " +
                                  std::to_string(leader_pid()) + " replicates this database and has shipped up to frame " +
                                  std::to_string(frame) + " (this process committed up to frame " +
                                  std::to_string(target->mx_frame) +
                                  "); see bottomless_status() in that process for why (S3 down or slow)",
                              "FlushTimeout");
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
}

std::string Follower::status_json() const {
    if (auto r = promoted()) return r->status_json();
    uint64_t salts = 0, frame = 0;
    area_->durable(salts, frame);
    nlohmann::json j{{"role", "follower"},
                     {"leader_pid", leader_pid()},
                     {"read_only", false},  // a follower writes (read-only: no shared area, vfs.cpp)
                     {"durable", {{"salt1", salts >> 32}, {"salt2", salts & 0xffffffffu}, {"frame", frame}}}};
    if (int64_t t = area_->durable_time_us()) j["durable_published_ms_ago"] = (now_us() - t) / 1000;
    if (auto h = wal_index_now()) {
        j["wal_frame"] = h->mx_frame;
        const bool same = (static_cast<uint64_t>(h->salt1) << 32 | h->salt2) == salts;
        j["lag_frames"] = h->mx_frame == 0 ? 0 : (same && frame <= h->mx_frame ? h->mx_frame - frame : h->mx_frame);
    }
    j["sync"] = sync_commits();
    return j.dump();
}

void Follower::try_take_over() noexcept {
    try {
        if (promoted()) return;
        const auto now = std::chrono::steady_clock::now();
        const long pid = area_->leader_pid();
        // Cheap first: the published pid is gone or cleared. The lock itself
        // about once a second (a reused pid, an area not published).
        if (!(pid == 0 || process_gone(pid)) && now < next_full_try_) return;
        next_full_try_ = now + std::chrono::seconds(1);
        long elsewhere = 0;
        // What the start-up counts as committed comes from the wal-index as
        // this process's connections map it (never a descriptor of -shm of
        // its own: closing that would drop their locks on it).
        auto r = Replicator::acquire(path_, config_, &elsewhere, /*takeover=*/true, [this] { return wal_index_now(); });
        if (!r) {
            if (r.error().code != "StartupBusy")
                log::warn(path_ + ": cannot take over replication: " + r.error().describe() + " (trying again)");
            return;
        }
        if (!*r) return;  // another process leads (or took over first)
        std::shared_ptr<Replicator> rep = std::move(r).value();
        const volatile unsigned char* shm = nullptr;
        {
            std::lock_guard lock(mu_);
            promoted_ = rep;
            if (shm0_) {
                shm = shm0_;
                gave_shm_ = true;
            }
        }
        if (shm) rep->note_shm(shm);
        log::info("process " + std::to_string(::getpid()) + " takes over the replication of " + path_ +
                  (pid ? " from process " + std::to_string(pid) : std::string()));
    } catch (const std::exception& e) {
        log::warn(path_ + ": cannot take over replication: " + e.what());
    } catch (...) {
    }
}

void Follower::takeover_loop() {
    Registry& reg = registry();
    for (;;) {
        std::vector<std::shared_ptr<Follower>> live;
        {
            std::lock_guard lock(reg.mu);
            for (auto it = reg.followers.begin(); it != reg.followers.end();) {
                if (auto f = it->second.lock()) {
                    live.push_back(std::move(f));
                    ++it;
                } else {
                    it = reg.followers.erase(it);
                }
            }
            if (live.empty()) {
                reg.thread_running = false;
                return;
            }
        }
        // A follower no connection holds any more (its process is closing
        // the database, maybe exiting) does not take over.
        for (auto& f : live)
            if (f.use_count() > 1) f->try_take_over();
        live.clear();  // a follower's last reference may go here: its destructor runs on this thread
        std::this_thread::sleep_for(kTakeoverPoll);
    }
}

}  // namespace bottomless::replicator
