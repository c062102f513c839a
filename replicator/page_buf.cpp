// PageBuf (page_buf.h): heap pages and slab pages.
#include "replicator/page_buf.h"

#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <new>

namespace bottomless::replicator {

namespace {
std::atomic<uint64_t> g_slab_bytes{0};
}  // namespace

uint64_t PageBuf::slab_bytes_mapped() { return g_slab_bytes.load(std::memory_order_relaxed); }

struct PageBuf::Slab {
    void* base = nullptr;
    size_t length = 0;
    std::atomic<size_t> live{0};  // pages of it not yet released
};

PageBuf::PageBuf(std::string_view bytes) {
    if (bytes.empty()) return;
    data_ = static_cast<char*>(::operator new(bytes.size()));
    std::memcpy(data_, bytes.data(), bytes.size());
    size_ = bytes.size();
}

PageBuf PageBuf::zeroed(size_t size) {
    PageBuf p;
    if (size == 0) return p;
    p.data_ = static_cast<char*>(::operator new(size));
    std::memset(p.data_, 0, size);
    p.size_ = size;
    return p;
}

std::vector<PageBuf> PageBuf::slab(uint32_t page_size, size_t n) {
    if (page_size == 0) throw std::bad_alloc();
    n = std::min(std::max<size_t>(n, 1), slab_pages(page_size));
    std::vector<PageBuf> out;
    out.reserve(n);  // before the mapping: nothing to undo if it throws
    static const size_t kSystemPage = [] {
        const long p = ::sysconf(_SC_PAGESIZE);
        return p > 0 ? static_cast<size_t>(p) : size_t{4096};
    }();
    const size_t length = (n * page_size + kSystemPage - 1) / kSystemPage * kSystemPage;
#ifdef MAP_POPULATE
    // The kernel faults the whole slab in now, in one call.
    constexpr int kPopulate = MAP_POPULATE;
#else
    constexpr int kPopulate = 0;
#endif
    void* base = ::mmap(nullptr, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | kPopulate, -1, 0);
    if (base == MAP_FAILED) throw std::bad_alloc();
    Slab* s = nullptr;
    try {
        s = new Slab;
    } catch (...) {
        ::munmap(base, length);
        throw;
    }
    s->base = base;
    s->length = length;
    s->live.store(n, std::memory_order_relaxed);
    g_slab_bytes.fetch_add(length, std::memory_order_relaxed);
    for (size_t i = 0; i < n; ++i) {
        PageBuf p;
        p.slab_ = s;
        p.data_ = static_cast<char*>(base) + i * page_size;
        p.size_ = page_size;
        out.push_back(std::move(p));  // capacity reserved: cannot throw
    }
    return out;
}

void PageBuf::release() noexcept {
    if (slab_) {
        if (slab_->live.fetch_sub(1, std::memory_order_acq_rel) == 1) {
            ::munmap(slab_->base, slab_->length);
            g_slab_bytes.fetch_sub(slab_->length, std::memory_order_relaxed);
            delete slab_;
        }
    } else if (data_) {
        ::operator delete(data_);
    }
    slab_ = nullptr;
    data_ = nullptr;
    size_ = 0;
}

}  // namespace bottomless::replicator
