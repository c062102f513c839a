// Write benchmark: plain WAL vs bottomless, measured side by side in one run
// against the test S3 server, in the cells users run.
//
// Cells: synchronous=NORMAL (what most WAL users set) and FULL (SQLite's
// default) x 1 and 4 writer threads x 1 and 100 rows per transaction. Modes:
// plain (default VFS), async (bottomless), and on request enc (async with
// encryption_key) and sync (sync=1). Every run uses fresh databases in WAL
// mode with SQLite's default auto-checkpoint. Rounds are the outer loop and
// alternate the order of the modes (the machine is shared and noisy: a burst
// of load then hits one round of every cell, and each mode goes first as
// often as last). Per cell it reports the median txn/s of each mode and the
// median of the per-round ratios mode/plain, plus for async the replication
// lag (commit -> durable in S3, p50/p99), PUT requests per minute and
// uploaded segment bytes per committed WAL byte.
//
// Usage (server from scripts/s3-server.sh, env from its `env` command):
//   build/bench/write_bench [--seconds S] [--rounds R] [--sync NORMAL|FULL|both]
//                           [--writers 1,4] [--rows 1,100] [--modes plain,async,enc,sync]
//                           [--lag on|off] [--burst B/P]
// --burst B/P: the writers commit for B ms, then all pause for P ms, over
// and over (an application that writes in bursts); txn/s then counts the
// bursts' time only. Default: no pause.
// The markdown table goes to stdout; per-round progress to stderr.
#include <sqlite3.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <vector>

#include "bench_support.h"
#include "bottomless.h"
#include "s3/client.h"

using Clock = std::chrono::steady_clock;
namespace fs = std::filesystem;
using namespace bench;

namespace {

// A counter from bottomless_status(), 0 when absent (the status shape may grow or change).
double counter(const nlohmann::json& j, const char* name) {
    auto it = j.find(name);
    return it != j.end() && it->is_number() ? it->get<double>() : 0.0;
}

double thread_cpu_us() {
    timespec ts{};
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return static_cast<double>(ts.tv_sec) * 1e6 + static_cast<double>(ts.tv_nsec) / 1e3;
}

double process_cpu_us() {
    rusage ru{};
    getrusage(RUSAGE_SELF, &ru);
    auto us = [](const timeval& tv) { return static_cast<double>(tv.tv_sec) * 1e6 + static_cast<double>(tv.tv_usec); };
    return us(ru.ru_utime) + us(ru.ru_stime);
}

std::vector<int> split_ints(const std::string& s) {
    std::vector<int> out;
    for (const auto& item : split_list(s)) {
        int v = std::atoi(item.c_str());
        if (v <= 0) die("not a positive integer: " + item);
        out.push_back(v);
    }
    return out;
}

struct Cell {
    std::string sync;  // NORMAL or FULL
    int writers = 1;
    int rows = 1;
};

struct Result {
    double tps = 0;
    double lag_p50_ms = -1, lag_p99_ms = -1;
    double puts_per_min = -1;
    double bytes_ratio = -1;
    // CPU per transaction (µs): the writer threads' own (what the VFS adds
    // on the commit path), and the whole process's from the first commit to
    // the end of the final flush (the uploader's share included: on a
    // machine with few cores it competes with the writers).
    double writer_cpu_us = -1, process_cpu_us = -1;
    double wal_read_share = -1;  // frames the uploader read back from the WAL / frames shipped
};

struct Options {
    double seconds = 3;
    int rounds = 5;
    bool lag = true;
    double burst_ms = 0, pause_ms = 0;  // --burst; 0: no pause
    std::string dir, bucket;
};

// The time spent in bursts in the first `elapsed` seconds of a run.
double active_seconds(double elapsed, const Options& o) {
    if (o.pause_ms <= 0) return elapsed;
    const double period = (o.burst_ms + o.pause_ms) / 1000.0, burst = o.burst_ms / 1000.0;
    const double whole = std::floor(elapsed / period);
    return whole * burst + std::min(elapsed - whole * period, burst);
}

Result run(const std::string& mode, const Cell& c, const Options& o, int round) {
    // A fresh database per run, in its own directory; the file name is unique
    // because it is the database_id (the key prefix) in the shared bucket.
    std::string name = mode + "-" + c.sync + "-w" + std::to_string(c.writers) + "-r" + std::to_string(c.rows) + "-" +
                       std::to_string(round) + ".db";
    std::string sub = o.dir + "/" + name + ".d";
    fs::create_directories(sub);
    std::string uri = "file:" + sub + "/" + name;
    const bool bottomless = mode != "plain";
    if (bottomless) uri += "?vfs=bottomless&bucket=" + o.bucket + (mode == "sync" ? "&sync=1" : "");
    if (mode == "enc") uri += "&encryption_key=5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8";
    const bool async = mode == "async" || mode == "enc";
    const std::string pragmas = "PRAGMA synchronous=" + c.sync + ";";

    // The setup connection stays open for the whole run in every mode, as an
    // application's would; for bottomless it keeps one replicator alive.
    Db setup = open_db(uri);
    exec(setup.get(), "PRAGMA journal_mode=wal; " + pragmas + " CREATE TABLE t(id INTEGER PRIMARY KEY, a INTEGER, b TEXT);");
    if (query(setup.get(), "PRAGMA journal_mode") != "wal") die("journal_mode is not wal");
    if (bottomless) query(setup.get(), "SELECT bottomless_flush()");
    nlohmann::json st0 = bottomless ? status(setup.get()) : nlohmann::json{};

    std::vector<std::string> payloads;
    for (int i = 0; i < c.rows; ++i)
        payloads.push_back("payload-payload-payload-payload-payload-payload-payload-payload-" + std::to_string(i));

    std::atomic<uint64_t> txns{0};
    std::atomic<bool> stop{false};
    std::mutex commits_mu;
    std::vector<int64_t> commit_times;  // sampled commit instants (µs), guarded by commits_mu
    // Polls bottomless_status to see when each sampled commit becomes durable.
    std::vector<std::pair<int64_t, int64_t>> polls;  // (poll time, last durable commit time); monitor thread only
    std::thread monitor;
    if (async && o.lag) {
        monitor = std::thread([&] {
            Db m = open_db(uri);
            auto poll = [&] {
                auto j = status(m.get());
                polls.emplace_back(wall_us(), static_cast<int64_t>(counter(j, "last_durable_commit_us")));
            };
            while (!stop.load()) {
                poll();
                // 20 ms: fine enough against a 1 s batch interval, cheap enough
                // not to tax the writers on 2 cores.
                std::this_thread::sleep_for(std::chrono::milliseconds(20));
            }
            query(m.get(), "SELECT bottomless_flush()");
            poll();
        });
    }
    std::vector<std::thread> ts;
    std::mutex cpu_mu;
    double writer_cpu = 0;  // guarded by cpu_mu
    const double cpu0 = process_cpu_us();
    auto t0 = Clock::now();
    for (int w = 0; w < c.writers; ++w)
        ts.emplace_back([&] {
            const double my_cpu0 = thread_cpu_us();
            Db db = open_db(uri);
            exec(db.get(), pragmas);  // per connection: synchronous is not persistent
            // Prepared once, as applications that care about speed do: the
            // per-transaction cost is then SQLite's and the VFS's, not the parser's.
            // (Declared after the connection: finalized before it closes.)
            Stmt begin = prepare(db.get(), "BEGIN");
            Stmt insert = prepare(db.get(), "INSERT INTO t(a, b) VALUES(abs(random()) % 1000000, ?1)");
            Stmt commit = prepare(db.get(), "COMMIT");
            auto step = [&](const Stmt& st) {
                if (sqlite3_step(st.get()) != SQLITE_DONE) die(std::string("SQL: ") + sqlite3_errmsg(db.get()));
                sqlite3_reset(st.get());
            };
            while (Clock::now() - t0 < std::chrono::duration<double>(o.seconds)) {
                if (o.pause_ms > 0) {
                    // In a pause: wait for the next burst.
                    const double ms = std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
                    const double period = o.burst_ms + o.pause_ms;
                    const double phase = std::fmod(ms, period);
                    if (phase >= o.burst_ms) {
                        std::this_thread::sleep_for(std::chrono::duration<double, std::milli>(period - phase));
                        continue;
                    }
                }
                step(begin);
                for (const auto& p : payloads) {
                    sqlite3_bind_text(insert.get(), 1, p.data(), static_cast<int>(p.size()), SQLITE_STATIC);
                    step(insert);
                }
                step(commit);
                uint64_t n = txns.fetch_add(1);
                if (n % 10 == 0) {
                    std::lock_guard lock(commits_mu);
                    commit_times.push_back(wall_us());
                }
            }
            std::lock_guard lock(cpu_mu);
            writer_cpu += thread_cpu_us() - my_cpu0;
        });
    for (auto& t : ts) t.join();
    double elapsed = std::chrono::duration<double>(Clock::now() - t0).count();
    stop.store(true);
    if (monitor.joinable()) monitor.join();

    Result r;
    r.tps = static_cast<double>(txns.load()) / active_seconds(elapsed, o);
    const double n_txns = std::max<double>(1, static_cast<double>(txns.load()));
    r.writer_cpu_us = writer_cpu / n_txns;
    if (bottomless) {
        query(setup.get(), "SELECT bottomless_flush()");
        r.process_cpu_us = (process_cpu_us() - cpu0) / n_txns;
        auto st1 = status(setup.get());
        // Frames shipped: page bytes over the default page size, which the bench keeps.
        double shipped = (counter(st1, "wal_bytes_shipped") - counter(st0, "wal_bytes_shipped")) / 4096.0;
        if (shipped > 0) r.wal_read_share = (counter(st1, "wal_frames_read") - counter(st0, "wal_frames_read")) / shipped;
        r.puts_per_min = (counter(st1, "put_requests") - counter(st0, "put_requests")) / (elapsed / 60.0);
        double wal = counter(st1, "wal_bytes_shipped") - counter(st0, "wal_bytes_shipped");
        double up = counter(st1, "segment_bytes_uploaded") - counter(st0, "segment_bytes_uploaded");
        if (wal > 0) r.bytes_ratio = up / wal;
    } else {
        r.process_cpu_us = (process_cpu_us() - cpu0) / n_txns;
    }
    if (!polls.empty()) {
        std::vector<double> lags;
        for (int64_t t : commit_times) {
            for (const auto& [when, durable] : polls)
                if (durable >= t) {
                    lags.push_back(static_cast<double>(when - t) / 1000.0);
                    break;
                }
        }
        // -1 (an empty cell), not 0 ms, when no sampled commit became durable.
        r.lag_p50_ms = lags.empty() ? -1 : percentile(lags, 0.5);
        r.lag_p99_ms = lags.empty() ? -1 : percentile(lags, 0.99);
    }
    // The last close flushes (bottomless) and checkpoints, so the next run
    // starts with no upload or checkpoint of this one still going.
    setup.reset();
    std::error_code ec;
    fs::remove_all(sub, ec);
    return r;
}

std::string fmt(double v, const char* f) {
    if (v < 0) return "";
    char buf[64];
    std::snprintf(buf, sizeof buf, f, v);
    return buf;
}

}  // namespace

int main(int argc, char** argv) {
    program_name() = "write_bench";
    Options o;
    std::string sync_arg = "both", writers_arg = "1,4", rows_arg = "1,100", modes_arg = "plain,async";
    for (int i = 1; i < argc; i += 2) {
        std::string a = argv[i];
        if (a == "--help" || a == "-h" || i + 1 >= argc) {
            std::printf("usage: write_bench [--seconds S=3] [--rounds R=5] [--sync NORMAL|FULL|both] [--writers 1,4]\n"
                        "                   [--rows 1,100] [--modes plain,async[,enc,sync]] [--lag on|off]\n"
                        "                   [--burst B/P (ms of commits, ms of pause)]\n");
            return a == "--help" || a == "-h" ? 0 : 2;
        }
        std::string v = argv[i + 1];
        if (a == "--seconds") o.seconds = std::atof(v.c_str());
        else if (a == "--rounds") o.rounds = std::atoi(v.c_str());
        else if (a == "--sync") sync_arg = v;
        else if (a == "--writers") writers_arg = v;
        else if (a == "--rows") rows_arg = v;
        else if (a == "--modes") modes_arg = v;
        else if (a == "--lag") o.lag = v != "off" && v != "0";
        else if (a == "--burst") {
            const auto slash = v.find('/');
            if (slash == std::string::npos) die("--burst takes B/P: ms of commits, then ms of pause");
            o.burst_ms = std::atof(v.substr(0, slash).c_str());
            o.pause_ms = std::atof(v.substr(slash + 1).c_str());
            if (o.burst_ms <= 0 || o.pause_ms < 0) die("--burst B/P: B must be > 0 and P >= 0");
        } else die("unknown option " + a + " (--help)");
    }
    if (o.seconds <= 0 || o.rounds < 1) die("--seconds must be > 0 and --rounds >= 1");
    std::vector<std::string> syncs;
    for (auto& s : split_list(sync_arg)) {
        std::transform(s.begin(), s.end(), s.begin(), ::toupper);
        if (s == "BOTH") syncs.insert(syncs.end(), {"NORMAL", "FULL"});
        else if (s == "NORMAL" || s == "FULL" || s == "OFF" || s == "EXTRA") syncs.push_back(s);
        else die("--sync takes NORMAL, FULL or both");
    }
    std::vector<std::string> modes = split_list(modes_arg);
    for (const auto& m : modes)
        if (m != "plain" && m != "async" && m != "enc" && m != "sync") die("unknown mode " + m);
    if (std::find(modes.begin(), modes.end(), "plain") == modes.end()) modes.insert(modes.begin(), "plain");
    std::vector<Cell> cells;
    for (const auto& s : syncs)
        for (int w : split_ints(writers_arg))
            for (int r : split_ints(rows_arg)) cells.push_back({s, w, r});

    if (!std::getenv("LIBSQL_BOTTOMLESS_ENDPOINT")) die("LIBSQL_BOTTOMLESS_ENDPOINT is not set (eval \"$(scripts/s3-server.sh env)\")");
    if (bottomless_register(0) != SQLITE_OK) die("cannot register the VFS");
    char tmpl[] = "/tmp/bottomless-wbench-XXXXXX";
    if (!mkdtemp(tmpl)) die("mkdtemp");
    o.dir = tmpl;
    o.bucket = "wbench-" + std::to_string(::getpid());

    // results[cell][mode] = one Result per round
    std::vector<std::map<std::string, std::vector<Result>>> results(cells.size());
    auto started = Clock::now();
    for (int round = 0; round < o.rounds; ++round) {
        std::vector<std::string> order = modes;
        if (round % 2) std::reverse(order.begin(), order.end());
        for (size_t ci = 0; ci < cells.size(); ++ci) {
            const Cell& c = cells[ci];
            std::fprintf(stderr, "round %d/%d %-6s w=%d rows=%-3d", round + 1, o.rounds, c.sync.c_str(), c.writers, c.rows);
            for (const auto& m : order) {
                Result r = run(m, c, o, round);
                results[ci][m].push_back(r);
                std::fprintf(stderr, "  %s %.0f", m.c_str(), r.tps);
            }
            std::fprintf(stderr, "\n");
        }
    }
    double total_s = std::chrono::duration<double>(Clock::now() - started).count();

    std::printf("write_bench: %g s per run, %d round(s) alternating the order of %s; medians (run took %.0f s)\n",
                o.seconds, o.rounds, modes_arg.c_str(), total_s);
    if (o.pause_ms > 0)
        std::printf("bursts: %g ms of commits, then %g ms of pause; txn/s over the bursts' time\n", o.burst_ms,
                    o.pause_ms);
    std::printf("\n");
    std::printf("| synchronous | writers | rows/txn");
    for (const auto& m : modes) std::printf(" | %s txn/s", m.c_str());
    for (const auto& m : modes)
        if (m != "plain") std::printf(" | %s/plain | (min–max)", m.c_str());
    const bool has_async = std::find(modes.begin(), modes.end(), "async") != modes.end();
    if (has_async) std::printf(" | async lag p50 | lag p99 | PUT/min | up/WAL B");
    std::printf(" |\n|---|---|---");
    for (const auto& m : modes) std::printf("%s", m == "plain" ? "|---" : "|---|---|---");
    if (has_async) std::printf("|---|---|---|---");
    std::printf("|\n");

    std::vector<double> all_async_ratios;
    for (size_t ci = 0; ci < cells.size(); ++ci) {
        const Cell& c = cells[ci];
        auto& res = results[ci];
        std::printf("| %s | %d | %d", c.sync.c_str(), c.writers, c.rows);
        for (const auto& m : modes) {
            std::vector<double> tps;
            for (const auto& r : res[m]) tps.push_back(r.tps);
            std::printf(" | %.0f", median_measured(tps));
        }
        for (const auto& m : modes) {
            if (m == "plain") continue;
            std::vector<double> ratios;
            for (int k = 0; k < o.rounds; ++k) ratios.push_back(res[m][k].tps / res["plain"][k].tps);
            double med = median_measured(ratios);
            if (m == "async") all_async_ratios.push_back(med);
            std::printf(" | %.2f | %.2f–%.2f", med, *std::min_element(ratios.begin(), ratios.end()),
                        *std::max_element(ratios.begin(), ratios.end()));
        }
        if (has_async) {
            std::vector<double> p50, p99, puts, bytes;
            for (const auto& r : res["async"]) {
                p50.push_back(r.lag_p50_ms);
                p99.push_back(r.lag_p99_ms);
                puts.push_back(r.puts_per_min);
                bytes.push_back(r.bytes_ratio);
            }
            std::printf(" | %s | %s | %s | %s", fmt(median_measured(p50), "%.0f ms").c_str(),
                        fmt(median_measured(p99), "%.0f ms").c_str(), fmt(median_measured(puts), "%.0f").c_str(),
                        fmt(median_measured(bytes), "%.3f").c_str());
        }
        std::printf(" |\n");
    }
    // Where the time goes: CPU per transaction, medians over the rounds.
    std::printf("\nCPU per transaction (µs, medians): writer threads' own, and the whole process's up to the end of "
                "the final flush (the uploader included)\n\n| synchronous | writers | rows/txn");
    for (const auto& m : modes) std::printf(" | %s writer | %s process", m.c_str(), m.c_str());
    if (has_async) std::printf(" | async frames read back from the WAL");
    std::printf(" |\n|---|---|---");
    for (size_t k = 0; k < modes.size(); ++k) std::printf("|---|---");
    if (has_async) std::printf("|---");
    std::printf("|\n");
    for (size_t ci = 0; ci < cells.size(); ++ci) {
        const Cell& c = cells[ci];
        auto& res = results[ci];
        std::printf("| %s | %d | %d", c.sync.c_str(), c.writers, c.rows);
        for (const auto& m : modes) {
            std::vector<double> w, p;
            for (const auto& r : res[m]) {
                w.push_back(r.writer_cpu_us);
                p.push_back(r.process_cpu_us);
            }
            std::printf(" | %s | %s", fmt(median_measured(w), "%.2f").c_str(), fmt(median_measured(p), "%.2f").c_str());
        }
        if (has_async) {
            std::vector<double> rb;
            for (const auto& r : res["async"]) rb.push_back(r.wal_read_share);
            std::printf(" | %s", fmt(median_measured(rb) * 100.0, "%.0f %%").c_str());
        }
        std::printf(" |\n");
    }
    if (!all_async_ratios.empty())
        std::printf("\nasync/plain over the %zu cells: lowest cell %.2f, median cell %.2f\n", all_async_ratios.size(),
                    *std::min_element(all_async_ratios.begin(), all_async_ratios.end()),
                    median_measured(all_async_ratios));

    if (auto client = bottomless::s3::Client::from_env()) (void)(*client)->delete_bucket_and_objects(o.bucket);
    std::error_code ec;
    fs::remove_all(o.dir, ec);
    return 0;
}
