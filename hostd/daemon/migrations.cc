// The migration ops (docs/specs/hostd-api.md, "migrate"): a migrate::Job
// per source VM, driving two `qmp` VMs of the registry.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include <filesystem>

#include "common/fd.h"
#include "common/log.h"
#include "common/unix_socket.h"
#include "daemon.h"

namespace kvmx {

using nlohmann::json;
using std::chrono::milliseconds;

namespace {

// A VM of the registry as the job sees it.  It holds the name, not the
// VM: a VM detached during the migration is "lost", never a dangling
// pointer.
class VmEndpoint final : public migrate::Endpoint {
 public:
  VmEndpoint(EventLoop& loop, vm::Manager& vms, std::string name)
      : loop_(loop), vms_(vms), name_(std::move(name)) {}

  const std::string& name() const override { return name_; }

  void command(const std::string& cmd, const json& args, migrate::ReplyFn fn,
               bool oob) override {
    // The job wants its answers from the loop, never inside this call.
    auto later = [&loop = loop_, fn](Result<json> r) {
      loop.defer([fn, r = std::move(r)]() mutable { fn(std::move(r)); });
    };
    vm::QmpVm* v = vms_.find_qmp(name_);
    if (!v) {
      later(make_error("vm-not-found", "VM '" + name_ + "' is not registered "
                                       "(detached?)"));
      return;
    }
    v->execute(cmd, args, later, oob);
  }

  std::string lost() const override {
    vm::Vm* v = vms_.find(name_);
    if (!v) return "detached from hostd";
    if (v->state() == vm::State::kGone) return v->last_error();
    auto* q = dynamic_cast<vm::QmpVm*>(v);
    if (q && q->state() == vm::State::kDisconnected &&
        q->connect_errno() == ECONNREFUSED)
      return "nothing listens on its QMP socket '" + q->qmp_path() +
             "' any more: QEMU exited";
    return "";
  }

 private:
  EventLoop& loop_;
  vm::Manager& vms_;
  std::string name_;
};

bool live(const migrate::Job& job) {
  // Ended paused is not over: the guest waits on the destination.
  return !job.ended() || job.state() == migrate::State::kPaused;
}

}  // namespace

// A migration URI's unix socket path: QEMU, listening, unlinks whatever is
// there first.  So hostd lets a client name only a path that is free or a
// stale socket (no listener), in an existing directory.
Result<void> Daemon::check_migration_uri(const std::string& uri) const {
  if (uri.rfind("unix:", 0) != 0) return {};
  std::string path = uri.substr(5);
  auto dir = std::filesystem::path(path).parent_path();
  std::error_code ec;
  if (!std::filesystem::is_directory(dir, ec))
    return make_error(api::code::kInvalid,
                      "migration socket directory '" + dir.string() +
                          "' does not exist");
  struct stat st{};
  if (::lstat(path.c_str(), &st) != 0) return {};
  if (!S_ISSOCK(st.st_mode))
    return make_error(api::code::kInvalid,
                      "'" + path +
                          "' exists and is not a socket: QEMU would remove it "
                          "to listen there; name a free path");
  auto fd = unix_connect(path);
  if (fd || fd.error().err != ECONNREFUSED)
    return make_error(api::code::kInvalid,
                      "'" + path +
                          "' is a socket in use: QEMU would take it over; "
                          "name a free path");
  return {};
}

Result<std::string> Daemon::migration_uri(const std::string& vm,
                                          const std::string& given) const {
  std::string uri = given;
  if (uri.empty()) {
    auto dir = std::filesystem::path(cfg_.socket).parent_path().string();
    uri = "unix:" + dir + "/migrate-" + vm + ".sock";
    if (uri.size() - 5 > kMaxUnixPath)
      return make_error(api::code::kInvalid,
                        "the default migration socket '" + uri.substr(5) +
                            "' is over 107 bytes: give 'uri'");
  }
  if (auto r = check_migration_uri(uri); !r) return r.error();
  return uri;
}

// The VM as a migration end: a `qmp` VM, attached.
Result<void> Daemon::migration_vm(const std::string& name, const char* role) {
  vm::Vm* v = vms_->find(name);
  if (!v)
    return make_error(api::code::kVmNotFound,
                      std::string(role) + " VM '" + name +
                          "' is not registered in hostd (attach it first)");
  if (v->source() != vm::Source::kQmp)
    return make_error(api::code::kMigrationUnsupported,
                      std::string(role) + " VM '" + name +
                          "' is a libvirt domain: libvirt migrates it "
                          "(virsh migrate --live --postcopy, docs/libvirt.md)");
  if (v->state() != vm::State::kAttached)
    return make_error(api::code::kNotConnected,
                      std::string(role) + " VM '" + name + "' is " +
                          vm::to_string(v->state()) + ", not attached");
  if (auto f = file_jobs_.find(name);
      f != file_jobs_.end() && !f->second.job->ended())
    return make_error(api::code::kMigrationBusy,
                      std::string(role) + " VM '" + name + "' is in a " +
                          (f->second.job->settings().restore ? "restore"
                                                             : "snapshot") +
                          " (" + f->second.job->settings().path + ")");
  for (const auto& [src, m] : migrations_) {
    if (!live(*m.job)) continue;
    if (m.job->source() == name || m.job->dest() == name)
      return make_error(api::code::kMigrationBusy,
                        "VM '" + name + "' is in the migration of '" + src +
                            "' to '" + m.job->dest() + "' (" +
                            migrate::to_string(m.job->state()) + ")");
  }
  return {};
}

Result<void> Daemon::room_for_migration(const std::string& vm) {
  if (migrations_.count(vm) || migrations_.size() < cfg_.max_vms) return {};
  // Forget the oldest ended migration to make room.
  for (auto it = migrations_.begin(); it != migrations_.end(); ++it)
    if (!live(*it->second.job) && it->second.waiters.empty()) {
      migrations_.erase(it);
      return {};
    }
  return make_error(api::code::kMigrationBusy,
                    "hostd follows " + std::to_string(migrations_.size()) +
                        " migrations (max-vms); wait for one to end");
}

// A new job for `vm`, replacing an ended one (whose waiters, if its end is
// not delivered yet, get its outcome now).
Daemon::Migration& Daemon::new_migration(const std::string& vm,
                                         const std::string& dest,
                                         migrate::Settings s) {
  auto old = migrations_.find(vm);
  if (old != migrations_.end()) {
    auto waiters = std::move(old->second.waiters);
    auto outcome = old->second.job->outcome();
    migrations_.erase(old);
    for (auto& w : waiters) w.reply(outcome);
  }
  s.check_uri = [this](const std::string& uri) {
    auto r = check_migration_uri(uri);
    return r ? std::string() : r.error().message;
  };
  migrate::Job::Callbacks cb;
  cb.on_event = [this, vm](const json& ev) { migration_event(vm, ev); };
  cb.on_started = [this, vm] { migration_started(vm); };
  cb.on_end = [this, vm] {
    // Not inside the job's own call chain: a waiter may start another.
    loop_.defer([this, vm] { migration_ended(vm); });
  };
  Migration& m = migrations_[vm];
  m.job = std::make_unique<migrate::Job>(
      loop_, std::move(s), std::make_unique<VmEndpoint>(loop_, *vms_, vm),
      std::make_unique<VmEndpoint>(loop_, *vms_, dest), std::move(cb));
  stats_.migrations++;
  return m;
}

void Daemon::op_migrate(api::ClientId client, const api::Migrate& a,
                        api::ReplyFn reply) {
  for (auto [name, role] : {std::pair{&a.vm, "source"}, std::pair{&a.dest, "destination"}})
    if (auto r = migration_vm(*name, role); !r) return reply(r.error());
  auto uri = migration_uri(a.vm, a.uri);
  if (!uri) return reply(uri.error());
  std::string ruri;
  if (!a.recover_uri.empty()) {
    if (auto r = check_migration_uri(a.recover_uri); !r) return reply(r.error());
    ruri = a.recover_uri;
  }
  if (auto r = room_for_migration(a.vm); !r) return reply(r.error());

  migrate::Settings s;
  s.uri = *uri;
  s.recover_uri = ruri;
  s.postcopy = a.postcopy;
  s.prefetch = a.prefetch;
  s.transport = a.transport;
  s.shared_storage = a.shared_storage;
  s.disk_dedup = migrate::parse_dedup_mode(a.disk_dedup)
                     .value_or(migrate::DedupMode::kAuto);
  s.multifd_channels = a.multifd_channels;
  s.policy.manual = a.switch_manual;
  s.policy.after_passes = a.switch_after_passes;
  s.policy.stall_samples = a.switch_stall_samples;
  s.policy.after_s = a.switch_after_s;
  s.max_bandwidth = a.max_bandwidth;
  s.max_postcopy_bandwidth = a.max_postcopy_bandwidth;
  s.downtime_limit_ms = a.downtime_limit_ms;
  s.recover_attempts = a.recover_attempts;
  s.interval = milliseconds(a.interval_ms);
  s.lost_contact = std::max(milliseconds(cfg_.qmp_timeout_ms) * 6,
                            s.interval * 6);

  log::info("Migration requested",
            {{"vm", a.vm}, {"dest", a.dest}, {"uri", *uri},
             {"postcopy", a.postcopy}, {"prefetch", a.prefetch},
             {"transport", a.transport},
             {"shared_storage", a.shared_storage},
             {"disk_dedup", a.disk_dedup},
             {"multifd_channels", a.multifd_channels}});
  Migration& m = new_migration(a.vm, a.dest, std::move(s));
  m.waiters.push_back(Waiter{client, std::move(reply), a.wait});
  m.job->start();
}

void Daemon::op_migrate_postcopy(const api::MigratePostcopy& a,
                                 api::ReplyFn reply) {
  auto it = migrations_.find(a.vm);
  if (it != migrations_.end() && !it->second.job->ended()) {
    it->second.job->switch_now("requested by a client", reply);
    return;
  }
  // A migration hostd does not follow (started elsewhere, or before a
  // restart of hostd): ask QEMU directly.
  vm::QmpVm* v = vms_->find_qmp(a.vm);
  if (!v)
    return reply(make_error(api::code::kVmNotFound,
                            "no VM named '" + a.vm + "' with a QMP socket"));
  v->execute("migrate-start-postcopy", json(),
             [vm = a.vm, reply](Result<json> r) {
               if (!r) {
                 Error e = r.error();
                 if (e.code == "qmp-error") e.code = api::code::kMigrationRefused;
                 e.message = "VM '" + vm + "': migrate-start-postcopy: " +
                             e.message;
                 return reply(e);
               }
               reply(json{{"switching", true}, {"already", false},
                          {"reason", "requested by a client"},
                          {"followed", false}});
             });
}

void Daemon::op_migrate_recover(api::ClientId client,
                                const api::MigrateRecover& a,
                                api::ReplyFn reply) {
  auto it = migrations_.find(a.vm);
  if (it != migrations_.end() && live(*it->second.job)) {
    Migration& m = it->second;
    if (!a.dest.empty() && a.dest != m.job->dest())
      return reply(make_error(api::code::kInvalid,
                              "the migration of '" + a.vm + "' goes to '" +
                                  m.job->dest() + "', not '" + a.dest + "'"));
    if (!a.uri.empty())
      if (auto r = check_migration_uri(a.uri); !r) return reply(r.error());
    if (auto r = m.job->recover(a.uri); !r) return reply(r.error());
    m.waiters.push_back(Waiter{client, std::move(reply), a.wait});
    return;
  }
  // hostd does not follow this migration (any more): both VMs are named.
  if (a.dest.empty())
    return reply(make_error(api::code::kInvalid,
                            "hostd follows no migration of '" + a.vm +
                                "': give 'dest' too"));
  for (auto [name, role] : {std::pair{&a.vm, "source"}, std::pair{&a.dest, "destination"}})
    if (auto r = migration_vm(*name, role); !r) return reply(r.error());
  auto uri = migration_uri(a.vm, a.uri);
  if (!uri) return reply(uri.error());
  if (auto r = room_for_migration(a.vm); !r) return reply(r.error());
  migrate::Settings s;
  s.uri = *uri;
  s.postcopy = true;
  s.recover_attempts = 0;
  s.interval = milliseconds(a.interval_ms ? a.interval_ms : 1000);
  s.lost_contact = std::max(milliseconds(cfg_.qmp_timeout_ms) * 6,
                            s.interval * 6);
  log::info("Recovery of a paused post-copy requested",
            {{"vm", a.vm}, {"dest", a.dest}, {"uri", *uri}});
  Migration& m = new_migration(a.vm, a.dest, std::move(s));
  m.waiters.push_back(Waiter{client, std::move(reply), a.wait});
  if (auto r = m.job->recover(""); !r) {
    auto w = std::move(m.waiters);
    migrations_.erase(a.vm);
    for (auto& x : w) x.reply(r.error());
  }
}

void Daemon::op_migrate_cancel(const api::MigrateCancel& a,
                               api::ReplyFn reply) {
  auto it = migrations_.find(a.vm);
  if (it != migrations_.end() && live(*it->second.job)) {
    it->second.job->cancel(reply);
    return;
  }
  vm::QmpVm* v = vms_->find_qmp(a.vm);
  if (!v)
    return reply(make_error(api::code::kVmNotFound,
                            "no VM named '" + a.vm + "' with a QMP socket"));
  v->execute("migrate_cancel", json(), [vm = a.vm, reply](Result<json> r) {
    if (!r) {
      Error e = r.error();
      if (e.code == "qmp-error") e.code = api::code::kMigrationRefused;
      e.message = "VM '" + vm + "': migrate_cancel: " + e.message;
      return reply(e);
    }
    reply(json{{"cancelling", true}, {"followed", false}});
  });
}

void Daemon::op_migrate_status(const api::MigrateStatus& a,
                               api::ReplyFn reply) {
  auto it = migrations_.find(a.vm);
  auto f = file_jobs_.find(a.vm);
  // A snapshot or restore under way counts first, then the migration.
  if (f != file_jobs_.end() &&
      (!f->second.job->ended() || it == migrations_.end()))
    return reply(f->second.job->snapshot());
  if (it == migrations_.end())
    return reply(make_error(api::code::kNoMigration,
                            "hostd has no migration, snapshot or restore "
                            "of '" + a.vm + "'"));
  reply(it->second.job->snapshot());
}

void Daemon::migration_event(const std::string& vm, const json& ev) {
  auto it = migrations_.find(vm);
  if (it != migrations_.end()) {
    auto& w = it->second.waiters;
    for (auto x = w.begin(); x != w.end();) {
      if (!server_->notify(x->client, ev))
        x = w.erase(x);  // gone: the migration goes on without it
      else
        ++x;
    }
  }
  server_->broadcast(ev);
}

void Daemon::migration_started(const std::string& vm) {
  auto it = migrations_.find(vm);
  if (it == migrations_.end()) return;
  auto& w = it->second.waiters;
  for (auto x = w.begin(); x != w.end();) {
    if (x->wait) {
      ++x;
      continue;
    }
    x->reply(it->second.job->snapshot());
    x = w.erase(x);
  }
}

void Daemon::migration_ended(const std::string& vm) {
  auto it = migrations_.find(vm);
  if (it == migrations_.end() || !it->second.job->ended()) return;
  auto outcome = it->second.job->outcome();
  if (it->second.job->state() == migrate::State::kCompleted)
    stats_.migrations_completed++;
  else if (it->second.job->state() == migrate::State::kPaused)
    stats_.migrations_paused++;
  else
    stats_.migrations_failed++;
  auto waiters = std::move(it->second.waiters);
  it->second.waiters.clear();
  for (auto& w : waiters) w.reply(outcome);
}

// -- snapshot and restore ----------------------------------------------------------

namespace {

// QEMU's migration stream starts with "QEVM" (QEMU_VM_FILE_MAGIC).
bool looks_like_snapshot(const std::string& path, bool empty_ok) {
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW));
  if (!fd) return false;
  char magic[4];
  ssize_t n = ::read(fd.get(), magic, sizeof(magic));
  if (n == 0) return empty_ok;
  return n == 4 && std::memcmp(magic, "QEVM", 4) == 0;
}

}  // namespace

// What hostd lets a client name as a snapshot file.  hostd runs as root and
// QEMU opens the file for writing: only a new file in an existing
// directory, or, with force, a regular file (no symlink) that is empty or
// a former snapshot; never a device, a directory or any other file.
Result<void> check_snapshot_file(const std::string& path, bool force) {
  auto dir = std::filesystem::path(path).parent_path();
  struct stat st{};
  if (::stat(dir.c_str(), &st) != 0 || !S_ISDIR(st.st_mode))
    return make_error(api::code::kInvalid,
                      "snapshot directory '" + dir.string() +
                          "' does not exist");
  if (::lstat(path.c_str(), &st) != 0) {
    if (errno == ENOENT) return {};
    return make_error(api::code::kInvalid, "cannot look at '" + path +
                                               "': " + std::strerror(errno));
  }
  if (!S_ISREG(st.st_mode))
    return make_error(api::code::kInvalid,
                      "'" + path +
                          "' exists and is not a regular file (a symlink, "
                          "directory or device): name a new file");
  if (!force)
    return make_error(api::code::kInvalid,
                      "'" + path +
                          "' exists: name a new file, or give force (true) "
                          "to overwrite an earlier snapshot");
  if (!looks_like_snapshot(path, true))
    return make_error(api::code::kInvalid,
                      "'" + path +
                          "' exists and is not a QEMU snapshot (no QEVM "
                          "magic): force overwrites only an earlier snapshot "
                          "or an empty file");
  return {};
}

// The first bytes of a snapshot file: its configuration section.
std::string file_head(const std::string& path) {
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW));
  if (!fd) return "";
  std::string buf(4096, '\0');
  ssize_t n = ::read(fd.get(), buf.data(), buf.size());
  buf.resize(n > 0 ? static_cast<size_t>(n) : 0);
  return buf;
}

Result<void> check_restore_file(const std::string& path) {
  struct stat st{};
  if (::lstat(path.c_str(), &st) != 0)
    return make_error(api::code::kInvalid, "cannot restore from '" + path +
                                               "': " + std::strerror(errno));
  if (!S_ISREG(st.st_mode))
    return make_error(api::code::kInvalid,
                      "'" + path + "' is not a regular file");
  if (!looks_like_snapshot(path, false))
    return make_error(api::code::kInvalid,
                      "'" + path +
                          "' is not a QEMU snapshot (no QEVM magic at its "
                          "start)");
  return {};
}

void Daemon::op_snapshot(api::ClientId client, const api::Snapshot& a,
                         api::ReplyFn reply) {
  if (auto r = migration_vm(a.vm, "the"); !r) return reply(r.error());
  if (auto r = check_snapshot_file(a.file, a.force); !r)
    return reply(r.error());
  // Created here, not by QEMU, and never through a symlink: in a sticky
  // directory nobody can swap it for one before QEMU opens it.
  {
    UniqueFd fd(::open(a.file.c_str(),
                       O_WRONLY | O_CREAT | O_CLOEXEC | O_NOFOLLOW |
                           (a.force ? 0 : O_EXCL),
                       0600));
    if (!fd)
      return reply(make_error(api::code::kInvalid,
                              "cannot create '" + a.file +
                                  "': " + std::strerror(errno)));
  }
  migrate::FileSettings s;
  s.path = a.file;
  s.disk_dedup = migrate::parse_dedup_mode(a.disk_dedup)
                     .value_or(migrate::DedupMode::kAuto);
  s.resume = a.resume;
  s.max_bandwidth = a.max_bandwidth;
  s.interval = milliseconds(a.interval_ms);
  s.lost_contact = std::max(milliseconds(cfg_.qmp_timeout_ms) * 6,
                            s.interval * 6);
  log::info("Snapshot requested", {{"vm", a.vm}, {"file", a.file},
                                   {"disk_dedup", a.disk_dedup},
                                   {"resume", a.resume}});
  start_file_job(client, a.vm, std::move(s), a.wait, std::move(reply));
}

void Daemon::op_restore(api::ClientId client, const api::Restore& a,
                        api::ReplyFn reply) {
  if (auto r = migration_vm(a.vm, "the"); !r) return reply(r.error());
  if (auto r = check_restore_file(a.file); !r) return reply(r.error());
  migrate::FileSettings s;
  s.restore = true;
  s.path = a.file;
  s.file_caps = migrate::stream_capabilities(file_head(a.file))
                    .value_or(std::vector<std::string>{});
  s.disk_dedup = migrate::parse_dedup_mode(a.disk_dedup)
                     .value_or(migrate::DedupMode::kAuto);
  s.resume = !a.paused;
  s.interval = milliseconds(a.interval_ms);
  s.lost_contact = std::max(milliseconds(cfg_.qmp_timeout_ms) * 6,
                            s.interval * 6);
  log::info("Restore requested", {{"vm", a.vm}, {"file", a.file},
                                  {"disk_dedup", a.disk_dedup}});
  start_file_job(client, a.vm, std::move(s), a.wait, std::move(reply));
}

void Daemon::start_file_job(api::ClientId client, const std::string& vm,
                            migrate::FileSettings s, bool wait,
                            api::ReplyFn reply) {
  auto old = file_jobs_.find(vm);
  if (old != file_jobs_.end()) {
    auto waiters = std::move(old->second.waiters);
    auto outcome = old->second.job->outcome();
    file_jobs_.erase(old);
    for (auto& w : waiters) w.reply(outcome);
  } else if (file_jobs_.size() >= cfg_.max_vms) {
    // Forget an ended one to make room.
    for (auto it = file_jobs_.begin(); it != file_jobs_.end(); ++it)
      if (it->second.job->ended() && it->second.waiters.empty()) {
        file_jobs_.erase(it);
        break;
      }
    if (file_jobs_.size() >= cfg_.max_vms)
      return reply(make_error(api::code::kMigrationBusy,
                              "hostd follows " +
                                  std::to_string(file_jobs_.size()) +
                                  " snapshots and restores (max-vms)"));
  }
  migrate::Job::Callbacks cb;
  cb.on_event = [this, vm](const json& ev) { file_job_event(vm, ev); };
  cb.on_started = [this, vm] { file_job_started(vm); };
  cb.on_end = [this, vm] { loop_.defer([this, vm] { file_job_ended(vm); }); };
  FileRun& f = file_jobs_[vm];
  f.job = std::make_unique<migrate::FileJob>(
      loop_, std::move(s), std::make_unique<VmEndpoint>(loop_, *vms_, vm),
      std::move(cb));
  f.waiters.push_back(Waiter{client, std::move(reply), wait});
  stats_.migrations++;
  f.job->start();
}

void Daemon::file_job_event(const std::string& vm, const json& ev) {
  auto it = file_jobs_.find(vm);
  if (it != file_jobs_.end()) {
    auto& w = it->second.waiters;
    for (auto x = w.begin(); x != w.end();) {
      if (!server_->notify(x->client, ev))
        x = w.erase(x);
      else
        ++x;
    }
  }
  server_->broadcast(ev);
}

void Daemon::file_job_started(const std::string& vm) {
  auto it = file_jobs_.find(vm);
  if (it == file_jobs_.end()) return;
  auto& w = it->second.waiters;
  for (auto x = w.begin(); x != w.end();) {
    if (x->wait) {
      ++x;
      continue;
    }
    x->reply(it->second.job->snapshot());
    x = w.erase(x);
  }
}

void Daemon::file_job_ended(const std::string& vm) {
  auto it = file_jobs_.find(vm);
  if (it == file_jobs_.end() || !it->second.job->ended()) return;
  auto outcome = it->second.job->outcome();
  if (it->second.job->state() == migrate::State::kCompleted)
    stats_.migrations_completed++;
  else
    stats_.migrations_failed++;
  auto waiters = std::move(it->second.waiters);
  it->second.waiters.clear();
  for (auto& w : waiters) w.reply(outcome);
}

json Daemon::migration_stats() const {
  size_t running = 0;
  for (const auto& [vm, m] : migrations_) running += m.job->ended() ? 0 : 1;
  for (const auto& [vm, f] : file_jobs_) running += f.job->ended() ? 0 : 1;
  return json{{"running", running},
              {"started", stats_.migrations},
              {"completed", stats_.migrations_completed},
              {"failed", stats_.migrations_failed},
              {"paused", stats_.migrations_paused}};
}

}  // namespace kvmx
