// The API: request validation (every malformed case), session framing and
// flow control, and the server's limits over real Unix sockets.
#include <sys/socket.h>
#include <sys/un.h>

#include <atomic>
#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>
#include <cstring>
#include <thread>

#include "api/request.h"
#include "api/server.h"
#include "api/session.h"
#include "test_helpers.h"

using nlohmann::json;
using namespace kvmx;
using namespace kvmx::api;
using Catch::Matchers::ContainsSubstring;

namespace {

std::string err_code(std::string_view line, json* id = nullptr) {
  json local;
  auto r = parse_request(line, id ? id : &local);
  if (r) return "ok";
  return r.error().code;
}

}  // namespace

TEST_CASE("api: valid requests parse into their ops") {
  json id;
  auto r = parse_request(R"({"op":"ping","id":7})", &id);
  REQUIRE(r.ok());
  CHECK(std::holds_alternative<Ping>(r->args));
  CHECK(r->id == 7);
  CHECK(id == 7);

  r = parse_request(R"({"op":"attach","vm":"web-1.a_b","qmp":"/run/q.sock"})",
                    &id);
  REQUIRE(r.ok());
  auto& a = std::get<Attach>(r->args);
  CHECK(a.vm == "web-1.a_b");
  CHECK(a.qmp == "/run/q.sock");
  CHECK(r->id.is_null());

  r = parse_request(R"({"op":"violations"})", &id);
  REQUIRE(r.ok());
  auto& v = std::get<Violations>(r->args);
  CHECK(v.vm.empty());
  CHECK(v.since_seq == 0);
  CHECK(v.limit == kDefaultViolationLimit);

  r = parse_request(
      R"({"op":"violations","vm":"a","since_seq":5,"limit":5000,"id":"x"})",
      &id);
  REQUIRE(r.ok());
  CHECK(std::get<Violations>(r->args).limit == kMaxViolationLimit);  // capped
  CHECK(std::get<Violations>(r->args).since_seq == 5);
  CHECK(std::get<Violations>(r->args).vm == "a");

  for (auto op : {"version", "list-vms", "stats", "subscribe"})
    CHECK(err_code(json{{"op", op}}.dump()) == "ok");
  CHECK(err_code(R"({"op":"detach","vm":"a"})") == "ok");
  CHECK(err_code(R"({"op":"protections","vm":"a"})") == "ok");
}

TEST_CASE("api: malformed requests get the right error code") {
  // Not JSON at all, or truncated.
  CHECK(err_code("hello") == code::kParse);
  CHECK(err_code(R"({"op":"ping")") == code::kParse);
  CHECK(err_code("\xff\xfe") == code::kParse);
  CHECK(err_code("") == code::kParse);
  // JSON, but not an object.
  CHECK(err_code("[1,2]") == code::kInvalid);
  CHECK(err_code("42") == code::kInvalid);
  CHECK(err_code("\"ping\"") == code::kInvalid);
  CHECK(err_code("null") == code::kInvalid);
  // op missing, of the wrong type, unknown.
  CHECK(err_code(R"({})") == code::kInvalid);
  CHECK(err_code(R"({"op":1})") == code::kInvalid);
  CHECK(err_code(R"({"op":null})") == code::kInvalid);
  CHECK(err_code(R"({"op":"reboot"})") == code::kUnknownOp);
  CHECK(err_code(R"({"op":""})") == code::kUnknownOp);
  // Bad ids.
  CHECK(err_code(R"({"op":"ping","id":{"a":1}})") == code::kInvalid);
  CHECK(err_code(R"({"op":"ping","id":[1]})") == code::kInvalid);
  CHECK(err_code(R"({"op":"ping","id":1.5})") == code::kInvalid);
  CHECK(err_code(json{{"op", "ping"}, {"id", std::string(200, 'x')}}.dump()) ==
        code::kInvalid);
  // Unknown fields.
  CHECK(err_code(R"({"op":"ping","extra":1})") == code::kInvalid);
  CHECK(err_code(R"({"op":"attach","vm":"a","qmp":"/q","x":1})") ==
        code::kInvalid);
  // attach: missing fields and wrong types.
  CHECK(err_code(R"({"op":"attach","qmp":"/q"})") == code::kInvalid);
  CHECK(err_code(R"({"op":"attach","vm":"a"})") == code::kInvalid);
  CHECK(err_code(R"({"op":"attach","vm":5,"qmp":"/q"})") == code::kInvalid);
  CHECK(err_code(R"({"op":"attach","vm":"a","qmp":5})") == code::kInvalid);
  CHECK(err_code(R"({"op":"attach","vm":"a","qmp":"rel/q"})") == code::kInvalid);
  CHECK(err_code(R"({"op":"attach","vm":"a","qmp":""})") == code::kInvalid);
  CHECK(err_code(json{{"op", "attach"}, {"vm", "a"},
                      {"qmp", "/" + std::string(200, 'q')}}
                     .dump()) == code::kInvalid);
  // Bad VM names.
  CHECK(err_code(R"({"op":"detach","vm":""})") == code::kInvalid);
  CHECK(err_code(R"({"op":"detach","vm":"a b"})") == code::kInvalid);
  CHECK(err_code(R"({"op":"detach","vm":"../etc"})") == code::kInvalid);
  CHECK(err_code(R"({"op":"detach","vm":"-x"})") == code::kInvalid);
  CHECK(err_code(json{{"op", "detach"}, {"vm", std::string(65, 'a')}}.dump()) ==
        code::kInvalid);
  CHECK(err_code(R"({"op":"protections"})") == code::kInvalid);
  // violations: wrong types and ranges.
  CHECK(err_code(R"({"op":"violations","limit":0})") == code::kInvalid);
  CHECK(err_code(R"({"op":"violations","limit":-1})") == code::kInvalid);
  CHECK(err_code(R"({"op":"violations","limit":"10"})") == code::kInvalid);
  CHECK(err_code(R"({"op":"violations","since_seq":-5})") == code::kInvalid);
  CHECK(err_code(R"({"op":"violations","since_seq":1.5})") == code::kInvalid);
  CHECK(err_code(R"({"op":"violations","vm":7})") == code::kInvalid);
}

TEST_CASE("api: the id of a request that fails validation is echoed") {
  json id;
  CHECK(err_code(R"({"op":"reboot","id":"r1"})", &id) == code::kUnknownOp);
  CHECK(id == "r1");
  auto resp = error_response(id, make_error(code::kUnknownOp, "unknown op"));
  CHECK(resp["id"] == "r1");
  CHECK(resp["error"]["code"] == code::kUnknownOp);
  CHECK(!error_response(nullptr, make_error("x", "y")).contains("id"));
  CHECK(ok_response(3, json{{"a", 1}})["result"]["a"] == 1);
}

TEST_CASE("api: deeply nested JSON is rejected without crashing") {
  std::string deep(30000, '[');
  deep += std::string(30000, ']');
  CHECK(err_code(deep) == code::kInvalid);
  std::string open(60000, '[');
  CHECK(err_code(open) == code::kInvalid);
  // The limit is checked before anything is built, and names itself.
  json id;
  auto r = parse_request("{\"op\":\"ping\",\"x\":" + std::string(17, '[') +
                             std::string(17, ']') + "}",
                         &id);
  REQUIRE(!r.ok());
  CHECK(r.error().code == code::kInvalid);
  CHECK(r.error().message == "request nested deeper than 16 levels");
  // Within the limit it is only an unknown field.
  r = parse_request("{\"op\":\"ping\",\"x\":" + std::string(15, '[') +
                        std::string(15, ']') + "}",
                    &id);
  REQUIRE(!r.ok());
  CHECK(r.error().message.find("unknown field") != std::string::npos);
  // Brackets inside strings do not count.
  CHECK(err_code("{\"op\":\"ping\",\"id\":\"" + std::string(100, '[') +
                 "\"}") == "ok");
}

TEST_CASE("session: framing splits, trims and skips blank lines") {
  Session s(Session::Limits{});
  s.feed("{\"op\":");
  CHECK(s.next().kind == Session::Kind::kNone);
  CHECK(s.wants_read());
  s.feed("\"ping\"}\r\n\n   \n{\"op\":\"stats\"}\n{\"op\"");
  auto a = s.next();
  REQUIRE(a.kind == Session::Kind::kLine);
  CHECK(a.line == R"({"op":"ping"})");
  auto b = s.next();
  REQUIRE(b.kind == Session::Kind::kLine);
  CHECK(b.line == R"({"op":"stats"})");
  CHECK(s.next().kind == Session::Kind::kNone);
  // At end of input the unterminated last line counts.
  s.feed(":\"x\"}");
  s.feed_eof();
  auto c = s.next();
  REQUIRE(c.kind == Session::Kind::kLine);
  CHECK(c.line == R"({"op":"x"})");
  CHECK(s.input_done());
}

TEST_CASE("session: a flood of blank lines costs linear time") {
  Session s(Session::Limits{});
  s.feed(std::string(4 << 20, '\n') + "{\"op\":\"ping\"}\n");
  auto item = s.next();
  REQUIRE(item.kind == Session::Kind::kLine);
  CHECK(item.line == R"({"op":"ping"})");
  CHECK(s.next().kind == Session::Kind::kNone);
}

TEST_CASE("session: a line over the limit is refused, terminated or not") {
  Session::Limits lim;
  lim.max_line = 100;
  {
    Session s(lim);
    s.feed(std::string(101, 'x'));
    CHECK(s.next().kind == Session::Kind::kTooLong);
  }
  {
    Session s(lim);
    s.feed(std::string(150, 'x') + "\n");
    CHECK(s.next().kind == Session::Kind::kTooLong);
  }
  {
    Session s(lim);
    s.feed(std::string(100, 'x') + "\n");
    CHECK(s.next().kind == Session::Kind::kLine);
  }
}

TEST_CASE("session: one request at a time, reading paused while busy") {
  Session s(Session::Limits{});
  s.feed("{\"op\":\"a\"}\n{\"op\":\"b\"}\n");
  CHECK(s.can_dispatch());
  REQUIRE(s.next().kind == Session::Kind::kLine);
  s.busy = true;
  CHECK(!s.can_dispatch());
  CHECK(!s.wants_read());
  s.busy = false;
  REQUIRE(s.next().kind == Session::Kind::kLine);
  CHECK(s.next().kind == Session::Kind::kNone);
  CHECK(s.wants_read());
}

TEST_CASE("session: events are bounded by max_output, responses are not") {
  Session::Limits lim;
  lim.max_output = 1000;
  lim.pause_output = 500;
  Session s(lim);
  CHECK(s.enqueue(std::string(600, 'r'), false));
  CHECK(!s.can_dispatch());  // over pause_output: no more requests
  CHECK(s.enqueue(std::string(300, 'e'), true));
  CHECK(!s.enqueue(std::string(300, 'e'), true));  // would exceed 1000
  CHECK(s.enqueue(std::string(2000, 'r'), false));  // a response: queued
  CHECK(s.output_bytes() == 601 + 301 + 2001);
  s.consume_output(601 + 301 + 2001);
  CHECK(!s.has_output());
  CHECK(s.can_dispatch());
}

// ---- The server over real sockets -----------------------------------------

namespace {

struct Harness {
  test::TempDir dir;
  std::unique_ptr<EventLoop> loop;
  std::unique_ptr<Server> server;
  std::string path;
  std::vector<std::string> ops;
  std::vector<ReplyFn> held;  // "attach" is answered later, by the test

  explicit Harness(Server::Limits lim) {
    auto l = EventLoop::create();
    REQUIRE(l.ok());
    loop = std::move(*l);
    path = dir / "api.sock";
    server = std::make_unique<Server>(
        *loop, lim, [this](ClientId id, const Request& r, ReplyFn reply) {
          ops.push_back(r.op);
          if (r.op == "subscribe") {
            server->subscribe(id);
            reply(json{{"subscribed", true}});
          } else if (r.op == "attach") {
            held.push_back(std::move(reply));
          } else if (r.op == "detach") {
            reply(make_error(code::kVmNotFound, "no such VM"));
          } else {
            reply(json{{"pong", true}});
          }
        });
    REQUIRE(server->listen(path, 0600).ok());
  }

  void spin(int ms = 30) {
    loop->after(std::chrono::milliseconds(ms), [this] { loop->stop(); });
    loop->run();
  }

  UniqueFd connect() {
    UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK, 0));
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::memcpy(addr.sun_path, path.data(), path.size());
    REQUIRE(::connect(fd.get(), reinterpret_cast<sockaddr*>(&addr),
                      sizeof(addr)) == 0);
    return fd;
  }
};

void send_str(const UniqueFd& fd, const std::string& s) {
  REQUIRE(::send(fd.get(), s.data(), s.size(), MSG_NOSIGNAL) ==
          static_cast<ssize_t>(s.size()));
}

// Everything readable now; *eof set when the server closed the connection.
std::string drain(const UniqueFd& fd, bool* eof = nullptr) {
  std::string out;
  char buf[65536];
  for (;;) {
    ssize_t n = ::recv(fd.get(), buf, sizeof(buf), MSG_DONTWAIT);
    if (n > 0) {
      out.append(buf, static_cast<size_t>(n));
      continue;
    }
    if (eof) *eof = (n == 0);
    return out;
  }
}

std::vector<json> parse_lines(const std::string& data) {
  std::vector<json> out;
  size_t start = 0, nl;
  while ((nl = data.find('\n', start)) != std::string::npos) {
    out.push_back(json::parse(data.substr(start, nl - start)));
    start = nl + 1;
  }
  return out;
}

}  // namespace

TEST_CASE("server: malformed requests are answered, counted, and it serves on") {
  Harness h(Server::Limits{});
  auto c = h.connect();
  send_str(c,
           "garbage\n"
           "{\"op\":\"ping\",\"id\":1}\n"
           "[1]\n"
           "{\"op\":\"nope\",\"id\":\"u\"}\n"
           "{\"op\":\"detach\",\"vm\":\"a\"}\n"
           "{\"op\":\"ping\",\"id\":2}\n");
  h.spin();
  auto r = parse_lines(drain(c));
  REQUIRE(r.size() == 6);
  CHECK(r[0]["error"]["code"] == code::kParse);
  CHECK(r[1]["id"] == 1);
  CHECK(r[1]["result"]["pong"] == true);
  CHECK(r[2]["error"]["code"] == code::kInvalid);
  CHECK(r[3]["error"]["code"] == code::kUnknownOp);
  CHECK(r[3]["id"] == "u");
  CHECK(r[4]["error"]["code"] == code::kVmNotFound);
  CHECK(r[5]["id"] == 2);
  CHECK(h.server->stats().requests == 6);
  CHECK(h.server->stats().requests_rejected == 3);
  CHECK(h.server->stats().requests_failed == 1);
}

TEST_CASE("server: responses keep request order across an async request") {
  Harness h(Server::Limits{});
  auto c = h.connect();
  send_str(c, "{\"op\":\"attach\",\"vm\":\"a\",\"qmp\":\"/q\",\"id\":1}\n"
              "{\"op\":\"ping\",\"id\":2}\n");
  h.spin();
  CHECK(drain(c).empty());
  CHECK(h.ops == std::vector<std::string>{"attach"});  // ping waits
  REQUIRE(h.held.size() == 1);
  h.held[0](json{{"state", "attached"}});
  h.spin();
  auto r = parse_lines(drain(c));
  REQUIRE(r.size() == 2);
  CHECK(r[0]["id"] == 1);
  CHECK(r[1]["id"] == 2);
}

TEST_CASE("server: a request line over the limit closes the connection") {
  Server::Limits lim;
  lim.session.max_line = 1024;
  Harness h(lim);
  auto c = h.connect();
  send_str(c, std::string(3000, 'x'));
  h.spin();
  bool eof = false;
  auto r = parse_lines(drain(c, &eof));
  REQUIRE(r.size() == 1);
  CHECK(r[0]["error"]["code"] == code::kLineTooLong);
  CHECK(eof);
  CHECK(h.server->stats().requests_rejected == 1);
  // Others are still served.
  auto d = h.connect();
  send_str(d, "{\"op\":\"ping\"}\n");
  h.spin();
  CHECK(parse_lines(drain(d)).size() == 1);
}

TEST_CASE("server: clients beyond max_clients are refused") {
  Server::Limits lim;
  lim.max_clients = 2;
  Harness h(lim);
  auto a = h.connect();
  auto b = h.connect();
  h.spin();
  auto c = h.connect();
  h.spin();
  bool eof = false;
  auto r = parse_lines(drain(c, &eof));
  REQUIRE(r.size() == 1);
  CHECK(r[0]["error"]["code"] == code::kTooManyClients);
  CHECK(eof);
  CHECK(h.server->stats().clients_refused == 1);
  CHECK(h.server->clients() == 2);
  send_str(a, "{\"op\":\"ping\"}\n");
  send_str(b, "{\"op\":\"ping\"}\n");
  h.spin();
  CHECK(parse_lines(drain(a)).size() == 1);
  CHECK(parse_lines(drain(b)).size() == 1);
  // A slot frees up when a client leaves.
  a.reset();
  h.spin();
  auto d = h.connect();
  send_str(d, "{\"op\":\"ping\"}\n");
  h.spin();
  CHECK(parse_lines(drain(d)).size() == 1);
}

TEST_CASE("server: a subscriber that does not read is dropped, others are not") {
  Server::Limits lim;
  lim.session.max_output = 64 * 1024;
  lim.session.pause_output = 4096;
  Harness h(lim);
  auto slow = h.connect();
  auto fast = h.connect();
  send_str(slow, "{\"op\":\"subscribe\"}\n");
  send_str(fast, "{\"op\":\"subscribe\"}\n");
  h.spin();
  drain(slow);
  drain(fast);
  CHECK(h.server->subscribers() == 2);

  json ev = {{"event", "violation"}, {"pad", std::string(1000, 'p')}};
  size_t got = 0;
  for (int batch = 0; batch < 40; batch++) {
    for (int i = 0; i < 50; i++) h.server->broadcast(ev);
    h.spin(5);
    got += parse_lines(drain(fast)).size();
  }
  CHECK(got == 2000);
  CHECK(h.server->stats().clients_dropped_slow == 1);
  CHECK(h.server->subscribers() == 1);
}

TEST_CASE("server: a client leaving while its request is pending is harmless") {
  Harness h(Server::Limits{});
  {
    auto c = h.connect();
    send_str(c, "{\"op\":\"attach\",\"vm\":\"a\",\"qmp\":\"/q\"}\n");
    h.spin();
  }
  h.spin();
  CHECK(h.server->clients() == 0);
  REQUIRE(h.held.size() == 1);
  h.held[0](json{{"state", "attached"}});  // ignored
  h.spin();
}

TEST_CASE("server: requests of a client that closed at once are still taken") {
  Harness h(Server::Limits{});
  {
    auto c = h.connect();
    send_str(c, "{\"op\":\"ping\"}\n{\"op\":\"attach\",\"vm\":\"a\",\"qmp\":\"/q\"}\n"
                "{\"op\":\"stats\"}\n");
  }
  h.spin();
  // ping, then attach (asynchronous: nothing after it is taken).
  CHECK(h.ops == std::vector<std::string>{"ping", "attach"});
  CHECK(h.server->clients() == 0);
}

TEST_CASE("server: after the client's EOF it answers, then closes") {
  Harness h(Server::Limits{});
  auto c = h.connect();
  send_str(c, "{\"op\":\"ping\",\"id\":9}");  // no newline, then EOF
  ::shutdown(c.get(), SHUT_WR);
  h.spin();
  bool eof = false;
  auto r = parse_lines(drain(c, &eof));
  REQUIRE(r.size() == 1);
  CHECK(r[0]["id"] == 9);
  CHECK(eof);
}

TEST_CASE("server: a client that pipelines thousands of requests gets every answer") {
  // More requests than fit under pause_output in one read: the server
  // pauses, flushes, and must come back to the lines it already read.  The
  // client reads as fast as it can (as a real one does), so each flush
  // drains everything and no EPOLLOUT would wake the server either.  A
  // small pause_output makes each pause fit the socket buffer for sure.
  Server::Limits lim;
  lim.session.pause_output = 2048;
  Harness h(lim);
  auto c = h.connect();
  constexpr int kPings = 3000;
  std::string all;
  for (int i = 0; i < kPings; i++)
    all += "{\"op\":\"ping\",\"id\":" + std::to_string(i) + "}\n";
  std::atomic<int> answers{0};
  std::string got;
  std::thread reader([&] {
    auto end = std::chrono::steady_clock::now() + std::chrono::seconds(5);
    char buf[65536];
    while (answers < kPings && std::chrono::steady_clock::now() < end) {
      ssize_t n = ::recv(c.get(), buf, sizeof(buf), MSG_DONTWAIT);
      if (n <= 0) {
        std::this_thread::yield();
        continue;
      }
      got.append(buf, static_cast<size_t>(n));
      int lines = 0;
      for (ssize_t i = 0; i < n; i++) lines += buf[i] == '\n';
      answers += lines;
    }
  });
  size_t sent = 0;
  auto end = std::chrono::steady_clock::now() + std::chrono::seconds(5);
  while (answers < kPings && std::chrono::steady_clock::now() < end) {
    if (sent < all.size()) {
      ssize_t n = ::send(c.get(), all.data() + sent, all.size() - sent,
                         MSG_NOSIGNAL | MSG_DONTWAIT);
      if (n > 0) sent += static_cast<size_t>(n);
    }
    h.spin(2);
  }
  reader.join();
  CHECK(sent == all.size());
  REQUIRE(answers == kPings);
  auto r = parse_lines(got);
  int in_order = 0;
  for (int i = 0; i < kPings; i++)
    in_order += r[static_cast<size_t>(i)]["id"] == i;
  CHECK(in_order == kPings);
}

TEST_CASE("server: idle clients are closed; busy ones and subscribers are not") {
  Server::Limits lim;
  lim.max_clients = 3;
  lim.idle_timeout = std::chrono::milliseconds(150);
  Harness h(lim);
  auto idle1 = h.connect();
  auto idle2 = h.connect();
  auto sub = h.connect();
  send_str(sub, "{\"op\":\"subscribe\"}\n");
  h.spin();
  drain(sub);
  // Full: a fourth is refused.
  auto refused = h.connect();
  h.spin();
  CHECK(parse_lines(drain(refused))[0]["error"]["code"] == code::kTooManyClients);
  // One idle client keeps talking, one waits for an answer (attach is held).
  send_str(idle2, "{\"op\":\"attach\",\"vm\":\"a\",\"qmp\":\"/q\"}\n");
  for (int i = 0; i < 6; i++) h.spin(50);
  bool eof = false;
  auto r = parse_lines(drain(idle1, &eof));
  REQUIRE(r.size() == 1);
  CHECK(r[0]["error"]["code"] == code::kIdleTimeout);
  CHECK(eof);
  eof = false;
  CHECK(drain(idle2, &eof).empty());
  CHECK(!eof);  // its request is in flight
  eof = false;
  drain(sub, &eof);
  CHECK(!eof);
  CHECK(h.server->stats().clients_idle_closed == 1);
  // The slot is free again.
  auto fresh = h.connect();
  send_str(fresh, "{\"op\":\"ping\",\"id\":1}\n");
  h.spin();
  CHECK(parse_lines(drain(fresh))[0]["id"] == 1);
}

TEST_CASE("server: at shutdown a request in flight is answered shutting-down") {
  Harness h(Server::Limits{});
  auto c = h.connect();
  auto d = h.connect();
  send_str(c, "{\"op\":\"attach\",\"vm\":\"a\",\"qmp\":\"/q\",\"id\":7}\n");
  h.spin();
  REQUIRE(h.held.size() == 1);
  h.server->shutdown();
  bool eof = false;
  auto r = parse_lines(drain(c, &eof));
  REQUIRE(r.size() == 1);
  CHECK(r[0]["id"] == 7);
  CHECK(r[0]["error"]["code"] == code::kShuttingDown);
  CHECK(eof);
  eof = false;
  CHECK(drain(d, &eof).empty());  // nothing in flight: just closed
  CHECK(eof);
  h.held[0](json{{"state", "attached"}});  // too late: ignored
}

TEST_CASE("api: migrate requests parse, with their defaults") {
  json id;
  auto r = parse_request(R"({"op":"migrate","vm":"a","dest":"b"})", &id);
  REQUIRE(r.ok());
  auto m = std::get<Migrate>(r->args);
  CHECK(m.vm == "a");
  CHECK(m.dest == "b");
  CHECK(m.uri.empty());
  CHECK_FALSE(m.postcopy);
  CHECK(m.prefetch == "off");
  CHECK(m.transport == "tcp");
  CHECK_FALSE(m.shared_storage);
  CHECK_FALSE(m.switch_manual);
  CHECK(m.switch_after_passes == 1);
  CHECK(m.switch_stall_samples == 5);
  CHECK(m.switch_after_s == 0);
  CHECK_FALSE(m.max_bandwidth);
  CHECK(m.recover_attempts == 3);
  CHECK(m.interval_ms == 1000);
  CHECK(m.wait);

  r = parse_request(
      R"({"op":"migrate","vm":"a","dest":"b","uri":"tcp:[::1]:4444",)"
      R"("recover_uri":"unix:/run/kvmx/r.sock","postcopy":true,)"
      R"("prefetch":"page-table","shared_storage":true,"switch":"auto",)"
      R"("switch_after_passes":0,"switch_stall_samples":10,)"
      R"("switch_after_s":60,"max_bandwidth":1048576,)"
      R"("max_postcopy_bandwidth":4096,"downtime_limit_ms":300,)"
      R"("recover_attempts":0,"interval_ms":250,"wait":false})",
      &id);
  REQUIRE(r.ok());
  m = std::get<Migrate>(r->args);
  CHECK(m.uri == "tcp:[::1]:4444");
  CHECK(m.recover_uri == "unix:/run/kvmx/r.sock");
  CHECK(m.postcopy);
  CHECK(m.prefetch == "page-table");
  CHECK(m.shared_storage);
  CHECK(m.switch_after_passes == 0);
  CHECK(m.switch_stall_samples == 10);
  CHECK(m.switch_after_s == 60);
  CHECK(*m.max_bandwidth == 1048576);
  CHECK(*m.max_postcopy_bandwidth == 4096);
  CHECK(*m.downtime_limit_ms == 300);
  CHECK(m.recover_attempts == 0);
  CHECK(m.interval_ms == 250);
  CHECK_FALSE(m.wait);

  r = parse_request(
      R"({"op":"migrate","vm":"a","dest":"b","postcopy":true,)"
      R"("transport":"rdma","uri":"tcp:10.0.0.2:4444"})",
      &id);
  REQUIRE(r.ok());
  CHECK(std::get<Migrate>(r->args).transport == "rdma");

  r = parse_request(
      R"({"op":"migrate","vm":"a","dest":"b","postcopy":true,"switch":"manual"})",
      &id);
  REQUIRE(r.ok());
  CHECK(std::get<Migrate>(r->args).switch_manual);

  r = parse_request(R"({"op":"migrate-recover","vm":"a"})", &id);
  REQUIRE(r.ok());
  auto rec = std::get<MigrateRecover>(r->args);
  CHECK(rec.dest.empty());
  CHECK(rec.interval_ms == 0);
  CHECK(rec.wait);
  r = parse_request(
      R"({"op":"migrate-recover","vm":"a","dest":"b","uri":"tcp:h:1","interval_ms":100})",
      &id);
  REQUIRE(r.ok());
  CHECK(std::get<MigrateRecover>(r->args).uri == "tcp:h:1");
  for (auto op : {"migrate-postcopy", "migrate-cancel", "migrate-status"})
    CHECK(err_code(json{{"op", op}, {"vm", "a"}}.dump()) == "ok");
}

TEST_CASE("api: malformed migrate requests are invalid-request, saying why") {
  auto why = [](const json& req) {
    json id;
    auto r = parse_request(req.dump(), &id);
    if (r) return std::string("ok");
    CHECK(r.error().code == code::kInvalid);
    return r.error().message;
  };
  json base = {{"op", "migrate"}, {"vm", "a"}, {"dest", "b"}};
  auto with = [&](const json& extra) {
    json j = base;
    j.update(extra);
    return j;
  };
  CHECK(why(json{{"op", "migrate"}, {"vm", "a"}}) == "missing field 'dest'");
  CHECK_THAT(why(with({{"dest", "a"}})), ContainsSubstring("another VM"));
  CHECK_THAT(why(with({{"dest", "../x"}})), ContainsSubstring("'dest' must be"));
  CHECK_THAT(why(with({{"dest", 5}})), ContainsSubstring("'dest' must be"));
  CHECK_THAT(why(with({{"speed", 5}})), ContainsSubstring("unknown field 'speed'"));
  // URIs: unix: and tcp: only.
  for (const char* uri :
       {"exec:rm -rf /", "fd:3", "file:/tmp/x", "rdma:h:1", "unix:rel/path",
        "unix:", "unix:/a,b", "tcp:h", "tcp:h:0", "tcp:h:65536", "tcp::1",
        "tcp:-h:1", "tcp:h h:1", "tcp:[zz]:1", "tcp:h:1x", "", "unix:/a\nb"}) {
    CAPTURE(uri);
    CHECK_THAT(why(with({{"uri", uri}})), ContainsSubstring("'uri' must be"));
  }
  CHECK_THAT(why(with({{"uri", "unix:/" + std::string(107, 'x')}})),
             ContainsSubstring("'uri' must be"));
  CHECK(why(with({{"uri", "unix:/" + std::string(106, 'x')}})) == "ok");
  CHECK(why(with({{"uri", "tcp:host-1.example.org:65535"}})) == "ok");
  CHECK(why(with({{"uri", "tcp:10.0.0.1:4444"}})) == "ok");
  CHECK_THAT(why(with({{"postcopy", true}, {"recover_uri", "exec:x"}})),
             ContainsSubstring("'recover_uri' must be"));
  CHECK_THAT(why(with({{"uri", 5}})), ContainsSubstring("must be a string"));
  // Types and ranges.
  CHECK_THAT(why(with({{"postcopy", "yes"}})),
             ContainsSubstring("'postcopy' must be true or false"));
  CHECK_THAT(why(with({{"wait", 1}})), ContainsSubstring("'wait' must be"));
  CHECK_THAT(why(with({{"postcopy", true}, {"prefetch", "all"}})),
             ContainsSubstring("'prefetch' must be off, pattern"));
  CHECK_THAT(why(with({{"postcopy", true}, {"transport", "ib"}})),
             ContainsSubstring("'transport' must be tcp or rdma"));
  CHECK_THAT(why(with({{"postcopy", true}, {"transport", 1}})),
             ContainsSubstring("'transport' must be tcp or rdma"));
  CHECK_THAT(why(with({{"transport", "rdma"}, {"uri", "tcp:h:1"}})),
             ContainsSubstring("'transport' rdma needs 'postcopy'"));
  CHECK_THAT(why(with({{"postcopy", true}, {"transport", "rdma"}})),
             ContainsSubstring("needs a tcp: 'uri'"));
  CHECK_THAT(why(with({{"postcopy", true}, {"transport", "rdma"},
                       {"uri", "unix:/run/kvmx/m.sock"}})),
             ContainsSubstring("needs a tcp: 'uri'"));
  CHECK(why(with({{"postcopy", true}, {"transport", "tcp"}})) == "ok");
  CHECK_THAT(why(with({{"postcopy", true}, {"switch", "now"}})),
             ContainsSubstring("'switch' must be auto or manual"));
  CHECK_THAT(why(with({{"postcopy", true}, {"switch_after_passes", 1001}})),
             ContainsSubstring("from 0 to 1000"));
  CHECK_THAT(why(with({{"postcopy", true}, {"switch_after_passes", -1}})),
             ContainsSubstring("from 0 to 1000"));
  CHECK_THAT(why(with({{"postcopy", true}, {"switch_stall_samples", 1.5}})),
             ContainsSubstring("switch_stall_samples"));
  CHECK_THAT(why(with({{"max_bandwidth", 0}})),
             ContainsSubstring("'max_bandwidth' must be an integer from 1"));
  CHECK_THAT(why(with({{"max_bandwidth", (1ull << 40) + 1}})),
             ContainsSubstring("max_bandwidth"));
  CHECK_THAT(why(with({{"downtime_limit_ms", 2000001}})),
             ContainsSubstring("downtime_limit_ms"));
  CHECK_THAT(why(with({{"interval_ms", 99}})),
             ContainsSubstring("'interval_ms' must be an integer from 100 to 60000"));
  CHECK_THAT(why(with({{"postcopy", true}, {"recover_attempts", 101}})),
             ContainsSubstring("recover_attempts"));
  CHECK(why(with({{"multifd_channels", 2}})) == "ok");
  CHECK(why(with({{"multifd_channels", 255}})) == "ok");
  CHECK(why(with({{"multifd_channels", 0}, {"postcopy", true}})) == "ok");
  CHECK_THAT(why(with({{"multifd_channels", 256}})),
             ContainsSubstring("'multifd_channels' must be an integer from 0 "
                               "to 255"));
  CHECK_THAT(why(with({{"multifd_channels", "2"}})),
             ContainsSubstring("multifd_channels"));
  CHECK_THAT(why(with({{"multifd_channels", 2}, {"postcopy", true}})),
             ContainsSubstring("QEMU 10.0 refuses multifd with post-copy"));
  // What only post-copy uses is an error without it.
  CHECK_THAT(why(with({{"prefetch", "pattern"}})),
             ContainsSubstring("'prefetch' needs 'postcopy'"));
  CHECK(why(with({{"prefetch", "off"}})) == "ok");
  CHECK_THAT(why(with({{"switch", "manual"}})),
             ContainsSubstring("'switch*' fields need 'postcopy'"));
  CHECK_THAT(why(with({{"switch_after_s", 5}})),
             ContainsSubstring("need 'postcopy'"));
  CHECK_THAT(why(with({{"max_postcopy_bandwidth", 5}})),
             ContainsSubstring("needs 'postcopy'"));
  CHECK_THAT(why(with({{"recover_attempts", 1}})),
             ContainsSubstring("only a post-copy migration can be recovered"));
  CHECK_THAT(why(with({{"postcopy", true}, {"switch", "manual"},
                       {"switch_after_passes", 2}})),
             ContainsSubstring("'switch' manual takes no"));
  // The other migration ops.
  CHECK(why(json{{"op", "migrate-recover"}}) == "missing field 'vm'");
  CHECK_THAT(why(json{{"op", "migrate-recover"}, {"vm", "a"}, {"dest", "a"}}),
             ContainsSubstring("another VM"));
  CHECK_THAT(why(json{{"op", "migrate-recover"}, {"vm", "a"}, {"postcopy", true}}),
             ContainsSubstring("unknown field 'postcopy'"));
  CHECK_THAT(why(json{{"op", "migrate-recover"}, {"vm", "a"}, {"uri", "exec:x"}}),
             ContainsSubstring("'uri' must be"));
  CHECK_THAT(why(json{{"op", "migrate-status"}, {"vm", "a"}, {"dest", "b"}}),
             ContainsSubstring("unknown field 'dest'"));
  CHECK_THAT(why(json{{"op", "migrate-postcopy"}}), ContainsSubstring("'vm'"));
  CHECK_THAT(why(json{{"op", "migrate-cancel"}, {"vm", ""}}),
             ContainsSubstring("'vm' must be"));
}

TEST_CASE("api: migration URIs") {
  CHECK(valid_migration_uri("unix:/run/kvmx/m.sock"));
  CHECK(valid_migration_uri("tcp:localhost:4444"));
  CHECK(valid_migration_uri("tcp:[fe80::1]:1"));
  CHECK_FALSE(valid_migration_uri("exec:cat"));
  CHECK_FALSE(valid_migration_uri("tcp:localhost:4444,to=5000"));
  CHECK_FALSE(valid_migration_uri("tcp:" + std::string(254, 'h') + ":1"));
  CHECK_FALSE(valid_migration_uri("UNIX:/x"));
  CHECK_FALSE(valid_migration_uri(std::string("unix:/a\0b", 9)));
}

TEST_CASE("api: disk_dedup, snapshot and restore requests; hostile ones refused") {
  auto why = [](const json& req) {
    json id;
    auto r = parse_request(req.dump(), &id);
    if (r) return std::string("ok");
    CHECK(r.error().code == code::kInvalid);
    return r.error().message;
  };
  json id;
  auto r = parse_request(
      R"({"op":"migrate","vm":"a","dest":"b","disk_dedup":"on","shared_storage":true})",
      &id);
  REQUIRE(r.ok());
  CHECK(std::get<Migrate>(r->args).disk_dedup == "on");
  r = parse_request(R"({"op":"migrate","vm":"a","dest":"b"})", &id);
  REQUIRE(r.ok());
  CHECK(std::get<Migrate>(r->args).disk_dedup == "auto");
  for (json bad : {json("yes"), json(true), json(1), json("ON")})
    CHECK_THAT(why(json{{"op", "migrate"}, {"vm", "a"}, {"dest", "b"},
                        {"disk_dedup", bad}}),
               ContainsSubstring("'disk_dedup' must be auto, on or off"));

  r = parse_request(
      R"({"op":"snapshot","vm":"a","file":"/var/lib/kvmx/a.snap","force":true,"resume":true,"max_bandwidth":1000,"disk_dedup":"off"})",
      &id);
  REQUIRE(r.ok());
  auto s = std::get<Snapshot>(r->args);
  CHECK(s.file == "/var/lib/kvmx/a.snap");
  CHECK(s.force);
  CHECK(s.resume);
  CHECK(s.max_bandwidth == 1000u);
  CHECK(s.disk_dedup == "off");
  r = parse_request(R"({"op":"restore","vm":"b","file":"/x.snap","paused":true})",
                    &id);
  REQUIRE(r.ok());
  CHECK(std::get<Restore>(r->args).paused);
  CHECK(std::get<Restore>(r->args).disk_dedup == "auto");

  json snap = {{"op", "snapshot"}, {"vm", "a"}};
  CHECK(why(snap) == "missing field 'file'");
  for (const std::string& bad : std::vector<std::string>{
       "rel/path", "", "/a/../etc/shadow", "/a/./b", "/a//b", "/a/",
        "/a,offset=4096", "/a\nb", std::string("/a\0b", 4),
        "/" + std::string(4095, 'x')}) {
    CAPTURE(bad);
    json j = snap;
    j["file"] = bad;
    CHECK_THAT(why(j), ContainsSubstring("'file' must be an absolute path"));
  }
  json j = snap;
  j["file"] = 5;
  CHECK(why(j) == "'file' must be a string");
  j["file"] = "/" + std::string(4094, 'x');
  CHECK(why(j) == "ok");
  j["file"] = "/x";
  j["max_bandwidth"] = 0;
  CHECK_THAT(why(j), ContainsSubstring("'max_bandwidth' must be an integer"));
  j.erase("max_bandwidth");
  j["interval_ms"] = 10;
  CHECK_THAT(why(j), ContainsSubstring("'interval_ms' must be an integer"));
  j.erase("interval_ms");
  j["force"] = "yes";
  CHECK_THAT(why(j), ContainsSubstring("'force' must be true or false"));
  j.erase("force");
  j["paused"] = true;
  CHECK_THAT(why(j), ContainsSubstring("unknown field 'paused'"));
  CHECK_THAT(why(json{{"op", "restore"}, {"vm", "a"}, {"file", "/x"},
                      {"resume", true}}),
             ContainsSubstring("unknown field 'resume'"));
  CHECK_THAT(why(json{{"op", "restore"}, {"vm", "../a"}, {"file", "/x"}}),
             ContainsSubstring("'vm' must be"));
}
