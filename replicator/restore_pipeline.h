// Private to restore*.cpp: the machinery every restore runs objects
// through, the full one (restore.cpp) and the incremental one
// (restore_incremental.cpp). Not an interface.
//
//   OrderedFetcher  several GETs in flight, handed over in order, bounded memory
//   (decoder)       the caller's thread: trailers, chain, zstd, pages
//   SideHasher      a snapshot's SHA-256 beside the decoder
//   PageWriter      pwrite of the decoded pages on a thread of its own
//   SpaceGuard      every extension of the file checked against free space
//   apply_segments  a plan's segments, whole transactions only
//   finish_restore  truncate, fsync beside the check, rename, state note
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

#include "replicator/format.h"
#include "replicator/restore.h"
#include "replicator/state_file.h"
#include "s3/client.h"
#include "s3/crypto.h"

namespace bottomless::replicator::restore_detail {

using Clock = std::chrono::steady_clock;

std::string errno_text(int e);
double seconds_since(Clock::time_point t0);

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
    Status reserve(uint64_t end, const std::string& what);

private:
    static constexpr uint64_t kSlack = 8u << 20;
    std::string dir_;
    uint64_t extent_ = 0;   // the largest size reserved so far
    uint64_t checked_ = 0;  // growth up to here needs no new check
};

// ---- buffers ----
//
// A download part or a batch of pages: a byte buffer aligned to
// kDirectAlign (O_DIRECT writes take it as it is) and, from 2 MiB on, to
// whole transparent huge pages. A restore fills tens of MiB of such
// buffers once; on a VM that hands idle memory back to its host each first
// touch of a 4 KiB page is a host fault (docs/BENCHMARKS.md, "Restore vs a
// plain GET"), and a fresh process such as bottomless-cli pays it for every
// buffer: one fault per 2 MiB instead of 512 (one CLI restore of 100 MiB:
// 24 000 minor faults -> 1 900). Each kind is reused from one part or
// batch to the next, so it is first touched once.
class AlignedBuffer {
public:
    AlignedBuffer() = default;
    AlignedBuffer(AlignedBuffer&& o) noexcept : p_(o.p_), size_(o.size_), cap_(o.cap_) { o.p_ = nullptr, o.size_ = o.cap_ = 0; }
    AlignedBuffer& operator=(AlignedBuffer&& o) noexcept;
    AlignedBuffer(const AlignedBuffer&) = delete;
    AlignedBuffer& operator=(const AlignedBuffer&) = delete;
    ~AlignedBuffer();
    // Grows the capacity to at least cap (copying what it holds); from
    // 2 MiB on, whole huge pages aligned to them (advise_huge_pages).
    void reserve(size_t cap);
    void append(std::string_view d);
    void clear() { size_ = 0; }
    const char* data() const { return p_; }
    operator std::string_view() const { return {p_, size_}; }
    size_t size() const { return size_; }
    size_t capacity() const { return cap_; }

private:
    char* p_ = nullptr;  // posix_memalign (kDirectAlign), from kHugePage on mmap (aligned to it), or null
    size_t size_ = 0, cap_ = 0;
};

constexpr size_t kDirectAlign = 4096;
constexpr size_t kHugePage = size_t{2} << 20;

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

class OrderedFetcher {
public:
    // `cancel` (optional, RestoreOptions::cancel): once set, transfers stop
    // at their next bytes and take() answers Cancelled.
    OrderedFetcher(s3::Client& client, std::string bucket, std::vector<FetchJob> jobs, int workers, size_t window,
                   const std::atomic<bool>* cancel = nullptr);
    ~OrderedFetcher() { stop(); }
    OrderedFetcher(const OrderedFetcher&) = delete;
    OrderedFetcher& operator=(const OrderedFetcher&) = delete;

    // Job i's body (jobs are taken in order: 0, 1, 2, ...).
    Result<AlignedBuffer> take(size_t i);
    // Gives a taken body's buffer back for a later job.
    void recycle(AlignedBuffer&& buf);
    // Abandons what is left (in-flight transfers stop at their next bytes) and joins.
    void stop();
    double busy_seconds() {
        std::lock_guard lock(mu_);
        return busy_s_;
    }
    double wait_seconds() {
        std::lock_guard lock(mu_);
        return wait_s_;
    }

private:
    void run();

    s3::Client& client_;
    const std::string bucket_;
    const std::vector<FetchJob> jobs_;
    const size_t window_;
    std::atomic<bool> stop_{false};
    std::atomic<bool> out_of_memory_{false};  // a download thread could not go on: all stop
    const std::atomic<bool>* const cancel_;  // the caller's, may be null
    std::mutex mu_;               // guards everything below but threads_
    std::condition_variable cv_;  // a job finished or was taken, or stop
    size_t next_ = 0;             // the next job to start
    size_t taken_ = 0;            // jobs before this one were taken
    std::map<size_t, Result<AlignedBuffer>> done_;
    std::vector<AlignedBuffer> spare_;  // buffers of taken jobs, for the next ones
    double busy_s_ = 0, wait_s_ = 0;
    std::vector<std::thread> threads_;  // owned by the thread that made the fetcher
};

// ---- the writes: off the decoder's thread, in order ----
//
// The decoder hands pages over in batches of kBatch bytes (runs of adjacent
// pages coalesced into one pwrite) and goes on decoding while this thread
// copies them into the page cache. Batches are written in the order given,
// so a segment's page lands after the snapshot's page it replaces. Memory:
// kDepth batches in the queue, one being filled, one being written; their
// buffers are reused, never freed until the end.
// (Starting the write-back early with sync_file_range was measured: no
// faster at 1 GiB, and it made the decoder wait on the writer; without it
// the final fsync overlaps the integrity check instead.)
//
// direct_fd (optional): the same file opened with O_DIRECT. Runs that are
// aligned (offset, length and address to kDirectAlign: whole pages of a
// database's page size >= 4096 at their offsets) are written through it,
// from the batch's own buffer: no copy into the page cache, whose pages a
// VM with free page reporting hands back to the host when idle, so that
// each first touch costs a host fault (docs/BENCHMARKS.md "Restore vs a
// plain GET"). Anything else, or a file system refusing O_DIRECT, goes
// through fd.

class PageWriter {
public:
    explicit PageWriter(int fd, int direct_fd = -1) : fd_(fd), direct_fd_(direct_fd) {
        spare_.reserve(kDepth + 2);  // every buffer that can exist: keeping one never allocates
        thread_ = std::thread([this] { run(); });
    }
    ~PageWriter() { (void)finish(); }
    PageWriter(const PageWriter&) = delete;
    PageWriter& operator=(const PageWriter&) = delete;

    // Decoder thread only.
    Status write(uint64_t off, std::string_view data);
    // Writes what is left and stops the thread; the first error of any write.
    Status finish();
    double busy_seconds() {
        std::lock_guard lock(mu_);
        return busy_s_;
    }
    double wait_seconds() const { return wait_s_; }

private:
    static constexpr size_t kBatch = 2u << 20;
    static constexpr size_t kDepth = 4;

    struct Batch {
        AlignedBuffer data;
        std::vector<std::pair<uint64_t, size_t>> runs;  // (file offset, length), laid end to end in data
    };

    Status hand_over();
    void run();

    int fd_;
    int direct_fd_;               // -1: none, or refused (writer thread only after the start)
    Batch cur_;                   // being filled (decoder thread only)
    double wait_s_ = 0;           // decoder thread only
    std::mutex mu_;               // guards everything below but thread_
    std::condition_variable cv_;  // the queue changed, or closed_
    std::deque<Batch> queue_;
    std::vector<AlignedBuffer> spare_;  // written batches' buffers, for reuse
    bool closed_ = false;
    std::optional<Error> error_;
    double busy_s_ = 0;
    std::thread thread_;  // started by the constructor, once the members above exist
};

// Hashes the snapshot's parts on its own thread while the decoder decodes
// them: SHA-256 (~2 GB/s here) and decoding (zstd, page copies) each keep a
// core busy, so side by side a part costs the longer of the two, not the sum.
class SideHasher {
public:
    SideHasher() : thread_([this] { run(); }) {}
    ~SideHasher();
    SideHasher(const SideHasher&) = delete;
    SideHasher& operator=(const SideHasher&) = delete;
    // `bytes` must stay alive until wait() returns.
    void start(std::string_view bytes);
    void wait();
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
    void run();

    s3::Hasher hasher_{s3::Hasher::Algo::Sha256};
    std::mutex mu_;               // guards job_, busy_, quit_, busy_s_
    std::condition_variable cv_;  // a job was given or done, or quit_
    std::string_view job_;
    bool busy_ = false;
    bool quit_ = false;
    double busy_s_ = 0;
    std::thread thread_;  // last: starts once the members above exist
};

// The file a restore writes before the rename; removed unless kept.
struct TmpFile {
    std::string path;
    int fd = -1;
    bool keep = false;
    ~TmpFile();
};

// ---- the restored file's page digests: "<db>-bottomless-pages" ----
//
// What an incremental restore across generations compares with the new
// snapshot's page index instead of reading and hashing the copy
// (docs/FORMAT.md "The page digests"). Built from the index of the
// snapshot restored (captured from its tail) and the pages segments wrote
// (marked in `touched`, hashed from the final file).
struct PageDigests {
    std::string hashes;              // kPageHashSize bytes per page, for the pages the index covered
    std::vector<uint8_t> touched;    // by page number: written by a segment since
    void touch(uint32_t pgno) {
        // Pages past the hashes are read back from the file anyway: no
        // allocation sized by a page number from the bucket.
        if (uint64_t{pgno} * kPageHashSize > hashes.size()) return;
        if (touched.size() <= pgno) touched.resize(hashes.size() / kPageHashSize + 1, 0);
        touched[pgno] = 1;
    }
};

// Writes output_path's digests (after the state note, which it must match):
// `d`'s for pages the index covered and no segment wrote, the others hashed
// from the file. A failure is a warning: the next incremental restore
// hashes the file instead.
void write_page_digests(const std::string& output_path, const RestoreResult& res, const PageDigests& d);
// The digests of a copy proven by `note` (its size, mtime and inode checked
// against the file already): nullopt if missing, damaged, or not the note's.
std::optional<std::string> read_page_digests(const std::string& output_path, const LocalState& note);

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
    // Pages applied are marked here (for the digests), when set.
    PageDigests* digests = nullptr;
};

// Precondition "NotIncremental": why, and the advice to restore in full.
Error not_incremental(const std::string& why);

// Applies the plan's segments in order, whole transactions only, continuing
// res (position, last_sha256, db_pages); on success res names the last
// segment applied in full (seq) and next_txns those of the one after.
// The caller stops the fetcher and the writer on an error.
Status apply_segments(OrderedFetcher& fetcher, PageWriter& writer, SpaceGuard& space, const std::string& db_id,
                      const SegmentPlan& plan, const RestoreOptions& options, RestoreResult& res);

// Tell the extension where this file comes from: opened with bottomless,
// it starts a new generation whose parent is the restored one, instead
// of refusing a file it cannot vouch for (initial_replication=error).
// An incremental restore later reads it as the proof of what the file is.
void write_restored_note(const std::string& output_path, const std::string& bucket, const std::string& db_id,
                         const RestoreResult& res);

// The transfer is over (or no longer needed): the fetcher stops, the
// writer's last pages land; both record where their time went.
Status end_transfer(OrderedFetcher& fetcher, PageWriter& writer, RestoreResult::Timings& tm);

// The end of every restore: the pages are in tmp; truncates to the last
// transaction's size, fsyncs (beside the chosen check), removes the stale
// files next to the destination (its state note first: a crash from here
// on leaves no note vouching for a file that is not the one it describes),
// renames into place and writes the new note.
Status finish_restore(OrderedFetcher& fetcher, PageWriter& writer, TmpFile& tmp, const std::string& output_path,
                      const std::string& bucket, const std::string& db_id, const RestoreOptions& options,
                      RestoreResult& res);

}  // namespace bottomless::replicator::restore_detail
