// Restoring a database from the bucket: the latest state, a given
// generation, or the state at a point in time (transaction granularity),
// into a file. What to restore is chosen by bucket.h (choose_restore_target),
// the one rule every caller shares.
//
// A restore downloads the snapshot (8 MiB ranged parts) and the segments,
// several GETs in flight, while one decoder thread checks every object's
// trailer checksum and the chain between them (each segment names the
// SHA-256 of its predecessor and continues its WAL position) and a writer
// thread writes the pages to PATH.restore-tmp; it applies whole transactions
// only, fsyncs, runs the chosen check (none by default), and renames
// into place. Memory is bounded: (parallel + 3) parts of 8 MiB, whatever the
// database's size (segments: as many whole objects). Any missing,
// corrupt or out-of-chain object stops it with an error naming the object,
// and nothing is left at the destination.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "replicator/bucket.h"
#include "replicator/format.h"
#include "s3/client.h"
#include "s3/result.h"

namespace bottomless::replicator {

// The PRAGMA a restore runs on its result before renaming it into place.
// Full: integrity_check (every page, every index against its table). Quick:
// quick_check (every page and b-tree structure, not index contents). None:
// only the per-object SHA-256 trailers and the chain, which prove the bytes
// are the ones the writer shipped.
enum class IntegrityCheck { Full, Quick, None };
// None by default: quick_check reads the whole file back, ~0.5 s per GiB
// here, a third of a restore's time (docs/SEMANTICS.md "Restore: which check runs").
constexpr IntegrityCheck kDefaultIntegrityCheck = IntegrityCheck::None;
const char* to_string(IntegrityCheck c);
// "full", "quick", "none"; false for anything else.
bool parse_integrity_check(std::string_view s, IntegrityCheck& out);

struct RestoreOptions {
    // What restore_database() restores (choose_restore_target() in bucket.h);
    // restore_target() takes both from its target instead.
    std::string generation;              // empty: the newest restorable one
    std::optional<int64_t> until_us;     // point in time: transactions committed at or before it
    int parallel = 4;                    // GETs in flight (snapshot parts of 8 MiB, segments)
    // The whole-file check before the rename (docs/SEMANTICS.md "Restore:
    // which check runs"): the objects' checksums and the chain are always checked.
    IntegrityCheck integrity_check = kDefaultIntegrityCheck;
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
    IntegrityCheck checked = IntegrityCheck::None;  // the check that ran and passed
    // Where the time went (seconds). The download, decode and write overlap:
    // download_wait and write_wait are the parts on the decoder's critical path.
    struct Timings {
        double download = 0;       // GETs, summed over the download threads (overlapped)
        double download_wait = 0;  // the decoder waiting for the next object or part
        double decode = 0;         // decryption, zstd, chain checks; segments' checksums (decoder thread)
        double hash = 0;           // the snapshot's SHA-256, beside the decoder (overlapped)
        double write = 0;          // pwrite and write-back kicks (writer thread, overlapped)
        double write_wait = 0;     // the decoder waiting for the writer's queue
        double fsync = 0;          // the final fsync (overlaps the check)
        double check = 0;          // integrity_check / quick_check
        double finish = 0;         // stale files, rename, directory fsync, state file
    } timings;
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

// Runs PRAGMA integrity_check (or quick_check) on a database file
// (read-only). Uses the host's SQLite inside the extension. None: OK.
Status integrity_check(const std::string& path, IntegrityCheck mode = IntegrityCheck::Full);
// The SQLite URI ("file:...") naming `path`, with the characters URIs give a
// meaning ('?', '#', '%', controls) escaped, so it opens that file and no other.
std::string sqlite_file_uri(const std::string& path);

}  // namespace bottomless::replicator
