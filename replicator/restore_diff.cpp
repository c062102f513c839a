// Which pages of a format-2 snapshot differ from an older local copy
// (restore_incremental.h): the snapshot's page index against the copy's
// page digests or, without them, its pages hashed by a few threads.
#include <algorithm>
#include <atomic>
#include <cerrno>
#include <random>
#include <thread>

#include "replicator/restore_incremental.h"
#include "replicator/util.h"
#include "s3/log.h"

namespace bottomless::replicator::restore_detail {

Result<PageDiff> diff_against_index(s3::Client& client, const std::string& bucket, const std::string& key,
                                    const RestoreTarget& target, int fd, uint32_t copy_pages,
                                    const std::optional<std::string>& copy_digests, RestoreResult& res) {
    const SnapshotHeader& h = target.snapshot;
    const uint64_t size = target.snapshot_bytes, tail = page_index_tail_size(h);
    if (tail > size)
        return not_incremental(key + " is " + std::to_string(size) + " bytes, too small for the page index its header declares");
    auto t = client.get_object(bucket, key, s3::ByteRange{size - tail, tail}, nullptr, tail);
    if (!t) {
        Error e = std::move(t).error();
        if (e.kind == ErrorKind::NotFound)
            e = make_error(ErrorKind::Corrupt, "snapshot " + key + " disappeared during the restore", "MissingSnapshot");
        return e;
    }
    res.bytes_downloaded += t->size();
    auto idx = parse_page_index(*t, size, h, key);
    if (!idx) return not_incremental("the page index of " + key + " is unusable (" + idx.error().message + ")");
    PageDiff d;
    d.index = std::move(*idx);
    d.differs.assign(uint64_t{h.db_pages} + 1, 0);
    const auto tc = Clock::now();
    const uint32_t ps = h.page_size, common = std::min(copy_pages, h.db_pages);
    res.pages_compared = common;
    // The restore that wrote the copy left its pages' digests: trusted as
    // far as the note is (size, mtime, inode), and spot-checked against
    // page 1 and 16 pages at random (a change that kept the mtime).
    std::optional<std::string> digests_ok = copy_digests;
    if (digests_ok && common > 0) {
        std::string page(ps, '\0');
        std::mt19937 rng(std::random_device{}());
        for (int i = 0; i <= 16 && digests_ok; ++i) {
            const uint32_t p = i == 0 ? 1 : 1 + static_cast<uint32_t>(rng() % common);
            if (!pread_full(fd, page.data(), ps, uint64_t{p - 1} * ps) ||
                page_hash(page) != std::string_view(*digests_ok).substr(uint64_t{p - 1} * kPageHashSize, kPageHashSize)) {
                log::warn("the page digests beside the copy do not match its page " + std::to_string(p) +
                          ": the copy is read and hashed instead");
                digests_ok.reset();
            }
        }
    }
    res.compared_with = digests_ok ? "digests" : "file";
    if (digests_ok)
        for (uint32_t p = 1; p <= common; ++p)
            if (std::string_view(*digests_ok).substr(uint64_t{p - 1} * kPageHashSize, kPageHashSize) != d.index.hash(p))
                d.differs[p] = 1;
    // Else SHA-256, ~1.5 GB/s a core: the copy is hashed by several
    // threads, each over its own stripes of 1 MiB (`differs` has a byte per
    // page, so no two threads write the same byte).
    const uint32_t per = std::max<uint32_t>(1, (1u << 20) / ps);
    const uint32_t stripes = common == 0 || digests_ok ? 0 : (common - 1) / per + 1;
    const unsigned threads = std::max(1u, std::min({std::thread::hardware_concurrency(), 4u, stripes}));
    std::atomic<uint32_t> next{0};
    std::atomic<int> read_errno{0};
    auto hash_stripes = [&]() noexcept {
        try {  // nothing may escape a thread (bad_alloc, a failing hash)
            std::string buf(uint64_t{per} * ps, '\0');
            for (uint32_t st; (st = next.fetch_add(1)) < stripes && read_errno.load() == 0;) {
                const uint32_t p = st * per + 1, n = std::min(per, common - p + 1);
                if (!pread_full(fd, buf.data(), uint64_t{n} * ps, uint64_t{p - 1} * ps)) {
                    read_errno = errno ? errno : EIO;
                    return;
                }
                for (uint32_t i = 0; i < n; ++i)
                    if (page_hash(std::string_view(buf).substr(uint64_t{i} * ps, ps)) != d.index.hash(p + i))
                        d.differs[p + i] = 1;
            }
        } catch (...) {
            read_errno = ENOMEM;
        }
    };
    {
        std::vector<std::jthread> pool;  // joined on every way out
        try {
            for (unsigned t = 1; t < threads; ++t) pool.emplace_back(hash_stripes);
        } catch (...) {  // fewer threads: the others (and this one) take the stripes
        }
        hash_stripes();
    }
    if (read_errno)
        return make_error(ErrorKind::Io, "cannot read the copy to compare its pages: " + errno_text(read_errno),
                          "ReadFailed");
    for (uint64_t p = uint64_t{common} + 1; p <= h.db_pages; ++p) d.differs[p] = 1;
    res.timings.compare = seconds_since(tc);
    plan_runs(d);
    return d;
}

void plan_runs(PageDiff& d) {
    constexpr uint64_t kRun = 1ull << 20;
    const uint32_t db_pages = static_cast<uint32_t>(d.differs.size() - 1);
    d.runs.clear();
    for (uint32_t f = 0; f < d.index.frames(); ++f) {
        const uint32_t first = f * d.index.frame_pages + 1, last = std::min(first + d.index.frame_pages - 1, db_pages);
        bool need = false;
        for (uint32_t p = first; p <= last && !need; ++p) need = d.differs[p] != 0;
        if (!need) continue;
        // One frame not needed between two that are: fetched through rather
        // than a GET more (a GET's latency against at most one frame's bytes).
        if (!d.runs.empty() && d.runs.back().second + 1 >= f &&
            d.index.frame_offset[f + 1] - d.index.frame_offset[d.runs.back().first] <= kRun)
            d.runs.back().second = f + 1;
        else
            d.runs.emplace_back(f, f + 1);
    }
}

uint64_t PageDiff::run_bytes() const {
    uint64_t n = 0;
    for (const auto& [f0, f1] : runs) n += index.frame_offset[f1] - index.frame_offset[f0];
    return n;
}

}  // namespace bottomless::replicator::restore_detail
