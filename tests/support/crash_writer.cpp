// A writer for the crash test: appends transactions of random size to a
// bottomless database until it is killed, and logs the id of every
// transaction whose COMMIT returned OK (fsynced, so the log survives SIGKILL).
//
//   crash_writer DB_URI LOG_PATH SEED
//
// BOTTOMLESS_TEST_EXIT_AFTER_SYNC_UPLOADS=N: exit (status 3) right after the
// N-th sync commit is durable in S3, before its commit frame is written
// (with BOTTOMLESS_TEST_EXIT_BEFORE_STATE set, also before the state file
// records the upload).
//
// Each transaction k inserts r rows (1..20, random payloads up to 1 KiB)
// tagged with k into `rows`, and (k, r) into `txns`: a restored database is a
// committed prefix when txns holds 1..m without gaps and each k has r rows.
#include <fcntl.h>
#include <sqlite3.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>

#include "bottomless.h"
#include "replicator/replicator.h"

int main(int argc, char** argv) {
    if (argc < 4) return 2;
    if (bottomless_register(0) != SQLITE_OK) return 1;
    // Test hook: die (status 3) right after the n-th sync commit is durable
    // in S3 and before its commit frame reaches the WAL.
    if (const char* n = std::getenv("BOTTOMLESS_TEST_EXIT_AFTER_SYNC_UPLOADS"))
        bottomless::replicator::testing_exit_after_sync_uploads(std::atoi(n),
                                                                std::getenv("BOTTOMLESS_TEST_EXIT_BEFORE_STATE") != nullptr);
    sqlite3* db = nullptr;
    if (sqlite3_open_v2(argv[1], &db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_URI, nullptr) != SQLITE_OK) {
        std::fprintf(stderr, "crash_writer: open: %s\n", db ? sqlite3_errmsg(db) : "?");
        return 1;
    }
    sqlite3_busy_timeout(db, 5000);
    int log = ::open(argv[2], O_WRONLY | O_CREAT | O_APPEND, 0644);
    std::mt19937 rng(static_cast<unsigned>(std::stoul(argv[3])));
    sqlite3_exec(db,
                 "PRAGMA journal_mode=wal; PRAGMA wal_autocheckpoint=50;"
                 "CREATE TABLE IF NOT EXISTS txns(k INTEGER PRIMARY KEY, r INTEGER NOT NULL);"
                 "CREATE TABLE IF NOT EXISTS rows(id INTEGER PRIMARY KEY, k INTEGER NOT NULL, payload BLOB);",
                 nullptr, nullptr, nullptr);
    sqlite3_stmt* max = nullptr;
    sqlite3_prepare_v2(db, "SELECT coalesce(max(k), 0) FROM txns", -1, &max, nullptr);
    sqlite3_step(max);
    long long k = sqlite3_column_int64(max, 0);
    sqlite3_finalize(max);
    for (;;) {
        ++k;
        int r = 1 + static_cast<int>(rng() % 20);
        std::string sql = "BEGIN; INSERT INTO txns VALUES(" + std::to_string(k) + "," + std::to_string(r) + ");";
        for (int i = 0; i < r; ++i)
            sql += "INSERT INTO rows(k, payload) VALUES(" + std::to_string(k) + ", randomblob(" +
                   std::to_string(rng() % 1024) + "));";
        sql += "COMMIT;";
        char* err = nullptr;
        if (sqlite3_exec(db, sql.c_str(), nullptr, nullptr, &err) != SQLITE_OK) {
            std::fprintf(stderr, "crash_writer: txn %lld: %s\n", k, err ? err : "?");
            sqlite3_free(err);
            sqlite3_exec(db, "ROLLBACK", nullptr, nullptr, nullptr);
            --k;
            usleep(20'000);
            continue;
        }
        std::string line = std::to_string(k) + "\n";
        if (::write(log, line.data(), line.size()) < 0) return 1;
        ::fdatasync(log);
    }
}
