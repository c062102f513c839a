// One object in one request (see client.h): PutObject, create-only when
// asked (If-None-Match, or a HEAD before and after where the server ignores
// it, decided once by a probe), a lost answer to a retried create recognised
// as our own object; GetObject into a sink or a string; HeadObject;
// DeleteObject. Large objects and files are in client_multipart.cpp.
#include <algorithm>
#include <cstdlib>
#include <mutex>

#include "s3/client_internal.h"
#include "s3/crypto.h"
#include "s3/log.h"
#include "s3/xml.h"

namespace bottomless::s3 {

using namespace client_detail;

namespace {

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

}  // namespace bottomless::s3
