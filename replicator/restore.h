// Reading a database's history back from the bucket: listing generations,
// and restoring the latest state, a given generation, or the state at a point
// in time (transaction granularity) into a file.
//
// A restore downloads the snapshot and the segments (several in flight),
// checks every object's trailer checksum and the chain between them (each
// segment names the SHA-256 of its predecessor and continues its WAL
// position), applies whole transactions only, writes to PATH.restore-tmp,
// fsyncs, runs PRAGMA integrity_check, and renames into place. Any missing,
// corrupt or out-of-chain object stops it with an error naming the object,
// and nothing is left at the destination.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "replicator/format.h"
#include "s3/client.h"
#include "s3/result.h"

namespace bottomless::replicator {

struct GenerationInfo {
    std::string id;
    int64_t created_ms = 0;       // from the id
    bool has_snapshot = false;
    uint64_t snapshot_bytes = 0;
    uint64_t segments = 0;        // count of segment objects
    uint64_t last_seq = 0;
    uint64_t segment_bytes = 0;
};

// Generations of db_id, newest first (ids and creation times: one listing
// with a delimiter per 1000 generations).
Result<std::vector<GenerationInfo>> list_generations(s3::Client& client, const std::string& bucket,
                                                     const std::string& db_id);
// Fills the object counts and sizes of one generation (lists its objects).
Status describe_generation(s3::Client& client, const std::string& bucket, const std::string& db_id,
                           GenerationInfo& info);
// Database ids present in the bucket (for "no such database" messages).
Result<std::vector<std::string>> list_databases(s3::Client& client, const std::string& bucket);

// Reads the header of an object of `size` bytes: the first 4 KiB, or more
// when the header says it is longer. Headers are plaintext even in an
// encrypted replica. An object gone meanwhile is a Corrupt "MissingObject".
Result<SnapshotHeader> read_snapshot_header(s3::Client& client, const std::string& bucket, const std::string& key,
                                            uint64_t size);
Result<SegmentHeader> read_segment_header(s3::Client& client, const std::string& bucket, const std::string& key,
                                          uint64_t size);

struct RestoreOptions {
    std::string generation;              // empty: the newest restorable one
    std::optional<int64_t> until_us;     // point in time: transactions committed at or before it
    int parallel = 4;                    // objects in flight
    bool integrity_check = true;
    // The replica's key (open_cipher()); null for a plaintext replica. A
    // mismatch either way fails before anything is written (check_cipher()).
    std::shared_ptr<const Cipher> cipher;
    std::function<void(uint64_t bytes_done, uint64_t bytes_total)> progress;
};

struct RestoreResult {
    std::string generation;
    uint64_t seq = 0;              // last segment applied (0: snapshot only)
    uint64_t transactions = 0;     // transactions applied from segments
    int64_t last_commit_us = 0;    // commit time of the last transaction in the result
    uint32_t page_size = 0;
    uint32_t db_pages = 0;
    uint64_t bytes_downloaded = 0;
    double seconds = 0;
    WalPosition position;          // WAL position the result reflects
    std::string last_sha256;       // trailer of the last object applied
};

// Restores into output_path (which must not exist or will be replaced:
// the caller decides). Stale "-wal"/"-shm" files next to it are removed, so
// SQLite cannot replay someone else's WAL onto the restored file.
// Returns a NotFound error when the database has no restorable generation.
Result<RestoreResult> restore_database(s3::Client& client, const std::string& bucket, const std::string& db_id,
                                       const std::string& output_path, const RestoreOptions& options = {});

// Runs PRAGMA integrity_check on a database file (read-only). Uses the
// host's SQLite inside the extension.
Status integrity_check(const std::string& path);
// The SQLite URI ("file:...") naming `path`, with the characters URIs give a
// meaning ('?', '#', '%', controls) escaped, so it opens that file and no other.
std::string sqlite_file_uri(const std::string& path);

}  // namespace bottomless::replicator
