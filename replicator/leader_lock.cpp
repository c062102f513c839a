// The leader election of leader_lock.h: open-file-description locks on two
// bytes of "<db>-bottomless.lock".
#include "replicator/leader_lock.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>

namespace bottomless::replicator {

namespace {

constexpr off_t kLeaderByte = 0;
constexpr off_t kStartupByte = 1;

// F_OFD_SETLK on one byte; true when granted. `type`: F_WRLCK or F_UNLCK.
bool ofd_lock(int fd, off_t byte, short type, int& err) {
    struct flock fl{};
    fl.l_type = type;
    fl.l_whence = SEEK_SET;
    fl.l_start = byte;
    fl.l_len = 1;
    fl.l_pid = 0;  // required for OFD locks
    for (;;) {
        if (::fcntl(fd, F_OFD_SETLK, &fl) == 0) return true;
        if (errno == EINTR) continue;
        err = errno;
        return false;
    }
}

long read_pid(int fd) {
    char buf[32] = {};
    ssize_t n = ::pread(fd, buf, sizeof buf - 1, 0);
    if (n <= 0) return 0;
    char* end = nullptr;
    long pid = std::strtol(buf, &end, 10);
    return pid > 0 ? pid : 0;
}

void write_pid(int fd) {
    std::string s = std::to_string(static_cast<long>(::getpid())) + "\n";
    // Best effort: the pid only improves the others' messages.
    if (::ftruncate(fd, 0) != 0) return;
    [[maybe_unused]] ssize_t n = ::pwrite(fd, s.data(), s.size(), 0);
}

}  // namespace

Result<LeaderLock> LeaderLock::acquire(const std::string& db_path, std::chrono::milliseconds wait) {
    LeaderLock l;
    l.path_ = db_path + "-bottomless.lock";
    // O_NOFOLLOW: a symlink planted at this name must not make us create or
    // truncate another file. 0644 like SQLite's own files.
    l.fd_ = ::open(l.path_.c_str(), O_RDWR | O_CREAT | O_NOFOLLOW | O_CLOEXEC, 0644);
    if (l.fd_ < 0)
        return make_error(ErrorKind::Io,
                          "cannot open the replication lock file " + l.path_ + ": " + std::strerror(errno) +
                              " (bottomless needs to create it next to the database; check the directory's "
                              "permissions)",
                          "LockFile");
    const auto deadline = std::chrono::steady_clock::now() + wait;
    int err = 0;
    auto pause = std::chrono::milliseconds(1);
    while (!ofd_lock(l.fd_, kStartupByte, F_WRLCK, err)) {
        if (err != EAGAIN && err != EACCES)
            return make_error(ErrorKind::Io, "cannot lock " + l.path_ + ": " + std::strerror(err), "LockFile");
        if (std::chrono::steady_clock::now() >= deadline)
            return make_error(ErrorKind::Cancelled,
                              "another process (pid " + std::to_string(read_pid(l.fd_)) +
                                  ") has been starting replication of " + db_path + " for more than " +
                                  std::to_string(wait.count() / 1000) + " s (a restore?); try again later",
                              "StartupBusy");
        std::this_thread::sleep_for(pause);
        pause = std::min(pause * 2, std::chrono::milliseconds(50));
    }
    l.startup_held_ = true;
    if (ofd_lock(l.fd_, kLeaderByte, F_WRLCK, err)) {
        l.leader_ = true;
        l.leader_pid_ = static_cast<long>(::getpid());
        write_pid(l.fd_);
        return l;
    }
    if (err != EAGAIN && err != EACCES)
        return make_error(ErrorKind::Io, "cannot lock " + l.path_ + ": " + std::strerror(err), "LockFile");
    l.leader_pid_ = read_pid(l.fd_);
    l.startup_done();
    return l;
}

LeaderLock::LeaderLock(LeaderLock&& o) noexcept
    : fd_(o.fd_), leader_(o.leader_), startup_held_(o.startup_held_), leader_pid_(o.leader_pid_),
      path_(std::move(o.path_)) {
    o.fd_ = -1;
}

LeaderLock& LeaderLock::operator=(LeaderLock&& o) noexcept {
    if (this != &o) {
        if (fd_ >= 0) ::close(fd_);
        fd_ = o.fd_;
        leader_ = o.leader_;
        startup_held_ = o.startup_held_;
        leader_pid_ = o.leader_pid_;
        path_ = std::move(o.path_);
        o.fd_ = -1;
    }
    return *this;
}

LeaderLock::~LeaderLock() {
    // Closing the open file description releases its OFD locks.
    if (fd_ >= 0) ::close(fd_);
}

void LeaderLock::startup_done() {
    if (!startup_held_ || fd_ < 0) return;
    int err = 0;
    (void)ofd_lock(fd_, kStartupByte, F_UNLCK, err);
    startup_held_ = false;
}

}  // namespace bottomless::replicator
