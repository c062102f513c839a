// Logging implementation: one mutex serialises lines so threads do not interleave.
#include "s3/log.h"

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <mutex>

namespace bottomless::log {
namespace {

Level level_from_env() noexcept {
    Level l = Level::Warn;
    if (const char* v = std::getenv("LIBSQL_BOTTOMLESS_LOG"); v && *v) {
        if (!parse_level(v, l)) {
            std::fprintf(stderr, "bottomless: LIBSQL_BOTTOMLESS_LOG=%s is not one of error|warn|info|debug|trace; using warn\n", v);
            l = Level::Warn;
        }
    }
    return l;
}

std::atomic<int>& level_slot() noexcept {
    static std::atomic<int> slot{static_cast<int>(level_from_env())};
    return slot;
}

struct SinkState {
    std::mutex mu;  // guards sink and serialises writes
    Sink sink;
};

SinkState& sink_state() {
    static SinkState* s = new SinkState();  // never destroyed: logging may happen during exit
    return *s;
}

const char* level_name(Level l) noexcept {
    switch (l) {
    case Level::Error: return "ERROR";
    case Level::Warn: return "WARN";
    case Level::Info: return "INFO";
    case Level::Debug: return "DEBUG";
    case Level::Trace: return "TRACE";
    }
    return "?";
}

}  // namespace

bool parse_level(std::string_view name, Level& out) noexcept {
    static constexpr std::pair<std::string_view, Level> kNames[] = {
        {"error", Level::Error}, {"warn", Level::Warn}, {"warning", Level::Warn},
        {"info", Level::Info},   {"debug", Level::Debug}, {"trace", Level::Trace},
    };
    for (const auto& [n, l] : kNames) {
        if (n.size() != name.size()) continue;
        bool eq = true;
        for (size_t i = 0; i < n.size(); ++i) {
            char c = name[i];
            if (c >= 'A' && c <= 'Z') c = static_cast<char>(c - 'A' + 'a');
            if (c != n[i]) { eq = false; break; }
        }
        if (eq) { out = l; return true; }
    }
    return false;
}

Level level() noexcept { return static_cast<Level>(level_slot().load(std::memory_order_relaxed)); }
void set_level(Level l) noexcept { level_slot().store(static_cast<int>(l), std::memory_order_relaxed); }

void set_sink(Sink sink) {
    auto& s = sink_state();
    std::lock_guard lock(s.mu);
    s.sink = std::move(sink);
}

void write(Level l, std::string_view message) {
    auto& s = sink_state();
    std::lock_guard lock(s.mu);
    if (s.sink) {
        s.sink(l, message);
        return;
    }
    auto now = std::chrono::system_clock::now();
    std::time_t t = std::chrono::system_clock::to_time_t(now);
    auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(now.time_since_epoch()).count() % 1000;
    std::tm tm{};
    gmtime_r(&t, &tm);
    char ts[32];
    std::strftime(ts, sizeof ts, "%Y-%m-%dT%H:%M:%S", &tm);
    std::fprintf(stderr, "%s.%03dZ bottomless %s %.*s\n", ts, static_cast<int>(ms), level_name(l),
                 static_cast<int>(message.size()), message.data());
}

std::string redact_url(std::string_view url) {
    std::string_view u = url;
    if (auto q = u.find_first_of("?#"); q != std::string_view::npos) u = u.substr(0, q);
    std::string out(u);
    // scheme://user:pass@host → scheme://host
    if (auto scheme = out.find("://"); scheme != std::string::npos) {
        auto host_start = scheme + 3;
        auto slash = out.find('/', host_start);
        auto at = out.find('@', host_start);
        if (at != std::string::npos && (slash == std::string::npos || at < slash))
            out.erase(host_start, at + 1 - host_start);
    }
    return out;
}

namespace {

// Length of the valid UTF-8 sequence at s[i] and its code point; 0 if invalid
// (overlong forms, surrogates and values past U+10FFFF are invalid too).
size_t utf8_sequence(std::string_view s, size_t i, uint32_t& cp) noexcept {
    const auto b = [&](size_t k) { return static_cast<unsigned char>(s[i + k]); };
    const unsigned char c = b(0);
    size_t n;
    uint32_t min;
    if (c < 0x80) { cp = c; return 1; }
    if ((c & 0xE0) == 0xC0) { n = 2; cp = c & 0x1Fu; min = 0x80; }
    else if ((c & 0xF0) == 0xE0) { n = 3; cp = c & 0x0Fu; min = 0x800; }
    else if ((c & 0xF8) == 0xF0) { n = 4; cp = c & 0x07u; min = 0x10000; }
    else return 0;
    if (i + n > s.size()) return 0;
    for (size_t k = 1; k < n; ++k) {
        if ((b(k) & 0xC0) != 0x80) return 0;
        cp = (cp << 6) | (b(k) & 0x3Fu);
    }
    if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return 0;
    return n;
}

// Code points a terminal acts on or that reorder the text around them.
bool needs_escape(uint32_t cp) noexcept {
    return cp < 0x20 || cp == 0x7F || (cp >= 0x80 && cp <= 0x9F) || cp == 0x061C || cp == 0x200E ||
           cp == 0x200F || (cp >= 0x2028 && cp <= 0x202E) || (cp >= 0x2066 && cp <= 0x2069);
}

}  // namespace

std::string printable(std::string_view text, size_t max_bytes) {
    static constexpr char kHex[] = "0123456789abcdef";
    std::string out;
    out.reserve(std::min(text.size(), max_bytes) + 8);
    for (size_t i = 0; i < text.size();) {
        if (out.size() >= max_bytes) {
            out += "...";
            break;
        }
        uint32_t cp = 0;
        size_t n = utf8_sequence(text, i, cp);
        if (n == 0) {  // not UTF-8: show the byte
            const auto c = static_cast<unsigned char>(text[i]);
            out += "\\x";
            out += kHex[c >> 4];
            out += kHex[c & 15];
            i += 1;
            continue;
        }
        if (cp == '\\') {
            out += "\\\\";
        } else if (cp == '\n') {
            out += "\\n";
        } else if (cp == '\r') {
            out += "\\r";
        } else if (cp == '\t') {
            out += "\\t";
        } else if (cp < 0x20 || cp == 0x7F) {
            out += "\\x";
            out += kHex[cp >> 4];
            out += kHex[cp & 15];
        } else if (needs_escape(cp)) {
            char buf[16];
            std::snprintf(buf, sizeof buf, "\\u{%04X}", static_cast<unsigned>(cp));
            out += buf;
        } else {
            out.append(text.substr(i, n));
        }
        i += n;
    }
    return out;
}

}  // namespace bottomless::log
