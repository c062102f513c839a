// Read replicas: hydration (the file from the bucket's newest state, by
// rename or rewritten in place) and at= time travel (a private read-only
// copy of a past state). See replica.h, docs/SEMANTICS.md "Read replicas".
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <filesystem>
#include <random>

#include "replicator/replica_internal.h"
#include "replicator/restore.h"
#include "replicator/util.h"
#include "s3/log.h"

namespace bottomless::replicator {

using namespace replica_detail;

namespace {

std::string cache_dir() {
    // XDG: a relative XDG_CACHE_HOME is invalid and ignored.
    const char* xdg = std::getenv("XDG_CACHE_HOME");
    const char* home = std::getenv("HOME");
    std::string base = xdg && *xdg == '/' ? xdg : home && *home ? std::string(home) + "/.cache" : "/tmp";
    return base + "/bottomless";
}

// The file name of a time-travel copy under cache_dir(): the id (checked by
// check_replica_db_id()), the time and a random tail, so two opens never
// share a file.
Result<std::string> time_travel_file_name(const std::string& db_id, int64_t at_us) {
    if (auto st = check_replica_db_id(db_id); !st) return std::move(st).error();
    std::random_device rd;
    char rnd[9];
    std::snprintf(rnd, sizeof rnd, "%08x", static_cast<unsigned>(rd()));
    std::string name = db_id + "@" + std::to_string(at_us) + "-" + std::to_string(::getpid()) + "-" + rnd + ".db";
    // Belt and braces: one component, nothing the directory could be left by.
    if (name.find('/') != std::string::npos || name.find('\0') != std::string::npos)
        return make_error(ErrorKind::InvalidArgument, "the time-travel copy's name is not a plain file name", "BadDatabaseId");
    return name;
}

}  // namespace

// ---- time travel ----

Status Replica::init_time_travel() {
    // Before any request or file: the id names the copy (and S3 keys).
    auto name = time_travel_file_name(cfg_.db_id, *cfg_.replica_at_us);
    if (!name) return std::move(name).error();
    auto cipher = open_cipher(*client_, cfg_.bucket, cfg_.db_id, cfg_.encryption, /*create=*/false);
    if (!cipher) return std::move(cipher).error();
    cipher_ = *cipher;
    const std::string dir = cache_dir();
    std::error_code ec;
    std::filesystem::create_directories(dir, ec);  // the pages may be secrets: private
    if (ec) return make_error(ErrorKind::Io, "cannot create the cache directory " + dir + ": " + ec.message(), "OpenFailed");
    (void)::chmod(dir.c_str(), 0700);
    path_ = dir + "/" + *name;
    owns_copy_ = true;  // from here the destructor removes the copy (also a partial one)
    RestoreOptions o;
    o.until_us = cfg_.replica_at_us;
    o.cipher = cipher_;
    auto res = restore_database(*client_, cfg_.bucket, cfg_.db_id, path_, o);
    ::unlink((path_ + "-bottomless").c_str());  // restore's note and digests: this copy is never replicated
    ::unlink(page_digests_path(path_).c_str());
    if (!res) {
        Error e = std::move(res).error();
        e.message = "time travel to " + fmt_time_us(*cfg_.replica_at_us) + " failed: " + e.message;
        return e;
    }
    time_travel_ = true;
    // No connection has the copy yet: a plain descriptor is safe here.
    int fd = ::open(path_.c_str(), O_RDWR | O_CLOEXEC | O_NOFOLLOW);
    if (fd < 0) return make_error(ErrorKind::Io, "cannot open " + path_ + ": " + errno_text(errno), "OpenFailed");
    unsigned char h[kHeader] = {};
    bool ok = pread_full(fd, h, sizeof h, 0);
    if (ok) {
        make_legacy_header(h, get_be32(h + 24) + 1, res->db_pages);
        ok = pwrite_full(fd, h, sizeof h, 0);
    }
    ::close(fd);
    if (!ok) return make_error(ErrorKind::Io, "cannot prepare " + path_ + ": " + errno_text(errno), "WriteFailed");
    std::lock_guard lock(mu_);
    state_ = restored_state(cfg_.bucket, cfg_.db_id, *res);
    file_name_ = const_cast<char*>(
        sqlite3_create_filename(path_.c_str(), (path_ + "-journal").c_str(), (path_ + "-wal").c_str(), 0, nullptr));
    if (!file_name_) return make_error(ErrorKind::Io, "out of memory", "OpenFailed");
    return {};
}

// ---- hydration ----

namespace {

// What a hydration leaves beside the image, removed before and after it.
void remove_image_files(const std::string& tmp) {
    for (const std::string& p : {tmp, tmp + "-bottomless", page_digests_path(tmp), tmp + "-wal", tmp + "-shm",
                                 tmp + ".restore-wal", tmp + ".restore-tmp"})
        ::unlink(p.c_str());
}

}  // namespace

bool Replica::seed_image(const std::string& tmp) {
    ReplicaState s;
    {
        std::lock_guard lock(mu_);
        s = state_;
    }
    auto no = [&](const std::string& why) {
        log::info("replica " + path_ + ": the new image starts empty (" + why + "): the snapshot is downloaded in full");
        remove_image_files(tmp);
        return false;
    };
    if (s.generation.empty() || s.applying || !valid_page_size(s.page_size) || s.db_pages == 0)
        return no("the replica's state is not a proven one");
    Fd src(::open(path_.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW));
    struct stat st{};
    if (src.fd < 0 || ::fstat(src.fd, &st) != 0 || static_cast<uint64_t>(st.st_size) != uint64_t{s.db_pages} * s.page_size)
        return no("the replica's file is not the size its state records");
    remove_image_files(tmp);  // a crash's leftovers (a WAL journal would make the copy unprovable)
    Fd dst(::open(tmp.c_str(), O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600));
    if (dst.fd < 0 || duplicate_file(src.fd, dst.fd, static_cast<uint64_t>(st.st_size)) < 0)
        return no("cannot copy the replica's file into " + tmp + ": " + errno_text(errno));
    // The replica's file is in rollback format; the image goes through a
    // WAL journal (only the changed pages written), so it says WAL mode.
    // Page 1 then differs from the bucket's whatever else does: it is fetched.
    unsigned char h[kHeader] = {};
    if (!pread_full(dst.fd, h, sizeof h, 0)) return no("cannot read " + tmp + ": " + errno_text(errno));
    h[18] = h[19] = 2;
    if (!pwrite_full(dst.fd, h, sizeof h, 0)) return no("cannot write " + tmp + ": " + errno_text(errno));
    // The note a restore of the replica's state would have left.
    RestoreResult as_restored;
    as_restored.generation = s.generation;
    as_restored.seq = s.seq;
    as_restored.last_sha256 = s.last_sha256;
    as_restored.position = s.position;
    as_restored.page_size = s.page_size;
    as_restored.db_pages = s.db_pages;
    as_restored.last_commit_us = s.last_commit_us;
    if (Status w = write_restore_note(tmp, s.bucket, s.db_id, as_restored); !w) return no(w.error().message);
    return true;
}

Status Replica::hydrate(const std::string& why, const std::string& generation, bool from_file) {
    log::info("replica " + path_ + ": hydrating from the bucket (" + why + ")");
    RestoreOptions o;
    o.cipher = cipher_;
    o.generation = generation;
    o.cancel = &closing_;  // the last connection closing stops the download
    const std::string tmp = path_ + ".replica-new";
    // A generation change: start from the replica's own pages, so that only
    // what differs is downloaded (a snapshot with a page index: its frames
    // holding changed pages); what cannot be proven is restored in full.
    if (from_file && seed_image(tmp)) {
        o.incremental = true;
        o.full_if_refused = true;
    } else {
        remove_image_files(tmp);
    }
    auto res = restore_database(*client_, cfg_.bucket, cfg_.db_id, tmp, o);
    ::unlink((tmp + "-bottomless").c_str());
    ::unlink(page_digests_path(tmp).c_str());
    if (res) {
        std::lock_guard lock(mu_);
        last_hydration_mode_ = res->incremental.empty() ? "full" : res->incremental;
        last_hydration_bytes_ = res->bytes_downloaded;
    }
    if (res && !res->incremental.empty())
        log::info("replica " + path_ + ": new image " + res->incremental +
                  (res->incremental_reason.empty() ? "" : " (" + res->incremental_reason + ")") + ", " +
                  std::to_string(res->bytes_downloaded) + " bytes downloaded");
    if (!res) {
        remove_image_files(tmp);
        Error e = std::move(res).error();
        e.message = "cannot hydrate the replica " + path_ + " from s3://" + cfg_.bucket + "/" + cfg_.db_id + ": " + e.message;
        return e;
    }
    // The image (as large as the database) never outlives this call, on
    // any path (renamed into place, or copied in and removed).
    struct RemoveTmp {
        const std::string& p;
        ~RemoveTmp() { ::unlink(p.c_str()); }
    } remove_tmp{tmp};
    ReplicaState s = restored_state(cfg_.bucket, cfg_.db_id, *res);
    {
        std::lock_guard lock(mu_);
        s.counter = state_.counter + 1;
    }
    // The new image, in rollback format, in the temp file (ours alone).
    Fd src(::open(tmp.c_str(), O_RDWR | O_CLOEXEC | O_NOFOLLOW));
    unsigned char h[kHeader] = {};
    if (src.fd < 0 || !pread_full(src.fd, h, sizeof h, 0))
        return make_error(ErrorKind::Io, "cannot read " + tmp + ": " + errno_text(errno), "OpenFailed");
    s.counter = std::max(s.counter, get_be32(h + 24) + 1);
    make_legacy_header(h, s.counter, s.db_pages);
    if (!pwrite_full(src.fd, h, sizeof h, 0) || ::fsync(src.fd) != 0)
        return make_error(ErrorKind::Io, "cannot write " + tmp + ": " + errno_text(errno), "WriteFailed");

    struct stat st{};
    if (!file_->is_open() && ::stat(path_.c_str(), &st) != 0) {
        // No replica file yet, so no reader: the image is renamed into place.
        for (const char* suffix : {"-journal", "-wal", "-shm"}) ::unlink((path_ + suffix).c_str());
        if (::rename(tmp.c_str(), path_.c_str()) != 0)
            return make_error(ErrorKind::Io, "cannot rename " + tmp + ": " + errno_text(errno), "RenameFailed");
        fsync_dir_of(path_);
        if (auto o2 = file_->open(path_); !o2) return o2;
    } else {
        // Readers may have the file open: it is rewritten in place (same
        // inode) under the exclusive lock, as one big apply.
        if (!file_->is_open())
            if (auto o2 = file_->open(path_); !o2) return o2;
        if (auto l = lock_exclusive(*file_); !l) return l;
        bool rolled = false;
        Status w = rollback_journal_locked(&rolled);  // a torn file is never journaled as the original
        ReplicaState mark;
        {
            std::lock_guard lock(mu_);
            mark = state_;
        }
        mark.applying = true;
        if (w) w = save_state(mark, true);
        // Only the pages that differ are journaled and written (a new
        // generation mostly holds the same pages); with another page size,
        // all of them.
        const uint32_t ps = s.page_size;
        const int64_t cur_size = file_->size();
        // An unknown size would journal "0 pages" as the original: a crash
        // would then roll the file back to empty.
        if (w && cur_size < 0) w = file_->check(SQLITE_IOERR_FSTAT, "size");
        unsigned char cur_h[kHeader] = {};
        uint32_t cur_ps = 0;
        if (w && cur_size >= static_cast<int64_t>(kHeader) && file_->read(cur_h, sizeof cur_h, 0)) {
            cur_ps = (uint32_t{cur_h[16]} << 8) | cur_h[17];
            if (cur_ps == 1) cur_ps = 65536;
        }
        const bool same_ps = cur_ps == ps;
        const uint32_t jps = valid_page_size(cur_ps) ? cur_ps : ps;
        const uint32_t orig_pages = cur_size > 0 ? static_cast<uint32_t>(cur_size / jps) : 0;
        std::vector<uint32_t> changed, journal;
        std::string a(ps, '\0'), b(ps, '\0');
        for (uint32_t p = 1; w && p <= s.db_pages; ++p) {
            const int64_t off = static_cast<int64_t>(p - 1) * ps;
            if (!pread_full(src.fd, a.data(), ps, static_cast<uint64_t>(off))) {
                w = make_error(ErrorKind::Io, "cannot read " + tmp + ": " + errno_text(errno), "ReadFailed");
                break;
            }
            if (same_ps && p <= orig_pages) {
                if (auto r = file_->read(b.data(), static_cast<int>(ps), off); !r) w = r;
                else if (a == b) continue;
            }
            changed.push_back(p);
        }
        if (same_ps) {
            journal = changed;
            for (uint32_t p = s.db_pages + 1; p <= orig_pages; ++p) journal.push_back(p);
        } else {
            for (uint32_t p = 1; p <= orig_pages; ++p) journal.push_back(p);
        }
        if (w && !journal.empty()) w = write_journal(journal, orig_pages, jps);
        const bool journaled = w && !journal.empty();
        for (size_t i = 0; w && i < changed.size(); ++i) {
            const int64_t off = static_cast<int64_t>(changed[i] - 1) * ps;
            if (!pread_full(src.fd, a.data(), ps, static_cast<uint64_t>(off)))
                w = make_error(ErrorKind::Io, "cannot read " + tmp + ": " + errno_text(errno), "ReadFailed");
            else w = file_->write(a.data(), static_cast<int>(ps), off);
        }
        const uint64_t size = uint64_t{s.db_pages} * ps;
        if (w && file_->size() != static_cast<int64_t>(size)) w = file_->truncate(static_cast<int64_t>(size));
        if (w) w = file_->sync();
        // The state (and status) moves before readers can see the new
        // content; deleting the journal is the commit point.
        if (w) w = hydrated(s, why);
        if (w && journaled && ::unlink((path_ + "-journal").c_str()) != 0)
            w = make_error(ErrorKind::Io, "cannot delete the journal " + path_ + "-journal: " + errno_text(errno),
                           "WriteFailed");
        if (!w && journaled) {
            bool back = false;
            if (auto rb = rollback_journal_locked(&back); !rb)
                log::warn("replica " + path_ + ": cannot roll back a failed hydration: " + rb.error().message);
        }
        file_->unlock(SQLITE_LOCK_NONE);
        ::unlink(tmp.c_str());
        if (!w) {
            std::lock_guard lock(mu_);
            state_.applying = true;
        }
        return w;  // on failure the mark stays: the next step (or open) hydrates again
    }
    return hydrated(s, why);
}

Status Replica::hydrated(const ReplicaState& s, const std::string& why) {
    if (auto w = save_state(s, false); !w) return w;
    std::lock_guard lock(mu_);
    ++hydrations_;
    broken_ = false;
    stalled_ = false;
    follow_error_.clear();
    miss_since_ = {};
    last_event_ = "hydrated generation " + s.generation + " at segment " + std::to_string(s.seq) + ": " + why;
    caught_up_us_ = now_us();
    return {};
}

}  // namespace bottomless::replicator
