// Plain data types of the S3 API as the client exposes them.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace bottomless::s3 {

struct ObjectInfo {
    std::string key;
    uint64_t size = 0;
    std::string etag;           // quotes stripped
    std::string last_modified;  // as the server sent it (ISO 8601 in listings, RFC 1123 in HEAD)
    std::vector<std::pair<std::string, std::string>> metadata;  // x-amz-meta-* (HEAD/GET only), names lowercased without prefix
};

struct ListRequest {
    std::string prefix;
    std::string delimiter;
    std::string start_after;
    std::string continuation_token;
    int max_keys = 1000;
};

struct ListPage {
    std::vector<ObjectInfo> objects;
    std::vector<std::string> common_prefixes;
    bool is_truncated = false;
    std::string next_continuation_token;
    uint64_t dropped = 0;  // keys and prefixes the server sent outside the requested prefix (not in the lists above)
};

struct CompletedPart {
    int number = 0;
    std::string etag;  // as returned by UploadPart, quotes stripped
};

struct DeleteFailure {
    std::string key;
    std::string code;
    std::string message;
};

struct DeleteOutcome {
    std::vector<std::string> deleted;
    std::vector<DeleteFailure> failed;
};

// An S3 <Error> document.
struct ErrorBody {
    std::string code;
    std::string message;
    std::string request_id;
    std::string resource;
};

}  // namespace bottomless::s3
