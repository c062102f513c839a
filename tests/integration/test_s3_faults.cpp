// Retries through a fault-injecting proxy (tests/support/fault_proxy.h) placed
// between the client and the real server: the client must succeed within its
// budget when faults pass, give up with a clear error when they persist, and
// never turn a lost response into a duplicate or a false failure. The
// "[hostile]" cases make the proxy a misbehaving server (ignored Range,
// endless or trickling bodies, looping listings, foreign keys): the client
// must fail with a clear error, bounded in time and memory, or filter.
//
// libcurl itself resends a request once when a reused connection dies before
// any response byte; faults are therefore injected at least twice in a row
// where the test needs the client's own retry loop to act.
#include <catch2/catch.hpp>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <functional>
#include <mutex>
#include <new>
#include <stdexcept>
#include <thread>
#include <vector>

#include "s3/client.h"
#include "s3/log.h"
#include "support/fault_proxy.h"
#include "support/s3_env.h"

using namespace bottomless;
using namespace bottomless::s3;
using bottomless::testing::Fault;
using bottomless::testing::FaultProxy;
using bottomless::testing::TestBucket;

namespace {

struct ProxiedClient {
    std::unique_ptr<Client> direct;
    std::unique_ptr<FaultProxy> proxy;
    std::unique_ptr<Client> client;

    explicit ProxiedClient(std::chrono::milliseconds budget = std::chrono::milliseconds(20'000),
                           const std::function<void(ClientConfig&)>& tweak = {}) {
        ClientConfig cfg = testing::server_config();
        direct = std::make_unique<Client>(cfg);
        proxy = std::make_unique<FaultProxy>("127.0.0.1", testing::server_port());
        cfg.endpoint = proxy->url();
        cfg.retry.max_elapsed = budget;
        cfg.retry.base_delay = std::chrono::milliseconds(20);
        cfg.retry.max_delay = std::chrono::milliseconds(500);
        cfg.low_speed_time = std::chrono::seconds(2);  // a stalled response times out fast
        if (tweak) tweak(cfg);
        client = std::make_unique<Client>(cfg);
    }
};

// Log lines captured while it lives.
struct LogCapture {
    std::mutex mu;
    std::vector<std::string> lines;
    LogCapture() {
        log::set_sink([this](log::Level, std::string_view l) {
            std::lock_guard lock(mu);
            lines.emplace_back(l);
        });
    }
    ~LogCapture() { log::set_sink(nullptr); }
    int count(const std::string& needle) {
        std::lock_guard lock(mu);
        return static_cast<int>(std::count_if(lines.begin(), lines.end(),
                                              [&](const std::string& l) { return l.find(needle) != std::string::npos; }));
    }
};

double seconds_since(std::chrono::steady_clock::time_point t0) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

TEST_CASE("transient faults on a PUT are retried until it succeeds", "[s3][integration][faults]") {
    ProxiedClient pc;
    TestBucket bucket(*pc.direct);
    // (A PUT's answer has no body, so there is nothing to truncate.)
    auto fault = GENERATE(Fault::ResetBeforeRequest, Fault::Status503SlowDown, Fault::Status500, Fault::DropResponse);
    CAPTURE(static_cast<int>(fault));
    std::string data(64 * 1024, 'x');
    REQUIRE(pc.client->put_object(bucket.name(), "warm", "up").ok());  // a kept-alive connection exists
    pc.proxy->set_filter("PUT", "/" + bucket.name() + "/obj");
    pc.proxy->inject(fault, 3);
    auto r = pc.client->put_object(bucket.name(), "obj", data);
    REQUIRE(r.ok());
    CHECK(pc.proxy->faults_injected() == 3);
    CHECK(pc.client->stats().retries >= 2);
    CHECK(*pc.direct->get_object(bucket.name(), "obj") == data);
}

TEST_CASE("transient faults on a GET are retried until it succeeds", "[s3][integration][faults]") {
    ProxiedClient pc;
    TestBucket bucket(*pc.direct);
    auto fault = GENERATE(Fault::ResetBeforeRequest, Fault::Status503SlowDown, Fault::Status500, Fault::TruncateBody,
                          Fault::DropResponse);
    CAPTURE(static_cast<int>(fault));
    std::string data(64 * 1024, 'y');
    REQUIRE(pc.direct->put_object(bucket.name(), "obj", data).ok());
    REQUIRE(pc.client->get_object(bucket.name(), "obj").ok());  // a kept-alive connection exists
    pc.proxy->set_filter("GET", "/" + bucket.name() + "/obj");
    pc.proxy->inject(fault, 3);
    auto r = pc.client->get_object(bucket.name(), "obj");
    REQUIRE(r.ok());
    CHECK(*r == data);  // a truncated attempt must not leave bytes behind
    CHECK(pc.proxy->faults_injected() == 3);
    CHECK(pc.client->stats().retries >= 2);
}

TEST_CASE("a stalled response is abandoned and retried", "[s3][integration][faults]") {
    ProxiedClient pc;
    TestBucket bucket(*pc.direct);
    REQUIRE(pc.direct->put_object(bucket.name(), "obj", "value").ok());
    pc.proxy->set_stall_ms(10'000);
    pc.proxy->set_filter("GET", "/" + bucket.name() + "/obj");
    pc.proxy->inject(Fault::Stall, 2);
    auto t0 = std::chrono::steady_clock::now();
    auto r = pc.client->get_object(bucket.name(), "obj");
    REQUIRE(r.ok());
    CHECK(*r == "value");
    CHECK(std::chrono::steady_clock::now() - t0 < std::chrono::seconds(9));
}

TEST_CASE("a lost response to a conditional create is recognised as our own write", "[s3][integration][faults]") {
    ProxiedClient pc;
    TestBucket bucket(*pc.direct);
    REQUIRE(pc.client->put_object(bucket.name(), "warm", "up").ok());
    PutOptions create_only;
    create_only.if_none_match = true;
    pc.proxy->set_filter("PUT", "/" + bucket.name() + "/segment");
    pc.proxy->inject(Fault::DropResponse, 2);  // stored by the server, answer lost (twice: curl resends once)
    auto r = pc.client->put_object(bucket.name(), "segment", "payload", create_only);
    REQUIRE(r.ok());
    CHECK(r->recovered);
    CHECK(*pc.direct->get_object(bucket.name(), "segment") == "payload");

    SECTION("but another writer's object under the key is still a refusal") {
        REQUIRE(pc.direct->put_object(bucket.name(), "taken", "theirs").ok());
        pc.proxy->set_filter("PUT", "/" + bucket.name() + "/taken");
        pc.proxy->inject(Fault::Status503SlowDown, 1);
        auto mine = pc.client->put_object(bucket.name(), "taken", "mine", create_only);
        REQUIRE_FALSE(mine.ok());
        CHECK(mine.error().kind == ErrorKind::Precondition);
        CHECK(*pc.direct->get_object(bucket.name(), "taken") == "theirs");
    }
}

TEST_CASE("multipart upload survives faults on parts and on completion", "[s3][integration][faults][multipart]") {
    ProxiedClient pc;
    TestBucket bucket(*pc.direct);
    std::string data(12u << 20, '\0');
    for (size_t i = 0; i < data.size(); ++i) data[i] = static_cast<char>(i * 2654435761u >> 13);
    SECTION("a part is reset twice") {
        pc.proxy->set_filter("PUT", "partNumber=2");
        pc.proxy->inject(Fault::ResetBeforeRequest, 2);
    }
    SECTION("the completion's response is lost") {
        pc.proxy->set_filter("POST", "uploadId=");
        pc.proxy->inject(Fault::DropResponse, 2);
    }
    auto w = pc.client->open_writer(bucket.name(), "mp");
    REQUIRE(w->write(data).ok());
    auto r = w->finish();
    REQUIRE(r.ok());
    CHECK(r->parts == 2);
    auto back = pc.direct->get_object(bucket.name(), "mp");
    REQUIRE(back.ok());
    CHECK(*back == data);
}

TEST_CASE("persistent faults end in a clear error within the budget", "[s3][integration][faults]") {
    ProxiedClient pc(std::chrono::milliseconds(3'000));
    TestBucket bucket(*pc.direct);
    pc.proxy->inject_always(Fault::Status503SlowDown);
    auto t0 = std::chrono::steady_clock::now();
    auto r = pc.client->put_object(bucket.name(), "k", "v");
    auto took = std::chrono::steady_clock::now() - t0;
    REQUIRE_FALSE(r.ok());
    CHECK(r.error().kind == ErrorKind::Throttled);
    CHECK(r.error().code == "SlowDown");
    CHECK(r.error().message.find("gave up after") != std::string::npos);
    CHECK(took < std::chrono::seconds(5));
    CHECK(pc.client->stats().requests >= 3);

    SECTION("and a dead endpoint is a transport error naming it") {
        ClientConfig cfg = testing::server_config();
        cfg.endpoint = "http://127.0.0.1:9";  // discard port: nothing listens
        cfg.retry.max_elapsed = std::chrono::milliseconds(1'000);
        Client dead(cfg);
        auto d = dead.get_object(bucket.name(), "k");
        REQUIRE_FALSE(d.ok());
        CHECK(d.error().kind == ErrorKind::Transport);
        CHECK(d.error().code == "CURLE_COULDNT_CONNECT");
        CHECK(d.error().message.find("reachable") != std::string::npos);
    }
}

// ---- a misbehaving server ---------------------------------------------------

TEST_CASE("a server that ignores Range cannot push a whole object into a ranged read", "[s3][integration][faults][hostile]") {
    ProxiedClient pc(std::chrono::milliseconds(20'000), [](ClientConfig& c) {
        c.multipart_threshold = 5u << 20;  // so get_object_to_file goes ranged on a small object
        c.part_size = 5u << 20;
    });
    TestBucket bucket(*pc.direct);
    std::string big(12u << 20, 'b');
    const std::string small = "0123456789abcdefghij";
    REQUIRE(pc.direct->put_object(bucket.name(), "big", big).ok());
    REQUIRE(pc.direct->put_object(bucket.name(), "small", small).ok());
    pc.proxy->set_filter("GET", "/" + bucket.name() + "/");
    pc.proxy->inject_always(Fault::IgnoreRange);
    const auto received_before = pc.client->stats().bytes_received;

    SECTION("a 4 KiB header read of a large object is refused before its body") {
        auto r = pc.client->get_object(bucket.name(), "big", ByteRange{0, 4096});
        REQUIRE_FALSE(r.ok());
        CHECK(r.error().kind == ErrorKind::Corrupt);
        CHECK(r.error().code == "RangeIgnored");
        CHECK(r.error().message.find("ignores the Range header") != std::string::npos);
        CHECK(pc.client->stats().bytes_received - received_before <= 4096);
        CHECK(pc.client->stats().retries == 0);  // the same server would do it again
    }
    SECTION("a range inside a small object is not served by the whole object") {
        auto r = pc.client->get_object(bucket.name(), "small", ByteRange{10, 5});
        REQUIRE_FALSE(r.ok());
        CHECK(r.error().code == "RangeIgnored");
    }
    SECTION("a range from 0 covering the whole object accepts the whole object (documented)") {
        auto r = pc.client->get_object(bucket.name(), "small", ByteRange{0, 4096});
        REQUIRE(r.ok());
        CHECK(*r == small);
    }
    SECTION("the parallel ranged download to a file fails and leaves no file") {
        auto path = std::filesystem::temp_directory_path() / testing::unique_name("ignored-range");
        auto r = pc.client->get_object_to_file(bucket.name(), "big", path.string());
        REQUIRE_FALSE(r.ok());
        CHECK(r.error().code == "RangeIgnored");
        CHECK_FALSE(std::filesystem::exists(path));
        CHECK_FALSE(std::filesystem::exists(path.string() + ".part"));
    }
}

TEST_CASE("an endless body is cut off at the cap of the call", "[s3][integration][faults][hostile]") {
    ProxiedClient pc;
    TestBucket bucket(*pc.direct);
    REQUIRE(pc.direct->put_object(bucket.name(), "obj", "x").ok());
    pc.proxy->set_filter("GET", "/" + bucket.name());
    pc.proxy->inject_always(Fault::EndlessBody);
    const auto t0 = std::chrono::steady_clock::now();

    SECTION("a GET into memory with a caller's cap") {
        auto r = pc.client->get_object(bucket.name(), "obj", std::nullopt, nullptr, 1u << 20);
        REQUIRE_FALSE(r.ok());
        CHECK(r.error().kind == ErrorKind::Corrupt);
        CHECK(r.error().code == "ResponseTooLarge");
        CHECK(pc.client->stats().bytes_received <= (1u << 20));
    }
    SECTION("a listing page: XML answers are capped at a few MiB") {
        auto r = pc.client->list_all(bucket.name(), "");
        REQUIRE_FALSE(r.ok());
        CHECK(r.error().code == "ResponseTooLarge");
        CHECK(pc.client->stats().bytes_received <= http::kMaxSmallBody);
    }
    SECTION("a download to a file stops at the size its HEAD announced") {
        auto path = std::filesystem::temp_directory_path() / testing::unique_name("endless");
        auto r = pc.client->get_object_to_file(bucket.name(), "obj", path.string());
        REQUIRE_FALSE(r.ok());
        CHECK(r.error().code == "ResponseTooLarge");
        CHECK_FALSE(std::filesystem::exists(path));
    }
    CHECK(seconds_since(t0) < 10);
    // The client hung up soon after its cap: the proxy did not stream on.
    CHECK(pc.proxy->bytes_sent_by_faults() < (64ll << 20));
}

TEST_CASE("a trickling server is abandoned at the request's deadline", "[s3][integration][faults][hostile]") {
    // 20 bytes/s passes the low-speed rule (1 byte/s); only the deadline stops it.
    ProxiedClient pc(std::chrono::milliseconds(2'000));
    TestBucket bucket(*pc.direct);
    REQUIRE(pc.direct->put_object(bucket.name(), "obj", std::string(64 * 1024, 't')).ok());
    pc.proxy->set_trickle(4, 200);
    pc.proxy->set_filter("", "/" + bucket.name() + "/obj");
    pc.proxy->inject_always(Fault::Trickle);
    const auto t0 = std::chrono::steady_clock::now();

    SECTION("a GET, within the retry budget") {
        auto r = pc.client->get_object(bucket.name(), "obj");
        REQUIRE_FALSE(r.ok());
        CHECK(r.error().kind == ErrorKind::Transport);
        CHECK(r.error().code == "CURLE_OPERATION_TIMEDOUT");
        CHECK(r.error().message.find("deadline") != std::string::npos);
        CHECK(seconds_since(t0) < 6);
    }
    SECTION("a PUT whose answer trickles") {
        auto r = pc.client->put_object(bucket.name(), "obj", "new");
        REQUIRE_FALSE(r.ok());
        CHECK(r.error().code == "CURLE_OPERATION_TIMEDOUT");
        CHECK(seconds_since(t0) < 6);
    }
    SECTION("a caller's DeadlineScope is shorter than the retry budget") {
        DeadlineScope scope(std::chrono::milliseconds(700));
        auto r = pc.client->get_object(bucket.name(), "obj");
        REQUIRE_FALSE(r.ok());
        CHECK(r.error().kind == ErrorKind::Cancelled);
        CHECK(r.error().code == "DeadlineExceeded");
        CHECK(seconds_since(t0) < 1.8);
        SECTION("and a call after the deadline is not sent at all") {
            // The abandoned GET may still be counted by the proxy a moment
            // later (on a loaded machine): wait until its count settles.
            auto settled = [&] {
                int n = pc.proxy->requests_seen();
                for (int i = 0; i < 50; ++i) {
                    std::this_thread::sleep_for(std::chrono::milliseconds(100));
                    int m = pc.proxy->requests_seen();
                    if (m == n) return n;
                    n = m;
                }
                return n;
            };
            const int seen = settled();
            auto again = pc.client->head_object(bucket.name(), "obj");
            REQUIRE_FALSE(again.ok());
            CHECK(again.error().code == "DeadlineExceeded");
            CHECK(settled() == seen);
        }
    }
}

TEST_CASE("looping continuation tokens end a listing with a clear error", "[s3][integration][faults][hostile]") {
    ProxiedClient pc;
    TestBucket bucket(*pc.direct);
    for (const char* k : {"db/a", "db/b", "db/c"}) REQUIRE(pc.direct->put_object(bucket.name(), k, "x").ok());
    pc.proxy->set_filter("GET", "list-type=2");
    const auto t0 = std::chrono::steady_clock::now();

    SECTION("tokens A, B, A, B") {
        pc.proxy->inject_always(Fault::LoopTokens);
        auto r = pc.client->list_all(bucket.name(), "db/");
        REQUIRE_FALSE(r.ok());
        CHECK(r.error().kind == ErrorKind::Corrupt);
        CHECK(r.error().code == "ListLoop");
        CHECK(r.error().message.find("continuation token came back") != std::string::npos);
        CHECK(pc.proxy->requests_seen() <= 4);  // A, B, then A again is refused
    }
    SECTION("fresh tokens, the same page again") {
        pc.proxy->inject_always(Fault::ReplayListing);
        auto r = pc.client->list_all(bucket.name(), "db/");
        REQUIRE_FALSE(r.ok());
        CHECK(r.error().code == "ListOutOfOrder");
        CHECK(pc.proxy->requests_seen() <= 3);
    }
    CHECK(seconds_since(t0) < 5);
}

TEST_CASE("keys outside the requested prefix never leave the listing", "[s3][integration][faults][hostile]") {
    ProxiedClient pc;
    TestBucket bucket(*pc.direct);
    for (const char* k : {"db/gen1/snapshot", "db/gen1/0000000001", "db2/gen1/snapshot", "other/x"})
        REQUIRE(pc.direct->put_object(bucket.name(), k, "x").ok());
    // What a server ignoring `prefix` would add: other databases' keys, a
    // prefix shorter than the one asked for (it crashed list_generations), and
    // a control sequence meant for the operator's terminal.
    pc.proxy->set_foreign_listing({"db2/gen1/snapshot", "other/x", "db/gen1/\x1b]0;x\x07"}, {"d", "db/", "other/"});
    pc.proxy->set_filter("GET", "list-type=2");
    pc.proxy->inject_always(Fault::ForeignKeys);
    LogCapture logs;

    SECTION("a flat listing keeps only the prefix's keys") {
        auto all = pc.client->list_all(bucket.name(), "db/gen1/");
        REQUIRE(all.ok());
        std::vector<std::string> keys;
        for (const auto& o : *all) keys.push_back(o.key);
        std::sort(keys.begin(), keys.end());
        // The injected "db/gen1/<ESC>..." is under the prefix: kept, but only ever printed escaped.
        std::vector<std::string> expected{"db/gen1/0000000001", "db/gen1/\x1b]0;x\x07", "db/gen1/snapshot"};
        std::sort(expected.begin(), expected.end());
        CHECK(keys == expected);
        CHECK(logs.count("outside the requested prefix") == 1);
        CHECK(logs.count("\x1b") == 0);
    }
    SECTION("a delimited listing keeps only well-formed CommonPrefixes") {
        ListRequest req;
        req.prefix = "db/";
        req.delimiter = "/";
        std::vector<std::string> prefixes;
        uint64_t dropped = 0;
        REQUIRE(pc.client->list_objects(bucket.name(), req, [&](const ListPage& p) {
            prefixes.insert(prefixes.end(), p.common_prefixes.begin(), p.common_prefixes.end());
            for (const auto& o : p.objects) CHECK(o.key.rfind("db/", 0) == 0);
            dropped += p.dropped;
            return true;
        }).ok());
        CHECK(prefixes == std::vector<std::string>{"db/gen1/"});
        CHECK(dropped == 5);  // db2/..., other/x, "d", "db/" (not longer than the prefix), "other/"
    }
}

TEST_CASE("libcurl speaks only http and https, and the endpoint is checked before any request", "[s3][integration][hostile]") {
    auto victim = std::filesystem::temp_directory_path() / testing::unique_name("victim");
    { std::ofstream(victim) << "precious"; }
    SECTION("the HTTP layer refuses file:// outright") {
        http::ConnectionPool pool;
        http::Request req;
        req.method = "PUT";
        req.url = "file://" + victim.string();
        http::MemorySource empty("");
        req.body = &empty;
        auto resp = http::perform(pool, req, http::Timeouts{});
        CHECK(resp.curl_code != 0);
        CHECK(http::curl_code_name(resp.curl_code) == "CURLE_UNSUPPORTED_PROTOCOL");
    }
    SECTION("a client configured by hand with file:// fails every call with BadEndpoint") {
        ClientConfig cfg = testing::server_config();
        cfg.endpoint = "file://localhost";
        Client c(cfg);
        auto st = c.create_bucket("bucket");
        REQUIRE_FALSE(st.ok());
        CHECK(st.error().code == "BadEndpoint");
        CHECK(c.stats().requests == 0);
    }
    SECTION("an invalid bucket name is refused before it reaches a URL") {
        auto c = testing::server_client();
        auto r = c->get_object("../etc", "k");
        REQUIRE_FALSE(r.ok());
        CHECK(r.error().code == "InvalidBucketName");
        CHECK(c->stats().requests == 0);
    }
    std::ifstream in(victim);
    std::string content;
    std::getline(in, content);
    CHECK(content == "precious");
    std::filesystem::remove(victim);
}

TEST_CASE("plain http to another host is warned about once per process", "[s3][integration][log]") {
    LogCapture logs;
    ClientConfig cfg = testing::server_config();
    cfg.endpoint = "http://192.0.2.1:9000";  // TEST-NET-1: never contacted here
    Client a(cfg);
    Client b(cfg);
    cfg.endpoint = "http://127.0.0.1:9000";
    Client local(cfg);
    CHECK(logs.count("plain http") == 1);
}

TEST_CASE("an exception thrown by a sink never crosses libcurl", "[s3][integration][hostile]") {
    auto client = testing::server_client();
    TestBucket bucket(*client);
    REQUIRE(client->put_object(bucket.name(), "obj", std::string(300 * 1024, 'e')).ok());
    struct ThrowingSink final : http::BodySink {
        bool bad_alloc;
        explicit ThrowingSink(bool b) : bad_alloc(b) {}
        bool write(const char*, size_t) override {
            if (bad_alloc) throw std::bad_alloc();
            throw std::runtime_error("sink exploded");
        }
        bool reset() override { return true; }
    };
    ThrowingSink boom(false), oom(true);
    auto r = client->get_object_to_sink(bucket.name(), "obj", boom);
    REQUIRE_FALSE(r.ok());
    CHECK(r.error().kind == ErrorKind::Io);
    CHECK(r.error().code == "CallbackFailed");
    CHECK(r.error().message.find("sink exploded") != std::string::npos);
    auto m = client->get_object_to_sink(bucket.name(), "obj", oom);
    REQUIRE_FALSE(m.ok());
    CHECK(m.error().code == "OutOfMemory");
    CHECK(client->stats().retries == 0);
    // The pool is still usable afterwards.
    CHECK(client->get_object(bucket.name(), "obj").ok());
}
