// Result type shared by the S3 client and the replicator core.
//
// Every fallible operation below the SQLite boundary returns a Result<T>: either
// a value or an Error with a category. The category is what callers branch on
// (retry? tell the user to fix credentials? map to which SQLITE_IOERR_*?); the
// message is what a human reads. Exceptions are not used for expected failures
// so that nothing has to be caught at the SQLite C ABI except bad_alloc.
#pragma once

#include <string>
#include <utility>
#include <variant>

namespace bottomless {

enum class ErrorKind {
    Transport,        // connection refused/reset, timeout, short body
    Auth,             // 403: bad keys, signature mismatch, access denied, clock skew
    NotFound,         // NoSuchKey, NoSuchBucket, NoSuchUpload
    Throttled,        // 429, 503 SlowDown
    Server,           // 5xx, InternalError
    Precondition,     // 412: conditional request refused (object exists, ETag moved)
    Corrupt,          // content failed a checksum or could not be parsed
    InvalidArgument,  // bad configuration or a request the server rejected as malformed
    Io,               // local file system
    Cancelled,        // the caller gave up (deadline, shutdown)
};

const char* to_string(ErrorKind kind) noexcept;

struct Error {
    ErrorKind kind = ErrorKind::Server;
    std::string code;        // S3 error Code (e.g. "NoSuchBucket") or a curl/errno name
    std::string message;     // human readable, says what to check
    int http_status = 0;     // 0 when no HTTP response was received
    std::string request_id;  // x-amz-request-id, for support tickets

    // One line: "kind: code (HTTP n): message [request id r]".
    std::string describe() const;
};

inline Error make_error(ErrorKind kind, std::string message, std::string code = {}) {
    Error e;
    e.kind = kind;
    e.code = std::move(code);
    e.message = std::move(message);
    return e;
}

template <class T>
class [[nodiscard]] Result {
public:
    Result(T value) : v_(std::in_place_index<0>, std::move(value)) {}
    Result(Error error) : v_(std::in_place_index<1>, std::move(error)) {}

    bool ok() const noexcept { return v_.index() == 0; }
    explicit operator bool() const noexcept { return ok(); }

    T& value() & { return std::get<0>(v_); }
    const T& value() const& { return std::get<0>(v_); }
    T&& value() && { return std::get<0>(std::move(v_)); }
    T* operator->() { return &std::get<0>(v_); }
    const T* operator->() const { return &std::get<0>(v_); }
    T& operator*() & { return std::get<0>(v_); }
    const T& operator*() const& { return std::get<0>(v_); }
    T&& operator*() && { return std::get<0>(std::move(v_)); }

    const Error& error() const& { return std::get<1>(v_); }
    Error&& error() && { return std::get<1>(std::move(v_)); }

private:
    std::variant<T, Error> v_;
};

template <>
class [[nodiscard]] Result<void> {
public:
    Result() = default;
    Result(Error error) : error_(std::move(error)), ok_(false) {}

    bool ok() const noexcept { return ok_; }
    explicit operator bool() const noexcept { return ok_; }
    const Error& error() const& { return error_; }
    Error&& error() && { return std::move(error_); }

private:
    Error error_;
    bool ok_ = true;
};

using Status = Result<void>;

}  // namespace bottomless
