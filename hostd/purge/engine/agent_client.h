// Client of QEMU's purge agent (docs/specs/purge-agent.md): the unix socket
// that a memory backend with purge-agent=PATH listens on.  Requests are
// synchronous and may come from several threads; FAULT messages (a QEMU
// thread waits on a swapped-out page) go to a callback on the reader thread.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <sys/types.h>

#include "common/fd.h"
#include "common/result.h"

namespace kvmx::purge {

struct AgentHello {
  uint64_t size = 0;       // bytes of the backend
  uint64_t host_addr = 0;  // where QEMU maps it
  uint64_t fd_offset = 0;  // offset of that mapping in the backend's fd
  uint64_t page_size = 0;
  UniqueFd backend_fd;     // the backend itself (file or memfd)
};

struct AgentCounters {
  uint64_t swapped_bytes = 0;
  uint64_t rejected = 0;
  // MAP_BACK and WAKE: CLOCK_MONOTONIC ns at which the agent had woken the
  // range's threads; 0 from an agent that does not say.
  uint64_t woken_ns = 0;
};

class AgentClient {
 public:
  enum Op : uint16_t {
    kHello = 1, kSwapOut = 2, kMapBack = 3, kZap = 4, kWake = 5, kFault = 6
  };
  // `since_ns`: CLOCK_MONOTONIC ns at which the agent read the fault; 0
  // from an agent that does not say.
  using FaultFn =
      std::function<void(uint64_t offset, bool write, uint64_t since_ns)>;
  using ClosedFn = std::function<void(const std::string& why)>;

  // Connects and says HELLO.  `on_fault` and `on_closed` run on the
  // client's reader thread, which start() starts (faults that came with
  // HELLO are kept until then); they must not call request() themselves.
  static Result<std::unique_ptr<AgentClient>> connect(
      const std::string& path, AgentHello* hello, FaultFn on_fault,
      ClosedFn on_closed);
  ~AgentClient();  // closes the socket and joins the reader
  AgentClient(const AgentClient&) = delete;
  AgentClient& operator=(const AgentClient&) = delete;

  // One request; waits at most `timeout_ms` for its reply.  An Error with
  // the agent's errno (code "agent-refused"), "agent-closed" or
  // "agent-timeout".
  Result<AgentCounters> request(Op op, uint64_t offset, uint64_t length,
                                int timeout_ms = 30000);
  // Starts reading: replies to request(), FAULT messages.
  void start();
  bool connected() const;
  pid_t peer_pid() const { return peer_pid_; }  // QEMU's, from SO_PEERCRED

 private:
  AgentClient() = default;
  void read_loop();

  UniqueFd sock_;
  pid_t peer_pid_ = 0;
  FaultFn on_fault_;
  ClosedFn on_closed_;
  std::thread reader_;
  struct EarlyFault {
    uint64_t offset;
    bool write;
    uint64_t since_ns;
  };
  std::vector<EarlyFault> early_;  // FAULTs before start()
  mutable std::mutex mu_;
  std::condition_variable cv_;
  struct Pending {
    bool done = false;
    int status = 0;
    AgentCounters counters;
  };
  std::map<uint64_t, Pending*> pending_;
  uint64_t next_tag_ = 1;
  bool closed_ = false;
  std::string closed_why_;
};

}  // namespace kvmx::purge
