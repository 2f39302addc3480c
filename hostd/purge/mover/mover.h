// The mover (docs/design/virtblock-purging.md, "hostd"): reads and writes
// whole blocks (64 KiB .. 2 MiB) between memory and a disk file opened with
// O_DIRECT, batched through io_uring with a bounded queue.  When io_uring is
// not available (io_uring_queue_init fails, e.g. kernel.io_uring_disabled,
// or the kernel lacks READ/WRITE ops) it does the same with pread/pwrite.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <vector>

#include "common/result.h"

struct io_uring;  // liburing's, kept out of this header

namespace kvmx::purge {

// One read or write.  `result`: bytes done (len, or fewer when a read hit the
// end of the file), or -errno.  Short transfers are continued, so a result
// other than len and >= 0 only happens at end of file.
struct IoReq {
  int fd;
  uint64_t offset;
  void* buf;
  uint32_t len;
  bool write;
  int64_t result = 0;
};

class Mover {  // one per thread: not thread-safe
 public:
  static constexpr unsigned kMaxQueueDepth = 256;

  // queue_depth: the most requests in flight, 1..256 (else Error
  // "bad-queue-depth").  force_fallback: use pread/pwrite even when
  // io_uring works (for tests; fallback_reason() is then "forced").
  static Result<std::unique_ptr<Mover>> create(unsigned queue_depth,
                                               bool force_fallback = false);
  ~Mover();
  Mover(const Mover&) = delete;
  Mover& operator=(const Mover&) = delete;

  // Runs every request, at most queue_depth in flight, and returns when all
  // are done; each req.result is set.  Per-request errors are only in
  // req.result (EINTR/EAGAIN are retried).  An Error ("mover-ring") means
  // io_uring itself failed: requests not finished get -ECANCELED, and the
  // mover refuses further work ("mover-broken"); make a new one.
  Result<void> run(std::span<IoReq> reqs);
  // The same, calling on_done(i) in this thread as soon as reqs[i] has
  // finished (its result set), in the order they finish, while the others
  // stay in flight.  Not called for requests an Error cancels.
  Result<void> run(std::span<IoReq> reqs,
                   const std::function<void(size_t)>& on_done);

  bool uses_io_uring() const { return ring_ != nullptr; }
  const std::string& fallback_reason() const { return fallback_reason_; }
  unsigned queue_depth() const { return depth_; }

  struct Stats {
    uint64_t submitted = 0;  // I/O operations issued, continuations included
    uint64_t completed = 0;  // requests finished (successfully or not)
    uint64_t errors = 0;     // requests finished with result < 0
    uint64_t bytes = 0;      // bytes transferred
  };
  Stats stats() const { return stats_; }

 private:
  explicit Mover(unsigned depth) : depth_(depth) {}
  Result<void> run_ring(std::span<IoReq> reqs,
                        const std::function<void(size_t)>* on_done);
  void run_sync(std::span<IoReq> reqs,
                const std::function<void(size_t)>* on_done);

  unsigned depth_;
  io_uring* ring_ = nullptr;
  bool broken_ = false;
  std::string fallback_reason_;
  Stats stats_;
};

// A buffer aligned for O_DIRECT (4096 bytes), freed with free().  data() is
// nullptr when the allocation failed (or for size 0).
class AlignedBuf {
 public:
  static constexpr size_t kAlign = 4096;
  AlignedBuf() = default;
  explicit AlignedBuf(size_t size);
  ~AlignedBuf();
  AlignedBuf(AlignedBuf&& o) noexcept;
  AlignedBuf& operator=(AlignedBuf&& o) noexcept;
  AlignedBuf(const AlignedBuf&) = delete;
  AlignedBuf& operator=(const AlignedBuf&) = delete;

  void* data() const { return p_; }
  uint8_t* bytes() const { return static_cast<uint8_t*>(p_); }
  size_t size() const { return p_ ? size_ : 0; }
  explicit operator bool() const { return p_ != nullptr; }

 private:
  void* p_ = nullptr;
  size_t size_ = 0;
};

// Block buffers kept for reuse.  A new buffer costs a page fault per
// 4 KiB on first touch (on a cloud VM with free page reporting, the host's
// fault as well): measured here, most of a 2 MiB fault-back's read time and
// most of a purge batch's read.  get() hands out a kept buffer (touched
// already) or a new one, touched before it is returned; put() keeps it
// while the pool holds less than `max_bytes`, else frees it.  trim() frees
// what is kept.  Thread-safe.
class BufPool {
 public:
  BufPool(size_t buf_size, size_t max_bytes)
      : size_(buf_size), max_(max_bytes) {}
  AlignedBuf get();  // !buf when out of memory
  void put(AlignedBuf b);
  void trim();
  size_t kept_bytes() const;
  size_t buf_size() const { return size_; }

 private:
  const size_t size_, max_;
  mutable std::mutex mu_;
  std::vector<AlignedBuf> free_;
};

}  // namespace kvmx::purge
