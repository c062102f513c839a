// Replication settings: environment, URI parameters (which win), validation.
#include <catch2/catch.hpp>

#include <cctype>
#include <map>

#include "replicator/config.h"

using namespace bottomless;
using namespace bottomless::replicator;

namespace {
s3::EnvLookup env_of(std::map<std::string, std::string> vars) {
    vars.emplace("AWS_ACCESS_KEY_ID", "id");
    vars.emplace("AWS_SECRET_ACCESS_KEY", "secret");
    vars.emplace("HOME", "/nonexistent");
    return [vars = std::move(vars)](std::string_view n) -> std::optional<std::string> {
        auto it = vars.find(std::string(n));
        if (it == vars.end()) return std::nullopt;
        return it->second;
    };
}
}  // namespace

TEST_CASE("defaults and the database id from the file name", "[config]") {
    auto c = load_config("/data/app.db", {}, env_of({}));
    REQUIRE(c.ok());
    CHECK(c->bucket == "bottomless");
    CHECK(c->db_id == "app.db");
    CHECK_FALSE(c->sync);
    CHECK(c->batch_interval == std::chrono::milliseconds(1000));
    CHECK(c->compression == Compression::Zstd);
    CHECK(c->initial_replication == InitialReplication::Error);
    CHECK(c->max_pending_bytes == 64ull << 20);
}

TEST_CASE("environment settings, overridden by URI parameters", "[config]") {
    auto env = env_of({{"LIBSQL_BOTTOMLESS_BUCKET", "envbucket"},
                       {"LIBSQL_BOTTOMLESS_SYNC", "1"},
                       {"LIBSQL_BOTTOMLESS_BATCH_INTERVAL_MS", "250"},
                       {"LIBSQL_BOTTOMLESS_DATABASE_ID", "envid"},
                       {"LIBSQL_BOTTOMLESS_INITIAL_REPLICATION", "force"},
                       {"LIBSQL_BOTTOMLESS_COMPRESSION", "none"}});
    auto c = load_config("/x/y.db", {}, env);
    REQUIRE(c.ok());
    CHECK(c->bucket == "envbucket");
    CHECK(c->sync);
    CHECK(c->batch_interval == std::chrono::milliseconds(250));
    CHECK(c->db_id == "envid");
    CHECK(c->initial_replication == InitialReplication::Force);
    CHECK(c->compression == Compression::None);

    auto u = load_config("/x/y.db", {{"bucket", "uribucket"}, {"sync", "0"}, {"vfs", "bottomless"}, {"mode", "rwc"}}, env);
    REQUIRE(u.ok());
    CHECK(u->bucket == "uribucket");
    CHECK_FALSE(u->sync);
}

TEST_CASE("bad values and unknown parameters name themselves", "[config]") {
    auto bad_env = load_config("/x/y.db", {}, env_of({{"LIBSQL_BOTTOMLESS_BATCH_INTERVAL_MS", "soon"}}));
    REQUIRE_FALSE(bad_env.ok());
    CHECK(bad_env.error().message.find("LIBSQL_BOTTOMLESS_BATCH_INTERVAL_MS=soon") != std::string::npos);
    auto unknown = load_config("/x/y.db", {{"bukket", "x"}}, env_of({}));
    REQUIRE_FALSE(unknown.ok());
    CHECK(unknown.error().message.find("unknown URI parameter 'bukket'") != std::string::npos);
    auto bad_id = load_config("/x/my db.db", {}, env_of({}));
    REQUIRE_FALSE(bad_id.ok());
    CHECK(bad_id.error().message.find("LIBSQL_BOTTOMLESS_DATABASE_ID") != std::string::npos);
}

TEST_CASE("database ids cannot contain a slash or be dot names", "[config]") {
    CHECK(validate_db_id("app.db").ok());
    CHECK(validate_db_id("A-b_c.9").ok());
    CHECK_FALSE(validate_db_id("a/b").ok());
    CHECK_FALSE(validate_db_id("..").ok());
    CHECK_FALSE(validate_db_id("").ok());
    CHECK_FALSE(validate_db_id("sp ace").ok());
}

TEST_CASE("endpoint addressing: the environment's choice stands, a URI endpoint is path-style", "[config]") {
    auto env = env_of({{"LIBSQL_BOTTOMLESS_ENDPOINT", "https://minio.internal:9000"},
                       {"LIBSQL_BOTTOMLESS_S3_PATH_STYLE", "0"}});
    auto c = load_config("/x/y.db", {}, env);
    REQUIRE(c.ok());
    CHECK(c->s3.endpoint == "https://minio.internal:9000");
    CHECK_FALSE(c->s3.path_style);
    auto u = load_config("/x/y.db", {{"endpoint", "http://127.0.0.1:7480/"}}, env);
    REQUIRE(u.ok());
    CHECK(u->s3.endpoint == "http://127.0.0.1:7480");
    CHECK(u->s3.path_style);
}

TEST_CASE("encryption settings: key or passphrase, URI over environment, never echoed", "[config][encryption]") {
    const std::string key = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
    auto none = load_config("/x/y.db", {}, env_of({}));
    REQUIRE(none.ok());
    CHECK(none->encryption.empty());

    auto from_env = load_config("/x/y.db", {}, env_of({{"LIBSQL_BOTTOMLESS_ENCRYPTION_KEY", key}}));
    REQUIRE(from_env.ok());
    CHECK(from_env->encryption.kind() == EncryptionSecret::Kind::Key);
    CHECK(from_env->encryption.material().size() == 32);

    // A URI setting replaces the environment's, even of the other kind.
    auto uri = load_config("/x/y.db", {{"encryption_passphrase", "pw"}},
                           env_of({{"LIBSQL_BOTTOMLESS_ENCRYPTION_KEY", key}}));
    REQUIRE(uri.ok());
    CHECK(uri->encryption.kind() == EncryptionSecret::Kind::Passphrase);
    CHECK(uri->encryption.material() == "pw");

    auto both = load_config("/x/y.db", {},
                            env_of({{"LIBSQL_BOTTOMLESS_ENCRYPTION_KEY", key},
                                    {"LIBSQL_BOTTOMLESS_ENCRYPTION_PASSPHRASE", "pw"}}));
    REQUIRE_FALSE(both.ok());
    CHECK(both.error().message.find("both set") != std::string::npos);
    CHECK_FALSE(load_config("/x/y.db", {{"encryption_key", key}, {"encryption_passphrase", "pw"}}, env_of({})).ok());

    const std::string short_key = key.substr(0, 60);
    for (auto r : {load_config("/x/y.db", {{"encryption_key", short_key}}, env_of({})),
                   load_config("/x/y.db", {}, env_of({{"LIBSQL_BOTTOMLESS_ENCRYPTION_KEY", short_key}}))}) {
        REQUIRE_FALSE(r.ok());
        std::string lower = r.error().message;
        for (char& c : lower) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
        CHECK(lower.find("encryption_key") != std::string::npos);  // names the setting
        CHECK(r.error().message.find(short_key.substr(4, 20)) == std::string::npos);
    }
}

TEST_CASE("a URI endpoint other than http or https and a bad bucket name are refused on open", "[config]") {
    // endpoint=file://localhost once made CreateBucket truncate a local file.
    for (const char* ep : {"file://localhost", "file:///etc/passwd", "ftp://host", "gopher://127.0.0.1:70"}) {
        CAPTURE(ep);
        auto c = load_config("/x/y.db", {{"endpoint", ep}, {"bucket", "b-ok"}}, env_of({}));
        REQUIRE_FALSE(c.ok());
        CHECK(c.error().code == "BadSetting");
        CHECK(c.error().message.find("http:// or https://") != std::string::npos);
    }
    for (const char* b : {"UPPER", "a", "has_underscore", "../x", "10.0.0.1", "x\x1b[2Jy"}) {
        CAPTURE(b);
        auto c = load_config("/x/y.db", {{"bucket", b}}, env_of({}));
        REQUIRE_FALSE(c.ok());
        CHECK(c.error().message.find("S3 bucket name") != std::string::npos);
        CHECK(c.error().message.find('\x1b') == std::string::npos);  // the value is escaped in the message
    }
    auto env = load_config("/x/y.db", {}, env_of({{"LIBSQL_BOTTOMLESS_ENDPOINT", "file://localhost"}}));
    REQUIRE_FALSE(env.ok());
    CHECK(env.error().code == "BadEndpoint");
}

TEST_CASE("max_requests_per_second: the environment's caps the process and a URI value one database", "[config]") {
    auto both = load_config("/d/a.db", {{"max_requests_per_second", "5"}},
                            env_of({{"LIBSQL_BOTTOMLESS_MAX_REQUESTS_PER_SECOND", "20"}}));
    REQUIRE(both.ok());
    CHECK(both->process_max_requests_per_second == 20);
    CHECK(both->s3.max_requests_per_second == 5);
    auto env_only = load_config("/d/a.db", {}, env_of({{"LIBSQL_BOTTOMLESS_MAX_REQUESTS_PER_SECOND", "2.5"}}));
    REQUIRE(env_only.ok());
    CHECK(env_only->process_max_requests_per_second == 2.5);
    CHECK(env_only->s3.max_requests_per_second == 2.5);
    auto uri_only = load_config("/d/a.db", {{"max_requests_per_second", "5"}}, env_of({}));
    REQUIRE(uri_only.ok());
    CHECK(uri_only->process_max_requests_per_second == 0);
    CHECK(uri_only->s3.max_requests_per_second == 5);
}
