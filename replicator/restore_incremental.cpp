// Incremental restore (restore.h, restore_incremental()): proving that a
// local copy belongs to the history, then applying only the segments after
// its position, through a WAL journal checkpointed by SQLite or onto a
// duplicate of the file. Uses the restore pipeline (restore_pipeline.h);
// across generations, the page diff and the bridge (restore_incremental.h).
#include "replicator/restore.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "replicator/restore_incremental.h"
#include "replicator/restore_pipeline.h"
#include "replicator/sqlite_api.h"
#include "replicator/state_file.h"
#include "replicator/util.h"
#include "replicator/wal.h"
#include "s3/crypto.h"

namespace bottomless::replicator {

using restore_detail::Clock;
using restore_detail::end_transfer;
using restore_detail::errno_text;
using restore_detail::FetchJob;
using restore_detail::finish_restore;
using restore_detail::not_incremental;
using restore_detail::OrderedFetcher;
using restore_detail::PageDigests;
using restore_detail::PageWriter;
using restore_detail::read_page_digests;
using restore_detail::write_page_digests;
using restore_detail::seconds_since;
using restore_detail::SegmentPlan;
using restore_detail::SpaceGuard;
using restore_detail::TmpFile;
using restore_detail::apply_segments;
using restore_detail::bridge_to_snapshot;
using restore_detail::diff_against_index;
using restore_detail::kDiffWorkers;
using restore_detail::PageDiff;
using restore_detail::write_restored_note;

namespace {

// Duplicates the open file src (size bytes) into the empty dst
// (util.h duplicate_file()). True if cloned.
Result<bool> duplicate_file(int src, int dst, uint64_t size, const std::string& dst_path) {
    const int r = replicator::duplicate_file(src, dst, size);
    if (r >= 0) return r == 1;
    if (errno == ENODATA) return not_incremental("the copy shrank while it was being duplicated (is something writing it?)");
    return make_error(ErrorKind::Io, "cannot copy the old database into " + dst_path + ": " + errno_text(errno),
                      "WriteFailed");
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

    // A newer generation whose snapshot carries a page index (format 2):
    // only the pages that differ from the copy are fetched, then its segments.
    bool across = false;
    // The generations from the copy's to the target's parent, each with the
    // segment its child continued from (oldest first): their segments after
    // the copy may bring it to the target's snapshot for fewer bytes than
    // the snapshot's differing frames (the bridge, below).
    std::vector<std::pair<size_t, uint64_t>> lineage;  // (history index, parent_seq of its child)
    if (note.generation != target.generation) {
        if (copy_index < target.index)
            return refused(not_incremental("cannot go back: the copy is at generation " + note.generation +
                                           ", newer than the generation to restore " + target.generation));
        // Walk the parent links from the target back to the copy's generation.
        const SnapshotHeader* snap = &target.snapshot;
        std::string child = target.generation;
        for (size_t steps = 0; steps <= history.size() && !across; ++steps) {
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
                // Format 1 snapshots carry no page index (docs/FORMAT.md "Page index").
                if (!target.snapshot.frame_pages)
                    return full("generation " + note.generation + " of the copy is an ancestor of " +
                                target.generation + ", but its snapshot has no page index (format 1: " +
                                (target.snapshot.encryption ? "encrypted" : "written before format 2 or uncompressed") +
                                ") to fetch only the pages that differ");
                if (note.page_size != target.snapshot.page_size)
                    return full("the page size changed from " + std::to_string(note.page_size) + " to " +
                                std::to_string(target.snapshot.page_size));
                if (target.snapshot.db_pages == 0) return full("the new generation's snapshot is empty");
                lineage.emplace_back(copy_index, snap->parent_seq);
                std::reverse(lineage.begin(), lineage.end());
                across = true;
                break;
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
            lineage.emplace_back(p, snap->parent_seq);
            snap = &*history[p].snapshot;
            child = parent;
        }
        if (!across) return refused(not_incremental("the parent links of " + target.generation + " loop"));
    }

    // ---- the same generation: the segments after the copy's position ----
    if (!across) {
        if (target.until_us && *target.until_us < note.last_commit_us)
            return refused(not_incremental("cannot go back: the copy holds transactions up to " +
                                           fmt_time_us(note.last_commit_us) + ", after the requested time " +
                                           fmt_time_us(*target.until_us)));
        if (target.last_seq < copy_at)
            return refused(not_incremental("the copy holds segment " + std::to_string(copy_at) + " of generation " +
                                           note.generation + ", the bucket only up to " +
                                           std::to_string(target.last_seq)));
        if (auto ps = prove_position(client, bucket, db_id, history[copy_index], note, true, proof_bytes); !ps)
            return refused(std::move(ps).error());
        if (note.page_size != target.snapshot.page_size)
            return refused(not_incremental("the copy's page size " + std::to_string(note.page_size) +
                                           " is not the generation's " + std::to_string(target.snapshot.page_size)));
    }
    const std::string snap_key = snapshot_key(db_id, target.generation);
    if (auto c = check_cipher(target.snapshot.encryption, options.cipher.get(), snap_key); !c) return std::move(c).error();

    RestoreResult res;
    res.newest = options.newest;
    res.from_seq = note.seq;
    res.bytes_downloaded = proof_bytes;
    if (across) {
        // Continues from the target's snapshot, as a full restore would.
        res.incremental = "pages";
        res.from_generation = note.generation;
        res.generation = target.generation;
        res.position = target.snapshot.position;
        res.page_size = target.snapshot.page_size;
        res.db_pages = target.snapshot.db_pages;
        res.last_commit_us = target.snapshot.last_commit_us;
    } else {
        res.incremental = note.next_txns == 0 && target.last_seq == note.seq ? "up-to-date" : "segments";
        res.generation = note.generation;
        res.seq = note.seq;
        res.next_txns = note.next_txns;
        res.position = note.position;
        res.last_sha256 = note.prev_sha256;
        res.page_size = note.page_size;
        res.db_pages = note.db_pages;
        res.last_commit_us = note.last_commit_us;
    }
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
        // The copy's page digests, if the restore that wrote it left them:
        // the comparison needs no read of the file, and the new digests
        // start from them (same generation) or from the new index.
        const std::optional<std::string> copy_digests = read_page_digests(output_path, note);
        std::optional<PageDiff> diff;
        std::optional<PageDigests> digests;
        if (across) {
            auto d = diff_against_index(client, bucket, snap_key, target, src, note.db_pages, copy_digests, res);
            if (!d) return std::move(d).error();
            diff.emplace(std::move(*d));
            digests.emplace().hashes = diff->index.hashes;
        } else if (copy_digests) {
            digests.emplace().hashes = *copy_digests;
        }

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
        PageWriter writer(tmp.fd);
        std::optional<WalJournal> wal;
        if (via_wal) wal.emplace(writer, space, res.page_size, "the journal " + tmp.path);
        // Where a page goes: into the journal, or at its offset in the duplicate.
        auto put = [&](uint32_t pgno, std::string_view page, const std::string& what) -> Status {
            if (wal) return wal->add(pgno, page);
            const uint64_t off = uint64_t{pgno - 1} * page.size();
            if (auto sp = space.reserve(off + page.size(), what); !sp) return sp;
            return writer.write(off, page);
        };
        if (diff && !lineage.empty())
            if (Status b = bridge_to_snapshot({client, bucket, db_id, history, target, options, note, copy_index, lineage},
                                              *diff, writer, space, put, res);
                !b) {
                (void)writer.finish();
                return b;
            }

        uint64_t total = res.bytes_downloaded;  // progress: what came before, then the jobs below
        std::vector<FetchJob> jobs;
        if (diff)
            for (const auto& run : diff->runs) {
                const uint64_t off = diff->index.frame_offset[run.first], len = diff->index.frame_offset[run.second] - off;
                jobs.push_back({snap_key, s3::ByteRange{off, len}, len});
                total += len;
            }
        const size_t snapshot_jobs = jobs.size();
        const uint64_t first_seq = across ? 1 : note.seq + 1;
        for (uint64_t seq = first_seq; seq <= target.last_seq; ++seq) {
            std::string key = segment_key(db_id, target.generation, seq);
            total += history[target.index].size_of(key);
            jobs.push_back({std::move(key), std::nullopt, max_segment_object_size()});
        }
        // Frames are fetched in runs of at most 1 MiB: more GETs in flight
        // (latency, not bandwidth, bounds many small ranges).
        const int workers = std::max(1, diff ? std::max(options.parallel, kDiffWorkers) : options.parallel);
        OrderedFetcher fetcher(client, bucket, std::move(jobs), workers, static_cast<size_t>(workers) + 2,
                               options.cancel);
        SegmentPlan plan;
        plan.generation = target.generation;
        plan.first_seq = first_seq;
        plan.last_seq = target.last_seq;
        plan.first_job = snapshot_jobs;
        plan.until_us = target.until_us;
        plan.skip_txns = across ? 0 : note.next_txns;
        plan.onto_copy = !across;
        plan.total = total;
        plan.digests = digests ? &*digests : nullptr;
        if (via_wal) plan.sink = [&](uint32_t pgno, std::string_view page) { return wal->add(pgno, page); };
        Status applied;
        if (diff) {
            // The snapshot's pages that differ from the copy, frame by frame,
            // each checked against its digest before it is written.
            const std::string what = "snapshot " + snap_key;
            auto sink = [&](uint32_t pgno, std::string_view page) -> Status {
                if (!diff->differs[pgno]) return {};
                ++res.pages_changed;
                return put(pgno, page, what);
            };
            for (size_t j = 0; j < snapshot_jobs && applied; ++j) {
                auto part = fetcher.take(j);
                if (!part) {
                    Error e = std::move(part).error();
                    if (e.kind == ErrorKind::NotFound)
                        e = make_error(ErrorKind::Corrupt, "snapshot " + snap_key + " disappeared during the restore",
                                       "MissingSnapshot");
                    applied = e;
                    break;
                }
                const auto [f0, f1] = diff->runs[j];
                const uint64_t base = diff->index.frame_offset[f0];
                const auto td = Clock::now();
                const double waited = writer.wait_seconds();
                for (uint32_t f = f0; f < f1 && applied; ++f) {
                    const uint64_t at = diff->index.frame_offset[f] - base;
                    const uint64_t len = diff->index.frame_offset[f + 1] - diff->index.frame_offset[f];
                    if (at + len > part->size()) {
                        applied = make_error(ErrorKind::Corrupt,
                                             "snapshot " + snap_key + " changed size during the restore", "WrongObject");
                        break;
                    }
                    applied = decode_snapshot_frame(diff->index, f, std::string_view(*part).substr(at, len), snap_key, sink);
                    if (!applied && applied.error().kind == ErrorKind::Corrupt)  // a full restore may still work
                        applied = not_incremental(applied.error().message);
                    ++res.frames_fetched;
                }
                res.timings.decode += seconds_since(td) - (writer.wait_seconds() - waited);
                res.bytes_downloaded += part->size();
                fetcher.recycle(std::move(*part));
                if (options.progress) options.progress(res.bytes_downloaded, total);
            }
            // The snapshot's own trailer, which its first segment must name.
            res.last_sha256 = diff->index.trailer_hex;
        }
        if (applied) applied = apply_segments(fetcher, writer, space, db_id, plan, options, res);
        if (applied && wal && across && wal->frames() == 0) {
            // No page differs and no segment follows: still one frame, whose
            // commit carries the size (and makes the new note the truth).
            std::string page1(res.page_size, '\0');
            if (::pread(src, page1.data(), page1.size(), 0) != static_cast<ssize_t>(page1.size()))
                applied = make_error(ErrorKind::Io, "cannot read page 1 of " + output_path + ": " + errno_text(errno),
                                     "ReadFailed");
            else
                applied = wal->add(1, page1);
        }
        ::close(src);
        src = -1;
        if (applied && wal) applied = wal->commit(res.db_pages);
        if (!applied) {
            fetcher.stop();
            (void)writer.finish();
            return applied;
        }
        if (!via_wal) {
            Status f = finish_restore(fetcher, writer, tmp, output_path, bucket, db_id, options, res);
            if (f && digests) write_page_digests(output_path, res, *digests);
            return f;
        }

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
        for (const std::string& p : {output_path + "-bottomless", page_digests_path(output_path), output_path + "-shm"}) {
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
        if (digests) write_page_digests(output_path, res, *digests);
        return {};
    };
    if (auto s = apply(); !s) return refused(std::move(s).error());
    res.seconds = seconds_since(t0);
    return res;
}

}  // namespace bottomless::replicator
