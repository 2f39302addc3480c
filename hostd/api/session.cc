#include "session.h"

namespace kvmx::api {

void Session::feed(std::string_view data) {
  if (closing) return;
  in_.append(data);
  maybe_line_ = true;
}

Session::Item Session::next() {
  for (;;) {
    size_t nl = in_.find('\n', pos_ + scanned_);
    size_t avail = in_.size() - pos_;
    if (nl == std::string::npos) {
      scanned_ = avail;
      if (avail > limits_.max_line) return too_long();
      if (!eof_ || avail == 0) {
        compact();
        maybe_line_ = false;
        return {};
      }
      nl = in_.size();  // at end of input, the last line needs no newline
    }
    if (nl - pos_ > limits_.max_line) return too_long();
    std::string_view line(in_.data() + pos_, nl - pos_);
    pos_ = nl < in_.size() ? nl + 1 : nl;
    scanned_ = 0;
    size_t first = line.find_first_not_of(" \t\r");
    if (first == std::string_view::npos) continue;  // blank line
    size_t last = line.find_last_not_of(" \t\r");
    return {Kind::kLine, std::string(line.substr(first, last - first + 1))};
  }
}

Session::Item Session::too_long() {
  in_.clear();
  pos_ = 0;
  scanned_ = 0;
  maybe_line_ = false;
  return {Kind::kTooLong, {}};
}

void Session::compact() {
  in_.erase(0, pos_);
  pos_ = 0;
}

bool Session::enqueue(std::string line, bool bounded) {
  line += '\n';
  if (bounded && output_bytes_ + line.size() > limits_.max_output)
    return false;
  output_bytes_ += line.size();
  out_.push_back(std::move(line));
  return true;
}

std::string_view Session::front_output() const {
  if (out_.empty()) return {};
  return std::string_view(out_.front()).substr(out_offset_);
}

void Session::consume_output(size_t n) {
  while (n > 0 && !out_.empty()) {
    size_t left = out_.front().size() - out_offset_;
    size_t take = n < left ? n : left;
    out_offset_ += take;
    output_bytes_ -= take;
    n -= take;
    if (out_offset_ == out_.front().size()) {
      out_.pop_front();
      out_offset_ = 0;
    }
  }
}

}  // namespace kvmx::api
