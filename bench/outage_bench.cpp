// Outage under load (issue 9): S3 becomes unreachable for a minute while the
// application writes at a steady rate. Does the application notice?
//
// The replicator talks to the real S3 server through the test fault proxy
// (tests/support/fault_proxy.h). One writer commits 1-row INSERTs paced at
// --rate per second (open loop: a late commit does not move the schedule, so
// a stall shows as lateness, not as a lower target), synchronous=NORMAL by
// default so a commit measures bottomless rather than the disk's fsync.
// After --warmup seconds every request the proxy sees gets --fault for
// --outage seconds:
//   reset  the connection is reset as soon as the request arrives (S3 refuses);
//   stall  the request is read and never answered until the outage ends (S3 hangs).
// Then the proxy forwards again and the writer goes on for --after seconds,
// stops, and bottomless_flush() waits for the rest. Reported per fault:
//   - writer txn/s before, during and after the outage, the ratio to before
//     (goal >= 0.9), mean/p99/max commit time and the latest a commit
//     started against its schedule; commit times by pending_in state
//     (memory: staged in memory; wal: past max_pending_bytes, left in the WAL);
//   - memory (sampled every 100 ms), against max_pending_bytes, during the
//     outage and including the catch-up: what the replicator says it holds
//     (bottomless_status memory_bytes, and its own high-water mark
//     memory_peak_bytes), the allocator's bytes in use (mallinfo2: live
//     blocks, whoever owns them) and the heap's resident growth (RssAnon:
//     also freed memory the allocator keeps); RSS; the highest
//     pending_bytes (unshipped, in memory or WAL) and WAL size;
//   - catch-up: seconds from the server's return until every transaction
//     committed before the return is durable (last_durable_commit_us passes
//     the return instant; goal <= 30 s), and how long the final flush took;
//   - restore: the bucket restored with restore_database() into a new file
//     and compared to the local database row by row (content_checksum) and
//     by row count against the commits that returned OK.
//
// Usage (server from scripts/s3-server.sh, env from its `env` command):
//   build/bench/outage_bench [--rate 1000] [--warmup 10] [--outage 60] [--after 30]
//                            [--fault reset,stall] [--sync normal|full] [--max-pending-mib N]
#include <malloc.h>
#include <sqlite3.h>
#include <unistd.h>

#include <atomic>
#include <filesystem>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "bench/bench_support.h"
#include "bottomless.h"
#include "replicator/restore.h"
#include "s3/client.h"
#include "s3/log.h"
#include "support/fault_proxy.h"

using namespace bench;
using bottomless::testing::Fault;
using bottomless::testing::FaultProxy;
namespace fs = std::filesystem;

namespace {

constexpr uint64_t kDefaultMaxPendingBytes = 64ull << 20;  // docs/CONFIG.md, max_pending_bytes

// An outage makes the client and the replicator warn at every failed
// attempt: the first few lines of each run go to stderr, the rest are counted.
std::atomic<int> g_log_lines{0};
constexpr int kLogLinesShown = 4;

void install_log_sink() {
    bottomless::log::set_sink([](bottomless::log::Level level, std::string_view line) {
        if (g_log_lines.fetch_add(1) < kLogLinesShown)
            std::fprintf(stderr, "  [bottomless %s] %.*s\n", level == bottomless::log::Level::Error ? "ERROR" : "WARN",
                         static_cast<int>(line.size()), line.data());
    });
}

struct Commit {
    int64_t end_ns;
    int64_t dur_ns;
    int64_t late_ns;  // start - scheduled start
};

struct Sample {
    int64_t t_ns;
    uint64_t pending_bytes, pending_transactions, wal_bytes;
    int64_t last_durable_commit_us, lag_ms;
    std::string pending_in;
    long rss_kib, anon_kib, file_kib;  // VmRSS, RssAnon (heap: what the replicator holds), RssFile (mapped files)
    uint64_t memory_bytes;             // bottomless_status: what the replicator holds for unshipped frames
    uint64_t inuse_bytes;              // the allocator's live bytes (all arenas, mmapped blocks included)
};

// Bytes the C library's allocator has handed out and not got back (glibc).
uint64_t heap_in_use() {
    struct mallinfo2 m = mallinfo2();
    return m.uordblks + m.hblkhd;
}

struct Options {
    double rate = 1000, warmup = 10, outage = 60, after = 30;
    std::string sync = "normal";  // the writer's PRAGMA synchronous
    uint64_t max_pending = 0;  // 0: the product's default
};

struct Phase {
    double tps = 0, mean_ms = 0, max_ms = 0, p99_ms = 0, late_max_ms = 0;
};

Phase phase(const std::vector<Commit>& commits, int64_t from_ns, int64_t to_ns) {
    Phase p;
    std::vector<double> durs;
    for (const Commit& c : commits) {
        if (c.end_ns < from_ns || c.end_ns >= to_ns) continue;
        durs.push_back(static_cast<double>(c.dur_ns) / 1e6);
        p.late_max_ms = std::max(p.late_max_ms, static_cast<double>(c.late_ns) / 1e6);
    }
    p.tps = static_cast<double>(durs.size()) / (static_cast<double>(to_ns - from_ns) / 1e9);
    if (!durs.empty()) {
        p.max_ms = *std::max_element(durs.begin(), durs.end());
        for (double d : durs) p.mean_ms += d / static_cast<double>(durs.size());
    }
    p.p99_ms = percentile(durs, 0.99);
    return p;
}

std::string fault_name_check(const std::string& f) {
    if (f != "reset" && f != "stall") die("unknown fault '" + f + "' (reset or stall)");
    return f;
}

// Returns false when the restored database differs from the local one.
bool run(const std::string& fault, const Options& o, const std::string& dir, const std::string& bucket,
         const std::string& upstream_host, int upstream_port) {
    FaultProxy proxy(upstream_host, upstream_port);
    g_log_lines.store(0);
    const std::string db_id = "outage-" + fault;
    const std::string path = dir + "/" + db_id + ".db";
    std::string uri = "file:" + path + "?vfs=bottomless&bucket=" + bucket + "&database_id=" + db_id +
                      "&endpoint=" + proxy.url();
    if (o.max_pending) uri += "&max_pending_bytes=" + std::to_string(o.max_pending);
    const uint64_t cap = o.max_pending ? o.max_pending : kDefaultMaxPendingBytes;

    Db ctl = open_db(uri);
    exec(ctl.get(), "PRAGMA journal_mode=wal; CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, at INTEGER, b TEXT);");
    query(ctl.get(), "SELECT bottomless_flush(60000)");

    std::vector<Commit> commits;
    commits.reserve(static_cast<size_t>(o.rate * (o.warmup + o.outage + o.after + 10)));
    std::atomic<bool> stop{false};
    std::atomic<uint64_t> ok{0}, failed{0};
    std::string first_failure;  // written by the writer only; read after join
    const int64_t t_start = mono_ns();
    std::thread writer([&] {
        Db db = open_db(uri);
        exec(db.get(), "PRAGMA synchronous=" + o.sync);
        Stmt ins = prepare(db.get(), "INSERT INTO t(id, at, b) VALUES(?1, ?2, 'payload-payload-payload-payload-payload')");
        const double period_ns = 1e9 / o.rate;
        for (int64_t n = 0; !stop.load(std::memory_order_relaxed); ++n) {
            const int64_t due = t_start + static_cast<int64_t>(static_cast<double>(n) * period_ns);
            int64_t now = mono_ns();
            if (now < due) {
                std::this_thread::sleep_for(std::chrono::nanoseconds(due - now));
                now = mono_ns();
            }
            sqlite3_bind_int64(ins.get(), 1, n + 1);
            sqlite3_bind_int64(ins.get(), 2, wall_us());
            int rc = sqlite3_step(ins.get());
            sqlite3_reset(ins.get());
            const int64_t end = mono_ns();
            if (rc == SQLITE_DONE) {
                ok.fetch_add(1);
                commits.push_back({end, end - now, now - due});
            } else {
                if (failed.fetch_add(1) == 0) first_failure = sqlite3_errmsg(db.get());
            }
        }
    });

    std::vector<Sample> samples;  // written by the monitor only; read after join
    std::atomic<bool> stop_monitor{false};
    std::string outage_error;  // last_error seen while S3 was away (monitor only)
    std::atomic<bool> in_outage{false};
    std::thread monitor([&] {
        Db db = open_db(uri);
        while (!stop_monitor.load()) {
            auto j = status(db.get());
            samples.push_back({mono_ns(), j["pending_bytes"].get<uint64_t>(), j["pending_transactions"].get<uint64_t>(),
                               j["wal_bytes"].get<uint64_t>(), j["last_durable_commit_us"].get<int64_t>(),
                               j["lag_ms"].get<int64_t>(), j["pending_in"].get<std::string>(),
                               proc_status_kib("VmRSS"), proc_status_kib("RssAnon"), proc_status_kib("RssFile"),
                               j.value("memory_bytes", uint64_t{0}), heap_in_use()});
            if (in_outage.load() && j["last_error"].is_string()) outage_error = j["last_error"].get<std::string>();
            std::this_thread::sleep_for(std::chrono::milliseconds(100));
        }
    });

    std::this_thread::sleep_for(std::chrono::duration<double>(o.warmup));
    auto st_before = status(ctl.get());
    const long rss_before = proc_status_kib("VmRSS"), anon_before = proc_status_kib("RssAnon");
    const uint64_t inuse_before = heap_in_use();
    const int64_t t_out = mono_ns();
    const int64_t out_ns = static_cast<int64_t>(o.outage * 1e9);
    in_outage.store(true);
    if (fault == "reset") {
        proxy.inject_always(Fault::ResetBeforeRequest);
        std::this_thread::sleep_for(std::chrono::nanoseconds(out_ns));
    } else {
        // A stalled request hangs for the stall time given when it arrived:
        // keep that time equal to what is left of the outage, so no request
        // hangs past the server's return.
        proxy.set_stall_ms(static_cast<int>(o.outage * 1000));
        proxy.inject_always(Fault::Stall);
        for (int64_t now = mono_ns(); now < t_out + out_ns; now = mono_ns()) {
            proxy.set_stall_ms(static_cast<int>(std::max<int64_t>(1, (t_out + out_ns - now) / 1'000'000)));
            std::this_thread::sleep_for(std::chrono::milliseconds(50));
        }
    }
    proxy.clear();
    const int64_t t_back = mono_ns();
    const int64_t wall_back = wall_us();
    in_outage.store(false);
    const int faults = proxy.faults_injected();

    std::this_thread::sleep_for(std::chrono::duration<double>(o.after));
    stop.store(true);
    writer.join();
    const int64_t t_stop = mono_ns();
    std::string flush_err;
    query(ctl.get(), "SELECT bottomless_flush(300000)", &flush_err);
    const int64_t t_flushed = mono_ns();
    stop_monitor.store(true);
    monitor.join();
    auto st_end = status(ctl.get());

    // ---- figures ----
    const int64_t warm_from = t_start + std::min<int64_t>(static_cast<int64_t>(1e9), static_cast<int64_t>(o.warmup * 5e8));
    Phase before = phase(commits, warm_from, t_out);
    Phase during = phase(commits, t_out, t_back);
    Phase after = phase(commits, t_back, t_stop);
    uint64_t peak_pending = 0, peak_wal = 0, peak_memory = 0, peak_memory_outage = 0, peak_inuse = 0,
             peak_inuse_outage = 0;
    long peak_rss = 0, peak_anon = 0, peak_file = 0, peak_anon_outage = 0;
    std::map<std::string, int> pending_in;
    double caught_up_s = -1;
    for (const Sample& s : samples) {
        if (s.t_ns < t_out) continue;
        peak_pending = std::max(peak_pending, s.pending_bytes);
        peak_wal = std::max(peak_wal, s.wal_bytes);
        peak_rss = std::max(peak_rss, s.rss_kib);
        peak_anon = std::max(peak_anon, s.anon_kib);
        if (s.t_ns < t_back) peak_anon_outage = std::max(peak_anon_outage, s.anon_kib);
        peak_memory = std::max(peak_memory, s.memory_bytes);
        peak_inuse = std::max(peak_inuse, s.inuse_bytes);
        if (s.t_ns < t_back) {
            peak_memory_outage = std::max(peak_memory_outage, s.memory_bytes);
            peak_inuse_outage = std::max(peak_inuse_outage, s.inuse_bytes);
        }
        peak_file = std::max(peak_file, s.file_kib);
        ++pending_in[s.pending_in];
        if (caught_up_s < 0 && s.t_ns >= t_back && s.last_durable_commit_us >= wall_back)
            caught_up_s = static_cast<double>(s.t_ns - t_back) / 1e9;
    }
    std::string states;
    for (const auto& [state, n] : pending_in) states += (states.empty() ? "" : ", ") + state + " " + std::to_string(n);

    std::printf("## fault: %s (%d requests faulted), %.0f txn/s target, synchronous=%s, warm-up %.0f s, outage %.0f s, "
                "after %.0f s\n",
                fault.c_str(), faults, o.rate, o.sync.c_str(), o.warmup, o.outage, o.after);
    std::printf("%-8s %9s %6s %9s %9s %9s %10s\n", "phase", "txn/s", "ratio", "mean", "p99", "max", "late max");
    auto row = [&](const char* name, const Phase& p) {
        std::printf("%-8s %9.0f %6.2f %7.3fms %7.2fms %7.1fms %8.1fms\n", name, p.tps, p.tps / before.tps, p.mean_ms,
                    p.p99_ms, p.max_ms, p.late_max_ms);
    };
    row("before", before);
    row("outage", during);
    row("after", after);
    std::printf("commits: %llu ok, %llu failed%s%s\n", static_cast<unsigned long long>(ok.load()),
                static_cast<unsigned long long>(failed.load()), failed.load() ? ": first: " : "",
                first_failure.c_str());
    // pending_bytes counts every unshipped byte, in memory or left in the
    // WAL. What memory holds shows in the process's anonymous RSS (heap),
    // compared to the cap by its growth; RssFile is mapped files (the
    // wal-index, file pages read through a mapping), which the kernel can drop.
    const double mib = 1048576.0;
    const uint64_t peak_reported = st_end.value("memory_peak_bytes", uint64_t{0});
    std::printf("memory held (bottomless_status memory_bytes) peak %.1f MiB in the outage, %.1f MiB with catch-up; "
                "memory_peak_bytes %.1f MiB; max_pending_bytes %.0f MiB: %s\n",
                peak_memory_outage / mib, peak_memory / mib, peak_reported / mib, cap / mib,
                std::max(peak_memory, peak_reported) <= cap ? "within" : "OVER");
    std::printf("heap in use (mallinfo2) %.1f MiB before, growth +%.1f MiB in the outage, +%.1f MiB with catch-up: "
                "%s\n",
                inuse_before / mib, (static_cast<double>(peak_inuse_outage) - inuse_before) / mib,
                (static_cast<double>(peak_inuse) - inuse_before) / mib,
                peak_inuse <= inuse_before + cap ? "within" : "OVER");
    const double anon_growth_mib = (peak_anon - anon_before) / 1024.0;
    std::printf("memory: RSS %.1f MiB before, peak %.1f MiB during/after; heap (RssAnon) %.1f -> peak %.1f MiB "
                "(+%.1f MiB; max_pending_bytes %.0f MiB: %s; peak during the outage itself %.1f MiB); RssFile peak "
                "%.1f MiB; VmHWM %.1f MiB\n",
                rss_before / 1024.0, peak_rss / 1024.0, anon_before / 1024.0, peak_anon / 1024.0, anon_growth_mib,
                cap / 1048576.0, anon_growth_mib <= cap / 1048576.0 ? "within" : "OVER", peak_anon_outage / 1024.0,
                peak_file / 1024.0, proc_status_kib("VmHWM") / 1024.0);
    std::printf("unshipped (pending_bytes, in memory or WAL) peak %.1f MiB; WAL file peak %.1f MiB; pending_in "
                "samples: %s\n",
                peak_pending / 1048576.0, peak_wal / 1048576.0, states.c_str());
    // Commit times by where unshipped frames waited when the commit ended
    // (the sample just before it), from the outage on: the cost of each state.
    std::map<std::string, std::vector<double>> by_state;
    for (const Commit& c : commits) {
        if (c.end_ns < t_out || c.end_ns >= t_stop) continue;
        auto it = std::upper_bound(samples.begin(), samples.end(), c.end_ns,
                                   [](int64_t t, const Sample& s) { return t < s.t_ns; });
        if (it == samples.begin()) continue;
        by_state[std::prev(it)->pending_in].push_back(static_cast<double>(c.dur_ns) / 1e6);
    }
    for (auto& [state, durs] : by_state) {
        double mean = 0;
        for (double d : durs) mean += d / static_cast<double>(durs.size());
        std::printf("commits from the outage on while pending_in=%s: %zu, mean %.3f ms, p99 %.2f ms, max %.1f ms\n",
                    state.c_str(), durs.size(), mean, percentile(durs, 0.99),
                    *std::max_element(durs.begin(), durs.end()));
    }
    std::printf("S3 while away: %d log line(s) (first %d on stderr); last_error %s\n", g_log_lines.load(), kLogLinesShown,
                outage_error.empty() ? "(none seen)" : outage_error.c_str());
    std::printf("S3 requests: %llu before the outage, %llu by the end (retries %llu -> %llu)\n",
                st_before["requests"].get<unsigned long long>(), st_end["requests"].get<unsigned long long>(),
                st_before["retries"].get<unsigned long long>(), st_end["retries"].get<unsigned long long>());
    if (caught_up_s >= 0)
        std::printf("catch-up: everything committed before the return durable %.1f s after it\n", caught_up_s);
    else
        std::printf("catch-up: NOT within the %.0f s after the return (writer still running)\n", o.after);
    std::printf("final flush after the writer stopped: %.2f s%s%s; pending_transactions %llu\n",
                static_cast<double>(t_flushed - t_stop) / 1e9, flush_err.empty() ? "" : ", FAILED: ", flush_err.c_str(),
                st_end["pending_transactions"].get<unsigned long long>());

    // ---- restore and compare ----
    auto client = bottomless::s3::Client::from_env();
    if (!client) die(client.error().describe());
    const std::string restored = dir + "/" + db_id + "-restored.db";
    auto t_r = std::chrono::steady_clock::now();
    auto res = bottomless::replicator::restore_database(**client, bucket, db_id, restored);
    const double restore_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_r).count();
    if (!res) {
        std::printf("restore: FAILED: %s\n", res.error().describe().c_str());
        return false;
    }
    const std::string local = content_checksum(ctl.get());
    std::string copy;
    {
        Db r = open_db("file:" + restored + "?mode=ro", SQLITE_OPEN_READONLY);
        copy = content_checksum(r.get());
    }
    const std::string rows_local = query(ctl.get(), "SELECT count(*) FROM t");
    const bool same = local == copy;
    const bool all_rows = rows_local == std::to_string(ok.load());
    std::printf("restore: %.2f s, generation %s, %llu segment(s) applied; content %s (local %s, restored %s); rows "
                "%s = commits OK %llu: %s\n",
                restore_s, res->generation.c_str(), static_cast<unsigned long long>(res->seq),
                same ? "IDENTICAL" : "DIFFERS", local.substr(0, 16).c_str(), copy.substr(0, 16).c_str(),
                rows_local.c_str(), static_cast<unsigned long long>(ok.load()), all_rows ? "yes" : "NO");
    std::fflush(stdout);
    return same && all_rows && flush_err.empty();
}

}  // namespace

int main(int argc, char** argv) {
    program_name() = "outage_bench";
    Options o;
    std::string faults = "reset,stall";
    for (int i = 1; i + 1 < argc; i += 2) {
        std::string a = argv[i];
        if (a == "--rate") o.rate = std::atof(argv[i + 1]);
        else if (a == "--warmup") o.warmup = std::atof(argv[i + 1]);
        else if (a == "--outage") o.outage = std::atof(argv[i + 1]);
        else if (a == "--after") o.after = std::atof(argv[i + 1]);
        else if (a == "--fault") faults = argv[i + 1];
        else if (a == "--sync") o.sync = argv[i + 1];
        else if (a == "--max-pending-mib") o.max_pending = std::strtoull(argv[i + 1], nullptr, 10) << 20;
        else die("unknown option " + a);
    }
    if (o.rate <= 0 || o.warmup < 2 || o.outage <= 0 || o.after < 0) die("bad arguments (--warmup must be >= 2)");
    const char* endpoint = std::getenv("LIBSQL_BOTTOMLESS_ENDPOINT");
    if (!endpoint) die("LIBSQL_BOTTOMLESS_ENDPOINT is not set (eval \"$(scripts/s3-server.sh env)\")");
    std::string host;
    int port = 0;
    if (!split_endpoint(endpoint, host, port)) die(std::string("cannot take host:port from ") + endpoint);
    install_log_sink();
    if (bottomless_register(0) != SQLITE_OK) die("cannot register the VFS");
    char tmpl[] = "/tmp/bottomless-obench-XXXXXX";
    if (!mkdtemp(tmpl)) die("mkdtemp");
    const std::string dir = tmpl;
    const std::string bucket = "obench-" + std::to_string(::getpid());
    auto client = bottomless::s3::Client::from_env();
    if (!client) die(client.error().describe());
    if (auto st = (*client)->create_bucket(bucket); !st) die("create bucket: " + st.error().describe());

    bool all_ok = true;
    size_t start = 0;
    while (start < faults.size()) {
        size_t comma = faults.find(',', start);
        if (comma == std::string::npos) comma = faults.size();
        all_ok = run(fault_name_check(faults.substr(start, comma - start)), o, dir, bucket, host, port) && all_ok;
        start = comma + 1;
    }
    (void)(*client)->delete_bucket_and_objects(bucket);
    bottomless::log::set_sink(nullptr);
    std::error_code ec;
    fs::remove_all(dir, ec);
    return all_ok ? 0 : 2;
}
