// SPDX-License-Identifier: GPL-2.0-or-later
// The NFIT parser and flush-hint checks, field by field, on tables built
// here the way the patched QEMU lays them out.
#include <catch2/catch_test_macros.hpp>

#include <kvmx/nfit.h>
#include "nfit.h"

#include <cstring>

using namespace kvmx::nfit;

namespace {

// Builds an NFIT byte by byte; finish() fixes length and checksum.
struct Builder {
    std::vector<uint8_t> b;

    Builder()
    {
        kvmx_nfit_header h{};
        std::memcpy(h.signature, "NFIT", 4);
        h.revision = 1;
        std::memcpy(h.oem_id, "BOCHS ", 6);
        put(h);
    }
    template <typename T> void put(const T& v)
    {
        auto p = reinterpret_cast<const uint8_t*>(&v);
        b.insert(b.end(), p, p + sizeof(v));
    }
    void put_u64(uint64_t v) { put(v); }
    void spa(uint16_t idx, uint64_t base, uint64_t len)
    {
        kvmx_nfit_spa s{};
        s.type = KVMX_NFIT_SPA;
        s.length = sizeof(s);
        s.spa_index = idx;
        s.flags = 3;
        const uint8_t g[16] = KVMX_NFIT_SPA_PM_GUID;
        std::memcpy(s.type_guid, g, 16);
        s.spa_base = base;
        s.spa_length = len;
        s.mem_attr = 0x8008;
        put(s);
    }
    void memdev(uint32_t handle, uint16_t spa_idx, uint64_t len)
    {
        kvmx_nfit_memdev m{};
        m.type = KVMX_NFIT_MEMDEV;
        m.length = sizeof(m);
        m.device_handle = handle;
        m.spa_index = spa_idx;
        m.dcr_index = spa_idx + 1;
        m.region_len = len;
        m.interleave_ways = 1;
        put(m);
    }
    void flush(uint32_t handle, std::vector<uint64_t> addrs, int len_adj = 0)
    {
        kvmx_nfit_flush_hint f{};
        f.type = KVMX_NFIT_FLUSH_HINT;
        f.length = sizeof(f) + 8 * addrs.size() + len_adj;
        f.device_handle = handle;
        f.hint_count = addrs.size();
        put(f);
        for (auto a : addrs)
            put_u64(a);
    }
    std::vector<uint8_t> finish()
    {
        auto out = b;
        uint32_t len = out.size();
        std::memcpy(out.data() + 4, &len, 4);
        out[9] = 0;
        uint8_t sum = 0;
        for (auto c : out)
            sum += c;
        out[9] = uint8_t(-sum);
        return out;
    }
};

const uint64_t kBase = 0x140000000ULL;     // 5 GiB: start of device memory
const uint64_t kSize = 256ULL << 20;

Table parse_ok(const std::vector<uint8_t>& bytes)
{
    auto r = parse(bytes);
    if (auto* e = std::get_if<ParseError>(&r))
        FAIL("parse failed: " << e->what << " at " << e->offset);
    return std::get<Table>(r);
}

}  // namespace

TEST_CASE("type-6 structure layout matches ACPI 6.0 5.2.25.8")
{
    STATIC_REQUIRE(offsetof(kvmx_nfit_flush_hint, type) == 0);
    STATIC_REQUIRE(offsetof(kvmx_nfit_flush_hint, length) == 2);
    STATIC_REQUIRE(offsetof(kvmx_nfit_flush_hint, device_handle) == 4);
    STATIC_REQUIRE(offsetof(kvmx_nfit_flush_hint, hint_count) == 8);
    STATIC_REQUIRE(offsetof(kvmx_nfit_flush_hint, reserved) == 10);
    STATIC_REQUIRE(offsetof(kvmx_nfit_flush_hint, hint_address) == 16);
}

TEST_CASE("an NFIT with flush hints decodes field by field")
{
    Builder b;
    b.spa(2, kBase, kSize);
    b.memdev(0x1, 2, kSize);
    b.flush(0x1, {kBase + kSize, kBase + kSize + 64});
    Table t = parse_ok(b.finish());

    CHECK(t.revision == 1);
    CHECK(t.oem_id == "BOCHS ");
    REQUIRE(t.spas.size() == 1);
    CHECK(t.spas[0].index == 2);
    CHECK(t.spas[0].is_pmem);
    CHECK(t.spas[0].base == kBase);
    CHECK(t.spas[0].length == kSize);
    CHECK(t.spas[0].mem_attr == 0x8008);
    REQUIRE(t.memdevs.size() == 1);
    CHECK(t.memdevs[0].handle == 1);
    CHECK(t.memdevs[0].spa_index == 2);
    CHECK(t.memdevs[0].region_len == kSize);
    REQUIRE(t.flush_hints.size() == 1);
    CHECK(t.flush_hints[0].handle == 1);
    REQUIRE(t.flush_hints[0].addresses.size() == 2);
    CHECK(t.flush_hints[0].addresses[0] == kBase + kSize);
    CHECK(t.flush_hints[0].addresses[1] == kBase + kSize + 64);
    CHECK(check_flush_hints(t).empty());
}

TEST_CASE("malformed tables are rejected")
{
    Builder b;
    b.spa(2, kBase, kSize);
    auto good = b.finish();

    SECTION("bad checksum")
    {
        auto t = good;
        t[20] ^= 1;
        auto r = parse(t);
        REQUIRE(std::holds_alternative<ParseError>(r));
        CHECK(std::get<ParseError>(r).what == "checksum mismatch");
    }
    SECTION("bad signature")
    {
        auto t = good;
        t[0] = 'X';
        CHECK(std::holds_alternative<ParseError>(parse(t)));
    }
    SECTION("length field larger than the table")
    {
        auto t = good;
        t.pop_back();
        CHECK(std::holds_alternative<ParseError>(parse(t)));
    }
    SECTION("flush hint length disagrees with hint count")
    {
        Builder c;
        c.flush(1, {kBase + kSize}, +8);
        c.put_u64(0);
        CHECK(std::holds_alternative<ParseError>(parse(c.finish())));
    }
    SECTION("structure running past the end")
    {
        Builder c;
        c.memdev(1, 2, kSize);
        auto t = c.finish();
        t.resize(t.size() - 8);
        uint32_t len = t.size();
        std::memcpy(t.data() + 4, &len, 4);
        CHECK(std::holds_alternative<ParseError>(parse(t)));
    }
}

TEST_CASE("flush hint checks catch what a guest driver would trip on")
{
    Builder b;
    b.spa(2, kBase, kSize);
    b.memdev(1, 2, kSize);

    SECTION("hint inside the PMEM range")
    {
        b.flush(1, {kBase + 4096});
        auto bad = check_flush_hints(parse_ok(b.finish()));
        REQUIRE(bad.size() == 1);
        CHECK(bad[0].find("inside SPA range") != std::string::npos);
    }
    SECTION("hint for an unknown DIMM")
    {
        b.flush(7, {kBase + kSize});
        CHECK(check_flush_hints(parse_ok(b.finish())).size() == 1);
    }
    SECTION("hints across pages and unaligned")
    {
        b.flush(1, {kBase + kSize, kBase + kSize + 4096 + 3});
        CHECK(check_flush_hints(parse_ok(b.finish())).size() == 2);
    }
    SECTION("no hints at all")
    {
        b.flush(1, {});
        CHECK(check_flush_hints(parse_ok(b.finish())).size() == 1);
    }
}
