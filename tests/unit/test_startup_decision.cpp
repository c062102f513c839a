// The start-up decision table (docs/SEMANTICS.md "At open"), row by row,
// without a server: decide_startup() and why_not_offline() are pure.
#include <catch2/catch.hpp>

#include "replicator/startup_decision.h"

using namespace bottomless;
using namespace bottomless::replicator;

namespace {

LocalFiles present() {
    LocalFiles l;
    l.db_exists = true;
    l.db_size = 8192;
    l.db_mtime_ns = 1'700'000'000'000'000'000;
    l.db_ino = 42;
    return l;
}

LocalState state_for(const std::string& generation, uint64_t seq) {
    LocalState s;
    s.bucket = "b";
    s.db_id = "app";
    s.generation = generation;
    s.seq = seq;
    return s;
}

// Facts for a present local file, a bucket whose newest generation is G at
// segment 7, no state file; tests change what their row needs.
StartupFacts facts() {
    StartupFacts f;
    f.path = "/data/app.db";
    f.bucket = "b";
    f.db_id = "app";
    f.files = present();
    f.latest = "G";
    f.latest_seq = 7;
    return f;
}

// Counts the calls of the proof callback, answering `answer`.
struct Proof {
    bool answer = true;
    int calls = 0;
    std::function<bool()> fn() {
        return [this] {
            ++calls;
            return answer;
        };
    }
};

}  // namespace

TEST_CASE("start-up: an empty local file restores the bucket's newest generation, or starts a new history",
          "[startup]") {
    StartupFacts f = facts();
    f.files = LocalFiles{};
    SECTION("missing database, bucket has a generation: restore") {
        CHECK(decide_startup(f).action == StartupAction::Restore);
    }
    SECTION("a zero-length database and an empty WAL count as empty") {
        f.files.db_exists = true;
        f.files.wal_exists = true;
        CHECK(decide_startup(f).action == StartupAction::Restore);
    }
    SECTION("a WAL with content is not empty") {
        f.files.wal_exists = true;
        f.files.wal_size = 4096;
        CHECK(decide_startup(f).action == StartupAction::Refuse);  // no state: disagreement
    }
    SECTION("auto_restore off: a new history with no parent") {
        f.auto_restore = false;
        auto p = decide_startup(f);
        CHECK(p.action == StartupAction::NewGeneration);
        CHECK(p.reason == "auto-restore is off: a new history starts");
        CHECK(p.parent_generation.empty());
    }
    SECTION("nothing in the bucket: a new generation") {
        f.latest.reset();
        auto p = decide_startup(f);
        CHECK(p.action == StartupAction::NewGeneration);
        CHECK(p.reason == "first start: nothing in the bucket");
    }
}

TEST_CASE("start-up: a present file and an empty bucket start a new generation", "[startup]") {
    StartupFacts f = facts();
    f.latest.reset();
    auto p = decide_startup(f);
    CHECK(p.action == StartupAction::NewGeneration);
    CHECK(p.reason == "first start: the bucket has no generation of 'app'");
    CHECK(p.parent_generation.empty());
    CHECK(p.warning.empty());
}

TEST_CASE("start-up: the state file's generation continues only when the local files prove it", "[startup]") {
    StartupFacts f = facts();
    LocalState s = state_for("G", 7);
    f.state = &s;
    Proof proof;
    f.proven = proof.fn();
    SECTION("proven at the bucket's last segment: continue") {
        CHECK(decide_startup(f).action == StartupAction::Continue);
        CHECK(proof.calls == 1);
    }
    SECTION("not proven: try where the bucket ends, else a new generation whose parent is the bucket's") {
        proof.answer = false;
        auto p = decide_startup(f);
        CHECK(p.action == StartupAction::ContinueAtBucketEnd);
        CHECK(p.parent_generation == "G");
        CHECK(p.parent_seq == 7);
        CHECK_THAT(p.reason, Catch::StartsWith("the local files do not match where the bucket's history ends"));
    }
    SECTION("the bucket is ahead of the state file: the proof is not even asked") {
        f.latest_seq = 8;
        auto p = decide_startup(f);
        CHECK(p.action == StartupAction::ContinueAtBucketEnd);
        CHECK(p.parent_seq == 8);
        CHECK(proof.calls == 0);
    }
}

TEST_CASE("start-up: a file untouched since a restore starts a new generation from the restored one", "[startup]") {
    StartupFacts f = facts();
    LocalState s = state_for("R", 3);
    s.restored = true;
    s.db_size = f.files.db_size;
    s.db_mtime_ns = f.files.db_mtime_ns;
    s.db_ino = f.files.db_ino;
    f.state = &s;
    SECTION("untouched: parent is the restored generation, even when the bucket moved on") {
        auto p = decide_startup(f);
        CHECK(p.action == StartupAction::NewGeneration);
        CHECK(p.parent_generation == "R");
        CHECK(p.parent_seq == 3);
        CHECK(p.reason == "the database was restored from generation R");
    }
    SECTION("restored as the newest state and the bucket moved on: brought up to date first") {
        s.newest = true;
        SECTION("a newer generation") {}
        SECTION("more segments of the same") {
            s.generation = "G";
            s.seq = 3;
        }
        auto p = decide_startup(f);
        CHECK(p.action == StartupAction::CatchUp);
        CHECK(p.parent_generation == s.generation);  // if it cannot be: a new generation from the copy
        CHECK(p.parent_seq == 3);
    }
    SECTION("restored as the newest state, but nothing to catch up or not allowed to: as any restored copy") {
        s.newest = true;
        SECTION("the bucket has not moved") {
            s.generation = "G";
            s.seq = 7;
        }
        SECTION("auto-restore off") { f.auto_restore = false; }
        auto p = decide_startup(f);
        CHECK(p.action == StartupAction::NewGeneration);
        CHECK(p.parent_generation == s.generation);
    }
    SECTION("touched since (mtime, size, inode, or a WAL): the note proves nothing, so they disagree") {
        SECTION("mtime") { f.files.db_mtime_ns += 1; }
        SECTION("size") { f.files.db_size += 4096; }
        SECTION("inode") { f.files.db_ino += 1; }
        SECTION("a WAL") {
            f.files.wal_exists = true;
            f.files.wal_size = 32;
        }
        auto p = decide_startup(f);
        CHECK(p.action == StartupAction::Refuse);
        REQUIRE(p.error);
        CHECK(p.error->code == "ReplicaMismatch");
    }
}

TEST_CASE("start-up: the bucket's newest generation in the file's lineage is continued where it ends if the WAL holds it",
          "[startup]") {
    StartupFacts f = facts();
    LocalState s = state_for("F", 2);
    s.lineage = {"E", "G"};
    f.state = &s;
    auto p = decide_startup(f);
    CHECK(p.action == StartupAction::ContinueAtBucketEnd);
    CHECK(p.parent_generation == "G");
    CHECK(p.reason == "this file started generation G but its end is not recorded");
}

TEST_CASE("start-up: a disagreement is decided by initial_replication", "[startup]") {
    StartupFacts f = facts();
    LocalState other = state_for("OTHER", 1);
    const bool with_state = GENERATE(false, true);
    if (with_state) f.state = &other;
    SECTION("error (the default): the open fails, saying what to do") {
        auto p = decide_startup(f);
        CHECK(p.action == StartupAction::Refuse);
        REQUIRE(p.error);
        CHECK(p.error->kind == ErrorKind::InvalidArgument);
        CHECK_THAT(p.error->message, Catch::StartsWith("local database /data/app.db and s3://b/app disagree: "));
        CHECK_THAT(p.error->message, Catch::Contains("LIBSQL_BOTTOMLESS_INITIAL_REPLICATION=force"));
        CHECK_THAT(p.error->message,
                   Catch::Contains(with_state ? "is not the one this file was last replicated to (OTHER)"
                                              : "this file has no replication state for this bucket"));
    }
    SECTION("force: a new generation whose parent is the bucket's newest, with a warning") {
        f.initial_replication = InitialReplication::Force;
        auto p = decide_startup(f);
        CHECK(p.action == StartupAction::NewGeneration);
        CHECK(p.parent_generation == "G");
        CHECK(p.parent_seq == 7);
        CHECK(p.reason == "forced by initial_replication=force");
        CHECK_THAT(p.warning, Catch::Contains("initial_replication=force"));
    }
    SECTION("skip: no replication this run, with a warning") {
        f.initial_replication = InitialReplication::Skip;
        auto p = decide_startup(f);
        CHECK(p.action == StartupAction::Skip);
        CHECK_THAT(p.warning, Catch::Contains("replication skipped for this run"));
    }
}

TEST_CASE("start-up: a key that does not fit the bucket's newest generation refuses the open unless forced",
          "[startup]") {
    StartupFacts f = facts();
    LocalState s = state_for("G", 7);
    f.state = &s;
    Proof proof;
    f.proven = proof.fn();
    f.key_mismatch = make_error(ErrorKind::InvalidArgument, "the generation is encrypted with key id abc", "WrongKey");
    SECTION("not forced: refused before anything else, even a provable continuation") {
        auto p = decide_startup(f);
        CHECK(p.action == StartupAction::Refuse);
        REQUIRE(p.error);
        CHECK(p.error->code == "WrongKey");
        CHECK_THAT(p.error->message, Catch::StartsWith("cannot replicate /data/app.db: the generation is encrypted"));
        CHECK_THAT(p.error->message, Catch::Contains("open once with initial_replication=force"));
        CHECK(proof.calls == 0);
    }
    SECTION("forced: a new generation under the new key, parent the bucket's newest") {
        f.initial_replication = InitialReplication::Force;
        f.key_id = "k2";
        auto p = decide_startup(f);
        CHECK(p.action == StartupAction::NewGeneration);
        CHECK(p.reason == "encryption changed: key id k2");
        CHECK(p.parent_generation == "G");
        CHECK_THAT(p.warning, Catch::Contains("a new generation starts (initial_replication=force)"));
    }
    SECTION("forced with no key: encryption turned off") {
        f.initial_replication = InitialReplication::Force;
        CHECK(decide_startup(f).reason == "encryption turned off");
    }
}

TEST_CASE("start-up offline: only a state file proving the local files, under the generation's key", "[startup]") {
    LocalState s = state_for("G", 7);
    s.key_id = "k1";
    Proof proof;
    OfflineFacts f;
    f.bucket = "b";
    f.db_id = "app";
    f.state = &s;
    int key_calls = 0;
    std::optional<std::string> key = std::string("k1");
    f.key_id = [&] {
        ++key_calls;
        return key;
    };
    f.proven = proof.fn();
    SECTION("everything holds: no S3 request needed") {
        CHECK(why_not_offline(f).empty());
        CHECK(proof.calls == 1);
    }
    SECTION("each missing fact sends the open to the bucket, before the costlier checks") {
        SECTION("force") { f.initial_replication = InitialReplication::Force; }
        SECTION("no state file") { f.state = nullptr; }
        SECTION("a restored file") { s.restored = true; }
        SECTION("no generation") { s.generation.clear(); }
        SECTION("another bucket") { s.bucket = "other"; }
        SECTION("another id") { s.db_id = "other"; }
        SECTION("a sync upload pending") { s.sync_pending = true; }
        CHECK_FALSE(why_not_offline(f).empty());
        CHECK(key_calls == 0);
        CHECK(proof.calls == 0);
    }
    SECTION("another key, or one that cannot be derived locally: ask the bucket, without reading the WAL") {
        SECTION("another") { key = std::string("k2"); }
        SECTION("underivable") { key.reset(); }
        CHECK(why_not_offline(f) == "the configured key is not provably the generation's");
        CHECK(proof.calls == 0);
    }
    SECTION("the local files not where the history ends") {
        proof.answer = false;
        CHECK(why_not_offline(f) == "the local files are not where the recorded history ends");
    }
}
