// Read replicas and time travel: see replica.h and docs/SEMANTICS.md "Read replicas".
#include "replicator/replica.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <future>
#include <map>
#include <random>

#include <nlohmann/json.hpp>

#include "replicator/bucket.h"
#include "replicator/pool.h"
#include "replicator/restore.h"
#include "replicator/util.h"
#include "s3/log.h"

namespace bottomless::replicator {

namespace {

using json = nlohmann::json;
using Clock = std::chrono::steady_clock;

constexpr size_t kHeader = 100;  // SQLite's database header, at the start of page 1
// While readers hold SHARED, the follower keeps PENDING (which keeps new
// readers out) at most this long, then lets them in again and retries later:
// a long read transaction delays the apply, never the other readers.
constexpr auto kPendingHold = std::chrono::milliseconds(10);
constexpr auto kPendingBackoff = std::chrono::milliseconds(20);
// Listing the generations (how a new one is found: a snapshot on the
// writer, its restart, a restore elsewhere) costs LISTs; the next segment's
// GET costs one request whether or not it is there. So the follower lists
// only once it has found nothing new for a *time* (not a count of polls: at
// a short poll every gap between the writer's batches is many misses),
// kListAfter(poll) = max(3 polls, 5 s), then again after twice that gap,
// and so on up to kListAtMost(poll) = max(30 polls, 30 s); a new segment
// starts the schedule over. A new generation is thus found within
// kListAfter of the writer's last segment in the old one, and within
// kListAtMost (plus a poll and the listing) in any case.
std::chrono::milliseconds list_after(std::chrono::milliseconds poll) {
    return std::max<std::chrono::milliseconds>(poll * 3, std::chrono::seconds(5));
}
std::chrono::milliseconds list_at_most(std::chrono::milliseconds poll) {
    return std::max<std::chrono::milliseconds>(poll * 30, std::chrono::seconds(30));
}
// A step that failed (S3 refused or unreachable, an apply or a hydration
// that failed) is tried again after a back-off, not at the next poll: the
// n-th failure in a row waits kRetryFirst x 2^(n-1), at least a poll, at
// most max(kRetryMost, poll); a step that works resets it. So a refusal the
// client does not retry (403) costs ~10 requests a minute, not one a poll,
// and a hydration that keeps failing is not a download per poll.
constexpr std::chrono::milliseconds kRetryFirst{100};
constexpr std::chrono::milliseconds kRetryMost{5000};
std::chrono::milliseconds retry_backoff(uint64_t failures, std::chrono::milliseconds poll) {
    const auto most = std::max(kRetryMost, poll);
    auto wait = kRetryFirst;
    for (uint64_t i = 1; i < failures && wait < most; ++i) wait *= 2;
    return std::clamp(wait, std::min(poll, most), most);
}

void put_be32(unsigned char* p, uint32_t v) {
    p[0] = static_cast<unsigned char>(v >> 24);
    p[1] = static_cast<unsigned char>(v >> 16);
    p[2] = static_cast<unsigned char>(v >> 8);
    p[3] = static_cast<unsigned char>(v);
}
uint32_t get_be32(const unsigned char* p) {
    return (uint32_t{p[0]} << 24) | (uint32_t{p[1]} << 16) | (uint32_t{p[2]} << 8) | uint32_t{p[3]};
}

std::string errno_text(int e) { return std::strerror(e); }

json position_json(const WalPosition& p) {
    return {{"salt1", p.salt1}, {"salt2", p.salt2}, {"frame", p.frame}, {"cksum1", p.cksum1}, {"cksum2", p.cksum2}};
}

bool fsync_dir_of(const std::string& path) {
    std::string dir = path.substr(0, path.find_last_of('/') + 1);
    if (dir.empty()) dir = ".";
    int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) return false;
    const bool ok = ::fsync(fd) == 0;
    ::close(fd);
    return ok;
}

std::string cache_dir() {
    // XDG: a relative XDG_CACHE_HOME is invalid and ignored.
    const char* xdg = std::getenv("XDG_CACHE_HOME");
    const char* home = std::getenv("HOME");
    std::string base = xdg && *xdg == '/' ? xdg : home && *home ? std::string(home) + "/.cache" : "/tmp";
    return base + "/bottomless";
}

// The database id names S3 keys and the time-travel copy's file: it must be
// one path component (validate_db_id's alphabet: no '/', no NUL, not "." or
// ".."). Checked again here, before any request or file, whoever built the
// configuration (load_config() checks it too).
Status check_replica_db_id(const std::string& db_id) {
    if (auto st = validate_db_id(db_id); !st)
        return make_error(ErrorKind::InvalidArgument,
                          "a replica cannot use this database id: " + st.error().message +
                              "; set database_id= (or LIBSQL_BOTTOMLESS_DATABASE_ID) to the id the writer uses",
                          "BadDatabaseId");
    return {};
}

// The file name of a time-travel copy under cache_dir(): the id (checked by
// check_replica_db_id()), the time and a random tail, so two opens never
// share a file.
Result<std::string> time_travel_file_name(const std::string& db_id, int64_t at_us) {
    if (auto st = check_replica_db_id(db_id); !st) return std::move(st).error();
    std::random_device rd;
    char rnd[9];
    std::snprintf(rnd, sizeof rnd, "%08x", static_cast<unsigned>(rd()));
    std::string name = db_id + "@" + std::to_string(at_us) + "-" + std::to_string(::getpid()) + "-" + rnd + ".db";
    // Belt and braces: one component, nothing the directory could be left by.
    if (name.find('/') != std::string::npos || name.find('\0') != std::string::npos)
        return make_error(ErrorKind::InvalidArgument, "the time-travel copy's name is not a plain file name", "BadDatabaseId");
    return name;
}

// The in-process registry: one Replica per replica file. Its mutex guards
// the map only and is held just to look up or change an entry, never across
// S3 requests, file I/O or a join (issue 10): opening replica A never waits
// for replica B's hydration. The first opener of a file starts it outside
// the lock; the others wait on that entry's future, for that file only.
using Acquired = Result<std::shared_ptr<Replica>>;
struct RegistryEntry {
    std::weak_ptr<Replica> replica;          // the running replica, once started
    std::shared_future<Acquired> starting;   // valid while its first opener starts it
};
std::mutex& registry_mu() {
    static std::mutex mu;
    return mu;
}
std::map<std::string, RegistryEntry>& registry() {  // guarded by registry_mu()
    static std::map<std::string, RegistryEntry> r;
    return r;
}

}  // namespace

std::string replica_state_json(const ReplicaState& s) {
    return json{{"format", 1},
                {"kind", "replica"},
                {"bucket", s.bucket},
                {"db_id", s.db_id},
                {"generation", s.generation},
                {"seq", s.seq},
                {"position", position_json(s.position)},
                {"last_sha256", s.last_sha256},
                {"page_size", s.page_size},
                {"db_pages", s.db_pages},
                {"last_commit_us", s.last_commit_us},
                {"counter", s.counter},
                {"applying", s.applying},
                {"db_size", s.db_size},
                {"db_mtime_ns", s.db_mtime_ns},
                {"db_ino", s.db_ino}}
        .dump();
}

std::optional<ReplicaState> parse_replica_state(std::string_view text) {
    json j = parse_untrusted_json(text, 64 * 1024);
    if (j.is_discarded() || !j.is_object()) return std::nullopt;
    try {
        if (j.at("format").get<int>() != 1 || j.at("kind").get<std::string>() != "replica") return std::nullopt;
        ReplicaState s;
        s.bucket = j.at("bucket").get<std::string>();
        s.db_id = j.at("db_id").get<std::string>();
        s.generation = j.at("generation").get<std::string>();
        s.seq = j.at("seq").get<uint64_t>();
        const json& p = j.at("position");
        s.position = {p.at("salt1").get<uint32_t>(), p.at("salt2").get<uint32_t>(), p.at("frame").get<uint64_t>(),
                      p.at("cksum1").get<uint32_t>(), p.at("cksum2").get<uint32_t>()};
        s.last_sha256 = j.at("last_sha256").get<std::string>();
        s.page_size = j.at("page_size").get<uint32_t>();
        s.db_pages = j.at("db_pages").get<uint32_t>();
        s.last_commit_us = j.at("last_commit_us").get<int64_t>();
        s.counter = j.at("counter").get<uint32_t>();
        s.applying = j.at("applying").get<bool>();
        s.db_size = j.at("db_size").get<int64_t>();
        s.db_mtime_ns = j.at("db_mtime_ns").get<int64_t>();
        s.db_ino = j.at("db_ino").get<uint64_t>();
        return s;
    } catch (const std::exception&) {
        return std::nullopt;
    }
}

namespace {
// Where a file restored by restore_database() stands. The caller sets the
// change counter; save_state() records the file's size, mtime and inode.
ReplicaState restored_state(const std::string& bucket, const std::string& db_id, const RestoreResult& r) {
    ReplicaState s;
    s.bucket = bucket;
    s.db_id = db_id;
    s.generation = r.generation;
    s.seq = r.seq;
    s.position = r.position;
    s.last_sha256 = r.last_sha256;
    s.page_size = r.page_size;
    s.db_pages = r.db_pages;
    s.last_commit_us = r.last_commit_us;
    return s;
}

// The state file next to the replica file, if it is there and understood.
std::optional<ReplicaState> load_replica_state(const std::string& db_path) {
    std::string text;
    Fd fd(::open((db_path + "-bottomless-replica").c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW));
    if (fd.fd < 0) return std::nullopt;
    char buf[4096];
    for (ssize_t n; (n = ::read(fd.fd, buf, sizeof buf)) > 0 && text.size() < 65536;) text.append(buf, static_cast<size_t>(n));
    return parse_replica_state(text);
}
}  // namespace

void make_legacy_header(unsigned char* h, uint32_t counter, uint32_t db_pages) {
    h[18] = 1;  // file format write version: legacy (rollback journal)
    h[19] = 1;  // read version
    put_be32(h + 24, counter);
    put_be32(h + 28, db_pages);
    put_be32(h + 92, counter);  // "version-valid-for": makes the in-header size trusted
}

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

// ---- opening ----

Replica::Replica(std::string path, ReplicatorConfig cfg, sqlite3_vfs* lower)
    : path_(std::move(path)), cfg_(std::move(cfg)), lower_(lower) {}

Replica::~Replica() {
    // The follower may be in a hydration: cancel it (downloads stop at their
    // next bytes; the image is removed, the file left as its state proves
    // it), so the join below waits at most for one request's deadline, a
    // local in-place write under way, or one apply.
    closing_.store(true);
    {
        std::lock_guard lock(mu_);
        stop_ = true;
    }
    cv_.notify_all();
    if (thread_.joinable()) thread_.join();
    file_.reset();
    if (!cfg_.replica_at_us) {
        // Forget the file (unless a new Replica of it started meanwhile): the
        // registry holds only files that are open.
        std::lock_guard reg(registry_mu());
        if (auto it = registry().find(path_);
            it != registry().end() && it->second.replica.expired() && !it->second.starting.valid())
            registry().erase(it);
    }
    if (file_name_) sqlite3_free_filename(file_name_);
    // A time-travel copy is ours alone: nothing to manage for the user.
    // (Only once path_ names the private copy: before that it is the
    // application's own file name.)
    if (owns_copy_) ::unlink(path_.c_str());
}

Result<std::shared_ptr<Replica>> Replica::acquire(const std::string& path, const ReplicatorConfig& cfg,
                                                  sqlite3_vfs* lower) {
    // Creates and starts a new Replica (S3 requests, a hydration): called
    // with no lock held. Exceptions become errors so the waiters of this
    // file always get an answer.
    if (auto st = check_replica_db_id(cfg.db_id); !st) return std::move(st).error();
    auto create = [&]() -> Acquired {
        try {
            std::shared_ptr<Replica> r(new Replica(path, cfg, lower));
            s3::ClientConfig c = cfg.s3;
            // A poll that cannot reach S3 gives up soon and tries again at the next one.
            c.retry.max_elapsed = std::min<std::chrono::milliseconds>(
                c.retry.max_elapsed, std::max<std::chrono::milliseconds>(std::chrono::seconds(5), cfg.replica_poll * 5));
            if (!c.connection_pool) c.connection_pool = shared_connection_pool(c.endpoint, c.ca_bundle, c.verify_tls);
            use_process_request_budget(c, cfg.process_max_requests_per_second);  // the process's request cap (pool.h)
            r->client_ = std::make_unique<s3::Client>(std::move(c));
            Status st = cfg.replica_at_us ? r->init_time_travel() : r->start();
            if (!st) return std::move(st).error();
            return r;
        } catch (const std::bad_alloc&) {
            return make_error(ErrorKind::Io, "out of memory opening the replica " + path, "OutOfMemory");
        } catch (const std::exception& e) {
            return make_error(ErrorKind::Io, "cannot open the replica " + path + ": " + e.what(), "OpenFailed");
        }
    };
    // Time travel: a private copy per open, never shared.
    if (cfg.replica_at_us) return create();

    std::promise<Acquired> promise;
    std::shared_future<Acquired> other;
    {
        std::lock_guard reg(registry_mu());
        RegistryEntry& e = registry()[path];
        if (auto r = e.replica.lock()) return r;
        if (e.starting.valid()) other = e.starting;
        else e.starting = promise.get_future().share();
    }
    // Another connection is starting this file: wait for it (this file
    // only) and share its replica, or its error.
    if (other.valid()) return other.get();

    Acquired res = create();
    {
        std::lock_guard reg(registry_mu());
        auto it = registry().find(path);
        if (it != registry().end()) {
            it->second.starting = {};
            if (res) it->second.replica = *res;
            else if (it->second.replica.expired()) registry().erase(it);
        }
    }
    promise.set_value(res);
    // On failure the Replica is destroyed here, outside the registry lock.
    return res;
}

Status Replica::init_time_travel() {
    // Before any request or file: the id names the copy (and S3 keys).
    auto name = time_travel_file_name(cfg_.db_id, *cfg_.replica_at_us);
    if (!name) return std::move(name).error();
    auto cipher = open_cipher(*client_, cfg_.bucket, cfg_.db_id, cfg_.encryption, /*create=*/false);
    if (!cipher) return std::move(cipher).error();
    cipher_ = *cipher;
    const std::string dir = cache_dir();
    std::error_code ec;
    std::filesystem::create_directories(dir, ec);  // the pages may be secrets: private
    if (ec) return make_error(ErrorKind::Io, "cannot create the cache directory " + dir + ": " + ec.message(), "OpenFailed");
    (void)::chmod(dir.c_str(), 0700);
    path_ = dir + "/" + *name;
    owns_copy_ = true;  // from here the destructor removes the copy (also a partial one)
    RestoreOptions o;
    o.until_us = cfg_.replica_at_us;
    o.cipher = cipher_;
    auto res = restore_database(*client_, cfg_.bucket, cfg_.db_id, path_, o);
    ::unlink((path_ + "-bottomless").c_str());  // restore's note: this copy is never replicated
    if (!res) {
        Error e = std::move(res).error();
        e.message = "time travel to " + fmt_time_us(*cfg_.replica_at_us) + " failed: " + e.message;
        return e;
    }
    time_travel_ = true;
    // No connection has the copy yet: a plain descriptor is safe here.
    int fd = ::open(path_.c_str(), O_RDWR | O_CLOEXEC | O_NOFOLLOW);
    if (fd < 0) return make_error(ErrorKind::Io, "cannot open " + path_ + ": " + errno_text(errno), "OpenFailed");
    unsigned char h[kHeader] = {};
    bool ok = pread_full(fd, h, sizeof h, 0);
    if (ok) {
        make_legacy_header(h, get_be32(h + 24) + 1, res->db_pages);
        ok = pwrite_full(fd, h, sizeof h, 0);
    }
    ::close(fd);
    if (!ok) return make_error(ErrorKind::Io, "cannot prepare " + path_ + ": " + errno_text(errno), "WriteFailed");
    std::lock_guard lock(mu_);
    state_ = restored_state(cfg_.bucket, cfg_.db_id, *res);
    file_name_ = const_cast<char*>(
        sqlite3_create_filename(path_.c_str(), (path_ + "-journal").c_str(), (path_ + "-wal").c_str(), 0, nullptr));
    if (!file_name_) return make_error(ErrorKind::Io, "out of memory", "OpenFailed");
    return {};
}

Status Replica::start() {
    file_name_ = const_cast<char*>(
        sqlite3_create_filename(path_.c_str(), (path_ + "-journal").c_str(), (path_ + "-wal").c_str(), 0, nullptr));
    if (!file_name_) return make_error(ErrorKind::Io, "out of memory", "OpenFailed");
    auto cipher = open_cipher(*client_, cfg_.bucket, cfg_.db_id, cfg_.encryption, /*create=*/false);
    // Without S3 a proven replica still opens (it just does not follow yet);
    // the key is needed only to apply.
    if (cipher) cipher_ = *cipher;
    else if (cipher.error().kind == ErrorKind::Corrupt || cipher.error().kind == ErrorKind::InvalidArgument)
        return std::move(cipher).error();
    // Another process may be hydrating this file: its start-up byte makes us wait.
    auto lock = LeaderLock::acquire(path_, std::chrono::milliseconds(60'000));
    if (!lock) return std::move(lock).error();
    lock_.emplace(std::move(lock).value());
    file_ = std::make_unique<File>(lower_);
    if (lock_->leader()) {
        leader_ = true;
        auto saved = load_replica_state(path_);
        struct stat st{};
        const bool exists = ::stat(path_.c_str(), &st) == 0;
        if (exists) {
            if (auto s = file_->open(path_); !s) return s;
            unsigned char h[kHeader] = {};
            // A follower that died in the middle of an apply left a hot
            // journal: the original pages go back first (its state mark
            // then makes us hydrate).
            if (auto r = recover_journal(); !r) return r;
            if (file_->read(h, sizeof h, 0)) state_.counter = get_be32(h + 24);
        }
        if (saved && exists && proven(*saved)) {
            // The file is where its state says: follow from there, no S3 needed to open.
            saved->counter = std::max(saved->counter, state_.counter);
            state_ = *saved;
        } else {
            const std::string why = !exists ? "no replica file yet"
                                    : !saved ? "no readable replica state next to the file"
                                    : saved->applying ? "an apply was interrupted (crash?)"
                                                      : "the file is not the one its replica state describes";
            // Hydrating needs the key (a proven file does not: step() gets
            // it once S3 answers).
            if (!cipher && !cfg_.encryption.empty()) return std::move(cipher).error();
            if (auto s = hydrate(why); !s) return s;
        }
        lock_->startup_done();
    } else {
        leader_pid_ = lock_->leader_pid();
        struct stat st{};
        if (::stat(path_.c_str(), &st) != 0)
            return make_error(ErrorKind::Precondition,
                              path_ + " is followed by " +
                                  (leader_pid_ > 0 ? "process " + std::to_string(leader_pid_) : std::string("another process")) +
                                  " but does not exist yet; open it again once that process has hydrated it",
                              "ReplicaMissing");
    }
    thread_ = std::thread([this] { run(); });
    return {};
}

bool Replica::proven(const ReplicaState& s) const {
    struct stat st{};
    if (s.applying || s.bucket != cfg_.bucket || s.db_id != cfg_.db_id || s.page_size == 0) return false;
    if (::stat(path_.c_str(), &st) != 0) return false;
    const int64_t mtime_ns = static_cast<int64_t>(st.st_mtim.tv_sec) * 1'000'000'000 + st.st_mtim.tv_nsec;
    return s.db_size == static_cast<int64_t>(st.st_size) && s.db_mtime_ns == mtime_ns &&
           s.db_ino == static_cast<uint64_t>(st.st_ino) && static_cast<uint64_t>(st.st_size) == uint64_t{s.db_pages} * s.page_size;
}

// Replaces the state file (temp + rename). `durable`: fsynced with its
// directory, for the "applying" mark that must precede the writes it guards.
Status Replica::save_state(const ReplicaState& s0, bool durable) {
    ReplicaState s = s0;
    struct stat st{};
    if (!s.applying && ::stat(path_.c_str(), &st) == 0) {
        s.db_size = static_cast<int64_t>(st.st_size);
        s.db_mtime_ns = static_cast<int64_t>(st.st_mtim.tv_sec) * 1'000'000'000 + st.st_mtim.tv_nsec;
        s.db_ino = static_cast<uint64_t>(st.st_ino);
    }
    const std::string p = path_ + "-bottomless-replica", tmp = p + ".tmp";
    const std::string text = replica_state_json(s);
    int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0600);
    if (fd < 0) return make_error(ErrorKind::Io, "cannot write " + tmp + ": " + errno_text(errno), "WriteFailed");
    bool ok = pwrite_full(fd, text.data(), text.size(), 0) && (!durable || ::fsync(fd) == 0);
    ::close(fd);
    ok = ok && ::rename(tmp.c_str(), p.c_str()) == 0 && (!durable || fsync_dir_of(p));
    if (!ok) return make_error(ErrorKind::Io, "cannot write " + p + ": " + errno_text(errno), "WriteFailed");
    std::lock_guard lock(mu_);
    state_ = s;
    return {};
}

void Replica::set_error(const std::string& e) {
    std::lock_guard lock(mu_);
    if (e != last_error_ && !closing_.load()) log::warn("replica " + path_ + ": " + e);  // a cancel at close is no news
    last_error_ = e;
}

// SHARED, RESERVED, then PENDING and EXCLUSIVE, as SQLite's pager does for
// a rollback-mode write. Readers holding SHARED make EXCLUSIVE wait; PENDING
// (held while it waits) keeps new readers out, so it is held only
// kPendingHold at a time.
Status Replica::lock_exclusive(File& f) {
    bool waited = false;
    for (;;) {
        {
            std::lock_guard lock(mu_);
            if (stop_) return make_error(ErrorKind::Cancelled, "closing", "Closing");
        }
        int rc = f.lock(SQLITE_LOCK_SHARED);
        if (rc == SQLITE_OK) rc = f.lock(SQLITE_LOCK_RESERVED);
        const auto t0 = Clock::now();
        while (rc == SQLITE_OK) {
            rc = f.lock(SQLITE_LOCK_EXCLUSIVE);
            if (rc == SQLITE_OK) return {};
            if (rc != SQLITE_BUSY || Clock::now() - t0 > kPendingHold) break;
            rc = SQLITE_OK;
            std::this_thread::sleep_for(std::chrono::microseconds(500));
        }
        if (rc != SQLITE_BUSY && rc != SQLITE_OK) {
            f.unlock(SQLITE_LOCK_NONE);
            return f.check(rc, "lock");
        }
        // Readers are in a transaction: let new ones in, try again shortly.
        f.unlock(SQLITE_LOCK_NONE);
        std::unique_lock lock(mu_);
        if (!waited) ++lock_waits_;
        waited = true;
        cv_.wait_for(lock, kPendingBackoff, [&] { return stop_; });
    }
}

// ---- the rollback journal ----

namespace {

constexpr unsigned char kJournalMagic[8] = {0xd9, 0xd5, 0x05, 0xf9, 0x20, 0xa1, 0x63, 0xd7};
// The header is padded to one "sector"; records follow it. Any power of two
// from 32 is valid to SQLite's reader; 512 keeps the journal small.
constexpr uint32_t kJournalSector = 512;

// SQLite's page checksum in a journal record: the nonce plus every 200th
// byte from the end of the page (pager.c, pager_cksum).
uint32_t journal_cksum(uint32_t nonce, const unsigned char* page, uint32_t page_size) {
    uint32_t c = nonce;
    for (int i = static_cast<int>(page_size) - 200; i > 0; i -= 200) c += page[i];
    return c;
}

bool valid_page_size(uint32_t ps) { return ps >= 512 && ps <= 65536 && (ps & (ps - 1)) == 0; }

// Test hook (BOTTOMLESS_TEST_REPLICA_EXIT_AFTER_PAGES=N): the process exits
// (status 3) right after the N-th page of an apply reached the file: a
// follower killed in the middle of an apply, at a chosen point.
long exit_after_pages() {
    static const long n = [] {
        const char* v = std::getenv("BOTTOMLESS_TEST_REPLICA_EXIT_AFTER_PAGES");
        return v ? std::atol(v) : 0L;
    }();
    return n;
}

}  // namespace

Status Replica::write_journal(const std::vector<uint32_t>& pgnos, uint32_t orig_pages, uint32_t page_size) {
    const std::string jp = path_ + "-journal";
    auto fail = [&](const char* what) {
        return make_error(ErrorKind::Io, std::string("cannot ") + what + " the journal " + jp + ": " + errno_text(errno),
                          "WriteFailed");
    };
    Fd fd(::open(jp.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0644));
    if (fd.fd < 0) return fail("create");
    uint32_t nonce = 0;
    {
        std::random_device rd;
        nonce = static_cast<uint32_t>(rd());
    }
    // Records first, at offset kJournalSector, then the header: a crash
    // before the header is durable leaves a journal whose first byte is 0,
    // which SQLite ignores (the file was not touched yet).
    const uint32_t lock_pgno = static_cast<uint32_t>(0x40000000u / page_size) + 1;
    const size_t rec = size_t{page_size} + 8;
    std::string buf;
    buf.reserve(std::max<size_t>(rec, 1u << 20));
    uint64_t off = kJournalSector;
    uint32_t nrec = 0;
    for (uint32_t pgno : pgnos) {
        if (pgno == 0 || pgno > orig_pages || pgno == lock_pgno) continue;
        const size_t at = buf.size();
        buf.resize(at + rec);
        auto* r = reinterpret_cast<unsigned char*>(buf.data() + at);
        put_be32(r, pgno);
        if (auto rd = file_->read(r + 4, static_cast<int>(page_size), static_cast<int64_t>(pgno - 1) * page_size); !rd)
            return rd;
        put_be32(r + 4 + page_size, journal_cksum(nonce, r + 4, page_size));
        ++nrec;
        if (buf.size() + rec > buf.capacity()) {
            if (!pwrite_full(fd.fd, buf.data(), buf.size(), off)) return fail("write");
            off += buf.size();
            buf.clear();
        }
    }
    if (!buf.empty() && !pwrite_full(fd.fd, buf.data(), buf.size(), off)) return fail("write");
    if (::fsync(fd.fd) != 0) return fail("sync");
    unsigned char h[kJournalSector] = {};
    std::memcpy(h, kJournalMagic, sizeof kJournalMagic);
    put_be32(h + 8, nrec);
    put_be32(h + 12, nonce);
    put_be32(h + 16, orig_pages);
    put_be32(h + 20, kJournalSector);
    put_be32(h + 24, page_size);
    if (!pwrite_full(fd.fd, h, sizeof h, 0)) return fail("write");
    if (::fsync(fd.fd) != 0) return fail("sync");
    if (!fsync_dir_of(jp)) return fail("sync the directory of");
    return {};
}

// Plays a hot journal back as SQLite would: every record whose checksum
// holds (up to the header's count; the first bad one ends it) puts its page
// back (the first record of a page wins), the file is cut to its original
// size and fsynced, and the journal is deleted. A journal that is not hot
// (missing, first byte 0, no magic) is only deleted.
Status Replica::rollback_journal_locked(bool* rolled_back) {
    *rolled_back = false;
    const std::string jp = path_ + "-journal";
    Fd fd(::open(jp.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW));
    if (fd.fd < 0) {
        if (errno == ENOENT) return {};
        return make_error(ErrorKind::Io, "cannot open the journal " + jp + ": " + errno_text(errno), "OpenFailed");
    }
    struct stat st{};
    if (::fstat(fd.fd, &st) != 0)
        return make_error(ErrorKind::Io, "cannot stat the journal " + jp + ": " + errno_text(errno), "OpenFailed");
    unsigned char h[28] = {};
    const bool hot = st.st_size >= static_cast<off_t>(sizeof h) && pread_full(fd.fd, h, sizeof h, 0) && h[0] != 0 &&
                     std::memcmp(h, kJournalMagic, sizeof kJournalMagic) == 0;
    if (hot) {
        const uint32_t nrec = get_be32(h + 8), nonce = get_be32(h + 12), orig_pages = get_be32(h + 16);
        const uint32_t sector = get_be32(h + 20), ps = get_be32(h + 24);
        if (!valid_page_size(ps) || sector < 32 || sector > 65536 || (sector & (sector - 1)) != 0)
            return make_error(ErrorKind::Corrupt,
                              "the journal " + jp + " has an invalid header; move it away and open the replica again "
                                                    "(it will be hydrated from the bucket)",
                              "CorruptJournal");
        std::vector<unsigned char> r(size_t{ps} + 8);
        std::vector<bool> done(size_t{orig_pages} + 1, false);
        uint64_t off = sector;
        for (uint32_t i = 0; i < nrec && off + r.size() <= static_cast<uint64_t>(st.st_size); ++i, off += r.size()) {
            if (!pread_full(fd.fd, r.data(), r.size(), off))
                return make_error(ErrorKind::Io, "cannot read the journal " + jp + ": " + errno_text(errno), "ReadFailed");
            const uint32_t pgno = get_be32(r.data());
            if (pgno == 0 || get_be32(r.data() + 4 + ps) != journal_cksum(nonce, r.data() + 4, ps)) break;
            if (pgno > orig_pages || done[pgno]) continue;
            done[pgno] = true;
            if (auto w = file_->write(r.data() + 4, static_cast<int>(ps), static_cast<int64_t>(pgno - 1) * ps); !w) return w;
        }
        if (file_->size() > static_cast<int64_t>(uint64_t{orig_pages} * ps))
            if (auto t = file_->truncate(static_cast<int64_t>(uint64_t{orig_pages} * ps)); !t) return t;
        if (auto s = file_->sync(); !s) return s;
        *rolled_back = true;
    }
    if (::unlink(jp.c_str()) != 0 && errno != ENOENT)
        return make_error(ErrorKind::Io, "cannot delete the journal " + jp + ": " + errno_text(errno), "WriteFailed");
    return {};
}

Status Replica::recover_journal() {
    struct stat st{};
    if (::stat((path_ + "-journal").c_str(), &st) != 0) return {};
    if (!file_->is_open())
        if (auto o = file_->open(path_); !o) return o;
    if (auto l = lock_exclusive(*file_); !l) return l;
    bool rolled = false;
    Status r = rollback_journal_locked(&rolled);
    file_->unlock(SQLITE_LOCK_NONE);
    if (r && rolled) {
        log::warn("replica " + path_ + ": rolled back the journal of an apply that did not finish");
        std::lock_guard lock(mu_);
        last_event_ = "rolled back the journal of an apply that did not finish (a follower died in the middle)";
    }
    return r;
}

// ---- hydration ----

Status Replica::hydrate(const std::string& why, const std::string& generation) {
    log::info("replica " + path_ + ": hydrating from the bucket (" + why + ")");
    RestoreOptions o;
    o.cipher = cipher_;
    o.generation = generation;
    o.cancel = &closing_;  // the last connection closing stops the download
    const std::string tmp = path_ + ".replica-new";
    auto res = restore_database(*client_, cfg_.bucket, cfg_.db_id, tmp, o);
    ::unlink((tmp + "-bottomless").c_str());
    if (!res) {
        ::unlink(tmp.c_str());
        Error e = std::move(res).error();
        e.message = "cannot hydrate the replica " + path_ + " from s3://" + cfg_.bucket + "/" + cfg_.db_id + ": " + e.message;
        return e;
    }
    // The image (as large as the database) never outlives this call, on
    // any path (renamed into place, or copied in and removed).
    struct RemoveTmp {
        const std::string& p;
        ~RemoveTmp() { ::unlink(p.c_str()); }
    } remove_tmp{tmp};
    ReplicaState s = restored_state(cfg_.bucket, cfg_.db_id, *res);
    {
        std::lock_guard lock(mu_);
        s.counter = state_.counter + 1;
    }
    // The new image, in rollback format, in the temp file (ours alone).
    Fd src(::open(tmp.c_str(), O_RDWR | O_CLOEXEC | O_NOFOLLOW));
    unsigned char h[kHeader] = {};
    if (src.fd < 0 || !pread_full(src.fd, h, sizeof h, 0))
        return make_error(ErrorKind::Io, "cannot read " + tmp + ": " + errno_text(errno), "OpenFailed");
    s.counter = std::max(s.counter, get_be32(h + 24) + 1);
    make_legacy_header(h, s.counter, s.db_pages);
    if (!pwrite_full(src.fd, h, sizeof h, 0) || ::fsync(src.fd) != 0)
        return make_error(ErrorKind::Io, "cannot write " + tmp + ": " + errno_text(errno), "WriteFailed");

    struct stat st{};
    if (!file_->is_open() && ::stat(path_.c_str(), &st) != 0) {
        // No replica file yet, so no reader: the image is renamed into place.
        for (const char* suffix : {"-journal", "-wal", "-shm"}) ::unlink((path_ + suffix).c_str());
        if (::rename(tmp.c_str(), path_.c_str()) != 0)
            return make_error(ErrorKind::Io, "cannot rename " + tmp + ": " + errno_text(errno), "RenameFailed");
        fsync_dir_of(path_);
        if (auto o2 = file_->open(path_); !o2) return o2;
    } else {
        // Readers may have the file open: it is rewritten in place (same
        // inode) under the exclusive lock, as one big apply.
        if (!file_->is_open())
            if (auto o2 = file_->open(path_); !o2) return o2;
        if (auto l = lock_exclusive(*file_); !l) return l;
        bool rolled = false;
        Status w = rollback_journal_locked(&rolled);  // a torn file is never journaled as the original
        ReplicaState mark;
        {
            std::lock_guard lock(mu_);
            mark = state_;
        }
        mark.applying = true;
        if (w) w = save_state(mark, true);
        // Only the pages that differ are journaled and written (a new
        // generation mostly holds the same pages); with another page size,
        // all of them.
        const uint32_t ps = s.page_size;
        const int64_t cur_size = file_->size();
        // An unknown size would journal "0 pages" as the original: a crash
        // would then roll the file back to empty.
        if (w && cur_size < 0) w = file_->check(SQLITE_IOERR_FSTAT, "size");
        unsigned char cur_h[kHeader] = {};
        uint32_t cur_ps = 0;
        if (w && cur_size >= static_cast<int64_t>(kHeader) && file_->read(cur_h, sizeof cur_h, 0)) {
            cur_ps = (uint32_t{cur_h[16]} << 8) | cur_h[17];
            if (cur_ps == 1) cur_ps = 65536;
        }
        const bool same_ps = cur_ps == ps;
        const uint32_t jps = valid_page_size(cur_ps) ? cur_ps : ps;
        const uint32_t orig_pages = cur_size > 0 ? static_cast<uint32_t>(cur_size / jps) : 0;
        std::vector<uint32_t> changed, journal;
        std::string a(ps, '\0'), b(ps, '\0');
        for (uint32_t p = 1; w && p <= s.db_pages; ++p) {
            const int64_t off = static_cast<int64_t>(p - 1) * ps;
            if (!pread_full(src.fd, a.data(), ps, static_cast<uint64_t>(off))) {
                w = make_error(ErrorKind::Io, "cannot read " + tmp + ": " + errno_text(errno), "ReadFailed");
                break;
            }
            if (same_ps && p <= orig_pages) {
                if (auto r = file_->read(b.data(), static_cast<int>(ps), off); !r) w = r;
                else if (a == b) continue;
            }
            changed.push_back(p);
        }
        if (same_ps) {
            journal = changed;
            for (uint32_t p = s.db_pages + 1; p <= orig_pages; ++p) journal.push_back(p);
        } else {
            for (uint32_t p = 1; p <= orig_pages; ++p) journal.push_back(p);
        }
        if (w && !journal.empty()) w = write_journal(journal, orig_pages, jps);
        const bool journaled = w && !journal.empty();
        for (size_t i = 0; w && i < changed.size(); ++i) {
            const int64_t off = static_cast<int64_t>(changed[i] - 1) * ps;
            if (!pread_full(src.fd, a.data(), ps, static_cast<uint64_t>(off)))
                w = make_error(ErrorKind::Io, "cannot read " + tmp + ": " + errno_text(errno), "ReadFailed");
            else w = file_->write(a.data(), static_cast<int>(ps), off);
        }
        const uint64_t size = uint64_t{s.db_pages} * ps;
        if (w && file_->size() != static_cast<int64_t>(size)) w = file_->truncate(static_cast<int64_t>(size));
        if (w) w = file_->sync();
        // The state (and status) moves before readers can see the new
        // content; deleting the journal is the commit point.
        if (w) w = hydrated(s, why);
        if (w && journaled && ::unlink((path_ + "-journal").c_str()) != 0)
            w = make_error(ErrorKind::Io, "cannot delete the journal " + path_ + "-journal: " + errno_text(errno),
                           "WriteFailed");
        if (!w && journaled) {
            bool back = false;
            if (auto rb = rollback_journal_locked(&back); !rb)
                log::warn("replica " + path_ + ": cannot roll back a failed hydration: " + rb.error().message);
        }
        file_->unlock(SQLITE_LOCK_NONE);
        ::unlink(tmp.c_str());
        if (!w) {
            std::lock_guard lock(mu_);
            state_.applying = true;
        }
        return w;  // on failure the mark stays: the next step (or open) hydrates again
    }
    return hydrated(s, why);
}

Status Replica::hydrated(const ReplicaState& s, const std::string& why) {
    if (auto w = save_state(s, false); !w) return w;
    std::lock_guard lock(mu_);
    ++hydrations_;
    broken_ = false;
    stalled_ = false;
    follow_error_.clear();
    miss_since_ = {};
    last_event_ = "hydrated generation " + s.generation + " at segment " + std::to_string(s.seq) + ": " + why;
    caught_up_us_ = now_us();
    return {};
}

// ---- following ----

void Replica::run() {
    std::unique_lock lock(mu_);
    while (!stop_) {
        lock.unlock();
        Step r = Step::Failed;
        // Nothing may escape the thread (std::terminate would end the host).
        try {
            r = step();
        } catch (const std::exception& e) {
            set_error(std::string("follower step failed: ") + e.what());
        } catch (...) {
            set_error("follower step failed: unknown exception");
        }
        lock.lock();
        if (r == Step::Failed) {
            ++consecutive_failures_;
            retry_backoff_ = retry_backoff(consecutive_failures_, cfg_.replica_poll);
        } else {
            consecutive_failures_ = 0;
            retry_backoff_ = std::chrono::milliseconds(0);
        }
        if (r != Step::Progress)
            cv_.wait_for(lock, r == Step::Failed ? retry_backoff_ : cfg_.replica_poll, [&] { return stop_; });
    }
}

bool Replica::try_lead() {
    // The follower process went away: one of the readers takes over.
    auto l = LeaderLock::acquire(path_, std::chrono::milliseconds(0));
    if (!l || !l->leader()) return false;
    lock_.emplace(std::move(l).value());
    {
        std::lock_guard lock(mu_);
        leader_ = true;
    }
    auto saved = load_replica_state(path_);
    if (!file_->is_open())
        if (auto o = file_->open(path_); !o) {
            set_error(o.error().message);
            return false;
        }
    if (auto r = recover_journal(); !r) {
        set_error(r.error().message);
        saved.reset();
    }
    if (saved && proven(*saved)) {
        std::lock_guard lock(mu_);
        state_ = *saved;
    } else if (auto h = hydrate("took over following from a process that left, its state not proven"); !h) {
        set_error(h.error().message);
    }
    lock_->startup_done();
    return true;
}

Replica::Step Replica::step() {
    bool leader, broken;
    ReplicaState s;
    {
        std::lock_guard lock(mu_);
        ++polls_;
        leader = leader_;
        broken = broken_;
        s = state_;
    }
    if (!leader) return try_lead() ? Step::Progress : Step::Idle;
    if (!cipher_ && !cfg_.encryption.empty()) {  // S3 was unreachable at the open
        auto c = open_cipher(*client_, cfg_.bucket, cfg_.db_id, cfg_.encryption, /*create=*/false);
        if (!c) {
            set_error(c.error().message);
            return Step::Failed;
        }
        cipher_ = *c;
    }
    if (s.applying) {  // an earlier apply failed half-way: the file is not trusted
        if (auto h = hydrate("an apply failed half-way"); !h) {
            set_error(h.error().message);
            return Step::Failed;
        }
        return Step::Progress;
    }
    if (!broken) {
        const uint64_t seq = s.seq + 1;
        const std::string key = segment_key(cfg_.db_id, s.generation, seq);
        // The next key is predictable: one GET finds it or answers 404.
        auto body = client_->get_object(cfg_.bucket, key, std::nullopt, nullptr, max_segment_object_size());
        if (body) {
            if (auto a = apply_segment(seq, key, *body); !a) {
                set_error(a.error().message);
                return Step::Failed;
            }
            std::lock_guard lock(mu_);
            last_error_.clear();
            follow_error_.clear();
            stalled_ = false;
            miss_since_ = {};
            return Step::Progress;
        }
        if (body.error().kind != ErrorKind::NotFound) {
            set_error("polling " + key + ": " + body.error().message);
            return Step::Failed;
        }
    }
    bool list = false;
    {
        std::lock_guard lock(mu_);
        const auto now = Clock::now();
        if (miss_since_ == Clock::time_point{}) {  // the streak starts (right after the last segment)
            miss_since_ = now;
            list_gap_ = list_after(cfg_.replica_poll);
            next_list_ = now + list_gap_;
        }
        if (now >= next_list_) {
            list = true;
            list_gap_ = std::min(list_gap_ * 2, list_at_most(cfg_.replica_poll));
            next_list_ = now + list_gap_;
            ++listings_;
        }
        // Nothing newer in the generation: caught up as of now, unless the
        // last listing found that this generation cannot go on (then the
        // lag grows and the verdict stays in last_error).
        if (!broken && !stalled_) {
            caught_up_us_ = now_us();
            last_error_.clear();
        }
    }
    if (list) {
        Status c = check_generations();
        std::lock_guard lock(mu_);
        if (c) {
            follow_error_.clear();
            stalled_ = false;
        } else {
            if (c.error().message != follow_error_ && !closing_.load())
                log::warn("replica " + path_ + ": " + c.error().message);
            follow_error_ = c.error().message;
            stalled_ = stalled_code(c.error().code);
        }
    }
    return Step::Idle;  // a failed listing keeps its own schedule (list_gap_)
}

Status Replica::apply_segment(uint64_t seq, const std::string& key, const std::string& body) {
    ReplicaState s;
    {
        std::lock_guard lock(mu_);
        s = state_;
    }
    // First pass: the whole object is checked (trailer, key, chain, every
    // frame decodes) before one byte of the file changes.
    SegmentHeader h;
    auto on_header = [&](const SegmentHeader& sh) -> Status {
        if (sh.db_id != cfg_.db_id || sh.generation != s.generation || sh.seq != seq)
            return make_error(ErrorKind::Corrupt, key + " holds another object (" + sh.db_id + "/" + sh.generation + "/" +
                                                      std::to_string(sh.seq) + ")",
                              "WrongObject");
        if (sh.prev_sha256 != s.last_sha256 || !(sh.start == s.position) || sh.page_size != s.page_size)
            return make_error(ErrorKind::Corrupt,
                              key + " does not continue the replica's position (chain broken: a fork, or an object "
                                    "replaced); not applied, waiting for a new generation",
                              "ChainBroken");
        h = sh;
        return {};
    };
    std::vector<uint32_t> pgnos{1};  // page 1 always changes (its counters)
    auto sha = for_each_segment_frame(body, key, cipher_.get(), on_header,
                                      [&](uint64_t, uint32_t pgno, std::string_view) {
                                          pgnos.push_back(pgno);
                                          return Status{};
                                      });
    if (!sha) {
        if (sha.error().kind == ErrorKind::Corrupt) {
            std::lock_guard lock(mu_);
            broken_ = true;
        }
        return std::move(sha).error();
    }
    if (h.txns.empty()) {
        std::lock_guard lock(mu_);
        broken_ = true;  // the same object would be fetched again at every poll
        return make_error(ErrorKind::Corrupt, key + " holds no transaction; not applied, waiting for a new generation",
                          "CorruptObject");
    }
    const uint32_t db_pages = h.txns.back().db_pages;

    if (auto l = lock_exclusive(*file_); !l) return l;
    // A hot journal (an earlier apply that failed and could not be rolled
    // back) goes first: journaling a torn page would make it the "original".
    bool rolled = false;
    Status w = rollback_journal_locked(&rolled);
    if (w && rolled) {
        file_->unlock(SQLITE_LOCK_NONE);
        std::lock_guard lock(mu_);
        state_.applying = true;  // rolled back to a state the position may not describe: hydrate
        return make_error(ErrorKind::Io, "rolled back an unfinished apply's journal; hydrating", "JournalRolledBack");
    }
    ReplicaState mark = s;
    mark.applying = true;
    if (w) w = save_state(mark, true);
    // The original of every page this apply overwrites or cuts off, durable
    // before the first write.
    const int64_t cur_size = file_->size();
    if (w && cur_size < 0) w = file_->check(SQLITE_IOERR_FSTAT, "size");  // never journal "0 pages" as the original
    const uint32_t orig_pages = cur_size > 0 ? static_cast<uint32_t>(cur_size / s.page_size) : 0;
    for (uint32_t p = db_pages + 1; p <= orig_pages; ++p) pgnos.push_back(p);
    std::sort(pgnos.begin(), pgnos.end());
    pgnos.erase(std::unique(pgnos.begin(), pgnos.end()), pgnos.end());
    bool journaled = false;
    if (w) w = write_journal(pgnos, orig_pages, s.page_size);
    journaled = static_cast<bool>(w);
    // Second pass: the pages, in order (a later frame of a page wins).
    if (w) {
        long written = 0;
        auto again = for_each_segment_frame(body, key, cipher_.get(), [](const SegmentHeader&) { return Status{}; },
                                            [&](uint64_t, uint32_t pgno, std::string_view page) {
                                                Status pw = file_->write(page.data(), static_cast<int>(page.size()),
                                                                         static_cast<int64_t>(pgno - 1) * s.page_size);
                                                if (++written == exit_after_pages()) ::_exit(3);
                                                return pw;
                                            });
        if (!again) w = std::move(again).error();
    }
    if (w && file_->size() > static_cast<int64_t>(uint64_t{db_pages} * s.page_size))
        w = file_->truncate(static_cast<int64_t>(uint64_t{db_pages} * s.page_size));
    ReplicaState next = s;
    next.counter = s.counter + 1;
    if (w) {
        unsigned char hdr[kHeader] = {};
        w = file_->read(hdr, sizeof hdr, 0);
        make_legacy_header(hdr, next.counter, db_pages);
        if (w) w = file_->write(hdr, sizeof hdr, 0);
    }
    if (w) w = file_->sync();
    next.seq = seq;
    next.position = h.end;
    next.last_sha256 = *sha;
    next.db_pages = db_pages;
    next.last_commit_us = h.txns.back().commit_us;
    next.applying = false;
    // The state (and status) moves before readers can see the new pages;
    // deleting the journal is the commit point.
    if (w) w = save_state(next, false);
    if (w && ::unlink((path_ + "-journal").c_str()) != 0)
        w = make_error(ErrorKind::Io, "cannot delete the journal " + path_ + "-journal: " + errno_text(errno),
                       "WriteFailed");
    if (!w) {
        // Put the original pages back while we still hold the lock; if that
        // fails too the journal stays hot (readers refuse to read the file)
        // and the next step hydrates.
        bool back = false;
        Status rb = journaled ? rollback_journal_locked(&back) : Status{};
        file_->unlock(SQLITE_LOCK_NONE);
        if (!rb) log::warn("replica " + path_ + ": cannot roll back a failed apply: " + rb.error().message);
        std::lock_guard lock(mu_);
        state_.applying = true;  // the next step hydrates
        return w;
    }
    {
        std::lock_guard lock(mu_);
        ++segments_applied_;
        last_apply_us_ = now_us();
        applied_lag_us_ = next.last_commit_us > 0 ? last_apply_us_ - next.last_commit_us : 0;
    }
    file_->unlock(SQLITE_LOCK_NONE);
    return {};
}

// A listing of the generations (after a streak of misses): a newer one than
// the replica's is followed by re-hydrating in place (format-1 snapshots
// carry no page hashes, so what changed cannot be known without it);
// whether it descends from the replica's position is reported. Its cost
// does not grow with the generation's length: one LIST of the generation
// ids, one LIST of at most one key after the next segment's, and a
// description (a LIST of its objects) only of generations newer than the
// replica's. Errors whose code is in stalled_codes() are verdicts (the
// replica cannot go on from where it is), the others transient.
bool Replica::stalled_code(const std::string& code) {
    return code == "ReplicaAhead" || code == "GenerationRemoved" || code == "SegmentMissing";
}

Status Replica::check_generations() {
    auto gens = list_generations(*client_, cfg_.bucket, cfg_.db_id);
    if (!gens) return std::move(gens).error();
    ReplicaState s;
    {
        std::lock_guard lock(mu_);
        s = state_;
    }
    const int64_t own_ms = generation_time_ms(s.generation);
    bool own_listed = false;
    const GenerationInfo* latest = nullptr;
    // Newest first: describe the generations newer than the replica's until
    // one has a snapshot (the one a restore would choose).
    for (auto& g : *gens) {
        if (g.id == s.generation) {
            own_listed = true;
            break;
        }
        if (own_ms >= 0 && g.created_ms < own_ms) break;  // older than the replica's
        if (auto st = describe_generation(*client_, cfg_.bucket, cfg_.db_id, g); !st) return st;
        if (g.has_snapshot) {
            latest = &g;
            break;
        }
    }
    const std::string where = "s3://" + cfg_.bucket + "/" + cfg_.db_id;
    const std::string serving = "; the replica keeps its last applied state (generation " + s.generation + ", segment " +
                                std::to_string(s.seq) + ") until the writer starts a new generation";
    if (!latest && !own_listed) {
        std::string older;
        for (const auto& g : *gens)
            if (own_ms < 0 || g.created_ms < own_ms) {
                older = g.id;
                break;
            }
        return make_error(ErrorKind::Precondition,
                          "the replica's generation " + s.generation + " is no longer in " + where +
                              " (removed, e.g. with bottomless-cli rm)" +
                              (older.empty() ? std::string() : "; older generations (" + older + ") are not followed") +
                              serving,
                          "GenerationRemoved");
    }
    if (!latest) {
        // The replica's generation is the newest: is it stuck on a segment
        // that will never come (removed, lost) while later ones exist?
        s3::ListRequest req;
        req.prefix = generation_prefix(cfg_.db_id, s.generation) + "seg-";
        req.start_after = segment_key(cfg_.db_id, s.generation, s.seq + 1);
        req.max_keys = 1;
        auto page = client_->list_objects_page(cfg_.bucket, req);
        if (!page) return std::move(page).error();
        uint64_t later = 0;
        for (const auto& o : page->objects)
            if (parse_segment_key(o.key, later) && later > s.seq + 1) {
                // Not a race with an upload in flight: the streak lasted seconds.
                auto again = client_->head_object(cfg_.bucket, segment_key(cfg_.db_id, s.generation, s.seq + 1));
                if (again) return {};  // it arrived meanwhile: the next poll takes it
                return make_error(ErrorKind::Precondition,
                                  "segment " + std::to_string(s.seq + 1) + " of generation " + s.generation +
                                      " is missing from " + where + " while segment " + std::to_string(later) +
                                      " exists (removed, e.g. with bottomless-cli rm, or lost): the chain cannot go on" +
                                      serving,
                                  "SegmentMissing");
            }
        return {};
    }
    std::string lineage = "a new generation " + latest->id;
    auto snap = read_snapshot_header(*client_, cfg_.bucket, snapshot_key(cfg_.db_id, latest->id), latest->snapshot_bytes);
    if (snap) {
        if (snap->parent_generation == s.generation && snap->parent_seq >= s.seq)
            lineage += " continues the replica's generation (from its segment " + std::to_string(snap->parent_seq) + ")";
        else
            lineage += " does not descend from the replica's position (parent " +
                       (snap->parent_generation.empty() ? std::string("none") : snap->parent_generation) + " at segment " +
                       std::to_string(snap->parent_seq) + "): the history diverged (a restore elsewhere?)";
    }
    return hydrate(lineage, latest->id);
}

std::string Replica::status_json() const {
    ReplicaState s;
    json j;
    const auto stats = client_->stats();
    bool reader;
    {
        std::lock_guard lock(mu_);
        reader = !time_travel_ && !leader_;
    }
    // Another process follows: where the file stands is in its state file
    // (read without the lock: the follower thread takes it).
    std::optional<ReplicaState> theirs = reader ? load_replica_state(path_) : std::nullopt;
    std::lock_guard lock(mu_);
    s = state_;
    if (theirs && !leader_) s = *theirs;
    const int64_t now = now_us();
    j["mode"] = "replica";
    j["role"] = time_travel_ ? "time-travel" : leader_ ? "follower" : "reader";
    if (!time_travel_ && !leader_) j["follower_pid"] = leader_pid_ > 0 ? json(leader_pid_) : json();
    j["read_only"] = true;
    j["bucket"] = cfg_.bucket;
    j["database_id"] = cfg_.db_id;
    j["generation"] = s.generation;
    j["segment"] = s.seq;
    j["db_pages"] = s.db_pages;
    j["page_size"] = s.page_size;
    j["last_applied_commit"] = fmt_time_us(s.last_commit_us);
    j["last_applied_commit_us"] = s.last_commit_us;
    if (time_travel_) {
        j["at"] = fmt_time_us(cfg_.replica_at_us.value_or(0));
    } else {
        j["poll_ms"] = cfg_.replica_poll.count();
        // How stale the replica may be: since the last poll that found
        // nothing newer (caught up as of then); null before the first.
        j["lag_ms"] = leader_ && caught_up_us_ > 0 ? json((now - caught_up_us_) / 1000) : json();
        j["applied_lag_ms"] = applied_lag_us_ / 1000;  // at the last apply: its time minus the writer's commit time
        j["last_apply"] = fmt_time_us(last_apply_us_);
        j["segments_applied"] = segments_applied_;
        j["hydrations"] = hydrations_;
        j["polls"] = polls_;
        j["listings"] = listings_;  // generation listings (after a streak without a new segment)
        j["lock_waits"] = lock_waits_;
        j["chain_broken"] = broken_;
        // Failed steps in a row and the wait before the next try (0: healthy).
        j["consecutive_failures"] = consecutive_failures_;
        j["retry_backoff_ms"] = retry_backoff_.count();
        // The last listing found that the replica cannot go on from where it
        // is (its generation removed, a segment missing); last_error says why.
        j["stalled"] = stalled_;
        j["last_event"] = last_event_;
    }
    j["requests"] = {{"total", stats.requests}, {"get", stats.gets},   {"head", stats.heads},
                     {"list", stats.lists},     {"put", stats.puts},   {"retries", stats.retries},
                     {"bytes_received", stats.bytes_received}};
    const std::string& err = !last_error_.empty() ? last_error_ : follow_error_;
    j["last_error"] = err.empty() ? json() : json(err);
    // Messages carry paths and server text: never let a byte that is not
    // UTF-8 turn a status into an exception.
    return j.dump(-1, ' ', false, json::error_handler_t::replace);
}

}  // namespace bottomless::replicator
