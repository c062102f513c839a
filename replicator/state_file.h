// The local replication state file "<database>-bottomless": which bucket,
// database id and generation this file's history continues, and where it
// stands. Written by the replicator and by restore; read at every start.
// The file is local but may be stale, truncated or hand-edited: the reader
// rejects anything it does not fully understand (the start then proves
// nothing and begins a new generation, which costs a snapshot, never data).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "replicator/format.h"
#include "s3/result.h"

namespace bottomless::replicator {

struct LocalState {
    std::string bucket, db_id, generation, prev_sha256;
    uint64_t seq = 0;
    WalPosition position;
    bool clean_close = false;
    bool restored = false;  // written by restore_database(), not by a replicator
    std::vector<std::string> lineage;  // generations this file's replicators started
    int64_t db_size = -1, db_mtime_ns = -1;  // set with clean_close or restored
    uint64_t db_ino = 0;
    // Written by restore only: what an incremental restore onto this file
    // needs besides generation/seq/prev_sha256/position (docs/FORMAT.md "The
    // local state file"). page_size 0: a note from a build before them.
    uint32_t page_size = 0, db_pages = 0;
    int64_t last_commit_us = 0;  // commit time of the newest transaction in the file (0: none)
    // Transactions of segment seq+1 also in the file (a point in time inside
    // it): position and prev_sha256 stay those of segment seq's end.
    uint64_t next_txns = 0;
    // Written by restore only: the restore took the bucket's newest state
    // (no generation or time was asked for), so an open of the untouched
    // copy may bring it up to date with what the bucket gained since
    // (restore_incremental) before it starts a new generation from it. A
    // copy restored to a chosen point is kept as it is (a rollback).
    bool newest = false;
    // What the generation is encrypted with, so a start can prove it holds
    // the right key without asking the bucket: the key id (empty: plaintext),
    // and for a passphrase the KDF object's text (salt and cost; no secret).
    std::string key_id;
    std::string kdf;
    // Set just before the WAL epoch of `position` is restarted (or truncated,
    // or deleted) while some of its committed frames are not yet in S3 (they
    // are staged in memory): that epoch ended at `restarted.frame`. After a
    // crash, those frames may still sit in the WAL file past what the new
    // epoch has overwritten, and the next start can recover them instead of
    // starting a new generation. frame 0: no such restart.
    WalPosition restarted;
    // Sync mode: set just before a commit's segment is uploaded, cleared once
    // the state records it. A state file with it set does not prove where
    // the bucket ends (the upload may have landed), so the next start asks
    // the bucket instead of continuing offline.
    bool sync_pending = false;
};

// Parses a state file's text; nullopt (with a warning naming `path`) when it
// is not a state this build reads.
std::optional<LocalState> parse_state_file(std::string_view text, const std::string& path);

// Reads "<database>-bottomless"; nullopt when it is missing, not a regular
// file (a symlink is not followed), larger than a state can be, or unreadable.
std::optional<LocalState> read_state_file(const std::string& path);

// Replaces the state file atomically: a temp file unique to this process and
// call, created 0600 (it holds WAL checksums, which for an encrypted replica
// are secrets: a function of page content) without following symlinks, then
// renamed over `path`. Not fsynced: a stale state only costs a new
// generation at the next start, never data. The one writer of the format.
Status write_state_file(const std::string& path, const LocalState& state);

}  // namespace bottomless::replicator
