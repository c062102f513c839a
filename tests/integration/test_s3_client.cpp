// The S3 client against the real, signature-checking test server (Ceph RGW).
#include <catch2/catch.hpp>

#include <fcntl.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <mutex>
#include <filesystem>
#include <fstream>
#include <random>
#include <set>
#include <thread>

#include "s3/client.h"
#include "s3/crypto.h"
#include "s3/http.h"
#include "s3/log.h"
#include "support/s3_env.h"

namespace fs = std::filesystem;
using namespace bottomless;
using namespace bottomless::s3;
using bottomless::testing::TestBucket;

namespace {

std::string random_bytes(size_t n, uint64_t seed) {
    std::mt19937_64 rng(seed);
    std::string s(n, '\0');
    for (size_t i = 0; i < n; i += 8) {
        uint64_t v = rng();
        std::memcpy(s.data() + i, &v, std::min<size_t>(8, n - i));
    }
    return s;
}

struct TempFile {
    fs::path path;
    explicit TempFile(const std::string& name) : path(fs::temp_directory_path() / testing::unique_name(name)) {}
    ~TempFile() {
        std::error_code ec;
        fs::remove(path, ec);
    }
};

}  // namespace

TEST_CASE("bucket creation is idempotent and a missing bucket is NoSuchBucket", "[s3][integration]") {
    auto client = testing::server_client();
    TestBucket bucket(*client);
    CHECK(client->create_bucket(bucket.name()).ok());  // again: already ours, fine
    CHECK(client->head_bucket(bucket.name()).ok());

    auto missing = testing::unique_name("missing");
    auto r = client->put_object(missing, "k", "v");
    REQUIRE_FALSE(r.ok());
    CHECK(r.error().kind == ErrorKind::NotFound);
    CHECK(r.error().code == "NoSuchBucket");
    CHECK(r.error().message.find(missing) != std::string::npos);
    auto h = client->head_bucket(missing);
    REQUIRE_FALSE(h.ok());
    CHECK(h.error().code == "NoSuchBucket");
    CHECK(client->stats().retries == 0);
}

TEST_CASE("put, get, head, range, delete of one object", "[s3][integration]") {
    auto client = testing::server_client();
    TestBucket bucket(*client);
    std::string data = random_bytes(100'000, 1);
    PutOptions opts;
    opts.content_type = "application/octet-stream";
    opts.metadata = {{"generation", "0001"}};
    auto put = client->put_object(bucket.name(), "dir/obj", data, opts);
    REQUIRE(put.ok());
    CHECK(put->etag == to_hex(md5(data)));

    ObjectInfo info;
    auto got = client->get_object(bucket.name(), "dir/obj", std::nullopt, &info);
    REQUIRE(got.ok());
    CHECK(*got == data);
    CHECK(info.size == data.size());

    auto head = client->head_object(bucket.name(), "dir/obj");
    REQUIRE(head.ok());
    CHECK(head->size == data.size());
    CHECK(head->etag == put->etag);
    REQUIRE(head->metadata.size() == 1);
    CHECK(head->metadata[0] == std::pair<std::string, std::string>{"generation", "0001"});

    SECTION("byte ranges") {
        auto mid = client->get_object(bucket.name(), "dir/obj", ByteRange{1000, 4096});
        REQUIRE(mid.ok());
        CHECK(*mid == data.substr(1000, 4096));
        auto tail = client->get_object(bucket.name(), "dir/obj", ByteRange{99'990, std::nullopt});
        REQUIRE(tail.ok());
        CHECK(*tail == data.substr(99'990));
    }
    SECTION("delete, then the key is gone") {
        REQUIRE(client->delete_object(bucket.name(), "dir/obj").ok());
        auto gone = client->get_object(bucket.name(), "dir/obj");
        REQUIRE_FALSE(gone.ok());
        CHECK(gone.error().kind == ErrorKind::NotFound);
        CHECK(gone.error().code == "NoSuchKey");
        auto gone_head = client->head_object(bucket.name(), "dir/obj");
        REQUIRE_FALSE(gone_head.ok());
        CHECK(gone_head.error().kind == ErrorKind::NotFound);
        CHECK(client->delete_object(bucket.name(), "dir/obj").ok());  // deleting nothing is fine in S3
    }
    SECTION("an empty object") {
        REQUIRE(client->put_object(bucket.name(), "empty", "").ok());
        auto e = client->get_object(bucket.name(), "empty");
        REQUIRE(e.ok());
        CHECK(e->empty());
    }
}

TEST_CASE("keys with special characters round-trip", "[s3][integration]") {
    auto client = testing::server_client();
    TestBucket bucket(*client);
    const std::vector<std::string> keys = {
        "with space", "plus+sign", "equals=sign", "amp&ersand", "tilde~", "deep/dir/path", "caf\xc3\xa9/\xe2\x82\xac",
        "semi;colon,comma", "quote'd\"", "percent%20literal", "star*paren()", "dollar$at@", "hash#frag", "q?mark",
        "lt<gt>", "dot/./seg", "dotdot/../seg", "double//slash",
    };
    for (const auto& k : keys) {
        CAPTURE(k);
        REQUIRE(client->put_object(bucket.name(), k, "value of " + k).ok());
    }
    for (const auto& k : keys) {
        CAPTURE(k);
        auto v = client->get_object(bucket.name(), k);
        REQUIRE(v.ok());
        CHECK(*v == "value of " + k);
    }
    auto listed = client->list_all(bucket.name(), "");
    REQUIRE(listed.ok());
    std::set<std::string> names;
    for (const auto& o : *listed) names.insert(o.key);
    CHECK(names == std::set<std::string>(keys.begin(), keys.end()));
}

TEST_CASE("2500 keys listed across pages, with prefix and delimiter", "[s3][integration]") {
    auto client = testing::server_client();
    TestBucket bucket(*client);
    // 2500 keys under "db/" in 5 "directories", plus look-alikes under "db2/".
    std::vector<std::string> keys;
    for (int i = 0; i < 2500; ++i) {
        char k[64];
        std::snprintf(k, sizeof k, "db/gen%d/seg-%05d", i % 5, i);
        keys.push_back(k);
    }
    for (int i = 0; i < 20; ++i) keys.push_back("db2/gen0/seg-" + std::to_string(i));
    std::atomic<size_t> next{0};
    std::atomic<int> failures{0};
    std::vector<std::thread> threads;
    for (int t = 0; t < 8; ++t)
        threads.emplace_back([&] {
            for (size_t i; (i = next.fetch_add(1)) < keys.size();)
                if (!client->put_object(bucket.name(), keys[i], "x")) failures.fetch_add(1);
        });
    for (auto& t : threads) t.join();
    REQUIRE(failures.load() == 0);

    SECTION("every page is followed") {
        uint64_t lists_before = client->stats().lists;
        auto all = client->list_all(bucket.name(), "db/");
        REQUIRE(all.ok());
        CHECK(all->size() == 2500);
        CHECK(client->stats().lists - lists_before == 3);  // 1000 + 1000 + 500
        std::set<std::string> unique;
        for (const auto& o : *all) unique.insert(o.key);
        CHECK(unique.size() == 2500);
    }
    SECTION("small pages with max-keys and start-after") {
        ListRequest req;
        req.prefix = "db/gen1/";
        req.max_keys = 100;
        req.start_after = "db/gen1/seg-01000";
        size_t n = 0, pages = 0;
        REQUIRE(client->list_objects(bucket.name(), req, [&](const ListPage& p) {
            ++pages;
            for (const auto& o : p.objects) {
                CHECK(o.key > "db/gen1/seg-01000");
                ++n;
            }
            return true;
        }).ok());
        CHECK(n == 300);  // gen1 holds 500 keys; 200 are at or before seg-01000
        CHECK(pages == 3);
    }
    SECTION("delimiter gives the directories, db2 does not leak into db/") {
        ListRequest req;
        req.prefix = "db/";
        req.delimiter = "/";
        std::vector<std::string> prefixes;
        REQUIRE(client->list_objects(bucket.name(), req, [&](const ListPage& p) {
            prefixes.insert(prefixes.end(), p.common_prefixes.begin(), p.common_prefixes.end());
            CHECK(p.objects.empty());
            return true;
        }).ok());
        CHECK(prefixes == std::vector<std::string>{"db/gen0/", "db/gen1/", "db/gen2/", "db/gen3/", "db/gen4/"});
    }
    SECTION("delete_objects removes thousands in 1000-key batches") {
        uint64_t deletes_before = client->stats().deletes;
        auto out = client->delete_objects(bucket.name(), keys);
        REQUIRE(out.ok());
        CHECK(out->failed.empty());
        CHECK(out->deleted.size() == keys.size());
        CHECK(client->stats().deletes - deletes_before == 3);
        auto left = client->list_all(bucket.name(), "");
        REQUIRE(left.ok());
        CHECK(left->empty());
    }
}

TEST_CASE("a 50 MiB file goes up multipart and comes back identical", "[s3][integration][multipart]") {
    auto client = testing::server_client();
    TestBucket bucket(*client);
    TempFile src("mp-src"), dst("mp-dst");
    std::string data = random_bytes(50u << 20, 42);
    { std::ofstream(src.path, std::ios::binary).write(data.data(), static_cast<std::streamsize>(data.size())); }

    uint64_t puts_before = client->stats().puts;
    auto put = client->put_object_from_file(bucket.name(), "big", src.path.string());
    REQUIRE(put.ok());
    CHECK(put->parts == 7);  // 8 MiB parts: 6 full + 1 of 2 MiB
    CHECK(client->stats().puts - puts_before == 9);  // create + 7 parts + complete

    auto head = client->head_object(bucket.name(), "big");
    REQUIRE(head.ok());
    CHECK(head->size == data.size());

    auto got = client->get_object_to_file(bucket.name(), "big", dst.path.string());
    REQUIRE(got.ok());
    CHECK(got->size == data.size());
    std::ifstream in(dst.path, std::ios::binary);
    std::string back((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    CHECK(back.size() == data.size());
    CHECK(sha256_hex(back) == sha256_hex(data));
    CHECK_FALSE(fs::exists(dst.path.string() + ".part"));
}

TEST_CASE("the streaming writer: one PUT when small, multipart when large", "[s3][integration][multipart]") {
    auto client = testing::server_client();
    TestBucket bucket(*client);
    SECTION("small") {
        auto w = client->open_writer(bucket.name(), "small");
        REQUIRE(w->write("hello ").ok());
        REQUIRE(w->write("world").ok());
        auto r = w->finish();
        REQUIRE(r.ok());
        CHECK(r->parts == 0);
        CHECK(*client->get_object(bucket.name(), "small") == "hello world");
    }
    SECTION("large, in odd-sized writes") {
        std::string data = random_bytes(20u << 20, 7);
        auto w = client->open_writer(bucket.name(), "large");
        for (size_t off = 0; off < data.size(); off += 1'000'003)
            REQUIRE(w->write(std::string_view(data).substr(off, 1'000'003)).ok());
        auto r = w->finish();
        REQUIRE(r.ok());
        CHECK(r->parts == 3);
        auto back = client->get_object(bucket.name(), "large");
        REQUIRE(back.ok());
        CHECK(sha256_hex(*back) == sha256_hex(data));
    }
    SECTION("abandoned: no object and no upload left") {
        {
            auto w = client->open_writer(bucket.name(), "abandoned");
            REQUIRE(w->write(random_bytes(9u << 20, 3)).ok());  // one part already sent
        }
        auto h = client->head_object(bucket.name(), "abandoned");
        REQUIRE_FALSE(h.ok());
        CHECK(h.error().kind == ErrorKind::NotFound);
    }
}

TEST_CASE("conditional create refuses an existing key", "[s3][integration]") {
    auto client = testing::server_client();
    TestBucket bucket(*client);
    PutOptions create_only;
    create_only.if_none_match = true;
    REQUIRE(client->put_object(bucket.name(), "once", "first", create_only).ok());
    auto again = client->put_object(bucket.name(), "once", "second", create_only);
    REQUIRE_FALSE(again.ok());
    CHECK(again.error().kind == ErrorKind::Precondition);
    CHECK(again.error().http_status == 412);
    CHECK(*client->get_object(bucket.name(), "once") == "first");
}

TEST_CASE("a wrong secret key is SignatureDoesNotMatch, reported clearly and not retried", "[s3][integration][auth]") {
    auto good = testing::server_client();
    TestBucket bucket(*good);
    auto cfg = testing::server_config();
    cfg.credentials.secret_access_key = "definitely-not-the-secret";
    Client bad(cfg);
    auto r = bad.put_object(bucket.name(), "k", "v");
    REQUIRE_FALSE(r.ok());
    CHECK(r.error().kind == ErrorKind::Auth);
    CHECK(r.error().code == "SignatureDoesNotMatch");
    CHECK(r.error().http_status == 403);
    CHECK(r.error().message.find("AWS_SECRET_ACCESS_KEY") != std::string::npos);
    CHECK(r.error().message.find("definitely-not-the-secret") == std::string::npos);
    CHECK(bad.stats().requests == 1);

    SECTION("an unknown access key id is InvalidAccessKeyId") {
        auto cfg2 = testing::server_config();
        cfg2.credentials.access_key_id = "NOSUCHKEYID";
        Client unknown(cfg2);
        auto r2 = unknown.get_object(bucket.name(), "k");
        REQUIRE_FALSE(r2.ok());
        CHECK(r2.error().kind == ErrorKind::Auth);
        CHECK(r2.error().code == "InvalidAccessKeyId");
        CHECK(unknown.stats().requests == 1);
    }
    SECTION("a clock an hour off is refused as skewed") {
        Client skewed(testing::server_config());
        skewed.set_clock([] { return std::chrono::system_clock::now() - std::chrono::hours(1); });
        auto r3 = skewed.get_object(bucket.name(), "k");
        REQUIRE_FALSE(r3.ok());
        CHECK(r3.error().kind == ErrorKind::Auth);
        CHECK(r3.error().code == "RequestTimeTooSkewed");
        CHECK(r3.error().message.find("clock") != std::string::npos);
    }
}

TEST_CASE("concurrent puts from 8 threads share the client", "[s3][integration][threads]") {
    auto client = testing::server_client();
    TestBucket bucket(*client);
    std::atomic<int> failures{0};
    std::vector<std::thread> threads;
    for (int t = 0; t < 8; ++t)
        threads.emplace_back([&, t] {
            for (int i = 0; i < 50; ++i) {
                std::string key = "t" + std::to_string(t) + "/" + std::to_string(i);
                if (!client->put_object(bucket.name(), key, random_bytes(4096, static_cast<uint64_t>(t * 1000 + i))))
                    failures.fetch_add(1);
            }
        });
    for (auto& t : threads) t.join();
    CHECK(failures.load() == 0);
    auto all = client->list_all(bucket.name(), "");
    REQUIRE(all.ok());
    CHECK(all->size() == 400);
    for (int t = 0; t < 8; ++t) {
        auto v = client->get_object(bucket.name(), "t" + std::to_string(t) + "/49");
        REQUIRE(v.ok());
        CHECK(*v == random_bytes(4096, static_cast<uint64_t>(t * 1000 + 49)));
    }
}

TEST_CASE("a presigned GET URL works without credentials", "[s3][integration]") {
    auto client = testing::server_client();
    TestBucket bucket(*client);
    REQUIRE(client->put_object(bucket.name(), "shared file", "presigned content").ok());
    std::string url = client->presign("GET", bucket.name(), "shared file", std::chrono::seconds(300));
    CHECK(url.find("X-Amz-Signature=") != std::string::npos);
    http::ConnectionPool pool;
    http::Request req;
    req.method = "GET";
    req.url = url;
    auto resp = http::perform(pool, req, http::Timeouts{});
    CHECK(resp.status == 200);
    CHECK(resp.body == "presigned content");
}

TEST_CASE("no secret reaches a log line, even at trace level", "[s3][integration][log]") {
    std::vector<std::string> lines;
    std::mutex mu;
    log::set_sink([&](log::Level, std::string_view l) {
        std::lock_guard lock(mu);
        lines.emplace_back(l);
    });
    auto saved = log::level();
    log::set_level(log::Level::Trace);

    auto cfg = testing::server_config();
    cfg.credentials.session_token = "SESSION-TOKEN-MUST-NOT-LEAK";  // RGW rejects it: exercises the error path too
    std::string secret = cfg.credentials.secret_access_key;
    {
        auto client = testing::server_client();
        TestBucket bucket(*client);
        REQUIRE(client->put_object(bucket.name(), "k", "v").ok());
        (void)client->get_object(bucket.name(), "missing");
        std::string url = client->presign("GET", bucket.name(), "k", std::chrono::seconds(60));
        std::string sig = url.substr(url.find("X-Amz-Signature=") + 16);
        Client with_token(cfg);
        (void)with_token.get_object(bucket.name(), "k");
        cfg.credentials.secret_access_key = "wrong-secret-must-not-leak";
        Client wrong(cfg);
        (void)wrong.get_object(bucket.name(), "k");
        log::set_level(saved);
        log::set_sink(nullptr);
        REQUIRE(lines.size() >= 4);
        for (const auto& l : lines) {
            CAPTURE(l);
            CHECK(l.find(secret) == std::string::npos);
            CHECK(l.find("wrong-secret-must-not-leak") == std::string::npos);
            CHECK(l.find("SESSION-TOKEN-MUST-NOT-LEAK") == std::string::npos);
            CHECK(l.find("Signature=") == std::string::npos);
            CHECK(l.find("Authorization") == std::string::npos);
            CHECK(l.find(sig) == std::string::npos);
        }
    }
}
