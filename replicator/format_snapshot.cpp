// Snapshots in the bucket, streamed in both directions so memory stays flat
// whatever the database size: SnapshotWriter turns pages into object bytes
// handed to a sink, SnapshotReader turns object bytes fed in any pieces back
// into pages, and only finish() says whether they can be trusted. Layout in
// format.h; the header codec and the body encoder/decoders in format_internal.h.
#include <algorithm>
#include <optional>

#include "replicator/format_internal.h"

namespace bottomless::replicator {

using namespace format_detail;

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

}  // namespace bottomless::replicator
