// The purge agent's messages as they are on the wire
// (docs/specs/purge-agent.md): the client and the tests' fake agent.
#pragma once

#include <cstdint>

namespace kvmx::purge::wire {

// Little-endian on the wire; hostd builds for little-endian hosts only.
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__);

inline constexpr uint32_t kMagic = 0x4b505247;
inline constexpr uint16_t kVersion = 1;

struct __attribute__((packed)) Request {
  uint32_t magic;
  uint16_t version;
  uint16_t op;
  uint64_t tag;
  uint64_t offset;
  uint64_t length;
};
struct __attribute__((packed)) Reply {
  uint32_t magic;
  uint16_t version;
  uint16_t op;
  uint64_t tag;
  int32_t status;
  uint32_t reserved;
  uint64_t arg[6];
};
static_assert(sizeof(Request) == 32 && sizeof(Reply) == 72);

}  // namespace kvmx::purge::wire
