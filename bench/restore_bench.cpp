// Restore throughput beside a plain GET of the same bytes from the same
// server in the same run, and the cost of encryption on upload and restore.
// Builds a source database of about --mib MiB of random (incompressible)
// rows, then replicates the same rows twice through the VFS, in plaintext
// and encrypted (AES-256-GCM), each as a snapshot plus segments. Then
// alternates: snapshot uploads of both (upload throughput), restore_database()
// of both into a file with each --integrity-check mode, the same restore
// through bottomless-cli (its peak RSS), a plain parallel GET of the same
// objects (same parallelism, 8 MiB ranged GETs written at their offsets into
// files, then fsync), curl fetching every object of the plaintext
// generation over one kept-alive connection (presigned URLs), and curl -Z
// fetching the same 8 MiB ranges as the parallel GET, --parallel at once,
// each into a file (then sync): a fresh process like bottomless-cli.
// Prints medians, ratios to the plain parallel GET, and where a restore's
// time goes (download, decode, write, fsync, check).
//
// Usage (server from scripts/s3-server.sh, env from its `env` command):
//   build/bench/restore_bench [--mib N] [--rounds R] [--parallel P] [--pause-ms MS] [--plain-only]
// Every timed step starts after `sync` and a pause of --pause-ms (default
// 3000: on this VM all steps then start on cold memory, see settle()).
// --plain-only: no encrypted replica and a single snapshot upload (for
// large sizes on a server with little room). BENCH_VERBOSE=1: every round.
#include <fcntl.h>
#include <spawn.h>
#include <sqlite3.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <atomic>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "bottomless.h"
#include "replicator/encryption.h"
#include "replicator/format.h"
#include "replicator/restore.h"
#include "s3/client.h"
#include "s3/crypto.h"

using namespace bottomless;
using Clock = std::chrono::steady_clock;

namespace {

void die(const std::string& m) {
    std::fprintf(stderr, "restore_bench: %s\n", m.c_str());
    std::exit(1);
}

void exec(sqlite3* db, const std::string& sql) {
    char* err = nullptr;
    if (sqlite3_exec(db, sql.c_str(), nullptr, nullptr, &err) != SQLITE_OK) die(std::string("SQL: ") + (err ? err : "?"));
}

// Each timed step starts from a quiet disk: the write-back of the previous
// step (a restored file, curl's files) would otherwise land on the next one.
// And from the same memory state: on a VM with free page reporting (this dev
// machine: a Firecracker guest, page_reporting_order=11) memory freed for
// more than ~2 s goes back to the host, and the next first touch of it (the
// page cache a restore writes into) costs a host fault per page. A step run
// right after another one's files were deleted writes into warm memory, one
// run after a pause into cold memory: which variant got which depended on
// the order of the rounds. After a pause longer than that every variant
// starts cold (--pause-ms; 0 for the old 200 ms).
int g_pause_ms = 3000;
void settle() {
    ::sync();
    std::this_thread::sleep_for(std::chrono::milliseconds(g_pause_ms > 0 ? g_pause_ms : 200));
}

double median(std::vector<double> v) {
    if (v.empty()) return 0;
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
}

double since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

// Writes a ranged GET at its offset in a file.
class PwriteSink final : public s3::http::BodySink {
public:
    PwriteSink(int fd, uint64_t off) : fd_(fd), base_(off) {}
    bool write(const char* data, size_t n) override {
        if (::pwrite(fd_, data, n, static_cast<off_t>(base_ + done_)) != static_cast<ssize_t>(n)) return false;
        done_ += n;
        return true;
    }
    bool reset() override {
        done_ = 0;
        return true;
    }

private:
    int fd_;
    uint64_t base_, done_ = 0;
};

// The baseline a restore is held to: the same objects with the same
// parallelism and part size, no decoding: `parallel` threads take 8 MiB
// ranges in order and write each at its offset into one file per object,
// then every file is fsynced (as boto3's download_file followed by a sync).
void plain_parallel_get(s3::Client& client, const std::string& bucket, const std::vector<s3::ObjectInfo>& objects,
                        const std::string& dir, int parallel) {
    struct Part {
        size_t object;
        uint64_t off, len;
    };
    constexpr uint64_t kPart = 8ull << 20;
    std::vector<Part> parts;
    std::vector<int> fds;
    for (size_t i = 0; i < objects.size(); ++i) {
        for (uint64_t off = 0; off < objects[i].size; off += kPart)
            parts.push_back({i, off, std::min(kPart, objects[i].size - off)});
        fds.push_back(::open((dir + "/get" + std::to_string(i)).c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644));
        if (fds.back() < 0) die("open get file");
    }
    std::atomic<size_t> next{0};
    std::atomic<bool> failed{false};
    std::vector<std::thread> threads;
    for (int t = 0; t < parallel; ++t)
        threads.emplace_back([&] {
            for (size_t i; (i = next.fetch_add(1)) < parts.size();) {
                const Part& p = parts[i];
                PwriteSink sink(fds[p.object], p.off);
                if (!client.get_object_to_sink(bucket, objects[p.object].key, sink, s3::ByteRange{p.off, p.len}, p.len))
                    failed = true;
            }
        });
    for (auto& t : threads) t.join();
    if (failed) die("plain GET failed");
    const auto t0 = Clock::now();
    for (int fd : fds) {
        if (::fsync(fd) != 0) die("fsync");
        ::close(fd);
    }
    if (std::getenv("BENCH_VERBOSE")) std::printf("  plain GET: fsync %.3f s\n", since(t0));
}

// Runs a command under /usr/bin/time, returns its wall time; *rss_mib gets
// its peak RSS. (A child forked or spawned from this process would count
// the pages it shared with it before exec in its own peak.)
double run_timed(std::vector<std::string> argv, const std::string& rss_file, double* rss_mib) {
    argv.insert(argv.begin(), {"/usr/bin/time", "-f", "%M", "-o", rss_file});
    std::vector<char*> args;
    for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    auto t0 = Clock::now();
    pid_t pid = 0;
    if (::posix_spawn(&pid, args[0], nullptr, nullptr, args.data(), environ) != 0) die("cannot run " + argv[0]);
    int status = 0;
    if (::waitpid(pid, &status, 0) != pid || !WIFEXITED(status) || WEXITSTATUS(status) != 0) die(argv[5] + " failed");
    const double t = since(t0);
    std::ifstream in(rss_file);
    double kib = 0;
    in >> kib;
    *rss_mib = kib / 1024;
    return t;
}

using Timings = replicator::RestoreResult::Timings;

// Medians of each part of the split.
Timings median_timings(const std::vector<Timings>& v) {
    Timings m;
    auto of = [&](double Timings::*f) {
        std::vector<double> xs;
        for (const auto& t : v) xs.push_back(t.*f);
        m.*f = median(xs);
    };
    for (auto f : {&Timings::download, &Timings::download_wait, &Timings::decode, &Timings::hash, &Timings::write, &Timings::write_wait,
                   &Timings::fsync, &Timings::check, &Timings::finish})
        of(f);
    return m;
}

void print_split(const char* what, const Timings& t) {
    std::printf("  split, %-28s download %.3f (waited %.3f), decode %.3f, sha256 %.3f, write %.3f (waited %.3f), fsync %.3f, "
                "check %.3f, rename+state %.3f\n",
                what, t.download, t.download_wait, t.decode, t.hash, t.write, t.write_wait, t.fsync, t.check, t.finish);
}

}  // namespace

int main(int argc, char** argv) {
    int mib = 100, rounds = 3, parallel = 4;
    bool plain_only = false;
    for (int i = 1; i < argc; ++i) {
        std::string a = argv[i];
        if (a == "--plain-only") plain_only = true;
        else if (i + 1 >= argc) die("usage: restore_bench [--mib N] [--rounds R] [--parallel P] [--pause-ms MS] [--plain-only]");
        else if (a == "--mib") mib = std::atoi(argv[++i]);
        else if (a == "--rounds") rounds = std::atoi(argv[++i]);
        else if (a == "--parallel") parallel = std::atoi(argv[++i]);
        else if (a == "--pause-ms") g_pause_ms = std::atoi(argv[++i]);
    }
    const bool verbose = std::getenv("BENCH_VERBOSE") != nullptr;
    std::string cli = std::filesystem::path(argv[0]).parent_path().parent_path() / "bottomless-cli";
    if (!std::filesystem::exists(cli) || !std::filesystem::exists("/usr/bin/time")) cli.clear();
    if (!std::getenv("LIBSQL_BOTTOMLESS_ENDPOINT")) die("LIBSQL_BOTTOMLESS_ENDPOINT is not set (eval \"$(scripts/s3-server.sh env)\")");
    if (bottomless_register(0) != SQLITE_OK) die("cannot register the VFS");
    char tmpl[] = "/tmp/bottomless-rbench-XXXXXX";
    if (!mkdtemp(tmpl)) die("mkdtemp");
    std::string dir = tmpl;
    std::string bucket = "rbench-" + std::to_string(::getpid());

    // ---- the rows, once, outside bottomless ----
    const int rows = mib * 256;  // 4 KiB each
    {
        sqlite3* src = nullptr;
        if (sqlite3_open((dir + "/src.db").c_str(), &src)) die("open src");
        exec(src, "CREATE TABLE t(id INTEGER PRIMARY KEY, b BLOB);");
        for (int done = 0; done < rows; done += 2000)
            exec(src, "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM n WHERE i<2000) "
                      "INSERT INTO t(b) SELECT randomblob(4000) FROM n;");
        sqlite3_close(src);
    }
    // ---- the same rows through the VFS, plaintext and encrypted: 80 % in the
    // first snapshot, 20 % in segments of 200 rows ----
    const std::string key = "3c1f0e9d8b7a6958473625140f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c";
    const char* modes[] = {"plain", "enc"};
    sqlite3* dbs[2] = {nullptr, nullptr};
    const int nmodes = plain_only ? 1 : 2;
    for (int m = 0; m < nmodes; ++m) {
        std::string uri = "file:" + dir + "/" + modes[m] + ".db?vfs=bottomless&bucket=" + bucket +
                          (m == 1 ? "&encryption_key=" + key : "");
        if (sqlite3_open_v2(uri.c_str(), &dbs[m], SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_URI, nullptr))
            die("open");
        sqlite3* db = dbs[m];
        exec(db, "PRAGMA journal_mode=wal; CREATE TABLE t(id INTEGER PRIMARY KEY, b BLOB);");
        exec(db, "ATTACH 'file:" + dir + "/src.db?vfs=unix&mode=ro' AS src;");
        const int first = rows * 8 / 10;
        exec(db, "INSERT INTO t SELECT * FROM src.t WHERE id <= " + std::to_string(first) + ";");
        exec(db, "SELECT bottomless_snapshot();");
        for (int done = first; done < rows; done += 200)
            exec(db, "INSERT INTO t SELECT * FROM src.t WHERE id > " + std::to_string(done) + " AND id <= " +
                         std::to_string(done + 200) + ";");
        exec(db, "SELECT bottomless_flush();");
    }
    // Upload throughput: whole-database snapshots of both, interleaved.
    std::vector<double> upload_s[2];
    for (int r = 0; r < (plain_only ? 1 : rounds); ++r)
        for (int k = 0; k < nmodes; ++k) {
            const int m = (r + k) % nmodes;  // alternate which goes first
            settle();
            auto t0 = Clock::now();
            exec(dbs[m], "SELECT bottomless_snapshot();");
            upload_s[m].push_back(std::chrono::duration<double>(Clock::now() - t0).count());
        }
    // The restores below read the newest generation: snapshot plus segments again.
    for (int m = 0; m < nmodes; ++m) {
        for (int i = 0; i < 20; ++i)
            exec(dbs[m], "UPDATE t SET b = (SELECT b FROM src.t WHERE src.t.id = t.id + 1) WHERE id % 2000 = " +
                             std::to_string(i) + ";");
        exec(dbs[m], "SELECT bottomless_flush();");
        sqlite3_close(dbs[m]);
    }

    auto client_r = s3::Client::from_env();
    if (!client_r) die(client_r.error().describe());
    s3::Client& client = **client_r;
    auto gens = replicator::list_generations(client, bucket, "plain.db");
    if (!gens || gens->empty()) die("no generation");
    std::string gen = (*gens)[0].id;
    auto objects = client.list_all(bucket, replicator::generation_prefix("plain.db", gen));
    if (!objects) die(objects.error().describe());
    uint64_t bytes = 0;
    std::string cfg = dir + "/urls.cfg", cfg_files = dir + "/urls-files.cfg", cfg_parts = dir + "/urls-parts.cfg";
    {
        std::ofstream out(cfg), out_files(cfg_files), out_parts(cfg_parts);
        int i = 0, part = 0;
        for (const auto& o : *objects) {
            bytes += o.size;
            std::string url = client.presign("GET", bucket, o.key, std::chrono::seconds(3600));
            out << "url = \"" << url << "\"\noutput = /dev/null\n";
            out_files << "url = \"" << url << "\"\noutput = " << dir << "/obj" << i++ << "\n";
            // The plain parallel GET from a fresh process, as the CLI is one:
            // the same 8 MiB ranges, each to a file of its own ("next": a
            // range applies to the URL it follows, not to every URL).
            constexpr uint64_t kPart = 8ull << 20;
            for (uint64_t off = 0; off < o.size; off += kPart, ++part)
                out_parts << (part ? "next\n" : "") << "fail\nurl = \"" << url << "\"\nrange = " << off << "-" << std::min(o.size, off + kPart) - 1
                          << "\noutput = " << dir << "/part" << part << "\n";
        }
    }
    double mb = static_cast<double>(bytes) / (1 << 20);

    std::string raw_key;
    if (!s3::from_hex(key, raw_key)) die("bad key");
    replicator::RestoreOptions enc;
    enc.cipher = replicator::Cipher::from_key(raw_key);

    // One round: every variant once, in an order that rotates from round to
    // round, so the page cache, write-back and server hiccups favour none.
    enum Variant { kFull, kQuick, kNone, kCli, kGet, kEnc, kCurl, kCurlFiles, kNoneBuffered, kCurlParallel, kVariants };
    const char* names[kVariants] = {"restore, integrity_check", "restore, quick_check", "restore, no check (default)",
                                    "bottomless-cli restore", "plain parallel GET + fsync",
                                    "restore, encrypted, no check", "curl, 1 connection, /dev/null",
                                    "curl, 1 connection, files + sync", "restore, no check, page cache",
                                    "curl -Z, 8 MiB parts + sync"};
    // kNoneBuffered: the default restore with its pages written through the
    // page cache instead of O_DIRECT (RestoreOptions::direct_writes), the A/B.
    std::vector<int> variants = {kFull, kQuick, kNone, kNoneBuffered, kGet};
    if (!cli.empty()) variants.push_back(kCli);
    if (!plain_only) variants.push_back(kEnc);
    if (!std::getenv("BENCH_NO_CURL")) {
        variants.push_back(kCurl);
        variants.push_back(kCurlFiles);
        variants.push_back(kCurlParallel);
    }
    std::map<int, std::vector<double>> secs;
    std::map<int, std::vector<Timings>> splits;
    std::vector<double> cli_rss;
    const std::string out = dir + "/restored.db";
    for (int r = 0; r < rounds; ++r) {
        for (size_t k = 0; k < variants.size(); ++k) {
            const int v = variants[(k + static_cast<size_t>(r)) % variants.size()];
            settle();
            double t = 0;
            if (v == kFull || v == kQuick || v == kNone || v == kNoneBuffered || v == kEnc) {
                replicator::RestoreOptions o = v == kEnc ? enc : replicator::RestoreOptions{};
                o.parallel = parallel;
                o.direct_writes = v != kNoneBuffered;
                o.integrity_check = v == kFull    ? replicator::IntegrityCheck::Full
                                    : v == kQuick ? replicator::IntegrityCheck::Quick
                                                  : replicator::IntegrityCheck::None;
                auto t0 = Clock::now();
                auto res = replicator::restore_database(client, bucket, v == kEnc ? "enc.db" : "plain.db", out, o);
                t = since(t0);
                if (!res) die(res.error().describe());
                splits[v].push_back(res->timings);
                std::filesystem::remove(out);
                std::filesystem::remove(out + "-bottomless");
            } else if (v == kCli) {
                double rss = 0;
                t = run_timed({cli, "-b", bucket, "-d", "plain.db", "restore", "-q", "--force", "-j",
                               std::to_string(parallel), "-o", out},
                              dir + "/rss", &rss);
                cli_rss.push_back(rss);
                std::filesystem::remove(out);
                std::filesystem::remove(out + "-bottomless");
            } else if (v == kGet) {
                auto t0 = Clock::now();
                plain_parallel_get(client, bucket, *objects, dir, parallel);
                t = since(t0);
                for (size_t i = 0; i < objects->size(); ++i) std::filesystem::remove(dir + "/get" + std::to_string(i));
            } else {
                auto t0 = Clock::now();
                std::string cmd = v == kCurl       ? "curl -sS --fail -K " + cfg
                                  : v == kCurlFiles ? "curl -sS --fail -K " + cfg_files + " && sync -f " + dir
                                                    : "curl -sS --no-progress-meter --fail -Z --parallel-max " + std::to_string(parallel) +
                                                          " -K " + cfg_parts + " && sync -f " + dir;
                if (std::system(cmd.c_str()) != 0) die("curl failed");
                t = since(t0);
                // What the curl runs wrote goes, as the restores' output does.
                for (const auto& e : std::filesystem::directory_iterator(dir)) {
                    const std::string name = e.path().filename().string();
                    if (name.rfind("obj", 0) == 0 || name.rfind("part", 0) == 0) std::filesystem::remove(e.path());
                }
            }
            secs[v].push_back(t);
        }
        if (verbose) {
            std::printf("round %d:", r);
            for (int v : variants) std::printf("  %s %.3f s", names[v], secs[v].back());
            std::printf("\n");
        }
    }
    const double get = median(secs[kGet]);
    std::printf("# restore vs a plain parallel GET of the same %zu objects (%.0f MiB, generation %s), "
                "parallel %d, %d rounds, medians\n",
                objects->size(), mb, gen.c_str(), parallel, rounds);
    if (g_pause_ms > 0)
        std::printf("# every step after sync and a %.1f s pause: all start from the same (cold) memory state\n",
                    g_pause_ms / 1000.0);
    else
        std::printf("# every step after sync and a 0.2 s pause: memory freed by the step before may still be warm\n");
    for (int v : variants) {
        const double m = median(secs[v]);
        const auto [lo, hi] = std::minmax_element(secs[v].begin(), secs[v].end());
        std::printf("%-36s %6.3f s  %6.0f MiB/s  ratio %.2f  (min %.3f, max %.3f)", names[v], m, mb / m, get / m, *lo,
                    *hi);
        if (v == kCli) std::printf("  peak RSS %.0f MiB", median(cli_rss));
        std::printf("\n");
    }
    if (!secs[kCli].empty() && !secs[kCurlParallel].empty()) {
        // Both fresh processes (exec, libraries, cold buffers): the CLI's
        // like-for-like baseline, the ratio per round, then its median.
        std::vector<double> r;
        for (size_t i = 0; i < secs[kCli].size(); ++i) r.push_back(secs[kCurlParallel][i] / secs[kCli][i]);
        std::printf("bottomless-cli vs curl -Z (both fresh processes): ratio %.2f\n", median(r));
    }
    for (int v : {kFull, kQuick, kNone, kNoneBuffered, kEnc})
        if (!splits[v].empty()) print_split(names[v], median_timings(splits[v]));
    if (!plain_only) {
        const double db_mb = rows * 4096.0 / (1 << 20);
        std::printf("# encryption (AES-256-GCM), same rows, same run, medians\n");
        std::printf("restore, encrypted vs plaintext (no check): ratio %.2f\n", median(secs[kNone]) / median(secs[kEnc]));
        std::printf("snapshot upload (%4.0f MiB database), plaintext: %6.2f s  %6.0f MiB/s\n", db_mb,
                    median(upload_s[0]), db_mb / median(upload_s[0]));
        std::printf("snapshot upload (%4.0f MiB database), encrypted: %6.2f s  %6.0f MiB/s  ratio %.2f to plaintext\n",
                    db_mb, median(upload_s[1]), db_mb / median(upload_s[1]), median(upload_s[0]) / median(upload_s[1]));
    }

    if (std::getenv("BENCH_KEEP")) {  // for runs of bottomless-cli by hand
        std::printf("kept: bucket %s, database plain.db\n", bucket.c_str());
        return 0;
    }
    (void)client.delete_bucket_and_objects(bucket);
    std::filesystem::remove_all(dir);
    return 0;
}
