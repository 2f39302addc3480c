#include "purge/tracking/tracking.h"

#include <fcntl.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <string>

// The PAGEMAP_SCAN uAPI (Linux 6.7, include/uapi/linux/fs.h), for headers
// older than the kernel we run on.
#ifndef PAGEMAP_SCAN
#define PAGE_IS_PRESENT (1 << 3)
struct page_region {
  __u64 start;
  __u64 end;
  __u64 categories;
};
struct pm_scan_arg {
  __u64 size;
  __u64 flags;
  __u64 start;
  __u64 end;
  __u64 walk_end;
  __u64 vec;
  __u64 vec_len;
  __u64 max_pages;
  __u64 category_inverted;
  __u64 category_mask;
  __u64 category_anyof_mask;
  __u64 return_mask;
};
#define PAGEMAP_SCAN _IOWR('f', 16, struct pm_scan_arg)
#endif

namespace kvmx::purge {

namespace {

constexpr size_t kRegions = 256;         // regions per PAGEMAP_SCAN call
constexpr size_t kEntries = 4096;        // pagemap entries per pread
constexpr uint64_t kPresent = 1ull << 63;  // pagemap entry: page present
static_assert(sizeof(page_region) == 3 * sizeof(uint64_t));

// PAGEMAP_SCAN for pages that are present, into vec; -1 and errno on error.
long pm_scan(int fd, uint64_t start, uint64_t end, page_region* vec,
             size_t vec_len, uint64_t* walk_end) {
  pm_scan_arg a{};
  a.size = sizeof(a);
  a.start = start;
  a.end = end;
  a.vec = reinterpret_cast<uintptr_t>(vec);
  a.vec_len = vec_len;
  a.category_mask = PAGE_IS_PRESENT;  // only pages with the bit set
  a.return_mask = PAGE_IS_PRESENT;
  long n;
  do {
    n = ioctl(fd, PAGEMAP_SCAN, &a);
  } while (n < 0 && errno == EINTR);
  if (n >= 0) *walk_end = a.walk_end;
  return n;
}

}  // namespace

// -- PagemapSource ------------------------------------------------------------

Result<std::unique_ptr<PagemapSource>> PagemapSource::open(pid_t pid) {
  std::string path = "/proc/" + std::to_string(pid) + "/pagemap";
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd) return sys_error("pagemap-open", "open " + path);
  long ps = sysconf(_SC_PAGESIZE);
  if (ps <= 0) return sys_error("pagemap-open", "sysconf(_SC_PAGESIZE)");
  std::unique_ptr<PagemapSource> s(
      new PagemapSource(std::move(fd), static_cast<uint64_t>(ps)));
  // Probe the ioctl with an empty range: kernels before 6.7 say ENOTTY.
  static_assert(kEntries * sizeof(uint64_t) >= kRegions * sizeof(page_region));
  s->buf_.resize(kEntries);
  uint64_t walk_end = 0;
  if (pm_scan(s->fd_.get(), 0, 0, reinterpret_cast<page_region*>(s->buf_.data()),
              kRegions, &walk_end) >= 0) {
    s->use_scan_ = true;
  } else {
    s->fallback_reason_ = sys_error("", "PAGEMAP_SCAN").message;
  }
  return s;
}

Result<void> PagemapSource::scan(uint64_t addr, uint64_t len,
                                 std::vector<uint8_t>& present) {
  if (addr % page_size_ || len % page_size_ || addr + len < addr)
    return make_error("bad-range", "scan range " + std::to_string(addr) +
                                       "+" + std::to_string(len) +
                                       " is not page-aligned");
  present.assign(len / page_size_, 0);
  if (len == 0) return ok_result();
  return use_scan_ ? scan_ioctl(addr, len, present)
                   : scan_pread(addr, len, present);
}

Result<void> PagemapSource::scan_ioctl(uint64_t addr, uint64_t len,
                                       std::vector<uint8_t>& present) {
  auto* vec = reinterpret_cast<page_region*>(buf_.data());
  uint64_t start = addr, end = addr + len;
  while (start < end) {
    uint64_t walk_end = 0;
    long n = pm_scan(fd_.get(), start, end, vec, kRegions, &walk_end);
    if (n < 0) return sys_error("pagemap-scan", "PAGEMAP_SCAN");
    // Each region is a run of present pages (the only category asked for).
    for (long i = 0; i < n; i++) {
      uint64_t s = std::max<uint64_t>(vec[i].start, addr);
      uint64_t e = std::min<uint64_t>(vec[i].end, end);
      for (uint64_t p = s; p < e; p += page_size_)
        present[(p - addr) / page_size_] = 1;
    }
    // The walk stops early when vec is full; go on from where it ended.
    if (walk_end <= start || walk_end > end)
      return make_error("pagemap-scan",
                        "PAGEMAP_SCAN made no progress at " +
                            std::to_string(start));
    start = walk_end;
  }
  return ok_result();
}

Result<void> PagemapSource::scan_pread(uint64_t addr, uint64_t len,
                                       std::vector<uint8_t>& present) {
  uint64_t first = addr / page_size_, pages = len / page_size_;
  for (uint64_t done = 0; done < pages;) {
    size_t want = static_cast<size_t>(std::min<uint64_t>(kEntries, pages - done));
    auto* dst = reinterpret_cast<char*>(buf_.data());
    size_t bytes = want * sizeof(uint64_t), got = 0;
    off_t off = static_cast<off_t>((first + done) * sizeof(uint64_t));
    while (got < bytes) {
      ssize_t r = pread(fd_.get(), dst + got, bytes - got,
                        off + static_cast<off_t>(got));
      if (r < 0 && errno == EINTR) continue;
      if (r < 0) return sys_error("pagemap-read", "pread pagemap");
      if (r == 0)  // the process is gone (its pagemap reads as empty)
        return make_error("pagemap-read", "pagemap ended early");
      got += static_cast<size_t>(r);
    }
    // pagemap reads whole entries; a partial one cannot happen.
    for (size_t i = 0; i < want; i++)
      present[done + i] = (buf_[i] & kPresent) ? 1 : 0;
    done += want;
  }
  return ok_result();
}

// -- Tracker ------------------------------------------------------------------

Tracker::Tracker(uint64_t base_addr, uint64_t block_count,
                 uint64_t block_size, uint64_t page_size)
    : base_(base_addr),
      block_count_(block_count),
      block_size_(block_size),
      page_size_(std::max<uint64_t>(page_size, 1)),
      pages_per_block_(std::max<uint64_t>(block_size / page_size_, 1)),
      last_(block_count, kNeverSeen),
      zapped_(block_count, false) {}

Result<std::vector<uint64_t>> Tracker::probe(
    uint64_t now_ms, PresentSource& src, const std::vector<uint64_t>& tracked) {
  std::vector<uint64_t> blocks = tracked;
  std::sort(blocks.begin(), blocks.end());
  blocks.erase(std::unique(blocks.begin(), blocks.end()), blocks.end());
  if (!blocks.empty() && blocks.back() >= block_count_)
    return make_error("tracking-block",
                      "block " + std::to_string(blocks.back()) +
                          " is beyond the " + std::to_string(block_count_) +
                          " blocks of the mapping");

  const uint64_t max_run = std::max<uint64_t>(kMaxScanPages / pages_per_block_, 1);
  std::vector<uint64_t> accessed;  // applied only once every scan succeeded
  std::vector<uint8_t> present;
  for (size_t i = 0; i < blocks.size();) {
    // A run of consecutive blocks [i, j).
    size_t j = i + 1;
    while (j < blocks.size() && blocks[j] == blocks[j - 1] + 1 &&
           j - i < max_run)
      j++;
    bool any_zapped = false;
    for (size_t k = i; k < j; k++) any_zapped |= zapped_[blocks[k]];
    if (any_zapped) {  // blocks never zapped need no scan
      uint64_t first = blocks[i];
      auto r = src.scan(base_ + first * block_size_, (j - i) * block_size_,
                        present);
      if (!r) return r.error();
      if (present.size() < (j - i) * pages_per_block_)
        return make_error("tracking-scan", "the present-bit source returned " +
                                               std::to_string(present.size()) +
                                               " pages, too few");
    }
    for (size_t k = i; k < j; k++) {
      uint64_t b = blocks[k];
      bool hit = !zapped_[b];
      if (!hit) {
        auto p = present.begin() + (b - blocks[i]) * pages_per_block_;
        hit = std::find(p, p + pages_per_block_, 1) != p + pages_per_block_;
      }
      if (hit) accessed.push_back(b);
    }
    i = j;
  }
  for (uint64_t b : accessed) {
    last_[b] = now_ms;
    zapped_[b] = true;  // the caller zaps it now
  }
  return accessed;
}

uint64_t Tracker::last_access_ms(uint64_t block) const {
  return block < block_count_ ? last_[block] : kNeverSeen;
}

void Tracker::touch(uint64_t block, uint64_t now_ms) {
  if (block >= block_count_) return;
  if (last_[block] == kNeverSeen || last_[block] < now_ms) last_[block] = now_ms;
}

void Tracker::reset(uint64_t block, uint64_t now_ms) {
  if (block >= block_count_) return;
  last_[block] = now_ms;
  zapped_[block] = false;
}

}  // namespace kvmx::purge
