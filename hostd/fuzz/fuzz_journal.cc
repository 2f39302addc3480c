// libFuzzer target: journal replay into a violation store, then the
// compaction round trip: the store's snapshot is rewritten as a journal
// and replayed again, and must give the same store (violations, totals,
// next seq).  The input is the journal file's bytes.
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "common/json_util.h"
#include "journal/journal.h"
#include "violations/store.h"

using namespace kvmx;
using nlohmann::json;

namespace {

std::string scratch_dir() {
  static std::string dir = [] {
    const char* base = std::getenv("TMPDIR");
    std::string tmpl = std::string(base ? base : "/tmp") + "/fuzz-journal-XXXXXX";
    char* p = ::mkdtemp(tmpl.data());
    if (!p) std::abort();
    return std::string(p);
  }();
  return dir;
}

void write_file(const std::string& path, const uint8_t* data, size_t size) {
  FILE* f = std::fopen(path.c_str(), "wb");
  if (!f) std::abort();
  if (size && std::fwrite(data, 1, size, f) != size) std::abort();
  std::fclose(f);
}

// What must survive a round trip.
std::string fingerprint(const violations::Store& s) {
  std::string out = std::to_string(s.next_seq()) + "|";
  violations::Store::Query q;
  q.limit = violations::Store::kMaxQueryLimit;
  for (;;) {
    auto page = s.query(q);
    for (const auto* v : page.items) {
      out += json_dump(violations::to_json(*v));
      auto t = s.totals(v->vm);
      out += std::to_string(t.events) + "/" + std::to_string(t.suppressed) + ";";
      q.since_seq = v->seq;
    }
    if (!page.more) break;
  }
  return out;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string path = scratch_dir() + "/journal";
  ::unlink((path + ".tmp").c_str());
  write_file(path, data, size);

  violations::Store first(64);
  journal::ReplayStats st;
  auto j = journal::Journal::open(
      path, [&](const json& rec) { (void)first.replay(rec); }, &st);
  if (!j) return 0;  // refused (not a journal): fine, nothing else to check

  // Rewrite from the store, as compaction does, then replay that.
  if (auto r = (*j)->rewrite(first.snapshot()); !r) std::abort();
  j->reset();
  violations::Store second(64);
  auto again = journal::Journal::open(
      path, [&](const json& rec) {
        if (!second.replay(rec)) std::abort();  // hostd's own records
      }, &st);
  if (!again) std::abort();
  if (st.corrupt != 0 || st.torn_bytes != 0) std::abort();
  if (fingerprint(first) != fingerprint(second)) std::abort();
  return 0;
}
