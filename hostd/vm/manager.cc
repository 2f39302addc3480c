#include "manager.h"

namespace kvmx::vm {

Vm* Manager::find(const std::string& name) {
  auto it = vms_.find(name);
  return it == vms_.end() ? nullptr : it->second.get();
}

QmpVm* Manager::find_qmp(const std::string& name) {
  return dynamic_cast<QmpVm*>(find(name));
}

QmpVm* Manager::find_by_path(const std::string& qmp_path) {
  for (auto& [name, vm] : vms_) {
    auto* q = dynamic_cast<QmpVm*>(vm.get());
    if (q && q->qmp_path() == qmp_path) return q;
  }
  return nullptr;
}

QmpVm& Manager::add(const std::string& name, const std::string& qmp_path,
                    UniqueFd fd, bool start) {
  auto vm = std::make_unique<QmpVm>(loop_, name, qmp_path, options_, hooks_);
  vm->max_devices_bytes = options_.max_devices_bytes;
  QmpVm& ref = *vm;
  vms_[name] = std::move(vm);
  if (paused_) ref.set_input_paused(true);
  if (start) ref.start(std::move(fd));
  return ref;
}

Vm& Manager::insert(std::unique_ptr<Vm> vm) {
  vm->max_devices_bytes = options_.max_devices_bytes;
  Vm& ref = *vm;
  vms_[ref.name()] = std::move(vm);
  return ref;
}

void Manager::pause_input(bool paused) {
  paused_ = paused;
  for (auto& [name, vm] : vms_)
    if (auto* q = dynamic_cast<QmpVm*>(vm.get())) q->set_input_paused(paused);
}

void Manager::remove(const std::string& name) {
  auto it = vms_.find(name);
  if (it == vms_.end()) return;
  auto vm = std::move(it->second);
  vms_.erase(it);
  vm.reset();
}

}  // namespace kvmx::vm
