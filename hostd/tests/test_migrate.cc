// The migration: the switch policy, the storage check, and the job driving
// a simulated pair of QEMUs (what each is told, in which order, and how the
// job ends: completed, failed, cancelled, paused, recovered).
#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>
#include <map>
#include <set>

#include "migrate/dedup.h"
#include "migrate/file_job.h"
#include "migrate/job.h"
#include "migrate/policy.h"
#include "test_helpers.h"

using nlohmann::json;
using namespace kvmx;
using namespace kvmx::migrate;
using namespace std::chrono_literals;
using Catch::Matchers::ContainsSubstring;

namespace {

Sample at(uint64_t pass, uint64_t remaining, int ms = 0) {
  return Sample{pass, remaining, std::chrono::milliseconds(ms)};
}

}  // namespace

// -- SwitchPolicy -------------------------------------------------------------------

TEST_CASE("policy: after N passes, once") {
  SwitchPolicy p(PolicyConfig{false, 2, 0, 0});
  CHECK_FALSE(p.observe(at(1, 1000)));
  CHECK_FALSE(p.observe(at(2, 900)));
  CHECK_FALSE(p.observe(at(2, 100)));
  auto why = p.observe(at(3, 800));
  REQUIRE(why);
  CHECK(*why == "2 precopy passes complete");
  CHECK_FALSE(p.observe(at(4, 800)));  // it said so once

  SwitchPolicy one(PolicyConfig{false, 1, 0, 0});
  CHECK_FALSE(one.observe(at(1, 5)));
  REQUIRE(one.observe(at(2, 5)));
}

TEST_CASE("policy: remaining that stops shrinking, from the second pass") {
  SwitchPolicy p(PolicyConfig{false, 0, 3, 0});
  // The first pass never counts, however flat.
  for (int i = 0; i < 10; i++) CHECK_FALSE(p.observe(at(1, 1000)));
  // Second pass: a new low each sample, then flat (within 1/16).
  CHECK_FALSE(p.observe(at(2, 1000)));
  CHECK_FALSE(p.observe(at(2, 800)));
  CHECK_FALSE(p.observe(at(2, 600)));
  CHECK_FALSE(p.observe(at(2, 590)));  // not 1/16 lower: no progress
  CHECK_FALSE(p.observe(at(3, 900)));  // a new pass, higher
  auto why = p.observe(at(3, 620));
  REQUIRE(why);
  CHECK_THAT(*why, ContainsSubstring("remaining stopped shrinking"));
  CHECK_THAT(*why, ContainsSubstring("600 bytes in 3 samples"));
}

TEST_CASE("policy: a clear new low starts the count again") {
  SwitchPolicy p(PolicyConfig{false, 0, 2, 0});
  CHECK_FALSE(p.observe(at(2, 1600)));
  CHECK_FALSE(p.observe(at(2, 1600)));  // 1
  CHECK_FALSE(p.observe(at(2, 1400)));  // a new low: 0
  CHECK_FALSE(p.observe(at(2, 1500)));  // 1
  CHECK(p.observe(at(2, 1399)));        // 2: not 1/16 below 1400
}

TEST_CASE("policy: after S seconds; manual never; every rule off never") {
  SwitchPolicy t(PolicyConfig{false, 0, 0, 10});
  CHECK_FALSE(t.observe(at(1, 100, 9999)));
  auto why = t.observe(at(1, 100, 10000));
  REQUIRE(why);
  CHECK(*why == "precopy ran 10 seconds");

  SwitchPolicy m(PolicyConfig{true, 1, 1, 1});
  for (int i = 1; i < 50; i++) CHECK_FALSE(m.observe(at(i, 100, i * 1000)));
  CHECK(m.describe() == "manual (migrate-postcopy)");

  SwitchPolicy off(PolicyConfig{false, 0, 0, 0});
  for (int i = 1; i < 50; i++) CHECK_FALSE(off.observe(at(i, 100, i * 1000)));
  CHECK(off.describe() == "on request only (every rule is off)");
  CHECK(SwitchPolicy(PolicyConfig{}).describe() ==
        "after 1 pass, or when remaining stalls for 5 samples");
}

// -- the storage check ----------------------------------------------------------------

TEST_CASE("storage: --shared-storage needs the same files, and only then") {
  test::TempDir dir;
  test::write_file(dir / "a.img", "a");
  test::write_file(dir / "b.img", "b");
  std::string a = dir / "a.img", b = dir / "b.img";
  std::vector<Backend> src = {{"mem1", a, true}};
  std::vector<Backend> same = {{"mem1", a, true}};
  std::vector<Backend> other = {{"mem1", b, true}};
  std::vector<Backend> none;

  CHECK(check_storage(src, other, false, "s", "d") == "");
  CHECK(check_storage(src, same, true, "s", "d") == "");
  CHECK_THAT(check_storage(src, other, true, "s", "d"),
             ContainsSubstring("which VM 's' does not"));
  CHECK_THAT(check_storage(src, same, false, "s", "d"),
             ContainsSubstring("both map '" + a + "'"));
  CHECK_THAT(check_storage(none, none, true, "s", "d"),
             ContainsSubstring("no shared file-backed memory"));
  // A file the source maps shared and the destination does not.
  std::vector<Backend> two = {{"mem1", a, true}, {"mem2", b, true}};
  CHECK_THAT(check_storage(two, same, true, "s", "d"),
             ContainsSubstring("'" + b + "' (mem2) shared"));
  // Paths that this host cannot look at (a QEMU elsewhere): by path.
  std::vector<Backend> r1 = {{"m", "/nonexistent/x.img", true}};
  CHECK(check_storage(r1, r1, true, "s", "d") == "");
  CHECK(check_storage(r1, r1, false, "s", "d") == "");  // not known the same
  CHECK(same_file(a, a) == Identity::kSame);
  CHECK(same_file(a, b) == Identity::kDifferent);
  CHECK(same_file(a, "/nonexistent") == Identity::kUnknown);
}

// -- the job against a simulated pair of QEMUs -------------------------------------------

namespace {

// Both QEMUs of one migration, as far as the job can see them.
struct Pair {
  explicit Pair(EventLoop& l) : loop(l) {}
  EventLoop& loop;
  // What each QEMU knows.
  std::set<std::string> caps = {"postcopy-ram", "x-ignore-shared", "events"};
  bool prefetch_param = false;
  std::string src_run = "running", dst_run = "inmigrate";
  std::string src_mig = "", dst_mig = "";
  std::map<std::string, bool> src_caps, dst_caps;
  json src_params = json::object(), dst_params = json::object();
  std::vector<Backend> src_backends = {{"mem1", "/nonexistent/src.img", true}};
  std::vector<Backend> dst_backends = {{"mem1", "/nonexistent/dst.img", true}};
  // The simulated migration: pass 1 sends `first`, every later pass
  // `dirty` (it never converges); `step` bytes per query-migrate.
  uint64_t first = 4000, dirty = 1000, step = 1000;
  uint64_t pass = 0, remaining = 0, transferred = 0, requests = 0;
  int postcopy_queries = 0, postcopy_len = 3;  // queries until completed
  std::string fail_desc;  // query-migrate says failed with this
  // Commands that fail: "<side> <command>" -> QEMU's description.
  std::map<std::string, std::string> refuse;
  std::vector<std::string> log;  // "<side> <command> <arguments>"
  std::string listening;          // the destination's URI
  std::vector<std::string> oob;   // commands sent out of band
  bool dst_hangs = false;  // the destination answers out of band only
  // query-kvmx-disk-dedup's answer on each side (none: an unknown command).
  std::optional<json> src_dd, dst_dd;
  std::set<std::string> caps_on;  // reported on by query-migrate-capabilities
  uint64_t refs = 0;              // pages as reference so far
  // postcopy-rdma as query-migrate reports it once post-copy started: the
  // source's status and reason; the destination's pages read grow by 7.
  std::string rdma_status = "active", rdma_reason;
  uint64_t rdma_read = 0;

  json answer(const std::string& side, const std::string& cmd,
              const json& args, std::string* err) {
    log.push_back(side + " " + cmd + (args.is_null() ? "" : " " + args.dump()));
    if (auto it = refuse.find(side + " " + cmd); it != refuse.end()) {
      *err = it->second;
      return nullptr;
    }
    bool src = side == "src";
    if (cmd == "query-status") return {{"status", src ? src_run : dst_run}};
    if (cmd == "query-migrate-capabilities") {
      json a = json::array();
      for (const auto& c : caps)
        a.push_back({{"capability", c}, {"state", caps_on.count(c) > 0}});
      return a;
    }
    if (cmd == "query-kvmx-disk-dedup") {
      const auto& dd = src ? src_dd : dst_dd;
      if (dd) return *dd;
      *err = "The command query-kvmx-disk-dedup has not been found";
      return nullptr;
    }
    if (cmd == "query-migrate-parameters") {
      json p = {{"max-bandwidth", 1}};
      if (prefetch_param) p["postcopy-prefetch-mode"] = "pattern";
      return p;
    }
    if (cmd == "qom-list") {
      json a = json::array({{{"name", "type"}, {"type", "string"}}});
      for (const auto& b : src ? src_backends : dst_backends)
        a.push_back({{"name", b.id}, {"type", "child<memory-backend-file>"}});
      a.push_back({{"name", "ram"}, {"type", "child<memory-backend-ram>"}});
      return a;
    }
    if (cmd == "qom-get") {
      for (const auto& b : src ? src_backends : dst_backends)
        if (args["path"] == "/objects/" + b.id)
          return args["property"] == "share" ? json(b.share) : json(b.path);
      *err = "no such object";
      return nullptr;
    }
    if (cmd == "migrate-set-capabilities") {
      for (const auto& c : args["capabilities"]) {
        if (!caps.count(c["capability"])) {
          *err = "Parameter 'capability' does not accept value '" +
                 c["capability"].get<std::string>() + "'";
          return nullptr;
        }
        (src ? src_caps : dst_caps)[c["capability"]] = c["state"];
      }
      return json::object();
    }
    if (cmd == "migrate-set-parameters") {
      for (const auto& [k, v] : args.items()) {
        if (k == "postcopy-prefetch-mode" && !prefetch_param) {
          *err = "Parameter '" + k + "' is unexpected";
          return nullptr;
        }
        (src ? src_params : dst_params)[k] = v;
      }
      return json::object();
    }
    if (cmd == "migrate-incoming") {
      listening = args["uri"];
      dst_mig = "setup";
      return json::object();
    }
    if (cmd == "migrate" && !args.contains("resume")) {
      src_mig = "active";
      dst_mig = "active";
      pass = 1;
      remaining = first;
      return json::object();
    }
    if (cmd == "migrate-start-postcopy") {
      src_mig = dst_mig = "postcopy-active";
      return json::object();
    }
    if (cmd == "migrate_cancel") {
      src_mig = "cancelled";
      dst_mig = "failed";
      return json::object();
    }
    if (cmd == "migrate-recover") {
      if (dst_mig != "postcopy-paused") {
        *err = "Migrate recover can only be run when postcopy is paused.";
        return nullptr;
      }
      listening = args["uri"];
      dst_mig = "postcopy-recover-setup";
      return json::object();
    }
    if (cmd == "migrate" && args.contains("resume")) {
      if (src_mig != "postcopy-paused" || listening != args["uri"]) {
        *err = "Cannot resume if there is no paused migration";
        return nullptr;
      }
      src_mig = dst_mig = "postcopy-active";
      return json::object();
    }
    if (cmd == "query-migrate") {
      if (src) advance();
      json r = json::object();
      const std::string& st = src ? src_mig : dst_mig;
      if (!st.empty()) r["status"] = st;
      if (src && !src_mig.empty() && src_mig != "setup")
        r["ram"] = {{"transferred", transferred}, {"remaining", remaining},
                    {"total", 1 << 20}, {"dirty-sync-count", pass},
                    {"postcopy-requests", requests}, {"mbps", 8.0}};
      if (src && src_mig == "completed") r["downtime"] = 12;
      if (src && src_mig == "failed") r["error-desc"] = fail_desc;
      auto& c = src ? src_caps : dst_caps;
      if (c.count("postcopy-rdma") && c["postcopy-rdma"] &&
          (src_mig == "postcopy-active" || src_mig == "completed")) {
        if (!src) rdma_read += 7;
        json pr = {{"status", rdma_status},
                   {"registered-bytes", src ? 1 << 20 : 0},
                   {"rejected", 0}, {"pages-read", src ? 0 : rdma_read},
                   {"read-failures", 0}, {"duplicates", 0},
                   {"bad-commands", 0}};
        if (!rdma_reason.empty()) pr["reason"] = rdma_reason;
        r["postcopy-rdma"] = pr;
      }
      if (c.count("disk-dedup") && c["disk-dedup"])
        r["disk-dedup"] = {{"pages-as-reference", src ? refs : 0},
                           {"bytes-saved", src ? refs * 4000 : 0},
                           {"images-refused", 0},
                           {"references-resolved", src ? 0 : refs},
                           {"mismatches", 0}, {"read-errors", 0},
                           {"read-time-ms", src ? 0 : 7}};
      return r;
    }
    *err = "The command " + cmd + " has not been found";
    return nullptr;
  }

  void advance() {
    if (src_mig == "active") {
      if (!fail_desc.empty()) {
        src_mig = "failed";
        return;
      }
      transferred += step;
      refs += 10;
      if (remaining > step) {
        remaining -= step;
      } else {
        pass++;
        remaining = dirty;
      }
    } else if (src_mig == "postcopy-active") {
      transferred += step;
      requests += 5;
      remaining = remaining > step ? remaining - step : 0;
      if (++postcopy_queries >= postcopy_len) src_mig = dst_mig = "completed";
    }
  }

  // The connection breaks during post-copy.
  void pause() {
    src_mig = dst_mig = "postcopy-paused";
  }
  int count(const std::string& prefix) const {
    int n = 0;
    for (const auto& l : log) n += l.rfind(prefix, 0) == 0 ? 1 : 0;
    return n;
  }
};

class FakeEndpoint final : public Endpoint {
 public:
  FakeEndpoint(Pair& pair, std::string side, std::string name)
      : pair_(pair), side_(std::move(side)), name_(std::move(name)) {}
  const std::string& name() const override { return name_; }
  void command(const std::string& cmd, const json& args, ReplyFn fn,
               bool oob) override {
    if (oob) pair_.oob.push_back(side_ + " " + cmd);
    if (side_ == "dst" && pair_.dst_hangs && !oob) {
      // Its main loop waits for a page: in-band commands get no answer.
      held_.push_back(std::move(fn));
      return;
    }
    std::string err;
    json r = pair_.answer(side_, cmd, args, &err);
    Result<json> res = err.empty() ? Result<json>(std::move(r))
                                   : Result<json>(make_error(
                                         "qmp-error", "GenericError: " + err));
    pair_.loop.defer([fn, res]() mutable { fn(std::move(res)); });
  }
  std::string lost() const override { return lost_; }
  std::string lost_;
  std::vector<ReplyFn> held_;
  void release() {
    for (auto& fn : held_)
      pair_.loop.defer([fn, st = pair_.dst_mig]() mutable {
        fn(json{{"status", st}});
      });
    held_.clear();
  }

 private:
  Pair& pair_;
  std::string side_, name_;
};

struct Run {
  std::unique_ptr<EventLoop> loop;
  std::unique_ptr<Pair> pair;
  FakeEndpoint* src = nullptr;
  FakeEndpoint* dst = nullptr;
  std::unique_ptr<Job> job;
  std::vector<json> events;
  int ends = 0, starts = 0;
  // Called on every event (may act on the pair or the job).
  std::function<void(const json&)> on_event;

  explicit Run(Settings s = base()) {
    loop = std::move(*EventLoop::create());
    pair = std::make_unique<Pair>(*loop);
    auto se = std::make_unique<FakeEndpoint>(*pair, "src", "web1");
    auto de = std::make_unique<FakeEndpoint>(*pair, "dst", "web1-new");
    src = se.get();
    dst = de.get();
    Job::Callbacks cb;
    cb.on_event = [this](const json& e) {
      events.push_back(e);
      if (on_event) on_event(e);
    };
    cb.on_started = [this] { starts++; };
    cb.on_end = [this] {
      ends++;
      loop->stop();
    };
    job = std::make_unique<Job>(*loop, std::move(s), std::move(se),
                                std::move(de), std::move(cb));
  }
  static Settings base() {
    Settings s;
    s.uri = "unix:/run/kvmx/migrate-web1.sock";
    s.postcopy = true;
    s.interval = 1ms;
    s.recover_backoff_min = 1ms;
    s.recover_backoff_max = 2ms;
    s.dest_pause_wait = 200ms;
    s.policy = PolicyConfig{false, 1, 0, 0};
    return s;
  }
  // Runs the loop until the job ends (or 5 s).
  void run() {
    auto guard = loop->after(5000ms, [this] { loop->stop(); });
    loop->run();
    loop->cancel(guard);
  }
  bool said(const std::string& text) const {
    for (const auto& e : events)
      if (e["message"].get<std::string>().find(text) != std::string::npos)
        return true;
    return false;
  }
};

}  // namespace

TEST_CASE("job: a post-copy migration by policy, both QEMUs told the same") {
  Run r;
  r.job->start();
  r.run();
  REQUIRE(r.job->ended());
  CHECK(r.ends == 1);
  CHECK(r.starts == 1);
  CHECK(r.job->state() == State::kCompleted);
  auto out = r.job->outcome();
  REQUIRE(out.ok());
  CHECK((*out)["state"] == "completed");
  CHECK((*out)["switched"] == true);
  CHECK((*out)["switch_reason"] == "1 precopy pass complete");
  CHECK((*out)["downtime_ms"] == 12);
  CHECK((*out)["postcopy_requests"].get<uint64_t>() > 0);
  // Capabilities on both, the destination first; the destination listens
  // before the source starts; the switch exactly once.
  Pair& p = *r.pair;
  CHECK(p.src_caps == std::map<std::string, bool>{{"postcopy-ram", true},
                                                  {"x-ignore-shared", false}});
  CHECK(p.dst_caps == p.src_caps);
  auto pos = [&](const std::string& prefix) {
    for (size_t i = 0; i < p.log.size(); i++)
      if (p.log[i].rfind(prefix, 0) == 0) return static_cast<int>(i);
    return -1;
  };
  CHECK(pos("dst migrate-set-capabilities") < pos("src migrate-set-capabilities"));
  CHECK(pos("src migrate-set-capabilities") < pos("dst migrate-incoming"));
  CHECK(pos("dst migrate-incoming") < pos("src migrate {"));
  CHECK(p.listening == "unix:/run/kvmx/migrate-web1.sock");
  CHECK(p.count("src migrate-start-postcopy") == 1);
  CHECK(p.count("dst migrate-start-postcopy") == 0);
  CHECK(r.said("switching to post-copy: 1 precopy pass complete"));
  CHECK(r.said("completed in"));
  // Progress samples, in order: precopy in pass 1, then post-copy.
  std::vector<std::string> states;
  for (const auto& e : r.events)
    if (e["message"] == "") states.push_back(e["state"]);
  REQUIRE(states.size() >= 4);
  CHECK(states.front() == "precopy");
  CHECK(std::find(states.begin(), states.end(), "postcopy") != states.end());
  for (const auto& e : r.events) {
    CHECK(e["event"] == "migration");
    CHECK(e["vm"] == "web1");
    CHECK(e["dest"] == "web1-new");
  }
}

TEST_CASE("job: prefetch the QEMU does not know is a clear error, nothing set") {
  Settings s = Run::base();
  s.prefetch = "pattern";
  Run r(s);
  r.job->start();
  r.run();
  REQUIRE(r.job->ended());
  CHECK(r.job->state() == State::kFailed);
  auto out = r.job->outcome();
  REQUIRE_FALSE(out.ok());
  CHECK(out.error().code == "migration-unsupported");
  CHECK_THAT(out.error().message,
             ContainsSubstring("has no migration capability 'postcopy-prefetch'"));
  CHECK(r.pair->count("dst migrate-set") == 0);
  CHECK(r.pair->count("src migrate-set") == 0);
  CHECK(r.pair->count("dst migrate-incoming") == 0);
  CHECK(r.pair->count("src migrate") == 0);
  CHECK(r.starts == 0);

  // The capability without the parameter is no better.
  Run q(s);
  q.pair->caps.insert("postcopy-prefetch");
  q.job->start();
  q.run();
  REQUIRE_FALSE(q.job->outcome().ok());
  CHECK_THAT(q.job->outcome().error().message,
             ContainsSubstring("no migration parameter 'postcopy-prefetch-mode'"));
}

TEST_CASE("job: prefetch a QEMU knows: capability and mode on both sides") {
  Settings s = Run::base();
  s.prefetch = "both";
  s.max_bandwidth = 1 << 20;
  Run r(s);
  r.pair->caps.insert("postcopy-prefetch");
  r.pair->prefetch_param = true;
  r.job->start();
  r.run();
  CHECK(r.job->state() == State::kCompleted);
  CHECK(r.pair->src_caps["postcopy-prefetch"] == true);
  CHECK(r.pair->dst_caps["postcopy-prefetch"] == true);
  CHECK(r.pair->src_params["postcopy-prefetch-mode"] == "both");
  CHECK(r.pair->dst_params["postcopy-prefetch-mode"] == "both");
  CHECK(r.pair->src_params["max-bandwidth"] == 1 << 20);
  CHECK_FALSE(r.pair->dst_params.contains("max-bandwidth"));
  CHECK((*r.job->outcome())["prefetch"] == "both");

  // Known but not asked for: turned off explicitly (a former migration may
  // have left it on).
  Run off;
  off.pair->caps.insert("postcopy-prefetch");
  off.job->start();
  off.run();
  CHECK(off.pair->dst_caps["postcopy-prefetch"] == false);
}

TEST_CASE("job: transport rdma: postcopy-rdma on both, QEMU's state reported") {
  Settings s = Run::base();
  s.uri = "tcp:10.0.0.2:4444";
  s.transport = "rdma";
  // A QEMU without the capability: a clear error, nothing set.
  Run no(s);
  no.job->start();
  no.run();
  REQUIRE_FALSE(no.job->outcome().ok());
  CHECK(no.job->outcome().error().code == "migration-unsupported");
  CHECK_THAT(no.job->outcome().error().message,
             ContainsSubstring("no migration capability 'postcopy-rdma'"));
  CHECK(no.pair->count("src migrate-set") == 0);

  Run r(s);
  r.pair->caps.insert("postcopy-rdma");
  r.job->start();
  r.run();
  CHECK(r.job->state() == State::kCompleted);
  CHECK(r.pair->src_caps["postcopy-rdma"] == true);
  CHECK(r.pair->dst_caps["postcopy-rdma"] == true);
  auto out = r.job->outcome();
  REQUIRE(out.ok());
  CHECK((*out)["transport"] == "rdma");
  CHECK((*out)["rdma"]["status"] == "active");
  CHECK((*out)["rdma"]["registered"] == 1 << 20);
  CHECK((*out)["rdma"]["pages_read"].get<uint64_t>() > 0);
  bool said = false;
  for (const auto& e : r.events)
    said = said || e.value("message", "").find("RDMA page fetch active") !=
                       std::string::npos;
  CHECK(said);

  // QEMU fell back: said as it goes and in the outcome.
  Run f(s);
  f.pair->caps.insert("postcopy-rdma");
  f.pair->rdma_status = "fallback";
  f.pair->rdma_reason = "no RDMA device has the migration address 10.0.0.1";
  f.job->start();
  f.run();
  CHECK(f.job->state() == State::kCompleted);
  std::string note, last;
  for (const auto& e : f.events) {
    auto m = e.value("message", "");
    if (m.find("RDMA not used") != std::string::npos && note.empty()) note = m;
    if (!m.empty()) last = m;
  }
  CHECK_THAT(note, ContainsSubstring("no RDMA device has the migration "
                                     "address 10.0.0.1; post-copy goes on "
                                     "over the migration stream"));
  CHECK_THAT(last, ContainsSubstring("; RDMA not used: no RDMA device"));

  // Known but not asked for: off on both.
  Run off;
  off.pair->caps.insert("postcopy-rdma");
  off.job->start();
  off.run();
  CHECK(off.pair->src_caps["postcopy-rdma"] == false);
  CHECK(off.pair->dst_caps["postcopy-rdma"] == false);
  CHECK_FALSE(off.job->outcome()->contains("rdma"));
}

TEST_CASE("job: multifd: the capability and its channels on both sides") {
  Settings s = Run::base();
  s.postcopy = false;
  s.multifd_channels = 4;
  // A QEMU without it: a clear error, nothing set.
  Run no(s);
  no.job->start();
  no.run();
  REQUIRE_FALSE(no.job->outcome().ok());
  CHECK(no.job->outcome().error().code == "migration-unsupported");
  CHECK_THAT(no.job->outcome().error().message,
             ContainsSubstring("no migration capability 'multifd'"));
  CHECK(no.pair->count("dst migrate-set") == 0);
  CHECK(no.pair->count("src migrate-set") == 0);

  // Precopy only: the fake completes it after its second pass.
  auto complete_at_pass_2 = [](Run& run) {
    run.pair->dirty = 0;
    run.on_event = [&run](const json& e) {
      if (e["pass"] == 2 && run.pair->src_mig == "active")
        run.pair->src_mig = run.pair->dst_mig = "completed";
    };
  };
  Run r(s);
  r.pair->caps.insert("multifd");
  complete_at_pass_2(r);
  r.job->start();
  r.run();
  CHECK(r.job->state() == State::kCompleted);
  CHECK(r.pair->src_caps["multifd"] == true);
  CHECK(r.pair->dst_caps["multifd"] == true);
  CHECK(r.pair->src_params["multifd-channels"] == 4);
  CHECK(r.pair->dst_params["multifd-channels"] == 4);
  bool said = false;
  for (const auto& e : r.events)
    said = said || e.value("message", "").find("multifd, 4 channels") !=
                       std::string::npos;
  CHECK(said);

  // Not asked for, and known: off on both (a QEMU that was the destination
  // of a multifd migration keeps it on otherwise).
  Settings p = Run::base();
  p.postcopy = false;
  Run off(p);
  off.pair->caps.insert("multifd");
  complete_at_pass_2(off);
  off.job->start();
  off.run();
  CHECK(off.job->state() == State::kCompleted);
  CHECK(off.pair->src_caps["multifd"] == false);
  CHECK(off.pair->dst_caps["multifd"] == false);
  CHECK_FALSE(off.pair->src_params.contains("multifd-channels"));
}

TEST_CASE("job: QEMU refusing post-copy names the VM and QEMU's reason") {
  Run r;
  r.pair->refuse["dst migrate-set-capabilities"] =
      "Postcopy is not supported: Host backend files need to be TMPFS or "
      "HUGETLBFS only";
  r.job->start();
  r.run();
  auto out = r.job->outcome();
  REQUIRE_FALSE(out.ok());
  CHECK(out.error().code == "migration-unsupported");
  CHECK(out.error().message ==
        "VM 'web1-new': migrate-set-capabilities: Postcopy is not supported: "
        "Host backend files need to be TMPFS or HUGETLBFS only");
  CHECK(r.pair->count("src migrate") == 0);
}

TEST_CASE("job: what the checks refuse") {
  SECTION("a destination that does not wait for a migration") {
    Run r;
    r.pair->dst_run = "running";
    r.job->start();
    r.run();
    CHECK(r.job->outcome().error().code == "migration-refused");
    CHECK_THAT(r.job->outcome().error().message,
               ContainsSubstring("start it with -incoming defer"));
  }
  SECTION("a destination that listened before") {
    Run r;
    r.pair->dst_mig = "setup";
    r.job->start();
    r.run();
    CHECK(r.job->outcome().error().code == "migration-refused");
  }
  SECTION("a source that migrates already") {
    Run r;
    r.pair->src_mig = "postcopy-paused";
    r.job->start();
    r.run();
    CHECK(r.job->outcome().error().code == "migration-busy");
    CHECK_THAT(r.job->outcome().error().message,
               ContainsSubstring("recover it with migrate-recover"));
  }
  SECTION("a source that ran its migration already") {
    Run r;
    r.pair->src_run = "postmigrate";
    r.job->start();
    r.run();
    CHECK(r.job->outcome().error().code == "migration-refused");
  }
  SECTION("--shared-storage with separate files") {
    Settings s = Run::base();
    s.shared_storage = true;
    Run r(s);
    r.job->start();
    r.run();
    CHECK(r.job->outcome().error().code == "migration-refused");
    CHECK_THAT(r.job->outcome().error().message,
               ContainsSubstring("--shared-storage"));
  }
  SECTION("the URI check") {
    Settings s = Run::base();
    s.check_uri = [](const std::string& uri) {
      return "no: " + uri;
    };
    Run r(s);
    r.job->start();
    r.run();
    CHECK(r.job->outcome().error().message ==
          "no: unix:/run/kvmx/migrate-web1.sock");
    CHECK(r.pair->count("dst migrate-incoming") == 0);
  }
  SECTION("a QMP error on the way names VM and command") {
    Run r;
    r.pair->refuse["src query-migrate-capabilities"] = "boom";
    r.job->start();
    r.run();
    CHECK(r.job->outcome().error().message ==
          "VM 'web1': query-migrate-capabilities: boom");
  }
}

TEST_CASE("job: shared storage sets x-ignore-shared on both") {
  Settings s = Run::base();
  s.shared_storage = true;
  Run r(s);
  r.pair->dst_backends = r.pair->src_backends;
  r.job->start();
  r.run();
  CHECK(r.job->state() == State::kCompleted);
  CHECK(r.pair->src_caps["x-ignore-shared"] == true);
  CHECK(r.pair->dst_caps["x-ignore-shared"] == true);
}

TEST_CASE("job: QEMU's failure is the outcome, with its words") {
  Run r;
  r.pair->fail_desc = "Unable to write to socket: Broken pipe";
  r.job->start();
  r.run();
  CHECK(r.job->state() == State::kFailed);
  CHECK(r.job->outcome().error().code == "migration-failed");
  CHECK(r.job->outcome().error().message ==
        "migration of 'web1' to 'web1-new' failed: Unable to write to "
        "socket: Broken pipe");
}

TEST_CASE("job: precopy only converges without a switch") {
  Settings s = Run::base();
  s.postcopy = false;
  Run r(s);
  r.pair->dirty = 0;
  r.on_event = [&](const json& e) {
    if (e["pass"] == 2 && r.pair->src_mig == "active")
      r.pair->src_mig = r.pair->dst_mig = "completed";
  };
  r.job->start();
  r.run();
  CHECK(r.job->state() == State::kCompleted);
  CHECK(r.pair->count("src migrate-start-postcopy") == 0);
  CHECK(r.pair->src_caps["postcopy-ram"] == false);
  CHECK((*r.job->outcome())["switched"] == false);
}

TEST_CASE("job: manual switch; migrate-postcopy switches; twice is harmless") {
  Settings s = Run::base();
  s.policy.manual = true;
  Run r(s);
  int samples = 0;
  std::vector<Result<json>> replies;
  r.on_event = [&](const json& e) {
    if (e["message"] != "" || e["state"] != "precopy") return;
    if (++samples == 8) {
      r.job->switch_now("requested by a client",
                        [&](Result<json> x) { replies.push_back(x); });
      r.job->switch_now("requested again",
                        [&](Result<json> x) { replies.push_back(x); });
    }
  };
  r.job->start();
  r.run();
  CHECK(r.job->state() == State::kCompleted);
  CHECK(samples >= 8);  // passes went by without a switch
  REQUIRE(replies.size() == 2);
  // The second is answered at once (already switching), the first once
  // QEMU took the command.
  CHECK((*replies[0])["switching"] == true);
  CHECK((*replies[0])["already"] == true);
  CHECK((*replies[1])["already"] == false);
  CHECK(r.pair->count("src migrate-start-postcopy") == 1);
  CHECK((*r.job->outcome())["switch_reason"] == "requested by a client");

  // Without post-copy there is nothing to switch to.
  Settings p = Run::base();
  p.postcopy = false;
  Run q(p);
  std::optional<Error> err;
  q.on_event = [&](const json& e) {
    if (e["state"] == "precopy" && !err)
      q.job->switch_now("x", [&](Result<json> x) { err = x.error(); });
    q.pair->src_mig = "completed";
  };
  q.job->start();
  q.run();
  REQUIRE(err);
  CHECK(err->code == "migration-refused");
  CHECK_THAT(err->message, ContainsSubstring("without post-copy"));
}

TEST_CASE("job: cancel during precopy; refused in post-copy") {
  Settings s = Run::base();
  s.policy.manual = true;
  Run r(s);
  bool sent = false;
  r.on_event = [&](const json& e) {
    if (!sent && e["state"] == "precopy" && e["message"] == "") {
      sent = true;
      r.job->cancel([](Result<json> x) { CHECK(x.ok()); });
    }
  };
  r.job->start();
  r.run();
  CHECK(r.job->state() == State::kCancelled);
  CHECK(r.job->outcome().error().code == "migration-cancelled");

  Run q;
  std::optional<Error> err;
  q.pair->postcopy_len = 5;
  q.on_event = [&](const json& e) {
    if (e["state"] == "postcopy" && !err)
      q.job->cancel([&](Result<json> x) { err = x.error(); });
  };
  q.job->start();
  q.run();
  CHECK(q.job->state() == State::kCompleted);
  REQUIRE(err);
  CHECK_THAT(err->message, ContainsSubstring("cannot be cancelled"));
}

TEST_CASE("job: a paused post-copy is recovered by itself") {
  Settings s = Run::base();
  // As QEMU does: the destination keeps listening after it accepted, so
  // its socket is "in use" -- by itself, which does not count.
  Pair* pair = nullptr;
  s.check_uri = [&pair](const std::string& uri) {
    return pair && pair->listening == uri ? "'" + uri + "' is in use" : "";
  };
  Run r(s);
  pair = r.pair.get();
  r.pair->postcopy_len = 6;
  int paused = 0;
  r.on_event = [&](const json& e) {
    if (e["state"] == "postcopy" && e["message"] == "" && paused == 0) {
      paused++;
      r.pair->pause();
    }
  };
  r.job->start();
  r.run();
  CHECK(r.job->state() == State::kCompleted);
  auto out = *r.job->outcome();
  CHECK(out["recoveries"] == 1);
  CHECK(r.pair->count("dst migrate-recover") == 1);
  CHECK(r.pair->count("src migrate {\"resume\":true") == 1);
  CHECK(r.said("post-copy paused"));
  CHECK(r.said("post-copy resumed (recovery 1)"));
  CHECK(r.pair->oob == std::vector<std::string>{"dst migrate-recover"});
}

TEST_CASE("job: a destination that answers out of band only is recovered, "
          "and the progress goes on") {
  Run r;
  r.pair->postcopy_len = 8;
  bool paused = false;
  int samples_while_hung = 0;
  r.on_event = [&](const json& e) {
    if (e["state"] == "postcopy" && e["message"] == "" && !paused) {
      paused = true;
      r.pair->pause();
      r.pair->dst_hangs = true;
    }
    if (r.pair->dst_hangs && e["message"] == "") {
      samples_while_hung++;
      if (samples_while_hung >= 3) CHECK(e["dest_status"] == "not answering");
    }
    if (r.pair->dst_hangs && r.said("post-copy resumed")) {
      // The page it waited for came: what it held is answered, late.
      r.pair->dst_hangs = false;
      r.dst->release();
    }
  };
  r.job->start();
  r.run();
  CHECK(r.job->state() == State::kCompleted);
  CHECK((*r.job->outcome())["recoveries"] == 1);
  CHECK(samples_while_hung >= 3);
  CHECK(r.job->snapshot()["dest_status"] != "not answering");
  CHECK(r.pair->oob == std::vector<std::string>{"dst migrate-recover"});
}

TEST_CASE("job: a recovery URI some other process listens on is refused") {
  Settings s = Run::base();
  s.recover_uri = "unix:/run/kvmx/busy.sock";
  s.recover_attempts = 1;
  s.check_uri = [](const std::string& uri) {
    return uri == "unix:/run/kvmx/busy.sock" ? "'/run/kvmx/busy.sock' is a "
                                               "socket in use"
                                             : "";
  };
  Run r(s);
  r.pair->postcopy_len = 6;
  bool paused = false;
  r.on_event = [&](const json& e) {
    if (e["state"] == "postcopy" && e["message"] == "" && !paused) {
      paused = true;
      r.pair->pause();
    }
  };
  r.job->start();
  r.run();
  CHECK(r.job->state() == State::kPaused);
  CHECK_THAT(r.job->outcome().error().message,
             ContainsSubstring("is a socket in use"));
  CHECK(r.pair->count("dst migrate-recover") == 0);
}

TEST_CASE("job: without attempts it ends paused; recover() completes it") {
  Settings s = Run::base();
  s.recover_attempts = 0;
  s.recover_uri = "unix:/run/kvmx/recover.sock";
  Run r(s);
  r.pair->postcopy_len = 6;
  bool paused = false;
  r.on_event = [&](const json& e) {
    if (e["state"] == "postcopy" && e["message"] == "" && !paused) {
      paused = true;
      r.pair->pause();
    }
  };
  r.job->start();
  r.run();
  REQUIRE(r.job->ended());
  CHECK(r.job->state() == State::kPaused);
  auto out = r.job->outcome();
  REQUIRE_FALSE(out.ok());
  CHECK(out.error().code == "migration-paused");
  CHECK_THAT(out.error().message,
             ContainsSubstring("recover with kvmx-hostctl migrate-recover "
                               "vm=web1 dest=web1-new"));

  REQUIRE(r.job->recover("").ok());
  CHECK_FALSE(r.job->ended());
  r.run();
  CHECK(r.job->state() == State::kCompleted);
  CHECK(r.ends == 2);
  CHECK(r.pair->listening == "unix:/run/kvmx/recover.sock");
  CHECK((*r.job->outcome())["recoveries"] == 1);
  // Not paused any more: nothing to recover.
  CHECK(r.job->recover("").error().code == "migration-refused");
}

TEST_CASE("job: a failed attempt is retried; the destination may lag") {
  Run r;
  r.pair->postcopy_len = 6;
  bool paused = false;
  r.on_event = [&](const json& e) {
    if (e["state"] == "postcopy" && e["message"] == "" && !paused) {
      paused = true;
      r.pair->pause();
      // The source's resume fails once.
      r.pair->refuse["src migrate"] = "Failed to connect socket";
      r.pair->dst_mig = "postcopy-active";  // it has not noticed yet
    }
    if (e["message"].get<std::string>().find("recovery attempt 1 failed") !=
        std::string::npos)
      r.pair->refuse.erase("src migrate");
    if (paused && r.pair->dst_mig == "postcopy-active" &&
        r.pair->src_mig == "postcopy-paused" &&
        r.pair->count("dst migrate-recover") >= 2)
      r.pair->dst_mig = "postcopy-paused";  // now it has
  };
  r.job->start();
  r.run();
  CHECK(r.job->state() == State::kCompleted);
  CHECK(r.said("recovery attempt 1 failed: VM 'web1': migrate: Failed to "
               "connect socket"));
  // migrate-recover was refused until the destination had paused too (not
  // an attempt); the second attempt found it still listening.
  CHECK(r.pair->count("dst migrate-recover") == 3);
  CHECK(r.pair->count("src migrate {\"resume\":true") == 2);
  CHECK(r.pair->count("dst query-migrate") > 0);
}

TEST_CASE("job: recover() of a paused migration hostd did not start") {
  Settings s = Run::base();
  s.recover_attempts = 0;
  Run r(s);
  r.pair->src_mig = r.pair->dst_mig = "postcopy-paused";
  r.pair->pass = 3;
  REQUIRE(r.job->recover("").ok());
  r.run();
  CHECK(r.job->state() == State::kCompleted);
  CHECK(r.pair->count("src migrate-set") == 0);  // nothing set again

  Run n(s);
  n.pair->src_mig = "active";
  REQUIRE(n.job->recover("").ok());
  n.run();
  CHECK(n.job->outcome().error().code == "migration-refused");
  CHECK_THAT(n.job->outcome().error().message,
             ContainsSubstring("has no paused post-copy migration"));
}

TEST_CASE("job: the source lost; the destination lost during post-copy") {
  Run r;
  r.on_event = [&](const json& e) {
    if (e["state"] == "precopy" && e["message"] == "") {
      r.src->lost_ = "QMP socket '/x' no longer exists";
      r.pair->refuse["src query-migrate"] = "gone";
    }
  };
  r.job->start();
  r.run();
  CHECK(r.job->state() == State::kFailed);
  CHECK_THAT(r.job->outcome().error().message,
             ContainsSubstring("lost the source VM 'web1'"));

  Run q;
  q.pair->postcopy_len = 6;
  q.on_event = [&](const json& e) {
    if (e["state"] == "postcopy" && e["message"] == "") {
      q.dst->lost_ = "detached from hostd";
      q.pair->pause();
    }
  };
  q.job->start();
  q.run();
  CHECK(q.job->state() == State::kFailed);
  CHECK_THAT(q.job->outcome().error().message,
             ContainsSubstring("the guest cannot run on"));

  // Lost only when a recovery attempt already runs into it.
  Settings s = Run::base();
  s.recover_attempts = 1;
  Run d(s);
  d.pair->postcopy_len = 6;
  d.on_event = [&](const json& e) {
    if (e["state"] == "postcopy" && e["message"] == "") {
      d.pair->pause();
      d.pair->refuse["dst migrate-recover"] = "gone";
      d.dst->lost_ = "nothing listens on its QMP socket";
    }
  };
  d.job->start();
  d.run();
  CHECK(d.job->state() == State::kFailed);
  CHECK_THAT(d.job->outcome().error().message,
             ContainsSubstring("nothing listens on its QMP socket"));
}

TEST_CASE("job: destroyed mid-way, its answers arrive to nobody") {
  Run r;
  r.on_event = [&](const json& e) {
    if (e["state"] == "precopy") r.loop->defer([&] {
        r.job.reset();
        r.loop->stop();
      });
  };
  r.job->start();
  r.run();
  CHECK(r.job == nullptr);
  // Whatever was in flight runs into the guard.
  auto t = r.loop->after(20ms, [&] { r.loop->stop(); });
  r.loop->run();
  (void)t;
}

// -- disk dedup ---------------------------------------------------------------------------

namespace {

json dd_caps(std::initializer_list<std::pair<const char*, bool>> caps) {
  json a = json::array();
  for (auto [c, on] : caps) a.push_back({{"capability", c}, {"state", on}});
  return a;
}

json dd_object(std::vector<std::string> disks) {
  json images = json::array();
  int i = 0;
  for (const auto& d : disks)
    images.push_back({{"index", i++}, {"device", d}, {"generation", 1},
                      {"records", 100}, {"tracking", true}});
  return json::array({{{"max-memory", 16777216}, {"records", 100},
                       {"images", images}}});
}

DedupSide side(const std::string& vm, bool cap, std::optional<json> objects,
               std::initializer_list<std::pair<const char*, bool>> more = {}) {
  json caps = dd_caps(more);
  if (cap) caps.push_back({{"capability", "disk-dedup"}, {"state", false}});
  return dedup_side(vm, caps, objects);
}

}  // namespace

TEST_CASE("dedup: what a QEMU offers") {
  auto s = side("a", true, dd_object({"/machine/peripheral/vd0/virtio-backend"}),
                {{"multifd", true}, {"xbzrle", false}, {"mapped-ram", true}});
  CHECK(s.capability);
  CHECK(s.queried);
  CHECK(s.objects == 1);
  REQUIRE(s.disks.size() == 1);
  // multifd is not one: references go beside its channels.
  CHECK(s.conflicts == std::vector<std::string>{"mapped-ram"});
  auto stock = side("b", false, std::nullopt);
  CHECK_FALSE(stock.capability);
  CHECK_FALSE(stock.queried);
  CHECK(side("c", true, json::array()).objects == 0);
  // Bounded: a hostile answer of 1000 objects and disks.
  json many = json::array();
  for (int i = 0; i < 1000; i++) many.push_back(dd_object({"x", "y"})[0]);
  auto m = side("d", true, many);
  CHECK(m.objects == 64);
  CHECK(m.disks.size() == 64);
  CHECK(parse_dedup_mode("auto") == DedupMode::kAuto);
  CHECK(parse_dedup_mode("on") == DedupMode::kOn);
  CHECK(parse_dedup_mode("off") == DedupMode::kOff);
  CHECK_FALSE(parse_dedup_mode("yes"));
}

TEST_CASE("dedup: auto turns it on only with both objects, disks and shared storage") {
  auto ok = side("src", true, dd_object({"vd0"}));
  auto ok2 = side("dst", true, dd_object({"vd0"}));
  auto r = decide_dedup(DedupMode::kAuto, true, ok, ok2);
  REQUIRE(r.ok());
  CHECK(r->enable);
  CHECK_THAT(r->why, ContainsSubstring("disks vd0 of 'src' and vd0 of 'dst'"));

  r = decide_dedup(DedupMode::kAuto, false, ok, ok2);
  REQUIRE(r.ok());
  CHECK_FALSE(r->enable);
  CHECK_THAT(r->why, ContainsSubstring("not said to be shared (--shared-storage)"));

  auto noobj = side("dst", true, json::array());
  r = decide_dedup(DedupMode::kAuto, true, ok, noobj);
  REQUIRE(r.ok());
  CHECK_FALSE(r->enable);
  CHECK_THAT(r->why, ContainsSubstring("VM 'dst' has no kvmx-disk-dedup object"));

  auto nodisk = side("dst", true, dd_object({}));
  r = decide_dedup(DedupMode::kAuto, true, ok, nodisk);
  REQUIRE(r.ok());
  CHECK_FALSE(r->enable);
  CHECK_THAT(r->why, ContainsSubstring("but no disk attached to it"));

  auto stock = side("src", false, std::nullopt);
  r = decide_dedup(DedupMode::kAuto, true, stock, ok2);
  REQUIRE(r.ok());
  CHECK_FALSE(r->enable);
  CHECK_THAT(r->why, ContainsSubstring("has no migration capability 'disk-dedup'"));

  auto xbzrle = side("dst", true, dd_object({"vd0"}), {{"xbzrle", true}});
  r = decide_dedup(DedupMode::kAuto, true, ok, xbzrle);
  REQUIRE(r.ok());
  CHECK_FALSE(r->enable);
  CHECK_THAT(r->why, ContainsSubstring("has xbzrle on"));

  auto multifd = side("dst", true, dd_object({"vd0"}), {{"multifd", true}});
  r = decide_dedup(DedupMode::kAuto, true, ok, multifd);
  REQUIRE(r.ok());
  CHECK(r->enable);

  r = decide_dedup(DedupMode::kOff, true, ok, ok2);
  REQUIRE(r.ok());
  CHECK_FALSE(r->enable);
}

TEST_CASE("dedup: on is an error for whatever is missing") {
  auto ok = side("src", true, dd_object({"vd0"}));
  auto ok2 = side("dst", true, dd_object({"vd0"}));
  auto r = decide_dedup(DedupMode::kOn, true, ok, ok2);
  REQUIRE(r.ok());
  CHECK(r->enable);

  r = decide_dedup(DedupMode::kOn, false, ok, ok2);
  REQUIRE_FALSE(r.ok());
  CHECK(r.error().code == "migration-refused");
  CHECK_THAT(r.error().message,
             ContainsSubstring("--disk-dedup=on, but the storage is not said "
                               "to be shared (--shared-storage)"));

  r = decide_dedup(DedupMode::kOn, true, ok, side("dst", false, std::nullopt));
  REQUIRE_FALSE(r.ok());
  CHECK(r.error().code == "migration-unsupported");
  CHECK_THAT(r.error().message,
             ContainsSubstring("the QEMU of VM 'dst' has no migration "
                               "capability 'disk-dedup'"));

  r = decide_dedup(DedupMode::kOn, true, side("src", true, json::array()), ok2);
  REQUIRE_FALSE(r.ok());
  CHECK(r.error().code == "migration-unsupported");
  CHECK_THAT(r.error().message,
             ContainsSubstring("VM 'src' has no kvmx-disk-dedup object"));

  r = decide_dedup(DedupMode::kOn, true, ok,
                   side("dst", true, dd_object({"vd0"}), {{"xbzrle", true}}));
  REQUIRE_FALSE(r.ok());
  CHECK(r.error().code == "migration-refused");
  CHECK_THAT(r.error().message, ContainsSubstring("has xbzrle on"));
}

TEST_CASE("dedup: to a file") {
  auto r = decide_dedup_file(DedupMode::kAuto, side("a", true, dd_object({"vd0"})));
  REQUIRE(r.ok());
  CHECK(r->enable);
  r = decide_dedup_file(DedupMode::kAuto, side("a", true, json::array()));
  REQUIRE(r.ok());
  CHECK_FALSE(r->enable);
  r = decide_dedup_file(DedupMode::kOn, side("a", false, std::nullopt));
  REQUIRE_FALSE(r.ok());
  CHECK(r.error().code == "migration-unsupported");
  r = decide_dedup_file(DedupMode::kOn,
                        side("a", true, dd_object({"vd0"}), {{"mapped-ram", true}}));
  REQUIRE_FALSE(r.ok());
  CHECK(r.error().code == "migration-refused");
  CHECK_THAT(r.error().message, ContainsSubstring("has mapped-ram on"));
}

TEST_CASE("dedup: query-migrate's numbers, bounded") {
  json info = {{"status", "completed"},
               {"disk-dedup",
                {{"pages-as-reference", 10}, {"bytes-saved", 40000},
                 {"images-refused", 1},
                 {"refused-reason", std::string(5000, 'x')},
                 {"references-resolved", 9}, {"mismatches", 1},
                 {"read-errors", 0}, {"read-time-ms", 3},
                 {"disk-reads", 2}}}};
  auto d = dedup_stats(info);
  CHECK(d.present);
  CHECK(d.pages_as_reference == 10);
  CHECK(d.refused_reason.size() == 512);
  CHECK(d.mismatches == 1);
  CHECK(d.disk_reads == 2);
  // A QEMU without the member: 0, not an error.
  info["disk-dedup"].erase("disk-reads");
  CHECK(dedup_stats(info).disk_reads == 0);
  CHECK(dedup_stats(info).present);
  CHECK_FALSE(dedup_stats(json{{"status", "active"}}).present);
  CHECK_FALSE(dedup_stats(json{{"disk-dedup", "garbage"}}).present);
}

TEST_CASE("job: disk dedup auto with shared storage: return-path and disk-dedup on both") {
  Settings s = Run::base();
  s.postcopy = false;
  s.shared_storage = true;
  Run r(s);
  Pair& p = *r.pair;
  p.caps.insert({"disk-dedup", "return-path"});
  p.src_dd = dd_object({"vd0"});
  p.dst_dd = dd_object({"vd0"});
  // A disk-only VM: no shared memory backend, and that is fine with dedup.
  p.src_backends.clear();
  p.dst_backends.clear();
  p.first = 2000;
  p.dirty = 0;
  // Precopy converges: complete once a pass has nothing left.
  r.on_event = [&](const json& e) {
    if (e["message"] == "" && p.pass >= 2) p.src_mig = p.dst_mig = "completed";
  };
  r.job->start();
  r.run();
  REQUIRE(r.job->ended());
  auto out = r.job->outcome();
  REQUIRE(out.ok());
  CHECK(p.src_caps["disk-dedup"]);
  CHECK(p.src_caps["return-path"]);
  CHECK(p.dst_caps["disk-dedup"]);
  CHECK(p.dst_caps["return-path"]);
  CHECK((*out)["dedup"] == true);
  CHECK((*out)["disk_dedup"] == "auto");
  CHECK((*out)["dedup_stats"]["pages_as_reference"].get<uint64_t>() > 0);
  // The destination's own count, asked once more at the end.
  CHECK((*out)["dedup_stats"]["references_resolved"] ==
        (*out)["dedup_stats"]["pages_as_reference"]);
  CHECK(r.said("disk dedup on: disks vd0 of 'web1' and vd0 of 'web1-new'"));
  CHECK(r.said("pages as references"));
  CHECK(r.said("the destination resolved"));
  bool sample_has_stats = false;
  for (const auto& e : r.events)
    if (e["message"] == "" && e.contains("dedup_stats")) sample_has_stats = true;
  CHECK(sample_has_stats);
}

TEST_CASE("job: disk dedup auto without shared storage: off on both, and why") {
  Settings s = Run::base();
  s.postcopy = false;
  Run r(s);
  Pair& p = *r.pair;
  p.caps.insert({"disk-dedup", "return-path"});
  p.src_dd = dd_object({"vd0"});
  p.dst_dd = dd_object({"vd0"});
  p.fail_desc = "stop here";
  r.job->start();
  r.run();
  CHECK(p.src_caps["disk-dedup"] == false);
  CHECK(p.dst_caps["disk-dedup"] == false);
  CHECK_FALSE(p.src_caps.count("return-path"));
  CHECK(r.said("disk dedup off: the storage is not said to be shared"));
}

TEST_CASE("job: --disk-dedup=on where a side lacks it: a clear error, nothing set") {
  for (int variant = 0; variant < 3; variant++) {
    Settings s = Run::base();
    s.postcopy = false;
    s.shared_storage = true;
    s.disk_dedup = DedupMode::kOn;
    Run r(s);
    Pair& p = *r.pair;
    p.caps.insert({"disk-dedup", "return-path"});
    p.src_dd = dd_object({"vd0"});
    p.dst_dd = dd_object({"vd0"});
    std::string want;
    if (variant == 0) {
      p.dst_dd = json::array();
      want = "VM 'web1-new' has no kvmx-disk-dedup object";
    } else if (variant == 1) {
      p.caps.erase("disk-dedup");  // stock QEMU
      p.src_dd.reset();
      p.dst_dd.reset();
      want = "the QEMU of VM 'web1' has no migration capability 'disk-dedup'";
    } else {
      p.caps_on.insert("xbzrle");
      p.caps.insert("xbzrle");
      want = "has xbzrle on";
    }
    r.job->start();
    r.run();
    REQUIRE(r.job->ended());
    auto out = r.job->outcome();
    REQUIRE_FALSE(out.ok());
    CHECK_THAT(out.error().message, ContainsSubstring("--disk-dedup=on, but"));
    CHECK_THAT(out.error().message, ContainsSubstring(want));
    CHECK(p.count("dst migrate-set") == 0);
    CHECK(p.count("src migrate-set") == 0);
    CHECK(p.count("src migrate") == 0);
  }
}

TEST_CASE("job: a mismatch fails the migration with QEMU's words and the numbers") {
  Settings s = Run::base();
  s.postcopy = false;
  s.shared_storage = true;
  Run r(s);
  Pair& p = *r.pair;
  p.caps.insert({"disk-dedup", "return-path"});
  p.src_dd = dd_object({"vd0"});
  p.dst_dd = dd_object({"vd0"});
  p.src_backends.clear();
  p.dst_backends.clear();
  r.on_event = [&](const json& e) {
    if (e["message"] == "" && p.transferred >= 2000)
      p.fail_desc =
          "the destination failed: disk-dedup: page 0x1000 of RAM block "
          "'pc.ram' refers to block 42 of disk vd0, whose contents differ";
  };
  r.job->start();
  r.run();
  REQUIRE(r.job->ended());
  CHECK(r.job->state() == State::kFailed);
  auto out = r.job->outcome();
  REQUIRE_FALSE(out.ok());
  CHECK(out.error().code == "migration-failed");
  CHECK_THAT(out.error().message, ContainsSubstring("block 42 of disk vd0"));
  CHECK_THAT(out.error().message, ContainsSubstring("pages as references"));
}

// -- snapshot and restore ---------------------------------------------------------------

namespace {

// One QEMU saving to or loading from a file.
struct Single {
  explicit Single(EventLoop& l) : loop(l) {}
  EventLoop& loop;
  std::string run = "running", mig = "";
  std::set<std::string> caps = {"disk-dedup", "return-path", "events"};
  std::map<std::string, bool> set_caps;
  std::optional<json> dd = dd_object({"vd0"});
  std::string fail_desc;
  int queries = 0;
  std::vector<std::string> log;
  int count(const std::string& prefix) const {
    int n = 0;
    for (const auto& l : log) n += l.rfind(prefix, 0) == 0 ? 1 : 0;
    return n;
  }
  json answer(const std::string& cmd, const json& args, std::string* err) {
    log.push_back(cmd + (args.is_null() ? "" : " " + args.dump()));
    if (cmd == "query-status") return {{"status", run}};
    if (cmd == "query-migrate-capabilities") {
      json a = json::array();
      for (const auto& c : caps) a.push_back({{"capability", c}, {"state", false}});
      return a;
    }
    if (cmd == "query-kvmx-disk-dedup") {
      if (dd) return *dd;
      *err = "The command query-kvmx-disk-dedup has not been found";
      return nullptr;
    }
    if (cmd == "stop") { run = "paused"; return json::object(); }
    if (cmd == "cont") { run = "running"; return json::object(); }
    if (cmd == "migrate-set-capabilities") {
      for (const auto& c : args["capabilities"]) set_caps[c["capability"]] = c["state"];
      return json::object();
    }
    if (cmd == "migrate-set-parameters") return json::object();
    if (cmd == "migrate" || cmd == "migrate-incoming") {
      mig = "active";
      return json::object();
    }
    if (cmd == "query-migrate") {
      json r = json::object();
      if (mig.empty()) return r;
      if (mig == "active" && ++queries >= 3)
        mig = fail_desc.empty() ? "completed" : "failed";
      r["status"] = mig;
      r["ram"] = {{"transferred", queries * 1000}, {"remaining", 0}, {"total", 4000}};
      if (mig == "failed") r["error-desc"] = fail_desc;
      if (set_caps["disk-dedup"])
        r["disk-dedup"] = {{"pages-as-reference", 77}, {"bytes-saved", 300000},
                           {"images-refused", 0}, {"references-resolved", 77},
                           {"mismatches", 0}, {"read-errors", 0},
                           {"read-time-ms", 2}, {"pages-checked", 80},
                           {"pages-unlike-disk", 3}};
      return r;
    }
    *err = "The command " + cmd + " has not been found";
    return nullptr;
  }
};

class SingleEndpoint final : public Endpoint {
 public:
  explicit SingleEndpoint(Single& q) : q_(q) {}
  const std::string& name() const override { return name_; }
  void command(const std::string& cmd, const json& args, ReplyFn fn,
               bool) override {
    std::string err;
    json r = q_.answer(cmd, args, &err);
    Result<json> res = err.empty() ? Result<json>(std::move(r))
                                   : Result<json>(make_error(
                                         "qmp-error", "GenericError: " + err));
    q_.loop.defer([fn, res]() mutable { fn(std::move(res)); });
  }
  std::string lost() const override { return ""; }

 private:
  Single& q_;
  std::string name_ = "web1";
};

struct FileRun {
  std::unique_ptr<EventLoop> loop;
  std::unique_ptr<Single> q;
  std::unique_ptr<FileJob> job;
  std::vector<json> events;
  explicit FileRun(FileSettings s) {
    loop = std::move(*EventLoop::create());
    q = std::make_unique<Single>(*loop);
    Job::Callbacks cb;
    cb.on_event = [this](const json& e) { events.push_back(e); };
    cb.on_end = [this] { loop->stop(); };
    s.interval = 1ms;
    job = std::make_unique<FileJob>(*loop, std::move(s),
                                    std::make_unique<SingleEndpoint>(*q),
                                    std::move(cb));
  }
  void go() {
    job->start();
    auto guard = loop->after(5000ms, [this] { loop->stop(); });
    loop->run();
    loop->cancel(guard);
  }
  bool said(const std::string& text) const {
    for (const auto& e : events)
      if (e["message"].get<std::string>().find(text) != std::string::npos)
        return true;
    return false;
  }
};

}  // namespace

TEST_CASE("snapshot: stop, dedup on, migrate to file:, the VM stays paused") {
  FileSettings s;
  s.path = "/var/lib/kvmx/web1.snap";
  FileRun r(s);
  r.go();
  REQUIRE(r.job->ended());
  auto out = r.job->outcome();
  REQUIRE(out.ok());
  CHECK((*out)["kind"] == "snapshot");
  CHECK((*out)["dedup"] == true);
  CHECK((*out)["dedup_stats"]["pages_as_reference"] == 77);
  CHECK((*out)["dedup_stats"]["pages_checked"] == 80);
  CHECK((*out)["dedup_stats"]["pages_unlike_disk"] == 3);
  CHECK(r.said("each checked against the disk: 3 pages unlike their block "
               "saved in full"));
  CHECK(r.q->run == "paused");
  CHECK(r.q->count("cont") == 0);
  CHECK(r.q->set_caps["disk-dedup"]);
  CHECK_FALSE(r.q->set_caps["return-path"]);
  REQUIRE(r.q->set_caps.count("x-ignore-shared"));
  CHECK_FALSE(r.q->set_caps["x-ignore-shared"]);  // the whole RAM in the file
  auto pos = [&](const std::string& prefix) {
    for (size_t i = 0; i < r.q->log.size(); i++)
      if (r.q->log[i].rfind(prefix, 0) == 0) return static_cast<int>(i);
    return -1;
  };
  CHECK(pos("stop") < pos("migrate-set-capabilities"));
  CHECK(pos("migrate-set-capabilities") < pos("migrate {"));
  CHECK(r.q->count("migrate {\"uri\":\"file:/var/lib/kvmx/web1.snap\"}") == 1);
  CHECK(r.said("saving 'web1' to /var/lib/kvmx/web1.snap; disk dedup on"));
  CHECK(r.said("the VM stays paused"));
  bool progress = false;
  for (const auto& e : r.events)
    if (e["message"] == "" && e["state"] == "saving") progress = true;
  CHECK(progress);
}

TEST_CASE("snapshot: multifd (on in a QEMU that was a multifd destination) goes off") {
  FileSettings s;
  s.path = "/var/lib/kvmx/web1.snap";
  FileRun r(s);
  r.q->caps.insert("multifd");
  r.go();
  REQUIRE(r.job->ended());
  REQUIRE(r.job->outcome().ok());
  REQUIRE(r.q->set_caps.count("multifd"));
  CHECK_FALSE(r.q->set_caps["multifd"]);
  // A QEMU without the capability is not asked about it.
  FileRun q(s);
  q.go();
  REQUIRE(q.job->outcome().ok());
  CHECK_FALSE(q.q->set_caps.count("multifd"));
}

TEST_CASE("snapshot: --resume runs it again; a failure runs it again too") {
  FileSettings s;
  s.path = "/tmp/x.snap";
  s.resume = true;
  s.disk_dedup = DedupMode::kOff;
  FileRun r(s);
  r.go();
  REQUIRE(r.job->outcome().ok());
  CHECK(r.q->run == "running");
  CHECK(r.q->count("query-kvmx-disk-dedup") == 0);
  CHECK_FALSE(r.q->set_caps["disk-dedup"]);

  FileSettings f;
  f.path = "/tmp/y.snap";
  FileRun q(f);
  q.q->fail_desc = "Failed to write: No space left on device";
  q.go();
  auto out = q.job->outcome();
  REQUIRE_FALSE(out.ok());
  CHECK(out.error().code == "migration-failed");
  CHECK_THAT(out.error().message, ContainsSubstring("No space left on device"));
  CHECK_THAT(out.error().message, ContainsSubstring("the VM runs again"));
  CHECK(q.q->run == "running");
}

TEST_CASE("snapshot: on without the object; a busy VM") {
  FileSettings s;
  s.path = "/tmp/x.snap";
  s.disk_dedup = DedupMode::kOn;
  FileRun r(s);
  r.q->dd = json::array();
  r.go();
  auto out = r.job->outcome();
  REQUIRE_FALSE(out.ok());
  CHECK(out.error().code == "migration-unsupported");
  CHECK_THAT(out.error().message, ContainsSubstring("no kvmx-disk-dedup object"));
  CHECK(r.q->run == "running");  // never stopped
  CHECK(r.q->count("stop") == 0);

  FileRun b(FileSettings{});
  b.q->mig = "active";
  b.go();
  REQUIRE_FALSE(b.job->outcome().ok());
  CHECK(b.job->outcome().error().code == "migration-busy");
}

TEST_CASE("restore: migrate-incoming file: without exiting on error, then cont") {
  FileSettings s;
  s.restore = true;
  s.resume = true;
  s.path = "/var/lib/kvmx/web1.snap";
  s.file_caps = {"x-ignore-shared", "disk-dedup"};
  FileRun r(s);
  r.q->run = "inmigrate";
  r.go();
  auto out = r.job->outcome();
  REQUIRE(out.ok());
  CHECK((*out)["kind"] == "restore");
  CHECK(r.q->count("migrate-incoming {\"exit-on-error\":false,\"uri\":"
                   "\"file:/var/lib/kvmx/web1.snap\"}") == 1);
  CHECK(r.q->set_caps["disk-dedup"]);
  CHECK(r.q->set_caps["x-ignore-shared"]);  // as the file was written
  CHECK(r.q->count("cont") == 1);
  CHECK(r.said("references read from the disk"));

  FileSettings n = s;
  FileRun q(n);  // not started with -incoming
  q.go();
  REQUIRE_FALSE(q.job->outcome().ok());
  CHECK_THAT(q.job->outcome().error().message,
             ContainsSubstring("start it with -incoming defer"));
}

TEST_CASE("restore: the file's capabilities decide; a mismatch is a clear error") {
  // The start of a real snapshot (QEMU 10.0 with 07-disk-dedup).
  static const char kHead[] =
      "QEVM\0\0\0\3\7\0\0\0\13pc-q35-10.0\5\32configuration/capabilities"
      "\0\0\0\1\0\0\0\2\17x-ignore-shared\12disk-dedup\1\0\0\0\1\3ram";
  std::string head(kHead, sizeof(kHead) - 1);
  auto caps = stream_capabilities(head);
  REQUIRE(caps);
  CHECK(*caps == std::vector<std::string>{"x-ignore-shared", "disk-dedup"});
  CHECK_FALSE(stream_capabilities("not a snapshot"));
  CHECK_FALSE(stream_capabilities(head.substr(0, 60)));  // cut short
  std::string hostile = head;
  hostile[56] = '\x7f';  // a count of 0x7f000002
  CHECK_FALSE(stream_capabilities(hostile));
  std::string none("QEVM\0\0\0\3\7\0\0\0\13pc-q35-10.0\5\32configuration/capabilities"
                   "\0\0\0\1\0\0\0\0", 60);
  REQUIRE(stream_capabilities(none));
  CHECK(stream_capabilities(none)->empty());

  auto vm = side("b", true, dd_object({"vd0"}));
  CHECK(decide_dedup_restore(DedupMode::kAuto, true, vm)->enable);
  CHECK_FALSE(decide_dedup_restore(DedupMode::kAuto, false, vm)->enable);
  auto r = decide_dedup_restore(DedupMode::kOff, true, vm);
  REQUIRE_FALSE(r.ok());
  CHECK_THAT(r.error().message, ContainsSubstring("the file was written with disk-dedup"));
  r = decide_dedup_restore(DedupMode::kOn, false, vm);
  REQUIRE_FALSE(r.ok());
  CHECK_THAT(r.error().message, ContainsSubstring("written without disk-dedup"));
  r = decide_dedup_restore(DedupMode::kAuto, true, side("b", true, json::array()));
  REQUIRE_FALSE(r.ok());
  CHECK(r.error().code == "migration-unsupported");
  CHECK_THAT(r.error().message,
             ContainsSubstring("the file was written with disk-dedup, but VM 'b' "
                               "has no kvmx-disk-dedup object"));

  // Through the job: a QEMU without the object, a file with dedup.
  FileSettings s;
  s.restore = true;
  s.path = "/x.snap";
  s.file_caps = {"disk-dedup"};
  FileRun q(s);
  q.q->run = "inmigrate";
  q.q->dd = json::array();
  q.go();
  REQUIRE_FALSE(q.job->outcome().ok());
  CHECK(q.q->count("migrate-incoming") == 0);
}
