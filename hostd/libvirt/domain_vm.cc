#include "domain_vm.h"

#include "common/json_util.h"
#include "common/log.h"

namespace kvmx::libvirt {

using nlohmann::json;

DomainVm::DomainVm(EventLoop& loop, std::string name, std::string uri,
                   const vm::Hooks& hooks, Backend* backend,
                   std::chrono::milliseconds command_timeout)
    : Vm(loop, std::move(name), hooks,
         backend ? vm::State::kDisconnected : vm::State::kStopped),
      uri_(std::move(uri)), backend_(backend), timeout_(command_timeout) {
  if (!backend) last_error_ = "kvmx-hostd runs without --libvirt";
}

DomainVm::~DomainVm() {
  gen_++;  // an attach under way ends here, without state changes
  alive_.reset();
  auto pending = std::move(pending_);
  pending_.clear();
  for (auto& [id, p] : pending) {
    loop_.cancel(p.timer);
    p.fn(make_error("vm-not-connected", "VM '" + name_ + "' was detached"));
  }
}

std::string DomainVm::origin() const {
  return "libvirt " + uri_ + " domain " + name_;
}

json DomainVm::info() const {
  json j = Vm::info();
  j["qmp"] = nullptr;
  j["libvirt"] = json{{"uri", uri_}, {"uuid", uuid_}};
  return j;
}

void DomainVm::monitor_command(const std::string& cmd, const json& arguments,
                               std::function<void(Result<json>)> fn) {
  if (state_ != vm::State::kAttached) {
    fn(make_error("vm-not-connected", "VM '" + name_ + "' is " +
                                          vm::to_string(state_) +
                                          ", not attached"));
    return;
  }
  command(cmd, arguments, std::move(fn));
}

void DomainVm::command(const std::string& cmd, const json& arguments,
                       Backend::ReplyFn fn) {
  if (!backend_) {
    fn(make_error("vm-not-connected", "kvmx-hostd runs without --libvirt"));
    return;
  }
  uint64_t id = next_cmd_++;
  Pending p;
  p.fn = std::move(fn);
  p.timer = loop_.after(timeout_, [this, id, cmd] {
    finish(id, make_error("timeout", "libvirt did not answer " + cmd +
                                         " within " +
                                         std::to_string(timeout_.count()) +
                                         " ms"));
  });
  pending_.emplace(id, std::move(p));
  std::weak_ptr<bool> alive = alive_;
  backend_->qmp_command(name_, cmd, arguments, [this, alive, id](Result<json> r) {
    if (alive.expired()) return;
    finish(id, std::move(r));
  });
}

void DomainVm::finish(uint64_t id, Result<json> result) {
  auto it = pending_.find(id);
  if (it == pending_.end()) return;  // timed out earlier, or answered
  Pending p = std::move(it->second);
  pending_.erase(it);
  loop_.cancel(p.timer);
  p.fn(std::move(result));
}

void DomainVm::attach(const std::string& uuid) {
  if (!uuid.empty()) uuid_ = uuid;
  if (following() || !backend_) return;
  uint64_t gen = ++gen_;
  set_state(vm::State::kConnecting);
  command("query-version", [this, gen](Result<json> r) {
    if (gen != gen_) return;
    if (!r && r.error().code == "vm-not-connected") {
      stop(r.error().message);
      return;
    }
    if (r) {
      const json* q = json_field(*r, "qemu");
      auto part = [&](const char* k) {
        auto n = q ? json_i64(*q, k) : std::nullopt;
        return n ? std::to_string(*n) : std::string("?");
      };
      qemu_version_ = part("major") + "." + part("minor") + "." + part("micro");
    }
    command("query-kvmx-chan", [this, gen](Result<json> r) {
      if (gen != gen_) return;
      if (!r && r.error().code == "vm-not-connected") {
        stop(r.error().message);
        return;
      }
      if (r) {
        keep_devices(std::move(*r));
      } else {
        devices_ = nullptr;
        log::warn("QEMU does not answer query-kvmx-chan through libvirt; "
                  "attached without device information",
                  {{"vm", name_}, {"error", r.error().message}});
      }
      connects_++;
      set_state(vm::State::kAttached);
    });
  });
}

void DomainVm::stop(const std::string& why) {
  gen_++;
  set_state(vm::State::kStopped, why);
}

void DomainVm::lose(const std::string& why) {
  gen_++;
  set_state(vm::State::kDisconnected, why);
}

void DomainVm::on_monitor_event(const qmp::Event& ev) {
  if (following()) deliver(ev);
}

void DomainVm::query_protections(std::function<void(Result<json>)> fn) {
  if (state_ != vm::State::kAttached) {
    fn(make_error("vm-not-connected", "VM '" + name_ + "' is " +
                                          vm::to_string(state_) +
                                          ", not attached"));
    return;
  }
  command("query-kvmx-chan", [this, fn = std::move(fn)](Result<json> r) {
    fn(bound_answer(std::move(r)));
  });
}

}  // namespace kvmx::libvirt
