// Fuzzes decode_segment, which every restore and auto-restore runs on
// segment objects from the bucket.
//
// Input: a whole segment object. The harness replaces its last 32 bytes by
// the right SHA-256 trailer (else every mutation stops at the checksum).
// Plaintext objects are decoded without a key; an encrypted header gets the
// fixed fuzzing key, and a second pass seals the body as if it were the
// plaintext (fuzz::reseal), so mutations reach the zstd and frame decoding
// behind the authentication too. Bombs show up as -malloc_limit_mb or
// -timeout findings.
#include <cstdint>
#include <string>

#include "fuzz_common.h"
#include "replicator/format.h"

using namespace bottomless;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    fuzz::quiet_logs();
    const std::string name = "fuzz/seg-000000000001";
    std::string object = fuzz::with_trailer(fuzz::as_view(data, size));
    auto header = replicator::peek_segment_header(object, name);
    const replicator::Cipher* cipher = header && header->encryption ? &fuzz::fixed_cipher() : nullptr;

    auto check = [&](const Result<replicator::DecodedSegment>& seg) {
        if (!seg) return;
        // What decode_segment promises about a segment it accepts.
        FUZZ_CHECK(seg->frames.size() == seg->header.frame_count());
        for (const auto& f : seg->frames) {
            FUZZ_CHECK(f.pgno != 0);
            FUZZ_CHECK(f.page.size() == seg->header.page_size);
        }
        FUZZ_CHECK(seg->sha256.size() == 64);
    };
    check(replicator::decode_segment(object, name, cipher));

    if (cipher) {
        std::string sealed = fuzz::reseal(object, replicator::kSegmentMagic, *header->encryption);
        if (!sealed.empty()) check(replicator::decode_segment(sealed, name, cipher));
    }
    return 0;
}
