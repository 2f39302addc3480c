// Purge policy (docs/design/virtblock-purging.md, "hostd"): which resident
// blocks of one NVDIMM to start purging now.  Pure logic, no I/O, no clock of
// its own: the caller passes the time (milliseconds, any monotonic origin).
#pragma once

#include <cstdint>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/result.h"

namespace kvmx::purge {

struct PolicyConfig {
  bool enabled = false;
  uint64_t min_idle_ms = 30000;       // accessed more recently: never chosen
  uint64_t high_watermark_bytes = 0;  // purging starts when resident > high
  uint64_t low_watermark_bytes = 0;   // ... and stops when resident <= low
  uint64_t rate_bytes_per_s = 256ull << 20;  // token bucket rate, > 0
  uint32_t max_blocks_per_round = 64;        // 1..4096
  // Fault-back read-ahead: on sequential faults, up to this many bytes of
  // the purged blocks that follow come back with the faulted one (a window
  // that doubles from 2 blocks per sequential fault).  0: off.  The engine
  // applies it; choose() does not look at it.
  uint64_t readahead_bytes = 16ull << 20;    // 0..64 MiB
};

inline constexpr uint32_t kMaxBlocksPerRoundLimit = 4096;
inline constexpr uint64_t kMaxReadaheadBytes = 64ull << 20;

// Validates a JSON object with the keys "enabled", "min-idle-ms",
// "high-watermark", "low-watermark", "rate", "max-blocks-per-round",
// "readahead" (all optional: a partial object changes only those fields of
// `base`).  Numbers must be non-negative integers.  Any problem (not an
// object, an unknown key, a wrong type, rate 0, max-blocks-per-round
// outside 1..4096, readahead above 64 MiB, low-watermark > high-watermark
// after the merge) is an Error with code
// "bad-policy" whose message starts with the field's name.
Result<PolicyConfig> parse_policy(const nlohmann::json& j,
                                  const PolicyConfig& base);
nlohmann::json to_json(const PolicyConfig& cfg);

// What the policy needs to know about one block; the index in the vector
// passed to choose() is the block number.
struct BlockView {
  uint8_t state;            // 1 resident, 2 moving, 3 purged
  uint64_t last_access_ms;  // later than now (UINT64_MAX: not tracked yet):
                            // never chosen, whatever min_idle_ms
  bool pinned;
};
inline constexpr uint8_t kBlockResident = 1;
inline constexpr uint8_t kBlockMoving = 2;
inline constexpr uint8_t kBlockPurged = 3;

class Policy {
 public:
  // block_size in bytes (> 0; 0 is taken as 1).
  Policy(PolicyConfig cfg, uint64_t block_size);

  // Takes effect at the next choose(); the token bucket keeps its level
  // (capped to the new burst), and disabling ends a purge in progress.
  void set_config(PolicyConfig cfg);
  const PolicyConfig& config() const { return cfg_; }

  // The blocks to start purging now, oldest access first (ties: lower block
  // number first).  A block qualifies when it is resident, not pinned, and
  // idle (now_ms - last_access_ms) >= min_idle_ms.
  // - Watermarks, with hysteresis: resident bytes are (resident + moving
  //   blocks) x block size.  A purge starts in a round that begins with
  //   resident > high and goes on in later rounds until resident <= low.
  //   Within a round no more blocks are chosen than bring the blocks in
  //   state resident (moving ones are on their way out) down to low.
  // - Rate: a token bucket of bytes, refilled at rate_bytes_per_s of
  //   now_ms, burst max(1 block, rate x 1 s), full at the first call; each
  //   chosen block costs block_size.
  // - At most max_blocks_per_round.
  // Time that goes backwards refills nothing.
  std::vector<uint64_t> choose(uint64_t now_ms,
                               const std::vector<BlockView>& blocks);

  bool purging() const { return active_; }  // between high and low
  uint64_t tokens_bytes() const;            // for tests and status

 private:
  void refill(uint64_t now_ms);
  unsigned __int128 burst_milli() const;

  PolicyConfig cfg_;
  uint64_t block_size_;
  bool active_ = false;
  bool clock_started_ = false;
  uint64_t last_ms_ = 0;
  // Tokens in byte-milliseconds (bytes x 1000), so that refills of a few
  // milliseconds at a low rate are not rounded away.
  unsigned __int128 tokens_milli_ = 0;
};

}  // namespace kvmx::purge
