// The restore pipeline: download threads, the side hasher, the writer
// thread, the segment loop and the end of a restore. See restore_pipeline.h.
#include "replicator/restore_pipeline.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>

#include "replicator/state_file.h"
#include "replicator/util.h"
#include "s3/log.h"

namespace bottomless::replicator::restore_detail {

std::string errno_text(int e) { return std::strerror(e); }

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

Status SpaceGuard::reserve(uint64_t end, const std::string& what) {
    if (end <= checked_) return {};
    struct statvfs vfs{};
    if (::statvfs(dir_.c_str(), &vfs) != 0) return {};  // unknown: the writes themselves will tell
    const uint64_t avail = static_cast<uint64_t>(vfs.f_bavail) * vfs.f_frsize;
    // Checked with some slack ahead, so a file growing page by page
    // costs one statvfs per kSlack bytes, not one per page.
    const uint64_t want = end + kSlack - std::min(extent_, end);
    if (want > avail)
        return make_error(ErrorKind::Io,
                          what + ": the restored file would grow to " + std::to_string(end) + " bytes, " +
                              std::to_string(end - std::min(extent_, end)) + " more than now, but the file system of " +
                              dir_ + " has only " + std::to_string(avail) +
                              " bytes free; free some space or restore to another file system (if the size is "
                              "absurd, the object is damaged or planted: run verify)",
                          "NoSpace");
    extent_ = std::max(extent_, end);
    checked_ = end + kSlack;
    return {};
}

// ---- OrderedFetcher ----

namespace {

// Collects a download into a buffer recycled from an earlier part (no
// allocation and page faults per part); stops the transfer once the restore
// is abandoned.
class BufferSink final : public s3::http::BodySink {
public:
    BufferSink(AlignedBuffer& out, const std::atomic<bool>& stop, const std::atomic<bool>* cancel)
        : out_(out), stop_(stop), cancel_(cancel) {}
    bool write(const char* data, size_t n) override {
        if (stop_.load(std::memory_order_relaxed) || (cancel_ && cancel_->load(std::memory_order_relaxed))) return false;
        out_.append(std::string_view(data, n));
        return true;
    }
    bool reset() override {
        out_.clear();
        return true;
    }

private:
    AlignedBuffer& out_;
    const std::atomic<bool>& stop_;
    const std::atomic<bool>* cancel_;
};

}  // namespace

OrderedFetcher::OrderedFetcher(s3::Client& client, std::string bucket, std::vector<FetchJob> jobs, int workers, size_t window,
                               const std::atomic<bool>* cancel)
    : client_(client), bucket_(std::move(bucket)), jobs_(std::move(jobs)), window_(std::max<size_t>(1, window)),
      cancel_(cancel) {
    const size_t n = std::min<size_t>(static_cast<size_t>(std::max(1, workers)), jobs_.size());
    for (size_t i = 0; i < n; ++i) threads_.emplace_back([this] { run(); });
}

Result<AlignedBuffer> OrderedFetcher::take(size_t i) {
    const auto t0 = Clock::now();
    std::unique_lock lock(mu_);
    if (!cancel_) {
        cv_.wait(lock, [&] { return done_.count(i) > 0 || out_of_memory_.load(); });
    } else {
        // Nobody notifies a cancel: look at it every few milliseconds.
        while (!cv_.wait_for(lock, std::chrono::milliseconds(20),
                             [&] { return done_.count(i) > 0 || cancel_->load() || out_of_memory_.load(); })) {
        }
        // A transfer the cancel stopped failed as a local write: say why.
        if (cancel_->load()) {
            wait_s_ += seconds_since(t0);
            return make_error(ErrorKind::Cancelled, "the restore was cancelled", "RestoreCancelled");
        }
    }
    if (done_.count(i) == 0) {  // out_of_memory_: this job never came
        wait_s_ += seconds_since(t0);
        return make_error(ErrorKind::Io, "out of memory while downloading (" + jobs_[i].key + ")", "OutOfMemory");
    }
    Result<AlignedBuffer> r = std::move(done_.at(i));
    done_.erase(i);
    taken_ = i + 1;
    wait_s_ += seconds_since(t0);
    lock.unlock();
    cv_.notify_all();
    return r;
}

void OrderedFetcher::recycle(AlignedBuffer&& buf) {
    buf.clear();
    std::lock_guard lock(mu_);
    if (spare_.size() < window_) spare_.push_back(std::move(buf));
}

void OrderedFetcher::stop() {
    stop_.store(true);
    cv_.notify_all();
    for (auto& t : threads_) t.join();
    threads_.clear();
}

void OrderedFetcher::run() {
    for (;;) {
        size_t i;
        AlignedBuffer body;
        {
            std::unique_lock lock(mu_);
            cv_.wait(lock, [&] { return stop_.load() || next_ >= jobs_.size() || next_ < taken_ + window_; });
            if (stop_.load() || next_ >= jobs_.size() || (cancel_ && cancel_->load())) return;
            i = next_++;
            if (!spare_.empty()) {
                body = std::move(spare_.back());
                spare_.pop_back();
            }
        }
        const FetchJob& job = jobs_[i];
        const auto t0 = Clock::now();
        try {  // nothing may escape a thread (a buffer that cannot grow: bad_alloc)
            if (job.range && job.range->length) body.reserve(*job.range->length);
            BufferSink sink(body, stop_, cancel_);
            auto got = client_.get_object_to_sink(bucket_, job.key, sink, job.range, job.max_bytes);
            Result<AlignedBuffer> r = got ? Result<AlignedBuffer>(std::move(body)) : Result<AlignedBuffer>(std::move(got).error());
            std::lock_guard lock(mu_);
            busy_s_ += seconds_since(t0);
            done_.emplace(i, std::move(r));
        } catch (...) {
            // Out of memory: the whole download stops, and take() says so
            // for a job that never came (the message is made there).
            out_of_memory_.store(true);
            stop_.store(true);
        }
        cv_.notify_all();
    }
}

// ---- AlignedBuffer ----

namespace {

// From 2 MiB on a buffer is a mapping of its own, aligned to huge pages and
// advised to use them: the advice dies with the mapping (memory from
// malloc would keep it after the free, and a host process's heap would
// turn eligible for huge pages). Smaller ones come from malloc.
char* allocate_aligned(size_t cap) {
    if (cap < kHugePage) {
        void* p = nullptr;
        if (::posix_memalign(&p, kDirectAlign, cap) != 0) throw std::bad_alloc();
        return static_cast<char*>(p);
    }
    const size_t len = cap + kHugePage;  // room to align the start
    void* m = ::mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) throw std::bad_alloc();
    const uintptr_t base = reinterpret_cast<uintptr_t>(m);
    const uintptr_t start = (base + kHugePage - 1) & ~(uintptr_t{kHugePage} - 1);
    if (start > base) ::munmap(m, start - base);
    if (base + len > start + cap) ::munmap(reinterpret_cast<void*>(start + cap), base + len - (start + cap));
    advise_huge_pages(reinterpret_cast<void*>(start), cap);
    return reinterpret_cast<char*>(start);
}

void free_aligned(char* p, size_t cap) noexcept {
    if (!p) return;
    if (cap >= kHugePage)
        ::munmap(p, cap);
    else
        std::free(p);
}

}  // namespace

AlignedBuffer& AlignedBuffer::operator=(AlignedBuffer&& o) noexcept {
    if (this != &o) {
        free_aligned(p_, cap_);
        p_ = o.p_;
        size_ = o.size_;
        cap_ = o.cap_;
        o.p_ = nullptr;
        o.size_ = o.cap_ = 0;
    }
    return *this;
}

AlignedBuffer::~AlignedBuffer() { free_aligned(p_, cap_); }

void AlignedBuffer::reserve(size_t cap) {
    if (cap <= cap_) return;
    // Whole huge pages from 2 MiB on (first touched, one fault per 2 MiB),
    // else whole 4 KiB pages.
    const size_t align = cap >= kHugePage ? kHugePage : kDirectAlign;
    if (cap > SIZE_MAX / 2) throw std::bad_alloc();
    cap = (cap + align - 1) / align * align;
    char* p = allocate_aligned(cap);
    if (size_) std::memcpy(p, p_, size_);
    free_aligned(p_, cap_);
    p_ = p;
    cap_ = cap;
}

void AlignedBuffer::append(std::string_view d) {
    if (d.empty()) return;  // (a null buffer takes no memcpy, even of 0 bytes)
    if (size_ + d.size() > cap_) reserve(std::max(size_ + d.size(), cap_ * 2));
    std::memcpy(p_ + size_, d.data(), d.size());
    size_ += d.size();
}

// ---- PageWriter ----

Status PageWriter::write(uint64_t off, std::string_view data) {
    // A batch never outgrows its buffer (one that grew would be a new,
    // cold allocation): what does not fit goes into the next.
    if (!cur_.runs.empty() && cur_.data.size() + data.size() > kBatch) {
        if (Status st = hand_over(); !st) return st;
    }
    if (!cur_.runs.empty() && cur_.runs.back().first + cur_.runs.back().second == off)
        cur_.runs.back().second += data.size();
    else
        cur_.runs.emplace_back(off, data.size());
    if (cur_.data.capacity() < kBatch) cur_.data.reserve(kBatch);
    cur_.data.append(data);
    if (cur_.data.size() >= kBatch) return hand_over();
    return {};
}

Status PageWriter::finish() {
    Status st = cur_.runs.empty() ? Status{} : hand_over();
    {
        std::lock_guard lock(mu_);
        closed_ = true;
    }
    cv_.notify_all();
    if (thread_.joinable()) thread_.join();
    if (!st) return st;
    std::lock_guard lock(mu_);
    if (error_) return *error_;
    return {};
}

Status PageWriter::hand_over() {
    const auto t0 = Clock::now();
    std::unique_lock lock(mu_);
    cv_.wait(lock, [&] { return queue_.size() < kDepth || error_; });
    wait_s_ += seconds_since(t0);
    if (error_) return *error_;
    queue_.push_back(std::move(cur_));
    cur_ = Batch{};
    if (!spare_.empty()) {
        cur_.data = std::move(spare_.back());
        spare_.pop_back();
    }
    lock.unlock();
    cv_.notify_all();
    return {};
}

void PageWriter::run() {
    for (;;) {
        Batch b;
        {
            std::unique_lock lock(mu_);
            cv_.wait(lock, [&] { return !queue_.empty() || closed_; });
            if (queue_.empty()) return;
            b = std::move(queue_.front());
            queue_.pop_front();
            if (error_) {  // the restore fails anyway: drop what is queued
                cv_.notify_all();
                continue;
            }
        }
        cv_.notify_all();
        const auto t0 = Clock::now();
        std::optional<Error> err;
        size_t pos = 0;
        for (const auto& [off, len] : b.runs) {
            const char* p = b.data.data() + pos;
            if (direct_fd_ >= 0 && (off | len | reinterpret_cast<uintptr_t>(p)) % kDirectAlign == 0) {
                if (pwrite_full(direct_fd_, p, len, off)) {
                    pos += len;
                    continue;
                }
                // EINVAL: this file system or device takes no O_DIRECT
                // write of this shape; the buffered descriptor writes
                // this run and all that follow.
                if (errno != EINVAL) {
                    err = make_error(ErrorKind::Io, "cannot write the restored database: " + errno_text(errno),
                                     "WriteFailed");
                    break;
                }
                direct_fd_ = -1;
            }
            if (!pwrite_full(fd_, p, len, off)) {
                err = make_error(ErrorKind::Io, "cannot write the restored database: " + errno_text(errno),
                                 "WriteFailed");
                break;
            }
            pos += len;
        }
        std::lock_guard lock(mu_);
        busy_s_ += seconds_since(t0);
        if (err && !error_) error_ = std::move(err);
        b.data.clear();
        // Every buffer is kept for reuse (at most kDepth + 2 exist): freeing
        // one lets the allocator hand its pages back to the kernel, and the
        // next batch would fault in cold memory again.
        spare_.push_back(std::move(b.data));
    }
}

// ---- SideHasher ----

SideHasher::~SideHasher() {
    {
        std::lock_guard lock(mu_);
        quit_ = true;
    }
    cv_.notify_all();
    thread_.join();
}

void SideHasher::start(std::string_view bytes) {
    {
        std::lock_guard lock(mu_);
        job_ = bytes;
        busy_ = true;
    }
    cv_.notify_all();
}

void SideHasher::wait() {
    std::unique_lock lock(mu_);
    cv_.wait(lock, [&] { return !busy_; });
}

void SideHasher::run() {
    std::unique_lock lock(mu_);
    for (;;) {
        cv_.wait(lock, [&] { return busy_ || quit_; });
        if (quit_) return;
        const std::string_view job = job_;
        lock.unlock();
        const auto t0 = Clock::now();
        hasher_.update(job);  // only this thread touches hasher_ until finish()
        const double dt = seconds_since(t0);
        lock.lock();
        busy_s_ += dt;
        busy_ = false;
        cv_.notify_all();
    }
}

TmpFile::~TmpFile() {
    if (fd >= 0) ::close(fd);
    if (!keep && !path.empty()) ::unlink(path.c_str());
}

// ---- the segments and the end of a restore ----

Error not_incremental(const std::string& why) {
    return make_error(ErrorKind::Precondition,
                      why + "; restore in full (--force replaces the file with a full restore, or -o another path)",
                      "NotIncremental");
}

Status apply_segments(OrderedFetcher& fetcher, PageWriter& writer, SpaceGuard& space, const std::string& db_id,
                      const SegmentPlan& plan, const RestoreOptions& options, RestoreResult& res) {
    auto& tm = res.timings;
    for (uint64_t seq = plan.first_seq; seq <= plan.last_seq; ++seq) {
        std::string key = segment_key(db_id, plan.generation, seq);
        auto body = fetcher.take(plan.first_job + (seq - plan.first_seq));
        if (!body) {
            Error e = std::move(body).error();
            if (e.kind == ErrorKind::NotFound)
                e = make_error(ErrorKind::Corrupt,
                               "segment " + key + " is missing: the history of generation " + plan.generation +
                                   " has a gap after segment " + std::to_string(seq - 1) +
                                   "; restore an earlier point in time (--utc-time) or another generation",
                               "MissingSegment");
            return e;
        }
        res.bytes_downloaded += body->size();
        // Frames go to the writer as they are decoded: memory holds the
        // object and a batch, whatever the segment decodes to. Frames
        // written before a later error do not matter: the temp file is discarded.
        SegmentHeader h;
        const bool first = seq == plan.first_seq;
        uint64_t skip_frames = 0;   // frames of transactions already in the file
        size_t first_txn = 0;       // the first transaction to apply
        uint64_t apply_frames = 0;  // frames of the transactions at or before the point in time
        size_t apply_txns = 0;
        auto on_header = [&](const SegmentHeader& sh) -> Status {
            if (sh.db_id != db_id || sh.generation != plan.generation || sh.seq != seq)
                return make_error(ErrorKind::Corrupt,
                                  key + " holds segment " + std::to_string(sh.seq) + " of " + sh.db_id + "/" +
                                      sh.generation + ": it is not the object this key should hold",
                                  "WrongObject");
            if (sh.prev_sha256 != res.last_sha256 || !(sh.start == res.position)) {
                if (first && plan.onto_copy)
                    return not_incremental("the copy's state note records a position segment " + key +
                                           " does not continue: the copy is not from this history");
                return make_error(ErrorKind::Corrupt,
                                  key + " does not continue the previous object (chain broken): the history forks or "
                                        "an object was replaced",
                                  "ChainBroken");
            }
            if (sh.page_size != res.page_size)
                return make_error(ErrorKind::Corrupt, key + " has page size " + std::to_string(sh.page_size) +
                                                          ", the snapshot " + std::to_string(res.page_size),
                                  "ChainBroken");
            if (first && plan.skip_txns) {
                if (plan.skip_txns > sh.txns.size())
                    return not_incremental("the copy's state note says it holds " + std::to_string(plan.skip_txns) +
                                           " transactions of " + key + ", which has " +
                                           std::to_string(sh.txns.size()));
                for (size_t t = 0; t < plan.skip_txns; ++t) skip_frames += sh.txns[t].frames;
                first_txn = static_cast<size_t>(plan.skip_txns);
            }
            apply_frames = skip_frames;
            apply_txns = first_txn;
            for (size_t t = first_txn; t < sh.txns.size(); ++t) {
                if (plan.until_us && sh.txns[t].commit_us > *plan.until_us) break;
                apply_frames += sh.txns[t].frames;
                ++apply_txns;
            }
            h = sh;
            return {};
        };
        auto on_frame = [&](uint64_t index, uint32_t pgno, std::string_view page) -> Status {
            // Decoded (and so validated) either way; applied only if not yet in the file and in time.
            if (index < skip_frames || index >= apply_frames) return {};
            if (plan.digests) plan.digests->touch(pgno);
            if (plan.sink) return plan.sink(pgno, page);
            const uint64_t off = static_cast<uint64_t>(pgno - 1) * res.page_size;
            if (auto st = space.reserve(off + page.size(), "segment " + key); !st) return st;
            return writer.write(off, page);
        };
        const auto t0 = Clock::now();
        const double waited = writer.wait_seconds();
        auto seg_sha = for_each_segment_frame(*body, key, options.cipher.get(), on_header, on_frame);
        tm.decode += seconds_since(t0) - (writer.wait_seconds() - waited);
        if (!seg_sha) return std::move(seg_sha).error();
        fetcher.recycle(std::move(*body));
        for (size_t t = first_txn; t < apply_txns; ++t) {
            res.db_pages = h.txns[t].db_pages;
            res.last_commit_us = h.txns[t].commit_us;
            ++res.transactions;
        }
        if (apply_txns < h.txns.size()) {  // the point in time is inside this segment
            res.next_txns = apply_txns;
            break;
        }
        res.seq = seq;
        res.next_txns = 0;
        res.position = h.end;
        res.last_sha256 = *seg_sha;
        if (options.progress) options.progress(res.bytes_downloaded, plan.total);
    }
    return {};
}

void write_restored_note(const std::string& output_path, const std::string& bucket, const std::string& db_id,
                         const RestoreResult& res) {
    // Without the note the file still opens; it only cannot be vouched
    // for (initial_replication decides), so a failure is a warning.
    if (Status w = write_restore_note(output_path, bucket, db_id, res); !w) log::warn(w.error().message);
}

Status end_transfer(OrderedFetcher& fetcher, PageWriter& writer, RestoreResult::Timings& tm) {
    fetcher.stop();  // segments past the point in time need not finish
    tm.download += fetcher.busy_seconds();  // += : an incremental restore may have fetched before (its bridge)
    tm.download_wait += fetcher.wait_seconds();
    Status st = writer.finish();
    tm.write = writer.busy_seconds();
    tm.write_wait = writer.wait_seconds();
    return st;
}

Status finish_restore(OrderedFetcher& fetcher, PageWriter& writer, TmpFile& tmp, const std::string& output_path,
                      const std::string& bucket, const std::string& db_id, const RestoreOptions& options,
                      RestoreResult& res) {
    auto& tm = res.timings;
    if (Status st = end_transfer(fetcher, writer, tm); !st) return st;

    // ---- durable and checked ----
    // The check reads the file through the page cache while the fsync
    // writes it back: they overlap, and the rename waits for both.
    if (::ftruncate(tmp.fd, static_cast<off_t>(static_cast<uint64_t>(res.db_pages) * res.page_size)) != 0)
        return make_error(ErrorKind::Io, "cannot finish " + tmp.path + ": " + errno_text(errno), "WriteFailed");
    int fsync_errno = 0;
    std::thread syncer([&] {
        const auto t0 = Clock::now();
        if (::fsync(tmp.fd) != 0) fsync_errno = errno;
        tm.fsync = seconds_since(t0);
    });
    const auto t_check = Clock::now();
    Status checked = integrity_check(tmp.path, options.integrity_check);
    tm.check = seconds_since(t_check);
    syncer.join();
    if (fsync_errno != 0)
        return make_error(ErrorKind::Io, "cannot finish " + tmp.path + ": " + errno_text(fsync_errno), "WriteFailed");
    if (!checked) return checked;
    res.checked = options.integrity_check;
    ::close(tmp.fd);
    tmp.fd = -1;
    const auto t_finish = Clock::now();

    // A WAL or shm file left next to the destination belongs to another
    // database state; SQLite would replay it onto the restored file.
    for (const std::string& p : {output_path + "-bottomless", page_digests_path(output_path), output_path + "-wal",
                                 output_path + "-shm", output_path + "-journal"}) {
        if (::unlink(p.c_str()) != 0 && errno != ENOENT)
            return make_error(ErrorKind::Io, "cannot remove stale " + p + ": " + errno_text(errno), "UnlinkFailed");
    }
    if (::rename(tmp.path.c_str(), output_path.c_str()) != 0)
        return make_error(ErrorKind::Io, "cannot rename " + tmp.path + " to " + output_path + ": " + errno_text(errno),
                          "RenameFailed");
    tmp.keep = true;
    std::string dir = output_path.substr(0, output_path.find_last_of('/') + 1);
    if (dir.empty()) dir = ".";
    if (int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC); dfd >= 0) {
        (void)::fsync(dfd);
        ::close(dfd);
    }
    write_restored_note(output_path, bucket, db_id, res);
    tm.finish = seconds_since(t_finish);
    return {};
}

}  // namespace bottomless::replicator::restore_detail

namespace bottomless::replicator {

Status write_restore_note(const std::string& output_path, const std::string& bucket, const std::string& db_id,
                          const RestoreResult& res) {
    struct stat st{};
    if (::stat(output_path.c_str(), &st) != 0)
        return make_error(ErrorKind::Io, "cannot stat " + output_path + ": " + std::strerror(errno), "OpenFailed");
    LocalState note;
    note.bucket = bucket;
    note.db_id = db_id;
    note.generation = res.generation;
    note.seq = res.seq;
    note.prev_sha256 = res.last_sha256;
    note.position = res.position;
    note.restored = true;
    note.db_size = static_cast<int64_t>(st.st_size);
    note.db_mtime_ns = static_cast<int64_t>(st.st_mtim.tv_sec) * 1'000'000'000 + st.st_mtim.tv_nsec;
    note.db_ino = static_cast<uint64_t>(st.st_ino);
    note.page_size = res.page_size;
    note.db_pages = res.db_pages;
    note.last_commit_us = res.last_commit_us;
    note.next_txns = res.next_txns;
    note.newest = res.newest;
    return write_state_file(output_path + "-bottomless", note);
}

}  // namespace bottomless::replicator
