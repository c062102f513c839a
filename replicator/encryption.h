// Client-side encryption of the objects in the bucket (docs/ENCRYPTION.md).
//
// Key hierarchy:
//   master key (32 bytes): the configured key, or scrypt(passphrase, salt)
//     with the salt and cost in "<db_id>/encryption.json" (made once per
//     database, derived once per process)
//   object key = HKDF-SHA256(master, salt = the object's random 32-byte seed,
//                            info = "bottomless object key v1")
//   key id     = first 8 bytes of HKDF(master, info = "bottomless key id v1")
//   mask key   = HKDF(master, info = "bottomless position mask v1")
//
// An object's body (after compression) is cut into chunks of chunk_size
// bytes, each sealed with AES-256-GCM under the object key with the nonce
// be64(chunk index) || be32(1 for the last chunk, else 0) and the associated
// data SHA-256("bottomless object v1" NUL magic header-json). A fresh seed
// per object gives a fresh key, so the counter nonces never repeat under one
// key; the index and final flag in the nonce catch reordered, dropped or
// truncated chunks; the header in the associated data binds the object to its
// database id, generation and sequence number.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>

#include "s3/crypto.h"
#include "s3/result.h"

namespace bottomless::s3 {
class Client;
}

namespace bottomless::replicator {

struct WalPosition;

constexpr uint32_t kEncryptionChunkSize = 64u << 10;
constexpr const char* kEncryptionAlg = "aes-256-gcm-hkdf-sha256";  // the only one there is

// The "encryption" object of an encrypted object's header.
struct EncryptionInfo {
    std::string alg;        // "aes-256-gcm-hkdf-sha256"
    std::string key_id;     // 16 hex digits
    std::string seed;       // 64 hex digits, random per object
    uint32_t chunk_size = 0;
};

// What the user configured: a 32-byte key (64 hex digits or base64) or a
// passphrase. Held only as long as needed, wiped on destruction, and never
// part of a message, a log line or bottomless_status().
class EncryptionSecret {
public:
    enum class Kind { None, Key, Passphrase };
    EncryptionSecret() = default;
    ~EncryptionSecret();
    EncryptionSecret(const EncryptionSecret&);
    EncryptionSecret& operator=(const EncryptionSecret&);

    // `source` names the setting in errors (e.g. "LIBSQL_BOTTOMLESS_ENCRYPTION_KEY").
    static Result<EncryptionSecret> key(std::string_view text, const std::string& source);
    static Result<EncryptionSecret> passphrase(std::string_view text, const std::string& source);

    Kind kind() const { return kind_; }
    bool empty() const { return kind_ == Kind::None; }
    const std::string& material() const { return material_; }  // 32 raw bytes, or the passphrase

private:
    Kind kind_ = Kind::None;
    std::string material_;
};

// scrypt cost and salt of a database's passphrase, kept in the bucket.
struct KdfParams {
    std::string salt;  // raw, 32 bytes
    uint64_t n = uint64_t{1} << 15;
    uint32_t r = 8, p = 1;
};

// Bounds on a KDF object read from the bucket (docs/ENCRYPTION.md). The floor
// keeps offline guessing expensive; the ceiling keeps a planted object from
// making every open spend seconds and gigabytes. scrypt's memory is 128*N*r.
constexpr uint64_t kScryptMinN = uint64_t{1} << 14, kScryptMaxN = uint64_t{1} << 20;
constexpr uint32_t kScryptMinR = 8, kScryptMaxR = 32, kScryptMaxP = 4;
constexpr uint64_t kScryptMaxMem = 256ull << 20;
uint64_t scrypt_memory(const KdfParams& k);

class Cipher {
public:
    // From the 32 raw bytes of a master key.
    static std::shared_ptr<const Cipher> from_key(std::string_view key);
    // Derives the master key (scrypt: ~0.1 s and 32 MiB at the default cost).
    static Result<std::shared_ptr<const Cipher>> from_passphrase(std::string_view passphrase, const KdfParams& kdf);
    ~Cipher();
    Cipher(const Cipher&) = delete;
    Cipher& operator=(const Cipher&) = delete;

    const std::string& key_id() const { return key_id_; }
    // Header fields for a new object: fresh random seed.
    EncryptionInfo new_object() const;
    // The 32-byte AES key of one object (the caller wipes it).
    std::string object_key(const EncryptionInfo& info) const;
    // WAL checksums are a function of page content: encrypted objects carry
    // keyed stand-ins instead. Equal inputs give equal outputs, so the chain
    // check (start == previous end) still works without the key.
    WalPosition mask(const WalPosition& pos, const std::string& db_id, const std::string& generation) const;

private:
    explicit Cipher(std::string_view master);
    // Both keys in pages excluded from core dumps, wiped when the last
    // database (or CLI command) using this Cipher lets go of it.
    s3::SecretBytes master_, mask_key_;
    std::string key_id_;
};

// Is `cipher` the right one for an object whose header says `info`? Errors
// (code): EncryptionKeyRequired (encrypted, no key), NotEncrypted (a key was
// given for a plaintext object), WrongEncryptionKey (another key id).
Status check_cipher(const std::optional<EncryptionInfo>& info, const Cipher* cipher, const std::string& name);
// The same, by key id (null: no key given).
Status check_key_id(const std::optional<EncryptionInfo>& info, const std::string* key_id, const std::string& name);

// The associated data of every chunk of one object.
std::string object_aad(std::string_view magic, std::string_view header_json);

// Cuts a stream into chunks of a fixed size and hands each on with whether it
// is the last. A full chunk is held back until more data proves it is not the
// last; whole chunks with more data behind them go straight from the input.
class ChunkCutter {
public:
    using Fn = std::function<Status(std::string_view chunk, bool final)>;
    explicit ChunkCutter(size_t chunk) : chunk_(chunk) { held_.reserve(chunk); }
    Status write(std::string_view data, const Fn& fn);
    Status finish(const Fn& fn);  // the held chunk (possibly empty) is the last

private:
    size_t chunk_;
    std::string held_;
};

// Seals a body stream into chunks.
class ChunkSealer {
public:
    using Emit = std::function<Status(std::string_view)>;
    ChunkSealer(const Cipher& cipher, const EncryptionInfo& info, std::string aad);
    Status write(std::string_view plain, const Emit& emit);
    Status finish(const Emit& emit);  // seals the last chunk (possibly empty)

private:
    Status seal(std::string_view plain, bool final, const Emit& emit);
    std::unique_ptr<s3::AesGcm> gcm_;
    std::string aad_;
    ChunkCutter cutter_;                       // of plaintext chunks
    std::unique_ptr<unsigned char[]> sealed_;  // one chunk and its tag
    uint64_t index_ = 0;
};

// Opens a sealed body stream; plaintext comes out only once authenticated.
class ChunkOpener {
public:
    using Out = std::function<Status(std::string_view)>;
    ChunkOpener(const Cipher& cipher, const EncryptionInfo& info, std::string aad, const std::string& name);
    ~ChunkOpener();
    Status feed(std::string_view sealed, const Out& out);
    // The chunk held back is the last one: open it as such.
    Status finish(const Out& out);

private:
    Status open(std::string_view sealed, bool final, const Out& out);
    std::unique_ptr<s3::AesGcm> gcm_;
    std::string aad_;
    const std::string& name_;
    ChunkCutter cutter_;                      // of sealed chunks (tag included)
    std::unique_ptr<unsigned char[]> plain_;  // one chunk of plaintext
    uint64_t index_ = 0;
};

// "<db_id>/encryption.json": the scrypt salt and cost of the database.
std::string kdf_params_key(const std::string& db_id);
// Parses and bounds-checks the KDF object's text (the kScrypt* bounds above);
// any defect is Corrupt "BadKdfParams" naming `where` (its location).
// Exposed for the fuzzer (tests/fuzz/fuzz_kdf.cpp) and the golden objects.
Result<KdfParams> parse_kdf(const std::string& text, const std::string& where);
// The KDF object's text as open_cipher() writes it.
std::string kdf_params_json(const KdfParams& k);

// The master key for db_id. A passphrase needs the KDF object: it is read,
// or created when `create` is set and none exists (a conditional create, so
// two processes racing agree on one salt). Empty secret: nullptr.
// *kdf_text (if given) receives the KDF object's text for a passphrase.
Result<std::shared_ptr<const Cipher>> open_cipher(s3::Client& client, const std::string& bucket,
                                                  const std::string& db_id, const EncryptionSecret& secret, bool create,
                                                  std::string* kdf_text = nullptr);

}  // namespace bottomless::replicator
