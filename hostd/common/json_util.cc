#include "json_util.h"

namespace kvmx {

Result<nlohmann::json> parse_json(std::string_view text,
                                  const JsonLimits& limits) {
  // One pass over the text: brackets outside strings open and close
  // levels; every container and every ',' is a value (an upper bound for
  // the values nlohmann builds, within one per container).  Invalid JSON
  // may be counted wrongly; the parser rejects it anyway.
  size_t depth = 0, values = 1;
  bool in_string = false, escaped = false;
  for (char c : text) {
    if (in_string) {
      if (escaped)
        escaped = false;
      else if (c == '\\')
        escaped = true;
      else if (c == '"')
        in_string = false;
      continue;
    }
    switch (c) {
      case '"':
        in_string = true;
        break;
      case '[':
      case '{':
        if (++depth > limits.max_depth)
          return make_error("json-too-deep",
                            "JSON nested deeper than " +
                                std::to_string(limits.max_depth) + " levels");
        [[fallthrough]];
      case ',':
        if (++values > limits.max_values)
          return make_error("json-too-many-values",
                            "JSON with more than " +
                                std::to_string(limits.max_values) + " values");
        break;
      case ']':
      case '}':
        if (depth > 0) depth--;
        break;
      default:
        break;
    }
  }
  try {
    return nlohmann::json::parse(text);
  } catch (const nlohmann::json::parse_error& e) {
    return make_error("json-parse", "not valid JSON (error at byte " +
                                        std::to_string(e.byte) + ")");
  } catch (const nlohmann::json::exception&) {
    return make_error("json-parse", "not valid JSON");
  }
}

}  // namespace kvmx
