// Read replicas (replica=1) and time travel (at=) against the real S3
// server: a writer through the embedded VFS (async, short batches) and
// replica connections in the same process, on another file.
//
//   - the replica sees every commit of a counter table within a bound,
//     integrity_check ok, refuses writes with SQLITE_READONLY
//   - a read transaction open while 100 segments arrive sees one stable state,
//     and another reader is not blocked meanwhile
//   - a new generation on the writer (bottomless_snapshot()) is followed
//   - a crash in the middle of an apply (the state file's mark) is re-hydrated at the next open
//   - at=<time> shows the old state, read-only, and leaves no file behind
//   - a plain sqlite3 shell in another process reads the replica file while it follows
//   - a follower killed in the middle of an apply (another process, a test
//     hook) leaves a hot rollback journal: readers in other processes refuse
//     or roll back, never read a torn state; the next follower recovers
//   - a follower in another process (the sqlite3 shell with the extension)
//     while this process reads; a reader here takes over when it exits
//   - a database id that is no single path component is refused (at= names
//     its cache copy after it)
//   - closing the last connection while the follower hydrates cancels the
//     download promptly and leaves the file as its state proves it
//   - failing polls (403 through the fault proxy) back off 100 ms doubling
//     to 5 s, shown in status, reset once S3 answers
#include <catch2/catch.hpp>

#include <signal.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>

#include <nlohmann/json.hpp>

#include "replicator/config.h"
#include "replicator/replica.h"
#include "replicator/util.h"
#include "support/fault_proxy.h"
#include "support/s3_env.h"
#include "support/skip.h"
#include "support/sqlite_util.h"

namespace fs = std::filesystem;
using json = nlohmann::json;
using namespace bottomless;
using namespace bottomless::testing;
using namespace std::chrono_literals;

namespace {

struct Fixture {
    std::unique_ptr<s3::Client> client = server_client();
    TestBucket bucket{*client, "replica"};
    TempDir dir;
    std::string writer_path = dir.file("w/app.db"), replica_path = dir.file("r/app.db");
    Db writer;
    explicit Fixture(const std::string& writer_extra = "") {
        fs::create_directories(dir.file("w"));
        fs::create_directories(dir.file("r"));
        register_bottomless();
        writer = open_db("file:" + writer_path + "?vfs=bottomless&bucket=" + bucket.name() +
                         "&database_id=app.db&batch_interval_ms=50" + writer_extra);
        exec(writer.get(), "PRAGMA journal_mode=wal");
        exec(writer.get(), "CREATE TABLE c(n INTEGER); INSERT INTO c VALUES(0); CREATE TABLE log(i INTEGER PRIMARY KEY, pad BLOB)");
        flush();
    }
    void flush() { (void)query_text(writer.get(), "SELECT bottomless_flush(30000)"); }
    std::string replica_uri(const std::string& path, const std::string& extra = "") const {
        return "file:" + path + "?vfs=bottomless&bucket=" + bucket.name() + "&database_id=app.db&replica=1&replica_poll_ms=50" +
               extra;
    }
    // One commit: the counter to i and a row i.
    void commit(int i) {
        exec(writer.get(), "BEGIN; UPDATE c SET n=" + std::to_string(i) + "; INSERT INTO log VALUES(" + std::to_string(i) +
                               ", randomblob(300)); COMMIT");
    }
};

// Polls `sql` on `db` until it returns `want` or `limit` passes; the time it took.
std::chrono::milliseconds wait_for_value(sqlite3* db, const std::string& sql, long long want,
                                         std::chrono::milliseconds limit = 10s) {
    const auto t0 = std::chrono::steady_clock::now();
    for (;;) {
        const long long v = query_int(db, sql);
        const auto took = std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - t0);
        if (v == want) return took;
        if (took > limit) {
            FAIL("'" << sql << "' is " << v << " after " << took.count() << " ms, expected " << want);
        }
        std::this_thread::sleep_for(5ms);
    }
}

std::string slurp_file(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    std::stringstream ss;
    ss << in.rdbuf();
    return ss.str();
}

json status(sqlite3* db) { return json::parse(query_text(db, "SELECT bottomless_status()")); }

// A sqlite3 shell with the extension that opens `uri` (a replica: it
// follows when it is the first), touches `ready`, then lives until `stop`
// exists (or 120 s). `env` prefixes the command (VAR=value ...).
pid_t spawn_follower(const TempDir& dir, const std::string& name, const std::string& uri, const std::string& env = "") {
    const std::string script = dir.file(name + ".sql"), log = dir.file(name + ".log");
    {
        std::ofstream f(script);
        f << ".bail on\n.load " << BOTTOMLESS_EXT_PATH << "\n.open " << uri << "\n"
          << "SELECT 'opened', n FROM c;\n"
          << ".system touch " << dir.file(name + ".ready") << "\n"
          << ".system i=0; while [ ! -e " << dir.file(name + ".stop") << " ] && [ $i -lt 2400 ]; do sleep 0.05; i=$((i+1)); done\n"
          << "SELECT 'leaving';\n";
    }
    const std::string cmd = env + " exec " + shell_quote(sqlite3_shell()) + " < " + shell_quote(script) + " > " +
                            shell_quote(log) + " 2>&1";
    pid_t pid = ::fork();
    if (pid == 0) {
        execl("/bin/sh", "sh", "-c", cmd.c_str(), static_cast<char*>(nullptr));
        _exit(127);
    }
    REQUIRE(pid > 0);
    for (int i = 0; i < 6000 && !fs::exists(dir.file(name + ".ready")); ++i) {
        int st = 0;
        if (::waitpid(pid, &st, WNOHANG) == pid) FAIL("the follower shell exited early: " << slurp_file(log));
        std::this_thread::sleep_for(10ms);
    }
    if (!fs::exists(dir.file(name + ".ready"))) {
        ::kill(pid, SIGKILL);
        ::waitpid(pid, nullptr, 0);
        FAIL("the follower shell did not open the replica within 60 s: " << slurp_file(log));
    }
    return pid;
}

// Waits for `pid` to exit (at most `limit`); its exit status, or -1 if it
// did not exit (then it is killed).
int wait_exit(pid_t pid, std::chrono::milliseconds limit) {
    const auto t0 = std::chrono::steady_clock::now();
    for (;;) {
        int st = 0;
        if (::waitpid(pid, &st, WNOHANG) == pid) return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
        if (std::chrono::steady_clock::now() - t0 > limit) {
            ::kill(pid, SIGKILL);
            ::waitpid(pid, nullptr, 0);
            return -1;
        }
        std::this_thread::sleep_for(10ms);
    }
}

// What a reader sees: "n:distinct v:min v:rows" of the crash test's tables.
constexpr const char* kStateSql =
    "SELECT (SELECT n FROM c) || ':' || (SELECT count(DISTINCT v) FROM t) || ':' || (SELECT min(v) FROM t) || ':' || "
    "(SELECT count(*) FROM t)";

}  // namespace

TEST_CASE("replica: follows every commit of a writer within a bound and refuses writes", "[vfs][integration][replica]") {
    Fixture f;
    Db r = open_db(f.replica_uri(f.replica_path));
    CHECK(query_int(r.get(), "SELECT n FROM c") == 0);
    std::chrono::milliseconds worst{0};
    for (int i = 1; i <= 20; ++i) {
        f.commit(i);
        // Writer batch 50 ms (+ the pool's quarter interval) + poll 50 ms + round trips.
        worst = std::max(worst, wait_for_value(r.get(), "SELECT n FROM c", i));
    }
    INFO("slowest commit to reach the replica: " << worst.count() << " ms");
    CHECK(worst < 5s);
    // Every commit, in order, no gap.
    CHECK(query_int(r.get(), "SELECT count(*) FROM log") == 20);
    CHECK(query_int(r.get(), "SELECT sum(i) FROM log") == 210);
    CHECK(query_text(r.get(), "PRAGMA integrity_check") == "ok");
    // The file is in rollback mode for its readers: no -wal or -shm.
    CHECK(query_text(r.get(), "PRAGMA journal_mode") == "delete");
    CHECK_FALSE(fs::exists(f.replica_path + "-wal"));

    json st = status(r.get());
    INFO(st.dump());
    CHECK(st["mode"] == "replica");
    CHECK(st["role"] == "follower");
    CHECK(st["generation"] == json::parse(query_text(f.writer.get(), "SELECT bottomless_status()"))["generation"]);
    CHECK(st["segment"].get<uint64_t>() >= 1);
    CHECK(st["segments_applied"].get<uint64_t>() >= 1);
    CHECK(st["requests"]["get"].get<uint64_t>() >= st["segments_applied"].get<uint64_t>());
    CHECK(st["last_error"].is_null());
    CHECK_FALSE(st["lag_ms"].is_null());

    // Writes fail, with SQLite's read-only error.
    std::string err;
    CHECK(try_exec(r.get(), "INSERT INTO log VALUES(1000, NULL)", err) == SQLITE_READONLY);
    CHECK(err.find("readonly") != std::string::npos);
    CHECK(try_exec(r.get(), "CREATE TABLE x(a)", err) == SQLITE_READONLY);
    CHECK(try_exec(r.get(), "SELECT bottomless_snapshot()", err) != SQLITE_OK);
    CHECK(err.find("read replica") != std::string::npos);

    // Closed and opened again: the file proves its position (no hydration) and goes on.
    r.reset();
    f.commit(21);
    r = open_db(f.replica_uri(f.replica_path));
    wait_for_value(r.get(), "SELECT n FROM c", 21);
    st = status(r.get());
    CHECK(st["hydrations"] == 0);
    CHECK(query_text(r.get(), "PRAGMA integrity_check") == "ok");

    // A crash in the middle of an apply leaves "applying" in the state file:
    // the next open does not trust the file and hydrates it again.
    r.reset();
    {
        json state = json::parse(slurp_file(f.replica_path + "-bottomless-replica"));
        CHECK(state["applying"] == false);
        state["applying"] = true;
        std::ofstream(f.replica_path + "-bottomless-replica", std::ios::trunc) << state.dump();
    }
    r = open_db(f.replica_uri(f.replica_path));
    st = status(r.get());
    CHECK(st["hydrations"] == 1);
    CHECK(st["last_event"].get<std::string>().find("interrupted") != std::string::npos);
    CHECK(query_int(r.get(), "SELECT n FROM c") == 21);

    // Another process, a plain sqlite3 shell without bottomless, reads the
    // same file while it follows (rollback mode: no -wal, no -shm).
    f.commit(22);
    wait_for_value(r.get(), "SELECT n FROM c", 22);
    std::string out;
    REQUIRE(run_command(shell_quote(sqlite3_shell()) + " -readonly " + shell_quote(f.replica_path) +
                            " 'PRAGMA busy_timeout=5000' 'SELECT n FROM c'",
                        &out) == 0);
    CHECK(out.find("22") != std::string::npos);
}

TEST_CASE("replica: a read transaction sees one stable state while 100 segments arrive", "[vfs][integration][replica]") {
    Fixture f;
    for (int i = 1; i <= 3; ++i) f.commit(i);
    f.flush();
    Db a = open_db(f.replica_uri(f.replica_path));
    Db b = open_db(f.replica_uri(f.replica_path));
    wait_for_value(a.get(), "SELECT n FROM c", 3);

    exec(a.get(), "BEGIN");
    REQUIRE(query_int(a.get(), "SELECT count(*) FROM log") == 3);
    // The figure: a read transaction open across 100 segments.
    constexpr int kSegments = 100;
    auto a_and_b_see_3 = [&] {
        CHECK(query_int(a.get(), "SELECT count(*) FROM log") == 3);
        CHECK(query_int(a.get(), "SELECT n FROM c") == 3);
        CHECK(query_text(a.get(), "SELECT group_concat(i) FROM log") == "1,2,3");
        // Another reader is not held up by the waiting follower for long.
        const auto t0 = std::chrono::steady_clock::now();
        const long long seen = query_int(b.get(), "SELECT n FROM c");
        CHECK(std::chrono::steady_clock::now() - t0 < 1s);
        CHECK(seen == 3);  // nothing is applied while a reads
    };
    for (int i = 4; i < 4 + kSegments; ++i) {
        f.commit(i);
        f.flush();  // one segment each
        if (i % 10 == 0) a_and_b_see_3();
    }
    std::this_thread::sleep_for(400ms);  // several polls: the segments are there to apply
    for (int k = 0; k < 5; ++k) {
        a_and_b_see_3();
        std::this_thread::sleep_for(50ms);
    }
    CHECK(status(b.get())["lock_waits"].get<uint64_t>() >= 1);
    const int last = 3 + kSegments;
    exec(a.get(), "COMMIT");
    wait_for_value(a.get(), "SELECT n FROM c", last, 60s);
    CHECK(query_int(b.get(), "SELECT count(*) FROM log") == last);
    CHECK(query_int(b.get(), "SELECT sum(i) FROM log") == last * (last + 1) / 2);
    CHECK(query_text(b.get(), "PRAGMA integrity_check") == "ok");
    CHECK(status(b.get())["segment"].get<uint64_t>() >= kSegments);
}

TEST_CASE("replica: a new generation is followed by fetching only the pages that differ",
          "[vfs][integration][replica]") {
    Fixture f;
    // ~2 MB of rows that do not compress: a full download is easy to tell apart.
    exec(f.writer.get(), "WITH RECURSIVE x(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM x WHERE i<500) "
                         "INSERT INTO log SELECT 1000 + i, randomblob(4000) FROM x");
    f.commit(1);
    f.flush();
    Db r = open_db(f.replica_uri(f.replica_path));
    wait_for_value(r.get(), "SELECT n FROM c", 1);
    const uint64_t file_bytes = fs::file_size(f.replica_path);
    REQUIRE(file_bytes > 2'000'000);
    // A few pages change, then a new generation (its snapshot has a page index).
    for (int i = 2; i <= 4; ++i) f.commit(i);
    f.flush();
    const std::string second = query_text(f.writer.get(), "SELECT bottomless_snapshot()");
    f.commit(5);
    wait_for_value(r.get(), "SELECT n FROM c", 5, 20s);
    json st = status(r.get());
    INFO(st.dump());
    CHECK(st["generation"] == second);
    CHECK(st["hydrations"].get<uint64_t>() >= 1);
    REQUIRE(st.contains("last_hydration"));
    CHECK(st["last_hydration"]["download"] == "pages");
    // The changed pages' frames and the index, not the database.
    CHECK(st["last_hydration"]["bytes"].get<uint64_t>() * 5 < file_bytes);
    CHECK(query_int(r.get(), "SELECT count(*) FROM log") == 505);
    CHECK(query_text(r.get(), "PRAGMA integrity_check") == "ok");
    const std::string rows = "SELECT group_concat(i || ':' || hex(substr(pad, 1, 8)) || hex(substr(pad, -8)), ',') FROM log";
    CHECK(query_text(r.get(), rows) == query_text(f.writer.get(), rows));
    // No image or journal left beside the replica.
    for (const char* suffix : {".replica-new", ".replica-new-wal", ".replica-new-bottomless", ".replica-new-bottomless-pages",
                               ".replica-new.restore-wal"})
        CHECK_FALSE(fs::exists(f.replica_path + suffix));
    // And on from there, segment by segment.
    f.commit(6);
    wait_for_value(r.get(), "SELECT n FROM c", 6);
}

TEST_CASE("replica: a new generation on the writer is followed", "[vfs][integration][replica]") {
    Fixture f;
    f.commit(1);
    f.flush();
    Db r = open_db(f.replica_uri(f.replica_path));
    wait_for_value(r.get(), "SELECT n FROM c", 1);
    const std::string first = status(r.get())["generation"];
    const std::string second = query_text(f.writer.get(), "SELECT bottomless_snapshot()");
    REQUIRE(second != first);
    for (int i = 2; i <= 4; ++i) f.commit(i);
    wait_for_value(r.get(), "SELECT n FROM c", 4);
    json st = status(r.get());
    INFO(st.dump());
    CHECK(st["generation"] == second);
    CHECK(st["hydrations"].get<uint64_t>() >= 1);
    CHECK(st["last_event"].get<std::string>().find("continues the replica's generation") != std::string::npos);
    CHECK(query_int(r.get(), "SELECT count(*) FROM log") == 4);
    CHECK(query_text(r.get(), "PRAGMA integrity_check") == "ok");
    // And on from there, segment by segment.
    f.commit(5);
    wait_for_value(r.get(), "SELECT n FROM c", 5);
}

TEST_CASE("replica: at= opens the state of a past time read-only and leaves nothing behind",
          "[vfs][integration][replica]") {
    Fixture f;
    TempDir cache;
    const char* old_cache = std::getenv("XDG_CACHE_HOME");
    const std::string saved = old_cache ? old_cache : "";
    ::setenv("XDG_CACHE_HOME", cache.path().c_str(), 1);
    for (int i = 1; i <= 3; ++i) f.commit(i);
    f.flush();
    std::this_thread::sleep_for(20ms);
    const int64_t then = replicator::now_us();
    std::this_thread::sleep_for(20ms);
    for (int i = 4; i <= 6; ++i) f.commit(i);
    f.flush();
    {
        Db past = open_db(f.replica_uri(f.dir.file("r/past.db"), "&at=" + replicator::fmt_time_us(then)));
        CHECK(query_int(past.get(), "SELECT n FROM c") == 3);
        CHECK(query_int(past.get(), "SELECT count(*) FROM log") == 3);
        CHECK(query_text(past.get(), "PRAGMA integrity_check") == "ok");
        std::string err;
        CHECK(try_exec(past.get(), "DELETE FROM log", err) == SQLITE_READONLY);
        json st = status(past.get());
        CHECK(st["role"] == "time-travel");
        // Not followed: later commits never show.
        f.commit(7);
        f.flush();
        std::this_thread::sleep_for(200ms);
        CHECK(query_int(past.get(), "SELECT n FROM c") == 3);
        CHECK_FALSE(fs::exists(f.dir.file("r/past.db")));  // the name only names the database
    }
    size_t left = 0;
    for (const auto& e : fs::recursive_directory_iterator(cache.path()))
        if (e.is_regular_file()) ++left;
    CHECK(left == 0);
    // at= without replica=1 is a configuration error.
    Db bad;
    std::string err;
    CHECK(try_open_db("file:" + f.dir.file("r/x.db") + "?vfs=bottomless&bucket=" + f.bucket.name() + "&at=" +
                          replicator::fmt_time_us(then),
                      bad, err) != SQLITE_OK);
    if (old_cache) ::setenv("XDG_CACHE_HOME", saved.c_str(), 1);
    else ::unsetenv("XDG_CACHE_HOME");
}

TEST_CASE("replica: a follower killed in the middle of an apply leaves no torn state to read", "[vfs][integration][replica]") {
    if (skip_process_tests()) BOTTOMLESS_SKIP(kProcessSkipReason);
    Fixture f;
    // 400 rows over ~30 pages: every round sets v of all rows and c.n to the
    // round in one transaction (one segment). A committed state has one v,
    // equal to n; a torn one mixes them.
    exec(f.writer.get(), "CREATE TABLE t(k INTEGER PRIMARY KEY, v INTEGER, pad BLOB)");
    exec(f.writer.get(), "WITH RECURSIVE s(k) AS (SELECT 1 UNION ALL SELECT k+1 FROM s WHERE k<400) "
                         "INSERT INTO t SELECT k, 0, randomblob(250) FROM s");
    f.flush();
    const std::string journal = f.replica_path + "-journal";
    const std::string plain = shell_quote(sqlite3_shell());
    // Exit after this many pages of the apply reached the file.
    const int pages_at[] = {1, 5, 12};
    for (int round = 1; round <= 3; ++round) {
        INFO("round " << round);
        const std::string name = "follower" + std::to_string(round);
        pid_t pid = spawn_follower(f.dir, name, f.replica_uri(f.replica_path),
                                   "BOTTOMLESS_TEST_REPLICA_EXIT_AFTER_PAGES=" + std::to_string(pages_at[round - 1]));
        Db reader;  // round 3: a reader in this process, that takes over
        if (round == 3) {
            reader = open_db(f.replica_uri(f.replica_path));
            CHECK(status(reader.get())["role"] == "reader");
            CHECK(query_text(reader.get(), kStateSql) == "2:1:2:400");
        }
        exec(f.writer.get(), "BEGIN; UPDATE t SET v=" + std::to_string(round) + "; UPDATE c SET n=" +
                                 std::to_string(round) + "; COMMIT");
        f.flush();
        // The hook: status 3 in the middle of the apply.
        const int rc = wait_exit(pid, 30s);
        INFO(slurp_file(f.dir.file(name + ".log")));
        REQUIRE(rc == 3);
        // Hot: the follower died before its commit point (in round 3 the
        // reader here may already have taken over and rolled it back).
        if (round < 3) REQUIRE(fs::exists(journal));

        const std::string before = std::to_string(round - 1) + ":1:" + std::to_string(round - 1) + ":400";
        const std::string after = std::to_string(round) + ":1:" + std::to_string(round) + ":400";
        if (round == 1) {
            // A read-only reader in another process refuses to read
            // (SQLITE_READONLY_ROLLBACK) instead of reading torn pages.
            std::string out;
            const int src = run_command(plain + " -readonly " + shell_quote(f.replica_path) + " 'PRAGMA integrity_check' " +
                                            shell_quote(kStateSql),
                                        &out);
            INFO(out);
            CHECK(src != 0);
            CHECK(out.find("readonly") != std::string::npos);
            CHECK(out.find(":400") == std::string::npos);  // no state read at all (torn: "1:1:0:400")
            CHECK(fs::exists(journal));
        } else if (round == 2) {
            // A read-write reader rolls the journal back and reads the last
            // committed state the file held.
            std::string out;
            REQUIRE(run_command(plain + " " + shell_quote(f.replica_path) + " 'PRAGMA integrity_check' " +
                                    shell_quote(kStateSql),
                                &out) == 0);
            CHECK(out == "ok\n" + before + "\n");
            CHECK_FALSE(fs::exists(journal));
        }
        // The next follower recovers: opened here (round 1, 2), or the
        // reader here takes over (round 3).
        if (round < 3) reader = open_db(f.replica_uri(f.replica_path));
        const auto t0 = std::chrono::steady_clock::now();
        while (status(reader.get())["role"] != "follower" && std::chrono::steady_clock::now() - t0 < 10s)
            std::this_thread::sleep_for(10ms);
        wait_for_value(reader.get(), "SELECT n FROM c", round);
        CHECK(query_text(reader.get(), kStateSql) == after);
        CHECK(query_text(reader.get(), "PRAGMA integrity_check") == "ok");
        CHECK_FALSE(fs::exists(journal));
        json st = status(reader.get());
        INFO(st.dump());
        CHECK(st["role"] == "follower");
        CHECK(st["hydrations"].get<uint64_t>() >= 1);  // the interrupted apply is not trusted
        // A plain reader in another process reads the recovered file.
        std::string out;
        REQUIRE(run_command(plain + " -readonly " + shell_quote(f.replica_path) + " 'PRAGMA integrity_check' " +
                                shell_quote(kStateSql),
                            &out) == 0);
        CHECK(out == "ok\n" + after + "\n");
        reader.reset();  // the next round's shell follows
    }
}

TEST_CASE("replica: a follower in another process while this one reads and a takeover when it exits",
          "[vfs][integration][replica]") {
    if (skip_process_tests()) BOTTOMLESS_SKIP(kProcessSkipReason);
    Fixture f;
    for (int i = 1; i <= 3; ++i) f.commit(i);
    f.flush();
    pid_t pid = spawn_follower(f.dir, "follower", f.replica_uri(f.replica_path));
    Db r = open_db(f.replica_uri(f.replica_path));
    json st = status(r.get());
    INFO(st.dump());
    CHECK(st["role"] == "reader");
    CHECK(st["follower_pid"] == static_cast<long>(pid));
    // The shell follows; this process only reads the file.
    for (int i = 4; i <= 10; ++i) {
        f.commit(i);
        wait_for_value(r.get(), "SELECT n FROM c", i);
        CHECK(query_int(r.get(), "SELECT count(*) FROM log") == i);
    }
    st = status(r.get());
    CHECK(st["role"] == "reader");
    CHECK(st["segment"].get<uint64_t>() >= 2);  // the follower's position, from its state file
    CHECK(st["requests"]["get"] == 0);          // a reader asks S3 nothing
    CHECK(query_text(r.get(), "PRAGMA integrity_check") == "ok");

    // The follower leaves (a clean exit): this process takes over within
    // about one poll interval (50 ms here), from the proven state file.
    std::ofstream(f.dir.file("follower.stop")).close();
    REQUIRE(wait_exit(pid, 30s) == 0);
    const auto t0 = std::chrono::steady_clock::now();
    while (status(r.get())["role"] != "follower" && std::chrono::steady_clock::now() - t0 < 10s)
        std::this_thread::sleep_for(5ms);
    const auto took = std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - t0);
    st = status(r.get());
    INFO(st.dump() << " takeover after " << took.count() << " ms");
    CHECK(st["role"] == "follower");
    CHECK(took < 1s);
    CHECK(st["hydrations"] == 0);  // nothing downloaded again
    for (int i = 11; i <= 15; ++i) {
        f.commit(i);
        wait_for_value(r.get(), "SELECT n FROM c", i);
    }
    CHECK(query_int(r.get(), "SELECT count(*) FROM log") == 15);
    CHECK(query_text(r.get(), "PRAGMA integrity_check") == "ok");
}

TEST_CASE("replica: an encrypted database is followed with the writer's key and refused without it",
          "[vfs][integration][replica]") {
    const std::string key = "6b8f1c2d3e4f50617283940a1b2c3d4e5f60718293a4b5c6d7e8f90112233445";
    const std::string other = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
    Fixture f("&encryption_key=" + key);
    for (int i = 1; i <= 3; ++i) f.commit(i);
    f.flush();
    Db r = open_db(f.replica_uri(f.replica_path, "&encryption_key=" + key));
    wait_for_value(r.get(), "SELECT n FROM c", 3);
    for (int i = 4; i <= 8; ++i) {
        f.commit(i);
        wait_for_value(r.get(), "SELECT n FROM c", i);
    }
    CHECK(query_int(r.get(), "SELECT sum(i) FROM log") == 36);
    CHECK(query_text(r.get(), "PRAGMA integrity_check") == "ok");
    json st = status(r.get());
    INFO(st.dump());
    CHECK(st["segments_applied"].get<uint64_t>() >= 1);
    CHECK(st["last_error"].is_null());
    // Without the key, or with another one, the open fails and says why.
    for (const std::string& extra : {std::string(), "&encryption_key=" + other}) {
        Db bad;
        std::string err;
        CHECK(try_open_db(f.replica_uri(f.dir.file("r/other.db"), extra), bad, err) != SQLITE_OK);
        CHECK_FALSE(fs::exists(f.dir.file("r/other.db")));
    }
}

TEST_CASE("replica: S3 faults while following never show a wrong state and it catches up after them",
          "[vfs][integration][replica]") {
    Fixture f;
    for (int i = 1; i <= 3; ++i) f.commit(i);
    f.flush();
    FaultProxy proxy("127.0.0.1", server_port());
    proxy.set_stall_ms(400);
    Db r = open_db(f.replica_uri(f.replica_path, "&endpoint=" + proxy.url()));
    wait_for_value(r.get(), "SELECT n FROM c", 3);
    int i = 3;
    long long seen = 3;
    // Every read: a committed prefix (the counter equals the rows), never
    // going back, integrity ok.
    auto check_state = [&] {
        const long long n = query_int(r.get(), "SELECT n FROM c");
        CHECK(query_int(r.get(), "SELECT count(*) FROM log") == n);
        CHECK(n >= seen);
        seen = n;
        CHECK(query_text(r.get(), "PRAGMA integrity_check") == "ok");
    };
    for (Fault fault : {Fault::Status503SlowDown, Fault::ResetBeforeRequest, Fault::TruncateBody, Fault::Status500,
                        Fault::Stall, Fault::DropResponse}) {
        INFO("fault " << static_cast<int>(fault));
        const int faults_before = proxy.faults_injected();
        proxy.inject_always(fault);
        for (int k = 0; k < 3; ++k) {
            f.commit(++i);
            f.flush();
            check_state();
            std::this_thread::sleep_for(100ms);
        }
        std::this_thread::sleep_for(300ms);
        check_state();
        CHECK(proxy.faults_injected() > faults_before);  // the replica did meet the fault
        proxy.clear();
        wait_for_value(r.get(), "SELECT n FROM c", i, 20s);  // caught up once S3 answers again
        check_state();
    }
    json st = status(r.get());
    INFO(st.dump());
    CHECK(st["chain_broken"] == false);
    CHECK(st["hydrations"] == 1);  // the first one only: faults never made it distrust its file
    CHECK(st["requests"]["retries"].get<uint64_t>() >= 1);
    // The last error clears once a poll succeeds again.
    const auto t0 = std::chrono::steady_clock::now();
    while (!status(r.get())["last_error"].is_null() && std::chrono::steady_clock::now() - t0 < 5s)
        std::this_thread::sleep_for(20ms);
    CHECK(status(r.get())["last_error"].is_null());
}

TEST_CASE("replica: a slow hydration of one file does not hold up the open of another", "[vfs][integration][replica]") {
    Fixture f;
    for (int i = 1; i <= 3; ++i) f.commit(i);
    f.flush();
    // A second database in the same bucket, written by a second writer.
    Db w2 = open_db("file:" + f.dir.file("w/b.db") + "?vfs=bottomless&bucket=" + f.bucket.name() +
                    "&database_id=b.db&batch_interval_ms=50");
    exec(w2.get(), "PRAGMA journal_mode=wal");
    exec(w2.get(), "CREATE TABLE c(n INTEGER); INSERT INTO c VALUES(42)");
    (void)query_text(w2.get(), "SELECT bottomless_flush(30000)");

    // Replica A reaches S3 through the proxy, whose first GET of a snapshot
    // stalls for 4 s: A's open (its hydration) takes at least that long.
    FaultProxy proxy("127.0.0.1", server_port());
    proxy.set_stall_ms(4000);
    proxy.set_filter("GET", "snapshot");
    proxy.inject(Fault::Stall, 1);
    const std::string uri_a = f.replica_uri(f.replica_path, "&endpoint=" + proxy.url());
    auto open_a = [&](Db& db, std::chrono::milliseconds& took) {
        const auto t0 = std::chrono::steady_clock::now();
        std::string err;
        if (try_open_db(uri_a, db, err) == SQLITE_OK) (void)query_int(db.get(), "SELECT n FROM c");
        took = std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - t0);
    };
    Db a1, a2;
    std::chrono::milliseconds took_a1{0}, took_a2{0};
    std::thread t1([&] { open_a(a1, took_a1); });
    // A is inside its stalled hydration once the proxy has stalled a request.
    const auto t0 = std::chrono::steady_clock::now();
    while (proxy.faults_injected() < 1 && std::chrono::steady_clock::now() - t0 < 20s) std::this_thread::sleep_for(5ms);
    REQUIRE(proxy.faults_injected() == 1);
    // A second connection to A waits for A's start (A's file only) ...
    std::thread t2([&] { open_a(a2, took_a2); });
    // ... while replica B, another file, opens at local speed meanwhile.
    const auto tb = std::chrono::steady_clock::now();
    Db b = open_db("file:" + f.dir.file("r/b.db") + "?vfs=bottomless&bucket=" + f.bucket.name() +
                   "&database_id=b.db&replica=1&replica_poll_ms=50");
    CHECK(query_int(b.get(), "SELECT n FROM c") == 42);
    const auto took_b = std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - tb);
    t1.join();
    t2.join();
    INFO("open of B " << took_b.count() << " ms, of A " << took_a1.count() << " ms and " << took_a2.count() << " ms");
    CHECK(took_b < 2s);
    CHECK(took_a1 >= 3500ms);  // the stall did hold A up
    REQUIRE(a1 != nullptr);
    REQUIRE(a2 != nullptr);
    CHECK(query_int(a1.get(), "SELECT n FROM c") == 3);
    CHECK(query_int(a2.get(), "SELECT n FROM c") == 3);
    // One Replica for both connections of A: one hydration, both the follower.
    json s1 = status(a1.get()), s2 = status(a2.get());
    INFO(s1.dump() << "\n" << s2.dump());
    CHECK(s1["role"] == "follower");
    CHECK(s2["role"] == "follower");
    CHECK(s1["hydrations"] == 1);
    CHECK(s2["hydrations"] == 1);
    // Both follow on.
    f.commit(4);
    wait_for_value(a2.get(), "SELECT n FROM c", 4);
    exec(w2.get(), "UPDATE c SET n=43");
    wait_for_value(b.get(), "SELECT n FROM c", 43);
}

TEST_CASE("replica: short gaps between the writer's batches do not make a short-poll replica list the bucket",
          "[vfs][integration][replica]") {
    Fixture f;
    f.commit(1);
    f.flush();
    // Poll 50 ms, a commit every 300 ms: each gap is ~6 polls without a new
    // segment. Listing is for generation changes, after seconds without one.
    Db r = open_db(f.replica_uri(f.replica_path));
    wait_for_value(r.get(), "SELECT n FROM c", 1);
    const uint64_t lists_before = status(r.get())["requests"]["list"].get<uint64_t>();
    for (int i = 2; i <= 12; ++i) {
        f.commit(i);
        std::this_thread::sleep_for(300ms);
    }
    wait_for_value(r.get(), "SELECT n FROM c", 12);
    json st = status(r.get());
    INFO(st.dump());
    CHECK(st["requests"]["list"].get<uint64_t>() == lists_before);
    CHECK(st["listings"] == 0);
    CHECK(st["segments_applied"].get<uint64_t>() >= 5);
    // Idle: the first listing after 5 s without a new segment.
    const auto t0 = std::chrono::steady_clock::now();
    while (status(r.get())["listings"] == 0 && std::chrono::steady_clock::now() - t0 < 10s)
        std::this_thread::sleep_for(50ms);
    const auto took = std::chrono::steady_clock::now() - t0;
    CHECK(status(r.get())["listings"] == 1);
    CHECK(took > 4s);
    CHECK(took < 7s);
}

TEST_CASE("replica: a checkpoint TRUNCATE and a VACUUM that shrinks the file on the writer are followed",
          "[vfs][integration][replica]") {
    Fixture f;
    for (int i = 1; i <= 3; ++i) f.commit(i);
    f.flush();
    Db r = open_db(f.replica_uri(f.replica_path));
    wait_for_value(r.get(), "SELECT n FROM c", 3);
    // The WAL restarts (new salts) at the next write after a TRUNCATE checkpoint.
    CHECK(query_int(f.writer.get(), "PRAGMA wal_checkpoint(TRUNCATE)") == 0);  // not busy
    for (int i = 4; i <= 6; ++i) f.commit(i);
    f.flush();
    wait_for_value(r.get(), "SELECT n FROM c", 6, 20s);
    CHECK(query_int(r.get(), "SELECT count(*) FROM log") == 6);

    // Grow the database, then shrink it with VACUUM.
    exec(f.writer.get(), "WITH RECURSIVE s(k) AS (SELECT 100 UNION ALL SELECT k+1 FROM s WHERE k<1099) "
                         "INSERT INTO log SELECT k, randomblob(2000) FROM s");
    f.commit(7);
    f.flush();
    wait_for_value(r.get(), "SELECT n FROM c", 7, 20s);
    const long long big = query_int(r.get(), "PRAGMA page_count");
    CHECK(big > 500);
    exec(f.writer.get(), "DELETE FROM log WHERE i >= 100");
    exec(f.writer.get(), "VACUUM");
    f.commit(8);
    f.flush();
    wait_for_value(r.get(), "SELECT n FROM c", 8, 20s);
    const long long small = query_int(r.get(), "PRAGMA page_count");
    INFO("pages before " << big << ", after VACUUM " << small);
    CHECK(small == query_int(f.writer.get(), "PRAGMA page_count"));
    CHECK(small * 4 < big);
    CHECK(static_cast<long long>(fs::file_size(f.replica_path)) == small * query_int(r.get(), "PRAGMA page_size"));
    CHECK(query_int(r.get(), "SELECT count(*) FROM log") == 8);
    CHECK(query_int(r.get(), "SELECT sum(i) FROM log") == 36);
    CHECK(query_text(r.get(), "PRAGMA integrity_check") == "ok");
    json st = status(r.get());
    INFO(st.dump());
    CHECK(st["chain_broken"] == false);
    CHECK(st["stalled"] == false);
    CHECK(st["last_error"].is_null());
}

TEST_CASE("replica: a page size change on the writer is followed", "[vfs][integration][replica]") {
    Fixture f;
    for (int i = 1; i <= 3; ++i) f.commit(i);
    f.flush();
    Db r = open_db(f.replica_uri(f.replica_path));
    wait_for_value(r.get(), "SELECT n FROM c", 3);
    REQUIRE(query_int(r.get(), "PRAGMA page_size") == 4096);
    // WAL mode cannot change the page size: out of it, VACUUM, back.
    exec(f.writer.get(), "PRAGMA journal_mode=delete");
    exec(f.writer.get(), "PRAGMA page_size=8192");
    exec(f.writer.get(), "VACUUM");
    exec(f.writer.get(), "PRAGMA journal_mode=wal");
    REQUIRE(query_int(f.writer.get(), "PRAGMA page_size") == 8192);
    f.commit(4);
    f.flush();
    wait_for_value(r.get(), "SELECT n FROM c", 4, 30s);
    json st = status(r.get());
    INFO(st.dump());
    CHECK(query_int(r.get(), "PRAGMA page_size") == 8192);
    CHECK(st["page_size"] == 8192);
    CHECK(fs::file_size(f.replica_path) % 8192 == 0);
    CHECK(query_int(r.get(), "SELECT count(*) FROM log") == 4);
    CHECK(query_text(r.get(), "PRAGMA integrity_check") == "ok");
    // A second connection opened afterwards agrees.
    Db r2 = open_db(f.replica_uri(f.replica_path));
    CHECK(query_int(r2.get(), "SELECT n FROM c") == 4);
    f.commit(5);
    wait_for_value(r.get(), "SELECT n FROM c", 5);
}

TEST_CASE("replica: the writer's generation removed with bottomless-cli rm is reported and a new one followed",
          "[vfs][integration][replica]") {
    Fixture f;
    for (int i = 1; i <= 2; ++i) f.commit(i);
    f.flush();
    Db r = open_db(f.replica_uri(f.replica_path));
    wait_for_value(r.get(), "SELECT n FROM c", 2);
    r.reset();  // the replica stops at this segment
    for (int i = 3; i <= 4; ++i) {
        f.commit(i);
        f.flush();
    }
    const std::string gen = json::parse(query_text(f.writer.get(), "SELECT bottomless_status()"))["generation"];
    std::string out;
    REQUIRE(run_command(shell_quote(BOTTOMLESS_CLI_PATH) + " -b " + f.bucket.name() + " -d app.db rm -g " + gen +
                            " --force 2>&1",
                        &out) == 0);
    INFO(out);
    // The writer goes on in its generation: segments after a hole.
    f.commit(5);
    f.flush();
    // The replica opens from its proven file and says it cannot follow;
    // its file stays at its last committed state.
    r = open_db(f.replica_uri(f.replica_path));
    CHECK(query_int(r.get(), "SELECT n FROM c") == 2);
    const auto t0 = std::chrono::steady_clock::now();
    while (status(r.get())["stalled"] != true && std::chrono::steady_clock::now() - t0 < 15s)
        std::this_thread::sleep_for(50ms);
    json st = status(r.get());
    INFO(st.dump());
    CHECK(st["stalled"] == true);
    REQUIRE(st["last_error"].is_string());
    CHECK(st["last_error"].get<std::string>().find("bottomless-cli rm") != std::string::npos);
    CHECK(query_int(r.get(), "SELECT n FROM c") == 2);
    CHECK(query_text(r.get(), "PRAGMA integrity_check") == "ok");
    std::this_thread::sleep_for(200ms);  // several polls: the verdict stays
    CHECK(status(r.get())["stalled"] == true);
    // A new generation on the writer is followed from there.
    (void)query_text(f.writer.get(), "SELECT bottomless_snapshot()");
    f.commit(6);
    f.flush();
    wait_for_value(r.get(), "SELECT n FROM c", 6, 30s);
    st = status(r.get());
    CHECK(st["stalled"] == false);
    CHECK(st["last_error"].is_null());
    CHECK(query_int(r.get(), "SELECT count(*) FROM log") == 6);
}

TEST_CASE("replica: a failed at= open never removes the file its name points at", "[vfs][integration][replica]") {
    Fixture f;
    TempDir cache;
    const char* old_cache = std::getenv("XDG_CACHE_HOME");
    const std::string saved = old_cache ? old_cache : "";
    ::setenv("XDG_CACHE_HOME", cache.path().c_str(), 1);
    const std::string mine = f.dir.file("r/mine.db");
    std::ofstream(mine) << "precious";
    Db bad;
    std::string err;
    // A passphrase for a bucket that has none: the key cannot be derived.
    CHECK(try_open_db(f.replica_uri(mine, "&encryption_passphrase=x&at=" + replicator::fmt_time_us(replicator::now_us())),
                      bad, err) != SQLITE_OK);
    CHECK(slurp_file(mine) == "precious");
    if (old_cache) ::setenv("XDG_CACHE_HOME", saved.c_str(), 1);
    else ::unsetenv("XDG_CACHE_HOME");
}

TEST_CASE("replica: a proven encrypted replica opens while S3 is down and follows once it is back",
          "[vfs][integration][replica]") {
    Fixture f("&encryption_passphrase=correct-horse");
    for (int i = 1; i <= 3; ++i) f.commit(i);
    f.flush();
    FaultProxy proxy("127.0.0.1", server_port());
    const std::string uri = f.replica_uri(f.replica_path, "&encryption_passphrase=correct-horse&endpoint=" + proxy.url());
    Db r = open_db(uri);
    wait_for_value(r.get(), "SELECT n FROM c", 3);
    r.reset();
    proxy.inject_always(Fault::Status503SlowDown);
    r = open_db(uri);  // no S3 needed: the file proves its position
    CHECK(query_int(r.get(), "SELECT n FROM c") == 3);
    CHECK(query_text(r.get(), "PRAGMA integrity_check") == "ok");
    f.commit(4);
    f.flush();
    proxy.clear();
    wait_for_value(r.get(), "SELECT n FROM c", 4, 20s);
    json st = status(r.get());
    INFO(st.dump());
    CHECK(st["hydrations"] == 0);
}

TEST_CASE("replica: a database id that is not one path component is refused before any request or file",
          "[vfs][integration][replica]") {
    // load_config() refuses such ids from a URI or the environment; the
    // replica checks again whoever built its configuration: at= names its
    // cache copy after the id, which must never leave the cache directory.
    Fixture f;
    TempDir top;
    const std::string cache = top.file("c/d");
    fs::create_directories(cache);
    const char* old_cache = std::getenv("XDG_CACHE_HOME");
    const std::string saved = old_cache ? old_cache : "";
    ::setenv("XDG_CACHE_HOME", cache.c_str(), 1);
    FaultProxy proxy("127.0.0.1", server_port());
    replicator::ReplicatorConfig cfg;
    cfg.s3 = server_config();
    cfg.s3.endpoint = proxy.url();
    cfg.bucket = f.bucket.name();
    cfg.replica = true;
    for (const std::string& id : {std::string("../../escape"), std::string("a/b"), std::string("x\0y", 3),
                                  std::string(".."), std::string("/abs"), std::string()}) {
        for (bool at : {true, false}) {
            INFO("id '" << id << "' at=" << at);
            cfg.db_id = id;
            cfg.replica_at_us = at ? std::optional<int64_t>(replicator::now_us()) : std::nullopt;
            auto r = replicator::Replica::acquire(f.dir.file("r/bad.db"), cfg, sqlite3_vfs_find(nullptr));
            REQUIRE_FALSE(r);
            CHECK(r.error().code == "BadDatabaseId");
            CHECK(r.error().message.find("database_id=") != std::string::npos);  // says what to do
        }
    }
    CHECK(proxy.requests_seen() == 0);
    size_t files = 0;
    for (const auto& e : fs::recursive_directory_iterator(top.path())) files += e.is_regular_file();
    CHECK(files == 0);
    CHECK_FALSE(fs::exists(f.dir.file("r/bad.db")));
    if (old_cache) ::setenv("XDG_CACHE_HOME", saved.c_str(), 1);
    else ::unsetenv("XDG_CACHE_HOME");
}

TEST_CASE("replica: closing the last connection while the follower hydrates cancels it promptly and cleanly",
          "[vfs][integration][replica]") {
    // Encrypted: its snapshots have no page index (format 1), so the new
    // generation's whole snapshot is downloaded, slowly.
    const std::string key(64, 'c');
    Fixture f("&encryption_key=" + key);
    // ~400 KB of pages: at 2 KB per 20 ms through the proxy the new
    // generation's snapshot takes seconds to arrive (about 4 s).
    exec(f.writer.get(), "WITH RECURSIVE s(k) AS (SELECT 100 UNION ALL SELECT k+1 FROM s WHERE k<299) "
                         "INSERT INTO log SELECT k, randomblob(2000) FROM s");
    f.commit(1);
    f.flush();
    FaultProxy proxy("127.0.0.1", server_port());
    Db r = open_db(f.replica_uri(f.replica_path, "&encryption_key=" + key + "&endpoint=" + proxy.url()));
    wait_for_value(r.get(), "SELECT n FROM c", 1);
    // A new generation: the follower finds it at a listing (after 5 s
    // without a new segment) and hydrates it, its snapshot trickling in.
    proxy.set_trickle(2048, 20);
    proxy.set_filter("GET", "snapshot");
    proxy.inject_always(Fault::Trickle);
    (void)query_text(f.writer.get(), "SELECT bottomless_snapshot()");
    f.commit(2);
    f.flush();
    const auto t0 = std::chrono::steady_clock::now();
    while (proxy.bytes_sent_by_faults() < 64 * 1024 && std::chrono::steady_clock::now() - t0 < 30s)
        std::this_thread::sleep_for(20ms);
    REQUIRE(proxy.bytes_sent_by_faults() >= 64 * 1024);  // the whole snapshot's GET is under way
    const long long sent = proxy.bytes_sent_by_faults();
    const auto tc = std::chrono::steady_clock::now();
    r.reset();  // the last connection: the follower stops
    const auto took = std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - tc);
    INFO("close took " << took.count() << " ms with " << sent << " snapshot bytes trickled");
    // Without the cancel the close waited for the GET's deadline (5 s here)
    // or the whole download.
    CHECK(took < 1500ms);
    std::this_thread::sleep_for(100ms);
    CHECK(proxy.bytes_sent_by_faults() < 400 * 1024);  // the transfer stopped, it did not run on
    // Nothing half-written is left as if it were valid: no image, no
    // journal, and the file is still the state its state file proves.
    for (const auto& e : fs::directory_iterator(f.dir.file("r")))
        CHECK(e.path().filename().string().find("replica-new") == std::string::npos);
    CHECK_FALSE(fs::exists(f.replica_path + "-journal"));
    proxy.clear();
    r = open_db(f.replica_uri(f.replica_path, "&encryption_key=" + key));
    json st = status(r.get());
    INFO(st.dump());
    CHECK(st["hydrations"] == 0);  // proven: opened from its file
    CHECK(query_int(r.get(), "SELECT n FROM c") == 1);
    CHECK(query_text(r.get(), "PRAGMA integrity_check") == "ok");
    // And it follows on to the new generation: in full (no page index).
    wait_for_value(r.get(), "SELECT n FROM c", 2, 30s);
    CHECK(query_text(r.get(), "PRAGMA integrity_check") == "ok");
    CHECK(status(r.get())["last_hydration"]["download"] == "full");
}

TEST_CASE("replica: failing polls back off exponentially and the back-off resets once S3 answers",
          "[vfs][integration][replica]") {
    Fixture f;
    f.commit(1);
    f.flush();
    FaultProxy proxy("127.0.0.1", server_port());
    Db r = open_db(f.replica_uri(f.replica_path, "&endpoint=" + proxy.url()));
    wait_for_value(r.get(), "SELECT n FROM c", 1);
    // Every GET of a segment refused at once (the client does not retry a
    // 403): each failed poll costs one request, so only the follower's
    // back-off keeps a 50 ms replica from asking 20 times a second.
    proxy.set_filter("GET", "seg-");
    proxy.inject_always(Fault::Status403AccessDenied);
    const int before = proxy.faults_injected();
    std::this_thread::sleep_for(3100ms);
    const int refused = proxy.faults_injected() - before;
    json st = status(r.get());
    INFO(st.dump() << "\n" << refused << " refused GETs in 3.1 s");
    // 100, 200, 400, 800, 1600 ms apart: about 6 in 3.1 s (~60 without).
    CHECK(refused >= 3);
    CHECK(refused <= 9);
    CHECK(st["consecutive_failures"].get<uint64_t>() >= 4);
    CHECK(st["retry_backoff_ms"].get<int64_t>() >= 800);
    CHECK(st["retry_backoff_ms"].get<int64_t>() <= 5000);
    REQUIRE(st["last_error"].is_string());
    CHECK(st["last_error"].get<std::string>().find("denied") != std::string::npos);
    // Bounded: 5 s at most between tries however long it lasts (checked by
    // the status; the wait itself is the next poll).
    proxy.clear();
    f.commit(2);
    f.flush();
    wait_for_value(r.get(), "SELECT n FROM c", 2, 10s);
    st = status(r.get());
    INFO(st.dump());
    CHECK(st["consecutive_failures"] == 0);
    CHECK(st["retry_backoff_ms"] == 0);
    CHECK(st["last_error"].is_null());
    CHECK(query_text(r.get(), "PRAGMA integrity_check") == "ok");
}
