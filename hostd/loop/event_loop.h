// Single-threaded epoll event loop with timers and deferred calls.
//
// Callbacks may add or remove any fd or timer, including their own.  An
// exception escaping a callback is logged and the loop carries on.
#pragma once

#include <sys/epoll.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <unordered_map>
#include <vector>

#include "common/fd.h"
#include "common/result.h"

namespace kvmx {

class EventLoop {
 public:
  using Clock = std::chrono::steady_clock;
  using FdCallback = std::function<void(uint32_t events)>;
  using TimerId = uint64_t;

  static Result<std::unique_ptr<EventLoop>> create();

  // Watches `fd` (not owned) for `events` (EPOLLIN, EPOLLOUT, ...).
  Result<void> add(int fd, uint32_t events, FdCallback cb);
  Result<void> modify(int fd, uint32_t events);
  void remove(int fd);

  TimerId after(std::chrono::milliseconds delay, std::function<void()> fn);
  void cancel(TimerId id);
  // Runs `fn` once, after the current round of callbacks.
  void defer(std::function<void()> fn);
  // Runs `fn` after every round, before the loop sleeps (group commit).
  void on_round_end(std::function<void()> fn);

  // Runs until stop().  Returns the code given to stop().
  int run();
  void stop(int code = 0);
  bool running() const { return running_; }

  size_t watched_fds() const { return by_fd_.size(); }
  size_t pending_timers() const { return timers_.size(); }

 private:
  struct Watch {
    int fd;
    std::shared_ptr<FdCallback> cb;
  };
  explicit EventLoop(UniqueFd epfd) : epfd_(std::move(epfd)) {}
  int next_timeout_ms() const;
  void run_timers();
  void run_deferred();
  template <typename Fn>
  void guarded(Fn&& fn);

  UniqueFd epfd_;
  uint64_t next_token_ = 1;
  std::unordered_map<uint64_t, Watch> watches_;  // token -> watch
  std::unordered_map<int, uint64_t> by_fd_;      // fd -> token
  TimerId next_timer_ = 1;
  std::map<std::pair<Clock::time_point, TimerId>, std::function<void()>>
      timers_;
  std::unordered_map<TimerId, Clock::time_point> timer_deadline_;
  std::vector<std::function<void()>> deferred_;
  std::vector<std::function<void()>> round_end_;
  bool running_ = false;
  int exit_code_ = 0;
};

}  // namespace kvmx
