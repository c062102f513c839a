// The tee (tee.h): frames as SQLite writes them, placed by offset.
#include "replicator/tee.h"

#include <algorithm>
#include <cstring>
#include <iterator>

namespace bottomless::replicator {

namespace {
// Epochs kept at most (each restart with unshipped frames adds one); past
// it the oldest is forgotten and its frames, if still needed, come from the
// WAL or a snapshot.
constexpr size_t kMaxEpochs = 64;
// The fewest pages worth a slab of their own (page_buf.h).
constexpr size_t kMinSlabPages = 8;
}  // namespace

Tee::Epoch* Tee::find(uint32_t salt1, uint32_t salt2) {
    for (auto it = epochs_.rbegin(); it != epochs_.rend(); ++it)
        if (it->salt1 == salt1 && it->salt2 == salt2) return &*it;
    return nullptr;
}

const Tee::Epoch* Tee::find(uint32_t salt1, uint32_t salt2) const {
    return const_cast<Tee*>(this)->find(salt1, salt2);
}

Tee::Epoch& Tee::newest_for(uint32_t salt1, uint32_t salt2, uint32_t page_size) {
    if (Epoch* e = find(salt1, salt2)) return *e;
    if (epochs_.size() >= kMaxEpochs) {
        Epoch& old = epochs_.front();
        erase_frames(old, old.frames.begin(), old.frames.end());
        epochs_.pop_front();
    }
    Epoch e;
    e.salt1 = salt1;
    e.salt2 = salt2;
    e.page_size = page_size;
    epochs_.push_back(std::move(e));
    hole_upto_.store(0, std::memory_order_relaxed);  // a hole was in the previous epoch
    return epochs_.back();
}

void Tee::erase_frames(Epoch& e, std::map<uint64_t, TeeFrame>::iterator from,
                       std::map<uint64_t, TeeFrame>::iterator to) {
    uint64_t freed = 0;
    for (auto it = from; it != to; ++it) {
        freed += kWalFrameHeaderSize + e.page_size;
        // The page becomes a spare: memory held falls by its header either way.
        // One not kept (the spares are full) is freed here, under mu_: the
        // last page of a slab unmaps it. Rare (spares full while frames are
        // forgotten), so not worth moving out of the lock.
        keep_spare_locked(it->second.page);
    }
    e.frames.erase(from, to);
    bytes_.fetch_sub(std::min(freed, bytes_.load(std::memory_order_relaxed)), std::memory_order_relaxed);
}

void Tee::keep_spare_locked(PageBuf& page) noexcept {
    const uint64_t size = page.size();
    if (size == 0 || (!spares_.empty() && spares_.back().size() != size) ||
        spare_bytes_.load(std::memory_order_relaxed) + size > spare_cap_)
        return;
    try {
        spares_.push_back(std::move(page));
        spare_bytes_.fetch_add(size, std::memory_order_relaxed);
    } catch (...) {
        // Not kept: freed with its frame.
    }
}

void Tee::write(uint64_t off, const unsigned char* p, size_t n, uint32_t page_size, uint64_t other_bytes) noexcept {
    try {
        std::lock_guard lock(mu_);
        write_locked(off, p, n, page_size, other_bytes);
    } catch (...) {
        // Out of memory: the frame is not kept; the WAL keeps it.
        hole_upto_.store(UINT64_MAX, std::memory_order_relaxed);
    }
}

void Tee::write_locked(uint64_t off, const unsigned char* p, size_t n, uint32_t page_size, uint64_t other_bytes) {
    if (page_size < 512 || page_size > 65536) return;
    if (off < kWalHeaderSize) {
        if (off == 0 && n >= kWalHeaderSize) {
            if (auto h = parse_wal_header(p)) newest_for(h->salt1, h->salt2, h->page_size).header = *h;
        }
        size_t skip = static_cast<size_t>(std::min<uint64_t>(n, kWalHeaderSize - off));
        p += skip;
        off += skip;
        n -= skip;
    }
    const uint64_t fsz = kWalFrameHeaderSize + page_size;
    while (n > 0) {
        const uint64_t i = (off - kWalHeaderSize) / fsz + 1;
        const uint64_t within = (off - kWalHeaderSize) % fsz;
        const size_t len = static_cast<size_t>(std::min<uint64_t>(n, fsz - within));
        Epoch* e = nullptr;
        if (within == 0 && len >= kWalFrameHeaderSize && (read_be32(p + 8) | read_be32(p + 12)) != 0) {
            // A frame header names its epoch (its salts): a restart shows here
            // even when another connection of this process wrote the header.
            last_salt1_ = read_be32(p + 8);
            last_salt2_ = read_be32(p + 12);
            e = &newest_for(last_salt1_, last_salt2_, page_size);
        } else {
            // A page, or a frame header with zero salts and checksums: once a
            // transaction has rewritten a frame in place, SQLite writes its
            // new frames that way and fills both in at commit
            // (walRewriteChecksums). Either belongs to the last epoch seen.
            e = find(last_salt1_, last_salt2_);  // the rest of a frame whose header came just before
        }
        if (e && e->page_size == page_size) {
            // SQLite appends: a frame's header is a new last frame, its page
            // goes to the last frame. Both without a walk down the map (two
            // lookups per frame in a map of ~10 000 cost the writer ~6 %).
            auto it = e->frames.end();
            if (!e->frames.empty()) {
                auto last = std::prev(e->frames.end());
                if (last->first == i) it = last;
                else if (last->first > i) it = e->frames.find(i);  // a frame rewritten in place
            }
            if (it == e->frames.end() && within == 0) {
                const uint64_t mine = bytes_.load(std::memory_order_relaxed) + fsz;
                // Behind a hole, half the limit stays free for the frames the
                // uploader must read from the WAL before it can use ours (tee.h).
                if (mine + other_bytes > cap_ || (has_hole() && mine > cap_ / 2)) {
                    if (e == &epochs_.back() && i > hole_upto_.load(std::memory_order_relaxed))
                        hole_upto_.store(i, std::memory_order_relaxed);
                } else {
                    TeeFrame f;
                    f.page = page_buffer_locked(page_size, mine + other_bytes);
                    it = e->frames.emplace_hint(e->frames.end(), i, std::move(f));
                    bytes_.fetch_add(fsz, std::memory_order_relaxed);
                }
            }
            if (it != e->frames.end()) {
                TeeFrame& f = it->second;
                size_t done = 0;
                if (within < kWalFrameHeaderSize) {
                    done = static_cast<size_t>(std::min<uint64_t>(len, kWalFrameHeaderSize - within));
                    std::memcpy(f.header + within, p, done);
                }
                if (done < len) {
                    const uint64_t page_off = within + done - kWalFrameHeaderSize;
                    std::memcpy(f.page.data() + page_off, p + done, len - done);
                }
            }
        }
        p += len;
        off += len;
        n -= len;
    }
}

PageBuf Tee::page_buffer_locked(uint32_t page_size, uint64_t used) {
    if (!spares_.empty() && spares_.back().size() == page_size) {
        PageBuf page = std::move(spares_.back());
        spares_.pop_back();
        spare_bytes_.fetch_sub(page_size, std::memory_order_relaxed);
        return page;
    }
    // A new slab (page_buf.h): this page, and as spares as many more as the
    // tee already holds frames (a slab grows with the demand it meets: a
    // database committing a frame now and then takes one page at a time),
    // within the limits. `used`: memory held with this page counted.
    size_t extra = 0;
    if (spares_.empty()) {
        const uint64_t spare = spare_bytes_.load(std::memory_order_relaxed);
        const uint64_t all = used + spare;
        const uint64_t room = std::min(spare_cap_ > spare ? spare_cap_ - spare : 0, cap_ > all ? cap_ - all : 0);
        const uint64_t held = bytes_.load(std::memory_order_relaxed) / frame_bytes(page_size);
        extra = static_cast<size_t>(std::min({room / page_size, held, uint64_t{PageBuf::slab_pages(page_size) - 1}}));
    }
    // A small demand takes a heap page alone: one mapping per page would
    // cost a system call each and, with many databases, the process's
    // mappings (vm.max_map_count).
    if (extra < kMinSlabPages - 1) return PageBuf::zeroed(page_size);
    std::vector<PageBuf> slab;
    try {
        slab = PageBuf::slab(page_size, 1 + extra);
    } catch (const std::bad_alloc&) {
        // No mapping (vm.max_map_count, RLIMIT_AS): the heap may still have
        // a page; if not, this throws and the frame is not kept.
        return PageBuf::zeroed(page_size);
    }
    PageBuf page = std::move(slab.back());
    slab.pop_back();
    try {
        spares_.reserve(spares_.size() + slab.size());
        for (PageBuf& p : slab) {
            spares_.push_back(std::move(p));
            spare_bytes_.fetch_add(page_size, std::memory_order_relaxed);
        }
    } catch (const std::bad_alloc&) {
        // The other pages are not kept as spares (freed with `slab`); this
        // one still serves.
    }
    return page;
}

PageBuf Tee::page_buffer(uint32_t page_size, uint64_t other_bytes) {
    std::lock_guard lock(mu_);
    return page_buffer_locked(page_size, bytes_.load(std::memory_order_relaxed) + other_bytes);
}

void Tee::recycle(std::vector<PageBuf>& pages, uint64_t other_bytes) noexcept {
    if (pages.empty()) return;
    std::vector<PageBuf> old;  // freed after the lock: a slab's last page unmaps it
    try {
        std::lock_guard lock(mu_);
        const uint64_t size = pages.front().size();
        if (!spares_.empty() && spares_.back().size() != size) {
            old.swap(spares_);  // the page size changed (VACUUM): the old spares are of no use
            spare_bytes_.store(0, std::memory_order_relaxed);
        }
        const uint64_t spare = spare_bytes_.load(std::memory_order_relaxed);
        const uint64_t used = bytes_.load(std::memory_order_relaxed) + spare + other_bytes;
        uint64_t room = std::min(spare_cap_ > spare ? spare_cap_ - spare : 0, cap_ > used ? cap_ - used : 0);
        const size_t keep = size == 0 ? 0 : static_cast<size_t>(std::min<uint64_t>(room / size, pages.size()));
        spares_.reserve(spares_.size() + keep);  // may throw: then nothing is kept
        for (size_t i = 0; i < keep; ++i) {
            if (pages[i].size() != size) continue;
            spares_.push_back(std::move(pages[i]));
            spare_bytes_.fetch_add(size, std::memory_order_relaxed);
        }
    } catch (...) {
        // The lock or the reservation failed: nothing kept.
    }
    pages.clear();  // the rest is freed outside the lock
}

void Tee::drop_spares() noexcept {
    if (spare_bytes_.load(std::memory_order_relaxed) == 0) return;
    std::vector<PageBuf> freed;
    try {
        std::lock_guard lock(mu_);
        freed.swap(spares_);
        spare_bytes_.store(0, std::memory_order_relaxed);
    } catch (...) {
        // The lock failed: they stay, freed with the tee.
    }
}  // freed here, outside the lock

bool Tee::holds(uint32_t salt1, uint32_t salt2, uint64_t from, uint64_t to) const {
    std::lock_guard lock(mu_);
    if (from > to) return true;
    const Epoch* e = find(salt1, salt2);
    if (!e) return false;
    auto it = e->frames.find(from);
    for (uint64_t i = from; i <= to; ++i, ++it)
        if (it == e->frames.end() || it->first != i) return false;
    return true;
}

bool Tee::take(uint32_t salt1, uint32_t salt2, uint64_t from, uint64_t to, std::vector<TeeFrame>& out) {
    std::lock_guard lock(mu_);
    if (from > to) return true;
    Epoch* e = find(salt1, salt2);
    if (!e) return false;
    auto first = e->frames.find(from);
    auto it = first;
    for (uint64_t i = from; i <= to; ++i, ++it)
        if (it == e->frames.end() || it->first != i) return false;
    out.reserve(out.size() + static_cast<size_t>(to - from + 1));
    for (auto x = first; x != it; ++x) out.push_back(std::move(x->second));
    erase_frames(*e, e->frames.begin(), it);
    return true;
}

std::optional<WalHeader> Tee::header(uint32_t salt1, uint32_t salt2) const {
    std::lock_guard lock(mu_);
    const Epoch* e = find(salt1, salt2);
    return e ? e->header : std::nullopt;
}

void Tee::trim(uint32_t salt1, uint32_t salt2, uint64_t frame) {
    std::lock_guard lock(mu_);
    auto it = std::find_if(epochs_.begin(), epochs_.end(),
                           [&](const Epoch& e) { return e.salt1 == salt1 && e.salt2 == salt2; });
    // An epoch the tee never saw: every epoch it holds may still be needed.
    if (it == epochs_.end()) return;
    for (auto x = epochs_.begin(); x != it; ++x) erase_frames(*x, x->frames.begin(), x->frames.end());
    it = epochs_.erase(epochs_.begin(), it);
    erase_frames(*it, it->frames.begin(), it->frames.upper_bound(frame));
}

uint64_t Tee::shed(uint32_t salt1, uint32_t salt2, uint64_t after, uint64_t need) {
    std::lock_guard lock(mu_);
    if (epochs_.empty()) return 0;
    Epoch& e = epochs_.back();
    if (e.salt1 != salt1 || e.salt2 != salt2) return 0;
    if (pinned_ && pinned_->first == salt1 && pinned_->second == salt2) return 0;
    auto first = e.frames.upper_bound(after);
    if (first == e.frames.end()) return 0;
    // The hole is marked before any frame goes: a WAL restart asked from now
    // on is refused (Replicator::restart_allowed) until the uploader has
    // read these frames back from the WAL.
    const uint64_t last = e.frames.rbegin()->first;
    if (last > hole_upto_.load()) hole_upto_.store(last);
    const uint64_t fsz = frame_bytes(e.page_size);
    auto from = e.frames.end();
    uint64_t freed = 0;
    while (from != first && freed < need) {
        --from;
        freed += fsz;
    }
    erase_frames(e, from, e.frames.end());
    return freed;
}

void Tee::pin(uint32_t salt1, uint32_t salt2) {
    std::lock_guard lock(mu_);
    pinned_ = std::make_pair(salt1, salt2);
}

void Tee::captured_through(uint32_t salt1, uint32_t salt2, uint64_t frame) {
    std::lock_guard lock(mu_);
    if (!epochs_.empty() && epochs_.back().salt1 == salt1 && epochs_.back().salt2 == salt2 &&
        frame >= hole_upto_.load(std::memory_order_relaxed))
        hole_upto_.store(0, std::memory_order_relaxed);
}

}  // namespace bottomless::replicator
