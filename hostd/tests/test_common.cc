// Shared pieces: CRC-32, structured log rendering, the event loop, backoff.
#include <fcntl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <catch2/catch_test_macros.hpp>
#include <thread>

#include "common/crash_guard.h"
#include "common/crc32.h"
#include "common/json_util.h"
#include "common/log.h"
#include "common/time_util.h"
#include "journal/journal.h"
#include "loop/event_loop.h"
#include "loop/worker.h"
#include "test_helpers.h"
#include "vm/backoff.h"

using namespace kvmx;
using namespace std::chrono_literals;

namespace {
// Unbounded recursion the compiler cannot turn into a loop (the callee is
// unknown at each call): a stack overflow on purpose.
int recurse(int n);
int (*volatile g_recurse)(int) = recurse;
int recurse(int n) {
  volatile char pad[1024];
  pad[0] = static_cast<char>(n);
  return g_recurse(n + 1) + pad[0];
}
}  // namespace

TEST_CASE("crc32: the standard check value") {
  CHECK(crc32("123456789") == 0xCBF43926u);
  CHECK(crc32("") == 0);
  CHECK(crc32("6789", crc32("12345")) == 0xCBF43926u);
}

TEST_CASE("log: text fields are key=value, quoted when needed") {
  auto s = log::render(log::Format::kText, "VM state changed",
                       {{"vm", "web-1"}, {"n", 3}, {"why", "peer closed it"},
                        {"bad", "a\nb"}});
  CHECK(s == "VM state changed vm=web-1 n=3 why=\"peer closed it\" "
             "bad=\"a\\nb\"");
}

TEST_CASE("log: json payload is object members, reserved keys dropped") {
  auto s = log::render(log::Format::kJson, "hello \"x\"",
                       {{"vm", "a"}, {"n", 1}, {"msg", "dup"},
                        {"raw", std::string("\xff")}});
  auto j = nlohmann::json::parse("{" + s + "}");
  CHECK(j["msg"] == "hello \"x\"");
  CHECK(j["vm"] == "a");
  CHECK(j["n"] == 1);
  CHECK(j.size() == 4);  // msg, vm, n, raw (invalid UTF-8 replaced)
}

TEST_CASE("time: RFC 3339 UTC with microseconds") {
  CHECK(format_utc(0, 0) == "1970-01-01T00:00:00.000000Z");
  CHECK(format_utc(1700000000, 123456) == "2023-11-14T22:13:20.123456Z");
}

TEST_CASE("backoff: doubles up to the cap, resets") {
  vm::Backoff b(100ms, 1000ms);
  CHECK(b.next() == 100ms);
  CHECK(b.next() == 200ms);
  CHECK(b.next() == 400ms);
  CHECK(b.next() == 800ms);
  CHECK(b.next() == 1000ms);
  CHECK(b.next() == 1000ms);
  b.reset();
  CHECK(b.next() == 100ms);
}

TEST_CASE("loop: timers fire in order, cancel works, defer runs after") {
  auto loop = EventLoop::create();
  REQUIRE(loop.ok());
  auto& l = **loop;
  std::vector<int> order;
  l.after(20ms, [&] { order.push_back(2); });
  auto t = l.after(10ms, [&] { order.push_back(99); });
  l.after(5ms, [&] {
    order.push_back(1);
    l.defer([&] { order.push_back(10); });
  });
  l.cancel(t);
  l.after(40ms, [&] { l.stop(7); });
  CHECK(l.run() == 7);
  CHECK(order == std::vector<int>{1, 10, 2});
  CHECK(l.pending_timers() == 0);
}

TEST_CASE("loop: a callback may remove fds, its own included; throws are caught") {
  auto loop = EventLoop::create();
  REQUIRE(loop.ok());
  auto& l = **loop;
  int sv1[2], sv2[2];
  REQUIRE(::socketpair(AF_UNIX, SOCK_STREAM, 0, sv1) == 0);
  REQUIRE(::socketpair(AF_UNIX, SOCK_STREAM, 0, sv2) == 0);
  UniqueFd a0(sv1[0]), a1(sv1[1]), b0(sv2[0]), b1(sv2[1]);
  int calls = 0;
  // Both readable in the same round; whichever runs first removes both.
  auto cb = [&](uint32_t) {
    calls++;
    l.remove(a0.get());
    l.remove(b0.get());
    throw std::runtime_error("handler bug");
  };
  REQUIRE(l.add(a0.get(), EPOLLIN, cb).ok());
  REQUIRE(l.add(b0.get(), EPOLLIN, cb).ok());
  CHECK(!l.add(a0.get(), EPOLLIN, cb).ok());  // already watched
  REQUIRE(::write(a1.get(), "x", 1) == 1);
  REQUIRE(::write(b1.get(), "x", 1) == 1);
  l.after(30ms, [&] { l.stop(); });
  l.run();
  CHECK(calls == 1);
  CHECK(l.watched_fds() == 0);
}

TEST_CASE("loop: round-end hooks run after each round") {
  auto loop = EventLoop::create();
  REQUIRE(loop.ok());
  auto& l = **loop;
  int rounds = 0;
  l.on_round_end([&] { rounds++; });
  l.after(1ms, [] {});
  l.after(20ms, [&] { l.stop(); });
  l.run();
  CHECK(rounds >= 2);
}

TEST_CASE("json: parse_json checks depth and values before building") {
  CHECK(parse_json("[[[]]]", JsonLimits{3, 100}).ok());
  auto r = parse_json("[[[[]]]]", JsonLimits{3, 100});
  REQUIRE(!r.ok());
  CHECK(r.error().code == "json-too-deep");
  // Brackets in strings, escaped quotes included, are text.
  CHECK(parse_json(R"(["[[[[\"[[[["])", JsonLimits{1, 100}).ok());
  r = parse_json("[1,2,3,4,5]", JsonLimits{64, 4});
  REQUIRE(!r.ok());
  CHECK(r.error().code == "json-too-many-values");
  r = parse_json("{\"a\":", {});
  REQUIRE(!r.ok());
  CHECK(r.error().code == "json-parse");
  // Deep enough to overflow the stack in a recursive copy: refused cheaply.
  std::string deep(1 << 20, '[');
  CHECK(parse_json(deep, {}).error().code == "json-too-deep");
}

TEST_CASE("log: RateLimit lets one line through per interval and counts") {
  log::RateLimit rl(1000ms);
  auto t0 = log::RateLimit::Clock::now();
  uint64_t held = 99;
  CHECK(rl.allow(&held, t0));
  CHECK(held == 0);
  for (int i = 0; i < 500; i++) CHECK(!rl.allow(&held, t0 + 10ms));
  CHECK(rl.allow(&held, t0 + 1001ms));
  CHECK(held == 500);
}

TEST_CASE("crash guard: a crash while handling a VM's input quarantines it") {
  test::TempDir dir;
  std::string path = dir / "journal";
  {
    auto j = journal::Journal::open(path, [](const nlohmann::json&) {}, nullptr);
    REQUIRE(j.ok());
  }
  pid_t pid = ::fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    // The child: hostd handling web1's QMP input, and crashing on it by
    // overflowing its stack.
    int fd = ::open(path.c_str(), O_WRONLY | O_APPEND);
    if (fd < 0 || !crash::install().ok()) ::_exit(2);
    crash::set_journal_fd(fd);
    std::string vm = "web1";
    crash::Scope scope(vm);
    ::_exit(g_recurse(1));
  }
  int status = 0;
  REQUIRE(::waitpid(pid, &status, 0) == pid);
  REQUIRE(WIFSIGNALED(status));
  CHECK(WTERMSIG(status) == SIGSEGV);
  std::vector<nlohmann::json> recs;
  auto j = journal::Journal::open(
      path, [&](const nlohmann::json& r) { recs.push_back(r); }, nullptr);
  REQUIRE(j.ok());
  REQUIRE(recs.size() == 1);
  CHECK(recs[0] == nlohmann::json{{"t", "quarantine"}, {"vm", "web1"},
                                  {"reason", "crash"}});
  // Exactly what the journal's own encoder writes.
  CHECK(crash::record_for("web1") ==
        journal::encode(nlohmann::json{{"t", "quarantine"}, {"vm", "web1"},
                                       {"reason", "crash"}}));
}

TEST_CASE("crash guard: outside a VM's input nothing is written") {
  test::TempDir dir;
  std::string path = dir / "journal";
  test::write_file(path, "");
  pid_t pid = ::fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    int fd = ::open(path.c_str(), O_WRONLY | O_APPEND);
    if (fd < 0 || !crash::install().ok()) ::_exit(2);
    crash::set_journal_fd(fd);
    { std::string vm = "web1"; crash::Scope scope(vm); }
    ::abort();
  }
  int status = 0;
  REQUIRE(::waitpid(pid, &status, 0) == pid);
  REQUIRE(WIFSIGNALED(status));
  CHECK(WTERMSIG(status) == SIGABRT);
  CHECK(test::read_file(path).empty());
}

TEST_CASE("worker: the job runs beside the loop, done runs on it") {
  auto loop = std::move(*EventLoop::create());
  Worker w(*loop);
  std::atomic<bool> ran{false};
  bool done = false;
  REQUIRE(w.run([&] {
               std::this_thread::sleep_for(50ms);
               ran = true;
             },
             [&] {
               done = true;
               loop->stop();
             }).ok());
  CHECK(w.busy());
  CHECK(!w.run([] {}, [] {}).ok());
  int ticks = 0;
  std::function<void()> tick = [&] {
    ticks++;
    loop->after(5ms, tick);
  };
  loop->after(5ms, tick);
  loop->after(2000ms, [&] { loop->stop(); });
  loop->run();
  CHECK(ran);
  CHECK(done);
  CHECK(!w.busy());
  CHECK(ticks >= 3);  // the loop kept running while the job slept
}
