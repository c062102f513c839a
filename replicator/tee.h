// The tee: WAL frames kept as this process's connections write them, so that
// nothing reads the WAL back to ship them (issue 9).
//
// The VFS hands over every successful write to the -wal file. Bytes land in
// the frame they belong to (by offset), whatever pieces SQLite writes them
// in: a frame header and its page separately, a page split at a sync point,
// a frame rewritten in place before its transaction commits, frame headers
// rewritten at commit with new checksums (walRewriteChecksums), padding
// frames. Frames are tentative: the tee does not know which are committed.
// The replicator takes a frame range once a commit covers it (the wal-index
// says so), and checks every frame against the WAL checksum chain as it
// does for frames read from the file; a frame the tee got wrong or never
// saw (a writer outside this process, memory full) is read from the file by
// the uploader instead.
//
// Epochs: a WAL restart starts a new epoch (new salts). Frames of earlier
// epochs stay until taken or trimmed: a restart with unshipped frames moves
// nothing, the frames are simply still here.
//
// Memory: a frame is kept only while the tee and everything else the
// replicator holds for the database (pending frames, the segment being
// encoded or uploaded) stay within the tee's limit; past it the frame is
// dropped (a hole: the uploader reads it from the WAL, which keeps it until
// it is durable). While there is a hole the tee keeps at most half its
// limit: the frames it would keep are newer than the ones the uploader must
// read back from the WAL first, and the other half is theirs, so a backlog
// never waits for memory that only its own progress would free. The
// uploader may also shed the newest epoch's frames (shed()) when it needs
// the room to read older ones; an epoch whose end a WAL restart has been
// promised is pinned against that (pin()).
//
// Page buffers are reused: once a segment is encoded its pages come back
// (recycle()) as spares for the next frames and for frames read back from
// the WAL (page_buffer()), so that a writer copying a frame in neither
// allocates nor first-touches memory. Without that, each frame was a fresh
// 4 KiB allocation on the writer's thread, freed by the uploader's, and
// the allocator's trim handed those pages back to the kernel between
// segments: the writer spent a third of its time in malloc and page faults
// (docs/BENCHMARKS.md). A frame that finds no spare takes a page of a new
// slab (page_buf.h: faulted in by the kernel in one call) with one more
// page for each frame the tee holds (up to a whole slab; fewer than 8 pages
// in all: a heap page alone), and the slab's other pages become spares
// within the limits below. Spares are kept only
// while the tee, the spares and what the replicator holds stay within the
// limit (and within the spare limit), as are the pages of frames the tee
// forgets without handing them over (trimmed, shed); drop_spares() frees
// them when a database has had nothing to ship and committed nothing for a
// while (Replicator::pool_step).
//
// Thread safety: one mutex, held for a copy or a map operation, never for
// I/O. write() is noexcept: a tee that cannot keep a frame forgets it.
#pragma once

#include <atomic>
#include <cstdint>
#include <deque>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "replicator/page_buf.h"
#include "replicator/wal.h"

namespace bottomless::replicator {

struct TeeFrame {
    unsigned char header[kWalFrameHeaderSize] = {0};
    PageBuf page;  // page_size bytes
};

class Tee {
public:
    // `spare_limit_bytes`: the most bytes of spare page buffers kept.
    explicit Tee(uint64_t limit_bytes, uint64_t spare_limit_bytes = 0)
        : cap_(limit_bytes), spare_cap_(spare_limit_bytes) {}

    // A successful write of `n` bytes at offset `off` of the WAL, whose
    // pages are `page_size` bytes. `other_bytes`: memory the replicator
    // already holds for unshipped frames (counted against the limit).
    void write(uint64_t off, const unsigned char* p, size_t n, uint32_t page_size, uint64_t other_bytes) noexcept;

    // Whether frames [from, to] of the epoch (salt1, salt2) are all held.
    bool holds(uint32_t salt1, uint32_t salt2, uint64_t from, uint64_t to) const;
    // Moves frames [from, to] of the epoch out (and forgets that epoch's
    // frames before `from`). False, and nothing moved, unless all are held.
    bool take(uint32_t salt1, uint32_t salt2, uint64_t from, uint64_t to, std::vector<TeeFrame>& out);
    // The epoch's WAL header, if the tee saw it written.
    std::optional<WalHeader> header(uint32_t salt1, uint32_t salt2) const;
    // Everything up to frame `frame` of epoch (salt1, salt2) is shipped or
    // covered otherwise: forget it, and every older epoch.
    void trim(uint32_t salt1, uint32_t salt2, uint64_t frame);

    // A frame of the newest epoch was dropped (memory full, or an error):
    // the WAL is the only copy of it until it is captured from there.
    bool has_hole() const { return hole_upto_.load(std::memory_order_relaxed) != 0; }
    // Frames up to `frame` of epoch (salt1, salt2) are captured (read from
    // the WAL where the tee lacked them): a hole at or before it is filled.
    void captured_through(uint32_t salt1, uint32_t salt2, uint64_t frame);
    uint64_t bytes() const { return bytes_.load(std::memory_order_relaxed); }
    // Frames kept in memory count kWalFrameHeaderSize + page_size each.
    static uint64_t frame_bytes(uint32_t page_size) { return kWalFrameHeaderSize + uint64_t{page_size}; }

    // A buffer of `page_size` bytes for a page (a spare when there is one;
    // its contents are then stale, to be overwritten). `other_bytes`: the
    // memory held for unshipped frames outside the tee, this page included;
    // a new slab's other pages become spares within the limits.
    PageBuf page_buffer(uint32_t page_size, uint64_t other_bytes);
    // Pages done with (their segment is encoded): kept as spares while they
    // fit (see above), the rest freed. `other_bytes` as in write(). Leaves
    // `pages` empty.
    void recycle(std::vector<PageBuf>& pages, uint64_t other_bytes) noexcept;
    // Frees every spare buffer.
    void drop_spares() noexcept;
    uint64_t spare_bytes() const { return spare_bytes_.load(std::memory_order_relaxed); }

    // Frees at least `need` bytes, if it can, by forgetting frames after
    // `after` of the newest epoch, if that is (salt1, salt2) and not pinned
    // (newest first; they become a hole: the WAL still holds them, since it
    // cannot restart over a hole). Returns the bytes freed.
    uint64_t shed(uint32_t salt1, uint32_t salt2, uint64_t after, uint64_t need);
    // A WAL restart (or truncation) was allowed because the tee holds every
    // unshipped frame of epoch (salt1, salt2): from now on shed() leaves
    // that epoch alone (the WAL will not hold its frames for long).
    void pin(uint32_t salt1, uint32_t salt2);

private:
    struct Epoch {
        uint32_t salt1 = 0, salt2 = 0;
        uint32_t page_size = 0;
        std::optional<WalHeader> header;
        std::map<uint64_t, TeeFrame> frames;  // by frame number (1-based)
    };
    // The epoch (salt1, salt2), or null. Callers hold mu_.
    Epoch* find(uint32_t salt1, uint32_t salt2);
    const Epoch* find(uint32_t salt1, uint32_t salt2) const;
    Epoch& newest_for(uint32_t salt1, uint32_t salt2, uint32_t page_size);  // creates it when new
    void erase_frames(Epoch& e, std::map<uint64_t, TeeFrame>::iterator from, std::map<uint64_t, TeeFrame>::iterator to);
    void write_locked(uint64_t off, const unsigned char* p, size_t n, uint32_t page_size, uint64_t other_bytes);
    // `used`: memory held for unshipped frames, the tee's and others',
    // this page included.
    PageBuf page_buffer_locked(uint32_t page_size, uint64_t used);
    // Keeps `page` (a frame's, forgotten) as a spare if the spare limit allows.
    void keep_spare_locked(PageBuf& page) noexcept;

    const uint64_t cap_;
    const uint64_t spare_cap_;
    mutable std::mutex mu_;
    uint32_t last_salt1_ = 0, last_salt2_ = 0;  // of the last frame header written: its page follows
    std::deque<Epoch> epochs_;  // oldest first; back() is the WAL's current epoch as far as the tee knows
    std::atomic<uint64_t> bytes_{0};
    std::atomic<uint64_t> hole_upto_{0};  // the newest epoch's last dropped frame (0: none; max: unknown)
    std::optional<std::pair<uint32_t, uint32_t>> pinned_;  // guarded by mu_: salts of the pinned epoch
    std::vector<PageBuf> spares_;                         // guarded by mu_: page buffers, all one size
    std::atomic<uint64_t> spare_bytes_{0};                 // their bytes (written under mu_)
};

}  // namespace bottomless::replicator
