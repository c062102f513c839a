// Generation ids and the keys of a database's objects in the bucket
// (docs/FORMAT.md "Keys"): what sorts newest first, and the only spellings
// that parse back.
#include <algorithm>
#include <cstdio>
#include <limits>
#include <random>

#include "replicator/format_internal.h"

namespace bottomless::replicator {

using format_detail::is_lower_hex;

namespace {

constexpr uint64_t kGenerationTimeMax = (uint64_t{1} << 48) - 1;
constexpr size_t kGenerationIdSize = 16 + 1 + 8;
constexpr size_t kSegmentSeqDigits = 12;

}  // namespace

std::string new_generation_id(int64_t now_ms) {
    uint64_t ms = now_ms < 0 ? 0 : std::min<uint64_t>(static_cast<uint64_t>(now_ms), kGenerationTimeMax);
    // The random part keeps two generations started in the same millisecond
    // (two machines restoring the same database) from sharing an id.
    std::random_device rd;
    uint32_t rnd = static_cast<uint32_t>(rd());
    char buf[kGenerationIdSize + 1];
    std::snprintf(buf, sizeof buf, "%016llx-%08x", static_cast<unsigned long long>(kGenerationTimeMax - ms), rnd);
    return buf;
}

int64_t generation_time_ms(std::string_view id) {
    if (id.size() != kGenerationIdSize || id[16] != '-') return -1;
    if (!is_lower_hex(id.substr(0, 16)) || !is_lower_hex(id.substr(17))) return -1;
    uint64_t v = 0;
    for (char c : id.substr(0, 16)) v = (v << 4) | static_cast<uint64_t>(c <= '9' ? c - '0' : c - 'a' + 10);
    if (v > kGenerationTimeMax) return -1;
    return static_cast<int64_t>(kGenerationTimeMax - v);
}

std::string generation_prefix(const std::string& db_id, const std::string& generation) {
    // The trailing slash keeps a listing of "db/gen" from matching "db/gen2".
    return db_id + "/" + generation + "/";
}

std::string snapshot_key(const std::string& db_id, const std::string& generation) {
    return generation_prefix(db_id, generation) + "snapshot";
}

std::string segment_key(const std::string& db_id, const std::string& generation, uint64_t seq) {
    char buf[32];
    std::snprintf(buf, sizeof buf, "seg-%012llu", static_cast<unsigned long long>(seq));
    return generation_prefix(db_id, generation) + buf;
}

bool parse_segment_key(std::string_view key, uint64_t& seq) {
    size_t slash = key.rfind('/');
    std::string_view last = slash == std::string_view::npos ? key : key.substr(slash + 1);
    if (last.size() < 4 + kSegmentSeqDigits || last.substr(0, 4) != "seg-") return false;
    std::string_view digits = last.substr(4);
    uint64_t v = 0;
    for (char c : digits) {
        if (c < '0' || c > '9') return false;
        uint64_t d = static_cast<uint64_t>(c - '0');
        if (v > (std::numeric_limits<uint64_t>::max() - d) / 10) return false;
        v = v * 10 + d;
    }
    // Only the spelling segment_key produces: zero-padded to 12 digits, no
    // more leading zeros than that, and seq counting from 1.
    if (digits.size() > kSegmentSeqDigits && digits[0] == '0') return false;
    if (v == 0) return false;
    seq = v;
    return true;
}

}  // namespace bottomless::replicator
