// libFuzzer target: the QMP client fed a peer's byte stream (greeting,
// replies, events), once whole and once cut into reads whose sizes come
// from the input.  Beyond not crashing: how the bytes are split must not
// change what the client makes of them (events, replies, state).  The
// first byte's low bit also asks for out-of-band execution, which a
// greeting offering "oob" then negotiates.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

#include "common/json_util.h"
#include "qmp/client.h"

using namespace kvmx;
using nlohmann::json;

namespace {

struct NullTransport : qmp::Transport {
  size_t sent = 0;
  bool closed = false;
  void send(std::string data) override { sent += data.size(); }
  void close() override { closed = true; }
};

struct Run {
  NullTransport t;
  std::vector<std::string> log;  // what the client did, in order
  qmp::Client client;

  explicit Run(bool oob)
      : client(t,
               qmp::Client::Callbacks{
                   [this] {
                     log.push_back(client.oob() ? "ready oob" : "ready");
                     // Commands in flight, so that replies match ids 2..4;
                     // the last one out of band when negotiated.
                     for (int i = 0; i < 3; i++)
                       (void)client.execute(
                           "query-kvmx-chan", json(),
                           [this](Result<json> r) {
                             log.push_back(r ? "reply " + json_dump(*r)
                                             : "error " + r.error().code);
                           },
                           i == 2);
                   },
                   [this](const qmp::Event& e) {
                     log.push_back("event " + e.name + " " +
                                   json_dump(e.data) + " " +
                                   std::to_string(e.seconds) + "." +
                                   std::to_string(e.micros));
                   },
                   [this](const std::string& why) {
                     log.push_back("closed " + why);
                   }},
               64 * 1024, 4096) {
    client.want_oob(oob);
  }
};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 2) return 0;
  // The first two bytes choose the split sizes; the rest is the stream.
  uint8_t a = data[0], b = data[1];
  std::string_view in(reinterpret_cast<const char*>(data + 2), size - 2);

  bool oob = a & 1;
  Run whole(oob);
  whole.client.on_data(in);
  whole.client.on_eof("eof");

  Run split(oob);
  size_t pos = 0, n = 0;
  while (pos < in.size()) {
    size_t len = 1 + ((n++ % 2) ? a : b) % 97;
    split.client.on_data(in.substr(pos, len));
    pos += len;
  }
  split.client.on_eof("eof");

  if (whole.log != split.log) std::abort();
  if (whole.client.protocol_errors() != split.client.protocol_errors())
    std::abort();
  return 0;
}
