// bottomless-cli restore --incremental (and replicator::restore_incremental)
// against the real S3 server: a writer in this process replicates through
// the embedded VFS, the built CLI runs as a subprocess.
//
//   - onto an older copy: only the new segments are downloaded, the result
//     is byte-identical to a full restore; up to date afterwards; from a copy
//     restored to a point inside a segment; a time before the copy refused
//   - refused: a copy modified since, without its note, of another database
//     id, from another history (a generation with no parent link to it);
//     --force restores those in full
//   - a newer generation: only the snapshot's frames holding pages that
//     differ (its page index, compared with the copy's page digests or its
//     hashed pages), then its segments; a damaged frame, index or digests
//     file; an encrypted one (format 1, no index) restores in full and says why
//   - SIGKILL while the segments are being applied (a stalled GET through
//     the fault proxy): the old copy and its note are left byte-identical
#include <catch2/catch.hpp>

#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>

#include <nlohmann/json.hpp>

#include "replicator/format.h"
#include "replicator/restore.h"
#include "support/fault_proxy.h"
#include "support/s3_env.h"
#include "support/sqlite_util.h"

#ifndef BOTTOMLESS_CLI_PATH
#error "BOTTOMLESS_CLI_PATH must name the built bottomless-cli"
#endif

namespace fs = std::filesystem;
using json = nlohmann::json;
using namespace bottomless;
using namespace bottomless::testing;

namespace {

std::string slurp(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    std::stringstream ss;
    ss << in.rdbuf();
    return ss.str();
}

struct Run {
    int code = -1;
    std::string out, err;
};

// Runs bottomless-cli: stdout in `out`, stderr in `err`.
Run cli(const std::string& args) {
    Run r;
    const std::string err = (fs::temp_directory_path() / ("incr-err-" + std::to_string(::getpid()))).string();
    r.code = run_command("{ env -u LIBSQL_BOTTOMLESS_DATABASE_ID " + shell_quote(BOTTOMLESS_CLI_PATH) + " " + args +
                             " 2>" + shell_quote(err) + "; }",
                         &r.out);
    r.err = slurp(err);
    fs::remove(err);
    UNSCOPED_INFO("bottomless-cli " << args << "\nexit " << r.code << "\n" << r.out << r.err);
    return r;
}

json cli_json(const std::string& args, int expect = 0) {
    Run r = cli(args + " --json");
    REQUIRE(r.code == expect);
    if (expect != 0) return {};
    return json::parse(r.out);
}

// A database replicated into `bucket`; batches ship only on flush().
struct Writer {
    Db db;
    Writer(const std::string& path, const std::string& bucket, const std::string& extra = "") {
        register_bottomless();
        db = open_db("file:" + path + "?vfs=bottomless&bucket=" + bucket + "&batch_interval_ms=3600000" + extra);
        exec(db.get(), "PRAGMA journal_mode=wal");
    }
    void sql(const std::string& s) { exec(db.get(), s); }
    void flush() { (void)query_text(db.get(), "SELECT bottomless_flush(30000)"); }
    void snapshot() { (void)query_text(db.get(), "SELECT bottomless_snapshot()"); }
    // `rows` rows of 400 random bytes in one transaction.
    void add(int rows) {
        sql("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < " + std::to_string(rows) +
            ") INSERT INTO t(pad) SELECT randomblob(400) FROM c");
    }
};

std::string file_hash(const std::string& p) { return content_hash_of_file(p); }

struct Fixture {
    std::unique_ptr<s3::Client> client = server_client();
    TestBucket bucket{*client, "incr"};
    TempDir dir;
    std::string writer_path = dir.file("w/app.db"), copy = dir.file("copy/app.db"), full = dir.file("full/app.db");
    std::string b() const { return "-b " + bucket.name() + " -d app.db "; }
    Fixture() {
        fs::create_directories(dir.file("w"));
        fs::create_directories(dir.file("copy"));
        fs::create_directories(dir.file("full"));
    }
    // Deletes segments first..last of generation `gen`, as retention would.
    void prune(const std::string& gen, uint64_t first, uint64_t last) {
        for (uint64_t seq = first; seq <= last; ++seq)
            REQUIRE(client->delete_object(bucket.name(), replicator::segment_key("app.db", gen, seq)).ok());
    }
    // The generation the restored copy at `path` belongs to, from its note.
    static std::string generation_of(const std::string& path) {
        return json::parse(slurp(path + "-bottomless"))["generation"].get<std::string>();
    }
    // A fresh full restore at `full`; returns its report.
    json full_restore(const std::string& extra = "") {
        fs::remove(full);
        fs::remove(full + "-bottomless");
        return cli_json(b() + "restore -q -o " + full + " " + extra);
    }
};

// A duplicate of the restored copy `from` at `to`, with a note of its own
// (the note records the inode and mtime), without its page digests.
void duplicate_copy(const std::string& from, const std::string& to) {
    fs::copy_file(from, to);
    fs::copy_file(from + "-bottomless", to + "-bottomless");
    fs::last_write_time(to, fs::last_write_time(from));
    json note = json::parse(slurp(to + "-bottomless"));
    struct stat st{};
    REQUIRE(::stat(to.c_str(), &st) == 0);
    note["db_ino"] = static_cast<uint64_t>(st.st_ino);
    note["db_mtime_ns"] = static_cast<int64_t>(st.st_mtim.tv_sec) * 1'000'000'000 + st.st_mtim.tv_nsec;
    std::ofstream(to + "-bottomless", std::ios::trunc) << note.dump();
}

// A big snapshot (about 2 MB of rows), then `segments` small segments.
void write_history(Writer& w, int segments, int rows_per_segment = 5) {
    w.sql("CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, pad BLOB)");
    w.add(5000);
    w.flush();
    w.snapshot();
    for (int i = 0; i < segments; ++i) {
        w.add(rows_per_segment);
        w.flush();
    }
}

}  // namespace

TEST_CASE("cli: restore --incremental applies only the new segments and equals a full restore",
          "[cli][integration][incremental]") {
    Fixture f;
    Writer w(f.writer_path, f.bucket.name());
    write_history(w, 3);
    json first = cli_json(f.b() + "restore -q -o " + f.copy);
    REQUIRE(first["segment"] == 3);
    const std::string copy2 = f.dir.file("copy/copy2.db");  // the same, applied onto a duplicate
    REQUIRE(cli(f.b() + "restore -q -o " + copy2).code == 0);

    // Three more segments, then an incremental restore onto the copy.
    for (int i = 0; i < 3; ++i) {
        w.add(7);
        w.flush();
    }
    json inc = cli_json(f.b() + "restore -q --incremental -o " + f.copy);
    CHECK(inc["incremental"] == "segments");
    CHECK(inc["applied_via"] == "wal");
    CHECK(inc["from_segment"] == 3);
    CHECK(inc["segment"] == 6);
    CHECK_FALSE(fs::exists(f.copy + "-wal"));
    const uint64_t copy2_size = fs::file_size(copy2);
    json inc2 = cli_json(f.b() + "restore -q --incremental --incremental-via copy -o " + copy2);
    CHECK(inc2["incremental"] == "segments");
    CHECK(inc2["applied_via"] != "wal");
    CHECK(inc2["copied_bytes"].get<uint64_t>() == copy2_size);
    json full = f.full_restore();
    REQUIRE(full["segment"] == 6);
    INFO("incremental downloaded " << inc["downloaded_bytes"] << ", full " << full["downloaded_bytes"]);
    CHECK(inc["downloaded_bytes"].get<uint64_t>() * 20 < full["downloaded_bytes"].get<uint64_t>());
    CHECK(slurp(f.copy) == slurp(f.full));  // byte for byte
    CHECK(slurp(copy2) == slurp(f.full));
    CHECK(file_hash(f.copy) == file_hash(f.full));
    CHECK(integrity_of_file(f.copy) == "ok");

    // Nothing new: up to date, nothing written.
    const std::string before = slurp(f.copy + "-bottomless");
    json again = cli_json(f.b() + "restore -q --incremental -o " + f.copy);
    CHECK(again["incremental"] == "up-to-date");
    CHECK(slurp(f.copy + "-bottomless") == before);

    // The library call, from a copy restored to a point inside a segment:
    // the rest of that segment and the next are applied.
    w.sql("BEGIN");
    w.add(3);
    w.sql("COMMIT");
    const int64_t mid = std::chrono::duration_cast<std::chrono::microseconds>(
                            std::chrono::system_clock::now().time_since_epoch())
                            .count();
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
    w.add(4);
    w.flush();  // segment 7: two transactions, the point in time between them
    w.add(2);
    w.flush();  // segment 8
    const std::string pit = f.dir.file("copy/pit.db");
    replicator::RestoreOptions o;
    o.until_us = mid;
    auto r1 = replicator::restore_database(*f.client, f.bucket.name(), "app.db", pit, o);
    REQUIRE(r1.ok());
    CHECK(r1->seq == 6);
    CHECK(r1->next_txns == 1);

    // Cannot go back: a time before the copy's newest transaction.
    o.incremental = true;
    o.until_us = json::parse(slurp(f.copy + "-bottomless"))["last_commit_us"].get<int64_t>() - 1;
    auto back = replicator::restore_database(*f.client, f.bucket.name(), "app.db", f.copy, o);
    REQUIRE_FALSE(back.ok());
    CHECK(back.error().code == "NotIncremental");
    CHECK(back.error().message.find("cannot go back") != std::string::npos);

    o.until_us.reset();
    auto r2 = replicator::restore_database(*f.client, f.bucket.name(), "app.db", pit, o);
    REQUIRE(r2.ok());
    CHECK(r2->incremental == "segments");
    CHECK(r2->from_seq == 6);
    CHECK(r2->seq == 8);
    CHECK(r2->transactions == 2);  // the second of segment 7, segment 8's one
    CHECK(r2->applied_via == "wal");
    f.full_restore();
    CHECK(slurp(pit) == slurp(f.full));
    CHECK(integrity_of_file(pit) == "ok");

    // A newer generation: the copy's generation continued two segments past
    // it before the new snapshot. Those segments bring the copy to the
    // snapshot's state (every page they write checked against its index),
    // then the new generation's segments.
    const std::string copy3 = f.dir.file("copy/copy3.db");
    duplicate_copy(f.copy, copy3);
    w.snapshot();
    w.add(1);
    w.flush();
    const std::string old_gen = Fixture::generation_of(f.copy);
    json across = cli_json(f.b() + "restore -q --incremental -o " + f.copy);
    INFO(across.dump());
    CHECK(across["incremental"] == "pages");
    CHECK(across["from_generation"] == old_gen);
    CHECK(across["compared_with"] == "digests");  // left by the restores that wrote the copy
    CHECK(across["applied_via"] == "wal");
    CHECK(across["segment"] == 1);
    CHECK(across["bridge_segments"] == 2);  // 7 and 8 of the copy's generation
    CHECK(across["bridge_generations"] == 1);
    CHECK(across["bridge_pages"].get<uint64_t>() >= 1);
    CHECK(across["frames_fetched"] == 0);  // the snapshot was taken where segment 8 ends
    CHECK(across["pages_changed"] == 0);
    json full2 = f.full_restore();
    CHECK(file_hash(f.copy) == file_hash(f.full));
    CHECK(slurp(f.copy) == slurp(f.full));
    CHECK(integrity_of_file(f.copy) == "ok");
    // Without those segments (pruned, as retention would): the snapshot's
    // page index says which pages differ from the copy; only their frames
    // are fetched. Onto a duplicate of the file, this time.
    f.prune(old_gen, 7, 8);
    json across2 = cli_json(f.b() + "restore -q --incremental --incremental-via copy -o " + copy3);
    CHECK(across2["incremental"] == "pages");
    CHECK(across2["bridge_segments"] == 0);
    CHECK(across2["compared_with"] == "file");  // no digests of its own: its pages read and hashed
    CHECK(across2["applied_via"] != "wal");
    CHECK(across2["pages_changed"].get<uint64_t>() >= 1);
    CHECK(across2["pages_changed"].get<uint64_t>() < across2["pages"].get<uint64_t>());
    CHECK(across2["frames_fetched"].get<uint64_t>() >= 1);
    CHECK(slurp(copy3) == slurp(f.full));
    // The note now names the new generation: the next one is up to date.
    json again2 = cli_json(f.b() + "restore -q --incremental -o " + f.copy);
    CHECK(again2["incremental"] == "up-to-date");

    // No copy at all: a full restore.
    json none = cli_json(f.b() + "restore -q --incremental -o " + f.dir.file("copy/new.db"));
    CHECK(none["incremental"] == "full");
}

TEST_CASE("cli: restore --incremental refuses a copy it cannot prove, --force restores it in full",
          "[cli][integration][incremental]") {
    Fixture f;
    const std::string older = f.dir.file("copy/older.db");  // restored at segment 1, the copy at 2
    {
        Writer w(f.writer_path, f.bucket.name());
        write_history(w, 1);
        // To a chosen generation (-g): opened, it is a rollback, not brought
        // up to date as a copy of the newest state would be.
        const std::string gen = cli_json(f.b() + "ls")["generations"][0]["id"];
        REQUIRE(cli("-b " + f.bucket.name() + " -d app.db restore -q -g " + gen + " -o " + older).code == 0);
        w.add(3);
        w.flush();
        REQUIRE(cli(f.b() + "restore -q -o " + f.copy).code == 0);
        w.add(3);
        w.flush();
    }
    const std::string copy_bytes = slurp(f.copy);
    auto refused = [&](const std::string& path, const std::string& why) {
        Run r = cli(f.b() + "restore -q --incremental -o " + path);
        CHECK(r.code == 1);
        CHECK(r.err.find(why) != std::string::npos);
        CHECK(r.err.find("--force") != std::string::npos);
    };

    SECTION("modified locally since the restore") {
        {
            sqlite3* raw = nullptr;
            REQUIRE(sqlite3_open_v2(f.copy.c_str(), &raw, SQLITE_OPEN_READWRITE, "unix") == SQLITE_OK);
            Db db(raw);
            exec(db.get(), "PRAGMA journal_mode=delete");
            exec(db.get(), "INSERT INTO t(pad) VALUES(x'00')");
        }
        const std::string modified = slurp(f.copy);
        refused(f.copy, "changed since it was restored");
        CHECK(slurp(f.copy) == modified);  // a refusal writes nothing
        json forced = cli_json(f.b() + "restore -q --incremental --force -o " + f.copy);
        CHECK(forced["incremental"] == "full");
        CHECK(forced["incremental_reason"].get<std::string>().find("refused") != std::string::npos);
        f.full_restore();
        CHECK(slurp(f.copy) == slurp(f.full));
    }
    SECTION("a WAL with content next to it") {
        {
            std::ofstream(f.copy + "-wal") << "x";
        }
        refused(f.copy, "-wal has content");
    }
    SECTION("no state note") {
        fs::remove(f.copy + "-bottomless");
        refused(f.copy, "no readable state note");
        CHECK(slurp(f.copy) == copy_bytes);
    }
    SECTION("another database id") {
        Run r = cli("-b " + f.bucket.name() + " -d other.db restore -q --incremental -o " + f.copy);
        CHECK(r.code != 0);
        CHECK(slurp(f.copy) == copy_bytes);
    }
    SECTION("a newer generation that continued from before the copy's position (a rollback)") {
        {
            // Opened with bottomless, the older restore starts a generation
            // whose parent is segment 1 of the copy's generation.
            Writer w2(older, f.bucket.name(), "&database_id=app.db");
            w2.add(1);
            w2.flush();
        }
        refused(f.copy, "the history went another way");
        CHECK(slurp(f.copy) == copy_bytes);
    }
    SECTION("another history: a new generation without a parent link") {
        fs::create_directories(f.dir.file("w2"));
        {
            Writer w2(f.dir.file("w2/app.db"), f.bucket.name(), "&auto_restore=0");
            w2.sql("CREATE TABLE u(x)");
            w2.flush();
        }
        refused(f.copy, "another history");
        CHECK(slurp(f.copy) == copy_bytes);
        json forced = cli_json(f.b() + "restore -q --incremental --force -o " + f.copy);
        CHECK(forced["incremental"] == "full");
        f.full_restore();
        CHECK(slurp(f.copy) == slurp(f.full));
    }
}

TEST_CASE("cli: across a generation, a damaged frame or index is refused and the copy left as it was",
          "[cli][integration][incremental]") {
    Fixture f;
    Writer w(f.writer_path, f.bucket.name());
    write_history(w, 1);
    REQUIRE(cli(f.b() + "restore -q -o " + f.copy).code == 0);
    w.add(50);  // pages past the copy's end: the last frames are fetched
    w.flush();
    const std::string gen = query_text(w.db.get(), "SELECT bottomless_snapshot()");
    // Not through the copy's generation's segment 2 (which would read no frame).
    f.prune(Fixture::generation_of(f.copy), 2, 2);
    const std::string key = "app.db/" + gen + "/snapshot";
    auto original = f.client->get_object(f.bucket.name(), key);
    REQUIRE(original.ok());
    auto header = replicator::peek_snapshot_header(*original, key);
    REQUIRE(header.ok());
    REQUIRE(header->frame_pages > 0);
    const uint64_t tail = replicator::page_index_tail_size(*header);
    auto idx = replicator::parse_page_index(std::string_view(*original).substr(original->size() - tail), original->size(),
                                            *header, key);
    REQUIRE(idx.ok());
    const std::string copy_before = slurp(f.copy), note_before = slurp(f.copy + "-bottomless");
    auto damaged_restore = [&](std::string bytes, const std::string& expect) {
        REQUIRE(f.client->put_object(f.bucket.name(), key, bytes).ok());
        Run r = cli(f.b() + "restore -q --incremental -o " + f.copy);
        CHECK(r.code == 1);
        CHECK(r.err.find(expect) != std::string::npos);
        CHECK(r.err.find(key) != std::string::npos);  // the object is named
        CHECK(slurp(f.copy) == copy_before);
        CHECK(slurp(f.copy + "-bottomless") == note_before);
        CHECK_FALSE(fs::exists(f.copy + "-wal"));
    };
    SECTION("a byte of the last frame") {
        std::string bad = *original;
        const uint32_t last = idx->frames() - 1;
        bad[(idx->frame_offset[last] + idx->frame_offset[last + 1]) / 2] ^= 0x10;
        damaged_restore(bad, "frame " + std::to_string(last));
    }
    SECTION("damaged page digests beside the copy are not trusted: the copy is hashed instead") {
        REQUIRE(fs::exists(f.copy + "-bottomless-pages"));
        std::string d = slurp(f.copy + "-bottomless-pages");
        d[d.size() - 40] ^= 0x01;  // a digest: the file's own SHA-256 no longer matches
        std::ofstream(f.copy + "-bottomless-pages", std::ios::binary | std::ios::trunc) << d;
        json r = cli_json(f.b() + "restore -q --incremental -o " + f.copy);
        CHECK(r["incremental"] == "pages");
        CHECK(r["compared_with"] == "file");
        f.full_restore();
        CHECK(slurp(f.copy) == slurp(f.full));
        return;
    }
    SECTION("a byte of the index") {
        std::string bad = *original;
        bad[original->size() - tail + 8 + 4 * idx->frames()] ^= 0x01;  // page 1's digest
        damaged_restore(bad, "page index");
    }
    // The object as it was: the same restore goes through.
    REQUIRE(f.client->put_object(f.bucket.name(), key, *original).ok());
    json ok = cli_json(f.b() + "restore -q --incremental -o " + f.copy);
    CHECK(ok["incremental"] == "pages");
    f.full_restore();
    CHECK(slurp(f.copy) == slurp(f.full));
}

TEST_CASE("cli: across a generation, what the copy's generation's segments do not give comes from the snapshot's frames",
          "[cli][integration][incremental]") {
    Fixture f;
    std::string old_gen;
    const std::string copy2 = f.dir.file("copy/copy2.db"), copy3 = f.dir.file("copy/copy3.db");
    {
        Writer w(f.writer_path, f.bucket.name());
        write_history(w, 1);
        REQUIRE(cli(f.b() + "restore -q -o " + f.copy).code == 0);
        old_gen = Fixture::generation_of(f.copy);
        duplicate_copy(f.copy, copy2);
        duplicate_copy(f.copy, copy3);
        // Two segments of rows spread over the table: they touch every
        // frame of a snapshot, and weigh less than those frames.
        for (int i = 0; i < 2; ++i) {
            w.sql("UPDATE t SET pad = randomblob(400) WHERE id % 97 = " + std::to_string(i));
            w.flush();
        }
    }
    {
        // Changed without bottomless: the next open starts a generation
        // whose snapshot holds a change no segment of the old one has.
        sqlite3* raw = nullptr;
        REQUIRE(sqlite3_open_v2(f.writer_path.c_str(), &raw, SQLITE_OPEN_READWRITE, "unix") == SQLITE_OK);
        Db db(raw);
        // Row 2500's page: the segments did not write it. Row 2522's (2522 %
        // 97 == 0): they wrote it, and what they wrote is not the snapshot's.
        exec(db.get(), "UPDATE t SET pad = randomblob(400) WHERE id IN (2500, 2522)");
    }
    Writer w(f.writer_path, f.bucket.name());
    w.flush();
    json r = cli_json(f.b() + "restore -q --incremental -o " + f.copy);
    INFO(r.dump());
    CHECK(r["incremental"] == "pages");
    CHECK(r["from_generation"] == old_gen);
    CHECK(r["bridge_segments"] == 2);
    CHECK(r["bridge_pages"].get<uint64_t>() > 40);
    // The pages changed outside (and none that the segments gave).
    CHECK(r["pages_changed"].get<uint64_t>() >= 2);
    CHECK(r["pages_changed"].get<uint64_t>() <= 3);
    CHECK(r["frames_fetched"].get<uint64_t>() >= 1);
    CHECK(r["frames_fetched"].get<uint64_t>() <= 3);
    CHECK(r["bridge_transactions"] == 2);
    CHECK(r["transactions"] == 0);  // the new generation has no segment yet
    f.full_restore();
    CHECK(slurp(f.copy) == slurp(f.full));
    CHECK(integrity_of_file(f.copy) == "ok");
    CHECK(query_text(open_db(f.copy).get(), "SELECT count(*) FROM t") == "5005");

    // The same onto a duplicate of the file (no WAL journal).
    json r2 = cli_json(f.b() + "restore -q --incremental --incremental-via copy -o " + copy2);
    CHECK(r2["incremental"] == "pages");
    CHECK(r2["applied_via"] != "wal");
    CHECK(r2["bridge_segments"] == 2);
    CHECK(r2["pages_changed"].get<uint64_t>() >= 2);
    CHECK(slurp(copy2) == slurp(f.full));

    // The second of those segments damaged: the first one's pages are
    // written already (those that match the snapshot stay); the second's,
    // and the pages changed outside, come from the frames.
    const std::string key2 = replicator::segment_key("app.db", old_gen, 3);
    auto seg = f.client->get_object(f.bucket.name(), key2);
    REQUIRE(seg.ok());
    std::string bad = *seg;
    bad[bad.size() / 2] ^= 0x20;
    REQUIRE(f.client->put_object(f.bucket.name(), key2, bad).ok());
    json r3 = cli_json(f.b() + "restore -q --incremental -o " + copy3);
    INFO(r3.dump());
    CHECK(r3["incremental"] == "pages");
    CHECK(r3["bridge_segments"] == 0);
    CHECK(r3["bridge_fallback"].get<std::string>().find(key2) != std::string::npos);
    CHECK(r3["pages_changed"].get<uint64_t>() > 40);  // the second segment's pages
    CHECK(slurp(copy3) == slurp(f.full));
    CHECK(integrity_of_file(copy3) == "ok");
}

TEST_CASE("cli: across several generations, the segments of each bring the copy to the newest snapshot",
          "[cli][integration][incremental]") {
    Fixture f;
    Writer w(f.writer_path, f.bucket.name());
    write_history(w, 1);
    REQUIRE(cli(f.b() + "restore -q -o " + f.copy).code == 0);
    const std::string g1 = Fixture::generation_of(f.copy);
    // Each generation rewrites rows spread over the table (every frame of
    // a snapshot), then a new one starts from it.
    auto spread = [&](int i) {
        w.sql("UPDATE t SET pad = randomblob(400) WHERE id % 97 = " + std::to_string(i));
        w.flush();
    };
    spread(0);                      // segment 2 of g1
    const std::string g2 = query_text(w.db.get(), "SELECT bottomless_snapshot()");
    spread(1);                      // segment 1 of g2
    spread(2);                      // segment 2 of g2
    const std::string g3 = query_text(w.db.get(), "SELECT bottomless_snapshot()");
    w.add(1);                       // segment 1 of g3
    w.flush();
    const std::string before = slurp(f.copy);
    json r = cli_json(f.b() + "restore -q --incremental -o " + f.copy);
    INFO(r.dump());
    CHECK(r["incremental"] == "pages");
    CHECK(r["from_generation"] == g1);
    CHECK(r["generation"] == g3);
    CHECK(r["bridge_generations"] == 2);
    CHECK(r["bridge_segments"] == 3);      // g1's 2, g2's 1 and 2
    CHECK(r["bridge_transactions"] == 3);
    CHECK(r["frames_fetched"] == 0);       // each snapshot was taken where its parent's segments end
    CHECK(r["segment"] == 1);
    f.full_restore();
    CHECK(slurp(f.copy) == slurp(f.full));
    CHECK(slurp(f.copy) != before);
    CHECK(integrity_of_file(f.copy) == "ok");
}

TEST_CASE("cli: across a generation, the old generation's segments that cannot be read (encrypted, no key) give way to the frames",
          "[cli][integration][incremental]") {
    Fixture f;
    const std::string key(64, 'e');
    std::string old_gen;
    {
        Writer w(f.writer_path, f.bucket.name(), "&encryption_key=" + key);
        write_history(w, 1);
        REQUIRE(cli(f.b() + "--encryption-key " + key + " restore -q -o " + f.copy).code == 0);
        old_gen = Fixture::generation_of(f.copy);
        w.sql("UPDATE t SET pad = randomblob(400) WHERE id % 97 = 0");  // lighter than the frames it touches
        w.flush();
    }
    // Encryption turned off (which takes initial_replication=force): a
    // plaintext generation (format 2) whose parent is the encrypted one.
    Writer w(f.writer_path, f.bucket.name(), "&initial_replication=force");
    w.flush();
    json ls = cli_json(f.b() + "ls");
    INFO(ls.dump());
    REQUIRE(ls["generations"][0]["parent"] == old_gen);
    REQUIRE(ls["generations"][0]["parent_seq"] == 2);
    REQUIRE(ls["generations"][0]["snapshot_format"] == 2);
    // No key (the new generation is plaintext): the bridge cannot decrypt
    // segment 2 of the old one; every page comes from the frames.
    json r = cli_json(f.b() + "restore -q --incremental -o " + f.copy);
    INFO(r.dump());
    CHECK(r["incremental"] == "pages");
    CHECK(r["bridge_fallback"].get<std::string>().find("no encryption key was given") != std::string::npos);
    CHECK(r["bridge_segments"] == 0);
    CHECK(r["frames_fetched"].get<uint64_t>() >= 1);
    f.full_restore();
    CHECK(slurp(f.copy) == slurp(f.full));
    CHECK(integrity_of_file(f.copy) == "ok");
}

TEST_CASE("cli: across a generation of an encrypted database, a full restore that says why",
          "[cli][integration][incremental]") {
    Fixture f;
    const std::string key(64, 'e');
    Writer w(f.writer_path, f.bucket.name(), "&encryption_key=" + key);
    write_history(w, 1);
    const std::string k = "--encryption-key " + key + " ";
    REQUIRE(cli(f.b() + k + "restore -q -o " + f.copy).code == 0);
    CHECK_FALSE(fs::exists(f.copy + "-bottomless-pages"));  // format 1: no index, no digests
    w.add(5);
    w.flush();
    (void)query_text(w.db.get(), "SELECT bottomless_snapshot()");
    json ls = cli_json(f.b() + "ls");
    CHECK(ls["generations"][0]["snapshot_format"] == 1);
    json r = cli_json(f.b() + k + "restore -q --incremental -o " + f.copy);
    CHECK(r["incremental"] == "full");
    CHECK(r["incremental_reason"].get<std::string>().find("no page index (format 1: encrypted)") != std::string::npos);
    json full = f.full_restore(k);
    CHECK(slurp(f.copy) == slurp(f.full));
}

TEST_CASE("cli: an incremental restore killed midway leaves the old copy intact", "[cli][integration][incremental]") {
    const std::string via = GENERATE(as<std::string>{}, "wal", "copy");
    INFO("--incremental-via " << via);
    Fixture f;
    Writer w(f.writer_path, f.bucket.name());
    write_history(w, 1);
    REQUIRE(cli(f.b() + "restore -q -o " + f.copy).code == 0);
    for (int i = 0; i < 4; ++i) {
        w.add(5);
        w.flush();
    }
    const std::string copy_bytes = slurp(f.copy), note = slurp(f.copy + "-bottomless");
    struct stat before{};
    REQUIRE(::stat(f.copy.c_str(), &before) == 0);

    // The last segment's GET stalls: the CLI has duplicated the copy and is
    // applying segments when it is killed.
    FaultProxy proxy("127.0.0.1", server_port());
    proxy.set_stall_ms(60000);
    proxy.set_filter("GET", "seg-000000000005");
    proxy.inject_always(Fault::Stall);
    // Its journal, or the duplicate of the copy.
    const std::string tmp = f.copy + (via == "wal" ? ".restore-wal" : ".restore-tmp");
    pid_t pid = ::fork();
    REQUIRE(pid >= 0);
    if (pid == 0) {
        ::unsetenv("LIBSQL_BOTTOMLESS_DATABASE_ID");
        int devnull = ::open("/dev/null", O_WRONLY);
        ::dup2(devnull, 1);
        ::dup2(devnull, 2);
        ::execl(BOTTOMLESS_CLI_PATH, BOTTOMLESS_CLI_PATH, "-e", proxy.url().c_str(), "-b", f.bucket.name().c_str(),
                "-d", "app.db", "restore", "-q", "--incremental", "--incremental-via", via.c_str(), "-o", f.copy.c_str(),
                static_cast<char*>(nullptr));
        ::_exit(127);
    }
    bool duplicated = false;
    for (int i = 0; i < 300 && !duplicated; ++i) {
        struct stat st{};
        // The journal is created before the first GET (its pages are
        // batched: it may stay empty until then); the duplicate is whole.
        duplicated = ::stat(tmp.c_str(), &st) == 0 && (via == "wal" || st.st_size >= before.st_size);
        if (!duplicated) std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(300));  // into the segments
    ::kill(pid, SIGKILL);
    int status = 0;
    ::waitpid(pid, &status, 0);
    proxy.clear();
    REQUIRE(duplicated);
    CHECK(WIFSIGNALED(status));
    CHECK(slurp(f.copy) == copy_bytes);
    CHECK(slurp(f.copy + "-bottomless") == note);
    struct stat after{};
    REQUIRE(::stat(f.copy.c_str(), &after) == 0);
    CHECK(after.st_ino == before.st_ino);
    CHECK(after.st_mtim.tv_nsec == before.st_mtim.tv_nsec);
    CHECK_FALSE(fs::exists(f.copy + "-wal"));

    // The copy still proves itself: the next incremental restore completes.
    json inc = cli_json(f.b() + "restore -q --incremental -o " + f.copy);
    CHECK(inc["incremental"] == "segments");
    f.full_restore();
    CHECK(slurp(f.copy) == slurp(f.full));
}

namespace {

// bottomless_s3_received_bytes_total of the database at `path` (canonical),
// from bottomless_metrics(): response bytes its replicator's client received.
long long received_bytes(sqlite3* db, const std::string& path) {
    std::istringstream in(query_text(db, "SELECT bottomless_metrics()"));
    const std::string want = "bottomless_s3_received_bytes_total{database=\"" + fs::canonical(path).string() + "\"";
    for (std::string line; std::getline(in, line);)
        if (line.rfind(want, 0) == 0) return std::stoll(line.substr(line.rfind(' ') + 1));
    FAIL("no received-bytes sample for " << path);
    return -1;
}

}  // namespace

TEST_CASE("open: a copy restored as the newest state is brought up to date with only the segments it lacks",
          "[integration][incremental][open]") {
    Fixture f;
    std::string copied_at;
    {
        Writer w(f.writer_path, f.bucket.name());
        write_history(w, 2);
        json first = cli_json(f.b() + "restore -q -o " + f.copy);  // the newest state: the note says so
        REQUIRE(first["segment"] == 2);
        copied_at = first["generation"];
        REQUIRE(cli(f.b() + "restore -q -g " + copied_at + " -o " + f.dir.file("copy/pinned.db")).code == 0);
        for (int i = 0; i < 4; ++i) {  // the bucket moves on: 4 more segments
            w.add(5);
            w.flush();
        }
    }
    json full = f.full_restore();
    REQUIRE(full["segment"] == 6);
    const long long full_rows = [&] {
        Db d = open_db("file:" + f.full + "?mode=ro");
        return query_int(d.get(), "SELECT count(*) FROM t");
    }();
    const std::string opts = "?vfs=bottomless&bucket=" + f.bucket.name() + "&database_id=app.db&batch_interval_ms=3600000";

    SECTION("the newest state: the 4 segments only, then the same as a full restore") {
        register_bottomless();
        REQUIRE(fs::exists(f.copy + "-bottomless-pages"));  // the restore's page digests
        Db db = open_db("file:" + f.copy + opts);
        CHECK(query_int(db.get(), "SELECT count(*) FROM t") == full_rows);
        // Replicated from now on: the restore's digests no longer describe it.
        CHECK_FALSE(fs::exists(f.copy + "-bottomless-pages"));
        const long long got = received_bytes(db.get(), f.copy);
        const long long all = full["downloaded_bytes"];
        INFO("received at open " << got << " bytes, a full restore downloads " << all);
        CHECK(got > 0);
        CHECK(got * 20 < all);  // < 5 % of a full restore (without the catch-up it would hold 4 segments less)
        // A new generation starts from the caught-up state, the old one its parent.
        (void)query_text(db.get(), "SELECT bottomless_flush(30000)");
        db.reset();
        json ls = cli_json(f.b() + "ls");
        REQUIRE(ls["generations"].size() == 3);  // write_history's two and the new one
        CHECK(ls["generations"][1]["id"] == copied_at);
        CHECK(content_hash_of_file(f.copy) == content_hash_of_file(f.full));
    }
    SECTION("a copy restored to a chosen generation stays as it is (a rollback)") {
        register_bottomless();
        Db db = open_db("file:" + f.dir.file("copy/pinned.db") + opts);
        CHECK(query_int(db.get(), "SELECT count(*) FROM t") == full_rows - 4 * 5);
    }
}
