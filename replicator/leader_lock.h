// One replicating process per database: an election among the processes
// that open it through bottomless (docs/SEMANTICS.md, "Several processes").
//
// The lock lives in a side file, "<db>-bottomless.lock", never deleted. It is
// not a byte of the database or -shm file on purpose: POSIX locks belong to
// the process and die with ANY close of the inode, so a descriptor of ours on
// SQLite's files would drop SQLite's own locks when closed; and a restore
// replaces the database file (a new inode) while the lock must stay put.
// Open-file-description locks (F_OFD_SETLK) are released by the kernel when
// the holder exits or is killed, so a dead leader never blocks the others.
//
//   byte 0  the leader: held for as long as the process replicates
//   byte 1  start-up: held by whoever is deciding or starting up, so a second
//           process waits for the leader's start-up (which may restore the
//           file) instead of opening a file that is about to be replaced
//
// The leader writes its pid into the file, for the others' messages.
#pragma once

#include <chrono>
#include <string>

#include "s3/result.h"

namespace bottomless::replicator {

class LeaderLock {
public:
    // Waits (up to `wait`) for another process's start-up to end, then tries
    // to become the leader. Errors: the lock file cannot be opened (Io), or
    // the start-up wait timed out (Cancelled, code "StartupBusy").
    static Result<LeaderLock> acquire(const std::string& db_path, std::chrono::milliseconds wait);

    LeaderLock(LeaderLock&& o) noexcept;
    LeaderLock& operator=(LeaderLock&& o) noexcept;
    LeaderLock(const LeaderLock&) = delete;
    LeaderLock& operator=(const LeaderLock&) = delete;
    ~LeaderLock();  // releases both bytes (closing the descriptor)

    bool leader() const { return leader_; }
    // The leader's pid as it recorded it (0 when unknown). For a leader, ours.
    long leader_pid() const { return leader_pid_; }
    // The leader's start-up is over: let the others in.
    void startup_done();
    const std::string& path() const { return path_; }

private:
    LeaderLock() = default;
    int fd_ = -1;
    bool leader_ = false;
    bool startup_held_ = false;
    long leader_pid_ = 0;
    std::string path_;
};

}  // namespace bottomless::replicator
