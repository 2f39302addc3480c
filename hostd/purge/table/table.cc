#include "table.h"

#include <fcntl.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <sys/xattr.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <new>
#include <unordered_map>
#include <unordered_set>

#include "common/log.h"
#include "crc32c.h"

namespace kvmx::purge {

using namespace format;

namespace {

constexpr char kVbtMagic[8] = {'K', 'V', 'M', 'X', 'V', 'B', 'T', '\0'};
constexpr char kVbdMagic[8] = {'K', 'V', 'M', 'X', 'V', 'B', 'D', '\0'};
constexpr char kRecMagic[4] = {'V', 'B', 'J', 'C'};
constexpr uint16_t kVersionMajor = 1;
constexpr uint16_t kVersionMinor = 0;
constexpr uint32_t kKnownIncompat = 0;
constexpr uint64_t kPagesPerImageRecord =
    (kMaxRecordBytes - kRecordHeaderBytes) / kPageImageBytes;  // 255
constexpr uint64_t kMaxId = uint64_t{1} << 62;
constexpr size_t kXattrBytes = 24;

void put16(unsigned char* p, uint16_t v) {
  p[0] = static_cast<unsigned char>(v);
  p[1] = static_cast<unsigned char>(v >> 8);
}
void put32(unsigned char* p, uint32_t v) {
  for (int i = 0; i < 4; i++) p[i] = static_cast<unsigned char>(v >> (8 * i));
}
void put64(unsigned char* p, uint64_t v) {
  for (int i = 0; i < 8; i++) p[i] = static_cast<unsigned char>(v >> (8 * i));
}
uint16_t get16(const unsigned char* p) {
  return static_cast<uint16_t>(p[0] | p[1] << 8);
}
uint32_t get32(const unsigned char* p) {
  uint32_t v = 0;
  for (int i = 3; i >= 0; i--) v = v << 8 | p[i];
  return v;
}
uint64_t get64(const unsigned char* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; i--) v = v << 8 | p[i];
  return v;
}

uint64_t round_up(uint64_t v, uint64_t a) { return (v + a - 1) / a * a; }

// CRC32C of `len` bytes with the 4-byte checksum field at `crc_off` taken
// as zero.
uint32_t crc_skipping(const unsigned char* p, size_t len, size_t crc_off,
                      uint32_t crc = 0) {
  static const unsigned char zero[4] = {};
  crc = crc32c(p, crc_off, crc);
  crc = crc32c(zero, 4, crc);
  return crc32c(p + crc_off + 4, len - crc_off - 4, crc);
}

std::string hex_uuid(const unsigned char* u) {
  static const char* d = "0123456789abcdef";
  std::string s;
  for (int i = 0; i < 16; i++) {
    if (i == 4 || i == 6 || i == 8 || i == 10) s += '-';
    s += d[u[i] >> 4];
    s += d[u[i] & 15];
  }
  return s;
}

Result<void> pread_all(int fd, void* buf, size_t len, uint64_t off,
                       const char* code, const std::string& path) {
  auto* p = static_cast<unsigned char*>(buf);
  while (len > 0) {
    ssize_t n = ::pread(fd, p, len, static_cast<off_t>(off));
    if (n < 0) {
      if (errno == EINTR) continue;
      return sys_error(code, "Failed to read '" + path + "'");
    }
    if (n == 0)
      return make_error("size-mismatch",
                        "'" + path + "' ends before offset " +
                            std::to_string(off + len));
    p += n;
    off += static_cast<uint64_t>(n);
    len -= static_cast<size_t>(n);
  }
  return {};
}

Result<void> pwrite_all(int fd, const void* buf, size_t len, uint64_t off,
                        const char* code, const std::string& path) {
  const auto* p = static_cast<const unsigned char*>(buf);
  while (len > 0) {
    ssize_t n = ::pwrite(fd, p, len, static_cast<off_t>(off));
    if (n < 0) {
      if (errno == EINTR) continue;
      return sys_error(code, "Failed to write '" + path + "'");
    }
    if (n == 0) return make_error(code, "Short write to '" + path + "'");
    p += n;
    off += static_cast<uint64_t>(n);
    len -= static_cast<size_t>(n);
  }
  return {};
}

Result<void> sync_parent_dir(const std::string& path) {
  auto slash = path.rfind('/');
  std::string dir = slash == std::string::npos ? "."
                    : slash == 0              ? "/"
                                              : path.substr(0, slash);
  UniqueFd fd(::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (!fd) return sys_error("vbt-io", "Failed to open '" + dir + "'");
  if (::fsync(fd.get()) < 0)
    return sys_error("vbt-io", "Failed to sync '" + dir + "'");
  return {};
}

// fallocate, or ftruncate where the file system cannot preallocate.
Result<void> preallocate(int fd, uint64_t size, const char* code,
                         const std::string& path) {
  if (::fallocate(fd, 0, 0, static_cast<off_t>(size)) == 0) return {};
  int e = errno;
  if (e == ENOSPC)
    return sys_error("no-space", "Failed to preallocate '" + path + "'", e);
  if (e != EOPNOTSUPP)
    return sys_error(code, "Failed to preallocate '" + path + "'", e);
  log::warn("virtblock: file system cannot preallocate, file is sparse",
            {{"path", path}});
  if (::ftruncate(fd, static_cast<off_t>(size)) < 0)
    return sys_error(code, "Failed to size '" + path + "'");
  return {};
}

// Why `e` is not a valid entry for a table with `slots` disk slots, or null.
const char* entry_problem(const Entry& e, uint64_t slots) {
  auto st = static_cast<uint8_t>(e.state);
  if (st < 1 || st > 3) return "state";
  if (e.flags & ~kFlagZero) return "flags";
  if (e.state == BlockState::Resident) {
    if (e.disk_slot != kNoSlot) return "disk_slot (a resident block has none)";
    return nullptr;
  }
  if (e.flags & kFlagZero) {
    if (e.disk_slot != kNoSlot) return "disk_slot (a zero block has none)";
  } else if (e.disk_slot >= slots) {
    return "disk_slot";
  }
  return nullptr;
}

uint64_t block_count_for(uint64_t backend_size, uint32_t shift) {
  return (backend_size >> shift) +
         ((backend_size & ((uint64_t{1} << shift) - 1)) != 0 ? 1 : 0);
}

uint64_t table_bytes_for(uint64_t blocks) {
  return round_up(blocks * kEntryBytes, kPage);
}

const std::vector<unsigned char>& zeros() {
  static const std::vector<unsigned char> z(kMaxRecordBytes, 0);
  return z;
}

}  // namespace

namespace format {

void encode_entry(const Entry& e, uint64_t block, unsigned char* out) {
  std::memset(out, 0, kEntryBytes);
  out[0] = static_cast<unsigned char>(e.state);
  out[1] = e.flags;
  put32(out + 4, e.data_crc);
  put64(out + 8, e.generation);
  put64(out + 16, e.disk_slot);
  put64(out + 24, e.commit_id);
  unsigned char idx[8];
  put64(idx, block);
  put32(out + 60, crc_skipping(out, kEntryBytes, 60, crc32c(idx, 8)));
}

bool decode_entry(const unsigned char* in, uint64_t block, Entry* e) {
  unsigned char idx[8];
  put64(idx, block);
  if (crc_skipping(in, kEntryBytes, 60, crc32c(idx, 8)) != get32(in + 60))
    return false;
  e->state = static_cast<BlockState>(in[0]);
  e->flags = in[1];
  e->data_crc = get32(in + 4);
  e->generation = get64(in + 8);
  e->disk_slot = get64(in + 16);
  e->commit_id = get64(in + 24);
  return true;
}

}  // namespace format

// ---------------------------------------------------------------------------
// Superblock and .vbd header

struct Table::Super {
  uint16_t version_major = kVersionMajor, version_minor = kVersionMinor;
  uint32_t incompat = 0, compat = 0, block_shift = 0;
  uint64_t block_count = 0;
  unsigned char uuid[16] = {};
  uint64_t backend_size = 0, epoch = 0, table_offset = kTableOffset;
  uint64_t journal_offset = 0, journal_bytes = 0, checkpoint_id = 0;
  uint64_t next_commit_id = 1, sequence = 0, disk_slots = 0;
  uint64_t repair_min_id = 0;

  void encode(unsigned char* b) const {
    std::memset(b, 0, kPage);
    std::memcpy(b, kVbtMagic, 8);
    put16(b + 8, version_major);
    put16(b + 10, version_minor);
    put32(b + 12, incompat);
    put32(b + 16, compat);
    put32(b + 20, block_shift);
    put64(b + 24, block_count);
    std::memcpy(b + 32, uuid, 16);
    put64(b + 48, backend_size);
    put64(b + 56, epoch);
    put64(b + 64, table_offset);
    put64(b + 72, journal_offset);
    put64(b + 80, journal_bytes);
    put64(b + 88, checkpoint_id);
    put64(b + 96, next_commit_id);
    put64(b + 104, sequence);
    put64(b + 112, disk_slots);
    put64(b + 120, repair_min_id);
    put32(b + 4092, crc_skipping(b, kPage, 4092));
  }
  // 0: valid; 1: no magic; 2: magic but bad crc.
  int decode(const unsigned char* b) {
    if (std::memcmp(b, kVbtMagic, 8) != 0) return 1;
    if (crc_skipping(b, kPage, 4092) != get32(b + 4092)) return 2;
    version_major = get16(b + 8);
    version_minor = get16(b + 10);
    incompat = get32(b + 12);
    compat = get32(b + 16);
    block_shift = get32(b + 20);
    block_count = get64(b + 24);
    std::memcpy(uuid, b + 32, 16);
    backend_size = get64(b + 48);
    epoch = get64(b + 56);
    table_offset = get64(b + 64);
    journal_offset = get64(b + 72);
    journal_bytes = get64(b + 80);
    checkpoint_id = get64(b + 88);
    next_commit_id = get64(b + 96);
    sequence = get64(b + 104);
    disk_slots = get64(b + 112);
    repair_min_id = get64(b + 120);
    return 0;
  }
};

namespace {

void encode_vbd_header(unsigned char* b, uint32_t shift,
                       const unsigned char* uuid, uint64_t slots) {
  std::memset(b, 0, kPage);
  std::memcpy(b, kVbdMagic, 8);
  put16(b + 8, kVersionMajor);
  put16(b + 10, kVersionMinor);
  put32(b + 12, shift);
  std::memcpy(b + 16, uuid, 16);
  put64(b + 32, slots);
  put32(b + 4092, crc_skipping(b, kPage, 4092));
}

void encode_xattr(unsigned char* b, const unsigned char* uuid,
                  uint64_t epoch) {
  std::memcpy(b, uuid, 16);
  put64(b + 16, epoch);
}

Result<void> set_backend_xattr(int fd, const unsigned char* uuid,
                               uint64_t epoch) {
  unsigned char x[kXattrBytes];
  encode_xattr(x, uuid, epoch);
  if (::fsetxattr(fd, kXattrName, x, sizeof(x), 0) < 0)
    return sys_error("xattr", std::string("Failed to set ") + kXattrName +
                                  " on the backend");
  if (::fsync(fd) < 0)
    return sys_error("xattr", "Failed to sync the backend's xattr");
  return {};
}

// Header fields of a commit record.
struct RecHeader {
  uint64_t id;
  uint32_t record_bytes, nr_tx, nr_ops, kind;
};

void encode_rec_header(unsigned char* b, const RecHeader& h,
                       const unsigned char* uuid) {
  std::memset(b, 0, kRecordHeaderBytes);
  std::memcpy(b, kRecMagic, 4);
  put16(b + 4, 1);
  put16(b + 6, kRecordHeaderBytes);
  put64(b + 8, h.id);
  std::memcpy(b + 16, uuid, 16);
  put32(b + 32, h.record_bytes);
  put32(b + 36, h.nr_tx);
  put32(b + 40, h.nr_ops);
  put32(b + 44, h.kind);
}

void seal_record(unsigned char* b, size_t len) {
  put32(b + 60, crc_skipping(b, len, 60));
}

uint64_t image_record_bytes(uint64_t pages) {
  return round_up(kRecordHeaderBytes + pages * kPageImageBytes, kPage);
}

uint64_t entries_record_content(uint64_t txs, uint64_t ops) {
  return kRecordHeaderBytes + txs * kTxHeaderBytes + ops * kOpBytes;
}

}  // namespace

// ---------------------------------------------------------------------------

struct Table::Pending {
  Tx* tx;
  std::vector<uint64_t> pages;  // distinct table pages its ops touch
  bool done = false;
  uint64_t id = 0;
  std::optional<Error> error;
};

Table::Table() = default;
Table::~Table() = default;

Result<void> Table::sync_vbt() {
  n_syncs_++;
  int err = 0;
  if (sync_hook_) {
    err = sync_hook_();
  } else if (::fdatasync(vbt_.get()) < 0) {
    err = errno;
  }
  if (err != 0)
    return sys_error("journal-sync", "Failed to sync '" + vbt_path_ + "'",
                     err);
  return {};
}

Result<void> Table::pwrite_vbt(const void* buf, size_t len, uint64_t off,
                               const char* code) {
  return pwrite_all(vbt_.get(), buf, len, off, code, vbt_path_);
}

void Table::encode_page(uint64_t page, unsigned char* out) const {
  std::memset(out, 0, kPage);
  uint64_t first = page * kEntriesPerPage;
  uint64_t end = std::min(block_count_, first + kEntriesPerPage);
  for (uint64_t b = first; b < end; b++)
    encode_entry(entries_[b], b, out + (b - first) * kEntryBytes);
}

uint64_t Table::checkpoint_cost(uint64_t pages) const {
  if (pages == 0) return 0;
  uint64_t full = pages / kPagesPerImageRecord;
  uint64_t rem = pages % kPagesPerImageRecord;
  uint64_t bytes = full * kMaxRecordBytes + (rem ? image_record_bytes(rem) : 0);
  uint64_t largest = full ? kMaxRecordBytes : image_record_bytes(rem);
  return bytes + largest - kPage;  // at most one wrap, its padding < largest
}

bool Table::fits(uint64_t rec_bytes, uint64_t dirty_pages) const {
  uint64_t gap = head_ + rec_bytes > journal_bytes_ ? journal_bytes_ - head_ : 0;
  return used_ + gap + rec_bytes + checkpoint_cost(dirty_pages) <=
         journal_bytes_ / 2;
}

Result<void> Table::write_superblock() {
  Super sb;
  sb.version_minor = std::max(version_minor_, kVersionMinor);
  sb.compat = compat_;
  sb.block_shift = block_shift_;
  sb.block_count = block_count_;
  std::memcpy(sb.uuid, uuid_, 16);
  sb.backend_size = backend_size_;
  sb.epoch = epoch_;
  sb.journal_offset = journal_offset_;
  sb.journal_bytes = journal_bytes_;
  sb.checkpoint_id = checkpoint_id_;
  sb.next_commit_id = next_id_;
  sb.sequence = sequence_ + 1;
  sb.disk_slots = disk_slots_;
  sb.repair_min_id = repair_min_id_;
  unsigned char b[kPage];
  sb.encode(b);
  auto w = pwrite_vbt(b, kPage, (sb.sequence % 2) * kPage, "vbt-io");
  if (!w) return w;
  auto s = sync_vbt();
  if (!s) return s;
  sequence_ = sb.sequence;
  return {};
}

// Checkpoint (spec "Checkpoint"): the dirty pages go to the journal as
// kind-2 records, are synced, written in place, synced; then the other
// superblock copy gets checkpoint_id.  When the free journal space cannot
// hold the images of every dirty page at once (only possible right after
// recovery), it goes in rounds, each reusing the space of the previous
// round, whose pages are durable in place by then; repair_min_id then
// tells recovery not to trust the older images that survive.
Result<void> Table::checkpoint_as_leader(std::unique_lock<std::mutex>& lk) {
  std::vector<uint64_t> pages;
  for (uint64_t p = 0; p < dirty_.size(); p++)
    if (dirty_[p]) pages.push_back(p);
  uint64_t start_head = head_, start_used = used_;
  uint64_t id = next_id_;
  lk.unlock();

  auto fail = [&](Error e) -> Result<void> {
    lk.lock();
    broken_ = true;
    next_id_ = std::max(next_id_, id);
    log::error("virtblock: checkpoint failed, table refuses commits",
               {{"path", vbt_path_}, {"error", e.message}});
    return e;
  };

  std::vector<unsigned char> rec;
  std::vector<unsigned char> pagebuf;
  uint64_t done = 0, head = start_head, min_id = repair_min_id_;
  uint64_t written = 0;
  bool multi = false;
  while (done < pages.size()) {
    head = start_head;
    uint64_t used = start_used;
    uint64_t round_first_id = id;
    uint64_t j = done;
    while (j < pages.size()) {
      uint64_t k = std::min<uint64_t>(kPagesPerImageRecord, pages.size() - j);
      uint64_t rb = 0, gap = 0;
      for (; k > 0; k--) {
        rb = image_record_bytes(k);
        gap = head + rb > journal_bytes_ ? journal_bytes_ - head : 0;
        if (used + gap + rb <= journal_bytes_) break;
      }
      if (k == 0) break;
      rec.assign(rb, 0);
      encode_rec_header(rec.data(),
                        RecHeader{id, static_cast<uint32_t>(rb), 0,
                                  static_cast<uint32_t>(k), kKindPages},
                        uuid_);
      for (uint64_t i = 0; i < k; i++) {
        unsigned char* q = rec.data() + kRecordHeaderBytes + i * kPageImageBytes;
        put64(q, pages[j + i]);
        encode_page(pages[j + i], q + 8);
      }
      seal_record(rec.data(), rb);
      if (gap) {
        auto w = pwrite_vbt(zeros().data(), gap, journal_offset_ + head,
                            "journal-write");
        if (!w) return fail(w.error());
        head = 0;
      }
      auto w = pwrite_vbt(rec.data(), rb, journal_offset_ + head,
                          "journal-write");
      if (!w) return fail(w.error());
      id++;
      head = (head + rb) % journal_bytes_;
      used += gap + rb;
      written += gap + rb;
      j += k;
    }
    if (j == done)
      return fail(make_error("journal-full",
                             "No room in the journal of '" + vbt_path_ +
                                 "' for a checkpoint"));
    if (auto s = sync_vbt(); !s) return fail(s.error());
    // In place, consecutive pages in one write.
    for (uint64_t i = done; i < j;) {
      uint64_t n = 1;
      while (i + n < j && pages[i + n] == pages[i] + n && n < 256) n++;
      pagebuf.assign(n * kPage, 0);
      for (uint64_t m = 0; m < n; m++)
        encode_page(pages[i + m], pagebuf.data() + m * kPage);
      auto w = pwrite_vbt(pagebuf.data(), pagebuf.size(),
                          kTableOffset + pages[i] * kPage, "vbt-io");
      if (!w) return fail(w.error());
      i += n;
    }
    if (auto s = sync_vbt(); !s) return fail(s.error());
    if (j < pages.size()) multi = true;
    if (multi) min_id = round_first_id;
    done = j;
  }

  lk.lock();
  uint64_t saved_cp = checkpoint_id_, saved_min = repair_min_id_;
  next_id_ = id;
  checkpoint_id_ = id - 1;
  repair_min_id_ = min_id;
  lk.unlock();
  auto s = write_superblock();
  lk.lock();
  if (!s) {
    checkpoint_id_ = saved_cp;
    repair_min_id_ = saved_min;
    broken_ = true;
    log::error("virtblock: checkpoint failed, table refuses commits",
               {{"path", vbt_path_}, {"error", s.error().message}});
    return s;
  }
  head_ = head;
  used_ = 0;
  std::fill(dirty_.begin(), dirty_.end(), 0);
  dirty_count_ = 0;
  n_checkpoints_++;
  n_journal_bytes_ += written;
  return {};
}

Result<void> Table::checkpoint() {
  std::unique_lock lk(mu_);
  cv_.wait(lk, [&] { return !lead_; });
  if (broken_)
    return make_error("table-broken",
                      "'" + vbt_path_ + "' refuses writes after a failed write");
  lead_ = true;
  auto r = checkpoint_as_leader(lk);
  lead_ = false;
  cv_.notify_all();
  return r;
}

// ---------------------------------------------------------------------------
// Group commit

Result<uint64_t> Table::commit(Tx tx) {
  auto bad = [&](const std::string& why) {
    return make_error("bad-tx", "Transaction refused: " + why);
  };
  auto type = static_cast<uint16_t>(tx.type);
  if (type < 1 || type > 5) return bad("type " + std::to_string(type));
  if (tx.ops.empty()) return bad("no operations");
  if (entries_record_content(1, tx.ops.size()) > kMaxRecordBytes)
    return make_error("tx-too-large",
                      "Transaction of " + std::to_string(tx.ops.size()) +
                          " operations exceeds a commit record");
  Pending p;
  p.tx = &tx;
  {
    std::vector<uint64_t> blocks;
    blocks.reserve(tx.ops.size());
    for (const Op& op : tx.ops) {
      if (op.block >= block_count_)
        return bad("block " + std::to_string(op.block) + " out of range");
      if (const char* why = entry_problem(op.entry, disk_slots_))
        return bad("block " + std::to_string(op.block) + ": invalid " + why);
      blocks.push_back(op.block);
      p.pages.push_back(op.block / kEntriesPerPage);
    }
    std::sort(blocks.begin(), blocks.end());
    if (std::adjacent_find(blocks.begin(), blocks.end()) != blocks.end())
      return bad("a block appears twice");
    std::sort(p.pages.begin(), p.pages.end());
    p.pages.erase(std::unique(p.pages.begin(), p.pages.end()), p.pages.end());
  }
  // It must fit alone in a journal just checkpointed (worst-case padding).
  uint64_t alone = round_up(entries_record_content(1, tx.ops.size()), kPage);
  if (2 * alone - kPage + checkpoint_cost(p.pages.size()) > journal_bytes_ / 2)
    return make_error("tx-too-large",
                      "Transaction touches " + std::to_string(p.pages.size()) +
                          " table pages, more than the journal of '" +
                          vbt_path_ + "' can checkpoint");

  std::unique_lock lk(mu_);
  if (broken_)
    return make_error("table-broken",
                      "'" + vbt_path_ + "' refuses writes after a failed write");
  queue_.push_back(&p);
  while (!p.done) {
    if (lead_) {
      cv_.wait(lk);
      continue;
    }
    lead_ = true;
    lead_one(lk);
    lead_ = false;
    cv_.notify_all();
  }
  if (p.error) return *p.error;
  return p.id;
}

// One round of the leader: a checkpoint, or one commit of the transactions
// at the front of the queue.  Called and returns with `lk` held.
void Table::lead_one(std::unique_lock<std::mutex>& lk) {
  auto fail_all = [&](const Error& e) {
    for (Pending* q : queue_) {
      q->error = e;
      q->done = true;
    }
    queue_.clear();
  };
  if (broken_) {
    fail_all(make_error("table-broken", "'" + vbt_path_ +
                                            "' refuses writes after a failed write"));
    return;
  }
  // Take the longest prefix of the queue that fits in one record and in
  // the journal's budget; transactions in one commit touch distinct blocks.
  std::unordered_set<uint64_t> blocks, new_pages;
  uint64_t txs = 0, ops = 0, rb = 0;
  size_t take = 0;
  for (Pending* q : queue_) {
    uint64_t content = entries_record_content(txs + 1, ops + q->tx->ops.size());
    if (content > kMaxRecordBytes) break;
    bool conflict = false;
    for (const Op& op : q->tx->ops)
      if (blocks.count(op.block)) conflict = true;
    if (conflict) break;
    uint64_t extra = 0;
    for (uint64_t pg : q->pages)
      if (!dirty_[pg] && !new_pages.count(pg)) extra++;
    uint64_t r = round_up(content, kPage);
    if (!fits(r, dirty_count_ + new_pages.size() + extra)) break;
    for (const Op& op : q->tx->ops) blocks.insert(op.block);
    for (uint64_t pg : q->pages)
      if (!dirty_[pg]) new_pages.insert(pg);
    txs++;
    ops += q->tx->ops.size();
    rb = r;
    take++;
  }
  if (take == 0) {
    if (used_ > 0 || dirty_count_ > 0) {
      auto c = checkpoint_as_leader(lk);
      if (!c) fail_all(c.error());
      return;
    }
    Pending* q = queue_.front();
    queue_.pop_front();
    q->error = make_error("tx-too-large", "Transaction does not fit in the journal of '" +
                                              vbt_path_ + "'");
    q->done = true;
    return;
  }
  std::vector<Pending*> batch(queue_.begin(), queue_.begin() + static_cast<long>(take));
  queue_.erase(queue_.begin(), queue_.begin() + static_cast<long>(take));
  uint64_t id = next_id_++;
  uint64_t gap = head_ + rb > journal_bytes_ ? journal_bytes_ - head_ : 0;
  uint64_t pos = gap ? 0 : head_;
  uint64_t gap_pos = head_;
  lk.unlock();

  std::vector<unsigned char> rec(rb, 0);
  encode_rec_header(rec.data(),
                    RecHeader{id, static_cast<uint32_t>(rb),
                              static_cast<uint32_t>(txs),
                              static_cast<uint32_t>(ops), kKindEntries},
                    uuid_);
  size_t off = kRecordHeaderBytes;
  for (Pending* q : batch) {
    unsigned char* t = rec.data() + off;
    put64(t, next_tx_id_++);
    put32(t + 8, static_cast<uint32_t>(q->tx->ops.size()));
    put16(t + 12, static_cast<uint16_t>(q->tx->type));
    off += kTxHeaderBytes;
    for (Op& op : q->tx->ops) {
      op.entry.commit_id = id;
      put64(rec.data() + off, op.block);
      encode_entry(op.entry, op.block, rec.data() + off + 8);
      off += kOpBytes;
    }
  }
  seal_record(rec.data(), rb);
  Result<void> r;
  if (gap)
    r = pwrite_vbt(zeros().data(), gap, journal_offset_ + gap_pos,
                   "journal-write");
  if (r) r = pwrite_vbt(rec.data(), rb, journal_offset_ + pos, "journal-write");
  if (r) r = sync_vbt();

  lk.lock();
  if (!r) {
    broken_ = true;
    log::error("virtblock: commit failed, table refuses commits",
               {{"path", vbt_path_}, {"commit", id}, {"error", r.error().message}});
    for (Pending* q : batch) {
      q->error = r.error();
      q->done = true;
    }
    return;
  }
  for (Pending* q : batch) {
    for (const Op& op : q->tx->ops) {
      entries_[op.block] = op.entry;
      uint64_t pg = op.block / kEntriesPerPage;
      if (!dirty_[pg]) {
        dirty_[pg] = 1;
        dirty_count_++;
      }
      uint64_t s = op.entry.disk_slot;
      if (s < disk_slots_ && !(slot_bits_[s / 64] >> (s % 64) & 1)) {
        slot_bits_[s / 64] |= uint64_t{1} << (s % 64);
        slots_used_++;
      }
    }
    q->id = id;
    q->done = true;
  }
  head_ = (pos + rb) % journal_bytes_;
  used_ += gap + rb;
  n_commits_++;
  n_txs_ += txs;
  n_journal_bytes_ += gap + rb;
}

// ---------------------------------------------------------------------------

Entry Table::entry(uint64_t block) const {
  std::lock_guard lk(mu_);
  if (block >= entries_.size()) return Entry{};
  return entries_[block];
}

uint32_t Table::data_crc_seed(uint64_t block, uint64_t generation) const {
  unsigned char seed[32];
  std::memcpy(seed, uuid_, 16);
  put64(seed + 16, block);
  put64(seed + 24, generation);
  return crc32c(seed, sizeof(seed));
}

uint32_t Table::data_crc(uint64_t block, uint64_t generation, const void* data,
                         size_t len) const {
  return crc32c(data, len, data_crc_seed(block, generation));
}

Result<uint64_t> Table::alloc_slot() {
  std::lock_guard lk(mu_);
  if (slots_used_ >= disk_slots_)
    return make_error("disk-full", "All " + std::to_string(disk_slots_) +
                                       " slots of '" + vbd_path_ + "' are in use");
  uint64_t words = slot_bits_.size();
  for (uint64_t n = 0; n < words; n++) {
    uint64_t w = (slot_hint_ + n) % words;
    uint64_t bits = slot_bits_[w];
    if (w == words - 1 && disk_slots_ % 64)
      bits |= ~uint64_t{0} << (disk_slots_ % 64);  // past the last slot
    if (bits == ~uint64_t{0}) continue;
    uint64_t bit = static_cast<uint64_t>(__builtin_ctzll(~bits));
    slot_bits_[w] |= uint64_t{1} << bit;
    slots_used_++;
    slot_hint_ = w;
    return w * 64 + bit;
  }
  return make_error("disk-full", "No free slot in '" + vbd_path_ + "'");
}

void Table::release_slot(uint64_t slot) {
  std::lock_guard lk(mu_);
  if (slot >= disk_slots_) return;
  uint64_t m = uint64_t{1} << (slot % 64);
  if (slot_bits_[slot / 64] & m) {
    slot_bits_[slot / 64] &= ~m;
    slots_used_--;
  }
}

uint64_t Table::free_slots() const {
  std::lock_guard lk(mu_);
  return disk_slots_ - slots_used_;
}

Table::Stats Table::stats() const {
  return Stats{n_commits_.load(), n_txs_.load(), n_syncs_.load(),
               n_checkpoints_.load(), n_journal_bytes_.load()};
}

// ---------------------------------------------------------------------------
// Create

Result<std::unique_ptr<Table>> Table::create(const TableParams& p,
                                             int backend_fd) {
  auto bad = [](const std::string& m) { return make_error("bad-params", m); };
  if (p.block_shift < 12 || p.block_shift > 30)
    return bad("block_shift " + std::to_string(p.block_shift) +
               " is outside 12..30");
  if (p.backend_size == 0) return bad("backend_size is 0");
  uint64_t blocks = block_count_for(p.backend_size, p.block_shift);
  if (blocks > kMaxBlocks)
    return bad("backend of " + std::to_string(blocks) +
               " blocks exceeds the 2^40 limit");
  if (p.disk_slots == 0 || p.disk_slots > kMaxSlots ||
      p.disk_slots + 1 > (uint64_t{1} << 62) >> p.block_shift)
    return bad("disk_slots " + std::to_string(p.disk_slots) +
               " is outside 1..2^40 or the .vbd would be too large");
  if (p.journal_bytes % kPage || p.journal_bytes < kMinJournalBytes ||
      p.journal_bytes > kMaxJournalBytes)
    return bad("journal_bytes " + std::to_string(p.journal_bytes) +
               " is not a multiple of 4096 between 1 MiB and 1 GiB");
  if (p.vbt_path.empty() || p.vbd_path.empty() || p.vbt_path == p.vbd_path)
    return bad("the .vbt and .vbd paths must be given and differ");

  std::unique_ptr<Table> t(new (std::nothrow) Table());
  if (!t) return make_error("no-memory", "Out of memory");
  t->vbt_path_ = p.vbt_path;
  t->vbd_path_ = p.vbd_path;
  t->block_shift_ = p.block_shift;
  t->block_count_ = blocks;
  t->disk_slots_ = p.disk_slots;
  t->journal_bytes_ = p.journal_bytes;
  t->journal_offset_ = kTableOffset + table_bytes_for(blocks);
  t->backend_size_ = p.backend_size;
  t->epoch_ = 1;
  t->sequence_ = 1;
  try {
    t->entries_.assign(blocks, Entry{});
    t->dirty_.assign(table_bytes_for(blocks) / kPage, 0);
    t->slot_bits_.assign((p.disk_slots + 63) / 64, 0);
  } catch (const std::bad_alloc&) {
    return make_error("no-memory", "Out of memory for a table of " +
                                       std::to_string(blocks) + " blocks");
  }

  t->vbt_.reset(::open(p.vbt_path.c_str(),
                       O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600));
  if (!t->vbt_) {
    if (errno == EEXIST)
      return make_error("exists", "'" + p.vbt_path + "' exists, not overwriting it");
    return sys_error("vbt-io", "Failed to create '" + p.vbt_path + "'");
  }
  bool keep = false;
  struct Cleanup {
    const TableParams& p;
    bool& keep;
    bool vbd_created = false;
    ~Cleanup() {
      if (keep) return;
      ::unlink(p.vbt_path.c_str());
      if (vbd_created) ::unlink(p.vbd_path.c_str());
    }
  } cleanup{p, keep};
  t->vbd_.reset(::open(p.vbd_path.c_str(),
                       O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600));
  if (!t->vbd_) {
    if (errno == EEXIST)
      return make_error("exists", "'" + p.vbd_path + "' exists, not overwriting it");
    return sys_error("vbd-io", "Failed to create '" + p.vbd_path + "'");
  }
  cleanup.vbd_created = true;

  for (size_t got = 0; got < 16;) {
    ssize_t n = ::getrandom(t->uuid_ + got, 16 - got, 0);
    if (n < 0) {
      if (errno == EINTR) continue;
      return sys_error("vbt-io", "getrandom failed");
    }
    got += static_cast<size_t>(n);
  }
  t->uuid_[6] = static_cast<unsigned char>((t->uuid_[6] & 0x0f) | 0x40);
  t->uuid_[8] = static_cast<unsigned char>((t->uuid_[8] & 0x3f) | 0x80);

  uint64_t vbt_size = t->journal_offset_ + p.journal_bytes;
  uint64_t vbd_size = (p.disk_slots + 1) << p.block_shift;
  if (auto r = preallocate(t->vbt_.get(), vbt_size, "vbt-io", p.vbt_path); !r)
    return r.error();
  if (auto r = preallocate(t->vbd_.get(), vbd_size, "vbd-io", p.vbd_path); !r)
    return r.error();

  // The table: every block resident, never purged, commit 0.
  {
    std::vector<unsigned char> buf;
    uint64_t pages = table_bytes_for(blocks) / kPage;
    for (uint64_t pg = 0; pg < pages;) {
      uint64_t n = std::min<uint64_t>(256, pages - pg);
      buf.assign(n * kPage, 0);
      for (uint64_t m = 0; m < n; m++) t->encode_page(pg + m, buf.data() + m * kPage);
      if (auto r = t->pwrite_vbt(buf.data(), buf.size(), kTableOffset + pg * kPage,
                                 "vbt-io");
          !r)
        return r.error();
      pg += n;
    }
  }
  // Both superblock copies: A with sequence 0, B with sequence 1.
  for (uint64_t seq = 0; seq < 2; seq++) {
    t->sequence_ = seq;
    Super sb;
    sb.block_shift = p.block_shift;
    sb.block_count = blocks;
    std::memcpy(sb.uuid, t->uuid_, 16);
    sb.backend_size = p.backend_size;
    sb.epoch = t->epoch_;
    sb.journal_offset = t->journal_offset_;
    sb.journal_bytes = p.journal_bytes;
    sb.checkpoint_id = 0;
    sb.next_commit_id = 1;
    sb.sequence = seq;
    sb.disk_slots = p.disk_slots;
    unsigned char b[kPage];
    sb.encode(b);
    if (auto r = t->pwrite_vbt(b, kPage, seq * kPage, "vbt-io"); !r) return r.error();
  }
  {
    unsigned char b[kPage];
    encode_vbd_header(b, p.block_shift, t->uuid_, p.disk_slots);
    if (auto r = pwrite_all(t->vbd_.get(), b, kPage, 0, "vbd-io", p.vbd_path); !r)
      return r.error();
  }
  if (::fsync(t->vbt_.get()) < 0)
    return sys_error("vbt-io", "Failed to sync '" + p.vbt_path + "'");
  if (::fsync(t->vbd_.get()) < 0)
    return sys_error("vbd-io", "Failed to sync '" + p.vbd_path + "'");
  if (auto r = sync_parent_dir(p.vbt_path); !r) return r.error();
  if (auto r = sync_parent_dir(p.vbd_path); !r) return r.error();
  if (backend_fd >= 0) {
    if (auto r = set_backend_xattr(backend_fd, t->uuid_, t->epoch_); !r)
      return r.error();
  }
  keep = true;
  log::info("virtblock: table created",
            {{"vbt", p.vbt_path}, {"vbd", p.vbd_path}, {"blocks", blocks},
             {"block_shift", p.block_shift}, {"slots", p.disk_slots},
             {"uuid", hex_uuid(t->uuid_)}});
  return t;
}

// ---------------------------------------------------------------------------
// Open and recovery

Result<std::unique_ptr<Table>> Table::open(const std::string& vbt_path,
                                           const std::string& vbd_path,
                                           int backend_fd,
                                           uint64_t backend_size,
                                           RecoveryReport* report) {
  RecoveryReport local;
  RecoveryReport& rep = report ? *report : local;
  rep = RecoveryReport{};
  std::unique_ptr<Table> t(new (std::nothrow) Table());
  if (!t) return make_error("no-memory", "Out of memory");
  t->vbt_path_ = vbt_path;
  t->vbd_path_ = vbd_path;
  const std::string q = "'" + vbt_path + "'";

  t->vbt_.reset(::open(vbt_path.c_str(), O_RDWR | O_CLOEXEC));
  if (!t->vbt_) return sys_error("vbt-io", "Failed to open " + q);
  struct stat st {};
  if (::fstat(t->vbt_.get(), &st) < 0)
    return sys_error("vbt-io", "Failed to stat " + q);
  if (!S_ISREG(st.st_mode))
    return make_error("bad-superblock", q + " is not a regular file");
  uint64_t vbt_size = static_cast<uint64_t>(st.st_size);

  // 1. Superblocks: the valid copy with the higher sequence.
  unsigned char sbuf[2 * kPage] = {};
  {
    uint64_t n = std::min<uint64_t>(vbt_size, sizeof(sbuf));
    if (n > 0) {
      auto r = pread_all(t->vbt_.get(), sbuf, n, 0, "vbt-io", vbt_path);
      if (!r) return r.error();
    }
  }
  Super cp[2];
  int st0 = cp[0].decode(sbuf), st1 = cp[1].decode(sbuf + kPage);
  if (st0 != 0 && st1 != 0) {
    if (st0 == 1 && st1 == 1)
      return make_error("bad-magic", q + " is not a virtblock table (magic)");
    return make_error("bad-superblock",
                      q + ": neither superblock copy passes its crc");
  }
  const Super& sb = (st0 == 0 && st1 == 0)
                        ? (cp[1].sequence > cp[0].sequence ? cp[1] : cp[0])
                        : (st0 == 0 ? cp[0] : cp[1]);
  if (sb.version_major != kVersionMajor)
    return make_error("bad-version", q + ": version_major " +
                                         std::to_string(sb.version_major) +
                                         ", this reader knows 1");
  if (sb.incompat & ~kKnownIncompat)
    return make_error("bad-incompat", q + ": unknown incompat feature bits " +
                                          std::to_string(sb.incompat));
  auto bad_sb = [&](const std::string& field, uint64_t v) {
    return make_error("bad-superblock",
                      q + ": invalid " + field + " " + std::to_string(v));
  };
  if (sb.block_shift < 12 || sb.block_shift > 30)
    return bad_sb("block_shift", sb.block_shift);
  if (sb.backend_size == 0) return bad_sb("backend_size", 0);
  if (sb.block_count != block_count_for(sb.backend_size, sb.block_shift) ||
      sb.block_count > kMaxBlocks)
    return bad_sb("block_count", sb.block_count);
  if (sb.backend_size != backend_size)
    return make_error("size-mismatch",
                      q + ": backend_size " + std::to_string(sb.backend_size) +
                          ", the backend has " + std::to_string(backend_size));
  if (sb.table_offset != kTableOffset)
    return bad_sb("table_offset", sb.table_offset);
  if (sb.journal_offset != kTableOffset + table_bytes_for(sb.block_count))
    return bad_sb("journal_offset", sb.journal_offset);
  if (sb.journal_bytes % kPage || sb.journal_bytes < kMinJournalBytes ||
      sb.journal_bytes > kMaxJournalBytes)
    return bad_sb("journal_bytes", sb.journal_bytes);
  if (sb.next_commit_id == 0 || sb.next_commit_id > kMaxId)
    return bad_sb("next_commit_id", sb.next_commit_id);
  if (sb.checkpoint_id >= sb.next_commit_id)
    return bad_sb("checkpoint_id", sb.checkpoint_id);
  if (sb.repair_min_id > sb.next_commit_id)
    return bad_sb("repair_min_id", sb.repair_min_id);
  if (sb.disk_slots == 0 || sb.disk_slots > kMaxSlots ||
      sb.disk_slots + 1 > (uint64_t{1} << 62) >> sb.block_shift)
    return bad_sb("disk_slots", sb.disk_slots);
  if (sb.epoch == 0 || sb.epoch > kMaxId) return bad_sb("epoch", sb.epoch);
  if (vbt_size < sb.journal_offset + sb.journal_bytes)
    return make_error("size-mismatch",
                      q + " is " + std::to_string(vbt_size) +
                          " bytes, its superblock needs " +
                          std::to_string(sb.journal_offset + sb.journal_bytes) +
                          " (table and journal_bytes)");

  // The .vbd header.
  const std::string qd = "'" + vbd_path + "'";
  t->vbd_.reset(::open(vbd_path.c_str(), O_RDWR | O_CLOEXEC));
  if (!t->vbd_) return sys_error("vbd-io", "Failed to open " + qd);
  if (::fstat(t->vbd_.get(), &st) < 0)
    return sys_error("vbd-io", "Failed to stat " + qd);
  uint64_t vbd_size = static_cast<uint64_t>(st.st_size);
  {
    unsigned char h[kPage] = {};
    if (vbd_size > 0) {
      auto r = pread_all(t->vbd_.get(), h, std::min<uint64_t>(kPage, vbd_size),
                         0, "vbd-io", vbd_path);
      if (!r) return r.error();
    }
    if (std::memcmp(h, kVbdMagic, 8) != 0)
      return make_error("bad-magic", qd + " is not a virtblock disk file (magic)");
    if (crc_skipping(h, kPage, 4092) != get32(h + 4092))
      return make_error("bad-superblock", qd + ": header crc");
    if (get16(h + 8) != kVersionMajor)
      return make_error("bad-version", qd + ": version_major " +
                                           std::to_string(get16(h + 8)));
    if (std::memcmp(h + 16, sb.uuid, 16) != 0)
      return make_error("uuid-mismatch",
                        qd + ": table_uuid " + hex_uuid(h + 16) + ", " + q +
                            " has " + hex_uuid(sb.uuid));
    if (get32(h + 12) != sb.block_shift)
      return make_error("bad-superblock", qd + ": block_shift " +
                                              std::to_string(get32(h + 12)) +
                                              " differs from the .vbt's");
    if (get64(h + 32) != sb.disk_slots)
      return make_error("bad-superblock", qd + ": disk_slots " +
                                              std::to_string(get64(h + 32)) +
                                              " differs from the .vbt's " +
                                              std::to_string(sb.disk_slots));
    uint64_t need = (sb.disk_slots + 1) << sb.block_shift;
    if (vbd_size < need)
      return make_error("size-mismatch",
                        qd + " is " + std::to_string(vbd_size) +
                            " bytes, disk_slots needs " + std::to_string(need));
  }

  // The backend's xattr: this table's uuid, and its epoch (or epoch + 1:
  // a crash between the xattr and the superblock write of an attach).
  if (backend_fd >= 0) {
    unsigned char x[kXattrBytes + 1] = {};
    ssize_t n = ::fgetxattr(backend_fd, kXattrName, x, sizeof(x));
    if (n < 0 && errno != ENODATA && errno != ERANGE && errno != ENOTSUP)
      return sys_error("xattr", std::string("Failed to read ") + kXattrName);
    if (n < 0)
      return make_error("xattr-mismatch",
                        std::string("The backend has no valid ") + kXattrName +
                            ": it is not the one " + q + " belongs to");
    if (n != static_cast<ssize_t>(kXattrBytes))
      return make_error("xattr-mismatch", std::string("The backend's ") +
                                              kXattrName + " has " +
                                              std::to_string(n) + " bytes, not 24");
    if (std::memcmp(x, sb.uuid, 16) != 0)
      return make_error("xattr-mismatch",
                        "The backend's table_uuid " + hex_uuid(x) +
                            " is not " + q + "'s " + hex_uuid(sb.uuid));
    uint64_t e = get64(x + 16);
    if (e != sb.epoch && e != sb.epoch + 1)
      return make_error("xattr-mismatch",
                        "The backend's epoch " + std::to_string(e) + " is not " +
                            q + "'s " + std::to_string(sb.epoch) +
                            " (backend or table restored behind hostd's back)");
  }

  t->block_shift_ = sb.block_shift;
  t->block_count_ = sb.block_count;
  t->disk_slots_ = sb.disk_slots;
  t->journal_bytes_ = sb.journal_bytes;
  t->journal_offset_ = sb.journal_offset;
  t->backend_size_ = sb.backend_size;
  std::memcpy(t->uuid_, sb.uuid, 16);
  t->epoch_ = sb.epoch;
  t->sequence_ = sb.sequence;
  t->checkpoint_id_ = sb.checkpoint_id;
  t->repair_min_id_ = sb.repair_min_id;
  t->compat_ = sb.compat;
  t->version_minor_ = sb.version_minor;
  t->next_id_ = sb.next_commit_id;
  try {
    t->entries_.assign(sb.block_count, Entry{});
    t->dirty_.assign(table_bytes_for(sb.block_count) / kPage, 0);
    t->slot_bits_.assign((sb.disk_slots + 63) / 64, 0);
  } catch (const std::bad_alloc&) {
    return make_error("no-memory", "Out of memory for " + q + "'s " +
                                       std::to_string(sb.block_count) + " blocks");
  }
  if (auto r = t->recover(sb, &rep); !r) return r.error();

  // Attach: a new epoch, on the backend first, then in the superblock
  // that the checkpoint writes.
  t->epoch_ = sb.epoch + 1;
  if (backend_fd >= 0) {
    if (auto r = set_backend_xattr(backend_fd, t->uuid_, t->epoch_); !r)
      return r.error();
  }
  {
    std::unique_lock lk(t->mu_);
    t->lead_ = true;
    auto r = t->checkpoint_as_leader(lk);
    t->lead_ = false;
    if (!r) return r.error();
  }
  log::info("virtblock: table opened",
            {{"vbt", vbt_path}, {"epoch", t->epoch_},
             {"commits_replayed", rep.commits_replayed},
             {"moving_to_resident", rep.moving_to_resident.size()},
             {"purged", rep.purged.size()},
             {"torn_pages_repaired", rep.torn_pages_repaired}});
  return t;
}

// Steps 2-4 of recovery on the fields open() filled in.
Result<void> Table::recover(const Super& sb, RecoveryReport* rep) {
  const std::string q = "'" + vbt_path_ + "'";
  const uint64_t JB = journal_bytes_;
  std::vector<uint8_t> bad;
  try {
    bad.assign(block_count_, 0);
  } catch (const std::bad_alloc&) {
    return make_error("no-memory", "Out of memory");
  }

  // The table region.
  {
    std::vector<unsigned char> buf;
    uint64_t pages = dirty_.size();
    for (uint64_t pg = 0; pg < pages;) {
      uint64_t n = std::min<uint64_t>(256, pages - pg);
      buf.resize(n * kPage);
      auto r = pread_all(vbt_.get(), buf.data(), buf.size(),
                         kTableOffset + pg * kPage, "vbt-io", vbt_path_);
      if (!r) return r;
      uint64_t first = pg * kEntriesPerPage;
      uint64_t end = std::min(block_count_, (pg + n) * kEntriesPerPage);
      for (uint64_t b = first; b < end; b++) {
        if (!decode_entry(buf.data() + (b - first) * kEntryBytes, b, &entries_[b])) {
          bad[b] = 1;
          entries_[b] = Entry{};
          entries_[b].commit_id = 0;
        }
      }
      pg += n;
    }
  }

  // 2. Every valid record in the journal region.
  struct Rec {
    uint64_t id, pos, bytes;
    uint32_t kind;
    std::vector<uint64_t> pages;  // kind 2
  };
  std::vector<Rec> recs;
  std::vector<unsigned char> buf(kMaxRecordBytes);
  auto bad_journal = [&](uint64_t id, const std::string& why) {
    return make_error("bad-journal", q + ": commit " + std::to_string(id) +
                                         " passes its crc but " + why);
  };
  for (uint64_t pos = 0; pos + kPage <= JB;) {
    unsigned char h[kRecordHeaderBytes];
    auto r = pread_all(vbt_.get(), h, sizeof(h), journal_offset_ + pos, "vbt-io",
                       vbt_path_);
    if (!r) return r;
    uint32_t rb = get32(h + 32);
    if (std::memcmp(h, kRecMagic, 4) != 0 || get16(h + 4) != 1 ||
        get16(h + 6) != kRecordHeaderBytes || std::memcmp(h + 16, uuid_, 16) != 0 ||
        rb == 0 || rb % kPage || rb > kMaxRecordBytes || pos + rb > JB) {
      pos += kPage;
      continue;
    }
    r = pread_all(vbt_.get(), buf.data(), rb, journal_offset_ + pos, "vbt-io",
                  vbt_path_);
    if (!r) return r;
    if (crc_skipping(buf.data(), rb, 60) != get32(buf.data() + 60)) {
      pos += kPage;
      continue;
    }
    Rec rec{get64(buf.data() + 8), pos, rb, get32(buf.data() + 44), {}};
    uint64_t nr_tx = get32(buf.data() + 36), nr_ops = get32(buf.data() + 40);
    if (rec.id == 0 || rec.id >= kMaxId) return bad_journal(rec.id, "has an invalid id");
    if (rec.kind == kKindEntries) {
      if (nr_tx == 0 || nr_ops == 0 || entries_record_content(nr_tx, nr_ops) > rb)
        return bad_journal(rec.id, "nr_tx/nr_ops do not fit record_bytes");
      uint64_t off = kRecordHeaderBytes, sum = 0;
      for (uint64_t i = 0; i < nr_tx; i++) {
        uint64_t n = get32(buf.data() + off + 8);
        uint16_t type = get16(buf.data() + off + 12);
        if (type < 1 || type > 5) return bad_journal(rec.id, "has a tx of unknown type");
        sum += n;
        if (sum > nr_ops) return bad_journal(rec.id, "its txs' nr_ops exceed nr_ops");
        off += kTxHeaderBytes;
        for (uint64_t k = 0; k < n; k++, off += kOpBytes) {
          uint64_t b = get64(buf.data() + off);
          Entry e;
          if (b >= block_count_) return bad_journal(rec.id, "names a block out of range");
          if (!decode_entry(buf.data() + off + 8, b, &e))
            return bad_journal(rec.id, "holds an entry failing its crc");
          if (e.commit_id != rec.id)
            return bad_journal(rec.id, "holds an entry of another commit");
          if (const char* why = entry_problem(e, disk_slots_))
            return bad_journal(rec.id, std::string("holds an entry with invalid ") + why);
        }
      }
      if (sum != nr_ops) return bad_journal(rec.id, "its txs' nr_ops do not add up");
    } else if (rec.kind == kKindPages) {
      if (nr_tx != 0 || nr_ops == 0 ||
          kRecordHeaderBytes + nr_ops * kPageImageBytes > rb)
        return bad_journal(rec.id, "its page count does not fit record_bytes");
      for (uint64_t i = 0; i < nr_ops; i++) {
        uint64_t pg = get64(buf.data() + kRecordHeaderBytes + i * kPageImageBytes);
        if (pg >= dirty_.size()) return bad_journal(rec.id, "names a table page out of range");
        rec.pages.push_back(pg);
      }
    } else {
      return bad_journal(rec.id, "has unknown kind " + std::to_string(rec.kind));
    }
    recs.push_back(std::move(rec));
    pos += rb;
  }
  std::sort(recs.begin(), recs.end(),
            [](const Rec& a, const Rec& b) { return a.id < b.id; });
  for (size_t i = 1; i < recs.size(); i++)
    if (recs[i].id == recs[i - 1].id)
      return bad_journal(recs[i].id, "appears twice in the journal");

  auto mark_dirty = [&](uint64_t block) {
    uint64_t pg = block / kEntriesPerPage;
    if (!dirty_[pg]) {
      dirty_[pg] = 1;
      dirty_count_++;
    }
  };

  // Torn table pages: the newest trusted kind-2 image of each page holding
  // an entry that fails its crc restores those entries.
  {
    std::unordered_map<uint64_t, std::pair<size_t, size_t>> best;  // page -> (rec, index)
    for (uint64_t b = 0; b < block_count_; b++)
      if (bad[b]) best.emplace(b / kEntriesPerPage, std::pair<size_t, size_t>{~size_t{0}, 0});
    if (!best.empty()) {
      for (size_t i = 0; i < recs.size(); i++) {
        if (recs[i].kind != kKindPages || recs[i].id < repair_min_id_) continue;
        for (size_t k = 0; k < recs[i].pages.size(); k++) {
          auto it = best.find(recs[i].pages[k]);
          if (it != best.end()) it->second = {i, k};  // ascending ids: newest wins
        }
      }
      unsigned char img[kPage];
      for (auto& [pg, where] : best) {
        if (where.first == ~size_t{0}) continue;
        const Rec& rec = recs[where.first];
        auto r = pread_all(vbt_.get(), img, kPage,
                           journal_offset_ + rec.pos + kRecordHeaderBytes +
                               where.second * kPageImageBytes + 8,
                           "vbt-io", vbt_path_);
        if (!r) return r;
        bool fixed = false;
        uint64_t first = pg * kEntriesPerPage;
        uint64_t end = std::min(block_count_, first + kEntriesPerPage);
        for (uint64_t b = first; b < end; b++) {
          Entry e;
          if (!bad[b] || !decode_entry(img + (b - first) * kEntryBytes, b, &e)) continue;
          entries_[b] = e;
          bad[b] = 0;
          fixed = true;
          mark_dirty(b);
        }
        if (fixed) rep->torn_pages_repaired++;
      }
    }
  }

  // Kind-1 records in ascending id; an op applies when newer than the entry
  // (or the entry is torn and this is the journal's record of it).
  for (const Rec& rec : recs) {
    if (rec.kind != kKindEntries) continue;
    auto r = pread_all(vbt_.get(), buf.data(), rec.bytes, journal_offset_ + rec.pos,
                       "vbt-io", vbt_path_);
    if (!r) return r;
    if (crc_skipping(buf.data(), rec.bytes, 60) != get32(buf.data() + 60))
      return make_error("vbt-io", q + ": commit " + std::to_string(rec.id) +
                                      " changed while being read");
    uint64_t nr_tx = get32(buf.data() + 36), off = kRecordHeaderBytes;
    for (uint64_t i = 0; i < nr_tx; i++) {
      uint64_t n = get32(buf.data() + off + 8);
      off += kTxHeaderBytes;
      for (uint64_t k = 0; k < n; k++, off += kOpBytes) {
        uint64_t b = get64(buf.data() + off);
        Entry e;
        if (!decode_entry(buf.data() + off + 8, b, &e)) continue;  // checked above
        if (bad[b] || e.commit_id > entries_[b].commit_id) {
          entries_[b] = e;
          bad[b] = 0;
          mark_dirty(b);
        }
      }
    }
    if (rec.id > checkpoint_id_) rep->commits_replayed++;
  }

  // 3. Every entry checked; invalid or unrepaired ones refuse the table.
  std::vector<uint64_t> invalid;
  for (uint64_t b = 0; b < block_count_; b++) {
    const Entry& e = entries_[b];
    if (bad[b] || entry_problem(e, disk_slots_) != nullptr) {
      invalid.push_back(b);
      continue;
    }
    if (e.state == BlockState::Purged && e.disk_slot != kNoSlot) {
      uint64_t s = e.disk_slot, m = uint64_t{1} << (s % 64);
      if (slot_bits_[s / 64] & m) {
        invalid.push_back(b);  // a second purged block in one slot
        continue;
      }
      slot_bits_[s / 64] |= m;
      slots_used_++;
    }
  }
  if (!invalid.empty()) {
    rep->bad_entries = invalid;
    std::string list;
    for (size_t i = 0; i < invalid.size() && i < 16; i++)
      list += (i ? ", " : "") + std::to_string(invalid[i]);
    if (invalid.size() > 16) list += ", ...";
    return make_error("bad-entries",
                      q + ": " + std::to_string(invalid.size()) +
                          " entries fail their crc or are invalid, with no "
                          "journal record to repair them: blocks " + list);
  }

  // 4. moving -> resident (its slot is free: not named by a purged entry).
  for (uint64_t b = 0; b < block_count_; b++) {
    Entry& e = entries_[b];
    if (e.state == BlockState::Moving) {
      e.state = BlockState::Resident;
      e.flags = 0;
      e.disk_slot = kNoSlot;
      rep->moving_to_resident.push_back(b);
      mark_dirty(b);
    } else if (e.state == BlockState::Purged) {
      rep->purged.push_back(b);
    }
  }

  // Where the journal continues: after the newest record, so that space is
  // reused in the order it was written.  used_: from the oldest record a
  // crash would still need (id > checkpoint_id) up to there.
  if (!recs.empty()) {
    const Rec& last = recs.back();
    next_id_ = std::max(next_id_, last.id + 1);
    head_ = (last.pos + last.bytes) % JB;
    for (const Rec& rec : recs) {
      if (rec.id <= checkpoint_id_) continue;
      used_ = head_ > rec.pos ? head_ - rec.pos : head_ + JB - rec.pos;
      break;
    }
  }
  (void)sb;
  return {};
}

}  // namespace kvmx::purge
