// libFuzzer target: the API's request framing (Session) and parser
// (parse_request), fed a client's byte stream.  Beyond not crashing: every
// line is either a request or an error with one of the documented codes,
// and a parsed request's response envelope serializes.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string_view>

#include "api/request.h"
#include "api/session.h"
#include "common/json_util.h"

using namespace kvmx;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string_view in(reinterpret_cast<const char*>(data), size);
  api::Session::Limits lim;
  lim.max_line = 64 * 1024;
  api::Session s(lim);
  // Two reads, split where the first byte says.
  size_t cut = size ? data[0] * size / 256 : 0;
  s.feed(in.substr(0, cut));
  for (int round = 0; round < 2; round++) {
    for (;;) {
      auto item = s.next();
      if (item.kind == api::Session::Kind::kNone) break;
      if (item.kind == api::Session::Kind::kTooLong) break;
      if (item.line.size() > lim.max_line) std::abort();
      nlohmann::json id;
      auto req = api::parse_request(item.line, &id);
      if (req) {
        (void)json_dump(api::ok_response(req->id, nlohmann::json::object()));
        continue;
      }
      std::string_view code = req.error().code;
      if (code != api::code::kParse && code != api::code::kInvalid &&
          code != api::code::kUnknownOp)
        std::abort();
      (void)json_dump(api::error_response(id, req.error()));
    }
    if (round == 0) {
      s.feed(in.substr(cut));
      s.feed_eof();
    }
  }
  return 0;
}
