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

// True when the sqlite3 shell cannot load the extension in this build: a
// sanitizer build (the system's shell is not instrumented) for which
// tests/CMakeLists.txt found no sanitizer runtime to preload. Otherwise the
// sqlite3 on PATH is a wrapper that preloads it (catch_main.cpp), and tests
// that drive the shell run in sanitizer builds too.
constexpr bool sanitizer_build() {
#if (defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)) && !defined(BOTTOMLESS_SHELL_DIR)
    return true;
#else
    return false;
#endif
}

// Tests whose sqlite3 shells hold a database open with .system (a fork of
// the multithreaded shell) skip themselves under ThreadSanitizer, which does
// not support that (the child crashes), and where the shell cannot load the
// extension at all; they are about processes, not threads.
constexpr bool skip_process_tests() {
#if defined(__SANITIZE_THREAD__)
    return true;
#else
    return sanitizer_build();
#endif
}
constexpr const char* kProcessSkipReason =
    "needs the sqlite3 shell with the extension and .system (not under ThreadSanitizer)";

// The sqlite3 shell to exec by path (the wrapper in sanitizer builds).
inline std::string sqlite3_shell() {
#ifdef BOTTOMLESS_SHELL_DIR
    return BOTTOMLESS_SHELL_DIR "/sqlite3";
#else
    return "/usr/bin/sqlite3";
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
