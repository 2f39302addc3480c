#include "follower.h"

#include <algorithm>
#include <set>

#include "api/request.h"
#include "common/log.h"
#include "metadata.h"

namespace kvmx::libvirt {

using nlohmann::json;

Follower::Follower(EventLoop& loop, Backend& backend, vm::Manager& vms,
                   Options options, PersistFn persist)
    : loop_(loop), backend_(backend), vms_(vms), options_(std::move(options)),
      persist_(std::move(persist)),
      backoff_(options_.backoff_min, options_.backoff_max) {
  Backend::Callbacks cb;
  cb.on_open = [this] { on_open(); };
  cb.on_close = [this](const std::string& why) { on_close(why); };
  cb.on_lifecycle = [this](const LifecycleEvent& ev) { on_lifecycle(ev); };
  cb.on_monitor_event = [this](const std::string& d, const qmp::Event& ev) {
    on_monitor_event(d, ev);
  };
  backend_.set_callbacks(std::move(cb));
}

Follower::~Follower() {
  loop_.cancel(open_timer_);
  loop_.cancel(resync_timer_);
  backend_.set_callbacks({});
}

void Follower::start() {
  if (started_) return;
  started_ = true;
  log::info("Following libvirt domains", {{"uri", options_.uri}});
  backend_.open();
}

DomainVm& Follower::adopt(const std::string& name, const std::string& uuid) {
  auto v = std::make_unique<DomainVm>(loop_, name, options_.uri, vms_.hooks(),
                                      &backend_, options_.command_timeout);
  v->set_uuid(uuid);
  v->persisted = true;
  return static_cast<DomainVm&>(vms_.insert(std::move(v)));
}

DomainVm* Follower::find(const std::string& name) {
  return dynamic_cast<DomainVm*>(vms_.find(name));
}

void Follower::on_open() {
  connected_ = true;
  epoch_++;
  stats_.connects++;
  backoff_.reset();
  last_error_.clear();
  log::info("Connected to libvirt", {{"uri", options_.uri},
                                     {"connects", stats_.connects}});
  resync();
}

void Follower::on_close(const std::string& why) {
  bool was_connected = connected_;
  connected_ = false;
  epoch_++;
  loop_.cancel(resync_timer_);
  resync_timer_ = 0;
  if (was_connected) {
    stats_.disconnects++;
    log::warn("Lost the libvirt connection; reconnecting",
              {{"uri", options_.uri}, {"error", why}});
    for (const auto& [name, v] : vms_.all()) {
      auto* d = dynamic_cast<DomainVm*>(v.get());
      if (d && d->state() != vm::State::kStopped)
        d->lose("libvirt connection lost: " + why);
    }
  } else {
    stats_.connect_failures++;
    // Once per error text, not at every retry.
    if (why != last_error_)
      log::warn("Cannot connect to libvirt; retrying",
                {{"uri", options_.uri}, {"error", why}});
    else
      log::debug("Cannot connect to libvirt", {{"uri", options_.uri},
                                               {"error", why}});
  }
  last_error_ = why;
  schedule_open();
}

void Follower::schedule_open() {
  loop_.cancel(open_timer_);
  open_timer_ = loop_.after(backoff_.next(), [this] {
    open_timer_ = 0;
    if (!connected_) backend_.open();
  });
}

void Follower::resync() {
  loop_.cancel(resync_timer_);
  resync_timer_ = 0;
  uint64_t epoch = epoch_;
  backend_.list_running([this, epoch](Result<std::vector<Domain>> r) {
    if (epoch != epoch_ || !connected_) return;  // the connection changed
    if (!r) {
      last_error_ = r.error().message;
      log::warn("Cannot list libvirt's running domains; retrying",
                {{"error", r.error().message}});
      resync_timer_ = loop_.after(backoff_.next(), [this] {
        resync_timer_ = 0;
        if (connected_) resync();
      });
      return;
    }
    apply(*r);
  });
}

void Follower::apply(const std::vector<Domain>& running) {
  stats_.resyncs++;
  std::set<std::string> names;
  for (const auto& d : running) {
    names.insert(d.name);
    consider(d, "running");
  }
  for (const auto& [name, v] : vms_.all()) {
    auto* d = dynamic_cast<DomainVm*>(v.get());
    if (d && !names.count(name) && d->state() != vm::State::kStopped)
      d->stop("the domain is not running");
  }
  log::info("Resynced with libvirt",
            {{"running", running.size()},
             {"following", std::count_if(
                               vms_.all().begin(), vms_.all().end(),
                               [](const auto& kv) {
                                 auto* d = dynamic_cast<DomainVm*>(
                                     kv.second.get());
                                 return d && d->following();
                               })}});
}

void Follower::consider(const Domain& d, const std::string& when) {
  std::string why;
  if (!opts_in(d.metadata, d.metadata_error, &why)) {
    DomainVm* v = find(d.name);
    if (v) {
      if (v->state() != vm::State::kStopped)
        log::info("Domain no longer opts in; not following it",
                  {{"vm", d.name}, {"why", why}});
      v->stop("the domain runs, but " + why);
    } else if (d.metadata || !d.metadata_error.empty()) {
      // Metadata that does not parse deserves a word; none at all does not.
      log::warn("Domain not followed", {{"domain", d.name}, {"why", why}});
    } else {
      log::debug("Domain does not opt in", {{"domain", d.name}});
    }
    return;
  }
  DomainVm* v = follow(d);
  if (!v || v->following()) return;
  log::info("Attaching libvirt domain",
            {{"vm", d.name}, {"uuid", d.uuid}, {"domain", when}});
  v->attach(d.uuid);
}

void Follower::skip(const Domain& d, const std::string& why) {
  stats_.domains_skipped++;
  std::string key = d.name + "\n" + why;
  if (key == last_skip_) return;
  last_skip_ = key;
  log::warn("Domain opts in but is not followed",
            {{"domain", d.name}, {"why", why}});
}

DomainVm* Follower::follow(const Domain& d) {
  if (vm::Vm* existing = vms_.find(d.name)) {
    auto* v = dynamic_cast<DomainVm*>(existing);
    if (!v) {
      skip(d, "a VM attached over QMP socket '" + existing->origin() +
                  "' has that name");
      return nullptr;
    }
    return v;
  }
  if (!api::valid_vm_name(d.name)) {
    skip(d, "its name is not a valid hostd VM name (1-64 of A-Z a-z 0-9 . "
            "_ -, not starting with . or -)");
    return nullptr;
  }
  if (vms_.size() >= options_.max_vms) {
    skip(d, "hostd has max-vms (" + std::to_string(options_.max_vms) +
                ") VMs registered; detach stopped ones");
    return nullptr;
  }
  auto owned = std::make_unique<DomainVm>(loop_, d.name, options_.uri,
                                          vms_.hooks(), &backend_,
                                          options_.command_timeout);
  owned->set_uuid(d.uuid);
  if (persist_) {
    if (auto r = persist_(*owned); !r) {
      skip(d, "it could not be recorded: " + r.error().message);
      return nullptr;
    }
  }
  owned->persisted = true;
  return &static_cast<DomainVm&>(vms_.insert(std::move(owned)));
}

void Follower::on_lifecycle(const LifecycleEvent& ev) {
  const Domain& d = ev.domain;
  switch (ev.kind) {
    case Lifecycle::kStarted:
    case Lifecycle::kResumed: {
      DomainVm* v = find(d.name);
      if (v && v->following()) return;  // resumed after a pause
      log::debug("libvirt domain event", {{"domain", d.name},
                                          {"event", ev.what}});
      consider(d, ev.what);
      return;
    }
    case Lifecycle::kStopped: {
      DomainVm* v = find(d.name);
      if (!v || v->state() == vm::State::kStopped) return;
      log::info("libvirt domain stopped; not following it until it starts",
                {{"vm", d.name}, {"event", ev.what}});
      v->stop("domain " + ev.what);
      return;
    }
    case Lifecycle::kOther:
      return;
  }
}

void Follower::on_monitor_event(const std::string& domain,
                                const qmp::Event& ev) {
  DomainVm* v = find(domain);
  if (!v || !v->following()) {
    stats_.events_ignored++;
    log::debug("QEMU event of a domain hostd does not follow",
               {{"domain", domain}, {"event", ev.name}});
    return;
  }
  stats_.events++;
  v->on_monitor_event(ev);
}

json Follower::stats() const {
  uint64_t domains = 0, attached = 0;
  for (const auto& [name, v] : vms_.all()) {
    if (v->source() != vm::Source::kLibvirt) continue;
    domains++;
    if (v->state() == vm::State::kAttached) attached++;
  }
  return json{{"enabled", true},
              {"uri", options_.uri},
              {"connected", connected_},
              {"connects", stats_.connects},
              {"reconnects", stats_.connects > 1 ? stats_.connects - 1 : 0},
              {"connect_failures", stats_.connect_failures},
              {"disconnects", stats_.disconnects},
              {"resyncs", stats_.resyncs},
              {"domains", domains},
              {"domains_attached", attached},
              {"domains_skipped", stats_.domains_skipped},
              {"events", stats_.events},
              {"events_ignored", stats_.events_ignored},
              {"last_error", last_error_}};
}

}  // namespace kvmx::libvirt
