// Shared pieces: CRC-32, structured log rendering, the event loop, backoff.
#include <sys/socket.h>
#include <unistd.h>

#include <catch2/catch_test_macros.hpp>

#include "common/crc32.h"
#include "common/log.h"
#include "common/time_util.h"
#include "loop/event_loop.h"
#include "vm/backoff.h"

using namespace kvmx;
using namespace std::chrono_literals;

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
