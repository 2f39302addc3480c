#include <catch2/catch_test_macros.hpp>
#include <vector>

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
    CHECK((*j)->records() == 4);  // header + 3
  }
  ReplayStats st;
  auto got = replay_all(path, &st);
  REQUIRE(got.size() == 3);
  for (int i = 0; i < 3; i++) CHECK(got[static_cast<size_t>(i)]["n"] == i);
  CHECK(st.records == 4);
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
  // Flip one bit inside the second test record (third line).
  size_t line2 = data.find('\n', data.find('\n') + 1) + 1;
  data[line2 + 15] ^= 0x01;
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
  CHECK((*j)->records() == 3);
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
  CHECK(kvmx::test::read_file(path) == header);
}
