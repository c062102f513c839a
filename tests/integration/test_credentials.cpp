// Temporary credentials against the real test server (Ceph RGW with its STS):
// AssumeRole through a profile, EC2 instance metadata (IMDSv2), container
// credentials, credential_process and web identity — the last four through
// tests/support/cred_server, which hands out REAL temporary credentials from
// the server's AssumeRole, so every request below is checked by the server,
// session token included. Refresh is driven by an injected clock.
//
// Web identity: RGW's AssumeRoleWithWebIdentity needs an OIDC provider whose
// JWKS it fetches over https; instead the local endpoint plays STS for that
// one call (it checks the request's shape) and answers with real credentials.
#include <catch2/catch.hpp>

#include <atomic>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <thread>

#include "s3/client.h"
#include "s3/credentials.h"
#include "s3/log.h"
#include "support/cred_server.h"
#include "support/s3_env.h"
#include "support/scratch.h"

namespace fs = std::filesystem;
using namespace bottomless;
using namespace bottomless::s3;
using bottomless::testing::CredServer;
using bottomless::testing::ScratchDir;
using bottomless::testing::TestBucket;

namespace {


// The gateway with STS (scripts/s3-server.sh runs it beside the main one, on
// the same cluster: same buckets). Temporary credentials are used there.
std::string sts_endpoint() {
    const char* v = std::getenv("BOTTOMLESS_TEST_STS_ENDPOINT");
    if (!v || !*v)
        FAIL("BOTTOMLESS_TEST_STS_ENDPOINT is not set: the test server must be started by the current "
             "scripts/s3-server.sh (it runs a gateway with RGW's STS); restart it and eval its env");
    return v;
}

std::string role_arn() {
    const char* v = std::getenv("BOTTOMLESS_TEST_ROLE_ARN");
    if (!v || !*v)
        FAIL("BOTTOMLESS_TEST_ROLE_ARN is not set: the test server must be started by the current "
             "scripts/s3-server.sh (it enables RGW's STS and creates the role); restart it and eval its env");
    return v;
}

// The environment a process on the test machine sees, minus every credential
// source, plus `extra`. HOME points at an empty directory.
EnvLookup env_with(const ScratchDir& home, std::map<std::string, std::string> extra) {
    ClientConfig base = testing::server_config();
    std::map<std::string, std::string> vars{{"HOME", home.path.string()},
                                            {"LIBSQL_BOTTOMLESS_ENDPOINT", sts_endpoint()},
                                            {"AWS_REGION", base.region},
                                            {"AWS_EC2_METADATA_DISABLED", "true"}};
    for (auto& [k, v] : extra) vars[k] = v;
    return [vars](std::string_view n) -> std::optional<std::string> {
        auto it = vars.find(std::string(n));
        if (it == vars.end()) return std::nullopt;
        return it->second;
    };
}

// Real temporary credentials, new ones at every call: AssumeRole at the test
// server, signed with the test user's static keys.
CredServer::Supplier assume_role_supplier() {
    ClientConfig base = testing::server_config();
    StsSettings sts;
    sts.endpoint = sts_endpoint();
    sts.region = base.region;
    AssumeRoleParams p;
    p.role_arn = role_arn();
    p.session_name = "cred-server";
    p.duration_seconds = 900;
    auto source = std::shared_ptr<CredentialsSource>(
        make_assume_role_source(sts, p, std::make_shared<StaticCredentialsProvider>(base.credentials)));
    return [source] { return source->fetch(); };
}

// A client signing only with the provider (the static keys are cleared).
std::unique_ptr<Client> client_with(std::shared_ptr<CredentialsProvider> provider) {
    ClientConfig cfg = testing::server_config();
    cfg.endpoint = sts_endpoint();
    cfg.credentials = Credentials();
    cfg.credentials_provider = std::move(provider);
    return std::make_unique<Client>(std::move(cfg));
}

// Writes, reads back and lists through `client` in a bucket made by the test user.
void check_round_trip(Client& client, const std::string& bucket, const std::string& key) {
    auto put = client.put_object(bucket, key, "payload of " + key);
    REQUIRE(put.ok());
    auto got = client.get_object(bucket, key);
    REQUIRE(got.ok());
    CHECK(*got == "payload of " + key);
    auto list = client.list_all(bucket, key);
    REQUIRE(list.ok());
    CHECK(list->size() == 1);
}

std::string current_key_id(CredentialsProvider& p) {
    auto c = p.current();
    REQUIRE(c.ok());
    return (*c)->access_key_id;
}

struct FakeClock {
    std::atomic<int64_t> offset_s{0};
    SystemClock fn() {
        return [this] { return std::chrono::system_clock::now() + std::chrono::seconds(offset_s.load()); };
    }
};

}  // namespace

TEST_CASE("AssumeRole from a profile's role_arn and source_profile signs with real temporary credentials",
          "[credentials][integration]") {
    auto admin = testing::server_client();
    TestBucket bucket(*admin, "cred-role");
    ClientConfig base = testing::server_config();
    ScratchDir home{"bottomless-cred"};
    home.write(".aws/credentials", "[base]\naws_access_key_id = " + base.credentials.access_key_id +
                                       "\naws_secret_access_key = " + base.credentials.secret_access_key + "\n");
    home.write(".aws/config", "[profile app]\nrole_arn = " + role_arn() +
                                  "\nsource_profile = base\nrole_session_name = bottomless-test\n"
                                  "duration_seconds = 900\n");
    auto cfg = config_from_env(env_with(home, {{"AWS_PROFILE", "app"}, {"AWS_ENDPOINT_URL_STS", sts_endpoint()}}));
    REQUIRE(cfg.ok());
    REQUIRE(cfg->credentials_provider);
    CHECK(cfg->credentials_provider->describe().find("AssumeRole of " + role_arn()) != std::string::npos);

    auto creds = cfg->credentials_provider->current();
    REQUIRE(creds.ok());
    CHECK_FALSE((*creds)->session_token.empty());
    CHECK((*creds)->access_key_id != base.credentials.access_key_id);

    Client client(*cfg);
    check_round_trip(client, bucket.name(), "assumed");

    SECTION("the server checks the session token: a damaged one is refused") {
        Credentials bad = **creds;
        bad.session_token[bad.session_token.size() / 2] ^= 1;
        ClientConfig c2 = testing::server_config();
        c2.endpoint = sts_endpoint();
        c2.credentials = bad;
        Client damaged(c2);
        auto r = damaged.get_object(bucket.name(), "assumed");
        REQUIRE_FALSE(r.ok());
        CAPTURE(r.error().describe());
        CHECK((r.error().http_status == 400 || r.error().http_status == 403));  // RGW: 400 when it cannot decode it
        Credentials none = **creds;
        none.session_token.clear();
        c2.credentials = none;
        Client tokenless(c2);
        auto r2 = tokenless.get_object(bucket.name(), "assumed");
        REQUIRE_FALSE(r2.ok());
        CHECK(r2.error().kind == ErrorKind::Auth);
    }
    SECTION("a role the user may not assume is refused by STS with a message") {
        ScratchDir h2{"bottomless-cred"};
        h2.write(".aws/credentials", "[base]\naws_access_key_id = " + base.credentials.access_key_id +
                                         "\naws_secret_access_key = " + base.credentials.secret_access_key + "\n");
        h2.write(".aws/config", "[profile app]\nrole_arn = arn:aws:iam:::role/no-such-role\nsource_profile = base\n");
        auto cfg2 = config_from_env(env_with(h2, {{"AWS_PROFILE", "app"}, {"AWS_ENDPOINT_URL_STS", sts_endpoint()}}));
        REQUIRE(cfg2.ok());
        Client c3(*cfg2);
        auto r = c3.head_bucket(bucket.name());
        REQUIRE_FALSE(r.ok());
        CAPTURE(r.error().describe());
        CHECK(r.error().message.find("AssumeRole") != std::string::npos);
        CHECK(r.error().message.find(base.credentials.secret_access_key) == std::string::npos);
    }
}

TEST_CASE("EC2 instance metadata (IMDSv2) hands out credentials the server accepts", "[credentials][integration]") {
    auto admin = testing::server_client();
    TestBucket bucket(*admin, "cred-imds");
    CredServer imds(assume_role_supplier());
    ScratchDir home{"bottomless-cred"};

    SECTION("chosen last in the chain and fetched with a session token") {
        auto cfg = config_from_env(
            env_with(home, {{"AWS_EC2_METADATA_DISABLED", ""}, {"AWS_EC2_METADATA_SERVICE_ENDPOINT", imds.url()}}));
        REQUIRE(cfg.ok());
        REQUIRE(cfg->credentials_provider);
        CHECK(cfg->credentials_provider->describe() == "EC2 instance metadata (" + imds.url() + ")");
        Client client(*cfg);
        check_round_trip(client, bucket.name(), "imds");
        CHECK(imds.count("imds-token") == 1);
        CHECK(imds.count("imds-role") == 1);
        CHECK(imds.count("imds-credentials") == 1);
        CHECK(imds.count("imds-unauthorized") == 0);  // never IMDSv1
        CAPTURE(imds.problems());
        CHECK(imds.problems().empty());
    }
    SECTION("AWS_EC2_METADATA_DISABLED=true: not asked, and the error names every place looked") {
        auto cfg = config_from_env(env_with(home, {{"AWS_EC2_METADATA_SERVICE_ENDPOINT", imds.url()}}));
        REQUIRE_FALSE(cfg.ok());
        CHECK(cfg.error().code == "NoCredentials");
        CHECK(cfg.error().message.find("AWS_EC2_METADATA_DISABLED") != std::string::npos);
        CHECK(imds.count("imds-token") == 0);
    }
    SECTION("no metadata service: the first request fails fast with a hint") {
        // A closed port on loopback: what a machine off EC2 sees (there, a 1 s connect timeout).
        auto cfg = config_from_env(env_with(
            home, {{"AWS_EC2_METADATA_DISABLED", ""}, {"AWS_EC2_METADATA_SERVICE_ENDPOINT", "http://127.0.0.1:9"}}));
        REQUIRE(cfg.ok());
        Client client(*cfg);
        auto t0 = std::chrono::steady_clock::now();
        auto r = client.head_bucket(bucket.name());
        REQUIRE_FALSE(r.ok());
        CHECK(std::chrono::steady_clock::now() - t0 < std::chrono::seconds(3));
        CHECK(r.error().code == "ImdsUnavailable");
        CHECK(r.error().message.find("AWS_EC2_METADATA_DISABLED") != std::string::npos);
    }
}

TEST_CASE("container credentials with an authorization token file", "[credentials][integration]") {
    auto admin = testing::server_client();
    TestBucket bucket(*admin, "cred-ecs");
    CredServer ecs(assume_role_supplier());
    ecs.set_container_token("container-token-must-not-leak");
    ScratchDir home{"bottomless-cred"};
    std::string token_file = home.write("token", "container-token-must-not-leak\n");
    std::string url = ecs.url() + CredServer::kContainerPath;

    SECTION("the right token") {
        auto cfg = config_from_env(env_with(home, {{"AWS_CONTAINER_CREDENTIALS_FULL_URI", url},
                                                   {"AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE", token_file},
                                                   {"AWS_EC2_METADATA_DISABLED", ""}}));
        REQUIRE(cfg.ok());
        REQUIRE(cfg->credentials_provider);
        CHECK(cfg->credentials_provider->describe().find("container credentials") == 0);
        Client client(*cfg);
        check_round_trip(client, bucket.name(), "container");
        CHECK(ecs.count("container") == 1);
        CHECK(ecs.count("container-unauthorized") == 0);
    }
    SECTION("a wrong token is an Auth error that says so, without the token") {
        auto cfg = config_from_env(env_with(home, {{"AWS_CONTAINER_CREDENTIALS_FULL_URI", url},
                                                   {"AWS_CONTAINER_AUTHORIZATION_TOKEN", "wrong-token-must-not-leak"}}));
        REQUIRE(cfg.ok());
        Client client(*cfg);
        auto r = client.head_bucket(bucket.name());
        REQUIRE_FALSE(r.ok());
        CHECK(r.error().kind == ErrorKind::Auth);
        CHECK(r.error().message.find("authorization token was refused") != std::string::npos);
        CHECK(r.error().message.find("wrong-token-must-not-leak") == std::string::npos);
        CHECK(ecs.count("container-unauthorized") == 1);
    }
}

TEST_CASE("credential_process runs the command without a shell and uses its JSON", "[credentials][integration]") {
    auto admin = testing::server_client();
    TestBucket bucket(*admin, "cred-proc");
    auto supplier = assume_role_supplier();
    auto c = supplier();
    REQUIRE(c.ok());
    ScratchDir home{"bottomless-cred"};
    std::string json = "{\"Version\": 1, \"AccessKeyId\": \"" + c->credentials.access_key_id +
                       "\", \"SecretAccessKey\": \"" + c->credentials.secret_access_key + "\", \"SessionToken\": \"" +
                       c->credentials.session_token + "\", \"Expiration\": \"2099-01-01T00:00:00Z\"}";
    std::string json_file = home.write("out.json", json);
    std::string runs = (home.path / "runs").string();
    // A path with a space and an argument with shell characters: a shell would mangle them.
    std::string script = home.write("my tools/creds.sh", "#!/bin/sh\n[ \"$1\" = '$HOME;x' ] || exit 3\necho run >> '" + runs +
                                                           "'\ncat '" + json_file + "'\n");
    fs::permissions(script, fs::perms::owner_all);
    home.write(".aws/config", "[profile proc]\ncredential_process = \"" + script + "\" '$HOME;x'\n");

    auto cfg = config_from_env(env_with(home, {{"AWS_PROFILE", "proc"}}));
    REQUIRE(cfg.ok());
    REQUIRE(cfg->credentials_provider);
    CHECK(cfg->credentials_provider->describe() == "credential_process of profile proc");
    Client client(*cfg);
    check_round_trip(client, bucket.name(), "process");
    std::ifstream in(runs);
    std::string line;
    int n = 0;
    while (std::getline(in, line)) ++n;
    CHECK(n == 1);

    SECTION("a failing command is an error naming it and its status") {
        home.write(".aws/config", "[profile proc]\ncredential_process = /bin/false\n");
        auto cfg2 = config_from_env(env_with(home, {{"AWS_PROFILE", "proc"}}));
        REQUIRE(cfg2.ok());
        Client c2(*cfg2);
        auto r = c2.head_bucket(bucket.name());
        REQUIRE_FALSE(r.ok());
        CHECK(r.error().code == "CredentialProcessFailed");
        CHECK(r.error().message.find("exited with status 1") != std::string::npos);
    }
}

TEST_CASE("web identity: an unsigned AssumeRoleWithWebIdentity with the token file's token",
          "[credentials][integration]") {
    auto admin = testing::server_client();
    TestBucket bucket(*admin, "cred-webid");
    CredServer sts(assume_role_supplier());
    sts.set_web_identity("arn:aws:iam::123456789012:role/k8s-app", "eyJ.web-identity-token-must-not-leak.sig");
    ScratchDir home{"bottomless-cred"};
    std::string token_file = home.write("token", "eyJ.web-identity-token-must-not-leak.sig\n");
    auto cfg = config_from_env(env_with(home, {{"AWS_WEB_IDENTITY_TOKEN_FILE", token_file},
                                               {"AWS_ROLE_ARN", "arn:aws:iam::123456789012:role/k8s-app"},
                                               {"AWS_ROLE_SESSION_NAME", "pod-1"},
                                               {"AWS_ENDPOINT_URL_STS", sts.url()}}));
    REQUIRE(cfg.ok());
    REQUIRE(cfg->credentials_provider);
    CHECK(cfg->credentials_provider->describe().find("STS AssumeRoleWithWebIdentity of arn:aws:iam::123456789012:role/k8s-app") == 0);
    Client client(*cfg);
    check_round_trip(client, bucket.name(), "webid");
    CAPTURE(sts.problems());
    CHECK(sts.problems().empty());
    CHECK(sts.count("web-identity") == 1);

    SECTION("a rotated token file is read again at the next fetch") {
        home.write("token", "rotated-token\n");
        sts.set_web_identity("arn:aws:iam::123456789012:role/k8s-app", "rotated-token");
        cfg->credentials_provider->invalidate(**cfg->credentials_provider->current());
        check_round_trip(client, bucket.name(), "webid-2");
        CHECK(sts.count("web-identity") == 2);
        CHECK(sts.problems().empty());
    }
}

TEST_CASE("temporary credentials are refreshed before they expire, also under concurrent requests",
          "[credentials][integration]") {
    auto admin = testing::server_client();
    TestBucket bucket(*admin, "cred-refresh");
    CredServer imds(assume_role_supplier());  // real credentials, valid for 900 s
    ScratchDir home{"bottomless-cred"};
    FakeClock clock;
    ChainSettings chain;
    chain.refresh.clock = clock.fn();  // margin: the default 5 minutes
    auto provider = default_credentials_provider(
        env_with(home, {{"AWS_EC2_METADATA_DISABLED", ""}, {"AWS_EC2_METADATA_SERVICE_ENDPOINT", imds.url()}}),
        "default", chain);
    REQUIRE(provider.ok());
    auto client = client_with(*provider);

    check_round_trip(*client, bucket.name(), "first");
    CHECK(imds.count("imds-credentials") == 1);
    std::string first = current_key_id(**provider);
    // From now on the endpoint's answers live 15 minutes from the fake clock's now.
    auto advance = [&](int64_t seconds) {
        clock.offset_s = seconds;
        imds.set_expiration(std::chrono::system_clock::now() + std::chrono::seconds(seconds) + std::chrono::minutes(15));
    };

    SECTION("within their life less the margin: no new fetch") {
        advance(9 * 60);
        check_round_trip(*client, bucket.name(), "second");
        CHECK(imds.count("imds-credentials") == 1);
        CHECK(current_key_id(**provider) == first);
    }
    SECTION("inside the margin: new credentials, and the next requests are signed with them") {
        advance(11 * 60);  // 4 minutes left
        check_round_trip(*client, bucket.name(), "second");
        CHECK(imds.count("imds-credentials") == 2);
        std::string second = current_key_id(**provider);
        CHECK(second != first);
        check_round_trip(*client, bucket.name(), "third");
        CHECK(imds.count("imds-credentials") == 2);
    }
    SECTION("past expiry: no request is signed with the expired ones") {
        advance(16 * 60);
        check_round_trip(*client, bucket.name(), "late");
        CHECK(imds.count("imds-credentials") == 2);
        CHECK(current_key_id(**provider) != first);
    }
    SECTION("many threads while the credentials roll over: every request succeeds, one fetch per rollover") {
        std::atomic<int> failures{0};
        std::mutex mu;
        std::string first_failure;
        std::vector<std::thread> threads;
        std::atomic<bool> done{false};
        std::atomic<int> requests{0};
        for (int t = 0; t < 4; ++t)
            threads.emplace_back([&, t] {
                for (int i = 0; !done.load() || i < 5; ++i) {
                    ++requests;
                    auto r = client->put_object(bucket.name(), "t" + std::to_string(t) + "/" + std::to_string(i), "x");
                    if (!r.ok()) {
                        std::lock_guard lock(mu);
                        if (failures++ == 0) first_failure = r.error().describe();
                    }
                }
            });
        // Roll over twice while they run: each jump puts the current ones in the margin.
        for (int step = 1; step <= 2; ++step) {
            std::this_thread::sleep_for(std::chrono::milliseconds(300));
            advance(step * 11 * 60);
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(300));
        done = true;
        for (auto& th : threads) th.join();
        CHECK(requests.load() >= 40);
        CAPTURE(first_failure);
        CHECK(failures.load() == 0);
        CHECK(imds.count("imds-credentials") == 3);  // the first, and one per rollover
    }
}

TEST_CASE("credentials the server refuses are fetched again and the request retried once",
          "[credentials][integration]") {
    auto admin = testing::server_client();
    TestBucket bucket(*admin, "cred-refused");
    CredServer imds(assume_role_supplier());
    imds.corrupt_next_tokens(1);  // the first answer's session token is damaged
    ScratchDir home{"bottomless-cred"};
    auto cfg = config_from_env(
        env_with(home, {{"AWS_EC2_METADATA_DISABLED", ""}, {"AWS_EC2_METADATA_SERVICE_ENDPOINT", imds.url()}}));
    REQUIRE(cfg.ok());
    Client client(*cfg);
    auto r = client.put_object(bucket.name(), "k", "v");
    CAPTURE(r.ok() ? std::string() : r.error().describe());
    CHECK(r.ok());
    CHECK(imds.count("imds-credentials") == 2);
}

TEST_CASE("no secret of any credential source reaches a log line at trace level", "[credentials][integration]") {
    auto admin = testing::server_client();
    TestBucket bucket(*admin, "cred-log");
    std::vector<std::string> lines;
    std::mutex mu;
    std::vector<std::string> secrets;
    auto remember = [&](const ExpiringCredentials& c) {
        std::lock_guard lock(mu);
        secrets.push_back(c.credentials.secret_access_key);
        secrets.push_back(c.credentials.session_token);
    };
    auto supplier = assume_role_supplier();
    CredServer server([&]() {
        auto c = supplier();
        if (c) remember(*c);
        return c;
    });
    server.set_container_token("container-token-must-not-leak");
    server.set_web_identity("arn:aws:iam::123456789012:role/k8s-app", "web-identity-token-must-not-leak");
    ScratchDir home{"bottomless-cred"};
    std::string web_token = home.write("webtoken", "web-identity-token-must-not-leak");
    ClientConfig base = testing::server_config();

    log::set_sink([&](log::Level, std::string_view l) {
        std::lock_guard lock(mu);
        lines.emplace_back(l);
    });
    auto saved = log::level();
    log::set_level(log::Level::Trace);
    std::vector<std::map<std::string, std::string>> setups = {
        {{"AWS_EC2_METADATA_DISABLED", ""}, {"AWS_EC2_METADATA_SERVICE_ENDPOINT", server.url()}},
        {{"AWS_CONTAINER_CREDENTIALS_FULL_URI", server.url() + CredServer::kContainerPath},
         {"AWS_CONTAINER_AUTHORIZATION_TOKEN", "container-token-must-not-leak"}},
        {{"AWS_WEB_IDENTITY_TOKEN_FILE", web_token},
         {"AWS_ROLE_ARN", "arn:aws:iam::123456789012:role/k8s-app"},
         {"AWS_ENDPOINT_URL_STS", server.url()}},
    };
    for (const auto& vars : setups) {
        auto cfg = config_from_env(env_with(home, vars));
        REQUIRE(cfg.ok());
        Client client(*cfg);
        CHECK(client.put_object(bucket.name(), "k", "v").ok());
        (void)client.get_object(bucket.name(), "missing");
    }
    server.corrupt_next_tokens(1);  // a refused token: the error path logs too
    {
        auto cfg = config_from_env(env_with(home, setups[0]));
        REQUIRE(cfg.ok());
        Client client(*cfg);
        CHECK(client.put_object(bucket.name(), "k2", "v").ok());
    }
    log::set_level(saved);
    log::set_sink(nullptr);
    REQUIRE(lines.size() >= 6);
    REQUIRE(secrets.size() >= 8);
    secrets.push_back(base.credentials.secret_access_key);
    secrets.push_back("container-token-must-not-leak");
    secrets.push_back("web-identity-token-must-not-leak");
    for (const auto& l : lines) {
        CAPTURE(l);
        for (const auto& s : secrets) CHECK(l.find(s.substr(0, std::min<size_t>(s.size(), 24))) == std::string::npos);
        CHECK(l.find("Authorization:") == std::string::npos);
        CHECK(l.find("Signature=") == std::string::npos);
    }
}
