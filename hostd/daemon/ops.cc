// The API operations (docs/specs/hostd-api.md).
#include <type_traits>

#include "common/log.h"
#include "common/unix_socket.h"
#include "daemon.h"

#ifndef KVMX_VERSION
#define KVMX_VERSION "unknown"
#endif

namespace kvmx {

using nlohmann::json;
using std::chrono::milliseconds;

void Daemon::handle(api::ClientId client, const api::Request& req,
                    api::ReplyFn reply) {
  if (stopping_) {
    reply(make_error(api::code::kShuttingDown, "kvmx-hostd is shutting down"));
    return;
  }
  log::debug("API request", {{"client", client}, {"op", req.op}});
  std::visit(
      [&](const auto& a) {
        using T = std::decay_t<decltype(a)>;
        if constexpr (std::is_same_v<T, api::Ping>) {
          reply(json{{"pong", true}});
        } else if constexpr (std::is_same_v<T, api::Version>) {
          reply(json{{"version", KVMX_VERSION}, {"api", api::kApiVersion}});
        } else if constexpr (std::is_same_v<T, api::Attach>) {
          op_attach(a, std::move(reply));
        } else if constexpr (std::is_same_v<T, api::Detach>) {
          op_detach(a, std::move(reply));
        } else if constexpr (std::is_same_v<T, api::ListVms>) {
          reply(list_vms());
        } else if constexpr (std::is_same_v<T, api::Protections>) {
          vm::Vm* v = vms_->find(a.vm);
          if (!v) {
            reply(make_error(api::code::kVmNotFound,
                             "no VM named '" + a.vm + "' is attached"));
            return;
          }
          v->query_protections([name = a.vm, reply](Result<json> r) {
            if (!r) {
              reply(r.error());
              return;
            }
            reply(json{{"vm", name}, {"devices", std::move(*r)}});
          });
        } else if constexpr (std::is_same_v<T, api::Violations>) {
          reply(violations(a));
        } else if constexpr (std::is_same_v<T, api::Stats>) {
          reply(stats());
        } else if constexpr (std::is_same_v<T, api::Subscribe>) {
          server_->subscribe(client);
          reply(json{{"subscribed", true}});
        } else if constexpr (std::is_same_v<T, api::Migrate>) {
          op_migrate(client, a, std::move(reply));
        } else if constexpr (std::is_same_v<T, api::MigratePostcopy>) {
          op_migrate_postcopy(a, std::move(reply));
        } else if constexpr (std::is_same_v<T, api::MigrateRecover>) {
          op_migrate_recover(client, a, std::move(reply));
        } else if constexpr (std::is_same_v<T, api::MigrateCancel>) {
          op_migrate_cancel(a, std::move(reply));
        } else if constexpr (std::is_same_v<T, api::MigrateStatus>) {
          op_migrate_status(a, std::move(reply));
        } else if constexpr (std::is_same_v<T, api::Snapshot>) {
          op_snapshot(client, a, std::move(reply));
        } else if constexpr (std::is_same_v<T, api::Restore>) {
          op_restore(client, a, std::move(reply));
        } else if constexpr (std::is_same_v<T, api::PurgeStatus>) {
          op_purge_status(a, std::move(reply));
        } else if constexpr (std::is_same_v<T, api::PurgePolicy>) {
          op_purge_policy(a, std::move(reply));
        } else if constexpr (std::is_same_v<T, api::PurgeNow>) {
          op_purge_move(true, a.vm, a.nvdimm, a.first, a.count, a.ignore_idle,
                        std::move(reply));
        } else if constexpr (std::is_same_v<T, api::Unpurge>) {
          op_purge_move(false, a.vm, a.nvdimm, a.first, a.count, false,
                        std::move(reply));
        }
      },
      req.args);
}

void Daemon::op_attach(const api::Attach& a, api::ReplyFn reply) {
  auto settle = [this, name = a.vm, reply](const vm::Settled& s) {
    finish_attach(name, s, reply);
  };
  milliseconds timeout(cfg_.attach_timeout_ms);

  if (vm::Vm* existing = vms_->find(a.vm)) {
    auto* v = dynamic_cast<vm::QmpVm*>(existing);
    if (!v) {
      reply(make_error(api::code::kVmExists,
                       "VM '" + a.vm + "' is followed through " +
                           existing->origin()));
      return;
    }
    if (v->qmp_path() != a.qmp) {
      reply(make_error(api::code::kVmExists,
                       "VM '" + a.vm + "' is attached with QMP socket '" +
                           v->qmp_path() + "'"));
      return;
    }
    if (v->state() == vm::State::kQuarantined) {
      // The explicit re-attach that quarantine waits for: recorded first,
      // so that the next start connects to it again.
      json rec = {{"t", "attach"}, {"vm", a.vm}, {"qmp", a.qmp}};
      if (auto r = journal_now(rec); !r) {
        reply(make_error(api::code::kJournal,
                         "attach not recorded: " + r.error().message));
        return;
      }
      log::info("Re-attaching a quarantined VM", {{"vm", a.vm}, {"qmp", a.qmp}});
    }
    // Same VM again: reconnect now if it is not connected, then report.
    // Wait first: a failed reconnect settles at once.
    v->when_settled(timeout, settle);
    v->reconnect_now();
    return;
  }
  if (vm::Vm* other = vms_->find_by_path(a.qmp)) {
    reply(make_error(api::code::kQmpInUse,
                     "QMP socket '" + a.qmp + "' belongs to VM '" +
                         other->name() + "'"));
    return;
  }
  if (vms_->size() >= cfg_.max_vms) {
    reply(make_error(api::code::kTooManyVms,
                     "hostd attaches at most " + std::to_string(cfg_.max_vms) +
                         " VMs; detach one first"));
    return;
  }
  auto fd = unix_connect(a.qmp);
  if (!fd) {
    reply(make_error(api::code::kQmpConnect, fd.error().message));
    return;
  }
  log::info("Attaching VM", {{"vm", a.vm}, {"qmp", a.qmp}});
  vm::QmpVm& v = vms_->add(a.vm, a.qmp, std::move(*fd));
  v.when_settled(timeout, settle);
}

void Daemon::finish_attach(const std::string& name, const vm::Settled& s,
                           api::ReplyFn reply) {
  vm::QmpVm* v = vms_->find_qmp(name);
  if (!v || s.kind == vm::Settled::kRemoved) {
    if (s.kind == vm::Settled::kFailed)  // a concurrent attach gave up
      reply(make_error(api::code::kQmpHandshake,
                       "QMP handshake on VM '" + name + "' failed: " + s.error));
    else
      reply(make_error(api::code::kVmNotFound,
                       "VM '" + name + "' was detached while attaching"));
    return;
  }
  if (!v->persisted) {
    if (s.kind == vm::Settled::kFailed) {
      // A fresh attach that failed is forgotten: nothing was recorded.
      std::string why = s.error;
      vms_->remove(name);
      reply(make_error(api::code::kQmpHandshake,
                       "QMP handshake on VM '" + name + "' failed: " + why));
      return;
    }
    // Attached, or still trying (timeout): record it before acknowledging.
    json rec = {{"t", "attach"}, {"vm", name}, {"qmp", v->qmp_path()}};
    if (auto r = journal_now(rec); !r) {
      vms_->remove(name);
      reply(make_error(api::code::kJournal,
                       "attach not recorded: " + r.error().message));
      return;
    }
    v->persisted = true;
  }
  reply(vm_info(*v));
}

void Daemon::op_detach(const api::Detach& d, api::ReplyFn reply) {
  vm::Vm* v = vms_->find(d.vm);
  if (!v) {
    reply(make_error(api::code::kVmNotFound,
                     "no VM named '" + d.vm + "' is attached"));
    return;
  }
  if (v->persisted) {
    if (auto r = journal_now(json{{"t", "detach"}, {"vm", d.vm}}); !r) {
      reply(make_error(api::code::kJournal,
                       "detach not recorded: " + r.error().message));
      return;
    }
  }
  log::info("Detaching VM", {{"vm", d.vm}});
  // An ended migration of it is forgotten; one under way fails on its own
  // (its endpoint is lost).
  if (auto m = migrations_.find(d.vm);
      m != migrations_.end() && m->second.job->ended() &&
      m->second.waiters.empty())
    migrations_.erase(m);
  if (auto f = file_jobs_.find(d.vm);
      f != file_jobs_.end() && f->second.job->ended() &&
      f->second.waiters.empty())
    file_jobs_.erase(f);
  drop_purges(d.vm);
  commit_pending();  // its last violations count in the totals it drops
  store_.reset_totals(d.vm);
  vms_->remove(d.vm);
  reply(json{{"vm", d.vm}, {"detached", true}});
}

json Daemon::vm_info(const vm::Vm& v) const {
  json j = v.info();
  auto t = store_.totals(v.name());
  j["violations"] = t.violations();
  j["violation_events"] = t.events;
  j["suppressed"] = t.suppressed;
  auto lost = lost_.find(v.name());
  j["violations_lost"] = lost == lost_.end() ? 0 : lost->second;
  return j;
}

json Daemon::list_vms() const {
  json vms = json::array();
  for (const auto& [name, v] : vms_->all()) vms.push_back(vm_info(*v));
  return json{{"vms", std::move(vms)}};
}

json Daemon::violations(const api::Violations& q) const {
  violations::Store::Query query;
  if (!q.vm.empty()) query.vm = q.vm;
  query.since_seq = q.since_seq;
  query.limit = q.limit;
  auto page = store_.query(query);
  json items = json::array();
  uint64_t last = q.since_seq;
  for (const auto* v : page.items) {
    items.push_back(violations::to_json(*v));
    last = v->seq;
  }
  return json{{"violations", std::move(items)},
              {"last_seq", last},
              {"more", page.more}};
}

json Daemon::stats() const {
  const auto& s = server_->stats();
  uint64_t protocol_errors = 0;
  for (const auto& [name, v] : vms_->all()) protocol_errors += v->protocol_errors();
  auto uptime = std::chrono::duration_cast<std::chrono::seconds>(
                    std::chrono::steady_clock::now() - started_)
                    .count();
  return json{
      {"uptime_s", uptime},
      {"clients", server_->clients()},
      {"subscribers", server_->subscribers()},
      {"clients_total", s.clients_total},
      {"clients_refused", s.clients_refused},
      {"clients_dropped_slow", s.clients_dropped_slow},
      {"clients_idle_closed", s.clients_idle_closed},
      {"requests", s.requests},
      {"requests_rejected", s.requests_rejected},
      {"requests_failed", s.requests_failed},
      {"vms", vms_->size()},
      {"violations", stats_.violations},
      {"violations_stored", store_.size()},
      {"violations_evicted", store_.evicted()},
      {"violations_lost", stats_.violations_lost},
      {"violation_events_bad", stats_.violation_events_bad},
      {"chan_rejected", stats_.chan_rejected},
      {"qmp_reconnects", stats_.qmp_reconnects},
      {"qmp_protocol_errors", protocol_errors},
      {"libvirt", follower_ ? follower_->stats() : json{{"enabled", false}}},
      {"migrations", migration_stats()},
      {"purge", purge_stats()},
      {"journal",
       {{"bytes", journal_->size_bytes()},
        {"records", journal_->records()},
        {"replayed", stats_.replay.records},
        {"corrupt_skipped", stats_.replay.corrupt},
        {"torn_bytes", stats_.replay.torn_bytes},
        {"bad_records", stats_.replay_bad_records},
        {"duplicates_skipped", store_.duplicates()},
        {"vms_skipped", stats_.replay_vms_skipped},
        {"compactions", stats_.compactions},
        {"compaction_failures", stats_.compaction_failures},
        {"compacting", compactor_ && compactor_->busy()},
        {"errors", stats_.journal_errors},
        {"failing", degraded_},
        {"last_error", journal_error_},
        {"unwritten", unwritten_.size()}}},
      {"limits",
       {{"max_clients", cfg_.max_clients},
        {"max_vms", cfg_.max_vms},
        {"max_request_bytes", cfg_.max_request_bytes},
        {"max_output_bytes", cfg_.max_output_bytes},
        {"max_violations", cfg_.max_violations},
        {"max_qmp_message_bytes", cfg_.max_qmp_message_bytes},
        {"max_devices_bytes", cfg_.max_devices_bytes},
        {"client_idle_timeout_ms", cfg_.client_idle_timeout_ms}}}};
}

}  // namespace kvmx
