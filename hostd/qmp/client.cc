#include "client.h"

#include "common/json_util.h"
#include "common/log.h"

namespace kvmx::qmp {

using nlohmann::json;

Client::Client(Transport& transport, Callbacks callbacks, size_t max_line,
               size_t max_values)
    : transport_(transport), cb_(std::move(callbacks)), max_line_(max_line),
      max_values_(max_values) {}

std::string Client::qemu_version() const {
  const json* v = &greeting_;
  for (const char* key : {"QMP", "version", "qemu"}) {
    if (!v->is_object() || !v->contains(key)) return "";
    v = &(*v)[key];
  }
  auto part = [&](const char* k) {
    auto n = json_i64(*v, k);
    return n ? std::to_string(*n) : std::string("?");
  };
  return part("major") + "." + part("minor") + "." + part("micro");
}

void Client::on_data(std::string_view data) {
  if (state_ == State::kClosed) return;
  inbuf_.append(data);
  size_t start = 0;
  while (state_ != State::kClosed) {
    size_t nl = inbuf_.find('\n', start + scanned_);
    if (nl == std::string::npos) {
      scanned_ = inbuf_.size() - start;
      break;
    }
    std::string_view line(inbuf_.data() + start, nl - start);
    scanned_ = 0;
    size_t next = nl + 1;
    if (line.size() > max_line_) {
      protocol_errors_++;
      shut("QMP message over " + std::to_string(max_line_) + " bytes", true);
      return;
    }
    try {
      handle_line(line);
    } catch (const std::exception& e) {  // a malformed message, not fatal
      protocol_errors_++;
      log::warn("Ignored a malformed QMP message", {{"what", e.what()}});
    }
    start = next;
  }
  if (state_ == State::kClosed) return;
  inbuf_.erase(0, start);
  if (inbuf_.size() > max_line_) {
    protocol_errors_++;
    shut("QMP message over " + std::to_string(max_line_) + " bytes", true);
  }
}

void Client::on_eof(const std::string& reason) { shut(reason, false); }

void Client::close(const std::string& reason) { shut(reason, true); }

void Client::shut(const std::string& reason, bool close_transport) {
  if (state_ == State::kClosed) return;
  state_ = State::kClosed;
  if (close_transport) transport_.close();
  inbuf_.clear();
  auto pending = std::move(pending_);
  pending_.clear();
  for (auto& [id, fn] : pending)
    if (fn) fn(make_error("qmp-disconnected", "QMP connection closed: " + reason));
  if (cb_.on_closed) cb_.on_closed(reason);
}

void Client::send_command(uint64_t id, const std::string& command,
                          const json& arguments, bool oob) {
  json msg = {{oob ? "exec-oob" : "execute", command}, {"id", id}};
  if (!arguments.is_null() && !arguments.empty())
    msg["arguments"] = arguments;
  transport_.send(msg.dump() + "\n");
}

Result<uint64_t> Client::execute(const std::string& command,
                                 const json& arguments, ReplyFn fn,
                                 bool oob) {
  if (state_ != State::kReady)
    return make_error("qmp-not-ready", "QMP connection is not ready");
  uint64_t id = next_id_++;
  pending_.emplace(id, std::move(fn));
  send_command(id, command, arguments, oob && oob_);
  return id;
}

void Client::cancel(uint64_t id) { pending_.erase(id); }

void Client::handle_line(std::string_view line) {
  while (!line.empty() && (line.back() == '\r' || line.back() == ' '))
    line.remove_suffix(1);
  if (line.empty()) return;
  auto parsed = parse_json(line, JsonLimits{kMaxDepth, max_values_});
  if (!parsed && parsed.error().code != "json-parse") {
    // Valid QMP never looks like this: a hostile or broken peer.
    protocol_errors_++;
    shut("QMP message rejected: " + parsed.error().message, true);
    return;
  }
  json msg = parsed ? std::move(*parsed) : json();
  if (!parsed || !msg.is_object()) {
    protocol_errors_++;
    if (state_ == State::kGreeting) {
      shut("peer is not a QMP server (bad greeting)", true);
      return;
    }
    log::warn("Ignored a QMP message that is not a JSON object");
    return;
  }

  switch (state_) {
    case State::kGreeting: {
      auto it = msg.find("QMP");
      if (it == msg.end() || !it->is_object()) {
        protocol_errors_++;
        shut("peer is not a QMP server (no QMP greeting)", true);
        return;
      }
      bool offered = false;
      if (const json* caps = json_field(*it, "capabilities");
          caps && caps->is_array())
        for (const auto& c : *caps) offered = offered || c == "oob";
      greeting_ = std::move(msg);
      state_ = State::kNegotiating;
      caps_id_ = next_id_++;
      oob_asked_ = want_oob_ && offered;
      send_command(caps_id_, "qmp_capabilities",
                   oob_asked_ ? json{{"enable", json::array({"oob"})}}
                              : json());
      return;
    }
    case State::kNegotiating: {
      if (msg.contains("event")) return;  // none expected before caps
      auto id = msg.find("id");
      if (id == msg.end() || !id->is_number_unsigned() ||
          id->get<uint64_t>() != caps_id_) {
        protocol_errors_++;
        return;
      }
      if (!msg.contains("return")) {
        std::string desc =
            json_string(msg["error"], "desc").value_or("no return value");
        shut("qmp_capabilities failed: " + desc, true);
        return;
      }
      state_ = State::kReady;
      oob_ = oob_asked_;
      if (cb_.on_ready) cb_.on_ready();
      return;
    }
    case State::kReady:
      break;
    case State::kClosed:
      return;
  }

  if (auto ev = msg.find("event"); ev != msg.end()) {
    if (!ev->is_string()) {
      protocol_errors_++;
      return;
    }
    Event e;
    e.name = ev->get<std::string>();
    auto data = msg.find("data");
    if (data != msg.end() && data->is_object())
      e.data = std::move(*data);  // no copy of what the peer built
    else
      e.data = json::object();
    if (auto ts = msg.find("timestamp"); ts != msg.end() && ts->is_object()) {
      e.seconds = json_i64(*ts, "seconds").value_or(0);
      e.micros = json_i64(*ts, "microseconds").value_or(0);
    }
    if (cb_.on_event) cb_.on_event(e);
    return;
  }
  handle_reply(msg);
}

void Client::handle_reply(json& msg) {
  auto id = msg.find("id");
  bool is_return = msg.contains("return");
  bool is_error = msg.contains("error");
  if (!is_return && !is_error) {
    protocol_errors_++;
    return;
  }
  if (id == msg.end() || !id->is_number_unsigned()) {
    protocol_errors_++;
    if (is_error)
      log::warn("QMP error without a command id",
                {{"desc", json_string(msg["error"], "desc").value_or("")}});
    return;
  }
  auto it = pending_.find(id->get<uint64_t>());
  if (it == pending_.end()) return;  // cancelled, or not ours
  ReplyFn fn = std::move(it->second);
  pending_.erase(it);
  if (!fn) return;
  if (is_return) {
    fn(Result<json>(std::move(msg["return"])));
    return;
  }
  const json& err = msg["error"];
  std::string cls = json_string(err, "class").value_or("GenericError");
  std::string desc = json_string(err, "desc").value_or("");
  fn(make_error("qmp-error", cls + ": " + desc));
}

}  // namespace kvmx::qmp
