#include "purge/mover/mover.h"

#include <liburing.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <cstdlib>
#include <ctime>
#include <deque>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace kvmx::purge {

namespace {

// EINTR/EAGAIN of one request are retried this many times, then reported.
constexpr unsigned kMaxRetries = 100;

// Progress of one request across continuations and retries.
struct Progress {
  uint64_t done = 0;
  unsigned retries = 0;
};

// A request that cannot start: len 0 is done at once, an offset range past
// what off_t holds is -EINVAL.  Returns true when `r` is settled.
bool settle_trivial(IoReq& r) {
  if (r.len == 0) {
    r.result = 0;
    return true;
  }
  if (r.offset > static_cast<uint64_t>(INT64_MAX) - r.len) {
    r.result = -EINVAL;
    return true;
  }
  return false;
}

void sleep_1ms() {
  struct timespec ts = {0, 1000000};
  nanosleep(&ts, nullptr);  // an early wake-up (EINTR) is harmless here
}

}  // namespace

Result<std::unique_ptr<Mover>> Mover::create(unsigned queue_depth,
                                             bool force_fallback) {
  if (queue_depth < 1 || queue_depth > kMaxQueueDepth)
    return make_error("bad-queue-depth",
                      "queue depth " + std::to_string(queue_depth) +
                          " is not in 1.." + std::to_string(kMaxQueueDepth));
  std::unique_ptr<Mover> m(new Mover(queue_depth));
  if (force_fallback) {
    m->fallback_reason_ = "forced";
    return m;
  }
  auto ring = std::make_unique<io_uring>();
  int rc = io_uring_queue_init(queue_depth, ring.get(), 0);
  if (rc < 0) {
    m->fallback_reason_ =
        sys_error("", "io_uring_queue_init", -rc).message;
    return m;
  }
  // Probe the two operations we use (IORING_OP_READ/WRITE, Linux 5.6).
  io_uring_probe* probe = io_uring_get_probe_ring(ring.get());
  if (!probe || !io_uring_opcode_supported(probe, IORING_OP_READ) ||
      !io_uring_opcode_supported(probe, IORING_OP_WRITE)) {
    m->fallback_reason_ = probe ? "io_uring lacks IORING_OP_READ/WRITE"
                                : "io_uring probe failed";
    if (probe) io_uring_free_probe(probe);
    io_uring_queue_exit(ring.get());
    return m;
  }
  io_uring_free_probe(probe);
  m->ring_ = ring.release();
  return m;
}

Mover::~Mover() {
  if (ring_) {
    io_uring_queue_exit(ring_);
    delete ring_;
  }
}

Result<void> Mover::run(std::span<IoReq> reqs) {
  const std::function<void(size_t)> none;
  return run(reqs, none);
}

Result<void> Mover::run(std::span<IoReq> reqs,
                        const std::function<void(size_t)>& on_done) {
  if (broken_)
    return make_error("mover-broken", "the io_uring ring failed earlier");
  for (auto& r : reqs) r.result = 0;
  const std::function<void(size_t)>* cb = on_done ? &on_done : nullptr;
  if (!ring_) {
    run_sync(reqs, cb);
    return ok_result();
  }
  return run_ring(reqs, cb);
}

// The fallback: one request after the other.
void Mover::run_sync(std::span<IoReq> reqs,
                     const std::function<void(size_t)>* on_done) {
  for (size_t i = 0; i < reqs.size(); i++) {
    IoReq& r = reqs[i];
    if (!settle_trivial(r)) {
      Progress p;
      r.result = 0;
      while (p.done < r.len) {
        auto* b = static_cast<uint8_t*>(r.buf) + p.done;
        size_t n = r.len - p.done;
        off_t off = static_cast<off_t>(r.offset + p.done);
        stats_.submitted++;
        ssize_t got = r.write ? pwrite(r.fd, b, n, off) : pread(r.fd, b, n, off);
        if (got < 0 && (errno == EINTR || errno == EAGAIN) &&
            ++p.retries <= kMaxRetries)
          continue;
        if (got < 0) {
          r.result = -errno;
          break;
        }
        if (got == 0) {  // end of file; a write that does nothing is an error
          if (r.write) r.result = -EIO;
          break;
        }
        p.done += static_cast<uint64_t>(got);
        stats_.bytes += static_cast<uint64_t>(got);
      }
      if (r.result == 0) r.result = static_cast<int64_t>(p.done);
    }
    stats_.completed++;
    if (r.result < 0) stats_.errors++;
    if (on_done) (*on_done)(i);
  }
}

Result<void> Mover::run_ring(std::span<IoReq> reqs,
                             const std::function<void(size_t)>* on_done) {
  std::vector<Progress> prog(reqs.size());
  std::vector<bool> finished(reqs.size(), false);
  std::deque<size_t> pending;  // to (re)submit, in order
  bool cancelling = false;
  auto finish = [&](size_t i, int64_t result) {
    reqs[i].result = result;
    finished[i] = true;
    stats_.completed++;
    if (result < 0) stats_.errors++;
    if (on_done && !cancelling) (*on_done)(i);
  };
  for (size_t i = 0; i < reqs.size(); i++) {
    if (settle_trivial(reqs[i])) finish(i, reqs[i].result);
    else pending.push_back(i);
  }

  unsigned inflight = 0;    // accepted by the kernel, not completed
  unsigned queued = 0;      // SQEs prepared, not yet accepted by the kernel
  unsigned idle_tries = 0;  // submit retries with nothing in flight
  std::optional<Error> failure;

  while (!failure && (!pending.empty() || inflight + queued > 0)) {
    while (inflight + queued < depth_ && !pending.empty()) {
      io_uring_sqe* sqe = io_uring_get_sqe(ring_);
      if (!sqe) break;  // cannot happen: the SQ holds >= depth entries
      size_t i = pending.front();
      pending.pop_front();
      IoReq& r = reqs[i];
      auto* b = static_cast<uint8_t*>(r.buf) + prog[i].done;
      unsigned n = r.len - static_cast<unsigned>(prog[i].done);
      if (r.write) io_uring_prep_write(sqe, r.fd, b, n, r.offset + prog[i].done);
      else io_uring_prep_read(sqe, r.fd, b, n, r.offset + prog[i].done);
      io_uring_sqe_set_data64(sqe, i);
      queued++;
      stats_.submitted++;
    }
    if (queued > 0) {
      int rc = io_uring_submit(ring_);
      if (rc >= 0) {
        inflight += static_cast<unsigned>(rc);
        queued -= static_cast<unsigned>(rc);
        idle_tries = 0;
      } else if (rc == -EINTR || rc == -EAGAIN || rc == -EBUSY) {
        // Transient: reap completions if any, else try again shortly.
        if (inflight == 0) {
          if (++idle_tries > 1000) {
            failure = sys_error("mover-ring", "io_uring_submit", -rc);
            break;
          }
          sleep_1ms();
          continue;
        }
      } else {
        failure = sys_error("mover-ring", "io_uring_submit", -rc);
        break;
      }
    }
    if (inflight == 0) continue;

    io_uring_cqe* cqe = nullptr;
    int rc = io_uring_wait_cqe(ring_, &cqe);
    if (rc == -EINTR || rc == -EAGAIN) continue;
    if (rc < 0) {
      failure = sys_error("mover-ring", "io_uring_wait_cqe", -rc);
      break;
    }
    // Reap everything that is ready.
    while (cqe) {
      size_t i = static_cast<size_t>(io_uring_cqe_get_data64(cqe));
      int res = cqe->res;
      io_uring_cqe_seen(ring_, cqe);
      inflight--;
      IoReq& r = reqs[i];
      if ((res == -EINTR || res == -EAGAIN) && ++prog[i].retries <= kMaxRetries) {
        pending.push_back(i);
      } else if (res < 0) {
        finish(i, res);
      } else if (res == 0) {  // end of file (a write doing nothing: error)
        finish(i, r.write ? -EIO : static_cast<int64_t>(prog[i].done));
      } else {
        prog[i].done += static_cast<uint64_t>(res);
        stats_.bytes += static_cast<uint64_t>(res);
        if (prog[i].done < r.len) pending.push_back(i);  // short: continue
        else finish(i, static_cast<int64_t>(prog[i].done));
      }
      cqe = nullptr;
      if (io_uring_peek_cqe(ring_, &cqe) < 0) cqe = nullptr;
    }
  }
  if (!failure) return ok_result();

  // The ring failed.  Wait for what the kernel has accepted (it may still
  // write into the callers' buffers), then cancel the rest.
  broken_ = true;
  while (inflight > 0) {
    io_uring_cqe* cqe = nullptr;
    int rc = io_uring_wait_cqe(ring_, &cqe);
    if (rc == -EINTR || rc == -EAGAIN) continue;
    if (rc < 0) break;  // nothing more can be learnt from this ring
    io_uring_cqe_seen(ring_, cqe);
    inflight--;
  }
  cancelling = true;
  for (size_t i = 0; i < reqs.size(); i++)
    if (!finished[i]) finish(i, -ECANCELED);
  return *failure;
}

AlignedBuf::AlignedBuf(size_t size) : size_(size) {
  if (size == 0) return;
  void* p = nullptr;
  if (posix_memalign(&p, kAlign, size) == 0) p_ = p;
}

AlignedBuf::~AlignedBuf() { free(p_); }

AlignedBuf::AlignedBuf(AlignedBuf&& o) noexcept
    : p_(std::exchange(o.p_, nullptr)), size_(std::exchange(o.size_, 0)) {}

AlignedBuf& AlignedBuf::operator=(AlignedBuf&& o) noexcept {
  if (this != &o) {
    free(p_);
    p_ = std::exchange(o.p_, nullptr);
    size_ = std::exchange(o.size_, 0);
  }
  return *this;
}

AlignedBuf BufPool::get() {
  {
    std::lock_guard g(mu_);
    if (!free_.empty()) {
      AlignedBuf b = std::move(free_.back());
      free_.pop_back();
      return b;
    }
  }
  AlignedBuf b(size_);
  if (b) std::memset(b.data(), 0, size_);  // the first touch, here
  return b;
}

void BufPool::put(AlignedBuf b) {
  if (!b || b.size() != size_) return;  // freed by its destructor
  std::lock_guard g(mu_);
  if ((free_.size() + 1) * size_ <= max_) free_.push_back(std::move(b));
}

void BufPool::trim() {
  std::vector<AlignedBuf> drop;
  std::lock_guard g(mu_);
  drop.swap(free_);
}

size_t BufPool::kept_bytes() const {
  std::lock_guard g(mu_);
  return free_.size() * size_;
}

}  // namespace kvmx::purge
