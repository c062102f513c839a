// A WAL epoch that ends with frames not yet durable (SQLite restarts,
// truncates or deletes the WAL): how far it went is recorded for a crash,
// its unshipped frames are kept in memory or copied aside before the new
// epoch overwrites their slots, or the writer waits for S3 (bounded).
#include "replicator/replicator.h"
#include "replicator/replicator_internal.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <thread>

#include "replicator/state_file.h"
#include "s3/log.h"

namespace bottomless::replicator {

Status Replicator::record_epoch_end(const char* why, bool copy_aside) {
    // The WAL's epoch goes (restarted, truncated, deleted) while some frames
    // are only in memory. Remember how far it went; whenever the durable
    // position is in an epoch that has ended with frames after it, the state
    // file says so (restart_record()), so that after a crash the next start
    // reads them back from the WAL file's old slots — or, if they are
    // overwritten, knows it cannot prove the history. Recorded now, and
    // again by every state write until they are durable: the durable
    // position may reach that epoch only later (an upload in flight).
    WalPosition lost;
    {
        std::lock_guard olock(obs_mu_);
        lost = last_commit_seen_;
    }
    if (lost.frame == 0) return {};
    auto it = std::find_if(ended_epochs_.begin(), ended_epochs_.end(),
                           [&](const WalPosition& e) { return e.salt1 == lost.salt1 && e.salt2 == lost.salt2; });
    if (it != ended_epochs_.end()) it->frame = std::max(it->frame, lost.frame);
    else ended_epochs_.push_back(WalPosition{lost.salt1, lost.salt2, lost.frame, 0, 0});
    while (ended_epochs_.size() > 16) ended_epochs_.pop_front();
    const WalPosition record = restart_record();
    if (copy_aside && record.frame && page_size_ && record.salt1 == durable_.salt1 && record.salt2 == durable_.salt2) {
        preserve_to_.store(wal_frame_offset(page_size_, record.frame + 1));
        preserve_salts_.store((static_cast<uint64_t>(record.salt1) << 32) | record.salt2);
        preserve_from_.store(wal_frame_offset(page_size_, durable_.frame + 1));  // the new epoch writes from frame 1
        wake();  // the uploader copies them aside before the new epoch gets there (usually)
    }
    if (generation_.empty() || record == written_record_) return {};
    if (!write_state_file(false)) {
        // An old state without the record would "prove" a history that lacks
        // these frames: remove it, or refuse the restart.
        if (::unlink(state_path_.c_str()) != 0 && errno != ENOENT)
            return make_error(ErrorKind::Io, std::string("cannot ") + why + ": cannot record it in " + state_path_,
                              "StateFile");
    }
    return {};
}

WalPosition Replicator::restart_record() const {
    for (const WalPosition& e : ended_epochs_)
        if (e.salt1 == durable_.salt1 && e.salt2 == durable_.salt2 && e.frame > durable_.frame) return e;
    return WalPosition{};
}

Status copy_frames_aside(const std::string& wal_path, const std::string& out_path, uint64_t from, uint64_t to,
                         bool with_header) {
    Fd in(::open(wal_path.c_str(), O_RDONLY | O_CLOEXEC));
    Fd out(::open(out_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0644));
    if (in.fd < 0 || out.fd < 0)
        return make_error(ErrorKind::Io, "cannot open " + (in.fd < 0 ? wal_path : out_path) + ": " + std::strerror(errno));
    std::vector<unsigned char> buf(std::max<uint64_t>(kWalHeaderSize, std::min<uint64_t>(to - from, 1u << 20)));
    auto copy = [&](uint64_t off, size_t n) {
        return pread_full(in.fd, buf.data(), n, off) && pwrite_full(out.fd, buf.data(), n, off);
    };
    uint64_t off = from;
    // In the kernel where it can (no copy through user space); read and
    // written here otherwise (another file system, an old kernel).
    while (off < to) {
        loff_t in_off = static_cast<loff_t>(off), out_off = static_cast<loff_t>(off);
        const ssize_t n = ::copy_file_range(in.fd, &in_off, out.fd, &out_off, static_cast<size_t>(to - off), 0);
        if (n <= 0) break;
        off += static_cast<uint64_t>(n);
    }
    while (off < to) {
        const size_t n = static_cast<size_t>(std::min<uint64_t>(buf.size(), to - off));
        if (!copy(off, n)) return make_error(ErrorKind::Io, "cannot copy frames to " + out_path + ": " + std::strerror(errno));
        off += n;
    }
    if (with_header && !copy(0, kWalHeaderSize))
        return make_error(ErrorKind::Io, "cannot copy the WAL header to " + out_path + ": " + std::strerror(errno));
    return {};
}

Status keep_epoch_tail(const std::string& db_path, const WalIndexHeader& h, uint64_t durable_frame) {
    if (h.mx_frame <= durable_frame || h.page_size == 0) return {};
    const auto t0 = std::chrono::steady_clock::now();
    Status st = copy_frames_aside(db_path + "-wal", db_path + "-bottomless-frames",
                             wal_frame_offset(h.page_size, durable_frame + 1),
                             wal_frame_offset(h.page_size, h.mx_frame + 1), /*with_header=*/true);
    log::debug(db_path + ": WAL restart: frames " + std::to_string(durable_frame + 1) + ".." + std::to_string(h.mx_frame) +
               " kept aside in " + std::to_string(std::chrono::duration_cast<std::chrono::microseconds>(
                                                      std::chrono::steady_clock::now() - t0).count()) + " us");
    return st;
}

void Replicator::preserve_ended_frames() noexcept {
    try {
        // The range was fixed when the epoch ended (record_epoch_end). The
        // uploader or the writer copies it, one at a time: the range stays
        // set until the copy is done, so a writer whose frames reach it meets
        // it here and waits for the uploader's copy instead of overwriting
        // what is being read. What became durable meanwhile is copied too,
        // harmlessly.
        std::lock_guard plock(preserve_mu_);
        const uint64_t from = preserve_from_.load();
        if (from == UINT64_MAX) return;
        const uint64_t to = preserve_to_.load();
        const uint64_t salts = preserve_salts_.load();
        // Done with this range whatever happens below (a newer epoch's range
        // set meanwhile stays owed).
        struct Done {
            std::atomic<uint64_t>& slot;
            uint64_t from;
            ~Done() {
                uint64_t expected = from;
                slot.compare_exchange_strong(expected, UINT64_MAX);
            }
        } done{preserve_from_, from};
        if (from >= to) return;
        if (durable_salts_.load() != salts) return;  // durable in a later epoch: nothing left to keep
        // The WAL still holds them: the new epoch is only now reaching their
        // slots. Copied at the same offsets (a sparse file), so recovery
        // reads either file the same way; stale content from an older epoch
        // fails its salts.
        const std::string out_path = path_ + "-bottomless-frames";
        if (::access(wal_path_.c_str(), F_OK) != 0 && errno == ENOENT) return;  // deleted: nothing left to copy
        if (Status st = copy_frames_aside(wal_path_, out_path, from, to); !st) {
            // Only the cost of a crash changes: the next start may need a new generation.
            log::warn(path_ + ": could not keep the ended WAL epoch's unshipped frames aside: " + st.error().message);
            return;
        }
        log::debug(path_ + ": " + std::to_string(to - from) + " bytes of the ended WAL epoch's frames, not yet in S3, "
                   "copied to " + out_path + " before the new epoch overwrites them");
    } catch (...) {
    }
}

Status Replicator::flush_before_wal_loss(const char* why, std::chrono::milliseconds timeout) {
    if (!enabled_ || restart_allowed()) return {};
    if (area_) {
        // Other processes write: begin_restart copied the epoch's unshipped
        // frames aside; the uploader ships them from the WAL or from there
        // (capture_range). Only the record for a crash is left to make.
        bool kept;
        {
            std::lock_guard olock(obs_mu_);
            kept = kept_aside_.frame && kept_aside_.salt1 == last_commit_seen_.salt1 &&
                   kept_aside_.salt2 == last_commit_seen_.salt2 && kept_aside_.frame >= last_commit_seen_.frame;
        }
        if (kept) {
            Lock lock(upload_mu_);
            return record_epoch_end(why, /*copy_aside=*/false);
        }
    }
    // SQLite only restarts, truncates or deletes the WAL after a complete
    // checkpoint, so every committed frame is already in the (synced)
    // database file. The frames not yet durable stay in memory: in the tee
    // (nothing to do here but record how far the epoch went), or, when the
    // tee lacks some, read into pending transactions now. Only when memory
    // is full does the writer wait for the network.
    {
        Lock lock(upload_mu_);
        uint32_t s1, s2;
        uint64_t last;
        bool one_epoch = true;
        {
            std::lock_guard olock(obs_mu_);
            s1 = last_noted_salt1_;
            s2 = last_noted_salt2_;
            last = last_noted_frame_;
            for (const Commit& c : commits_) one_epoch = one_epoch && c.salt1 == s1 && c.salt2 == s2;
        }
        const bool same = captured_.salt1 == s1 && captured_.salt2 == s2;
        const uint64_t from = same ? captured_.frame + 1 : 1;
        bool in_memory = one_epoch && tee_.holds(s1, s2, from, last) && (same || tee_.header(s1, s2));
        if (!in_memory) {
            (void)capture();  // what the tee lacks is read from the WAL here (rare: memory was full)
            std::lock_guard olock(obs_mu_);
            in_memory = commits_.empty();
        }
        if (in_memory) {
            if (Status st = record_epoch_end(why); !st) return st;
            tee_.pin(s1, s2);  // the uploader must not shed what only the tee will hold
            return {};
        }
    }
    wake();
    auto deadline = Clock::now() + timeout;
    while (!restart_allowed()) {
        {
            std::lock_guard net(net_mu_);
            Lock lock(upload_mu_);
            retry_after_ = {};
            auto st = step(lock, true);
            bool all_captured;
            {
                std::lock_guard olock(obs_mu_);
                all_captured = commits_.empty();
            }
            if (restart_allowed() || all_captured) {
                if (Status rec = record_epoch_end(why); !rec) return rec;
                break;
            }
            if (Clock::now() >= deadline)
                return make_error(ErrorKind::Transport,
                                  std::string("cannot ") + why + ": committed transactions are not yet in S3" +
                                      (st.ok() ? "" : " (" + st.error().describe() + ")"),
                                  "Unshipped");
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    return {};
}

std::atomic<int> g_exit_after_sync_uploads{0};
std::atomic<bool> g_exit_before_state{false};

}  // namespace bottomless::replicator
