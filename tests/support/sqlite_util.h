// SQLite helpers for tests: connections through the embedded bottomless VFS
// (the static library, registered in-process), queries, content hashes.
#pragma once

#include <sqlite3.h>

#include <memory>
#include <string>
#include <vector>

namespace bottomless::testing {

struct DbCloser {
    void operator()(sqlite3* db) const noexcept { sqlite3_close_v2(db); }
};
using Db = std::unique_ptr<sqlite3, DbCloser>;

// Registers the bottomless VFS (idempotent) in this process.
void register_bottomless();

// Opens a URI filename ("file:/path?vfs=bottomless&bucket=x"); FAILs the
// test with SQLite's message on error.
Db open_db(const std::string& uri);
// Same, returning the error instead of failing.
int try_open_db(const std::string& uri, Db& out, std::string& error);

void exec(sqlite3* db, const std::string& sql);
int try_exec(sqlite3* db, const std::string& sql, std::string& error);
std::string query_text(sqlite3* db, const std::string& sql);  // first column of the first row
long long query_int(sqlite3* db, const std::string& sql);

// SHA-256 of every table's rows in a canonical order (schema included):
// two databases with the same logical content have the same hash.
std::string content_hash(sqlite3* db);
std::string content_hash_of_file(const std::string& path);
std::string integrity_of_file(const std::string& path);  // "ok" or the problems

// A fresh temporary directory, removed (with its files) afterwards.
class TempDir {
public:
    TempDir();
    ~TempDir();
    TempDir(const TempDir&) = delete;
    TempDir& operator=(const TempDir&) = delete;
    const std::string& path() const { return path_; }
    std::string file(const std::string& name) const { return path_ + "/" + name; }

private:
    std::string path_;
};

// Runs a shell command; returns its exit status and collects stdout+stderr.
int run_command(const std::string& cmd, std::string* output = nullptr);

std::string shell_quote(const std::string& s);
// Runs a script in the sqlite3 shell with the extension at `extension`
// loaded; FAILs unless it exits with expect_rc. Returns the output.
std::string run_shell(const std::string& extension, const std::string& script, int expect_rc = 0,
                      const std::string& env = {});
// SHA-256 (hex) of the shell's .dump of a database file.
std::string dump_hash(const std::string& db_path);

}  // namespace bottomless::testing
