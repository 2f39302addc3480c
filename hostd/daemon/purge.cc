// Virtblock purging: purge-policy, purge-status, purge-now, unpurge
// (docs/specs/hostd-api.md; docs/design/virtblock-purging.md).  One
// purge::Engine per NVDIMM backend with purge-agent set; its slow work
// (attaching, purge-now, unpurge) runs on the NVDIMM's Worker so that the
// loop keeps serving.  Not journaled: the table itself is the record, and
// purge-policy attaches again after a restart of hostd or QEMU.
#include <sys/eventfd.h>
#include <unistd.h>

#include <memory>
#include <utility>

#include "common/json_util.h"
#include "common/log.h"
#include "daemon.h"

namespace kvmx {

using nlohmann::json;

namespace {

std::string purge_key(const std::string& vm, const std::string& nvdimm) {
  return vm + "/" + nvdimm;
}

// A reply sent once: by the job's completion, or, when every copy is
// dropped unsent (a detach destroys the NVDIMM's Worker, whose completion
// then never runs), as an error, so that the client is not left waiting.
class OnceReply {
 public:
  explicit OnceReply(api::ReplyFn fn) : fn_(std::move(fn)) {}
  ~OnceReply() {
    if (fn_)
      fn_(make_error(api::code::kVmNotFound,
                     "the VM was detached while this request ran"));
  }
  OnceReply(const OnceReply&) = delete;
  OnceReply& operator=(const OnceReply&) = delete;
  void operator()(Result<json> r) {
    if (auto f = std::exchange(fn_, nullptr)) f(std::move(r));
  }

 private:
  api::ReplyFn fn_;
};

json move_json(const purge::MoveResult& m) {
  json j{{"blocks", m.blocks}, {"zero", m.zero}, {"skipped", m.skipped},
         {"failed", m.failed}, {"bytes", m.bytes}, {"seconds", m.seconds}};
  if (!m.error.empty()) j["error"] = m.error;
  return j;
}

// The engine configuration of a {"t":"purge"} record, validated as the API
// validates the same fields.
std::optional<purge::EngineConfig> config_of(const json& rec) {
  auto vm = json_string(rec, "vm"), nv = json_string(rec, "nvdimm"),
       agent = json_string(rec, "agent"), vbt = json_string(rec, "vbt"),
       vbd = json_string(rec, "vbd");
  if (!vm || !nv || !agent || !vbt || !vbd || !api::valid_vm_name(*vm) ||
      nv->empty() || nv->size() > api::kMaxBackendId ||
      !api::valid_file_path(*agent) || !api::valid_file_path(*vbt) ||
      !api::valid_file_path(*vbd))
    return std::nullopt;
  auto shift = rec.find("block_shift");
  auto probe = rec.find("probe_interval_ms");
  if (shift == rec.end() || !shift->is_number_unsigned() ||
      shift->get<uint64_t>() < 16 || shift->get<uint64_t>() > 30 ||
      probe == rec.end() || !probe->is_number_unsigned() ||
      probe->get<uint64_t>() < api::kMinIntervalMs ||
      probe->get<uint64_t>() > api::kMaxIntervalMs)
    return std::nullopt;
  purge::EngineConfig c;
  c.name = *vm + "/" + *nv;
  c.agent_path = *agent;
  c.vbt_path = *vbt;
  c.vbd_path = *vbd;
  c.block_shift = static_cast<uint32_t>(shift->get<uint64_t>());
  c.probe_interval_ms = probe->get<uint64_t>();
  if (auto p = rec.find("policy"); p != rec.end() && p->is_object()) {
    auto pol = purge::parse_policy(*p, purge::PolicyConfig{});
    if (!pol) return std::nullopt;
    c.policy = *pol;
  }
  return c;
}

}  // namespace

bool Daemon::replay_purge(const json& rec) {
  auto vm = json_string(rec, "vm"), nv = json_string(rec, "nvdimm");
  if (!vm || !nv) return false;
  std::string key = purge_key(*vm, *nv);
  if (json_string(rec, "t").value_or("") == "purge-off") {
    purge_configs_.erase(key);
    return true;
  }
  if (!config_of(rec)) return false;
  purge_configs_[key] = rec;
  return true;
}

void Daemon::forget_purge_configs(const std::string& vm) {
  for (auto it = purge_configs_.begin(); it != purge_configs_.end();)
    it = it->first.rfind(vm + "/", 0) == 0 ? purge_configs_.erase(it)
                                           : std::next(it);
}

void Daemon::journal_purge_config(const std::string& key,
                                  const purge::EngineConfig& c,
                                  const purge::PolicyConfig& p) {
  auto slash = key.find('/');
  json rec = {{"t", "purge"},
              {"vm", key.substr(0, slash)},
              {"nvdimm", key.substr(slash + 1)},
              {"agent", c.agent_path},
              {"vbt", c.vbt_path},
              {"vbd", c.vbd_path},
              {"block_shift", c.block_shift},
              {"probe_interval_ms", c.probe_interval_ms},
              {"policy", purge::to_json(p)}};
  if (purge_configs_.count(key) && purge_configs_[key] == rec) return;
  purge_configs_[key] = rec;
  // Not fatal: without the record, a restarted hostd needs purge-policy
  // (and QMP) to attach the NVDIMM again.
  (void)journal_now(rec);
}

// At start-up, for the VMs in the journal: purging goes on where it was,
// before QMP is even up.
void Daemon::start_journal_purges() {
  for (const auto& [key, rec] : purge_configs_) {
    auto c = config_of(rec);
    std::string vm = key.substr(0, key.find('/'));
    if (!c || !vms_->find(vm)) continue;
    auto& slot = purges_[key];
    slot.worker = std::make_unique<Worker>(loop_);
    start_purge_engine(key, vm, std::move(*c), [key](const Result<json>& r) {
      if (!r)
        log::warn("Purging not resumed", {{"nvdimm", key},
                                          {"error", r.error().message}});
    });
  }
}

Result<void> Daemon::watch_purge_faults() {
  purge_event_.reset(::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC));
  if (!purge_event_) return sys_error("purge", "eventfd");
  return loop_.add(purge_event_.get(), EPOLLIN, [this](uint32_t) {
    uint64_t n;
    (void)!::read(purge_event_.get(), &n, sizeof(n));
    std::vector<std::pair<std::string, std::string>> lost;
    {
      std::lock_guard g(purge_fatal_mu_);
      lost.swap(purge_fatal_);
    }
    for (auto& [vm, what] : lost) {
      // The thread waiting for the block stays blocked; stop the rest of
      // the guest too, visibly, rather than let it run half-frozen.
      log::error("Purged block lost; stopping the VM",
                 {{"vm", vm}, {"error", what}});
      if (server_)
        server_->broadcast(json{{"event", "purge-failed"}, {"vm", vm},
                                {"error", what}});
      if (auto* v = vms_->find(vm))
        v->monitor_command("stop", json::object(), [](Result<json>) {});
    }
  });
}

void Daemon::op_purge_policy(const api::PurgePolicy& a, api::ReplyFn reply) {
  vm::Vm* v = vms_->find(a.vm);
  if (!v)
    return reply(make_error(api::code::kVmNotFound,
                            "no VM named '" + a.vm + "' is attached"));
  // Its own QMP socket or libvirt's monitor: only the first attach asks
  // QEMU anything (qom-get); the engine then talks to the agent.
  vm::Vm* q = v;
  std::string key = purge_key(a.vm, a.nvdimm);
  auto& slot = purges_[key];
  if (!slot.worker) slot.worker = std::make_unique<Worker>(loop_);
  purge::PolicyConfig base =
      slot.engine ? slot.engine->policy() : purge::PolicyConfig{};
  auto pol = purge::parse_policy(a.policy, base);
  if (!pol) {
    if (!slot.engine && !slot.worker->busy()) purges_.erase(key);
    return reply(make_error(api::code::kInvalid, pol.error().message));
  }
  if (slot.engine) {
    if (!slot.engine->alive()) {
      // QEMU restarted or the block was lost: attach again below.
      if (slot.worker->busy())
        return reply(make_error(api::code::kPurgeBusy,
                                "a purge request is running on " + key));
      slot.engine.reset();
    } else {
      (void)slot.engine->set_policy(*pol);
      if (auto it = purge_configs_.find(key); it != purge_configs_.end())
        if (auto c = config_of(it->second)) journal_purge_config(key, *c, *pol);
      return reply(slot.engine->status());
    }
  }
  if (slot.worker->busy())
    return reply(make_error(api::code::kPurgeBusy,
                            "purging of " + key + " is starting"));
  // Known from the journal: no QMP needed (QEMU's main thread may wait on
  // a purged block until this engine runs).
  if (auto it = purge_configs_.find(key); it != purge_configs_.end()) {
    if (auto c = config_of(it->second)) {
      c->policy = *pol;
      return start_purge_engine(key, a.vm, std::move(*c), reply);
    }
  }
  // Where QEMU's agent listens, and which file backs the NVDIMM.
  std::string path = "/objects/" + a.nvdimm;
  q->monitor_command(
      "qom-get", json{{"path", path}, {"property", "purge-agent"}},
      [this, a, key, pol = *pol, reply](Result<json> agent) {
        if (!agent && agent.error().code == api::code::kNotConnected) {
          purges_.erase(key);
          return reply(agent.error());
        }
        if (!agent || !agent->is_string() || agent->get<std::string>().empty()) {
          purges_.erase(key);
          return reply(make_error(
              api::code::kPurgeNotEnabled,
              "memory backend '" + a.nvdimm + "' of VM '" + a.vm +
                  "' has no purge-agent" +
                  (agent ? std::string() : ": " + agent.error().message)));
        }
        // Found again: the VM may have been detached meanwhile.
        vm::Vm* again = vms_->find(a.vm);
        if (!again) {
          purges_.erase(key);
          return reply(make_error(api::code::kVmNotFound,
                                  "VM '" + a.vm + "' was detached"));
        }
        again->monitor_command(
            "qom-get",
            json{{"path", "/objects/" + a.nvdimm}, {"property", "mem-path"}},
            [this, a, key, pol, reply,
             agent_path = agent->get<std::string>()](Result<json> mp) {
              purge::EngineConfig c;
              c.name = key;
              c.agent_path = agent_path;
              c.block_shift = a.block_shift;
              c.probe_interval_ms = a.probe_interval_ms;
              if (a.disk_bytes)
                c.disk_slots = std::max<uint64_t>(1, a.disk_bytes >> a.block_shift);
              c.policy = pol;
              std::string base;
              std::string stem = a.vm + "-" + a.nvdimm;
              if (!a.table_dir.empty())
                base = a.table_dir + "/" + stem;
              else if (mp && mp->is_string() && !mp->get<std::string>().empty())
                base = mp->get<std::string>();  // beside the backend file
              else
                base = cfg_.state_dir + "/purge-" + stem;  // a memfd
              c.vbt_path = base + ".vbt";
              c.vbd_path = base + ".vbd";
              start_purge_engine(key, a.vm, std::move(c), reply);
            });
      });
}

void Daemon::start_purge_engine(const std::string& key, const std::string& vm,
                                purge::EngineConfig c, api::ReplyFn reply) {
  auto it = purges_.find(key);
  if (it == purges_.end()) return reply(make_error(api::code::kInternal,
                                                   "purge slot vanished"));
  auto result = std::make_shared<Result<std::unique_ptr<purge::Engine>>>(
      make_error("purge-failed", "not started"));
  auto fatal = [this, vm](const std::string& what) {
    {
      std::lock_guard g(purge_fatal_mu_);
      if (purge_fatal_.size() < 64) purge_fatal_.emplace_back(vm, what);
    }
    uint64_t one = 1;
    (void)!::write(purge_event_.get(), &one, sizeof(one));
  };
  log::info("Purging: attaching", {{"nvdimm", key}, {"agent", c.agent_path},
                                   {"table", c.vbt_path}});
  purge::EngineConfig saved = c;
  auto once = std::make_shared<OnceReply>(std::move(reply));
  auto r = it->second.worker->run(
      [result, c = std::move(c), fatal]() mutable {
        *result = purge::Engine::start(std::move(c), fatal);
      },
      [this, key, result, reply = [once](Result<json> x) { (*once)(std::move(x)); },
       saved] {
        auto s = purges_.find(key);
        if (s == purges_.end()) return;  // detached meanwhile
        if (!*result) {
          log::warn("Purging: attach failed",
                    {{"nvdimm", key}, {"error", result->error().message}});
          purges_.erase(s);
          return reply(Error{api::code::kPurgeFailed,
                             result->error().message, 0});
        }
        s->second.engine = std::move(**result);
        journal_purge_config(key, saved, s->second.engine->policy());
        reply(s->second.engine->status());
      });
  if (!r) {
    purges_.erase(key);
    (*once)(r.error());
  }
}

void Daemon::op_purge_status(const api::PurgeStatus& a, api::ReplyFn reply) {
  json items = json::array();
  for (auto& [key, slot] : purges_) {
    if (!slot.engine) continue;
    if (!a.vm.empty() && key.rfind(a.vm + "/", 0) != 0) continue;
    if (!a.nvdimm.empty() && key != purge_key(a.vm, a.nvdimm)) continue;
    json s = slot.engine->status();
    s["busy"] = slot.worker && slot.worker->busy();
    items.push_back(std::move(s));
  }
  if (!a.nvdimm.empty() && items.empty())
    return reply(make_error(api::code::kPurgeNotEnabled,
                            "purging is not enabled on " +
                                purge_key(a.vm, a.nvdimm)));
  reply(json{{"nvdimms", std::move(items)}});
}

void Daemon::op_purge_move(bool purge, const std::string& vm,
                           const std::string& nvdimm, uint64_t first,
                           uint64_t count, bool ignore_idle,
                           api::ReplyFn reply) {
  std::string key = purge_key(vm, nvdimm);
  auto it = purges_.find(key);
  if (it == purges_.end() || !it->second.engine)
    return reply(make_error(api::code::kPurgeNotEnabled,
                            "purging is not enabled on " + key +
                                " (purge-policy enables it)"));
  auto& slot = it->second;
  if (first >= slot.engine->block_count())
    return reply(make_error(api::code::kInvalid,
                            "'first' is past the last block (" +
                                std::to_string(slot.engine->block_count() - 1) +
                                ")"));
  auto result = std::make_shared<Result<purge::MoveResult>>(purge::MoveResult{});
  purge::Engine* e = slot.engine.get();
  auto once = std::make_shared<OnceReply>(std::move(reply));
  auto r = slot.worker->run(
      [=] {
        *result = purge ? e->purge_now(first, count, ignore_idle)
                        : e->unpurge(first, count);
      },
      [result, once] {
        if (!*result)
          return (*once)(Error{api::code::kPurgeFailed,
                               result->error().message, 0});
        (*once)(move_json(**result));
      });
  if (!r)
    (*once)(make_error(api::code::kPurgeBusy,
                       "a purge request is already running on " + key));
}

void Daemon::drop_purges(const std::string& vm) {
  forget_purge_configs(vm);  // the detach record drops them on replay
  for (auto it = purges_.begin(); it != purges_.end();) {
    if (it->first.rfind(vm + "/", 0) == 0)
      it = purges_.erase(it);  // the worker waits for its job first
    else
      ++it;
  }
}

json Daemon::purge_stats() const {
  uint64_t running = 0, purged = 0;
  for (auto& [key, slot] : purges_) {
    if (!slot.engine) continue;
    running++;
    purged += slot.engine->status().value("purged", uint64_t{0});
  }
  return json{{"nvdimms", running}, {"purged-blocks", purged}};
}

}  // namespace kvmx
