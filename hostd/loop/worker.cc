#include "worker.h"

#include <sys/eventfd.h>
#include <unistd.h>

#include <cstdint>
#include <system_error>

namespace kvmx {

Worker::~Worker() {
  if (thread_.joinable()) thread_.join();
  if (event_) loop_.remove(event_.get());
}

Result<void> Worker::run(std::function<void()> job, std::function<void()> done) {
  if (busy()) return make_error("worker-busy", "a job is still running");
  if (!event_) {
    event_ = UniqueFd(::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC));
    if (!event_) return sys_error("worker", "Failed to create an eventfd");
    if (auto r = loop_.add(event_.get(), EPOLLIN, [this](uint32_t) { finished(); });
        !r) {
      event_.reset();
      return r;
    }
  }
  done_ = std::move(done);
  int efd = event_.get();
  try {
    thread_ = std::thread([efd, job = std::move(job)] {
      job();
      uint64_t one = 1;
      (void)!::write(efd, &one, sizeof(one));
    });
  } catch (const std::system_error& e) {
    done_ = nullptr;
    return make_error("worker", std::string("Failed to start a thread: ") + e.what());
  }
  return {};
}

void Worker::finished() {
  uint64_t n = 0;
  if (::read(event_.get(), &n, sizeof(n)) != sizeof(n)) return;
  if (thread_.joinable()) thread_.join();
  auto done = std::move(done_);
  done_ = nullptr;
  if (done) done();
}

}  // namespace kvmx
