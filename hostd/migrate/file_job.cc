#include "file_job.h"

#include <algorithm>

#include "common/json_util.h"
#include "common/log.h"

namespace kvmx::migrate {

using nlohmann::json;
using std::chrono::duration_cast;
using std::chrono::milliseconds;
using Clock = std::chrono::steady_clock;

namespace {

constexpr const char* kBusy = "migration-busy";
constexpr const char* kRefused = "migration-refused";
constexpr const char* kFailed = "migration-failed";
constexpr const char* kCancelled = "migration-cancelled";

std::string cut(std::string s, size_t max = 512) {
  if (s.size() > max) s.resize(max);
  return s;
}

std::string qemu_text(const Error& e) {
  const std::string prefix = "GenericError: ";
  if (e.message.compare(0, prefix.size(), prefix) == 0)
    return e.message.substr(prefix.size());
  return e.message;
}

std::string secs(Clock::duration d) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.1f s",
                static_cast<double>(duration_cast<milliseconds>(d).count()) /
                    1000.0);
  return buf;
}

std::string size_text(uint64_t bytes) {
  static const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  double v = static_cast<double>(bytes);
  int u = 0;
  while (v >= 1024 && u < 4) {
    v /= 1024;
    u++;
  }
  char buf[32];
  if (u == 0)
    std::snprintf(buf, sizeof(buf), "%llu B",
                  static_cast<unsigned long long>(bytes));
  else
    std::snprintf(buf, sizeof(buf), "%.1f %s", v, units[u]);
  return buf;
}

bool busy(const std::string& st) {
  return st == "setup" || st == "active" || st == "cancelling" ||
         st == "device" || st == "pre-switchover" || st == "wait-unplug" ||
         st.rfind("postcopy", 0) == 0 || st == "colo";
}

}  // namespace

FileJob::FileJob(EventLoop& loop, FileSettings settings,
                 std::unique_ptr<Endpoint> vm, Job::Callbacks cb)
    : loop_(loop), s_(std::move(settings)), vm_(std::move(vm)),
      cb_(std::move(cb)) {
  started_ = last_contact_ = Clock::now();
}

FileJob::~FileJob() {
  *alive_ = false;
  loop_.cancel(poll_timer_);
}

template <typename Fn>
auto FileJob::guard(Fn fn) {
  return [this, alive = std::weak_ptr<bool>(alive_), gen = gen_,
          fn = std::move(fn)](auto&&... args) mutable {
    auto a = alive.lock();
    if (!a || !*a || gen != gen_) return;
    fn(std::forward<decltype(args)>(args)...);
  };
}

std::string FileJob::what() const {
  return s_.restore ? "restore of '" + vm_->name() + "' from '" + s_.path + "'"
                    : "snapshot of '" + vm_->name() + "' to '" + s_.path + "'";
}

void FileJob::run(const std::string& cmd, const json& args,
                  std::function<void(Result<json>)> fn) {
  vm_->command(cmd, args, guard([this, cmd, fn](Result<json> r) {
                 if (!r) {
                   Error e = r.error();
                   e.message = "VM '" + vm_->name() + "': " + cmd + ": " +
                               qemu_text(e);
                   return fn(e);
                 }
                 fn(std::move(*r));
               }));
}

void FileJob::fail(Error e) {
  if (e.code == "qmp-error") e.code = kFailed;
  // A save that stopped a running guest does not leave it stopped.
  if (stopped_ && was_running_ && !resumed_) {
    resumed_ = true;
    run("cont", json(), [this, e](Result<json> r) {
      Error out = e;
      out.message += r ? "; the VM runs again" : "; and cont failed: " +
                                                     r.error().message;
      end(State::kFailed, out, "failed: " + out.message);
    });
    return;
  }
  end(State::kFailed, e, "failed: " + e.message);
}

// -- preparing ------------------------------------------------------------------------

void FileJob::start() {
  started_ = last_contact_ = Clock::now();
  emit("checking '" + vm_->name() + "'");
  auto st = std::make_shared<std::vector<json>>();
  run("query-status", json(), [this, st](Result<json> a) {
    if (!a) return fail(a.error());
    st->push_back(*a);
    run("query-migrate", json(), [this, st](Result<json> b) {
      if (!b) return fail(b.error());
      st->push_back(*b);
      run("query-migrate-capabilities", json(), [this, st](Result<json> c) {
        if (!c) return fail(c.error());
        probed((*st)[0], (*st)[1], *c);
      });
    });
  });
}

void FileJob::probed(const json& status, const json& mig, const json& caps) {
  std::string run_st = cut(json_string(status, "status").value_or("?"), 64);
  std::string mig_st = cut(json_string(mig, "status").value_or("none"), 64);
  if (s_.restore) {
    if (run_st != "inmigrate")
      return fail(make_error(
          kRefused, "VM '" + vm_->name() +
                        "' does not wait for an incoming migration (its "
                        "QEMU is '" +
                        run_st + "'): start it with -incoming defer"));
    if (mig_st != "none")
      return fail(make_error(
          kRefused, "VM '" + vm_->name() +
                        "' has had an incoming migration already (QEMU's "
                        "status '" +
                        mig_st + "'): start a new QEMU with -incoming defer"));
  } else {
    if (run_st != "running" && run_st != "paused")
      return fail(make_error(kRefused, "VM '" + vm_->name() +
                                           "' cannot be saved now: its QEMU "
                                           "is '" +
                                           run_st + "'"));
    if (busy(mig_st))
      return fail(make_error(kBusy, "VM '" + vm_->name() +
                                        "' is migrating (QEMU's status '" +
                                        mig_st + "')"));
    was_running_ = run_st == "running";
  }
  caps_ = caps;
  if (caps.is_array())
    for (const auto& c : caps)
      if (auto n = json_string(c, "capability").value_or("");
          n == "disk-dedup")
        dedup_cap_ = true;
      else if (n == "multifd")
        multifd_cap_ = true;
  bool file_dedup =
      std::find(s_.file_caps.begin(), s_.file_caps.end(), "disk-dedup") !=
      s_.file_caps.end();
  if ((s_.disk_dedup == DedupMode::kOff && !(s_.restore && file_dedup)) ||
      !dedup_cap_)
    return decided(std::nullopt);
  run("query-kvmx-disk-dedup", json(), [this](Result<json> r) {
    if (!r && r.error().code != "qmp-error") return fail(r.error());
    decided(r ? std::optional<json>(*r) : std::nullopt);
  });
}

void FileJob::decided(const std::optional<json>& objects) {
  DedupSide side = dedup_side(vm_->name(), caps_, objects);
  auto has = [&](const char* c) {
    return std::find(s_.file_caps.begin(), s_.file_caps.end(), c) !=
           s_.file_caps.end();
  };
  auto dec = s_.restore
                 ? decide_dedup_restore(s_.disk_dedup, has("disk-dedup"), side)
                 : decide_dedup_file(s_.disk_dedup, side);
  if (!dec) return fail(dec.error());
  dedup_ = dec->enable;
  dedup_why_ = dec->why;
  if (s_.restore || !was_running_) return configure();
  // The guest stops first: what the file holds is one moment, and the
  // disk stays as the file refers to it.
  run("stop", json(), [this](Result<json> r) {
    if (!r) return fail(r.error());
    stopped_ = true;
    emit("'" + vm_->name() + "' stopped");
    configure();
  });
}

void FileJob::configure() {
  json c = json::array();
  // No return path on a file (a QEMU that was a dedup destination keeps it).
  c.push_back({{"capability", "return-path"}, {"state", false}});
  // The whole RAM in the file, shared memory backends too (a QEMU that was
  // the destination of a --shared-storage migration has it on); a restore
  // as the file was written (QEMU checks).
  bool ignore_shared =
      s_.restore && std::find(s_.file_caps.begin(), s_.file_caps.end(),
                              "x-ignore-shared") != s_.file_caps.end();
  c.push_back({{"capability", "x-ignore-shared"}, {"state", ignore_shared}});
  // One stream into the file: a QEMU that was the destination of a multifd
  // migration keeps multifd on, and QEMU then wants a multi-channel URI
  // (multifd into a file needs mapped-ram, which disk-dedup refuses).
  if (multifd_cap_) c.push_back({{"capability", "multifd"}, {"state", false}});
  if (dedup_cap_) c.push_back({{"capability", "disk-dedup"}, {"state", dedup_}});
  run("migrate-set-capabilities", json{{"capabilities", c}},
      [this](Result<json> r) {
        if (!r) return fail(r.error());
        if (s_.restore || !s_.max_bandwidth) return go();
        run("migrate-set-parameters",
            json{{"max-bandwidth", *s_.max_bandwidth}},
            [this](Result<json> r) {
              if (!r) return fail(r.error());
              go();
            });
      });
}

void FileJob::go() {
  std::string uri = "file:" + s_.path;
  // exit-on-error false: a failed load leaves the restoring QEMU there to
  // say why (query-migrate), instead of exiting.
  json args = {{"uri", uri}};
  if (s_.restore) args["exit-on-error"] = false;
  run(s_.restore ? "migrate-incoming" : "migrate", args,
      [this](Result<json> r) {
        if (!r) return fail(r.error());
        state_ = State::kPrecopy;
        started_ = last_contact_ = Clock::now();
        emit(std::string(s_.restore ? "restoring '" + vm_->name() +
                                          "' from " + s_.path
                                    : "saving '" + vm_->name() + "' to " +
                                          s_.path) +
             (dedup_ ? "; disk dedup on: " + dedup_why_
              : s_.disk_dedup == DedupMode::kAuto
                  ? "; disk dedup off: " + dedup_why_
                  : ""));
        if (cb_.on_started) cb_.on_started();
        arm_poll();
      });
}

// -- following ---------------------------------------------------------------------------

void FileJob::arm_poll() {
  loop_.cancel(poll_timer_);
  poll_timer_ = loop_.after(s_.interval, guard([this] {
                              poll_timer_ = 0;
                              if (ended_) return;
                              arm_poll();
                              if (polling_) return;
                              polling_ = true;
                              run("query-migrate", json(),
                                  [this](Result<json> r) {
                                    polling_ = false;
                                    sample(std::move(r));
                                  });
                            }));
}

void FileJob::sample(Result<json> r) {
  auto now = Clock::now();
  if (!r) {
    if (!vm_->lost().empty())
      return end(State::kFailed,
                 make_error(kFailed, what() + ": lost the VM (" +
                                         vm_->lost() + ")"),
                 "VM lost");
    if (now - last_contact_ > s_.lost_contact)
      return end(State::kFailed,
                 make_error(kFailed, what() + ": no answer for " +
                                         secs(now - last_contact_) + " (" +
                                         r.error().message + ")"),
                 "no answer");
    return emit("no answer: " + r.error().message);
  }
  last_contact_ = now;
  const json& info = *r;
  status_ = cut(json_string(info, "status").value_or("none"), 64);
  if (const json* ram = json_field(info, "ram"); ram && ram->is_object()) {
    uint64_t t = json_u64(*ram, "transferred").value_or(transferred_);
    if (have_sample_ && t >= transferred_ && now > last_at_) {
      auto dt = duration_cast<milliseconds>(now - last_at_).count();
      if (dt > 0) bytes_per_s_ = (t - transferred_) * 1000 / uint64_t(dt);
    }
    transferred_ = t;
    remaining_ = json_u64(*ram, "remaining").value_or(remaining_);
    total_ = json_u64(*ram, "total").value_or(total_);
    have_sample_ = true;
    last_at_ = now;
  }
  if (auto t = json_u64(info, "total-time")) total_time_ms_ = *t;
  if (auto d = dedup_stats(info); d.present) dd_ = d;
  std::string qerr = cut(json_string(info, "error-desc").value_or(""));
  if (status_ == "completed") return finish_completed();
  if (status_ == "failed") {
    std::string dd;
    if (dedup_ && s_.restore)
      // QEMU's error-desc names the first page and block of a mismatch
      // (07-disk-dedup/5); the counts say how many there were.
      dd = "; disk dedup: " + std::to_string(dd_.references_resolved) +
           " references read, " + std::to_string(dd_.mismatches) +
           " mismatches, " + std::to_string(dd_.read_errors) +
           " read errors (QEMU's log names the first few)";
    else if (dedup_)
      dd = "; disk dedup: " + std::to_string(dd_.pages_as_reference) +
           " pages as references";
    return fail(make_error(
        kFailed, what() + " failed: " +
                     (qerr.empty() ? "QEMU gave no reason" : qerr) + dd));
  }
  if (status_ == "cancelled") {
    Error e = make_error(kCancelled, what() + " was cancelled");
    return fail(e);
  }
  emit("");
}

void FileJob::finish_completed() {
  std::string dd;
  if (dedup_) {
    if (s_.restore)
      dd = "; disk dedup: " + std::to_string(dd_.references_resolved) +
           " references read from the disk " + dedup_read_text(dd_);
    else
    {
      dd = "; disk dedup: " + std::to_string(dd_.pages_as_reference) +
           " pages as references (" + size_text(dd_.bytes_saved) + " saved)";
      if (dd_.pages_checked)
        dd += ", each checked against the disk: " +
              std::to_string(dd_.pages_unlike_disk) +
              " pages unlike their block saved in full";
    }
  }
  std::string head =
      (s_.restore ? "restored in " : "saved " + size_text(transferred_) +
                                         " in ") +
      secs(Clock::now() - started_) + dd;
  if (!s_.resume) {
    return end(State::kCompleted, std::nullopt,
               head + (s_.restore ? "; the guest stays paused"
                       : was_running_
                           ? "; the VM stays paused (the disk as the file "
                             "has it)"
                           : ""));
  }
  if (!s_.restore && !was_running_)
    return end(State::kCompleted, std::nullopt,
               head + "; the VM was paused before and stays paused");
  // A restored QEMU may already run (a running guest was saved, no -S).
  run("query-status", json(), [this, head](Result<json> st) {
    if (st && json_string(*st, "status").value_or("") == "running")
      return end(State::kCompleted, std::nullopt, head + "; the guest runs");
    run("cont", json(), [this, head](Result<json> r) {
      if (!r)
        return end(State::kFailed,
                   make_error(kFailed, what() + " completed, but cont failed: " +
                                           r.error().message),
                   "cont failed");
      resumed_ = true;
      end(State::kCompleted, std::nullopt, head + "; the guest runs");
    });
  });
}

void FileJob::end(State s, std::optional<Error> error,
                  const std::string& message) {
  if (ended_) return;
  ended_ = true;
  state_ = s;
  error_ = std::move(error);
  gen_++;
  loop_.cancel(poll_timer_);
  poll_timer_ = 0;
  log::info(s_.restore ? "Restore ended" : "Snapshot ended",
            {{"vm", vm_->name()}, {"file", s_.path},
             {"state", to_string(s)},
             {"error", error_ ? error_->message : ""}});
  emit(message);
  if (cb_.on_end) cb_.on_end();
}

void FileJob::emit(const std::string& message) {
  if (!cb_.on_event) return;
  json e = snapshot();
  e["event"] = "migration";
  e["message"] = message;
  cb_.on_event(e);
}

Result<json> FileJob::outcome() const {
  if (state_ == State::kCompleted || !error_) return snapshot();
  return *error_;
}

json FileJob::snapshot() const {
  auto elapsed =
      duration_cast<milliseconds>(Clock::now() - started_).count();
  std::string st = to_string(state_);
  if (state_ == State::kPrecopy) st = s_.restore ? "restoring" : "saving";
  json j = {{"vm", vm_->name()},
            {"kind", s_.restore ? "restore" : "snapshot"},
            {"file", s_.path},
            {"state", st},
            {"ended", ended_},
            {"status", status_},
            {"transferred", transferred_},
            {"remaining", remaining_},
            {"total", total_},
            {"bytes_per_s", bytes_per_s_},
            {"elapsed_ms", elapsed},
            {"resume", s_.resume},
            {"was_running", was_running_},
            {"disk_dedup", to_string(s_.disk_dedup)},
            {"dedup", dedup_},
            {"dedup_reason", dedup_why_},
            {"error", error_ ? error_->message : ""}};
  if (dedup_)
    j["dedup_stats"] = {{"pages_as_reference", dd_.pages_as_reference},
                        {"bytes_saved", dd_.bytes_saved},
                        {"references_resolved", dd_.references_resolved},
                        {"mismatches", dd_.mismatches},
                        {"read_errors", dd_.read_errors},
                        {"read_time_ms", dd_.read_time_ms},
                        {"disk_reads", dd_.disk_reads},
                        {"pages_checked", dd_.pages_checked},
                        {"pages_unlike_disk", dd_.pages_unlike_disk}};
  j["total_time_ms"] = total_time_ms_ ? json(*total_time_ms_) : json(nullptr);
  return j;
}

}  // namespace kvmx::migrate
