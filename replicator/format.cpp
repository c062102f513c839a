// The object headers bottomless keeps in the bucket: JSON encoding and
// decoding, the field checks shared by writers and readers, the preamble
// (magic, version, header length), header peeks for listings, and the
// guarded JSON parser for untrusted text. Layout in format.h; the rest of
// the format is in format_body.cpp (body bytes), format_segment.cpp,
// format_snapshot.cpp and format_keys.cpp (see format_internal.h).
//
// Decoding trusts nothing: every field is checked before it sizes a buffer,
// the trailer is checked before anything in a segment is returned, and a
// snapshot's pages are only trustworthy once SnapshotReader::finish() says so.
// Any defect is an ErrorKind::Corrupt error naming the object, so a bad object
// is reported rather than restored.
#include "replicator/format.h"

#include <cstring>
#include <limits>
#include <nlohmann/json.hpp>
#include <optional>

#include "replicator/format_internal.h"

namespace bottomless::replicator {

using namespace format_detail;

namespace {

using json = nlohmann::json;

constexpr uint32_t kMaxEncryptionChunk = 1u << 20;

bool valid_page_size(uint32_t n) { return n >= 512 && n <= 65536 && (n & (n - 1)) == 0; }

// ---- header <-> JSON ----

json position_json(const WalPosition& p) {
    return {{"salt1", p.salt1}, {"salt2", p.salt2}, {"frame", p.frame}, {"cksum1", p.cksum1}, {"cksum2", p.cksum2}};
}

// Invalid UTF-8 in an id is replaced rather than thrown: ids come from
// configuration and end up in S3 keys, where they must be UTF-8 anyway.
std::string dump_json(const json& j) { return j.dump(-1, ' ', false, json::error_handler_t::replace); }

json encryption_json(const EncryptionInfo& e) {
    return {{"alg", e.alg}, {"key_id", e.key_id}, {"seed", e.seed}, {"chunk_size", e.chunk_size}};
}

// Reads typed fields out of a JSON object, remembering the first one that is
// missing or of the wrong type or range so the error can name it.
class FieldReader {
public:
    FieldReader(const json& obj, std::string path) : obj_(obj), path_(std::move(path)) {}

    void str(const char* key, std::string& out) {
        if (const json* v = find(key); v && v->is_string())
            out = v->get<std::string>();
        else
            fail(key);
    }
    void u32(const char* key, uint32_t& out) {
        uint64_t v = 0;
        if (unsigned_field(key, std::numeric_limits<uint32_t>::max(), v)) out = static_cast<uint32_t>(v);
    }
    void u64(const char* key, uint64_t& out) { unsigned_field(key, std::numeric_limits<uint64_t>::max(), out); }
    void i64(const char* key, int64_t& out) {
        const json* v = find(key);
        if (!v || !v->is_number_integer() ||
            (v->is_number_unsigned() &&
             v->get<uint64_t>() > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())))
            return fail(key);
        out = v->get<int64_t>();
    }
    void compression(const char* key, Compression& out) {
        const json* v = find(key);
        if (!v || !v->is_string() || !parse_compression(v->get_ref<const std::string&>(), out)) fail(key);
    }
    void position(const char* key, WalPosition& out) {
        const json* v = find(key);
        if (!v || !v->is_object()) return fail(key);
        FieldReader sub(*v, path_ + key + ".");
        sub.u32("salt1", out.salt1);
        sub.u32("salt2", out.salt2);
        sub.u64("frame", out.frame);
        sub.u32("cksum1", out.cksum1);
        sub.u32("cksum2", out.cksum2);
        if (bad_.empty()) bad_ = sub.bad();
    }
    // Optional: absent means a plaintext object.
    void encryption(const char* key, std::optional<EncryptionInfo>& out) {
        const json* v = find(key);
        if (!v) return;
        if (!v->is_object()) return fail(key);
        FieldReader sub(*v, path_ + key + ".");
        EncryptionInfo e;
        sub.str("alg", e.alg);
        sub.str("key_id", e.key_id);
        sub.str("seed", e.seed);
        sub.u32("chunk_size", e.chunk_size);
        if (bad_.empty()) bad_ = sub.bad();
        out = std::move(e);
    }
    const json* array(const char* key) {
        const json* v = find(key);
        if (!v || !v->is_array()) {
            fail(key);
            return nullptr;
        }
        return v;
    }
    void adopt(const FieldReader& sub) {
        if (bad_.empty()) bad_ = sub.bad();
    }
    // Empty when every field read so far was present and well-typed.
    const std::string& bad() const { return bad_; }

private:
    const json* find(const char* key) const {
        auto it = obj_.find(key);
        return it == obj_.end() ? nullptr : &*it;
    }
    bool unsigned_field(const char* key, uint64_t max, uint64_t& out) {
        const json* v = find(key);
        if (!v || !v->is_number_unsigned() || v->get<uint64_t>() > max) {
            fail(key);
            return false;
        }
        out = v->get<uint64_t>();
        return true;
    }
    void fail(const char* key) {
        if (bad_.empty()) bad_ = path_ + key;
    }

    const json& obj_;
    std::string path_;
    std::string bad_;
};

// Semantic checks shared by encoding (a caller bug) and decoding (a corrupt
// object). Return "field: why" or empty when valid.
std::string check_common(const std::string& db_id, const std::string& generation, uint32_t page_size) {
    if (db_id.empty()) return "db_id: empty";
    if (generation.empty()) return "generation: empty";
    if (!valid_page_size(page_size))
        return "page_size: " + std::to_string(page_size) + " is not a power of two from 512 to 65536";
    return {};
}

std::string check_encryption(const std::optional<EncryptionInfo>& e) {
    if (!e) return {};
    if (e->alg != kEncryptionAlg)
        return "encryption.alg: '" + e->alg + "' is not one this build reads (" + kEncryptionAlg + ")";
    if (e->key_id.size() != 16 || !is_lower_hex(e->key_id)) return "encryption.key_id: not 16 hex digits";
    if (e->seed.size() != 64 || !is_lower_hex(e->seed)) return "encryption.seed: not 64 hex digits";
    // Writers use 64 KiB; a decoder holds two chunks, so the header must not pick more.
    if (e->chunk_size < 1024 || e->chunk_size > kMaxEncryptionChunk)
        return "encryption.chunk_size: " + std::to_string(e->chunk_size) + " is outside 1 KiB .. 1 MiB";
    return {};
}

}  // namespace

namespace format_detail {

Error corrupt(const std::string& name, const std::string& what, const char* code) {
    return make_error(ErrorKind::Corrupt, name + ": " + what, code);
}

std::string snapshot_header_json(const SnapshotHeader& h) {
    json j = {{"db_id", h.db_id},
              {"generation", h.generation},
              {"page_size", h.page_size},
              {"db_pages", h.db_pages},
              {"created_us", h.created_us},
              {"last_commit_us", h.last_commit_us},
              {"position", position_json(h.position)},
              {"parent_generation", h.parent_generation},
              {"parent_seq", h.parent_seq},
              {"compression", to_string(h.compression)}};
    if (h.encryption) j["encryption"] = encryption_json(*h.encryption);
    if (h.frame_pages) j["frame_pages"] = h.frame_pages;
    return dump_json(j);
}

std::string segment_header_json(const SegmentHeader& h) {
    json txns = json::array();
    for (const SegmentTxn& t : h.txns)
        txns.push_back({{"frames", t.frames}, {"db_pages", t.db_pages}, {"commit_us", t.commit_us}});
    json j = {{"db_id", h.db_id},
              {"generation", h.generation},
              {"seq", h.seq},
              {"page_size", h.page_size},
              {"start", position_json(h.start)},
              {"end", position_json(h.end)},
              {"prev_sha256", h.prev_sha256},
              {"txns", std::move(txns)},
              {"compression", to_string(h.compression)}};
    if (h.encryption) j["encryption"] = encryption_json(*h.encryption);
    return dump_json(j);
}

std::string check_snapshot_header(const SnapshotHeader& h) {
    if (std::string e = check_common(h.db_id, h.generation, h.page_size); !e.empty()) return e;
    if (h.frame_pages) {
        if (h.compression != Compression::Zstd || h.encryption)
            return "frame_pages: a page index is only in plaintext zstd snapshots";
        if (uint64_t{h.frame_pages} * h.page_size > kMaxSnapshotFrameBytes)
            return "frame_pages: " + std::to_string(h.frame_pages) + " pages of " + std::to_string(h.page_size) +
                   " bytes is more than the " + std::to_string(kMaxSnapshotFrameBytes) + " bytes a frame may hold";
        if (page_index_bytes(h) > kMaxPageIndexBytes)
            return "db_pages: a page index of " + std::to_string(page_index_bytes(h)) + " bytes, more than the " +
                   std::to_string(kMaxPageIndexBytes) + " a snapshot may hold";
    }
    return check_encryption(h.encryption);
}

std::string check_segment_header(const SegmentHeader& h) {
    if (std::string e = check_common(h.db_id, h.generation, h.page_size); !e.empty()) return e;
    if (h.seq == 0) return "seq: 0 (segments count from 1)";
    if (!h.prev_sha256.empty() && (h.prev_sha256.size() != 64 || !is_lower_hex(h.prev_sha256)))
        return "prev_sha256: not a hex SHA-256";
    for (size_t i = 0; i < h.txns.size(); ++i) {
        // A transaction ends with its commit frame, which records a non-zero db size.
        if (h.txns[i].frames == 0) return "txns[" + std::to_string(i) + "].frames: 0";
        if (h.txns[i].db_pages == 0) return "txns[" + std::to_string(i) + "].db_pages: 0";
    }
    // Declarations bound what decoding may produce; a ratio test would
    // refuse legitimate sparse pages, a declared cap does not.
    if (h.txns.size() > kMaxSegmentTxns)
        return "txns: " + std::to_string(h.txns.size()) + " transactions, more than the " +
               std::to_string(kMaxSegmentTxns) + " a segment may hold";
    const uint64_t body = h.frame_count() * (4 + uint64_t{h.page_size});
    if (body > kMaxSegmentBodyBytes)
        return "txns: " + std::to_string(h.frame_count()) + " frames of " + std::to_string(h.page_size) +
               " bytes decode to " + std::to_string(body) + " bytes, more than the " +
               std::to_string(kMaxSegmentBodyBytes) + " a segment may hold";
    return check_encryption(h.encryption);
}

Result<SnapshotHeader> snapshot_header_from_json(std::string_view text, const std::string& name, uint32_t version) {
    std::string why;
    json j = parse_untrusted_json(text, kMaxHeaderSize, &why);
    if (j.is_discarded()) return corrupt(name, "snapshot header is not valid JSON (" + why + ")");
    if (!j.is_object()) return corrupt(name, "snapshot header is not a JSON object");
    SnapshotHeader h;
    FieldReader r(j, "");
    r.str("db_id", h.db_id);
    r.str("generation", h.generation);
    r.u32("page_size", h.page_size);
    r.u32("db_pages", h.db_pages);
    r.i64("created_us", h.created_us);
    r.i64("last_commit_us", h.last_commit_us);
    r.position("position", h.position);
    r.str("parent_generation", h.parent_generation);
    r.u64("parent_seq", h.parent_seq);
    r.compression("compression", h.compression);
    r.encryption("encryption", h.encryption);
    if (j.contains("frame_pages")) {
        r.u32("frame_pages", h.frame_pages);
        if (r.bad().empty() && h.frame_pages == 0) return corrupt(name, "snapshot header field frame_pages: 0");
    }
    if (!r.bad().empty()) return corrupt(name, "snapshot header field " + r.bad() + " missing or invalid");
    if (std::string e = check_snapshot_header(h); !e.empty()) return corrupt(name, "snapshot header field " + e);
    if ((version == kIndexedSnapshotVersion) != (h.frame_pages != 0))
        return corrupt(name, "a format-" + std::to_string(version) + " snapshot whose header " +
                                 (h.frame_pages ? "has" : "lacks") + " frame_pages");
    return h;
}

Result<SegmentHeader> segment_header_from_json(std::string_view text, const std::string& name) {
    std::string why;
    json j = parse_untrusted_json(text, kMaxHeaderSize, &why);
    if (j.is_discarded()) return corrupt(name, "segment header is not valid JSON (" + why + ")");
    if (!j.is_object()) return corrupt(name, "segment header is not a JSON object");
    SegmentHeader h;
    FieldReader r(j, "");
    r.str("db_id", h.db_id);
    r.str("generation", h.generation);
    r.u64("seq", h.seq);
    r.u32("page_size", h.page_size);
    r.position("start", h.start);
    r.position("end", h.end);
    r.str("prev_sha256", h.prev_sha256);
    if (const json* txns = r.array("txns")) {
        if (txns->size() > kMaxSegmentTxns)
            return corrupt(name, "segment header field txns: " + std::to_string(txns->size()) +
                                     " transactions, more than the " + std::to_string(kMaxSegmentTxns) +
                                     " a segment may hold");
        h.txns.reserve(txns->size());
        for (size_t i = 0; i < txns->size() && r.bad().empty(); ++i) {
            const json& t = (*txns)[i];
            std::string path = "txns[" + std::to_string(i) + "]";
            if (!t.is_object()) return corrupt(name, "segment header field " + path + " missing or invalid");
            SegmentTxn txn;
            FieldReader tr(t, path + ".");
            tr.u32("frames", txn.frames);
            tr.u32("db_pages", txn.db_pages);
            tr.i64("commit_us", txn.commit_us);
            r.adopt(tr);
            h.txns.push_back(txn);
        }
    }
    r.compression("compression", h.compression);
    r.encryption("encryption", h.encryption);
    if (!r.bad().empty()) return corrupt(name, "segment header field " + r.bad() + " missing or invalid");
    if (std::string e = check_segment_header(h); !e.empty()) return corrupt(name, "segment header field " + e);
    return h;
}

// ---- preamble ----

std::string preamble(const char* magic, const std::string& header_json, uint32_t version) {
    std::string out(magic, kMagicSize);
    put_be32(out, version);
    put_be32(out, static_cast<uint32_t>(header_json.size()));
    out += header_json;
    return out;
}

// Checks magic and version of the first kPreambleSize bytes; yields the header length.
Status check_preamble(std::string_view p, const char* magic, const char* kind, const std::string& name,
                      uint32_t& header_len, uint32_t* version_out) {
    if (std::memcmp(p.data(), magic, kMagicSize) != 0) {
        const char* other = std::strcmp(magic, kSnapshotMagic) == 0 ? kSegmentMagic : kSnapshotMagic;
        if (std::memcmp(p.data(), other, kMagicSize) == 0)
            return corrupt(name, std::string("bad magic: this is a ") +
                                     (other == kSnapshotMagic ? "snapshot" : "segment") + ", not a " + kind);
        return corrupt(name, std::string("bad magic: not a bottomless ") + kind);
    }
    uint32_t version = get_be32(p.data() + kMagicSize);
    const bool snapshot = std::strcmp(magic, kSnapshotMagic) == 0;
    if (version != kFormatVersion && !(snapshot && version == kIndexedSnapshotVersion))
        return corrupt(name,
                       "unsupported format version " + std::to_string(version) + " (this build reads " +
                           (snapshot ? "1 and 2" : std::to_string(kFormatVersion)) + "): upgrade bottomless",
                       kCodeVersion);
    if (version_out) *version_out = version;
    header_len = get_be32(p.data() + kMagicSize + 4);
    if (header_len > kMaxHeaderSize)
        return corrupt(name, std::string(kind) + " header field length invalid: " + std::to_string(header_len) +
                                 " bytes exceeds the " + std::to_string(kMaxHeaderSize) + "-byte limit");
    return {};
}

// Splits off magic/version/length and returns the header text of a prefix
// that must hold all of it.
Result<std::string_view> header_text(std::string_view bytes, const char* magic, const char* kind,
                                     const std::string& name, uint32_t* version) {
    if (bytes.size() < kPreambleSize)
        return corrupt(name,
                       "truncated: " + std::to_string(bytes.size()) + " bytes, shorter than the " +
                           std::to_string(kPreambleSize) + "-byte preamble",
                       kCodeTruncated);
    uint32_t header_len = 0;
    if (Status st = check_preamble(bytes, magic, kind, name, header_len, version); !st) return std::move(st).error();
    if (bytes.size() - kPreambleSize < header_len)
        return corrupt(name,
                       "truncated: the " + std::string(kind) + " header needs " +
                           std::to_string(kPreambleSize + header_len) + " bytes, only " + std::to_string(bytes.size()) +
                           " available",
                       kCodeTruncated);
    return bytes.substr(kPreambleSize, header_len);
}

}  // namespace format_detail

// ---- compression names ----

const char* to_string(Compression c) {
    switch (c) {
    case Compression::None: return "none";
    case Compression::Zstd: return "zstd";
    }
    return "unknown";
}

bool parse_compression(std::string_view s, Compression& out) {
    if (s == "none")
        out = Compression::None;
    else if (s == "zstd")
        out = Compression::Zstd;
    else
        return false;
    return true;
}

uint64_t SegmentHeader::frame_count() const {
    uint64_t n = 0;
    for (const SegmentTxn& t : txns) n += t.frames;
    return n;
}

// ---- untrusted JSON ----

json parse_untrusted_json(std::string_view text, size_t max_bytes, std::string* why) {
    auto refuse = [&](std::string reason) {
        if (why) *why = std::move(reason);
        return json(json::value_t::discarded);
    };
    if (text.size() > max_bytes)
        return refuse(std::to_string(text.size()) + " bytes, more than the " + std::to_string(max_bytes) +
                      "-byte limit");
    // Depth first, with a scan that needs no memory: nlohmann parses deep
    // input iteratively, but copies and some visitors recurse per level, and
    // none of our documents is more than a few levels deep.
    int depth = 0;
    bool in_string = false, escaped = false;
    for (char c : text) {
        if (in_string) {
            if (escaped) escaped = false;
            else if (c == '\\') escaped = true;
            else if (c == '"') in_string = false;
        } else if (c == '"') {
            in_string = true;
        } else if (c == '[' || c == '{') {
            if (++depth > kMaxJsonDepth)
                return refuse("nested deeper than " + std::to_string(kMaxJsonDepth) + " levels");
        } else if ((c == ']' || c == '}') && depth > 0) {
            --depth;
        }
    }
    json j = json::parse(text.begin(), text.end(), nullptr, /*allow_exceptions=*/false);
    if (j.is_discarded()) return refuse("not valid JSON");
    return j;
}

// ---- headers only ----

Result<SnapshotHeader> peek_snapshot_header(std::string_view prefix, const std::string& name) {
    uint32_t version = 0;
    Result<std::string_view> text = header_text(prefix, kSnapshotMagic, "snapshot", name, &version);
    if (!text) return std::move(text).error();
    return snapshot_header_from_json(*text, name, version);
}

Result<SegmentHeader> peek_segment_header(std::string_view prefix, const std::string& name) {
    Result<std::string_view> text = header_text(prefix, kSegmentMagic, "segment", name);
    if (!text) return std::move(text).error();
    return segment_header_from_json(*text, name);
}

}  // namespace bottomless::replicator
