// See history.h.
#include "cli/history.h"

namespace bottomless::cli {

Result<std::vector<GenerationView>> load_existing_history(s3::Client& client, const std::string& bucket,
                                                          const std::string& db_id, Detail detail) {
    auto history = load_history(client, bucket, db_id, detail);
    if (history && history->empty())
        return make_error(ErrorKind::NotFound, "database '" + db_id + "' has no generation in bucket '" + bucket + "'",
                          "NoReplica");
    return history;
}

}  // namespace bottomless::cli
