// The bucket's object format: segments and snapshots round-trip; every kind
// of damage (flipped bytes, truncation, wrong magic or version, inconsistent
// headers) is a Corrupt error naming the object; generation ids and keys
// sort and parse as the listings rely on. Objects for the negative cases are
// built here by hand from the layout in format.h, not with the encoder, so a
// mistake shared by encoder and decoder would still show.
#include <catch2/catch.hpp>
#include <zstd.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "replicator/format.h"
#include "replicator/state_file.h"
#include "replicator/util.h"
#include "s3/crypto.h"

using namespace bottomless;
using namespace bottomless::replicator;
using json = nlohmann::json;

namespace {

std::string random_bytes(std::mt19937& rng, size_t n) {
    std::string s(n, '\0');
    for (char& c : s) c = static_cast<char>(rng());
    return s;
}

// A page that looks like a database page: some structure, some noise, so
// zstd has something to do but the content still differs page to page.
std::string db_like_page(std::mt19937& rng, size_t n) {
    std::string s(n, '\0');
    size_t noisy = rng() % (n / 2);
    for (size_t i = 0; i < noisy; ++i) s[rng() % n] = static_cast<char>(rng());
    return s;
}

void put_be32(std::string& out, uint32_t v) {
    out.push_back(static_cast<char>(v >> 24));
    out.push_back(static_cast<char>(v >> 16));
    out.push_back(static_cast<char>(v >> 8));
    out.push_back(static_cast<char>(v));
}

uint32_t get_be32(std::string_view s, size_t off) {
    const auto* p = reinterpret_cast<const unsigned char*>(s.data() + off);
    return (uint32_t{p[0]} << 24) | (uint32_t{p[1]} << 16) | (uint32_t{p[2]} << 8) | p[3];
}

std::string raw_sha256(std::string_view data) {
    auto d = s3::sha256(data);
    return std::string(reinterpret_cast<const char*>(d.data()), d.size());
}

// An object assembled from the documented layout, with a correct trailer.
std::string build_object(const char* magic, uint32_t version, const std::string& header, const std::string& body) {
    std::string out(magic, 8);
    put_be32(out, version);
    put_be32(out, static_cast<uint32_t>(header.size()));
    out += header;
    out += body;
    out += raw_sha256(out);
    return out;
}

// Recomputes the trailer after an edit, so that only the edit is wrong.
std::string reseal(std::string obj) {
    obj.resize(obj.size() - 32);
    obj += raw_sha256(obj);
    return obj;
}

std::string zstd_compress(const std::string& data) {
    std::string out(ZSTD_compressBound(data.size()), '\0');
    size_t n = ZSTD_compress(out.data(), out.size(), data.data(), data.size(), 3);
    REQUIRE_FALSE(ZSTD_isError(n));
    out.resize(n);
    return out;
}

// A zstd frame that ends in a 4-byte content checksum: dropping those 4
// bytes leaves every page decodable but the frame unfinished.
std::string zstd_compress_with_checksum(const std::string& data) {
    std::unique_ptr<ZSTD_CCtx, size_t (*)(ZSTD_CCtx*)> cctx(ZSTD_createCCtx(), ZSTD_freeCCtx);
    REQUIRE(cctx != nullptr);
    REQUIRE_FALSE(ZSTD_isError(ZSTD_CCtx_setParameter(cctx.get(), ZSTD_c_checksumFlag, 1)));
    std::string out(ZSTD_compressBound(data.size()), '\0');
    size_t n = ZSTD_compress2(cctx.get(), out.data(), out.size(), data.data(), data.size());
    REQUIRE_FALSE(ZSTD_isError(n));
    out.resize(n);
    return out;
}

std::string header_json_of(const std::string& obj) { return obj.substr(16, get_be32(obj, 12)); }

SegmentHeader sample_segment_header(Compression c, uint32_t page_size = 4096) {
    SegmentHeader h;
    h.db_id = "app/main.db";
    h.generation = new_generation_id(1700000000123);
    h.seq = 7;
    h.page_size = page_size;
    h.start = {0x01020304, 0xa0b0c0d0, 41, 0xdeadbeef, 0xfeedface};
    h.end = {0x01020304, 0xa0b0c0d0, 47, 0x11111111, 0xffffffff};
    h.prev_sha256 = s3::sha256_hex("the previous segment");
    h.txns = {{2, 10, 1700000000001000}, {1, 12, 1700000000002000}, {3, 12, 1700000000003000}};
    h.compression = c;
    return h;
}

std::vector<SegmentFrame> sample_frames(std::mt19937& rng, size_t n, uint32_t page_size) {
    std::vector<SegmentFrame> frames;
    for (size_t i = 0; i < n; ++i)
        frames.push_back({static_cast<uint32_t>(1 + rng() % 20), PageBuf(db_like_page(rng, page_size))});
    return frames;
}

SnapshotHeader sample_snapshot_header(Compression c, uint32_t page_size, uint32_t pages) {
    SnapshotHeader h;
    h.db_id = "app/main.db";
    h.generation = new_generation_id(1700000000999);
    h.page_size = page_size;
    h.db_pages = pages;
    h.created_us = 1700000001000000;
    h.last_commit_us = 1700000000999999;
    h.position = {5, 6, 1234, 7, 8};
    h.parent_generation = new_generation_id(1600000000000);
    h.parent_seq = 99;
    h.compression = c;
    return h;
}

void check_same(const SegmentHeader& a, const SegmentHeader& b) {
    CHECK(a.db_id == b.db_id);
    CHECK(a.generation == b.generation);
    CHECK(a.seq == b.seq);
    CHECK(a.page_size == b.page_size);
    CHECK(a.start == b.start);
    CHECK(a.end == b.end);
    CHECK(a.prev_sha256 == b.prev_sha256);
    REQUIRE(a.txns.size() == b.txns.size());
    for (size_t i = 0; i < a.txns.size(); ++i) {
        CHECK(a.txns[i].frames == b.txns[i].frames);
        CHECK(a.txns[i].db_pages == b.txns[i].db_pages);
        CHECK(a.txns[i].commit_us == b.txns[i].commit_us);
    }
    CHECK(a.compression == b.compression);
}

void check_same(const SnapshotHeader& a, const SnapshotHeader& b) {
    CHECK(a.db_id == b.db_id);
    CHECK(a.generation == b.generation);
    CHECK(a.page_size == b.page_size);
    CHECK(a.db_pages == b.db_pages);
    CHECK(a.created_us == b.created_us);
    CHECK(a.last_commit_us == b.last_commit_us);
    CHECK(a.position == b.position);
    CHECK(a.parent_generation == b.parent_generation);
    CHECK(a.parent_seq == b.parent_seq);
    CHECK(a.compression == b.compression);
}

bool mentions(const Error& e, const std::string& s) { return e.message.find(s) != std::string::npos; }

// Writes a snapshot of the given pages; collects the sink's pieces.
struct Written {
    std::string bytes;
    std::vector<size_t> pieces;
    size_t pieces_before_finish = 0;
    std::string sha;
    uint64_t bytes_out = 0;
};

Written write_snapshot(const SnapshotHeader& h, const std::vector<std::string>& pages) {
    Written w;
    SnapshotWriter writer(h, [&w](std::string_view piece) -> Status {
        w.bytes.append(piece);
        w.pieces.push_back(piece.size());
        return {};
    });
    for (const std::string& p : pages) REQUIRE(writer.add_page(p).ok());
    w.pieces_before_finish = w.pieces.size();
    auto sha = writer.finish();
    REQUIRE(sha.ok());
    w.sha = *sha;
    w.bytes_out = writer.bytes_out();
    return w;
}

// Feeds an object to a SnapshotReader in pieces of 1..max_piece bytes.
struct Read {
    std::optional<Error> error;  // the first failure, from feed() or finish()
    bool failed_in_feed = false;
    std::vector<std::string> pages;
    std::optional<SnapshotHeader> header;
    std::string sha;
};

Read read_snapshot(std::string_view bytes, const std::string& name, std::mt19937& rng, size_t max_piece) {
    Read r;
    SnapshotReader reader(name, [&r](uint32_t pgno, std::string_view page) -> Status {
        // Pages come out in order, numbered from 1.
        REQUIRE(pgno == r.pages.size() + 1);
        r.pages.emplace_back(page);
        return {};
    });
    size_t off = 0;
    while (off < bytes.size()) {
        size_t n = std::min<size_t>(bytes.size() - off, 1 + rng() % max_piece);
        Status st = reader.feed(bytes.substr(off, n));
        if (!st) {
            r.error = st.error();
            r.failed_in_feed = true;
            return r;
        }
        off += n;
    }
    auto h = reader.finish();
    if (!h) {
        r.error = h.error();
        return r;
    }
    r.header = *h;
    r.sha = reader.sha256();
    return r;
}

}  // namespace

TEST_CASE("compression names", "[format]") {
    CHECK(std::string(to_string(Compression::None)) == "none");
    CHECK(std::string(to_string(Compression::Zstd)) == "zstd");
    Compression c = Compression::None;
    CHECK(parse_compression("zstd", c));
    CHECK(c == Compression::Zstd);
    CHECK(parse_compression("none", c));
    CHECK(c == Compression::None);
    CHECK_FALSE(parse_compression("ZSTD", c));
    CHECK_FALSE(parse_compression("gzip", c));
    CHECK_FALSE(parse_compression("", c));
    CHECK(c == Compression::None);
}

TEST_CASE("segments round-trip", "[format][segment]") {
    Compression c = GENERATE(Compression::None, Compression::Zstd);
    uint32_t page_size = GENERATE(512u, 4096u, 65536u);
    INFO(to_string(c) << ", page size " << page_size);
    std::mt19937 rng(page_size);
    SegmentHeader h = sample_segment_header(c, page_size);
    CHECK(h.frame_count() == 6);
    std::vector<SegmentFrame> frames = sample_frames(rng, 6, page_size);

    std::string sha;
    std::string obj = encode_segment(h, frames, &sha);
    auto dec = decode_segment(obj, "db/gen/seg-000000000007");
    REQUIRE(dec.ok());
    check_same(dec->header, h);
    REQUIRE(dec->frames.size() == frames.size());
    for (size_t i = 0; i < frames.size(); ++i) {
        CHECK(dec->frames[i].pgno == frames[i].pgno);
        CHECK(dec->frames[i].page == frames[i].page);
    }
    // The trailer is the SHA-256 of everything before it, and both sides report it.
    CHECK(sha.size() == 64);
    CHECK(sha == s3::sha256_hex(std::string_view(obj).substr(0, obj.size() - 32)));
    CHECK(sha == s3::to_hex(reinterpret_cast<const unsigned char*>(obj.data()) + obj.size() - 32, 32));
    CHECK(dec->sha256 == sha);

    SECTION("the layout is the documented one") {
        CHECK(obj.substr(0, 8) == "BTLSSEGM");
        CHECK(get_be32(obj, 8) == 1);
        json j = json::parse(header_json_of(obj));
        CHECK(j["db_id"] == "app/main.db");
        CHECK(j["generation"] == h.generation);
        CHECK(j["seq"] == 7);
        CHECK(j["page_size"] == page_size);
        CHECK(j["start"]["salt1"] == 0x01020304u);
        CHECK(j["start"]["salt2"] == 0xa0b0c0d0u);
        CHECK(j["start"]["frame"] == 41);
        CHECK(j["start"]["cksum1"] == 0xdeadbeefu);
        CHECK(j["end"]["frame"] == 47);
        CHECK(j["end"]["cksum2"] == 0xffffffffu);
        CHECK(j["prev_sha256"] == h.prev_sha256);
        REQUIRE(j["txns"].size() == 3);
        CHECK(j["txns"][2]["frames"] == 3);
        CHECK(j["txns"][1]["db_pages"] == 12);
        CHECK(j["txns"][0]["commit_us"] == 1700000000001000);
        CHECK(j["compression"] == to_string(c));
        if (c == Compression::None) {
            // Body: per frame, the page number then the page.
            size_t body = 16 + get_be32(obj, 12);
            CHECK(obj.size() == body + 6 * (4 + page_size) + 32);
            CHECK(get_be32(obj, body) == frames[0].pgno);
            CHECK(obj.substr(body + 4, page_size) == frames[0].page);
        }
    }
    SECTION("sha256 output is optional") { CHECK(encode_segment(h, frames, nullptr) == obj); }
}

TEST_CASE("segment edge cases round-trip", "[format][segment]") {
    Compression c = GENERATE(Compression::None, Compression::Zstd);
    std::mt19937 rng(7);

    SECTION("a segment with no transactions") {
        SegmentHeader h = sample_segment_header(c, 1024);
        h.txns.clear();
        auto dec = decode_segment(encode_segment(h, {}, nullptr), "k");
        REQUIRE(dec.ok());
        CHECK(dec->frames.empty());
        CHECK(dec->header.txns.empty());
    }
    SECTION("many single-frame transactions, extreme values") {
        SegmentHeader h = sample_segment_header(c, 512);
        h.txns.clear();
        for (int i = 0; i < 300; ++i) h.txns.push_back({1, static_cast<uint32_t>(i + 1), -5 + i});
        h.start.frame = std::numeric_limits<uint64_t>::max() - 1;
        h.seq = std::numeric_limits<uint64_t>::max();
        h.prev_sha256.clear();
        h.db_id = "ünïcode/db";
        std::vector<SegmentFrame> frames = sample_frames(rng, 300, 512);
        auto dec = decode_segment(encode_segment(h, frames, nullptr), "k");
        REQUIRE(dec.ok());
        check_same(dec->header, h);
        REQUIRE(dec->frames.size() == 300);
        CHECK(dec->frames[299].page == frames[299].page);
        CHECK(dec->frames[299].pgno == frames[299].pgno);
    }
}

TEST_CASE("encode_segment refuses a segment it could not decode", "[format][segment]") {
    std::mt19937 rng(1);
    SegmentHeader h = sample_segment_header(Compression::Zstd, 512);
    std::vector<SegmentFrame> frames = sample_frames(rng, 6, 512);
    SECTION("frame count differs from the txns list") {
        frames.pop_back();
        CHECK_THROWS_AS(encode_segment(h, frames, nullptr), std::invalid_argument);
    }
    SECTION("a page of the wrong size") {
        frames[2].page.pop_back();
        CHECK_THROWS_AS(encode_segment(h, frames, nullptr), std::invalid_argument);
    }
    SECTION("page number 0") {
        frames[0].pgno = 0;
        CHECK_THROWS_AS(encode_segment(h, frames, nullptr), std::invalid_argument);
    }
    SECTION("an invalid header field") {
        h.seq = 0;
        CHECK_THROWS_AS(encode_segment(h, frames, nullptr), std::invalid_argument);
    }
}

TEST_CASE("any flipped byte in a segment is detected and the object named", "[format][segment][corrupt]") {
    Compression c = GENERATE(Compression::None, Compression::Zstd);
    std::mt19937 rng(3);
    SegmentHeader h = sample_segment_header(c, 512);
    h.txns = {{1, 3, 1}, {1, 3, 2}};
    std::string obj = encode_segment(h, sample_frames(rng, 2, 512), nullptr);
    const std::string name = "db/0000fe7c1a2b3c4d-00c0ffee/seg-000000000007";
    // Every position: preamble, header, body and trailer.
    for (size_t i = 0; i < obj.size(); ++i) {
        std::string bad = obj;
        bad[i] = static_cast<char>(bad[i] ^ (1 << (i % 8)));
        auto dec = decode_segment(bad, name);
        INFO("byte " << i << " of " << obj.size());
        REQUIRE_FALSE(dec.ok());
        CHECK(dec.error().kind == ErrorKind::Corrupt);
        CHECK(mentions(dec.error(), name));
    }
}

TEST_CASE("a truncated or extended segment is detected", "[format][segment][corrupt]") {
    Compression c = GENERATE(Compression::None, Compression::Zstd);
    std::mt19937 rng(4);
    std::string obj = encode_segment(sample_segment_header(c, 512), sample_frames(rng, 6, 512), nullptr);
    const size_t header_end = 16 + get_be32(obj, 12);
    for (size_t len :
         {size_t{0}, size_t{1}, size_t{8}, size_t{15}, size_t{16}, header_end - 1, header_end, header_end + 31,
          header_end + 32, obj.size() / 2, obj.size() - 33, obj.size() - 32, obj.size() - 1}) {
        INFO("length " << len << " of " << obj.size());
        auto dec = decode_segment(std::string_view(obj).substr(0, len), "the-key");
        REQUIRE_FALSE(dec.ok());
        CHECK(dec.error().kind == ErrorKind::Corrupt);
        CHECK(mentions(dec.error(), "the-key"));
    }
    CHECK(mentions(decode_segment(std::string_view(obj).substr(0, 10), "k").error(), "truncated"));
    CHECK(mentions(decode_segment(std::string_view(obj).substr(0, header_end - 1), "k").error(), "truncated"));
    auto longer = decode_segment(obj + "x", "k");
    REQUIRE_FALSE(longer.ok());
    CHECK(longer.error().kind == ErrorKind::Corrupt);
}

TEST_CASE("segment magic and version", "[format][segment][corrupt]") {
    std::mt19937 rng(5);
    std::string obj =
        encode_segment(sample_segment_header(Compression::Zstd, 512), sample_frames(rng, 6, 512), nullptr);

    SECTION("a snapshot is not a segment") {
        std::string bad = obj;
        bad.replace(0, 8, "BTLSSNAP");
        auto dec = decode_segment(reseal(bad), "k1");
        REQUIRE_FALSE(dec.ok());
        CHECK(dec.error().kind == ErrorKind::Corrupt);
        CHECK(mentions(dec.error(), "k1"));
        CHECK(mentions(dec.error(), "magic"));
        CHECK(mentions(dec.error(), "snapshot"));
    }
    SECTION("something else entirely") {
        std::string bad = obj;
        bad.replace(0, 8, "PK\x03\x04zzzz");
        auto dec = decode_segment(reseal(bad), "k2");
        REQUIRE_FALSE(dec.ok());
        CHECK(mentions(dec.error(), "k2"));
        CHECK(mentions(dec.error(), "bad magic"));
    }
    SECTION("a newer format version asks for an upgrade") {
        uint32_t version = GENERATE(0u, 2u, 0xffffffffu);
        std::string bad = obj;
        bad.replace(8, 4,
                    std::string{static_cast<char>(version >> 24), static_cast<char>(version >> 16),
                                static_cast<char>(version >> 8), static_cast<char>(version)});
        auto dec = decode_segment(reseal(bad), "k3");
        REQUIRE_FALSE(dec.ok());
        CHECK(dec.error().kind == ErrorKind::Corrupt);
        CHECK(mentions(dec.error(), "k3"));
        CHECK(mentions(dec.error(), "unsupported format version " + std::to_string(version)));
        CHECK(mentions(dec.error(), "upgrade bottomless"));
        CHECK(dec.error().code == "UnsupportedVersion");
    }
    SECTION("a header length beyond any sane size") {
        std::string bad = obj;
        bad.replace(12, 4, "\x7f\xff\xff\xff");
        auto dec = decode_segment(reseal(bad), "k4");
        REQUIRE_FALSE(dec.ok());
        CHECK(dec.error().kind == ErrorKind::Corrupt);
    }
}

TEST_CASE("segments with a valid checksum but inconsistent content are refused", "[format][segment][corrupt]") {
    // Hand-built objects: the checksum is right, a field or the body is not.
    std::mt19937 rng(6);
    const uint32_t ps = 512;
    auto header = [&](const std::function<void(json&)>& edit) {
        json j = {{"db_id", "db"},
                  {"generation", "g"},
                  {"seq", 1},
                  {"page_size", ps},
                  {"start", {{"salt1", 1}, {"salt2", 2}, {"frame", 0}, {"cksum1", 3}, {"cksum2", 4}}},
                  {"end", {{"salt1", 1}, {"salt2", 2}, {"frame", 2}, {"cksum1", 5}, {"cksum2", 6}}},
                  {"prev_sha256", s3::sha256_hex("x")},
                  {"txns", json::array({{{"frames", 2}, {"db_pages", 4}, {"commit_us", 123}}})},
                  {"compression", "none"}};
        edit(j);
        return j.dump();
    };
    auto frame = [&](uint32_t pgno) {
        std::string f;
        put_be32(f, pgno);
        return f + random_bytes(rng, ps);
    };
    const std::string body = frame(1) + frame(4);

    SECTION("the hand-built reference object itself decodes") {
        auto dec = decode_segment(build_object("BTLSSEGM", 1, header([](json&) {}), body), "ok");
        REQUIRE(dec.ok());
        CHECK(dec->frames.size() == 2);
        CHECK(dec->frames[1].pgno == 4);
        CHECK(dec->frames[1].page == body.substr(4 + ps + 4, ps));
    }

    struct Case {
        const char* what;
        std::function<void(json&)> edit;
        std::string body;
        const char* expect;  // part of the message
    };
    std::vector<Case> cases = {
        {"page size not a power of two", [](json& j) { j["page_size"] = 1000; }, body, "page_size"},
        {"page size too small", [](json& j) { j["page_size"] = 256; }, body, "page_size"},
        {"page size too big", [](json& j) { j["page_size"] = 131072; }, body, "page_size"},
        {"page size a string", [](json& j) { j["page_size"] = "512"; }, body, "page_size"},
        {"seq 0", [](json& j) { j["seq"] = 0; }, body, "seq"},
        {"seq negative", [](json& j) { j["seq"] = -1; }, body, "seq"},
        {"empty db_id", [](json& j) { j["db_id"] = ""; }, body, "db_id"},
        {"missing generation", [](json& j) { j.erase("generation"); }, body, "generation"},
        {"empty generation", [](json& j) { j["generation"] = ""; }, body, "generation"},
        {"salt beyond 32 bits", [](json& j) { j["start"]["salt1"] = 0x100000000ull; }, body, "start.salt1"},
        {"position not an object", [](json& j) { j["end"] = 5; }, body, "end"},
        {"prev_sha256 not hex", [](json& j) { j["prev_sha256"] = "zz"; }, body, "prev_sha256"},
        {"unknown compression", [](json& j) { j["compression"] = "lz4"; }, body, "compression"},
        {"txns not an array", [](json& j) { j["txns"] = json::object(); }, body, "txns"},
        {"txn without frames", [](json& j) { j["txns"][0].erase("frames"); }, body, "txns[0].frames"},
        {"txn with 0 frames",
         [](json& j) {
             j["txns"] = json::array({{{"frames", 0}, {"db_pages", 4}, {"commit_us", 1}},
                                      {{"frames", 2}, {"db_pages", 4}, {"commit_us", 2}}});
         },
         body, "txns[0].frames"},
        {"txn with db size 0", [](json& j) { j["txns"][0]["db_pages"] = 0; }, body, "txns[0].db_pages"},
        {"commit time a float", [](json& j) { j["txns"][0]["commit_us"] = 1.5; }, body, "commit_us"},
        {"commit time beyond int64", [](json& j) { j["txns"][0]["commit_us"] = uint64_t{1} << 63; }, body, "commit_us"},
        {"txns claim more frames than the body holds", [](json& j) { j["txns"][0]["frames"] = 3; }, body, "frames"},
        {"txns claim fewer frames than the body holds", [](json& j) { j["txns"][0]["frames"] = 1; }, body, "frames"},
        {"a short page", [](json&) {}, body.substr(0, body.size() - 1), "body"},
        {"page number 0", [](json&) {}, frame(1) + frame(0), "page number 0"},
    };
    for (const Case& k : cases) {
        INFO(k.what);
        auto dec = decode_segment(build_object("BTLSSEGM", 1, header(k.edit), k.body), "obj-name");
        REQUIRE_FALSE(dec.ok());
        CHECK(dec.error().kind == ErrorKind::Corrupt);
        CHECK(mentions(dec.error(), "obj-name"));
        CHECK(mentions(dec.error(), k.expect));
    }

    SECTION("a header that is not JSON, or not an object") {
        for (std::string text :
             {std::string("{not json"), std::string("[1,2]"), std::string(""), std::string("null")}) {
            INFO(text);
            auto dec = decode_segment(build_object("BTLSSEGM", 1, text, body), "obj-name");
            REQUIRE_FALSE(dec.ok());
            CHECK(dec.error().kind == ErrorKind::Corrupt);
            CHECK(mentions(dec.error(), "obj-name"));
        }
    }
    SECTION("zstd bodies: garbage, too many frames, too few, bytes after the frame, an unended frame") {
        auto zheader = header([](json& j) { j["compression"] = "zstd"; });
        std::string z = zstd_compress(body);
        CHECK(decode_segment(build_object("BTLSSEGM", 1, zheader, z), "z").ok());
        std::vector<std::pair<const char*, std::string>> bodies = {
            {"garbage", random_bytes(rng, 300)},
            {"too many frames", zstd_compress(body + frame(2))},
            {"too few frames", zstd_compress(frame(1))},
            {"partial frame", zstd_compress(body.substr(0, body.size() - 10))},
            {"partial frame after the last", zstd_compress(body + "abc")},
            {"all frames, frame end missing",
             [&] {
                 std::string zc = zstd_compress_with_checksum(body);
                 return zc.substr(0, zc.size() - 4);
             }()},
            {"stray bytes", z + "tail"},
            {"two frames", z + z},
            {"unended frame", z.substr(0, z.size() - 3)},
            {"empty", ""},
        };
        for (const auto& [what, b] : bodies) {
            INFO(what);
            auto dec = decode_segment(build_object("BTLSSEGM", 1, zheader, b), "zname");
            REQUIRE_FALSE(dec.ok());
            CHECK(dec.error().kind == ErrorKind::Corrupt);
            CHECK(mentions(dec.error(), "zname"));
        }
    }
}

TEST_CASE("snapshots stream out and back in", "[format][snapshot]") {
    Compression c = GENERATE(Compression::None, Compression::Zstd);
    INFO(to_string(c));
    std::mt19937 rng(c == Compression::Zstd ? 11 : 12);
    const uint32_t ps = 4096, n = 1000;
    std::vector<std::string> pages;
    for (uint32_t i = 0; i < n; ++i) pages.push_back(i % 3 == 0 ? random_bytes(rng, ps) : db_like_page(rng, ps));
    SnapshotHeader h = sample_snapshot_header(c, ps, n);
    Written w = write_snapshot(h, pages);

    // Output is streamed in pieces of about 1 MiB, starting before finish().
    CHECK(w.pieces_before_finish >= 1);
    CHECK(*std::max_element(w.pieces.begin(), w.pieces.end()) <= (1u << 20));
    CHECK(w.pieces.size() >= w.bytes.size() / (1u << 20));
    CHECK(w.bytes_out == w.bytes.size());
    CHECK(w.sha == s3::sha256_hex(std::string_view(w.bytes).substr(0, w.bytes.size() - 32)));
    CHECK(w.sha == s3::to_hex(reinterpret_cast<const unsigned char*>(w.bytes.data()) + w.bytes.size() - 32, 32));
    if (c == Compression::Zstd) CHECK(w.bytes.size() < size_t{n} * ps * 3 / 4);

    SECTION("the layout is the documented one") {
        CHECK(w.bytes.substr(0, 8) == "BTLSSNAP");
        // Plaintext zstd snapshots carry a page index (format 2).
        CHECK(get_be32(w.bytes, 8) == (c == Compression::Zstd ? 2u : 1u));
        json j = json::parse(header_json_of(w.bytes));
        CHECK(j.contains("frame_pages") == (c == Compression::Zstd));
        CHECK(j["db_id"] == h.db_id);
        CHECK(j["generation"] == h.generation);
        CHECK(j["page_size"] == ps);
        CHECK(j["db_pages"] == n);
        CHECK(j["created_us"] == h.created_us);
        CHECK(j["last_commit_us"] == h.last_commit_us);
        CHECK(j["position"]["frame"] == 1234);
        CHECK(j["position"]["salt2"] == 6);
        CHECK(j["parent_generation"] == h.parent_generation);
        CHECK(j["parent_seq"] == 99);
        CHECK(j["compression"] == to_string(c));
        if (c == Compression::None) {
            size_t body = 16 + get_be32(w.bytes, 12);
            CHECK(w.bytes.size() == body + size_t{n} * ps + 32);
            CHECK(w.bytes.substr(body + ps, ps) == pages[1]);
        }
    }
    SECTION("read back in random pieces") {
        size_t max_piece = GENERATE(size_t{7}, size_t{100}, size_t{70000}, size_t{3} << 20);
        Read r = read_snapshot(w.bytes, "snap", rng, max_piece);
        REQUIRE_FALSE(r.error.has_value());
        REQUIRE(r.pages.size() == n);
        for (uint32_t i = 0; i < n; ++i) REQUIRE(r.pages[i] == pages[i]);
        REQUIRE(r.header.has_value());
        check_same(*r.header, h);
        CHECK(r.sha == w.sha);
    }
    SECTION("read back in one piece") {
        std::vector<std::string> got;
        SnapshotReader reader("snap", [&](uint32_t, std::string_view p) -> Status {
            got.emplace_back(p);
            return {};
        });
        CHECK(reader.header() == nullptr);
        REQUIRE(reader.feed(w.bytes).ok());
        REQUIRE(reader.header() != nullptr);
        CHECK(reader.header()->db_pages == n);
        auto fin = reader.finish();
        REQUIRE(fin.ok());
        CHECK(got == pages);
        CHECK(reader.sha256() == w.sha);
    }
}

TEST_CASE("a small snapshot read one byte at a time", "[format][snapshot]") {
    Compression c = GENERATE(Compression::None, Compression::Zstd);
    uint32_t ps = GENERATE(512u, 65536u);
    std::mt19937 rng(ps);
    std::vector<std::string> pages;
    for (int i = 0; i < 3; ++i) pages.push_back(db_like_page(rng, ps));
    Written w = write_snapshot(sample_snapshot_header(c, ps, 3), pages);

    std::vector<std::string> got;
    SnapshotReader reader("tiny", [&](uint32_t pgno, std::string_view p) -> Status {
        REQUIRE(pgno == got.size() + 1);
        got.emplace_back(p);
        return {};
    });
    const size_t header_end = 16 + get_be32(w.bytes, 12);
    for (size_t i = 0; i < w.bytes.size(); ++i) {
        REQUIRE(reader.feed(std::string_view(w.bytes).substr(i, 1)).ok());
        // The header shows up once its last byte is known not to be the trailer.
        if (i + 1 < header_end) REQUIRE(reader.header() == nullptr);
        if (i + 1 >= header_end + 32) REQUIRE(reader.header() != nullptr);
    }
    // Nothing of the last 32 bytes was taken for content.
    auto fin = reader.finish();
    REQUIRE(fin.ok());
    CHECK(got == pages);
    CHECK(reader.sha256() == w.sha);
}

TEST_CASE("empty snapshot (a database of zero pages)", "[format][snapshot]") {
    Compression c = GENERATE(Compression::None, Compression::Zstd);
    std::mt19937 rng(1);
    Written w = write_snapshot(sample_snapshot_header(c, 4096, 0), {});
    Read r = read_snapshot(w.bytes, "empty", rng, 5);
    REQUIRE_FALSE(r.error.has_value());
    CHECK(r.pages.empty());
}

TEST_CASE("a damaged snapshot is never accepted", "[format][snapshot][corrupt]") {
    Compression c = GENERATE(Compression::None, Compression::Zstd);
    INFO(to_string(c));
    std::mt19937 rng(21);
    const uint32_t ps = 512, n = 8;
    std::vector<std::string> pages;
    for (uint32_t i = 0; i < n; ++i) pages.push_back(db_like_page(rng, ps));
    Written w = write_snapshot(sample_snapshot_header(c, ps, n), pages);
    const std::string name = "app/main.db/gen/snapshot";

    SECTION("a flipped bit anywhere") {
        for (size_t i = 0; i < w.bytes.size(); ++i) {
            std::string bad = w.bytes;
            bad[i] = static_cast<char>(bad[i] ^ (1 << (i % 8)));
            Read r = read_snapshot(bad, name, rng, 200);
            INFO("byte " << i << " of " << w.bytes.size());
            REQUIRE(r.error.has_value());
            CHECK(r.error->kind == ErrorKind::Corrupt);
            CHECK(mentions(*r.error, name));
        }
    }
    SECTION("truncated anywhere") {
        for (size_t len = 0; len < w.bytes.size(); len += (len < 64 || len > w.bytes.size() - 64) ? 1 : 37) {
            Read r = read_snapshot(std::string_view(w.bytes).substr(0, len), name, rng, 50);
            INFO("length " << len << " of " << w.bytes.size());
            REQUIRE(r.error.has_value());
            CHECK(r.error->kind == ErrorKind::Corrupt);
            CHECK(mentions(*r.error, name));
        }
    }
    SECTION("extra bytes at the end") {
        Read r = read_snapshot(w.bytes + std::string(5, 'x'), name, rng, 50);
        REQUIRE(r.error.has_value());
        CHECK(r.error->kind == ErrorKind::Corrupt);
    }
    SECTION("a segment fed to the snapshot reader") {
        std::string seg =
            encode_segment(sample_segment_header(Compression::None, 512), sample_frames(rng, 6, 512), nullptr);
        Read r = read_snapshot(seg, name, rng, 50);
        REQUIRE(r.error.has_value());
        CHECK(r.failed_in_feed);
        CHECK(mentions(*r.error, "magic"));
        CHECK(mentions(*r.error, name));
    }
    SECTION("a newer format version") {
        std::string bad = w.bytes;
        bad[11] = 3;
        Read r = read_snapshot(reseal(bad), name, rng, 50);
        REQUIRE(r.error.has_value());
        CHECK(mentions(*r.error, "unsupported format version 3 (this build reads 1 and 2)"));
        CHECK(mentions(*r.error, name));
    }
}

TEST_CASE("a snapshot whose page count disagrees with its header is refused", "[format][snapshot][corrupt]") {
    Compression c = GENERATE(Compression::None, Compression::Zstd);
    std::mt19937 rng(22);
    const uint32_t ps = 1024;
    auto object = [&](uint32_t claimed, const std::string& raw_body) {
        json j = {{"db_id", "db"},
                  {"generation", "g"},
                  {"page_size", ps},
                  {"db_pages", claimed},
                  {"created_us", 1},
                  {"last_commit_us", 0},
                  {"position", {{"salt1", 1}, {"salt2", 2}, {"frame", 3}, {"cksum1", 4}, {"cksum2", 5}}},
                  {"parent_generation", ""},
                  {"parent_seq", 0},
                  {"compression", to_string(c)}};
        return build_object("BTLSSNAP", 1, j.dump(), c == Compression::Zstd ? zstd_compress(raw_body) : raw_body);
    };
    const std::string four = random_bytes(rng, 4 * ps);

    Read ok = read_snapshot(object(4, four), "n", rng, 100);
    REQUIRE_FALSE(ok.error.has_value());
    CHECK(ok.pages.size() == 4);

    for (uint32_t claimed : {3u, 5u, 0u, 1000000u}) {
        INFO("header says " << claimed << ", body holds 4");
        Read r = read_snapshot(object(claimed, four), "n", rng, 100);
        REQUIRE(r.error.has_value());
        CHECK(r.error->kind == ErrorKind::Corrupt);
        CHECK(mentions(*r.error, "pages"));
        // Never more pages than the header promised.
        CHECK(r.pages.size() <= claimed);
    }
    SECTION("a body ending inside a page") {
        for (const std::string& b : {four.substr(0, four.size() - 100), four + "xyz"}) {
            Read r = read_snapshot(object(4, b), "n", rng, 100);
            REQUIRE(r.error.has_value());
            CHECK(r.error->kind == ErrorKind::Corrupt);
            CHECK(mentions(*r.error, "page"));
        }
    }
    SECTION("a zstd stream that does not end, though every page came out") {
        if (c == Compression::Zstd) {
            json j = json::parse(header_json_of(object(4, four)));
            std::string z = zstd_compress_with_checksum(four);
            CHECK_FALSE(read_snapshot(build_object("BTLSSNAP", 1, j.dump(), z), "n", rng, 100).error.has_value());
            Read r = read_snapshot(build_object("BTLSSNAP", 1, j.dump(), z.substr(0, z.size() - 4)), "n", rng, 100);
            CHECK(r.pages.size() == 4);
            REQUIRE(r.error.has_value());
            CHECK(r.error->kind == ErrorKind::Corrupt);
            CHECK(mentions(*r.error, "zstd"));
        }
    }
    SECTION("an absurd header length fails at once, not after buffering it") {
        std::string bad = object(4, four);
        bad.replace(12, 4, "\x7f\xff\xff\xff");
        Read r = read_snapshot(bad, "n", rng, 100);
        REQUIRE(r.error.has_value());
        CHECK(r.failed_in_feed);
        CHECK(r.error->kind == ErrorKind::Corrupt);
    }
    SECTION("invalid header fields") {
        for (auto edit : std::vector<std::function<void(json&)>>{
                 [](json& j) { j["page_size"] = 3000; }, [](json& j) { j["db_id"] = ""; },
                 [](json& j) { j["generation"] = ""; }, [](json& j) { j.erase("position"); },
                 [](json& j) { j["created_us"] = "yesterday"; }, [](json& j) { j["compression"] = "brotli"; },
                 [](json& j) { j["db_pages"] = -4; }}) {
            json j = json::parse(header_json_of(object(4, four)));
            edit(j);
            Read r = read_snapshot(
                build_object("BTLSSNAP", 1, j.dump(), c == Compression::Zstd ? zstd_compress(four) : four), "hdr-name",
                rng, 100);
            INFO(j.dump());
            REQUIRE(r.error.has_value());
            CHECK(r.error->kind == ErrorKind::Corrupt);
            CHECK(mentions(*r.error, "hdr-name"));
            CHECK(mentions(*r.error, "header"));
            CHECK(r.pages.empty());
        }
    }
}

TEST_CASE("a format-2 snapshot's page index finds and proves every page", "[format][snapshot][index]") {
    // Page sizes and counts around the frame boundaries: 64 KiB frames.
    const auto [ps, n] = GENERATE(table<uint32_t, uint32_t>(
        {{4096, 0}, {4096, 1}, {4096, 16}, {4096, 17}, {4096, 1000}, {512, 1500}, {65536, 9}}));
    CAPTURE(ps, n);
    std::mt19937 rng(ps + n);
    std::vector<std::string> pages;
    for (uint32_t i = 0; i < n; ++i) pages.push_back(i % 4 == 0 ? random_bytes(rng, ps) : db_like_page(rng, ps));
    SnapshotHeader h = sample_snapshot_header(Compression::Zstd, ps, n);
    Written w = write_snapshot(h, pages);
    REQUIRE(get_be32(w.bytes, 8) == 2);
    auto peeked = peek_snapshot_header(w.bytes, "snap");
    REQUIRE(peeked.ok());
    CHECK(peeked->frame_pages == std::max<uint32_t>(1, kSnapshotFrameBytes / ps));
    const uint32_t frames = snapshot_frames(*peeked);
    CHECK(frames == (n + peeked->frame_pages - 1) / peeked->frame_pages);

    // The stream reader passes over the index.
    Read r = read_snapshot(w.bytes, "snap", rng, 70000);
    REQUIRE_FALSE(r.error.has_value());
    CHECK(r.pages == pages);

    // The tail alone (one ranged GET) gives the index.
    const uint64_t tail = page_index_tail_size(*peeked);
    REQUIRE(tail <= w.bytes.size());
    auto idx = parse_page_index(std::string_view(w.bytes).substr(w.bytes.size() - tail), w.bytes.size(), *peeked, "snap");
    REQUIRE(idx.ok());
    CHECK(idx->frames() == frames);
    CHECK(idx->trailer_hex == w.sha);
    CHECK(idx->frame_offset[0] == 16 + get_be32(w.bytes, 12));
    for (uint32_t p = 1; p <= n; ++p) CHECK(idx->hash(p) == page_hash(pages[p - 1]));
    // Each frame decodes alone to its pages.
    std::vector<std::string> got(n);
    for (uint32_t f = 0; f < frames; ++f) {
        const std::string_view bytes =
            std::string_view(w.bytes).substr(idx->frame_offset[f], idx->frame_offset[f + 1] - idx->frame_offset[f]);
        REQUIRE(decode_snapshot_frame(*idx, f, bytes, "snap", [&](uint32_t pgno, std::string_view page) -> Status {
                    CHECK(idx->frame_of(pgno) == f);
                    got[pgno - 1] = std::string(page);
                    return {};
                }).ok());
    }
    CHECK(got == pages);
    if (n == 0) return;

    SECTION("a changed byte in the index is caught by the footer's digest") {
        std::string bad = w.bytes;
        bad[bad.size() - tail + 8 + (rng() % page_index_bytes(*peeked))] ^= 0x20;
        auto e = parse_page_index(std::string_view(bad).substr(bad.size() - tail), bad.size(), *peeked, "snap");
        REQUIRE_FALSE(e.ok());
        CHECK(e.error().kind == ErrorKind::Corrupt);
        CHECK(mentions(e.error(), "SHA-256"));
    }
    SECTION("a tail of the wrong object size, or a header that does not match") {
        CHECK_FALSE(parse_page_index(std::string_view(w.bytes).substr(w.bytes.size() - tail), w.bytes.size() + 1,
                                     *peeked, "snap").ok());
        SnapshotHeader other = *peeked;
        other.db_pages += 1;
        const uint64_t t2 = page_index_tail_size(other);
        if (t2 <= w.bytes.size())
            CHECK_FALSE(parse_page_index(std::string_view(w.bytes).substr(w.bytes.size() - t2), w.bytes.size(), other,
                                         "snap").ok());
    }
    SECTION("a frame whose bytes changed is refused, never handed out") {
        const uint32_t f = frames - 1;
        std::string frame = w.bytes.substr(idx->frame_offset[f], idx->frame_offset[f + 1] - idx->frame_offset[f]);
        frame[frame.size() / 2] ^= 0x01;
        int handed = 0;
        Status st = decode_snapshot_frame(*idx, f, frame, "snap", [&](uint32_t, std::string_view) -> Status {
            ++handed;
            return {};
        });
        CHECK_FALSE(st.ok());
        if (!st.ok()) CHECK(st.error().kind == ErrorKind::Corrupt);
        // A page that decoded but differs from its digest stops before it is handed out.
        CHECK(handed < static_cast<int>(std::min(n - f * idx->frame_pages, idx->frame_pages)));
        CHECK_FALSE(decode_snapshot_frame(*idx, f, frame.substr(1), "snap", [](uint32_t, std::string_view) -> Status {
                        return {};
                    }).ok());
    }
}

TEST_CASE("the format version and frame_pages must agree", "[format][snapshot][index]") {
    std::mt19937 rng(3);
    Written w = write_snapshot(sample_snapshot_header(Compression::Zstd, 4096, 3),
                               {db_like_page(rng, 4096), db_like_page(rng, 4096), db_like_page(rng, 4096)});
    std::string v1 = w.bytes;
    v1[11] = 1;  // a format-1 object whose header has frame_pages
    Read r = read_snapshot(reseal(v1), "snap", rng, 50);
    REQUIRE(r.error.has_value());
    CHECK(mentions(*r.error, "format-1 snapshot whose header has frame_pages"));
    // Encrypted and uncompressed snapshots stay format 1.
    Written plain = write_snapshot(sample_snapshot_header(Compression::None, 4096, 1), {db_like_page(rng, 4096)});
    CHECK(get_be32(plain.bytes, 8) == 1);
}

TEST_CASE("SnapshotWriter refuses misuse and passes sink failures on", "[format][snapshot]") {
    std::mt19937 rng(31);
    std::string out;
    auto sink = [&out](std::string_view p) -> Status {
        out.append(p);
        return {};
    };

    SECTION("a page of the wrong size") {
        SnapshotWriter w(sample_snapshot_header(Compression::Zstd, 512, 2), sink);
        Status st = w.add_page(random_bytes(rng, 511));
        REQUIRE_FALSE(st.ok());
        CHECK(st.error().kind == ErrorKind::InvalidArgument);
    }
    SECTION("more pages than db_pages") {
        SnapshotWriter w(sample_snapshot_header(Compression::Zstd, 512, 1), sink);
        REQUIRE(w.add_page(random_bytes(rng, 512)).ok());
        CHECK_FALSE(w.add_page(random_bytes(rng, 512)).ok());
    }
    SECTION("finish before all pages") {
        SnapshotWriter w(sample_snapshot_header(Compression::None, 512, 2), sink);
        REQUIRE(w.add_page(random_bytes(rng, 512)).ok());
        auto fin = w.finish();
        REQUIRE_FALSE(fin.ok());
        CHECK(fin.error().kind == ErrorKind::InvalidArgument);
    }
    SECTION("an invalid header") {
        SnapshotHeader h = sample_snapshot_header(Compression::Zstd, 512, 1);
        h.page_size = 1000;
        SnapshotWriter w(h, sink);
        CHECK_FALSE(w.add_page(std::string(1000, 'x')).ok());
        CHECK_FALSE(w.finish().ok());
    }
    SECTION("a failing sink fails the writer, for good") {
        int calls = 0;
        SnapshotWriter w(sample_snapshot_header(Compression::None, 65536, 40), [&](std::string_view) -> Status {
            ++calls;
            return make_error(ErrorKind::Transport, "connection reset");
        });
        Status first = Status();
        int added = 0;
        for (; added < 40 && first.ok(); ++added) first = w.add_page(random_bytes(rng, 65536));
        REQUIRE_FALSE(first.ok());
        CHECK(first.error().kind == ErrorKind::Transport);
        CHECK(added <= 17);  // the first 1 MiB piece went to the sink
        CHECK_FALSE(w.add_page(random_bytes(rng, 65536)).ok());
        auto fin = w.finish();
        REQUIRE_FALSE(fin.ok());
        CHECK(fin.error().kind == ErrorKind::Transport);
        CHECK(calls == 1);
    }
    SECTION("an on_page failure stops the reader") {
        std::vector<std::string> pages = {random_bytes(rng, 512), random_bytes(rng, 512), random_bytes(rng, 512)};
        Written wr = write_snapshot(sample_snapshot_header(Compression::Zstd, 512, 3), pages);
        int seen = 0;
        SnapshotReader r("n", [&](uint32_t, std::string_view) -> Status {
            if (++seen == 2) return make_error(ErrorKind::Io, "disk full");
            return {};
        });
        Status st = r.feed(wr.bytes);
        REQUIRE_FALSE(st.ok());
        CHECK(st.error().kind == ErrorKind::Io);
        CHECK_FALSE(r.finish().ok());
    }
}

TEST_CASE("headers can be read from an object's first bytes", "[format]") {
    std::mt19937 rng(41);
    SegmentHeader sh = sample_segment_header(Compression::Zstd, 512);
    std::string seg = encode_segment(sh, sample_frames(rng, 6, 512), nullptr);
    SnapshotHeader nh = sample_snapshot_header(Compression::Zstd, 512, 2);
    Written snap = write_snapshot(nh, {random_bytes(rng, 512), random_bytes(rng, 512)});

    const size_t seg_hdr = 16 + get_be32(seg, 12);
    const size_t snap_hdr = 16 + get_be32(snap.bytes, 12);
    for (size_t extra : {size_t{0}, size_t{10}, size_t{4096}}) {
        auto s = peek_segment_header(std::string_view(seg).substr(0, std::min(seg.size(), seg_hdr + extra)), "seg");
        REQUIRE(s.ok());
        check_same(*s, sh);
        auto n = peek_snapshot_header(
            std::string_view(snap.bytes).substr(0, std::min(snap.bytes.size(), snap_hdr + extra)), "snap");
        REQUIRE(n.ok());
        check_same(*n, nh);
    }
    for (size_t len : {size_t{0}, size_t{15}, size_t{16}, seg_hdr - 1}) {
        auto s = peek_segment_header(std::string_view(seg).substr(0, len), "seg-name");
        REQUIRE_FALSE(s.ok());
        CHECK(s.error().kind == ErrorKind::Corrupt);
        CHECK(mentions(s.error(), "seg-name"));
        CHECK(mentions(s.error(), "truncated"));
        // A listing that fetched too short a range can tell this from damage.
        CHECK(s.error().code == "Truncated");
    }
    CHECK_FALSE(peek_snapshot_header(seg, "x").ok());
    CHECK_FALSE(peek_segment_header(snap.bytes, "x").ok());
    std::string v2 = seg;
    v2[11] = 2;
    CHECK(mentions(peek_segment_header(v2, "x").error(), "unsupported format version 2"));
}

TEST_CASE("zeros compress", "[format]") {
    const std::string zero(4096, '\0');
    SECTION("segment") {
        SegmentHeader h = sample_segment_header(Compression::Zstd, 4096);
        h.txns = {{100, 100, 1}};
        std::vector<SegmentFrame> frames;
        for (uint32_t i = 1; i <= 100; ++i) frames.push_back({i, PageBuf(zero)});
        std::string z = encode_segment(h, frames, nullptr);
        h.compression = Compression::None;
        std::string raw = encode_segment(h, frames, nullptr);
        CHECK(raw.size() > 100 * 4096);
        CHECK(z.size() < raw.size() / 50);
        CHECK(decode_segment(z, "z")->frames[99].page == zero);
    }
    SECTION("snapshot") {
        std::vector<std::string> pages(100, zero);
        Written w = write_snapshot(sample_snapshot_header(Compression::Zstd, 4096, 100), pages);
        CHECK(w.bytes.size() < 100 * 4096 / 50);
    }
}

TEST_CASE("generation ids sort newest first and encode their time", "[format][generation]") {
    const int64_t t = 1700000000123;
    std::string id = new_generation_id(t);
    CHECK(id.size() == 25);
    CHECK(id[16] == '-');
    CHECK(id.find_first_not_of("0123456789abcdef-") == std::string::npos);
    CHECK(id.substr(0, 16) == "0000fe74301a9784");  // 2^48 - 1 - t, in hex
    CHECK(generation_time_ms(id) == t);
    // Two generations of the same millisecond still differ (the random part).
    CHECK(new_generation_id(t) != new_generation_id(t));

    SECTION("round trip at the ends of the range") {
        for (int64_t ms : {int64_t{0}, int64_t{1}, t, (int64_t{1} << 48) - 1}) {
            INFO(ms);
            CHECK(generation_time_ms(new_generation_id(ms)) == ms);
        }
    }
    SECTION("lexicographic order is newest first") {
        std::mt19937_64 rng(5);
        std::vector<std::pair<int64_t, std::string>> ids;
        for (int i = 0; i < 500; ++i) {
            int64_t ms = static_cast<int64_t>(rng() % (uint64_t{1} << 44));
            if (i % 50 == 0) ms = t + i / 50;  // neighbours one millisecond apart
            ids.emplace_back(ms, new_generation_id(ms));
        }
        std::sort(ids.begin(), ids.end(), [](const auto& a, const auto& b) { return a.second < b.second; });
        for (size_t i = 1; i < ids.size(); ++i) {
            INFO(ids[i - 1].second << " then " << ids[i].second);
            CHECK(ids[i - 1].first >= ids[i].first);
        }
    }
    SECTION("malformed ids give -1") {
        for (std::string bad : {std::string(""), std::string("abc"), std::string("0000ff7650d5eb84"),
                                std::string("0000ff7650d5eb84-1234567"), std::string("0000ff7650d5eb84-123456789"),
                                std::string("0000FF7650D5EB84-12345678"), std::string("0000ff7650d5eb84_12345678"),
                                std::string("0000ff7650d5eb8g-12345678"), std::string("0000ff7650d5eb84-1234567z"),
                                std::string("ffffffffffffffff-12345678"), std::string("0001000000000000-12345678"),
                                std::string(" 000ff7650d5eb84-12345678")}) {
            INFO(bad);
            CHECK(generation_time_ms(bad) == -1);
        }
        CHECK(generation_time_ms("0000ffffffffffff-00000000") == 0);
        CHECK(generation_time_ms("0000000000000000-ffffffff") == (int64_t{1} << 48) - 1);
    }
}

TEST_CASE("object keys", "[format][keys]") {
    CHECK(generation_prefix("db", "g1") == "db/g1/");
    CHECK(snapshot_key("db", "g1") == "db/g1/snapshot");
    CHECK(segment_key("db", "g1", 1) == "db/g1/seg-000000000001");
    CHECK(segment_key("a/b", "g", 123456789012) == "a/b/g/seg-123456789012");
    // A database's keys never fall under another database's prefix.
    CHECK(snapshot_key("db2", "g1").rfind(generation_prefix("db", "g1"), 0) == std::string::npos);
    CHECK(segment_key("db", "g10", 1).rfind(generation_prefix("db", "g1"), 0) == std::string::npos);
    // Zero padding keeps listing order equal to seq order.
    CHECK(segment_key("db", "g", 9) < segment_key("db", "g", 10));
    CHECK(segment_key("db", "g", 999999999999) > segment_key("db", "g", 100000000000));

    SECTION("parse_segment_key inverts segment_key") {
        for (uint64_t seq : {uint64_t{1}, uint64_t{42}, uint64_t{999999999999}, uint64_t{1000000000000},
                             std::numeric_limits<uint64_t>::max()}) {
            uint64_t got = 0;
            INFO(seq);
            REQUIRE(parse_segment_key(segment_key("db", "g", seq), got));
            CHECK(got == seq);
        }
        uint64_t got = 0;
        CHECK(parse_segment_key("seg-000000000005", got));
        CHECK(got == 5);
    }
    SECTION("anything else is not a segment key") {
        for (const char* key :
             {"db/g/snapshot", "db/g/seg-", "db/g/seg-12", "db/g/seg-00000000000a", "db/g/seg-000000000000",
              "db/g/seg-0000000000001", "db/g/seg-000000000001/x", "db/g/seg-000000000001 ", "db/g/Seg-000000000001",
              "db/g/xseg-000000000001", "db/g/seg-+00000000001", "db/g/seg-99999999999999999999", "db/g/", ""}) {
            uint64_t got = 77;
            INFO(key);
            CHECK_FALSE(parse_segment_key(key, got));
            CHECK(got == 77);
        }
    }
}

// ---- issue 13: the decoders survive a hostile bucket ----

namespace {

std::string segment_header_text(const SegmentHeader& h) {
    json txns = json::array();
    for (const auto& t : h.txns) txns.push_back({{"frames", t.frames}, {"db_pages", t.db_pages}, {"commit_us", t.commit_us}});
    auto pos = [](const WalPosition& p) {
        return json{{"salt1", p.salt1}, {"salt2", p.salt2}, {"frame", p.frame}, {"cksum1", p.cksum1}, {"cksum2", p.cksum2}};
    };
    return json{{"db_id", h.db_id},       {"generation", h.generation}, {"seq", h.seq},
                {"page_size", h.page_size}, {"start", pos(h.start)},      {"end", pos(h.end)},
                {"prev_sha256", h.prev_sha256}, {"txns", txns},           {"compression", to_string(h.compression)}}
        .dump();
}

// A zstd frame whose header asks for a 2^window_log window: the size is not
// pledged, so zstd keeps the window it was given.
std::string zstd_with_window(const std::string& data, int window_log) {
    std::unique_ptr<ZSTD_CCtx, size_t (*)(ZSTD_CCtx*)> cctx(ZSTD_createCCtx(), ZSTD_freeCCtx);
    REQUIRE_FALSE(ZSTD_isError(ZSTD_CCtx_setParameter(cctx.get(), ZSTD_c_windowLog, window_log)));
    std::string out(ZSTD_compressBound(data.size()) + 64, '\0');
    ZSTD_outBuffer o{out.data(), out.size(), 0};
    ZSTD_inBuffer i{data.data(), data.size(), 0};
    REQUIRE_FALSE(ZSTD_isError(ZSTD_compressStream2(cctx.get(), &o, &i, ZSTD_e_continue)));
    REQUIRE(ZSTD_compressStream2(cctx.get(), &o, &i, ZSTD_e_end) == 0);
    out.resize(o.pos);
    return out;
}

// The window a zstd frame asks for, read from its header by hand (RFC 8878
// 3.1.1.1): the Window_Descriptor, or the content size of a single-segment frame.
uint64_t zstd_window(std::string_view frame) {
    REQUIRE(frame.size() >= 6);
    REQUIRE(get_be32(frame, 0) == 0x28B52FFDu);  // magic 0xFD2FB528, little-endian on the wire
    const auto fhd = static_cast<unsigned char>(frame[4]);
    if (fhd & 0x20) {  // single segment: window = content size
        const int fcs_code = fhd >> 6;
        const size_t fcs_size = fcs_code == 0 ? 1 : (fcs_code == 1 ? 2 : (fcs_code == 2 ? 4 : 8));
        const size_t off = 5 + ((fhd & 3) == 0 ? 0 : (1u << ((fhd & 3) - 1)));
        uint64_t v = 0;
        for (size_t i = 0; i < fcs_size; ++i) v |= uint64_t{static_cast<unsigned char>(frame[off + i])} << (8 * i);
        return fcs_code == 1 ? v + 256 : v;
    }
    const auto wd = static_cast<unsigned char>(frame[5]);
    const uint64_t base = uint64_t{1} << (10 + (wd >> 3));
    return base + (base / 8) * (wd & 7);
}

}  // namespace

TEST_CASE("a deeply nested header is refused, not a crash", "[format][hostile]") {
    // 300 000 levels overflowed the stack in a deep copy (issue 13).
    const size_t depth = GENERATE(size_t{9}, size_t{300000});
    std::string nested = "{\"db_id\":" + std::string(depth, '[') + std::string(depth, ']') + "}";
    std::string snap = build_object(kSnapshotMagic, 1, nested, "");
    std::string seg = build_object(kSegmentMagic, 1, nested, "");

    auto ph = peek_snapshot_header(snap, "snap");
    REQUIRE_FALSE(ph.ok());
    CHECK(ph.error().kind == ErrorKind::Corrupt);
    CHECK(mentions(ph.error(), "nested deeper than 8"));
    CHECK(mentions(ph.error(), "snap"));
    auto sh = peek_segment_header(seg, "seg");
    REQUIRE_FALSE(sh.ok());
    CHECK(mentions(sh.error(), "nested deeper than 8"));
    auto ds = decode_segment(seg, "seg");
    REQUIRE_FALSE(ds.ok());
    CHECK(mentions(ds.error(), "nested deeper than 8"));
    std::mt19937 rng(1);
    Read r = read_snapshot(snap, "snap", rng, 100000);
    REQUIRE(r.error);
    CHECK(mentions(*r.error, "nested deeper than 8"));
}

TEST_CASE("untrusted JSON: depth and size limits, brackets in strings do not count", "[format][hostile]") {
    std::string why;
    CHECK(parse_untrusted_json("[[[[[[[[1]]]]]]]]", 100, &why).is_array());  // 8 deep: allowed
    CHECK(parse_untrusted_json("[[[[[[[[[1]]]]]]]]]", 100, &why).is_discarded());
    CHECK(why.find("nested deeper") != std::string::npos);
    CHECK(parse_untrusted_json("{\"a\":\"[[[[[[[[[[[[\\\"[[[[[[[[\"}", 100).is_object());
    CHECK(parse_untrusted_json("{\"a\":1}", 6, &why).is_discarded());
    CHECK(why.find("7 bytes, more than the 6-byte limit") != std::string::npos);
    CHECK(parse_untrusted_json("{\"a\":", 100, &why).is_discarded());
    CHECK(why == "not valid JSON");
    // Unbalanced closers cannot make room for deeper nesting.
    CHECK(parse_untrusted_json("]]]]]]]]]][[[[[[[[[1]]]]]]]]]", 100).is_discarded());
}

TEST_CASE("headers are capped at 1 MiB on both sides", "[format][hostile]") {
    // A preamble announcing more than the cap is refused before anything is read.
    std::string big(kMaxHeaderSize + 1, ' ');
    auto r = peek_snapshot_header(build_object(kSnapshotMagic, 1, big, ""), "snap");
    REQUIRE_FALSE(r.ok());
    CHECK(mentions(r.error(), "exceeds the 1048576-byte limit"));

    // The writer: a segment at the transaction cap, with the widest values,
    // stays under the header cap; one more transaction is refused.
    SegmentHeader h = sample_segment_header(Compression::Zstd, 512);
    h.db_id = std::string(1024, '\x01');  // escapes to 6 bytes each
    h.txns.assign(kMaxSegmentTxns, SegmentTxn{1, 4294967295u, std::numeric_limits<int64_t>::min()});
    std::vector<SegmentFrame> frames(kMaxSegmentTxns, SegmentFrame{1, PageBuf(std::string(512, 'x'))});
    std::string sha;
    std::string obj = encode_segment(h, frames, &sha);
    CHECK(get_be32(obj, 12) < kMaxHeaderSize);
    auto back = decode_segment(obj, "seg");
    REQUIRE(back.ok());
    CHECK(back->frames.size() == kMaxSegmentTxns);

    h.txns.push_back(SegmentTxn{1, 1, 1});
    frames.push_back(SegmentFrame{1, PageBuf(std::string(512, 'x'))});
    CHECK_THROWS_WITH(encode_segment(h, frames, &sha), Catch::Contains("more than the 8192 a segment may hold"));
    // And a reader refuses such a header.
    std::string text = segment_header_text(h);
    auto p = peek_segment_header(build_object(kSegmentMagic, 1, text, ""), "seg");
    REQUIRE_FALSE(p.ok());
    CHECK(mentions(p.error(), "more than the 8192 a segment may hold"));
}

TEST_CASE("a segment's declared size is capped before anything is decoded", "[format][hostile]") {
    SegmentHeader h = sample_segment_header(Compression::Zstd, 65536);
    h.txns = {{4294967295u, 10, 1}};  // 256 TiB of pages
    std::string obj = build_object(kSegmentMagic, 1, segment_header_text(h), zstd_compress(std::string(100, 'x')));
    auto r = decode_segment(obj, "seg");
    REQUIRE_FALSE(r.ok());
    CHECK(r.error().kind == ErrorKind::Corrupt);
    CHECK(mentions(r.error(), "a segment may hold"));
    // The writer never produces one.
    h.txns = {{16385, 10, 1}};  // just over 1 GiB at 64 KiB pages
    std::vector<SegmentFrame> frames;  // never looked at: the header is refused first
    CHECK_THROWS_WITH(encode_segment(h, frames, nullptr), Catch::Contains("a segment may hold"));
}

TEST_CASE("a decompression bomb segment stops at its declared size", "[format][hostile]") {
    // 64 MiB of records compress to a few KiB; the header claims 3 frames.
    const uint32_t psz = 4096;
    std::string rec(4 + psz, '\0');
    rec[3] = 1;  // page 1
    std::string body;
    for (int i = 0; i < (64 << 20) / static_cast<int>(rec.size()); ++i) body += rec;
    std::string z = zstd_compress(body);
    CHECK(z.size() < 64 * 1024);
    SegmentHeader h = sample_segment_header(Compression::Zstd, psz);
    h.txns = {{3, 1, 1}};
    std::string obj = build_object(kSegmentMagic, 1, segment_header_text(h), z);
    uint64_t frames_out = 0;
    auto r = for_each_segment_frame(obj, "bomb", nullptr, nullptr, [&](uint64_t, uint32_t, std::string_view) {
        ++frames_out;
        return Status{};
    });
    REQUIRE_FALSE(r.ok());
    CHECK(mentions(r.error(), "more frames than its txns list (3)"));
    CHECK(frames_out == 3);  // it stopped right there, not after inflating 64 MiB
    auto d = decode_segment(obj, "bomb");
    REQUIRE_FALSE(d.ok());
    CHECK(mentions(d.error(), "more frames than its txns list"));
}

TEST_CASE("a streamed segment gives the same frames as the in-memory decoder", "[format][segment]") {
    std::mt19937 rng(13);
    for (Compression c : {Compression::None, Compression::Zstd}) {
        SegmentHeader h = sample_segment_header(c);
        auto frames = sample_frames(rng, 6, 4096);
        std::string sha;
        std::string obj = encode_segment(h, frames, &sha);
        std::vector<SegmentFrame> got;
        std::optional<SegmentHeader> seen;
        auto r = for_each_segment_frame(
            obj, "seg", nullptr,
            [&](const SegmentHeader& sh) {
                CHECK(got.empty());  // the header comes before any frame
                seen = sh;
                return Status{};
            },
            [&](uint64_t i, uint32_t pgno, std::string_view page) {
                CHECK(i == got.size());
                got.push_back({pgno, PageBuf(page)});
                return Status{};
            });
        REQUIRE(r.ok());
        CHECK(*r == sha);
        REQUIRE(seen);
        check_same(*seen, h);
        REQUIRE(got.size() == frames.size());
        for (size_t i = 0; i < got.size(); ++i) CHECK((got[i].pgno == frames[i].pgno && got[i].page == frames[i].page));
        // An error from a callback stops the decoding and is passed on.
        auto stop = for_each_segment_frame(obj, "seg", nullptr, nullptr, [&](uint64_t i, uint32_t, std::string_view) {
            return i == 2 ? Status(make_error(ErrorKind::Io, "disk full", "NoSpace")) : Status{};
        });
        REQUIRE_FALSE(stop.ok());
        CHECK(stop.error().code == "NoSpace");
    }
}

TEST_CASE("zstd windows: the writer pins 2 MiB, readers refuse larger", "[format][hostile]") {
    // A tiny frame asking for a 128 MiB window (issue 13: it was allocated).
    std::string page(4096, 'a');
    std::string z = zstd_with_window(page, 27);
    REQUIRE(zstd_window(z) == (uint64_t{1} << 27));
    CHECK(z.size() < 100);
    SnapshotHeader sh = sample_snapshot_header(Compression::Zstd, 4096, 1);
    json hj = json::parse(header_json_of(write_snapshot(sh, {page}).bytes));
    hj.erase("frame_pages");  // one frame: format 1
    std::string snap = build_object(kSnapshotMagic, 1, hj.dump(), z);
    std::mt19937 rng(5);
    Read r = read_snapshot(snap, "snap", rng, 1 << 20);
    REQUIRE(r.error);
    CHECK(mentions(*r.error, "window larger than 2097152 bytes"));
    SegmentHeader gh = sample_segment_header(Compression::Zstd);
    gh.txns = {{1, 1, 1}};
    std::string rec(4, '\0');
    rec[3] = 1;
    rec += page;
    auto d = decode_segment(build_object(kSegmentMagic, 1, segment_header_text(gh), zstd_with_window(rec, 27)), "seg");
    REQUIRE_FALSE(d.ok());
    CHECK(mentions(d.error(), "window larger than"));
    // Within the limit is fine.
    auto ok = decode_segment(build_object(kSegmentMagic, 1, segment_header_text(gh), zstd_with_window(rec, kZstdWindowLog)), "seg");
    CHECK(ok.ok());

    // Our writer on an 8 MiB incompressible snapshot: the window stays at the pin.
    std::mt19937 prng(9);
    std::vector<std::string> pages;
    for (int i = 0; i < 2048; ++i) pages.push_back(random_bytes(prng, 4096));
    Written w = write_snapshot(sample_snapshot_header(Compression::Zstd, 4096, 2048), pages);
    CHECK(zstd_window(std::string_view(w.bytes).substr(16 + get_be32(w.bytes, 12))) <= (uint64_t{1} << kZstdWindowLog));
    std::mt19937 rrng(3);
    Read back = read_snapshot(w.bytes, "snap", rrng, 1 << 20);
    CHECK_FALSE(back.error);
    CHECK(back.pages.size() == 2048);
}

TEST_CASE("max_segment_object_size bounds any valid segment", "[format][hostile]") {
    CHECK(max_segment_object_size() > kMaxSegmentBodyBytes);
    CHECK(max_segment_object_size() < kMaxSegmentBodyBytes + (kMaxSegmentBodyBytes >> 4));
}

TEST_CASE("the state file reader refuses floats, out-of-range integers and deep nesting", "[format][hostile]") {
    auto state = [](const std::string& seq, const std::string& salt1, const std::string& extra = "") {
        return "{\"format\":1,\"bucket\":\"b\",\"db_id\":\"d\",\"generation\":\"g\",\"prev_sha256\":\"\","
               "\"seq\":" + seq + ",\"position\":{\"salt1\":" + salt1 +
               ",\"salt2\":2,\"frame\":3,\"cksum1\":4,\"cksum2\":5}" + extra + "}";
    };
    auto ok = parse_state_file(state("7", "1", ",\"db_size\":4096,\"db_ino\":12"), "s");
    REQUIRE(ok);
    CHECK(ok->seq == 7);
    CHECK(ok->position == WalPosition{1, 2, 3, 4, 5});
    CHECK(ok->db_size == 4096);
    CHECK(ok->db_ino == 12);
    CHECK(ok->db_mtime_ns == -1);
    // 1e30 into an integer was undefined behaviour (issue 13).
    CHECK_FALSE(parse_state_file(state("1e30", "1"), "s"));
    CHECK_FALSE(parse_state_file(state("7", "1e30"), "s"));
    CHECK_FALSE(parse_state_file(state("7", "4294967296"), "s"));  // salts are u32
    CHECK_FALSE(parse_state_file(state("-1", "1"), "s"));
    CHECK_FALSE(parse_state_file(state("7", "1", ",\"db_size\":1e30"), "s"));
    CHECK_FALSE(parse_state_file(state("7", "1", ",\"db_ino\":-5"), "s"));
    CHECK_FALSE(parse_state_file(state("7", "1", ",\"x\":" + std::string(100000, '[') + std::string(100000, ']')), "s"));
}

// ---- times as text (replicator/util.h: the status and the CLI share them) ----

TEST_CASE("times: printed and read back to the microsecond, offsets applied, fractions truncated", "[format][time]") {
    using bottomless::replicator::fmt_time_table_us;
    using bottomless::replicator::fmt_time_us;
    using bottomless::replicator::parse_time_us;
    const int64_t t = 1'772'361'737'123'456;  // 2026-03-01T10:42:17.123456Z
    CHECK(fmt_time_us(t) == "2026-03-01T10:42:17.123456Z");
    CHECK(fmt_time_table_us(t) == "2026-03-01 10:42:17.123456");
    CHECK(fmt_time_us(0) == "unknown");
    CHECK(fmt_time_table_us(0) == "-");
    CHECK(parse_time_us(fmt_time_us(t)) == t);
    CHECK(parse_time_us(fmt_time_table_us(t)) == t);
    CHECK(parse_time_us("2026-03-01T11:42:17.123456+01:00") == t);
    CHECK(parse_time_us("2026-03-01T09:12:17.123456-01:30") == t);
    CHECK(parse_time_us("2026-03-01T10:42:17.1234569Z") == t);  // never rounded up to a later instant
    CHECK(parse_time_us("2026-03-01") == t - 38'537'123'456);
    CHECK(parse_time_us(" 2026-03-01 10:42 UTC ") == t - 17'123'456);
    for (const char* bad : {"", "2026-02-30", "2026-13-01", "2026-03-01T25:00:00Z", "2026-03-01T10:42:17.Z",
                            "2026-03-01T10:42:17+24:00", "yesterday", "2026-03-01T10:42:17Zjunk"}) {
        INFO(bad);
        CHECK_FALSE(parse_time_us(bad).has_value());
    }
}
