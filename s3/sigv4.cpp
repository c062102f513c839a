// SigV4 stages. See sigv4.h for the S3-specific choices.
#include "s3/sigv4.h"

#include <algorithm>
#include <ctime>

namespace bottomless::s3 {
namespace {

constexpr std::string_view kAlgorithm = "AWS4-HMAC-SHA256";

std::string lower(std::string_view s) {
    std::string out(s);
    for (char& c : out)
        if (c >= 'A' && c <= 'Z') c = static_cast<char>(c - 'A' + 'a');
    return out;
}

bool is_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f'; }

// Trims and folds runs of white space into one space, as SigV4 prescribes
// for header values (a folded multi-line value becomes one line).
std::string canonical_value(std::string_view v) {
    std::string out;
    out.reserve(v.size());
    bool pending_space = false;
    for (char c : v) {
        if (is_space(c)) {
            pending_space = !out.empty();
            continue;
        }
        if (pending_space) out.push_back(' ');
        pending_space = false;
        out.push_back(c);
    }
    return out;
}

std::string normalize_path(std::string_view path) {
    std::vector<std::string_view> segs;
    size_t i = 0;
    while (i <= path.size()) {
        size_t j = path.find('/', i);
        if (j == std::string_view::npos) j = path.size();
        std::string_view seg = path.substr(i, j - i);
        if (seg == "..") {
            if (!segs.empty()) segs.pop_back();
        } else if (!seg.empty() && seg != ".") {
            segs.push_back(seg);
        }
        i = j + 1;
    }
    std::string out = "/";
    for (size_t k = 0; k < segs.size(); ++k) {
        if (k) out += '/';
        out += segs[k];
    }
    bool trailing = path.size() > 1 && path.back() == '/';
    if (trailing && out.size() > 1) out += '/';
    return out;
}

}  // namespace

bool is_unsigned_header(std::string_view n) {
    static constexpr std::string_view kSkip[] = {
        "authorization", "user-agent", "x-amzn-trace-id", "connection", "expect",
        "transfer-encoding", "upgrade", "proxy-authorization", "te", "keep-alive",
    };
    return std::find(std::begin(kSkip), std::end(kSkip), n) != std::end(kSkip);
}

std::string uri_encode(std::string_view s, bool encode_slash) {
    static constexpr char kHex[] = "0123456789ABCDEF";
    std::string out;
    out.reserve(s.size() * 3 / 2);
    for (unsigned char c : s) {
        bool unreserved = (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
                          c == '-' || c == '.' || c == '_' || c == '~';
        if (unreserved || (c == '/' && !encode_slash)) {
            out.push_back(static_cast<char>(c));
        } else {
            out.push_back('%');
            out.push_back(kHex[c >> 4]);
            out.push_back(kHex[c & 0xf]);
        }
    }
    return out;
}

std::string uri_decode(std::string_view s) {
    auto hexval = [](char c) -> int {
        if (c >= '0' && c <= '9') return c - '0';
        if (c >= 'a' && c <= 'f') return c - 'a' + 10;
        if (c >= 'A' && c <= 'F') return c - 'A' + 10;
        return -1;
    };
    std::string out;
    out.reserve(s.size());
    for (size_t i = 0; i < s.size(); ++i) {
        if (s[i] == '%' && i + 2 < s.size()) {
            int hi = hexval(s[i + 1]), lo = hexval(s[i + 2]);
            if (hi >= 0 && lo >= 0) {
                out.push_back(static_cast<char>(hi * 16 + lo));
                i += 2;
                continue;
            }
        }
        out.push_back(s[i]);
    }
    return out;
}

std::string format_amz_date(std::chrono::system_clock::time_point t) {
    std::time_t tt = std::chrono::system_clock::to_time_t(t);
    std::tm tm{};
    gmtime_r(&tt, &tm);
    char buf[20];
    std::strftime(buf, sizeof buf, "%Y%m%dT%H%M%SZ", &tm);
    return buf;
}

Signer::Signer(std::string region, std::string service, SignerOptions options)
    : region_(std::move(region)), service_(std::move(service)), options_(options) {}

Signer::~Signer() {
    for (auto& k : cache_) secure_wipe(k.key.data(), k.key.size());
}

std::string Signer::canonical_uri(std::string_view raw_path) const {
    std::string path = raw_path.empty() ? std::string("/") : std::string(raw_path);
    if (options_.normalize_path) path = normalize_path(path);
    std::string encoded = uri_encode(path, /*encode_slash=*/false);
    if (options_.double_encode_path) encoded = uri_encode(encoded, false);
    return encoded;
}

std::string Signer::canonical_query(const QueryList& query) {
    std::vector<std::pair<std::string, std::string>> enc;
    enc.reserve(query.size());
    for (const auto& [k, v] : query) enc.emplace_back(uri_encode(k, true), uri_encode(v, true));
    std::sort(enc.begin(), enc.end());
    std::string out;
    for (const auto& [k, v] : enc) {
        if (!out.empty()) out += '&';
        out += k;
        out += '=';
        out += v;
    }
    return out;
}

std::string Signer::canonical_headers(const HeaderList& headers, std::string& signed_headers) {
    // std::map keeps names sorted; repeated names join their values with ','
    // in the order they were given (the get-header-key-duplicate vector).
    std::map<std::string, std::string> merged;
    for (const auto& [name, value] : headers) {
        std::string n = lower(name);
        if (is_unsigned_header(n)) continue;
        auto [it, inserted] = merged.try_emplace(n, canonical_value(value));
        if (!inserted) {
            it->second += ',';
            it->second += canonical_value(value);
        }
    }
    std::string out;
    signed_headers.clear();
    for (const auto& [n, v] : merged) {
        out += n;
        out += ':';
        out += v;
        out += '\n';
        if (!signed_headers.empty()) signed_headers += ';';
        signed_headers += n;
    }
    return out;
}

std::string Signer::canonical_request(std::string_view method, std::string_view uri, std::string_view query,
                                      std::string_view headers, std::string_view signed_headers,
                                      std::string_view payload_hash) {
    std::string out;
    out.reserve(method.size() + uri.size() + query.size() + headers.size() + signed_headers.size() + 80);
    out.append(method).append("\n");
    out.append(uri).append("\n");
    out.append(query).append("\n");
    out.append(headers).append("\n");
    out.append(signed_headers).append("\n");
    out.append(payload_hash);
    return out;
}

std::string Signer::string_to_sign(std::string_view timestamp, std::string_view scope,
                                   std::string_view canonical_request) {
    std::string out(kAlgorithm);
    out.append("\n").append(timestamp).append("\n").append(scope).append("\n");
    out.append(sha256_hex(canonical_request));
    return out;
}

Sha256Digest Signer::signing_key(const Credentials& creds, std::string_view date) {
    Sha256Digest fp = sha256(creds.secret_access_key);
    {
        std::lock_guard lock(cache_mu_);
        for (const auto& k : cache_)
            if (k.date == date && k.access_key_id == creds.access_key_id && k.secret_fingerprint == fp) return k.key;
    }
    std::string seed = "AWS4" + creds.secret_access_key;
    Sha256Digest k_date = hmac_sha256(seed, date);
    secure_wipe(seed);
    auto as_view = [](const Sha256Digest& d) {
        return std::string_view(reinterpret_cast<const char*>(d.data()), d.size());
    };
    Sha256Digest k_region = hmac_sha256(as_view(k_date), region_);
    Sha256Digest k_service = hmac_sha256(as_view(k_region), service_);
    Sha256Digest k_signing = hmac_sha256(as_view(k_service), "aws4_request");
    secure_wipe(k_date.data(), k_date.size());
    secure_wipe(k_region.data(), k_region.size());
    secure_wipe(k_service.data(), k_service.size());

    std::lock_guard lock(cache_mu_);
    if (cache_.size() >= 4) {  // dates roll over; keep the cache tiny
        secure_wipe(cache_.front().key.data(), cache_.front().key.size());
        cache_.erase(cache_.begin());
    }
    cache_.push_back(CachedKey{std::string(date), creds.access_key_id, fp, k_signing});
    return k_signing;
}

SigningResult Signer::sign(const SigningRequest& req, const Credentials& creds,
                           std::chrono::system_clock::time_point now) {
    SigningResult r;
    r.timestamp = format_amz_date(now);
    std::string date = r.timestamp.substr(0, 8);
    r.scope = date + "/" + region_ + "/" + service_ + "/aws4_request";

    HeaderList headers = req.headers;
    r.headers_to_add.emplace_back("X-Amz-Date", r.timestamp);
    if (options_.add_content_sha256_header) r.headers_to_add.emplace_back("X-Amz-Content-Sha256", req.payload_hash);
    bool has_token = !creds.session_token.empty();
    if (has_token && options_.sign_session_token) r.headers_to_add.emplace_back("X-Amz-Security-Token", creds.session_token);
    for (const auto& h : r.headers_to_add) headers.push_back(h);

    std::string canon_headers = canonical_headers(headers, r.signed_headers);
    r.canonical_request = canonical_request(req.method, canonical_uri(req.path), canonical_query(req.query),
                                            canon_headers, r.signed_headers, req.payload_hash);
    r.string_to_sign = string_to_sign(r.timestamp, r.scope, r.canonical_request);
    Sha256Digest key = signing_key(creds, date);
    r.signature = to_hex(hmac_sha256(std::string_view(reinterpret_cast<const char*>(key.data()), key.size()),
                                     r.string_to_sign));
    secure_wipe(key.data(), key.size());

    // Token added after signing (not covered by the signature): only the vector needs this.
    if (has_token && !options_.sign_session_token) r.headers_to_add.emplace_back("X-Amz-Security-Token", creds.session_token);
    r.headers_to_add.emplace_back(
        "Authorization", std::string(kAlgorithm) + " Credential=" + creds.access_key_id + "/" + r.scope +
                             ", SignedHeaders=" + r.signed_headers + ", Signature=" + r.signature);
    return r;
}

SigningResult Signer::presign(const SigningRequest& req, const Credentials& creds,
                              std::chrono::system_clock::time_point now, std::chrono::seconds expires) {
    SigningResult r;
    r.timestamp = format_amz_date(now);
    std::string date = r.timestamp.substr(0, 8);
    r.scope = date + "/" + region_ + "/" + service_ + "/aws4_request";

    std::string canon_headers = canonical_headers(req.headers, r.signed_headers);
    QueryList query = req.query;
    query.emplace_back("X-Amz-Algorithm", std::string(kAlgorithm));
    query.emplace_back("X-Amz-Credential", creds.access_key_id + "/" + r.scope);
    query.emplace_back("X-Amz-Date", r.timestamp);
    query.emplace_back("X-Amz-Expires", std::to_string(expires.count()));
    bool has_token = !creds.session_token.empty();
    if (has_token && options_.sign_session_token) query.emplace_back("X-Amz-Security-Token", creds.session_token);
    query.emplace_back("X-Amz-SignedHeaders", r.signed_headers);

    std::string canon_query = canonical_query(query);
    r.canonical_request = canonical_request(req.method, canonical_uri(req.path), canon_query, canon_headers,
                                            r.signed_headers, req.payload_hash);
    r.string_to_sign = string_to_sign(r.timestamp, r.scope, r.canonical_request);
    Sha256Digest key = signing_key(creds, date);
    r.signature = to_hex(hmac_sha256(std::string_view(reinterpret_cast<const char*>(key.data()), key.size()),
                                     r.string_to_sign));
    secure_wipe(key.data(), key.size());
    r.presigned_query = canon_query + "&X-Amz-Signature=" + r.signature;
    if (has_token && !options_.sign_session_token)
        r.presigned_query += "&X-Amz-Security-Token=" + uri_encode(creds.session_token, true);
    return r;
}

}  // namespace bottomless::s3
