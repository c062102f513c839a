// A thin HTTP layer on libcurl for the S3 client: one request in, one
// response out, on a pooled easy handle so connections are kept alive.
// Nothing here knows about S3, signing or retries.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <vector>

#include "s3/result.h"
#include "s3/sigv4.h"

typedef void CURL;

namespace bottomless::s3::http {

// A request body that can be read from any offset, so a retry or a curl
// rewind re-sends the same bytes.
class BodySource {
public:
    virtual ~BodySource() = default;
    virtual uint64_t size() const = 0;
    // Reads up to n bytes at offset; returns bytes read, or -1 on error.
    virtual int64_t read_at(uint64_t offset, char* buf, size_t n) = 0;
};

class MemorySource final : public BodySource {
public:
    explicit MemorySource(std::string_view data) : data_(data) {}
    uint64_t size() const override { return data_.size(); }
    int64_t read_at(uint64_t offset, char* buf, size_t n) override;

private:
    std::string_view data_;
};

// A byte range of an open file, read with pread (the fd is not owned).
class FileRangeSource final : public BodySource {
public:
    FileRangeSource(int fd, uint64_t offset, uint64_t length) : fd_(fd), offset_(offset), length_(length) {}
    uint64_t size() const override { return length_; }
    int64_t read_at(uint64_t offset, char* buf, size_t n) override;

private:
    int fd_;
    uint64_t offset_;
    uint64_t length_;
};

// Where a successful (2xx) response body goes. Error bodies are always
// collected in Response::body instead, so an XML error never lands in a file.
class BodySink {
public:
    virtual ~BodySink() = default;
    // Returns false to abort the transfer (e.g. disk full).
    virtual bool write(const char* data, size_t n) = 0;
    // Called before a retry: forget what was written by the failed attempt.
    virtual bool reset() = 0;
};

// Caps on what a server may send back, whatever the request. A response
// past a cap is abandoned mid-transfer: a hostile or broken server can cost a
// request, never the process's memory.
constexpr uint64_t kMaxErrorBody = 64 * 1024;   // error bodies are kept up to this, then the transfer stops
constexpr uint64_t kMaxHeaderBytes = 64 * 1024; // all header lines of one response together
constexpr uint64_t kMaxSmallBody = 8ull << 20;  // default body cap: S3's XML answers (a 1000-key page is ~0.5 MiB)

struct Request {
    std::string method;   // GET HEAD PUT POST DELETE
    std::string url;      // fully encoded
    HeaderList headers;
    BodySource* body = nullptr;
    BodySink* sink = nullptr;
    // Most bytes a 2xx body may have (checked against Content-Length as soon
    // as it arrives, and against the bytes received): beyond it the transfer
    // is aborted and Response::too_large is set.
    uint64_t max_body_bytes = kMaxSmallBody;
    // The attempt is abandoned at `deadline`, extended by the declared size of
    // the transfer (request body + response Content-Length) at `min_rate`
    // bytes/s, but never past `hard_deadline`. max(): no limit.
    std::chrono::steady_clock::time_point deadline = std::chrono::steady_clock::time_point::max();
    std::chrono::steady_clock::time_point hard_deadline = std::chrono::steady_clock::time_point::max();
    uint64_t min_rate = 256 * 1024;
};

struct Response {
    long status = 0;                // 0: no HTTP response (transport error)
    HeaderList headers;             // names lowercased
    std::string body;               // error bodies, and success bodies when there is no sink
    uint64_t body_bytes = 0;        // bytes of body received (sink or not)
    int curl_code = 0;              // CURLE_OK = 0
    std::string curl_error;         // curl's message for curl_code
    bool sink_failed = false;       // the sink refused data
    bool too_large = false;         // the 2xx body (or the headers) passed its cap; transfer aborted
    bool timed_out = false;         // the request's deadline passed; curl_code is CURLE_OPERATION_TIMEDOUT
    std::string callback_error;     // an exception caught inside a libcurl callback (transfer aborted)

    std::string header(std::string_view lowercase_name) const;
};

struct Timeouts {
    std::chrono::milliseconds connect{5'000};
    std::chrono::seconds low_speed_time{30};
    long low_speed_limit = 1;
    std::string ca_bundle;
    bool verify_tls = true;
};

// Pool of curl easy handles. A handle is used by one thread at a time and
// returned afterwards with its connection cache intact (keep-alive).
class ConnectionPool {
public:
    ConnectionPool();
    ~ConnectionPool();
    ConnectionPool(const ConnectionPool&) = delete;
    ConnectionPool& operator=(const ConnectionPool&) = delete;

    struct HandleDeleter { void operator()(CURL* h) const noexcept; };
    using Handle = std::unique_ptr<CURL, HandleDeleter>;

    Handle checkout();
    void give_back(Handle h);

private:
    std::mutex mu_;                // guards idle_
    std::vector<Handle> idle_;
};

// Performs one request. Never throws for network failures; they come back
// as Response::curl_code. Only http and https are spoken (also on
// redirects), whatever the URL says. No exception ever crosses libcurl's C
// frames: one thrown by a sink, a source or an allocation inside a callback
// is caught there, aborts the transfer and comes back as
// Response::callback_error. Safe to call from many threads with one pool.
Response perform(ConnectionPool& pool, const Request& req, const Timeouts& timeouts);

// Idempotent process-wide curl_global_init.
void global_init();

// Name of a curl error code (e.g. "CURLE_RECV_ERROR") and whether it is worth retrying.
std::string curl_code_name(int code);
bool curl_code_retryable(int code);

}  // namespace bottomless::s3::http
