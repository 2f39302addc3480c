#include <catch2/catch_test_macros.hpp>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <vector>

#include "common/crc32.h"
#include "journal/journal.h"
#include "test_helpers.h"

using nlohmann::json;
using kvmx::journal::Journal;
using kvmx::journal::ReplayStats;
using kvmx::test::TempDir;

namespace {

std::vector<json> replay_all(const std::string& path, ReplayStats* st,
                             std::unique_ptr<Journal>* keep = nullptr) {
  std::vector<json> out;
  auto j = Journal::open(path, [&](const json& r) { out.push_back(r); }, st);
  REQUIRE(j.ok());
  if (keep) *keep = std::move(*j);
  return out;
}

json rec(int n) { return json{{"t", "test"}, {"n", n}}; }

}  // namespace

TEST_CASE("journal: records round-trip across reopen") {
  TempDir dir;
  std::string path = dir / "journal";
  {
    ReplayStats st;
    auto fresh = replay_all(path, &st);
    CHECK(fresh.empty());
  }
  {
    auto j = Journal::open(path, [](const json&) {}, nullptr);
    REQUIRE(j.ok());
    for (int i = 0; i < 3; i++) REQUIRE((*j)->append(rec(i)).ok());
    REQUIRE((*j)->sync().ok());
    CHECK((*j)->records() == 5);  // two header copies + 3
  }
  ReplayStats st;
  auto got = replay_all(path, &st);
  REQUIRE(got.size() == 3);
  for (int i = 0; i < 3; i++) CHECK(got[static_cast<size_t>(i)]["n"] == i);
  CHECK(st.records == 5);
  CHECK(st.corrupt == 0);
  CHECK(st.torn_bytes == 0);
}

TEST_CASE("journal: each record is '<crc32> <json>' on its own line") {
  std::string line = kvmx::journal::encode(json{{"t", "x"}});
  REQUIRE(line.back() == '\n');
  REQUIRE(line.size() > 10);
  CHECK(line[8] == ' ');
  auto back = kvmx::journal::decode(line.substr(0, line.size() - 1));
  REQUIRE(back.ok());
  CHECK((*back)["t"] == "x");
  std::string bad = line.substr(0, line.size() - 1);
  bad[bad.size() - 3] ^= 1;
  CHECK(!kvmx::journal::decode(bad).ok());
  CHECK(!kvmx::journal::decode("zzzzzzzz {}").ok());
  CHECK(!kvmx::journal::decode("short").ok());
}

TEST_CASE("journal: a torn last record is cut off and appends continue") {
  TempDir dir;
  std::string path = dir / "journal";
  {
    auto j = Journal::open(path, [](const json&) {}, nullptr);
    REQUIRE(j.ok());
    REQUIRE((*j)->append(rec(1)).ok());
    REQUIRE((*j)->append(rec(2)).ok());
    REQUIRE((*j)->sync().ok());
  }
  std::string whole = kvmx::test::read_file(path);
  std::string torn = kvmx::journal::encode(rec(3));
  torn.resize(torn.size() / 2);  // a write cut short by a crash
  kvmx::test::append_file(path, torn);

  ReplayStats st;
  std::unique_ptr<Journal> j;
  auto got = replay_all(path, &st, &j);
  CHECK(got.size() == 2);
  CHECK(st.torn_bytes == torn.size());
  CHECK(st.corrupt == 0);
  CHECK(kvmx::test::read_file(path) == whole);  // cut back exactly

  REQUIRE(j->append(rec(4)).ok());
  REQUIRE(j->sync().ok());
  j.reset();
  got = replay_all(path, &st);
  REQUIRE(got.size() == 3);
  CHECK(got[2]["n"] == 4);
  CHECK(st.torn_bytes == 0);
}

TEST_CASE("journal: zeros after the last record (crash after extend) are torn") {
  TempDir dir;
  std::string path = dir / "journal";
  {
    auto j = Journal::open(path, [](const json&) {}, nullptr);
    REQUIRE(j.ok());
    REQUIRE((*j)->append(rec(1)).ok());
  }
  kvmx::test::append_file(path, std::string(4096, '\0'));
  ReplayStats st;
  auto got = replay_all(path, &st);
  CHECK(got.size() == 1);
  CHECK(st.torn_bytes == 4096);
}

TEST_CASE("journal: a corrupted record is skipped and counted") {
  TempDir dir;
  std::string path = dir / "journal";
  {
    auto j = Journal::open(path, [](const json&) {}, nullptr);
    REQUIRE(j.ok());
    for (int i = 0; i < 3; i++) REQUIRE((*j)->append(rec(i)).ok());
  }
  std::string data = kvmx::test::read_file(path);
  // Flip one bit inside the second test record (fourth line).
  size_t line = 0;
  for (int i = 0; i < 3; i++) line = data.find('\n', line) + 1;
  data[line + 15] ^= 0x01;
  kvmx::test::write_file(path, data);

  ReplayStats st;
  auto got = replay_all(path, &st);
  REQUIRE(got.size() == 2);
  CHECK(got[0]["n"] == 0);
  CHECK(got[1]["n"] == 2);
  CHECK(st.corrupt == 1);
}

TEST_CASE("journal: an over-long line is corrupt, not a memory hog") {
  TempDir dir;
  std::string path = dir / "journal";
  {
    auto j = Journal::open(path, [](const json&) {}, nullptr);
    REQUIRE(j.ok());
    REQUIRE((*j)->append(rec(1)).ok());
  }
  kvmx::test::append_file(
      path, std::string(kvmx::journal::kMaxRecordBytes + 10, 'x') + "\n");
  kvmx::test::append_file(path, kvmx::journal::encode(rec(2)));
  ReplayStats st;
  auto got = replay_all(path, &st);
  REQUIRE(got.size() == 2);
  CHECK(got[1]["n"] == 2);
  CHECK(st.corrupt == 1);
}

TEST_CASE("journal: compaction replaces the file atomically") {
  TempDir dir;
  std::string path = dir / "journal";
  auto j = Journal::open(path, [](const json&) {}, nullptr);
  REQUIRE(j.ok());
  for (int i = 0; i < 100; i++) REQUIRE((*j)->append(rec(i)).ok());
  uint64_t before = (*j)->size_bytes();
  REQUIRE((*j)->rewrite({rec(98), rec(99)}).ok());
  CHECK((*j)->size_bytes() < before);
  CHECK((*j)->records() == 4);
  CHECK(!std::filesystem::exists(path + ".tmp"));
  // Appends after compaction go to the new file.
  REQUIRE((*j)->append(rec(100)).ok());
  REQUIRE((*j)->sync().ok());
  j = Journal::open(path, [](const json&) {}, nullptr);  // close the old one

  ReplayStats st;
  auto got = replay_all(path, &st);
  REQUIRE(got.size() == 3);
  CHECK(got[0]["n"] == 98);
  CHECK(got[2]["n"] == 100);
  CHECK(kvmx::test::read_file(path).size() == (*j)->size_bytes());
}

TEST_CASE("journal: a file that is not a journal is refused, not clobbered") {
  TempDir dir;
  std::string path = dir / "journal";
  kvmx::test::write_file(path, "hello\nworld\n");
  auto j = Journal::open(path, [](const json&) {}, nullptr);
  REQUIRE(!j.ok());
  CHECK(j.error().code == "journal-format");
  CHECK(kvmx::test::read_file(path) == "hello\nworld\n");

  // Valid records, but not ours.
  kvmx::test::write_file(path, kvmx::journal::encode(json{{"t", "other"}}));
  j = Journal::open(path, [](const json&) {}, nullptr);
  REQUIRE(!j.ok());
  CHECK(j.error().code == "journal-format");

  // A future version.
  kvmx::test::write_file(
      path, kvmx::journal::encode(json{{"t", "header"},
                                       {"format", "kvmx-hostd-journal"},
                                       {"version", 99}}));
  j = Journal::open(path, [](const json&) {}, nullptr);
  REQUIRE(!j.ok());
}

TEST_CASE("journal: a crash while creating it (torn header) starts over") {
  TempDir dir;
  std::string path = dir / "journal";
  std::string header = kvmx::journal::encode(
      json{{"t", "header"}, {"format", "kvmx-hostd-journal"}, {"version", 1}});
  kvmx::test::write_file(path, header.substr(0, 10));
  ReplayStats st;
  auto got = replay_all(path, &st);
  CHECK(got.empty());
  CHECK(st.torn_bytes == 10);
  CHECK(kvmx::test::read_file(path) == header + header);
}

TEST_CASE("journal: a bit flip in the header loses nothing (two copies)") {
  TempDir dir;
  std::string path = dir / "journal";
  {
    auto j = Journal::open(path, [](const json&) {}, nullptr);
    REQUIRE(j.ok());
    for (int i = 0; i < 3; i++) REQUIRE((*j)->append(rec(i)).ok());
  }
  std::string data = kvmx::test::read_file(path);
  for (size_t bit : {size_t{3}, size_t{20}, size_t{40}}) {
    std::string flipped = data;
    flipped[bit] ^= 0x04;  // in the first header copy
    kvmx::test::write_file(path, flipped);
    ReplayStats st;
    auto got = replay_all(path, &st);
    REQUIRE(got.size() == 3);
    CHECK(st.corrupt == 1);
    for (int i = 0; i < 3; i++) CHECK(got[static_cast<size_t>(i)]["n"] == i);
  }
}

TEST_CASE("journal: an old one-header journal with a damaged header says how to recover") {
  TempDir dir;
  std::string path = dir / "journal";
  std::string hdr = kvmx::journal::encode(kvmx::journal::header_record());
  std::string body = kvmx::journal::encode(json{{"t", "attach"}, {"vm", "a"},
                                                {"qmp", "/q"}}) +
                     kvmx::journal::encode(json{{"t", "detach"}, {"vm", "a"}});
  std::string damaged = hdr;
  damaged[12] ^= 0x01;
  kvmx::test::write_file(path, damaged + body);
  auto j = Journal::open(path, [](const json&) {}, nullptr);
  REQUIRE(!j.ok());
  CHECK(j.error().code == "journal-format");
  CHECK(kvmx::test::read_file(path) == damaged + body);  // left alone
  // The message's command works as given.
  const std::string& msg = j.error().message;
  auto at = msg.find("run: ");
  REQUIRE(at != std::string::npos);
  std::string cmd = msg.substr(at + 5, msg.find(" (hostd") - at - 5);
  CHECK(cmd.rfind("sed -i '1i ", 0) == 0);
  REQUIRE(std::system(cmd.c_str()) == 0);
  ReplayStats st;
  auto got = replay_all(path, &st);
  REQUIRE(got.size() == 2);
  CHECK(got[0]["t"] == "attach");
  CHECK(st.corrupt == 1);
  // Not every damaged file is a journal: other files stay refused plainly.
  kvmx::test::write_file(path, damaged + kvmx::journal::encode(json{{"t", "x"}}));
  j = Journal::open(path, [](const json&) {}, nullptr);
  REQUIRE(!j.ok());
  CHECK(j.error().message.find("is not a kvmx-hostd journal") != std::string::npos);
}

TEST_CASE("journal: records nested deeper than a record can be are corrupt") {
  std::string deep = "{\"t\":\"x\",\"a\":" + std::string(20000, '[') +
                     std::string(20000, ']') + "}";
  char crc[16];
  std::snprintf(crc, sizeof(crc), "%08x ", kvmx::crc32(deep));
  auto r = kvmx::journal::decode(std::string(crc) + deep);
  REQUIRE(!r.ok());
  CHECK(r.error().code == "journal-corrupt");
}

TEST_CASE("journal: compaction in steps keeps what was appended meanwhile") {
  TempDir dir;
  std::string path = dir / "journal";
  auto j = Journal::open(path, [](const json&) {}, nullptr);
  REQUIRE(j.ok());
  for (int i = 0; i < 50; i++) REQUIRE((*j)->append(rec(i)).ok());
  REQUIRE((*j)->sync().ok());
  auto rw = (*j)->begin_rewrite();
  // Written while the snapshot is made (on another thread in hostd).
  REQUIRE((*j)->append(rec(100)).ok());
  REQUIRE(Journal::write_rewrite(rw, {rec(48), rec(49)}).ok());
  REQUIRE((*j)->append(rec(101)).ok());
  REQUIRE((*j)->finish_rewrite(rw).ok());
  CHECK((*j)->records() == 6);  // 2 headers, 2 snapshot, 2 tail
  REQUIRE((*j)->append(rec(102)).ok());
  REQUIRE((*j)->sync().ok());
  CHECK(kvmx::test::read_file(path).size() == (*j)->size_bytes());
  ReplayStats st;
  auto got = replay_all(path, &st);
  std::vector<int> ns;
  for (auto& g : got) ns.push_back(g["n"]);
  CHECK(ns == std::vector<int>{48, 49, 100, 101, 102});
  CHECK(st.corrupt == 0);
}

TEST_CASE("journal: a failed compaction leaves the journal as it was") {
  TempDir dir;
  std::string path = dir / "journal";
  auto j = Journal::open(path, [](const json&) {}, nullptr);
  REQUIRE(j.ok());
  REQUIRE((*j)->append(rec(1)).ok());
  REQUIRE((*j)->sync().ok());
  std::string before = kvmx::test::read_file(path);
  // The temporary file cannot be created: a directory is in the way.
  std::filesystem::create_directory(path + ".tmp");
  CHECK(!(*j)->rewrite({rec(9)}).ok());
  std::filesystem::remove(path + ".tmp");
  CHECK(kvmx::test::read_file(path) == before);
  REQUIRE((*j)->append(rec(2)).ok());
  REQUIRE((*j)->sync().ok());
  ReplayStats st;
  CHECK(replay_all(path, &st).size() == 2);
}
