#include "policy.h"

namespace kvmx::migrate {

namespace {

std::string plural(uint64_t n, const char* one, const char* many) {
  return std::to_string(n) + " " + (n == 1 ? one : many);
}

}  // namespace

std::optional<std::string> SwitchPolicy::observe(const Sample& s) {
  if (decided_ || cfg_.manual) return std::nullopt;
  std::optional<std::string> why;
  if (cfg_.after_passes > 0 && s.pass > cfg_.after_passes) {
    why = plural(s.pass - 1, "precopy pass", "precopy passes") + " complete";
  } else if (cfg_.after_s > 0 &&
             s.elapsed >= std::chrono::seconds(cfg_.after_s)) {
    why = "precopy ran " + plural(cfg_.after_s, "second", "seconds");
  } else if (cfg_.stall_samples > 0 && s.pass >= 2) {
    // A new low must be clearly lower: a pass that ends a few pages short
    // of the last one's end is no progress.
    if (!have_low_ || s.remaining < low_ - low_ / 16) {
      low_ = s.remaining;
      have_low_ = true;
      since_low_ = 0;
    } else if (++since_low_ >= cfg_.stall_samples) {
      why = "remaining stopped shrinking (no new low below " +
            std::to_string(low_) + " bytes in " +
            plural(since_low_, "sample", "samples") + ")";
    }
  }
  if (why) decided_ = true;
  return why;
}

std::string SwitchPolicy::describe() const {
  if (cfg_.manual) return "manual (migrate-postcopy)";
  std::string d;
  auto add = [&](const std::string& rule) {
    d += d.empty() ? rule : ", or " + rule;
  };
  if (cfg_.after_passes > 0)
    add("after " + plural(cfg_.after_passes, "pass", "passes"));
  if (cfg_.stall_samples > 0)
    add("when remaining stalls for " +
        plural(cfg_.stall_samples, "sample", "samples"));
  if (cfg_.after_s > 0) add("after " + std::to_string(cfg_.after_s) + " s");
  return d.empty() ? "on request only (every rule is off)" : d;
}

}  // namespace kvmx::migrate
