// Many databases in one process (issue 10): they share the uploader pool
// (a few threads, not one per database), every one of them still ships and
// restores to what was written, and one whose bucket is deleted mid-run
// shows its error in bottomless_status('*') while the others go on.
#include <catch2/catch.hpp>

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "replicator/leader_lock.h"
#include "replicator/pool.h"
#include "replicator/restore.h"
#include "s3/request_budget.h"
#include "support/fault_proxy.h"
#include "support/poll.h"
#include "support/s3_env.h"
#include "support/skip.h"
#include "support/sqlite_util.h"

using namespace bottomless;
using namespace bottomless::testing;

namespace {

int thread_count() {
    int n = 0;
    if (DIR* d = ::opendir("/proc/self/task")) {
        while (dirent* e = ::readdir(d))
            if (e->d_name[0] != '.') ++n;
        ::closedir(d);
    }
    return n;
}

int fd_count() {
    int n = 0;
    if (DIR* d = ::opendir("/proc/self/fd")) {
        while (dirent* e = ::readdir(d))
            if (e->d_name[0] != '.') ++n;
        ::closedir(d);
    }
    return n - 1;  // less the directory stream itself
}

// Descriptors open on files under `dir` (not the S3 pool's sockets).
int fds_under(const std::string& dir) {
    int n = 0;
    if (DIR* d = ::opendir("/proc/self/fd")) {
        while (dirent* e = ::readdir(d)) {
            if (e->d_name[0] == '.') continue;
            char target[4096];
            const std::string link = std::string("/proc/self/fd/") + e->d_name;
            const ssize_t len = ::readlink(link.c_str(), target, sizeof target - 1);
            if (len > 0 && std::string(target, static_cast<size_t>(len)).rfind(dir + "/", 0) == 0) ++n;
        }
        ::closedir(d);
    }
    return n;
}

ino_t inode_of(const std::string& path) {
    struct stat st{};
    return ::stat(path.c_str(), &st) == 0 ? st.st_ino : 0;
}

// Raises the soft RLIMIT_NOFILE to at least `want` (within the hard limit).
bool raise_fd_limit(rlim_t want) {
    rlimit lim{};
    if (::getrlimit(RLIMIT_NOFILE, &lim) != 0) return false;
    if (lim.rlim_cur >= want) return true;
    if (lim.rlim_max != RLIM_INFINITY && lim.rlim_max < want) return false;
    lim.rlim_cur = want;
    return ::setrlimit(RLIMIT_NOFILE, &lim) == 0;
}

nlohmann::json process_status(sqlite3* db) {
    return nlohmann::json::parse(query_text(db, "SELECT bottomless_status('*')"));
}

}  // namespace

TEST_CASE("1000 databases written by 8 threads share a few uploader threads and all restore", "[vfs][integration][many]") {
    // The figure; ThreadSanitizer's run takes a fifth of it (its
    // shadow memory and slowdown would make 1000 databases take minutes).
#if defined(__SANITIZE_THREAD__)
    constexpr int kDbs = 200;
#else
    constexpr int kDbs = 1000;
#endif
    constexpr int kWriters = 8, kRounds = 6;
    // SQLite holds 3 descriptors per WAL database (file, -wal, -shm); a
    // default soft limit of 1024 cannot hold 1000 of them.
    if (!raise_fd_limit(3 * kDbs + 256)) BOTTOMLESS_SKIP("the hard RLIMIT_NOFILE cannot hold 3 descriptors per database");
    register_bottomless();
    auto client = server_client();
    TestBucket bucket(*client, "many");
    // Database 0 replicates to a bucket of its own, deleted mid-run.
    const std::string doomed = unique_name("doomed");
    REQUIRE(client->create_bucket(doomed).ok());
    struct Cleanup {
        s3::Client& c;
        const std::string& b;
        ~Cleanup() { (void)c.delete_bucket_and_objects(b); }
    } cleanup{*client, doomed};
    TempDir dir;
    const unsigned cores = std::max(1u, std::thread::hardware_concurrency());
    // The writers, and the uploader pool within the 2 x cores + 4.
    const int thread_limit = static_cast<int>(1 + kWriters + 2 * cores + 4);
    const int threads_before = thread_count();

    auto uri = [&](int i) {
        return "file:" + dir.file("db" + std::to_string(i)) + "?vfs=bottomless&batch_interval_ms=200&bucket=" +
               (i == 0 ? doomed + "&shutdown_timeout_ms=500" : bucket.name());
    };
    std::vector<Db> dbs(kDbs);
    for (int i = 0; i < kDbs; ++i) {
        dbs[i] = open_db(uri(i));
        exec(dbs[i].get(), "PRAGMA journal_mode=wal; CREATE TABLE t(id INTEGER PRIMARY KEY, w INT, v BLOB);");
    }
    Db plain = open_db(":memory:");  // status('*') answers on any connection

    // 8 threads, each writing its eighth of the databases round by round;
    // the main thread watches the process's thread count meanwhile.
    std::atomic<int> running{kWriters};
    std::mutex err_mu;
    std::vector<std::string> errors;  // guarded by err_mu (no Catch assertions off the main thread)
    auto write_rounds = [&](int w, int from_round, int to_round) {
        for (int r = from_round; r < to_round; ++r)
            for (int i = w; i < kDbs; i += kWriters) {
                std::string e;
                if (try_exec(dbs[i].get(),
                             "INSERT INTO t(w, v) VALUES(" + std::to_string(r) + ", randomblob(" +
                                 std::to_string(100 + (i * 37 + r * 11) % 3000) + "))",
                             e) != 0) {
                    std::lock_guard lock(err_mu);
                    errors.push_back("db" + std::to_string(i) + ": " + e);
                }
            }
    };
    auto run_writers = [&](int from_round, int to_round) {
        running = kWriters;
        std::vector<std::thread> writers;
        for (int w = 0; w < kWriters; ++w)
            writers.emplace_back([&, w] {
                write_rounds(w, from_round, to_round);
                --running;
            });
        int most = 0;
        while (running.load() > 0) {
            most = std::max(most, thread_count());
            std::this_thread::sleep_for(std::chrono::milliseconds(5));
        }
        for (auto& t : writers) t.join();
        return most;
    };

    int most = run_writers(0, kRounds / 2);
    for (int i = 0; i < kDbs; ++i) query_text(dbs[i].get(), "SELECT bottomless_flush(60000)");

    // The doomed database's bucket goes; everyone writes on.
    REQUIRE(client->delete_bucket_and_objects(doomed).ok());
    most = std::max(most, run_writers(kRounds / 2, kRounds));
    {
        std::lock_guard lock(err_mu);
        INFO((errors.empty() ? std::string() : errors.front()));
        CHECK(errors.empty());  // async: a write never waits for S3, also not the doomed one's
    }
    INFO("threads before " << threads_before << ", at most " << most << " while " << kDbs << " databases were written");
    CHECK(most <= thread_limit);
    CHECK(thread_count() <= thread_limit);

    for (int i = 1; i < kDbs; ++i) query_text(dbs[i].get(), "SELECT bottomless_flush(60000)");
    std::string e;
    CHECK(try_exec(dbs[0].get(), "SELECT bottomless_flush(3000)", e) != 0);  // its bucket is gone

    auto st = process_status(plain.get());
    INFO(st.dump());
    CHECK(st["databases_open"].get<int>() >= kDbs);
    CHECK(st["uploader_threads"].get<unsigned>() >= 1);
    CHECK(st["uploader_threads"].get<unsigned>() <= 2 * st["uploader"]["base_threads"].get<unsigned>());
    CHECK(st["pending_bytes"].get<uint64_t>() > 0);  // the doomed database's
    REQUIRE(st["failing"].size() == 1);
    CHECK(st["failing"][0]["database"].get<std::string>() == dir.file("db0"));
    CHECK(st["failing"][0]["last_error"].get<std::string>().find("NoSuchBucket") != std::string::npos);
    CHECK(st["databases_with_errors"].get<int>() == 1);

    // Every other database restores to exactly what it holds.
    std::vector<std::string> hashes(kDbs);
    for (int i = 1; i < kDbs; ++i) hashes[i] = content_hash(dbs[i].get());
    const auto t0 = std::chrono::steady_clock::now();
    dbs.clear();
    const double close_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    CHECK(close_s < 10);
    int mismatched = 0;
    for (int i = 1; i < kDbs; ++i) {
        const std::string out = dir.file("restored" + std::to_string(i));
        auto r = replicator::restore_database(*client, bucket.name(), "db" + std::to_string(i), out);
        if (!r) FAIL("restore of db" << i << " failed: " << r.error().describe());
        if (content_hash_of_file(out) != hashes[i]) ++mismatched;
    }
    CHECK(mismatched == 0);
    // Every database closed: the pool's workers go.
    auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
    while (replicator::UploaderPool::instance().stats().threads > 0 && std::chrono::steady_clock::now() < deadline)
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
    CHECK(replicator::UploaderPool::instance().stats().threads == 0);
}

// Issue 10: no descriptor per database beyond SQLite's own (the leader
// locks share one descriptor per directory; a snapshot opens the database
// file for its own duration only), and closing an idle database that changed
// nothing since its offline open rewrites no state file (before: +2
// descriptors per database, and a new state file at every close).
TEST_CASE("open databases hold no descriptor beyond SQLite's own and an idle close rewrites nothing", "[vfs][integration][many]") {
    register_bottomless();
    auto client = server_client();
    TestBucket bucket(*client, "manyfd");
    TempDir dir;
    constexpr int kDbs = 20;
    auto path = [&](int i) { return dir.file("db" + std::to_string(i)); };
    auto uri = [&](int i) { return "file:" + path(i) + "?vfs=bottomless&bucket=" + bucket.name(); };
    std::vector<Db> dbs(kDbs);
    for (int i = 0; i < kDbs; ++i) {
        dbs[i] = open_db(uri(i));
        exec(dbs[i].get(), "PRAGMA journal_mode=wal; CREATE TABLE t(x); INSERT INTO t VALUES (1);");
        query_text(dbs[i].get(), "SELECT bottomless_flush(60000)");
    }
    for (auto& db : dbs) db.reset();
    CHECK(replicator::LeaderLock::open_files() == 0);

    // The control: SQLite's own descriptors for kDbs open databases.
    const int base = fd_count();
    for (int i = 0; i < kDbs; ++i) {
        dbs[i] = open_db("file:" + path(i));
        CHECK(query_int(dbs[i].get(), "SELECT count(*) FROM t") == 1);
    }
    const int plain = fd_count() - base;
    for (auto& db : dbs) db.reset();

    std::vector<ino_t> state_inodes(kDbs);
    for (int i = 0; i < kDbs; ++i) state_inodes[i] = inode_of(path(i) + "-bottomless");
    const int base2 = fd_count();
    for (int i = 0; i < kDbs; ++i) {
        dbs[i] = open_db(uri(i));
        CHECK(query_int(dbs[i].get(), "SELECT count(*) FROM t") == 1);
    }
    const int ours = fd_count() - base2;
    INFO("descriptors for " << kDbs << " databases: plain SQLite " << plain << ", through bottomless " << ours);
    // A few more for the directory's lock files (at most 16, each shared by
    // the databases hashed to it; sockets of the shared connection pool may
    // only have closed meanwhile: an offline open makes no request).
    const auto lock_files = static_cast<int>(replicator::LeaderLock::open_files());
    CHECK(lock_files >= 1);
    CHECK(lock_files <= 16);
    CHECK(ours <= plain + lock_files);
    for (int i = 0; i < kDbs; ++i)
        CHECK(nlohmann::json::parse(query_text(dbs[i].get(), "SELECT bottomless_status()"))["requests"] == 0);

    // A snapshot reads the file through a connection's own handle: no
    // descriptor stays behind (before: the unix VFS kept the snapshot's
    // until the last connection closed, a 4th per database). With the
    // connection's memory map on, it opens one of its own instead (the map
    // may move under another thread's read).
    exec(dbs[0].get(), "INSERT INTO t VALUES (2)");
    const int before_snapshot = fds_under(dir.path());
    const std::string gen = query_text(dbs[0].get(), "SELECT bottomless_snapshot()");
    CHECK(!gen.empty());
    CHECK(fds_under(dir.path()) == before_snapshot);
    exec(dbs[1].get(), "PRAGMA mmap_size=1048576; INSERT INTO t VALUES (2)");
    CHECK(query_int(dbs[1].get(), "SELECT count(*) FROM t") == 2);  // pages come through the map now
    const int before_mapped = fds_under(dir.path());
    CHECK(!query_text(dbs[1].get(), "SELECT bottomless_snapshot()").empty());
    CHECK(fds_under(dir.path()) == before_mapped + 1);  // deferred by the unix VFS until the last connection closes
    const std::string local1 = content_hash(dbs[1].get());
    query_text(dbs[1].get(), "SELECT bottomless_flush(60000)");
    const std::string local = content_hash(dbs[0].get());
    query_text(dbs[0].get(), "SELECT bottomless_flush(60000)");
    for (auto& db : dbs) db.reset();
    CHECK(replicator::LeaderLock::open_files() == 0);
    {
        const std::string out = dir.file("restored0");
        auto r = replicator::restore_database(*client, bucket.name(), "db0", out);
        REQUIRE(r.ok());
        CHECK(r->generation == gen);
        CHECK(content_hash_of_file(out) == local);
    }
    {
        const std::string out = dir.file("restored1");
        auto r = replicator::restore_database(*client, bucket.name(), "db1", out);
        REQUIRE(r.ok());
        CHECK(content_hash_of_file(out) == local1);
    }
    // The idle ones kept their state file (a rewrite is a new file renamed
    // over it: a new inode); the ones written to have a new one.
    int kept = 0;
    for (int i = 2; i < kDbs; ++i) kept += inode_of(path(i) + "-bottomless") == state_inodes[i];
    CHECK(kept == kDbs - 2);
    CHECK(inode_of(path(0) + "-bottomless") != state_inodes[0]);
    CHECK(inode_of(path(1) + "-bottomless") != state_inodes[1]);
    // And the next open still proves continuity without asking S3.
    Db again = open_db(uri(2));
    CHECK(query_int(again.get(), "SELECT count(*) FROM t") == 1);
    CHECK(nlohmann::json::parse(query_text(again.get(), "SELECT bottomless_status()"))["requests"] == 0);
}

// Issue 10: max_requests_per_second from the environment caps the requests of
// every database of the process together (s3/request_budget.h), counted at
// the fault proxy all of them go through; databases that want far more than
// the cap share it, and one whose bucket is deleted mid-run shows the error
// in its status while the others go on replicating.
TEST_CASE("the process-wide request cap holds for many databases writing at once and a deleted bucket stops only its database", "[vfs][integration][many]") {
    using Clock = std::chrono::steady_clock;
    register_bottomless();
    auto client = server_client();
    TestBucket bucket(*client, "cap");
    const std::string doomed = unique_name("capdoomed");
    REQUIRE(client->create_bucket(doomed).ok());
    struct Cleanup {
        s3::Client& c;
        const std::string& b;
        ~Cleanup() {
            (void)c.delete_bucket_and_objects(b);
            ::unsetenv("LIBSQL_BOTTOMLESS_MAX_REQUESTS_PER_SECOND");
            replicator::process_request_budget()->set_rate(0);  // as the next open without the variable would
        }
    } cleanup{*client, doomed};
    FaultProxy proxy("127.0.0.1", server_port());  // counts every request of the process's databases
    TempDir dir;
    constexpr int kDbs = 24, kWriters = 4;
    constexpr double kCap = 20;
    auto uri = [&](int i) {
        return "file:" + dir.file("db" + std::to_string(i)) + "?vfs=bottomless&batch_interval_ms=100&endpoint=" +
               proxy.url() + "&bucket=" + (i == 0 ? doomed + "&shutdown_timeout_ms=500" : bucket.name());
    };
    std::vector<Db> dbs(kDbs);
    // Created without a cap (a fresh open asks the bucket) and closed; the
    // reopens under the cap prove continuity from their state files.
    for (int i = 0; i < kDbs; ++i) {
        dbs[i] = open_db(uri(i));
        exec(dbs[i].get(), "PRAGMA journal_mode=wal; CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB);");
        query_text(dbs[i].get(), "SELECT bottomless_flush(60000)");
    }
    for (auto& db : dbs) db.reset();
    ::setenv("LIBSQL_BOTTOMLESS_MAX_REQUESTS_PER_SECOND", "20", 1);  // no database open: no thread reads the environment
    for (int i = 0; i < kDbs; ++i) dbs[i] = open_db(uri(i));
    Db plain = open_db(":memory:");
    {
        auto st = process_status(plain.get());
        INFO(st.dump());
        CHECK(st["request_budget"]["max_requests_per_second"].get<double>() == kCap);
    }

    // Every database commits as fast as its writer goes (hundreds a second)
    // with a 100 ms batch: without the cap, about 10 segments a second each.
    std::atomic<bool> stop{false}, doomed_paused{false};
    std::atomic<long> commits{0};
    std::mutex err_mu;
    std::vector<std::string> errors;  // guarded by err_mu
    std::vector<std::thread> writers;
    for (int w = 0; w < kWriters; ++w)
        writers.emplace_back([&, w] {
            while (!stop.load()) {
                for (int i = w; i < kDbs; i += kWriters) {
                    if (i == 0 && doomed_paused.load()) continue;
                    std::string e;
                    if (try_exec(dbs[i].get(), "INSERT INTO t(v) VALUES(randomblob(300))", e) != 0) {
                        std::lock_guard lock(err_mu);
                        errors.push_back("db" + std::to_string(i) + ": " + e);
                    } else {
                        ++commits;
                    }
                }
                std::this_thread::sleep_for(std::chrono::milliseconds(2));
            }
        });
    // The proxy's count, sampled.
    std::vector<std::pair<Clock::time_point, int>> samples;
    auto run_for = [&](std::chrono::milliseconds d) {
        const auto until = Clock::now() + d;
        while (Clock::now() < until) {
            samples.emplace_back(Clock::now(), proxy.requests_seen());
            std::this_thread::sleep_for(std::chrono::milliseconds(100));
        }
    };
    run_for(std::chrono::seconds(3));

    // Mid-run, database 0's bucket goes (its writes paused while its
    // objects are deleted, so no PUT lands between the listing and the
    // bucket's deletion); the others write on throughout.
    doomed_paused = true;
    query_text(dbs[0].get(), "SELECT bottomless_flush(60000)");
    bool deleted = false;
    for (int attempt = 0; attempt < 5 && !deleted; ++attempt) deleted = client->delete_bucket_and_objects(doomed).ok();
    REQUIRE(deleted);
    doomed_paused = false;
    std::vector<uint64_t> segments_at_delete(kDbs);
    for (int i = 1; i < kDbs; ++i)
        segments_at_delete[i] = nlohmann::json::parse(query_text(dbs[i].get(), "SELECT bottomless_status()"))["segments_uploaded"];
    run_for(std::chrono::seconds(6));
    stop = true;
    for (auto& t : writers) t.join();
    samples.emplace_back(Clock::now(), proxy.requests_seen());
    {
        std::lock_guard lock(err_mu);
        INFO((errors.empty() ? std::string() : errors.front()));
        CHECK(errors.empty());  // async: writes never wait for S3 or for the budget
    }

    // The cap holds over every window of 2 s or more (pacing: at most
    // cap x W + 1, plus a little for requests in transit at the edges) and
    // over the whole run; and it was what bounded them (demand was far above).
    double worst_excess = -1e9;
    for (size_t a = 0; a < samples.size(); ++a)
        for (size_t b = a + 1; b < samples.size(); ++b) {
            const double w = std::chrono::duration<double>(samples[b].first - samples[a].first).count();
            if (w < 2) continue;
            worst_excess = std::max(worst_excess, (samples[b].second - samples[a].second) - kCap * w);
        }
    const double total_s = std::chrono::duration<double>(samples.back().first - samples.front().first).count();
    const int total = samples.back().second - samples.front().second;
    auto st = process_status(plain.get());
    INFO(st.dump());
    INFO(commits.load() << " commits; " << total << " requests in " << total_s << " s (cap " << kCap
                        << "/s); worst window exceeds cap x W by " << worst_excess);
    CHECK(worst_excess <= 4);
    CHECK(total <= kCap * total_s + 2);
    CHECK(total >= 0.5 * kCap * total_s);
    CHECK(st["request_budget"]["waited"].get<uint64_t>() > 0);
    CHECK(st["request_budget"]["wait_ms_total"].get<uint64_t>() > 0);
    CHECK(st["request_budget"]["requests_last_minute"].get<uint64_t>() >= static_cast<uint64_t>(total) * 9 / 10);

    // Database 0 shows its error; every other one kept replicating after the
    // deletion, and restores to what it holds. Each of them ships after the
    // deletion: most do within the 6 s above, all must within 30 s of the
    // writers' end (what they hold is owed). Under TSan on a loaded 2-core
    // machine the cap shared by 24 writing databases left some (database 0
    // among them) without a turn at the 6 s mark (max_lag_ms 6 400-8 200).
    int went_on = 0;
    uint64_t throttled = 0;
    const auto settle_by = Clock::now() + std::chrono::seconds(30);
    for (;;) {
        st = process_status(plain.get());
        went_on = 0;
        throttled = 0;
        for (int i = 1; i < kDbs; ++i) {
            auto s = nlohmann::json::parse(query_text(dbs[i].get(), "SELECT bottomless_status()"));
            went_on += s["segments_uploaded"].get<uint64_t>() > segments_at_delete[i];
            throttled += s["requests_throttled"].get<uint64_t>();
            CHECK(s["last_error"].is_null());
        }
        if ((went_on == kDbs - 1 && st["failing"].size() == 1) || Clock::now() > settle_by) break;
        std::this_thread::sleep_for(std::chrono::milliseconds(200));
    }
    INFO(st.dump());
    REQUIRE(st["failing"].size() == 1);
    CHECK(st["failing"][0]["database"].get<std::string>() == dir.file("db0"));
    CHECK(st["failing"][0]["last_error"].get<std::string>().find("NoSuchBucket") != std::string::npos);
    auto doomed_status = nlohmann::json::parse(query_text(dbs[0].get(), "SELECT bottomless_status()"));
    CHECK(doomed_status["last_error"].get<std::string>().find("NoSuchBucket") != std::string::npos);
    CHECK(went_on == kDbs - 1);
    CHECK(throttled > 0);
    for (int i = 1; i < kDbs; ++i) query_text(dbs[i].get(), "SELECT bottomless_flush(60000)");
    std::vector<std::string> hashes(kDbs);
    for (int i = 1; i < kDbs; ++i) hashes[i] = content_hash(dbs[i].get());
    dbs.clear();
    int mismatched = 0;
    for (int i = 1; i < kDbs; ++i) {
        const std::string out = dir.file("restored" + std::to_string(i));
        auto r = replicator::restore_database(*client, bucket.name(), "db" + std::to_string(i), out);
        if (!r) FAIL("restore of db" << i << " failed: " << r.error().describe());
        if (content_hash_of_file(out) != hashes[i]) ++mismatched;
    }
    CHECK(mismatched == 0);
}

TEST_CASE("a request budget paces its takers in turn and counts the last minute", "[many][pool]") {
    using Clock = std::chrono::steady_clock;
    s3::RequestBudget budget;
    // Unlimited: no wait, still counted.
    for (int i = 0; i < 5; ++i) CHECK(budget.take() == Clock::duration::zero());
    budget.set_rate(50);
    // 4 threads taking 10 each: 40 requests at 50/s take about 0.8 s in all,
    // whoever asks.
    const auto t0 = Clock::now();
    std::vector<std::thread> takers;
    std::atomic<int> taken{0};
    for (int t = 0; t < 4; ++t)
        takers.emplace_back([&] {
            for (int i = 0; i < 10; ++i) {
                budget.take();
                ++taken;
            }
        });
    for (auto& t : takers) t.join();
    const double s = std::chrono::duration<double>(Clock::now() - t0).count();
    CHECK(taken.load() == 40);
    CHECK(s >= 39 / 50.0 - 0.02);
    auto st = budget.stats();
    CHECK(st.rate == 50);
    CHECK(st.requests == 45);
    CHECK(st.requests_last_minute == 45);
    CHECK(st.waited >= 30);
    CHECK(st.wait_max > Clock::duration::zero());
    CHECK(st.wait_total >= st.wait_max);
    budget.set_rate(0);
    CHECK(budget.take() == Clock::duration::zero());
}

TEST_CASE("leader locks share at most 16 descriptors per directory and still exclude each other in one process", "[many][processes]") {
    using replicator::LeaderLock;
    TempDir dir;
    const auto wait = std::chrono::milliseconds(0);
    const int before = fd_count();
    auto a = LeaderLock::acquire(dir.file("a.db"), wait);
    auto b = LeaderLock::acquire(dir.file("b.db"), wait);
    REQUIRE(a.ok());
    REQUIRE(b.ok());
    CHECK(a->leader());
    CHECK(b->leader());
    CHECK(a->leader_pid() == ::getpid());
    CHECK((a->leader_byte() != b->leader_byte() || a->path() != b->path()));
    {
        // 200 databases of one directory: their lock files are shared, at
        // most 16 of them (one per hash shard), one descriptor each.
        std::vector<LeaderLock> many;
        for (int i = 0; i < 200; ++i) {
            auto l = LeaderLock::acquire(dir.file("m" + std::to_string(i) + ".db"), wait);
            REQUIRE(l.ok());
            CHECK(l->leader());
            l->startup_done();
            many.push_back(std::move(l).value());
        }
        CHECK(LeaderLock::open_files() == 16);
        CHECK(fd_count() - before == 16);
    }
    CHECK(fd_count() - before == static_cast<int>(LeaderLock::open_files()));
    CHECK(LeaderLock::open_files() <= 2);
    {
        // Still starting up: another open of the database waits for that.
        auto busy = LeaderLock::acquire(dir.file("a.db"), wait);
        REQUIRE(!busy.ok());
        CHECK(busy.error().code == "StartupBusy");
    }
    a->startup_done();
    {
        // The same database again (a read replica and a replicator of one
        // file, say): a follower, as another process would be.
        auto a2 = LeaderLock::acquire(dir.file("a.db"), wait);
        REQUIRE(a2.ok());
        CHECK(!a2->leader());
        CHECK(a2->leader_pid() == ::getpid());
    }
    a = LeaderLock::acquire(dir.file("c.db"), wait);  // the old one is released by the assignment
    a->startup_done();
    auto a3 = LeaderLock::acquire(dir.file("a.db"), wait);
    REQUIRE(a3.ok());
    CHECK(a3->leader());
    CHECK(b->leader());
}

TEST_CASE("a leader of the build before the sharded lock files is seen", "[many][processes]") {
    using replicator::LeaderLock;
    TempDir dir;
    // That build held the database's leader byte of the directory's single
    // ".bottomless-locks"; another process does here (a child holding it).
    auto probe = LeaderLock::acquire(dir.file("a.db"), std::chrono::milliseconds(0));
    REQUIRE(probe.ok());
    const int64_t byte = probe->leader_byte();
    probe = LeaderLock::acquire(dir.file("other.db"), std::chrono::milliseconds(0));  // releases a.db
    int ready[2];
    REQUIRE(::pipe(ready) == 0);
    const std::string legacy = dir.file(".bottomless-locks");
    pid_t child = ::fork();
    if (child == 0) {
        int fd = ::open(legacy.c_str(), O_RDWR | O_CREAT, 0644);
        struct flock fl{};
        fl.l_type = F_WRLCK;
        fl.l_whence = SEEK_SET;
        fl.l_start = static_cast<off_t>(byte);
        fl.l_len = 1;
        const char ok = fd >= 0 && ::fcntl(fd, F_OFD_SETLK, &fl) == 0 ? 'y' : 'n';
        (void)!::write(ready[1], &ok, 1);
        ::pause();
        _exit(0);
    }
    char ok = 0;
    REQUIRE(::read(ready[0], &ok, 1) == 1);
    REQUIRE(ok == 'y');
    auto a = LeaderLock::acquire(dir.file("a.db"), std::chrono::milliseconds(0));
    REQUIRE(a.ok());
    CHECK_FALSE(a->leader());  // the old build leads
    ::kill(child, SIGKILL);
    ::waitpid(child, nullptr, 0);
    ::close(ready[0]);
    ::close(ready[1]);
    a = LeaderLock::acquire(dir.file("other2.db"), std::chrono::milliseconds(0));  // releases a.db
    auto again = LeaderLock::acquire(dir.file("a.db"), std::chrono::milliseconds(0));
    REQUIRE(again.ok());
    CHECK(again->leader());  // its lock went with it
}

TEST_CASE("the uploader pool runs the earliest due first, reruns on a wake, and a stuck step blocks no one", "[pool]") {
    using Clock = std::chrono::steady_clock;
    auto& pool = replicator::UploaderPool::instance();
    std::mutex mu;
    std::vector<int> order;  // guarded by mu
    auto recorder = [&](int id) {
        return [&, id]() {
            std::lock_guard lock(mu);
            order.push_back(id);
            return Clock::time_point::max();
        };
    };
    auto ran = [&] {
        std::lock_guard lock(mu);
        return order;
    };
    auto wait_for = [&](size_t n) {
        const auto deadline = Clock::now() + std::chrono::seconds(5);
        while (ran().size() < n && Clock::now() < deadline) std::this_thread::sleep_for(std::chrono::milliseconds(2));
        return ran();
    };

    SECTION("earliest due first, whatever the order of scheduling") {
        auto a = pool.join(2, recorder(1));
        auto b = pool.join(2, recorder(2));
        auto c = pool.join(2, recorder(3));
        const auto t = Clock::now() + std::chrono::milliseconds(100);
        c->schedule(t + std::chrono::milliseconds(60));
        a->schedule(t + std::chrono::milliseconds(120));
        b->schedule(t);
        a->schedule(t + std::chrono::milliseconds(30));  // an earlier due replaces the later one
        a->schedule(t + std::chrono::seconds(10));       // a later one does not
        CHECK(wait_for(3) == std::vector<int>{2, 1, 3});
    }

    SECTION("a schedule during a step runs it again, stuck steps block no one, leave() waits for the step") {
        std::atomic<int> steps{0}, in_step{0};
        std::atomic<bool> release{false};
        auto stuck_step = [&] {
            ++in_step;
            while (!release.load()) std::this_thread::sleep_for(std::chrono::milliseconds(1));
            --in_step;
            ++steps;
            return Clock::time_point::max();
        };
        // As many stuck databases as the pool has base workers.
        auto m = pool.join(2, stuck_step);
        const int base = static_cast<int>(pool.stats().base_threads);
        std::vector<std::unique_ptr<replicator::PoolMember>> stuck;
        for (int i = 1; i < base; ++i) stuck.push_back(pool.join(2, stuck_step));
        m->wake();
        for (auto& s : stuck) s->wake();
        auto deadline = Clock::now() + std::chrono::seconds(5);
        while (in_step.load() < base && Clock::now() < deadline) std::this_thread::sleep_for(std::chrono::milliseconds(1));
        REQUIRE(in_step.load() == base);
        m->wake();  // while it runs: once more afterwards
        // Other databases still run: a spare worker takes them.
        auto other = pool.join(2, recorder(7));
        auto third = pool.join(2, recorder(8));
        other->wake();
        third->wake();
        auto others = wait_for(2);
        std::sort(others.begin(), others.end());  // on two workers: either may record first
        CHECK(others == std::vector<int>{7, 8});
        CHECK(pool.stats().threads <= static_cast<unsigned>(2 * base));
        release = true;
        deadline = Clock::now() + std::chrono::seconds(5);
        while (steps.load() < base + 1 && Clock::now() < deadline) std::this_thread::sleep_for(std::chrono::milliseconds(1));
        std::this_thread::sleep_for(std::chrono::milliseconds(50));
        CHECK(steps.load() == base + 1);  // m ran twice
        // leave() while a step runs returns only once it ended.
        release = false;
        m->wake();
        deadline = Clock::now() + std::chrono::seconds(5);
        while (in_step.load() < 1 && Clock::now() < deadline) std::this_thread::sleep_for(std::chrono::milliseconds(1));
        REQUIRE(in_step.load() == 1);
        std::thread releaser([&] {
            std::this_thread::sleep_for(std::chrono::milliseconds(100));
            release = true;
        });
        m->leave();
        CHECK(in_step.load() == 0);
        CHECK(steps.load() == base + 2);
        m->wake();  // a no-op after leave()
        releaser.join();
        std::this_thread::sleep_for(std::chrono::milliseconds(50));
        CHECK(steps.load() == base + 2);
    }
}

TEST_CASE("the uploader pool wakes a worker sleeping until a later due time for an earlier one", "[pool]") {
    using Clock = std::chrono::steady_clock;
    using namespace std::chrono_literals;
    auto& pool = replicator::UploaderPool::instance();
    std::atomic<int> late{0}, early{0};
    auto a = pool.join(2, [&] {
        ++late;
        return Clock::time_point::max();
    });
    auto b = pool.join(2, [&] {
        ++early;
        return Clock::time_point::max();
    });
    // Idle workers sleep until the first due time: a's, 10 s away (replicator/pool.cpp).
    a->schedule(Clock::now() + 10s);
    std::this_thread::sleep_for(50ms);
    // b's earlier time must wake one of them (not wait 10 s).
    const auto asked = Clock::now();
    b->wake();
    REQUIRE(eventually([&] { return early.load() == 1; }, std::chrono::milliseconds(2000)));
    CHECK(Clock::now() - asked < 1s);
    CHECK(late.load() == 0);
    a->leave();
    b->leave();
}

TEST_CASE("the uploader pool serves 200 members rescheduling themselves while one never rests", "[pool]") {
    using Clock = std::chrono::steady_clock;
    using namespace std::chrono_literals;
    auto& pool = replicator::UploaderPool::instance();
    const size_t members_before = pool.stats().members;
    constexpr int kMembers = 200;
    std::vector<std::atomic<int>> counters(kMembers);
    std::atomic<int> busy_runs{0};
    std::vector<std::unique_ptr<replicator::PoolMember>> members;
    // One member that always wants to run again at once.
    auto busy = pool.join(2, [&] {
        ++busy_runs;
        std::this_thread::sleep_for(200us);
        return Clock::now();
    });
    for (int i = 0; i < kMembers; ++i)
        members.push_back(pool.join(2, [&, i] {
            ++counters[static_cast<size_t>(i)];
            return Clock::now() + 20ms;  // every 20 ms
        }));
    busy->wake();
    for (auto& m : members) m->wake();
    std::this_thread::sleep_for(1000ms);
    // Each ran many times (ideally ~50) though the busy one never rested.
    int least = INT32_MAX;
    for (auto& c : counters) least = std::min(least, c.load());
    INFO("least runs of a member: " << least << ", busy member's runs: " << busy_runs.load());
    CHECK(least >= 5);
    CHECK(busy_runs.load() >= 50);
    busy->leave();
    for (auto& m : members) m->leave();
    CHECK(pool.stats().members == members_before);
}

TEST_CASE("the uploader pool runs a step due while a worker is busy on an idle worker, not after the busy step", "[pool]") {
    using Clock = std::chrono::steady_clock;
    using namespace std::chrono_literals;
    auto& pool = replicator::UploaderPool::instance();
    // A far due time: the idle workers sleep until it.
    auto far = pool.join(2, [] { return Clock::time_point::max(); });
    far->schedule(Clock::now() + 60s);
    // A database whose steps are long (a slow PUT) and come back 100 ms apart.
    std::atomic<int> long_steps{0};
    auto slow = pool.join(2, [&] {
        std::this_thread::sleep_for(600ms);
        ++long_steps;
        return Clock::now() + 100ms;
    });
    std::atomic<int64_t> ran_at{0};
    auto quick = pool.join(2, [&] {
        ran_at = Clock::now().time_since_epoch().count();
        return Clock::time_point::max();
    });
    std::this_thread::sleep_for(50ms);
    slow->wake();
    REQUIRE(eventually([&] { return long_steps.load() >= 1; }, std::chrono::milliseconds(5000)));
    // The slow database is queued again (its worker requeued it, 100 ms
    // out, without waking anyone); another one is due just after it, while
    // the other worker sleeps until the far time. It must run when due, on
    // that worker, not once the slow step it queued behind ends (~450 ms late).
    const auto due = Clock::now() + 150ms;
    quick->schedule(due);
    REQUIRE(eventually([&] { return ran_at.load() != 0; }, std::chrono::milliseconds(5000)));
    const auto late = Clock::time_point(Clock::duration(ran_at.load())) - due;
    INFO("ran " << std::chrono::duration_cast<std::chrono::milliseconds>(late).count() << " ms after its due time");
    CHECK(late < 250ms);
    slow->leave();
    quick->leave();
    far->leave();
}

TEST_CASE("the uploader pool runs a step due after an idle spare worker exits", "[pool]") {
    using Clock = std::chrono::steady_clock;
    using namespace std::chrono_literals;
    auto& pool = replicator::UploaderPool::instance();
    // Two steps at once on the two base workers: the second one taken with
    // no worker idle starts a spare, which exits after 10 s idle.
    std::atomic<int> in_step{0};
    std::atomic<bool> release{false};
    auto busy = [&] {
        ++in_step;
        while (!release) std::this_thread::sleep_for(1ms);
        return Clock::time_point::max();
    };
    auto a = pool.join(2, busy);
    auto b = pool.join(2, busy);
    a->wake();
    b->wake();
    REQUIRE(eventually([&] { return in_step.load() == 2; }, 5000ms));
    const auto spare_idle_from = Clock::now();
    REQUIRE(eventually([&] { return pool.stats().threads == 3; }, 5000ms));
    release = true;
    REQUIRE(eventually([&] { return pool.stats().busy == 0; }, 5000ms));
    // The base workers sleep for good (nothing queued); the spare until it
    // exits. A step due after that time: the spare's exit must hand it on.
    std::atomic<int64_t> ran_at{0};
    auto later = pool.join(2, [&] {
        ran_at = Clock::now().time_since_epoch().count();
        return Clock::time_point::max();
    });
    const auto due = spare_idle_from + 11s;
    later->schedule(due);
    REQUIRE(eventually([&] { return ran_at.load() != 0; }, 20000ms));
    const auto late = Clock::time_point(Clock::duration(ran_at.load())) - due;
    INFO("ran " << std::chrono::duration_cast<std::chrono::milliseconds>(late).count() << " ms after its due time");
    CHECK(late < 1s);
    CHECK(pool.stats().threads == 2);  // the spare is gone
    later->leave();
    a->leave();
    b->leave();
}
