// OpenSSL-backed digests. Failures of EVP calls here can only mean memory
// exhaustion or a broken OpenSSL, so they throw std::bad_alloc / runtime_error.
#include "s3/crypto.h"

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/kdf.h>
#include <openssl/rand.h>

#include <sys/mman.h>
#include <unistd.h>

#include <cstring>
#include <new>
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
    // Called per 4 KiB page by the snapshot's page index: EVP_Digest's
    // implicit fetch and context allocation cost ~30 % of hashing a page,
    // so the algorithm is fetched once and each thread keeps a context.
    static EVP_MD* const md = EVP_MD_fetch(nullptr, "SHA256", nullptr);
    struct CtxFree {
        void operator()(EVP_MD_CTX* c) const noexcept { EVP_MD_CTX_free(c); }
    };
    thread_local std::unique_ptr<EVP_MD_CTX, CtxFree> ctx(EVP_MD_CTX_new());
    Sha256Digest d{};
    unsigned int len = 0;
    if (!ctx || EVP_DigestInit_ex(ctx.get(), md ? md : EVP_sha256(), nullptr) != 1 ||
        EVP_DigestUpdate(ctx.get(), data.data(), data.size()) != 1 || EVP_DigestFinal_ex(ctx.get(), d.data(), &len) != 1)
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

bool from_base64(std::string_view text, std::string& out) {
    std::string t(text);
    for (char& c : t) {
        if (c == '-') c = '+';
        else if (c == '_') c = '/';
    }
    while (t.size() % 4) t += '=';
    size_t pad = 0;
    for (size_t i = t.size(); i > 0 && t[i - 1] == '='; --i) ++pad;
    if (pad > 2) return false;
    std::string raw(t.size() / 4 * 3 + 1, '\0');
    int n = EVP_DecodeBlock(reinterpret_cast<unsigned char*>(raw.data()),
                            reinterpret_cast<const unsigned char*>(t.data()), static_cast<int>(t.size()));
    secure_wipe(t);
    if (n < 0 || static_cast<size_t>(n) < pad) {
        secure_wipe(raw);
        return false;
    }
    raw.resize(static_cast<size_t>(n) - pad);  // EVP_DecodeBlock counts padding as zero bytes
    secure_wipe(out);
    out = std::move(raw);
    return true;
}

bool from_hex(std::string_view text, std::string& out) {
    if (text.size() % 2) return false;
    auto nibble = [](char c) -> int {
        if (c >= '0' && c <= '9') return c - '0';
        if (c >= 'a' && c <= 'f') return c - 'a' + 10;
        if (c >= 'A' && c <= 'F') return c - 'A' + 10;
        return -1;
    };
    std::string raw(text.size() / 2, '\0');
    for (size_t i = 0; i < raw.size(); ++i) {
        int hi = nibble(text[2 * i]), lo = nibble(text[2 * i + 1]);
        if (hi < 0 || lo < 0) {
            secure_wipe(raw);
            return false;
        }
        raw[i] = static_cast<char>(hi << 4 | lo);
    }
    secure_wipe(out);
    out = std::move(raw);
    return true;
}

std::string random_bytes(size_t n) {
    std::string out(n, '\0');
    if (n && RAND_bytes(reinterpret_cast<unsigned char*>(out.data()), static_cast<int>(n)) != 1)
        throw std::runtime_error("RAND_bytes failed: no entropy source");
    return out;
}

namespace {
struct PkeyCtxDeleter {
    void operator()(EVP_PKEY_CTX* p) const noexcept { EVP_PKEY_CTX_free(p); }
};
}  // namespace

std::string hkdf_sha256(std::string_view ikm, std::string_view salt, std::string_view info, size_t n) {
    std::unique_ptr<EVP_PKEY_CTX, PkeyCtxDeleter> ctx(EVP_PKEY_CTX_new_id(EVP_PKEY_HKDF, nullptr));
    if (!ctx) throw std::bad_alloc();
    auto u = [](std::string_view s) { return reinterpret_cast<const unsigned char*>(s.data()); };
    std::string out(n, '\0');
    size_t len = n;
    // An empty salt means "no salt" (RFC 5869: a string of zeros); OpenSSL
    // wants that spelled as not setting one.
    if (EVP_PKEY_derive_init(ctx.get()) != 1 || EVP_PKEY_CTX_set_hkdf_md(ctx.get(), EVP_sha256()) != 1 ||
        (!salt.empty() && EVP_PKEY_CTX_set1_hkdf_salt(ctx.get(), u(salt), static_cast<int>(salt.size())) != 1) ||
        EVP_PKEY_CTX_set1_hkdf_key(ctx.get(), u(ikm), static_cast<int>(ikm.size())) != 1 ||
        EVP_PKEY_CTX_add1_hkdf_info(ctx.get(), u(info), static_cast<int>(info.size())) != 1 ||
        EVP_PKEY_derive(ctx.get(), reinterpret_cast<unsigned char*>(out.data()), &len) != 1 || len != n)
        throw std::runtime_error("HKDF-SHA256 failed");
    return out;
}

bool scrypt(std::string_view passphrase, std::string_view salt, uint64_t n, uint32_t r, uint32_t p, size_t out_len,
            uint64_t max_mem, std::string& out) {
    std::string key(out_len, '\0');
    if (EVP_PBE_scrypt(passphrase.data(), passphrase.size(), reinterpret_cast<const unsigned char*>(salt.data()),
                       salt.size(), n, r, p, max_mem, reinterpret_cast<unsigned char*>(key.data()), out_len) != 1) {
        secure_wipe(key);
        return false;
    }
    secure_wipe(out);
    out = std::move(key);
    return true;
}

void AesGcm::Deleter::operator()(evp_cipher_ctx_st* p) const noexcept { EVP_CIPHER_CTX_free(p); }

AesGcm::AesGcm(std::string_view key) : enc_(EVP_CIPHER_CTX_new()), dec_(EVP_CIPHER_CTX_new()) {
    if (!enc_ || !dec_) throw std::bad_alloc();
    if (key.size() != kKeySize) throw std::invalid_argument("AES-256-GCM needs a 32-byte key");
    auto k = reinterpret_cast<const unsigned char*>(key.data());
    // The default IV length of GCM in OpenSSL is 12 bytes: no ctrl needed.
    if (EVP_EncryptInit_ex(enc_.get(), EVP_aes_256_gcm(), nullptr, k, nullptr) != 1 ||
        EVP_DecryptInit_ex(dec_.get(), EVP_aes_256_gcm(), nullptr, k, nullptr) != 1)
        throw std::runtime_error("AES-256-GCM init failed");
}

AesGcm::~AesGcm() = default;  // EVP_CIPHER_CTX_free cleanses the key schedule

void AesGcm::seal(const unsigned char* nonce, std::string_view aad, std::string_view plain, unsigned char* dst) {
    EVP_CIPHER_CTX* c = enc_.get();
    int len = 0, fin = 0;
    if (EVP_EncryptInit_ex(c, nullptr, nullptr, nullptr, nonce) != 1 ||
        (!aad.empty() && EVP_EncryptUpdate(c, nullptr, &len, reinterpret_cast<const unsigned char*>(aad.data()),
                                           static_cast<int>(aad.size())) != 1) ||
        (!plain.empty() && EVP_EncryptUpdate(c, dst, &len, reinterpret_cast<const unsigned char*>(plain.data()),
                                             static_cast<int>(plain.size())) != 1) ||
        EVP_EncryptFinal_ex(c, dst + (plain.empty() ? 0 : len), &fin) != 1 ||
        EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_GCM_GET_TAG, static_cast<int>(kTagSize), dst + plain.size()) != 1)
        throw std::runtime_error("AES-256-GCM encryption failed");
}

void AesGcm::seal(const unsigned char* nonce, std::string_view aad, std::string_view plain, std::string& out) {
    const size_t at = out.size();
    out.resize(at + plain.size() + kTagSize);
    seal(nonce, aad, plain, reinterpret_cast<unsigned char*>(out.data() + at));
}

bool AesGcm::open(const unsigned char* nonce, std::string_view aad, std::string_view sealed, unsigned char* dst) {
    if (sealed.size() < kTagSize) return false;
    EVP_CIPHER_CTX* c = dec_.get();
    const size_t n = sealed.size() - kTagSize;
    unsigned char tag[kTagSize];
    std::memcpy(tag, sealed.data() + n, kTagSize);
    int len = 0, fin = 0;
    bool ok = EVP_DecryptInit_ex(c, nullptr, nullptr, nullptr, nonce) == 1 &&
              (aad.empty() || EVP_DecryptUpdate(c, nullptr, &len, reinterpret_cast<const unsigned char*>(aad.data()),
                                                static_cast<int>(aad.size())) == 1) &&
              (n == 0 || EVP_DecryptUpdate(c, dst, &len, reinterpret_cast<const unsigned char*>(sealed.data()),
                                           static_cast<int>(n)) == 1) &&
              EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_GCM_SET_TAG, static_cast<int>(kTagSize), tag) == 1 &&
              EVP_DecryptFinal_ex(c, dst + (n == 0 ? 0 : len), &fin) == 1;
    if (!ok) secure_wipe(dst, n);  // unauthenticated plaintext must not leave this function
    return ok;
}

bool AesGcm::open(const unsigned char* nonce, std::string_view aad, std::string_view sealed, std::string& out) {
    if (sealed.size() < kTagSize) return false;
    const size_t at = out.size();
    out.resize(at + sealed.size() - kTagSize);
    if (open(nonce, aad, sealed, reinterpret_cast<unsigned char*>(out.data() + at))) return true;
    out.resize(at);
    return false;
}

void secure_wipe(void* p, size_t n) noexcept {
    if (p && n) OPENSSL_cleanse(p, n);
}

SecretBytes::SecretBytes(std::string_view bytes) : size_(bytes.size()) {
    const size_t page = static_cast<size_t>(::sysconf(_SC_PAGESIZE));
    mapped_ = std::max<size_t>(page, (bytes.size() + page - 1) / page * page);
    void* p = ::mmap(nullptr, mapped_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) throw std::bad_alloc();
    data_ = static_cast<char*>(p);
    dont_dump_ = ::madvise(p, mapped_, MADV_DONTDUMP) == 0;
    locked_ = ::mlock(p, mapped_) == 0;  // best effort: RLIMIT_MEMLOCK may be small
    if (size_) std::memcpy(data_, bytes.data(), size_);
}

SecretBytes::~SecretBytes() {
    secure_wipe(data_, mapped_);
    if (locked_) ::munlock(data_, mapped_);
    ::munmap(data_, mapped_);
}

void secure_wipe(std::string& s) noexcept {
    secure_wipe(s.data(), s.size());
    s.clear();
}

}  // namespace bottomless::s3
