// The tee (replicator/tee.h): frames placed by offset whatever pieces they
// are written in, taken by range, and page buffers reused through the
// spares without ever exceeding the memory limit.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cstring>
#include <set>
#include <string>
#include <vector>

#include "replicator/tee.h"

using namespace bottomless::replicator;

namespace {

constexpr uint32_t kPage = 4096;
constexpr uint32_t kSalt1 = 0x11223344, kSalt2 = 0x55667788;

// Frame `i`'s header (salts set, pgno = i) and a page filled with `fill`.
std::string frame_header(uint64_t i) {
    std::string h(kWalFrameHeaderSize, '\0');
    auto put = [&h](size_t at, uint32_t v) {
        for (int b = 0; b < 4; ++b) h[at + b] = static_cast<char>(v >> (24 - 8 * b));
    };
    put(0, static_cast<uint32_t>(i));
    put(8, kSalt1);
    put(12, kSalt2);
    return h;
}

uint64_t offset_of(uint64_t i, uint32_t page_size = kPage) { return wal_frame_offset(page_size, i); }

// Writes frame `i` as SQLite does: the header, then the page, two writes.
void write_frame(Tee& tee, uint64_t i, char fill, uint64_t other = 0, uint32_t page_size = kPage) {
    const std::string h = frame_header(i);
    const std::string page(page_size, fill);
    tee.write(offset_of(i, page_size), reinterpret_cast<const unsigned char*>(h.data()), h.size(), page_size, other);
    tee.write(offset_of(i, page_size) + kWalFrameHeaderSize, reinterpret_cast<const unsigned char*>(page.data()),
              page.size(), page_size, other);
}

std::vector<PageBuf> pages_of(std::vector<TeeFrame>& frames) {
    std::vector<PageBuf> pages;
    for (auto& f : frames) pages.push_back(std::move(f.page));
    return pages;
}

// `n` heap pages of `size` bytes filled with `fill`.
std::vector<PageBuf> heap_pages(size_t n, uint32_t size, char fill) {
    return std::vector<PageBuf>(n, PageBuf(std::string(size, fill)));
}

}  // namespace

TEST_CASE("the tee places frames written in pieces and takes them by range", "[tee]") {
    Tee tee(1 << 20);
    for (uint64_t i = 1; i <= 3; ++i) write_frame(tee, i, static_cast<char>('a' + i));
    CHECK(tee.bytes() == 3 * Tee::frame_bytes(kPage));
    CHECK(tee.holds(kSalt1, kSalt2, 1, 3));
    CHECK_FALSE(tee.holds(kSalt1, kSalt2, 1, 4));
    CHECK_FALSE(tee.holds(kSalt1 + 1, kSalt2, 1, 1));

    // A page rewritten in place before its commit: the newer bytes win.
    const std::string again(100, 'z');
    tee.write(offset_of(2) + kWalFrameHeaderSize + 10, reinterpret_cast<const unsigned char*>(again.data()),
              again.size(), kPage, 0);

    std::vector<TeeFrame> frames;
    REQUIRE(tee.take(kSalt1, kSalt2, 1, 3, frames));
    REQUIRE(frames.size() == 3);
    for (uint64_t i = 1; i <= 3; ++i) {
        const TeeFrame& f = frames[i - 1];
        CHECK(std::string(reinterpret_cast<const char*>(f.header), kWalFrameHeaderSize) == frame_header(i));
        REQUIRE(f.page.size() == kPage);
        if (i == 2) {
            CHECK(f.page.substr(0, 10) == std::string(10, 'c'));
            CHECK(f.page.substr(10, 100) == again);
            CHECK(f.page.substr(110) == std::string(kPage - 110, 'c'));
        } else {
            CHECK(f.page == std::string(kPage, static_cast<char>('a' + i)));
        }
    }
    CHECK(tee.bytes() == 0);
    CHECK_FALSE(tee.holds(kSalt1, kSalt2, 1, 1));

    // Out of order: a frame between two held ones, and a page written
    // before its header, each land in their own frame.
    write_frame(tee, 4, '4');
    write_frame(tee, 6, '6');
    write_frame(tee, 5, '5');
    const std::string page7(kPage, '7'), header7 = frame_header(7);
    tee.write(offset_of(7) + kWalFrameHeaderSize, reinterpret_cast<const unsigned char*>(page7.data()), kPage,
              kPage, 0);  // no frame 7 yet: not kept (a frame starts at its header)
    CHECK_FALSE(tee.holds(kSalt1, kSalt2, 7, 7));
    CHECK(tee.bytes() == 3 * Tee::frame_bytes(kPage));
    tee.write(offset_of(7), reinterpret_cast<const unsigned char*>(header7.data()), header7.size(), kPage, 0);
    tee.write(offset_of(7) + kWalFrameHeaderSize, reinterpret_cast<const unsigned char*>(page7.data()), kPage,
              kPage, 0);
    frames.clear();
    REQUIRE(tee.take(kSalt1, kSalt2, 4, 7, frames));
    for (uint64_t i = 4; i <= 7; ++i) {
        CHECK(std::string(reinterpret_cast<const char*>(frames[i - 4].header), kWalFrameHeaderSize) == frame_header(i));
        CHECK(frames[i - 4].page == std::string(kPage, static_cast<char>('0' + i)));
    }
}

TEST_CASE("past its limit the tee keeps no frame and records a hole", "[tee]") {
    Tee tee(3 * Tee::frame_bytes(kPage));
    write_frame(tee, 1, 'a');
    write_frame(tee, 2, 'b', /*other=*/Tee::frame_bytes(kPage));  // 2 held + 1 elsewhere: fits
    CHECK_FALSE(tee.has_hole());
    write_frame(tee, 3, 'c', /*other=*/Tee::frame_bytes(kPage));  // would be 4: dropped
    CHECK(tee.has_hole());
    CHECK(tee.holds(kSalt1, kSalt2, 1, 2));
    CHECK_FALSE(tee.holds(kSalt1, kSalt2, 3, 3));
}

TEST_CASE("pages done with come back as spares and carry the next frames", "[tee]") {
    Tee tee(1 << 20, 16 * kPage);
    for (uint64_t i = 1; i <= 4; ++i) write_frame(tee, i, 'x');
    CHECK(tee.spare_bytes() == 0);  // four frames: heap pages, no slab (tested below)
    std::vector<TeeFrame> frames;
    REQUIRE(tee.take(kSalt1, kSalt2, 1, 4, frames));
    std::vector<PageBuf> pages = pages_of(frames);
    std::set<const char*> buffers;
    for (const auto& p : pages) buffers.insert(p.data());

    tee.recycle(pages, 0);
    CHECK(pages.empty());
    CHECK(tee.spare_bytes() == 4 * kPage);
    CHECK(tee.bytes() == 0);

    // The next frames land in those buffers, and hold their own bytes (a
    // spare's old contents are overwritten, not mixed in).
    for (uint64_t i = 5; i <= 8; ++i) write_frame(tee, i, static_cast<char>('0' + i));
    CHECK(tee.spare_bytes() == 0);
    frames.clear();
    REQUIRE(tee.take(kSalt1, kSalt2, 5, 8, frames));
    for (uint64_t i = 5; i <= 8; ++i) {
        const TeeFrame& f = frames[i - 5];
        CHECK(buffers.count(f.page.data()) == 1);
        CHECK(f.page == std::string(kPage, static_cast<char>('0' + i)));
    }

    // Frames read back from the WAL use them too.
    pages = pages_of(frames);
    tee.recycle(pages, 0);
    const PageBuf b = tee.page_buffer(kPage, Tee::frame_bytes(kPage));
    CHECK(b.size() == kPage);
    CHECK(buffers.count(b.data()) == 1);
    CHECK(tee.spare_bytes() == 3 * kPage);
    // A page of another size is a new buffer; the spares stay.
    CHECK(tee.page_buffer(1024, Tee::frame_bytes(1024)).size() == 1024);
    CHECK(tee.spare_bytes() == 3 * kPage);

    tee.drop_spares();
    CHECK(tee.spare_bytes() == 0);

    // Frames forgotten without being handed over (trimmed: shipped from
    // elsewhere) leave their pages as spares too.
    for (uint64_t i = 9; i <= 12; ++i) write_frame(tee, i, 'y');
    CHECK(tee.spare_bytes() == 0);
    tee.trim(kSalt1, kSalt2, 10);
    CHECK(tee.bytes() == 2 * Tee::frame_bytes(kPage));
    CHECK(tee.spare_bytes() == 2 * kPage);
    CHECK(tee.holds(kSalt1, kSalt2, 11, 12));
}

TEST_CASE("spares stay within their own limit and within the tee's memory limit", "[tee]") {
    SECTION("at most the spare limit is kept") {
        Tee tee(1 << 20, 3 * kPage);
        std::vector<PageBuf> pages = heap_pages(5, kPage, 'p');
        tee.recycle(pages, 0);
        CHECK(pages.empty());
        CHECK(tee.spare_bytes() == 3 * kPage);
        std::vector<PageBuf> empty;
        tee.recycle(empty, 0);  // nothing: the spares stay
        CHECK(tee.spare_bytes() == 3 * kPage);
        std::vector<PageBuf> more = heap_pages(2, kPage, 'q');
        tee.recycle(more, 0);
        CHECK(tee.spare_bytes() == 3 * kPage);
    }
    SECTION("frames held, spares and the replicator's other memory stay within the limit") {
        const uint64_t limit = 16 * kPage;
        Tee tee(limit, limit);
        write_frame(tee, 1, 'a');
        write_frame(tee, 2, 'b');  // held: 2 frames
        CHECK(tee.spare_bytes() == 0);  // two frames: heap pages, no slab
        const uint64_t other = 8 * kPage;
        std::vector<PageBuf> pages = heap_pages(10, kPage, 'p');
        tee.recycle(pages, other);
        const uint64_t spares = tee.spare_bytes();
        CHECK(spares == ((limit - other - 2 * Tee::frame_bytes(kPage)) / kPage) * kPage);
        CHECK(tee.bytes() + spares + other <= limit);
        // Already at the limit: nothing is kept.
        std::vector<PageBuf> none = heap_pages(2, kPage, 'r');
        tee.recycle(none, limit);
        CHECK(tee.spare_bytes() == spares);
    }
    SECTION("no spare limit: nothing is kept") {
        Tee tee(1 << 20);
        std::vector<PageBuf> pages = heap_pages(2, kPage, 'p');
        tee.recycle(pages, 0);
        CHECK(tee.spare_bytes() == 0);
    }
    SECTION("a new page size (VACUUM) replaces the old spares") {
        Tee tee(1 << 20, 1 << 20);
        std::vector<PageBuf> big = heap_pages(4, kPage, 'p');
        tee.recycle(big, 0);
        CHECK(tee.spare_bytes() == 4 * kPage);
        std::vector<PageBuf> small = heap_pages(3, 1024, 's');
        tee.recycle(small, 0);
        CHECK(tee.spare_bytes() == 3 * 1024);
        CHECK(tee.page_buffer(1024, Tee::frame_bytes(1024)).size() == 1024);
        CHECK(tee.spare_bytes() == 2 * 1024);
    }
}

TEST_CASE("page buffers: a slab's pages are zeroed, distinct and outlive each other", "[tee]") {
    std::vector<PageBuf> slab = PageBuf::slab(kPage, 10);
    REQUIRE(slab.size() == 10);
    std::set<const char*> seen;
    for (const PageBuf& p : slab) {
        CHECK(p.from_slab());
        CHECK(p.size() == kPage);
        CHECK(p.view() == std::string(kPage, '\0'));
        seen.insert(p.data());
    }
    CHECK(seen.size() == 10);
    // One slab: the pages lie within one mapping of 10 pages.
    CHECK(*seen.rbegin() - *seen.begin() == 9 * static_cast<std::ptrdiff_t>(kPage));
    // A page outlives the others (and the vector) and stays writable.
    PageBuf last = std::move(slab.back());
    slab.clear();
    std::memset(last.data(), 'k', last.size());
    CHECK(last == std::string(kPage, 'k'));
    // The slab is unmapped with its last page.
    const uint64_t mapped = PageBuf::slab_bytes_mapped();
    CHECK(mapped >= 10 * kPage);
    {
        std::vector<PageBuf> other = PageBuf::slab(kPage, 3);
        CHECK(PageBuf::slab_bytes_mapped() == mapped + 3 * kPage);
        PageBuf keep = std::move(other[1]);
        other.clear();
        CHECK(PageBuf::slab_bytes_mapped() == mapped + 3 * kPage);
    }
    CHECK(PageBuf::slab_bytes_mapped() == mapped);
    // Asked for more than a slab holds: cut to it.
    CHECK(PageBuf::slab(kPage, 1000).size() == PageBuf::slab_pages(kPage));
    CHECK(PageBuf::slab(65536, 1000).size() == PageBuf::kMaxSlabBytes / 65536);
    // Heap pages copy; slab pages move without copying.
    PageBuf copy = last;
    CHECK_FALSE(copy.from_slab());
    CHECK(copy == last);
    CHECK(copy.data() != last.data());
    const char* where = last.data();
    PageBuf moved = std::move(last);
    CHECK(moved.data() == where);
    CHECK(last.empty());  // NOLINT(bugprone-use-after-move): a moved-from page is empty
    moved = PageBuf();
    CHECK(PageBuf::slab_bytes_mapped() == mapped - 10 * kPage);  // the first slab's last page went
}

TEST_CASE("a frame with no spare takes a slab as large as the tee's demand, within the limits", "[tee]") {
    const uint64_t fb = Tee::frame_bytes(kPage);
    const uint64_t slab = PageBuf::slab_pages(kPage);
    // Frames 1..7 find fewer than 7 frames held: a heap page each. Frame 8
    // takes a slab of 8 (7 spares for frames 9..15), frame 16 one of 16,
    // frame 32 one of 32, frame 64 a whole slab.
    SECTION("a slab grows with the frames held, up to a whole slab") {
        Tee tee(1 << 30, 1 << 30);
        for (uint64_t i = 1; i <= 7; ++i) write_frame(tee, i, static_cast<char>('a' + i % 26));
        CHECK(tee.spare_bytes() == 0);
        write_frame(tee, 8, static_cast<char>('a' + 8 % 26));
        CHECK(tee.spare_bytes() == 7 * kPage);
        for (uint64_t i = 9; i <= 15; ++i) write_frame(tee, i, static_cast<char>('a' + i % 26));
        CHECK(tee.spare_bytes() == 0);
        write_frame(tee, 16, static_cast<char>('a' + 16 % 26));
        CHECK(tee.spare_bytes() == 15 * kPage);
        for (uint64_t i = 17; i <= slab; ++i) write_frame(tee, i, static_cast<char>('a' + i % 26));
        CHECK(tee.spare_bytes() == (slab - 1) * kPage);  // frame 64's slab: all but its own page
        std::vector<TeeFrame> frames;
        REQUIRE(tee.take(kSalt1, kSalt2, 1, slab, frames));
        std::set<const char*> pages;
        for (size_t i = 0; i < frames.size(); ++i) {
            CHECK(frames[i].page.from_slab() == (i + 1 >= 8));
            CHECK(frames[i].page == std::string(kPage, static_cast<char>('a' + (i + 1) % 26)));
            pages.insert(frames[i].page.data());
        }
        CHECK(pages.size() == frames.size());
        // Frames 8..15 came from one slab of 8 pages.
        std::vector<const char*> of8;
        for (size_t i = 7; i < 15; ++i) of8.push_back(frames[i].page.data());
        CHECK(*std::max_element(of8.begin(), of8.end()) - *std::min_element(of8.begin(), of8.end()) ==
              7 * static_cast<std::ptrdiff_t>(kPage));
    }
    SECTION("the memory limit bounds the spares, the replicator's other memory counted") {
        for (uint64_t other : {uint64_t{0}, 2 * fb}) {
            Tee tee(26 * fb, 1 << 30);
            for (uint64_t i = 1; i <= 15; ++i) write_frame(tee, i, 'a', other);
            CHECK(tee.spare_bytes() == 0);
            write_frame(tee, 16, 'a', other);  // 16 held: room for 10 (8 with the other 2)
            CHECK(tee.spare_bytes() == ((26 * fb - 16 * fb - other) / kPage) * kPage);
            CHECK(tee.bytes() + tee.spare_bytes() + other <= 26 * fb);
        }
    }
    SECTION("a page read back from the WAL counts the tee's frames and the memory outside it") {
        Tee tee(26 * fb, 1 << 30);
        for (uint64_t i = 1; i <= 16; ++i) write_frame(tee, i, 'a');
        tee.drop_spares();
        // 16 frames held, 2 frames' worth outside, this page: room for 7.
        const PageBuf p = tee.page_buffer(kPage, 3 * fb);
        CHECK(p.from_slab());
        CHECK(tee.spare_bytes() == ((26 * fb - 16 * fb - 3 * fb) / kPage) * kPage);
        CHECK(tee.bytes() + tee.spare_bytes() + 3 * fb <= 26 * fb);
        tee.drop_spares();
        // Less room than a slab is worth: a heap page, no spares.
        CHECK_FALSE(tee.page_buffer(kPage, 5 * fb).from_slab());
        CHECK(tee.spare_bytes() == 0);
    }
    SECTION("the spare limit bounds them; without one, every page is alone") {
        Tee tee(1 << 30, 9 * kPage);
        for (uint64_t i = 1; i <= 16; ++i) write_frame(tee, i, 'a');
        CHECK(tee.spare_bytes() == 9 * kPage);
        Tee none(1 << 30);
        for (uint64_t i = 1; i <= 16; ++i) write_frame(none, i, 'a');
        CHECK(none.spare_bytes() == 0);
        std::vector<TeeFrame> frames;
        REQUIRE(none.take(kSalt1, kSalt2, 1, 16, frames));
        for (const TeeFrame& f : frames) CHECK_FALSE(f.page.from_slab());
    }
}
