// The uploader: its steps on the process's pool (pool.h) and when each is
// due, segments cut from pending transactions and
// uploaded in order, durability bookkeeping, and the local state file.
#include "replicator/replicator.h"
#include "replicator/replicator_internal.h"

#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <stdexcept>
#include <thread>

#include "replicator/state_file.h"
#include "s3/log.h"

namespace bottomless::replicator {

void Replicator::record_error(const Error& e) {
    std::string what = e.describe();
    Error same = e;
    same.request_id.clear();  // differs at every attempt
    std::string key = same.describe();
    bool log_it;
    {
        // A flush or a close retries every 50-100 ms: the same error again
        // within 10 s is counted and kept in the status, not logged again.
        std::lock_guard slock(status_mu_);
        const int64_t now = now_us();
        log_it = key != last_error_key_ || now - last_error_logged_us_ >= 10'000'000;
        if (log_it) last_error_logged_us_ = now;
        last_error_key_ = std::move(key);
        last_error_ = what;
        last_error_us_ = now;
        ++errors_;
    }
    if (log_it) log::warn(path_ + ": replication: " + what);
}

void Replicator::note_failure(const Error& e) {
    record_error(e);
    ++consecutive_failures_;
    // 0.5 s, 1 s, 2 s, ... up to 8 s before the uploader tries again by
    // itself. Longer would leave a backlog waiting after S3 is back (issue 9:
    // everything durable within 30 s of its return); each attempt is a few
    // requests, so an outage costs well under one request a second.
    retry_after_ = Clock::now() +
                   std::chrono::milliseconds(std::min<int64_t>(8'000, 250ll << std::min(consecutive_failures_, 5)));
}

uint64_t Replicator::segment_limit(const ReplicatorConfig& c) {
    return std::max<uint64_t>(4096, std::min(c.batch_max_bytes, c.max_pending_bytes / 4));
}

uint64_t Replicator::held_limit(const ReplicatorConfig& c) {
    // The encoded copy of a segment is at most its page bytes plus a
    // quarter: 4 bytes of page number a frame, zstd's worst case (+0.4 %),
    // the header (~80 bytes a transaction, i.e. a frame of >= 512 bytes),
    // and the headroom std::string keeps while it grows.
    const uint64_t seg = segment_limit(c);
    const uint64_t reserve = seg + seg / 4;
    return c.max_pending_bytes > 2 * reserve ? c.max_pending_bytes - reserve : c.max_pending_bytes / 2;
}

std::chrono::microseconds Replicator::batch_wait() const {
    const auto interval = std::chrono::duration_cast<std::chrono::microseconds>(config_.batch_interval);
    const auto lead = std::min(std::chrono::microseconds(ship_lead_us_.load(std::memory_order_relaxed)), interval / 4);
    return interval - lead;
}

void Replicator::note_ship_time(Clock::duration cut_to_durable) noexcept {
    // A moving average over about the last 4 segments, each sample capped
    // at a quarter interval like the lead itself: a segment that waited
    // out an outage must not shorten the batches that follow for long.
    const int64_t cap = std::chrono::duration_cast<std::chrono::microseconds>(config_.batch_interval).count() / 4;
    const int64_t us =
        std::min(cap, std::chrono::duration_cast<std::chrono::microseconds>(cut_to_durable).count());
    const int64_t old = ship_lead_us_.load(std::memory_order_relaxed);
    ship_lead_us_.store(old == 0 ? us : (3 * old + us) / 4, std::memory_order_relaxed);
}

void Replicator::note_memory() noexcept {
    const uint64_t now = memory_bytes();
    uint64_t peak = memory_peak_.load(std::memory_order_relaxed);
    while (now > peak && !memory_peak_.compare_exchange_weak(peak, now, std::memory_order_relaxed)) {
    }
    uint64_t tpeak = trim_peak_.load(std::memory_order_relaxed);
    while (now > tpeak && !trim_peak_.compare_exchange_weak(tpeak, now, std::memory_order_relaxed)) {
    }
}

void Replicator::maybe_release_memory() noexcept {
    // Once what this database holds has fallen by a segment's worth from its
    // high-water mark (a backlog shipped, a burst uploaded), the freed pages
    // go back to the kernel: resident memory then follows the cap.
    constexpr uint64_t kStep = 16ull << 20;
    const uint64_t held = memory_bytes();
    if (trim_peak_.load(std::memory_order_relaxed) < held + kStep) return;
    trim_peak_.store(held, std::memory_order_relaxed);
    release_free_memory();
}

void Replicator::mark_durable(const WalPosition& pos, uint64_t commit_index) {
    durable_ = pos;
    // An ended epoch's record is obsolete once its frames are all durable.
    std::erase_if(ended_epochs_, [&](const WalPosition& e) {
        return e.salt1 == pos.salt1 && e.salt2 == pos.salt2 && e.frame <= pos.frame;
    });
    durable_salts_.store((static_cast<uint64_t>(pos.salt1) << 32) | pos.salt2);
    durable_frame_.store(pos.frame);
    if (commit_index > durable_index_.load()) durable_index_.store(commit_index);
    if (durable_index_.load() >= noted_index_.load()) {
        oldest_unshipped_us_.store(0);
    } else {
        int64_t oldest = 0;
        if (!pending_.empty()) oldest = pending_.front().commit_us;
        else {
            std::lock_guard olock(obs_mu_);
            if (!commits_.empty()) oldest = commits_.front().time_us;
        }
        oldest_unshipped_us_.store(oldest ? oldest : now_us());
    }
    {
        std::lock_guard slock(status_mu_);
        status_generation_ = generation_;
        status_seq_ = seq_;
        status_durable_ = pos;
        last_error_.clear();
    }
    {
        std::lock_guard cvlock(cv_mu_);
    }
    durable_cv_.notify_all();
}

namespace {
std::atomic<int64_t> g_snapshot_check_ms{10 * 60 * 1000};
}

void testing_snapshot_check_interval(std::chrono::milliseconds every) { g_snapshot_check_ms.store(every.count()); }

void Replicator::abandon_generation(const Error& why, const char* snapshot_reason) {
    // Nothing more goes into this generation: the segment under way and the
    // pending transactions are dropped, their frames are in the next
    // snapshot (the database file and its WAL hold every commit).
    record_error(why);
    inflight_.reset();
    segment_bytes_ = 0;
    pending_.clear();
    pending_bytes_ = 0;
    request_snapshot(snapshot_reason);
}

Status Replicator::upload_inflight(Lock& lock) {
    InFlight& f = *inflight_;
    s3::PutOptions o;
    o.if_none_match = true;  // a segment is written once; a second writer must not overwrite it
    o.content_type = "application/vnd.bottomless.segment";
    std::string key = segment_key(config_.db_id, generation_, f.header.seq);
    // Segments of a generation whose snapshot is gone restore nothing: a
    // `bottomless-cli rm` of the generation being written (--force) would
    // otherwise leave every later commit unrestorable without a word. Looked
    // at once per interval (one HEAD per 10 minutes of uploads).
    const auto every = std::chrono::milliseconds(g_snapshot_check_ms.load());
    const bool check = Clock::now() - snapshot_seen_ >= every;
    const std::string snap = check ? snapshot_key(config_.db_id, generation_) : std::string();
    // inflight_ changes only under net_mu_ (held by our caller), so it stays
    // put while upload_mu_ is released for the request.
    lock.unlock();
    Result<s3::ObjectInfo> seen = s3::ObjectInfo{};
    if (check) seen = client_->head_object(config_.bucket, snap);
    auto r = seen || seen.error().kind != ErrorKind::NotFound ? client_->put_object(config_.bucket, key, f.bytes, o)
                                                               : Result<s3::PutResult>(seen.error());
    lock.lock();
    if (check && seen) snapshot_seen_ = Clock::now();
    if (check && !seen && seen.error().kind == ErrorKind::NotFound) {
        abandon_generation(make_error(ErrorKind::NotFound,
                                      snap + " is gone (the generation was removed, e.g. with bottomless-cli rm); "
                                             "its segments could not be restored: starting a new generation",
                                      "GenerationRemoved"),
                           "the generation's snapshot was removed from the bucket");
        return seen.error();
    }
    if (!r) {
        if (r.error().kind == ErrorKind::Precondition) {
            // Someone else's segment sits at our key: this history forked.
            abandon_generation(make_error(ErrorKind::Precondition,
                                          key + " already exists with other content (another writer on this "
                                                "generation?); starting a new generation",
                                          "Fork"),
                               "segment key taken by another writer");
            return r.error();
        }
        note_failure(r.error());
        return std::move(r).error();
    }
    consecutive_failures_ = 0;
    if (sync_pending_ && g_exit_before_state.load() && g_exit_after_sync_uploads.load() > 0 &&
        g_exit_after_sync_uploads.fetch_sub(1) == 1)
        ::_exit(3);  // test hook: stored in S3, not yet in the state file
    seq_ = f.header.seq;
    prev_sha256_ = f.sha256;
    uint64_t raw = 0;
    for (const auto& t : f.header.txns) raw += static_cast<uint64_t>(t.frames) * f.header.page_size;
    wal_bytes_since_snapshot_ += raw;
    uint64_t u = unshipped_bytes_.load();
    unshipped_bytes_.store(u > raw ? u - raw : 0);
    {
        std::lock_guard slock(status_mu_);
        ++segments_uploaded_;
        bytes_uploaded_ += f.bytes.size();
        segment_bytes_uploaded_ += f.bytes.size();
        wal_bytes_shipped_ += raw;
        if (!f.header.txns.empty()) last_durable_commit_us_ = f.header.txns.back().commit_us;
    }
    WalPosition end = f.header.end;
    uint64_t idx = f.commit_index;
    if (f.cut_at != Clock::time_point{}) note_ship_time(Clock::now() - f.cut_at);
    inflight_.reset();
    segment_bytes_ = 0;
    mark_durable(end, idx);
    sync_pending_ = false;  // the state written next records this upload
    write_state_file(false);
    return {};
}

Status Replicator::upload_pending(Lock& lock, bool force, Clock::time_point deadline) {
    const uint64_t seg_limit = segment_limit(config_);
    for (;;) {
        if (inflight_) {
            if (auto st = upload_inflight(lock); !st) return st;
            continue;
        }
        // Nothing under way (a snapshot or a failed sync commit may have
        // dropped a segment without saying so here).
        segment_bytes_ = 0;
        if (pending_.empty()) return {};
        if (generation_.empty() || need_snapshot_) return {};  // the next snapshot covers them
        bool due = force || pending_bytes_ >= seg_limit ||
                   Clock::now() - first_pending_time_ >= batch_wait();
        if (!due) return {};
        if (Clock::now() > deadline)
            return make_error(ErrorKind::Cancelled, "deadline passed before everything was shipped", "Timeout");

        InFlight f;
        f.cut_at = Clock::now();
        f.header.db_id = config_.db_id;
        f.header.generation = generation_;
        f.header.seq = seq_ + 1;
        f.header.page_size = page_size_;
        f.header.start = durable_;
        f.header.prev_sha256 = prev_sha256_;
        f.header.compression = config_.compression;
        std::vector<SegmentFrame> frames;
        uint64_t bytes = 0;
        size_t n = 0;
        // A segment must stay within what readers accept (format.h): its
        // header under kMaxHeaderSize, its decoded body under
        // kMaxSegmentBodyBytes. One transaction larger than that goes into
        // the bucket as a snapshot instead.
        auto body = [&](const PendingTxn& t) { return t.frames.size() * (4 + uint64_t{page_size_}); };
        if (body(pending_.front()) > kMaxSegmentBodyBytes) {
            request_snapshot("a transaction of " + std::to_string(pending_.front().frames.size()) +
                             " pages is larger than a segment may hold");
            return {};
        }
        uint64_t seg_body = 0;
        while (n < pending_.size() && n < kMaxSegmentTxns && seg_body + body(pending_[n]) <= kMaxSegmentBodyBytes &&
               (n == 0 || bytes + pending_[n].bytes <= seg_limit)) {
            seg_body += body(pending_[n]);
            PendingTxn& t = pending_[n];
            f.header.txns.push_back(SegmentTxn{static_cast<uint32_t>(t.frames.size()), t.db_pages, t.commit_us});
            bytes += t.bytes;
            for (auto& fr : t.frames) frames.push_back(std::move(fr));
            f.header.end = t.end;
            f.commit_index = t.commit_index;
            ++n;
        }
        pending_.erase(pending_.begin(), pending_.begin() + static_cast<std::ptrdiff_t>(n));
        // The frames move from pending to the segment: counted once (out of
        // pending first, so that memory_bytes() never counts them twice).
        pending_bytes_ -= std::min(pending_bytes_.load(), bytes);
        segment_bytes_ = bytes;
        // Compressing (and encrypting) up to batch_max_bytes takes a while:
        // not under upload_mu_, which a writer restarting the WAL needs.
        // net_mu_ (held by our caller) keeps other uploads out meanwhile.
        lock.unlock();
        f.bytes = encode_segment(f.header, frames, &f.sha256, cipher_.get());
        segment_bytes_ = bytes + f.bytes.size();  // both held until the frames go
        note_memory();
        // The pages become the tee's spares for the next frames (tee.h).
        std::vector<PageBuf> pages;
        try {
            pages.reserve(frames.size());
            for (auto& fr : frames) pages.push_back(std::move(fr.page));
        } catch (const std::bad_alloc&) {
            // Not kept: freed with `frames` below.
        }
        frames.clear();
        frames.shrink_to_fit();
        // The pages stop counting in the segment before they count as
        // spares (never twice in memory_bytes(), so never in the peak).
        segment_bytes_ = f.bytes.size();
        tee_.recycle(pages, pending_bytes_.load() + f.bytes.size());
        note_memory();  // the spares kept
        lock.lock();
        inflight_ = std::move(f);
        if (!pending_.empty()) first_pending_time_ = Clock::now();
    }
}

namespace {
std::atomic<int> g_injected_uploader_exceptions{0};
}

void testing_inject_uploader_exceptions(int n) { g_injected_uploader_exceptions.store(n); }

Status Replicator::check_bucket_first() {
    if (halted_.load()) {
        std::lock_guard slock(status_mu_);
        return make_error(ErrorKind::InvalidArgument, last_error_, "ReplicationStopped");
    }
    if (!deferred_check_) return {};
    Status st = verify_bucket();
    if (!st) note_failure(st.error());
    return st;
}

void Replicator::guarded_step(Lock& lock, bool force) noexcept {
    // The uploader thread's exception barrier: an exception leaving a
    // thread's entry point terminates the host application. A step that
    // throws (out of memory, a library failure) is recorded in status and
    // retried after the usual back-off; the application never notices.
    auto fail = [this](const char* what) noexcept {
        try {
            note_failure(make_error(ErrorKind::Io, std::string("internal error in the uploader: ") + what +
                                                       " (retrying; the application is not affected)",
                                    "UploaderException"));
        } catch (...) {
            retry_after_ = Clock::now() + std::chrono::seconds(1);
        }
    };
    try {
        if (g_injected_uploader_exceptions.load() > 0 && g_injected_uploader_exceptions.fetch_sub(1) > 0)
            throw std::runtime_error("injected by a test");
        (void)step(lock, force);
    } catch (const std::bad_alloc&) {
        fail("out of memory");
    } catch (const std::exception& e) {
        fail(e.what());
    } catch (...) {
        fail("unknown exception");
    }
}

Status Replicator::step(Lock& lock, bool force) {
    if (!force && Clock::now() < retry_after_) return {};
    if (Status st = check_bucket_first(); !st) return st;
    if (broken_outside_wal_.load()) request_snapshot("the database file was written outside the WAL");
    if (foreign_writer_.exchange(false))
        request_snapshot("the WAL changed behind bottomless's back (another process writing without it?)");
    if (need_snapshot_) {
        // Observations up to now are inside the snapshot.
        {
            std::lock_guard olock(obs_mu_);
            commits_.clear();
        }
        auto st = take_snapshot(lock);
        if (!st) {
            note_failure(st.error());
            return st;
        }
        consecutive_failures_ = 0;
        if (need_snapshot_) return {};  // nothing to snapshot yet
    }
    (void)capture();
    if (config_.snapshot_after_bytes && wal_bytes_since_snapshot_ > config_.snapshot_after_bytes)
        request_snapshot("snapshot policy: " + std::to_string(wal_bytes_since_snapshot_) + " WAL bytes since the last one");
    else if (config_.snapshot_interval.count() > 0 && Clock::now() - last_snapshot_time_ > config_.snapshot_interval)
        request_snapshot("snapshot policy: interval elapsed");
    // A backlog (commits the memory cap left in the WAL) ships as one
    // stream: each uploaded segment frees room, the next capture fills it
    // and ships at once, without waiting for the batch interval. Bounded in
    // time so that the thread still looks at its stop flag and lets a
    // flush or a snapshot in now and then.
    const auto stream_until = Clock::now() + std::chrono::seconds(2);
    for (;;) {
        // Only commits the memory cap held back: commits that merely
        // arrived since the capture wait for the batch interval as usual
        // (before, they counted too, and an active writer had a segment
        // uploaded at every step: ~30 PUTs/s instead of one per interval).
        const bool backlog = capture_held_back_;
        Status st = upload_pending(lock, force || backlog, Clock::now() + std::chrono::hours(1));
        if (!st || !backlog || need_snapshot_) return st;
        if (Clock::now() >= stream_until) {
            wake();  // go on in a next step, after the databases due before it
            return st;
        }
        // The segment just shipped freed its frames: hand them back before
        // the next capture fills another arena (not under upload_mu_, as
        // during a request).
        lock.unlock();
        maybe_release_memory();
        lock.lock();
        const WalPosition before = captured_;
        (void)capture();
        if (captured_ == before && pending_.empty()) return st;  // no progress: leave it to the next step
    }
}

namespace {
// How often an uploader step looks again while something is owed but not
// yet shippable (the batch deadline passed, memory full, a snapshot asked
// for after this step's): as the per-database thread polled before the pool.
std::chrono::milliseconds poll_interval(const ReplicatorConfig& c) {
    return std::min<std::chrono::milliseconds>(c.batch_interval / 4 + std::chrono::milliseconds(1),
                                               std::chrono::milliseconds(250));
}
// An application thread holds net_mu_ (a sync commit, bottomless_snapshot(),
// a flush before a WAL restart): it ships for this database meanwhile; the
// pool's worker looks again after this instead of waiting on the mutex
// (a worker never blocks on one database).
constexpr std::chrono::milliseconds kNetBusyRetry{50};
// How long a database that committed nothing keeps the tee's spare pages.
// An application writing in bursts reuses them at its next burst instead of
// taking (and faulting in) fresh memory for every frame: freeing them as
// soon as nothing was left to ship cost such a writer a third of its
// throughput (write_bench --burst 300/1700: 0.58-0.61 of plain WAL, 0.77-0.80
// with the spares kept). A database quiet for this long gives them back.
constexpr std::chrono::seconds kSpareKeep{5};
}  // namespace

Clock::time_point Replicator::pool_step() noexcept {
    try {
        // First, before any lock a snapshot may hold for long: an ended WAL
        // epoch's unshipped frames, copied aside before the new epoch
        // overwrites them (so the writer does not have to).
        if (preserve_from_.load(std::memory_order_relaxed) != UINT64_MAX) preserve_ended_frames();
        poll_followers();  // other processes' commits: noted like ours
        std::unique_lock net(net_mu_, std::try_to_lock);
        if (!net.owns_lock()) return Clock::now() + kNetBusyRetry;
        bool force;
        {
            std::lock_guard cvlock(cv_mu_);
            force = force_;
            wake_ = false;
            force_ = false;
        }
        Lock lock(upload_mu_);
        // The batch deadline counts from the oldest unshipped commit (the
        // step was scheduled for it): ship what is pending now, unless the
        // database is backing off after a failure.
        const int64_t oldest = oldest_unshipped_us_.load();
        const int64_t batch_us = batch_wait().count();
        if (!force && Clock::now() >= retry_after_ && oldest > 0 && now_us() - oldest >= batch_us) force = true;
        guarded_step(lock, force);
        auto due = next_due();
        // Nothing left to ship (after a segment, a snapshot, a dropped
        // generation): a database that has been quiet for kSpareKeep keeps no
        // spare pages; until then a step is due to look.
        const bool quiet = nothing_to_ship_locked();
        const uint64_t noted = noted_index_.load();
        lock.unlock();
        net.unlock();
        if (quiet && tee_.spare_bytes() > 0) {
            const auto now = Clock::now();
            if (noted != spare_seen_index_) {
                spare_seen_index_ = noted;
                spare_quiet_since_ = now;
            }
            // Not under the locks: freeing up to the cap's worth of pages
            // takes a while.
            if (now - spare_quiet_since_ >= kSpareKeep) tee_.drop_spares();
            else due = std::min(due, spare_quiet_since_ + kSpareKeep);
        }
        maybe_release_memory();
        return due;
    } catch (...) {
        // next_due() or a lock failed (nothing in a step escapes guarded_step).
        return Clock::now() + std::chrono::seconds(1);
    }
}

Clock::time_point Replicator::next_due() {
    const auto now = Clock::now();
    const auto poll = poll_interval(config_);
    constexpr auto kIdle = Clock::time_point::max();
    if (halted_.load()) return kIdle;  // nothing ships until the process restarts (status says why)
    auto due = kIdle;
    if (need_snapshot_ || broken_outside_wal_.load() || foreign_writer_.load()) {
        // An empty database has nothing to snapshot: its first commit
        // schedules the step.
        struct stat st{};
        if (::stat(path_.c_str(), &st) == 0 && st.st_size > 0) due = now + poll;
    }
    if (noted_index_.load() > durable_index_.load() || !pending_.empty() || inflight_) {
        // The batch deadline: batch_wait() after the oldest unshipped
        // commit, or now when a segment's worth waits.
        auto batch = now;
        const int64_t oldest = oldest_unshipped_us_.load();
        if (oldest > 0 && unshipped_bytes_.load() < segment_limit(config_))
            batch = now + std::chrono::microseconds(oldest - now_us()) + batch_wait();
        if (batch <= now) batch = now + poll;  // this step was at or past it: look again shortly
        due = std::min(due, batch);
    }
    if (due != kIdle) due = std::max(due, retry_after_);  // a failing database backs off on its own schedule
    if (config_.snapshot_interval.count() > 0 && !generation_.empty())
        due = std::min(due, std::max(last_snapshot_time_ + config_.snapshot_interval + std::chrono::milliseconds(1),
                                     retry_after_));
    return due;
}

void Replicator::schedule_commit() noexcept {
    if (!pool_member_) return;
    try {
        // A batch ships batch_wait() after its first commit, or at once
        // when it fills a segment. Later commits of the batch find the step
        // scheduled earlier already: one atomic load.
        const auto now = Clock::now();
        // A segment's worth ships within a quarter interval (at most 250 ms),
        // not at once: shipping each 16 MiB the moment it fills let every WAL
        // epoch become durable sooner, so SQLite's auto-checkpoint (and its
        // two fsyncs) ran ~20 % more often, and a 1-row writer at ~90 000
        // txn/s under synchronous=NORMAL fell from 0.96x to 0.74x of plain
        // WAL (write_bench, A/B against the thread per database).
        const auto soon = std::min<std::chrono::milliseconds>(config_.batch_interval / 4, std::chrono::milliseconds(250));
        pool_member_->schedule(unshipped_bytes_.load() >= segment_limit(config_) ? now + soon : now + batch_wait());
    } catch (...) {
        // Out of memory in the pool's queue: the next flush, commit or
        // close ships it.
    }
}

void Replicator::ship_before_close() {
    // Closing: ship everything committed, bounded by the shutdown timeout.
    {
        // Nothing owed (an idle database): no step, so no request either
        // (the deferred bucket check of an offline start waits for an upload).
        std::lock_guard net(net_mu_);
        Lock lock(upload_mu_);
        std::lock_guard olock(obs_mu_);
        if (durable_index_.load() >= noted_index_.load() && commits_.empty() && pending_.empty() && !inflight_ &&
            !need_snapshot_ && !broken_outside_wal_.load() && !foreign_writer_.load())
            return;
    }
    auto deadline = Clock::now() + config_.shutdown_timeout;
    while (Clock::now() < deadline) {
        {
            std::lock_guard net(net_mu_);
            Lock lock(upload_mu_);
            retry_after_ = {};
            guarded_step(lock, true);
            bool done = durable_index_.load() >= noted_index_.load() && pending_.empty() && !inflight_ &&
                        (!need_snapshot_ || generation_.empty());
            if (done && !need_snapshot_) return;
            if (done && need_snapshot_ && consecutive_failures_ == 0) return;
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    log::warn(path_ + ": closing with committed transactions not in S3 after " +
              std::to_string(config_.shutdown_timeout.count()) +
              " ms; they stay in the local WAL and are shipped at the next open");
}

namespace {
// Whether two states say the same (every field write_state_file() records
// but its time).
bool same_record(const LocalState& a, const LocalState& b) {
    return a.bucket == b.bucket && a.db_id == b.db_id && a.generation == b.generation && a.seq == b.seq &&
           a.prev_sha256 == b.prev_sha256 && a.position == b.position && a.clean_close == b.clean_close &&
           !a.restored && !b.restored && a.lineage == b.lineage && a.db_size == b.db_size &&
           a.db_mtime_ns == b.db_mtime_ns && a.db_ino == b.db_ino && a.key_id == b.key_id && a.kdf == b.kdf &&
           a.restarted.frame == 0 && b.restarted.frame == 0 && !a.sync_pending && !b.sync_pending;
}
}  // namespace

bool Replicator::write_state_file(bool clean_close) {
    const bool ok = write_state_record(clean_close);
    // Other processes may now restart the WAL over what is durable: only
    // once the state file says so, so that whoever leads next (reading the
    // state file) starts from no earlier than what they relied on.
    if (area_) area_->publish_durable(durable_.salt1, durable_.salt2, durable_.frame);
    return ok;
}

bool Replicator::write_state_record(bool clean_close) {
    if (generation_.empty() && lineage_.empty()) return true;
    LocalState st;
    st.bucket = config_.bucket;
    st.db_id = config_.db_id;
    st.generation = generation_;
    st.seq = seq_;
    st.prev_sha256 = prev_sha256_;
    st.position = durable_;
    st.lineage = lineage_;
    st.key_id = cipher_ ? cipher_->key_id() : std::string();
    st.kdf = kdf_text_;
    st.restarted = restart_record();
    st.sync_pending = sync_pending_;
    struct stat db{}, wal{};
    bool fully_shipped = durable_index_.load() >= noted_index_.load() && pending_.empty() && !inflight_;
    if (clean_close && fully_shipped && stat_file(path_, db) && !stat_file(wal_path_, wal)) {
        st.clean_close = true;
        st.db_size = static_cast<int64_t>(db.st_size);
        st.db_mtime_ns = mtime_ns(db);
        st.db_ino = static_cast<uint64_t>(db.st_ino);
    }
    // The clean close of a database that changed nothing since its offline
    // open: the file already says exactly this (only its updated_us would
    // differ). Rewriting it costs a file creation and a rename per close.
    if (st.clean_close && state_on_disk_ && same_record(*state_on_disk_, st)) return true;
    state_on_disk_.reset();
    // Not fsynced on purpose: a stale state file only makes the next start
    // unable to prove continuity, which costs a new generation, never data.
    written_record_ = st.restarted;
    if (Status w = replicator::write_state_file(state_path_, st); !w) {
        log::warn(w.error().message);
        return false;
    }
    return true;
}

}  // namespace bottomless::replicator
