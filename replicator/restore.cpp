// Restore: listing generations, rebuilding a database from a snapshot and
// its chain of segments. See restore.h.
#include "replicator/restore.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <future>
#include <map>


#include "replicator/sqlite_api.h"
#include "replicator/state_file.h"
#include "replicator/util.h"
#include "replicator/wal.h"
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

// Feeds a downloaded snapshot into a SnapshotReader that writes pages into
// the output file. A retry of the download starts the reader afresh.
// Pages past `max_pages` (what the header declared when the free space was
// checked) stop it, even if the object changed since.
class SnapshotSink final : public s3::http::BodySink {
public:
    SnapshotSink(std::string name, int fd, const Cipher* cipher, uint32_t max_pages)
        : name_(std::move(name)), fd_(fd), cipher_(cipher), max_pages_(max_pages) {
        make_reader();
    }
    bool write(const char* data, size_t n) override {
        auto st = reader_->feed(std::string_view(data, n));
        if (!st) {
            error_ = st.error();
            return false;
        }
        bytes_ += n;
        return true;
    }
    bool reset() override {
        make_reader();
        bytes_ = 0;
        return ::ftruncate(fd_, 0) == 0;
    }
    SnapshotReader& reader() { return *reader_; }
    // Writes the pages still buffered (call after the reader's finish()).
    Status flush_pages() {
        if (!buf_.empty() && !pwrite_full(fd_, buf_.data(), buf_.size(), buf_offset_))
            return make_error(ErrorKind::Io, "cannot write the restored database: " + errno_text(errno), "WriteFailed");
        buf_.clear();
        return {};
    }
    const std::optional<Error>& error() const { return error_; }
    uint64_t bytes() const { return bytes_; }

private:
    void make_reader() {
        error_.reset();
        buf_.clear();
        // Pages come in order: gather them into 1 MiB writes.
        reader_ = std::make_unique<SnapshotReader>(name_, [this](uint32_t pgno, std::string_view page) -> Status {
            if (pgno > max_pages_)
                return make_error(ErrorKind::Corrupt,
                                  name_ + ": holds more than the " + std::to_string(max_pages_) +
                                      " pages its header declared (the object changed during the restore?)",
                                  "WrongObject");
            if (buf_.empty()) buf_offset_ = static_cast<uint64_t>(pgno - 1) * page.size();
            buf_.append(page);
            if (buf_.size() >= (1u << 20)) return flush_pages();
            return {};
        }, cipher_);
    }
    std::string buf_;
    uint64_t buf_offset_ = 0;
    std::string name_;
    int fd_;
    const Cipher* cipher_;
    uint32_t max_pages_;
    std::unique_ptr<SnapshotReader> reader_;
    std::optional<Error> error_;
    uint64_t bytes_ = 0;
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

Status integrity_check(const std::string& path) {
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
    rc = sqlite3_prepare_v2(db, "PRAGMA integrity_check", -1, &stmt, nullptr);
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
    if (!err.empty()) return make_error(ErrorKind::Corrupt, "integrity_check could not run: " + err, "IntegrityCheck");
    if (result != "ok")
        return make_error(ErrorKind::Corrupt, "PRAGMA integrity_check failed on the restored database: " + result,
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
    SnapshotSink sink(snap_key, tmp.fd, options.cipher.get(), snap_pages);
    auto snapshot_error = [&](Error e) -> Error {
        if (sink.error()) return *sink.error();
        if (e.kind == ErrorKind::NotFound)
            e = make_error(ErrorKind::Corrupt, "snapshot " + snap_key + " disappeared during the restore", "MissingSnapshot");
        return e;
    };
    constexpr uint64_t kChunk = 8ull << 20;
    if (chosen.snapshot_bytes <= 2 * kChunk || options.parallel <= 1) {
        // No more than the listing said the object holds.
        auto got = client.get_object_to_sink(bucket, snap_key, sink, std::nullopt, chosen.snapshot_bytes);
        if (!got) return snapshot_error(std::move(got).error());
    } else {
        // A large snapshot comes down as ranged GETs, several in flight, fed
        // to the decoder in order: memory is parallel x 8 MiB.
        const uint64_t size = chosen.snapshot_bytes;
        const uint64_t n = (size + kChunk - 1) / kChunk;
        std::map<uint64_t, std::future<Result<std::string>>> chunks;
        uint64_t next = 0;
        for (uint64_t i = 0; i < n; ++i) {
            while (next < n && chunks.size() < static_cast<size_t>(options.parallel)) {
                uint64_t off = next * kChunk, len = std::min(kChunk, size - off);
                chunks.emplace(next, std::async(std::launch::async, [&client, bucket, snap_key, off, len] {
                                   return client.get_object(bucket, snap_key, s3::ByteRange{off, len});
                               }));
                ++next;
            }
            auto part = chunks.at(i).get();
            chunks.erase(i);
            std::optional<Error> err;
            if (!part) err = std::move(part).error();
            else if (part->size() != std::min(kChunk, size - i * kChunk))
                err = make_error(ErrorKind::Corrupt, "snapshot " + snap_key + " changed size during the restore",
                                 "WrongObject");
            else if (!sink.write(part->data(), part->size()))
                err = make_error(ErrorKind::Io, "cannot write the restored database", "WriteFailed");
            if (err) {
                for (auto& [k, f] : chunks) f.wait();
                return snapshot_error(std::move(*err));
            }
            if (options.progress) options.progress(sink.bytes(), total);
        }
    }
    auto snap = sink.reader().finish();
    if (!snap) return std::move(snap).error();
    if (auto st = sink.flush_pages(); !st) return std::move(st).error();
    if (snap->db_id != db_id || snap->generation != chosen.generation)
        return make_error(ErrorKind::Corrupt,
                          snap_key + " belongs to " + snap->db_id + "/" + snap->generation + ", not to this key",
                          "WrongObject");
    res.bytes_downloaded += sink.bytes();
    res.page_size = snap->page_size;
    res.db_pages = snap->db_pages;
    res.position = snap->position;
    res.last_commit_us = snap->last_commit_us;
    res.last_sha256 = sink.reader().sha256();
    if (options.progress) options.progress(res.bytes_downloaded, total);
    // The target was chosen on the header read before (its state at or
    // before until_us, its size checked against the free space): the object
    // streamed must be the one weighed, not one put there since.
    if (!(snap->position == chosen.snapshot.position) || snap->last_commit_us != chosen.snapshot.last_commit_us ||
        snap->created_us != chosen.snapshot.created_us || snap->db_pages != chosen.snapshot.db_pages)
        return make_error(ErrorKind::Corrupt,
                          "snapshot " + snap_key + " changed while it was being restored (is someone writing this "
                          "generation?); run the restore again",
                          "WrongObject");

    // ---- the segments, fetched several at a time, applied in order ----
    bool stop = false;
    const uint64_t last_seq = chosen.last_seq;
    const int window = std::max(1, options.parallel);
    uint64_t next_fetch = 1;
    std::map<uint64_t, std::future<Result<std::string>>> inflight;
    auto fetch = [&](uint64_t seq) {
        std::string key = segment_key(db_id, chosen.generation, seq);
        // Capped at the largest object a valid segment can be (format.h), not
        // at the client's default, which a legitimate 1 GiB segment may exceed.
        return std::async(std::launch::async, [&client, bucket, key]() {
            return client.get_object(bucket, key, std::nullopt, nullptr, max_segment_object_size());
        });
    };
    for (uint64_t seq = 1; seq <= last_seq && !stop; ++seq) {
        while (next_fetch <= last_seq && static_cast<int>(inflight.size()) < window) {
            inflight.emplace(next_fetch, fetch(next_fetch));
            ++next_fetch;
        }
        std::string key = segment_key(db_id, chosen.generation, seq);
        auto body = inflight.at(seq).get();
        inflight.erase(seq);
        if (!body) {
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
        // Frames are written as they are decoded: memory holds the object
        // and one page, whatever the segment decodes to. Frames written
        // before a later error do not matter: the temp file is discarded.
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
            if (!pwrite_full(tmp.fd, page.data(), page.size(), off))
                return make_error(ErrorKind::Io, "cannot write " + tmp.path + ": " + errno_text(errno), "WriteFailed");
            return {};
        };
        auto seg_sha = for_each_segment_frame(*body, key, options.cipher.get(), on_header, on_frame);
        if (!seg_sha) return std::move(seg_sha).error();
        body->clear();
        body->shrink_to_fit();
        for (size_t t = 0; t < apply_txns; ++t) {
            res.db_pages = h.txns[t].db_pages;
            res.last_commit_us = h.txns[t].commit_us;
            ++res.transactions;
        }
        stop = apply_txns < h.txns.size();
        if (stop) break;
        res.seq = seq;
        res.position = h.end;
        res.last_sha256 = *seg_sha;
        if (options.progress) options.progress(res.bytes_downloaded, total);
    }
    for (auto& [seq, fut] : inflight) fut.wait();  // do not leave downloads running into freed state

    if (::ftruncate(tmp.fd, static_cast<off_t>(static_cast<uint64_t>(res.db_pages) * res.page_size)) != 0 ||
        ::fsync(tmp.fd) != 0)
        return make_error(ErrorKind::Io, "cannot finish " + tmp.path + ": " + errno_text(errno), "WriteFailed");
    ::close(tmp.fd);
    tmp.fd = -1;

    if (options.integrity_check) {
        if (auto st = integrity_check(tmp.path); !st) return std::move(st).error();
    }
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
    res.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    return res;
}

}  // namespace bottomless::replicator
