// Fuzzes the KDF object ("<db>/encryption.json", planted in the bucket by
// whoever can write it) and the passphrase path behind it: parse_kdf, the
// key and passphrase settings (EncryptionSecret), Cipher::from_passphrase.
//
// Input: the KDF object's JSON, then optionally a NUL byte and a key or
// passphrase text.
//
// Properties: accepted scrypt parameters respect the floor that makes
// passphrase guessing expensive (N >= 2^14, r >= 8: issue 13) and a ceiling
// on the cost of an open; a passphrase is derived (scrypt runs) only for the
// cheapest accepted cost, so the fuzzer keeps its speed.
#include <cstdint>
#include <string>

#include "fuzz_common.h"
#include "replicator/encryption.h"

using namespace bottomless;

namespace {

constexpr uint64_t kFloorN = uint64_t{1} << 14;
constexpr uint32_t kFloorR = 8;
// 128 * N * r * p bytes of scrypt work: a ceiling far above the default
// (2^15, 8, 1 = 32 MiB) but far below "hours per open".
constexpr uint64_t kCeilingWork = uint64_t{1} << 31;

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    fuzz::quiet_logs();
    std::string_view in = fuzz::as_view(data, size);
    size_t nul = in.find('\0');
    std::string json(in.substr(0, nul));
    std::string secret_text(nul == std::string_view::npos ? std::string_view() : in.substr(nul + 1));

    // The settings parse whatever the user typed; they must never crash.
    if (auto key = replicator::EncryptionSecret::key(secret_text, "fuzz key")) {
        FUZZ_CHECK(key->material().size() == 32);
        FUZZ_CHECK(replicator::Cipher::from_key(key->material())->key_id().size() == 16);
    }
    auto pass = replicator::EncryptionSecret::passphrase(secret_text, "fuzz passphrase");

    auto kdf = replicator::parse_kdf(json, "fuzz/encryption.json");
    if (!kdf) return 0;
    FUZZ_CHECK(kdf->salt.size() >= 16);
    FUZZ_CHECK(kdf->n >= kFloorN && kdf->r >= kFloorR && kdf->p >= 1);
    FUZZ_CHECK(kdf->n <= kCeilingWork / 128 / kdf->r / kdf->p);

    if (pass && kdf->n == kFloorN && kdf->r == kFloorR && kdf->p == 1) {
        auto c = replicator::Cipher::from_passphrase(pass->material(), *kdf);
        if (c) FUZZ_CHECK((*c)->key_id().size() == 16);
    }
    return 0;
}
