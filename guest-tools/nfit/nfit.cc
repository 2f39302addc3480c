// SPDX-License-Identifier: GPL-2.0-or-later
#include "nfit.h"

#include <kvmx/nfit.h>

#include <cstring>
#include <set>
#include <sstream>

namespace kvmx::nfit {
namespace {

template <typename T>
T load(std::span<const uint8_t> b, size_t off)
{
    T v;
    std::memcpy(&v, b.data() + off, sizeof(v));
    return v;  // x86 and the ACPI tables are both little endian
}

ParseError err(std::string what, size_t off)
{
    return ParseError{std::move(what), off};
}

// Minimum length of each structure type we decode.
size_t min_length(uint16_t type)
{
    switch (type) {
    case KVMX_NFIT_SPA: return sizeof(kvmx_nfit_spa);
    case KVMX_NFIT_MEMDEV: return sizeof(kvmx_nfit_memdev);
    case KVMX_NFIT_DCR: return 32;
    case KVMX_NFIT_FLUSH_HINT: return sizeof(kvmx_nfit_flush_hint);
    case KVMX_NFIT_CAPS: return 16;
    default: return sizeof(kvmx_nfit_sub);
    }
}

}  // namespace

ParseResult parse(std::span<const uint8_t> b)
{
    if (b.size() < sizeof(kvmx_nfit_header))
        return err("table shorter than the NFIT header", 0);
    auto hdr = load<kvmx_nfit_header>(b, 0);
    if (std::memcmp(hdr.signature, KVMX_NFIT_SIGNATURE, 4) != 0)
        return err("signature is not NFIT", 0);
    if (hdr.length != b.size())
        return err("header length " + std::to_string(hdr.length) +
                   " != table size " + std::to_string(b.size()), 4);
    uint8_t sum = 0;
    for (uint8_t c : b)
        sum += c;
    if (sum != 0)
        return err("checksum mismatch", 9);

    Table t;
    t.revision = hdr.revision;
    t.oem_id.assign(hdr.oem_id, strnlen(hdr.oem_id, sizeof(hdr.oem_id)));

    const uint8_t pm_guid[16] = KVMX_NFIT_SPA_PM_GUID;
    size_t off = sizeof(kvmx_nfit_header);
    while (off < b.size()) {
        if (b.size() - off < sizeof(kvmx_nfit_sub))
            return err("truncated structure header", off);
        auto sub = load<kvmx_nfit_sub>(b, off);
        if (sub.length < min_length(sub.type) || sub.length > b.size() - off)
            return err("structure type " + std::to_string(sub.type) +
                       " has bad length " + std::to_string(sub.length), off);
        auto s = b.subspan(off, sub.length);

        switch (sub.type) {
        case KVMX_NFIT_SPA: {
            auto r = load<kvmx_nfit_spa>(s, 0);
            t.spas.push_back({r.spa_index, r.flags, r.proximity_domain,
                              std::memcmp(r.type_guid, pm_guid, 16) == 0,
                              r.spa_base, r.spa_length, r.mem_attr});
            break;
        }
        case KVMX_NFIT_MEMDEV: {
            auto r = load<kvmx_nfit_memdev>(s, 0);
            t.memdevs.push_back({r.device_handle, r.phys_id, r.region_id,
                                 r.spa_index, r.dcr_index, r.region_len,
                                 r.region_offset, r.region_dpa,
                                 r.interleave_ways, r.flags});
            break;
        }
        case KVMX_NFIT_DCR:
            t.dcr_indexes.push_back(load<uint16_t>(s, 4));
            break;
        case KVMX_NFIT_FLUSH_HINT: {
            auto r = load<kvmx_nfit_flush_hint>(s, 0);
            size_t want = sizeof(r) + size_t{r.hint_count} * 8;
            if (sub.length != want)
                return err("flush hint structure length " +
                           std::to_string(sub.length) + " != 16 + 8 * " +
                           std::to_string(r.hint_count), off);
            FlushHint fh{r.device_handle, {}};
            for (size_t i = 0; i < r.hint_count; i++)
                fh.addresses.push_back(load<uint64_t>(s, sizeof(r) + 8 * i));
            t.flush_hints.push_back(std::move(fh));
            break;
        }
        case KVMX_NFIT_CAPS:
            t.capabilities = load<uint32_t>(s, 8);
            break;
        default:
            t.other_types.push_back(sub.type);
        }
        off += sub.length;
    }
    return t;
}

std::vector<std::string> check_flush_hints(const Table& t)
{
    std::vector<std::string> bad;
    std::set<uint32_t> handles, seen;
    for (const auto& m : t.memdevs)
        handles.insert(m.handle);

    for (const auto& fh : t.flush_hints) {
        std::string who = "flush hints of handle " + std::to_string(fh.handle);
        if (!handles.count(fh.handle))
            bad.push_back(who + ": no memory device structure has it");
        if (!seen.insert(fh.handle).second)
            bad.push_back(who + ": more than one flush hint structure");
        if (fh.addresses.empty()) {
            bad.push_back(who + ": hint count is 0");
            continue;
        }
        std::set<uint64_t> distinct(fh.addresses.begin(), fh.addresses.end());
        if (distinct.size() != fh.addresses.size())
            bad.push_back(who + ": duplicate addresses");
        uint64_t page = fh.addresses[0] / KVMX_FLUSH_HINT_PAGE_SIZE;
        for (uint64_t a : fh.addresses) {
            if (a == 0 || a % 8)
                bad.push_back(who + ": address " + std::to_string(a) +
                              " is not a valid 8-byte aligned address");
            if (a / KVMX_FLUSH_HINT_PAGE_SIZE != page)
                bad.push_back(who + ": addresses span more than one page");
            for (const auto& spa : t.spas)
                if (a >= spa.base && a - spa.base < spa.length)
                    bad.push_back(who + ": address " + std::to_string(a) +
                                  " lies inside SPA range " +
                                  std::to_string(spa.index));
        }
    }
    return bad;
}

std::string to_json(const Table& t)
{
    std::ostringstream o;
    auto list = [&](const auto& v, auto&& item) {
        o << '[';
        for (size_t i = 0; i < v.size(); i++) {
            if (i)
                o << ',';
            item(v[i]);
        }
        o << ']';
    };
    o << "{\"revision\":" << unsigned{t.revision} << ",\"oem_id\":\""
      << t.oem_id << "\",\"spa\":";
    list(t.spas, [&](const Spa& s) {
        o << "{\"index\":" << s.index << ",\"flags\":" << s.flags
          << ",\"proximity_domain\":" << s.proximity_domain
          << ",\"pmem\":" << (s.is_pmem ? "true" : "false")
          << ",\"base\":" << s.base << ",\"length\":" << s.length
          << ",\"mem_attr\":" << s.mem_attr << '}';
    });
    o << ",\"memdev\":";
    list(t.memdevs, [&](const MemDev& m) {
        o << "{\"handle\":" << m.handle << ",\"spa_index\":" << m.spa_index
          << ",\"dcr_index\":" << m.dcr_index
          << ",\"region_len\":" << m.region_len << ",\"flags\":" << m.flags
          << '}';
    });
    o << ",\"dcr\":";
    list(t.dcr_indexes, [&](uint16_t i) { o << i; });
    o << ",\"flush_hint\":";
    list(t.flush_hints, [&](const FlushHint& f) {
        o << "{\"handle\":" << f.handle << ",\"addresses\":";
        list(f.addresses, [&](uint64_t a) { o << a; });
        o << '}';
    });
    o << ",\"capabilities\":";
    if (t.capabilities)
        o << *t.capabilities;
    else
        o << "null";
    o << ",\"other_types\":";
    list(t.other_types, [&](uint16_t x) { o << x; });
    o << '}';
    return o.str();
}

}  // namespace kvmx::nfit
