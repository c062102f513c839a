// libcurl glue. Rules from curl's own examples: curl_global_init exactly once,
// one easy handle per thread at a time, reuse it for keep-alive, check every
// CURLcode, CURLOPT_NOSIGNAL in threaded programs.
#include "s3/http.h"

#include <curl/curl.h>
#include <openssl/crypto.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
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
        // OpenSSL without its exit-time cleanup: our threads (the uploader
        // pool, a follower's takeover thread) are detached and may still be
        // hashing or initialising OpenSSL while the host process runs its
        // exit handlers; OpenSSL's cleanup there freed its locks under such a
        // thread (SIGSEGV in CRYPTO_THREAD_unlock, seen in a follower process
        // exiting while it took over). The first initialisation in the
        // process decides; the memory goes with the process.
        OPENSSL_init_crypto(OPENSSL_INIT_NO_ATEXIT, nullptr);
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
    long status = 0;               // of the response being received (from its status line)
    uint64_t header_bytes = 0;     // of that response
    // What a callback caught. Fixed storage: recording it must not allocate,
    // it may be a bad_alloc being recorded.
    char callback_error[160] = {0};
};

// Called inside a catch block of a callback: remembers what was thrown.
void record_exception(Transfer* t) noexcept {
    const char* what = "unknown exception";
    try {
        throw;
    } catch (const std::bad_alloc&) {
        what = "out of memory";
    } catch (const std::exception& e) {
        what = e.what();
    } catch (...) {
    }
    if (!t->callback_error[0]) std::snprintf(t->callback_error, sizeof t->callback_error, "%s", what);
}

size_t read_cb(char* buf, size_t size, size_t nitems, void* userdata) noexcept {
    auto* t = static_cast<Transfer*>(userdata);
    try {
        int64_t n = t->req->body->read_at(t->upload_offset, buf, size * nitems);
        if (n < 0) return CURL_READFUNC_ABORT;
        t->upload_offset += static_cast<uint64_t>(n);
        return static_cast<size_t>(n);
    } catch (...) {
        record_exception(t);
        return CURL_READFUNC_ABORT;
    }
}

int seek_cb(void* userdata, curl_off_t offset, int origin) noexcept {
    auto* t = static_cast<Transfer*>(userdata);
    try {
        if (origin != SEEK_SET || offset < 0 || static_cast<uint64_t>(offset) > t->req->body->size())
            return CURL_SEEKFUNC_CANTSEEK;
        t->upload_offset = static_cast<uint64_t>(offset);
        return CURL_SEEKFUNC_OK;
    } catch (...) {
        record_exception(t);
        return CURL_SEEKFUNC_FAIL;
    }
}

bool success(long status) { return status >= 200 && status < 300; }

size_t write_cb(char* data, size_t size, size_t nmemb, void* userdata) noexcept {
    auto* t = static_cast<Transfer*>(userdata);
    size_t n = size * nmemb;
    try {
        long status = 0;
        curl_easy_getinfo(t->curl, CURLINFO_RESPONSE_CODE, &status);
        Response& r = *t->resp;
        if (!success(status)) {
            // An error body is only read for its <Error> document: keep the
            // start, stop the transfer once it is clearly not a normal one.
            size_t room = r.body.size() < kMaxErrorBody ? static_cast<size_t>(kMaxErrorBody - r.body.size()) : 0;
            r.body.append(data, std::min(n, room));
            r.body_bytes += n;
            return n <= room ? n : 0;
        }
        if (r.body_bytes + n > t->req->max_body_bytes) {
            r.too_large = true;
            return 0;  // aborts the transfer with CURLE_WRITE_ERROR
        }
        r.body_bytes += n;
        if (t->req->sink) {
            if (!t->req->sink->write(data, n)) {
                r.sink_failed = true;
                return 0;
            }
            return n;
        }
        r.body.append(data, n);
        return n;
    } catch (...) {
        record_exception(t);
        return 0;
    }
}

size_t header_cb(char* data, size_t size, size_t nitems, void* userdata) noexcept {
    auto* t = static_cast<Transfer*>(userdata);
    size_t n = size * nitems;
    try {
        std::string_view line(data, n);
        if (line.rfind("HTTP/", 0) == 0) {  // a new response (after 100-continue or a retry inside curl)
            t->resp->headers.clear();
            t->header_bytes = n;
            t->status = 0;
            if (auto sp = line.find(' '); sp != std::string_view::npos && line.size() >= sp + 4) {
                long st = 0;
                for (size_t i = sp + 1; i < sp + 4; ++i) st = st * 10 + (line[i] >= '0' && line[i] <= '9' ? line[i] - '0' : 0);
                t->status = st;
            }
            return n;
        }
        t->header_bytes += n;
        if (t->header_bytes > kMaxHeaderBytes) {
            t->resp->too_large = true;
            return 0;
        }
        auto colon = line.find(':');
        if (colon == std::string_view::npos) return n;
        std::string name(line.substr(0, colon));
        for (char& c : name)
            if (c >= 'A' && c <= 'Z') c = static_cast<char>(c - 'A' + 'a');
        std::string_view v = line.substr(colon + 1);
        while (!v.empty() && (v.front() == ' ' || v.front() == '\t')) v.remove_prefix(1);
        while (!v.empty() && (v.back() == '\r' || v.back() == '\n' || v.back() == ' ')) v.remove_suffix(1);
        // A 2xx that announces more than the caller can take is refused
        // before its body: a server ignoring Range cannot push a whole object
        // into a header read. (A HEAD's Content-Length is the object's size,
        // not a body.)
        if (name == "content-length" && success(t->status) && t->req->method != "HEAD") {
            uint64_t len = 0;
            bool digits = !v.empty();
            for (char c : v) {
                if (c < '0' || c > '9' || len > (UINT64_MAX - 9) / 10) { digits = false; break; }
                len = len * 10 + static_cast<uint64_t>(c - '0');
            }
            if (digits && len > t->req->max_body_bytes) {
                t->resp->too_large = true;
                return 0;
            }
        }
        t->resp->headers.emplace_back(std::move(name), std::string(v));
        return n;
    } catch (...) {
        record_exception(t);
        return 0;
    }
}

// Enforces the request's deadline; the transfer's declared size (known once
// the headers arrive) buys time at the minimum rate, so a large object over a
// slow link is not cut off while a trickling server still is.
int xferinfo_cb(void* userdata, curl_off_t dltotal, curl_off_t, curl_off_t ultotal, curl_off_t) noexcept {
    auto* t = static_cast<Transfer*>(userdata);
    const Request& r = *t->req;
    auto now = std::chrono::steady_clock::now();
    if (now >= r.hard_deadline) {
        t->resp->timed_out = true;
        return 1;
    }
    if (r.deadline == std::chrono::steady_clock::time_point::max()) return 0;
    uint64_t bytes = static_cast<uint64_t>(std::max<curl_off_t>(dltotal, 0)) + static_cast<uint64_t>(std::max<curl_off_t>(ultotal, 0));
    auto extra = std::chrono::milliseconds(r.min_rate ? static_cast<int64_t>(std::min<uint64_t>(bytes / r.min_rate, 1ull << 30) * 1000) : 0);
    if (now >= r.deadline && now - r.deadline >= extra) {
        t->resp->timed_out = true;
        return 1;
    }
    return 0;
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
    Transfer t;
    t.req = &req;
    t.resp = &resp;
    t.curl = h;
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
    // S3 is HTTP: never let a configured URL reach file://, ftp:// or any
    // other protocol libcurl knows (file:// once truncated a local file).
    SETOPT(h, CURLOPT_PROTOCOLS_STR, "http,https");
    SETOPT(h, CURLOPT_REDIR_PROTOCOLS_STR, "http,https");
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
    SETOPT(h, CURLOPT_XFERINFOFUNCTION, xferinfo_cb);
    SETOPT(h, CURLOPT_XFERINFODATA, &t);
    SETOPT(h, CURLOPT_NOPROGRESS, 0L);
    if (req.hard_deadline != std::chrono::steady_clock::time_point::max()) {
        // Belt and braces for the progress callback: curl's own timer.
        auto left = std::chrono::duration_cast<std::chrono::milliseconds>(req.hard_deadline - std::chrono::steady_clock::now());
        SETOPT(h, CURLOPT_TIMEOUT_MS, static_cast<long>(std::max<int64_t>(left.count(), 1)));
    }
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
    if (t.callback_error[0]) resp.callback_error = t.callback_error;
    if (resp.timed_out || rc == CURLE_OPERATION_TIMEDOUT) {
        resp.timed_out = true;
        resp.curl_code = CURLE_OPERATION_TIMEDOUT;
        resp.curl_error = "no complete answer before the request's deadline";
    }
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
