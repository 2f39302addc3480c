// QMP transport over a connected, non-blocking Unix stream socket watched
// by the event loop.
#pragma once

#include <functional>
#include <string>
#include <string_view>

#include "common/fd.h"
#include "loop/event_loop.h"
#include "transport.h"

namespace kvmx::qmp {

class UnixTransport : public Transport {
 public:
  using DataFn = std::function<void(std::string_view)>;
  using EofFn = std::function<void(const std::string& reason)>;

  UnixTransport(EventLoop& loop, UniqueFd fd);
  ~UnixTransport() override;
  UnixTransport(const UnixTransport&) = delete;
  UnixTransport& operator=(const UnixTransport&) = delete;

  // Starts watching the socket.  `on_eof` is called once, after the socket
  // was closed, when the peer hangs up or an I/O error occurs.
  Result<void> start(DataFn on_data, EofFn on_eof);

  void send(std::string data) override;
  void close() override;
  // Stops (true) or resumes reading: the peer's data waits in the socket
  // (back-pressure while the journal cannot take violations).  A hang-up
  // is still noticed, and what is left then is read.
  void set_paused(bool paused);
  bool open() const { return static_cast<bool>(fd_); }

 private:
  void on_events(uint32_t events);
  void update_interest();
  void fail(const std::string& reason);

  EventLoop& loop_;
  UniqueFd fd_;
  std::string out_;
  bool paused_ = false;
  DataFn on_data_;
  EofFn on_eof_;
};

}  // namespace kvmx::qmp
