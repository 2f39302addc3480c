// The purge engine (engine.cc) against a fake QEMU purge agent that speaks
// docs/specs/purge-agent.md: purge-now, fault-back, restart and recovery,
// a disk copy changed behind the engine's back, a full disk, the agent
// going away, unpurge, and a fault already pending when the engine attaches.
//
// The fake agent is a thread serving a SOCK_SEQPACKET socket; it keeps the
// per-page "swapped out" bitmap the real agent keeps, validates requests
// the same way, and records every request.  The backend is a regular file
// on /var/tmp (the .vbd is opened with O_DIRECT, which tmpfs refuses).
#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

#include <dlfcn.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <functional>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "common/log.h"
#include "purge/engine/agent_wire.h"
#include "purge/engine/engine.h"
#include "purge/table/table.h"

using namespace kvmx::purge;
using namespace std::chrono_literals;
using Catch::Matchers::ContainsSubstring;
using nlohmann::json;

// -- A test hook on thread creation --------------------------------------------
//
// Engine::start creates the agent client's reader thread inside
// AgentClient::connect(); `g_delay_after_create_ms` makes the creating
// thread sleep right after the next pthread_create, so that the new thread
// runs first (used by the "fault pending at attach" test only).  The
// definition here interposes libc's for the whole test binary; with the
// flag at 0 it only forwards.
namespace {
std::atomic<int> g_delay_after_create_ms{0};
}  // namespace

extern "C" int pthread_create(pthread_t* thread, const pthread_attr_t* attr,
                              void* (*start)(void*), void* arg) noexcept {
  using Fn = int (*)(pthread_t*, const pthread_attr_t*, void* (*)(void*),
                     void*);
  static Fn real = reinterpret_cast<Fn>(dlsym(RTLD_NEXT, "pthread_create"));
  int r = real(thread, attr, start, arg);
  int ms = g_delay_after_create_ms.exchange(0);
  if (r == 0 && ms > 0) usleep(static_cast<useconds_t>(ms) * 1000);
  return r;
}

namespace {

constexpr uint32_t kShift = 16;
constexpr uint64_t kBlock = uint64_t{1} << kShift;  // 64 KiB
constexpr uint64_t kBlocks = 32;
constexpr uint64_t kSize = kBlocks * kBlock;  // 2 MiB
constexpr uint64_t kPage = 4096;

constexpr uint16_t kHello = 1, kSwapOut = 2, kMapBack = 3, kZap = 4,
                   kWake = 5, kFault = 6;
using kvmx::purge::wire::kMagic;

// Where fixtures make their directories (a child process gets its own,
// which the parent removes even when the child crashes).
std::string g_tmp_base = "/var/tmp";

const bool kQuietLog = [] {
  return kvmx::log::setup("warn", kvmx::log::Format::kText,
                          kvmx::log::Sink::kStderr)
      .ok();
}();

uint64_t off(uint64_t b) { return b << kShift; }

using WireRequest = kvmx::purge::wire::Request;
using WireReply = kvmx::purge::wire::Reply;

// One request as the fake agent saw it.
struct Req {
  int conn;  // 1 for the first client, 2 for the next, ...
  uint16_t op;
  uint64_t offset, length;
  int status;  // what the agent answered
};

bool overlaps(const Req& r, uint64_t b) {
  return r.offset < off(b) + kBlock && off(b) < r.offset + r.length;
}

template <typename F>
bool wait_until(F f, std::chrono::milliseconds limit = 10s) {
  auto end = std::chrono::steady_clock::now() + limit;
  while (!f()) {
    if (std::chrono::steady_clock::now() > end) return false;
    std::this_thread::sleep_for(2ms);
  }
  return true;
}

// QEMU's purge agent, as far as hostd can tell.
uint64_t now_ns() {
  timespec ts{};
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<uint64_t>(ts.tv_sec) * 1'000'000'000u +
         static_cast<uint64_t>(ts.tv_nsec);
}

class FakeAgent {
 public:
  FakeAgent(std::string sock_path, std::string backend_path)
      : sock_path_(std::move(sock_path)),
        backend_path_(std::move(backend_path)),
        swapped_(kSize / kPage, 0) {
    // The real agent hides every hole of a file backend at its start.
    int fd = open(backend_path_.c_str(), O_RDONLY | O_CLOEXEC);
    REQUIRE(fd >= 0);
    for (uint64_t p = 0; p < kSize / kPage; p++) {
      off_t d = lseek(fd, static_cast<off_t>(p * kPage), SEEK_DATA);
      if (d < 0 || static_cast<uint64_t>(d) >= (p + 1) * kPage)
        swapped_[p] = 1;
    }
    close(fd);

    listen_ = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    REQUIRE(listen_ >= 0);
    sockaddr_un sun{};
    sun.sun_family = AF_UNIX;
    REQUIRE(sock_path_.size() < sizeof(sun.sun_path));
    std::memcpy(sun.sun_path, sock_path_.c_str(), sock_path_.size() + 1);
    REQUIRE(bind(listen_, reinterpret_cast<sockaddr*>(&sun), sizeof(sun)) ==
            0);
    REQUIRE(listen(listen_, 4) == 0);
    REQUIRE(pipe2(wake_, O_CLOEXEC) == 0);
    thread_ = std::thread([this] { run(); });
  }

  ~FakeAgent() {
    stop_ = true;
    char c = 1;
    (void)!write(wake_[1], &c, 1);
    thread_.join();
    if (client_ >= 0) close(client_);
    if (sent_fd_ >= 0) close(sent_fd_);
    close(listen_);
    close(wake_[0]);
    close(wake_[1]);
  }

  // A QEMU thread waits on the page at `offset` (op 6, unsolicited),
  // since `since_ns` (CLOCK_MONOTONIC; 0: the agent does not say).
  void fault(uint64_t offset, bool write = false, uint64_t since_ns = 0) {
    std::lock_guard g(mu_);
    REQUIRE(client_ >= 0);
    send_locked(kFault, 0, 0, {offset, write ? 1u : 0u, since_ns});
  }

  // MAP_BACK and WAKE say when they woke the range's threads: now, plus
  // `skew_ns` (a wrong clock).
  void tell_woken(bool on, int64_t skew_ns = 0) {
    std::lock_guard g(mu_);
    tell_woken_ = on;
    woken_skew_ns_ = skew_ns;
  }

  // QEMU dies: the connection goes away (the agent's thread closes it).
  void disconnect() {
    std::lock_guard g(mu_);
    if (client_ >= 0) shutdown(client_, SHUT_RDWR);
  }

  // The Nth SWAP_OUT from now on (counted over all clients) is not
  // answered: the connection is closed instead.  0: never.
  void close_at_swap_out(int n) {
    std::lock_guard g(mu_);
    close_at_ = n;
    swap_outs_seen_ = 0;
  }

  // The fd the last HELLO handed out (still open here, -1 before).
  int sent_fd() const {
    std::lock_guard g(mu_);
    return sent_fd_;
  }

  // HELLO hands out a socket instead of the backend: an fd that cannot be
  // opened again through /proc/self/fd.
  void hello_with_socket() {
    std::lock_guard g(mu_);
    hello_socket_ = true;
  }

  // FAULT messages sent to the next client right after its HELLO reply (a
  // fault that waited for a client).
  void faults_after_next_hello(std::vector<uint64_t> offsets) {
    std::lock_guard g(mu_);
    faults_after_hello_ = std::move(offsets);
  }

  bool connected() const {
    std::lock_guard g(mu_);
    return client_ >= 0;
  }
  int connections() const {
    std::lock_guard g(mu_);
    return conn_;
  }
  std::vector<Req> log(int conn = 0) const {
    std::lock_guard g(mu_);
    std::vector<Req> out;
    for (const Req& r : log_)
      if (conn == 0 || r.conn == conn) out.push_back(r);
    return out;
  }
  size_t mark() const {
    std::lock_guard g(mu_);
    return log_.size();
  }
  // Requests with `op` since `from` (an index into the whole log).
  std::vector<Req> since(size_t from, uint16_t op) const {
    std::lock_guard g(mu_);
    std::vector<Req> out;
    for (size_t i = from; i < log_.size(); i++)
      if (log_[i].op == op) out.push_back(log_[i]);
    return out;
  }
  uint64_t count(uint16_t op) const { return since(0, op).size(); }
  bool swapped(uint64_t b) const {  // every page of block b
    std::lock_guard g(mu_);
    for (uint64_t p = off(b) / kPage; p < (off(b) + kBlock) / kPage; p++)
      if (!swapped_[p]) return false;
    return true;
  }
  bool any_swapped(uint64_t b) const {
    std::lock_guard g(mu_);
    for (uint64_t p = off(b) / kPage; p < (off(b) + kBlock) / kPage; p++)
      if (swapped_[p]) return true;
    return false;
  }
  uint64_t rejected() const {
    std::lock_guard g(mu_);
    return rejected_;
  }

 private:
  void run() {
    for (;;) {
      int cfd;
      {
        std::lock_guard g(mu_);
        cfd = client_;
      }
      pollfd p[2] = {{wake_[0], POLLIN, 0},
                     {cfd >= 0 ? cfd : listen_, POLLIN, 0}};
      int n = poll(p, 2, -1);
      if (n < 0) continue;  // EINTR
      if (p[0].revents) {
        if (stop_) return;
        char c;
        (void)!read(wake_[0], &c, 1);
        continue;
      }
      if (cfd < 0) {
        int c = accept4(listen_, nullptr, nullptr, SOCK_CLOEXEC);
        if (c < 0) continue;
        std::lock_guard g(mu_);
        client_ = c;
        conn_++;
        continue;
      }
      if (!p[1].revents) continue;
      unsigned char buf[128];
      ssize_t got = recv(cfd, buf, sizeof(buf), 0);
      if (got <= 0) {
        close_client();
        continue;
      }
      handle(buf, static_cast<size_t>(got));
    }
  }

  void close_client() {
    std::lock_guard g(mu_);
    if (client_ >= 0) close(client_);
    client_ = -1;
  }

  void handle(const unsigned char* buf, size_t n) {
    WireRequest q{};
    std::memcpy(&q, buf, std::min(n, sizeof(q)));
    std::lock_guard g(mu_);
    if (n != sizeof(q) || q.magic != kMagic || q.version != 1) {
      rejected_++;
      log_.push_back({conn_, q.op, q.offset, q.length, EPROTO});
      send_locked(q.op, q.tag, EPROTO, {});
      return;
    }
    if (q.op == kHello) {
      log_.push_back({conn_, q.op, q.offset, q.length, 0});
      int bfd = hello_socket_ ? socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0)
                              : open(backend_path_.c_str(), O_RDWR | O_CLOEXEC);
      send_locked(kHello, q.tag, 0, {kSize, 0, 0, kPage}, bfd);
      // Kept, as QEMU keeps its own: the open file the client got.
      if (sent_fd_ >= 0) close(sent_fd_);
      sent_fd_ = bfd;
      for (uint64_t o : faults_after_hello_) send_locked(kFault, 0, 0, {o, 0});
      faults_after_hello_.clear();
      return;
    }
    if (q.op < kSwapOut || q.op > kWake) {
      rejected_++;
      log_.push_back({conn_, q.op, q.offset, q.length, EOPNOTSUPP});
      send_locked(q.op, q.tag, EOPNOTSUPP, {});
      return;
    }
    if (q.offset % kPage || q.length % kPage || q.length == 0 ||
        q.offset > kSize || q.length > kSize - q.offset) {
      rejected_++;
      log_.push_back({conn_, q.op, q.offset, q.length, EINVAL});
      send_locked(q.op, q.tag, EINVAL, {});
      return;
    }
    uint64_t p0 = q.offset / kPage, p1 = (q.offset + q.length) / kPage;
    int status = 0;
    switch (q.op) {
      case kSwapOut:
        if (close_at_ && ++swap_outs_seen_ == close_at_) {
          // QEMU died with this request in flight.
          log_.push_back({conn_, q.op, q.offset, q.length, -1});
          shutdown(client_, SHUT_RDWR);
          return;  // the agent thread sees EOF and closes it
        }
        for (uint64_t p = p0; p < p1; p++) swapped_[p] = 1;
        break;
      case kMapBack:
        for (uint64_t p = p0; p < p1; p++) swapped_[p] = 0;
        break;
      case kZap:
        for (uint64_t p = p0; p < p1; p++)
          if (swapped_[p]) status = EBUSY;
        break;
      case kWake:
        break;
    }
    log_.push_back({conn_, q.op, q.offset, q.length, status});
    uint64_t woken = 0;
    if (tell_woken_ && (q.op == kMapBack || q.op == kWake))
      woken = now_ns() + woken_skew_ns_;
    send_locked(q.op, q.tag, status, {0, 0, woken});
  }

  // Under mu_.
  void send_locked(uint16_t op, uint64_t tag, int status,
                   std::initializer_list<uint64_t> args, int pass_fd = -1) {
    if (client_ < 0) return;
    WireReply r{};
    r.magic = kMagic;
    r.version = 1;
    r.op = op;
    r.tag = tag;
    r.status = status;
    size_t i = 0;
    for (uint64_t a : args) r.arg[i++] = a;
    uint64_t swapped = 0;
    for (uint8_t s : swapped_) swapped += s ? kPage : 0;
    r.arg[4] = swapped;
    r.arg[5] = rejected_;
    iovec iov{&r, sizeof(r)};
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    alignas(cmsghdr) char ctl[CMSG_SPACE(sizeof(int))];
    if (pass_fd >= 0) {
      std::memset(ctl, 0, sizeof(ctl));
      msg.msg_control = ctl;
      msg.msg_controllen = sizeof(ctl);
      cmsghdr* c = CMSG_FIRSTHDR(&msg);
      c->cmsg_level = SOL_SOCKET;
      c->cmsg_type = SCM_RIGHTS;
      c->cmsg_len = CMSG_LEN(sizeof(int));
      std::memcpy(CMSG_DATA(c), &pass_fd, sizeof(int));
    }
    (void)sendmsg(client_, &msg, MSG_NOSIGNAL);
  }

  std::string sock_path_, backend_path_;
  int listen_ = -1;
  int wake_[2] = {-1, -1};
  std::atomic<bool> stop_{false};
  std::thread thread_;

  mutable std::mutex mu_;
  int client_ = -1;
  int conn_ = 0;
  std::vector<uint8_t> swapped_;  // per page
  std::vector<Req> log_;
  uint64_t rejected_ = 0;
  int close_at_ = 0, swap_outs_seen_ = 0;
  std::vector<uint64_t> faults_after_hello_;
  bool hello_socket_ = false;
  int sent_fd_ = -1;  // the fd of the last HELLO, kept open
  bool tell_woken_ = false;
  int64_t woken_skew_ns_ = 0;
};

// The files of one test and the agent serving them.
struct Fixture {
  // `holes`: blocks never written (holes in the backend); `zeros`: blocks
  // written with zeros (allocated, all-zero); the others get a pattern.
  explicit Fixture(std::set<uint64_t> holes = {}, std::set<uint64_t> zeros = {})
      : orig(kSize, '\0') {
    std::string tmpl = g_tmp_base + "/kvmx-purge-engine-XXXXXX";
    REQUIRE(mkdtemp(tmpl.data()));
    dir = tmpl;
    backend = dir + "/backend";
    vbt = dir + "/nv.vbt";
    vbd = dir + "/nv.vbd";
    sock = dir + "/agent.sock";
    int fd = open(backend.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    REQUIRE(fd >= 0);
    REQUIRE(ftruncate(fd, kSize) == 0);
    for (uint64_t b = 0; b < kBlocks; b++) {
      if (holes.count(b)) continue;
      if (!zeros.count(b)) orig.replace(off(b), kBlock, pattern(b, 0));
      REQUIRE(pwrite(fd, orig.data() + off(b), kBlock,
                     static_cast<off_t>(off(b))) ==
              static_cast<ssize_t>(kBlock));
    }
    REQUIRE(fsync(fd) == 0);
    backend_fd = fd;
    agent = std::make_unique<FakeAgent>(sock, backend);
  }
  ~Fixture() {
    agent.reset();
    close(backend_fd);
    std::error_code ec;
    std::filesystem::remove_all(dir, ec);
  }

  // Distinct, never all-zero contents of block b (`salt` varies them).
  static std::string pattern(uint64_t b, unsigned salt) {
    std::string s(kBlock, '\0');
    for (uint64_t i = 0; i < kBlock; i++)
      s[i] = static_cast<char>((b * 131 + i * 7 + (i >> 12) + salt * 29) ^
                               0xa5);
    return s;
  }

  EngineConfig config(uint64_t disk_slots = 0) const {
    EngineConfig c;
    c.name = "test/nv0";
    c.agent_path = sock;
    c.vbt_path = vbt;
    c.vbd_path = vbd;
    c.block_shift = kShift;
    c.disk_slots = disk_slots;
    c.probe_interval_ms = 60000;
    // One block per batch: requests per block, which the cases below count
    // ("purge_now: a batch swaps out runs" checks the default batches).
    c.batch_bytes = kBlock;
    return c;
  }

  std::unique_ptr<Engine> start(uint64_t disk_slots = 0,
                                uint64_t read_piece = 512 << 10) {
    EngineConfig c = config(disk_slots);
    c.read_piece_bytes = read_piece;
    auto e = Engine::start(c, [this](const std::string& w) {
      std::lock_guard g(fmu);
      fatals.push_back(w);
    });
    INFO((e ? std::string() : e.error().code + ": " + e.error().message));
    REQUIRE(e.ok());
    REQUIRE((*e)->block_count() == kBlocks);
    REQUIRE((*e)->block_size() == kBlock);
    return std::move(*e);
  }

  std::vector<std::string> fatal_calls() {
    std::lock_guard g(fmu);
    return fatals;
  }

  std::string read_block(uint64_t b) const {
    std::string s(kBlock, '\0');
    REQUIRE(pread(backend_fd, s.data(), kBlock, static_cast<off_t>(off(b))) ==
            static_cast<ssize_t>(kBlock));
    return s;
  }
  std::string read_all() const {
    std::string s(kSize, '\0');
    REQUIRE(pread(backend_fd, s.data(), kSize, 0) ==
            static_cast<ssize_t>(kSize));
    return s;
  }
  void write_block(uint64_t b, const std::string& data) {
    REQUIRE(pwrite(backend_fd, data.data(), kBlock,
                   static_cast<off_t>(off(b))) ==
            static_cast<ssize_t>(kBlock));
    REQUIRE(fsync(backend_fd) == 0);
  }
  std::string orig_block(uint64_t b) const { return orig.substr(off(b), kBlock); }

  // No data in the block's range (SEEK_DATA: ENXIO, or data beyond it).
  bool hole(uint64_t b) const {
    off_t d = lseek(backend_fd, static_cast<off_t>(off(b)), SEEK_DATA);
    if (d < 0) return errno == ENXIO;
    return static_cast<uint64_t>(d) >= off(b) + kBlock;
  }
  bool allocated(uint64_t b) const {
    off_t h = lseek(backend_fd, static_cast<off_t>(off(b)), SEEK_HOLE);
    return h >= 0 && static_cast<uint64_t>(h) >= off(b) + kBlock;
  }

  // Opens the table (after the engine is gone), as the next start would.
  std::unique_ptr<Table> open_table(RecoveryReport* rep) {
    auto t = Table::open(vbt, vbd, backend_fd, kSize, rep);
    INFO((t ? std::string() : t.error().code + ": " + t.error().message));
    REQUIRE(t.ok());
    return std::move(*t);
  }

  std::string dir, backend, vbt, vbd, sock;
  std::string orig;  // what the backend held at the start
  int backend_fd = -1;
  std::unique_ptr<FakeAgent> agent;
  std::mutex fmu;
  std::vector<std::string> fatals;
};

uint64_t st(const Engine& e, const char* key) {
  return e.status()[key].get<uint64_t>();
}
uint64_t err(const Engine& e, const char* key) {
  return e.status()["errors"][key].get<uint64_t>();
}

MoveResult purge_all(Engine& e) {
  auto r = e.purge_now(0, 0, true);
  INFO((r ? r->error : r.error().code + ": " + r.error().message));
  REQUIRE(r.ok());
  return *r;
}

// Faults block b (a page in its middle) and waits for the engine to map it
// back; the MAP_BACKs sent for it are returned.
std::vector<Req> fault_back(Fixture& f, uint64_t b) {
  size_t m = f.agent->mark();
  f.agent->fault(off(b) + 3 * kPage);
  REQUIRE(wait_until([&] { return !f.agent->since(m, kMapBack).empty(); }));
  return f.agent->since(m, kMapBack);
}

}  // namespace

// -- purge-now ---------------------------------------------------------------------

TEST_CASE("purge_now: every block with data is purged, holes are not") {
  Fixture f({5}, {7});  // block 5 a hole, block 7 all zeros
  auto e = f.start();

  // Attach on a fresh table: the hole hidden at QEMU's start is mapped
  // back with everything else, then waiting threads are woken.
  auto attach = f.agent->log(1);
  REQUIRE(attach.size() >= 3);
  CHECK(attach[0].op == kHello);
  CHECK(attach[1].op == kMapBack);
  CHECK(attach[1].offset == 0);
  CHECK(attach[1].length == kSize);
  CHECK(attach[2].op == kWake);
  CHECK_FALSE(f.agent->any_swapped(5));
  CHECK(st(*e, "purged") == 0);
  CHECK(st(*e, "resident") == kBlocks);

  size_t m = f.agent->mark();
  MoveResult r = purge_all(*e);
  CHECK(r.blocks == kBlocks - 1);
  CHECK(r.zero == 1);
  CHECK(r.failed == 0);
  CHECK(r.bytes == (kBlocks - 1) * kBlock);
  CHECK(r.error.empty());

  auto s = e->status();
  CHECK(s["state"] == "running");
  CHECK(s["purged"].get<uint64_t>() == kBlocks - 1);
  CHECK(s["resident"].get<uint64_t>() == 1);
  CHECK(s["purged-total"].get<uint64_t>() == kBlocks - 1);
  CHECK(s["zero-blocks"].get<uint64_t>() == 1);
  CHECK(s["bytes-saved"].get<uint64_t>() == (kBlocks - 1) * kBlock);

  // One SWAP_OUT per purged block, none for the hole.
  auto swaps = f.agent->since(m, kSwapOut);
  CHECK(swaps.size() == kBlocks - 1);
  std::set<uint64_t> swapped_blocks;
  for (const Req& q : swaps) {
    CHECK(q.status == 0);
    CHECK(q.length == kBlock);
    CHECK(q.offset % kBlock == 0);
    CHECK_FALSE(overlaps(q, 5));
    swapped_blocks.insert(q.offset / kBlock);
  }
  CHECK(swapped_blocks.size() == kBlocks - 1);
  for (uint64_t b = 0; b < kBlocks; b++) {
    INFO("block " << b);
    if (b == 5) {
      CHECK_FALSE(f.agent->any_swapped(b));
      CHECK(f.hole(b));
      continue;
    }
    CHECK(f.agent->swapped(b));
    CHECK(f.hole(b));  // punched
  }
  // Backend allocation: only metadata-sized leftovers.
  struct stat sb{};
  REQUIRE(fstat(f.backend_fd, &sb) == 0);
  CHECK(static_cast<uint64_t>(sb.st_blocks) * 512 < kBlock);

  // Nothing left to purge: a second purge_now moves nothing.
  MoveResult again = purge_all(*e);
  CHECK(again.blocks == 0);
  CHECK(st(*e, "purged") == kBlocks - 1);

  CHECK(f.agent->rejected() == 0);
  e.reset();

  // What the journal says: 31 purged, the zero block without a disk copy.
  RecoveryReport rep;
  auto t = f.open_table(&rep);
  CHECK(rep.purged.size() == kBlocks - 1);
  CHECK(t->entry(5).state == BlockState::Resident);
  CHECK(t->entry(7).state == BlockState::Purged);
  CHECK((t->entry(7).flags & kFlagZero) != 0);
  CHECK(t->entry(7).disk_slot == kNoSlot);
  CHECK(t->entry(0).state == BlockState::Purged);
  CHECK(t->entry(0).disk_slot != kNoSlot);
}

// -- fault-back --------------------------------------------------------------------

TEST_CASE("attach: hostd syncs a backend file of its own, never QEMU's") {
  // Linux keeps a writeback-error cursor per open file: a sync on the fd
  // QEMU handed over would take errors meant for the guest's flushes.  So
  // the engine opens the backend again; where that is impossible it
  // refuses to attach.
  Fixture f;
  {
    auto e = f.start();
    int sent = f.agent->sent_fd();
    REQUIRE(sent >= 0);
    // The file the agent handed out now stands at 4096.  A descriptor of
    // the same open file (what SCM_RIGHTS gives) would stand there too.
    REQUIRE(lseek(sent, 4096, SEEK_SET) == 4096);
    std::vector<int> same_file, same_open_file;
    for (int fd = 3; fd < 1024; fd++) {
      char link[64], target[4096];
      snprintf(link, sizeof(link), "/proc/self/fd/%d", fd);
      ssize_t n = readlink(link, target, sizeof(target) - 1);
      if (n <= 0 || fd == f.backend_fd || fd == sent) continue;
      target[n] = 0;
      if (f.backend != target) continue;
      same_file.push_back(fd);
      if (lseek(fd, 0, SEEK_CUR) == 4096) same_open_file.push_back(fd);
    }
    CHECK_FALSE(same_file.empty());       // the engine's own
    CHECK(same_open_file.empty());        // none shares the agent's
  }
  f.agent->hello_with_socket();
  auto e = Engine::start(f.config(0), [](const std::string&) {});
  REQUIRE_FALSE(e.ok());
  CHECK(e.error().code == "backend-open");
}

TEST_CASE("fault: a purged block comes back, once") {
  Fixture f;
  auto e = f.start();
  REQUIRE(purge_all(*e).blocks == kBlocks);

  size_t m0 = f.agent->mark();
  fault_back(f, 9);
  // Give a stray second MAP_BACK a chance to show up.
  std::this_thread::sleep_for(50ms);
  auto maps = f.agent->since(m0, kMapBack);
  REQUIRE(maps.size() == 1);
  CHECK(maps[0].offset == off(9));
  CHECK(maps[0].length == kBlock);
  CHECK(maps[0].status == 0);

  CHECK(f.read_block(9) == f.orig_block(9));
  CHECK(f.allocated(9));
  CHECK_FALSE(f.agent->any_swapped(9));
  CHECK(f.agent->swapped(8));
  CHECK(f.agent->swapped(10));
  CHECK(f.hole(8));
  CHECK(f.hole(10));
  auto s = e->status();
  CHECK(s["faults"].get<uint64_t>() == 1);
  CHECK(s["fault-backs"].get<uint64_t>() == 1);
  CHECK(s["restored-bytes"].get<uint64_t>() == kBlock);
  CHECK(s["purged"].get<uint64_t>() == kBlocks - 1);
  CHECK(s["resident"].get<uint64_t>() == 1);
  CHECK(s["fault-latency-us"]["samples"].get<uint64_t>() == 1);

  // The guest writes into the block, then a (stale) fault on it again: only
  // a MAP_BACK, no second restore over the guest's data.
  std::string guest = Fixture::pattern(9, 7);
  f.write_block(9, guest);
  size_t m = f.agent->mark();
  f.agent->fault(off(9) + 5 * kPage, true);
  REQUIRE(wait_until([&] { return f.agent->since(m, kMapBack).size() == 1; }));
  REQUIRE(wait_until([&] { return st(*e, "faults") == 2; }));
  std::this_thread::sleep_for(50ms);
  auto maps2 = f.agent->since(m, kMapBack);
  REQUIRE(maps2.size() == 1);
  CHECK(maps2[0].offset == off(9));
  CHECK(maps2[0].length == kBlock);
  CHECK(st(*e, "fault-backs") == 1);
  CHECK(st(*e, "restored-bytes") == kBlock);
  CHECK(f.read_block(9) == guest);
  CHECK(f.agent->since(m, kSwapOut).empty());

  // A fault outside the backend is ignored.
  m = f.agent->mark();
  f.agent->fault(kSize + kPage);
  std::this_thread::sleep_for(50ms);
  CHECK(f.agent->since(m, kMapBack).empty());

  CHECK(f.agent->rejected() == 0);
  e.reset();  // flushes the batched `resident` commit

  RecoveryReport rep;
  auto t = f.open_table(&rep);
  CHECK(t->entry(9).state == BlockState::Resident);
  CHECK(t->entry(9).disk_slot == kNoSlot);
  CHECK(rep.purged.size() == kBlocks - 1);
  CHECK(std::find(rep.purged.begin(), rep.purged.end(), 9) ==
        rep.purged.end());
}

TEST_CASE("fault: the agent's times give what the faulting thread waited") {
  Fixture f;
  auto e = f.start();
  REQUIRE(purge_all(*e).blocks == kBlocks);
  f.agent->tell_woken(true);

  // A thread that has waited 20 ms before hostd heard of it.  (Blocks in
  // no order, so that no read-ahead joins in.)
  size_t m = f.agent->mark();
  f.agent->fault(off(3) + kPage, false, now_ns() - 20'000'000);
  REQUIRE(wait_until([&] { return !f.agent->since(m, kMapBack).empty(); }));
  REQUIRE(wait_until([&] { return st(*e, "fault-backs") == 1; }));
  auto s = e->status();
  CHECK(s["fault-wait-us"]["samples"].get<uint64_t>() == 1);
  CHECK(s["fault-latency-us"]["samples"].get<uint64_t>() == 1);
  uint64_t wait = s["fault-wait-us"]["p50"].get<uint64_t>();
  uint64_t lat = s["fault-latency-us"]["p50"].get<uint64_t>();
  CHECK(wait >= 20'000);
  CHECK(wait <= lat + 20'000 + 1000);  // never past the reply's arrival
  CHECK(s["fault-phases-us"]["timed"].get<uint64_t>() == 1);
  CHECK(s["fault-phases-us"]["handoff"].get<uint64_t>() >= 20'000);

  // Times that cannot be right are not taken: a fault read in the
  // future, one an hour ago, a wake after the reply arrived, none at all.
  f.agent->fault(off(10), false, now_ns() + 10'000'000'000);
  f.agent->fault(off(5), false, now_ns() - 3'600'000'000'000);
  f.agent->fault(off(12), false, 0);
  REQUIRE(wait_until([&] { return st(*e, "fault-backs") == 4; }));
  f.agent->tell_woken(true, 10'000'000'000);
  f.agent->fault(off(7), false, now_ns());
  REQUIRE(wait_until([&] { return st(*e, "fault-backs") == 5; }));
  s = e->status();
  CHECK(s["fault-wait-us"]["samples"].get<uint64_t>() == 1);
  CHECK(s["fault-latency-us"]["samples"].get<uint64_t>() == 5);
  CHECK(s["fault-phases-us"]["timed"].get<uint64_t>() == 1);
  for (uint64_t b : {3, 10, 5, 12, 7}) CHECK(f.read_block(b) == f.orig_block(b));
}

// -- restart -----------------------------------------------------------------------

TEST_CASE("restart: purged blocks go behind placeholders, the rest maps back") {
  Fixture f({5});
  {
    auto e = f.start();
    REQUIRE(purge_all(*e).blocks == kBlocks - 1);
  }
  auto e = f.start();
  REQUIRE(f.agent->connections() == 2);
  auto attach = f.agent->log(2);
  REQUIRE(attach.size() >= 5);
  CHECK(attach[0].op == kHello);
  // One SWAP_OUT per run of purged blocks: [0, 5) and [6, 32).
  CHECK(attach[1].op == kSwapOut);
  CHECK(attach[1].offset == 0);
  CHECK(attach[1].length == 5 * kBlock);
  CHECK(attach[2].op == kSwapOut);
  CHECK(attach[2].offset == off(6));
  CHECK(attach[2].length == (kBlocks - 6) * kBlock);
  CHECK(attach[3].op == kMapBack);
  CHECK(attach[3].offset == off(5));
  CHECK(attach[3].length == kBlock);
  CHECK(attach[4].op == kWake);
  CHECK(attach[4].offset == 0);
  CHECK(attach[4].length == kSize);
  for (const Req& q : attach) CHECK(q.status == 0);

  CHECK(st(*e, "purged") == kBlocks - 1);
  CHECK(st(*e, "resident") == 1);
  for (uint64_t b : {0, 4, 6, 31}) {
    INFO("block " << b);
    auto maps = fault_back(f, b);
    REQUIRE(maps.size() == 1);
    CHECK(maps[0].offset == off(b));
    CHECK(maps[0].length == kBlock);
    CHECK(f.read_block(b) == f.orig_block(b));
  }
  CHECK(st(*e, "fault-backs") == 4);
  CHECK(f.agent->rejected() == 0);
}

TEST_CASE("restart: a purged block whose range is fully allocated is resident") {
  Fixture f;
  {
    auto e = f.start();
    REQUIRE(purge_all(*e).blocks == kBlocks);
  }
  // Behind the engine's back: block 3's data is back in the backend.
  f.write_block(3, f.orig_block(3));
  REQUIRE(f.allocated(3));

  auto e = f.start();
  auto attach = f.agent->log(2);
  REQUIRE(attach.size() >= 5);
  CHECK(attach[0].op == kHello);
  CHECK(attach[1].op == kSwapOut);
  CHECK(attach[1].offset == 0);
  CHECK(attach[1].length == 3 * kBlock);
  CHECK(attach[2].op == kSwapOut);
  CHECK(attach[2].offset == off(4));
  CHECK(attach[2].length == (kBlocks - 4) * kBlock);
  CHECK(attach[3].op == kMapBack);
  CHECK(attach[3].offset == off(3));
  CHECK(attach[3].length == kBlock);
  CHECK(attach[4].op == kWake);
  for (const Req& q : attach)
    if (q.op == kSwapOut) CHECK_FALSE(overlaps(q, 3));

  CHECK(st(*e, "purged") == kBlocks - 1);
  CHECK(st(*e, "resident") == 1);
  CHECK_FALSE(f.agent->any_swapped(3));
  CHECK(f.agent->swapped(2));
  CHECK(f.agent->swapped(4));
  CHECK(f.read_block(3) == f.orig_block(3));
  CHECK(f.hole(2));
  CHECK(f.hole(4));

  // A fault on it only maps it back; block 4 is restored from its copy.
  // (Faults on 3 then 4 are sequential: read-ahead off, to count only
  // what the faults bring back.)
  PolicyConfig p = e->policy();
  p.readahead_bytes = 0;
  REQUIRE(e->set_policy(p).ok());
  auto maps = fault_back(f, 3);
  REQUIRE(wait_until([&] { return st(*e, "faults") == 1; }));
  CHECK(maps.size() == 1);
  CHECK(st(*e, "fault-backs") == 0);
  fault_back(f, 4);
  CHECK(st(*e, "fault-backs") == 1);
  CHECK(f.read_block(4) == f.orig_block(4));
  CHECK(f.read_block(3) == f.orig_block(3));
  e.reset();

  RecoveryReport rep;
  auto t = f.open_table(&rep);
  CHECK(t->entry(3).state == BlockState::Resident);
  CHECK(t->entry(4).state == BlockState::Resident);
  CHECK(rep.purged.size() == kBlocks - 2);
}

// -- a disk copy changed behind the engine's back ----------------------------------

TEST_CASE("fault: a disk copy that fails its checksum is fatal, not mapped") {
  Fixture f;
  auto e = f.start();
  REQUIRE(purge_all(*e).blocks == kBlocks);

  // Flip 16 bytes in the middle of every slot of the .vbd (slot s at
  // (s + 1) * block size).
  {
    int fd = open(f.vbd.c_str(), O_RDWR | O_CLOEXEC);
    REQUIRE(fd >= 0);
    for (uint64_t s = 0; s < kBlocks; s++) {
      unsigned char x[16];
      off_t at = static_cast<off_t>((s + 1) * kBlock + 1000);
      REQUIRE(pread(fd, x, sizeof(x), at) == 16);
      for (auto& c : x) c ^= 0xff;
      REQUIRE(pwrite(fd, x, sizeof(x), at) == 16);
    }
    REQUIRE(fsync(fd) == 0);
    close(fd);
  }

  size_t m = f.agent->mark();
  f.agent->fault(off(9) + kPage);
  REQUIRE(wait_until([&] { return f.fatal_calls().size() == 1; }));
  std::this_thread::sleep_for(100ms);
  auto calls = f.fatal_calls();
  REQUIRE(calls.size() == 1);
  CHECK_THAT(calls[0], ContainsSubstring("block 9 "));
  CHECK_THAT(calls[0], ContainsSubstring("checksum"));

  auto s = e->status();
  CHECK(s["state"] == "failed");
  CHECK_THAT(s["error"].get<std::string>(), ContainsSubstring("block 9 "));
  CHECK(s["errors"]["checksum"].get<uint64_t>() == 1);
  CHECK(s["lost"].get<uint64_t>() == 1);
  CHECK(s["fault-backs"].get<uint64_t>() == 0);
  CHECK_FALSE(e->alive());
  for (const Req& q : f.agent->since(m, kMapBack)) CHECK_FALSE(overlaps(q, 9));
  CHECK(f.agent->since(m, kMapBack).empty());
  CHECK(f.agent->swapped(9));  // the waiting thread keeps waiting
  CHECK(f.hole(9));            // nothing written into the backend

  // No more purging once a block is lost.
  auto p = e->purge_now(0, 0, true);
  REQUIRE_FALSE(p.ok());
  CHECK(p.error().code == "purge-broken");

  // Another bad block: counted, but the FatalFn is called only once; the
  // lost block again: nothing at all.
  f.agent->fault(off(10));
  REQUIRE(wait_until([&] { return err(*e, "checksum") == 2; }));
  f.agent->fault(off(9));
  REQUIRE(wait_until([&] { return st(*e, "faults") == 3; }));
  std::this_thread::sleep_for(100ms);
  CHECK(f.fatal_calls().size() == 1);
  CHECK(err(*e, "checksum") == 2);
  CHECK(f.agent->since(m, kMapBack).empty());
  e.reset();
}

// -- read-ahead ---------------------------------------------------------------------

namespace {

// The .vbd slot that holds block b's pattern (slot s sits at (s + 1) x
// block size), found by content.
uint64_t slot_of(const Fixture& f, uint64_t b) {
  int fd = open(f.vbd.c_str(), O_RDONLY | O_CLOEXEC);
  REQUIRE(fd >= 0);
  std::string want = f.orig_block(b), got(kBlock, '\0');
  for (uint64_t s = 0; s < 4 * kBlocks; s++) {
    if (pread(fd, got.data(), kBlock, static_cast<off_t>((s + 1) * kBlock)) !=
        static_cast<ssize_t>(kBlock))
      break;
    if (got == want) {
      close(fd);
      return s;
    }
  }
  close(fd);
  FAIL("no slot holds block " << b);
  return 0;
}

// Flips bits `mask` of byte `at` of block b's disk copy, behind the engine.
void flip_copy_byte(const Fixture& f, uint64_t b, uint64_t at,
                    unsigned char mask) {
  int fd = open(f.vbd.c_str(), O_RDWR | O_CLOEXEC);
  REQUIRE(fd >= 0);
  off_t o = static_cast<off_t>((slot_of(f, b) + 1) * kBlock + at);
  unsigned char x = 0;
  REQUIRE(pread(fd, &x, 1, o) == 1);
  x ^= mask;
  REQUIRE(pwrite(fd, &x, 1, o) == 1);
  REQUIRE(fsync(fd) == 0);
  close(fd);
}

bool mapped_back(const std::vector<Req>& maps, uint64_t b) {
  for (const Req& q : maps)
    if (overlaps(q, b) && q.status == 0) return true;
  return false;
}

}  // namespace

TEST_CASE("read-ahead: sequential faults bring the next blocks, random ones do not") {
  Fixture f;
  auto e = f.start();
  REQUIRE(purge_all(*e).blocks == kBlocks);
  size_t m = f.agent->mark();

  fault_back(f, 3);  // a first fault: nothing to follow yet
  fault_back(f, 4);  // sequential: a window of 2 (blocks 5, 6)
  REQUIRE(wait_until([&] { return st(*e, "fault-backs") == 4; }));
  auto maps = f.agent->since(m, kMapBack);
  for (uint64_t b : {3, 4, 5, 6}) CHECK(mapped_back(maps, b));
  CHECK_FALSE(mapped_back(maps, 7));
  CHECK(f.agent->swapped(7));
  // The reader reaches the end of the window: 4 more (8..11).
  fault_back(f, 7);
  REQUIRE(wait_until([&] { return st(*e, "fault-backs") == 9; }));
  maps = f.agent->since(m, kMapBack);
  for (uint64_t b = 8; b <= 11; b++) CHECK(mapped_back(maps, b));
  CHECK_FALSE(mapped_back(maps, 12));
  // A jump elsewhere starts over: no read-ahead.
  fault_back(f, 20);
  std::this_thread::sleep_for(100ms);
  CHECK(st(*e, "fault-backs") == 10);
  CHECK(f.agent->swapped(21));

  auto s = e->status();
  CHECK(s["readahead"]["windows"].get<uint64_t>() == 2);
  CHECK(s["readahead"]["blocks"].get<uint64_t>() == 6);
  CHECK(s["readahead"]["dropped"].get<uint64_t>() == 0);
  CHECK(s["faults"].get<uint64_t>() == 4);
  CHECK(s["fault-latency-us"]["samples"].get<uint64_t>() == 4);
  CHECK(s["resident"].get<uint64_t>() == 10);
  for (uint64_t b : {3, 4, 5, 6, 7, 8, 9, 10, 11, 20})
    CHECK(f.read_block(b) == f.orig_block(b));

  // Off by policy: sequential faults bring only themselves.
  PolicyConfig p = e->policy();
  p.readahead_bytes = 0;
  REQUIRE(e->set_policy(p).ok());
  fault_back(f, 24);
  fault_back(f, 25);
  fault_back(f, 26);
  std::this_thread::sleep_for(100ms);
  CHECK(st(*e, "fault-backs") == 13);
  CHECK(f.agent->swapped(27));
  CHECK(f.agent->rejected() == 0);
  CHECK(f.fatal_calls().empty());
  e.reset();

  // Read-ahead blocks are committed resident like faulted ones.
  RecoveryReport rep;
  auto t = f.open_table(&rep);
  for (uint64_t b : {5, 6, 8, 11}) {
    CHECK(t->entry(b).state == BlockState::Resident);
    CHECK(t->entry(b).disk_slot == kNoSlot);
  }
  CHECK(t->entry(12).state == BlockState::Purged);
}

TEST_CASE("read-ahead: a bad disk copy is dropped, and fatal only when faulted") {
  Fixture f;
  auto e = f.start();
  REQUIRE(purge_all(*e).blocks == kBlocks);
  flip_copy_byte(f, 6, 100, 0x5a);
  size_t m = f.agent->mark();
  fault_back(f, 4);
  fault_back(f, 5);  // window: 6 (bad) and 7
  REQUIRE(wait_until([&] { return st(*e, "fault-backs") == 3; }));
  REQUIRE(wait_until(
      [&] { return e->status()["readahead"]["dropped"].get<uint64_t>() == 1; }));
  auto maps = f.agent->since(m, kMapBack);
  CHECK(mapped_back(maps, 7));
  CHECK_FALSE(mapped_back(maps, 6));
  CHECK(f.agent->swapped(6));
  CHECK(f.hole(6));
  CHECK(f.fatal_calls().empty());
  CHECK(e->alive());
  CHECK(e->status()["purged"].get<uint64_t>() == kBlocks - 3);
  CHECK(err(*e, "checksum") == 1);

  // The guest reaches it: now the block is lost, and the VM must stop.
  f.agent->fault(off(6) + kPage);
  REQUIRE(wait_until([&] { return f.fatal_calls().size() == 1; }));
  CHECK_THAT(f.fatal_calls()[0], ContainsSubstring("block 6 "));
  CHECK(e->status()["state"] == "failed");
  CHECK(f.agent->swapped(6));
  e.reset();
}

TEST_CASE("read-ahead: a fault that waits on a failed read-ahead is not lost") {
  // The reader is one block ahead of hostd: the faults on 5 and 6 arrive
  // together, 6 is read ahead while its fault waits, its copy is bad: the
  // waiting fault must end in the fault path's verdict (fatal), not hang.
  for (int round = 0; round < 5; round++) {
    Fixture f;
    auto e = f.start();
    REQUIRE(purge_all(*e).blocks == kBlocks);
    flip_copy_byte(f, 6, 7, 0x80);
    fault_back(f, 4);
    f.agent->fault(off(5));
    f.agent->fault(off(6));
    REQUIRE(wait_until([&] { return f.fatal_calls().size() == 1; }));
    CHECK_THAT(f.fatal_calls()[0], ContainsSubstring("block 6 "));
    CHECK(f.agent->swapped(6));
    CHECK_FALSE(f.agent->any_swapped(5));
    e.reset();
  }
}

TEST_CASE("fault: a block read in pieces streams in; a bad copy leaves a hole") {
  Fixture f;
  auto e = f.start(0, 16 << 10);  // 4 pieces of 16 KiB per 64 KiB block
  REQUIRE(purge_all(*e).blocks == kBlocks);
  PolicyConfig p = e->policy();
  p.readahead_bytes = 0;
  REQUIRE(e->set_policy(p).ok());

  fault_back(f, 2);
  CHECK(f.read_block(2) == f.orig_block(2));
  CHECK(f.allocated(2));

  // A flipped byte in the first piece of block 12's copy (found only at
  // the end: three pieces were already written), then in the last piece
  // of block 20's (never written).
  flip_copy_byte(f, 12, 100, 0x01);
  flip_copy_byte(f, 20, kBlock - 100, 0x01);
  size_t m = f.agent->mark();
  f.agent->fault(off(12) + kPage);
  REQUIRE(wait_until([&] { return f.fatal_calls().size() == 1; }));
  f.agent->fault(off(20) + kPage);
  REQUIRE(wait_until([&] { return err(*e, "checksum") == 2; }));
  CHECK_THAT(f.fatal_calls()[0], ContainsSubstring("block 12 "));
  for (uint64_t b : {12, 20}) {
    CHECK(f.hole(b));  // nothing of it stayed in the backend
    CHECK(f.agent->swapped(b));
    for (const Req& q : f.agent->since(m, kMapBack)) CHECK_FALSE(overlaps(q, b));
  }
  e.reset();
}

// -- a full disk ---------------------------------------------------------------------

TEST_CASE("purge_now: a full disk purges what fits; freed slots are reused") {
  Fixture f;
  auto e = f.start(4);  // 4 disk slots for 32 blocks

  size_t m = f.agent->mark();
  auto r = e->purge_now(0, 8, true);
  REQUIRE(r.ok());
  CHECK(r->blocks == 4);
  CHECK(r->failed >= 1);  // the request stops at the first full batch
  CHECK_THAT(r->error, ContainsSubstring("slots"));
  CHECK(err(*e, "disk-full") > 0);
  CHECK(st(*e, "purged") == 4);
  CHECK(f.agent->since(m, kSwapOut).size() == 4);
  for (uint64_t b = 0; b < 8; b++) {
    INFO("block " << b);
    if (b < 4) {
      CHECK(f.agent->swapped(b));
      CHECK(f.hole(b));
    } else {
      CHECK_FALSE(f.agent->any_swapped(b));
      CHECK(f.allocated(b));
      CHECK(f.read_block(b) == f.orig_block(b));
    }
  }
  CHECK(e->alive());

  for (uint64_t b = 0; b < 4; b++) fault_back(f, b);
  REQUIRE(wait_until([&] { return st(*e, "fault-backs") == 4; }));
  for (uint64_t b = 0; b < 4; b++) CHECK(f.read_block(b) == f.orig_block(b));
  // The `resident` commit is batched on the control thread (every 2 s,
  // after a sync of the backend); only after it are the slots free.
  std::this_thread::sleep_for(2600ms);

  auto r2 = e->purge_now(8, 8, true);
  REQUIRE(r2.ok());
  CHECK(r2->blocks == 4);
  CHECK(st(*e, "purged") == 4);
  for (uint64_t b = 8; b < 12; b++) CHECK(f.agent->swapped(b));
  // And they come back right from the reused slots.
  for (uint64_t b = 8; b < 12; b++) {
    fault_back(f, b);
    CHECK(f.read_block(b) == f.orig_block(b));
  }
  CHECK(f.agent->rejected() == 0);
}

TEST_CASE("purge_now: a batch swaps out runs of blocks in one request") {
  Fixture f({5}, {});  // block 5 a hole
  EngineConfig c = f.config();
  c.batch_bytes = 16 << 20;  // the default: all 32 blocks in one batch
  size_t m = f.agent->mark();
  auto r = Engine::start(c, [](const std::string&) {});
  REQUIRE(r.ok());
  auto& e = *r;
  auto p = e->purge_now(0, 0, true);
  REQUIRE(p.ok());
  CHECK(p->blocks == kBlocks - 1);
  // Blocks 0-4 and 6-31 (5 is a hole): two requests.
  auto swaps = f.agent->since(m, kSwapOut);
  std::vector<std::pair<uint64_t, uint64_t>> got;
  for (const Req& q : swaps) got.emplace_back(q.offset / kBlock, q.length / kBlock);
  CHECK(got == std::vector<std::pair<uint64_t, uint64_t>>{{0, 5}, {6, 26}});
  for (uint64_t b = 0; b < kBlocks; b++)
    if (b != 5) CHECK(f.hole(b));
}

// Was a bug: the per-batch error_code was not copied into the total.
TEST_CASE("purge_now: a partial result carries its error code") {
  Fixture f;
  auto e = f.start(2);
  auto r = e->purge_now(0, 4, true);
  REQUIRE(r.ok());
  CHECK(r->blocks == 2);
  CHECK_FALSE(r->error.empty());
  CHECK(r->error_code == "disk-full");
}

// -- the agent goes away ---------------------------------------------------------------

TEST_CASE("agent gone during purge_now: partial, disconnected, no punch") {
  Fixture f;
  f.agent->close_at_swap_out(3);  // QEMU dies on the third SWAP_OUT
  auto e = f.start();
  auto r = e->purge_now(0, 0, true);
  if (r.ok()) {
    CHECK(r->blocks <= 2);
    CHECK_FALSE(r->error.empty());
  } else {
    CHECK_FALSE(r.error().message.empty());
  }
  REQUIRE(wait_until([&] { return !e->alive(); }));
  auto s = e->status();
  CHECK(s["state"] == "disconnected");
  CHECK(s["error"].is_string());
  // A range swapped out before QEMU died is not punched (a new QEMU may
  // map the file already); only blocks whose purge completed while QEMU
  // was there (batches are pipelined) are holes.
  uint64_t holes = 0;
  for (uint64_t b = 0; b < kBlocks; b++) {
    INFO("block " << b);
    if (!f.allocated(b)) {
      holes++;
      continue;
    }
    CHECK(f.read_block(b) == f.orig_block(b));
  }
  // Recorded purged: the punched ones, and any whose punch was skipped.
  CHECK(holes <= (r.ok() ? r->blocks : 0));
  auto p = e->purge_now(0, 0, true);
  REQUIRE_FALSE(p.ok());
  CHECK(p.error().code == "agent-closed");
  auto u = e->unpurge(0, 0);
  REQUIRE_FALSE(u.ok());
  CHECK(u.error().code == "agent-closed");
  e.reset();  // returns
  CHECK(f.fatal_calls().empty());

  // The next attach (a new QEMU) takes the still-allocated ranges of the
  // blocks recorded purged as resident.
  // Only the punched ones stay purged (and are swapped out again).
  f.agent->close_at_swap_out(0);
  auto e2 = f.start();
  CHECK(st(*e2, "purged") == holes);
  CHECK(st(*e2, "resident") == kBlocks - holes);
  for (uint64_t b = 0; b < kBlocks; b++)
    CHECK(f.agent->any_swapped(b) == !f.allocated(b));
  e2.reset();
  RecoveryReport rep;
  auto t = f.open_table(&rep);
  CHECK(rep.purged.size() == holes);
}

TEST_CASE("agent gone before purge_now") {
  Fixture f;
  auto e = f.start();
  f.agent->disconnect();
  REQUIRE(wait_until([&] { return !e->alive(); }));
  CHECK(e->status()["state"] == "disconnected");
  auto p = e->purge_now(0, 0, true);
  REQUIRE_FALSE(p.ok());
  CHECK(p.error().code == "agent-closed");
  for (uint64_t b = 0; b < kBlocks; b++) CHECK(f.allocated(b));
  e.reset();
  CHECK(f.fatal_calls().empty());
}

// -- unpurge -----------------------------------------------------------------------

TEST_CASE("unpurge: every purged block comes back") {
  Fixture f({5}, {7});
  auto e = f.start();
  REQUIRE(purge_all(*e).blocks == kBlocks - 1);
  size_t m = f.agent->mark();
  auto r = e->unpurge(0, 0);
  REQUIRE(r.ok());
  CHECK(r->blocks == kBlocks - 1);
  CHECK(r->failed == 0);
  CHECK(r->bytes == (kBlocks - 1) * kBlock);

  auto maps = f.agent->since(m, kMapBack);
  std::set<uint64_t> back;
  for (const Req& q : maps) {
    CHECK(q.length == kBlock);
    CHECK(q.status == 0);
    back.insert(q.offset / kBlock);
  }
  CHECK(maps.size() == kBlocks - 1);
  CHECK(back.size() == kBlocks - 1);
  CHECK(back.count(5) == 0);

  CHECK(f.read_all() == f.orig);
  for (uint64_t b = 0; b < kBlocks; b++) {
    INFO("block " << b);
    CHECK_FALSE(f.agent->any_swapped(b));
    if (b == 5)
      CHECK(f.hole(b));
    else
      CHECK(f.allocated(b));
  }
  auto s = e->status();
  CHECK(s["purged"].get<uint64_t>() == 0);
  CHECK(s["resident"].get<uint64_t>() == kBlocks);
  CHECK(s["fault-backs"].get<uint64_t>() == kBlocks - 1);
  // unpurge is not a fault: no latency samples.
  CHECK(s["fault-latency-us"]["samples"].get<uint64_t>() == 0);

  // Nothing left to bring back.
  auto r2 = e->unpurge(0, 0);
  REQUIRE(r2.ok());
  CHECK(r2->blocks == 0);
  CHECK(f.agent->rejected() == 0);
  e.reset();

  RecoveryReport rep;
  auto t = f.open_table(&rep);
  CHECK(rep.purged.empty());
}

// -- a fault pending when the engine attaches --------------------------------------
//
// The agent tells a new client, right after HELLO, about every fault still
// pending (a QEMU thread waited on a purged block while hostd restarted).
// AgentClient::connect() starts the reader thread, which delivers them to
// Engine::on_fault, before Engine::attach() has sized queued_ (and st_ ...):
// on_fault writes queued_[b] into an empty vector.  Whether that happens
// depends on which thread runs first; the second variant lets the reader
// run first.  Each variant runs in a child process, so that the crash it
// may cause is reported instead of killing the test binary.
//
// Was a bug: the agent's reader could call on_fault before the engine had
// sized its vectors (AgentClient::start() now comes after).

namespace {

// 0: the pending fault was served right; otherwise which check failed.
int pending_fault_child(int delay_ms) {
  Fixture f;
  {
    auto e = f.start();
    if (purge_all(*e).blocks != kBlocks) return 10;
  }
  f.agent->faults_after_next_hello({off(12) + kPage});
  g_delay_after_create_ms = delay_ms;
  auto e = f.start();
  g_delay_after_create_ms = 0;
  if (!wait_until([&] { return st(*e, "fault-backs") == 1; })) return 11;
  if (f.read_block(12) != f.orig_block(12)) return 12;
  if (f.agent->any_swapped(12)) return 13;
  if (st(*e, "purged") != kBlocks - 1) return 14;
  return 0;
}

std::string run_child(int delay_ms) {
  std::string base = "/var/tmp/kvmx-purge-engine-child-XXXXXX";
  REQUIRE(mkdtemp(base.data()));
  pid_t pid = fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    g_tmp_base = base;
    // Catch2's handlers would report the crash as the parent's failure.
    signal(SIGABRT, SIG_DFL);
    signal(SIGSEGV, SIG_DFL);
    int rc = 100;
    try {
      rc = pending_fault_child(delay_ms);
    } catch (...) {
      rc = 101;  // a REQUIRE failed in the child
    }
    _exit(rc);
  }
  int ws = 0;
  REQUIRE(waitpid(pid, &ws, 0) == pid);
  std::error_code ec;
  std::filesystem::remove_all(base, ec);
  if (WIFSIGNALED(ws))
    return std::string("child killed by signal ") + strsignal(WTERMSIG(ws));
  if (WEXITSTATUS(ws) != 0)
    return "child failed check " + std::to_string(WEXITSTATUS(ws));
  return "";
}

}  // namespace

TEST_CASE("attach: a fault pending at HELLO is served") {
  // The usual order: attach sizes its state before the reader runs.
  CHECK(run_child(0) == "");
  // The reader first (the creating thread sleeps 100 ms after creating it).
  CHECK(run_child(100) == "");
}
