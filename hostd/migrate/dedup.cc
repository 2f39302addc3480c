#include "dedup.h"

#include "common/json_util.h"

namespace kvmx::migrate {

using nlohmann::json;

namespace {

constexpr const char* kUnsupported = "migration-unsupported";
constexpr const char* kRefused = "migration-refused";
constexpr size_t kMaxObjects = 64;
constexpr size_t kMaxDisks = 64;
constexpr size_t kMaxName = 128;

std::string cut(std::string s, size_t max) {
  if (s.size() > max) s.resize(max);
  return s;
}

std::string join(const std::vector<std::string>& v) {
  std::string out;
  for (const auto& s : v) out += (out.empty() ? "" : ", ") + s;
  return out;
}

// Why this side cannot dedup, or "".  `role`: "VM 'x'".
std::string lacks(const DedupSide& s) {
  std::string who = "the QEMU of VM '" + s.vm + "'";
  if (!s.capability)
    return who + " has no migration capability 'disk-dedup' (it is not a "
                 "kvmx QEMU with topic 07-disk-dedup)";
  if (s.objects == 0)
    return "VM '" + s.vm +
           "' has no kvmx-disk-dedup object (-object "
           "kvmx-disk-dedup,id=dd0 and virtio-blk-pci,...,disk-dedup=dd0)";
  if (s.disks.empty())
    return "VM '" + s.vm +
           "' has a kvmx-disk-dedup object but no disk attached to it "
           "(virtio-blk-pci,...,disk-dedup=ID)";
  return "";
}

std::string conflict(const DedupSide& s) {
  if (s.conflicts.empty()) return "";
  return "the QEMU of VM '" + s.vm + "' has " + join(s.conflicts) +
         " on, which QEMU does not combine with disk-dedup";
}

}  // namespace

const char* to_string(DedupMode m) {
  switch (m) {
    case DedupMode::kAuto: return "auto";
    case DedupMode::kOn: return "on";
    case DedupMode::kOff: return "off";
  }
  return "?";
}

std::optional<DedupMode> parse_dedup_mode(const std::string& s) {
  if (s == "auto") return DedupMode::kAuto;
  if (s == "on") return DedupMode::kOn;
  if (s == "off") return DedupMode::kOff;
  return std::nullopt;
}

DedupSide dedup_side(const std::string& vm, const json& capabilities,
                     const std::optional<json>& objects) {
  DedupSide s;
  s.vm = vm;
  if (capabilities.is_array())
    for (const auto& c : capabilities) {
      auto name = json_string(c, "capability").value_or("");
      const json* st = json_field(c, "state");
      bool on = st && st->is_boolean() && st->get<bool>();
      if (name == "disk-dedup") s.capability = true;
      if (on && (name == "mapped-ram" || name == "xbzrle"))
        s.conflicts.push_back(name);
    }
  if (objects && objects->is_array()) {
    s.queried = true;
    for (const auto& o : *objects) {
      if (s.objects >= kMaxObjects) break;
      s.objects++;
      const json* images = json_field(o, "images");
      if (!images || !images->is_array()) continue;
      for (const auto& i : *images) {
        if (s.disks.size() >= kMaxDisks) break;
        s.disks.push_back(cut(json_string(i, "device").value_or("?"), kMaxName));
      }
    }
  }
  return s;
}

Result<DedupDecision> decide_dedup(DedupMode mode, bool shared_storage,
                                   const DedupSide& src, const DedupSide& dst) {
  if (mode == DedupMode::kOff) return DedupDecision{false, "--disk-dedup=off"};
  for (const auto* side : {&src, &dst})
    if (auto why = lacks(*side); !why.empty()) {
      if (mode == DedupMode::kOn)
        return make_error(kUnsupported, "--disk-dedup=on, but " + why);
      return DedupDecision{false, why};
    }
  if (!shared_storage) {
    std::string why =
        "the storage is not said to be shared (--shared-storage): the "
        "destination would read the blocks from an image that may differ";
    if (mode == DedupMode::kOn)
      return make_error(kRefused, "--disk-dedup=on, but " + why);
    return DedupDecision{false, why};
  }
  for (const auto* side : {&src, &dst})
    if (auto why = conflict(*side); !why.empty()) {
      if (mode == DedupMode::kOn)
        return make_error(kRefused, "--disk-dedup=on, but " + why);
      return DedupDecision{false, why};
    }
  return DedupDecision{
      true, "disks " + join(src.disks) + " of '" + src.vm + "' and " +
                join(dst.disks) + " of '" + dst.vm + "' on shared storage"};
}

Result<DedupDecision> decide_dedup_file(DedupMode mode, const DedupSide& src) {
  if (mode == DedupMode::kOff) return DedupDecision{false, "--disk-dedup=off"};
  for (auto [why, code] : {std::pair{lacks(src), kUnsupported},
                            std::pair{conflict(src), kRefused}})
    if (!why.empty()) {
      if (mode == DedupMode::kOn)
        return make_error(code, "--disk-dedup=on, but " + why);
      return DedupDecision{false, why};
    }
  return DedupDecision{true, "disks " + join(src.disks) + " of '" + src.vm +
                                 "': the file refers to their blocks"};
}

std::optional<std::vector<std::string>> stream_capabilities(
    std::string_view head) {
  // "QEVM", version 3, QEMU_VM_CONFIGURATION (7), the machine type, then
  // subsections: 5, a name, a be32 version, the data.  The capabilities'
  // data: a be32 count, then each name as a byte length and the bytes.
  if (head.size() < 8 || head.substr(0, 4) != "QEVM") return std::nullopt;
  static constexpr std::string_view kName = "configuration/capabilities";
  size_t at = head.find(kName);
  if (at == std::string_view::npos || at == 0 ||
      static_cast<unsigned char>(head[at - 1]) != kName.size())
    return std::nullopt;
  size_t p = at + kName.size() + 4;  // past the version
  auto be32 = [&](size_t off) -> std::optional<uint32_t> {
    if (off + 4 > head.size()) return std::nullopt;
    uint32_t v = 0;
    for (int i = 0; i < 4; i++)
      v = v << 8 | static_cast<unsigned char>(head[off + i]);
    return v;
  };
  auto count = be32(p);
  if (!count || *count > 64) return std::nullopt;
  p += 4;
  std::vector<std::string> caps;
  for (uint32_t i = 0; i < *count; i++) {
    if (p >= head.size()) return std::nullopt;
    size_t len = static_cast<unsigned char>(head[p++]);
    if (len == 0 || len > 64 || p + len > head.size()) return std::nullopt;
    std::string name(head.substr(p, len));
    for (char c : name)
      if (!((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-'))
        return std::nullopt;
    caps.push_back(std::move(name));
    p += len;
  }
  return caps;
}

Result<DedupDecision> decide_dedup_restore(DedupMode mode, bool file_dedup,
                                           const DedupSide& vm) {
  if (!file_dedup) {
    if (mode == DedupMode::kOn)
      return make_error(kRefused,
                        "--disk-dedup=on, but the file was written without "
                        "disk-dedup (QEMU loads it only with the capability "
                        "as it was written)");
    return DedupDecision{false, "the file was written without disk-dedup"};
  }
  if (mode == DedupMode::kOff)
    return make_error(kRefused,
                      "--disk-dedup=off, but the file was written with "
                      "disk-dedup: its pages that are disk references can "
                      "only be read back with it");
  if (auto why = lacks(vm); !why.empty())
    return make_error(kUnsupported,
                      "the file was written with disk-dedup, but " + why);
  return DedupDecision{true, "the file was written with disk-dedup; disks " +
                                 join(vm.disks) + " of '" + vm.vm + "'"};
}

DedupStats dedup_stats(const json& info) {
  DedupStats d;
  const json* dd = json_field(info, "disk-dedup");
  if (!dd || !dd->is_object()) return d;
  d.present = true;
  d.pages_as_reference = json_u64(*dd, "pages-as-reference").value_or(0);
  d.bytes_saved = json_u64(*dd, "bytes-saved").value_or(0);
  d.images_refused = json_u64(*dd, "images-refused").value_or(0);
  d.refused_reason = cut(json_string(*dd, "refused-reason").value_or(""), 512);
  d.references_resolved = json_u64(*dd, "references-resolved").value_or(0);
  d.mismatches = json_u64(*dd, "mismatches").value_or(0);
  d.read_errors = json_u64(*dd, "read-errors").value_or(0);
  d.read_time_ms = json_u64(*dd, "read-time-ms").value_or(0);
  d.disk_reads = json_u64(*dd, "disk-reads").value_or(0);
  d.pages_checked = json_u64(*dd, "pages-checked").value_or(0);
  d.pages_unlike_disk = json_u64(*dd, "pages-unlike-disk").value_or(0);
  return d;
}

std::string dedup_read_text(const DedupStats& d) {
  std::string s = "(read time " + std::to_string(d.read_time_ms) +
                  " ms, summed over the reads in flight";
  if (d.disk_reads) s += ", " + std::to_string(d.disk_reads) + " reads";
  return s + ")";
}

}  // namespace kvmx::migrate
