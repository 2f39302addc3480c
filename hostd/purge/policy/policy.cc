#include "purge/policy/policy.h"

#include <algorithm>
#include <string>

namespace kvmx::purge {

namespace {

Error bad(const std::string& field, const std::string& what) {
  return make_error("bad-policy", field + ": " + what);
}

// A non-negative integer field.  Parsed text stores those as unsigned, but
// a json built in C++ from an int holds a signed integer.
Result<uint64_t> get_u64(const nlohmann::json& v, const std::string& field) {
  if (v.is_number_unsigned()) return v.get<uint64_t>();
  if (!v.is_number_integer()) return bad(field, "must be a non-negative integer");
  int64_t n = v.get<int64_t>();
  if (n < 0) return bad(field, "must not be negative");
  return static_cast<uint64_t>(n);
}

}  // namespace

Result<PolicyConfig> parse_policy(const nlohmann::json& j,
                                  const PolicyConfig& base) {
  if (!j.is_object()) return bad("policy", "must be a JSON object");
  PolicyConfig c = base;
  for (const auto& [key, v] : j.items()) {
    if (key == "enabled") {
      if (!v.is_boolean()) return bad(key, "must be true or false");
      c.enabled = v.get<bool>();
      continue;
    }
    uint64_t* dst = nullptr;
    if (key == "min-idle-ms") dst = &c.min_idle_ms;
    else if (key == "high-watermark") dst = &c.high_watermark_bytes;
    else if (key == "low-watermark") dst = &c.low_watermark_bytes;
    else if (key == "rate") dst = &c.rate_bytes_per_s;
    else if (key == "readahead") dst = &c.readahead_bytes;
    else if (key != "max-blocks-per-round")
      return bad(key, "unknown field");
    auto n = get_u64(v, key);
    if (!n) return n.error();
    if (dst) {
      *dst = *n;
      continue;
    }
    if (*n < 1 || *n > kMaxBlocksPerRoundLimit)
      return bad(key, "must be in 1.." + std::to_string(kMaxBlocksPerRoundLimit) +
                          ", not " + std::to_string(*n));
    c.max_blocks_per_round = static_cast<uint32_t>(*n);
  }
  // Checks on the merged result: a partial update may break them too.
  if (c.rate_bytes_per_s == 0) return bad("rate", "must be above 0");
  if (c.readahead_bytes > kMaxReadaheadBytes)
    return bad("readahead", std::to_string(c.readahead_bytes) +
                                " is above the limit " +
                                std::to_string(kMaxReadaheadBytes));
  if (c.low_watermark_bytes > c.high_watermark_bytes)
    return bad("low-watermark",
               std::to_string(c.low_watermark_bytes) +
                   " is above high-watermark " +
                   std::to_string(c.high_watermark_bytes));
  if (c.max_blocks_per_round < 1 ||
      c.max_blocks_per_round > kMaxBlocksPerRoundLimit)
    return bad("max-blocks-per-round", "must be in 1..4096");
  return c;
}

nlohmann::json to_json(const PolicyConfig& c) {
  return {{"enabled", c.enabled},
          {"min-idle-ms", c.min_idle_ms},
          {"high-watermark", c.high_watermark_bytes},
          {"low-watermark", c.low_watermark_bytes},
          {"rate", c.rate_bytes_per_s},
          {"max-blocks-per-round", c.max_blocks_per_round},
          {"readahead", c.readahead_bytes}};
}

Policy::Policy(PolicyConfig cfg, uint64_t block_size)
    : cfg_(cfg), block_size_(std::max<uint64_t>(block_size, 1)) {}

void Policy::set_config(PolicyConfig cfg) {
  cfg_ = cfg;
  if (!cfg_.enabled) active_ = false;
  tokens_milli_ = std::min(tokens_milli_, burst_milli());
}

unsigned __int128 Policy::burst_milli() const {
  uint64_t burst = std::max(block_size_, cfg_.rate_bytes_per_s);
  return static_cast<unsigned __int128>(burst) * 1000;
}

uint64_t Policy::tokens_bytes() const {
  return static_cast<uint64_t>(tokens_milli_ / 1000);
}

void Policy::refill(uint64_t now_ms) {
  if (!clock_started_) {  // the first round starts with a full bucket
    clock_started_ = true;
    last_ms_ = now_ms;
    tokens_milli_ = burst_milli();
    return;
  }
  if (now_ms <= last_ms_) return;  // no time passed (or it went backwards)
  // rate x dt bytes = rate x dt_ms byte-milliseconds; 128 bits hold any
  // 64-bit rate times a 64-bit interval.
  unsigned __int128 add =
      static_cast<unsigned __int128>(cfg_.rate_bytes_per_s) *
      (now_ms - last_ms_);
  tokens_milli_ = std::min(tokens_milli_ + add, burst_milli());
  last_ms_ = now_ms;
}

std::vector<uint64_t> Policy::choose(uint64_t now_ms,
                                     const std::vector<BlockView>& blocks) {
  refill(now_ms);  // the bucket fills whether or not anything is chosen
  if (!cfg_.enabled) {
    active_ = false;
    return {};
  }
  uint64_t n_resident = 0, n_moving = 0;
  for (const auto& b : blocks) {
    if (b.state == kBlockResident) n_resident++;
    else if (b.state == kBlockMoving) n_moving++;
  }
  // Resident bytes, saturating (block counts times sizes cannot overflow in
  // practice, but the config is user input).
  auto bytes = [&](uint64_t n) {
    unsigned __int128 v = static_cast<unsigned __int128>(n) * block_size_;
    return v > UINT64_MAX ? UINT64_MAX : static_cast<uint64_t>(v);
  };
  uint64_t resident = bytes(n_resident + n_moving);
  if (!active_ && resident > cfg_.high_watermark_bytes) active_ = true;
  if (active_ && resident <= cfg_.low_watermark_bytes) active_ = false;
  if (!active_) return {};

  // How many more blocks bring the resident-state ones down to low.
  uint64_t after = bytes(n_resident);
  if (after <= cfg_.low_watermark_bytes) return {};  // moving ones suffice
  uint64_t need =
      (after - cfg_.low_watermark_bytes + block_size_ - 1) / block_size_;
  uint64_t affordable =
      static_cast<uint64_t>(tokens_milli_ / 1000 / block_size_);
  uint64_t limit = std::min<uint64_t>(
      {need, affordable, cfg_.max_blocks_per_round});
  if (limit == 0) return {};

  std::vector<uint64_t> cand;
  for (uint64_t i = 0; i < blocks.size(); i++) {
    const auto& b = blocks[i];
    if (b.state != kBlockResident || b.pinned) continue;
    if (b.last_access_ms > now_ms) continue;  // not tracked yet, or skew
    if (now_ms - b.last_access_ms >= cfg_.min_idle_ms) cand.push_back(i);
  }
  auto older = [&](uint64_t a, uint64_t b) {
    if (blocks[a].last_access_ms != blocks[b].last_access_ms)
      return blocks[a].last_access_ms < blocks[b].last_access_ms;
    return a < b;
  };
  if (cand.size() > limit) {
    std::nth_element(cand.begin(), cand.begin() + limit, cand.end(), older);
    cand.resize(limit);
  }
  std::sort(cand.begin(), cand.end(), older);
  tokens_milli_ -= static_cast<unsigned __int128>(cand.size()) *
                   block_size_ * 1000;
  return cand;
}

}  // namespace kvmx::purge
