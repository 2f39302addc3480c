#include "job.h"

#include <sys/stat.h>

#include <set>

#include "common/json_util.h"
#include "common/log.h"

namespace kvmx::migrate {

using nlohmann::json;
using std::chrono::duration_cast;
using std::chrono::milliseconds;
using Clock = std::chrono::steady_clock;

namespace {

// Error codes (api/request.h has the same strings; this library does not
// depend on the API's).
constexpr const char* kBusy = "migration-busy";
constexpr const char* kUnsupported = "migration-unsupported";
constexpr const char* kRefused = "migration-refused";
constexpr const char* kFailed = "migration-failed";
constexpr const char* kPaused = "migration-paused";
constexpr const char* kCancelled = "migration-cancelled";

// Memory backends hostd looks at for the storage check.
constexpr size_t kMaxBackends = 64;

// QEMU's statuses while an outgoing migration runs (query-migrate).
bool migrating(const std::string& st) {
  static const std::set<std::string> k = {
      "setup", "cancelling", "active", "postcopy-active", "postcopy-paused",
      "postcopy-recover-setup", "postcopy-recover", "colo", "pre-switchover",
      "device", "wait-unplug"};
  return k.count(st) > 0;
}

// "GenericError: <desc>" (qmp/client.cc) is QEMU's description to people.
std::string qemu_text(const Error& e) {
  const std::string prefix = "GenericError: ";
  if (e.message.compare(0, prefix.size(), prefix) == 0)
    return e.message.substr(prefix.size());
  return e.message;
}

// "812.0 MiB" (ctl/args.cc has the same for the command line).
std::string format_size(uint64_t bytes) {
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

std::string shorten(std::string s, size_t max = 512) {
  if (s.size() > max) s.resize(max);
  return s;
}

std::string seconds(Clock::duration d) {
  auto ms = duration_cast<milliseconds>(d).count();
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.1f s", static_cast<double>(ms) / 1000.0);
  return buf;
}

std::set<std::string> capability_names(const json& answer) {
  std::set<std::string> names;
  if (!answer.is_array()) return names;
  for (const auto& c : answer)
    if (auto n = json_string(c, "capability")) names.insert(*n);
  return names;
}

}  // namespace

const char* to_string(State s) {
  switch (s) {
    case State::kPreparing: return "preparing";
    case State::kPrecopy: return "precopy";
    case State::kSwitching: return "switching";
    case State::kPostcopy: return "postcopy";
    case State::kPaused: return "paused";
    case State::kRecovering: return "recovering";
    case State::kCompleted: return "completed";
    case State::kFailed: return "failed";
    case State::kCancelled: return "cancelled";
  }
  return "?";
}

Identity same_file(const std::string& a, const std::string& b) {
  struct stat sa{}, sb{};
  if (::stat(a.c_str(), &sa) != 0 || ::stat(b.c_str(), &sb) != 0)
    return Identity::kUnknown;
  return sa.st_dev == sb.st_dev && sa.st_ino == sb.st_ino
             ? Identity::kSame
             : Identity::kDifferent;
}

std::string check_storage(const std::vector<Backend>& src,
                          const std::vector<Backend>& dst, bool shared_storage,
                          const std::string& src_name,
                          const std::string& dst_name, bool shared_disks) {
  // With x-ignore-shared QEMU sends no shared file-backed block: each must
  // be the same file on both sides.  Without it, a file both QEMUs map
  // would be copied onto itself while the guest still writes it: a page
  // the guest rewrote after it was sent is overwritten with its old
  // contents by the destination, and then read back from the file and
  // sent as such.
  auto matches = [](const std::string& a, const std::string& b) {
    Identity id = same_file(a, b);
    return id == Identity::kSame || (id == Identity::kUnknown && a == b);
  };
  if (shared_storage) {
    bool any = false;
    for (const auto& d : dst) {
      if (!d.share) continue;
      any = true;
      bool found = false;
      for (const auto& s : src) found = found || (s.share && matches(s.path, d.path));
      if (!found)
        return "--shared-storage, but VM '" + dst_name + "' maps '" + d.path +
               "' (" + d.id + ") which VM '" + src_name +
               "' does not: the destination would run on that file's "
               "contents, not the guest's";
    }
    for (const auto& s : src) {
      if (!s.share) continue;
      bool found = false;
      for (const auto& d : dst) found = found || (d.share && matches(s.path, d.path));
      if (!found)
        return "--shared-storage, but VM '" + src_name + "' maps '" + s.path +
               "' (" + s.id + ") shared and VM '" + dst_name +
               "' does not map it shared: its contents would not be migrated";
    }
    if (!any && !shared_disks)
      return "--shared-storage, but VM '" + dst_name +
             "' has no shared file-backed memory (memory-backend-file with "
             "share=on) and no disk for disk-dedup: there is nothing to "
             "share";
    return "";
  }
  for (const auto& d : dst)
    for (const auto& s : src)
      if ((s.share || d.share) && same_file(s.path, d.path) == Identity::kSame)
        return "VMs '" + src_name + "' and '" + dst_name + "' both map '" +
               d.path +
               "': migrating it would copy the file onto itself while the "
               "guest writes it; when both use the same storage, migrate "
               "with --shared-storage";
  return "";
}

Job::Job(EventLoop& loop, Settings settings, std::unique_ptr<Endpoint> src,
         std::unique_ptr<Endpoint> dst, Callbacks cb)
    : loop_(loop), s_(std::move(settings)), src_(std::move(src)),
      dst_(std::move(dst)), cb_(std::move(cb)), policy_(s_.policy) {
  if (s_.recover_uri.empty()) s_.recover_uri = s_.uri;
  attempts_left_ = s_.recover_attempts;
  next_backoff_ = s_.recover_backoff_min;
  started_ = last_contact_ = Clock::now();
}

Job::~Job() {
  *alive_ = false;
  loop_.cancel(poll_timer_);
  loop_.cancel(recover_timer_);
}

template <typename Fn>
auto Job::guard(Fn fn) {
  return [this, alive = std::weak_ptr<bool>(alive_), gen = gen_,
          fn = std::move(fn)](auto&&... args) mutable {
    auto a = alive.lock();
    if (!a || !*a || gen != gen_) return;
    fn(std::forward<decltype(args)>(args)...);
  };
}

// -- command helpers ------------------------------------------------------------

void Job::seq(Endpoint& ep, std::vector<Cmd> cmds, SeqFn fn) {
  struct St {
    std::vector<Cmd> cmds;
    std::vector<json> answers;
    SeqFn fn;
    std::function<void()> next;
    std::weak_ptr<bool> alive;  // the job's: `e` is the job's endpoint
  };
  auto st = std::make_shared<St>();
  st->cmds = std::move(cmds);
  st->fn = std::move(fn);
  st->alive = alive_;
  Endpoint* e = &ep;
  std::weak_ptr<St> weak = st;
  st->next = [e, weak] {
    auto st = weak.lock();
    if (!st) return;
    if (st->alive.expired()) {
      st->next = nullptr;
      return;
    }
    size_t i = st->answers.size();
    if (i == st->cmds.size()) {
      auto fn = std::move(st->fn);
      auto answers = std::move(st->answers);
      st->next = nullptr;  // breaks the cycle
      fn(std::move(answers));
      return;
    }
    const auto& [cmd, args] = st->cmds[i];
    e->command(cmd, args, [st, e, cmd = cmd](Result<json> r) {
      if (st->alive.expired()) {
        st->next = nullptr;
        return;
      }
      if (!r) {
        Error err = r.error();
        err.message = "VM '" + e->name() + "': " + cmd + ": " + qemu_text(err);
        auto fn = std::move(st->fn);
        st->next = nullptr;
        fn(err);
        return;
      }
      st->answers.push_back(std::move(*r));
      st->next();
    });
  };
  st->next();
}

void Job::both(std::vector<Cmd> src_cmds, std::vector<Cmd> dst_cmds,
               std::function<void(Result<std::vector<json>>,
                                  Result<std::vector<json>>)> fn) {
  struct St {
    std::optional<Result<std::vector<json>>> s, d;
    std::function<void(Result<std::vector<json>>, Result<std::vector<json>>)> fn;
  };
  auto st = std::make_shared<St>();
  st->fn = std::move(fn);
  auto done = [st] {
    if (st->s && st->d) st->fn(std::move(*st->s), std::move(*st->d));
  };
  seq(*src_, std::move(src_cmds), [st, done](Result<std::vector<json>> r) {
    st->s = std::move(r);
    done();
  });
  seq(*dst_, std::move(dst_cmds), [st, done](Result<std::vector<json>> r) {
    st->d = std::move(r);
    done();
  });
}

// -- preparing --------------------------------------------------------------------

void Job::start() {
  begun_ = true;
  started_ = last_contact_ = Clock::now();
  state_ = State::kPreparing;
  emit("checking '" + src_->name() + "' and '" + dst_->name() + "'");
  probe();
}

void Job::fail_prepare(const Error& e) { end(State::kFailed, e, e.message); }

void Job::probe() {
  std::vector<Cmd> q = {{"query-status", json()},
                        {"query-migrate", json()},
                        {"query-migrate-capabilities", json()},
                        {"query-migrate-parameters", json()}};
  both(q, q, guard([this](Result<std::vector<json>> s,
                          Result<std::vector<json>> d) {
         if (!s) return fail_prepare(s.error());
         if (!d) return fail_prepare(d.error());
         check(*s, *d);
       }));
}

void Job::check(const std::vector<json>& src, const std::vector<json>& dst) {
  const std::string& sn = src_->name();
  const std::string& dn = dst_->name();
  std::string run = json_string(src[0], "status").value_or("?");
  if (run != "running" && run != "paused" && run != "prelaunch")
    return fail_prepare(make_error(
        kRefused, "VM '" + sn + "' cannot be migrated now: its QEMU is '" +
                      shorten(run, 64) + "'"));
  std::string mig = json_string(src[1], "status").value_or("none");
  if (migrating(mig))
    return fail_prepare(make_error(
        kBusy, "VM '" + sn + "' is already migrating (QEMU's status '" + mig +
                   "')" +
                   (mig == "postcopy-paused"
                        ? ": recover it with migrate-recover"
                        : "")));
  std::string drun = json_string(dst[0], "status").value_or("?");
  if (drun != "inmigrate")
    return fail_prepare(make_error(
        kRefused, "destination VM '" + dn +
                      "' does not wait for an incoming migration (its QEMU "
                      "is '" +
                      shorten(drun, 64) +
                      "'): start it with -incoming defer"));
  std::string dmig = json_string(dst[1], "status").value_or("none");
  if (dmig != "none")
    return fail_prepare(make_error(
        kRefused, "destination VM '" + dn +
                      "' has had an incoming migration already (QEMU's "
                      "status '" +
                      shorten(dmig, 64) +
                      "'): start a new QEMU with -incoming defer"));

  auto scaps = capability_names(src[2]);
  auto dcaps = capability_names(dst[2]);
  std::vector<std::string> need;
  if (s_.postcopy) need.push_back("postcopy-ram");
  if (s_.shared_storage) need.push_back("x-ignore-shared");
  if (s_.prefetch != "off") need.push_back("postcopy-prefetch");
  if (s_.transport == "rdma") need.push_back("postcopy-rdma");
  if (s_.multifd_channels) need.push_back("multifd");
  for (const auto& cap : need)
    for (auto [caps, name] : {std::pair{&scaps, &sn}, std::pair{&dcaps, &dn}})
      if (!caps->count(cap))
        return fail_prepare(make_error(
            kUnsupported,
            "the QEMU of VM '" + *name + "' has no migration capability '" +
                cap + "'" +
                (cap == "postcopy-prefetch"
                     ? ": post-copy prefetch is not in this QEMU (use "
                       "--prefetch=off)"
                 : cap == "postcopy-rdma"
                     ? ": RDMA page fetch is not in this QEMU (QEMU built "
                       "without rdma-core, or stock; use --transport tcp)"
                     : "")));
  src_prefetch_ = scaps.count("postcopy-prefetch") > 0;
  dst_prefetch_ = dcaps.count("postcopy-prefetch") > 0;
  src_rdma_cap_ = scaps.count("postcopy-rdma") > 0;
  dst_rdma_cap_ = dcaps.count("postcopy-rdma") > 0;
  src_dedup_cap_ = scaps.count("disk-dedup") > 0;
  dst_dedup_cap_ = dcaps.count("disk-dedup") > 0;
  src_multifd_cap_ = scaps.count("multifd") > 0;
  dst_multifd_cap_ = dcaps.count("multifd") > 0;
  src_caps_ = src[2];
  dst_caps_ = dst[2];
  if (s_.prefetch != "off")
    for (auto [params, name] : {std::pair{&src[3], &sn}, std::pair{&dst[3], &dn}})
      if (!params->is_object() || !params->contains("postcopy-prefetch-mode"))
        return fail_prepare(make_error(
            kUnsupported, "the QEMU of VM '" + *name +
                              "' has no migration parameter "
                              "'postcopy-prefetch-mode': post-copy prefetch "
                              "is not in this QEMU (use --prefetch=off)"));
  probe_dedup();
}

// query-kvmx-disk-dedup where QEMU has the capability (stock QEMU has
// neither the command nor the capability), then the decision.
void Job::probe_dedup() {
  auto st = std::make_shared<std::pair<std::optional<Result<json>>,
                                       std::optional<Result<json>>>>();
  auto done = guard([this, st] {
    if (!st->first || !st->second) return;
    std::optional<json> so, dobj;
    for (auto [r, out] : {std::pair{&*st->first, &so},
                          std::pair{&*st->second, &dobj}}) {
      if (*r) {
        *out = **r;
      } else if (r->error().code != "qmp-error") {
        return fail_prepare(r->error());  // not answering: not "no object"
      }
    }
    DedupSide s = dedup_side(src_->name(), src_caps_, so);
    DedupSide d = dedup_side(dst_->name(), dst_caps_, dobj);
    auto dec = decide_dedup(s_.disk_dedup, s_.shared_storage, s, d);
    if (!dec) return fail_prepare(dec.error());
    dedup_ = dec->enable;
    dedup_why_ = dec->why;
    probe_backends();
  });
  auto ask = [this](Endpoint& ep, bool cap,
                    std::function<void(Result<json>)> fn) {
    if (s_.disk_dedup == DedupMode::kOff || !cap)
      return loop_.defer([fn] { fn(json()); });  // not an array: no object
    seq(ep, {{"query-kvmx-disk-dedup", json()}},
        [fn](Result<std::vector<json>> r) {
          if (!r) return fn(r.error());
          fn(std::move((*r)[0]));
        });
  };
  ask(*src_, src_dedup_cap_, [st, done](Result<json> r) mutable {
    st->first = std::move(r);
    done();
  });
  ask(*dst_, dst_dedup_cap_, [st, done](Result<json> r) mutable {
    st->second = std::move(r);
    done();
  });
}

void Job::backends_of(Endpoint& ep,
                      std::function<void(Result<std::vector<Backend>>)> fn) {
  Endpoint* e = &ep;
  seq(ep, {{"qom-list", json{{"path", "/objects"}}}},
      guard([this, e, fn](Result<std::vector<json>> r) {
        if (!r) return fn(r.error());
        std::vector<std::string> ids;
        const json& list = (*r)[0];
        if (list.is_array())
          for (const auto& p : list)
            if (json_string(p, "type").value_or("") ==
                "child<memory-backend-file>")
              if (auto n = json_string(p, "name"); n && n->size() <= 256)
                ids.push_back(*n);
        if (ids.size() > kMaxBackends)
          return fn(make_error(
              kRefused, "VM '" + e->name() + "' has " +
                            std::to_string(ids.size()) +
                            " file-backed memory backends; hostd checks at "
                            "most " +
                            std::to_string(kMaxBackends)));
        std::vector<Cmd> cmds;
        for (const auto& id : ids) {
          cmds.push_back({"qom-get", json{{"path", "/objects/" + id},
                                          {"property", "mem-path"}}});
          cmds.push_back({"qom-get", json{{"path", "/objects/" + id},
                                          {"property", "share"}}});
        }
        seq(*e, std::move(cmds),
            [ids, fn](Result<std::vector<json>> r) {
              if (!r) return fn(r.error());
              std::vector<Backend> out;
              for (size_t i = 0; i < ids.size(); i++) {
                const json& path = (*r)[2 * i];
                const json& share = (*r)[2 * i + 1];
                out.push_back(Backend{
                    ids[i], path.is_string() ? shorten(path.get<std::string>(), 4096) : "",
                    share.is_boolean() && share.get<bool>()});
              }
              fn(std::move(out));
            });
      }));
}

void Job::probe_backends() {
  auto st = std::make_shared<
      std::pair<std::optional<Result<std::vector<Backend>>>,
                std::optional<Result<std::vector<Backend>>>>>();
  auto done = guard([this, st] {
    if (!st->first || !st->second) return;
    if (!*st->first) return fail_prepare(st->first->error());
    if (!*st->second) return fail_prepare(st->second->error());
    std::string why = check_storage(**st->first, **st->second,
                                    s_.shared_storage, src_->name(),
                                    dst_->name(), dedup_);
    if (!why.empty()) return fail_prepare(make_error(kRefused, why));
    configure();
  });
  backends_of(*src_, [st, done](Result<std::vector<Backend>> r) mutable {
    st->first = std::move(r);
    done();
  });
  backends_of(*dst_, [st, done](Result<std::vector<Backend>> r) mutable {
    st->second = std::move(r);
    done();
  });
}

void Job::configure() {
  auto caps = [&](bool prefetch_known, bool dedup_known, bool rdma_known,
                  bool multifd_known) {
    json c = json::array();
    // disk-dedup needs the return path (a destination refuses a disk on
    // it); set before disk-dedup, which QEMU validates against it.
    if (dedup_) c.push_back({{"capability", "return-path"}, {"state", true}});
    if (dedup_known)
      c.push_back({{"capability", "disk-dedup"}, {"state", dedup_}});
    c.push_back({{"capability", "postcopy-ram"}, {"state", s_.postcopy}});
    if (multifd_known)
      c.push_back({{"capability", "multifd"},
                   {"state", s_.multifd_channels > 0}});
    c.push_back({{"capability", "x-ignore-shared"},
                 {"state", s_.shared_storage}});
    if (prefetch_known)
      c.push_back({{"capability", "postcopy-prefetch"},
                   {"state", s_.prefetch != "off"}});
    // After postcopy-ram, which QEMU checks it against.
    if (rdma_known)
      c.push_back({{"capability", "postcopy-rdma"},
                   {"state", s_.transport == "rdma"}});
    return json{{"capabilities", std::move(c)}};
  };
  std::vector<Cmd> dcmds = {
      {"migrate-set-capabilities",
       caps(dst_prefetch_, dst_dedup_cap_, dst_rdma_cap_,
            dst_multifd_cap_)}};
  std::vector<Cmd> scmds = {
      {"migrate-set-capabilities",
       caps(src_prefetch_, src_dedup_cap_, src_rdma_cap_,
            src_multifd_cap_)}};
  json sp = json::object();
  if (s_.multifd_channels) {
    dcmds.push_back({"migrate-set-parameters",
                     json{{"multifd-channels", s_.multifd_channels}}});
    sp["multifd-channels"] = s_.multifd_channels;
  }
  if (s_.prefetch != "off") {
    dcmds.push_back({"migrate-set-parameters",
                     json{{"postcopy-prefetch-mode", s_.prefetch}}});
    sp["postcopy-prefetch-mode"] = s_.prefetch;
  }
  if (s_.max_bandwidth) sp["max-bandwidth"] = *s_.max_bandwidth;
  if (s_.max_postcopy_bandwidth)
    sp["max-postcopy-bandwidth"] = *s_.max_postcopy_bandwidth;
  if (s_.downtime_limit_ms) sp["downtime-limit"] = *s_.downtime_limit_ms;
  if (!sp.empty()) scmds.push_back({"migrate-set-parameters", sp});

  // A QEMU that refuses a capability says why (stock QEMU: "Postcopy is
  // not supported: Host backend files need to be TMPFS or HUGETLBFS only").
  auto refused = [](Error e) {
    if (e.code == "qmp-error" &&
        e.message.find("migrate-set-capabilities") != std::string::npos)
      e.code = kUnsupported;
    else if (e.code == "qmp-error")
      e.code = kFailed;
    return e;
  };
  // The destination first: it refuses post-copy for what it cannot trap.
  seq(*dst_, dcmds,
      guard([this, scmds, refused](Result<std::vector<json>> r) {
        if (!r) return fail_prepare(refused(r.error()));
        seq(*src_, scmds, guard([this, refused](Result<std::vector<json>> r) {
              if (!r) return fail_prepare(refused(r.error()));
              begin();
            }));
      }));
}

void Job::begin() {
  if (cancel_requested_)
    return end(State::kCancelled,
               make_error(kCancelled, "migration of '" + src_->name() +
                                          "' cancelled before it began"),
               "cancelled before it began");
  auto failed = [](Error e) {
    if (e.code == "qmp-error") e.code = kFailed;
    return e;
  };
  if (s_.check_uri)
    if (auto why = s_.check_uri(s_.uri); !why.empty())
      return fail_prepare(make_error(kRefused, why));
  seq(*dst_, {{"migrate-incoming", json{{"uri", s_.uri}}}},
      guard([this, failed](Result<std::vector<json>> r) {
        if (!r) return fail_prepare(failed(r.error()));
        dest_uris_.insert(s_.uri);
        seq(*src_, {{"migrate", json{{"uri", s_.uri}}}},
            guard([this, failed](Result<std::vector<json>> r) {
              if (!r) return fail_prepare(failed(r.error()));
              state_ = State::kPrecopy;
              started_ = last_contact_ = Clock::now();
              emit("migrating '" + src_->name() + "' to '" + dst_->name() +
                   "' over " + s_.uri +
                   (s_.postcopy ? "; post-copy " + policy_.describe() +
                                      (s_.prefetch != "off"
                                           ? ", prefetch " + s_.prefetch
                                           : "") +
                                      (s_.transport == "rdma"
                                           ? ", faults by RDMA READ"
                                           : "")
                                : "; precopy only") +
                   (s_.multifd_channels
                        ? "; multifd, " +
                              std::to_string(s_.multifd_channels) +
                              " channels"
                        : "") +
                   (s_.shared_storage ? "; shared storage not sent" : "") +
                   (dedup_ ? "; disk dedup on: " + dedup_why_
                    : s_.disk_dedup == DedupMode::kAuto
                        ? "; disk dedup off: " + dedup_why_
                        : ""));
              if (cb_.on_started) cb_.on_started();
              arm_poll();
            }));
      }));
}

// -- following ----------------------------------------------------------------------

void Job::arm_poll() {
  loop_.cancel(poll_timer_);
  poll_timer_ = loop_.after(s_.interval, guard([this] {
                              poll_timer_ = 0;
                              poll();
                            }));
}

void Job::poll() {
  if (ended_ || finishing_) return;
  arm_poll();
  // The destination's answer only updates dest_status: during post-copy
  // its main loop can wait for a page, and the progress must go on.
  if (polling_dest_ && Clock::now() - dest_asked_ > s_.interval)
    dest_status_ = "not answering";  // not its last word: it is stuck now
  if (!polling_dest_) {
    polling_dest_ = true;
    dest_asked_ = Clock::now();
    seq(*dst_, {{"query-migrate", json()}},
        guard([this](Result<std::vector<json>> r) {
          polling_dest_ = false;
          if (r) {
            dest_status_ =
                shorten(json_string((*r)[0], "status").value_or("none"), 64);
            if (auto d = dedup_stats((*r)[0]); d.present) dedup_dst_ = d;
            absorb_rdma((*r)[0], true);
          }
          else
            dest_status_ = dst_->lost().empty() ? "unknown" : "lost";
        }));
  }
  if (polling_) return;
  polling_ = true;
  seq(*src_, {{"query-migrate", json()}},
      guard([this](Result<std::vector<json>> r) {
        polling_ = false;
        sample(r ? Result<json>(std::move((*r)[0])) : Result<json>(r.error()));
      }));
}

void Job::absorb(const json& info) {
  status_ = shorten(json_string(info, "status").value_or("none"), 64);
  auto now = Clock::now();
  const json* ram = json_field(info, "ram");
  if (ram && ram->is_object()) {
    uint64_t transferred = json_u64(*ram, "transferred").value_or(transferred_);
    if (have_sample_ && transferred >= transferred_ && now > last_sample_at_) {
      auto dt = duration_cast<milliseconds>(now - last_sample_at_).count();
      bytes_per_s_ = dt > 0 ? (transferred - transferred_) * 1000 /
                                  static_cast<uint64_t>(dt)
                            : bytes_per_s_;
    } else if (const json* mbps = json_field(*ram, "mbps");
               mbps && mbps->is_number() && mbps->get<double>() >= 0 &&
               mbps->get<double>() < 1e9) {
      bytes_per_s_ = static_cast<uint64_t>(mbps->get<double>() * 1e6 / 8);
    }
    transferred_ = transferred;
    remaining_ = json_u64(*ram, "remaining").value_or(remaining_);
    total_ = json_u64(*ram, "total").value_or(total_);
    pass_ = json_u64(*ram, "dirty-sync-count").value_or(pass_);
    postcopy_requests_ =
        json_u64(*ram, "postcopy-requests").value_or(postcopy_requests_);
    have_sample_ = true;
    last_sample_at_ = now;
  }
  if (auto d = dedup_stats(info); d.present) dedup_src_ = d;
  absorb_rdma(info, false);
  if (auto d = json_u64(info, "downtime")) downtime_ms_ = *d;
  if (auto t = json_u64(info, "total-time")) total_time_ms_ = *t;
}

void Job::sample(Result<json> src) {
  auto now = Clock::now();
  if (!src) {
    std::string lost = src_->lost();
    if (!lost.empty())
      return end(State::kFailed,
                 make_error(kFailed,
                            "lost the source VM '" + src_->name() + "' (" +
                                lost + ")" +
                                (switched_ ? " during post-copy: the guest "
                                             "cannot get its remaining pages"
                                           : "")),
                 "source lost");
    if (now - last_contact_ > s_.lost_contact)
      return end(State::kFailed,
                 make_error(kFailed,
                            "no answer from the source VM '" + src_->name() +
                                "' for " + seconds(now - last_contact_) +
                                " (" + src.error().message +
                                "): hostd stops following; QEMU's migration "
                                "may still run (query-migrate)"),
                 "no answer from the source");
    return emit("no answer from the source: " + src.error().message);
  }
  last_contact_ = now;
  absorb(*src);
  const json& info = *src;
  std::string qerr = shorten(json_string(info, "error-desc").value_or(""));
  if (resume_sent_ &&
      (status_ == "postcopy-active" || status_ == "completed")) {
    // The stream is back (it may even have finished within one interval).
    resume_sent_ = false;
    listen_uri_.clear();  // a later pause needs a new migrate-recover
    recoveries_++;
    next_backoff_ = s_.recover_backoff_min;
    emit("post-copy resumed (recovery " + std::to_string(recoveries_) + ")");
  }
  if ((status_ == "completed" || status_ == "failed") && !finishing_) {
    // The destination's own numbers (references resolved, mismatches)
    // once more, then the end.
    finishing_ = true;
    return with_dest_stats(guard([this, qerr, now] {
      if (status_ == "completed") {
        std::string how =
            switched_ ? "post-copy (" + switch_reason_ + "), " +
                            std::to_string(postcopy_requests_) +
                            " page requests"
                      : "precopy only";
        return end(State::kCompleted, std::nullopt,
                   "completed in " + seconds(now - started_) + ", " + how +
                       (downtime_ms_ ? ", downtime " +
                                           std::to_string(*downtime_ms_) + " ms"
                                     : "") +
                       dedup_summary() + rdma_summary());
      }
      std::string why = qerr.empty() ? "QEMU gave no reason" : qerr;
      end(State::kFailed,
          make_error(kFailed, "migration of '" + src_->name() + "' to '" +
                                  dst_->name() + "' failed: " + why +
                                  dedup_summary()),
          "failed: " + why + dedup_summary());
    }));
  }
  if (finishing_) return;
  if (status_ == "cancelled")
    return end(State::kCancelled,
               make_error(kCancelled, "migration of '" + src_->name() +
                                          "' was cancelled"),
               "cancelled");
  if (status_ == "postcopy-paused") {
    switched_ = true;
    resume_sent_ = false;
    on_paused(qerr);
    if (ended_) return;
  } else if (status_ == "postcopy-recover-setup" ||
             status_ == "postcopy-recover") {
    switched_ = true;
    if (state_ != State::kRecovering) state_ = State::kRecovering;
  } else if (status_ == "postcopy-active") {
    switched_ = true;
    state_ = State::kPostcopy;
  } else {
    if (state_ != State::kSwitching) state_ = State::kPrecopy;
    if (s_.postcopy && !switched_ && state_ == State::kPrecopy &&
        status_ == "active") {
      auto why = policy_.observe(
          Sample{pass_, remaining_,
                 duration_cast<milliseconds>(now - started_)});
      if (why) switch_now(*why, nullptr);
    }
  }
  emit("");
}

void Job::with_dest_stats(std::function<void()> then) {
  if (!dedup_ && s_.transport != "rdma") return then();
  auto fired = std::make_shared<bool>(false);
  auto once = [fired, then] {
    if (*fired) return;
    *fired = true;
    then();
  };
  dst_->command("query-migrate", json(), guard([this, once](Result<json> r) {
                  if (r) {
                    if (auto d = dedup_stats(*r); d.present) dedup_dst_ = d;
                    absorb_rdma(*r, true);
                  }
                  once();
                }));
  // A destination that does not answer does not hold up the end.
  loop_.after(std::min(s_.interval * 2, milliseconds(5000)), guard(once));
}

// query-migrate's "postcopy-rdma" of either QEMU: the source says whether
// RDMA is used and why not, the destination how many pages it read.  A
// change of the source's state is a progress message.
void Job::absorb_rdma(const json& info, bool dest) {
  if (s_.transport != "rdma") return;
  const json* r = json_field(info, "postcopy-rdma");
  if (!r || !r->is_object()) return;
  std::string status = shorten(json_string(*r, "status").value_or("?"), 32);
  std::string reason = shorten(json_string(*r, "reason").value_or(""), 200);
  if (dest) {
    rdma_dest_status_ = status;
    rdma_pages_read_ = json_u64(*r, "pages-read").value_or(rdma_pages_read_);
    return;
  }
  rdma_registered_ =
      json_u64(*r, "registered-bytes").value_or(rdma_registered_);
  if (status == rdma_status_ && reason == rdma_reason_) return;
  rdma_status_ = status;
  rdma_reason_ = reason;
  if (status == "active")
    emit("RDMA page fetch active: " + format_size(rdma_registered_) +
         " of the source's RAM registered");
  else if (status == "fallback" || status == "failed")
    emit("RDMA " + std::string(status == "failed" ? "failed" : "not used") +
         (reason.empty() ? "" : ": " + reason) +
         "; post-copy goes on over the migration stream");
}

std::string Job::rdma_summary() const {
  if (s_.transport != "rdma") return "";
  std::string why = rdma_reason_.empty() ? "" : ": " + rdma_reason_;
  if (rdma_status_ == "failed")
    return "; RDMA failed after " + std::to_string(rdma_pages_read_) +
           " pages read" + why + " (the rest went over the stream)";
  if (rdma_status_ == "fallback" || rdma_status_.empty() ||
      rdma_status_ == "none")
    return "; RDMA not used" + why + " (post-copy went over the stream)";
  return "; RDMA: the destination read " + std::to_string(rdma_pages_read_) +
         " pages by RDMA READ";
}

std::string Job::dedup_summary() const {
  if (!dedup_) return "";
  std::string out = "; disk dedup: " +
                    std::to_string(dedup_src_.pages_as_reference) +
                    " pages as references (" +
                    format_size(dedup_src_.bytes_saved) + " saved)";
  if (dedup_src_.images_refused > 0)
    out += ", the destination refused " +
           std::to_string(dedup_src_.images_refused) + " disk" +
           (dedup_src_.images_refused == 1 ? "" : "s") +
           (dedup_src_.refused_reason.empty()
                ? ""
                : " (" + dedup_src_.refused_reason + ")");
  out += ", the destination resolved " +
         std::to_string(dedup_dst_.references_resolved) + " " +
         dedup_read_text(dedup_dst_);
  if (dedup_dst_.mismatches || dedup_dst_.read_errors)
    out += ", " + std::to_string(dedup_dst_.mismatches) + " mismatches, " +
           std::to_string(dedup_dst_.read_errors) + " read errors";
  return out;
}

// -- post-copy: switch, pause, recovery -------------------------------------------------

void Job::switch_now(const std::string& why, ReplyFn fn) {
  auto refuse = [&](const std::string& msg) {
    if (fn) fn(make_error(kRefused, msg));
  };
  if (ended_) return refuse("the migration of '" + src_->name() + "' ended");
  if (!s_.postcopy)
    return refuse("the migration of '" + src_->name() +
                  "' was started without post-copy (--postcopy)");
  if (switched_ || state_ == State::kSwitching) {
    if (fn) fn(json{{"switching", true}, {"already", true},
                    {"reason", switch_reason_}});
    return;
  }
  if (state_ != State::kPrecopy)
    return refuse("the migration of '" + src_->name() + "' is " +
                  to_string(state_) + "; ask again once precopy runs");
  state_ = State::kSwitching;
  seq(*src_, {{"migrate-start-postcopy", json()}},
      guard([this, why, fn](Result<std::vector<json>> r) {
        if (!r) {
          if (state_ == State::kSwitching) state_ = State::kPrecopy;
          emit("the switch to post-copy failed: " + r.error().message);
          if (fn) {
            Error e = r.error();
            if (e.code == "qmp-error") e.code = kFailed;
            fn(e);
          }
          return;
        }
        switched_ = true;
        switch_reason_ = why;
        emit("switching to post-copy: " + why);
        if (fn) fn(json{{"switching", true}, {"already", false},
                        {"reason", why}});
      }));
}

void Job::cancel(ReplyFn fn) {
  if (ended_) {
    fn(make_error(kRefused, "the migration of '" + src_->name() + "' ended"));
    return;
  }
  if (state_ == State::kPreparing) {
    cancel_requested_ = true;
    fn(json{{"cancelling", true}});
    return;
  }
  if (state_ != State::kPrecopy)
    return fn(make_error(
        kRefused, "the migration of '" + src_->name() + "' is " +
                      to_string(state_) +
                      (switched_ ? ": the guest runs on '" + dst_->name() +
                                       "' already; a post-copy migration "
                                       "cannot be cancelled"
                                 : "; cannot cancel now")));
  seq(*src_, {{"migrate_cancel", json()}},
      guard([fn](Result<std::vector<json>> r) {
        if (!r) {
          Error e = r.error();
          if (e.code == "qmp-error") e.code = kFailed;
          return fn(e);
        }
        fn(json{{"cancelling", true}});
      }));
}

void Job::on_paused(const std::string& why) {
  if (recovering_now_) return;  // an attempt is under way
  if (!why.empty()) paused_reason_ = why;
  if (!dst_->lost().empty())
    return end(State::kFailed,
               make_error(kFailed,
                          "the destination VM '" + dst_->name() + "' is lost (" +
                              dst_->lost() +
                              ") during post-copy: the guest cannot run on, "
                              "its state was handed to the destination"),
               "destination lost during post-copy");
  state_ = State::kPaused;
  if (recover_timer_) return;  // the next attempt is scheduled
  std::string reason = paused_reason_.empty() ? "connection lost" : paused_reason_;
  if (attempts_left_ == 0)
    return end(State::kPaused,
               make_error(kPaused,
                          "post-copy of '" + src_->name() + "' to '" +
                              dst_->name() + "' paused (" + reason +
                              "): the guest runs on '" + dst_->name() +
                              "' and waits for its pages; recover with "
                              "kvmx-hostctl migrate-recover vm=" +
                              src_->name() + " dest=" + dst_->name()),
               "paused: " + reason);
  auto delay = next_backoff_;
  next_backoff_ = std::min(next_backoff_ * 2, s_.recover_backoff_max);
  emit("post-copy paused (" + reason + "); recovery attempt " +
         std::to_string(attempt_ + 1) + " in " + seconds(delay) + " (" +
         std::to_string(attempts_left_) + " left)");
  recover_timer_ = loop_.after(delay, guard([this] {
                                 recover_timer_ = 0;
                                 if (attempts_left_ > 0) attempts_left_--;
                                 try_recover(Clock::now() + s_.dest_pause_wait);
                               }));
}

void Job::try_recover(Clock::time_point dest_deadline) {
  recovering_now_ = true;
  attempt_++;
  state_ = State::kRecovering;
  if (listen_uri_.empty()) return listen_and_resume(dest_deadline);
  // The destination listened in an earlier attempt and may still: the
  // source tries that first.
  resume(listen_uri_, [this, dest_deadline](const std::string&) {
    listen_uri_.clear();
    listen_and_resume(dest_deadline);
  });
}

// Nothing in-band from the destination here: a paused post-copy
// destination may not answer anything but out-of-band commands.
void Job::listen_and_resume(Clock::time_point dest_deadline) {
  const std::string uri = s_.recover_uri;
  if (s_.check_uri && !dest_uris_.count(uri))
    if (auto why = s_.check_uri(uri); !why.empty()) return recover_failed(why);
  dst_->command(
      "migrate-recover", json{{"uri", uri}},
      guard([this, uri, dest_deadline](Result<json> r) {
        if (!r) {
          std::string msg = qemu_text(r.error());
          if (msg.find("only be run when postcopy is paused") !=
                  std::string::npos &&
              Clock::now() < dest_deadline) {
            // The destination has not noticed the broken stream yet.
            recover_timer_ = loop_.after(
                s_.interval, guard([this, dest_deadline] {
                  recover_timer_ = 0;
                  listen_and_resume(dest_deadline);
                }));
            return;
          }
          return recover_failed("VM '" + dst_->name() + "': migrate-recover: " +
                                msg);
        }
        listen_uri_ = uri;
        dest_uris_.insert(uri);
        resume(uri, [this](const std::string& err) { recover_failed(err); });
      }),
      true);
}

void Job::resume(const std::string& uri,
                 std::function<void(const std::string&)> failed) {
  seq(*src_, {{"migrate", json{{"uri", uri}, {"resume", true}}}},
      guard([this, uri, failed](Result<std::vector<json>> r) {
        if (!r) return failed(r.error().message);
        recovering_now_ = false;
        resume_sent_ = true;
        emit("recovering: '" + dst_->name() + "' listens on " + uri + ", '" +
             src_->name() + "' resumed");
        if (cb_.on_started) cb_.on_started();
      }));
}

void Job::recover_failed(const std::string& why) {
  recovering_now_ = false;
  if (!dst_->lost().empty()) return on_paused("");  // ends it, saying why
  paused_reason_ = "recovery attempt " + std::to_string(attempt_) +
                   " failed: " + why;
  emit(paused_reason_);
  state_ = State::kPaused;
  on_paused("");
}

Result<void> Job::recover(const std::string& uri) {
  if (!uri.empty()) s_.recover_uri = uri;
  if (!begun_) {
    // A job made for a migration hostd does not follow: QEMU must have
    // paused it.
    begun_ = true;
    started_ = last_contact_ = Clock::now();
    s_.postcopy = true;
    switched_ = true;
    switch_reason_ = "before hostd followed this migration";
    emit("checking '" + src_->name() + "' and '" + dst_->name() + "'");
    seq(*src_, {{"query-migrate", json()}},
        guard([this](Result<std::vector<json>> r) {
          if (!r) return fail_prepare(r.error());
          absorb((*r)[0]);
          if (status_ != "postcopy-paused")
            return fail_prepare(make_error(
                kRefused, "VM '" + src_->name() +
                              "' has no paused post-copy migration (QEMU's "
                              "status '" +
                              status_ + "')"));
          paused_reason_ = shorten(json_string((*r)[0], "error-desc").value_or(""));
          state_ = State::kPaused;
          try_recover(Clock::now() + s_.dest_pause_wait);
          arm_poll();
        }));
    return {};
  }
  if (ended_ && state_ == State::kPaused) {
    ended_ = false;
    error_.reset();
    gen_++;
    attempts_left_ = 0;
    next_backoff_ = s_.recover_backoff_min;
    try_recover(Clock::now() + s_.dest_pause_wait);
    arm_poll();
    return {};
  }
  if (!ended_ && state_ == State::kPaused && !recovering_now_) {
    loop_.cancel(recover_timer_);
    recover_timer_ = 0;
    try_recover(Clock::now() + s_.dest_pause_wait);
    return {};
  }
  return make_error(kRefused, "the migration of '" + src_->name() + "' is " +
                                  std::string(to_string(state_)) +
                                  (recovering_now_ ? " (recovering)" : "") +
                                  ", not paused");
}

// -- the end and events ------------------------------------------------------------------

void Job::end(State s, std::optional<Error> error, const std::string& message) {
  if (ended_) return;
  ended_ = true;
  state_ = s;
  error_ = std::move(error);
  recovering_now_ = false;
  gen_++;  // callbacks in flight are stale now
  loop_.cancel(poll_timer_);
  loop_.cancel(recover_timer_);
  poll_timer_ = recover_timer_ = 0;
  polling_ = polling_dest_ = false;
  log::info("Migration ended",
            {{"vm", src_->name()}, {"dest", dst_->name()},
             {"state", to_string(s)},
             {"error", error_ ? error_->message : ""}});
  emit(message);
  if (cb_.on_end) cb_.on_end();
}

void Job::emit(const std::string& message) {
  if (!cb_.on_event) return;
  json e = snapshot();
  e["event"] = "migration";
  e["message"] = message;
  cb_.on_event(e);
}

Result<json> Job::outcome() const {
  if (state_ == State::kCompleted || !error_) return snapshot();
  return *error_;
}

json Job::snapshot() const {
  auto elapsed = duration_cast<milliseconds>(Clock::now() - started_).count();
  json j = {{"vm", src_->name()},
            {"dest", dst_->name()},
            {"uri", s_.uri},
            {"postcopy", s_.postcopy},
            {"prefetch", s_.prefetch},
            {"shared_storage", s_.shared_storage},
            {"switch_policy", s_.postcopy ? policy_.describe() : "none"},
            {"state", to_string(state_)},
            {"ended", ended_},
            {"status", status_},
            {"dest_status", dest_status_},
            {"pass", pass_},
            {"remaining", remaining_},
            {"transferred", transferred_},
            {"total", total_},
            {"bytes_per_s", bytes_per_s_},
            {"elapsed_ms", elapsed},
            {"postcopy_requests", postcopy_requests_},
            {"switched", switched_},
            {"switch_reason", switch_reason_},
            {"recoveries", recoveries_},
            {"recover_attempts_left", attempts_left_},
            {"error", error_ ? error_->message : ""}};
  j["transport"] = s_.transport;
  if (s_.transport == "rdma")
    j["rdma"] = {{"status", rdma_status_},
                 {"reason", rdma_reason_},
                 {"dest_status", rdma_dest_status_},
                 {"registered", rdma_registered_},
                 {"pages_read", rdma_pages_read_}};
  j["disk_dedup"] = to_string(s_.disk_dedup);
  j["dedup"] = dedup_;
  j["dedup_reason"] = dedup_why_;
  if (dedup_)
    j["dedup_stats"] = {
        {"pages_as_reference", dedup_src_.pages_as_reference},
        {"bytes_saved", dedup_src_.bytes_saved},
        {"images_refused", dedup_src_.images_refused},
        {"refused_reason", dedup_src_.refused_reason},
        {"references_resolved", dedup_dst_.references_resolved},
        {"mismatches", dedup_dst_.mismatches},
        {"read_errors", dedup_dst_.read_errors},
        {"read_time_ms", dedup_dst_.read_time_ms},
        {"disk_reads", dedup_dst_.disk_reads}};
  j["downtime_ms"] = downtime_ms_ ? json(*downtime_ms_) : json(nullptr);
  j["total_time_ms"] = total_time_ms_ ? json(*total_time_ms_) : json(nullptr);
  return j;
}

}  // namespace kvmx::migrate
