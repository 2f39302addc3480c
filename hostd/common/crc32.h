// CRC-32 (IEEE 802.3, reflected polynomial 0xEDB88320), as zlib computes it.
#pragma once

#include <cstdint>
#include <string_view>

namespace kvmx {

uint32_t crc32(std::string_view data, uint32_t crc = 0);

}  // namespace kvmx
