// Small helpers shared by the benchmarks (write_bench, mix_bench,
// snapshot_load_bench, outage_bench): connections as RAII handles, SQL
// one-liners that end the program on failure (a benchmark has nobody to hand
// an error to), option lists, clocks, medians and percentiles, the process's
// memory, and a content checksum of a database.
#pragma once

#include <sqlite3.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "s3/crypto.h"

namespace bench {

inline const char*& program_name() {
    static const char* name = "bench";
    return name;
}

[[noreturn]] inline void die(const std::string& m) {
    std::fprintf(stderr, "%s: %s\n", program_name(), m.c_str());
    std::exit(1);
}

struct DbClose {
    void operator()(sqlite3* db) const { sqlite3_close_v2(db); }
};
using Db = std::unique_ptr<sqlite3, DbClose>;

struct StmtFinalize {
    void operator()(sqlite3_stmt* st) const { sqlite3_finalize(st); }
};
using Stmt = std::unique_ptr<sqlite3_stmt, StmtFinalize>;

inline Db open_db(const std::string& uri, int flags = SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE) {
    sqlite3* raw = nullptr;
    int rc = sqlite3_open_v2(uri.c_str(), &raw, flags | SQLITE_OPEN_URI, nullptr);
    Db db(raw);
    if (rc != SQLITE_OK) die("open " + uri + ": " + (raw ? sqlite3_errmsg(raw) : "out of memory"));
    sqlite3_busy_timeout(raw, 60'000);
    return db;
}

inline Stmt prepare(sqlite3* db, const std::string& sql) {
    sqlite3_stmt* st = nullptr;
    if (sqlite3_prepare_v2(db, sql.c_str(), -1, &st, nullptr) != SQLITE_OK)
        die("prepare " + sql + ": " + sqlite3_errmsg(db));
    return Stmt(st);
}

inline void exec(sqlite3* db, const std::string& sql) {
    char* err = nullptr;
    if (sqlite3_exec(db, sql.c_str(), nullptr, nullptr, &err) != SQLITE_OK) {
        std::string m = err ? err : sqlite3_errmsg(db);
        sqlite3_free(err);
        die("SQL " + sql.substr(0, 80) + ": " + m);
    }
}

// The first column of the first row as text; `error` (when given) receives
// the failure instead of ending the program.
inline std::string query(sqlite3* db, const std::string& sql, std::string* error = nullptr) {
    Stmt st = prepare(db, sql);
    int rc = sqlite3_step(st.get());
    if (rc != SQLITE_ROW && rc != SQLITE_DONE) {
        std::string m = sqlite3_errmsg(db);
        if (!error) die("SQL " + sql + ": " + m);
        *error = m;
        return {};
    }
    if (rc == SQLITE_ROW && sqlite3_column_text(st.get(), 0))
        return reinterpret_cast<const char*>(sqlite3_column_text(st.get(), 0));
    return {};
}

inline nlohmann::json status(sqlite3* db) { return nlohmann::json::parse(query(db, "SELECT bottomless_status()")); }

inline int64_t wall_us() {
    return std::chrono::duration_cast<std::chrono::microseconds>(
               std::chrono::system_clock::now().time_since_epoch())
        .count();
}

// Monotonic nanoseconds: commit instants and durations.
inline int64_t mono_ns() {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
        .count();
}

inline double percentile(std::vector<double> v, double p) {
    if (v.empty()) return 0;
    std::sort(v.begin(), v.end());
    return v[std::min(v.size() - 1, static_cast<size_t>(p * static_cast<double>(v.size())))];
}

inline double median(std::vector<double> v) { return percentile(std::move(v), 0.5); }

// The median of the measured values, the two middle ones averaged when there
// is an even number of them (a table of a few alternating rounds should not
// side with the faster or the slower half); a negative value marks a round
// that measured nothing and is left out; -1 when no round measured anything.
inline double median_measured(std::vector<double> v) {
    v.erase(std::remove_if(v.begin(), v.end(), [](double x) { return x < 0; }), v.end());
    if (v.empty()) return -1;
    std::sort(v.begin(), v.end());
    size_t n = v.size();
    return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

// The items of a comma-separated option value ("plain,async"), empty ones dropped.
inline std::vector<std::string> split_list(const std::string& s) {
    std::vector<std::string> out;
    std::stringstream in(s);
    for (std::string item; std::getline(in, item, ',');)
        if (!item.empty()) out.push_back(item);
    return out;
}

// A field of /proc/self/status in KiB (VmRSS: now, VmHWM: the peak so far).
inline long proc_status_kib(const std::string& field) {
    std::ifstream in("/proc/self/status");
    std::string line;
    while (std::getline(in, line))
        if (line.compare(0, field.size() + 1, field + ":") == 0) return std::atol(line.c_str() + field.size() + 1);
    return -1;
}

// Host and port of an http:// endpoint URL ("http://127.0.0.1:7480").
inline bool split_endpoint(const std::string& url, std::string& host, int& port) {
    std::string rest = url;
    if (auto p = rest.find("://"); p != std::string::npos) rest = rest.substr(p + 3);
    if (auto p = rest.find('/'); p != std::string::npos) rest = rest.substr(0, p);
    auto colon = rest.rfind(':');
    if (colon == std::string::npos) return false;
    host = rest.substr(0, colon);
    port = std::atoi(rest.c_str() + colon + 1);
    return port > 0;
}

// A SHA-256 over the content of every table (schema text, then every row in
// rowid order, each value with its type), so two databases compare equal
// exactly when they hold the same rows, whatever their page layout.
// Returns "<hex> <rows>".
inline std::string content_checksum(sqlite3* db) {
    std::string chain(64, '0');  // running hash, folded in every ~1 MiB
    std::string buf;
    uint64_t rows = 0;
    auto fold = [&] {
        chain = bottomless::s3::sha256_hex(chain + buf);
        buf.clear();
    };
    std::vector<std::string> tables;
    {
        Stmt st = prepare(db, "SELECT name, sql FROM sqlite_schema WHERE type = 'table' AND name NOT LIKE 'sqlite_%' "
                              "ORDER BY name");
        while (sqlite3_step(st.get()) == SQLITE_ROW) {
            tables.emplace_back(reinterpret_cast<const char*>(sqlite3_column_text(st.get(), 0)));
            buf += reinterpret_cast<const char*>(sqlite3_column_text(st.get(), 1));
            buf += '\n';
        }
    }
    for (const std::string& t : tables) {
        Stmt st = prepare(db, "SELECT * FROM \"" + t + "\" ORDER BY rowid");
        const int n = sqlite3_column_count(st.get());
        int rc;
        while ((rc = sqlite3_step(st.get())) == SQLITE_ROW) {
            ++rows;
            for (int c = 0; c < n; ++c) {
                int type = sqlite3_column_type(st.get(), c);
                buf += static_cast<char>('0' + type);
                const void* p = sqlite3_column_blob(st.get(), c);
                int len = sqlite3_column_bytes(st.get(), c);
                buf += std::to_string(len) + ':';
                if (p) buf.append(static_cast<const char*>(p), static_cast<size_t>(len));
            }
            if (buf.size() > (1u << 20)) fold();
        }
        if (rc != SQLITE_DONE) die("reading table " + t + ": " + sqlite3_errmsg(db));
    }
    fold();
    return chain + " " + std::to_string(rows);
}

}  // namespace bench
