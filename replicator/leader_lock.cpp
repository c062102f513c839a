// The leader election of leader_lock.h: open-file-description locks on two
// bytes per database of one of "<dir>/.bottomless-locks.0".."f", one
// descriptor per file shared by the process's databases there.
#include "replicator/leader_lock.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <set>
#include <string>
#include <thread>

namespace bottomless::replicator {

struct LeaderLock::DirFile {
    int fd = -1;
    std::string path;
    // Bytes held through this description by LeaderLocks of this process:
    // the kernel sees one owner for them all, so two LeaderLocks of one
    // process (a replicator and a read replica of one file, say) exclude
    // each other here, as two processes do in the kernel.
    std::mutex mu;
    std::set<int64_t> held;  // guarded by mu
    DirFile() = default;
    DirFile(const DirFile&) = delete;
    DirFile& operator=(const DirFile&) = delete;
    // Closing the description releases whatever OFD locks are left on it
    // (none: every LeaderLock unlocks its bytes, and holds this file).
    ~DirFile() {
        if (fd >= 0) ::close(fd);
    }
};

namespace {

// The directory's lock files: ".bottomless-locks.0" to ".f", a database's
// by the low 4 bits of its name's hash. The kernel walks every lock of an
// inode at each lock operation (posix_lock_inode): with one file for 2000
// open databases that walk was a fifth of an open's time, and it grows with
// the number open. Sixteen files divide it by 16 for at most 16 descriptors
// per directory.
constexpr const char* kDirLockName = ".bottomless-locks";
constexpr unsigned kShards = 16;
// Offsets below this are not used (bytes 0 and 1 of the old per-database
// file kept their meaning there; here they are simply left alone).
constexpr int64_t kFirstByte = 2;

// The process's open directory lock files by path. Its mutex is held only to
// look up or insert an entry, never while a file is opened.
std::mutex& dirs_mu() {
    static auto* mu = new std::mutex();
    return *mu;
}
std::map<std::string, std::weak_ptr<LeaderLock::DirFile>>& dirs() {
    static auto* m = new std::map<std::string, std::weak_ptr<LeaderLock::DirFile>>();
    return *m;
}

// FNV-1a, 64 bits: the same in every build, so every process finds the same
// bytes for a database. Two names of one directory colliding (about 1 in
// 10^11 for 10 000 databases) would only make one of them read-only in a
// second process while the first leads the other.
uint64_t name_hash(const std::string& s) {
    uint64_t h = 1469598103934665603ull;
    for (unsigned char c : s) {
        h ^= c;
        h *= 1099511628211ull;
    }
    return h;
}

// F_OFD_SETLK on one byte; true when granted. `type`: F_WRLCK or F_UNLCK.
bool ofd_lock(int fd, int64_t byte, short type, int& err) {
    struct flock fl{};
    fl.l_type = type;
    fl.l_whence = SEEK_SET;
    fl.l_start = static_cast<off_t>(byte);
    fl.l_len = 1;
    fl.l_pid = 0;  // required for OFD locks
    for (;;) {
        if (::fcntl(fd, F_OFD_SETLK, &fl) == 0) return true;
        if (errno == EINTR) continue;
        err = errno;
        return false;
    }
}

// Takes `byte` for one LeaderLock: not held by another of this process,
// then the OFD lock. `err` EAGAIN when either holds it.
bool take(LeaderLock::DirFile& f, int64_t byte, int& err) {
    {
        std::lock_guard lock(f.mu);
        if (!f.held.insert(byte).second) {
            err = EAGAIN;
            return false;
        }
    }
    if (ofd_lock(f.fd, byte, F_WRLCK, err)) return true;
    std::lock_guard lock(f.mu);
    f.held.erase(byte);
    return false;
}

void give(LeaderLock::DirFile& f, int64_t byte) {
    int err = 0;
    (void)ofd_lock(f.fd, byte, F_UNLCK, err);
    std::lock_guard lock(f.mu);
    f.held.erase(byte);
}

// An older build's leader: an OFD write lock on byte 0 of the database's
// own lock file, held by another open file description.
bool old_build_leads(int fd) {
    struct flock fl{};
    fl.l_type = F_WRLCK;
    fl.l_whence = SEEK_SET;
    fl.l_start = 0;
    fl.l_len = 1;
    fl.l_pid = 0;
    return ::fcntl(fd, F_OFD_GETLK, &fl) == 0 && fl.l_type != F_UNLCK;
}

long read_pid(int fd) {
    char buf[32] = {};
    ssize_t n = ::pread(fd, buf, sizeof buf - 1, 0);
    if (n <= 0) return 0;
    char* end = nullptr;
    long pid = std::strtol(buf, &end, 10);
    return pid > 0 ? pid : 0;
}

int open_pid_file(const std::string& db_path) {
    // O_NOFOLLOW: a symlink planted at this name must not make us create or
    // write another file. 0644 like SQLite's own files.
    return ::open((db_path + "-bottomless.lock").c_str(), O_RDWR | O_CREAT | O_NOFOLLOW | O_CLOEXEC, 0644);
}

// The leader's pid, for the others' messages; rewritten only when another
// pid is there (a reopen in the same process writes nothing). Best effort.
void record_pid(int fd) {
    const long pid = static_cast<long>(::getpid());
    if (read_pid(fd) == pid) return;
    std::string s = std::to_string(pid) + "\n";
    if (::pwrite(fd, s.data(), s.size(), 0) != static_cast<ssize_t>(s.size())) return;
    if (::ftruncate(fd, static_cast<off_t>(s.size())) != 0) return;
}

// The database's directory, with a trailing '/'.
std::string dir_of(const std::string& db_path) {
    const auto slash = db_path.find_last_of('/');
    if (slash == std::string::npos) return "./";
    return db_path.substr(0, slash + 1);
}

// A build before the lock files were sharded leads: it holds `byte` of the
// directory's single ".bottomless-locks" (which new builds never lock: when
// the file is missing, or no old build runs, this costs one lookup).
bool unsharded_build_leads(const std::string& db_path, int64_t byte) {
    const int fd = ::open((dir_of(db_path) + kDirLockName).c_str(), O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0) return false;
    struct flock fl{};
    fl.l_type = F_WRLCK;
    fl.l_whence = SEEK_SET;
    fl.l_start = static_cast<off_t>(byte);
    fl.l_len = 1;
    fl.l_pid = 0;
    const bool held = ::fcntl(fd, F_OFD_GETLK, &fl) == 0 && fl.l_type != F_UNLCK;
    ::close(fd);
    return held;
}

Result<std::shared_ptr<LeaderLock::DirFile>> dir_file(const std::string& db_path, unsigned shard) {
    static const char* kHex = "0123456789abcdef";
    const std::string path = dir_of(db_path) + kDirLockName + "." + kHex[shard % kShards];
    {
        std::lock_guard lock(dirs_mu());
        if (auto f = dirs()[path].lock()) return f;
    }
    auto f = std::make_shared<LeaderLock::DirFile>();
    f->path = path;
    f->fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_NOFOLLOW | O_CLOEXEC, 0644);
    if (f->fd < 0)
        return make_error(ErrorKind::Io,
                          "cannot open the replication lock file " + path + ": " + std::strerror(errno) +
                              " (bottomless needs to create it in the database's directory; check the directory's "
                              "permissions)",
                          "LockFile");
    std::lock_guard lock(dirs_mu());
    auto& slot = dirs()[path];
    // Another thread opened it meanwhile: use that one (ours holds no lock,
    // and closing it drops no OFD lock of another description).
    if (auto other = slot.lock()) return other;
    slot = f;
    for (auto it = dirs().begin(); it != dirs().end();) it = it->second.expired() ? dirs().erase(it) : std::next(it);
    return f;
}

}  // namespace

size_t LeaderLock::open_files() {
    std::lock_guard lock(dirs_mu());
    return static_cast<size_t>(std::count_if(dirs().begin(), dirs().end(), [](auto& e) { return !e.second.expired(); }));
}

Result<LeaderLock> LeaderLock::acquire(const std::string& db_path, std::chrono::milliseconds wait) {
    LeaderLock l;
    const auto slash = db_path.find_last_of('/');
    const uint64_t hash = name_hash(slash == std::string::npos ? db_path : db_path.substr(slash + 1));
    auto dir = dir_file(db_path, static_cast<unsigned>(hash & (kShards - 1)));
    if (!dir) return std::move(dir).error();
    l.dir_ = std::move(dir).value();
    l.path_ = l.dir_->path;
    l.byte_ = kFirstByte + 2 * static_cast<int64_t>(hash >> 4);
    const auto deadline = std::chrono::steady_clock::now() + wait;
    int err = 0;
    auto pause = std::chrono::milliseconds(1);
    while (!take(*l.dir_, l.byte_ + 1, err)) {
        if (err != EAGAIN && err != EACCES)
            return make_error(ErrorKind::Io, "cannot lock " + l.path_ + ": " + std::strerror(err), "LockFile");
        if (std::chrono::steady_clock::now() >= deadline) {
            long pid = 0;
            if (int pf = open_pid_file(db_path); pf >= 0) {
                pid = read_pid(pf);
                ::close(pf);
            }
            return make_error(ErrorKind::Cancelled,
                              "another process (pid " + std::to_string(pid) + ") has been starting replication of " +
                                  db_path + " for more than " + std::to_string(wait.count() / 1000) +
                                  " s (a restore?); try again later",
                              "StartupBusy");
        }
        std::this_thread::sleep_for(pause);
        pause = std::min(pause * 2, std::chrono::milliseconds(50));
    }
    l.startup_held_ = true;
    const bool got = take(*l.dir_, l.byte_, err);
    if (!got && err != EAGAIN && err != EACCES)
        return make_error(ErrorKind::Io, "cannot lock " + l.path_ + ": " + std::strerror(err), "LockFile");
    // The pid file is opened for a moment only (no descriptor is kept).
    const int pf = open_pid_file(db_path);
    if (got && !(pf >= 0 && old_build_leads(pf)) && !unsharded_build_leads(db_path, l.byte_)) {
        l.leader_ = true;
        l.leader_pid_ = static_cast<long>(::getpid());
        if (pf >= 0) {
            record_pid(pf);
            ::close(pf);
        }
        return l;
    }
    if (got) give(*l.dir_, l.byte_);
    if (pf >= 0) {
        l.leader_pid_ = read_pid(pf);
        ::close(pf);
    }
    l.startup_done();
    return l;
}

LeaderLock::LeaderLock(LeaderLock&& o) noexcept
    : dir_(std::move(o.dir_)), byte_(o.byte_), leader_(o.leader_), startup_held_(o.startup_held_),
      leader_pid_(o.leader_pid_), path_(std::move(o.path_)) {
    o.leader_ = o.startup_held_ = false;
}

LeaderLock& LeaderLock::operator=(LeaderLock&& o) noexcept {
    if (this != &o) {
        release();
        dir_ = std::move(o.dir_);
        byte_ = o.byte_;
        leader_ = o.leader_;
        startup_held_ = o.startup_held_;
        leader_pid_ = o.leader_pid_;
        path_ = std::move(o.path_);
        o.leader_ = o.startup_held_ = false;
    }
    return *this;
}

void LeaderLock::release() noexcept {
    if (!dir_) return;
    // Explicitly: the descriptor stays open for the directory's other
    // databases (it closes with the last of them).
    if (leader_) give(*dir_, byte_);
    if (startup_held_) give(*dir_, byte_ + 1);
    leader_ = startup_held_ = false;
    dir_.reset();
}

LeaderLock::~LeaderLock() { release(); }

void LeaderLock::startup_done() {
    if (!startup_held_ || !dir_) return;
    give(*dir_, byte_ + 1);
    startup_held_ = false;
}

}  // namespace bottomless::replicator
