// AWS Signature Version 4, written as the named stages AWS documents:
//   canonical request → string to sign → signing key → signature → Authorization
// Every intermediate is returned so tests check each stage against the
// official vectors in shared/testdata/sigv4. The clock is injected.
//
// S3 rules (the defaults): the path is URI-encoded once, never normalised
// ("//a/./b" is a different key from "/a/b"), and x-amz-content-sha256 is
// always sent and signed. The other behaviours exist only so the generic
// vectors can be checked.
#pragma once

#include <chrono>
#include <map>
#include <mutex>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "s3/crypto.h"

namespace bottomless::s3 {

// Static credentials. The destructor wipes the secret and the token.
struct Credentials {
    std::string access_key_id;
    std::string secret_access_key;
    std::string session_token;  // empty when not using temporary credentials
    std::string source;         // where they came from, for messages ("environment", "~/.aws/credentials [default]")

    Credentials() = default;
    Credentials(std::string id, std::string secret, std::string token = {}, std::string src = {})
        : access_key_id(std::move(id)), secret_access_key(std::move(secret)),
          session_token(std::move(token)), source(std::move(src)) {}
    Credentials(const Credentials&) = default;
    Credentials& operator=(const Credentials&) = default;
    Credentials(Credentials&&) noexcept = default;
    Credentials& operator=(Credentials&&) noexcept = default;
    ~Credentials() {
        secure_wipe(secret_access_key);
        secure_wipe(session_token);
    }
};

using HeaderList = std::vector<std::pair<std::string, std::string>>;
using QueryList = std::vector<std::pair<std::string, std::string>>;

struct SigningRequest {
    std::string method;       // "GET", "PUT", ...
    std::string path;         // raw, not encoded: "/bucket/key with space"
    QueryList query;          // raw (decoded) names and values
    HeaderList headers;       // as they will be sent; must include Host
    std::string payload_hash; // lowercase hex SHA-256 of the body, or "UNSIGNED-PAYLOAD"
};

struct SignerOptions {
    bool normalize_path = false;          // S3: never
    bool double_encode_path = false;      // S3: never
    bool add_content_sha256_header = true;// S3: always (the server requires it)
    bool sign_session_token = true;       // false only for the "token added after signing" vector
};

struct SigningResult {
    std::string timestamp;          // 20150830T123600Z
    std::string scope;              // 20150830/us-east-1/s3/aws4_request
    std::string canonical_request;  // contains the session token when one is signed: never log it
    std::string string_to_sign;
    std::string signed_headers;     // host;x-amz-date
    std::string signature;          // hex; secret-derived: never log it
    // Header mode: headers to add to the request (x-amz-date, x-amz-content-sha256,
    // x-amz-security-token, Authorization).
    HeaderList headers_to_add;
    // Presign mode: the full encoded query string, signature included.
    std::string presigned_query;
};

// Headers that must not be signed: proxies and HTTP stacks may change them.
bool is_unsigned_header(std::string_view lowercase_name);

// RFC 3986 encoding as SigV4 wants it: everything but A-Z a-z 0-9 - . _ ~ is
// %XX (uppercase); '/' is kept when encode_slash is false.
std::string uri_encode(std::string_view s, bool encode_slash);
// Decodes %XX sequences ('+' is left alone: it is not a space in a path).
std::string uri_decode(std::string_view s);

std::string format_amz_date(std::chrono::system_clock::time_point t);  // 20150830T123600Z

class Signer {
public:
    Signer(std::string region, std::string service, SignerOptions options = {});
    ~Signer();
    Signer(const Signer&) = delete;
    Signer& operator=(const Signer&) = delete;

    // Stage 1 pieces.
    std::string canonical_uri(std::string_view raw_path) const;
    static std::string canonical_query(const QueryList& query);
    // Returns "name:value\n..." and sets signed_headers to "a;b;c".
    static std::string canonical_headers(const HeaderList& headers, std::string& signed_headers);
    static std::string canonical_request(std::string_view method, std::string_view canonical_uri,
                                         std::string_view canonical_query, std::string_view canonical_headers,
                                         std::string_view signed_headers, std::string_view payload_hash);
    // Stage 2.
    static std::string string_to_sign(std::string_view timestamp, std::string_view scope,
                                      std::string_view canonical_request);
    // Stage 3: kDate → kRegion → kService → kSigning, cached per (access key, date).
    Sha256Digest signing_key(const Credentials& creds, std::string_view date);

    // Authorization-header signing.
    SigningResult sign(const SigningRequest& req, const Credentials& creds,
                       std::chrono::system_clock::time_point now);
    // Query-string signing (presigned URL).
    SigningResult presign(const SigningRequest& req, const Credentials& creds,
                          std::chrono::system_clock::time_point now, std::chrono::seconds expires);

    const std::string& region() const { return region_; }
    const std::string& service() const { return service_; }

private:
    std::string region_;
    std::string service_;
    SignerOptions options_;

    std::mutex cache_mu_;  // guards cache_
    struct CachedKey {
        std::string date;
        std::string access_key_id;
        Sha256Digest secret_fingerprint{};  // SHA-256 of the secret: a rotated secret misses the cache
        Sha256Digest key{};
    };
    std::vector<CachedKey> cache_;  // a few entries at most (date rollover, key rotation)
};

}  // namespace bottomless::s3
