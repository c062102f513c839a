// The VFS and the replicator against the real S3 server: the shell end to end,
// the embedded library, a differential workload, the invariants of
// DESIGN.md, configuration, start-up decisions, outages and sync mode.
#include <catch2/catch.hpp>

#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>
#include <thread>

#include "replicator/restore.h"
#include "replicator/wal.h"
#include "s3/log.h"
#include "support/fault_proxy.h"
#include "support/s3_env.h"
#include "support/skip.h"
#include "support/sqlite_util.h"

namespace fs = std::filesystem;
using namespace bottomless;
using namespace bottomless::testing;

namespace {

struct Setup {
    std::unique_ptr<s3::Client> client = server_client();
    TestBucket bucket{*client, "vfs"};
    TempDir dir;
    std::string endpoint_param;  // "&endpoint=..." when going through a proxy

    std::string uri(const std::string& name, const std::string& extra = "") const {
        return "file:" + dir.file(name) + "?vfs=bottomless&bucket=" + bucket.name() + endpoint_param + extra;
    }
    replicator::RestoreResult restore(const std::string& db_id, const std::string& out,
                                      replicator::RestoreOptions opts = {}) const {
        auto r = replicator::restore_database(*client, bucket.name(), db_id, out, opts);
        if (!r) FAIL("restore failed: " << r.error().describe());
        return *r;
    }
    void remove_local(const std::string& name) const {
        for (const char* s : {"", "-wal", "-shm", "-bottomless", "-journal"}) fs::remove(dir.file(name) + s);
    }
};

std::string flush(sqlite3* db) { return query_text(db, "SELECT bottomless_flush(30000)"); }

nlohmann::json status(sqlite3* db) { return nlohmann::json::parse(query_text(db, "SELECT bottomless_status()")); }

uint32_t wal_salt1(const std::string& wal) {
    std::ifstream in(wal, std::ios::binary);
    unsigned char h[32];
    in.read(reinterpret_cast<char*>(h), 32);
    return in ? replicator::read_be32(h + 16) : 0;
}

// A deterministic mixed workload: inserts, updates, deletes, blobs, schema
// changes, a VACUUM, checkpoints.
void workload(sqlite3* db, unsigned seed) {
    std::mt19937 rng(seed);
    exec(db, "PRAGMA journal_mode=wal; PRAGMA wal_autocheckpoint=64;"
             "CREATE TABLE IF NOT EXISTS kv(k INTEGER PRIMARY KEY, v TEXT, b BLOB);"
             "CREATE INDEX IF NOT EXISTS kv_v ON kv(v);");
    for (int t = 0; t < 120; ++t) {
        std::string sql = "BEGIN;";
        int n = 1 + static_cast<int>(rng() % 30);
        for (int i = 0; i < n; ++i) {
            int k = static_cast<int>(rng() % 2000);
            switch (rng() % 4) {
            case 0:
            case 1:
                sql += "INSERT OR REPLACE INTO kv(k, v, b) VALUES(" + std::to_string(k) + ", 'v" + std::to_string(rng()) +
                       "', zeroblob(" + std::to_string(rng() % 2000) + "));";
                break;
            case 2: sql += "UPDATE kv SET v = v || 'x' WHERE k % 17 = " + std::to_string(k % 17) + ";"; break;
            default: sql += "DELETE FROM kv WHERE k = " + std::to_string(k) + ";";
            }
        }
        sql += "COMMIT;";
        exec(db, sql);
        if (t == 40) exec(db, "ALTER TABLE kv ADD COLUMN extra INTEGER DEFAULT 7;");
        if (t == 60) exec(db, "DELETE FROM kv WHERE k > 500;");
        if (t == 61) exec(db, "VACUUM;");
        if (t % 25 == 0) exec(db, "PRAGMA wal_checkpoint(PASSIVE);");
    }
}

}  // namespace

TEST_CASE("sqlite3 shell: write, flush, delete, restore, identical", "[vfs][integration][shell]") {
    if (sanitizer_build())
        BOTTOMLESS_SKIP("sanitizer build without a sanitizer runtime to preload into the sqlite3 shell");
    Setup s;
    std::string page_size = GENERATE(as<std::string>{}, "4096", "65536");
    CAPTURE(page_size);
    std::string db = s.dir.file("app.db");
    std::ostringstream script;
    script << ".open " << s.uri("app.db") << "\n"
           << "PRAGMA page_size=" << page_size << ";\nPRAGMA journal_mode=wal;\n"
           << "CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT, n REAL);\n";
    for (int txn = 0; txn < 200; ++txn) {
        script << "BEGIN;\n";
        for (int i = 0; i < 50; ++i)
            script << "INSERT INTO t(v, n) VALUES('row " << txn << "-" << i << "', " << txn * 0.5 + i << ");\n";
        script << "COMMIT;\n";
        if (txn % 40 == 39) script << "PRAGMA wal_checkpoint(PASSIVE);\n";
    }
    script << "SELECT bottomless_flush(30000);\n";
    run_shell(BOTTOMLESS_EXT_PATH, script.str());
    std::string before = dump_hash(db);
    CHECK(integrity_of_file(db) == "ok");
    s.remove_local("app.db");

    auto r = s.restore("app.db", db);
    CHECK(r.page_size == std::stoul(page_size));
    CHECK(integrity_of_file(db) == "ok");
    CHECK(dump_hash(db) == before);
    Db check = open_db("file:" + db + "?immutable=1");
    CHECK(query_int(check.get(), "SELECT count(*) FROM t") == 10000);
}

TEST_CASE("a transaction larger than the auto-checkpoint size is shipped whole", "[vfs][integration][shell]") {
    if (sanitizer_build())
        BOTTOMLESS_SKIP("sanitizer build without a sanitizer runtime to preload into the sqlite3 shell");
    Setup s;
    std::string db = s.dir.file("big.db");
    run_shell(BOTTOMLESS_EXT_PATH, ".open " + s.uri("big.db") +
              "\nPRAGMA journal_mode=wal;\nPRAGMA wal_autocheckpoint=100;\nPRAGMA cache_size=50;\n"
              "CREATE TABLE b(id INTEGER PRIMARY KEY, data BLOB);\n"
              "BEGIN;\nWITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM n WHERE i<3000)\n"
              "INSERT INTO b(data) SELECT randomblob(1500) FROM n;\nCOMMIT;\n"
              "INSERT INTO b(data) VALUES(x'01');\nSELECT bottomless_flush(30000);\n");
    std::string before = dump_hash(db);
    s.remove_local("big.db");
    s.restore("big.db", db);
    CHECK(dump_hash(db) == before);
    CHECK(integrity_of_file(db) == "ok");
}

TEST_CASE("the embedded example opens, writes and flushes through the static library", "[vfs][integration]") {
    Setup s;
    std::string db = s.dir.file("embedded.db");
    std::string out;
    int rc = run_command("LIBSQL_BOTTOMLESS_BUCKET=" + s.bucket.name() + " " + BOTTOMLESS_EMBEDDED_EXAMPLE + " " +
                             shell_quote(db) + " 250",
                         &out);
    INFO(out);
    REQUIRE(rc == 0);
    CHECK(out.find("durable:") != std::string::npos);
    s.remove_local("embedded.db");
    s.restore("embedded.db", db);
    Db check = open_db("file:" + db + "?immutable=1");
    CHECK(query_int(check.get(), "SELECT count(*) FROM notes") == 250);
}

TEST_CASE("differential: the same workload on the default VFS and on bottomless", "[vfs][integration]") {
    Setup s;
    std::string plain_path = s.dir.file("plain.db");
    std::string btl_path = s.dir.file("diff.db");
    {
        sqlite3* raw = nullptr;
        REQUIRE(sqlite3_open(plain_path.c_str(), &raw) == SQLITE_OK);
        Db plain(raw);
        workload(plain.get(), 1234);
    }
    std::string h_btl;
    {
        Db db = open_db(s.uri("diff.db"));
        workload(db.get(), 1234);
        flush(db.get());
        h_btl = content_hash(db.get());
    }
    std::string h_plain = content_hash_of_file(plain_path);
    CHECK(h_btl == h_plain);
    s.remove_local("diff.db");
    s.restore("diff.db", btl_path);
    CHECK(content_hash_of_file(btl_path) == h_plain);
    CHECK(integrity_of_file(btl_path) == "ok");
}

TEST_CASE("connections in turn, WAL restarts, TRUNCATE, VACUUM, reopen: one continuous history",
          "[vfs][integration]") {
    Setup s;
    std::string path = s.dir.file("multi.db");
    std::string generation;
    {
        Db a = open_db(s.uri("multi.db"));
        Db b = open_db(s.uri("multi.db"));
        Db c = open_db(s.uri("multi.db"));
        exec(a.get(), "PRAGMA journal_mode=wal; CREATE TABLE t(id INTEGER PRIMARY KEY, who TEXT, pad BLOB);");
        for (sqlite3* db : {a.get(), b.get(), c.get()}) exec(db, "PRAGMA wal_autocheckpoint=20;");
        uint32_t first_salt = 0;
        for (int i = 0; i < 90; ++i) {
            sqlite3* db = i % 3 == 0 ? a.get() : (i % 3 == 1 ? b.get() : c.get());
            exec(db, "INSERT INTO t(who, pad) VALUES('conn" + std::to_string(i % 3) + "', randomblob(3000));");
            if (i == 1) first_salt = wal_salt1(path + "-wal");
            if (i % 30 == 29) flush(db);  // shipped: the WAL may restart now
        }
        flush(a.get());
        CHECK(wal_salt1(path + "-wal") != first_salt);  // the WAL did restart along the way
        generation = status(a.get())["generation"];
        exec(b.get(), "PRAGMA wal_checkpoint(TRUNCATE);");
        CHECK(fs::file_size(path + "-wal") == 0);
        exec(c.get(), "DELETE FROM t WHERE id % 2 = 0; VACUUM;");
        exec(a.get(), "INSERT INTO t(who) VALUES('after vacuum');");
        flush(a.get());
        CHECK(status(b.get())["generation"] == generation);
    }
    {
        Db again = open_db(s.uri("multi.db"));
        exec(again.get(), "INSERT INTO t(who) VALUES('reopened');");
        flush(again.get());
        CHECK(status(again.get())["generation"] == generation);  // continued, no new snapshot
    }
    std::string before = content_hash_of_file(path);
    std::string out = s.dir.file("restored.db");
    auto r = s.restore("multi.db", out);
    CHECK(r.generation == generation);
    CHECK(content_hash_of_file(out) == before);
    Db check = open_db("file:" + out + "?immutable=1");
    CHECK(query_int(check.get(), "SELECT count(*) FROM t") == 47);
}

TEST_CASE("committed only: a rolled-back transaction's frames never reach the bucket", "[vfs][integration][invariant]") {
    Setup s;
    std::string path = s.dir.file("rb.db");
    {
        Db db = open_db(s.uri("rb.db"));
        exec(db.get(), "PRAGMA journal_mode=wal; PRAGMA cache_size=10; CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB);"
                       "INSERT INTO t(v) VALUES('kept');");
        flush(db.get());
        // Spills dirty pages into the WAL before rolling back.
        exec(db.get(), "BEGIN; WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM n WHERE i<500) "
                       "INSERT INTO t(v) SELECT randomblob(4000) FROM n; ROLLBACK;");
        CHECK(fs::file_size(path + "-wal") > 500 * 4000);  // the frames are in the WAL file
        exec(db.get(), "INSERT INTO t(v) VALUES('second');");
        flush(db.get());
    }
    std::string out = s.dir.file("out.db");
    s.restore("rb.db", out);
    Db check = open_db("file:" + out + "?immutable=1");
    CHECK(query_int(check.get(), "SELECT count(*) FROM t") == 2);
    CHECK(query_text(check.get(), "SELECT group_concat(v) FROM t") == "kept,second");
}

TEST_CASE("auto-restore on open, and the initial_replication choices", "[vfs][integration]") {
    Setup s;
    {
        Db db = open_db(s.uri("seed.db"));
        exec(db.get(), "PRAGMA journal_mode=wal; CREATE TABLE t(v); INSERT INTO t VALUES(1),(2),(3);");
        flush(db.get());
    }
    SECTION("a missing database is restored before the first read") {
        s.remove_local("seed.db");
        Db db = open_db(s.uri("seed.db"));
        CHECK(query_int(db.get(), "SELECT sum(v) FROM t") == 6);
        exec(db.get(), "INSERT INTO t VALUES(4);");
        flush(db.get());
        auto st = status(db.get());
        CHECK(st["snapshots_uploaded"] == 1);  // a new generation, parented to the old one
        auto gens = replicator::list_generations(*s.client, s.bucket.name(), "seed.db");
        REQUIRE(gens.ok());
        CHECK(gens->size() == 2);
    }
    SECTION("a local file the bucket cannot vouch for") {
        s.remove_local("seed.db");
        {
            sqlite3* raw = nullptr;  // written outside bottomless
            REQUIRE(sqlite3_open(s.dir.file("seed.db").c_str(), &raw) == SQLITE_OK);
            Db plain(raw);
            exec(plain.get(), "PRAGMA journal_mode=wal; CREATE TABLE other(x); INSERT INTO other VALUES('local');");
        }
        std::vector<std::string> logs;
        log::set_sink([&](log::Level, std::string_view l) { logs.emplace_back(l); });
        SECTION("error (default): the open fails and says what to do") {
            Db db;
            std::string err;
            int rc = try_open_db(s.uri("seed.db"), db, err);
            log::set_sink(nullptr);
            CHECK(rc == SQLITE_CANTOPEN);
            bool said = false;
            for (const auto& l : logs)
                said = said || (l.find("disagree") != std::string::npos && l.find("force") != std::string::npos &&
                                l.find("skip") != std::string::npos);
            CHECK(said);
        }
        SECTION("force: the local file becomes a new generation") {
            log::set_sink(nullptr);
            Db db = open_db(s.uri("seed.db", "&initial_replication=force"));
            flush(db.get());
            std::string out = s.dir.file("forced.db");
            s.restore("seed.db", out);
            Db check = open_db("file:" + out + "?immutable=1");
            CHECK(query_text(check.get(), "SELECT x FROM other") == "local");
        }
        SECTION("skip: opens without replication") {
            log::set_sink(nullptr);
            Db db = open_db(s.uri("seed.db", "&initial_replication=skip"));
            CHECK(query_text(db.get(), "SELECT x FROM other") == "local");
            std::string err;
            CHECK(try_exec(db.get(), "SELECT bottomless_status()", err) != SQLITE_OK);
            CHECK(err.find("off") != std::string::npos);
        }
    }
}

TEST_CASE("bad settings fail the open with a message naming them", "[vfs][integration][config]") {
    Setup s;
    std::vector<std::string> logs;
    log::set_sink([&](log::Level, std::string_view l) { logs.emplace_back(l); });
    auto [extra, needle] = GENERATE(table<std::string, std::string>({
        {"&no_such_option=1", "no_such_option"},
        {"&sync=maybe", "sync=maybe"},
        {"&initial_replication=sometimes", "initial_replication"},
        {"&database_id=a/b", "database_id"},
    }));
    Db db;
    std::string err;
    int rc = try_open_db(s.uri("cfg.db", extra), db, err);
    log::set_sink(nullptr);
    CHECK(rc == SQLITE_CANTOPEN);
    bool named = false;
    for (const auto& l : logs) named = named || l.find(needle) != std::string::npos;
    CHECK(named);
}

TEST_CASE("databases sharing a name prefix never share keys", "[vfs][integration]") {
    Setup s;
    {
        Db a = open_db(s.uri("db"));
        Db b = open_db(s.uri("db2"));
        exec(a.get(), "PRAGMA journal_mode=wal; CREATE TABLE t(v); INSERT INTO t VALUES('db');");
        exec(b.get(), "PRAGMA journal_mode=wal; CREATE TABLE t(v); INSERT INTO t VALUES('db2');");
        flush(a.get());
        flush(b.get());
    }
    for (std::string name : {"db", "db2"}) {
        std::string out = s.dir.file("r-" + name);
        s.restore(name, out);
        Db check = open_db("file:" + out + "?immutable=1");
        CHECK(query_text(check.get(), "SELECT v FROM t") == name);
    }
}

TEST_CASE("bottomless_status reports the replication state", "[vfs][integration]") {
    Setup s;
    Db db = open_db(s.uri("st.db"));
    exec(db.get(), "PRAGMA journal_mode=wal; CREATE TABLE t(v); INSERT INTO t VALUES(1);");
    flush(db.get());
    auto st = status(db.get());
    CHECK(st["database_id"] == "st.db");
    CHECK(st["mode"] == "async");
    CHECK(st["generation"].get<std::string>().size() == 25);
    CHECK(st["pending_transactions"] == 0);
    CHECK(st["snapshots_uploaded"] == 1);
    CHECK(st["last_error"].is_null());
    CHECK(st["requests"].get<int>() > 0);
    exec(db.get(), "INSERT INTO t VALUES(2);");
    flush(db.get());
    st = status(db.get());
    CHECK(st["segments_uploaded"] == 1);
    CHECK(st["segment"] == 1);
}

TEST_CASE("S3 outage under async writes: no error to the app, everything durable afterwards",
          "[vfs][integration][outage]") {
    Setup s;
    FaultProxy proxy("127.0.0.1", server_port());
    // A small memory budget, so the outage outgrows it.
    s.endpoint_param = "&endpoint=" + proxy.url() + "&batch_interval_ms=200&max_pending_bytes=1048576";
    std::string path = s.dir.file("out.db");
    Db db = open_db(s.uri("out.db"));
    exec(db.get(), "PRAGMA journal_mode=wal; PRAGMA wal_autocheckpoint=10; CREATE TABLE t(id INTEGER PRIMARY KEY, pad BLOB);");
    flush(db.get());
    std::string gen_before = status(db.get())["generation"];

    proxy.inject_always(testing::Fault::ResetBeforeRequest);  // the server is gone
    // Writes go on until the unshipped bytes outgrow the memory budget (an
    // amount of work, not of wall-clock time: a loaded machine gets there
    // too), then a few more, each slowed by back-pressure but never failed.
    // Up to the budget, checkpoints restart the WAL (its frames are staged
    // in memory first); past it, every restart is refused: the WAL keeps its
    // salts and grows on disk, although each write follows a checkpoint.
    auto wal_salts = [&] {
        std::ifstream in(path + "-wal", std::ios::binary);
        std::string h(24, '\0');
        in.read(h.data(), 24);
        return h.substr(16, 8);
    };
    int n = 0, past_cap = 0;
    std::string salts_at_cap;
    while (past_cap < 3) {
        if (past_cap > 0) exec(db.get(), "PRAGMA wal_checkpoint(PASSIVE);");
        exec(db.get(), "INSERT INTO t(pad) VALUES(randomblob(5000));");  // never an error
        ++n;
        if (n % 20 == 0) exec(db.get(), "PRAGMA wal_checkpoint(PASSIVE);");
        if (past_cap > 0) {
            ++past_cap;
        } else if (status(db.get())["pending_bytes"].get<uint64_t>() > 1048576) {
            past_cap = 1;
            salts_at_cap = wal_salts();
        }
        REQUIRE(n < 5000);
    }
    CHECK(wal_salts() == salts_at_cap);  // no WAL restart over frames that are neither shipped nor in memory
    // The uploader reports the outage once its retries of an attempt give up.
    auto st = status(db.get());
    for (auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(120);
         st["last_error"].is_null() && std::chrono::steady_clock::now() < deadline; st = status(db.get()))
        std::this_thread::sleep_for(std::chrono::milliseconds(50));
    CHECK(st["pending_bytes"].get<uint64_t>() > 1048576);
    CHECK(st["pending_transactions"].get<int>() > 0);
    CHECK_FALSE(st["last_error"].is_null());
    CHECK(st["pending_bytes"].get<uint64_t>() > 0);

    proxy.clear();
    flush(db.get());
    st = status(db.get());
    CHECK(st["pending_transactions"] == 0);
    // Invariant 2: checkpoints and WAL restarts went on during the outage
    // (frames were kept in memory, then the WAL held them once memory was
    // full), and the history continued without a break: same generation.
    CHECK(st["generation"] == gen_before);
    CHECK(st["snapshots_uploaded"] == 1);
    std::string before = content_hash(db.get());
    db.reset();
    std::string out = s.dir.file("restored.db");
    s.restore("out.db", out);
    CHECK(content_hash_of_file(out) == before);
    Db check = open_db("file:" + out + "?immutable=1");
    CHECK(query_int(check.get(), "SELECT count(*) FROM t") == n);
}

TEST_CASE("sync mode: COMMIT is durable when it returns, refused when S3 cannot take it",
          "[vfs][integration][sync]") {
    Setup s;
    FaultProxy proxy("127.0.0.1", server_port());
    s.endpoint_param = "&endpoint=" + proxy.url() + "&sync=1&sync_timeout_ms=2000";
    std::string path = s.dir.file("sync.db");
    Db db = open_db(s.uri("sync.db"));
    exec(db.get(), "PRAGMA journal_mode=wal; CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT);");
    for (int i = 0; i < 20; ++i) exec(db.get(), "INSERT INTO t(v) VALUES('ok" + std::to_string(i) + "');");
    CHECK(status(db.get())["mode"] == "sync");
    {
        // Without any flush, every committed row is already restorable.
        std::string out = s.dir.file("now.db");
        s.restore("sync.db", out);
        Db check = open_db("file:" + out + "?immutable=1");
        CHECK(query_int(check.get(), "SELECT count(*) FROM t") == 20);
    }

    proxy.inject_always(testing::Fault::Status503SlowDown);
    std::string err;
    int rc = try_exec(db.get(), "INSERT INTO t(v) VALUES('refused');", err);
    CHECK((rc & 0xff) == SQLITE_IOERR);
    CHECK(query_int(db.get(), "SELECT count(*) FROM t WHERE v='refused'") == 0);  // not visible locally either
    // A server that answers a few bytes at a time holds no commit past its
    // timeout (2 s here; generous slack for a loaded machine).
    proxy.set_trickle(4, 300);
    proxy.inject_always(testing::Fault::Trickle);
    auto t0 = std::chrono::steady_clock::now();
    rc = try_exec(db.get(), "INSERT INTO t(v) VALUES('trickled');", err);
    auto waited = std::chrono::steady_clock::now() - t0;
    CHECK((rc & 0xff) == SQLITE_IOERR);
    CHECK(waited < std::chrono::seconds(6));
    CHECK(query_int(db.get(), "SELECT count(*) FROM t WHERE v='trickled'") == 0);
    proxy.clear();
    exec(db.get(), "INSERT INTO t(v) VALUES('after');");
    CHECK(query_int(db.get(), "SELECT count(*) FROM t") == 21);
    db.reset();

    // Reopened: SQLite's WAL recovery must not bring the refused transaction back.
    Db again = open_db(s.uri("sync.db"));
    CHECK(query_int(again.get(), "SELECT count(*) FROM t WHERE v='refused'") == 0);
    again.reset();
    std::string out = s.dir.file("final.db");
    s.restore("sync.db", out);
    Db check = open_db("file:" + out + "?immutable=1");
    CHECK(query_int(check.get(), "SELECT count(*) FROM t") == 21);
    CHECK(query_int(check.get(), "SELECT count(*) FROM t WHERE v='refused'") == 0);
}

TEST_CASE("a writer that bypasses bottomless never makes history vanish", "[vfs][integration][invariant]") {
    Setup s;
    std::string path = s.dir.file("foreign.db");
    Db app = open_db(s.uri("foreign.db"));
    exec(app.get(), "PRAGMA journal_mode=wal; CREATE TABLE t(v TEXT); INSERT INTO t VALUES('app 1');");
    flush(app.get());
    std::string gen1 = status(app.get())["generation"];
    std::string checkpoint = GENERATE(as<std::string>{}, "PASSIVE", "TRUNCATE");
    CAPTURE(checkpoint);
    {
        // Same file, default VFS: SQLite's own locking still applies, bottomless sees nothing.
        sqlite3* raw = nullptr;
        REQUIRE(sqlite3_open_v2(path.c_str(), &raw, SQLITE_OPEN_READWRITE, "unix") == SQLITE_OK);
        Db plain(raw);
        exec(plain.get(), "INSERT INTO t VALUES('foreign'); PRAGMA wal_checkpoint(" + checkpoint + ");");
    }
    for (int i = 2; i <= 5; ++i) exec(app.get(), "INSERT INTO t VALUES('app " + std::to_string(i) + "');");
    flush(app.get());
    std::string gen2 = status(app.get())["generation"];
    if (checkpoint == "TRUNCATE") CHECK(gen2 != gen1);  // the WAL restarted behind our back: new history
    else CHECK(gen2 == gen1);                           // its frames were still in the WAL: shipped in line
    std::string out = s.dir.file("r.db");
    s.restore("foreign.db", out);
    Db check = open_db("file:" + out + "?immutable=1");
    CHECK(query_int(check.get(), "SELECT count(*) FROM t") == 6);
    CHECK(query_int(check.get(), "SELECT count(*) FROM t WHERE v = 'foreign'") == 1);
}

TEST_CASE("exclusive locking mode: commits seen without shared memory, WAL restarts staged",
          "[vfs][integration][exclusive]") {
    Setup s;
    std::string path = s.dir.file("excl.db");
    {
        Db db = open_db(s.uri("excl.db"));
        // Exclusive before the WAL is first used: SQLite keeps the wal-index
        // in heap memory and never calls xShm*.
        exec(db.get(), "PRAGMA locking_mode=EXCLUSIVE; PRAGMA journal_mode=wal; PRAGMA wal_autocheckpoint=20;"
                       "CREATE TABLE t(id INTEGER PRIMARY KEY, pad BLOB);");
        CHECK_FALSE(fs::exists(path + "-shm"));
        uint32_t first_salt = 0;
        for (int i = 0; i < 120; ++i) {
            exec(db.get(), "INSERT INTO t(pad) VALUES(randomblob(3000));");
            if (i == 0) first_salt = wal_salt1(path + "-wal");
        }
        flush(db.get());
        CHECK(wal_salt1(path + "-wal") != first_salt);  // the WAL restarted along the way
        exec(db.get(), "DELETE FROM t WHERE id % 3 = 0;");
        flush(db.get());
        CHECK(status(db.get())["snapshots_uploaded"] == 1);  // one history, no break
    }
    std::string before = content_hash_of_file(path);
    std::string out = s.dir.file("restored.db");
    s.restore("excl.db", out);
    CHECK(content_hash_of_file(out) == before);
    Db check = open_db("file:" + out + "?immutable=1");
    CHECK(query_int(check.get(), "SELECT count(*) FROM t") == 80);
}

TEST_CASE("data before metadata: no segment is written before its snapshot is durable",
          "[vfs][integration][invariant]") {
    Setup s;
    FaultProxy proxy("127.0.0.1", server_port());
    s.endpoint_param = "&endpoint=" + proxy.url() + "&batch_interval_ms=100";
    proxy.set_filter("PUT", "/snapshot");
    proxy.inject_always(testing::Fault::Status503SlowDown);  // every snapshot upload fails
    Db db = open_db(s.uri("dbm.db"));
    exec(db.get(), "PRAGMA journal_mode=wal; CREATE TABLE t(v);");
    for (int i = 0; i < 30; ++i) exec(db.get(), "INSERT INTO t VALUES(" + std::to_string(i) + ");");
    // Wait for the event, not for a time: several snapshot uploads have
    // failed (several uploader rounds, each with batches due, went by).
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(120);
    while (proxy.faults_injected() < 3 && std::chrono::steady_clock::now() < deadline)
        std::this_thread::sleep_for(std::chrono::milliseconds(20));
    REQUIRE(proxy.faults_injected() >= 3);
    auto listed = s.client->list_all(s.bucket.name(), "dbm.db/");
    REQUIRE(listed.ok());
    CHECK(listed->empty());  // segments wait for the snapshot they chain to
    CHECK(status(db.get())["pending_transactions"].get<int>() > 0);

    proxy.clear();
    flush(db.get());
    listed = s.client->list_all(s.bucket.name(), "dbm.db/");
    REQUIRE(listed.ok());
    REQUIRE_FALSE(listed->empty());
    db.reset();
    std::string out = s.dir.file("r.db");
    s.restore("dbm.db", out);
    Db check = open_db("file:" + out + "?immutable=1");
    CHECK(query_int(check.get(), "SELECT count(*) FROM t") == 30);
}

TEST_CASE("the snapshot policy starts a new generation after enough WAL bytes", "[vfs][integration]") {
    Setup s;
    Db db = open_db(s.uri("pol.db", "&snapshot_after_bytes=200000"));
    exec(db.get(), "PRAGMA journal_mode=wal; CREATE TABLE t(id INTEGER PRIMARY KEY, pad BLOB);");
    flush(db.get());
    std::string first = status(db.get())["generation"];
    for (int i = 0; i < 3; ++i) {
        exec(db.get(), "INSERT INTO t(pad) SELECT randomblob(2000) FROM (SELECT 1 UNION ALL SELECT 2 UNION ALL "
                       "SELECT 3 UNION ALL SELECT 4 UNION ALL SELECT 5) , (SELECT 1 UNION ALL SELECT 2 UNION ALL "
                       "SELECT 3 UNION ALL SELECT 4 UNION ALL SELECT 5 UNION ALL SELECT 6 UNION ALL SELECT 7);");
        flush(db.get());  // each batch ships ~35 pages; the third passes 200 000 bytes
    }
    exec(db.get(), "INSERT INTO t(pad) VALUES(x'00');");
    flush(db.get());
    std::string second = status(db.get())["generation"];
    CHECK(second != first);
    auto gens = replicator::list_generations(*s.client, s.bucket.name(), "pol.db");
    REQUIRE(gens.ok());
    CHECK(gens->size() == 2);
    db.reset();
    std::string out = s.dir.file("r.db");
    auto r = s.restore("pol.db", out);
    CHECK(r.generation == second);
    Db check = open_db("file:" + out + "?immutable=1");
    CHECK(query_int(check.get(), "SELECT count(*) FROM t") == 106);
}

namespace {

// The -wal file's valid frames (salts equal to the header's, SQLite's
// running checksum continuing) and what lies past them.
struct WalLayout {
    uint64_t frames = 0;
    uint64_t frames_end = 0;  // bytes: header and valid frames
    uint64_t file_size = 0;
    bool zeros_after = true;  // every byte past frames_end is zero
};

WalLayout wal_layout(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    WalLayout w;
    w.file_size = bytes.size();
    auto hdr = bytes.size() >= 32 ? replicator::parse_wal_header(reinterpret_cast<const unsigned char*>(bytes.data()))
                                  : std::nullopt;
    REQUIRE(hdr);
    const uint64_t frame_size = 24 + hdr->page_size;
    uint32_t c1 = hdr->cksum1, c2 = hdr->cksum2;
    w.frames_end = 32;
    while (w.frames_end + frame_size <= bytes.size()) {
        const auto* f = reinterpret_cast<const unsigned char*>(bytes.data()) + w.frames_end;
        if (!replicator::verify_frame(*hdr, f, f + 24, c1, c2)) break;
        ++w.frames;
        w.frames_end += frame_size;
    }
    for (uint64_t i = w.frames_end; i < bytes.size(); ++i)
        if (bytes[i] != 0) {
            w.zeros_after = false;
            break;
        }
    return w;
}

}  // namespace

// A WAL growing past its largest size under synchronous=FULL is extended
// ahead with written zeros (commits overwrite blocks instead of appending,
// vfs_wal.cpp grow_ahead); SQLite's recovery, a plain reader and restore
// never take them for frames. NORMAL, which syncs the WAL only at
// checkpoints, is left as SQLite makes it.
TEST_CASE("a WAL growing under synchronous=FULL is extended ahead with zeros that no reader takes for frames",
          "[vfs][integration]") {
    Setup s;
    for (const std::string sync : {"FULL", "NORMAL"}) {
        DYNAMIC_SECTION("synchronous=" << sync) {
            const std::string name = "grow-" + sync + ".db", path = s.dir.file(name);
            std::string hash;
            {
                Db db = open_db(s.uri(name));
                exec(db.get(), "PRAGMA journal_mode=wal; PRAGMA synchronous=" + sync +
                                   "; PRAGMA wal_autocheckpoint=0; CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB);");
                for (int i = 0; i < 400; ++i) exec(db.get(), "INSERT INTO t(v) VALUES(randomblob(900))");
                WalLayout w = wal_layout(path + "-wal");
                INFO("frames " << w.frames << ", frames end " << w.frames_end << ", file " << w.file_size);
                CHECK(w.frames >= 400);
                CHECK(w.zeros_after);
                if (sync == "FULL") {
                    CHECK(w.file_size > w.frames_end);  // extended ahead
                    CHECK(w.file_size - w.frames_end <= (4u << 20) + 64 * 1024);
                } else {
                    CHECK(w.file_size == w.frames_end);  // as SQLite made it
                }
                hash = content_hash(db.get());
                flush(db.get());
                // A plain connection (no bottomless) in the same state reads
                // the same: it sees the frames the wal-index names.
                Db plain = open_db("file:" + path + "?mode=ro");
                CHECK(content_hash(plain.get()) == hash);
            }
            // The last close checkpointed and deleted the WAL. Recreate a
            // WAL with frames and zeros after them, as a crash would leave it,
            // and let SQLite recover it without bottomless.
            {
                Db db = open_db(s.uri(name));
                exec(db.get(), "PRAGMA synchronous=" + sync + "; PRAGMA wal_autocheckpoint=0;");
                for (int i = 0; i < 200; ++i) exec(db.get(), "INSERT INTO t(v) VALUES(randomblob(900))");
                hash = content_hash(db.get());
                flush(db.get());
                const std::string copy = s.dir.file("crashed-" + sync + ".db");
                fs::copy_file(path, copy);
                fs::copy_file(path + "-wal", copy + "-wal");
                WalLayout w = wal_layout(copy + "-wal");
                CHECK(w.zeros_after);
                Db recovered = open_db("file:" + copy);
                CHECK(content_hash(recovered.get()) == hash);
                CHECK(query_text(recovered.get(), "PRAGMA integrity_check") == "ok");
            }
            auto r = s.restore(name, s.dir.file("restored-" + sync + ".db"));
            CHECK(content_hash_of_file(s.dir.file("restored-" + sync + ".db")) == hash);
        }
    }
}

// A snapshot reads the database through a connection's handle (no
// descriptor of its own); that connection closing mid-snapshot waits for the
// read under way, and the snapshot goes on through another handle or one of
// its own: the generation restores to the same content.
TEST_CASE("a connection closing while a snapshot reads through its handle", "[vfs][integration]") {
    Setup s;
    std::string hash;
    {
        Db db = open_db(s.uri("lend.db"));
        exec(db.get(), "PRAGMA journal_mode=wal; CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB);"
                       "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 12000) "
                       "INSERT INTO t(v) SELECT randomblob(3000) FROM n;");
        flush(db.get());
        hash = content_hash(db.get());
    }
    for (int delay_ms : {0, 20, 80}) {
        Db lent = open_db(s.uri("lend.db"));     // the first handle: the one lent
        Db snapper = open_db(s.uri("lend.db"));  // takes the snapshot
        CHECK(query_int(lent.get(), "SELECT count(*) FROM t") == 12000);  // the pager has set its map limit
        std::string gen;
        std::thread t([&] { gen = query_text(snapper.get(), "SELECT bottomless_snapshot()"); });
        std::this_thread::sleep_for(std::chrono::milliseconds(delay_ms));
        lent.reset();
        t.join();
        INFO("closed after " << delay_ms << " ms");
        CHECK(gen.size() == 25);
        const std::string out = s.dir.file("lend-restored-" + std::to_string(delay_ms) + ".db");
        auto r = s.restore("lend.db", out);
        CHECK(r.generation == gen);
        CHECK(content_hash_of_file(out) == hash);
    }
}
