#include "crc32c.h"

#include <array>
#include <cstring>

namespace kvmx::purge {
namespace {

constexpr uint32_t kPoly = 0x82F63B78u;  // 0x1EDC6F41 bit-reversed

// tables[0] is the byte-at-a-time table; tables[k][b] is the CRC of byte b
// followed by k zero bytes, which lets the loop fold 8 bytes per step.
struct Tables {
  std::array<std::array<uint32_t, 256>, 8> t{};
  Tables() {
    for (uint32_t b = 0; b < 256; b++) {
      uint32_t c = b;
      for (int i = 0; i < 8; i++) c = (c >> 1) ^ ((c & 1u) ? kPoly : 0u);
      t[0][b] = c;
    }
    for (uint32_t b = 0; b < 256; b++)
      for (size_t k = 1; k < 8; k++)
        t[k][b] = (t[k - 1][b] >> 8) ^ t[0][t[k - 1][b] & 0xffu];
  }
};

const Tables& tables() {
  static const Tables tabs;
  return tabs;
}

uint32_t load_le32(const unsigned char* p) {
  return static_cast<uint32_t>(p[0]) | static_cast<uint32_t>(p[1]) << 8 |
         static_cast<uint32_t>(p[2]) << 16 | static_cast<uint32_t>(p[3]) << 24;
}

#if defined(__x86_64__)
bool cpu_has_sse42() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("sse4.2");
}

__attribute__((target("sse4.2"))) uint32_t hw_update(uint32_t state,
                                                     const unsigned char* p,
                                                     size_t len) {
  uint64_t s = state;
  while (len > 0 && (reinterpret_cast<uintptr_t>(p) & 7u) != 0) {
    s = __builtin_ia32_crc32qi(static_cast<uint32_t>(s), *p++);
    len--;
  }
  while (len >= 8) {
    uint64_t v;
    std::memcpy(&v, p, 8);
    s = __builtin_ia32_crc32di(s, v);
    p += 8;
    len -= 8;
  }
  while (len > 0) {
    s = __builtin_ia32_crc32qi(static_cast<uint32_t>(s), *p++);
    len--;
  }
  return static_cast<uint32_t>(s);
}
#endif

const bool kUseHw = crc32c_hw_available();

}  // namespace

uint32_t crc32c_portable(const void* data, size_t len, uint32_t crc) {
  const auto& t = tables().t;
  const auto* p = static_cast<const unsigned char*>(data);
  uint32_t s = ~crc;
  while (len >= 8) {
    uint32_t lo = load_le32(p) ^ s;
    uint32_t hi = load_le32(p + 4);
    s = t[7][lo & 0xffu] ^ t[6][(lo >> 8) & 0xffu] ^
        t[5][(lo >> 16) & 0xffu] ^ t[4][lo >> 24] ^ t[3][hi & 0xffu] ^
        t[2][(hi >> 8) & 0xffu] ^ t[1][(hi >> 16) & 0xffu] ^ t[0][hi >> 24];
    p += 8;
    len -= 8;
  }
  while (len-- > 0) s = (s >> 8) ^ t[0][(s ^ *p++) & 0xffu];
  return ~s;
}

bool crc32c_hw_available() {
#if defined(__x86_64__)
  static const bool has = cpu_has_sse42();
  return has;
#else
  return false;
#endif
}

uint32_t crc32c_hw(const void* data, size_t len, uint32_t crc) {
#if defined(__x86_64__)
  if (crc32c_hw_available())
    return ~hw_update(~crc, static_cast<const unsigned char*>(data), len);
#endif
  return crc32c_portable(data, len, crc);
}

uint32_t crc32c(const void* data, size_t len, uint32_t crc) {
  return kUseHw ? crc32c_hw(data, len, crc) : crc32c_portable(data, len, crc);
}

}  // namespace kvmx::purge
