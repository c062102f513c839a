// Retries through a fault-injecting proxy (tests/support/fault_proxy.h) placed
// between the client and the real server: the client must succeed within its
// budget when faults pass, give up with a clear error when they persist, and
// never turn a lost response into a duplicate or a false failure.
//
// libcurl itself resends a request once when a reused connection dies before
// any response byte; faults are therefore injected at least twice in a row
// where the test needs the client's own retry loop to act.
#include <catch2/catch.hpp>

#include <chrono>

#include "s3/client.h"
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

    explicit ProxiedClient(std::chrono::milliseconds budget = std::chrono::milliseconds(20'000)) {
        ClientConfig cfg = testing::server_config();
        direct = std::make_unique<Client>(cfg);
        proxy = std::make_unique<FaultProxy>("127.0.0.1", testing::server_port());
        cfg.endpoint = proxy->url();
        cfg.retry.max_elapsed = budget;
        cfg.retry.base_delay = std::chrono::milliseconds(20);
        cfg.retry.max_delay = std::chrono::milliseconds(500);
        cfg.low_speed_time = std::chrono::seconds(2);  // a stalled response times out fast
        client = std::make_unique<Client>(cfg);
    }
};

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
