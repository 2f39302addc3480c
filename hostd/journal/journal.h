// Append-only, crash-safe journal of JSON records.
//
// On-disk format (docs/specs/hostd-api.md, "Journal"): one record per line,
//   <crc32 of the JSON text, 8 lowercase hex digits> <space> <JSON object> \n
// The first record is the header {"t":"header","format":"kvmx-hostd-journal",
// "version":1}.  A record is durable once sync() returned.  Replay skips
// (and counts) records whose checksum does not match and cuts a torn last
// record (no newline) off the file.  rewrite() compacts: it writes a new file
// beside the old one, syncs it and renames it over the old one.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/fd.h"
#include "common/result.h"

namespace kvmx::journal {

constexpr int kFormatVersion = 1;
constexpr size_t kMaxRecordBytes = 1 << 20;

struct ReplayStats {
  uint64_t records = 0;     // valid records replayed, header included
  uint64_t corrupt = 0;     // complete lines skipped: bad checksum or JSON
  uint64_t torn_bytes = 0;  // bytes of an unterminated last record cut off
};

// "<crc> <json>\n" for `record`.
std::string encode(const nlohmann::json& record);
// The record in one line (without its '\n'); an error for a corrupt line.
Result<nlohmann::json> decode(std::string_view line);

class Journal {
 public:
  using RecordFn = std::function<void(const nlohmann::json&)>;

  // Opens or creates the journal at `path` and feeds every valid record
  // except the header to `fn`.  A file whose records are all invalid, or
  // that starts with another header, is refused, never overwritten.
  static Result<std::unique_ptr<Journal>> open(const std::string& path,
                                               const RecordFn& fn,
                                               ReplayStats* stats);

  // Writes the record (not yet durable).  A failed write leaves the file
  // as it was.
  Result<void> append(const nlohmann::json& record);
  // Makes every appended record durable (fdatasync).
  Result<void> sync();
  // Replaces the whole journal with header + `records`, atomically.
  Result<void> rewrite(const std::vector<nlohmann::json>& records);

  const std::string& path() const { return path_; }
  uint64_t size_bytes() const { return size_; }
  uint64_t records() const { return records_; }

 private:
  Journal(std::string path, UniqueFd fd, uint64_t size, uint64_t records)
      : path_(std::move(path)), fd_(std::move(fd)), size_(size),
        records_(records) {}

  std::string path_;
  UniqueFd fd_;
  uint64_t size_;
  uint64_t records_;
  bool dirty_ = false;
};

// fsync() of the directory holding `path`, so a create or rename is durable.
Result<void> sync_parent_dir(const std::string& path);

}  // namespace kvmx::journal
