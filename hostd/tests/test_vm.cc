// One VM's QMP connection against an in-process fake QEMU monitor on a
// real Unix socket: handshake, events, reconnect with backoff, gone,
// timeouts.
#include <sys/socket.h>
#include <unistd.h>

#include <catch2/catch_test_macros.hpp>

#include "common/unix_socket.h"
#include "test_helpers.h"
#include "vm/manager.h"

using nlohmann::json;
using namespace kvmx;
using namespace std::chrono_literals;

namespace {

// A QMP server speaking through the event loop.  `greet` false: accepts but
// stays silent (as a monitor busy with another client looks).
struct FakeMonitor {
  EventLoop& loop;
  std::string path;
  UniqueFd listener;
  UniqueFd conn;
  std::string in;
  bool greet = true;
  bool answer_queries = true;
  json devices = json::array({json{{"id", "chan0"}}});
  int accepted = 0;

  FakeMonitor(EventLoop& l, std::string p) : loop(l), path(std::move(p)) {
    auto fd = unix_listen(path, 0600);
    REQUIRE(fd.ok());
    listener = std::move(*fd);
    REQUIRE(loop.add(listener.get(), EPOLLIN, [this](uint32_t) { accept(); })
                .ok());
  }
  ~FakeMonitor() { stop(); }

  void accept() {
    UniqueFd c(::accept4(listener.get(), nullptr, nullptr, SOCK_NONBLOCK));
    if (!c) return;
    hangup();
    conn = std::move(c);
    accepted++;
    REQUIRE(loop.add(conn.get(), EPOLLIN, [this](uint32_t) { readable(); })
                .ok());
    if (greet) send(json{{"QMP", {{"version", {{"qemu", {{"major", 10}, {"minor", 0}, {"micro", 1}}}}}}}});
  }
  void send(const json& j) {
    std::string s = j.dump() + "\n";
    REQUIRE(::write(conn.get(), s.data(), s.size()) ==
            static_cast<ssize_t>(s.size()));
  }
  void readable() {
    char buf[4096];
    ssize_t n = ::read(conn.get(), buf, sizeof(buf));
    if (n <= 0) {
      hangup();
      return;
    }
    in.append(buf, static_cast<size_t>(n));
    size_t nl;
    while ((nl = in.find('\n')) != std::string::npos) {
      json cmd = json::parse(in.substr(0, nl));
      in.erase(0, nl + 1);
      if (cmd["execute"] == "query-kvmx-chan" && !answer_queries) continue;
      json ret = cmd["execute"] == "query-kvmx-chan" ? devices : json::object();
      send(json{{"return", ret}, {"id", cmd["id"]}});
    }
  }
  void hangup() {
    if (!conn) return;
    loop.remove(conn.get());
    conn.reset();
    in.clear();
  }
  // QEMU exits: connection and socket file gone.
  void stop() {
    hangup();
    if (listener) {
      loop.remove(listener.get());
      listener.reset();
      ::unlink(path.c_str());
    }
  }
};

struct Fixture {
  test::TempDir dir;
  std::unique_ptr<EventLoop> loop = std::move(*EventLoop::create());
  std::string path = dir / "vm.qmp";
  std::vector<std::string> states;
  std::vector<std::string> events;
  std::unique_ptr<vm::Manager> mgr;

  explicit Fixture(size_t max_devices_bytes = 1 << 20) {
    vm::Options opt;
    opt.max_devices_bytes = max_devices_bytes;
    opt.handshake_timeout = 100ms;
    opt.command_timeout = 100ms;
    opt.backoff_min = 10ms;
    opt.backoff_max = 40ms;
    vm::Hooks hooks;
    hooks.on_state = [this](vm::Vm& v, vm::State) {
      states.push_back(vm::to_string(v.state()));
    };
    hooks.on_event = [this](vm::Vm&, const qmp::Event& e) {
      events.push_back(e.name);
    };
    mgr = std::make_unique<vm::Manager>(*loop, opt, hooks);
  }

  // Runs the loop until `pred` holds or `limit` passes.
  template <typename Pred>
  bool run_until(Pred pred, std::chrono::milliseconds limit = 2000ms) {
    auto end = std::chrono::steady_clock::now() + limit;
    while (!pred() && std::chrono::steady_clock::now() < end) {
      loop->after(5ms, [this] { loop->stop(); });
      loop->run();
    }
    return pred();
  }
};

}  // namespace

TEST_CASE("vm: attaches, forwards events, reconnects after a drop") {
  Fixture f;
  FakeMonitor mon(*f.loop, f.path);
  vm::QmpVm& v = f.mgr->add("vm1", f.path, UniqueFd());
  REQUIRE(f.run_until([&] { return v.state() == vm::State::kAttached; }));
  CHECK(v.devices() == json::array({json{{"id", "chan0"}}}));
  CHECK(v.info()["qemu"] == "10.0.1");

  mon.send(json{{"event", "KVMX_VIOLATION"}, {"data", {{"seq", 1}}}});
  mon.send(json{{"event", "KVMX_CHAN_REJECTED"}, {"data", json::object()}});
  REQUIRE(f.run_until([&] { return f.events.size() == 2; }));
  CHECK(v.rejected() == 1);

  // Counted from here: on a loaded machine (the sanitizer build in CI) the
  // first handshake can time out, and hostd then attaches on a second
  // connection before the test gets here.
  int accepted = mon.accepted;
  size_t seen = f.states.size();
  CHECK(f.states.back() == "attached");
  mon.hangup();  // QEMU closed the monitor, the socket stays
  REQUIRE(f.run_until([&] { return mon.accepted == accepted + 1 &&
                                   v.state() == vm::State::kAttached; }));
  CHECK(v.reconnects() == 1);
  CHECK(std::vector<std::string>(f.states.begin() + seen, f.states.end()) ==
        std::vector<std::string>{"disconnected", "connecting", "attached"});
}

TEST_CASE("vm: the socket file disappearing makes it gone, for good") {
  Fixture f;
  auto mon = std::make_unique<FakeMonitor>(*f.loop, f.path);
  vm::QmpVm& v = f.mgr->add("vm1", f.path, UniqueFd());
  REQUIRE(f.run_until([&] { return v.state() == vm::State::kAttached; }));
  mon.reset();
  REQUIRE(f.run_until([&] { return v.state() == vm::State::kGone; }));
  CHECK(v.last_error().find("no longer exists") != std::string::npos);
  CHECK(f.loop->pending_timers() == 0);  // no more retries
}

TEST_CASE("vm: a monitor that never greets times out and is retried") {
  Fixture f;
  FakeMonitor mon(*f.loop, f.path);
  mon.greet = false;
  vm::QmpVm& v = f.mgr->add("vm1", f.path, UniqueFd());
  CHECK(v.state() == vm::State::kConnecting);
  REQUIRE(f.run_until([&] { return mon.accepted >= 2; }));
  CHECK(v.last_error().find("no QMP handshake") != std::string::npos);
  mon.greet = true;
  REQUIRE(f.run_until([&] { return v.state() == vm::State::kAttached; }));
}

TEST_CASE("vm: when_settled reports attach, failure and timeout") {
  Fixture f;
  FakeMonitor mon(*f.loop, f.path);
  std::vector<int> kinds;
  auto record = [&](const vm::Settled& s) { kinds.push_back(s.kind); };

  vm::QmpVm& v = f.mgr->add("vm1", f.path, UniqueFd());
  v.when_settled(1000ms, record);
  REQUIRE(f.run_until([&] { return kinds.size() == 1; }));
  CHECK(kinds[0] == vm::Settled::kAttached);

  mon.greet = false;
  mon.hangup();
  REQUIRE(f.run_until([&] { return v.state() == vm::State::kConnecting; }));
  v.when_settled(20ms, record);
  REQUIRE(f.run_until([&] { return kinds.size() == 2; }));
  CHECK(kinds[1] == vm::Settled::kTimeout);

  v.when_settled(1000ms, record);
  REQUIRE(f.run_until([&] { return kinds.size() == 3; }));
  CHECK(kinds[2] == vm::Settled::kFailed);  // the handshake timed out

  v.when_settled(1000ms, record);
  f.mgr->remove("vm1");
  REQUIRE(f.run_until([&] { return kinds.size() == 4; }));
  CHECK(kinds[3] == vm::Settled::kRemoved);
}

TEST_CASE("vm: protections queries time out and fail when not attached") {
  Fixture f;
  FakeMonitor mon(*f.loop, f.path);
  vm::QmpVm& v = f.mgr->add("vm1", f.path, UniqueFd());
  std::vector<std::string> codes;
  v.query_protections([&](Result<json> r) {
    codes.push_back(r ? "ok" : r.error().code);
  });
  REQUIRE(codes == std::vector<std::string>{"vm-not-connected"});
  REQUIRE(f.run_until([&] { return v.state() == vm::State::kAttached; }));

  v.query_protections([&](Result<json> r) {
    codes.push_back(r ? "ok" : r.error().code);
  });
  REQUIRE(f.run_until([&] { return codes.size() == 2; }));
  CHECK(codes[1] == "ok");

  mon.answer_queries = false;
  v.query_protections([&](Result<json> r) {
    codes.push_back(r ? "ok" : r.error().code);
  });
  REQUIRE(f.run_until([&] { return codes.size() == 3; }));
  CHECK(codes[2] == "timeout");

  // A query pending when the VM is detached is answered, not lost.
  v.query_protections([&](Result<json> r) {
    codes.push_back(r ? "ok" : r.error().code);
  });
  f.mgr->remove("vm1");
  REQUIRE(codes.size() == 4);
  CHECK(codes[3] == "vm-not-connected");
}

TEST_CASE("vm: a query-kvmx-chan answer over max-devices-bytes is not kept") {
  Fixture f(4096);
  FakeMonitor mon(*f.loop, f.path);
  json big = json::array();
  for (int i = 0; i < 200; i++)
    big.push_back(json{{"id", "chan" + std::to_string(i)},
                       {"entries", json::array({1, 2, 3})}});
  REQUIRE(big.dump().size() > 4096);
  mon.devices = big;
  vm::QmpVm& v = f.mgr->add("vm1", f.path, UniqueFd());
  REQUIRE(f.run_until([&] { return v.state() == vm::State::kAttached; }));
  // Attached (events are recorded), but the list is not held.
  CHECK(v.devices().is_null());
  CHECK(v.devices_error().find("over max-devices-bytes (4096)") !=
        std::string::npos);
  CHECK(v.info()["devices_error"] == v.devices_error());
  std::string code;
  v.query_protections([&](Result<json> r) { code = r ? "ok" : r.error().code; });
  REQUIRE(f.run_until([&] { return !code.empty(); }));
  CHECK(code == "response-too-large");
  // A small answer is relayed and kept again at the next connection.
  mon.devices = json::array({json{{"id", "chan0"}}});
  code.clear();
  v.query_protections([&](Result<json> r) { code = r ? "ok" : r.error().code; });
  REQUIRE(f.run_until([&] { return !code.empty(); }));
  CHECK(code == "ok");
  mon.hangup();
  REQUIRE(f.run_until([&] { return mon.accepted == 2 &&
                                   v.state() == vm::State::kAttached; }));
  CHECK(v.devices() == mon.devices);
  CHECK(v.devices_error().empty());
}

TEST_CASE("vm: a deeply nested QMP message drops the connection, not hostd") {
  Fixture f;
  FakeMonitor mon(*f.loop, f.path);
  vm::QmpVm& v = f.mgr->add("vm1", f.path, UniqueFd());
  REQUIRE(f.run_until([&] { return v.state() == vm::State::kAttached; }));
  // 70000 levels: enough to overflow the stack of a recursive copy.
  std::string deep = "{\"event\":\"KVMX_VIOLATION\",\"data\":{\"x\":" +
                     std::string(70000, '[') + std::string(70000, ']') + "}}\n";
  REQUIRE(::write(mon.conn.get(), deep.data(), deep.size()) ==
          static_cast<ssize_t>(deep.size()));
  REQUIRE(f.run_until([&] { return v.state() != vm::State::kAttached; }));
  CHECK(v.last_error().find("nested deeper than 64 levels") != std::string::npos);
  CHECK(v.protocol_errors() == 1);
  CHECK(f.events.empty());
  REQUIRE(f.run_until([&] { return v.state() == vm::State::kAttached; }));
}

TEST_CASE("vm: quarantined VMs stay unconnected until reconnect_now") {
  Fixture f;
  FakeMonitor mon(*f.loop, f.path);
  vm::QmpVm& v = f.mgr->add("vm1", f.path, UniqueFd(), false);
  v.quarantine("hostd crashed on it");
  f.run_until([] { return false; }, 100ms);
  CHECK(v.state() == vm::State::kQuarantined);
  CHECK(mon.accepted == 0);
  CHECK(v.info()["state"] == "quarantined");
  CHECK(v.last_error() == "hostd crashed on it");
  v.reconnect_now();
  REQUIRE(f.run_until([&] { return v.state() == vm::State::kAttached; }));
  CHECK(mon.accepted == 1);
}

TEST_CASE("vm: input paused for back-pressure waits in the socket") {
  Fixture f;
  FakeMonitor mon(*f.loop, f.path);
  vm::QmpVm& v = f.mgr->add("vm1", f.path, UniqueFd());
  REQUIRE(f.run_until([&] { return v.state() == vm::State::kAttached; }));
  f.mgr->pause_input(true);
  mon.send(json{{"event", "KVMX_VIOLATION"}, {"data", {{"seq", 1}}}});
  f.run_until([] { return false; }, 100ms);
  CHECK(f.events.empty());
  CHECK(v.state() == vm::State::kAttached);
  f.mgr->pause_input(false);
  REQUIRE(f.run_until([&] { return f.events.size() == 1; }));
}
