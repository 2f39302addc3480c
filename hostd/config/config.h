// hostd's settings: built-in defaults, then a config file of "key = value"
// lines, then command-line flags (the same keys), each validated by set().
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "common/result.h"

namespace kvmx::config {

struct Config {
  std::string socket = "/run/kvmx/hostd.sock";
  unsigned socket_mode = 0660;
  std::string state_dir = "/var/lib/kvmx";
  std::string log_level = "info";
  std::string log_format = "text";

  // Limits on what clients and VMs can make hostd allocate.
  size_t max_clients = 64;
  size_t max_vms = 64;
  size_t max_request_bytes = 64 * 1024;
  size_t max_output_bytes = 1024 * 1024;
  size_t max_violations = 100000;
  // One QMP message from a VM (the line hostd buffers; its parsed form is
  // bounded by the value limit of qmp/client.h), and a VM's query-kvmx-chan
  // answer that hostd keeps as `devices` and relays as `protections`.
  size_t max_qmp_message_bytes = 4 << 20;
  size_t max_devices_bytes = 1 << 20;

  // Timing (milliseconds).
  unsigned attach_timeout_ms = 5000;     // attach waits this long to answer
  unsigned qmp_timeout_ms = 10000;       // greeting+negotiation, commands
  unsigned reconnect_min_ms = 100;
  unsigned reconnect_max_ms = 5000;
  // An API client with no request in flight that sends nothing for this
  // long is closed (subscribers are exempt); 0: never.
  unsigned client_idle_timeout_ms = 60000;

  // libvirt connection URI (qemu:///system); empty: hostd does not talk to
  // libvirt at all.
  std::string libvirt_uri;
};

// Every key set() accepts, in documentation order.
const std::vector<std::string_view>& keys();

// Sets one key from its text form; errors name the key and the range.
Result<void> set(Config& cfg, std::string_view key, std::string_view value);

// Applies a file's text: "key = value" lines, '#' comments, blank lines.
// `origin` (the file name) prefixes error messages as "origin:line: ".
Result<void> apply_text(Config& cfg, std::string_view text,
                        std::string_view origin);
Result<void> apply_file(Config& cfg, const std::string& path);

// Checks relations between keys (reconnect_min_ms <= reconnect_max_ms).
Result<void> validate(const Config& cfg);

}  // namespace kvmx::config
