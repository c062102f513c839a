// Fuzzes SnapshotReader::feed/finish, which restores stream snapshot
// objects from the bucket through.
//
// Input: a whole snapshot object; the harness fixes its SHA-256 trailer (see
// fuzz_segment.cpp) and, for an encrypted header, also decodes a resealed
// copy whose body is the input's body as plaintext. The bytes are fed in
// pieces whose sizes come from the object itself (so the reader's splitting
// of preamble, header, body and trailer across feeds is exercised too).
//
// A restore writes the pages to disk and stops when they exceed the space it
// has; the harness stands in for that with a budget of kPageBudget bytes of
// pages (beyond it the page callback refuses, as a full disk would), so a
// snapshot that expands without end costs time only up to the budget.
#include <cstdint>
#include <string>

#include "fuzz_common.h"
#include "replicator/format.h"

using namespace bottomless;

namespace {

constexpr uint64_t kPageBudget = 64ull << 20;

void read_snapshot(std::string_view object, const replicator::Cipher* cipher) {
    uint64_t page_bytes = 0;
    uint32_t last = 0;
    replicator::SnapshotReader reader(
        "fuzz/snapshot",
        [&](uint32_t pgno, std::string_view page) -> Status {
            FUZZ_CHECK(pgno == last + 1);  // pages come out in order, from 1
            last = pgno;
            page_bytes += page.size();
            if (page_bytes > kPageBudget) return make_error(ErrorKind::Io, "fuzz: out of disk", "WriteFailed");
            return {};
        },
        cipher);
    // Piece sizes: a pseudo-random walk seeded by the object's length, so a
    // given input always splits the same way (reproducible findings).
    uint64_t state = object.size() * 0x9e3779b97f4a7c15ull + 1;
    while (!object.empty()) {
        state ^= state << 13, state ^= state >> 7, state ^= state << 17;
        size_t piece = std::min<size_t>(object.size(), 1 + state % 8192);
        if (!reader.feed(object.substr(0, piece))) return;
        object.remove_prefix(piece);
    }
    auto h = reader.finish();
    if (!h) return;
    // What finish() promises when it returns OK.
    FUZZ_CHECK(last == h->db_pages);
    FUZZ_CHECK(reader.sha256().size() == 64);
    FUZZ_CHECK(reader.header() != nullptr);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    fuzz::quiet_logs();
    std::string object = fuzz::with_trailer(fuzz::as_view(data, size));
    auto header = replicator::peek_snapshot_header(object, "fuzz/snapshot");
    const replicator::Cipher* cipher = header && header->encryption ? &fuzz::fixed_cipher() : nullptr;
    read_snapshot(object, cipher);
    if (cipher) {
        std::string sealed = fuzz::reseal(object, replicator::kSnapshotMagic, *header->encryption);
        if (!sealed.empty()) read_snapshot(sealed, cipher);
    }
    return 0;
}
