// The tee (replicator/tee.h): frames placed by offset whatever pieces they
// are written in, taken by range, and page buffers reused through the
// spares without ever exceeding the memory limit.
#include <catch2/catch.hpp>

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

std::vector<std::string> pages_of(std::vector<TeeFrame>& frames) {
    std::vector<std::string> pages;
    for (auto& f : frames) pages.push_back(std::move(f.page));
    return pages;
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
    std::vector<TeeFrame> frames;
    REQUIRE(tee.take(kSalt1, kSalt2, 1, 4, frames));
    std::vector<std::string> pages = pages_of(frames);
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
    const std::string b = tee.page_buffer(kPage);
    CHECK(b.size() == kPage);
    CHECK(buffers.count(b.data()) == 1);
    CHECK(tee.spare_bytes() == 3 * kPage);
    // A page of another size is a new buffer; the spares stay.
    CHECK(tee.page_buffer(1024).size() == 1024);
    CHECK(tee.spare_bytes() == 3 * kPage);

    tee.drop_spares();
    CHECK(tee.spare_bytes() == 0);

    // Frames forgotten without being handed over (trimmed: shipped from
    // elsewhere) leave their pages as spares too.
    for (uint64_t i = 9; i <= 12; ++i) write_frame(tee, i, 'y');
    tee.trim(kSalt1, kSalt2, 10);
    CHECK(tee.bytes() == 2 * Tee::frame_bytes(kPage));
    CHECK(tee.spare_bytes() == 2 * kPage);
    CHECK(tee.holds(kSalt1, kSalt2, 11, 12));
}

TEST_CASE("spares stay within their own limit and within the tee's memory limit", "[tee]") {
    SECTION("at most the spare limit is kept") {
        Tee tee(1 << 20, 3 * kPage);
        std::vector<std::string> pages(5, std::string(kPage, 'p'));
        tee.recycle(pages, 0);
        CHECK(pages.empty());
        CHECK(tee.spare_bytes() == 3 * kPage);
        std::vector<std::string> empty;
        tee.recycle(empty, 0);  // nothing: the spares stay
        CHECK(tee.spare_bytes() == 3 * kPage);
        std::vector<std::string> more(2, std::string(kPage, 'q'));
        tee.recycle(more, 0);
        CHECK(tee.spare_bytes() == 3 * kPage);
    }
    SECTION("frames held, spares and the replicator's other memory stay within the limit") {
        const uint64_t limit = 16 * kPage;
        Tee tee(limit, limit);
        write_frame(tee, 1, 'a');
        write_frame(tee, 2, 'b');  // held: 2 frames
        const uint64_t other = 8 * kPage;
        std::vector<std::string> pages(10, std::string(kPage, 'p'));
        tee.recycle(pages, other);
        const uint64_t spares = tee.spare_bytes();
        CHECK(spares == ((limit - other - 2 * Tee::frame_bytes(kPage)) / kPage) * kPage);
        CHECK(tee.bytes() + spares + other <= limit);
        // Already at the limit: nothing is kept.
        std::vector<std::string> none(2, std::string(kPage, 'r'));
        tee.recycle(none, limit);
        CHECK(tee.spare_bytes() == spares);
    }
    SECTION("no spare limit: nothing is kept") {
        Tee tee(1 << 20);
        std::vector<std::string> pages(2, std::string(kPage, 'p'));
        tee.recycle(pages, 0);
        CHECK(tee.spare_bytes() == 0);
    }
    SECTION("a new page size (VACUUM) replaces the old spares") {
        Tee tee(1 << 20, 1 << 20);
        std::vector<std::string> big(4, std::string(kPage, 'p'));
        tee.recycle(big, 0);
        CHECK(tee.spare_bytes() == 4 * kPage);
        std::vector<std::string> small(3, std::string(1024, 's'));
        tee.recycle(small, 0);
        CHECK(tee.spare_bytes() == 3 * 1024);
        CHECK(tee.page_buffer(1024).size() == 1024);
        CHECK(tee.spare_bytes() == 2 * 1024);
    }
}
