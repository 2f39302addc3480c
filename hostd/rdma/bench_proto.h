// The control protocol of kvmx-rdma-bench serve, shared with the
// transport's Catch2 test (which reads from a serve on another machine).
// TCP, host byte order (both ends are the same build on x86-64): the
// server sends one Header per session, then answers one-byte requests,
// each followed by a u64 argument:
//   'P' n  -> the 4 KiB page n of the main region (a TCP page fetch)
//   'C' 0  -> u64 CPU time of the server process (ns), u64 'P' pages
//             served, u64 busy CPU time of the whole machine (ns, from
//             /proc/stat: with soft-RoCE the kernel answers READs, in
//             softirq, outside any process)
//   'R' 0  -> u64 connection requests rejected so far
//   'M' k  -> probe case k: the server writes its region (after a discard
//             for the discard cases); reply: u64 0
//   'X' 0  -> the server exits at once, without closing anything (a
//             killed migration source)
//   'Q' 0  -> end of session
// Page n of the main region holds the words kvmx::rdma::bench::word(n, i).
#pragma once

#include <cstdint>

#include "rdma/rdma.h"

namespace kvmx::rdma::bench {

constexpr uint32_t kPage = 4096;
constexpr uint32_t kHdrMagic = 0x4258564b;  // "KVXB"
constexpr uint32_t kProbeCases = 4;
constexpr uint8_t kProbeWritten = 0x22;
// Probe cases, in order: write after registration of untouched memory
// (copy-on-write of the zero page), and discard then write of resident
// memory; each with a write pin and a read-only pin.
inline const char* const kProbeNames[kProbeCases] = {
    "cow_of_untouched_write_pin", "cow_of_untouched_readonly_pin",
    "discard_then_write_write_pin", "discard_then_write_readonly_pin"};

struct WireRegion {
  uint64_t addr;
  uint64_t length;
  uint32_t rkey;
  uint32_t pad;
};

struct Header {
  uint32_t magic;
  uint16_t rdma_port;
  uint16_t probes;    // kProbeCases
  uint32_t rejected;  // connection requests rejected before this session
  uint32_t pad;
  uint64_t token;
  WireRegion main;
  WireRegion probe[kProbeCases];
};

inline uint64_t word(uint64_t page, uint64_t i) {
  return (page + 1) * 0x9E3779B97F4A7C15ull ^ (i * 0xBF58476D1CE4E5B9ull);
}

inline void fill(uint8_t* p, uint64_t page) {
  auto* w = reinterpret_cast<uint64_t*>(p);
  for (uint64_t i = 0; i < kPage / 8; i++) w[i] = word(page, i);
}

inline bool check(const uint8_t* p, uint64_t page) {
  const auto* w = reinterpret_cast<const uint64_t*>(p);
  for (uint64_t i = 0; i < kPage / 8; i++) {
    if (w[i] != word(page, i)) return false;
  }
  return true;
}

inline RemoteRegion to_region(const WireRegion& w) {
  return RemoteRegion{w.addr, w.length, w.rkey};
}

}  // namespace kvmx::rdma::bench
