// Log level parsing and URL redaction. (The "no secret in any log line" proof
// runs against the real server in tests/integration/test_s3_client.cpp.)
#include <catch2/catch.hpp>

#include "s3/log.h"

using namespace bottomless;

TEST_CASE("log levels parse case-insensitively", "[log]") {
    log::Level l{};
    CHECK(log::parse_level("TRACE", l));
    CHECK(l == log::Level::Trace);
    CHECK(log::parse_level("warn", l));
    CHECK(l == log::Level::Warn);
    CHECK_FALSE(log::parse_level("verbose", l));
}

TEST_CASE("URLs lose their query string and user info before logging", "[log]") {
    CHECK(log::redact_url("https://b.s3.amazonaws.com/k?X-Amz-Signature=abc&X-Amz-Credential=AK") ==
          "https://b.s3.amazonaws.com/k");
    CHECK(log::redact_url("http://user:pass@host:9000/b/k#frag") == "http://host:9000/b/k");
}

TEST_CASE("a sink captures lines only at enabled levels", "[log]") {
    std::vector<std::string> lines;
    log::set_sink([&](log::Level, std::string_view l) { lines.emplace_back(l); });
    auto saved = log::level();
    log::set_level(log::Level::Warn);
    log::info("hidden");
    log::warn("shown");
    log::set_level(saved);
    log::set_sink(nullptr);
    CHECK(lines == std::vector<std::string>{"shown"});
}
