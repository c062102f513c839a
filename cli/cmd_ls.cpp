// bottomless-cli ls: the databases in a bucket, or the generations of one,
// newest first, with what each can restore (first and last transaction time).
#include <cinttypes>
#include <cstdio>

#include <nlohmann/json.hpp>

#include "cli/common.h"
#include "cli/history.h"
#include "s3/log.h"

namespace bottomless::cli {
namespace {

using json = nlohmann::json;

// "encrypted, key id X (the given key)" and friends. `key_id` is the given
// key's id, empty when no key was given.
std::string encryption_text(const replicator::SnapshotHeader& h, const std::string& key_id) {
    if (!h.encryption) return "not encrypted";
    std::string s = "encrypted (" + h.encryption->alg + "), key id " + h.encryption->key_id;
    if (!key_id.empty()) s += h.encryption->key_id == key_id ? " (the given key)" : " (not the given key)";
    return s;
}

std::string hex32(uint32_t v) {
    char buf[16];
    std::snprintf(buf, sizeof buf, "0x%08" PRIx32, v);
    return buf;
}

json position_json(const replicator::WalPosition& p) {
    return {{"salt1", p.salt1}, {"salt2", p.salt2}, {"frame", p.frame}, {"cksum1", p.cksum1}, {"cksum2", p.cksum2}};
}

std::string position_text(const replicator::WalPosition& p) {
    return "WAL salts " + hex32(p.salt1) + "/" + hex32(p.salt2) + " frame " + std::to_string(p.frame) + " (cksum " +
           hex32(p.cksum1) + "/" + hex32(p.cksum2) + ")";
}

json generation_json(const GenerationView& g, bool verbose, const std::string& key_id) {
    json j = {{"id", g.info.id},
              {"created", format_time_us(g.info.created_ms * 1000)},
              {"created_us", g.info.created_ms * 1000},
              {"complete", g.complete()},
              {"snapshot_bytes", g.info.snapshot_bytes},
              {"segments", g.info.segments},
              {"last_seq", g.info.last_seq},
              {"segment_bytes", g.info.segment_bytes},
              {"objects", g.object_count()},
              {"bytes", g.total_bytes()}};
    int64_t first = g.snapshot_time_us(), last = g.last_txn_us();
    j["first_txn"] = first ? json(format_time_us(first)) : json(nullptr);
    j["first_txn_us"] = first ? json(first) : json(nullptr);
    j["last_txn"] = last ? json(format_time_us(last)) : json(nullptr);
    j["last_txn_us"] = last ? json(last) : json(nullptr);
    if (g.snapshot) {
        j["parent"] = g.snapshot->parent_generation.empty() ? json(nullptr) : json(g.snapshot->parent_generation);
        j["parent_seq"] = g.snapshot->parent_seq;
        j["page_size"] = g.snapshot->page_size;
        j["snapshot_pages"] = g.snapshot->db_pages;
        j["snapshot_position"] = position_json(g.snapshot->position);
        j["compression"] = replicator::to_string(g.snapshot->compression);
        // Format 2: a page index (incremental restores fetch only what differs).
        j["snapshot_format"] = g.snapshot->frame_pages ? 2 : 1;
        j["encrypted"] = g.snapshot->encryption.has_value();
        j["key_id"] = g.snapshot->encryption ? json(g.snapshot->encryption->key_id) : json(nullptr);
        if (g.snapshot->encryption && !key_id.empty()) j["key_matches"] = g.snapshot->encryption->key_id == key_id;
    } else {
        j["parent"] = nullptr;
    }
    if (g.last_segment) {
        j["end_position"] = position_json(g.last_segment->end);
        j["db_pages"] = g.last_segment->txns.empty() ? 0u : g.last_segment->txns.back().db_pages;
    } else if (g.snapshot) {
        j["end_position"] = position_json(g.snapshot->position);
        j["db_pages"] = g.snapshot->db_pages;
    }
    if (verbose) {
        j["snapshot_sha256"] = g.snapshot_sha256.empty() ? json(nullptr) : json(g.snapshot_sha256);
        j["last_segment_sha256"] = g.last_segment_sha256.empty() ? json(nullptr) : json(g.last_segment_sha256);
    }
    if (!g.stray_keys.empty()) j["stray_objects"] = g.stray_keys;
    if (g.header_error) j["error"] = g.header_error->message;
    return j;
}

std::string created_text(int64_t ms) {
    std::string t = format_time_table(ms * 1000);
    return t.size() > 19 ? t.substr(0, 19) : t;
}

int ls_databases(Context& ctx, bool as_json) {
    auto dbs = replicator::list_databases(ctx.client(), ctx.bucket());
    if (!dbs) return ctx.fail(dbs.error());
    if (as_json) {
        // Names come from the server: invalid UTF-8 must not throw in dump().
        std::printf("%s\n", json{{"bucket", ctx.bucket()}, {"databases", *dbs}}
                                .dump(2, ' ', false, json::error_handler_t::replace)
                                .c_str());
        return kExitOk;
    }
    for (const auto& d : *dbs) std::printf("%s\n", log::printable(d, 300).c_str());
    if (dbs->empty()) ctx.note("bucket '" + ctx.bucket() + "' holds no databases");
    else ctx.note("(" + std::to_string(dbs->size()) + " database(s); 'bottomless-cli -d ID ls' lists one's generations)");
    return kExitOk;
}

int run_ls(Context& ctx, const Args& args) {
    const bool verbose = args.has("verbose");
    const bool as_json = args.has("json");
    const auto limit = static_cast<size_t>(parse_int_option(args, "limit", 1, 1'000'000, 0));
    ctx.set_quiet(args.has("quiet") || as_json);
    if (!args.positional().empty()) throw UsageError{"unexpected argument '" + args.positional()[0] + "'"};
    if (!ctx.connect()) return kExitFailure;
    if (!ctx.has_explicit_database()) return ls_databases(ctx, as_json);
    const std::string db = *ctx.database_id();

    auto history = load_history(ctx.client(), ctx.bucket(), db, verbose ? Detail::Trailers : Detail::Headers, limit);
    if (!history) return ctx.fail(history.error());
    // Listing needs no key (headers are plaintext); given one, say which
    // generations it opens.
    std::string key_id;
    if (ctx.has_encryption()) {
        if (auto c = ctx.cipher(db); !c) ctx.warn(c.error().message);
        else if (*c) key_id = (*c)->key_id();
    }
    auto& gens = *history;
    const size_t shown = limit ? std::min(limit, gens.size()) : gens.size();

    if (as_json) {
        json arr = json::array();
        for (size_t i = 0; i < shown; ++i) arr.push_back(generation_json(gens[i], verbose, key_id));
        json out = {{"bucket", ctx.bucket()}, {"database", db}, {"generations", std::move(arr)},
                    {"total_generations", gens.size()}};
        std::printf("%s\n", out.dump(2).c_str());
        if (gens.empty()) {
            ctx.set_quiet(false);
            return ctx.fail(make_error(ErrorKind::NotFound,
                                       "database '" + db + "' has no generation in bucket '" + ctx.bucket() + "'",
                                       "NoGeneration"));
        }
        return kExitOk;
    }
    if (gens.empty())
        return ctx.fail(make_error(ErrorKind::NotFound,
                                   "database '" + db + "' has no generation in bucket '" + ctx.bucket() + "'",
                                   "NoGeneration"));

    std::printf("%-25s  %-19s  %10s  %8s  %-26s  %-26s  %s\n", "GENERATION", "CREATED (UTC)", "SNAPSHOT", "SEGMENTS",
                "FIRST TXN (UTC)", "LAST TXN (UTC)", "PARENT");
    for (size_t i = 0; i < shown; ++i) {
        const GenerationView& g = gens[i];
        std::string snap = g.complete() ? format_bytes(g.info.snapshot_bytes) : "missing";
        std::string parent = g.snapshot && !g.snapshot->parent_generation.empty()
                                 ? g.snapshot->parent_generation + " @" + std::to_string(g.snapshot->parent_seq)
                                 : "-";
        std::printf("%-25s  %-19s  %10s  %8llu  %-26s  %-26s  %s\n", g.info.id.c_str(),
                    created_text(g.info.created_ms).c_str(), snap.c_str(),
                    static_cast<unsigned long long>(g.info.segments), format_time_table(g.snapshot_time_us()).c_str(),
                    format_time_table(g.last_txn_us()).c_str(), parent.c_str());
        if (verbose) {
            if (g.snapshot)
                std::printf("    snapshot: page size %u, %u pages, %s, %s, at %s\n", g.snapshot->page_size,
                            g.snapshot->db_pages, replicator::to_string(g.snapshot->compression),
                            g.snapshot->frame_pages ? "format 2 (page index)" : "format 1",
                            position_text(g.snapshot->position).c_str());
            if (g.snapshot) std::printf("    %s\n", encryption_text(*g.snapshot, key_id).c_str());
            if (g.last_segment) {
                uint32_t pages = g.last_segment->txns.empty() ? 0 : g.last_segment->txns.back().db_pages;
                std::printf("    segments: %llu..%llu, ends at %s, %u pages\n",
                            static_cast<unsigned long long>(g.info.first_seq),
                            static_cast<unsigned long long>(g.info.last_seq),
                            position_text(g.last_segment->end).c_str(), pages);
            }
            std::printf("    objects: %llu, %s (snapshot %s, segments %s)\n",
                        static_cast<unsigned long long>(g.object_count()), format_bytes(g.total_bytes()).c_str(),
                        format_bytes(g.info.snapshot_bytes).c_str(), format_bytes(g.info.segment_bytes).c_str());
            if (!g.snapshot_sha256.empty()) std::printf("    sha256 snapshot:     %s\n", g.snapshot_sha256.c_str());
            if (!g.last_segment_sha256.empty())
                std::printf("    sha256 last segment: %s\n", g.last_segment_sha256.c_str());
            for (const auto& k : g.stray_keys) std::printf("    stray object: %s\n", k.c_str());
        }
        if (g.header_error) ctx.warn(g.header_error->message + " (run verify)");
        if (!g.complete() && g.info.segments > 0)
            ctx.warn("generation " + g.info.id + " has segments but no snapshot: it cannot be restored (run verify)");
    }
    if (shown < gens.size())
        ctx.note("(" + std::to_string(gens.size() - shown) + " older generation(s) not shown; -l changes the limit)");
    return kExitOk;
}

}  // namespace

const Command& ls_command() {
    static const Command kCmd = {
        "ls",
        "list the databases in the bucket, or (with -d) the generations of one",
        "ls [-v] [-l N] [--json]",
        "Without -d: the database ids in the bucket. With -d ID: its generations, newest\n"
        "first: id, creation time (UTC), snapshot size, number of segments, the first\n"
        "and last transaction time it can restore, and the generation it continues\n"
        "(@ its last segment). FIRST TXN is the state the snapshot holds: the earliest\n"
        "point in time this generation restores. Times print as --utc-time accepts them.",
        {
            {'v', "verbose", nullptr, "add page size, WAL positions, checksums, object counts and bytes"},
            {'l', "limit", "N", "show the N newest generations only"},
            {0, "json", nullptr, "print JSON (for scripts)"},
            {'q', "quiet", nullptr, "no notes on stderr"},
        },
        run_ls,
    };
    return kCmd;
}

}  // namespace bottomless::cli
