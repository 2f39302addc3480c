// The byte stream a QMP client talks over.  The real one is a Unix socket
// (UnixTransport); unit tests use a fake that records what was sent.
#pragma once

#include <string>

namespace kvmx::qmp {

class Transport {
 public:
  virtual ~Transport() = default;
  // Queues bytes for the peer.  Never calls back into the client.
  virtual void send(std::string data) = 0;
  // Drops the connection; nothing is delivered afterwards.
  virtual void close() = 0;
};

}  // namespace kvmx::qmp
