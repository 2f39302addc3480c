// One-sided page fetch over RDMA (issue 15, docs/design/rdma.md), on
// rdma-core's librdmacm (connection set-up by IP address) and libibverbs
// (memory registration, queue pairs, RDMA READ).
//
// Two roles, as in post-copy:
//   Exporter  the side whose memory is read (the migration source). It
//             registers regions for remote READ, listens, and accepts one
//             reader that presents the right token. After that it does no
//             work per read: the RDMA device answers READs by itself.
//   Reader    the side that reads (the destination). It owns a registered
//             staging area of fixed-size slots and posts READs into them,
//             up to the queue depth, then polls for their completions.
//
// The RDMA benchmark (kvmx-rdma-bench) and the transport tests use it;
// QEMU's post-copy fetch (topic 09-rdma-fetch) speaks the same connect
// protocol in C (docs/specs/rdma-fetch.md).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "common/result.h"

struct rdma_cm_id;
struct rdma_event_channel;
struct ibv_pd;
struct ibv_mr;
struct ibv_cq;
struct ibv_comp_channel;

namespace kvmx::rdma {

// What the Reader must know of an exported region (sent to it out of band:
// in QEMU over the migration stream).
struct RemoteRegion {
  uint64_t addr = 0;    // the exporter's virtual address of the region
  uint64_t length = 0;  // bytes
  uint32_t rkey = 0;    // the memory region's remote key
};

struct DeviceInfo {
  std::string name;       // "rxe0"
  std::string netdev;     // the Ethernet interface of port 1 ("veth0"), or ""
  bool port_active = false;
  uint32_t max_qp_rd_atom = 0;  // READs in flight per QP the device allows
};

// The RDMA devices of this host. An empty list is not an error.
Result<std::vector<DeviceInfo>> devices();

// The device that has IP address `ip` (what rdma_cm picks when binding to
// it), with a message a user can act on when there is none.
Result<DeviceInfo> device_for_address(const std::string& ip);

// Connection request data: the reader's proof that it is the migration's
// destination. rdma_cm carries up to 56 bytes on an RC connect.
struct ConnectData {
  static constexpr uint32_t kMagic = 0x4b565852;  // "KVXR"
  static constexpr uint16_t kVersion = 1;
  uint32_t magic = kMagic;
  uint16_t version = kVersion;
  uint16_t reserved = 0;
  uint64_t token = 0;
};
static_assert(sizeof(ConnectData) == 16);

class Exporter {
 public:
  struct Limits {
    // Registered bytes, in total; registration pins them.
    uint64_t max_registered = uint64_t{64} << 30;
    // Connection requests turned down (bad token, too short) before
    // accept() gives up; each is counted.
    unsigned max_rejects = 64;
  };

  // Listen on ip:port (port 0: any; see port()). Fails with a clear error
  // when no RDMA device has `ip`.
  static Result<std::unique_ptr<Exporter>> listen(const std::string& ip,
                                                  uint16_t port,
                                                  const Limits& limits);
  static Result<std::unique_ptr<Exporter>> listen(const std::string& ip,
                                                  uint16_t port) {
    return listen(ip, port, Limits{});
  }
  ~Exporter();
  Exporter(const Exporter&) = delete;
  Exporter& operator=(const Exporter&) = delete;

  uint16_t port() const;
  const std::string& device() const { return device_; }

  // How expose() pins. kWrite is what a migration source must use: the
  // pin takes write access, so an untouched page is allocated now rather
  // than replaced later, under the registration, by copy-on-write.
  // kReadOnly exists for the design note's measurements
  // (kvmx-rdma-bench probe).
  enum class Pin { kWrite, kReadOnly };

  // Register [addr, addr+len) for remote READ; the pages are pinned.
  Result<RemoteRegion> expose(void* addr, size_t len, Pin pin = Pin::kWrite);

  // Wait up to timeout_ms for a reader presenting `token` and accept it.
  // Requests with another token or a malformed request are rejected and
  // counted (rejected()).
  Result<void> accept(uint64_t token, int timeout_ms);

  // Wait up to timeout_ms for the reader to disconnect: true if it did.
  Result<bool> wait_disconnect(int timeout_ms);

  // Disconnect the reader, if any, so that accept() can take another.
  void drop_reader();

  unsigned rejected() const { return rejected_; }
  uint64_t registered_bytes() const { return registered_; }

 private:
  Exporter() = default;
  Limits limits_;
  std::string device_;
  rdma_event_channel* ec_ = nullptr;
  rdma_cm_id* listen_id_ = nullptr;
  rdma_cm_id* conn_id_ = nullptr;
  ibv_pd* pd_ = nullptr;
  ibv_cq* cq_ = nullptr;
  std::vector<ibv_mr*> mrs_;
  uint64_t registered_ = 0;
  unsigned rejected_ = 0;
};

struct Completion {
  uint32_t slot = 0;
  bool ok = false;
  int status = 0;  // ibv_wc_status when !ok
};

class Reader {
 public:
  struct Options {
    uint32_t slots = 64;         // staging slots = READs in flight at most
    uint32_t slot_size = 4096;   // bytes per slot (one page)
    int timeout_ms = 5000;       // address/route resolution and connect
  };

  static Result<std::unique_ptr<Reader>> connect(const std::string& ip,
                                                 uint16_t port, uint64_t token,
                                                 const Options& opts);
  ~Reader();
  Reader(const Reader&) = delete;
  Reader& operator=(const Reader&) = delete;

  const std::string& device() const { return device_; }
  uint32_t slots() const { return opts_.slots; }
  uint32_t depth() const { return depth_; }
  uint8_t* slot(uint32_t i) const { return buf_ + size_t{i} * opts_.slot_size; }

  // Post a READ of `len` (<= slot_size) bytes at region.addr + offset into
  // `slot`. Refused (no post) when the range is outside the region, the
  // slot is busy, or depth() READs are in flight.
  Result<void> post_read(uint32_t slot, const RemoteRegion& region,
                         uint64_t offset, uint32_t len);

  // Completions of posted READs into `out`; waits up to timeout_ms for the
  // first one (0: do not wait; busy-polls for spin_us first). Returns how
  // many were written. A failed READ puts the connection in error: every
  // later READ fails too, and the caller falls back to another path.
  Result<size_t> poll(std::span<Completion> out, int timeout_ms,
                      int spin_us = 50);

  uint32_t in_flight() const { return in_flight_; }
  bool failed() const { return failed_; }

 private:
  Reader() = default;
  Options opts_;
  std::string device_;
  rdma_event_channel* ec_ = nullptr;
  rdma_cm_id* id_ = nullptr;
  ibv_pd* pd_ = nullptr;
  ibv_comp_channel* cc_ = nullptr;
  ibv_cq* cq_ = nullptr;
  ibv_mr* mr_ = nullptr;
  uint8_t* buf_ = nullptr;
  size_t buf_len_ = 0;
  std::vector<uint8_t> busy_;
  uint32_t depth_ = 0;
  uint32_t in_flight_ = 0;
  bool failed_ = false;
};

}  // namespace kvmx::rdma
