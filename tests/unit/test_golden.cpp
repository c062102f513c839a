// Golden objects: format-1 objects (and one format-2 snapshot, "indexed/")
// written once and frozen under
// tests/data/golden/ (see the README there). Every build must read them back
// to the same pages, so a change to the layout, the header fields, the zstd
// settings, the key derivation or the nonce/associated-data derivation
// cannot silently make existing buckets unreadable.
//
// Two sets hold the same small history: a snapshot of 4 pages, then segment
// 1 (two transactions, the database grows to 5 pages; uncompressed) and
// segment 2 (one transaction; zstd). "plain/" is plaintext; "encrypted/" is
// encrypted with a passphrase whose KDF object (encryption.json) is there too.
// The test decodes every object with the functions restore uses
// (SnapshotReader, for_each_segment_frame), checks the chain between them as
// restore does, applies the frames and compares the result page by page and
// by a frozen SHA-256; each file's own SHA-256 is frozen as well.
//
// The generator is the hidden test case "golden objects: generate" (never run
// by default). Do not run it to "fix" a failure here: a failure means this
// build cannot read what an earlier one wrote.
#include <catch2/catch.hpp>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "replicator/encryption.h"
#include "replicator/format.h"
#include "s3/crypto.h"

using namespace bottomless;
using namespace bottomless::replicator;

namespace {

constexpr uint32_t kPageSize = 1024;
constexpr const char* kDbId = "golden.db";
constexpr const char* kGeneration = "0000fe5f3baf93ff-0badf00d";
constexpr const char* kPassphrase = "golden passphrase: never change";

// Frozen when the objects were generated (the generator prints them).
const std::map<std::string, std::string> kFileSha256 = {
    {"plain/snapshot", "8be7b45f777896606b4bffc35a1e8df433f8fdc7d0b82610e403262f72e7ba0a"},
    {"plain/seg-000000000001", "f342eab9418594203e9781f0651b396e6f5edb82c8bd1945e057ac0b4ffdca49"},
    {"plain/seg-000000000002", "9cf8066ddbb1326d718d11b34b0735770c2480a703eb5c99d44219b6cfa67deb"},
    {"encrypted/encryption.json", "41c7a88a338a975b06d65edcc45f1729780e092e6377e3fe15ee96afa67117d9"},
    {"encrypted/snapshot", "81e4c36b7df3c05bd371d37a76e20db3d0b3f4f352cfef82a139b7ad63639ccc"},
    {"encrypted/seg-000000000001", "8cfb7c8de312df38656a603cc2a68883e662928dc32f94568849e717a4bec1d4"},
    {"encrypted/seg-000000000002", "10f200f953cbed93eb3c2a773fcfdc02204fdcb2bcda009831cf349f26fb1b68"},
};
// Format 2 (a page index): kIndexedPages pages of generation 0 in 64-page frames.
constexpr uint32_t kIndexedPages = 150;
constexpr const char* kIndexedSha256 = "d9b030ff3bd3052becffe947064cc3884830ca3a1ef9bf41ac9b277dd3f9fe0b";

constexpr const char* kImageSha256 = "1dbe680535d334e778096121ef1e725b32bc2861bc30013aa34ed014a7096f79";
constexpr const char* kKeyId = "c2357976467e2efa";

// Page `pgno` as written by transaction `version` (0: the snapshot).
std::string golden_page(uint32_t pgno, uint32_t version) {
    char line[64];
    std::snprintf(line, sizeof line, "golden page %u version %u\n", pgno, version);
    std::string p;
    while (p.size() < kPageSize) p += line;
    p.resize(kPageSize);
    return p;
}

// The history both sets hold.
struct History {
    SnapshotHeader snapshot;
    std::vector<std::string> snapshot_pages;
    SegmentHeader seg[2];
    std::vector<SegmentFrame> frames[2];
};

History golden_history() {
    History h;
    h.snapshot.db_id = kDbId;
    h.snapshot.generation = kGeneration;
    h.snapshot.page_size = kPageSize;
    h.snapshot.db_pages = 4;
    h.snapshot.created_us = 1790000000000000;
    h.snapshot.last_commit_us = 1789999999000000;
    h.snapshot.position = {0x11111111, 0x22222222, 0, 0xaaaaaaaa, 0xbbbbbbbb};
    h.snapshot.compression = Compression::Zstd;
    for (uint32_t p = 1; p <= 4; ++p) h.snapshot_pages.push_back(golden_page(p, 0));

    SegmentHeader& s1 = h.seg[0];
    s1.db_id = kDbId;
    s1.generation = kGeneration;
    s1.seq = 1;
    s1.page_size = kPageSize;
    s1.end = {0x11111111, 0x22222222, 3, 0x01020304, 0x05060708};
    s1.txns = {{2, 5, 1790000001000000}, {1, 5, 1790000002000000}};
    s1.compression = Compression::None;
    h.frames[0] = {{2, PageBuf(golden_page(2, 1))}, {5, PageBuf(golden_page(5, 1))}, {1, PageBuf(golden_page(1, 2))}};

    SegmentHeader& s2 = h.seg[1];
    s2.db_id = kDbId;
    s2.generation = kGeneration;
    s2.seq = 2;
    s2.page_size = kPageSize;
    s2.end = {0x11111111, 0x22222222, 4, 0x0a0b0c0d, 0x0e0f1011};
    s2.txns = {{1, 5, 1790000003000000}};
    s2.compression = Compression::Zstd;
    h.frames[1] = {{3, PageBuf(golden_page(3, 3))}};
    return h;
}

// The database after the whole history.
std::vector<std::string> expected_image() {
    return {golden_page(1, 2), golden_page(2, 1), golden_page(3, 3), golden_page(4, 0), golden_page(5, 1)};
}

std::string read_file(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    REQUIRE(in.good());
    std::ostringstream s;
    s << in.rdbuf();
    return s.str();
}

std::string sha_hex(std::string_view data) { return s3::sha256_hex(data); }

// Decodes one set as restore does: snapshot, then each segment checked
// against the chain, frames applied to an in-memory image.
struct Restored {
    std::vector<std::string> pages;
    uint32_t db_pages = 0;
    uint64_t transactions = 0;
};

Restored restore_set(const std::string& dir, const Cipher* cipher) {
    Restored r;
    const std::string snap_bytes = read_file(dir + "/snapshot");
    SnapshotReader reader(dir + "/snapshot", [&](uint32_t pgno, std::string_view page) -> Status {
        REQUIRE(pgno == r.pages.size() + 1);
        r.pages.emplace_back(page);
        return {};
    }, cipher);
    // In uneven pieces, as a download delivers them.
    for (size_t off = 0; off < snap_bytes.size(); off += 777) REQUIRE(reader.feed(std::string_view(snap_bytes).substr(off, 777)).ok());
    auto snap = reader.finish();
    REQUIRE(snap.ok());
    CHECK(snap->db_id == kDbId);
    CHECK(snap->generation == kGeneration);
    r.db_pages = snap->db_pages;
    WalPosition position = snap->position;
    std::string last_sha = reader.sha256();
    const std::string trailer = snap_bytes.substr(snap_bytes.size() - 32);
    CHECK(last_sha == s3::to_hex(reinterpret_cast<const unsigned char*>(trailer.data()), trailer.size()));

    for (uint64_t seq = 1; seq <= 2; ++seq) {
        char name[32];
        std::snprintf(name, sizeof name, "/seg-%012llu", static_cast<unsigned long long>(seq));
        const std::string bytes = read_file(dir + name);
        SegmentHeader header;
        auto sha = for_each_segment_frame(
            bytes, dir + name, cipher,
            [&](const SegmentHeader& h) -> Status {
                CHECK(h.db_id == kDbId);
                CHECK(h.generation == kGeneration);
                CHECK(h.seq == seq);
                CHECK(h.page_size == kPageSize);
                CHECK(h.prev_sha256 == last_sha);  // the chain, as restore checks it
                CHECK(h.start == position);
                header = h;
                return {};
            },
            [&](uint64_t, uint32_t pgno, std::string_view page) -> Status {
                if (r.pages.size() < pgno) r.pages.resize(pgno);
                r.pages[pgno - 1] = std::string(page);
                return {};
            });
        REQUIRE(sha.ok());
        // The in-memory decoder agrees.
        auto whole = decode_segment(bytes, dir + name, cipher);
        REQUIRE(whole.ok());
        CHECK(whole->sha256 == *sha);
        for (const auto& t : header.txns) {
            r.db_pages = t.db_pages;
            ++r.transactions;
        }
        position = header.end;
        last_sha = *sha;
    }
    r.pages.resize(r.db_pages);
    return r;
}

void check_restored(const Restored& r) {
    CHECK(r.transactions == 3);
    CHECK(r.db_pages == 5);
    const auto want = expected_image();
    REQUIRE(r.pages.size() == want.size());
    for (size_t i = 0; i < want.size(); ++i) CHECK(r.pages[i] == want[i]);
    std::string image;
    for (const auto& p : r.pages) image += p;
    CHECK(sha_hex(image) == kImageSha256);
}

std::shared_ptr<const Cipher> golden_cipher(const std::string& dir) {
    auto kdf = parse_kdf(read_file(dir + "/encryption.json"), dir + "/encryption.json");
    REQUIRE(kdf.ok());
    auto c = Cipher::from_passphrase(kPassphrase, *kdf);
    REQUIRE(c.ok());
    return *c;
}

}  // namespace

TEST_CASE("golden objects: every frozen file is unchanged", "[golden]") {
    for (const auto& [file, sha] : kFileSha256) {
        CAPTURE(file);
        CHECK(sha_hex(read_file(std::string(BOTTOMLESS_GOLDEN_DIR) + "/" + file)) == sha);
    }
}

TEST_CASE("golden objects: a plaintext history restores to the frozen pages", "[golden]") {
    CHECK(generation_time_ms(kGeneration) == 1790000000000);
    check_restored(restore_set(std::string(BOTTOMLESS_GOLDEN_DIR) + "/plain", nullptr));
}

TEST_CASE("golden objects: an encrypted history restores with its passphrase", "[golden][encryption]") {
    const std::string dir = std::string(BOTTOMLESS_GOLDEN_DIR) + "/encrypted";
    auto cipher = golden_cipher(dir);
    CHECK(cipher->key_id() == kKeyId);
    check_restored(restore_set(dir, cipher.get()));
    // Headers stay readable without the key; bodies do not.
    const std::string seg = read_file(dir + "/seg-000000000001");
    auto h = peek_segment_header(seg, "seg");
    REQUIRE(h.ok());
    REQUIRE(h->encryption);
    CHECK(h->encryption->key_id == kKeyId);
    CHECK(decode_segment(seg, "seg", nullptr).error().code == "EncryptionKeyRequired");
}

TEST_CASE("golden objects: a format-2 snapshot reads whole and frame by frame through its page index", "[golden]") {
    const std::string path = std::string(BOTTOMLESS_GOLDEN_DIR) + "/indexed/snapshot";
    const std::string bytes = read_file(path);
    CHECK(sha_hex(bytes) == kIndexedSha256);
    auto h = peek_snapshot_header(bytes, path);
    REQUIRE(h.ok());
    CHECK(h->frame_pages == 64);
    CHECK(h->db_pages == kIndexedPages);
    std::vector<std::string> whole;
    SnapshotReader reader(path, [&](uint32_t, std::string_view page) -> Status {
        whole.emplace_back(page);
        return {};
    });
    for (size_t off = 0; off < bytes.size(); off += 777) REQUIRE(reader.feed(std::string_view(bytes).substr(off, 777)).ok());
    REQUIRE(reader.finish().ok());
    REQUIRE(whole.size() == kIndexedPages);
    for (uint32_t p = 1; p <= kIndexedPages; ++p) CHECK(whole[p - 1] == golden_page(p, 0));
    const uint64_t tail = page_index_tail_size(*h);
    auto idx = parse_page_index(std::string_view(bytes).substr(bytes.size() - tail), bytes.size(), *h, path);
    REQUIRE(idx.ok());
    REQUIRE(idx->frames() == 3);
    CHECK(idx->trailer_hex == reader.sha256());
    uint32_t seen = 0;
    for (uint32_t f = 0; f < 3; ++f)
        REQUIRE(decode_snapshot_frame(*idx, f,
                                      std::string_view(bytes).substr(idx->frame_offset[f],
                                                                     idx->frame_offset[f + 1] - idx->frame_offset[f]),
                                      path, [&](uint32_t pgno, std::string_view page) -> Status {
                                          CHECK(page == golden_page(pgno, 0));
                                          ++seen;
                                          return {};
                                      }).ok());
    CHECK(seen == kIndexedPages);
}

// Format 2's generator, hidden like the one below:
//   BOTTOMLESS_GOLDEN_OUT=/tmp/golden unit_tests "golden objects: generate format 2"
TEST_CASE("golden objects: generate format 2", "[.][golden-generate]") {
    const char* out_env = std::getenv("BOTTOMLESS_GOLDEN_OUT");
    REQUIRE(out_env != nullptr);
    const std::string out = out_env;
    REQUIRE(std::system(("mkdir -p '" + out + "/indexed'").c_str()) == 0);
    SnapshotHeader h = golden_history().snapshot;
    h.db_pages = kIndexedPages;
    std::string snap;
    SnapshotWriter w(h, [&](std::string_view piece) -> Status {
        snap.append(piece);
        return {};
    });
    for (uint32_t p = 1; p <= kIndexedPages; ++p) REQUIRE(w.add_page(golden_page(p, 0)).ok());
    REQUIRE(w.finish().ok());
    std::ofstream f(out + "/indexed/snapshot", std::ios::binary | std::ios::trunc);
    f << snap;
    REQUIRE(f.good());
    std::cout << "indexed/snapshot " << sha_hex(snap) << "\n";
}

// The generator. Hidden ("[.]"): run only by hand, into an empty directory,
// and only for a new format version (a new set next to these, never over them):
//   BOTTOMLESS_GOLDEN_OUT=/tmp/golden unit_tests "golden objects: generate"
TEST_CASE("golden objects: generate", "[.][golden-generate]") {
    const char* out_env = std::getenv("BOTTOMLESS_GOLDEN_OUT");
    REQUIRE(out_env != nullptr);
    const std::string out = out_env;
    auto write = [&](const std::string& file, const std::string& bytes) {
        std::ofstream f(out + "/" + file, std::ios::binary | std::ios::trunc);
        REQUIRE(f.good());
        f << bytes;
        REQUIRE(f.good());
        std::cout << "    {\"" << file << "\", \"" << sha_hex(bytes) << "\"},\n";
    };
    auto write_set = [&](const std::string& dir, const Cipher* cipher) {
        REQUIRE(std::system(("mkdir -p '" + out + "/" + dir + "'").c_str()) == 0);
        History h = golden_history();
        std::string snap;
        SnapshotWriter w(h.snapshot, [&](std::string_view piece) -> Status {
            snap.append(piece);
            return {};
        }, cipher);
        for (const auto& p : h.snapshot_pages) REQUIRE(w.add_page(p).ok());
        auto prev = w.finish();
        REQUIRE(prev.ok());
        write(dir + "/snapshot", snap);
        // The chain: each segment starts where the previous object ended.
        WalPosition start = h.snapshot.position;
        std::string prev_sha = *prev;
        for (int i = 0; i < 2; ++i) {
            h.seg[i].start = start;
            h.seg[i].prev_sha256 = prev_sha;
            std::string sha;
            std::string bytes = encode_segment(h.seg[i], h.frames[i], &sha, cipher);
            char name[32];
            std::snprintf(name, sizeof name, "/seg-%012d", i + 1);
            write(dir + name, bytes);
            start = h.seg[i].end;
            prev_sha = sha;
        }
    };
    write_set("plain", nullptr);
    KdfParams kdf;
    kdf.salt = s3::random_bytes(32);
    kdf.n = kScryptMinN;  // the floor: cheap for every build to derive
    const std::string kdf_text = kdf_params_json(kdf);
    REQUIRE(std::system(("mkdir -p '" + out + "/encrypted'").c_str()) == 0);
    write("encrypted/encryption.json", kdf_text);
    auto cipher = Cipher::from_passphrase(kPassphrase, kdf);
    REQUIRE(cipher.ok());
    write_set("encrypted", cipher->get());
    std::string image;
    for (const auto& p : expected_image()) image += p;
    std::cout << "image sha256 " << sha_hex(image) << "\nkey id " << (*cipher)->key_id() << "\n";
}
