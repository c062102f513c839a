// S3's XML bodies, parsed and built with pugixml (a maintained parser that
// decodes entities correctly; S3 keys may hold '&', '<' and control
// characters, so hand-rolled string scanning is not an option).
#pragma once

#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "s3/result.h"
#include "s3/types.h"

namespace bottomless::s3::xml {

// nullopt when the body is not an <Error> document.
std::optional<ErrorBody> parse_error(std::string_view body);
Result<ListPage> parse_list_objects_v2(std::string_view body);
Result<std::string> parse_initiate_multipart(std::string_view body);  // the UploadId
// CompleteMultipartUpload may answer 200 with an <Error> body: that is an error here.
Result<std::string> parse_complete_multipart(std::string_view body);  // the ETag (may be empty: Ceph)
Result<DeleteOutcome> parse_delete_result(std::string_view body);

std::string build_complete_multipart(const std::vector<CompletedPart>& parts);
std::string build_delete(const std::vector<std::string>& keys, bool quiet);

std::string strip_quotes(std::string_view etag);

}  // namespace bottomless::s3::xml
