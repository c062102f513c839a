// One replicating process per database: an election among the processes
// that open it through bottomless (docs/SEMANTICS.md, "Several processes").
//
// The locks live in sixteen side files per directory,
// "<dir>/.bottomless-locks.0" to ".f", never deleted: every database of the
// directory has two bytes of one of them, the file and the offset derived
// from the database's file name (a fixed 64-bit hash, the same in every
// build and process: its low 4 bits pick the file). A process holds ONE
// descriptor of each file its databases use, shared by all of them (issue
// 10: no descriptor per database beyond SQLite's own; at most 16 per
// directory), and an open-file-description lock (F_OFD_SETLK) per byte it
// holds. Sixteen, not one: the kernel walks every lock of an inode at each
// lock operation, so with one file an open got slower with every database
// open (a fifth of an open's time at 2000). OFD locks belong to the open file
// description, not to the process: closing some other descriptor of the
// file never drops them (POSIX locks would all go), and unlocking one
// database's bytes leaves the others' alone. The kernel releases them when
// the holder exits or is killed, so a dead leader never blocks the others.
// Within the process the kernel sees one owner, so the bytes held are also
// tracked here: two LeaderLocks of one database exclude each other in one
// process as in two.
//
// Why not a byte of the database or -shm file, on SQLite's own descriptor:
// the election and the start-up byte are needed before SQLite opens the
// file (a start-up may restore it: a new inode), each connection has its
// own descriptor that closes on its own schedule (a lock on one would go
// with that connection while others still use the replicator), and an OFD
// lock on the database's bytes would conflict with SQLite's POSIX locks.
//
//   leader byte   held for as long as the process replicates the database
//   start-up byte held by whoever is deciding or starting up, so a second
//                 process waits for the leader's start-up (which may restore
//                 the file) instead of opening a file about to be replaced
//
// The leader's pid goes into "<db>-bottomless.lock" (written only when it
// changes), for the others' messages: an OFD lock has no owner pid. Older
// builds took byte 0 of that file as their leader lock, and later ones the
// same byte as now of a single "<dir>/.bottomless-locks"; an open still
// checks both (F_OFD_GETLK; the second costs one failed lookup where the
// file does not exist), so a process of an older build that leads is seen.
// (The reverse is not: an older build does not see a newer leader, nor
// does a newer one wait for an older one's start-up.)
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
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
    ~LeaderLock();  // releases both bytes

    bool leader() const { return leader_; }
    // The leader's pid as it recorded it (0 when unknown). For a leader, ours.
    long leader_pid() const { return leader_pid_; }
    // The leader's start-up is over: let the others in.
    void startup_done();
    // The directory's lock file, and the offset of this database's leader
    // byte in it (the start-up byte follows).
    const std::string& path() const { return path_; }
    int64_t leader_byte() const { return byte_; }
    // Descriptors of directory lock files this process holds now (tests).
    static size_t open_files();

    struct DirFile;  // the shared descriptor of one directory's lock file

private:
    LeaderLock() = default;
    void release() noexcept;
    std::shared_ptr<DirFile> dir_;
    int64_t byte_ = 0;
    bool leader_ = false;
    bool startup_held_ = false;
    long leader_pid_ = 0;
    std::string path_;
};

}  // namespace bottomless::replicator
