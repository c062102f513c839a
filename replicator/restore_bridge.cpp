// The bridge of an incremental restore across generations
// (restore_incremental.h): the older generations' segments from the copy
// to the target snapshot, when they cost less than its frames.
#include <algorithm>

#include "replicator/restore_incremental.h"
#include "s3/log.h"

namespace bottomless::replicator::restore_detail {

Status bridge_to_snapshot(const Lineage& l, PageDiff& diff, PageWriter& writer, SpaceGuard& space, const PagePut& put,
                          RestoreResult& res) {
    s3::Client& client = l.client;
    const std::string& bucket = l.bucket;
    const std::string& db_id = l.db_id;
    const auto& history = l.history;
    const RestoreTarget& target = l.target;
    const RestoreOptions& options = l.options;
    const LocalState& note = l.note;
    constexpr uint64_t kGetCost = 64u << 10;
    struct Hop {
        const GenerationView* g;
        SegmentPlan plan;
        RestoreResult from;  // where the hop starts: the copy's note, or the generation's snapshot
    };
    std::vector<Hop> hops;
    uint64_t bytes = 0, gets = 0, segments = 0;
    for (const auto& [gi, up_to] : l.hops) {
        const GenerationView& g = history[gi];
        const bool copy_gen = gi == l.copy_index;
        Hop h{&g, {}, {}};
        h.plan.generation = g.info.id;
        h.plan.first_seq = copy_gen ? note.seq + 1 : 1;
        h.plan.last_seq = up_to;
        h.plan.skip_txns = copy_gen ? note.next_txns : 0;
        h.plan.onto_copy = copy_gen;
        if (copy_gen) {
            h.from.seq = note.seq;
            h.from.next_txns = note.next_txns;
            h.from.position = note.position;
            h.from.last_sha256 = note.prev_sha256;
            h.from.page_size = note.page_size;
            h.from.db_pages = note.db_pages;
        } else {
            // Its own snapshot starts it: same page size, readable
            // without a key (the target's is plaintext), listed.
            const auto& sh = g.snapshot;
            if (!sh || sh->page_size != note.page_size || sh->encryption) return {};
            h.from.position = sh->position;
            h.from.page_size = sh->page_size;
            h.from.db_pages = sh->db_pages;
            if (h.plan.first_seq > h.plan.last_seq) continue;  // nothing of it is needed
            ++gets;  // its trailer, below
        }
        h.from.generation = g.info.id;
        for (uint64_t seq = h.plan.first_seq; seq <= h.plan.last_seq; ++seq) {
            const uint64_t n = g.size_of(segment_key(db_id, g.info.id, seq));
            if (n == 0) return {};  // pruned since (or never there): the frames, then
            bytes += n;
            ++gets;
            ++segments;
        }
        hops.push_back(std::move(h));
    }
    if (segments == 0 || bytes + kGetCost * gets >= diff.run_bytes() + kGetCost * diff.runs.size()) return {};
    std::vector<FetchJob> jobs;
    for (auto& h : hops) {
        if (h.plan.onto_copy) continue;
        // The trailer its first segment must name: one ranged GET.
        const std::string key = snapshot_key(db_id, h.g->info.id);
        auto t = read_trailer_hex(client, bucket, key, h.g->size_of(key));
        if (!t) {
            res.bridge_fallback = "the snapshot trailer of " + h.g->info.id + " cannot be read (" +
                                  t.error().message + "): the new snapshot's frames instead";
            log::warn(res.bridge_fallback);
            return {};
        }
        res.bytes_downloaded += 32;
        h.from.last_sha256 = std::move(*t);
    }
    uint64_t after = 0;  // the target generation's segments, for progress
    for (uint64_t seq = 1; seq <= target.last_seq; ++seq)
        after += history[target.index].size_of(segment_key(db_id, target.generation, seq));
    for (auto& h : hops) {
        h.plan.first_job = jobs.size();
        h.plan.total = res.bytes_downloaded + bytes + after;
        for (uint64_t seq = h.plan.first_seq; seq <= h.plan.last_seq; ++seq)
            jobs.push_back({segment_key(db_id, h.g->info.id, seq), std::nullopt, max_segment_object_size()});
    }
    const int workers = std::max(1, options.parallel);
    OrderedFetcher fetcher(client, bucket, std::move(jobs), workers, static_cast<size_t>(workers) + 2,
                           options.cancel);
    const uint32_t pages = target.snapshot.db_pages;
    std::vector<uint8_t> bridged(uint64_t{pages} + 1, 0);
    Status st;
    uint64_t transactions = 0;
    for (auto& h : hops) {
        const std::string what = "the segments of " + h.g->info.id;
        h.plan.sink = [&](uint32_t pgno, std::string_view page) -> Status {
            if (pgno > pages) return {};  // past the new snapshot's end: truncated anyway
            bridged[pgno] = 1;
            diff.differs[pgno] = page_hash(page) != diff.index.hash(pgno);  // the last write decides
            return put(pgno, page, what);
        };
        h.from.bytes_downloaded = res.bytes_downloaded;  // progress counts on from there
        st = apply_segments(fetcher, writer, space, db_id, h.plan, options, h.from);
        res.timings.decode += h.from.timings.decode;
        res.bytes_downloaded = h.from.bytes_downloaded;
        transactions += h.from.transactions;
        if (!st) break;
    }
    fetcher.stop();
    res.timings.download += fetcher.busy_seconds();
    res.timings.download_wait += fetcher.wait_seconds();
    if (!st) {
        const Error& e = st.error();
        // What the bucket gave could not be used (pruned since the
        // listing, damaged, encrypted with a key not given, refused
        // or failing): the frames instead. `differs` already judges
        // every page by what was written last (a page written before
        // the failure that matches the snapshot stays). A copy the
        // chain refuses, a local failure or a cancel ends here.
        if (e.code == "NotIncremental" || e.kind == ErrorKind::Io || e.kind == ErrorKind::Cancelled) return st;
        res.bridge_fallback = "the segments of " + note.generation + " and after, from the copy on, cannot be used (" +
                              e.message + "): the new snapshot's frames instead";
        log::warn(res.bridge_fallback);
        plan_runs(diff);
        return {};
    }
    res.bridge_segments = segments;
    res.bridge_generations = hops.size();
    res.bridge_transactions = transactions;
    res.bridge_pages = static_cast<uint64_t>(std::count(bridged.begin(), bridged.end(), uint8_t{1}));
    plan_runs(diff);
    return {};
}

}  // namespace bottomless::replicator::restore_detail
