// Client-side encryption: the primitives against published vectors (AES-GCM
// from the GCM specification, HKDF from RFC 5869, scrypt from RFC 7914), key
// parsing that never echoes a secret, and encrypted objects: round trips,
// the key check, and every way of rearranging an encrypted body (flipped
// byte, truncation at a chunk boundary, swapped, dropped and duplicated
// chunks, an edited header, a body moved to another position). The trailer is
// recomputed after each edit, so only the authenticated encryption can
// notice.
#include <catch2/catch.hpp>

#include <cstdint>
#include <cstdio>
#include <fstream>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "replicator/encryption.h"
#include "replicator/format.h"
#include "s3/crypto.h"
#include "support/object_bytes.h"

using namespace bottomless;
using namespace bottomless::replicator;
using bottomless::testing::object_body_start;
using bottomless::testing::with_trailer;

namespace {

std::string unhex(std::string_view h) {
    std::string out;
    REQUIRE(s3::from_hex(h, out));
    return out;
}

std::string hex(std::string_view s) { return s3::to_hex(reinterpret_cast<const unsigned char*>(s.data()), s.size()); }

std::shared_ptr<const Cipher> key_cipher(char fill) { return Cipher::from_key(std::string(32, fill)); }

struct Parts {
    std::string head;                 // preamble and header
    std::vector<std::string> chunks;  // sealed chunks, tag included
};

Parts split(const std::string& obj, size_t chunk) {
    Parts p;
    size_t b = object_body_start(obj);
    p.head = obj.substr(0, b);
    std::string_view body = std::string_view(obj).substr(b, obj.size() - 32 - b);
    const size_t sealed = chunk + s3::AesGcm::kTagSize;
    for (size_t off = 0; off < body.size(); off += sealed) p.chunks.emplace_back(body.substr(off, sealed));
    return p;
}

std::string join(const Parts& p) {
    std::string s = p.head;
    for (const auto& c : p.chunks) s += c;
    return with_trailer(s);
}

SnapshotHeader snapshot_header(uint32_t pages) {
    SnapshotHeader h;
    h.db_id = "app.db";
    h.generation = new_generation_id(1790000000000);
    h.page_size = 4096;
    h.db_pages = pages;
    h.created_us = 1790000000000000;
    h.last_commit_us = 1790000000000000;
    h.position = {11, 22, 33, 0xdeadbeef, 0xcafef00d};
    h.compression = Compression::None;  // incompressible pages: many chunks
    return h;
}

std::vector<std::string> random_pages(std::mt19937& rng, uint32_t n) {
    std::vector<std::string> pages;
    for (uint32_t i = 0; i < n; ++i) {
        std::string p(4096, '\0');
        for (char& c : p) c = static_cast<char>(rng());
        pages.push_back(std::move(p));
    }
    return pages;
}

std::string encode_snapshot(const SnapshotHeader& h, const std::vector<std::string>& pages, const Cipher* cipher) {
    std::string out;
    SnapshotWriter w(h, [&](std::string_view piece) -> Status {
        out.append(piece);
        return {};
    }, cipher);
    for (const auto& p : pages) REQUIRE(w.add_page(p).ok());
    REQUIRE(w.finish().ok());
    return out;
}

struct Decoded {
    Result<SnapshotHeader> header = make_error(ErrorKind::Corrupt, "not read");
    std::vector<std::string> pages;
};

Decoded decode_snapshot(std::string_view obj, const Cipher* cipher, size_t piece = 10000) {
    Decoded d;
    SnapshotReader r("the-snapshot", [&](uint32_t, std::string_view p) -> Status {
        d.pages.emplace_back(p);
        return {};
    }, cipher);
    for (size_t off = 0; off < obj.size(); off += piece) {
        if (Status st = r.feed(obj.substr(off, piece)); !st) {
            d.header = st.error();
            return d;
        }
    }
    d.header = r.finish();
    return d;
}

}  // namespace

TEST_CASE("AES-256-GCM, HKDF-SHA256 and scrypt match their published vectors", "[encryption][crypto]") {
    SECTION("AES-256-GCM: GCM specification test case 16") {
        s3::AesGcm gcm(unhex("feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308"));
        std::string iv = unhex("cafebabefacedbaddecaf888");
        std::string plain = unhex(
            "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a721c3c0c95956809532fcf0e2449a6b525b16aedf5"
            "aa0de657ba637b39");
        std::string aad = unhex("feedfacedeadbeeffeedfacedeadbeefabaddad2");
        std::string sealed;
        gcm.seal(reinterpret_cast<const unsigned char*>(iv.data()), aad, plain, sealed);
        CHECK(hex(sealed) ==
              "522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa8cb08e48590dbb3da7b08b1056828838c5f61e63"
              "93ba7a0abcc9f66276fc6ece0f4e1768cddf8853bb2d551b");
        std::string back;
        REQUIRE(gcm.open(reinterpret_cast<const unsigned char*>(iv.data()), aad, sealed, back));
        CHECK(back == plain);
        // Any change to the ciphertext, the tag or the associated data fails, and nothing comes out.
        for (size_t i : {size_t{0}, sealed.size() / 2, sealed.size() - 1}) {
            std::string bad = sealed;
            bad[i] ^= 0x01;
            std::string out = "kept";
            CHECK_FALSE(gcm.open(reinterpret_cast<const unsigned char*>(iv.data()), aad, bad, out));
            CHECK(out == "kept");
        }
        std::string out;
        CHECK_FALSE(gcm.open(reinterpret_cast<const unsigned char*>(iv.data()), aad + "x", sealed, out));
    }
    SECTION("HKDF-SHA256: RFC 5869 test case 1") {
        CHECK(hex(s3::hkdf_sha256(std::string(22, '\x0b'), unhex("000102030405060708090a0b0c"),
                                  unhex("f0f1f2f3f4f5f6f7f8f9"), 42)) ==
              "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865");
    }
    SECTION("scrypt: RFC 7914 section 12, second vector") {
        std::string out;
        REQUIRE(s3::scrypt("password", "NaCl", 1024, 8, 16, 64, 64ull << 20, out));
        CHECK(hex(out) ==
              "fdbabe1c9d3472007856e7190d01e9fe7c6ad7cbc8237830e77376634b3731622eaf30d92e22a3886ff109279d9830dac727afb"
              "94a83ee6d8360cbdfa2cc0640");
        CHECK_FALSE(s3::scrypt("password", "NaCl", 1000, 8, 1, 32, 64ull << 20, out));  // N not a power of two
    }
}

TEST_CASE("encryption keys are parsed without ever being echoed", "[encryption][config]") {
    const std::string hex_key = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";
    auto a = EncryptionSecret::key(hex_key, "K");
    REQUIRE(a.ok());
    CHECK(a->kind() == EncryptionSecret::Kind::Key);
    CHECK(hex(a->material()) == hex_key);
    // The same 32 bytes in base64, standard and URL-safe, padded or not.
    std::string raw = unhex(hex_key);
    std::string b64 = s3::base64(reinterpret_cast<const unsigned char*>(raw.data()), raw.size());
    for (std::string text : {b64, b64.substr(0, b64.size() - 1)}) {
        auto b = EncryptionSecret::key(text, "K");
        REQUIRE(b.ok());
        CHECK(b->material() == raw);
    }
    auto c = Cipher::from_key(a->material());
    CHECK(c->key_id().size() == 16);
    CHECK(c->key_id() == Cipher::from_key(raw)->key_id());
    CHECK(c->key_id() != key_cipher('x')->key_id());
    CHECK(c->key_id().find(hex_key.substr(0, 8)) == std::string::npos);

    for (std::string bad : {hex_key.substr(0, 62), hex_key + "00", std::string("zz") + hex_key.substr(2),
                            std::string("c2VjcmV0LXBhc3N3b3Jk"), std::string()}) {
        auto e = EncryptionSecret::key(bad, "LIBSQL_BOTTOMLESS_ENCRYPTION_KEY");
        REQUIRE_FALSE(e.ok());
        CHECK(e.error().code == "BadEncryptionKey");
        CHECK(e.error().message.find("LIBSQL_BOTTOMLESS_ENCRYPTION_KEY") != std::string::npos);
        if (bad.size() > 4) CHECK(e.error().message.find(bad.substr(2, 12)) == std::string::npos);
    }
    CHECK_FALSE(EncryptionSecret::passphrase("", "P").ok());
}

TEST_CASE("a passphrase gives the same key for the same salt, another for another", "[encryption]") {
    KdfParams k;
    k.salt = std::string(32, 's');
    k.n = 1024;  // the format stores the cost; the tests keep it cheap
    auto a = Cipher::from_passphrase("correct horse", k);
    auto b = Cipher::from_passphrase("correct horse", k);
    REQUIRE(a.ok());
    REQUIRE(b.ok());
    CHECK((*a)->key_id() == (*b)->key_id());
    CHECK(a->get() == b->get());  // derived once per process, then reused
    CHECK((*a)->key_id() != (*Cipher::from_passphrase("correct horsf", k))->key_id());
    KdfParams other = k;
    other.salt = std::string(32, 't');
    CHECK((*a)->key_id() != (*Cipher::from_passphrase("correct horse", other))->key_id());
    other.n = 1000;
    auto bad = Cipher::from_passphrase("x", other);
    REQUIRE_FALSE(bad.ok());
    CHECK(bad.error().code == "BadKdfParams");
}

TEST_CASE("encrypted snapshots round-trip in constant-size chunks and hide their pages", "[encryption][snapshot]") {
    std::mt19937 rng(7);
    auto cipher = key_cipher('k');
    const uint32_t pages = 40;  // 160 KiB: two full 64 KiB chunks and a short last one
    auto content = random_pages(rng, pages);
    SnapshotHeader h = snapshot_header(pages);
    std::string obj = encode_snapshot(h, content, cipher.get());

    auto header = peek_snapshot_header(obj, "s");
    REQUIRE(header.ok());
    REQUIRE(header->encryption.has_value());
    CHECK(header->encryption->key_id == cipher->key_id());
    CHECK(header->encryption->chunk_size == kEncryptionChunkSize);
    // The header is readable without the key; its WAL checksums are keyed stand-ins.
    CHECK(header->position.salt1 == 11);
    CHECK(header->position.frame == 33);
    CHECK(header->position.cksum1 != 0xdeadbeef);
    CHECK(header->position == cipher->mask(h.position, h.db_id, h.generation));

    Parts parts = split(obj, kEncryptionChunkSize);
    CHECK(parts.chunks.size() == 3);
    CHECK(parts.chunks[0].size() == kEncryptionChunkSize + 16);
    // No 16-byte run of any page is in the object.
    for (const auto& p : content)
        for (size_t off = 0; off + 16 <= p.size(); off += 512) CHECK(obj.find(p.substr(off, 16)) == std::string::npos);

    for (size_t piece : {size_t{1} << 20, size_t{4096}, size_t{65552}, size_t{65553}, size_t{977}}) {
        Decoded d = decode_snapshot(obj, cipher.get(), piece);
        REQUIRE(d.header.ok());
        CHECK(d.pages == content);
    }
    // Each object gets its own seed, so the same content never encrypts alike.
    std::string again = encode_snapshot(h, content, cipher.get());
    CHECK(split(again, kEncryptionChunkSize).chunks[0] != parts.chunks[0]);
    CHECK(peek_snapshot_header(again, "s")->encryption->seed != header->encryption->seed);

    SECTION("a body that is an exact number of chunks") {
        SnapshotHeader h16 = snapshot_header(16);  // 16 pages = exactly one chunk
        auto c16 = std::vector<std::string>(content.begin(), content.begin() + 16);
        std::string o = encode_snapshot(h16, c16, cipher.get());
        CHECK(split(o, kEncryptionChunkSize).chunks.size() == 1);
        Decoded d = decode_snapshot(o, cipher.get());
        REQUIRE(d.header.ok());
        CHECK(d.pages == c16);
    }
    SECTION("compressed, then encrypted") {
        SnapshotHeader hz = snapshot_header(pages);
        hz.compression = Compression::Zstd;
        std::vector<std::string> zeros(pages, std::string(4096, '\0'));
        std::string o = encode_snapshot(hz, zeros, cipher.get());
        CHECK(o.size() < 2000);  // zstd ran before encryption
        Decoded d = decode_snapshot(o, cipher.get());
        REQUIRE(d.header.ok());
        CHECK(d.pages == zeros);
    }
}

TEST_CASE("the key check: missing, wrong or unexpected keys are named as such", "[encryption]") {
    std::mt19937 rng(8);
    auto right = key_cipher('r'), wrong = key_cipher('w');
    auto content = random_pages(rng, 3);
    std::string enc = encode_snapshot(snapshot_header(3), content, right.get());
    std::string plain = encode_snapshot(snapshot_header(3), content, nullptr);

    auto expect = [](const Decoded& d, const char* code) {
        REQUIRE_FALSE(d.header.ok());
        CHECK(d.header.error().code == code);
        CHECK(d.header.error().kind == ErrorKind::InvalidArgument);  // not Corrupt
        CHECK(d.pages.empty());                                      // reported before any page
        CHECK(d.header.error().message.find("the-snapshot") != std::string::npos);
    };
    expect(decode_snapshot(enc, nullptr), "EncryptionKeyRequired");
    expect(decode_snapshot(enc, wrong.get()), "WrongEncryptionKey");
    expect(decode_snapshot(plain, right.get()), "NotEncrypted");
    CHECK(decode_snapshot(enc, wrong.get()).header.error().message.find(right->key_id()) != std::string::npos);
    CHECK(decode_snapshot(plain, nullptr).header.ok());

    SegmentHeader sh;
    sh.db_id = "app.db";
    sh.generation = new_generation_id(1790000000000);
    sh.seq = 3;
    sh.page_size = 4096;
    sh.txns = {{2, 5, 1790000000000001}};
    std::vector<SegmentFrame> frames = {{1, PageBuf(content[0])}, {5, PageBuf(content[1])}};
    std::string seg = encode_segment(sh, frames, nullptr, right.get());
    CHECK(decode_segment(seg, "seg", nullptr).error().code == "EncryptionKeyRequired");
    CHECK(decode_segment(seg, "seg", wrong.get()).error().code == "WrongEncryptionKey");
    CHECK(decode_segment(encode_segment(sh, frames, nullptr), "seg", right.get()).error().code == "NotEncrypted");
    auto ok = decode_segment(seg, "seg", right.get());
    REQUIRE(ok.ok());
    REQUIRE(ok->frames.size() == 2);
    CHECK(ok->frames[1].pgno == 5);
    CHECK(ok->frames[1].page == content[1]);
    CHECK(seg.find(content[0].substr(100, 32)) == std::string::npos);
}

TEST_CASE("rearranged encrypted chunks fail authentication", "[encryption][corrupt]") {
    std::mt19937 rng(9);
    auto cipher = key_cipher('c');
    const uint32_t pages = 40;
    auto content = random_pages(rng, pages);
    std::string obj = encode_snapshot(snapshot_header(pages), content, cipher.get());
    Parts parts = split(obj, kEncryptionChunkSize);
    REQUIRE(parts.chunks.size() == 3);

    auto expect_auth_failure = [&](const std::string& bad) {
        Decoded d = decode_snapshot(bad, cipher.get());
        REQUIRE_FALSE(d.header.ok());
        CHECK(d.header.error().kind == ErrorKind::Corrupt);
        CHECK(d.header.error().code == "AuthenticationFailed");
        return d;
    };
    SECTION("a flipped bit in each chunk") {
        for (size_t i = 0; i < parts.chunks.size(); ++i) {
            Parts p = parts;
            p.chunks[i][p.chunks[i].size() / 3] ^= 0x20;
            Decoded d = expect_auth_failure(join(p));
            // Pages of the chunks before it came out, none after.
            CHECK(d.pages.size() <= i * 16);
        }
    }
    SECTION("truncated at a chunk boundary") {
        Parts p = parts;
        p.chunks.pop_back();
        expect_auth_failure(join(p));
    }
    SECTION("two chunks swapped") {
        Parts p = parts;
        std::swap(p.chunks[0], p.chunks[1]);
        expect_auth_failure(join(p));
    }
    SECTION("a middle chunk removed") {
        Parts p = parts;
        p.chunks.erase(p.chunks.begin() + 1);
        expect_auth_failure(join(p));
    }
    SECTION("a chunk repeated") {
        Parts p = parts;
        p.chunks.insert(p.chunks.begin() + 1, p.chunks[0]);
        expect_auth_failure(join(p));
    }
    SECTION("an edited header: the body now claims another generation") {
        Parts p = parts;
        auto h = peek_snapshot_header(obj, "x");
        std::string other = new_generation_id(1790000000001);
        size_t at = p.head.find(h->generation);
        REQUIRE(at != std::string::npos);
        p.head.replace(at, other.size(), other);
        expect_auth_failure(join(p));
    }
    SECTION("a body moved under another object's header") {
        // Same key, same database, another generation: the header of B with the body of A.
        SnapshotHeader hb = snapshot_header(pages);
        hb.generation = new_generation_id(1790000005000);
        Parts b = split(encode_snapshot(hb, content, cipher.get()), kEncryptionChunkSize);
        b.chunks = parts.chunks;
        expect_auth_failure(join(b));
    }
}

// ---- issue 13: KDF parameters from the bucket are bounded ----

namespace {

std::string kdf_text(const std::string& n, const std::string& r, const std::string& p,
                     const std::string& format = "1") {
    return "{\"format\":" + format + ",\"kdf\":\"scrypt\",\"salt\":\"" + std::string(64, 'a') + "\",\"n\":" + n +
           ",\"r\":" + r + ",\"p\":" + p + "}";
}

}  // namespace

TEST_CASE("KDF objects from the bucket must have a sane scrypt cost", "[encryption][hostile]") {
    // What open_cipher writes reads back.
    KdfParams def;
    def.salt = std::string(32, 'x');
    auto back = parse_kdf(kdf_params_json(def), "w");
    REQUIRE(back.ok());
    CHECK(back->n == def.n);
    CHECK(back->r == 8);
    CHECK(back->p == 1);
    CHECK(back->salt == def.salt);
    CHECK(parse_kdf(kdf_text("16384", "8", "1"), "w").ok());                        // the floor
    CHECK(parse_kdf(kdf_text("262144", "8", "4"), "w").ok());                       // 256 MiB, p 4
    CHECK(parse_kdf(kdf_text(std::to_string(1 << 20), "2", "1"), "w").error().code == "BadKdfParams");  // r < 8

    struct Bad {
        const char *n, *r, *p, *why;
    };
    const Bad bad = GENERATE(Bad{"2", "1", "1", "N=2 r=1"},                 // nearly free to guess (issue 13)
                             Bad{"8192", "8", "1", "N=8192"},               // under the floor
                             Bad{"4194304", "8", "16", "too large"},         // 512x the default cost
                             Bad{"1048576", "8", "1", "N=1048576 r=8"},     // 1 GiB of memory
                             Bad{"32768", "64", "1", "too large"},           // r over the ceiling
                             Bad{"32768", "8", "5", "too large"},            // p over the ceiling
                             Bad{"32767", "8", "1", "N=32767"},              // not a power of two
                             Bad{"1e30", "8", "1", "non-integer"},           // a float: get<uint64_t> was UB
                             Bad{"32768.0", "8", "1", "non-integer"},
                             Bad{"-32768", "8", "1", "non-integer"},
                             Bad{"32768", "8.5", "1", "non-integer"},
                             Bad{"32768", "8", "0", "p=0"},
                             Bad{"32768", "8", "1e300", "non-integer"},
                             Bad{"\"32768\"", "8", "1", "non-integer"});
    CAPTURE(bad.n, bad.r, bad.p);
    auto r = parse_kdf(kdf_text(bad.n, bad.r, bad.p), "s3://b/db/encryption.json");
    REQUIRE_FALSE(r.ok());
    CHECK(r.error().kind == ErrorKind::Corrupt);
    CHECK(r.error().code == "BadKdfParams");
    CHECK(r.error().message.find("s3://b/db/encryption.json") != std::string::npos);
    CHECK(r.error().message.find(bad.why) != std::string::npos);
}

TEST_CASE("KDF objects: format, kdf and salt are checked, floats and nesting refused", "[encryption][hostile]") {
    CHECK(parse_kdf(kdf_text("32768", "8", "1", "1.5"), "w").error().message.find("invalid format") != std::string::npos);
    CHECK(parse_kdf(kdf_text("32768", "8", "1", "1e30"), "w").error().message.find("invalid format") != std::string::npos);
    CHECK(parse_kdf(kdf_text("32768", "8", "1", "2"), "w").error().message.find("upgrade") != std::string::npos);
    CHECK(parse_kdf("{\"format\":1,\"kdf\":\"argon2\"}", "w").error().message.find("unknown kdf") != std::string::npos);
    CHECK(parse_kdf("{\"format\":1,\"kdf\":\"scrypt\",\"salt\":\"zz\",\"n\":32768,\"r\":8,\"p\":1}", "w")
              .error()
              .message.find("salt") != std::string::npos);
    std::string deep = "{\"format\":1,\"x\":" + std::string(30000, '[') + std::string(30000, ']') + "}";
    auto r = parse_kdf(deep, "w");
    REQUIRE_FALSE(r.ok());
    CHECK(r.error().message.find("nested deeper") != std::string::npos);
    CHECK(parse_kdf(std::string(100000, ' ') + kdf_text("32768", "8", "1"), "w").error().message.find("limit") !=
          std::string::npos);
    CHECK(parse_kdf("not json", "w").error().code == "BadKdfParams");
}

TEST_CASE("Cipher::from_passphrase refuses a cost above the ceiling whatever its caller", "[encryption][hostile]") {
    KdfParams k;
    k.salt = std::string(32, 's');
    k.n = uint64_t{1} << 21;
    CHECK(Cipher::from_passphrase("x", k).error().code == "BadKdfParams");
    k.n = uint64_t{1} << 14;
    k.p = 5;
    CHECK(Cipher::from_passphrase("x", k).error().code == "BadKdfParams");
}

TEST_CASE("a passphrase's master key lives while a Cipher is held, not for the process lifetime", "[encryption]") {
    KdfParams k;
    k.salt = std::string(32, 'l');
    k.n = 1024;
    auto a = Cipher::from_passphrase("lifetime", k);
    REQUIRE(a.ok());
    std::weak_ptr<const Cipher> held = *a;
    {
        auto b = Cipher::from_passphrase("lifetime", k);
        REQUIRE(b.ok());
        CHECK(b->get() == a->get());  // shared while in use
    }
    a = Cipher::from_passphrase("other", k);  // the last holder lets go
    // Before: the process-wide cache kept every master key until exit.
    CHECK(held.expired());
}

TEST_CASE("key material sits in pages excluded from core dumps", "[encryption]") {
    s3::SecretBytes secret(std::string(32, 'k'));
    CHECK(secret.view() == std::string(32, 'k'));
    REQUIRE(secret.dump_excluded());
    // The kernel's own view: the mapping holding the bytes carries "dd"
    // (do not dump) in /proc/self/smaps.
    const auto addr = reinterpret_cast<uintptr_t>(secret.view().data());
    std::ifstream smaps("/proc/self/smaps");
    std::string line;
    bool in_mapping = false, found = false;
    while (std::getline(smaps, line)) {
        unsigned long lo = 0, hi = 0;
        // A mapping's first line: "lo-hi perms offset dev inode path"; the
        // attribute lines after it are "Name: value".
        const bool header = std::sscanf(line.c_str(), "%lx-%lx", &lo, &hi) == 2 && line.find(':') > line.find(' ');
        if (header) {
            in_mapping = addr >= lo && addr < hi;
            continue;
        }
        if (in_mapping && line.rfind("VmFlags:", 0) == 0) {
            found = true;
            CHECK_THAT(line, Catch::Contains(" dd"));
            break;
        }
    }
    CHECK(found);
}
