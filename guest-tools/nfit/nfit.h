// SPDX-License-Identifier: GPL-2.0-or-later
// Parser and checks for the ACPI NFIT, used by kvmx-nfit and the tests.
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <variant>
#include <vector>

namespace kvmx::nfit {

struct Spa {
    uint16_t index = 0;
    uint16_t flags = 0;
    uint32_t proximity_domain = 0;
    bool is_pmem = false;  // type GUID is byte-addressable persistent memory
    uint64_t base = 0;
    uint64_t length = 0;
    uint64_t mem_attr = 0;
};

struct MemDev {
    uint32_t handle = 0;
    uint16_t phys_id = 0;
    uint16_t region_id = 0;
    uint16_t spa_index = 0;
    uint16_t dcr_index = 0;
    uint64_t region_len = 0;
    uint64_t region_offset = 0;
    uint64_t region_dpa = 0;
    uint16_t interleave_ways = 0;
    uint16_t flags = 0;
};

struct FlushHint {
    uint32_t handle = 0;
    std::vector<uint64_t> addresses;
};

struct Table {
    uint8_t revision = 0;
    std::string oem_id;
    std::vector<Spa> spas;
    std::vector<MemDev> memdevs;
    std::vector<FlushHint> flush_hints;
    std::vector<uint16_t> dcr_indexes;
    std::optional<uint32_t> capabilities;
    std::vector<uint16_t> other_types;  // structures not decoded here
};

struct ParseError {
    std::string what;
    size_t offset = 0;
};

using ParseResult = std::variant<Table, ParseError>;

// Decodes a whole NFIT (ACPI header included).  Rejects a bad signature,
// length or checksum, and any structure whose length is out of bounds or
// inconsistent with its type.
ParseResult parse(std::span<const uint8_t> table);

// Checks the flush hints against the rest of the table, the way a guest
// driver relies on them: every hint structure names a DIMM that has a
// memory device structure, has at least one address, its addresses are
// 8-byte aligned, lie in one page, are distinct, and overlap no SPA range.
// Returns one message per problem; empty means fine.
std::vector<std::string> check_flush_hints(const Table& t);

// A JSON rendering of the table (numbers as decimal integers).
std::string to_json(const Table& t);

}  // namespace kvmx::nfit
