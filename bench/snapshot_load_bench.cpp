// Snapshot under load (issue 9): does starting a new generation slow down an
// application that is writing as fast as it can?
//
// Builds a database of about --mib MiB (random, incompressible 4 KiB rows;
// written with plain SQLite, then opened through bottomless async, which
// uploads it as the first generation's snapshot, and flushed until durable).
// Then, per round and per synchronous setting (NORMAL, FULL, alternating
// which goes first), one writer thread commits 1-row INSERTs in a loop on
// its own connection while, after --before seconds, another connection runs
// `SELECT bottomless_snapshot()` (a new generation: a full snapshot upload of
// the whole database). Reported per round and as medians:
//   - writer txn/s in the --before seconds before the snapshot and while it
//     ran, and their ratio (goal >= 0.9);
//   - the slowest commit and the p99 commit time before and during it;
//   - how long the snapshot took (and MiB/s of database);
//   - torn attempts: warnings with code "SnapshotTorn" logged while
//     bottomless_snapshot() ran (each is one read of the database thrown
//     away and started again; goal: none), and whether the call succeeded;
//   - the highest pending_bytes / pending_in seen in bottomless_status()
//     (polled every 100 ms) while the snapshot ran.
// With --control 1 (the default) each snapshot round is followed by a
// control round, "<sync>/ctl": the same writer while the plain S3 client
// streams the same database file to the same server (no snapshot, no
// replicator work). On a small machine that also runs the S3 server, moving
// the bytes costs the writer something whoever moves them; the snapshot's
// figures are to be read against the control's.
//
// Usage (server from scripts/s3-server.sh, env from its `env` command):
//   build/bench/snapshot_load_bench [--mib 1024] [--rounds 3] [--before 5] [--sync normal,full]
//                                   [--control 1|0] [--uri-extra '&compression=none']
#include <sqlite3.h>
#include <unistd.h>

#include <atomic>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "bench/bench_support.h"
#include "bottomless.h"
#include "s3/client.h"
#include "s3/log.h"

using namespace bench;
namespace fs = std::filesystem;

namespace {

// Counts the replicator's log lines while the benchmark runs; warnings and
// errors still reach stderr so nothing is hidden.
struct LogCounter {
    std::mutex mu;  // guards the counters below (the sink runs on any thread)
    int torn = 0;
    int generations_started = 0;
    std::vector<std::string> torn_lines;

    void install() {
        bottomless::log::set_level(bottomless::log::Level::Info);
        bottomless::log::set_sink([this](bottomless::log::Level level, std::string_view line) {
            {
                std::lock_guard lock(mu);
                if (line.find("SnapshotTorn") != std::string_view::npos) {
                    ++torn;
                    if (torn_lines.size() < 5) torn_lines.emplace_back(line);
                }
                if (line.find("generation ") != std::string_view::npos &&
                    line.find(" started") != std::string_view::npos)
                    ++generations_started;
            }
            if (level <= bottomless::log::Level::Warn)
                std::fprintf(stderr, "  [bottomless %s] %.*s\n", level == bottomless::log::Level::Error ? "ERROR" : "WARN",
                             static_cast<int>(line.size()), line.data());
        });
    }
    std::pair<int, int> counts() {
        std::lock_guard lock(mu);
        return {torn, generations_started};
    }
};

LogCounter g_log;

struct Commit {
    int64_t end_ns;
    int64_t dur_ns;
};

struct Round {
    std::string sync;
    double before_tps = 0, during_tps = 0;
    double before_max_ms = 0, during_max_ms = 0, during_max_start_s = 0;
    double before_p99_ms = 0, during_p99_ms = 0;
    double snapshot_s = 0;
    int torn = 0;
    int generations = 0;
    bool ok = false;
    std::string error;
    uint64_t peak_pending_bytes = 0;
    std::string pending_in_seen;
    uint64_t snapshots_uploaded_delta = 0;
};

struct Window {
    double tps = 0, max_ms = 0, p99_ms = 0;
    double max_start_s = 0;  // when the slowest commit began, from the window's start
};

Window window(const std::vector<Commit>& commits, int64_t from_ns, int64_t to_ns) {
    Window w;
    std::vector<double> durs;
    for (const Commit& c : commits) {
        // A commit that started inside the window and ended after it still
        // counts towards the slowest commit: it is the stall we look for.
        const bool ends_inside = c.end_ns >= from_ns && c.end_ns < to_ns;
        const bool spans_end = c.end_ns >= to_ns && c.end_ns - c.dur_ns < to_ns;
        if (ends_inside) durs.push_back(static_cast<double>(c.dur_ns) / 1e6);
        if ((ends_inside || spans_end) && static_cast<double>(c.dur_ns) / 1e6 > w.max_ms) {
            w.max_ms = static_cast<double>(c.dur_ns) / 1e6;
            w.max_start_s = static_cast<double>(c.end_ns - c.dur_ns - from_ns) / 1e9;
        }
    }
    w.tps = static_cast<double>(durs.size()) / (static_cast<double>(to_ns - from_ns) / 1e9);
    w.p99_ms = percentile(durs, 0.99);
    return w;
}

// The control: the same bytes sent to the same server by the plain S3
// client (read the database file, one streamed multipart PUT), no snapshot.
// The writer's slowdown under it is what this 2-core machine charges for
// moving the database to a server on the same machine; the snapshot's excess
// over it is the product's.
std::string upload_file(bottomless::s3::Client& client, const std::string& bucket, const std::string& path) {
    auto writer = client.open_writer(bucket, "control/" + std::to_string(mono_ns()));
    std::ifstream in(path, std::ios::binary);
    std::string buf(1 << 20, '\0');
    while (in) {
        in.read(buf.data(), static_cast<std::streamsize>(buf.size()));
        if (in.gcount() <= 0) break;
        if (auto st = writer->write(std::string_view(buf.data(), static_cast<size_t>(in.gcount()))); !st)
            return st.error().describe();
    }
    auto put = writer->finish();
    return put ? "" : put.error().describe();
}

struct Control {
    bottomless::s3::Client* client;
    std::string bucket, path;
};

Round run_round(const std::string& uri, const std::string& sync, double before_s, const Control* control) {
    Round r;
    r.sync = control ? sync + "/ctl" : sync;
    Db ctl = open_db(uri);
    auto st0 = status(ctl.get());

    std::vector<Commit> commits;
    commits.reserve(4'000'000);
    std::atomic<bool> stop{false};
    std::thread writer([&] {
        Db db = open_db(uri);
        exec(db.get(), "PRAGMA synchronous=" + sync);
        Stmt ins = prepare(db.get(), "INSERT INTO w(a, b) VALUES(?1, 'payload-payload-payload-payload-payload-payload')");
        int64_t i = 0;
        while (!stop.load(std::memory_order_relaxed)) {
            sqlite3_bind_int64(ins.get(), 1, ++i);
            const int64_t t0 = mono_ns();
            if (sqlite3_step(ins.get()) != SQLITE_DONE) die(std::string("writer: ") + sqlite3_errmsg(db.get()));
            sqlite3_reset(ins.get());
            const int64_t t1 = mono_ns();
            commits.push_back({t1, t1 - t0});
        }
    });

    // Status poller: how much the replicator holds while the snapshot runs.
    std::atomic<bool> snapping{false}, stop_poll{false};
    std::map<std::string, int> pending_in;
    uint64_t peak_pending = 0;
    std::thread poller([&] {
        Db db = open_db(uri);
        while (!stop_poll.load()) {
            if (snapping.load()) {
                auto j = status(db.get());
                peak_pending = std::max<uint64_t>(peak_pending, j["pending_bytes"].get<uint64_t>());
                ++pending_in[j["pending_in"].get<std::string>()];
            }
            std::this_thread::sleep_for(std::chrono::milliseconds(100));
        }
    });

    // One second to reach a steady state, then the window before.
    std::this_thread::sleep_for(std::chrono::duration<double>(1.0 + before_s));
    auto [torn0, gens0] = g_log.counts();
    snapping.store(true);
    const int64_t s0 = mono_ns();
    std::string err, gen;
    if (control) {
        err = upload_file(*control->client, control->bucket, control->path);
        gen = err.empty() ? "control" : "";
    } else {
        gen = query(ctl.get(), "SELECT bottomless_snapshot()", &err);
    }
    const int64_t s1 = mono_ns();
    snapping.store(false);
    auto [torn1, gens1] = g_log.counts();
    // A little after, so a stall that ends with the snapshot is seen whole.
    std::this_thread::sleep_for(std::chrono::milliseconds(500));
    stop.store(true);
    writer.join();
    stop_poll.store(true);
    poller.join();

    r.ok = err.empty() && !gen.empty();
    r.error = err;
    r.snapshot_s = static_cast<double>(s1 - s0) / 1e9;
    r.torn = torn1 - torn0;
    r.generations = gens1 - gens0;
    Window b = window(commits, s0 - static_cast<int64_t>(before_s * 1e9), s0);
    Window d = window(commits, s0, s1);
    r.before_tps = b.tps;
    r.before_max_ms = b.max_ms;
    r.before_p99_ms = b.p99_ms;
    r.during_tps = d.tps;
    r.during_max_ms = d.max_ms;
    r.during_max_start_s = d.max_start_s;
    r.during_p99_ms = d.p99_ms;
    r.peak_pending_bytes = peak_pending;
    for (const auto& [state, n] : pending_in) r.pending_in_seen += (r.pending_in_seen.empty() ? "" : "/") + state;
    if (r.pending_in_seen.empty()) r.pending_in_seen = "-";
    // Drain what the writer left before the next round's window.
    query(ctl.get(), "SELECT bottomless_flush(300000)");
    auto st1 = status(ctl.get());
    r.snapshots_uploaded_delta = st1["snapshots_uploaded"].get<uint64_t>() - st0["snapshots_uploaded"].get<uint64_t>();
    if (control) r.generations = 1, r.snapshots_uploaded_delta = 1;  // no snapshot asked for
    return r;
}

}  // namespace

int main(int argc, char** argv) {
    program_name() = "snapshot_load_bench";
    int mib = 1024, rounds = 3;
    double before_s = 5;
    std::string syncs = "normal,full";
    std::string extra;  // more URI parameters, e.g. "&compression=none"
    bool with_control = true;
    for (int i = 1; i + 1 < argc; i += 2) {
        std::string a = argv[i];
        if (a == "--mib") mib = std::atoi(argv[i + 1]);
        else if (a == "--rounds") rounds = std::atoi(argv[i + 1]);
        else if (a == "--before") before_s = std::atof(argv[i + 1]);
        else if (a == "--sync") syncs = argv[i + 1];
        else if (a == "--uri-extra") extra = argv[i + 1];
        else if (a == "--control") with_control = std::atoi(argv[i + 1]) != 0;
        else die("unknown option " + a + " (--mib N --rounds R --before S --sync normal,full --control 1|0 --uri-extra '&k=v')");
    }
    std::vector<std::string> sync_modes = split_list(syncs);
    if (mib < 1 || rounds < 1 || before_s <= 0 || sync_modes.empty()) die("bad arguments");
    if (!std::getenv("LIBSQL_BOTTOMLESS_ENDPOINT"))
        die("LIBSQL_BOTTOMLESS_ENDPOINT is not set (eval \"$(scripts/s3-server.sh env)\")");
    g_log.install();
    if (bottomless_register(0) != SQLITE_OK) die("cannot register the VFS");
    char tmpl[] = "/tmp/bottomless-slbench-XXXXXX";
    if (!mkdtemp(tmpl)) die("mkdtemp");
    const std::string dir = tmpl;
    const std::string bucket = "slbench-" + std::to_string(::getpid());
    const std::string path = dir + "/big.db";

    // ---- the database: rows written with plain SQLite (fast), then opened
    // through bottomless, whose first generation uploads it ----
    auto t_build = std::chrono::steady_clock::now();
    {
        Db db = open_db("file:" + path);
        exec(db.get(), "PRAGMA journal_mode=wal; PRAGMA synchronous=OFF;"
                       "CREATE TABLE big(id INTEGER PRIMARY KEY, b BLOB);"
                       "CREATE TABLE w(id INTEGER PRIMARY KEY, a INTEGER, b TEXT);");
        const int rows = mib * 256;  // ~4 KiB each
        for (int done = 0; done < rows; done += 2000)
            exec(db.get(), "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM n WHERE i<" +
                               std::to_string(std::min(2000, rows - done)) +
                               ") INSERT INTO big(b) SELECT randomblob(4000) FROM n;");
        exec(db.get(), "PRAGMA wal_checkpoint(TRUNCATE)");
    }
    const double db_mib = static_cast<double>(fs::file_size(path)) / (1 << 20);
    const double build_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_build).count();
    // snapshot_after_bytes=0: the only new generations are the ones this
    // benchmark asks for.
    const std::string uri = "file:" + path + "?vfs=bottomless&bucket=" + bucket +
                            "&database_id=snapload&snapshot_after_bytes=0&log=info" + extra;
    auto t_first = std::chrono::steady_clock::now();
    Db keep = open_db(uri);  // holds the replicator for the whole run
    query(keep.get(), "SELECT bottomless_flush(900000)");
    const double first_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_first).count();
    std::printf("# snapshot under load: %.0f MiB database (built in %.1f s), first generation durable %.1f s after "
                "open (%.0f MiB/s)\n",
                db_mib, build_s, first_s, db_mib / first_s);
    std::printf("# %d round(s); writer: 1-row INSERT transactions in a loop; window before = %.1f s\n", rounds,
                before_s);
    std::printf("%-5s %-9s %9s %9s %6s %9s %9s %9s %9s %8s %6s %5s %4s %11s %s\n", "round", "sync", "before/s",
                "during/s", "ratio", "p99 bef", "p99 dur", "max bef", "max dur", "snap s", "MiB/s", "torn", "ok",
                "peak pend", "pend in");

    std::unique_ptr<bottomless::s3::Client> client;
    Control control{nullptr, bucket, path};
    if (with_control) {
        auto c = bottomless::s3::Client::from_env();
        if (!c) die(c.error().describe());
        client = std::move(*c);
        control.client = client.get();
    }
    std::map<std::string, std::vector<Round>> results;
    for (int round = 0; round < rounds; ++round) {
        for (size_t k = 0; k < sync_modes.size(); ++k) {
            const std::string& sync = sync_modes[(round + k) % sync_modes.size()];  // alternate who goes first
            for (int variant = 0; variant < (with_control ? 2 : 1); ++variant) {
                ::sync();
                Round r = run_round(uri, sync, before_s, variant == 1 ? &control : nullptr);
                std::printf("%-5d %-9s %9.0f %9.0f %6.2f %7.2fms %7.2fms %7.1fms %7.1fms %8.2f %6.0f %5d %4s %8.1fMiB %s\n",
                            round + 1, r.sync.c_str(), r.before_tps, r.during_tps, r.during_tps / r.before_tps,
                            r.before_p99_ms, r.during_p99_ms, r.before_max_ms, r.during_max_ms, r.snapshot_s,
                            db_mib / r.snapshot_s, r.torn, r.ok ? "yes" : "NO", r.peak_pending_bytes / 1048576.0,
                            r.pending_in_seen.c_str());
                if (r.during_max_ms > 100)
                    std::printf("      slowest commit during it began %.2f s after the start (of %.2f s)\n",
                                r.during_max_start_s, r.snapshot_s);
                if (!r.ok) std::printf("      %s failed: %s\n", variant ? "control upload" : "snapshot", r.error.c_str());
                if (r.generations != 1 || r.snapshots_uploaded_delta != 1)
                    std::printf("      note: %d 'generation ... started' log line(s) during the call; "
                                "snapshots_uploaded +%llu by the end of the round (after bottomless_flush)\n",
                                r.generations, static_cast<unsigned long long>(r.snapshots_uploaded_delta));
                std::fflush(stdout);
                results[r.sync].push_back(r);
            }
        }
    }
    std::printf("# medians over %d round(s)\n", rounds);
    std::printf("%-9s %9s %9s %6s %9s %9s %8s %10s %s\n", "sync", "before/s", "during/s", "ratio", "max bef",
                "max dur", "snap s", "torn (all)", "failed");
    for (const auto& [sync, rs] : results) {
        std::vector<double> b, d, ratio, mb, md, s;
        int torn = 0, failed = 0;
        for (const Round& r : rs) {
            b.push_back(r.before_tps);
            d.push_back(r.during_tps);
            ratio.push_back(r.during_tps / r.before_tps);
            mb.push_back(r.before_max_ms);
            md.push_back(r.during_max_ms);
            s.push_back(r.snapshot_s);
            torn += r.torn;
            failed += r.ok ? 0 : 1;
        }
        std::printf("%-9s %9.0f %9.0f %6.2f %7.1fms %7.1fms %8.2f %10d %d\n", sync.c_str(), median(b), median(d),
                    median(ratio), median(mb), median(md), median(s), torn, failed);
    }
    {
        std::lock_guard lock(g_log.mu);
        for (const std::string& l : g_log.torn_lines) std::printf("# torn: %s\n", l.c_str());
    }

    keep.reset();
    bottomless::log::set_sink(nullptr);
    if (auto client = bottomless::s3::Client::from_env()) (void)(*client)->delete_bucket_and_objects(bucket);
    std::error_code ec;
    fs::remove_all(dir, ec);
    return 0;
}
