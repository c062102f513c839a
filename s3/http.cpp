// libcurl glue. Rules from curl's own examples: curl_global_init exactly once,
// one easy handle per thread at a time, reuse it for keep-alive, check every
// CURLcode, CURLOPT_NOSIGNAL in threaded programs.
#include "s3/http.h"

#include <curl/curl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <mutex>
#include <stdexcept>

namespace bottomless::s3::http {

int64_t MemorySource::read_at(uint64_t offset, char* buf, size_t n) {
    if (offset >= data_.size()) return 0;
    size_t k = std::min<uint64_t>(n, data_.size() - offset);
    std::memcpy(buf, data_.data() + offset, k);
    return static_cast<int64_t>(k);
}

int64_t FileRangeSource::read_at(uint64_t offset, char* buf, size_t n) {
    if (offset >= length_) return 0;
    size_t want = std::min<uint64_t>(n, length_ - offset);
    size_t got = 0;
    while (got < want) {
        ssize_t r = ::pread(fd_, buf + got, want - got, static_cast<off_t>(offset_ + offset + got));
        if (r < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        if (r == 0) break;  // file shrank under us: the request will fail as short
        got += static_cast<size_t>(r);
    }
    return static_cast<int64_t>(got);
}

std::string Response::header(std::string_view name) const {
    for (const auto& [k, v] : headers)
        if (k == name) return v;
    return {};
}

void global_init() {
    static std::once_flag once;
    std::call_once(once, [] {
        if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK) throw std::runtime_error("curl_global_init failed");
    });
}

void ConnectionPool::HandleDeleter::operator()(CURL* h) const noexcept { curl_easy_cleanup(h); }

ConnectionPool::ConnectionPool() { global_init(); }
ConnectionPool::~ConnectionPool() = default;

ConnectionPool::Handle ConnectionPool::checkout() {
    {
        std::lock_guard lock(mu_);
        if (!idle_.empty()) {
            Handle h = std::move(idle_.back());
            idle_.pop_back();
            return h;
        }
    }
    Handle h(curl_easy_init());
    if (!h) throw std::bad_alloc();
    return h;
}

void ConnectionPool::give_back(Handle h) {
    if (!h) return;
    std::lock_guard lock(mu_);
    if (idle_.size() < 64) idle_.push_back(std::move(h));
}

namespace {

struct Transfer {
    const Request* req = nullptr;
    Response* resp = nullptr;
    CURL* curl = nullptr;
    uint64_t upload_offset = 0;
};

size_t read_cb(char* buf, size_t size, size_t nitems, void* userdata) {
    auto* t = static_cast<Transfer*>(userdata);
    int64_t n = t->req->body->read_at(t->upload_offset, buf, size * nitems);
    if (n < 0) return CURL_READFUNC_ABORT;
    t->upload_offset += static_cast<uint64_t>(n);
    return static_cast<size_t>(n);
}

int seek_cb(void* userdata, curl_off_t offset, int origin) {
    auto* t = static_cast<Transfer*>(userdata);
    if (origin != SEEK_SET || offset < 0 || static_cast<uint64_t>(offset) > t->req->body->size())
        return CURL_SEEKFUNC_CANTSEEK;
    t->upload_offset = static_cast<uint64_t>(offset);
    return CURL_SEEKFUNC_OK;
}

size_t write_cb(char* data, size_t size, size_t nmemb, void* userdata) {
    auto* t = static_cast<Transfer*>(userdata);
    size_t n = size * nmemb;
    long status = 0;
    curl_easy_getinfo(t->curl, CURLINFO_RESPONSE_CODE, &status);
    t->resp->body_bytes += n;
    if (t->req->sink && status >= 200 && status < 300) {
        if (!t->req->sink->write(data, n)) {
            t->resp->sink_failed = true;
            return 0;  // aborts the transfer with CURLE_WRITE_ERROR
        }
        return n;
    }
    t->resp->body.append(data, n);
    return n;
}

size_t header_cb(char* data, size_t size, size_t nitems, void* userdata) {
    auto* t = static_cast<Transfer*>(userdata);
    size_t n = size * nitems;
    std::string_view line(data, n);
    if (line.rfind("HTTP/", 0) == 0) {  // a new response (after 100-continue or a retry inside curl)
        t->resp->headers.clear();
        return n;
    }
    auto colon = line.find(':');
    if (colon == std::string_view::npos) return n;
    std::string name(line.substr(0, colon));
    for (char& c : name)
        if (c >= 'A' && c <= 'Z') c = static_cast<char>(c - 'A' + 'a');
    std::string_view v = line.substr(colon + 1);
    while (!v.empty() && (v.front() == ' ' || v.front() == '\t')) v.remove_prefix(1);
    while (!v.empty() && (v.back() == '\r' || v.back() == '\n' || v.back() == ' ')) v.remove_suffix(1);
    t->resp->headers.emplace_back(std::move(name), std::string(v));
    return n;
}

struct SlistDeleter {
    void operator()(curl_slist* l) const noexcept { curl_slist_free_all(l); }
};
using Slist = std::unique_ptr<curl_slist, SlistDeleter>;

#define SETOPT(h, opt, val)                                                    \
    do {                                                                       \
        CURLcode rc_ = curl_easy_setopt(h, opt, val);                          \
        if (rc_ != CURLE_OK) {                                                 \
            resp.curl_code = rc_;                                              \
            resp.curl_error = std::string("curl_easy_setopt(" #opt "): ") + curl_easy_strerror(rc_); \
            return resp;                                                       \
        }                                                                      \
    } while (0)

Response perform_on(CURL* h, const Request& req, const Timeouts& to) {
    Response resp;
    Transfer t{&req, &resp, h, 0};
    curl_easy_reset(h);  // keeps the connection cache: keep-alive survives

    Slist headers;
    for (const auto& [k, v] : req.headers) {
        std::string line = k + ": " + v;
        curl_slist* n = curl_slist_append(headers.get(), line.c_str());
        if (!n) throw std::bad_alloc();
        headers.release();
        headers.reset(n);
    }
    // No "Expect: 100-continue" round trip: bodies are small or already hashed,
    // and the extra wait halves small-PUT throughput.
    for (const char* extra : {"Expect:", "Accept:"}) {
        curl_slist* n = curl_slist_append(headers.get(), extra);
        if (!n) throw std::bad_alloc();
        headers.release();
        headers.reset(n);
    }

    char errbuf[CURL_ERROR_SIZE] = {0};
    SETOPT(h, CURLOPT_ERRORBUFFER, errbuf);
    SETOPT(h, CURLOPT_URL, req.url.c_str());
    // S3 keys may contain "/./" or "/../": curl must send the path as signed.
    SETOPT(h, CURLOPT_PATH_AS_IS, 1L);
    SETOPT(h, CURLOPT_NOSIGNAL, 1L);
    SETOPT(h, CURLOPT_HTTPHEADER, headers.get());
    SETOPT(h, CURLOPT_TCP_NODELAY, 1L);
    SETOPT(h, CURLOPT_TCP_KEEPALIVE, 1L);
    // Larger buffers: fewer callbacks and syscalls on large bodies.
    SETOPT(h, CURLOPT_BUFFERSIZE, 256L * 1024);
    SETOPT(h, CURLOPT_UPLOAD_BUFFERSIZE, 512L * 1024);
    SETOPT(h, CURLOPT_CONNECTTIMEOUT_MS, static_cast<long>(to.connect.count()));
    SETOPT(h, CURLOPT_LOW_SPEED_LIMIT, to.low_speed_limit);
    SETOPT(h, CURLOPT_LOW_SPEED_TIME, static_cast<long>(to.low_speed_time.count()));
    SETOPT(h, CURLOPT_SSL_VERIFYPEER, to.verify_tls ? 1L : 0L);
    SETOPT(h, CURLOPT_SSL_VERIFYHOST, to.verify_tls ? 2L : 0L);
    if (!to.ca_bundle.empty()) SETOPT(h, CURLOPT_CAINFO, to.ca_bundle.c_str());
    SETOPT(h, CURLOPT_HEADERFUNCTION, header_cb);
    SETOPT(h, CURLOPT_HEADERDATA, &t);
    SETOPT(h, CURLOPT_WRITEFUNCTION, write_cb);
    SETOPT(h, CURLOPT_WRITEDATA, &t);
    // Signed requests must not be redirected: the signature covers the host.
    SETOPT(h, CURLOPT_FOLLOWLOCATION, 0L);

    if (req.method == "HEAD") {
        SETOPT(h, CURLOPT_NOBODY, 1L);
    } else if (req.method == "GET" && !req.body) {
        SETOPT(h, CURLOPT_HTTPGET, 1L);
    } else {
        SETOPT(h, CURLOPT_CUSTOMREQUEST, req.method.c_str());
    }
    if (req.body) {
        SETOPT(h, CURLOPT_UPLOAD, 1L);
        SETOPT(h, CURLOPT_INFILESIZE_LARGE, static_cast<curl_off_t>(req.body->size()));
        SETOPT(h, CURLOPT_READFUNCTION, read_cb);
        SETOPT(h, CURLOPT_READDATA, &t);
        SETOPT(h, CURLOPT_SEEKFUNCTION, seek_cb);
        SETOPT(h, CURLOPT_SEEKDATA, &t);
    } else if (req.method == "PUT" || req.method == "POST") {
        // An empty body still needs Content-Length: 0.
        SETOPT(h, CURLOPT_UPLOAD, 1L);
        SETOPT(h, CURLOPT_INFILESIZE_LARGE, static_cast<curl_off_t>(0));
    }

    CURLcode rc = curl_easy_perform(h);
    resp.curl_code = rc;
    if (rc != CURLE_OK) {
        resp.curl_error = errbuf[0] ? errbuf : curl_easy_strerror(rc);
        while (!resp.curl_error.empty() && resp.curl_error.back() == '\n') resp.curl_error.pop_back();
    }
    long status = 0;
    curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &status);
    resp.status = status;
    // Detach pointers into this stack frame before the handle goes back to the pool.
    curl_easy_setopt(h, CURLOPT_ERRORBUFFER, nullptr);
    curl_easy_setopt(h, CURLOPT_HTTPHEADER, nullptr);
    return resp;
}

#undef SETOPT

}  // namespace

Response perform(ConnectionPool& pool, const Request& req, const Timeouts& timeouts) {
    auto h = pool.checkout();
    Response r = perform_on(h.get(), req, timeouts);
    if (r.curl_code == CURLE_OK) {
        pool.give_back(std::move(h));
    }
    // On a transport error the handle (and its possibly broken connection) is dropped.
    return r;
}

std::string curl_code_name(int code) {
    switch (code) {
    case CURLE_OK: return "CURLE_OK";
    case CURLE_COULDNT_RESOLVE_HOST: return "CURLE_COULDNT_RESOLVE_HOST";
    case CURLE_COULDNT_CONNECT: return "CURLE_COULDNT_CONNECT";
    case CURLE_OPERATION_TIMEDOUT: return "CURLE_OPERATION_TIMEDOUT";
    case CURLE_SEND_ERROR: return "CURLE_SEND_ERROR";
    case CURLE_RECV_ERROR: return "CURLE_RECV_ERROR";
    case CURLE_GOT_NOTHING: return "CURLE_GOT_NOTHING";
    case CURLE_PARTIAL_FILE: return "CURLE_PARTIAL_FILE";
    case CURLE_WRITE_ERROR: return "CURLE_WRITE_ERROR";
    case CURLE_READ_ERROR: return "CURLE_READ_ERROR";
    case CURLE_ABORTED_BY_CALLBACK: return "CURLE_ABORTED_BY_CALLBACK";
    case CURLE_SSL_CONNECT_ERROR: return "CURLE_SSL_CONNECT_ERROR";
    case CURLE_PEER_FAILED_VERIFICATION: return "CURLE_PEER_FAILED_VERIFICATION";
    case CURLE_SSL_CACERT_BADFILE: return "CURLE_SSL_CACERT_BADFILE";
    case CURLE_URL_MALFORMAT: return "CURLE_URL_MALFORMAT";
    case CURLE_UNSUPPORTED_PROTOCOL: return "CURLE_UNSUPPORTED_PROTOCOL";
    case CURLE_WEIRD_SERVER_REPLY: return "CURLE_WEIRD_SERVER_REPLY";
    case CURLE_HTTP2: return "CURLE_HTTP2";
    case CURLE_HTTP2_STREAM: return "CURLE_HTTP2_STREAM";
    case CURLE_SEND_FAIL_REWIND: return "CURLE_SEND_FAIL_REWIND";
    default: return "CURLE_" + std::to_string(code);
    }
}

bool curl_code_retryable(int code) {
    switch (code) {
    case CURLE_COULDNT_RESOLVE_HOST:  // DNS hiccups are transient more often than not
    case CURLE_COULDNT_CONNECT:
    case CURLE_OPERATION_TIMEDOUT:
    case CURLE_SEND_ERROR:
    case CURLE_RECV_ERROR:
    case CURLE_GOT_NOTHING:
    case CURLE_PARTIAL_FILE:
    case CURLE_WEIRD_SERVER_REPLY:
    case CURLE_HTTP2:
    case CURLE_HTTP2_STREAM:
    case CURLE_SSL_CONNECT_ERROR:
    case CURLE_SEND_FAIL_REWIND:
        return true;
    default:
        return false;
    }
}

}  // namespace bottomless::s3::http
