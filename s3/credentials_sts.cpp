// Temporary credentials from STS (see credentials.h): AssumeRole, signed
// with the source profile's credentials, and AssumeRoleWithWebIdentity, with
// the token file a Kubernetes service account or another identity provider
// mounts. The request is a form POST; the answer is XML.
#include <pugixml.hpp>

#include "s3/credentials.h"
#include "s3/credentials_internal.h"
#include "s3/crypto.h"
#include "s3/http.h"
#include "s3/log.h"

namespace bottomless::s3 {

using namespace credentials_detail;

namespace {

// Form encoding for STS query parameters (application/x-www-form-urlencoded).
std::string form(const QueryList& q) {
    std::string out;
    for (const auto& [k, v] : q) {
        if (!out.empty()) out += '&';
        out += uri_encode(k, true) + "=" + uri_encode(v, true);
    }
    return out;
}

Error sts_error(std::string_view body, long status, std::string_view action, const std::string& where) {
    std::string code, message, request_id;
    pugi::xml_document doc;
    if (doc.load_buffer(body.data(), body.size())) {
        pugi::xml_node err = doc.child("ErrorResponse").child("Error");
        if (!err) err = doc.child("Error");
        code = err.child("Code").text().as_string();
        message = err.child("Message").text().as_string();
        request_id = doc.child("ErrorResponse").child("RequestId").text().as_string();
        if (request_id.empty()) request_id = err.child("RequestId").text().as_string();
    }
    Error e;
    e.http_status = static_cast<int>(status);
    e.code = code.empty() ? "HTTP" + std::to_string(status) : safe(code);
    e.request_id = safe(request_id);
    bool server_side = status >= 500 || status == 429 || code == "Throttling" || code == "IDPCommunicationError";
    e.kind = status == 429 || code == "Throttling" ? ErrorKind::Throttled : server_side ? ErrorKind::Server : ErrorKind::Auth;
    e.message = std::string("STS ") + std::string(action) + " at " + where + " refused: " + e.code +
                (message.empty() ? "" : " (" + safe(message) + ")") +
                (e.kind == ErrorKind::Auth ? "; check the role's trust policy and the caller's permission to assume it"
                                           : "");
    return e;
}

std::string default_session_name() {
    auto secs = std::chrono::duration_cast<std::chrono::seconds>(std::chrono::system_clock::now().time_since_epoch());
    return "bottomless-" + std::to_string(secs.count());
}

std::string host_of_url(const std::string& url) {
    auto p = url.find("://");
    std::string rest = p == std::string::npos ? url : url.substr(p + 3);
    return rest.substr(0, rest.find('/'));
}

class StsSource final : public CredentialsSource {
public:
    StsSource(StsSettings sts, AssumeRoleParams params, std::shared_ptr<CredentialsProvider> signer_creds,
              std::string token_file)
        : sts_(std::move(sts)), params_(std::move(params)), signer_creds_(std::move(signer_creds)),
          token_file_(std::move(token_file)), signer_(sts_.region, "sts") {
        while (!sts_.endpoint.empty() && sts_.endpoint.back() == '/') sts_.endpoint.pop_back();
    }

    std::string describe() const override {
        return std::string(web_identity() ? "STS AssumeRoleWithWebIdentity" : "STS AssumeRole") + " of " +
               safe(params_.role_arn) + " at " + log::redact_url(sts_.endpoint);
    }

    Result<ExpiringCredentials> fetch() override {
        if (auto st = validate_endpoint(sts_.endpoint); !st) {
            Error e = std::move(st).error();
            e.message = "STS endpoint: " + e.message + " (set AWS_ENDPOINT_URL_STS)";
            return e;
        }
        const char* action = web_identity() ? "AssumeRoleWithWebIdentity" : "AssumeRole";
        QueryList q{{"Action", action}, {"Version", "2011-06-15"}, {"RoleArn", params_.role_arn},
                    {"RoleSessionName", params_.session_name.empty() ? default_session_name() : params_.session_name},
                    {"DurationSeconds", std::to_string(params_.duration_seconds)}};
        if (!params_.external_id.empty() && !web_identity()) q.emplace_back("ExternalId", params_.external_id);
        std::string token;
        if (web_identity()) {
            auto t = read_small_file(token_file_);
            if (!t || trim(*t).empty())
                return make_error(ErrorKind::Auth,
                                  "the web identity token file '" + safe(token_file_) +
                                      "' cannot be read or is empty (AWS_WEB_IDENTITY_TOKEN_FILE / "
                                      "web_identity_token_file); is the service account token mounted?",
                                  "NoWebIdentityToken");
            token = trim(*t);
            secure_wipe(*t);
            q.emplace_back("WebIdentityToken", token);
        }
        std::string body = form(q);
        secure_wipe(token);
        for (auto& [k, v] : q)
            if (k == "WebIdentityToken") secure_wipe(v);
        struct Wipe {
            std::string& s;
            ~Wipe() { secure_wipe(s); }
        } wipe_body{body};

        std::string where = log::redact_url(sts_.endpoint);
        http::Response last;
        for (int attempt = 1;; ++attempt) {
            HeaderList headers{{"Content-Type", "application/x-www-form-urlencoded; charset=utf-8"},
                               {"Host", host_of_url(sts_.endpoint)}};
            if (!web_identity()) {
                auto creds = signer_creds_->current();
                if (!creds) {
                    Error e = std::move(creds).error();
                    e.message = "STS AssumeRole of " + safe(params_.role_arn) + ": no source credentials: " + e.message;
                    return e;
                }
                SigningRequest sreq;
                sreq.method = "POST";
                sreq.path = "/";
                sreq.headers = headers;
                sreq.payload_hash = sha256_hex(body);
                SigningResult sr = signer_.sign(sreq, **creds, std::chrono::system_clock::now());
                for (auto& h : sr.headers_to_add) headers.push_back(std::move(h));
            }
            last = exchange(pool_, "POST", sts_.endpoint + "/", std::move(headers), body, sts_.connect_timeout,
                            sts_.request_timeout, sts_.ca_bundle, sts_.verify_tls);
            if (last.curl_code == 0 && last.status == 200) break;
            if (attempt >= sts_.max_attempts || !transient(last)) break;
            backoff(attempt);
        }
        if (last.status == 0)
            return make_error(ErrorKind::Transport,
                              std::string("STS ") + action + " at " + where + " failed: " + transport_text(last) +
                                  "; check AWS_ENDPOINT_URL_STS and the network",
                              http::curl_code_name(last.curl_code));
        if (last.status != 200) return sts_error(last.body, last.status, action, where);
        auto r = parse_sts_response(last.body, action);
        secure_wipe(last.body);
        if (r) r->credentials.source = describe();
        return r;
    }

private:
    bool web_identity() const { return !token_file_.empty(); }

    StsSettings sts_;
    AssumeRoleParams params_;
    std::shared_ptr<CredentialsProvider> signer_creds_;
    std::string token_file_;
    Signer signer_;
    http::ConnectionPool pool_;
};

}  // namespace

Result<ExpiringCredentials> parse_sts_response(std::string_view body, std::string_view action) {
    pugi::xml_document doc;
    if (!doc.load_buffer(body.data(), body.size()))
        return make_error(ErrorKind::Corrupt, "STS " + std::string(action) + ": the answer is not XML", "MalformedXML");
    std::string root = std::string(action) + "Response", result = std::string(action) + "Result";
    pugi::xml_node c = doc.child(root.c_str()).child(result.c_str()).child("Credentials");
    if (!c) {
        if (doc.child("ErrorResponse") || doc.child("Error")) return sts_error(body, 400, action, "the endpoint");
        return make_error(ErrorKind::Corrupt, "STS " + std::string(action) + ": the answer holds no <Credentials>",
                          "MalformedXML");
    }
    std::string id = c.child("AccessKeyId").text().as_string();
    std::string secret = c.child("SecretAccessKey").text().as_string();
    std::string token = c.child("SessionToken").text().as_string();
    std::string expiration = c.child("Expiration").text().as_string();
    if (id.empty() || secret.empty() || token.empty())
        return make_error(ErrorKind::Corrupt,
                          "STS " + std::string(action) + ": the answer lacks AccessKeyId, SecretAccessKey or SessionToken",
                          "MalformedXML");
    ExpiringCredentials out;
    out.credentials = Credentials(std::move(id), std::move(secret), std::move(token));
    out.expiration = parse_iso8601(trim(expiration));
    if (!out.expiration)
        return make_error(ErrorKind::Corrupt,
                          "STS " + std::string(action) + ": Expiration '" + safe(expiration) + "' is not an ISO 8601 time",
                          "MalformedXML");
    return out;
}

std::unique_ptr<CredentialsSource> make_assume_role_source(StsSettings sts, AssumeRoleParams params,
                                                           std::shared_ptr<CredentialsProvider> source) {
    return std::make_unique<StsSource>(std::move(sts), std::move(params), std::move(source), std::string());
}

std::unique_ptr<CredentialsSource> make_web_identity_source(StsSettings sts, AssumeRoleParams params,
                                                            std::string token_file) {
    if (token_file.empty()) token_file = "/";  // never mistaken for AssumeRole; fails to read with a clear message
    return std::make_unique<StsSource>(std::move(sts), std::move(params), nullptr, std::move(token_file));
}

}  // namespace bottomless::s3
