// Restore from a hostile bucket (issue 13): objects planted with a valid
// trailer must make restore_database fail with a clear error, never exhaust
// memory or disk. Runs against the real S3 server; objects are built by hand.
#include <catch2/catch.hpp>
#include <sys/resource.h>
#include <unistd.h>
#include <zstd.h>

#include <nlohmann/json.hpp>
#include <string>

#include "replicator/format.h"
#include "replicator/restore.h"
#include "s3/crypto.h"
#include "support/object_bytes.h"
#include "support/s3_env.h"

using namespace bottomless;
using namespace bottomless::replicator;
using bottomless::testing::TestBucket;

namespace {

constexpr const char* kDb = "hostile.db";

void put_be32(std::string& out, uint32_t v) {
    for (int s = 24; s >= 0; s -= 8) out.push_back(static_cast<char>(v >> s));
}

std::string object(const char* magic, const std::string& header, const std::string& body) {
    std::string out(magic, 8);
    put_be32(out, 1);
    put_be32(out, static_cast<uint32_t>(header.size()));
    return bottomless::testing::with_trailer(out + header + body);
}

std::string snapshot_header(const std::string& gen, uint32_t page_size, uint32_t pages) {
    nlohmann::json pos = {{"salt1", 1}, {"salt2", 2}, {"frame", 0}, {"cksum1", 3}, {"cksum2", 4}};
    return nlohmann::json{{"db_id", kDb},          {"generation", gen}, {"page_size", page_size}, {"db_pages", pages},
                          {"created_us", 1},       {"last_commit_us", 1}, {"position", pos},     {"parent_generation", ""},
                          {"parent_seq", 0},       {"compression", "zstd"}}
        .dump();
}

// zstd of `n` copies of `rec`, streamed so the test itself stays small.
std::string zstd_repeat(const std::string& rec, uint64_t n) {
    std::unique_ptr<ZSTD_CCtx, size_t (*)(ZSTD_CCtx*)> c(ZSTD_createCCtx(), ZSTD_freeCCtx);
    std::string chunk;
    for (int i = 0; i < 256; ++i) chunk += rec;
    std::string out, buf(ZSTD_CStreamOutSize(), '\0');
    for (uint64_t done = 0; done < n; done += 256) {
        ZSTD_inBuffer in{chunk.data(), chunk.size(), 0};
        const auto mode = done + 256 >= n ? ZSTD_e_end : ZSTD_e_continue;
        for (;;) {
            ZSTD_outBuffer o{buf.data(), buf.size(), 0};
            size_t r = ZSTD_compressStream2(c.get(), &o, &in, mode);
            REQUIRE_FALSE(ZSTD_isError(r));
            out.append(buf.data(), o.pos);
            if (mode == ZSTD_e_end ? r == 0 : in.pos == in.size) break;
        }
    }
    return out;
}

long max_rss_kib() {
    struct rusage ru{};
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_maxrss;
}

}  // namespace

TEST_CASE("restore refuses a snapshot declaring more than the free space, before writing", "[hostile][restore]") {
    auto client = testing::server_client();
    TestBucket bucket(*client, "hostile-snap");
    const std::string gen = new_generation_id(1790000000000);
    // 2^32-2 pages of 64 KiB (256 TiB) in a few hundred bytes.
    std::string snap = object(kSnapshotMagic, snapshot_header(gen, 65536, 0xfffffffeu), std::string(64, '\0'));
    REQUIRE(client->put_object(bucket.name(), snapshot_key(kDb, gen), snap).ok());
    const std::string out = "/tmp/hostile-" + testing::unique_name("r") + ".db";
    RestoreOptions o;
    auto r = restore_database(*client, bucket.name(), kDb, out, o);
    REQUIRE_FALSE(r.ok());
    CHECK(r.error().code == "NoSpace");
    CHECK(r.error().message.find("4294967294 pages of 65536 bytes") != std::string::npos);
    CHECK(r.error().message.find("bytes free") != std::string::npos);
    CHECK(::access(out.c_str(), F_OK) != 0);
    CHECK(::access((out + ".restore-tmp").c_str(), F_OK) != 0);
}

TEST_CASE("restore streams a segment: memory stays small whatever it decodes to", "[hostile][restore]") {
    auto client = testing::server_client();
    TestBucket bucket(*client, "hostile-seg");
    const std::string gen = new_generation_id(1790000000000);
    const uint32_t psz = 4096;
    // A valid one-page snapshot.
    std::string snap;
    {
        SnapshotHeader h;
        h.db_id = kDb;
        h.generation = gen;
        h.page_size = psz;
        h.db_pages = 1;
        h.position = {1, 2, 0, 3, 4};
        SnapshotWriter w(h, [&](std::string_view p) -> Status {
            snap.append(p);
            return {};
        });
        REQUIRE(w.add_page(std::string(psz, '\0')).ok());
        REQUIRE(w.finish().ok());
    }
    REQUIRE(client->put_object(bucket.name(), snapshot_key(kDb, gen), snap).ok());
    const std::string snap_sha = s3::to_hex(reinterpret_cast<const unsigned char*>(snap.data() + snap.size() - 32), 32);

    // Segment 1 declares 131072 frames of page 1: 512 MiB decoded, ~20 KiB stored.
    const uint64_t frames = 131072;
    nlohmann::json pos0 = {{"salt1", 1}, {"salt2", 2}, {"frame", 0}, {"cksum1", 3}, {"cksum2", 4}};
    nlohmann::json pos1 = {{"salt1", 1}, {"salt2", 2}, {"frame", frames}, {"cksum1", 5}, {"cksum2", 6}};
    std::string header = nlohmann::json{{"db_id", kDb}, {"generation", gen}, {"seq", 1}, {"page_size", psz},
                                        {"start", pos0}, {"end", pos1}, {"prev_sha256", snap_sha},
                                        {"txns", {{{"frames", frames}, {"db_pages", 1}, {"commit_us", 2}}}},
                                        {"compression", "zstd"}}
                             .dump();
    std::string rec(4 + psz, '\0');
    rec[3] = 1;
    std::string seg = object(kSegmentMagic, header, zstd_repeat(rec, frames));
    CHECK(seg.size() < 64 * 1024);
    REQUIRE(client->put_object(bucket.name(), segment_key(kDb, gen, 1), seg).ok());

    const std::string out = "/tmp/hostile-" + testing::unique_name("r") + ".db";
    RestoreOptions o;
    o.integrity_check = IntegrityCheck::None;  // page 1 is zeros: not a database, and not the point
    const long before = max_rss_kib();
    auto r = restore_database(*client, bucket.name(), kDb, out, o);
    const long grown_mib = (max_rss_kib() - before) / 1024;
    ::unlink(out.c_str());
    ::unlink((out + "-bottomless").c_str());
    REQUIRE(r.ok());
    CHECK(r->transactions == 1);
    // In memory it was 512 MiB of frames (issue 13); streamed it is one page
    // (plus the download window of a few 8 MiB parts). AddressSanitizer keeps
    // freed blocks in quarantine, so resident memory there also counts what
    // was already released: a looser bound, still far below 512 MiB.
#if defined(__SANITIZE_ADDRESS__)
    CHECK(grown_mib < 160);
#else
    CHECK(grown_mib < 64);
#endif

    // One frame more than declared: the decoder stops at the first extra record.
    std::string bomb = object(kSegmentMagic, header, zstd_repeat(rec, frames + 256));
    REQUIRE(client->put_object(bucket.name(), segment_key(kDb, gen, 1), bomb).ok());
    auto b = restore_database(*client, bucket.name(), kDb, out, o);
    REQUIRE_FALSE(b.ok());
    CHECK(b.error().message.find("more frames than its txns list") != std::string::npos);
    CHECK(::access(out.c_str(), F_OK) != 0);
}

TEST_CASE("restore refuses a deeply nested header without crashing", "[hostile][restore]") {
    auto client = testing::server_client();
    TestBucket bucket(*client, "hostile-deep");
    const std::string gen = new_generation_id(1790000000000);
    std::string nested = "{\"db_id\":" + std::string(300000, '[') + std::string(300000, ']') + "}";
    REQUIRE(client->put_object(bucket.name(), snapshot_key(kDb, gen), object(kSnapshotMagic, nested, "")).ok());
    const std::string out = "/tmp/hostile-" + testing::unique_name("r") + ".db";
    auto r = restore_database(*client, bucket.name(), kDb, out, RestoreOptions{});
    REQUIRE_FALSE(r.ok());
    CHECK(r.error().kind == ErrorKind::Corrupt);
    CHECK(r.error().message.find("nested deeper than 8") != std::string::npos);
}
