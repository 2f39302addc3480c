// Format, recovery and crash tests of the virtblock table and journal
// (docs/specs/virtblock.md).  The journal and superblock parsers here are
// written from the spec, independently of table.cc.
#include <catch2/catch_test_macros.hpp>

#include <fcntl.h>
#include <sys/xattr.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <map>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "common/log.h"
#include "purge/table/crc32c.h"
#include "purge/table/table.h"
#include "tests/test_helpers.h"

using namespace kvmx::purge;
using kvmx::test::read_file;
using kvmx::test::TempDir;
using kvmx::test::write_file;

namespace {

constexpr uint64_t kPage = 4096;

// Only warnings and errors on stderr: the tests open tables by the hundred.
const bool kQuietLog = [] {
  return kvmx::log::setup("warn", kvmx::log::Format::kText,
                          kvmx::log::Sink::kStderr)
      .ok();
}();

uint64_t le(const std::string& s, size_t off, int bytes) {
  uint64_t v = 0;
  for (int i = bytes - 1; i >= 0; i--)
    v = v << 8 | static_cast<unsigned char>(s[off + static_cast<size_t>(i)]);
  return v;
}
void put_le(std::string& s, size_t off, uint64_t v, int bytes) {
  for (int i = 0; i < bytes; i++)
    s[off + static_cast<size_t>(i)] = static_cast<char>(v >> (8 * i));
}
// CRC32C over [off, off+len) with the 4 bytes at crc_off taken as zero.
uint32_t crc_zeroed(std::string s, size_t off, size_t len, size_t crc_off,
                    uint32_t seed = 0) {
  put_le(s, crc_off, 0, 4);
  return crc32c(s.data() + off, len, seed);
}
void reseal_superblock(std::string& img, size_t copy) {
  size_t o = copy * kPage;
  put_le(img, o + 4092, crc_zeroed(img, o, kPage, o + 4092), 4);
}
// The current superblock copy (valid crc, higher sequence).
size_t current_copy(const std::string& img) {
  auto valid = [&](size_t c) {
    size_t o = c * kPage;
    return img.compare(o, 8, std::string("KVMXVBT\0", 8)) == 0 &&
           crc_zeroed(img, o, kPage, o + 4092) == le(img, o + 4092, 4);
  };
  if (valid(0) && valid(1)) return le(img, 104, 8) > le(img, 4096 + 104, 8) ? 0 : 1;
  return valid(0) ? 0 : 1;
}

uint64_t journal_offset_for(uint64_t blocks) {
  return 8192 + (blocks * 64 + kPage - 1) / kPage * kPage;
}

struct RecLoc {
  uint64_t pos, id, bytes;
  uint32_t kind;
  std::vector<uint64_t> pages;
};
// Valid commit records of the journal region, by the spec.
std::vector<RecLoc> scan_journal(const std::string& img, uint64_t jo,
                                 uint64_t jb) {
  std::vector<RecLoc> out;
  for (uint64_t pos = 0; pos + kPage <= jb; pos += kPage) {
    size_t o = jo + pos;
    if (o + 64 > img.size() || img.compare(o, 4, "VBJC") != 0) continue;
    uint64_t rb = le(img, o + 32, 4);
    if (rb == 0 || rb % kPage || rb > (1 << 20) || pos + rb > jb) continue;
    if (crc_zeroed(img, o, rb, o + 60) != le(img, o + 60, 4)) continue;
    RecLoc r{pos, le(img, o + 8, 8), rb, static_cast<uint32_t>(le(img, o + 44, 4)), {}};
    if (r.kind == 2)
      for (uint64_t i = 0; i < le(img, o + 40, 4); i++)
        r.pages.push_back(le(img, o + 64 + i * 4104, 8));
    out.push_back(r);
  }
  return out;
}

struct Model {
  std::vector<Entry> e;
  explicit Model(uint64_t n) : e(n) {}
  void apply(const Tx& tx, uint64_t id) {
    for (const Op& op : tx.ops) {
      Entry x = op.entry;
      x.commit_id = id;
      e[op.block] = x;
    }
  }
  // What recovery makes of it: moving -> resident.
  std::vector<Entry> recovered() const {
    auto r = e;
    for (auto& x : r)
      if (x.state == BlockState::Moving) {
        x.state = BlockState::Resident;
        x.flags = 0;
        x.disk_slot = kNoSlot;
      }
    return r;
  }
};

// A random transaction over distinct blocks; slot b belongs to block b.
Tx random_tx(std::mt19937_64& rng, const Model& m, uint64_t blocks,
             int max_ops, std::vector<uint64_t> avoid = {}) {
  Tx tx{TxType::PurgeBegin, {}};
  int n = 1 + static_cast<int>(rng() % static_cast<uint64_t>(max_ops));
  std::set<uint64_t> used(avoid.begin(), avoid.end());
  for (int i = 0; i < n; i++) {
    uint64_t b = rng() % blocks;
    if (!used.insert(b).second) continue;
    Entry x = m.e[b];
    switch (rng() % 3) {
      case 0:
        x = Entry{BlockState::Resident, 0, 0, x.generation, kNoSlot, 0};
        tx.type = TxType::FaultBackDone;
        break;
      case 1:
        x = Entry{BlockState::Moving, 0, 0, x.generation, b, 0};
        tx.type = TxType::PurgeBegin;
        break;
      default: {
        bool zero = rng() % 5 == 0;
        x = Entry{BlockState::Purged, static_cast<uint8_t>(zero ? kFlagZero : 0),
                  static_cast<uint32_t>(rng()), x.generation + 1,
                  zero ? kNoSlot : b, 0};
        tx.type = TxType::PurgeDone;
      }
    }
    tx.ops.push_back(Op{b, x});
  }
  return tx;
}

// Index of the first entry that differs, or -1.
long first_mismatch(const Table& t, const std::vector<Entry>& want) {
  if (t.block_count() != want.size()) return 0;
  for (size_t b = 0; b < want.size(); b++)
    if (!(t.entry(b) == want[b])) return static_cast<long>(b);
  return -1;
}

std::string describe(const Entry& e) {
  return "state " + std::to_string(static_cast<int>(e.state)) + " flags " +
         std::to_string(e.flags) + " gen " + std::to_string(e.generation) +
         " slot " + std::to_string(e.disk_slot) + " commit " +
         std::to_string(e.commit_id);
}

#define REQUIRE_STATE(t, want)                                              \
  do {                                                                      \
    long mm_ = first_mismatch((t), (want));                                 \
    if (mm_ >= 0 && static_cast<size_t>(mm_) < (want).size())              \
      INFO("block " << mm_ << ": got " << describe((t).entry(mm_))         \
                    << ", want " << describe((want)[mm_]));                 \
    REQUIRE(mm_ == -1);                                                     \
  } while (0)

struct Fix {
  TempDir dir;
  TableParams p;
  explicit Fix(uint64_t blocks = 256, uint64_t slots = 0,
               uint64_t jb = 1 << 20) {
    p.vbt_path = dir / "nv.vbt";
    p.vbd_path = dir / "nv.vbd";
    p.block_shift = 12;
    p.backend_size = blocks * kPage;
    p.disk_slots = slots ? slots : blocks;
    p.journal_bytes = jb;
  }
  std::unique_ptr<Table> create(int backend_fd = -1) {
    auto t = Table::create(p, backend_fd);
    INFO((t ? std::string() : t.error().code + ": " + t.error().message));
    REQUIRE(t.ok());
    return std::move(*t);
  }
  kvmx::Result<std::unique_ptr<Table>> open(RecoveryReport* rep = nullptr,
                                           int backend_fd = -1,
                                           const std::string& vbt = "") {
    return Table::open(vbt.empty() ? p.vbt_path : vbt, p.vbd_path, backend_fd,
                       p.backend_size, rep);
  }
  std::unique_ptr<Table> reopen(RecoveryReport* rep = nullptr,
                                const std::string& vbt = "") {
    auto t = open(rep, -1, vbt);
    INFO((t ? std::string() : t.error().code + ": " + t.error().message));
    REQUIRE(t.ok());
    return std::move(*t);
  }
  uint64_t blocks() const { return p.backend_size / kPage; }
  uint64_t jo() const { return journal_offset_for(blocks()); }
};

uint64_t must_commit(Table& t, Tx tx, Model* m = nullptr) {
  Tx copy = tx;
  auto r = t.commit(std::move(tx));
  INFO((r ? std::string() : r.error().code + ": " + r.error().message));
  REQUIRE(r.ok());
  if (m) m->apply(copy, *r);
  return *r;
}

std::string code_of(const kvmx::Result<std::unique_ptr<Table>>& r) {
  return r.ok() ? std::string("ok") : r.error().code;
}

}  // namespace

// ---------------------------------------------------------------------------

TEST_CASE("crc32c: check value, chaining, both implementations agree") {
  const char* s = "123456789";
  CHECK(crc32c(s, 9) == 0xE3069283u);
  CHECK(crc32c_portable(s, 9) == 0xE3069283u);
  CHECK(crc32c_hw(s, 9) == 0xE3069283u);
  CHECK(crc32c(s, 4, 0) != 0);
  CHECK(crc32c(s + 4, 5, crc32c(s, 4)) == 0xE3069283u);
  CHECK(crc32c("", 0) == 0);
  // 32 zero bytes: the iSCSI test vector (RFC 3720 B.4).
  std::string z(32, '\0');
  CHECK(crc32c(z.data(), z.size()) == 0x8A9136AAu);
  std::string ff(32, '\xff');
  CHECK(crc32c(ff.data(), ff.size()) == 0x62A8AB43u);
  std::mt19937_64 rng(7);
  std::string buf(70000, '\0');
  for (auto& c : buf) c = static_cast<char>(rng());
  for (size_t off : {0, 1, 3, 7}) {
    for (size_t len : {0, 1, 7, 8, 9, 63, 4096, 69000}) {
      uint32_t a = crc32c_portable(buf.data() + off, len, 0x1234);
      CHECK(crc32c_hw(buf.data() + off, len, 0x1234) == a);
      CHECK(crc32c(buf.data() + off, len, 0x1234) == a);
    }
  }
}

TEST_CASE("table: create, commit, reopen gives identical entries") {
  Fix f(256);
  Model m(f.blocks());
  std::mt19937_64 rng(1);
  uint64_t last = 0;
  {
    auto t = f.create();
    CHECK(t->block_count() == 256);
    CHECK(t->block_size() == 4096);
    CHECK(t->slot_offset(0) == 4096);
    CHECK(t->slot_offset(3) == 4 * 4096);
    REQUIRE_STATE(*t, m.e);
    for (int i = 0; i < 50; i++) {
      uint64_t id = must_commit(*t, random_tx(rng, m, f.blocks(), 5), &m);
      CHECK(id > last);
      last = id;
    }
    REQUIRE_STATE(*t, m.e);
    auto st = t->stats();
    CHECK(st.commits == 50);
    CHECK(st.txs == 50);
  }
  CHECK(std::filesystem::file_size(f.p.vbt_path) ==
        f.jo() + f.p.journal_bytes);
  CHECK(std::filesystem::file_size(f.p.vbd_path) == (f.p.disk_slots + 1) * 4096);
  RecoveryReport rep;
  {
    auto t = f.reopen(&rep);
    CHECK(rep.commits_replayed == 50);
    CHECK(rep.bad_entries.empty());
    REQUIRE_STATE(*t, m.recovered());
    m.e = m.recovered();
    // Ids keep ascending after a reopen.
    uint64_t id = must_commit(*t, random_tx(rng, m, f.blocks(), 3), &m);
    CHECK(id > last);
  }
  {
    auto t = f.reopen(&rep);
    CHECK(rep.commits_replayed == 1);  // the open before checkpointed the rest
    REQUIRE_STATE(*t, m.recovered());
  }

  SECTION("refuses to overwrite") {
    auto again = Table::create(f.p, -1);
    REQUIRE(!again.ok());
    CHECK(again.error().code == "exists");
    std::filesystem::remove(f.p.vbt_path);
    again = Table::create(f.p, -1);
    REQUIRE(!again.ok());
    CHECK(again.error().code == "exists");
    CHECK(!std::filesystem::exists(f.p.vbt_path));  // its own file removed again
  }
  SECTION("invalid parameters") {
    TableParams p = f.p;
    p.vbt_path = f.dir / "x.vbt";
    p.vbd_path = f.dir / "x.vbd";
    TableParams q = p;
    q.block_shift = 11;
    CHECK(Table::create(q, -1).error().code == "bad-params");
    q = p;
    q.journal_bytes = (1 << 20) + 100;
    CHECK(Table::create(q, -1).error().code == "bad-params");
    q = p;
    q.journal_bytes = 512 << 10;
    CHECK(Table::create(q, -1).error().code == "bad-params");
    q = p;
    q.disk_slots = 0;
    CHECK(Table::create(q, -1).error().code == "bad-params");
    q = p;
    q.backend_size = 0;
    CHECK(Table::create(q, -1).error().code == "bad-params");
    CHECK(!std::filesystem::exists(p.vbt_path));
  }
}

TEST_CASE("table: block count rounds up, a partial last block counts") {
  Fix f(10);
  f.p.backend_size = 10 * kPage + 1;
  auto t = f.create();
  CHECK(t->block_count() == 11);
  t.reset();
  auto r = Table::open(f.p.vbt_path, f.p.vbd_path, -1, 10 * kPage + 1, nullptr);
  REQUIRE(r.ok());
}

TEST_CASE("table: transactions are validated before any I/O") {
  Fix f(64, 8);
  auto t = f.create();
  auto code = [&](Tx tx) {
    auto r = t->commit(std::move(tx));
    return r.ok() ? std::string("ok") : r.error().code;
  };
  Entry res;
  Entry mov{BlockState::Moving, 0, 0, 0, 3, 0};
  CHECK(code(Tx{TxType::Cancel, {}}) == "bad-tx");
  CHECK(code(Tx{TxType::Cancel, {{64, res}}}) == "bad-tx");
  CHECK(code(Tx{TxType::Cancel, {{1, Entry{BlockState::Resident, 0, 0, 0, 2, 0}}}}) == "bad-tx");
  CHECK(code(Tx{TxType::PurgeBegin, {{1, Entry{BlockState::Moving, 0, 0, 0, 8, 0}}}}) == "bad-tx");
  CHECK(code(Tx{TxType::PurgeBegin, {{1, Entry{BlockState::Purged, 1, 0, 0, 2, 0}}}}) == "bad-tx");
  CHECK(code(Tx{TxType::PurgeBegin, {{1, Entry{static_cast<BlockState>(0), 0, 0, 0, kNoSlot, 0}}}}) == "bad-tx");
  CHECK(code(Tx{TxType::PurgeBegin, {{1, Entry{BlockState::Resident, 4, 0, 0, kNoSlot, 0}}}}) == "bad-tx");
  CHECK(code(Tx{static_cast<TxType>(9), {{1, mov}}}) == "bad-tx");
  CHECK(code(Tx{TxType::PurgeBegin, {{1, mov}, {1, mov}}}) == "bad-tx");
  CHECK(code(Tx{TxType::PurgeBegin, {{1, mov}}}) == "ok");
  CHECK(t->stats().commits == 1);
}

TEST_CASE("table: group commit coalesces concurrent transactions") {
  constexpr int kThreads = 8, kPer = 200;
  Fix f(kThreads * kPer);
  std::vector<uint64_t> ids(kThreads * kPer, 0);
  std::vector<std::string> errors(kThreads);
  {
    auto t = f.create();
    std::vector<std::thread> th;
    for (int i = 0; i < kThreads; i++) {
      th.emplace_back([&, i] {
        for (int k = 0; k < kPer; k++) {
          uint64_t b = static_cast<uint64_t>(i * kPer + k);
          Entry e{BlockState::Purged, 0, static_cast<uint32_t>(b * 7), 1, b, 0};
          auto r = t->commit(Tx{TxType::PurgeDone, {{b, e}}});
          if (!r) {
            errors[static_cast<size_t>(i)] = r.error().message;
            return;
          }
          ids[b] = *r;
          if (!(t->entry(b).commit_id >= *r)) {
            errors[static_cast<size_t>(i)] = "entry not visible after commit";
            return;
          }
        }
      });
    }
    for (auto& x : th) x.join();
    for (auto& e : errors) CHECK(e == "");
    auto st = t->stats();
    INFO("commits " << st.commits << " syncs " << st.syncs << " checkpoints "
                    << st.checkpoints);
    CHECK(st.txs == kThreads * kPer);
    CHECK(st.commits < st.txs);
    CHECK(st.syncs < st.txs);
    // Per thread, ids ascend.
    for (int i = 0; i < kThreads; i++)
      for (int k = 1; k < kPer; k++)
        CHECK(ids[static_cast<size_t>(i * kPer + k)] >
              ids[static_cast<size_t>(i * kPer + k - 1)]);
  }
  RecoveryReport rep;
  auto t = f.reopen(&rep);
  CHECK(rep.purged.size() == kThreads * kPer);
  int wrong = 0;
  for (uint64_t b = 0; b < kThreads * kPer; b++) {
    Entry e = t->entry(b);
    if (e.state != BlockState::Purged || e.disk_slot != b || e.commit_id != ids[b] ||
        e.data_crc != b * 7)
      wrong++;
  }
  CHECK(wrong == 0);
  CHECK(t->free_slots() == 0);
}

TEST_CASE("table: crash after any commit recovers exactly the durable commits") {
  // Images of the .vbt after every commit, kept as page diffs.  Every
  // prefix recovers to its model; a torn last commit is ignored; a crash
  // inside a checkpoint (in write order: images, table pages, superblock)
  // recovers too, with a torn table page repaired from its image.
  Fix f(2048);
  const uint64_t jo = f.jo(), jb = f.p.journal_bytes;
  std::mt19937_64 rng(42);
  Model m(f.blocks());
  std::vector<std::vector<Entry>> models{m.e};
  std::vector<std::map<uint64_t, std::string>> diffs;  // page offset -> new page
  std::string img0;
  {
    auto t = f.create();
    img0 = read_file(f.p.vbt_path);
    std::string prev = img0;
    for (int i = 0; i < 150; i++) {
      must_commit(*t, random_tx(rng, m, f.blocks(), 4), &m);
      models.push_back(m.e);
      std::string cur = read_file(f.p.vbt_path);
      REQUIRE(cur.size() == prev.size());
      std::map<uint64_t, std::string> d;
      for (uint64_t o = 0; o < cur.size(); o += kPage)
        if (cur.compare(o, kPage, prev, o, kPage) != 0) d[o] = cur.substr(o, kPage);
      diffs.push_back(std::move(d));
      prev = std::move(cur);
    }
    INFO("checkpoints " << t->stats().checkpoints);
    REQUIRE(t->stats().checkpoints >= 2);
  }
  const std::string x = f.dir / "crash.vbt";
  auto expect = [&](const std::string& image, const std::vector<Entry>& want,
                    RecoveryReport* rep = nullptr) {
    write_file(x, image);
    auto t = f.reopen(rep, x);
    REQUIRE_STATE(*t, want);
  };
  auto apply = [](std::string& img, const std::map<uint64_t, std::string>& d) {
    for (auto& [o, pg] : d) img.replace(o, kPage, pg);
  };
  std::string cur = img0;
  Model dummy(0);
  int checkpoint_commits = 0, torn_repairs = 0;
  for (size_t i = 0; i <= diffs.size(); i++) {
    dummy.e = models[i];
    expect(cur, dummy.recovered());
    if (i == diffs.size()) break;
    const auto& d = diffs[i];
    std::string next = cur;
    apply(next, d);
    bool journal_only = d.begin()->first >= jo;
    if (journal_only) {
      // Torn: any split of the changed bytes between new and old.
      uint64_t lo = 0, hi = 0;
      for (lo = 0; cur[lo] == next[lo]; lo++) {
      }
      for (hi = next.size(); cur[hi - 1] == next[hi - 1]; hi--) {
      }
      for (int k = 0; k < 3; k++) {
        uint64_t c = lo + 1 + rng() % (hi - lo - 1);
        std::string a = cur;
        a.replace(lo, c - lo, next, lo, c - lo);  // new prefix, old rest
        expect(a, dummy.recovered());
        std::string b = next;
        b.replace(lo, c - lo, cur, lo, c - lo);  // old prefix, new rest
        expect(b, dummy.recovered());
      }
    } else {
      // A checkpoint ran before this commit.  Crash states in write order.
      checkpoint_commits++;
      auto old_recs = scan_journal(cur, jo, jb);
      uint64_t max_old = 0;
      for (auto& r : old_recs) max_old = std::max(max_old, r.id);
      std::string s1 = cur;
      for (auto& r : scan_journal(next, jo, jb))
        if (r.id > max_old && r.kind == 2)
          s1.replace(jo + r.pos, r.bytes, next, jo + r.pos, r.bytes);
      expect(s1, dummy.recovered());
      std::vector<uint64_t> table_pages;
      for (auto& [o, pg] : d)
        if (o >= 8192 && o < jo) table_pages.push_back(o);
      REQUIRE(!table_pages.empty());
      std::string s3 = s1;
      for (uint64_t o : table_pages) s3.replace(o, kPage, next, o, kPage);
      // One table page torn inside an entry: new bytes up to the first
      // changed one, old after it.
      uint64_t tp = table_pages[rng() % table_pages.size()];
      uint64_t fd = 0;
      while (cur[tp + fd] == next[tp + fd]) fd++;
      std::string s2 = s3;
      s2.replace(tp + fd + 1, kPage - fd - 1, cur, tp + fd + 1, kPage - fd - 1);
      RecoveryReport rep;
      expect(s2, dummy.recovered(), &rep);
      CHECK(rep.torn_pages_repaired >= 1);
      torn_repairs += static_cast<int>(rep.torn_pages_repaired);
      expect(s3, dummy.recovered());
      std::string s4 = s3;
      s4.replace(0, 8192, next, 0, 8192);
      expect(s4, dummy.recovered());
    }
    cur = std::move(next);
  }
  CHECK(checkpoint_commits >= 2);
  CHECK(torn_repairs >= 2);
}

TEST_CASE("table: moving entries come back resident, their slots free") {
  Fix f(64, 32);
  {
    auto t = f.create();
    for (uint64_t b = 0; b < 10; b++) {
      auto s = t->alloc_slot();
      REQUIRE(s.ok());
      must_commit(*t, Tx{TxType::PurgeDone,
                         {{b, Entry{BlockState::Purged, 0, 1, 1, *s, 0}}}});
    }
    for (uint64_t b = 10; b < 20; b++) {
      auto s = t->alloc_slot();
      REQUIRE(s.ok());
      must_commit(*t, Tx{TxType::PurgeBegin,
                         {{b, Entry{BlockState::Moving, 0, 0, 0, *s, 0}}}});
    }
    must_commit(*t, Tx{TxType::PurgeDone,
                       {{20, Entry{BlockState::Purged, kFlagZero, 0, 1, kNoSlot, 0}}}});
    CHECK(t->free_slots() == 12);
  }
  RecoveryReport rep;
  auto t = f.reopen(&rep);
  std::vector<uint64_t> moving, purged;
  for (uint64_t b = 10; b < 20; b++) moving.push_back(b);
  for (uint64_t b = 0; b < 10; b++) purged.push_back(b);
  purged.push_back(20);
  CHECK(rep.moving_to_resident == moving);
  CHECK(rep.purged == purged);
  for (uint64_t b = 10; b < 20; b++) {
    Entry e = t->entry(b);
    CHECK(e.state == BlockState::Resident);
    CHECK(e.disk_slot == kNoSlot);
  }
  CHECK(t->free_slots() == 22);
  std::set<uint64_t> got;
  for (int i = 0; i < 22; i++) {
    auto s = t->alloc_slot();
    REQUIRE(s.ok());
    CHECK(*s >= 10);
    CHECK(*s < 32);
    got.insert(*s);
  }
  CHECK(got.size() == 22);
  auto full = t->alloc_slot();
  REQUIRE(!full.ok());
  CHECK(full.error().code == "disk-full");
  t->release_slot(15);
  auto again = t->alloc_slot();
  REQUIRE(again.ok());
  CHECK(*again == 15);
  t.reset();
  // And the resident state is durable: a second reopen lists none moving.
  auto t2 = f.reopen(&rep);
  CHECK(rep.moving_to_resident.empty());
}

TEST_CASE("table: the journal wraps many times through checkpoints") {
  Fix f(4096, 0, 1 << 20);
  std::mt19937_64 rng(3);
  Model m(f.blocks());
  {
    auto t = f.create();
    for (int i = 0; i < 2500; i++) {
      must_commit(*t, random_tx(rng, m, f.blocks(), 6), &m);
      if (i == 1200) {
        t.reset();
        t = f.reopen();
        REQUIRE_STATE(*t, m.recovered());
        m.e = m.recovered();
      }
    }
    auto st = t->stats();
    INFO("checkpoints " << st.checkpoints << " journal bytes " << st.journal_bytes_written);
    CHECK(st.checkpoints >= 10);
    CHECK(st.journal_bytes_written > 5 * f.p.journal_bytes);
    REQUIRE_STATE(*t, m.e);
  }
  RecoveryReport rep;
  auto t = f.reopen(&rep);
  REQUIRE_STATE(*t, m.recovered());
  CHECK(rep.commits_replayed > 0);
}

TEST_CASE("table: a torn table page is repaired from its image, or reported") {
  Fix f(1024);
  Model m(f.blocks());
  std::mt19937_64 rng(5);
  {
    auto t = f.create();
    // Blocks of pages 1 and 3 only (64 entries per page).
    for (int i = 0; i < 40; i++) {
      uint64_t b = (i % 2 ? 64 : 192) + rng() % 64;
      Entry e{BlockState::Purged, 0, static_cast<uint32_t>(i), 1, b, 0};
      must_commit(*t, Tx{TxType::PurgeDone, {{b, e}}}, &m);
    }
    REQUIRE(t->checkpoint().ok());
    CHECK(t->stats().checkpoints == 1);
  }
  std::string pristine = read_file(f.p.vbt_path);
  auto garble = [&](std::string& img, uint64_t off, uint64_t len) {
    for (uint64_t i = 0; i < len; i++) img[off + i] = static_cast<char>(rng());
  };
  const uint64_t page1 = 8192 + 1 * kPage, page3 = 8192 + 3 * kPage;

  SECTION("half a page garbled after the checkpoint: repaired") {
    std::string img = pristine;
    garble(img, page1 + 1000, 2048);
    write_file(f.p.vbt_path, img);
    RecoveryReport rep;
    auto t = f.reopen(&rep);
    CHECK(rep.torn_pages_repaired == 1);
    CHECK(rep.bad_entries.empty());
    REQUIRE_STATE(*t, m.e);
    t.reset();
    // The repair is durable: the page was rewritten in place.
    std::string after = read_file(f.p.vbt_path);
    CHECK(after.compare(page1, kPage, pristine, page1, kPage) == 0);
  }
  SECTION("a page no commit ever touched: bad_entries, the table refused") {
    std::string img = pristine;
    const uint64_t page5 = 8192 + 5 * kPage;
    garble(img, page5 + 100, 2000);  // bytes of entries 1 .. 32: blocks 321 .. 352
    write_file(f.p.vbt_path, img);
    RecoveryReport rep;
    auto r = f.open(&rep);
    REQUIRE(!r.ok());
    CHECK(r.error().code == "bad-entries");
    REQUIRE(!rep.bad_entries.empty());
    for (uint64_t b : rep.bad_entries) {
      CHECK(b >= 321);
      CHECK(b <= 352);
    }
    CHECK(std::find(rep.bad_entries.begin(), rep.bad_entries.end(), 330) !=
          rep.bad_entries.end());
    // open() wrote nothing: the file is as it was.
    CHECK(read_file(f.p.vbt_path) == img);
  }
  SECTION("image lost too: committed entries come back from their commits") {
    std::string img = pristine;
    garble(img, page3, kPage);
    int broken = 0;
    for (auto& r : scan_journal(img, f.jo(), f.p.journal_bytes))
      if (r.kind == 2 &&
          std::find(r.pages.begin(), r.pages.end(), 3) != r.pages.end()) {
        img[f.jo() + r.pos + 200] ^= 1;
        broken++;
      }
    CHECK(broken == 1);
    write_file(f.p.vbt_path, img);
    RecoveryReport rep;
    auto r = f.open(&rep);
    REQUIRE(!r.ok());
    CHECK(r.error().code == "bad-entries");
    std::vector<uint64_t> want;
    for (uint64_t b = 192; b < 256; b++)
      if (m.e[b].commit_id == 0) want.push_back(b);
    CHECK(rep.bad_entries == want);
  }
}

TEST_CASE("table: refuses bad files with the documented codes") {
  Fix f(128, 16);
  Model m(f.blocks());
  std::mt19937_64 rng(9);
  int backend = ::open((f.dir / "backend").c_str(), O_RDWR | O_CREAT, 0600);
  REQUIRE(backend >= 0);
  REQUIRE(::ftruncate(backend, static_cast<off_t>(f.p.backend_size)) == 0);
  {
    auto t = f.create(backend);
    for (int i = 0; i < 10; i++) must_commit(*t, random_tx(rng, m, 16, 3), &m);
  }
  const std::string vbt = read_file(f.p.vbt_path), vbd = read_file(f.p.vbd_path);
  auto restore = [&] {
    write_file(f.p.vbt_path, vbt);
    write_file(f.p.vbd_path, vbd);
  };
  auto with_vbt = [&](const std::string& img) {
    write_file(f.p.vbt_path, img);
    auto r = f.open(nullptr, -1);
    std::string c = code_of(r);
    restore();
    return c;
  };
  unsigned char xattr_before[24];
  REQUIRE(::fgetxattr(backend, "user.kvmx.virtblock", xattr_before, 24) == 24);

  SECTION("a good open with the backend bumps the epoch in xattr and superblock") {
    auto r = f.open(nullptr, backend);
    REQUIRE(r.ok());
    CHECK((*r)->epoch() == 2);
    unsigned char x[24];
    REQUIRE(::fgetxattr(backend, "user.kvmx.virtblock", x, 24) == 24);
    CHECK(std::memcmp(x, (*r)->uuid(), 16) == 0);
    CHECK(le(std::string(reinterpret_cast<char*>(x), 24), 16, 8) == 2);
    r->reset();
    std::string now = read_file(f.p.vbt_path);
    CHECK(le(now, current_copy(now) * kPage + 56, 8) == 2);
    // The backend restored from before that attach: refused.
    REQUIRE(::fsetxattr(backend, "user.kvmx.virtblock", xattr_before, 24, 0) == 0);
    auto old = f.open(nullptr, backend);
    CHECK(code_of(old) == "xattr-mismatch");
  }
  SECTION("magic") {
    std::string img = vbt;
    img[0] = 'X';
    img[kPage] = 'X';
    CHECK(with_vbt(img) == "bad-magic");
    std::string d = vbd;
    d[1] = 'x';
    write_file(f.p.vbd_path, d);
    CHECK(code_of(f.open()) == "bad-magic");
    restore();
  }
  SECTION("both superblock crcs") {
    std::string img = vbt;
    img[200] ^= 1;
    img[kPage + 200] ^= 1;
    CHECK(with_vbt(img) == "bad-superblock");
    // One damaged copy: the other one serves.
    img = vbt;
    img[current_copy(img) * kPage + 300] ^= 1;
    CHECK(with_vbt(img) == "ok");
  }
  SECTION("major version, and a higher minor is accepted") {
    std::string img = vbt;
    size_t c = current_copy(img);
    put_le(img, c * kPage + 8, 2, 2);
    reseal_superblock(img, c);
    CHECK(with_vbt(img) == "bad-version");
    img = vbt;
    put_le(img, c * kPage + 10, 7, 2);
    reseal_superblock(img, c);
    CHECK(with_vbt(img) == "ok");
  }
  SECTION("unknown incompat bit; unknown compat bits are ignored") {
    std::string img = vbt;
    size_t c = current_copy(img);
    put_le(img, c * kPage + 12, 4, 4);
    reseal_superblock(img, c);
    CHECK(with_vbt(img) == "bad-incompat");
    img = vbt;
    put_le(img, c * kPage + 16, 0x80, 4);
    reseal_superblock(img, c);
    CHECK(with_vbt(img) == "ok");
  }
  SECTION("superblock fields that do not add up") {
    struct {
      size_t off;
      int bytes;
      uint64_t value;
    } cases[] = {{20, 4, 11}, {20, 4, 13}, {24, 8, 129}, {24, 8, uint64_t{1} << 60},
                 {64, 8, 4096}, {72, 8, 12288}, {80, 8, 4096}, {80, 8, (1 << 20) + 1},
                 {88, 8, 1000}, {96, 8, 0}, {112, 8, 0}, {112, 8, 17}};
    for (auto& k : cases) {
      std::string img = vbt;
      size_t c = current_copy(img);
      put_le(img, c * kPage + k.off, k.value, k.bytes);
      reseal_superblock(img, c);
      INFO("field at " << k.off << " = " << k.value);
      std::string code = with_vbt(img);
      CHECK((code == "bad-superblock" || code == "size-mismatch"));
    }
  }
  SECTION("uuid mismatch between .vbt and .vbd") {
    TableParams q = f.p;
    q.vbt_path = f.dir / "other.vbt";
    q.vbd_path = f.dir / "other.vbd";
    REQUIRE(Table::create(q, -1).ok());
    auto r = Table::open(f.p.vbt_path, q.vbd_path, -1, f.p.backend_size, nullptr);
    CHECK(code_of(r) == "uuid-mismatch");
  }
  SECTION("backend size mismatch") {
    auto r = Table::open(f.p.vbt_path, f.p.vbd_path, -1, f.p.backend_size + 4096, nullptr);
    CHECK(code_of(r) == "size-mismatch");
    r = Table::open(f.p.vbt_path, f.p.vbd_path, -1, f.p.backend_size - 1, nullptr);
    CHECK(code_of(r) == "size-mismatch");
  }
  SECTION("xattr mismatch") {
    int other = ::open((f.dir / "other-backend").c_str(), O_RDWR | O_CREAT, 0600);
    REQUIRE(other >= 0);
    CHECK(code_of(f.open(nullptr, other)) == "xattr-mismatch");  // none
    unsigned char x[24];
    std::memcpy(x, xattr_before, 24);
    x[3] ^= 1;
    REQUIRE(::fsetxattr(other, "user.kvmx.virtblock", x, 24, 0) == 0);
    CHECK(code_of(f.open(nullptr, other)) == "xattr-mismatch");  // uuid
    REQUIRE(::fsetxattr(other, "user.kvmx.virtblock", xattr_before, 20, 0) == 0);
    CHECK(code_of(f.open(nullptr, other)) == "xattr-mismatch");  // length
    std::memcpy(x, xattr_before, 24);
    x[16] = 9;
    REQUIRE(::fsetxattr(other, "user.kvmx.virtblock", x, 24, 0) == 0);
    CHECK(code_of(f.open(nullptr, other)) == "xattr-mismatch");  // epoch
    // epoch + 1 (a crash between the xattr and the superblock): accepted.
    std::memcpy(x, xattr_before, 24);
    x[16] = 2;
    REQUIRE(::fsetxattr(other, "user.kvmx.virtblock", x, 24, 0) == 0);
    CHECK(code_of(f.open(nullptr, other)) == "ok");
    ::close(other);
  }
  SECTION("truncated files") {
    for (uint64_t n : {uint64_t{0}, uint64_t{100}, uint64_t{4096}, uint64_t{8192},
                       uint64_t{10000}, f.jo(), vbt.size() - kPage, vbt.size() - 1}) {
      INFO("vbt cut to " << n);
      std::string code = with_vbt(vbt.substr(0, n));
      if (n == 0) CHECK(code == "bad-magic");
      else if (n < 4096) CHECK(code == "bad-superblock");  // magic, no crc
      else CHECK(code == "size-mismatch");  // a valid copy A, too short
    }
    for (uint64_t n : {uint64_t{0}, uint64_t{4095}, uint64_t{4096}, vbd.size() - 1}) {
      INFO("vbd cut to " << n);
      write_file(f.p.vbd_path, vbd.substr(0, n));
      std::string code = code_of(f.open());
      if (n == 0) CHECK(code == "bad-magic");
      else if (n < 4096) CHECK(code == "bad-superblock");  // header crc
      else CHECK(code == "size-mismatch");
      restore();
    }
  }
  ::close(backend);
}

TEST_CASE("table: hostile mutations give an error or a consistent table") {
  Fix f(512, 0, 1 << 20);
  Model m(f.blocks());
  std::mt19937_64 rng(11);
  {
    auto t = f.create();
    for (int i = 0; i < 30; i++) must_commit(*t, random_tx(rng, m, f.blocks(), 4), &m);
    REQUIRE(t->checkpoint().ok());
    for (int i = 0; i < 30; i++) must_commit(*t, random_tx(rng, m, f.blocks(), 4), &m);
  }
  const std::string good = read_file(f.p.vbt_path);
  const uint64_t jo = f.jo(), jb = f.p.journal_bytes;
  const auto recs = scan_journal(good, jo, jb);
  REQUIRE(recs.size() >= 50);
  const std::string x = f.dir / "m.vbt";
  int errors = 0, oks = 0;
  std::map<std::string, int> codes;
  for (int it = 0; it < 400; it++) {
    std::string img = good;
    int kind = static_cast<int>(rng() % 7);
    switch (kind) {
      case 0:  // random bytes in the superblocks and table
        for (int k = 0; k < 1 + static_cast<int>(rng() % 8); k++)
          img[rng() % jo] = static_cast<char>(rng());
        break;
      case 1: {  // a journal page of garbage
        uint64_t o = jo + (rng() % (jb / kPage)) * kPage;
        for (uint64_t i = 0; i < kPage; i++) img[o + i] = static_cast<char>(rng());
        break;
      }
      case 2: {  // a superblock field, crc fixed
        size_t c = rng() % 2;
        size_t off = 8 + (rng() % 15) * 8;
        uint64_t v = rng() % 2 ? rng() : rng() % 4096;
        put_le(img, c * kPage + off, v, 8);
        reseal_superblock(img, c);
        break;
      }
      case 3: {  // a record field, crc fixed
        const RecLoc& r = recs[rng() % recs.size()];
        size_t o = jo + r.pos;
        size_t fields[] = {8, 32, 36, 40, 44, 64, 72, 76, 80, 88, 100};
        size_t off = fields[rng() % 11];
        put_le(img, o + off, rng() % 2 ? rng() : rng() % 300, 4);
        put_le(img, o + 60, crc_zeroed(img, o, r.bytes, o + 60), 4);
        break;
      }
      case 4:  // truncation
        img.resize(rng() % img.size());
        break;
      case 5: {  // a table entry changed with its crc fixed
        uint64_t b = rng() % f.blocks();
        size_t o = 8192 + b * 64;
        img[o + rng() % 32] = static_cast<char>(rng());
        unsigned char idx[8];
        for (int i = 0; i < 8; i++) idx[i] = static_cast<unsigned char>(b >> (8 * i));
        put_le(img, o + 60, crc_zeroed(img, o, 64, o + 60, crc32c(idx, 8)), 4);
        break;
      }
      default:  // random bytes anywhere
        for (int k = 0; k < 1 + static_cast<int>(rng() % 32); k++)
          img[rng() % img.size()] = static_cast<char>(rng());
    }
    write_file(x, img);
    RecoveryReport rep;
    auto r = f.open(&rep, -1, x);
    if (!r.ok()) {
      errors++;
      codes[r.error().code]++;
      CHECK(!r.error().code.empty());
      continue;
    }
    oks++;
    Table& t = **r;
    int bad = 0;
    std::set<uint64_t> slots;
    for (uint64_t b = 0; b < t.block_count(); b++) {
      Entry e = t.entry(b);
      if (e.state == BlockState::Moving) bad++;
      if (e.state == BlockState::Resident && e.disk_slot != kNoSlot) bad++;
      if (e.state == BlockState::Purged && !(e.flags & kFlagZero)) {
        if (e.disk_slot >= t.disk_slots() || !slots.insert(e.disk_slot).second) bad++;
      }
      if (static_cast<int>(e.state) < 1 || static_cast<int>(e.state) > 3) bad++;
    }
    CHECK(bad == 0);
    // What it recovered stays: a second open agrees and commits work.
    r->reset();
    auto again = f.open(nullptr, -1, x);
    REQUIRE(again.ok());
    uint64_t b = rng() % (*again)->block_count();
    CHECK((*again)->commit(Tx{TxType::Cancel, {{b, Entry{}}}}).ok());
  }
  INFO("errors " << errors << " oks " << oks);
  CHECK(errors > 20);
  CHECK(oks > 20);
  // Garbage that was never a table.
  for (int i = 0; i < 5; i++) {
    std::string g(good.size(), '\0');
    for (auto& c : g) c = static_cast<char>(rng());
    write_file(x, g);
    CHECK(code_of(f.open(nullptr, -1, x)) == "bad-magic");
  }
}

TEST_CASE("table: data_crc is seeded with table, block and generation") {
  Fix f(16);
  auto t = f.create();
  std::string data(4096, 'a');
  uint32_t base = t->data_crc(3, 1, data.data(), data.size());
  CHECK(t->data_crc(3, 1, data.data(), data.size()) == base);
  CHECK(t->data_crc(4, 1, data.data(), data.size()) != base);
  CHECK(t->data_crc(3, 2, data.data(), data.size()) != base);
  data[100] = 'b';
  CHECK(t->data_crc(3, 1, data.data(), data.size()) != base);
  data[100] = 'a';
  // Another table (another uuid) gives another crc for the same block.
  Fix g(16);
  auto u = g.create();
  CHECK(u->data_crc(3, 1, data.data(), data.size()) != base);
  // By the spec: CRC32C over uuid, le64 block, le64 generation, data.
  std::string seed(reinterpret_cast<const char*>(t->uuid()), 16);
  seed += std::string("\3\0\0\0\0\0\0\0\1\0\0\0\0\0\0\0", 16);
  CHECK(crc32c(data.data(), data.size(), crc32c(seed.data(), seed.size())) == base);
}

TEST_CASE("table: slots run out with disk-full") {
  Fix f(16, 5);
  auto t = f.create();
  std::set<uint64_t> got;
  for (int i = 0; i < 5; i++) {
    auto s = t->alloc_slot();
    REQUIRE(s.ok());
    got.insert(*s);
  }
  CHECK(got == std::set<uint64_t>{0, 1, 2, 3, 4});
  CHECK(t->free_slots() == 0);
  auto r = t->alloc_slot();
  REQUIRE(!r.ok());
  CHECK(r.error().code == "disk-full");
  t->release_slot(2);
  t->release_slot(2);
  t->release_slot(99);
  CHECK(t->free_slots() == 1);
  auto s = t->alloc_slot();
  REQUIRE(s.ok());
  CHECK(*s == 2);
  CHECK(t->alloc_slot().error().code == "disk-full");
}

TEST_CASE("table: a failed sync is never reported durable, the table then refuses") {
  Fix f(64);
  auto t = f.create();
  Entry mov{BlockState::Moving, 0, 0, 0, 1, 0};
  must_commit(*t, Tx{TxType::PurgeBegin, {{1, mov}}});
  t->set_sync_hook_for_test([] { return EIO; });
  Entry mov2{BlockState::Moving, 0, 0, 0, 2, 0};
  auto r = t->commit(Tx{TxType::PurgeBegin, {{2, mov2}}});
  REQUIRE(!r.ok());
  CHECK(r.error().code == "journal-sync");
  CHECK(r.error().err == EIO);
  CHECK(t->entry(2).state == BlockState::Resident);  // not applied
  t->set_sync_hook_for_test(nullptr);
  auto r2 = t->commit(Tx{TxType::PurgeBegin, {{3, Entry{BlockState::Moving, 0, 0, 0, 3, 0}}}});
  REQUIRE(!r2.ok());
  CHECK(r2.error().code == "table-broken");
  CHECK(t->checkpoint().error().code == "table-broken");
}

TEST_CASE("table: a checkpoint larger than the free journal goes in rounds") {
  // 300 table pages with a moving entry each: recovery turns them resident,
  // and the checkpoint of 300 page images cannot fit in a 1 MiB journal at
  // once.
  Fix f(300 * 64, 0, 1 << 20);
  {
    auto t = f.create();
    for (uint64_t k = 0; k < 15; k++) {
      Tx tx{TxType::PurgeBegin, {}};
      for (uint64_t i = 0; i < 20; i++) {
        uint64_t b = (k * 20 + i) * 64;
        tx.ops.push_back(Op{b, Entry{BlockState::Moving, 0, 0, 0, b, 0}});
      }
      must_commit(*t, std::move(tx));
    }
  }
  RecoveryReport rep;
  {
    auto t = f.reopen(&rep);
    CHECK(rep.moving_to_resident.size() == 300);
    CHECK(t->stats().checkpoints == 1);
    CHECK(t->stats().journal_bytes_written > f.p.journal_bytes);
  }
  std::string img = read_file(f.p.vbt_path);
  CHECK(le(img, current_copy(img) * kPage + 120, 8) > 0);  // repair_min_id
  {
    auto t = f.reopen(&rep);
    CHECK(rep.moving_to_resident.empty());
    CHECK(rep.torn_pages_repaired == 0);
    int wrong = 0;
    for (uint64_t b = 0; b < t->block_count(); b++) {
      Entry e = t->entry(b);
      if (e.state != BlockState::Resident || e.disk_slot != kNoSlot) wrong++;
    }
    CHECK(wrong == 0);
  }
  // A page of the first round garbled later: its image was overwritten by
  // the next round, an older image must not be trusted.
  img = read_file(f.p.vbt_path);
  for (uint64_t i = 0; i < kPage; i++) img[8192 + i] = static_cast<char>(i * 7 + 1);
  write_file(f.p.vbt_path, img);
  auto r = f.open(&rep);
  if (r.ok()) {
    for (uint64_t b = 0; b < 64; b++) CHECK((*r)->entry(b).state == BlockState::Resident);
  } else {
    CHECK(r.error().code == "bad-entries");
    CHECK(!rep.bad_entries.empty());
  }
}
