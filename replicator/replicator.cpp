// The replicator: the registry of running replicators, construction and
// shutdown, and the SQL surface (flush, status, metrics). The rest of the
// core is split by job: startup.cpp (the start-up decision), capture.cpp
// (what the VFS reports, the tee, WAL restarts, sync commits), uploader.cpp
// (the uploader thread and segments), snapshot.cpp (new generations).
// replicator.h has the contract and the lock order; docs/SEMANTICS.md the
// guarantees; docs/FORMAT.md what lands in the bucket.
#include "replicator/replicator.h"
#include "replicator/replicator_internal.h"

#include <sys/stat.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <condition_variable>
#include <map>
#include <set>

#include "replicator/metrics.h"
#include "s3/log.h"
#include "s3/request_budget.h"

namespace bottomless::replicator {

namespace {

// How long an open waits for another process's start-up (which may be a
// restore of a large database) before it gives up with SQLITE_BUSY.
constexpr std::chrono::seconds kStartupWait{120};

// The registry of replicators by canonical path. Its lock is held only to
// look up or change an entry, never across I/O or a thread join: a
// database's start-up (S3 requests, a restore) and shutdown (the final
// flush) run outside it, so opening or closing one database never waits for
// another. An entry is "opening" while its start-up runs, and stays, expired,
// while a closed replicator's final flush runs; an acquire() of the same path
// waits for either to finish (registry_cv).
struct RegistryEntry {
    std::weak_ptr<Replicator> replicator;
    bool opening = false;
};
std::mutex& registry_mu() {
    static auto* mu = new std::mutex();
    return *mu;
}
std::condition_variable& registry_cv() {
    static auto* cv = new std::condition_variable();
    return *cv;
}
std::map<std::string, RegistryEntry>& registry() {
    static auto* m = new std::map<std::string, RegistryEntry>();
    return *m;
}

// How often the leader looks for other processes' commits (the shared
// area's counter; shared_area.h): the lag they add before their batch.
constexpr std::chrono::milliseconds kFollowerPoll{50};

// The leaders of this process that share an area (Replicator::watch_step).
// Its lock is a leaf apart from wake() (cv_mu_, the pool's), taken under it.
struct Watch {
    std::mutex mu;
    std::set<Replicator*> leaders;
    std::unique_ptr<PoolMember> member;
    uint64_t steps = 0;
};
constexpr uint64_t kFollowerScanEvery = 20;  // steps: 1 s
Watch& watch() {
    static auto* w = new Watch();
    return *w;
}

}  // namespace

Clock::time_point Replicator::watch_step() noexcept {
    Watch& w = watch();
    std::lock_guard wlock(w.mu);
    if (w.leaders.empty()) return Clock::time_point::max();
    // Databases no other process has opened are looked at once a second
    // only (a process may lead thousands): one load of their flag.
    const bool all = ++w.steps % kFollowerScanEvery == 0;
    for (Replicator* r : w.leaders) {
        if (!r->has_followers_) {
            if (!all || !r->area_->followers()) continue;
            r->has_followers_ = true;
        }
        if (!r->sync_server_.joinable()) {
            try {
                r->sync_server_ = std::thread([r] { r->serve_sync_requests(); });
            } catch (const std::exception& e) {
                log::warn(r->path_ + ": cannot serve other processes' sync commits: " + e.what());
            }
        }
        if (r->area_->commits() != r->area_commits_seen_.load(std::memory_order_relaxed)) r->wake();
    }
    return Clock::now() + kFollowerPoll;
}

void Replicator::serve_sync_requests() noexcept {
    while (!sync_server_stop_.load()) {
        uint32_t seq = 0, salt1 = 0, salt2 = 0;
        uint64_t frame = 0;
        if (!area_->wait_sync_request(std::chrono::milliseconds(200), seq, salt1, salt2, frame)) continue;
        bool ok = false;
        try {
            // The commit frame, from the side file the follower wrote; the
            // transaction's other frames are in the WAL (commit_sync reads
            // them there, with the checksum chain).
            const std::string req = path_ + "-bottomless-sync";
            std::string bytes;
            Fd fd(::open(req.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW));
            struct stat st{};
            if (fd.fd >= 0 && ::fstat(fd.fd, &st) == 0 && st.st_size > static_cast<off_t>(kWalFrameHeaderSize) &&
                st.st_size <= static_cast<off_t>(kWalFrameHeaderSize + 65536)) {
                bytes.resize(static_cast<size_t>(st.st_size));
                if (!pread_full(fd.fd, bytes.data(), bytes.size(), 0)) bytes.clear();
            }
            const auto* hdr = reinterpret_cast<const unsigned char*>(bytes.data());
            const uint32_t psz = static_cast<uint32_t>(bytes.size() - kWalFrameHeaderSize);
            if (bytes.empty() || read_be32(hdr + 8) != salt1 || read_be32(hdr + 12) != salt2) {
                log::warn(path_ + ": another process's sync commit (frame " + std::to_string(frame) +
                          ") could not be read from " + req + "; refused");
            } else {
                // A restart the follower made before this transaction (its
                // ended epoch's record) is noted first.
                (void)note_wal_index();
                Status st2 = commit_sync(frame, hdr, hdr + kWalFrameHeaderSize, psz);
                ok = st2.ok();
                if (!ok) log::warn(path_ + ": another process's sync commit refused: " + st2.error().describe());
            }
        } catch (const std::exception& e) {
            log::warn(path_ + ": another process's sync commit refused: " + e.what());
        } catch (...) {
        }
        area_->answer_sync(seq, ok);
    }
}

void Replicator::open_shared_area() {
    auto a = SharedArea::open(path_);
    if (!a) {
        // Other processes then open the database read-only (follower.h).
        log::warn(path_ + ": " + a.error().message + "; other processes cannot write this database meanwhile");
        return;
    }
    area_ = std::move(a).value();
}

void Replicator::publish_shared_area() {
    if (!area_) return;
    area_->publish_durable(durable_.salt1, durable_.salt2, durable_.frame);
    area_->publish_mode(config_.sync);
    area_->publish_leader(static_cast<long>(::getpid()));
}

void Replicator::watch_join() {
    // After pool_member_ is set: the watch's step wakes it.
    if (!area_) return;
    Watch& w = watch();
    std::lock_guard wlock(w.mu);
    // A start that left the committed frames to the wal-index (continue_from)
    // polls at once; otherwise the followers' next commit does.
    area_commits_seen_.store(area_->commits() + (poll_at_start_ ? 1 : 0));
    has_followers_ = area_->followers() != 0;
    w.leaders.insert(this);
    if (!w.member) w.member = UploaderPool::instance().join(config_.uploader_threads, [] { return watch_step(); });
    w.member->schedule(Clock::now() + kFollowerPoll);
}

void Replicator::watch_leave() noexcept {
    if (!area_ || !pool_member_) return;  // published only with the uploader
    std::unique_ptr<PoolMember> gone;
    {
        Watch& w = watch();
        std::lock_guard wlock(w.mu);
        w.leaders.erase(this);
        if (w.leaders.empty()) gone = std::move(w.member);
    }
    gone.reset();  // leave(): waits for a watch step running now (it takes w.mu: released above)
}

Replicator::Replicator(std::string path, ReplicatorConfig config)
    : path_(std::move(path)), wal_path_(path_ + "-wal"), state_path_(path_ + "-bottomless"),
      config_(std::move(config)), tee_(held_limit(config_), held_limit(config_)) {
    // Spares may fill the tee's whole share: with a segment's worth (the
    // first limit tried) the writer still spent ~8 % of its time allocating
    // fresh pages while a backlog cycled (write_bench, NORMAL, 1 writer).
    s3::ClientConfig c = config_.s3;
    // A sync commit must not outlive its timeout inside the client's retries.
    if (config_.sync) c.retry.max_elapsed = std::min(c.retry.max_elapsed, config_.sync_timeout);
    // Async: give up on one attempt early and retry from the uploader loop, so
    // status shows the outage and new commits join the next batch.
    else c.retry.max_elapsed = std::min<std::chrono::milliseconds>(
        c.retry.max_elapsed, std::max<std::chrono::milliseconds>(std::chrono::seconds(5), config_.batch_interval * 5));
    // Sockets are shared by every database of the process that uses this
    // endpoint (pool.h); the client (retry budget, counters, rate cap) is ours.
    if (!c.connection_pool) c.connection_pool = shared_connection_pool(c.endpoint, c.ca_bundle, c.verify_tls);
    // The process's request cap, shared with every other database (pool.h).
    use_process_request_budget(c, config_.process_max_requests_per_second);
    client_ = std::make_unique<s3::Client>(std::move(c));
    last_snapshot_time_ = Clock::now();
    snapshot_seen_ = last_snapshot_time_;
}

std::shared_ptr<Replicator> Replicator::find(const std::string& path) {
    std::lock_guard reg(registry_mu());
    auto it = registry().find(path);
    return it == registry().end() ? nullptr : it->second.replicator.lock();
}

Result<std::shared_ptr<Replicator>> Replicator::acquire(const std::string& path, const ReplicatorConfig& config,
                                                       long* leader_elsewhere, bool takeover,
                                                       std::function<std::optional<WalIndexHeader>()> live_wal_index) {
    // Every open applies its environment's process-wide request cap, also
    // one that finds the database running.
    process_request_budget()->set_rate(config.process_max_requests_per_second);
    {
        std::unique_lock lock(registry_mu());
        for (;;) {
            auto it = registry().find(path);
            if (it == registry().end()) break;
            if (!it->second.opening) {
                if (auto r = it->second.replicator.lock()) {
                    lock.unlock();
                    // Another key must not pass unnoticed just because the database
                    // is already open: that open would believe its key is right.
                    if (r->config_.encryption.kind() != config.encryption.kind() ||
                        r->config_.encryption.material() != config.encryption.material())
                        return make_error(ErrorKind::InvalidArgument,
                                          "database " + path + " is already open in this process with " +
                                              (r->cipher_ ? "encryption key id " + r->cipher_->key_id()
                                                          : "no encryption") +
                                              "; this open gives " +
                                              (config.encryption.empty() ? "no key" : "another key or passphrase"),
                                          "EncryptionMismatch");
                    if (r->config_.bucket != config.bucket || r->config_.db_id != config.db_id)
                        log::warn("database " + path + " is already replicated to bucket '" + r->config_.bucket +
                                  "' as '" + r->config_.db_id + "'; the settings of this open are ignored");
                    return r;
                }
            }
            // Starting up, or closing (its final flush): wait for it.
            registry_cv().wait(lock);
        }
        registry()[path] = RegistryEntry{{}, true};
    }
    // From here this thread owns the path's start-up; the marker goes on
    // every way out (a failure, a follower, an exception).
    std::shared_ptr<Replicator> started;
    struct Marker {
        const std::string& path;
        std::shared_ptr<Replicator>& started;
        ~Marker() {
            {
                std::lock_guard reg(registry_mu());
                if (started) registry()[path] = RegistryEntry{started, false};
                else registry().erase(path);
            }
            registry_cv().notify_all();
        }
    } marker{path, started};

    // Before anything touches the bucket or the state file: is another
    // process replicating this database? Two replicating processes would
    // each ship to a generation of their own and the newest would lack the
    // other's commits (a fork, and a lost commit at restore).
    auto election = LeaderLock::acquire(path, takeover ? std::chrono::milliseconds(0) : kStartupWait);
    if (!election) return std::move(election).error();
    if (!election->leader()) {
        if (leader_elsewhere) *leader_elsewhere = election->leader_pid() > 0 ? election->leader_pid() : -1;
        return std::shared_ptr<Replicator>();
    }
    std::shared_ptr<Replicator> r(new Replicator(path, config));
    r->leader_lock_.emplace(std::move(election).value());
    r->takeover_ = takeover;
    r->live_wal_index_ = std::move(live_wal_index);
    r->open_shared_area();  // read by the start-up (other processes may be writing); published once started
    if (auto st = r->startup(); !st) return std::move(st).error();
    r->leader_lock_->startup_done();
    r->registered_ = true;
    started = r;
    return r;
}

Replicator::~Replicator() {
    watch_leave();  // no more wakes for followers' commits, no new sync server
    if (sync_server_.joinable()) {
        sync_server_stop_.store(true);
        area_->interrupt_sync_wait();
        sync_server_.join();
    }
    // The final flush runs without the registry's lock; an open of this
    // path meanwhile waits for the entry to go (below).
    if (pool_member_) {
        // Out of the pool first (waits for a step running on a worker): no
        // worker touches this object once leave() returns. The closing
        // flush then runs on this thread.
        pool_member_->leave();
        ship_before_close();
    }
    if (enabled_) write_state_file(/*clean_close=*/true);
    watch_leave();
    // Followers take over once the pid is gone and the lock is free.
    if (area_) area_->publish_leader(0);
    // Before the entry goes: the next replicator of this path (perhaps in
    // this process) must find the leadership free.
    leader_lock_.reset();
    if (registered_) {
        {
            std::lock_guard reg(registry_mu());
            auto it = registry().find(path_);
            if (it != registry().end() && !it->second.opening && it->second.replicator.expired()) registry().erase(it);
        }
        registry_cv().notify_all();
    }
}

Result<WalPosition> Replicator::flush(std::chrono::milliseconds timeout) {
    if (!enabled_) return make_error(ErrorKind::InvalidArgument, "replication is off for this database (skip)", "Disabled");
    // Everything committed so far, by any process.
    if (area_ && area_->followers()) note_wal_index();
    const uint64_t target = noted_index_.load();
    {
        std::lock_guard cvlock(cv_mu_);
        wake_ = true;
        force_ = true;
    }
    if (pool_member_) pool_member_->wake();
    auto deadline = Clock::now() + timeout;
    for (;;) {
        bool snap_pending;
        {
            // A first snapshot still owed for a non-empty database counts as unshipped.
            std::lock_guard ulock(upload_mu_);
            struct stat st{};
            snap_pending = (need_snapshot_ || broken_outside_wal_.load() || foreign_writer_.load()) &&
                           ::stat(path_.c_str(), &st) == 0 && st.st_size > 0;
        }
        if (durable_index_.load() >= target && !snap_pending) {
            // The request this loop may have re-armed while the upload it
            // waited for was finishing is not for later commits: those wait
            // for their batch (a force left behind would ship the next
            // commit alone). A concurrent flush re-arms its own.
            std::lock_guard cvlock(cv_mu_);
            force_ = false;
            break;
        }
        if (Clock::now() >= deadline) {
            std::lock_guard slock(status_mu_);
            return make_error(ErrorKind::Transport,
                              "flush timed out after " + std::to_string(timeout.count()) + " ms" +
                                  (last_error_.empty() ? "" : "; last error: " + last_error_),
                              "Timeout");
        }
        std::unique_lock lock(cv_mu_);
        wake_ = true;
        force_ = true;
        if (pool_member_) pool_member_->wake();  // the pool's mutex is below cv_mu_
        durable_cv_.wait_for(lock, std::chrono::milliseconds(50));
    }
    std::lock_guard slock(status_mu_);
    return status_durable_;
}

std::string Replicator::status_json() const {
    nlohmann::json j;
    j["database"] = path_;
    j["database_id"] = config_.db_id;
    j["bucket"] = config_.bucket;
    j["endpoint"] = config_.s3.endpoint.empty() ? "aws" : log::redact_url(config_.s3.endpoint);
    j["mode"] = !enabled_ ? "off" : (config_.sync ? "sync" : "async");
    j["role"] = "leader";
    j["leader_pid"] = leader_lock_ ? leader_lock_->leader_pid() : 0;
    // The key id names the key without revealing it; the key never appears here.
    j["encryption"] = cipher_ ? nlohmann::json{{"alg", kEncryptionAlg}, {"key_id", cipher_->key_id()}}
                              : nlohmann::json(nullptr);
    std::lock_guard slock(status_mu_);
    j["generation"] = status_generation_;
    j["segment"] = status_seq_;
    j["durable_position"] = {{"salt1", status_durable_.salt1}, {"salt2", status_durable_.salt2},
                             {"frame", status_durable_.frame}};
    j["last_durable_commit"] = fmt_time_us(last_durable_commit_us_);
    j["last_durable_commit_us"] = last_durable_commit_us_;
    uint64_t noted = noted_index_.load(), durable = durable_index_.load();
    j["pending_transactions"] = noted > durable ? noted - durable : 0;
    j["pending_bytes"] = unshipped_bytes_.load();
    // Where unshipped frames wait: "memory" (they may leave the WAL, which
    // restarts as usual), "wal" (past max_pending_bytes: the WAL keeps them
    // and grows), "none".
    j["pending_in"] = noted <= durable ? "none"
                      : unshipped_bytes_.load() > config_.max_pending_bytes ? "wal"
                                                                              : "memory";
    j["wal_bytes"] = wal_bytes_.load();
    // Frames kept as they were written (tee.h), and frames the uploader had
    // to read back from the WAL because the tee lacked them.
    j["tee_bytes"] = tee_.bytes();
    j["spare_page_bytes"] = tee_.spare_bytes();  // page buffers kept for reuse (tee.h), in memory_bytes
    // Memory held for unshipped frames now and at its highest since the
    // open (tee, pending transactions, the segment under way): never above
    // max_pending_bytes (docs/CONFIG.md). Noted at every frame the tee
    // takes, capture, encode and recycle of a segment's pages as spares.
    j["memory_bytes"] = memory_bytes();
    j["memory_peak_bytes"] = memory_peak_.load();
    j["wal_frames_read"] = wal_frames_read_.load();
    j["snapshots_torn"] = snapshots_torn_.load();  // attempts read again (0 unless something bypassed bottomless)
    j["wal_budget"] = {{"max_wal_bytes", config_.max_wal_bytes},
                       {"policy", config_.wal_budget_fail ? "fail" : "warn"},
                       {"exceeded", wal_over_budget_.load()}};
    int64_t lag_ms = 0;
    int64_t oldest = oldest_unshipped_us_.load();
    if (noted > durable && oldest > 0) lag_ms = std::max<int64_t>(0, (now_us() - oldest) / 1000);
    j["lag_ms"] = lag_ms;
    j["segments_uploaded"] = segments_uploaded_;
    j["snapshots_uploaded"] = snapshots_uploaded_;
    j["bytes_uploaded"] = bytes_uploaded_;
    j["segment_bytes_uploaded"] = segment_bytes_uploaded_;
    j["wal_bytes_shipped"] = wal_bytes_shipped_;
    auto cs = client_->stats();
    j["requests"] = cs.requests;
    j["put_requests"] = cs.puts;
    j["retries"] = cs.retries;
    // Requests that waited for a request-rate cap (this database's own or
    // the process's budget), and how long in all.
    j["requests_throttled"] = cs.throttled;
    j["throttle_wait_ms"] = cs.throttle_wait_us / 1000;
    j["last_error"] = last_error_.empty() ? nlohmann::json(nullptr) : nlohmann::json(last_error_);
    if (!last_error_.empty()) j["last_error_at"] = fmt_time_us(last_error_us_);
    return j.dump();
}

std::string Replicator::process_status_json() {
    uint64_t open = 0, replicating = 0, pending_bytes = 0, pending_txns = 0, memory = 0, requests = 0, puts = 0,
             retries = 0, errors_total = 0;
    double max_lag_s = 0;
    nlohmann::json failing = nlohmann::json::array();
    for_each([&](const Replicator& r) {
        ++open;
        if (!r.enabled_) return;
        ++replicating;
        ReplicatorMetrics m = r.metrics();
        pending_bytes += m.pending_bytes;
        pending_txns += m.pending_transactions;
        max_lag_s = std::max(max_lag_s, m.lag_seconds);
        memory += r.memory_bytes();
        requests += m.s3.requests;
        puts += m.s3.puts;
        retries += m.s3.retries;
        errors_total += m.errors;
        std::lock_guard slock(r.status_mu_);
        if (!r.last_error_.empty())
            failing.push_back({{"database", r.path_},
                               {"database_id", r.config_.db_id},
                               {"bucket", r.config_.bucket},
                               {"last_error", r.last_error_},
                               {"last_error_at", fmt_time_us(r.last_error_us_)}});
    });
    // Requests a minute: from samples of the process's request count taken
    // by earlier calls (the newest one at least a second old, within the
    // last minute); null until there is one. Requests of databases closed
    // in between leave the count, so a drop reads as 0.
    nlohmann::json rpm = nullptr;
    {
        static std::mutex mu;
        static std::deque<std::pair<Clock::time_point, uint64_t>> samples;  // guarded by mu
        std::lock_guard lock(mu);
        const auto now = Clock::now();
        while (!samples.empty() && now - samples.front().first > std::chrono::seconds(60)) samples.pop_front();
        if (!samples.empty() && now - samples.front().first >= std::chrono::seconds(1)) {
            const double minutes = std::chrono::duration<double>(now - samples.front().first).count() / 60;
            const uint64_t before = samples.front().second;
            rpm = requests > before ? static_cast<double>(requests - before) / minutes : 0.0;
        }
        if (samples.empty() || now - samples.back().first >= std::chrono::seconds(1)) samples.emplace_back(now, requests);
    }
    PoolStats p = UploaderPool::instance().stats();
    const s3::RequestBudget::Stats b = process_request_budget()->stats();
    auto ms = [](s3::RequestBudget::Clock::duration d) {
        return std::chrono::duration_cast<std::chrono::milliseconds>(d).count();
    };
    nlohmann::json j;
    j["databases_open"] = open;
    j["databases_replicating"] = replicating;
    j["uploader_threads"] = p.threads;
    j["uploader"] = {{"base_threads", p.base_threads}, {"threads", p.threads}, {"busy", p.busy},
                     {"scheduled", p.queued}, {"steps", p.steps}, {"spares_started", p.spares_started}};
    j["pending_bytes"] = pending_bytes;
    j["pending_transactions"] = pending_txns;
    j["memory_bytes"] = memory;
    j["max_lag_ms"] = static_cast<int64_t>(max_lag_s * 1000);
    j["requests"] = requests;
    j["put_requests"] = puts;
    j["retries"] = retries;
    j["requests_per_minute"] = rpm;
    // The process-wide cap (max_requests_per_second from the environment)
    // and every request of the process's databases and replicas counted by
    // it, open or since closed: those of the last 60 s, and the waits for a
    // turn.
    j["request_budget"] = {{"max_requests_per_second", b.rate > 0 ? nlohmann::json(b.rate) : nlohmann::json(nullptr)},
                           {"requests", b.requests},
                           {"requests_last_minute", b.requests_last_minute},
                           {"waited", b.waited},
                           {"wait_ms_total", ms(b.wait_total)},
                           {"wait_ms_max", ms(b.wait_max)},
                           {"wait_ms_last_minute", ms(b.wait_last_minute)}};
    j["errors"] = errors_total;
    j["databases_with_errors"] = failing.size();
    j["failing"] = std::move(failing);
    return j.dump();
}

void Replicator::for_each(const std::function<void(const Replicator&)>& fn) {
    std::vector<std::shared_ptr<Replicator>> running;
    {
        std::lock_guard reg(registry_mu());
        for (auto& [path, entry] : registry())
            if (auto r = entry.replicator.lock()) running.push_back(std::move(r));
    }
    // Outside the lock: the last reference may go here, and a destructor
    // takes the registry's lock.
    for (const auto& r : running) fn(*r);
}

ReplicatorMetrics Replicator::metrics() const {
    ReplicatorMetrics m;
    m.database = path_;
    m.database_id = config_.db_id;
    m.bucket = config_.bucket;
    m.mode = !enabled_ ? "off" : (config_.sync ? "sync" : "async");
    uint64_t noted = noted_index_.load(), durable = durable_index_.load();
    m.commits_observed = noted;
    m.commits_durable = durable;
    m.pending_transactions = noted > durable ? noted - durable : 0;
    m.pending_bytes = unshipped_bytes_.load();
    int64_t oldest = oldest_unshipped_us_.load();
    if (noted > durable && oldest > 0) m.lag_seconds = std::max<int64_t>(0, now_us() - oldest) / 1e6;
    m.wal_bytes = wal_bytes_.load();
    m.wal_budget_exceeded = wal_over_budget_.load();
    if (client_) m.s3 = client_->stats();
    std::lock_guard slock(status_mu_);
    m.generation = status_generation_;
    m.segment = status_seq_;
    m.last_durable_commit_us = last_durable_commit_us_;
    m.segments_uploaded = segments_uploaded_;
    m.snapshots_uploaded = snapshots_uploaded_;
    m.bytes_uploaded = bytes_uploaded_;
    m.wal_bytes_shipped = wal_bytes_shipped_;
    m.errors = errors_;
    return m;
}

}  // namespace bottomless::replicator
