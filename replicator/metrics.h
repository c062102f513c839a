// bottomless_metrics(): the process's replication state in the Prometheus
// text exposition format (version 0.0.4), so an application can serve it on
// its /metrics. One sample per database for each metric, labelled with the
// database's canonical path and its database_id; metric names, types and
// units are listed in docs/OPERATIONS.md#metrics.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "s3/client.h"

namespace bottomless::replicator {

// A copy of one replicator's counters (Replicator::metrics()).
struct ReplicatorMetrics {
    std::string database;     // canonical path
    std::string database_id;
    std::string bucket;
    std::string mode;         // async, sync, off
    std::string generation;   // empty before the first snapshot is durable
    uint64_t segment = 0;     // last durable segment's seq in the generation
    uint64_t commits_observed = 0;
    uint64_t commits_durable = 0;
    uint64_t pending_transactions = 0;
    uint64_t pending_bytes = 0;
    double lag_seconds = 0;   // age of the oldest commit not yet durable; 0 when none
    int64_t last_durable_commit_us = 0;  // unix microseconds; 0: none yet
    uint64_t segments_uploaded = 0;
    uint64_t snapshots_uploaded = 0;
    uint64_t bytes_uploaded = 0;     // object bytes (snapshots and segments, compressed)
    uint64_t wal_bytes_shipped = 0;  // WAL page bytes the segments carried
    uint64_t wal_bytes = 0;
    bool wal_budget_exceeded = false;
    uint64_t errors = 0;
    s3::ClientStats s3;
};

// Label values escaped as the exposition format asks: \ " and newline.
std::string escape_label_value(std::string_view v);
// The exposition text for these databases (pure: tested without a server).
std::string format_metrics(const std::vector<ReplicatorMetrics>& dbs);
// The exposition text for every running replicator of the process.
std::string metrics_text();

}  // namespace bottomless::replicator
