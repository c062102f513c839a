// The local credentials endpoint (see cred_server.h). One thread accepts and
// serves connections one at a time (each answer closes its connection);
// every wait is a poll() of at most 50 ms so the destructor only sets
// stopping_ and joins. The settings and counters are behind mu_.
#include "support/cred_server.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <ctime>
#include <map>
#include <mutex>
#include <system_error>
#include <thread>

#include <nlohmann/json.hpp>

namespace bottomless::testing {
namespace {

std::string iso8601(std::chrono::system_clock::time_point t) {
    std::time_t tt = std::chrono::system_clock::to_time_t(t);
    std::tm tm{};
    gmtime_r(&tt, &tm);
    char buf[32];
    std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &tm);
    return buf;
}

std::string lower(std::string s) {
    for (char& c : s)
        if (c >= 'A' && c <= 'Z') c = static_cast<char>(c - 'A' + 'a');
    return s;
}

struct HttpRequest {
    std::string method, target, body;
    std::map<std::string, std::string> headers;  // lowercased names
    std::string header(const std::string& n) const {
        auto it = headers.find(n);
        return it == headers.end() ? std::string() : it->second;
    }
};

std::map<std::string, std::string> parse_form(std::string_view s) {
    std::map<std::string, std::string> out;
    size_t i = 0;
    while (i <= s.size()) {
        size_t amp = s.find('&', i);
        if (amp == std::string_view::npos) amp = s.size();
        std::string_view kv = s.substr(i, amp - i);
        if (!kv.empty()) {
            auto eq = kv.find('=');
            std::string k(kv.substr(0, eq)), v(eq == std::string_view::npos ? "" : kv.substr(eq + 1));
            for (auto* x : {&k, &v})
                for (char& c : *x)
                    if (c == '+') c = ' ';
            out[s3::uri_decode(k)] = s3::uri_decode(v);
        }
        i = amp + 1;
    }
    return out;
}

std::string response(int status, const std::string& reason, const std::string& content_type, const std::string& body) {
    return "HTTP/1.1 " + std::to_string(status) + " " + reason + "\r\nContent-Type: " + content_type +
           "\r\nContent-Length: " + std::to_string(body.size()) + "\r\nConnection: close\r\n\r\n" + body;
}

}  // namespace

struct CredServer::Impl {
    Supplier supplier;
    int listen_fd = -1;
    int port = 0;
    std::atomic<bool> stopping{false};
    std::thread thread;

    mutable std::mutex mu;  // guards everything below
    std::string container_token;
    std::string web_role_arn, web_token;
    std::optional<std::chrono::system_clock::time_point> expiration;
    int corrupt = 0;
    std::map<std::string, int> counts;
    std::vector<std::string> problems;
    std::string imds_token;  // issued by the token PUT

    void note(const std::string& kind, const std::string& problem = {}) {
        std::lock_guard lock(mu);
        ++counts[kind];
        if (!problem.empty()) problems.push_back(problem);
    }

    // The supplier's credentials, as this endpoint shows them.
    Result<s3::ExpiringCredentials> credentials() {
        auto c = supplier();
        if (!c) return c;
        std::lock_guard lock(mu);
        if (expiration) c->expiration = expiration;
        if (corrupt > 0) {
            --corrupt;
            std::string& t = c->credentials.session_token;
            t = t.empty() ? "corrupted" : t.substr(0, t.size() / 2) + "AAAA" + t.substr(t.size() / 2 + 4);
        }
        return c;
    }

    std::string json_answer(const s3::ExpiringCredentials& c, bool imds) {
        nlohmann::json j;
        if (imds) {
            j["Code"] = "Success";
            j["LastUpdated"] = iso8601(std::chrono::system_clock::now());
            j["Type"] = "AWS-HMAC";
        } else {
            j["RoleArn"] = "arn:aws:iam::000000000000:role/bottomless-test-role";
        }
        j["AccessKeyId"] = c.credentials.access_key_id;
        j["SecretAccessKey"] = c.credentials.secret_access_key;
        j["Token"] = c.credentials.session_token;
        j["Expiration"] = iso8601(c.expiration.value_or(std::chrono::system_clock::now() + std::chrono::hours(1)));
        return j.dump();
    }

    std::string serve(const HttpRequest& r) {
        auto refuse = [&](int status, const std::string& kind, const std::string& why) {
            note(kind, r.method + " " + r.target + ": " + why);
            return response(status, "Refused", "text/plain", why);
        };
        auto supply_failed = [&](const Error& e) {
            note("bad-request", "supplier: " + e.describe());
            return response(500, "Internal Server Error", "text/plain", "no credentials to hand out");
        };
        // IMDSv2.
        if (r.target == "/latest/api/token") {
            if (r.method != "PUT") return refuse(405, "bad-request", "the token is requested with PUT");
            std::string ttl = r.header("x-aws-ec2-metadata-token-ttl-seconds");
            if (ttl.empty() || ttl.find_first_not_of("0123456789") != std::string::npos || std::stoi(ttl) < 1 ||
                std::stoi(ttl) > 21600)
                return refuse(400, "bad-request", "X-aws-ec2-metadata-token-ttl-seconds missing or out of 1..21600");
            if (!r.header("x-forwarded-for").empty()) return refuse(403, "bad-request", "X-Forwarded-For");
            std::string tok = "imds-token-" + std::to_string(std::chrono::steady_clock::now().time_since_epoch().count());
            {
                std::lock_guard lock(mu);
                imds_token = tok;
            }
            note("imds-token");
            return response(200, "OK", "text/plain", tok);
        }
        const std::string creds_prefix = "/latest/meta-data/iam/security-credentials/";
        if (r.target.rfind(creds_prefix, 0) == 0) {
            std::string expected;
            {
                std::lock_guard lock(mu);
                expected = imds_token;
            }
            if (r.method != "GET") return refuse(405, "bad-request", "metadata is read with GET");
            if (expected.empty() || r.header("x-aws-ec2-metadata-token") != expected)
                return refuse(401, "imds-unauthorized", "no valid X-aws-ec2-metadata-token (IMDSv1 is refused)");
            std::string role = r.target.substr(creds_prefix.size());
            if (role.empty()) {
                note("imds-role");
                return response(200, "OK", "text/plain", kRole);
            }
            if (role != kRole) return refuse(404, "bad-request", "unknown role " + role);
            auto c = credentials();
            if (!c) return supply_failed(c.error());
            note("imds-credentials");
            return response(200, "OK", "text/plain", json_answer(*c, true));
        }
        // Container credentials.
        if (r.target == kContainerPath) {
            std::string expected;
            {
                std::lock_guard lock(mu);
                expected = container_token;
            }
            if (r.method != "GET") return refuse(405, "bad-request", "container credentials are read with GET");
            if (!expected.empty() && r.header("authorization") != expected)
                return refuse(401, "container-unauthorized", "wrong or missing Authorization");
            auto c = credentials();
            if (!c) return supply_failed(c.error());
            note("container");
            return response(200, "OK", "application/json", json_answer(*c, false));
        }
        // STS AssumeRoleWithWebIdentity.
        if (r.target == "/" || r.target.rfind("/?", 0) == 0) {
            auto sts_error = [&](const std::string& code, const std::string& why) {
                note("bad-request", "web identity: " + why);
                return response(400, "Bad Request", "text/xml",
                                "<ErrorResponse><Error><Type>Sender</Type><Code>" + code + "</Code><Message>" + why +
                                    "</Message></Error><RequestId>cred-server</RequestId></ErrorResponse>");
            };
            if (r.method != "POST") return sts_error("InvalidAction", "expected a POST");
            if (!r.header("authorization").empty())
                return sts_error("InvalidParameterValue", "AssumeRoleWithWebIdentity is not signed");
            if (lower(r.header("content-type")).rfind("application/x-www-form-urlencoded", 0) != 0)
                return sts_error("InvalidParameterValue", "expected a form body");
            auto f = parse_form(r.body);
            std::string role_arn, token;
            {
                std::lock_guard lock(mu);
                role_arn = web_role_arn;
                token = web_token;
            }
            if (f["Action"] != "AssumeRoleWithWebIdentity") return sts_error("InvalidAction", "Action");
            if (f["Version"] != "2011-06-15") return sts_error("InvalidParameterValue", "Version");
            if (f["RoleArn"] != role_arn) return sts_error("InvalidParameterValue", "RoleArn " + f["RoleArn"]);
            if (f["RoleSessionName"].empty()) return sts_error("ValidationError", "RoleSessionName");
            if (token.empty() || f["WebIdentityToken"] != token)
                return sts_error("InvalidIdentityToken", "the web identity token is not the expected one");
            auto c = credentials();
            if (!c) return supply_failed(c.error());
            note("web-identity");
            return response(
                200, "OK", "text/xml",
                "<AssumeRoleWithWebIdentityResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\">"
                "<AssumeRoleWithWebIdentityResult><SubjectFromWebIdentityToken>system:serviceaccount:test:app"
                "</SubjectFromWebIdentityToken><Credentials><AccessKeyId>" + c->credentials.access_key_id +
                    "</AccessKeyId><SecretAccessKey>" + c->credentials.secret_access_key +
                    "</SecretAccessKey><SessionToken>" + c->credentials.session_token +
                    "</SessionToken><Expiration>" +
                    iso8601(c->expiration.value_or(std::chrono::system_clock::now() + std::chrono::hours(1))) +
                    "</Expiration></Credentials></AssumeRoleWithWebIdentityResult>"
                    "<ResponseMetadata><RequestId>cred-server</RequestId></ResponseMetadata>"
                    "</AssumeRoleWithWebIdentityResponse>");
        }
        return refuse(404, "bad-request", "no such path");
    }

    // Reads one request (head and Content-Length body); false on EOF, error or stop.
    bool read_request(int fd, HttpRequest& r) {
        std::string buf;
        auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
        size_t head_end = std::string::npos;
        size_t need = 0;
        for (;;) {
            if (head_end == std::string::npos) {
                head_end = buf.find("\r\n\r\n");
                if (head_end != std::string::npos) {
                    std::string head = buf.substr(0, head_end);
                    size_t line_end = head.find("\r\n");
                    std::string first = head.substr(0, line_end);
                    auto sp1 = first.find(' '), sp2 = first.rfind(' ');
                    if (sp1 == std::string::npos || sp2 <= sp1) return false;
                    r.method = first.substr(0, sp1);
                    r.target = first.substr(sp1 + 1, sp2 - sp1 - 1);
                    size_t pos = line_end == std::string::npos ? head.size() : line_end + 2;
                    while (pos < head.size()) {
                        size_t e = head.find("\r\n", pos);
                        if (e == std::string::npos) e = head.size();
                        std::string line = head.substr(pos, e - pos);
                        auto colon = line.find(':');
                        if (colon != std::string::npos) {
                            std::string v = line.substr(colon + 1);
                            while (!v.empty() && v.front() == ' ') v.erase(0, 1);
                            r.headers[lower(line.substr(0, colon))] = v;
                        }
                        pos = e + 2;
                    }
                    std::string cl = r.header("content-length");
                    need = cl.empty() ? 0 : std::stoul(cl);
                }
            }
            if (head_end != std::string::npos && buf.size() >= head_end + 4 + need) {
                r.body = buf.substr(head_end + 4, need);
                return true;
            }
            if (stopping.load() || std::chrono::steady_clock::now() > deadline || buf.size() > (1 << 20)) return false;
            pollfd p{fd, POLLIN, 0};
            int pr = ::poll(&p, 1, 50);
            if (pr <= 0) continue;
            char tmp[4096];
            ssize_t n = ::recv(fd, tmp, sizeof tmp, 0);
            if (n <= 0) return false;
            buf.append(tmp, static_cast<size_t>(n));
        }
    }

    void loop() {
        while (!stopping.load()) {
            pollfd p{listen_fd, POLLIN, 0};
            if (::poll(&p, 1, 50) <= 0) continue;
            int fd = ::accept4(listen_fd, nullptr, nullptr, SOCK_CLOEXEC);
            if (fd < 0) continue;
            HttpRequest r;
            if (read_request(fd, r)) {
                std::string out = serve(r);
                std::string_view rest = out;
                while (!rest.empty()) {
                    ssize_t n = ::send(fd, rest.data(), rest.size(), MSG_NOSIGNAL);
                    if (n <= 0) break;
                    rest.remove_prefix(static_cast<size_t>(n));
                }
            }
            ::close(fd);
        }
    }
};

CredServer::CredServer(Supplier supplier) : impl_(std::make_unique<Impl>()) {
    impl_->supplier = std::move(supplier);
    impl_->listen_fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (impl_->listen_fd < 0) throw std::system_error(errno, std::system_category(), "cred server: socket");
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof addr;
    if (::bind(impl_->listen_fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 ||
        ::listen(impl_->listen_fd, 64) != 0 ||
        ::getsockname(impl_->listen_fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
        int err = errno;
        ::close(impl_->listen_fd);
        throw std::system_error(err, std::system_category(), "cred server: bind/listen");
    }
    impl_->port = ntohs(addr.sin_port);
    impl_->thread = std::thread([this] { impl_->loop(); });
}

CredServer::~CredServer() {
    impl_->stopping = true;
    impl_->thread.join();
    ::close(impl_->listen_fd);
}

std::string CredServer::url() const { return "http://127.0.0.1:" + std::to_string(impl_->port); }

void CredServer::set_container_token(std::string token) {
    std::lock_guard lock(impl_->mu);
    impl_->container_token = std::move(token);
}

void CredServer::set_web_identity(std::string role_arn, std::string token) {
    std::lock_guard lock(impl_->mu);
    impl_->web_role_arn = std::move(role_arn);
    impl_->web_token = std::move(token);
}

void CredServer::set_expiration(std::optional<std::chrono::system_clock::time_point> t) {
    std::lock_guard lock(impl_->mu);
    impl_->expiration = t;
}

void CredServer::corrupt_next_tokens(int n) {
    std::lock_guard lock(impl_->mu);
    impl_->corrupt = n;
}

int CredServer::count(const std::string& kind) const {
    std::lock_guard lock(impl_->mu);
    auto it = impl_->counts.find(kind);
    return it == impl_->counts.end() ? 0 : it->second;
}

std::vector<std::string> CredServer::problems() const {
    std::lock_guard lock(impl_->mu);
    return impl_->problems;
}

}  // namespace bottomless::testing
