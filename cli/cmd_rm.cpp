// bottomless-cli rm: prunes generations. The newest restorable generation
// (the newest with a snapshot) — and anything newer, which may be a snapshot
// still being uploaded — is never selected by --older-than or --keep, and -g
// refuses it, unless --force. Deletion goes in DeleteObjects batches of 1000
// after listing every page; within a generation the segments go newest first
// and the snapshot last, so an interrupted rm leaves a shorter, still
// consistent history rather than a hole.
#include <algorithm>
#include <cstdio>
#include <set>

#include <nlohmann/json.hpp>

#include "cli/common.h"
#include "cli/history.h"
#include "s3/log.h"

namespace bottomless::cli {
namespace {

using json = nlohmann::json;

constexpr size_t kNone = static_cast<size_t>(-1);

// Keys of a generation in deletion order: segments newest first, anything
// else, the snapshot last.
std::vector<std::string> deletion_order(const std::string& db, const GenerationView& g) {
    std::vector<std::pair<uint64_t, std::string>> segs;
    std::vector<std::string> other;
    std::string snap;
    for (const auto& o : g.objects) {
        uint64_t seq = 0;
        if (o.key == replicator::snapshot_key(db, g.info.id)) snap = o.key;
        else if (replicator::parse_segment_key(o.key, seq)) segs.emplace_back(seq, o.key);
        else other.push_back(o.key);
    }
    std::sort(segs.begin(), segs.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
    std::vector<std::string> keys;
    for (auto& s : segs) keys.push_back(std::move(s.second));
    for (auto& k : other) keys.push_back(std::move(k));
    if (!snap.empty()) keys.push_back(snap);
    return keys;
}

int run_rm(Context& ctx, const Args& args) {
    const bool dry = args.has("dry-run");
    const bool force = args.has("force");
    const bool as_json = args.has("json");
    ctx.set_quiet(args.has("quiet") || as_json);
    if (!args.positional().empty()) throw UsageError{"unexpected argument '" + args.positional()[0] + "'"};
    std::set<std::string> named;
    for (const auto& g : args.all("generation")) {
        if (g.empty()) throw UsageError{"-g needs a generation id (see ls)"};
        named.insert(g);
    }
    std::optional<int64_t> older_than;
    if (args.has("older-than")) {
        older_than = parse_time_or_age(args.get("older-than"), now_us());
        if (!older_than)
            throw UsageError{"--older-than '" + args.get("older-than") +
                             "': expected a time (2026-03-01, '2026-03-01 10:42:17', RFC 3339) or an age (30d, 12h, "
                             "90m, 2w)"};
    }
    const bool has_keep = args.has("keep");
    const int64_t keep = parse_int_option(args, "keep", 0, 1'000'000, 0);
    if (named.empty() && !older_than && !has_keep)
        throw UsageError{"say what to remove: -g GEN, --older-than DATE or --keep N"};
    if (!named.empty() && (older_than || has_keep))
        throw UsageError{"-g names generations; do not combine it with --older-than/--keep"};
    if (has_keep && keep == 0 && !force)
        throw UsageError{"--keep 0 removes every generation, the newest restorable one too: add --force if you mean it"};

    if (!ctx.connect()) return kExitFailure;
    auto db = ctx.database_id();
    if (!db) return kExitUsage;
    auto history = load_existing_history(ctx.client(), ctx.bucket(), *db, Detail::Objects);
    if (!history) return ctx.fail(history.error());
    auto& gens = *history;

    // The newest restorable state: protected.
    size_t newest_ok = kNone;
    for (size_t i = 0; i < gens.size() && newest_ok == kNone; ++i)
        if (gens[i].complete()) newest_ok = i;

    std::vector<bool> selected(gens.size(), false);
    if (!named.empty()) {
        for (const auto& id : named) {
            auto it = std::find_if(gens.begin(), gens.end(), [&](const GenerationView& g) { return g.info.id == id; });
            if (it == gens.end())
                return ctx.fail(make_error(ErrorKind::NotFound,
                                           "generation " + id + " of database '" + *db + "' not found (see ls)",
                                           "NoGeneration"));
            size_t i = static_cast<size_t>(it - gens.begin());
            if (i == newest_ok && !force)
                return ctx.fail("generation " + id + " holds the newest restorable state of '" + *db +
                                    "': removing it would lose it",
                                "pass --force to remove it anyway");
            selected[i] = true;
        }
    } else {
        // Everything older than a boundary generation, which is kept: the
        // newest complete one created at or before DATE (it still serves
        // every point in time from DATE on), and the N-th newest complete one.
        size_t from = 0;  // select indexes > boundary
        bool any = true;
        if (older_than) {
            size_t b = kNone;
            for (size_t i = 0; i < gens.size() && b == kNone; ++i)
                if (gens[i].complete() && gens[i].info.created_ms * 1000 <= *older_than) b = i;
            if (b == kNone) any = false;
            else from = std::max(from, b + 1);
        }
        if (has_keep && keep > 0) {
            size_t b = kNone;
            int64_t seen = 0;
            for (size_t i = 0; i < gens.size() && b == kNone; ++i)
                if (gens[i].complete() && ++seen == keep) b = i;
            if (b == kNone) any = false;
            else from = std::max(from, b + 1);
        }
        if (any)
            for (size_t i = from; i < gens.size(); ++i) selected[i] = true;
        if (force && has_keep && keep == 0 && !older_than)
            for (size_t i = 0; i < gens.size(); ++i) selected[i] = true;
    }

    std::vector<std::string> keys;
    json removed = json::array(), kept = json::array();
    uint64_t bytes = 0, objects = 0;
    size_t n_removed = 0;
    for (size_t i = 0; i < gens.size(); ++i) {
        const auto& g = gens[i];
        if (!selected[i]) {
            kept.push_back(g.info.id);
            continue;
        }
        ++n_removed;
        auto ks = deletion_order(*db, g);
        // Defence in depth (the client already drops listed keys outside the
        // requested prefix): only keys under this generation's exact prefix
        // are ever deleted, whatever the server listed.
        const std::string prefix = replicator::generation_prefix(*db, g.info.id);
        for (const auto& k : ks)
            if (k.compare(0, prefix.size(), prefix) != 0)
                return ctx.fail("the listing of generation " + g.info.id + " of '" + *db + "' holds '" +
                                    log::printable(k, 300) + "', which is not under " + prefix + "; nothing was deleted",
                                "the server does not honour the listing prefix: do not run rm against it");
        objects += ks.size();
        bytes += g.total_bytes();
        removed.push_back({{"id", g.info.id}, {"created", format_time_us(g.info.created_ms * 1000)},
                           {"objects", ks.size()}, {"bytes", g.total_bytes()}});
        if (!as_json && !ctx.quiet())
            std::printf("%s %s  created %s, %zu object(s), %s\n", dry ? "would remove" : "removing",
                        g.info.id.c_str(), format_time_table(g.info.created_ms * 1000).substr(0, 19).c_str(),
                        ks.size(), format_bytes(g.total_bytes()).c_str());
        for (auto& k : ks) keys.push_back(std::move(k));
    }

    json failed = json::array();
    if (!dry && !keys.empty()) {
        auto out = ctx.client().delete_objects(ctx.bucket(), keys);
        if (!out) return ctx.fail(out.error(), "deleting " + std::to_string(keys.size()) + " object(s)");
        for (const auto& f : out->failed) failed.push_back({{"key", f.key}, {"code", f.code}, {"message", f.message}});
    }

    const std::string newest = newest_ok == kNone ? "none" : gens[newest_ok].info.id;
    if (as_json) {
        std::printf("%s\n", json{{"database", *db},
                                 {"bucket", ctx.bucket()},
                                 {"dry_run", dry},
                                 {"removed", removed},
                                 {"kept", kept},
                                 {"objects", objects},
                                 {"bytes", bytes},
                                 {"newest_restorable", newest},
                                 {"failed", failed}}
                                .dump(2, ' ', false, json::error_handler_t::replace)
                                .c_str());
    } else if (!ctx.quiet()) {
        if (n_removed == 0)
            std::printf("nothing to remove: %zu generation(s) kept, newest restorable %s\n", gens.size(),
                        newest.c_str());
        else
            std::printf("%s %zu generation(s), %llu object(s), %s; kept %zu generation(s), newest restorable %s\n",
                        dry ? "would remove" : "removed", n_removed, static_cast<unsigned long long>(objects),
                        format_bytes(bytes).c_str(), gens.size() - n_removed, newest.c_str());
    }
    if (!failed.empty()) {
        for (const auto& f : failed)
            std::fprintf(stderr, "%s rm: could not delete %s: %s %s\n", kProgram,
                         log::printable(f["key"].get<std::string>(), 300).c_str(),
                         log::printable(f["code"].get<std::string>(), 64).c_str(),
                         log::printable(f["message"].get<std::string>(), 512).c_str());
        return ctx.fail(std::to_string(failed.size()) + " object(s) could not be deleted",
                        "check the credentials' s3:DeleteObject permission and run rm again");
    }
    return kExitOk;
}

}  // namespace

const Command& rm_command() {
    static const Command kCmd = {
        "rm",
        "remove generations: -g GEN, --older-than DATE, --keep N",
        "rm (-g GEN ... | --older-than DATE | --keep N) [--dry-run] [--force]",
        "Removes whole generations (snapshot and segments). Never removes the newest\n"
        "restorable generation (the newest with a snapshot) or anything newer unless\n"
        "--force. --older-than removes the generations that only serve points in time\n"
        "before DATE: everything older than the newest complete generation created at\n"
        "or before DATE. --keep N keeps the N newest complete generations (and anything\n"
        "newer) and removes the rest. Both together remove what both select.\n"
        "DATE is a time (2026-03-01, '2026-03-01 10:42:17', RFC 3339) or an age (30d,\n"
        "12h, 90m, 2w). Use --dry-run first.",
        {
            {'g', "generation", "GEN", "remove this generation (repeatable)"},
            {0, "older-than", "DATE", "remove what only serves points in time before DATE"},
            {0, "keep", "N", "keep the N newest complete generations, remove the older ones"},
            {0, "dry-run", nullptr, "list what would be removed; remove nothing"},
            {'f', "force", nullptr, "allow removing the newest restorable generation (-g, --keep 0)"},
            {'q', "quiet", nullptr, "no listing"},
            {0, "json", nullptr, "print what was (or would be) removed as JSON"},
        },
        run_rm,
    };
    return kCmd;
}

}  // namespace bottomless::cli
