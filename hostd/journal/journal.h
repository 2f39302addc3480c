// Append-only, crash-safe journal of JSON records.
//
// On-disk format (docs/specs/hostd-api.md, "Journal"): one record per line,
//   <crc32 of the JSON text, 8 lowercase hex digits> <space> <JSON object> \n
// The first two records are copies of the header {"t":"header","format":
// "kvmx-hostd-journal","version":1}: one damaged copy loses nothing.  A
// record is durable once sync() returned.  Replay skips (and counts)
// records whose checksum does not match and cuts a torn last record (no
// newline) off the file.  Compaction writes a new file beside the old one,
// syncs it and renames it over the old one; its slow part (writing the
// snapshot) may run on another thread (begin_rewrite / write_rewrite /
// finish_rewrite).
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
constexpr size_t kMaxRecordDepth = 8;

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

  // Writes the record (not yet durable).  A failed write (ENOSPC) leaves
  // the file as it was.
  Result<void> append(const nlohmann::json& record);
  // Makes every appended record durable (fdatasync).  When it fails, the
  // records appended since the last successful sync are cut off again
  // (their fate on disk is unknown): the caller still holds them and may
  // append them again.
  Result<void> sync();
  bool dirty() const { return dirty_; }

  // Replaces the whole journal with header + `records`, atomically
  // (begin_rewrite + write_rewrite + finish_rewrite in a row).
  Result<void> rewrite(const std::vector<nlohmann::json>& records);

  // Compaction in steps.  begin_rewrite(), on the owner's thread with
  // nothing unsynced, notes where the journal ends.  write_rewrite() may
  // run on any thread: it touches only <path>.tmp.  finish_rewrite(), on
  // the owner's thread, copies the records appended since begin_rewrite()
  // to the new file, syncs it and renames it over the journal.  On any
  // error the journal stays as it was and <path>.tmp is removed.
  struct Rewrite {
    std::string path;  // the journal's
    uint64_t base = 0;  // journal size at begin_rewrite()
    UniqueFd fd;
    uint64_t size = 0;
    uint64_t records = 0;
  };
  Rewrite begin_rewrite() const;
  static Result<void> write_rewrite(Rewrite& rw,
                                    const std::vector<nlohmann::json>& records);
  Result<void> finish_rewrite(Rewrite& rw);
  static void abandon_rewrite(Rewrite& rw);

  const std::string& path() const { return path_; }
  int fd() const { return fd_.get(); }
  uint64_t size_bytes() const { return size_; }
  uint64_t records() const { return records_; }

 private:
  Journal(std::string path, UniqueFd fd, uint64_t size, uint64_t records)
      : path_(std::move(path)), fd_(std::move(fd)), size_(size),
        records_(records), synced_size_(size), synced_records_(records) {}

  std::string path_;
  UniqueFd fd_;
  uint64_t size_;
  uint64_t records_;
  uint64_t synced_size_;
  uint64_t synced_records_;
  bool dirty_ = false;
};

// The header record; the journal starts with two copies of it.
nlohmann::json header_record();

// fsync() of the directory holding `path`, so a create or rename is durable.
Result<void> sync_parent_dir(const std::string& path);

}  // namespace kvmx::journal
