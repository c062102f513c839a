// Read replicas: a local database file that follows the bucket
// (docs/SEMANTICS.md "Read replicas"), and time travel (a read-only copy of
// a past state).
//
// The replica file is kept in rollback-journal ("legacy") format, header
// bytes 18/19 = 1, so that SQLite readers need no -wal or -shm and read it
// under SQLite's own rollback locking protocol. One process per replica file
// follows (LeaderLock on the file): its follower thread polls for the next
// segment of the generation (a GET of the predictable key; a listing only
// after seconds without a new segment, then backing off), checks the chain,
// and applies the segment as a rollback-mode writer would: SHARED,
// RESERVED, PENDING, EXCLUSIVE on the file through the lower VFS (readers
// holding SHARED make it wait), the original pages journaled (a real
// rollback journal, fsynced), the pages written, the size set, the change
// counter bumped (how readers learn to drop their cache), fsync, the
// journal deleted, unlock. A new generation is re-hydrated in place (the
// same inode: open readers keep working). "applying" in the state file
// "<db>-bottomless-replica" brackets every write, and the
// journal makes a torn file unreadable: a crash in the middle is rolled back
// (by SQLite in any reader, or by the next follower) and then re-hydrated,
// never served.
//
// Everything that touches the replica file goes through the lower
// sqlite3_vfs (never a raw descriptor): closing a raw descriptor of the file
// would drop every POSIX lock this process's SQLite connections hold on it.
//
// Locks: the process-wide registry mutex guards only the map of replica
// files (a lookup or a change, never I/O, a start or a join: a second
// opener of a file that is starting waits on that file's future), and is
// never taken with Replica::mu_ held. No lock is held across S3 requests
// or while waiting for the file's locks.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "replicator/config.h"
#include "replicator/format.h"
#include "replicator/leader_lock.h"
#include "replicator/sqlite_api.h"
#include "s3/client.h"
#include "s3/result.h"

namespace bottomless::replicator {

// Where a replica file stands: what the state file "<db>-bottomless-replica" records.
struct ReplicaState {
    std::string bucket, db_id, generation;
    uint64_t seq = 0;             // last segment applied (0: the snapshot only)
    WalPosition position;         // the position the file reflects
    std::string last_sha256;      // trailer of the last object applied
    uint32_t page_size = 0, db_pages = 0;
    int64_t last_commit_us = 0;   // the writer's commit time of the newest transaction in the file
    uint32_t counter = 0;         // the file change counter we last wrote (header bytes 24 and 92)
    bool applying = false;        // a write to the file is under way: its content is not proven
    int64_t db_size = -1, db_mtime_ns = -1;
    uint64_t db_ino = 0;
};

// The state file's text and back; nullopt for anything not understood.
std::string replica_state_json(const ReplicaState& s);
std::optional<ReplicaState> parse_replica_state(std::string_view text);

// Rewrites the first 100 bytes of page 1 so SQLite reads the file in
// rollback mode: bytes 18/19 = 1 (legacy), the change counter (24) and the
// version-valid-for number (92) = counter, the in-header size (28) = db_pages.
void make_legacy_header(unsigned char* header100, uint32_t counter, uint32_t db_pages);

class Replica {
public:
    // One per replica file and process (found by canonical path), shared by
    // its connections. `lower` is the VFS the file is read and locked
    // through (the default VFS below the shim). With cfg.replica_at_us: a
    // private read-only copy of that point in time under the cache directory
    // (removed when the last connection closes), not registered, not followed.
    // Two files start concurrently; a second opener of a file that is
    // starting waits for that start and shares its outcome. Never throws.
    // Errors: the open fails (the message says what to do).
    static Result<std::shared_ptr<Replica>> acquire(const std::string& path, const ReplicatorConfig& cfg,
                                                    sqlite3_vfs* lower);
    ~Replica();
    Replica(const Replica&) = delete;
    Replica& operator=(const Replica&) = delete;

    // The file SQLite opens, as a filename from sqlite3_create_filename()
    // (the lower VFS reads URI parameters after the name's terminator).
    const char* file_name() const { return file_name_; }
    bool time_travel() const { return time_travel_; }
    // bottomless_status() on a replica connection.
    std::string status_json() const;
    // A reader's SHARED lock met the follower's PENDING: how long to keep
    // trying (a little more than one apply may take).
    static constexpr std::chrono::milliseconds kReaderWait{5000};

private:
    Replica(std::string path, ReplicatorConfig cfg, sqlite3_vfs* lower);
    Status start();             // the first open: prove or hydrate, then follow
    Status init_time_travel();  // at=: restore the point in time into the cache
    void run();                 // the follower thread
    // One poll: Progress (poll again at once), Idle (nothing new: wait a
    // poll), Failed (an error, in last_error: wait the back-off).
    enum class Step { Progress, Idle, Failed };
    Step step();
    bool try_lead();
    // from_file: the replica's file holds the proven state_ (a generation
    // change, not a recovery): the image starts as a copy of it and the
    // restore fetches only what differs (incremental, docs/SEMANTICS.md).
    Status hydrate(const std::string& why, const std::string& generation = "", bool from_file = false);
    // Seeds `tmp` with the replica file's pages and a restore note naming
    // state_, for an incremental restore onto it; false when it cannot.
    bool seed_image(const std::string& tmp);
    Status hydrated(const ReplicaState& s, const std::string& why);
    Status apply_segment(uint64_t seq, const std::string& key, const std::string& body);
    Status check_generations();
    static bool stalled_code(const std::string& code);
    // The rollback journal "<db>-journal", in SQLite's own format
    // (fileformat.html, "The Rollback Journal"): the original content of
    // every page an apply or an in-place hydration overwrites, fsynced before
    // the first write and deleted once the file is fsynced (the commit
    // point). A writer that dies in between leaves a hot journal: SQLite
    // readers roll it back (read-write) or refuse to read
    // (SQLITE_READONLY_ROLLBACK), and the next follower rolls it back.
    // Called with the file's EXCLUSIVE lock held.
    Status write_journal(const std::vector<uint32_t>& pgnos, uint32_t orig_pages, uint32_t page_size);
    Status rollback_journal_locked(bool* rolled_back);
    // A hot journal left by a follower that died: rolled back at once
    // (takes the EXCLUSIVE lock) so readers in other processes can read.
    Status recover_journal();
    bool proven(const ReplicaState& s) const;
    Status save_state(const ReplicaState& s, bool durable);
    void set_error(const std::string& e);

    // Locks of the replica file, taken as a rollback-mode writer does.
    class File;
    Status lock_exclusive(File& f);

    std::string path_;                // the cache copy's path for time travel (set before any thread)
    const ReplicatorConfig cfg_;
    sqlite3_vfs* const lower_;
    bool time_travel_ = false;    // at=: a private copy, opened (set once it is ready)
    bool owns_copy_ = false;      // path_ names the private copy: the destructor removes it
    char* file_name_ = nullptr;   // sqlite3_create_filename(); freed in the destructor
    std::unique_ptr<s3::Client> client_;
    std::shared_ptr<const Cipher> cipher_;
    std::optional<LeaderLock> lock_;  // follower thread only after start()
    std::unique_ptr<File> file_;      // follower thread only after start()
    // Set first thing by the destructor (the last connection closing): a
    // hydration under way stops its downloads at their next bytes
    // (RestoreOptions::cancel) instead of holding the close until it ends.
    std::atomic<bool> closing_{false};

    mutable std::mutex mu_;           // guards everything below
    std::condition_variable cv_;      // stop_
    bool stop_ = false;
    bool leader_ = false;
    long leader_pid_ = 0;
    ReplicaState state_;              // the follower's position (leader); read from the file otherwise
    bool broken_ = false;             // the next segment does not continue the chain: not applied
    std::string last_error_;          // the last poll's or apply's error (cleared by a poll that works)
    std::string follow_error_;        // the last listing's error (kept until the next listing or progress)
    bool stalled_ = false;            // follow_error_ is a verdict: this generation cannot go on
    std::string last_event_;          // the last generation change or re-hydration, and why
    // The last hydration's download: how ("full", "pages", "segments"), bytes.
    std::string last_hydration_mode_;
    uint64_t last_hydration_bytes_ = 0;
    uint64_t segments_applied_ = 0, hydrations_ = 0, polls_ = 0, listings_ = 0;
    // The streak of polls without a new segment, and when it next lists
    // the generations (list_after()/list_at_most() in replica.cpp).
    std::chrono::steady_clock::time_point miss_since_{}, next_list_{};  // zero: no streak
    std::chrono::milliseconds list_gap_{0};
    uint64_t lock_waits_ = 0;         // applies that had to wait for readers (counted when the wait starts)
    int64_t last_apply_us_ = 0;       // wall clock of the last apply
    int64_t applied_lag_us_ = 0;      // at the last apply: its time minus the writer's commit time
    int64_t caught_up_us_ = 0;        // wall clock of the last poll that found nothing newer
    // Failed steps in a row, and the wait after the last one (0: none);
    // retry_backoff() in replica.cpp.
    uint64_t consecutive_failures_ = 0;
    std::chrono::milliseconds retry_backoff_{0};
    std::thread thread_;              // last: started once the members above exist
};

}  // namespace bottomless::replicator
