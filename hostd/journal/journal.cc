#include "journal.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <optional>

#include "common/crc32.h"
#include "common/json_util.h"

namespace kvmx::journal {
namespace {

using nlohmann::json;

// Record types hostd writes: a file whose header is damaged but whose other
// records are of these types is a journal, not some other file.
bool hostd_record_type(const std::string& t) {
  static const char* kTypes[] = {"attach",   "libvirt-attach", "detach",
                                 "violation", "totals",        "next-seq",
                                 "attaching", "attach-ok",     "quarantine"};
  for (const char* k : kTypes)
    if (t == k) return true;
  return false;
}

Result<void> write_all(int fd, std::string_view data) {
  while (!data.empty()) {
    ssize_t n = ::write(fd, data.data(), data.size());
    if (n < 0) {
      if (errno == EINTR) continue;
      return sys_error("journal-write", "Failed to write the journal");
    }
    data.remove_prefix(static_cast<size_t>(n));
  }
  return {};
}

int hex_value(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  return -1;
}

// Reads the file line by line.  `on_line(line)` gets each complete line
// without its newline, or nullopt for a line over kMaxRecordBytes.
// Returns the offset just past the last newline.
template <typename Fn>
Result<uint64_t> scan_lines(int fd, Fn&& on_line) {
  std::string pending;
  bool overlong = false;  // inside a line already over the limit
  uint64_t offset = 0, last_newline_end = 0;
  std::vector<char> buf(1 << 20);
  for (;;) {
    ssize_t n = ::read(fd, buf.data(), buf.size());
    if (n < 0) {
      if (errno == EINTR) continue;
      return sys_error("journal-read", "Failed to read the journal");
    }
    if (n == 0) break;
    std::string_view chunk(buf.data(), static_cast<size_t>(n));
    while (!chunk.empty()) {
      size_t nl = chunk.find('\n');
      std::string_view part = chunk.substr(0, nl);
      if (!overlong) {
        pending.append(part);
        if (pending.size() > kMaxRecordBytes) {
          overlong = true;
          pending.clear();
        }
      }
      if (nl == std::string_view::npos) {
        offset += chunk.size();
        break;
      }
      offset += nl + 1;
      last_newline_end = offset;
      if (overlong)
        on_line(std::optional<std::string_view>());
      else
        on_line(std::optional<std::string_view>(pending));
      pending.clear();
      overlong = false;
      chunk.remove_prefix(nl + 1);
    }
  }
  return last_newline_end;
}

}  // namespace

json header_record() {
  return json{{"t", "header"},
              {"format", "kvmx-hostd-journal"},
              {"version", kFormatVersion}};
}

std::string encode(const json& record) {
  std::string text =
      record.dump(-1, ' ', false, json::error_handler_t::replace);
  char crc[16];
  std::snprintf(crc, sizeof(crc), "%08x ", crc32(text));
  return crc + text + '\n';
}

Result<json> decode(std::string_view line) {
  if (line.size() < 10 || line[8] != ' ')
    return make_error("journal-corrupt", "record too short");
  uint32_t want = 0;
  for (int i = 0; i < 8; i++) {
    int v = hex_value(line[static_cast<size_t>(i)]);
    if (v < 0) return make_error("journal-corrupt", "bad checksum field");
    want = (want << 4) | static_cast<uint32_t>(v);
  }
  std::string_view text = line.substr(9);
  if (crc32(text) != want)
    return make_error("journal-corrupt", "checksum mismatch");
  // hostd writes flat records; a deep one is damage (or an attack on the
  // state directory) and must not cost the stack.
  auto rec = parse_json(text, JsonLimits{kMaxRecordDepth, kMaxRecordBytes});
  if (!rec || !rec->is_object())
    return make_error("journal-corrupt", "record is not a JSON object");
  return rec;
}

Result<void> sync_parent_dir(const std::string& path) {
  auto slash = path.rfind('/');
  std::string dir = slash == std::string::npos ? "."
                    : slash == 0              ? "/"
                                              : path.substr(0, slash);
  UniqueFd fd(::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (!fd) return sys_error("journal-sync", "Failed to open '" + dir + "'");
  if (::fsync(fd.get()) < 0)
    return sys_error("journal-sync", "Failed to sync '" + dir + "'");
  return {};
}

Result<std::unique_ptr<Journal>> Journal::open(const std::string& path,
                                               const RecordFn& fn,
                                               ReplayStats* stats) {
  ReplayStats local;
  ReplayStats& st = stats ? *stats : local;
  st = ReplayStats{};

  UniqueFd fd(::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600));
  if (!fd) return sys_error("journal-open", "Failed to open '" + path + "'");

  bool seen_header = false;
  bool first_line_corrupt = false;
  uint64_t lines = 0;
  std::optional<Error> refused;
  auto scanned = scan_lines(fd.get(), [&](std::optional<std::string_view> l) {
    if (refused) return;
    lines++;
    auto rec = l ? decode(*l) : Result<json>(make_error("", ""));
    if (!rec) {
      st.corrupt++;
      if (lines == 1) first_line_corrupt = true;
      return;
    }
    st.records++;
    const json& r = *rec;
    std::string type = r.value("t", "");
    if (type == "header") {
      // The first one decides; later copies (the redundant second header,
      // or a journal appended to itself) are checked and skipped.
      if (r.value("format", "") != "kvmx-hostd-journal") {
        if (!seen_header)
          refused = make_error("journal-format",
                               "'" + path + "' is not a kvmx-hostd journal");
      } else if (r.value("version", 0) != kFormatVersion) {
        refused = make_error("journal-format",
                             "'" + path + "' has an unsupported version");
      }
      seen_header = true;
      return;
    }
    if (!seen_header) {
      if (first_line_corrupt && hostd_record_type(type)) {
        // A journal of the first format (one header) whose header was
        // damaged: say how to get the records back.
        std::string hdr = encode(header_record());
        hdr.pop_back();
        refused = make_error(
            "journal-format",
            "'" + path + "' starts with a damaged header, but its other "
            "records are kvmx-hostd's; to recover them, stop kvmx-hostd and "
            "run: sed -i '1i " + hdr + "' '" + path + "' (hostd then skips "
            "the damaged line and rewrites the journal clean)");
      } else {
        refused = make_error("journal-format",
                             "'" + path + "' is not a kvmx-hostd journal");
      }
      return;
    }
    fn(r);
  });
  if (!scanned) return scanned.error();
  if (refused) return *refused;

  struct stat sb{};
  if (::fstat(fd.get(), &sb) < 0)
    return sys_error("journal-open", "Failed to stat '" + path + "'");
  uint64_t end = *scanned;
  if (static_cast<uint64_t>(sb.st_size) > end) {
    st.torn_bytes = static_cast<uint64_t>(sb.st_size) - end;
    if (::ftruncate(fd.get(), static_cast<off_t>(end)) < 0)
      return sys_error("journal-open", "Failed to cut the torn record off '" +
                                           path + "'");
  }
  if (!seen_header && st.corrupt > 0)
    return make_error("journal-format",
                      "'" + path + "' holds no valid record; move it away "
                      "to start with an empty journal");

  std::unique_ptr<Journal> j(
      new Journal(path, std::move(fd), end, st.records));
  if (::lseek(j->fd_.get(), 0, SEEK_END) < 0)
    return sys_error("journal-open", "Failed to seek in '" + path + "'");
  if (!seen_header) {
    for (int copy = 0; copy < 2; copy++)
      if (auto r = j->append(header_record()); !r) return r.error();
    if (auto r = j->sync(); !r) return r.error();
    if (auto r = sync_parent_dir(path); !r) return r.error();
  } else if (st.torn_bytes) {
    if (auto r = j->sync(); !r) return r.error();
  }
  return j;
}

Result<void> Journal::append(const json& record) {
  std::string line = encode(record);
  if (auto r = write_all(fd_.get(), line); !r) {
    // Leave no partial record behind: cut back to the last whole one.
    if (::ftruncate(fd_.get(), static_cast<off_t>(size_)) == 0)
      ::lseek(fd_.get(), 0, SEEK_END);
    return r;
  }
  size_ += line.size();
  records_++;
  dirty_ = true;
  return {};
}

Result<void> Journal::sync() {
  if (!dirty_) return {};
  if (::fdatasync(fd_.get()) < 0) {
    Error e = sys_error("journal-sync", "Failed to sync '" + path_ + "'");
    // What reached the disk is unknown: cut back to the last durable state,
    // so that the caller's retry does not leave records twice.
    if (::ftruncate(fd_.get(), static_cast<off_t>(synced_size_)) == 0) {
      ::lseek(fd_.get(), 0, SEEK_END);
      size_ = synced_size_;
      records_ = synced_records_;
      dirty_ = false;
    }
    return e;
  }
  dirty_ = false;
  synced_size_ = size_;
  synced_records_ = records_;
  return {};
}

Journal::Rewrite Journal::begin_rewrite() const {
  Rewrite rw;
  rw.path = path_;
  rw.base = size_;
  return rw;
}

void Journal::abandon_rewrite(Rewrite& rw) {
  if (!rw.fd) return;
  rw.fd.reset();
  ::unlink((rw.path + ".tmp").c_str());
}

Result<void> Journal::write_rewrite(Rewrite& rw,
                                    const std::vector<json>& records) {
  std::string tmp = rw.path + ".tmp";
  rw.fd = UniqueFd(
      ::open(tmp.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600));
  if (!rw.fd)
    return sys_error("journal-compact", "Failed to create '" + tmp + "'");
  auto fail = [&](Error e) -> Result<void> {
    abandon_rewrite(rw);
    return e;
  };
  std::string out = encode(header_record());
  out += out;  // two copies
  rw.size = 0;
  for (const auto& rec : records) {
    out += encode(rec);
    if (out.size() >= (1 << 20)) {
      if (auto r = write_all(rw.fd.get(), out); !r) return fail(r.error());
      rw.size += out.size();
      out.clear();
    }
  }
  if (auto r = write_all(rw.fd.get(), out); !r) return fail(r.error());
  rw.size += out.size();
  rw.records = records.size() + 2;
  if (::fdatasync(rw.fd.get()) < 0)
    return fail(sys_error("journal-compact", "Failed to sync '" + tmp + "'"));
  return {};
}

Result<void> Journal::finish_rewrite(Rewrite& rw) {
  std::string tmp = path_ + ".tmp";
  auto fail = [&](Error e) -> Result<void> {
    abandon_rewrite(rw);
    return e;
  };
  if (!rw.fd || rw.path != path_ || rw.base > size_)
    return fail(make_error("journal-compact", "stale compaction"));
  // Records appended meanwhile (attach, violations, markers) follow the
  // snapshot in the new file, in their order.
  uint64_t tail_records = 0;
  for (uint64_t off = rw.base; off < size_;) {
    char buf[1 << 16];
    size_t want = static_cast<size_t>(std::min<uint64_t>(sizeof(buf), size_ - off));
    ssize_t n = ::pread(fd_.get(), buf, want, static_cast<off_t>(off));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0)
      return fail(sys_error("journal-compact",
                            "Failed to read '" + path_ + "'", n < 0 ? errno : EIO));
    std::string_view chunk(buf, static_cast<size_t>(n));
    for (char c : chunk) tail_records += c == '\n';
    if (auto r = write_all(rw.fd.get(), chunk); !r) return fail(r.error());
    off += static_cast<uint64_t>(n);
  }
  if (size_ > rw.base && ::fdatasync(rw.fd.get()) < 0)
    return fail(sys_error("journal-compact", "Failed to sync '" + tmp + "'"));
  if (::rename(tmp.c_str(), path_.c_str()) < 0)
    return fail(sys_error("journal-compact",
                          "Failed to rename '" + tmp + "' to '" + path_ + "'"));
  // The new file is the journal now, whatever the directory sync says.
  fd_ = std::move(rw.fd);
  ::lseek(fd_.get(), 0, SEEK_END);
  size_ = rw.size + (size_ - rw.base);
  records_ = rw.records + tail_records;
  synced_size_ = size_;
  synced_records_ = records_;
  dirty_ = false;
  return sync_parent_dir(path_);
}

Result<void> Journal::rewrite(const std::vector<json>& records) {
  if (auto r = sync(); !r) return r;
  Rewrite rw = begin_rewrite();
  if (auto r = write_rewrite(rw, records); !r) return r;
  return finish_rewrite(rw);
}

}  // namespace kvmx::journal
