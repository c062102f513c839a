// A process that writes a database another process replicates (issue 14;
// docs/SEMANTICS.md "Several processes"). One Follower per file per
// process, shared by the connections opened while another process leads.
//
// Its connections write normally; what keeps the history whole is what the
// VFS asks here before SQLite overwrites WAL frames (through the shared
// area, shared_area.h): a WAL restart (or a RESTART/TRUNCATE checkpoint) only
// once the leader has made every frame of the WAL durable, and no checkpoint
// or restart while the leader's snapshot reads. After each commit the leader
// is told (a counter it polls) and reads the frames from the WAL.
//
// Failover: a process-wide thread looks every kTakeoverPoll whether the
// leader is gone (its pid, and the leader lock itself about once a second);
// the first follower to get the lock becomes the leader in place: a
// Replicator started as at an open (Replicator::acquire with `takeover`),
// which continues the generation from the state file and the WAL (the
// frames the dead leader had not shipped are still there: no follower
// restarted over them). This process's follower connections keep asking
// the shared area; connections opened later use the new replicator.
//
// Sync mode: while the leader is in sync mode (or this process is), a
// follower's COMMIT returns only once the leader has made it durable: the
// VFS holds the commit frame back (as in the leader's process) and
// commit_sync() hands it to the leader through `<db>-bottomless-sync` and
// the shared area, and waits for the answer (at most sync_timeout). Refused
// or unanswered, the commit frame is never written: the transaction rolls
// back, and cannot come back in WAL recovery.
#pragma once

#include <chrono>
#include <memory>
#include <mutex>
#include <string>

#include "replicator/config.h"
#include "replicator/shared_area.h"
#include "replicator/wal.h"
#include "s3/result.h"

namespace bottomless::replicator {

class Replicator;

class Follower {
public:
    // The follower of `path` in this process (the running one, or a new one
    // mapping the shared area). `leader_pid`: who leads, as the election said.
    static Result<std::shared_ptr<Follower>> acquire(const std::string& path, const ReplicatorConfig& config,
                                                     long leader_pid);
    static std::shared_ptr<Follower> find(const std::string& path);
    ~Follower();
    Follower(const Follower&) = delete;
    Follower& operator=(const Follower&) = delete;

    const SharedArea& area() const { return *area_; }
    // Commits must be durable before they return (sync mode here or in the
    // leader): the VFS holds commit frames back and calls commit_sync().
    bool sync_commits() const;
    // The held commit frame `frame` (header and page) is complete: the
    // leader ships the transaction (its other frames are in the WAL). OK:
    // durable, the frame may be written.
    Status commit_sync(uint64_t frame, const unsigned char* frame_header, const unsigned char* page,
                       uint32_t page_size);
    long leader_pid() const;

    // ---- from the VFS hooks (cheap, no I/O beyond the snapshot byte) ----
    void note_shm(const volatile unsigned char* region0);
    // A WAL restart (or RESTART/TRUNCATE checkpoint) is asked for, the
    // wal-index header being `h`: may it go ahead? If so, `hold` keeps the
    // leader's snapshot out until the lock is released, the frames the
    // leader has not made durable are copied aside (keep_epoch_tail), and
    // the epoch's end is recorded for the leader.
    bool begin_restart(const WalIndexHeader& h, SharedArea::Hold& hold);
    // A checkpoint: refused while the leader's snapshot reads, and while
    // the WAL could not restart after it (tail_keepable).
    bool begin_checkpoint(const WalIndexHeader* h, SharedArea::Hold& hold);
    // A write transaction of ours ended (WAL write lock released).
    void note_commit();
    // The last connection deletes the WAL: only once the leader has all of it.
    bool wal_delete_allowed() const;

    // The replicator this process runs since it took over (null before).
    std::shared_ptr<Replicator> promoted() const;

    // ---- SQL surface ----
    // Waits until every commit visible now is durable (the leader's
    // published position covers the wal-index), or until taken over.
    Result<WalPosition> flush(std::chrono::milliseconds timeout);
    std::string status_json() const;

    static constexpr std::chrono::milliseconds kTakeoverPoll{50};

private:
    Follower(std::string path, ReplicatorConfig config, long leader_pid);
    void try_take_over() noexcept;  // the takeover thread
    std::optional<WalIndexHeader> wal_index_now() const;
    // The WAL `h` describes could restart now: every frame durable, or the
    // rest in the epoch the leader ships and within max_pending_bytes.
    bool tail_keepable(const WalIndexHeader& h) const;
    static void takeover_loop();

    const std::string path_;
    const ReplicatorConfig config_;
    std::unique_ptr<SharedArea> area_;
    long leader_at_open_;

    mutable std::mutex mu_;  // a leaf: below Replicator's locks, never held while calling it
    const volatile unsigned char* shm0_ = nullptr;  // guarded by mu_
    int shm_users_ = 0;                              // guarded by mu_
    bool gave_shm_ = false;                          // promoted_ was given shm0_ (guarded by mu_)
    std::shared_ptr<Replicator> promoted_;           // guarded by mu_
    WalIndexHeader last_checkpoint_{};               // guarded by mu_: the header at our last checkpoint
    std::chrono::steady_clock::time_point next_full_try_{};  // takeover thread only
};

}  // namespace bottomless::replicator
