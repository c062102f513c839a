// The replicator: one per database file in a process, shared by all its
// connections. It turns committed WAL frames into segment objects in the
// bucket, starts generations from snapshots, and decides at start-up whether
// to restore, continue or start afresh.
//
// The VFS shim tells it what SQLite does (cheap calls, no I/O, safe under
// SQLite's shm locks), hands it every WAL write (the tee: frames are kept as
// written, never read back), and asks it: may the WAL restart or be
// checkpointed now, and — in sync mode — is this commit durable. Its
// uploader steps (check, encode, upload) run on the process's uploader pool
// (pool.h), scheduled by the database itself; docs/SEMANTICS.md describes
// the guarantees.
//
// Lock order (a thread holding one may take only those after it):
//   registry lock (replicator.cpp) — held only to look an entry up or
//     change it, never with any lock below, never across I/O or a join
//   net_mu_     network work: segment uploads, snapshots, sync commits
//   upload_mu_  the upload state (pending transactions, positions, the
//               generation); released while a request is on the wire or a
//               segment is compressed
//   obs_mu_, status_mu_, cv_mu_, the tee's mutex — leaves: held for a
//     copy or a container operation, never with each other
//   preserve_mu_ — held for the copy aside of an ended epoch's unshipped
//     frames (file I/O), with no other lock
//   handles_mu_ — a leaf: the connections' database handles a snapshot
//     borrows (never held across a read through one)
//   the followers watch's lock (replicator.cpp) — taken alone, or with
//     cv_mu_ and the pool's mutex under it (wake())
//   the uploader pool's mutex (pool.h) — below every other: taken by
//     schedule() (wake(), note_commit()) and by the pool's workers, never
//     held while a step runs
// The shm hooks (xShmLock) take only leaves and atomics. Guards are named
// after their mutex (lock: upload_mu_, olock: obs_mu_, slock: status_mu_,
// cvlock: cv_mu_, reg: the registry's).
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "replicator/config.h"
#include "replicator/format.h"
#include "replicator/leader_lock.h"
#include "replicator/pool.h"
#include "replicator/shared_area.h"
#include "replicator/tee.h"
#include "replicator/wal.h"
#include "s3/client.h"
#include "s3/result.h"

struct sqlite3_vfs;
struct sqlite3_file;

namespace bottomless::replicator {

// Test hook: the next `n` uploader steps (in any replicator of this
// process) throw, as a failing library or an allocation would.
void testing_inject_uploader_exceptions(int n);
// Test hook: the process exits (status 3) right after its n-th sync commit
// is durable in S3, before the commit frame is written locally; with
// `before_state`, also before the state file records the upload.
void testing_exit_after_sync_uploads(int n, bool before_state = false);
// Test hook: how often a replicator that uploads segments checks that its
// generation's snapshot is still in the bucket (default 10 minutes).
void testing_snapshot_check_interval(std::chrono::milliseconds every);

struct ReplicatorMetrics;  // replicator/metrics.h
struct LocalState;
struct LocalProof;
struct GenerationInfo;

class Replicator {
public:
    // The replicator of the database at `path` (canonical): the running one,
    // or a new one after the start-up decision (which may restore the file
    // from the bucket, or fail per LIBSQL_BOTTOMLESS_INITIAL_REPLICATION).
    // Only one process replicates a database (the leader, leader_lock.h).
    // When another process leads, the result is null and *leader_elsewhere
    // is set to its pid (-1 when unknown): this process must not write the
    // database (the VFS opens it read-only), or the history would fork.
    // `takeover`: a process whose connections already have the file open
    // (a follower, follower.h) becomes the leader: it never waits for
    // another process's start-up, and never restores over the open file.
    static Result<std::shared_ptr<Replicator>> acquire(const std::string& path, const ReplicatorConfig& config,
                                                       long* leader_elsewhere = nullptr, bool takeover = false,
                                                       std::function<std::optional<WalIndexHeader>()> live_wal_index = {});
    // The running replicator of `path`, if any (for the WAL and journals).
    static std::shared_ptr<Replicator> find(const std::string& path);
    // The VFS the shim forwards to (SQLite's default): a snapshot that
    // cannot borrow a connection's handle (below) opens the database file
    // through it, read-only, so its close never drops SQLite's POSIX locks
    // (the unix VFS defers that close while the inode is locked: the
    // descriptor then stays until the last connection closes). Set once at
    // registration.
    static void set_file_vfs(sqlite3_vfs* vfs);

    // The database file's handles of this process's connections (the
    // shim's lower files, vfs.cpp). A snapshot reads the file through one of
    // them rather than opening it again: no descriptor beyond SQLite's own
    // (issue 10). Only a handle whose memory map is known to be off (its
    // connection's mmap_size is 0, SQLite's default) is lent: a mapped file
    // may be remapped by its connection's thread while another reads it.
    // Reads through the unix VFS are pread()s, safe beside the connection's
    // own use of the handle. remove_db_handle() (before the connection
    // closes it) and set_db_handle_lendable(false) (its map limit set above
    // 0) wait for a read under way through it; the snapshot then borrows
    // another or opens its own.
    struct DbHandle {
        sqlite3_file* file = nullptr;
        bool lendable = false;  // memory map off
        int readers = 0;        // reads under way through it
    };
    void add_db_handle(sqlite3_file* f);
    void set_db_handle_lendable(sqlite3_file* f, bool lendable);
    void remove_db_handle(sqlite3_file* f);
    // What the snapshot does through a lent handle: the file's size, a read
    // of n bytes at off (true: done; false: failed). nullopt: no handle can
    // be lent now.
    std::optional<bool> db_handle_size(uint64_t& out);
    std::optional<bool> read_db_handle(void* buf, size_t n, uint64_t off);

    ~Replicator();
    Replicator(const Replicator&) = delete;
    Replicator& operator=(const Replicator&) = delete;

    bool enabled() const { return enabled_; }
    bool sync_mode() const { return config_.sync; }
    const ReplicatorConfig& config() const { return config_; }

    // ---- events from the VFS (cheap; no I/O; callable under shm locks) ----

    // A write transaction ended (WAL write lock released) and the wal-index
    // header says the last commit is `frame` in the epoch (salt1, salt2).
    void note_commit(uint32_t salt1, uint32_t salt2, uint64_t frame, uint32_t page_size);
    // May the WAL be restarted (its frames overwritten from the start)?
    // Without arguments: only when every committed frame is durable in S3
    // and no snapshot reads WAL frames. Given the wal-index header (shm
    // mode): also when the unshipped frames are all in memory (the tee has
    // no hole) and fit there (invariant 2: they are kept there and, after
    // SQLite's complete checkpoint, in the database file). Frames of a
    // writer we never observed count too.
    bool restart_allowed() const;
    bool restart_allowed(uint32_t salt1, uint32_t salt2, uint64_t mx_frame) const;
    // A connection took the WAL write lock; the wal-index header must still
    // say what we last observed, or a writer outside bottomless was here.
    void check_wal_index(uint32_t salt1, uint32_t salt2, uint64_t mx_frame);
    // Checkpoints copy WAL pages into the database file; a snapshot being read
    // needs that file still, so checkpoints wait while one is read. Given the
    // wal-index header: also refused while the WAL could not restart after
    // the checkpoint (unshipped frames only it holds), so that SQLite's
    // auto-checkpoint after each commit fails in one lock call instead of
    // copying pages and syncing the database file for a WAL that must stay.
    bool checkpoint_allowed() const { return !snapshot_active_.load(); }
    bool checkpoint_allowed(uint32_t salt1, uint32_t salt2, uint64_t mx_frame) const {
        return checkpoint_allowed() && restart_allowed(salt1, salt2, mx_frame);
    }
    // The CKPT lock (a checkpoint) or the read-mark lock of a WAL restart is
    // being taken: registers it and says whether it may go ahead; every true
    // is matched by an end_...() when the lock is released (or not
    // obtained). Registering before asking closes the race with a snapshot
    // that starts at the same moment: it sets snapshot_active_ and then waits
    // for the registered ones to end (snapshot.cpp).
    bool begin_checkpoint();
    bool begin_checkpoint(uint32_t salt1, uint32_t salt2, uint64_t mx_frame);
    void end_checkpoint() { checkpoints_active_.fetch_sub(1); }
    bool begin_restart();
    // Given the wal-index header. With other processes writing, a restart
    // that goes ahead with frames not yet durable copies them aside first
    // (keep_epoch_tail) and records the epoch's end in the shared area.
    bool begin_restart(const WalIndexHeader& h);
    void end_restart() { restarts_active_.fetch_sub(1); }
    bool wal_is_open() const { return wal_open_.load() > 0; }
    // The database file was written while no WAL was open (rollback-journal
    // mode, or a journal-mode change): the history can no longer be proven.
    void note_write_outside_wal();
    // The database file was written (a checkpoint): a snapshot being read
    // without a checkpoint veto (exclusive locking mode) is torn.
    void note_db_write();
    void note_wal_open(bool open);
    // A connection mapped region 0 of the wal-index (`region0`), or unmapped
    // it (null). Whether the database uses a shared-memory wal-index (normal
    // mode) or not (exclusive locking mode, where commits are seen in WAL
    // writes). The mapping is the same for every connection of the process.
    void note_shm(const volatile unsigned char* region0);
    bool uses_shm() const { return shm_users_.load() > 0; }

    // Cooperating processes (shared_area.h): the wal-index may name commits
    // of other processes (a poll, a flush, a checkpoint, a follower's
    // restart): reads its header now (no WAL lock needed) and notes it, as
    // note_commit(), after checking that a new WAL epoch was started by a
    // follower where our durable position ends, or by this process (else: a
    // writer outside bottomless, a new generation). False when not mapped.
    bool note_wal_index();
    // The area shared with the other processes (null: none could be opened).
    const SharedArea* shared_area() const { return area_.get(); }

    // ---- calls from the VFS that may block (never under shm locks) ----

    // Before the WAL header is rewritten, the WAL truncated or deleted: make
    // every committed frame durable first. Bounded by `timeout`.
    Status flush_before_wal_loss(const char* why, std::chrono::milliseconds timeout);
    // Sync mode: called with the commit frame before it reaches the disk. OK
    // means the transaction is durable in S3 and may be committed locally.
    Status commit_sync(uint64_t frame, const unsigned char* frame_header, const unsigned char* page,
                       uint32_t page_size);
    // A frame is about to be written, ending at byte `end` of the WAL. In
    // async mode a writer never waits for S3: false only under the "fail"
    // WAL budget policy, when unshipped frames hold a WAL past
    // max_wal_bytes (the VFS fails the write with SQLITE_FULL). Cheap: atomics.
    bool wal_write_allowed(uint64_t end);
    // The WAL was restarted (a new header at offset 0).
    void note_wal_restart() { wal_bytes_.store(0); wal_over_budget_.store(false); }
    // SQLite is about to write the WAL up to byte `end` (a frame), or to
    // truncate it (`end` 0). If that would overwrite frames of the ended
    // epoch that are not durable yet (restart_allowed() let it end with
    // them in memory), they are first copied, at their offsets, to
    // `<db>-bottomless-frames`, so that after a crash the next start still
    // recovers them (startup.cpp) instead of starting a new generation. The
    // uploader normally copies them as soon as the epoch ends; otherwise the
    // writer does, at most once per epoch. One atomic load when nothing is
    // owed. Never fails the write.
    void before_wal_overwrite(uint64_t end) noexcept {
        if (end == 0 || end > preserve_from_.load(std::memory_order_relaxed)) preserve_ended_frames();
    }
    // A successful write of the WAL by a connection of this process: the
    // tee keeps the frame bytes (tee.h), so nothing reads them back. Cheap:
    // a copy under a short mutex; never fails the write.
    void tee_write(uint64_t off, const void* p, size_t n, uint32_t page_size) noexcept {
        if (!enabled_) return;
        tee_.write(off, static_cast<const unsigned char*>(p), n, page_size, held_outside_tee());
        note_memory();
    }

    // ---- SQL surface ----
    Result<WalPosition> flush(std::chrono::milliseconds timeout);  // bottomless_flush()
    // bottomless_snapshot(): starts a new generation now (bounded by the S3
    // client's retry budget); returns its id.
    Result<std::string> snapshot_now();
    std::string status_json() const;  // bottomless_status()
    // bottomless_status('*'): the process's summary (databases open, the
    // uploader pool, pending bytes, requests, databases with an error).
    static std::string process_status_json();
    // bottomless_metrics() (replicator/metrics.h): a copy of the counters,
    // and a visit of every running replicator of the process (not under
    // the registry's lock: opens and closes go on meanwhile).
    ReplicatorMetrics metrics() const;
    static void for_each(const std::function<void(const Replicator&)>& fn);

private:
    Replicator(std::string path, ReplicatorConfig config);
    Status startup();
    // Continues the recorded generation with no S3 request when the state
    // file and the local files prove it (the bucket is checked later).
    bool start_offline();
    // Continues the generation `state` records, as `proof` established.
    void continue_from(const LocalState& state, LocalProof& proof);
    void start_uploader();
    // Deferred start-up check, before the first upload: does the bucket still
    // end where the state file says? If not, a new generation (parent: the
    // bucket's newest). A key the bucket's newest generation does not use halts.
    Status verify_bucket();
    Status check_bucket_first();  // halted, or verify_bucket() once
    // Where the bucket's history of `g` ends, if the local WAL still holds
    // exactly that position (a state file that lagged behind an upload).
    std::optional<LocalState> bucket_end_held_locally(const GenerationInfo& g);
    struct BucketEnd {
        WalPosition position;     // as the bucket stores it (masked under encryption)
        std::string prev_sha256;  // its last object's trailer
    };
    std::optional<BucketEnd> read_bucket_end(const GenerationInfo& g);
    bool continue_within_pending(const GenerationInfo& g);
    // continue_from() there; false if not held. `may_write_wal` (start-up,
    // before SQLite has the file open): bring_in_last_segment() first.
    bool continue_at_bucket_end(const GenerationInfo& g, bool may_write_wal);
    // Sync mode: the bucket's last segment of `g` starts exactly at the local
    // WAL's last commit (a transaction durable in S3 whose commit frame never
    // reached the disk): write its frames into the WAL. Never acknowledged,
    // so either outcome is allowed; this one keeps the generation.
    bool bring_in_last_segment(const GenerationInfo& g);
    // One uploader step on a pool worker (step() under net_mu_ and
    // upload_mu_, behind guarded_step's barrier); returns when the next is due.
    std::chrono::steady_clock::time_point pool_step() noexcept;
    // When the next step is due, from the state after a step (upload_mu_
    // held): the batch deadline, the end of a back-off, a snapshot owed, the
    // snapshot interval; time_point::max() when idle (a commit schedules it).
    std::chrono::steady_clock::time_point next_due();
    // A commit was noted: the step is due at the batch deadline (or now,
    // when a segment's worth is unshipped). Cheap; never throws.
    void schedule_commit() noexcept;
    // The closing flush (the destructor): ships everything committed,
    // bounded by shutdown_timeout, on the closing thread.
    void ship_before_close();

    struct PendingTxn {
        std::vector<SegmentFrame> frames;
        uint32_t db_pages = 0;
        int64_t commit_us = 0;
        uint64_t commit_index = 0;  // the note_commit() sequence number it completes
        WalPosition end;            // position after its commit frame
        uint64_t bytes = 0;
    };
    struct Commit {
        uint32_t salt1 = 0, salt2 = 0;
        uint64_t frame = 0;
        int64_t time_us = 0;
        uint64_t index = 0;
    };
    struct InFlight {
        SegmentHeader header;
        std::string bytes;
        std::string sha256;
        uint64_t commit_index = 0;
        std::chrono::steady_clock::time_point cut_at{};  // when its frames were cut from pending (encoding began)
    };

    // All below run with upload_mu_ held (`lock`); the upload functions also
    // need net_mu_ and release upload_mu_ while a request is on the wire.
    using Lock = std::unique_lock<std::mutex>;
    Status step(Lock& lock, bool force);
    void guarded_step(Lock& lock, bool force) noexcept;  // step() behind the uploader's exception barrier
    Status capture();
    Status upload_pending(Lock& lock, bool force, std::chrono::steady_clock::time_point deadline);
    Status upload_inflight(Lock& lock);
    Status take_snapshot(Lock& lock);
    // The wal-index header now (both copies agreeing), if mapped.
    std::optional<WalIndexHeader> wal_index_now() const;
    // The WAL header of epoch (salt1, salt2): remembered, from the tee, or
    // read from the file while it is still in that epoch.
    std::optional<WalHeader> epoch_header(uint32_t salt1, uint32_t salt2, class WalFile& wal);
    // Frames [from, to] of epoch `hdr`, which end with a commit, into
    // pending_ (from the tee, or read from the WAL when the tee lacks them).
    Status capture_range(const WalHeader& hdr, uint64_t from, uint64_t to, WalFile& wal, int64_t commit_us,
                         uint64_t commit_index);
    // Whether capturing frames [from, to] keeps memory_bytes() within
    // held_limit (the tee holds them, or there is room to read them from
    // the WAL, made by shedding newer tee frames if nothing else frees it).
    bool fits_in_memory(const WalHeader& hdr, uint64_t from, uint64_t to);
    // The shared area says the captured epoch went on past captured_ (its
    // last frames would be skipped by moving to the next epoch).
    bool epoch_left_behind() const;
    // The frames of one or more transactions, after `captured_`, checked
    // against the checksum chain, into `out`; `pos` ends at the last commit.
    Status frames_to_txns(const WalHeader& hdr, uint64_t from, std::vector<TeeFrame>& frames, WalPosition& pos,
                          std::vector<PendingTxn>& out, int64_t commit_us, uint64_t commit_index);
    void mark_durable(const WalPosition& pos, uint64_t commit_index);
    void request_snapshot(const std::string& reason);
    // False (logged) if it could not be written; then publishes the durable
    // position to the shared area.
    bool write_state_file(bool clean_close);
    bool write_state_record(bool clean_close);
    // The WAL's epoch is about to go with frames only in memory: remember how
    // far it went and write the state file if its record changes.
    // `copy_aside`: the uploader copies its unshipped frames aside
    // (preserve_ended_frames); false when begin_restart already did.
    Status record_epoch_end(const char* why, bool copy_aside = true);
    WalPosition restart_record() const;  // ended_epochs_'s entry for durable_, if it went further
    void preserve_ended_frames() noexcept;
    void record_error(const Error& e);
    void note_failure(const Error& e);  // record_error + back-off before the next attempt
    void wake();
    void note_commit_locked(uint32_t salt1, uint32_t salt2, uint64_t frame, uint32_t page_size);  // obs_mu_ held
    // The other processes' commits since the last look (area_'s counter
    // moved): note_wal_index() of the wal-index header now.
    void poll_followers();
    // This process, or a follower, ended the epoch we last observed at or
    // after our last look (obs_mu_ held); the follower's commits up to that
    // end are noted.
    bool cooperating_restart();
    // The shared area's record of an epoch another process ended after the
    // state file's position, merged into the state read at start-up.
    void merge_shared_end(std::optional<LocalState>& state) const;
    void open_shared_area();     // maps it (acquire(), before the start-up)
    void publish_shared_area();  // the leader's position and pid, once started (start_uploader())
    void watch_join();           // then, once pool_member_ is set, the watch of followers' commits
    // The process's leaders with a shared area are watched by one pool
    // member (replicator.cpp): every kFollowerPoll it wakes those whose
    // followers committed since their last look.
    static std::chrono::steady_clock::time_point watch_step() noexcept;
    void watch_leave() noexcept;

    // Memory held for this database's unshipped frames (docs/CONFIG.md,
    // max_pending_bytes): the tee, pending transactions and the segment
    // being encoded or uploaded (held_bytes), and the tee's spare page
    // buffers (memory_bytes), all counted against the cap.
    // segment_limit: the most page bytes cut into one segment
    // (batch_max_bytes, at most a quarter of the cap). held_limit: what the
    // tee and pending transactions may fill; the rest of the cap is kept for
    // the encoded copy of one segment (its frames are already counted).
    static uint64_t segment_limit(const ReplicatorConfig& c);
    static uint64_t held_limit(const ReplicatorConfig& c);
    // The batch deadline less the time the recent segments took from being
    // cut to durable (encoding and the PUT; at most a quarter of the
    // interval): a batch is then durable about batch_interval after its
    // oldest commit, rather than that plus its own upload.
    std::chrono::microseconds batch_wait() const;
    void note_ship_time(std::chrono::steady_clock::duration cut_to_durable) noexcept;
    // Every commit noted is durable and nothing waits to ship (upload_mu_
    // held): the tee's spare pages can go (freed outside the locks).
    bool nothing_to_ship_locked() const {
        return pending_.empty() && !inflight_ && durable_index_.load() >= noted_index_.load();
    }
    uint64_t held_bytes() const { return tee_.bytes() + held_outside_tee(); }
    uint64_t held_outside_tee() const { return pending_bytes_.load() + segment_bytes_.load(); }
    uint64_t memory_bytes() const { return held_bytes() + tee_.spare_bytes(); }
    void note_memory() noexcept;  // raises memory_peak_ (and trim_peak_) to memory_bytes()
    void maybe_release_memory() noexcept;
    // The generation cannot go on (forked, or removed from the bucket):
    // records `why`, drops what was to ship into it, asks for a snapshot.
    // Under upload_mu_.
    void abandon_generation(const Error& why, const char* snapshot_reason);  // release_free_memory() once trim_peak_ is a segment above what is held

    const std::string path_, wal_path_, state_path_;
    const ReplicatorConfig config_;
    std::unique_ptr<s3::Client> client_;
    std::shared_ptr<const Cipher> cipher_;  // set by startup(), then read-only; null: plaintext
    bool enabled_ = true;
    std::optional<LeaderLock> leader_lock_;  // held until the destructor's work is done
    bool registered_ = false;                // in the registry (acquire() succeeded)
    std::string kdf_text_;  // the passphrase's KDF object (recorded in the state file); set at start-up

    // Observations from the VFS. obs_mu_ is held only to copy small values.
    mutable std::mutex obs_mu_;
    std::deque<Commit> commits_;          // guarded by obs_mu_
    uint32_t last_noted_salt1_ = 0, last_noted_salt2_ = 0;  // guarded by obs_mu_
    uint64_t last_noted_frame_ = 0;       // guarded by obs_mu_
    uint64_t own_restart_salts_ = 0;      // guarded by obs_mu_: the epoch a restart of this process last ended
    uint64_t sync_ahead_frame_ = 0;       // guarded by obs_mu_: the last frame commit_sync noted ahead of the wal-index
    // The epoch (and its last frame) whose unshipped frames begin_restart
    // last copied aside with other processes writing: flush_before_wal_loss
    // then has nothing to keep in memory. Guarded by obs_mu_.
    WalPosition kept_aside_;
    WalPosition last_commit_seen_;        // guarded by obs_mu_: the newest commit observed (frame > 0)
    std::atomic<uint64_t> noted_index_{0};    // commits observed so far
    std::atomic<uint64_t> durable_index_{0};  // commits durable in S3
    std::atomic<uint64_t> unshipped_bytes_{0};
    std::atomic<uint32_t> noted_page_size_{0};  // the WAL's, as the last commit noted said
    std::mutex handles_mu_;
    std::condition_variable handles_cv_;  // a read through a handle ended
    std::vector<DbHandle> handles_;       // guarded by handles_mu_
    std::atomic<bool> snapshot_active_{false};
    std::atomic<bool> snapshot_torn_{false};
    std::atomic<int> checkpoints_active_{0};  // registered checkpoints (begin_checkpoint)
    std::atomic<int> restarts_active_{0};     // registered WAL restarts (begin_restart)
    std::atomic<uint64_t> snapshots_torn_{0}; // snapshot attempts read again (status)
    // Region 0 of the wal-index while mapped (guarded by shm_mu_, a leaf).
    mutable std::mutex shm_mu_;
    const volatile unsigned char* shm0_ = nullptr;
    std::atomic<int> wal_open_{0};
    std::atomic<int> shm_users_{0};
    // Shared with the other processes of this file (set before the first
    // follower can exist: by acquire(), before startup_done()).
    std::unique_ptr<SharedArea> area_;
    std::atomic<uint64_t> area_commits_seen_{0};  // area_->commits() at the last poll
    bool has_followers_ = false;  // the watch's (under its lock): area_->followers() was seen set
    // Other processes' sync commits (Follower::commit_sync): one thread per
    // database that has followers, started by the watch once it sees them
    // (under its lock), waiting on the shared area's futex; stopped and
    // joined by the destructor.
    std::thread sync_server_;
    std::atomic<bool> sync_server_stop_{false};
    void serve_sync_requests() noexcept;
    bool poll_at_start_ = false;  // start-up: the wal-index, not a WAL scan, says what is committed
    bool takeover_ = false;  // acquire(takeover): the file is open in this process already
    // acquire(takeover): the wal-index header through a mapping this
    // process's connections hold (Follower::wal_index_now), or nothing.
    std::function<std::optional<WalIndexHeader>()> live_wal_index_;
    std::optional<WalIndexHeader> live_wal_index() const {
        return live_wal_index_ ? live_wal_index_() : std::nullopt;
    }
    std::atomic<bool> broken_outside_wal_{false};
    std::atomic<bool> foreign_writer_{false};
    std::atomic<uint64_t> durable_salts_{0};   // salt1 << 32 | salt2 of durable_, for the shm hooks
    std::atomic<uint64_t> durable_frame_{0};   // durable_.frame, for the shm hooks
    std::atomic<int64_t> ship_lead_us_{0};  // batch_wait(): cut-to-durable time of recent segments, averaged
    std::atomic<int64_t> oldest_unshipped_us_{0};  // commit time of the oldest commit not yet durable (0: none)
    std::atomic<uint64_t> wal_bytes_{0};           // highest WAL offset written since the last restart
    std::atomic<bool> wal_over_budget_{false};     // warned about this WAL epoch's size already
    std::atomic<uint64_t> pending_bytes_{0};       // bytes of pending_ (captured, not yet in a segment)
    // The segment under way: its frames' page bytes while it is encoded,
    // then its encoded size until uploaded or dropped (changed under net_mu_).
    std::atomic<uint64_t> segment_bytes_{0};
    std::atomic<uint64_t> memory_peak_{0};         // highest memory_bytes() seen (status: memory_peak_bytes)
    // Highest memory_bytes() seen since the freed memory was last handed
    // back to the kernel (release_free_memory(), after uploads).
    std::atomic<uint64_t> trim_peak_{0};
    // The tee's spare pages outlive a burst of commits (pool_step): the
    // commit count the last quiet step saw, and since when it has not moved.
    // Touched by pool steps only (one at a time, ordered by the pool's mutex).
    uint64_t spare_seen_index_ = 0;
    std::chrono::steady_clock::time_point spare_quiet_since_{};
    std::atomic<uint64_t> wal_frames_read_{0};     // frames read back from the WAL file (the tee lacked them)
    // WAL offset of the first frame of the ended epoch not yet durable, while
    // the new epoch has not overwritten it (before_wal_overwrite); max: none.
    std::atomic<uint64_t> preserve_from_{UINT64_MAX};
    // The end of that range (the ended epoch's last frame), and the epoch's
    // salts: set with preserve_from_, so the copy needs no lock of the upload
    // state (the writer must never wait for upload_mu_, which a snapshot
    // holds while it uploads).
    std::atomic<uint64_t> preserve_to_{0};
    std::atomic<uint64_t> preserve_salts_{0};
    // Held for one copy aside (file I/O: milliseconds), by the uploader
    // (woken when the epoch ends, so the copy is normally done before the new
    // epoch reaches the range) or by a writer that got there first; a writer
    // waits on it only when its new frames reach a range the uploader is
    // still copying. Taken with no other lock held.
    std::mutex preserve_mu_;
    Tee tee_;

    // net_mu_ serialises network work (segment uploads, snapshots, sync
    // commits); it is taken before upload_mu_. upload_mu_ guards the state
    // below and is held for local work only (reading WAL frames), never
    // while a segment is on the wire, so a writer that must capture frames
    // before the WAL restarts never waits for the network. Neither is taken
    // by the shm hooks.
    std::mutex net_mu_;
    std::mutex upload_mu_;
    std::string generation_;
    uint64_t seq_ = 0;
    std::string prev_sha256_;
    WalPosition captured_;          // last frame read from the WAL
    WalPosition durable_;           // last frame durable in S3
    uint32_t page_size_ = 0;
    std::vector<PendingTxn> pending_;
    std::optional<WalHeader> epoch_hdr_;  // the header of captured_'s WAL epoch, once known
    std::optional<InFlight> inflight_;
    bool need_snapshot_ = false;
    bool deferred_check_ = false;  // started offline: verify_bucket() before any upload
    // WAL epochs that ended (restarted, truncated, deleted) while some of
    // their frames were only in memory, and how far each went (salts and
    // frame; at most 16, newest last). The one of the durable position, if
    // it went further, is the state file's `restarted` (restart_record()).
    std::deque<WalPosition> ended_epochs_;
    WalPosition written_record_;  // the record in the last state file written
    // The clean-close state file an offline open proved continuity with, as
    // long as nothing has rewritten it: a close that would write the same
    // record leaves the file alone (a create and a rename per idle close).
    std::shared_ptr<const LocalState> state_on_disk_;
    bool sync_pending_ = false;  // a sync commit's segment is being uploaded (recorded in the state file)
    bool capture_held_back_ = false;  // the last capture() stopped at the memory cap: the WAL holds a backlog
    std::atomic<bool> halted_{false};  // the bucket's newest generation is under another key
    std::string snapshot_reason_;
    std::string parent_generation_;
    uint64_t parent_seq_ = 0;
    // Generations this file's replicators started that exist in the bucket,
    // plus the one being uploaded (newest first, at most 64):
    // kept in the state file so a later start recognises the bucket's newest
    // generation as its own even if the last run died mid-snapshot.
    std::vector<std::string> lineage_;
    uint64_t wal_bytes_since_snapshot_ = 0;
    std::chrono::steady_clock::time_point last_snapshot_time_;
    // When the generation's snapshot was last seen in the bucket (written,
    // or found by a HEAD before a segment upload: snapshot_still_there()).
    std::chrono::steady_clock::time_point snapshot_seen_;
    std::chrono::steady_clock::time_point first_pending_time_;
    std::chrono::steady_clock::time_point retry_after_;
    int consecutive_failures_ = 0;

    // Status, guarded by status_mu_.
    mutable std::mutex status_mu_;
    std::string last_error_;
    int64_t last_error_us_ = 0;
    std::string last_error_key_;        // last_error_ without its request id
    int64_t last_error_logged_us_ = 0;  // the same error is logged at most every 10 s
    int64_t last_durable_commit_us_ = 0;
    uint64_t errors_ = 0;  // record_error() calls, for bottomless_metrics()
    uint64_t segments_uploaded_ = 0;
    uint64_t snapshots_uploaded_ = 0;
    uint64_t bytes_uploaded_ = 0;
    uint64_t segment_bytes_uploaded_ = 0;  // compressed segment objects
    uint64_t wal_bytes_shipped_ = 0;       // the committed WAL page bytes they carry
    std::string status_generation_;
    uint64_t status_seq_ = 0;
    WalPosition status_durable_;

    // Uploader control, guarded by cv_mu_: a step is asked for (wake_) and
    // must ship what is pending now, batch due or not (force_).
    std::mutex cv_mu_;
    std::condition_variable durable_cv_;  // wakes flushers
    bool wake_ = false;
    bool force_ = false;
    // This database in the uploader pool (start_uploader() to the destructor).
    std::unique_ptr<PoolMember> pool_member_;
};

}  // namespace bottomless::replicator
