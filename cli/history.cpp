// See history.h.
#include "cli/history.h"

#include <algorithm>
#include <future>

#include "cli/common.h"

namespace bottomless::cli {

using replicator::GenerationInfo;
using replicator::read_segment_header;
using replicator::read_snapshot_header;
using replicator::SegmentHeader;
using replicator::SnapshotHeader;

namespace {

constexpr uint64_t kTrailer = 32;

Result<std::string> trailer_hex(s3::Client& client, const std::string& bucket, const std::string& key, uint64_t size) {
    if (size < kTrailer) return std::string("-");
    auto t = client.get_object(bucket, key, s3::ByteRange{size - kTrailer, kTrailer});
    if (!t) return std::move(t).error();
    static const char* kHex = "0123456789abcdef";
    std::string out;
    for (unsigned char c : *t) {
        out += kHex[c >> 4];
        out += kHex[c & 15];
    }
    return out;
}

}  // namespace

uint64_t GenerationView::total_bytes() const {
    uint64_t n = 0;
    for (const auto& o : objects) n += o.size;
    return n;
}

int64_t GenerationView::snapshot_time_us() const {
    if (!snapshot) return 0;
    return snapshot->last_commit_us > 0 ? snapshot->last_commit_us : snapshot->created_us;
}

int64_t GenerationView::last_txn_us() const {
    if (last_segment && !last_segment->txns.empty()) return last_segment->txns.back().commit_us;
    return snapshot_time_us();
}

Status inspect_generation(s3::Client& client, const std::string& bucket, const std::string& db_id, GenerationView& g,
                          Detail detail) {
    if (detail == Detail::Ids) return {};
    if (g.objects.empty()) {
        auto objects = client.list_all(bucket, replicator::generation_prefix(db_id, g.info.id));
        if (!objects) return std::move(objects).error();
        g.objects = std::move(objects).value();
        GenerationInfo& info = g.info;
        const std::string snap = replicator::snapshot_key(db_id, info.id);
        g.first_seq = 0;
        g.stray_keys.clear();
        for (const auto& o : g.objects) {
            uint64_t seq = 0;
            if (o.key == snap) {
                info.has_snapshot = true;
                info.snapshot_bytes = o.size;
            } else if (replicator::parse_segment_key(o.key, seq) &&
                       o.key == replicator::segment_key(db_id, info.id, seq)) {
                ++info.segments;
                info.segment_bytes += o.size;
                info.last_seq = std::max(info.last_seq, seq);
                g.first_seq = g.first_seq == 0 ? seq : std::min(g.first_seq, seq);
            } else {
                g.stray_keys.push_back(o.key);
            }
        }
    }
    if (detail == Detail::Objects) return {};

    auto size_of = [&](const std::string& key) -> uint64_t {
        for (const auto& o : g.objects)
            if (o.key == key) return o.size;
        return 0;
    };
    const std::string snap = replicator::snapshot_key(db_id, g.info.id);
    const std::string last = replicator::segment_key(db_id, g.info.id, g.info.last_seq);
    // A damaged header is a fact about the generation, not a failure to list
    // it: it is kept in header_error and shown; transport errors abort.
    auto keep = [&](const Error& e) -> Status {
        if (e.kind == ErrorKind::Corrupt) {
            if (!g.header_error) g.header_error = e;
            return {};
        }
        return e;
    };
    if (g.info.has_snapshot && !g.snapshot) {
        auto h = read_snapshot_header(client, bucket, snap, g.info.snapshot_bytes);
        if (h) g.snapshot = std::move(h).value();
        else if (auto st = keep(h.error()); !st) return st;
    }
    if (g.info.segments > 0 && !g.last_segment) {
        auto h = read_segment_header(client, bucket, last, size_of(last));
        if (h) g.last_segment = std::move(h).value();
        else if (auto st = keep(h.error()); !st) return st;
    }
    if (detail == Detail::Headers) return {};

    if (g.info.has_snapshot && g.snapshot_sha256.empty()) {
        auto t = trailer_hex(client, bucket, snap, g.info.snapshot_bytes);
        if (!t) return std::move(t).error();
        g.snapshot_sha256 = *t;
    }
    if (g.info.segments > 0 && g.last_segment_sha256.empty()) {
        auto t = trailer_hex(client, bucket, last, size_of(last));
        if (!t) return std::move(t).error();
        g.last_segment_sha256 = *t;
    }
    return {};
}

Result<std::vector<GenerationView>> load_history(s3::Client& client, const std::string& bucket,
                                                 const std::string& db_id, Detail detail, size_t limit, int parallel) {
    auto gens = replicator::list_generations(client, bucket, db_id);
    if (!gens) return std::move(gens).error();
    std::vector<GenerationView> out;
    out.reserve(gens->size());
    for (auto& g : *gens) {
        GenerationView v;
        v.info = std::move(g);
        out.push_back(std::move(v));
    }
    const size_t n = limit == 0 ? out.size() : std::min(limit, out.size());
    const size_t window = static_cast<size_t>(std::max(1, parallel));
    for (size_t start = 0; start < n; start += window) {
        std::vector<std::future<Status>> jobs;
        for (size_t i = start; i < std::min(n, start + window); ++i)
            jobs.push_back(std::async(std::launch::async, [&, i] {
                return inspect_generation(client, bucket, db_id, out[i], detail);
            }));
        Status first;
        for (auto& j : jobs) {
            Status st = j.get();
            if (!st && first) first = st;
        }
        if (!first) return first.error();
    }
    return out;
}

std::string missing_segment(const std::string& db_id, const GenerationView& g, const GenerationView* newer) {
    const auto& id = g.info.id;
    if (g.info.segments > 0) {
        // Numbering starts at 1 and has no holes: count == last.
        if (g.first_seq != 1) return replicator::segment_key(db_id, id, 1);
        if (g.info.segments != g.info.last_seq) {
            uint64_t expect = 1;
            std::vector<uint64_t> seqs;
            for (const auto& o : g.objects) {
                uint64_t s;
                if (replicator::parse_segment_key(o.key, s) && o.key == replicator::segment_key(db_id, id, s))
                    seqs.push_back(s);
            }
            std::sort(seqs.begin(), seqs.end());
            for (uint64_t s : seqs) {
                if (s != expect) return replicator::segment_key(db_id, id, expect);
                ++expect;
            }
        }
    }
    // The successor's snapshot records how far this generation went.
    if (newer && newer->snapshot && newer->snapshot->parent_generation == id &&
        newer->snapshot->parent_seq > g.info.last_seq)
        return replicator::segment_key(db_id, id, newer->snapshot->parent_seq);
    return {};
}

Result<RestoreChoice> choose_restore(s3::Client& client, const std::string& bucket, const std::string& db_id,
                                     std::vector<GenerationView>& history, const std::string& generation,
                                     std::optional<int64_t> until_us) {
    auto nothing = [&](std::string msg) { return make_error(ErrorKind::NotFound, std::move(msg), "NoGeneration"); };
    if (history.empty()) return nothing("database '" + db_id + "' has no generation in bucket '" + bucket + "'");

    for (size_t i = 0; i < history.size(); ++i) {
        GenerationView& g = history[i];
        const bool named = !generation.empty();
        if (named && g.info.id != generation) continue;
        // A generation's id is taken after its snapshot was read: one created
        // well after T cannot hold a state at or before T. (1 ms of slack for
        // the id's millisecond resolution; the snapshot header decides.)
        if (!named && until_us && g.info.created_ms * 1000 - 1000 > *until_us) continue;
        if (auto st = inspect_generation(client, bucket, db_id, g, Detail::Objects); !st) return std::move(st).error();
        const std::string snap = replicator::snapshot_key(db_id, g.info.id);
        if (!g.complete()) {
            // Segments are written only after their snapshot: segments
            // without one mean the snapshot was lost, not that it is coming.
            if (g.info.segments > 0)
                return make_error(ErrorKind::Corrupt,
                                  "snapshot " + snap + " is missing but generation " + g.info.id + " has " +
                                      std::to_string(g.info.segments) + " segment(s): the generation cannot be restored",
                                  "MissingSnapshot");
            if (named)
                return nothing("generation " + g.info.id + " has no snapshot (" + snap +
                               "): it was never completed; choose another with -g (see ls)");
            continue;  // a snapshot still being uploaded, or an abandoned one
        }
        if (until_us) {
            if (auto st = inspect_generation(client, bucket, db_id, g, Detail::Headers); !st)
                return std::move(st).error();
            if (!g.snapshot) return *g.header_error;
            if (g.snapshot_time_us() > *until_us) {
                if (named)
                    return nothing("generation " + g.info.id + " starts at " + format_time_us(g.snapshot_time_us()) +
                                   ", after the requested time " + format_time_us(*until_us) +
                                   "; choose an older generation (see ls) or a later time");
                continue;
            }
        }
        // The end of this generation is proven only by its successor's
        // parent link. (Holes inside it stop restore_database by name.)
        if (i > 0) {
            GenerationView& newer = history[i - 1];
            if (auto st = inspect_generation(client, bucket, db_id, newer, Detail::Headers); !st)
                return std::move(st).error();
            if (newer.snapshot && newer.snapshot->parent_generation == g.info.id &&
                newer.snapshot->parent_seq > g.info.last_seq) {
                bool needed = true;
                if (until_us && g.info.segments > 0) {
                    // Missing segments hold transactions later than those
                    // present; a time before the last present one does not
                    // need them.
                    if (auto st = inspect_generation(client, bucket, db_id, g, Detail::Headers); !st)
                        return std::move(st).error();
                    needed = !g.last_segment || g.last_txn_us() < *until_us;
                }
                if (needed)
                    return make_error(
                        ErrorKind::Corrupt,
                        "segment " + replicator::segment_key(db_id, g.info.id, newer.snapshot->parent_seq) +
                            " is missing: generation " + newer.info.id + " records that generation " + g.info.id +
                            " reached segment " + std::to_string(newer.snapshot->parent_seq) +
                            ", the bucket holds segments up to " + std::to_string(g.info.last_seq),
                        "MissingSegment");
            }
        }
        RestoreChoice c;
        c.index = i;
        c.generation = g.info.id;
        c.until_us = until_us;
        c.snapshot_bytes = g.info.snapshot_bytes;
        c.total_bytes = g.info.snapshot_bytes + g.info.segment_bytes;
        return c;
    }
    if (!generation.empty())
        return nothing("generation " + generation + " of database '" + db_id + "' not found in bucket '" + bucket +
                       "' (see ls)");
    if (until_us)
        return nothing("no generation of database '" + db_id + "' holds a state at or before " +
                       format_time_us(*until_us) + " (the oldest starts at " +
                       (history.back().snapshot ? format_time_us(history.back().snapshot_time_us())
                                                : format_time_us(history.back().info.created_ms * 1000)) +
                       ")");
    return nothing("database '" + db_id + "' has no complete generation in bucket '" + bucket +
                   "' (snapshots never finished uploading)");
}

}  // namespace bottomless::cli

namespace bottomless::cli {

Result<std::vector<GenerationView>> load_existing_history(s3::Client& client, const std::string& bucket,
                                                          const std::string& db_id, Detail detail) {
    auto history = load_history(client, bucket, db_id, detail);
    if (history && history->empty())
        return make_error(ErrorKind::NotFound, "database '" + db_id + "' has no generation in bucket '" + bucket + "'",
                          "NoReplica");
    return history;
}

}  // namespace bottomless::cli
