// Fuzzes ChunkOpener, the authenticated decryption of an encrypted object's
// body (replicator/encryption.h).
//
// Random bytes never authenticate, so the harness is structure-aware: it
// seals a plaintext from the input with ChunkSealer, then applies edits the
// input chooses (flip a bit, truncate, drop / swap / duplicate a chunk,
// append bytes) and opens the result in pieces. The property: the opener
// returns exactly the plaintext when nothing changed, and fails (never
// returns other bytes) when something did.
//
// Input layout: byte 0 selects the chunk size (1 KiB + 64 * n), byte 1 the
// edit, bytes 2..9 its position and argument, byte 10 the feed piece size,
// the rest is the plaintext.
#include <fuzzer/FuzzedDataProvider.h>

#include <cstdint>
#include <string>
#include <vector>

#include "fuzz_common.h"
#include "replicator/encryption.h"

using namespace bottomless;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    fuzz::quiet_logs();
    FuzzedDataProvider in(data, size);
    replicator::EncryptionInfo info;
    info.alg = replicator::kEncryptionAlg;
    info.key_id = fuzz::fixed_cipher().key_id();
    info.seed = std::string(64, 'a');
    info.chunk_size = 1024 + 64u * in.ConsumeIntegral<uint8_t>();
    const uint8_t edit = in.ConsumeIntegral<uint8_t>();
    const uint32_t where = in.ConsumeIntegral<uint32_t>();
    const uint32_t arg = in.ConsumeIntegral<uint32_t>();
    const size_t piece = 1 + in.ConsumeIntegral<uint8_t>() * 97u;
    const std::string plain = in.ConsumeRemainingBytesAsString();
    const std::string aad = replicator::object_aad("BTLSSEGM", "{}");

    // Seal, keeping the chunks apart so edits can move whole chunks.
    std::vector<std::string> chunks;
    replicator::ChunkSealer sealer(fuzz::fixed_cipher(), info, aad);
    auto emit = [&chunks](std::string_view c) -> Status {
        chunks.emplace_back(c);
        return {};
    };
    FUZZ_CHECK(sealer.write(plain, emit));
    FUZZ_CHECK(sealer.finish(emit));

    std::string sealed;
    for (const auto& c : chunks) sealed += c;
    const std::string original = sealed;
    const size_t n = chunks.size();
    switch (edit % 8) {
        case 0: break;  // untouched: must open to the plaintext
        case 1: sealed[where % sealed.size()] ^= static_cast<char>(1u << (arg % 8)); break;
        case 2: sealed.resize(where % sealed.size()); break;
        case 3:
            if (n > 1) {
                chunks.erase(chunks.begin() + static_cast<long>(where % n));
                sealed.clear();
                for (const auto& c : chunks) sealed += c;
            }
            break;
        case 4:
            if (n > 1) {
                std::swap(chunks[where % n], chunks[arg % n]);
                sealed.clear();
                for (const auto& c : chunks) sealed += c;
            }
            break;
        case 5: {
            std::string dup = chunks[where % n];
            chunks.insert(chunks.begin() + static_cast<long>(arg % (n + 1)), dup);
            sealed.clear();
            for (const auto& c : chunks) sealed += c;
            break;
        }
        case 6: sealed.append(std::string(1 + arg % 64, static_cast<char>(where))); break;
        case 7: sealed.insert(where % (sealed.size() + 1), std::string(1 + arg % 64, static_cast<char>(arg >> 8))); break;
    }

    std::string out;
    const std::string name = "fuzz/object";
    replicator::ChunkOpener opener(fuzz::fixed_cipher(), info, aad, name);
    auto sink = [&out](std::string_view p) -> Status {
        out.append(p);
        return {};
    };
    bool ok = true;
    for (size_t at = 0; ok && at < sealed.size(); at += piece)
        ok = static_cast<bool>(opener.feed(std::string_view(sealed).substr(at, piece), sink));
    if (ok) ok = static_cast<bool>(opener.finish(sink));

    if (sealed == original) {
        FUZZ_CHECK(ok);
        FUZZ_CHECK(out == plain);
    } else {
        FUZZ_CHECK(!ok);
    }
    // Whatever happened, nothing but a prefix of the plaintext ever came out.
    FUZZ_CHECK(out.size() <= plain.size() && plain.compare(0, out.size(), out) == 0);
    return 0;
}
