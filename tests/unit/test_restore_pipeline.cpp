// The restore pipeline's local parts: the aligned buffers downloads and
// page batches live in, and the writer thread that puts batches at their
// offsets (through O_DIRECT where the run allows, else the page cache).
#include <catch2/catch.hpp>
#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include "replicator/restore_pipeline.h"

using namespace bottomless;
using bottomless::replicator::restore_detail::AlignedBuffer;
using bottomless::replicator::restore_detail::kDirectAlign;
using bottomless::replicator::restore_detail::kHugePage;
using bottomless::replicator::restore_detail::PageWriter;

namespace {

std::string random_bytes(size_t n, uint32_t seed) {
    std::mt19937 rng(seed);
    std::string s(n, '\0');
    for (auto& c : s) c = static_cast<char>(rng());
    return s;
}

bool aligned(const char* p, size_t a) { return reinterpret_cast<uintptr_t>(p) % a == 0; }

std::string read_file(const std::string& path) {
    std::string s(std::filesystem::file_size(path), '\0');
    int fd = ::open(path.c_str(), O_RDONLY);
    REQUIRE(fd >= 0);
    REQUIRE(::pread(fd, s.data(), s.size(), 0) == static_cast<ssize_t>(s.size()));
    ::close(fd);
    return s;
}

}  // namespace

TEST_CASE("AlignedBuffer: small buffers are page-aligned, large ones whole huge pages, contents kept when it grows",
          "[restore_pipeline]") {
    AlignedBuffer b;
    CHECK(std::string_view(b).empty());
    b.reserve(100);
    CHECK(b.capacity() == kDirectAlign);
    CHECK(aligned(b.data(), kDirectAlign));

    const std::string a = random_bytes(3000, 1);
    b.append(a);
    const std::string more = random_bytes((3u << 20) + 17, 2);  // past 2 MiB: regrown into huge pages
    b.append(more);
    CHECK(b.size() == a.size() + more.size());
    CHECK(b.capacity() % kHugePage == 0);
    CHECK(b.capacity() >= b.size());
    CHECK(aligned(b.data(), kHugePage));
    CHECK(std::string_view(b) == a + more);

    // Cleared, it keeps its memory (reused for the next part or batch).
    const size_t cap = b.capacity();
    const char* p = b.data();
    b.clear();
    CHECK(b.size() == 0);
    b.append(a);
    CHECK(b.data() == p);
    CHECK(b.capacity() == cap);

    // Moved, the source is empty and the target owns the bytes.
    AlignedBuffer c = std::move(b);
    CHECK(std::string_view(c) == a);
    CHECK(b.data() == nullptr);
    CHECK(b.capacity() == 0);

    AlignedBuffer empty;
    empty.append(std::string_view());  // no memory, no copy
    CHECK(empty.data() == nullptr);
    CHECK(std::string_view(empty).empty());

    AlignedBuffer exact;
    exact.reserve(8u << 20);  // a download part: exactly four huge pages
    CHECK(exact.capacity() == (8u << 20));
    CHECK(aligned(exact.data(), kHugePage));
}

TEST_CASE("PageWriter: pages, runs larger than a batch and unaligned runs land at their offsets, in order",
          "[restore_pipeline]") {
    std::string tmpl = (std::filesystem::temp_directory_path() / "bottomless-pw-XXXXXX").string();
    REQUIRE(::mkdtemp(tmpl.data()) != nullptr);
    const std::string path = tmpl + "/out.db";
    const bool direct = GENERATE(false, true);
    int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_TRUNC, 0644);
    REQUIRE(fd >= 0);
    int dfd = direct ? ::open(path.c_str(), O_WRONLY | O_DIRECT) : -1;
    if (direct && dfd < 0) WARN("O_DIRECT refused in " << tmpl << " (" << std::strerror(errno) << "): buffered writes only");
    constexpr size_t kPage = 4096;
    constexpr uint32_t kPages = 1500;  // ~6 MiB: several batches
    std::string expect(size_t{kPages} * kPage, '\0');
    {
        PageWriter w(fd, dfd);
        // Every page once, in order: adjacent runs coalesce, batches fill up.
        for (uint32_t p = 0; p < kPages; ++p) {
            const std::string page = random_bytes(kPage, p);
            expect.replace(size_t{p} * kPage, kPage, page);
            REQUIRE(w.write(uint64_t{p} * kPage, page));
        }
        // One run larger than a batch (3 MiB at once), overwriting pages written above.
        const std::string big = random_bytes(3u << 20, 7777);
        expect.replace(100 * kPage, big.size(), big);
        REQUIRE(w.write(100 * kPage, big));
        // A later write of the same page wins (a segment after the snapshot).
        const std::string again = random_bytes(kPage, 8888);
        expect.replace(200 * kPage, kPage, again);
        REQUIRE(w.write(200 * kPage, again));
        // Not a multiple of 4 KiB, at an odd offset: through the page cache.
        const std::string odd = random_bytes(1000, 9999);
        expect.replace(5 * kPage + 13, odd.size(), odd);
        REQUIRE(w.write(5 * kPage + 13, odd));
        REQUIRE(w.finish());
    }
    ::close(fd);
    if (dfd >= 0) ::close(dfd);
    CHECK(read_file(path) == expect);
    std::filesystem::remove_all(tmpl);
}
