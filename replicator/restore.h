// Restoring a database from the bucket: the latest state, a given
// generation, or the state at a point in time (transaction granularity),
// into a file. What to restore is chosen by bucket.h (choose_restore_target),
// the one rule every caller shares.
//
// A restore downloads the snapshot (8 MiB ranged parts) and the segments,
// several GETs in flight, while one decoder thread checks every object's
// trailer checksum and the chain between them (each segment names the
// SHA-256 of its predecessor and continues its WAL position) and a writer
// thread writes the pages to PATH.restore-tmp (with O_DIRECT when no check
// reads the file back: docs/BENCHMARKS.md); it applies whole transactions
// only, fsyncs, runs the chosen check (none by default), and renames
// into place. Memory is bounded: (parallel + 3) parts of 8 MiB, whatever the
// database's size (segments: as many whole objects). Any missing,
// corrupt or out-of-chain object stops it with an error naming the object,
// and nothing is left at the destination. restore_incremental() brings an
// older restored copy up to date with the segments after its position.
#pragma once

#include <atomic>
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
    // restore_database(): onto the older copy at output_path when it proves
    // to be one (restore_incremental()).
    bool incremental = false;
    // With `incremental`: a copy that is refused (NotIncremental) is replaced
    // by a full restore instead, the reason in RestoreResult::incremental_reason.
    bool full_if_refused = false;
    // With `incremental`: apply onto a duplicate of the file (a clone or a
    // copy) even when the copy is in WAL mode and a WAL journal would do.
    bool incremental_copy = false;
    // The target is the bucket's newest state (no generation or time was
    // asked for): the note says so (LocalState::newest), and an open of the
    // untouched copy brings it up to date instead of rolling the bucket back
    // to it. restore_database() sets it itself when neither is given.
    bool newest = false;
    // Write the pages with O_DIRECT where the file system takes it (no
    // --integrity-check only: a check reads the file right back).
    bool direct_writes = true;
    // Set (by another thread) to abandon the restore: a read replica closing
    // while it hydrates. Downloads stop at their next bytes, the restore
    // fails with Cancelled "RestoreCancelled" and leaves nothing at the
    // destination. Requests outside the downloads (the listing, header
    // reads) end by their own deadline. Null: never. Outlives the call.
    const std::atomic<bool>* cancel = nullptr;
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
    // A point in time inside segment seq+1: that many of its transactions are applied too.
    uint64_t next_txns = 0;
    bool newest = false;           // options.newest, recorded in the note
    // restore_incremental() only. "segments": the segments after the copy's
    // position applied onto a local copy of it; "up-to-date": the copy
    // already is the target (nothing downloaded, nothing written); "full": a
    // full restore, incremental_reason says why.
    std::string incremental;
    std::string incremental_reason;
    uint64_t from_seq = 0;         // "segments": the copy's position (segments from_seq+1..seq applied)
    // "pages": a newer generation whose snapshot has a page index: its pages
    // that differ from the copy's (of from_generation) were fetched, then its segments.
    std::string from_generation;
    uint64_t pages_compared = 0;   // the copy's pages hashed against the index
    uint64_t pages_changed = 0;    // the snapshot's pages that differed (written)
    uint64_t frames_fetched = 0;   // the snapshot's zstd frames downloaded to get them
    // "pages" through the segments of the copy's generation from
    // from_seq+1, and of each generation between it and the target (the
    // bridge), up to where each one's child continued, applied first when
    // they weigh less than the frames; the pages they wrote (checked
    // against the index like the others).
    uint64_t bridge_segments = 0;
    uint64_t bridge_generations = 0;  // the generations they belong to
    uint64_t bridge_pages = 0;
    uint64_t bridge_transactions = 0;  // theirs (`transactions` counts the new generation's)
    // Set when those segments were tried and could not be used (damaged,
    // pruned meanwhile, encrypted with a key not given): why. The frames
    // then gave every page instead.
    std::string bridge_fallback;
    // "pages": what the index was compared with: "digests" (the page digests
    // the restore that wrote the copy left beside it) or "file" (its pages
    // read and hashed).
    std::string compared_with;
    // "segments": how they were applied: "wal" (a WAL journal checkpointed
    // by SQLite), "clone" (onto a FICLONE clone), "copy" (onto a local copy).
    std::string applied_via;
    uint64_t copied_bytes = 0;     // "copy"/"clone": bytes of the old copy duplicated locally
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
        double copy = 0;           // incremental: duplicating the old copy into the temp file
        double compare = 0;        // incremental "pages": hashing the copy's pages against the index
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

// Incremental restore: brings the older copy of this history at
// output_path up to `target` by downloading only what it lacks, instead of
// the whole snapshot (docs/CLI.md "restore --incremental").
//
// The copy must prove what it is, from the state note restore wrote next to
// it ("<output>-bottomless", restored: true, docs/FORMAT.md "The local state
// file"): the same bucket and database id; its size, mtime and inode as the
// note recorded them and no WAL or journal with content next to it (not
// changed since); and its generation in the target's history: the target's
// generation itself, where the note's last trailer must be the SHA-256 of
// the bucket's segment `seq` (or snapshot) and the next segment must start
// at the note's position, or an ancestor through the snapshots' parent
// links. Else Precondition "NotIncremental", whose message says why and to
// restore in full -- unless options.full_if_refused, which restores in full.
//
// Same generation: segments seq+1..target.last_seq are downloaded and
// applied (whole transactions, the point in time respected; a target before
// the copy's state is refused: a restore cannot go back). A copy in WAL mode
// (every database bottomless replicates is): the pages go into
// PATH.restore-wal as one SQLite transaction, fsynced, renamed to PATH-wal
// (the commit point) and checkpointed by SQLite: only the changed pages are
// written (twice). Otherwise (or options.incremental_copy): onto a duplicate,
// PATH.restore-tmp (a FICLONE clone where the file system offers one, else a
// local copy of the whole file), fsynced, checked and renamed over PATH as a
// full restore is. Killed before the commit point, the old copy and its note
// are left as they were; after it, SQLite holds the new state (the note is
// gone: the next incremental restore refuses the copy).
// A newer generation (incremental "pages"): its snapshot's page index (one
// ranged GET of the object's tail) is compared with the copy's pages hashed
// locally; only the zstd frames holding pages that differ are fetched (ranged
// GETs), each page checked against its digest, and written as above, then
// the generation's segments 1..last_seq. A format-1 snapshot (encrypted,
// uncompressed, or from an older writer) has no index: a full restore
// (incremental "full", with the reason).
// No copy at output_path at all: a full restore (incremental "full").
// `history` is the listing choose_restore_target() chose `target` from; the
// generations walked for the parent links get their headers read (once).
Result<RestoreResult> restore_incremental(s3::Client& client, const std::string& bucket, const std::string& db_id,
                                          std::vector<GenerationView>& history, const RestoreTarget& target,
                                          const std::string& output_path, const RestoreOptions& options = {});

// The state note a restore writes beside the file ("<output>-bottomless",
// restored: true) for a file holding `res`'s state; its size, mtime and
// inode are taken now. What restore_incremental() later reads as proof.
Status write_restore_note(const std::string& output_path, const std::string& bucket, const std::string& db_id,
                          const RestoreResult& res);

// "<output>-bottomless-pages": the page digests a restore leaves beside the
// file it wrote (docs/FORMAT.md "The page digests"); whoever writes the file
// afterwards (a replicator opening it) removes them.
std::string page_digests_path(const std::string& output_path);
// Reads the file a restore just wrote and checks every page against the
// digests it left (those of the snapshot's page index, for the pages no
// segment wrote): what `bottomless-cli verify` runs. *checked (if given):
// whether there were digests to check. A mismatch is Corrupt
// "PageIndexMismatch" naming the page.
Status check_page_digests(const std::string& output_path, bool* checked = nullptr);

// Runs PRAGMA integrity_check (or quick_check) on a database file
// (read-only). Uses the host's SQLite inside the extension. None: OK.
Status integrity_check(const std::string& path, IntegrityCheck mode = IntegrityCheck::Full);
// The SQLite URI ("file:...") naming `path`, with the characters URIs give a
// meaning ('?', '#', '%', controls) escaped, so it opens that file and no other.
std::string sqlite_file_uri(const std::string& path);

}  // namespace bottomless::replicator
