// How the S3 client reads a failed answer: error_from_response() turns an
// HTTP status, an S3 <Error> body or a transport failure into an Error whose
// kind and message say what to check; is_retryable() says which may pass when
// sent again; check_range_answer() refuses a ranged GET answered with other
// bytes than were asked for. Everything a server wrote is escaped first.
#include <algorithm>
#include <cstdint>
#include <iterator>
#include <string_view>

#include "s3/client_internal.h"
#include "s3/log.h"
#include "s3/xml.h"

namespace bottomless::s3 {

using namespace client_detail;

namespace {

bool retryable_code(const std::string& code) {
    static constexpr std::string_view kCodes[] = {
        "SlowDown", "RequestTimeout", "InternalError", "ServiceUnavailable", "Throttling", "ThrottlingException",
        "BadDigest", "XAmzContentSHA256Mismatch", "IncompleteBody", "OperationAborted",
        "ConditionalRequestConflict", "RequestThrottled", "TooManyRequests",
    };
    return std::find(std::begin(kCodes), std::end(kCodes), code) != std::end(kCodes);
}

std::string range_text(const ByteRange& r) {
    return "bytes " + std::to_string(r.offset) + "-" + (r.length ? std::to_string(r.offset + *r.length - 1) : "");
}

// "bytes FIRST-LAST/TOTAL" (TOTAL may be "*").
bool parse_content_range(std::string_view v, uint64_t& first, uint64_t& last) {
    if (v.rfind("bytes ", 0) != 0) return false;
    v.remove_prefix(6);
    auto num = [&](uint64_t& out, char end) {
        size_t i = 0;
        out = 0;
        while (i < v.size() && v[i] >= '0' && v[i] <= '9') {
            if (out > (UINT64_MAX - 9) / 10) return false;
            out = out * 10 + static_cast<uint64_t>(v[i++] - '0');
        }
        if (i == 0 || i >= v.size() || v[i] != end) return false;
        v.remove_prefix(i + 1);
        return true;
    };
    return num(first, '-') && num(last, '/') && first <= last;
}

}  // namespace

bool client_detail::is_retryable(const Error& e) {
    switch (e.kind) {
    case ErrorKind::Transport:
    case ErrorKind::Throttled:
    case ErrorKind::Server: return true;
    default: return retryable_code(e.code);
    }
}

std::string client_detail::describe_target(const std::string& bucket, const std::string& key) {
    return key.empty() ? "bucket '" + bucket + "'" : "s3://" + bucket + "/" + log::printable(key, 300);
}

Error Client::error_from_response(const Call& call, const http::Response& resp) const {
    Error e;
    std::string target = describe_target(call.bucket, call.key);
    // Everything the server wrote is escaped before it can reach a terminal or a log.
    e.request_id = log::printable(resp.header("x-amz-request-id"), 128);
    if (!resp.callback_error.empty()) {
        e.kind = ErrorKind::Io;
        e.code = resp.callback_error == "out of memory" ? "OutOfMemory" : "CallbackFailed";
        e.message = std::string(call.op) + " " + target + ": the transfer was stopped: " + resp.callback_error;
        return e;
    }
    if (resp.too_large) {
        e.kind = ErrorKind::Corrupt;
        e.http_status = static_cast<int>(resp.status);
        if (call.range && resp.status == 200) {
            e.code = "RangeIgnored";
            e.message = std::string(call.op) + " " + target + ": the server answered a request for " +
                        range_text(*call.range) +
                        " with the whole object (HTTP 200): it ignores the Range header; use an S3 server that "
                        "supports ranged GETs";
        } else {
            e.code = "ResponseTooLarge";
            e.message = std::string(call.op) + " " + target + ": the server's answer is larger than the " +
                        std::to_string(call.max_body) +
                        " bytes this request can return (or its headers exceed " +
                        std::to_string(http::kMaxHeaderBytes) + " bytes); the transfer was stopped";
        }
        return e;
    }
    if (resp.status == 0) {
        e.kind = ErrorKind::Transport;
        e.code = http::curl_code_name(resp.curl_code);
        e.message = std::string(call.op) + " " + target + ": " + resp.curl_error;
        if (resp.sink_failed) {
            e.kind = ErrorKind::Io;
            e.message = std::string(call.op) + " " + target + ": cannot write the downloaded data locally";
        }
        return e;
    }
    e.http_status = static_cast<int>(resp.status);
    auto body = xml::parse_error(resp.body);
    if (body) {
        e.code = log::printable(body->code, 64);
        if (e.request_id.empty()) e.request_id = log::printable(body->request_id, 128);
    }
    std::string server_msg = body && !body->message.empty() ? " (server: " + log::printable(body->message, 512) + ")" : "";
    long s = resp.status;
    if (resp.curl_code != 0 && s >= 200 && s < 300) {
        // A 2xx whose body was cut short or whose transfer failed midway.
        e.kind = resp.sink_failed ? ErrorKind::Io : ErrorKind::Transport;
        e.code = http::curl_code_name(resp.curl_code);
        e.message = std::string(call.op) + " " + target + ": " + resp.curl_error;
        if (resp.sink_failed) e.message = std::string(call.op) + " " + target + ": cannot write the downloaded data locally";
        return e;
    }
    if (s == 404) {
        e.kind = ErrorKind::NotFound;
        if (e.code.empty()) e.code = call.key.empty() ? "NoSuchBucket" : "NoSuchKey";
        if (e.code == "NoSuchBucket")
            e.message = "bucket '" + call.bucket + "' does not exist at " +
                        (config_.endpoint.empty() ? "AWS region " + config_.region : config_.endpoint) +
                        ": check LIBSQL_BOTTOMLESS_BUCKET and the endpoint, or create it";
        else if (e.code == "NoSuchUpload")
            e.message = "multipart upload for " + target + " no longer exists (completed or aborted)";
        else
            e.message = target + " does not exist";
    } else if (s == 403 || s == 401 || e.code == "ExpiredToken" || e.code == "InvalidToken" ||
               e.code == "TokenRefreshRequired") {  // AWS answers an expired token with 400
        e.kind = ErrorKind::Auth;
        if (e.code.empty()) e.code = "AccessDenied";
        std::string who = "access key id '" + call.key_id + "' (from " +
                          (call.key_source.empty() ? "configuration" : call.key_source) + ")";
        if (e.code == "SignatureDoesNotMatch")
            e.message = "the server rejected the request signature: the secret access key does not match " + who +
                        "; check AWS_SECRET_ACCESS_KEY or the profile's aws_secret_access_key";
        else if (e.code == "InvalidAccessKeyId")
            e.message = "the server does not know " + who + "; check AWS_ACCESS_KEY_ID, AWS_PROFILE and the endpoint";
        else if (e.code == "RequestTimeTooSkewed")
            e.message = "the system clock differs too much from the server's; fix the clock (NTP) and retry";
        else if (e.code == "ExpiredToken" || e.code == "InvalidToken")
            e.message = "the session token of " + who +
                        " was rejected; refresh AWS_SESSION_TOKEN or the profile's credentials";
        else
            e.message = std::string(call.op) + " on " + target + " was denied for " + who +
                        "; check the credentials' permissions";
    } else if (s == 412) {
        e.kind = ErrorKind::Precondition;
        if (e.code.empty()) e.code = "PreconditionFailed";
        e.message = target + " already exists or changed (conditional request refused)";
    } else if (s == 429 || e.code == "SlowDown" || e.code == "Throttling" || e.code == "RequestThrottled") {
        e.kind = ErrorKind::Throttled;
        if (e.code.empty()) e.code = "TooManyRequests";
        e.message = "the server asked to slow down";
    } else if (s >= 500) {
        e.kind = ErrorKind::Server;
        if (e.code.empty()) e.code = "HTTP" + std::to_string(s);
        e.message = std::string(call.op) + " " + target + ": server error";
    } else if (s == 301 || s == 307 || e.code == "PermanentRedirect" || e.code == "AuthorizationHeaderMalformed") {
        e.kind = ErrorKind::InvalidArgument;
        if (e.code.empty()) e.code = "PermanentRedirect";
        e.message = "bucket '" + call.bucket + "' is not in region " + config_.region +
                    " or not at this endpoint; set AWS_REGION to the bucket's region";
    } else {
        e.kind = ErrorKind::InvalidArgument;
        if (e.code.empty()) e.code = "HTTP" + std::to_string(s);
        e.message = std::string(call.op) + " " + target + " was rejected";
    }
    e.message += server_msg;
    return e;
}

Status Client::check_range_answer(const Call& call, const http::Response& resp, const ByteRange& range) const {
    const std::string what = std::string(call.op) + " " + describe_target(call.bucket, call.key) + ": ";
    auto bad = [&](const std::string& code, const std::string& why) {
        Error e = make_error(ErrorKind::Corrupt, what + why, code);
        e.http_status = static_cast<int>(resp.status);
        e.request_id = log::printable(resp.header("x-amz-request-id"), 128);
        return e;
    };
    if (resp.status == 200) {
        // A server without Range support sends the whole object. That is the
        // answer only when the range starts at 0 and the object fits in it
        // (the cap already refused anything longer).
        if (range.offset == 0) return {};
        return bad("RangeIgnored", "the server answered a request for " + range_text(range) +
                                       " with the whole object (HTTP 200): it ignores the Range header; use an S3 "
                                       "server that supports ranged GETs");
    }
    if (resp.status != 206)
        return bad("BadContentRange", "a ranged GET was answered with HTTP " + std::to_string(resp.status));
    uint64_t first = 0, last = 0;
    std::string cr = resp.header("content-range");
    if (!parse_content_range(cr, first, last))
        return bad("BadContentRange", "the answer to a ranged GET has no valid Content-Range ('" +
                                          log::printable(cr, 100) + "')");
    // The first byte must be the one asked for; the last may come early only
    // at the end of the object (a range past it is clamped by S3).
    bool ok = first == range.offset && last - first + 1 == resp.body_bytes;
    if (ok && range.length) ok = last <= range.offset + *range.length - 1;
    if (!ok)
        return bad("BadContentRange", "asked for " + range_text(range) + ", the server sent '" +
                                          log::printable(cr, 100) + "' with " + std::to_string(resp.body_bytes) +
                                          " bytes");
    return {};
}

}  // namespace bottomless::s3
