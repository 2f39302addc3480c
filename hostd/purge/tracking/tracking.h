// Access tracking by zap-and-probe (docs/design/virtblock-purging.md,
// "Access tracking"): the engine has QEMU's agent zap (MADV_DONTNEED) the
// resident blocks; any later access by anyone (vCPU, TCG, DMA; read or
// write) makes pages of QEMU's mapping present again, so at the next probe a
// block with a present page was accessed since its zap.  A read fault maps a
// whole folio, so a neighbour may look accessed too: that errs on the safe
// side (the block stays resident).
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "common/fd.h"
#include "common/result.h"

namespace kvmx::purge {

// Reads the "present" bit of pages of a process's mapping.
class PresentSource {
 public:
  virtual ~PresentSource() = default;
  // present is resized to len / page size; present[i] = 1 when page i of
  // [addr, addr + len) is present, else 0.  addr and len are multiples of
  // the page size.
  virtual Result<void> scan(uint64_t addr, uint64_t len,
                            std::vector<uint8_t>& present) = 0;
};

// /proc/<pid>/pagemap: the PAGEMAP_SCAN ioctl (Linux 6.7+) when open()
// finds it works, else pread of the 8-byte entries (bit 63: present).
// Either way one scan() uses a fixed buffer (256 regions or 4096 entries),
// whatever the length.  Reading another process's pagemap needs ptrace
// read access to it (the same user, or CAP_SYS_PTRACE); present bits are
// given without CAP_SYS_ADMIN (only the PFNs are hidden).
class PagemapSource : public PresentSource {
 public:
  // Errors: "pagemap-open".
  static Result<std::unique_ptr<PagemapSource>> open(pid_t pid);
  // Errors: "bad-range" (not page-aligned, or wraps), "pagemap-scan",
  // "pagemap-read".
  Result<void> scan(uint64_t addr, uint64_t len,
                    std::vector<uint8_t>& present) override;

  bool uses_pagemap_scan() const { return use_scan_; }
  // Why PAGEMAP_SCAN is not used ("" when it is).
  const std::string& fallback_reason() const { return fallback_reason_; }
  // Makes later scans use pread (for tests).
  void force_pread_fallback() {
    use_scan_ = false;
    fallback_reason_ = "forced";
  }
  uint64_t page_size() const { return page_size_; }

 private:
  PagemapSource(UniqueFd fd, uint64_t page_size)
      : fd_(std::move(fd)), page_size_(page_size) {}
  Result<void> scan_ioctl(uint64_t addr, uint64_t len,
                          std::vector<uint8_t>& present);
  Result<void> scan_pread(uint64_t addr, uint64_t len,
                          std::vector<uint8_t>& present);

  UniqueFd fd_;
  uint64_t page_size_;
  bool use_scan_ = false;
  std::string fallback_reason_;
  std::vector<uint64_t> buf_;  // the fixed buffer (regions or entries)
};

// Per-block last access times of one NVDIMM mapping.
//
// last_access_ms(b) is
// - kNeverSeen (UINT64_MAX) until b is first listed in a probe (or reset or
//   touched): nothing is known, and the policy treats a time later than now
//   as "not idle", so such a block is never purged;
// - from its first probe on, at least the time of that probe: a block not
//   zapped yet is taken as accessed at the probe that zaps it first, so it
//   must stay idle for min_idle_ms after tracking starts before it can be
//   purged;
// - then the time of the latest probe that found a page of it present, or of
//   the latest touch()/reset().
class Tracker {
 public:
  static constexpr uint64_t kNeverSeen = UINT64_MAX;
  // Scans are split so that one present vector stays small (64 KiB).
  static constexpr uint64_t kMaxScanPages = 64 * 1024;

  // block_size: a multiple of page_size (the page size of the source).
  Tracker(uint64_t base_addr, uint64_t block_count, uint64_t block_size,
          uint64_t page_size = 4096);

  // One probe round at now_ms.  tracked: the blocks to probe (resident
  // ones; any order, duplicates ignored; a number >= block_count is an
  // Error "tracking-block").  Contiguous runs of blocks are scanned in one
  // scan() call (up to kMaxScanPages pages).  A block that has a present
  // page, or was never zapped (since the tracker began or its last reset),
  // is marked accessed at now_ms and returned, ascending: the caller zaps
  // them before the next probe (if a zap fails, reset() the block).
  // On an Error from the source nothing is changed.
  Result<std::vector<uint64_t>> probe(uint64_t now_ms, PresentSource& src,
                                      const std::vector<uint64_t>& tracked);

  uint64_t last_access_ms(uint64_t block) const;
  // The engine saw an access (a fault-back on the block): last access is
  // now_ms (never moved backwards).
  void touch(uint64_t block, uint64_t now_ms);
  // The block is newly resident: accessed at now_ms, and not zapped (the
  // next probe zaps it).
  void reset(uint64_t block, uint64_t now_ms);

  bool zapped(uint64_t block) const {
    return block < block_count_ && zapped_[block];
  }
  uint64_t block_count() const { return block_count_; }

 private:
  uint64_t base_;
  uint64_t block_count_;
  uint64_t block_size_;
  uint64_t page_size_;
  uint64_t pages_per_block_;
  std::vector<uint64_t> last_;
  std::vector<bool> zapped_;
};

}  // namespace kvmx::purge
