// Private to the replicator's source files (replicator/*.cpp): what more
// than one of them uses. Not an interface.
#pragma once

#include <fcntl.h>
#include <sys/stat.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "replicator/format.h"
#include "replicator/tee.h"
#include "replicator/util.h"
#include "replicator/wal.h"

namespace bottomless::replicator {

using Clock = std::chrono::steady_clock;

// Test hook state (testing_exit_after_sync_uploads, capture.cpp).
extern std::atomic<int> g_exit_after_sync_uploads;
extern std::atomic<bool> g_exit_before_state;

struct LocalState;  // state_file.h

struct RecoveredTxn {
    std::vector<SegmentFrame> frames;
    uint32_t db_pages = 0;
    WalPosition end;
    uint64_t bytes = 0;
};

struct LocalProof {
    bool proven = false;
    uint32_t page_size = 0;          // from the WAL header (0: no WAL)
    uint32_t salt1 = 0, salt2 = 0;   // the WAL's epoch
    uint64_t last_commit_frame = 0;  // committed frames of that epoch
    uint64_t unshipped_from = 0;     // frames of that epoch after this one are not in the bucket
    // Committed frames of the recorded epoch that a WAL restart left in the
    // file (they were staged in memory when the process died): shipped first.
    std::vector<RecoveredTxn> recovered;
    std::string why;  // when not proven: what did not match (for the log)
    bool recovered_from_wal = false;  // `recovered` read from the WAL's old slots (not the copy aside)
};

// Whether the local files are exactly where `state`'s history ends
// (startup_proof.cpp): the WAL still in the recorded epoch at a commit with
// the recorded checksums; or one restart later, the recorded epoch's
// unshipped frames recovered from their old slots or the copy aside; or,
// after a clean close, no WAL and a database file untouched since.
// `live_wal_index`: other processes hold the database open (a takeover):
// what is committed is what the wal-index says (cap_to_wal_index).
LocalProof prove_local(const LocalState& state, const std::string& db_path, const std::string& wal_path,
                       const std::optional<WalIndexHeader>& live_wal_index = std::nullopt);

// Several processes: a commit frame in the WAL file that the live wal-index
// (`<db>-shm`, mapped by the processes that have the database open; `live`,
// read through this process's own mapping) does not publish was written by a
// process that died before publishing it; for the others it rolled back
// (the next writer overwrites it). `scan`'s last commit is lowered to the
// wal-index's when they are in the same epoch. Never opens `<db>-shm`
// itself: closing any descriptor of it would drop every POSIX lock this
// process's SQLite connections hold on it (their read marks and the DMS
// lock: another process could then truncate it under them, SIGBUS).
void cap_to_wal_index(WalScan& scan, const std::string& db_path, const WalIndexHeader& live);

// Copies bytes [from, to) of the WAL to the same offsets of `out_path`
// (created or emptied first): the copy aside of an ended epoch's unshipped
// frames, `<db>-bottomless-frames` (Replicator::before_wal_overwrite).
// With `with_header`, the WAL's header too (its salts, byte order and page
// size let the ended epoch's frames be read back after the WAL restarted).
Status copy_frames_aside(const std::string& wal_path, const std::string& out_path, uint64_t from, uint64_t to,
                         bool with_header = false);

// Several processes (issue 14): a WAL restart, by any process, while frames
// of the epoch that ends are not durable yet. Its header and frames
// (durable_frame, h.mx_frame] go to `<db>-bottomless-frames` first, under
// the WAL write lock, so that the leader (or the process taking over from
// it) ships them from there once the new epoch overwrites their slots.
Status keep_epoch_tail(const std::string& db_path, const WalIndexHeader& h, uint64_t durable_frame);

// The WAL file, opened when first needed: frames the tee lacks are read
// from it (the uploader's fallback, counted in status as wal_frames_read).
class WalFile {
public:
    explicit WalFile(const std::string& path) : path_(path) {}
    int fd() {
        if (!opened_) {
            opened_ = true;
            fd_.fd = ::open(path_.c_str(), O_RDONLY | O_CLOEXEC);
        }
        return fd_.fd;
    }
    std::optional<WalHeader> header() {
        unsigned char h[kWalHeaderSize];
        if (fd() < 0 || !pread_full(fd_.fd, h, sizeof h, 0)) return std::nullopt;
        return parse_wal_header(h);
    }
    // Into the tee's spare page buffers while it has some. `other_held`:
    // the memory held for unshipped frames outside the tee before these.
    bool read(uint32_t page_size, uint64_t from, uint64_t to, std::vector<TeeFrame>& out, Tee& buffers,
              uint64_t other_held) {
        if (fd() < 0) return false;
        for (uint64_t i = from; i <= to; ++i) {
            TeeFrame f;
            f.page = buffers.page_buffer(page_size, other_held + (i - from + 1) * Tee::frame_bytes(page_size));
            const uint64_t off = wal_frame_offset(page_size, i);
            if (!pread_full(fd_.fd, f.header, sizeof f.header, off) ||
                !pread_full(fd_.fd, f.page.data(), page_size, off + kWalFrameHeaderSize))
                return false;
            out.push_back(std::move(f));
        }
        return true;
    }

private:
    std::string path_;
    Fd fd_;
    bool opened_ = false;
};

inline bool stat_file(const std::string& path, struct stat& st) { return ::stat(path.c_str(), &st) == 0; }

inline int64_t mtime_ns(const struct stat& st) {
    return static_cast<int64_t>(st.st_mtim.tv_sec) * 1'000'000'000 + st.st_mtim.tv_nsec;
}

}  // namespace bottomless::replicator
