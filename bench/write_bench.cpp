// Write benchmark: plain WAL vs bottomless async vs bottomless async with
// encryption (AES-256-GCM) vs bottomless sync, measured side by side in one
// run against the test S3 server.
//
// For each transaction size (1 row, 100 rows) and writer count (1, 4) it
// reports transactions/s and the ratio to plain WAL; for bottomless also the
// replication lag (commit -> durable in S3, p50/p99), PUT requests per minute
// and uploaded segment bytes per committed WAL byte.
//
// Usage (server from scripts/s3-server.sh, env from its `env` command):
//   build/bench/write_bench [--seconds S] [--rounds R]
#include <sqlite3.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <mutex>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <vector>

#include "bottomless.h"
#include "s3/client.h"

using Clock = std::chrono::steady_clock;
namespace fs = std::filesystem;

namespace {

void die(const std::string& m) {
    std::fprintf(stderr, "write_bench: %s\n", m.c_str());
    std::exit(1);
}

sqlite3* open(const std::string& uri) {
    sqlite3* db = nullptr;
    if (sqlite3_open_v2(uri.c_str(), &db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_URI, nullptr) != SQLITE_OK)
        die("open " + uri + ": " + (db ? sqlite3_errmsg(db) : "?"));
    sqlite3_busy_timeout(db, 30'000);
    return db;
}

void exec(sqlite3* db, const char* sql) {
    char* err = nullptr;
    if (sqlite3_exec(db, sql, nullptr, nullptr, &err) != SQLITE_OK) die(std::string("SQL: ") + (err ? err : "?"));
}

std::string query(sqlite3* db, const char* sql) {
    sqlite3_stmt* st = nullptr;
    if (sqlite3_prepare_v2(db, sql, -1, &st, nullptr) != SQLITE_OK) die(sqlite3_errmsg(db));
    std::string out;
    if (sqlite3_step(st) == SQLITE_ROW && sqlite3_column_text(st, 0))
        out = reinterpret_cast<const char*>(sqlite3_column_text(st, 0));
    sqlite3_finalize(st);
    return out;
}

int64_t wall_us() {
    return std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::system_clock::now().time_since_epoch())
        .count();
}

struct Result {
    double tps = 0;
    double lag_p50_ms = -1, lag_p99_ms = -1;
    double puts_per_min = -1;
    double bytes_ratio = -1;
};

double pct(std::vector<double> v, double p) {
    if (v.empty()) return -1;
    std::sort(v.begin(), v.end());
    return v[std::min(v.size() - 1, static_cast<size_t>(p * static_cast<double>(v.size())))];
}

Result run(const std::string& mode, int rows, int writers, double seconds, const std::string& dir,
           const std::string& bucket, int round) {
    std::string path = dir + "/" + mode + "-" + std::to_string(rows) + "-" + std::to_string(writers) + "-" +
                       std::to_string(round) + ".db";
    std::string uri = "file:" + path;
    if (mode != "plain") uri += "?vfs=bottomless&bucket=" + bucket + (mode == "sync" ? "&sync=1" : "");
    if (mode == "enc") uri += "&encryption_key=5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8";
    const bool async = mode == "async" || mode == "enc";
    sqlite3* setup = open(uri);
    exec(setup, "PRAGMA journal_mode=wal; CREATE TABLE t(id INTEGER PRIMARY KEY, a INTEGER, b TEXT);");
    if (mode != "plain") query(setup, "SELECT bottomless_flush()");
    nlohmann::json st0 = mode == "plain" ? nlohmann::json{} : nlohmann::json::parse(query(setup, "SELECT bottomless_status()"));

    std::string body = "BEGIN;";
    for (int i = 0; i < rows; ++i)
        body += "INSERT INTO t(a, b) VALUES(abs(random()) % 1000000, 'payload-payload-payload-payload-payload-payload-"
                "payload-payload-" + std::to_string(i) + "');";
    body += "COMMIT;";

    std::atomic<uint64_t> txns{0};
    std::atomic<bool> stop{false};
    std::mutex commits_mu;
    std::vector<int64_t> commit_times;  // sampled commit instants (µs), guarded by commits_mu
    // Polls bottomless_status to see when each sampled commit becomes durable.
    std::vector<std::pair<int64_t, int64_t>> polls;  // (poll time, last durable commit time)
    std::thread monitor;
    if (async) {
        monitor = std::thread([&] {
            sqlite3* m = open(uri);
            while (!stop.load()) {
                auto j = nlohmann::json::parse(query(m, "SELECT bottomless_status()"));
                polls.emplace_back(wall_us(), j["last_durable_commit_us"].get<int64_t>());
                std::this_thread::sleep_for(std::chrono::milliseconds(10));
            }
            query(m, "SELECT bottomless_flush()");
            auto j = nlohmann::json::parse(query(m, "SELECT bottomless_status()"));
            polls.emplace_back(wall_us(), j["last_durable_commit_us"].get<int64_t>());
            sqlite3_close(m);
        });
    }
    std::vector<std::thread> ts;
    auto t0 = Clock::now();
    for (int w = 0; w < writers; ++w)
        ts.emplace_back([&] {
            sqlite3* db = open(uri);
            while (Clock::now() - t0 < std::chrono::duration<double>(seconds)) {
                exec(db, body.c_str());
                uint64_t n = txns.fetch_add(1);
                if (n % 10 == 0) {
                    std::lock_guard lock(commits_mu);
                    commit_times.push_back(wall_us());
                }
            }
            sqlite3_close(db);
        });
    for (auto& t : ts) t.join();
    double elapsed = std::chrono::duration<double>(Clock::now() - t0).count();
    stop.store(true);
    if (monitor.joinable()) monitor.join();

    Result r;
    r.tps = static_cast<double>(txns.load()) / elapsed;
    if (mode != "plain") {
        query(setup, "SELECT bottomless_flush()");
        auto st1 = nlohmann::json::parse(query(setup, "SELECT bottomless_status()"));
        r.puts_per_min = (st1["put_requests"].get<double>() - st0["put_requests"].get<double>()) / (elapsed / 60.0);
        double wal = st1["wal_bytes_shipped"].get<double>() - st0["wal_bytes_shipped"].get<double>();
        double up = st1["segment_bytes_uploaded"].get<double>() - st0["segment_bytes_uploaded"].get<double>();
        if (wal > 0) r.bytes_ratio = up / wal;
    }
    if (async) {
        std::vector<double> lags;
        for (int64_t c : commit_times) {
            for (const auto& [when, durable] : polls)
                if (durable >= c) {
                    lags.push_back(static_cast<double>(when - c) / 1000.0);
                    break;
                }
        }
        r.lag_p50_ms = pct(lags, 0.5);
        r.lag_p99_ms = pct(lags, 0.99);
    }
    sqlite3_close(setup);
    return r;
}

}  // namespace

int main(int argc, char** argv) {
    double seconds = 5;
    int rounds = 1;
    for (int i = 1; i + 1 < argc; i += 2) {
        std::string a = argv[i];
        if (a == "--seconds") seconds = std::atof(argv[i + 1]);
        else if (a == "--rounds") rounds = std::atoi(argv[i + 1]);
    }
    if (!std::getenv("LIBSQL_BOTTOMLESS_ENDPOINT")) die("LIBSQL_BOTTOMLESS_ENDPOINT is not set (eval \"$(scripts/s3-server.sh env)\")");
    if (bottomless_register(0) != SQLITE_OK) die("cannot register the VFS");
    char tmpl[] = "/tmp/bottomless-wbench-XXXXXX";
    if (!mkdtemp(tmpl)) die("mkdtemp");
    std::string dir = tmpl;
    std::string bucket = "wbench-" + std::to_string(::getpid());

    std::printf("# write benchmark: %.0f s per cell, %d round(s); plain WAL vs bottomless, same run\n", seconds, rounds);
    std::printf("%-9s %-7s %-6s %10s %7s %10s %10s %9s %11s\n", "rows/txn", "writers", "mode", "txn/s", "ratio",
                "lag p50", "lag p99", "PUT/min", "up/WAL B");
    for (int rows : {1, 100}) {
        for (int writers : {1, 4}) {
            for (int round = 0; round < rounds; ++round) {
                // Interleaved, so machine noise hits all modes alike.
                Result plain = run("plain", rows, writers, seconds, dir, bucket, round);
                Result async = run("async", rows, writers, seconds, dir, bucket, round);
                Result enc = run("enc", rows, writers, seconds, dir, bucket, round);
                Result sync = run("sync", rows, writers, seconds, dir, bucket, round);
                for (auto& [name, r] : {std::pair<const char*, Result&>{"plain", plain}, {"async", async},
                                        {"enc", enc}, {"sync", sync}}) {
                    std::printf("%-9d %-7d %-6s %10.0f %7.2f", rows, writers, name, r.tps, r.tps / plain.tps);
                    if (r.lag_p50_ms >= 0) std::printf(" %8.0fms %8.0fms", r.lag_p50_ms, r.lag_p99_ms);
                    else std::printf(" %10s %10s", "-", "-");
                    if (r.puts_per_min >= 0) std::printf(" %9.0f %11.2f\n", r.puts_per_min, r.bytes_ratio);
                    else std::printf(" %9s %11s\n", "-", "-");
                }
                std::printf("%-9d %-7d enc/async %6.2f\n", rows, writers, enc.tps / async.tps);
            }
        }
    }
    if (auto client = bottomless::s3::Client::from_env()) (void)(*client)->delete_bucket_and_objects(bucket);
    std::error_code ec;
    fs::remove_all(dir, ec);
    return 0;
}
