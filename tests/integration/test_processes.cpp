// Several processes opening one database through bottomless (issue 14, the
// interim step): exactly one of them replicates (the leader); the others are
// read-only, so nothing forks the history and no commit is lost; a dead
// leader's lock goes with it.
#include <catch2/catch.hpp>

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <fstream>
#include <nlohmann/json.hpp>
#include <thread>
#include <vector>

#include "replicator/restore.h"
#include "support/s3_env.h"
#include "support/skip.h"
#include "support/sqlite_util.h"

using namespace bottomless;
using namespace bottomless::testing;

namespace {

struct Setup {
    std::unique_ptr<s3::Client> client = server_client();
    TestBucket bucket{*client, "proc"};
    TempDir dir;
    std::string uri(const std::string& name) const {
        return "file:" + dir.file(name) + "?vfs=bottomless&bucket=" + bucket.name();
    }
    size_t generations(const std::string& db_id) const {
        auto g = replicator::list_generations(*client, bucket.name(), db_id);
        REQUIRE(g.ok());
        return g->size();
    }
    std::string restored_hash(const std::string& db_id) const {
        const std::string out = dir.file("restored-" + db_id);
        auto r = replicator::restore_database(*client, bucket.name(), db_id, out);
        if (!r) FAIL("restore failed: " << r.error().describe());
        CHECK(integrity_of_file(out) == "ok");
        return content_hash_of_file(out);
    }
};

// Starts `sqlite3` with the extension in the background on a script; returns its pid.
pid_t spawn_shell(const std::string& script_path, const std::string& log_path) {
    pid_t pid = ::fork();
    if (pid == 0) {
        // Only async-signal-safe calls between fork and exec.
        execlp("sh", "sh", "-c", ("exec sqlite3 < '" + script_path + "' > '" + log_path + "' 2>&1").c_str(),
               static_cast<char*>(nullptr));
        _exit(127);
    }
    return pid;
}

}  // namespace

TEST_CASE("a second process opening a replicated database is read-only and says who leads", "[processes]") {
    if (skip_process_tests()) BOTTOMLESS_SKIP(kProcessSkipReason);
    register_bottomless();
    Setup s;
    Db leader = open_db(s.uri("app.db"));
    exec(leader.get(), "PRAGMA journal_mode=WAL; CREATE TABLE t(x); INSERT INTO t VALUES (1), (2)");
    query_text(leader.get(), "SELECT bottomless_flush(30000)");
    auto st = nlohmann::json::parse(query_text(leader.get(), "SELECT bottomless_status()"));
    CHECK(st["role"] == "leader");
    CHECK(st["leader_pid"] == static_cast<long>(::getpid()));

    // Another process: reads work, status names the leader, a write fails
    // loudly instead of shipping to a generation of its own.
    std::string out = run_shell(BOTTOMLESS_EXT_PATH,
                                ".open " + s.uri("app.db") +
                                    "\nSELECT 'rows=' || count(*) FROM t;\nSELECT bottomless_status();\n"
                                    "INSERT INTO t VALUES (3);\n",
                                1);
    CHECK_THAT(out, Catch::Contains("rows=2"));
    CHECK_THAT(out, Catch::Contains("\"role\":\"follower\""));
    CHECK_THAT(out, Catch::Contains("\"leader_pid\":" + std::to_string(::getpid())));
    CHECK_THAT(out, Catch::Contains("readonly"));
    out = run_shell(BOTTOMLESS_EXT_PATH, ".open " + s.uri("app.db") + "\nSELECT bottomless_flush(1000);\n", 1);
    CHECK_THAT(out, Catch::Contains("read-only and does not replicate"));

    // The leader goes on; the follower's close (it is not the last
    // connection) and its refused write left nothing behind.
    exec(leader.get(), "INSERT INTO t VALUES (4)");
    query_text(leader.get(), "SELECT bottomless_flush(30000)");
    const std::string local = content_hash(leader.get());
    CHECK(s.generations("app.db") == 1);
    leader.reset();
    CHECK(s.restored_hash("app.db") == local);
}

TEST_CASE("writers in several processes: one replicates, one generation, the latest restore equals the local file", "[processes]") {
    if (skip_process_tests()) BOTTOMLESS_SKIP(kProcessSkipReason);
    Setup s;
    // Four shells open the database, wait until all four have it open, then
    // each writes 50 transactions if it may. Before the election every one
    // of them replicated to a generation of its own (and the newest lacked
    // the others' last commits); now one leads and the others fail at their
    // first write (.bail on), having written nothing.
    constexpr int kProcs = 4;
    std::vector<pid_t> pids;
    for (int p = 0; p < kProcs; ++p) {
        std::string script = s.dir.file("w" + std::to_string(p) + ".sql");
        std::ofstream f(script);
        f << ".bail on\n.load " << BOTTOMLESS_EXT_PATH << "\n.open " << s.uri("multi.db") << "\n"
          << "PRAGMA busy_timeout=10000;\n.output /dev/null\nPRAGMA journal_mode=WAL;\n.output\n"
          << "SELECT count(*) FROM sqlite_schema;\n"
          << ".system touch " << s.dir.file("open" + std::to_string(p)) << "\n"
          << ".system i=0; while [ $(ls " << s.dir.path() << " | grep -c '^open') -lt " << kProcs
          << " ] && [ $i -lt 3000 ]; do sleep 0.01; i=$((i+1)); done\n"
          << "CREATE TABLE IF NOT EXISTS t(p, i);\n";
        for (int i = 0; i < 50; ++i) f << "BEGIN IMMEDIATE; INSERT INTO t VALUES (" << p << ", " << i << "); COMMIT;\n";
        f << "SELECT bottomless_flush(30000);\n";
        f.close();
        pids.push_back(spawn_shell(script, s.dir.file("w" + std::to_string(p) + ".log")));
    }
    int writers = 0;
    for (size_t p = 0; p < pids.size(); ++p) {
        int status = 0;
        REQUIRE(::waitpid(pids[p], &status, 0) == pids[p]);
        std::ifstream in(s.dir.file("w" + std::to_string(p) + ".log"));
        std::string log((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
        INFO("process " << p << ": " << log);
        REQUIRE(WIFEXITED(status));
        if (WEXITSTATUS(status) == 0) {
            ++writers;
        } else {
            CHECK_THAT(log, Catch::Contains("readonly"));
        }
    }
    CHECK(writers == 1);
    // Every process has closed: the local file and the latest restore hold
    // exactly the leader's transactions, in one generation.
    std::string local;
    {
        sqlite3* raw = nullptr;
        REQUIRE(sqlite3_open_v2(s.dir.file("multi.db").c_str(), &raw, SQLITE_OPEN_READONLY, nullptr) == SQLITE_OK);
        Db db(raw);
        CHECK(query_int(db.get(), "SELECT count(*) FROM t") == 50);
        local = content_hash(db.get());
    }
    CHECK(s.restored_hash("multi.db") == local);
    CHECK(s.generations("multi.db") == 1);
}

TEST_CASE("a killed leader's lock is released: the next process leads and loses no commit", "[processes]") {
    if (skip_process_tests()) BOTTOMLESS_SKIP(kProcessSkipReason);
    Setup s;
    const std::string script = s.dir.file("leader.sql");
    {
        std::ofstream f(script);
        f << ".bail on\n.load " << BOTTOMLESS_EXT_PATH << "\n.open " << s.uri("kill.db") << "\n"
          << ".output /dev/null\nPRAGMA journal_mode=WAL;\n.output\nCREATE TABLE t(x);\nINSERT INTO t VALUES ('before');\nSELECT bottomless_flush(30000);\n"
          << "SELECT 'ready';\n.system touch " << s.dir.file("ready") << "\n.system sleep 60\n";
    }
    pid_t pid = spawn_shell(script, s.dir.file("leader.log"));
    // A generous deadline: a loaded machine or a sanitizer build makes the
    // shell's open, first snapshot and flush slow.
    for (int i = 0; i < 12000 && ::access(s.dir.file("ready").c_str(), F_OK) != 0; ++i)
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
    if (::access(s.dir.file("ready").c_str(), F_OK) != 0) {
        ::kill(pid, SIGKILL);
        ::waitpid(pid, nullptr, 0);
        std::ifstream in(s.dir.file("leader.log"));
        std::string log((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
        FAIL("the leader shell did not get ready within 120 s: " << log);
    }

    register_bottomless();
    {
        // While it lives, this process follows.
        Db db = open_db(s.uri("kill.db"));
        CHECK_THAT(query_text(db.get(), "SELECT bottomless_status()"), Catch::Contains("follower"));
    }
    ::kill(pid, SIGKILL);  // the shell's child `sleep` keeps no lock: only the shell held it
    int status = 0;
    ::waitpid(pid, &status, 0);

    Db db = open_db(s.uri("kill.db"));
    auto st = nlohmann::json::parse(query_text(db.get(), "SELECT bottomless_status()"));
    CHECK(st["role"] == "leader");
    exec(db.get(), "INSERT INTO t VALUES ('after')");
    query_text(db.get(), "SELECT bottomless_flush(30000)");
    const std::string local = content_hash(db.get());
    db.reset();
    CHECK(s.restored_hash("kill.db") == local);
    CHECK(s.generations("kill.db") <= 2);
}
