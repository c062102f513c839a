// Hardening of what the shim and the restore core do locally (issue 13):
// SQL functions callable only from the application's own SQL, restore paths
// that open exactly the file they name and never follow a planted symlink.
#include <catch2/catch.hpp>

#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <thread>

#include "replicator/replicator.h"
#include "replicator/restore.h"
#include "support/s3_env.h"
#include "support/sqlite_util.h"

namespace fs = std::filesystem;
using namespace bottomless;
using namespace bottomless::testing;

TEST_CASE("sqlite_file_uri escapes what a URI would read as query, fragment or escape", "[hardening]") {
    CHECK(replicator::sqlite_file_uri("/a/b.db") == "file:///a/b.db");
    CHECK(replicator::sqlite_file_uri("rel/b.db") == "file:rel/b.db");
    CHECK(replicator::sqlite_file_uri("/a/x?mode=memory#y%z") == "file:///a/x%3Fmode=memory%23y%25z");
    // "//host/x" must stay a path: an empty authority comes first.
    CHECK(replicator::sqlite_file_uri("//evil/x") == "file:////evil/x");
}

TEST_CASE("integrity_check checks the file it is given even when its name holds URI characters", "[hardening]") {
    TempDir dir;
    // "db" is garbage; "db?x#y%41" is a valid database. Unescaped, the URI
    // "file:.../db?x#y%41?immutable=1" would check "db" (and fail), or worse
    // pass a file that was never restored.
    const std::string bad = dir.file("db");
    const std::string good = dir.file("db?x#y%41");
    {
        std::ofstream(bad) << std::string(8192, 'x');
        sqlite3* raw = nullptr;
        REQUIRE(sqlite3_open_v2(good.c_str(), &raw, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE, nullptr) == SQLITE_OK);
        Db db(raw);
        exec(db.get(), "CREATE TABLE t(x); INSERT INTO t VALUES (1), (2)");
    }
    auto st = replicator::integrity_check(good);
    CHECK(st.ok());
    CHECK_FALSE(replicator::integrity_check(bad).ok());
}

TEST_CASE("bottomless SQL functions cannot be called from a view or a trigger in the database", "[hardening]") {
    register_bottomless();
    auto client = server_client();
    TestBucket bucket(*client, "hard");
    TempDir dir;
    Db db = open_db("file:" + dir.file("app.db") + "?vfs=bottomless&bucket=" + bucket.name());
    exec(db.get(), "CREATE TABLE t(x)");
    // Called directly they work.
    CHECK_FALSE(query_text(db.get(), "SELECT bottomless_status()").empty());
    // A view or trigger planted in a database file (e.g. one restored from
    // elsewhere) must not make a plain SELECT or INSERT start a generation.
    for (const char* fn : {"bottomless_snapshot()", "bottomless_flush()", "bottomless_flush(1)", "bottomless_status()"}) {
        INFO(fn);
        exec(db.get(), std::string("DROP VIEW IF EXISTS v; CREATE VIEW v AS SELECT ") + fn + " AS r");
        std::string err;
        CHECK(try_exec(db.get(), "SELECT * FROM v", err) != SQLITE_OK);
        CHECK_THAT(err, Catch::Contains("unsafe use"));
    }
    exec(db.get(), "CREATE TRIGGER tr AFTER INSERT ON t BEGIN SELECT bottomless_snapshot(); END");
    std::string err;
    CHECK(try_exec(db.get(), "INSERT INTO t VALUES (1)", err) != SQLITE_OK);
    CHECK_THAT(err, Catch::Contains("unsafe use"));
}

TEST_CASE("restore never writes through a symlink planted at its temp file", "[hardening]") {
    auto client = server_client();
    TestBucket bucket(*client, "hard");
    TempDir dir;
    register_bottomless();
    {
        Db db = open_db("file:" + dir.file("src.db") + "?vfs=bottomless&bucket=" + bucket.name());
        exec(db.get(), "CREATE TABLE t(x); INSERT INTO t VALUES ('hello')");
        query_text(db.get(), "SELECT bottomless_flush(30000)");
    }
    const std::string victim = dir.file("victim");
    std::ofstream(victim) << "precious";
    const std::string out = dir.file("out.db");
    fs::create_symlink(victim, out + ".restore-tmp");
    auto r = replicator::restore_database(*client, bucket.name(), "src.db", out);
    REQUIRE(r.ok());
    std::ifstream in(victim);
    std::string content((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    CHECK(content == "precious");
    CHECK(integrity_of_file(out) == "ok");
    CHECK_FALSE(fs::exists(fs::symlink_status(out + ".restore-tmp")));
}

TEST_CASE("an exception on the uploader thread never reaches the application", "[hardening]") {
    register_bottomless();
    auto client = server_client();
    TestBucket bucket(*client, "hard");
    TempDir dir;
    const std::string uri = "file:" + dir.file("app.db") + "?vfs=bottomless&bucket=" + bucket.name() +
                            "&batch_interval_ms=50";
    Db db = open_db(uri);
    exec(db.get(), "PRAGMA journal_mode=WAL; CREATE TABLE t(x)");
    query_text(db.get(), "SELECT bottomless_flush(30000)");
    // The next uploader steps throw, as a library failure or bad_alloc would.
    // Before the barrier an exception leaving the thread terminated the host.
    replicator::testing_inject_uploader_exceptions(3);
    for (int i = 0; i < 20; ++i) exec(db.get(), "INSERT INTO t VALUES (" + std::to_string(i) + ")");
    // Reads and writes go on; status tells what happened; replication resumes.
    CHECK(query_int(db.get(), "SELECT count(*) FROM t") == 20);
    for (int i = 0; i < 200 && query_text(db.get(), "SELECT bottomless_status() ->> 'last_error'").empty(); ++i)
        std::this_thread::sleep_for(std::chrono::milliseconds(20));
    CHECK_THAT(query_text(db.get(), "SELECT bottomless_status() ->> 'last_error'"),
               Catch::Contains("internal error in the uploader: injected by a test"));
    query_text(db.get(), "SELECT bottomless_flush(60000)");
    const std::string local = content_hash(db.get());
    db.reset();
    replicator::testing_inject_uploader_exceptions(0);
    const std::string out = dir.file("restored.db");
    auto r = replicator::restore_database(*client, bucket.name(), "app.db", out);
    REQUIRE(r.ok());
    CHECK(content_hash_of_file(out) == local);
}
