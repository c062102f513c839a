// Buckets and listings (see client.h): CreateBucket, HeadBucket,
// DeleteBucket (with its objects), ListObjectsV2 page by page, with every
// page checked so a listing ends and never hands out keys outside the
// prefix asked for, and DeleteObjects in batches of 1000.
#include <algorithm>
#include <set>

#include "s3/client_internal.h"
#include "s3/crypto.h"
#include "s3/log.h"
#include "s3/xml.h"

namespace bottomless::s3 {

using namespace client_detail;

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

// ---- batch delete -----------------------------------------------------------

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

}  // namespace bottomless::s3
