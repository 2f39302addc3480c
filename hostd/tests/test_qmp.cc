// The QMP client against a fake transport: greeting, capabilities, id
// matching, events interleaved with replies, hostile peers.
#include <catch2/catch_test_macros.hpp>
#include <string>
#include <vector>

#include "qmp/client.h"

using nlohmann::json;
using kvmx::Result;
using kvmx::qmp::Client;
using kvmx::qmp::Event;

namespace {

const char* kGreeting =
    R"({"QMP": {"version": {"qemu": {"micro": 0, "minor": 0, "major": 10},)"
    R"( "package": "kvmx"}, "capabilities": ["oob"]}})"
    "\r\n";

struct FakeTransport : kvmx::qmp::Transport {
  std::vector<json> sent;
  bool closed = false;
  void send(std::string data) override {
    REQUIRE(data.back() == '\n');
    sent.push_back(json::parse(data));
  }
  void close() override { closed = true; }
};

struct Fixture {
  FakeTransport t;
  std::vector<Event> events;
  std::vector<std::string> closed;
  int ready = 0;
  Client client;

  Fixture()
      : client(t, Client::Callbacks{
                      [this] { ready++; },
                      [this](const Event& e) { events.push_back(e); },
                      [this](const std::string& r) { closed.push_back(r); }},
               4096) {}

  // Greeting + capabilities: the client is ready.
  void handshake() {
    client.on_data(kGreeting);
    REQUIRE(t.sent.size() == 1);
    REQUIRE(t.sent[0]["execute"] == "qmp_capabilities");
    client.on_data(json{{"return", json::object()}, {"id", t.sent[0]["id"]}}
                       .dump() +
                   "\r\n");
    REQUIRE(client.state() == Client::State::kReady);
  }
};

}  // namespace

TEST_CASE("qmp: greeting, then qmp_capabilities, then ready") {
  Fixture f;
  CHECK(f.client.state() == Client::State::kGreeting);
  CHECK(f.client.execute("query-status", json(), [](Result<json>) {}).ok() ==
        false);  // not before negotiation
  f.client.on_data(kGreeting);
  CHECK(f.client.state() == Client::State::kNegotiating);
  CHECK(f.client.qemu_version() == "10.0.0");
  REQUIRE(f.t.sent.size() == 1);
  CHECK(f.t.sent[0]["execute"] == "qmp_capabilities");
  CHECK(!f.t.sent[0].contains("arguments"));
  CHECK(f.ready == 0);
  f.client.on_data(json{{"return", json::object()}, {"id", f.t.sent[0]["id"]}}
                       .dump() + "\n");
  CHECK(f.ready == 1);
  CHECK(f.client.state() == Client::State::kReady);
}

TEST_CASE("qmp: bytes may arrive in any split") {
  Fixture f;
  std::string g = kGreeting;
  for (char c : g) f.client.on_data(std::string_view(&c, 1));
  CHECK(f.client.state() == Client::State::kNegotiating);
}

TEST_CASE("qmp: replies are matched by id, in any order, among events") {
  Fixture f;
  f.handshake();
  std::vector<std::string> results;
  auto a = f.client.execute("query-kvmx-chan", json(), [&](Result<json> r) {
    REQUIRE(r.ok());
    results.push_back("a:" + r->dump());
  });
  auto b = f.client.execute("query-status", json{{"x", 1}}, [&](Result<json> r) {
    REQUIRE(r.ok());
    results.push_back("b:" + r->dump());
  });
  REQUIRE(a.ok());
  REQUIRE(b.ok());
  CHECK(*a != *b);
  CHECK(f.t.sent.back()["arguments"]["x"] == 1);

  std::string in;
  in += R"({"event": "KVMX_VIOLATION", "data": {"device": "chan0", "seq": 1},)"
        R"( "timestamp": {"seconds": 100, "microseconds": 5}})" "\n";
  in += json{{"return", json{{"status", "running"}}}, {"id", *b}}.dump() + "\n";
  in += R"({"event": "STOP", "timestamp": {"seconds": 101, "microseconds": 0}})"
        "\n";
  in += json{{"return", json::array()}, {"id", *a}}.dump() + "\n";
  f.client.on_data(in);

  REQUIRE(results.size() == 2);
  CHECK(results[0] == R"(b:{"status":"running"})");
  CHECK(results[1] == "a:[]");
  REQUIRE(f.events.size() == 2);
  CHECK(f.events[0].name == "KVMX_VIOLATION");
  CHECK(f.events[0].data["device"] == "chan0");
  CHECK(f.events[0].seconds == 100);
  CHECK(f.events[0].micros == 5);
  CHECK(f.events[1].name == "STOP");
  CHECK(f.events[1].data.is_object());
  CHECK(f.client.pending() == 0);
}

TEST_CASE("qmp: an error reply carries class and description") {
  Fixture f;
  f.handshake();
  std::string err;
  auto id = f.client.execute("query-kvmx-chan", json(), [&](Result<json> r) {
    REQUIRE(!r.ok());
    CHECK(r.error().code == "qmp-error");
    err = r.error().message;
  });
  f.client.on_data(
      json{{"error", {{"class", "CommandNotFound"}, {"desc", "no such"}}},
           {"id", *id}}
          .dump() +
      "\n");
  CHECK(err == "CommandNotFound: no such");
}

TEST_CASE("qmp: replies to unknown or cancelled ids are ignored") {
  Fixture f;
  f.handshake();
  int calls = 0;
  auto id = f.client.execute("x", json(), [&](Result<json>) { calls++; });
  f.client.cancel(*id);
  f.client.on_data(json{{"return", 1}, {"id", *id}}.dump() + "\n");
  f.client.on_data(json{{"return", 1}, {"id", 12345}}.dump() + "\n");
  f.client.on_data(json{{"return", 1}, {"id", "str"}}.dump() + "\n");
  f.client.on_data(R"({"error": {"class": "GenericError", "desc": "x"}})" "\n");
  CHECK(calls == 0);
  CHECK(f.client.state() == Client::State::kReady);
  CHECK(f.client.protocol_errors() == 2);  // "str" id and the id-less error
}

TEST_CASE("qmp: EOF fails pending commands and reports closure once") {
  Fixture f;
  f.handshake();
  std::string code;
  (void)f.client.execute("x", json(), [&](Result<json> r) {
    code = r.ok() ? "ok" : r.error().code;
  });
  f.client.on_eof("peer closed the connection");
  CHECK(code == "qmp-disconnected");
  REQUIRE(f.closed.size() == 1);
  CHECK(f.closed[0] == "peer closed the connection");
  CHECK(!f.t.closed);  // the transport closed itself
  f.client.close("again");
  f.client.on_data("{}\n");
  CHECK(f.closed.size() == 1);
  CHECK(f.client.state() == Client::State::kClosed);
}

TEST_CASE("qmp: a peer that is not QMP is dropped") {
  SECTION("garbage greeting") {
    Fixture f;
    f.client.on_data("SSH-2.0-OpenSSH\r\n");
    CHECK(f.client.state() == Client::State::kClosed);
    CHECK(f.t.closed);
    REQUIRE(f.closed.size() == 1);
    CHECK(f.closed[0].find("not a QMP server") != std::string::npos);
    CHECK(f.t.sent.empty());  // nothing was written to it
  }
  SECTION("JSON without QMP key") {
    Fixture f;
    f.client.on_data("{\"hello\": 1}\n");
    CHECK(f.client.state() == Client::State::kClosed);
    CHECK(f.t.sent.empty());
  }
  SECTION("capabilities refused") {
    Fixture f;
    f.client.on_data(kGreeting);
    f.client.on_data(json{{"error", {{"class", "GenericError"}, {"desc", "no"}}},
                          {"id", f.t.sent[0]["id"]}}
                         .dump() +
                     "\n");
    CHECK(f.client.state() == Client::State::kClosed);
    CHECK(f.ready == 0);
  }
  SECTION("a message over the line limit") {
    Fixture f;
    f.handshake();
    f.client.on_data(std::string(5000, ' '));
    CHECK(f.client.state() == Client::State::kClosed);
    CHECK(f.t.closed);
  }
}

TEST_CASE("qmp: malformed messages after the handshake are counted, not fatal") {
  Fixture f;
  f.handshake();
  f.client.on_data("not json\n[1,2]\n{\"event\": 5}\n{\"neither\": 1}\n");
  f.client.on_data(
      R"({"event": "X", "data": [1], "timestamp": {"seconds": "a"}})" "\n");
  CHECK(f.client.state() == Client::State::kReady);
  CHECK(f.client.protocol_errors() == 4);
  REQUIRE(f.events.size() == 1);
  CHECK(f.events[0].data.is_object());  // non-object data replaced
  CHECK(f.events[0].seconds == 0);
}

TEST_CASE("qmp: callbacks may close the client from inside on_data") {
  FakeTransport t;
  Client* self = nullptr;
  int events = 0;
  Client c(t, Client::Callbacks{nullptr,
                                [&](const Event&) {
                                  events++;
                                  self->close("enough");
                                },
                                nullptr});
  self = &c;
  c.on_data(kGreeting);
  c.on_data(json{{"return", json::object()}, {"id", t.sent[0]["id"]}}.dump() +
            "\n" + R"({"event": "A"})" "\n" R"({"event": "B"})" "\n");
  CHECK(events == 1);
  CHECK(c.state() == Client::State::kClosed);
}

TEST_CASE("qmp: hostile nesting and value counts close the connection") {
  // nlohmann::json copies, compares and dumps recursively: a message this
  // deep would overflow the stack wherever it is copied.
  for (const char* where : {"event", "reply", "greeting"}) {
    DYNAMIC_SECTION(where) {
      FakeTransport t;
      std::vector<std::string> closed;
      int replies = 0;
      Client c(t, Client::Callbacks{nullptr, [](const Event&) {},
                                    [&](const std::string& r) {
                                      closed.push_back(r);
                                    }});
      std::string deep = std::string(70000, '[') + std::string(70000, ']');
      if (std::string(where) == "greeting") {
        c.on_data("{\"QMP\":" + deep + "}\n");
      } else {
        c.on_data(kGreeting);
        c.on_data(json{{"return", json::object()}, {"id", t.sent[0]["id"]}}
                      .dump() + "\n");
        auto id = c.execute("query-kvmx-chan", json(),
                            [&](Result<json>) { replies++; });
        if (std::string(where) == "event")
          c.on_data("{\"event\":\"X\",\"data\":{\"a\":" + deep + "}}\n");
        else
          c.on_data("{\"return\":" + deep + ",\"id\":" +
                    std::to_string(*id) + "}\n");
      }
      CHECK(c.state() == Client::State::kClosed);
      CHECK(t.closed);
      REQUIRE(closed.size() == 1);
      CHECK(closed[0].find("nested deeper than 64 levels") != std::string::npos);
      CHECK(c.protocol_errors() == 1);
      // The pending command failed (disconnected), it got no deep value.
      CHECK(replies == (std::string(where) == "greeting" ? 0 : 1));
    }
  }
  SECTION("64 levels are fine") {
    Fixture f;
    f.handshake();
    std::string ok = std::string(62, '[') + std::string(62, ']');
    f.client.on_data("{\"event\":\"X\",\"data\":{\"a\":" + ok + "}}\n");
    CHECK(f.client.state() == Client::State::kReady);
    REQUIRE(f.events.size() == 1);
  }
  SECTION("too many values") {
    FakeTransport t;
    std::vector<std::string> closed;
    Client c(t, Client::Callbacks{nullptr, nullptr,
                                  [&](const std::string& r) {
                                    closed.push_back(r);
                                  }},
             Client::kDefaultMaxLine, 1000);
    c.on_data(kGreeting);
    c.on_data(json{{"return", json::object()}, {"id", t.sent[0]["id"]}}.dump() +
              "\n");
    json many = json::array();
    for (int i = 0; i < 2000; i++) many.push_back(i);
    c.on_data(json{{"event", "X"}, {"data", {{"a", many}}}}.dump() + "\n");
    CHECK(c.state() == Client::State::kClosed);
    REQUIRE(closed.size() == 1);
    CHECK(closed[0].find("more than 1000 values") != std::string::npos);
  }
}

TEST_CASE("qmp: events and replies split and joined across reads") {
  Fixture f;
  f.handshake();
  std::vector<std::string> got;
  auto id = f.client.execute("q", json(), [&](Result<json> r) {
    got.push_back(r ? r->dump() : r.error().code);
  });
  std::string both =
      R"({"event": "A", "data": {"s": "a\"}b\n{"}})" "\r\n" +
      json{{"return", {{"x", 1}}}, {"id", *id}}.dump() + "\n" +
      R"({"event": "B"})" "\n";
  // Every split point of the joined messages.
  for (size_t cut = 0; cut <= both.size(); cut++) {
    Fixture g;
    g.handshake();
    std::vector<std::string> r;
    auto gid = g.client.execute("q", json(), [&](Result<json> x) {
      r.push_back(x ? x->dump() : x.error().code);
    });
    REQUIRE(*gid == *id);
    g.client.on_data(both.substr(0, cut));
    g.client.on_data(both.substr(cut));
    CHECK(r == std::vector<std::string>{R"({"x":1})"});
    REQUIRE(g.events.size() == 2);
    CHECK(g.events[0].data["s"] == "a\"}b\n{");
    CHECK(g.events[1].name == "B");
  }
  f.client.on_data(both);
  CHECK(got.size() == 1);
}

TEST_CASE("qmp: out-of-band execution when wanted and offered") {
  SECTION("offered and wanted: negotiated, exec-oob on request") {
    Fixture f;
    f.client.want_oob(true);
    f.client.on_data(kGreeting);
    REQUIRE(f.t.sent.size() == 1);
    CHECK(f.t.sent[0]["arguments"] == json{{"enable", json::array({"oob"})}});
    f.client.on_data(json{{"return", json::object()}, {"id", f.t.sent[0]["id"]}}
                         .dump() + "\n");
    REQUIRE(f.client.state() == Client::State::kReady);
    CHECK(f.client.oob());
    int answers = 0;
    REQUIRE(f.client.execute("query-status", json(), [&](Result<json>) {
                      answers++;
                    }).ok());
    REQUIRE(f.client.execute("migrate-recover", json{{"uri", "unix:/x"}},
                             [&](Result<json>) { answers += 10; }, true)
                .ok());
    CHECK(f.t.sent[1].contains("execute"));
    CHECK(f.t.sent[2]["exec-oob"] == "migrate-recover");
    CHECK(!f.t.sent[2].contains("execute"));
    // Out of order: the out-of-band answer first.
    f.client.on_data(json{{"return", json::object()}, {"id", f.t.sent[2]["id"]}}
                         .dump() + "\n");
    CHECK(answers == 10);
    f.client.on_data(json{{"return", json::object()}, {"id", f.t.sent[1]["id"]}}
                         .dump() + "\n");
    CHECK(answers == 11);
  }
  SECTION("wanted, not offered: plain, and exec-oob never sent") {
    Fixture f;
    f.client.want_oob(true);
    f.client.on_data(
        R"({"QMP": {"version": {"qemu": {"micro": 0, "minor": 0, "major": 10}}, "capabilities": []}})"
        "\n");
    REQUIRE(f.t.sent.size() == 1);
    CHECK(!f.t.sent[0].contains("arguments"));
    f.client.on_data(json{{"return", json::object()}, {"id", f.t.sent[0]["id"]}}
                         .dump() + "\n");
    CHECK_FALSE(f.client.oob());
    REQUIRE(f.client.execute("migrate-recover", json(), [](Result<json>) {},
                             true).ok());
    CHECK(f.t.sent[1]["execute"] == "migrate-recover");
  }
  SECTION("offered, not wanted (the default): plain") {
    Fixture f;
    f.handshake();
    CHECK(!f.t.sent[0].contains("arguments"));
    CHECK_FALSE(f.client.oob());
  }
}
