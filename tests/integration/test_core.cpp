// The replicator core's promises to the application (issue 9): in async
// mode a writer never waits for S3 — not during an outage, not while a
// snapshot uploads — and the WAL's growth has a budget with a policy.
#include <catch2/catch.hpp>

#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <thread>

#include "replicator/format.h"
#include "replicator/replicator.h"
#include "replicator/restore.h"
#include "support/fault_proxy.h"
#include "support/s3_env.h"
#include "support/skip.h"
#include "support/sqlite_util.h"

using namespace bottomless;
using namespace bottomless::testing;
using Clock = std::chrono::steady_clock;

namespace {

struct Setup {
    std::unique_ptr<s3::Client> client = server_client();
    TestBucket bucket{*client, "core"};
    TempDir dir;
    FaultProxy proxy{"127.0.0.1", server_port()};
    std::string uri(const std::string& name, const std::string& extra = "") const {
        return "file:" + dir.file(name) + "?vfs=bottomless&bucket=" + bucket.name() + "&endpoint=" + proxy.url() +
               extra;
    }
    std::string restored_hash(const std::string& db_id) const {
        const std::string out = dir.file("restored-" + db_id);
        auto r = replicator::restore_database(*client, bucket.name(), db_id, out);
        if (!r) FAIL("restore failed: " << r.error().describe());
        return content_hash_of_file(out);
    }
};

nlohmann::json status(sqlite3* db) { return nlohmann::json::parse(query_text(db, "SELECT bottomless_status()")); }

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

// The exit status of a child process that must exit (not be killed).
int exit_status_of(pid_t pid) {
    int wstatus = 0;
    REQUIRE(waitpid(pid, &wstatus, 0) == pid);
    REQUIRE(WIFEXITED(wstatus));
    return WEXITSTATUS(wstatus);
}

}  // namespace

TEST_CASE("async writers never wait for S3: past the memory cap the WAL keeps the frames", "[core][outage]") {
    register_bottomless();
    Setup s;
    Db db = open_db(s.uri("o.db", "&batch_interval_ms=100&max_pending_bytes=1048576"));
    exec(db.get(), "PRAGMA journal_mode=WAL; CREATE TABLE t(id INTEGER PRIMARY KEY, pad BLOB)");
    query_text(db.get(), "SELECT bottomless_flush(30000)");
    s.proxy.inject_always(Fault::ResetBeforeRequest);  // S3 is gone

    // Fill past the 1 MiB memory cap, then time 40 more commits. Before, each
    // commit past the cap waited up to 2 s for the uploader (80 s here).
    int n = 0;
    while (status(db.get())["pending_bytes"].get<uint64_t>() <= 2u << 20) {
        exec(db.get(), "INSERT INTO t(pad) VALUES (randomblob(5000))");
        REQUIRE(++n < 5000);
    }
    auto t0 = Clock::now();
    for (int i = 0; i < 40; ++i, ++n) exec(db.get(), "INSERT INTO t(pad) VALUES (randomblob(5000))");
    const double past_cap = seconds_since(t0);
    CHECK(past_cap < 10.0);
    auto st = status(db.get());
    CHECK(st["pending_in"] == "wal");
    CHECK(st["wal_bytes"].get<uint64_t>() > (2u << 20));
    CHECK_FALSE(st["wal_budget"]["exceeded"].get<bool>());

    s.proxy.clear();
    query_text(db.get(), "SELECT bottomless_flush(60000)");
    st = status(db.get());
    CHECK(st["pending_in"] == "none");
    CHECK(st["snapshots_uploaded"] == 1);  // the history went on: no new generation
    const std::string local = content_hash(db.get());
    db.reset();
    CHECK(s.restored_hash("o.db") == local);
}

TEST_CASE("a catch-up after an outage holds no more memory than max_pending_bytes", "[core][outage]") {
    register_bottomless();
    Setup s;
    constexpr uint64_t kCap = 1u << 20;
    Db db = open_db(s.uri("mem.db", "&batch_interval_ms=100&max_pending_bytes=" + std::to_string(kCap)));
    exec(db.get(), "PRAGMA journal_mode=WAL; CREATE TABLE t(id INTEGER PRIMARY KEY, pad BLOB)");
    query_text(db.get(), "SELECT bottomless_flush(30000)");
    s.proxy.inject_always(Fault::ResetBeforeRequest);

    // An outage that leaves six times the cap in the WAL (randomblob: the
    // encoded segments are as large as their frames).
    uint64_t peak_seen = 0;
    auto sample = [&] {
        auto st = status(db.get());
        peak_seen = std::max(peak_seen, st["memory_bytes"].get<uint64_t>());
        return st;
    };
    int n = 0;
    while (sample()["pending_bytes"].get<uint64_t>() <= 6 * kCap) {
        exec(db.get(), "INSERT INTO t(pad) VALUES (randomblob(5000))");
        REQUIRE(++n < 20000);
    }
    CHECK(sample()["pending_in"] == "wal");

    // S3 is back: the backlog ships (forced now rather than after the
    // uploader's back-off) while the writer goes on, so the tee takes new
    // frames while old ones are read back from the WAL, pending, encoded
    // and in flight: all of it counts, and stays within the cap.
    s.proxy.clear();
    std::string ignored;
    (void)try_exec(db.get(), "SELECT bottomless_flush(1)", ignored);
    for (int i = 0; i < 600; ++i, ++n) {
        exec(db.get(), "INSERT INTO t(pad) VALUES (randomblob(5000))");
        if (i % 10 == 0) sample();
        std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
    query_text(db.get(), "SELECT bottomless_flush(60000)");
    auto st = sample();
    INFO(st.dump());
    CHECK(st["pending_in"] == "none");
    CHECK(st["wal_frames_read"].get<uint64_t>() > 0);  // the backlog came back from the WAL
    const uint64_t peak = st["memory_peak_bytes"].get<uint64_t>();
    CHECK(peak >= peak_seen);
    CHECK(peak > kCap / 2);  // the cap was used, not avoided
    CHECK(peak <= kCap);
    CHECK(st["snapshots_uploaded"] == 1);
    const std::string local = content_hash(db.get());
    CHECK(query_int(db.get(), "SELECT count(*) FROM t") == n);
    db.reset();
    CHECK(s.restored_hash("mem.db") == local);
}

TEST_CASE("the WAL budget's fail policy refuses writes with SQLITE_FULL until S3 catches up", "[core][outage]") {
    register_bottomless();
    Setup s;
    Db db = open_db(s.uri("b.db", "&batch_interval_ms=100&max_pending_bytes=1048576&max_wal_bytes=3145728"
                                  "&wal_budget_policy=fail"));
    exec(db.get(), "PRAGMA journal_mode=WAL; CREATE TABLE t(id INTEGER PRIMARY KEY, pad BLOB)");
    query_text(db.get(), "SELECT bottomless_flush(30000)");
    s.proxy.inject_always(Fault::ResetBeforeRequest);

    int ok = 0, rc = SQLITE_OK;
    std::string err;
    while ((rc = try_exec(db.get(), "INSERT INTO t(pad) VALUES (randomblob(5000))", err)) == SQLITE_OK) REQUIRE(++ok < 5000);
    CHECK(rc == SQLITE_FULL);
    CHECK(ok > 100);  // the budget, not the memory cap, stopped it
    auto st = status(db.get());
    CHECK(st["wal_budget"]["exceeded"].get<bool>());
    CHECK_THAT(st["last_error"].get<std::string>(), Catch::Contains("max_wal_bytes"));
    // The refused transaction left nothing behind.
    CHECK(query_int(db.get(), "SELECT count(*) FROM t") == ok);

    s.proxy.clear();
    query_text(db.get(), "SELECT bottomless_flush(60000)");
    exec(db.get(), "INSERT INTO t(pad) VALUES (randomblob(5000))");  // writes go on once shipped
    query_text(db.get(), "SELECT bottomless_flush(60000)");
    const std::string local = content_hash(db.get());
    CHECK(query_int(db.get(), "SELECT count(*) FROM t") == ok + 1);
    db.reset();
    CHECK(s.restored_hash("b.db") == local);
}

TEST_CASE("a snapshot of a large database does not stall the writer", "[core][snapshot]") {
    register_bottomless();
    Setup s;
    Db db = open_db(s.uri("snap.db", "&batch_interval_ms=100&max_pending_bytes=1048576"));
    exec(db.get(), "PRAGMA journal_mode=WAL; CREATE TABLE big(b BLOB); CREATE TABLE t(id INTEGER PRIMARY KEY, pad BLOB)");
    // ~24 MiB of incompressible pages: an upload that takes a while.
    exec(db.get(), "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM n WHERE i < 6000) "
                   "INSERT INTO big SELECT randomblob(4000) FROM n");
    query_text(db.get(), "SELECT bottomless_flush(60000)");
    // The snapshot's first uploads stall 1.5 s each (then are retried): an
    // upload that takes seconds, as a large database over a real network.
    s.proxy.set_filter("PUT", "/snapshot");
    s.proxy.set_stall_ms(1500);
    s.proxy.inject(Fault::Stall, 2);

    std::atomic<bool> done{false};
    std::string snap_error;
    std::thread snapper([&] {
        Db other = open_db(s.uri("snap.db"));
        std::string e;
        if (try_exec(other.get(), "SELECT bottomless_snapshot()", e) != SQLITE_OK) snap_error = e;
        done = true;
    });
    // The writer commits 5 KiB rows while the snapshot uploads; more than the
    // 1 MiB memory cap of them. Before, each commit past the cap waited up
    // to 2 s for room.
    // The application checkpoints as it likes meanwhile: the snapshot must
    // still come out consistent at its first attempt (not torn and retried).
    double worst = 0;
    int commits = 0;
    while (!done && commits < 3000) {
        auto t0 = Clock::now();
        exec(db.get(), "INSERT INTO t(pad) VALUES (randomblob(5000))");
        if (commits % 5 == 0) exec(db.get(), "PRAGMA wal_checkpoint(PASSIVE)");
        worst = std::max(worst, seconds_since(t0));
        ++commits;
    }
    snapper.join();
    s.proxy.clear();
    CHECK(snap_error.empty());
    // At most one torn attempt (a WAL restart that began just before the
    // snapshot is caught and read again); without the checkpoint veto every
    // checkpoint tears it, attempt after attempt.
    const std::string metrics = query_text(db.get(), "SELECT bottomless_metrics()");
    auto at = metrics.find("\nbottomless_errors_total{");
    REQUIRE(at != std::string::npos);
    const std::string line = metrics.substr(at + 1, metrics.find('\n', at + 1) - at - 1);
    const long errors = std::stol(line.substr(line.rfind(' ') + 1));
    CHECK(errors <= 1);
    INFO("commits during the snapshot: " << commits << ", slowest " << worst << " s");
    CHECK(commits > 300);
    CHECK(worst < 1.0);
    query_text(db.get(), "SELECT bottomless_flush(60000)");
    const std::string local = content_hash(db.get());
    db.reset();
    CHECK(s.restored_hash("snap.db") == local);
}

TEST_CASE("a database whose state file proves continuity opens with S3 down and no request", "[core][offline]") {
    register_bottomless();
    Setup s;
    {
        Db db = open_db(s.uri("off.db"));
        exec(db.get(), "PRAGMA journal_mode=WAL; CREATE TABLE t(x); INSERT INTO t VALUES ('before')");
        query_text(db.get(), "SELECT bottomless_flush(30000)");
    }
    const std::string gen = [&] {
        Db db = open_db(s.uri("off.db"));
        return status(db.get())["generation"].get<std::string>();
    }();

    // S3 hangs: every request stalls. Before, the open waited ~30 s for it and
    // failed with SQLITE_CANTOPEN.
    s.proxy.set_stall_ms(60'000);
    s.proxy.inject_always(Fault::Stall);
    const int seen_before = s.proxy.requests_seen();
    auto t0 = Clock::now();
    Db db = open_db(s.uri("off.db"));
    CHECK(seconds_since(t0) < 2.0);
    exec(db.get(), "INSERT INTO t VALUES ('offline 1'); INSERT INTO t VALUES ('offline 2')");
    CHECK(query_int(db.get(), "SELECT count(*) FROM t") == 3);
    CHECK(s.proxy.requests_seen() == seen_before);  // the open itself asked S3 nothing

    // S3 back: the uploader checks the bucket, which agrees, and continues
    // the same generation (no snapshot).
    s.proxy.clear();
    query_text(db.get(), "SELECT bottomless_flush(60000)");
    auto st = status(db.get());
    CHECK(st["generation"] == gen);
    CHECK(st["snapshots_uploaded"] == 0);
    const std::string local = content_hash(db.get());
    db.reset();
    CHECK(s.restored_hash("off.db") == local);
}

TEST_CASE("an offline open finds the bucket moved on: a new generation whose parent is the bucket's newest", "[core][offline]") {
    register_bottomless();
    Setup s;
    {
        Db db = open_db(s.uri("mv.db"));
        exec(db.get(), "PRAGMA journal_mode=WAL; CREATE TABLE t(x); INSERT INTO t VALUES ('one')");
        query_text(db.get(), "SELECT bottomless_flush(30000)");
    }
    // Meanwhile another machine restored the database and wrote a new
    // generation of the same database id.
    const std::string elsewhere = s.dir.file("elsewhere.db");
    {
        auto r = replicator::restore_database(*s.client, s.bucket.name(), "mv.db", elsewhere);
        REQUIRE(r.ok());
        Db other = open_db("file:" + elsewhere + "?vfs=bottomless&bucket=" + s.bucket.name() + "&endpoint=" +
                           s.proxy.url() + "&database_id=mv.db");
        exec(other.get(), "INSERT INTO t VALUES ('elsewhere')");
        query_text(other.get(), "SELECT bottomless_flush(30000)");
    }
    auto gens = replicator::list_generations(*s.client, s.bucket.name(), "mv.db");
    REQUIRE(gens.ok());
    REQUIRE(gens->size() == 2);
    const std::string theirs = (*gens)[0].id;

    // This machine's file still proves its own history locally: it opens
    // without asking S3, and the uploader then sees the bucket moved on.
    Db db = open_db(s.uri("mv.db"));
    exec(db.get(), "INSERT INTO t VALUES ('two')");
    query_text(db.get(), "SELECT bottomless_flush(60000)");
    auto st = status(db.get());
    CHECK(st["generation"] != theirs);
    CHECK(st["snapshots_uploaded"] == 1);
    gens = replicator::list_generations(*s.client, s.bucket.name(), "mv.db");
    REQUIRE(gens.ok());
    REQUIRE(gens->size() == 3);
    REQUIRE(replicator::describe_generation(*s.client, s.bucket.name(), "mv.db", (*gens)[0]).ok());
    auto head = replicator::read_snapshot_header(*s.client, s.bucket.name(),
                                                 replicator::snapshot_key("mv.db", (*gens)[0].id),
                                                 (*gens)[0].snapshot_bytes);
    REQUIRE(head.ok());
    CHECK(head->parent_generation == theirs);  // nothing of theirs is lost: it is the parent
    const std::string local = content_hash(db.get());
    db.reset();
    CHECK(s.restored_hash("mv.db") == local);
}

TEST_CASE("a backlog is cut into segments every reader accepts (at most 8192 transactions each)", "[core]") {
    register_bottomless();
    Setup s;
    // A batch interval, size and memory budget that would otherwise put the
    // whole backlog in one segment at the flush.
    Db db = open_db(s.uri("cut.db", "&batch_interval_ms=600000&batch_max_bytes=1073741824&max_pending_bytes=536870912"));
    // One WAL epoch: the backlog is captured in one piece (across an ended
    // epoch, capture may hand it over in several, each cut on its own).
    exec(db.get(), "PRAGMA journal_mode=WAL; PRAGMA synchronous=OFF; PRAGMA wal_autocheckpoint=0; CREATE TABLE t(x)");
    query_text(db.get(), "SELECT bottomless_flush(30000)");
    const int n = static_cast<int>(replicator::kMaxSegmentTxns) + 500;
    for (int i = 0; i < n; ++i) exec(db.get(), "INSERT INTO t VALUES (" + std::to_string(i) + ")");
    query_text(db.get(), "SELECT bottomless_flush(120000)");
    const std::string gen = status(db.get())["generation"];
    const std::string local = content_hash(db.get());
    db.reset();

    replicator::GenerationInfo g;
    g.id = gen;
    REQUIRE(replicator::describe_generation(*s.client, s.bucket.name(), "cut.db", g).ok());
    REQUIRE(g.last_seq >= 2);
    size_t txns = 0, largest = 0;
    for (uint64_t seq = 1; seq <= g.last_seq; ++seq) {
        auto key = replicator::segment_key("cut.db", gen, seq);
        auto info = s.client->head_object(s.bucket.name(), key);
        REQUIRE(info.ok());
        auto h = replicator::read_segment_header(*s.client, s.bucket.name(), key, info->size);
        REQUIRE(h.ok());
        txns += h->txns.size();
        largest = std::max(largest, h->txns.size());
    }
    CHECK(largest == replicator::kMaxSegmentTxns);
    CHECK(txns == static_cast<size_t>(n));
    CHECK(s.restored_hash("cut.db") == local);
}

namespace {

// What a crash leaves on disk: the database, its WAL and the state file as
// they are now, copied to `dir` (the process that wrote them is still alive,
// so nothing was closed or checkpointed on the way out).
void copy_crash_image(const std::string& from, const std::string& dir) {
    std::filesystem::create_directories(dir);
    for (const char* suffix : {"", "-wal", "-bottomless", "-bottomless-frames"})
        if (std::filesystem::exists(from + suffix)) std::filesystem::copy_file(from + suffix, dir + "/app.db" + suffix);
}

}  // namespace

TEST_CASE("a crash after a WAL restart with unshipped frames continues the generation", "[core][crash]") {
    register_bottomless();
    Setup s;
    // Their slots in the WAL: intact; overwritten by the new epoch (the copy
    // aside holds them); overwritten and the copy lost (a power loss: it is
    // not fsynced).
    const std::string slots = GENERATE(as<std::string>{}, "intact", "overwritten", "overwritten, copy lost");
    const bool overwrite = slots != "intact";
    CAPTURE(slots);
    // No upload unless asked: the frames written after the flush stay unshipped.
    Db db = open_db(s.uri("app.db", "&batch_interval_ms=600000&shutdown_timeout_ms=200"));
    exec(db.get(), "PRAGMA journal_mode=WAL; PRAGMA wal_autocheckpoint=0; CREATE TABLE t(id INTEGER PRIMARY KEY, v)");
    for (int i = 0; i < 300; ++i) exec(db.get(), "INSERT INTO t(v) VALUES (" + std::to_string(i) + ")");
    query_text(db.get(), "SELECT bottomless_flush(30000)");
    const std::string gen = status(db.get())["generation"];
    for (int i = 0; i < 20; ++i) exec(db.get(), "INSERT INTO t(v) VALUES ('unshipped " + std::to_string(i) + "')");
    // A complete checkpoint, then a write: SQLite restarts the WAL, and the
    // 20 unshipped transactions live on only in memory — and, until the new
    // epoch reaches their slots, in the WAL file.
    exec(db.get(), "PRAGMA wal_checkpoint(PASSIVE)");
    const int after = overwrite ? 400 : 3;  // 400 transactions overwrite their slots
    for (int i = 0; i < after; ++i) exec(db.get(), "INSERT INTO t(v) VALUES ('new epoch " + std::to_string(i) + "')");
    if (!overwrite) {
        // The writer never reached their slots: the uploader copied them
        // aside on its own, soon after the epoch ended.
        const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(10);
        while (!std::filesystem::exists(s.dir.file("app.db") + "-bottomless-frames") &&
               std::chrono::steady_clock::now() < until)
            std::this_thread::sleep_for(std::chrono::milliseconds(20));
        CHECK(std::filesystem::exists(s.dir.file("app.db") + "-bottomless-frames"));
    }
    const std::string crashed = s.dir.file("crashed");
    copy_crash_image(s.dir.file("app.db"), crashed);
    // The uploader copies them aside as soon as the epoch ends; when the new
    // epoch reaches their slots first, the writer does.
    if (overwrite) CHECK(std::filesystem::exists(crashed + "/app.db-bottomless-frames"));
    // Intact slots must be enough on their own (a crash before the copy).
    if (slots != "overwritten") std::filesystem::remove(crashed + "/app.db-bottomless-frames");
    const std::string expected = content_hash(db.get());
    // The writer dies without shipping anything more.
    s.proxy.inject_always(Fault::ResetBeforeRequest);
    db.reset();
    s.proxy.clear();

    Db again = open_db("file:" + crashed + "/app.db?vfs=bottomless&bucket=" + s.bucket.name() + "&endpoint=" +
                       s.proxy.url());
    CHECK(content_hash(again.get()) == expected);
    query_text(again.get(), "SELECT bottomless_flush(60000)");
    auto st = status(again.get());
    if (slots != "overwritten, copy lost") {
        // Before: every such crash started a new generation (a full upload);
        // and, until the copy aside, every one whose slots were overwritten.
        CHECK(st["generation"] == gen);
        CHECK(st["snapshots_uploaded"] == 0);
    } else {
        // Nowhere to read them from: the history cannot be proven, so a new
        // generation starts from the file (which holds them).
        CHECK(st["generation"] != gen);
    }
    again.reset();
    CHECK(s.restored_hash("app.db") == expected);
}

TEST_CASE("a state file that lags behind an upload does not cost a generation", "[core][crash]") {
    register_bottomless();
    Setup s;
    Db db = open_db(s.uri("app.db", "&batch_interval_ms=600000"));
    exec(db.get(), "PRAGMA journal_mode=WAL; PRAGMA wal_autocheckpoint=0; CREATE TABLE t(id INTEGER PRIMARY KEY, v)");
    exec(db.get(), "INSERT INTO t(v) VALUES ('one')");
    query_text(db.get(), "SELECT bottomless_flush(30000)");
    const std::string gen = status(db.get())["generation"];
    // The state file as it was before the next upload: what a process that
    // died between an upload and the state write leaves behind.
    std::filesystem::copy_file(s.dir.file("app.db-bottomless"), s.dir.file("stale-state"));
    exec(db.get(), "INSERT INTO t(v) VALUES ('two')");
    query_text(db.get(), "SELECT bottomless_flush(30000)");
    const std::string crashed = s.dir.file("crashed");
    copy_crash_image(s.dir.file("app.db"), crashed);
    std::filesystem::copy_file(s.dir.file("stale-state"), crashed + "/app.db-bottomless",
                               std::filesystem::copy_options::overwrite_existing);
    const std::string expected = content_hash(db.get());
    s.proxy.inject_always(Fault::ResetBeforeRequest);
    db.reset();
    s.proxy.clear();

    Db again = open_db("file:" + crashed + "/app.db?vfs=bottomless&bucket=" + s.bucket.name() + "&endpoint=" +
                       s.proxy.url());
    exec(again.get(), "INSERT INTO t(v) VALUES ('three')");
    query_text(again.get(), "SELECT bottomless_flush(60000)");
    auto st = status(again.get());
    // Before: the bucket's segment the state did not know of started a new
    // generation (a full upload); now the WAL proves where it ends.
    CHECK(st["generation"] == gen);
    CHECK(st["snapshots_uploaded"] == 0);
    const std::string local = content_hash(again.get());
    again.reset();
    CHECK(s.restored_hash("app.db") == local);
}

namespace {

// A workload that exercises every way SQLite writes the WAL: cache spills
// inside a transaction (frames written before the commit, then rewritten in
// place with their checksums recomputed at commit), transactions and
// savepoints rolled back after a spill (frames past mxFrame, overwritten by
// the next transaction), WAL restarts at every few commits, and two
// connections of the process taking turns (one writes an epoch's header,
// the other its frames).
void write_every_way(sqlite3* a, sqlite3* b) {
    for (sqlite3* db : {a, b}) exec(db, "PRAGMA cache_size=8; PRAGMA wal_autocheckpoint=40");
    exec(a, "CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, v BLOB)");
    for (int round = 0; round < 6; ++round) {
        sqlite3* db = round % 2 ? b : a;
        // Spill, then touch the same pages again before the commit.
        exec(db, "BEGIN; WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 400) "
                 "INSERT INTO t(v) SELECT randomblob(300) FROM c;"
                 "UPDATE t SET v = randomblob(310) WHERE id % 7 = " + std::to_string(round) + "; COMMIT");
        // Spilled, then rolled back: those frames never commit.
        exec(db, "BEGIN; UPDATE t SET v = randomblob(320); ROLLBACK");
        exec(db, "BEGIN; INSERT INTO t(v) VALUES (randomblob(100)); SAVEPOINT s;"
                 "UPDATE t SET v = randomblob(330) WHERE id % 3 = 0; ROLLBACK TO s; RELEASE s; COMMIT");
        for (int i = 0; i < 30; ++i) exec(db, "INSERT INTO t(v) VALUES (randomblob(200))");
    }
}

}  // namespace

TEST_CASE("the tee ships what SQLite wrote without reading the WAL back", "[core][tee]") {
    register_bottomless();
    const char* sync = GENERATE("NORMAL", "FULL");
    Setup s;
    const std::string uri = s.uri("tee.db", "&batch_interval_ms=50");
    Db a = open_db(uri), b = open_db(uri);
    exec(a.get(), "PRAGMA journal_mode=WAL");
    for (sqlite3* db : {a.get(), b.get()}) exec(db, std::string("PRAGMA synchronous=") + sync);
    exec(a.get(), "CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)");
    query_text(a.get(), "SELECT bottomless_flush(30000)");
    write_every_way(a.get(), b.get());
    query_text(a.get(), "SELECT bottomless_flush(60000)");

    auto st = status(a.get());
    INFO(st.dump());
    CHECK(st["wal_frames_read"] == 0);          // every frame came from the tee
    CHECK(st["snapshots_uploaded"] == 1);       // one history, no fallback generation
    CHECK(st["segments_uploaded"].get<int>() >= 1);
    CHECK(st["tee_bytes"].get<uint64_t>() < (1u << 20));  // shipped frames are not kept
    const std::string local = content_hash(a.get());
    a.reset();
    b.reset();
    CHECK(s.restored_hash("tee.db") == local);
}

TEST_CASE("pages are reused while writes go on, and a database quiet for 5 s keeps none", "[core][tee]") {
    register_bottomless();
    Setup s;
    Db db = open_db(s.uri("spares.db", "&batch_interval_ms=20"));
    exec(db.get(), "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)");
    query_text(db.get(), "SELECT bottomless_flush(30000)");
    // Spares appear once segments are encoded, while the writer goes on.
    uint64_t spares_seen = 0;
    for (int i = 0; i < 3000 && spares_seen == 0; ++i) {
        exec(db.get(), "INSERT INTO t(v) VALUES (randomblob(16000))");
        if (i % 10 == 9) spares_seen = std::max(spares_seen, status(db.get())["spare_page_bytes"].get<uint64_t>());
    }
    CHECK(spares_seen > 0);
    auto quiet_within = [&](std::chrono::seconds limit) {
        const auto until = std::chrono::steady_clock::now() + limit;
        for (;;) {
            auto st = status(db.get());
            if (st["spare_page_bytes"] == 0) return true;
            if (std::chrono::steady_clock::now() > until) {
                INFO(st.dump());
                return false;
            }
            std::this_thread::sleep_for(std::chrono::milliseconds(20));
        }
    };
    // Everything shipped: the spares stay for the next burst of commits,
    // and are freed once the database has been quiet for 5 s
    // (replicator/uploader.cpp kSpareKeep), by a step that makes no request.
    query_text(db.get(), "SELECT bottomless_flush(60000)");
    const auto flushed = std::chrono::steady_clock::now();
    auto st = status(db.get());
    CHECK(st["spare_page_bytes"].get<uint64_t>() > 0);
    const uint64_t requests = st["requests"].get<uint64_t>();
    CHECK(quiet_within(std::chrono::seconds(20)));
    CHECK(std::chrono::steady_clock::now() - flushed >= std::chrono::seconds(4));
    st = status(db.get());
    CHECK(st["memory_bytes"].get<uint64_t>() == st["tee_bytes"].get<uint64_t>());  // no pending, no segment
    CHECK(st["requests"].get<uint64_t>() == requests);

    // A snapshot that takes what the tee holds (no segment cut after it)
    // frees them too.
    for (int i = 0; i < 300; ++i) exec(db.get(), "INSERT INTO t(v) VALUES (randomblob(16000))");
    query_text(db.get(), "SELECT bottomless_snapshot()");
    CHECK(quiet_within(std::chrono::seconds(10)));
    const std::string local = content_hash(db.get());
    db.reset();
    CHECK(s.restored_hash("spares.db") == local);
}

TEST_CASE("a sync commit takes its transaction's frames from the tee", "[core][tee]") {
    register_bottomless();
    Setup s;
    Db db = open_db(s.uri("tsync.db", "&sync=1"));
    exec(db.get(), "PRAGMA journal_mode=WAL; PRAGMA cache_size=8; CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)");
    for (int i = 0; i < 5; ++i)
        exec(db.get(), "BEGIN; WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 300) "
                       "INSERT INTO t(v) SELECT randomblob(300) FROM c;"
                       "UPDATE t SET v = randomblob(301) WHERE id % 5 = 1; COMMIT");
    auto st = status(db.get());
    INFO(st.dump());
    CHECK(st["mode"] == "sync");
    CHECK(st["pending_transactions"] == 0);
    CHECK(st["wal_frames_read"] == 0);
    const std::string local = content_hash(db.get());
    db.reset();
    CHECK(s.restored_hash("tsync.db") == local);
}

TEST_CASE("opening one database does not wait for another database's start-up", "[core][registry]") {
    register_bottomless();
    Setup s;
    // slow.db's first start needs S3, which hangs (every request stalls).
    s.proxy.set_stall_ms(8'000);
    s.proxy.inject_always(Fault::Stall);
    std::atomic<bool> slow_done{false};
    std::thread slow([&] {
        Db db;
        std::string err;
        (void)try_open_db(s.uri("slow.db"), db, err);
        slow_done.store(true);
    });
    while (s.proxy.requests_seen() == 0 && !slow_done.load()) std::this_thread::sleep_for(std::chrono::milliseconds(10));

    // fast.db talks to the server directly. Before, acquire() held the
    // process-wide registry lock through slow.db's start-up.
    const std::string direct = "file:" + s.dir.file("fast.db") + "?vfs=bottomless&bucket=" + s.bucket.name() +
                               "&endpoint=http://127.0.0.1:" + std::to_string(server_port());
    auto t0 = Clock::now();
    Db fast = open_db(direct);
    exec(fast.get(), "PRAGMA journal_mode=WAL; CREATE TABLE t(x); INSERT INTO t VALUES (1)");
    const std::string metrics = query_text(fast.get(), "SELECT bottomless_metrics()");  // visits every database
    const double took = seconds_since(t0);
    const bool slow_still_starting = !slow_done.load();
    s.proxy.clear();
    slow.join();
    CHECK(slow_still_starting);
    CHECK(took < 2.0);
    CHECK_THAT(metrics, Catch::Contains("fast.db"));
    query_text(fast.get(), "SELECT bottomless_flush(30000)");
}

TEST_CASE("a database reopened while its last close still flushes waits for that flush", "[core][registry]") {
    register_bottomless();
    Setup s;
    const std::string uri = s.uri("re.db", "&batch_interval_ms=60000");
    for (int round = 0; round < 5; ++round) {
        std::thread closer;
        {
            Db db = open_db(uri);
            exec(db.get(), "PRAGMA journal_mode=WAL; CREATE TABLE IF NOT EXISTS t(x)");
            exec(db.get(), "INSERT INTO t VALUES (" + std::to_string(round) + ")");
            // The close (final flush of an unshipped commit) runs on another
            // thread while this one reopens at once.
            closer = std::thread([d = std::move(db)]() mutable { d.reset(); });
        }
        Db again = open_db(uri);
        closer.join();
        auto st = status(again.get());
        CHECK(st["role"] == "leader");  // not a follower of its own process
        CHECK(query_int(again.get(), "SELECT count(*) FROM t") == round + 1);
    }
    Db db = open_db(uri);
    query_text(db.get(), "SELECT bottomless_flush(30000)");
    CHECK(status(db.get())["snapshots_uploaded"] == 0);
    const std::string local = content_hash(db.get());
    db.reset();
    CHECK(s.restored_hash("re.db") == local);
}

TEST_CASE("snapshots under sustained writes and checkpoints are read once", "[core][snapshot]") {
    register_bottomless();
    Setup s;
    const std::string uri = s.uri("busy.db", "&batch_interval_ms=100");
    Db db = open_db(uri);
    exec(db.get(), "PRAGMA journal_mode=WAL; PRAGMA wal_autocheckpoint=50; CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB);"
                   "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 6000) "
                   "INSERT INTO t(v) SELECT randomblob(1500) FROM c");
    query_text(db.get(), "SELECT bottomless_flush(30000)");

    // One writer commits (and checkpoints, and restarts the WAL) flat out
    // while another connection starts new generations.
    std::atomic<bool> stop{false};
    std::atomic<int> commits{0}, failures{0};
    std::thread writer([&] {  // no Catch assertion on this thread
        Db w;
        std::string e;
        if (try_open_db(uri, w, e) != SQLITE_OK ||
            try_exec(w.get(), "PRAGMA wal_autocheckpoint=50; PRAGMA synchronous=NORMAL", e) != SQLITE_OK) {
            failures.fetch_add(1);
            return;
        }
        // Bounded: each bottomless_snapshot() also ships what was committed
        // while it ran, which a sanitizer build does far slower than an
        // unbounded writer commits.
        while (!stop.load() && commits.load() < 3000) {
            if (try_exec(w.get(), "INSERT INTO t(v) VALUES (randomblob(200)); UPDATE t SET v = randomblob(1500) "
                                  "WHERE id = abs(random()) % 6000 + 1", e) != SQLITE_OK)
                failures.fetch_add(1);
            else
                commits.fetch_add(1);
        }
    });
    int snapshots = 0;
    std::string err;
    for (int i = 0; i < 4; ++i) {
        Db other = open_db(uri);
        if (try_exec(other.get(), "SELECT bottomless_snapshot()", err) == SQLITE_OK) ++snapshots;
        else FAIL_CHECK("bottomless_snapshot() failed: " << err);
    }
    stop.store(true);
    writer.join();
    auto st = status(db.get());
    INFO(st.dump());
    CHECK(snapshots == 4);
    CHECK(failures.load() == 0);
    CHECK(commits.load() > 100);
    CHECK(st["snapshots_torn"] == 0);
    query_text(db.get(), "SELECT bottomless_flush(60000)");
    const std::string local = content_hash(db.get());
    db.reset();
    CHECK(s.restored_hash("busy.db") == local);
}

TEST_CASE("sync mode: a transaction durable in S3 whose commit never reached the file is brought in at open", "[core][crash]") {
    register_bottomless();
    // Killed after the state file recorded the upload, or before it did
    // (then the state file is older than the bucket: an offline start must
    // not take it for proof).
    const bool before_state = GENERATE(false, true);
    CAPTURE(before_state);
    Setup s;
    const std::string path = s.dir.file("ahead.db"), log = s.dir.file("ahead.log");
    const std::string uri = s.uri("ahead.db", "&sync=1");
    // A first run leaves a generation with a few transactions.
    std::string gen;
    {
        Db db = open_db(uri);
        exec(db.get(), "PRAGMA journal_mode=WAL; CREATE TABLE txns(k INTEGER PRIMARY KEY, r INTEGER NOT NULL);"
                       "CREATE TABLE rows(id INTEGER PRIMARY KEY, k INTEGER NOT NULL, payload BLOB)");
        gen = status(db.get())["generation"].get<std::string>();
    }
    // The writer dies right after its 4th sync commit is durable in S3,
    // before the commit frame is written locally.
    pid_t pid = fork();
    REQUIRE(pid >= 0);
    if (pid == 0) {
        setenv("BOTTOMLESS_TEST_EXIT_AFTER_SYNC_UPLOADS", "4", 1);
        if (before_state) setenv("BOTTOMLESS_TEST_EXIT_BEFORE_STATE", "1", 1);
        if (FILE* f = std::freopen((log + ".err").c_str(), "a", stderr)) (void)f;
        execl(BOTTOMLESS_CRASH_WRITER, BOTTOMLESS_CRASH_WRITER, uri.c_str(), log.c_str(), "7", static_cast<char*>(nullptr));
        _exit(127);
    }
    REQUIRE(exit_status_of(pid) == 3);

    // Reopen: the bucket is one transaction ahead of the file. Before, that
    // cost a new generation (a full snapshot); now the transaction, never
    // acknowledged, is written into the WAL and the generation goes on.
    Db db = open_db(uri);
    auto st = status(db.get());
    INFO(st.dump());
    CHECK(st["generation"] == gen);
    CHECK(query_int(db.get(), "SELECT count(*) FROM txns") == 4);  // 3 acknowledged + the one S3 kept
    CHECK(query_text(db.get(), "PRAGMA integrity_check") == "ok");
    exec(db.get(), "INSERT INTO txns VALUES (5, 0)");
    st = status(db.get());
    CHECK(st["generation"] == gen);
    CHECK(st["snapshots_uploaded"] == 0);
    const std::string local = content_hash(db.get());
    db.reset();
    CHECK(s.restored_hash("ahead.db") == local);
}

TEST_CASE("a crash after a RESTART checkpoint with unshipped frames loses nothing", "[core][crash]") {
#if defined(__SANITIZE_THREAD__)
    // The child below starts the replicator's thread after a fork without exec.
    BOTTOMLESS_SKIP("forks a process that starts threads, which ThreadSanitizer does not support");
#endif
    register_bottomless();
    Setup s;
    const std::string uri = s.uri("rc.db", "&batch_interval_ms=60000");
    {
        Db db = open_db(uri);
        exec(db.get(), "PRAGMA journal_mode=WAL; PRAGMA wal_autocheckpoint=0; CREATE TABLE t(id INTEGER PRIMARY KEY, v)");
        query_text(db.get(), "SELECT bottomless_flush(30000)");
    }
    // A child process: commits that stay unshipped (60 s batches), a RESTART
    // checkpoint (its release of the write lock reports the new, empty WAL
    // epoch), one more commit (it writes the new WAL header over the old
    // epoch's frames, still only in memory), then dies without closing.
    pid_t pid = fork();
    REQUIRE(pid >= 0);
    if (pid == 0) {
        sqlite3* db = nullptr;
        if (sqlite3_open_v2(uri.c_str(), &db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_URI, nullptr) != SQLITE_OK) _exit(10);
        const char* sql =
            "PRAGMA wal_autocheckpoint=0;"
            "INSERT INTO t(v) VALUES ('a'); INSERT INTO t(v) VALUES ('b'); INSERT INTO t(v) VALUES ('c');"
            "PRAGMA wal_checkpoint(RESTART);"
            "INSERT INTO t(v) VALUES ('d');";
        if (sqlite3_exec(db, sql, nullptr, nullptr, nullptr) != SQLITE_OK) _exit(11);
        _exit(0);
    }
    REQUIRE(exit_status_of(pid) == 0);

    // Every committed row reaches the bucket, in a history a restore can
    // replay: the same generation (the old epoch's frames read back from the
    // WAL's old slots) or a new one, never a history without a, b and c.
    Db db = open_db(uri);
    CHECK(query_int(db.get(), "SELECT count(*) FROM t") == 4);
    query_text(db.get(), "SELECT bottomless_flush(30000)");
    const std::string local = content_hash(db.get());
    db.reset();
    CHECK(s.restored_hash("rc.db") == local);
}

// A `bottomless-cli rm` of the generation being written (--force) removes
// its snapshot: segments uploaded into it afterwards could never be
// restored. The writer looks for its snapshot before a segment upload (once
// per interval; every time here) and starts a new generation instead.
TEST_CASE("a writer whose generation's snapshot was removed starts a new generation", "[core]") {
    register_bottomless();
    Setup s;
    replicator::testing_snapshot_check_interval(std::chrono::milliseconds(0));
    struct Restore {
        ~Restore() { replicator::testing_snapshot_check_interval(std::chrono::minutes(10)); }
    } restore_interval;
    Db db = open_db(s.uri("gone.db", "&batch_interval_ms=50"));
    exec(db.get(), "PRAGMA journal_mode=WAL; CREATE TABLE t(id INTEGER PRIMARY KEY, v)");
    for (int i = 0; i < 20; ++i) exec(db.get(), "INSERT INTO t(v) VALUES (" + std::to_string(i) + ")");
    query_text(db.get(), "SELECT bottomless_flush(30000)");
    const std::string gen = status(db.get())["generation"];
    REQUIRE(s.client->delete_object(s.bucket.name(), replicator::snapshot_key("gone.db", gen)).ok());

    for (int i = 0; i < 20; ++i) exec(db.get(), "INSERT INTO t(v) VALUES ('after " + std::to_string(i) + "')");
    query_text(db.get(), "SELECT bottomless_flush(30000)");
    // The flush may end with the segment refused; the new generation follows.
    const auto until = Clock::now() + std::chrono::seconds(30);
    while (status(db.get())["generation"] == gen && Clock::now() < until) {
        std::this_thread::sleep_for(std::chrono::milliseconds(50));
        query_text(db.get(), "SELECT bottomless_flush(30000)");
    }
    auto st = status(db.get());
    CHECK(st["generation"] != gen);
    CHECK(st["pending_transactions"] == 0);
    const std::string local = content_hash(db.get());
    db.reset();
    CHECK(s.restored_hash("gone.db") == local);
}
