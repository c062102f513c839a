// bottomless-cli status: what the bucket says about a database's replication —
// its current generation, the newest durable transaction and how long ago it
// committed. The writer's own lag (unshipped transactions) lives in its
// process: SELECT bottomless_status() there; the bucket does not carry it.
#include <cstdio>

#include <nlohmann/json.hpp>

#include "cli/common.h"
#include "cli/history.h"

namespace bottomless::cli {
namespace {

using json = nlohmann::json;

int run_status(Context& ctx, const Args& args) {
    const bool as_json = args.has("json");
    ctx.set_quiet(as_json);
    if (!args.positional().empty()) throw UsageError{"unexpected argument '" + args.positional()[0] + "'"};
    if (!ctx.connect()) return kExitFailure;
    auto db = ctx.database_id();
    if (!db) return kExitUsage;
    auto history = load_existing_history(ctx.client(), ctx.bucket(), *db, Detail::Ids);
    if (!history) return ctx.fail(history.error());
    auto& gens = *history;
    // The current generation: the newest; the newest restorable: the newest
    // with a snapshot (they differ while a new snapshot uploads).
    size_t cur = 0;
    for (size_t i = 0; i < gens.size(); ++i) {
        if (auto st = inspect_generation(ctx.client(), ctx.bucket(), *db, gens[i], Detail::Headers); !st)
            return ctx.fail(st.error());
        cur = i;
        if (gens[i].complete()) break;
    }
    const GenerationView& g = gens[cur];
    const int64_t now = now_us();
    const int64_t last = g.complete() ? g.last_txn_us() : 0;
    if (as_json) {
        json j = {{"database", *db},
                  {"bucket", ctx.bucket()},
                  {"endpoint", ctx.endpoint().empty() ? json(nullptr) : json(ctx.endpoint())},
                  {"generations", gens.size()},
                  {"generation", g.complete() ? json(g.info.id) : json(nullptr)},
                  {"generation_created", format_time_us(g.info.created_ms * 1000)},
                  {"in_progress", cur > 0 ? json(gens[0].info.id) : json(nullptr)},
                  {"segments", g.info.segments},
                  {"bytes", g.total_bytes()},
                  {"last_txn", last ? json(format_time_us(last)) : json(nullptr)},
                  {"last_txn_us", last ? json(last) : json(nullptr)},
                  {"last_txn_age_ms", last ? json((now - last) / 1000) : json(nullptr)},
                  {"lag_ms", nullptr}};
        if (g.header_error) j["error"] = g.header_error->message;
        std::printf("%s\n", j.dump(2).c_str());
    } else {
        std::printf("database        %s in s3://%s (%s)\n", db->c_str(), ctx.bucket().c_str(),
                    ctx.endpoint().empty() ? "AWS" : ctx.endpoint().c_str());
        std::printf("generations     %zu\n", gens.size());
        if (g.complete()) {
            std::printf("current         %s, created %s, snapshot %s + %llu segment(s) (%s)\n", g.info.id.c_str(),
                        format_time_us(g.info.created_ms * 1000).c_str(), format_bytes(g.info.snapshot_bytes).c_str(),
                        static_cast<unsigned long long>(g.info.segments), format_bytes(g.info.segment_bytes).c_str());
            std::printf("last durable    %s (%s)\n", format_time_us(last).c_str(), format_age(now - last).c_str());
        } else {
            std::printf("current         none restorable\n");
        }
        if (cur > 0)
            std::printf("in progress     %s (no snapshot yet: being uploaded, or abandoned)\n", gens[0].info.id.c_str());
        std::printf("lag             not in the bucket: SELECT bottomless_status() in the application shows it\n");
        if (g.header_error) ctx.warn(g.header_error->message + " (run verify)");
    }
    return g.complete() ? kExitOk
                        : ctx.fail(make_error(ErrorKind::NotFound,
                                              "database '" + *db + "' has no complete generation", "NoReplica"));
}

}  // namespace

const Command& status_command() {
    static const Command kCmd = {
        "status",
        "the database's replication as the bucket shows it: generation, newest transaction, its age",
        "status [--json]",
        "Reads the newest generation's headers: which generation the writer appends to,\n"
        "the newest transaction durable in the bucket and how long ago it committed.\n"
        "The writer's lag (what is committed but not yet shipped) is not in the bucket;\n"
        "SELECT bottomless_status() in the application reports it.",
        {
            {0, "json", nullptr, "print JSON"},
        },
        run_status,
    };
    return kCmd;
}

}  // namespace bottomless::cli
