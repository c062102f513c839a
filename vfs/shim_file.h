// Internal to vfs/: the shim's file object and what its methods share.
// vfs.cpp has the VFS, the open and the main database's plain methods;
// vfs_wal.cpp the shm-lock hooks (commits, vetoes) and the WAL's methods.
#pragma once

#include <cstdint>
#include <memory>
#include <new>

#include "replicator/follower.h"
#include "replicator/replica.h"
#include "replicator/replicator.h"
#include "replicator/sqlite_api.h"
#include "replicator/wal.h"

namespace bottomless::vfs::detail {

using replicator::Replicator;

// wal-index (shm) layout, from SQLite's wal.c: two copies of a 48-byte
// header, then the checkpoint info. Native byte order.
constexpr int kShmWriteLock = 0;   // WAL_WRITE_LOCK
constexpr int kShmCkptLock = 1;    // WAL_CKPT_LOCK
constexpr int kShmRestartOfst = 4; // WAL_READ_LOCK(1)
constexpr int kShmRestartN = 4;    // WAL_NREADER - 1

enum class Kind { MainDb, Wal };

struct ShimFile {
    sqlite3_file base;  // must come first: SQLite sees this
    Kind kind;
    std::shared_ptr<Replicator> repl;  // may be null (replication skipped, or another process leads)
    // Main db: another process replicates this database (its pid, -1 when
    // unknown). This connection is read-only and never writes the file:
    // a checkpoint here could empty a WAL whose frames the leader has not
    // shipped yet.
    long leader_elsewhere = 0;
    // Main db: the process's follower of the file while another process
    // leads (follower.h): the connection writes, and asks it (not a
    // replicator) before SQLite overwrites WAL frames.
    std::shared_ptr<replicator::Follower> follower;
    bool read_only = false;  // another process leads and no shared area could be opened, or a replica
    replicator::SharedArea::Hold restart_hold;  // a follower's WAL restart under way
    replicator::SharedArea::Hold ckpt_hold;     // a follower's checkpoint under way
    // Main db opened with replica=1: the file follows the bucket (replica.h)
    // and is read-only; SQLite reads it in rollback mode.
    std::shared_ptr<replicator::Replica> replica;
    // Main db: region 0 of the wal-index, when mapped.
    volatile void* shm0 = nullptr;
    bool holds_ckpt = false;     // a checkpoint registered with the replicator (shm_lock_veto)
    bool holds_restart = false;  // a WAL restart registered with the replicator
    // WAL: geometry and the commit frame being written.
    uint32_t page_size = 0;
    uint32_t salt1 = 0, salt2 = 0;
    bool commit_pending = false;       // a commit frame header was seen (or is held)
    bool commit_held = false;          // sync mode: header and page not yet written
    // Sync mode: the held commit frame's header came with zero salts and
    // checksums (a transaction that rewrote frames in place: SQLite fills
    // them in at commit, reading the frames back, walRewriteChecksums). Its
    // final header is the second write at commit_offset; reads of the held
    // frame are answered from memory meanwhile.
    bool commit_wait_cksum = false;
    sqlite3_int64 commit_offset = 0;   // offset of the commit frame's header
    unsigned char commit_header[24];
    std::string commit_page;           // sync mode: page bytes gathered so far
    // WAL: synced since the last extension (grow_ahead, vfs_wal.cpp), and
    // the file's size as last seen or made (-1: look again).
    bool wal_synced = false;
    sqlite3_int64 wal_size_seen = -1;
    // The lower file follows this struct in memory.
    sqlite3_file* lower() { return reinterpret_cast<sqlite3_file*>(this + 1); }
};


inline ShimFile* shim(sqlite3_file* f) { return reinterpret_cast<ShimFile*>(f); }

// The exception barrier for one method: lower return codes pass through,
// our own failures become the given extended I/O error.
template <class F>
inline int guarded(int io_error, F&& body) noexcept {
    try {
        return body();
    } catch (const std::bad_alloc&) {
        return SQLITE_IOERR_NOMEM;
    } catch (const std::exception& e) {
        sqlite3_log(io_error, "bottomless: %s", e.what());
        return io_error;
    } catch (...) {
        return io_error;
    }
}

inline uint32_t be32(const unsigned char* p) { return replicator::read_be32(p); }

// SQLite's default VFS, which the shim forwards to (set by register_vfs()).
extern sqlite3_vfs* g_lower;

// The shm-lock and WAL methods (vfs_wal.cpp).
int main_shm_lock(sqlite3_file* f, int ofst, int n, int flags);
int wal_read(sqlite3_file* f, void* buf, int n, sqlite3_int64 off);
int wal_write(sqlite3_file* f, const void* buf, int n, sqlite3_int64 off);
int wal_truncate(sqlite3_file* f, sqlite3_int64 size);
int wal_sync(sqlite3_file* f, int flags);

}  // namespace bottomless::vfs::detail
