// Fuzzes the header readers every listing, open and restore runs on bytes
// from the bucket: peek_snapshot_header and peek_segment_header.
//
// Input: the header JSON itself (the harness wraps it in a snapshot and a
// segment preamble with the right length), or, when it starts with "BTLS",
// a raw object prefix taken as it is (bad magic, version, length fields).
// Structure comes from the dictionary (fuzz_object_header.dict: field names,
// JSON punctuation), from seeds that are real headers, and from a custom
// mutator that now and then inserts a deeply nested member ("z":[[[…]]] or
// "z":{"a":{"a":…}}) right after a '{': byte-level mutations and dictionary
// words alone take hours to build the depth that overflows a recursive
// parser. Run with -max_len of 1 MiB or more and -len_control=0
// (scripts/fuzz.sh does) so such inputs are allowed from the start.
#include <cstdint>
#include <cstring>
#include <random>
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

extern "C" size_t LLVMFuzzerMutate(uint8_t* data, size_t size, size_t max_size);

extern "C" size_t LLVMFuzzerCustomMutator(uint8_t* data, size_t size, size_t max_size, unsigned int seed) {
    std::minstd_rand rng(seed);
    const uint8_t* brace = size ? static_cast<const uint8_t*>(std::memchr(data, '{', size)) : nullptr;
    if (rng() % 8 != 0 || !brace || max_size < size + 16) return LLVMFuzzerMutate(data, size, max_size);
    // After some '{' (the first one, or a later one by luck of the draw).
    size_t at = static_cast<size_t>(brace - data) + 1;
    for (size_t i = at; i < size; ++i)
        if (data[i] == '{' && rng() % 4 == 0) at = i + 1;
    const bool arrays = rng() % 2 == 0;
    const std::string open = arrays ? "[" : "{\"a\":", close = arrays ? "]" : "}";
    const size_t room = (max_size - size - 6) / (open.size() + close.size());
    const size_t depth = std::max<size_t>(1, room >> (rng() % 12));
    std::string member = "\"z\":";
    member.reserve(5 + depth * (open.size() + close.size()) + 2);
    for (size_t i = 0; i < depth; ++i) member += open;
    if (!arrays) member += "0";
    for (size_t i = 0; i < depth; ++i) member += close;
    member += ",";
    if (size + member.size() > max_size) return LLVMFuzzerMutate(data, size, max_size);
    std::memmove(data + at + member.size(), data + at, size - at);
    std::memcpy(data + at, member.data(), member.size());
    return size + member.size();
}

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
