// Many databases in one process (issue 10): what each open database costs
// in threads, file descriptors and memory, how fast databases open when
// their state file proves continuity, whether the few active ones keep their
// lag while the rest idle, and how long closing all of them takes.
//
// Phases, all in one process, databases in one directory, one bucket:
//   1. create: --dbs databases opened through bottomless, one row each,
//      flushed (a fresh database: its open asks the bucket), then closed
//      (1000 at a time; the descriptors of the open fresh ones are reported).
//   2. plain: the same files opened with SQLite's own VFS, one read each
//      (the control: SQLite's own threads, fds and memory per database).
//   3. reopen: opened again through bottomless (their state files are
//      valid: no S3 request at open), one read each. Threads, fds, RSS and
//      heap per idle database beyond the plain open's.
//   4. active: --active-pct of them commit --rate txn/s each for --seconds
//      (one writer thread paces them); every 250 ms the main thread reads
//      each active database's lag_ms; threads and fds are sampled.
//   5. close: all of them (each ships what it holds).
//
// Usage (server from scripts/s3-server.sh, env from its `env` command):
//   build/bench/many_dbs [--dbs 2000] [--seconds 20] [--active-pct 1] [--rate 10]
//                        [--batch-ms 1000] [--uri-extra '&uploader_threads=4'] [--rounds 0]
// --rounds N: after phase 3, N rounds of plain SQLite opening and closing
// all the (idle) databases, then bottomless doing the same, each timed in
// wall and CPU time (steadier figures side by side; a profile of open/close).
// The soft RLIMIT_NOFILE is raised to the hard limit; when that cannot hold
// plain SQLite's 3 descriptors per database, --dbs is lowered to what fits.
#include <dirent.h>
#include <malloc.h>
#include <sqlite3.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <string>
#include <thread>
#include <vector>

#include "bench/bench_support.h"
#include "bottomless.h"
#include "s3/client.h"

using namespace bench;
namespace fs = std::filesystem;

namespace {

int count_dir(const char* path) {
    int n = 0;
    if (DIR* d = ::opendir(path)) {
        while (dirent* e = ::readdir(d))
            if (e->d_name[0] != '.') ++n;
        ::closedir(d);
    }
    return n;
}
int threads() { return count_dir("/proc/self/task"); }
int fds() { return count_dir("/proc/self/fd") - 1; }  // less the directory stream itself
double heap_bytes() {
    struct mallinfo2 m = mallinfo2();
    return static_cast<double>(m.uordblks + m.hblkhd);
}
// CPU seconds (user + system) of the whole process so far: a figure the
// other loads of a shared machine disturb less than the wall clock.
double cpu_seconds() {
    rusage ru{};
    ::getrusage(RUSAGE_SELF, &ru);
    auto s = [](const timeval& t) { return static_cast<double>(t.tv_sec) + t.tv_usec / 1e6; };
    return s(ru.ru_utime) + s(ru.ru_stime);
}
double seconds_since(std::chrono::steady_clock::time_point t0) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

struct Footprint {
    int threads = 0, fds = 0;
    long rss_kib = 0;
    double heap = 0;
};
Footprint footprint() { return {threads(), fds(), proc_status_kib("VmRSS"), heap_bytes()}; }

struct Options {
    int dbs = 2000;
    int seconds = 20;
    double active_pct = 1;
    double rate = 10;
    int batch_ms = 1000;
    int rounds = 0;  // extra close-all/reopen-all rounds of idle databases (for profiling and steadier figures)
    std::string uri_extra;
};

// Sums of every database's own counters (bottomless_status() of each): the
// same figures with or without the process-wide summary.
struct Totals {
    double requests = 0, puts = 0;
};
Totals totals(const std::vector<Db>& dbs) {
    Totals t;
    for (const auto& db : dbs) {
        auto j = status(db.get());
        t.requests += j["requests"].get<double>();
        t.puts += j["put_requests"].get<double>();
    }
    return t;
}

// bottomless_status('*')'s uploader object, or "n/a" where the build has
// no process-wide summary (the baseline before the pool).
std::string pool_summary(sqlite3* db) {
    sqlite3_stmt* raw = nullptr;
    if (sqlite3_prepare_v2(db, "SELECT bottomless_status('*')", -1, &raw, nullptr) != SQLITE_OK) return "n/a";
    Stmt st(raw);
    if (sqlite3_step(st.get()) != SQLITE_ROW || !sqlite3_column_text(st.get(), 0)) return "n/a";
    return nlohmann::json::parse(reinterpret_cast<const char*>(sqlite3_column_text(st.get(), 0)))["uploader"].dump();
}

Options parse(int argc, char** argv) {
    Options o;
    for (int i = 1; i < argc; ++i) {
        std::string a = argv[i];
        auto next = [&]() -> std::string {
            if (i + 1 >= argc) die("missing value after " + a);
            return argv[++i];
        };
        if (a == "--dbs") o.dbs = std::stoi(next());
        else if (a == "--seconds") o.seconds = std::stoi(next());
        else if (a == "--active-pct") o.active_pct = std::stod(next());
        else if (a == "--rate") o.rate = std::stod(next());
        else if (a == "--batch-ms") o.batch_ms = std::stoi(next());
        else if (a == "--uri-extra") o.uri_extra = next();
        else if (a == "--rounds") o.rounds = std::stoi(next());
        else die("unknown option " + a + " (see the usage at the top of bench/many_dbs.cpp)");
    }
    if (o.dbs < 1 || o.seconds < 1) die("--dbs and --seconds must be positive");
    return o;
}

}  // namespace

int main(int argc, char** argv) {
    program_name() = "many_dbs";
    Options o = parse(argc, argv);
    // Descriptors: SQLite alone needs 3 per open database (db, -wal, -shm);
    // bottomless adds one per directory and the pool's sockets. Raise the
    // soft limit to the hard one, and where even that cannot hold SQLite's
    // own share, run the largest count that fits (and say so).
    rlimit nofile{};
    ::getrlimit(RLIMIT_NOFILE, &nofile);
    const rlim_t soft_before = nofile.rlim_cur;
    if (nofile.rlim_cur < nofile.rlim_max) {
        nofile.rlim_cur = nofile.rlim_max;
        if (::setrlimit(RLIMIT_NOFILE, &nofile) != 0) ::getrlimit(RLIMIT_NOFILE, &nofile);
    }
    const int requested = o.dbs;
    constexpr int kFdSlack = 256;  // stdio, the lock file, sockets, the bench's own
    if (nofile.rlim_cur != RLIM_INFINITY && 3ll * o.dbs + kFdSlack > static_cast<long long>(nofile.rlim_cur))
        o.dbs = std::max(1, static_cast<int>((static_cast<long long>(nofile.rlim_cur) - kFdSlack) / 3 / 100 * 100));
    std::printf("RLIMIT_NOFILE: soft %llu -> %llu (hard %llu)%s\n", static_cast<unsigned long long>(soft_before),
                static_cast<unsigned long long>(nofile.rlim_cur), static_cast<unsigned long long>(nofile.rlim_max),
                o.dbs == requested ? ""
                                   : (": plain SQLite needs 3 per database, so " + std::to_string(o.dbs) +
                                      " databases instead of " + std::to_string(requested))
                                         .c_str());
    if (!std::getenv("LIBSQL_BOTTOMLESS_ENDPOINT")) die("set the S3 environment first: eval \"$(scripts/s3-server.sh env)\"");
    if (bottomless_register(0) != SQLITE_OK) die("cannot register the VFS");
    auto client = bottomless::s3::Client::from_env();
    if (!client) die("S3 client: " + client.error().describe());
    const std::string bucket = "many-dbs-" + std::to_string(::getpid()) + "-" + std::to_string(wall_us() % 1000000);
    if (auto st = (*client)->create_bucket(bucket); !st) die("create bucket: " + st.error().describe());
    const fs::path dir = fs::temp_directory_path() / ("many_dbs." + std::to_string(::getpid()));
    fs::create_directories(dir);
    auto file = [&](int i) { return (dir / ("d" + std::to_string(i) + ".db")).string(); };
    auto uri = [&](int i) {
        return "file:" + file(i) + "?vfs=bottomless&bucket=" + bucket + "&batch_interval_ms=" + std::to_string(o.batch_ms) +
               o.uri_extra;
    };
    const unsigned cores = std::max(1u, std::thread::hardware_concurrency());
    std::printf("many_dbs: %d databases, %.3g%% active at %.3g txn/s for %d s, batch %d ms, %u cores%s%s\n", o.dbs,
                o.active_pct, o.rate, o.seconds, o.batch_ms, cores, o.uri_extra.empty() ? "" : ", uri extra ",
                o.uri_extra.c_str());
    std::vector<Db> dbs(o.dbs);

    // 1. create, in chunks of 1000 open at once. A fresh database takes its
    // first snapshot while open; the snapshot reads through a connection's
    // handle, so it costs no descriptor (before: the unix VFS deferred the
    // close of the snapshot's own read-only file while a connection held a
    // lock on the inode, 4 descriptors per fresh database instead of 3).
    constexpr int kChunk = 1000;
    double create_s = 0, flush_s = 0, close_fresh_s = 0, fresh_fds_per_db = 0;
    for (int from = 0; from < o.dbs; from += kChunk) {
        const int to = std::min(o.dbs, from + kChunk);
        const int fds0 = fds();
        auto t0 = std::chrono::steady_clock::now();
        for (int i = from; i < to; ++i) {
            dbs[i] = open_db(uri(i));
            exec(dbs[i].get(), "PRAGMA journal_mode=wal; CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB); "
                               "INSERT INTO t(v) VALUES(randomblob(100));");
        }
        create_s += seconds_since(t0);
        t0 = std::chrono::steady_clock::now();
        for (int i = from; i < to; ++i) query(dbs[i].get(), "SELECT bottomless_flush(120000)");
        flush_s += seconds_since(t0);
        if (from == 0) fresh_fds_per_db = double(fds() - fds0) / (to - from);
        t0 = std::chrono::steady_clock::now();
        for (int i = from; i < to; ++i) dbs[i].reset();
        close_fresh_s += seconds_since(t0);
    }
    std::printf("create: %d fresh databases (%d at a time) opened, written in %.2f s (%.0f/s), flushed in %.2f s, "
                "closed in %.2f s; %.2f fds per open fresh database (after its first snapshot)\n",
                o.dbs, std::min(o.dbs, kChunk), create_s, o.dbs / create_s, flush_s, close_fresh_s, fresh_fds_per_db);
    auto t0 = std::chrono::steady_clock::now();

    // 2. plain (the control)
    const Footprint base = footprint();
    t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < o.dbs; ++i) {
        dbs[i] = open_db("file:" + file(i));
        query(dbs[i].get(), "SELECT count(*) FROM t");
    }
    const double plain_s = seconds_since(t0);
    const Footprint plain = footprint();
    for (auto& db : dbs) db.reset();
    std::printf("plain SQLite: %d opens+reads in %.2f s (%.0f/s); +%d threads, +%d fds, RSS +%.1f KiB/db, heap +%.1f "
                "KiB/db\n",
                o.dbs, plain_s, o.dbs / plain_s, plain.threads - base.threads, plain.fds - base.fds,
                double(plain.rss_kib - base.rss_kib) / o.dbs, (plain.heap - base.heap) / 1024 / o.dbs);

    // 3. reopen through bottomless (valid state files)
    const Footprint base2 = footprint();
    t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < o.dbs; ++i) {
        dbs[i] = open_db(uri(i));
        query(dbs[i].get(), "SELECT count(*) FROM t");
    }
    const double reopen_s = seconds_since(t0);
    std::this_thread::sleep_for(std::chrono::milliseconds(500));  // anything the opens scheduled runs now
    const Footprint idle = footprint();
    const Totals after_open = totals(dbs);
    const double requests_after_open = after_open.requests;
    std::printf("reopen: %d opens+reads in %.2f s (%.0f/s), %.0f S3 requests made by them\n", o.dbs, reopen_s,
                o.dbs / reopen_s, requests_after_open);
    std::printf("idle: %d threads (limit 2 x cores + 4 = %u), %d fds (limit 3 x dbs + 64 = %d), uploader threads %s\n",
                idle.threads, 2 * cores + 4, idle.fds, 3 * o.dbs + 64, pool_summary(dbs[0].get()).c_str());
    std::printf("idle, beyond plain SQLite: RSS %+.1f KiB/db, heap %+.1f KiB/db, fds %+.2f/db\n",
                double((idle.rss_kib - base2.rss_kib) - (plain.rss_kib - base.rss_kib)) / o.dbs,
                ((idle.heap - base2.heap) - (plain.heap - base.heap)) / 1024 / o.dbs,
                double((idle.fds - base2.fds) - (plain.fds - base.fds)) / o.dbs);
    for (int round = 1; round <= o.rounds; ++round) {
        // Each round also times plain SQLite's close and open of the same
        // files just before, so both see the same file system state (ext4
        // slows down as the files' inodes churn) and machine load.
        for (auto& db : dbs) db.reset();
        double cpu0 = cpu_seconds();
        t0 = std::chrono::steady_clock::now();
        for (int i = 0; i < o.dbs; ++i) {
            dbs[i] = open_db("file:" + file(i));
            query(dbs[i].get(), "SELECT count(*) FROM t");
        }
        const double p_open_s = seconds_since(t0), p_open_cpu = cpu_seconds() - cpu0;
        cpu0 = cpu_seconds();
        t0 = std::chrono::steady_clock::now();
        for (auto& db : dbs) db.reset();
        const double p_close_s = seconds_since(t0), p_close_cpu = cpu_seconds() - cpu0;
        cpu0 = cpu_seconds();
        t0 = std::chrono::steady_clock::now();
        for (int i = 0; i < o.dbs; ++i) {
            dbs[i] = open_db(uri(i));
            query(dbs[i].get(), "SELECT count(*) FROM t");
        }
        const double b_open_s = seconds_since(t0), b_open_cpu = cpu_seconds() - cpu0;
        std::this_thread::sleep_for(std::chrono::milliseconds(200));
        cpu0 = cpu_seconds();
        t0 = std::chrono::steady_clock::now();
        for (auto& db : dbs) db.reset();
        const double b_close_s = seconds_since(t0), b_close_cpu = cpu_seconds() - cpu0;
        std::printf("round %d: opens+reads/s plain %.0f, bottomless %.0f (CPU us/open %.0f vs %.0f); closes of %d idle: "
                    "plain %.2f s, bottomless %.2f s (CPU us/close %.0f vs %.0f)\n",
                    round, o.dbs / p_open_s, o.dbs / b_open_s, p_open_cpu / o.dbs * 1e6, b_open_cpu / o.dbs * 1e6,
                    o.dbs, p_close_s, b_close_s, p_close_cpu / o.dbs * 1e6, b_close_cpu / o.dbs * 1e6);
        for (int i = 0; i < o.dbs; ++i) {
            dbs[i] = open_db(uri(i));
            query(dbs[i].get(), "SELECT count(*) FROM t");
        }
    }

    // 4. active
    const int active = std::max(1, static_cast<int>(o.dbs * o.active_pct / 100));
    std::atomic<bool> stop{false};
    std::atomic<long> commits{0};
    const double puts0 = after_open.puts;
    std::thread writer([&] {
        const auto period = std::chrono::duration<double>(1.0 / o.rate);
        auto next = std::chrono::steady_clock::now();
        long k = 0;
        while (!stop.load()) {
            for (int i = 0; i < active; ++i) exec(dbs[i].get(), "INSERT INTO t(v) VALUES(randomblob(200))");
            commits += active;
            ++k;
            next += std::chrono::duration_cast<std::chrono::steady_clock::duration>(period);
            std::this_thread::sleep_until(next);
        }
        (void)k;
    });
    std::vector<double> lags;
    int most_threads = 0, most_fds = 0;
    t0 = std::chrono::steady_clock::now();
    while (seconds_since(t0) < o.seconds) {
        std::this_thread::sleep_for(std::chrono::milliseconds(250));
        for (int i = 0; i < active; ++i) lags.push_back(status(dbs[i].get())["lag_ms"].get<double>());
        most_threads = std::max(most_threads, threads());
        most_fds = std::max(most_fds, fds());
    }
    stop = true;
    writer.join();
    const double active_s = seconds_since(t0);
    const double puts = totals(dbs).puts - puts0;
    std::printf("active: %d databases, %ld commits in %.1f s (%.0f txn/s); lag_ms p50 %.0f p99 %.0f max %.0f "
                "(goal p99 <= %d); PUTs %.0f (%.0f/min); threads at most %d, fds at most %d\n",
                active, commits.load(), active_s, commits.load() / active_s, percentile(lags, 0.5),
                percentile(lags, 0.99), lags.empty() ? 0.0 : *std::max_element(lags.begin(), lags.end()),
                o.batch_ms + 1000, puts, puts / active_s * 60, most_threads, most_fds);

    // 5. close
    t0 = std::chrono::steady_clock::now();
    for (auto& db : dbs) db.reset();
    const double close_s = seconds_since(t0);
    std::printf("close: %d databases in %.2f s (goal <= 10 s at 10 000)\n", o.dbs, close_s);

    (void)(*client)->delete_bucket_and_objects(bucket);
    std::error_code ec;
    fs::remove_all(dir, ec);
    return 0;
}
