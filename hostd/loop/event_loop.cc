#include "event_loop.h"

#include <cerrno>
#include <exception>

#include "common/log.h"

namespace kvmx {

Result<std::unique_ptr<EventLoop>> EventLoop::create() {
  UniqueFd epfd(::epoll_create1(EPOLL_CLOEXEC));
  if (!epfd) return sys_error("epoll", "Failed to create an epoll instance");
  return std::unique_ptr<EventLoop>(new EventLoop(std::move(epfd)));
}

template <typename Fn>
void EventLoop::guarded(Fn&& fn) {
  try {
    fn();
  } catch (const std::exception& e) {
    log::error("Unhandled exception in event handler, ignored",
               {{"what", e.what()}});
  } catch (...) {
    log::error("Unhandled non-standard exception in event handler, ignored");
  }
}

Result<void> EventLoop::add(int fd, uint32_t events, FdCallback cb) {
  if (by_fd_.count(fd))
    return make_error("epoll", "fd " + std::to_string(fd) + " already watched");
  uint64_t token = next_token_++;
  epoll_event ev{};
  ev.events = events;
  ev.data.u64 = token;
  if (::epoll_ctl(epfd_.get(), EPOLL_CTL_ADD, fd, &ev) < 0)
    return sys_error("epoll", "Failed to watch fd " + std::to_string(fd));
  watches_[token] = Watch{fd, std::make_shared<FdCallback>(std::move(cb))};
  by_fd_[fd] = token;
  return {};
}

Result<void> EventLoop::modify(int fd, uint32_t events) {
  auto it = by_fd_.find(fd);
  if (it == by_fd_.end())
    return make_error("epoll", "fd " + std::to_string(fd) + " not watched");
  epoll_event ev{};
  ev.events = events;
  ev.data.u64 = it->second;
  if (::epoll_ctl(epfd_.get(), EPOLL_CTL_MOD, fd, &ev) < 0)
    return sys_error("epoll", "Failed to modify fd " + std::to_string(fd));
  return {};
}

void EventLoop::remove(int fd) {
  auto it = by_fd_.find(fd);
  if (it == by_fd_.end()) return;
  ::epoll_ctl(epfd_.get(), EPOLL_CTL_DEL, fd, nullptr);
  watches_.erase(it->second);
  by_fd_.erase(it);
}

EventLoop::TimerId EventLoop::after(std::chrono::milliseconds delay,
                                    std::function<void()> fn) {
  TimerId id = next_timer_++;
  auto deadline = Clock::now() + delay;
  timers_.emplace(std::make_pair(deadline, id), std::move(fn));
  timer_deadline_[id] = deadline;
  return id;
}

void EventLoop::cancel(TimerId id) {
  auto it = timer_deadline_.find(id);
  if (it == timer_deadline_.end()) return;
  timers_.erase(std::make_pair(it->second, id));
  timer_deadline_.erase(it);
}

void EventLoop::defer(std::function<void()> fn) {
  deferred_.push_back(std::move(fn));
}

void EventLoop::on_round_end(std::function<void()> fn) {
  round_end_.push_back(std::move(fn));
}

int EventLoop::next_timeout_ms() const {
  if (!deferred_.empty()) return 0;
  if (timers_.empty()) return -1;
  auto delta = timers_.begin()->first.first - Clock::now();
  auto ms = std::chrono::ceil<std::chrono::milliseconds>(delta).count();
  return ms < 0 ? 0 : static_cast<int>(ms > 60000 ? 60000 : ms);
}

void EventLoop::run_timers() {
  auto now = Clock::now();
  while (!timers_.empty() && timers_.begin()->first.first <= now) {
    auto node = timers_.extract(timers_.begin());
    timer_deadline_.erase(node.key().second);
    guarded(node.mapped());
  }
}

void EventLoop::run_deferred() {
  // Deferred calls may defer more; run until none are left.
  while (!deferred_.empty()) {
    auto batch = std::move(deferred_);
    deferred_.clear();
    for (auto& fn : batch) guarded(fn);
  }
}

int EventLoop::run() {
  running_ = true;
  epoll_event events[64];
  while (running_) {
    int n = ::epoll_wait(epfd_.get(), events, 64, next_timeout_ms());
    if (n < 0) {
      if (errno == EINTR) continue;
      log::error("epoll_wait failed, stopping", {{"errno", errno}});
      return 1;
    }
    for (int i = 0; i < n && running_; i++) {
      // epoll_event is packed on x86-64: copy the token out instead of
      // binding a reference to a misaligned field (UBSan).
      uint64_t token = events[i].data.u64;
      auto it = watches_.find(token);
      if (it == watches_.end()) continue;  // removed earlier in this round
      std::shared_ptr<FdCallback> cb = it->second.cb;  // survives remove()
      uint32_t ev = events[i].events;
      guarded([&] { (*cb)(ev); });
    }
    run_timers();
    run_deferred();
    for (auto& fn : round_end_) guarded(fn);
    run_deferred();
  }
  return exit_code_;
}

void EventLoop::stop(int code) {
  exit_code_ = code;
  running_ = false;
}

}  // namespace kvmx
