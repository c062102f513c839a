// See config.h. Every setting has one name in the environment
// (LIBSQL_BOTTOMLESS_X) and one as a URI parameter (x, lower case).
#include "replicator/config.h"

#include <algorithm>
#include <cstdlib>
#include <functional>
#include <vector>

#include "replicator/util.h"
#include "s3/log.h"

namespace bottomless::replicator {
namespace {

std::string lower(std::string s) {
    for (char& c : s)
        if (c >= 'A' && c <= 'Z') c = static_cast<char>(c - 'A' + 'a');
    return s;
}

bool parse_bool(const std::string& v, bool& out) {
    std::string l = lower(v);
    if (l == "1" || l == "true" || l == "yes" || l == "on") { out = true; return true; }
    if (l == "0" || l == "false" || l == "no" || l == "off") { out = false; return true; }
    return false;
}

bool parse_u64(const std::string& v, uint64_t& out) {
    if (v.empty() || v.size() > 19) return false;
    uint64_t r = 0;
    for (char c : v) {
        if (c < '0' || c > '9') return false;
        r = r * 10 + static_cast<uint64_t>(c - '0');
    }
    out = r;
    return true;
}

struct Setting {
    const char* name;  // URI name; env name is LIBSQL_BOTTOMLESS_ + upper(name)
    const char* what;  // for error messages: what a valid value looks like
    std::function<bool(ReplicatorConfig&, const std::string&)> apply;
    bool secret = false;  // the value never appears in an error message
};

// Accepts a key or passphrase (the last one applied wins; two at one level
// are refused by load_config).
bool apply_secret(ReplicatorConfig& c, Result<EncryptionSecret> s) {
    if (!s) return false;
    c.encryption = std::move(s).value();
    return true;
}

const std::vector<Setting>& settings() {
    static const std::vector<Setting> kSettings = {
        {"endpoint", "an http:// or https:// URL naming a host, such as https://s3.example.com or http://127.0.0.1:7480",
         [](ReplicatorConfig& c, const std::string& v) {
             std::string ep = v;
             while (!ep.empty() && ep.back() == '/') ep.pop_back();
             if (ep.find("://") == std::string::npos) ep = "https://" + ep;
             if (!s3::validate_endpoint(ep).ok()) return false;  // file:// and friends never reach libcurl
             // The environment's endpoint is already in c.s3, with the
             // addressing LIBSQL_BOTTOMLESS_S3_PATH_STYLE chose; only a
             // different one (a URI parameter) switches to path-style.
             if (ep != c.s3.endpoint) c.s3.path_style = true;
             c.s3.endpoint = ep;
             return !v.empty();
         }},
        {"bucket",
         "an S3 bucket name: 3 to 63 lowercase letters, digits, '.' and '-', starting and ending with a letter or "
         "digit, no '..', not an IP address",
         [](ReplicatorConfig& c, const std::string& v) {
             c.bucket = v;
             return s3::validate_bucket_name(v).ok();
         }},
        {"database_id", "letters, digits, '.', '_' or '-'",
         [](ReplicatorConfig& c, const std::string& v) { c.db_id = v; return validate_db_id(v).ok(); }},
        {"initial_replication", "error, force or skip", [](ReplicatorConfig& c, const std::string& v) {
             std::string l = lower(v);
             if (l == "error") c.initial_replication = InitialReplication::Error;
             else if (l == "force") c.initial_replication = InitialReplication::Force;
             else if (l == "skip") c.initial_replication = InitialReplication::Skip;
             else return false;
             return true;
         }},
        {"sync", "0 or 1", [](ReplicatorConfig& c, const std::string& v) { return parse_bool(v, c.sync); }},
        {"batch_interval_ms", "milliseconds (>= 1)", [](ReplicatorConfig& c, const std::string& v) {
             uint64_t n;
             if (!parse_u64(v, n) || n == 0) return false;
             c.batch_interval = std::chrono::milliseconds(n);
             return true;
         }},
        {"batch_max_bytes", "bytes (>= 4096)", [](ReplicatorConfig& c, const std::string& v) {
             return parse_u64(v, c.batch_max_bytes) && c.batch_max_bytes >= 4096;
         }},
        {"compression", "zstd or none",
         [](ReplicatorConfig& c, const std::string& v) { return parse_compression(lower(v), c.compression); }},
        {"max_pending_bytes", "bytes (>= 1 MiB)", [](ReplicatorConfig& c, const std::string& v) {
             return parse_u64(v, c.max_pending_bytes) && c.max_pending_bytes >= (1u << 20);
         }},
        {"max_wal_bytes", "bytes (0: no budget)",
         [](ReplicatorConfig& c, const std::string& v) { return parse_u64(v, c.max_wal_bytes); }},
        {"wal_budget_policy", "warn or fail", [](ReplicatorConfig& c, const std::string& v) {
             std::string l = lower(v);
             if (l != "warn" && l != "fail") return false;
             c.wal_budget_fail = l == "fail";
             return true;
         }},
        {"sync_timeout_ms", "milliseconds (>= 1)", [](ReplicatorConfig& c, const std::string& v) {
             uint64_t n;
             if (!parse_u64(v, n) || n == 0) return false;
             c.sync_timeout = std::chrono::milliseconds(n);
             return true;
         }},
        {"shutdown_timeout_ms", "milliseconds", [](ReplicatorConfig& c, const std::string& v) {
             uint64_t n;
             if (!parse_u64(v, n)) return false;
             c.shutdown_timeout = std::chrono::milliseconds(n);
             return true;
         }},
        {"snapshot_after_bytes", "bytes (0: never)",
         [](ReplicatorConfig& c, const std::string& v) { return parse_u64(v, c.snapshot_after_bytes); }},
        {"snapshot_interval_s", "seconds (0: never)", [](ReplicatorConfig& c, const std::string& v) {
             uint64_t n;
             if (!parse_u64(v, n)) return false;
             c.snapshot_interval = std::chrono::seconds(n);
             return true;
         }},
        {"auto_restore", "0 or 1", [](ReplicatorConfig& c, const std::string& v) { return parse_bool(v, c.auto_restore); }},
        {"max_requests_per_second", "a number (0: unlimited)", [](ReplicatorConfig& c, const std::string& v) {
             char* end = nullptr;
             double d = std::strtod(v.c_str(), &end);
             if (v.empty() || *end != '\0' || !(d >= 0) || d > 1e9) return false;
             c.s3.max_requests_per_second = d;
             return true;
         }},
        {"uploader_threads", "a number of threads, 1 to 256 (0: the number of cores, at least 2)",
         [](ReplicatorConfig& c, const std::string& v) {
             uint64_t n;
             if (!parse_u64(v, n) || n > 256) return false;
             c.uploader_threads = static_cast<unsigned>(n);
             return true;
         }},
        {"replica", "0 or 1", [](ReplicatorConfig& c, const std::string& v) { return parse_bool(v, c.replica); }},
        {"replica_poll_ms", "milliseconds (>= 10)", [](ReplicatorConfig& c, const std::string& v) {
             uint64_t n;
             if (!parse_u64(v, n) || n < 10) return false;
             c.replica_poll = std::chrono::milliseconds(n);
             return true;
         }},
        {"at", "an RFC 3339 time such as 2026-11-21T10:42:17Z (with replica=1)",
         [](ReplicatorConfig& c, const std::string& v) {
             c.replica_at_us = parse_time_us(v);
             return c.replica_at_us.has_value();
         }},
        {"encryption_key", "a 32-byte key: 64 hex digits or base64 (e.g. from 'openssl rand -hex 32')",
         [](ReplicatorConfig& c, const std::string& v) { return apply_secret(c, EncryptionSecret::key(v, "")); },
         true},
        {"encryption_passphrase", "a non-empty passphrase",
         [](ReplicatorConfig& c, const std::string& v) { return apply_secret(c, EncryptionSecret::passphrase(v, "")); },
         true},
        {"log", "error, warn, info, debug or trace", [](ReplicatorConfig&, const std::string& v) {
             log::Level l;
             if (!log::parse_level(v, l)) return false;
             log::set_level(l);
             return true;
         }},
    };
    return kSettings;
}

std::string env_name(const char* uri_name) {
    std::string n = "LIBSQL_BOTTOMLESS_";
    for (const char* p = uri_name; *p; ++p) n += static_cast<char>(*p >= 'a' && *p <= 'z' ? *p - 'a' + 'A' : *p);
    return n;
}

}  // namespace

const char* to_string(InitialReplication v) {
    switch (v) {
    case InitialReplication::Error: return "error";
    case InitialReplication::Force: return "force";
    case InitialReplication::Skip: return "skip";
    }
    return "?";
}

bool is_sqlite_uri_parameter(const std::string& name) {
    static const char* kNames[] = {"vfs", "mode", "cache", "psow", "nolock", "immutable", "modeof"};
    return std::any_of(std::begin(kNames), std::end(kNames), [&](const char* n) { return name == n; });
}

Status validate_db_id(const std::string& id) {
    if (id.empty() || id.size() > 200)
        return make_error(ErrorKind::InvalidArgument, "database id must be 1 to 200 characters", "BadDatabaseId");
    for (char c : id) {
        bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' || c == '_' ||
                  c == '-';
        if (!ok)
            return make_error(ErrorKind::InvalidArgument,
                              "database id '" + id + "' may only hold letters, digits, '.', '_' and '-'",
                              "BadDatabaseId");
    }
    if (id == "." || id == "..")
        return make_error(ErrorKind::InvalidArgument, "database id cannot be '.' or '..'", "BadDatabaseId");
    return {};
}

Result<ReplicatorConfig> load_config(const std::string& db_path, const std::map<std::string, std::string>& uri_params,
                                     const s3::EnvLookup& env) {
    ReplicatorConfig cfg;
    auto s3cfg = s3::config_from_env(env);
    if (!s3cfg) return std::move(s3cfg).error();
    cfg.s3 = std::move(s3cfg).value();

    auto invalid = [](const std::string& name, const std::string& value, const Setting& s) {
        return make_error(ErrorKind::InvalidArgument,
                          name + (s.secret ? "" : "=" + log::printable(value, 200)) + " is not valid: expected " + s.what, "BadSetting");
    };
    int env_secrets = 0;
    for (const auto& s : settings()) {
        std::string name = env_name(s.name);
        auto v = env(name);
        if (!v || v->empty()) continue;
        env_secrets += s.secret;
        if (!s.apply(cfg, *v)) return invalid(name, *v, s);
    }
    // The environment is the process's: its request cap is the process's
    // total (a URI value below is this database's own cap only).
    cfg.process_max_requests_per_second = cfg.s3.max_requests_per_second;
    int uri_secrets = 0;
    for (const auto& [k, v] : uri_params) uri_secrets += k == "encryption_key" || k == "encryption_passphrase";
    if (env_secrets > 1 || uri_secrets > 1)
        return make_error(ErrorKind::InvalidArgument,
                          std::string(uri_secrets > 1 ? "URI parameters encryption_key and encryption_passphrase"
                                                      : "LIBSQL_BOTTOMLESS_ENCRYPTION_KEY and "
                                                        "LIBSQL_BOTTOMLESS_ENCRYPTION_PASSPHRASE") +
                              " are both set: give one (a URI setting replaces the environment's)",
                          "BadSetting");
    for (const auto& [k, v] : uri_params) {
        if (is_sqlite_uri_parameter(k)) continue;
        auto it = std::find_if(settings().begin(), settings().end(), [&key = k](const Setting& s) { return key == s.name; });
        if (it == settings().end()) {
            std::string known;
            for (const auto& s : settings()) known += std::string(known.empty() ? "" : ", ") + s.name;
            return make_error(ErrorKind::InvalidArgument,
                              "unknown URI parameter '" + k + "' (bottomless knows: " + known + ")", "BadSetting");
        }
        if (!it->apply(cfg, v)) return invalid("URI parameter " + k, v, *it);
    }
    if (cfg.replica_at_us && !cfg.replica)
        return make_error(ErrorKind::InvalidArgument,
                          "at= opens a past state read-only and needs replica=1 (file:app.db?vfs=bottomless&replica=1&at=...)",
                          "BadSetting");
    if (cfg.db_id.empty()) {
        std::string base = db_path.substr(db_path.find_last_of('/') + 1);
        cfg.db_id = base;
        if (auto st = validate_db_id(base); !st)
            return make_error(ErrorKind::InvalidArgument,
                              "the database file name '" + base +
                                  "' cannot serve as database id; set LIBSQL_BOTTOMLESS_DATABASE_ID or database_id=",
                              "BadDatabaseId");
    }
    return cfg;
}

}  // namespace bottomless::replicator
