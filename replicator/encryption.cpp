// Keys, chunked AES-256-GCM and the per-database KDF object. Layout and
// reasoning in encryption.h and docs/ENCRYPTION.md.
#include "replicator/encryption.h"

#include <cstring>
#include <limits>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>

#include "replicator/format.h"
#include "replicator/wal.h"
#include "s3/client.h"
#include "s3/log.h"

namespace bottomless::replicator {

namespace {

constexpr size_t kKeySize = 32;
constexpr size_t kSeedSize = 32;
constexpr size_t kKeyIdSize = 8;
// The KDF object's size: ~150 bytes when we write it.
constexpr size_t kKdfObjectMaxBytes = 64u << 10;

void put_be(unsigned char* p, uint64_t v, int bytes) {
    for (int i = bytes - 1; i >= 0; --i, v >>= 8) p[i] = static_cast<unsigned char>(v);
}

// be64(index) || be32(final): unique per chunk within one object key.
void chunk_nonce(unsigned char* nonce, uint64_t index, bool final) {
    put_be(nonce, index, 8);
    put_be(nonce + 8, final ? 1 : 0, 4);
}

std::unique_ptr<s3::AesGcm> object_gcm(const Cipher& cipher, const EncryptionInfo& info) {
    std::string key = cipher.object_key(info);
    auto gcm = std::make_unique<s3::AesGcm>(key);
    s3::secure_wipe(key);
    return gcm;
}

}  // namespace

// ---- the configured secret ----

EncryptionSecret::~EncryptionSecret() { s3::secure_wipe(material_); }
EncryptionSecret::EncryptionSecret(const EncryptionSecret& o) : kind_(o.kind_), material_(o.material_) {}
EncryptionSecret& EncryptionSecret::operator=(const EncryptionSecret& o) {
    if (this != &o) {
        s3::secure_wipe(material_);
        kind_ = o.kind_;
        material_ = o.material_;
    }
    return *this;
}

Result<EncryptionSecret> EncryptionSecret::key(std::string_view text, const std::string& source) {
    // Never quote the text: a typo in a key is still most of the key.
    EncryptionSecret s;
    s.kind_ = Kind::Key;
    bool ok = (text.size() == 2 * kKeySize && s3::from_hex(text, s.material_)) ||
              (s3::from_base64(text, s.material_) && s.material_.size() == kKeySize);
    if (!ok)
        return make_error(ErrorKind::InvalidArgument,
                          source + ": not a 32-byte key (" + std::to_string(text.size()) +
                              " characters; expected 64 hex digits or base64 of 32 bytes, e.g. from "
                              "'openssl rand -hex 32')",
                          "BadEncryptionKey");
    return s;
}

Result<EncryptionSecret> EncryptionSecret::passphrase(std::string_view text, const std::string& source) {
    if (text.empty())
        return make_error(ErrorKind::InvalidArgument, source + ": the passphrase is empty", "BadEncryptionKey");
    EncryptionSecret s;
    s.kind_ = Kind::Passphrase;
    s.material_.assign(text);
    return s;
}

// ---- keys ----

Cipher::Cipher(std::string_view master)
    : master_(master), mask_key_(s3::hkdf_sha256(master, {}, "bottomless position mask v1", kKeySize)) {
    std::string id = s3::hkdf_sha256(master_.view(), {}, "bottomless key id v1", kKeyIdSize);
    key_id_ = s3::to_hex(reinterpret_cast<const unsigned char*>(id.data()), id.size());
}

Cipher::~Cipher() = default;  // SecretBytes wipes

std::shared_ptr<const Cipher> Cipher::from_key(std::string_view key) {
    if (key.size() != kKeySize) throw std::invalid_argument("Cipher::from_key: the key must be 32 bytes");
    return std::shared_ptr<const Cipher>(new Cipher(std::string(key)));
}

Result<std::shared_ptr<const Cipher>> Cipher::from_passphrase(std::string_view passphrase, const KdfParams& kdf) {
    // Derived once while in use: every connection and database sharing a
    // passphrase and salt (or many CLI lookups) shares one derivation, not
    // scrypt's 0.1 s and 32 MiB each. The cache holds weak references: the
    // master key lives while a database (or command) holds the Cipher, as
    // ENCRYPTION.md says, not for the process lifetime. The cache key is an
    // HMAC of the passphrase under the salt, so nothing here is easier to
    // attack than the derived key it maps to.
    static std::mutex mu;
    static std::map<std::string, std::weak_ptr<const Cipher>> cache;  // guarded by mu
    std::string id = kdf.salt + ":" + std::to_string(kdf.n) + ":" + std::to_string(kdf.r) + ":" +
                     std::to_string(kdf.p) + ":";
    s3::Sha256Digest mac = s3::hmac_sha256(kdf.salt, passphrase);
    id.append(reinterpret_cast<const char*>(mac.data()), mac.size());
    {
        std::lock_guard lock(mu);
        if (auto it = cache.find(id); it != cache.end()) {
            if (auto c = it->second.lock()) return c;
            cache.erase(it);
        }
    }
    std::string master;
    // The ceiling holds for every caller; the floor is for what comes from
    // the bucket (parse_kdf), so tests may derive cheaply.
    if (kdf.n > kScryptMaxN || kdf.r > kScryptMaxR || kdf.p > kScryptMaxP || scrypt_memory(kdf) > kScryptMaxMem ||
        !s3::scrypt(passphrase, kdf.salt, kdf.n, kdf.r, kdf.p, kKeySize, kScryptMaxMem + (1u << 20), master))
        return make_error(ErrorKind::InvalidArgument,
                          "scrypt refused the key derivation parameters N=" + std::to_string(kdf.n) +
                              " r=" + std::to_string(kdf.r) + " p=" + std::to_string(kdf.p),
                          "BadKdfParams");
    auto c = std::shared_ptr<const Cipher>(new Cipher(master));
    s3::secure_wipe(master);
    std::lock_guard lock(mu);
    std::erase_if(cache, [](const auto& e) { return e.second.expired(); });
    cache[id] = c;
    return c;
}

EncryptionInfo Cipher::new_object() const {
    EncryptionInfo info;
    info.alg = kEncryptionAlg;
    info.key_id = key_id_;
    std::string seed = s3::random_bytes(kSeedSize);
    info.seed = s3::to_hex(reinterpret_cast<const unsigned char*>(seed.data()), seed.size());
    info.chunk_size = kEncryptionChunkSize;
    return info;
}

std::string Cipher::object_key(const EncryptionInfo& info) const {
    std::string seed;
    if (!s3::from_hex(info.seed, seed)) throw std::invalid_argument("object seed is not hex");
    return s3::hkdf_sha256(master_.view(), seed, "bottomless object key v1", kKeySize);
}

WalPosition Cipher::mask(const WalPosition& pos, const std::string& db_id, const std::string& generation) const {
    std::string msg = db_id;
    msg += '\0';
    msg += generation;
    msg += '\0';
    unsigned char b[4 + 4 + 8 + 4 + 4];
    put_be(b, pos.salt1, 4);
    put_be(b + 4, pos.salt2, 4);
    put_be(b + 8, pos.frame, 8);
    put_be(b + 16, pos.cksum1, 4);
    put_be(b + 20, pos.cksum2, 4);
    msg.append(reinterpret_cast<const char*>(b), sizeof b);
    s3::Sha256Digest d = s3::hmac_sha256(mask_key_.view(), msg);
    WalPosition out = pos;
    out.cksum1 = read_be32(d.data());
    out.cksum2 = read_be32(d.data() + 4);
    return out;
}

Status check_cipher(const std::optional<EncryptionInfo>& info, const Cipher* cipher, const std::string& name) {
    return check_key_id(info, cipher ? &cipher->key_id() : nullptr, name);
}

Status check_key_id(const std::optional<EncryptionInfo>& info, const std::string* key_id, const std::string& name) {
    if (info && !key_id)
        return make_error(ErrorKind::InvalidArgument,
                          name + " is encrypted (key id " + info->key_id +
                              ") and no encryption key was given: set LIBSQL_BOTTOMLESS_ENCRYPTION_KEY or "
                              "LIBSQL_BOTTOMLESS_ENCRYPTION_PASSPHRASE (bottomless-cli: --encryption-key or "
                              "--encryption-passphrase)",
                          "EncryptionKeyRequired");
    if (!info && key_id)
        return make_error(ErrorKind::InvalidArgument,
                          name + " is not encrypted, but an encryption key was given: this replica is plaintext; "
                                 "read it without a key",
                          "NotEncrypted");
    if (info && info->key_id != *key_id)
        return make_error(ErrorKind::InvalidArgument,
                          "wrong encryption key: " + name + " was encrypted with key id " + info->key_id +
                              ", the key or passphrase given has key id " + *key_id +
                              " (a passphrase typo, or a generation from before a key rotation)",
                          "WrongEncryptionKey");
    return {};
}

std::string object_aad(std::string_view magic, std::string_view header_json) {
    std::string m = "bottomless object v1";
    m += '\0';
    m.append(magic);
    m.append(header_json);
    s3::Sha256Digest d = s3::sha256(m);
    return std::string(reinterpret_cast<const char*>(d.data()), d.size());
}

// ---- sealing ----

Status ChunkCutter::write(std::string_view data, const Fn& fn) {
    while (!data.empty()) {
        if (held_.size() == chunk_) {
            if (Status st = fn(held_, false); !st) return st;
            held_.clear();
        }
        while (held_.empty() && data.size() > chunk_) {
            if (Status st = fn(data.substr(0, chunk_), false); !st) return st;
            data.remove_prefix(chunk_);
        }
        size_t n = std::min(data.size(), chunk_ - held_.size());
        held_.append(data.substr(0, n));
        data.remove_prefix(n);
    }
    return {};
}

Status ChunkCutter::finish(const Fn& fn) {
    Status st = fn(held_, true);
    held_.clear();
    return st;
}

ChunkSealer::ChunkSealer(const Cipher& cipher, const EncryptionInfo& info, std::string aad)
    : gcm_(object_gcm(cipher, info)), aad_(std::move(aad)), cutter_(info.chunk_size),
      sealed_(new unsigned char[info.chunk_size + s3::AesGcm::kTagSize]) {}

Status ChunkSealer::write(std::string_view data, const Emit& emit) {
    return cutter_.write(data, [&](std::string_view plain, bool final) { return seal(plain, final, emit); });
}

Status ChunkSealer::finish(const Emit& emit) {
    return cutter_.finish([&](std::string_view plain, bool final) { return seal(plain, final, emit); });
}

Status ChunkSealer::seal(std::string_view plain, bool final, const Emit& emit) {
    unsigned char nonce[s3::AesGcm::kNonceSize];
    chunk_nonce(nonce, index_++, final);
    gcm_->seal(nonce, aad_, plain, sealed_.get());
    return emit(std::string_view(reinterpret_cast<const char*>(sealed_.get()), plain.size() + s3::AesGcm::kTagSize));
}

// ---- opening ----

ChunkOpener::ChunkOpener(const Cipher& cipher, const EncryptionInfo& info, std::string aad, const std::string& name)
    : gcm_(object_gcm(cipher, info)), aad_(std::move(aad)), name_(name),
      cutter_(info.chunk_size + s3::AesGcm::kTagSize), plain_(new unsigned char[info.chunk_size]) {}

ChunkOpener::~ChunkOpener() = default;

Status ChunkOpener::feed(std::string_view data, const Out& out) {
    return cutter_.write(data, [&](std::string_view sealed, bool final) { return open(sealed, final, out); });
}

Status ChunkOpener::finish(const Out& out) {
    return cutter_.finish([&](std::string_view sealed, bool final) { return open(sealed, final, out); });
}

Status ChunkOpener::open(std::string_view sealed, bool final, const Out& out) {
    unsigned char nonce[s3::AesGcm::kNonceSize];
    const uint64_t index = index_++;
    chunk_nonce(nonce, index, final);
    // A short chunk that is not the last, or a chunk that is only part of a
    // tag, cannot authenticate: the open fails like any other forgery.
    if (!gcm_->open(nonce, aad_, sealed, plain_.get())) {
        std::string what = final ? "the last chunk (" + std::to_string(index) + ")" : "chunk " + std::to_string(index);
        return make_error(ErrorKind::Corrupt,
                          name_ + ": " + what +
                              " fails authentication: the object was modified, truncated, reordered, or copied from "
                              "another position (the key is the right one: its key id matches)",
                          "AuthenticationFailed");
    }
    return out(std::string_view(reinterpret_cast<const char*>(plain_.get()), sealed.size() - s3::AesGcm::kTagSize));
}

// ---- the KDF object ----

std::string kdf_params_key(const std::string& db_id) { return db_id + "/encryption.json"; }

namespace {

// An unsigned JSON integer no larger than max. Floats are refused before any
// get<>(): converting 1e30 to an integer is undefined behaviour.
bool kdf_uint(const nlohmann::json& j, const char* key, uint64_t max, uint64_t& out) {
    auto it = j.find(key);
    if (it == j.end() || !it->is_number_unsigned() || it->get<uint64_t>() > max) return false;
    out = it->get<uint64_t>();
    return true;
}

}  // namespace

uint64_t scrypt_memory(const KdfParams& k) {
    // 128 * N * r, saturating (N and r are bounded first by every caller that trusts it).
    if (k.r != 0 && k.n > std::numeric_limits<uint64_t>::max() / 128 / k.r) return std::numeric_limits<uint64_t>::max();
    return 128 * k.n * k.r;
}

Result<KdfParams> parse_kdf(const std::string& text, const std::string& where) {
    auto bad = [&](const std::string& why) {
        return make_error(ErrorKind::Corrupt, where + ": " + why, "BadKdfParams");
    };
    std::string why;
    nlohmann::json j = parse_untrusted_json(text, kKdfObjectMaxBytes, &why);
    if (j.is_discarded()) return bad("not valid JSON (" + why + ")");
    if (!j.is_object()) return bad("not a JSON object");
    uint64_t format = 0, n = 0, r = 0, p = 0;
    if (!kdf_uint(j, "format", 1000, format)) return bad("missing or invalid format");
    if (format != 1) return bad("unknown format (this build reads 1): upgrade bottomless");
    auto kdf = j.find("kdf");
    if (kdf == j.end() || !kdf->is_string()) return bad("missing or invalid kdf");
    if (kdf->get_ref<const std::string&>() != "scrypt") return bad("unknown kdf (this build knows scrypt)");
    KdfParams k;
    auto salt = j.find("salt");
    if (salt == j.end() || !salt->is_string() || !s3::from_hex(salt->get_ref<const std::string&>(), k.salt) ||
        k.salt.size() < 16 || k.salt.size() > 1024)
        return bad("missing or invalid salt (hex, 16 to 1024 bytes)");
    // Whoever can write the bucket can plant this object. Too cheap a cost
    // makes guessing the passphrase from a stolen bucket nearly free; too
    // high a cost makes every open spend seconds and gigabytes.
    const std::string range = "scrypt cost out of range (N a power of two from " + std::to_string(kScryptMinN) +
                              " to " + std::to_string(kScryptMaxN) + ", r " + std::to_string(kScryptMinR) + ".." +
                              std::to_string(kScryptMaxR) + ", p 1.." + std::to_string(kScryptMaxP) +
                              ", memory 128*N*r at most " + std::to_string(kScryptMaxMem >> 20) +
                              " MiB): whoever wrote it is not bottomless; remove it only if no replica uses it";
    if (!kdf_uint(j, "n", kScryptMaxN, n) || !kdf_uint(j, "r", kScryptMaxR, r) || !kdf_uint(j, "p", kScryptMaxP, p))
        return bad("missing, non-integer or too large n, r or p; " + range);
    k.n = n;
    k.r = static_cast<uint32_t>(r);
    k.p = static_cast<uint32_t>(p);
    if (k.n < kScryptMinN || (k.n & (k.n - 1)) != 0 || k.r < kScryptMinR || k.p == 0 ||
        scrypt_memory(k) > kScryptMaxMem)
        return bad("N=" + std::to_string(k.n) + " r=" + std::to_string(k.r) + " p=" + std::to_string(k.p) + ": " +
                   range);
    return k;
}

std::string kdf_params_json(const KdfParams& k) {
    nlohmann::json j = {{"format", 1},
                        {"kdf", "scrypt"},
                        {"salt", s3::to_hex(reinterpret_cast<const unsigned char*>(k.salt.data()), k.salt.size())},
                        {"n", k.n},
                        {"r", k.r},
                        {"p", k.p}};
    return j.dump() + "\n";
}

Result<std::shared_ptr<const Cipher>> open_cipher(s3::Client& client, const std::string& bucket,
                                                  const std::string& db_id, const EncryptionSecret& secret,
                                                  bool create, std::string* kdf_text) {
    if (secret.empty()) return std::shared_ptr<const Cipher>();
    if (secret.kind() == EncryptionSecret::Kind::Key) return Cipher::from_key(secret.material());

    const std::string key = kdf_params_key(db_id);
    const std::string where = "s3://" + bucket + "/" + key;
    auto got = client.get_object(bucket, key, std::nullopt, nullptr, kKdfObjectMaxBytes);
    if (!got && got.error().kind == ErrorKind::NotFound) {
        if (!create)
            return make_error(ErrorKind::NotFound,
                              where + " does not exist, so no replica of '" + db_id +
                                  "' was encrypted with a passphrase: it is plaintext (read it without a key) or "
                                  "encrypted with a raw key (--encryption-key / LIBSQL_BOTTOMLESS_ENCRYPTION_KEY)",
                              "NoKdfParams");
        KdfParams fresh;
        fresh.salt = s3::random_bytes(32);
        s3::PutOptions opts;
        opts.if_none_match = true;
        opts.content_type = "application/json";
        auto put = client.put_object(bucket, key, kdf_params_json(fresh), opts);
        if (put) log::info("created " + where + " (scrypt salt for the passphrase)");
        else if (put.error().kind != ErrorKind::Precondition) return std::move(put).error();
        // Ours or a racing process's (Precondition): derive from what the
        // bucket holds, even on a server that ignored If-None-Match and let
        // a later create win.
        got = client.get_object(bucket, key, std::nullopt, nullptr, kKdfObjectMaxBytes);
    }
    if (!got) return std::move(got).error();
    auto kdf = parse_kdf(*got, where);
    if (!kdf) return std::move(kdf).error();
    if (kdf_text) *kdf_text = *got;
    return Cipher::from_passphrase(secret.material(), *kdf);
}

}  // namespace bottomless::replicator
