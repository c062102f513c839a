// Helpers shared by the libFuzzer harnesses (docs/TESTING.md, "Fuzzing").
// Header-only on purpose: each harness is one translation unit plus this.
#pragma once

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <string_view>

#include "replicator/encryption.h"
#include "s3/crypto.h"
#include "s3/log.h"

namespace bottomless::fuzz {

// Every harness and the seed generator use this key, so encrypted seeds
// decode in the harnesses. Not a secret: it protects nothing.
inline std::string fixed_key() { return std::string(32, '\x42'); }

inline const replicator::Cipher& fixed_cipher() {
    static const std::shared_ptr<const replicator::Cipher> c = replicator::Cipher::from_key(fixed_key());
    return *c;
}

inline std::string_view as_view(const uint8_t* data, size_t size) {
    return {reinterpret_cast<const char*>(data), size};
}

// A mutated object almost never carries the right SHA-256 trailer, and a
// decoder checks the trailer before anything else: without this, every
// mutation would stop at the checksum. Replaces the last 32 bytes by the
// SHA-256 of the bytes before them (inputs shorter than a trailer stay as they are).
constexpr size_t kTrailerSize = 32;
inline std::string with_trailer(std::string_view content) {
    std::string out(content.substr(0, content.size() - std::min(content.size(), kTrailerSize)));
    s3::Sha256Digest d = s3::sha256(out);
    out.append(reinterpret_cast<const char*>(d.data()), d.size());
    return out;
}

// The preamble of an object: magic (8), version (4), header length (4).
constexpr size_t kPreambleSize = 16;
inline uint32_t be32_at(std::string_view s, size_t at) {
    const auto* p = reinterpret_cast<const unsigned char*>(s.data() + at);
    return (uint32_t{p[0]} << 24) | (uint32_t{p[1]} << 16) | (uint32_t{p[2]} << 8) | p[3];
}

// Treats the body of `object` (with its trailer) as plaintext and seals it
// with the fixed key under `info` and the object's own header, as the writer
// would, then fixes the trailer. Mutations of an encrypted object's body
// otherwise fail authentication; this way they reach what comes after it.
// Empty when the preamble does not frame a header and a trailer.
inline std::string reseal(std::string_view object, const char* magic, const replicator::EncryptionInfo& info) {
    if (object.size() < kPreambleSize + kTrailerSize) return {};
    const uint64_t header_len = be32_at(object, 12);
    if (object.size() - kPreambleSize - kTrailerSize < header_len) return {};
    std::string_view header_json = object.substr(kPreambleSize, header_len);
    std::string_view body = object.substr(kPreambleSize + header_len,
                                          object.size() - kPreambleSize - header_len - kTrailerSize);
    std::string out(object.substr(0, kPreambleSize + header_len));
    replicator::ChunkSealer sealer(fixed_cipher(), info, replicator::object_aad(magic, header_json));
    auto emit = [&out](std::string_view chunk) -> Status {
        out.append(chunk);
        return {};
    };
    if (!sealer.write(body, emit) || !sealer.finish(emit)) return {};
    out.append(kTrailerSize, '\0');
    return with_trailer(out);
}

// An abort that libFuzzer records as a crash, with a message saying which
// property failed: a harness's own checks, beside the sanitizers'.
[[noreturn]] inline void fail(const char* what) {
    std::fprintf(stderr, "fuzz property violated: %s\n", what);
    std::abort();
}
#define FUZZ_CHECK(cond)                                        \
    do {                                                        \
        if (!(cond)) ::bottomless::fuzz::fail(#cond);           \
    } while (0)

// A file in memory whose contents are `bytes`, for parsers that only take a
// path: "/proc/self/fd/N" names it, no disk is touched, and it is closed
// (and gone) when this goes out of scope.
class MemFile {
public:
    explicit MemFile(std::string_view bytes) {
        fd_ = ::memfd_create("bottomless-fuzz", MFD_CLOEXEC);
        if (fd_ < 0) fail("memfd_create");
        size_t done = 0;
        while (done < bytes.size()) {
            ssize_t w = ::write(fd_, bytes.data() + done, bytes.size() - done);
            if (w <= 0) fail("write to memfd");
            done += static_cast<size_t>(w);
        }
        path_ = "/proc/self/fd/" + std::to_string(fd_);
    }
    ~MemFile() { ::close(fd_); }
    MemFile(const MemFile&) = delete;
    MemFile& operator=(const MemFile&) = delete;
    const std::string& path() const { return path_; }

private:
    int fd_ = -1;
    std::string path_;
};

// Parsers log what they reject; a fuzzer makes that millions of lines. The
// messages are still built (that code runs too), only not printed.
inline void quiet_logs() {
    static const bool done = [] {
        log::set_sink([](log::Level, std::string_view) {});
        return true;
    }();
    (void)done;
}

}  // namespace bottomless::fuzz
