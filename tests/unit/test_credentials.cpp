// Credential sources without a server: the parsers (STS XML, container and
// IMDS JSON, credential_process JSON, ISO 8601, command lines), the
// container URL rule, the chain's choice, and the refresh logic with a fake
// source and an injected clock.
#include <catch2/catch.hpp>

#include <atomic>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <thread>
#include <unistd.h>

#include "s3/credentials.h"
#include "support/scratch.h"

namespace fs = std::filesystem;
using namespace bottomless;
using namespace bottomless::s3;
using bottomless::testing::ScratchDir;
using bottomless::testing::env_of;

namespace {



std::chrono::system_clock::time_point at(std::time_t t) { return std::chrono::system_clock::from_time_t(t); }

// A source that counts fetches and hands out numbered credentials.
struct FakeSource final : CredentialsSource {
    std::atomic<int>& fetches;
    std::function<std::chrono::system_clock::time_point()> expiry;
    std::atomic<bool>& fail;
    std::chrono::milliseconds delay{0};
    FakeSource(std::atomic<int>& f, std::function<std::chrono::system_clock::time_point()> e, std::atomic<bool>& fl)
        : fetches(f), expiry(std::move(e)), fail(fl) {}
    Result<ExpiringCredentials> fetch() override {
        int n = ++fetches;
        if (delay.count()) std::this_thread::sleep_for(delay);
        if (fail) return make_error(ErrorKind::Transport, "endpoint down", "Down");
        ExpiringCredentials c;
        c.credentials = Credentials("AKID" + std::to_string(n), "secret", "token" + std::to_string(n));
        c.expiration = expiry();
        return c;
    }
    std::string describe() const override { return "fake"; }
};

}  // namespace

TEST_CASE("ISO 8601 times as STS, IMDS and credential_process write them", "[credentials]") {
    CHECK(parse_iso8601("2019-11-09T13:34:41Z") == at(1573306481));
    CHECK(parse_iso8601("2019-11-09T13:34:41.123Z") == at(1573306481));
    CHECK(parse_iso8601("2019-11-09T14:34:41+01:00") == at(1573306481));
    CHECK(parse_iso8601("2019-11-09T12:34:41-01:00") == at(1573306481));
    for (const char* bad : {"", "2019-11-09", "2019-11-09T13:34:41", "2019-13-09T13:34:41Z", "2019-11-09T13:34:41Zx",
                            "2019-11-09T13:34:41.Z", "20191109T133441Z"})
        CHECK_FALSE(parse_iso8601(bad));
}

TEST_CASE("STS AssumeRole and AssumeRoleWithWebIdentity answers", "[credentials]") {
    std::string ok =
        "<AssumeRoleResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\"><AssumeRoleResult>"
        "<AssumedRoleUser><Arn>arn:aws:sts::123:assumed-role/r/s</Arn></AssumedRoleUser>"
        "<Credentials><AccessKeyId>ASIAEXAMPLE</AccessKeyId><SecretAccessKey>sec&amp;ret</SecretAccessKey>"
        "<SessionToken>TOKEN</SessionToken><Expiration>2019-11-09T13:34:41Z</Expiration></Credentials>"
        "</AssumeRoleResult></AssumeRoleResponse>";
    auto c = parse_sts_response(ok, "AssumeRole");
    REQUIRE(c.ok());
    CHECK(c->credentials.access_key_id == "ASIAEXAMPLE");
    CHECK(c->credentials.secret_access_key == "sec&ret");
    CHECK(c->credentials.session_token == "TOKEN");
    CHECK(c->expiration == at(1573306481));
    // The action must match: a web identity answer is not an AssumeRole one.
    CHECK_FALSE(parse_sts_response(ok, "AssumeRoleWithWebIdentity").ok());

    auto err = parse_sts_response(
        "<ErrorResponse><Error><Type>Sender</Type><Code>AccessDenied</Code><Message>not allowed</Message></Error>"
        "<RequestId>r1</RequestId></ErrorResponse>",
        "AssumeRole");
    REQUIRE_FALSE(err.ok());
    CHECK(err.error().kind == ErrorKind::Auth);
    CHECK(err.error().code == "AccessDenied");
    CHECK(err.error().request_id == "r1");

    for (const char* bad : {"", "not xml", "<AssumeRoleResponse/>",
                            "<AssumeRoleResponse><AssumeRoleResult><Credentials><AccessKeyId>A</AccessKeyId>"
                            "<SecretAccessKey>S</SecretAccessKey><Expiration>2019-11-09T13:34:41Z</Expiration>"
                            "</Credentials></AssumeRoleResult></AssumeRoleResponse>",
                            "<AssumeRoleResponse><AssumeRoleResult><Credentials><AccessKeyId>A</AccessKeyId>"
                            "<SecretAccessKey>S</SecretAccessKey><SessionToken>T</SessionToken>"
                            "<Expiration>soon</Expiration></Credentials></AssumeRoleResult></AssumeRoleResponse>"}) {
        CAPTURE(bad);
        auto r = parse_sts_response(bad, "AssumeRole");
        REQUIRE_FALSE(r.ok());
        CHECK(r.error().kind == ErrorKind::Corrupt);
    }
}

TEST_CASE("container and IMDS credential JSON", "[credentials]") {
    auto c = parse_container_json(R"({"RoleArn":"arn:x","AccessKeyId":"ASIA1","SecretAccessKey":"S","Token":"T",)"
                                  R"("Expiration":"2019-11-09T13:34:41Z"})",
                                  "container");
    REQUIRE(c.ok());
    CHECK(c->credentials.access_key_id == "ASIA1");
    CHECK(c->credentials.session_token == "T");
    CHECK(c->expiration == at(1573306481));
    auto imds = parse_container_json(R"({"Code":"Success","Type":"AWS-HMAC","AccessKeyId":"A","SecretAccessKey":"S",)"
                                     R"("Token":"T","Expiration":"2019-11-09T13:34:41Z"})",
                                     "imds");
    CHECK(imds.ok());
    for (const char* bad : {"", "[]", "{", R"({"Code":"Failure","Message":"no role"})",
                            R"({"AccessKeyId":"A","SecretAccessKey":"S","Expiration":"2019-11-09T13:34:41Z"})",
                            R"({"AccessKeyId":"A","SecretAccessKey":"S","Token":"T"})",
                            R"({"AccessKeyId":5,"SecretAccessKey":"S","Token":"T","Expiration":"2019-11-09T13:34:41Z"})"}) {
        CAPTURE(bad);
        auto r = parse_container_json(bad, "container");
        REQUIRE_FALSE(r.ok());
        CHECK(r.error().code == "BadCredentialsResponse");
        CHECK(r.error().message.find("\"S\"") == std::string::npos);
    }
}

TEST_CASE("credential_process output, Version 1", "[credentials]") {
    auto c = parse_process_json(R"({"Version":1,"AccessKeyId":"A","SecretAccessKey":"S","SessionToken":"T",)"
                                R"("Expiration":"2019-11-09T13:34:41Z"})",
                                "proc");
    REQUIRE(c.ok());
    CHECK(c->credentials.session_token == "T");
    CHECK(c->expiration == at(1573306481));
    auto forever = parse_process_json(R"({"Version":1,"AccessKeyId":"A","SecretAccessKey":"S"})", "proc");
    REQUIRE(forever.ok());
    CHECK_FALSE(forever->expiration);
    CHECK(forever->credentials.session_token.empty());
    CHECK_FALSE(parse_process_json(R"({"Version":2,"AccessKeyId":"A","SecretAccessKey":"S"})", "proc").ok());
    CHECK_FALSE(parse_process_json(R"({"AccessKeyId":"A","SecretAccessKey":"S"})", "proc").ok());
    CHECK_FALSE(parse_process_json(R"({"Version":1,"AccessKeyId":"A"})", "proc").ok());
    CHECK_FALSE(parse_process_json(R"({"Version":1,"AccessKeyId":"A","SecretAccessKey":"S","Expiration":"x"})", "proc").ok());
}

TEST_CASE("command lines split as a POSIX shell would, nothing expanded", "[credentials]") {
    using V = std::vector<std::string>;
    CHECK(*split_command_line("/usr/bin/get-creds --profile prod") == V{"/usr/bin/get-creds", "--profile", "prod"});
    CHECK(*split_command_line("  'my tool' \"a b\" c\\ d $HOME ';' ") == V{"my tool", "a b", "c d", "$HOME", ";"});
    CHECK(*split_command_line(R"("say \"hi\" \n" x'y'z)") == V{R"(say "hi" \n)", "xyz"});
    CHECK(*split_command_line("''") == V{""});
    CHECK_FALSE(split_command_line("'open").ok());
    CHECK_FALSE(split_command_line("\"open").ok());
    CHECK_FALSE(split_command_line("   ").ok());
}

TEST_CASE("container credential URLs the SDKs allow", "[credentials]") {
    for (const char* ok : {"http://169.254.170.2/v2/credentials/x", "http://169.254.170.23/v1/credentials",
                           "http://[fd00:ec2::23]/v1/credentials", "http://127.0.0.1:8080/creds",
                           "http://localhost/creds", "https://creds.example.com/x"}) {
        CAPTURE(ok);
        CHECK(validate_container_url(ok).ok());
    }
    for (const char* bad : {"http://example.com/creds", "http://10.0.0.1/creds", "http://169.254.169.254/x",
                            "file:///etc/passwd", "ftp://127.0.0.1/x", "http://user@127.0.0.1/x"}) {
        CAPTURE(bad);
        CHECK_FALSE(validate_container_url(bad).ok());
    }
}

TEST_CASE("the chain picks the first source that applies, in the AWS CLI's order", "[credentials]") {
    ScratchDir home{"bottomless-credu"};
    std::map<std::string, std::string> base{{"HOME", home.path.string()}};
    auto pick = [&](std::map<std::string, std::string> extra, const std::string& profile = "default") {
        auto vars = base;
        for (auto& [k, v] : extra) vars[k] = v;
        return default_credentials_provider(env_of(vars), profile);
    };
    auto describe = [&](std::map<std::string, std::string> extra, const std::string& profile = "default") {
        auto p = pick(std::move(extra), profile);
        REQUIRE(p.ok());
        return (*p)->describe();
    };
    home.write("token", "tok");
    std::string token = (home.path / "token").string();

    // Nothing at all: instance metadata is the last resort (not asked yet).
    CHECK(describe({}) == "EC2 instance metadata (http://169.254.169.254)");
    CHECK(describe({{"AWS_EC2_METADATA_SERVICE_ENDPOINT", "http://127.0.0.1:1"}}) ==
          "EC2 instance metadata (http://127.0.0.1:1)");
    auto none = pick({{"AWS_EC2_METADATA_DISABLED", "true"}});
    REQUIRE_FALSE(none.ok());
    CHECK(none.error().code == "NoCredentials");
    for (const char* place : {"environment", "web identity", "/.aws/credentials", "/.aws/config", "container credentials",
                              "EC2 instance metadata"})
        CHECK(none.error().message.find(place) != std::string::npos);

    // Container before IMDS; the relative URI goes to the ECS agent's address.
    CHECK(describe({{"AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "/v2/credentials/abc"}}) ==
          "container credentials (http://169.254.170.2/v2/credentials/abc)");
    CHECK(describe({{"AWS_CONTAINER_CREDENTIALS_FULL_URI", "http://169.254.170.23/v1/credentials"}}) ==
          "container credentials (http://169.254.170.23/v1/credentials)");
    auto bad_full = pick({{"AWS_CONTAINER_CREDENTIALS_FULL_URI", "http://evil.example.com/creds"}});
    REQUIRE_FALSE(bad_full.ok());
    CHECK(bad_full.error().code == "BadContainerUrl");

    // Web identity before container.
    CHECK(describe({{"AWS_WEB_IDENTITY_TOKEN_FILE", token},
                    {"AWS_ROLE_ARN", "arn:aws:iam::1:role/r"},
                    {"AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "/x"}}) ==
          "STS AssumeRoleWithWebIdentity of arn:aws:iam::1:role/r at https://sts.us-east-1.amazonaws.com");

    // Profiles: credential_process, role_arn with source_profile, and keys.
    home.write(".aws/config",
               "[profile proc]\ncredential_process = /bin/get-creds\n"
               "[profile role]\nrole_arn = arn:aws:iam::1:role/app\nsource_profile = keys\n"
               "[profile selfrole]\nrole_arn = arn:aws:iam::1:role/self\nsource_profile = selfrole\n"
               "aws_access_key_id = SELF\naws_secret_access_key = SELFSECRET\n"
               "[profile loop1]\nrole_arn = arn:aws:iam::1:role/a\nsource_profile = loop2\n"
               "[profile loop2]\nrole_arn = arn:aws:iam::1:role/b\nsource_profile = loop1\n"
               "[profile envrole]\nrole_arn = arn:aws:iam::1:role/e\ncredential_source = Environment\n"
               "[profile mfa]\nrole_arn = arn:aws:iam::1:role/m\nsource_profile = keys\nmfa_serial = x\n"
               "[profile procandkeys]\ncredential_process = /bin/get-creds\n");
    home.write(".aws/credentials", "[keys]\naws_access_key_id = K\naws_secret_access_key = KS\n"
                                   "[procandkeys]\naws_access_key_id = PK\naws_secret_access_key = PKS\n");
    CHECK(describe({}, "proc") == "credential_process of profile proc");
    CHECK(describe({{"AWS_ENDPOINT_URL_STS", "http://127.0.0.1:7480"}}, "role") ==
          "STS AssumeRole of arn:aws:iam::1:role/app at http://127.0.0.1:7480");
    CHECK(describe({}, "selfrole").find("STS AssumeRole of arn:aws:iam::1:role/self") == 0);
    CHECK(describe({}, "keys") == home.path.string() + "/.aws/credentials [keys]");
    // The credentials file's keys come before credential_process (as in the AWS CLI).
    CHECK(describe({}, "procandkeys") == home.path.string() + "/.aws/credentials [procandkeys]");
    // Environment keys before everything.
    CHECK(describe({{"AWS_ACCESS_KEY_ID", "E"}, {"AWS_SECRET_ACCESS_KEY", "ES"}}, "role") == "environment");

    auto loop = pick({}, "loop1");
    REQUIRE_FALSE(loop.ok());
    CHECK(loop.error().message.find("cycle") != std::string::npos);
    auto env_role = pick({}, "envrole");
    REQUIRE_FALSE(env_role.ok());
    CHECK(env_role.error().message.find("credential_source = Environment") != std::string::npos);
    CHECK(pick({{"AWS_ACCESS_KEY_ID", "E"}, {"AWS_SECRET_ACCESS_KEY", "ES"}}, "envrole").ok());
    auto mfa = pick({}, "mfa");
    REQUIRE_FALSE(mfa.ok());
    CHECK(mfa.error().message.find("mfa_serial") != std::string::npos);
}

TEST_CASE("config_from_env keeps static keys as data and hands temporary sources to the client", "[credentials]") {
    ScratchDir home{"bottomless-credu"};
    auto st = config_from_env(env_of({{"HOME", home.path.string()}, {"AWS_ACCESS_KEY_ID", "E"}, {"AWS_SECRET_ACCESS_KEY", "ES"}}));
    REQUIRE(st.ok());
    CHECK_FALSE(st->credentials_provider);
    CHECK(st->credentials.access_key_id == "E");
    auto dyn = config_from_env(env_of({{"HOME", home.path.string()}, {"AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "/x"}}));
    REQUIRE(dyn.ok());
    REQUIRE(dyn->credentials_provider);
    CHECK(dyn->credentials.source == "container credentials (http://169.254.170.2/x)");
    // STS is asked in the client's region.
    auto web = config_from_env(env_of({{"HOME", home.path.string()},
                                       {"AWS_REGION", "eu-west-1"},
                                       {"AWS_WEB_IDENTITY_TOKEN_FILE", "/var/run/token"},
                                       {"AWS_ROLE_ARN", "arn:aws:iam::1:role/r"}}));
    REQUIRE(web.ok());
    CHECK(web->credentials.source ==
          "STS AssumeRoleWithWebIdentity of arn:aws:iam::1:role/r at https://sts.eu-west-1.amazonaws.com");
}

TEST_CASE("refresh: cached while fresh, refreshed inside the margin, never expired", "[credentials]") {
    std::atomic<int64_t> now_s{1'000'000};
    std::atomic<int> fetches{0};
    std::atomic<bool> fail{false};
    auto clock = [&] { return at(now_s.load()); };
    RefreshOptions opt;
    opt.clock = clock;
    opt.margin = std::chrono::seconds(300);
    opt.retry_after_failure = std::chrono::seconds(10);
    // Every fetch lives 900 s from the clock's now.
    RefreshingProvider p(std::make_unique<FakeSource>(fetches, [&] { return at(now_s.load() + 900); }, fail), opt);

    auto key = [&] {
        auto c = p.current();
        REQUIRE(c.ok());
        return (*c)->access_key_id;
    };
    CHECK(key() == "AKID1");
    now_s += 599;  // 301 s left
    CHECK(key() == "AKID1");
    CHECK(fetches == 1);
    now_s += 2;  // 299 s left: inside the margin
    CHECK(key() == "AKID2");
    CHECK(fetches == 2);

    SECTION("a failed refresh keeps the valid ones and waits before trying again") {
        fail = true;
        now_s += 700;  // 200 s left of AKID2
        CHECK(key() == "AKID2");
        CHECK(fetches == 3);
        CHECK(key() == "AKID2");
        CHECK(fetches == 3);  // not before retry_after_failure
        now_s += 11;
        CHECK(key() == "AKID2");
        CHECK(fetches == 4);
        now_s += 200;  // AKID2 expired: the error, never expired credentials
        auto r = p.current();
        REQUIRE_FALSE(r.ok());
        CHECK(r.error().code == "Down");
        fail = false;
        now_s += 11;
        CHECK(key() == "AKID6");
    }
    SECTION("a refused credential is fetched again, at most once per retry interval") {
        auto c = p.current();
        REQUIRE(c.ok());
        CHECK(p.invalidate(**c));
        CHECK(key() == "AKID3");
        auto c3 = p.current();
        REQUIRE(c3.ok());
        CHECK_FALSE(p.invalidate(**c3));  // a second refusal right away: no fetch storm
        CHECK(key() == "AKID3");
        now_s += 11;
        CHECK(p.invalidate(**c3));
        CHECK(key() == "AKID4");
        // Invalidating credentials that were already replaced changes nothing.
        CHECK(p.invalidate(**c));
        CHECK(key() == "AKID4");
    }
}

TEST_CASE("refresh under concurrency: one fetch, and threads keep signing with the valid ones meanwhile",
          "[credentials]") {
    std::atomic<int64_t> now_s{1'000'000};
    std::atomic<int> fetches{0};
    std::atomic<bool> fail{false};
    RefreshOptions opt;
    opt.clock = [&] { return at(now_s.load()); };
    auto src = std::make_unique<FakeSource>(fetches, [&] { return at(now_s.load() + 900); }, fail);
    src->delay = std::chrono::milliseconds(200);  // a slow endpoint
    RefreshingProvider p(std::move(src), opt);
    REQUIRE(p.current().ok());
    now_s += 700;  // inside the margin, still valid
    std::atomic<int> old_seen{0}, errors{0};
    std::vector<std::thread> threads;
    auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < 8; ++i)
        threads.emplace_back([&] {
            for (int j = 0; j < 50; ++j) {
                auto c = p.current();
                if (!c) ++errors;
                else if ((*c)->access_key_id == "AKID1") ++old_seen;
            }
        });
    for (auto& t : threads) t.join();
    CHECK(errors == 0);
    CHECK(fetches == 2);
    CHECK(old_seen > 0);  // served while the refresh ran
    auto c = p.current();
    REQUIRE(c.ok());
    CHECK((*c)->access_key_id == "AKID2");
    CHECK(std::chrono::steady_clock::now() - t0 < std::chrono::seconds(2));
}
