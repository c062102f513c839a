// Client-side encryption against the real S3 server (docs/ENCRYPTION.md):
//   - the sqlite3 shell writes through the extension with a key (URI) and with
//     a passphrase (environment); the restore is identical, and no object in
//     the bucket holds a row's text (checked against a plaintext control)
//   - the key never reaches the bucket, a trace-level log or bottomless_status
//   - a wrong key, no key, or a key for a plaintext replica is named as such,
//     at open and at restore, before anything is written
//   - key rotation: a new key starts a new generation only when forced, and
//     each generation then needs its own key
//   - objects rearranged in the bucket (a flipped, swapped or dropped chunk of
//     a multi-chunk snapshot; a segment copied from another generation, with
//     or without its header edited) fail authentication or the binding check
#include <catch2/catch.hpp>

#include <filesystem>
#include <nlohmann/json.hpp>
#include <sstream>

#include "replicator/encryption.h"
#include "replicator/format.h"
#include "replicator/restore.h"
#include "s3/crypto.h"
#include "s3/log.h"
#include "support/object_bytes.h"
#include "support/s3_env.h"
#include "support/sqlite_util.h"

namespace fs = std::filesystem;
using namespace bottomless;
using namespace bottomless::testing;

namespace {

const std::string kKeyA = "6b8f1c2d3e4f50617283940a1b2c3d4e5f60718293a4b5c6d7e8f90112233445";
const std::string kKeyB = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
const std::string kPassphrase = "correct-horse-battery-staple-42";

struct Setup {
    std::unique_ptr<s3::Client> client = server_client();
    TestBucket bucket{*client, "enc"};
    TempDir dir;

    std::string uri(const std::string& name, const std::string& extra = "") const {
        return "file:" + dir.file(name) + "?vfs=bottomless&bucket=" + bucket.name() + extra;
    }
    std::shared_ptr<const replicator::Cipher> cipher(const std::string& db_id, const replicator::EncryptionSecret& s) {
        auto c = replicator::open_cipher(*client, bucket.name(), db_id, s, /*create=*/false);
        if (!c) FAIL(c.error().describe());
        return *c;
    }
    Result<replicator::RestoreResult> restore(const std::string& db_id, const std::string& out,
                                              std::shared_ptr<const replicator::Cipher> cipher,
                                              const std::string& generation = {}) {
        replicator::RestoreOptions o;
        o.cipher = std::move(cipher);
        o.generation = generation;
        return replicator::restore_database(*client, bucket.name(), db_id, out, o);
    }
    std::string get(const std::string& key) {
        auto g = client->get_object(bucket.name(), key);
        if (!g) FAIL(g.error().describe());
        return *g;
    }
    void put(const std::string& key, const std::string& bytes) {
        auto p = client->put_object(bucket.name(), key, bytes);
        if (!p) FAIL(p.error().describe());
    }
    // Every object under db_id/, concatenated.
    std::string all_bytes(const std::string& db_id) {
        auto objs = client->list_all(bucket.name(), db_id + "/");
        REQUIRE(objs.ok());
        std::string all;
        for (const auto& o : *objs) all += get(o.key);
        return all;
    }
    void remove_local(const std::string& name) const {
        for (const char* s : {"", "-wal", "-shm", "-bottomless", "-journal"}) fs::remove(dir.file(name) + s);
    }
};

replicator::EncryptionSecret key_secret(const std::string& hex) { return *replicator::EncryptionSecret::key(hex, "k"); }

std::string flush(sqlite3* db) { return query_text(db, "SELECT bottomless_flush(30000)"); }

std::vector<std::string> logs_while(const std::function<void()>& fn) {
    std::vector<std::string> lines;
    log::Level old = log::level();
    log::set_level(log::Level::Trace);
    log::set_sink([&](log::Level, std::string_view l) { lines.emplace_back(l); });
    fn();
    log::set_sink(nullptr);
    log::set_level(old);
    return lines;
}

bool any_mentions(const std::vector<std::string>& lines, const std::string& what) {
    for (const auto& l : lines)
        if (l.find(what) != std::string::npos) return true;
    return false;
}

}  // namespace

TEST_CASE("sqlite3 shell with encryption: identical restore, no plaintext in the bucket",
          "[encryption][integration][shell]") {
    if (sanitizer_build()) {
        WARN("sanitizer build: /usr/bin/sqlite3 cannot load the instrumented extension; skipped");
        return;
    }
    Setup s;
    // compression=none: without encryption the rows would be readable in the
    // objects (the plaintext control below shows the check can fail).
    auto script = [&](const std::string& name, const std::string& extra) {
        std::ostringstream sql;
        sql << ".open " << s.uri(name, "&compression=none" + extra) << "\n"
            << "PRAGMA journal_mode=wal;\nCREATE TABLE people(id INTEGER PRIMARY KEY, name TEXT, note TEXT);\n";
        for (int txn = 0; txn < 60; ++txn) {
            sql << "BEGIN;\n";
            for (int i = 0; i < 25; ++i)
                sql << "INSERT INTO people(name, note) VALUES('Person-" << txn << "-" << i
                    << "', 'confidential medical note " << txn * 25 + i << "');\n";
            sql << "COMMIT;\n";
            if (txn == 30) sql << "PRAGMA wal_checkpoint(TRUNCATE);\n";
        }
        sql << "SELECT bottomless_flush(30000);\n";
        return sql.str();
    };

    const std::string mode = GENERATE(as<std::string>{}, "key", "passphrase");
    CAPTURE(mode);
    const std::string name = "people-" + mode + ".db", db = s.dir.file(name);
    replicator::EncryptionSecret secret;
    if (mode == "key") {
        run_shell(BOTTOMLESS_EXT_PATH, script(name, "&encryption_key=" + kKeyA));
        secret = key_secret(kKeyA);
    } else {
        run_shell(BOTTOMLESS_EXT_PATH, script(name, ""), 0,
                  "LIBSQL_BOTTOMLESS_ENCRYPTION_PASSPHRASE=" + shell_quote(kPassphrase));
        secret = *replicator::EncryptionSecret::passphrase(kPassphrase, "p");
    }
    const std::string before = dump_hash(db);
    s.remove_local(name);

    auto r = s.restore(name, db, s.cipher(name, secret));
    REQUIRE(r.ok());
    CHECK(integrity_of_file(db) == "ok");
    CHECK(dump_hash(db) == before);

    const std::string bucket_bytes = s.all_bytes(name);
    CHECK(bucket_bytes.size() > 50'000);
    CHECK(bucket_bytes.find("confidential medical note") == std::string::npos);
    CHECK(bucket_bytes.find("Person-") == std::string::npos);
    CHECK(bucket_bytes.find("CREATE TABLE") == std::string::npos);
    CHECK(bucket_bytes.find(kPassphrase) == std::string::npos);
    CHECK(bucket_bytes.find(kKeyA) == std::string::npos);
    if (mode == "passphrase") CHECK(s.client->head_object(s.bucket.name(), name + "/encryption.json").ok());

    // The control: the same workload without a key leaves the rows readable.
    run_shell(BOTTOMLESS_EXT_PATH, script("control.db", ""));
    const std::string control = s.all_bytes("control.db");
    CHECK(control.find("confidential medical note") != std::string::npos);
    CHECK(control.find("CREATE TABLE") != std::string::npos);
}

TEST_CASE("the key stays out of the bucket, trace-level logs and bottomless_status", "[encryption][integration]") {
    Setup s;
    std::string raw;
    REQUIRE(s3::from_hex(kKeyA, raw));
    const std::string b64 = s3::base64(reinterpret_cast<const unsigned char*>(raw.data()), raw.size());
    const std::string key_id = replicator::Cipher::from_key(raw)->key_id();
    for (const std::string& param : {"&encryption_key=" + kKeyA, "&encryption_key=" + b64,
                                     "&encryption_passphrase=" + kPassphrase}) {
        CAPTURE(param);
        const std::string name = "k" + std::to_string(param.size()) + ".db";
        std::string st;
        auto lines = logs_while([&] {
            Db db = open_db(s.uri(name, param));
            exec(db.get(), "PRAGMA journal_mode=wal; CREATE TABLE t(x); INSERT INTO t VALUES('hello');");
            flush(db.get());
            st = query_text(db.get(), "SELECT bottomless_status()");
        });
        CHECK(any_mentions(lines, "PutObject PUT"));  // trace level did log every request
        for (const std::string& secret : {kKeyA, b64, kPassphrase, raw}) {
            CHECK_FALSE(any_mentions(lines, secret));
            CHECK(st.find(secret) == std::string::npos);
            CHECK(s.all_bytes(name).find(secret) == std::string::npos);
        }
        auto j = nlohmann::json::parse(st);
        REQUIRE(j["encryption"].is_object());
        if (param.find("passphrase") == std::string::npos) CHECK(j["encryption"]["key_id"] == key_id);
        else CHECK(j["encryption"]["key_id"] != key_id);
    }
}

TEST_CASE("a wrong, missing or unexpected key is named, and nothing is written", "[encryption][integration]") {
    Setup s;
    {
        Db enc = open_db(s.uri("enc.db", "&encryption_key=" + kKeyA));
        exec(enc.get(), "PRAGMA journal_mode=wal; CREATE TABLE t(x); INSERT INTO t VALUES(1),(2);");
        flush(enc.get());
        Db plain = open_db(s.uri("plain.db"));
        exec(plain.get(), "PRAGMA journal_mode=wal; CREATE TABLE t(x); INSERT INTO t VALUES(1);");
        flush(plain.get());
    }
    auto a = replicator::Cipher::from_key(key_secret(kKeyA).material());
    auto b = replicator::Cipher::from_key(key_secret(kKeyB).material());

    SECTION("restore") {
        const std::string out = s.dir.file("out.db");
        struct Case {
            std::string db;
            std::shared_ptr<const replicator::Cipher> cipher;
            std::string code, says;
        };
        for (const Case& c : {Case{"enc.db", b, "WrongEncryptionKey", "wrong encryption key"},
                              Case{"enc.db", nullptr, "EncryptionKeyRequired", "is encrypted"},
                              Case{"plain.db", a, "NotEncrypted", "is not encrypted"}}) {
            CAPTURE(c.db, c.code);
            auto r = s.restore(c.db, out, c.cipher);
            REQUIRE_FALSE(r.ok());
            CHECK(r.error().code == c.code);
            CHECK(r.error().message.find(c.says) != std::string::npos);
            CHECK(r.error().message.find(kKeyA) == std::string::npos);
            CHECK_FALSE(fs::exists(out));
            CHECK_FALSE(fs::exists(out + ".restore-tmp"));
        }
        REQUIRE(s.restore("enc.db", out, a).ok());
        Db check = open_db("file:" + out + "?immutable=1");
        CHECK(query_int(check.get(), "SELECT sum(x) FROM t") == 3);
    }
    SECTION("open") {
        struct Case {
            std::string db, extra, says;
            bool remove_local;
        };
        for (const Case& c : {Case{"enc.db", "&encryption_key=" + kKeyB, "wrong encryption key", true},
                              Case{"enc.db", "", "is encrypted", false},
                              Case{"plain.db", "&encryption_key=" + kKeyA, "is not encrypted", false},
                              Case{"plain.db", "&encryption_passphrase=" + kPassphrase, "is not encrypted", false}}) {
            CAPTURE(c.db, c.says);
            if (c.remove_local) s.remove_local(c.db);
            Db db;
            std::string err;
            int rc = 0;
            auto lines = logs_while([&] { rc = try_open_db(s.uri(c.db, c.extra), db, err); });
            CHECK(rc == SQLITE_CANTOPEN);
            CHECK(any_mentions(lines, c.says));
            CHECK_FALSE(any_mentions(lines, kKeyA));
            CHECK_FALSE(any_mentions(lines, kKeyB));
            // A refused open leaves nothing behind in the bucket (no KDF object).
            CHECK_FALSE(s.client->head_object(s.bucket.name(), c.db + "/encryption.json").ok());
            if (c.remove_local) {
                CHECK_FALSE(fs::exists(s.dir.file(c.db + ".restore-tmp")));
                CHECK((!fs::exists(s.dir.file(c.db)) || fs::file_size(s.dir.file(c.db)) == 0));
            }
        }
    }
}

TEST_CASE("key rotation starts a new generation when forced, and each generation keeps its key",
          "[encryption][integration]") {
    Setup s;
    {
        Db db = open_db(s.uri("rot.db", "&encryption_key=" + kKeyA));
        exec(db.get(), "PRAGMA journal_mode=wal; CREATE TABLE t(x); INSERT INTO t VALUES('under A');");
        flush(db.get());
    }
    Db refused;
    std::string err;
    CHECK(try_open_db(s.uri("rot.db", "&encryption_key=" + kKeyB), refused, err) == SQLITE_CANTOPEN);
    {
        Db db = open_db(s.uri("rot.db", "&encryption_key=" + kKeyB + "&initial_replication=force"));
        exec(db.get(), "INSERT INTO t VALUES('under B');");
        flush(db.get());
    }
    {
        // The next open with B continues without force.
        Db db = open_db(s.uri("rot.db", "&encryption_key=" + kKeyB));
        exec(db.get(), "INSERT INTO t VALUES('still B');");
        flush(db.get());
    }
    auto gens = replicator::list_generations(*s.client, s.bucket.name(), "rot.db");
    REQUIRE(gens.ok());
    REQUIRE(gens->size() == 2);
    auto a = replicator::Cipher::from_key(key_secret(kKeyA).material());
    auto b = replicator::Cipher::from_key(key_secret(kKeyB).material());
    const std::string out = s.dir.file("r.db");
    REQUIRE(s.restore("rot.db", out, b).ok());
    {
        Db check = open_db("file:" + out + "?immutable=1");
        CHECK(query_int(check.get(), "SELECT count(*) FROM t") == 3);
    }
    const std::string old_gen = (*gens)[1].id;
    CHECK(s.restore("rot.db", out, b, old_gen).error().code == "WrongEncryptionKey");
    REQUIRE(s.restore("rot.db", out, a, old_gen).ok());
    Db check = open_db("file:" + out + "?immutable=1");
    CHECK(query_text(check.get(), "SELECT group_concat(x) FROM t") == "under A");
}

TEST_CASE("encrypted objects rearranged in the bucket are refused", "[encryption][integration][corrupt]") {
    Setup s;
    auto cipher = replicator::Cipher::from_key(key_secret(kKeyA).material());
    std::string gen_a, gen_b;
    {
        Db db = open_db(s.uri("t.db", "&encryption_key=" + kKeyA));
        // ~400 KiB of incompressible rows: a snapshot of several 64 KiB chunks.
        exec(db.get(), "PRAGMA journal_mode=wal; CREATE TABLE t(b BLOB);"
                       "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM n WHERE i < 100) "
                       "INSERT INTO t SELECT randomblob(4000) FROM n;");
        flush(db.get());
        gen_a = query_text(db.get(), "SELECT bottomless_snapshot()");
        exec(db.get(), "INSERT INTO t VALUES(randomblob(100));");
        flush(db.get());
        gen_b = query_text(db.get(), "SELECT bottomless_snapshot()");
        exec(db.get(), "INSERT INTO t VALUES(randomblob(100));");
        flush(db.get());
    }
    REQUIRE(gen_a.size() == 25);
    REQUIRE(gen_b.size() == 25);
    const std::string out = s.dir.file("out.db");
    auto expect_refused = [&](const std::string& generation, const std::string& code) {
        auto r = s.restore("t.db", out, cipher, generation);
        REQUIRE_FALSE(r.ok());
        CHECK(r.error().code == code);
        CHECK_FALSE(fs::exists(out));
        CHECK_FALSE(fs::exists(out + ".restore-tmp"));
    };

    SECTION("the snapshot's chunks: flipped, swapped, truncated") {
        const std::string key = replicator::snapshot_key("t.db", gen_a);
        const std::string orig = s.get(key);
        const size_t b = object_body_start(orig), chunk = replicator::kEncryptionChunkSize + 16;
        REQUIRE(orig.size() - 32 - b > 4 * chunk);
        std::string content = orig.substr(0, orig.size() - 32);

        std::string flipped = content;
        flipped[b + chunk + 100] ^= 0x04;
        s.put(key, with_trailer(flipped));
        expect_refused(gen_a, "AuthenticationFailed");

        std::string swapped = content;
        std::string c0 = swapped.substr(b, chunk), c1 = swapped.substr(b + chunk, chunk);
        swapped.replace(b, chunk, c1);
        swapped.replace(b + chunk, chunk, c0);
        s.put(key, with_trailer(swapped));
        expect_refused(gen_a, "AuthenticationFailed");

        s.put(key, with_trailer(content.substr(0, b + 2 * chunk)));  // cut at a chunk boundary
        expect_refused(gen_a, "AuthenticationFailed");

        s.put(key, orig);
        REQUIRE(s.restore("t.db", out, cipher, gen_a).ok());
    }
    SECTION("a segment copied over another generation's segment") {
        const std::string from = replicator::segment_key("t.db", gen_a, 1), to = replicator::segment_key("t.db", gen_b, 1);
        const std::string seg_a = s.get(from), seg_b = s.get(to);
        // As it is: its header names generation A.
        s.put(to, seg_a);
        expect_refused(gen_b, "WrongObject");
        // Its header edited to claim generation B: the chain check (which
        // runs before any body is read) refuses it.
        std::string forged = seg_a.substr(0, seg_a.size() - 32);
        size_t at = forged.find(gen_a);
        REQUIRE(at != std::string::npos);
        REQUIRE(at < object_body_start(seg_a));
        forged.replace(at, gen_b.size(), gen_b);
        s.put(to, with_trailer(forged));
        expect_refused(gen_b, "ChainBroken");
        // Generation B's own header (a valid chain) over A's body: only the
        // AEAD can tell, and it does (the header is the associated data).
        std::string spliced = seg_b.substr(0, object_body_start(seg_b)) +
                              seg_a.substr(object_body_start(seg_a), seg_a.size() - 32 - object_body_start(seg_a));
        s.put(to, with_trailer(spliced));
        expect_refused(gen_b, "AuthenticationFailed");
        s.put(to, seg_b);
        REQUIRE(s.restore("t.db", out, cipher, gen_b).ok());
    }
}

TEST_CASE("a second connection with another key is refused while the first is open", "[encryption][integration]") {
    Setup s;
    Db first = open_db(s.uri("two.db", "&encryption_key=" + kKeyA));
    exec(first.get(), "PRAGMA journal_mode=wal; CREATE TABLE t(x); INSERT INTO t VALUES(1);");
    Db same = open_db(s.uri("two.db", "&encryption_key=" + kKeyA));
    CHECK(query_int(same.get(), "SELECT count(*) FROM t") == 1);
    for (const std::string& extra : {"&encryption_key=" + kKeyB, std::string()}) {
        Db other;
        std::string err;
        int rc = 0;
        auto lines = logs_while([&] { rc = try_open_db(s.uri("two.db", extra), other, err); });
        CHECK(rc == SQLITE_CANTOPEN);
        CHECK(any_mentions(lines, "already open in this process"));
        CHECK_FALSE(any_mentions(lines, kKeyB));
    }
}
