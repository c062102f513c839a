// Read replicas: the rollback journal an apply or an in-place hydration
// writes, and its playback (replica.h, docs/SEMANTICS.md "Read replicas").
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <random>

#include "replicator/replica_internal.h"
#include "replicator/util.h"
#include "s3/log.h"

namespace bottomless::replicator {

using namespace replica_detail;

namespace {

constexpr unsigned char kJournalMagic[8] = {0xd9, 0xd5, 0x05, 0xf9, 0x20, 0xa1, 0x63, 0xd7};
// The header is padded to one "sector"; records follow it. Any power of two
// from 32 is valid to SQLite's reader; 512 keeps the journal small.
constexpr uint32_t kJournalSector = 512;

// SQLite's page checksum in a journal record: the nonce plus every 200th
// byte from the end of the page (pager.c, pager_cksum).
uint32_t journal_cksum(uint32_t nonce, const unsigned char* page, uint32_t page_size) {
    uint32_t c = nonce;
    for (int i = static_cast<int>(page_size) - 200; i > 0; i -= 200) c += page[i];
    return c;
}

}  // namespace

long replica_detail::exit_after_pages() {
    static const long n = [] {
        const char* v = std::getenv("BOTTOMLESS_TEST_REPLICA_EXIT_AFTER_PAGES");
        return v ? std::atol(v) : 0L;
    }();
    return n;
}


Status Replica::write_journal(const std::vector<uint32_t>& pgnos, uint32_t orig_pages, uint32_t page_size) {
    const std::string jp = path_ + "-journal";
    auto fail = [&](const char* what) {
        return make_error(ErrorKind::Io, std::string("cannot ") + what + " the journal " + jp + ": " + errno_text(errno),
                          "WriteFailed");
    };
    Fd fd(::open(jp.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0644));
    if (fd.fd < 0) return fail("create");
    uint32_t nonce = 0;
    {
        std::random_device rd;
        nonce = static_cast<uint32_t>(rd());
    }
    // Records first, at offset kJournalSector, then the header: a crash
    // before the header is durable leaves a journal whose first byte is 0,
    // which SQLite ignores (the file was not touched yet).
    const uint32_t lock_pgno = static_cast<uint32_t>(0x40000000u / page_size) + 1;
    const size_t rec = size_t{page_size} + 8;
    std::string buf;
    buf.reserve(std::max<size_t>(rec, 1u << 20));
    uint64_t off = kJournalSector;
    uint32_t nrec = 0;
    for (uint32_t pgno : pgnos) {
        if (pgno == 0 || pgno > orig_pages || pgno == lock_pgno) continue;
        const size_t at = buf.size();
        buf.resize(at + rec);
        auto* r = reinterpret_cast<unsigned char*>(buf.data() + at);
        put_be32(r, pgno);
        if (auto rd = file_->read(r + 4, static_cast<int>(page_size), static_cast<int64_t>(pgno - 1) * page_size); !rd)
            return rd;
        put_be32(r + 4 + page_size, journal_cksum(nonce, r + 4, page_size));
        ++nrec;
        if (buf.size() + rec > buf.capacity()) {
            if (!pwrite_full(fd.fd, buf.data(), buf.size(), off)) return fail("write");
            off += buf.size();
            buf.clear();
        }
    }
    if (!buf.empty() && !pwrite_full(fd.fd, buf.data(), buf.size(), off)) return fail("write");
    if (::fsync(fd.fd) != 0) return fail("sync");
    unsigned char h[kJournalSector] = {};
    std::memcpy(h, kJournalMagic, sizeof kJournalMagic);
    put_be32(h + 8, nrec);
    put_be32(h + 12, nonce);
    put_be32(h + 16, orig_pages);
    put_be32(h + 20, kJournalSector);
    put_be32(h + 24, page_size);
    if (!pwrite_full(fd.fd, h, sizeof h, 0)) return fail("write");
    if (::fsync(fd.fd) != 0) return fail("sync");
    if (!fsync_dir_of(jp)) return fail("sync the directory of");
    return {};
}

// Plays a hot journal back as SQLite would: every record whose checksum
// holds (up to the header's count; the first bad one ends it) puts its page
// back (the first record of a page wins), the file is cut to its original
// size and fsynced, and the journal is deleted. A journal that is not hot
// (missing, first byte 0, no magic) is only deleted.
Status Replica::rollback_journal_locked(bool* rolled_back) {
    *rolled_back = false;
    const std::string jp = path_ + "-journal";
    Fd fd(::open(jp.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW));
    if (fd.fd < 0) {
        if (errno == ENOENT) return {};
        return make_error(ErrorKind::Io, "cannot open the journal " + jp + ": " + errno_text(errno), "OpenFailed");
    }
    struct stat st{};
    if (::fstat(fd.fd, &st) != 0)
        return make_error(ErrorKind::Io, "cannot stat the journal " + jp + ": " + errno_text(errno), "OpenFailed");
    unsigned char h[28] = {};
    const bool hot = st.st_size >= static_cast<off_t>(sizeof h) && pread_full(fd.fd, h, sizeof h, 0) && h[0] != 0 &&
                     std::memcmp(h, kJournalMagic, sizeof kJournalMagic) == 0;
    if (hot) {
        const uint32_t nrec = get_be32(h + 8), nonce = get_be32(h + 12), orig_pages = get_be32(h + 16);
        const uint32_t sector = get_be32(h + 20), ps = get_be32(h + 24);
        if (!valid_page_size(ps) || sector < 32 || sector > 65536 || (sector & (sector - 1)) != 0)
            return make_error(ErrorKind::Corrupt,
                              "the journal " + jp + " has an invalid header; move it away and open the replica again "
                                                    "(it will be hydrated from the bucket)",
                              "CorruptJournal");
        std::vector<unsigned char> r(size_t{ps} + 8);
        std::vector<bool> done(size_t{orig_pages} + 1, false);
        uint64_t off = sector;
        for (uint32_t i = 0; i < nrec && off + r.size() <= static_cast<uint64_t>(st.st_size); ++i, off += r.size()) {
            if (!pread_full(fd.fd, r.data(), r.size(), off))
                return make_error(ErrorKind::Io, "cannot read the journal " + jp + ": " + errno_text(errno), "ReadFailed");
            const uint32_t pgno = get_be32(r.data());
            if (pgno == 0 || get_be32(r.data() + 4 + ps) != journal_cksum(nonce, r.data() + 4, ps)) break;
            if (pgno > orig_pages || done[pgno]) continue;
            done[pgno] = true;
            if (auto w = file_->write(r.data() + 4, static_cast<int>(ps), static_cast<int64_t>(pgno - 1) * ps); !w) return w;
        }
        if (file_->size() > static_cast<int64_t>(uint64_t{orig_pages} * ps))
            if (auto t = file_->truncate(static_cast<int64_t>(uint64_t{orig_pages} * ps)); !t) return t;
        if (auto s = file_->sync(); !s) return s;
        *rolled_back = true;
    }
    if (::unlink(jp.c_str()) != 0 && errno != ENOENT)
        return make_error(ErrorKind::Io, "cannot delete the journal " + jp + ": " + errno_text(errno), "WriteFailed");
    return {};
}

Status Replica::recover_journal() {
    struct stat st{};
    if (::stat((path_ + "-journal").c_str(), &st) != 0) return {};
    if (!file_->is_open())
        if (auto o = file_->open(path_); !o) return o;
    if (auto l = lock_exclusive(*file_); !l) return l;
    bool rolled = false;
    Status r = rollback_journal_locked(&rolled);
    file_->unlock(SQLITE_LOCK_NONE);
    if (r && rolled) {
        log::warn("replica " + path_ + ": rolled back the journal of an apply that did not finish");
        std::lock_guard lock(mu_);
        last_event_ = "rolled back the journal of an apply that did not finish (a follower died in the middle)";
    }
    return r;
}

}  // namespace bottomless::replicator
