// bottomless-cli verify: proves that a state (or, with --all, every
// generation) can be restored: restores it into a scratch file — which checks
// every object's checksum, the chain between objects and PRAGMA
// integrity_check — checks the segment numbering and the successor's parent
// link, and prints a verdict. Exit 0 only if everything holds.
#include <stdlib.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>

#include <nlohmann/json.hpp>

#include "cli/common.h"
#include "cli/history.h"
#include "cli/restore_common.h"
#include "replicator/restore.h"

namespace bottomless::cli {
namespace {

using json = nlohmann::json;

// A private directory for the scratch database, removed with what is in it.
class ScratchDir {
public:
    explicit ScratchDir(const std::string& parent) {
        std::string tmpl = parent + "/bottomless-verify.XXXXXX";
        if (::mkdtemp(tmpl.data())) {
            path_ = tmpl;
            cleanup_on_signal(path_);
        }
    }
    ~ScratchDir() {
        if (path_.empty()) return;
        clear();
        ::rmdir(path_.c_str());
        forget_cleanup(path_);
    }
    ScratchDir(const ScratchDir&) = delete;
    ScratchDir& operator=(const ScratchDir&) = delete;
    bool ok() const { return !path_.empty(); }
    std::string db() const { return path_ + "/db"; }
    void clear() const {
        for (const char* s : {"", ".restore-tmp", "-wal", "-shm", "-journal", "-bottomless", "-bottomless-pages"})
            ::unlink((db() + s).c_str());
    }

private:
    std::string path_;
};

struct Verdict {
    std::string generation;
    bool ok = false;
    bool skipped = false;  // nothing to check (an unfinished generation)
    std::string message;   // the failure, or what was proven
    replicator::RestoreResult result;
};

json verdict_json(const Verdict& v) {
    json j = {{"generation", v.generation}, {"ok", v.ok}, {"message", v.message}};
    if (v.skipped) j["skipped"] = true;
    if (v.ok && !v.skipped) {
        j["segments"] = v.result.seq;
        j["transactions"] = v.result.transactions;
        j["last_txn"] = format_time_us(v.result.last_commit_us);
        j["last_txn_us"] = v.result.last_commit_us;
        j["pages"] = v.result.db_pages;
        j["page_size"] = v.result.page_size;
        j["downloaded_bytes"] = v.result.bytes_downloaded;
    }
    return j;
}

std::string proven_text(const replicator::RestoreResult& r) {
    return "snapshot + " + std::to_string(r.seq) + " segment(s), " + std::to_string(r.transactions) +
           " transaction(s), last at " + format_time_us(r.last_commit_us) + ", " + std::to_string(r.db_pages) +
           " pages; checksums, chain and integrity_check hold";
}

Verdict verify_one(Context& ctx, const std::string& db, const RestoreTarget& choice, const RestoreRequest& req,
                   const ScratchDir& scratch) {
    Verdict v;
    v.generation = choice.generation;
    scratch.clear();
    auto r = run_restore_into(ctx, db, choice, req, scratch.db(), "verifying " + choice.generation);
    // The snapshot's page index (format 2) against the pages restored.
    bool index_checked = false;
    Status idx = r ? replicator::check_page_digests(scratch.db(), &index_checked) : Status{};
    scratch.clear();
    if (!r) {
        v.message = r.error().message;
        return v;
    }
    if (!idx) {
        v.message = idx.error().message;
        return v;
    }
    v.ok = true;
    v.result = *r;
    v.message = proven_text(*r);
    if (index_checked) v.message += "; the page index matches";
    return v;
}

void print_verdict(const Verdict& v) {
    std::printf("%-7s %s  %s\n", v.skipped ? "SKIP" : v.ok ? "OK" : "FAILED", v.generation.c_str(),
                v.message.c_str());
}

int run_verify(Context& ctx, const Args& args) {
    const bool as_json = args.has("json");
    ctx.set_quiet(args.has("quiet") || as_json);
    if (!args.positional().empty()) throw UsageError{"unexpected argument '" + args.positional()[0] + "'"};
    RestoreRequest req = restore_request_from(args);
    const bool all = args.has("all");
    if (all && (!req.generation.empty() || req.until_us)) throw UsageError{"--all checks every generation: drop -g/--utc-time"};
    std::string parent = args.get("temp-dir");
    if (parent.empty()) {
        const char* t = std::getenv("TMPDIR");
        parent = t && *t ? t : "/tmp";
    }
    if (!ctx.connect()) return kExitFailure;
    auto db = ctx.database_id();
    if (!db) return kExitUsage;
    ScratchDir scratch(parent);
    if (!scratch.ok()) return ctx.fail("cannot create a scratch directory in " + parent, "pass --temp-dir DIR");

    std::vector<Verdict> verdicts;
    if (!all) {
        auto choice = plan_restore(ctx, *db, req);
        if (!choice) {
            if (choice.error().kind != ErrorKind::Corrupt) return ctx.fail(choice.error());
            Verdict v;
            v.generation = req.generation.empty() ? "-" : req.generation;
            v.message = choice.error().message;
            verdicts.push_back(v);
        } else {
            ctx.note("verifying " + *db + " generation " + choice->generation +
                     (choice->until_us ? " at " + format_time_us(*choice->until_us) : std::string()));
            verdicts.push_back(verify_one(ctx, *db, *choice, req, scratch));
        }
    } else {
        auto history = load_existing_history(ctx.client(), ctx.bucket(), *db, Detail::Headers);
        if (!history) return ctx.fail(history.error());
        auto& gens = *history;
        for (size_t i = 0; i < gens.size(); ++i) {
            const GenerationView& g = gens[i];
            Verdict v;
            v.generation = g.info.id;
            const std::string snap = replicator::snapshot_key(*db, g.info.id);
            if (!g.complete()) {
                if (g.info.segments > 0) {
                    v.message = "snapshot " + snap + " is missing but the generation has " +
                                std::to_string(g.info.segments) + " segment(s)";
                } else {
                    v.ok = true;
                    v.skipped = true;
                    v.message = i == 0 ? "no snapshot yet (an upload in progress, or abandoned)"
                                       : "no snapshot: an abandoned generation ('rm -g " + g.info.id + "' removes it)";
                }
            } else if (g.header_error) {
                v.message = g.header_error->message;
            } else if (std::string missing = missing_segment(*db, g, i > 0 ? &gens[i - 1] : nullptr);
                       !missing.empty()) {
                v.message = "segment " + missing + " is missing (the segments present stop at " +
                            std::to_string(g.info.last_seq) + ")";
            } else {
                ctx.note("verifying generation " + g.info.id + " (" + std::to_string(i + 1) + " of " +
                         std::to_string(gens.size()) + ")");
                // The listing and headers are in hand: no request here.
                auto c = replicator::choose_restore_target(ctx.client(), ctx.bucket(), *db, gens, g.info.id,
                                                           std::nullopt);
                if (!c) v.message = c.error().message;
                else v = verify_one(ctx, *db, *c, req, scratch);
            }
            for (const auto& k : g.stray_keys) ctx.warn("unexpected object " + k + " (not part of any history)");
            if (as_json) verdicts.push_back(v);
            else {
                print_verdict(v);
                std::fflush(stdout);
                verdicts.push_back(v);
            }
        }
    }

    size_t failed = 0, checked = 0;
    for (const auto& v : verdicts) {
        if (!v.ok) ++failed;
        if (!v.skipped) ++checked;
    }
    if (as_json) {
        json arr = json::array();
        for (const auto& v : verdicts) arr.push_back(verdict_json(v));
        std::printf("%s\n", json{{"database", *db}, {"bucket", ctx.bucket()}, {"ok", failed == 0},
                                 {"generations", std::move(arr)}}
                                .dump(2)
                                .c_str());
    } else if (!all) {
        const Verdict& v = verdicts.front();
        if (v.ok) std::printf("verdict: OK — %s %s: %s\n", db->c_str(), v.generation.c_str(), v.message.c_str());
        else std::printf("verdict: FAILED — %s\n", v.message.c_str());
    } else if (failed == 0) {
        std::printf("verdict: OK — %zu generation(s) of %s verified\n", checked, db->c_str());
    } else {
        std::printf("verdict: FAILED — %zu of %zu generation(s) of %s cannot be restored\n", failed, verdicts.size(),
                    db->c_str());
    }
    if (failed) {
        std::fprintf(stderr,
                     "  hint: restore an earlier point in time (--utc-time) or another generation (-g) that "
                     "verifies; 'bottomless-cli ls' shows them\n");
        return kExitFailure;
    }
    return kExitOk;
}

}  // namespace

const Command& verify_command() {
    static const Command kCmd = {
        "verify",
        "prove that a database restores: checksums, chain, integrity_check",
        "verify [-g GEN | --utc-time T | --all] [--temp-dir DIR]",
        "Restores into a scratch file (deleted afterwards) and checks everything a\n"
        "restore checks: each object's format version and SHA-256 trailer, the chain\n"
        "(each segment continues its predecessor's checksum and WAL position), segment\n"
        "numbering, the successor generation's record of where this one ended, and\n"
        "PRAGMA integrity_check. Prints a verdict; exit 0 only if all holds.\n"
        "Without options it checks the state 'restore' would produce (the latest).\n"
        "Needs free space for one copy of the database in --temp-dir.",
        {
            {'g', "generation", "GEN", "verify this generation"},
            {'t', "utc-time", "T", "verify the state at T"},
            {'a', "all", nullptr, "verify every generation"},
            {'j', "parallel", "N", "objects downloaded at once (default 4)"},
            {0, "temp-dir", "DIR", "where the scratch copy goes (default: $TMPDIR, else /tmp)"},
            {'q', "quiet", nullptr, "no progress bar or notes"},
            {0, "json", nullptr, "print the verdicts as JSON"},
        },
        run_verify,
    };
    return kCmd;
}

}  // namespace bottomless::cli
