// Incremental restore against a full restore of the same state (issue 15):
// a database of about --mib MiB (rows of 4000 random bytes: one row per
// 4 KiB page) replicated through the VFS as one snapshot; then, each round,
// --percent % of its pages are rewritten in 10 transactions shipped as 10
// segments, and the older local copy is brought up to date with
// restore_database(incremental) while a full restore_database() of the same
// state is timed beside it. The two results must be byte-identical.
// Prints medians of time and bytes downloaded, and the ratios.
//   --across: each round ends with a new generation (bottomless_snapshot()),
//             so the copy is one generation behind: the page index path
//   --pattern scattered (every 100/P-th row, default) | clustered (a run of
//             adjacent rows, as an application updating a range does)
//
// Usage (server from scripts/s3-server.sh, env from its `env` command):
//   build/bench/incremental_bench [--mib N] [--rounds R] [--percent P] [--parallel J] [--via wal|copy]
//                                 [--across] [--pattern scattered|clustered]
#include <sqlite3.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include "bench_support.h"
#include "bottomless.h"
#include "replicator/restore.h"
#include "s3/client.h"

using namespace bottomless;
using bench::die;

namespace {

// Each timed step starts from a quiet disk.
void settle() {
    ::sync();
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
}

bool same_bytes(const std::string& a, const std::string& b) {
    std::ifstream fa(a, std::ios::binary), fb(b, std::ios::binary);
    std::vector<char> ba(1 << 20), bb(1 << 20);
    for (;;) {
        fa.read(ba.data(), static_cast<std::streamsize>(ba.size()));
        fb.read(bb.data(), static_cast<std::streamsize>(bb.size()));
        if (fa.gcount() != fb.gcount()) return false;
        if (fa.gcount() == 0) return true;
        if (!std::equal(ba.begin(), ba.begin() + fa.gcount(), bb.begin())) return false;
    }
}

}  // namespace

int main(int argc, char** argv) {
    bench::program_name() = "incremental_bench";
    int mib = 100, rounds = 3, parallel = 4;
    double percent = 1.0;
    bool via_copy = false;  // --via copy: onto a duplicate of the file instead of through a WAL journal
    bool across = false, clustered = false;
    const char* usage =
        "usage: incremental_bench [--mib N] [--rounds R] [--percent P] [--parallel J] [--via wal|copy] [--across] "
        "[--pattern scattered|clustered]";
    for (int i = 1; i < argc; ++i) {
        std::string a = argv[i];
        if (a == "--across") {
            across = true;
            continue;
        }
        if (i + 1 >= argc) die(usage);
        if (a == "--mib") mib = std::atoi(argv[++i]);
        else if (a == "--rounds") rounds = std::atoi(argv[++i]);
        else if (a == "--percent") percent = std::atof(argv[++i]);
        else if (a == "--parallel") parallel = std::atoi(argv[++i]);
        else if (a == "--via") via_copy = std::string(argv[++i]) == "copy";
        else if (a == "--pattern") clustered = std::string(argv[++i]) == "clustered";
        else die(usage);
    }
    if (!std::getenv("LIBSQL_BOTTOMLESS_ENDPOINT"))
        die("LIBSQL_BOTTOMLESS_ENDPOINT is not set (eval \"$(scripts/s3-server.sh env)\")");
    if (bottomless_register(0) != SQLITE_OK) die("cannot register the VFS");
    char tmpl[] = "/tmp/bottomless-ibench-XXXXXX";
    if (!mkdtemp(tmpl)) die("mkdtemp");
    const std::string dir = tmpl, bucket = "ibench-" + std::to_string(::getpid());
    const std::string copy = dir + "/copy.db", full = dir + "/full.db";

    // ---- the database: one snapshot of `rows` pages ----
    const int rows = mib * 256;
    auto w = bench::open_db("file:" + dir + "/app.db?vfs=bottomless&bucket=" + bucket + "&batch_interval_ms=3600000");
    bench::exec(w.get(), "PRAGMA journal_mode=wal");
    bench::exec(w.get(), "CREATE TABLE t(id INTEGER PRIMARY KEY, b BLOB)");
    for (int done = 0; done < rows; done += 2000)
        bench::exec(w.get(), "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM n WHERE i<" +
                                 std::to_string(std::min(2000, rows - done)) +
                                 ") INSERT INTO t(b) SELECT randomblob(4000) FROM n");
    (void)bench::query(w.get(), "SELECT bottomless_flush(600000)");
    (void)bench::query(w.get(), "SELECT bottomless_snapshot()");

    auto client_r = s3::Client::from_env();
    if (!client_r) die(client_r.error().describe());
    s3::Client& client = **client_r;
    replicator::RestoreOptions opt;
    opt.parallel = parallel;
    auto restore_full = [&](const std::string& path) {
        std::filesystem::remove(path);
        std::filesystem::remove(path + "-bottomless");
        settle();
        auto r = replicator::restore_database(client, bucket, "app.db", path, opt);
        if (!r) die("full restore: " + r.error().describe());
        return *r;
    };

    // Every `stride`-th row, in 10 transactions (10 segments): `percent` % of the pages.
    const int stride = std::max(1, static_cast<int>(100.0 / percent));
    std::vector<double> t_full, t_inc, t_copy;
    std::vector<double> b_full, b_inc;
    auto r0 = restore_full(copy);
    t_full.push_back(r0.seconds);
    b_full.push_back(static_cast<double>(r0.bytes_downloaded));
    std::string via;
    uint64_t changed_pages = 0;
    for (int round = 1; round <= rounds; ++round) {
        changed_pages = 0;
        // Clustered: rows [start, start + rows/stride), a different run each round.
        const int run = std::max(1, rows / stride), start = 1 + (round * 7919) % std::max(1, rows - run);
        for (int k = 0; k < 10; ++k) {
            const int step = stride * 10;
            const std::string where =
                clustered ? "id >= " + std::to_string(start + k * run / 10) + " AND id < " +
                                std::to_string(start + (k + 1) * run / 10)
                          : "id % " + std::to_string(step) + " = " + std::to_string((k * stride + round) % step);
            bench::exec(w.get(), "UPDATE t SET b = randomblob(4000) WHERE " + where);
            changed_pages += static_cast<uint64_t>(sqlite3_changes(w.get()));
            (void)bench::query(w.get(), "SELECT bottomless_flush(600000)");
        }
        if (across) {  // a new generation: the copy's is now its parent
            (void)bench::query(w.get(), "SELECT bottomless_snapshot()");
            (void)bench::query(w.get(), "SELECT bottomless_flush(600000)");
        }
        settle();
        replicator::RestoreOptions io = opt;
        io.incremental = true;
        io.incremental_copy = via_copy;
        auto ri = replicator::restore_database(client, bucket, "app.db", copy, io);
        if (!ri) die("incremental restore: " + ri.error().describe());
        if (ri->incremental != (across ? "pages" : "segments")) die("incremental restore did '" + ri->incremental + "': " + ri->incremental_reason);
        t_inc.push_back(ri->seconds);
        t_copy.push_back(ri->timings.copy);
        b_inc.push_back(static_cast<double>(ri->bytes_downloaded));
        via = ri->applied_via;
        auto rf = restore_full(full);
        t_full.push_back(rf.seconds);
        b_full.push_back(static_cast<double>(rf.bytes_downloaded));
        if (!same_bytes(copy, full)) die("round " + std::to_string(round) + ": the incremental result differs from the full restore");
        const auto& tm = ri->timings;
        std::fprintf(stderr,
                     "round %d: incremental %.3f s (copy %.3f, compare %.3f, download %.3f, wait %.3f, decode %.3f, "
                     "write %.3f, fsync %.3f, finish %.3f) %.0f bytes, %llu segments of the old generation (%llu pages), "
                     "%llu pages changed in %llu frames (compared with %s); full %.3f s %.0f bytes\n",
                     round, ri->seconds, tm.copy, tm.compare, tm.download, tm.download_wait, tm.decode, tm.write,
                     tm.fsync, tm.finish, b_inc.back(), static_cast<unsigned long long>(ri->bridge_segments),
                     static_cast<unsigned long long>(ri->bridge_pages), static_cast<unsigned long long>(ri->pages_changed),
                     static_cast<unsigned long long>(ri->frames_fetched),
                     ri->compared_with.empty() ? "-" : ri->compared_with.c_str(), rf.seconds, b_full.back());
        // The full restore becomes the copy for the next round (rename keeps inode and mtime).
        std::filesystem::rename(full, copy);
        std::filesystem::rename(full + "-bottomless", copy + "-bottomless");
        if (std::filesystem::exists(full + "-bottomless-pages"))
            std::filesystem::rename(full + "-bottomless-pages", copy + "-bottomless-pages");
    }
    const double tf = bench::median(t_full), ti = bench::median(t_inc), bf = bench::median(b_full),
                 bi = bench::median(b_inc);
    std::printf("## incremental restore, %d MiB (%d pages of 4 KiB), %.2f %% of pages changed (%s) in 10 segments "
                "(%llu pages)%s, parallel %d, %d rounds (medians)\n",
                mib, rows, percent, clustered ? "clustered" : "scattered", static_cast<unsigned long long>(changed_pages),
                across ? ", then a new generation" : "", parallel, rounds);
    std::printf("| restore | time (s) | downloaded (bytes) |\n| --- | --- | --- |\n");
    std::printf("| full | %.3f | %.0f |\n", tf, bf);
    std::printf("| incremental (applied via %s, local copy %.3f s) | %.3f | %.0f |\n", via.c_str(),
                bench::median(t_copy), ti, bi);
    std::printf("| ratio incremental/full | %.3f (%.1fx faster) | %.4f (%.2f %%) |\n", ti / tf, tf / ti, bi / bf,
                100.0 * bi / bf);
    w.reset();
    std::filesystem::remove_all(dir);
    // The test server keeps objects in RAM: give them back.
    if (auto st = client.delete_bucket_and_objects(bucket); !st) std::fprintf(stderr, "cleanup: %s\n", st.error().describe().c_str());
    return 0;
}
