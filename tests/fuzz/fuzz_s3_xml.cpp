// Fuzzes the S3 response parsers (s3/xml.h): every byte of a response body
// comes from the server, which may be hostile or broken.
//
// Input: a response body, given to every parser (they are cheap, and a
// server may answer any request with any document).
#include <cstdint>
#include <string>

#include "fuzz_common.h"
#include "s3/xml.h"

using namespace bottomless;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    fuzz::quiet_logs();
    std::string_view body = fuzz::as_view(data, size);
    (void)s3::xml::parse_error(body);
    if (auto page = s3::xml::parse_list_objects_v2(body)) {
        // A truncated page must say where to continue.
        if (page->is_truncated) FUZZ_CHECK(!page->next_continuation_token.empty());
    }
    (void)s3::xml::parse_initiate_multipart(body);
    (void)s3::xml::parse_complete_multipart(body);
    (void)s3::xml::parse_delete_result(body);
    (void)s3::xml::strip_quotes(body);
    return 0;
}
