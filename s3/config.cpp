// Resolution of S3 settings from the environment and the AWS shared files.
#include "s3/config.h"

#include "s3/credentials.h"
#include "s3/log.h"

#include <cctype>
#include <cstdlib>
#include <fstream>
#include <sstream>

namespace bottomless::s3 {
namespace {

std::string trim(std::string_view s) {
    size_t b = 0, e = s.size();
    while (b < e && (s[b] == ' ' || s[b] == '\t' || s[b] == '\r')) ++b;
    while (e > b && (s[e - 1] == ' ' || s[e - 1] == '\t' || s[e - 1] == '\r')) --e;
    return std::string(s.substr(b, e - b));
}

std::string lower(std::string s) {
    for (char& c : s)
        if (c >= 'A' && c <= 'Z') c = static_cast<char>(c - 'A' + 'a');
    return s;
}

std::optional<std::string> nonempty(const EnvLookup& env, std::string_view name) {
    auto v = env(name);
    if (v && !v->empty()) return v;
    return std::nullopt;
}

std::string home_path(const EnvLookup& env, const char* rel) {
    auto home = nonempty(env, "HOME");
    return (home ? *home : std::string(".")) + rel;
}

std::string log_safe(std::string_view s) { return log::printable(s, 200); }

const std::map<std::string, std::string>* find_section(const IniFile& ini, const std::string& name) {
    auto it = ini.find(name);
    return it == ini.end() ? nullptr : &it->second;
}

// In ~/.aws/config a profile is "[profile NAME]", except the default which may be "[default]".
const std::map<std::string, std::string>* config_profile(const IniFile& ini, const std::string& profile) {
    if (auto* s = find_section(ini, "profile " + profile)) return s;
    if (profile == "default") return find_section(ini, "default");
    return nullptr;
}

std::optional<std::string> get(const std::map<std::string, std::string>* sec, const std::string& key) {
    if (!sec) return std::nullopt;
    auto it = sec->find(key);
    if (it == sec->end() || it->second.empty()) return std::nullopt;
    return it->second;
}

}  // namespace

EnvLookup process_env() {
    return [](std::string_view name) -> std::optional<std::string> {
        std::string n(name);
        if (const char* v = std::getenv(n.c_str())) return std::string(v);
        return std::nullopt;
    };
}

IniFile parse_ini(std::string_view text) {
    IniFile out;
    std::string section;
    std::string parent_key;  // for nested "s3 =" blocks
    size_t pos = 0;
    while (pos <= text.size()) {
        size_t nl = text.find('\n', pos);
        if (nl == std::string_view::npos) nl = text.size();
        std::string_view raw = text.substr(pos, nl - pos);
        pos = nl + 1;
        bool indented = !raw.empty() && (raw[0] == ' ' || raw[0] == '\t');
        std::string line = trim(raw);
        if (line.empty() || line[0] == '#' || line[0] == ';') continue;
        if (line.front() == '[' && line.back() == ']') {
            section = trim(std::string_view(line).substr(1, line.size() - 2));
            // "[profile   x]" → "profile x"
            if (section.rfind("profile", 0) == 0 && section.size() > 7 && (section[7] == ' ' || section[7] == '\t'))
                section = "profile " + trim(std::string_view(section).substr(7));
            out[section];
            parent_key.clear();
            continue;
        }
        auto eq = line.find('=');
        if (eq == std::string::npos) continue;  // not a setting; the AWS CLI ignores it too
        std::string key = lower(trim(std::string_view(line).substr(0, eq)));
        std::string value = trim(std::string_view(line).substr(eq + 1));
        if (indented && !parent_key.empty()) {
            out[section][parent_key + "." + key] = value;
            continue;
        }
        parent_key = value.empty() ? key : std::string();
        out[section][key] = value;
    }
    return out;
}

std::optional<IniFile> read_ini_file(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    if (!in) return std::nullopt;
    std::ostringstream ss;
    ss << in.rdbuf();
    return parse_ini(ss.str());
}

Result<Credentials> resolve_credentials(const EnvLookup& env, const std::string& profile) {
    std::string looked;
    auto id = nonempty(env, "AWS_ACCESS_KEY_ID");
    auto secret = nonempty(env, "AWS_SECRET_ACCESS_KEY");
    if (id && secret) {
        auto token = nonempty(env, "AWS_SESSION_TOKEN");
        return Credentials(*id, *secret, token.value_or(""), "environment");
    }
    if (id || secret)
        looked += std::string("environment (") + (id ? "AWS_SECRET_ACCESS_KEY" : "AWS_ACCESS_KEY_ID") +
                  " is not set, the other one is)";
    else
        looked += "environment (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY not set)";

    std::string cred_path = nonempty(env, "AWS_SHARED_CREDENTIALS_FILE").value_or(home_path(env, "/.aws/credentials"));
    if (auto ini = read_ini_file(cred_path)) {
        const auto* sec = find_section(*ini, profile);
        auto fid = get(sec, "aws_access_key_id");
        auto fsecret = get(sec, "aws_secret_access_key");
        if (fid && fsecret)
            return Credentials(*fid, *fsecret, get(sec, "aws_session_token").value_or(""),
                               cred_path + " [" + profile + "]");
        looked += ", " + cred_path + (sec ? " (profile [" + profile + "] has no key pair)"
                                          : " (no profile [" + profile + "])");
    } else {
        looked += ", " + cred_path + " (not found)";
    }

    std::string conf_path = nonempty(env, "AWS_CONFIG_FILE").value_or(home_path(env, "/.aws/config"));
    if (auto ini = read_ini_file(conf_path)) {
        const auto* sec = config_profile(*ini, profile);
        auto fid = get(sec, "aws_access_key_id");
        auto fsecret = get(sec, "aws_secret_access_key");
        if (fid && fsecret)
            return Credentials(*fid, *fsecret, get(sec, "aws_session_token").value_or(""),
                               conf_path + " [profile " + profile + "]");
        looked += ", " + conf_path + (sec ? " (profile " + profile + " has no key pair)"
                                          : " (no profile " + profile + ")");
    } else {
        looked += ", " + conf_path + " (not found)";
    }
    return make_error(ErrorKind::Auth,
                      "no AWS credentials found; looked in: " + looked +
                          ". Set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or add the keys to the profile.",
                      "NoCredentials");
}

namespace {

bool is_digit(char c) { return c >= '0' && c <= '9'; }
bool is_lower_alnum(char c) { return (c >= 'a' && c <= 'z') || is_digit(c); }

// "a.b.c.d" with four decimal parts: S3 refuses such bucket names.
bool looks_like_ipv4(std::string_view s) {
    int parts = 0;
    size_t i = 0;
    while (i <= s.size()) {
        size_t j = s.find('.', i);
        if (j == std::string_view::npos) j = s.size();
        std::string_view part = s.substr(i, j - i);
        if (part.empty() || part.size() > 3) return false;
        for (char c : part)
            if (!is_digit(c)) return false;
        ++parts;
        i = j + 1;
    }
    return parts == 4;
}

// Splits "scheme://authority/rest"; false without "://".
bool split_url(std::string_view url, std::string_view& scheme, std::string_view& authority) {
    auto p = url.find("://");
    if (p == std::string_view::npos) return false;
    scheme = url.substr(0, p);
    authority = url.substr(p + 3);
    if (auto slash = authority.find('/'); slash != std::string_view::npos) authority = authority.substr(0, slash);
    return true;
}

}  // namespace

std::string endpoint_host(std::string_view endpoint) {
    std::string_view scheme, auth;
    if (!split_url(endpoint, scheme, auth)) auth = endpoint.substr(0, endpoint.find('/'));
    if (auto at = auth.rfind('@'); at != std::string_view::npos) auth = auth.substr(at + 1);
    if (!auth.empty() && auth.front() == '[') {
        auto close = auth.find(']');
        return std::string(auth.substr(1, close == std::string_view::npos ? std::string_view::npos : close - 1));
    }
    return std::string(auth.substr(0, auth.find(':')));
}

bool is_loopback_host(std::string_view host) {
    std::string h = lower(std::string(host));
    if (h == "localhost" || h == "::1" || h == "0:0:0:0:0:0:0:1") return true;
    if (h.size() > 10 && h.compare(h.size() - 10, 10, ".localhost") == 0) return true;
    return h.rfind("127.", 0) == 0 && looks_like_ipv4(h);
}

Status validate_endpoint(std::string_view endpoint) {
    auto bad = [&](const std::string& why) {
        return make_error(ErrorKind::InvalidArgument,
                          "endpoint '" + log_safe(endpoint) + "' is not usable: " + why +
                              "; give an http:// or https:// URL such as https://s3.example.com or http://127.0.0.1:7480",
                          "BadEndpoint");
    };
    for (char c : endpoint)
        if (static_cast<unsigned char>(c) <= 0x20 || c == 0x7f) return bad("it contains spaces or control characters");
    std::string_view scheme, auth;
    if (!split_url(endpoint, scheme, auth)) return bad("it has no scheme");
    std::string sch = lower(std::string(scheme));
    if (sch != "http" && sch != "https")
        return bad("scheme '" + log_safe(scheme) + "' is not supported (S3 is spoken over http and https only)");
    if (endpoint.find_first_of("?#") != std::string_view::npos) return bad("a query string or fragment is not allowed");
    if (auth.find('@') != std::string_view::npos)
        return bad("user-info is not allowed in the URL (credentials come from AWS_ACCESS_KEY_ID or the AWS profile)");
    std::string_view host = auth, port;
    if (!auth.empty() && auth.front() == '[') {
        auto close = auth.find(']');
        if (close == std::string_view::npos || close == 1) return bad("the IPv6 address is not closed by ']'");
        for (char c : auth.substr(1, close - 1))
            if (!(is_digit(c) || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F') || c == ':' || c == '.'))
                return bad("the IPv6 address holds '" + std::string(1, c) + "'");
        host = auth.substr(0, close + 1);
        std::string_view rest = auth.substr(close + 1);
        if (!rest.empty()) {
            if (rest.front() != ':') return bad("unexpected text after the IPv6 address");
            port = rest.substr(1);
            if (port.empty()) return bad("the port is empty");
        }
    } else if (auto colon = auth.find(':'); colon != std::string_view::npos) {
        host = auth.substr(0, colon);
        port = auth.substr(colon + 1);
        if (port.empty()) return bad("the port is empty");
    }
    if (host.empty()) return bad("it names no host");
    if (host.front() != '[')
        for (char c : host)
            if (!(is_lower_alnum(c) || (c >= 'A' && c <= 'Z') || c == '.' || c == '-' || c == '_'))
                return bad("the host name holds '" + log_safe(std::string_view(&c, 1)) + "'");
    if (!port.empty()) {
        if (port.size() > 5) return bad("the port is not a number from 1 to 65535");
        unsigned long n = 0;
        for (char c : port) {
            if (!is_digit(c)) return bad("the port is not a number from 1 to 65535");
            n = n * 10 + static_cast<unsigned long>(c - '0');
        }
        if (n == 0 || n > 65535) return bad("the port is not a number from 1 to 65535");
    }
    return {};
}

Status validate_bucket_name(std::string_view b) {
    auto bad = [&](const std::string& why) {
        return make_error(ErrorKind::InvalidArgument,
                          "bucket name '" + log_safe(b) + "' is not valid: " + why +
                              " (S3 bucket names are 3 to 63 lowercase letters, digits, '.' and '-', starting and "
                              "ending with a letter or digit)",
                          "InvalidBucketName");
    };
    if (b.size() < 3 || b.size() > 63) return bad("it has " + std::to_string(b.size()) + " characters");
    for (char c : b)
        if (!is_lower_alnum(c) && c != '.' && c != '-')
            return bad(c >= 'A' && c <= 'Z' ? "it holds an uppercase letter" : "it holds '" + log_safe(std::string_view(&c, 1)) + "'");
    if (!is_lower_alnum(b.front()) || !is_lower_alnum(b.back())) return bad("it must start and end with a letter or digit");
    if (b.find("..") != std::string_view::npos) return bad("it holds \"..\"");
    if (looks_like_ipv4(b)) return bad("it looks like an IP address");
    return {};
}

Result<ClientConfig> config_from_env(const EnvLookup& env) {
    ClientConfig cfg;
    cfg.profile = nonempty(env, "AWS_PROFILE").value_or("default");

    std::string conf_path = nonempty(env, "AWS_CONFIG_FILE").value_or(home_path(env, "/.aws/config"));
    auto conf = read_ini_file(conf_path);
    const auto* prof = conf ? config_profile(*conf, cfg.profile) : nullptr;

    if (auto r = nonempty(env, "AWS_REGION")) cfg.region = *r;
    else if (auto r2 = nonempty(env, "AWS_DEFAULT_REGION")) cfg.region = *r2;
    else if (auto r3 = get(prof, "region")) cfg.region = *r3;

    std::string endpoint_from;
    if (auto e = nonempty(env, "LIBSQL_BOTTOMLESS_ENDPOINT")) cfg.endpoint = *e, endpoint_from = "LIBSQL_BOTTOMLESS_ENDPOINT";
    else if (auto e2 = nonempty(env, "AWS_ENDPOINT_URL_S3")) cfg.endpoint = *e2, endpoint_from = "AWS_ENDPOINT_URL_S3";
    else if (auto e3 = nonempty(env, "AWS_ENDPOINT_URL")) cfg.endpoint = *e3, endpoint_from = "AWS_ENDPOINT_URL";
    else if (auto e4 = get(prof, "s3.endpoint_url")) cfg.endpoint = *e4, endpoint_from = conf_path + " (s3.endpoint_url)";
    else if (auto e5 = get(prof, "endpoint_url")) cfg.endpoint = *e5, endpoint_from = conf_path + " (endpoint_url)";
    while (!cfg.endpoint.empty() && cfg.endpoint.back() == '/') cfg.endpoint.pop_back();
    if (!cfg.endpoint.empty() && cfg.endpoint.find("://") == std::string::npos)
        cfg.endpoint = "https://" + cfg.endpoint;
    if (!cfg.endpoint.empty()) {
        if (auto st = validate_endpoint(cfg.endpoint); !st) {
            Error e = std::move(st).error();
            e.message = endpoint_from + ": " + e.message;
            return e;
        }
    }
    cfg.path_style = !cfg.endpoint.empty();
    if (auto v = nonempty(env, "LIBSQL_BOTTOMLESS_S3_PATH_STYLE")) cfg.path_style = (*v == "1" || *v == "true");
    if (auto v = nonempty(env, "LIBSQL_BOTTOMLESS_S3_CONDITIONAL_WRITES")) {
        std::string m = *v;
        for (char& ch : m) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
        if (m == "auto") cfg.conditional_writes = ClientConfig::ConditionalWrites::Auto;
        else if (m == "trust") cfg.conditional_writes = ClientConfig::ConditionalWrites::Trust;
        else if (m == "verify") cfg.conditional_writes = ClientConfig::ConditionalWrites::Verify;
        else
            return make_error(ErrorKind::InvalidArgument,
                              "LIBSQL_BOTTOMLESS_S3_CONDITIONAL_WRITES must be auto, trust or verify (got '" +
                                  log::printable(m, 40) + "')",
                              "BadSetting");
    }

    if (auto ca = nonempty(env, "AWS_CA_BUNDLE")) cfg.ca_bundle = *ca;
    else if (auto ca2 = get(prof, "ca_bundle")) cfg.ca_bundle = *ca2;

    ChainSettings chain;
    chain.region = cfg.region;
    chain.ca_bundle = cfg.ca_bundle;
    chain.verify_tls = cfg.verify_tls;
    auto provider = default_credentials_provider(env, cfg.profile, chain);
    if (!provider) return std::move(provider).error();
    if (dynamic_cast<StaticCredentialsProvider*>(provider->get())) {
        // Static keys stay plain data in the config (callers may edit them).
        auto c = (*provider)->current();
        if (!c) return std::move(c).error();
        cfg.credentials = **c;
    } else {
        cfg.credentials.source = (*provider)->describe();
        cfg.credentials_provider = std::move(provider).value();
    }
    return cfg;
}

}  // namespace bottomless::s3
