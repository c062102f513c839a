// Several processes writing one database (issue 14): N writer processes vs N
// writer threads in one process, plain WAL vs bottomless async, side by side
// in one run against the test S3 server.
//
// Every run uses a fresh database in WAL mode (created first with plain
// SQLite, so that the leader is one of the writers). Each writer commits
// 1-row transactions (BEGIN IMMEDIATE, busy_timeout 10 s) for the same
// duration, then flushes (bottomless) and closes. Rounds alternate the order
// of the modes; per mode it reports the median txn/s and the median of the
// per-round ratios to plain WAL with the same number of processes, plus PUT
// requests per minute (summed over the processes that led), the largest the
// WAL file grew (median over rounds) and generations.
//
// Usage (server from scripts/s3-server.sh, env from its `env` command):
//   build/bench/process_bench [--seconds S] [--rounds R] [--writers N] [--sync NORMAL|FULL]
#include <sqlite3.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <vector>

#include "bench_support.h"
#include "bottomless.h"
#include "replicator/bucket.h"
#include "s3/client.h"

using Clock = std::chrono::steady_clock;
namespace fs = std::filesystem;
using namespace bench;

namespace {

struct Options {
    double seconds = 3;
    int rounds = 5;
    int writers = 4;
    std::string sync = "NORMAL";
    std::string dir, bucket;
};

struct Outcome {
    uint64_t txns = 0;
    double puts = 0;  // PUT requests of the processes that led, while they led
};

// One writer: commits until `until`, then flushes; returns its commits. A
// connection that led reports its PUTs (status role "leader").
Outcome write_loop(const std::string& uri, const Options& o, Clock::time_point until, bool bottomless) {
    Db db = open_db(uri);
    exec(db.get(), "PRAGMA busy_timeout=10000; PRAGMA synchronous=" + o.sync + ";");
    Stmt ins = prepare(db.get(), "INSERT INTO t(a, b) VALUES (?1, 'payload-payload-payload-payload-payload-payload')");
    Outcome out;
    while (Clock::now() < until) {
        exec(db.get(), "BEGIN IMMEDIATE");
        sqlite3_bind_int64(ins.get(), 1, static_cast<sqlite3_int64>(out.txns));
        if (sqlite3_step(ins.get()) != SQLITE_DONE) die(std::string("insert: ") + sqlite3_errmsg(db.get()));
        sqlite3_reset(ins.get());
        exec(db.get(), "COMMIT");
        ++out.txns;
    }
    if (bottomless) {
        query(db.get(), "SELECT bottomless_flush(60000)");
        auto st = status(db.get());
        if (st.value("role", "") == "leader") out.puts = st.value("put_requests", 0.0);
    }
    return out;
}

struct RunResult {
    double tps = 0, puts_per_min = 0;
    double max_wal_mib = 0;  // the largest the WAL file grew, sampled every 10 ms
};

// Runs one mode.
RunResult run(const std::string& mode, const Options& o, int round) {
    const bool bottomless = mode.rfind("async", 0) == 0;
    const bool threads = mode.find("threads") != std::string::npos;
    const std::string name = mode + "-" + std::to_string(round) + ".db";
    const std::string sub = o.dir + "/" + name + ".d";
    fs::create_directories(sub);
    const std::string path = sub + "/" + name;
    {
        Db setup = open_db("file:" + path);
        exec(setup.get(), "PRAGMA journal_mode=wal; CREATE TABLE t(id INTEGER PRIMARY KEY, a INTEGER, b TEXT);");
    }
    const std::string uri = "file:" + path + (bottomless ? "?vfs=bottomless&bucket=" + o.bucket : "");
    const auto start = Clock::now() + std::chrono::milliseconds(300);
    const auto until = start + std::chrono::milliseconds(static_cast<int64_t>(o.seconds * 1000));

    int fds[2];
    if (::pipe(fds) != 0) die("pipe");
    std::vector<pid_t> pids;
    const int procs = threads ? 1 : o.writers;
    for (int p = 0; p < procs; ++p) {
        pid_t pid = ::fork();
        if (pid < 0) die("fork");
        if (pid == 0) {
            ::close(fds[0]);
            std::this_thread::sleep_until(start);
            Outcome total;
            if (threads) {
                std::vector<Outcome> each(static_cast<size_t>(o.writers));
                std::vector<std::thread> ts;
                for (int t = 0; t < o.writers; ++t)
                    ts.emplace_back([&, t] { each[static_cast<size_t>(t)] = write_loop(uri, o, until, bottomless); });
                for (auto& t : ts) t.join();
                for (auto& e : each) {
                    total.txns += e.txns;
                    total.puts = std::max(total.puts, e.puts);  // one replicator for the process
                }
            } else {
                total = write_loop(uri, o, until, bottomless);
            }
            if (::write(fds[1], &total, sizeof total) != static_cast<ssize_t>(sizeof total)) _exit(2);
            _exit(0);
        }
        pids.push_back(pid);
    }
    ::close(fds[1]);
    // The WAL's size while the writers run: a WAL that cannot restart grows.
    std::atomic<bool> done{false};
    std::atomic<uint64_t> max_wal{0};
    std::thread sampler([&] {
        const std::string wal = path + "-wal";
        while (!done.load()) {
            struct stat st{};
            if (::stat(wal.c_str(), &st) == 0 && static_cast<uint64_t>(st.st_size) > max_wal.load())
                max_wal.store(static_cast<uint64_t>(st.st_size));
            std::this_thread::sleep_for(std::chrono::milliseconds(10));
        }
    });
    Outcome sum;
    for (size_t i = 0; i < pids.size(); ++i) {
        Outcome one;
        if (::read(fds[0], &one, sizeof one) != static_cast<ssize_t>(sizeof one)) {
            done.store(true);
            sampler.join();
            die(mode + ": a writer failed");
        }
        sum.txns += one.txns;
        sum.puts += one.puts;
    }
    ::close(fds[0]);
    done.store(true);
    sampler.join();
    for (pid_t pid : pids) {
        int st = 0;
        ::waitpid(pid, &st, 0);
        if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) die(mode + ": a writer exited abnormally");
    }
    return {static_cast<double>(sum.txns) / o.seconds, sum.puts / (o.seconds / 60.0),
            static_cast<double>(max_wal.load()) / (1 << 20)};
}

}  // namespace

int main(int argc, char** argv) {
    program_name() = "process_bench";
    Options o;
    for (int i = 1; i < argc; ++i) {
        std::string a = argv[i];
        auto next = [&]() -> std::string {
            if (i + 1 >= argc) die("missing value for " + a);
            return argv[++i];
        };
        if (a == "--seconds") o.seconds = std::atof(next().c_str());
        else if (a == "--rounds") o.rounds = std::atoi(next().c_str());
        else if (a == "--writers") o.writers = std::atoi(next().c_str());
        else if (a == "--sync") o.sync = next();
        else die("unknown argument " + a);
    }
    if (o.seconds <= 0 || o.rounds <= 0 || o.writers <= 0) die("--seconds, --rounds and --writers must be positive");
    if (bottomless_register(0) != SQLITE_OK) die("cannot register the VFS");
    auto made = bottomless::s3::Client::from_env();
    if (!made) die("S3 configuration: " + made.error().message);
    bottomless::s3::Client& client = **made;
    o.bucket = "process-bench-" + std::to_string(::getpid());
    if (auto st = client.create_bucket(o.bucket); !st) die("create bucket: " + st.error().message);
    char tmpl[] = "/tmp/process-bench-XXXXXX";
    if (!::mkdtemp(tmpl)) die("mkdtemp");
    o.dir = tmpl;

    const std::vector<std::string> modes = {"plain-procs", "async-procs", "async-threads"};
    std::map<std::string, std::vector<double>> tps, ratio, puts, wal;
    for (int r = 0; r < o.rounds; ++r) {
        std::vector<std::string> order = modes;
        if (r % 2) std::reverse(order.begin(), order.end());
        std::map<std::string, double> got;
        for (const auto& m : order) {
            const RunResult x = run(m, o, r);
            got[m] = x.tps;
            tps[m].push_back(x.tps);
            wal[m].push_back(x.max_wal_mib);
            if (m != "plain-procs") puts[m].push_back(x.puts_per_min);
            std::fprintf(stderr, "round %d %-14s %9.0f txn/s %7.0f PUT/min  WAL max %7.1f MiB\n", r, m.c_str(), x.tps,
                         x.puts_per_min, x.max_wal_mib);
        }
        for (const auto& m : modes) ratio[m].push_back(got[m] / got["plain-procs"]);
    }
    std::printf("| %d writers, synchronous=%s, 1-row txns | txn/s (median) | ratio to plain WAL, %d processes | PUT/min "
                "| largest WAL, MiB |\n",
                o.writers, o.sync.c_str(), o.writers);
    std::printf("| --- | ---: | ---: | ---: | ---: |\n");
    for (const auto& m : modes)
        std::printf("| %s | %.0f | %.2f | %s | %.1f |\n", m.c_str(), median(tps[m]), median(ratio[m]),
                    m == "plain-procs" ? "-" : std::to_string(static_cast<long>(median(puts[m]))).c_str(),
                    median(wal[m]));
    // Generations per database: one each expected.
    int extra = 0;
    for (const auto& m : {"async-procs", "async-threads"})
        for (int r = 0; r < o.rounds; ++r) {
            auto g = bottomless::replicator::list_generations(client, o.bucket, std::string(m) + "-" + std::to_string(r) + ".db");
            if (g && g->size() != 1) {
                ++extra;
                std::fprintf(stderr, "%s-%d.db: %zu generations\n", m, r, g->size());
            }
        }
    std::printf("\ndatabases with more than one generation: %d of %d\n", extra, 2 * o.rounds);
    fs::remove_all(o.dir);
    (void)client.delete_bucket_and_objects(o.bucket);
    return 0;
}
