// The start-up decision as pure functions (docs/SEMANTICS.md "At open"):
// what an open does with a database file, from facts the replicator gathers
// (the state file, the local files, one listing of the bucket). No I/O here:
// the facts that cost reads (the local proof, the key's id) are asked through
// callbacks, only when the decision needs them, so tests/unit drives every row
// of the decision table without a server.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>

#include "replicator/config.h"
#include "replicator/state_file.h"
#include "s3/result.h"

namespace bottomless::replicator {

// ---- Without S3 ----

// What may let an open continue offline; the callbacks read local files.
struct OfflineFacts {
    InitialReplication initial_replication = InitialReplication::Error;
    std::string bucket, db_id;  // configured
    const LocalState* state = nullptr;  // the state file, if it parsed
    // The configured key's id ("" for none), derived from the material and,
    // for a passphrase, the KDF parameters the state file recorded; nullopt
    // when it cannot be derived locally.
    std::function<std::optional<std::string>()> key_id;
    // Whether the local files are exactly where the state's history ends.
    std::function<bool()> proven;
};

// Empty when the open may continue the state file's generation without a
// single S3 request; otherwise why it must ask the bucket (for the log).
std::string why_not_offline(const OfflineFacts& f);

// ---- With the bucket ----

// What stat() says of the database file and its WAL.
struct LocalFiles {
    bool db_exists = false;
    int64_t db_size = 0, db_mtime_ns = 0;
    uint64_t db_ino = 0;
    bool wal_exists = false;
    int64_t wal_size = 0;
};

struct StartupFacts {
    InitialReplication initial_replication = InitialReplication::Error;
    bool auto_restore = true;
    std::string path, bucket, db_id;  // for the messages
    std::string key_id;               // the configured key's id; "" for none
    LocalFiles files;
    // The state file, when it names the configured bucket and database id.
    const LocalState* state = nullptr;
    // The bucket's newest generation with a snapshot, and its last segment.
    std::optional<std::string> latest;
    uint64_t latest_seq = 0;
    // The configured key does not fit the bucket's newest generation (no key
    // for an encrypted one, a key for a plaintext one, another key).
    std::optional<Error> key_mismatch;
    // Whether the local files are exactly where the state's history ends
    // (asked only when the state names the bucket's newest generation at its
    // last segment).
    std::function<bool()> proven;
};

enum class StartupAction {
    Restore,              // restore `latest` before SQLite reads the file; then a new generation from it
    // A copy restored as the bucket's newest state, untouched, that the
    // bucket has moved past: bring it up to date (restore_incremental: only
    // the segments it lacks) before SQLite reads it; then a new generation
    // from it. If the copy cannot be brought up (refused, or the bucket
    // fails), NewGeneration from the copy as it is (parent_generation).
    CatchUp,
    Continue,             // continue the state file's generation
    ContinueAtBucketEnd,  // continue where `latest` ends if the local WAL holds it; else a new generation
    NewGeneration,        // a snapshot at the first chance
    Skip,                 // open without replication for this run
    Refuse,               // the open fails with `error`
};

struct StartupPlan {
    StartupAction action = StartupAction::NewGeneration;
    // NewGeneration (and ContinueAtBucketEnd's fallback): why, and the parent.
    std::string reason;
    std::string parent_generation;
    uint64_t parent_seq = 0;
    // Logged as a warning: a forced or skipped replication, a key switch.
    std::string warning;
    std::optional<Error> error;  // Refuse
};

StartupPlan decide_startup(const StartupFacts& f);

}  // namespace bottomless::replicator
