// Reading SQLite's WAL file: header and frame parsing, the WAL checksum, and
// a scan that applies SQLite's own recovery rules (wal.c, walIndexRecover) to
// find the last committed frame. Used to decide what may be shipped: only
// frames up to the last valid commit frame belong to committed transactions.
//
// This file deliberately does not call SQLite: the loadable extension must
// not carry a SQLite of its own, and the WAL format is simple enough to read
// directly.
#include "replicator/wal.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cassert>
#include <cerrno>
#include <cstring>
#include <thread>

namespace bottomless::replicator {

namespace {

// SQLite's limit (SQLITE_MAX_PAGE_SIZE); the WAL header stores the page size as is.
constexpr uint32_t kMinPageSize = 512;
constexpr uint32_t kMaxPageSize = 65536;
// Read the WAL in chunks of about this size so a scan of a large WAL does a
// few big preads instead of two small ones per frame.
constexpr size_t kScanChunkBytes = 1 << 20;

uint32_t read_le32(const unsigned char* p) {
    return static_cast<uint32_t>(p[0]) | (static_cast<uint32_t>(p[1]) << 8) | (static_cast<uint32_t>(p[2]) << 16) |
           (static_cast<uint32_t>(p[3]) << 24);
}

bool valid_page_size(uint32_t n) { return n >= kMinPageSize && n <= kMaxPageSize && (n & (n - 1)) == 0; }

// Closes the descriptor on every return path of the scan.
struct FdCloser {
    int fd = -1;
    ~FdCloser() {
        if (fd >= 0) ::close(fd);
    }
};

// Reads up to n bytes at off, retrying on EINTR and short reads so that a
// short count means end of file. Returns the count, or -1 with errno set.
ssize_t pread_full(int fd, unsigned char* buf, size_t n, uint64_t off) {
    size_t got = 0;
    while (got < n) {
        ssize_t r = ::pread(fd, buf + got, n - got, static_cast<off_t>(off + got));
        if (r < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        if (r == 0) break;
        got += static_cast<size_t>(r);
    }
    return static_cast<ssize_t>(got);
}

Error io_error(const std::string& what, const std::string& path, int err) {
    return make_error(ErrorKind::Io, "cannot " + what + " " + path + ": " + std::strerror(err), "WalReadFailed");
}

}  // namespace

uint32_t read_be32(const unsigned char* p) {
    return (static_cast<uint32_t>(p[0]) << 24) | (static_cast<uint32_t>(p[1]) << 16) |
           (static_cast<uint32_t>(p[2]) << 8) | static_cast<uint32_t>(p[3]);
}

void wal_checksum(bool big_endian, const unsigned char* data, size_t n, uint32_t& s1, uint32_t& s2) {
    // SQLite only ever checksums the 24-byte header prefix, 8-byte frame
    // header prefixes and whole pages, all multiples of 8.
    assert(n % 8 == 0);
    uint32_t a = s1, b = s2;
    const unsigned char* end = data + (n & ~static_cast<size_t>(7));
    if (big_endian) {
        for (const unsigned char* p = data; p < end; p += 8) {
            a += read_be32(p) + b;
            b += read_be32(p + 4) + a;
        }
    } else {
        for (const unsigned char* p = data; p < end; p += 8) {
            a += read_le32(p) + b;
            b += read_le32(p + 4) + a;
        }
    }
    s1 = a;
    s2 = b;
}

std::optional<WalHeader> parse_wal_header(const unsigned char* p32) {
    WalHeader h;
    h.magic = read_be32(p32);
    h.version = read_be32(p32 + 4);
    h.page_size = read_be32(p32 + 8);
    h.checkpoint_seq = read_be32(p32 + 12);
    h.salt1 = read_be32(p32 + 16);
    h.salt2 = read_be32(p32 + 20);
    h.cksum1 = read_be32(p32 + 24);
    h.cksum2 = read_be32(p32 + 28);
    if (h.magic != kWalMagicLittleEndian && h.magic != kWalMagicBigEndian) return std::nullopt;
    if (h.version != kWalVersion) return std::nullopt;
    if (!valid_page_size(h.page_size)) return std::nullopt;
    uint32_t s1 = 0, s2 = 0;
    wal_checksum(h.big_endian_checksums(), p32, 24, s1, s2);
    if (s1 != h.cksum1 || s2 != h.cksum2) return std::nullopt;
    return h;
}

WalFrameHeader parse_frame_header(const unsigned char* p24) {
    WalFrameHeader f;
    f.pgno = read_be32(p24);
    f.db_size = read_be32(p24 + 4);
    f.salt1 = read_be32(p24 + 8);
    f.salt2 = read_be32(p24 + 12);
    f.cksum1 = read_be32(p24 + 16);
    f.cksum2 = read_be32(p24 + 20);
    return f;
}

bool read_wal_index(const volatile unsigned char* shm, WalIndexHeader& out, bool both_copies) {
    unsigned char h[96];
    const size_t n = both_copies ? 96 : 48;
    for (size_t i = 0; i < n; ++i) h[i] = shm[i];
    if (h[12] == 0) return false;  // isInit
    if (both_copies && std::memcmp(h, h + 48, 48) != 0) return false;
    uint16_t sz_page;
    std::memcpy(&sz_page, h + 14, 2);
    out.page_size = (sz_page & 0xff00u) | (static_cast<uint32_t>(sz_page & 0x0001u) << 16);
    std::memcpy(&out.mx_frame, h + 16, 4);
    std::memcpy(&out.db_pages, h + 20, 4);
    std::memcpy(&out.cksum1, h + 24, 4);
    std::memcpy(&out.cksum2, h + 28, 4);
    out.salt1 = read_be32(h + 32);
    out.salt2 = read_be32(h + 36);
    return true;
}

bool read_wal_index_settled(const volatile unsigned char* shm, WalIndexHeader& out) {
    for (int i = 0; i < 1000; ++i) {
        if (read_wal_index(shm, out, true)) return true;
        std::this_thread::yield();
    }
    return false;
}

bool verify_frame(const WalHeader& hdr, const unsigned char* frame_header, const unsigned char* page, uint32_t& s1,
                  uint32_t& s2) {
    WalFrameHeader f = parse_frame_header(frame_header);
    // Frames left over from before a WAL restart carry the old salts: SQLite
    // treats them as the end of the log, and so must we.
    if (f.salt1 != hdr.salt1 || f.salt2 != hdr.salt2) return false;
    // walDecodeFrame also rejects page 0, which no database has.
    if (f.pgno == 0) return false;
    uint32_t a = s1, b = s2;
    wal_checksum(hdr.big_endian_checksums(), frame_header, 8, a, b);
    wal_checksum(hdr.big_endian_checksums(), page, hdr.page_size, a, b);
    if (a != f.cksum1 || b != f.cksum2) return false;
    s1 = a;
    s2 = b;
    return true;
}

Result<WalScan> scan_wal_file(const std::string& path) {
    WalScan scan;
    FdCloser file;
    do {
        file.fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    } while (file.fd < 0 && errno == EINTR);
    if (file.fd < 0) {
        // No WAL yet (or deleted by the last connection's close): nothing committed in it.
        if (errno == ENOENT) return scan;
        return io_error("open", path, errno);
    }

    unsigned char hdr_bytes[kWalHeaderSize];
    ssize_t got = pread_full(file.fd, hdr_bytes, sizeof hdr_bytes, 0);
    if (got < 0) return io_error("read the header of", path, errno);
    if (static_cast<size_t>(got) < kWalHeaderSize) return scan;
    std::optional<WalHeader> hdr = parse_wal_header(hdr_bytes);
    // SQLite's recovery treats an invalid header as an empty log.
    if (!hdr) return scan;
    scan.has_header = true;
    scan.header = *hdr;
    scan.cksum1 = hdr->cksum1;
    scan.cksum2 = hdr->cksum2;

    const size_t frame_size = kWalFrameHeaderSize + hdr->page_size;
    const size_t frames_per_chunk = std::max<size_t>(1, kScanChunkBytes / frame_size);
    std::vector<unsigned char> buf(frames_per_chunk * frame_size);
    uint32_t s1 = hdr->cksum1, s2 = hdr->cksum2;
    uint64_t frame = 1;
    for (;;) {
        uint64_t off = wal_frame_offset(hdr->page_size, frame);
        got = pread_full(file.fd, buf.data(), buf.size(), off);
        if (got < 0) return io_error("read frame " + std::to_string(frame) + " of", path, errno);
        // A frame cut short at the end of the file is not a frame (SQLite
        // only counts frames that fit whole).
        size_t whole = static_cast<size_t>(got) / frame_size;
        for (size_t i = 0; i < whole; ++i, ++frame) {
            const unsigned char* fh = buf.data() + i * frame_size;
            if (!verify_frame(*hdr, fh, fh + kWalFrameHeaderSize, s1, s2)) return scan;
            uint32_t db_size = read_be32(fh + 4);
            if (db_size != 0) {
                // Only a commit frame makes the frames before it durable
                // history; later frames may belong to an open or rolled-back
                // transaction.
                scan.last_commit_frame = static_cast<uint32_t>(frame);
                scan.db_size = db_size;
                scan.cksum1 = s1;
                scan.cksum2 = s2;
            }
        }
        if (static_cast<size_t>(got) < buf.size()) return scan;
    }
}

}  // namespace bottomless::replicator
