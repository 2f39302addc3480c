// hostd follows libvirt's domain lifecycle (docs/libvirt.md): for every
// domain that opts in with <kvmx:hostd attach='yes'/> metadata it registers
// a DomainVm, attaches when the domain starts, stops following when it
// stops, and resyncs from the list of running domains whenever the libvirt
// connection (re)opens.  The connection is retried with backoff when it
// cannot be made or drops (libvirtd restarted).
//
// All on hostd's event loop; libvirt itself is behind Backend.
#pragma once

#include <chrono>
#include <functional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "backend.h"
#include "domain_vm.h"
#include "loop/event_loop.h"
#include "vm/backoff.h"
#include "vm/manager.h"

namespace kvmx::libvirt {

struct Options {
  std::string uri;
  size_t max_vms = 64;  // the registry's limit, socket VMs included
  std::chrono::milliseconds command_timeout{10000};
  std::chrono::milliseconds backoff_min{100};
  std::chrono::milliseconds backoff_max{5000};
};

struct FollowerStats {
  uint64_t connects = 0;          // successful opens
  uint64_t connect_failures = 0;  // failed opens
  uint64_t disconnects = 0;       // open connections that closed
  uint64_t resyncs = 0;           // lists of running domains applied
  uint64_t domains_skipped = 0;   // opted in but not followed (name, limit)
  uint64_t events = 0;            // QEMU events handed on
  uint64_t events_ignored = 0;    // of domains hostd does not follow now
};

class Follower {
 public:
  // Records a domain hostd follows for the first time (journal); on error
  // the domain is not followed.
  using PersistFn = std::function<Result<void>(const DomainVm&)>;

  Follower(EventLoop& loop, Backend& backend, vm::Manager& vms,
           Options options, PersistFn persist);
  ~Follower();
  Follower(const Follower&) = delete;
  Follower& operator=(const Follower&) = delete;

  // Opens the connection (and keeps it open).
  void start();
  // Registers a domain the journal says hostd follows: disconnected until
  // the first resync tells whether it runs.  The caller checked the name.
  DomainVm& adopt(const std::string& name, const std::string& uuid);

  bool connected() const { return connected_; }
  const FollowerStats& counters() const { return stats_; }
  // The "libvirt" object of the stats op.
  nlohmann::json stats() const;

 private:
  void on_open();
  void on_close(const std::string& why);
  void on_lifecycle(const LifecycleEvent& ev);
  void on_monitor_event(const std::string& domain, const qmp::Event& ev);
  void resync();
  void apply(const std::vector<Domain>& running);
  // The domain runs: follow it if it opts in.
  void consider(const Domain& d, const std::string& when);
  DomainVm* find(const std::string& name);
  DomainVm* follow(const Domain& d);
  void skip(const Domain& d, const std::string& why);
  void schedule_open();

  EventLoop& loop_;
  Backend& backend_;
  vm::Manager& vms_;
  Options options_;
  PersistFn persist_;
  vm::Backoff backoff_;
  bool started_ = false;
  bool connected_ = false;
  uint64_t epoch_ = 0;  // connection generation; stale list replies check it
  EventLoop::TimerId open_timer_ = 0;
  EventLoop::TimerId resync_timer_ = 0;
  std::string last_error_;
  std::string last_skip_;  // logged once, not on every resync
  FollowerStats stats_;
};

}  // namespace kvmx::libvirt
