// The fault-injecting test proxy (see fault_proxy.h). The misbehaving-server
// faults rewrite or invent answers; everything they add is for tests only.
//
// One accept thread and one thread per client connection; each connection
// thread owns its client socket and its own keep-alive upstream socket. Every
// socket is non-blocking and every wait is a poll() of at most kPollMs, so the
// destructor only sets stopping_ and joins. The fault plan and the counters
// are the only state shared between threads, all behind Impl::mu_.
#include "support/fault_proxy.h"

#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <charconv>
#include <chrono>
#include <cstdio>
#include <ctime>
#include <list>
#include <mutex>
#include <optional>
#include <string_view>
#include <system_error>
#include <thread>
#include <utility>
#include <vector>

#include "s3/sigv4.h"

namespace bottomless::testing {
namespace {

using Clock = std::chrono::steady_clock;
using Stop = std::atomic<bool>;

constexpr int kPollMs = 50;                  // longest a stop request goes unnoticed
constexpr int kConnectTimeoutMs = 5000;
constexpr size_t kMaxHead = 64 * 1024;       // a bigger head means a framing bug, not a request
constexpr size_t kMaxChunk = size_t{1} << 40;  // keeps chunk offset arithmetic from overflowing
constexpr size_t kReadChunk = 64 * 1024;
constexpr std::string_view kBadGateway =
    "HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";

class UniqueFd {
public:
    explicit UniqueFd(int fd = -1) : fd_(fd) {}
    UniqueFd(UniqueFd&& o) noexcept : fd_(std::exchange(o.fd_, -1)) {}
    UniqueFd& operator=(UniqueFd&& o) noexcept {
        if (this != &o) {
            reset();
            fd_ = std::exchange(o.fd_, -1);
        }
        return *this;
    }
    ~UniqueFd() { reset(); }
    int get() const { return fd_; }
    bool valid() const { return fd_ >= 0; }
    void reset() {
        if (fd_ >= 0) ::close(fd_);
        fd_ = -1;
    }

private:
    int fd_;
};

void set_nodelay(int fd) {
    int one = 1;
    ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

// Waits until `fd` is ready for `events`; false on stop, poll error or
// timeout (none when timeout_ms < 0). POLLERR/POLLHUP count as ready so the
// caller's next recv/send reports what went wrong.
bool wait_for(int fd, short events, const Stop& stop, int timeout_ms = -1) {
    const auto deadline = Clock::now() + std::chrono::milliseconds(timeout_ms);
    while (!stop.load()) {
        pollfd p{fd, events, 0};
        int r = ::poll(&p, 1, timeout_ms < 0 ? kPollMs : std::min(timeout_ms, kPollMs));
        if (r > 0) return true;
        if (r < 0 && errno != EINTR) return false;
        if (timeout_ms >= 0 && Clock::now() >= deadline) return false;
    }
    return false;
}

// Appends what `fd` has to `buf`: bytes read, 0 at EOF, -1 on error or stop.
ssize_t read_some(int fd, std::string& buf, const Stop& stop) {
    const size_t old = buf.size();
    buf.resize(old + kReadChunk);
    for (;;) {
        ssize_t n = ::recv(fd, buf.data() + old, kReadChunk, 0);
        if (n >= 0) {
            buf.resize(old + static_cast<size_t>(n));
            return n;
        }
        if (errno == EINTR) continue;
        if ((errno == EAGAIN || errno == EWOULDBLOCK) && wait_for(fd, POLLIN, stop)) continue;
        buf.resize(old);
        return -1;
    }
}

bool write_all(int fd, std::string_view data, const Stop& stop) {
    while (!data.empty()) {
        // MSG_NOSIGNAL: a client that hung up must not kill the test with SIGPIPE.
        ssize_t n = ::send(fd, data.data(), data.size(), MSG_NOSIGNAL);
        if (n > 0) {
            data.remove_prefix(static_cast<size_t>(n));
        } else if (n < 0 && errno == EINTR) {
            continue;
        } else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK) && wait_for(fd, POLLOUT, stop)) {
            continue;
        } else {
            return false;
        }
    }
    return true;
}

char lower(char c) { return (c >= 'A' && c <= 'Z') ? static_cast<char>(c - 'A' + 'a') : c; }

bool iequals(std::string_view a, std::string_view b) {
    return a.size() == b.size() &&
           std::equal(a.begin(), a.end(), b.begin(), [](char x, char y) { return lower(x) == lower(y); });
}

// The trimmed value of header `name` in `head` (start line + header lines).
std::optional<std::string_view> header(std::string_view head, std::string_view name) {
    size_t pos = head.find("\r\n");  // skip the start line
    while (pos != std::string_view::npos) {
        pos += 2;
        size_t eol = head.find("\r\n", pos);
        if (eol == std::string_view::npos || eol == pos) break;
        std::string_view line = head.substr(pos, eol - pos);
        size_t colon = line.find(':');
        if (colon != std::string_view::npos && iequals(line.substr(0, colon), name)) {
            std::string_view v = line.substr(colon + 1);
            while (!v.empty() && (v.front() == ' ' || v.front() == '\t')) v.remove_prefix(1);
            while (!v.empty() && (v.back() == ' ' || v.back() == '\t')) v.remove_suffix(1);
            return v;
        }
        pos = eol;
    }
    return std::nullopt;
}

// The request without its If-None-Match header, signed again with `creds`
// for what is left (SigV4 header auth, as the S3 client signs). Unchanged
// when it has no If-None-Match or no parsable Authorization.
std::string strip_if_none_match(const std::string& bytes, const s3::Credentials& creds) {
    size_t head_end = bytes.find("\r\n\r\n");
    if (head_end == std::string::npos) return bytes;
    std::string_view head(bytes.data(), head_end + 2);
    auto auth = header(head, "authorization");
    auto date = header(head, "x-amz-date");
    auto payload = header(head, "x-amz-content-sha256");
    if (!header(head, "if-none-match") || !auth || !date || !payload) return bytes;
    // "AWS4-HMAC-SHA256 Credential=AKID/DATE/REGION/s3/aws4_request, SignedHeaders=a;b, Signature=..."
    std::string a(*auth);
    auto field = [&](const std::string& name) {
        size_t p = a.find(name + "=");
        if (p == std::string::npos) return std::string();
        p += name.size() + 1;
        size_t e = a.find_first_of(", ", p);
        return a.substr(p, e == std::string::npos ? std::string::npos : e - p);
    };
    std::string credential = field("Credential"), signed_list = field("SignedHeaders");
    std::vector<std::string> scope;
    for (size_t p = 0; p <= credential.size();) {
        size_t e = credential.find('/', p);
        if (e == std::string::npos) e = credential.size();
        scope.push_back(credential.substr(p, e - p));
        p = e + 1;
    }
    if (scope.size() != 5 || signed_list.empty()) return bytes;

    std::string_view line = head.substr(0, head.find("\r\n"));
    size_t sp1 = line.find(' '), sp2 = line.rfind(' ');
    s3::SigningRequest sreq;
    sreq.method = std::string(line.substr(0, sp1));
    std::string target(line.substr(sp1 + 1, sp2 - sp1 - 1));
    size_t q = target.find('?');
    sreq.path = s3::uri_decode(target.substr(0, q));
    if (q != std::string::npos) {
        std::string qs = target.substr(q + 1);
        for (size_t p = 0; p <= qs.size();) {
            size_t e = qs.find('&', p);
            if (e == std::string::npos) e = qs.size();
            std::string kv = qs.substr(p, e - p);
            size_t eq = kv.find('=');
            if (!kv.empty())
                sreq.query.emplace_back(s3::uri_decode(kv.substr(0, eq)),
                                        eq == std::string::npos ? std::string() : s3::uri_decode(kv.substr(eq + 1)));
            p = e + 1;
        }
    }
    sreq.payload_hash = std::string(*payload);
    // The signed headers but the ones sign() adds itself, and If-None-Match.
    for (size_t p = 0; p <= signed_list.size();) {
        size_t e = signed_list.find(';', p);
        if (e == std::string::npos) e = signed_list.size();
        std::string name = signed_list.substr(p, e - p);
        p = e + 1;
        if (name == "if-none-match" || name == "x-amz-date" || name == "x-amz-content-sha256" ||
            name == "x-amz-security-token")
            continue;
        if (auto v = header(head, name)) sreq.headers.emplace_back(name, std::string(*v));
    }
    std::tm tm{};
    std::string d(*date);
    if (d.size() != 16 || !strptime(d.c_str(), "%Y%m%dT%H%M%SZ", &tm)) return bytes;
    auto when = std::chrono::system_clock::from_time_t(timegm(&tm));
    s3::Signer signer(scope[2], scope[3]);
    s3::SigningResult signed_req = signer.sign(sreq, creds, when);
    std::string new_auth;
    for (const auto& [k, v] : signed_req.headers_to_add)
        if (k == "Authorization") new_auth = v;

    std::string out(line);
    out += "\r\n";
    size_t pos = line.size() + 2;
    while (pos < head.size()) {
        size_t eol = head.find("\r\n", pos);
        std::string_view l = head.substr(pos, eol - pos);
        pos = eol + 2;
        std::string_view name = l.substr(0, l.find(':'));
        if (iequals(name, "if-none-match")) continue;
        if (iequals(name, "authorization")) {
            out += "Authorization: " + new_auth + "\r\n";
            continue;
        }
        out.append(l).append("\r\n");
    }
    out += "\r\n";
    out.append(bytes, head_end + 4, std::string::npos);
    return out;
}

bool header_has(std::string_view head, std::string_view name, std::string_view token) {
    auto v = header(head, name);
    if (!v) return false;
    std::string s(*v);
    std::transform(s.begin(), s.end(), s.begin(), lower);
    return s.find(token) != std::string::npos;
}

// How a message body ends (RFC 9112 section 6.3).
struct Framing {
    enum Kind { kNone, kLength, kChunked, kUntilClose } kind = kNone;
    size_t length = 0;
};

// nullopt for a Content-Length that does not parse.
std::optional<Framing> body_framing(std::string_view head, bool is_request) {
    if (header_has(head, "transfer-encoding", "chunked")) return Framing{Framing::kChunked};
    if (auto cl = header(head, "content-length")) {
        size_t n = 0;
        auto [p, ec] = std::from_chars(cl->data(), cl->data() + cl->size(), n);
        if (ec != std::errc() || p != cl->data() + cl->size()) return std::nullopt;
        return Framing{Framing::kLength, n};
    }
    // A request without either has no body; a response runs to connection close.
    return Framing{is_request ? Framing::kNone : Framing::kUntilClose};
}

// Finds the end of a chunked body. Resumable: pos_ only moves past complete
// chunks, so rescanning after every read stays linear in the body size.
class ChunkScanner {
public:
    explicit ChunkScanner(size_t body_start) : pos_(body_start) {}
    // Offset just past the body (after the trailers), 0 while incomplete,
    // npos if malformed.
    size_t scan(const std::string& buf) {
        for (;;) {
            size_t eol = buf.find("\r\n", pos_);
            if (eol == std::string::npos) return 0;
            if (in_trailers_) {
                if (eol == pos_) return eol + 2;
                pos_ = eol + 2;
                continue;
            }
            size_t size = 0;
            const char* first = buf.data() + pos_;
            auto [p, ec] = std::from_chars(first, buf.data() + eol, size, 16);
            if (ec != std::errc() || p == first || size > kMaxChunk) return std::string::npos;
            if (size == 0) {
                in_trailers_ = true;
                pos_ = eol + 2;
                continue;
            }
            size_t next = eol + 2 + size + 2;  // size line, data, CRLF
            if (buf.size() < next) return 0;
            pos_ = next;
        }
    }

private:
    size_t pos_;
    bool in_trailers_ = false;
};

// Reads until `buf` starts with a complete head; its length including the
// blank line, or 0 on EOF, error, stop or an oversized head.
size_t read_head(int fd, std::string& buf, const Stop& stop) {
    size_t searched = 0;
    for (;;) {
        size_t end = buf.find("\r\n\r\n", searched > 3 ? searched - 3 : 0);
        if (end != std::string::npos) return end + 4;
        searched = buf.size();
        if (buf.size() > kMaxHead || read_some(fd, buf, stop) <= 0) return 0;
    }
}

// Reads until the body starting at `start` is complete; the offset past it.
std::optional<size_t> read_body(int fd, std::string& buf, size_t start, Framing f, const Stop& stop) {
    ChunkScanner chunks(start);
    for (;;) {
        if (f.kind == Framing::kNone) return start;
        if (f.kind == Framing::kLength && buf.size() - start >= f.length) return start + f.length;
        if (f.kind == Framing::kChunked) {
            size_t end = chunks.scan(buf);
            if (end == std::string::npos) return std::nullopt;
            if (end != 0) return end;
        }
        ssize_t n = read_some(fd, buf, stop);
        if (n == 0 && f.kind == Framing::kUntilClose) return buf.size();
        if (n <= 0) return std::nullopt;
    }
}

struct Request {
    std::string bytes;  // exactly as received: forwarded unchanged so SigV4 still verifies
    std::string method;
    std::string target;
    bool close = false;  // the client asked to close after this exchange
};

std::optional<Request> read_request(int fd, std::string& buf, const Stop& stop) {
    size_t head_len = read_head(fd, buf, stop);
    if (head_len == 0) return std::nullopt;
    Request req;
    std::optional<Framing> framing;
    {
        // A view into buf: used up before read_body can reallocate buf.
        std::string_view head(buf.data(), head_len);
        std::string_view line = head.substr(0, head.find("\r\n"));
        size_t sp1 = line.find(' ');
        size_t sp2 = line.rfind(' ');
        if (sp1 == std::string_view::npos || sp2 <= sp1) return std::nullopt;
        req.method = line.substr(0, sp1);
        req.target = line.substr(sp1 + 1, sp2 - sp1 - 1);
        req.close = header_has(head, "connection", "close");
        framing = body_framing(head, true);
        if (!framing) return std::nullopt;
    }
    // No "100 Continue" is ever sent: the client either disabled Expect or
    // sends the body after its own short timeout, and we wait for it here.
    auto end = read_body(fd, buf, head_len, *framing, stop);
    if (!end) return std::nullopt;
    req.bytes.assign(buf, 0, *end);
    buf.erase(0, *end);
    return req;
}

struct Response {
    std::string bytes;      // any interim 1xx responses, then the final head and body, raw
    size_t body_start = 0;  // offset of the final body in bytes
    bool close = false;     // the upstream connection cannot carry another request
};

std::optional<Response> read_response(int fd, std::string& buf, std::string_view method, const Stop& stop) {
    Response resp;
    for (;;) {
        size_t head_len = read_head(fd, buf, stop);
        if (head_len == 0 || head_len < 12 || buf.compare(0, 5, "HTTP/") != 0) return std::nullopt;
        int status = 0;
        auto [p, ec] = std::from_chars(buf.data() + 9, buf.data() + 12, status);
        if (ec != std::errc()) return std::nullopt;
        if (status / 100 == 1) {
            // Interim responses have no body; the real answer follows.
            resp.bytes.append(buf, 0, head_len);
            buf.erase(0, head_len);
            continue;
        }
        std::optional<Framing> framing;
        {
            std::string_view head(buf.data(), head_len);
            const bool no_body = method == "HEAD" || status == 204 || status == 304;
            framing = no_body ? Framing{} : body_framing(head, false);
            if (!framing) return std::nullopt;
            resp.close = framing->kind == Framing::kUntilClose || header_has(head, "connection", "close");
        }
        auto end = read_body(fd, buf, head_len, *framing, stop);
        if (!end) return std::nullopt;
        resp.body_start = resp.bytes.size() + head_len;
        resp.bytes.append(buf, 0, *end);
        buf.erase(0, *end);
        return resp;
    }
}

UniqueFd connect_to(const std::string& host, int port, const Stop& stop) {
    addrinfo hints{};
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    addrinfo* found = nullptr;
    if (::getaddrinfo(host.c_str(), std::to_string(port).c_str(), &hints, &found) != 0) return UniqueFd();
    std::unique_ptr<addrinfo, decltype(&::freeaddrinfo)> list(found, &::freeaddrinfo);
    for (addrinfo* ai = list.get(); ai != nullptr; ai = ai->ai_next) {
        UniqueFd fd(::socket(ai->ai_family, ai->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, ai->ai_protocol));
        if (!fd.valid()) continue;
        if (::connect(fd.get(), ai->ai_addr, ai->ai_addrlen) != 0) {
            if (errno != EINPROGRESS || !wait_for(fd.get(), POLLOUT, stop, kConnectTimeoutMs)) continue;
            int err = 0;
            socklen_t len = sizeof err;
            if (::getsockopt(fd.get(), SOL_SOCKET, SO_ERROR, &err, &len) != 0 || err != 0) continue;
        }
        set_nodelay(fd.get());
        return fd;
    }
    return UniqueFd();
}

// The upstream side of one client connection, kept alive across its requests.
class Upstream {
public:
    Upstream(const std::string& host, int port, const Stop& stop) : host_(host), port_(port), stop_(stop) {}

    // Sends the request unchanged and reads the whole response.
    std::optional<Response> exchange(const Request& req) {
        // An idle keep-alive connection that polls readable was closed by the
        // server (or holds stray bytes): either way it cannot be used.
        pollfd p{fd_.get(), POLLIN, 0};
        if (fd_.valid() && ::poll(&p, 1, 0) != 0) fd_.reset();
        for (int attempt = 0; attempt < 2; ++attempt) {
            const bool reused = fd_.valid();
            if (!reused) {
                buf_.clear();
                fd_ = connect_to(host_, port_, stop_);
                if (!fd_.valid()) return std::nullopt;
            }
            std::optional<Response> resp;
            if (write_all(fd_.get(), req.bytes, stop_)) resp = read_response(fd_.get(), buf_, req.method, stop_);
            if (resp && !resp->close) return resp;
            fd_.reset();
            // Resend only when a reused connection died before any response
            // byte arrived (the server's idle timeout raced us), as curl does.
            if (resp || !reused || !buf_.empty() || stop_.load()) return resp;
        }
        return std::nullopt;
    }

private:
    const std::string& host_;
    const int port_;
    const Stop& stop_;
    UniqueFd fd_;
    std::string buf_;  // bytes read from upstream but not yet consumed
};

std::string error_response(Fault fault, std::string_view method) {
    const bool slow = fault == Fault::Status503SlowDown, denied = fault == Fault::Status403AccessDenied;
    const std::string body = std::string(R"(<?xml version="1.0" encoding="UTF-8"?>)") + "<Error><Code>" +
                             (slow ? "SlowDown" : denied ? "AccessDenied" : "InternalError") + "</Code><Message>" +
                             (slow     ? "Please reduce your request rate."
                              : denied ? "Access Denied"
                                       : "We encountered an internal error. Please try again.") +
                             "</Message><RequestId>fault-proxy</RequestId></Error>";
    std::string out = std::string("HTTP/1.1 ") +
                      (slow ? "503 Slow Down" : denied ? "403 Forbidden" : "500 Internal Server Error") +
                      "\r\nContent-Type: application/xml\r\nContent-Length: " + std::to_string(body.size()) +
                      "\r\nx-amz-request-id: fault-proxy\r\nConnection: keep-alive\r\n\r\n";
    // A HEAD response states the length but carries no body; sending one
    // anyway would desynchronise the kept-alive connection.
    if (method != "HEAD") out += body;
    return out;
}

// ---- helpers for the misbehaving-server faults ----

// The final response head: status line and header lines, each ending in CRLF.
std::string_view final_head(const Response& r) {
    std::string_view all(r.bytes.data(), r.body_start);
    size_t start = all.rfind("\r\nHTTP/1.");
    start = start == std::string_view::npos ? 0 : start + 2;
    std::string_view head = all.substr(start);
    // Keep the last header line's CRLF (header() needs it), drop the blank line.
    if (head.size() >= 4 && head.substr(head.size() - 4) == "\r\n\r\n") head.remove_suffix(2);
    return head;
}

// The response body with any chunked framing removed.
std::string plain_body(const Response& r) {
    std::string_view body(r.bytes.data() + r.body_start, r.bytes.size() - r.body_start);
    if (!header_has(final_head(r), "transfer-encoding", "chunked")) return std::string(body);
    std::string out;
    size_t pos = 0;
    for (;;) {
        size_t eol = body.find("\r\n", pos);
        if (eol == std::string_view::npos) break;
        size_t n = 0;
        auto [p, ec] = std::from_chars(body.data() + pos, body.data() + eol, n, 16);
        if (ec != std::errc() || n == 0 || eol + 2 + n > body.size()) break;
        out.append(body.substr(eol + 2, n));
        pos = eol + 2 + n + 2;
    }
    return out;
}

// The head with its framing headers replaced by a Content-Length for `body`
// (and the status line replaced when `status_line` is given).
std::string rebuild(std::string_view head, const std::string& body, std::string_view status_line = {}) {
    std::string out;
    size_t pos = 0;
    bool first = true;
    while (pos < head.size()) {
        size_t eol = head.find("\r\n", pos);
        if (eol == std::string_view::npos) eol = head.size();
        std::string_view line = head.substr(pos, eol - pos);
        pos = eol + 2;
        if (first) {
            out.append(status_line.empty() ? line : status_line).append("\r\n");
            first = false;
            continue;
        }
        size_t colon = line.find(':');
        std::string_view name = line.substr(0, colon == std::string_view::npos ? 0 : colon);
        if (iequals(name, "content-length") || iequals(name, "transfer-encoding") || iequals(name, "content-range"))
            continue;
        out.append(line).append("\r\n");
    }
    out += "Content-Length: " + std::to_string(body.size()) + "\r\n\r\n";
    return out + body;
}

// The value of query parameter `name` in a request-target (not decoded).
std::string query_param(std::string_view target, std::string_view name) {
    size_t q = target.find('?');
    while (q != std::string_view::npos) {
        size_t start = q + 1;
        size_t end = target.find('&', start);
        std::string_view kv = target.substr(start, end == std::string_view::npos ? std::string_view::npos : end - start);
        if (kv.substr(0, kv.find('=')) == name) {
            size_t eq = kv.find('=');
            return eq == std::string_view::npos ? std::string() : std::string(kv.substr(eq + 1));
        }
        q = end;
    }
    return {};
}

bool is_list_request(const Request& req) {
    return req.method == "GET" && req.target.find("list-type=2") != std::string::npos;
}

// A ListObjectsV2 body made truncated with `token` as the next one.
std::string with_token(std::string xml, const std::string& token) {
    for (const char* tag : {"NextContinuationToken", "IsTruncated"}) {
        std::string open = std::string("<") + tag + ">", close = std::string("</") + tag + ">";
        size_t a = xml.find(open);
        if (a == std::string::npos) continue;
        size_t b = xml.find(close, a);
        if (b != std::string::npos) xml.erase(a, b + close.size() - a);
    }
    size_t end = xml.rfind("</ListBucketResult>");
    if (end == std::string::npos) return xml;
    xml.insert(end, "<IsTruncated>true</IsTruncated><NextContinuationToken>" + token + "</NextContinuationToken>");
    return xml;
}

std::string xml_response(const std::string& body) {
    return "HTTP/1.1 200 OK\r\nContent-Type: application/xml\r\nx-amz-request-id: fault-proxy\r\nContent-Length: " +
           std::to_string(body.size()) + "\r\n\r\n" + body;
}

}  // namespace

struct FaultProxy::Impl {
    Impl(std::string host, int port) : upstream_host_(std::move(host)), upstream_port_(port) {
        listen_fd_ = UniqueFd(::socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
        if (!listen_fd_.valid()) throw std::system_error(errno, std::system_category(), "fault proxy: socket");
        int one = 1;
        ::setsockopt(listen_fd_.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        sockaddr_in addr{};
        addr.sin_family = AF_INET;
        addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        addr.sin_port = 0;  // ephemeral: parallel test binaries never collide
        socklen_t len = sizeof addr;
        if (::bind(listen_fd_.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 ||
            ::listen(listen_fd_.get(), SOMAXCONN) != 0 ||
            ::getsockname(listen_fd_.get(), reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
            throw std::system_error(errno, std::system_category(), "fault proxy: bind/listen");
        }
        port_ = ntohs(addr.sin_port);
        accept_thread_ = std::thread([this] { accept_loop(); });
    }

    ~Impl() {
        stopping_ = true;
        accept_thread_.join();
        for (Worker& w : workers_) w.thread.join();
    }

    void accept_loop() {
        while (!stopping_.load()) {
            // Join finished connection threads so a long test does not pile them up.
            for (auto it = workers_.begin(); it != workers_.end();) {
                if (it->done.load()) {
                    it->thread.join();
                    it = workers_.erase(it);
                } else {
                    ++it;
                }
            }
            if (!wait_for(listen_fd_.get(), POLLIN, stopping_, kPollMs)) continue;
            UniqueFd client(::accept4(listen_fd_.get(), nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC));
            if (!client.valid()) continue;
            set_nodelay(client.get());
            Worker& w = workers_.emplace_back();
            w.thread = std::thread([this, &w, fd = std::move(client)]() mutable {
                serve(std::move(fd));
                w.done = true;
            });
        }
    }

    struct Decision {
        Fault fault;
        int stall_ms;
        int trickle_bytes;
        int trickle_ms;
    };

    Decision take_fault(const Request& req) {
        std::lock_guard lock(mu_);
        ++requests_seen_;
        const bool matches = (filter_method_.empty() || req.method == filter_method_) &&
                             (filter_path_.empty() || req.target.find(filter_path_) != std::string::npos);
        Fault fault = Fault::None;
        if (matches && pending_count_ > 0) {
            fault = pending_fault_;
            --pending_count_;
        } else if (matches) {
            fault = always_fault_;
        }
        if (fault != Fault::None) ++faults_injected_;
        return {fault, stall_ms_, trickle_bytes_, trickle_ms_};
    }

    // Runs one client connection; returning closes it.
    void serve(UniqueFd client) {
        Upstream upstream(upstream_host_, upstream_port_, stopping_);
        std::string in;  // client bytes read but not yet consumed
        while (!stopping_.load()) {
            std::optional<Request> req = read_request(client.get(), in, stopping_);
            if (!req) return;
            const Decision d = take_fault(*req);
            if (d.fault == Fault::StripIfNoneMatch) {
                std::lock_guard lock(mu_);
                req->bytes = strip_if_none_match(req->bytes, signing_creds_);
            }
            switch (d.fault) {
            case Fault::StripIfNoneMatch:
            case Fault::None: {
                std::optional<Response> resp = upstream.exchange(*req);
                if (!resp) {
                    write_all(client.get(), kBadGateway, stopping_);
                    return;
                }
                if (!write_all(client.get(), resp->bytes, stopping_) || resp->close) return;
                break;
            }
            case Fault::ResetBeforeRequest: {
                // A zero linger time makes close() send RST instead of FIN.
                linger lg{1, 0};
                ::setsockopt(client.get(), SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
                return;
            }
            case Fault::Status503SlowDown:
            case Fault::Status500:
            case Fault::Status403AccessDenied:
                if (!write_all(client.get(), error_response(d.fault, req->method), stopping_)) return;
                break;
            case Fault::Stall: {
                const auto until = Clock::now() + std::chrono::milliseconds(d.stall_ms);
                while (!stopping_.load() && Clock::now() < until) {
                    std::this_thread::sleep_for(std::chrono::milliseconds(10));
                }
                return;
            }
            case Fault::TruncateBody: {
                std::optional<Response> resp = upstream.exchange(*req);
                if (resp) {
                    const size_t body = resp->bytes.size() - resp->body_start;
                    write_all(client.get(), std::string_view(resp->bytes).substr(0, resp->body_start + body / 2),
                              stopping_);
                }
                return;
            }
            case Fault::DropResponse:
                // The server has acted on the request; the client never learns.
                upstream.exchange(*req);
                return;
            case Fault::IgnoreRange:
            case Fault::EndlessBody:
            case Fault::Trickle:
            case Fault::LoopTokens:
            case Fault::ReplayListing:
            case Fault::ForeignKeys:
                if (!misbehave(client.get(), upstream, *req, d)) return;
                break;
            }
            if (req->close) return;
        }
    }

    // The misbehaving-server faults; false when the connection must close.
    bool misbehave(int client, Upstream& upstream, const Request& req, const Decision& d) {
        switch (d.fault) {
        case Fault::EndlessBody: {
            if (!write_all(client, "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                                   "Transfer-Encoding: chunked\r\n\r\n", stopping_))
                return false;
            const std::string chunk = "10000\r\n" + std::string(0x10000, 'z') + "\r\n";
            // Until the client hangs up (or the proxy stops): a server that never ends.
            while (!stopping_.load() && write_all(client, chunk, stopping_)) count_sent(chunk.size());
            return false;
        }
        case Fault::Trickle: {
            std::optional<Response> resp = upstream.exchange(req);
            if (!resp) return false;
            std::string_view rest = resp->bytes;
            const size_t step = static_cast<size_t>(std::max(d.trickle_bytes, 1));
            while (!rest.empty() && !stopping_.load()) {
                std::string_view piece = rest.substr(0, step);
                if (!write_all(client, piece, stopping_)) return false;
                count_sent(piece.size());
                rest.remove_prefix(piece.size());
                const auto until = Clock::now() + std::chrono::milliseconds(d.trickle_ms);
                while (!rest.empty() && !stopping_.load() && Clock::now() < until) {
                    // A client that gave up closes its end: stop trickling then.
                    pollfd p{client, POLLIN, 0};
                    if (::poll(&p, 1, 10) > 0) {
                        char b;
                        if (::recv(client, &b, 1, MSG_PEEK) <= 0) return false;
                    }
                }
            }
            return !resp->close;
        }
        case Fault::IgnoreRange: {
            std::optional<Response> resp = upstream.exchange(req);
            if (!resp) return false;
            std::string_view head = final_head(*resp);
            auto cr = header(head, "content-range");  // "bytes A-B/TOTAL"
            size_t first = 0, last = 0, total = 0;
            if (head.substr(9, 3) != "206" || !cr ||
                std::sscanf(std::string(*cr).c_str(), "bytes %zu-%zu/%zu", &first, &last, &total) != 3 ||
                total > (size_t{256} << 20) || last >= total) {
                return write_all(client, resp->bytes, stopping_) && !resp->close;
            }
            std::string whole(total, '\0');
            std::string part = plain_body(*resp);
            whole.replace(first, std::min(part.size(), total - first), part.substr(0, total - first));
            return write_all(client, rebuild(head, whole, "HTTP/1.1 200 OK"), stopping_) && !resp->close;
        }
        case Fault::LoopTokens:
        case Fault::ReplayListing: {
            if (!is_list_request(req)) {
                std::optional<Response> resp = upstream.exchange(req);
                return resp && write_all(client, resp->bytes, stopping_) && !resp->close;
            }
            const std::string token = query_param(req.target, "continuation-token");
            if (token.empty()) {
                std::optional<Response> resp = upstream.exchange(req);
                if (!resp) return false;
                std::string body = plain_body(*resp);
                {
                    std::lock_guard lock(mu_);
                    last_list_body_ = body;
                }
                return write_all(client, rebuild(final_head(*resp), with_token(body, next_token(d.fault, ""))),
                                 stopping_) &&
                       !resp->close;
            }
            std::string body;
            if (d.fault == Fault::LoopTokens) {
                body = R"(<?xml version="1.0" encoding="UTF-8"?><ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">)"
                       "<KeyCount>0</KeyCount></ListBucketResult>";
            } else {
                std::lock_guard lock(mu_);
                body = last_list_body_;
            }
            return write_all(client, xml_response(with_token(body, next_token(d.fault, token))), stopping_);
        }
        case Fault::ForeignKeys: {
            std::optional<Response> resp = upstream.exchange(req);
            if (!resp) return false;
            if (!is_list_request(req) || final_head(*resp).substr(9, 3) != "200")
                return write_all(client, resp->bytes, stopping_) && !resp->close;
            std::string body = plain_body(*resp);
            std::string extra;
            {
                std::lock_guard lock(mu_);
                for (const auto& k : foreign_keys_)
                    extra += "<Contents><Key>" + k + "</Key><LastModified>2026-01-01T00:00:00.000Z</LastModified>"
                             "<ETag>&quot;d41d8cd98f00b204e9800998ecf8427e&quot;</ETag><Size>1</Size></Contents>";
                for (const auto& p : foreign_prefixes_) extra += "<CommonPrefixes><Prefix>" + p + "</Prefix></CommonPrefixes>";
            }
            size_t end = body.rfind("</ListBucketResult>");
            if (end != std::string::npos) body.insert(end, extra);
            return write_all(client, rebuild(final_head(*resp), body), stopping_) && !resp->close;
        }
        default:
            return false;
        }
    }

    // LoopTokens alternates A and B; ReplayListing never repeats a token.
    std::string next_token(Fault f, const std::string& current) {
        if (f == Fault::LoopTokens) return current == "A" ? "B" : "A";
        std::lock_guard lock(mu_);
        return "replay" + std::to_string(++tokens_made_);
    }

    void count_sent(size_t n) {
        std::lock_guard lock(mu_);
        fault_bytes_sent_ += static_cast<long long>(n);
    }

    const std::string upstream_host_;
    const int upstream_port_;
    UniqueFd listen_fd_;
    int port_ = 0;
    std::atomic<bool> stopping_{false};

    mutable std::mutex mu_;  // guards the fault plan and the counters below
    Fault pending_fault_ = Fault::None;
    int pending_count_ = 0;
    Fault always_fault_ = Fault::None;
    std::string filter_method_;
    std::string filter_path_;
    int stall_ms_ = 3000;
    int trickle_bytes_ = 4;
    int trickle_ms_ = 200;
    std::vector<std::string> foreign_keys_, foreign_prefixes_;
    s3::Credentials signing_creds_;  // StripIfNoneMatch's
    std::string last_list_body_;  // ReplayListing's page
    long long tokens_made_ = 0;
    long long fault_bytes_sent_ = 0;
    int requests_seen_ = 0;
    int faults_injected_ = 0;

    struct Worker {
        std::thread thread;
        std::atomic<bool> done{false};
    };
    // Only the accept thread touches workers_ while it runs; the destructor
    // takes over after joining it. A list so `done` never moves.
    std::list<Worker> workers_;
    std::thread accept_thread_;  // started last, once everything it uses exists
};

FaultProxy::FaultProxy(std::string upstream_host, int upstream_port)
    : impl_(std::make_unique<Impl>(std::move(upstream_host), upstream_port)) {}

FaultProxy::~FaultProxy() = default;

int FaultProxy::port() const { return impl_->port_; }

std::string FaultProxy::url() const { return "http://127.0.0.1:" + std::to_string(impl_->port_); }

void FaultProxy::inject(Fault fault, int count) {
    std::lock_guard lock(impl_->mu_);
    impl_->pending_fault_ = fault;
    impl_->pending_count_ = std::max(count, 0);
}

void FaultProxy::inject_always(Fault fault) {
    std::lock_guard lock(impl_->mu_);
    impl_->always_fault_ = fault;
}

void FaultProxy::clear() {
    std::lock_guard lock(impl_->mu_);
    impl_->pending_fault_ = Fault::None;
    impl_->pending_count_ = 0;
    impl_->always_fault_ = Fault::None;
}

void FaultProxy::set_filter(std::string method, std::string path_substring) {
    std::lock_guard lock(impl_->mu_);
    impl_->filter_method_ = std::move(method);
    impl_->filter_path_ = std::move(path_substring);
}

void FaultProxy::set_stall_ms(int ms) {
    std::lock_guard lock(impl_->mu_);
    impl_->stall_ms_ = std::max(ms, 0);
}

void FaultProxy::set_trickle(int bytes, int every_ms) {
    std::lock_guard lock(impl_->mu_);
    impl_->trickle_bytes_ = std::max(bytes, 1);
    impl_->trickle_ms_ = std::max(every_ms, 0);
}

void FaultProxy::set_foreign_listing(std::vector<std::string> keys, std::vector<std::string> prefixes) {
    std::lock_guard lock(impl_->mu_);
    impl_->foreign_keys_ = std::move(keys);
    impl_->foreign_prefixes_ = std::move(prefixes);
}

void FaultProxy::set_signing_key(std::string access_key_id, std::string secret_access_key) {
    std::lock_guard lock(impl_->mu_);
    impl_->signing_creds_ = s3::Credentials(std::move(access_key_id), std::move(secret_access_key));
}

long long FaultProxy::bytes_sent_by_faults() const {
    std::lock_guard lock(impl_->mu_);
    return impl_->fault_bytes_sent_;
}

int FaultProxy::requests_seen() const {
    std::lock_guard lock(impl_->mu_);
    return impl_->requests_seen_;
}

int FaultProxy::faults_injected() const {
    std::lock_guard lock(impl_->mu_);
    return impl_->faults_injected_;
}

}  // namespace bottomless::testing
