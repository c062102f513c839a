// Objects too large for one request (see client.h): the multipart upload
// calls (create, upload part, complete with its lost-answer recovery, abort),
// ObjectWriter for a stream of unknown size, a file uploaded in parallel
// parts (put_object_from_file) and downloaded by parallel ranged GETs pinned
// to one version (get_object_to_file).
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <mutex>
#include <thread>

#include "s3/client_internal.h"
#include "s3/crypto.h"
#include "s3/log.h"
#include "s3/xml.h"

namespace bottomless::s3 {

using namespace client_detail;

namespace {

struct FdCloser {
    int fd = -1;
    ~FdCloser() {
        if (fd >= 0) ::close(fd);
    }
};

std::string errno_text(int err) { return std::strerror(err); }

class FileSink final : public http::BodySink {
public:
    explicit FileSink(int fd) : fd_(fd) {}
    bool write(const char* data, size_t n) override {
        while (n > 0) {
            ssize_t w = ::write(fd_, data, n);
            if (w < 0) {
                if (errno == EINTR) continue;
                err_ = errno;
                return false;
            }
            data += w;
            n -= static_cast<size_t>(w);
            written_ += static_cast<uint64_t>(w);
        }
        return true;
    }
    bool reset() override {
        written_ = 0;
        if (::ftruncate(fd_, 0) != 0 || ::lseek(fd_, 0, SEEK_SET) != 0) {
            err_ = errno;
            return false;
        }
        return true;
    }
    int err() const { return err_; }
    uint64_t written() const { return written_; }

private:
    int fd_;
    int err_ = 0;
    uint64_t written_ = 0;
};

// Writes a ranged download at its offset in a shared file.
class PwriteSink final : public http::BodySink {
public:
    PwriteSink(int fd, uint64_t offset) : fd_(fd), base_(offset) {}
    bool write(const char* data, size_t n) override {
        while (n > 0) {
            ssize_t w = ::pwrite(fd_, data, n, static_cast<off_t>(base_ + written_));
            if (w < 0) {
                if (errno == EINTR) continue;
                err_ = errno;
                return false;
            }
            data += w;
            n -= static_cast<size_t>(w);
            written_ += static_cast<uint64_t>(w);
        }
        return true;
    }
    bool reset() override {
        written_ = 0;
        return true;
    }
    int err() const { return err_; }

private:
    int fd_;
    uint64_t base_;
    uint64_t written_ = 0;
    int err_ = 0;
};


}  // namespace

// ---- files ------------------------------------------------------------------

Result<PutResult> Client::put_object_from_file(const std::string& bucket, const std::string& key,
                                               const std::string& path, const PutOptions& options) {
    FdCloser f{::open(path.c_str(), O_RDONLY | O_CLOEXEC)};
    if (f.fd < 0) return make_error(ErrorKind::Io, "cannot open " + path + ": " + errno_text(errno), "OpenFailed");
    struct stat st{};
    if (::fstat(f.fd, &st) != 0) return make_error(ErrorKind::Io, "cannot stat " + path + ": " + errno_text(errno), "StatFailed");
    uint64_t size = static_cast<uint64_t>(st.st_size);

    if (size <= config_.multipart_threshold) {
        http::FileRangeSource src(f.fd, 0, size);
        std::string sha_hex, md5_raw;
        if (auto s = hash_source(src, sha_hex, &md5_raw); !s) return std::move(s).error();
        auto* mp = reinterpret_cast<const unsigned char*>(md5_raw.data());
        return put_single(bucket, key, src, sha_hex, base64(mp, md5_raw.size()), to_hex(mp, md5_raw.size()), options);
    }

    auto upload = create_multipart_upload(bucket, key, options);
    if (!upload) return std::move(upload).error();
    const std::string upload_id = *upload;
    const uint64_t part_size = config_.part_size;
    const int nparts = static_cast<int>((size + part_size - 1) / part_size);
    std::vector<CompletedPart> parts(static_cast<size_t>(nparts));
    std::atomic<int> next{0};
    std::mutex err_mu;  // guards first_error
    std::optional<Error> first_error;

    auto worker = [&] {
        std::string buf;
        for (;;) {
            {
                std::lock_guard lock(err_mu);
                if (first_error) return;
            }
            int i = next.fetch_add(1);
            if (i >= nparts) return;
            uint64_t off = static_cast<uint64_t>(i) * part_size;
            size_t len = static_cast<size_t>(std::min<uint64_t>(part_size, size - off));
            buf.resize(len);
            size_t got = 0;
            while (got < len) {
                ssize_t r = ::pread(f.fd, buf.data() + got, len - got, static_cast<off_t>(off + got));
                if (r < 0 && errno == EINTR) continue;
                if (r <= 0) {
                    std::lock_guard lock(err_mu);
                    if (!first_error)
                        first_error = make_error(ErrorKind::Io, "cannot read " + path + " at offset " + std::to_string(off + got) +
                                                                    (r < 0 ? ": " + errno_text(errno) : ": file shrank"),
                                                 "ReadError");
                    return;
                }
                got += static_cast<size_t>(r);
            }
            auto part = upload_part(bucket, key, upload_id, i + 1, buf);
            if (!part) {
                std::lock_guard lock(err_mu);
                if (!first_error) first_error = std::move(part).error();
                return;
            }
            parts[static_cast<size_t>(i)] = *part;
        }
    };
    int nthreads = std::min(config_.part_concurrency, nparts);
    std::vector<std::thread> threads;
    for (int t = 1; t < nthreads; ++t) threads.emplace_back(worker);
    worker();
    for (auto& t : threads) t.join();
    if (first_error) {
        (void)abort_multipart_upload(bucket, key, upload_id);
        return *first_error;
    }
    auto done = complete_multipart_upload(bucket, key, upload_id, std::move(parts), size, options);
    if (!done) {
        (void)abort_multipart_upload(bucket, key, upload_id);
        return std::move(done).error();
    }
    return done;
}

Result<ObjectInfo> Client::get_object_to_file(const std::string& bucket, const std::string& key,
                                              const std::string& path) {
    // Large objects come down as parallel ranged GETs pinned to one version
    // by If-Match, each written at its offset.
    auto head = head_object(bucket, key);
    if (!head) return std::move(head).error();
    const uint64_t size = head->size;

    std::string tmp = path + ".part";
    FdCloser f{::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644)};
    if (f.fd < 0) return make_error(ErrorKind::Io, "cannot create " + tmp + ": " + errno_text(errno), "OpenFailed");
    auto fail = [&](Error e) -> Result<ObjectInfo> {
        ::unlink(tmp.c_str());
        return e;
    };

    if (size <= config_.multipart_threshold || head->etag.empty()) {
        FileSink sink(f.fd);
        // The HEAD said how large the object is: nothing larger is written.
        auto r = get_object_to_sink(bucket, key, sink, std::nullopt, std::max<uint64_t>(size, 1));
        if (!r) {
            Error e = std::move(r).error();
            if (sink.err()) e.message += " (" + tmp + ": " + errno_text(sink.err()) + ")";
            return fail(std::move(e));
        }
    } else {
        const uint64_t chunk = config_.part_size;
        const uint64_t nchunks = (size + chunk - 1) / chunk;
        std::atomic<uint64_t> next{0};
        std::mutex err_mu;  // guards first_error
        std::optional<Error> first_error;
        auto worker = [&] {
            for (uint64_t i; (i = next.fetch_add(1)) < nchunks;) {
                {
                    std::lock_guard lock(err_mu);
                    if (first_error) return;
                }
                uint64_t off = i * chunk;
                uint64_t len = std::min(chunk, size - off);
                PwriteSink sink(f.fd, off);
                Call c;
                c.op = "GetObject";
                c.method = "GET";
                c.bucket = bucket;
                c.key = key;
                c.sink = &sink;
                c.headers.emplace_back("Range", "bytes=" + std::to_string(off) + "-" + std::to_string(off + len - 1));
                c.headers.emplace_back("If-Match", "\"" + head->etag + "\"");
                c.range = ByteRange{off, len};
                c.max_body = len;
                stats_.gets.fetch_add(1, std::memory_order_relaxed);
                auto r = execute(c);
                std::optional<Error> e;
                if (!r) e = std::move(r).error();
                else if (auto st = check_range_answer(c, *r, *c.range); !st) e = std::move(st).error();
                else if (r->body_bytes != len)
                    e = make_error(ErrorKind::Transport, "GetObject s3://" + bucket + "/" + key + ": range at " +
                                                             std::to_string(off) + " came back short", "ShortBody");
                if (e) {
                    if (e->kind == ErrorKind::Precondition)
                        e->message = "s3://" + bucket + "/" + key + " changed during the download; retry";
                    std::lock_guard lock(err_mu);
                    if (!first_error) first_error = std::move(e);
                    return;
                }
            }
        };
        int nthreads = static_cast<int>(std::min<uint64_t>(nchunks, static_cast<uint64_t>(std::max(config_.part_concurrency, 4))));
        std::vector<std::thread> threads;
        for (int t = 1; t < nthreads; ++t) threads.emplace_back(worker);
        worker();
        for (auto& t : threads) t.join();
        if (first_error) return fail(std::move(*first_error));
    }
    if (::fsync(f.fd) != 0 || ::close(f.fd) != 0) {
        int err = errno;
        f.fd = -1;
        return fail(make_error(ErrorKind::Io, "cannot write " + tmp + ": " + errno_text(err), "WriteFailed"));
    }
    f.fd = -1;
    if (::rename(tmp.c_str(), path.c_str()) != 0) {
        int err = errno;
        return fail(make_error(ErrorKind::Io, "cannot rename " + tmp + " to " + path + ": " + errno_text(err), "RenameFailed"));
    }
    return head;
}

// ---- multipart --------------------------------------------------------------

Result<std::string> Client::create_multipart_upload(const std::string& bucket, const std::string& key,
                                                    const PutOptions& options) {
    Call c;
    c.op = "CreateMultipartUpload";
    c.method = "POST";
    c.bucket = bucket;
    c.key = key;
    c.query.emplace_back("uploads", "");
    if (!options.content_type.empty()) c.headers.emplace_back("Content-Type", options.content_type);
    for (const auto& [k, v] : options.metadata) c.headers.emplace_back("x-amz-meta-" + k, v);
    stats_.puts.fetch_add(1, std::memory_order_relaxed);
    auto r = execute(c);
    if (!r) return std::move(r).error();
    return xml::parse_initiate_multipart(r->body);
}

Result<CompletedPart> Client::upload_part(const std::string& bucket, const std::string& key,
                                          const std::string& upload_id, int part_number, std::string_view data) {
    http::MemorySource src(data);
    Md5Digest m = md5(data);
    Call c;
    c.op = "UploadPart";
    c.method = "PUT";
    c.bucket = bucket;
    c.key = key;
    c.query.emplace_back("partNumber", std::to_string(part_number));
    c.query.emplace_back("uploadId", upload_id);
    c.body = &src;
    c.payload_sha256 = sha256_hex(data);
    c.headers.emplace_back("Content-MD5", base64(m));
    stats_.puts.fetch_add(1, std::memory_order_relaxed);
    auto r = execute(c);
    if (!r) return std::move(r).error();
    CompletedPart p;
    p.number = part_number;
    p.etag = xml::strip_quotes(r->header("etag"));
    if (p.etag.empty()) p.etag = to_hex(m);
    return p;
}

Result<PutResult> Client::complete_multipart_upload(const std::string& bucket, const std::string& key,
                                                    const std::string& upload_id, std::vector<CompletedPart> parts,
                                                    uint64_t expected_size, const PutOptions& options) {
    std::sort(parts.begin(), parts.end(), [](const auto& a, const auto& b) { return a.number < b.number; });
    std::string body = xml::build_complete_multipart(parts);
    http::MemorySource src(body);
    Call c;
    c.op = "CompleteMultipartUpload";
    c.method = "POST";
    c.bucket = bucket;
    c.key = key;
    c.query.emplace_back("uploadId", upload_id);
    c.body = &src;
    c.headers.emplace_back("Content-Type", "application/xml");
    if (options.if_none_match) c.headers.emplace_back("If-None-Match", "*");
    stats_.puts.fetch_add(1, std::memory_order_relaxed);
    for (int round = 0;; ++round) {
        auto r = execute(c);
        PutResult pr;
        pr.size = expected_size;
        pr.parts = static_cast<int>(parts.size());
        if (!r) {
            // A retried Complete whose first response was lost finds the upload
            // gone: the object is there if its size is what we assembled.
            if (c.attempts > 1 && r.error().code == "NoSuchUpload") {
                auto head = head_object(bucket, key);
                if (head && head->size == expected_size) {
                    pr.etag = head->etag;
                    pr.recovered = true;
                    return pr;
                }
            }
            return std::move(r).error();
        }
        auto etag = xml::parse_complete_multipart(r->body);
        if (etag) {
            pr.etag = *etag;
            return pr;
        }
        // 200 with an <Error> body: retry a bounded number of times when transient.
        if (round < 3 && is_retryable(etag.error())) continue;
        return std::move(etag).error();
    }
}

Status Client::abort_multipart_upload(const std::string& bucket, const std::string& key, const std::string& upload_id) {
    Call c;
    c.op = "AbortMultipartUpload";
    c.method = "DELETE";
    c.bucket = bucket;
    c.key = key;
    c.query.emplace_back("uploadId", upload_id);
    stats_.deletes.fetch_add(1, std::memory_order_relaxed);
    auto r = execute(c);
    if (!r && r.error().code != "NoSuchUpload") return std::move(r).error();
    return {};
}

std::unique_ptr<ObjectWriter> Client::open_writer(const std::string& bucket, const std::string& key,
                                                  const PutOptions& options) {
    return std::make_unique<ObjectWriter>(*this, bucket, key, options);
}

// ---- ObjectWriter -----------------------------------------------------------

ObjectWriter::ObjectWriter(Client& client, std::string bucket, std::string key, PutOptions options)
    : client_(client), bucket_(std::move(bucket)), key_(std::move(key)), options_(std::move(options)) {}

ObjectWriter::~ObjectWriter() {
    if (!done_) abort();
}

Status ObjectWriter::flush_part() {
    if (upload_id_.empty()) {
        auto id = client_.create_multipart_upload(bucket_, key_, options_);
        if (!id) return std::move(id).error();
        upload_id_ = *id;
    }
    auto part = client_.upload_part(bucket_, key_, upload_id_, static_cast<int>(parts_.size()) + 1, buffer_);
    if (!part) return std::move(part).error();
    parts_.push_back(*part);
    buffer_.clear();
    return {};
}

Status ObjectWriter::write(std::string_view data) {
    if (done_) return make_error(ErrorKind::InvalidArgument, "write after finish/abort", "WriterClosed");
    const size_t part_size = static_cast<size_t>(client_.config().part_size);
    total_ += data.size();
    while (!data.empty()) {
        size_t take = std::min(data.size(), part_size - buffer_.size());
        buffer_.append(data.substr(0, take));
        data.remove_prefix(take);
        if (buffer_.size() == part_size) {
            if (auto s = flush_part(); !s) {
                abort();
                return s;
            }
        }
    }
    return {};
}

Result<PutResult> ObjectWriter::finish() {
    if (done_) return make_error(ErrorKind::InvalidArgument, "finish after finish/abort", "WriterClosed");
    if (upload_id_.empty()) {
        done_ = true;
        return client_.put_object(bucket_, key_, buffer_, options_);
    }
    if (!buffer_.empty()) {
        if (auto s = flush_part(); !s) {
            abort();
            return std::move(s).error();
        }
    }
    auto r = client_.complete_multipart_upload(bucket_, key_, upload_id_, parts_, total_, options_);
    if (!r) {
        abort();
        return r;
    }
    done_ = true;
    return r;
}

void ObjectWriter::abort() {
    done_ = true;
    buffer_.clear();
    buffer_.shrink_to_fit();
    if (!upload_id_.empty()) {
        if (auto s = client_.abort_multipart_upload(bucket_, key_, upload_id_); !s)
            log::warn("cannot abort multipart upload of s3://" + bucket_ + "/" + key_ + ": " + s.error().describe() +
                      " (a bucket lifecycle rule for incomplete uploads cleans it up)");
        upload_id_.clear();
    }
}

}  // namespace bottomless::s3
