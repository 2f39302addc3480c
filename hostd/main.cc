// kvmx-hostd: parses flags and the config file, sets up logging, detaches
// from the terminal unless --foreground, and runs the Daemon's event loop.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <cstdio>
#include <optional>
#include <string>
#include <vector>

#include "common/fd.h"
#include "common/log.h"
#include "config/config.h"
#include "daemon/daemon.h"
#include "loop/event_loop.h"

namespace {

int fail(const std::string& message) {
  std::fprintf(stderr, "kvmx-hostd: %s\n", message.c_str());
  return 1;
}

// Forks into the background.  Returns the write end of a pipe on which the
// daemon reports readiness ("" = ready, else an error line); the foreground
// parent waits for it and exits 0 or 1.  Never returns in the parent.
kvmx::UniqueFd daemonize() {
  int p[2];
  if (::pipe2(p, O_CLOEXEC) < 0) std::exit(fail("Failed to create a pipe"));
  kvmx::UniqueFd rd(p[0]), wr(p[1]);
  pid_t pid = ::fork();
  if (pid < 0) std::exit(fail("Failed to fork"));
  if (pid > 0) {
    wr.reset();
    std::string msg;
    char buf[512];
    ssize_t n;
    while ((n = ::read(rd.get(), buf, sizeof(buf))) > 0)
      msg.append(buf, static_cast<size_t>(n));
    if (msg == "ready") std::_Exit(0);
    std::_Exit(fail(msg.empty() ? "daemon exited during start-up" : msg));
  }
  rd.reset();
  ::setsid();
  pid = ::fork();
  if (pid < 0) std::_Exit(1);
  if (pid > 0) std::_Exit(0);
  if (::chdir("/") < 0) std::_Exit(1);
  int null = ::open("/dev/null", O_RDWR | O_CLOEXEC);
  if (null >= 0) {
    ::dup2(null, 0);
    ::dup2(null, 1);
    ::dup2(null, 2);
    if (null > 2) ::close(null);
  }
  return wr;
}

void report(const kvmx::UniqueFd& pipe, const std::string& msg) {
  if (pipe) (void)!::write(pipe.get(), msg.data(), msg.size());
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"kvmx-hostd: records kvmx-chan memory-protection violations "
               "of attached VMs and serves them over a Unix-socket API"};
  std::optional<std::string> config_path, socket, state_dir, log_level,
      log_format, libvirt_uri;
  std::vector<std::string> options;
  bool foreground = false;
  app.add_option("--config", config_path, "config file (key = value lines)");
  app.add_option("--socket", socket, "API socket [/run/kvmx/hostd.sock]");
  app.add_option("--state-dir", state_dir, "journal and lock [/var/lib/kvmx]");
  app.add_option("--log-level", log_level,
                 "trace|debug|info|warn|error|critical|off [info]");
  app.add_option("--log-format", log_format, "text|json [text]");
  app.add_option("--libvirt", libvirt_uri,
                 "follow the opted-in domains of this libvirt URI "
                 "(qemu:///system) [off]");
  app.add_option("-o,--option", options,
                 "KEY=VALUE for any config key (repeatable)");
  app.add_flag("--foreground", foreground,
               "stay in the foreground and log to stderr (else: syslog)");
  app.set_version_flag("--version", KVMX_VERSION);
  CLI11_PARSE(app, argc, argv);

  kvmx::config::Config cfg;
  if (config_path) {
    if (auto r = kvmx::config::apply_file(cfg, *config_path); !r)
      return fail(r.error().message);
  }
  std::vector<std::pair<std::string, std::string>> flags;
  for (const auto& o : options) {
    auto eq = o.find('=');
    if (eq == std::string::npos)
      return fail("--option expects KEY=VALUE, not '" + o + "'");
    flags.emplace_back(o.substr(0, eq), o.substr(eq + 1));
  }
  if (socket) flags.emplace_back("socket", *socket);
  if (state_dir) flags.emplace_back("state-dir", *state_dir);
  if (log_level) flags.emplace_back("log-level", *log_level);
  if (log_format) flags.emplace_back("log-format", *log_format);
  if (libvirt_uri) flags.emplace_back("libvirt-uri", *libvirt_uri);
  for (const auto& [key, value] : flags)
    if (auto r = kvmx::config::set(cfg, key, value); !r)
      return fail(r.error().message);
  if (auto r = kvmx::config::validate(cfg); !r) return fail(r.error().message);

  auto format = kvmx::log::parse_format(cfg.log_format);
  auto sink = foreground ? kvmx::log::Sink::kStderr : kvmx::log::Sink::kSyslog;
  kvmx::UniqueFd ready;
  if (!foreground) ready = daemonize();
  if (auto r = kvmx::log::setup(cfg.log_level, *format, sink); !r) {
    report(ready, r.error().message);
    return fail(r.error().message);
  }

  auto loop = kvmx::EventLoop::create();
  if (!loop) {
    report(ready, loop.error().message);
    return fail(loop.error().message);
  }
  kvmx::Daemon daemon(**loop, cfg);
  if (auto r = daemon.start(); !r) {
    kvmx::log::error("Failed to start", {{"error", r.error().message}});
    report(ready, r.error().message);
    return 1;
  }
  report(ready, "ready");
  ready.reset();
  return (*loop)->run();
}
