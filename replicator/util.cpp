// Small shared utilities (util.h).
#include "replicator/util.h"

#include <malloc.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <string>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <ctime>

namespace bottomless::replicator {

Fd::~Fd() {
    if (fd >= 0) ::close(fd);
}

namespace {
// Repeats a positional read or write until all n bytes are done (short
// counts and EINTR); false on an error or end of file first.
template <class Op>
bool whole(Op op, size_t n) {
    size_t done = 0;
    while (done < n) {
        ssize_t r = op(done);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) return false;
        done += static_cast<size_t>(r);
    }
    return true;
}
}  // namespace

bool pread_full(int fd, void* buf, size_t n, uint64_t off) {
    auto* p = static_cast<char*>(buf);
    return whole([&](size_t done) { return ::pread(fd, p + done, n - done, static_cast<off_t>(off + done)); }, n);
}

bool pwrite_full(int fd, const void* buf, size_t n, uint64_t off) {
    const auto* p = static_cast<const char*>(buf);
    return whole([&](size_t done) { return ::pwrite(fd, p + done, n - done, static_cast<off_t>(off + done)); }, n);
}

#ifndef FICLONE
#define FICLONE _IOW(0x94, 9, int)  // linux/fs.h, not included: it clashes with glibc's headers
#endif

int duplicate_file(int src, int dst, uint64_t size) {
    if (::ioctl(dst, FICLONE, src) == 0) return 1;
    uint64_t done = 0;
    bool in_kernel = true;
    std::string buf;
    while (done < size) {
        ssize_t n = -1;
        const size_t want = static_cast<size_t>(std::min<uint64_t>(size - done, 1u << 30));
        if (in_kernel) {
            loff_t in_off = static_cast<loff_t>(done), out_off = static_cast<loff_t>(done);
            n = ::copy_file_range(src, &in_off, dst, &out_off, want, 0);
            if (n < 0 && (errno == EXDEV || errno == ENOSYS || errno == EINVAL || errno == EOPNOTSUPP)) {
                in_kernel = false;
                continue;
            }
        } else {
            if (buf.empty()) buf.resize(1u << 20);
            n = ::pread(src, buf.data(), std::min(want, buf.size()), static_cast<off_t>(done));
            if (n > 0 && !pwrite_full(dst, buf.data(), static_cast<size_t>(n), done)) return -1;
        }
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) return -1;
        if (n == 0) {
            errno = ENODATA;
            return -1;
        }
        done += static_cast<uint64_t>(n);
    }
    return 0;
}

void release_free_memory() noexcept {
#if defined(__GLIBC__)
    static std::atomic<int64_t> last_ms{0};
    const int64_t now_ms = std::chrono::duration_cast<std::chrono::milliseconds>(
                               std::chrono::steady_clock::now().time_since_epoch())
                               .count();
    int64_t prev = last_ms.load();
    if (now_ms - prev < 500 || !last_ms.compare_exchange_strong(prev, now_ms)) return;
    ::malloc_trim(0);
#endif
}

void advise_huge_pages(void* p, size_t n) noexcept {
#if defined(MADV_HUGEPAGE)
    constexpr uintptr_t kHuge = uintptr_t{2} << 20;
    const uintptr_t begin = (reinterpret_cast<uintptr_t>(p) + kHuge - 1) & ~(kHuge - 1);
    const uintptr_t end = (reinterpret_cast<uintptr_t>(p) + n) & ~(kHuge - 1);
    if (end > begin) ::madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
    (void)p;
    (void)n;
#endif
}

int64_t now_us() {
    return std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::system_clock::now().time_since_epoch())
        .count();
}

namespace {

std::string format_time(int64_t us, const char* date_time_sep, const char* suffix) {
    std::time_t t = static_cast<std::time_t>(us / 1'000'000);
    std::tm tm{};
    gmtime_r(&t, &tm);
    char buf[80];
    std::snprintf(buf, sizeof buf, "%04d-%02d-%02d%s%02d:%02d:%02d.%06lld%s", tm.tm_year + 1900, tm.tm_mon + 1,
                  tm.tm_mday, date_time_sep, tm.tm_hour, tm.tm_min, tm.tm_sec,
                  static_cast<long long>(us % 1'000'000), suffix);
    return buf;
}

// Reads exactly n digits.
bool digits(std::string_view& s, size_t n, int& out) {
    if (s.size() < n) return false;
    int v = 0;
    for (size_t i = 0; i < n; ++i) {
        if (s[i] < '0' || s[i] > '9') return false;
        v = v * 10 + (s[i] - '0');
    }
    out = v;
    s.remove_prefix(n);
    return true;
}

bool eat(std::string_view& s, char c) {
    if (s.empty() || s[0] != c) return false;
    s.remove_prefix(1);
    return true;
}

}  // namespace

std::string fmt_time_us(int64_t us) { return us <= 0 ? "unknown" : format_time(us, "T", "Z"); }

std::string fmt_time_table_us(int64_t us) { return us <= 0 ? "-" : format_time(us, " ", ""); }

std::optional<int64_t> parse_time_us(std::string_view s) {
    while (!s.empty() && s.front() == ' ') s.remove_prefix(1);
    while (!s.empty() && s.back() == ' ') s.remove_suffix(1);
    int year, mon, day, hour = 0, min = 0, sec = 0;
    if (!digits(s, 4, year) || !eat(s, '-') || !digits(s, 2, mon) || !eat(s, '-') || !digits(s, 2, day))
        return std::nullopt;
    int64_t frac_us = 0;
    int offset_s = 0;
    if (!s.empty()) {
        if (!eat(s, 'T') && !eat(s, 't') && !eat(s, ' ')) return std::nullopt;
        if (!digits(s, 2, hour) || !eat(s, ':') || !digits(s, 2, min)) return std::nullopt;
        if (eat(s, ':')) {
            if (!digits(s, 2, sec)) return std::nullopt;
            if (eat(s, '.') || eat(s, ',')) {
                int64_t scale = 100'000;
                size_t n = 0;
                while (!s.empty() && s[0] >= '0' && s[0] <= '9') {
                    frac_us += (s[0] - '0') * scale;  // digits past the 6th add 0: truncation
                    scale /= 10;
                    s.remove_prefix(1);
                    ++n;
                }
                if (n == 0) return std::nullopt;
            }
        }
        while (!s.empty() && s.front() == ' ') s.remove_prefix(1);
        if (eat(s, 'Z') || eat(s, 'z')) {
        } else if (s.size() >= 3 && (s[0] == '+' || s[0] == '-')) {
            int sign = s[0] == '-' ? -1 : 1;
            s.remove_prefix(1);
            int oh, om = 0;
            if (!digits(s, 2, oh)) return std::nullopt;
            eat(s, ':');
            if (!s.empty() && !digits(s, 2, om)) return std::nullopt;
            if (oh > 23 || om > 59) return std::nullopt;
            offset_s = sign * (oh * 3600 + om * 60);
        } else if (s == "UTC") {
            s = {};
        }
        if (!s.empty()) return std::nullopt;
    }
    if (mon < 1 || mon > 12 || day < 1 || day > 31 || hour > 23 || min > 59 || sec > 60) return std::nullopt;
    std::tm tm{};
    tm.tm_year = year - 1900;
    tm.tm_mon = mon - 1;
    tm.tm_mday = day;
    tm.tm_hour = hour;
    tm.tm_min = min;
    tm.tm_sec = sec;
    std::time_t t = timegm(&tm);
    if (t == static_cast<std::time_t>(-1)) return std::nullopt;
    std::tm back{};
    gmtime_r(&t, &back);
    if (back.tm_mday != day && sec != 60) return std::nullopt;  // 2026-02-30
    return (static_cast<int64_t>(t) - offset_s) * 1'000'000 + frac_us;
}

}  // namespace bottomless::replicator
