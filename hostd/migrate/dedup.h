// Whether a migration (or a snapshot to a file) uses QEMU's `disk-dedup`
// capability (qemu-patches/07-disk-dedup, docs/design/disk-dedup.md): guest
// pages that are copies of blocks of the VM's disk go as references
// (disk, offset, hash) and the destination reads the block from its own
// open image.  That is only right when the destination opens the same
// image: shared storage, which only the operator can vouch for.
//
//   off   never; the capability is set off where QEMU has it.
//   on    required: both QEMUs have the capability and a kvmx-disk-dedup
//         object with at least one disk, and the storage is shared
//         (--shared-storage); anything missing is an error before
//         anything is set.
//   auto  (the default) on when all of that holds, else off, saying why.
//
// Also refused (on) or skipped (auto): a QEMU with mapped-ram or xbzrle
// already on (QEMU refuses disk-dedup with them; multifd works with it
// since 07-disk-dedup patch 10).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/result.h"

namespace kvmx::migrate {

enum class DedupMode { kAuto, kOn, kOff };
const char* to_string(DedupMode m);
// "auto", "on", "off"; nothing for anything else.
std::optional<DedupMode> parse_dedup_mode(const std::string& s);

// What one QEMU offers.
struct DedupSide {
  std::string vm;
  bool capability = false;        // query-migrate-capabilities lists disk-dedup
  bool queried = false;           // query-kvmx-disk-dedup answered
  size_t objects = 0;             // kvmx-disk-dedup objects
  std::vector<std::string> disks;  // devices attached to one (images[].device)
  std::vector<std::string> conflicts;  // mapped-ram, xbzrle that are on
};

// A side from the answers of query-migrate-capabilities (a list of
// {capability, state}) and of query-kvmx-disk-dedup (nothing: the command
// is unknown, as in stock QEMU).  Bounded: at most 64 objects and 64 disks
// of 128 bytes are looked at.
DedupSide dedup_side(const std::string& vm, const nlohmann::json& capabilities,
                     const std::optional<nlohmann::json>& objects);

struct DedupDecision {
  bool enable = false;
  std::string why;  // for people: why on, or why not (auto)
};

// The decision for a migration from `src` to `dst`; with mode on, an
// error (migration-unsupported: a QEMU lacks the capability or the
// object; migration-refused: no --shared-storage, a conflicting
// capability) instead of off.
Result<DedupDecision> decide_dedup(DedupMode mode, bool shared_storage,
                                   const DedupSide& src, const DedupSide& dst);
// The same for a snapshot of `src` to a file: no destination QEMU, no
// shared-storage word (the file is restored on the disk it refers to).
Result<DedupDecision> decide_dedup_file(DedupMode mode, const DedupSide& src);

// The migration capabilities a QEMU migration stream (a snapshot file)
// was written with: the ones on, from its configuration section
// ("configuration/capabilities") near its start; QEMU refuses to load a
// stream whose validated capabilities (x-ignore-shared, mapped-ram,
// disk-dedup) differ from its own.  Nothing when `head` (the file's first
// bytes) has no such section or it is malformed; at most 64 names of at
// most 64 bytes.
std::optional<std::vector<std::string>> stream_capabilities(
    std::string_view head);
// The decision for a restore from a file written with `file_dedup`.
Result<DedupDecision> decide_dedup_restore(DedupMode mode, bool file_dedup,
                                           const DedupSide& vm);

// query-migrate's "disk-dedup" member, bounded and typed.
struct DedupStats {
  bool present = false;
  uint64_t pages_as_reference = 0, bytes_saved = 0, images_refused = 0;
  std::string refused_reason;  // the source's, at most 512 bytes
  uint64_t references_resolved = 0, mismatches = 0, read_errors = 0,
           read_time_ms = 0;
  uint64_t disk_reads = 0;  // 0 from a QEMU before 07-disk-dedup patch 6
  // Without a return path (a snapshot) the source checks each reference
  // against its own disk (07-disk-dedup patch 12; 0 before): the pages it
  // checked, and those it found unlike their block and sent in full.
  uint64_t pages_checked = 0, pages_unlike_disk = 0;
};
DedupStats dedup_stats(const nlohmann::json& query_migrate);
// "(read time N ms, summed over the reads in flight[, M reads])": the
// destination's reads, for progress and outcome lines.
std::string dedup_read_text(const DedupStats& d);

}  // namespace kvmx::migrate
