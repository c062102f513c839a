// Hashes and encodings the S3 client needs (SHA-256, HMAC-SHA256, MD5, hex,
// base64), on OpenSSL's EVP interface. Owned EVP handles live in unique_ptrs.
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

struct evp_md_ctx_st;

namespace bottomless::s3 {

using Sha256Digest = std::array<unsigned char, 32>;
using Md5Digest = std::array<unsigned char, 16>;

Sha256Digest sha256(std::string_view data);
Md5Digest md5(std::string_view data);
Sha256Digest hmac_sha256(std::string_view key, std::string_view data);

std::string to_hex(const unsigned char* data, size_t n);
template <size_t N>
std::string to_hex(const std::array<unsigned char, N>& d) { return to_hex(d.data(), N); }
std::string base64(const unsigned char* data, size_t n);
template <size_t N>
std::string base64(const std::array<unsigned char, N>& d) { return base64(d.data(), N); }

inline std::string sha256_hex(std::string_view data) { return to_hex(sha256(data)); }

// Overwrites memory that held a secret so it does not linger after use.
void secure_wipe(void* p, size_t n) noexcept;
void secure_wipe(std::string& s) noexcept;

// Incremental digest for data that arrives in pieces (files, streams).
class Hasher {
public:
    enum class Algo { Sha256, Md5 };
    explicit Hasher(Algo algo);
    ~Hasher();
    Hasher(Hasher&&) noexcept;
    Hasher& operator=(Hasher&&) noexcept;
    void update(const void* data, size_t n);
    void update(std::string_view s) { update(s.data(), s.size()); }
    // Returns the raw digest (32 bytes for SHA-256, 16 for MD5); the hasher is spent.
    std::string finish();

private:
    struct Deleter { void operator()(evp_md_ctx_st* p) const noexcept; };
    std::unique_ptr<evp_md_ctx_st, Deleter> ctx_;
};

}  // namespace bottomless::s3
