// Mixed write workload: plain WAL vs bottomless, side by side in one run.
//
// One program of steps an application's database goes through (bulk inserts
// into a table with two indexes, single-row commits, REPLACE on an INTEGER
// PRIMARY KEY, UPDATE and DELETE by key range and by index range, emptying
// and refilling a table, a whole-table UPDATE, a VACUUM), run on a fresh WAL
// database once per mode per round. Every value comes from a seeded PRNG, so
// each mode does exactly the same work; the bench checks that the contents
// agree at the end. Rounds alternate the order of the modes (the machine is
// shared and noisy). It reports the median time of every step and of the
// total per mode, and the median of the per-round speed ratios
// plain time / mode time (1.00 = as fast as plain WAL, higher is faster).
// For bottomless it also times the bottomless_flush() after the program (not
// counted in the total: the application does not wait for it).
//
// Usage (server from scripts/s3-server.sh, env from its `env` command):
//   build/bench/mix_bench [--size N=500] [--rounds R=3] [--sync FULL|NORMAL]
//                         [--modes plain,async[,enc,sync]] [--steps]
// The number of operations grows linearly with --size; the markdown table goes to stdout.
#include <sqlite3.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "bench_support.h"
#include "bottomless.h"
#include "s3/client.h"

using Clock = std::chrono::steady_clock;
namespace fs = std::filesystem;
using bench::die;

namespace {

// splitmix64: small, fast, and the same sequence for every mode.
struct Rng {
    uint64_t s;
    uint64_t next() {
        uint64_t z = (s += 0x9e3779b97f4a7c15ULL);
        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
        z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
        return z ^ (z >> 31);
    }
    int64_t below(int64_t n) { return static_cast<int64_t>(next() % static_cast<uint64_t>(n)); }
};

// Text of 20..119 characters: words made of hex digits, so pages compress
// about as well as ordinary application text, not like runs of one byte.
std::string text(Rng& r) {
    static const char* kWords[] = {"alpha", "bravo", "delta", "echo",   "golf",  "hotel", "kilo",  "lima",
                                   "mike",  "oscar", "papa",  "romeo",  "sierra", "tango", "victor", "zulu"};
    size_t len = 20 + static_cast<size_t>(r.below(100));
    std::string out;
    char hex[20];
    while (out.size() < len) {
        uint64_t v = r.next();
        out += kWords[v & 15];
        std::snprintf(hex, sizeof hex, "-%x ", static_cast<unsigned>(v >> 40));
        out += hex;
    }
    out.resize(len);
    return out;
}

// A connection whose statements are prepared once and cached by their SQL:
// the steps run the same few statements thousands of times, as an
// application that cares about speed would.
class Db {
public:
    explicit Db(const std::string& uri) : db_(bench::open_db(uri)) {}

    void exec(const std::string& sql) { bench::exec(db_.get(), sql); }
    std::string text_of(const std::string& sql) { return bench::query(db_.get(), sql); }
    // Runs a cached prepared statement with integer or text parameters.
    void run(const std::string& sql, std::initializer_list<int64_t> ints, const std::string* txt = nullptr) {
        sqlite3_stmt* st = prepared(sql);
        int i = 1;
        for (int64_t v : ints) sqlite3_bind_int64(st, i++, v);
        if (txt) sqlite3_bind_text(st, i, txt->data(), static_cast<int>(txt->size()), SQLITE_STATIC);
        int rc;
        while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
        }
        if (rc != SQLITE_DONE) die("SQL: " + sql + ": " + sqlite3_errmsg(db_.get()));
        sqlite3_reset(st);
        sqlite3_clear_bindings(st);
    }

private:
    sqlite3_stmt* prepared(const std::string& sql) {
        auto it = stmts_.find(sql);
        if (it == stmts_.end()) it = stmts_.emplace(sql, bench::prepare(db_.get(), sql)).first;
        return it->second.get();
    }
    bench::Db db_;                              // declared first: closed last,
    std::map<std::string, bench::Stmt> stmts_;  // after every statement is finalized
};

struct Step {
    std::string name, what;
    std::function<void(Db&, Rng&)> body;
};

// The program. n = 100 * --size rows is the unit of work.
std::vector<Step> program(int64_t n) {
    std::vector<Step> s;
    auto N = [](int64_t v) { return std::to_string(v); };
    s.push_back({"insert", N(5 * n) + " INSERTs into a table with 2 indexes, 1 txn", [n](Db& db, Rng& r) {
                     db.exec("BEGIN");
                     for (int64_t i = 0; i < 5 * n; ++i) {
                         std::string c = text(r);
                         db.run("INSERT INTO t1(b, c) VALUES(?1, ?2)", {r.below(1'000'000)}, &c);
                     }
                     db.exec("COMMIT");
                 }});
    s.push_back({"insert-commits", N(n / 5) + " single-row INSERT transactions", [n](Db& db, Rng& r) {
                     for (int64_t i = 0; i < n / 5; ++i) {
                         std::string c = text(r);
                         db.run("INSERT INTO t1(b, c) VALUES(?1, ?2)", {r.below(1'000'000)}, &c);
                     }
                 }});
    s.push_back({"replace-ipk", N(7 * n / 2) + " REPLACEs on an INTEGER PRIMARY KEY, 1 txn", [n](Db& db, Rng& r) {
                     db.exec("BEGIN");
                     for (int64_t i = 0; i < 7 * n / 2; ++i) {
                         std::string c = text(r);
                         db.run("REPLACE INTO t2(a, b, c) VALUES(?1, ?2, ?3)", {1 + r.below(2 * n), r.below(1'000'000)}, &c);
                     }
                     db.exec("COMMIT");
                 }});
    s.push_back({"update-keys", N(n / 5) + " UPDATEs of 10-key ranges, txns of 100", [n](Db& db, Rng& r) {
                     for (int64_t i = 0; i < n / 5; ++i) {
                         if (i % 100 == 0) db.exec(i ? "COMMIT; BEGIN" : "BEGIN");
                         std::string c = text(r);
                         int64_t lo = 1 + r.below(5 * n);
                         db.run("UPDATE t1 SET b = ?1, c = ?3 WHERE a BETWEEN ?2 AND ?2 + 9", {r.below(1'000'000), lo}, &c);
                     }
                     db.exec("COMMIT");
                 }});
    s.push_back({"update-index", N(n / 20) + " UPDATEs of index ranges (b), 1 txn", [n](Db& db, Rng& r) {
                     db.exec("BEGIN");
                     for (int64_t i = 0; i < n / 20; ++i) {
                         int64_t lo = r.below(1'000'000);
                         db.run("UPDATE t1 SET c = substr(c, 2) || 'x' WHERE b BETWEEN ?1 AND ?1 + 200", {lo});
                     }
                     db.exec("COMMIT");
                 }});
    s.push_back({"delete-keys", N(n / 5) + " DELETEs of 5-key ranges, txns of 100", [n](Db& db, Rng& r) {
                     for (int64_t i = 0; i < n / 5; ++i) {
                         if (i % 100 == 0) db.exec(i ? "COMMIT; BEGIN" : "BEGIN");
                         db.run("DELETE FROM t1 WHERE a BETWEEN ?1 AND ?1 + 4", {1 + r.below(5 * n)});
                     }
                     db.exec("COMMIT");
                 }});
    s.push_back({"delete-index", "1 DELETE of a tenth of the rows by an index range", [](Db& db, Rng& r) {
                     db.run("DELETE FROM t1 WHERE b BETWEEN ?1 AND ?1 + 99999", {r.below(900'000)});
                 }});
    s.push_back({"refill", "DELETE all of t2 and refill it from t1, 1 txn", [](Db& db, Rng&) {
                     db.exec("BEGIN; DELETE FROM t2; INSERT INTO t2(a, b, c) SELECT a, b, c FROM t1; COMMIT");
                 }});
    s.push_back({"update-all", "1 UPDATE of every row of t2", [](Db& db, Rng&) { db.exec("UPDATE t2 SET b = b + 1"); }});
    s.push_back({"update-commits", N(n / 5) + " single-row UPDATE transactions by key", [n](Db& db, Rng& r) {
                     for (int64_t i = 0; i < n / 5; ++i) db.run("UPDATE t2 SET b = ?1 WHERE a = ?2", {r.below(1000), 1 + r.below(5 * n)});
                 }});
    s.push_back({"vacuum", "VACUUM", [](Db& db, Rng&) { db.exec("VACUUM"); }});
    return s;
}

struct RunResult {
    std::vector<double> step_s;
    double total_s = 0;
    double flush_s = -1;
    std::string digest;
};

RunResult run(const std::string& mode, const std::vector<Step>& steps, const std::string& sync, const std::string& dir,
              const std::string& bucket, int round) {
    std::string name = "mix-" + mode + "-" + std::to_string(round) + ".db";
    std::string sub = dir + "/" + name + ".d";
    fs::create_directories(sub);
    std::string uri = "file:" + sub + "/" + name;
    const bool bottomless = mode != "plain";
    if (bottomless) uri += "?vfs=bottomless&bucket=" + bucket + (mode == "sync" ? "&sync=1" : "");
    if (mode == "enc") uri += "&encryption_key=5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8";

    RunResult res;
    {
        Db db(uri);
        db.exec("PRAGMA journal_mode=wal");
        if (db.text_of("PRAGMA journal_mode") != "wal") die("journal_mode is not wal");
        db.exec("PRAGMA synchronous=" + sync);
        db.exec("CREATE TABLE t1(a INTEGER PRIMARY KEY, b INTEGER, c TEXT);"
                "CREATE INDEX t1b ON t1(b); CREATE INDEX t1c ON t1(c);"
                "CREATE TABLE t2(a INTEGER PRIMARY KEY, b INTEGER, c TEXT);");
        if (bottomless) db.text_of("SELECT bottomless_flush()");
        Rng rng{0x5eed0000ULL + static_cast<uint64_t>(round)};
        for (const auto& st : steps) {
            auto t0 = Clock::now();
            st.body(db, rng);
            res.step_s.push_back(std::chrono::duration<double>(Clock::now() - t0).count());
            res.total_s += res.step_s.back();
        }
        if (bottomless) {
            auto t0 = Clock::now();
            db.text_of("SELECT bottomless_flush()");
            res.flush_s = std::chrono::duration<double>(Clock::now() - t0).count();
        }
        res.digest = db.text_of("SELECT (SELECT count(*) || '/' || total(b) || '/' || total(length(c)) FROM t1) || ' ' || "
                                "(SELECT count(*) || '/' || total(b) || '/' || total(length(c)) FROM t2)");
        if (db.text_of("PRAGMA integrity_check") != "ok") die(mode + ": integrity_check failed");
    }
    std::error_code ec;
    fs::remove_all(sub, ec);
    return res;
}

}  // namespace

int main(int argc, char** argv) {
    bench::program_name() = "mix_bench";
    int size = 500, rounds = 3;
    std::string sync = "FULL", modes_arg = "plain,async";
    bool list = false;
    for (int i = 1; i < argc; ++i) {
        std::string a = argv[i];
        std::string v = i + 1 < argc ? argv[i + 1] : "";
        if (a == "--steps") list = true;
        else if (a == "--size" && !v.empty()) size = std::atoi(argv[++i]);
        else if (a == "--rounds" && !v.empty()) rounds = std::atoi(argv[++i]);
        else if (a == "--sync" && !v.empty()) sync = argv[++i];
        else if (a == "--modes" && !v.empty()) modes_arg = argv[++i];
        else {
            std::printf("usage: mix_bench [--size N=500] [--rounds R=3] [--sync FULL|NORMAL] [--modes plain,async[,enc,sync]] "
                        "[--steps]\n");
            return a == "--help" || a == "-h" ? 0 : 2;
        }
    }
    std::transform(sync.begin(), sync.end(), sync.begin(), ::toupper);
    if (sync != "FULL" && sync != "NORMAL" && sync != "OFF" && sync != "EXTRA") die("--sync takes FULL or NORMAL");
    if (size < 1 || rounds < 1) die("--size and --rounds must be >= 1");
    const auto steps = program(100 * static_cast<int64_t>(size));
    if (list) {
        for (const auto& st : steps) std::printf("%-15s %s\n", st.name.c_str(), st.what.c_str());
        return 0;
    }
    std::vector<std::string> modes = bench::split_list(modes_arg);
    for (const auto& m : modes)
        if (m != "plain" && m != "async" && m != "enc" && m != "sync") die("unknown mode " + m);
    if (std::find(modes.begin(), modes.end(), "plain") == modes.end()) modes.insert(modes.begin(), "plain");

    if (!std::getenv("LIBSQL_BOTTOMLESS_ENDPOINT")) die("LIBSQL_BOTTOMLESS_ENDPOINT is not set (eval \"$(scripts/s3-server.sh env)\")");
    if (bottomless_register(0) != SQLITE_OK) die("cannot register the VFS");
    char tmpl[] = "/tmp/bottomless-mixbench-XXXXXX";
    if (!mkdtemp(tmpl)) die("mkdtemp");
    std::string dir = tmpl;
    std::string bucket = "mixbench-" + std::to_string(::getpid());

    std::map<std::string, std::vector<RunResult>> res;
    auto started = Clock::now();
    for (int round = 0; round < rounds; ++round) {
        std::vector<std::string> order = modes;
        if (round % 2) std::reverse(order.begin(), order.end());
        std::fprintf(stderr, "round %d/%d", round + 1, rounds);
        std::string digest;
        for (const auto& m : order) {
            RunResult r = run(m, steps, sync, dir, bucket, round);
            if (digest.empty()) digest = r.digest;
            else if (r.digest != digest) die("contents differ between modes: " + digest + " vs " + m + " " + r.digest);
            std::fprintf(stderr, "  %s %.2f s", m.c_str(), r.total_s);
            if (r.flush_s >= 0) std::fprintf(stderr, " (+flush %.2f s)", r.flush_s);
            res[m].push_back(std::move(r));
        }
        std::fprintf(stderr, "\n");
    }
    double took = std::chrono::duration<double>(Clock::now() - started).count();

    std::printf("mix_bench: --size %d (%lld-row unit), synchronous=%s, %d round(s) alternating the order of %s; "
                "medians; ratio = plain time / mode time (run took %.0f s)\n\n",
                size, 100LL * size, sync.c_str(), rounds, modes_arg.c_str(), took);
    std::printf("| step | what");
    for (const auto& m : modes) std::printf(" | %s s", m.c_str());
    for (const auto& m : modes)
        if (m != "plain") std::printf(" | %s ratio | (min–max)", m.c_str());
    std::printf(" |\n|---|---");
    for (const auto& m : modes) std::printf("%s", m == "plain" ? "|---" : "|---|---|---");
    std::printf("|\n");
    auto row = [&](const std::string& name, const std::string& what, const std::function<double(const RunResult&)>& get) {
        std::printf("| %s | %s", name.c_str(), what.c_str());
        for (const auto& m : modes) {
            std::vector<double> v;
            for (const auto& r : res[m]) v.push_back(get(r));
            std::printf(" | %.3f", bench::median_measured(v));
        }
        for (const auto& m : modes) {
            if (m == "plain") continue;
            std::vector<double> ratios;
            for (int k = 0; k < rounds; ++k) ratios.push_back(get(res["plain"][k]) / std::max(1e-9, get(res[m][k])));
            std::printf(" | %.2f | %.2f–%.2f", bench::median_measured(ratios),
                        *std::min_element(ratios.begin(), ratios.end()), *std::max_element(ratios.begin(), ratios.end()));
        }
        std::printf(" |\n");
    };
    for (size_t i = 0; i < steps.size(); ++i)
        row(steps[i].name, steps[i].what, [i](const RunResult& r) { return r.step_s[i]; });
    row("**total**", "all of the above", [](const RunResult& r) { return r.total_s; });
    for (const auto& m : modes) {
        if (m == "plain") continue;
        std::vector<double> v;
        for (const auto& r : res[m]) v.push_back(r.flush_s);
        std::printf("\n%s: bottomless_flush() after the program (not in the total): median %.2f s", m.c_str(),
                    bench::median_measured(v));
    }
    std::printf("\n");

    if (auto client = bottomless::s3::Client::from_env()) (void)(*client)->delete_bucket_and_objects(bucket);
    std::error_code ec;
    fs::remove_all(dir, ec);
    return 0;
}
