#include "purge/engine/agent_client.h"
#include "purge/engine/agent_wire.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstring>

#include "common/log.h"

namespace kvmx::purge {
namespace {

using wire::kMagic;
using wire::kVersion;
using Request = wire::Request;
using Reply = wire::Reply;

// One message, with at most one fd attached.
Result<ssize_t> recv_msg(int fd, Reply* r, UniqueFd* passed) {
  alignas(cmsghdr) char ctl[CMSG_SPACE(sizeof(int) * 4)];
  iovec iov{r, sizeof(*r)};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  msg.msg_control = ctl;
  msg.msg_controllen = sizeof(ctl);
  ssize_t n;
  do {
    n = recvmsg(fd, &msg, MSG_CMSG_CLOEXEC);
  } while (n < 0 && errno == EINTR);
  if (n < 0) return sys_error("agent-io", "recvmsg");
  for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
    if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
    size_t nfds = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
    for (size_t i = 0; i < nfds; i++) {
      int pfd;
      std::memcpy(&pfd, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
      if (passed && i == 0 && !*passed)
        passed->reset(pfd);
      else
        close(pfd);  // more than we asked for
    }
  }
  return n;
}

Result<void> send_req(int fd, uint16_t op, uint64_t tag, uint64_t offset,
                      uint64_t length) {
  Request q{kMagic, kVersion, op, tag, offset, length};
  if (send(fd, &q, sizeof(q), MSG_NOSIGNAL) != sizeof(q))
    return sys_error("agent-io", "send to the purge agent");
  return {};
}

}  // namespace

Result<std::unique_ptr<AgentClient>> AgentClient::connect(
    const std::string& path, AgentHello* hello, FaultFn on_fault,
    ClosedFn on_closed) {
  sockaddr_un sun{};
  sun.sun_family = AF_UNIX;
  if (path.size() >= sizeof(sun.sun_path))
    return make_error("bad-agent", "purge agent path is too long: " + path);
  std::memcpy(sun.sun_path, path.c_str(), path.size() + 1);
  UniqueFd s(socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0));
  if (!s) return sys_error("agent-io", "socket");
  if (::connect(s.get(), reinterpret_cast<sockaddr*>(&sun), sizeof(sun)))
    return sys_error("agent-connect", "connect to the purge agent " + path);

  // HELLO before the reader starts: its reply carries the backend's fd.
  // FAULT messages may come first (faults that waited for a client); they
  // are kept and handed over once the reader runs.
  if (auto r = send_req(s.get(), kHello, 0, 0, 0); !r) return r.error();
  std::vector<EarlyFault> early;
  for (;;) {
    pollfd p{s.get(), POLLIN, 0};
    int pr = poll(&p, 1, 10000);
    if (pr <= 0)
      return make_error("agent-timeout", "the purge agent " + path +
                                             " did not answer HELLO");
    Reply rep{};
    UniqueFd fd;
    auto n = recv_msg(s.get(), &rep, &fd);
    if (!n) return n.error();
    if (*n != sizeof(rep) || rep.magic != kMagic || rep.version != kVersion)
      return make_error("agent-protocol",
                        "the purge agent " + path + " sent a bad message");
    if (rep.op == kFault) {
      if (early.size() < 4096)
        early.push_back({rep.arg[0], rep.arg[1] != 0, rep.arg[2]});
      continue;
    }
    if (rep.op != kHello) continue;
    if (rep.status != 0)
      return Error{"agent-refused",
                   std::string("the purge agent refused HELLO: ") +
                       std::strerror(rep.status),
                   rep.status};
    if (!fd)
      return make_error("agent-protocol", "HELLO came without the backend");
    if (rep.arg[3] == 0 || (rep.arg[3] & (rep.arg[3] - 1)) ||
        rep.arg[0] == 0 || rep.arg[0] % rep.arg[3])
      return make_error("agent-protocol", "HELLO has a bad size/page size");
    hello->size = rep.arg[0];
    hello->host_addr = rep.arg[1];
    hello->fd_offset = rep.arg[2];
    hello->page_size = rep.arg[3];
    // The fd is QEMU's own open file, and Linux keeps one writeback-error
    // cursor per open file: a sync of ours on it would take a write error
    // that QEMU's flush path must see, and a guest flush that failed would
    // be reported done.  So the backend is opened again, as a file of ours.
    std::string self_fd = "/proc/self/fd/" + std::to_string(fd.get());
    UniqueFd own(::open(self_fd.c_str(), O_RDWR | O_CLOEXEC));
    if (!own)
      return Error{"backend-open",
                   "cannot open the backend as a file of hostd's own (" +
                       std::string(std::strerror(errno)) +
                       "): sharing QEMU's would hide write errors from "
                       "the guest's flushes",
                   errno};
    hello->backend_fd = std::move(own);
    break;
  }
  std::unique_ptr<AgentClient> c(new AgentClient());
  ucred cred{};
  socklen_t cl = sizeof(cred);
  if (getsockopt(s.get(), SOL_SOCKET, SO_PEERCRED, &cred, &cl) == 0)
    c->peer_pid_ = cred.pid;
  c->sock_ = std::move(s);
  c->on_fault_ = std::move(on_fault);
  c->on_closed_ = std::move(on_closed);
  c->early_ = std::move(early);
  return c;
}

void AgentClient::start() {
  if (reader_.joinable()) return;
  reader_ = std::thread([this] {
    for (auto& f : early_) on_fault_(f.offset, f.write, f.since_ns);
    early_.clear();
    read_loop();
  });
}

AgentClient::~AgentClient() {
  if (sock_) shutdown(sock_.get(), SHUT_RDWR);
  if (reader_.joinable()) reader_.join();
}

bool AgentClient::connected() const {
  std::lock_guard g(mu_);
  return !closed_;
}

void AgentClient::read_loop() {
  std::string why = "the purge agent closed the connection";
  for (;;) {
    Reply rep{};
    auto n = recv_msg(sock_.get(), &rep, nullptr);
    if (!n) {
      why = n.error().message;
      break;
    }
    if (*n == 0) break;
    if (*n != sizeof(rep) || rep.magic != kMagic || rep.version != kVersion) {
      why = "the purge agent sent a bad message";
      break;
    }
    if (rep.op == kFault) {
      on_fault_(rep.arg[0], rep.arg[1] != 0, rep.arg[2]);
      continue;
    }
    std::lock_guard g(mu_);
    auto it = pending_.find(rep.tag);
    if (it == pending_.end()) continue;  // its caller timed out
    it->second->done = true;
    it->second->status = rep.status;
    it->second->counters = {rep.arg[4], rep.arg[5], rep.arg[2]};
    pending_.erase(it);
    cv_.notify_all();
  }
  {
    std::lock_guard g(mu_);
    closed_ = true;
    closed_why_ = why;
    cv_.notify_all();
  }
  if (on_closed_) on_closed_(why);
}

Result<AgentCounters> AgentClient::request(Op op, uint64_t offset,
                                           uint64_t length, int timeout_ms) {
  Pending p;
  std::unique_lock g(mu_);
  if (closed_) return make_error("agent-closed", closed_why_);
  if (!reader_.joinable())
    return make_error("agent-not-started", "AgentClient::start() not called");
  uint64_t tag = next_tag_++;
  pending_[tag] = &p;
  // Sent under the lock so that tags reach the agent in order; a send on a
  // SEQPACKET socket does not wait for the peer to read.
  if (auto r = send_req(sock_.get(), op, tag, offset, length); !r) {
    pending_.erase(tag);
    return r.error();
  }
  bool ok = cv_.wait_for(g, std::chrono::milliseconds(timeout_ms),
                         [&] { return p.done || closed_; });
  if (!p.done) {
    pending_.erase(tag);
    if (closed_) return make_error("agent-closed", closed_why_);
    (void)ok;
    return make_error("agent-timeout", "the purge agent did not answer");
  }
  if (p.status != 0)
    return Error{"agent-refused",
                 std::string("the purge agent refused: ") +
                     std::strerror(p.status),
                 p.status};
  return p.counters;
}

}  // namespace kvmx::purge
