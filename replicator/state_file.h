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

namespace bottomless::replicator {

struct LocalState {
    std::string bucket, db_id, generation, prev_sha256;
    uint64_t seq = 0;
    WalPosition position;
    bool clean_close = false;
    bool restored = false;  // written by restore_database(), not by a replicator
    std::vector<std::string> lineage;  // generations this file's replicators started
    int64_t db_size = -1, db_mtime_ns = -1;
    uint64_t db_ino = 0;
};

// Parses a state file's text; nullopt (with a warning naming `path`) when it
// is not a state this build reads.
std::optional<LocalState> parse_state_file(std::string_view text, const std::string& path);

}  // namespace bottomless::replicator
