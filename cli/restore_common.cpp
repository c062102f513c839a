// See restore_common.h.
#include "cli/restore_common.h"

#include <sys/stat.h>

#include <algorithm>
#include <atomic>
#include <mutex>
#include <thread>

namespace bottomless::cli {

namespace {
// Guards the Context's cipher cache and the interrupt cleanup's slots,
// which several restores of one `restore ID ID ...` reach at once.
std::mutex g_shared_mu;
}  // namespace

RestoreRequest restore_request_from(const Args& args) {
    RestoreRequest r;
    r.generation = args.get("generation");
    if (args.has("generation") && r.generation.empty()) throw UsageError{"-g needs a generation id (see ls)"};
    if (args.has("utc-time")) {
        r.until_us = parse_time(args.get("utc-time"));
        if (!r.until_us)
            throw UsageError{"--utc-time '" + args.get("utc-time") +
                             "': expected RFC 3339 (2026-03-01T10:42:17Z, 2026-03-01T11:42:17.5+01:00) or "
                             "'YYYY-MM-DD HH:MM:SS' (UTC)"};
    }
    r.parallel = static_cast<int>(parse_int_option(args, "parallel", 1, 64, 4));
    if (args.has("integrity-check") &&
        !replicator::parse_integrity_check(args.get("integrity-check"), r.integrity_check))
        throw UsageError{"--integrity-check '" + args.get("integrity-check") + "': expected full, quick or none"};
    return r;
}

Result<RestoreTarget> plan_restore(Context& ctx, const std::string& db_id, const RestoreRequest& req,
                                   std::vector<GenerationView>* history_out) {
    auto history = load_history(ctx.client(), ctx.bucket(), db_id, Detail::Ids);
    if (!history) return std::move(history).error();
    auto choice =
        replicator::choose_restore_target(ctx.client(), ctx.bucket(), db_id, *history, req.generation, req.until_us);
    if (history_out) *history_out = std::move(*history);
    return choice;
}

std::string older_than_damaged(const std::vector<GenerationView>& history, const Error& e) {
    if (e.kind != ErrorKind::Corrupt) return {};
    for (size_t i = 0; i + 1 < history.size(); ++i)
        if (e.message.find(history[i].info.id) != std::string::npos) return history[i + 1].info.id;
    return {};
}

Result<replicator::RestoreResult> run_restore_into(Context& ctx, const std::string& db_id, const RestoreTarget& choice,
                                                   const RestoreRequest& req, const std::string& output,
                                                   const std::string& label,
                                                   std::vector<GenerationView>* history) {
    replicator::RestoreOptions opt;
    opt.parallel = req.parallel;
    opt.integrity_check = req.integrity_check;
    opt.full_if_refused = req.full_if_refused;
    opt.incremental_copy = req.incremental_copy;
    opt.newest = req.generation.empty() && !req.until_us;
    {
        std::lock_guard lock(g_shared_mu);
        auto cipher = ctx.cipher(db_id);
        if (!cipher) return std::move(cipher).error();
        opt.cipher = std::move(cipher).value();
    }
    // restore_target writes OUTPUT.restore-tmp and removes it on failure;
    // an interrupt must not leave it behind either.
    const std::string tmp = output + ".restore-tmp";
    {
        std::lock_guard lock(g_shared_mu);
        cleanup_on_signal(tmp);
    }

    ProgressBar bar(label, req.progress && !ctx.quiet());
    std::atomic<uint64_t> reported{0}, total{choice.total_bytes()};
    std::atomic<bool> stop{false};
    std::thread ticker;
    if (bar.enabled()) {
        opt.progress = [&](uint64_t done, uint64_t all) {
            reported.store(done);
            total.store(all);
        };
        // restore_target reports once the snapshot is in; while it streams,
        // the temp file's growth against the snapshot's page count (from its
        // header, read when it was chosen) tells how far it is.
        // (Not incremental: there the temp file starts as a copy of the old file.)
        const uint64_t raw = req.incremental ? 0 : static_cast<uint64_t>(choice.snapshot.db_pages) * choice.snapshot.page_size;
        ticker = std::thread([&, raw] {
            // Only this thread draws until it is joined.
            while (!stop.load()) {
                uint64_t done = reported.load();
                if (done == 0 && raw > 0) {
                    struct stat st{};
                    if (::stat(tmp.c_str(), &st) == 0)
                        done = static_cast<uint64_t>(static_cast<double>(choice.snapshot_bytes) *
                                                     std::min(1.0, static_cast<double>(st.st_size) /
                                                                       static_cast<double>(raw)));
                }
                bar.update(done, total.load());
                std::this_thread::sleep_for(std::chrono::milliseconds(100));
            }
        });
    }
    auto r = req.incremental && history
                 ? replicator::restore_incremental(ctx.client(), ctx.bucket(), db_id, *history, choice, output, opt)
                 : replicator::restore_target(ctx.client(), ctx.bucket(), db_id, choice, output, opt);
    stop.store(true);
    if (ticker.joinable()) ticker.join();
    if (r && bar.enabled()) bar.update(r->bytes_downloaded, r->bytes_downloaded);
    {
        std::lock_guard lock(g_shared_mu);
        forget_cleanup(tmp);
    }
    bar.finish();
    return r;
}

}  // namespace bottomless::cli
