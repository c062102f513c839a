// Embedding bottomless: register the VFS at start-up, open the database
// through it, write, and wait until the writes are durable in S3.
//
// Build: link build/libbottomless.a and its dependencies (see CMakeLists.txt,
// target embedded_example). Run: embedded_example /path/app.db
// Settings come from the environment (LIBSQL_BOTTOMLESS_ENDPOINT, _BUCKET,
// AWS_ACCESS_KEY_ID, ...), see docs/CONFIG.md.
#include <sqlite3.h>

#include <cstdio>
#include <string>

#include "bottomless.h"

int main(int argc, char** argv) {
    if (argc < 2) {
        std::fprintf(stderr, "usage: %s DB_PATH [ROWS]\n", argv[0]);
        return 2;
    }
    // Registers the "bottomless" VFS now (SQLite looks a VFS up before any
    // extension runs on a new connection), and the bottomless_* SQL
    // functions on every connection opened from now on.
    if (bottomless_register(0) != SQLITE_OK) return 1;

    std::string uri = std::string("file:") + argv[1] + "?vfs=bottomless";
    sqlite3* db = nullptr;
    if (sqlite3_open_v2(uri.c_str(), &db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_URI, nullptr) !=
        SQLITE_OK) {
        std::fprintf(stderr, "open failed: %s\n", db ? sqlite3_errmsg(db) : "out of memory");
        sqlite3_close(db);
        return 1;
    }
    int rows = argc > 2 ? std::atoi(argv[2]) : 100;
    std::string sql =
        "PRAGMA journal_mode=wal;"
        "CREATE TABLE IF NOT EXISTS notes(id INTEGER PRIMARY KEY, body TEXT);"
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM n WHERE i<" +
        std::to_string(rows) + ") INSERT INTO notes(body) SELECT 'note ' || i FROM n;";
    char* err = nullptr;
    if (sqlite3_exec(db, sql.c_str(), nullptr, nullptr, &err) != SQLITE_OK) {
        std::fprintf(stderr, "write failed: %s\n", err);
        sqlite3_free(err);
        sqlite3_close(db);
        return 1;
    }
    // Wait until everything committed so far is in S3, and print where it is.
    sqlite3_stmt* st = nullptr;
    int rc = sqlite3_prepare_v2(db, "SELECT bottomless_flush()", -1, &st, nullptr);
    if (rc == SQLITE_OK && sqlite3_step(st) == SQLITE_ROW) {
        std::printf("durable: %s\n", reinterpret_cast<const char*>(sqlite3_column_text(st, 0)));
    } else {
        std::fprintf(stderr, "flush failed: %s\n", sqlite3_errmsg(db));
        rc = SQLITE_ERROR;
    }
    sqlite3_finalize(st);
    sqlite3_close(db);
    return rc == SQLITE_OK || rc == SQLITE_ROW ? 0 : 1;
}
