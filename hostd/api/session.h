// One API client's buffers and flow control, without I/O: newline framing
// with a line limit, one request in flight at a time (responses keep request
// order), and a bounded output queue.
#pragma once

#include <cstddef>
#include <deque>
#include <string>
#include <string_view>

namespace kvmx::api {

class Session {
 public:
  struct Limits {
    size_t max_line = 64 * 1024;      // a longer request ends the session
    size_t max_output = 1024 * 1024;  // queued output beyond it: drop client
    size_t pause_output = 64 * 1024;  // stop taking requests above this
  };
  enum class Kind { kNone, kLine, kTooLong };
  struct Item {
    Kind kind = Kind::kNone;
    std::string line;
  };

  explicit Session(Limits limits) : limits_(limits) {}

  void feed(std::string_view data);
  void feed_eof() { eof_ = true; }
  // The next request line (without '\r\n', blank lines skipped), kTooLong,
  // or kNone when no complete line is buffered.  At end of input a last
  // unterminated line counts as complete.
  Item next();

  // Whether the server may dispatch the next line / read more input.
  bool can_dispatch() const {
    return !busy && !closing && output_bytes_ < limits_.pause_output;
  }
  bool wants_read() const { return can_dispatch() && !eof_ && !maybe_line_; }
  bool eof() const { return eof_; }
  // Input may hold a complete request line not taken yet.
  bool maybe_line() const { return maybe_line_; }
  // End of input reached and every line taken.
  bool input_done() const { return eof_ && pos_ == in_.size(); }

  // Queues a line ('\n' appended).  An event (`bounded`) that would take
  // the queue over max_output is refused (false): the caller drops the
  // client.  Responses are always queued; one request at a time and the
  // pause_output threshold bound them.
  bool enqueue(std::string line, bool bounded);
  bool has_output() const { return output_bytes_ > 0; }
  size_t output_bytes() const { return output_bytes_; }
  std::string_view front_output() const;
  void consume_output(size_t n);

  bool busy = false;        // a request is being handled
  bool subscribed = false;  // receives events
  bool closing = false;     // close once the output is flushed

 private:
  Item too_long();
  void compact();

  Limits limits_;
  std::string in_;
  size_t pos_ = 0;           // start of the first line not yet taken
  size_t scanned_ = 0;       // bytes after pos_ known to hold no newline
  bool maybe_line_ = false;  // in_ may hold a complete line
  bool eof_ = false;
  std::deque<std::string> out_;
  size_t out_offset_ = 0;  // bytes of out_.front() already sent
  size_t output_bytes_ = 0;
};

}  // namespace kvmx::api
