// Encoding and decoding of the objects bottomless keeps in the bucket:
// snapshots (streamed, any size) and WAL segments (in memory, batch-sized),
// plus generation ids and object keys. Layout in format.h.
//
// Decoding trusts nothing: every field is checked before it sizes a buffer,
// the trailer is checked before anything in a segment is returned, and a
// snapshot's pages are only trustworthy once SnapshotReader::finish() says so.
// Any defect is an ErrorKind::Corrupt error naming the object, so a bad object
// is reported rather than restored.
#include "replicator/format.h"

#include <zstd.h>
#include <zstd_errors.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <limits>
#include <nlohmann/json.hpp>
#include <optional>
#include <random>
#include <stdexcept>
#include <type_traits>

#include "s3/crypto.h"

namespace bottomless::replicator {

namespace {

using json = nlohmann::json;

constexpr size_t kMagicSize = 8;
constexpr size_t kPreambleSize = kMagicSize + 4 + 4;  // magic, version, header length
constexpr size_t kTrailerSize = 32;                   // SHA-256
// Snapshot output goes to the sink in pieces of this size: large enough for
// an S3 multipart part to be assembled cheaply, small enough to keep memory flat.
constexpr size_t kSnapshotChunk = 1u << 20;
constexpr size_t kSegmentChunk = 64u << 10;
// Level 1: on SQLite pages zstd's own benchmark (`zstd -b1`/`-b3`) measured
// 1.8-2.1x the speed of level 3 for 0.7-7 % more bytes (docs/FORMAT.md); the
// uploader shares the cores with the application's writers.
constexpr int kZstdLevel = 1;
constexpr uint64_t kGenerationTimeMax = (uint64_t{1} << 48) - 1;
constexpr size_t kGenerationIdSize = 16 + 1 + 8;
constexpr size_t kSegmentSeqDigits = 12;
constexpr uint32_t kMaxEncryptionChunk = 1u << 20;

struct CCtxDeleter {
    void operator()(ZSTD_CCtx* c) const noexcept { ZSTD_freeCCtx(c); }
};
struct DCtxDeleter {
    void operator()(ZSTD_DCtx* d) const noexcept { ZSTD_freeDCtx(d); }
};
using CCtxPtr = std::unique_ptr<ZSTD_CCtx, CCtxDeleter>;
using DCtxPtr = std::unique_ptr<ZSTD_DCtx, DCtxDeleter>;

void put_be32(std::string& out, uint32_t v) {
    const char b[4] = {static_cast<char>(v >> 24), static_cast<char>(v >> 16), static_cast<char>(v >> 8),
                       static_cast<char>(v)};
    out.append(b, 4);
}

uint32_t get_be32(const char* p) {
    const auto* u = reinterpret_cast<const unsigned char*>(p);
    return (uint32_t{u[0]} << 24) | (uint32_t{u[1]} << 16) | (uint32_t{u[2]} << 8) | uint32_t{u[3]};
}

bool valid_page_size(uint32_t n) { return n >= 512 && n <= 65536 && (n & (n - 1)) == 0; }

bool is_lower_hex(std::string_view s) {
    return std::all_of(s.begin(), s.end(), [](char c) { return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'); });
}

// Codes let callers tell the cases apart without parsing messages: a peek at
// a too-short prefix ("Truncated") can fetch more, an object from a newer
// writer ("UnsupportedVersion") needs an upgrade, not a restore from elsewhere.
constexpr const char* kCodeCorrupt = "CorruptObject";
constexpr const char* kCodeTruncated = "Truncated";
constexpr const char* kCodeVersion = "UnsupportedVersion";

Error corrupt(const std::string& name, const std::string& what, const char* code = kCodeCorrupt) {
    return make_error(ErrorKind::Corrupt, name + ": " + what, code);
}

// Zstd only fails on the encoding side for memory or a broken library; like
// the EVP wrappers in s3/crypto.cpp, that is an exception, not a Result.
void check_zstd(size_t rc, const char* what) {
    if (ZSTD_isError(rc)) throw std::runtime_error(std::string(what) + ": " + ZSTD_getErrorName(rc));
}

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

std::string check_snapshot_header(const SnapshotHeader& h) {
    if (std::string e = check_common(h.db_id, h.generation, h.page_size); !e.empty()) return e;
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

Result<SnapshotHeader> snapshot_header_from_json(std::string_view text, const std::string& name) {
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
    if (!r.bad().empty()) return corrupt(name, "snapshot header field " + r.bad() + " missing or invalid");
    if (std::string e = check_snapshot_header(h); !e.empty()) return corrupt(name, "snapshot header field " + e);
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

std::string preamble(const char* magic, const std::string& header_json) {
    std::string out(magic, kMagicSize);
    put_be32(out, kFormatVersion);
    put_be32(out, static_cast<uint32_t>(header_json.size()));
    out += header_json;
    return out;
}

// Checks magic and version of the first kPreambleSize bytes; yields the header length.
Status check_preamble(std::string_view p, const char* magic, const char* kind, const std::string& name,
                      uint32_t& header_len) {
    if (std::memcmp(p.data(), magic, kMagicSize) != 0) {
        const char* other = std::strcmp(magic, kSnapshotMagic) == 0 ? kSegmentMagic : kSnapshotMagic;
        if (std::memcmp(p.data(), other, kMagicSize) == 0)
            return corrupt(name, std::string("bad magic: this is a ") +
                                     (other == kSnapshotMagic ? "snapshot" : "segment") + ", not a " + kind);
        return corrupt(name, std::string("bad magic: not a bottomless ") + kind);
    }
    uint32_t version = get_be32(p.data() + kMagicSize);
    if (version != kFormatVersion)
        return corrupt(name,
                       "unsupported format version " + std::to_string(version) + " (this build reads " +
                           std::to_string(kFormatVersion) + "): upgrade bottomless",
                       kCodeVersion);
    header_len = get_be32(p.data() + kMagicSize + 4);
    if (header_len > kMaxHeaderSize)
        return corrupt(name, std::string(kind) + " header field length invalid: " + std::to_string(header_len) +
                                 " bytes exceeds the " + std::to_string(kMaxHeaderSize) + "-byte limit");
    return {};
}

// Splits off magic/version/length and returns the header text of a prefix
// that must hold all of it.
Result<std::string_view> header_text(std::string_view bytes, const char* magic, const char* kind,
                                     const std::string& name) {
    if (bytes.size() < kPreambleSize)
        return corrupt(name,
                       "truncated: " + std::to_string(bytes.size()) + " bytes, shorter than the " +
                           std::to_string(kPreambleSize) + "-byte preamble",
                       kCodeTruncated);
    uint32_t header_len = 0;
    if (Status st = check_preamble(bytes, magic, kind, name, header_len); !st) return std::move(st).error();
    if (bytes.size() - kPreambleSize < header_len)
        return corrupt(name,
                       "truncated: the " + std::string(kind) + " header needs " +
                           std::to_string(kPreambleSize + header_len) + " bytes, only " + std::to_string(bytes.size()) +
                           " available",
                       kCodeTruncated);
    return bytes.substr(kPreambleSize, header_len);
}

// ---- body encoding ----

// Writes an object's bytes into fixed-size chunks handed to `emit`, hashing
// every byte on its way out for the trailer. Body bytes go through zstd (once
// start_zstd() was called), then through the sealer (once start_sealing()
// was called): compress, then encrypt.
class ObjectEncoder {
public:
    using Emit = std::function<Status(std::string_view)>;
    ObjectEncoder(size_t chunk, Emit emit)
        : hasher_(s3::Hasher::Algo::Sha256), buf_(chunk, '\0'), emit_(std::move(emit)) {}

    // Starts a zstd frame for the body; pledging the size puts it in the frame
    // header and lets zstd pick a window no bigger than the content.
    void start_zstd(uint64_t pledged_size) {
        cctx_.reset(ZSTD_createCCtx());
        if (!cctx_) throw std::bad_alloc();
        check_zstd(ZSTD_CCtx_setParameter(cctx_.get(), ZSTD_c_compressionLevel, kZstdLevel), "ZSTD_c_compressionLevel");
        // Pinned: readers refuse a larger window (kZstdWindowLog in format.h).
        check_zstd(ZSTD_CCtx_setParameter(cctx_.get(), ZSTD_c_windowLog, kZstdWindowLog), "ZSTD_c_windowLog");
        check_zstd(ZSTD_CCtx_setPledgedSrcSize(cctx_.get(), pledged_size), "ZSTD_CCtx_setPledgedSrcSize");
        zbuf_.resize(ZSTD_CStreamOutSize());
    }

    void start_sealing(const Cipher& cipher, const EncryptionInfo& info, std::string aad) {
        sealer_.emplace(cipher, info, std::move(aad));
    }

    // Body bytes.
    Status write(std::string_view data) {
        if (!cctx_) return write_body(data);
        ZSTD_inBuffer in{data.data(), data.size(), 0};
        while (in.pos < in.size) {
            ZSTD_outBuffer out{zbuf_.data(), zbuf_.size(), 0};
            check_zstd(ZSTD_compressStream2(cctx_.get(), &out, &in, ZSTD_e_continue), "ZSTD_compressStream2");
            if (Status st = write_body(std::string_view(zbuf_.data(), out.pos)); !st) return st;
        }
        return {};
    }

    // Bytes written as they are (preamble, header).
    Status write_raw(std::string_view data) {
        while (!data.empty()) {
            size_t n = std::min(data.size(), buf_.size() - fill_);
            std::memcpy(buf_.data() + fill_, data.data(), n);
            fill_ += n;
            data.remove_prefix(n);
            if (fill_ == buf_.size())
                if (Status st = flush(); !st) return st;
        }
        return {};
    }

    // Ends the zstd frame (if any) and the sealed stream (if any), flushes
    // everything, and returns the raw SHA-256 of all bytes emitted.
    Result<std::string> end() {
        if (cctx_) {
            ZSTD_inBuffer in{nullptr, 0, 0};
            for (;;) {
                ZSTD_outBuffer out{zbuf_.data(), zbuf_.size(), 0};
                size_t remaining = ZSTD_compressStream2(cctx_.get(), &out, &in, ZSTD_e_end);
                check_zstd(remaining, "ZSTD_compressStream2(end)");
                if (Status st = write_body(std::string_view(zbuf_.data(), out.pos)); !st) return std::move(st).error();
                if (remaining == 0) break;
            }
            cctx_.reset();
        }
        if (sealer_) {
            if (Status st = sealer_->finish([this](std::string_view c) { return write_raw(c); }); !st)
                return std::move(st).error();
            sealer_.reset();
        }
        if (Status st = flush(); !st) return std::move(st).error();
        return hasher_.finish();
    }

private:
    Status write_body(std::string_view data) {
        if (data.empty()) return {};
        if (!sealer_) return write_raw(data);
        return sealer_->write(data, [this](std::string_view c) { return write_raw(c); });
    }

    Status flush() {
        if (fill_ == 0) return {};
        std::string_view chunk(buf_.data(), fill_);
        hasher_.update(chunk);
        fill_ = 0;
        return emit_(chunk);
    }

    s3::Hasher hasher_;
    CCtxPtr cctx_;
    std::string zbuf_;                  // zstd output, before sealing
    std::optional<ChunkSealer> sealer_;
    std::string buf_;  // fixed size: the chunk handed to emit
    size_t fill_ = 0;
    Emit emit_;
};

// ---- body decoding ----

// Turns a body (raw or zstd), fed in arbitrary pieces, into records of a
// fixed size. Partial records are buffered; nothing is held beyond one record.
class RecordDecoder {
public:
    using OnRecord = std::function<Status(std::string_view)>;
    RecordDecoder(Compression c, size_t record_size, const std::string& name, const char* kind)
        : record_(record_size, '\0'), name_(name), kind_(kind) {
        if (c == Compression::Zstd) {
            dctx_.reset(ZSTD_createDCtx());
            if (!dctx_) throw std::bad_alloc();
            // The frame header names the window the decoder must allocate:
            // never more than a writer of this format uses.
            check_zstd(ZSTD_DCtx_setParameter(dctx_.get(), ZSTD_d_windowLogMax, kZstdWindowLog), "ZSTD_d_windowLogMax");
        }
    }

    Status feed(std::string_view data, const OnRecord& on_record) {
        if (!dctx_) {
            while (!data.empty()) {
                size_t n = std::min(data.size(), record_.size() - fill_);
                std::memcpy(record_.data() + fill_, data.data(), n);
                fill_ += n;
                data.remove_prefix(n);
                if (Status st = emit_if_full(on_record); !st) return st;
            }
            return {};
        }
        ZSTD_inBuffer in{data.data(), data.size(), 0};
        while (!ended_) {
            if (in.pos == in.size && !pending_) break;
            ZSTD_outBuffer out{record_.data(), record_.size(), fill_};
            size_t before_in = in.pos;
            size_t r = ZSTD_decompressStream(dctx_.get(), &out, &in);
            if (ZSTD_isError(r) && ZSTD_getErrorCode(r) == ZSTD_error_frameParameter_windowTooLarge)
                return corrupt(name_, std::string(kind_) + " body's zstd frame asks for a window larger than " +
                                          std::to_string(1u << kZstdWindowLog) +
                                          " bytes, more than any writer of this format uses");
            if (ZSTD_isError(r))
                return corrupt(name_,
                               std::string(kind_) + " body does not decompress (zstd: " + ZSTD_getErrorName(r) + ")");
            bool progressed = in.pos != before_in || out.pos != fill_;
            fill_ = out.pos;
            // A full output buffer may leave decoded bytes inside zstd; ask again.
            pending_ = fill_ == record_.size();
            if (r == 0) ended_ = true;
            if (Status st = emit_if_full(on_record); !st) return st;
            if (!progressed && !ended_) break;
        }
        if (ended_ && in.pos < in.size)
            return corrupt(name_, std::string(kind_) + " body has " + std::to_string(in.size - in.pos) +
                                      " stray bytes after the end of its zstd frame");
        return {};
    }

    // Whether the zstd frame is complete (always true for an uncompressed
    // body). A body ends cleanly when this holds and no partial record is left.
    bool frame_ended() const { return !dctx_ || ended_; }
    size_t partial_bytes() const { return fill_; }

private:
    Status emit_if_full(const OnRecord& on_record) {
        if (fill_ < record_.size()) return {};
        fill_ = 0;
        return on_record(std::string_view(record_.data(), record_.size()));
    }

    DCtxPtr dctx_;
    std::string record_;
    size_t fill_ = 0;
    bool pending_ = false;  // the output filled up: zstd may hold more decoded bytes
    bool ended_ = false;
    const std::string& name_;
    const char* kind_;
};

// A body as stored: sealed chunks (encrypted objects) around zstd or raw
// records. Plaintext reaches the record decoder only once authenticated.
class BodyDecoder {
public:
    using OnRecord = RecordDecoder::OnRecord;
    BodyDecoder(Compression c, size_t record_size, const std::string& name, const char* kind, const Cipher* cipher,
                const std::optional<EncryptionInfo>& info, std::string aad)
        : records_(c, record_size, name, kind), name_(name) {
        // Callers check the key first (check_cipher); this guard keeps a
        // missed check an error instead of a null dereference.
        if (info && cipher) opener_.emplace(*cipher, *info, std::move(aad), name);
        no_key_ = info && !cipher;
    }

    Status feed(std::string_view data, const OnRecord& on_record) {
        if (no_key_) return make_error(ErrorKind::InvalidArgument, name_ + ": encrypted, and no key was given",
                                       "EncryptionKeyRequired");
        if (!opener_) return records_.feed(data, on_record);
        return opener_->feed(data, [&](std::string_view plain) { return records_.feed(plain, on_record); });
    }
    // The body is complete: the chunk held back is the last one.
    Status end(const OnRecord& on_record) {
        if (no_key_) return make_error(ErrorKind::InvalidArgument, name_ + ": encrypted, and no key was given",
                                       "EncryptionKeyRequired");
        if (!opener_) return {};
        return opener_->finish([&](std::string_view plain) { return records_.feed(plain, on_record); });
    }
    bool frame_ended() const { return records_.frame_ended(); }
    size_t partial_bytes() const { return records_.partial_bytes(); }

private:
    std::optional<ChunkOpener> opener_;
    RecordDecoder records_;
    const std::string& name_;
    bool no_key_ = false;
};

// The header an encrypted object is written with: its encryption fields, and
// keyed stand-ins for the WAL checksums (they are a function of content).
template <class Header>
void prepare_encrypted(Header& h, const Cipher* cipher) {
    h.encryption.reset();
    if (!cipher) return;
    h.encryption = cipher->new_object();
    if constexpr (std::is_same_v<Header, SnapshotHeader>) {
        h.position = cipher->mask(h.position, h.db_id, h.generation);
    } else {
        h.start = cipher->mask(h.start, h.db_id, h.generation);
        h.end = cipher->mask(h.end, h.db_id, h.generation);
    }
}

}  // namespace

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

// ---- segments ----

std::string encode_segment(const SegmentHeader& plain_header, const std::vector<SegmentFrame>& frames,
                           std::string* sha256_hex, const Cipher* cipher) {
    SegmentHeader header = plain_header;
    prepare_encrypted(header, cipher);
    // A segment we could not decode must never be uploaded: refuse loudly.
    if (std::string e = check_segment_header(header); !e.empty())
        throw std::invalid_argument("encode_segment: header field " + e);
    if (frames.size() != header.frame_count())
        throw std::invalid_argument("encode_segment: " + std::to_string(frames.size()) + " frames, txns list " +
                                    std::to_string(header.frame_count()));
    for (const SegmentFrame& f : frames) {
        if (f.pgno == 0 || f.page.size() != header.page_size)
            throw std::invalid_argument("encode_segment: frame for page " + std::to_string(f.pgno) + " has " +
                                        std::to_string(f.page.size()) + " bytes, page size is " +
                                        std::to_string(header.page_size));
    }

    std::string out;
    ObjectEncoder enc(kSegmentChunk, [&out](std::string_view chunk) -> Status {
        out.append(chunk);
        return {};
    });
    const std::string header_json = segment_header_json(header);
    if (header_json.size() > kMaxHeaderSize)
        throw std::invalid_argument("encode_segment: header of " + std::to_string(header_json.size()) +
                                    " bytes exceeds the " + std::to_string(kMaxHeaderSize) + "-byte limit");
    // The emit callback never fails, so the Status results below are always OK.
    (void)enc.write_raw(preamble(kSegmentMagic, header_json));
    if (cipher) enc.start_sealing(*cipher, *header.encryption, object_aad(kSegmentMagic, header_json));
    if (header.compression == Compression::Zstd)
        enc.start_zstd(static_cast<uint64_t>(frames.size()) * (4 + header.page_size));
    std::string pgno;
    for (const SegmentFrame& f : frames) {
        pgno.clear();
        put_be32(pgno, f.pgno);
        (void)enc.write(pgno);
        (void)enc.write(f.page);
    }
    Result<std::string> digest = enc.end();
    const std::string& d = digest.value();
    if (sha256_hex) *sha256_hex = s3::to_hex(reinterpret_cast<const unsigned char*>(d.data()), d.size());
    out += d;
    return out;
}

Result<std::string> for_each_segment_frame(std::string_view bytes, const std::string& name, const Cipher* cipher,
                                           const SegmentHeaderFn& on_header, const SegmentFrameFn& on_frame) {
    Result<std::string_view> text = header_text(bytes, kSegmentMagic, "segment", name);
    if (!text) return std::move(text).error();
    const size_t body_start = kPreambleSize + text->size();
    if (bytes.size() - body_start < kTrailerSize)
        return corrupt(name,
                       "truncated: " + std::to_string(bytes.size()) + " bytes, no room for the " +
                           std::to_string(kTrailerSize) + "-byte trailer after the header",
                       kCodeTruncated);

    // The trailer first: nothing else in an object whose checksum fails is
    // worth interpreting.
    std::string_view content = bytes.substr(0, bytes.size() - kTrailerSize);
    std::string_view trailer = bytes.substr(bytes.size() - kTrailerSize);
    s3::Sha256Digest digest = s3::sha256(content);
    if (std::memcmp(digest.data(), trailer.data(), kTrailerSize) != 0)
        return corrupt(name, "checksum mismatch: the trailer is not the SHA-256 of the content (corrupt or truncated)");

    Result<SegmentHeader> parsed = segment_header_from_json(*text, name);
    if (!parsed) return std::move(parsed).error();
    const SegmentHeader& header = *parsed;
    if (Status st = check_cipher(header.encryption, cipher, name); !st) return std::move(st).error();

    // frame_count() is bounded by check_segment_header (kMaxSegmentBodyBytes).
    const uint64_t expected = header.frame_count();
    const size_t record_size = 4 + header.page_size;
    std::string_view body = content.substr(body_start);
    if (header.compression == Compression::None && !header.encryption &&
        (body.size() / record_size != expected || body.size() % record_size != 0))
        return corrupt(name, "segment body is " + std::to_string(body.size()) + " bytes, expected " +
                                 std::to_string(expected) + " frames of " + std::to_string(record_size));
    if (on_header)
        if (Status st = on_header(header); !st) return std::move(st).error();

    BodyDecoder dec(header.compression, record_size, name, "segment", cipher, header.encryption,
                    header.encryption ? object_aad(kSegmentMagic, *text) : std::string());
    uint64_t frames = 0;
    // Runs as each record leaves the decompressor: a body that decodes to
    // more than its header declares stops here, not after it was all inflated.
    auto on_record = [&](std::string_view rec) -> Status {
        if (frames == expected)
            return corrupt(name,
                           "segment body holds more frames than its txns list (" + std::to_string(expected) + ")");
        const uint32_t pgno = get_be32(rec.data());
        if (pgno == 0) return corrupt(name, "segment frame " + std::to_string(frames + 1) + " has page number 0");
        return on_frame(frames++, pgno, rec.substr(4));
    };
    if (Status st = dec.feed(body, on_record); !st) return std::move(st).error();
    if (Status st = dec.end(on_record); !st) return std::move(st).error();
    if (!dec.frame_ended()) return corrupt(name, "segment body is truncated: its zstd frame does not end");
    if (dec.partial_bytes() != 0 || frames != expected)
        return corrupt(name, "segment body holds " + std::to_string(frames) +
                                 (dec.partial_bytes() ? " whole frames and a partial one" : " frames") +
                                 ", its txns list " + std::to_string(expected));
    return s3::to_hex(digest);
}

Result<DecodedSegment> decode_segment(std::string_view bytes, const std::string& name, const Cipher* cipher) {
    DecodedSegment seg;
    auto on_header = [&](const SegmentHeader& h) -> Status {
        seg.header = h;
        // The txns list is only a claim until the body backs it: do not let it size a buffer.
        seg.frames.reserve(std::min<uint64_t>(h.frame_count(), 1024));
        return {};
    };
    auto on_frame = [&](uint64_t, uint32_t pgno, std::string_view page) -> Status {
        seg.frames.push_back(SegmentFrame{pgno, std::string(page)});
        return {};
    };
    Result<std::string> sha = for_each_segment_frame(bytes, name, cipher, on_header, on_frame);
    if (!sha) return std::move(sha).error();
    seg.sha256 = std::move(*sha);
    return seg;
}

uint64_t max_segment_object_size() {
    // zstd's worst case for incompressible input, then a GCM tag per chunk
    // at the smallest chunk size a reader accepts.
    const uint64_t zstd = ZSTD_compressBound(kMaxSegmentBodyBytes);
    const uint64_t sealed = zstd + (zstd / 1024 + 1) * s3::AesGcm::kTagSize;
    return kPreambleSize + kMaxHeaderSize + sealed + kTrailerSize;
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

// ---- snapshot writer ----

struct SnapshotWriter::Impl {
    Impl(const SnapshotHeader& h, Sink s)
        : header(h), sink(std::move(s)), enc(kSnapshotChunk, [this](std::string_view chunk) -> Status {
              bytes_out += chunk.size();
              return sink(chunk);
          }) {}

    Error fail(Error e) {
        failed = e;
        return e;
    }

    SnapshotHeader header;
    Sink sink;
    ObjectEncoder enc;
    uint64_t bytes_out = 0;
    uint32_t pages = 0;
    bool finished = false;
    std::optional<Error> failed;  // sticky: once the stream broke, every later call reports it
};

SnapshotWriter::SnapshotWriter(const SnapshotHeader& plain_header, Sink sink, const Cipher* cipher)
    : impl_(std::make_unique<Impl>(plain_header, std::move(sink))) {
    SnapshotHeader& header = impl_->header;
    prepare_encrypted(header, cipher);
    if (std::string e = check_snapshot_header(header); !e.empty()) {
        impl_->failed = make_error(ErrorKind::InvalidArgument, "snapshot header field " + e);
        return;
    }
    const std::string header_json = snapshot_header_json(header);
    if (header_json.size() > kMaxHeaderSize) {
        impl_->failed = make_error(ErrorKind::InvalidArgument,
                                   "snapshot header of " + std::to_string(header_json.size()) +
                                       " bytes exceeds the " + std::to_string(kMaxHeaderSize) + "-byte limit");
        return;
    }
    if (Status st = impl_->enc.write_raw(preamble(kSnapshotMagic, header_json)); !st) {
        impl_->failed = std::move(st).error();
        return;
    }
    if (cipher) impl_->enc.start_sealing(*cipher, *header.encryption, object_aad(kSnapshotMagic, header_json));
    if (header.compression == Compression::Zstd)
        impl_->enc.start_zstd(static_cast<uint64_t>(header.db_pages) * header.page_size);
}

SnapshotWriter::~SnapshotWriter() = default;

Status SnapshotWriter::add_page(std::string_view page) {
    Impl& w = *impl_;
    if (w.failed) return *w.failed;
    if (w.finished) return make_error(ErrorKind::InvalidArgument, "snapshot writer: add_page after finish");
    if (page.size() != w.header.page_size)
        return make_error(ErrorKind::InvalidArgument, "snapshot writer: page " + std::to_string(w.pages + 1) + " has " +
                                                          std::to_string(page.size()) + " bytes, page size is " +
                                                          std::to_string(w.header.page_size));
    if (w.pages == w.header.db_pages)
        return make_error(ErrorKind::InvalidArgument,
                          "snapshot writer: more pages than db_pages (" + std::to_string(w.header.db_pages) + ")");
    if (Status st = w.enc.write(page); !st) return w.fail(std::move(st).error());
    ++w.pages;
    return {};
}

Result<std::string> SnapshotWriter::finish() {
    Impl& w = *impl_;
    if (w.failed) return *w.failed;
    if (w.finished) return make_error(ErrorKind::InvalidArgument, "snapshot writer: finish called twice");
    if (w.pages != w.header.db_pages)
        return make_error(ErrorKind::InvalidArgument, "snapshot writer: " + std::to_string(w.pages) +
                                                          " pages added, header says " +
                                                          std::to_string(w.header.db_pages));
    w.finished = true;
    Result<std::string> digest = w.enc.end();
    if (!digest) return w.fail(std::move(digest).error());
    if (Status st = w.sink(*digest); !st) return w.fail(std::move(st).error());
    w.bytes_out += digest->size();
    return s3::to_hex(reinterpret_cast<const unsigned char*>(digest->data()), digest->size());
}

uint64_t SnapshotWriter::bytes_out() const { return impl_->bytes_out; }

// ---- snapshot reader ----

struct SnapshotReader::Impl {
    enum class Phase { Preamble, Header, Body };

    Impl(std::string n, PageFn fn, const Cipher* c, Trailer t)
        : name(std::move(n)), on_page(std::move(fn)), cipher(c), hasher(s3::Hasher::Algo::Sha256),
          verify_trailer(t == Trailer::Verify) {}

    Status page(std::string_view p) {
        if (pages == header->db_pages)
            return corrupt(name, "snapshot holds more pages than its header's db_pages (" +
                                     std::to_string(header->db_pages) + ")");
        ++pages;
        return on_page(pages, p);
    }

    Error fail(Error e) {
        failed = e;
        return e;
    }

    // Bytes known not to be the trailer: hash them and parse them.
    Status consume(std::string_view data) {
        if (verify_trailer) hasher.update(data);
        while (!data.empty()) {
            if (phase == Phase::Preamble) {
                size_t n = std::min(data.size(), kPreambleSize - head.size());
                head.append(data.substr(0, n));
                data.remove_prefix(n);
                if (head.size() < kPreambleSize) return {};
                if (Status st = check_preamble(head, kSnapshotMagic, "snapshot", name, header_len); !st) return st;
                head.clear();
                phase = Phase::Header;
            }
            if (phase == Phase::Header) {
                size_t n = std::min<size_t>(data.size(), header_len - head.size());
                head.append(data.substr(0, n));
                data.remove_prefix(n);
                if (head.size() < header_len) return {};
                Result<SnapshotHeader> h = snapshot_header_from_json(head, name);
                if (!h) return std::move(h).error();
                // The key is checked before a single page comes out.
                if (Status st = check_cipher(h->encryption, cipher, name); !st) return st;
                header = std::move(*h);
                body.emplace(header->compression, header->page_size, name, "snapshot", cipher, header->encryption,
                             header->encryption ? object_aad(kSnapshotMagic, head) : std::string());
                std::string().swap(head);
                phase = Phase::Body;
            }
            if (phase == Phase::Body) return body->feed(data, [this](std::string_view p) { return page(p); });
        }
        return {};
    }

    std::string name;
    PageFn on_page;
    const Cipher* cipher;
    s3::Hasher hasher;  // over every byte released from `tail`
    bool verify_trailer;  // false: the caller checks the trailer (Trailer::Caller)
    Phase phase = Phase::Preamble;
    std::string head;  // preamble, then header bytes, until complete
    uint32_t header_len = 0;
    std::optional<SnapshotHeader> header;
    std::optional<BodyDecoder> body;
    // The last bytes seen: the trailer if the object ends here, so they are
    // neither hashed nor decoded until more bytes prove they are content.
    std::string tail;
    uint32_t pages = 0;
    bool finished = false;
    std::string sha256_hex;
    std::optional<Error> failed;  // sticky
};

SnapshotReader::SnapshotReader(std::string name, PageFn on_page, const Cipher* cipher, Trailer trailer)
    : impl_(std::make_unique<Impl>(std::move(name), std::move(on_page), cipher, trailer)) {}

SnapshotReader::~SnapshotReader() = default;

Status SnapshotReader::feed(std::string_view bytes) {
    Impl& r = *impl_;
    if (r.failed) return *r.failed;
    if (r.finished) return make_error(ErrorKind::InvalidArgument, r.name + ": snapshot reader: feed after finish");
    if (r.tail.size() + bytes.size() <= kTrailerSize) {
        r.tail.append(bytes);
        return {};
    }
    // Release everything but the last kTrailerSize bytes, oldest first.
    size_t release = r.tail.size() + bytes.size() - kTrailerSize;
    size_t from_tail = std::min(release, r.tail.size());
    if (from_tail) {
        Status st = r.consume(std::string_view(r.tail).substr(0, from_tail));
        if (!st) return r.fail(std::move(st).error());
        r.tail.erase(0, from_tail);
    }
    size_t from_bytes = release - from_tail;
    if (from_bytes) {
        Status st = r.consume(bytes.substr(0, from_bytes));
        if (!st) return r.fail(std::move(st).error());
    }
    r.tail.append(bytes.substr(from_bytes));
    return {};
}

Result<SnapshotHeader> SnapshotReader::finish() {
    Impl& r = *impl_;
    if (r.failed) return *r.failed;
    if (r.finished) return *r.header;
    if (r.phase != Impl::Phase::Body)
        return r.fail(corrupt(r.name, "truncated: the object ends inside its preamble or header", kCodeTruncated));
    if (r.tail.size() != kTrailerSize || (r.verify_trailer && r.hasher.finish() != r.tail))
        return r.fail(corrupt(r.name,
                              "checksum mismatch: the trailer is not the SHA-256 of the content "
                              "(corrupt or truncated)"));
    if (Status st = r.body->end([&r](std::string_view p) { return r.page(p); }); !st) return r.fail(std::move(st).error());
    if (!r.body->frame_ended())
        return r.fail(corrupt(r.name, "snapshot body is truncated: its zstd frame does not end"));
    if (r.body->partial_bytes() != 0)
        return r.fail(corrupt(r.name, "snapshot body ends inside a page (" + std::to_string(r.body->partial_bytes()) +
                                          " of " + std::to_string(r.header->page_size) + " bytes)"));
    if (r.pages != r.header->db_pages)
        return r.fail(corrupt(r.name, "snapshot holds " + std::to_string(r.pages) + " pages, its header says " +
                                          std::to_string(r.header->db_pages)));
    r.finished = true;
    r.sha256_hex = s3::to_hex(reinterpret_cast<const unsigned char*>(r.tail.data()), r.tail.size());
    return *r.header;
}

const SnapshotHeader* SnapshotReader::header() const { return impl_->header ? &*impl_->header : nullptr; }

std::string SnapshotReader::sha256() const { return impl_->sha256_hex; }

// ---- headers only ----

Result<SnapshotHeader> peek_snapshot_header(std::string_view prefix, const std::string& name) {
    Result<std::string_view> text = header_text(prefix, kSnapshotMagic, "snapshot", name);
    if (!text) return std::move(text).error();
    return snapshot_header_from_json(*text, name);
}

Result<SegmentHeader> peek_segment_header(std::string_view prefix, const std::string& name) {
    Result<std::string_view> text = header_text(prefix, kSegmentMagic, "segment", name);
    if (!text) return std::move(text).error();
    return segment_header_from_json(*text, name);
}

// ---- generation ids and keys ----

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
