// Several processes writing one database through bottomless (issue 14):
// exactly one of them replicates (the leader) and ships every process's
// commits; the others write and never upload (in sync mode their COMMIT
// waits for the leader to ship it); a dead leader's place is taken by
// another writer, which continues the same generation; nothing forks the
// history and no commit is lost.
#include <catch2/catch.hpp>

#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <thread>
#include <vector>

#include "replicator/restore.h"
#include "replicator/shared_area.h"
#include "support/fault_proxy.h"
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
    // Restores db_id into `copy` now and counts the rows of `sql`'s query.
    long long restored_count(const std::string& db_id, const std::string& copy, const std::string& sql) const {
        const std::string out = dir.file(copy);
        auto r = replicator::restore_database(*client, bucket.name(), db_id, out);
        if (!r) FAIL("restore failed: " << r.error().describe());
        sqlite3* raw = nullptr;
        REQUIRE(sqlite3_open_v2(out.c_str(), &raw, SQLITE_OPEN_READONLY, nullptr) == SQLITE_OK);
        Db db(raw);
        return query_int(db.get(), sql);
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

// Whether this process holds a lock on byte `offset` of `path`, as another
// process sees it (fcntl's F_GETLK does not report the caller's own locks:
// a child asks). SQLite's unix VFS holds a shared lock on the wal-index's
// "DMS" byte (offset 128 of -shm) for as long as the process has it mapped;
// closing any descriptor of the file would drop it, and every read mark.
bool lock_held_by_me(const std::string& path, off_t offset) {
    const pid_t me = ::getpid();
    pid_t pid = ::fork();
    if (pid == 0) {
        // Only async-signal-safe calls after fork.
        int fd = ::open(path.c_str(), O_RDWR);
        if (fd < 0) _exit(2);
        struct flock fl{};
        fl.l_type = F_WRLCK;
        fl.l_whence = SEEK_SET;
        fl.l_start = offset;
        fl.l_len = 1;
        if (::fcntl(fd, F_GETLK, &fl) != 0) _exit(2);
        _exit(fl.l_type != F_UNLCK && fl.l_pid == me ? 0 : 1);
    }
    int status = 0;
    ::waitpid(pid, &status, 0);
    REQUIRE(WIFEXITED(status));
    REQUIRE(WEXITSTATUS(status) != 2);
    return WEXITSTATUS(status) == 0;
}

}  // namespace

TEST_CASE("a second process writes a replicated database: the leader ships its commits, its flush waits for them", "[processes]") {
    if (skip_process_tests()) BOTTOMLESS_SKIP(kProcessSkipReason);
    register_bottomless();
    Setup s;
    Db leader = open_db(s.uri("app.db"));
    exec(leader.get(), "PRAGMA journal_mode=WAL; CREATE TABLE t(x); INSERT INTO t VALUES (1), (2)");
    query_text(leader.get(), "SELECT bottomless_flush(30000)");
    auto st = nlohmann::json::parse(query_text(leader.get(), "SELECT bottomless_status()"));
    CHECK(st["role"] == "leader");
    CHECK(st["leader_pid"] == static_cast<long>(::getpid()));

    // Another process writes; it does not replicate (status names the
    // leader) and its flush returns once this process has shipped its
    // commit. This process stays idle meanwhile: it polls the other's commits.
    std::string out = run_shell(BOTTOMLESS_EXT_PATH,
                                ".open " + s.uri("app.db") +
                                    "\nPRAGMA busy_timeout=10000;\nINSERT INTO t VALUES (3);\n"
                                    "SELECT 'rows=' || count(*) FROM t;\nSELECT bottomless_status();\n"
                                    "SELECT bottomless_flush(30000);\n");
    CHECK_THAT(out, Catch::Contains("rows=3"));
    CHECK_THAT(out, Catch::Contains("\"role\":\"follower\""));
    CHECK_THAT(out, Catch::Contains("\"leader_pid\":" + std::to_string(::getpid())));
    CHECK_THAT(out, Catch::Contains("\"read_only\":false"));
    CHECK_THAT(out, !Catch::Contains("Error"));

    // What the follower's flush promised is in the bucket already: a
    // restore taken now, while this process still runs, has its row.
    CHECK(s.restored_count("app.db", "early.db", "SELECT count(*) FROM t WHERE x = 3") == 1);
    exec(leader.get(), "INSERT INTO t VALUES (4)");
    query_text(leader.get(), "SELECT bottomless_flush(30000)");
    CHECK(query_int(leader.get(), "SELECT count(*) FROM t") == 4);
    const std::string local = content_hash(leader.get());
    CHECK(s.generations("app.db") == 1);
    leader.reset();
    CHECK(s.restored_hash("app.db") == local);
}

TEST_CASE("a WAL restart in any process keeps the frames the leader has not shipped aside", "[processes]") {
    if (skip_process_tests()) BOTTOMLESS_SKIP(kProcessSkipReason);
    register_bottomless();
    Setup s;
    // The leader ships every 3 s: the other process's commits are noted at
    // once but stay unshipped while it truncates the WAL. Before, its
    // restart waited for them (its TRUNCATE checkpoint answered busy, and
    // under a steady load the WAL only grew).
    Db leader = open_db(s.uri("tail.db") + "&batch_interval_ms=3000");
    exec(leader.get(), "PRAGMA journal_mode=WAL; CREATE TABLE t(x, b); INSERT INTO t VALUES (0, 'x')");
    query_text(leader.get(), "SELECT bottomless_flush(30000)");
    const std::string wal = s.dir.file("tail.db-wal"), aside = s.dir.file("tail.db-bottomless-frames");

    std::string out = run_shell(BOTTOMLESS_EXT_PATH,
                                ".open " + s.uri("tail.db") +
                                    "\nPRAGMA busy_timeout=10000;\n"
                                    "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 50) "
                                    "INSERT INTO t SELECT i, randomblob(3000) FROM n;\n"
                                    "INSERT INTO t VALUES (51, randomblob(100));\n"
                                    ".print ckpt\nPRAGMA wal_checkpoint(TRUNCATE);\n"
                                    ".system stat -c 'wal=%s' " + wal + "\n"
                                    // The new epoch overwrites the old one's slots.
                                    "WITH RECURSIVE n(i) AS (SELECT 100 UNION ALL SELECT i + 1 FROM n WHERE i < 130) "
                                    "INSERT INTO t SELECT i, randomblob(3000) FROM n;\n"
                                    "SELECT 'flushed ' || bottomless_flush(30000);\n");
    CHECK_THAT(out, Catch::Contains("ckpt\n0|0|0"));  // not busy, and the WAL emptied
    CHECK_THAT(out, Catch::Contains("wal=0"));
    CHECK_THAT(out, Catch::Contains("flushed {"));
    CHECK_THAT(out, !Catch::Contains("Error"));
    struct stat st{};
    CHECK(::stat(aside.c_str(), &st) == 0);  // the ended epoch's unshipped frames went there

    // The leader's own restart with a follower's commits unshipped: the same.
    out = run_shell(BOTTOMLESS_EXT_PATH, ".open " + s.uri("tail.db") +
                                             "\nPRAGMA busy_timeout=10000;\nINSERT INTO t VALUES (200, randomblob(3000));\n");
    CHECK_THAT(out, !Catch::Contains("Error"));
    exec(leader.get(), "INSERT INTO t VALUES (201, randomblob(3000))");
    CHECK(query_text(leader.get(), "PRAGMA wal_checkpoint(TRUNCATE)") == "0");
    exec(leader.get(), "INSERT INTO t VALUES (202, randomblob(3000))");
    query_text(leader.get(), "SELECT bottomless_flush(30000)");
    CHECK(query_int(leader.get(), "SELECT count(*) FROM t") == 1 + 51 + 31 + 3);
    const std::string local = content_hash(leader.get());
    CHECK(s.generations("tail.db") == 1);
    leader.reset();
    CHECK(s.restored_hash("tail.db") == local);
}

TEST_CASE("in sync mode another process's COMMIT returns once the leader has made it durable", "[processes]") {
    if (skip_process_tests()) BOTTOMLESS_SKIP(kProcessSkipReason);
    register_bottomless();
    Setup s;
    FaultProxy proxy("127.0.0.1", server_port());
    const std::string uri = s.uri("sync.db") + "&endpoint=" + proxy.url() + "&sync_timeout_ms=2000";
    Db leader = open_db(uri + "&sync=1");
    exec(leader.get(), "PRAGMA journal_mode=WAL; CREATE TABLE t(x, b); INSERT INTO t VALUES (1, ''), (2, '')");
    // The follower's commits (one small, one of several pages) come back
    // only once the leader has shipped them: a restore taken right after
    // the shell exits, with no flush anywhere, holds them.
    std::string out = run_shell(BOTTOMLESS_EXT_PATH,
                                ".open " + uri +
                                    "\nPRAGMA busy_timeout=10000;\nINSERT INTO t VALUES (3, '');\n"
                                    "INSERT INTO t VALUES (4, randomblob(20000));\nSELECT bottomless_status();\n");
    CHECK_THAT(out, Catch::Contains("\"role\":\"follower\""));
    CHECK_THAT(out, Catch::Contains("\"sync\":true"));
    CHECK_THAT(out, !Catch::Contains("Error"));
    CHECK(s.restored_count("sync.db", "early.db", "SELECT count(*) FROM t") == 4);

    // S3 refuses: the follower's COMMIT fails (after sync_timeout) and the
    // row is not there, neither locally nor in the bucket.
    proxy.inject_always(Fault::Status500);
    out = run_shell(BOTTOMLESS_EXT_PATH,
                    ".open " + uri + "\nPRAGMA busy_timeout=10000;\nINSERT INTO t VALUES (5, '');\n", 1);
    CHECK_THAT(out, Catch::Contains("disk I/O error"));
    CHECK(query_int(leader.get(), "SELECT count(*) FROM t WHERE x = 5") == 0);
    proxy.clear();
    out = run_shell(BOTTOMLESS_EXT_PATH, ".open " + uri + "\nPRAGMA busy_timeout=10000;\nINSERT INTO t VALUES (6, '');\n");
    CHECK_THAT(out, !Catch::Contains("Error"));
    exec(leader.get(), "INSERT INTO t VALUES (7, '')");
    CHECK(query_int(leader.get(), "SELECT count(*) FROM t") == 6);
    const std::string local = content_hash(leader.get());
    leader.reset();
    CHECK(s.restored_hash("sync.db") == local);
}

namespace {

// A writer shell: `commits` transactions of random sizes (BEGIN IMMEDIATE),
// a TRUNCATE checkpoint every 100, then its flush. Rows (p, i).
std::string writer_script(const Setup& s, const std::string& db, int p, int commits, bool wait_for_others,
                          int procs) {
    std::string script = s.dir.file("w" + std::to_string(p) + ".sql");
    std::ofstream f(script);
    f << ".bail on\n.load " << BOTTOMLESS_EXT_PATH << "\n.open " << s.uri(db) << "\n"
      << "PRAGMA busy_timeout=20000;\n.output /dev/null\n";
    // Several connections turning a fresh file to WAL at once get "database
    // is locked" from SQLite itself, busy_timeout or not (plain sqlite3, 4
    // processes: 9 of 20 runs): process 0 converts it, the others wait.
    const std::string converted = s.dir.file("wal-mode");
    if (wait_for_others && p != 0)
        f << ".system i=0; while [ ! -e " << converted << " ] && [ $i -lt 3000 ]; do sleep 0.01; i=$((i+1)); done\n";
    f << "PRAGMA journal_mode=WAL;\nCREATE TABLE IF NOT EXISTS t(p, i, b);\n";
    if (wait_for_others && p == 0) f << ".system touch " << converted << "\n";
    if (wait_for_others)
        f << ".system touch " << s.dir.file("open" + std::to_string(p)) << "\n"
          << ".system i=0; while [ $(ls " << s.dir.path() << " | grep -c '^open') -lt " << procs
          << " ] && [ $i -lt 3000 ]; do sleep 0.01; i=$((i+1)); done\n";
    for (int i = 0; i < commits; ++i) {
        f << "BEGIN IMMEDIATE; INSERT INTO t VALUES (" << p << ", " << i << ", randomblob(abs(random()) % 3000)); COMMIT;\n";
        if (i % 100 == 99) f << "PRAGMA wal_checkpoint(TRUNCATE);\n";
    }
    f << ".output\nSELECT 'flushed ' || bottomless_flush(60000);\n";
    return script;
}

std::string log_of(const Setup& s, int p) {
    std::ifstream in(s.dir.file("w" + std::to_string(p) + ".log"));
    return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

// The local file's content hash and row count, read with plain SQLite.
std::pair<std::string, long> local_state(const std::string& path) {
    sqlite3* raw = nullptr;
    REQUIRE(sqlite3_open_v2(path.c_str(), &raw, SQLITE_OPEN_READONLY, nullptr) == SQLITE_OK);
    Db db(raw);
    return {content_hash(db.get()), query_int(db.get(), "SELECT count(*) FROM t")};
}

}  // namespace

TEST_CASE("writers in several processes: one history, the latest restore equals the local file", "[processes]") {
    if (skip_process_tests()) BOTTOMLESS_SKIP(kProcessSkipReason);
    // Four shells write at once (random sizes, their own TRUNCATE
    // checkpoints), each flushes and closes; leadership passes from one to
    // the next as they close. Before the election every one of them
    // replicated to a generation of its own and the newest lacked the
    // others' last commits; then only the leader could write.
    constexpr int kProcs = 4, kCommits = 400, kRuns = 3;
    for (int run = 0; run < kRuns; ++run) {
        Setup s;
        std::vector<pid_t> pids;
        for (int p = 0; p < kProcs; ++p)
            pids.push_back(spawn_shell(writer_script(s, "multi.db", p, kCommits, true, kProcs),
                                       s.dir.file("w" + std::to_string(p) + ".log")));
        for (size_t p = 0; p < pids.size(); ++p) {
            int status = 0;
            REQUIRE(::waitpid(pids[p], &status, 0) == pids[p]);
            INFO("run " << run << ", process " << p << ": " << log_of(s, static_cast<int>(p)));
            INFO("signal " << (WIFSIGNALED(status) ? WTERMSIG(status) : 0));
            CHECK(WIFEXITED(status));
            CHECK(WEXITSTATUS(status) == 0);
            CHECK_THAT(log_of(s, static_cast<int>(p)), Catch::Contains("flushed {"));
        }
        auto [local, rows] = local_state(s.dir.file("multi.db"));
        CHECK(rows == kProcs * kCommits);
        CHECK(s.restored_hash("multi.db") == local);
        CHECK(s.generations("multi.db") == 1);
    }
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
    // Leader at once, or within a takeover poll: the first connection's
    // follower may still be alive on this process's takeover thread (its
    // last reference is dropped there), and take over first, for a moment.
    auto st = nlohmann::json::parse(query_text(db.get(), "SELECT bottomless_status()"));
    for (int i = 0; i < 100 && st["role"] != "leader"; ++i) {
        std::this_thread::sleep_for(std::chrono::milliseconds(50));
        st = nlohmann::json::parse(query_text(db.get(), "SELECT bottomless_status()"));
    }
    CHECK(st["role"] == "leader");
    exec(db.get(), "INSERT INTO t VALUES ('after')");
    query_text(db.get(), "SELECT bottomless_flush(30000)");
    const std::string local = content_hash(db.get());
    db.reset();
    CHECK(s.restored_hash("kill.db") == local);
    CHECK(s.generations("kill.db") <= 2);
}

TEST_CASE("a follower takes over when the leader is killed: the same generation, no commit lost", "[processes]") {
    if (skip_process_tests()) BOTTOMLESS_SKIP(kProcessSkipReason);
    Setup s;
    const std::string script = s.dir.file("leader.sql");
    {
        std::ofstream f(script);
        f << ".bail on\n.load " << BOTTOMLESS_EXT_PATH << "\n.open " << s.uri("take.db") << "\n"
          << ".output /dev/null\nPRAGMA journal_mode=WAL;\n.output\nCREATE TABLE t(x);\nINSERT INTO t VALUES ('before');\n"
          << "SELECT bottomless_flush(30000);\n.system touch " << s.dir.file("ready") << "\n.system sleep 60\n";
    }
    pid_t pid = spawn_shell(script, s.dir.file("leader.log"));
    for (int i = 0; i < 12000 && ::access(s.dir.file("ready").c_str(), F_OK) != 0; ++i)
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
    REQUIRE(::access(s.dir.file("ready").c_str(), F_OK) == 0);

    register_bottomless();
    Db db = open_db(s.uri("take.db"));
    exec(db.get(), "PRAGMA busy_timeout=10000");
    CHECK(nlohmann::json::parse(query_text(db.get(), "SELECT bottomless_status()"))["role"] == "follower");
    // Commits the leader ships, then commits it never sees: it dies.
    for (int i = 0; i < 50; ++i) exec(db.get(), "INSERT INTO t VALUES ('follower " + std::to_string(i) + "')");
    ::kill(pid, SIGKILL);
    int status = 0;
    ::waitpid(pid, &status, 0);
    for (int i = 0; i < 50; ++i) exec(db.get(), "INSERT INTO t VALUES ('after " + std::to_string(i) + "')");

    // Within about one poll the process notices and replicates in place.
    nlohmann::json st;
    for (int i = 0; i < 500; ++i) {
        st = nlohmann::json::parse(query_text(db.get(), "SELECT bottomless_status()"));
        if (st["role"] == "leader") break;
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    REQUIRE(st["role"] == "leader");
    CHECK(st["leader_pid"] == static_cast<long>(::getpid()));
    // The takeover read the live wal-index through this process's own
    // mapping: had it opened (and closed) a descriptor of -shm, the process
    // would have lost its locks there, and another process starting could
    // truncate the file under this one's mapping (SIGBUS). (Asked now that
    // the leader is dead: F_GETLK names one holder of a shared lock.)
    constexpr off_t kDmsByte = 128;  // SQLite's os_unix.c: (22 + 8) * 4 + 8
    CHECK(lock_held_by_me(s.dir.file("take.db") + "-shm", kDmsByte));
    exec(db.get(), "INSERT INTO t VALUES ('leading')");
    query_text(db.get(), "SELECT bottomless_flush(30000)");
    CHECK(query_int(db.get(), "SELECT count(*) FROM t") == 102);
    const std::string local = content_hash(db.get());
    CHECK(s.restored_hash("take.db") == local);  // while still open: everything was flushed
    db.reset();
    CHECK(s.restored_hash("take.db") == local);
    CHECK(s.generations("take.db") == 1);
}

TEST_CASE("the leader killed again and again while several processes write: one history, nothing lost", "[processes]") {
    if (skip_process_tests()) BOTTOMLESS_SKIP(kProcessSkipReason);
    // Three writer shells; a supervisor (this test) kills whichever leads,
    // ten times, and starts a new writer in its place. Each kill may cut a
    // transaction short (SQLite rolls it back) and leaves frames the dead
    // leader never shipped: the next leader continues from the WAL.
    Setup s;
    constexpr int kWriters = 3, kKills = 10;
    std::map<pid_t, int> running;  // pid -> writer number
    int next = 0;
    auto spawn = [&](int commits) {
        const int p = next++;
        running[spawn_shell(writer_script(s, "kill.db", p, commits, false, 0), s.dir.file("w" + std::to_string(p) + ".log"))] = p;
    };
    for (int i = 0; i < kWriters; ++i) spawn(3000);
    for (int i = 0; i < 12000 && ::access(s.dir.file("kill.db-bottomless-shm").c_str(), F_OK) != 0; ++i)
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
    auto area = replicator::SharedArea::open(s.dir.file("kill.db"));
    REQUIRE(area.ok());
    int kills = 0;
    std::string seen;
    for (int round = 0; round < 400 && kills < kKills; ++round) {
        std::this_thread::sleep_for(std::chrono::milliseconds(200));
        // A writer that finished is replaced, so that some always write.
        for (auto it = running.begin(); it != running.end();) {
            if (::waitpid(it->first, nullptr, WNOHANG) == it->first) {
                it = running.erase(it);
                spawn(1000);
            } else {
                ++it;
            }
        }
        const pid_t leader = static_cast<pid_t>((*area)->leader_pid());
        seen += std::to_string(leader) + " ";
        if (!running.count(leader)) continue;  // between leaders, or already gone
        ::kill(leader, SIGKILL);
        REQUIRE(::waitpid(leader, nullptr, 0) == leader);
        running.erase(leader);
        ++kills;
        spawn(1000);
    }
    INFO("leaders seen: " << seen);
    CHECK(kills == kKills);
    for (auto [pid, p] : running) {
        int status = 0;
        REQUIRE(::waitpid(pid, &status, 0) == pid);
        INFO("writer " << p << ": " << log_of(s, p) << " (signal " << (WIFSIGNALED(status) ? WTERMSIG(status) : 0)
                                << ")");
        CHECK(WIFEXITED(status));
        CHECK(WEXITSTATUS(status) == 0);
    }
    // Every process has closed: the latest restore is the local file.
    auto [local, rows] = local_state(s.dir.file("kill.db"));
    CHECK(rows > 0);
    CHECK(s.restored_hash("kill.db") == local);
    CHECK(s.generations("kill.db") <= 2);
}

// The copy aside is made under the WAL write lock: a tail of more than
// 1 MiB of unshipped frames is not copied while the WAL is short (under
// 64 MiB); the WAL grows instead (its restart answers busy), and the
// checkpoint goes through once the leader has shipped (tail_copy_worth_it).
TEST_CASE("a large unshipped tail in a short WAL waits for the leader instead of a copy under the write lock", "[processes]") {
    if (skip_process_tests()) BOTTOMLESS_SKIP(kProcessSkipReason);
    register_bottomless();
    Setup s;
    Db leader = open_db(s.uri("big.db") + "&batch_interval_ms=3000");
    exec(leader.get(), "PRAGMA journal_mode=WAL; CREATE TABLE t(x, b); INSERT INTO t VALUES (0, 'x')");
    query_text(leader.get(), "SELECT bottomless_flush(30000)");
    const std::string aside = s.dir.file("big.db-bottomless-frames");
    std::string out = run_shell(BOTTOMLESS_EXT_PATH,
                                ".open " + s.uri("big.db") +
                                    "\nPRAGMA busy_timeout=10000;\n"
                                    "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 600) "
                                    "INSERT INTO t SELECT i, randomblob(3000) FROM n;\n"
                                    ".print ckpt1\nPRAGMA wal_checkpoint(TRUNCATE);\n"
                                    "SELECT 'flushed ' || bottomless_flush(30000);\n"
                                    ".print ckpt2\nPRAGMA wal_checkpoint(TRUNCATE);\n");
    CHECK_THAT(out, Catch::Contains("ckpt1\n1|"));     // busy: ~2.5 MiB unshipped, a WAL far under 64 MiB
    CHECK_THAT(out, Catch::Contains("ckpt2\n0|0|0"));  // shipped: the WAL empties
    CHECK_THAT(out, Catch::Contains("flushed {"));
    struct stat st{};
    CHECK(::stat(aside.c_str(), &st) != 0);  // nothing was copied aside
    const std::string local = content_hash(leader.get());
    CHECK(query_int(leader.get(), "SELECT count(*) FROM t") == 601);
    leader.reset();
    CHECK(s.restored_hash("big.db") == local);
}
