// What restore and verify share: reading -g/--utc-time/--parallel/
// --integrity-check, choosing the generation, and running
// replicator::restore_database with a progress
// bar and interrupt cleanup.
#pragma once

#include <optional>
#include <string>

#include "cli/common.h"
#include "cli/history.h"
#include "replicator/restore.h"

namespace bottomless::cli {

struct RestoreRequest {
    std::string generation;           // -g
    std::optional<int64_t> until_us;  // --utc-time
    int parallel = 4;                 // --parallel
    // --integrity-check. Full unless given: verify proves a restore with
    // the full check; restore sets replicator::kDefaultIntegrityCheck.
    replicator::IntegrityCheck integrity_check = replicator::IntegrityCheck::Full;
    bool incremental = false;      // --incremental (replicator::restore_incremental)
    bool full_if_refused = false;  // with it, --force
    bool incremental_copy = false; // --incremental-via copy
    // A progress bar (unless quiet); off when several databases restore at once.
    bool progress = true;
};

// Throws UsageError for a bad --utc-time, --parallel or --integrity-check.
RestoreRequest restore_request_from(const Args& args);

// Lists the database's generations and picks the one that serves the
// request (replicator::choose_restore_target, the rule every restore
// shares). Errors: NotFound "NoReplica" when the database has no complete
// generation at all, "NoGeneration" when none serves this request, Corrupt
// naming an object, or what S3 said.
// `history`, when given, receives the listing (for suggestions on failure).
Result<RestoreTarget> plan_restore(Context& ctx, const std::string& db_id, const RestoreRequest& req,
                                   std::vector<GenerationView>* history = nullptr);

// After a Corrupt error: the generation older than the one the error names,
// which may still restore (empty if none).
std::string older_than_damaged(const std::vector<GenerationView>& history, const Error& e);

// Restores the chosen state into `output` (temp file, checks, rename), with
// a progress bar labelled `label` unless quiet. req.incremental needs the
// `history` the choice was made from. Nothing is listed or read
// again: the snapshot and segment GETs only. Several may run at once on
// one Context (restore of several databases): what they share of it (the
// client, the ciphers, the interrupt cleanup) is taken under a lock.
Result<replicator::RestoreResult> run_restore_into(Context& ctx, const std::string& db_id, const RestoreTarget& choice,
                                                   const RestoreRequest& req, const std::string& output,
                                                   const std::string& label,
                                                   std::vector<GenerationView>* history = nullptr);

}  // namespace bottomless::cli
