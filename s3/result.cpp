// Error descriptions for the shared Result type.
#include "s3/result.h"

namespace bottomless {

const char* to_string(ErrorKind kind) noexcept {
    switch (kind) {
    case ErrorKind::Transport: return "transport";
    case ErrorKind::Auth: return "auth";
    case ErrorKind::NotFound: return "not found";
    case ErrorKind::Throttled: return "throttled";
    case ErrorKind::Server: return "server";
    case ErrorKind::Precondition: return "precondition";
    case ErrorKind::Corrupt: return "corrupt";
    case ErrorKind::InvalidArgument: return "invalid argument";
    case ErrorKind::Io: return "io";
    case ErrorKind::Cancelled: return "cancelled";
    }
    return "unknown";
}

std::string Error::describe() const {
    std::string s = to_string(kind);
    if (!code.empty()) s += ": " + code;
    if (http_status != 0) s += " (HTTP " + std::to_string(http_status) + ")";
    if (!message.empty()) s += ": " + message;
    if (!request_id.empty()) s += " [request id " + request_id + "]";
    return s;
}

}  // namespace bottomless
