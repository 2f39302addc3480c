#include "metadata.h"

namespace kvmx::libvirt {
namespace {

Error bad(const std::string& why) {
  return make_error("bad-metadata", "hostd metadata: " + why);
}

bool is_space(char c) {
  return c == ' ' || c == '\t' || c == '\n' || c == '\r';
}

// The five predefined XML entities; anything else stays as it is (and then
// matches neither "yes" nor "no").
std::string decode(std::string_view raw) {
  static constexpr std::pair<std::string_view, char> kEntities[] = {
      {"&amp;", '&'}, {"&lt;", '<'}, {"&gt;", '>'}, {"&quot;", '"'},
      {"&apos;", '\''}};
  std::string out;
  for (size_t i = 0; i < raw.size();) {
    bool replaced = false;
    if (raw[i] == '&') {
      for (const auto& [name, c] : kEntities) {
        if (raw.substr(i, name.size()) == name) {
          out += c;
          i += name.size();
          replaced = true;
          break;
        }
      }
    }
    if (!replaced) out += raw[i++];
  }
  return out;
}

}  // namespace

Result<bool> parse_opt_in(std::string_view xml) {
  size_t i = 0;
  auto skip_space = [&] {
    while (i < xml.size() && is_space(xml[i])) i++;
  };
  // An XML declaration or comments may come first.
  for (;;) {
    skip_space();
    std::string_view rest = xml.substr(i);
    std::string_view end;
    if (rest.starts_with("<?"))
      end = "?>";
    else if (rest.starts_with("<!--"))
      end = "-->";
    else
      break;
    size_t e = xml.find(end, i + 2);
    if (e == std::string_view::npos) return bad("unterminated '" +
                                                std::string(rest.substr(0, 4)) +
                                                "'");
    i = e + end.size();
  }
  if (i >= xml.size() || xml[i] != '<') return bad("not an XML element");
  size_t start = ++i;
  while (i < xml.size() && !is_space(xml[i]) && xml[i] != '/' && xml[i] != '>')
    i++;
  std::string_view qname = xml.substr(start, i - start);
  std::string_view local = qname.substr(qname.find(':') + 1);
  if (local != "hostd")
    return bad("element <" + std::string(qname) + "> is not <hostd>");

  std::optional<std::string> attach;
  for (;;) {
    skip_space();
    if (i >= xml.size()) return bad("unterminated <" + std::string(qname) + ">");
    if (xml[i] == '>' || xml.substr(i).starts_with("/>")) break;
    size_t name_start = i;
    while (i < xml.size() && !is_space(xml[i]) && xml[i] != '=' &&
           xml[i] != '>' && xml[i] != '/')
      i++;
    std::string_view name = xml.substr(name_start, i - name_start);
    skip_space();
    if (name.empty() || i >= xml.size() || xml[i] != '=')
      return bad("malformed attribute '" + std::string(name) + "'");
    i++;
    skip_space();
    if (i >= xml.size() || (xml[i] != '"' && xml[i] != '\''))
      return bad("attribute '" + std::string(name) + "' is not quoted");
    char quote = xml[i++];
    size_t close = xml.find(quote, i);
    if (close == std::string_view::npos)
      return bad("attribute '" + std::string(name) + "' is not terminated");
    std::string value = decode(xml.substr(i, close - i));
    i = close + 1;
    if (name == "attach") {
      if (attach) return bad("attach is given twice");
      attach = std::move(value);
    }
  }
  if (!attach) return bad("no attach attribute (attach='yes' opts in)");
  if (*attach == "yes") return true;
  if (*attach == "no") return false;
  return bad("attach='" + *attach + "' is neither 'yes' nor 'no'");
}

bool opts_in(const std::optional<std::string>& metadata,
             const std::string& metadata_error, std::string* why) {
  std::string reason;
  bool yes = false;
  if (!metadata_error.empty()) {
    reason = "its metadata could not be read: " + metadata_error;
  } else if (!metadata) {
    reason = "it has no <kvmx:hostd attach='yes'/> metadata";
  } else if (auto r = parse_opt_in(*metadata); !r) {
    reason = r.error().message;
  } else if (!*r) {
    reason = "its hostd metadata says attach='no'";
  } else {
    yes = true;
  }
  if (why) *why = std::move(reason);
  return yes;
}

}  // namespace kvmx::libvirt
