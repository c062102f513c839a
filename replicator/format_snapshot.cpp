// Snapshots in the bucket, streamed in both directions so memory stays flat
// whatever the database size: SnapshotWriter turns pages into object bytes
// handed to a sink, SnapshotReader turns object bytes fed in any pieces back
// into pages, and only finish() says whether they can be trusted. Layout in
// format.h; the header codec and the body encoder/decoders in format_internal.h.
#include <algorithm>
#include <cstring>
#include <optional>

#include "replicator/format_internal.h"

namespace bottomless::replicator {

using namespace format_detail;

namespace {

void put_le32(std::string& out, uint32_t v) {
    const char b[4] = {static_cast<char>(v), static_cast<char>(v >> 8), static_cast<char>(v >> 16),
                       static_cast<char>(v >> 24)};
    out.append(b, 4);
}

uint32_t get_le32(const char* p) {
    const auto* u = reinterpret_cast<const unsigned char*>(p);
    return uint32_t{u[0]} | (uint32_t{u[1]} << 8) | (uint32_t{u[2]} << 16) | (uint32_t{u[3]} << 24);
}

void put_be64(std::string& out, uint64_t v) {
    put_be32(out, static_cast<uint32_t>(v >> 32));
    put_be32(out, static_cast<uint32_t>(v));
}

// The footer: offset of the index's frame (u64) and the SHA-256 of its payload.
constexpr size_t kFooterPayload = 8 + 32;
constexpr size_t kSkippableHeader = 8;  // magic and size, little-endian

}  // namespace

// ---- the page index ----

std::string page_hash(std::string_view page) {
    const s3::Sha256Digest d = s3::sha256(page);
    return std::string(reinterpret_cast<const char*>(d.data()), kPageHashSize);
}

uint32_t snapshot_frames(const SnapshotHeader& h) {
    if (!h.frame_pages) return 0;
    return static_cast<uint32_t>((uint64_t{h.db_pages} + h.frame_pages - 1) / h.frame_pages);
}

uint64_t page_index_bytes(const SnapshotHeader& h) {
    return uint64_t{snapshot_frames(h)} * 4 + uint64_t{h.db_pages} * kPageHashSize;
}

uint64_t page_index_tail_size(const SnapshotHeader& h) {
    return kSkippableHeader + page_index_bytes(h) + kSkippableHeader + kFooterPayload + kTrailerSize;
}

Result<PageIndex> parse_page_index(std::string_view tail, uint64_t object_size, const SnapshotHeader& h,
                                   const std::string& name) {
    if (!h.frame_pages) return corrupt(name, "a format-1 snapshot has no page index");
    const uint64_t want = page_index_tail_size(h);
    if (tail.size() != want || object_size < want + kPreambleSize)
        return corrupt(name, "the page index does not fit: " + std::to_string(tail.size()) + " bytes of tail, " +
                                 std::to_string(want) + " expected, object of " + std::to_string(object_size));
    const uint64_t payload = page_index_bytes(h);
    const uint64_t index_at = object_size - want;
    const char* p = tail.data();
    if (get_le32(p) != kPageIndexMagic || get_le32(p + 4) != payload)
        return corrupt(name, "the page index frame is not where the header puts it (wrong magic or size)");
    const std::string_view body = tail.substr(kSkippableHeader, payload);
    const char* f = p + kSkippableHeader + payload;
    if (get_le32(f) != kIndexFooterMagic || get_le32(f + 4) != kFooterPayload)
        return corrupt(name, "the page index footer is missing (wrong magic or size)");
    const uint64_t at = (uint64_t{get_be32(f + 8)} << 32) | get_be32(f + 12);
    if (at != index_at) return corrupt(name, "the page index footer names offset " + std::to_string(at) +
                                                 ", the index is at " + std::to_string(index_at));
    const s3::Sha256Digest d = s3::sha256(body);
    if (std::memcmp(d.data(), f + 16, 32) != 0)
        return corrupt(name, "the page index does not match its footer's SHA-256 (corrupt)");
    PageIndex idx;
    idx.page_size = h.page_size;
    idx.db_pages = h.db_pages;
    idx.frame_pages = h.frame_pages;
    const uint32_t frames = snapshot_frames(h);
    uint64_t total = 0;
    std::vector<uint64_t> sizes(frames);
    for (uint32_t i = 0; i < frames; ++i) {
        sizes[i] = get_be32(body.data() + uint64_t{i} * 4);
        // No frame larger than zstd's bound for its pages: a GET of one is bounded (16 MiB at most).
        const uint64_t pages = std::min<uint64_t>(h.frame_pages, uint64_t{h.db_pages} - uint64_t{i} * h.frame_pages);
        if (sizes[i] == 0 || sizes[i] > ZSTD_compressBound(static_cast<size_t>(pages * h.page_size)))
            return corrupt(name, "the page index gives frame " + std::to_string(i) + " " + std::to_string(sizes[i]) +
                                     " bytes, impossible for its " + std::to_string(pages) + " pages");
        total += sizes[i];
    }
    if (total + kPreambleSize > index_at)
        return corrupt(name, "the page index's frames add up to more bytes than the body holds");
    idx.frame_offset.resize(frames + 1);
    uint64_t off = index_at - total;  // the body starts right after the header
    for (uint32_t i = 0; i < frames; ++i) {
        idx.frame_offset[i] = off;
        off += sizes[i];
    }
    idx.frame_offset[frames] = off;
    idx.hashes.assign(body.substr(uint64_t{frames} * 4));
    idx.trailer_hex = s3::to_hex(reinterpret_cast<const unsigned char*>(tail.data() + want - kTrailerSize), kTrailerSize);
    return idx;
}

Status decode_snapshot_frame(const PageIndex& idx, uint32_t frame, std::string_view bytes, const std::string& name,
                             const SnapshotPageFn& on_page) {
    const std::string what = name + " frame " + std::to_string(frame);
    if (frame >= idx.frames()) return corrupt(name, "no frame " + std::to_string(frame));
    if (bytes.size() != idx.frame_offset[frame + 1] - idx.frame_offset[frame])
        return corrupt(what, "is " + std::to_string(bytes.size()) + " bytes, the index says " +
                                 std::to_string(idx.frame_offset[frame + 1] - idx.frame_offset[frame]));
    const uint32_t first = frame * idx.frame_pages + 1;
    const uint32_t count = std::min(idx.frame_pages, idx.db_pages - first + 1);
    const uint64_t want = uint64_t{count} * idx.page_size;
    // One frame, whole, exactly the pages the index puts in it.
    const size_t csize = ZSTD_findFrameCompressedSize(bytes.data(), bytes.size());
    if (ZSTD_isError(csize) || csize != bytes.size())
        return corrupt(what, "is not one whole zstd frame");
    const unsigned long long content = ZSTD_getFrameContentSize(bytes.data(), bytes.size());
    if (content == ZSTD_CONTENTSIZE_UNKNOWN || content == ZSTD_CONTENTSIZE_ERROR)
        return corrupt(what, "does not declare the size of its pages");
    if (content != want)
        return corrupt(what, "declares " + std::to_string(content) + " bytes of pages, not " + std::to_string(want));
    thread_local DCtxPtr dctx;
    if (!dctx) {
        dctx.reset(ZSTD_createDCtx());
        if (!dctx) throw std::bad_alloc();
    }
    thread_local std::string out;
    out.resize(want);
    const size_t n = ZSTD_decompressDCtx(dctx.get(), out.data(), out.size(), bytes.data(), bytes.size());
    if (ZSTD_isError(n) || n != want)
        return corrupt(what, std::string("does not decompress to its pages") +
                                 (ZSTD_isError(n) ? std::string(" (zstd: ") + ZSTD_getErrorName(n) + ")" : ""));
    for (uint32_t i = 0; i < count; ++i) {
        const std::string_view page(out.data() + uint64_t{i} * idx.page_size, idx.page_size);
        if (page_hash(page) != idx.hash(first + i))
            return corrupt(what, "page " + std::to_string(first + i) + " does not match its digest in the page index");
        if (Status st = on_page(first + i, page); !st) return st;
    }
    return {};
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
    // Format 2: the frames' compressed sizes, then every page's digest.
    std::string index;
    uint64_t frame_start = 0;
    bool finished = false;
    std::optional<Error> failed;  // sticky: once the stream broke, every later call reports it
};

SnapshotWriter::SnapshotWriter(const SnapshotHeader& plain_header, Sink sink, const Cipher* cipher)
    : impl_(std::make_unique<Impl>(plain_header, std::move(sink))) {
    SnapshotHeader& header = impl_->header;
    prepare_encrypted(header, cipher);
    // A page index for every plaintext zstd snapshot whose index is not too
    // large to hold while the snapshot streams.
    header.frame_pages = 0;
    if (!cipher && header.compression == Compression::Zstd && header.page_size) {
        SnapshotHeader indexed = header;
        indexed.frame_pages = std::max<uint32_t>(1, kSnapshotFrameBytes / header.page_size);
        if (page_index_bytes(indexed) <= kMaxPageIndexBytes) header.frame_pages = indexed.frame_pages;
    }
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
    const uint32_t version = header.frame_pages ? kIndexedSnapshotVersion : kFormatVersion;
    if (Status st = impl_->enc.write_raw(preamble(kSnapshotMagic, header_json, version)); !st) {
        impl_->failed = std::move(st).error();
        return;
    }
    if (cipher) impl_->enc.start_sealing(*cipher, *header.encryption, object_aad(kSnapshotMagic, header_json));
    if (header.frame_pages) {
        impl_->index.reserve(static_cast<size_t>(page_index_bytes(header)));
        impl_->index.resize(uint64_t{snapshot_frames(header)} * 4);
    } else if (header.compression == Compression::Zstd) {
        impl_->enc.start_zstd(static_cast<uint64_t>(header.db_pages) * header.page_size);
    }
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
    const uint32_t fp = w.header.frame_pages;
    if (fp && w.pages % fp == 0) {  // a frame starts
        const uint32_t n = std::min(fp, w.header.db_pages - w.pages);
        w.frame_start = w.enc.offset();
        w.enc.start_zstd(uint64_t{n} * w.header.page_size);
    }
    if (Status st = w.enc.write(page); !st) return w.fail(std::move(st).error());
    ++w.pages;
    if (fp) {
        w.index += page_hash(page);
        if (w.pages % fp == 0 || w.pages == w.header.db_pages) {  // the frame ends
            if (Status st = w.enc.end_zstd_frame(); !st) return w.fail(std::move(st).error());
            const uint64_t size = w.enc.offset() - w.frame_start;
            if (size > UINT32_MAX) return w.fail(make_error(ErrorKind::InvalidArgument, "snapshot frame too large"));
            std::string be;
            put_be32(be, static_cast<uint32_t>(size));
            std::memcpy(w.index.data() + uint64_t{(w.pages - 1) / fp} * 4, be.data(), 4);
        }
    }
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
    if (w.header.frame_pages) {
        // The index, then the footer that finds it, as skippable frames.
        std::string frame;
        put_le32(frame, kPageIndexMagic);
        put_le32(frame, static_cast<uint32_t>(w.index.size()));
        const uint64_t at = w.enc.offset();
        Status st = w.enc.write_raw(frame);
        if (st) st = w.enc.write_raw(w.index);
        const s3::Sha256Digest d = s3::sha256(w.index);
        std::string().swap(w.index);
        frame.clear();
        put_le32(frame, kIndexFooterMagic);
        put_le32(frame, static_cast<uint32_t>(kFooterPayload));
        put_be64(frame, at);
        frame.append(reinterpret_cast<const char*>(d.data()), d.size());
        if (st) st = w.enc.write_raw(frame);
        if (!st) return w.fail(std::move(st).error());
    }
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
                if (Status st = check_preamble(head, kSnapshotMagic, "snapshot", name, header_len, &version); !st)
                    return st;
                head.clear();
                phase = Phase::Header;
            }
            if (phase == Phase::Header) {
                size_t n = std::min<size_t>(data.size(), header_len - head.size());
                head.append(data.substr(0, n));
                data.remove_prefix(n);
                if (head.size() < header_len) return {};
                Result<SnapshotHeader> h = snapshot_header_from_json(head, name, version);
                if (!h) return std::move(h).error();
                // The key is checked before a single page comes out.
                if (Status st = check_cipher(h->encryption, cipher, name); !st) return st;
                header = std::move(*h);
                body.emplace(header->compression, header->page_size, name, "snapshot", cipher, header->encryption,
                             header->encryption ? object_aad(kSnapshotMagic, head) : std::string(),
                             /*multi_frame=*/header->frame_pages != 0);
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
    uint32_t version = 0;
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

}  // namespace bottomless::replicator
