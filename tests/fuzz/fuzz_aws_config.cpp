// Fuzzes the AWS shared config and credentials file parser (s3/config.h):
// parse_ini, and the whole resolution of region, endpoint and credentials
// from a config file and a credentials file (both this input, from memory).
//
// Input: an INI file as ~/.aws/config or ~/.aws/credentials holds it. If it
// contains a line "AWS_PROFILE=name" before a first section, that profile is
// looked up instead of "default" (profiles are where the parser's
// "[profile x]" handling lives).
#include <cstdint>
#include <string>

#include "fuzz_common.h"
#include "s3/config.h"

using namespace bottomless;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    fuzz::quiet_logs();
    std::string_view text = fuzz::as_view(data, size);
    s3::IniFile ini = s3::parse_ini(text);
    for (const auto& [section, keys] : ini)
        for (const auto& [k, v] : keys) {
            // Keys are lowercased; a key or value never spans lines.
            for (char c : k) FUZZ_CHECK(!(c >= 'A' && c <= 'Z'));
            FUZZ_CHECK(k.find('\n') == std::string::npos && v.find('\n') == std::string::npos);
        }

    std::string profile;
    if (text.substr(0, 12) == "AWS_PROFILE=") {
        size_t nl = text.find('\n');
        profile = std::string(text.substr(12, nl == std::string_view::npos ? std::string_view::npos : nl - 12));
    }
    fuzz::MemFile file(text);
    s3::EnvLookup env = [&](std::string_view name) -> std::optional<std::string> {
        if (name == "AWS_CONFIG_FILE" || name == "AWS_SHARED_CREDENTIALS_FILE") return file.path();
        if (name == "AWS_PROFILE" && !profile.empty()) return profile;
        if (name == "HOME") return std::string("/nonexistent");
        return std::nullopt;
    };
    (void)s3::config_from_env(env);
    (void)s3::resolve_credentials(env, profile.empty() ? "default" : profile);
    return 0;
}
