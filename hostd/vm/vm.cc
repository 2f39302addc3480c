#include "vm.h"

#include "common/crash_guard.h"
#include "common/json_util.h"
#include "common/log.h"
#include "common/time_util.h"
#include "common/unix_socket.h"

namespace kvmx::vm {

using nlohmann::json;

const char* to_string(State s) {
  switch (s) {
    case State::kConnecting: return "connecting";
    case State::kAttached: return "attached";
    case State::kDisconnected: return "disconnected";
    case State::kGone: return "gone";
    case State::kStopped: return "stopped";
    case State::kQuarantined: return "quarantined";
  }
  return "?";
}

const char* to_string(Source s) {
  switch (s) {
    case Source::kQmp: return "qmp";
    case Source::kLibvirt: return "libvirt";
  }
  return "?";
}

// -- Vm -----------------------------------------------------------------------

Vm::Vm(EventLoop& loop, std::string name, const Hooks& hooks, State initial)
    : loop_(loop), name_(std::move(name)), hooks_(hooks), state_(initial),
      since_(now_utc()) {}

void Vm::set_state(State s, std::string error) {
  State old = state_;
  if (!error.empty()) last_error_ = std::move(error);
  if (s == old) return;
  state_ = s;
  since_ = now_utc();
  if (hooks_.on_state) hooks_.on_state(*this, old);
}

void Vm::deliver(const qmp::Event& ev) {
  if (ev.name == "KVMX_CHAN_REJECTED") rejected_++;
  if (hooks_.on_event) hooks_.on_event(*this, ev);
}

void Vm::keep_devices(json&& answer) {
  devices_error_.clear();
  if (!answer.is_array()) {
    devices_ = json::array();
    return;
  }
  size_t bytes = json_dump(answer).size();
  if (bytes > max_devices_bytes) {
    devices_ = nullptr;
    devices_error_ = "query-kvmx-chan answered " + std::to_string(bytes) +
                     " bytes, over max-devices-bytes (" +
                     std::to_string(max_devices_bytes) + ")";
    log::warn("Not keeping a VM's device list: too large",
              {{"vm", name_}, {"bytes", bytes},
               {"max_devices_bytes", max_devices_bytes}});
    return;
  }
  devices_ = std::move(answer);
}

Result<json> Vm::bound_answer(Result<json>&& r) const {
  if (!r) return std::move(r);
  size_t bytes = json_dump(*r).size();
  if (bytes > max_devices_bytes)
    return make_error("response-too-large",
                      "query-kvmx-chan answered " + std::to_string(bytes) +
                          " bytes, over max-devices-bytes (" +
                          std::to_string(max_devices_bytes) + ")");
  return std::move(r);
}

json Vm::info() const {
  return json{{"vm", name_},
              {"source", to_string(source())},
              {"state", to_string(state_)},
              {"since", since_},
              {"qemu", qemu_version_},
              {"devices", devices_},
              {"devices_error", devices_error_},
              {"reconnects", reconnects()},
              {"rejected", rejected_},
              {"last_error", last_error_}};
}

// -- QmpVm --------------------------------------------------------------------

QmpVm::QmpVm(EventLoop& loop, std::string name, std::string qmp_path,
             const Options& options, const Hooks& hooks)
    : Vm(loop, std::move(name), hooks, State::kConnecting),
      path_(std::move(qmp_path)), options_(options),
      backoff_(options.backoff_min, options.backoff_max) {}

QmpVm::~QmpVm() {
  destroying_ = true;
  loop_.cancel(handshake_timer_);
  loop_.cancel(retry_timer_);
  // Fails pending queries (their callbacks answer API clients); on_closed
  // returns early because destroying_ is set.
  if (conn_) conn_->client->close("VM detached");
  settle(Settled{Settled::kRemoved, "VM '" + name_ + "' was detached"});
}

bool QmpVm::ready() const {
  return conn_ && conn_->client->state() == qmp::Client::State::kReady;
}

uint64_t QmpVm::protocol_errors() const {
  return old_protocol_errors_ + (conn_ ? conn_->client->protocol_errors() : 0);
}

void QmpVm::start(UniqueFd fd) {
  if (fd)
    open(std::move(fd));
  else
    connect_now();
}

void QmpVm::set_input_paused(bool paused) {
  input_paused_ = paused;
  if (conn_) conn_->transport->set_paused(paused);
}

void QmpVm::quarantine(const std::string& why) {
  loop_.cancel(retry_timer_);
  retry_timer_ = 0;
  set_state(State::kQuarantined, why);
}

void QmpVm::reconnect_now() {
  if (conn_) return;  // connecting or attached
  backoff_.reset();
  connect_now();
}

void QmpVm::connect_now() {
  loop_.cancel(retry_timer_);
  retry_timer_ = 0;
  auto fd = unix_connect(path_);
  if (!fd) {
    connect_errno_ = fd.error().err;
    if (fd.error().err == ENOENT) {
      set_state(State::kGone, "QMP socket '" + path_ + "' no longer exists");
      settle(Settled{Settled::kFailed, last_error_});
      return;
    }
    set_state(State::kDisconnected, fd.error().message);
    settle(Settled{Settled::kFailed, last_error_});
    schedule_retry();
    return;
  }
  open(std::move(*fd));
}

void QmpVm::open(UniqueFd fd) {
  uint64_t gen = ++gen_;
  connect_errno_ = 0;
  conn_ = std::make_unique<Conn>();
  conn_->transport = std::make_unique<qmp::UnixTransport>(loop_, std::move(fd));
  if (hooks_.on_connecting) hooks_.on_connecting(*this);
  qmp::Client::Callbacks cb;
  cb.on_ready = [this, gen] { on_ready(gen); };
  cb.on_event = [this, gen](const qmp::Event& ev) {
    if (gen != gen_ || destroying_) return;
    deliver(ev);
  };
  cb.on_closed = [this, gen](const std::string& reason) {
    on_closed(gen, reason);
  };
  conn_->client = std::make_unique<qmp::Client>(
      *conn_->transport, cb, options_.max_qmp_message);
  // A post-copy destination's main loop may wait for a page: what must
  // still get through then (migrate-recover) goes out of band.
  conn_->client->want_oob(true);
  qmp::Client* client = conn_->client.get();
  auto started = conn_->transport->start(
      [this, client](std::string_view data) {
        // Should the peer's input crash hostd, the crash handler marks
        // this VM quarantined in the journal (common/crash_guard.h).
        crash::Scope scope(name_);
        client->on_data(data);
      },
      [client](const std::string& reason) { client->on_eof(reason); });
  if (!started) {
    client->close(started.error().message);
    return;
  }
  if (input_paused_) conn_->transport->set_paused(true);
  set_state(State::kConnecting);
  handshake_timer_ = loop_.after(options_.handshake_timeout, [this, gen] {
    handshake_timer_ = 0;
    if (gen != gen_ || !conn_) return;
    conn_->client->close("no QMP handshake within " +
                         std::to_string(options_.handshake_timeout.count()) +
                         " ms (another client holds the socket?)");
  });
}

void QmpVm::on_ready(uint64_t gen) {
  if (gen != gen_ || destroying_ || !conn_) return;
  qemu_version_ = conn_->client->qemu_version();
  auto sent = conn_->client->execute(
      "query-kvmx-chan", json(), [this, gen](Result<json> r) {
        if (gen != gen_ || destroying_) return;
        if (!r && r.error().code == "qmp-disconnected") return;  // on_closed
        if (r) {
          keep_devices(std::move(*r));
        } else {
          devices_ = nullptr;
          log::warn("QEMU does not answer query-kvmx-chan; attached without "
                    "device information",
                    {{"vm", name_}, {"error", r.error().message}});
        }
        loop_.cancel(handshake_timer_);
        handshake_timer_ = 0;
        connects_++;
        backoff_.reset();
        set_state(State::kAttached);
        settle(Settled{Settled::kAttached, ""});
      });
  if (!sent) conn_->client->close(sent.error().message);
}

void QmpVm::on_closed(uint64_t gen, const std::string& reason) {
  if (gen != gen_ || destroying_) return;
  loop_.cancel(handshake_timer_);
  handshake_timer_ = 0;
  retire_conn();
  set_state(State::kDisconnected, reason);
  settle(Settled{Settled::kFailed, reason});
  schedule_retry();
}

void QmpVm::retire_conn() {
  if (!conn_) return;
  old_protocol_errors_ += conn_->client->protocol_errors();
  // We may be inside the connection's own callbacks: destroy it later.
  std::shared_ptr<Conn> dead(std::move(conn_));
  loop_.defer([dead] {});
}

void QmpVm::schedule_retry() {
  if (state_ == State::kGone) return;
  loop_.cancel(retry_timer_);
  auto delay = backoff_.next();
  retry_timer_ = loop_.after(delay, [this] {
    retry_timer_ = 0;
    connect_now();
  });
}

void QmpVm::settle(const Settled& result) {
  if (waiters_.empty()) return;
  auto waiters = std::move(waiters_);
  waiters_.clear();
  for (auto& w : waiters) {
    loop_.cancel(w.timer);
    // Deferred: a waiter may remove this VM.
    loop_.defer([fn = std::move(w.fn), result] { fn(result); });
  }
}

void QmpVm::when_settled(std::chrono::milliseconds timeout,
                      std::function<void(const Settled&)> fn) {
  if (state_ == State::kAttached) {
    loop_.defer([fn = std::move(fn)] { fn(Settled{Settled::kAttached, ""}); });
    return;
  }
  uint64_t id = next_waiter_++;
  auto timer = loop_.after(timeout, [this, id] {
    for (auto it = waiters_.begin(); it != waiters_.end(); ++it) {
      if (it->id != id) continue;
      auto w = std::move(*it);
      waiters_.erase(it);
      w.fn(Settled{Settled::kTimeout, "not attached yet"});
      return;
    }
  });
  waiters_.push_back(Waiter{id, timer, std::move(fn)});
}

void QmpVm::query_protections(std::function<void(Result<json>)> fn) {
  execute("query-kvmx-chan", json(),
          [this, fn = std::move(fn)](Result<json> r) {
            fn(bound_answer(std::move(r)));
          });
}

void QmpVm::execute(const std::string& command, const json& arguments,
                    std::function<void(Result<json>)> fn, bool oob) {
  if (state_ != State::kAttached || !ready()) {
    fn(make_error("vm-not-connected", "VM '" + name_ + "' is " +
                                          to_string(state_) +
                                          ", not attached"));
    return;
  }
  struct Pending {
    bool done = false;
    EventLoop::TimerId timer = 0;
    std::function<void(Result<json>)> fn;
  };
  auto p = std::make_shared<Pending>();
  p->fn = std::move(fn);
  qmp::Client* client = conn_->client.get();
  auto id = client->execute(command, arguments, [this, p](Result<json> r) {
    if (p->done) return;
    p->done = true;
    loop_.cancel(p->timer);
    if (!r && r.error().code == "qmp-disconnected")
      p->fn(make_error("vm-not-connected", r.error().message));
    else
      p->fn(std::move(r));
  }, oob);
  if (!id) {
    p->fn(make_error("vm-not-connected", id.error().message));
    return;
  }
  uint64_t gen = gen_;
  p->timer = loop_.after(
      options_.command_timeout, [this, p, gen, id = *id, command] {
        if (p->done) return;
        p->done = true;
        if (gen == gen_ && conn_) conn_->client->cancel(id);
        p->fn(make_error("timeout", "QEMU did not answer " + command +
                                        " within " +
                                        std::to_string(
                                            options_.command_timeout.count()) +
                                        " ms"));
      });
}

json QmpVm::info() const {
  json j = Vm::info();
  j["qmp"] = path_;
  return j;
}

}  // namespace kvmx::vm
