// Hashes and encodings the S3 client needs (SHA-256, HMAC-SHA256, MD5, hex,
// base64), on OpenSSL's EVP interface. Owned EVP handles live in unique_ptrs.
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

struct evp_md_ctx_st;
struct evp_cipher_ctx_st;

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

// Decodes standard or URL-safe base64 (padding optional); false on anything else.
bool from_base64(std::string_view text, std::string& out);
// Decodes hex digits (either case); false on anything else.
bool from_hex(std::string_view text, std::string& out);

inline std::string sha256_hex(std::string_view data) { return to_hex(sha256(data)); }

// Overwrites memory that held a secret so it does not linger after use.
void secure_wipe(void* p, size_t n) noexcept;
void secure_wipe(std::string& s) noexcept;

// Key material that lives as long as a database is open: kept in pages of
// its own, excluded from core dumps (MADV_DONTDUMP) and, where the memlock
// limit allows, from swap (mlock); wiped and unmapped on destruction.
class SecretBytes {
public:
    explicit SecretBytes(std::string_view bytes);
    // Copies, then wipes the source (a derived key's only other copy).
    explicit SecretBytes(std::string&& bytes) : SecretBytes(std::string_view(bytes)) { secure_wipe(bytes); }
    ~SecretBytes();
    SecretBytes(const SecretBytes&) = delete;
    SecretBytes& operator=(const SecretBytes&) = delete;
    std::string_view view() const { return {data_, size_}; }
    // Whether the pages are excluded from core dumps (false only if the
    // kernel refused; the bytes are still wiped at the end).
    bool dump_excluded() const { return dont_dump_; }

private:
    char* data_ = nullptr;
    size_t size_ = 0, mapped_ = 0;
    bool dont_dump_ = false, locked_ = false;
};

// Cryptographically strong random bytes (OpenSSL's RAND_bytes).
std::string random_bytes(size_t n);

// HKDF-SHA256 (RFC 5869): `n` bytes of key material from `ikm`.
std::string hkdf_sha256(std::string_view ikm, std::string_view salt, std::string_view info, size_t n);

// scrypt (RFC 7914). Returns false when the parameters are unusable (N not a
// power of two, memory beyond `max_mem`); `out` is then untouched.
bool scrypt(std::string_view passphrase, std::string_view salt, uint64_t n, uint32_t r, uint32_t p, size_t out_len,
            uint64_t max_mem, std::string& out);

// AES-256-GCM with one key and many messages: the key schedule is set up
// once, each seal/open only sets the 12-byte nonce. Tags are 16 bytes,
// appended to the ciphertext. Not thread-safe; one per stream.
class AesGcm {
public:
    static constexpr size_t kKeySize = 32, kNonceSize = 12, kTagSize = 16;
    explicit AesGcm(std::string_view key);  // kKeySize bytes
    ~AesGcm();
    AesGcm(const AesGcm&) = delete;
    AesGcm& operator=(const AesGcm&) = delete;
    // Writes ciphertext || tag (plain.size() + kTagSize bytes) to `out`.
    void seal(const unsigned char* nonce, std::string_view aad, std::string_view plain, unsigned char* out);
    void seal(const unsigned char* nonce, std::string_view aad, std::string_view plain, std::string& out);
    // Writes the plaintext of `sealed` (ciphertext || tag) to `out`
    // (sealed.size() - kTagSize bytes); false when the tag does not verify,
    // and `out` is then wiped.
    bool open(const unsigned char* nonce, std::string_view aad, std::string_view sealed, unsigned char* out);
    bool open(const unsigned char* nonce, std::string_view aad, std::string_view sealed, std::string& out);

private:
    struct Deleter { void operator()(evp_cipher_ctx_st* p) const noexcept; };
    std::unique_ptr<evp_cipher_ctx_st, Deleter> enc_, dec_;
};

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
