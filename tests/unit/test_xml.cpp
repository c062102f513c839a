// Parsing of S3's XML responses, including entity-escaped keys and the
// "200 with an <Error> body" answer of CompleteMultipartUpload.
#include <catch2/catch.hpp>

#include "s3/xml.h"

using namespace bottomless;
using namespace bottomless::s3;

TEST_CASE("ListObjectsV2 page with entity-escaped keys and prefixes", "[xml]") {
    const char* body = R"(<?xml version="1.0" encoding="UTF-8"?>
<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">
  <Name>bucket</Name><Prefix>db/</Prefix><KeyCount>2</KeyCount><MaxKeys>1000</MaxKeys>
  <IsTruncated>true</IsTruncated>
  <NextContinuationToken>1ueGcxLPRx1Tr/XYExHnhbYLgveDs2J/wm36Hy4vbOwM=</NextContinuationToken>
  <Contents><Key>db/a&amp;b &lt;c&gt; &quot;d&quot; &#x00e9;</Key><LastModified>2026-11-21T10:00:00.000Z</LastModified>
    <ETag>&quot;9b2cf535f27731c974343645a3985328&quot;</ETag><Size>1234567890123</Size><StorageClass>STANDARD</StorageClass></Contents>
  <Contents><Key>db/plain</Key><Size>0</Size><ETag>"d41d8cd98f00b204e9800998ecf8427e"</ETag></Contents>
  <CommonPrefixes><Prefix>db/gen1/</Prefix></CommonPrefixes>
  <CommonPrefixes><Prefix>db/gen&amp;2/</Prefix></CommonPrefixes>
</ListBucketResult>)";
    auto page = xml::parse_list_objects_v2(body);
    REQUIRE(page.ok());
    REQUIRE(page->objects.size() == 2);
    CHECK(page->objects[0].key == "db/a&b <c> \"d\" \xc3\xa9");
    CHECK(page->objects[0].size == 1234567890123ull);
    CHECK(page->objects[0].etag == "9b2cf535f27731c974343645a3985328");
    CHECK(page->objects[0].last_modified == "2026-11-21T10:00:00.000Z");
    CHECK(page->objects[1].etag == "d41d8cd98f00b204e9800998ecf8427e");
    CHECK(page->is_truncated);
    CHECK(page->next_continuation_token == "1ueGcxLPRx1Tr/XYExHnhbYLgveDs2J/wm36Hy4vbOwM=");
    CHECK(page->common_prefixes == std::vector<std::string>{"db/gen1/", "db/gen&2/"});
}

TEST_CASE("a truncated listing without a token is refused, not looped on", "[xml]") {
    auto page = xml::parse_list_objects_v2(
        "<ListBucketResult><IsTruncated>true</IsTruncated><Contents><Key>k</Key></Contents></ListBucketResult>");
    REQUIRE_FALSE(page.ok());
    CHECK(page.error().kind == ErrorKind::Corrupt);
}

TEST_CASE("malformed XML is a Corrupt error naming the response", "[xml]") {
    auto page = xml::parse_list_objects_v2("<ListBucketResult><Contents>");
    REQUIRE_FALSE(page.ok());
    CHECK(page.error().kind == ErrorKind::Corrupt);
    CHECK(page.error().message.find("ListObjectsV2") != std::string::npos);
}

TEST_CASE("S3 error documents", "[xml]") {
    auto e = xml::parse_error(R"(<?xml version="1.0" encoding="UTF-8"?>
<Error><Code>NoSuchKey</Code><Message>The resource you requested does not exist &amp; never did</Message>
<Resource>/bucket/k</Resource><RequestId>4442587FB7D0A2F9</RequestId></Error>)");
    REQUIRE(e.has_value());
    CHECK(e->code == "NoSuchKey");
    CHECK(e->message == "The resource you requested does not exist & never did");
    CHECK(e->request_id == "4442587FB7D0A2F9");
    CHECK(e->resource == "/bucket/k");
    CHECK_FALSE(xml::parse_error("").has_value());
    CHECK_FALSE(xml::parse_error("<ListBucketResult/>").has_value());
    CHECK_FALSE(xml::parse_error("not xml at all").has_value());
}

TEST_CASE("multipart responses", "[xml]") {
    auto id = xml::parse_initiate_multipart(
        "<InitiateMultipartUploadResult><Bucket>b</Bucket><Key>k</Key><UploadId>2~abc&amp;def</UploadId>"
        "</InitiateMultipartUploadResult>");
    REQUIRE(id.ok());
    CHECK(*id == "2~abc&def");

    auto done = xml::parse_complete_multipart(
        "<CompleteMultipartUploadResult><Location>x</Location><ETag>\"3858f62230ac3c915f300c664312c11f-9\"</ETag>"
        "</CompleteMultipartUploadResult>");
    REQUIRE(done.ok());
    CHECK(*done == "3858f62230ac3c915f300c664312c11f-9");

    SECTION("Ceph's empty ETag is accepted") {
        auto ceph = xml::parse_complete_multipart("<CompleteMultipartUploadResult><ETag></ETag></CompleteMultipartUploadResult>");
        REQUIRE(ceph.ok());
        CHECK(ceph->empty());
    }
    SECTION("a 200 carrying an <Error> is an error") {
        auto err = xml::parse_complete_multipart(
            "<Error><Code>InternalError</Code><Message>We encountered an internal error.</Message></Error>");
        REQUIRE_FALSE(err.ok());
        CHECK(err.error().code == "InternalError");
    }
}

TEST_CASE("DeleteObjects result and request bodies", "[xml]") {
    auto out = xml::parse_delete_result(
        "<DeleteResult><Deleted><Key>a</Key></Deleted><Error><Key>b&amp;c</Key><Code>AccessDenied</Code>"
        "<Message>Access Denied</Message></Error></DeleteResult>");
    REQUIRE(out.ok());
    CHECK(out->deleted == std::vector<std::string>{"a"});
    REQUIRE(out->failed.size() == 1);
    CHECK(out->failed[0].key == "b&c");
    CHECK(out->failed[0].code == "AccessDenied");

    std::string body = xml::build_delete({"x&y", "<z>"}, true);
    CHECK(body.find("<Quiet>true</Quiet>") != std::string::npos);
    CHECK(body.find("<Key>x&amp;y</Key>") != std::string::npos);
    CHECK(body.find("<Key>&lt;z&gt;</Key>") != std::string::npos);

    std::string complete = xml::build_complete_multipart({{1, "aa"}, {2, "bb"}});
    CHECK(complete.find("<Part><PartNumber>1</PartNumber><ETag>\"aa\"</ETag></Part>") != std::string::npos);
}
