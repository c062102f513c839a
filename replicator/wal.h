// SQLite's WAL file format, read-only: header, frame headers, checksums.
//
// Facts (sqlite.org/fileformat2.html#walformat): a 32-byte header (magic
// 0x377f0682 or 0x377f0683 — the low bit picks big-endian checksums —,
// version 3007000, page size, checkpoint sequence, salt-1, salt-2, checksum-1,
// checksum-2 over the first 24 bytes), then frames of a 24-byte header (page
// number, db size in pages after commit or 0, salt-1, salt-2, checksum-1,
// checksum-2) followed by one page. All header integers are big-endian. A
// frame is valid when its salts equal the header's and its cumulative
// checksum (over the previous checksum, the frame header's first 8 bytes and
// the page) matches; a frame with a non-zero db size ends a transaction.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "s3/result.h"

namespace bottomless::replicator {

constexpr uint32_t kWalMagicLittleEndian = 0x377f0682;
constexpr uint32_t kWalMagicBigEndian = 0x377f0683;
constexpr uint32_t kWalVersion = 3007000;
constexpr size_t kWalHeaderSize = 32;
constexpr size_t kWalFrameHeaderSize = 24;

struct WalHeader {
    uint32_t magic = 0;
    uint32_t version = 0;
    uint32_t page_size = 0;   // 65536 is stored as 65536 here (the file stores it as is)
    uint32_t checkpoint_seq = 0;
    uint32_t salt1 = 0;
    uint32_t salt2 = 0;
    uint32_t cksum1 = 0;
    uint32_t cksum2 = 0;
    bool big_endian_checksums() const { return (magic & 1) != 0; }
};

struct WalFrameHeader {
    uint32_t pgno = 0;
    uint32_t db_size = 0;  // non-zero: commit frame, database size in pages after the commit
    uint32_t salt1 = 0;
    uint32_t salt2 = 0;
    uint32_t cksum1 = 0;
    uint32_t cksum2 = 0;
    bool is_commit() const { return db_size != 0; }
};

uint32_t read_be32(const unsigned char* p);

// Parses and validates a WAL header: magic, version, page size (a power of
// two from 512 to 65536) and its own checksum. nullopt if any fails.
std::optional<WalHeader> parse_wal_header(const unsigned char* p32);
WalFrameHeader parse_frame_header(const unsigned char* p24);

// SQLite's WAL checksum: over n bytes (a multiple of 8) continuing from
// (s1, s2), reading 32-bit words in the order the magic number selects.
void wal_checksum(bool big_endian, const unsigned char* data, size_t n, uint32_t& s1, uint32_t& s2);

// Checks one frame against the header's salts and the running checksum
// (s1, s2): the checksum of everything before this frame. On success (s1, s2)
// become this frame's checksum.
bool verify_frame(const WalHeader& hdr, const unsigned char* frame_header, const unsigned char* page,
                  uint32_t& s1, uint32_t& s2);

// The wal-index header: the first 48 bytes of the -shm mapping (WalIndexHdr
// in SQLite's wal.c), in native byte order except the salts (the WAL
// header's bytes), followed by a second copy that a reader compares.
struct WalIndexHeader {
    uint32_t salt1 = 0, salt2 = 0;
    uint32_t mx_frame = 0;   // the last committed frame (0: the WAL is empty or restarted)
    uint32_t page_size = 0;
    uint32_t db_pages = 0;   // the database's size in pages after that commit
    uint32_t cksum1 = 0, cksum2 = 0;  // running checksum of frame mx_frame (stale when mx_frame is 0)
};
// Reads the header from a mapped region 0; false when it is not initialised
// or, with `both_copies` (a reader that holds no WAL lock), while the two
// copies differ (a writer is updating it: read again).
bool read_wal_index(const volatile unsigned char* shm, WalIndexHeader& out, bool both_copies);
// Without a WAL lock: reads until the two copies agree (a writer updates
// them one after the other), yielding between tries; false if they never
// did in 1000 tries.
bool read_wal_index_settled(const volatile unsigned char* shm, WalIndexHeader& out);

// Byte offset of frame i (1-based) in a WAL with this page size.
inline uint64_t wal_frame_offset(uint32_t page_size, uint64_t i) {
    return kWalHeaderSize + (i - 1) * (kWalFrameHeaderSize + static_cast<uint64_t>(page_size));
}

// What a scan of a WAL file found, by SQLite's own recovery rules: frames are
// read from the start while valid; everything after the last valid commit
// frame is ignored.
struct WalScan {
    bool has_header = false;   // false: missing, empty, or an invalid header (no frames count)
    WalHeader header;
    uint32_t last_commit_frame = 0;  // 0: no committed frame
    uint32_t db_size = 0;            // pages, from the last commit frame
    uint32_t cksum1 = 0, cksum2 = 0; // running checksum after last_commit_frame (header's when 0)
};

// Scans the WAL at path (a missing file is an empty scan, not an error).
// Reads with its own file descriptor: the WAL file carries no POSIX locks,
// so opening and closing it does not disturb SQLite's locking.
Result<WalScan> scan_wal_file(const std::string& path);

}  // namespace bottomless::replicator
