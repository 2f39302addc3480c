#include <catch2/catch_test_macros.hpp>

#include "config/config.h"
#include "test_helpers.h"

using namespace kvmx::config;

TEST_CASE("config: defaults") {
  Config c;
  CHECK(c.socket == "/run/kvmx/hostd.sock");
  CHECK(c.state_dir == "/var/lib/kvmx");
  CHECK(c.max_clients == 64);
  CHECK(c.max_vms == 64);
  CHECK(c.max_request_bytes == 65536);
  CHECK(c.max_output_bytes == 1048576);
  CHECK(c.max_violations == 100000);
  CHECK(c.max_qmp_message_bytes == 4 << 20);
  CHECK(c.max_devices_bytes == 1 << 20);
  CHECK(c.client_idle_timeout_ms == 60000);
  CHECK(validate(c).ok());
}

TEST_CASE("config: a file of key = value lines, comments and blanks") {
  Config c;
  auto r = apply_text(c,
                      "# hostd\n"
                      "\n"
                      "socket = /tmp/h.sock\r\n"
                      "  state-dir=/tmp/state  \n"
                      "socket-mode = 0600\n"
                      "log-format = json\n"
                      "max-clients = 8\n"
                      "max-violations = 500\n"
                      "reconnect-max-ms = 200\n",
                      "test.conf");
  REQUIRE(r.ok());
  CHECK(c.socket == "/tmp/h.sock");
  CHECK(c.state_dir == "/tmp/state");
  CHECK(c.socket_mode == 0600);
  CHECK(c.log_format == "json");
  CHECK(c.max_clients == 8);
  CHECK(c.max_violations == 500);
  CHECK(c.reconnect_max_ms == 200);
}

TEST_CASE("config: errors name the file, the line and the key") {
  Config c;
  auto r = apply_text(c, "max-clients = 8\nfoo = 1\n", "h.conf");
  REQUIRE(!r.ok());
  CHECK(r.error().message == "h.conf:2: unknown key 'foo'");
  r = apply_text(c, "max-clients\n", "h.conf");
  CHECK(r.error().message == "h.conf:1: expected 'key = value'");
  r = apply_text(c, "max-clients = lots\n", "h.conf");
  CHECK(r.error().message ==
        "h.conf:1: 'max-clients' must be an integer, not 'lots'");
  r = apply_text(c, "max-clients = 0\n", "h.conf");
  CHECK(r.error().message ==
        "h.conf:1: 'max-clients' must be between 1 and 4096");
  r = apply_text(c, "max-clients = 12x\n", "h.conf");
  CHECK(!r.ok());
  r = apply_text(c, "max-clients = -1\n", "h.conf");
  CHECK(!r.ok());
  r = apply_text(c, "socket = relative.sock\n", "h.conf");
  CHECK(r.error().message == "h.conf:1: 'socket' must be an absolute path");
  r = apply_text(c, "log-level = loud\n", "h.conf");
  CHECK(!r.ok());
  r = apply_text(c, "socket-mode = 0999\n", "h.conf");
  CHECK(!r.ok());
  r = apply_text(c, "reconnect-min-ms = 5000\nreconnect-max-ms = 100\n",
                 "h.conf");
  CHECK(r.error().message ==
        "'reconnect-min-ms' is larger than 'reconnect-max-ms'");
}

TEST_CASE("config: flags (set after the file) override it") {
  kvmx::test::TempDir dir;
  std::string path = dir / "h.conf";
  kvmx::test::write_file(path, "socket = /tmp/file.sock\nmax-vms = 3\n");
  Config c;
  REQUIRE(apply_file(c, path).ok());
  CHECK(c.socket == "/tmp/file.sock");
  REQUIRE(set(c, "socket", "/tmp/flag.sock").ok());
  CHECK(c.socket == "/tmp/flag.sock");
  CHECK(c.max_vms == 3);
  auto missing = apply_file(c, dir / "nope.conf");
  REQUIRE(!missing.ok());
  CHECK(missing.error().message.find("nope.conf") != std::string::npos);
}

TEST_CASE("config: every documented key is settable") {
  for (auto key : keys()) {
    Config c;
    std::string value = "100";
    if (key == "socket" || key == "state-dir") value = "/x";
    if (key == "socket-mode") value = "0600";
    if (key == "log-level") value = "debug";
    if (key == "log-format") value = "text";
    if (key == "max-request-bytes") value = "4096";
    if (key == "max-output-bytes") value = "1048576";
    if (key == "max-qmp-message-bytes" || key == "max-devices-bytes")
      value = "65536";
    if (key == "libvirt-uri") value = "qemu:///system";
    INFO(std::string(key));
    CHECK(set(c, key, value).ok());
  }
}

TEST_CASE("config: libvirt-uri is off by default and checked") {
  Config c;
  CHECK(c.libvirt_uri.empty());
  CHECK(set(c, "libvirt-uri", "qemu:///system").ok());
  CHECK(c.libvirt_uri == "qemu:///system");
  CHECK(set(c, "libvirt-uri", "").ok());
  CHECK(c.libvirt_uri.empty());
  CHECK(!set(c, "libvirt-uri", "qemu:///system extra").ok());
  CHECK(!set(c, "libvirt-uri", "system").ok());
  CHECK(!set(c, "libvirt-uri", std::string(1025, 'a') + ":").ok());
}
