// Crash: a writer process (tests/support/crash_writer.cpp) is killed with
// SIGKILL at random moments. Every restore from the bucket must pass
// integrity_check and be a committed prefix of the writer's history; in sync
// mode it must hold every transaction whose COMMIT returned OK. After the
// last crash, reopening the database ships what the local WAL still holds.
//
// BOTTOMLESS_CRASH_ITERATIONS (default 30) sets the number of kills.
#include <catch2/catch.hpp>

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <fstream>
#include <random>
#include <thread>

#include "replicator/restore.h"
#include "support/poll.h"
#include "support/s3_env.h"
#include "support/seed.h"
#include "support/sqlite_util.h"

using namespace bottomless;
using namespace bottomless::testing;

namespace {

pid_t spawn_writer(const std::string& uri, const std::string& log, unsigned seed) {
    pid_t pid = fork();
    REQUIRE(pid >= 0);
    if (pid == 0) {
        std::string s = std::to_string(seed);
        const char* keep_err = std::getenv("BOTTOMLESS_CRASH_ERR");  // debugging aid: one stderr log for all writers
        std::string err = keep_err ? keep_err : log + ".err";
        if (FILE* f = std::freopen(err.c_str(), "a", stderr)) (void)f;
        execl(BOTTOMLESS_CRASH_WRITER, BOTTOMLESS_CRASH_WRITER, uri.c_str(), log.c_str(), s.c_str(),
              static_cast<char*>(nullptr));
        _exit(127);
    }
    return pid;
}

long long last_logged(const std::string& log) {
    std::ifstream in(log);
    long long k = 0, v;
    while (in >> v) k = v;
    return k;
}


// Checks the committed-prefix property; returns m, the last transaction held.
long long check_prefix(const std::string& path) {
    REQUIRE(integrity_of_file(path) == "ok");
    Db db = open_db("file:" + path + "?immutable=1");
    // A writer killed before its first transaction (slow machine, sanitizer
    // build, sync mode waiting on S3) leaves no tables: the empty prefix.
    if (query_int(db.get(), "SELECT count(*) FROM sqlite_schema WHERE name IN ('txns', 'rows')") < 2) return 0;
    long long m = query_int(db.get(), "SELECT coalesce(max(k), 0) FROM txns");
    CHECK(query_int(db.get(), "SELECT count(*) FROM txns") == m);  // 1..m, no gap
    CHECK(query_int(db.get(), "SELECT count(*) FROM txns t LEFT JOIN (SELECT k, count(*) AS c FROM rows GROUP BY k) g "
                              "ON g.k = t.k WHERE coalesce(g.c, 0) != t.r") == 0);
    CHECK(query_int(db.get(), "SELECT count(*) FROM rows WHERE k > " + std::to_string(m)) == 0);
    return m;
}

int iterations() {
    const char* v = std::getenv("BOTTOMLESS_CRASH_ITERATIONS");
    return v ? std::max(1, std::atoi(v)) : 30;
}

}  // namespace

TEST_CASE("SIGKILL at random moments: every restore is a committed prefix", "[vfs][integration][crash]") {
    std::string mode = GENERATE(as<std::string>{}, "async", "sync");
    CAPTURE(mode);
    auto client = server_client();
    TestBucket bucket(*client, "crash");
    TempDir dir;
    std::string path = dir.file("crash.db");
    std::string log = dir.file("writer.log");
    std::string uri = "file:" + path + "?vfs=bottomless&bucket=" + bucket.name() + "&batch_interval_ms=100" +
                      (mode == "sync" ? "&sync=1" : "");
    std::mt19937 rng(test_seed());  // printed on failure; BOTTOMLESS_TEST_SEED repeats the kill moments
    long long restored_max = 0;
    int restores = 0;
    const int n = mode == "sync" ? std::max(1, iterations() / 3) : iterations();
    for (int i = 0; i < n; ++i) {
        const long long logged_before = last_logged(log);
        pid_t pid = spawn_writer(uri, log, rng());
        // The moment of the kill is random, but tied to what the writer did,
        // not to the wall clock alone: on a loaded machine a writer may take
        // seconds to open. The first run lives until a snapshot is in the
        // bucket (so there is a history to restore); then runs alternate
        // between a kill any time after the start (the open, the restore,
        // the snapshot of a new generation included) and a kill while
        // transactions commit.
        bool reached = true;
        if (i == 0) {
            reached = eventually(
                [&] {
                    auto l = client->list_all(bucket.name(), "crash.db/");
                    return l.ok() && !l->empty();
                },
                std::chrono::seconds(120), std::chrono::milliseconds(20));
        } else if (i % 2 == 0) {
            reached = eventually([&] { return last_logged(log) > logged_before; }, std::chrono::seconds(120),
                                 std::chrono::milliseconds(20));
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(i % 2 == 1 ? 300 + rng() % 900 : rng() % 600));
        kill(pid, SIGKILL);
        int status = 0;
        waitpid(pid, &status, 0);
        if (!WIFSIGNALED(status)) {
            std::ifstream err(log + ".err");
            std::string text((std::istreambuf_iterator<char>(err)), std::istreambuf_iterator<char>());
            std::ifstream st(path + "-bottomless");
            std::string state((std::istreambuf_iterator<char>(st)), std::istreambuf_iterator<char>());
            std::string gens;
            if (auto g = replicator::list_generations(*client, bucket.name(), "crash.db"))
                for (const auto& x : *g) gens += x.id + " ";
            FAIL_CHECK("the writer exited on its own: " << text << "\nstate file: " << state << "\ngenerations: " << gens);
        }

        CHECK(reached);  // the writer made progress within two minutes
        long long logged = last_logged(log);
        std::string out = dir.file("restore-" + std::to_string(i) + ".db");
        auto r = replicator::restore_database(*client, bucket.name(), "crash.db", out, {});
        if (!r) {
            INFO(r.error().describe());
            if (r.error().kind == ErrorKind::Corrupt && std::getenv("BOTTOMLESS_CRASH_KEEP")) {
                // Debugging aid: keep the evidence (bucket and files) for inspection.
                std::string keep = std::string("/tmp/crash-evidence-") + bucket.name();
                std::system(("cp -a " + dir.path() + " " + keep).c_str());
                FAIL("evidence kept in " << keep << " and bucket " << bucket.name());
            }
            // Only acceptable before anything was ever shipped.
            CHECK(r.error().kind == ErrorKind::NotFound);
            CHECK(restored_max == 0);
            continue;
        }
        long long m = check_prefix(out);
        ++restores;
        CAPTURE(i, logged, m);
        if (mode == "sync") CHECK(m >= logged);      // every COMMIT that returned OK
        CHECK(m <= logged + 1);                      // nothing that never committed
        restored_max = std::max(restored_max, m);
        std::remove(out.c_str());
    }
    CHECK(restores >= n / 2);
    CHECK(restored_max > 0);

    // The next open ships what the last writer committed locally.
    long long local;
    {
        Db db = open_db(uri);
        local = query_int(db.get(), "SELECT count(*) FROM sqlite_schema WHERE name = 'txns'")
                    ? query_int(db.get(), "SELECT coalesce(max(k), 0) FROM txns")
                    : 0;
        query_text(db.get(), "SELECT bottomless_flush(30000)");
    }
    std::string out = dir.file("final.db");
    auto r = replicator::restore_database(*client, bucket.name(), "crash.db", out, {});
    REQUIRE(r.ok());
    CHECK(check_prefix(out) == local);
    CHECK(local >= last_logged(log));
    // How many kills started a new generation, i.e. a full upload. A crash
    // must not cost one (issue goal: at most 5 per 100 kills): the WAL keeps
    // what the bucket lacks, an ended epoch's unshipped frames are kept
    // aside before the next epoch overwrites them, a bucket ahead of the
    // state file is caught up with. The first start's snapshot is in the
    // bucket before the first kill; the bound leaves room for a kill during
    // a new generation's snapshot, should one be needed legitimately (before
    // these fixes: 11 generations per 30 kills).
    auto g = replicator::list_generations(*client, bucket.name(), "crash.db");
    REQUIRE(g.ok());
    WARN(mode << ": " << g->size() << " generations after " << n << " kills");
    CHECK(g->size() <= static_cast<size_t>(1 + std::max(2, n / 10)));
}
