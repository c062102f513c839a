// Private to the S3 client's source files (s3/client*.cpp): the one logical
// call every operation builds, and the helpers more than one of them uses.
// Not an interface; the client's is client.h.
//
//   client.cpp           addressing, the rate cap, signing, the retry loop (execute), presign
//   client_errors.cpp    a server's answer -> Error; what is retryable; ranged answers checked
//   client_objects.cpp   one object in one request: PUT (create-only, verified), GET, HEAD, DELETE
//   client_listing.cpp   buckets, ListObjectsV2 paging, batch DeleteObjects
//   client_multipart.cpp objects too large for one request: multipart uploads, ObjectWriter,
//                        files up (parallel parts) and down (parallel ranged GETs)
#pragma once

#include <optional>
#include <string>

#include "s3/client.h"

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

namespace client_detail {

// Hashes a body source (SHA-256 and MD5 in one pass). (client.cpp)
Status hash_source(http::BodySource& src, std::string& sha_hex, std::string* md5_raw);

// Whether a failed call may succeed when sent again. (client_errors.cpp)
bool is_retryable(const Error& e);

// Keys may come from a listing (a server's text): escaped for the terminal. (client_errors.cpp)
std::string describe_target(const std::string& bucket, const std::string& key);

}  // namespace client_detail

}  // namespace bottomless::s3
