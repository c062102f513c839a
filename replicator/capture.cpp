// Capture: what the VFS reports (commits, WAL restarts, checkpoints), the
// frames of committed transactions taken from the tee (or the WAL) into
// pending transactions, the WAL's restart guard, and sync commits. An
// epoch's end with frames not yet durable: capture_epochs.cpp.
#include "replicator/replicator.h"
#include "replicator/replicator_internal.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <stdexcept>
#include <thread>

#include "replicator/state_file.h"
#include "s3/log.h"

namespace bottomless::replicator {

void Replicator::note_commit(uint32_t salt1, uint32_t salt2, uint64_t frame, uint32_t page_size) {
    if (!enabled_) return;
    std::lock_guard olock(obs_mu_);
    note_commit_locked(salt1, salt2, frame, page_size);
}

void Replicator::note_commit_locked(uint32_t salt1, uint32_t salt2, uint64_t frame, uint32_t page_size) {
    if (page_size) noted_page_size_.store(page_size);
    if (salt1 == last_noted_salt1_ && salt2 == last_noted_salt2_ && frame == last_noted_frame_) return;
    uint64_t frames = (salt1 == last_noted_salt1_ && salt2 == last_noted_salt2_ && frame > last_noted_frame_)
                          ? frame - last_noted_frame_
                          : frame;
    last_noted_salt1_ = salt1;
    last_noted_salt2_ = salt2;
    last_noted_frame_ = frame;
    if (frame == 0) return;  // a restart without frames yet: nothing to ship
    last_commit_seen_ = WalPosition{salt1, salt2, frame, 0, 0};
    Commit c{salt1, salt2, frame, now_us(), noted_index_.load() + 1};
    commits_.push_back(c);
    int64_t zero = 0;
    oldest_unshipped_us_.compare_exchange_strong(zero, c.time_us);
    noted_index_.store(c.index);
    unshipped_bytes_.fetch_add(frames * (page_size ? page_size : 4096));
    schedule_commit();  // the pool's mutex is below obs_mu_ (replicator.h)
}

bool Replicator::restart_allowed() const {
    if (!enabled_) return true;
    return durable_index_.load() >= noted_index_.load() && !snapshot_active_.load();
}

bool Replicator::restart_allowed(uint32_t salt1, uint32_t salt2, uint64_t mx_frame) const {
    if (!enabled_) return true;
    if (snapshot_active_.load()) return false;  // the snapshot reads WAL frames
    uint64_t salts = (static_cast<uint64_t>(salt1) << 32) | salt2;
    if (mx_frame == 0 || (durable_salts_.load() == salts && durable_frame_.load() >= mx_frame)) return true;
    // Not durable yet: the restart may go ahead if the frames are in memory
    // (the tee, or pending transactions) and fit there; the WAL keeps them
    // otherwise. They are in the checkpointed database file too: SQLite
    // restarts only after a complete checkpoint. Only one epoch at a time
    // may end so: the durable position must be in the epoch that ends, so
    // that after a crash its unshipped frames are read back from their old
    // slots in the WAL file (the state file records how far it went); a
    // second restart would overwrite them with no record, and cost a new
    // generation.
    if (durable_salts_.load() != salts) return false;
    // Other processes write too: their frames are not in the tee. The
    // restart copies the unshipped frames aside (begin_restart), as a
    // follower's does.
    if (area_ && area_->followers()) {
        const uint64_t psz = noted_page_size_.load() ? noted_page_size_.load() : 4096;
        return tail_copy_worth_it(unshipped_bytes_.load(), mx_frame * (psz + kWalFrameHeaderSize),
                                  config_.max_pending_bytes);
    }
    return !tee_.has_hole() && unshipped_bytes_.load() <= config_.max_pending_bytes;
}

void Replicator::check_wal_index(uint32_t salt1, uint32_t salt2, uint64_t mx_frame) {
    if (!enabled_) return;
    std::lock_guard olock(obs_mu_);
    if (last_noted_salt1_ == 0 && last_noted_salt2_ == 0) return;  // nothing observed yet
    bool same_epoch = salt1 == last_noted_salt1_ && salt2 == last_noted_salt2_;
    // A restart we did not see, or a WAL that shrank: frames may have been
    // lost to a writer outside bottomless. Frames it appended in the same
    // epoch are fine: the next observation ships them.
    if ((!same_epoch && !cooperating_restart()) || (same_epoch && mx_frame < last_noted_frame_)) {
        log::debug(path_ + ": at the write lock, the wal-index says salt1 " + std::to_string(salt1) + " frame " +
                   std::to_string(mx_frame) + ", last seen salt1 " + std::to_string(last_noted_salt1_) + " frame " +
                   std::to_string(last_noted_frame_));
        foreign_writer_.store(true);
    }
}

bool Replicator::cooperating_restart() {
    const uint64_t last = (static_cast<uint64_t>(last_noted_salt1_) << 32) | last_noted_salt2_;
    if (own_restart_salts_ == last) return true;  // this process restarted it
    if (!area_) return false;
    uint64_t salts = 0, frame = 0;
    area_->ended(salts, frame);
    // A follower ended the epoch we last saw, at or after our last look: its
    // commits up to there are noted first (their frames are in the WAL's
    // old slots or, once overwritten, in the copy aside; capture_range).
    if (salts != last || frame < last_noted_frame_) return false;
    if (frame > last_noted_frame_) {
        log::debug(path_ + ": another process restarted the WAL after frame " + std::to_string(frame) +
                   " (last seen: " + std::to_string(last_noted_frame_) + ")");
        note_commit_locked(last_noted_salt1_, last_noted_salt2_, frame, 0);
    }
    return true;
}

bool Replicator::note_wal_index() {
    if (!enabled_) return false;
    // The header is read and noted under obs_mu_: every commit this process
    // reports is noted under it too (after its own read, under the write
    // lock), so what is read here is never older than what was noted — a
    // stale read would look like a WAL that shrank or went back an epoch.
    std::lock_guard olock(obs_mu_);
    WalIndexHeader h;
    {
        std::lock_guard shlock(shm_mu_);
        if (!shm0_ || !read_wal_index_settled(shm0_, h)) return false;
    }
    const bool observed = last_noted_salt1_ != 0 || last_noted_salt2_ != 0;
    const bool same_epoch = h.salt1 == last_noted_salt1_ && h.salt2 == last_noted_salt2_;
    if (observed && same_epoch && h.mx_frame < last_noted_frame_ && last_noted_frame_ == sync_ahead_frame_)
        return true;  // a sync commit shipped, not yet in the wal-index (commit_sync)
    if (observed && ((!same_epoch && !cooperating_restart()) || (same_epoch && h.mx_frame < last_noted_frame_))) {
        log::debug(path_ + ": the wal-index says salt1 " + std::to_string(h.salt1) + " frame " +
                   std::to_string(h.mx_frame) + ", last seen salt1 " + std::to_string(last_noted_salt1_) + " frame " +
                   std::to_string(last_noted_frame_));
        foreign_writer_.store(true);
    }
    note_commit_locked(h.salt1, h.salt2, h.mx_frame, h.page_size);
    return true;
}

void Replicator::poll_followers() {
    if (!area_) return;
    const uint64_t c = area_->commits();
    if (c == area_commits_seen_.load()) return;
    // The counter was read first: a commit after that moves it again. Not
    // mapped yet (no connection of ours has read): next time.
    if (note_wal_index()) area_commits_seen_.store(c);
}

namespace {
// Registers first, then asks; takes the registration back when refused
// (replicator.h: why in this order).
template <class Allowed>
bool register_then_ask(std::atomic<int>& active, Allowed allowed) {
    active.fetch_add(1);
    if (allowed()) return true;
    active.fetch_sub(1);
    return false;
}
}  // namespace

bool Replicator::begin_checkpoint() {
    return register_then_ask(checkpoints_active_, [&] { return checkpoint_allowed(); });
}

bool Replicator::begin_checkpoint(uint32_t salt1, uint32_t salt2, uint64_t mx_frame) {
    return register_then_ask(checkpoints_active_, [&] { return checkpoint_allowed(salt1, salt2, mx_frame); });
}

bool Replicator::begin_restart() {
    return register_then_ask(restarts_active_, [&] { return restart_allowed(); });
}

bool Replicator::begin_restart(const WalIndexHeader& h) {
    if (!register_then_ask(restarts_active_, [&] { return restart_allowed(h.salt1, h.salt2, h.mx_frame); }))
        return false;
    const uint64_t salts = (static_cast<uint64_t>(h.salt1) << 32) | h.salt2;
    if (area_ && area_->followers()) {
        // Other processes write into the next epoch: the frames not yet
        // durable go aside now (under the WAL write lock), and the area says
        // where the epoch ended, for whoever leads after this process.
        // From the published position: a process taking over starts from
        // the state file, which may not yet say what this process has made
        // durable since (it is published after the state file is written).
        uint64_t area_salts = 0, durable = 0;
        area_->durable(area_salts, durable);
        if (area_salts != salts) durable = 0;
        if (h.mx_frame > durable) {
            if (Status st = keep_epoch_tail(path_, h, durable); !st) {
                log::warn(path_ + ": a WAL restart waits (its unshipped frames could not be kept aside: " +
                          st.error().message + ")");
                end_restart();
                return false;
            }
            std::lock_guard olock(obs_mu_);
            kept_aside_ = WalPosition{h.salt1, h.salt2, h.mx_frame, 0, 0};
        }
        area_->note_epoch_end(h.salt1, h.salt2, h.mx_frame);
    }
    // Ours: a look at the wal-index before this connection reports the new
    // epoch (a poll, a flush) must not take it for a writer outside bottomless.
    std::lock_guard olock(obs_mu_);
    own_restart_salts_ = salts;
    return true;
}

void Replicator::note_shm(const volatile unsigned char* region0) {
    std::lock_guard shlock(shm_mu_);
    if (region0) {
        shm_users_.fetch_add(1);
        shm0_ = region0;
    } else if (shm_users_.fetch_sub(1) == 1) {
        shm0_ = nullptr;
    }
}

std::optional<WalIndexHeader> Replicator::wal_index_now() const {
    std::lock_guard shlock(shm_mu_);
    WalIndexHeader h;
    if (shm0_ && read_wal_index_settled(shm0_, h)) return h;
    return std::nullopt;
}

void Replicator::note_write_outside_wal() {
    if (!enabled_) return;
    broken_outside_wal_.store(true);
    snapshot_torn_.store(true);
    // No commit is noted in rollback-journal mode: the step that starts the
    // new generation is scheduled here (once until it runs: the fast path).
    if (pool_member_) pool_member_->schedule(Clock::now() + std::chrono::milliseconds(250));
}

void Replicator::note_db_write() {
    if (snapshot_active_.load()) snapshot_torn_.store(true);
}

void Replicator::note_wal_open(bool open) { wal_open_.fetch_add(open ? 1 : -1); }

void Replicator::wake() {
    {
        std::lock_guard cvlock(cv_mu_);
        wake_ = true;
    }
    if (pool_member_) pool_member_->wake();
}

bool Replicator::wal_write_allowed(uint64_t end) {
    if (end > wal_bytes_.load()) wal_bytes_.store(end);
    if (!enabled_ || config_.max_wal_bytes == 0 || end <= config_.max_wal_bytes) return true;
    // Over the budget. Ours to answer only while unshipped frames are what
    // keeps the WAL from restarting; a WAL grown by the application's own
    // long readers or transactions is SQLite's business.
    if (durable_index_.load() >= noted_index_.load()) return true;
    if (!wal_over_budget_.exchange(true)) {
        const std::string m = path_ + ": the WAL has grown past max_wal_bytes (" +
                              std::to_string(config_.max_wal_bytes >> 20) +
                              " MiB) because committed transactions are not in S3 yet (" +
                              std::to_string(unshipped_bytes_.load() >> 20) + " MiB unshipped; check bottomless_status() "
                              "last_error). " +
                              (config_.wal_budget_fail ? "Writes fail with SQLITE_FULL until S3 catches up "
                                                         "(wal_budget_policy=fail)"
                                                       : "Writes go on and the WAL keeps growing "
                                                         "(wal_budget_policy=warn)");
        log::warn(m);
        std::lock_guard slock(status_mu_);
        last_error_ = m;
        last_error_us_ = now_us();
    }
    return !config_.wal_budget_fail;
}

std::optional<WalHeader> Replicator::epoch_header(uint32_t salt1, uint32_t salt2, WalFile& wal) {
    if (epoch_hdr_ && epoch_hdr_->salt1 == salt1 && epoch_hdr_->salt2 == salt2) return epoch_hdr_;
    auto h = tee_.header(salt1, salt2);
    if (!h) h = wal.header();
    if (area_ && (!h || h->salt1 != salt1 || h->salt2 != salt2)) {
        // Another process restarted the WAL: the ended epoch's header went
        // aside with its unshipped frames (keep_epoch_tail).
        WalFile aside(path_ + "-bottomless-frames");
        h = aside.header();
    }
    if (!h || h->salt1 != salt1 || h->salt2 != salt2) return std::nullopt;
    epoch_hdr_ = h;
    return h;
}

Status Replicator::frames_to_txns(const WalHeader& hdr, uint64_t from, std::vector<TeeFrame>& frames, WalPosition& pos,
                                  std::vector<PendingTxn>& out, int64_t commit_us, uint64_t commit_index) {
    const uint32_t psz = hdr.page_size;
    const uint64_t to = from + frames.size() - 1;
    uint32_t s1 = pos.cksum1, s2 = pos.cksum2;
    PendingTxn cur;
    for (uint64_t i = from; i <= to; ++i) {
        TeeFrame& f = frames[static_cast<size_t>(i - from)];
        if (f.page.size() != psz || !verify_frame(hdr, f.header, reinterpret_cast<const unsigned char*>(f.page.data()), s1, s2))
            return make_error(ErrorKind::Corrupt,
                              "WAL frame " + std::to_string(i) + " does not continue the checksum chain", "WalChain");
        WalFrameHeader fh = parse_frame_header(f.header);
        cur.frames.push_back(SegmentFrame{fh.pgno, std::move(f.page)});
        cur.bytes += psz;
        if (fh.is_commit()) {
            cur.db_pages = fh.db_size;
            cur.commit_us = commit_us;
            cur.commit_index = i == to ? commit_index : commit_index - 1;
            cur.end = WalPosition{hdr.salt1, hdr.salt2, i, s1, s2};
            pos = cur.end;
            out.push_back(std::move(cur));
            cur = PendingTxn{};
        }
    }
    if (!cur.frames.empty())
        return make_error(ErrorKind::Corrupt, "WAL frame " + std::to_string(to) + " does not end a transaction",
                          "WalChain");
    return {};
}

Status Replicator::capture_range(const WalHeader& hdr, uint64_t from, uint64_t to, WalFile& wal, int64_t commit_us,
                                 uint64_t commit_index) {
    std::vector<TeeFrame> frames;
    std::vector<PendingTxn> txns;
    WalPosition pos = captured_;
    Status st = make_error(ErrorKind::Corrupt, "not in the tee", "TeeMiss");
    if (tee_.take(hdr.salt1, hdr.salt2, from, to, frames)) {
        st = frames_to_txns(hdr, from, frames, pos, txns, commit_us, commit_index);
        if (!st) log::debug(path_ + ": tee frames " + std::to_string(from) + ".." + std::to_string(to) +
                            " fail the checksum chain; reading them from the WAL");
    }
    // Frames this process did not write, or did not keep (memory): the WAL
    // still holds them (a restart waits until they are durable, or, with
    // other processes, copies them aside first: keep_epoch_tail).
    auto read_from = [&](WalFile& file) {
        frames.clear();
        txns.clear();
        pos = captured_;
        if (!file.read(hdr.page_size, from, to, frames, tee_, held_outside_tee()))
            return Status(make_error(ErrorKind::Corrupt, "WAL frames " + std::to_string(from) + ".." +
                                                             std::to_string(to) + " are missing or short",
                                     "WalShort"));
        wal_frames_read_.fetch_add(to - from + 1);
        return frames_to_txns(hdr, from, frames, pos, txns, commit_us, commit_index);
    };
    if (!st) st = read_from(wal);
    if (!st && area_) {
        WalFile aside(path_ + "-bottomless-frames");
        if (Status again = read_from(aside); again) {
            log::debug(path_ + ": frames " + std::to_string(from) + ".." + std::to_string(to) +
                       " of an ended WAL epoch read from the copy aside");
            st = again;
        }
    }
    if (!st) return st;
    uint64_t bytes = 0;
    for (auto& t : txns) {
        bytes += t.bytes;
        pending_.push_back(std::move(t));
    }
    pending_bytes_ += bytes;
    note_memory();
    captured_ = pos;
    return {};
}

bool Replicator::fits_in_memory(const WalHeader& hdr, uint64_t from, uint64_t to) {
    // Frames taken from the tee only change hands; frames read from the WAL
    // add to the memory held, which stays within held_limit (the cap less
    // room for one encoded segment). They are read into the tee's spare
    // buffers first (counted in memory_bytes, not in held_bytes), so the
    // spares do not count here.
    if (tee_.holds(hdr.salt1, hdr.salt2, from, to)) return true;
    const uint64_t need = (to - from + 1) * Tee::frame_bytes(hdr.page_size);
    const uint64_t limit = held_limit(config_);
    const uint64_t held = held_bytes();
    if (held + need <= limit) return true;
    // Pending transactions or a segment under way free room as they ship.
    if (!pending_.empty() || inflight_) return false;
    // Nothing else will: the tee's newer frames give way (the WAL keeps
    // them too). Past that, only a transaction larger than the room left
    // is read whole, alone (docs/CONFIG.md, max_pending_bytes).
    tee_.shed(hdr.salt1, hdr.salt2, to, held + need - limit);
    return true;
}

bool Replicator::epoch_left_behind() const {
    // A safety net: the captured epoch's last frames would be skipped. The
    // restart that ended it is noted (cooperating_restart) before the new
    // epoch, so this never holds unless an observation was missed.
    if (!area_) return false;
    uint64_t salts = 0, frame = 0;
    area_->ended(salts, frame);
    return salts == ((static_cast<uint64_t>(captured_.salt1) << 32) | captured_.salt2) && frame > captured_.frame;
}

Status Replicator::capture() {
    std::deque<Commit> todo;
    {
        std::lock_guard olock(obs_mu_);
        todo.swap(commits_);
    }
    capture_held_back_ = false;
    if (todo.empty()) return {};
    WalFile wal(wal_path_);
    Status result;
    while (!todo.empty()) {
        Commit c = todo.front();
        if (c.salt1 != captured_.salt1 || c.salt2 != captured_.salt2) {
            if (epoch_left_behind()) {
                request_snapshot("another process restarted the WAL after frame " +
                                 std::to_string(captured_.frame) + " of the epoch without this process observing "
                                 "its last frames");
                todo.clear();
                break;
            }
            auto hdr = epoch_header(c.salt1, c.salt2, wal);
            if (!hdr) {
                request_snapshot("the WAL was restarted before its frames could be read (a writer outside bottomless?)");
                todo.clear();
                break;
            }
            if (page_size_ && hdr->page_size != page_size_) {
                request_snapshot("the page size changed");
                todo.clear();
                break;
            }
            page_size_ = hdr->page_size;
            captured_ = WalPosition{hdr->salt1, hdr->salt2, 0, hdr->cksum1, hdr->cksum2};
        }
        if (c.frame <= captured_.frame) {
            // Already covered (by a snapshot or an earlier observation).
            if (!pending_.empty()) pending_.back().commit_index = std::max(pending_.back().commit_index, c.index);
            else if (!inflight_) {
                uint64_t d = durable_index_.load();
                if (c.index > d) durable_index_.store(c.index);
            }
            todo.pop_front();
            continue;
        }
        auto hdr = epoch_header(captured_.salt1, captured_.salt2, wal);
        if (!hdr) {
            request_snapshot("the WAL was restarted before its frames could be read (a writer outside bottomless?)");
            todo.clear();
            break;
        }
        if (!fits_in_memory(*hdr, captured_.frame + 1, c.frame)) {
            capture_held_back_ = true;  // the WAL keeps the rest: a backlog
            break;
        }
        if (pending_.empty() && !inflight_) first_pending_time_ = Clock::now();
        auto st = capture_range(*hdr, captured_.frame + 1, c.frame, wal, c.time_us, c.index);
        if (!st) {
            request_snapshot("WAL continuity broken: " + st.error().message);
            todo.clear();
            result = st;
            break;
        }
        todo.pop_front();
    }
    if (!todo.empty()) {
        std::lock_guard olock(obs_mu_);
        commits_.insert(commits_.begin(), todo.begin(), todo.end());
    }
    tee_.trim(captured_.salt1, captured_.salt2, captured_.frame);
    tee_.captured_through(captured_.salt1, captured_.salt2, captured_.frame);
    return result;
}

void testing_exit_after_sync_uploads(int n, bool before_state) {
    g_exit_before_state.store(before_state);
    g_exit_after_sync_uploads.store(n);
}

Status Replicator::commit_sync(uint64_t frame, const unsigned char* frame_header, const unsigned char* page,
                               uint32_t page_size) {
    if (!enabled_) return {};
    std::lock_guard net(net_mu_);
    Lock lock(upload_mu_);
    auto deadline = Clock::now() + config_.sync_timeout;
    if (Status st = check_bucket_first(); !st) return st;
    if (need_snapshot_ || generation_.empty()) {
        {
            std::lock_guard olock(obs_mu_);
            commits_.clear();
        }
        if (auto st = take_snapshot(lock); !st) return st;
    }
    (void)capture();
    if (need_snapshot_) {
        if (auto st = take_snapshot(lock); !st) return st;
    }
    // Every request for this commit ends by its deadline, also one that a
    // server trickles or hangs (the retry policy alone would only stop
    // between attempts). A snapshot above is bounded by the retry budget
    // instead: cut at sync_timeout, a large one could never complete.
    s3::DeadlineScope request_deadline(deadline);
    WalFile wal(wal_path_);
    WalFrameHeader fh = parse_frame_header(frame_header);
    auto hdr = epoch_header(fh.salt1, fh.salt2, wal);
    if (!hdr || hdr->page_size != page_size)
        return make_error(ErrorKind::Corrupt, "the WAL header does not match the frame being committed", "WalChain");
    if (captured_.salt1 != hdr->salt1 || captured_.salt2 != hdr->salt2) {
        if (epoch_left_behind()) {
            request_snapshot("another process restarted the WAL past what was captured");
            return make_error(ErrorKind::Corrupt, "sync commit refused: the previous WAL epoch's last frames were "
                                                  "not captured (a new generation starts)", "WalChain");
        }
        captured_ = WalPosition{hdr->salt1, hdr->salt2, 0, hdr->cksum1, hdr->cksum2};
        page_size_ = page_size;
    }
    // This transaction's frames before the commit frame (from the tee, or
    // the file when the tee lacks them or what it holds does not continue
    // the chain: frames of this process's own refused or rolled-back
    // transaction, in slots another process has since written), then the
    // commit frame from memory.
    const uint64_t from = captured_.frame + 1;
    std::vector<PendingTxn> txn;
    WalPosition pos = captured_;
    auto assemble = [&](bool from_tee) -> Status {
        std::vector<TeeFrame> frames;
        txn.clear();
        pos = captured_;
        if (frame > from && !(from_tee && tee_.take(hdr->salt1, hdr->salt2, from, frame - 1, frames))) {
            if (from_tee) return make_error(ErrorKind::Corrupt, "not in the tee", "TeeMiss");
            if (!wal.read(page_size, from, frame - 1, frames, tee_, held_outside_tee()))
                return make_error(ErrorKind::Corrupt, "WAL frames before " + std::to_string(frame) + " are missing",
                                  "WalShort");
            wal_frames_read_.fetch_add(frame - from);
        }
        TeeFrame commit;
        std::memcpy(commit.header, frame_header, kWalFrameHeaderSize);
        commit.page = PageBuf(std::string_view(reinterpret_cast<const char*>(page), page_size));
        frames.push_back(std::move(commit));
        return frames_to_txns(*hdr, from, frames, pos, txn, now_us(), 0);
    };
    Status assembled = assemble(true);
    if (!assembled) assembled = assemble(false);
    if (!assembled) {
        log::warn(path_ + ": sync commit of frames " + std::to_string(from) + ".." + std::to_string(frame) +
                  " (WAL epoch salt1 " + std::to_string(hdr->salt1) + "): " + assembled.error().message);
        request_snapshot("sync commit: WAL checksum chain broken");
        return assembled;
    }
    uint64_t idx;
    {
        std::lock_guard olock(obs_mu_);
        idx = noted_index_.load() + 1;
        noted_index_.store(idx);
    }
    // An earlier commit not yet observed (should not happen in sync mode)
    // stays its own transaction, completing the previous observation.
    for (auto& x : txn) x.commit_index = idx - 1;
    txn.back().commit_index = idx;
    WalPosition before = captured_;
    for (auto& x : txn) {
        pending_bytes_ += x.bytes;
        pending_.push_back(std::move(x));
    }
    captured_ = pending_.back().end;
    if (pending_.size() == 1 && !inflight_) first_pending_time_ = Clock::now();

    // Should the process die once the segment is stored and before the state
    // records it, the next start must ask the bucket (startup.cpp).
    sync_pending_ = true;
    write_state_file(false);
    auto st = upload_pending(lock, true, deadline);
    if (st && durable_index_.load() >= idx) {
        // The write-lock release will report this same commit: make it a no-op.
        std::lock_guard olock(obs_mu_);
        last_noted_salt1_ = hdr->salt1;
        last_noted_salt2_ = hdr->salt2;
        last_noted_frame_ = frame;
        last_commit_seen_ = WalPosition{hdr->salt1, hdr->salt2, frame, 0, 0};
        // Until the committing connection writes the frame and releases the
        // write lock, the wal-index says less: a look at it meanwhile (a
        // poll) is not a WAL that shrank.
        sync_ahead_frame_ = frame;
    }
    if (!st || durable_index_.load() < idx) {
        // The transaction will not commit locally; whether S3 kept it is
        // unknown, so this generation must not be appended to again.
        Error e = st.ok() ? make_error(ErrorKind::Transport, "not durable in time", "Timeout") : st.error();
        e.message = "sync commit refused: the transaction could not be made durable in S3 within " +
                    std::to_string(config_.sync_timeout.count()) + " ms: " + e.message;
        record_error(e);
        captured_ = before;
        pending_.clear();
        pending_bytes_ = 0;
        inflight_.reset();
        segment_bytes_ = 0;
        request_snapshot("a sync commit failed");
        retry_after_ = {};
        return e;
    }
    if (!g_exit_before_state.load() && g_exit_after_sync_uploads.load() > 0 &&
        g_exit_after_sync_uploads.fetch_sub(1) == 1)
        ::_exit(3);
    return {};
}

}  // namespace bottomless::replicator
