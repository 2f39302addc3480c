// QMP client protocol: greeting, capabilities negotiation, commands matched
// to replies by id, asynchronous events.  It does no I/O itself: the owner
// feeds received bytes to on_data() and the client writes through its
// Transport.
//
// Callbacks must not destroy the Client (defer that to the event loop).
// on_closed is called exactly once, whatever closed the connection; the
// destructor calls nothing.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

#include "common/json_util.h"
#include "common/result.h"
#include "transport.h"

namespace kvmx::qmp {

struct Event {
  std::string name;
  nlohmann::json data;  // an object ({} when the event has none)
  int64_t seconds = 0;  // QEMU's timestamp
  int64_t micros = 0;
};

class Client {
 public:
  enum class State { kGreeting, kNegotiating, kReady, kClosed };
  using ReplyFn = std::function<void(Result<nlohmann::json>)>;
  struct Callbacks {
    std::function<void()> on_ready;
    std::function<void(const Event&)> on_event;
    std::function<void(const std::string& reason)> on_closed;
  };

  static constexpr size_t kDefaultMaxLine = 4 << 20;
  // Per message: nesting depth and values (common/json_util.h).  A message
  // over a limit closes the connection, as one over max_line does: QEMU
  // sends nothing like it.
  static constexpr size_t kMaxDepth = 64;
  static constexpr size_t kMaxValues = 1 << 18;

  Client(Transport& transport, Callbacks callbacks,
         size_t max_line = kDefaultMaxLine, size_t max_values = kMaxValues);

  // Input from the transport.
  void on_data(std::string_view data);
  void on_eof(const std::string& reason);
  // Closes the connection from our side; pending commands fail.
  void close(const std::string& reason);

  // Sends a command; `fn` gets the "return" value or a "qmp-error"
  // ("<class>: <desc>"), or "qmp-disconnected" when the connection drops
  // first.  Only in state kReady.  `oob`: as "exec-oob" when out-of-band
  // execution was negotiated (QEMU runs it at once, beside a main loop
  // that may be blocked: migrate-recover on a paused post-copy
  // destination), else as usual.
  Result<uint64_t> execute(const std::string& command,
                           const nlohmann::json& arguments, ReplyFn fn,
                           bool oob = false);
  // Before the greeting: negotiate out-of-band execution when QEMU offers
  // it (its greeting lists "oob").  Replies may then come out of order;
  // they are matched by id anyway.
  void want_oob(bool want) { want_oob_ = want; }
  bool oob() const { return oob_; }
  // Forgets a pending command: its reply is ignored, `fn` is not called.
  void cancel(uint64_t id);

  State state() const { return state_; }
  const nlohmann::json& greeting() const { return greeting_; }
  // "10.0.0" from the greeting, or "" before it.
  std::string qemu_version() const;
  uint64_t protocol_errors() const { return protocol_errors_; }
  size_t pending() const { return pending_.size(); }

 private:
  void handle_line(std::string_view line);
  void handle_reply(nlohmann::json& msg);
  void send_command(uint64_t id, const std::string& command,
                    const nlohmann::json& arguments, bool oob = false);
  void shut(const std::string& reason, bool close_transport);

  Transport& transport_;
  Callbacks cb_;
  size_t max_line_;
  size_t max_values_;
  State state_ = State::kGreeting;
  std::string inbuf_;
  size_t scanned_ = 0;  // bytes of inbuf_ known to hold no newline
  nlohmann::json greeting_;
  uint64_t next_id_ = 1;
  uint64_t caps_id_ = 0;
  std::map<uint64_t, ReplyFn> pending_;
  uint64_t protocol_errors_ = 0;
  bool want_oob_ = false;
  bool oob_ = false;      // negotiated
  bool oob_asked_ = false;
};

}  // namespace kvmx::qmp
