// Restore: the entry points (restore_database, restore_target), the
// whole-file check, and the full restore of a chosen target: the snapshot
// decoded as its parts arrive, then its segments. The machinery is in
// restore_pipeline.cpp, the incremental path in restore_incremental.cpp.
// See restore.h.
#include "replicator/restore.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <thread>

#include "replicator/restore_pipeline.h"
#include "replicator/sqlite_api.h"

namespace bottomless::replicator {

using restore_detail::Clock;
using restore_detail::errno_text;
using restore_detail::FetchJob;
using restore_detail::finish_restore;
using restore_detail::OrderedFetcher;
using restore_detail::PageWriter;
using restore_detail::seconds_since;
using restore_detail::SegmentPlan;
using restore_detail::SideHasher;
using restore_detail::SpaceGuard;
using restore_detail::TmpFile;
using restore_detail::apply_segments;

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
    RestoreOptions o = options;
    o.newest = options.newest || (options.generation.empty() && !options.until_us);
    auto res = options.incremental ? restore_incremental(client, bucket, db_id, *history, *target, output_path, o)
                                   : restore_target(client, bucket, db_id, *target, output_path, o);
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
    res.newest = options.newest;

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
    OrderedFetcher fetcher(client, bucket, std::move(jobs), workers, static_cast<size_t>(workers) + 2, options.cancel);
    // The pages also go through an O_DIRECT descriptor of the same file
    // (PageWriter): when no check reads the file back right after, nothing
    // needs them in the page cache. Pages smaller than the alignment would
    // mix direct and buffered writes within one 4 KiB block (correct, the
    // kernel keeps them coherent, but slow): the page cache only, then, as
    // without O_DIRECT (tmpfs).
    int direct_fd = -1;
    if (options.integrity_check == IntegrityCheck::None && options.direct_writes &&
        chosen.snapshot.page_size % restore_detail::kDirectAlign == 0)
        direct_fd = ::open(tmp.path.c_str(), O_WRONLY | O_DIRECT | O_NOFOLLOW | O_CLOEXEC);
    struct DirectFd {
        int fd;
        ~DirectFd() {
            if (fd >= 0) ::close(fd);
        }
    } direct_guard{direct_fd};
    PageWriter writer(tmp.fd, direct_fd);
    // Stops the downloads and the writer before the temp file goes, on every path.
    auto stop_all = [&] {
        fetcher.stop();
        (void)writer.finish();
    };

    // ---- the snapshot, decoded in order as its parts arrive ----
    std::optional<restore_detail::PageDigests> digests;
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
        // A format-2 snapshot's tail (its page index) is kept as it passes:
        // the restored file's page digests start from it.
        const uint64_t index_tail =
            chosen.snapshot.frame_pages ? std::min(page_index_tail_size(chosen.snapshot), chosen.snapshot_bytes) : 0;
        const uint64_t tail_from = chosen.snapshot_bytes - index_tail;
        std::string tail_bytes;
        uint64_t fed = 0;
        for (size_t i = 0; i < snapshot_jobs; ++i) {
            auto part = fetcher.take(i);
            if (!part) return snapshot_error(std::move(part).error());
            if (index_tail && fed + part->size() > tail_from)
                tail_bytes.append(std::string_view(*part).substr(fed < tail_from ? tail_from - fed : 0));
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
        if (index_tail && tail_bytes.size() == index_tail) {
            // Covered by the trailer just checked. An index the writer got
            // wrong is what `verify` finds (check_page_digests); one that does
            // not parse only costs the digests (the next incremental restore
            // hashes the file).
            auto idx = parse_page_index(tail_bytes, chosen.snapshot_bytes, chosen.snapshot, snap_key);
            if (idx) digests.emplace().hashes = std::move(idx->hashes);
        }
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
    plan.digests = digests ? &*digests : nullptr;
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
    if (digests) restore_detail::write_page_digests(output_path, res, *digests);
    res.seconds = seconds_since(t0);
    return res;
}

}  // namespace bottomless::replicator
