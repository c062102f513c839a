// The body of a bucket object, shared by segments and snapshots: on the way
// out, zstd then sealing then fixed-size chunks hashed for the trailer
// (ObjectEncoder); on the way in, sealed chunks opened, then zstd or raw
// bytes cut into fixed-size records (BodyDecoder, RecordDecoder). Layout in
// format.h; the helpers' declarations in format_internal.h.
#include <zstd.h>
#include <zstd_errors.h>

#include <algorithm>
#include <cstring>
#include <new>
#include <stdexcept>

#include "replicator/format_internal.h"

namespace bottomless::replicator::format_detail {

namespace {

// Level 1: on SQLite pages zstd's own benchmark (`zstd -b1`/`-b3`) measured
// 1.8-2.1x the speed of level 3 for 0.7-7 % more bytes (docs/FORMAT.md); the
// uploader shares the cores with the application's writers.
constexpr int kZstdLevel = 1;

// Zstd only fails on the encoding side for memory or a broken library; like
// the EVP wrappers in s3/crypto.cpp, that is an exception, not a Result.
void check_zstd(size_t rc, const char* what) {
    if (ZSTD_isError(rc)) throw std::runtime_error(std::string(what) + ": " + ZSTD_getErrorName(rc));
}

}  // namespace

// ---- body encoding ----

ObjectEncoder::ObjectEncoder(size_t chunk, Emit emit)
    : hasher_(s3::Hasher::Algo::Sha256), buf_(chunk, '\0'), emit_(std::move(emit)) {}

void ObjectEncoder::start_zstd(uint64_t pledged_size) {
    if (!cctx_) {
        cctx_.reset(ZSTD_createCCtx());
        if (!cctx_) throw std::bad_alloc();
        check_zstd(ZSTD_CCtx_setParameter(cctx_.get(), ZSTD_c_compressionLevel, kZstdLevel), "ZSTD_c_compressionLevel");
        // Pinned: readers refuse a larger window (kZstdWindowLog in format.h).
        check_zstd(ZSTD_CCtx_setParameter(cctx_.get(), ZSTD_c_windowLog, kZstdWindowLog), "ZSTD_c_windowLog");
        zbuf_.resize(ZSTD_CStreamOutSize());
    } else {
        // The next frame of the same object: same parameters, a fresh frame.
        check_zstd(ZSTD_CCtx_reset(cctx_.get(), ZSTD_reset_session_only), "ZSTD_CCtx_reset");
    }
    check_zstd(ZSTD_CCtx_setPledgedSrcSize(cctx_.get(), pledged_size), "ZSTD_CCtx_setPledgedSrcSize");
    in_frame_ = true;
}

Status ObjectEncoder::end_zstd_frame() {
    if (!in_frame_) return {};
    in_frame_ = false;
    ZSTD_inBuffer in{nullptr, 0, 0};
    for (;;) {
        ZSTD_outBuffer out{zbuf_.data(), zbuf_.size(), 0};
        size_t remaining = ZSTD_compressStream2(cctx_.get(), &out, &in, ZSTD_e_end);
        check_zstd(remaining, "ZSTD_compressStream2(end)");
        if (Status st = write_body(std::string_view(zbuf_.data(), out.pos)); !st) return st;
        if (remaining == 0) return {};
    }
}

void ObjectEncoder::start_sealing(const Cipher& cipher, const EncryptionInfo& info, std::string aad) {
    sealer_.emplace(cipher, info, std::move(aad));
}

Status ObjectEncoder::write(std::string_view data) {
    if (!in_frame_) return write_body(data);
    ZSTD_inBuffer in{data.data(), data.size(), 0};
    while (in.pos < in.size) {
        ZSTD_outBuffer out{zbuf_.data(), zbuf_.size(), 0};
        check_zstd(ZSTD_compressStream2(cctx_.get(), &out, &in, ZSTD_e_continue), "ZSTD_compressStream2");
        if (Status st = write_body(std::string_view(zbuf_.data(), out.pos)); !st) return st;
    }
    return {};
}

Status ObjectEncoder::write_raw(std::string_view data) {
    while (!data.empty()) {
        size_t n = std::min(data.size(), buf_.size() - fill_);
        std::memcpy(buf_.data() + fill_, data.data(), n);
        fill_ += n;
        offset_ += n;
        data.remove_prefix(n);
        if (fill_ == buf_.size())
            if (Status st = flush(); !st) return st;
    }
    return {};
}

Result<std::string> ObjectEncoder::end() {
    if (Status st = end_zstd_frame(); !st) return std::move(st).error();
    cctx_.reset();
    if (sealer_) {
        if (Status st = sealer_->finish([this](std::string_view c) { return write_raw(c); }); !st)
            return std::move(st).error();
        sealer_.reset();
    }
    if (Status st = flush(); !st) return std::move(st).error();
    return hasher_.finish();
}

Status ObjectEncoder::write_body(std::string_view data) {
    if (data.empty()) return {};
    if (!sealer_) return write_raw(data);
    return sealer_->write(data, [this](std::string_view c) { return write_raw(c); });
}

Status ObjectEncoder::flush() {
    if (fill_ == 0) return {};
    std::string_view chunk(buf_.data(), fill_);
    hasher_.update(chunk);
    fill_ = 0;
    return emit_(chunk);
}

// ---- body decoding ----

RecordDecoder::RecordDecoder(Compression c, size_t record_size, const std::string& name, const char* kind,
                             bool multi_frame)
    : record_(record_size, '\0'), multi_frame_(multi_frame), name_(name), kind_(kind) {
    if (c == Compression::Zstd) {
        dctx_.reset(ZSTD_createDCtx());
        if (!dctx_) throw std::bad_alloc();
        // The frame header names the window the decoder must allocate:
        // never more than a writer of this format uses.
        check_zstd(ZSTD_DCtx_setParameter(dctx_.get(), ZSTD_d_windowLogMax, kZstdWindowLog), "ZSTD_d_windowLogMax");
    }
}

Status RecordDecoder::feed(std::string_view data, const OnRecord& on_record) {
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
    while (!ended_ || multi_frame_) {
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
        // Several frames: at a frame's end until the next one starts.
        ended_ = r == 0;
        if (Status st = emit_if_full(on_record); !st) return st;
        if (!progressed && !ended_) break;
    }
    if (ended_ && in.pos < in.size)
        return corrupt(name_, std::string(kind_) + " body has " + std::to_string(in.size - in.pos) +
                                  " stray bytes after the end of its zstd frame");
    return {};
}

Status RecordDecoder::emit_if_full(const OnRecord& on_record) {
    if (fill_ < record_.size()) return {};
    fill_ = 0;
    return on_record(std::string_view(record_.data(), record_.size()));
}

BodyDecoder::BodyDecoder(Compression c, size_t record_size, const std::string& name, const char* kind,
                         const Cipher* cipher, const std::optional<EncryptionInfo>& info, std::string aad,
                         bool multi_frame)
    : records_(c, record_size, name, kind, multi_frame), name_(name) {
    // Callers check the key first (check_cipher); this guard keeps a
    // missed check an error instead of a null dereference.
    if (info && cipher) opener_.emplace(*cipher, *info, std::move(aad), name);
    no_key_ = info && !cipher;
}

Status BodyDecoder::feed(std::string_view data, const OnRecord& on_record) {
    if (no_key_) return make_error(ErrorKind::InvalidArgument, name_ + ": encrypted, and no key was given",
                                   "EncryptionKeyRequired");
    if (!opener_) return records_.feed(data, on_record);
    return opener_->feed(data, [&](std::string_view plain) { return records_.feed(plain, on_record); });
}

Status BodyDecoder::end(const OnRecord& on_record) {
    if (no_key_) return make_error(ErrorKind::InvalidArgument, name_ + ": encrypted, and no key was given",
                                   "EncryptionKeyRequired");
    if (!opener_) return {};
    return opener_->finish([&](std::string_view plain) { return records_.feed(plain, on_record); });
}

}  // namespace bottomless::replicator::format_detail
