// Restore: listing generations, rebuilding a database from a snapshot and
// its chain of segments. See restore.h.
#include "replicator/restore.h"

#include <fcntl.h>
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
    auto res = restore_target(client, bucket, db_id, *target, output_path, options);
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
    for (uint64_t seq = 1; seq <= last_seq; ++seq) {
        std::string key = segment_key(db_id, chosen.generation, seq);
        auto body = fetcher.take(snapshot_jobs + seq - 1);
        if (!body) {
            stop_all();
            Error e = std::move(body).error();
            if (e.kind == ErrorKind::NotFound)
                e = make_error(ErrorKind::Corrupt,
                               "segment " + key + " is missing: the history of generation " + chosen.generation +
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
        uint64_t apply_frames = 0;  // frames of the transactions at or before the point in time
        size_t apply_txns = 0;
        auto on_header = [&](const SegmentHeader& sh) -> Status {
            if (sh.db_id != db_id || sh.generation != chosen.generation || sh.seq != seq)
                return make_error(ErrorKind::Corrupt,
                                  key + " holds segment " + std::to_string(sh.seq) + " of " + sh.db_id + "/" +
                                      sh.generation + ": it is not the object this key should hold",
                                  "WrongObject");
            if (sh.prev_sha256 != res.last_sha256 || !(sh.start == res.position))
                return make_error(ErrorKind::Corrupt,
                                  key + " does not continue the previous object (chain broken): the history forks or "
                                        "an object was replaced",
                                  "ChainBroken");
            if (sh.page_size != res.page_size)
                return make_error(ErrorKind::Corrupt, key + " has page size " + std::to_string(sh.page_size) +
                                                          ", the snapshot " + std::to_string(res.page_size),
                                  "ChainBroken");
            for (const auto& txn : sh.txns) {
                if (until_us && txn.commit_us > *until_us) break;
                apply_frames += txn.frames;
                ++apply_txns;
            }
            h = sh;
            return {};
        };
        auto on_frame = [&](uint64_t index, uint32_t pgno, std::string_view page) -> Status {
            if (index >= apply_frames) return {};  // decoded (and so validated), not applied
            const uint64_t off = static_cast<uint64_t>(pgno - 1) * res.page_size;
            if (auto st = space.reserve(off + page.size(), "segment " + key); !st) return st;
            return writer.write(off, page);
        };
        const auto t0 = Clock::now();
        const double waited = writer.wait_seconds();
        auto seg_sha = for_each_segment_frame(*body, key, options.cipher.get(), on_header, on_frame);
        tm.decode += seconds_since(t0) - (writer.wait_seconds() - waited);
        if (!seg_sha) {
            stop_all();
            return std::move(seg_sha).error();
        }
        fetcher.recycle(std::move(*body));
        for (size_t t = 0; t < apply_txns; ++t) {
            res.db_pages = h.txns[t].db_pages;
            res.last_commit_us = h.txns[t].commit_us;
            ++res.transactions;
        }
        if (apply_txns < h.txns.size()) break;  // the point in time is inside this segment
        res.seq = seq;
        res.position = h.end;
        res.last_sha256 = *seg_sha;
        if (options.progress) options.progress(res.bytes_downloaded, total);
    }
    fetcher.stop();  // segments past the point in time need not finish
    tm.download = fetcher.busy_seconds();
    tm.download_wait = fetcher.wait_seconds();
    {
        Status st = writer.finish();
        tm.write = writer.busy_seconds();
        tm.write_wait = writer.wait_seconds();
        if (!st) return std::move(st).error();
    }

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
    if (!checked) return std::move(checked).error();
    res.checked = options.integrity_check;
    ::close(tmp.fd);
    tmp.fd = -1;
    const auto t_finish = Clock::now();

    // A WAL or shm file left next to the destination belongs to another
    // database state; SQLite would replay it onto the restored file.
    for (const char* suffix : {"-wal", "-shm", "-journal", "-bottomless"}) {
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
    // Tell the extension where this file comes from: opened with bottomless,
    // it starts a new generation whose parent is the restored one, instead
    // of refusing a file it cannot vouch for (initial_replication=error).
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
        // Without the note the file still opens; it only cannot be vouched
        // for (initial_replication decides), so a failure is a warning.
        if (Status w = write_state_file(output_path + "-bottomless", note); !w) log::warn(w.error().message);
    }
    tm.finish = seconds_since(t_finish);
    res.seconds = seconds_since(t0);
    return res;
}

}  // namespace bottomless::replicator
