// The parts of an incremental restore that go across generations
// (restore_incremental.cpp): which pages of a format-2 snapshot differ from
// the copy (restore_diff.cpp), and the bridge, the older generations'
// segments that may bring the copy to that snapshot for fewer bytes than
// its frames (restore_bridge.cpp). Private to replicator/.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "replicator/bucket.h"
#include "replicator/format.h"
#include "replicator/restore.h"
#include "replicator/restore_pipeline.h"
#include "replicator/state_file.h"

namespace bottomless::replicator::restore_detail {

// A format-2 snapshot's pages that differ from the copy's (docs/FORMAT.md
// "Page index"): its index from one ranged GET of the object's tail, the
// copy's pages hashed from the local file, and the frames to fetch in runs
// of adjacent frames of at most kRun bytes, one GET each (many small GETs
// in flight: kDiffWorkers).
constexpr int kDiffWorkers = 16;

struct PageDiff {
    PageIndex index;
    std::vector<uint8_t> differs;                     // by page number (0 unused)
    std::vector<std::pair<uint32_t, uint32_t>> runs;  // frames [first, second) fetched by one GET
    uint64_t run_bytes() const;                       // what the runs download
};

// The runs of frames holding the pages `differs` marks.
void plan_runs(PageDiff& d);

// The copy's pages (fd, copy_pages of them; their digests if the restore
// that wrote it left some) against the target snapshot's page index, read
// with one ranged GET of key's tail; the runs to fetch planned. Counts into
// res (bytes, pages compared, compared_with, timings.compare).
Result<PageDiff> diff_against_index(s3::Client& client, const std::string& bucket, const std::string& key,
                                    const RestoreTarget& target, int fd, uint32_t copy_pages,
                                    const std::optional<std::string>& copy_digests, RestoreResult& res);

// Where a page goes: the WAL journal or its offset in the duplicate; `what`
// names the source for errors.
using PagePut = std::function<Status(uint32_t pgno, std::string_view page, const std::string& what)>;

// The way from the copy to the target across generations.
struct Lineage {
    s3::Client& client;
    const std::string& bucket;
    const std::string& db_id;
    const std::vector<GenerationView>& history;
    const RestoreTarget& target;
    const RestoreOptions& options;
    const LocalState& note;  // the copy's position
    size_t copy_index;       // the copy's generation in history
    // The generations from the copy's to the target's parent, oldest
    // first, each with the segment its child continued from.
    const std::vector<std::pair<size_t, uint64_t>>& hops;  // (history index, parent_seq of its child)
};

// The bridge: the segments of the copy's generation after the copy, up to
// the one its child continued from, then those of each later generation
// up to where its child continued (each from its own snapshot, whose
// trailer its first segment names), when they cost less than the frames
// (their bytes, plus 64 KiB a GET: latency). The pages they write (through
// put) are checked against the index like the copy's: one that does not
// match (a snapshot holding more than its parent's segments, e.g. frames a
// crash kept from being shipped) is left marked in diff.differs, so the
// frames fetch it after all and the result is the snapshot either way.
// Re-plans diff.runs. Segments that cannot be used (pruned, damaged,
// encrypted without the key, failing remotely) give way to the frames:
// res.bridge_fallback says why and the result is OK. A local error, a
// cancel or a copy the chain refuses is returned.
Status bridge_to_snapshot(const Lineage& l, PageDiff& diff, PageWriter& writer, SpaceGuard& space, const PagePut& put,
                          RestoreResult& res);

}  // namespace bottomless::replicator::restore_detail
