// The CLI's view of a database's history. Listing, describing generations,
// reading headers and choosing what a restore uses belong to
// replicator/bucket.h (the rule the VFS's auto-restore shares); this header
// brings those names into the CLI and adds what is only presentation.
#pragma once

#include <string>
#include <vector>

#include "replicator/bucket.h"
#include "s3/client.h"
#include "s3/result.h"

namespace bottomless::cli {

using replicator::Detail;
using replicator::GenerationView;
using replicator::inspect_generation;
using replicator::load_history;
using replicator::missing_segment;
using replicator::RestoreTarget;

// load_history(), but an empty history is an error (NotFound, "NoReplica")
// that names the database and the bucket.
Result<std::vector<GenerationView>> load_existing_history(s3::Client& client, const std::string& bucket,
                                                          const std::string& db_id, Detail detail);

}  // namespace bottomless::cli
