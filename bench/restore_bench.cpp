// Restore throughput beside a plain GET of the same bytes from the same
// server in the same run, and the cost of encryption on upload and restore.
// Builds a source database of about --mib MiB of random (incompressible)
// rows, then replicates the same rows twice through the VFS, in plaintext
// and encrypted (AES-256-GCM), each as a snapshot plus segments. Then
// alternates: snapshot uploads of both (upload throughput), restore_database()
// of both into a file (checksums, chain, fsync, integrity_check), and curl
// fetching every object of the plaintext generation to /dev/null and to
// files over one kept-alive connection (presigned URLs).
//
// Usage (server from scripts/s3-server.sh, env from its `env` command):
//   build/bench/restore_bench [--mib N] [--rounds R]
#include <sqlite3.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
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
void settle() {
    ::sync();
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
}

double median(std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
    int mib = 100, rounds = 3;
    for (int i = 1; i + 1 < argc; i += 2) {
        std::string a = argv[i];
        if (a == "--mib") mib = std::atoi(argv[i + 1]);
        else if (a == "--rounds") rounds = std::atoi(argv[i + 1]);
    }
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
    for (int m = 0; m < 2; ++m) {
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
    for (int r = 0; r < rounds; ++r)
        for (int k = 0; k < 2; ++k) {
            const int m = (r + k) % 2;  // alternate which goes first
            settle();
            auto t0 = Clock::now();
            exec(dbs[m], "SELECT bottomless_snapshot();");
            upload_s[m].push_back(std::chrono::duration<double>(Clock::now() - t0).count());
        }
    // The restores below read the newest generation: snapshot plus segments again.
    for (int m = 0; m < 2; ++m) {
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
    std::string cfg = dir + "/urls.cfg", cfg_files = dir + "/urls-files.cfg";
    {
        std::ofstream out(cfg), out_files(cfg_files);
        int i = 0;
        for (const auto& o : *objects) {
            bytes += o.size;
            std::string url = client.presign("GET", bucket, o.key, std::chrono::seconds(3600));
            out << "url = \"" << url << "\"\noutput = /dev/null\n";
            out_files << "url = \"" << url << "\"\noutput = " << dir << "/obj" << i++ << "\n";
        }
    }
    double mb = static_cast<double>(bytes) / (1 << 20);

    std::string raw_key;
    if (!s3::from_hex(key, raw_key)) die("bad key");
    replicator::RestoreOptions enc;
    enc.cipher = replicator::Cipher::from_key(raw_key);

    std::vector<double> restore_s, restore_enc_s, restore_nocheck_s, curl_s, curl_file_s;
    for (int r = 0; r < rounds; ++r) {
        std::string out = dir + "/restored.db";
        // Plaintext and encrypted restores take turns going first, so the
        // page cache and write-back left by the previous step favour neither.
        for (int k = 0; k < 2; ++k) {
            const bool encrypted = (r + k) % 2 == 1;
            settle();
            auto t0 = Clock::now();
            auto res = replicator::restore_database(client, bucket, encrypted ? "enc.db" : "plain.db", out,
                                                    encrypted ? enc : replicator::RestoreOptions{});
            if (!res) die(res.error().describe());
            (encrypted ? restore_enc_s : restore_s).push_back(std::chrono::duration<double>(Clock::now() - t0).count());
            std::filesystem::remove(out);
        }

        replicator::RestoreOptions fast;
        fast.integrity_check = false;
        settle();
        auto t0 = Clock::now();
        auto res = replicator::restore_database(client, bucket, "plain.db", out, fast);
        if (!res) die(res.error().describe());
        restore_nocheck_s.push_back(std::chrono::duration<double>(Clock::now() - t0).count());
        std::filesystem::remove(out);

        settle();
        t0 = Clock::now();
        if (!std::getenv("BENCH_NO_CURL") && std::system(("curl -sS --fail -K " + cfg).c_str()) != 0) die("curl failed");
        curl_s.push_back(std::chrono::duration<double>(Clock::now() - t0).count());

        settle();
        t0 = Clock::now();
        if (!std::getenv("BENCH_NO_CURL") && std::system(("curl -sS --fail -K " + cfg_files + " && sync -f " + dir).c_str()) != 0) die("curl failed");
        curl_file_s.push_back(std::chrono::duration<double>(Clock::now() - t0).count());
    }
    if (std::getenv("BENCH_VERBOSE"))
        for (int r = 0; r < rounds; ++r)
            std::printf("round %d: restore plain %.3f s, encrypted %.3f s\n", r, restore_s[r], restore_enc_s[r]);
    double c = median(curl_s);
    std::printf("# restore vs plain GET of the same %zu objects (%.0f MiB, generation %s), %d rounds, medians\n",
                objects->size(), mb, gen.c_str(), rounds);
    std::printf("curl, one connection, to /dev/null:            %6.2f s  %6.0f MiB/s\n", c, mb / c);
    double cf = median(curl_file_s);
    std::printf("curl, one connection, to files + sync:         %6.2f s  %6.0f MiB/s\n", cf, mb / cf);
    std::printf("restore (checksums, chain, fsync, integrity):  %6.2f s  %6.0f MiB/s  ratio %.2f to /dev/null, %.2f to files\n",
                median(restore_s), mb / median(restore_s), c / median(restore_s), cf / median(restore_s));
    std::printf("restore without integrity_check:               %6.2f s  %6.0f MiB/s  ratio %.2f to /dev/null, %.2f to files\n",
                median(restore_nocheck_s), mb / median(restore_nocheck_s), c / median(restore_nocheck_s),
                cf / median(restore_nocheck_s));
    const double db_mb = rows * 4096.0 / (1 << 20);
    std::printf("# encryption (AES-256-GCM), same rows, same run, medians\n");
    std::printf("restore, encrypted replica:                    %6.2f s  %6.0f MiB/s  ratio %.2f to plaintext restore\n",
                median(restore_enc_s), mb / median(restore_enc_s), median(restore_s) / median(restore_enc_s));
    // Some runs of either kind take ~0.3 s longer (disk or server hiccups on
    // a shared machine); the fastest run of each shows the cost itself.
    double best = *std::min_element(restore_s.begin(), restore_s.end());
    double best_enc = *std::min_element(restore_enc_s.begin(), restore_enc_s.end());
    std::printf("fastest of each: plaintext %.3f s, encrypted %.3f s          ratio %.2f\n", best, best_enc,
                best / best_enc);
    std::printf("snapshot upload (%4.0f MiB database), plaintext: %6.2f s  %6.0f MiB/s\n", db_mb, median(upload_s[0]),
                db_mb / median(upload_s[0]));
    std::printf("snapshot upload (%4.0f MiB database), encrypted: %6.2f s  %6.0f MiB/s  ratio %.2f to plaintext\n",
                db_mb, median(upload_s[1]), db_mb / median(upload_s[1]), median(upload_s[0]) / median(upload_s[1]));

    (void)client.delete_bucket_and_objects(bucket);
    std::filesystem::remove_all(dir);
    return 0;
}
