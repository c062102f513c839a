// See sqlite_util.h.
#include "support/sqlite_util.h"

#include <catch2/catch.hpp>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <stdlib.h>
#include <sys/wait.h>

#include "bottomless.h"
#include "s3/crypto.h"

namespace bottomless::testing {

void register_bottomless() { REQUIRE(bottomless_register(0) == SQLITE_OK); }

int try_open_db(const std::string& uri, Db& out, std::string& error) {
    // No Catch assertion here: threads other than the test's call this (Catch
    // is not thread-safe).
    if (int rc = bottomless_register(0); rc != SQLITE_OK) {
        error = "bottomless_register failed";
        return rc;
    }
    sqlite3* db = nullptr;
    int rc = sqlite3_open_v2(uri.c_str(), &db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_URI, nullptr);
    if (rc != SQLITE_OK) {
        error = db ? sqlite3_errmsg(db) : "out of memory";
        sqlite3_close_v2(db);
        return rc;
    }
    sqlite3_busy_timeout(db, 10'000);
    out.reset(db);
    return SQLITE_OK;
}

Db open_db(const std::string& uri) {
    Db db;
    std::string err;
    int rc = try_open_db(uri, db, err);
    if (rc != SQLITE_OK) FAIL("cannot open " << uri << ": " << err << " (" << rc << ")");
    return db;
}

int try_exec(sqlite3* db, const std::string& sql, std::string& error) {
    char* msg = nullptr;
    int rc = sqlite3_exec(db, sql.c_str(), nullptr, nullptr, &msg);
    if (msg) {
        error = msg;
        sqlite3_free(msg);
    }
    return rc;
}

void exec(sqlite3* db, const std::string& sql) {
    std::string err;
    int rc = try_exec(db, sql, err);
    if (rc != SQLITE_OK) FAIL("SQL failed (" << rc << "): " << err << "\n  in: " << sql.substr(0, 300));
}

std::string query_text(sqlite3* db, const std::string& sql) {
    sqlite3_stmt* st = nullptr;
    if (sqlite3_prepare_v2(db, sql.c_str(), -1, &st, nullptr) != SQLITE_OK)
        FAIL("prepare failed: " << sqlite3_errmsg(db) << " in " << sql);
    std::string out;
    int rc = sqlite3_step(st);
    if (rc == SQLITE_ROW) {
        const unsigned char* t = sqlite3_column_text(st, 0);
        out = t ? reinterpret_cast<const char*>(t) : "";
    } else if (rc != SQLITE_DONE) {
        std::string e = sqlite3_errmsg(db);
        sqlite3_finalize(st);
        FAIL("query failed: " << e << " in " << sql);
    }
    sqlite3_finalize(st);
    return out;
}

long long query_int(sqlite3* db, const std::string& sql) { return std::stoll(query_text(db, sql)); }

std::string content_hash(sqlite3* db) {
    s3::Hasher h(s3::Hasher::Algo::Sha256);
    std::vector<std::string> tables;
    {
        sqlite3_stmt* st = nullptr;
        REQUIRE(sqlite3_prepare_v2(db, "SELECT name, sql FROM sqlite_schema WHERE type='table' ORDER BY name", -1, &st,
                                   nullptr) == SQLITE_OK);
        while (sqlite3_step(st) == SQLITE_ROW) {
            tables.emplace_back(reinterpret_cast<const char*>(sqlite3_column_text(st, 0)));
            const unsigned char* sql = sqlite3_column_text(st, 1);
            h.update(sql ? reinterpret_cast<const char*>(sql) : "");
        }
        sqlite3_finalize(st);
    }
    for (const auto& t : tables) {
        sqlite3_stmt* st = nullptr;
        std::string sql = "SELECT * FROM \"" + t + "\" ORDER BY 1";
        REQUIRE(sqlite3_prepare_v2(db, sql.c_str(), -1, &st, nullptr) == SQLITE_OK);
        h.update("T:" + t);
        while (sqlite3_step(st) == SQLITE_ROW) {
            for (int c = 0; c < sqlite3_column_count(st); ++c) {
                int type = sqlite3_column_type(st, c);
                h.update(std::string(1, static_cast<char>('0' + type)));
                const void* b = sqlite3_column_blob(st, c);
                int n = sqlite3_column_bytes(st, c);
                if (b) h.update(b, static_cast<size_t>(n));
                h.update("|");
            }
        }
        sqlite3_finalize(st);
    }
    std::string d = h.finish();
    return s3::to_hex(reinterpret_cast<const unsigned char*>(d.data()), d.size());
}

std::string content_hash_of_file(const std::string& path) {
    sqlite3* raw = nullptr;
    std::string uri = "file:" + path + "?immutable=1";
    REQUIRE(sqlite3_open_v2(uri.c_str(), &raw, SQLITE_OPEN_READONLY | SQLITE_OPEN_URI, "unix") == SQLITE_OK);
    Db db(raw);
    return content_hash(db.get());
}

std::string integrity_of_file(const std::string& path) {
    sqlite3* raw = nullptr;
    std::string uri = "file:" + path + "?immutable=1";
    REQUIRE(sqlite3_open_v2(uri.c_str(), &raw, SQLITE_OPEN_READONLY | SQLITE_OPEN_URI, "unix") == SQLITE_OK);
    Db db(raw);
    return query_text(db.get(), "PRAGMA integrity_check");
}

TempDir::TempDir() {
    std::string tmpl = (std::filesystem::temp_directory_path() / "bottomless-test-XXXXXX").string();
    REQUIRE(mkdtemp(tmpl.data()) != nullptr);
    path_ = tmpl;
}

TempDir::~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
}

int run_command(const std::string& cmd, std::string* output) {
    std::string full = cmd + " 2>&1";
    FILE* p = popen(full.c_str(), "r");
    if (!p) return -1;
    char buf[4096];
    size_t n;
    while ((n = fread(buf, 1, sizeof buf, p)) > 0)
        if (output) output->append(buf, n);
    int status = pclose(p);
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + (WIFSIGNALED(status) ? WTERMSIG(status) : 0);
}

std::string shell_quote(const std::string& s) {
    std::string q = "'";
    for (char c : s) q += c == '\'' ? std::string("'\\''") : std::string(1, c);
    return q + "'";
}

std::string run_shell(const std::string& extension, const std::string& script, int expect_rc, const std::string& env) {
    TempDir tmp;
    std::string path = tmp.file("script.sql");
    std::ofstream(path) << ".bail on\n.load " << extension << "\n" << script;
    std::string out;
    int rc = run_command(env + " sqlite3 < " + shell_quote(path), &out);
    if (rc != expect_rc) FAIL("sqlite3 shell exited " << rc << ":\n" << out);
    return out;
}

std::string dump_hash(const std::string& db_path) {
    std::string out;
    REQUIRE(run_command("sqlite3 " + shell_quote(db_path) + " .dump | sha256sum", &out) == 0);
    return out.substr(0, 64);
}

}  // namespace bottomless::testing
