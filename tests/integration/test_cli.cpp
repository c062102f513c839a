// bottomless-cli end to end, against the real S3 server: a writer in this
// process replicates through the loadable extension (bottomless.so, loaded
// into this process's SQLite), the built CLI runs as a subprocess, and the
// results are read back with SQLite.
//
//   - point in time: 20 random times, exact commit instants (and one µs
//     before), between two commits of one segment; each restore holds every
//     transaction whose COMMIT returned before T and none that began after T
//   - restore's --if-db-not-exists / --if-replica-exists truth table, --force
//   - -g of an older generation, ls --json, status --json
//   - rm --older-than / --keep / -g / --dry-run, counting objects, and a
//     deletion of more than 1000 keys
//   - corruption: a flipped byte, a truncation, a deletion of the snapshot, a
//     middle segment and the last segment: restore and verify fail naming it,
//     nothing is written at -o
//   - the chain, by error code: a segment of another generation relabelled
//     (trailer recomputed, with and without its start copied), a start that
//     does not continue the previous end, a missing middle segment, a
//     segment under another segment's key
//   - the point-in-time boundary: a commit at exactly T is in, T - 1 µs not;
//     a generation whose snapshot is at exactly T serves T (library and CLI)
//   - a 64 MiB database: multipart snapshot upload, parallel ranged-GET restore
//   - scripts/restore-before-start.sh in its cases
//   - an encrypted replica: ls without the key, restore and verify with the
//     key (option or environment) or a passphrase, a wrong or missing key
//
// Needs BOTTOMLESS_CLI_PATH, BOTTOMLESS_EXT_PATH and BOTTOMLESS_SCRIPTS_DIR
// (compile definitions) and the test server's environment.
#include <catch2/catch.hpp>

#include <fcntl.h>
#include <sqlite3.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <future>
#include <map>
#include <optional>
#include <mutex>
#include <random>
#include <set>
#include <sstream>
#include <thread>

#include <nlohmann/json.hpp>

#include "replicator/format.h"
#include "replicator/restore.h"
#include "s3/client.h"
#include "support/s3_env.h"
#include "support/skip.h"
#include "support/seed.h"

#ifndef BOTTOMLESS_CLI_PATH
#error "BOTTOMLESS_CLI_PATH must name the built bottomless-cli"
#endif
#ifndef BOTTOMLESS_EXT_PATH
#error "BOTTOMLESS_EXT_PATH must name the built bottomless.so"
#endif
#ifndef BOTTOMLESS_SCRIPTS_DIR
#define BOTTOMLESS_SCRIPTS_DIR "scripts"
#endif

namespace fs = std::filesystem;
using json = nlohmann::json;
using namespace bottomless;
using bottomless::testing::TestBucket;

namespace {

int64_t now_us() {
    return std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::system_clock::now().time_since_epoch())
        .count();
}

std::string rfc3339(int64_t us) {
    std::time_t t = static_cast<std::time_t>(us / 1'000'000);
    std::tm tm{};
    gmtime_r(&t, &tm);
    char buf[64];
    std::snprintf(buf, sizeof buf, "%04d-%02d-%02dT%02d:%02d:%02d.%06lldZ", tm.tm_year + 1900, tm.tm_mon + 1,
                  tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, static_cast<long long>(us % 1'000'000));
    return buf;
}

// The same instant written three ways --utc-time must all accept.
std::string time_arg(int64_t us, int style) {
    std::string z = rfc3339(us);  // YYYY-MM-DDTHH:MM:SS.ffffffZ
    if (style == 1) return z.substr(0, 10) + " " + z.substr(11, 15);  // 'YYYY-MM-DD HH:MM:SS.ffffff', UTC
    if (style == 2) {
        // The same instant at +01:30.
        int64_t local = us + 90 * 60 * 1'000'000LL;
        std::string l = rfc3339(local);
        return l.substr(0, l.size() - 1) + "+01:30";
    }
    return z;
}

struct TempDir {
    fs::path path;
    TempDir() {
        std::string tmpl = (fs::temp_directory_path() / "bottomless-cli-test.XXXXXX").string();
        REQUIRE(::mkdtemp(tmpl.data()) != nullptr);
        path = tmpl;
    }
    ~TempDir() {
        std::error_code ec;
        fs::remove_all(path, ec);
    }
    std::string operator/(const std::string& name) const { return (path / name).string(); }
};

struct Run {
    int code = -1;
    std::string out, err;
    std::string all() const { return out + err; }
};

std::string read_file(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    std::stringstream ss;
    ss << in.rdbuf();
    return ss.str();
}

// A program started with extra environment (value nullopt: unset), its
// stdout and stderr going to files (no pipe can fill up and block it).
class Spawned {
public:
    Spawned(const std::vector<std::string>& argv, const std::map<std::string, std::optional<std::string>>& env = {},
            const std::string& stdin_text = {}) {
        const std::string in = io_ / "in";
        {
            std::ofstream f(in);
            f << stdin_text;
        }
        pid_ = ::fork();
        REQUIRE(pid_ >= 0);
        if (pid_ == 0) {
            int fi = ::open(in.c_str(), O_RDONLY);
            int fo = ::open(out_path().c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
            int fe = ::open(err_path().c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
            if (fi < 0 || fo < 0 || fe < 0) ::_exit(127);
            ::dup2(fi, 0);
            ::dup2(fo, 1);
            ::dup2(fe, 2);
            for (const auto& [k, v] : env) {
                if (v) ::setenv(k.c_str(), v->c_str(), 1);
                else ::unsetenv(k.c_str());
            }
            std::vector<char*> args;
            for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
            args.push_back(nullptr);
            ::execv(args[0], args.data());
            ::_exit(127);
        }
    }
    ~Spawned() {
        if (pid_ > 0) {
            ::kill(pid_, SIGKILL);
            (void)wait();
        }
    }
    Spawned(const Spawned&) = delete;
    Spawned& operator=(const Spawned&) = delete;

    std::string out_so_far() const { return read_file(out_path()); }
    // Sends `sig` (0: none) and waits for the exit.
    Run wait(int sig = 0) {
        if (sig && pid_ > 0) ::kill(pid_, sig);
        int status = 0;
        while (pid_ > 0 && ::waitpid(pid_, &status, 0) < 0 && errno == EINTR) {
        }
        pid_ = -1;
        Run r;
        r.code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
        r.out = read_file(out_path());
        r.err = read_file(err_path());
        return r;
    }

private:
    std::string out_path() const { return io_ / "out"; }
    std::string err_path() const { return io_ / "err"; }
    TempDir io_;
    pid_t pid_ = -1;
};

Run run_program(const std::vector<std::string>& argv, const std::map<std::string, std::optional<std::string>>& env = {},
                const std::string& stdin_text = {}) {
    return Spawned(argv, env, stdin_text).wait();
}

Run cli(const std::vector<std::string>& args, const std::map<std::string, std::optional<std::string>>& env = {}) {
    std::vector<std::string> argv = {BOTTOMLESS_CLI_PATH};
    argv.insert(argv.end(), args.begin(), args.end());
    // The database id comes from -d or the output's name, never from the
    // environment of whoever runs the tests.
    auto e = env;
    e.emplace("LIBSQL_BOTTOMLESS_DATABASE_ID", std::nullopt);
    Run r = run_program(argv, e);
    UNSCOPED_INFO("bottomless-cli exit " << r.code << "\nstdout: " << r.out << "\nstderr: " << r.err);
    return r;
}

// ---- SQLite ----

struct DbCloser {
    void operator()(sqlite3* db) const noexcept { sqlite3_close_v2(db); }
};
using Db = std::unique_ptr<sqlite3, DbCloser>;

void exec(sqlite3* db, const std::string& sql) {
    char* err = nullptr;
    int rc = sqlite3_exec(db, sql.c_str(), nullptr, nullptr, &err);
    std::string msg = err ? err : "";
    sqlite3_free(err);
    INFO(sql);
    REQUIRE(msg == "");
    REQUIRE(rc == SQLITE_OK);
}

std::string query_text(sqlite3* db, const std::string& sql) {
    sqlite3_stmt* st = nullptr;
    REQUIRE(sqlite3_prepare_v2(db, sql.c_str(), -1, &st, nullptr) == SQLITE_OK);
    std::string out;
    if (sqlite3_step(st) == SQLITE_ROW && sqlite3_column_text(st, 0))
        out = reinterpret_cast<const char*>(sqlite3_column_text(st, 0));
    sqlite3_finalize(st);
    return out;
}

// Row ids of table t in a database file (opened read-only with the plain VFS).
std::vector<int64_t> ids_in(const std::string& path) {
    sqlite3* raw = nullptr;
    REQUIRE(sqlite3_open_v2(path.c_str(), &raw, SQLITE_OPEN_READONLY, nullptr) == SQLITE_OK);
    Db db(raw);
    sqlite3_stmt* st = nullptr;
    REQUIRE(sqlite3_prepare_v2(db.get(), "SELECT id FROM t ORDER BY id", -1, &st, nullptr) == SQLITE_OK);
    std::vector<int64_t> ids;
    while (sqlite3_step(st) == SQLITE_ROW) ids.push_back(sqlite3_column_int64(st, 0));
    sqlite3_finalize(st);
    REQUIRE(query_text(db.get(), "PRAGMA integrity_check") == "ok");
    return ids;
}

std::vector<int64_t> range_ids(int64_t from, int64_t to) {
    std::vector<int64_t> v;
    for (int64_t i = from; i <= to; ++i) v.push_back(i);
    return v;
}

void load_extension_once() {
    static std::once_flag once;
    std::call_once(once, [] {
        sqlite3* raw = nullptr;
        REQUIRE(sqlite3_open(":memory:", &raw) == SQLITE_OK);
        Db db(raw);
        sqlite3_enable_load_extension(db.get(), 1);
        char* err = nullptr;
        int rc = sqlite3_load_extension(db.get(), BOTTOMLESS_EXT_PATH, nullptr, &err);
        std::string msg = err ? err : "";
        sqlite3_free(err);
        INFO(msg);
        REQUIRE(rc == SQLITE_OK);
    });
}

// A database replicated through the extension into `bucket`. Batches are
// shipped only by flush() (or at close), so the test decides what one
// segment holds.
class Writer {
public:
    Writer(const std::string& path, const std::string& bucket, const std::string& extra = "") {
        load_extension_once();
        std::string uri = "file:" + path + "?vfs=bottomless&bucket=" + bucket + "&batch_interval_ms=3600000" + extra;
        sqlite3* raw = nullptr;
        int rc = sqlite3_open_v2(uri.c_str(), &raw, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_URI,
                                 nullptr);
        db_.reset(raw);
        INFO((raw ? sqlite3_errmsg(raw) : "no handle"));
        REQUIRE(rc == SQLITE_OK);
        exec(db_.get(), "PRAGMA journal_mode=wal");
    }
    sqlite3* db() { return db_.get(); }
    void sql(const std::string& s) { exec(db_.get(), s); }
    void flush() {
        std::string r = query_text(db_.get(), "SELECT bottomless_flush()");
        INFO(r);
        REQUIRE(r.find("generation") != std::string::npos);
    }
    std::string snapshot() {
        std::string g = query_text(db_.get(), "SELECT bottomless_snapshot()");
        REQUIRE(g.size() == 25);
        return g;
    }
    void close() { db_.reset(); }

private:
    Db db_;
};

// Creates table t and ships it (the first generation's snapshot).
void setup_table(Writer& w) {
    w.sql("CREATE TABLE t(id INTEGER PRIMARY KEY, pad TEXT)");
    w.flush();
}

void insert(Writer& w, int64_t id) {
    w.sql("INSERT INTO t VALUES(" + std::to_string(id) + ", hex(randomblob(" + std::to_string(50 + id % 200) + ")))");
}

std::vector<s3::ObjectInfo> objects(s3::Client& c, const std::string& bucket, const std::string& prefix = "") {
    auto all = c.list_all(bucket, prefix);
    REQUIRE(all.ok());
    return *all;
}

json ls_json(const std::string& bucket, const std::string& db) {
    Run r = cli({"-b", bucket, "-d", db, "ls", "--json"});
    REQUIRE(r.code == 0);
    return json::parse(r.out);
}

// Two generations of app.db, written by one writer: table t (the older
// generation's snapshot), then one segment per entry of `older_segments`
// holding that many new rows (ids 1, 2, ...); a snapshot starts the newer
// generation, which gets one segment per entry of `newer_segments` likewise.
struct TwoGenerations {
    std::string older, newer;
    json ls;  // `ls --json` afterwards: generations[0] is the newer, [1] the older
};

TwoGenerations write_two_generations(const TempDir& dir, const std::string& bucket,
                                     const std::vector<int>& older_segments, const std::vector<int>& newer_segments) {
    TwoGenerations g;
    {
        Writer w(dir / "app.db", bucket);
        setup_table(w);
        int64_t id = 0;
        auto ship = [&](const std::vector<int>& segments) {
            for (int rows : segments) {
                for (int k = 0; k < rows; ++k) insert(w, ++id);
                w.flush();
            }
        };
        ship(older_segments);
        g.newer = w.snapshot();
        ship(newer_segments);
        w.close();
    }
    g.ls = ls_json(bucket, "app.db");
    REQUIRE(g.ls["generations"].size() == 2);
    REQUIRE(g.ls["generations"][0]["id"] == g.newer);
    g.older = g.ls["generations"][1]["id"];
    return g;
}

bool exists(const std::string& p) { return fs::exists(p); }

}  // namespace

// ---------------------------------------------------------------------------

TEST_CASE("cli: restore at a point in time holds exactly the transactions committed by then",
          "[cli][integration][pitr]") {
    auto client = testing::server_client();
    TestBucket bucket(*client, "cli-pitr");
    TempDir dir;
    const std::string db_path = dir / "app.db";

    struct Txn {
        int64_t before = 0, after = 0, commit = 0;
        std::string generation;
        uint64_t seq = 0;
    };
    constexpr int kTxns = 60;
    std::vector<Txn> txns(kTxns + 1);  // 1-based
    std::mt19937_64 rng(testing::test_seed());  // printed on failure; BOTTOMLESS_TEST_SEED repeats it
    {
        Writer w(db_path, bucket.name());
        setup_table(w);
        for (int i = 1; i <= kTxns; ++i) {
            txns[i].before = now_us();
            insert(w, i);
            txns[i].after = now_us();
            std::this_thread::sleep_for(std::chrono::microseconds(500 + rng() % 3000));
            if (i % 10 == 0) w.flush();       // segments of 10 transactions
            if (i == 30) (void)w.snapshot();  // a second generation from here
        }
        w.close();
    }

    // Commit times as the segments record them, in history order.
    json ls = ls_json(bucket.name(), "app.db");
    auto gens = ls["generations"];
    REQUIRE(gens.size() == 2);
    std::vector<Txn*> order;
    int next = 1;
    for (auto it = gens.rbegin(); it != gens.rend(); ++it) {
        std::string gen = (*it)["id"];
        for (uint64_t seq = 1; seq <= (*it)["last_seq"].get<uint64_t>(); ++seq) {
            std::string key = replicator::segment_key("app.db", gen, seq);
            auto body = client->get_object(bucket.name(), key);
            REQUIRE(body.ok());
            auto seg = replicator::decode_segment(*body, key);
            REQUIRE(seg.ok());
            for (const auto& t : seg->header.txns) {
                REQUIRE(next <= kTxns);
                txns[next].commit = t.commit_us;
                txns[next].generation = gen;
                txns[next].seq = seq;
                ++next;
            }
        }
    }
    REQUIRE(next == kTxns + 1);  // every transaction is in a segment, in order
    for (int i = 1; i <= kTxns; ++i) {
        INFO("txn " << i);
        CHECK(txns[i].before <= txns[i].commit);
        CHECK(txns[i].commit <= txns[i].after);
    }
    const int64_t first_state = gens.back()["first_txn_us"];  // the first snapshot: table t, no rows

    int restores = 0;
    auto check_at = [&](int64_t T, int style, const std::string& why) {
        INFO(why << ": T = " << rfc3339(T) << " given as '" << time_arg(T, style) << "'");
        const std::string out = dir / ("r" + std::to_string(restores++) + ".db");
        Run r = cli({"-b", bucket.name(), "-d", "app.db", "restore", "-q", "-o", out, "--utc-time", time_arg(T, style)});
        if (T < first_state) {
            CHECK(r.code == 3);
            CHECK_FALSE(exists(out));
            return;
        }
        REQUIRE(r.code == 0);
        auto ids = ids_in(out);
        // Exactly the transactions committed at or before T, as a prefix ...
        int64_t k = 0;
        while (k < kTxns && txns[k + 1].commit <= T) ++k;
        CHECK(ids == range_ids(1, k));
        // ... which is what the writer saw: every COMMIT that returned by T,
        // none that began after T.
        std::set<int64_t> got(ids.begin(), ids.end());
        for (int i = 1; i <= kTxns; ++i) {
            if (txns[i].after <= T) CHECK(got.count(i) == 1);
            if (txns[i].before > T) CHECK(got.count(i) == 0);
        }
        fs::remove(out);
    };

    SECTION("20 random times") {
        std::uniform_int_distribution<int64_t> pick(txns[1].before - 5'000, txns[kTxns].after + 5'000);
        for (int n = 0; n < 20; ++n) check_at(pick(rng), n % 3, "random");
        check_at(first_state - 1'000, 0, "before the first snapshot");
        check_at(now_us(), 0, "now");
    }
    SECTION("exact commit instants, and one microsecond before") {
        for (int i : {1, 10, 11, 30, 31, 45, kTxns}) {
            check_at(txns[i].commit, i % 3, "commit of txn " + std::to_string(i));
            check_at(txns[i].commit - 1, 0, "just before the commit of txn " + std::to_string(i));
        }
    }
    SECTION("between two commits of the same segment") {
        for (int i : {3, 17, 36, 54}) {
            REQUIRE(txns[i].seq == txns[i + 1].seq);
            REQUIRE(txns[i].generation == txns[i + 1].generation);
            check_at((txns[i].commit + txns[i + 1].commit) / 2, 1, "between txn " + std::to_string(i) + " and the next");
        }
    }
}

TEST_CASE("cli: restore --if-db-not-exists, --if-replica-exists and --force", "[cli][integration]") {
    auto client = testing::server_client();
    TestBucket bucket(*client, "cli-flags");
    TempDir dir;
    {
        Writer w(dir / "app.db", bucket.name());
        setup_table(w);
        for (int i = 1; i <= 5; ++i) insert(w, i);
        w.close();
    }
    // A local database that is not the replica.
    auto make_local = [&](const std::string& path) {
        fs::remove(path);
        sqlite3* raw = nullptr;
        REQUIRE(sqlite3_open(path.c_str(), &raw) == SQLITE_OK);
        Db db(raw);
        exec(db.get(), "CREATE TABLE t(id INTEGER PRIMARY KEY, pad TEXT); INSERT INTO t VALUES(42, 'local')");
    };

    struct Case {
        bool db_exists, replica;
        bool if_db_missing, if_replica;
        int code;
        const char* outcome;  // "restored", "untouched", "absent"
    };
    // Without flags an existing database is refused before the bucket is read.
    const Case cases[] = {
        {false, true, false, false, 0, "restored"},   {false, true, true, false, 0, "restored"},
        {false, true, false, true, 0, "restored"},    {false, true, true, true, 0, "restored"},
        {false, false, false, false, 3, "absent"},    {false, false, true, false, 3, "absent"},
        {false, false, false, true, 0, "absent"},     {false, false, true, true, 0, "absent"},
        {true, true, false, false, 1, "untouched"},   {true, true, true, false, 0, "untouched"},
        {true, true, false, true, 1, "untouched"},    {true, true, true, true, 0, "untouched"},
        {true, false, false, false, 1, "untouched"},  {true, false, true, false, 0, "untouched"},
        {true, false, false, true, 1, "untouched"},   {true, false, true, true, 0, "untouched"},
    };
    int n = 0;
    for (const auto& c : cases) {
        INFO("db exists " << c.db_exists << ", replica " << c.replica << ", --if-db-not-exists " << c.if_db_missing
                          << ", --if-replica-exists " << c.if_replica);
        // The id comes from the output's file name: app.db has a replica, other.db none.
        const std::string out = dir / ("case" + std::to_string(n++) + "/" + (c.replica ? "app.db" : "other.db"));
        fs::create_directories(fs::path(out).parent_path());
        if (c.db_exists) make_local(out);
        std::vector<std::string> args = {"-b", bucket.name(), "restore", "-o", out};
        if (c.if_db_missing) args.push_back("--if-db-not-exists");
        if (c.if_replica) args.push_back("--if-replica-exists");
        Run r = cli(args, {{"LIBSQL_BOTTOMLESS_DATABASE_ID", std::nullopt}});
        CHECK(r.code == c.code);
        std::string outcome = !exists(out) ? "absent" : ids_in(out) == std::vector<int64_t>{42} ? "untouched" : "restored";
        CHECK(outcome == c.outcome);
        if (outcome == "restored") CHECK(ids_in(out) == range_ids(1, 5));
        if (c.code == 1) CHECK(r.err.find("--force") != std::string::npos);
        if (c.code == 3) CHECK(r.err.find("app.db") != std::string::npos);  // lists the ids that exist
        CHECK_FALSE(exists(out + ".restore-tmp"));
    }

    SECTION("--force replaces an existing database, and its stale WAL") {
        const std::string out = dir / "force/app.db";
        fs::create_directories(fs::path(out).parent_path());
        make_local(out);
        { std::ofstream(out + "-wal") << "not a wal of this database"; }
        Run r = cli({"-b", bucket.name(), "restore", "-o", out, "--force"});
        REQUIRE(r.code == 0);
        CHECK_FALSE(exists(out + "-wal"));  // (reading the result below makes a new one)
        CHECK(ids_in(out) == range_ids(1, 5));
        CHECK(r.out.find("restored app.db") != std::string::npos);
    }
    SECTION("an empty file is no database") {
        const std::string out = dir / "empty/app.db";
        fs::create_directories(fs::path(out).parent_path());
        { std::ofstream f(out); }
        Run r = cli({"-b", bucket.name(), "restore", "-o", out});
        REQUIRE(r.code == 0);
        CHECK(ids_in(out) == range_ids(1, 5));
    }
    SECTION("default output: the database id in the current directory") {
        Run r = run_program({"/bin/sh", "-c", "cd '" + dir.path.string() + "' && mkdir cwd && cd cwd && exec '" +
                                                  BOTTOMLESS_CLI_PATH + "' -b " + bucket.name() +
                                                  " -d app.db restore -q"});
        REQUIRE(r.code == 0);
        CHECK(ids_in(dir / "cwd/app.db") == range_ids(1, 5));
    }
    SECTION("no such bucket") {
        const std::string out = dir / "nobucket.db";
        Run r = cli({"-b", bucket.name() + "-missing", "-d", "app.db", "restore", "-o", out});
        CHECK(r.code == 1);
        CHECK(r.err.find("NoSuchBucket") != std::string::npos);
        CHECK(r.err.find("--bucket") != std::string::npos);
        r = cli({"-b", bucket.name() + "-missing", "-d", "app.db", "restore", "-o", out, "--if-replica-exists"});
        CHECK(r.code == 0);
        CHECK_FALSE(exists(out));
    }
    SECTION("wrong credentials say so") {
        Run r = cli({"-b", bucket.name(), "-d", "app.db", "restore", "-o", dir / "creds.db"},
                    {{"AWS_SECRET_ACCESS_KEY", std::string("wrong-secret")}});
        CHECK(r.code == 1);
        CHECK(r.err.find("SignatureDoesNotMatch") != std::string::npos);
        CHECK(r.err.find("AWS_SECRET_ACCESS_KEY") != std::string::npos);
        CHECK_FALSE(exists(dir / "creds.db"));
    }
    SECTION("usage errors exit 2") {
        CHECK(cli({"restore", "--utc-time", "yesterday"}).code == 2);
        CHECK(cli({"restore", "--parallel", "0"}).code == 2);
        CHECK(cli({"restore", "--bogus"}).code == 2);
        CHECK(cli({"frobnicate"}).code == 2);
        CHECK(cli({"rm", "-b", "x", "-d", "y"}).code == 2);
        CHECK(cli({"--version"}).code == 0);
        for (const char* c : {"ls", "restore", "verify", "rm", "status"}) {
            Run r = cli({c, "--help"});
            CHECK(r.code == 0);
            CHECK(r.out.find("Usage: bottomless-cli") != std::string::npos);
        }
    }
}

TEST_CASE("cli: ls --json, status and -g of an older generation", "[cli][integration]") {
    auto client = testing::server_client();
    TestBucket bucket(*client, "cli-ls");
    TempDir dir;
    std::string older, newer;
    int64_t t0 = now_us();
    {
        Writer w(dir / "app.db", bucket.name());
        setup_table(w);
        for (int i = 1; i <= 3; ++i) insert(w, i);
        w.flush();
        newer = w.snapshot();
        for (int i = 4; i <= 5; ++i) insert(w, i);
        w.flush();
        insert(w, 6);
        w.flush();
        w.close();
    }
    int64_t t1 = now_us();

    json ls = ls_json(bucket.name(), "app.db");
    CHECK(ls["database"] == "app.db");
    CHECK(ls["bucket"] == bucket.name());
    auto& gens = ls["generations"];
    REQUIRE(gens.size() == 2);
    CHECK(gens[0]["id"] == newer);
    older = gens[1]["id"];
    CHECK(gens[0]["created_us"].get<int64_t>() > gens[1]["created_us"].get<int64_t>());
    CHECK(gens[0]["parent"] == older);
    CHECK(gens[0]["parent_seq"] == gens[1]["last_seq"]);
    CHECK(gens[1]["parent"].is_null());
    CHECK(gens[0]["segments"] == 2);
    CHECK(gens[1]["segments"] == 1);
    for (auto& g : gens) {
        CHECK(g["complete"] == true);
        CHECK(g["page_size"] == 4096);
        CHECK(g["objects"].get<uint64_t>() == g["segments"].get<uint64_t>() + 1);
        CHECK(g["bytes"].get<uint64_t>() == g["snapshot_bytes"].get<uint64_t>() + g["segment_bytes"].get<uint64_t>());
        int64_t first = g["first_txn_us"], last = g["last_txn_us"];
        CHECK(t0 <= first);
        CHECK(first <= last);
        CHECK(last <= t1);
        CHECK(g["last_txn"].get<std::string>() == rfc3339(last));
    }
    // The objects ls reports are the objects in the bucket.
    CHECK(objects(*client, bucket.name(), "app.db/").size() ==
          gens[0]["objects"].get<size_t>() + gens[1]["objects"].get<size_t>());

    SECTION("-l and -v") {
        Run r = cli({"-b", bucket.name(), "-d", "app.db", "ls", "--json", "-l", "1", "-v"});
        REQUIRE(r.code == 0);
        json j = json::parse(r.out);
        REQUIRE(j["generations"].size() == 1);
        CHECK(j["total_generations"] == 2);
        CHECK(j["generations"][0]["snapshot_sha256"].get<std::string>().size() == 64);
        CHECK(j["generations"][0]["last_segment_sha256"].get<std::string>().size() == 64);
        CHECK(j["generations"][0]["snapshot_format"] == 2);  // plaintext zstd: a page index
        r = cli({"-b", bucket.name(), "-d", "app.db", "ls", "-v"});
        REQUIRE(r.code == 0);
        CHECK(r.out.find(older) != std::string::npos);
        CHECK(r.out.find("format 2 (page index)") != std::string::npos);
        CHECK(r.out.find("sha256 last segment") != std::string::npos);
        r = cli({"-b", bucket.name(), "ls"}, {{"LIBSQL_BOTTOMLESS_DATABASE_ID", std::nullopt}});
        REQUIRE(r.code == 0);
        CHECK(r.out == "app.db\n");
    }
    SECTION("ls of an unknown id lists the ids that exist") {
        Run r = cli({"-b", bucket.name(), "-d", "nope.db", "ls"});
        CHECK(r.code == 3);
        CHECK(r.err.find("app.db") != std::string::npos);
    }
    SECTION("status") {
        Run r = cli({"-b", bucket.name(), "-d", "app.db", "status", "--json"});
        REQUIRE(r.code == 0);
        json s = json::parse(r.out);
        CHECK(s["generation"] == newer);
        CHECK(s["last_txn_us"] == gens[0]["last_txn_us"]);
        CHECK(s["segments"] == 2);
    }
    SECTION("-g restores the older generation, latest the newer") {
        Run r = cli({"-b", bucket.name(), "-d", "app.db", "restore", "-o", dir / "old.db", "-g", older});
        REQUIRE(r.code == 0);
        CHECK(ids_in(dir / "old.db") == range_ids(1, 3));
        CHECK(r.out.find(older) != std::string::npos);
        r = cli({"-b", bucket.name(), "-d", "app.db", "restore", "-o", dir / "new.db", "--parallel", "1"});
        REQUIRE(r.code == 0);
        CHECK(ids_in(dir / "new.db") == range_ids(1, 6));
        r = cli({"-b", bucket.name(), "-d", "app.db", "restore", "-o", dir / "none.db", "-g", "0000000000000000-00000000"});
        CHECK(r.code == 3);
        // -g with a time inside it: its state at that time.
        r = cli({"-b", bucket.name(), "-d", "app.db", "restore", "-o", dir / "t.db", "-g", newer, "--utc-time",
                 gens[0]["first_txn"]});
        REQUIRE(r.code == 0);
        CHECK(ids_in(dir / "t.db") == range_ids(1, 3));
        // ... and a time before it began is refused, not served from a later state.
        r = cli({"-b", bucket.name(), "-d", "app.db", "restore", "-o", dir / "t2.db", "-g", newer, "--utc-time",
                 rfc3339(gens[0]["first_txn_us"].get<int64_t>() - 1)});
        CHECK(r.code == 3);
        CHECK_FALSE(exists(dir / "t2.db"));
    }
    SECTION("verify and verify --all") {
        const std::string scratch = dir / "scratch";
        fs::create_directories(scratch);
        Run r = cli({"-b", bucket.name(), "-d", "app.db", "verify", "--temp-dir", scratch});
        CHECK(r.code == 0);
        CHECK(r.out.find("verdict: OK") != std::string::npos);
        CHECK(r.out.find("the page index matches") != std::string::npos);  // format 2: checked against the pages
        CHECK(fs::is_empty(scratch));  // nothing left behind, not even the restore's note or digests
        r = cli({"-b", bucket.name(), "-d", "app.db", "verify", "--all", "--json"});
        CHECK(r.code == 0);
        json v = json::parse(r.out);
        CHECK(v["ok"] == true);
        REQUIRE(v["generations"].size() == 2);
        CHECK(v["generations"][0]["transactions"] == 3);
        CHECK(v["generations"][1]["pages"].get<uint32_t>() > 0);
    }
    SECTION("a restored database replicates again: a new generation, parent recorded") {
        const std::string path = dir / "again/app.db";
        fs::create_directories(fs::path(path).parent_path());
        REQUIRE(cli({"-b", bucket.name(), "restore", "-q", "-o", path}).code == 0);
        {  // no initial_replication override: the restore's note vouches for the file
            Writer w(path, bucket.name());
            insert(w, 7);
            w.flush();
            w.close();
        }
        json after = ls_json(bucket.name(), "app.db");
        REQUIRE(after["generations"].size() == 3);
        CHECK(after["generations"][0]["parent"] == newer);
        CHECK(after["generations"][0]["parent_seq"] == 2);
        REQUIRE(cli({"-b", bucket.name(), "-d", "app.db", "restore", "-q", "-o", dir / "again2.db"}).code == 0);
        CHECK(ids_in(dir / "again2.db") == range_ids(1, 7));
    }
}

TEST_CASE("cli: rm keeps the newest restorable state and removes the rest", "[cli][integration][rm]") {
    auto client = testing::server_client();
    TestBucket bucket(*client, "cli-rm");
    TempDir dir;
    std::vector<std::string> ids;  // oldest first
    int64_t before_all = now_us() - 60'000'000;
    {
        Writer w(dir / "app.db", bucket.name());
        setup_table(w);
        int row = 0;
        for (int g = 0; g < 4; ++g) {
            if (g > 0) ids.push_back(w.snapshot());
            for (int i = 0; i < 2; ++i) {
                insert(w, ++row);
                w.flush();
            }
        }
        w.close();
    }
    json ls = ls_json(bucket.name(), "app.db");
    REQUIRE(ls["generations"].size() == 4);
    auto objects_of = [&](const std::string& gen) {
        return objects(*client, bucket.name(), replicator::generation_prefix("app.db", gen)).size();
    };
    const std::string newest = ls["generations"][0]["id"];
    const std::string second = ls["generations"][1]["id"];
    const size_t total = objects(*client, bucket.name()).size();
    REQUIRE(total == 4 + 8);  // 4 snapshots, 2 segments each
    auto rm = [&](std::vector<std::string> args) {
        std::vector<std::string> a = {"-b", bucket.name(), "-d", "app.db", "rm"};
        a.insert(a.end(), args.begin(), args.end());
        return cli(a);
    };

    SECTION("--dry-run removes nothing") {
        Run r = rm({"--keep", "1", "--dry-run"});
        REQUIRE(r.code == 0);
        CHECK(objects(*client, bucket.name()).size() == total);
        CHECK(r.out.find("would remove 3 generation(s), 9 object(s)") != std::string::npos);
        r = rm({"--older-than", "0s", "--dry-run", "--json"});
        REQUIRE(r.code == 0);
        json j = json::parse(r.out);
        CHECK(j["removed"].size() == 3);
        CHECK(j["newest_restorable"] == newest);
        CHECK(objects(*client, bucket.name()).size() == total);
    }
    SECTION("the newest restorable generation is refused without --force") {
        Run r = rm({"-g", newest});
        CHECK(r.code == 1);
        CHECK(r.err.find("--force") != std::string::npos);
        CHECK(objects(*client, bucket.name()).size() == total);
        CHECK(rm({"--keep", "0"}).code == 2);
        r = rm({"-g", second});
        REQUIRE(r.code == 0);
        CHECK(objects_of(second) == 0);
        CHECK(objects(*client, bucket.name()).size() == total - 3);
    }
    SECTION("--older-than a time before every generation removes nothing") {
        Run r = rm({"--older-than", rfc3339(before_all)});
        REQUIRE(r.code == 0);
        CHECK(objects(*client, bucket.name()).size() == total);
    }
    SECTION("--keep 2, then --older-than now") {
        Run r = rm({"--keep", "2"});
        REQUIRE(r.code == 0);
        CHECK(objects(*client, bucket.name()).size() == 3 + 3);
        CHECK(objects_of(newest) == 3);
        CHECK(objects_of(second) == 3);
        r = rm({"--older-than", "0s"});
        REQUIRE(r.code == 0);
        CHECK(objects(*client, bucket.name()).size() == 3);
        CHECK(objects_of(newest) == 3);
        REQUIRE(cli({"-b", bucket.name(), "-d", "app.db", "restore", "-q", "-o", dir / "r.db"}).code == 0);
        CHECK(ids_in(dir / "r.db") == range_ids(1, 8));
        CHECK(cli({"-b", bucket.name(), "-d", "app.db", "verify", "--all", "-q"}).code == 0);
        // --force takes the last one too; then there is nothing to restore.
        REQUIRE(rm({"-g", newest, "--force"}).code == 0);
        CHECK(objects(*client, bucket.name()).empty());
        CHECK(cli({"-b", bucket.name(), "-d", "app.db", "restore", "-o", dir / "r2.db"}).code == 3);
    }
    SECTION("more than 1000 objects: every listing page, batches of 1000") {
        // An old generation of 1200 objects (contents do not matter to rm).
        const std::string gen = replicator::new_generation_id(before_all / 1000);
        std::vector<std::future<bool>> puts;
        constexpr int kObjects = 1200, kThreads = 8;
        for (int t = 0; t < kThreads; ++t)
            puts.push_back(std::async(std::launch::async, [&, t] {
                for (int i = t; i < kObjects; i += kThreads) {
                    std::string key = i == 0 ? replicator::snapshot_key("app.db", gen)
                                             : replicator::segment_key("app.db", gen, static_cast<uint64_t>(i));
                    if (!client->put_object(bucket.name(), key, "x").ok()) return false;
                }
                return true;
            }));
        for (auto& p : puts) REQUIRE(p.get());
        REQUIRE(objects_of(gen) == kObjects);
        Run r = rm({"--keep", "4"});
        REQUIRE(r.code == 0);
        CHECK(objects_of(gen) == 0);
        CHECK(objects(*client, bucket.name()).size() == total);
    }
}

TEST_CASE("cli: a damaged object fails restore and verify, naming it", "[cli][integration][corrupt]") {
    auto client = testing::server_client();
    TestBucket bucket(*client, "cli-corrupt");
    TempDir dir;
    {
        Writer w(dir / "app.db", bucket.name());
        setup_table(w);
        int row = 0;
        for (int g = 0; g < 2; ++g) {
            if (g > 0) (void)w.snapshot();
            for (int s = 0; s < 3; ++s) {
                for (int i = 0; i < 20; ++i) insert(w, ++row);
                w.flush();
            }
        }
        w.close();
    }
    json ls = ls_json(bucket.name(), "app.db");
    REQUIRE(ls["generations"].size() == 2);
    const std::string newest = ls["generations"][0]["id"], older = ls["generations"][1]["id"];
    // Three flushes per generation: at least three segments (a slow run may
    // cut one more when a WAL restart stages frames between flushes).
    const uint64_t newest_last = ls["generations"][0]["last_seq"], older_last = ls["generations"][1]["last_seq"];
    REQUIRE(newest_last >= 3);
    REQUIRE(older_last >= 3);
    REQUIRE(cli({"-b", bucket.name(), "-d", "app.db", "verify", "--all", "-q"}).code == 0);

    enum class Damage { Flip, Truncate, Delete };
    const auto damage = GENERATE(Damage::Flip, Damage::Truncate, Damage::Delete);
    const std::string object = GENERATE(as<std::string>{}, "snapshot", "middle segment", "last segment");
    // The last segment of the newest generation: nothing in the bucket says
    // it existed once deleted (docs/CLI.md), so its deletion is tested on the
    // older generation, whose end its successor's snapshot records.
    const bool on_older = object == "last segment" && damage == Damage::Delete;
    const std::string gen = on_older ? older : newest;
    const std::string key = object == "snapshot"         ? replicator::snapshot_key("app.db", gen)
                            : object == "middle segment" ? replicator::segment_key("app.db", gen, 2)
                                                         : replicator::segment_key("app.db", gen, on_older ? older_last : newest_last);
    INFO("damage " << static_cast<int>(damage) << " to " << key);
    auto original = client->get_object(bucket.name(), key);
    REQUIRE(original.ok());
    switch (damage) {
    case Damage::Flip: {
        std::string bad = *original;
        bad[bad.size() / 2] = static_cast<char>(bad[bad.size() / 2] ^ 0x20);
        REQUIRE(client->put_object(bucket.name(), key, bad).ok());
        break;
    }
    case Damage::Truncate:
        REQUIRE(client->put_object(bucket.name(), key, original->substr(0, original->size() - 100)).ok());
        break;
    case Damage::Delete: REQUIRE(client->delete_object(bucket.name(), key).ok()); break;
    }

    const std::string out = dir / "out.db";
    std::vector<std::string> restore = {"-b", bucket.name(), "-d", "app.db", "restore", "-o", out};
    std::vector<std::string> verify = {"-b", bucket.name(), "-d", "app.db", "verify"};
    if (on_older) {
        restore.insert(restore.end(), {"-g", older});
        verify.insert(verify.end(), {"-g", older});
    }
    Run r = cli(restore);
    CHECK(r.code == 1);
    CHECK(r.err.find(key) != std::string::npos);
    CHECK(r.err.find("verify") != std::string::npos);  // says what to do
    CHECK_FALSE(exists(out));
    CHECK_FALSE(exists(out + ".restore-tmp"));
    r = cli(verify);
    CHECK(r.code == 1);
    CHECK(r.all().find(key) != std::string::npos);
    CHECK(r.out.find("verdict: FAILED") != std::string::npos);
    r = cli({"-b", bucket.name(), "-d", "app.db", "verify", "--all"});
    CHECK(r.code == 1);
    CHECK(r.all().find(key) != std::string::npos);
    // An existing database at -o survives a failed --force restore.
    {
        sqlite3* raw = nullptr;
        REQUIRE(sqlite3_open(out.c_str(), &raw) == SQLITE_OK);
        Db db(raw);
        exec(db.get(), "CREATE TABLE t(id INTEGER PRIMARY KEY, pad TEXT); INSERT INTO t VALUES(42, 'keep')");
    }
    r = cli({"-b", bucket.name(), "-d", "app.db", "restore", "-o", out, "--force", "-g", gen});
    CHECK(r.code == 1);
    CHECK(ids_in(out) == std::vector<int64_t>{42});

    // Put it back: everything verifies again.
    REQUIRE(client->put_object(bucket.name(), key, *original).ok());
    CHECK(cli({"-b", bucket.name(), "-d", "app.db", "verify", "--all", "-q"}).code == 0);
}

// ---- the chain check and the point-in-time boundary, each proven by a name ----

namespace {

// Restores through the library (the code the VFS's auto-restore and the CLI
// share) and returns the error code, or "" on success.
std::string restore_code(s3::Client& client, const std::string& bucket, const std::string& out,
                         const replicator::RestoreOptions& opt = {}, replicator::RestoreResult* result = nullptr,
                         const std::string& db_id = "app.db") {
    auto r = replicator::restore_database(client, bucket, db_id, out, opt);
    if (r.ok()) {
        if (result) *result = *r;
        return "";
    }
    UNSCOPED_INFO("restore_database: " << r.error().describe());
    return r.error().code;
}

replicator::DecodedSegment fetch_segment(s3::Client& client, const std::string& bucket, const std::string& key) {
    auto body = client.get_object(bucket, key);
    REQUIRE(body.ok());
    auto seg = replicator::decode_segment(*body, key);
    REQUIRE(seg.ok());
    return std::move(seg).value();
}

// Writes `seg` (edited) back under `key`, encoded afresh: its SHA-256 trailer
// is valid, so only the chain can tell that it does not belong there.
void put_segment(s3::Client& client, const std::string& bucket, const std::string& key,
                 const replicator::DecodedSegment& seg) {
    std::string sha;
    std::string bytes = replicator::encode_segment(seg.header, seg.frames, &sha);
    REQUIRE(replicator::decode_segment(bytes, key).ok());
    REQUIRE(client.put_object(bucket, key, bytes).ok());
}

}  // namespace

TEST_CASE("cli: a broken chain is refused by name: a foreign segment, a gap, a start that does not continue",
          "[cli][integration][corrupt][chain]") {
    auto client = testing::server_client();
    TestBucket bucket(*client, "cli-chain");
    TempDir dir;
    // Generation A: snapshot + 3 segments; generation B: snapshot + 3 segments.
    std::string older, newer;
    {
        Writer w(dir / "app.db", bucket.name());
        setup_table(w);
        int id = 0;
        for (int s = 0; s < 3; ++s) {
            insert(w, ++id);
            insert(w, ++id);
            w.flush();
        }
        newer = w.snapshot();
        for (int s = 0; s < 3; ++s) {
            insert(w, ++id);
            insert(w, ++id);
            w.flush();
        }
        w.close();
    }
    json ls = ls_json(bucket.name(), "app.db");
    REQUIRE(ls["generations"].size() == 2);
    REQUIRE(ls["generations"][0]["id"] == newer);
    older = ls["generations"][1]["id"];
    REQUIRE(ls["generations"][0]["last_seq"] == 3);
    // The first generation may hold its start-up transaction in a segment of
    // its own (when its snapshot was taken before it committed): >= 3.
    REQUIRE(ls["generations"][1]["last_seq"] >= 3);
    const std::string out = dir / "out.db";
    REQUIRE(restore_code(*client, bucket.name(), out).empty());  // intact, it restores
    CHECK(ids_in(out) == range_ids(1, 12));
    fs::remove(out);

    const std::string victim = replicator::segment_key("app.db", newer, 2);
    const auto original = fetch_segment(*client, bucket.name(), victim);
    std::string expect;

    SECTION("a segment of another generation, relabelled as this one's, trailer recomputed") {
        auto foreign = fetch_segment(*client, bucket.name(), replicator::segment_key("app.db", older, 2));
        foreign.header.generation = newer;
        put_segment(*client, bucket.name(), victim, foreign);
        expect = "ChainBroken";
    }
    SECTION("the same, with its start copied too: only the previous object's checksum differs") {
        auto foreign = fetch_segment(*client, bucket.name(), replicator::segment_key("app.db", older, 2));
        foreign.header.generation = newer;
        foreign.header.start = original.header.start;
        REQUIRE(foreign.header.prev_sha256 != original.header.prev_sha256);
        put_segment(*client, bucket.name(), victim, foreign);
        expect = "ChainBroken";
    }
    SECTION("a start that does not continue the previous end (the previous checksum is right)") {
        auto moved = original;
        moved.header.start.frame += 1;
        moved.header.start.cksum1 ^= 1;
        put_segment(*client, bucket.name(), victim, moved);
        expect = "ChainBroken";
    }
    SECTION("a missing middle segment") {
        REQUIRE(client->delete_object(bucket.name(), victim).ok());
        expect = "MissingSegment";
    }
    SECTION("a segment of this generation stored under the next one's key (not relabelled)") {
        auto first = client->get_object(bucket.name(), replicator::segment_key("app.db", newer, 1));
        REQUIRE(first.ok());
        REQUIRE(client->put_object(bucket.name(), victim, *first).ok());
        expect = "WrongObject";
    }

    // The library (restore_database: auto-restore and the CLI) names it ...
    CHECK(restore_code(*client, bucket.name(), out) == expect);
    CHECK_FALSE(exists(out));
    CHECK_FALSE(exists(out + ".restore-tmp"));
    // ... and so do the CLI's restore and verify, naming the object.
    Run r = cli({"-b", bucket.name(), "-d", "app.db", "restore", "-o", out});
    CHECK(r.code == 1);
    CHECK(r.err.find(victim) != std::string::npos);
    CHECK_FALSE(exists(out));
    r = cli({"-b", bucket.name(), "-d", "app.db", "verify"});
    CHECK(r.code == 1);
    CHECK(r.all().find(victim) != std::string::npos);
    // A point in time that the segment before the damage proves complete is
    // still served (from the same generation).
    replicator::RestoreOptions before;
    before.generation = newer;
    before.until_us = fetch_segment(*client, bucket.name(), replicator::segment_key("app.db", newer, 1))
                          .header.txns.front()
                          .commit_us;
    REQUIRE(restore_code(*client, bucket.name(), out, before).empty());
    CHECK(ids_in(out) == range_ids(1, 7));
}

TEST_CASE("cli: point in time: a commit at exactly T is restored, one microsecond later is not",
          "[cli][integration][pitr]") {
    auto client = testing::server_client();
    TestBucket bucket(*client, "cli-pitr-edge");
    TempDir dir;
    // Generation A: snapshot (table t), segment 1 = rows 1..3, segment 2 =
    // rows 4..6; generation B: a snapshot of rows 1..6 and nothing else.
    TwoGenerations g = write_two_generations(dir, bucket.name(), {3, 3}, {});
    const std::string &older = g.older, &newer = g.newer;
    REQUIRE(g.ls["generations"][0]["segments"] == 0);
    std::vector<int64_t> commit(7);  // commit[id], from the segments
    for (uint64_t seq : {1, 2}) {
        auto seg = fetch_segment(*client, bucket.name(), replicator::segment_key("app.db", older, seq));
        REQUIRE(seg.header.txns.size() == 3);
        for (int k = 0; k < 3; ++k) commit[static_cast<size_t>((seq - 1) * 3 + k + 1)] = seg.header.txns[k].commit_us;
    }
    int n = 0;
    // Restores the state at T through the library; checks the rows and, if
    // given, the generation it came from.
    auto check_at = [&](int64_t T, int rows, const std::string& generation, const std::string& from = {}) {
        INFO("T = " << rfc3339(T) << " (" << T << "), generation " << (generation.empty() ? "any" : generation));
        replicator::RestoreOptions opt;
        opt.until_us = T;
        opt.generation = generation;
        replicator::RestoreResult res;
        const std::string out = dir / ("r" + std::to_string(n++) + ".db");
        REQUIRE(restore_code(*client, bucket.name(), out, opt, &res).empty());
        CHECK(ids_in(out) == range_ids(1, rows));
        if (!from.empty()) CHECK(res.generation == from);
        fs::remove(out);
    };

    SECTION("inside a segment, at the first transaction of a segment, at the last of a generation") {
        for (int k : {2, 4, 6}) {
            INFO("transaction " << k << " committed at " << rfc3339(commit[static_cast<size_t>(k)]));
            check_at(commit[static_cast<size_t>(k)], k, older);
            check_at(commit[static_cast<size_t>(k)] - 1, k - 1, older);
        }
        // The CLI, in each accepted time syntax.
        for (int style : {0, 1, 2}) {
            const std::string out = dir / ("cli" + std::to_string(style) + ".db");
            Run r = cli({"-b", bucket.name(), "-d", "app.db", "restore", "-q", "-o", out, "-g", older, "--utc-time",
                         time_arg(commit[5], style)});
            REQUIRE(r.code == 0);
            CHECK(ids_in(out) == range_ids(1, 5));
        }
    }
    SECTION("a generation whose snapshot was taken at exactly T serves T; at T - 1 µs the older one does") {
        // Make B's snapshot record its last commit at the instant its id
        // names (re-encoded, trailer valid): then T = that instant is the
        // boundary of both the generation choice (id time) and the snapshot
        // check (last commit), in the library and in the CLI.
        const std::string key = replicator::snapshot_key("app.db", newer);
        const int64_t T = replicator::generation_time_ms(newer) * 1000;
        REQUIRE(T > commit[6]);
        auto body = client->get_object(bucket.name(), key);
        REQUIRE(body.ok());
        std::vector<std::string> pages;
        replicator::SnapshotReader reader(key, [&](uint32_t, std::string_view p) {
            pages.emplace_back(p);
            return Status{};
        });
        REQUIRE(reader.feed(*body).ok());
        auto header = reader.finish();
        REQUIRE(header.ok());
        replicator::SnapshotHeader h = *header;
        h.last_commit_us = T;
        std::string rewritten;
        replicator::SnapshotWriter writer(h, [&](std::string_view b) {
            rewritten.append(b);
            return Status{};
        });
        for (const auto& p : pages) REQUIRE(writer.add_page(p).ok());
        REQUIRE(writer.finish().ok());
        REQUIRE(client->put_object(bucket.name(), key, rewritten).ok());

        check_at(T, 6, "", newer);
        check_at(T - 1, 6, "", older);
        check_at(commit[6], 6, "", older);
        check_at(commit[6] - 1, 5, "", older);
        // The CLI chooses the generation itself (cli/history.cpp): the same boundary.
        for (auto [t, gen] : {std::make_pair(T, newer), std::make_pair(T - 1, older)}) {
            INFO("T = " << rfc3339(t));
            Run r = cli({"-b", bucket.name(), "-d", "app.db", "restore", "--json", "-o", dir / "c.db", "--utc-time",
                         rfc3339(t)});
            REQUIRE(r.code == 0);
            CHECK(json::parse(r.out)["generation"] == gen);
            CHECK(ids_in(dir / "c.db") == range_ids(1, 6));
            fs::remove(dir / "c.db");
        }
    }
}

// ---- what a restore costs in requests ----

namespace {

// S3 requests the CLI made, by operation, from its trace log (first
// attempts only: a retry is the network's doing, not the plan's).
std::map<std::string, int> traced_requests(const std::string& err) {
    std::map<std::string, int> n;
    std::istringstream in(err);
    for (std::string line; std::getline(in, line);) {
        auto t = line.find(" TRACE ");
        if (t == std::string::npos || line.find(" attempt 1 ") == std::string::npos) continue;
        std::string op = line.substr(t + 7, line.find(' ', t + 7) - (t + 7));
        ++n[op];
    }
    return n;
}

}  // namespace

TEST_CASE("cli: a restore makes one listing pass, one header read per object it weighs, then the GETs",
          "[cli][integration][requests]") {
    auto client = testing::server_client();
    TestBucket bucket(*client, "cli-requests");
    TempDir dir;
    // Generation A: snapshot + segments; generation B: snapshot + 3 segments.
    TwoGenerations g = write_two_generations(dir, bucket.name(), {1, 1}, {1, 1, 1});
    const std::string &older = g.older, &newer = g.newer;
    json& ls = g.ls;
    REQUIRE(ls["generations"][0]["last_seq"] == 3);
    const uint64_t older_last = ls["generations"][1]["last_seq"];
    const int64_t older_end = ls["generations"][1]["last_txn_us"];
    REQUIRE(older_last >= 2);
    REQUIRE(int64_t{ls["generations"][0]["first_txn_us"]} > older_end);

    struct Case {
        const char* what;
        std::string generation;
        std::optional<int64_t> until_us;
        std::string expect_generation;
        uint64_t lists, gets;
    };
    // Listing: the generations, then each generation looked at (the chosen
    // one, and for an older one its successor, whose snapshot records where
    // the older ended). Header reads: one per snapshot weighed. Then the
    // snapshot and each segment applied, once (one download at a time here).
    const std::vector<Case> cases = {
        {"latest", "", std::nullopt, newer, 2, 1 + 1 + 3},
        {"-g of the older generation", older, std::nullopt, older, 3, 2 + 1 + older_last},
        {"a point in time in the older generation", "", older_end, older, 3, 2 + 1 + older_last},
    };
    int n = 0;
    for (const auto& c : cases) {
        INFO(c.what);
        // The library: restore_database(), as auto-restore calls it.
        auto counting = testing::server_client();
        replicator::RestoreOptions opt;
        opt.generation = c.generation;
        opt.until_us = c.until_us;
        opt.parallel = 1;
        const std::string out = dir / ("r" + std::to_string(n++) + ".db");
        auto r = replicator::restore_database(*counting, bucket.name(), "app.db", out, opt);
        REQUIRE(r.ok());
        CHECK(r->generation == c.expect_generation);
        const auto st = counting->stats();
        CHECK(st.lists == c.lists);
        CHECK(st.gets == c.gets);
        CHECK(st.requests - st.retries == c.lists + c.gets);  // nothing else: no HEAD, no PUT
        fs::remove(out);

        // The CLI: the same plan, the same requests.
        std::vector<std::string> args = {"-b", bucket.name(), "-d", "app.db", "restore", "-q", "-j", "1", "-o", out};
        if (!c.generation.empty()) args.insert(args.end(), {"-g", c.generation});
        if (c.until_us) args.insert(args.end(), {"--utc-time", rfc3339(*c.until_us)});
        Run cr = cli(args, {{"LIBSQL_BOTTOMLESS_LOG", "trace"}});
        REQUIRE(cr.code == 0);
        auto traced = traced_requests(cr.err);
        INFO(cr.err);
        CHECK(traced["ListObjectsV2"] == static_cast<int>(c.lists));
        CHECK(traced["GetObject"] == static_cast<int>(c.gets));
        CHECK(traced.size() == 2);
        fs::remove(out);
    }
}

TEST_CASE("cli: a 64 MiB database: multipart snapshot upload, parallel ranged-GET restore", "[cli][integration][large]") {
    // Sizes past the thresholds: a snapshot object above the client's part
    // size goes up multipart (s3/config.h part_size, 8 MiB), one above 16 MiB
    // comes down as parallel 8 MiB ranged GETs (restore.cpp). Random rows, so
    // zstd cannot shrink the object below either.
    auto client = testing::server_client();
    TestBucket bucket(*client, "cli-large");
    TempDir dir;
    const std::string db_path = dir / "big.db";
    constexpr int kRows = 264, kRowBytes = 256 * 1024;  // 66 MiB of blobs
    {
        sqlite3* raw = nullptr;
        REQUIRE(sqlite3_open(db_path.c_str(), &raw) == SQLITE_OK);
        Db db(raw);
        exec(db.get(), "PRAGMA journal_mode=wal; CREATE TABLE t(id INTEGER PRIMARY KEY, b BLOB); BEGIN");
        for (int i = 1; i <= kRows; ++i)
            exec(db.get(), "INSERT INTO t VALUES(" + std::to_string(i) + ", randomblob(" + std::to_string(kRowBytes) + "))");
        exec(db.get(), "COMMIT; PRAGMA wal_checkpoint(TRUNCATE)");
    }
    REQUIRE(fs::file_size(db_path) >= (64ull << 20));
    // Opened with bottomless, the existing file becomes the first snapshot.
    {
        Writer w(db_path, bucket.name());
        w.flush();
        w.close();
    }
    auto listed = objects(*client, bucket.name(), "big.db/");
    REQUIRE(listed.size() == 1);  // the snapshot alone
    const auto& snap = listed[0];
    INFO("snapshot " << snap.key << ", " << snap.size << " bytes, ETag " << snap.etag);
    REQUIRE(snap.size >= (64ull << 20));
    // A multipart object's ETag is "<md5 of the part md5s>-<parts>".
    const auto dash = snap.etag.rfind('-');
    REQUIRE(dash != std::string::npos);
    CHECK(std::stoul(snap.etag.substr(dash + 1)) >= 8);

    // The library, with a fresh client so its counters hold this restore only.
    const std::string out = dir / "restored.db";
    auto restorer = testing::server_client();
    replicator::RestoreOptions opt;
    opt.parallel = 4;
    replicator::RestoreResult res;
    REQUIRE(restore_code(*restorer, bucket.name(), out, opt, &res, "big.db").empty());
    const uint64_t chunks = (snap.size + (8ull << 20) - 1) / (8ull << 20);
    // One GET of the header, then one ranged GET per 8 MiB (a whole-object
    // GET would make it 2).
    CHECK(restorer->stats().gets >= chunks + 1);
    CHECK(res.bytes_downloaded >= snap.size);

    auto same_rows = [&](const std::string& restored) {
        sqlite3* raw = nullptr;
        REQUIRE(sqlite3_open_v2(db_path.c_str(), &raw, SQLITE_OPEN_READONLY, nullptr) == SQLITE_OK);
        Db db(raw);
        exec(db.get(), "ATTACH '" + restored + "' AS r");
        CHECK(query_text(db.get(), "PRAGMA r.integrity_check") == "ok");
        CHECK(query_text(db.get(), "SELECT count(*) FROM r.t") == std::to_string(kRows));
        CHECK(query_text(db.get(), "SELECT count(*) FROM t JOIN r.t AS rt USING(id) WHERE t.b = rt.b") ==
              std::to_string(kRows));
    };
    same_rows(out);

    // The CLI (default --parallel 4).
    const std::string out2 = dir / "cli.db";
    Run r = cli({"-b", bucket.name(), "-d", "big.db", "restore", "-q", "-o", out2});
    REQUIRE(r.code == 0);
    same_rows(out2);

    // One download thread or eight: the parts are applied in order, the
    // same file comes out (the decoder, hasher and writer threads change
    // nothing but the time).
    const std::string reference = read_file(out);
    for (int parallel : {1, 8}) {
        INFO("parallel " << parallel);
        const std::string o = dir / ("p" + std::to_string(parallel) + ".db");
        opt.parallel = parallel;
        REQUIRE(restore_code(*restorer, bucket.name(), o, opt, &res, "big.db").empty());
        CHECK(read_file(o) == reference);
    }

    // The trailer of a snapshot in parts is checked beside the decoding
    // (restore.cpp SideHasher): one flipped bit in the trailer, or in a page
    // in the middle of a part (a stored zstd block has no checksum of its
    // own), fails the restore by the object's name and leaves nothing.
    auto body = client->get_object(bucket.name(), snap.key);
    REQUIRE(body.ok());
    const std::string original = *body;
    for (uint64_t at : {uint64_t{original.size() - 1}, uint64_t{(5ull << 20) * 3 + 12345}}) {
        INFO("flipped byte at " << at);
        std::string bad = original;
        bad[at] = static_cast<char>(bad[at] ^ 0x10);
        REQUIRE(client->put_object(bucket.name(), snap.key, bad).ok());
        const std::string o = dir / "bad.db";
        opt.parallel = 4;
        CHECK(restore_code(*restorer, bucket.name(), o, opt, &res, "big.db") == "CorruptObject");
        CHECK_FALSE(fs::exists(o));
        CHECK_FALSE(fs::exists(o + ".restore-tmp"));
    }
}

TEST_CASE("cli: restore-before-start.sh", "[cli][integration][script]") {
    if (testing::sanitizer_build())
        BOTTOMLESS_SKIP("sanitizer build without a sanitizer runtime to preload into the sqlite3 shell");
    auto client = testing::server_client();
    TestBucket bucket(*client, "cli-script");
    TempDir dir;
    fs::create_directories(dir.path / "src");
    {
        Writer w(dir / "src/app.db", bucket.name());
        setup_table(w);
        for (int i = 1; i <= 4; ++i) insert(w, i);
        w.close();
    }
    const std::string script = std::string(BOTTOMLESS_SCRIPTS_DIR) + "/restore-before-start.sh";
    const std::map<std::string, std::optional<std::string>> env = {
        {"BOTTOMLESS_CLI", std::string(BOTTOMLESS_CLI_PATH)},
        {"LIBSQL_BOTTOMLESS_BUCKET", bucket.name()},
        {"LIBSQL_BOTTOMLESS_DATABASE_ID", std::nullopt},
        {"LIBSQL_BOTTOMLESS_INITIAL_REPLICATION", std::nullopt},
    };
    // The command records that it ran and what it was given.
    auto command = [&](const std::string& marker) {
        return std::vector<std::string>{"/bin/sh", "-c",
                                        "echo \"ran ${LIBSQL_BOTTOMLESS_INITIAL_REPLICATION:-unset} $*\" > '" + marker +
                                            "'; echo command-stdout",
                                        "sh", "arg1"};
    };
    auto run_script = [&](const std::string& db, const std::string& marker,
                          std::map<std::string, std::optional<std::string>> extra = {},
                          std::vector<std::string> opts = {}) {
        std::vector<std::string> argv = {"/bin/bash", script};
        argv.insert(argv.end(), opts.begin(), opts.end());
        argv.push_back(db);
        argv.push_back("--");
        for (auto& a : command(marker)) argv.push_back(a);
        auto e = env;
        for (auto& [k, v] : extra) e[k] = v;
        Run r = run_program(argv, e);
        UNSCOPED_INFO("script exit " << r.code << "\nstdout: " << r.out << "\nstderr: " << r.err);
        return r;
    };

    SECTION("database present: the command runs, nothing is restored") {
        const std::string db = dir / "present/app.db";
        fs::create_directories(fs::path(db).parent_path());
        {
            sqlite3* raw = nullptr;
            REQUIRE(sqlite3_open(db.c_str(), &raw) == SQLITE_OK);
            Db h(raw);
            exec(h.get(), "CREATE TABLE t(id INTEGER PRIMARY KEY, pad TEXT); INSERT INTO t VALUES(42, 'local')");
        }
        Run r = run_script(db, dir / "m1");
        REQUIRE(r.code == 0);
        CHECK(read_file(dir / "m1") == "ran unset arg1\n");
        CHECK(r.out == "command-stdout\n");  // the command's stdout is its own
        CHECK(ids_in(db) == std::vector<int64_t>{42});
        CHECK(r.err.find("exists") != std::string::npos);
    }
    SECTION("database missing, replica in the bucket: restored, then the command runs") {
        const std::string db = dir / "fresh/data/app.db";  // the directory is created too
        Run r = run_script(db, dir / "m2");
        REQUIRE(r.code == 0);
        CHECK(ids_in(db) == range_ids(1, 4));
        CHECK(read_file(dir / "m2") == "ran unset arg1\n");
        CHECK(r.out == "command-stdout\n");
        CHECK(r.err.find("restored " + db) != std::string::npos);
    }
    SECTION("the application the script starts replicates the restored file again") {
        const std::string db = dir / "app/app.db";
        Run app = run_program({"/bin/bash", script, db, "--", testing::sqlite3_shell()}, env,
                              std::string(".load ") + BOTTOMLESS_EXT_PATH + "\n.open file:" + db +
                                  "?vfs=bottomless\nINSERT INTO t VALUES(5, 'after restore');\n"
                                  "SELECT bottomless_flush();\n");
        INFO(app.out << app.err);
        REQUIRE(app.code == 0);
        CHECK(app.err.find("Error") == std::string::npos);
        json ls = ls_json(bucket.name(), "app.db");
        REQUIRE(ls["generations"].size() == 2);
        CHECK(ls["generations"][0]["parent"] == ls["generations"][1]["id"]);
        REQUIRE(cli({"-b", bucket.name(), "-d", "app.db", "restore", "-q", "-o", dir / "check.db"}).code == 0);
        CHECK(ids_in(dir / "check.db") == range_ids(1, 5));
        // Started again, the file is present: no restore, replication continues.
        Run again = run_program({"/bin/bash", script, db, "--", testing::sqlite3_shell()}, env,
                                std::string(".load ") + BOTTOMLESS_EXT_PATH + "\n.open file:" + db +
                                    "?vfs=bottomless\nINSERT INTO t VALUES(6, 'second start');\n"
                                    "SELECT bottomless_flush();\n");
        INFO(again.out << again.err);
        REQUIRE(again.code == 0);
        CHECK(again.err.find("Error") == std::string::npos);
        REQUIRE(cli({"-b", bucket.name(), "-d", "app.db", "restore", "-q", "-o", dir / "check2.db"}).code == 0);
        CHECK(ids_in(dir / "check2.db") == range_ids(1, 6));
    }
    SECTION("database missing, no replica: the command runs on a new database") {
        const std::string db = dir / "new/other.db";
        Run r = run_script(db, dir / "m3");
        REQUIRE(r.code == 0);
        CHECK(read_file(dir / "m3") == "ran unset arg1\n");
        CHECK_FALSE(exists(db));
        CHECK(r.err.find("no replica") != std::string::npos);
        r = run_script(dir / "new2/app.db", dir / "m4", {{"LIBSQL_BOTTOMLESS_BUCKET", bucket.name() + "-none"}});
        REQUIRE(r.code == 0);
        CHECK(exists(dir / "m4"));
    }
    SECTION("a restore was needed and failed: the command does not run") {
        const std::string db = dir / "fail/app.db";
        Run r = run_script(db, dir / "m5", {{"AWS_SECRET_ACCESS_KEY", std::string("wrong-secret")}});
        CHECK(r.code == 1);
        CHECK_FALSE(exists(dir / "m5"));
        CHECK_FALSE(exists(db));
        CHECK(r.err.find("not starting") != std::string::npos);
        // A damaged replica too.
        auto snap = objects(*client, bucket.name(), "app.db/");
        for (const auto& o : snap)
            if (o.key.size() > 9 && o.key.substr(o.key.size() - 9) == "/snapshot")
                REQUIRE(client->put_object(bucket.name(), o.key, "garbage").ok());
        r = run_script(db, dir / "m6");
        CHECK(r.code == 1);
        CHECK_FALSE(exists(dir / "m6"));
        CHECK_FALSE(exists(db));
        CHECK(r.err.find("snapshot") != std::string::npos);
    }
    SECTION("usage") {
        Run r = run_program({"/bin/bash", script, dir / "x.db"}, env);
        CHECK(r.code == 2);
        r = run_program({"/bin/bash", script, "--", "true"}, env);
        CHECK(r.code == 2);
    }
}

TEST_CASE("cli: an encrypted replica: ls without the key, restore and verify with it", "[cli][integration][encryption]") {
    auto client = testing::server_client();
    TestBucket bucket(*client, "cli-enc");
    TempDir dir;
    const std::string key = "8d1e36a0c4b7f2e95a6c3b1d0e9f8a7b6c5d4e3f2a1b0c9d8e7f6a5b4c3d2e1f";
    const std::string other = "1f2e3d4c5b6a79880796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0";
    const std::string pass = "cli-test-passphrase-7";
    for (const auto& [db, extra] : std::vector<std::pair<std::string, std::string>>{
             {"k.db", "&encryption_key=" + key}, {"p.db", "&encryption_passphrase=" + pass}}) {
        Writer w(dir / db, bucket.name(), extra);
        setup_table(w);
        for (int i = 1; i <= 20; ++i) insert(w, i);
        w.flush();
        w.close();
    }
    const std::string out = dir / "out.db";
    const std::vector<std::string> base = {"-b", bucket.name(), "-d", "k.db"};
    auto with = [&](std::vector<std::string> extra) {
        std::vector<std::string> a = base;
        a.insert(a.end(), extra.begin(), extra.end());
        return a;
    };

    SECTION("ls needs no key; with one it says which generations it opens") {
        Run r = cli(with({"ls"}));
        REQUIRE(r.code == 0);
        CHECK(r.out.find("GENERATION") != std::string::npos);
        json j = ls_json(bucket.name(), "k.db");
        REQUIRE(j["generations"].size() == 1);
        CHECK(j["generations"][0]["encrypted"] == true);
        CHECK(j["generations"][0]["snapshot_format"] == 1);  // no page index for encrypted snapshots
        CHECK(j["generations"][0]["snapshot_bytes"].get<uint64_t>() > 0);
        CHECK_FALSE(j["generations"][0].contains("key_matches"));
        r = cli(with({"ls", "-v", "--json", "--encryption-key", key}));
        REQUIRE(r.code == 0);
        CHECK(json::parse(r.out)["generations"][0]["key_matches"] == true);
        r = cli(with({"ls", "-v"}), {{"LIBSQL_BOTTOMLESS_ENCRYPTION_KEY", other}});
        REQUIRE(r.code == 0);
        CHECK(r.out.find("(not the given key)") != std::string::npos);
    }
    SECTION("restore and verify with the key, from the option or the environment") {
        Run r = cli(with({"restore", "-o", out, "--encryption-key", key}));
        REQUIRE(r.code == 0);
        CHECK(ids_in(out) == range_ids(1, 20));
        fs::remove(out);
        r = cli(with({"restore", "-o", out}), {{"LIBSQL_BOTTOMLESS_ENCRYPTION_KEY", key}});
        REQUIRE(r.code == 0);
        CHECK(ids_in(out) == range_ids(1, 20));
        r = cli(with({"verify", "--all"}), {{"LIBSQL_BOTTOMLESS_ENCRYPTION_KEY", key}});
        CHECK(r.code == 0);
    }
    SECTION("a passphrase") {
        Run r = cli({"-b", bucket.name(), "-d", "p.db", "restore", "-o", out, "--encryption-passphrase", pass});
        REQUIRE(r.code == 0);
        CHECK(ids_in(out) == range_ids(1, 20));
        fs::remove(out);
        r = cli({"-b", bucket.name(), "-d", "p.db", "restore", "-o", out, "--encryption-passphrase", pass + "x"});
        CHECK(r.code == 1);
        CHECK(r.err.find("wrong encryption key") != std::string::npos);
        CHECK(r.err.find(pass) == std::string::npos);
        CHECK_FALSE(exists(out));
    }
    SECTION("a wrong key, no key, a key for a plaintext replica: named, and nothing at -o") {
        Run r = cli(with({"restore", "-o", out, "--encryption-key", other}));
        CHECK(r.code == 1);
        CHECK(r.err.find("wrong encryption key") != std::string::npos);
        CHECK(r.err.find("hint:") != std::string::npos);
        CHECK(r.err.find(other) == std::string::npos);
        CHECK_FALSE(exists(out));
        CHECK_FALSE(exists(out + ".restore-tmp"));
        r = cli(with({"restore", "-o", out}));
        CHECK(r.code == 1);
        CHECK(r.err.find("is encrypted") != std::string::npos);
        CHECK(r.err.find("--encryption-key") != std::string::npos);
        CHECK_FALSE(exists(out));
        r = cli(with({"verify"}));
        CHECK(r.code == 1);
        CHECK(r.all().find("is encrypted") != std::string::npos);

        Writer w(dir / "plain.db", bucket.name());
        setup_table(w);
        w.close();
        r = cli({"-b", bucket.name(), "-d", "plain.db", "restore", "-o", out, "--encryption-key", key});
        CHECK(r.code == 1);
        CHECK(r.err.find("is not encrypted") != std::string::npos);
        CHECK_FALSE(exists(out));
    }
    SECTION("a malformed key is a usage error that does not echo it") {
        Run r = cli(with({"restore", "-o", out, "--encryption-key", key.substr(0, 40)}));
        CHECK(r.code == 2);
        CHECK(r.err.find("--encryption-key") != std::string::npos);
        CHECK(r.err.find(key.substr(0, 40)) == std::string::npos);
        r = cli(with({"ls", "--encryption-key", key, "--encryption-passphrase", pass}));
        CHECK(r.code == 2);
    }
}

// ---- --integrity-check (issue 15) ----

TEST_CASE("cli: --integrity-check full finds an index that disagrees with its table, quick and none do not",
          "[cli][integration][restore][integrity]") {
    // A snapshot with a valid trailer whose table row no longer matches its
    // index entry: the bytes are what "the writer shipped", so only the full
    // check (every index against its table) can tell. quick_check checks
    // every page and b-tree, not index contents.
    auto client = testing::server_client();
    TestBucket bucket(*client, "cli-integrity");
    TempDir dir;
    const std::string src = dir / "src.db";
    {
        sqlite3* raw = nullptr;
        REQUIRE(sqlite3_open(src.c_str(), &raw) == SQLITE_OK);
        Db db(raw);
        exec(db.get(), "PRAGMA page_size=4096; CREATE TABLE t(id INTEGER PRIMARY KEY, x TEXT); "
                       "CREATE INDEX tx ON t(x); INSERT INTO t VALUES(1, 'MARKER-AAAA')");
    }
    std::string bytes = read_file(src);
    REQUIRE(bytes.size() % 4096 == 0);
    // Page 2 is the table (created first), page 3 its index: change the row only.
    const size_t at = bytes.find("MARKER-AAAA", 4096);
    REQUIRE(at != std::string::npos);
    REQUIRE(at < 8192);
    bytes.replace(at, 11, "MARKER-BBBB");
    {
        std::ofstream(src, std::ios::binary | std::ios::trunc) << bytes;
        sqlite3* raw = nullptr;
        REQUIRE(sqlite3_open(src.c_str(), &raw) == SQLITE_OK);
        Db db(raw);
        REQUIRE(query_text(db.get(), "PRAGMA quick_check") == "ok");
        REQUIRE(query_text(db.get(), "PRAGMA integrity_check") != "ok");
    }
    const std::string gen = replicator::new_generation_id(1790000000000);
    {
        replicator::SnapshotHeader h;
        h.db_id = "idx.db";
        h.generation = gen;
        h.page_size = 4096;
        h.db_pages = static_cast<uint32_t>(bytes.size() / 4096);
        h.created_us = h.last_commit_us = 1790000000000000;
        h.position = {1, 2, 0, 3, 4};
        std::string obj;
        replicator::SnapshotWriter w(h, [&](std::string_view p) -> Status {
            obj.append(p);
            return {};
        });
        for (size_t off = 0; off < bytes.size(); off += 4096) REQUIRE(w.add_page(std::string_view(bytes).substr(off, 4096)).ok());
        REQUIRE(w.finish().ok());
        REQUIRE(client->put_object(bucket.name(), replicator::snapshot_key("idx.db", gen), obj).ok());
    }
    const std::string out = dir / "idx.db";
    auto restore = [&](std::vector<std::string> extra) {
        std::vector<std::string> args = {"-b", bucket.name(), "-d", "idx.db", "restore", "-o", out, "--force"};
        args.insert(args.end(), extra.begin(), extra.end());
        return cli(args);
    };

    Run r = restore({"--integrity-check", "full"});
    CHECK(r.code == 1);
    CHECK(r.err.find("PRAGMA integrity_check failed") != std::string::npos);
    CHECK_FALSE(fs::exists(out));
    CHECK_FALSE(fs::exists(out + ".restore-tmp"));

    // The default is none: it restores, and says which check ran.
    r = restore({"--json"});
    REQUIRE(r.code == 0);
    CHECK(json::parse(r.out)["integrity_check"] == "none");
    CHECK(read_file(out) == bytes);
    r = restore({"--integrity-check", "quick"});
    REQUIRE(r.code == 0);
    CHECK(r.out.find("checksums, chain and quick_check ok") != std::string::npos);
    r = restore({"--integrity-check", "none"});
    REQUIRE(r.code == 0);
    CHECK(r.out.find("checksums and chain ok (no integrity check)") != std::string::npos);

    // The library says the same, by code.
    auto lib = [&](replicator::IntegrityCheck mode) {
        replicator::RestoreOptions o;
        o.integrity_check = mode;
        auto res = replicator::restore_database(*client, bucket.name(), "idx.db", out, o);
        return res ? std::string() : res.error().code;
    };
    CHECK(lib(replicator::IntegrityCheck::Full) == "IntegrityCheck");
    CHECK(lib(replicator::IntegrityCheck::Quick).empty());
    CHECK(lib(replicator::IntegrityCheck::None).empty());

    // A bad value is a usage error, before anything is fetched.
    r = restore({"--integrity-check", "fast"});
    CHECK(r.code == 2);
    CHECK(r.err.find("expected full, quick or none") != std::string::npos);
    // verify keeps the full check.
    r = cli({"-b", bucket.name(), "-d", "idx.db", "verify", "-q"});
    CHECK(r.code == 1);
}

TEST_CASE("cli: restore of several databases at once (ids or --all) and one failing does not stop the others",
          "[cli][integration][many]") {
    auto client = testing::server_client();
    TestBucket bucket(*client, "cli-many");
    TempDir dir;
    // Four databases in one bucket, each with its own rows: NAME holds 1..rows.
    const std::map<std::string, int> dbs = {{"a.db", 3}, {"b.db", 5}, {"c.db", 7}, {"d.db", 2}};
    for (const auto& [name, rows] : dbs) {
        Writer w(dir / ("src-" + name), bucket.name(), "&database_id=" + name);
        setup_table(w);
        for (int i = 1; i <= rows; ++i) insert(w, i);
        w.flush();
        w.close();
    }
    // A prefix that is no valid database id: --all must not make it a file name.
    REQUIRE(client->put_object(bucket.name(), "..bad id!/x", "not a database").ok());

    SECTION("ids as arguments, into a directory, in parallel within a bound") {
        const std::string out = dir / "ids";
        fs::create_directories(out);
        Run r = cli({"-b", bucket.name(), "restore", "-o", out, "a.db", "c.db", "d.db", "a.db", "-j", "4",
                     "--concurrent", "2", "--json"});
        REQUIRE(r.code == 0);
        json j = json::parse(r.out);
        CHECK(j["restored"] == 3);  // a.db once
        CHECK(j["failed"] == 0);
        CHECK(j["concurrent"] == 2);
        CHECK(j["parallel_each"] == 2);  // 4 GETs in all
        REQUIRE(j["databases"].size() == 3);
        for (const auto& d : j["databases"]) {
            CHECK(d["outcome"] == "restored");
            CHECK(d["output"] == out + "/" + d["database"].get<std::string>());
        }
        for (const char* name : {"a.db", "c.db", "d.db"}) CHECK(ids_in(out + "/" + name) == range_ids(1, dbs.at(name)));
        CHECK_FALSE(exists(out + "/b.db"));
        // The note of each names its own database: the extension continues each from it.
        CHECK(read_file(out + "/c.db-bottomless").find("c.db") != std::string::npos);
    }
    SECTION("--all: every database of the bucket, one file each, outcomes printed") {
        const std::string out = dir / "all";
        fs::create_directories(out);
        Run r = cli({"-b", bucket.name(), "restore", "--all", "-o", out});
        REQUIRE(r.code == 0);
        std::set<std::string> files;  // (before reading them, which adds -wal and -shm files)
        for (const auto& e : fs::directory_iterator(out)) files.insert(e.path().filename().string());
        CHECK(files == std::set<std::string>{"a.db", "a.db-bottomless", "a.db-bottomless-pages", "b.db",
                                             "b.db-bottomless", "b.db-bottomless-pages", "c.db", "c.db-bottomless",
                                             "c.db-bottomless-pages", "d.db", "d.db-bottomless",
                                             "d.db-bottomless-pages"});
        for (const auto& [name, rows] : dbs) {
            CHECK(ids_in(out + "/" + name) == range_ids(1, rows));
            CHECK(r.out.find("restored " + name + " to " + out + "/" + name) != std::string::npos);
        }
        CHECK(r.out.find("restored 4 of 5 database(s)") != std::string::npos);
        CHECK(r.out.find("1 skipped") != std::string::npos);
        CHECK(r.err.find("..bad id!") != std::string::npos);  // the skipped prefix, with why
    }
    SECTION("one refused and one damaged: the others still restored, exit 1, each failure named") {
        const std::string out = dir / "fail";
        fs::create_directories(out);
        {
            sqlite3* raw = nullptr;
            REQUIRE(sqlite3_open((out + "/b.db").c_str(), &raw) == SQLITE_OK);
            Db db(raw);
            exec(db.get(), "CREATE TABLE t(id INTEGER PRIMARY KEY, pad TEXT); INSERT INTO t VALUES(42, 'local')");
        }
        // c.db loses its snapshot: a generation with segments and no
        // snapshot is damaged, not in progress.
        for (const auto& o : objects(*client, bucket.name(), "c.db/"))
            if (o.key.find("snapshot") != std::string::npos) REQUIRE(client->delete_object(bucket.name(), o.key).ok());
        Run r = cli({"-b", bucket.name(), "restore", "--all", "-o", out, "-j", "2"});
        CHECK(r.code == 1);
        CHECK(ids_in(out + "/a.db") == range_ids(1, 3));
        CHECK(ids_in(out + "/d.db") == range_ids(1, 2));
        CHECK(ids_in(out + "/b.db") == std::vector<int64_t>{42});  // untouched
        CHECK_FALSE(exists(out + "/c.db"));
        CHECK_FALSE(exists(out + "/c.db.restore-tmp"));
        CHECK(r.err.find("b.db") != std::string::npos);
        CHECK(r.err.find("refusing to overwrite") != std::string::npos);
        CHECK(r.err.find("c.db") != std::string::npos);
        CHECK(r.out.find("2 failed") != std::string::npos);
        // --if-db-not-exists keeps b.db as a skip, not a failure.
        Run again = cli({"-b", bucket.name(), "restore", "-o", out, "a.db", "b.db", "--if-db-not-exists", "--json"});
        CHECK(again.code == 0);
        json j = json::parse(again.out);
        CHECK(j["skipped"] == 2);
    }
    SECTION("an id with nothing to restore: exit 3, the others restored") {
        const std::string out = dir / "nothing";
        fs::create_directories(out);
        Run r = cli({"-b", bucket.name(), "restore", "-o", out, "a.db", "nosuch.db"});
        CHECK(r.code == 3);
        CHECK(ids_in(out + "/a.db") == range_ids(1, 3));
        CHECK(r.err.find("nosuch.db") != std::string::npos);
    }
    SECTION("usage") {
        CHECK(cli({"-b", bucket.name(), "restore", "--all", "a.db", "b.db"}).code == 2);
        CHECK(cli({"-b", bucket.name(), "-d", "a.db", "restore", "a.db", "b.db"}).code == 2);
        CHECK(cli({"-b", bucket.name(), "restore", "a.db", "../b.db", "-o", dir / "x"}).code == 2);
        CHECK(cli({"-b", bucket.name(), "restore", "-o", dir / "x", "--concurrent", "2"}).code == 2);
        // Several databases need a directory.
        Run r = cli({"-b", bucket.name(), "restore", "a.db", "b.db", "-o", dir / "no-such-dir"});
        CHECK(r.code == 1);
        CHECK(r.err.find("directory") != std::string::npos);
        // One id as an argument is -d ID.
        Run one = cli({"-b", bucket.name(), "restore", "b.db", "-o", dir / "one.db", "-q"});
        CHECK(one.code == 0);
        CHECK(ids_in(dir / "one.db") == range_ids(1, 5));
    }
}

namespace {

// Row ids of table t once the file holds `want` (read-only, as any reader
// of a followed file would; the follower may hold it for an apply), or what
// it held at the deadline.
std::vector<int64_t> ids_when(const std::string& path, const std::vector<int64_t>& want,
                              std::chrono::seconds within = std::chrono::seconds(30)) {
    const auto deadline = std::chrono::steady_clock::now() + within;
    std::vector<int64_t> ids;
    do {
        ids.clear();
        sqlite3* raw = nullptr;
        if (fs::exists(path) && sqlite3_open_v2(path.c_str(), &raw, SQLITE_OPEN_READONLY, nullptr) == SQLITE_OK) {
            Db db(raw);
            sqlite3_busy_timeout(raw, 2000);
            sqlite3_stmt* st = nullptr;
            if (sqlite3_prepare_v2(raw, "SELECT id FROM t ORDER BY id", -1, &st, nullptr) == SQLITE_OK)
                while (sqlite3_step(st) == SQLITE_ROW) ids.push_back(sqlite3_column_int64(st, 0));
            sqlite3_finalize(st);
        } else if (raw) {
            sqlite3_close(raw);
        }
        if (ids == want) return ids;
        std::this_thread::sleep_for(std::chrono::milliseconds(50));
    } while (std::chrono::steady_clock::now() < deadline);
    return ids;
}

std::vector<json> json_lines(const std::string& text) {
    std::vector<json> v;
    std::istringstream in(text);
    for (std::string line; std::getline(in, line);)
        if (!line.empty()) v.push_back(json::parse(line));
    return v;
}

}  // namespace

TEST_CASE("cli: restore --follow keeps a file current across segments and a new generation, and resumes without a download",
          "[cli][integration][follow]") {
    auto client = testing::server_client();
    TestBucket bucket(*client, "cli-follow");
    TempDir dir;
    Writer w(dir / "src.db", bucket.name());
    setup_table(w);
    for (int i = 1; i <= 50; ++i) insert(w, i);
    w.flush();

    const std::string out = dir / "follow.db";
    const std::vector<std::string> follow = {BOTTOMLESS_CLI_PATH, "-b", bucket.name(), "-d", "src.db", "restore", "-o",
                                             out, "--follow", "--poll-ms", "100", "--json"};
    const std::map<std::string, std::optional<std::string>> env = {{"LIBSQL_BOTTOMLESS_DATABASE_ID", std::nullopt}};
    {
        Spawned f(follow, env);
        CHECK(ids_when(out, range_ids(1, 50)) == range_ids(1, 50));
        // New segments appear in the file while it follows.
        for (int i = 51; i <= 80; ++i) {
            insert(w, i);
            if (i % 10 == 0) w.flush();
        }
        CHECK(ids_when(out, range_ids(1, 80)) == range_ids(1, 80));
        // A new generation on the writer's side is followed too.
        const std::string gen2 = w.snapshot();
        for (int i = 81; i <= 90; ++i) insert(w, i);
        w.flush();
        CHECK(ids_when(out, range_ids(1, 90)) == range_ids(1, 90));
        CHECK(ids_in(out) == range_ids(1, 90));  // and integrity_check ok

        Run r = f.wait(SIGTERM);
        REQUIRE(r.code == 0);
        auto lines = json_lines(r.out);
        REQUIRE(lines.size() >= 2);
        CHECK(lines.front()["event"] == "position");
        CHECK(lines.front()["role"] == "follower");
        const json& last = lines.back();
        CHECK(last["event"] == "stopped");
        CHECK(last["generation"] == gen2);
        CHECK(last["last_error"].is_null());
        CHECK(last["segments_applied"].get<uint64_t>() >= 1);
    }
    // The file is an ordinary database to any reader, without a WAL.
    CHECK(!fs::exists(out + "-wal"));
    CHECK(fs::exists(out + "-bottomless-replica"));

    // Following again continues from the recorded position: no download of
    // the snapshot, only what is new.
    for (int i = 91; i <= 95; ++i) insert(w, i);
    w.flush();
    {
        Spawned f(follow, env);
        CHECK(ids_when(out, range_ids(1, 95)) == range_ids(1, 95));
        Run r = f.wait(SIGINT);
        REQUIRE(r.code == 0);
        auto lines = json_lines(r.out);
        REQUIRE(!lines.empty());
        CHECK(lines.back()["hydrations"] == 0);
        CHECK(lines.back()["event"] == "stopped");
    }

    // A database that is not a replica is not overwritten without --force.
    {
        Writer other(dir / "other.db", bucket.name(), "&database_id=other");
        other.sql("CREATE TABLE keep(x)");
    }
    Run refused = cli({"-b", bucket.name(), "-d", "src.db", "restore", "-o", dir / "other.db", "--follow"});
    CHECK(refused.code == 1);
    CHECK(refused.err.find("is not a replica") != std::string::npos);
    CHECK(cli({"-b", bucket.name(), "-d", "src.db", "restore", "--follow", "-g", "x"}).code == 2);
    CHECK(cli({"-b", bucket.name(), "restore", "--follow", "a", "b"}).code == 2);
    CHECK(cli({"-b", bucket.name(), "-d", "src.db", "restore", "--poll-ms", "100"}).code == 2);
}
