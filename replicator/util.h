// Small utilities the replicator's files share: a file descriptor that
// closes itself, whole-buffer positional reads and writes, and the clock
// in the units the object format uses, written and read as text (the
// replicator's status and the CLI share these).
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace bottomless::replicator {

// Owns a file descriptor (-1: none) and closes it.
struct Fd {
    int fd = -1;
    Fd() = default;
    explicit Fd(int f) : fd(f) {}
    Fd(const Fd&) = delete;
    Fd& operator=(const Fd&) = delete;
    ~Fd();
};

// Reads exactly n bytes at off (retrying short reads and EINTR); false on
// an error or end of file first.
bool pread_full(int fd, void* buf, size_t n, uint64_t off);
// Writes exactly n bytes at off (retrying short writes and EINTR).
bool pwrite_full(int fd, const void* buf, size_t n, uint64_t off);

// Duplicates the first `size` bytes of the open file src into the empty
// dst: a copy-on-write clone where the file system offers one (btrfs, XFS
// with reflink, bcachefs: no data is copied), else copy_file_range (in the
// kernel, no trip through user space), else read and write. 1: cloned, 0:
// copied, -1: failed with errno set (ENODATA: src ended before `size`).
int duplicate_file(int src, int dst, uint64_t size);

// Microseconds since the Unix epoch (wall clock), as commit times are kept.
int64_t now_us();

// Hands memory the C library holds but no longer uses back to the kernel.
// glibc keeps each thread arena's high-water mark resident after frees:
// frames the writer's thread allocated (the tee) and frames the uploader
// read back from the WAL live in two arenas, so a backlog shipped after an
// outage left the process ~2x the memory cap resident although the live
// bytes stayed within it. At most twice a second process-wide (it walks
// every arena); a no-op without glibc.
void release_free_memory() noexcept;
// Asks the kernel to back the whole 2 MiB pages inside [p, p+n) with
// transparent huge pages (madvise MADV_HUGEPAGE; a hint, errors ignored).
// For large buffers a restore fills once and that are still untouched: a
// first touch then costs one fault per 2 MiB instead of 512, which on a VM
// whose idle memory went back to the host halves the cost of cold memory
// (80 MiB: 260 -> 140 ms here). Only whole huge pages inside the range
// are advised; the kernel's THP setting "never" makes it a no-op.
void advise_huge_pages(void* p, size_t n) noexcept;
// "2026-12-01T04:51:40.330301Z" (UTC, microseconds), or "unknown" for <= 0.
std::string fmt_time_us(int64_t us);
// "2026-12-01 04:51:40.330301" (UTC, for tables; parse_time_us reads it
// back), or "-" for <= 0.
std::string fmt_time_table_us(int64_t us);
// Microseconds since the Unix epoch from RFC 3339 (with T or a space,
// fraction and offset optional; no offset: UTC), "YYYY-MM-DD HH:MM[:SS[.frac]]"
// (UTC) or "YYYY-MM-DD" (midnight UTC). A fraction finer than a microsecond
// is truncated, never rounded up ("at or before T" must not take in a later
// transaction). nullopt for anything else, or a date that does not exist.
std::optional<int64_t> parse_time_us(std::string_view text);

}  // namespace bottomless::replicator
