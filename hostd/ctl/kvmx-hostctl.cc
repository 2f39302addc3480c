// kvmx-hostctl: sends one request to kvmx-hostd and prints the response.
//
//   kvmx-hostctl [-s SOCKET] OP [KEY=VALUE...]     e.g. attach vm=a qmp=/x
//   kvmx-hostctl [-s SOCKET] --raw '{"op":"ping"}'
//   kvmx-hostctl subscribe --follow                 prints events until EOF
//   kvmx-hostctl migrate vm=a dest=b --postcopy     progress, then how it ended
//   kvmx-hostctl snapshot vm=a file=/var/lib/kvmx/a.snap    the same
//   kvmx-hostctl restore vm=a-new file=/var/lib/kvmx/a.snap
//
// VALUE is taken as JSON when it parses (numbers, true), else as a string
// (always a string for names, paths and URIs: ctl/args.h).
// migrate and migrate-recover print a line per progress event and one for
// the outcome (--json: the JSON lines as they come).
// Exit status: 0 result, 1 error response (a migration that failed, was
// cancelled or paused), 2 no connection or bad usage.
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <cstdio>
#include <algorithm>
#include <cstring>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "common/fd.h"
#include "ctl/args.h"

using nlohmann::json;

namespace {

int die(const std::string& msg) {
  std::fprintf(stderr, "kvmx-hostctl: %s\n", msg.c_str());
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"kvmx-hostctl: send one request to kvmx-hostd"};
  std::string socket_path = "/run/kvmx/hostd.sock", op, raw;
  std::vector<std::string> args;
  bool follow = false, pretty = false, json_out = false;
  int timeout_s = 30;
  kvmx::ctl::Flags flags;
  std::string prefetch, switch_mode, transport;
  app.add_option("-s,--socket", socket_path, "hostd API socket");
  app.add_option("--raw", raw, "send this JSON request line as is");
  app.add_option("--timeout", timeout_s,
                 "seconds to wait for the response (for migrate: for the "
                 "next progress line)");
  app.add_flag("-f,--follow", follow, "keep printing events (subscribe)");
  app.add_flag("-p,--pretty", pretty, "indent the JSON output");
  app.add_flag("--json", json_out,
               "migrate, migrate-recover, migrate-status: print the JSON "
               "lines, not text");
  app.add_flag("--postcopy", flags.postcopy,
               "migrate: allow the switch to post-copy");
  auto* pf = app.add_option("--prefetch", prefetch,
                            "migrate: post-copy prefetch: off, pattern, "
                            "page-table or both");
  auto* tr = app.add_option("--transport", transport,
                            "migrate: tcp, or rdma: post-copy faults served "
                            "by RDMA READ from the source's memory (needs "
                            "--postcopy and a tcp: uri; without an RDMA "
                            "device QEMU falls back to TCP and says why)");
  app.add_flag("--shared-storage", flags.shared_storage,
               "migrate: both QEMUs map the same backend files "
               "(x-ignore-shared: they are not sent)");
  auto* sw = app.add_option("--switch", switch_mode,
                            "migrate: switch to post-copy by policy (auto) "
                            "or only on migrate-postcopy (manual)");
  app.add_flag("--no-wait", flags.no_wait,
               "migrate, migrate-recover, snapshot, restore: answer once it "
               "began");
  std::string disk_dedup;
  auto* dd = app.add_flag("--disk-dedup{on}", disk_dedup,
                          "migrate, snapshot, restore: disk pages as "
                          "references: auto (default: when both sides have "
                          "a kvmx-disk-dedup object with disks and "
                          "--shared-storage), on (required), off; "
                          "--disk-dedup alone is on");
  app.add_flag("--force", flags.force,
               "snapshot: overwrite an earlier snapshot file");
  app.add_flag("--resume", flags.resume,
               "snapshot: run the guest again once saved (default: it "
               "stays paused)");
  app.add_flag("--paused", flags.paused,
               "restore: leave the guest paused once loaded");
  app.add_option("op", op, "ping, version, attach, detach, list-vms, "
                           "protections, violations, stats, subscribe, "
                           "migrate, migrate-postcopy, migrate-recover, "
                           "migrate-cancel, migrate-status, snapshot, "
                           "restore");
  app.add_option("args", args, "KEY=VALUE fields of the request");
  CLI11_PARSE(app, argc, argv);
  if (pf->count()) flags.prefetch = prefetch;
  if (tr->count()) flags.transport = transport;
  if (sw->count()) flags.switch_mode = switch_mode;
  if (dd->count()) flags.disk_dedup = disk_dedup;

  std::string line;
  bool migration = false, status_op = false;
  int interval_ms = 1000;
  if (!raw.empty()) {
    line = raw;
  } else {
    if (op.empty()) return die("no op given (see --help)");
    auto req = kvmx::ctl::build_request(op, args, flags);
    if (!req) return die(req.error().message);
    migration = kvmx::ctl::follows_migration(op) && !json_out;
    status_op = op == "migrate-status" && !json_out;
    if (auto it = req->find("interval_ms");
        it != req->end() && it->is_number_unsigned() &&
        it->get<uint64_t>() <= 3600000)
      interval_ms = static_cast<int>(it->get<uint64_t>());
    line = req->dump();
  }
  line += '\n';
  // A migration's answer comes at its end; what must keep coming is its
  // progress, one line per interval.
  if (kvmx::ctl::follows_migration(op))
    timeout_s = std::max(timeout_s, 3 * interval_ms / 1000 + 60);

  kvmx::UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (socket_path.size() >= sizeof(addr.sun_path))
    return die("socket path too long");
  std::memcpy(addr.sun_path, socket_path.data(), socket_path.size());
  if (!fd || ::connect(fd.get(), reinterpret_cast<sockaddr*>(&addr),
                       sizeof(addr)) < 0)
    return die("cannot connect to '" + socket_path + "': " +
               std::strerror(errno));
  for (size_t off = 0; off < line.size();) {
    ssize_t n = ::send(fd.get(), line.data() + off, line.size() - off,
                       MSG_NOSIGNAL);
    if (n < 0) return die(std::string("send failed: ") + std::strerror(errno));
    off += static_cast<size_t>(n);
  }

  std::string buf;
  int status = 2;
  bool answered = false;
  for (;;) {
    pollfd p{fd.get(), POLLIN, 0};
    int wait_ms = (answered && follow) ? -1 : timeout_s * 1000;
    int r = ::poll(&p, 1, wait_ms);
    if (r == 0) return answered ? status : die("no response (timeout)");
    if (r < 0) return die(std::string("poll failed: ") + std::strerror(errno));
    char chunk[65536];
    ssize_t n = ::read(fd.get(), chunk, sizeof(chunk));
    if (n <= 0) return answered ? status : die("connection closed, no response");
    buf.append(chunk, static_cast<size_t>(n));
    size_t nl;
    while ((nl = buf.find('\n')) != std::string::npos) {
      json msg = json::parse(buf.substr(0, nl), nullptr, false);
      std::string text = pretty && !msg.is_discarded() ? msg.dump(2)
                                                       : buf.substr(0, nl);
      buf.erase(0, nl + 1);
      bool response = !msg.is_discarded() && msg.is_object() &&
                      !msg.contains("event");
      if (migration && !msg.is_discarded() && msg.is_object()) {
        if (!response) {
          if (msg.value("event", "") == "migration")
            text = kvmx::ctl::format_event(msg);
        } else if (msg.contains("error")) {
          std::fprintf(stderr, "kvmx-hostctl: %s\n",
                       kvmx::ctl::format_outcome(msg).c_str());
          return 1;
        } else {
          text = kvmx::ctl::format_outcome(msg);
        }
      } else if (status_op && response && msg.contains("result")) {
        const json& r = msg["result"];
        std::string head =
            r.contains("kind") ? r.value("vm", "") + " " +
                                     r.value("kind", "") + " " +
                                     r.value("file", "")
                               : r.value("vm", "") + " -> " +
                                     r.value("dest", "");
        text = head + ": " + kvmx::ctl::format_event(r) +
               (r.value("error", "").empty() ? "" : "; " + r.value("error", ""));
      }
      std::printf("%s\n", text.c_str());
      std::fflush(stdout);
      if (!answered && response) {
        answered = true;
        status = msg.contains("error") ? 1 : 0;
        if (!follow) return status;
      }
    }
  }
}
