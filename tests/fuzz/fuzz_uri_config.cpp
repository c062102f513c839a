// Fuzzes the replication settings (replicator/config.h): load_config over
// URI parameters and LIBSQL_BOTTOMLESS_* environment variables, whose
// values users type and whose parsing (durations, sizes, booleans, enums,
// keys) must refuse garbage with an error, never crash or wrap.
//
// Input: lines "name=value" become URI parameters; lines "$NAME=value"
// become environment variables (e.g. "$LIBSQL_BOTTOMLESS_BATCH_MAX_BYTES=1").
// The database path is fixed unless a line "@path" gives one.
#include <cstdint>
#include <map>
#include <string>

#include "fuzz_common.h"
#include "replicator/config.h"

using namespace bottomless;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    fuzz::quiet_logs();
    std::string_view text = fuzz::as_view(data, size);
    std::map<std::string, std::string> uri, envs;
    std::string db_path = "/tmp/fuzz.db";
    while (!text.empty()) {
        size_t nl = text.find('\n');
        std::string_view line = text.substr(0, nl);
        text.remove_prefix(nl == std::string_view::npos ? text.size() : nl + 1);
        if (!line.empty() && line[0] == '@') {
            db_path.assign(line.substr(1));
            continue;
        }
        bool is_env = !line.empty() && line[0] == '$';
        if (is_env) line.remove_prefix(1);
        size_t eq = line.find('=');
        std::string k(line.substr(0, eq)), v(eq == std::string_view::npos ? std::string_view() : line.substr(eq + 1));
        (is_env ? envs : uri)[k] = v;
    }
    // Credentials and a home with no AWS files: the S3 part resolves without
    // touching this machine's files.
    envs.emplace("AWS_ACCESS_KEY_ID", "AKIDFUZZ");
    envs.emplace("AWS_SECRET_ACCESS_KEY", "fuzzsecret");
    envs.emplace("HOME", "/nonexistent");
    s3::EnvLookup env = [&envs](std::string_view name) -> std::optional<std::string> {
        auto it = envs.find(std::string(name));
        if (it == envs.end()) return std::nullopt;
        return it->second;
    };
    auto cfg = replicator::load_config(db_path, uri, env);
    if (!cfg) return 0;
    // What an accepted configuration promises.
    FUZZ_CHECK(replicator::validate_db_id(cfg->db_id).ok());
    FUZZ_CHECK(!cfg->bucket.empty());
    FUZZ_CHECK(cfg->batch_max_bytes > 0);
    return 0;
}
