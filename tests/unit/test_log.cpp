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

TEST_CASE("server text is escaped before it reaches a terminal or a log line", "[log]") {
    // Plain text and non-ASCII names pass unchanged.
    CHECK(log::printable("db/gen-1/0000000001") == "db/gen-1/0000000001");
    CHECK(log::printable("caf\xc3\xa9/\xe6\x97\xa5\xe6\x9c\xac") == "caf\xc3\xa9/\xe6\x97\xa5\xe6\x9c\xac");
    // Terminal escapes, forged log lines and NULs become visible.
    CHECK(log::printable("\x1b[2J\x1b]0;owned\x07") == "\\x1b[2J\\x1b]0;owned\\x07");
    CHECK(log::printable("ok\n2026-01-01T00:00:00Z bottomless ERROR fake\r") ==
          "ok\\n2026-01-01T00:00:00Z bottomless ERROR fake\\r");
    CHECK(log::printable(std::string_view("a\0b\tc\x7f", 6)) == "a\\x00b\\tc\\x7f");
    // The escape character itself, so an escape cannot be forged.
    CHECK(log::printable("a\\x1b") == "a\\\\x1b");
    // C1 controls (U+009B is CSI on some terminals), bidi overrides, separators.
    CHECK(log::printable("\xc2\x9b" "31m") == "\\u{009B}31m");
    CHECK(log::printable("abc\xe2\x80\xae" "fdp.exe") == "abc\\u{202E}fdp.exe");
    CHECK(log::printable("x\xe2\x80\xa8y") == "x\\u{2028}y");
    // Bytes that are not UTF-8 (a lone C1 byte, a truncated or overlong sequence).
    CHECK(log::printable("\x9b\xc3") == "\\x9b\\xc3");
    CHECK(log::printable("\xc0\xaf") == "\\xc0\\xaf");
    CHECK(log::printable("\xed\xa0\x80") == "\\xed\\xa0\\x80");  // a UTF-16 surrogate
    // A megabyte message stays one short line.
    std::string huge(1 << 20, 'm');
    auto cut = log::printable(huge, 100);
    CHECK(cut.size() == 103);
    CHECK(cut.substr(100) == "...");
}
