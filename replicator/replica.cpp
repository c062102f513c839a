// Read replicas and time travel: see replica.h and docs/SEMANTICS.md "Read
// replicas". This file: the registry, opening and closing, the state file,
// the file's locks and status. Hydration and at= time travel:
// replica_hydrate.cpp; following and applying: replica_follow.cpp; the
// rollback journal: replica_journal.cpp.
#include "replicator/replica.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <future>
#include <map>

#include <nlohmann/json.hpp>

#include "replicator/pool.h"
#include "replicator/replica_internal.h"
#include "replicator/restore.h"
#include "replicator/util.h"
#include "s3/log.h"

namespace bottomless::replicator {

using namespace replica_detail;

namespace {

using json = nlohmann::json;

// While readers hold SHARED, the follower keeps PENDING (which keeps new
// readers out) at most this long, then lets them in again and retries later:
// a long read transaction delays the apply, never the other readers.
constexpr auto kPendingHold = std::chrono::milliseconds(10);
constexpr auto kPendingBackoff = std::chrono::milliseconds(20);

json position_json(const WalPosition& p) {
    return {{"salt1", p.salt1}, {"salt2", p.salt2}, {"frame", p.frame}, {"cksum1", p.cksum1}, {"cksum2", p.cksum2}};
}

}  // namespace

bool replica_detail::fsync_dir_of(const std::string& path) {
    std::string dir = path.substr(0, path.find_last_of('/') + 1);
    if (dir.empty()) dir = ".";
    int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) return false;
    const bool ok = ::fsync(fd) == 0;
    ::close(fd);
    return ok;
}

// validate_db_id's alphabet: no '/', no NUL, not "." or "..". Checked again
// here, before any request or file, whoever built the configuration
// (load_config() checks it too).
Status replica_detail::check_replica_db_id(const std::string& db_id) {
    if (auto st = validate_db_id(db_id); !st)
        return make_error(ErrorKind::InvalidArgument,
                          "a replica cannot use this database id: " + st.error().message +
                              "; set database_id= (or LIBSQL_BOTTOMLESS_DATABASE_ID) to the id the writer uses",
                          "BadDatabaseId");
    return {};
}

namespace {

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

ReplicaState replica_detail::restored_state(const std::string& bucket, const std::string& db_id, const RestoreResult& r) {
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

std::optional<ReplicaState> replica_detail::load_replica_state(const std::string& db_path) {
    std::string text;
    Fd fd(::open((db_path + "-bottomless-replica").c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW));
    if (fd.fd < 0) return std::nullopt;
    char buf[4096];
    for (ssize_t n; (n = ::read(fd.fd, buf, sizeof buf)) > 0 && text.size() < 65536;) text.append(buf, static_cast<size_t>(n));
    return parse_replica_state(text);
}
void make_legacy_header(unsigned char* h, uint32_t counter, uint32_t db_pages) {
    h[18] = 1;  // file format write version: legacy (rollback journal)
    h[19] = 1;  // read version
    put_be32(h + 24, counter);
    put_be32(h + 28, db_pages);
    put_be32(h + 92, counter);  // "version-valid-for": makes the in-header size trusted
}

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
        if (!last_hydration_mode_.empty())
            j["last_hydration"] = {{"download", last_hydration_mode_}, {"bytes", last_hydration_bytes_}};
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
