// The Unix-socket API server: accepts clients (up to a limit), frames and
// parses their requests, hands valid ones to the handler, writes responses
// in request order and broadcasts events to subscribers.  Malformed input is
// answered with an error and counted; it never stops the server.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>

#include <nlohmann/json.hpp>

#include "common/fd.h"
#include "common/result.h"
#include "loop/event_loop.h"
#include "request.h"
#include "session.h"

namespace kvmx::api {

using ClientId = uint64_t;
// Completes a request: a result object, or an Error (its code goes on the
// wire).  Call exactly once; calls after the client left are ignored.
using ReplyFn = std::function<void(Result<nlohmann::json>)>;
using Handler = std::function<void(ClientId, const Request&, ReplyFn)>;

struct ServerStats {
  uint64_t clients_total = 0;         // accepted
  uint64_t clients_refused = 0;       // over max_clients
  uint64_t clients_dropped_slow = 0;  // subscriber queue over the limit
  uint64_t requests = 0;              // lines received
  uint64_t requests_rejected = 0;     // malformed: parse, invalid, unknown op,
                                      // too long
  uint64_t requests_failed = 0;       // valid, answered with an error
  uint64_t clients_idle_closed = 0;   // closed by the idle timeout
};

class Server {
 public:
  struct Limits {
    size_t max_clients = 64;
    Session::Limits session;
    // A client with no request in flight, not subscribed, that sends
    // nothing for this long is sent idle-timeout and closed; 0: never.
    std::chrono::milliseconds idle_timeout{0};
  };

  Server(EventLoop& loop, Limits limits, Handler handler);
  ~Server();
  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;

  // Creates the socket at `path` (replacing a stale one) and accepts.
  Result<void> listen(const std::string& path, unsigned mode);
  // Stops accepting, answers each client's request in flight with
  // shutting-down (as far as its socket takes it without blocking), closes
  // every client, removes the socket file.
  void shutdown();

  void subscribe(ClientId id);
  // Sends `event` to every subscriber; drops those that cannot keep up.
  void broadcast(const nlohmann::json& event);
  // Sends `event` to one client, before the response to its request in
  // flight (a migration's progress).  Subscribers are skipped: broadcast()
  // gives it to them.  False when the client is gone (or was dropped now,
  // for not keeping up).
  bool notify(ClientId id, const nlohmann::json& event);

  size_t clients() const;
  size_t subscribers() const;
  const ServerStats& stats() const { return stats_; }

 private:
  struct Client {
    ClientId id;
    UniqueFd fd;
    Session session;
    pid_t pid = 0;
    uid_t uid = 0;
    bool dead = false;
    bool in_pump = false;
    nlohmann::json inflight_id = nullptr;  // of the request being handled
    std::chrono::steady_clock::time_point last_active{};
  };

  void on_accept();
  void on_client(ClientId id, uint32_t events);
  void pump(Client& c);
  void dispatch(Client& c);
  void flush(Client& c);
  void update(Client& c);
  void drop(Client& c, const char* reason);
  void reply(ClientId id, const nlohmann::json& req_id,
             Result<nlohmann::json> result);
  Client* find(ClientId id);
  void arm_idle_timer();
  void close_idle();

  EventLoop& loop_;
  Limits limits_;
  Handler handler_;
  UniqueFd listen_fd_;
  std::string path_;
  ClientId next_id_ = 1;
  std::map<ClientId, std::unique_ptr<Client>> clients_;
  ServerStats stats_;
  EventLoop::TimerId idle_timer_ = 0;
  std::shared_ptr<bool> alive_ = std::make_shared<bool>(true);
};

}  // namespace kvmx::api
