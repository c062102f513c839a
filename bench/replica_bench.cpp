// Read replicas (issue 11): how far behind a replica is, what it costs in
// requests, and how fast it hydrates.
//
//   1. Lag: a writer (async, default batch interval 1 s) commits one row at
//      --rates txn/s for --seconds; a replica of it in the same process
//      (replica=1, replica_poll_ms in --polls) is sampled every 2 ms; each
//      commit's lag is the time from its COMMIT returning to the first sample
//      that sees it. p50/p99/max per cell, and the requests the replica made
//      (GET/HEAD/LIST per minute) while following.
//   2. Idle: a replica of a database nobody writes, --idle-seconds, at each
//      of --polls: its requests per minute.
//   3. Hydration: a database of --mib MiB (one snapshot), opened as a fresh
//      replica (the open hydrates) against restore_database() of the same
//      state, alternated --rounds times; medians and MiB/s.
//
// Usage (server from scripts/s3-server.sh, env from its `env` command):
//   build/bench/replica_bench [--rates 100,1000] [--polls 1000,100] [--seconds 10]
//                             [--idle-seconds 60] [--mib 64] [--rounds 3]
#include <sqlite3.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <thread>
#include <vector>

#include "bench_support.h"
#include "bottomless.h"
#include "replicator/restore.h"
#include "s3/client.h"

using namespace bottomless;
using bench::die;
using bench::exec;
using bench::query;

namespace {

struct Requests {
    uint64_t get = 0, head = 0, list = 0, total = 0;
};

Requests requests_of(sqlite3* db) {
    auto st = bench::status(db)["requests"];
    return {st["get"].get<uint64_t>(), st["head"].get<uint64_t>(), st["list"].get<uint64_t>(), st["total"].get<uint64_t>()};
}

double per_min(uint64_t n, double seconds) { return seconds > 0 ? static_cast<double>(n) * 60.0 / seconds : 0; }

void settle() {
    ::sync();
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
}

}  // namespace

int main(int argc, char** argv) {
    bench::program_name() = "replica_bench";
    std::vector<std::string> rates = {"100", "1000"}, polls = {"1000", "100"};
    int seconds = 10, idle_seconds = 60, mib = 64, rounds = 3;
    for (int i = 1; i < argc; ++i) {
        std::string a = argv[i];
        if (i + 1 >= argc)
            die("usage: replica_bench [--rates 100,1000] [--polls 1000,100] [--seconds S] [--idle-seconds S] [--mib N] "
                "[--rounds R]");
        if (a == "--rates") rates = bench::split_list(argv[++i]);
        else if (a == "--polls") polls = bench::split_list(argv[++i]);
        else if (a == "--seconds") seconds = std::atoi(argv[++i]);
        else if (a == "--idle-seconds") idle_seconds = std::atoi(argv[++i]);
        else if (a == "--mib") mib = std::atoi(argv[++i]);
        else if (a == "--rounds") rounds = std::atoi(argv[++i]);
        else die("unknown option " + a);
    }
    if (!std::getenv("LIBSQL_BOTTOMLESS_ENDPOINT")) die("LIBSQL_BOTTOMLESS_ENDPOINT is not set (eval \"$(scripts/s3-server.sh env)\")");
    if (bottomless_register(0) != SQLITE_OK) die("cannot register the VFS");
    char tmpl[] = "/tmp/bottomless-replbench-XXXXXX";
    if (!mkdtemp(tmpl)) die("mkdtemp");
    const std::string dir = tmpl;
    const std::string bucket = "replbench-" + std::to_string(::getpid());
    auto writer_uri = [&](const std::string& id) {
        return "file:" + dir + "/w-" + id + "?vfs=bottomless&bucket=" + bucket + "&database_id=" + id;
    };
    auto replica_uri = [&](const std::string& id, const std::string& poll) {
        return "file:" + dir + "/r-" + id + "?vfs=bottomless&bucket=" + bucket + "&database_id=" + id +
               "&replica=1&replica_poll_ms=" + poll;
    };

    // ---- 1. lag and requests while following ----
    std::printf("lag: writer async (batch interval 1 s), one row per transaction, %d s per cell\n", seconds);
    std::printf("%8s %8s %9s %9s %9s %9s %8s %8s %8s\n", "txn/s", "poll_ms", "p50_ms", "p99_ms", "max_ms", "achieved",
                "GET/min", "HEAD/min", "LIST/min");
    int cell = 0;
    for (const auto& rate_s : rates) {
        for (const auto& poll : polls) {
            const int rate = std::atoi(rate_s.c_str());
            const std::string id = "lag" + std::to_string(cell++) + ".db";
            bench::Db w = bench::open_db(writer_uri(id));
            exec(w.get(), "PRAGMA journal_mode=wal; PRAGMA synchronous=NORMAL; CREATE TABLE log(i INTEGER PRIMARY KEY)");
            query(w.get(), "SELECT bottomless_flush(30000)");
            bench::Db r = bench::open_db(replica_uri(id, poll), SQLITE_OPEN_READONLY);
            const int n = rate * seconds;
            std::vector<std::atomic<int64_t>> committed(static_cast<size_t>(n) + 1);
            std::atomic<int> last{0};
            std::atomic<bool> done{false};
            std::vector<double> lags;
            lags.reserve(static_cast<size_t>(n));
            const Requests r0 = requests_of(r.get());
            const auto t0 = std::chrono::steady_clock::now();
            std::thread sampler([&] {
                bench::Stmt st = bench::prepare(r.get(), "SELECT coalesce(max(i), 0) FROM log");
                int seen = 0;
                while (seen < n) {
                    sqlite3_reset(st.get());
                    if (sqlite3_step(st.get()) == SQLITE_ROW) {
                        const int m = sqlite3_column_int(st.get(), 0);
                        const int64_t now = bench::mono_ns();
                        for (int i = seen + 1; i <= m && i <= last.load(); ++i)
                            lags.push_back(static_cast<double>(now - committed[static_cast<size_t>(i)].load()) / 1e6);
                        seen = std::max(seen, std::min(m, last.load()));
                    }
                    if (done && std::chrono::steady_clock::now() - t0 > std::chrono::seconds(seconds + 30)) break;
                    std::this_thread::sleep_for(std::chrono::milliseconds(2));
                }
            });
            bench::Stmt ins = bench::prepare(w.get(), "INSERT INTO log VALUES(?)");
            for (int i = 1; i <= n; ++i) {
                std::this_thread::sleep_until(t0 + std::chrono::microseconds(static_cast<int64_t>(i) * 1'000'000 / rate));
                sqlite3_bind_int(ins.get(), 1, i);
                if (sqlite3_step(ins.get()) != SQLITE_DONE) die(std::string("insert: ") + sqlite3_errmsg(w.get()));
                sqlite3_reset(ins.get());
                committed[static_cast<size_t>(i)] = bench::mono_ns();
                last = i;
            }
            const double took = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
            done = true;
            sampler.join();
            const double following_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
            const Requests r1 = requests_of(r.get());
            std::printf("%8d %8s %9.0f %9.0f %9.0f %9.0f %8.0f %8.0f %8.0f%s\n", rate, poll.c_str(),
                        bench::percentile(lags, 0.5), bench::percentile(lags, 0.99), bench::percentile(lags, 1.0), n / took,
                        per_min(r1.get - r0.get, following_s), per_min(r1.head - r0.head, following_s),
                        per_min(r1.list - r0.list, following_s),
                        static_cast<int>(lags.size()) < n ? "  (not every commit was seen)" : "");
            std::fflush(stdout);
        }
    }

    // ---- 2. an idle replica, at each poll interval ----
    for (size_t k = 0; idle_seconds > 0 && k < polls.size(); ++k) {
        const std::string id = "idle" + std::to_string(k) + ".db";
        bench::Db w = bench::open_db(writer_uri(id));
        exec(w.get(), "PRAGMA journal_mode=wal; CREATE TABLE t(x); INSERT INTO t VALUES(1)");
        query(w.get(), "SELECT bottomless_flush(30000)");
        bench::Db r = bench::open_db(replica_uri(id, polls[k]), SQLITE_OPEN_READONLY);
        const Requests r0 = requests_of(r.get());
        std::this_thread::sleep_for(std::chrono::seconds(idle_seconds));
        const Requests r1 = requests_of(r.get());
        const auto listings = bench::status(r.get())["listings"].get<uint64_t>();
        std::printf("idle replica (poll %s ms, %d s): GET %.0f/min, HEAD %.0f/min, LIST %.0f/min, all %.0f/min "
                    "(%llu generation listings)\n",
                    polls[k].c_str(), idle_seconds, per_min(r1.get - r0.get, idle_seconds),
                    per_min(r1.head - r0.head, idle_seconds), per_min(r1.list - r0.list, idle_seconds),
                    per_min(r1.total - r0.total, idle_seconds), static_cast<unsigned long long>(listings));
        std::fflush(stdout);
    }

    // ---- 3. hydration against restore_database() ----
    if (mib > 0) {
        const std::string id = "hyd.db";
        {
            bench::Db w = bench::open_db(writer_uri(id));
            exec(w.get(), "PRAGMA journal_mode=wal; CREATE TABLE t(id INTEGER PRIMARY KEY, b BLOB)");
            for (int done = 0; done < mib * 256; done += 2000)
                exec(w.get(), "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM n WHERE i<2000) "
                              "INSERT INTO t(b) SELECT randomblob(4000) FROM n");
            query(w.get(), "SELECT bottomless_snapshot()");  // one snapshot holds it all
            query(w.get(), "SELECT bottomless_flush(60000)");
        }
        auto client_r = s3::Client::from_env();
        if (!client_r) die("client: " + client_r.error().describe());
        s3::Client& client = **client_r;
        std::vector<double> t_restore, t_hydrate;
        double bytes = 0;
        for (int round = 0; round < rounds; ++round) {
            const std::string out = dir + "/restored.db", rp = dir + "/r-" + id;
            std::filesystem::remove(out);
            settle();
            auto a = std::chrono::steady_clock::now();
            auto res = replicator::restore_database(client, bucket, id, out);
            if (!res) die("restore: " + res.error().describe());
            t_restore.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - a).count());
            bytes = static_cast<double>(std::filesystem::file_size(out));
            std::filesystem::remove(out);
            std::filesystem::remove(out + "-bottomless");
            for (const char* s : {"", "-bottomless-replica", "-journal"}) std::filesystem::remove(rp + s);
            settle();
            a = std::chrono::steady_clock::now();
            {
                bench::Db r = bench::open_db(replica_uri(id, "1000"), SQLITE_OPEN_READONLY);  // hydrates
                t_hydrate.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - a).count());
                if (query(r.get(), "SELECT count(*) FROM t") != std::to_string(mib * 256 + (2000 - mib * 256 % 2000) % 2000))
                    die("the replica does not hold every row");
            }
        }
        const double mb = bytes / (1 << 20), tr = bench::median(t_restore), th = bench::median(t_hydrate);
        std::printf("hydration of %.0f MiB (median of %d): replica open %.2f s (%.0f MiB/s), restore_database() %.2f s "
                    "(%.0f MiB/s): %.2fx\n",
                    mb, rounds, th, mb / th, tr, mb / tr, tr / th);
    }
    auto client_r = s3::Client::from_env();
    if (client_r) (void)(*client_r)->delete_bucket_and_objects(bucket);
    std::filesystem::remove_all(dir);
    return 0;
}
