// Helpers for tests against the real S3 server started by scripts/s3-server.sh:
// its settings from the environment, and throw-away buckets.
#pragma once

#include <memory>
#include <string>

#include "s3/client.h"

namespace bottomless::testing {

// Client settings for the test server. Fails the test with a clear message
// when LIBSQL_BOTTOMLESS_ENDPOINT is unset (run via scripts/test.sh, or
// `eval "$(scripts/s3-server.sh env)"` first).
s3::ClientConfig server_config();
std::unique_ptr<s3::Client> server_client();
// The test server's port (for a FaultProxy in front of it).
int server_port();

// True in AddressSanitizer/ThreadSanitizer builds. The system's sqlite3 shell
// cannot load an instrumented extension there, so tests that drive the
// shell are skipped (with a warning) in those builds only.
constexpr bool sanitizer_build() {
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
    return true;
#else
    return false;
#endif
}

// A random lower-case name with a prefix, valid as a bucket name.
std::string unique_name(const std::string& prefix);

// A bucket created for one test and emptied and deleted afterwards.
class TestBucket {
public:
    explicit TestBucket(s3::Client& client, const std::string& prefix = "test");
    ~TestBucket();
    TestBucket(const TestBucket&) = delete;
    TestBucket& operator=(const TestBucket&) = delete;
    const std::string& name() const { return name_; }

private:
    s3::Client& client_;
    std::string name_;
};

}  // namespace bottomless::testing
