// OpenSSL-backed digests. Failures of EVP calls here can only mean memory
// exhaustion or a broken OpenSSL, so they throw std::bad_alloc / runtime_error.
#include "s3/crypto.h"

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>

#include <stdexcept>

namespace bottomless::s3 {

void Hasher::Deleter::operator()(evp_md_ctx_st* p) const noexcept { EVP_MD_CTX_free(p); }

Hasher::Hasher(Algo algo) : ctx_(EVP_MD_CTX_new()) {
    if (!ctx_) throw std::bad_alloc();
    const EVP_MD* md = algo == Algo::Sha256 ? EVP_sha256() : EVP_md5();
    if (EVP_DigestInit_ex(ctx_.get(), md, nullptr) != 1) throw std::runtime_error("EVP_DigestInit_ex failed");
}
Hasher::~Hasher() = default;
Hasher::Hasher(Hasher&&) noexcept = default;
Hasher& Hasher::operator=(Hasher&&) noexcept = default;

void Hasher::update(const void* data, size_t n) {
    if (n && EVP_DigestUpdate(ctx_.get(), data, n) != 1) throw std::runtime_error("EVP_DigestUpdate failed");
}

std::string Hasher::finish() {
    unsigned char out[EVP_MAX_MD_SIZE];
    unsigned int len = 0;
    if (EVP_DigestFinal_ex(ctx_.get(), out, &len) != 1) throw std::runtime_error("EVP_DigestFinal_ex failed");
    return std::string(reinterpret_cast<char*>(out), len);
}

Sha256Digest sha256(std::string_view data) {
    Sha256Digest d{};
    unsigned int len = 0;
    if (EVP_Digest(data.data(), data.size(), d.data(), &len, EVP_sha256(), nullptr) != 1)
        throw std::runtime_error("EVP_Digest(sha256) failed");
    return d;
}

Md5Digest md5(std::string_view data) {
    Md5Digest d{};
    unsigned int len = 0;
    if (EVP_Digest(data.data(), data.size(), d.data(), &len, EVP_md5(), nullptr) != 1)
        throw std::runtime_error("EVP_Digest(md5) failed");
    return d;
}

Sha256Digest hmac_sha256(std::string_view key, std::string_view data) {
    Sha256Digest d{};
    unsigned int len = 0;
    if (!HMAC(EVP_sha256(), key.data(), static_cast<int>(key.size()),
              reinterpret_cast<const unsigned char*>(data.data()), data.size(), d.data(), &len))
        throw std::runtime_error("HMAC(sha256) failed");
    return d;
}

std::string to_hex(const unsigned char* data, size_t n) {
    static constexpr char kDigits[] = "0123456789abcdef";
    std::string out(n * 2, '\0');
    for (size_t i = 0; i < n; ++i) {
        out[2 * i] = kDigits[data[i] >> 4];
        out[2 * i + 1] = kDigits[data[i] & 0xf];
    }
    return out;
}

std::string base64(const unsigned char* data, size_t n) {
    std::string out(4 * ((n + 2) / 3) + 1, '\0');
    int len = EVP_EncodeBlock(reinterpret_cast<unsigned char*>(out.data()), data, static_cast<int>(n));
    out.resize(static_cast<size_t>(len));
    return out;
}

void secure_wipe(void* p, size_t n) noexcept {
    if (p && n) OPENSSL_cleanse(p, n);
}

void secure_wipe(std::string& s) noexcept {
    secure_wipe(s.data(), s.size());
    s.clear();
}

}  // namespace bottomless::s3
