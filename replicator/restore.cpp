// Restore: listing generations, rebuilding a database from a snapshot and
// its chain of segments. See restore.h.
#include "replicator/restore.h"

#include <fcntl.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <deque>
#include <map>
#include <mutex>
#include <thread>


#include "replicator/sqlite_api.h"
#include "replicator/state_file.h"
#include "replicator/util.h"
#include "replicator/wal.h"
#include "s3/crypto.h"
#include "s3/log.h"

namespace bottomless::replicator {
namespace {

std::string errno_text(int e) { return std::strerror(e); }

// Disk use of a restore. Object sizes say little about what they decode to
// (a 262 KB snapshot can declare 8 GiB of zero pages, a few KB of segment
// can decode to a GiB of distinct pages), so every extension of the restored
// file is checked against the free space of its file system first: a
// hostile or oversized bucket fails the restore with a clear error instead
// of filling the disk.
class SpaceGuard {
public:
    explicit SpaceGuard(std::string dir) : dir_(std::move(dir)) {}
    // Before the file grows to `end` bytes; `what` says which object wants it.
    Status reserve(uint64_t end, const std::string& what) {
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

private:
    static constexpr uint64_t kSlack = 8u << 20;
    std::string dir_;
    uint64_t extent_ = 0;   // the largest size reserved so far
    uint64_t checked_ = 0;  // growth up to here needs no new check
};

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

// ---- the download: ordered, parallel, bounded ----
//
// A restore needs its objects in order (the snapshot's parts, then segment
// 1, 2, ...), and the network gives its best with several GETs in flight.
// OrderedFetcher runs `workers` download threads over the list of jobs; at
// most `window` jobs are in flight or downloaded and not yet taken, so
// memory is window x the largest job, whatever the database's size. The
// decoder takes them in order with take(); a job it is waiting for is
// always among those started (jobs start in order), so it cannot starve.

// One GET: a whole object, or one range of one.
struct FetchJob {
    std::string key;
    std::optional<s3::ByteRange> range;
    uint64_t max_bytes = 0;  // what the server may send at most
};

// Collects a download into a buffer recycled from an earlier part (no
// allocation and page faults per part); stops the transfer once the restore
// is abandoned.
class BufferSink final : public s3::http::BodySink {
public:
    BufferSink(std::string& out, const std::atomic<bool>& stop) : out_(out), stop_(stop) {}
    bool write(const char* data, size_t n) override {
        if (stop_.load(std::memory_order_relaxed)) return false;
        out_.append(data, n);
        return true;
    }
    bool reset() override {
        out_.clear();
        return true;
    }

private:
    std::string& out_;
    const std::atomic<bool>& stop_;
};

class OrderedFetcher {
public:
    OrderedFetcher(s3::Client& client, std::string bucket, std::vector<FetchJob> jobs, int workers, size_t window)
        : client_(client), bucket_(std::move(bucket)), jobs_(std::move(jobs)), window_(std::max<size_t>(1, window)) {
        const size_t n = std::min<size_t>(static_cast<size_t>(std::max(1, workers)), jobs_.size());
        for (size_t i = 0; i < n; ++i) threads_.emplace_back([this] { run(); });
    }
    ~OrderedFetcher() { stop(); }
    OrderedFetcher(const OrderedFetcher&) = delete;
    OrderedFetcher& operator=(const OrderedFetcher&) = delete;

    // Job i's body (jobs are taken in order: 0, 1, 2, ...).
    Result<std::string> take(size_t i) {
        const auto t0 = Clock::now();
        std::unique_lock lock(mu_);
        cv_.wait(lock, [&] { return done_.count(i) > 0; });
        Result<std::string> r = std::move(done_.at(i));
        done_.erase(i);
        taken_ = i + 1;
        wait_s_ += seconds_since(t0);
        lock.unlock();
        cv_.notify_all();
        return r;
    }
    // Gives a taken body's buffer back for a later job.
    void recycle(std::string&& buf) {
        buf.clear();
        std::lock_guard lock(mu_);
        if (spare_.size() < window_) spare_.push_back(std::move(buf));
    }
    // Abandons what is left (in-flight transfers stop at their next bytes) and joins.
    void stop() {
        stop_.store(true);
        cv_.notify_all();
        for (auto& t : threads_) t.join();
        threads_.clear();
    }
    double busy_seconds() {
        std::lock_guard lock(mu_);
        return busy_s_;
    }
    double wait_seconds() {
        std::lock_guard lock(mu_);
        return wait_s_;
    }

private:
    void run() {
        for (;;) {
            size_t i;
            std::string body;
            {
                std::unique_lock lock(mu_);
                cv_.wait(lock, [&] { return stop_.load() || next_ >= jobs_.size() || next_ < taken_ + window_; });
                if (stop_.load() || next_ >= jobs_.size()) return;
                i = next_++;
                if (!spare_.empty()) {
                    body = std::move(spare_.back());
                    spare_.pop_back();
                }
            }
            const FetchJob& job = jobs_[i];
            if (job.range && job.range->length) body.reserve(*job.range->length);
            BufferSink sink(body, stop_);
            const auto t0 = Clock::now();
            auto got = client_.get_object_to_sink(bucket_, job.key, sink, job.range, job.max_bytes);
            Result<std::string> r = got ? Result<std::string>(std::move(body)) : Result<std::string>(std::move(got).error());
            {
                std::lock_guard lock(mu_);
                busy_s_ += seconds_since(t0);
                done_.emplace(i, std::move(r));
            }
            cv_.notify_all();
        }
    }

    s3::Client& client_;
    const std::string bucket_;
    const std::vector<FetchJob> jobs_;
    const size_t window_;
    std::atomic<bool> stop_{false};
    std::mutex mu_;               // guards everything below but threads_
    std::condition_variable cv_;  // a job finished or was taken, or stop
    size_t next_ = 0;             // the next job to start
    size_t taken_ = 0;            // jobs before this one were taken
    std::map<size_t, Result<std::string>> done_;
    std::vector<std::string> spare_;  // buffers of taken jobs, for the next ones
    double busy_s_ = 0, wait_s_ = 0;
    std::vector<std::thread> threads_;  // owned by the thread that made the fetcher
};

// ---- the writes: off the decoder's thread, in order ----
//
// The decoder hands pages over in batches of kBatch bytes (runs of adjacent
// pages coalesced into one pwrite) and goes on decoding while this thread
// copies them into the page cache. Batches are written in the order given,
// so a segment's page lands after the snapshot's page it replaces. Memory:
// kDepth batches in the queue, one being filled, one being written.
// (Starting the write-back early with sync_file_range was measured: no
// faster at 1 GiB, and it made the decoder wait on the writer; without it
// the final fsync overlaps the integrity check instead.)
class PageWriter {
public:
    explicit PageWriter(int fd) : fd_(fd), thread_([this] { run(); }) {}
    ~PageWriter() { (void)finish(); }
    PageWriter(const PageWriter&) = delete;
    PageWriter& operator=(const PageWriter&) = delete;

    // Decoder thread only.
    Status write(uint64_t off, std::string_view data) {
        if (!cur_.runs.empty() && cur_.runs.back().first + cur_.runs.back().second == off)
            cur_.runs.back().second += data.size();
        else
            cur_.runs.emplace_back(off, data.size());
        if (cur_.data.capacity() < kBatch) cur_.data.reserve(kBatch + data.size());
        cur_.data.append(data);
        if (cur_.data.size() >= kBatch) return hand_over();
        return {};
    }
    // Writes what is left and stops the thread; the first error of any write.
    Status finish() {
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
    double busy_seconds() {
        std::lock_guard lock(mu_);
        return busy_s_;
    }
    double wait_seconds() const { return wait_s_; }

private:
    static constexpr size_t kBatch = 2u << 20;
    static constexpr size_t kDepth = 4;

    struct Batch {
        std::string data;
        std::vector<std::pair<uint64_t, size_t>> runs;  // (file offset, length), laid end to end in data
    };

    Status hand_over() {
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

    void run() {
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
                if (!pwrite_full(fd_, b.data.data() + pos, len, off)) {
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
            if (spare_.size() < 2) spare_.push_back(std::move(b.data));
        }
    }

    int fd_;
    Batch cur_;                   // being filled (decoder thread only)
    double wait_s_ = 0;           // decoder thread only
    std::mutex mu_;               // guards everything below but thread_
    std::condition_variable cv_;  // the queue changed, or closed_
    std::deque<Batch> queue_;
    std::vector<std::string> spare_;  // written batches' buffers, for reuse
    bool closed_ = false;
    std::optional<Error> error_;
    double busy_s_ = 0;
    std::thread thread_;  // last: starts once the members above exist
};

// Hashes the snapshot's parts on its own thread while the decoder decodes
// them: SHA-256 (~2 GB/s here) and decoding (zstd, page copies) each keep a
// core busy, so side by side a part costs the longer of the two, not the sum.
class SideHasher {
public:
    SideHasher() : thread_([this] { run(); }) {}
    ~SideHasher() {
        {
            std::lock_guard lock(mu_);
            quit_ = true;
        }
        cv_.notify_all();
        thread_.join();
    }
    SideHasher(const SideHasher&) = delete;
    SideHasher& operator=(const SideHasher&) = delete;
    // `bytes` must stay alive until wait() returns.
    void start(std::string_view bytes) {
        {
            std::lock_guard lock(mu_);
            job_ = bytes;
            busy_ = true;
        }
        cv_.notify_all();
    }
    void wait() {
        std::unique_lock lock(mu_);
        cv_.wait(lock, [&] { return !busy_; });
    }
    // The raw digest of everything given; after wait().
    std::string finish() {
        wait();
        return hasher_.finish();
    }
    double busy_seconds() {
        std::lock_guard lock(mu_);
        return busy_s_;
    }

private:
    void run() {
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

    s3::Hasher hasher_{s3::Hasher::Algo::Sha256};
    std::mutex mu_;               // guards job_, busy_, quit_, busy_s_
    std::condition_variable cv_;  // a job was given or done, or quit_
    std::string_view job_;
    bool busy_ = false;
    bool quit_ = false;
    double busy_s_ = 0;
    std::thread thread_;  // last: starts once the members above exist
};

struct TmpFile {
    std::string path;
    int fd = -1;
    bool keep = false;
    ~TmpFile() {
        if (fd >= 0) ::close(fd);
        if (!keep && !path.empty()) ::unlink(path.c_str());
    }
};


// ---- the segments, shared by the full and the incremental restore ----

// Which segments a restore applies, and where they come from.
struct SegmentPlan {
    std::string generation;
    uint64_t first_seq = 1, last_seq = 0;  // segments first_seq..last_seq (none if first > last)
    size_t first_job = 0;                  // the fetcher's job index of first_seq
    std::optional<int64_t> until_us;       // transactions committed at or before it
    // Incremental: transactions of first_seq already in the file (the copy
    // was restored to a point in time inside it), not applied again.
    uint64_t skip_txns = 0;
    // Incremental: res holds the copy's note; a first segment that does not
    // continue it is a refusal of the copy, not a broken bucket.
    bool onto_copy = false;
    uint64_t total = 0;  // for progress
    // Where an applied page goes; unset: written at its offset in the file.
    std::function<Status(uint32_t pgno, std::string_view page)> sink;
};

Error not_incremental(const std::string& why) {
    return make_error(ErrorKind::Precondition,
                      why + "; restore in full (--force replaces the file with a full restore, or -o another path)",
                      "NotIncremental");
}

// Applies the plan's segments in order, whole transactions only, continuing
// res (position, last_sha256, db_pages); on success res names the last
// segment applied in full (seq) and next_txns those of the one after.
// The caller stops the fetcher and the writer on an error.
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

// Tell the extension where this file comes from: opened with bottomless,
// it starts a new generation whose parent is the restored one, instead
// of refusing a file it cannot vouch for (initial_replication=error).
// An incremental restore later reads it as the proof of what the file is.
void write_restored_note(const std::string& output_path, const std::string& bucket, const std::string& db_id,
                         const RestoreResult& res) {
    struct stat st{};
    if (::stat(output_path.c_str(), &st) == 0) {
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
        // Without the note the file still opens; it only cannot be vouched
        // for (initial_replication decides), so a failure is a warning.
        if (Status w = write_state_file(output_path + "-bottomless", note); !w) log::warn(w.error().message);
    }
}

// The transfer is over (or no longer needed): the fetcher stops, the
// writer's last pages land; both record where their time went.
Status end_transfer(OrderedFetcher& fetcher, PageWriter& writer, RestoreResult::Timings& tm) {
    fetcher.stop();  // segments past the point in time need not finish
    tm.download = fetcher.busy_seconds();
    tm.download_wait = fetcher.wait_seconds();
    Status st = writer.finish();
    tm.write = writer.busy_seconds();
    tm.write_wait = writer.wait_seconds();
    return st;
}

// The end of every restore: the pages are in tmp; truncates to the last
// transaction's size, fsyncs (beside the chosen check), removes the stale
// files next to the destination (its state note first: a crash from here
// on leaves no note vouching for a file that is not the one it describes),
// renames into place and writes the new note.
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
    for (const char* suffix : {"-bottomless", "-wal", "-shm", "-journal"}) {
        std::string p = output_path + suffix;
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

}  // namespace

std::string sqlite_file_uri(const std::string& path) {
    // RFC 3986 as SQLite reads it: '?' would start the query, '#' a fragment
    // and '%' an escape, so a path holding them would name another file.
    // An absolute path gets an empty authority ("file://" + "/a"): "file:" +
    // "//host/x" would make "host" the authority.
    std::string uri = path.starts_with('/') ? "file://" : "file:";
    for (unsigned char c : path) {
        if (c == '?' || c == '#' || c == '%' || c < 0x20 || c == 0x7f) {
            char buf[4];
            std::snprintf(buf, sizeof buf, "%%%02X", c);
            uri += buf;
        } else {
            uri += static_cast<char>(c);
        }
    }
    return uri;
}

const char* to_string(IntegrityCheck c) {
    switch (c) {
    case IntegrityCheck::Full: return "full";
    case IntegrityCheck::Quick: return "quick";
    case IntegrityCheck::None: return "none";
    }
    return "unknown";
}

bool parse_integrity_check(std::string_view s, IntegrityCheck& out) {
    for (IntegrityCheck c : {IntegrityCheck::Full, IntegrityCheck::Quick, IntegrityCheck::None})
        if (s == to_string(c)) {
            out = c;
            return true;
        }
    return false;
}

Status integrity_check(const std::string& path, IntegrityCheck mode) {
    if (mode == IntegrityCheck::None) return {};
    const char* pragma = mode == IntegrityCheck::Quick ? "quick_check" : "integrity_check";
    sqlite3* db = nullptr;
    // immutable=1: no locks, no WAL or shm files; the file is ours alone here.
    std::string uri = sqlite_file_uri(path) + "?immutable=1";
    int rc = sqlite3_open_v2(uri.c_str(), &db, SQLITE_OPEN_READONLY | SQLITE_OPEN_URI, "unix");
    auto close = [&] { sqlite3_close(db); };
    if (rc != SQLITE_OK) {
        std::string msg = db ? sqlite3_errmsg(db) : "out of memory";
        close();
        return make_error(ErrorKind::Corrupt, "cannot open the restored database: " + msg, "OpenFailed");
    }
    sqlite3_stmt* stmt = nullptr;
    rc = sqlite3_prepare_v2(db, (std::string("PRAGMA ") + pragma).c_str(), -1, &stmt, nullptr);
    std::string result;
    while (rc == SQLITE_OK && sqlite3_step(stmt) == SQLITE_ROW) {
        const unsigned char* t = sqlite3_column_text(stmt, 0);
        if (!result.empty()) result += "; ";
        result += t ? reinterpret_cast<const char*>(t) : "";
        if (result.size() > 2000) break;
    }
    std::string err = rc == SQLITE_OK ? "" : sqlite3_errmsg(db);
    sqlite3_finalize(stmt);
    close();
    if (!err.empty())
        return make_error(ErrorKind::Corrupt, std::string(pragma) + " could not run: " + err, "IntegrityCheck");
    if (result != "ok")
        return make_error(ErrorKind::Corrupt,
                          std::string("PRAGMA ") + pragma + " failed on the restored database: " + result,
                          "IntegrityCheck");
    return {};
}

Result<RestoreResult> restore_database(s3::Client& client, const std::string& bucket, const std::string& db_id,
                                       const std::string& output_path, const RestoreOptions& options) {
    const auto t0 = std::chrono::steady_clock::now();
    auto history = load_history(client, bucket, db_id);
    if (!history) return std::move(history).error();
    auto target = choose_restore_target(client, bucket, db_id, *history, options.generation, options.until_us);
    if (!target) return std::move(target).error();
    auto res = options.incremental
                   ? restore_incremental(client, bucket, db_id, *history, *target, output_path, options)
                   : restore_target(client, bucket, db_id, *target, output_path, options);
    if (res) res->seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    return res;
}

Result<RestoreResult> restore_target(s3::Client& client, const std::string& bucket, const std::string& db_id,
                                     const RestoreTarget& chosen, const std::string& output_path,
                                     const RestoreOptions& options) {
    const auto t0 = std::chrono::steady_clock::now();
    RestoreResult res;
    const std::optional<int64_t> until_us = chosen.until_us;

    res.generation = chosen.generation;

    // ---- the snapshot ----
    // The key is checked on the snapshot's header before anything is
    // created at the destination: a wrong or missing key is not a corrupt object.
    std::string snap_key = snapshot_key(db_id, chosen.generation);
    std::string out_dir = output_path.substr(0, output_path.find_last_of('/') + 1);
    if (out_dir.empty()) out_dir = ".";
    SpaceGuard space(out_dir);
    uint32_t snap_pages = 0;
    {
        // Read while the target was chosen: not read again.
        const SnapshotHeader* header = &chosen.snapshot;
        if (auto st = check_cipher(header->encryption, options.cipher.get(), snap_key); !st) return std::move(st).error();
        // The declared size against the free space, before a byte is written.
        snap_pages = header->db_pages;
        if (auto st = space.reserve(uint64_t{header->db_pages} * header->page_size,
                                    "snapshot " + snap_key + " declares " + std::to_string(header->db_pages) +
                                        " pages of " + std::to_string(header->page_size) + " bytes");
            !st)
            return std::move(st).error();
    }
    TmpFile tmp;
    tmp.path = output_path + ".restore-tmp";
    // A leftover temp file (an interrupted restore) is replaced, never
    // followed: O_EXCL|O_NOFOLLOW refuse a symlink planted at that name,
    // which would otherwise make the restore write through it.
    if (::unlink(tmp.path.c_str()) != 0 && errno != ENOENT)
        return make_error(ErrorKind::Io, "cannot remove the stale " + tmp.path + ": " + errno_text(errno), "OpenFailed");
    tmp.fd = ::open(tmp.path.c_str(), O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0644);
    if (tmp.fd < 0) return make_error(ErrorKind::Io, "cannot create " + tmp.path + ": " + errno_text(errno), "OpenFailed");
    const uint64_t total = chosen.snapshot_bytes + chosen.segment_bytes;
    auto& tm = res.timings;

    // Every GET the restore makes, in the order it applies them: the
    // snapshot (in 8 MiB ranged parts when large, so several come down at
    // once and memory stays bounded), then segments 1..last_seq.
    constexpr uint64_t kPart = 8ull << 20;
    std::vector<FetchJob> jobs;
    if (chosen.snapshot_bytes <= 2 * kPart) {
        // No more than the listing said the object holds.
        jobs.push_back({snap_key, std::nullopt, std::max<uint64_t>(chosen.snapshot_bytes, 1)});
    } else {
        for (uint64_t off = 0; off < chosen.snapshot_bytes; off += kPart) {
            const uint64_t len = std::min(kPart, chosen.snapshot_bytes - off);
            jobs.push_back({snap_key, s3::ByteRange{off, len}, len});
        }
    }
    const size_t snapshot_jobs = jobs.size();
    const uint64_t last_seq = chosen.last_seq;
    // Capped at the largest object a valid segment can be (format.h), not
    // at the client's default, which a legitimate 1 GiB segment may exceed.
    for (uint64_t seq = 1; seq <= last_seq; ++seq)
        jobs.push_back({segment_key(db_id, chosen.generation, seq), std::nullopt, max_segment_object_size()});
    const int workers = std::max(1, options.parallel);
    // Two parts beyond one per worker: a worker that finishes while the
    // decoder is busy starts the next GET instead of idling.
    OrderedFetcher fetcher(client, bucket, std::move(jobs), workers, static_cast<size_t>(workers) + 2);
    PageWriter writer(tmp.fd);
    // Stops the downloads and the writer before the temp file goes, on every path.
    auto stop_all = [&] {
        fetcher.stop();
        (void)writer.finish();
    };

    // ---- the snapshot, decoded in order as its parts arrive ----
    {
        // In parts, the trailer is checked here, hashed beside the decoding
        // (SideHasher): the object is exactly snapshot_bytes long (every
        // part's length is checked), its last 32 bytes are the trailer.
        const bool side_hash = snapshot_jobs > 1;
        std::optional<SideHasher> hasher;
        if (side_hash) hasher.emplace();
        const uint64_t content_end = chosen.snapshot_bytes - std::min<uint64_t>(32, chosen.snapshot_bytes);
        std::string trailer;
        // Pages past what the header declared when the free space was
        // checked stop it, even if the object changed since.
        SnapshotReader reader(
            snap_key,
            [&](uint32_t pgno, std::string_view page) -> Status {
                if (pgno > snap_pages)
                    return make_error(ErrorKind::Corrupt,
                                      snap_key + ": holds more than the " + std::to_string(snap_pages) +
                                          " pages its header declared (the object changed during the restore?)",
                                      "WrongObject");
                return writer.write(static_cast<uint64_t>(pgno - 1) * page.size(), page);
            },
            options.cipher.get(), side_hash ? SnapshotReader::Trailer::Caller : SnapshotReader::Trailer::Verify);
        auto snapshot_error = [&](Error e) -> Error {
            stop_all();
            if (e.kind == ErrorKind::NotFound)
                e = make_error(ErrorKind::Corrupt, "snapshot " + snap_key + " disappeared during the restore",
                               "MissingSnapshot");
            return e;
        };
        uint64_t fed = 0;
        for (size_t i = 0; i < snapshot_jobs; ++i) {
            auto part = fetcher.take(i);
            if (!part) return snapshot_error(std::move(part).error());
            if (snapshot_jobs > 1 && part->size() != std::min(kPart, chosen.snapshot_bytes - i * kPart))
                return snapshot_error(make_error(ErrorKind::Corrupt,
                                                 "snapshot " + snap_key + " changed size during the restore",
                                                 "WrongObject"));
            std::string_view bytes = *part;
            if (side_hash) {
                const uint64_t off = i * kPart;
                hasher->start(bytes.substr(0, off < content_end ? std::min<uint64_t>(bytes.size(), content_end - off) : 0));
                if (off + bytes.size() > content_end) trailer.append(bytes.substr(std::max(off, content_end) - off));
            }
            const auto t0 = Clock::now();
            const double waited = writer.wait_seconds();
            Status st = reader.feed(bytes);
            tm.decode += seconds_since(t0) - (writer.wait_seconds() - waited);
            if (side_hash) hasher->wait();  // before `part` is reused or freed
            if (!st) return snapshot_error(std::move(st).error());
            fed += part->size();
            fetcher.recycle(std::move(*part));
            if (options.progress) options.progress(fed, total);
        }
        if (side_hash) {
            tm.hash = hasher->busy_seconds();
            if (hasher->finish() != trailer)
                return snapshot_error(make_error(ErrorKind::Corrupt,
                                                 snap_key + ": checksum mismatch: the trailer is not the SHA-256 of "
                                                            "the content (corrupt or truncated)",
                                                 "CorruptObject"));
        }
        const auto t0 = Clock::now();
        auto snap = reader.finish();
        tm.decode += seconds_since(t0);
        if (!snap) return snapshot_error(std::move(snap).error());
        if (snap->db_id != db_id || snap->generation != chosen.generation)
            return snapshot_error(make_error(
                ErrorKind::Corrupt, snap_key + " belongs to " + snap->db_id + "/" + snap->generation + ", not to this key",
                "WrongObject"));
        res.bytes_downloaded += fed;
        res.page_size = snap->page_size;
        res.db_pages = snap->db_pages;
        res.position = snap->position;
        res.last_commit_us = snap->last_commit_us;
        res.last_sha256 = reader.sha256();
        // The target was chosen on the header read before (its state at or
        // before until_us, its size checked against the free space): the
        // object streamed must be the one weighed, not one put there since.
        if (!(snap->position == chosen.snapshot.position) || snap->last_commit_us != chosen.snapshot.last_commit_us ||
            snap->created_us != chosen.snapshot.created_us || snap->db_pages != chosen.snapshot.db_pages)
            return snapshot_error(make_error(ErrorKind::Corrupt,
                                             "snapshot " + snap_key +
                                                 " changed while it was being restored (is someone writing this "
                                                 "generation?); run the restore again",
                                             "WrongObject"));
    }

    // ---- the segments, applied in order ----
    SegmentPlan plan;
    plan.generation = chosen.generation;
    plan.first_seq = 1;
    plan.last_seq = last_seq;
    plan.first_job = snapshot_jobs;
    plan.until_us = until_us;
    plan.total = total;
    if (auto st = apply_segments(fetcher, writer, space, db_id, plan, options, res); !st) {
        stop_all();
        return std::move(st).error();
    }
    if (auto st = finish_restore(fetcher, writer, tmp, output_path, bucket, db_id, options, res); !st)
        return std::move(st).error();
    res.seconds = seconds_since(t0);
    return res;
}


// ---- incremental restore ----

namespace {

#ifndef FICLONE
#define FICLONE _IOW(0x94, 9, int)  // linux/fs.h, not included: it clashes with glibc's headers
#endif

// Duplicates the open file src (size bytes) into the empty dst: a
// copy-on-write clone where the file system offers one (btrfs, XFS with
// reflink, bcachefs: no data is copied), else copy_file_range (in the
// kernel, no trip through user space), else read and write. True if cloned.
Result<bool> duplicate_file(int src, int dst, uint64_t size, const std::string& dst_path) {
    if (::ioctl(dst, FICLONE, src) == 0) return true;
    uint64_t done = 0;
    bool in_kernel = true;
    std::string buf;
    while (done < size) {
        ssize_t n = -1;
        if (in_kernel) {
            loff_t in_off = static_cast<loff_t>(done), out_off = static_cast<loff_t>(done);
            n = ::copy_file_range(src, &in_off, dst, &out_off, static_cast<size_t>(std::min<uint64_t>(size - done, 1u << 30)), 0);
            if (n < 0 && (errno == EXDEV || errno == ENOSYS || errno == EINVAL || errno == EOPNOTSUPP)) {
                in_kernel = false;
                continue;
            }
        } else {
            if (buf.empty()) buf.resize(1u << 20);
            n = ::pread(src, buf.data(), static_cast<size_t>(std::min<uint64_t>(size - done, buf.size())),
                        static_cast<off_t>(done));
            if (n > 0 && !pwrite_full(dst, buf.data(), static_cast<size_t>(n), done))
                return make_error(ErrorKind::Io, "cannot write " + dst_path + ": " + errno_text(errno), "WriteFailed");
        }
        if (n < 0 && errno == EINTR) continue;
        if (n < 0)
            return make_error(ErrorKind::Io, "cannot copy the old database into " + dst_path + ": " + errno_text(errno),
                              "WriteFailed");
        if (n == 0)
            return not_incremental("the copy shrank while it was being duplicated (is something writing it?)");
        done += static_cast<uint64_t>(n);
    }
    return false;
}

// Builds a WAL file that SQLite recovers as ONE transaction: the pages
// given, in order (a page given twice: the later frame wins, as in any WAL),
// the last one a commit frame carrying the database's size after it. A
// frame is held back until the next arrives, since only at the end is it
// known which frame commits. Frames go through the PageWriter, so the
// checksums are computed on the decoder thread in order and the writes
// happen beside it. Until its commit frame is written the file is a WAL
// SQLite ignores (no valid commit): a torn journal never applies.
class WalJournal {
public:
    WalJournal(PageWriter& writer, SpaceGuard& space, uint32_t page_size, std::string what)
        : writer_(writer), space_(space), page_size_(page_size), what_(std::move(what)) {
        const std::string salts = s3::random_bytes(8);
        std::memcpy(&salt1_, salts.data(), 4);
        std::memcpy(&salt2_, salts.data() + 4, 4);
    }
    Status add(uint32_t pgno, std::string_view page) {
        if (page.size() != page_size_) return make_error(ErrorKind::Corrupt, what_ + ": a page of the wrong size", "ChainBroken");
        if (!held_.empty())
            if (auto st = emit(held_pgno_, held_, 0); !st) return st;
        held_pgno_ = pgno;
        held_.assign(page);
        return {};
    }
    uint64_t frames() const { return frames_ + (held_.empty() ? 0 : 1); }
    // Writes the held frame as the commit frame (db_pages: the size after it).
    Status commit(uint32_t db_pages) {
        if (held_.empty()) return {};
        Status st = emit(held_pgno_, held_, db_pages);
        held_.clear();
        return st;
    }

private:
    static void put_be32(unsigned char* p, uint32_t v) {
        p[0] = static_cast<unsigned char>(v >> 24);
        p[1] = static_cast<unsigned char>(v >> 16);
        p[2] = static_cast<unsigned char>(v >> 8);
        p[3] = static_cast<unsigned char>(v);
    }
    Status emit(uint32_t pgno, std::string_view page, uint32_t commit_size) {
        if (frames_ == 0) {
            // The header: little-endian checksums (magic ...682), version,
            // page size, checkpoint sequence 0, random salts, its checksum.
            unsigned char h[kWalHeaderSize] = {};
            put_be32(h, kWalMagicLittleEndian);
            put_be32(h + 4, kWalVersion);
            put_be32(h + 8, page_size_);
            put_be32(h + 16, salt1_);
            put_be32(h + 20, salt2_);
            wal_checksum(false, h, 24, s1_, s2_);
            put_be32(h + 24, s1_);
            put_be32(h + 28, s2_);
            if (auto st = writer_.write(0, std::string_view(reinterpret_cast<const char*>(h), sizeof h)); !st) return st;
        }
        const uint64_t off = wal_frame_offset(page_size_, frames_ + 1);
        if (auto st = space_.reserve(off + kWalFrameHeaderSize + page_size_, what_); !st) return st;
        unsigned char f[kWalFrameHeaderSize] = {};
        put_be32(f, pgno);
        put_be32(f + 4, commit_size);
        put_be32(f + 8, salt1_);
        put_be32(f + 12, salt2_);
        wal_checksum(false, f, 8, s1_, s2_);
        wal_checksum(false, reinterpret_cast<const unsigned char*>(page.data()), page.size(), s1_, s2_);
        put_be32(f + 16, s1_);
        put_be32(f + 20, s2_);
        if (auto st = writer_.write(off, std::string_view(reinterpret_cast<const char*>(f), sizeof f)); !st) return st;
        if (auto st = writer_.write(off + kWalFrameHeaderSize, page); !st) return st;
        ++frames_;
        return {};
    }

    PageWriter& writer_;
    SpaceGuard& space_;
    const uint32_t page_size_;
    const std::string what_;
    uint32_t salt1_ = 0, salt2_ = 0;
    uint32_t s1_ = 0, s2_ = 0;  // running checksum
    uint64_t frames_ = 0;       // frames written
    uint32_t held_pgno_ = 0;
    std::string held_;          // the newest page, not yet written
};

bool nonempty(const std::string& path) {
    struct stat st{};
    return ::lstat(path.c_str(), &st) == 0 && st.st_size > 0;
}

// The copy's header says WAL mode (bytes 18 and 19: read and write versions 2):
// SQLite then reads a "-wal" next to it at open. False if unreadable.
bool in_wal_mode(int fd) {
    unsigned char h[20];
    return ::pread(fd, h, sizeof h, 0) == static_cast<ssize_t>(sizeof h) && h[18] == 2 && h[19] == 2;
}

// Checkpoints `path`'s WAL of `frames` frames into it through SQLite (its
// own crash safety: the WAL stays until every frame is in the database
// file, which is synced first, and is removed when the connection closes;
// FULL, not TRUNCATE, whose report says 0 frames once it has reset the WAL).
// SQLite ignores a WAL it finds invalid: the frame count it reports must be
// the one written, or the file would silently keep its old state.
Status checkpoint_into(const std::string& path, uint64_t frames) {
    sqlite3* db = nullptr;
    int rc = sqlite3_open_v2(sqlite_file_uri(path).c_str(), &db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_URI, "unix");
    std::string err;
    auto run = [&](const char* sql, int* busy) {
        sqlite3_stmt* st = nullptr;
        int r = sqlite3_prepare_v2(db, sql, -1, &st, nullptr);
        if (r == SQLITE_OK) {
            r = sqlite3_step(st);
            // wal_checkpoint's row: busy, frames in the WAL, frames checkpointed.
            if (r == SQLITE_ROW && busy)
                *busy = sqlite3_column_int(st, 0) != 0 || static_cast<uint64_t>(sqlite3_column_int64(st, 1)) != frames ||
                        sqlite3_column_int64(st, 1) != sqlite3_column_int64(st, 2);
            if (r == SQLITE_ROW || r == SQLITE_DONE) r = SQLITE_OK;
        }
        sqlite3_finalize(st);
        if (r != SQLITE_OK && err.empty()) err = sqlite3_errmsg(db);
        return r == SQLITE_OK;
    };
    int busy = 0;
    if (rc != SQLITE_OK) err = db ? sqlite3_errmsg(db) : "out of memory";
    else if (run("PRAGMA synchronous=FULL", nullptr) && run("PRAGMA wal_checkpoint(FULL)", &busy) && busy)
        err = "the checkpoint did not copy all " + std::to_string(frames) +
              " frames (is the database open elsewhere, or did SQLite reject the journal?)";
    // The last connection's close checkpoints again and deletes the WAL.
    sqlite3_close(db);
    if (err.empty() && nonempty(path + "-wal")) err = path + "-wal was not removed (is the database open elsewhere?)";
    if (!err.empty())
        return make_error(ErrorKind::Io,
                          "the segments are committed in " + path + "-wal but applying them failed: " + err +
                              "; opening the database applies them, or restore it in full (--force)",
                          "CheckpointFailed");
    return {};
}

// Strips the advice not_incremental() appends: the reason alone, for a report.
std::string reason_of(const Error& e) {
    const auto cut = e.message.find("; restore in full (--force");
    return cut == std::string::npos ? e.message : e.message.substr(0, cut);
}

// The note's last object in generation `g` must be the bucket's: the
// trailer the note recorded is the SHA-256 of the bucket's segment `seq` (or
// snapshot). One ranged GET. `required`: an object no longer listed is a
// refusal (else the proof is skipped: an ancestor's segments may be pruned).
Status prove_position(s3::Client& client, const std::string& bucket, const std::string& db_id, GenerationView& g,
                      const LocalState& note, bool required, uint64_t& bytes) {
    if (auto st = inspect_generation(client, bucket, db_id, g, Detail::Objects); !st) return st;
    const std::string key = note.seq ? segment_key(db_id, g.info.id, note.seq) : snapshot_key(db_id, g.info.id);
    const uint64_t size = g.size_of(key);
    if (size == 0) {
        if (!required) return {};
        return not_incremental("the copy's state note records " + key + ", which the bucket does not hold");
    }
    auto trailer = read_trailer_hex(client, bucket, key, size);
    if (!trailer) return std::move(trailer).error();
    bytes += 32;
    if (*trailer != note.prev_sha256)
        return not_incremental("the copy's state note records a different " + key +
                               " than the bucket holds (SHA-256 differs): the copy is from another history");
    return {};
}

// What the copy at output_path is. Returns the note, or the refusal.
Result<LocalState> prove_copy(const std::string& output_path, const struct stat& st, const std::string& bucket,
                              const std::string& db_id) {
    const std::string note_path = output_path + "-bottomless";
    auto note = read_state_file(note_path);
    if (!note)
        return not_incremental(output_path + " has no readable state note " + note_path +
                               ": it cannot be proven a copy restored from this bucket");
    if (!note->restored)
        return not_incremental(output_path + "'s state note was written by a replicator, not by a restore: the file "
                                             "was opened with bottomless since and is no longer a restored copy");
    if (note->bucket != bucket || note->db_id != db_id)
        return not_incremental(output_path + " was restored from s3://" + note->bucket + "/" + note->db_id +
                               ", not s3://" + bucket + "/" + db_id);
    if (note->page_size == 0)
        return not_incremental(output_path + "'s state note was written by an older bottomless-cli without the "
                                             "fields an incremental restore needs");
    const int64_t mtime_ns = static_cast<int64_t>(st.st_mtim.tv_sec) * 1'000'000'000 + st.st_mtim.tv_nsec;
    if (note->db_size != static_cast<int64_t>(st.st_size) || note->db_mtime_ns != mtime_ns ||
        note->db_ino != static_cast<uint64_t>(st.st_ino))
        return not_incremental(output_path + " changed since it was restored (its size, modification time or inode "
                                             "differ from its state note)");
    if (static_cast<uint64_t>(st.st_size) != uint64_t{note->db_pages} * note->page_size)
        return not_incremental(output_path + " is not the size its state note records (" +
                               std::to_string(note->db_pages) + " pages of " + std::to_string(note->page_size) + ")");
    for (const char* suffix : {"-wal", "-journal"})
        if (nonempty(output_path + suffix))
            return not_incremental(output_path + suffix + " has content: the database was written since it was restored");
    return std::move(*note);
}

}  // namespace

Result<RestoreResult> restore_incremental(s3::Client& client, const std::string& bucket, const std::string& db_id,
                                          std::vector<GenerationView>& history, const RestoreTarget& target,
                                          const std::string& output_path, const RestoreOptions& options) {
    const auto t0 = Clock::now();
    auto full = [&](std::string reason) -> Result<RestoreResult> {
        auto r = restore_target(client, bucket, db_id, target, output_path, options);
        if (!r) return r;
        r->incremental = "full";
        r->incremental_reason = std::move(reason);
        r->seconds = seconds_since(t0);
        return r;
    };
    auto refused = [&](Error e) -> Result<RestoreResult> {
        if (options.full_if_refused && e.code == "NotIncremental") return full("refused: " + reason_of(e));
        return e;
    };

    struct stat st{};
    if (::lstat(output_path.c_str(), &st) != 0) {
        if (errno != ENOENT) return make_error(ErrorKind::Io, "cannot stat " + output_path + ": " + errno_text(errno), "OpenFailed");
        return full("no copy at " + output_path);
    }
    if (!S_ISREG(st.st_mode)) return refused(not_incremental(output_path + " is not a regular file"));
    auto proven = prove_copy(output_path, st, bucket, db_id);
    if (!proven) return refused(std::move(proven).error());
    const LocalState note = std::move(proven).value();
    const uint64_t copy_at = note.seq + (note.next_txns ? 1 : 0);  // segments (partly) in the copy

    size_t copy_index = history.size();
    for (size_t i = 0; i < history.size(); ++i)
        if (history[i].info.id == note.generation) copy_index = i;
    if (copy_index == history.size())
        return refused(not_incremental("the copy's generation " + note.generation +
                                       " is not in the bucket (another history, or removed since)"));
    uint64_t proof_bytes = 0;

    if (note.generation != target.generation) {
        if (copy_index < target.index)
            return refused(not_incremental("cannot go back: the copy is at generation " + note.generation +
                                           ", newer than the generation to restore " + target.generation));
        // Walk the parent links from the target back to the copy's generation.
        const SnapshotHeader* snap = &target.snapshot;
        std::string child = target.generation;
        for (size_t steps = 0; steps <= history.size(); ++steps) {
            const std::string& parent = snap->parent_generation;
            if (parent.empty())
                return refused(not_incremental("the copy's generation " + note.generation +
                                               " is not an ancestor of " + target.generation +
                                               " (its parent links end at " + child + "): another history"));
            if (parent == note.generation) {
                if (snap->parent_seq < copy_at)
                    return refused(not_incremental(
                        "the copy holds segment " + std::to_string(copy_at) + " of " + note.generation + " but " +
                        child + " continued from segment " + std::to_string(snap->parent_seq) +
                        ": the history went another way"));
                if (auto ps = prove_position(client, bucket, db_id, history[copy_index], note, false, proof_bytes); !ps)
                    return refused(std::move(ps).error());
                // Format 1 snapshots carry no page hashes (docs/FORMAT.md
                // "Incremental restore across generations").
                return full("generation " + note.generation + " of the copy is an ancestor of " + target.generation +
                            ", but format-1 snapshots carry no page hashes to fetch only the pages that differ");
            }
            size_t p = history.size();
            for (size_t i = 0; i < history.size(); ++i)
                if (history[i].info.id == parent) p = i;
            if (p == history.size())
                return refused(not_incremental("cannot prove the copy's generation " + note.generation +
                                               " an ancestor of " + target.generation + ": its chain reaches " +
                                               parent + ", which the bucket no longer holds"));
            if (auto s2 = inspect_generation(client, bucket, db_id, history[p], Detail::Headers); !s2)
                return std::move(s2).error();
            if (!history[p].snapshot)
                return history[p].header_error ? Result<RestoreResult>(*history[p].header_error)
                                               : refused(not_incremental("generation " + parent + " has no snapshot"));
            snap = &*history[p].snapshot;
            child = parent;
        }
        return refused(not_incremental("the parent links of " + target.generation + " loop"));
    }

    // ---- the same generation: the segments after the copy's position ----
    if (target.until_us && *target.until_us < note.last_commit_us)
        return refused(not_incremental("cannot go back: the copy holds transactions up to " +
                                       fmt_time_us(note.last_commit_us) + ", after the requested time " +
                                       fmt_time_us(*target.until_us)));
    if (target.last_seq < copy_at)
        return refused(not_incremental("the copy holds segment " + std::to_string(copy_at) + " of generation " +
                                       note.generation + ", the bucket only up to " + std::to_string(target.last_seq)));
    if (auto ps = prove_position(client, bucket, db_id, history[copy_index], note, true, proof_bytes); !ps)
        return refused(std::move(ps).error());
    if (note.page_size != target.snapshot.page_size)
        return refused(not_incremental("the copy's page size " + std::to_string(note.page_size) + " is not the generation's " +
                                       std::to_string(target.snapshot.page_size)));
    const std::string snap_key = snapshot_key(db_id, target.generation);
    if (auto c = check_cipher(target.snapshot.encryption, options.cipher.get(), snap_key); !c) return std::move(c).error();

    RestoreResult res;
    res.incremental = note.next_txns == 0 && target.last_seq == note.seq ? "up-to-date" : "segments";
    res.generation = note.generation;
    res.seq = note.seq;
    res.next_txns = note.next_txns;
    res.from_seq = note.seq;
    res.position = note.position;
    res.last_sha256 = note.prev_sha256;
    res.page_size = note.page_size;
    res.db_pages = note.db_pages;
    res.last_commit_us = note.last_commit_us;
    res.bytes_downloaded = proof_bytes;
    if (res.incremental == "up-to-date") {  // nothing to download, nothing to write
        res.seconds = seconds_since(t0);
        return res;
    }

    // Two ways to apply, both leaving the copy and its note as they are until
    // one atomic step, so a kill before it changes nothing:
    //  - through a WAL, when the copy is in WAL mode (as every database
    //    bottomless replicates is): the changed pages go to PATH.restore-wal
    //    as one transaction, which is fsynced and renamed to PATH-wal (the
    //    commit point: from then on SQLite reads the new state), then
    //    checkpointed into PATH by SQLite. Writes the changed pages twice,
    //    never the whole file.
    //  - onto a duplicate, PATH.restore-tmp (a FICLONE clone, else a copy of
    //    the file), renamed over PATH as a full restore is.
    auto apply = [&]() -> Status {
        std::string out_dir = output_path.substr(0, output_path.find_last_of('/') + 1);
        if (out_dir.empty()) out_dir = ".";
        SpaceGuard space(out_dir);
        int src = ::open(output_path.c_str(), O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
        if (src < 0) return make_error(ErrorKind::Io, "cannot open " + output_path + ": " + errno_text(errno), "OpenFailed");
        struct Closer {
            int& fd;
            ~Closer() {
                if (fd >= 0) ::close(fd);
            }
        } close_src{src};
        struct stat now{};
        // The file opened must be the one proven (not replaced meanwhile).
        if (::fstat(src, &now) != 0 || now.st_ino != st.st_ino || now.st_size != st.st_size ||
            now.st_mtim.tv_sec != st.st_mtim.tv_sec || now.st_mtim.tv_nsec != st.st_mtim.tv_nsec)
            return not_incremental(output_path + " changed while the incremental restore started");
        const bool via_wal = !options.incremental_copy && in_wal_mode(src);

        TmpFile tmp;
        tmp.path = output_path + (via_wal ? ".restore-wal" : ".restore-tmp");
        if (::unlink(tmp.path.c_str()) != 0 && errno != ENOENT)
            return make_error(ErrorKind::Io, "cannot remove the stale " + tmp.path + ": " + errno_text(errno), "OpenFailed");
        tmp.fd = ::open(tmp.path.c_str(), O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0644);
        if (tmp.fd < 0) return make_error(ErrorKind::Io, "cannot create " + tmp.path + ": " + errno_text(errno), "OpenFailed");
        if (via_wal) {
            res.applied_via = "wal";
        } else {
            if (auto s = space.reserve(static_cast<uint64_t>(st.st_size), "the copy of " + output_path); !s) return s;
            const auto tc = Clock::now();
            auto cloned = duplicate_file(src, tmp.fd, static_cast<uint64_t>(st.st_size), tmp.path);
            if (!cloned) return std::move(cloned).error();
            res.applied_via = *cloned ? "clone" : "copy";
            res.copied_bytes = static_cast<uint64_t>(st.st_size);
            res.timings.copy = seconds_since(tc);
        }
        ::close(src);
        src = -1;

        uint64_t total = 0;
        std::vector<FetchJob> jobs;
        const uint64_t first_seq = note.seq + 1;
        for (uint64_t seq = first_seq; seq <= target.last_seq; ++seq) {
            std::string key = segment_key(db_id, target.generation, seq);
            total += history[target.index].size_of(key);
            jobs.push_back({std::move(key), std::nullopt, max_segment_object_size()});
        }
        const int workers = std::max(1, options.parallel);
        OrderedFetcher fetcher(client, bucket, std::move(jobs), workers, static_cast<size_t>(workers) + 2);
        PageWriter writer(tmp.fd);
        std::optional<WalJournal> wal;
        SegmentPlan plan;
        plan.generation = target.generation;
        plan.first_seq = first_seq;
        plan.last_seq = target.last_seq;
        plan.first_job = 0;
        plan.until_us = target.until_us;
        plan.skip_txns = note.next_txns;
        plan.onto_copy = true;
        plan.total = total;
        if (via_wal) {
            wal.emplace(writer, space, res.page_size, "the journal " + tmp.path);
            plan.sink = [&](uint32_t pgno, std::string_view page) { return wal->add(pgno, page); };
        }
        Status applied = apply_segments(fetcher, writer, space, db_id, plan, options, res);
        if (applied && wal) applied = wal->commit(res.db_pages);
        if (!applied) {
            fetcher.stop();
            (void)writer.finish();
            return applied;
        }
        if (!via_wal) return finish_restore(fetcher, writer, tmp, output_path, bucket, db_id, options, res);

        // ---- through the WAL ----
        auto& tm = res.timings;
        if (Status w = end_transfer(fetcher, writer, tm); !w) return w;
        if (wal->frames() == 0) {  // no transaction in time: the copy already is the target
            res.incremental = "up-to-date";
            return {};
        }
        const auto t_sync = Clock::now();
        if (::fsync(tmp.fd) != 0)
            return make_error(ErrorKind::Io, "cannot finish " + tmp.path + ": " + errno_text(errno), "WriteFailed");
        tm.fsync = seconds_since(t_sync);
        ::close(tmp.fd);
        tmp.fd = -1;
        const auto t_finish = Clock::now();
        // The note goes first: from the rename on, the file is no longer the
        // one it describes. A stale shm would describe another WAL.
        for (const char* suffix : {"-bottomless", "-shm"}) {
            std::string p = output_path + suffix;
            if (::unlink(p.c_str()) != 0 && errno != ENOENT)
                return make_error(ErrorKind::Io, "cannot remove " + p + ": " + errno_text(errno), "UnlinkFailed");
        }
        if (::rename(tmp.path.c_str(), (output_path + "-wal").c_str()) != 0)
            return make_error(ErrorKind::Io, "cannot rename " + tmp.path + " to " + output_path + "-wal: " + errno_text(errno),
                              "RenameFailed");
        tmp.keep = true;
        if (int dfd = ::open(out_dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC); dfd >= 0) {
            (void)::fsync(dfd);
            ::close(dfd);
        }
        // Committed: SQLite applies it now (or at the next open, if this dies).
        if (auto c = checkpoint_into(output_path, wal->frames()); !c) return c;
        tm.finish = seconds_since(t_finish);
        const auto t_check = Clock::now();
        if (auto c = integrity_check(output_path, options.integrity_check); !c) return c;  // no note: not vouched for
        tm.check = seconds_since(t_check);
        res.checked = options.integrity_check;
        write_restored_note(output_path, bucket, db_id, res);
        return {};
    };
    if (auto s = apply(); !s) return refused(std::move(s).error());
    res.seconds = seconds_since(t0);
    return res;
}

}  // namespace bottomless::replicator
