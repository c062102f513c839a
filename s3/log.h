// Levelled logging to stderr, shared by every layer of bottomless.
//
// The level comes from LIBSQL_BOTTOMLESS_LOG (error|warn|info|debug|trace,
// default warn). Callers must never pass a secret: the S3 client logs method,
// bucket, key and status, never headers, query strings or signatures; a test
// runs the whole client at trace level and greps the output for secrets.
#pragma once

#include <functional>
#include <string>
#include <string_view>

namespace bottomless::log {

enum class Level { Error = 0, Warn = 1, Info = 2, Debug = 3, Trace = 4 };

// Parses a level name; returns false for an unknown one.
bool parse_level(std::string_view name, Level& out) noexcept;

Level level() noexcept;
void set_level(Level level) noexcept;
inline bool enabled(Level l) noexcept { return static_cast<int>(l) <= static_cast<int>(level()); }

// Replaces the stderr writer (tests capture lines); pass nullptr to restore.
using Sink = std::function<void(Level, std::string_view line)>;
void set_sink(Sink sink);

void write(Level level, std::string_view message);

inline void error(std::string_view m) { if (enabled(Level::Error)) write(Level::Error, m); }
inline void warn(std::string_view m) { if (enabled(Level::Warn)) write(Level::Warn, m); }
inline void info(std::string_view m) { if (enabled(Level::Info)) write(Level::Info, m); }
inline void debug(std::string_view m) { if (enabled(Level::Debug)) write(Level::Debug, m); }
inline void trace(std::string_view m) { if (enabled(Level::Trace)) write(Level::Trace, m); }

// Drops the query string and any user-info from a URL so presigned
// signatures and credentials in URLs never reach a log line.
std::string redact_url(std::string_view url);

// Makes text that came from a server or a bucket (error messages, codes,
// object keys) safe to put on a terminal or in a log line: a hostile server
// must not be able to move the cursor, rewrite earlier lines or forge log
// entries. C0 controls and DEL become \n, \r, \t or \xNN; C1 controls,
// bidirectional overrides and line/paragraph separators become \u{NNNN};
// bytes that are not valid UTF-8 become \xNN; a backslash becomes \\ so the
// escaping stays unambiguous. Other UTF-8 (non-ASCII names) is kept. Output
// beyond max_bytes is cut and ends in "...".
std::string printable(std::string_view text, size_t max_bytes = 1024);

}  // namespace bottomless::log
