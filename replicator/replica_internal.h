// Internal to the replica's files (replica.cpp, replica_journal.cpp,
// replica_hydrate.cpp, replica_follow.cpp): the helpers they share and the
// replica file as seen through the lower VFS. Not part of the API.
#pragma once

#include <chrono>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>

#include "replicator/replica.h"
#include "replicator/restore.h"

namespace bottomless::replicator {

namespace replica_detail {

using Clock = std::chrono::steady_clock;

constexpr size_t kHeader = 100;  // SQLite's database header, at the start of page 1

inline void put_be32(unsigned char* p, uint32_t v) {
    p[0] = static_cast<unsigned char>(v >> 24);
    p[1] = static_cast<unsigned char>(v >> 16);
    p[2] = static_cast<unsigned char>(v >> 8);
    p[3] = static_cast<unsigned char>(v);
}
inline uint32_t get_be32(const unsigned char* p) {
    return (uint32_t{p[0]} << 24) | (uint32_t{p[1]} << 16) | (uint32_t{p[2]} << 8) | uint32_t{p[3]};
}
inline std::string errno_text(int e) { return std::strerror(e); }
inline bool valid_page_size(uint32_t ps) { return ps >= 512 && ps <= 65536 && (ps & (ps - 1)) == 0; }

// fsyncs the directory holding `path`.
bool fsync_dir_of(const std::string& path);
// The database id names S3 keys and the time-travel copy's file: it must be
// one path component (replica.cpp).
Status check_replica_db_id(const std::string& db_id);
// Where a file restored by restore_database() stands. The caller sets the
// change counter; save_state() records the file's size, mtime and inode.
ReplicaState restored_state(const std::string& bucket, const std::string& db_id, const RestoreResult& r);
// The state file next to the replica file, if it is there and understood.
std::optional<ReplicaState> load_replica_state(const std::string& db_path);
// Test hook (BOTTOMLESS_TEST_REPLICA_EXIT_AFTER_PAGES=N): the process exits
// (status 3) right after the N-th page of an apply reached the file: a
// follower killed in the middle of an apply, at a chosen point.
long exit_after_pages();

}  // namespace replica_detail

// ---- the replica file through the lower VFS ----

class Replica::File {
public:
    explicit File(sqlite3_vfs* vfs)
        : vfs_(vfs), f_(static_cast<sqlite3_file*>(::operator new(static_cast<size_t>(vfs->szOsFile)))) {
        std::memset(f_, 0, static_cast<size_t>(vfs->szOsFile));
    }
    ~File() {
        close();
        ::operator delete(f_);
    }
    File(const File&) = delete;
    File& operator=(const File&) = delete;

    Status open(const std::string& path) {
        close();
        name_ = sqlite3_create_filename(path.c_str(), (path + "-journal").c_str(), (path + "-wal").c_str(), 0, nullptr);
        if (!name_) return make_error(ErrorKind::Io, "out of memory", "OpenFailed");
        int out = 0;
        int rc = vfs_->xOpen(vfs_, name_, f_, SQLITE_OPEN_MAIN_DB | SQLITE_OPEN_READWRITE, &out);
        if (rc != SQLITE_OK) {
            if (f_->pMethods) f_->pMethods->xClose(f_);
            f_->pMethods = nullptr;
            return make_error(ErrorKind::Io, "cannot open the replica file " + path + " (SQLite error " +
                                                 std::to_string(rc) + ")",
                              "OpenFailed");
        }
        path_ = path;
        return {};
    }
    void close() {
        if (f_->pMethods) {
            f_->pMethods->xUnlock(f_, SQLITE_LOCK_NONE);
            f_->pMethods->xClose(f_);
            f_->pMethods = nullptr;
        }
        if (name_) sqlite3_free_filename(name_);
        name_ = nullptr;
    }
    bool is_open() const { return f_->pMethods != nullptr; }
    Status check(int rc, const char* what) const {
        if (rc == SQLITE_OK) return {};
        return make_error(ErrorKind::Io, std::string("cannot ") + what + " the replica file " + path_ +
                                             " (SQLite error " + std::to_string(rc) + ")",
                          "WriteFailed");
    }
    Status read(void* buf, int n, int64_t off) {
        int rc = f_->pMethods->xRead(f_, buf, n, off);
        return check(rc == SQLITE_IOERR_SHORT_READ ? SQLITE_OK : rc, "read");
    }
    Status write(const void* buf, int n, int64_t off) { return check(f_->pMethods->xWrite(f_, buf, n, off), "write"); }
    Status truncate(int64_t size) { return check(f_->pMethods->xTruncate(f_, size), "truncate"); }
    Status sync() { return check(f_->pMethods->xSync(f_, SQLITE_SYNC_NORMAL), "sync"); }
    int64_t size() {
        sqlite3_int64 s = 0;
        return f_->pMethods->xFileSize(f_, &s) == SQLITE_OK ? s : -1;
    }
    int lock(int level) { return f_->pMethods->xLock(f_, level); }
    void unlock(int level) { f_->pMethods->xUnlock(f_, level); }

private:
    sqlite3_vfs* vfs_;
    sqlite3_file* f_;
    const char* name_ = nullptr;
    std::string path_;
};

}  // namespace bottomless::replicator
