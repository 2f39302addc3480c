#include "daemon.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/file.h>
#include <sys/signalfd.h>
#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>

#include "api/request.h"
#include "common/json_util.h"
#include "common/log.h"
#include "common/time_util.h"
#include "libvirt/domain_vm.h"
#include "libvirt/virt_backend.h"

namespace kvmx {

using nlohmann::json;
using std::chrono::milliseconds;

namespace {

std::string shorten(std::string s, size_t max = 256) {
  if (s.size() > max) s.resize(max);
  return s;
}

}  // namespace

Daemon::Daemon(EventLoop& loop, config::Config cfg)
    : loop_(loop), cfg_(std::move(cfg)),
      started_(std::chrono::steady_clock::now()),
      store_(cfg_.max_violations) {
  vm::Options opt;
  opt.handshake_timeout = milliseconds(cfg_.qmp_timeout_ms);
  opt.command_timeout = milliseconds(cfg_.qmp_timeout_ms);
  opt.backoff_min = milliseconds(cfg_.reconnect_min_ms);
  opt.backoff_max = milliseconds(cfg_.reconnect_max_ms);
  vm::Hooks hooks;
  hooks.on_event = [this](vm::Vm& v, const qmp::Event& ev) {
    on_vm_event(v, ev);
  };
  hooks.on_state = [this](vm::Vm& v, vm::State old) { on_vm_state(v, old); };
  vms_ = std::make_unique<vm::Manager>(loop_, opt, std::move(hooks));

  api::Server::Limits lim;
  lim.max_clients = cfg_.max_clients;
  lim.session.max_line = cfg_.max_request_bytes;
  lim.session.max_output = cfg_.max_output_bytes;
  lim.session.pause_output = std::min<size_t>(64 * 1024, cfg_.max_output_bytes);
  server_ = std::make_unique<api::Server>(
      loop_, lim,
      [this](api::ClientId c, const api::Request& r, api::ReplyFn reply) {
        handle(c, r, std::move(reply));
      });
}

Daemon::~Daemon() {
  stopping_ = true;
  vms_.reset();
  follower_.reset();
  libvirt_.reset();  // joins the libvirt thread
  server_.reset();
  if (signal_fd_) loop_.remove(signal_fd_.get());
}

Result<void> Daemon::start() {
  std::error_code ec;
  auto parent = std::filesystem::path(cfg_.state_dir).parent_path();
  std::filesystem::create_directories(parent, ec);
  if (!ec && ::mkdir(cfg_.state_dir.c_str(), 0700) < 0 && errno != EEXIST)
    ec = std::error_code(errno, std::generic_category());
  if (ec)
    return make_error("state-dir", "Failed to create state directory '" +
                                       cfg_.state_dir + "': " + ec.message());
  if (auto r = lock_state_dir(); !r) return r;
  if (auto r = open_journal(); !r) return r;
  if (auto r = server_->listen(cfg_.socket, cfg_.socket_mode); !r) return r;
  if (auto r = watch_signals(); !r) return r;
  loop_.on_round_end([this] {
    commit_pending();
    maybe_compact();
  });

  if (auto r = start_libvirt(); !r) return r;

  log::info("kvmx-hostd started",
            {{"socket", cfg_.socket},
             {"state_dir", cfg_.state_dir},
             {"vms", journal_vms_.size() + journal_domains_.size()},
             {"violations", store_.size()},
             {"libvirt", cfg_.libvirt_uri.empty() ? "off" : cfg_.libvirt_uri}});
  register_journal_vms();
  if (follower_) follower_->start();
  return {};
}

Result<void> Daemon::start_libvirt() {
  if (cfg_.libvirt_uri.empty()) return {};
  auto backend = libvirt::make_virt_backend(loop_, cfg_.libvirt_uri);
  if (!backend)
    return make_error("libvirt", "--libvirt " + cfg_.libvirt_uri + ": " +
                                     backend.error().message);
  libvirt_ = std::move(*backend);
  libvirt::Options opt;
  opt.uri = cfg_.libvirt_uri;
  opt.max_vms = cfg_.max_vms;
  opt.command_timeout = milliseconds(cfg_.qmp_timeout_ms);
  opt.backoff_min = milliseconds(cfg_.reconnect_min_ms);
  opt.backoff_max = milliseconds(cfg_.reconnect_max_ms);
  follower_ = std::make_unique<libvirt::Follower>(
      loop_, *libvirt_, *vms_, opt, [this](const libvirt::DomainVm& v) {
        return journal_now(json{{"t", "libvirt-attach"},
                                {"vm", v.name()},
                                {"uri", v.uri()},
                                {"uuid", v.uuid()}});
      });
  return {};
}

void Daemon::register_journal_vms() {
  for (const auto& [name, path] : journal_vms_) {
    vm::Vm& v = vms_->add(name, path, UniqueFd());
    v.persisted = true;
  }
  journal_vms_.clear();
  // libvirt domains: disconnected until the first resync says whether they
  // run (stopped for good without --libvirt).
  for (const auto& [name, d] : journal_domains_) {
    if (follower_) {
      follower_->adopt(name, d.uuid);
      continue;
    }
    auto v = std::make_unique<libvirt::DomainVm>(
        loop_, name, d.uri, vms_->hooks(), nullptr,
        milliseconds(cfg_.qmp_timeout_ms));
    v->set_uuid(d.uuid);
    v->persisted = true;
    vms_->insert(std::move(v));
  }
  journal_domains_.clear();
}

void Daemon::stop(int code) {
  if (stopping_) return;
  stopping_ = true;
  log::info("kvmx-hostd stopping");
  server_->shutdown();
  commit_pending();
  vms_->clear();
  follower_.reset();
  libvirt_.reset();  // closes the libvirt connection, joins its thread
  if (auto r = journal_->sync(); !r)
    log::error("Failed to sync the journal at shutdown",
               {{"error", r.error().message}});
  loop_.stop(code);
}

Result<void> Daemon::lock_state_dir() {
  std::string path = cfg_.state_dir + "/hostd.lock";
  UniqueFd fd(::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600));
  if (!fd) return sys_error("lock", "Failed to open '" + path + "'");
  if (::flock(fd.get(), LOCK_EX | LOCK_NB) < 0) {
    if (errno == EWOULDBLOCK)
      return make_error("lock", "another kvmx-hostd uses state directory '" +
                                    cfg_.state_dir + "' (" + path +
                                    " is locked)");
    return sys_error("lock", "Failed to lock '" + path + "'");
  }
  // The pid, for people; the lock itself is what counts.
  std::string pid = std::to_string(::getpid()) + "\n";
  if (::ftruncate(fd.get(), 0) == 0)
    (void)!::pwrite(fd.get(), pid.data(), pid.size(), 0);
  lock_fd_ = std::move(fd);
  return {};
}

Result<void> Daemon::open_journal() {
  std::string path = cfg_.state_dir + "/journal";
  auto j = journal::Journal::open(
      path, [this](const json& rec) { replay(rec); }, &stats_.replay);
  if (!j) return j.error();
  journal_ = std::move(*j);
  const auto& rs = stats_.replay;
  log::info("Journal replayed",
            {{"path", path},
             {"records", rs.records},
             {"corrupt_skipped", rs.corrupt},
             {"torn_bytes", rs.torn_bytes},
             {"bad_records", stats_.replay_bad_records}});
  if (rs.corrupt > 0 || stats_.replay_bad_records > 0) {
    // Keep the damaged file for inspection, then write a clean one.
    std::string keep = path + ".corrupt";
    ::unlink(keep.c_str());
    if (::link(path.c_str(), keep.c_str()) == 0)
      log::warn("Journal had corrupt records; kept a copy",
                {{"copy", keep}, {"corrupt", rs.corrupt}});
    compact("corrupt records");
  } else if (journal_->records() > compact_threshold()) {
    compact("size");
  }
  return {};
}

Result<void> Daemon::watch_signals() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGHUP);
  if (::sigprocmask(SIG_BLOCK, &set, nullptr) < 0)
    return sys_error("signals", "Failed to block signals");
  ::signal(SIGPIPE, SIG_IGN);
  signal_fd_ = UniqueFd(::signalfd(-1, &set, SFD_NONBLOCK | SFD_CLOEXEC));
  if (!signal_fd_) return sys_error("signals", "Failed to create a signalfd");
  return loop_.add(signal_fd_.get(), EPOLLIN, [this](uint32_t) {
    signalfd_siginfo si{};
    while (::read(signal_fd_.get(), &si, sizeof(si)) == sizeof(si)) {
      if (si.ssi_signo == SIGHUP) {
        log::info("SIGHUP ignored (nothing to reload)");
        continue;
      }
      log::info("Received signal, shutting down",
                {{"signal", si.ssi_signo == SIGTERM ? "SIGTERM" : "SIGINT"}});
      stop(0);
      return;
    }
  });
}

void Daemon::replay(const json& rec) {
  auto type = json_string(rec, "t").value_or("");
  if (type == "attach" || type == "detach" || type == "libvirt-attach") {
    auto name = json_string(rec, "vm");
    if (!name || !api::valid_vm_name(*name)) {
      stats_.replay_bad_records++;
      return;
    }
    if (type == "detach") {
      journal_vms_.erase(*name);
      journal_domains_.erase(*name);
      store_.reset_totals(*name);
      return;
    }
    if (type == "libvirt-attach") {
      auto uri = json_string(rec, "uri");
      if (!uri || uri->empty()) {
        stats_.replay_bad_records++;
        return;
      }
      journal_vms_.erase(*name);
      journal_domains_[*name] =
          JournalDomain{*uri, json_string(rec, "uuid").value_or("")};
      return;
    }
    auto path = json_string(rec, "qmp");
    if (!path || path->empty() || path->front() != '/') {
      stats_.replay_bad_records++;
      return;
    }
    journal_domains_.erase(*name);
    journal_vms_[*name] = *path;
    return;
  }
  auto r = store_.replay(rec);
  if (!r) {
    stats_.replay_bad_records++;
    log::warn("Skipped a malformed journal record",
              {{"error", r.error().message}});
  } else if (!*r) {
    log::warn("Skipped a journal record of unknown type", {{"type", type}});
  }
}

Result<void> Daemon::journal_now(const json& rec) {
  auto r = journal_->append(rec);
  if (r) r = journal_->sync();
  if (!r) {
    stats_.journal_errors++;
    log::error("Failed to write the journal", {{"error", r.error().message}});
  }
  return r;
}

void Daemon::on_vm_event(vm::Vm& v, const qmp::Event& ev) {
  if (ev.name == "KVMX_VIOLATION") {
    auto parsed = violations::from_event(v.name(), ev.data, ev.seconds,
                                         ev.micros, now_utc());
    if (!parsed) {
      stats_.violation_events_bad++;
      log::warn("Ignored a malformed KVMX_VIOLATION event",
                {{"vm", v.name()}, {"error", parsed.error().message}});
      return;
    }
    parsed->seq = store_.assign_seq();
    if (auto r = journal_->append(violations::Store::record(*parsed)); !r) {
      stats_.journal_errors++;
      log::error("Failed to journal a violation; kept in memory only",
                 {{"vm", v.name()}, {"error", r.error().message}});
    }
    // Visible (API, subscribers) once synced, at the end of this round.
    pending_.push_back(std::move(*parsed));
    return;
  }
  if (ev.name == "KVMX_CHAN_REJECTED") {
    stats_.chan_rejected++;
    json e = {{"event", "chan-rejected"},
              {"vm", v.name()},
              {"device", shorten(json_string(ev.data, "device").value_or(""), 128)},
              {"op", json_i64(ev.data, "op").value_or(0)},
              // QEMU's field is "error" (kvmx-chan.md); "errno" is what
              // early fakes sent.
              {"errno", json_i64(ev.data, "error")
                            .value_or(json_i64(ev.data, "errno").value_or(0))},
              {"reason", shorten(json_string(ev.data, "reason").value_or(""))}};
    log::info("Guest request rejected by kvmx-chan",
              {{"vm", v.name()}, {"device", e["device"]}, {"op", e["op"]},
               {"errno", e["errno"]}, {"reason", e["reason"]}});
    server_->broadcast(e);
    return;
  }
  log::debug("QMP event", {{"vm", v.name()}, {"event", shorten(ev.name, 64)}});
}

void Daemon::on_vm_state(vm::Vm& v, vm::State old_state) {
  if (stopping_) return;
  if (v.state() == vm::State::kAttached && v.connects() > 1 &&
      v.source() == vm::Source::kQmp)
    stats_.qmp_reconnects++;
  log::info("VM state changed",
            {{"vm", v.name()},
             {"from", vm::to_string(old_state)},
             {"to", vm::to_string(v.state())},
             {"via", v.origin()},
             {"reason", v.state() == vm::State::kAttached ? "" : v.last_error()}});
  server_->broadcast(json{{"event", "vm-state"},
                          {"vm", v.name()},
                          {"source", vm::to_string(v.source())},
                          {"state", vm::to_string(v.state())},
                          {"error", v.state() == vm::State::kAttached
                                        ? ""
                                        : v.last_error()}});
}

void Daemon::commit_pending() {
  if (pending_.empty()) return;
  if (auto r = journal_->sync(); !r) {
    stats_.journal_errors++;
    log::error("Failed to sync violations to the journal",
               {{"error", r.error().message}});
  }
  auto batch = std::move(pending_);
  pending_.clear();
  for (auto& v : batch) {
    stats_.violations++;
    log::debug("Violation recorded",
               {{"vm", v.vm}, {"seq", v.seq}, {"device", v.device},
                {"gpa", v.gpa}, {"access", v.access},
                {"suppressed", v.suppressed}});
    json ev = violations::to_json(v);
    ev["event"] = "violation";
    if (server_) server_->broadcast(ev);
    store_.add(std::move(v));
  }
}

uint64_t Daemon::compact_threshold() const {
  return 2 * static_cast<uint64_t>(cfg_.max_violations) +
         2 * static_cast<uint64_t>(cfg_.max_vms) + 64;
}

void Daemon::maybe_compact() {
  if (journal_ && journal_->records() > compact_threshold()) compact("size");
}

void Daemon::compact(const char* why) {
  commit_pending();  // the rewrite must contain every appended violation
  std::vector<json> records;
  // At start-up the VMs are still in journal_vms_; later in the registry.
  for (const auto& [name, path] : journal_vms_)
    records.push_back(json{{"t", "attach"}, {"vm", name}, {"qmp", path}});
  for (const auto& [name, d] : journal_domains_)
    records.push_back(json{{"t", "libvirt-attach"}, {"vm", name},
                           {"uri", d.uri}, {"uuid", d.uuid}});
  for (const auto& [name, v] : vms_->all()) {
    if (!v->persisted) continue;
    if (auto* q = dynamic_cast<const vm::QmpVm*>(v.get()))
      records.push_back(
          json{{"t", "attach"}, {"vm", name}, {"qmp", q->qmp_path()}});
    else if (auto* d = dynamic_cast<const libvirt::DomainVm*>(v.get()))
      records.push_back(json{{"t", "libvirt-attach"}, {"vm", name},
                             {"uri", d->uri()}, {"uuid", d->uuid()}});
  }
  for (auto& rec : store_.snapshot()) records.push_back(std::move(rec));
  uint64_t before = journal_->size_bytes();
  if (auto r = journal_->rewrite(records); !r) {
    stats_.journal_errors++;
    log::error("Failed to compact the journal", {{"error", r.error().message}});
    return;
  }
  stats_.compactions++;
  log::info("Journal compacted", {{"why", why},
                                  {"bytes_before", before},
                                  {"bytes_after", journal_->size_bytes()},
                                  {"records", journal_->records()}});
}

}  // namespace kvmx
