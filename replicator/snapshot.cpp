// New generations: a snapshot of the whole database, read from the
// database file and the WAL while checkpoints are held off.
#include "replicator/replicator.h"
#include "replicator/replicator_internal.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <memory>
#include <thread>
#include <unordered_map>

#include "replicator/sqlite_api.h"
#include "s3/log.h"

namespace bottomless::replicator {

namespace {

std::atomic<sqlite3_vfs*> g_file_vfs{nullptr};

// The database file, read-only, for one snapshot: read through a handle
// one of this process's connections holds (Replicator::add_db_handle) while
// one can be lent, else opened through the VFS SQLite uses (the unix VFS
// tracks inodes: while a connection holds a POSIX lock on the file, closing
// this handle is deferred instead of dropping that lock, which a close of
// any descriptor of the inode would do; the deferred descriptor then stays
// until the last connection closes). Without a VFS (no connection ever went
// through the shim) a plain descriptor, which then cannot hold anyone's lock.
class DbFile {
public:
    explicit DbFile(Replicator& r) : repl_(r) {}
    DbFile(const DbFile&) = delete;
    DbFile& operator=(const DbFile&) = delete;
    ~DbFile() {
        if (file_ && file_->pMethods) file_->pMethods->xClose(file_);
        if (name_) sqlite3_free_filename(name_);
        if (fd_ >= 0) ::close(fd_);
    }
    bool open(const std::string& path) {
        path_ = path;
        uint64_t size = 0;
        if (repl_.db_handle_size(size)) return true;  // a connection's handle: nothing to open
        return open_own();
    }
    bool size(uint64_t& out) {
        if (!own_)
            if (auto r = repl_.db_handle_size(out)) return *r;
        if (!own_ && !open_own()) return false;
        if (file_) {
            sqlite3_int64 n = 0;
            if (file_->pMethods->xFileSize(file_, &n) != SQLITE_OK || n < 0) return false;
            out = static_cast<uint64_t>(n);
            return true;
        }
        struct stat st{};
        if (::fstat(fd_, &st) != 0) return false;
        out = static_cast<uint64_t>(st.st_size);
        return true;
    }
    bool read(void* buf, size_t n, uint64_t off) {
        // The connection whose handle was lent may close meanwhile: the
        // next read borrows another, or opens the file itself.
        if (!own_)
            if (auto r = repl_.read_db_handle(buf, n, off)) return *r;
        if (!own_ && !open_own()) return false;
        if (file_) return file_->pMethods->xRead(file_, buf, static_cast<int>(n), static_cast<sqlite3_int64>(off)) ==
                          SQLITE_OK;
        return pread_full(fd_, buf, n, off);
    }

private:
    bool open_own() {
        own_ = true;
        if (sqlite3_vfs* vfs = g_file_vfs.load()) {
            // The name as SQLite itself passes it (a VFS may look for URI
            // parameters after it).
            name_ = sqlite3_create_filename(path_.c_str(), "", "", 0, nullptr);
            if (!name_) return false;
            mem_ = std::make_unique<std::max_align_t[]>(
                (static_cast<size_t>(vfs->szOsFile) + sizeof(std::max_align_t) - 1) / sizeof(std::max_align_t));
            file_ = reinterpret_cast<sqlite3_file*>(mem_.get());
            file_->pMethods = nullptr;
            int out = 0;
            if (vfs->xOpen(vfs, name_, file_, SQLITE_OPEN_MAIN_DB | SQLITE_OPEN_READONLY, &out) != SQLITE_OK) {
                if (!file_->pMethods) file_ = nullptr;
                return false;
            }
            return true;
        }
        fd_ = ::open(path_.c_str(), O_RDONLY | O_CLOEXEC);
        return fd_ >= 0;
    }

    Replicator& repl_;
    std::string path_;
    bool own_ = false;  // reads go through a file of our own (opened, or failed to)
    std::unique_ptr<std::max_align_t[]> mem_;
    sqlite3_file* file_ = nullptr;
    sqlite3_filename name_ = nullptr;
    int fd_ = -1;
};

uint32_t db_header_page_size(const unsigned char* h) {
    uint32_t v = (static_cast<uint32_t>(h[16]) << 8) | h[17];
    return v == 1 ? 65536 : v;
}

}  // namespace

void Replicator::set_file_vfs(sqlite3_vfs* vfs) { g_file_vfs.store(vfs); }

void Replicator::add_db_handle(sqlite3_file* f) {
    std::lock_guard hlock(handles_mu_);
    handles_.push_back(DbHandle{f, false, 0});
}

void Replicator::set_db_handle_lendable(sqlite3_file* f, bool lendable) {
    std::unique_lock hlock(handles_mu_);
    for (auto& h : handles_)
        if (h.file == f) h.lendable = lendable;
    if (lendable) return;
    // A read lent before may still be under way: it must end before this
    // connection maps the file (its next fetch may), or it could read from
    // a mapping the connection's thread moves.
    handles_cv_.wait(hlock, [&] {
        for (const auto& h : handles_)
            if (h.file == f && h.readers > 0) return false;
        return true;
    });
}

void Replicator::remove_db_handle(sqlite3_file* f) {
    std::unique_lock hlock(handles_mu_);
    auto it = std::find_if(handles_.begin(), handles_.end(), [&](const DbHandle& h) { return h.file == f; });
    if (it == handles_.end()) return;
    it->lendable = false;  // no new read through it
    handles_cv_.wait(hlock, [&] {
        auto i = std::find_if(handles_.begin(), handles_.end(), [&](const DbHandle& h) { return h.file == f; });
        return i->readers == 0;
    });
    handles_.erase(std::find_if(handles_.begin(), handles_.end(), [&](const DbHandle& h) { return h.file == f; }));
}

namespace {
// Runs `op` on a lendable handle of `handles` (held for the call, its
// mutex not); nullopt when there is none.
template <class Op>
std::optional<bool> through_handle(std::mutex& mu, std::condition_variable& cv, std::vector<Replicator::DbHandle>& handles,
                                   Op op) {
    sqlite3_file* f = nullptr;
    {
        std::lock_guard hlock(mu);
        for (auto& h : handles)
            if (h.lendable) {
                ++h.readers;
                f = h.file;
                break;
            }
    }
    if (!f) return std::nullopt;
    const bool ok = op(f);
    {
        std::lock_guard hlock(mu);
        for (auto& h : handles)
            if (h.file == f) --h.readers;
    }
    cv.notify_all();
    return ok;
}
}  // namespace

std::optional<bool> Replicator::db_handle_size(uint64_t& out) {
    return through_handle(handles_mu_, handles_cv_, handles_, [&](sqlite3_file* f) {
        sqlite3_int64 n = 0;
        if (f->pMethods->xFileSize(f, &n) != SQLITE_OK || n < 0) return false;
        out = static_cast<uint64_t>(n);
        return true;
    });
}

std::optional<bool> Replicator::read_db_handle(void* buf, size_t n, uint64_t off) {
    return through_handle(handles_mu_, handles_cv_, handles_, [&](sqlite3_file* f) {
        return f->pMethods->xRead(f, buf, static_cast<int>(n), static_cast<sqlite3_int64>(off)) == SQLITE_OK;
    });
}

void Replicator::request_snapshot(const std::string& reason) {
    if (!need_snapshot_) log::info(path_ + ": new generation needed: " + reason);
    need_snapshot_ = true;
    snapshot_reason_ = reason;
}

Status Replicator::take_snapshot(Lock& lock) {
    // Ship what the current generation can still take, so its history ends
    // as late as possible; a failure here does not stop the new generation.
    if (!generation_.empty() && (!pending_.empty() || inflight_))
        (void)upload_pending(lock, true, Clock::now() + std::chrono::seconds(5));
    if (!generation_.empty()) {
        parent_generation_ = generation_;
        parent_seq_ = seq_;
    }

    struct Guard {
        std::atomic<bool>& flag;
        ~Guard() { flag.store(false); }
    } guard{snapshot_active_};
    snapshot_active_.store(true);
    // From now on no checkpoint and no WAL restart of this process starts
    // (their locks are refused); wait for those registered before to end.
    // Then the database file and the WAL's committed frames stay still
    // until the snapshot is read: its image is consistent by construction.
    for (int i = 0; (checkpoints_active_.load() > 0 || restarts_active_.load() > 0) && i < 30'000; ++i)
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
    if (checkpoints_active_.load() > 0 || restarts_active_.load() > 0)
        return make_error(ErrorKind::Cancelled, "a checkpoint or WAL restart did not finish; snapshot postponed", "Busy");
    // Other processes' checkpoints and restarts hold the shared area's
    // snapshot byte shared: the exclusive hold waits for those under way
    // and refuses the next ones until the image is read (shared_area.h).
    SharedArea::Hold others;
    if (area_) {
        // Briefly: a follower's checkpoint may itself wait for what this
        // process ships (its restart needs it durable); the snapshot is
        // tried again at the next step instead.
        for (int i = 0; !(others = area_->try_hold_exclusive()).held() && i < 1000; ++i)
            std::this_thread::sleep_for(std::chrono::milliseconds(1));
        if (!others.held())
            return make_error(ErrorKind::Cancelled,
                              "another process's checkpoint or WAL restart did not finish; snapshot postponed", "Busy");
    }
    // Writes of the checkpoints just waited for are not tears; any later is.
    snapshot_torn_.store(false);

    const uint64_t idx0 = noted_index_.load();
    DbFile db(*this);
    unsigned char dbh[100] = {0};
    struct stat st{};
    uint64_t db_size = 0;
    // The path's inode, size and mtime, checked again once every page is
    // read (below); the handle must see the same size.
    const bool opened = db.open(path_) && ::stat(path_.c_str(), &st) == 0;
    if (!opened) st = {};  // as with no file: nothing is read from it
    if (opened && (!db.size(db_size) || db_size != static_cast<uint64_t>(st.st_size)))
        return make_error(ErrorKind::Cancelled, "the database file changed while the snapshot opened it; retrying",
                          "SnapshotTorn");
    bool have_db = opened && st.st_size >= 100 && db.read(dbh, 100, 0);
    // The image: the wal-index header names the last commit (the frames up
    // to it are in the WAL, the rest in the database file). Without shared
    // memory (exclusive locking mode) the WAL is scanned by SQLite's own
    // recovery rules instead.
    std::optional<WalIndexHeader> index = uses_shm() ? wal_index_now() : std::nullopt;
    // With other processes writing, only the wal-index says what is
    // committed (a scan would take a killed writer's unpublished commit for
    // one): wait until a connection of ours has mapped it.
    if (!index && area_ && area_->followers())
        return make_error(ErrorKind::Cancelled, "the wal-index is not mapped yet; snapshot postponed", "Busy");
    uint64_t last_frame = 0;
    uint32_t psz = 0, db_pages = 0;
    WalPosition pos;
    std::optional<WalHeader> wal_hdr;
    if (index && (index->mx_frame > 0 || have_db)) {
        last_frame = index->mx_frame;
        psz = last_frame ? index->page_size : db_header_page_size(dbh);
        // With no frames the database file is the whole image (a restart
        // follows a complete checkpoint).
        db_pages = last_frame ? index->db_pages : (psz ? static_cast<uint32_t>(st.st_size / psz) : 0);
        // After a restart (mx_frame 0) the next commit starts a new epoch:
        // a zero position makes capture take its header as the chain's start.
        if (last_frame) pos = WalPosition{index->salt1, index->salt2, last_frame, index->cksum1, index->cksum2};
    } else {
        index.reset();
        auto scan = scan_wal_file(wal_path_);
        if (!scan) return std::move(scan).error();
        last_frame = scan->last_commit_frame;
        psz = scan->has_header ? scan->header.page_size : (have_db ? db_header_page_size(dbh) : 0);
        db_pages = last_frame ? scan->db_size : (have_db && psz ? static_cast<uint32_t>(st.st_size / psz) : 0);
        if (scan->has_header) {
            pos = WalPosition{scan->header.salt1, scan->header.salt2, scan->last_commit_frame, scan->cksum1,
                              scan->cksum2};
            wal_hdr = scan->header;
        }
    }
    // Every transaction the snapshot holds committed before this instant:
    // its last_commit_us, so a point-in-time restore never takes it for a
    // state older than it is.
    const int64_t scanned_us = now_us();
    if (have_db && psz && db_header_page_size(dbh) != psz)
        return make_error(ErrorKind::Corrupt, "database and WAL page sizes differ", "PageSize");
    if (db_pages == 0 || psz == 0) {
        // Nothing to snapshot yet (a new, empty database): the first commit will be.
        return {};
    }

    // Latest WAL frame of each page up to the snapshot position.
    std::unordered_map<uint32_t, uint64_t> latest;
    Fd wal(last_frame ? ::open(wal_path_.c_str(), O_RDONLY | O_CLOEXEC) : -1);
    if (last_frame && !wal_hdr) {
        unsigned char hb[kWalHeaderSize];
        if (wal.fd >= 0 && pread_full(wal.fd, hb, sizeof hb, 0)) wal_hdr = parse_wal_header(hb);
        if (!wal_hdr || wal_hdr->salt1 != pos.salt1 || wal_hdr->salt2 != pos.salt2)
            return make_error(ErrorKind::Cancelled, "the WAL does not match its wal-index (being restarted?); retrying",
                              "SnapshotTorn");
    }
    for (uint64_t i = 1; i <= last_frame; ++i) {
        unsigned char fh[kWalFrameHeaderSize];
        if (!pread_full(wal.fd, fh, sizeof fh, wal_frame_offset(psz, i)))
            return make_error(ErrorKind::Io, "cannot read WAL frame " + std::to_string(i), "WalRead");
        latest[parse_frame_header(fh).pgno] = i;
    }

    std::string gen = new_generation_id(now_us() / 1000);
    SnapshotHeader h;
    h.db_id = config_.db_id;
    h.generation = gen;
    h.page_size = psz;
    h.db_pages = db_pages;
    h.created_us = now_us();
    {
        std::lock_guard slock(status_mu_);
        h.last_commit_us = last_durable_commit_us_;
    }
    if (idx0 > 0 || last_frame > 0) h.last_commit_us = scanned_us;
    h.position = pos;
    h.parent_generation = parent_generation_;
    h.parent_seq = parent_seq_;
    h.compression = config_.compression;

    std::string key = snapshot_key(config_.db_id, gen);
    // Ours from now on, even if this process dies before the upload ends.
    lineage_.insert(lineage_.begin(), gen);
    if (lineage_.size() > 64) lineage_.resize(64);
    write_state_file(false);
    auto writer = client_->open_writer(config_.bucket, key, s3::PutOptions{});
    SnapshotWriter sw(h, [&](std::string_view piece) { return writer->write(piece); }, cipher_.get());
    std::string page(psz, '\0');
    for (uint32_t pgno = 1; pgno <= db_pages; ++pgno) {
        auto it = latest.find(pgno);
        bool ok;
        if (it != latest.end()) {
            ok = pread_full(wal.fd, page.data(), psz, wal_frame_offset(psz, it->second) + kWalFrameHeaderSize);
        } else if (static_cast<uint64_t>(pgno) * psz <= static_cast<uint64_t>(st.st_size)) {
            ok = db.read(page.data(), psz, static_cast<uint64_t>(pgno - 1) * psz);
        } else {
            std::fill(page.begin(), page.end(), '\0');  // never written (e.g. the lock page)
            ok = true;
        }
        if (!ok) return make_error(ErrorKind::Io, "cannot read page " + std::to_string(pgno) + " of " + path_, "ReadError");
        if (auto s = sw.add_page(page); !s) return s;
    }
    auto sha = sw.finish();
    if (!sha) return std::move(sha).error();
    // Consistent by construction (above); still checked, for what bypasses
    // bottomless (another program writing the files): the database file's
    // mtime/size and the WAL's header and last frame must be as they were.
    struct stat st_after{};
    uint64_t db_size_after = 0;
    bool db_moved = opened && (::stat(path_.c_str(), &st_after) != 0 || st_after.st_ino != st.st_ino ||
                                st_after.st_size != st.st_size || st_after.st_mtim.tv_sec != st.st_mtim.tv_sec ||
                                st_after.st_mtim.tv_nsec != st.st_mtim.tv_nsec || !db.size(db_size_after) ||
                                db_size_after != db_size);
    bool wal_moved = false;
    if (last_frame) {
        unsigned char hdr2[kWalHeaderSize], fh2[kWalFrameHeaderSize];
        wal_moved = !pread_full(wal.fd, hdr2, sizeof hdr2, 0) ||
                    !pread_full(wal.fd, fh2, sizeof fh2, wal_frame_offset(psz, last_frame));
        if (!wal_moved) {
            auto h2 = parse_wal_header(hdr2);
            auto f2 = parse_frame_header(fh2);
            wal_moved = !h2 || h2->salt1 != pos.salt1 || h2->salt2 != pos.salt2 || f2.cksum1 != pos.cksum1 ||
                        f2.cksum2 != pos.cksum2;
        }
    }
    if (snapshot_torn_.load() || db_moved || wal_moved) {
        writer->abort();
        snapshots_torn_.fetch_add(1);
        std::string what = snapshot_torn_.load() ? "a checkpoint wrote the database file"
                           : db_moved            ? "the database file changed on disk"
                                                 : "the WAL changed under the snapshot position";
        return make_error(ErrorKind::Cancelled, what + " while the snapshot was read; retrying", "SnapshotTorn");
    }
    // Every page has been read: a write from now on cannot tear what was read.
    auto put = writer->finish();
    if (!put) return std::move(put).error();

    log::info(path_ + ": generation " + gen + " started (" + snapshot_reason_ + "): " + std::to_string(db_pages) +
              " pages, " + std::to_string(put->size) + " bytes");
    generation_ = gen;
    seq_ = 0;
    prev_sha256_ = *sha;
    page_size_ = psz;
    captured_ = pos;
    if (wal_hdr) epoch_hdr_ = wal_hdr;
    tee_.trim(pos.salt1, pos.salt2, pos.frame);
    pending_.clear();
    pending_bytes_ = 0;
    inflight_.reset();
    need_snapshot_ = false;
    broken_outside_wal_.store(false);
    parent_generation_.clear();
    parent_seq_ = 0;
    wal_bytes_since_snapshot_ = 0;
    last_snapshot_time_ = Clock::now();
    snapshot_seen_ = last_snapshot_time_;
    unshipped_bytes_.store(0);
    {
        std::lock_guard slock(status_mu_);
        ++snapshots_uploaded_;
        bytes_uploaded_ += put->size;
        if (h.last_commit_us) last_durable_commit_us_ = h.last_commit_us;
    }
    if (pos.salt1 || pos.salt2) {
        // As at a start that continues (continue_from): from here on a new
        // epoch in the wal-index must be accounted for.
        std::lock_guard olock(obs_mu_);
        if (last_noted_salt1_ == 0 && last_noted_salt2_ == 0) {
            last_noted_salt1_ = pos.salt1;
            last_noted_salt2_ = pos.salt2;
            last_noted_frame_ = pos.frame;
        }
    }
    mark_durable(pos, idx0);
    write_state_file(false);
    return {};
}

Result<std::string> Replicator::snapshot_now() {
    if (!enabled_) return make_error(ErrorKind::InvalidArgument, "replication is off for this database (skip)", "Disabled");
    std::unique_lock net(net_mu_);
    Lock lock(upload_mu_);
    request_snapshot("requested by bottomless_snapshot()");
    // A read torn by a WAL restart that began just before the snapshot (or
    // a checkpoint in another process) is detected and read again; a few
    // attempts, then the error. (Snapshots read under a pinned read mark,
    // issue 9, will make this loop unnecessary.)
    Status st;
    for (int attempt = 0; attempt < 5; ++attempt) {
        retry_after_ = {};
        st = step(lock, true);
        if (st || st.error().code != "SnapshotTorn") break;
    }
    if (!st) return std::move(st).error();
    if (need_snapshot_) return make_error(ErrorKind::InvalidArgument, "the database is empty: nothing to snapshot", "Empty");
    std::string generation = generation_;
    const bool quiet = nothing_to_ship_locked();
    lock.unlock();
    net.unlock();
    if (quiet) tee_.drop_spares();  // the snapshot took what the tee held (pool_step does the same)
    return generation;
}

}  // namespace bottomless::replicator
