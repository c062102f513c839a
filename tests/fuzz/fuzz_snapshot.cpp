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
//
// A format-2 header also sends the object through the ranged reader an
// incremental restore uses: parse_page_index() on the tail the header
// implies, then decode_snapshot_frame() on every frame it names (within
// the same budget), checking what they promise.
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

void read_index(std::string_view object) {
    auto h = replicator::peek_snapshot_header(object, "fuzz/snapshot");
    if (!h || !h->frame_pages) return;
    const uint64_t tail = replicator::page_index_tail_size(*h);
    if (tail > object.size()) return;
    auto idx = replicator::parse_page_index(object.substr(object.size() - tail), object.size(), *h, "fuzz/snapshot");
    if (!idx) return;
    FUZZ_CHECK(idx->frames() == replicator::snapshot_frames(*h));
    FUZZ_CHECK(idx->hashes.size() == uint64_t{h->db_pages} * replicator::kPageHashSize);
    for (uint32_t f = 0; f < idx->frames(); ++f) FUZZ_CHECK(idx->frame_offset[f] < idx->frame_offset[f + 1]);
    FUZZ_CHECK(idx->frame_offset.back() == object.size() - tail);
    uint64_t page_bytes = 0;
    for (uint32_t f = 0; f < idx->frames() && page_bytes <= kPageBudget; ++f) {
        const uint64_t off = idx->frame_offset[f], len = idx->frame_offset[f + 1] - off;
        (void)replicator::decode_snapshot_frame(*idx, f, object.substr(off, len), "fuzz/snapshot",
                                                [&](uint32_t pgno, std::string_view page) -> Status {
                                                    FUZZ_CHECK(idx->frame_of(pgno) == f);
                                                    FUZZ_CHECK(page.size() == h->page_size);
                                                    FUZZ_CHECK(replicator::page_hash(page) == idx->hash(pgno));
                                                    page_bytes += page.size();
                                                    return {};
                                                });
    }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    fuzz::quiet_logs();
    std::string object = fuzz::with_trailer(fuzz::as_view(data, size));
    auto header = replicator::peek_snapshot_header(object, "fuzz/snapshot");
    const replicator::Cipher* cipher = header && header->encryption ? &fuzz::fixed_cipher() : nullptr;
    read_snapshot(object, cipher);
    read_index(object);
    if (cipher) {
        std::string sealed = fuzz::reseal(object, replicator::kSnapshotMagic, *header->encryption);
        if (!sealed.empty()) read_snapshot(sealed, cipher);
    }
    return 0;
}
