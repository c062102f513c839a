// What the processes that write one database share (issue 14, cooperating
// processes; docs/SEMANTICS.md "Several processes"): a small memory-mapped
// side file, "<db>-bottomless-shm", that the leader publishes into and every
// other process (a follower) reads before it lets SQLite overwrite WAL frames.
//
//   leader_pid       the replicating process (0: none right now)
//   durable          the leader's durable position (epoch salts, frame),
//                    published once its state file says so: a WAL restart
//                    (any process's) goes ahead when it covers the WAL, or
//                    is in the ending epoch with few enough frames after it
//                    to copy aside first (keep_epoch_tail)
//   ended            the epoch a process last ended by restarting the WAL,
//                    and its last frame: the leader notes that epoch's
//                    commits up to there before the new epoch's (frames from
//                    the old slots or the copy aside), and a process taking
//                    over reads it as the state file's `restarted`; a new
//                    epoch without it is a writer outside bottomless
//   commits          bumped by a follower after each of its commits: the
//                    leader polls it (every 50 ms, one load) and reads the
//                    new frames from the WAL at the wal-index's mxFrame
//   sync             the leader runs in sync mode: a follower's COMMIT
//                    returns once the leader has shipped it (sync_* below)
//   sync_*           a follower's sync commit: its commit frame's position
//                    and request number; the leader's answer
//   followers        a follower process has opened the database (the pid of
//                    one; never cleared): the leader's own WAL restarts then
//                    copy their unshipped frames aside, and a starting
//                    leader takes what is committed from the wal-index, not
//                    from a WAL scan
//
// The mapping outlives its descriptor (closed at once): a process holds no
// descriptor of this file between calls. Fields are lock-free 64-bit
// atomics; the file is never shrunk, and a stale one (all processes gone) is
// overwritten by the next leader's publication before any follower exists.
//
// Snapshots and followers' checkpoints: a leader's snapshot reads the
// database file and the WAL's frames and needs both to stay still. In its own
// process the replicator's registration does that (replicator.h); across
// processes, an open-file-description lock on one byte of this file: a
// follower holds it shared while a checkpoint or a WAL restart of its runs
// (a fresh description per hold: never converted by another holder of the
// process), and the leader holds it exclusively while a snapshot reads. The
// kernel drops a dead holder's lock.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>

#include "replicator/wal.h"
#include "s3/result.h"

namespace bottomless::replicator {

class SharedArea {
public:
    // Maps (creating if needed) `<db_path>-bottomless-shm`.
    static Result<std::unique_ptr<SharedArea>> open(const std::string& db_path);
    ~SharedArea();
    SharedArea(const SharedArea&) = delete;
    SharedArea& operator=(const SharedArea&) = delete;

    const std::string& path() const { return path_; }

    // ---- the leader ----
    void publish_leader(long pid);
    void publish_durable(uint32_t salt1, uint32_t salt2, uint64_t frame);
    // Sync mode: other processes' commits wait for the leader to ship them.
    void publish_mode(bool sync);
    uint64_t commits() const;
    long followers() const;
    // The last epoch a follower ended, and its last frame (0, 0: none).
    void ended(uint64_t& salts, uint64_t& frame) const;

    // ---- a follower ----
    long leader_pid() const;
    bool leader_sync() const;
    void durable(uint64_t& salts, uint64_t& frame) const;
    int64_t durable_time_us() const;  // when the leader last published
    // Every frame of the WAL that `h` describes is durable (or there is none).
    bool covers(const WalIndexHeader& h) const;
    // How many of its frames are not: UINT64_MAX when the durable position
    // is in another epoch (an older one not yet shipped, or this one not
    // reached yet).
    uint64_t unshipped_frames(const WalIndexHeader& h) const;
    void note_follower(long pid);
    void note_follower_commit();
    void note_epoch_end(uint32_t salt1, uint32_t salt2, uint64_t frame);

    // ---- sync commits of a follower (Follower::commit_sync) ----
    // The follower (holding the WAL write lock, its commit frame written to
    // `<db>-bottomless-sync`) posts the frame's position and waits for the
    // leader's answer: true durable, false refused, nullopt none. At its
    // deadline it cancels the request unless the leader has claimed it
    // (then the leader's answer decides, or its death: nullopt). A claimed
    // request is the only one a leader ships, so a request its follower
    // gave up on never reaches the bucket. Process-shared futexes: no
    // polling on either side.
    uint32_t post_sync_request(uint32_t salt1, uint32_t salt2, uint64_t frame);
    std::optional<bool> wait_sync_answer(uint32_t seq, std::chrono::steady_clock::time_point deadline);
    // The leader: claims a posted request, waiting up to `timeout` for one
    // (false: none), then answers it; interrupt_sync_wait() wakes a waiting
    // leader (closing).
    bool wait_sync_request(std::chrono::milliseconds timeout, uint32_t& seq, uint32_t& salt1, uint32_t& salt2,
                           uint64_t& frame);
    void answer_sync(uint32_t seq, bool ok);
    void interrupt_sync_wait();

    // The snapshot byte (see above). A hold is an open description of the
    // file with the lock on it; the destructor (or release) drops it.
    class Hold {
    public:
        Hold() = default;
        explicit Hold(int fd) : fd_(fd) {}
        Hold(Hold&& o) noexcept : fd_(o.fd_) { o.fd_ = -1; }
        Hold& operator=(Hold&& o) noexcept;
        ~Hold() { release(); }
        bool held() const { return fd_ >= 0; }
        void release() noexcept;

    private:
        int fd_ = -1;
    };
    // A follower's checkpoint or restart: shared, never waits. Not held
    // (held() false) while a snapshot reads (or the file cannot be opened).
    Hold try_hold_shared() const;
    // The leader's snapshot: exclusive, never waits (a follower's checkpoint
    // holds it for milliseconds: retry).
    Hold try_hold_exclusive() const;

    struct Layout;

private:
    SharedArea() = default;
    std::string path_;
    Layout* map_ = nullptr;
};

// Several processes: whether a WAL restart (or the checkpoint before it)
// that must first copy `tail_bytes` of unshipped frames aside, under the WAL
// write lock, should go ahead now. The copy holds every writer of every
// process meanwhile (10-40 ms for a batch interval's frames at ~65 000
// txn/s); a WAL that grows longer instead costs next to nothing at NORMAL
// and, extended ahead with zeros (vfs_wal.cpp), little at FULL. So a small
// tail (at most 1 MiB) is copied at once, a larger one only once the WAL
// holds 64 MiB of frames: one copy per 64 MiB of WAL, not one per
// auto-checkpoint. Never more than `max_pending` (the WAL then grows until
// the leader has shipped enough).
inline bool tail_copy_worth_it(uint64_t tail_bytes, uint64_t wal_bytes, uint64_t max_pending) {
    if (tail_bytes > max_pending) return false;
    return tail_bytes <= (1ull << 20) || wal_bytes >= (64ull << 20);
}

}  // namespace bottomless::replicator
