// The bucket as the history of databases: the one place that lists a
// database's generations and a generation's objects, describes generations,
// reads object headers and trailers, and chooses what a restore uses. The
// replicator's start-up, restore_database() and bottomless-cli all call it,
// so there is one rule for each of these, not one per caller.
//
// Keys are spelled by format.h (generation_prefix, snapshot_key,
// segment_key, parse_segment_key): they are part of the object format.
//
// Costs (what the S3 bill sees): listing a database's generations is one
// LIST per 1000 generations; describing a generation one LIST per 1000 of
// its objects; a header one ranged GET (two for a header longer than 4 KiB).
// A History fetches each of these at most once, so a restore makes one
// listing pass and one header read per object it inspects.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "replicator/format.h"
#include "s3/client.h"
#include "s3/result.h"

namespace bottomless::replicator {

// What a generation's listing says about it.
struct GenerationInfo {
    std::string id;
    int64_t created_ms = 0;       // from the id
    bool has_snapshot = false;
    uint64_t snapshot_bytes = 0;
    uint64_t segments = 0;        // count of segment objects
    uint64_t first_seq = 0;       // lowest segment number present (0: none)
    uint64_t last_seq = 0;        // highest segment number present (0: none)
    uint64_t segment_bytes = 0;
    uint64_t first_gap = 0;       // lowest seq in 1..last_seq without an object (0: none)
};

// Generations of db_id, newest first (ids and creation times: one listing
// with a delimiter per 1000 generations). Prefixes that are not generation
// ids are ignored.
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
// The SHA-256 trailer of an object of `size` bytes, in hex (one ranged GET);
// "-" for an object too short to hold one.
Result<std::string> read_trailer_hex(s3::Client& client, const std::string& bucket, const std::string& key,
                                     uint64_t size);

// One generation and what has been learnt about it so far. Each fact is
// fetched once (inspect_generation() fills only what is missing).
struct GenerationView {
    GenerationInfo info;                          // id, creation time, object counts and bytes
    bool described = false;                       // `objects` and the counts in `info` are filled
    std::vector<s3::ObjectInfo> objects;          // every object under the generation's prefix, in key order
    std::vector<std::string> stray_keys;          // objects that are neither snapshot nor segment
    std::optional<SnapshotHeader> snapshot;
    std::optional<SegmentHeader> last_segment;
    std::optional<Error> header_error;            // a header could not be read (the object is damaged)
    bool snapshot_read = false, last_segment_read = false;  // their header reads were made
    std::string snapshot_sha256, last_segment_sha256;  // trailers (Detail::Trailers only)

    bool complete() const { return info.has_snapshot; }
    uint64_t object_count() const { return objects.size(); }
    uint64_t total_bytes() const;
    // The size the listing gave `key` (0 if it is not listed).
    uint64_t size_of(const std::string& key) const;
    // The time of the state the snapshot holds: its last transaction's
    // commit time, or when it was taken if that is unknown (a snapshot holds
    // nothing committed after it was taken). 0 before the header was read.
    int64_t snapshot_time_us() const;
    // The newest transaction the generation holds (snapshot or last segment).
    int64_t last_txn_us() const;
};

enum class Detail {
    Ids,       // the listing of generation ids only
    Objects,   // plus each generation's objects
    Headers,   // plus the snapshot's and the last segment's headers
    Trailers,  // plus both objects' SHA-256 trailers
};

// Fills one generation to `detail`, fetching only what is not there yet. A
// damaged header is a fact about the generation (kept in header_error), not
// a failure; transport and permission errors are returned.
Status inspect_generation(s3::Client& client, const std::string& bucket, const std::string& db_id,
                          GenerationView& g, Detail detail);

// The generations of db_id, newest first, with `detail` filled in for the
// first `limit` (0: all); `parallel` generations are inspected at once.
Result<std::vector<GenerationView>> load_history(s3::Client& client, const std::string& bucket,
                                                 const std::string& db_id, Detail detail = Detail::Ids,
                                                 size_t limit = 0, int parallel = 8);

// The newest of `gens` (newest first, from list_generations) that has a
// snapshot: "the bucket's" generation for every start-up decision of the
// replicator. Describes generations on the way; `latest` is null when none
// has a snapshot.
Status find_latest(s3::Client& client, const std::string& bucket, const std::string& db_id,
                   std::vector<GenerationInfo>& gens, const GenerationInfo*& latest);

// Segments a generation should hold but does not: a hole in the 1..last
// numbering, or, when `newer` (the next generation) names this one as its
// parent, a segment below its parent_seq. Returns the first missing key,
// or empty. `newer` may be null; `g` needs Detail::Objects, `newer` Headers.
std::string missing_segment(const std::string& db_id, const GenerationView& g, const GenerationView* newer);

// What a restore uses: one generation, up to a time, with its snapshot's
// header already read (restore checks the key and the free space on it).
struct RestoreTarget {
    size_t index = 0;                 // into the history
    std::string generation;
    std::optional<int64_t> until_us;  // transactions committed at or before it
    SnapshotHeader snapshot;          // the header of the generation's snapshot
    uint64_t snapshot_bytes = 0;      // sizes as listed
    uint64_t last_seq = 0;            // segments 1..last_seq are fetched
    uint64_t segment_bytes = 0;
    uint64_t total_bytes() const { return snapshot_bytes + segment_bytes; }
};

// Chooses what a restore uses. The rule (docs/FORMAT.md "Choosing what to
// restore"), over generations newest first:
//   - `generation` given: that one; with `until_us`, its snapshot must hold
//     a state at or before it, else NotFound "NoGeneration".
//   - else the newest complete generation (one with a snapshot) whose
//     snapshot holds a state at or before `until_us` (snapshot_time_us(),
//     from its header), or the newest complete one without a time. A
//     snapshot later than the time passes the choice on to the next older
//     generation; the generation's id (when it was created) is not used: a
//     snapshot's state is fixed before its id is taken, and transactions
//     committed between the two are in that generation's segments only.
// Fails, never falling back silently to an older state than asked for:
//   - Corrupt "MissingSnapshot" for a generation that should serve and has
//     segments but no snapshot (segments are written only after it);
//   - Corrupt "MissingSegment" when the chosen generation's successor
//     records that it reached a segment the bucket lacks and the time asked
//     for needs it;
//   - NotFound "NoReplica" when the database has no complete generation at
//     all, "NoGeneration" when none serves this request.
// Reads the objects of each generation it looks at, and the snapshot header
// of each one it weighs (once: kept in the history).
Result<RestoreTarget> choose_restore_target(s3::Client& client, const std::string& bucket, const std::string& db_id,
                                            std::vector<GenerationView>& history, const std::string& generation,
                                            std::optional<int64_t> until_us);

}  // namespace bottomless::replicator
