// Where the S3 client's settings come from: endpoint, region, credentials,
// TLS and retry knobs, resolved the way the AWS CLI resolves them.
//
// Credentials: the AWS chain of s3/credentials.h (environment, a profile's
// role_arn, web identity, the shared credentials file, credential_process,
// the config file, container credentials, EC2 instance metadata).
// resolve_credentials below is its static part alone (environment and files).
// The profile is AWS_PROFILE, else "default". Region: AWS_REGION,
// AWS_DEFAULT_REGION, the profile's `region`, else us-east-1. Endpoint:
// LIBSQL_BOTTOMLESS_ENDPOINT, AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL, the
// profile's `endpoint_url`, else AWS itself (virtual-hosted addressing).
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>

#include "s3/result.h"
#include "s3/sigv4.h"

namespace bottomless::s3 {

namespace http {
class ConnectionPool;
}

class CredentialsProvider;  // s3/credentials.h
class RequestBudget;        // s3/request_budget.h

// Environment lookup, injectable so tests do not touch the real environment.
using EnvLookup = std::function<std::optional<std::string>(std::string_view name)>;
EnvLookup process_env();

// A parsed INI file as the AWS CLI reads it: section → key → value. Keys are
// lowercased; nested settings ("s3 =" followed by indented lines) become "s3.key".
using IniFile = std::map<std::string, std::map<std::string, std::string>>;
IniFile parse_ini(std::string_view text);
// Reads and parses a file; nullopt if it does not exist or cannot be read.
std::optional<IniFile> read_ini_file(const std::string& path);

struct RetryPolicy {
    int max_attempts = 10;                                    // including the first try
    std::chrono::milliseconds max_elapsed{60'000};            // no new attempt starts after this
    std::chrono::milliseconds base_delay{50};                 // full jitter: sleep U(0, min(cap, base*2^n))
    std::chrono::milliseconds max_delay{5'000};
};

struct ClientConfig {
    std::string endpoint;        // "http://127.0.0.1:7480"; empty: AWS
    std::string region = "us-east-1";
    bool path_style = true;      // custom endpoints: path-style; AWS: virtual-hosted
    Credentials credentials;     // static keys; used when credentials_provider is null
    // Temporary credentials that refresh themselves (STS, container, IMDS,
    // credential_process); when set, the client signs with its current ones
    // and `credentials` is ignored. config_from_env sets it for those sources.
    std::shared_ptr<CredentialsProvider> credentials_provider;
    std::string ca_bundle;       // AWS_CA_BUNDLE
    bool verify_tls = true;
    RetryPolicy retry;
    std::chrono::milliseconds connect_timeout{5'000};
    std::chrono::seconds low_speed_time{30};   // abort when below low_speed_limit for this long
    long low_speed_limit = 1;                  // bytes per second
    uint64_t multipart_threshold = 16ull << 20; // objects above this go multipart
    uint64_t part_size = 8ull << 20;            // S3 minimum is 5 MiB (but the last part)
    int part_concurrency = 2;                   // parts in flight per upload
    double max_requests_per_second = 0;         // 0: unlimited (this client's own cap)
    // A budget shared with other clients (the replicator's process-wide
    // cap); null: none. A request waits for this client's own cap first,
    // then for its turn in the shared budget.
    std::shared_ptr<RequestBudget> request_budget;
    uint64_t max_get_bytes = 1ull << 30;        // cap of a whole-object GET into memory when the caller gives none
    // A request's deadline is the retry budget (retry.max_elapsed, from the
    // call's start) plus the transfer's declared size at this rate: large
    // objects get time, a trickling server does not get forever.
    uint64_t min_transfer_rate = 256 * 1024;    // bytes per second
    std::string profile = "default";
    // Create-only PUTs (PutOptions::if_none_match) on a server that ignores
    // `If-None-Match: *` would overwrite. Auto: one probe per client (a probe
    // object created twice next to the first such key) decides; Trust: no
    // probe, the server honours it; Verify: always HEAD before and after the
    // PUT (LIBSQL_BOTTOMLESS_S3_CONDITIONAL_WRITES=auto|trust|verify).
    enum class ConditionalWrites { Auto, Trust, Verify };
    ConditionalWrites conditional_writes = ConditionalWrites::Auto;
    // Curl handles (and their kept-alive connections) shared with other
    // clients to the same endpoint; null: the client's own. The replicator
    // shares one per endpoint across the databases of a process.
    std::shared_ptr<http::ConnectionPool> connection_pool;
};

// An S3 endpoint is an http:// or https:// URL naming a host (and a port):
// libcurl speaks many protocols, and file:// once let CreateBucket truncate a
// local file. No user-info, query, fragment, spaces or control characters.
Status validate_endpoint(std::string_view endpoint);
// S3's bucket naming rules: 3 to 63 characters; lowercase letters, digits,
// '.' and '-'; starts and ends with a letter or digit; no "..", not an IPv4
// address. The name becomes part of a URL path or host, so nothing else may
// slip in.
Status validate_bucket_name(std::string_view bucket);
// The host part of an endpoint URL ("http://[::1]:7480/x" -> "::1").
std::string endpoint_host(std::string_view endpoint);
// 127.0.0.0/8, ::1 and localhost: where plain http does not leave the machine.
bool is_loopback_host(std::string_view host);

// Resolves everything from the environment and AWS files. Errors name every place looked.
Result<ClientConfig> config_from_env(const EnvLookup& env = process_env());

// The static part of the chain alone: environment, then the shared
// credentials file, then the config file (no network, no process).
Result<Credentials> resolve_credentials(const EnvLookup& env, const std::string& profile);

}  // namespace bottomless::s3
