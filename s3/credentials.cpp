// What every credential source shares (see credentials.h): the helpers in
// credentials_internal.h, the ISO 8601 times and JSON credentials answers
// they parse, and RefreshingProvider, which keeps temporary credentials
// fresh without making a request wait. The sources are in credentials_sts.cpp,
// credentials_metadata.cpp and credentials_process.cpp; the chain that picks
// one in credentials_chain.cpp.
#include "s3/credentials.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <ctime>
#include <fstream>
#include <random>
#include <thread>

#include "s3/credentials_internal.h"
#include "s3/http.h"
#include "s3/thread_local.h"
#include "s3/log.h"

namespace bottomless::s3 {

using namespace credentials_detail;

namespace {

constexpr uint64_t kMaxCredentialBody = 64 * 1024;  // any credentials answer is a few KiB

std::string format_time(SysTime t) {
    std::time_t tt = std::chrono::system_clock::to_time_t(t);
    std::tm tm{};
    gmtime_r(&tt, &tm);
    char buf[32];
    std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &tm);
    return buf;
}

}  // namespace

// ---- helpers ---------------------------------------------------------------

std::string credentials_detail::trim(std::string_view s) {
    size_t b = 0, e = s.size();
    while (b < e && (s[b] == ' ' || s[b] == '\t' || s[b] == '\r' || s[b] == '\n')) ++b;
    while (e > b && (s[e - 1] == ' ' || s[e - 1] == '\t' || s[e - 1] == '\r' || s[e - 1] == '\n')) --e;
    return std::string(s.substr(b, e - b));
}

std::string credentials_detail::lower(std::string s) {
    for (char& c : s)
        if (c >= 'A' && c <= 'Z') c = static_cast<char>(c - 'A' + 'a');
    return s;
}

std::string credentials_detail::safe(std::string_view s) { return log::printable(s, 200); }

std::optional<std::string> credentials_detail::read_small_file(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    if (!in) return std::nullopt;
    std::string s(64 * 1024 + 1, '\0');
    in.read(s.data(), static_cast<std::streamsize>(s.size()));
    s.resize(static_cast<size_t>(in.gcount()));
    if (s.size() > 64 * 1024) return std::nullopt;
    return s;
}

void credentials_detail::backoff(int attempt) {
    BOTTOMLESS_THREAD_LOCAL std::minstd_rand rng{std::random_device{}()};
    int cap = std::min(100 * (1 << std::min(attempt, 5)), 2000);
    std::this_thread::sleep_for(std::chrono::milliseconds(std::uniform_int_distribution<int>(cap / 2, cap)(rng)));
}

http::Response credentials_detail::exchange(http::ConnectionPool& pool, const std::string& method,
                                            const std::string& url, HeaderList headers, std::string_view body,
                                            std::chrono::milliseconds connect, std::chrono::milliseconds total,
                                            const std::string& ca_bundle, bool verify_tls) {
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

bool credentials_detail::transient(const http::Response& r) {
    if (r.status == 0) return http::curl_code_retryable(r.curl_code);
    return r.status >= 500 || r.status == 429;
}

std::string credentials_detail::transport_text(const http::Response& r) {
    if (r.status == 0) return http::curl_code_name(r.curl_code) + " (" + safe(r.curl_error) + ")";
    return "HTTP " + std::to_string(r.status);
}

Result<ExpiringCredentials> credentials_detail::json_credentials(std::string_view body, std::string_view source,
                                                                 bool process) {
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

}  // namespace bottomless::s3
