// S3 operations, the retry loop and multipart uploads. See client.h.
#include "s3/client.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <mutex>
#include <random>
#include <set>
#include <thread>

#include "s3/credentials.h"
#include "s3/crypto.h"
#include "s3/log.h"
#include "s3/request_budget.h"
#include "s3/xml.h"

namespace bottomless::s3 {

// One logical S3 call; execute() signs and sends it, retrying as needed.
struct Client::Call {
    const char* op = "";          // for logs and stats: "PutObject"
    std::string method;
    std::string bucket;
    std::string key;              // empty for bucket-level calls
    QueryList query;
    HeaderList headers;
    http::BodySource* body = nullptr;
    std::string payload_sha256;   // hex; computed from body when empty
    http::BodySink* sink = nullptr;
    uint64_t max_body = http::kMaxSmallBody;  // cap on a 2xx body (see http::Request)
    std::optional<ByteRange> range;           // a ranged GET: its answer is checked
    int attempts = 0;             // out: how many were made
    std::string key_id;           // the access key id and source the last attempt was signed with (messages)
    std::string key_source;
};

namespace {

constexpr const char* kEmptySha256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

struct FdCloser {
    int fd = -1;
    ~FdCloser() {
        if (fd >= 0) ::close(fd);
    }
};

std::string errno_text(int err) { return std::strerror(err); }

// Hashes a body source (SHA-256 and MD5 in one pass).
Status hash_source(http::BodySource& src, std::string& sha_hex, std::string* md5_raw) {
    Hasher sha(Hasher::Algo::Sha256);
    std::optional<Hasher> md;
    if (md5_raw) md.emplace(Hasher::Algo::Md5);
    std::vector<char> buf(1 << 20);
    uint64_t off = 0, n = src.size();
    while (off < n) {
        int64_t r = src.read_at(off, buf.data(), buf.size());
        if (r <= 0) return make_error(ErrorKind::Io, "cannot read the upload body at offset " + std::to_string(off), "ReadError");
        sha.update(buf.data(), static_cast<size_t>(r));
        if (md) md->update(buf.data(), static_cast<size_t>(r));
        off += static_cast<uint64_t>(r);
    }
    std::string d = sha.finish();
    sha_hex = to_hex(reinterpret_cast<const unsigned char*>(d.data()), d.size());
    if (md5_raw) *md5_raw = md->finish();
    return {};
}

bool retryable_code(const std::string& code) {
    static constexpr std::string_view kCodes[] = {
        "SlowDown", "RequestTimeout", "InternalError", "ServiceUnavailable", "Throttling", "ThrottlingException",
        "BadDigest", "XAmzContentSHA256Mismatch", "IncompleteBody", "OperationAborted",
        "ConditionalRequestConflict", "RequestThrottled", "TooManyRequests",
    };
    return std::find(std::begin(kCodes), std::end(kCodes), code) != std::end(kCodes);
}

bool is_retryable(const Error& e) {
    switch (e.kind) {
    case ErrorKind::Transport:
    case ErrorKind::Throttled:
    case ErrorKind::Server: return true;
    default: return retryable_code(e.code);
    }
}

// Keys may come from a listing (a server's text): escaped for the terminal.
std::string describe_target(const std::string& bucket, const std::string& key) {
    return key.empty() ? "bucket '" + bucket + "'" : "s3://" + bucket + "/" + log::printable(key, 300);
}

thread_local std::chrono::steady_clock::time_point t_deadline = std::chrono::steady_clock::time_point::max();

std::string range_text(const ByteRange& r) {
    return "bytes " + std::to_string(r.offset) + "-" + (r.length ? std::to_string(r.offset + *r.length - 1) : "");
}

// "bytes FIRST-LAST/TOTAL" (TOTAL may be "*").
bool parse_content_range(std::string_view v, uint64_t& first, uint64_t& last) {
    if (v.rfind("bytes ", 0) != 0) return false;
    v.remove_prefix(6);
    auto num = [&](uint64_t& out, char end) {
        size_t i = 0;
        out = 0;
        while (i < v.size() && v[i] >= '0' && v[i] <= '9') {
            if (out > (UINT64_MAX - 9) / 10) return false;
            out = out * 10 + static_cast<uint64_t>(v[i++] - '0');
        }
        if (i == 0 || i >= v.size() || v[i] != end) return false;
        v.remove_prefix(i + 1);
        return true;
    };
    return num(first, '-') && num(last, '/') && first <= last;
}

class FileSink final : public http::BodySink {
public:
    explicit FileSink(int fd) : fd_(fd) {}
    bool write(const char* data, size_t n) override {
        while (n > 0) {
            ssize_t w = ::write(fd_, data, n);
            if (w < 0) {
                if (errno == EINTR) continue;
                err_ = errno;
                return false;
            }
            data += w;
            n -= static_cast<size_t>(w);
            written_ += static_cast<uint64_t>(w);
        }
        return true;
    }
    bool reset() override {
        written_ = 0;
        if (::ftruncate(fd_, 0) != 0 || ::lseek(fd_, 0, SEEK_SET) != 0) {
            err_ = errno;
            return false;
        }
        return true;
    }
    int err() const { return err_; }
    uint64_t written() const { return written_; }

private:
    int fd_;
    int err_ = 0;
    uint64_t written_ = 0;
};

class StringSink final : public http::BodySink {
public:
    explicit StringSink(std::string& s) : s_(s) {}
    bool write(const char* data, size_t n) override {
        s_.append(data, n);
        return true;
    }
    bool reset() override {
        s_.clear();
        return true;
    }

private:
    std::string& s_;
};

ObjectInfo info_from_headers(const std::string& key, const http::Response& r) {
    ObjectInfo o;
    o.key = key;
    o.etag = xml::strip_quotes(r.header("etag"));
    o.last_modified = r.header("last-modified");
    std::string cl = r.header("content-length");
    o.size = cl.empty() ? r.body_bytes : std::strtoull(cl.c_str(), nullptr, 10);
    for (const auto& [k, v] : r.headers)
        if (k.rfind("x-amz-meta-", 0) == 0) o.metadata.emplace_back(k.substr(11), v);
    return o;
}

void add_put_headers(HeaderList& h, const PutOptions& o) {
    if (o.if_none_match) h.emplace_back("If-None-Match", "*");
    if (!o.content_type.empty()) h.emplace_back("Content-Type", o.content_type);
    for (const auto& [k, v] : o.metadata) h.emplace_back("x-amz-meta-" + k, v);
}

}  // namespace

Client::Client(ClientConfig config)
    : config_(std::move(config)), signer_(config_.region, "s3"), clock_([] { return std::chrono::system_clock::now(); }) {
    timeouts_.connect = config_.connect_timeout;
    timeouts_.low_speed_time = config_.low_speed_time;
    timeouts_.low_speed_limit = config_.low_speed_limit;
    timeouts_.ca_bundle = config_.ca_bundle;
    timeouts_.verify_tls = config_.verify_tls;
    if (config_.part_size < (5ull << 20)) config_.part_size = 5ull << 20;
    if (config_.part_concurrency < 1) config_.part_concurrency = 1;
    pool_ = config_.connection_pool ? config_.connection_pool : std::make_shared<http::ConnectionPool>();
    credentials_ = config_.credentials_provider;
    if (!credentials_) credentials_ = std::make_shared<StaticCredentialsProvider>(config_.credentials);
    if (!config_.endpoint.empty()) {
        // Also for configurations built by hand, not through config_from_env.
        if (auto st = validate_endpoint(config_.endpoint); !st) {
            config_error_ = std::move(st).error();
        } else if (std::string sch = config_.endpoint.substr(0, 5); (sch == "http:" || sch == "HTTP:") &&
                   !is_loopback_host(endpoint_host(config_.endpoint))) {
            static std::atomic<bool> warned{false};
            if (!warned.exchange(true))
                log::warn("endpoint " + log::redact_url(config_.endpoint) +
                          " is plain http to a host other than this machine: request signatures, the access key id, "
                          "any session token and the data travel unencrypted and can be read or replayed on the "
                          "network; use https://");
        }
    }
}

DeadlineScope::DeadlineScope(std::chrono::steady_clock::time_point deadline) : saved_(t_deadline) {
    t_deadline = std::min(t_deadline, deadline);
}

DeadlineScope::~DeadlineScope() { t_deadline = saved_; }

std::chrono::steady_clock::time_point DeadlineScope::current() { return t_deadline; }

Client::~Client() = default;

Result<std::unique_ptr<Client>> Client::from_env(const EnvLookup& env) {
    auto cfg = config_from_env(env);
    if (!cfg) return std::move(cfg).error();
    return std::make_unique<Client>(std::move(cfg).value());
}

void Client::set_clock(std::function<std::chrono::system_clock::time_point()> clock) { clock_ = std::move(clock); }

ClientStats Client::stats() const {
    ClientStats s;
    s.requests = stats_.requests.load();
    s.retries = stats_.retries.load();
    s.puts = stats_.puts.load();
    s.gets = stats_.gets.load();
    s.lists = stats_.lists.load();
    s.deletes = stats_.deletes.load();
    s.heads = stats_.heads.load();
    s.bytes_sent = stats_.bytes_sent.load();
    s.bytes_received = stats_.bytes_received.load();
    s.conditional_writes_verified = conditional_mode_.load() == 2;
    s.conditional_conflicts = stats_.conditional_conflicts.load();
    s.throttled = stats_.throttled.load();
    s.throttle_wait_us = stats_.throttle_wait_us.load();
    return s;
}

std::string Client::host_for(const std::string& bucket) const {
    if (!config_.endpoint.empty()) {
        std::string ep = config_.endpoint;
        auto scheme = ep.find("://");
        std::string host = scheme == std::string::npos ? ep : ep.substr(scheme + 3);
        if (auto slash = host.find('/'); slash != std::string::npos) host.resize(slash);
        if (!config_.path_style && !bucket.empty()) host = bucket + "." + host;
        return host;
    }
    std::string host = "s3." + config_.region + ".amazonaws.com";
    if (!config_.path_style && !bucket.empty()) host = bucket + "." + host;
    return host;
}

std::string Client::base_url_for(const std::string& bucket) const {
    std::string scheme = "https://";
    if (!config_.endpoint.empty()) {
        auto pos = config_.endpoint.find("://");
        if (pos != std::string::npos) scheme = config_.endpoint.substr(0, pos + 3);
    }
    return scheme + host_for(bucket);
}

// The raw (unencoded) path; the signer and the URL encode it the same way.
std::string Client::path_for(const std::string& bucket, const std::string& key) const {
    std::string p;
    if (config_.path_style && !bucket.empty()) p = "/" + bucket;
    if (!key.empty()) p += "/" + key;
    if (p.empty()) p = "/";
    return p;
}

void Client::throttle() {
    std::chrono::steady_clock::duration waited{};
    if (config_.max_requests_per_second > 0) {
        auto interval = std::chrono::duration_cast<std::chrono::steady_clock::duration>(
            std::chrono::duration<double>(1.0 / config_.max_requests_per_second));
        std::chrono::steady_clock::time_point slot;
        auto now = std::chrono::steady_clock::now();
        {
            std::lock_guard lock(rate_mu_);
            slot = std::max(now, next_slot_);
            next_slot_ = slot + interval;
        }
        waited += slot - now;
        std::this_thread::sleep_until(slot);
    }
    // The shared budget after our own cap: a client over its own cap waits
    // on its own, without holding a turn the others could use.
    if (config_.request_budget) waited += config_.request_budget->take();
    if (waited > std::chrono::steady_clock::duration::zero()) {
        stats_.throttled.fetch_add(1, std::memory_order_relaxed);
        stats_.throttle_wait_us.fetch_add(
            static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::microseconds>(waited).count()),
            std::memory_order_relaxed);
    }
}

Error Client::error_from_response(const Call& call, const http::Response& resp) const {
    Error e;
    std::string target = describe_target(call.bucket, call.key);
    // Everything the server wrote is escaped before it can reach a terminal or a log.
    e.request_id = log::printable(resp.header("x-amz-request-id"), 128);
    if (!resp.callback_error.empty()) {
        e.kind = ErrorKind::Io;
        e.code = resp.callback_error == "out of memory" ? "OutOfMemory" : "CallbackFailed";
        e.message = std::string(call.op) + " " + target + ": the transfer was stopped: " + resp.callback_error;
        return e;
    }
    if (resp.too_large) {
        e.kind = ErrorKind::Corrupt;
        e.http_status = static_cast<int>(resp.status);
        if (call.range && resp.status == 200) {
            e.code = "RangeIgnored";
            e.message = std::string(call.op) + " " + target + ": the server answered a request for " +
                        range_text(*call.range) +
                        " with the whole object (HTTP 200): it ignores the Range header; use an S3 server that "
                        "supports ranged GETs";
        } else {
            e.code = "ResponseTooLarge";
            e.message = std::string(call.op) + " " + target + ": the server's answer is larger than the " +
                        std::to_string(call.max_body) +
                        " bytes this request can return (or its headers exceed " +
                        std::to_string(http::kMaxHeaderBytes) + " bytes); the transfer was stopped";
        }
        return e;
    }
    if (resp.status == 0) {
        e.kind = ErrorKind::Transport;
        e.code = http::curl_code_name(resp.curl_code);
        e.message = std::string(call.op) + " " + target + ": " + resp.curl_error;
        if (resp.sink_failed) {
            e.kind = ErrorKind::Io;
            e.message = std::string(call.op) + " " + target + ": cannot write the downloaded data locally";
        }
        return e;
    }
    e.http_status = static_cast<int>(resp.status);
    auto body = xml::parse_error(resp.body);
    if (body) {
        e.code = log::printable(body->code, 64);
        if (e.request_id.empty()) e.request_id = log::printable(body->request_id, 128);
    }
    std::string server_msg = body && !body->message.empty() ? " (server: " + log::printable(body->message, 512) + ")" : "";
    long s = resp.status;
    if (resp.curl_code != 0 && s >= 200 && s < 300) {
        // A 2xx whose body was cut short or whose transfer failed midway.
        e.kind = resp.sink_failed ? ErrorKind::Io : ErrorKind::Transport;
        e.code = http::curl_code_name(resp.curl_code);
        e.message = std::string(call.op) + " " + target + ": " + resp.curl_error;
        if (resp.sink_failed) e.message = std::string(call.op) + " " + target + ": cannot write the downloaded data locally";
        return e;
    }
    if (s == 404) {
        e.kind = ErrorKind::NotFound;
        if (e.code.empty()) e.code = call.key.empty() ? "NoSuchBucket" : "NoSuchKey";
        if (e.code == "NoSuchBucket")
            e.message = "bucket '" + call.bucket + "' does not exist at " +
                        (config_.endpoint.empty() ? "AWS region " + config_.region : config_.endpoint) +
                        ": check LIBSQL_BOTTOMLESS_BUCKET and the endpoint, or create it";
        else if (e.code == "NoSuchUpload")
            e.message = "multipart upload for " + target + " no longer exists (completed or aborted)";
        else
            e.message = target + " does not exist";
    } else if (s == 403 || s == 401 || e.code == "ExpiredToken" || e.code == "InvalidToken" ||
               e.code == "TokenRefreshRequired") {  // AWS answers an expired token with 400
        e.kind = ErrorKind::Auth;
        if (e.code.empty()) e.code = "AccessDenied";
        std::string who = "access key id '" + call.key_id + "' (from " +
                          (call.key_source.empty() ? "configuration" : call.key_source) + ")";
        if (e.code == "SignatureDoesNotMatch")
            e.message = "the server rejected the request signature: the secret access key does not match " + who +
                        "; check AWS_SECRET_ACCESS_KEY or the profile's aws_secret_access_key";
        else if (e.code == "InvalidAccessKeyId")
            e.message = "the server does not know " + who + "; check AWS_ACCESS_KEY_ID, AWS_PROFILE and the endpoint";
        else if (e.code == "RequestTimeTooSkewed")
            e.message = "the system clock differs too much from the server's; fix the clock (NTP) and retry";
        else if (e.code == "ExpiredToken" || e.code == "InvalidToken")
            e.message = "the session token of " + who +
                        " was rejected; refresh AWS_SESSION_TOKEN or the profile's credentials";
        else
            e.message = std::string(call.op) + " on " + target + " was denied for " + who +
                        "; check the credentials' permissions";
    } else if (s == 412) {
        e.kind = ErrorKind::Precondition;
        if (e.code.empty()) e.code = "PreconditionFailed";
        e.message = target + " already exists or changed (conditional request refused)";
    } else if (s == 429 || e.code == "SlowDown" || e.code == "Throttling" || e.code == "RequestThrottled") {
        e.kind = ErrorKind::Throttled;
        if (e.code.empty()) e.code = "TooManyRequests";
        e.message = "the server asked to slow down";
    } else if (s >= 500) {
        e.kind = ErrorKind::Server;
        if (e.code.empty()) e.code = "HTTP" + std::to_string(s);
        e.message = std::string(call.op) + " " + target + ": server error";
    } else if (s == 301 || s == 307 || e.code == "PermanentRedirect" || e.code == "AuthorizationHeaderMalformed") {
        e.kind = ErrorKind::InvalidArgument;
        if (e.code.empty()) e.code = "PermanentRedirect";
        e.message = "bucket '" + call.bucket + "' is not in region " + config_.region +
                    " or not at this endpoint; set AWS_REGION to the bucket's region";
    } else {
        e.kind = ErrorKind::InvalidArgument;
        if (e.code.empty()) e.code = "HTTP" + std::to_string(s);
        e.message = std::string(call.op) + " " + target + " was rejected";
    }
    e.message += server_msg;
    return e;
}

Result<http::Response> Client::execute(Call& call) {
    if (config_error_) return *config_error_;
    if (!call.bucket.empty()) {
        if (auto st = validate_bucket_name(call.bucket); !st) return std::move(st).error();
    }
    if (call.payload_sha256.empty()) {
        if (call.body) {
            if (auto st = hash_source(*call.body, call.payload_sha256, nullptr); !st) return std::move(st).error();
        } else {
            call.payload_sha256 = kEmptySha256;
        }
    }
    const std::string host = host_for(call.bucket);
    const std::string raw_path = path_for(call.bucket, call.key);
    std::string url = base_url_for(call.bucket) + uri_encode(raw_path, false);
    std::string qs = Signer::canonical_query(call.query);
    if (!qs.empty()) url += "?" + qs;

    thread_local std::minstd_rand rng{std::random_device{}()};
    const auto start = std::chrono::steady_clock::now();
    // Every attempt ends by the retry budget's end (stretched by the
    // transfer's size, see http::Request) and never after the caller's
    // DeadlineScope: no request can be held open forever by a slow server.
    const auto budget_end = start + config_.retry.max_elapsed;
    const auto hard_deadline = DeadlineScope::current();
    auto deadline_error = [&](const Error* last) {
        Error e = make_error(ErrorKind::Cancelled,
                             std::string(call.op) + " " + describe_target(call.bucket, call.key) +
                                 ": the caller's deadline passed" +
                                 (last ? " after " + std::to_string(call.attempts - 1) + " attempt(s); last error: " +
                                             last->message
                                       : std::string(" before the request could be sent")),
                             "DeadlineExceeded");
        return e;
    };
    Error last;
    bool refreshed_after_refusal = false;
    for (call.attempts = 1;; ++call.attempts) {
        throttle();
        if (std::chrono::steady_clock::now() >= hard_deadline) return deadline_error(call.attempts > 1 ? &last : nullptr);
        if (call.sink && call.attempts > 1 && !call.sink->reset())
            return make_error(ErrorKind::Io, std::string(call.op) + ": cannot reset the local output before a retry",
                              "ResetFailed");
        SigningRequest sreq;
        sreq.method = call.method;
        sreq.path = raw_path;
        sreq.query = call.query;
        sreq.headers = call.headers;
        sreq.headers.emplace_back("Host", host);
        sreq.payload_hash = call.payload_sha256;
        // The current credentials for this attempt: a refresh swaps the
        // provider's pointer, this attempt keeps the ones it signed with.
        auto creds = credentials_->current();
        if (!creds) return std::move(creds).error();
        std::shared_ptr<const Credentials> used = std::move(creds).value();
        call.key_id = used->access_key_id;
        call.key_source = used->source;
        SigningResult signed_req = signer_.sign(sreq, *used, clock_());

        http::Request req;
        req.method = call.method;
        req.url = url;
        req.headers = std::move(sreq.headers);
        for (auto& h : signed_req.headers_to_add) req.headers.push_back(std::move(h));
        req.body = call.body;
        req.sink = call.sink;
        req.max_body_bytes = call.max_body;
        req.deadline = std::min(budget_end, hard_deadline);
        req.hard_deadline = hard_deadline;
        req.min_rate = config_.min_transfer_rate;

        stats_.requests.fetch_add(1, std::memory_order_relaxed);
        if (call.attempts > 1) stats_.retries.fetch_add(1, std::memory_order_relaxed);
        http::Response resp = http::perform(*pool_, req, timeouts_);
        // The Authorization header and the signature die with req; wipe the token copy.
        for (auto& [k, v] : req.headers)
            if (k == "Authorization" || k == "X-Amz-Security-Token") secure_wipe(v);
        if (call.body) stats_.bytes_sent.fetch_add(call.body->size(), std::memory_order_relaxed);
        stats_.bytes_received.fetch_add(resp.body_bytes, std::memory_order_relaxed);

        if (log::enabled(log::Level::Trace))
            log::trace(std::string(call.op) + " " + call.method + " " + log::redact_url(url) + " attempt " +
                       std::to_string(call.attempts) + " -> " +
                       (resp.status ? "HTTP " + std::to_string(resp.status) : http::curl_code_name(resp.curl_code)) +
                       " (" + std::to_string(resp.body_bytes) + " bytes)");

        bool ok = resp.curl_code == 0 && resp.status >= 200 && resp.status < 300;
        if (ok) return resp;
        last = error_from_response(call, resp);
        if (resp.timed_out && std::chrono::steady_clock::now() >= hard_deadline) return deadline_error(&last);
        // Temporary credentials the server refuses (expired early, clock
        // skew, revoked; Ceph RGW says AccessDenied for an expired token):
        // fetch new ones and try once more at once. The provider honours this
        // at most once per few seconds, so a real permission problem does not
        // turn every request into a credentials fetch.
        if (last.kind == ErrorKind::Auth && !refreshed_after_refusal && !used->session_token.empty() &&
            (last.code == "ExpiredToken" || last.code == "InvalidToken" || last.code == "TokenRefreshRequired" ||
             last.code == "InvalidAccessKeyId" || last.code == "AccessDenied") &&
            credentials_->invalidate(*used)) {
            refreshed_after_refusal = true;
            log::info(std::string(call.op) + " " + describe_target(call.bucket, call.key) + ": " + last.code +
                      " for temporary credentials from " + call.key_source + "; fetching new ones");
            continue;
        }
        if (!is_retryable(last)) return last;

        auto elapsed = std::chrono::steady_clock::now() - start;
        int shift = std::min(call.attempts - 1, 20);
        auto cap = std::min<std::chrono::milliseconds>(config_.retry.max_delay, config_.retry.base_delay * (1ll << shift));
        auto delay = std::chrono::milliseconds(
            std::uniform_int_distribution<long long>(0, std::max<long long>(cap.count(), 0))(rng));
        if (std::chrono::steady_clock::now() + delay >= hard_deadline) return deadline_error(&last);
        if (call.attempts >= config_.retry.max_attempts || elapsed + delay > config_.retry.max_elapsed) {
            auto secs = std::chrono::duration_cast<std::chrono::milliseconds>(elapsed).count() / 1000.0;
            char buf[32];
            std::snprintf(buf, sizeof buf, "%.1f", secs);
            last.message = "gave up after " + std::to_string(call.attempts) + " attempts over " + buf +
                           " s; last error: " + last.message + ". Check that the S3 endpoint is reachable and healthy";
            log::warn(std::string(call.op) + " " + describe_target(call.bucket, call.key) + ": " + last.describe());
            return last;
        }
        log::debug(std::string(call.op) + " " + describe_target(call.bucket, call.key) + " will retry in " +
                   std::to_string(delay.count()) + " ms: " + last.describe());
        std::this_thread::sleep_for(delay);
    }
}

// ---- buckets ----------------------------------------------------------------

Status Client::create_bucket(const std::string& bucket) {
    Call c;
    c.op = "CreateBucket";
    c.method = "PUT";
    c.bucket = bucket;
    std::string body;
    http::MemorySource src(body);
    if (config_.region != "us-east-1" && config_.endpoint.empty()) {
        body = "<CreateBucketConfiguration xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\"><LocationConstraint>" +
               config_.region + "</LocationConstraint></CreateBucketConfiguration>";
        src = http::MemorySource(body);
        c.body = &src;
    }
    stats_.puts.fetch_add(1, std::memory_order_relaxed);
    auto r = execute(c);
    if (r) return {};
    if (r.error().code == "BucketAlreadyOwnedByYou") return {};
    if (r.error().code == "BucketAlreadyExists") {
        Error e = r.error();
        e.message = "bucket '" + bucket + "' exists and belongs to someone else; choose another bucket name";
        return e;
    }
    return std::move(r).error();
}

Status Client::head_bucket(const std::string& bucket) {
    Call c;
    c.op = "HeadBucket";
    c.method = "HEAD";
    c.bucket = bucket;
    stats_.heads.fetch_add(1, std::memory_order_relaxed);
    auto r = execute(c);
    if (!r) {
        Error e = std::move(r).error();
        if (e.kind == ErrorKind::NotFound) {
            e.code = "NoSuchBucket";
            e.message = "bucket '" + bucket + "' does not exist at " +
                        (config_.endpoint.empty() ? "AWS region " + config_.region : config_.endpoint) +
                        ": check LIBSQL_BOTTOMLESS_BUCKET and the endpoint, or create it";
        }
        return e;
    }
    return {};
}

Status Client::delete_bucket(const std::string& bucket) {
    Call c;
    c.op = "DeleteBucket";
    c.method = "DELETE";
    c.bucket = bucket;
    stats_.deletes.fetch_add(1, std::memory_order_relaxed);
    auto r = execute(c);
    if (!r) return std::move(r).error();
    return {};
}

Status Client::delete_bucket_and_objects(const std::string& bucket) {
    auto all = list_all(bucket, "");
    if (!all) return std::move(all).error();
    std::vector<std::string> keys;
    keys.reserve(all->size());
    for (const auto& o : *all) keys.push_back(o.key);
    if (!keys.empty()) {
        auto out = delete_objects(bucket, keys);
        if (!out) return std::move(out).error();
        if (!out->failed.empty())
            return make_error(ErrorKind::Server,
                              "cannot delete " + log::printable(out->failed[0].key, 300) + ": " +
                                  log::printable(out->failed[0].message, 512),
                              log::printable(out->failed[0].code, 64));
    }
    return delete_bucket(bucket);
}

// ---- single objects ---------------------------------------------------------

Result<PutResult> Client::check_lost_put(const std::string& bucket, const std::string& key, const std::string& md5_hex,
                                         uint64_t size) {
    // A conditional create was retried and refused: if the first attempt stored
    // the object and only its response was lost, the object is ours (same MD5).
    auto head = head_object(bucket, key);
    if (head && head->etag == md5_hex && head->size == size) {
        log::info("PutObject s3://" + bucket + "/" + key + ": response was lost but the object stored is ours");
        PutResult pr;
        pr.etag = head->etag;
        pr.size = size;
        pr.recovered = true;
        return pr;
    }
    Error e = make_error(ErrorKind::Precondition, "s3://" + bucket + "/" + key + " already exists with other content",
                         "PreconditionFailed");
    e.http_status = 412;
    stats_.conditional_conflicts.fetch_add(1, std::memory_order_relaxed);
    return e;
}

Result<bool> Client::conditional_writes_honoured(const std::string& bucket, const std::string& key) {
    using Mode = ClientConfig::ConditionalWrites;
    if (config_.conditional_writes == Mode::Trust) return true;
    if (config_.conditional_writes == Mode::Verify) {
        conditional_mode_.store(2);
        return false;
    }
    if (int m = conditional_mode_.load(); m != 0) return m == 1;
    std::lock_guard lock(probe_mu_);
    if (int m = conditional_mode_.load(); m != 0) return m == 1;
    // Next to the real key, so a policy that allows writing there allows the
    // probe; the name is no segment or snapshot key, so nothing reads it.
    size_t slash = key.rfind('/');
    std::string probe = (slash == std::string::npos ? std::string() : key.substr(0, slash + 1)) +
                        "probe-if-none-match-" + to_hex(reinterpret_cast<const unsigned char*>(random_bytes(8).data()), 8);
    PutOptions create_only;
    create_only.if_none_match = true;
    auto put_once = [&]() -> Result<http::Response> {
        std::string body = "bottomless If-None-Match probe\n";
        http::MemorySource src(body);
        Call c;
        c.op = "PutObject";
        c.method = "PUT";
        c.bucket = bucket;
        c.key = probe;
        c.body = &src;
        c.headers.emplace_back("Content-MD5", base64(md5(body)));
        add_put_headers(c.headers, create_only);
        stats_.puts.fetch_add(1, std::memory_order_relaxed);
        return execute(c);
    };
    auto first = put_once();
    if (!first) return std::move(first).error();
    auto second = put_once();
    bool honoured;
    if (!second && second.error().kind == ErrorKind::Precondition) honoured = true;
    else if (second) honoured = false;
    else return std::move(second).error();  // unknown yet: asked again with the next create-only PUT
    if (auto d = delete_object(bucket, probe); !d)
        log::warn("cannot delete the probe object s3://" + bucket + "/" + probe + " (harmless, nothing reads it): " +
                  d.error().describe());
    if (!honoured)
        log::warn("the S3 server at " + (config_.endpoint.empty() ? std::string("AWS") : log::redact_url(config_.endpoint)) +
                  " ignores If-None-Match: * (a second create of a key succeeded): every segment upload is checked "
                  "with a HEAD before and after it, so an existing object is never overwritten (docs/PROVIDERS.md)");
    conditional_mode_.store(honoured ? 1 : 2);
    return honoured;
}

Result<http::Response> Client::send_put(Call& c, const std::string& bucket, const std::string& key,
                                        http::BodySource& body, const std::string& sha256_hex,
                                        const std::string& md5_b64, const PutOptions& options) {
    c.op = "PutObject";
    c.method = "PUT";
    c.bucket = bucket;
    c.key = key;
    c.body = &body;
    c.payload_sha256 = sha256_hex;
    c.headers.emplace_back("Content-MD5", md5_b64);
    add_put_headers(c.headers, options);
    stats_.puts.fetch_add(1, std::memory_order_relaxed);
    return execute(c);
}

Result<PutResult> Client::put_verified(const std::string& bucket, const std::string& key, http::BodySource& body,
                                       const std::string& sha256_hex, const std::string& md5_b64,
                                       const std::string& md5_hex, const PutOptions& options) {
    // The server would overwrite: look first. Our own object (same MD5 and
    // size: an earlier attempt whose answer was lost) is success; any other
    // object is a refusal, as a 412 would be.
    auto before = head_object(bucket, key);
    if (before) return check_lost_put(bucket, key, md5_hex, body.size());
    if (before.error().kind != ErrorKind::NotFound) return std::move(before).error();
    Call c;
    auto r = send_put(c, bucket, key, body, sha256_hex, md5_b64, options);
    if (!r) return std::move(r).error();
    // Another writer may have put its object between our HEAD and our PUT
    // (ours replaced it: it learns so from its own check) or after our PUT
    // (theirs replaced ours). Only an object that is still ours is success;
    // an error here leaves the outcome open, and the caller's retry's HEAD
    // settles it.
    auto after = head_object(bucket, key);
    if (!after) return std::move(after).error();
    if (after->etag != md5_hex || after->size != body.size()) {
        stats_.conditional_conflicts.fetch_add(1, std::memory_order_relaxed);
        Error e = make_error(ErrorKind::Precondition,
                             "s3://" + bucket + "/" + key +
                                 " was written by another writer at the same time (the server ignores If-None-Match)",
                             "PreconditionFailed");
        e.http_status = 412;
        return e;
    }
    PutResult pr;
    pr.etag = after->etag;
    pr.size = body.size();
    return pr;
}

Result<PutResult> Client::put_single(const std::string& bucket, const std::string& key, http::BodySource& body,
                                     const std::string& sha256_hex, const std::string& md5_b64,
                                     const std::string& md5_hex, const PutOptions& options) {
    if (options.if_none_match) {
        auto honoured = conditional_writes_honoured(bucket, key);
        if (!honoured) return std::move(honoured).error();
        if (!*honoured) return put_verified(bucket, key, body, sha256_hex, md5_b64, md5_hex, options);
    }
    Call c;
    auto r = send_put(c, bucket, key, body, sha256_hex, md5_b64, options);
    if (!r) {
        if (options.if_none_match && c.attempts > 1 && r.error().kind == ErrorKind::Precondition)
            return check_lost_put(bucket, key, md5_hex, body.size());
        if (options.if_none_match && r.error().kind == ErrorKind::Precondition)
            stats_.conditional_conflicts.fetch_add(1, std::memory_order_relaxed);
        return std::move(r).error();
    }
    PutResult pr;
    pr.etag = xml::strip_quotes(r->header("etag"));
    pr.size = body.size();
    return pr;
}

Result<PutResult> Client::put_object(const std::string& bucket, const std::string& key, std::string_view data,
                                     const PutOptions& options) {
    http::MemorySource src(data);
    Md5Digest m = md5(data);
    return put_single(bucket, key, src, sha256_hex(data), base64(m), to_hex(m), options);
}

Result<PutResult> Client::put_object_from_file(const std::string& bucket, const std::string& key,
                                               const std::string& path, const PutOptions& options) {
    FdCloser f{::open(path.c_str(), O_RDONLY | O_CLOEXEC)};
    if (f.fd < 0) return make_error(ErrorKind::Io, "cannot open " + path + ": " + errno_text(errno), "OpenFailed");
    struct stat st{};
    if (::fstat(f.fd, &st) != 0) return make_error(ErrorKind::Io, "cannot stat " + path + ": " + errno_text(errno), "StatFailed");
    uint64_t size = static_cast<uint64_t>(st.st_size);

    if (size <= config_.multipart_threshold) {
        http::FileRangeSource src(f.fd, 0, size);
        std::string sha_hex, md5_raw;
        if (auto s = hash_source(src, sha_hex, &md5_raw); !s) return std::move(s).error();
        auto* mp = reinterpret_cast<const unsigned char*>(md5_raw.data());
        return put_single(bucket, key, src, sha_hex, base64(mp, md5_raw.size()), to_hex(mp, md5_raw.size()), options);
    }

    auto upload = create_multipart_upload(bucket, key, options);
    if (!upload) return std::move(upload).error();
    const std::string upload_id = *upload;
    const uint64_t part_size = config_.part_size;
    const int nparts = static_cast<int>((size + part_size - 1) / part_size);
    std::vector<CompletedPart> parts(static_cast<size_t>(nparts));
    std::atomic<int> next{0};
    std::mutex err_mu;  // guards first_error
    std::optional<Error> first_error;

    auto worker = [&] {
        std::string buf;
        for (;;) {
            {
                std::lock_guard lock(err_mu);
                if (first_error) return;
            }
            int i = next.fetch_add(1);
            if (i >= nparts) return;
            uint64_t off = static_cast<uint64_t>(i) * part_size;
            size_t len = static_cast<size_t>(std::min<uint64_t>(part_size, size - off));
            buf.resize(len);
            size_t got = 0;
            while (got < len) {
                ssize_t r = ::pread(f.fd, buf.data() + got, len - got, static_cast<off_t>(off + got));
                if (r < 0 && errno == EINTR) continue;
                if (r <= 0) {
                    std::lock_guard lock(err_mu);
                    if (!first_error)
                        first_error = make_error(ErrorKind::Io, "cannot read " + path + " at offset " + std::to_string(off + got) +
                                                                    (r < 0 ? ": " + errno_text(errno) : ": file shrank"),
                                                 "ReadError");
                    return;
                }
                got += static_cast<size_t>(r);
            }
            auto part = upload_part(bucket, key, upload_id, i + 1, buf);
            if (!part) {
                std::lock_guard lock(err_mu);
                if (!first_error) first_error = std::move(part).error();
                return;
            }
            parts[static_cast<size_t>(i)] = *part;
        }
    };
    int nthreads = std::min(config_.part_concurrency, nparts);
    std::vector<std::thread> threads;
    for (int t = 1; t < nthreads; ++t) threads.emplace_back(worker);
    worker();
    for (auto& t : threads) t.join();
    if (first_error) {
        (void)abort_multipart_upload(bucket, key, upload_id);
        return *first_error;
    }
    auto done = complete_multipart_upload(bucket, key, upload_id, std::move(parts), size, options);
    if (!done) {
        (void)abort_multipart_upload(bucket, key, upload_id);
        return std::move(done).error();
    }
    return done;
}

Status Client::check_range_answer(const Call& call, const http::Response& resp, const ByteRange& range) const {
    const std::string what = std::string(call.op) + " " + describe_target(call.bucket, call.key) + ": ";
    auto bad = [&](const std::string& code, const std::string& why) {
        Error e = make_error(ErrorKind::Corrupt, what + why, code);
        e.http_status = static_cast<int>(resp.status);
        e.request_id = log::printable(resp.header("x-amz-request-id"), 128);
        return e;
    };
    if (resp.status == 200) {
        // A server without Range support sends the whole object. That is the
        // answer only when the range starts at 0 and the object fits in it
        // (the cap already refused anything longer).
        if (range.offset == 0) return {};
        return bad("RangeIgnored", "the server answered a request for " + range_text(range) +
                                       " with the whole object (HTTP 200): it ignores the Range header; use an S3 "
                                       "server that supports ranged GETs");
    }
    if (resp.status != 206)
        return bad("BadContentRange", "a ranged GET was answered with HTTP " + std::to_string(resp.status));
    uint64_t first = 0, last = 0;
    std::string cr = resp.header("content-range");
    if (!parse_content_range(cr, first, last))
        return bad("BadContentRange", "the answer to a ranged GET has no valid Content-Range ('" +
                                          log::printable(cr, 100) + "')");
    // The first byte must be the one asked for; the last may come early only
    // at the end of the object (a range past it is clamped by S3).
    bool ok = first == range.offset && last - first + 1 == resp.body_bytes;
    if (ok && range.length) ok = last <= range.offset + *range.length - 1;
    if (!ok)
        return bad("BadContentRange", "asked for " + range_text(range) + ", the server sent '" +
                                          log::printable(cr, 100) + "' with " + std::to_string(resp.body_bytes) +
                                          " bytes");
    return {};
}

Result<ObjectInfo> Client::get_object_to_sink(const std::string& bucket, const std::string& key, http::BodySink& sink,
                                              std::optional<ByteRange> range, uint64_t max_bytes) {
    Call c;
    c.op = "GetObject";
    c.method = "GET";
    c.bucket = bucket;
    c.key = key;
    c.sink = &sink;
    c.max_body = max_bytes ? max_bytes : UINT64_MAX;
    if (range) {
        std::string v = "bytes=" + std::to_string(range->offset) + "-";
        if (range->length) {
            if (*range->length == 0) return ObjectInfo{key, 0, {}, {}, {}};
            v += std::to_string(range->offset + *range->length - 1);
            c.max_body = std::min(c.max_body, *range->length);
        }
        c.headers.emplace_back("Range", v);
        c.range = range;
    }
    stats_.gets.fetch_add(1, std::memory_order_relaxed);
    auto r = execute(c);
    if (!r) return std::move(r).error();
    if (range) {
        if (auto st = check_range_answer(c, *r, *range); !st) return std::move(st).error();
    }
    ObjectInfo info = info_from_headers(key, *r);
    // curl already fails on a short body when Content-Length is known; this
    // catches a server that sent none.
    std::string cl = r->header("content-length");
    if (!cl.empty() && std::strtoull(cl.c_str(), nullptr, 10) != r->body_bytes)
        return make_error(ErrorKind::Transport, "GetObject " + describe_target(bucket, key) + ": body shorter than Content-Length",
                          "ShortBody");
    info.size = r->body_bytes;
    return info;
}

Result<std::string> Client::get_object(const std::string& bucket, const std::string& key,
                                       std::optional<ByteRange> range, ObjectInfo* info, uint64_t max_bytes) {
    std::string out;
    StringSink sink(out);
    auto r = get_object_to_sink(bucket, key, sink, range, max_bytes ? max_bytes : config_.max_get_bytes);
    if (!r) return std::move(r).error();
    if (info) *info = std::move(r).value();
    return out;
}

namespace {

// Writes a ranged download at its offset in a shared file.
class PwriteSink final : public http::BodySink {
public:
    PwriteSink(int fd, uint64_t offset) : fd_(fd), base_(offset) {}
    bool write(const char* data, size_t n) override {
        while (n > 0) {
            ssize_t w = ::pwrite(fd_, data, n, static_cast<off_t>(base_ + written_));
            if (w < 0) {
                if (errno == EINTR) continue;
                err_ = errno;
                return false;
            }
            data += w;
            n -= static_cast<size_t>(w);
            written_ += static_cast<uint64_t>(w);
        }
        return true;
    }
    bool reset() override {
        written_ = 0;
        return true;
    }
    int err() const { return err_; }

private:
    int fd_;
    uint64_t base_;
    uint64_t written_ = 0;
    int err_ = 0;
};

}  // namespace

Result<ObjectInfo> Client::get_object_to_file(const std::string& bucket, const std::string& key,
                                              const std::string& path) {
    // Large objects come down as parallel ranged GETs pinned to one version
    // by If-Match, each written at its offset.
    auto head = head_object(bucket, key);
    if (!head) return std::move(head).error();
    const uint64_t size = head->size;

    std::string tmp = path + ".part";
    FdCloser f{::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644)};
    if (f.fd < 0) return make_error(ErrorKind::Io, "cannot create " + tmp + ": " + errno_text(errno), "OpenFailed");
    auto fail = [&](Error e) -> Result<ObjectInfo> {
        ::unlink(tmp.c_str());
        return e;
    };

    if (size <= config_.multipart_threshold || head->etag.empty()) {
        FileSink sink(f.fd);
        // The HEAD said how large the object is: nothing larger is written.
        auto r = get_object_to_sink(bucket, key, sink, std::nullopt, std::max<uint64_t>(size, 1));
        if (!r) {
            Error e = std::move(r).error();
            if (sink.err()) e.message += " (" + tmp + ": " + errno_text(sink.err()) + ")";
            return fail(std::move(e));
        }
    } else {
        const uint64_t chunk = config_.part_size;
        const uint64_t nchunks = (size + chunk - 1) / chunk;
        std::atomic<uint64_t> next{0};
        std::mutex err_mu;  // guards first_error
        std::optional<Error> first_error;
        auto worker = [&] {
            for (uint64_t i; (i = next.fetch_add(1)) < nchunks;) {
                {
                    std::lock_guard lock(err_mu);
                    if (first_error) return;
                }
                uint64_t off = i * chunk;
                uint64_t len = std::min(chunk, size - off);
                PwriteSink sink(f.fd, off);
                Call c;
                c.op = "GetObject";
                c.method = "GET";
                c.bucket = bucket;
                c.key = key;
                c.sink = &sink;
                c.headers.emplace_back("Range", "bytes=" + std::to_string(off) + "-" + std::to_string(off + len - 1));
                c.headers.emplace_back("If-Match", "\"" + head->etag + "\"");
                c.range = ByteRange{off, len};
                c.max_body = len;
                stats_.gets.fetch_add(1, std::memory_order_relaxed);
                auto r = execute(c);
                std::optional<Error> e;
                if (!r) e = std::move(r).error();
                else if (auto st = check_range_answer(c, *r, *c.range); !st) e = std::move(st).error();
                else if (r->body_bytes != len)
                    e = make_error(ErrorKind::Transport, "GetObject s3://" + bucket + "/" + key + ": range at " +
                                                             std::to_string(off) + " came back short", "ShortBody");
                if (e) {
                    if (e->kind == ErrorKind::Precondition)
                        e->message = "s3://" + bucket + "/" + key + " changed during the download; retry";
                    std::lock_guard lock(err_mu);
                    if (!first_error) first_error = std::move(e);
                    return;
                }
            }
        };
        int nthreads = static_cast<int>(std::min<uint64_t>(nchunks, static_cast<uint64_t>(std::max(config_.part_concurrency, 4))));
        std::vector<std::thread> threads;
        for (int t = 1; t < nthreads; ++t) threads.emplace_back(worker);
        worker();
        for (auto& t : threads) t.join();
        if (first_error) return fail(std::move(*first_error));
    }
    if (::fsync(f.fd) != 0 || ::close(f.fd) != 0) {
        int err = errno;
        f.fd = -1;
        return fail(make_error(ErrorKind::Io, "cannot write " + tmp + ": " + errno_text(err), "WriteFailed"));
    }
    f.fd = -1;
    if (::rename(tmp.c_str(), path.c_str()) != 0) {
        int err = errno;
        return fail(make_error(ErrorKind::Io, "cannot rename " + tmp + " to " + path + ": " + errno_text(err), "RenameFailed"));
    }
    return head;
}

Result<ObjectInfo> Client::head_object(const std::string& bucket, const std::string& key) {
    Call c;
    c.op = "HeadObject";
    c.method = "HEAD";
    c.bucket = bucket;
    c.key = key;
    stats_.heads.fetch_add(1, std::memory_order_relaxed);
    auto r = execute(c);
    if (!r) return std::move(r).error();
    return info_from_headers(key, *r);
}

Status Client::delete_object(const std::string& bucket, const std::string& key) {
    Call c;
    c.op = "DeleteObject";
    c.method = "DELETE";
    c.bucket = bucket;
    c.key = key;
    stats_.deletes.fetch_add(1, std::memory_order_relaxed);
    auto r = execute(c);
    if (!r) return std::move(r).error();
    return {};
}

Result<DeleteOutcome> Client::delete_objects(const std::string& bucket, const std::vector<std::string>& keys) {
    DeleteOutcome all;
    for (size_t i = 0; i < keys.size(); i += 1000) {
        std::vector<std::string> batch(keys.begin() + static_cast<std::ptrdiff_t>(i),
                                       keys.begin() + static_cast<std::ptrdiff_t>(std::min(keys.size(), i + 1000)));
        std::string body = xml::build_delete(batch, /*quiet=*/true);
        Md5Digest m = md5(body);
        http::MemorySource src(body);
        Call c;
        c.op = "DeleteObjects";
        c.method = "POST";
        c.bucket = bucket;
        c.query.emplace_back("delete", "");
        c.body = &src;
        c.headers.emplace_back("Content-MD5", base64(m));
        c.headers.emplace_back("Content-Type", "application/xml");
        stats_.deletes.fetch_add(1, std::memory_order_relaxed);
        auto r = execute(c);
        if (!r) return std::move(r).error();
        auto parsed = xml::parse_delete_result(r->body);
        if (!parsed) return std::move(parsed).error();
        // Quiet mode lists only failures; everything else in the batch is gone.
        std::vector<std::string> failed_keys;
        for (auto& f : parsed->failed) {
            failed_keys.push_back(f.key);
            all.failed.push_back(std::move(f));
        }
        for (auto& k : batch)
            if (std::find(failed_keys.begin(), failed_keys.end(), k) == failed_keys.end()) all.deleted.push_back(k);
    }
    return all;
}

// ---- listing ----------------------------------------------------------------

Result<ListPage> Client::list_objects_page(const std::string& bucket, const ListRequest& request) {
    Call c;
    c.op = "ListObjectsV2";
    c.method = "GET";
    c.bucket = bucket;
    c.query.emplace_back("list-type", "2");
    if (!request.prefix.empty()) c.query.emplace_back("prefix", request.prefix);
    if (!request.delimiter.empty()) c.query.emplace_back("delimiter", request.delimiter);
    if (!request.start_after.empty()) c.query.emplace_back("start-after", request.start_after);
    if (!request.continuation_token.empty()) c.query.emplace_back("continuation-token", request.continuation_token);
    if (request.max_keys > 0 && request.max_keys != 1000) c.query.emplace_back("max-keys", std::to_string(request.max_keys));
    stats_.lists.fetch_add(1, std::memory_order_relaxed);
    auto r = execute(c);
    if (!r) return std::move(r).error();
    auto page = xml::parse_list_objects_v2(r->body);
    if (!page) return page;
    // A server that ignores `prefix` (or a hostile one) must not hand a
    // caller keys of another database: they are dropped here, once, for all.
    const std::string& prefix = request.prefix;
    auto outside = [&](const std::string& k) { return k.compare(0, prefix.size(), prefix) != 0; };
    std::string example;
    auto note = [&](const std::string& k) {
        if (example.empty()) example = k;
        ++page->dropped;
    };
    auto& objs = page->objects;
    objs.erase(std::remove_if(objs.begin(), objs.end(),
                              [&](const ObjectInfo& o) {
                                  if (!outside(o.key)) return false;
                                  note(o.key);
                                  return true;
                              }),
               objs.end());
    auto& cps = page->common_prefixes;
    cps.erase(std::remove_if(cps.begin(), cps.end(),
                             [&](const std::string& p) {
                                 // A CommonPrefix is the requested prefix plus at least one
                                 // character and the delimiter; anything else is not an answer.
                                 bool bad = outside(p) || p.size() <= prefix.size() || request.delimiter.empty() ||
                                            p.size() < prefix.size() + request.delimiter.size() ||
                                            p.compare(p.size() - request.delimiter.size(), request.delimiter.size(),
                                                      request.delimiter) != 0;
                                 if (bad) note(p);
                                 return bad;
                             }),
              cps.end());
    if (page->dropped)
        log::warn("ListObjectsV2 " + describe_target(bucket, "") + " prefix '" + log::printable(prefix, 300) +
                  "': the server returned " + std::to_string(page->dropped) +
                  " key(s) or prefix(es) outside the requested prefix (e.g. '" + log::printable(example, 300) +
                  "'); they were ignored. Is the server ignoring the prefix parameter?");
    return page;
}

Status Client::list_objects(const std::string& bucket, ListRequest request,
                            const std::function<bool(const ListPage&)>& on_page) {
    // A listing must end: every token is new, keys move forward (S3 lists in
    // ascending order, page after page), and pages are bounded in number.
    std::set<std::string> seen_tokens;
    std::string last_key;
    uint64_t pages = 0, empty_in_a_row = 0;
    auto fail = [&](const std::string& code, const std::string& why) {
        return make_error(ErrorKind::Corrupt,
                          "ListObjectsV2 " + describe_target(bucket, "") + " prefix '" +
                              log::printable(request.prefix, 300) + "': " + why + " after " + std::to_string(pages) +
                              " page(s); the server's listing cannot be trusted",
                          code);
    };
    for (;;) {
        auto page = list_objects_page(bucket, request);
        if (!page) return std::move(page).error();
        ++pages;
        if (!page->objects.empty()) {
            if (!last_key.empty() && page->objects.front().key <= last_key)
                return fail("ListOutOfOrder", "a page repeats or goes back before keys already listed ('" +
                                                  log::printable(page->objects.front().key, 300) + "')");
            last_key = page->objects.back().key;
        }
        if (!on_page(*page)) return {};
        if (!page->is_truncated) return {};
        empty_in_a_row = page->objects.empty() && page->common_prefixes.empty() ? empty_in_a_row + 1 : 0;
        if (empty_in_a_row >= kMaxEmptyListPages)
            return fail("ListTooLong", std::to_string(empty_in_a_row) + " empty truncated pages in a row");
        if (pages >= kMaxListPages)
            return fail("ListTooLong", "the listing did not end within " + std::to_string(kMaxListPages) + " pages");
        if (page->next_continuation_token == request.continuation_token ||
            !seen_tokens.insert(page->next_continuation_token).second)
            return fail("ListLoop", "a continuation token came back a second time");
        request.continuation_token = page->next_continuation_token;
    }
}

Result<std::vector<ObjectInfo>> Client::list_all(const std::string& bucket, const std::string& prefix) {
    std::vector<ObjectInfo> out;
    ListRequest req;
    req.prefix = prefix;
    bool too_many = false;
    auto st = list_objects(bucket, req, [&](const ListPage& p) {
        if (out.size() + p.objects.size() > kMaxListKeys) {
            too_many = true;
            return false;
        }
        out.insert(out.end(), p.objects.begin(), p.objects.end());
        return true;
    });
    if (!st) return std::move(st).error();
    if (too_many)
        return make_error(ErrorKind::Corrupt,
                          "ListObjectsV2 " + describe_target(bucket, "") + " prefix '" + log::printable(prefix, 300) +
                              "' lists more than " + std::to_string(kMaxListKeys) +
                              " keys, more than bottomless holds in memory; prune old generations (rm) or check the "
                              "server",
                          "ListTooLong");
    return out;
}

// ---- multipart --------------------------------------------------------------

Result<std::string> Client::create_multipart_upload(const std::string& bucket, const std::string& key,
                                                    const PutOptions& options) {
    Call c;
    c.op = "CreateMultipartUpload";
    c.method = "POST";
    c.bucket = bucket;
    c.key = key;
    c.query.emplace_back("uploads", "");
    if (!options.content_type.empty()) c.headers.emplace_back("Content-Type", options.content_type);
    for (const auto& [k, v] : options.metadata) c.headers.emplace_back("x-amz-meta-" + k, v);
    stats_.puts.fetch_add(1, std::memory_order_relaxed);
    auto r = execute(c);
    if (!r) return std::move(r).error();
    return xml::parse_initiate_multipart(r->body);
}

Result<CompletedPart> Client::upload_part(const std::string& bucket, const std::string& key,
                                          const std::string& upload_id, int part_number, std::string_view data) {
    http::MemorySource src(data);
    Md5Digest m = md5(data);
    Call c;
    c.op = "UploadPart";
    c.method = "PUT";
    c.bucket = bucket;
    c.key = key;
    c.query.emplace_back("partNumber", std::to_string(part_number));
    c.query.emplace_back("uploadId", upload_id);
    c.body = &src;
    c.payload_sha256 = sha256_hex(data);
    c.headers.emplace_back("Content-MD5", base64(m));
    stats_.puts.fetch_add(1, std::memory_order_relaxed);
    auto r = execute(c);
    if (!r) return std::move(r).error();
    CompletedPart p;
    p.number = part_number;
    p.etag = xml::strip_quotes(r->header("etag"));
    if (p.etag.empty()) p.etag = to_hex(m);
    return p;
}

Result<PutResult> Client::complete_multipart_upload(const std::string& bucket, const std::string& key,
                                                    const std::string& upload_id, std::vector<CompletedPart> parts,
                                                    uint64_t expected_size, const PutOptions& options) {
    std::sort(parts.begin(), parts.end(), [](const auto& a, const auto& b) { return a.number < b.number; });
    std::string body = xml::build_complete_multipart(parts);
    http::MemorySource src(body);
    Call c;
    c.op = "CompleteMultipartUpload";
    c.method = "POST";
    c.bucket = bucket;
    c.key = key;
    c.query.emplace_back("uploadId", upload_id);
    c.body = &src;
    c.headers.emplace_back("Content-Type", "application/xml");
    if (options.if_none_match) c.headers.emplace_back("If-None-Match", "*");
    stats_.puts.fetch_add(1, std::memory_order_relaxed);
    for (int round = 0;; ++round) {
        auto r = execute(c);
        PutResult pr;
        pr.size = expected_size;
        pr.parts = static_cast<int>(parts.size());
        if (!r) {
            // A retried Complete whose first response was lost finds the upload
            // gone: the object is there if its size is what we assembled.
            if (c.attempts > 1 && r.error().code == "NoSuchUpload") {
                auto head = head_object(bucket, key);
                if (head && head->size == expected_size) {
                    pr.etag = head->etag;
                    pr.recovered = true;
                    return pr;
                }
            }
            return std::move(r).error();
        }
        auto etag = xml::parse_complete_multipart(r->body);
        if (etag) {
            pr.etag = *etag;
            return pr;
        }
        // 200 with an <Error> body: retry a bounded number of times when transient.
        if (round < 3 && is_retryable(etag.error())) continue;
        return std::move(etag).error();
    }
}

Status Client::abort_multipart_upload(const std::string& bucket, const std::string& key, const std::string& upload_id) {
    Call c;
    c.op = "AbortMultipartUpload";
    c.method = "DELETE";
    c.bucket = bucket;
    c.key = key;
    c.query.emplace_back("uploadId", upload_id);
    stats_.deletes.fetch_add(1, std::memory_order_relaxed);
    auto r = execute(c);
    if (!r && r.error().code != "NoSuchUpload") return std::move(r).error();
    return {};
}

std::string Client::presign(const std::string& method, const std::string& bucket, const std::string& key,
                            std::chrono::seconds expires) {
    SigningRequest sreq;
    sreq.method = method;
    sreq.path = path_for(bucket, key);
    sreq.headers.emplace_back("Host", host_for(bucket));
    sreq.payload_hash = "UNSIGNED-PAYLOAD";  // the body is unknown when the URL is made
    auto creds = credentials_->current();
    if (!creds) {
        log::warn("presign " + describe_target(bucket, key) + ": no credentials: " + creds.error().describe());
        return {};
    }
    // A URL signed with temporary credentials dies with them, whatever `expires` says.
    SigningResult r = signer_.presign(sreq, **creds, clock_(), expires);
    return base_url_for(bucket) + uri_encode(sreq.path, false) + "?" + r.presigned_query;
}

std::unique_ptr<ObjectWriter> Client::open_writer(const std::string& bucket, const std::string& key,
                                                  const PutOptions& options) {
    return std::make_unique<ObjectWriter>(*this, bucket, key, options);
}

// ---- ObjectWriter -----------------------------------------------------------

ObjectWriter::ObjectWriter(Client& client, std::string bucket, std::string key, PutOptions options)
    : client_(client), bucket_(std::move(bucket)), key_(std::move(key)), options_(std::move(options)) {}

ObjectWriter::~ObjectWriter() {
    if (!done_) abort();
}

Status ObjectWriter::flush_part() {
    if (upload_id_.empty()) {
        auto id = client_.create_multipart_upload(bucket_, key_, options_);
        if (!id) return std::move(id).error();
        upload_id_ = *id;
    }
    auto part = client_.upload_part(bucket_, key_, upload_id_, static_cast<int>(parts_.size()) + 1, buffer_);
    if (!part) return std::move(part).error();
    parts_.push_back(*part);
    buffer_.clear();
    return {};
}

Status ObjectWriter::write(std::string_view data) {
    if (done_) return make_error(ErrorKind::InvalidArgument, "write after finish/abort", "WriterClosed");
    const size_t part_size = static_cast<size_t>(client_.config().part_size);
    total_ += data.size();
    while (!data.empty()) {
        size_t take = std::min(data.size(), part_size - buffer_.size());
        buffer_.append(data.substr(0, take));
        data.remove_prefix(take);
        if (buffer_.size() == part_size) {
            if (auto s = flush_part(); !s) {
                abort();
                return s;
            }
        }
    }
    return {};
}

Result<PutResult> ObjectWriter::finish() {
    if (done_) return make_error(ErrorKind::InvalidArgument, "finish after finish/abort", "WriterClosed");
    if (upload_id_.empty()) {
        done_ = true;
        return client_.put_object(bucket_, key_, buffer_, options_);
    }
    if (!buffer_.empty()) {
        if (auto s = flush_part(); !s) {
            abort();
            return std::move(s).error();
        }
    }
    auto r = client_.complete_multipart_upload(bucket_, key_, upload_id_, parts_, total_, options_);
    if (!r) {
        abort();
        return r;
    }
    done_ = true;
    return r;
}

void ObjectWriter::abort() {
    done_ = true;
    buffer_.clear();
    buffer_.shrink_to_fit();
    if (!upload_id_.empty()) {
        if (auto s = client_.abort_multipart_upload(bucket_, key_, upload_id_); !s)
            log::warn("cannot abort multipart upload of s3://" + bucket_ + "/" + key_ + ": " + s.error().describe() +
                      " (a bucket lifecycle rule for incomplete uploads cleans it up)");
        upload_id_.clear();
    }
}

}  // namespace bottomless::s3
