// Quarantine on crash: while hostd handles one VM's QMP input (a Scope is
// open), a fatal signal (SIGSEGV, including a stack overflow, SIGBUS,
// SIGILL, SIGFPE, SIGABRT) appends the journal record
//   {"reason":"crash","t":"quarantine","vm":"<name>"}
// before hostd dies, so that the next start does not re-attach the VM whose
// peer crashed it (docs/specs/hostd-api.md, "Quarantine").  The handler
// runs on an alternate stack and only calls async-signal-safe functions.
#pragma once

#include <string>
#include <string_view>

#include "result.h"

namespace kvmx::crash {

// Installs the handlers (once per process).
Result<void> install();
// The journal's fd (-1: none); hostd updates it when compaction swaps files.
void set_journal_fd(int fd);

// The VM whose input is being handled; nests (restores the outer one).
// `vm` must outlive the scope and be a valid VM name (no JSON escaping).
class Scope {
 public:
  explicit Scope(const std::string& vm);
  ~Scope();
  Scope(const Scope&) = delete;
  Scope& operator=(const Scope&) = delete;

 private:
  const std::string* prev_;
};

// The record the handler writes for `vm` ("<crc> <json>\n"), for tests.
std::string record_for(std::string_view vm);

}  // namespace kvmx::crash
