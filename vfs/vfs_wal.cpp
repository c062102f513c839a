// The shim's shm-lock hooks (commits seen at the WAL write lock's release,
// the replicator's and a follower's vetoes on checkpoints and WAL restarts)
// and the WAL file's methods (the tee, sync mode's held commit frame, the
// guards on restart and truncation). vfs.cpp's header comment says why.
#include <algorithm>
#include <array>
#include <chrono>
#include <cstring>

#include "s3/log.h"
#include "vfs/shim_file.h"

namespace bottomless::vfs::detail {

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
        if (!(have ? r->begin_restart(h) : r->begin_restart())) return SQLITE_BUSY;
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
// In a follower process (`r` null) the leader ships it (Follower::commit_sync).
int write_held_commit(ShimFile* s, Replicator* r) {
    sqlite3_file* l = s->lower();
    uint64_t frame = static_cast<uint64_t>((s->commit_offset - 32) / (s->page_size + 24)) + 1;
    s->commit_held = false;
    s->commit_pending = false;
    s->commit_wait_cksum = false;
    const auto* page = reinterpret_cast<const unsigned char*>(s->commit_page.data());
    auto st = r ? r->commit_sync(frame, s->commit_header, page, s->page_size)
                : s->follower->commit_sync(frame, s->commit_header, page, s->page_size);
    if (!st) {
        sqlite3_log(SQLITE_IOERR_WRITE, "bottomless: %s", st.error().message.c_str());
        log::error(st.error().message);
        return SQLITE_IOERR_WRITE;
    }
    int rc = l->pMethods->xWrite(l, s->commit_header, 24, s->commit_offset);
    if (rc == SQLITE_OK)
        rc = l->pMethods->xWrite(l, s->commit_page.data(), static_cast<int>(s->commit_page.size()), s->commit_offset + 24);
    if (rc == SQLITE_OK && r) {
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

// Growing the WAL past its largest size so far (a snapshot or S3 holding
// the restart off, a new WAL after a TRUNCATE checkpoint): appending makes
// every synced commit also commit the file system's metadata (the new size
// and blocks), which on ext4 halved synchronous=FULL commits (docs/
// BENCHMARKS.md, "A WAL that grows"). So once the WAL has been synced (FULL
// syncs it at every commit; NORMAL only at checkpoints) and a frame would go
// past the end of the file, the file is first extended with written zeros
// by a quarter of its size (64 KiB to 4 MiB): the following commits
// overwrite blocks that exist, and one sync in a quarter of the file's
// growth pays for the metadata. Safe: every WAL write is made under the
// WAL write lock (no other connection or process writes the WAL
// meanwhile), and only bytes past the end of the file are written; SQLite
// knows frames by their salts and checksums, never by the file's size, so
// zeros past the last frame are never read as frames (as after a restart,
// when the old frames stay past the new ones). Best effort: a failed
// extension leaves zeros or nothing, and SQLite's own write then reports
// the disk's state.
void grow_ahead(ShimFile* s, sqlite3_int64 end) {
    if (!s->wal_synced || end <= s->wal_size_seen) return;
    sqlite3_file* l = s->lower();
    sqlite3_int64 size = 0;
    if (l->pMethods->xFileSize(l, &size) != SQLITE_OK) return;
    s->wal_size_seen = size;
    if (end <= size) return;
    constexpr sqlite3_int64 kPiece = 64 << 10;
    static const std::array<unsigned char, kPiece> zeros{};
    const sqlite3_int64 target = end + std::clamp<sqlite3_int64>(size / 4, kPiece, 4 << 20);
    for (sqlite3_int64 at = size; at < target; at += kPiece)
        if (l->pMethods->xWrite(l, zeros.data(), static_cast<int>(std::min(kPiece, target - at)), at) != SQLITE_OK) return;
    s->wal_size_seen = target;
    s->wal_synced = false;
}

int wal_sync(sqlite3_file* f, int flags) {
    ShimFile* s = shim(f);
    s->wal_synced = true;
    sqlite3_file* l = s->lower();
    return l->pMethods->xSync(l, flags);
}

// A follower process's WAL: in sync mode its commit frame is held back
// until the leader has shipped the transaction (as in the leader's process,
// below); every other write goes straight through.
int follower_wal_write(ShimFile* s, const void* buf, int n, sqlite3_int64 off) {
    sqlite3_file* l = s->lower();
    return guarded(SQLITE_IOERR_WRITE, [&]() -> int {
        const auto* p = static_cast<const unsigned char*>(buf);
        if (off == 0 && n >= 32) {
            int rc = l->pMethods->xWrite(l, buf, n, off);
            if (rc == SQLITE_OK)
                if (auto h = replicator::parse_wal_header(p)) s->page_size = h->page_size;
            s->commit_pending = s->commit_held = false;
            s->wal_size_seen = -1;  // a new WAL (maybe after a truncation elsewhere)
            return rc;
        }
        learn_page_size(s);
        if (is_frame_header(s, n, off)) {
            grow_ahead(s, off + 24 + static_cast<sqlite3_int64>(s->page_size));
            if (s->commit_held && off == s->commit_offset) {
                std::memcpy(s->commit_header, p, 24);  // its final header (walRewriteChecksums)
                if (s->commit_wait_cksum && s->commit_page.size() == s->page_size) return write_held_commit(s, nullptr);
                return SQLITE_OK;
            }
            if (be32(p + 4) != 0 && s->follower->sync_commits()) {
                s->commit_held = s->commit_pending = true;
                s->commit_offset = off;
                std::memcpy(s->commit_header, p, 24);
                s->commit_wait_cksum = (be32(p + 8) | be32(p + 12)) == 0;
                s->commit_page.clear();
                return SQLITE_OK;
            }
            return l->pMethods->xWrite(l, buf, n, off);
        }
        if (s->commit_held && off == s->commit_offset + 24 + static_cast<sqlite3_int64>(s->commit_page.size())) {
            s->commit_page.append(reinterpret_cast<const char*>(p), static_cast<size_t>(n));
            if (s->commit_page.size() < s->page_size || s->commit_wait_cksum) return SQLITE_OK;
            return write_held_commit(s, nullptr);
        }
        return l->pMethods->xWrite(l, buf, n, off);
    });
}

int wal_write(sqlite3_file* f, const void* buf, int n, sqlite3_int64 off) {
    ShimFile* s = shim(f);
    sqlite3_file* l = s->lower();
    Replicator* r = s->repl.get();
    if (!r) return s->follower ? follower_wal_write(s, buf, n, off) : l->pMethods->xWrite(l, buf, n, off);
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
            s->wal_size_seen = -1;  // a new WAL (maybe after a truncation elsewhere)
            return rc;
        }
        learn_page_size(s);
        if (is_frame_header(s, n, off)) {
            grow_ahead(s, off + 24 + static_cast<sqlite3_int64>(s->page_size));
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
    s->wal_size_seen = -1;
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

}  // namespace bottomless::vfs::detail
