// See rdma.h. Every rdma_cm wait is bounded by a deadline: the event
// channel's fd is non-blocking and polled.
#include "rdma/rdma.h"

#include <fcntl.h>
#include <infiniband/verbs.h>
#include <net/if.h>
#include <netdb.h>
#include <poll.h>
#include <rdma/rdma_cma.h>
#include <sys/mman.h>
#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <cstring>

namespace kvmx::rdma {
namespace {

using Clock = std::chrono::steady_clock;

const char* kSoftRoceHint =
    "for soft-RoCE: modprobe rdma_rxe; rdma link add rxe0 type rxe netdev "
    "IFACE";

Error rdma_error(const std::string& code, const std::string& what,
                 int err = errno) {
  return sys_error(code, what, err);
}

// Numeric IPv4/IPv6 address and port into a sockaddr_storage.
Result<sockaddr_storage> parse_address(const std::string& ip, uint16_t port) {
  addrinfo hints{};
  hints.ai_flags = AI_NUMERICHOST | AI_NUMERICSERV;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* res = nullptr;
  const std::string p = std::to_string(port);
  int rc = getaddrinfo(ip.c_str(), p.c_str(), &hints, &res);
  if (rc != 0 || res == nullptr) {
    return make_error("rdma-address",
                      "'" + ip + "' is not a numeric IPv4 or IPv6 address");
  }
  sockaddr_storage ss{};
  std::memcpy(&ss, res->ai_addr, std::min<size_t>(res->ai_addrlen, sizeof(ss)));
  freeaddrinfo(res);
  return ss;
}

rdma_event_channel* make_channel() {
  rdma_event_channel* ec = rdma_create_event_channel();
  if (ec == nullptr) return nullptr;
  int fl = fcntl(ec->fd, F_GETFL);
  if (fl < 0 || fcntl(ec->fd, F_SETFL, fl | O_NONBLOCK) < 0) {
    rdma_destroy_event_channel(ec);
    return nullptr;
  }
  return ec;
}

// Next rdma_cm event before `deadline`; nullptr with errno ETIMEDOUT.
rdma_cm_event* next_event(rdma_event_channel* ec, Clock::time_point deadline) {
  for (;;) {
    rdma_cm_event* ev = nullptr;
    if (rdma_get_cm_event(ec, &ev) == 0) return ev;
    if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
      return nullptr;
    }
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        deadline - Clock::now()).count();
    if (left <= 0) {
      errno = ETIMEDOUT;
      return nullptr;
    }
    pollfd pfd{ec->fd, POLLIN, 0};
    if (::poll(&pfd, 1, static_cast<int>(left)) < 0 && errno != EINTR) {
      return nullptr;
    }
  }
}

// Wait for `want` on `id`; any other event on it is an error naming it.
Result<void> expect_event(rdma_event_channel* ec, rdma_cm_id* id,
                          rdma_cm_event_type want, const std::string& what,
                          Clock::time_point deadline) {
  for (;;) {
    rdma_cm_event* ev = next_event(ec, deadline);
    if (ev == nullptr) return rdma_error("rdma-connect", what);
    rdma_cm_event_type type = ev->event;
    int status = ev->status;
    bool mine = ev->id == id;
    rdma_ack_cm_event(ev);
    if (!mine) continue;
    if (type == want) return {};
    std::string msg = what + ": " + rdma_event_str(type);
    if (type == RDMA_CM_EVENT_REJECTED) {
      msg += " (the peer refused: wrong token, or it is not listening for "
             "this migration)";
    } else if (status != 0) {
      msg += std::string(" (") + std::strerror(status < 0 ? -status : status) +
             ")";
    }
    return make_error("rdma-connect", msg);
  }
}

std::string netdev_of(ibv_context* ctx) {
  ibv_gid_entry entry{};
  if (ibv_query_gid_ex(ctx, 1, 0, &entry, 0) != 0) return "";
  char name[IF_NAMESIZE] = {};
  if (entry.ndev_ifindex == 0 || if_indextoname(entry.ndev_ifindex, name) == nullptr) {
    return "";
  }
  return name;
}

DeviceInfo describe(ibv_context* ctx) {
  DeviceInfo d;
  d.name = ibv_get_device_name(ctx->device);
  ibv_device_attr attr{};
  if (ibv_query_device(ctx, &attr) == 0) {
    d.max_qp_rd_atom = static_cast<uint32_t>(attr.max_qp_rd_atom);
  }
  ibv_port_attr port{};
  if (ibv_query_port(ctx, 1, &port) == 0) {
    d.port_active = port.state == IBV_PORT_ACTIVE;
  }
  d.netdev = netdev_of(ctx);
  return d;
}

// Binds `id` to ip:port and checks that an RDMA device owns the address.
Result<void> bind_to(rdma_cm_id* id, const std::string& ip, uint16_t port) {
  auto sa = parse_address(ip, port);
  if (!sa) return sa.error();
  if (rdma_bind_addr(id, reinterpret_cast<sockaddr*>(&*sa)) != 0) {
    int e = errno;
    if (e == EADDRNOTAVAIL || e == ENODEV) {
      return make_error("rdma-no-device",
                        "no RDMA device has address " + ip + " (" +
                            kSoftRoceHint + ")");
    }
    return rdma_error("rdma-bind", "binding to " + ip, e);
  }
  if (id->verbs == nullptr) {
    return make_error("rdma-no-device",
                      "address " + ip + " is on an interface without an RDMA "
                      "device (" + kSoftRoceHint + ")");
  }
  return {};
}

}  // namespace

Result<std::vector<DeviceInfo>> devices() {
  int n = 0;
  ibv_device** list = ibv_get_device_list(&n);
  if (list == nullptr) {
    if (errno == ENOSYS) return std::vector<DeviceInfo>{};  // no ib_uverbs
    return rdma_error("rdma-devices", "listing RDMA devices");
  }
  std::vector<DeviceInfo> out;
  for (int i = 0; i < n; i++) {
    ibv_context* ctx = ibv_open_device(list[i]);
    if (ctx == nullptr) continue;
    out.push_back(describe(ctx));
    ibv_close_device(ctx);
  }
  ibv_free_device_list(list);
  return out;
}

namespace {
// An error naming the cause when the host has no RDMA device at all.
Result<void> any_device() {
  auto devs = devices();
  if (devs && devs->empty()) {
    return make_error("rdma-no-device",
                      std::string("this host has no RDMA device (") +
                          kSoftRoceHint + ")");
  }
  return {};
}
}  // namespace

Result<DeviceInfo> device_for_address(const std::string& ip) {
  if (auto sa = parse_address(ip, 0); !sa) return sa.error();
  if (auto d = any_device(); !d) return d.error();
  rdma_event_channel* ec = make_channel();
  if (ec == nullptr) {
    return rdma_error("rdma-no-device",
                      "opening rdma_cm (is rdma_ucm loaded?)");
  }
  rdma_cm_id* id = nullptr;
  if (rdma_create_id(ec, &id, nullptr, RDMA_PS_TCP) != 0) {
    auto e = rdma_error("rdma-no-device", "rdma_create_id");
    rdma_destroy_event_channel(ec);
    return e;
  }
  auto bound = bind_to(id, ip, 0);
  Result<DeviceInfo> out = bound ? Result<DeviceInfo>(describe(id->verbs))
                                 : Result<DeviceInfo>(bound.error());
  rdma_destroy_id(id);
  rdma_destroy_event_channel(ec);
  if (out && !out->port_active) {
    return make_error("rdma-port-down", "RDMA device " + out->name +
                                            " has address " + ip +
                                            " but its port is not active");
  }
  return out;
}

// ---- Exporter --------------------------------------------------------------

Result<std::unique_ptr<Exporter>> Exporter::listen(const std::string& ip,
                                                   uint16_t port,
                                                   const Limits& limits) {
  if (auto sa = parse_address(ip, port); !sa) return sa.error();
  if (auto d = any_device(); !d) return d.error();
  std::unique_ptr<Exporter> x(new Exporter());
  x->limits_ = limits;
  x->ec_ = make_channel();
  if (x->ec_ == nullptr) {
    return rdma_error("rdma-no-device", "opening rdma_cm (is rdma_ucm loaded?)");
  }
  if (rdma_create_id(x->ec_, &x->listen_id_, nullptr, RDMA_PS_TCP) != 0) {
    return rdma_error("rdma-listen", "rdma_create_id");
  }
  if (auto b = bind_to(x->listen_id_, ip, port); !b) return b.error();
  x->device_ = ibv_get_device_name(x->listen_id_->verbs->device);
  if (rdma_listen(x->listen_id_, 4) != 0) {
    return rdma_error("rdma-listen", "listening on " + ip);
  }
  x->pd_ = ibv_alloc_pd(x->listen_id_->verbs);
  if (x->pd_ == nullptr) return rdma_error("rdma-listen", "ibv_alloc_pd");
  x->cq_ = ibv_create_cq(x->listen_id_->verbs, 4, nullptr, nullptr, 0);
  if (x->cq_ == nullptr) return rdma_error("rdma-listen", "ibv_create_cq");
  return x;
}

void Exporter::drop_reader() {
  if (conn_id_ == nullptr) return;
  rdma_disconnect(conn_id_);
  if (conn_id_->qp != nullptr) rdma_destroy_qp(conn_id_);
  rdma_destroy_id(conn_id_);
  conn_id_ = nullptr;
}

Exporter::~Exporter() {
  drop_reader();
  for (ibv_mr* mr : mrs_) ibv_dereg_mr(mr);
  if (cq_ != nullptr) ibv_destroy_cq(cq_);
  if (pd_ != nullptr) ibv_dealloc_pd(pd_);
  if (listen_id_ != nullptr) rdma_destroy_id(listen_id_);
  if (ec_ != nullptr) rdma_destroy_event_channel(ec_);
}

uint16_t Exporter::port() const {
  return ntohs(rdma_get_src_port(listen_id_));
}

Result<RemoteRegion> Exporter::expose(void* addr, size_t len, Pin pin) {
  if (len == 0 || addr == nullptr) {
    return make_error("rdma-register", "empty region");
  }
  if (registered_ + len > limits_.max_registered ||
      registered_ + len < registered_) {
    return make_error("rdma-register",
                      "registering " + std::to_string(len) +
                          " more bytes would pass the limit of " +
                          std::to_string(limits_.max_registered));
  }
  int access = IBV_ACCESS_REMOTE_READ;
  if (pin == Pin::kWrite) access |= IBV_ACCESS_LOCAL_WRITE;
  ibv_mr* mr = ibv_reg_mr(pd_, addr, len, access);
  if (mr == nullptr) {
    int e = errno;
    if (e == ENOMEM || e == EPERM) {
      rlimit rl{};
      getrlimit(RLIMIT_MEMLOCK, &rl);
      std::string lim = rl.rlim_cur == RLIM_INFINITY
                            ? std::string("unlimited")
                            : std::to_string(rl.rlim_cur);
      return make_error("rdma-register",
                        "pinning " + std::to_string(len) +
                            " bytes for RDMA failed (" + std::strerror(e) +
                            "); RLIMIT_MEMLOCK is " + lim +
                            ": raise it or give CAP_IPC_LOCK");
    }
    if (e == EFAULT || e == EOPNOTSUPP) {
      return make_error("rdma-register",
                        std::string("this memory cannot be pinned for RDMA (") +
                            std::strerror(e) +
                            "): shared file mappings cannot be pinned for "
                            "long; use anonymous or memfd memory");
    }
    return rdma_error("rdma-register", "ibv_reg_mr", e);
  }
  mrs_.push_back(mr);
  registered_ += len;
  return RemoteRegion{reinterpret_cast<uint64_t>(addr), len, mr->rkey};
}

Result<void> Exporter::accept(uint64_t token, int timeout_ms) {
  if (conn_id_ != nullptr) {
    return make_error("rdma-accept", "a reader is already connected");
  }
  auto deadline = Clock::now() + std::chrono::milliseconds(timeout_ms);
  for (;;) {
    rdma_cm_event* ev = next_event(ec_, deadline);
    if (ev == nullptr) return rdma_error("rdma-accept", "waiting for a reader");
    if (ev->event != RDMA_CM_EVENT_CONNECT_REQUEST) {
      rdma_ack_cm_event(ev);
      continue;
    }
    rdma_cm_id* id = ev->id;
    ConnectData cd{};
    bool good = ev->param.conn.private_data != nullptr &&
                ev->param.conn.private_data_len >= sizeof(cd);
    if (good) {
      std::memcpy(&cd, ev->param.conn.private_data, sizeof(cd));
      good = cd.magic == ConnectData::kMagic &&
             cd.version == ConnectData::kVersion && cd.token == token;
    }
    // The CM reports the request from this side's point of view: the
    // READs the reader wants to have in flight here arrive as
    // responder_resources (the reader's initiator depth).
    uint8_t wanted = ev->param.conn.responder_resources;
    rdma_ack_cm_event(ev);
    if (!good) {
      rdma_reject(id, nullptr, 0);
      rdma_destroy_id(id);
      if (++rejected_ > limits_.max_rejects) {
        return make_error("rdma-accept",
                          "too many connection requests with a wrong token");
      }
      continue;
    }
    ibv_qp_init_attr qa{};
    qa.send_cq = cq_;
    qa.recv_cq = cq_;
    qa.qp_type = IBV_QPT_RC;
    qa.cap.max_send_wr = 1;
    qa.cap.max_recv_wr = 1;
    qa.cap.max_send_sge = 1;
    qa.cap.max_recv_sge = 1;
    if (rdma_create_qp(id, pd_, &qa) != 0) {
      auto e = rdma_error("rdma-accept", "rdma_create_qp");
      rdma_reject(id, nullptr, 0);
      rdma_destroy_id(id);
      return e;
    }
    ibv_device_attr attr{};
    ibv_query_device(id->verbs, &attr);
    rdma_conn_param cp{};
    cp.responder_resources = static_cast<uint8_t>(
        std::min<int>(wanted, attr.max_qp_rd_atom));
    if (cp.responder_resources == 0) {
      rdma_reject(id, nullptr, 0);
      rdma_destroy_qp(id);
      rdma_destroy_id(id);
      rejected_++;
      continue;  // a reader that cannot READ
    }
    cp.initiator_depth = 0;
    if (rdma_accept(id, &cp) != 0) {
      auto e = rdma_error("rdma-accept", "rdma_accept");
      rdma_destroy_qp(id);
      rdma_destroy_id(id);
      return e;
    }
    conn_id_ = id;
    return expect_event(ec_, id, RDMA_CM_EVENT_ESTABLISHED,
                        "waiting for the reader's connection", deadline);
  }
}

Result<bool> Exporter::wait_disconnect(int timeout_ms) {
  if (conn_id_ == nullptr) return true;
  auto deadline = Clock::now() + std::chrono::milliseconds(timeout_ms);
  for (;;) {
    rdma_cm_event* ev = next_event(ec_, deadline);
    if (ev == nullptr) {
      if (errno == ETIMEDOUT) return false;
      return rdma_error("rdma-accept", "waiting for the reader to go");
    }
    bool gone = ev->id == conn_id_ &&
                (ev->event == RDMA_CM_EVENT_DISCONNECTED ||
                 ev->event == RDMA_CM_EVENT_DEVICE_REMOVAL);
    if (ev->event == RDMA_CM_EVENT_CONNECT_REQUEST) {
      rdma_cm_id* id = ev->id;
      rdma_ack_cm_event(ev);
      rdma_reject(id, nullptr, 0);  // one reader at a time
      rdma_destroy_id(id);
      rejected_++;
      continue;
    }
    rdma_ack_cm_event(ev);
    if (gone) return true;
  }
}

// ---- Reader ----------------------------------------------------------------

Result<std::unique_ptr<Reader>> Reader::connect(const std::string& ip,
                                                uint16_t port, uint64_t token,
                                                const Options& opts) {
  if (opts.slots == 0 || opts.slots > 4096 || opts.slot_size == 0 ||
      opts.slot_size > (1u << 21)) {
    return make_error("rdma-connect", "slots must be 1-4096 of 1 B-2 MiB");
  }
  auto sa = parse_address(ip, port);
  if (!sa) return sa.error();
  if (auto d = any_device(); !d) return d.error();
  std::unique_ptr<Reader> r(new Reader());
  r->opts_ = opts;
  auto deadline = Clock::now() + std::chrono::milliseconds(opts.timeout_ms);
  r->ec_ = make_channel();
  if (r->ec_ == nullptr) {
    return rdma_error("rdma-no-device", "opening rdma_cm (is rdma_ucm loaded?)");
  }
  if (rdma_create_id(r->ec_, &r->id_, nullptr, RDMA_PS_TCP) != 0) {
    return rdma_error("rdma-connect", "rdma_create_id");
  }
  const std::string peer = ip + " port " + std::to_string(port);
  if (rdma_resolve_addr(r->id_, nullptr, reinterpret_cast<sockaddr*>(&*sa),
                        opts.timeout_ms) != 0) {
    return rdma_error("rdma-connect", "resolving " + peer);
  }
  if (auto e = expect_event(r->ec_, r->id_, RDMA_CM_EVENT_ADDR_RESOLVED,
                            "resolving " + peer + " (no RDMA device reaches it?)",
                            deadline);
      !e) {
    return e.error();
  }
  if (rdma_resolve_route(r->id_, opts.timeout_ms) != 0) {
    return rdma_error("rdma-connect", "route to " + peer);
  }
  if (auto e = expect_event(r->ec_, r->id_, RDMA_CM_EVENT_ROUTE_RESOLVED,
                            "route to " + peer, deadline);
      !e) {
    return e.error();
  }
  ibv_context* ctx = r->id_->verbs;
  r->device_ = ibv_get_device_name(ctx->device);
  ibv_device_attr attr{};
  if (ibv_query_device(ctx, &attr) != 0) {
    return rdma_error("rdma-connect", "ibv_query_device");
  }
  r->depth_ = std::min<uint32_t>(opts.slots, static_cast<uint32_t>(attr.max_qp_wr));
  r->pd_ = ibv_alloc_pd(ctx);
  if (r->pd_ == nullptr) return rdma_error("rdma-connect", "ibv_alloc_pd");
  r->cc_ = ibv_create_comp_channel(ctx);
  if (r->cc_ == nullptr) return rdma_error("rdma-connect", "ibv_create_comp_channel");
  int fl = fcntl(r->cc_->fd, F_GETFL);
  fcntl(r->cc_->fd, F_SETFL, fl | O_NONBLOCK);
  r->cq_ = ibv_create_cq(ctx, static_cast<int>(r->depth_), nullptr, r->cc_, 0);
  if (r->cq_ == nullptr) return rdma_error("rdma-connect", "ibv_create_cq");
  ibv_qp_init_attr qa{};
  qa.send_cq = r->cq_;
  qa.recv_cq = r->cq_;
  qa.qp_type = IBV_QPT_RC;
  qa.sq_sig_all = 1;
  qa.cap.max_send_wr = r->depth_;
  qa.cap.max_recv_wr = 1;
  qa.cap.max_send_sge = 1;
  qa.cap.max_recv_sge = 1;
  if (rdma_create_qp(r->id_, r->pd_, &qa) != 0) {
    return rdma_error("rdma-connect", "rdma_create_qp");
  }
  r->buf_len_ = size_t{opts.slots} * opts.slot_size;
  void* p = mmap(nullptr, r->buf_len_, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) return rdma_error("rdma-connect", "staging buffer");
  r->buf_ = static_cast<uint8_t*>(p);
  r->mr_ = ibv_reg_mr(r->pd_, r->buf_, r->buf_len_, IBV_ACCESS_LOCAL_WRITE);
  if (r->mr_ == nullptr) return rdma_error("rdma-connect", "registering the staging buffer");
  r->busy_.assign(opts.slots, 0);
  ConnectData cd;
  cd.token = token;
  rdma_conn_param cp{};
  cp.private_data = &cd;
  cp.private_data_len = sizeof(cd);
  cp.initiator_depth = static_cast<uint8_t>(
      std::min<int>(attr.max_qp_init_rd_atom, 255));
  cp.responder_resources = 0;
  cp.retry_count = 3;
  cp.rnr_retry_count = 3;
  if (rdma_connect(r->id_, &cp) != 0) {
    return rdma_error("rdma-connect", "connecting to " + peer);
  }
  if (auto e = expect_event(r->ec_, r->id_, RDMA_CM_EVENT_ESTABLISHED,
                            "connecting to " + peer, deadline);
      !e) {
    return e.error();
  }
  if (ibv_req_notify_cq(r->cq_, 0) != 0) {
    return rdma_error("rdma-connect", "ibv_req_notify_cq");
  }
  return r;
}

Reader::~Reader() {
  if (id_ != nullptr) {
    rdma_disconnect(id_);
    if (id_->qp != nullptr) rdma_destroy_qp(id_);
  }
  if (mr_ != nullptr) ibv_dereg_mr(mr_);
  if (buf_ != nullptr) munmap(buf_, buf_len_);
  if (cq_ != nullptr) ibv_destroy_cq(cq_);
  if (cc_ != nullptr) ibv_destroy_comp_channel(cc_);
  if (pd_ != nullptr) ibv_dealloc_pd(pd_);
  if (id_ != nullptr) rdma_destroy_id(id_);
  if (ec_ != nullptr) rdma_destroy_event_channel(ec_);
}

Result<void> Reader::post_read(uint32_t slot, const RemoteRegion& region,
                               uint64_t offset, uint32_t len) {
  if (failed_) return make_error("rdma-failed", "the connection has failed");
  if (slot >= opts_.slots || busy_[slot]) {
    return make_error("rdma-slot", "slot " + std::to_string(slot) +
                                       " is out of range or busy");
  }
  if (in_flight_ >= depth_) return make_error("rdma-slot", "queue full");
  if (len == 0 || len > opts_.slot_size || offset > region.length ||
      region.length - offset < len) {
    return make_error("rdma-range", "read outside the region");
  }
  ibv_sge sge{};
  sge.addr = reinterpret_cast<uint64_t>(this->slot(slot));
  sge.length = len;
  sge.lkey = mr_->lkey;
  ibv_send_wr wr{};
  wr.wr_id = slot;
  wr.sg_list = &sge;
  wr.num_sge = 1;
  wr.opcode = IBV_WR_RDMA_READ;
  wr.send_flags = IBV_SEND_SIGNALED;
  wr.wr.rdma.remote_addr = region.addr + offset;
  wr.wr.rdma.rkey = region.rkey;
  ibv_send_wr* bad = nullptr;
  int rc = ibv_post_send(id_->qp, &wr, &bad);
  if (rc != 0) return rdma_error("rdma-post", "ibv_post_send", rc);
  busy_[slot] = 1;
  in_flight_++;
  return {};
}

Result<size_t> Reader::poll(std::span<Completion> out, int timeout_ms,
                            int spin_us) {
  if (out.empty()) return size_t{0};
  auto take = [this](const ibv_wc& wc, Completion& c) {
    c.slot = static_cast<uint32_t>(wc.wr_id);
    c.ok = wc.status == IBV_WC_SUCCESS;
    c.status = static_cast<int>(wc.status);
    if (!c.ok) failed_ = true;
    if (c.slot < busy_.size() && busy_[c.slot]) {
      busy_[c.slot] = 0;
      in_flight_--;
    }
  };
  const auto start = Clock::now();
  const auto spin_until = start + std::chrono::microseconds(spin_us);
  const auto deadline = start + std::chrono::milliseconds(timeout_ms);
  ibv_wc wc[32];
  for (;;) {
    int want = static_cast<int>(std::min<size_t>(out.size(), 32));
    int n = ibv_poll_cq(cq_, want, wc);
    if (n < 0) return make_error("rdma-poll", "ibv_poll_cq failed");
    if (n > 0) {
      for (int i = 0; i < n; i++) take(wc[i], out[static_cast<size_t>(i)]);
      return static_cast<size_t>(n);
    }
    if (in_flight_ == 0) return size_t{0};
    auto now = Clock::now();
    if (now < spin_until) continue;
    if (timeout_ms == 0 || now >= deadline) return size_t{0};
    // Sleep on the completion channel. Arm, then poll once more so a
    // completion that landed before arming is not missed.
    if (ibv_req_notify_cq(cq_, 0) != 0) {
      return make_error("rdma-poll", "ibv_req_notify_cq failed");
    }
    n = ibv_poll_cq(cq_, want, wc);
    if (n < 0) return make_error("rdma-poll", "ibv_poll_cq failed");
    if (n > 0) {
      for (int i = 0; i < n; i++) take(wc[i], out[static_cast<size_t>(i)]);
      return static_cast<size_t>(n);
    }
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        deadline - Clock::now()).count();
    pollfd pfd{cc_->fd, POLLIN, 0};
    int pr = ::poll(&pfd, 1, static_cast<int>(std::max<int64_t>(left, 1)));
    if (pr < 0 && errno != EINTR) return rdma_error("rdma-poll", "poll");
    if (pr > 0) {
      ibv_cq* cq = nullptr;
      void* ctx = nullptr;
      if (ibv_get_cq_event(cc_, &cq, &ctx) == 0) ibv_ack_cq_events(cq, 1);
    }
  }
}

}  // namespace kvmx::rdma
