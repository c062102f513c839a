// PageBuf: one database page's bytes, owned; the unit the tee, pending
// transactions and segments hand over (issue 9).
//
// Pages the tee takes for frames come in slabs: one anonymous mapping of a
// few dozen pages, faulted in by the kernel in one call (MAP_POPULATE)
// instead of one page fault per page at its first write. On the machines
// this was measured on, a fresh heap page cost the writer 13.5 µs (a fault
// each, in a virtual machine) and a populated one 0.9 µs
// (docs/BENCHMARKS.md). A slab is unmapped when its last page goes, so a
// slab's other pages stay resident while one of them lives: resident memory
// can exceed what the pages count by less than one slab per live page (a
// slab is at most kMaxSlabBytes).
//
// Pages built from bytes (decoding, tests) or asked for one at a time
// (zeroed) live on the heap, alone.
// Either kind moves without copying; a copy is a heap page.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace bottomless::replicator {

class PageBuf {
public:
    // The most bytes one slab maps.
    static constexpr size_t kMaxSlabBytes = 256 * 1024;

    PageBuf() = default;
    // A heap page holding a copy of `bytes`.
    explicit PageBuf(std::string_view bytes);
    PageBuf(const PageBuf& o) : PageBuf(o.view()) {}
    PageBuf(PageBuf&& o) noexcept : slab_(o.slab_), data_(o.data_), size_(o.size_) {
        o.slab_ = nullptr;
        o.data_ = nullptr;
        o.size_ = 0;
    }
    PageBuf& operator=(PageBuf o) noexcept {
        swap(o);
        return *this;
    }
    ~PageBuf() { release(); }

    // A zeroed heap page of `size` bytes. Throws std::bad_alloc.
    static PageBuf zeroed(size_t size);
    // `n` (>= 1) zeroed pages of `page_size` bytes from one new slab (n is
    // cut to what kMaxSlabBytes holds). Throws std::bad_alloc, also when
    // the mapping fails (vm.max_map_count, RLIMIT_AS).
    static std::vector<PageBuf> slab(uint32_t page_size, size_t n);
    // How many pages of `page_size` one slab holds at most.
    static size_t slab_pages(uint32_t page_size) {
        return page_size == 0 ? 1 : std::max<size_t>(1, kMaxSlabBytes / page_size);
    }

    char* data() { return data_; }
    const char* data() const { return data_; }
    size_t size() const { return size_; }
    bool empty() const { return size_ == 0; }
    std::string_view view() const { return {data_, size_}; }
    operator std::string_view() const { return view(); }  // NOLINT: a page reads as its bytes
    std::string_view substr(size_t pos, size_t n = std::string_view::npos) const { return view().substr(pos, n); }
    // Forgets the last byte (the memory stays): for tests of a short page.
    void pop_back() {
        if (size_ > 0) --size_;
    }
    bool from_slab() const { return slab_ != nullptr; }
    // Bytes of slabs mapped in this process now (all databases).
    static uint64_t slab_bytes_mapped();

    void swap(PageBuf& o) noexcept {
        std::swap(slab_, o.slab_);
        std::swap(data_, o.data_);
        std::swap(size_, o.size_);
    }
    friend bool operator==(const PageBuf& a, const PageBuf& b) { return a.view() == b.view(); }
    friend bool operator==(const PageBuf& a, std::string_view b) { return a.view() == b; }

private:
    struct Slab;
    void release() noexcept;

    Slab* slab_ = nullptr;  // null: data_ is a heap allocation of its own
    char* data_ = nullptr;
    size_t size_ = 0;
};

}  // namespace bottomless::replicator
