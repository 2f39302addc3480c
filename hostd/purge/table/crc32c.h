// CRC32C (Castagnoli, reflected polynomial 0x82F63B78), as ext4 and iSCSI
// use it: initial value 0xffffffff, result inverted.  crc32c("123456789")
// is 0xE3069283.
//
// Chaining works like zlib's crc32(): passing the result for `a` as `crc`
// when checksumming `b` gives the checksum of a followed by b.
#pragma once

#include <cstddef>
#include <cstdint>

namespace kvmx::purge {

uint32_t crc32c(const void* data, size_t len, uint32_t crc = 0);

// The two implementations behind crc32c(), exposed for the tests: a
// portable one (slicing by 8 over tables built at start-up) and, on x86-64
// CPUs with SSE4.2, the crc32 instruction.  hw_available() says whether
// crc32c_hw() may be called; crc32c() picks it when it may.
uint32_t crc32c_portable(const void* data, size_t len, uint32_t crc = 0);
bool crc32c_hw_available();
uint32_t crc32c_hw(const void* data, size_t len, uint32_t crc = 0);

}  // namespace kvmx::purge
