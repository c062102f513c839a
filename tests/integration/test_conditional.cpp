// A server that ignores `If-None-Match: *` (it overwrites instead of
// answering 412), simulated by the fault proxy stripping the header from
// PUTs (and re-signing them): the S3 client detects it with a probe and
// checks create-only PUTs with HEADs, so neither a second writer nor the
// replicator ever overwrites an object; a taken segment key starts a new
// generation as a 412 does.
#include <catch2/catch.hpp>

#include <nlohmann/json.hpp>

#include "replicator/format.h"
#include "replicator/restore.h"
#include "support/fault_proxy.h"
#include "support/s3_env.h"
#include "support/sqlite_util.h"

using namespace bottomless;
using namespace bottomless::testing;

namespace {

// A proxy that turns the test server into one that ignores If-None-Match.
struct IgnoringServer {
    s3::ClientConfig base = server_config();
    std::unique_ptr<s3::Client> direct = std::make_unique<s3::Client>(base);
    FaultProxy proxy{"127.0.0.1", server_port()};
    IgnoringServer() {
        proxy.set_signing_key(base.credentials.access_key_id, base.credentials.secret_access_key);
        proxy.set_filter("PUT", "");
        proxy.inject_always(Fault::StripIfNoneMatch);
    }
    std::unique_ptr<s3::Client> client(s3::ClientConfig::ConditionalWrites mode) const {
        s3::ClientConfig c = base;
        c.endpoint = proxy.url();
        c.conditional_writes = mode;
        return std::make_unique<s3::Client>(c);
    }
};

}  // namespace

TEST_CASE("a server ignoring If-None-Match is detected and nothing is overwritten", "[s3][integration][conditional]") {
    IgnoringServer server;
    TestBucket bucket(*server.direct);
    using Mode = s3::ClientConfig::ConditionalWrites;
    s3::PutOptions create_only;
    create_only.if_none_match = true;

    // The simulation is real: a client that trusts the server overwrites.
    auto trusting = server.client(Mode::Trust);
    REQUIRE(trusting->put_object(bucket.name(), "d/trusted", "first", create_only).ok());
    REQUIRE(trusting->put_object(bucket.name(), "d/trusted", "second", create_only).ok());
    CHECK(*server.direct->get_object(bucket.name(), "d/trusted") == "second");
    CHECK(server.proxy.faults_injected() >= 2);

    // The same server as the default client sees it.
    auto a = server.client(Mode::Auto);
    auto b = server.client(Mode::Auto);
    REQUIRE(a->put_object(bucket.name(), "d/seg-1", "writer a", create_only).ok());
    CHECK(a->stats().conditional_writes_verified);
    // A second writer's create of the same key is refused; the object stays a's.
    auto theirs = b->put_object(bucket.name(), "d/seg-1", "writer b", create_only);
    REQUIRE_FALSE(theirs.ok());
    CHECK(theirs.error().kind == ErrorKind::Precondition);
    CHECK(b->stats().conditional_conflicts == 1);
    CHECK(*server.direct->get_object(bucket.name(), "d/seg-1") == "writer a");
    // Writing our own object again (a retry after a lost answer) is success.
    auto again = a->put_object(bucket.name(), "d/seg-1", "writer a", create_only);
    REQUIRE(again.ok());
    CHECK(again->recovered);
    // The probe left nothing behind.
    auto left = server.direct->list_all(bucket.name(), "d/");
    REQUIRE(left.ok());
    for (const auto& o : *left) CHECK(o.key.find("probe") == std::string::npos);

    SECTION("a server that honours it keeps the single PUT") {
        auto direct = server_client();
        REQUIRE(direct->put_object(bucket.name(), "d/seg-2", "x", create_only).ok());
        CHECK_FALSE(direct->stats().conditional_writes_verified);
        CHECK(direct->stats().heads == 0);
        CHECK(direct->stats().puts == 3);  // the probe's two creates, then the object
    }
}

TEST_CASE("replicator on a server ignoring If-None-Match never overwrites a taken segment key",
          "[vfs][integration][conditional]") {
    register_bottomless();
    IgnoringServer server;
    TestBucket bucket(*server.direct, "vfs");
    TempDir dir;
    const std::string uri = "file:" + dir.file("c.db") + "?vfs=bottomless&bucket=" + bucket.name() +
                            "&endpoint=" + server.proxy.url();
    Db db = open_db(uri);
    auto status = [&] { return nlohmann::json::parse(query_text(db.get(), "SELECT bottomless_status()")); };
    exec(db.get(), "PRAGMA journal_mode=wal; CREATE TABLE t(v); INSERT INTO t VALUES(1);");
    query_text(db.get(), "SELECT bottomless_flush(30000)");
    exec(db.get(), "INSERT INTO t VALUES(2);");
    query_text(db.get(), "SELECT bottomless_flush(30000)");
    auto st = status();
    const std::string gen = st["generation"];
    const uint64_t seq = st["segment"];
    REQUIRE(seq == 1);
    CHECK(query_text(db.get(), "SELECT bottomless_metrics()").find("bottomless_s3_conditional_writes_verified{database=\"" +
                                                                   dir.file("c.db") + "\",database_id=\"c.db\"} 1") !=
          std::string::npos);

    // Another writer's object sits at the next segment key.
    const std::string next = replicator::segment_key("c.db", gen, seq + 1);
    REQUIRE(server.direct->put_object(bucket.name(), next, "another writer's segment").ok());
    exec(db.get(), "INSERT INTO t VALUES(3);");
    std::string err;
    (void)try_exec(db.get(), "SELECT bottomless_flush(30000)", err);  // may report the conflict
    query_text(db.get(), "SELECT bottomless_flush(30000)");

    CHECK(*server.direct->get_object(bucket.name(), next) == "another writer's segment");
    st = status();
    CHECK(st["generation"] != gen);  // a new generation, as after a 412
    CHECK(st["pending_transactions"] == 0);
    CHECK(query_text(db.get(), "SELECT bottomless_metrics()").find("bottomless_s3_conditional_conflicts_total") !=
          std::string::npos);

    auto r = replicator::restore_database(*server.direct, bucket.name(), "c.db", dir.file("r.db"), {});
    REQUIRE(r.ok());
    Db check = open_db("file:" + dir.file("r.db") + "?immutable=1");
    CHECK(query_int(check.get(), "SELECT count(*) FROM t") == 3);
    CHECK(query_int(check.get(), "SELECT sum(v) FROM t") == 6);
}
