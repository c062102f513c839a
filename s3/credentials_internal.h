// Private to the credential sources' files (s3/credentials*.cpp): the
// helpers more than one source uses. Not an interface; see credentials.h.
//
//   credentials.cpp          these helpers, parse_iso8601, RefreshingProvider
//   credentials_sts.cpp      STS AssumeRole and AssumeRoleWithWebIdentity
//   credentials_metadata.cpp container credentials (ECS, EKS Pod Identity) and EC2 instance metadata
//   credentials_process.cpp  a profile's credential_process
//   credentials_chain.cpp    the chain: environment, AWS profile files, and which source applies
#pragma once

#include <chrono>
#include <optional>
#include <string>
#include <string_view>

#include "s3/credentials.h"
#include "s3/http.h"

namespace bottomless::s3::credentials_detail {

using SysTime = std::chrono::system_clock::time_point;

std::string trim(std::string_view s);
std::string lower(std::string s);
// Text from outside (a server, a file, the environment), escaped and capped for messages.
std::string safe(std::string_view s);

// Reads a small file (a token); nullopt when it cannot be read.
std::optional<std::string> read_small_file(const std::string& path);

// Jittered exponential pause between attempts of a credentials request.
void backoff(int attempt);

// One HTTP exchange for a credentials source (small bodies, short deadlines).
http::Response exchange(http::ConnectionPool& pool, const std::string& method, const std::string& url,
                        HeaderList headers, std::string_view body, std::chrono::milliseconds connect,
                        std::chrono::milliseconds total, const std::string& ca_bundle = {}, bool verify_tls = true);

// Whether a failed exchange may pass when tried again.
bool transient(const http::Response& r);
// "HTTP 503" or the transport failure, for messages.
std::string transport_text(const http::Response& r);

// The JSON credentials answer of a container endpoint or IMDS (process=false)
// or a credential_process's output (process=true).
Result<ExpiringCredentials> json_credentials(std::string_view body, std::string_view source, bool process);

}  // namespace bottomless::s3::credentials_detail
