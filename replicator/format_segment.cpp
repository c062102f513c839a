// WAL segments in the bucket: encoded in memory (a segment is batch-sized),
// decoded with the trailer checked before anything in it is believed, and
// streamed frame by frame for restore. Layout in format.h; the header codec
// and the body encoder/decoders they use in format_internal.h.
#include <zstd.h>

#include <algorithm>
#include <cstring>
#include <stdexcept>

#include "replicator/format_internal.h"

namespace bottomless::replicator {

using namespace format_detail;

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
        seg.frames.push_back(SegmentFrame{pgno, PageBuf(page)});
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

}  // namespace bottomless::replicator
