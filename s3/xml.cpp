// pugixml-based parsing of S3 responses. Element names are matched without
// namespace prefixes; unknown elements are ignored (servers add fields).
#include "s3/xml.h"

#include <pugixml.hpp>

#include <sstream>

#include "s3/log.h"

namespace bottomless::s3::xml {
namespace {

Result<pugi::xml_document*> load(pugi::xml_document& doc, std::string_view body, const char* what) {
    pugi::xml_parse_result r = doc.load_buffer(body.data(), body.size(), pugi::parse_default, pugi::encoding_utf8);
    if (!r) {
        return make_error(ErrorKind::Corrupt,
                          std::string("cannot parse the server's ") + what + " response as XML: " + r.description() +
                              " at byte " + std::to_string(r.offset),
                          "MalformedXML");
    }
    return &doc;
}

std::string text(const pugi::xml_node& parent, const char* name) {
    return parent.child(name).text().as_string();
}

uint64_t to_u64(const std::string& s) {
    uint64_t v = 0;
    for (char c : s) {
        if (c < '0' || c > '9') break;
        v = v * 10 + static_cast<uint64_t>(c - '0');
    }
    return v;
}

}  // namespace

std::string strip_quotes(std::string_view etag) {
    if (etag.size() >= 2 && etag.front() == '"' && etag.back() == '"') etag = etag.substr(1, etag.size() - 2);
    // Some servers send &quot; which pugixml already decoded; nothing else to do.
    return std::string(etag);
}

std::optional<ErrorBody> parse_error(std::string_view body) {
    if (body.empty()) return std::nullopt;
    pugi::xml_document doc;
    if (!load(doc, body, "error")) return std::nullopt;
    pugi::xml_node err = doc.child("Error");
    if (!err) return std::nullopt;
    ErrorBody e;
    e.code = text(err, "Code");
    e.message = text(err, "Message");
    e.request_id = text(err, "RequestId");
    e.resource = text(err, "Resource");
    return e;
}

Result<ListPage> parse_list_objects_v2(std::string_view body) {
    pugi::xml_document doc;
    if (auto r = load(doc, body, "ListObjectsV2"); !r) return std::move(r).error();
    pugi::xml_node root = doc.child("ListBucketResult");
    if (!root) return make_error(ErrorKind::Corrupt, "ListObjectsV2 response has no ListBucketResult element", "MalformedXML");
    ListPage page;
    page.is_truncated = std::string(text(root, "IsTruncated")) == "true";
    page.next_continuation_token = text(root, "NextContinuationToken");
    for (pugi::xml_node c : root.children("Contents")) {
        ObjectInfo o;
        o.key = text(c, "Key");
        o.size = to_u64(text(c, "Size"));
        o.etag = strip_quotes(text(c, "ETag"));
        o.last_modified = text(c, "LastModified");
        page.objects.push_back(std::move(o));
    }
    for (pugi::xml_node p : root.children("CommonPrefixes")) page.common_prefixes.push_back(text(p, "Prefix"));
    if (page.is_truncated && page.next_continuation_token.empty())
        return make_error(ErrorKind::Corrupt, "ListObjectsV2 page is truncated but carries no NextContinuationToken",
                          "MalformedXML");
    return page;
}

Result<std::string> parse_initiate_multipart(std::string_view body) {
    pugi::xml_document doc;
    if (auto r = load(doc, body, "CreateMultipartUpload"); !r) return std::move(r).error();
    std::string id = text(doc.child("InitiateMultipartUploadResult"), "UploadId");
    if (id.empty()) return make_error(ErrorKind::Corrupt, "CreateMultipartUpload response has no UploadId", "MalformedXML");
    return id;
}

Result<std::string> parse_complete_multipart(std::string_view body) {
    pugi::xml_document doc;
    if (auto r = load(doc, body, "CompleteMultipartUpload"); !r) return std::move(r).error();
    if (pugi::xml_node err = doc.child("Error")) {
        // Server text: escaped before it can reach a terminal or a log line.
        Error e = make_error(ErrorKind::Server, "CompleteMultipartUpload failed: " + log::printable(text(err, "Message"), 512),
                             log::printable(text(err, "Code"), 64));
        e.request_id = log::printable(text(err, "RequestId"), 128);
        if (e.code == "InternalError" || e.code == "SlowDown") e.kind = ErrorKind::Throttled;
        return e;
    }
    pugi::xml_node root = doc.child("CompleteMultipartUploadResult");
    if (!root) return make_error(ErrorKind::Corrupt, "CompleteMultipartUpload response has no result element", "MalformedXML");
    return strip_quotes(text(root, "ETag"));
}

Result<DeleteOutcome> parse_delete_result(std::string_view body) {
    pugi::xml_document doc;
    if (auto r = load(doc, body, "DeleteObjects"); !r) return std::move(r).error();
    pugi::xml_node root = doc.child("DeleteResult");
    if (!root) return make_error(ErrorKind::Corrupt, "DeleteObjects response has no DeleteResult element", "MalformedXML");
    DeleteOutcome out;
    for (pugi::xml_node d : root.children("Deleted")) out.deleted.push_back(text(d, "Key"));
    for (pugi::xml_node e : root.children("Error"))
        out.failed.push_back(DeleteFailure{text(e, "Key"), text(e, "Code"), text(e, "Message")});
    return out;
}

namespace {
std::string to_string(const pugi::xml_document& doc) {
    std::ostringstream ss;
    doc.save(ss, "", pugi::format_raw, pugi::encoding_utf8);
    return ss.str();
}
}  // namespace

std::string build_complete_multipart(const std::vector<CompletedPart>& parts) {
    pugi::xml_document doc;
    pugi::xml_node root = doc.append_child("CompleteMultipartUpload");
    root.append_attribute("xmlns") = "http://s3.amazonaws.com/doc/2006-03-01/";
    for (const auto& p : parts) {
        pugi::xml_node part = root.append_child("Part");
        part.append_child("PartNumber").text().set(p.number);
        part.append_child("ETag").text().set(("\"" + p.etag + "\"").c_str());
    }
    return to_string(doc);
}

std::string build_delete(const std::vector<std::string>& keys, bool quiet) {
    pugi::xml_document doc;
    pugi::xml_node root = doc.append_child("Delete");
    root.append_attribute("xmlns") = "http://s3.amazonaws.com/doc/2006-03-01/";
    if (quiet) root.append_child("Quiet").text().set("true");
    for (const auto& k : keys) root.append_child("Object").append_child("Key").text().set(k.c_str());
    return to_string(doc);
}

}  // namespace bottomless::s3::xml

