// kvmx-hostctl: its command line turned into a request (flags, KEY=VALUE,
// every usage error) and the lines it prints for a migration.
#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

#include "ctl/args.h"

using nlohmann::json;
using namespace kvmx;
using namespace kvmx::ctl;
using Catch::Matchers::ContainsSubstring;

namespace {

std::string usage_error(const std::string& op,
                        const std::vector<std::string>& args,
                        const Flags& flags = {}) {
  auto r = build_request(op, args, flags);
  if (r) return "ok";
  CHECK(r.error().code == "usage");
  return r.error().message;
}

}  // namespace

TEST_CASE("ctl: KEY=VALUE: JSON values, but names and paths stay strings") {
  auto r = build_request("violations", {"vm=a", "limit=5", "since_seq=0"}, {});
  REQUIRE(r.ok());
  CHECK(*r == json{{"op", "violations"}, {"vm", "a"}, {"limit", 5},
                   {"since_seq", 0}});
  r = build_request("migrate", {"vm=123", "dest=true", "uri=unix:/x",
                                "max_bandwidth=1000", "postcopy=true"}, {});
  REQUIRE(r.ok());
  CHECK((*r)["vm"] == "123");
  CHECK((*r)["dest"] == "true");
  CHECK((*r)["max_bandwidth"] == 1000);
  CHECK((*r)["postcopy"] == true);
  r = build_request("attach", {"vm=a", "qmp=/run/x=y.qmp"}, {});
  REQUIRE(r.ok());
  CHECK((*r)["qmp"] == "/run/x=y.qmp");  // split at the first '='
}

TEST_CASE("ctl: migrate flags become fields") {
  Flags f;
  f.postcopy = true;
  f.prefetch = "page-table";
  f.transport = "rdma";
  f.shared_storage = true;
  f.switch_mode = "manual";
  f.no_wait = true;
  auto r = build_request("migrate", {"vm=a", "dest=b"}, f);
  REQUIRE(r.ok());
  CHECK(*r == json{{"op", "migrate"}, {"vm", "a"}, {"dest", "b"},
                   {"postcopy", true}, {"prefetch", "page-table"},
                   {"transport", "rdma"}, {"shared_storage", true}, {"switch", "manual"},
                   {"wait", false}});
  Flags w;
  w.no_wait = true;
  r = build_request("migrate-recover", {"vm=a"}, w);
  REQUIRE(r.ok());
  CHECK((*r)["wait"] == false);
  CHECK(follows_migration("migrate"));
  CHECK(follows_migration("migrate-recover"));
  CHECK_FALSE(follows_migration("migrate-status"));
}

TEST_CASE("ctl: usage errors") {
  CHECK_THAT(usage_error("ping", {"novalue"}), ContainsSubstring("KEY=VALUE"));
  CHECK_THAT(usage_error("ping", {"=x"}), ContainsSubstring("not a field name"));
  CHECK_THAT(usage_error("ping", {"op=attach"}),
             ContainsSubstring("not a field name"));
  CHECK_THAT(usage_error("ping", {"Vm=x"}), ContainsSubstring("not a field name"));
  CHECK_THAT(usage_error("ping", {std::string(65, 'a') + "=1"}),
             ContainsSubstring("not a field name"));
  CHECK_THAT(usage_error("attach", {"vm=a", "vm=b"}),
             ContainsSubstring("'vm' given twice"));
  Flags pc;
  pc.postcopy = true;
  CHECK_THAT(usage_error("attach", {"vm=a"}, pc),
             ContainsSubstring("--postcopy is for migrate"));
  CHECK_THAT(usage_error("migrate-recover", {"vm=a"}, pc),
             ContainsSubstring("--postcopy is for migrate"));
  CHECK_THAT(usage_error("migrate", {"vm=a", "postcopy=false"}, pc),
             ContainsSubstring("--postcopy and postcopy= both given"));
  Flags pf;
  pf.prefetch = "all";
  CHECK_THAT(usage_error("migrate", {"vm=a"}, pf),
             ContainsSubstring("--prefetch takes off, pattern, page-table or "
                               "both, not 'all'"));
  Flags tr;
  tr.transport = "ib";
  CHECK_THAT(usage_error("migrate", {"vm=a"}, tr),
             ContainsSubstring("--transport takes tcp or rdma, not 'ib'"));
  Flags sw;
  sw.switch_mode = "now";
  CHECK_THAT(usage_error("migrate", {"vm=a"}, sw),
             ContainsSubstring("--switch takes auto or manual"));
  Flags nw;
  nw.no_wait = true;
  CHECK_THAT(usage_error("ping", {}, nw),
             ContainsSubstring("--no-wait is for migrate, migrate-recover, snapshot and restore"));
  CHECK(usage_error("migrate", {"vm=a", "dest=b"}, pc) == "ok");
}

TEST_CASE("ctl: progress and outcome lines") {
  CHECK(format_bytes(0) == "0 B");
  CHECK(format_bytes(1023) == "1023 B");
  CHECK(format_bytes(1536) == "1.5 KiB");
  CHECK(format_bytes(812ull << 20) == "812.0 MiB");
  CHECK(format_bytes(3ull << 40) == "3.0 TiB");

  json ev = {{"event", "migration"}, {"message", ""}, {"elapsed_ms", 12345},
             {"state", "precopy"}, {"pass", 2}, {"remaining", 812ull << 20},
             {"transferred", 100ull << 20}, {"bytes_per_s", 32ull << 20},
             {"postcopy_requests", 0}, {"status", "active"},
             {"dest_status", "active"}};
  CHECK(format_event(ev) ==
        "[   12.3 s] precopy    pass 2  remaining 812.0 MiB  sent 100.0 MiB  "
        "32.0 MiB/s  (source active, destination active)");
  ev["state"] = "postcopy";
  ev["postcopy_requests"] = 7;
  CHECK_THAT(format_event(ev), ContainsSubstring("  page requests 7  "));
  ev["message"] = "switching to post-copy: 1 precopy pass complete";
  CHECK(format_event(ev) ==
        "[   12.3 s] switching to post-copy: 1 precopy pass complete");
  // A hostile or odd event does not throw.
  CHECK_THAT(format_event(json{{"event", "migration"}, {"pass", "x"}}),
             ContainsSubstring("pass ?"));

  json done = {{"result",
                {{"vm", "a"}, {"dest", "b"}, {"state", "completed"},
                 {"transferred", 449ull << 20}, {"switched", true},
                 {"switch_reason", "1 precopy pass complete"},
                 {"postcopy_requests", 58}, {"downtime_ms", 70},
                 {"recoveries", 1}}}};
  CHECK(format_outcome(done) ==
        "migration of 'a' to 'b' completed: 449.0 MiB sent, post-copy (1 "
        "precopy pass complete), 58 page requests, downtime 70 ms, 1 "
        "recoveries");
  json err = {{"error", {{"code", "migration-paused"}, {"message", "m"}}}};
  CHECK(format_outcome(err) == "migration-paused: m");
  json started = {{"result", {{"vm", "a"}, {"dest", "b"},
                              {"state", "precopy"}, {"status", "active"}}}};
  CHECK_THAT(format_outcome(started),
             ContainsSubstring("is precopy (QEMU: active)"));
}

TEST_CASE("ctl: --disk-dedup, snapshot and restore flags") {
  Flags f;
  f.disk_dedup = "on";
  f.shared_storage = true;
  auto r = build_request("migrate", {"vm=a", "dest=b"}, f);
  REQUIRE(r.ok());
  CHECK((*r)["disk_dedup"] == "on");
  CHECK((*r)["shared_storage"] == true);
  f = {};
  f.disk_dedup = "maybe";
  CHECK(usage_error("migrate", {"vm=a", "dest=b"}, f) ==
        "--disk-dedup takes auto, on or off, not 'maybe'");
  f.disk_dedup = "off";
  CHECK(usage_error("attach", {"vm=a"}, f) ==
        "--disk-dedup is for migrate, snapshot and restore");
  CHECK(usage_error("migrate", {"vm=a", "dest=b", "disk_dedup=on"}, f) ==
        "--disk-dedup and disk_dedup= both given");

  Flags s;
  s.force = s.resume = true;
  s.disk_dedup = "auto";
  s.no_wait = true;
  r = build_request("snapshot", {"vm=a", "file=/var/lib/kvmx/a=1.snap"}, s);
  REQUIRE(r.ok());
  CHECK(*r == json{{"op", "snapshot"}, {"vm", "a"},
                   {"file", "/var/lib/kvmx/a=1.snap"}, {"disk_dedup", "auto"},
                   {"force", true}, {"resume", true}, {"wait", false}});
  CHECK(usage_error("restore", {"vm=a", "file=/x"}, s) == "--force is for snapshot");
  Flags p;
  p.paused = true;
  r = build_request("restore", {"vm=a", "file=123"}, p);
  REQUIRE(r.ok());
  CHECK((*r)["file"] == "123");  // a string, never a number
  CHECK((*r)["paused"] == true);
  CHECK(usage_error("snapshot", {"vm=a", "file=/x"}, p) == "--paused is for restore");
  Flags pc;
  pc.postcopy = true;
  CHECK(usage_error("snapshot", {"vm=a", "file=/x"}, pc) == "--postcopy is for migrate");
  CHECK(follows_migration("snapshot"));
  CHECK(follows_migration("restore"));
}

TEST_CASE("ctl: progress and outcome lines with disk dedup") {
  json ev = {{"event", "migration"}, {"elapsed_ms", 3000}, {"state", "precopy"},
             {"pass", 1}, {"remaining", 1048576}, {"transferred", 2097152},
             {"bytes_per_s", 1048576}, {"status", "active"},
             {"dest_status", "active"}, {"dedup", true},
             {"dedup_stats", {{"pages_as_reference", 1234},
                              {"bytes_saved", 5033164},
                              {"references_resolved", 1200}}}};
  CHECK(format_event(ev) ==
        "[    3.0 s] precopy    pass 1  remaining 1.0 MiB  sent 2.0 MiB  "
        "1.0 MiB/s  refs 1234 (4.8 MiB saved) resolved 1200  (source active, "
        "destination active)");
  json done = {{"result",
                {{"vm", "a"}, {"dest", "b"}, {"state", "completed"},
                 {"transferred", 1048576}, {"switched", false},
                 {"downtime_ms", 5}, {"dedup", true},
                 {"dedup_stats",
                  {{"pages_as_reference", 10}, {"bytes_saved", 40960},
                   {"images_refused", 1},
                   {"refused_reason", "disk vd1: a different image"},
                   {"references_resolved", 10}, {"mismatches", 0},
                   {"read_errors", 0}}}}}};
  CHECK(format_outcome(done) ==
        "migration of 'a' to 'b' completed: 1.0 MiB sent, precopy only, "
        "downtime 5 ms; disk dedup: 10 pages as references (40.0 KiB saved), "
        "the destination resolved 10, refused 1 disks (disk vd1: a different "
        "image), 0 mismatches, 0 read errors");
  done["result"]["dedup"] = false;
  done["result"]["dedup_reason"] = "no --shared-storage";
  CHECK_THAT(format_outcome(done),
             ContainsSubstring("; disk dedup off (no --shared-storage)"));
  done["result"]["rdma"] = {{"status", "closed"}, {"pages_read", 77}};
  CHECK_THAT(format_outcome(done),
             ContainsSubstring("; RDMA: the destination read 77 pages by "
                               "RDMA READ"));
  done["result"]["rdma"] = {{"status", "fallback"},
                            {"reason", "no RDMA device"}, {"pages_read", 0}};
  CHECK_THAT(format_outcome(done),
             ContainsSubstring("; RDMA not used (no RDMA device): post-copy "
                               "went over the stream"));
  done["result"]["rdma"] = {{"status", "failed"}, {"reason", "READ failed"},
                            {"pages_read", 9}};
  CHECK_THAT(format_outcome(done),
             ContainsSubstring("; RDMA failed after 9 pages read (READ "
                               "failed)"));

  json snap = {{"event", "migration"}, {"kind", "snapshot"}, {"elapsed_ms", 1000},
               {"state", "saving"}, {"remaining", 0}, {"transferred", 1048576},
               {"bytes_per_s", 1048576}, {"status", "active"}, {"dedup", true},
               {"dedup_stats", {{"pages_as_reference", 5}, {"bytes_saved", 20480}}}};
  CHECK(format_event(snap) ==
        "[    1.0 s] saving     remaining 0 B  written 1.0 MiB  1.0 MiB/s  "
        "refs 5 (20.0 KiB saved)  (QEMU active)");
  json sdone = {{"result", snap}};
  sdone["result"]["state"] = "completed";
  sdone["result"]["vm"] = "a";
  sdone["result"]["file"] = "/s/a.snap";
  sdone["result"]["resume"] = false;
  sdone["result"]["was_running"] = true;
  CHECK(format_outcome(sdone) ==
        "snapshot of 'a' to '/s/a.snap' completed: 1.0 MiB written, 5 pages as "
        "references (20.0 KiB saved); the VM is paused");
  json rdone = {{"result", {{"kind", "restore"}, {"vm", "b"}, {"file", "/s/a.snap"},
                            {"state", "completed"}, {"resume", true},
                            {"dedup", true},
                            {"dedup_stats", {{"references_resolved", 5}}}}}};
  CHECK(format_outcome(rdone) ==
        "restore of 'b' from '/s/a.snap' completed, 5 pages read from the disk "
        "by reference; the guest runs");
}
