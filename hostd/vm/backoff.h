// Exponential reconnect delay: min, 2*min, 4*min, ... capped at max.
#pragma once

#include <chrono>

namespace kvmx::vm {

class Backoff {
 public:
  Backoff(std::chrono::milliseconds min, std::chrono::milliseconds max)
      : min_(min), max_(max < min ? min : max), next_(min) {}

  std::chrono::milliseconds next() {
    auto d = next_;
    next_ = next_ * 2 > max_ ? max_ : next_ * 2;
    return d;
  }
  void reset() { next_ = min_; }

 private:
  std::chrono::milliseconds min_, max_, next_;
};

}  // namespace kvmx::vm
