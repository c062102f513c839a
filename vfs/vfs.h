// The "bottomless" VFS shim: registration and lookup of a connection's
// replicator. See vfs.cpp for how SQLite's file operations are observed.
#pragma once

#include <string>

#include "replicator/sqlite_api.h"

namespace bottomless::replicator {
class Replicator;
class Follower;
}

namespace bottomless::vfs {

constexpr const char* kVfsName = "bottomless";

// Registers the VFS over the current default VFS. Idempotent.
int register_vfs(bool make_default);

// The replicator behind a main-database file opened through this VFS, or
// nullptr (another VFS, or replication skipped).
replicator::Replicator* replicator_of(sqlite3_file* file);
bool is_bottomless_file(sqlite3_file* file);
// Non-zero when another process replicated the database behind `file` when
// it was opened: its pid (-1 when unknown). Such a connection writes
// through the process's follower (follower_of), or is read-only without one.
long leader_elsewhere(sqlite3_file* file);
replicator::Follower* follower_of(sqlite3_file* file);
// bottomless_status() of a read replica (replica=1), or empty when `file`
// is not one.
std::string replica_status(sqlite3_file* file);

}  // namespace bottomless::vfs
