// SigV4 against the official AWS test vectors (shared/testdata/sigv4), stage
// by stage, for Authorization-header signing and for presigned URLs; plus the
// S3 documentation's worked example and URI encoding of awkward keys.
#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "s3/sigv4.h"

namespace fs = std::filesystem;
using namespace bottomless::s3;

namespace {

std::string slurp(const fs::path& p) {
    std::ifstream in(p, std::ios::binary);
    REQUIRE(in);
    std::ostringstream ss;
    ss << in.rdbuf();
    return ss.str();
}

std::chrono::system_clock::time_point parse_iso(const std::string& s) {
    std::tm tm{};
    std::istringstream in(s);
    in >> std::get_time(&tm, "%Y-%m-%dT%H:%M:%SZ");
    return std::chrono::system_clock::from_time_t(timegm(&tm));
}

struct VectorRequest {
    SigningRequest req;
    std::string body;
};

// request.txt: "METHOD PATH[?QUERY] HTTP/1.1", headers (continuation lines
// start with white space), a blank line, the body.
VectorRequest parse_request(const std::string& text) {
    VectorRequest v;
    size_t eol = text.find('\n');
    std::string first = text.substr(0, eol);
    size_t sp = first.find(' ');
    size_t http = first.rfind(" HTTP/");
    v.req.method = first.substr(0, sp);
    std::string target = first.substr(sp + 1, http - sp - 1);
    size_t q = target.find('?');
    v.req.path = target.substr(0, q);
    if (q != std::string::npos) {
        std::string qs = target.substr(q + 1);
        size_t pos = 0;
        while (pos <= qs.size()) {
            size_t amp = qs.find('&', pos);
            if (amp == std::string::npos) amp = qs.size();
            std::string pair = qs.substr(pos, amp - pos);
            if (!pair.empty()) {
                size_t eq = pair.find('=');
                std::string k = pair.substr(0, eq);
                std::string val = eq == std::string::npos ? "" : pair.substr(eq + 1);
                v.req.query.emplace_back(uri_decode(k), uri_decode(val));
            }
            pos = amp + 1;
        }
    }
    size_t pos = eol == std::string::npos ? text.size() : eol + 1;
    while (pos < text.size()) {
        size_t e = text.find('\n', pos);
        if (e == std::string::npos) e = text.size();
        std::string line = text.substr(pos, e - pos);
        pos = e + 1;
        if (line.empty()) {
            v.body = pos <= text.size() ? text.substr(std::min(pos, text.size())) : "";
            break;
        }
        if (line[0] == ' ' || line[0] == '\t') {
            v.req.headers.back().second += "\n" + line;
            continue;
        }
        size_t colon = line.find(':');
        v.req.headers.emplace_back(line.substr(0, colon), line.substr(colon + 1));
    }
    return v;
}

std::vector<std::string> vector_cases() {
    std::vector<std::string> names;
    for (const auto& e : fs::directory_iterator(SIGV4_VECTORS_DIR))
        if (e.is_directory()) names.push_back(e.path().filename().string());
    std::sort(names.begin(), names.end());
    return names;
}

std::string authorization_line(const std::string& signed_request) {
    std::istringstream in(signed_request);
    std::string line;
    while (std::getline(in, line))
        if (line.rfind("Authorization:", 0) == 0) return line.substr(14);
    return {};
}

}  // namespace

TEST_CASE("the vector directory holds all 38 cases", "[sigv4]") {
    REQUIRE(vector_cases().size() == 38);
}

TEST_CASE("SigV4 official vectors, stage by stage", "[sigv4]") {
    static const std::vector<std::string> cases = vector_cases();
    REQUIRE(!cases.empty());
    auto name = GENERATE(from_range(cases));
    CAPTURE(name);
    fs::path dir = fs::path(SIGV4_VECTORS_DIR) / name;
    auto ctx = nlohmann::json::parse(slurp(dir / "context.json"));

    SignerOptions opts;
    opts.normalize_path = ctx.value("normalize", false);
    opts.add_content_sha256_header = ctx.value("sign_body", false);
    opts.sign_session_token = !ctx.value("omit_session_token", false);
    Signer signer(ctx["region"].get<std::string>(), ctx["service"].get<std::string>(), opts);
    Credentials creds(ctx["credentials"]["access_key_id"], ctx["credentials"]["secret_access_key"],
                      ctx["credentials"].value("token", std::string()));
    auto now = parse_iso(ctx["timestamp"]);

    VectorRequest v = parse_request(slurp(dir / "request.txt"));
    v.req.payload_hash = sha256_hex(v.body);

    SECTION("header signing") {
        SigningResult r = signer.sign(v.req, creds, now);
        CHECK(r.canonical_request == slurp(dir / "header-canonical-request.txt"));
        CHECK(r.string_to_sign == slurp(dir / "header-string-to-sign.txt"));
        CHECK(r.signature == slurp(dir / "header-signature.txt"));
        std::string auth;
        for (const auto& [k, val] : r.headers_to_add)
            if (k == "Authorization") auth = val;
        CHECK(auth == authorization_line(slurp(dir / "header-signed-request.txt")));
    }
    SECTION("presigned URL") {
        SigningResult r = signer.presign(v.req, creds, now, std::chrono::seconds(ctx["expiration_in_seconds"].get<int>()));
        CHECK(r.canonical_request == slurp(dir / "query-canonical-request.txt"));
        CHECK(r.string_to_sign == slurp(dir / "query-string-to-sign.txt"));
        CHECK(r.signature == slurp(dir / "query-signature.txt"));
        CHECK(r.presigned_query.find("X-Amz-Signature=" + r.signature) != std::string::npos);
    }
}

// The "*-normalized" vectors describe services that collapse "//", "/./" and
// "/../". S3 does not: for S3 those paths name different keys, so with S3's
// options each of them must sign exactly like its "-unnormalized" twin.
TEST_CASE("S3 signing never normalises paths (normalized vectors do not apply to S3)", "[sigv4]") {
    auto name = GENERATE(as<std::string>{}, "get-relative-normalized", "get-relative-relative-normalized",
                         "get-slash-dot-slash-normalized", "get-slash-normalized", "get-slash-pointless-dot-normalized",
                         "get-slashes-normalized", "get-space-normalized");
    CAPTURE(name);
    std::string twin = name.substr(0, name.size() - std::string("normalized").size()) + "unnormalized";
    fs::path dir = fs::path(SIGV4_VECTORS_DIR);
    VectorRequest v = parse_request(slurp(dir / name / "request.txt"));
    v.req.payload_hash = sha256_hex(v.body);
    SignerOptions s3opts;
    s3opts.add_content_sha256_header = false;  // the generic vectors do not send it
    Signer signer("us-east-1", "service", s3opts);
    Credentials creds("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY");
    auto r = signer.sign(v.req, creds, parse_iso("2015-08-30T12:36:00Z"));
    CHECK(r.canonical_request == slurp(dir / twin / "header-canonical-request.txt"));
    CHECK(r.signature == slurp(dir / twin / "header-signature.txt"));
}

TEST_CASE("signing key derivation matches the AWS documentation example", "[sigv4]") {
    Signer signer("us-east-1", "iam");
    Credentials creds("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY");
    CHECK(to_hex(signer.signing_key(creds, "20120215")) ==
          "f4780e2d9f65fa895f9c67b32ce1baf0b0d8a43505a000a1a9e090d414db404d");
    SECTION("the cache answers the same key again and a rotated secret misses it") {
        CHECK(to_hex(signer.signing_key(creds, "20120215")) ==
              "f4780e2d9f65fa895f9c67b32ce1baf0b0d8a43505a000a1a9e090d414db404d");
        Credentials rotated("AKIDEXAMPLE", "another-secret");
        CHECK(to_hex(signer.signing_key(rotated, "20120215")) !=
              "f4780e2d9f65fa895f9c67b32ce1baf0b0d8a43505a000a1a9e090d414db404d");
    }
}

// From the S3 API reference, "Example: GET Object" (header-based auth).
TEST_CASE("S3 documentation example: GET object with a Range header", "[sigv4][s3]") {
    Signer signer("us-east-1", "s3");
    Credentials creds("AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY");
    SigningRequest req;
    req.method = "GET";
    req.path = "/test.txt";
    req.headers = {{"Host", "examplebucket.s3.amazonaws.com"}, {"Range", "bytes=0-9"}};
    req.payload_hash = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
    auto r = signer.sign(req, creds, parse_iso("2013-05-24T00:00:00Z"));
    CHECK(r.signed_headers == "host;range;x-amz-content-sha256;x-amz-date");
    CHECK(r.signature == "f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41");
}

TEST_CASE("URI encoding of S3 keys", "[sigv4][s3]") {
    CHECK(uri_encode("my key", false) == "my%20key");
    CHECK(uri_encode("a+b=c&d", false) == "a%2Bb%3Dc%26d");
    CHECK(uri_encode("tilde~dot.dash-under_", false) == "tilde~dot.dash-under_");
    CHECK(uri_encode("dir/sub/file", false) == "dir/sub/file");
    CHECK(uri_encode("dir/sub", true) == "dir%2Fsub");
    CHECK(uri_encode("caf\xc3\xa9 \xe2\x82\xac", false) == "caf%C3%A9%20%E2%82%AC");
    CHECK(uri_encode("100%", false) == "100%25");
    CHECK(uri_decode(uri_encode("a b+c=d&e~/\xc3\xa9%", true)) == "a b+c=d&e~/\xc3\xa9%");

    Signer signer("us-east-1", "s3");
    CHECK(signer.canonical_uri("/bucket/a b/+/=/&/~") == "/bucket/a%20b/%2B/%3D/%26/~");
    CHECK(signer.canonical_uri("/bucket//a/./b/../c") == "/bucket//a/./b/../c");
    CHECK(Signer::canonical_query({{"prefix", "a b/c"}, {"list-type", "2"}, {"delete", ""}}) ==
          "delete=&list-type=2&prefix=a%20b%2Fc");
}

TEST_CASE("the session token is signed and sent in header mode", "[sigv4]") {
    Signer signer("us-east-1", "s3");
    Credentials creds("AKID", "SECRET", "TOKEN/+=");
    SigningRequest req;
    req.method = "GET";
    req.path = "/b/k";
    req.headers = {{"Host", "h"}};
    req.payload_hash = sha256_hex("");
    auto r = signer.sign(req, creds, parse_iso("2024-01-01T00:00:00Z"));
    CHECK(r.signed_headers == "host;x-amz-content-sha256;x-amz-date;x-amz-security-token");
    bool found = false;
    for (const auto& [k, v] : r.headers_to_add)
        if (k == "X-Amz-Security-Token") found = v == "TOKEN/+=";
    CHECK(found);
}
