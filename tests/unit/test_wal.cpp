// The WAL reader against WAL files SQLite itself wrote (page sizes 512 to
// 65536, corruption, rolled-back transactions) and against hand-made WALs
// checksummed by a reference implementation written here from the format
// description, so both checksum byte orders are covered.
#include <catch2/catch.hpp>
#include <sqlite3.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "replicator/wal.h"

using namespace bottomless;
using namespace bottomless::replicator;

namespace {

struct TempDir {
    std::filesystem::path path;
    TempDir() {
        std::string tmpl = (std::filesystem::temp_directory_path() / "bottomless-wal-XXXXXX").string();
        REQUIRE(::mkdtemp(tmpl.data()) != nullptr);
        path = tmpl;
    }
    ~TempDir() {
        std::error_code ec;
        std::filesystem::remove_all(path, ec);
    }
    std::string file(const std::string& name) const { return (path / name).string(); }
};

struct DbCloser {
    void operator()(sqlite3* db) const noexcept { sqlite3_close(db); }
};
using DbPtr = std::unique_ptr<sqlite3, DbCloser>;

void exec(sqlite3* db, const std::string& sql) {
    char* err = nullptr;
    int rc = sqlite3_exec(db, sql.c_str(), nullptr, nullptr, &err);
    std::string msg = err ? err : "";
    sqlite3_free(err);
    INFO(sql << ": " << msg);
    REQUIRE(rc == SQLITE_OK);
}

// The first column of each row of a query, as integers.
std::vector<int64_t> query_ints(sqlite3* db, const std::string& sql) {
    sqlite3_stmt* raw = nullptr;
    REQUIRE(sqlite3_prepare_v2(db, sql.c_str(), -1, &raw, nullptr) == SQLITE_OK);
    std::unique_ptr<sqlite3_stmt, int (*)(sqlite3_stmt*)> stmt(raw, sqlite3_finalize);
    std::vector<int64_t> out;
    int rc;
    while ((rc = sqlite3_step(stmt.get())) == SQLITE_ROW) {
        for (int i = 0; i < sqlite3_column_count(stmt.get()); ++i) out.push_back(sqlite3_column_int64(stmt.get(), i));
    }
    REQUIRE(rc == SQLITE_DONE);
    return out;
}

int64_t query_int(sqlite3* db, const std::string& sql) {
    auto v = query_ints(db, sql);
    REQUIRE(!v.empty());
    return v[0];
}

std::string read_file(const std::string& path) {
    std::ifstream f(path, std::ios::binary);
    REQUIRE(f.good());
    return std::string(std::istreambuf_iterator<char>(f), {});
}

void write_file(const std::string& path, const std::string& bytes) {
    std::ofstream f(path, std::ios::binary | std::ios::trunc);
    f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    REQUIRE(f.good());
}

const unsigned char* u8(const std::string& s, size_t off = 0) {
    return reinterpret_cast<const unsigned char*>(s.data()) + off;
}

// The frame count after each commit, as SQLite reports it to the WAL hook
// (pWal->hdr.mxFrame): the oracle for which frames are committed. Installing
// the hook also disables automatic checkpoints, which use the same slot.
int record_commit(void* arg, sqlite3*, const char*, int frames) {
    static_cast<std::vector<uint32_t>*>(arg)->push_back(static_cast<uint32_t>(frames));
    return SQLITE_OK;
}

// A database in WAL mode with a connection kept open so its -wal file stays.
struct WalDb {
    std::string path;
    DbPtr db;
    std::vector<uint32_t> commits;  // mxFrame after each commit, in order

    WalDb(const std::string& p, int page_size) : path(p) {
        sqlite3* raw = nullptr;
        int rc = sqlite3_open(path.c_str(), &raw);
        db.reset(raw);
        REQUIRE(rc == SQLITE_OK);
        // The page size only sticks before the database has content; the
        // switch to WAL mode writes the first page.
        exec(db.get(), "PRAGMA page_size=" + std::to_string(page_size));
        exec(db.get(), "PRAGMA journal_mode=wal");
        exec(db.get(), "PRAGMA wal_autocheckpoint=0");
        REQUIRE(query_int(db.get(), "PRAGMA page_size") == page_size);
        sqlite3_wal_hook(db.get(), record_commit, &commits);
    }
    std::string wal_path() const { return path + "-wal"; }
};

// Several committed transactions: a table, then batches of rows big enough
// that the WAL spans more than one of the scanner's read chunks.
void write_transactions(WalDb& w, int txns, int rows_per_txn) {
    exec(w.db.get(), "CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, v BLOB)");
    for (int i = 0; i < txns; ++i) {
        exec(w.db.get(), "BEGIN");
        exec(w.db.get(), "WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n+1 FROM c WHERE n<" +
                             std::to_string(rows_per_txn) + ") INSERT INTO t(v) SELECT randomblob(1000) FROM c");
        exec(w.db.get(), "COMMIT");
    }
}

uint64_t frames_in(const std::string& wal, uint32_t page_size) {
    if (wal.size() < kWalHeaderSize) return 0;
    return (wal.size() - kWalHeaderSize) / (kWalFrameHeaderSize + page_size);
}

// ---- a reference checksum, written from the format description ----

uint32_t ref_word(const unsigned char* p, bool big_endian) {
    uint32_t v = 0;
    for (int i = 0; i < 4; ++i) {
        int byte = big_endian ? i : 3 - i;
        v = (v << 8) | p[byte];
    }
    return v;
}

void ref_checksum(bool big_endian, const unsigned char* data, size_t n, uint32_t& s1, uint32_t& s2) {
    for (size_t i = 0; i + 8 <= n; i += 8) {
        uint64_t x0 = ref_word(data + i, big_endian), x1 = ref_word(data + i + 4, big_endian);
        s1 = static_cast<uint32_t>((s1 + x0 + s2) & 0xffffffffu);
        s2 = static_cast<uint32_t>((s2 + x1 + s1) & 0xffffffffu);
    }
}

void put_be(std::string& s, size_t off, uint32_t v) {
    s[off] = static_cast<char>(v >> 24);
    s[off + 1] = static_cast<char>(v >> 16);
    s[off + 2] = static_cast<char>(v >> 8);
    s[off + 3] = static_cast<char>(v);
}

std::string make_header(uint32_t magic, uint32_t page_size, uint32_t salt1, uint32_t salt2,
                        uint32_t version = kWalVersion) {
    std::string h(kWalHeaderSize, '\0');
    put_be(h, 0, magic);
    put_be(h, 4, version);
    put_be(h, 8, page_size);
    put_be(h, 12, 7);  // checkpoint sequence
    put_be(h, 16, salt1);
    put_be(h, 20, salt2);
    uint32_t s1 = 0, s2 = 0;
    ref_checksum((magic & 1) != 0, u8(h), 24, s1, s2);
    put_be(h, 24, s1);
    put_be(h, 28, s2);
    return h;
}

struct RefFrame {
    uint32_t pgno;
    uint32_t db_size;
};

// A whole WAL: header plus frames with random pages, checksummed by the reference.
std::string make_wal(uint32_t magic, uint32_t page_size, const std::vector<RefFrame>& frames, uint32_t seed = 1) {
    const uint32_t salt1 = 0x11223344, salt2 = 0xa5a5f00d;
    std::string wal = make_header(magic, page_size, salt1, salt2);
    uint32_t s1 = read_be32(u8(wal, 24)), s2 = read_be32(u8(wal, 28));
    std::mt19937 rng(seed);
    for (const RefFrame& f : frames) {
        std::string fh(kWalFrameHeaderSize, '\0');
        put_be(fh, 0, f.pgno);
        put_be(fh, 4, f.db_size);
        put_be(fh, 8, salt1);
        put_be(fh, 12, salt2);
        std::string page(page_size, '\0');
        for (char& c : page) c = static_cast<char>(rng());
        ref_checksum((magic & 1) != 0, u8(fh), 8, s1, s2);
        ref_checksum((magic & 1) != 0, u8(page), page_size, s1, s2);
        put_be(fh, 16, s1);
        put_be(fh, 20, s2);
        wal += fh;
        wal += page;
    }
    return wal;
}

}  // namespace

TEST_CASE("wal_checksum matches hand-computed values in both byte orders", "[wal]") {
    // Words (1, 2, 3, 4): s1 = 0+1+0 = 1, s2 = 0+2+1 = 3, then s1 = 1+3+3 = 7, s2 = 3+4+7 = 14.
    const unsigned char le[16] = {1, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0, 4, 0, 0, 0};
    const unsigned char be[16] = {0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0, 4};
    uint32_t s1 = 0, s2 = 0;
    wal_checksum(false, le, 16, s1, s2);
    CHECK(s1 == 7);
    CHECK(s2 == 14);
    s1 = s2 = 0;
    wal_checksum(true, be, 16, s1, s2);
    CHECK(s1 == 7);
    CHECK(s2 == 14);
    // The same bytes read in the other order give other words.
    s1 = s2 = 0;
    wal_checksum(true, le, 16, s1, s2);
    CHECK(s1 == 0x07000000u);
    CHECK(s2 == 0x0e000000u);

    SECTION("it continues from the given sums and wraps at 32 bits") {
        const unsigned char ff[8] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff};
        s1 = 5;
        s2 = 9;
        wal_checksum(false, ff, 8, s1, s2);
        CHECK(s1 == 13u);  // 5 + 0xffffffff + 9 mod 2^32
        CHECK(s2 == 21u);  // 9 + 0xffffffff + 13 mod 2^32
    }
    SECTION("it agrees with the reference on random data") {
        std::mt19937 rng(42);
        std::string data(4096, '\0');
        for (char& c : data) c = static_cast<char>(rng());
        for (bool big : {false, true}) {
            uint32_t a1 = 123, a2 = 456, b1 = 123, b2 = 456;
            wal_checksum(big, u8(data), data.size(), a1, a2);
            ref_checksum(big, u8(data), data.size(), b1, b2);
            CHECK(a1 == b1);
            CHECK(a2 == b2);
        }
    }
}

TEST_CASE("WAL headers with either magic parse, and any defect rejects them", "[wal]") {
    uint32_t magic = GENERATE(kWalMagicLittleEndian, kWalMagicBigEndian);
    std::string h = make_header(magic, 4096, 0xdeadbeef, 0x01020304);
    auto parsed = parse_wal_header(u8(h));
    REQUIRE(parsed.has_value());
    CHECK(parsed->magic == magic);
    CHECK(parsed->big_endian_checksums() == (magic == kWalMagicBigEndian));
    CHECK(parsed->version == kWalVersion);
    CHECK(parsed->page_size == 4096);
    CHECK(parsed->checkpoint_seq == 7);
    CHECK(parsed->salt1 == 0xdeadbeef);
    CHECK(parsed->salt2 == 0x01020304);
    CHECK(parsed->cksum1 == read_be32(u8(h, 24)));
    CHECK(parsed->cksum2 == read_be32(u8(h, 28)));

    SECTION("the other magic with the same checksum fails: the byte order matters") {
        put_be(h, 0, magic ^ 1);
        CHECK_FALSE(parse_wal_header(u8(h)).has_value());
    }
    SECTION("a flipped bit anywhere in the checksummed part fails") {
        size_t byte = GENERATE(12, 16, 23, 24, 31);
        h[byte] = static_cast<char>(h[byte] ^ 0x10);
        CHECK_FALSE(parse_wal_header(u8(h)).has_value());
    }
    SECTION("a wrong magic fails even with a valid checksum") {
        std::string bad = make_header(0x377f0684, 4096, 1, 2);
        CHECK_FALSE(parse_wal_header(u8(bad)).has_value());
    }
    SECTION("a wrong version fails even with a valid checksum") {
        std::string bad = make_header(magic, 4096, 1, 2, 3007001);
        CHECK_FALSE(parse_wal_header(u8(bad)).has_value());
    }
    SECTION("page sizes outside 512..65536 or not a power of two fail even with a valid checksum") {
        uint32_t ps = GENERATE(0u, 256u, 1000u, 4097u, 131072u, 1u << 31);
        std::string bad = make_header(magic, ps, 1, 2);
        CHECK_FALSE(parse_wal_header(u8(bad)).has_value());
    }
    SECTION("every valid page size is accepted, 65536 stored as is") {
        uint32_t ps = GENERATE(512u, 1024u, 2048u, 4096u, 8192u, 16384u, 32768u, 65536u);
        std::string good = make_header(magic, ps, 1, 2);
        auto p = parse_wal_header(u8(good));
        REQUIRE(p.has_value());
        CHECK(p->page_size == ps);
    }
}

TEST_CASE("verify_frame chains checksums and checks salts", "[wal]") {
    uint32_t magic = GENERATE(kWalMagicLittleEndian, kWalMagicBigEndian);
    const uint32_t ps = 1024;
    std::string wal = make_wal(magic, ps, {{3, 0}, {1, 0}, {2, 5}});
    auto hdr = parse_wal_header(u8(wal));
    REQUIRE(hdr.has_value());
    const size_t fsz = kWalFrameHeaderSize + ps;
    auto frame = [&](int i) { return u8(wal, wal_frame_offset(ps, i)); };

    uint32_t s1 = hdr->cksum1, s2 = hdr->cksum2;
    for (int i = 1; i <= 3; ++i) {
        INFO("frame " << i);
        REQUIRE(verify_frame(*hdr, frame(i), frame(i) + kWalFrameHeaderSize, s1, s2));
        WalFrameHeader fh = parse_frame_header(frame(i));
        CHECK(s1 == fh.cksum1);
        CHECK(s2 == fh.cksum2);
    }
    CHECK(parse_frame_header(frame(3)).is_commit());
    CHECK(parse_frame_header(frame(3)).db_size == 5);
    CHECK_FALSE(parse_frame_header(frame(1)).is_commit());
    CHECK(parse_frame_header(frame(1)).pgno == 3);
    CHECK(wal_frame_offset(ps, 1) == 32);
    CHECK(wal_frame_offset(ps, 3) == 32 + 2 * fsz);

    SECTION("a frame checked from the wrong running checksum fails and leaves the sums alone") {
        uint32_t a = hdr->cksum1, b = hdr->cksum2;
        CHECK_FALSE(verify_frame(*hdr, frame(2), frame(2) + kWalFrameHeaderSize, a, b));
        CHECK(a == hdr->cksum1);
        CHECK(b == hdr->cksum2);
    }
    SECTION("the other byte order fails") {
        WalHeader other = *hdr;
        other.magic ^= 1;
        uint32_t a = hdr->cksum1, b = hdr->cksum2;
        CHECK_FALSE(verify_frame(other, frame(1), frame(1) + kWalFrameHeaderSize, a, b));
    }
    SECTION("salts from another WAL epoch fail") {
        WalHeader other = *hdr;
        other.salt2 += 1;
        uint32_t a = hdr->cksum1, b = hdr->cksum2;
        CHECK_FALSE(verify_frame(other, frame(1), frame(1) + kWalFrameHeaderSize, a, b));
    }
    SECTION("a flipped bit in the checksummed frame header or the page fails") {
        size_t off = GENERATE(0, 3, 5, 16, 23, 24, 24 + 511, 24 + 1023);
        wal[wal_frame_offset(ps, 1) + off] ^= 0x01;
        uint32_t a = hdr->cksum1, b = hdr->cksum2;
        CHECK_FALSE(verify_frame(*hdr, frame(1), frame(1) + kWalFrameHeaderSize, a, b));
    }
    SECTION("page number 0 is never valid, whatever the checksum says") {
        std::string zero = make_wal(magic, ps, {{0, 1}});
        auto h0 = parse_wal_header(u8(zero));
        REQUIRE(h0.has_value());
        uint32_t a = h0->cksum1, b = h0->cksum2;
        CHECK_FALSE(verify_frame(*h0, u8(zero, 32), u8(zero, 32 + kWalFrameHeaderSize), a, b));
    }
}

TEST_CASE("scanning hand-made WALs follows SQLite's recovery rules", "[wal]") {
    TempDir dir;
    const std::string path = dir.file("db-wal");
    uint32_t magic = GENERATE(kWalMagicLittleEndian, kWalMagicBigEndian);
    const uint32_t ps = 512;
    // Three transactions: frames 1-2, 3, 4-6; frame 7 belongs to an open one.
    std::string wal = make_wal(magic, ps, {{2, 0}, {1, 2}, {3, 3}, {4, 0}, {1, 0}, {5, 5}, {6, 0}});

    SECTION("all valid: the last commit frame and its checksum") {
        write_file(path, wal);
        auto scan = scan_wal_file(path);
        REQUIRE(scan.ok());
        CHECK(scan->has_header);
        CHECK(scan->header.magic == magic);
        CHECK(scan->last_commit_frame == 6);
        CHECK(scan->db_size == 5);
        CHECK(scan->cksum1 == read_be32(u8(wal, wal_frame_offset(ps, 6) + 16)));
        CHECK(scan->cksum2 == read_be32(u8(wal, wal_frame_offset(ps, 6) + 20)));
    }
    SECTION("a file cut inside a frame counts only whole frames") {
        size_t cut = GENERATE(1, 23, 24, 100, 535);
        write_file(path, wal.substr(0, wal_frame_offset(ps, 6) + cut));
        auto scan = scan_wal_file(path);
        REQUIRE(scan.ok());
        CHECK(scan->last_commit_frame == 3);
        CHECK(scan->db_size == 3);
        CHECK(scan->cksum1 == read_be32(u8(wal, wal_frame_offset(ps, 3) + 16)));
    }
    SECTION("a file holding the header and less than one frame has no commits") {
        size_t extra = GENERATE(0, 1, 24, 535);
        write_file(path, wal.substr(0, 32 + extra));
        auto scan = scan_wal_file(path);
        REQUIRE(scan.ok());
        CHECK(scan->has_header);
        CHECK(scan->last_commit_frame == 0);
        CHECK(scan->db_size == 0);
        CHECK(scan->cksum1 == scan->header.cksum1);
        CHECK(scan->cksum2 == scan->header.cksum2);
    }
    SECTION("an invalid frame ends the log even if valid-looking frames follow") {
        // Corrupt frame 4 (first of the third transaction): frames 5-6 are
        // still intact, but recovery never reaches them.
        wal[wal_frame_offset(ps, 4) + kWalFrameHeaderSize + 7] ^= 0x40;
        write_file(path, wal);
        auto scan = scan_wal_file(path);
        REQUIRE(scan.ok());
        CHECK(scan->last_commit_frame == 3);
    }
    SECTION("frames with the salts of an earlier WAL epoch end the log") {
        // The same frames under a header with new salts, as after a WAL restart
        // that has not yet overwritten them.
        std::string restarted = make_header(magic, ps, 0x99999999, 0x12345678) + wal.substr(32);
        write_file(path, restarted);
        auto scan = scan_wal_file(path);
        REQUIRE(scan.ok());
        CHECK(scan->has_header);
        CHECK(scan->header.salt1 == 0x99999999);
        CHECK(scan->last_commit_frame == 0);
    }
}

TEST_CASE("scanning a WAL that is missing, empty or has a bad header", "[wal]") {
    TempDir dir;
    const std::string path = dir.file("db-wal");

    SECTION("a missing file is an empty scan, not an error") {
        auto scan = scan_wal_file(dir.file("nope-wal"));
        REQUIRE(scan.ok());
        CHECK_FALSE(scan->has_header);
        CHECK(scan->last_commit_frame == 0);
    }
    SECTION("an empty file or a truncated header") {
        size_t len = GENERATE(0, 1, 16, 31);
        std::string wal = make_wal(kWalMagicLittleEndian, 512, {{1, 1}});
        write_file(path, wal.substr(0, len));
        auto scan = scan_wal_file(path);
        REQUIRE(scan.ok());
        CHECK_FALSE(scan->has_header);
        CHECK(scan->last_commit_frame == 0);
    }
    SECTION("a header with a wrong version, bad page size or bad checksum hides its frames") {
        std::string wal = make_wal(kWalMagicLittleEndian, 512, {{1, 1}});
        std::string bad_header = GENERATE(as<std::string>{}, "version", "page_size", "checksum");
        if (bad_header == "version")
            wal.replace(0, 32, make_header(kWalMagicLittleEndian, 512, 0x11223344, 0xa5a5f00d, 3007001));
        if (bad_header == "page_size")
            wal.replace(0, 32, make_header(kWalMagicLittleEndian, 768, 0x11223344, 0xa5a5f00d));
        if (bad_header == "checksum") wal[27] ^= 1;
        // The frame itself stays valid under the original header.
        {
            write_file(path, make_wal(kWalMagicLittleEndian, 512, {{1, 1}}));
            auto ok = scan_wal_file(path);
            REQUIRE(ok.ok());
            REQUIRE(ok->last_commit_frame == 1);
        }
        INFO(bad_header);
        write_file(path, wal);
        auto scan = scan_wal_file(path);
        REQUIRE(scan.ok());
        CHECK_FALSE(scan->has_header);
        CHECK(scan->last_commit_frame == 0);
    }
    SECTION("a path that cannot be read is an I/O error") {
        auto scan = scan_wal_file(dir.path.string());  // a directory: open works, read fails
        REQUIRE_FALSE(scan.ok());
        CHECK(scan.error().kind == ErrorKind::Io);
        CHECK(scan.error().message.find(dir.path.string()) != std::string::npos);
    }
}

TEST_CASE("scanning WALs written by SQLite finds exactly the committed frames", "[wal][sqlite]") {
    int page_size = GENERATE(512, 4096, 65536);
    INFO("page size " << page_size);
    TempDir dir;
    WalDb w(dir.file("test.db"), page_size);
    write_transactions(w, 8, 200);
    REQUIRE(w.commits.size() == 9);  // CREATE TABLE + 8 batches

    std::string wal = read_file(w.wal_path());
    const uint64_t frames = frames_in(wal, static_cast<uint32_t>(page_size));
    // Every frame belongs to a committed transaction here, and the WAL is
    // bigger than one read chunk of the scanner.
    REQUIRE(frames == w.commits.back());
    REQUIRE(wal.size() > (1u << 20));

    auto scan = scan_wal_file(w.wal_path());
    REQUIRE(scan.ok());
    REQUIRE(scan->has_header);
    CHECK(scan->header.page_size == static_cast<uint32_t>(page_size));
    CHECK(scan->header.version == kWalVersion);
    CHECK(scan->last_commit_frame == w.commits.back());
    CHECK(scan->db_size == query_int(w.db.get(), "PRAGMA page_count"));
    const size_t last = wal_frame_offset(page_size, scan->last_commit_frame);
    CHECK(scan->cksum1 == read_be32(u8(wal, last + 16)));
    CHECK(scan->cksum2 == read_be32(u8(wal, last + 20)));

    SECTION("verify_frame accepts every frame; commit frames are where SQLite said") {
        auto hdr = parse_wal_header(u8(wal));
        REQUIRE(hdr.has_value());
        uint32_t s1 = hdr->cksum1, s2 = hdr->cksum2;
        std::vector<uint32_t> commit_frames;
        for (uint64_t i = 1; i <= frames; ++i) {
            const unsigned char* f = u8(wal, wal_frame_offset(page_size, i));
            INFO("frame " << i);
            REQUIRE(verify_frame(*hdr, f, f + kWalFrameHeaderSize, s1, s2));
            if (parse_frame_header(f).is_commit()) commit_frames.push_back(static_cast<uint32_t>(i));
        }
        CHECK(commit_frames == w.commits);
    }
    SECTION("SQLite's own checkpoint agrees on the number of frames in the log") {
        auto ck = query_ints(w.db.get(), "PRAGMA wal_checkpoint(PASSIVE)");
        REQUIRE(ck.size() == 3);
        CHECK(ck[0] == 0);
        CHECK(ck[1] == scan->last_commit_frame);
    }
    SECTION("a flipped byte stops the scan before that frame's transaction") {
        // Corrupt a frame of transaction t: the first, the commit frame, or one
        // in the middle; in the page or in the frame header. Loops, not
        // GENERATE, so the database is written once per page size.
        const std::string copy = dir.file("copy-wal");
        std::mt19937 rng(static_cast<uint32_t>(page_size));
        for (size_t t : {0, 1, 4, 8}) {
            for (const char* where : {"first", "middle", "commit"}) {
                for (bool in_page : {true, false}) {
                    uint32_t first = t == 0 ? 1 : w.commits[t - 1] + 1;
                    uint32_t commit = w.commits[t];
                    uint32_t target = std::string(where) == "first"    ? first
                                      : std::string(where) == "commit" ? commit
                                                                       : (first + commit) / 2;
                    uint32_t expected = t == 0 ? 0 : w.commits[t - 1];
                    size_t off = wal_frame_offset(page_size, target);
                    off += in_page ? kWalFrameHeaderSize + rng() % page_size : rng() % kWalFrameHeaderSize;
                    INFO("txn " << t << " frame " << target << " (" << where << ") byte " << off);

                    std::string bad = wal;
                    bad[off] = static_cast<char>(bad[off] ^ (1 << (rng() % 8)));
                    write_file(copy, bad);
                    auto s = scan_wal_file(copy);
                    REQUIRE(s.ok());
                    CHECK(s->has_header);
                    CHECK(s->last_commit_frame == expected);
                    if (expected > 0) {
                        size_t e = wal_frame_offset(page_size, expected);
                        CHECK(s->db_size == read_be32(u8(wal, e + 4)));
                        CHECK(s->cksum1 == read_be32(u8(wal, e + 16)));
                        CHECK(s->cksum2 == read_be32(u8(wal, e + 20)));
                    } else {
                        CHECK(s->db_size == 0);
                        CHECK(s->cksum1 == s->header.cksum1);
                    }
                }
            }
        }
    }
}

TEST_CASE("frames of a rolled-back transaction are not counted as committed", "[wal][sqlite]") {
    TempDir dir;
    WalDb w(dir.file("test.db"), 4096);
    write_transactions(w, 2, 20);
    const uint32_t committed = w.commits.back();

    // A transaction too big for a tiny page cache spills dirty pages into the
    // WAL before it ends; the rollback leaves those frames in the file.
    exec(w.db.get(), "PRAGMA cache_size=1");
    exec(w.db.get(), "BEGIN");
    exec(w.db.get(),
         "WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n+1 FROM c WHERE n<3000) "
         "INSERT INTO t(v) SELECT randomblob(1000) FROM c");
    exec(w.db.get(), "ROLLBACK");
    REQUIRE(w.commits.back() == committed);

    std::string wal = read_file(w.wal_path());
    const uint64_t frames = frames_in(wal, 4096);
    // The spilled frames are really there (else this test proves nothing),
    // and they chain validly: only the missing commit frame disqualifies them.
    REQUIRE(frames > committed + 100);
    {
        auto hdr = parse_wal_header(u8(wal));
        REQUIRE(hdr.has_value());
        uint32_t s1 = hdr->cksum1, s2 = hdr->cksum2;
        uint64_t valid = 0;
        for (uint64_t i = 1; i <= frames; ++i) {
            const unsigned char* f = u8(wal, wal_frame_offset(4096, i));
            if (!verify_frame(*hdr, f, f + kWalFrameHeaderSize, s1, s2)) break;
            valid = i;
        }
        CHECK(valid > committed);
    }

    auto scan = scan_wal_file(w.wal_path());
    REQUIRE(scan.ok());
    CHECK(scan->last_commit_frame == committed);
    CHECK(scan->db_size == query_int(w.db.get(), "PRAGMA page_count"));

    SECTION("the next commit overwrites them and is found") {
        exec(w.db.get(), "PRAGMA cache_size=-2000");
        exec(w.db.get(), "INSERT INTO t(v) VALUES (x'0102')");
        REQUIRE(w.commits.size() == 4);
        // The new transaction reuses the frames after the last commit.
        CHECK(w.commits.back() > committed);
        CHECK(w.commits.back() < frames);
        auto again = scan_wal_file(w.wal_path());
        REQUIRE(again.ok());
        CHECK(again->last_commit_frame == w.commits.back());
        CHECK(again->db_size == query_int(w.db.get(), "PRAGMA page_count"));
        auto ck = query_ints(w.db.get(), "PRAGMA wal_checkpoint(PASSIVE)");
        REQUIRE(ck.size() == 3);
        CHECK(ck[1] == again->last_commit_frame);
    }
}
