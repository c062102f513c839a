// Restoring a database from the bucket: the latest state, a given
// generation, or the state at a point in time (transaction granularity),
// into a file. What to restore is chosen by bucket.h (choose_restore_target),
// the one rule every caller shares.
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

#include "replicator/bucket.h"
#include "replicator/format.h"
#include "s3/client.h"
#include "s3/result.h"

namespace bottomless::replicator {

struct RestoreOptions {
    // What restore_database() restores (choose_restore_target() in bucket.h);
    // restore_target() takes both from its target instead.
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
// Lists the history and chooses with choose_restore_target() (its errors:
// NotFound "NoReplica"/"NoGeneration", Corrupt naming an object), then
// restore_target(). Requests: the listing of generations, the listing of
// each generation looked at, one header read per object weighed, then the
// snapshot and segments.
Result<RestoreResult> restore_database(s3::Client& client, const std::string& bucket, const std::string& db_id,
                                       const std::string& output_path, const RestoreOptions& options = {});
// Restores a target chosen by choose_restore_target() (for callers that
// choose first, as the CLI does): no listing, no header read again; the
// snapshot's and segments' GETs only. options.generation/until_us are ignored.
Result<RestoreResult> restore_target(s3::Client& client, const std::string& bucket, const std::string& db_id,
                                     const RestoreTarget& target, const std::string& output_path,
                                     const RestoreOptions& options = {});

// Runs PRAGMA integrity_check on a database file (read-only). Uses the
// host's SQLite inside the extension.
Status integrity_check(const std::string& path);
// The SQLite URI ("file:...") naming `path`, with the characters URIs give a
// meaning ('?', '#', '%', controls) escaped, so it opens that file and no other.
std::string sqlite_file_uri(const std::string& path);

}  // namespace bottomless::replicator
