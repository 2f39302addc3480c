// Runs one slow job at a time (journal compaction) on a thread of its own
// and hands its completion back to the event loop, so that the loop keeps
// serving meanwhile.  The job must touch only what it owns.
#pragma once

#include <functional>
#include <thread>

#include "common/fd.h"
#include "event_loop.h"

namespace kvmx {

class Worker {
 public:
  explicit Worker(EventLoop& loop) : loop_(loop) {}
  ~Worker();  // waits for a running job; `done` is not called then
  Worker(const Worker&) = delete;
  Worker& operator=(const Worker&) = delete;

  // Starts `job` on a new thread; `done` runs on the loop once it has
  // finished.  An error when a job is still running.
  Result<void> run(std::function<void()> job, std::function<void()> done);
  bool busy() const { return thread_.joinable(); }

 private:
  void finished();

  EventLoop& loop_;
  UniqueFd event_;
  std::thread thread_;
  std::function<void()> done_;
};

}  // namespace kvmx
