// When a migration switches from precopy to post-copy.
//
// QEMU copies RAM in passes: the first sends every page, each later one
// the pages the guest dirtied meanwhile.  `pass` is QEMU's dirty-sync-count
// (1 during the first pass), `remaining` its ram.remaining (bytes still to
// send in this pass).  Post-copy is worth it once another pass would not
// bring the end closer; the rules (each off when 0):
//
//   after_passes N  switch once N passes are complete (pass > N);
//   stall_samples K switch when, from the second pass on, K samples in a row
//                   brought no new low of `remaining` (one at least 1/16
//                   below the previous low): the guest dirties as fast as
//                   QEMU sends;
//   after_s S       switch S seconds after the migration began.
//
// manual: none of them; only an explicit request (migrate-postcopy).
#pragma once

#include <chrono>
#include <cstdint>
#include <optional>
#include <string>

namespace kvmx::migrate {

struct PolicyConfig {
  bool manual = false;
  uint32_t after_passes = 1;
  uint32_t stall_samples = 5;
  uint32_t after_s = 0;
};

struct Sample {
  uint64_t pass = 0;       // dirty-sync-count
  uint64_t remaining = 0;  // bytes
  std::chrono::milliseconds elapsed{0};
};

class SwitchPolicy {
 public:
  explicit SwitchPolicy(PolicyConfig config) : cfg_(config) {}

  // Takes one sample of a precopy in progress; returns why to switch now,
  // or nothing.  Once it said so it says nothing more (the caller switches).
  std::optional<std::string> observe(const Sample& s);

  const PolicyConfig& config() const { return cfg_; }
  // One line for people: "after 1 pass, or 5 samples without progress".
  std::string describe() const;

 private:
  PolicyConfig cfg_;
  bool decided_ = false;
  uint64_t low_ = 0;        // lowest remaining seen since pass 2 began
  bool have_low_ = false;
  uint32_t since_low_ = 0;  // samples since the last new low
};

}  // namespace kvmx::migrate
