// Private to the object format's source files (replicator/format*.cpp): the
// object layout's sizes, the header codec, the preamble, and the body
// encoder and decoders that segments and snapshots share. Not an interface;
// the format itself is in format.h and docs/FORMAT.md.
//
//   format.cpp          headers <-> JSON, field checks, preamble, peeks, untrusted JSON
//   format_body.cpp     body bytes: zstd, sealing, hashing out; records back in
//   format_segment.cpp  segments (in memory)
//   format_snapshot.cpp snapshots (streamed)
//   format_keys.cpp     generation ids and object keys
#pragma once

#include <zstd.h>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <type_traits>

#include "replicator/encryption.h"
#include "replicator/format.h"
#include "s3/crypto.h"
#include "s3/result.h"

namespace bottomless::replicator::format_detail {

constexpr size_t kMagicSize = 8;
constexpr size_t kPreambleSize = kMagicSize + 4 + 4;  // magic, version, header length
constexpr size_t kTrailerSize = 32;                   // SHA-256
// Snapshot output goes to the sink in pieces of this size: large enough for
// an S3 multipart part to be assembled cheaply, small enough to keep memory flat.
constexpr size_t kSnapshotChunk = 1u << 20;
constexpr size_t kSegmentChunk = 64u << 10;

// Codes let callers tell the cases apart without parsing messages: a peek at
// a too-short prefix ("Truncated") can fetch more, an object from a newer
// writer ("UnsupportedVersion") needs an upgrade, not a restore from elsewhere.
constexpr const char* kCodeCorrupt = "CorruptObject";
constexpr const char* kCodeTruncated = "Truncated";
constexpr const char* kCodeVersion = "UnsupportedVersion";

struct CCtxDeleter {
    void operator()(ZSTD_CCtx* c) const noexcept { ZSTD_freeCCtx(c); }
};
struct DCtxDeleter {
    void operator()(ZSTD_DCtx* d) const noexcept { ZSTD_freeDCtx(d); }
};
using CCtxPtr = std::unique_ptr<ZSTD_CCtx, CCtxDeleter>;
using DCtxPtr = std::unique_ptr<ZSTD_DCtx, DCtxDeleter>;

inline void put_be32(std::string& out, uint32_t v) {
    const char b[4] = {static_cast<char>(v >> 24), static_cast<char>(v >> 16), static_cast<char>(v >> 8),
                       static_cast<char>(v)};
    out.append(b, 4);
}

inline uint32_t get_be32(const char* p) {
    const auto* u = reinterpret_cast<const unsigned char*>(p);
    return (uint32_t{u[0]} << 24) | (uint32_t{u[1]} << 16) | (uint32_t{u[2]} << 8) | uint32_t{u[3]};
}

inline bool is_lower_hex(std::string_view s) {
    return std::all_of(s.begin(), s.end(), [](char c) { return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'); });
}

Error corrupt(const std::string& name, const std::string& what, const char* code = kCodeCorrupt);

// ---- headers (format.cpp) ----

std::string snapshot_header_json(const SnapshotHeader& h);
std::string segment_header_json(const SegmentHeader& h);

// Semantic checks shared by encoding (a caller bug) and decoding (a corrupt
// object). Return "field: why" or empty when valid.
std::string check_snapshot_header(const SnapshotHeader& h);
std::string check_segment_header(const SegmentHeader& h);

// `version`: the preamble's (2: frame_pages required, 1: refused).
Result<SnapshotHeader> snapshot_header_from_json(std::string_view text, const std::string& name, uint32_t version);
Result<SegmentHeader> segment_header_from_json(std::string_view text, const std::string& name);

// ---- preamble (format.cpp) ----

std::string preamble(const char* magic, const std::string& header_json, uint32_t version = kFormatVersion);

// Checks magic and version of the first kPreambleSize bytes; yields the
// header length (and the version: 1, or 2 for a snapshot).
Status check_preamble(std::string_view p, const char* magic, const char* kind, const std::string& name,
                      uint32_t& header_len, uint32_t* version = nullptr);

// Splits off magic/version/length and returns the header text of a prefix
// that must hold all of it.
Result<std::string_view> header_text(std::string_view bytes, const char* magic, const char* kind,
                                     const std::string& name, uint32_t* version = nullptr);

// ---- body encoding (format_body.cpp) ----

// Writes an object's bytes into fixed-size chunks handed to `emit`, hashing
// every byte on its way out for the trailer. Body bytes go through zstd (once
// start_zstd() was called), then through the sealer (once start_sealing()
// was called): compress, then encrypt.
class ObjectEncoder {
public:
    using Emit = std::function<Status(std::string_view)>;
    ObjectEncoder(size_t chunk, Emit emit);

    // Starts a zstd frame for the body; pledging the size puts it in the frame
    // header and lets zstd pick a window no bigger than the content. Body
    // bytes are compressed until end_zstd_frame(); then another frame may
    // start (a format-2 snapshot: one frame per frame_pages pages).
    void start_zstd(uint64_t pledged_size);
    Status end_zstd_frame();
    // Bytes of the object so far (emitted and buffered): the offset of the
    // next byte written raw. Meaningful only without sealing.
    uint64_t offset() const { return offset_; }

    void start_sealing(const Cipher& cipher, const EncryptionInfo& info, std::string aad);

    // Body bytes.
    Status write(std::string_view data);

    // Bytes written as they are (preamble, header).
    Status write_raw(std::string_view data);

    // Ends the zstd frame (if any) and the sealed stream (if any), flushes
    // everything, and returns the raw SHA-256 of all bytes emitted.
    Result<std::string> end();

private:
    Status write_body(std::string_view data);
    Status flush();

    s3::Hasher hasher_;
    CCtxPtr cctx_;
    bool in_frame_ = false;             // between start_zstd() and end_zstd_frame()
    uint64_t offset_ = 0;               // bytes through write_raw()
    std::string zbuf_;                  // zstd output, before sealing
    std::optional<ChunkSealer> sealer_;
    std::string buf_;  // fixed size: the chunk handed to emit
    size_t fill_ = 0;
    Emit emit_;
};

// ---- body decoding (format_body.cpp) ----

// Turns a body (raw or zstd), fed in arbitrary pieces, into records of a
// fixed size. Partial records are buffered; nothing is held beyond one record.
class RecordDecoder {
public:
    using OnRecord = std::function<Status(std::string_view)>;
    // multi_frame: the body is several zstd frames (and skippable frames,
    // which zstd passes over), not one followed by nothing.
    RecordDecoder(Compression c, size_t record_size, const std::string& name, const char* kind,
                  bool multi_frame = false);

    Status feed(std::string_view data, const OnRecord& on_record);

    // Whether the zstd frame is complete (always true for an uncompressed
    // body). A body ends cleanly when this holds and no partial record is left.
    bool frame_ended() const { return !dctx_ || ended_; }
    size_t partial_bytes() const { return fill_; }

private:
    Status emit_if_full(const OnRecord& on_record);

    DCtxPtr dctx_;
    std::string record_;
    size_t fill_ = 0;
    bool pending_ = false;  // the output filled up: zstd may hold more decoded bytes
    bool ended_ = false;    // the last frame seen ended (no byte of another since)
    bool multi_frame_;
    const std::string& name_;
    const char* kind_;
};

// A body as stored: sealed chunks (encrypted objects) around zstd or raw
// records. Plaintext reaches the record decoder only once authenticated.
class BodyDecoder {
public:
    using OnRecord = RecordDecoder::OnRecord;
    BodyDecoder(Compression c, size_t record_size, const std::string& name, const char* kind, const Cipher* cipher,
                const std::optional<EncryptionInfo>& info, std::string aad, bool multi_frame = false);

    Status feed(std::string_view data, const OnRecord& on_record);
    // The body is complete: the chunk held back is the last one.
    Status end(const OnRecord& on_record);
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

}  // namespace bottomless::replicator::format_detail
