// The start-up decision (replicator.h, docs/SEMANTICS.md "At open"):
// continue the generation the local files prove, restore, or start a new
// generation; and the deferred check of the bucket after an offline open.
#include "replicator/replicator.h"
#include "replicator/replicator_internal.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "replicator/bucket.h"
#include "replicator/restore.h"
#include "replicator/startup_decision.h"
#include "replicator/state_file.h"
#include "s3/log.h"

namespace bottomless::replicator {


void Replicator::merge_shared_end(std::optional<LocalState>& state) const {
    // Several processes: another process's WAL restart may have ended the
    // recorded epoch, with frames after the recorded position, once the state
    // file was written (shared_area.h, `ended`). Recorded as this process's
    // own restarts record theirs: the frames are then read back from their
    // old slots or the copy aside (keep_epoch_tail), or the history is not
    // proven.
    if (!area_ || !state) return;
    uint64_t salts = 0, frame = 0;
    area_->ended(salts, frame);
    const WalPosition& at = state->position;
    if (salts != ((static_cast<uint64_t>(at.salt1) << 32) | at.salt2) || frame < at.frame) return;
    const WalPosition& r = state->restarted;
    if (r.salt1 == at.salt1 && r.salt2 == at.salt2 && r.frame >= frame) return;
    // (Equal: the epoch ended exactly at the recorded position; a WAL the
    // restart emptied (TRUNCATE) is then proven too: prove_local.)
    state->restarted = WalPosition{at.salt1, at.salt2, frame, 0, 0};
    log::debug(path_ + ": another process ended the recorded WAL epoch at frame " + std::to_string(frame) +
               " (recorded position: frame " + std::to_string(at.frame) + ")");
}

bool Replicator::start_offline() {
    auto state = read_state_file(state_path_);
    merge_shared_end(state);
    std::shared_ptr<const Cipher> cipher;
    LocalProof proof;
    OfflineFacts f;
    f.initial_replication = config_.initial_replication;
    f.bucket = config_.bucket;
    f.db_id = config_.db_id;
    f.state = state ? &*state : nullptr;
    // The key's id, derived locally (a passphrase from the KDF parameters
    // the state file recorded).
    f.key_id = [&]() -> std::optional<std::string> {
        if (config_.encryption.kind() == EncryptionSecret::Kind::Key) {
            cipher = Cipher::from_key(config_.encryption.material());
        } else if (config_.encryption.kind() == EncryptionSecret::Kind::Passphrase) {
            if (state->kdf.empty()) return std::nullopt;
            auto kdf = parse_kdf(state->kdf, state_path_);
            if (!kdf) return std::nullopt;
            auto c = Cipher::from_passphrase(config_.encryption.material(), *kdf);
            if (!c) return std::nullopt;
            cipher = std::move(c).value();
        }
        return cipher ? cipher->key_id() : std::string();
    };
    f.proven = [&] {
        proof = prove_local(*state, path_, wal_path_, takeover_ ? live_wal_index() : std::nullopt);
        return proof.proven;
    };
    if (std::string why = why_not_offline(f); !why.empty()) {
        log::debug(path_ + ": asking the bucket at open: " + why + (proof.why.empty() ? "" : " (" + proof.why + ")"));
        return false;
    }

    cipher_ = std::move(cipher);
    kdf_text_ = state->kdf;
    lineage_ = state->lineage;
    if (state->clean_close) state_on_disk_ = std::make_shared<const LocalState>(*state);
    continue_from(*state, proof);
    // Until the uploader has seen the bucket agree, nothing is uploaded.
    deferred_check_ = true;
    log::info("continuing generation " + generation_ + " at segment " + std::to_string(seq_) +
              " without asking S3 (the local files prove it); the bucket is checked before the first upload");
    return true;
}

void Replicator::continue_from(const LocalState& state, LocalProof& proof) {
    generation_ = state.generation;
    seq_ = state.seq;
    prev_sha256_ = state.prev_sha256;
    captured_ = state.position;
    if (proof.page_size) page_size_ = proof.page_size;
    mark_durable(state.position, 0);
    if (!proof.recovered.empty()) {
        // Frames the recorded epoch still had unshipped when the WAL
        // restarted and the process died: read back from the WAL file,
        // shipped before the new epoch's. (Commit times: now, the moment
        // bottomless observes them, as for any commit.)
        ended_epochs_.push_back(state.restarted);  // recorded again until they are durable
        // The current epoch will overwrite their old slots: keep them aside
        // for the next start, should this run die before they are durable.
        if (proof.recovered_from_wal && proof.page_size)
            if (Status st = copy_frames_aside(wal_path_, path_ + "-bottomless-frames",
                                              wal_frame_offset(proof.page_size, state.position.frame + 1),
                                              wal_frame_offset(proof.page_size, state.restarted.frame + 1));
                !st)
                log::warn(path_ + ": " + st.error().message);
        const int64_t t = now_us();
        uint64_t bytes = 0;
        for (RecoveredTxn& r : proof.recovered) {
            PendingTxn p;
            p.frames = std::move(r.frames);
            p.db_pages = r.db_pages;
            p.commit_us = t;
            p.end = r.end;
            p.bytes = r.bytes;
            bytes += r.bytes;
            captured_ = r.end;
            pending_.push_back(std::move(p));
        }
        pending_bytes_ += bytes;
        unshipped_bytes_.fetch_add(bytes);
        oldest_unshipped_us_.store(t);
        first_pending_time_ = Clock::now();
        log::info(path_ + ": recovered " + std::to_string(proof.recovered.size()) +
                  " transaction(s) that a WAL restart had left unshipped (frames " +
                  std::to_string(state.position.frame + 1) + ".." + std::to_string(captured_.frame) +
                  " of the previous WAL epoch)");
    }
    // Frames committed locally but never shipped (a crash): ship them now.
    // While other processes may have the file open, "committed" is what the
    // wal-index says, not the scan: a process killed after writing a commit
    // frame but before publishing it in the wal-index rolled back (the next
    // writer overwrites those frames), and shipping it would put a
    // transaction that never happened into the bucket. The first look at
    // the wal-index (the uploader's, as soon as it is mapped) notes them.
    if ((proof.salt1 || proof.salt2) && proof.salt1 == state.position.salt1 && proof.salt2 == state.position.salt2) {
        // The WAL was still in the recorded epoch: what the local files were
        // proven to hold is what has been observed, so a later look at the
        // wal-index that finds another epoch is a restart to account for
        // (another process's, whose unshipped frames it copied aside:
        // cooperating_restart), never a silent jump over the epoch's last
        // frames. (After a restart the proof recovered the ended epoch
        // already; the new epoch's salts are then taken from the wal-index,
        // which may be ahead of the file's header.)
        std::lock_guard olock(obs_mu_);
        if (last_noted_salt1_ == 0 && last_noted_salt2_ == 0) {
            last_noted_salt1_ = proof.salt1;
            last_noted_salt2_ = proof.salt2;
            last_noted_frame_ = proof.unshipped_from;
        }
    }
    if (proof.last_commit_frame > proof.unshipped_from) {
        if (area_ && area_->followers()) poll_at_start_ = true;
        else note_commit(proof.salt1, proof.salt2, proof.last_commit_frame, proof.page_size);
    }
}

std::optional<Replicator::BucketEnd> Replicator::read_bucket_end(const GenerationInfo& g) {
    const auto& bucket = config_.bucket;
    const auto& db_id = config_.db_id;
    // Where the bucket's history of `g` ends: its last object's end position
    // and trailer (the next segment's prev_sha256).
    const std::string key = g.last_seq ? segment_key(db_id, g.id, g.last_seq) : snapshot_key(db_id, g.id);
    uint64_t size = g.snapshot_bytes;
    BucketEnd out;
    if (g.last_seq) {
        auto info = client_->head_object(bucket, key);
        if (!info) return std::nullopt;
        size = info->size;
        auto h = read_segment_header(*client_, bucket, key, size);
        if (!h || h->generation != g.id || h->seq != g.last_seq) return std::nullopt;
        out.position = h->end;
    } else {
        auto h = read_snapshot_header(*client_, bucket, key, size);
        if (!h || h->generation != g.id) return std::nullopt;
        out.position = h->position;
    }
    if (size < 32) return std::nullopt;
    auto trailer = client_->get_object(bucket, key, s3::ByteRange{size - 32, 32});
    if (!trailer || trailer->size() != 32) return std::nullopt;
    out.prev_sha256 = s3::to_hex(reinterpret_cast<const unsigned char*>(trailer->data()), trailer->size());
    return out;
}

std::optional<LocalState> Replicator::bucket_end_held_locally(const GenerationInfo& g) {
    const auto& bucket = config_.bucket;
    const auto& db_id = config_.db_id;
    auto bend = read_bucket_end(g);
    if (!bend) return std::nullopt;
    const WalPosition& end = bend->position;

    // Does the local WAL hold that very position: same epoch, a commit frame
    // there with the same running checksum (compared as the bucket stores
    // it: masked under encryption)?
    auto scan = scan_wal_file(wal_path_);
    if (scan && takeover_)
        if (auto live = live_wal_index()) cap_to_wal_index(*scan, path_, *live);
    if (!scan || !scan->has_header || scan->header.salt1 != end.salt1 || scan->header.salt2 != end.salt2 ||
        end.frame > scan->last_commit_frame) {
        log::info(path_ + ": the local WAL does not hold where generation " + g.id + " ends (segment " +
                  std::to_string(g.last_seq) + ", WAL epoch salt1 " + std::to_string(end.salt1) + " frame " +
                  std::to_string(end.frame) + "); the WAL is " +
                  (scan && scan->has_header ? "at salt1 " + std::to_string(scan->header.salt1) + ", last commit frame " +
                                                  std::to_string(scan->last_commit_frame)
                                            : std::string("empty")));
        return std::nullopt;
    }
    WalPosition local{end.salt1, end.salt2, end.frame, scan->header.cksum1, scan->header.cksum2};
    if (end.frame > 0) {
        Fd fd(::open(wal_path_.c_str(), O_RDONLY | O_CLOEXEC));
        unsigned char fh[kWalFrameHeaderSize];
        if (fd.fd < 0 || !pread_full(fd.fd, fh, sizeof fh, wal_frame_offset(scan->header.page_size, end.frame)))
            return std::nullopt;
        auto h = parse_frame_header(fh);
        if (!h.is_commit()) return std::nullopt;
        local.cksum1 = h.cksum1;
        local.cksum2 = h.cksum2;
    }
    if (!((cipher_ ? cipher_->mask(local, db_id, g.id) : local) == end)) return std::nullopt;
    LocalState st;
    st.bucket = bucket;
    st.db_id = db_id;
    st.generation = g.id;
    st.seq = g.last_seq;
    st.prev_sha256 = bend->prev_sha256;
    st.position = local;
    return st;
}

bool Replicator::bring_in_last_segment(const GenerationInfo& g) {
    const auto& bucket = config_.bucket;
    const auto& db_id = config_.db_id;
    if (!config_.sync || g.last_seq == 0) return false;
    const std::string key = segment_key(db_id, g.id, g.last_seq);
    auto info = client_->head_object(bucket, key);
    if (!info || info->size > (64u << 20)) return false;  // a sync commit's segment is one transaction
    auto bytes = client_->get_object(bucket, key);
    if (!bytes) return false;
    auto seg = decode_segment(*bytes, key, cipher_.get());
    if (!seg || seg->header.generation != g.id || seg->header.seq != g.last_seq) return false;
    const SegmentHeader& h = seg->header;

    // The local WAL must end exactly where the segment starts: same epoch,
    // its last commit at the segment's start, with the same checksum. Or the
    // transaction was the first of a new epoch (SQLite restarted the WAL
    // for it): one restart after the segment's start, which the state file
    // recorded as durable, and no committed frame in the new epoch yet.
    auto scan = scan_wal_file(wal_path_);
    if (scan && takeover_)
        if (auto live = live_wal_index()) cap_to_wal_index(*scan, path_, *live);
    if (!scan || !scan->has_header || scan->header.page_size != h.page_size) return false;
    const WalHeader& wh = scan->header;
    auto masked = [&](const WalPosition& p) { return cipher_ ? cipher_->mask(p, db_id, g.id) : p; };
    uint64_t first = 0;  // the frame before the segment's first, in the WAL's epoch
    WalPosition local{wh.salt1, wh.salt2, scan->last_commit_frame, scan->cksum1, scan->cksum2};
    if (wh.salt1 == h.start.salt1 && wh.salt2 == h.start.salt2) {
        if (scan->last_commit_frame != h.start.frame || !(masked(local) == h.start)) return false;
        first = h.start.frame;
    } else {
        auto state = read_state_file(state_path_);
        if (wh.salt1 != h.start.salt1 + 1u || scan->last_commit_frame != 0 || h.end.salt1 != wh.salt1 ||
            h.end.salt2 != wh.salt2 || !state || state->generation != g.id || !(masked(state->position) == h.start))
            return false;
        local = WalPosition{wh.salt1, wh.salt2, 0, wh.cksum1, wh.cksum2};
    }

    // Its frames as SQLite writes them (walEncodeFrame): page number, the
    // database size on a transaction's last frame, the salts, the running
    // checksum over the first 8 bytes and the page.
    const uint32_t psz = h.page_size;
    std::string out;
    out.reserve(seg->frames.size() * (kWalFrameHeaderSize + psz));
    uint32_t s1 = local.cksum1, s2 = local.cksum2;
    size_t next = 0;
    for (const SegmentTxn& t : h.txns) {
        for (uint32_t j = 0; j < t.frames; ++j, ++next) {
            if (next >= seg->frames.size()) return false;
            const SegmentFrame& f = seg->frames[next];
            unsigned char fh[kWalFrameHeaderSize] = {0};
            auto put32 = [&](size_t at, uint32_t v) {
                fh[at] = static_cast<unsigned char>(v >> 24);
                fh[at + 1] = static_cast<unsigned char>(v >> 16);
                fh[at + 2] = static_cast<unsigned char>(v >> 8);
                fh[at + 3] = static_cast<unsigned char>(v);
            };
            put32(0, f.pgno);
            put32(4, j + 1 == t.frames ? t.db_pages : 0);
            put32(8, wh.salt1);
            put32(12, wh.salt2);
            wal_checksum(wh.big_endian_checksums(), fh, 8, s1, s2);
            wal_checksum(wh.big_endian_checksums(), reinterpret_cast<const unsigned char*>(f.page.data()), psz, s1, s2);
            put32(16, s1);
            put32(20, s2);
            out.append(reinterpret_cast<const char*>(fh), sizeof fh);
            out.append(f.page);
        }
    }
    const WalPosition end{wh.salt1, wh.salt2, first + next, s1, s2};
    if (next != seg->frames.size() || !(masked(end) == h.end)) return false;

    // Written where SQLite would have written them, then synced: its WAL
    // recovery takes them as committed when the database is opened next.
    Fd wal(::open(wal_path_.c_str(), O_WRONLY | O_CLOEXEC | O_NOFOLLOW));
    if (wal.fd < 0 || !pwrite_full(wal.fd, out.data(), out.size(), wal_frame_offset(psz, first + 1)) ||
        ::fsync(wal.fd) != 0) {
        log::warn(path_ + ": could not write the bucket's last transaction into the WAL: " + std::strerror(errno));
        return false;
    }
    log::info(path_ + ": the bucket's last segment " + std::to_string(g.last_seq) + " of generation " + g.id +
              " held a transaction durable in S3 whose commit never reached this file (sync mode, never "
              "acknowledged); it is now in the WAL, and the generation continues");
    return true;
}

bool Replicator::continue_at_bucket_end(const GenerationInfo& g, bool may_write_wal) {
    auto end = bucket_end_held_locally(g);
    // Before SQLite has the file open, a sync commit the bucket has and the
    // WAL lacks can be completed locally rather than forking the history.
    if (!end && may_write_wal && bring_in_last_segment(g)) end = bucket_end_held_locally(g);
    if (!end) return false;
    LocalProof proof = prove_local(*end, path_, wal_path_, takeover_ ? live_wal_index() : std::nullopt);
    if (!proof.proven) {
        log::info(path_ + ": cannot continue where generation " + g.id + " ends: " + proof.why);
        return false;
    }
    continue_from(*end, proof);
    log::info("continuing generation " + generation_ + " at segment " + std::to_string(seq_) +
              " (where the bucket's history ends, which the local WAL still holds)");
    return true;
}

bool Replicator::continue_within_pending(const GenerationInfo& g) {
    // The last run died after uploading some of the transactions this start
    // recovered (read back from an ended WAL epoch) and before recording it:
    // the bucket ends where one of them ends. Those are shipped; the rest go
    // on from there.
    auto end = read_bucket_end(g);
    if (!end) return false;
    for (size_t i = 0; i < pending_.size(); ++i) {
        const WalPosition& e = pending_[i].end;
        if (!((cipher_ ? cipher_->mask(e, config_.db_id, g.id) : e) == end->position)) continue;
        uint64_t bytes = 0;
        for (size_t j = 0; j <= i; ++j) bytes += pending_[j].bytes;
        pending_.erase(pending_.begin(), pending_.begin() + static_cast<std::ptrdiff_t>(i + 1));
        pending_bytes_ -= std::min(pending_bytes_.load(), bytes);
        const uint64_t u = unshipped_bytes_.load();
        unshipped_bytes_.store(u > bytes ? u - bytes : 0);
        seq_ = g.last_seq;
        prev_sha256_ = end->prev_sha256;
        mark_durable(e, 0);
        log::info(path_ + ": the bucket's generation " + g.id + " already holds " + std::to_string(i + 1) +
                  " of the recovered transaction(s) (up to segment " + std::to_string(seq_) + "); continuing it");
        return true;
    }
    // Or all of them and more, up to a commit of the current WAL epoch: the
    // segments are uploaded in order, so where the bucket ends is all that
    // counts (continue_at_bucket_end() proves the WAL holds it).
    if (end->position.salt1 == pending_.back().end.salt1 && end->position.salt2 == pending_.back().end.salt2)
        return false;
    std::vector<PendingTxn> recovered = std::move(pending_);
    pending_.clear();
    if (!continue_at_bucket_end(g, /*may_write_wal=*/false)) {
        pending_ = std::move(recovered);
        return false;
    }
    uint64_t bytes = 0;
    for (const PendingTxn& p : recovered) bytes += p.bytes;
    pending_bytes_ -= std::min(pending_bytes_.load(), bytes);
    const uint64_t u = unshipped_bytes_.load();
    unshipped_bytes_.store(u > bytes ? u - bytes : 0);
    ended_epochs_.clear();
    log::info(path_ + ": the bucket's generation " + g.id + " already holds the " + std::to_string(recovered.size()) +
              " recovered transaction(s) and more; continuing it");
    return true;
}

Status Replicator::verify_bucket() {
    const auto& bucket = config_.bucket;
    const auto& db_id = config_.db_id;
    if (auto st = client_->create_bucket(bucket); !st) return st;
    auto gens = list_generations(*client_, bucket, db_id);
    if (!gens) return std::move(gens).error();
    const GenerationInfo* latest = nullptr;
    if (Status st = find_latest(*client_, bucket, db_id, *gens, latest); !st) return st;
    if (latest) {
        auto h = read_snapshot_header(*client_, bucket, snapshot_key(db_id, latest->id), latest->snapshot_bytes);
        if (!h) return std::move(h).error();
        if (Status st = check_cipher(h->encryption, cipher_.get(), snapshot_key(db_id, latest->id)); !st) {
            // Another writer moved the bucket to another key. Uploading under
            // ours would start a history the next open refuses: stop, say why.
            halted_.store(true);
            Error e = std::move(st).error();
            e.message = "replication stopped: " + e.message + ". The bucket's newest generation " + latest->id +
                        " is not under this database's key; reopen with initial_replication=force to start a new "
                        "generation under this key";
            return e;
        }
    }
    deferred_check_ = false;
    if (latest && latest->id == generation_ && latest->last_seq == seq_) {
        log::info(path_ + ": the bucket agrees: generation " + generation_ + " ends at segment " + std::to_string(seq_));
        return {};
    }
    // The bucket is ahead on a history this file wrote (the process died
    // between an upload and the state write, or during a snapshot it had
    // started): if the WAL still holds where that history ends, go on from
    // there. Not with frames recovered from an older epoch in hand.
    const bool ours = latest && (latest->id == generation_ ? latest->last_seq > seq_
                                                           : std::find(lineage_.begin(), lineage_.end(), latest->id) !=
                                                                 lineage_.end());
    if (ours && pending_.empty() && !inflight_ && continue_at_bucket_end(*latest, /*may_write_wal=*/false)) {
        write_state_file(false);
        return {};
    }
    if (ours && latest->id == generation_ && !pending_.empty() && !inflight_ && continue_within_pending(*latest)) {
        write_state_file(false);
        return {};
    }
    // The bucket moved on while we were offline (another writer, a restore
    // elsewhere, or an upload whose outcome we never learnt): a new
    // generation whose parent is the bucket's newest, so nothing there is lost.
    if (latest) {
        parent_generation_ = latest->id;
        parent_seq_ = latest->last_seq;
    }
    generation_.clear();
    {
        std::lock_guard olock(obs_mu_);
        commits_.clear();
    }
    request_snapshot(latest ? "the bucket's newest generation " + latest->id + " (segment " +
                                  std::to_string(latest->last_seq) + ") is not where this file's history ended"
                            : "the bucket holds no generation of '" + db_id + "' any more");
    return {};
}

Status Replicator::startup() {
    if (start_offline()) {
        start_uploader();
        return {};
    }
    const auto& bucket = config_.bucket;
    const auto& db_id = config_.db_id;
    if (auto st = client_->create_bucket(bucket); !st) {
        Error e = st.error();
        e.message = "cannot use bucket '" + bucket + "': " + e.message;
        return e;
    }
    auto gens = list_generations(*client_, bucket, db_id);
    if (!gens) return std::move(gens).error();
    const GenerationInfo* latest = nullptr;
    if (Status st = find_latest(*client_, bucket, db_id, *gens, latest); !st) return st;

    // Encryption: the key must be the one the newest generation was written
    // with (decide_startup() refuses anything else unless forced).
    StartupFacts f;
    f.initial_replication = config_.initial_replication;
    f.auto_restore = config_.auto_restore;
    f.path = path_;
    f.bucket = bucket;
    f.db_id = db_id;
    if (latest) {
        f.latest = latest->id;
        f.latest_seq = latest->last_seq;
    }
    {
        std::optional<EncryptionInfo> latest_enc;
        const std::string snap = latest ? snapshot_key(db_id, latest->id) : std::string();
        if (latest) {
            auto h = read_snapshot_header(*client_, bucket, snap, latest->snapshot_bytes);
            if (!h) return std::move(h).error();
            latest_enc = h->encryption;
        }
        // Encrypted or not is known from the header alone: a refused open
        // must not derive a key or create the passphrase's KDF object. (For
        // this check only whether there is a key counts, not its id.)
        const std::string any_key_id;
        if (latest && latest_enc.has_value() == config_.encryption.empty())
            if (Status st = check_key_id(latest_enc, config_.encryption.empty() ? nullptr : &any_key_id, snap); !st)
                f.key_mismatch = std::move(st).error();
        if (f.key_mismatch && config_.initial_replication != InitialReplication::Force) {
            StartupPlan plan = decide_startup(f);
            return std::move(*plan.error);
        }
        auto c = open_cipher(*client_, bucket, db_id, config_.encryption, /*create=*/true, &kdf_text_);
        if (!c) return std::move(c).error();
        cipher_ = std::move(c).value();
        if (latest && latest_enc && cipher_ && !f.key_mismatch)
            if (Status st = check_cipher(latest_enc, cipher_.get(), snap); !st) f.key_mismatch = std::move(st).error();
        f.key_id = cipher_ ? cipher_->key_id() : std::string();
    }

    struct stat db_st{}, wal_st{};
    f.files.db_exists = stat_file(path_, db_st);
    f.files.db_size = db_st.st_size;
    f.files.db_mtime_ns = mtime_ns(db_st);
    f.files.db_ino = db_st.st_ino;
    f.files.wal_exists = stat_file(wal_path_, wal_st);
    f.files.wal_size = wal_st.st_size;
    auto state = read_state_file(state_path_);
    merge_shared_end(state);
    if (state && state->bucket == bucket && state->db_id == db_id) {
        f.state = &*state;
        // Keep only generations that exist: attempts a killed run never
        // finished would otherwise crowd out the real ones.
        for (const auto& g : state->lineage)
            if (std::any_of(gens->begin(), gens->end(), [&](const GenerationInfo& x) { return x.id == g; }))
                lineage_.push_back(g);
    }
    LocalProof proof;
    f.proven = [&] {
        proof = prove_local(*state, path_, wal_path_, takeover_ ? live_wal_index() : std::nullopt);
        return proof.proven;
    };

    StartupPlan plan = decide_startup(f);
    if (!plan.warning.empty()) log::warn(plan.warning);
    if (takeover_ && (plan.action == StartupAction::Restore || plan.action == StartupAction::CatchUp)) {
        // The file is open in this process (and others): never replaced
        // under them. It is what they wrote: a new generation from it.
        plan.action = StartupAction::NewGeneration;
        plan.reason = "taking over from another process, the local file does not continue the bucket";
        if (latest) {
            plan.parent_generation = latest->id;
            plan.parent_seq = latest->last_seq;
        }
    }
    switch (plan.action) {
    case StartupAction::Refuse:
        return *plan.error;
    case StartupAction::Skip:
        enabled_ = false;
        return {};
    case StartupAction::Restore: {
        log::info("restoring " + path_ + " from generation " + latest->id + " of s3://" + bucket + "/" + db_id);
        RestoreOptions ro;
        ro.cipher = cipher_;
        auto rr = restore_database(*client_, bucket, db_id, path_, ro);
        if (!rr) {
            Error e = std::move(rr).error();
            e.message = "cannot restore " + path_ + " from the bucket: " + e.message;
            return e;
        }
        log::info("restored " + path_ + ": generation " + rr->generation + ", " + std::to_string(rr->db_pages) +
                  " pages, last transaction at " + fmt_time_us(rr->last_commit_us));
        parent_generation_ = rr->generation;
        parent_seq_ = rr->seq;
        request_snapshot(plan.reason);
        break;
    }
    case StartupAction::CatchUp: {
        // A copy restored as the bucket's newest state, which has moved on:
        // only what the copy lacks is fetched (the segments after its
        // position), not the whole database again. The copy proves itself
        // by its note, as for bottomless-cli restore --incremental.
        RestoreOptions ro;
        ro.cipher = cipher_;
        ro.incremental = true;
        ro.newest = true;
        auto rr = restore_database(*client_, bucket, db_id, path_, ro);
        if (!rr) {
            // The copy stays as it was (or, past the journal's commit point,
            // SQLite recovers the new state from it): open it, as any
            // restored copy, rather than fail an open S3 is not needed for.
            log::warn(path_ + ": cannot bring the restored copy up to date with s3://" + bucket + "/" + db_id + " (" +
                      rr.error().message + "); a new generation starts from it as it is");
            parent_generation_ = plan.parent_generation;
            parent_seq_ = plan.parent_seq;
            request_snapshot(plan.reason);
            break;
        }
        log::info("brought " + path_ + " up to date: generation " + rr->generation + " segment " +
                  std::to_string(rr->seq) + " (" + rr->incremental +
                  (rr->incremental_reason.empty() ? "" : ": " + rr->incremental_reason) + "), " +
                  std::to_string(rr->bytes_downloaded) + " bytes downloaded");
        parent_generation_ = rr->generation;
        parent_seq_ = rr->seq;
        request_snapshot(plan.reason + ", brought up to date with the bucket");
        break;
    }
    case StartupAction::Continue:
        continue_from(*state, proof);
        log::info("continuing generation " + generation_ + " at segment " + std::to_string(seq_));
        break;
    case StartupAction::ContinueAtBucketEnd:
        if (!proof.why.empty()) log::info(path_ + ": the state file's position is not proven: " + proof.why);
        if (continue_at_bucket_end(*latest, /*may_write_wal=*/true)) break;
        [[fallthrough]];
    case StartupAction::NewGeneration:
        parent_generation_ = plan.parent_generation;
        parent_seq_ = plan.parent_seq;
        request_snapshot(plan.reason);
        break;
    }
    // The page digests a restore left describe the file as restored; it is
    // replicated (written) from now on (docs/FORMAT.md "The page digests").
    ::unlink(page_digests_path(path_).c_str());

    start_uploader();
    return {};
}

void Replicator::start_uploader() {
    // Published before another process may open as a follower (the
    // start-up byte is still ours), and before a step can use it.
    publish_shared_area();
    // No thread of its own: the process's uploader pool runs its steps. A
    // database with nothing owed (a proven offline start, no unshipped
    // frames) is not scheduled at all: no step, no request until it commits.
    pool_member_ = UploaderPool::instance().join(config_.uploader_threads, [this] { return pool_step(); });
    watch_join();
    Lock lock(upload_mu_);
    pool_member_->schedule(next_due());
}

}  // namespace bottomless::replicator
