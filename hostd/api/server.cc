#include "server.h"

#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>

#include "common/json_util.h"
#include "common/log.h"
#include "common/unix_socket.h"

namespace kvmx::api {

using nlohmann::json;

Server::Server(EventLoop& loop, Limits limits, Handler handler)
    : loop_(loop), limits_(limits), handler_(std::move(handler)) {}

Server::~Server() { shutdown(); }

Result<void> Server::listen(const std::string& path, unsigned mode) {
  auto fd = unix_listen(path, mode);
  if (!fd) return fd.error();
  if (auto r = loop_.add(fd->get(), EPOLLIN, [this](uint32_t) { on_accept(); });
      !r)
    return r;
  listen_fd_ = std::move(*fd);
  path_ = path;
  return {};
}

void Server::shutdown() {
  if (listen_fd_) {
    loop_.remove(listen_fd_.get());
    listen_fd_.reset();
    ::unlink(path_.c_str());
  }
  loop_.cancel(idle_timer_);
  idle_timer_ = 0;
  for (auto& [id, c] : clients_) {
    if (c->dead || !c->fd) continue;
    if (c->session.busy) {
      // Its answer will never come: say why instead of a bare EOF.
      c->session.busy = false;
      c->session.enqueue(
          json_dump(error_response(
              c->inflight_id, make_error(code::kShuttingDown,
                                         "kvmx-hostd is shutting down"))),
          false);
      while (c->session.has_output()) {
        auto data = c->session.front_output();
        ssize_t n = ::send(c->fd.get(), data.data(), data.size(),
                           MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n <= 0) break;
        c->session.consume_output(static_cast<size_t>(n));
      }
    }
    loop_.remove(c->fd.get());
  }
  clients_.clear();
}

void Server::arm_idle_timer() {
  if (idle_timer_ || limits_.idle_timeout.count() <= 0 || clients_.empty())
    return;
  auto period = std::max(limits_.idle_timeout / 4, std::chrono::milliseconds(20));
  idle_timer_ = loop_.after(period, [this] {
    idle_timer_ = 0;
    close_idle();
    arm_idle_timer();
  });
}

void Server::close_idle() {
  auto now = std::chrono::steady_clock::now();
  for (auto& [id, c] : clients_) {
    if (c->dead || c->session.subscribed || c->session.busy ||
        c->session.closing)
      continue;
    if (now - c->last_active < limits_.idle_timeout) continue;
    stats_.clients_idle_closed++;
    log::debug("Closing an idle API client", {{"client", c->id}, {"pid", c->pid}});
    c->session.enqueue(
        json_dump(error_response(
            nullptr,
            make_error(code::kIdleTimeout,
                       "no request for " +
                           std::to_string(limits_.idle_timeout.count()) +
                           " ms; closing the connection"))),
        false);
    c->session.closing = true;
    flush(*c);
    if (!c->dead) drop(*c, "idle");  // unsent output is not waited for
  }
}

size_t Server::clients() const {
  // Clients dropped this round are erased after it: they hold no slot.
  size_t n = 0;
  for (const auto& [id, c] : clients_) n += c->dead ? 0 : 1;
  return n;
}

size_t Server::subscribers() const {
  size_t n = 0;
  for (const auto& [id, c] : clients_)
    n += (!c->dead && c->session.subscribed) ? 1 : 0;
  return n;
}

Server::Client* Server::find(ClientId id) {
  auto it = clients_.find(id);
  if (it == clients_.end() || it->second->dead) return nullptr;
  return it->second.get();
}

void Server::on_accept() {
  for (;;) {
    UniqueFd fd(::accept4(listen_fd_.get(), nullptr, nullptr,
                          SOCK_NONBLOCK | SOCK_CLOEXEC));
    if (!fd) {
      if (errno == EINTR || errno == ECONNABORTED) continue;
      if (errno != EAGAIN)
        log::warn("Failed to accept an API client",
                  {{"error", std::strerror(errno)}});
      return;
    }
    if (clients() >= limits_.max_clients) {
      stats_.clients_refused++;
      std::string line =
          json_dump(error_response(
              nullptr, make_error(code::kTooManyClients,
                                  "hostd serves at most " +
                                      std::to_string(limits_.max_clients) +
                                      " clients"))) +
          "\n";
      (void)!::send(fd.get(), line.data(), line.size(),
                    MSG_NOSIGNAL | MSG_DONTWAIT);
      log::warn("Refused an API client: too many clients",
                {{"max_clients", limits_.max_clients}});
      continue;
    }
    auto c = std::make_unique<Client>(
        Client{next_id_++, std::move(fd), Session(limits_.session)});
    ucred cred{};
    socklen_t len = sizeof(cred);
    if (::getsockopt(c->fd.get(), SOL_SOCKET, SO_PEERCRED, &cred, &len) == 0) {
      c->pid = cred.pid;
      c->uid = cred.uid;
    }
    ClientId id = c->id;
    auto r = loop_.add(c->fd.get(), EPOLLIN,
                       [this, id](uint32_t ev) { on_client(id, ev); });
    if (!r) {
      log::warn("Failed to watch an API client", {{"error", r.error().message}});
      continue;
    }
    stats_.clients_total++;
    c->last_active = std::chrono::steady_clock::now();
    log::debug("API client connected",
               {{"client", id}, {"pid", c->pid}, {"uid", c->uid}});
    clients_.emplace(id, std::move(c));
    arm_idle_timer();
  }
}

void Server::on_client(ClientId id, uint32_t events) {
  Client* c = find(id);
  if (!c) return;
  if (events & EPOLLERR) {
    drop(*c, "socket error");
    return;
  }
  bool hangup = events & EPOLLHUP;  // the peer closed both directions
  if (events & (EPOLLIN | EPOLLHUP)) {
    // One read per wakeup keeps clients fair; after a hangup, read what is
    // left (a bounded amount).
    for (int i = 0; i < (hangup ? 8 : 1); i++) {
      char buf[65536];
      ssize_t n = ::read(c->fd.get(), buf, sizeof(buf));
      if (n > 0) {
        c->last_active = std::chrono::steady_clock::now();
        c->session.feed(std::string_view(buf, static_cast<size_t>(n)));
      } else if (n == 0) {
        c->session.feed_eof();
        break;
      } else if (errno == EAGAIN || errno == EINTR) {
        break;
      } else {
        drop(*c, "read failed");
        return;
      }
    }
  }
  if (hangup) {
    // Nobody will read the responses, but the requests that arrived are
    // taken (up to the first asynchronous op) before letting go.
    if (c->session.eof()) pump(*c);
    drop(*c, "hung up");
    return;
  }
  if (events & EPOLLOUT) flush(*c);
  if (!c->dead) pump(*c);
}

void Server::pump(Client& c) {
  if (c.dead || c.in_pump) return;
  c.in_pump = true;
  for (;;) {
    dispatch(c);
    if (c.dead) break;
    flush(c);
    if (c.dead) break;
    // Dispatching stopped at pause_output with lines still buffered, and
    // flush() made room: take them now.  Their bytes are already read, so
    // no epoll event would come for them (update() would leave the
    // interest empty and the client would stall for good).
    if (!c.session.can_dispatch() || !c.session.maybe_line()) break;
  }
  c.in_pump = false;
  if (!c.dead) update(c);
}

void Server::dispatch(Client& c) {
  while (!c.dead && c.session.can_dispatch()) {
    Session::Item item = c.session.next();
    if (item.kind == Session::Kind::kNone) break;
    stats_.requests++;
    if (item.kind == Session::Kind::kTooLong) {
      stats_.requests_rejected++;
      c.session.enqueue(
          json_dump(error_response(
              nullptr,
              make_error(code::kLineTooLong,
                         "request line over " +
                             std::to_string(limits_.session.max_line) +
                             " bytes; closing the connection"))),
          false);
      c.session.closing = true;
      log::warn("Closing an API client: request line too long",
                {{"client", c.id}, {"pid", c.pid}});
      break;
    }
    json id;
    auto req = parse_request(item.line, &id);
    if (!req) {
      stats_.requests_rejected++;
      log::debug("Rejected a malformed request",
                 {{"client", c.id}, {"code", req.error().code},
                  {"error", req.error().message}});
      c.session.enqueue(json_dump(error_response(id, req.error())), false);
      continue;
    }
    c.session.busy = true;
    c.inflight_id = req->id;
    ClientId cid = c.id;
    std::weak_ptr<bool> alive = alive_;
    json req_id = req->id;
    handler_(cid, *req, [this, alive, cid, req_id](Result<json> result) {
      if (alive.expired()) return;
      reply(cid, req_id, std::move(result));
    });
  }
}

void Server::reply(ClientId id, const json& req_id, Result<json> result) {
  Client* c = find(id);
  if (!c) return;
  c->session.busy = false;
  c->inflight_id = nullptr;
  c->last_active = std::chrono::steady_clock::now();
  if (result) {
    c->session.enqueue(json_dump(ok_response(req_id, std::move(*result))),
                       false);
  } else {
    stats_.requests_failed++;
    c->session.enqueue(json_dump(error_response(req_id, result.error())),
                       false);
  }
  if (!c->in_pump) pump(*c);
}

void Server::flush(Client& c) {
  while (c.session.has_output()) {
    auto data = c.session.front_output();
    ssize_t n = ::send(c.fd.get(), data.data(), data.size(),
                       MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n < 0) {
      if (errno == EAGAIN || errno == EINTR) break;
      drop(c, "write failed");
      return;
    }
    c.session.consume_output(static_cast<size_t>(n));
  }
  if (c.session.has_output()) return;
  bool done = c.session.closing ||
              (c.session.input_done() && !c.session.busy &&
               !c.session.subscribed);
  if (done) drop(c, "done");
}

void Server::update(Client& c) {
  uint32_t ev = (c.session.wants_read() ? EPOLLIN : 0u) |
                (c.session.has_output() ? EPOLLOUT : 0u);
  (void)loop_.modify(c.fd.get(), ev);
}

void Server::drop(Client& c, const char* reason) {
  if (c.dead) return;
  c.dead = true;
  log::debug("API client disconnected", {{"client", c.id}, {"reason", reason}});
  loop_.remove(c.fd.get());
  c.fd.reset();
  ClientId id = c.id;
  loop_.defer([this, id, alive = std::weak_ptr<bool>(alive_)] {
    if (!alive.expired()) clients_.erase(id);
  });
}

void Server::subscribe(ClientId id) {
  if (Client* c = find(id)) c->session.subscribed = true;
}

bool Server::notify(ClientId id, const json& event) {
  Client* c = find(id);
  if (!c) return false;
  if (c->session.subscribed) return true;
  if (!c->session.enqueue(json_dump(event), true)) {
    stats_.clients_dropped_slow++;
    log::warn("Dropped a client that does not read its progress events",
              {{"client", c->id}, {"pid", c->pid},
               {"queued_bytes", c->session.output_bytes()}});
    drop(*c, "output queue over limit");
    return false;
  }
  if (!c->in_pump) {
    flush(*c);
    if (!c->dead) update(*c);
  }
  return !c->dead;
}

void Server::broadcast(const json& event) {
  std::string line = json_dump(event);
  for (auto& [id, c] : clients_) {
    if (c->dead || !c->session.subscribed) continue;
    if (!c->session.enqueue(line, true)) {
      stats_.clients_dropped_slow++;
      log::warn("Dropped a subscriber that does not keep up",
                {{"client", c->id}, {"pid", c->pid},
                 {"queued_bytes", c->session.output_bytes()}});
      drop(*c, "output queue over limit");
      continue;
    }
    flush(*c);
    if (!c->dead) update(*c);
  }
}

}  // namespace kvmx::api
