// hostd's libvirt domain lifecycle (hostd/libvirt) against a fake Backend:
// the opt-in metadata, resync at (re)connect, lifecycle events, connection
// loss and backoff, the journal's domains, what cannot be followed, and
// QMP commands relayed through libvirt.
#include <algorithm>
#include <catch2/catch_test_macros.hpp>

#include <deque>

#include "libvirt/follower.h"
#include "libvirt/metadata.h"

using nlohmann::json;
using namespace kvmx;
using namespace kvmx::libvirt;
using namespace std::chrono_literals;

namespace {

// -- the opt-in -----------------------------------------------------------------

bool yes(std::string_view xml) {
  auto r = parse_opt_in(xml);
  return r.ok() && *r;
}
bool no(std::string_view xml) {
  auto r = parse_opt_in(xml);
  return r.ok() && !*r;
}
std::string error_of(std::string_view xml) {
  auto r = parse_opt_in(xml);
  return r.ok() ? "" : r.error().message;
}

}  // namespace

TEST_CASE("libvirt: the opt-in metadata element") {
  // What libvirt 11 returns, and what a domain XML may hold.
  CHECK(yes(R"(<hostd attach="yes"/>)"));
  CHECK(yes(R"(<kvmx:hostd xmlns:kvmx='urn:kvmx:hostd:1' attach='yes'/>)"));
  CHECK(yes("<?xml version=\"1.0\"?>\n<!-- c -->\n  <hostd\n attach = \"yes\" >"
            "</hostd>\n"));
  CHECK(yes(R"(<hostd other="x" attach="yes"><note/></hostd>)"));
  CHECK(no(R"(<hostd attach="no"/>)"));

  CHECK(error_of(R"(<other attach="yes"/>)").find("is not <hostd>") !=
        std::string::npos);
  CHECK(error_of("<hostd/>").find("no attach attribute") != std::string::npos);
  CHECK(error_of(R"(<hostd attach="true"/>)").find("neither") !=
        std::string::npos);
  CHECK(error_of(R"(<hostd attach="y&amp;es"/>)").find("'y&es'") !=
        std::string::npos);
  CHECK(error_of("<hostd attach=yes/>").find("not quoted") != std::string::npos);
  CHECK(error_of(R"(<hostd attach="yes" attach="no"/>)").find("twice") !=
        std::string::npos);
  CHECK(!error_of(R"(<hostd attach="yes")").empty());
  CHECK(!error_of(R"(<hostd attach="yes)").empty());
  CHECK(!error_of("").empty());
  CHECK(!error_of("attach='yes'").empty());
  CHECK(!error_of("<!-- never closed").empty());

  std::string why;
  CHECK(opts_in(std::string(R"(<hostd attach="yes"/>)"), "", &why));
  CHECK(why.empty());
  CHECK(!opts_in(std::nullopt, "", &why));
  CHECK(why.find("no <kvmx:hostd") != std::string::npos);
  CHECK(!opts_in(std::string(R"(<hostd attach="no"/>)"), "", &why));
  CHECK(why.find("attach='no'") != std::string::npos);
  CHECK(!opts_in(std::string(R"(<hostd attach="yes"/>)"), "RPC failed", &why));
  CHECK(why.find("RPC failed") != std::string::npos);
}

namespace {

// -- a fake libvirt -------------------------------------------------------------

struct FakeBackend : Backend {
  explicit FakeBackend(EventLoop& l) : loop(l) {}

  EventLoop& loop;
  Callbacks cb;
  int opens = 0;
  std::deque<ListFn> lists;  // list_running calls not answered yet
  struct Cmd {
    std::string domain, command;
    ReplyFn fn;
  };
  std::vector<json> arguments;  // of every call
  std::deque<Cmd> cmds;  // qmp_command calls not answered yet
  bool auto_answer = true;
  std::vector<std::string> commands;  // "domain command", every call

  void set_callbacks(Callbacks c) override { cb = std::move(c); }
  void open() override { opens++; }
  void list_running(ListFn fn) override { lists.push_back(std::move(fn)); }
  void qmp_command(const std::string& domain, const std::string& command,
                   const json& args, ReplyFn fn) override {
    commands.push_back(domain + " " + command);
    arguments.push_back(args);
    if (!auto_answer) {
      cmds.push_back(Cmd{domain, command, std::move(fn)});
      return;
    }
    loop.defer([command, fn = std::move(fn)] { fn(answer(command)); });
  }

  static Result<json> answer(const std::string& command) {
    if (command == "query-version")
      return json{{"qemu", {{"major", 10}, {"minor", 0}, {"micro", 13}}}};
    if (command == "query-kvmx-chan")
      return json::array({json{{"id", "chan0"}, {"violations", 0}}});
    if (command == "qom-get") return json("/run/kvmx/vm.purge");
    return make_error("qmp-error", "CommandNotFound: " + command);
  }

  // Answers the oldest list_running call.
  void list(std::vector<Domain> running) {
    REQUIRE(!lists.empty());
    auto fn = std::move(lists.front());
    lists.pop_front();
    fn(std::move(running));
  }
  void list_fails(const std::string& why) {
    REQUIRE(!lists.empty());
    auto fn = std::move(lists.front());
    lists.pop_front();
    fn(make_error("libvirt", why));
  }
  void reply(Result<json> r) {
    REQUIRE(!cmds.empty());
    auto c = std::move(cmds.front());
    cmds.pop_front();
    c.fn(std::move(r));
  }
  void lifecycle(Lifecycle kind, const Domain& d, const std::string& what) {
    LifecycleEvent ev;
    ev.kind = kind;
    ev.domain = d;
    ev.what = what;
    cb.on_lifecycle(ev);
  }
  void event(const std::string& domain, const std::string& name,
             json data = json::object()) {
    qmp::Event ev;
    ev.name = name;
    ev.data = std::move(data);
    cb.on_monitor_event(domain, ev);
  }
};

Domain opted(const std::string& name) {
  return Domain{name, "uuid-" + name, std::string(R"(<hostd attach="yes"/>)"),
                ""};
}
Domain plain(const std::string& name) {
  return Domain{name, "uuid-" + name, std::nullopt, ""};
}

struct Fixture {
  std::unique_ptr<EventLoop> loop = std::move(*EventLoop::create());
  FakeBackend backend{*loop};
  std::unique_ptr<vm::Manager> mgr;
  std::unique_ptr<Follower> follower;
  std::vector<std::string> states;   // "vm:state" at every change
  std::vector<std::string> events;   // "vm:event"
  std::vector<std::string> persisted;
  bool persist_fails = false;

  explicit Fixture(size_t max_vms = 8) {
    vm::Options vo;
    vo.handshake_timeout = 100ms;
    vo.command_timeout = 100ms;
    vo.backoff_min = 10ms;
    vo.backoff_max = 40ms;
    vm::Hooks hooks;
    hooks.on_state = [this](vm::Vm& v, vm::State) {
      states.push_back(v.name() + ":" + vm::to_string(v.state()));
    };
    hooks.on_event = [this](vm::Vm& v, const qmp::Event& e) {
      events.push_back(v.name() + ":" + e.name);
    };
    mgr = std::make_unique<vm::Manager>(*loop, vo, hooks);
    Options o;
    o.uri = "qemu:///system";
    o.max_vms = max_vms;
    o.command_timeout = 50ms;
    o.backoff_min = 10ms;
    o.backoff_max = 40ms;
    follower = std::make_unique<Follower>(
        *loop, backend, *mgr, o, [this](const DomainVm& v) -> Result<void> {
          if (persist_fails) return make_error("journal", "disk full");
          persisted.push_back(v.name());
          return {};
        });
  }
  ~Fixture() {
    mgr->clear();
    follower.reset();
  }

  template <typename Pred>
  bool run_until(Pred pred, std::chrono::milliseconds limit = 2000ms) {
    auto end = std::chrono::steady_clock::now() + limit;
    while (!pred() && std::chrono::steady_clock::now() < end) {
      loop->after(2ms, [this] { loop->stop(); });
      loop->run();
    }
    return pred();
  }
  void settle() { run_until([] { return false; }, 20ms); }

  DomainVm* vm(const std::string& name) {
    return dynamic_cast<DomainVm*>(mgr->find(name));
  }
  std::string state(const std::string& name) {
    auto* v = mgr->find(name);
    return v ? vm::to_string(v->state()) : "none";
  }
  // Started and connected, with `running` as the first resync's list.
  void connect(std::vector<Domain> running) {
    follower->start();
    REQUIRE(backend.opens == 1);
    backend.cb.on_open();
    backend.list(std::move(running));
    settle();
  }
};

}  // namespace

TEST_CASE("libvirt: the first resync follows running domains that opt in") {
  Fixture f;
  f.connect({opted("web1"), plain("db1"), opted("web2")});
  CHECK(f.state("web1") == "attached");
  CHECK(f.state("web2") == "attached");
  CHECK(f.state("db1") == "none");  // no metadata: ignored
  CHECK(f.persisted == std::vector<std::string>{"web1", "web2"});

  DomainVm* v = f.vm("web1");
  REQUIRE(v);
  json info = v->info();
  CHECK(info["source"] == "libvirt");
  CHECK(info["qmp"].is_null());
  CHECK(info["libvirt"]["uri"] == "qemu:///system");
  CHECK(info["libvirt"]["uuid"] == "uuid-web1");
  CHECK(info["qemu"] == "10.0.13");
  CHECK(info["devices"][0]["id"] == "chan0");
  CHECK(info["last_error"] == "");
  CHECK(f.backend.commands ==
        std::vector<std::string>{"web1 query-version", "web2 query-version",
                                 "web1 query-kvmx-chan",
                                 "web2 query-kvmx-chan"});

  json s = f.follower->stats();
  CHECK(s["enabled"] == true);
  CHECK(s["connected"] == true);
  CHECK(s["domains"] == 2);
  CHECK(s["domains_attached"] == 2);
  CHECK(s["reconnects"] == 0);
}

TEST_CASE("libvirt: start attaches, stop detaches, events only in between") {
  Fixture f;
  f.connect({});
  f.backend.event("web1", "KVMX_VIOLATION");  // not followed yet
  CHECK(f.follower->counters().events_ignored == 1);

  // libvirt 11 sends RESUMED (unpaused) before STARTED (booted).
  f.backend.lifecycle(Lifecycle::kResumed, opted("web1"), "resumed (unpaused)");
  CHECK(f.state("web1") == "connecting");
  // Events while the attach is under way are not lost.
  f.backend.event("web1", "KVMX_VIOLATION", {{"seq", 1}});
  f.backend.lifecycle(Lifecycle::kStarted, opted("web1"), "started (booted)");
  f.settle();
  CHECK(f.state("web1") == "attached");
  f.backend.event("web1", "KVMX_CHAN_REJECTED");
  CHECK(f.events == std::vector<std::string>{"web1:KVMX_VIOLATION",
                                             "web1:KVMX_CHAN_REJECTED"});
  CHECK(f.vm("web1")->rejected() == 1);
  CHECK(f.backend.commands.size() == 2);  // STARTED did not attach again

  for (const char* what : {"stopped (destroyed)", "stopped (crashed)",
                           "stopped (shut down)", "stopped (failed)"}) {
    f.backend.lifecycle(Lifecycle::kStopped, plain("web1"), what);
    CHECK(f.state("web1") == "stopped");
    CHECK(f.vm("web1")->last_error() == std::string("domain ") + what);
    f.backend.event("web1", "KVMX_VIOLATION");  // not expected: ignored
    CHECK(f.events.size() == 2);
    CHECK(f.follower->stats()["domains_attached"] == 0);
    f.backend.lifecycle(Lifecycle::kStarted, opted("web1"), "started (booted)");
    f.settle();
    CHECK(f.state("web1") == "attached");
  }
  CHECK(f.vm("web1")->reconnects() == 4);
  CHECK(f.persisted == std::vector<std::string>{"web1"});  // once

  // Events of other domains, stops of unknown ones: nothing.
  f.backend.event("other", "KVMX_VIOLATION");
  f.backend.lifecycle(Lifecycle::kStopped, plain("other"), "stopped (destroyed)");
  f.backend.lifecycle(Lifecycle::kOther, plain("web1"), "event 3 detail 0");
  CHECK(f.state("other") == "none");
  CHECK(f.state("web1") == "attached");

  // A domain started without the opt-in is not followed.
  f.backend.lifecycle(Lifecycle::kStarted, plain("db1"), "started (booted)");
  f.settle();
  CHECK(f.state("db1") == "none");
}

TEST_CASE("libvirt: a lost connection is retried with backoff and resynced") {
  Fixture f;
  f.connect({opted("web1"), opted("web2")});
  f.backend.cb.on_close("libvirtd closed the connection");
  CHECK(f.state("web1") == "disconnected");
  CHECK(f.vm("web1")->last_error() ==
        "libvirt connection lost: libvirtd closed the connection");
  CHECK(!f.follower->connected());
  f.backend.event("web1", "KVMX_VIOLATION");
  CHECK(f.events.empty());

  // Reconnect attempts back off: 10, 20, 40, 40 ms.
  REQUIRE(f.run_until([&] { return f.backend.opens == 2; }));
  for (int i = 0; i < 3; i++) {
    f.backend.cb.on_close("Failed to connect socket");
    REQUIRE(f.run_until([&] { return f.backend.opens == 3 + i; }));
  }
  CHECK(f.follower->counters().connect_failures == 3);
  CHECK(f.follower->stats()["last_error"] == "Failed to connect socket");

  // Back: web1 still runs, web2 went away meanwhile, web3 is new.
  f.backend.cb.on_open();
  f.backend.list({opted("web1"), opted("web3")});
  f.settle();
  CHECK(f.state("web1") == "attached");
  CHECK(f.state("web2") == "stopped");
  CHECK(f.vm("web2")->last_error() == "the domain is not running");
  CHECK(f.state("web3") == "attached");
  json s = f.follower->stats();
  CHECK(s["reconnects"] == 1);
  CHECK(s["disconnects"] == 1);
  CHECK(s["resyncs"] == 2);
  CHECK(s["last_error"] == "");
}

TEST_CASE("libvirt: a list from an earlier connection is ignored") {
  Fixture f;
  f.follower->start();
  f.backend.cb.on_open();
  REQUIRE(f.backend.lists.size() == 1);
  f.backend.cb.on_close("EOF");
  REQUIRE(f.run_until([&] { return f.backend.opens == 2; }));
  f.backend.cb.on_open();
  REQUIRE(f.backend.lists.size() == 2);
  f.backend.list({opted("old")});  // the first connection's answer
  f.backend.list({opted("new")});
  f.settle();
  CHECK(f.state("old") == "none");
  CHECK(f.state("new") == "attached");
}

TEST_CASE("libvirt: a failed list is retried") {
  Fixture f;
  f.follower->start();
  f.backend.cb.on_open();
  f.backend.list_fails("virConnectListAllDomains: timeout");
  CHECK(f.follower->stats()["last_error"] ==
        "virConnectListAllDomains: timeout");
  REQUIRE(f.run_until([&] { return f.backend.lists.size() == 1; }));
  f.backend.list({opted("web1")});
  f.settle();
  CHECK(f.state("web1") == "attached");
}

TEST_CASE("libvirt: domains from the journal wait for the first resync") {
  Fixture f;
  f.follower->adopt("ran", "uuid-ran");
  f.follower->adopt("runs", "uuid-runs");
  f.follower->adopt("optout", "uuid-optout");
  CHECK(f.state("ran") == "disconnected");
  CHECK(f.vm("ran")->persisted);
  CHECK(f.vm("ran")->last_error().empty());
  f.connect({opted("runs"), plain("optout")});
  CHECK(f.state("ran") == "stopped");
  CHECK(f.state("runs") == "attached");
  CHECK(f.state("optout") == "stopped");
  CHECK(f.vm("optout")->last_error().find("no <kvmx:hostd") !=
        std::string::npos);
  CHECK(f.persisted.empty());  // already in the journal
}

TEST_CASE("libvirt: domains that opt in but cannot be followed are skipped") {
  Fixture f(3);
  // A socket VM holds the name (its socket does not exist: gone).
  f.mgr->add("taken", "/nonexistent/taken.qmp", UniqueFd());
  f.connect({opted("taken"), opted("bad name"), opted(".hidden"),
             opted("ok1"), opted("ok2"), opted("over")});
  CHECK(f.mgr->find("taken")->source() == vm::Source::kQmp);
  CHECK(f.state("bad name") == "none");
  CHECK(f.state("ok1") == "attached");
  CHECK(f.state("ok2") == "attached");
  CHECK(f.state("over") == "none");  // max-vms 3
  CHECK(f.follower->counters().domains_skipped == 4);

  f.persist_fails = true;
  f.mgr->remove("ok2");
  f.backend.lifecycle(Lifecycle::kStarted, opted("nojournal"), "started");
  f.settle();
  CHECK(f.state("nojournal") == "none");
  CHECK(f.follower->counters().domains_skipped == 5);

  // Bad metadata: not followed, and a registered VM stops being followed.
  Domain d = opted("ok1");
  d.metadata = R"(<hostd attach="maybe"/>)";
  f.backend.lifecycle(Lifecycle::kStopped, d, "stopped (shut down)");
  f.backend.lifecycle(Lifecycle::kStarted, d, "started (booted)");
  f.settle();
  CHECK(f.state("ok1") == "stopped");
  CHECK(f.vm("ok1")->last_error().find("neither 'yes' nor 'no'") !=
        std::string::npos);
}

TEST_CASE("libvirt: attach through libvirt: races and unpatched QEMU") {
  Fixture f;
  f.backend.auto_answer = false;
  f.connect({});

  // The domain stopped before the attach got to it.
  f.backend.lifecycle(Lifecycle::kStarted, opted("quick"), "started (booted)");
  f.backend.reply(make_error("vm-not-connected",
                             "libvirt: domain is not running"));
  CHECK(f.state("quick") == "stopped");
  CHECK(f.backend.cmds.empty());

  // A STOPPED event while the attach waits: the late answer is ignored.
  f.backend.lifecycle(Lifecycle::kStarted, opted("late"), "started (booted)");
  f.backend.lifecycle(Lifecycle::kStopped, plain("late"), "stopped (destroyed)");
  f.backend.reply(FakeBackend::answer("query-version"));
  CHECK(f.state("late") == "stopped");
  CHECK(f.backend.cmds.empty());

  // QEMU without kvmx-chan: attached, no devices.
  f.backend.lifecycle(Lifecycle::kStarted, opted("stock"), "started (booted)");
  f.backend.reply(FakeBackend::answer("query-version"));
  f.backend.reply(make_error("qmp-error", "CommandNotFound: no such command"));
  CHECK(f.state("stock") == "attached");
  CHECK(f.vm("stock")->devices().is_null());

  // libvirt does not answer: the attach goes on after command_timeout.
  f.backend.lifecycle(Lifecycle::kStarted, opted("slow"), "started (booted)");
  REQUIRE(f.run_until([&] { return f.backend.cmds.size() == 2; }));
  CHECK(f.backend.cmds.back().command == "query-kvmx-chan");
  REQUIRE(f.run_until([&] { return f.state("slow") == "attached"; }));
  CHECK(f.vm("slow")->devices().is_null());
  f.backend.reply(FakeBackend::answer("query-version"));  // too late
  f.backend.reply(FakeBackend::answer("query-kvmx-chan"));
  CHECK(f.vm("slow")->devices().is_null());
}

TEST_CASE("libvirt: protections are relayed through libvirt") {
  Fixture f;
  f.connect({opted("web1")});
  REQUIRE(f.state("web1") == "attached");
  DomainVm* v = f.vm("web1");
  std::vector<std::string> got;
  auto record = [&](Result<json> r) {
    got.push_back(r ? r->dump() : r.error().code);
  };

  v->query_protections(record);
  REQUIRE(f.run_until([&] { return got.size() == 1; }));
  CHECK(got[0] == R"([{"id":"chan0","violations":0}])");

  f.backend.auto_answer = false;
  v->query_protections(record);
  REQUIRE(f.run_until([&] { return got.size() == 2; }));
  CHECK(got[1] == "timeout");
  f.backend.reply(FakeBackend::answer("query-kvmx-chan"));  // too late
  CHECK(got.size() == 2);

  v->query_protections(record);
  f.backend.reply(make_error("qmp-error", "GenericError: busy"));
  CHECK(got[2] == "qmp-error");

  // A query pending when the VM is detached is answered, not lost.
  v->query_protections(record);
  f.mgr->remove("web1");
  REQUIRE(got.size() == 4);
  CHECK(got[3] == "vm-not-connected");
  f.backend.reply(FakeBackend::answer("query-kvmx-chan"));  // after removal
  CHECK(got.size() == 4);

  // Not attached: refused at once.
  f.backend.lifecycle(Lifecycle::kStarted, opted("web2"), "started (booted)");
  f.vm("web2")->query_protections(record);
  CHECK(got[4] == "vm-not-connected");
}

TEST_CASE("libvirt: any QMP command, with arguments, through libvirt") {
  Fixture f;
  f.connect({opted("db1")});
  REQUIRE(f.state("db1") == "attached");
  vm::Vm* v = f.vm("db1");
  std::vector<std::string> got;
  auto record = [&](Result<json> r) {
    got.push_back(r ? r->dump() : r.error().code);
  };
  json args{{"path", "/objects/nv0mem"}, {"property", "purge-agent"}};
  v->monitor_command("qom-get", args, record);
  REQUIRE(f.run_until([&] { return got.size() == 1; }));
  CHECK(got[0] == R"("/run/kvmx/vm.purge")");
  CHECK(f.backend.commands.back() == "db1 qom-get");
  CHECK(f.backend.arguments.back() == args);

  v->monitor_command("stop", json::object(), record);
  REQUIRE(f.run_until([&] { return got.size() == 2; }));
  CHECK(got[1] == "qmp-error");
  CHECK(f.backend.arguments.back() == json::object());

  // Not attached: refused at once, nothing sent.
  f.backend.auto_answer = false;
  f.backend.lifecycle(Lifecycle::kStarted, opted("db2"), "started (booted)");
  f.vm("db2")->monitor_command("qom-get", args, record);
  CHECK(got.size() == 3);
  CHECK(got[2] == "vm-not-connected");
  CHECK(std::count(f.backend.commands.begin(), f.backend.commands.end(),
                   "db2 qom-get") == 0);
}

TEST_CASE("libvirt: without a backend a journal domain stays stopped") {
  auto loop = std::move(*EventLoop::create());
  vm::Hooks hooks;
  DomainVm v(*loop, "old", "qemu:///system", hooks, nullptr, 50ms);
  CHECK(v.state() == vm::State::kStopped);
  CHECK(v.last_error() == "kvmx-hostd runs without --libvirt");
  v.attach("uuid");
  CHECK(v.state() == vm::State::kStopped);
  std::string code;
  v.query_protections([&](Result<json> r) { code = r ? "ok" : r.error().code; });
  CHECK(code == "vm-not-connected");
}
