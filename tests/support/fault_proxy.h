// A fault-injecting HTTP/1.1 forward proxy for the integration tests.
//
// The S3 client is pointed at url() as its (path-style) endpoint; the proxy
// forwards each request byte-for-byte to the real S3 server, so SigV4
// signatures (which cover the Host header) stay valid, and on demand replaces
// the exchange with a fault: a reset, a throttling reply, a stall, a cut-off
// body or a lost response. It exists so the retry and idempotency paths of
// the client and the replicator are exercised against a real server.
//
// Caveat for test authors: libcurl silently resends a request once on a fresh
// connection when a *reused* keep-alive connection dies before any response
// byte arrives (ResetBeforeRequest, DropResponse, Stall without a timeout).
// inject(fault, 1) on a reused connection is therefore invisible to the
// caller; inject two, or use inject_always(), to see the error surface.
#pragma once

#include <memory>
#include <string>
#include <vector>

namespace bottomless::testing {

enum class Fault {
    None,                // forward faithfully
    ResetBeforeRequest,  // read the request, then close the client with RST; nothing forwarded
    Status503SlowDown,   // answer 503 SlowDown (S3 XML), keep the connection; nothing forwarded
    Status500,           // answer 500 InternalError (S3 XML), keep the connection; nothing forwarded
    Status403AccessDenied,  // answer 403 AccessDenied (S3 XML), keep the connection; nothing forwarded:
                            // a refusal the client does not retry (revoked credentials, a bucket policy)
    Stall,               // read the request, send nothing for stall_ms, then close; nothing forwarded
    TruncateBody,        // forward; send the headers and half the response body, then close
    DropResponse,        // forward and read the whole response (the server acted), then close silently

    // A misbehaving server (hostile or broken), for the client's defences:
    IgnoreRange,         // forward; a 206 answer is turned into 200 with the whole object (bytes outside
                         // the range are zeros; the object's size comes from Content-Range)
    EndlessBody,         // answer 200 with a chunked body that never ends; nothing forwarded
    Trickle,             // forward; send the answer (head included) trickle_bytes every trickle_ms
    LoopTokens,          // ListObjectsV2: a request without a continuation token is forwarded and its page
                         // made truncated with token "A"; one with a token gets an empty truncated page
                         // with the other token (A, B, A, B, ...) and is not forwarded
    ReplayListing,       // ListObjectsV2: a request without a token is forwarded and its page made truncated
                         // with a fresh token; one with a token gets that same page again with a fresh token
    ForeignKeys,         // ListObjectsV2: forward, then add set_foreign_listing()'s keys and prefixes
    StripIfNoneMatch,    // forward without the If-None-Match header, re-signed with set_signing_key()'s
                         // keys: a server that ignores conditional creates (the PUT overwrites)
};

class FaultProxy {
public:
    // Listens on 127.0.0.1 on an ephemeral port; throws std::system_error if it cannot.
    FaultProxy(std::string upstream_host, int upstream_port);
    // Stops the accept thread and every connection thread and closes all sockets.
    ~FaultProxy();
    FaultProxy(const FaultProxy&) = delete;
    FaultProxy& operator=(const FaultProxy&) = delete;

    int port() const;
    std::string url() const;  // "http://127.0.0.1:PORT"

    // The next `count` matching requests (in arrival order, across
    // connections) get `fault`; then behaviour returns to None. Replaces any
    // earlier counted injection.
    void inject(Fault fault, int count = 1);
    // Every matching request gets `fault` until clear(). A counted injection
    // still pending takes precedence.
    void inject_always(Fault fault);
    // Drops counted and persistent faults. Leaves the filter and stall time.
    void clear();
    // Only requests whose method equals `method` and whose request-target
    // contains `path_substring` consume faults; an empty string matches all.
    // set_filter("", "") removes the filter.
    void set_filter(std::string method, std::string path_substring);
    void set_stall_ms(int ms);  // default 3000
    void set_trickle(int bytes, int every_ms);  // default 4 bytes every 200 ms
    // What ForeignKeys adds to a listing page: <Contents> keys and <CommonPrefixes>.
    void set_foreign_listing(std::vector<std::string> keys, std::vector<std::string> prefixes);
    // The keys StripIfNoneMatch re-signs a request with (If-None-Match is a
    // signed header: dropping it alone would fail the signature check).
    void set_signing_key(std::string access_key_id, std::string secret_access_key);
    // Bytes the proxy sent to clients for faults that write bodies of their
    // own (EndlessBody, Trickle): how much a client took before giving up.
    long long bytes_sent_by_faults() const;

    int requests_seen() const;    // requests fully read from clients
    int faults_injected() const;  // requests that got a fault other than None

private:
    struct Impl;
    std::unique_ptr<Impl> impl_;
};

}  // namespace bottomless::testing
