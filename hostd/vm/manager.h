// The registry of attached VMs, by name and by QMP socket path.
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
  Vm* find_by_path(const std::string& qmp_path);
  // Registers a VM (the caller checked names and limits) and starts it.
  Vm& add(const std::string& name, const std::string& qmp_path, UniqueFd fd);
  // Destroys the VM: closes its QMP connection, fails its waiters.  Must
  // not be called from inside the VM's own callbacks (defer it).
  void remove(const std::string& name);
  void clear() { vms_.clear(); }

  size_t size() const { return vms_.size(); }
  const std::map<std::string, std::unique_ptr<Vm>>& all() const { return vms_; }

 private:
  EventLoop& loop_;
  Options options_;
  Hooks hooks_;
  std::map<std::string, std::unique_ptr<Vm>> vms_;
};

}  // namespace kvmx::vm
