// Credentials from the machine the process runs on (see credentials.h): a
// container credentials endpoint (ECS, EKS Pod Identity: a URL and an
// optional authorization token from the environment) and EC2 instance
// metadata (IMDSv2: a session token, the instance's role, its credentials).
// Both answer with the same JSON.
#include "s3/config.h"
#include "s3/credentials.h"
#include "s3/credentials_internal.h"
#include "s3/http.h"
#include "s3/log.h"

namespace bottomless::s3 {

using namespace credentials_detail;

Result<ExpiringCredentials> parse_container_json(std::string_view body, std::string_view source) {
    return json_credentials(body, source, false);
}

Status validate_container_url(std::string_view url) {
    auto bad = [&](const std::string& why) {
        return make_error(ErrorKind::InvalidArgument,
                          "container credentials URL '" + log::redact_url(url) + "' is not allowed: " + why,
                          "BadContainerUrl");
    };
    if (auto st = validate_endpoint(url.substr(0, url.find('/', url.find("://") == std::string_view::npos ? 0 : url.find("://") + 3)));
        !st)
        return bad(st.error().message);
    std::string scheme = lower(std::string(url.substr(0, url.find("://"))));
    if (scheme == "https") return {};
    std::string host = lower(endpoint_host(url));
    if (is_loopback_host(host) || host == "169.254.170.2" || host == "169.254.170.23" || host == "fd00:ec2::23") return {};
    return bad("plain http is allowed only to a loopback address or to 169.254.170.2, 169.254.170.23 or "
               "[fd00:ec2::23] (the ECS and EKS Pod Identity agents), as in the AWS SDKs; use https");
}

namespace {

class ContainerSource final : public CredentialsSource {
public:
    explicit ContainerSource(ContainerSettings s) : s_(std::move(s)) {}
    std::string describe() const override { return "container credentials (" + log::redact_url(s_.url) + ")"; }

    Result<ExpiringCredentials> fetch() override {
        if (auto st = validate_container_url(s_.url); !st) return std::move(st).error();
        HeaderList headers;
        std::string token = s_.authorization_token;
        if (!s_.authorization_token_file.empty()) {
            auto t = read_small_file(s_.authorization_token_file);
            if (!t)
                return make_error(ErrorKind::Auth,
                                  "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE '" + safe(s_.authorization_token_file) +
                                      "' cannot be read",
                                  "NoContainerToken");
            token = trim(*t);
            secure_wipe(*t);
        }
        if (token.find_first_of("\r\n") != std::string::npos)
            return make_error(ErrorKind::InvalidArgument, "the container authorization token holds a line break",
                              "BadContainerToken");
        if (!token.empty()) headers.emplace_back("Authorization", token);
        secure_wipe(token);
        http::Response r;
        for (int attempt = 1;; ++attempt) {
            r = exchange(pool_, "GET", s_.url, headers, {}, s_.timeout, s_.timeout * 2);
            if (r.curl_code == 0 && r.status == 200) break;
            if (attempt >= s_.max_attempts || !transient(r)) break;
            backoff(attempt);
        }
        for (auto& [k, v] : headers) secure_wipe(v);
        if (r.curl_code != 0 || r.status != 200) {
            std::string hint = r.status == 401 || r.status == 403
                                   ? "; the authorization token was refused (AWS_CONTAINER_AUTHORIZATION_TOKEN[_FILE])"
                                   : "; is this running in the container the variables were set for?";
            return make_error(r.status == 401 || r.status == 403 ? ErrorKind::Auth : ErrorKind::Transport,
                              describe() + " failed: " + transport_text(r) + hint, "ContainerCredentialsFailed");
        }
        auto c = parse_container_json(r.body, describe());
        secure_wipe(r.body);
        return c;
    }

private:
    ContainerSettings s_;
    http::ConnectionPool pool_;
};

class ImdsSource final : public CredentialsSource {
public:
    explicit ImdsSource(ImdsSettings s) : s_(std::move(s)) {
        while (!s_.endpoint.empty() && s_.endpoint.back() == '/') s_.endpoint.pop_back();
    }
    std::string describe() const override { return "EC2 instance metadata (" + log::redact_url(s_.endpoint) + ")"; }

    Result<ExpiringCredentials> fetch() override {
        if (auto st = validate_endpoint(s_.endpoint); !st) {
            Error e = std::move(st).error();
            e.message = "AWS_EC2_METADATA_SERVICE_ENDPOINT: " + e.message;
            return e;
        }
        // IMDSv2 only: a session token first (PUT), then every GET carries it.
        auto call = [&](const std::string& method, const std::string& path, HeaderList headers) {
            http::Response r;
            for (int attempt = 1;; ++attempt) {
                r = exchange(pool_, method, s_.endpoint + path, headers, {}, s_.connect_timeout, s_.request_timeout);
                if ((r.curl_code == 0 && r.status == 200) || attempt >= s_.max_attempts || !transient(r)) break;
                backoff(attempt);
            }
            for (auto& [k, v] : headers) secure_wipe(v);
            return r;
        };
        http::Response t = call("PUT", "/latest/api/token",
                                {{"X-aws-ec2-metadata-token-ttl-seconds", std::to_string(s_.token_ttl_seconds)}});
        if (t.curl_code != 0 || t.status != 200) {
            std::string hint =
                t.status == 0 ? "; not on EC2? (set AWS_EC2_METADATA_DISABLED=true to skip it). In a container on "
                                "EC2 the token answer needs two network hops: set the instance's metadata "
                                "HttpPutResponseHopLimit to 2"
                : t.status == 403 ? "; the instance metadata service is disabled for this instance"
                                  : "";
            return make_error(t.status == 0 ? ErrorKind::Transport : ErrorKind::Auth,
                              describe() + ": no IMDSv2 session token: " + transport_text(t) + hint,
                              "ImdsUnavailable");
        }
        std::string token = trim(t.body);
        secure_wipe(t.body);
        struct Wipe {
            std::string& s;
            ~Wipe() { secure_wipe(s); }
        } wipe_token{token};
        if (token.empty() || token.find_first_of("\r\n") != std::string::npos)
            return make_error(ErrorKind::Corrupt, describe() + ": the session token answer is unusable", "ImdsBadToken");
        http::Response roles = call("GET", "/latest/meta-data/iam/security-credentials/",
                                    {{"X-aws-ec2-metadata-token", token}});
        if (roles.status == 404)
            return make_error(ErrorKind::Auth, describe() + ": no IAM role (instance profile) is attached to this instance",
                              "ImdsNoRole");
        if (roles.curl_code != 0 || roles.status != 200)
            return make_error(ErrorKind::Transport, describe() + ": listing the instance's role failed: " + transport_text(roles),
                              "ImdsFailed");
        std::string role = trim(roles.body.substr(0, roles.body.find('\n')));
        if (role.empty() || role.size() > 128 || role.find_first_of("/\\?#%") != std::string::npos)
            return make_error(ErrorKind::Corrupt, describe() + ": the role name '" + safe(role) + "' is not usable",
                              "ImdsBadRole");
        http::Response cr = call("GET", "/latest/meta-data/iam/security-credentials/" + uri_encode(role, true),
                                 {{"X-aws-ec2-metadata-token", token}});
        if (cr.curl_code != 0 || cr.status != 200)
            return make_error(cr.status == 404 ? ErrorKind::Auth : ErrorKind::Transport,
                              describe() + ": the credentials of role '" + safe(role) + "' failed: " + transport_text(cr),
                              "ImdsFailed");
        auto c = parse_container_json(cr.body, describe() + " role " + safe(role));
        secure_wipe(cr.body);
        return c;
    }

private:
    ImdsSettings s_;
    http::ConnectionPool pool_;
};

}  // namespace

std::unique_ptr<CredentialsSource> make_container_source(ContainerSettings settings) {
    return std::make_unique<ContainerSource>(std::move(settings));
}

std::unique_ptr<CredentialsSource> make_imds_source(ImdsSettings settings) {
    return std::make_unique<ImdsSource>(std::move(settings));
}

}  // namespace bottomless::s3
