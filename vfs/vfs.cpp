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
**   header, touches atomics, and records a commit under a short mutex. One
**   exception, in a process that follows another's leader (follower.h): a
**   checkpoint or WAL restart it lets through opens the shared area and
**   takes its snapshot byte (a few syscalls, about once per WAL cycle).
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

#include "s3/log.h"
#include "vfs/shim_file.h"

namespace bottomless::vfs {
namespace detail {
sqlite3_vfs* g_lower = nullptr;
}  // namespace detail

namespace {

using namespace detail;
using replicator::Replicator;

sqlite3_vfs g_vfs;
sqlite3_io_methods g_main_methods[4];  // indexed by iVersion (1..3)
sqlite3_io_methods g_wal_methods[4];

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
    ShimFile* s = shim(f);
    sqlite3_file* l = s->lower();
    int rc = l->pMethods->xFileControl(l, op, arg);
    if (op == SQLITE_FCNTL_MMAP_SIZE && s->kind == Kind::MainDb && s->repl) {
        // The pager sets the map limit at open and at PRAGMA mmap_size; the
        // unix VFS keeps the old one while pages are fetched. Ask what it
        // is now (-1: no change): a snapshot may read through this handle
        // only while nothing of it is mapped (Replicator::add_db_handle).
        sqlite3_int64 now = -1;
        const bool unmapped = l->pMethods->xFileControl(l, SQLITE_FCNTL_MMAP_SIZE, &now) == SQLITE_OK && now == 0;
        guarded(SQLITE_OK, [&] {
            s->repl->set_db_handle_lendable(l, unmapped);
            return SQLITE_OK;
        });
    }
    return rc;
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
    if (s->kind == Kind::MainDb && s->repl)
        guarded(SQLITE_OK, [&] {
            s->repl->remove_db_handle(l);  // waits for a snapshot's read through it
            return SQLITE_OK;
        });
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
    w.xSync = wal_sync;
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
                // shipping to it (follower.h), or, without the shared area,
                // reads only.
                std::string who = leader_elsewhere > 0 ? "process " + std::to_string(leader_elsewhere) : "another process";
                auto fo = replicator::Follower::acquire(canon, *cfg, leader_elsewhere);
                if (fo) follower = std::move(fo).value();
                if (!follower) {
                    std::string m = canon + " is replicated by " + who + "; this connection is read-only (" +
                                    fo.error().message +
                                    ": write it from that process, or reopen once it has closed)";
                    log::warn(m);
                    sqlite3_log(SQLITE_READONLY, "bottomless: %s", m.c_str());
                }
            } else if (*r && (*r)->enabled()) {
                repl = std::move(r).value();
            }
        } else {
            std::string n(name);
            if (n.size() > 4 && n.compare(n.size() - 4, 4, "-wal") == 0) {
                const std::string db = canonical_path(n.substr(0, n.size() - 4).c_str());
                repl = Replicator::find(db);
                // A follower process's WAL: its sync commits wait for the leader.
                if (!repl) follower = replicator::Follower::find(db);
            }
        }
        return SQLITE_OK;
    });
    if (rc != SQLITE_OK) return rc;
    if (wal && !repl && !follower) return g_lower->xOpen(g_lower, name, file, flags, out_flags);

    ShimFile* s = new (file) ShimFile();  // raw memory from SQLite: construct in place
    s->base.pMethods = nullptr;           // stays null on failure: SQLite will not call xClose
    s->kind = main_db ? Kind::MainDb : Kind::Wal;
    s->repl = std::move(repl);
    s->leader_elsewhere = leader_elsewhere;
    s->follower = std::move(follower);
    s->read_only = (leader_elsewhere && !s->follower) || replica;
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
    // A read-only connection's pager: writes fail with SQLITE_READONLY
    // ("attempt to write a readonly database") instead of forking the history.
    if (s->read_only && out_flags) *out_flags = (*out_flags & ~SQLITE_OPEN_READWRITE) | SQLITE_OPEN_READONLY;
    int v = l->pMethods ? l->pMethods->iVersion : 1;
    v = v < 1 ? 1 : (v > 3 ? 3 : v);
    s->base.pMethods = main_db ? &g_main_methods[v] : &g_wal_methods[v];
    if (s->kind == Kind::MainDb && s->repl && !s->read_only)
        guarded(SQLITE_OK, [&] {
            s->repl->add_db_handle(l);  // lent to snapshots once known unmapped; without it they open their own
            return SQLITE_OK;
        });
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
