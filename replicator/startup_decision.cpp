#include "replicator/startup_decision.h"

#include <algorithm>

namespace bottomless::replicator {

std::string why_not_offline(const OfflineFacts& f) {
    // initial_replication=force asks for a decision against the bucket; a
    // restored file's note starts a new history (both need the bucket).
    if (f.initial_replication == InitialReplication::Force) return "initial_replication=force";
    const LocalState* s = f.state;
    if (!s) return "no state file";
    if (s->restored) return "the file was restored: a new history starts from it";
    if (s->generation.empty()) return "the state file names no generation";
    if (s->bucket != f.bucket || s->db_id != f.db_id) return "the state file is for another bucket or database id";
    // A sync commit's upload was under way when the last run ended: the
    // bucket may hold one more transaction than the state file says.
    if (s->sync_pending) return "a sync commit's upload was under way when the last run ended";
    // The key must provably be the generation's.
    auto id = f.key_id ? f.key_id() : std::optional<std::string>(std::string());
    if (!id || *id != s->key_id) return "the configured key is not provably the generation's";
    if (!f.proven || !f.proven()) return "the local files are not where the recorded history ends";
    return {};
}

StartupPlan decide_startup(const StartupFacts& f) {
    StartupPlan plan;
    const bool force = f.initial_replication == InitialReplication::Force;
    auto new_generation = [&](std::string reason, std::string parent = {}, uint64_t parent_seq = 0) {
        plan.action = StartupAction::NewGeneration;
        plan.reason = std::move(reason);
        plan.parent_generation = std::move(parent);
        plan.parent_seq = parent_seq;
        return plan;
    };

    // The key comes first: anything but the newest generation's key fails
    // the open, unless initial_replication=force says to start a new
    // generation under the new setting (key rotation, encryption on or off).
    bool key_switch = false;
    if (f.key_mismatch) {
        Error e = *f.key_mismatch;
        if (!force) {
            e.message = "cannot replicate " + f.path + ": " + e.message +
                        ". To start a new generation under this setting (turning encryption on or off, or rotating "
                        "the key), open once with initial_replication=force";
            plan.action = StartupAction::Refuse;
            plan.error = std::move(e);
            return plan;
        }
        plan.warning = f.path + ": " + e.message + "; a new generation starts (initial_replication=force)";
        key_switch = true;
    }

    const LocalFiles& l = f.files;
    const bool local_empty = (!l.db_exists || l.db_size == 0) && (!l.wal_exists || l.wal_size == 0);
    const LocalState* s = f.state;
    const bool has_latest = f.latest.has_value();

    if (local_empty) {
        if (has_latest && f.auto_restore) {
            plan.action = StartupAction::Restore;
            plan.reason = "the database was restored from the bucket";
            return plan;
        }
        return new_generation(has_latest ? "auto-restore is off: a new history starts"
                                         : "first start: nothing in the bucket");
    }
    // Restored by bottomless-cli and untouched since: a new history whose
    // parent is the restored state (even if the bucket moved on: restoring an
    // older point in time and starting from it is a rollback).
    if (s && s->restored && l.db_exists && (!l.wal_exists || l.wal_size == 0) && s->db_size == l.db_size &&
        s->db_mtime_ns == l.db_mtime_ns && s->db_ino == l.db_ino) {
        // Restored as the newest state (not a chosen point) and the bucket
        // went on since: the copy is an older state of the same history,
        // brought up to date rather than rolling the bucket back to it.
        if (s->newest && f.auto_restore && !key_switch && has_latest &&
            (*f.latest != s->generation || f.latest_seq > s->seq)) {
            new_generation("the database was restored from generation " + s->generation, s->generation, s->seq);
            plan.action = StartupAction::CatchUp;
            return plan;
        }
        return new_generation("the database was restored from generation " + s->generation, s->generation, s->seq);
    }
    if (key_switch)
        return new_generation(f.key_id.empty() ? "encryption turned off" : "encryption changed: key id " + f.key_id,
                              *f.latest, f.latest_seq);
    if (!has_latest) return new_generation("first start: the bucket has no generation of '" + f.db_id + "'");
    const std::string& latest = *f.latest;

    if (s && s->generation == latest) {
        // We wrote the bucket's newest generation. Continue it only if the
        // local files still are exactly where that history ends.
        if (f.latest_seq == s->seq && f.proven && f.proven()) {
            plan.action = StartupAction::Continue;
            return plan;
        }
        new_generation("the local files do not match where the bucket's history ends (local changes, or an upload "
                       "whose outcome was unknown)",
                       latest, f.latest_seq);
        plan.action = StartupAction::ContinueAtBucketEnd;
        return plan;
    }
    if (s && std::find(s->lineage.begin(), s->lineage.end(), latest) != s->lineage.end()) {
        // The bucket's newest generation was started from this file (the last
        // run may have died before recording how far it got): the local file
        // is at least as new. If the WAL still holds where it ends, go on
        // from there; otherwise where it ends is not proven.
        new_generation("this file started generation " + latest + " but its end is not recorded", latest,
                       f.latest_seq);
        plan.action = StartupAction::ContinueAtBucketEnd;
        return plan;
    }

    const std::string why = s ? "the bucket's newest generation " + latest +
                                    " is not the one this file was last replicated to (" + s->generation +
                                    "): another writer, or a restore elsewhere"
                              : "this file has no replication state for this bucket, so nothing proves they match";
    switch (f.initial_replication) {
    case InitialReplication::Skip:
        plan.action = StartupAction::Skip;
        plan.warning = f.path + ": replication skipped for this run (LIBSQL_BOTTOMLESS_INITIAL_REPLICATION=skip): " + why;
        return plan;
    case InitialReplication::Force:
        plan.warning = f.path + ": replicating the local file as a new generation (initial_replication=force): " + why;
        return new_generation("forced by initial_replication=force", latest, f.latest_seq);
    case InitialReplication::Error:
        break;
    }
    plan.action = StartupAction::Refuse;
    plan.error = make_error(ErrorKind::InvalidArgument,
                            "local database " + f.path + " and s3://" + f.bucket + "/" + f.db_id + " disagree: " + why +
                                ". Set LIBSQL_BOTTOMLESS_INITIAL_REPLICATION=force (or initial_replication=force) to "
                                "replicate the local file as a new generation, =skip to open it without replication, "
                                "or move the local file away to restore it from the bucket",
                            "ReplicaMismatch");
    return plan;
}

}  // namespace bottomless::replicator
