// See s3_env.h.
#include "support/s3_env.h"

#include <catch2/catch.hpp>

#include <cstdlib>
#include <random>

namespace bottomless::testing {

s3::ClientConfig server_config() {
    auto env = s3::process_env();
    if (!env("LIBSQL_BOTTOMLESS_ENDPOINT"))
        FAIL("LIBSQL_BOTTOMLESS_ENDPOINT is not set: integration tests need the test S3 server "
             "(run scripts/test.sh, or scripts/s3-server.sh start && eval \"$(scripts/s3-server.sh env)\")");
    auto cfg = s3::config_from_env(env);
    if (!cfg) FAIL(cfg.error().describe());
    // Tests that exercise retries set their own budget; keep the default short
    // so a broken server fails a test in seconds, not minutes.
    cfg->retry.max_elapsed = std::chrono::milliseconds(20'000);
    return std::move(cfg).value();
}

std::unique_ptr<s3::Client> server_client() { return std::make_unique<s3::Client>(server_config()); }

int server_port() {
    std::string ep = server_config().endpoint;  // http://127.0.0.1:PORT
    return std::stoi(ep.substr(ep.rfind(':') + 1));
}

std::string unique_name(const std::string& prefix) {
    static thread_local std::mt19937_64 rng{std::random_device{}()};
    static constexpr char kChars[] = "abcdefghijklmnopqrstuvwxyz0123456789";
    std::string s = prefix + "-";
    for (int i = 0; i < 12; ++i) s += kChars[rng() % 36];
    return s;
}

TestBucket::TestBucket(s3::Client& client, const std::string& prefix)
    : client_(client), name_(unique_name(prefix)) {
    auto st = client_.create_bucket(name_);
    if (!st) FAIL("cannot create test bucket " + name_ + ": " + st.error().describe());
}

TestBucket::~TestBucket() {
    if (std::getenv("BOTTOMLESS_CRASH_KEEP")) return;  // debugging aid: keep the evidence
    (void)client_.delete_bucket_and_objects(name_);
}

}  // namespace bottomless::testing
