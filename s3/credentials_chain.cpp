// The credentials chain (see credentials.h for the order): which source
// applies, chosen from the environment and the AWS config and credentials
// files alone (no network, no process run while choosing), including
// profiles that assume a role from a source_profile or credential_source.
// When nothing applies, the error lists every place that was looked in.
#include <algorithm>
#include <cstdlib>
#include <map>

#include "s3/config.h"
#include "s3/credentials.h"
#include "s3/credentials_internal.h"
#include "s3/log.h"

namespace bottomless::s3 {

using namespace credentials_detail;

namespace {

using Section = std::map<std::string, std::string>;
using ProviderPtr = std::shared_ptr<CredentialsProvider>;

std::optional<std::string> nonempty(const EnvLookup& env, std::string_view name) {
    auto v = env(name);
    if (v && !v->empty()) return v;
    return std::nullopt;
}

std::optional<std::string> get(const Section* sec, const std::string& key) {
    if (!sec) return std::nullopt;
    auto it = sec->find(key);
    if (it == sec->end() || it->second.empty()) return std::nullopt;
    return it->second;
}

struct Chain {
    const EnvLookup& env;
    ChainSettings settings;
    std::string conf_path, cred_path;
    IniFile conf, creds;
    StsSettings sts;
    std::vector<std::string> visiting;  // source_profile chain, for cycles

    const Section* cred_section(const std::string& p) const {
        auto it = creds.find(p);
        return it == creds.end() ? nullptr : &it->second;
    }
    const Section* conf_section(const std::string& p) const {
        auto it = conf.find("profile " + p);
        if (it == conf.end() && p == "default") it = conf.find("default");
        return it == conf.end() ? nullptr : &it->second;
    }
    // A profile setting: the credentials file wins over the config file, as in the AWS CLI.
    std::optional<std::string> setting(const std::string& p, const std::string& key) const {
        if (auto v = get(cred_section(p), key)) return v;
        return get(conf_section(p), key);
    }
    bool has_profile(const std::string& p) const { return cred_section(p) || conf_section(p); }

    ProviderPtr refreshing(std::unique_ptr<CredentialsSource> s) const {
        return std::make_shared<RefreshingProvider>(std::move(s), settings.refresh);
    }

    std::optional<Credentials> keys_in(const Section* sec, const std::string& where) const {
        auto id = get(sec, "aws_access_key_id");
        auto secret = get(sec, "aws_secret_access_key");
        if (!id || !secret) return std::nullopt;
        return Credentials(*id, *secret, get(sec, "aws_session_token").value_or(""), where);
    }
    std::optional<Credentials> file_keys(const std::string& p) const {
        if (auto c = keys_in(cred_section(p), cred_path + " [" + p + "]")) return c;
        return keys_in(conf_section(p), conf_path + " [profile " + p + "]");
    }
    std::optional<Credentials> env_keys() const {
        auto id = nonempty(env, "AWS_ACCESS_KEY_ID");
        auto secret = nonempty(env, "AWS_SECRET_ACCESS_KEY");
        if (!id || !secret) return std::nullopt;
        return Credentials(*id, *secret, nonempty(env, "AWS_SESSION_TOKEN").value_or(""), "environment");
    }

    Result<ProviderPtr> container() const {
        ContainerSettings cs;
        if (auto full = nonempty(env, "AWS_CONTAINER_CREDENTIALS_FULL_URI")) cs.url = *full;
        if (auto rel = nonempty(env, "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI")) {
            // The relative URI wins, as in the SDKs.
            cs.url = "http://169.254.170.2" + (rel->front() == '/' ? *rel : "/" + *rel);
        }
        if (cs.url.empty()) return ProviderPtr();
        if (auto st = validate_container_url(cs.url); !st) return std::move(st).error();
        cs.authorization_token = nonempty(env, "AWS_CONTAINER_AUTHORIZATION_TOKEN").value_or("");
        cs.authorization_token_file = nonempty(env, "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE").value_or("");
        return refreshing(make_container_source(std::move(cs)));
    }

    bool imds_disabled() const { return lower(nonempty(env, "AWS_EC2_METADATA_DISABLED").value_or("")) == "true"; }
    ProviderPtr imds() const {
        ImdsSettings is;
        if (auto ep = nonempty(env, "AWS_EC2_METADATA_SERVICE_ENDPOINT")) is.endpoint = *ep;
        else if (lower(nonempty(env, "AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE").value_or("")) == "ipv6")
            is.endpoint = "http://[fd00:ec2::254]";
        return refreshing(make_imds_source(std::move(is)));
    }

    AssumeRoleParams role_params(const std::string& p, const std::string& role_arn) const {
        AssumeRoleParams rp;
        rp.role_arn = role_arn;
        rp.session_name = setting(p, "role_session_name").value_or("");
        if (auto d = setting(p, "duration_seconds")) {
            char* end = nullptr;
            long v = std::strtol(d->c_str(), &end, 10);
            if (end && *end == '\0' && v >= 900 && v <= 43200) rp.duration_seconds = static_cast<int>(v);
        }
        rp.external_id = setting(p, "external_id").value_or("");
        return rp;
    }

    Error profile_error(const std::string& p, const std::string& why) const {
        return make_error(ErrorKind::InvalidArgument, "AWS profile '" + safe(p) + "' (" + conf_path + ", " + cred_path +
                                                          "): " + why,
                          "BadProfile");
    }

    // The profile's role_arn (AssumeRole, or web identity with a token file); null when it has none.
    Result<ProviderPtr> assume_role(const std::string& p) {
        auto role_arn = setting(p, "role_arn");
        if (!role_arn) return ProviderPtr();
        if (setting(p, "mfa_serial"))
            return profile_error(p, "mfa_serial is not supported (a process cannot prompt for an MFA code); use a "
                                    "role without MFA or credential_process");
        if (auto tf = setting(p, "web_identity_token_file"))
            return refreshing(make_web_identity_source(sts, role_params(p, *role_arn), *tf));
        auto src_profile = setting(p, "source_profile");
        auto cred_source = setting(p, "credential_source");
        if (src_profile && cred_source)
            return profile_error(p, "has both source_profile and credential_source; keep one");
        ProviderPtr base;
        if (src_profile) {
            if (std::find(visiting.begin(), visiting.end(), *src_profile) != visiting.end() && *src_profile != p)
                return profile_error(p, "source_profile '" + safe(*src_profile) + "' leads back to itself (a cycle)");
            if (*src_profile == p) {
                // A profile may be its own source: its keys assume its role.
                auto k = file_keys(p);
                if (!k) return profile_error(p, "is its own source_profile but has no aws_access_key_id/aws_secret_access_key");
                base = std::make_shared<StaticCredentialsProvider>(std::move(*k));
            } else {
                if (!has_profile(*src_profile))
                    return profile_error(p, "source_profile '" + safe(*src_profile) + "' does not exist");
                auto b = source(*src_profile);
                if (!b) return std::move(b).error();
                base = *b;
            }
        } else if (cred_source) {
            if (*cred_source == "Environment") {
                auto k = env_keys();
                if (!k) return profile_error(p, "credential_source = Environment but AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY are not set");
                base = std::make_shared<StaticCredentialsProvider>(std::move(*k));
            } else if (*cred_source == "Ec2InstanceMetadata") {
                base = imds();
            } else if (*cred_source == "EcsContainer") {
                auto c = container();
                if (!c) return std::move(c).error();
                if (!*c) return profile_error(p, "credential_source = EcsContainer but AWS_CONTAINER_CREDENTIALS_RELATIVE_URI/_FULL_URI are not set");
                base = *c;
            } else {
                return profile_error(p, "credential_source '" + safe(*cred_source) +
                                            "' is not one of Environment, Ec2InstanceMetadata, EcsContainer");
            }
        } else {
            return profile_error(p, "role_arn needs source_profile, credential_source or web_identity_token_file");
        }
        return refreshing(make_assume_role_source(sts, role_params(p, *role_arn), std::move(base)));
    }

    // The credentials of a source_profile.
    Result<ProviderPtr> source(const std::string& p) {
        visiting.push_back(p);
        struct Pop {
            std::vector<std::string>& v;
            ~Pop() { v.pop_back(); }
        } pop{visiting};
        auto role = assume_role(p);
        if (!role || *role) return role;
        if (auto k = file_keys(p)) return ProviderPtr(std::make_shared<StaticCredentialsProvider>(std::move(*k)));
        if (auto cmd = setting(p, "credential_process"))
            return refreshing(make_process_source({*cmd, std::chrono::milliseconds(60'000), p}));
        return profile_error(p, "is used as a source_profile but holds no credentials (keys, role_arn or credential_process)");
    }
};

}  // namespace

Result<std::shared_ptr<CredentialsProvider>> default_credentials_provider(const EnvLookup& env,
                                                                          const std::string& profile,
                                                                          const ChainSettings& settings) {
    auto home = nonempty(env, "HOME");
    auto home_path = [&](const char* rel) { return (home ? *home : std::string(".")) + rel; };
    Chain c{env, settings, {}, {}, {}, {}, {}, {}};
    c.conf_path = nonempty(env, "AWS_CONFIG_FILE").value_or(home_path("/.aws/config"));
    c.cred_path = nonempty(env, "AWS_SHARED_CREDENTIALS_FILE").value_or(home_path("/.aws/credentials"));
    auto conf = read_ini_file(c.conf_path);
    auto creds = read_ini_file(c.cred_path);
    if (conf) c.conf = std::move(*conf);
    if (creds) c.creds = std::move(*creds);
    c.visiting.push_back(profile);

    c.sts.region = settings.region;
    c.sts.ca_bundle = settings.ca_bundle;
    c.sts.verify_tls = settings.verify_tls;
    if (auto e = nonempty(env, "AWS_ENDPOINT_URL_STS")) c.sts.endpoint = *e;
    else if (auto e2 = nonempty(env, "AWS_ENDPOINT_URL")) c.sts.endpoint = *e2;
    else if (auto e3 = c.setting(profile, "sts.endpoint_url")) c.sts.endpoint = *e3;
    else if (auto e4 = c.setting(profile, "endpoint_url")) c.sts.endpoint = *e4;
    else c.sts.endpoint = "https://sts." + settings.region + ".amazonaws.com";
    if (c.sts.endpoint.find("://") == std::string::npos) c.sts.endpoint = "https://" + c.sts.endpoint;

    std::string looked;
    // 1. Environment keys.
    if (auto k = c.env_keys()) return ProviderPtr(std::make_shared<StaticCredentialsProvider>(std::move(*k)));
    bool id = nonempty(env, "AWS_ACCESS_KEY_ID").has_value(), secret = nonempty(env, "AWS_SECRET_ACCESS_KEY").has_value();
    looked += id || secret ? std::string("environment (") + (id ? "AWS_SECRET_ACCESS_KEY" : "AWS_ACCESS_KEY_ID") +
                                 " is not set, the other one is)"
                           : std::string("environment (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY not set)");
    // 2. The profile's role.
    auto role = c.assume_role(profile);
    if (!role || *role) return role;
    // 3. Web identity from the environment.
    auto token_file = nonempty(env, "AWS_WEB_IDENTITY_TOKEN_FILE");
    auto role_arn = nonempty(env, "AWS_ROLE_ARN");
    if (token_file && role_arn) {
        AssumeRoleParams rp;
        rp.role_arn = *role_arn;
        rp.session_name = nonempty(env, "AWS_ROLE_SESSION_NAME").value_or("");
        return c.refreshing(make_web_identity_source(c.sts, std::move(rp), *token_file));
    }
    looked += token_file || role_arn ? std::string(", web identity (") +
                                           (token_file ? "AWS_ROLE_ARN" : "AWS_WEB_IDENTITY_TOKEN_FILE") +
                                           " is not set, the other one is)"
                                     : std::string(", web identity (AWS_WEB_IDENTITY_TOKEN_FILE not set)");
    // 4. The shared credentials file.
    if (auto k = c.keys_in(c.cred_section(profile), c.cred_path + " [" + profile + "]"))
        return ProviderPtr(std::make_shared<StaticCredentialsProvider>(std::move(*k)));
    looked += ", " + c.cred_path +
              (creds ? (c.cred_section(profile) ? " (profile [" + profile + "] has no key pair)"
                                                : " (no profile [" + profile + "])")
                     : std::string(" (not found)"));
    // 5. credential_process.
    if (auto cmd = c.setting(profile, "credential_process"))
        return c.refreshing(make_process_source({*cmd, std::chrono::milliseconds(60'000), profile}));
    // 6. The config file's keys.
    if (auto k = c.keys_in(c.conf_section(profile), c.conf_path + " [profile " + profile + "]"))
        return ProviderPtr(std::make_shared<StaticCredentialsProvider>(std::move(*k)));
    looked += ", " + c.conf_path +
              (conf ? (c.conf_section(profile) ? " (profile " + profile + " has no key pair, role_arn or credential_process)"
                                               : " (no profile " + profile + ")")
                    : std::string(" (not found)"));
    // 7. Container credentials.
    auto cont = c.container();
    if (!cont || *cont) return cont;
    looked += ", container credentials (AWS_CONTAINER_CREDENTIALS_RELATIVE_URI/_FULL_URI not set)";
    // 8. Instance metadata: the last resort, chosen without asking it (a
    // fetch happens at the first request, with short timeouts).
    if (!c.imds_disabled()) return c.imds();
    looked += ", EC2 instance metadata (AWS_EC2_METADATA_DISABLED=true)";
    return make_error(ErrorKind::Auth,
                      "no AWS credentials found; looked in: " + looked +
                          ". Set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or add the keys to the profile.",
                      "NoCredentials");
}

}  // namespace bottomless::s3
