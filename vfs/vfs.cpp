/*
** vfs.cpp — the "bottomless" SQLite VFS shim.
**
** USING: open a database with "file:app.db?vfs=bottomless" (URI filenames
** on), in WAL mode. Settings come from LIBSQL_BOTTOMLESS_* variables and the
** same names as URI parameters (docs/CONFIG.md).
**
** IMPLEMENTATION NOTES:
** - The shim forwards every call to the default VFS. Only the main database
**   file and its WAL are wrapped; journals and temp files go straight to the
**   lower VFS (pFile is handed to it untouched).
** - Commits are observed where SQLite makes them visible: the release of the
**   WAL write lock (shm slot 0), when the wal-index header holds the new
**   mxFrame. In exclusive locking mode (no shm) the write of a commit frame
**   is the boundary. Sync mode intercepts the commit frame before it reaches
**   the disk and writes it only once the transaction is durable in S3.
** - Invariant 2 (nothing unshipped is discarded): SQLite restarts the WAL
**   only after a complete checkpoint, taking an exclusive lock on read marks
**   1..4 (walRestartLog). That lock is refused with SQLITE_BUSY (SQLite then
**   simply appends) while unshipped frames are not all in memory or a
**   snapshot reads the WAL. Every WAL write is handed to the replicator's
**   tee, so the frames are in memory already: the write of the new WAL
**   header only records how far the old epoch went; truncating or deleting
**   the WAL does the same, and falls back to waiting for S3 (bounded) when
**   memory is full.
** - Checkpoints are refused (SQLITE_BUSY on the CKPT lock) while a snapshot
**   reads the database file, and while the WAL could not restart after them
**   (auto-checkpoint then fails in one lock call). Both kinds of lock are
**   registered with the replicator before it is asked (shm_lock_veto).
** - No network or file I/O in xShmLock: it reads the 48-byte wal-index
**   header, touches atomics, and records a commit under a short mutex.
** - Exceptions never cross this C ABI: every method catches and maps to an
**   SQLITE_IOERR_* code (bad_alloc to SQLITE_IOERR_NOMEM).
*/
#include "vfs/vfs.h"

#include <algorithm>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <new>
#include <string>

#include "replicator/follower.h"
#include "replicator/replica.h"
#include "replicator/replicator.h"
#include "replicator/sqlite_api.h"
#include "replicator/wal.h"
#include "s3/log.h"

namespace bottomless::vfs {
namespace {

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
    bool read_only = false;  // a follower that may not write (sync mode), or a replica
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
    // The lower file follows this struct in memory.
    sqlite3_file* lower() { return reinterpret_cast<sqlite3_file*>(this + 1); }
};

sqlite3_vfs g_vfs;
sqlite3_vfs* g_lower = nullptr;
sqlite3_io_methods g_main_methods[4];  // indexed by iVersion (1..3)
sqlite3_io_methods g_wal_methods[4];

ShimFile* shim(sqlite3_file* f) { return reinterpret_cast<ShimFile*>(f); }

// The exception barrier for one method: lower return codes pass through,
// our own failures become the given extended I/O error.
template <class F>
int guarded(int io_error, F&& body) noexcept {
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

uint32_t be32(const unsigned char* p) { return replicator::read_be32(p); }

// ---- methods shared by both wrapped kinds -------------------------------------

int x_read(sqlite3_file* f, void* buf, int n, sqlite3_int64 off) {
    sqlite3_file* l = shim(f)->lower();
    return l->pMethods->xRead(l, buf, n, off);
}
int x_sync(sqlite3_file* f, int flags) {
    sqlite3_file* l = shim(f)->lower();
    return l->pMethods->xSync(l, flags);
}
int x_file_size(sqlite3_file* f, sqlite3_int64* size) {
    sqlite3_file* l = shim(f)->lower();
    return l->pMethods->xFileSize(l, size);
}
int x_lock(sqlite3_file* f, int lock) {
    sqlite3_file* l = shim(f)->lower();
    int rc = l->pMethods->xLock(l, lock);
    // A replica's follower holds PENDING for the length of one apply (or a
    // few ms while readers finish): a reader waits that out here instead of
    // failing with SQLITE_BUSY when it has no busy handler.
    if (rc == SQLITE_BUSY && lock == SQLITE_LOCK_SHARED && shim(f)->replica) {
        const int max_polls = static_cast<int>(replicator::Replica::kReaderWait.count());
        for (int i = 0; i < max_polls && rc == SQLITE_BUSY; ++i) {
            g_lower->xSleep(g_lower, 1000);
            rc = l->pMethods->xLock(l, lock);
        }
    }
    return rc;
}
int x_unlock(sqlite3_file* f, int lock) {
    sqlite3_file* l = shim(f)->lower();
    return l->pMethods->xUnlock(l, lock);
}
int x_check_reserved(sqlite3_file* f, int* out) {
    sqlite3_file* l = shim(f)->lower();
    return l->pMethods->xCheckReservedLock(l, out);
}
int x_file_control(sqlite3_file* f, int op, void* arg) {
    sqlite3_file* l = shim(f)->lower();
    return l->pMethods->xFileControl(l, op, arg);
}
int x_sector_size(sqlite3_file* f) {
    sqlite3_file* l = shim(f)->lower();
    return l->pMethods->xSectorSize(l);
}
int x_device_characteristics(sqlite3_file* f) {
    sqlite3_file* l = shim(f)->lower();
    return l->pMethods->xDeviceCharacteristics(l);
}
void x_shm_barrier(sqlite3_file* f) {
    sqlite3_file* l = shim(f)->lower();
    l->pMethods->xShmBarrier(l);
}
int x_fetch(sqlite3_file* f, sqlite3_int64 off, int n, void** pp) {
    sqlite3_file* l = shim(f)->lower();
    return l->pMethods->xFetch(l, off, n, pp);
}
int x_unfetch(sqlite3_file* f, sqlite3_int64 off, void* p) {
    sqlite3_file* l = shim(f)->lower();
    return l->pMethods->xUnfetch(l, off, p);
}

int x_close(sqlite3_file* f) {
    ShimFile* s = shim(f);
    sqlite3_file* l = s->lower();
    int rc = l->pMethods ? l->pMethods->xClose(l) : SQLITE_OK;
    return guarded(SQLITE_IOERR_CLOSE, [&] {
        if (s->repl) {
            if (s->kind == Kind::Wal) s->repl->note_wal_open(false);
            if (s->kind == Kind::MainDb && s->shm0) s->repl->note_shm(nullptr);
        }
        if (s->follower && s->shm0) s->follower->note_shm(nullptr);
        // Releasing the last reference runs the replicator's final flush.
        s->~ShimFile();
        return rc;
    });
}

// ---- main database ------------------------------------------------------------

int main_write(sqlite3_file* f, const void* buf, int n, sqlite3_int64 off) {
    ShimFile* s = shim(f);
    if (s->read_only) return SQLITE_READONLY;  // the pager itself is read-only
    if (s->repl) {
        // In WAL mode only checkpoints write the database file; without a WAL
        // open, a write is a rollback-journal transaction the WAL never saw.
        if (s->repl->wal_is_open()) s->repl->note_db_write();
        else s->repl->note_write_outside_wal();
    }
    sqlite3_file* l = s->lower();
    return l->pMethods->xWrite(l, buf, n, off);
}

int main_truncate(sqlite3_file* f, sqlite3_int64 size) {
    ShimFile* s = shim(f);
    if (s->read_only) return SQLITE_READONLY;
    if (s->repl) {
        if (s->repl->wal_is_open()) s->repl->note_db_write();
        else s->repl->note_write_outside_wal();
    }
    sqlite3_file* l = s->lower();
    return l->pMethods->xTruncate(l, size);
}

int main_shm_map(sqlite3_file* f, int region, int size, int extend, void volatile** pp) {
    ShimFile* s = shim(f);
    sqlite3_file* l = s->lower();
    int rc = l->pMethods->xShmMap(l, region, size, extend, pp);
    if (rc == SQLITE_OK && region == 0 && *pp && !s->shm0) {
        s->shm0 = *pp;
        if (s->repl) s->repl->note_shm(static_cast<const volatile unsigned char*>(*pp));
        if (s->follower) s->follower->note_shm(static_cast<const volatile unsigned char*>(*pp));
    }
    return rc;
}

int main_shm_unmap(sqlite3_file* f, int delete_flag) {
    ShimFile* s = shim(f);
    if (s->shm0 && s->repl) s->repl->note_shm(nullptr);
    if (s->shm0 && s->follower) s->follower->note_shm(nullptr);
    s->shm0 = nullptr;
    sqlite3_file* l = s->lower();
    return l->pMethods->xShmUnmap(l, delete_flag);
}

using replicator::WalIndexHeader;

// The first copy of the wal-index header (callers hold a WAL lock that keeps
// it stable).
bool read_wal_index(const ShimFile* s, WalIndexHeader& out) {
    return s->shm0 && replicator::read_wal_index(static_cast<const volatile unsigned char*>(s->shm0), out, false);
}

// The header when no WAL lock keeps it still: both copies must agree.
bool read_wal_index_stable(const ShimFile* s, WalIndexHeader& out) {
    return s->shm0 && replicator::read_wal_index(static_cast<const volatile unsigned char*>(s->shm0), out, true);
}

// Reports the commit the wal-index header describes. Called while this
// connection still holds the WAL write lock, so the header is stable.
void report_commit(ShimFile* s) {
    WalIndexHeader h;
    if (s->repl && read_wal_index(s, h)) s->repl->note_commit(h.salt1, h.salt2, h.mx_frame, h.page_size);
}

// Runs an observation that must never stop the lock call around it: a
// failure (out of memory) is logged and the lock goes ahead. A commit missed
// this way is found later (the wal-index moved behind the replicator's back)
// and answered with a new generation: costly, never a loss.
template <class F>
void observe(F&& body) noexcept {
    try {
        body();
    } catch (const std::exception& e) {
        sqlite3_log(SQLITE_IOERR_SHMLOCK, "bottomless: %s", e.what());
    } catch (...) {
        sqlite3_log(SQLITE_IOERR_SHMLOCK, "bottomless: unknown exception in xShmLock");
    }
}

// The replicator's veto on an exclusive shm lock: SQLITE_BUSY refuses it.
// A checkpoint or a WAL restart that goes ahead is registered with the
// replicator until its lock is released, so that a snapshot starting at the
// same moment either makes it refuse or waits for it (never both miss).
int shm_lock_veto(ShimFile* s, Replicator* r, int ofst, int n) {
    if (ofst == kShmRestartOfst && n == kShmRestartN) {
        // walRestartLog or a RESTART/TRUNCATE checkpoint (under the write
        // lock, so the header is stable): refused, SQLite appends instead of
        // overwriting unshipped frames.
        WalIndexHeader h;
        bool have = read_wal_index(s, h);
        // Frames another process committed are captured with ours.
        if (have) r->note_commit(h.salt1, h.salt2, h.mx_frame, h.page_size);
        if (!(have ? r->begin_restart(h.salt1, h.salt2, h.mx_frame) : r->begin_restart())) return SQLITE_BUSY;
        s->holds_restart = true;
    }
    if (ofst == kShmCkptLock && n == 1) {
        // Other processes' commits are known before a checkpoint (the last
        // connection's precedes the WAL's deletion).
        if (r->shared_area() && r->shared_area()->followers()) r->note_wal_index();
        // A snapshot is reading the database file, or the WAL must keep
        // frames that are not yet durable and not in memory.
        WalIndexHeader h;
        if (!(read_wal_index(s, h) ? r->begin_checkpoint(h.salt1, h.salt2, h.mx_frame) : r->begin_checkpoint()))
            return SQLITE_BUSY;
        s->holds_ckpt = true;
    }
    return SQLITE_OK;
}

// Ends what shm_lock_veto registered for the lock at (ofst, n).
void release_reservation(ShimFile* s, Replicator* r, int ofst, int n) {
    if (ofst == kShmRestartOfst && n == kShmRestartN && s->holds_restart) {
        s->holds_restart = false;
        r->end_restart();
    }
    if (ofst == kShmCkptLock && n == 1 && s->holds_ckpt) {
        s->holds_ckpt = false;
        r->end_checkpoint();
    }
}

// A follower's veto (follower.h): a WAL restart only over frames the
// leader made durable, and neither a restart nor a checkpoint while its
// snapshot reads; what goes ahead holds the shared area's byte until the
// lock is released.
int follower_veto(ShimFile* s, replicator::Follower* fo, int ofst, int n) {
    if (ofst == kShmRestartOfst && n == kShmRestartN) {
        WalIndexHeader h;  // under the write lock: stable
        if (!read_wal_index(s, h) || !fo->begin_restart(h, s->restart_hold)) return SQLITE_BUSY;
    }
    if (ofst == kShmCkptLock && n == 1) {
        WalIndexHeader h;
        const bool have = read_wal_index_stable(s, h);
        if (!fo->begin_checkpoint(have ? &h : nullptr, s->ckpt_hold)) return SQLITE_BUSY;
    }
    return SQLITE_OK;
}

void follower_release(ShimFile* s, int ofst, int n) {
    if (ofst == kShmRestartOfst && n == kShmRestartN) s->restart_hold.release();
    if (ofst == kShmCkptLock && n == 1) s->ckpt_hold.release();
}

int follower_shm_lock(ShimFile* s, replicator::Follower* fo, int ofst, int n, int flags) {
    sqlite3_file* l = s->lower();
    const bool lock = (flags & SQLITE_SHM_LOCK) != 0;
    const bool excl = (flags & SQLITE_SHM_EXCLUSIVE) != 0;
    if (lock && excl) {
        int veto = guarded(SQLITE_IOERR_SHMLOCK, [&] { return follower_veto(s, fo, ofst, n); });
        if (veto != SQLITE_OK) {
            follower_release(s, ofst, n);
            return veto;
        }
    }
    int rc = l->pMethods->xShmLock(l, ofst, n, flags);
    if (excl && (!lock || rc != SQLITE_OK)) follower_release(s, ofst, n);
    // A write transaction ended: the leader reads its frames from the WAL.
    if (!lock && excl && ofst <= kShmWriteLock && kShmWriteLock < ofst + n) observe([&] { fo->note_commit(); });
    return rc;
}

int main_shm_lock(sqlite3_file* f, int ofst, int n, int flags) {
    ShimFile* s = shim(f);
    if (s->follower) return follower_shm_lock(s, s->follower.get(), ofst, n, flags);
    sqlite3_file* l = s->lower();
    Replicator* r = s->repl.get();
    const bool lock = (flags & SQLITE_SHM_LOCK) != 0;
    const bool excl = (flags & SQLITE_SHM_EXCLUSIVE) != 0;
    if (r && lock && excl) {
        // Nothing is held yet: a failure of ours may refuse the lock.
        int veto = guarded(SQLITE_IOERR_SHMLOCK, [&] { return shm_lock_veto(s, r, ofst, n); });
        if (veto != SQLITE_OK) {
            release_reservation(s, r, ofst, n);
            return veto;
        }
    }
    // An unlock must happen whatever we fail to observe.
    if (r && !lock && excl && ofst <= kShmWriteLock && kShmWriteLock < ofst + n) observe([&] { report_commit(s); });
    int rc = l->pMethods->xShmLock(l, ofst, n, flags);
    if (r && excl && (!lock || rc != SQLITE_OK)) release_reservation(s, r, ofst, n);
    if (r && rc == SQLITE_OK && lock && excl && ofst == kShmWriteLock && n == 1) {
        observe([&] {
            WalIndexHeader h;
            if (read_wal_index(s, h)) r->check_wal_index(h.salt1, h.salt2, h.mx_frame);
        });
    }
    return rc;
}

// ---- WAL ----------------------------------------------------------------------

bool is_frame_header(const ShimFile* s, int n, sqlite3_int64 off) {
    if (s->page_size == 0 || n != 24 || off < 32) return false;
    return (off - 32) % (static_cast<sqlite3_int64>(s->page_size) + 24) == 0;
}

// A connection that opened the WAL before any header was written learns the
// page size from the header once (the geometry is fixed in WAL mode).
void learn_page_size(ShimFile* s) {
    if (s->page_size) return;
    unsigned char hdr[32];
    sqlite3_file* l = s->lower();
    if (l->pMethods->xRead(l, hdr, 32, 0) == SQLITE_OK)
        if (auto h = replicator::parse_wal_header(hdr)) s->page_size = h->page_size;
}

// Sync mode: the held commit frame is complete (its final header and its
// page): ship the transaction, then write the frame. A failure keeps the
// commit frame off the disk, so the transaction cannot come back in WAL
// recovery after a crash.
int write_held_commit(ShimFile* s, Replicator* r) {
    sqlite3_file* l = s->lower();
    uint64_t frame = static_cast<uint64_t>((s->commit_offset - 32) / (s->page_size + 24)) + 1;
    s->commit_held = false;
    s->commit_pending = false;
    s->commit_wait_cksum = false;
    auto st = r->commit_sync(frame, s->commit_header, reinterpret_cast<const unsigned char*>(s->commit_page.data()),
                             s->page_size);
    if (!st) {
        sqlite3_log(SQLITE_IOERR_WRITE, "bottomless: %s", st.error().message.c_str());
        log::error(st.error().message);
        return SQLITE_IOERR_WRITE;
    }
    int rc = l->pMethods->xWrite(l, s->commit_header, 24, s->commit_offset);
    if (rc == SQLITE_OK)
        rc = l->pMethods->xWrite(l, s->commit_page.data(), static_cast<int>(s->commit_page.size()), s->commit_offset + 24);
    if (rc == SQLITE_OK) {
        r->tee_write(static_cast<uint64_t>(s->commit_offset), s->commit_header, 24, s->page_size);
        r->tee_write(static_cast<uint64_t>(s->commit_offset) + 24, s->commit_page.data(), s->commit_page.size(),
                     s->page_size);
    }
    return rc;
}

int wal_read(sqlite3_file* f, void* buf, int n, sqlite3_int64 off) {
    ShimFile* s = shim(f);
    sqlite3_file* l = s->lower();
    int rc = l->pMethods->xRead(l, buf, n, off);
    if (!s->commit_held || (rc != SQLITE_OK && rc != SQLITE_IOERR_SHORT_READ)) return rc;
    // The held commit frame is not on disk yet: SQLite reads what it wrote.
    const sqlite3_int64 start = s->commit_offset, end = start + 24 + static_cast<sqlite3_int64>(s->commit_page.size());
    const sqlite3_int64 lo = std::max(off, start), hi = std::min(off + n, end);
    if (lo >= hi) return rc;
    auto* out = static_cast<unsigned char*>(buf);
    for (sqlite3_int64 i = lo; i < hi; ++i) {
        const sqlite3_int64 k = i - start;
        out[i - off] = k < 24 ? s->commit_header[k] : static_cast<unsigned char>(s->commit_page[static_cast<size_t>(k - 24)]);
    }
    return hi == off + n || rc == SQLITE_OK ? SQLITE_OK : rc;
}

int wal_write(sqlite3_file* f, const void* buf, int n, sqlite3_int64 off) {
    ShimFile* s = shim(f);
    sqlite3_file* l = s->lower();
    Replicator* r = s->repl.get();
    if (!r) return l->pMethods->xWrite(l, buf, n, off);
    return guarded(SQLITE_IOERR_WRITE, [&]() -> int {
        const auto* p = static_cast<const unsigned char*>(buf);
        if (off == 0 && n >= 32) {
            // A new WAL header: the old frames are about to be overwritten.
            auto st = r->flush_before_wal_loss("restart the WAL", r->config().sync ? r->config().sync_timeout
                                                                                   : r->config().shutdown_timeout);
            if (!st) {
                sqlite3_log(SQLITE_IOERR_WRITE, "bottomless: %s", st.error().message.c_str());
                log::error(st.error().message);
                return SQLITE_IOERR_WRITE;
            }
            int rc = l->pMethods->xWrite(l, buf, n, off);
            if (rc == SQLITE_OK) {
                r->note_wal_restart();
                if (auto h = replicator::parse_wal_header(p)) {
                    r->tee_write(0, buf, static_cast<size_t>(n), h->page_size);
                    s->page_size = h->page_size;
                    s->salt1 = h->salt1;
                    s->salt2 = h->salt2;
                }
                s->commit_pending = s->commit_held = false;
            }
            return rc;
        }
        learn_page_size(s);
        if (is_frame_header(s, n, off)) {
            if (s->commit_held && off == s->commit_offset) {
                // The held commit frame's final header (walRewriteChecksums).
                std::memcpy(s->commit_header, p, 24);
                if (s->commit_wait_cksum && s->commit_page.size() == s->page_size) return write_held_commit(s, r);
                return SQLITE_OK;
            }
            r->before_wal_overwrite(static_cast<uint64_t>(off) + 24 + s->page_size);
            // Writers never wait for S3; past the WAL budget the policy
            // decides (SQLite rolls the transaction back on SQLITE_FULL).
            if (!r->wal_write_allowed(static_cast<uint64_t>(off) + 24 + s->page_size)) {
                sqlite3_log(SQLITE_FULL, "bottomless: the WAL is over max_wal_bytes while S3 is behind");
                return SQLITE_FULL;
            }
            bool commit = be32(p + 4) != 0;
            if (commit) {
                s->commit_pending = true;
                s->commit_offset = off;
                std::memcpy(s->commit_header, p, 24);
                if (r->sync_mode()) {
                    s->commit_held = true;  // written only once durable in S3
                    s->commit_wait_cksum = (be32(p + 8) | be32(p + 12)) == 0;
                    s->commit_page.clear();
                    return SQLITE_OK;
                }
            }
            int rc = l->pMethods->xWrite(l, buf, n, off);
            if (rc == SQLITE_OK) r->tee_write(static_cast<uint64_t>(off), buf, static_cast<size_t>(n), s->page_size);
            return rc;
        }
        if (s->commit_held && off == s->commit_offset + 24 + static_cast<sqlite3_int64>(s->commit_page.size())) {
            s->commit_page.append(reinterpret_cast<const char*>(p), static_cast<size_t>(n));
            if (s->commit_page.size() < s->page_size || s->commit_wait_cksum) return SQLITE_OK;
            return write_held_commit(s, r);
        }
        int rc = l->pMethods->xWrite(l, buf, n, off);
        if (rc == SQLITE_OK && off >= 32) r->tee_write(static_cast<uint64_t>(off), buf, static_cast<size_t>(n), s->page_size);
        if (rc == SQLITE_OK && s->commit_pending && !s->commit_held &&
            off + n >= s->commit_offset + 24 + static_cast<sqlite3_int64>(s->page_size) && off > s->commit_offset) {
            s->commit_pending = false;
            // Without a wal-index (exclusive locking mode) the commit frame's
            // write is the only sign of a commit.
            if (!r->uses_shm()) {
                uint64_t frame = static_cast<uint64_t>((s->commit_offset - 32) / (s->page_size + 24)) + 1;
                r->note_commit(be32(s->commit_header + 8), be32(s->commit_header + 12), frame, s->page_size);
            }
        }
        return rc;
    });
}

int wal_truncate(sqlite3_file* f, sqlite3_int64 size) {
    ShimFile* s = shim(f);
    sqlite3_file* l = s->lower();
    if (!s->repl) return l->pMethods->xTruncate(l, size);
    return guarded(SQLITE_IOERR_TRUNCATE, [&]() -> int {
        auto st = s->repl->flush_before_wal_loss("truncate the WAL", s->repl->config().shutdown_timeout);
        if (!st) {
            sqlite3_log(SQLITE_IOERR_TRUNCATE, "bottomless: %s", st.error().message.c_str());
            return SQLITE_IOERR_TRUNCATE;
        }
        s->repl->before_wal_overwrite(0);
        return l->pMethods->xTruncate(l, size);
    });
}

// ---- method tables ----------------------------------------------------------------

void build_tables() {
    sqlite3_io_methods m{};
    m.iVersion = 3;
    m.xClose = x_close;
    m.xRead = x_read;
    m.xWrite = main_write;
    m.xTruncate = main_truncate;
    m.xSync = x_sync;
    m.xFileSize = x_file_size;
    m.xLock = x_lock;
    m.xUnlock = x_unlock;
    m.xCheckReservedLock = x_check_reserved;
    m.xFileControl = x_file_control;
    m.xSectorSize = x_sector_size;
    m.xDeviceCharacteristics = x_device_characteristics;
    m.xShmMap = main_shm_map;
    m.xShmLock = main_shm_lock;
    m.xShmBarrier = x_shm_barrier;
    m.xShmUnmap = main_shm_unmap;
    m.xFetch = x_fetch;
    m.xUnfetch = x_unfetch;
    sqlite3_io_methods w = m;
    w.xWrite = wal_write;
    w.xRead = wal_read;
    w.xTruncate = wal_truncate;
    for (int v = 1; v <= 3; ++v) {
        // Same version as the lower file; the slots it lacks stay null.
        g_main_methods[v] = m;
        g_wal_methods[v] = w;
        g_main_methods[v].iVersion = g_wal_methods[v].iVersion = v;
        if (v < 2) {
            for (auto* t : {&g_main_methods[v], &g_wal_methods[v]}) {
                t->xShmMap = nullptr;
                t->xShmLock = nullptr;
                t->xShmBarrier = nullptr;
                t->xShmUnmap = nullptr;
            }
        }
        if (v < 3) {
            for (auto* t : {&g_main_methods[v], &g_wal_methods[v]}) {
                t->xFetch = nullptr;
                t->xUnfetch = nullptr;
            }
        }
    }
}

// ---- the VFS ----------------------------------------------------------------------

// realpath() of the directory plus the file name: one replicator per file,
// whatever path spelling or symlinked directory the app used.
std::string canonical_path(const char* name) {
    std::string n(name);
    auto slash = n.find_last_of('/');
    std::string dir = slash == std::string::npos ? "." : n.substr(0, slash == 0 ? 1 : slash);
    std::string base = slash == std::string::npos ? n : n.substr(slash + 1);
    char buf[PATH_MAX];
    if (::realpath(dir.c_str(), buf)) {
        std::string d(buf);
        return d == "/" ? "/" + base : d + "/" + base;
    }
    return n;
}

std::map<std::string, std::string> uri_params(const char* name) {
    std::map<std::string, std::string> out;
    for (int i = 0;; ++i) {
        const char* k = sqlite3_uri_key(name, i);
        if (!k) break;
        const char* v = sqlite3_uri_parameter(name, k);
        out[k] = v ? v : "";
    }
    return out;
}

int x_open(sqlite3_vfs* vfs, const char* name, sqlite3_file* file, int flags, int* out_flags) {
    (void)vfs;
    const bool main_db = (flags & SQLITE_OPEN_MAIN_DB) != 0;
    const bool wal = (flags & SQLITE_OPEN_WAL) != 0;
    if (!name || (!main_db && !wal)) return g_lower->xOpen(g_lower, name, file, flags, out_flags);

    std::shared_ptr<Replicator> repl;
    std::shared_ptr<replicator::Replica> replica;
    std::shared_ptr<replicator::Follower> follower;
    std::string canon;
    long leader_elsewhere = 0;
    int rc = guarded(SQLITE_CANTOPEN, [&]() -> int {
        if (main_db) {
            canon = canonical_path(name);
            auto cfg = replicator::load_config(canon, uri_params(name));
            if (!cfg) {
                log::error("cannot open " + canon + ": " + cfg.error().message);
                sqlite3_log(SQLITE_CANTOPEN, "bottomless: %s", cfg.error().message.c_str());
                return SQLITE_CANTOPEN;
            }
            if (cfg->replica) {
                auto rp = replicator::Replica::acquire(canon, *cfg, g_lower);
                if (!rp) {
                    // As for a writer: another process still starting up (hydrating) is "busy, try again".
                    const int code = rp.error().code == "StartupBusy" ? SQLITE_BUSY : SQLITE_CANTOPEN;
                    log::error("cannot open the replica " + canon + ": " + rp.error().describe());
                    sqlite3_log(code, "bottomless: %s", rp.error().describe().c_str());
                    return code;
                }
                replica = std::move(rp).value();
                return SQLITE_OK;
            }
            auto r = Replicator::acquire(canon, *cfg, &leader_elsewhere);
            if (!r) {
                const int code = r.error().code == "StartupBusy" ? SQLITE_BUSY : SQLITE_CANTOPEN;
                log::error("cannot open " + canon + ": " + r.error().describe());
                sqlite3_log(code, "bottomless: %s", r.error().describe().c_str());
                return code;
            }
            if (leader_elsewhere) {
                // Another process replicates: this one writes and leaves the
                // shipping to it (follower.h), or, in sync mode or without
                // the shared area, reads only.
                std::string who = leader_elsewhere > 0 ? "process " + std::to_string(leader_elsewhere) : "another process";
                auto fo = replicator::Follower::acquire(canon, *cfg, leader_elsewhere);
                if (fo) follower = std::move(fo).value();
                if (!follower || follower->read_only()) {
                    std::string m = canon + " is replicated by " + who + "; this connection is read-only (" +
                                    (follower ? "in sync mode only the replicating process writes"
                                              : fo.error().message) +
                                    ": write it from that process, or reopen once it has closed)";
                    log::warn(m);
                    sqlite3_log(SQLITE_READONLY, "bottomless: %s", m.c_str());
                }
            } else if (*r && (*r)->enabled()) {
                repl = std::move(r).value();
            }
        } else {
            std::string n(name);
            if (n.size() > 4 && n.compare(n.size() - 4, 4, "-wal") == 0)
                repl = Replicator::find(canonical_path(n.substr(0, n.size() - 4).c_str()));
        }
        return SQLITE_OK;
    });
    if (rc != SQLITE_OK) return rc;
    if (wal && !repl) return g_lower->xOpen(g_lower, name, file, flags, out_flags);

    ShimFile* s = new (file) ShimFile();  // raw memory from SQLite: construct in place
    s->base.pMethods = nullptr;           // stays null on failure: SQLite will not call xClose
    s->kind = main_db ? Kind::MainDb : Kind::Wal;
    s->repl = std::move(repl);
    s->leader_elsewhere = leader_elsewhere;
    s->follower = std::move(follower);
    s->read_only = (leader_elsewhere && (!s->follower || s->follower->read_only())) || replica;
    s->replica = std::move(replica);
    sqlite3_file* l = s->lower();
    if (s->replica) {
        // Read-only for the application: only the follower writes, through
        // a file of its own. Time travel opens its private copy instead.
        name = s->replica->file_name();
    }
    if (s->read_only) flags = (flags & ~(SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE)) | SQLITE_OPEN_READONLY;
    rc = g_lower->xOpen(g_lower, name, l, flags, out_flags);
    if (rc != SQLITE_OK) {
        s->~ShimFile();
        return rc;
    }
    // A follower's pager is read-only: writes fail with SQLITE_READONLY
    // ("attempt to write a readonly database") instead of forking the history.
    if (s->read_only && out_flags) *out_flags = (*out_flags & ~SQLITE_OPEN_READWRITE) | SQLITE_OPEN_READONLY;
    int v = l->pMethods ? l->pMethods->iVersion : 1;
    v = v < 1 ? 1 : (v > 3 ? 3 : v);
    s->base.pMethods = main_db ? &g_main_methods[v] : &g_wal_methods[v];
    if (s->kind == Kind::Wal && s->repl) {
        s->repl->note_wal_open(true);
        unsigned char hdr[32];
        sqlite3_int64 size = 0;
        if (l->pMethods->xFileSize(l, &size) == SQLITE_OK && size >= 32 &&
            l->pMethods->xRead(l, hdr, 32, 0) == SQLITE_OK) {
            if (auto h = replicator::parse_wal_header(hdr)) {
                s->page_size = h->page_size;
                s->salt1 = h->salt1;
                s->salt2 = h->salt2;
            }
        }
    }
    return SQLITE_OK;
}

int x_delete(sqlite3_vfs* vfs, const char* name, int sync_dir) {
    (void)vfs;
    int rc = guarded(SQLITE_IOERR_DELETE, [&]() -> int {
        std::string n(name);
        if (n.size() > 4 && n.compare(n.size() - 4, 4, "-wal") == 0) {
            if (auto r = Replicator::find(canonical_path(n.substr(0, n.size() - 4).c_str()))) {
                auto st = r->flush_before_wal_loss("delete the WAL", r->config().shutdown_timeout);
                if (!st) {
                    // The WAL stays: its frames are shipped at the next open.
                    log::warn(st.error().message + "; keeping " + n);
                    return SQLITE_IOERR_DELETE;
                }
                // Frames kept only in memory lose their slots now: aside first.
                r->before_wal_overwrite(0);
            } else if (auto fo = replicator::Follower::find(canonical_path(n.substr(0, n.size() - 4).c_str()))) {
                // The last connection of all, in a process that follows: the
                // leader is gone and nobody has taken over yet. The WAL stays
                // unless the leader had shipped all of it; the next leader
                // ships it.
                if (!fo->wal_delete_allowed()) {
                    log::warn("keeping " + n + ": its last frames are not in S3 yet (the replicating process left)");
                    return SQLITE_IOERR_DELETE;
                }
            }
        }
        return SQLITE_OK;
    });
    if (rc != SQLITE_OK) return rc;
    return g_lower->xDelete(g_lower, name, sync_dir);
}

int x_access(sqlite3_vfs*, const char* name, int flags, int* out) { return g_lower->xAccess(g_lower, name, flags, out); }
int x_full_pathname(sqlite3_vfs*, const char* name, int n, char* out) {
    return g_lower->xFullPathname(g_lower, name, n, out);
}
void* x_dl_open(sqlite3_vfs*, const char* path) { return g_lower->xDlOpen(g_lower, path); }
void x_dl_error(sqlite3_vfs*, int n, char* msg) { g_lower->xDlError(g_lower, n, msg); }
void (*x_dl_sym(sqlite3_vfs*, void* h, const char* sym))(void) { return g_lower->xDlSym(g_lower, h, sym); }
void x_dl_close(sqlite3_vfs*, void* h) { g_lower->xDlClose(g_lower, h); }
int x_randomness(sqlite3_vfs*, int n, char* out) { return g_lower->xRandomness(g_lower, n, out); }
int x_sleep(sqlite3_vfs*, int us) { return g_lower->xSleep(g_lower, us); }
int x_current_time(sqlite3_vfs*, double* out) { return g_lower->xCurrentTime(g_lower, out); }
int x_get_last_error(sqlite3_vfs*, int n, char* out) { return g_lower->xGetLastError(g_lower, n, out); }
int x_current_time_int64(sqlite3_vfs*, sqlite3_int64* out) { return g_lower->xCurrentTimeInt64(g_lower, out); }
int x_set_system_call(sqlite3_vfs*, const char* name, sqlite3_syscall_ptr p) {
    return g_lower->xSetSystemCall(g_lower, name, p);
}
sqlite3_syscall_ptr x_get_system_call(sqlite3_vfs*, const char* name) {
    return g_lower->xGetSystemCall(g_lower, name);
}
const char* x_next_system_call(sqlite3_vfs*, const char* name) { return g_lower->xNextSystemCall(g_lower, name); }

}  // namespace


Replicator* replicator_of(sqlite3_file* f) {
    if (!f || !f->pMethods) return nullptr;
    for (int v = 1; v <= 3; ++v)
        if (f->pMethods == &g_main_methods[v]) return shim(f)->repl.get();
    return nullptr;
}

long leader_elsewhere(sqlite3_file* f) {
    if (!is_bottomless_file(f)) return 0;
    return shim(f)->leader_elsewhere;
}

replicator::Follower* follower_of(sqlite3_file* f) {
    if (!is_bottomless_file(f)) return nullptr;
    return shim(f)->follower.get();
}

std::string replica_status(sqlite3_file* f) {
    if (!is_bottomless_file(f) || !shim(f)->replica) return {};
    return shim(f)->replica->status_json();
}

bool is_bottomless_file(sqlite3_file* f) {
    if (!f || !f->pMethods) return false;
    for (int v = 1; v <= 3; ++v)
        if (f->pMethods == &g_main_methods[v]) return true;
    return false;
}

int register_vfs(bool make_default) {
    if (sqlite3_vfs* existing = sqlite3_vfs_find(kVfsName)) {
        return make_default ? sqlite3_vfs_register(existing, 1) : SQLITE_OK;
    }
    g_lower = sqlite3_vfs_find(nullptr);
    if (!g_lower) return SQLITE_ERROR;
    Replicator::set_file_vfs(g_lower);  // snapshots read the database through it
    build_tables();
    std::memset(&g_vfs, 0, sizeof g_vfs);
    g_vfs.iVersion = g_lower->iVersion < 3 ? g_lower->iVersion : 3;
    g_vfs.szOsFile = static_cast<int>(sizeof(ShimFile)) + g_lower->szOsFile;
    g_vfs.mxPathname = g_lower->mxPathname;
    g_vfs.zName = kVfsName;
    g_vfs.xOpen = x_open;
    g_vfs.xDelete = x_delete;
    g_vfs.xAccess = x_access;
    g_vfs.xFullPathname = x_full_pathname;
    g_vfs.xDlOpen = g_lower->xDlOpen ? x_dl_open : nullptr;
    g_vfs.xDlError = g_lower->xDlError ? x_dl_error : nullptr;
    g_vfs.xDlSym = g_lower->xDlSym ? x_dl_sym : nullptr;
    g_vfs.xDlClose = g_lower->xDlClose ? x_dl_close : nullptr;
    g_vfs.xRandomness = x_randomness;
    g_vfs.xSleep = x_sleep;
    g_vfs.xCurrentTime = x_current_time;
    g_vfs.xGetLastError = x_get_last_error;
    if (g_vfs.iVersion >= 2) g_vfs.xCurrentTimeInt64 = x_current_time_int64;
    if (g_vfs.iVersion >= 3) {
        g_vfs.xSetSystemCall = x_set_system_call;
        g_vfs.xGetSystemCall = x_get_system_call;
        g_vfs.xNextSystemCall = x_next_system_call;
    }
    return sqlite3_vfs_register(&g_vfs, make_default ? 1 : 0);
}

}  // namespace bottomless::vfs
