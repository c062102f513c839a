// The local proof (replicator_internal.h, prove_local): are the local files
// exactly where a state file's history ends? Local reads only; the start-up
// decision (startup.cpp) acts on the answer.
#include "replicator/replicator_internal.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "replicator/state_file.h"

namespace bottomless::replicator {

// The recorded epoch's frames after `at`, up to `to`, read back from their
// slots as SQLite's own recovery would judge them: its salts, the checksum
// chain continuing from `at`, and a commit frame last. False when any is
// missing or overwritten (the new epoch has written that far).
static bool recover_old_epoch(const std::string& wal_path, const WalHeader& current, const WalPosition& at, uint64_t to,
                              std::vector<RecoveredTxn>& out) {
    Fd fd(::open(wal_path.c_str(), O_RDONLY | O_CLOEXEC));
    if (fd.fd < 0) return false;
    WalHeader old = current;  // same byte order and page size (a page size change leaves WAL mode)
    old.salt1 = at.salt1;
    old.salt2 = at.salt2;
    const uint32_t psz = current.page_size;
    std::vector<unsigned char> buf(kWalFrameHeaderSize + psz);
    uint32_t s1 = at.cksum1, s2 = at.cksum2;
    RecoveredTxn cur;
    for (uint64_t i = at.frame + 1; i <= to; ++i) {
        if (!pread_full(fd.fd, buf.data(), buf.size(), wal_frame_offset(psz, i))) return false;
        if (!verify_frame(old, buf.data(), buf.data() + kWalFrameHeaderSize, s1, s2)) return false;
        WalFrameHeader fh = parse_frame_header(buf.data());
        cur.frames.push_back(
            SegmentFrame{fh.pgno, PageBuf(std::string_view(reinterpret_cast<const char*>(buf.data() + kWalFrameHeaderSize), psz))});
        cur.bytes += psz;
        if (fh.is_commit()) {
            cur.db_pages = fh.db_size;
            cur.end = WalPosition{at.salt1, at.salt2, i, s1, s2};
            out.push_back(std::move(cur));
            cur = RecoveredTxn{};
        }
    }
    return cur.frames.empty();
}

void cap_to_wal_index(WalScan& scan, const std::string& db_path, const WalIndexHeader& h) {
    if (!scan.has_header || scan.last_commit_frame == 0) return;
    if (h.salt1 != scan.header.salt1 || h.salt2 != scan.header.salt2 || h.mx_frame >= scan.last_commit_frame) return;
    scan.last_commit_frame = h.mx_frame;
    scan.db_size = 0;
    scan.cksum1 = scan.header.cksum1;
    scan.cksum2 = scan.header.cksum2;
    if (h.mx_frame == 0) return;
    Fd fd(::open((db_path + "-wal").c_str(), O_RDONLY | O_CLOEXEC));
    unsigned char fh[kWalFrameHeaderSize];
    if (fd.fd < 0 || !pread_full(fd.fd, fh, sizeof fh, wal_frame_offset(scan.header.page_size, h.mx_frame))) {
        scan.last_commit_frame = 0;  // cannot tell: nothing counts as committed
        return;
    }
    const WalFrameHeader f = parse_frame_header(fh);
    scan.db_size = f.db_size;
    scan.cksum1 = f.cksum1;
    scan.cksum2 = f.cksum2;
}

LocalProof prove_local(const LocalState& state, const std::string& db_path, const std::string& wal_path,
                       const std::optional<WalIndexHeader>& live_wal_index) {
    LocalProof proof;
    auto scan = scan_wal_file(wal_path);
    if (scan && live_wal_index) cap_to_wal_index(*scan, db_path, *live_wal_index);
    if (!scan) {
        proof.why = "the WAL could not be read";
        return proof;
    }
    const WalPosition& at = state.position;
    // The recorded epoch ended (a restart recorded by this process's state
    // or another process's shared record, merge_shared_end) at or after
    // the recorded position.
    const bool recorded_end = at.frame > 0 && state.restarted.salt1 == at.salt1 && state.restarted.salt2 == at.salt2 &&
                              state.restarted.frame >= at.frame;
    if (scan->has_header && scan->header.salt1 == at.salt1 && scan->header.salt2 == at.salt2 &&
        at.frame <= scan->last_commit_frame) {
        if (at.frame == 0) {
            proof.proven = scan->header.cksum1 == at.cksum1 && scan->header.cksum2 == at.cksum2;
        } else {
            Fd fd(::open(wal_path.c_str(), O_RDONLY | O_CLOEXEC));
            unsigned char fh[kWalFrameHeaderSize];
            if (fd.fd >= 0 && pread_full(fd.fd, fh, sizeof fh, wal_frame_offset(scan->header.page_size, at.frame))) {
                auto h = parse_frame_header(fh);
                proof.proven = h.cksum1 == at.cksum1 && h.cksum2 == at.cksum2 && h.is_commit();
            }
        }
        if (!proof.proven) proof.why = "the WAL's frame " + std::to_string(at.frame) + " is not the recorded commit";
        proof.unshipped_from = at.frame;
    } else if (scan->has_header && (scan->header.salt1 == at.salt1 + 1u || recorded_end)) {
        // Exactly one restart since the recorded position: SQLite adds one to
        // salt1 at each restart (a new WAL file gets random salts), or the
        // restart is recorded (another process's record names the epoch
        // that ended, and would name a later one had there been one). A
        // restart while frames were unshipped records how far that epoch
        // went first (`restarted`); without a record, everything was
        // durable then.
        const WalPosition& r = state.restarted;
        if (r.frame > at.frame && r.salt1 == at.salt1 && r.salt2 == at.salt2) {
            // From their old slots in the WAL, or, once the new epoch had
            // reached them, from the copy made just before
            // (Replicator::before_wal_overwrite).
            proof.proven = proof.recovered_from_wal =
                recover_old_epoch(wal_path, scan->header, at, r.frame, proof.recovered);
            if (!proof.proven) {
                proof.recovered.clear();
                proof.proven = recover_old_epoch(db_path + "-bottomless-frames", scan->header, at, r.frame,
                                                 proof.recovered);
            }
            if (!proof.proven)
                proof.why = "the previous WAL epoch's unshipped frames " + std::to_string(at.frame + 1) + ".." +
                            std::to_string(r.frame) + " are no longer in the file";
        } else {
            proof.proven = true;
        }
        proof.unshipped_from = 0;
    } else if (!scan->has_header && !state.clean_close && recorded_end) {
        // Several processes: another process restarted the recorded epoch
        // and emptied the WAL (a TRUNCATE checkpoint: everything in the
        // database file), its frames after the position copied aside with
        // the epoch's header first (keep_epoch_tail).
        const WalPosition& r = state.restarted;
        if (r.frame == at.frame) {
            proof.proven = true;
        } else {
            WalFile aside(db_path + "-bottomless-frames");
            auto h = aside.header();
            proof.proven = h && h->salt1 == at.salt1 && h->salt2 == at.salt2 &&
                           recover_old_epoch(db_path + "-bottomless-frames", *h, at, r.frame, proof.recovered);
        }
        if (!proof.proven)
            proof.why = "the WAL was emptied after a restart, and the ended epoch's unshipped frames " +
                        std::to_string(at.frame + 1) + ".." + std::to_string(r.frame) + " are not in the copy aside";
        proof.unshipped_from = 0;
    } else if (!scan->has_header && state.clean_close) {
        struct stat db{};
        proof.proven = ::stat(db_path.c_str(), &db) == 0 && state.db_size == db.st_size &&
                       state.db_mtime_ns == mtime_ns(db) && state.db_ino == db.st_ino;
        if (!proof.proven) proof.why = "the database file changed since the clean close (size, mtime or inode)";
    } else if (!scan->has_header) {
        proof.why = "no WAL, and the last run did not close cleanly";
    } else {
        proof.why = "the WAL's epoch (salt1 " + std::to_string(scan->header.salt1) + ", last commit frame " +
                    std::to_string(scan->last_commit_frame) + ") is not the recorded one (salt1 " +
                    std::to_string(at.salt1) + ", frame " + std::to_string(at.frame) + ") nor the next";
    }
    if (proof.proven && scan->has_header) {
        proof.page_size = scan->header.page_size;
        proof.salt1 = scan->header.salt1;
        proof.salt2 = scan->header.salt2;
        proof.last_commit_frame = scan->last_commit_frame;
    }
    return proof;
}

}  // namespace bottomless::replicator
