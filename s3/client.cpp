// The S3 client's core (see client.h): where a request goes (host, path,
// URL), the rate cap, and execute(): sign, send, map the answer to an Error,
// retry with back-off within the retry budget and the caller's deadline,
// refresh refused temporary credentials once. Also presigned URLs. The
// operations built on execute() are in client_objects.cpp, client_listing.cpp
// and client_multipart.cpp; answers become errors in client_errors.cpp.
#include "s3/client.h"

#include <algorithm>
#include <cstdio>
#include <mutex>
#include <random>
#include <thread>

#include "s3/client_internal.h"
#include "s3/credentials.h"
#include "s3/thread_local.h"
#include "s3/crypto.h"
#include "s3/log.h"
#include "s3/request_budget.h"

namespace bottomless::s3 {

using namespace client_detail;

namespace {

constexpr const char* kEmptySha256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

BOTTOMLESS_THREAD_LOCAL std::chrono::steady_clock::time_point t_deadline = std::chrono::steady_clock::time_point::max();

}  // namespace

// Hashes a body source (SHA-256 and MD5 in one pass).
Status client_detail::hash_source(http::BodySource& src, std::string& sha_hex, std::string* md5_raw) {
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

    BOTTOMLESS_THREAD_LOCAL std::minstd_rand rng{std::random_device{}()};
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

}  // namespace bottomless::s3
