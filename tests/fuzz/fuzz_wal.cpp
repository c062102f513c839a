// Fuzzes the WAL reader (replicator/wal.h): scan_wal_file, and through it
// parse_wal_header, parse_frame_header, verify_frame and wal_checksum. The
// WAL is local but a crash may leave any bytes in it, and the replicator
// decides from the scan what is committed history.
//
// Input: a WAL file. It is scanned twice, from memory (memfd): as it is, and
// "repaired": the harness fixes magic, version, page size, salts and every
// checksum (else almost every mutation stops at the header checksum), then
// checks the scan against its own reading of SQLite's rules: frames count
// from the start while their page number is not 0; the last frame with a
// non-zero database size is the last commit.
#include <cstdint>
#include <string>

#include "fuzz_common.h"
#include "replicator/wal.h"

using namespace bottomless;
using namespace bottomless::replicator;

namespace {

void put_be32(std::string& s, size_t at, uint32_t v) {
    for (int i = 0; i < 4; ++i) s[at + i] = static_cast<char>((v >> (24 - 8 * i)) & 0xff);
}
const unsigned char* bytes(const std::string& s, size_t at = 0) {
    return reinterpret_cast<const unsigned char*>(s.data() + at);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    fuzz::quiet_logs();
    std::string wal(fuzz::as_view(data, size));
    {
        fuzz::MemFile f(wal);
        auto scan = scan_wal_file(f.path());
        FUZZ_CHECK(scan.ok());
        if (scan->has_header)
            FUZZ_CHECK(wal_frame_offset(scan->header.page_size, scan->last_commit_frame + 1) <= wal.size());
    }
    if (wal.size() < kWalHeaderSize) return 0;

    // Repair: a valid header whatever the input says, then valid frames.
    const unsigned char* h = bytes(wal);
    put_be32(wal, 0, kWalMagicLittleEndian | (h[3] & 1));
    put_be32(wal, 4, kWalVersion);
    uint32_t page_size = read_be32(bytes(wal, 8));
    if (page_size < 512 || page_size > 65536 || (page_size & (page_size - 1)) != 0) {
        page_size = 512u << (h[11] % 8);
        put_be32(wal, 8, page_size);
    }
    const bool big_endian = (read_be32(bytes(wal)) & 1) != 0;
    uint32_t s1 = 0, s2 = 0;
    wal_checksum(big_endian, bytes(wal), 24, s1, s2);
    put_be32(wal, 24, s1);
    put_be32(wal, 28, s2);
    const uint32_t salt1 = read_be32(bytes(wal, 16)), salt2 = read_be32(bytes(wal, 20));

    uint32_t expect_commit = 0, expect_db_size = 0;
    uint32_t expect_c1 = s1, expect_c2 = s2;
    for (uint64_t i = 1;; ++i) {
        const uint64_t off = wal_frame_offset(page_size, i);
        if (off + kWalFrameHeaderSize + page_size > wal.size()) break;
        if (read_be32(bytes(wal, off)) == 0) break;  // page 0: the log ends here
        put_be32(wal, off + 8, salt1);
        put_be32(wal, off + 12, salt2);
        wal_checksum(big_endian, bytes(wal, off), 8, s1, s2);
        wal_checksum(big_endian, bytes(wal, off + kWalFrameHeaderSize), page_size, s1, s2);
        put_be32(wal, off + 16, s1);
        put_be32(wal, off + 20, s2);
        if (uint32_t db_size = read_be32(bytes(wal, off + 4)); db_size != 0) {
            expect_commit = static_cast<uint32_t>(i);
            expect_db_size = db_size;
            expect_c1 = s1;
            expect_c2 = s2;
        }
    }

    fuzz::MemFile f(wal);
    auto scan = scan_wal_file(f.path());
    FUZZ_CHECK(scan.ok());
    FUZZ_CHECK(scan->has_header);
    FUZZ_CHECK(scan->header.page_size == page_size);
    FUZZ_CHECK(scan->last_commit_frame == expect_commit);
    FUZZ_CHECK(scan->db_size == expect_db_size);
    FUZZ_CHECK(scan->cksum1 == expect_c1 && scan->cksum2 == expect_c2);
    return 0;
}
