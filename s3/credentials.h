// Credentials where applications actually run: static keys, and temporary
// credentials from STS (AssumeRole, AssumeRoleWithWebIdentity), a container
// credentials endpoint (ECS, EKS Pod Identity), EC2 instance metadata
// (IMDSv2) and a profile's credential_process, refreshed before they expire.
//
// The chain (default_credentials_provider), in the AWS CLI's (botocore's)
// order; the first source that applies is used, chosen from the environment
// and the AWS files alone (no network, no process is run while choosing):
//   1. AWS_ACCESS_KEY_ID + AWS_SECRET_ACCESS_KEY (+ AWS_SESSION_TOKEN)
//   2. the profile's role_arn with source_profile or credential_source: STS AssumeRole
//   3. web identity: AWS_WEB_IDENTITY_TOKEN_FILE + AWS_ROLE_ARN (+ AWS_ROLE_SESSION_NAME),
//      or the profile's web_identity_token_file + role_arn: STS AssumeRoleWithWebIdentity
//   4. the shared credentials file's keys for the profile
//   5. the profile's credential_process
//   6. the config file's keys for the profile
//   7. container credentials: AWS_CONTAINER_CREDENTIALS_RELATIVE_URI or _FULL_URI
//   8. EC2 instance metadata (IMDSv2), unless AWS_EC2_METADATA_DISABLED=true
//
// Refresh: temporary credentials are replaced when less than a margin (5
// minutes) of their life remains. One thread fetches; the others keep
// signing with the current credentials meanwhile, so no request waits on a
// refresh while its credentials still work and none is signed with expired
// ones. A signer takes a shared_ptr to an immutable Credentials: a refresh
// swaps the pointer, never edits credentials a request is using.
//
// Secrets (secret keys, session tokens, web identity and container tokens)
// never reach a log line or an error message.
#pragma once

#include <atomic>
#include <chrono>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "s3/config.h"
#include "s3/result.h"
#include "s3/sigv4.h"

namespace bottomless::s3 {

using SystemClock = std::function<std::chrono::system_clock::time_point()>;

// Credentials and, for temporary ones, when they stop working.
struct ExpiringCredentials {
    Credentials credentials;
    std::optional<std::chrono::system_clock::time_point> expiration;  // nullopt: they do not expire
};

// What the S3 client signs with. Implementations are thread-safe.
class CredentialsProvider {
public:
    virtual ~CredentialsProvider() = default;
    // The credentials to sign with now; may block while they are fetched.
    virtual Result<std::shared_ptr<const Credentials>> current() = 0;
    // The server refused `used` (expired or unknown token): forget them if
    // they are still the current ones. True when the next current() fetches
    // new ones: false for static keys (retrying cannot help), and when a
    // refusal was already honoured within RefreshOptions::retry_after_failure.
    virtual bool invalidate(const Credentials& used) = 0;
    // "EC2 instance metadata (http://169.254.169.254)", for messages.
    virtual std::string describe() const = 0;
};

// Fixed keys (environment, AWS files, or given in code).
class StaticCredentialsProvider final : public CredentialsProvider {
public:
    explicit StaticCredentialsProvider(Credentials creds)
        : creds_(std::make_shared<const Credentials>(std::move(creds))) {}
    Result<std::shared_ptr<const Credentials>> current() override { return creds_; }
    bool invalidate(const Credentials&) override { return false; }
    std::string describe() const override { return creds_->source; }

private:
    std::shared_ptr<const Credentials> creds_;
};

// One fetch of credentials from somewhere; RefreshingProvider caches them.
class CredentialsSource {
public:
    virtual ~CredentialsSource() = default;
    virtual Result<ExpiringCredentials> fetch() = 0;
    virtual std::string describe() const = 0;
};

struct RefreshOptions {
    // Fetch new credentials when less than this remains of the current ones' life.
    std::chrono::seconds margin{300};
    // After a failed fetch, the next try waits this long (the current
    // credentials are used meanwhile while they work; without any, the
    // failure is returned at once instead of stalling every request).
    std::chrono::milliseconds retry_after_failure{5'000};
    SystemClock clock;  // empty: the system clock. Injected by tests to reach expiry quickly.
};

// Caches a source's credentials and fetches again before they expire.
class RefreshingProvider final : public CredentialsProvider {
public:
    explicit RefreshingProvider(std::unique_ptr<CredentialsSource> source, RefreshOptions options = {});
    Result<std::shared_ptr<const Credentials>> current() override;
    bool invalidate(const Credentials& used) override;
    std::string describe() const override { return source_->describe(); }
    uint64_t fetches() const { return fetches_.load(); }  // attempts, failed ones included

private:
    std::chrono::system_clock::time_point now() const;

    std::unique_ptr<CredentialsSource> source_;
    RefreshOptions options_;
    std::atomic<uint64_t> fetches_{0};
    // Serialises fetches. Held across the fetch's network I/O or process run;
    // only threads that have no usable credentials wait on it.
    std::mutex fetch_mu_;
    mutable std::mutex mu_;  // guards everything below; never held across I/O
    std::shared_ptr<const Credentials> current_;
    std::optional<std::chrono::system_clock::time_point> expiration_;
    bool stale_ = false;  // the server refused current_
    std::chrono::system_clock::time_point next_try_{};  // no fetch before this after a failure
    std::optional<Error> last_error_;                   // that failure
    std::optional<std::chrono::system_clock::time_point> last_invalidation_;
};

// ---- sources -------------------------------------------------------------

// Where STS is and how to reach it.
struct StsSettings {
    std::string endpoint;  // "https://sts.us-east-1.amazonaws.com", or a test server
    std::string region = "us-east-1";
    std::string ca_bundle;
    bool verify_tls = true;
    std::chrono::milliseconds connect_timeout{5'000};
    std::chrono::milliseconds request_timeout{20'000};
    int max_attempts = 3;  // transport errors, 5xx and throttling are retried
};

struct AssumeRoleParams {
    std::string role_arn;
    std::string session_name;  // empty: "bottomless-<unix time>"
    int duration_seconds = 3600;
    std::string external_id;
};

// STS AssumeRole, signed (SigV4, service "sts") with the source's credentials.
std::unique_ptr<CredentialsSource> make_assume_role_source(StsSettings sts, AssumeRoleParams params,
                                                           std::shared_ptr<CredentialsProvider> source);
// STS AssumeRoleWithWebIdentity: unsigned; the token file is read at every
// fetch (Kubernetes rotates it).
std::unique_ptr<CredentialsSource> make_web_identity_source(StsSettings sts, AssumeRoleParams params,
                                                            std::string token_file);

struct ContainerSettings {
    std::string url;                   // full URL (validated by validate_container_url)
    std::string authorization_token;   // sent as Authorization when set
    std::string authorization_token_file;  // read at every fetch; wins over the token
    std::chrono::milliseconds timeout{2'000};
    int max_attempts = 3;
};
std::unique_ptr<CredentialsSource> make_container_source(ContainerSettings settings);

struct ImdsSettings {
    std::string endpoint = "http://169.254.169.254";
    // Short: a machine that is not on EC2 must not wait (one attempt, 1 s).
    std::chrono::milliseconds connect_timeout{1'000};
    std::chrono::milliseconds request_timeout{1'000};
    int max_attempts = 1;
    int token_ttl_seconds = 21600;
};
std::unique_ptr<CredentialsSource> make_imds_source(ImdsSettings settings);

struct ProcessSettings {
    std::string command;  // split into arguments like a POSIX shell would, then run without a shell
    std::chrono::milliseconds timeout{60'000};
    std::string profile;  // for messages
};
std::unique_ptr<CredentialsSource> make_process_source(ProcessSettings settings);

// ---- the chain -----------------------------------------------------------

struct ChainSettings {
    std::string region = "us-east-1";  // STS's region
    std::string ca_bundle;
    bool verify_tls = true;
    RefreshOptions refresh;
};

// Chooses the first source that applies (order at the top of this file) and
// returns its provider; nothing is fetched yet. NoCredentials names every
// place looked when none applies (only possible with IMDS disabled).
Result<std::shared_ptr<CredentialsProvider>> default_credentials_provider(const EnvLookup& env,
                                                                          const std::string& profile,
                                                                          const ChainSettings& settings = {});

// ---- parsers (pure; for the sources and the tests) ------------------------

// "2024-05-01T12:00:00Z", with optional fractional seconds and a "+hh:mm" offset.
std::optional<std::chrono::system_clock::time_point> parse_iso8601(std::string_view text);
// <AssumeRoleResponse> / <AssumeRoleWithWebIdentityResponse>; an STS
// <ErrorResponse> becomes an Auth (Sender) or Server error with its Code.
Result<ExpiringCredentials> parse_sts_response(std::string_view body, std::string_view action);
// The container endpoint's and IMDS's JSON: AccessKeyId, SecretAccessKey,
// Token, Expiration (and, from IMDS, "Code": "Success").
Result<ExpiringCredentials> parse_container_json(std::string_view body, std::string_view source);
// credential_process output, Version 1: AccessKeyId, SecretAccessKey,
// SessionToken, Expiration (optional: without it the keys do not expire).
Result<ExpiringCredentials> parse_process_json(std::string_view body, std::string_view source);
// Splits a command line as a POSIX shell would (whitespace, '…', "…", \),
// without expanding anything. Error on an unclosed quote.
Result<std::vector<std::string>> split_command_line(std::string_view command);
// A container credentials URL the SDKs allow: https to any host, http only to
// a loopback address or the ECS/EKS link-local addresses (169.254.170.2,
// 169.254.170.23, fd00:ec2::23).
Status validate_container_url(std::string_view url);

}  // namespace bottomless::s3
