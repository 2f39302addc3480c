#include "unix_transport.h"

#include <sys/socket.h>
#include <unistd.h>

#include <cstring>

namespace kvmx::qmp {

UnixTransport::UnixTransport(EventLoop& loop, UniqueFd fd)
    : loop_(loop), fd_(std::move(fd)) {}

UnixTransport::~UnixTransport() { close(); }

Result<void> UnixTransport::start(DataFn on_data, EofFn on_eof) {
  on_data_ = std::move(on_data);
  on_eof_ = std::move(on_eof);
  return loop_.add(fd_.get(),
                   (paused_ ? 0u : EPOLLIN | EPOLLRDHUP) |
                       (out_.empty() ? 0u : EPOLLOUT),
                   [this](uint32_t ev) { on_events(ev); });
}

void UnixTransport::send(std::string data) {
  if (!fd_) return;
  out_ += data;
  update_interest();
}

void UnixTransport::close() {
  if (!fd_) return;
  loop_.remove(fd_.get());
  fd_.reset();
  out_.clear();
}

void UnixTransport::set_paused(bool paused) {
  paused_ = paused;
  update_interest();
}

void UnixTransport::update_interest() {
  if (!fd_) return;
  uint32_t ev = (paused_ ? 0u : EPOLLIN | EPOLLRDHUP) |
                (out_.empty() ? 0u : EPOLLOUT);
  (void)loop_.modify(fd_.get(), ev);
}

void UnixTransport::fail(const std::string& reason) {
  close();
  if (on_eof_) {
    auto fn = std::move(on_eof_);
    on_eof_ = nullptr;
    fn(reason);
  }
}

void UnixTransport::on_events(uint32_t events) {
  if ((events & EPOLLOUT) && !out_.empty()) {
    ssize_t n = ::send(fd_.get(), out_.data(), out_.size(),
                       MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n < 0 && errno != EAGAIN && errno != EINTR) {
      fail(std::string("write failed: ") + std::strerror(errno));
      return;
    }
    if (n > 0) out_.erase(0, static_cast<size_t>(n));
    update_interest();
  }
  if (events & (EPOLLIN | EPOLLHUP | EPOLLERR | EPOLLRDHUP)) {
    char buf[65536];
    ssize_t n = ::read(fd_.get(), buf, sizeof(buf));
    if (n < 0) {
      if (errno == EAGAIN || errno == EINTR) return;
      fail(std::string("read failed: ") + std::strerror(errno));
      return;
    }
    if (n == 0) {
      fail("peer closed the connection");
      return;
    }
    if (on_data_) on_data_(std::string_view(buf, static_cast<size_t>(n)));
  }
}

}  // namespace kvmx::qmp
