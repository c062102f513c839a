// The S3 client: bucket and object operations over SigV4-signed HTTP, with
// retries, keep-alive connection reuse and multipart uploads.
//
// Thread-safe: one Client may be shared by any number of threads. Every
// operation returns a Result; S3 error documents become Errors carrying the
// S3 Code, the HTTP status, the request id and a message that says what to
// check. Retried: transport failures, 5xx, 429, SlowDown, RequestTimeout,
// InternalError. Not retried: auth failures, missing buckets/keys, failed
// preconditions, malformed requests.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "s3/config.h"
#include "s3/http.h"
#include "s3/result.h"
#include "s3/sigv4.h"
#include "s3/types.h"

namespace bottomless::s3 {

struct PutOptions {
    // Create only: fail with Precondition if the key exists. Single PUTs are
    // checked by HEADs on a server that ignores the header (see
    // conditional_writes_honoured); a multipart completion relies on the server.
    bool if_none_match = false;
    std::string content_type;
    std::vector<std::pair<std::string, std::string>> metadata;  // sent as x-amz-meta-NAME
};

struct PutResult {
    std::string etag;
    uint64_t size = 0;
    int parts = 0;              // 0: single PUT
    bool recovered = false;     // a lost response was detected and the stored object checked
};

struct ByteRange {
    uint64_t offset = 0;
    std::optional<uint64_t> length;  // nullopt: to the end
};

// Counters since the client was made; requests include retries.
struct ClientStats {
    uint64_t requests = 0;
    uint64_t retries = 0;
    uint64_t puts = 0;     // PUT object/part and multipart create/complete
    uint64_t gets = 0;
    uint64_t lists = 0;
    uint64_t deletes = 0;
    uint64_t heads = 0;
    uint64_t bytes_sent = 0;
    uint64_t bytes_received = 0;
    // Create-only PUTs checked by HEADs because the server ignores
    // `If-None-Match: *` (see ClientConfig::conditional_writes).
    bool conditional_writes_verified = false;
    uint64_t conditional_conflicts = 0;  // create-only PUTs refused: the key held another object
    // Requests (attempts) that waited for a request-rate cap (this client's
    // max_requests_per_second or the shared budget), and how long in all.
    uint64_t throttled = 0;
    uint64_t throttle_wait_us = 0;
};

class ObjectWriter;

// Listing limits (see list_objects). A real listing of a bottomless bucket
// is far below them; a server that loops or invents keys hits them.
constexpr uint64_t kMaxListPages = 100'000;        // 100 million keys at 1000 a page
constexpr uint64_t kMaxListKeys = 10'000'000;      // list_all holds them in memory (~1-2 GiB)
constexpr uint64_t kMaxEmptyListPages = 1'000;     // truncated pages in a row with nothing on them

// A deadline for every S3 request the current thread makes while the scope
// lives (nested scopes keep the earliest). No attempt starts after it, a
// running one is abandoned at it, and the error is Cancelled/Transport naming
// it. For callers with a budget of their own (sync commit, shutdown), on top
// of the retry policy's max_elapsed.
class DeadlineScope {
public:
    explicit DeadlineScope(std::chrono::steady_clock::time_point deadline);
    explicit DeadlineScope(std::chrono::milliseconds from_now)
        : DeadlineScope(std::chrono::steady_clock::now() + from_now) {}
    ~DeadlineScope();
    DeadlineScope(const DeadlineScope&) = delete;
    DeadlineScope& operator=(const DeadlineScope&) = delete;
    // The current thread's deadline; time_point::max() when there is none.
    static std::chrono::steady_clock::time_point current();

private:
    std::chrono::steady_clock::time_point saved_;
};

class Client {
public:
    explicit Client(ClientConfig config);
    ~Client();
    Client(const Client&) = delete;
    Client& operator=(const Client&) = delete;

    // Reads the environment and AWS files (see config.h).
    static Result<std::unique_ptr<Client>> from_env(const EnvLookup& env = process_env());

    const ClientConfig& config() const { return config_; }
    // Injectable clock for signing (tests of clock skew).
    void set_clock(std::function<std::chrono::system_clock::time_point()> clock);

    // Buckets. An existing bucket owned by the caller is success.
    Status create_bucket(const std::string& bucket);
    Status head_bucket(const std::string& bucket);
    Status delete_bucket(const std::string& bucket);
    // Deletes every object (following every listing page), then the bucket.
    Status delete_bucket_and_objects(const std::string& bucket);

    // Objects.
    Result<PutResult> put_object(const std::string& bucket, const std::string& key, std::string_view data,
                                 const PutOptions& options = {});
    // Streams a file; multipart above config().multipart_threshold. Memory use is
    // part_size * part_concurrency, whatever the file's size.
    Result<PutResult> put_object_from_file(const std::string& bucket, const std::string& key, const std::string& path,
                                           const PutOptions& options = {});
    // Into memory. The body is capped: by the range's length for a ranged
    // GET, else by max_bytes (0: config().max_get_bytes); a larger answer is
    // a Corrupt error (ResponseTooLarge) and is abandoned when its
    // Content-Length arrives. A ranged GET must come back as 206 with the
    // asked Content-Range (shorter only at the object's end); a 200 is taken
    // only when it is the whole object, starts at offset 0 and fits the range
    // (what a server without Range support answers for a small object);
    // anything else is RangeIgnored/BadContentRange.
    Result<std::string> get_object(const std::string& bucket, const std::string& key,
                                   std::optional<ByteRange> range = std::nullopt, ObjectInfo* info = nullptr,
                                   uint64_t max_bytes = 0);
    // Streams the body into sink; the sink is reset before every retry. Same
    // range rules; the cap is the range's length, else max_bytes (0: none,
    // the sink bounds what it stores).
    Result<ObjectInfo> get_object_to_sink(const std::string& bucket, const std::string& key, http::BodySink& sink,
                                          std::optional<ByteRange> range = std::nullopt, uint64_t max_bytes = 0);
    // Writes to path + ".part" and renames into place after a complete, length-checked download.
    Result<ObjectInfo> get_object_to_file(const std::string& bucket, const std::string& key, const std::string& path);
    Result<ObjectInfo> head_object(const std::string& bucket, const std::string& key);
    Status delete_object(const std::string& bucket, const std::string& key);
    // Deletes any number of keys, 1000 per request. Keys that failed are in the outcome.
    Result<DeleteOutcome> delete_objects(const std::string& bucket, const std::vector<std::string>& keys);

    // Listing: one page, or every page (following continuation tokens) with a
    // callback per page that may return false to stop.
    //
    // Nothing a server lists is trusted: every key and CommonPrefix that does
    // not start with the requested prefix (or a CommonPrefix that is not
    // longer than it) is dropped, counted in ListPage::dropped and warned
    // about, so no caller can act on another database's keys. list_objects
    // fails with a Corrupt error when a continuation token comes back a second
    // time (ListLoop), when a page's keys do not sort after the previous
    // page's (ListOutOfOrder), after kMaxEmptyListPages empty truncated pages
    // in a row or kMaxListPages pages (ListTooLong); list_all also past
    // kMaxListKeys keys.
    Result<ListPage> list_objects_page(const std::string& bucket, const ListRequest& request);
    Status list_objects(const std::string& bucket, ListRequest request,
                        const std::function<bool(const ListPage&)>& on_page);
    Result<std::vector<ObjectInfo>> list_all(const std::string& bucket, const std::string& prefix);

    // Multipart, for callers that stream (see ObjectWriter) and for tests.
    Result<std::string> create_multipart_upload(const std::string& bucket, const std::string& key,
                                                const PutOptions& options = {});
    Result<CompletedPart> upload_part(const std::string& bucket, const std::string& key, const std::string& upload_id,
                                      int part_number, std::string_view data);
    Result<PutResult> complete_multipart_upload(const std::string& bucket, const std::string& key,
                                                const std::string& upload_id, std::vector<CompletedPart> parts,
                                                uint64_t expected_size, const PutOptions& options = {});
    Status abort_multipart_upload(const std::string& bucket, const std::string& key, const std::string& upload_id);

    // A presigned GET/PUT URL valid for `expires` (and no longer than the
    // temporary credentials it is signed with); empty when there are no credentials.
    std::string presign(const std::string& method, const std::string& bucket, const std::string& key,
                        std::chrono::seconds expires);

    // A streaming writer: small objects become one PUT, larger ones multipart.
    std::unique_ptr<ObjectWriter> open_writer(const std::string& bucket, const std::string& key,
                                              const PutOptions& options = {});

    ClientStats stats() const;

    // Does the server honour `If-None-Match: *` on PUT? Decided once per
    // client (ClientConfig::conditional_writes): by the setting, or by a
    // probe that creates `<dir of key>/probe-if-none-match-<random>` twice
    // (the second must be refused) and deletes it. False: create-only PUTs
    // are checked by a HEAD before (an existing object is never overwritten)
    // and after (an object another writer put in between is not ours).
    Result<bool> conditional_writes_honoured(const std::string& bucket, const std::string& key);

private:
    friend class ObjectWriter;
    struct Call;
    Result<http::Response> execute(Call& call);
    std::string host_for(const std::string& bucket) const;
    std::string path_for(const std::string& bucket, const std::string& key) const;
    std::string base_url_for(const std::string& bucket) const;
    Status check_range_answer(const Call& call, const http::Response& resp, const ByteRange& range) const;
    Error error_from_response(const Call& call, const http::Response& resp) const;
    void throttle();
    Result<PutResult> put_single(const std::string& bucket, const std::string& key, http::BodySource& body,
                                 const std::string& sha256_hex, const std::string& md5_b64,
                                 const std::string& md5_hex, const PutOptions& options);
    // One PutObject of `body` (Content-MD5, the options' headers); `c` keeps
    // what the call did (attempts) for the caller.
    Result<http::Response> send_put(Call& c, const std::string& bucket, const std::string& key,
                                    http::BodySource& body, const std::string& sha256_hex,
                                    const std::string& md5_b64, const PutOptions& options);
    Result<PutResult> check_lost_put(const std::string& bucket, const std::string& key, const std::string& md5_hex,
                                     uint64_t size);
    Result<PutResult> put_verified(const std::string& bucket, const std::string& key, http::BodySource& body,
                                   const std::string& sha256_hex, const std::string& md5_b64,
                                   const std::string& md5_hex, const PutOptions& options);

    ClientConfig config_;
    std::optional<Error> config_error_;  // a bad endpoint: every call fails with it
    // What every request is signed with: config_.credentials_provider, or the
    // static config_.credentials. Each attempt takes its current credentials.
    std::shared_ptr<CredentialsProvider> credentials_;
    http::Timeouts timeouts_;
    Signer signer_;
    std::shared_ptr<http::ConnectionPool> pool_;  // config_.connection_pool, or its own
    std::function<std::chrono::system_clock::time_point()> clock_;

    std::mutex rate_mu_;  // guards next_slot_
    std::chrono::steady_clock::time_point next_slot_{};

    struct AtomicStats {
        std::atomic<uint64_t> requests{0}, retries{0}, puts{0}, gets{0}, lists{0}, deletes{0}, heads{0},
            bytes_sent{0}, bytes_received{0}, conditional_conflicts{0}, throttled{0}, throttle_wait_us{0};
    } stats_;
    // 0: not known yet, 1: honoured, 2: ignored (verify with HEADs). Set once
    // under probe_mu_, which serialises the probe.
    std::atomic<int> conditional_mode_{0};
    std::mutex probe_mu_;
};

// Streams an object of unknown size. write() buffers up to part_size; when the
// buffer fills a multipart upload starts. finish() completes it (or sends one
// PUT when everything fit in the buffer); abort() or destruction without
// finish() aborts the upload so no parts are left behind.
class ObjectWriter {
public:
    ObjectWriter(Client& client, std::string bucket, std::string key, PutOptions options);
    ~ObjectWriter();
    ObjectWriter(const ObjectWriter&) = delete;
    ObjectWriter& operator=(const ObjectWriter&) = delete;

    Status write(std::string_view data);
    Result<PutResult> finish();
    void abort();
    uint64_t bytes_written() const { return total_; }

private:
    Status flush_part();

    Client& client_;
    std::string bucket_, key_;
    PutOptions options_;
    std::string buffer_;
    std::string upload_id_;
    std::vector<CompletedPart> parts_;
    uint64_t total_ = 0;
    bool done_ = false;
};

}  // namespace bottomless::s3
