// A VM's memory saved to a file (snapshot) or loaded from one (restore):
// QEMU's `migrate file:PATH` and `migrate-incoming file:PATH`, with the
// disk-dedup capability by the same policy as a migration (dedup.h), a
// sample every `interval` and an end: completed, failed or cancelled.
//
// save:    checks the VM (running or paused, no migration under way),
//          decides dedup, stops the VM, sets the capabilities, migrates
//          to the file, follows; at the end the VM stays paused (the
//          file is consistent with the disk as it is now) unless
//          `resume`; a failed save resumes a VM that ran.
// restore: the VM is a QEMU started with -incoming defer (the same
//          devices and disks); sets the capabilities, migrate-incoming,
//          follows; at the end the guest runs unless `resume` is false.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/result.h"
#include "dedup.h"
#include "job.h"
#include "loop/event_loop.h"

namespace kvmx::migrate {

struct FileSettings {
  bool restore = false;
  std::string path;  // absolute; checked by the caller
  DedupMode disk_dedup = DedupMode::kAuto;
  bool resume = false;  // save: cont afterwards; restore: cont afterwards
  std::optional<uint64_t> max_bandwidth;  // save only
  // restore: the capabilities the file was written with (on), from
  // stream_capabilities(); QEMU loads it only with the same.
  std::vector<std::string> file_caps;
  std::chrono::milliseconds interval{1000};
  std::chrono::milliseconds lost_contact{60000};
};

class FileJob {
 public:
  FileJob(EventLoop& loop, FileSettings settings, std::unique_ptr<Endpoint> vm,
          Job::Callbacks cb);
  ~FileJob();
  FileJob(const FileJob&) = delete;
  FileJob& operator=(const FileJob&) = delete;

  void start();
  bool ended() const { return ended_; }
  State state() const { return state_; }
  Result<nlohmann::json> outcome() const;
  nlohmann::json snapshot() const;
  const std::string& vm() const { return vm_->name(); }
  const FileSettings& settings() const { return s_; }

 private:
  template <typename Fn>
  auto guard(Fn fn);
  void run(const std::string& cmd, const nlohmann::json& args,
           std::function<void(Result<nlohmann::json>)> fn);
  void probed(const nlohmann::json& status, const nlohmann::json& mig,
              const nlohmann::json& caps);
  void decided(const std::optional<nlohmann::json>& objects);
  void configure();
  void go();
  void arm_poll();
  void sample(Result<nlohmann::json> r);
  void finish_completed();
  void end(State s, std::optional<Error> error, const std::string& message);
  void fail(Error e);
  void emit(const std::string& message);
  std::string what() const;  // "snapshot of 'x' to '/p'"

  EventLoop& loop_;
  FileSettings s_;
  std::unique_ptr<Endpoint> vm_;
  Job::Callbacks cb_;
  std::shared_ptr<bool> alive_ = std::make_shared<bool>(true);
  uint64_t gen_ = 0;

  State state_ = State::kPreparing;
  bool ended_ = false;
  std::optional<Error> error_;
  nlohmann::json caps_;
  bool dedup_cap_ = false;
  bool multifd_cap_ = false;
  bool dedup_ = false;
  std::string dedup_why_;
  bool was_running_ = false;  // save: the VM ran before hostd stopped it
  bool stopped_ = false;      // save: hostd stopped it
  bool resumed_ = false;
  std::chrono::steady_clock::time_point started_, last_contact_, last_at_{};
  EventLoop::TimerId poll_timer_ = 0;
  bool polling_ = false;
  std::string status_;
  uint64_t transferred_ = 0, remaining_ = 0, total_ = 0, bytes_per_s_ = 0;
  bool have_sample_ = false;
  std::optional<uint64_t> total_time_ms_;
  DedupStats dd_;
};

}  // namespace kvmx::migrate
