// The object format in the bucket (docs/FORMAT.md): snapshots and WAL
// segments. Every object is self-describing and self-validating:
//
//   magic (8 bytes: "BTLSSNAP" or "BTLSSEGM")
//   format version (u32 big-endian: 1, or 2 for a snapshot with a page index)
//   header length (u32 big-endian), header (JSON, UTF-8)
//   body: the payload, zstd-compressed when header.compression == "zstd"
//   trailer: SHA-256 of every byte before it (32 bytes)
//
// Snapshot payload: pages 1..db_pages of the database, page_size bytes each.
// A format-2 snapshot's body is one zstd frame per frame_pages pages, then
// its page index and the index's footer as zstd skippable frames (a stream
// decoder passes over them), so a reader can fetch any page's frame alone
// and knows each page's digest (docs/FORMAT.md "Page index").
// Segment payload: for each frame, its page number (u32 big-endian) and its
// page; the header lists the transactions (frame counts, commit times, db
// size after each), so a segment holds whole transactions only.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <nlohmann/json_fwd.hpp>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "replicator/encryption.h"
#include "replicator/page_buf.h"
#include "s3/result.h"

namespace bottomless::replicator {

constexpr uint32_t kFormatVersion = 1;
// Snapshots with a page index (plaintext zstd snapshots from this build on).
constexpr uint32_t kIndexedSnapshotVersion = 2;
constexpr char kSnapshotMagic[9] = "BTLSSNAP";
constexpr char kSegmentMagic[9] = "BTLSSEGM";

// Limits that hold on both sides: the writer never produces an object past
// them, and a reader refuses one before it costs memory, disk or time
// (docs/FORMAT.md "Limits"). Everything in the bucket is untrusted.
//
// A header is a few hundred bytes plus ~60 per transaction of a segment.
constexpr uint32_t kMaxHeaderSize = 1u << 20;
// JSON nesting: our headers are 3 deep (object, txns array, txn object).
constexpr int kMaxJsonDepth = 8;
// Transactions in one segment: keeps the header far below kMaxHeaderSize
// (~77 bytes per transaction at worst).
constexpr size_t kMaxSegmentTxns = 8192;
// Decoded body of one segment: frame_count x (4 + page_size). A transaction
// larger than this is shipped by a snapshot instead.
constexpr uint64_t kMaxSegmentBodyBytes = 1ull << 30;
// zstd window (2 MiB, what level 3 picks for large inputs): the writer pins
// it, the reader refuses frames that ask for more (ZSTD_d_windowLogMax), so
// a 10-byte frame cannot make a reader allocate 128 MiB.
constexpr int kZstdWindowLog = 21;

enum class Compression { None, Zstd };
const char* to_string(Compression c);
bool parse_compression(std::string_view s, Compression& out);

// Where a generation's history stands: the WAL epoch (salts), the last frame
// shipped in it, and the WAL's running checksum after that frame.
struct WalPosition {
    uint32_t salt1 = 0, salt2 = 0;
    uint64_t frame = 0;
    uint32_t cksum1 = 0, cksum2 = 0;
    bool operator==(const WalPosition&) const = default;
};

struct SnapshotHeader {
    std::string db_id;
    std::string generation;
    uint32_t page_size = 0;
    uint32_t db_pages = 0;
    int64_t created_us = 0;         // wall-clock time of the snapshot (µs since the Unix epoch)
    int64_t last_commit_us = 0;     // commit time of the last transaction included (0: unknown)
    WalPosition position;           // the WAL position the snapshot reflects
    std::string parent_generation;  // empty for a first generation
    uint64_t parent_seq = 0;        // last segment of the parent included
    Compression compression = Compression::Zstd;
    std::optional<EncryptionInfo> encryption;  // set by the writer when it is given a Cipher
    // Format 2: pages per zstd frame, set by the writer (0: format 1, no
    // page index: encrypted or uncompressed snapshots, or an index too large).
    uint32_t frame_pages = 0;
};

struct SegmentTxn {
    uint32_t frames = 0;      // frames of this transaction, in order, after the previous one's
    uint32_t db_pages = 0;    // database size after commit
    int64_t commit_us = 0;    // commit time (µs since the Unix epoch)
};

struct SegmentHeader {
    std::string db_id;
    std::string generation;
    uint64_t seq = 0;             // 1, 2, 3, ... within the generation
    uint32_t page_size = 0;
    WalPosition start;            // position before the first frame (after the previous segment/snapshot)
    WalPosition end;              // position after the last frame
    std::string prev_sha256;      // hex SHA-256 (trailer) of the previous segment, or of the snapshot for seq 1
    std::vector<SegmentTxn> txns;
    Compression compression = Compression::Zstd;
    std::optional<EncryptionInfo> encryption;
    uint64_t frame_count() const;
};

struct SegmentFrame {
    uint32_t pgno = 0;
    PageBuf page;  // page_size bytes
};

struct DecodedSegment {
    SegmentHeader header;
    std::vector<SegmentFrame> frames;
    std::string sha256;  // hex of the trailer
};

// Encryption (docs/ENCRYPTION.md): an encoder given a Cipher seals the body
// in authenticated chunks, fills header.encryption and replaces the WAL
// checksums in the header's positions by Cipher::mask(). A decoder needs the
// Cipher whose key id the header names (check_cipher() says which is wrong).

// Encodes a segment in memory (segments are bounded by the batch size).
// Returns the object bytes; the hex SHA-256 trailer is put in *sha256_hex.
std::string encode_segment(const SegmentHeader& header, const std::vector<SegmentFrame>& frames,
                           std::string* sha256_hex, const Cipher* cipher = nullptr);

// Decodes and validates a segment: magic, version, trailer checksum, header
// fields, frame count and sizes. `name` (the object key) goes into errors.
// Holds every frame in memory (up to kMaxSegmentBodyBytes): for small
// segments and tests; restore streams with for_each_segment_frame().
Result<DecodedSegment> decode_segment(std::string_view bytes, const std::string& name,
                                      const Cipher* cipher = nullptr);

// The same checks, streaming: the trailer is verified over `bytes` first,
// then on_header sees the header (an error from it stops everything), then
// on_frame gets each frame (0-based index, page number, page) as it is
// decompressed, one record in memory at a time. Decoding stops the moment
// the body holds more than the header declares. Frames already handed out
// are to be discarded if the result is an error. Returns the hex trailer.
using SegmentHeaderFn = std::function<Status(const SegmentHeader&)>;
using SegmentFrameFn = std::function<Status(uint64_t index, uint32_t pgno, std::string_view page)>;
Result<std::string> for_each_segment_frame(std::string_view bytes, const std::string& name, const Cipher* cipher,
                                           const SegmentHeaderFn& on_header, const SegmentFrameFn& on_frame);

// The largest object a valid segment can be (header, compressed or sealed
// body at its worst, trailer): a bound for downloading one.
uint64_t max_segment_object_size();

// Streams a snapshot out: call add_page() db_pages times, then finish().
// Output goes to `sink` in pieces (e.g. an S3 multipart writer); memory is
// constant whatever the database size.
class SnapshotWriter {
public:
    using Sink = std::function<Status(std::string_view)>;
    SnapshotWriter(const SnapshotHeader& header, Sink sink, const Cipher* cipher = nullptr);
    ~SnapshotWriter();
    SnapshotWriter(const SnapshotWriter&) = delete;
    SnapshotWriter& operator=(const SnapshotWriter&) = delete;
    Status add_page(std::string_view page);
    // Returns the hex SHA-256 trailer.
    Result<std::string> finish();
    uint64_t bytes_out() const;

private:
    struct Impl;
    std::unique_ptr<Impl> impl_;
};

// Streams a snapshot in: feed() the object's bytes in any pieces; pages come
// out through on_page in order. finish() checks the trailer and the page
// count; until it returns OK nothing read may be trusted.
class SnapshotReader {
public:
    using PageFn = std::function<Status(uint32_t pgno, std::string_view page)>;
    // Trailer::Caller: the reader does not hash; the caller checks that the
    // last 32 bytes are the SHA-256 of all before them (restore does it on
    // another thread, beside the decoding) and must not trust the result
    // until it has. finish() then checks everything else.
    enum class Trailer { Verify, Caller };
    SnapshotReader(std::string name, PageFn on_page, const Cipher* cipher = nullptr, Trailer trailer = Trailer::Verify);
    ~SnapshotReader();
    SnapshotReader(const SnapshotReader&) = delete;
    SnapshotReader& operator=(const SnapshotReader&) = delete;
    Status feed(std::string_view bytes);
    Result<SnapshotHeader> finish();
    // Available once enough bytes were fed (nullptr before).
    const SnapshotHeader* header() const;
    std::string sha256() const;  // valid after finish()

private:
    struct Impl;
    std::unique_ptr<Impl> impl_;
};

// ---- the page index of a format-2 snapshot (docs/FORMAT.md "Page index") ----
//
// Written at the end of the body: for each zstd frame its compressed size,
// for each page the first 16 bytes of its SHA-256; then a fixed footer with
// the index's object offset and SHA-256. The writer holds the index in
// memory while the snapshot streams (16 bytes a page: 4 MiB per GiB of 4 KiB
// pages), so it writes one only up to kMaxPageIndexBytes, format 1 beyond.
constexpr size_t kPageHashSize = 16;
constexpr uint32_t kSnapshotFrameBytes = 64u << 10;  // what a writer puts in one frame (docs/FORMAT.md)
constexpr uint32_t kMaxSnapshotFrameBytes = 16u << 20;  // what a reader accepts
constexpr uint64_t kMaxPageIndexBytes = 64ull << 20;
constexpr uint32_t kPageIndexMagic = 0x184D2A5B;   // zstd skippable frame magics (little-endian
constexpr uint32_t kIndexFooterMagic = 0x184D2A5C;  // on disk): a zstd stream decoder skips them

// The 16-byte digest of a page the index holds.
std::string page_hash(std::string_view page);
// Frames of a format-2 snapshot, and the size of its index payload.
uint32_t snapshot_frames(const SnapshotHeader& h);
uint64_t page_index_bytes(const SnapshotHeader& h);
// The bytes at the end of a format-2 snapshot object that hold the index,
// its footer and the trailer: one ranged GET of this many reads them all.
uint64_t page_index_tail_size(const SnapshotHeader& h);

struct PageIndex {
    uint32_t page_size = 0, db_pages = 0, frame_pages = 0;
    // Object offset of each frame, and one past the last (the index's own offset).
    std::vector<uint64_t> frame_offset;
    std::string hashes;       // kPageHashSize bytes per page, page 1 first
    std::string trailer_hex;  // the object's trailer: unverified until a chain names it
    uint32_t frames() const { return static_cast<uint32_t>(frame_offset.size() - 1); }
    uint32_t frame_of(uint32_t pgno) const { return (pgno - 1) / frame_pages; }
    std::string_view hash(uint32_t pgno) const {
        return std::string_view(hashes).substr(uint64_t{pgno - 1} * kPageHashSize, kPageHashSize);
    }
};

// Parses and checks the tail of a format-2 snapshot object of object_size
// bytes whose header is h (page_index_tail_size(h) bytes): the index's
// skippable frame, the footer (offset and SHA-256 of the index), the frame
// sizes adding up to the body. Corrupt errors name `name`.
Result<PageIndex> parse_page_index(std::string_view tail, uint64_t object_size, const SnapshotHeader& h,
                                   const std::string& name);

// Decodes frame `frame` (its compressed bytes, fetched alone) and checks
// every page against the index before handing it out: the pages are the
// snapshot's, whatever else the object holds.
using SnapshotPageFn = std::function<Status(uint32_t pgno, std::string_view page)>;
Status decode_snapshot_frame(const PageIndex& idx, uint32_t frame, std::string_view bytes, const std::string& name,
                             const SnapshotPageFn& on_page);

// Reads only the header of a snapshot or segment object from its first bytes
// (for listings: fetch a range, parse). Errors if the bytes are too short.
// Headers are never encrypted: listing needs no key.
Result<SnapshotHeader> peek_snapshot_header(std::string_view prefix, const std::string& name);
Result<SegmentHeader> peek_segment_header(std::string_view prefix, const std::string& name);

// Parses JSON from an untrusted source (bucket object, local state file):
// refuses more than max_bytes and nesting deeper than kMaxJsonDepth before
// nlohmann sees the text, so neither size nor depth can exhaust memory or
// stack. Returns a discarded value (is_discarded()) on any defect, with the
// reason in *why when given. Never throws on bad input.
nlohmann::json parse_untrusted_json(std::string_view text, size_t max_bytes, std::string* why = nullptr);

// Generation ids: 16 hex digits of (2^48 - 1 - milliseconds since the Unix
// epoch), a dash, 8 random hex digits. Newer ids sort first in S3 listings.
std::string new_generation_id(int64_t now_ms);
// The creation time encoded in a generation id; -1 if it is not one.
int64_t generation_time_ms(std::string_view id);

// Keys (docs/FORMAT.md): "<db>/<generation>/snapshot", "<db>/<generation>/seg-<seq:012>".
std::string generation_prefix(const std::string& db_id, const std::string& generation);
std::string snapshot_key(const std::string& db_id, const std::string& generation);
std::string segment_key(const std::string& db_id, const std::string& generation, uint64_t seq);
// Parses the seq out of a segment key's last component; false if not a segment key.
bool parse_segment_key(std::string_view key, uint64_t& seq);

}  // namespace bottomless::replicator
