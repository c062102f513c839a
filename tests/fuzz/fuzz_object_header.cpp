// Fuzzes the header readers every listing, open and restore runs on bytes
// from the bucket: peek_snapshot_header and peek_segment_header.
//
// Input: the header JSON itself (the harness wraps it in a snapshot and a
// segment preamble with the right length), or, when it starts with "BTLS",
// a raw object prefix taken as it is (bad magic, version, length fields).
// Structure comes from the dictionary (fuzz_object_header.dict: field names,
// JSON punctuation) and from seeds that are real headers; run with
// -max_len of 1 MiB or more so deep nesting and huge headers are reached.
#include <cstdint>
#include <string>

#include "fuzz_common.h"
#include "replicator/format.h"

using namespace bottomless;

namespace {

std::string wrap(const char* magic, std::string_view json) {
    std::string out(magic, 8);
    auto be32 = [&out](uint32_t v) {
        for (int s = 24; s >= 0; s -= 8) out.push_back(static_cast<char>((v >> s) & 0xff));
    };
    be32(replicator::kFormatVersion);
    be32(static_cast<uint32_t>(json.size()));
    out.append(json);
    return out;
}

template <class Header>
void check_common(const Header& h) {
    // What the readers promise about a header they accept.
    FUZZ_CHECK(h.page_size >= 512 && h.page_size <= 65536 && (h.page_size & (h.page_size - 1)) == 0);
    FUZZ_CHECK(!h.db_id.empty());
    FUZZ_CHECK(!h.generation.empty());
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    fuzz::quiet_logs();
    std::string_view in = fuzz::as_view(data, size);
    const std::string name = "fuzz/object";
    if (in.substr(0, 4) == "BTLS") {
        (void)replicator::peek_snapshot_header(in, name);
        (void)replicator::peek_segment_header(in, name);
        return 0;
    }
    if (auto h = replicator::peek_snapshot_header(wrap(replicator::kSnapshotMagic, in), name)) check_common(*h);
    if (auto h = replicator::peek_segment_header(wrap(replicator::kSegmentMagic, in), name)) {
        check_common(*h);
        FUZZ_CHECK(h->seq >= 1);
    }
    return 0;
}
