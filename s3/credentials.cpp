// Credential sources, their refresh, and the chain that picks one. See credentials.h.
#include "s3/credentials.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <nlohmann/json.hpp>
#include <pugixml.hpp>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <ctime>
#include <fstream>
#include <random>
#include <sstream>
#include <thread>

#include "s3/http.h"
#include "s3/log.h"
#include "s3/xml.h"

extern char** environ;

namespace bottomless::s3 {
namespace {

using SysTime = std::chrono::system_clock::time_point;

constexpr uint64_t kMaxCredentialBody = 64 * 1024;  // any credentials answer is a few KiB
constexpr size_t kMaxProcessOutput = 1 << 20;

std::string trim(std::string_view s) {
    size_t b = 0, e = s.size();
    while (b < e && (s[b] == ' ' || s[b] == '\t' || s[b] == '\r' || s[b] == '\n')) ++b;
    while (e > b && (s[e - 1] == ' ' || s[e - 1] == '\t' || s[e - 1] == '\r' || s[e - 1] == '\n')) --e;
    return std::string(s.substr(b, e - b));
}

std::string lower(std::string s) {
    for (char& c : s)
        if (c >= 'A' && c <= 'Z') c = static_cast<char>(c - 'A' + 'a');
    return s;
}

std::string safe(std::string_view s) { return log::printable(s, 200); }

std::string format_time(SysTime t) {
    std::time_t tt = std::chrono::system_clock::to_time_t(t);
    std::tm tm{};
    gmtime_r(&tt, &tm);
    char buf[32];
    std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &tm);
    return buf;
}

// Reads a small file (a token); nullopt when it cannot be read.
std::optional<std::string> read_small_file(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    if (!in) return std::nullopt;
    std::string s(64 * 1024 + 1, '\0');
    in.read(s.data(), static_cast<std::streamsize>(s.size()));
    s.resize(static_cast<size_t>(in.gcount()));
    if (s.size() > 64 * 1024) return std::nullopt;
    return s;
}

// Jittered exponential pause between attempts of a credentials request.
void backoff(int attempt) {
    thread_local std::minstd_rand rng{std::random_device{}()};
    int cap = std::min(100 * (1 << std::min(attempt, 5)), 2000);
    std::this_thread::sleep_for(std::chrono::milliseconds(std::uniform_int_distribution<int>(cap / 2, cap)(rng)));
}

// One HTTP exchange for a credentials source (small bodies, short deadlines).
http::Response exchange(http::ConnectionPool& pool, const std::string& method, const std::string& url,
                        HeaderList headers, std::string_view body, std::chrono::milliseconds connect,
                        std::chrono::milliseconds total, const std::string& ca_bundle = {}, bool verify_tls = true) {
    http::MemorySource src(body);
    http::Request req;
    req.method = method;
    req.url = url;
    req.headers = std::move(headers);
    if (!body.empty()) req.body = &src;
    req.max_body_bytes = kMaxCredentialBody;
    req.hard_deadline = std::chrono::steady_clock::now() + total;
    http::Timeouts to;
    to.connect = connect;
    to.low_speed_time = std::chrono::seconds(std::max<int64_t>(1, std::chrono::duration_cast<std::chrono::seconds>(total).count()));
    to.ca_bundle = ca_bundle;
    to.verify_tls = verify_tls;
    http::Response r = http::perform(pool, req, to);
    for (auto& [k, v] : req.headers)
        if (k == "Authorization" || k == "X-Amz-Security-Token" || k == "X-aws-ec2-metadata-token") secure_wipe(v);
    return r;
}

bool transient(const http::Response& r) {
    if (r.status == 0) return http::curl_code_retryable(r.curl_code);
    return r.status >= 500 || r.status == 429;
}

std::string transport_text(const http::Response& r) {
    if (r.status == 0) return http::curl_code_name(r.curl_code) + " (" + safe(r.curl_error) + ")";
    return "HTTP " + std::to_string(r.status);
}

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

Result<ExpiringCredentials> json_credentials(std::string_view body, std::string_view source, bool process) {
    auto bad = [&](const std::string& why) {
        return make_error(ErrorKind::Auth, std::string(source) + " returned unusable credentials: " + why, "BadCredentialsResponse");
    };
    nlohmann::json j;
    try {
        j = nlohmann::json::parse(body.begin(), body.end(), nullptr, true, false);
    } catch (const nlohmann::json::exception&) {
        return bad("the answer is not JSON");
    }
    if (!j.is_object()) return bad("the answer is not a JSON object");
    auto str = [&](const char* name) -> std::optional<std::string> {
        auto it = j.find(name);
        if (it == j.end() || !it->is_string()) return std::nullopt;
        return it->get<std::string>();
    };
    if (process) {
        auto v = j.find("Version");
        if (v == j.end() || !v->is_number_integer() || v->get<int64_t>() != 1)
            return bad("\"Version\" must be 1 (credential_process output format version 1)");
    } else if (auto code = str("Code"); code && *code != "Success") {
        return bad("\"Code\" is '" + safe(*code) + "'" + (str("Message") ? ": " + safe(*str("Message")) : ""));
    }
    auto id = str("AccessKeyId");
    auto secret = str("SecretAccessKey");
    auto token = str(process ? "SessionToken" : "Token");
    if (!id || id->empty()) return bad("no \"AccessKeyId\"");
    if (!secret || secret->empty()) return bad("no \"SecretAccessKey\"");
    if (!process && (!token || token->empty())) return bad("no \"Token\"");
    ExpiringCredentials out;
    out.credentials = Credentials(*id, *secret, token.value_or(""), std::string(source));
    if (auto ex = str("Expiration")) {
        out.expiration = parse_iso8601(*ex);
        if (!out.expiration) return bad("\"Expiration\" '" + safe(*ex) + "' is not an ISO 8601 time");
    } else if (!process) {
        return bad("no \"Expiration\"");
    }
    if (j.contains("SecretAccessKey")) {
        std::string& s = j["SecretAccessKey"].get_ref<std::string&>();
        secure_wipe(s);
    }
    return out;
}

}  // namespace

// ---- parsers ---------------------------------------------------------------

std::optional<SysTime> parse_iso8601(std::string_view t) {
    auto digits = [&](size_t pos, size_t n, int& out) {
        if (pos + n > t.size()) return false;
        out = 0;
        for (size_t i = pos; i < pos + n; ++i) {
            if (t[i] < '0' || t[i] > '9') return false;
            out = out * 10 + (t[i] - '0');
        }
        return true;
    };
    int Y, M, D, h, m, s;
    if (!digits(0, 4, Y) || t.size() < 19 || t[4] != '-' || !digits(5, 2, M) || t[7] != '-' || !digits(8, 2, D) ||
        (t[10] != 'T' && t[10] != 't' && t[10] != ' ') || !digits(11, 2, h) || t[13] != ':' || !digits(14, 2, m) ||
        t[16] != ':' || !digits(17, 2, s))
        return std::nullopt;
    if (M < 1 || M > 12 || D < 1 || D > 31 || h > 23 || m > 59 || s > 60) return std::nullopt;
    size_t i = 19;
    if (i < t.size() && t[i] == '.') {
        ++i;
        size_t b = i;
        while (i < t.size() && t[i] >= '0' && t[i] <= '9') ++i;
        if (i == b) return std::nullopt;
    }
    long offset = 0;
    if (i < t.size() && (t[i] == 'Z' || t[i] == 'z')) {
        ++i;
    } else if (i < t.size() && (t[i] == '+' || t[i] == '-')) {
        int oh, om;
        if (!digits(i + 1, 2, oh) || i + 3 >= t.size() || t[i + 3] != ':' || !digits(i + 4, 2, om) || oh > 23 || om > 59)
            return std::nullopt;
        offset = (t[i] == '+' ? 1 : -1) * (oh * 3600L + om * 60L);
        i += 6;
    } else {
        return std::nullopt;
    }
    if (i != t.size()) return std::nullopt;
    std::tm tm{};
    tm.tm_year = Y - 1900;
    tm.tm_mon = M - 1;
    tm.tm_mday = D;
    tm.tm_hour = h;
    tm.tm_min = m;
    tm.tm_sec = s;
    std::time_t tt = timegm(&tm);
    return std::chrono::system_clock::from_time_t(tt - offset);
}

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

Result<ExpiringCredentials> parse_container_json(std::string_view body, std::string_view source) {
    return json_credentials(body, source, false);
}

Result<ExpiringCredentials> parse_process_json(std::string_view body, std::string_view source) {
    return json_credentials(body, source, true);
}

Result<std::vector<std::string>> split_command_line(std::string_view cmd) {
    std::vector<std::string> out;
    std::string cur;
    bool in_word = false;
    for (size_t i = 0; i < cmd.size(); ++i) {
        char c = cmd[i];
        if (c == ' ' || c == '\t' || c == '\n' || c == '\r') {
            if (in_word) out.push_back(std::move(cur)), cur.clear(), in_word = false;
        } else if (c == '\'') {
            auto end = cmd.find('\'', i + 1);
            if (end == std::string_view::npos)
                return make_error(ErrorKind::InvalidArgument, "credential_process: a ' quote is not closed", "BadCommand");
            cur.append(cmd.substr(i + 1, end - i - 1));
            i = end;
            in_word = true;
        } else if (c == '"') {
            size_t j = i + 1;
            for (; j < cmd.size() && cmd[j] != '"'; ++j) {
                // Inside "…" a backslash escapes only \ " $ ` and a newline, as in sh.
                if (cmd[j] == '\\' && j + 1 < cmd.size() && std::string_view("\\\"$`\n").find(cmd[j + 1]) != std::string_view::npos) ++j;
                cur += cmd[j];
            }
            if (j >= cmd.size())
                return make_error(ErrorKind::InvalidArgument, "credential_process: a \" quote is not closed", "BadCommand");
            i = j;
            in_word = true;
        } else if (c == '\\' && i + 1 < cmd.size()) {
            cur += cmd[++i];
            in_word = true;
        } else {
            cur += c;
            in_word = true;
        }
    }
    if (in_word) out.push_back(std::move(cur));
    if (out.empty()) return make_error(ErrorKind::InvalidArgument, "credential_process is empty", "BadCommand");
    return out;
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

// ---- RefreshingProvider --------------------------------------------------

RefreshingProvider::RefreshingProvider(std::unique_ptr<CredentialsSource> source, RefreshOptions options)
    : source_(std::move(source)), options_(std::move(options)) {}

SysTime RefreshingProvider::now() const {
    return options_.clock ? options_.clock() : std::chrono::system_clock::now();
}

Result<std::shared_ptr<const Credentials>> RefreshingProvider::current() {
    // Usable: may still sign a request (not expired, not refused). Fresh:
    // also outside the refresh margin.
    auto state = [&](SysTime t, bool& fresh, bool& usable) {
        usable = current_ && !stale_ && (!expiration_ || t < *expiration_);
        fresh = usable && (!expiration_ || t + options_.margin < *expiration_);
    };
    std::shared_ptr<const Credentials> fallback;
    {
        std::lock_guard lock(mu_);
        bool fresh, usable;
        state(now(), fresh, usable);
        if (fresh) return current_;
        if (now() < next_try_) {
            if (usable) return current_;
            if (last_error_) return *last_error_;
            // Just fetched, yet they look expired by this clock (skew, or a
            // source that hands out nearly expired ones): the server decides.
            if (current_ && !stale_) return current_;
        }
        if (usable) fallback = current_;
    }
    std::unique_lock fetch_lock(fetch_mu_, std::defer_lock);
    if (fallback) {
        // Another thread is refreshing: sign with the ones that still work.
        if (!fetch_lock.try_lock()) return fallback;
    } else {
        fetch_lock.lock();
    }
    {
        std::lock_guard lock(mu_);
        bool fresh, usable;
        state(now(), fresh, usable);
        if (fresh) return current_;  // refreshed while this thread waited
        if (now() < next_try_) {
            if (last_error_ && !usable) return *last_error_;
            if (!last_error_ && current_ && !stale_) return current_;
        }
    }
    fetches_.fetch_add(1, std::memory_order_relaxed);
    auto got = source_->fetch();
    std::lock_guard lock(mu_);
    SysTime t = now();
    if (!got) {
        Error e = std::move(got).error();
        next_try_ = t + std::chrono::duration_cast<std::chrono::system_clock::duration>(options_.retry_after_failure);
        last_error_ = e;
        bool fresh, usable;
        state(t, fresh, usable);
        if (usable) {
            log::warn("cannot refresh credentials from " + source_->describe() + " (" + e.describe() +
                      "); the current ones, valid until " + format_time(*expiration_) + ", are used meanwhile");
            return current_;
        }
        return e;
    }
    last_error_.reset();
    if (got->credentials.source.empty()) got->credentials.source = source_->describe();
    current_ = std::make_shared<const Credentials>(std::move(got->credentials));
    expiration_ = got->expiration;
    stale_ = false;
    next_try_ = {};
    if (expiration_ && t + options_.margin >= *expiration_) {
        // Already inside the margin (a short-lived credential): do not fetch
        // again at every request.
        next_try_ = t + std::chrono::duration_cast<std::chrono::system_clock::duration>(options_.retry_after_failure);
    }
    if (log::enabled(log::Level::Info))
        log::info("credentials from " + source_->describe() +
                  (expiration_ ? " obtained, valid until " + format_time(*expiration_) : std::string(" obtained")));
    return current_;
}

bool RefreshingProvider::invalidate(const Credentials& used) {
    std::lock_guard lock(mu_);
    SysTime t = now();
    if (!(current_ && current_->access_key_id == used.access_key_id && current_->session_token == used.session_token))
        return true;  // already replaced: the caller's retry gets the new ones
    if (last_invalidation_ && t < *last_invalidation_ + options_.retry_after_failure && t >= *last_invalidation_)
        return false;
    last_invalidation_ = t;
    stale_ = true;
    next_try_ = {};
    return true;
}

// ---- sources ---------------------------------------------------------------

namespace {

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

class ProcessSource final : public CredentialsSource {
public:
    explicit ProcessSource(ProcessSettings s) : s_(std::move(s)) {}
    std::string describe() const override {
        return "credential_process of profile " + safe(s_.profile.empty() ? "default" : s_.profile);
    }

    Result<ExpiringCredentials> fetch() override {
        auto argv = split_command_line(s_.command);
        if (!argv) return std::move(argv).error();
        std::string out;
        auto st = run(*argv, out);
        struct Wipe {
            std::string& s;
            ~Wipe() { secure_wipe(s); }
        } wipe_out{out};
        if (!st) return std::move(st).error();
        return parse_process_json(out, describe());
    }

private:
    Status run(const std::vector<std::string>& args, std::string& out) {
        auto fail = [&](const std::string& why) {
            return make_error(ErrorKind::Auth, describe() + " ('" + safe(args[0]) + "'): " + why, "CredentialProcessFailed");
        };
        int fds[2];
        if (::pipe2(fds, O_CLOEXEC) != 0) return fail(std::string("pipe: ") + std::strerror(errno));
        posix_spawn_file_actions_t fa;
        posix_spawn_file_actions_init(&fa);
        posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
        posix_spawn_file_actions_adddup2(&fa, fds[1], 1);
        std::vector<char*> cargv;
        for (const auto& a : args) cargv.push_back(const_cast<char*>(a.c_str()));
        cargv.push_back(nullptr);
        pid_t pid = -1;
        // posix_spawnp: no shell, PATH lookup as the SDKs do; safe in a
        // multi-threaded host (no fork of its threads' locks).
        int rc = posix_spawnp(&pid, cargv[0], &fa, nullptr, cargv.data(), environ);
        posix_spawn_file_actions_destroy(&fa);
        ::close(fds[1]);
        if (rc != 0) {
            ::close(fds[0]);
            return fail(std::string("cannot run it: ") + std::strerror(rc));
        }
        auto deadline = std::chrono::steady_clock::now() + s_.timeout;
        bool timed_out = false, too_long = false;
        char buf[4096];
        for (;;) {
            auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
            if (left.count() <= 0) {
                timed_out = true;
                break;
            }
            pollfd p{fds[0], POLLIN, 0};
            int pr = ::poll(&p, 1, static_cast<int>(std::min<int64_t>(left.count(), 1000)));
            if (pr < 0 && errno == EINTR) continue;
            if (pr <= 0) continue;
            ssize_t n = ::read(fds[0], buf, sizeof buf);
            if (n < 0 && errno == EINTR) continue;
            if (n <= 0) break;
            out.append(buf, static_cast<size_t>(n));
            if (out.size() > kMaxProcessOutput) {
                too_long = true;
                break;
            }
        }
        secure_wipe(buf, sizeof buf);
        ::close(fds[0]);
        if (timed_out || too_long) ::kill(pid, SIGKILL);
        int status = 0;
        pid_t w;
        do {
            w = ::waitpid(pid, &status, 0);
        } while (w < 0 && errno == EINTR);
        if (timed_out) return fail("no answer within " + std::to_string(s_.timeout.count() / 1000) + " s; it was killed");
        if (too_long) return fail("it wrote more than 1 MiB; it was killed");
        // ECHILD: the host ignores SIGCHLD, the status is lost; judge by the output.
        if (w == pid && WIFEXITED(status) && WEXITSTATUS(status) != 0)
            return fail("it exited with status " + std::to_string(WEXITSTATUS(status)));
        if (w == pid && WIFSIGNALED(status)) return fail("it was killed by signal " + std::to_string(WTERMSIG(status)));
        return {};
    }

    ProcessSettings s_;
};

}  // namespace

std::unique_ptr<CredentialsSource> make_assume_role_source(StsSettings sts, AssumeRoleParams params,
                                                           std::shared_ptr<CredentialsProvider> source) {
    return std::make_unique<StsSource>(std::move(sts), std::move(params), std::move(source), std::string());
}

std::unique_ptr<CredentialsSource> make_web_identity_source(StsSettings sts, AssumeRoleParams params,
                                                            std::string token_file) {
    if (token_file.empty()) token_file = "/";  // never mistaken for AssumeRole; fails to read with a clear message
    return std::make_unique<StsSource>(std::move(sts), std::move(params), nullptr, std::move(token_file));
}

std::unique_ptr<CredentialsSource> make_container_source(ContainerSettings settings) {
    return std::make_unique<ContainerSource>(std::move(settings));
}

std::unique_ptr<CredentialsSource> make_imds_source(ImdsSettings settings) {
    return std::make_unique<ImdsSource>(std::move(settings));
}

std::unique_ptr<CredentialsSource> make_process_source(ProcessSettings settings) {
    return std::make_unique<ProcessSource>(std::move(settings));
}

// ---- the chain -------------------------------------------------------------

namespace {

using Section = std::map<std::string, std::string>;
using ProviderPtr = std::shared_ptr<CredentialsProvider>;

std::optional<std::string> nonempty(const EnvLookup& env, std::string_view name) {
    auto v = env(name);
    if (v && !v->empty()) return v;
    return std::nullopt;
}

std::optional<std::string> get(const Section* sec, const std::string& key) {
    if (!sec) return std::nullopt;
    auto it = sec->find(key);
    if (it == sec->end() || it->second.empty()) return std::nullopt;
    return it->second;
}

struct Chain {
    const EnvLookup& env;
    ChainSettings settings;
    std::string conf_path, cred_path;
    IniFile conf, creds;
    StsSettings sts;
    std::vector<std::string> visiting;  // source_profile chain, for cycles

    const Section* cred_section(const std::string& p) const {
        auto it = creds.find(p);
        return it == creds.end() ? nullptr : &it->second;
    }
    const Section* conf_section(const std::string& p) const {
        auto it = conf.find("profile " + p);
        if (it == conf.end() && p == "default") it = conf.find("default");
        return it == conf.end() ? nullptr : &it->second;
    }
    // A profile setting: the credentials file wins over the config file, as in the AWS CLI.
    std::optional<std::string> setting(const std::string& p, const std::string& key) const {
        if (auto v = get(cred_section(p), key)) return v;
        return get(conf_section(p), key);
    }
    bool has_profile(const std::string& p) const { return cred_section(p) || conf_section(p); }

    ProviderPtr refreshing(std::unique_ptr<CredentialsSource> s) const {
        return std::make_shared<RefreshingProvider>(std::move(s), settings.refresh);
    }

    std::optional<Credentials> keys_in(const Section* sec, const std::string& where) const {
        auto id = get(sec, "aws_access_key_id");
        auto secret = get(sec, "aws_secret_access_key");
        if (!id || !secret) return std::nullopt;
        return Credentials(*id, *secret, get(sec, "aws_session_token").value_or(""), where);
    }
    std::optional<Credentials> file_keys(const std::string& p) const {
        if (auto c = keys_in(cred_section(p), cred_path + " [" + p + "]")) return c;
        return keys_in(conf_section(p), conf_path + " [profile " + p + "]");
    }
    std::optional<Credentials> env_keys() const {
        auto id = nonempty(env, "AWS_ACCESS_KEY_ID");
        auto secret = nonempty(env, "AWS_SECRET_ACCESS_KEY");
        if (!id || !secret) return std::nullopt;
        return Credentials(*id, *secret, nonempty(env, "AWS_SESSION_TOKEN").value_or(""), "environment");
    }

    Result<ProviderPtr> container() const {
        ContainerSettings cs;
        if (auto full = nonempty(env, "AWS_CONTAINER_CREDENTIALS_FULL_URI")) cs.url = *full;
        if (auto rel = nonempty(env, "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI")) {
            // The relative URI wins, as in the SDKs.
            cs.url = "http://169.254.170.2" + (rel->front() == '/' ? *rel : "/" + *rel);
        }
        if (cs.url.empty()) return ProviderPtr();
        if (auto st = validate_container_url(cs.url); !st) return std::move(st).error();
        cs.authorization_token = nonempty(env, "AWS_CONTAINER_AUTHORIZATION_TOKEN").value_or("");
        cs.authorization_token_file = nonempty(env, "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE").value_or("");
        return refreshing(make_container_source(std::move(cs)));
    }

    bool imds_disabled() const { return lower(nonempty(env, "AWS_EC2_METADATA_DISABLED").value_or("")) == "true"; }
    ProviderPtr imds() const {
        ImdsSettings is;
        if (auto ep = nonempty(env, "AWS_EC2_METADATA_SERVICE_ENDPOINT")) is.endpoint = *ep;
        else if (lower(nonempty(env, "AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE").value_or("")) == "ipv6")
            is.endpoint = "http://[fd00:ec2::254]";
        return refreshing(make_imds_source(std::move(is)));
    }

    AssumeRoleParams role_params(const std::string& p, const std::string& role_arn) const {
        AssumeRoleParams rp;
        rp.role_arn = role_arn;
        rp.session_name = setting(p, "role_session_name").value_or("");
        if (auto d = setting(p, "duration_seconds")) {
            char* end = nullptr;
            long v = std::strtol(d->c_str(), &end, 10);
            if (end && *end == '\0' && v >= 900 && v <= 43200) rp.duration_seconds = static_cast<int>(v);
        }
        rp.external_id = setting(p, "external_id").value_or("");
        return rp;
    }

    Error profile_error(const std::string& p, const std::string& why) const {
        return make_error(ErrorKind::InvalidArgument, "AWS profile '" + safe(p) + "' (" + conf_path + ", " + cred_path +
                                                          "): " + why,
                          "BadProfile");
    }

    // The profile's role_arn (AssumeRole, or web identity with a token file); null when it has none.
    Result<ProviderPtr> assume_role(const std::string& p) {
        auto role_arn = setting(p, "role_arn");
        if (!role_arn) return ProviderPtr();
        if (setting(p, "mfa_serial"))
            return profile_error(p, "mfa_serial is not supported (a process cannot prompt for an MFA code); use a "
                                    "role without MFA or credential_process");
        if (auto tf = setting(p, "web_identity_token_file"))
            return refreshing(make_web_identity_source(sts, role_params(p, *role_arn), *tf));
        auto src_profile = setting(p, "source_profile");
        auto cred_source = setting(p, "credential_source");
        if (src_profile && cred_source)
            return profile_error(p, "has both source_profile and credential_source; keep one");
        ProviderPtr base;
        if (src_profile) {
            if (std::find(visiting.begin(), visiting.end(), *src_profile) != visiting.end() && *src_profile != p)
                return profile_error(p, "source_profile '" + safe(*src_profile) + "' leads back to itself (a cycle)");
            if (*src_profile == p) {
                // A profile may be its own source: its keys assume its role.
                auto k = file_keys(p);
                if (!k) return profile_error(p, "is its own source_profile but has no aws_access_key_id/aws_secret_access_key");
                base = std::make_shared<StaticCredentialsProvider>(std::move(*k));
            } else {
                if (!has_profile(*src_profile))
                    return profile_error(p, "source_profile '" + safe(*src_profile) + "' does not exist");
                auto b = source(*src_profile);
                if (!b) return std::move(b).error();
                base = *b;
            }
        } else if (cred_source) {
            if (*cred_source == "Environment") {
                auto k = env_keys();
                if (!k) return profile_error(p, "credential_source = Environment but AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY are not set");
                base = std::make_shared<StaticCredentialsProvider>(std::move(*k));
            } else if (*cred_source == "Ec2InstanceMetadata") {
                base = imds();
            } else if (*cred_source == "EcsContainer") {
                auto c = container();
                if (!c) return std::move(c).error();
                if (!*c) return profile_error(p, "credential_source = EcsContainer but AWS_CONTAINER_CREDENTIALS_RELATIVE_URI/_FULL_URI are not set");
                base = *c;
            } else {
                return profile_error(p, "credential_source '" + safe(*cred_source) +
                                            "' is not one of Environment, Ec2InstanceMetadata, EcsContainer");
            }
        } else {
            return profile_error(p, "role_arn needs source_profile, credential_source or web_identity_token_file");
        }
        return refreshing(make_assume_role_source(sts, role_params(p, *role_arn), std::move(base)));
    }

    // The credentials of a source_profile.
    Result<ProviderPtr> source(const std::string& p) {
        visiting.push_back(p);
        struct Pop {
            std::vector<std::string>& v;
            ~Pop() { v.pop_back(); }
        } pop{visiting};
        auto role = assume_role(p);
        if (!role || *role) return role;
        if (auto k = file_keys(p)) return ProviderPtr(std::make_shared<StaticCredentialsProvider>(std::move(*k)));
        if (auto cmd = setting(p, "credential_process"))
            return refreshing(make_process_source({*cmd, std::chrono::milliseconds(60'000), p}));
        return profile_error(p, "is used as a source_profile but holds no credentials (keys, role_arn or credential_process)");
    }
};

}  // namespace

Result<std::shared_ptr<CredentialsProvider>> default_credentials_provider(const EnvLookup& env,
                                                                          const std::string& profile,
                                                                          const ChainSettings& settings) {
    auto home = nonempty(env, "HOME");
    auto home_path = [&](const char* rel) { return (home ? *home : std::string(".")) + rel; };
    Chain c{env, settings, {}, {}, {}, {}, {}, {}};
    c.conf_path = nonempty(env, "AWS_CONFIG_FILE").value_or(home_path("/.aws/config"));
    c.cred_path = nonempty(env, "AWS_SHARED_CREDENTIALS_FILE").value_or(home_path("/.aws/credentials"));
    auto conf = read_ini_file(c.conf_path);
    auto creds = read_ini_file(c.cred_path);
    if (conf) c.conf = std::move(*conf);
    if (creds) c.creds = std::move(*creds);
    c.visiting.push_back(profile);

    c.sts.region = settings.region;
    c.sts.ca_bundle = settings.ca_bundle;
    c.sts.verify_tls = settings.verify_tls;
    if (auto e = nonempty(env, "AWS_ENDPOINT_URL_STS")) c.sts.endpoint = *e;
    else if (auto e2 = nonempty(env, "AWS_ENDPOINT_URL")) c.sts.endpoint = *e2;
    else if (auto e3 = c.setting(profile, "sts.endpoint_url")) c.sts.endpoint = *e3;
    else if (auto e4 = c.setting(profile, "endpoint_url")) c.sts.endpoint = *e4;
    else c.sts.endpoint = "https://sts." + settings.region + ".amazonaws.com";
    if (c.sts.endpoint.find("://") == std::string::npos) c.sts.endpoint = "https://" + c.sts.endpoint;

    std::string looked;
    // 1. Environment keys.
    if (auto k = c.env_keys()) return ProviderPtr(std::make_shared<StaticCredentialsProvider>(std::move(*k)));
    bool id = nonempty(env, "AWS_ACCESS_KEY_ID").has_value(), secret = nonempty(env, "AWS_SECRET_ACCESS_KEY").has_value();
    looked += id || secret ? std::string("environment (") + (id ? "AWS_SECRET_ACCESS_KEY" : "AWS_ACCESS_KEY_ID") +
                                 " is not set, the other one is)"
                           : std::string("environment (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY not set)");
    // 2. The profile's role.
    auto role = c.assume_role(profile);
    if (!role || *role) return role;
    // 3. Web identity from the environment.
    auto token_file = nonempty(env, "AWS_WEB_IDENTITY_TOKEN_FILE");
    auto role_arn = nonempty(env, "AWS_ROLE_ARN");
    if (token_file && role_arn) {
        AssumeRoleParams rp;
        rp.role_arn = *role_arn;
        rp.session_name = nonempty(env, "AWS_ROLE_SESSION_NAME").value_or("");
        return c.refreshing(make_web_identity_source(c.sts, std::move(rp), *token_file));
    }
    looked += token_file || role_arn ? std::string(", web identity (") +
                                           (token_file ? "AWS_ROLE_ARN" : "AWS_WEB_IDENTITY_TOKEN_FILE") +
                                           " is not set, the other one is)"
                                     : std::string(", web identity (AWS_WEB_IDENTITY_TOKEN_FILE not set)");
    // 4. The shared credentials file.
    if (auto k = c.keys_in(c.cred_section(profile), c.cred_path + " [" + profile + "]"))
        return ProviderPtr(std::make_shared<StaticCredentialsProvider>(std::move(*k)));
    looked += ", " + c.cred_path +
              (creds ? (c.cred_section(profile) ? " (profile [" + profile + "] has no key pair)"
                                                : " (no profile [" + profile + "])")
                     : std::string(" (not found)"));
    // 5. credential_process.
    if (auto cmd = c.setting(profile, "credential_process"))
        return c.refreshing(make_process_source({*cmd, std::chrono::milliseconds(60'000), profile}));
    // 6. The config file's keys.
    if (auto k = c.keys_in(c.conf_section(profile), c.conf_path + " [profile " + profile + "]"))
        return ProviderPtr(std::make_shared<StaticCredentialsProvider>(std::move(*k)));
    looked += ", " + c.conf_path +
              (conf ? (c.conf_section(profile) ? " (profile " + profile + " has no key pair, role_arn or credential_process)"
                                               : " (no profile " + profile + ")")
                    : std::string(" (not found)"));
    // 7. Container credentials.
    auto cont = c.container();
    if (!cont || *cont) return cont;
    looked += ", container credentials (AWS_CONTAINER_CREDENTIALS_RELATIVE_URI/_FULL_URI not set)";
    // 8. Instance metadata: the last resort, chosen without asking it (a
    // fetch happens at the first request, with short timeouts).
    if (!c.imds_disabled()) return c.imds();
    looked += ", EC2 instance metadata (AWS_EC2_METADATA_DISABLED=true)";
    return make_error(ErrorKind::Auth,
                      "no AWS credentials found; looked in: " + looked +
                          ". Set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or add the keys to the profile.",
                      "NoCredentials");
}

}  // namespace bottomless::s3
