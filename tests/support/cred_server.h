// A local credentials endpoint for the integration tests: it speaks the
// documented EC2 instance metadata (IMDSv2), container credentials (ECS, EKS
// Pod Identity) and STS AssumeRoleWithWebIdentity protocols on 127.0.0.1, and
// hands out the credentials a supplier gives it — in the tests, REAL
// temporary credentials from the test server's STS (AssumeRole), so every S3
// request signed with them is checked by the real server, session token
// included.
//
// It validates each request's shape the way the real services do (IMDSv2:
// a token PUT with a TTL header, then GETs carrying that token, 401
// otherwise; container: the Authorization header; STS web identity: an
// unsigned form POST with Action, Version, RoleArn, RoleSessionName and the
// expected WebIdentityToken) and counts what it served.
#pragma once

#include <chrono>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "s3/credentials.h"

namespace bottomless::testing {

class CredServer {
public:
    using Supplier = std::function<bottomless::Result<s3::ExpiringCredentials>()>;
    // Listens on 127.0.0.1 on an ephemeral port; throws std::system_error if it cannot.
    explicit CredServer(Supplier supplier);
    ~CredServer();
    CredServer(const CredServer&) = delete;
    CredServer& operator=(const CredServer&) = delete;

    std::string url() const;  // "http://127.0.0.1:PORT"

    static constexpr const char* kRole = "bottomless-test-role";  // the IMDS role name
    static constexpr const char* kContainerPath = "/v2/credentials/bottomless-test";
    // The Authorization value the container endpoint requires (empty: none).
    void set_container_token(std::string token);
    // What AssumeRoleWithWebIdentity must carry.
    void set_web_identity(std::string role_arn, std::string token);
    // The Expiration the next answers show instead of the supplier's (nullopt: the supplier's).
    void set_expiration(std::optional<std::chrono::system_clock::time_point> t);
    // The next `n` answers carry a session token the server will refuse.
    void corrupt_next_tokens(int n);

    // Requests served, by kind: "imds-token", "imds-role", "imds-credentials",
    // "imds-unauthorized", "container", "container-unauthorized",
    // "web-identity", "bad-request".
    int count(const std::string& kind) const;
    // Why requests were refused (for test failure messages).
    std::vector<std::string> problems() const;

private:
    struct Impl;
    std::unique_ptr<Impl> impl_;
};

}  // namespace bottomless::testing
