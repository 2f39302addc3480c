#include "manager.h"

namespace kvmx::vm {

Vm* Manager::find(const std::string& name) {
  auto it = vms_.find(name);
  return it == vms_.end() ? nullptr : it->second.get();
}

Vm* Manager::find_by_path(const std::string& qmp_path) {
  for (auto& [name, vm] : vms_)
    if (vm->qmp_path() == qmp_path) return vm.get();
  return nullptr;
}

Vm& Manager::add(const std::string& name, const std::string& qmp_path,
                 UniqueFd fd) {
  auto vm = std::make_unique<Vm>(loop_, name, qmp_path, options_, hooks_);
  Vm& ref = *vm;
  vms_[name] = std::move(vm);
  ref.start(std::move(fd));
  return ref;
}

void Manager::remove(const std::string& name) {
  auto it = vms_.find(name);
  if (it == vms_.end()) return;
  auto vm = std::move(it->second);
  vms_.erase(it);
  vm.reset();
}

}  // namespace kvmx::vm
