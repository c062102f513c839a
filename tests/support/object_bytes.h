// Byte-level helpers for tests that edit stored objects (docs/FORMAT.md): where
// the body starts, and a fresh SHA-256 trailer after an edit, so that only
// the edit itself (and not the checksum) is wrong.
#pragma once

#include <cstddef>
#include <string>
#include <string_view>

#include "s3/crypto.h"

namespace bottomless::testing {

// Magic (8), version (4), header length (4, big-endian), header.
inline size_t object_body_start(std::string_view obj) {
    const auto* u = reinterpret_cast<const unsigned char*>(obj.data() + 12);
    return 16 + ((size_t{u[0]} << 24) | (size_t{u[1]} << 16) | (size_t{u[2]} << 8) | u[3]);
}

// `content` (an object without its trailer) with its SHA-256 trailer appended.
inline std::string with_trailer(std::string content) {
    auto d = s3::sha256(content);
    content.append(reinterpret_cast<const char*>(d.data()), d.size());
    return content;
}

}  // namespace bottomless::testing
