// Reading a database's history in the bucket for the operator: generations
// with their objects and headers (ls, status, verify, rm), and the choice of
// what a restore uses (restore, verify).
//
// Headers are read with a ranged GET of an object's first bytes, so listing
// costs one LIST per generation plus one small GET per header, whatever the
// database's size.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "replicator/format.h"
#include "replicator/restore.h"
#include "s3/client.h"
#include "s3/result.h"

namespace bottomless::cli {

struct GenerationView {
    replicator::GenerationInfo info;              // id, creation time, object counts and bytes
    std::vector<s3::ObjectInfo> objects;          // every object under the generation's prefix
    std::vector<std::string> stray_keys;          // objects that are neither snapshot nor segment
    uint64_t first_seq = 0;                       // lowest segment number present (0: none)
    std::optional<replicator::SnapshotHeader> snapshot;
    std::optional<replicator::SegmentHeader> last_segment;
    std::optional<Error> header_error;            // a header could not be read (the object is damaged)
    std::string snapshot_sha256, last_segment_sha256;  // trailers (verbose listings only)

    bool complete() const { return info.has_snapshot; }
    // Objects in the generation and their bytes.
    uint64_t object_count() const { return objects.size(); }
    uint64_t total_bytes() const;
    // The state the snapshot holds: its last transaction's time, or when it
    // was taken if that is unknown. 0 before the header was read.
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

// The generations of db_id, newest first, with `detail` filled in for the
// first `limit` (0: all); `parallel` generations are inspected at once.
Result<std::vector<GenerationView>> load_history(s3::Client& client, const std::string& bucket,
                                                 const std::string& db_id, Detail detail, size_t limit = 0,
                                                 int parallel = 8);

// The same, but an empty history is an error (NotFound, "NoReplica") that
// names the database and the bucket.
Result<std::vector<GenerationView>> load_existing_history(s3::Client& client, const std::string& bucket,
                                                          const std::string& db_id, Detail detail);

// Fills one generation to `detail` (no-op for what is already there).
Status inspect_generation(s3::Client& client, const std::string& bucket, const std::string& db_id,
                          GenerationView& g, Detail detail);

// What a restore (or verify) uses.
struct RestoreChoice {
    size_t index = 0;                 // into the history
    std::string generation;
    std::optional<int64_t> until_us;  // passed on: transactions committed at or before it
    uint64_t snapshot_bytes = 0;      // sizes as listed, for progress
    uint64_t total_bytes = 0;
};

// Chooses the generation: `generation` if given, else the newest complete
// one whose snapshot state is at or before `until_us` (when given). Fails
//   - NotFound/"NoGeneration" when there is nothing to restore (exit 3),
//   - Corrupt naming the object when the generation that should serve is
//     damaged in a way the listing shows: a snapshot missing while segments
//     exist, a segment missing at the end of a generation whose successor's
//     snapshot says how far it went. A restore never silently falls back to
//     an older state than the one asked for.
// `history` must hold at least Detail::Objects.
Result<RestoreChoice> choose_restore(s3::Client& client, const std::string& bucket, const std::string& db_id,
                                     std::vector<GenerationView>& history, const std::string& generation,
                                     std::optional<int64_t> until_us);

// Segments a generation should hold but does not: checks the first..last
// numbering for holes and, when a newer generation's snapshot names this one
// as its parent, that the segments reach its parent_seq. Returns the first
// missing key, or empty. `newer` may be null.
std::string missing_segment(const std::string& db_id, const GenerationView& g, const GenerationView* newer);

}  // namespace bottomless::cli
