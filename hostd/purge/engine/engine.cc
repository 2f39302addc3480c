#include "purge/engine/engine.h"

#include <fcntl.h>
#include <linux/falloc.h>
#include <sys/stat.h>
#include <sys/xattr.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <set>

#include "common/log.h"
#include "purge/table/crc32c.h"

namespace kvmx::purge {

using nlohmann::json;

namespace {

uint64_t mono_ms() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

uint64_t mono_us() {
  return std::chrono::duration_cast<std::chrono::microseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

bool all_zero(const uint8_t* p, size_t n) {
  // Word at a time: the buffers are 4 KiB-aligned and block-sized.
  const uint64_t* w = reinterpret_cast<const uint64_t*>(p);
  for (size_t i = 0; i < n / 8; i++)
    if (w[i]) return false;
  return true;
}

Result<void> write_all(int fd, const uint8_t* p, size_t n, uint64_t at) {
  while (n) {
    ssize_t w = pwrite(fd, p, n, static_cast<off_t>(at));
    if (w < 0 && errno == EINTR) continue;
    if (w < 0) return sys_error("backend-write", "write to the backend");
    if (w == 0) return make_error("backend-write", "backend write stalled");
    p += w;
    n -= static_cast<size_t>(w);
    at += static_cast<uint64_t>(w);
  }
  return {};
}

// Calls fn(i, j) for each run [i, j) of indexes whose blocks are
// consecutive (block(k) + 1 == block(k + 1)), skipping those use() refuses:
// one agent request or one punch per run instead of one per block.
template <typename Block, typename Use, typename Fn>
void for_each_run(size_t n, Block block, Use use, Fn fn) {
  for (size_t i = 0; i < n;) {
    if (!use(i)) {
      i++;
      continue;
    }
    size_t j = i + 1;
    while (j < n && use(j) && block(j) == block(j - 1) + 1) j++;
    fn(i, j);
    i = j;
  }
}

}  // namespace

uint64_t Engine::now_ms() const { return mono_ms(); }

uint64_t Engine::len(uint64_t b) const {
  uint64_t bs = block_size();
  return std::min(bs, hello_.size - off(b));
}

Result<std::unique_ptr<Engine>> Engine::start(EngineConfig cfg,
                                              FatalFn on_fatal) {
  if (cfg.block_shift < 16 || cfg.block_shift > 30)
    return make_error("bad-block-size",
                      "block size must be a power of two from 64 KiB to 1 GiB");
  if (cfg.batch_bytes == 0 || cfg.batch_bytes > (256u << 20))
    return make_error("bad-batch", "batch must be 1 byte..256 MiB");
  if (cfg.read_piece_bytes < 4096 ||
      (cfg.read_piece_bytes & (cfg.read_piece_bytes - 1)))
    return make_error("bad-piece", "read pieces must be a power of two >= 4 KiB");
  std::unique_ptr<Engine> e(new Engine(std::move(cfg)));
  e->on_fatal_ = std::move(on_fatal);
  if (auto r = e->attach(); !r) return r.error();
  Engine* raw = e.get();
  e->fault_thread_ = std::thread([raw] { raw->fault_loop(); });
  e->control_thread_ = std::thread([raw] { raw->control_loop(); });
  return e;
}

Engine::~Engine() {
  {
    std::lock_guard g(mu_);
    stop_ = true;
    cv_.notify_all();
  }
  if (fault_thread_.joinable()) fault_thread_.join();
  if (control_thread_.joinable()) control_thread_.join();
  agent_.reset();  // joins the reader; no callback after this
}

Result<void> Engine::attach() {
  auto a = AgentClient::connect(
      cfg_.agent_path, &hello_,
      [this](uint64_t offset, bool, uint64_t since_ns) {
        on_fault(offset, since_ns);
      },
      [this](const std::string& why) {
        std::lock_guard g(mu_);
        agent_lost_ = true;
        agent_lost_why_ = why;
        cv_.notify_all();
      });
  if (!a) return a.error();
  agent_ = std::move(*a);
  if (hello_.page_size > block_size())
    return make_error("bad-block-size", "block size is below the page size");
  nblocks_ = (hello_.size + block_size() - 1) >> cfg_.block_shift;
  pool_ = std::make_unique<BufPool>(
      block_size(), 3 * cfg_.batch_bytes + (16 << 20) + 2 * block_size());
  {
    std::lock_guard g(mu_);
    st_.assign(nblocks_, St::kResident);
    cancelled_.assign(nblocks_, 0);
    pending_.assign(nblocks_, 0);
    queued_.assign(nblocks_, 0);
    ra_faulted_.assign(nblocks_, 0);
    noticed_us_.assign(nblocks_, 0);
    handoff_us_.assign(nblocks_, 0);
  }
  // Only now: a fault the agent tells us right after HELLO needs them.
  agent_->start();

  RecoveryReport rep;
  struct stat sb{};
  bool exists = stat(cfg_.vbt_path.c_str(), &sb) == 0;
  // An xattr ties a file backend to its table; a memfd has no name.
  int xattr_fd = hello_.backend_fd.get();
  {
    char probe;
    if (fgetxattr(xattr_fd, "user.kvmx.probe", &probe, 1) < 0 &&
        errno == EOPNOTSUPP)
      xattr_fd = -1;
  }
  if (exists) {
    auto t = Table::open(cfg_.vbt_path, cfg_.vbd_path, xattr_fd, hello_.size,
                         &rep);
    if (!t) return t.error();
    table_ = std::move(*t);
    if (table_->block_shift() != cfg_.block_shift)
      return make_error("size-mismatch",
                        "the table at " + cfg_.vbt_path + " has blocks of " +
                            std::to_string(table_->block_size()) +
                            " bytes, not " + std::to_string(block_size()));
  } else {
    TableParams p;
    p.vbt_path = cfg_.vbt_path;
    p.vbd_path = cfg_.vbd_path;
    p.block_shift = cfg_.block_shift;
    p.backend_size = hello_.size;
    p.disk_slots = cfg_.disk_slots ? cfg_.disk_slots : nblocks_;
    p.journal_bytes = cfg_.journal_bytes;
    auto t = Table::create(p, xattr_fd);
    if (!t) return t.error();
    table_ = std::move(*t);
  }
  vbd_fd_.reset(open(cfg_.vbd_path.c_str(), O_RDWR | O_CLOEXEC | O_DIRECT));
  if (!vbd_fd_)
    return sys_error("vbd-open", "open " + cfg_.vbd_path + " with O_DIRECT");
  if (auto r = recover(rep); !r) return r;

  auto pm = PagemapSource::open(agent_->peer_pid());
  if (pm) {
    pagemap_ = std::move(*pm);
    tracker_ = std::make_unique<Tracker>(hello_.host_addr, nblocks_,
                                         block_size(), hello_.page_size);
  } else {
    log::warn("purge: no access tracking",
              {{"nvdimm", cfg_.name}, {"error", pm.error().message}});
  }
  policy_ = std::make_unique<Policy>(cfg_.policy, block_size());
  return {};
}

bool Engine::has_data(uint64_t b) const {
  off_t start = static_cast<off_t>(hello_.fd_offset + off(b));
  off_t data = lseek(hello_.backend_fd.get(), start, SEEK_DATA);
  // ENXIO: no data from here to the end of the file.
  return data >= 0 && static_cast<uint64_t>(data) < start + len(b);
}

// Which blocks have data in the backend: one SEEK_DATA/SEEK_HOLE pair per
// extent, not per block.
std::vector<uint8_t> Engine::data_map() const {
  std::vector<uint8_t> m(nblocks_, 0);
  int fd = hello_.backend_fd.get();
  off_t base = static_cast<off_t>(hello_.fd_offset);
  off_t end = base + static_cast<off_t>(hello_.size);
  off_t pos = base;
  while (pos < end) {
    off_t d = lseek(fd, pos, SEEK_DATA);
    if (d < 0 || d >= end) break;
    off_t h = lseek(fd, d, SEEK_HOLE);
    if (h < 0 || h > end) h = end;
    for (uint64_t b = static_cast<uint64_t>(d - base) >> cfg_.block_shift;
         b < nblocks_ && off(b) < static_cast<uint64_t>(h - base); b++)
      m[b] = 1;
    pos = h;
  }
  return m;
}

bool Engine::fully_allocated(uint64_t b) const {
  off_t start = static_cast<off_t>(hello_.fd_offset + off(b));
  off_t hole = lseek(hello_.backend_fd.get(), start, SEEK_HOLE);
  return hole >= 0 && static_cast<uint64_t>(hole) >= start + len(b);
}

// After a restart of hostd or QEMU.  A purged block whose range in the
// backend is fully allocated was not punched yet, or was restored but not
// committed: the backend holds its data (the same as the disk copy, or
// newer), so it becomes resident.  Every other purged block goes behind a
// placeholder and is punched; everything else is mapped back.
Result<void> Engine::recover(const RecoveryReport& rep) {
  // (Entries that fail their checksum make Table::open fail: bad-entries.)
  std::vector<uint64_t> purged, back;
  Tx undo{TxType::Unpurge, {}};
  for (uint64_t b : rep.purged) {
    if (b >= nblocks_) continue;
    if (fully_allocated(b)) {
      Entry e = table_->entry(b);
      undo.ops.push_back({b, Entry{BlockState::Resident, 0, 0, e.generation,
                                   kNoSlot, 0}});
    } else {
      purged.push_back(b);
    }
  }
  // In slices: one transaction may touch only so many table pages.
  for (size_t i = 0; i < undo.ops.size(); i += 32) {
    Tx part{TxType::Unpurge, {}};
    std::vector<uint64_t> slots;
    for (size_t k = i; k < std::min(undo.ops.size(), i + 32); k++) {
      part.ops.push_back(undo.ops[k]);
      slots.push_back(table_->entry(undo.ops[k].block).disk_slot);
    }
    if (auto r = table_->commit(std::move(part)); !r) return r.error();
    for (uint64_t s : slots)
      if (s != kNoSlot) table_->release_slot(s);
  }
  std::sort(purged.begin(), purged.end());
  if (auto r = agent_runs(AgentClient::kSwapOut, purged); !r) return r;
  for (uint64_t b : purged) {
    if (fallocate(hello_.backend_fd.get(),
                  FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                  static_cast<off_t>(hello_.fd_offset + off(b)),
                  static_cast<off_t>(len(b))))
      log::warn("purge: cannot punch a purged block",
                {{"nvdimm", cfg_.name}, {"block", b},
                 {"error", std::strerror(errno)}});
  }
  {
    std::lock_guard g(mu_);
    for (uint64_t b : purged) st_[b] = St::kPurged;
    for (uint64_t b = 0; b < nblocks_; b++)
      if (st_[b] == St::kResident) back.push_back(b);
  }
  if (auto r = agent_runs(AgentClient::kMapBack, back); !r) return r;
  // Threads that waited for an earlier hostd fault again and are heard.
  if (auto r = agent_->request(AgentClient::kWake, 0, hello_.size); !r)
    return r.error();
  log::info("purge: attached",
            {{"nvdimm", cfg_.name}, {"blocks", nblocks_},
             {"purged", purged.size()},
             {"replayed", rep.commits_replayed},
             {"moving-dropped", rep.moving_to_resident.size()}});
  return {};
}

// One request per run of consecutive blocks.
Result<void> Engine::agent_runs(AgentClient::Op op,
                                const std::vector<uint64_t>& sorted) {
  Result<void> res;
  for_each_run(
      sorted.size(), [&](size_t k) { return sorted[k]; },
      [&](size_t) { return res.ok(); },
      [&](size_t i, size_t j) {
        uint64_t first = sorted[i], last = sorted[j - 1];
        if (auto r = agent_->request(op, off(first),
                                     off(last) + len(last) - off(first));
            !r)
          res = r.error();
      });
  return res;
}

void Engine::on_fault(uint64_t offset, uint64_t since_ns) {
  if (offset >= hello_.size) return;
  uint64_t b = offset >> cfg_.block_shift;
  uint64_t now = mono_us();
  std::lock_guard g(mu_);
  stats_.faults++;
  if (st_[b] == St::kRestoring) ra_faulted_[b] = 1;
  if (st_[b] == St::kPurged && !noticed_us_[b]) {
    noticed_us_[b] = now;
    // The agent's clock is ours (CLOCK_MONOTONIC); a time after now or
    // more than a minute ago is not taken.
    uint64_t since = since_ns / 1000;
    handoff_us_[b] = since && since <= now && now - since < 60'000'000
                         ? static_cast<uint32_t>(std::max<uint64_t>(
                               now - since, 1))
                         : 0;
  }
  if (queued_[b]) return;  // concurrent faults on a block: one restore
  queued_[b] = 1;
  faults_.push_back(b);  // at most one entry per block: bounded
  cv_.notify_all();
}

void Engine::fault_loop() {
  auto m = Mover::create(16);
  if (!m) {
    fatal(0, "no mover for fault-back: " + m.error().message);
    return;
  }
  for (;;) {
    uint64_t b;
    {
      std::unique_lock g(mu_);
      cv_.wait(g, [&] { return stop_ || !faults_.empty(); });
      if (stop_) return;
      b = faults_.front();
      faults_.pop_front();
      queued_[b] = 0;
    }
    restore(b, **m, true);
    readahead_after(b, **m);
  }
}

void Engine::LatencyRing::add(uint64_t us) {
  uint32_t x = static_cast<uint32_t>(std::min<uint64_t>(us, UINT32_MAX));
  if (v.size() < kLatencies)
    v.push_back(x);
  else
    v[next] = x;
  next = (next + 1) % kLatencies;
}

json Engine::LatencyRing::summary() const {
  std::vector<uint32_t> lat = v;
  std::sort(lat.begin(), lat.end());
  auto pct = [&](double p) -> json {
    if (lat.empty()) return nullptr;
    return lat[std::min(lat.size() - 1,
                        static_cast<size_t>(p * (lat.size() - 1) + 0.5))];
  };
  return json{{"p50", pct(0.5)}, {"p99", pct(0.99)}, {"samples", lat.size()}};
}

// Under mu_: takes purged block b for a restore (kRestoring) and adds it
// to `rs`.  `fault_waits`: a fault already waits for it (retried should a
// read-ahead of it fail).
Engine::Restore& Engine::claim_locked(std::vector<Restore>& rs, uint64_t b,
                                      bool fault_waits) {
  st_[b] = St::kRestoring;
  ra_faulted_[b] = fault_waits;
  Restore& r = rs.emplace_back();
  r.b = b;
  r.e = table_->entry(b);
  r.t0 = mono_us();
  return r;
}

bool Engine::restore(uint64_t b, Mover& mover, bool from_fault) {
  uint64_t t0 = mono_us();
  std::vector<Restore> rs;
  {
    std::unique_lock g(mu_);
    cv_.wait(g, [&] { return stop_ || st_[b] != St::kSealing; });
    if (stop_) return false;
    switch (st_[b]) {
      case St::kPurged: {
        Restore& r = claim_locked(rs, b, false);
        r.t0 = t0;
        // The latency a waiting thread sees starts at QEMU's notice.
        if (from_fault && noticed_us_[b]) {
          r.t_notice = noticed_us_[b];
          r.handoff = handoff_us_[b];
        }
        break;
      }
      case St::kMoving:
        // Not punched yet: the backend still has it; the purge drops it.
        cancelled_[b] = 1;
        stats_.cancels++;
        [[fallthrough]];
      case St::kResident: {
        g.unlock();
        // A hole hidden at QEMU's start, a cancel, or a stale fault.
        auto m = agent_->request(AgentClient::kMapBack, off(b), len(b));
        if (!m) {
          std::lock_guard g2(mu_);
          stats_.agent_errors++;
        }
        return m.ok();
      }
      case St::kRestoring:
        // Read ahead right now (or brought back by unpurge): its MAP_BACK
        // wakes whoever waits on it; should the read-ahead fail, this
        // fault is retried (give_back).
        if (from_fault) {
          stats_.readahead_waits++;
          ra_faulted_[b] = 1;
        }
        return false;
      case St::kLost:
      case St::kSealing:
        return false;  // lost for good
    }
  }
  read_copies(rs, mover);
  return finish_restore(rs[0], from_fault ? Mode::kFault : Mode::kUnpurge);
}

// Reads the disk copies of claimed blocks, all at once: a block above
// read_piece_bytes (512 KiB) is read as pieces in parallel, which the disk serves
// sooner than one large request.  As the pieces of a block arrive in order,
// each but the last is checksummed and written into the backend at once
// (streaming), so that little is left to do once the read ends.  All-zero
// blocks have no copy.
void Engine::read_copies(std::vector<Restore>& rs, Mover& mover) {
  const uint64_t kPiece = std::min(cfg_.read_piece_bytes, block_size());
  last_busy_ms_ = mono_ms();
  std::vector<IoReq> reqs;
  std::vector<std::pair<size_t, size_t>> owner;  // (restore, piece)
  for (size_t i = 0; i < rs.size(); i++) {
    Restore& r = rs[i];
    r.crc = table_->data_crc_seed(r.b, r.e.generation);
    r.buf = pool_->get();
    if (!r.buf) {
      r.err = ENOMEM;
      continue;
    }
    if (r.e.flags & 1) {
      std::memset(r.buf.data(), 0, block_size());
      continue;
    }
    uint64_t at = table_->slot_offset(r.e.disk_slot);
    for (uint64_t o = 0; o < block_size(); o += kPiece) {
      uint64_t n = std::min(kPiece, block_size() - o);
      reqs.push_back(IoReq{vbd_fd_.get(), at + o, r.buf.bytes() + o,
                           static_cast<uint32_t>(n), false});
      owner.emplace_back(i, r.pieces++);
    }
    r.arrived.assign(r.pieces, 0);
  }
  int bfd = hello_.backend_fd.get();
  auto arrived = [&](size_t k) {
    Restore& r = rs[owner[k].first];
    if (reqs[k].result != reqs[k].len || !r.write_error.empty()) return;
    r.arrived[owner[k].second] = 1;
    uint64_t n = len(r.b);
    // In order, and never the piece that completes the block's range.
    while (r.next + 1 < r.pieces && r.arrived[r.next]) {
      uint64_t o = r.next * kPiece;
      uint64_t m = std::min(kPiece, n > o ? n - o : 0);
      if (o + m >= n) break;
      r.crc = crc32c(r.buf.bytes() + o, m, r.crc);
      if (auto w = write_all(bfd, r.buf.bytes() + o, m,
                             hello_.fd_offset + off(r.b) + o);
          !w) {
        r.write_error = w.error().message;
        return;
      }
      r.done = o + m;
      r.next++;
    }
  };
  auto run = reqs.empty() ? Result<void>{} : mover.run(reqs, arrived);
  for (size_t k = 0; k < reqs.size(); k++) {
    Restore& r = rs[owner[k].first];
    if (r.err) continue;
    if (!run) r.err = EIO;
    else if (reqs[k].result < 0) r.err = static_cast<int>(-reqs[k].result);
    else if (reqs[k].result != reqs[k].len) r.err = EIO;  // a short copy
  }
  uint64_t t = mono_us();
  for (auto& r : rs) r.t_read = t;
}

// Takes back what streaming wrote of a block that will not be mapped: the
// range is behind QEMU's placeholder, nothing else sees it.
void Engine::unwrite(const Restore& r) {
  if (!r.done) return;
  if (fallocate(hello_.backend_fd.get(),
                FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                static_cast<off_t>(hello_.fd_offset + off(r.b)),
                static_cast<off_t>(len(r.b))))
    log::warn("purge: cannot punch a block that was not brought back",
              {{"nvdimm", cfg_.name}, {"block", r.b},
               {"error", std::strerror(errno)}});
}

// Checks the copy, writes (the rest of) it into the backend and maps it
// back.  A failure of a fault or an unpurge is fatal for the block (the
// reader stays blocked); a read-ahead gives the block back to `purged`
// instead, and a fault that came meanwhile retries it the fault's way.
bool Engine::finish_restore(Restore& r, Mode mode) {
  uint64_t b = r.b;
  bool ra = mode == Mode::kReadahead;
  auto fail = [&](const std::string& why, uint64_t Stats::*counter) {
    {
      std::lock_guard g(mu_);
      if (counter) stats_.*counter += 1;
    }
    unwrite(r);
    if (ra) give_back(r, why);
    else fatal(b, why);
    return false;
  };
  if (r.err)
    return fail(r.err == ENOMEM
                    ? std::string("cannot allocate a block buffer")
                    : "cannot read its disk copy: " +
                          std::string(std::strerror(r.err)),
                &Stats::io_errors);
  uint64_t n = len(b);
  if (crc32c(r.buf.bytes() + r.done, n - r.done, r.crc) != r.e.data_crc)
    return fail("its disk copy fails its checksum (changed behind hostd's back)",
                &Stats::checksum_errors);
  uint64_t t_crc = mono_us();
  int bfd = hello_.backend_fd.get();
  uint64_t at = hello_.fd_offset + off(b);
  // No fallocate first: ext4 and XFS reserve space for a buffered write
  // when it is made (delayed allocation), DAX file systems and shmem
  // allocate at once, so a full backend fails the pwrite with ENOSPC here,
  // not at write-back.
  // Zeros too: the range must read as data, not as unwritten extents, to
  // a recovery that runs while QEMU still holds it (see below).
  if (!r.write_error.empty()) return fail(r.write_error, nullptr);
  if (auto w = write_all(bfd, r.buf.bytes() + r.done, n - r.done, at + r.done);
      !w) {
    r.done = n;  // for unwrite: some of it may be there
    return fail(w.error().message, nullptr);
  }
  pool_->put(std::move(r.buf));
  // `resident` is committed later, in a batch (flush_residents): until then
  // recovery finds the range fully allocated only once the data is on
  // disk (written back, or synced by a guest flush), and takes the backend
  // as it is; a range still partly unwritten is a purged block again, read
  // from its disk copy, which is what the guest saw at the fault.
  uint64_t t_write = mono_us();
  auto m = agent_->request(AgentClient::kMapBack, off(b), n);
  uint64_t t_map = mono_us();
  {
    std::lock_guard g(mu_);
    if (mode == Mode::kFault) {
      uint64_t from = r.t_notice && r.t_notice < r.t0 ? r.t_notice : r.t0;
      stats_.phase_us[4] += r.t0 - from;
      stats_.phase_us[0] += r.t_read - r.t0;
      stats_.phase_us[1] += t_crc - r.t_read;
      stats_.phase_us[2] += t_write - t_crc;
      stats_.phase_us[3] += t_map - t_write;
      latency_.add(t_map - from);
      // What the faulting thread waited, by the agent's times: from its
      // read of the fault to the wake (the reply comes after that).
      uint64_t woken = m ? m->woken_ns / 1000 : 0;
      if (r.handoff && r.t_notice == from && woken >= t_write &&
          woken <= t_map) {
        stats_.handoff_us += r.handoff;
        stats_.wake_us += woken - t_write;
        stats_.timed_faults++;
        wait_.add(woken - from + r.handoff);
      }
    }
    noticed_us_[b] = 0;
    if (ra) stats_.readahead_blocks++;
    st_[b] = St::kResident;
    pending_[b] = 1;
    pending_residents_.push_back({b, r.e.generation, r.e.disk_slot});
    if (!m) stats_.agent_errors++;
    stats_.fault_backs++;
    stats_.restored_bytes += n;
    cv_.notify_all();
  }
  return m.ok();
}

// A read-ahead that did not work: the block stays purged, behind its
// placeholder, with its disk copy.  If a fault asked for it meanwhile, the
// fault path tries again (and stops the VM if that fails too).
void Engine::give_back(Restore& r, const std::string& why) {
  log::warn("purge: read-ahead dropped a block",
            {{"nvdimm", cfg_.name}, {"block", r.b}, {"error", why}});
  pool_->put(std::move(r.buf));
  std::lock_guard g(mu_);
  stats_.readahead_dropped++;
  st_[r.b] = St::kPurged;
  noticed_us_[r.b] = 0;
  if (ra_faulted_[r.b] && !queued_[r.b]) {
    queued_[r.b] = 1;
    faults_.push_front(r.b);
  }
  ra_faulted_[r.b] = 0;
  cv_.notify_all();
}

// After a fault on block b: if the faults run sequentially (b follows the
// last faulted block, or the last read-ahead window), the purged blocks
// that follow come back too, up to the policy's read-ahead bytes, in a
// window that starts at 2 blocks and doubles.  Their reads run in
// parallel; a fault on another block is served between them.
void Engine::readahead_after(uint64_t b, Mover& mover) {
  if (b == ra_last_) return;  // the same block again (another vCPU)
  // Sequential: the next block, or one inside (or just after) the last
  // window, which a reader that caught up with the read-ahead faults on.
  uint64_t hi = ra_last_ == UINT64_MAX ? 0
                : ra_next_ == UINT64_MAX ? ra_last_ + 1
                                         : std::max(ra_next_, ra_last_ + 1);
  bool seq = ra_last_ != UINT64_MAX && b > ra_last_ && b <= hi;
  ra_last_ = b;
  std::vector<Restore> rs;
  {
    std::lock_guard g(mu_);
    uint64_t max = policy_->config().readahead_bytes >> cfg_.block_shift;
    if (!seq || max == 0 || stop_ || fatal_seen_ || agent_lost_) {
      ra_window_ = 0;
      ra_next_ = UINT64_MAX;
      return;
    }
    ra_window_ = std::min(max, ra_window_ ? ra_window_ * 2 : uint64_t{2});
    uint64_t end = std::min(nblocks_, b + 1 + ra_window_);
    for (uint64_t x = b + 1; x < end; x++) {
      if (st_[x] == St::kPurged) claim_locked(rs, x, queued_[x]);
    }
    ra_next_ = end;
    if (rs.empty()) return;
    stats_.readahead_windows++;
  }
  read_copies(rs, mover);
  for (auto& r : rs) {
    // A faulted block goes before the rest of the window.
    for (;;) {
      uint64_t f;
      {
        std::lock_guard g(mu_);
        if (faults_.empty() || stop_) break;
        f = faults_.front();
        faults_.pop_front();
        queued_[f] = 0;
      }
      restore(f, mover, true);
    }
    finish_restore(r, Mode::kReadahead);
  }
}

// Unpurge, a batch at a time: the reads of a batch run in parallel.
Result<MoveResult> Engine::unpurge_blocks(const std::vector<uint64_t>& blocks,
                                          Mover& mover) {
  MoveResult mr;
  uint64_t t0 = mono_us();
  size_t per = std::clamp<uint64_t>(cfg_.batch_bytes / block_size(), 1, 4096);
  for (size_t i = 0; i < blocks.size(); i += per) {
    std::vector<Restore> rs;
    {
      std::lock_guard g(mu_);
      if (stop_) break;
      for (size_t k = i; k < std::min(blocks.size(), i + per); k++) {
        uint64_t b = blocks[k];
        if (st_[b] != St::kPurged) {  // a fault or read-ahead was quicker
          mr.skipped++;
          continue;
        }
        claim_locked(rs, b, false);
      }
    }
    read_copies(rs, mover);
    for (auto& r : rs) {
      if (finish_restore(r, Mode::kUnpurge)) {
        mr.blocks++;
        mr.bytes += len(r.b);
      } else {
        mr.failed++;
      }
    }
  }
  mr.seconds = (mono_us() - t0) / 1e6;
  return mr;
}

// Commits `resident` for the blocks brought back since the last call and
// frees their disk slots.
void Engine::flush_residents() {
  std::vector<PendingResident> todo;
  {
    std::lock_guard g(mu_);
    todo.swap(pending_residents_);
  }
  if (todo.empty()) return;
  // The restored bytes on disk first, then `resident`, then the slot free:
  // a crash in between finds purged + a durable disk copy, or a fully
  // allocated, synced range (recover()).
  if (fdatasync(hello_.backend_fd.get())) {
    int err = errno;
    std::lock_guard g(mu_);
    stats_.commit_errors++;
    // Kept as they are: purged on disk, with their slots.
    log::error("purge: backend sync failed; fault-backs stay uncommitted",
               {{"nvdimm", cfg_.name}, {"error", std::strerror(err)}});
    for (auto& p : todo) pending_[p.block] = 0;
    return;
  }
  for (size_t i = 0; i < todo.size(); i += 32) {
    Tx tx{TxType::FaultBackDone, {}};
    size_t end = std::min(todo.size(), i + 32);
    for (size_t k = i; k < end; k++)
      tx.ops.push_back({todo[k].block,
                        Entry{BlockState::Resident, 0, 0, todo[k].generation,
                              kNoSlot, 0}});
    auto c = table_->commit(std::move(tx));
    std::lock_guard g(mu_);
    if (!c) {
      // The blocks stay as they are on disk: purged with a durable copy
      // (their slots stay taken) or fully allocated in the backend.
      stats_.commit_errors++;
      log::error("purge: fault-backs not committed",
                 {{"nvdimm", cfg_.name}, {"error", c.error().message}});
    }
    for (size_t k = i; k < end; k++) {
      pending_[todo[k].block] = 0;
      if (c && todo[k].slot != kNoSlot) table_->release_slot(todo[k].slot);
    }
  }
}

void Engine::fatal(uint64_t b, const std::string& why) {
  std::string what = "block " + std::to_string(b) + " of " + cfg_.name +
                     " cannot be brought back: " + why;
  bool first;
  {
    std::lock_guard g(mu_);
    if (b < st_.size()) st_[b] = St::kLost;
    first = !fatal_seen_;
    fatal_seen_ = true;
    if (first) fatal_what_ = what;
    cv_.notify_all();
  }
  log::error("purge: block lost", {{"nvdimm", cfg_.name}, {"block", b},
                                   {"error", why}});
  if (first && on_fatal_) on_fatal_(what);
}

// Batches go through three stages, on threads of their own, so that the
// disk is kept writing:
//   1. prepare (this thread): swap out, read the backend, checksum;
//   2. write (two writer threads, a batch each): the disk copies, O_DIRECT;
//   3. seal (a sealer thread): one fdatasync of the disk file for every
//      batch written since its last round, one journal commit for them,
//      then punch.
// A batch is handed to a writer only when one takes it, so at most three
// batches hold buffers (one being prepared, two being written); the
// sealer's queue holds batches without buffers.
Result<MoveResult> Engine::purge_blocks(const std::vector<uint64_t>& blocks,
                                        Mover& mover) {
  MoveResult total;
  uint64_t t0 = mono_us();
  std::vector<std::unique_ptr<Batch>> all;
  std::mutex qmu;
  std::condition_variable qcv;
  Batch* to_write = nullptr;         // handed over, not yet taken
  std::deque<Batch*> to_seal;
  unsigned writers_left = 2;
  bool no_more = false;
  // Two writers, each with its own mover: while one waits for the last
  // writes of its batch, the other already writes the next one.
  auto writer_loop = [&](Mover* wm) {
    for (;;) {
      Batch* b;
      {
        std::unique_lock g(qmu);
        qcv.wait(g, [&] { return to_write || no_more; });
        if (!to_write) break;
        b = std::exchange(to_write, nullptr);
        qcv.notify_all();  // the handover is done
      }
      write_batch(*b, *wm);
      std::lock_guard g(qmu);
      to_seal.push_back(b);
      qcv.notify_all();
    }
    std::lock_guard g(qmu);
    writers_left--;
    qcv.notify_all();
  };
  std::thread writer(writer_loop, seal_mover_.get());
  std::thread writer2(writer_loop, seal_mover2_.get());
  std::thread sealer([&] {
    for (;;) {
      std::vector<Batch*> round;
      {
        std::unique_lock g(qmu);
        qcv.wait(g, [&] { return !to_seal.empty() || writers_left == 0; });
        if (to_seal.empty()) break;
        round.assign(to_seal.begin(), to_seal.end());
        to_seal.clear();
      }
      seal_batches(round);
    }
  });

  size_t per = std::clamp<uint64_t>(cfg_.batch_bytes / block_size(), 1, 4096);
  for (size_t i = 0; i < blocks.size(); i += per) {
    std::vector<uint64_t> ids(
        blocks.begin() + i, blocks.begin() + std::min(blocks.size(), i + per));
    all.push_back(std::make_unique<Batch>());
    Batch* next = all.back().get();
    prepare_batch(ids, *next, mover);
    bool stop_here;
    {
      std::lock_guard g(mu_);
      stop_here = stop_ || fatal_seen_ || agent_lost_;
    }
    if (stop_here) {
      abandon_batch(*next);
      break;
    }
    // A full disk stays full for the rest of this request.  (Read before
    // the handover: the writer may record errors in the batch.)
    bool disk_full = next->first_error.code == "disk-full";
    uint64_t h0 = mono_us();
    {
      std::unique_lock g(qmu);
      to_write = next;
      qcv.notify_all();
      qcv.wait(g, [&] { return to_write == nullptr; });
    }
    {
      std::lock_guard g(mu_);
      stats_.purge_phase_us[6] += mono_us() - h0;
    }
    if (disk_full) break;
  }
  {
    std::lock_guard g(qmu);
    no_more = true;
    qcv.notify_all();
  }
  writer.join();
  writer2.join();
  sealer.join();
  for (auto& b : all) {
    const MoveResult& r = b->res;
    total.blocks += r.blocks;
    total.zero += r.zero;
    total.skipped += r.skipped;
    total.failed += r.failed;
    total.bytes += r.bytes;
    if (!r.error.empty() && total.error.empty()) {
      total.error = r.error;  // the first
      total.error_code = r.error_code;
    }
  }
  total.seconds = (mono_us() - t0) / 1e6;
  {
    std::lock_guard g(mu_);
    stats_.purge_seconds += total.seconds;
  }
  if (!total.error.empty())
    log::warn("purge: some blocks stayed resident",
              {{"nvdimm", cfg_.name}, {"failed", total.failed},
               {"error", total.error}});
  if (total.blocks == 0 && !total.error.empty())
    return make_error("purge-failed", total.error);
  return total;
}

void Engine::back_to_resident(Batch& batch, size_t i, bool map_back) {
  BatchItem& it = batch.items[i];
  if (map_back)
    (void)agent_->request(AgentClient::kMapBack, off(it.b), len(it.b));
  if (it.slot != kNoSlot) table_->release_slot(it.slot);
  it.slot = kNoSlot;
  it.ok = false;
  batch.res.failed++;
  std::lock_guard g(mu_);
  st_[it.b] = St::kResident;
  cv_.notify_all();
}

void Engine::batch_error(Batch& batch, Error e, uint64_t Stats::*counter) {
  std::lock_guard g(mu_);
  if (counter) stats_.*counter += 1;
  if (batch.first_error.code.empty()) batch.first_error = std::move(e);
}

// Swap out, take a slot, read the block from the backend (nothing can
// change it now), checksum it.  Until the commit a fault cancels the block:
// its data is still in the backend.
void Engine::prepare_batch(const std::vector<uint64_t>& blocks, Batch& batch,
                           Mover& mover) {
  uint64_t t0 = mono_us();
  last_busy_ms_ = mono_ms();
  {
    std::lock_guard g(mu_);
    for (uint64_t b : blocks) {
      if (b >= nblocks_ || st_[b] != St::kResident || pending_[b]) {
        batch.res.skipped++;
        continue;
      }
      st_[b] = St::kMoving;
      cancelled_[b] = 0;
      batch.items.emplace_back();
      batch.items.back().b = b;
    }
  }
  for (size_t i = 0; i < batch.items.size(); i++) {
    BatchItem& it = batch.items[i];
    it.old = table_->entry(it.b);
    it.buf = pool_->get();
    if (!it.buf) {
      batch_error(batch, make_error("no-memory", "no memory for a block"),
                  nullptr);
      back_to_resident(batch, i, false);
      continue;
    }
    auto s = table_->alloc_slot();
    if (!s) {
      batch_error(batch, s.error(), &Stats::disk_full);
      back_to_resident(batch, i, false);
      continue;
    }
    it.slot = *s;
  }
  // Out of QEMU's reach, one request per run of consecutive blocks.
  auto block = [&](size_t k) { return batch.items[k].b; };
  auto ok = [&](size_t k) { return batch.items[k].ok; };
  for_each_run(batch.items.size(), block, ok, [&](size_t i, size_t j) {
    uint64_t first = batch.items[i].b, last = batch.items[j - 1].b;
    if (auto r = agent_->request(AgentClient::kSwapOut, off(first),
                                 off(last) + len(last) - off(first));
        !r) {
      batch_error(batch, r.error(), &Stats::agent_errors);
      for (size_t k = i; k < j; k++) back_to_resident(batch, k, false);
    }
  });
  uint64_t t1 = mono_us();
  std::vector<IoReq> reads;
  std::vector<size_t> idx;
  for (size_t i = 0; i < batch.items.size(); i++) {
    BatchItem& it = batch.items[i];
    if (!it.ok) continue;
    reads.push_back(IoReq{hello_.backend_fd.get(),
                          hello_.fd_offset + off(it.b), it.buf.data(),
                          static_cast<uint32_t>(len(it.b)), false});
    idx.push_back(i);
  }
  if (!reads.empty()) {
    auto r = mover.run(reads);
    for (size_t k = 0; k < reads.size(); k++) {
      BatchItem& it = batch.items[idx[k]];
      if (r && reads[k].result == static_cast<int64_t>(len(it.b))) {
        uint64_t n = len(it.b);
        if (n < block_size())
          std::memset(it.buf.bytes() + n, 0, block_size() - n);
        it.zero = all_zero(it.buf.bytes(), block_size());
        it.crc = table_->data_crc(it.b, it.old.generation + 1,
                                  it.buf.data(), n);
        continue;
      }
      batch_error(batch, make_error("backend-read", "cannot read the backend"),
                  &Stats::io_errors);
      back_to_resident(batch, idx[k], true);
    }
  }
  uint64_t t2 = mono_us();
  std::lock_guard g(mu_);
  stats_.purge_phase_us[0] += t1 - t0;
  stats_.purge_phase_us[1] += t2 - t1;
}

// The request stops: every block of a prepared batch goes back.
void Engine::abandon_batch(Batch& batch) {
  for (size_t i = 0; i < batch.items.size(); i++)
    if (batch.items[i].ok) back_to_resident(batch, i, true);
  for (auto& it : batch.items) pool_->put(std::move(it.buf));
  batch.res.error = batch.first_error.message;
  batch.res.error_code = batch.first_error.code;
}

// Stage 2: the disk copies, O_DIRECT through io_uring.  A block whose write
// fails goes back to resident now; the buffers go back to the pool.
void Engine::write_batch(Batch& batch, Mover& mover) {
  uint64_t t0 = mono_us();
  std::vector<IoReq> writes;
  std::vector<size_t> idx;
  for (size_t i = 0; i < batch.items.size(); i++) {
    BatchItem& it = batch.items[i];
    if (!it.ok || it.zero) continue;
    writes.push_back(IoReq{vbd_fd_.get(), table_->slot_offset(it.slot),
                           it.buf.data(), static_cast<uint32_t>(block_size()),
                           true});
    idx.push_back(i);
  }
  if (!writes.empty()) {
    auto r = mover.run(writes);
    for (size_t k = 0; k < writes.size(); k++) {
      if (r && writes[k].result == static_cast<int64_t>(block_size())) continue;
      int err = writes[k].result < 0 ? static_cast<int>(-writes[k].result)
                                     : EIO;
      batch_error(batch,
                  make_error("disk-write",
                             std::string("cannot write the disk copy: ") +
                                 std::strerror(err)),
                  &Stats::io_errors);
      back_to_resident(batch, idx[k], true);
    }
  }
  for (auto& it : batch.items) pool_->put(std::move(it.buf));
  std::lock_guard g(mu_);
  stats_.purge_phase_us[2] += mono_us() - t0;
}

// Stage 3, for every batch written since the last round: one fdatasync of
// the disk file, one journal commit (in slices) of the blocks no fault
// cancelled, then punch them, and only then let faults in (kSealing until
// then).  Disk copy durable, then entry durable, then NVM freed.
void Engine::seal_batches(const std::vector<Batch*>& batches) {
  uint64_t t0 = mono_us();
  bool copies = false;
  for (Batch* b : batches)
    for (auto& it : b->items) copies |= it.ok && !it.zero;
  if (copies && fdatasync(vbd_fd_.get()) != 0) {
    int err = errno;
    for (Batch* b : batches)
      for (size_t i = 0; i < b->items.size(); i++) {
        if (!b->items[i].ok || b->items[i].zero) continue;
        batch_error(*b,
                    make_error("disk-write",
                               std::string("cannot sync the disk copies: ") +
                                   std::strerror(err)),
                    &Stats::io_errors);
        back_to_resident(*b, i, true);
      }
  }
  uint64_t t1 = mono_us();
  struct Ref {
    Batch* batch;
    size_t i;
  };
  std::vector<Ref> refs;
  std::vector<Op> ops;
  std::vector<Ref> cancelled;
  {
    std::lock_guard g(mu_);
    for (Batch* b : batches)
      for (size_t i = 0; i < b->items.size(); i++) {
        BatchItem& it = b->items[i];
        if (!it.ok) continue;
        if (cancelled_[it.b]) {
          cancelled.push_back({b, i});
          continue;
        }
        st_[it.b] = St::kSealing;
        refs.push_back({b, i});
        ops.push_back(
            {it.b, Entry{BlockState::Purged, static_cast<uint8_t>(it.zero),
                         it.crc, it.old.generation + 1,
                         it.zero ? kNoSlot : it.slot, 0}});
      }
  }
  // The fault already mapped these back.
  for (auto& c : cancelled) back_to_resident(*c.batch, c.i, false);
  // In slices of at most 64 table pages: the table refuses a transaction
  // that touches more than its journal can checkpoint (scattered blocks
  // of a large NVDIMM each sit on a page of their own).
  std::vector<uint8_t> committed(ops.size(), 0);
  for (size_t i = 0; i < ops.size();) {
    Tx part{TxType::PurgeDone, {}};
    std::set<uint64_t> pages;
    size_t first = i;
    while (i < ops.size() &&
           (pages.size() < 64 || pages.count(ops[i].block / 64))) {
      pages.insert(ops[i].block / 64);
      part.ops.push_back(ops[i++]);
    }
    if (auto c = table_->commit(std::move(part)); !c) {
      for (Batch* b : batches) batch_error(*b, c.error(), nullptr);
      std::lock_guard g(mu_);
      stats_.commit_errors++;
      break;
    }
    std::fill(committed.begin() + first, committed.begin() + i, 1);
  }
  for (size_t k = 0; k < refs.size(); k++)
    if (!committed[k]) back_to_resident(*refs[k].batch, refs[k].i, true);
  uint64_t t2 = mono_us();
  // Free the NVM space.  Not once QEMU is gone: a new QEMU may already map
  // the file, where only a hole hidden at its start is safe to punch; the
  // range stays allocated and the next attach takes it as resident.
  bool qemu_there = agent_->connected();
  for (Batch* bp : batches) {
    Batch& batch = *bp;
    MoveResult& res = batch.res;
    auto block = [&](size_t k) { return batch.items[k].b; };
    auto ok = [&](size_t k) { return batch.items[k].ok; };
    for_each_run(batch.items.size(), block, ok, [&](size_t i, size_t j) {
      uint64_t first = batch.items[i].b, last = batch.items[j - 1].b;
      if (qemu_there &&
          fallocate(hello_.backend_fd.get(),
                    FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                    static_cast<off_t>(hello_.fd_offset + off(first)),
                    static_cast<off_t>(off(last) + len(last) - off(first))))
        log::warn("purge: punch failed; the space stays allocated",
                  {{"nvdimm", cfg_.name}, {"block", first},
                   {"blocks", j - i}, {"error", std::strerror(errno)}});
      for (size_t k = i; k < j; k++) {
        BatchItem& x = batch.items[k];
        if (x.zero && x.slot != kNoSlot) table_->release_slot(x.slot);
        res.blocks++;
        res.bytes += len(x.b);
        if (x.zero) res.zero++;
      }
    });
    std::lock_guard g(mu_);
    for (auto& it : batch.items) {
      if (!it.ok) continue;
      st_[it.b] = St::kPurged;
      stats_.purged_blocks++;
      stats_.purged_bytes += len(it.b);
      if (it.zero) stats_.zero_blocks++;
    }
    cv_.notify_all();
    res.error = batch.first_error.message;
    res.error_code = batch.first_error.code;
  }
  uint64_t t3 = mono_us();
  std::lock_guard g(mu_);
  stats_.purge_phase_us[5] += t1 - t0;
  stats_.purge_phase_us[3] += t2 - t1;
  stats_.purge_phase_us[4] += t3 - t2;
}

void Engine::probe_round() {
  if (!tracker_ || !pagemap_) return;
  std::vector<uint64_t> tracked;
  {
    std::lock_guard g(mu_);
    for (uint64_t b = 0; b < nblocks_; b++)
      if (st_[b] == St::kResident) tracked.push_back(b);
  }
  auto z = tracker_->probe(now_ms(), *pagemap_, tracked);
  std::lock_guard g(mu_);
  stats_.probe_rounds++;
  if (!z) {
    stats_.probe_errors++;
    return;
  }
  std::vector<uint64_t> zap = std::move(*z);
  mu_.unlock();
  // Zap runs of blocks; a block swapped out meanwhile refuses (EBUSY) and
  // is looked at again next round.
  uint64_t zapped = 0;
  for_each_run(
      zap.size(), [&](size_t k) { return zap[k]; }, [](size_t) { return true; },
      [&](size_t i, size_t j) {
        uint64_t first = zap[i], last = zap[j - 1];
        auto r = agent_->request(AgentClient::kZap, off(first),
                                 off(last) + len(last) - off(first));
        if (r) {
          zapped += j - i;
        } else {
          for (size_t k = i; k < j; k++) tracker_->reset(zap[k], now_ms());
        }
      });
  mu_.lock();
  stats_.zapped_blocks += zapped;
}

void Engine::control_loop() {
  auto m = Mover::create(16);
  if (!m) {
    fatal(0, "no mover: " + m.error().message);
    return;
  }
  Mover& mover = **m;
  auto sm = Mover::create(16);
  if (!sm) {
    fatal(0, "no mover: " + sm.error().message);
    return;
  }
  seal_mover_ = std::move(*sm);
  auto sm2 = Mover::create(16);
  if (!sm2) {
    fatal(0, "no mover: " + sm2.error().message);
    return;
  }
  seal_mover2_ = std::move(*sm2);
  uint64_t next_probe = now_ms();
  uint64_t next_flush = now_ms() + 2000;
  for (;;) {
    Command* cmd = nullptr;
    // Batched: one backend sync per round, and not so often that it competes
    // with a stream of fault-backs for the disk.
    {
      size_t pending;
      {
        std::lock_guard g(mu_);
        pending = pending_residents_.size();
      }
      if (pending >= 256 || (pending && now_ms() >= next_flush)) {
        flush_residents();
        next_flush = now_ms() + 2000;
      } else if (!pending) {
        next_flush = now_ms() + 2000;
      }
    }
    {
      std::unique_lock g(mu_);
      cv_.wait_for(g, std::chrono::milliseconds(100), [&] {
        return stop_ || !commands_.empty();
      });
      if (stop_) {
        g.unlock();
        flush_residents();
        g.lock();
        for (Command* c : commands_) {
          *c->result = make_error("shutting-down", "purging stopped");
          c->done = true;
        }
        commands_.clear();
        cv_.notify_all();
        return;
      }
      if (!commands_.empty()) {
        cmd = commands_.front();
        commands_.pop_front();
      }
    }
    if (cmd) {
      Result<MoveResult> r = MoveResult{};
      uint64_t end = std::min(nblocks_, cmd->first + (cmd->count ? cmd->count
                                                                 : nblocks_));
      std::vector<uint64_t> sel;
      uint64_t skipped = 0;
      {
        std::lock_guard g(mu_);
        uint64_t now = now_ms();
        for (uint64_t b = cmd->first; b < end; b++) {
          St want = cmd->purge ? St::kResident : St::kPurged;
          if (st_[b] != want) continue;
          if (cmd->purge && !has_data(b)) continue;  // a hole: nothing to free
          if (cmd->purge && !cmd->ignore_idle && tracker_) {
            uint64_t last = tracker_->last_access_ms(b);
            if (last == Tracker::kNeverSeen ||
                now - std::min(now, last) < policy_->config().min_idle_ms) {
              skipped++;
              continue;
            }
          }
          sel.push_back(b);
        }
      }
      if (cmd->purge) {
        r = purge_blocks(sel, mover);
      } else {
        r = unpurge_blocks(sel, mover);
      }
      if (r) r->skipped += skipped;
      std::lock_guard g(mu_);
      *cmd->result = std::move(r);
      cmd->done = true;
      cv_.notify_all();
      continue;
    }
    if (uint64_t now = now_ms(), last = last_busy_ms_;
        pool_->kept_bytes() && now > last + 30000)
      pool_->trim();  // idle: the memory goes back
    if (now_ms() < next_probe) continue;
    next_probe = now_ms() + cfg_.probe_interval_ms;
    probe_round();
    // The policy's own purges.
    std::vector<uint64_t> chosen;
    {
      std::unique_lock g(mu_);
      if (fatal_seen_ || agent_lost_ || !policy_->config().enabled) continue;
      // A block that holds no data in the backend (a hole: never written,
      // or punched) uses no NVM: the policy neither counts nor picks it.
      // (Looked up without the lock: the fault path takes it.)
      g.unlock();
      std::vector<uint8_t> data = data_map();
      g.lock();
      std::vector<BlockView> views(nblocks_);
      for (uint64_t b = 0; b < nblocks_; b++) {
        uint8_t s = st_[b] == St::kResident
                        ? (data[b] ? kBlockResident : kBlockPurged)
                    : st_[b] == St::kMoving || st_[b] == St::kSealing
                        ? kBlockMoving
                        : kBlockPurged;
        views[b] = BlockView{s, tracker_ ? tracker_->last_access_ms(b)
                                         : Tracker::kNeverSeen,
                             false};
      }
      chosen = policy_->choose(now_ms(), views);
    }
    if (!chosen.empty()) {
      auto r = purge_blocks(chosen, mover);
      std::lock_guard g(mu_);
      if (r) stats_.policy_purges += r->blocks;
    }
  }
}

// Hands a purge-now or unpurge to the control thread and waits for it.
// Unpurge is allowed on a failed NVDIMM: it brings back what it can.
Result<MoveResult> Engine::run_command(bool purge, uint64_t first,
                                       uint64_t count, bool ignore_idle) {
  if (first >= nblocks_)
    return make_error("bad-range", "first block " + std::to_string(first) +
                                       " is past the last block " +
                                       std::to_string(nblocks_ - 1));
  Result<MoveResult> result = MoveResult{};
  Command c{purge, first, count, ignore_idle, &result};
  std::unique_lock g(mu_);
  if (purge && fatal_seen_) return make_error("purge-broken", fatal_what_);
  if (agent_lost_) return make_error("agent-closed", agent_lost_why_);
  if (commands_.size() >= 16)
    return make_error("busy", "too many purge requests queued");
  commands_.push_back(&c);
  cv_.notify_all();
  cv_.wait(g, [&] { return c.done; });
  return result;
}

Result<MoveResult> Engine::purge_now(uint64_t first, uint64_t count,
                                     bool ignore_idle) {
  return run_command(true, first, count, ignore_idle);
}

Result<MoveResult> Engine::unpurge(uint64_t first, uint64_t count) {
  return run_command(false, first, count, false);
}

Result<void> Engine::set_policy(const PolicyConfig& p) {
  std::lock_guard g(mu_);
  policy_->set_config(p);
  return {};
}

PolicyConfig Engine::policy() const {
  std::lock_guard g(mu_);
  return policy_->config();
}

bool Engine::alive() const {
  std::lock_guard g(mu_);
  return !agent_lost_ && !fatal_seen_;
}

json Engine::status() const {
  std::lock_guard g(mu_);
  uint64_t counts[6] = {};
  for (St s : st_) counts[static_cast<int>(s)]++;
  struct stat sb{};
  json allocated = nullptr;
  if (fstat(hello_.backend_fd.get(), &sb) == 0)
    allocated = static_cast<uint64_t>(sb.st_blocks) * 512;
  auto ts = table_->stats();
  return json{
      {"nvdimm", cfg_.name},
      {"state", fatal_seen_  ? "failed"
                : agent_lost_ ? "disconnected"
                              : "running"},
      {"error", fatal_seen_ ? json(fatal_what_)
                : agent_lost_ ? json(agent_lost_why_)
                              : json(nullptr)},
      {"block-size", block_size()},
      {"blocks", nblocks_},
      {"resident", counts[static_cast<int>(St::kResident)]},
      {"moving", counts[static_cast<int>(St::kMoving)] +
                     counts[static_cast<int>(St::kSealing)] +
                     counts[static_cast<int>(St::kRestoring)]},
      {"purged", counts[static_cast<int>(St::kPurged)]},
      {"lost", counts[static_cast<int>(St::kLost)]},
      {"bytes-saved", counts[static_cast<int>(St::kPurged)] * block_size()},
      {"backend-allocated", allocated},
      {"faults", stats_.faults},
      {"fault-backs", stats_.fault_backs},
      {"cancels", stats_.cancels},
      // Blocks brought back because the faults ran sequentially: in how
      // many windows, how many blocks, dropped (an error: still purged),
      // and faults that found their block on its way back.
      {"readahead", {{"windows", stats_.readahead_windows},
                     {"blocks", stats_.readahead_blocks},
                     {"dropped", stats_.readahead_dropped},
                     {"waits", stats_.readahead_waits}}},
      {"fault-latency-us", latency_.summary()},
      // What a faulting thread waited, by the agent's clock: from the
      // agent's read of the fault to its wake.  Faults the agent timed.
      {"fault-wait-us", wait_.summary()},
      // Where fault-backs spend their time, summed: from QEMU's notice to
      // the fault-back worker, reading the disk copy (with the pieces
      // written as they arrive), checking it, writing the rest into the
      // backend, mapping it back.
      {"fault-phases-us", {{"queue", stats_.phase_us[4]},
                           {"read", stats_.phase_us[0]},
                           {"check", stats_.phase_us[1]},
                           {"write", stats_.phase_us[2]},
                           {"map", stats_.phase_us[3]},
                           // of the timed faults only
                           {"timed", stats_.timed_faults},
                           {"handoff", stats_.handoff_us},
                           {"wake", stats_.wake_us}}},
      // And purges, by stage: preparing (swap-outs, reading the backend),
      // writing the disk copies, sealing (syncing them, the journal
      // commit, punching).  The stages overlap.
      {"purge-phases-us", {{"swap", stats_.purge_phase_us[0]},
                           {"read", stats_.purge_phase_us[1]},
                           {"write", stats_.purge_phase_us[2]},
                           {"sync", stats_.purge_phase_us[5]},
                           {"commit", stats_.purge_phase_us[3]},
                           {"punch", stats_.purge_phase_us[4]},
                           {"handover", stats_.purge_phase_us[6]}}},
      {"purged-total", stats_.purged_blocks},
      {"zero-blocks", stats_.zero_blocks},
      {"purged-bytes", stats_.purged_bytes},
      {"restored-bytes", stats_.restored_bytes},
      {"purge-seconds", stats_.purge_seconds},
      {"policy-purges", stats_.policy_purges},
      {"errors", {{"disk-full", stats_.disk_full},
                  {"io", stats_.io_errors},
                  {"checksum", stats_.checksum_errors},
                  {"commit", stats_.commit_errors},
                  {"agent", stats_.agent_errors},
                  {"probe", stats_.probe_errors}}},
      {"tracking", {{"enabled", tracker_ != nullptr},
                    {"rounds", stats_.probe_rounds},
                    {"zapped", stats_.zapped_blocks},
                    {"interval-ms", cfg_.probe_interval_ms}}},
      {"journal", {{"commits", ts.commits}, {"transactions", ts.txs},
                   {"syncs", ts.syncs}, {"checkpoints", ts.checkpoints}}},
      {"policy", to_json(policy_->config())},
      {"table", cfg_.vbt_path},
      {"disk", cfg_.vbd_path}};
}

}  // namespace kvmx::purge
