// bottomless_metrics(): the Prometheus text exposition is parsed line by line
// (every line a HELP/TYPE comment or `name{labels} value`, every family typed
// before its samples, values numbers) and its numbers follow writes and flushes.
#include <catch2/catch.hpp>

#include <cstdlib>
#include <map>
#include <optional>
#include <set>
#include <sstream>
#include <string>

#include "replicator/metrics.h"
#include "support/s3_env.h"
#include "support/sqlite_util.h"

using namespace bottomless;
using namespace bottomless::testing;

namespace {

struct Sample {
    std::string name;
    std::map<std::string, std::string> labels;
    double value = 0;
};

bool valid_name(const std::string& n) {
    if (n.empty() || !(std::isalpha(static_cast<unsigned char>(n[0])) || n[0] == '_' || n[0] == ':')) return false;
    for (char c : n)
        if (!(std::isalnum(static_cast<unsigned char>(c)) || c == '_' || c == ':')) return false;
    return true;
}

// Parses the exposition text; FAILs on the first line that breaks the format.
std::vector<Sample> parse_exposition(const std::string& text) {
    std::vector<Sample> out;
    std::map<std::string, std::string> types;
    std::set<std::string> finished;  // families whose samples ended: they must not come back
    std::string current;
    REQUIRE(!text.empty());
    REQUIRE(text.back() == '\n');
    std::istringstream in(text);
    std::string line;
    while (std::getline(in, line)) {
        INFO("line: " << line);
        REQUIRE(!line.empty());
        if (line.rfind("# ", 0) == 0) {
            std::istringstream ls(line.substr(2));
            std::string kw, name, rest;
            ls >> kw >> name;
            REQUIRE((kw == "HELP" || kw == "TYPE"));
            REQUIRE(valid_name(name));
            if (kw == "TYPE") {
                ls >> rest;
                REQUIRE((rest == "counter" || rest == "gauge"));
                REQUIRE(types.count(name) == 0);
                types[name] = rest;
                if (name.size() > 6 && name.compare(name.size() - 6, 6, "_total") == 0) CHECK(rest == "counter");
                if (rest == "counter") CHECK(name.compare(name.size() - 6, 6, "_total") == 0);
            }
            continue;
        }
        Sample s;
        size_t i = 0;
        while (i < line.size() && line[i] != '{' && line[i] != ' ') ++i;
        s.name = line.substr(0, i);
        REQUIRE(valid_name(s.name));
        REQUIRE(types.count(s.name) == 1);  // TYPE comes before the samples
        if (s.name != current) {
            REQUIRE(finished.count(s.name) == 0);  // a family's samples are contiguous
            if (!current.empty()) finished.insert(current);
            current = s.name;
        }
        if (i < line.size() && line[i] == '{') {
            ++i;
            while (line.at(i) != '}') {
                size_t eq = line.find('=', i);
                REQUIRE(eq != std::string::npos);
                std::string key = line.substr(i, eq - i);
                REQUIRE(valid_name(key));
                REQUIRE(line.at(eq + 1) == '"');
                std::string val;
                size_t j = eq + 2;
                for (;; ++j) {
                    char c = line.at(j);
                    if (c == '"') break;
                    if (c == '\\') {
                        char e = line.at(++j);
                        REQUIRE((e == '\\' || e == '"' || e == 'n'));
                        val += e == 'n' ? '\n' : e;
                    } else {
                        val += c;
                    }
                }
                REQUIRE(s.labels.emplace(key, val).second);
                i = j + 1;
                if (line.at(i) == ',') ++i;
            }
            ++i;
        }
        REQUIRE(line.at(i) == ' ');
        std::string v = line.substr(i + 1);
        char* end = nullptr;
        s.value = std::strtod(v.c_str(), &end);
        REQUIRE(!v.empty());
        REQUIRE(*end == '\0');
        out.push_back(std::move(s));
    }
    return out;
}

// The value of `name` for database `db` (and label kind when given).
std::optional<double> value(const std::vector<Sample>& samples, const std::string& name, const std::string& db,
                            const std::string& kind = {}) {
    for (const auto& s : samples) {
        if (s.name != name) continue;
        auto d = s.labels.find("database");
        if (!db.empty() && (d == s.labels.end() || d->second != db)) continue;
        if (!kind.empty() && s.labels.at("kind") != kind) continue;
        return s.value;
    }
    return std::nullopt;
}

std::string metrics(sqlite3* db) { return query_text(db, "SELECT bottomless_metrics()"); }

}  // namespace

TEST_CASE("metrics text escapes label values and types every family", "[metrics]") {
    replicator::ReplicatorMetrics m;
    m.database = "/data/a\"b\\c\nd.db";
    m.database_id = "a.db";
    m.generation = "g1";
    m.lag_seconds = 1.5;
    m.s3.puts = 7;
    auto samples = parse_exposition(replicator::format_metrics({m}));
    CHECK(value(samples, "bottomless_databases_open", "") == 1);
    CHECK(value(samples, "bottomless_lag_seconds", m.database) == 1.5);
    CHECK(value(samples, "bottomless_s3_requests_total", m.database, "put") == 7);
    CHECK(replicator::escape_label_value("a\"b\\c\nd") == "a\\\"b\\\\c\\nd");
    auto empty = parse_exposition(replicator::format_metrics({}));
    CHECK(value(empty, "bottomless_databases_open", "") == 0);
}

TEST_CASE("bottomless_metrics follows writes and flushes on any connection", "[vfs][integration][metrics]") {
    register_bottomless();
    auto client = server_client();
    TestBucket bucket(*client, "metrics");
    TempDir dir;
    // A file name with characters the exposition format must escape.
    const std::string path = dir.file("we\"ird\\name.db");
    Db db = open_db("file:" + path + "?vfs=bottomless&database_id=weird.db&batch_interval_ms=600000&bucket=" +
                    bucket.name());
    // Any connection serves the process's metrics, also one of a plain database.
    Db plain = open_db(":memory:");

    exec(db.get(), "PRAGMA journal_mode=wal; CREATE TABLE t(v); INSERT INTO t VALUES(1);");
    query_text(db.get(), "SELECT bottomless_flush(30000)");
    auto before = parse_exposition(metrics(plain.get()));
    REQUIRE(value(before, "bottomless_databases_open", "").value_or(0) >= 1);
    REQUIRE(value(before, "bottomless_pending_bytes", path).has_value());  // the escaped path comes back intact
    CHECK(*value(before, "bottomless_pending_transactions", path) == 0);
    CHECK(*value(before, "bottomless_snapshots_uploaded_total", path) == 1);
    CHECK(*value(before, "bottomless_last_durable_commit_timestamp_seconds", path) > 1.6e9);
    CHECK(*value(before, "bottomless_s3_requests_total", path, "put") >= 1);
    double segments0 = *value(before, "bottomless_segments_uploaded_total", path);
    double bytes0 = *value(before, "bottomless_uploaded_bytes_total", path);
    double commits0 = *value(before, "bottomless_commits_observed_total", path);
    std::string generation;
    for (const auto& s : before)
        if (s.name == "bottomless_generation_info" && s.labels.at("database") == path) generation = s.labels.at("generation");
    CHECK(generation.size() == 25);
    CHECK(query_text(db.get(), "SELECT bottomless_status()").find(generation) != std::string::npos);

    // Three transactions wait for the (10 minute) batch interval.
    for (int i = 0; i < 3; ++i) exec(db.get(), "INSERT INTO t VALUES(randomblob(5000));");
    auto pending = parse_exposition(metrics(db.get()));
    CHECK(*value(pending, "bottomless_pending_transactions", path) == 3);
    CHECK(*value(pending, "bottomless_pending_bytes", path) >= 15000);
    CHECK(*value(pending, "bottomless_commits_observed_total", path) == commits0 + 3);
    CHECK(*value(pending, "bottomless_lag_seconds", path) >= 0);
    CHECK(*value(pending, "bottomless_segments_uploaded_total", path) == segments0);

    query_text(db.get(), "SELECT bottomless_flush(30000)");
    auto after = parse_exposition(metrics(plain.get()));
    CHECK(*value(after, "bottomless_pending_transactions", path) == 0);
    CHECK(*value(after, "bottomless_pending_bytes", path) == 0);
    CHECK(*value(after, "bottomless_lag_seconds", path) == 0);
    CHECK(*value(after, "bottomless_segments_uploaded_total", path) == segments0 + 1);
    CHECK(*value(after, "bottomless_uploaded_bytes_total", path) > bytes0);
    CHECK(*value(after, "bottomless_commits_durable_total", path) == *value(after, "bottomless_commits_observed_total", path));
    CHECK(*value(after, "bottomless_errors_total", path) == 0);
    CHECK(*value(after, "bottomless_s3_attempts_total", path) >= *value(after, "bottomless_s3_requests_total", path, "put"));

    SECTION("a closed database leaves the metrics") {
        db.reset();
        auto closed = parse_exposition(metrics(plain.get()));
        CHECK_FALSE(value(closed, "bottomless_pending_bytes", path).has_value());
    }
}
