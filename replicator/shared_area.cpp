// The memory-mapped area the processes of one database share (shared_area.h).
#include "replicator/shared_area.h"

#include <fcntl.h>
#include <signal.h>
#include <linux/futex.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "replicator/util.h"

namespace bottomless::replicator {

namespace {

constexpr uint64_t kMagic = 0x314d48535342ull;  // "BSSHM1", little end first
constexpr size_t kMapBytes = 4096;
// The byte locked for snapshots (shared_area.h), past the mapped fields.
constexpr off_t kSnapshotByte = 2048;

static_assert(std::atomic<uint64_t>::is_always_lock_free, "shared 64-bit atomics must be lock-free");

uint64_t pack(uint32_t salt1, uint32_t salt2) { return (static_cast<uint64_t>(salt1) << 32) | salt2; }

int open_file(const std::string& path) {
    // O_NOFOLLOW: a symlink planted at this name must not make us map another file.
    return ::open(path.c_str(), O_RDWR | O_CREAT | O_NOFOLLOW | O_CLOEXEC, 0644);
}

// F_OFD_SETLK on the snapshot byte; the description is closed when not granted.
SharedArea::Hold hold(const std::string& path, short type) {
    int fd = open_file(path);
    if (fd < 0) return SharedArea::Hold();
    struct flock fl{};
    fl.l_type = type;
    fl.l_whence = SEEK_SET;
    fl.l_start = kSnapshotByte;
    fl.l_len = 1;
    for (;;) {
        if (::fcntl(fd, F_OFD_SETLK, &fl) == 0) return SharedArea::Hold(fd);
        if (errno != EINTR) break;
    }
    ::close(fd);
    return SharedArea::Hold();
}

// A (salts, frame) pair one writer updates as publish_durable() does: stable
// when the salts read before and after the frame agree.
void read_pair(const std::atomic<uint64_t>& salts_in, const std::atomic<uint64_t>& frame_in, uint64_t& salts,
               uint64_t& frame) {
    for (;;) {
        salts = salts_in.load();
        frame = frame_in.load();
        if (salts_in.load() == salts) return;
    }
}

// Process-shared futexes on the mapped file (no FUTEX_PRIVATE_FLAG).
void futex_wait(std::atomic<uint32_t>& word, uint32_t seen, std::chrono::milliseconds timeout) {
    if (timeout.count() <= 0) return;
    struct timespec ts{};
    ts.tv_sec = static_cast<time_t>(timeout.count() / 1000);
    ts.tv_nsec = static_cast<long>(timeout.count() % 1000) * 1000000L;
    ::syscall(SYS_futex, reinterpret_cast<uint32_t*>(&word), FUTEX_WAIT, seen, &ts, nullptr, 0);
}
void futex_wake(std::atomic<uint32_t>& word) {
    ::syscall(SYS_futex, reinterpret_cast<uint32_t*>(&word), FUTEX_WAKE, INT32_MAX, nullptr, nullptr, 0);
}

}  // namespace

struct SharedArea::Layout {
    std::atomic<uint64_t> magic;
    std::atomic<uint64_t> leader_pid;
    std::atomic<uint64_t> durable_salts;
    std::atomic<uint64_t> durable_frame;
    std::atomic<uint64_t> durable_us;
    std::atomic<uint64_t> ended_salts;
    std::atomic<uint64_t> ended_frame;
    std::atomic<uint64_t> commits;
    std::atomic<uint64_t> followers;
    std::atomic<uint64_t> sync;
    // A follower's sync commit (one at a time: its process holds the WAL
    // write lock): the commit frame's position, then the request number;
    // the leader answers with the number and whether it is durable.
    std::atomic<uint64_t> sync_salts;
    std::atomic<uint64_t> sync_frame;
    std::atomic<uint32_t> sync_req;
    std::atomic<uint32_t> sync_ack;
    std::atomic<uint32_t> sync_ok;
    // seq * 4 + state: 0 posted, 1 claimed by the leader (it ships), 2
    // cancelled by the follower (it gave up: the leader must not ship it).
    std::atomic<uint32_t> sync_turn;
    std::atomic<uint32_t> sync_claimer;  // the pid of the leader that claimed the last request
};
static_assert(std::atomic<uint32_t>::is_always_lock_free && sizeof(std::atomic<uint32_t>) == 4);
static_assert(sizeof(SharedArea::Layout) <= kSnapshotByte);

Result<std::unique_ptr<SharedArea>> SharedArea::open(const std::string& db_path) {
    std::unique_ptr<SharedArea> a(new SharedArea());
    a->path_ = db_path + "-bottomless-shm";
    Fd fd(open_file(a->path_));
    struct stat st{};
    if (fd.fd < 0 || ::fstat(fd.fd, &st) != 0 ||
        (st.st_size < static_cast<off_t>(kMapBytes) && ::ftruncate(fd.fd, kMapBytes) != 0))
        return make_error(ErrorKind::Io,
                          "cannot use " + a->path_ + ": " + std::strerror(errno) +
                              " (bottomless shares the replication position between processes through it; check "
                              "the database directory's permissions and free space)",
                          "SharedArea");
    void* p = ::mmap(nullptr, kMapBytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd.fd, 0);
    if (p == MAP_FAILED)
        return make_error(ErrorKind::Io, "cannot map " + a->path_ + ": " + std::strerror(errno), "SharedArea");
    a->map_ = static_cast<Layout*>(p);  // a zero-filled new file is a valid empty area
    if (a->map_->magic.load() != kMagic) {
        uint64_t expected = a->map_->magic.load();
        if (expected != kMagic) a->map_->magic.compare_exchange_strong(expected, kMagic);
    }
    return a;
}

SharedArea::~SharedArea() {
    if (map_) ::munmap(map_, kMapBytes);
}

void SharedArea::publish_leader(long pid) { map_->leader_pid.store(static_cast<uint64_t>(pid)); }

void SharedArea::publish_durable(uint32_t salt1, uint32_t salt2, uint64_t frame) {
    // One writer (the leader). A new epoch's salts go in with the frame at
    // 0 first, so a reader never pairs them with the old epoch's frame
    // (durable() below: salts read before and after the frame agree).
    const uint64_t salts = pack(salt1, salt2);
    if (map_->durable_salts.load() != salts) {
        map_->durable_frame.store(0);
        map_->durable_salts.store(salts);
    }
    map_->durable_frame.store(frame);
    map_->durable_us.store(static_cast<uint64_t>(now_us()));
}

void SharedArea::publish_mode(bool sync) { map_->sync.store(sync ? 1 : 0); }
bool SharedArea::leader_sync() const { return map_->sync.load() != 0; }

uint64_t SharedArea::commits() const { return map_->commits.load(); }
long SharedArea::followers() const { return static_cast<long>(map_->followers.load()); }

void SharedArea::ended(uint64_t& salts, uint64_t& frame) const { read_pair(map_->ended_salts, map_->ended_frame, salts, frame); }

long SharedArea::leader_pid() const { return static_cast<long>(map_->leader_pid.load()); }

void SharedArea::durable(uint64_t& salts, uint64_t& frame) const {
    read_pair(map_->durable_salts, map_->durable_frame, salts, frame);
}

int64_t SharedArea::durable_time_us() const { return static_cast<int64_t>(map_->durable_us.load()); }

bool SharedArea::covers(const WalIndexHeader& h) const { return unshipped_frames(h) == 0; }

uint64_t SharedArea::unshipped_frames(const WalIndexHeader& h) const {
    if (h.mx_frame == 0) return 0;
    uint64_t salts = 0, frame = 0;
    durable(salts, frame);
    if (salts != pack(h.salt1, h.salt2)) return UINT64_MAX;
    return frame >= h.mx_frame ? 0 : h.mx_frame - frame;
}

void SharedArea::note_follower(long pid) { map_->followers.store(static_cast<uint64_t>(pid)); }

void SharedArea::note_follower_commit() {
    // Also says again that followers exist (a leader started since their
    // open does not know them otherwise; the flag is never cleared).
    if (map_->followers.load(std::memory_order_relaxed) == 0) map_->followers.store(static_cast<uint64_t>(::getpid()));
    map_->commits.fetch_add(1);
}

void SharedArea::note_epoch_end(uint32_t salt1, uint32_t salt2, uint64_t frame) {
    // Written under the WAL write lock (a restart, or a RESTART/TRUNCATE
    // checkpoint, holds it): one writer at a time, as publish_durable().
    map_->ended_frame.store(0);
    map_->ended_salts.store(pack(salt1, salt2));
    map_->ended_frame.store(frame);
}

uint32_t SharedArea::post_sync_request(uint32_t salt1, uint32_t salt2, uint64_t frame) {
    map_->sync_salts.store(pack(salt1, salt2));
    map_->sync_frame.store(frame);
    const uint32_t seq = map_->sync_req.load() + 1;
    map_->sync_turn.store(seq * 4);
    map_->sync_req.store(seq);
    futex_wake(map_->sync_req);
    return seq;
}

std::optional<bool> SharedArea::wait_sync_answer(uint32_t seq, std::chrono::steady_clock::time_point deadline) {
    for (;;) {
        const uint32_t a = map_->sync_ack.load();
        if (a == seq) return map_->sync_ok.load() != 0;
        const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
        if (left.count() <= 0) {
            // Cancelled before the leader claimed it: it will never be shipped.
            uint32_t posted = seq * 4;
            if (map_->sync_turn.compare_exchange_strong(posted, seq * 4 + 2)) return std::nullopt;
            // Claimed: the leader is shipping it (bounded by its own
            // sync_timeout). Its answer decides, unless it dies first.
            const long pid = static_cast<long>(map_->sync_claimer.load());
            if (pid <= 0 || (::kill(static_cast<pid_t>(pid), 0) != 0 && errno == ESRCH)) return std::nullopt;
        }
        futex_wait(map_->sync_ack, a, left.count() <= 0 ? std::chrono::milliseconds(100)
                                                        : std::min(left, std::chrono::milliseconds(100)));
    }
}

bool SharedArea::wait_sync_request(std::chrono::milliseconds timeout, uint32_t& seq, uint32_t& salt1, uint32_t& salt2,
                                   uint64_t& frame) {
    // A request not yet claimed or cancelled, claimed now; else wait.
    for (int pass = 0; pass < 2; ++pass) {
        seq = map_->sync_req.load();
        uint32_t posted = seq * 4;
        // The claimer's pid first: a follower that finds the request claimed
        // waits while that process lives.
        const uint32_t before = map_->sync_claimer.exchange(static_cast<uint32_t>(::getpid()));
        if (seq != 0 && map_->sync_turn.compare_exchange_strong(posted, seq * 4 + 1)) {
            const uint64_t salts = map_->sync_salts.load();
            salt1 = static_cast<uint32_t>(salts >> 32);
            salt2 = static_cast<uint32_t>(salts);
            frame = map_->sync_frame.load();
            return true;
        }
        map_->sync_claimer.store(before);
        if (pass == 0) futex_wait(map_->sync_req, seq, timeout);
    }
    return false;
}

void SharedArea::answer_sync(uint32_t seq, bool ok) {
    map_->sync_ok.store(ok ? 1 : 0);
    map_->sync_ack.store(seq);
    futex_wake(map_->sync_ack);
}

void SharedArea::interrupt_sync_wait() { futex_wake(map_->sync_req); }

SharedArea::Hold& SharedArea::Hold::operator=(Hold&& o) noexcept {
    if (this != &o) {
        release();
        fd_ = o.fd_;
        o.fd_ = -1;
    }
    return *this;
}

void SharedArea::Hold::release() noexcept {
    // Closing the description drops its lock (the file carries no POSIX
    // lock of SQLite's: closing it disturbs nothing else).
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
}

SharedArea::Hold SharedArea::try_hold_shared() const { return hold(path_, F_RDLCK); }
SharedArea::Hold SharedArea::try_hold_exclusive() const { return hold(path_, F_WRLCK); }

}  // namespace bottomless::replicator
