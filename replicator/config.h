// Replication settings: environment variables (names kept from libSQL's
// bottomless) overridden by URI parameters on open. docs/CONFIG.md lists them.
#pragma once

#include <chrono>
#include <cstdint>
#include <map>
#include <optional>
#include <string>

#include "replicator/encryption.h"
#include "replicator/format.h"
#include "s3/config.h"
#include "s3/result.h"

namespace bottomless::replicator {

enum class InitialReplication { Error, Force, Skip };
const char* to_string(InitialReplication v);

struct ReplicatorConfig {
    std::string bucket = "bottomless";
    std::string db_id;                       // default: the database file's name
    InitialReplication initial_replication = InitialReplication::Error;
    bool sync = false;                       // COMMIT waits until the transaction is durable in S3
    std::chrono::milliseconds batch_interval{1000};
    uint64_t batch_max_bytes = 16ull << 20;  // ship a batch early when it grows past this
    Compression compression = Compression::Zstd;
    uint64_t max_pending_bytes = 64ull << 20;        // memory for unshipped frames; past it they stay in the WAL
    // Disk budget for a WAL that cannot restart because it holds unshipped
    // frames (S3 down or slow). 0: no budget. Past it: a warning (policy
    // warn), or writes fail with SQLITE_FULL until S3 catches up (fail).
    uint64_t max_wal_bytes = 1ull << 30;
    bool wal_budget_fail = false;
    std::chrono::milliseconds sync_timeout{10'000};  // sync mode: give up on a commit after this
    std::chrono::milliseconds shutdown_timeout{10'000};
    uint64_t snapshot_after_bytes = 1ull << 30;      // new generation after this much WAL (0: never)
    std::chrono::seconds snapshot_interval{0};       // new generation after this long (0: never)
    bool auto_restore = true;                        // restore a missing/empty database on open
    EncryptionSecret encryption;                     // empty: objects are stored in plaintext
    // Process-wide: worker threads of the uploader pool (pool.h) shared by
    // every database; 0: max(2, cores). The first database opened sets it;
    // a later one can only raise it.
    unsigned uploader_threads = 0;
    // Process-wide: the cap on the S3 requests of all databases (and read
    // replicas) of the process together, shared by them (s3/request_budget.h);
    // 0: none. LIBSQL_BOTTOMLESS_MAX_REQUESTS_PER_SECOND from the environment
    // only; a URI max_requests_per_second caps that database alone
    // (s3.max_requests_per_second, which the environment's value also sets).
    double process_max_requests_per_second = 0;
    // Read replica (replica.h): the file follows the bucket, read-only.
    bool replica = false;
    std::chrono::milliseconds replica_poll{1000};   // how often a replica asks for the next segment
    std::optional<int64_t> replica_at_us;           // time travel: the state at this time, not followed
    s3::ClientConfig s3;
};

// Names SQLite itself understands in a URI; never ours to reject.
bool is_sqlite_uri_parameter(const std::string& name);

// Builds the configuration from the environment and URI parameters (which
// win). An unknown bottomless parameter or a bad value is an error naming it.
// db_path is used for the default database id.
Result<ReplicatorConfig> load_config(const std::string& db_path, const std::map<std::string, std::string>& uri_params,
                                     const s3::EnvLookup& env = s3::process_env());

// A database id becomes a key prefix: letters, digits, '.', '_', '-' only
// (no '/': "db" and "db2" must never share a prefix).
Status validate_db_id(const std::string& id);

}  // namespace bottomless::replicator
