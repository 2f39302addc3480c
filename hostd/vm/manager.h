// The registry of VMs, by name; socket VMs also by QMP socket path.
#pragma once

#include <map>
#include <memory>
#include <string>

#include "vm.h"

namespace kvmx::vm {

class Manager {
 public:
  Manager(EventLoop& loop, Options options, Hooks hooks)
      : loop_(loop), options_(options), hooks_(std::move(hooks)) {}

  Vm* find(const std::string& name);
  // The socket VM of that name (nullptr also when the name is a libvirt VM).
  QmpVm* find_qmp(const std::string& name);
  QmpVm* find_by_path(const std::string& qmp_path);
  // Registers a socket VM (the caller checked names and limits) and, with
  // `start`, starts it.
  QmpVm& add(const std::string& name, const std::string& qmp_path,
             UniqueFd fd, bool start = true);
  // Registers a VM built elsewhere (libvirt domains); it must have been
  // built with hooks().  Replaces nothing: the name must be free.
  Vm& insert(std::unique_ptr<Vm> vm);
  // Destroys the VM: closes its connection, fails its waiters.  Must
  // not be called from inside the VM's own callbacks (defer it).
  void remove(const std::string& name);
  void clear() { vms_.clear(); }
  // Back-pressure on every socket VM, present and future.
  void pause_input(bool paused);
  bool input_paused() const { return paused_; }

  size_t size() const { return vms_.size(); }
  const std::map<std::string, std::unique_ptr<Vm>>& all() const { return vms_; }
  const Hooks& hooks() const { return hooks_; }
  const Options& options() const { return options_; }

 private:
  EventLoop& loop_;
  Options options_;
  Hooks hooks_;
  std::map<std::string, std::unique_ptr<Vm>> vms_;
  bool paused_ = false;
};

}  // namespace kvmx::vm
