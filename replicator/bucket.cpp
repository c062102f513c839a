// The bucket as the history of databases. See bucket.h.
#include "replicator/bucket.h"

#include <algorithm>
#include <future>

#include "replicator/util.h"
#include "replicator/wal.h"
#include "s3/crypto.h"

namespace bottomless::replicator {
namespace {

// Magic (8), version (4), header length (4).
constexpr uint64_t kPreamble = 16;
constexpr uint64_t kFirstRead = 4096;
constexpr uint64_t kTrailer = 32;

// The first bytes of an object, enough to hold its whole header.
Result<std::string> header_bytes(s3::Client& client, const std::string& bucket, const std::string& key,
                                 uint64_t size) {
    if (size == 0) return std::string();
    auto first = client.get_object(bucket, key, s3::ByteRange{0, std::min(size, kFirstRead)});
    if (!first) return first;
    if (first->size() < kPreamble) return first;
    uint64_t need = kPreamble + read_be32(reinterpret_cast<const unsigned char*>(first->data() + 12));
    // The decoder judges a length past the object or past the cap; a corrupt
    // length must not size a huge read.
    if (need <= first->size() || need > size || need > kPreamble + kMaxHeaderSize) return first;
    return client.get_object(bucket, key, s3::ByteRange{0, need});
}

Error not_found_here(const std::string& key) {
    return make_error(ErrorKind::Corrupt,
                      key + " disappeared while it was being read (is someone removing this generation?)",
                      "MissingObject");
}

// Fills the counts of `info` from a generation's listing (in key order, as
// S3 lists). Only the exact spellings snapshot_key/segment_key produce
// count; anything else under the prefix is a stray (when `stray` is given).
void classify(const std::string& db_id, const std::vector<s3::ObjectInfo>& objects, GenerationInfo& info,
              std::vector<std::string>* stray) {
    info.has_snapshot = false;
    info.snapshot_bytes = info.segments = info.first_seq = info.last_seq = info.segment_bytes = info.first_gap = 0;
    const std::string snap = snapshot_key(db_id, info.id);
    std::vector<uint64_t> seqs;
    for (const auto& o : objects) {
        uint64_t seq = 0;
        if (o.key == snap) {
            info.has_snapshot = true;
            info.snapshot_bytes = o.size;
        } else if (parse_segment_key(o.key, seq) && o.key == segment_key(db_id, info.id, seq)) {
            ++info.segments;
            info.segment_bytes += o.size;
            seqs.push_back(seq);
        } else if (stray) {
            stray->push_back(o.key);
        }
    }
    if (seqs.empty()) return;
    // Zero-padded keys list in numeric order; sorted anyway (a listing's
    // order is the server's word), once, here.
    if (!std::is_sorted(seqs.begin(), seqs.end())) std::sort(seqs.begin(), seqs.end());
    info.first_seq = seqs.front();
    info.last_seq = seqs.back();
    uint64_t expect = 1;
    for (uint64_t s : seqs) {
        if (s != expect) {
            info.first_gap = expect;
            break;
        }
        ++expect;
    }
}

}  // namespace

Result<SnapshotHeader> read_snapshot_header(s3::Client& client, const std::string& bucket, const std::string& key,
                                            uint64_t size) {
    auto bytes = header_bytes(client, bucket, key, size);
    if (!bytes) return bytes.error().kind == ErrorKind::NotFound ? not_found_here(key) : std::move(bytes).error();
    return peek_snapshot_header(*bytes, key);
}

Result<SegmentHeader> read_segment_header(s3::Client& client, const std::string& bucket, const std::string& key,
                                          uint64_t size) {
    auto bytes = header_bytes(client, bucket, key, size);
    if (!bytes) return bytes.error().kind == ErrorKind::NotFound ? not_found_here(key) : std::move(bytes).error();
    return peek_segment_header(*bytes, key);
}

Result<std::string> read_trailer_hex(s3::Client& client, const std::string& bucket, const std::string& key,
                                     uint64_t size) {
    if (size < kTrailer) return std::string("-");
    auto t = client.get_object(bucket, key, s3::ByteRange{size - kTrailer, kTrailer});
    if (!t) return std::move(t).error();
    return s3::to_hex(reinterpret_cast<const unsigned char*>(t->data()), t->size());
}

Result<std::vector<GenerationInfo>> list_generations(s3::Client& client, const std::string& bucket,
                                                     const std::string& db_id) {
    std::vector<GenerationInfo> out;
    s3::ListRequest req;
    req.prefix = db_id + "/";
    req.delimiter = "/";
    auto st = client.list_objects(bucket, req, [&](const s3::ListPage& page) {
        for (const auto& p : page.common_prefixes) {
            // The client drops prefixes outside req.prefix; still, server text
            // never drives a substr that can throw.
            if (p.size() <= req.prefix.size() + 1 || p.compare(0, req.prefix.size(), req.prefix) != 0 || p.back() != '/')
                continue;
            std::string id = p.substr(req.prefix.size(), p.size() - req.prefix.size() - 1);
            int64_t ms = generation_time_ms(id);
            if (ms < 0) continue;  // not ours
            GenerationInfo g;
            g.id = id;
            g.created_ms = ms;
            out.push_back(std::move(g));
        }
        return true;
    });
    if (!st) return std::move(st).error();
    // Ids sort newest first by construction; keep that order explicit.
    std::sort(out.begin(), out.end(), [](const auto& a, const auto& b) { return a.created_ms > b.created_ms; });
    return out;
}

Status describe_generation(s3::Client& client, const std::string& bucket, const std::string& db_id,
                           GenerationInfo& info) {
    auto objects = client.list_all(bucket, generation_prefix(db_id, info.id));
    if (!objects) return std::move(objects).error();
    classify(db_id, *objects, info, nullptr);
    return {};
}

Result<std::vector<std::string>> list_databases(s3::Client& client, const std::string& bucket) {
    std::vector<std::string> out;
    s3::ListRequest req;
    req.delimiter = "/";
    auto st = client.list_objects(bucket, req, [&](const s3::ListPage& page) {
        for (const auto& p : page.common_prefixes)
            if (p.size() > 1 && p.back() == '/') out.push_back(p.substr(0, p.size() - 1));
        return true;
    });
    if (!st) return std::move(st).error();
    return out;
}

uint64_t GenerationView::total_bytes() const {
    uint64_t n = 0;
    for (const auto& o : objects) n += o.size;
    return n;
}

uint64_t GenerationView::size_of(const std::string& key) const {
    // The listing is in key order.
    auto it = std::lower_bound(objects.begin(), objects.end(), key,
                               [](const s3::ObjectInfo& o, const std::string& k) { return o.key < k; });
    if (it != objects.end() && it->key == key) return it->size;
    for (const auto& o : objects)  // a server that lists out of order
        if (o.key == key) return o.size;
    return 0;
}

int64_t GenerationView::snapshot_time_us() const {
    if (!snapshot) return 0;
    return snapshot->last_commit_us > 0 ? snapshot->last_commit_us : snapshot->created_us;
}

int64_t GenerationView::last_txn_us() const {
    if (last_segment && !last_segment->txns.empty()) return last_segment->txns.back().commit_us;
    return snapshot_time_us();
}

namespace {

// A damaged header is a fact about the generation, not a failure to list
// it: it is kept in header_error and shown; transport errors abort. Each
// header is read once, whatever the outcome (a damaged one stays damaged;
// asking again would only cost another GET). `g` is described.
Status keep_damage(GenerationView& g, const Error& e) {
    if (e.kind == ErrorKind::Corrupt) {
        if (!g.header_error) g.header_error = e;
        return {};
    }
    return e;
}

Status snapshot_header_of(s3::Client& client, const std::string& bucket, const std::string& db_id,
                          GenerationView& g) {
    if (!g.info.has_snapshot || g.snapshot_read) return {};
    auto h = read_snapshot_header(client, bucket, snapshot_key(db_id, g.info.id), g.info.snapshot_bytes);
    if (h) g.snapshot = std::move(h).value();
    else if (auto st = keep_damage(g, h.error()); !st) return st;
    g.snapshot_read = true;
    return {};
}

Status last_segment_header_of(s3::Client& client, const std::string& bucket, const std::string& db_id,
                              GenerationView& g) {
    if (g.info.segments == 0 || g.last_segment_read) return {};
    const std::string last = segment_key(db_id, g.info.id, g.info.last_seq);
    auto h = read_segment_header(client, bucket, last, g.size_of(last));
    if (h) g.last_segment = std::move(h).value();
    else if (auto st = keep_damage(g, h.error()); !st) return st;
    g.last_segment_read = true;
    return {};
}

}  // namespace

Status inspect_generation(s3::Client& client, const std::string& bucket, const std::string& db_id, GenerationView& g,
                          Detail detail) {
    if (detail == Detail::Ids) return {};
    if (!g.described) {
        auto objects = client.list_all(bucket, generation_prefix(db_id, g.info.id));
        if (!objects) return std::move(objects).error();
        g.objects = std::move(objects).value();
        g.stray_keys.clear();
        classify(db_id, g.objects, g.info, &g.stray_keys);
        g.described = true;
    }
    if (detail == Detail::Objects) return {};

    if (auto st = snapshot_header_of(client, bucket, db_id, g); !st) return st;
    if (auto st = last_segment_header_of(client, bucket, db_id, g); !st) return st;
    if (detail == Detail::Headers) return {};

    const std::string snap = snapshot_key(db_id, g.info.id);
    const std::string last = segment_key(db_id, g.info.id, g.info.last_seq);

    if (g.info.has_snapshot && g.snapshot_sha256.empty()) {
        auto t = read_trailer_hex(client, bucket, snap, g.info.snapshot_bytes);
        if (!t) return std::move(t).error();
        g.snapshot_sha256 = *t;
    }
    if (g.info.segments > 0 && g.last_segment_sha256.empty()) {
        auto t = read_trailer_hex(client, bucket, last, g.size_of(last));
        if (!t) return std::move(t).error();
        g.last_segment_sha256 = *t;
    }
    return {};
}

Result<std::vector<GenerationView>> load_history(s3::Client& client, const std::string& bucket,
                                                 const std::string& db_id, Detail detail, size_t limit, int parallel) {
    auto gens = list_generations(client, bucket, db_id);
    if (!gens) return std::move(gens).error();
    std::vector<GenerationView> out;
    out.reserve(gens->size());
    for (auto& g : *gens) {
        GenerationView v;
        v.info = std::move(g);
        out.push_back(std::move(v));
    }
    const size_t n = limit == 0 ? out.size() : std::min(limit, out.size());
    if (detail == Detail::Ids || n == 0) return out;
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

Status find_latest(s3::Client& client, const std::string& bucket, const std::string& db_id,
                   std::vector<GenerationInfo>& gens, const GenerationInfo*& latest) {
    latest = nullptr;
    for (auto& g : gens) {
        if (auto st = describe_generation(client, bucket, db_id, g); !st) return st;
        if (g.has_snapshot) {
            latest = &g;
            return {};
        }
    }
    return {};
}

std::string missing_segment(const std::string& db_id, const GenerationView& g, const GenerationView* newer) {
    const auto& id = g.info.id;
    // Numbering starts at 1 and has no holes.
    if (g.info.first_gap) return segment_key(db_id, id, g.info.first_gap);
    // The successor's snapshot records how far this generation went.
    if (newer && newer->snapshot && newer->snapshot->parent_generation == id &&
        newer->snapshot->parent_seq > g.info.last_seq)
        return segment_key(db_id, id, newer->snapshot->parent_seq);
    return {};
}

Result<RestoreTarget> choose_restore_target(s3::Client& client, const std::string& bucket, const std::string& db_id,
                                            std::vector<GenerationView>& history, const std::string& generation,
                                            std::optional<int64_t> until_us) {
    auto nothing = [&](std::string msg) { return make_error(ErrorKind::NotFound, std::move(msg), "NoGeneration"); };
    auto no_replica = [&](const std::string& why) {
        std::string msg = "database '" + db_id + "' " + why + " in bucket '" + bucket + "'";
        if (history.empty()) {
            // Perhaps a misspelt id: name those that exist (one more LIST, on failure only).
            auto dbs = list_databases(client, bucket);
            if (dbs && !dbs->empty()) {
                msg += " (databases in the bucket:";
                size_t shown = 0;
                for (const auto& d : *dbs) {
                    if (++shown > 20) {
                        msg += " ...";
                        break;
                    }
                    msg += " " + d;
                }
                msg += ")";
            }
        }
        return make_error(ErrorKind::NotFound, std::move(msg), "NoReplica");
    };
    if (history.empty()) return no_replica("has no generation");

    const bool named = !generation.empty();
    bool any_complete = false;
    for (size_t i = 0; i < history.size(); ++i) {
        GenerationView& g = history[i];
        if (named && g.info.id != generation) continue;
        if (auto st = inspect_generation(client, bucket, db_id, g, Detail::Objects); !st) return std::move(st).error();
        const std::string snap = snapshot_key(db_id, g.info.id);
        if (!g.complete()) {
            // Segments are written only after their snapshot, and an
            // unfinished multipart snapshot is invisible to listings:
            // segments without one mean the snapshot was lost. Say so; never
            // skip silently to an older state.
            if (g.info.segments > 0)
                return make_error(ErrorKind::Corrupt,
                                  "snapshot " + snap + " is missing but generation " + g.info.id + " has " +
                                      std::to_string(g.info.segments) +
                                      " segment(s): the generation cannot be restored; restore an older generation "
                                      "(-g) and run verify",
                                  "MissingSnapshot");
            if (named)
                return nothing("generation " + g.info.id + " has no snapshot (" + snap +
                               "): it was never completed; choose another with -g (see ls)");
            continue;  // a snapshot still being uploaded, or an abandoned one
        }
        any_complete = true;
        // The snapshot's header: restore needs it, and a point in time is
        // weighed on it.
        if (auto st = snapshot_header_of(client, bucket, db_id, g); !st) return std::move(st).error();
        if (!g.snapshot) return *g.header_error;
        if (until_us && g.snapshot_time_us() > *until_us) {
            if (named)
                return nothing("generation " + g.info.id + " starts at " + fmt_time_us(g.snapshot_time_us()) +
                               ", after the requested time " + fmt_time_us(*until_us) +
                               "; choose an older generation (see ls) or a later time");
            continue;  // its state is later than asked: the next older one may hold it
        }
        // The end of this generation is proven only by its successor's
        // parent link. (Holes inside it stop the restore by name.)
        if (i > 0) {
            GenerationView& newer = history[i - 1];
            if (auto st = inspect_generation(client, bucket, db_id, newer, Detail::Objects); !st)
                return std::move(st).error();
            if (auto st = snapshot_header_of(client, bucket, db_id, newer); !st) return std::move(st).error();
            if (newer.snapshot && newer.snapshot->parent_generation == g.info.id &&
                newer.snapshot->parent_seq > g.info.last_seq) {
                bool needed = true;
                if (until_us && g.info.segments > 0) {
                    // Missing segments hold transactions later than those
                    // present; a time before the last present one does not
                    // need them.
                    if (auto st = last_segment_header_of(client, bucket, db_id, g); !st)
                        return std::move(st).error();
                    needed = !g.last_segment || g.last_txn_us() < *until_us;
                }
                if (needed)
                    return make_error(ErrorKind::Corrupt,
                                      "segment " + segment_key(db_id, g.info.id, newer.snapshot->parent_seq) +
                                          " is missing: generation " + newer.info.id + " records that generation " +
                                          g.info.id + " reached segment " + std::to_string(newer.snapshot->parent_seq) +
                                          ", the bucket holds segments up to " + std::to_string(g.info.last_seq) +
                                          "; restore an earlier point in time (--utc-time) and run verify",
                                      "MissingSegment");
            }
        }
        RestoreTarget t;
        t.index = i;
        t.generation = g.info.id;
        t.until_us = until_us;
        t.snapshot = *g.snapshot;
        t.snapshot_bytes = g.info.snapshot_bytes;
        t.last_seq = g.info.last_seq;
        t.segment_bytes = g.info.segment_bytes;
        return t;
    }
    if (named)
        return nothing("generation " + generation + " of database '" + db_id + "' not found in bucket '" + bucket +
                       "' (see ls)");
    // Unnamed, the loop looked at every generation.
    if (!any_complete) return no_replica("has no complete generation (no snapshot finished uploading)");
    const GenerationView& oldest = history.back();
    return nothing("no generation of database '" + db_id + "' holds a state at or before " +
                   fmt_time_us(until_us.value_or(0)) + " (the oldest starts at " +
                   (oldest.snapshot ? fmt_time_us(oldest.snapshot_time_us())
                                    : fmt_time_us(oldest.info.created_ms * 1000)) +
                   ")");
}

}  // namespace bottomless::replicator
