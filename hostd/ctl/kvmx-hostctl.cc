// kvmx-hostctl: sends one request to kvmx-hostd and prints the response.
//
//   kvmx-hostctl [-s SOCKET] OP [KEY=VALUE...]     e.g. attach vm=a qmp=/x
//   kvmx-hostctl [-s SOCKET] --raw '{"op":"ping"}'
//   kvmx-hostctl subscribe --follow                 prints events until EOF
//
// VALUE is taken as JSON when it parses (numbers, true), else as a string.
// Exit status: 0 result, 1 error response, 2 no connection or bad usage.
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <cstdio>
#include <cstring>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "common/fd.h"

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
  bool follow = false, pretty = false;
  int timeout_s = 30;
  app.add_option("-s,--socket", socket_path, "hostd API socket");
  app.add_option("--raw", raw, "send this JSON request line as is");
  app.add_option("--timeout", timeout_s, "seconds to wait for the response");
  app.add_flag("-f,--follow", follow, "keep printing events (subscribe)");
  app.add_flag("-p,--pretty", pretty, "indent the JSON output");
  app.add_option("op", op, "ping, version, attach, detach, list-vms, "
                           "protections, violations, stats, subscribe");
  app.add_option("args", args, "KEY=VALUE fields of the request");
  CLI11_PARSE(app, argc, argv);

  std::string line;
  if (!raw.empty()) {
    line = raw;
  } else {
    if (op.empty()) return die("no op given (see --help)");
    json req = {{"op", op}};
    for (const auto& a : args) {
      auto eq = a.find('=');
      if (eq == std::string::npos) return die("expected KEY=VALUE, not '" + a + "'");
      std::string value = a.substr(eq + 1);
      json v = json::parse(value, nullptr, false);
      req[a.substr(0, eq)] = v.is_discarded() ? json(value) : v;
    }
    line = req.dump();
  }
  line += '\n';

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
      std::printf("%s\n", text.c_str());
      std::fflush(stdout);
      if (!answered && !msg.is_discarded() && !msg.contains("event")) {
        answered = true;
        status = msg.contains("error") ? 1 : 0;
        if (!follow) return status;
      }
    }
  }
}
