#include "daemon.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/file.h>
#include <sys/signalfd.h>
#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>

#include "api/request.h"
#include "common/crash_guard.h"
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

// Seqs reserved per "next-seq" record (one synced record per block).
constexpr uint64_t kSeqBlock = 4096;
// Violations held in memory while the journal fails.  QMP VMs are paused
// (back-pressure), so only what was already read, and libvirt domains'
// events, queue here; beyond it they are lost and counted.
constexpr size_t kMaxUnwritten = 10000;

const char* kQuarantineCrash =
    "kvmx-hostd crashed while handling this VM's QMP input; not re-attached "
    "(attach it again to resume)";
const char* kQuarantineMarker =
    "kvmx-hostd stopped while connecting to this VM (its QMP peer may have "
    "crashed it); not re-attached (attach it again to resume)";

}  // namespace

Daemon::Daemon(EventLoop& loop, config::Config cfg)
    : loop_(loop), cfg_(std::move(cfg)),
      started_(std::chrono::steady_clock::now()),
      store_(cfg_.max_violations),
      journal_backoff_(milliseconds(100), milliseconds(5000)),
      compact_backoff_(milliseconds(1000), milliseconds(60000)) {
  compactor_ = std::make_unique<Worker>(loop_);
  vm::Options opt;
  opt.handshake_timeout = milliseconds(cfg_.qmp_timeout_ms);
  opt.command_timeout = milliseconds(cfg_.qmp_timeout_ms);
  opt.backoff_min = milliseconds(cfg_.reconnect_min_ms);
  opt.backoff_max = milliseconds(cfg_.reconnect_max_ms);
  opt.max_qmp_message = cfg_.max_qmp_message_bytes;
  opt.max_devices_bytes = cfg_.max_devices_bytes;
  vm::Hooks hooks;
  hooks.on_event = [this](vm::Vm& v, const qmp::Event& ev) {
    on_vm_event(v, ev);
  };
  hooks.on_state = [this](vm::Vm& v, vm::State old) { on_vm_state(v, old); };
  hooks.on_connecting = [this](vm::Vm& v) { on_vm_connecting(v); };
  vms_ = std::make_unique<vm::Manager>(loop_, opt, std::move(hooks));

  api::Server::Limits lim;
  lim.max_clients = cfg_.max_clients;
  lim.session.max_line = cfg_.max_request_bytes;
  lim.session.max_output = cfg_.max_output_bytes;
  lim.session.pause_output = std::min<size_t>(64 * 1024, cfg_.max_output_bytes);
  lim.idle_timeout = milliseconds(cfg_.client_idle_timeout_ms);
  server_ = std::make_unique<api::Server>(
      loop_, lim,
      [this](api::ClientId c, const api::Request& r, api::ReplyFn reply) {
        handle(c, r, std::move(reply));
      });
}

Daemon::~Daemon() {
  stopping_ = true;
  compactor_.reset();  // waits for a compaction under way
  migrations_.clear();  // their endpoints use vms_
  file_jobs_.clear();
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
  if (auto r = crash::install(); !r) return r;
  crash::set_journal_fd(journal_->fd());
  if (auto r = server_->listen(cfg_.socket, cfg_.socket_mode); !r) return r;
  if (auto r = watch_signals(); !r) return r;
  if (auto r = watch_purge_faults(); !r) return r;
  loop_.on_round_end([this] {
    commit_pending();
    maybe_compact();
  });

  if (auto r = start_libvirt(); !r) return r;

  log::info("kvmx-hostd started",
            {{"socket", cfg_.socket},
             {"state_dir", cfg_.state_dir},
             {"vms", journal_vms_.size() + journal_domains_.size()},
             {"quarantined", quarantined_.size() + attaching_.size()},
             {"violations", store_.size()},
             {"libvirt", cfg_.libvirt_uri.empty() ? "off" : cfg_.libvirt_uri}});
  register_journal_vms();
  start_journal_purges();
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
  // The journal is input too: it gets max-vms like the API (attach
  // records beyond it are skipped, counted, and kept in the journal).
  size_t room = cfg_.max_vms > journal_domains_.size()
                    ? cfg_.max_vms - journal_domains_.size()
                    : 0;
  for (const auto& [name, path] : journal_vms_) {
    if (vms_->size() >= room) {
      stats_.replay_vms_skipped++;
      skipped_vms_[name] = path;
      log::error("Not re-attaching a VM of the journal: over max-vms",
                 {{"vm", name}, {"qmp", path}, {"max_vms", cfg_.max_vms}});
      continue;
    }
    auto q = quarantined_.find(name);
    bool interrupted = attaching_.count(name) > 0;
    if (q == quarantined_.end() && !interrupted) {
      vm::QmpVm& v = vms_->add(name, path, UniqueFd(), false);
      v.persisted = true;  // before connecting: the marker is written then
      v.start(UniqueFd());
      continue;
    }
    // Do not re-attach blindly: hostd died while handling this VM.
    vm::QmpVm& v = vms_->add(name, path, UniqueFd(), false);
    v.persisted = true;
    std::string why = q != quarantined_.end() ? q->second : kQuarantineMarker;
    if (q == quarantined_.end()) {
      // Make it stick across further restarts, until an explicit attach.
      if (!journal_now(json{{"t", "quarantine"}, {"vm", name},
                            {"reason", "interrupted-attach"}}))
        log::error("Failed to record a quarantine", {{"vm", name}});
    }
    quarantine_vm(v, why);
  }
  journal_vms_.clear();
  quarantined_.clear();
  attaching_.clear();
  // libvirt domains: disconnected until the first resync says whether they
  // run (stopped for good without --libvirt).
  for (const auto& [name, d] : journal_domains_) {
    if (vms_->size() >= cfg_.max_vms) {
      stats_.replay_vms_skipped++;
      log::error("Not following a libvirt domain of the journal: over max-vms",
                 {{"vm", name}, {"max_vms", cfg_.max_vms}});
      continue;
    }
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
  loop_.cancel(journal_timer_);
  journal_timer_ = 0;
  write_unwritten();  // a last try
  commit_pending();
  if (!unwritten_.empty()) lose_unwritten("kvmx-hostd stopped");
  if (compactor_->busy()) {
    compactor_.reset();  // waits; the half-made compaction is dropped
    ::unlink((journal_->path() + ".tmp").c_str());
  }
  // Connections still being made were not what stopped hostd.
  for (const auto& [name, gen] : markers_)
    (void)journal_->append(json{{"t", "attach-ok"}, {"vm", name}});
  markers_.clear();
  // QEMU's migrations go on; hostd stops following them.
  migrations_.clear();
  file_jobs_.clear();
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
  if (type == "attach" || type == "detach" || type == "libvirt-attach" ||
      type == "attaching" || type == "attach-ok" || type == "quarantine") {
    // Validated as the API validates the same fields.
    auto name = json_string(rec, "vm");
    if (!name || !api::valid_vm_name(*name)) {
      stats_.replay_bad_records++;
      return;
    }
    if (type == "attaching") {
      attaching_.insert(*name);
      return;
    }
    if (type == "attach-ok") {
      attaching_.erase(*name);
      return;
    }
    if (type == "quarantine") {
      attaching_.erase(*name);
      quarantined_[*name] = json_string(rec, "reason").value_or("") == "crash"
                                ? kQuarantineCrash
                                : kQuarantineMarker;
      return;
    }
    attaching_.erase(*name);
    quarantined_.erase(*name);
    if (type == "detach") {
      forget_purge_configs(*name);
      journal_vms_.erase(*name);
      journal_domains_.erase(*name);
      skipped_vms_.erase(*name);
      store_.reset_totals(*name);
      return;
    }
    if (type == "libvirt-attach") {
      auto uri = json_string(rec, "uri");
      if (!uri || uri->empty() || uri->size() > 1024) {
        stats_.replay_bad_records++;
        return;
      }
      journal_vms_.erase(*name);
      journal_domains_[*name] =
          JournalDomain{*uri, shorten(json_string(rec, "uuid").value_or(""), 64)};
      return;
    }
    auto path = json_string(rec, "qmp");
    if (!path || !api::valid_qmp_path(*path)) {
      stats_.replay_bad_records++;
      return;
    }
    journal_domains_.erase(*name);
    journal_vms_[*name] = *path;
    return;
  }
  if (type == "header") return;  // a copy (file appended to itself)
  if (type == "purge" || type == "purge-off") {
    if (!replay_purge(rec)) stats_.replay_bad_records++;
    return;
  }
  auto r = store_.replay(rec);
  if (!r) {
    stats_.replay_bad_records++;
    log::warn("Skipped a malformed journal record",
              {{"error", r.error().message}});
  } else if (!*r) {
    log::warn("Skipped a journal record of unknown type",
              {{"type", shorten(type, 64)}});
  }
}

Result<void> Daemon::journal_now(const json& rec) {
  auto r = journal_->append(rec);
  if (!r) {
    stats_.journal_errors++;
    log::error("Failed to write the journal", {{"error", r.error().message}});
    return r;
  }
  return sync_journal();
}

Result<void> Daemon::sync_journal() {
  auto r = journal_->sync();
  if (r) return r;
  // The journal cut back what was not durable: the violations appended
  // since the last sync go back to be written again.
  for (auto it = pending_.rbegin(); it != pending_.rend(); ++it)
    unwritten_.push_front(std::move(*it));
  pending_.clear();
  journal_failed(r.error());
  return r;
}

void Daemon::journal_failed(const Error& e) {
  stats_.journal_errors++;
  journal_error_ = e.message;
  uint64_t held = 0;
  if (journal_log_.allow(&held))
    log::error("The journal fails; violations wait in memory, QMP input is "
               "paused",
               {{"error", e.message},
                {"waiting", unwritten_.size()},
                {"lost", stats_.violations_lost},
                {"similar_errors_not_logged", held}});
  if (!degraded_) {
    degraded_ = true;
    vms_->pause_input(true);
    if (server_)
      server_->broadcast(json{{"event", "journal"},
                              {"state", "failing"},
                              {"error", e.message}});
  }
  if (!journal_timer_ && !stopping_) {
    journal_timer_ = loop_.after(journal_backoff_.next(), [this] {
      journal_timer_ = 0;
      write_unwritten();
      if (degraded_ && unwritten_.empty()) {
        // Nothing waits: probe that the journal takes data again.
        if (sync_journal()) journal_recovered();
      }
    });
  }
}

void Daemon::journal_recovered() {
  if (!degraded_) return;
  degraded_ = false;
  journal_error_.clear();
  journal_backoff_.reset();
  loop_.cancel(journal_timer_);
  journal_timer_ = 0;
  vms_->pause_input(false);
  log::info("The journal works again; QMP input resumed",
            {{"lost", stats_.violations_lost}});
  if (server_) server_->broadcast(json{{"event", "journal"}, {"state", "ok"},
                                       {"error", ""}});
}

void Daemon::write_unwritten() {
  while (!unwritten_.empty()) {
    auto& v = unwritten_.front();
    if (v.seq == 0) {
      if (store_.needs_reservation()) {
        json res = store_.reservation(kSeqBlock);
        if (auto r = journal_->append(res); !r) {
          journal_failed(r.error());
          return;
        }
        if (!sync_journal()) return;
        store_.reserved(res);
      }
      v.seq = store_.assign_seq();
    }
    if (auto r = journal_->append(violations::Store::record(v)); !r) {
      journal_failed(r.error());
      return;
    }
    pending_.push_back(std::move(v));
    unwritten_.pop_front();
  }
  // Recovery is declared by commit_pending(), once the sync went through.
}

void Daemon::lose_unwritten(const char* why) {
  for (const auto& v : unwritten_) {
    lost_[v.vm]++;
    stats_.violations_lost++;
  }
  log::error("Violations could not be journaled and are lost",
             {{"count", unwritten_.size()}, {"why", why},
              {"error", journal_error_}});
  unwritten_.clear();
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
    // Visible (API, subscribers) only once journaled and synced, at the
    // end of this round or, when the journal fails, once it works again.
    if (unwritten_.size() >= kMaxUnwritten) {
      lost_[v.name()]++;
      stats_.violations_lost++;
      uint64_t held = 0;
      if (journal_log_.allow(&held))
        log::error("A violation is lost: the journal fails and the memory "
                   "queue is full",
                   {{"vm", v.name()}, {"queue", kMaxUnwritten},
                    {"lost", stats_.violations_lost},
                    {"similar_errors_not_logged", held}});
      return;
    }
    unwritten_.push_back(std::move(*parsed));
    if (!degraded_) write_unwritten();  // else the retry timer does it
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

void Daemon::on_vm_connecting(vm::Vm& v) {
  if (!v.persisted || stopping_) return;
  // Should hostd die while it reads this peer, the next start finds the
  // marker and quarantines the VM instead of re-attaching it.
  if (!journal_now(json{{"t", "attaching"}, {"vm", v.name()}})) return;
  markers_[v.name()] = ++marker_gen_;
}

void Daemon::clear_marker(const std::string& name) {
  auto it = markers_.find(name);
  if (it == markers_.end()) return;
  markers_.erase(it);
  // Synced with the round's commit; a lost one only means a needless
  // quarantine.
  (void)journal_->append(json{{"t", "attach-ok"}, {"vm", name}});
}

void Daemon::quarantine_vm(vm::QmpVm& v, const std::string& why) {
  log::error("VM quarantined: not re-attached", {{"vm", v.name()},
                                                  {"qmp", v.qmp_path()},
                                                  {"why", why}});
  v.quarantine(why);
}

void Daemon::on_vm_state(vm::Vm& v, vm::State old_state) {
  if (stopping_) return;
  if (v.state() == vm::State::kAttached && v.connects() > 1 &&
      v.source() == vm::Source::kQmp)
    stats_.qmp_reconnects++;
  // The handshake is over (attached) or the connection ended, and hostd
  // lives: the marker has served.  A crash on a later event is the crash
  // guard's to record (common/crash_guard.h).
  if (v.state() != vm::State::kConnecting) clear_marker(v.name());
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
  if (pending_.empty() && !journal_->dirty()) {
    if (degraded_ && unwritten_.empty() && !journal_timer_) journal_recovered();
    return;
  }
  if (!sync_journal()) return;  // pending_ went back to unwritten_
  if (degraded_ && unwritten_.empty()) journal_recovered();
  auto batch = std::move(pending_);
  pending_.clear();
  for (auto& v : batch) {
    log::debug("Violation recorded",
               {{"vm", v.vm}, {"seq", v.seq}, {"device", v.device},
                {"gpa", v.gpa}, {"access", v.access},
                {"suppressed", v.suppressed}});
    json ev = violations::to_json(v);
    ev["event"] = "violation";
    if (!store_.add(std::move(v))) continue;  // cannot happen: seqs ascend
    stats_.violations++;
    if (server_) server_->broadcast(ev);
  }
}

uint64_t Daemon::compact_threshold() const {
  return 2 * static_cast<uint64_t>(cfg_.max_violations) +
         2 * static_cast<uint64_t>(cfg_.max_vms) + 64;
}

void Daemon::maybe_compact() {
  if (!journal_ || stopping_ || compactor_->busy()) return;
  if (journal_->records() <= compact_threshold()) return;
  if (std::chrono::steady_clock::now() < compact_not_before_) return;
  start_compaction("size");
}

std::vector<json> Daemon::registration_records() const {
  std::vector<json> records;
  auto qmp_vm = [&](const std::string& name, const std::string& path) {
    records.push_back(json{{"t", "attach"}, {"vm", name}, {"qmp", path}});
  };
  // At start-up the VMs are still in journal_vms_ and its markers; later
  // in the registry.
  for (const auto& [name, path] : journal_vms_) qmp_vm(name, path);
  for (const auto& [name, d] : journal_domains_)
    records.push_back(json{{"t", "libvirt-attach"}, {"vm", name},
                           {"uri", d.uri}, {"uuid", d.uuid}});
  for (const auto& [name, path] : skipped_vms_) qmp_vm(name, path);
  for (const auto& [name, why] : quarantined_)
    records.push_back(json{{"t", "quarantine"}, {"vm", name},
                           {"reason", why == kQuarantineCrash
                                          ? "crash" : "interrupted-attach"}});
  for (const auto& name : attaching_)
    records.push_back(json{{"t", "attaching"}, {"vm", name}});
  for (const auto& [key, rec] : purge_configs_) records.push_back(rec);
  for (const auto& [name, v] : vms_->all()) {
    if (!v->persisted) continue;
    if (auto* q = dynamic_cast<const vm::QmpVm*>(v.get())) {
      qmp_vm(name, q->qmp_path());
      if (q->state() == vm::State::kQuarantined)
        records.push_back(json{{"t", "quarantine"}, {"vm", name},
                               {"reason", q->last_error() == kQuarantineCrash
                                              ? "crash"
                                              : "interrupted-attach"}});
      else if (markers_.count(name))
        records.push_back(json{{"t", "attaching"}, {"vm", name}});
    } else if (auto* d = dynamic_cast<const libvirt::DomainVm*>(v.get())) {
      records.push_back(json{{"t", "libvirt-attach"}, {"vm", name},
                             {"uri", d->uri()}, {"uuid", d->uuid()}});
    }
  }
  return records;
}

// In place, blocking: at start-up, before anything is served.
void Daemon::compact(const char* why) {
  commit_pending();  // the rewrite must contain every appended violation
  std::vector<json> records = registration_records();
  for (auto& rec : store_.snapshot()) records.push_back(std::move(rec));
  uint64_t before = journal_->size_bytes();
  if (auto r = journal_->rewrite(records); !r) {
    stats_.journal_errors++;
    stats_.compaction_failures++;
    log::error("Failed to compact the journal", {{"error", r.error().message}});
    return;
  }
  stats_.compactions++;
  crash::set_journal_fd(journal_->fd());
  log::info("Journal compacted", {{"why", why},
                                  {"bytes_before", before},
                                  {"bytes_after", journal_->size_bytes()},
                                  {"records", journal_->records()}});
}

// On the worker: the loop only copies the store (and later appends what
// was written meanwhile); encoding and writing the snapshot run beside it.
void Daemon::start_compaction(const char* why) {
  if (!sync_journal()) return;  // begin_rewrite() wants nothing unsynced
  struct Job {
    journal::Journal::Rewrite rw;
    std::vector<json> records;
    violations::Store::Copy copy;
    std::optional<Error> error;
    uint64_t before = 0;
  };
  auto job = std::make_shared<Job>();
  job->rw = journal_->begin_rewrite();
  job->records = registration_records();
  job->copy = store_.copy();
  job->before = journal_->size_bytes();
  auto work = [job] {
    auto snap = violations::Store::snapshot(job->copy);
    job->copy = {};
    for (auto& rec : snap) job->records.push_back(std::move(rec));
    if (auto r = journal::Journal::write_rewrite(job->rw, job->records); !r)
      job->error = r.error();
    job->records = {};
  };
  auto done = [this, job, why] {
    if (!job->error) {
      if (auto r = journal_->finish_rewrite(job->rw); !r) job->error = r.error();
    }
    if (job->error) {
      journal::Journal::abandon_rewrite(job->rw);
      stats_.journal_errors++;
      stats_.compaction_failures++;
      auto delay = compact_backoff_.next();
      compact_not_before_ = std::chrono::steady_clock::now() + delay;
      uint64_t held = 0;
      if (journal_log_.allow(&held))
        log::error("Failed to compact the journal; retrying later",
                   {{"error", job->error->message},
                    {"retry_in_ms", delay.count()},
                    {"similar_errors_not_logged", held}});
      return;
    }
    compact_backoff_.reset();
    stats_.compactions++;
    crash::set_journal_fd(journal_->fd());
    log::info("Journal compacted", {{"why", why},
                                    {"bytes_before", job->before},
                                    {"bytes_after", journal_->size_bytes()},
                                    {"records", journal_->records()}});
  };
  if (auto r = compactor_->run(std::move(work), std::move(done)); !r) {
    log::error("Failed to start compaction", {{"error", r.error().message}});
    compact_not_before_ = std::chrono::steady_clock::now() + compact_backoff_.next();
  }
}

}  // namespace kvmx
