// Many databases in one process (issue 10): they share the uploader pool
// (a few threads, not one per database), every one of them still ships and
// restores to what was written, and one whose bucket is deleted mid-run
// shows its error in bottomless_status('*') while the others go on.
#include <catch2/catch.hpp>

#include <dirent.h>
#include <sys/stat.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "replicator/leader_lock.h"
#include "replicator/pool.h"
#include "replicator/restore.h"
#include "support/s3_env.h"
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

ino_t inode_of(const std::string& path) {
    struct stat st{};
    return ::stat(path.c_str(), &st) == 0 ? st.st_ino : 0;
}

nlohmann::json process_status(sqlite3* db) {
    return nlohmann::json::parse(query_text(db, "SELECT bottomless_status('*')"));
}

}  // namespace

TEST_CASE("200 databases written by 4 threads share a few uploader threads and all restore", "[vfs][integration][many]") {
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
    constexpr int kDbs = 200, kWriters = 4, kRounds = 6;
    const unsigned cores = std::max(1u, std::thread::hardware_concurrency());
    const int thread_limit = static_cast<int>(2 * cores + 8);
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

    // 4 threads, each writing its quarter of the databases round by round;
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
    INFO("threads before " << threads_before << ", at most " << most << " while 200 databases were written");
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
    // One more for the directory's lock file, shared by all (sockets of the
    // shared connection pool may only have closed meanwhile: an offline
    // open makes no request).
    CHECK(ours <= plain + 1);
    CHECK(replicator::LeaderLock::open_files() == 1);
    for (int i = 0; i < kDbs; ++i)
        CHECK(nlohmann::json::parse(query_text(dbs[i].get(), "SELECT bottomless_status()"))["requests"] == 0);

    // A snapshot reads the file through a handle of its own, closed after it.
    exec(dbs[0].get(), "INSERT INTO t VALUES (2)");
    const std::string gen = query_text(dbs[0].get(), "SELECT bottomless_snapshot()");
    CHECK(!gen.empty());
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
    // The idle ones kept their state file (a rewrite is a new file renamed
    // over it: a new inode); the one written to has a new one.
    int kept = 0;
    for (int i = 1; i < kDbs; ++i) kept += inode_of(path(i) + "-bottomless") == state_inodes[i];
    CHECK(kept == kDbs - 1);
    CHECK(inode_of(path(0) + "-bottomless") != state_inodes[0]);
    // And the next open still proves continuity without asking S3.
    Db again = open_db(uri(1));
    CHECK(query_int(again.get(), "SELECT count(*) FROM t") == 1);
    CHECK(nlohmann::json::parse(query_text(again.get(), "SELECT bottomless_status()"))["requests"] == 0);
}

TEST_CASE("leader locks share one descriptor per directory and still exclude each other in one process", "[many][processes]") {
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
    CHECK(a->leader_byte() != b->leader_byte());
    CHECK(fd_count() - before == 1);  // the directory's lock file, shared
    CHECK(LeaderLock::open_files() == 1);
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
