// Prometheus text exposition of the replicators' counters. Every metric
// family is written once (HELP, TYPE, then one sample per database), as the
// format requires a family's samples to be contiguous.
#include "replicator/metrics.h"

#include <cinttypes>
#include <cstdio>
#include <functional>

#include "replicator/replicator.h"

namespace bottomless::replicator {

std::string escape_label_value(std::string_view v) {
    std::string out;
    out.reserve(v.size());
    for (char c : v) {
        if (c == '\\') out += "\\\\";
        else if (c == '"') out += "\\\"";
        else if (c == '\n') out += "\\n";
        else out += c;
    }
    return out;
}

namespace {

std::string num(uint64_t v) { return std::to_string(v); }

std::string num(double v) {
    char buf[64];
    std::snprintf(buf, sizeof buf, "%.6f", v);
    return buf;
}

struct Writer {
    std::string out;

    void family(const char* name, const char* type, const char* help) {
        out += "# HELP ";
        out += name;
        out += ' ';
        out += help;
        out += "\n# TYPE ";
        out += name;
        out += ' ';
        out += type;
        out += '\n';
    }
    void sample(const char* name, const std::string& labels, const std::string& value) {
        out += name;
        if (!labels.empty()) out += "{" + labels + "}";
        out += ' ';
        out += value;
        out += '\n';
    }
};

std::string db_labels(const ReplicatorMetrics& m) {
    return "database=\"" + escape_label_value(m.database) + "\",database_id=\"" + escape_label_value(m.database_id) +
           "\"";
}

// A per-database metric: its family header and one sample per database.
using Getter = std::function<std::string(const ReplicatorMetrics&)>;

void per_db(Writer& w, const std::vector<ReplicatorMetrics>& dbs, const char* name, const char* type,
            const char* help, const Getter& get) {
    w.family(name, type, help);
    for (const auto& m : dbs) w.sample(name, db_labels(m), get(m));
}

}  // namespace

std::string format_metrics(const std::vector<ReplicatorMetrics>& dbs) {
    Writer w;
    w.family("bottomless_databases_open", "gauge", "Databases this process replicates (one replicator each).");
    w.sample("bottomless_databases_open", "", num(static_cast<uint64_t>(dbs.size())));

    w.family("bottomless_database_info", "gauge", "Always 1; the bucket and mode (async, sync, off) of a database.");
    for (const auto& m : dbs)
        w.sample("bottomless_database_info", db_labels(m) + ",bucket=\"" + escape_label_value(m.bucket) +
                                                 "\",mode=\"" + escape_label_value(m.mode) + "\"",
                 "1");
    w.family("bottomless_generation_info", "gauge",
             "Always 1; the generation the durable history is in (empty before the first snapshot).");
    for (const auto& m : dbs)
        w.sample("bottomless_generation_info", db_labels(m) + ",generation=\"" + escape_label_value(m.generation) + "\"",
                 "1");
    per_db(w, dbs, "bottomless_segment", "gauge", "Sequence number of the last durable segment in the generation.",
           [](const ReplicatorMetrics& m) { return num(m.segment); });
    per_db(w, dbs, "bottomless_pending_bytes", "gauge", "WAL page bytes committed locally and not yet durable in S3.",
           [](const ReplicatorMetrics& m) { return num(m.pending_bytes); });
    per_db(w, dbs, "bottomless_pending_transactions", "gauge", "Transactions committed locally and not yet durable in S3.",
           [](const ReplicatorMetrics& m) { return num(m.pending_transactions); });
    per_db(w, dbs, "bottomless_lag_seconds", "gauge",
           "Age of the oldest transaction not yet durable in S3; 0 when everything is durable.",
           [](const ReplicatorMetrics& m) { return num(m.lag_seconds); });
    per_db(w, dbs, "bottomless_last_durable_commit_timestamp_seconds", "gauge",
           "Unix time of the newest transaction durable in S3 (its local commit time); 0 when none yet.",
           [](const ReplicatorMetrics& m) { return num(static_cast<double>(m.last_durable_commit_us) / 1e6); });
    per_db(w, dbs, "bottomless_commits_observed_total", "counter", "Transactions committed locally since the open.",
           [](const ReplicatorMetrics& m) { return num(m.commits_observed); });
    per_db(w, dbs, "bottomless_commits_durable_total", "counter", "Transactions made durable in S3 since the open.",
           [](const ReplicatorMetrics& m) { return num(m.commits_durable); });
    per_db(w, dbs, "bottomless_segments_uploaded_total", "counter", "Segment objects uploaded.",
           [](const ReplicatorMetrics& m) { return num(m.segments_uploaded); });
    per_db(w, dbs, "bottomless_snapshots_uploaded_total", "counter", "Snapshot objects uploaded (new generations).",
           [](const ReplicatorMetrics& m) { return num(m.snapshots_uploaded); });
    per_db(w, dbs, "bottomless_uploaded_bytes_total", "counter",
           "Bytes of snapshot and segment objects uploaded (after compression and encryption).",
           [](const ReplicatorMetrics& m) { return num(m.bytes_uploaded); });
    per_db(w, dbs, "bottomless_wal_shipped_bytes_total", "counter", "WAL page bytes carried by the uploaded segments.",
           [](const ReplicatorMetrics& m) { return num(m.wal_bytes_shipped); });
    per_db(w, dbs, "bottomless_wal_bytes", "gauge", "Size the WAL reached since its last restart.",
           [](const ReplicatorMetrics& m) { return num(m.wal_bytes); });
    per_db(w, dbs, "bottomless_wal_budget_exceeded", "gauge",
           "1 while unshipped frames hold the WAL past max_wal_bytes.",
           [](const ReplicatorMetrics& m) { return num(static_cast<uint64_t>(m.wal_budget_exceeded)); });
    per_db(w, dbs, "bottomless_errors_total", "counter",
           "Replication errors recorded (each also sets last_error in bottomless_status()).",
           [](const ReplicatorMetrics& m) { return num(m.errors); });

    w.family("bottomless_s3_requests_total", "counter",
             "S3 operations started, by kind (put includes multipart create, parts and complete; retries count once "
             "more in bottomless_s3_attempts_total).");
    struct Kind {
        const char* name;
        uint64_t s3::ClientStats::*field;
    };
    static constexpr Kind kKinds[] = {{"put", &s3::ClientStats::puts},       {"get", &s3::ClientStats::gets},
                                      {"list", &s3::ClientStats::lists},     {"head", &s3::ClientStats::heads},
                                      {"delete", &s3::ClientStats::deletes}};
    for (const auto& m : dbs)
        for (const Kind& k : kKinds)
            w.sample("bottomless_s3_requests_total", db_labels(m) + ",kind=\"" + k.name + "\"", num(m.s3.*k.field));
    per_db(w, dbs, "bottomless_s3_attempts_total", "counter", "HTTP requests sent to S3, retries included.",
           [](const ReplicatorMetrics& m) { return num(m.s3.requests); });
    per_db(w, dbs, "bottomless_s3_retries_total", "counter", "HTTP requests that were retries of a failed attempt.",
           [](const ReplicatorMetrics& m) { return num(m.s3.retries); });
    per_db(w, dbs, "bottomless_s3_sent_bytes_total", "counter", "Request body bytes sent to S3.",
           [](const ReplicatorMetrics& m) { return num(m.s3.bytes_sent); });
    per_db(w, dbs, "bottomless_s3_received_bytes_total", "counter", "Response body bytes received from S3.",
           [](const ReplicatorMetrics& m) { return num(m.s3.bytes_received); });
    per_db(w, dbs, "bottomless_s3_conditional_conflicts_total", "counter",
           "Create-only uploads refused because the key held another object (another writer: a new generation follows).",
           [](const ReplicatorMetrics& m) { return num(m.s3.conditional_conflicts); });
    per_db(w, dbs, "bottomless_s3_conditional_writes_verified", "gauge",
           "1 when the server ignores If-None-Match and each segment upload is checked with HEADs.",
           [](const ReplicatorMetrics& m) { return num(static_cast<uint64_t>(m.s3.conditional_writes_verified)); });
    return w.out;
}

std::string metrics_text() {
    std::vector<ReplicatorMetrics> dbs;
    Replicator::for_each([&](const Replicator& r) { dbs.push_back(r.metrics()); });
    return format_metrics(dbs);
}

}  // namespace bottomless::replicator
