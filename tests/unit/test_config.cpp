// Credentials chain and AWS file parsing, with an injected environment and
// temporary files (never the real ~/.aws).
#include <catch2/catch.hpp>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <unistd.h>

#include "s3/config.h"
#include "support/scratch.h"

namespace fs = std::filesystem;
using namespace bottomless;
using namespace bottomless::s3;
using bottomless::testing::ScratchDir;
using bottomless::testing::env_of;

namespace {



}  // namespace

TEST_CASE("INI parsing follows the AWS CLI's rules", "[config]") {
    auto ini = parse_ini(
        "# comment\n"
        "; another comment\n"
        "[default]\n"
        "aws_access_key_id = AKID1   \n"
        "AWS_Secret_Access_Key=secret1\n"
        "\n"
        "[profile   dev]\n"
        "region = eu-west-1\n"
        "s3 =\n"
        "  endpoint_url = http://localhost:9000\n"
        "  addressing_style = path\n"
        "output = json\n"
        "not a setting\n");
    CHECK(ini["default"]["aws_access_key_id"] == "AKID1");
    CHECK(ini["default"]["aws_secret_access_key"] == "secret1");
    CHECK(ini["profile dev"]["region"] == "eu-west-1");
    CHECK(ini["profile dev"]["s3.endpoint_url"] == "http://localhost:9000");
    CHECK(ini["profile dev"]["s3.addressing_style"] == "path");
    CHECK(ini["profile dev"]["output"] == "json");
    CHECK(ini["profile dev"].count("s3.output") == 0);
}

TEST_CASE("credentials come from the environment first", "[config]") {
    ScratchDir home{"bottomless-config"};
    home.write(".aws/credentials", "[default]\naws_access_key_id=FILEID\naws_secret_access_key=FILESECRET\n");
    auto c = resolve_credentials(env_of({{"HOME", home.path.string()},
                                         {"AWS_ACCESS_KEY_ID", "ENVID"},
                                         {"AWS_SECRET_ACCESS_KEY", "ENVSECRET"},
                                         {"AWS_SESSION_TOKEN", "ENVTOKEN"}}),
                                 "default");
    REQUIRE(c.ok());
    CHECK(c->access_key_id == "ENVID");
    CHECK(c->secret_access_key == "ENVSECRET");
    CHECK(c->session_token == "ENVTOKEN");
    CHECK(c->source == "environment");
}

TEST_CASE("credentials from the shared credentials file, by profile", "[config]") {
    ScratchDir home{"bottomless-config"};
    home.write(".aws/credentials",
               "[default]\naws_access_key_id=DEFID\naws_secret_access_key=DEFSECRET\n"
               "[prod]\naws_access_key_id = PRODID\naws_secret_access_key = PRODSECRET\naws_session_token = PRODTOKEN\n");
    SECTION("default profile") {
        auto c = resolve_credentials(env_of({{"HOME", home.path.string()}}), "default");
        REQUIRE(c.ok());
        CHECK(c->access_key_id == "DEFID");
    }
    SECTION("named profile via AWS_PROFILE") {
        auto cfg = config_from_env(env_of({{"HOME", home.path.string()}, {"AWS_PROFILE", "prod"}}));
        REQUIRE(cfg.ok());
        CHECK(cfg->credentials.access_key_id == "PRODID");
        CHECK(cfg->credentials.session_token == "PRODTOKEN");
    }
    SECTION("AWS_SHARED_CREDENTIALS_FILE overrides the path") {
        std::string other = home.write("elsewhere/creds", "[default]\naws_access_key_id=OTHER\naws_secret_access_key=S\n");
        auto c = resolve_credentials(env_of({{"HOME", home.path.string()}, {"AWS_SHARED_CREDENTIALS_FILE", other}}),
                                     "default");
        REQUIRE(c.ok());
        CHECK(c->access_key_id == "OTHER");
    }
}

TEST_CASE("credentials from the config file when the credentials file lacks them", "[config]") {
    ScratchDir home{"bottomless-config"};
    home.write(".aws/config", "[profile dev]\naws_access_key_id=CFGID\naws_secret_access_key=CFGSECRET\nregion=ap-south-1\n");
    auto cfg = config_from_env(env_of({{"HOME", home.path.string()}, {"AWS_PROFILE", "dev"}}));
    REQUIRE(cfg.ok());
    CHECK(cfg->credentials.access_key_id == "CFGID");
    CHECK(cfg->region == "ap-south-1");
}

TEST_CASE("no credentials anywhere names every place looked", "[config]") {
    ScratchDir home{"bottomless-config"};
    auto c = resolve_credentials(env_of({{"HOME", home.path.string()}, {"AWS_ACCESS_KEY_ID", "only-id"}}), "default");
    REQUIRE_FALSE(c.ok());
    CHECK(c.error().kind == ErrorKind::Auth);
    const std::string& m = c.error().message;
    CHECK(m.find("AWS_SECRET_ACCESS_KEY is not set") != std::string::npos);
    CHECK(m.find(home.path.string() + "/.aws/credentials (not found)") != std::string::npos);
    CHECK(m.find(home.path.string() + "/.aws/config (not found)") != std::string::npos);
}

TEST_CASE("region and endpoint resolution order", "[config]") {
    ScratchDir home{"bottomless-config"};
    home.write(".aws/config", "[default]\nregion=from-file\nendpoint_url=http://file-endpoint:1\n");
    std::map<std::string, std::string> base{{"HOME", home.path.string()},
                                            {"AWS_ACCESS_KEY_ID", "A"},
                                            {"AWS_SECRET_ACCESS_KEY", "S"}};
    SECTION("files alone") {
        auto cfg = config_from_env(env_of(base));
        REQUIRE(cfg.ok());
        CHECK(cfg->region == "from-file");
        CHECK(cfg->endpoint == "http://file-endpoint:1");
        CHECK(cfg->path_style);
    }
    SECTION("environment wins, bottomless's own variable first") {
        auto vars = base;
        vars["AWS_DEFAULT_REGION"] = "default-region";
        vars["AWS_REGION"] = "region";
        vars["AWS_ENDPOINT_URL"] = "http://generic:2";
        vars["AWS_ENDPOINT_URL_S3"] = "http://s3specific:3";
        vars["LIBSQL_BOTTOMLESS_ENDPOINT"] = "http://127.0.0.1:7480/";
        auto cfg = config_from_env(env_of(vars));
        REQUIRE(cfg.ok());
        CHECK(cfg->region == "region");
        CHECK(cfg->endpoint == "http://127.0.0.1:7480");
    }
    SECTION("no endpoint means AWS with virtual-hosted addressing and us-east-1") {
        ScratchDir empty{"bottomless-config"};
        auto vars = base;
        vars["HOME"] = empty.path.string();
        auto cfg = config_from_env(env_of(vars));
        REQUIRE(cfg.ok());
        CHECK(cfg->endpoint.empty());
        CHECK_FALSE(cfg->path_style);
        CHECK(cfg->region == "us-east-1");
    }
    SECTION("AWS_CA_BUNDLE is honoured") {
        auto vars = base;
        vars["AWS_CA_BUNDLE"] = "/etc/ssl/custom.pem";
        auto cfg = config_from_env(env_of(vars));
        REQUIRE(cfg.ok());
        CHECK(cfg->ca_bundle == "/etc/ssl/custom.pem");
        CHECK(cfg->verify_tls);
    }
}

TEST_CASE("an endpoint must be an http or https URL naming a host", "[config]") {
    for (const char* ok : {"http://127.0.0.1:7480", "https://s3.eu-west-1.amazonaws.com", "HTTPS://Minio.local",
                           "http://[::1]:9000", "https://s3.example.com/ignored/path", "http://my_host:1"}) {
        CAPTURE(ok);
        CHECK(validate_endpoint(ok).ok());
    }
    for (const char* bad : {"file://localhost", "file:///etc/passwd", "ftp://host", "gopher://127.0.0.1:70",
                            "dict://127.0.0.1:11211", "ldap://h", "scp://h", "http://", "http://:80", "http://host:",
                            "http://host:0", "http://host:99999", "http://host:12a", "http://user:pw@host",
                            "http://host?x=1", "http://host#f", "http://ho st", "http://host\r\nX: y", "host",
                            "http://[::1", "http://h\xc3\xa9"}) {
        CAPTURE(bad);
        auto st = validate_endpoint(bad);
        REQUIRE_FALSE(st.ok());
        CHECK(st.error().kind == ErrorKind::InvalidArgument);
        CHECK(st.error().code == "BadEndpoint");
        CHECK(st.error().message.find("http:// or https://") != std::string::npos);
        CHECK(st.error().message.find('\r') == std::string::npos);
    }
}

TEST_CASE("a file:// endpoint is refused when the configuration is read", "[config]") {
    ScratchDir home{"bottomless-config"};
    std::map<std::string, std::string> vars{{"HOME", home.path.string()},
                                            {"AWS_ACCESS_KEY_ID", "A"},
                                            {"AWS_SECRET_ACCESS_KEY", "S"}};
    SECTION("from bottomless's variable") {
        vars["LIBSQL_BOTTOMLESS_ENDPOINT"] = "file://localhost";
        auto cfg = config_from_env(env_of(vars));
        REQUIRE_FALSE(cfg.ok());
        CHECK(cfg.error().message.find("LIBSQL_BOTTOMLESS_ENDPOINT") != std::string::npos);
        CHECK(cfg.error().message.find("scheme 'file' is not supported") != std::string::npos);
    }
    SECTION("from the AWS profile") {
        home.write(".aws/config", "[default]\nendpoint_url=ftp://files.example.com\n");
        auto cfg = config_from_env(env_of(vars));
        REQUIRE_FALSE(cfg.ok());
        CHECK(cfg.error().message.find("endpoint_url") != std::string::npos);
    }
    SECTION("a scheme-less value still becomes https") {
        vars["AWS_ENDPOINT_URL"] = "s3.example.com:9000";
        auto cfg = config_from_env(env_of(vars));
        REQUIRE(cfg.ok());
        CHECK(cfg->endpoint == "https://s3.example.com:9000");
    }
}

TEST_CASE("bucket names follow S3's rules", "[config]") {
    const std::string longest(63, 'a');
    for (const std::string& ok : {std::string("bottomless"), std::string("abc"), std::string("my-bucket.2026"),
                                  std::string("0numbers9"), longest}) {
        CAPTURE(ok);
        CHECK(validate_bucket_name(ok).ok());
    }
    for (std::string bad : {std::string("ab"), std::string(64, 'a'), std::string("My-Bucket"), std::string("under_score"),
                            std::string("-lead"), std::string("trail-"), std::string(".dot"), std::string("a..b"),
                            std::string("192.168.5.4"), std::string("a/b"), std::string("a?b"), std::string("a b"),
                            std::string("b\x1b[2J"), std::string("", 0)}) {
        CAPTURE(bad);
        auto st = validate_bucket_name(bad);
        REQUIRE_FALSE(st.ok());
        CHECK(st.error().code == "InvalidBucketName");
        CHECK(st.error().message.find('\x1b') == std::string::npos);
    }
}

TEST_CASE("loopback hosts are recognised for the plain-http warning", "[config]") {
    CHECK(is_loopback_host("127.0.0.1"));
    CHECK(is_loopback_host("127.1.2.3"));
    CHECK(is_loopback_host("localhost"));
    CHECK(is_loopback_host("::1"));
    CHECK_FALSE(is_loopback_host("127.0.0.1.evil.com"));
    CHECK_FALSE(is_loopback_host("10.0.0.1"));
    CHECK_FALSE(is_loopback_host("s3.amazonaws.com"));
    CHECK(endpoint_host("http://[::1]:7480/x") == "::1");
    CHECK(endpoint_host("http://127.0.0.1:7480") == "127.0.0.1");
    CHECK(endpoint_host("https://s3.example.com/p") == "s3.example.com");
}

TEST_CASE("conditional writes setting: auto by default, trust, verify, anything else refused", "[config]") {
    ScratchDir home{"bottomless-config"};
    std::map<std::string, std::string> base{{"HOME", home.path.string()},
                                            {"AWS_ACCESS_KEY_ID", "AKID"},
                                            {"AWS_SECRET_ACCESS_KEY", "secret"}};
    using Mode = ClientConfig::ConditionalWrites;
    auto with = [&](const std::string& v) {
        auto vars = base;
        vars["LIBSQL_BOTTOMLESS_S3_CONDITIONAL_WRITES"] = v;
        return config_from_env(env_of(vars));
    };
    auto dflt = config_from_env(env_of(base));
    REQUIRE(dflt.ok());
    CHECK(dflt->conditional_writes == Mode::Auto);
    CHECK(with("TRUST")->conditional_writes == Mode::Trust);
    CHECK(with("verify")->conditional_writes == Mode::Verify);
    auto bad = with("sometimes");
    REQUIRE_FALSE(bad.ok());
    CHECK(bad.error().code == "BadSetting");
    CHECK(bad.error().message.find("LIBSQL_BOTTOMLESS_S3_CONDITIONAL_WRITES") != std::string::npos);
}
