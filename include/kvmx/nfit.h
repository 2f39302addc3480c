/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * ACPI NFIT (NVDIMM Firmware Interface Table) layouts, ACPI 6.0 5.2.25,
 * as the patched QEMU builds them and Linux's nfit driver reads them.
 * All fields are little endian.  Shared by the guest tools and the tests;
 * sizes are asserted so a layout mistake fails the build.
 */
#ifndef KVMX_NFIT_H
#define KVMX_NFIT_H

#include <stdint.h>

#define KVMX_NFIT_SIGNATURE "NFIT"

enum kvmx_nfit_type {
	KVMX_NFIT_SPA = 0,          /* System Physical Address Range */
	KVMX_NFIT_MEMDEV = 1,       /* Memory Device to SPA Range Mapping */
	KVMX_NFIT_IDT = 2,          /* Interleave */
	KVMX_NFIT_SMBIOS = 3,
	KVMX_NFIT_DCR = 4,          /* NVDIMM Control Region */
	KVMX_NFIT_BDW = 5,          /* Block Data Window Region */
	KVMX_NFIT_FLUSH_HINT = 6,   /* Flush Hint Address */
	KVMX_NFIT_CAPS = 7,         /* Platform Capabilities (ACPI 6.2) */
};

/* ACPI table header (36 bytes) followed by 4 reserved bytes. */
struct kvmx_nfit_header {
	char signature[4];
	uint32_t length;
	uint8_t revision;
	uint8_t checksum;
	char oem_id[6];
	char oem_table_id[8];
	uint32_t oem_revision;
	char asl_compiler_id[4];
	uint32_t asl_compiler_revision;
	uint32_t reserved;
} __attribute__((packed));

/* Common prefix of every NFIT structure. */
struct kvmx_nfit_sub {
	uint16_t type;
	uint16_t length;
} __attribute__((packed));

struct kvmx_nfit_spa {
	uint16_t type;
	uint16_t length;
	uint16_t spa_index;
	uint16_t flags;
	uint32_t reserved;
	uint32_t proximity_domain;
	uint8_t type_guid[16];
	uint64_t spa_base;
	uint64_t spa_length;
	uint64_t mem_attr;
} __attribute__((packed));

struct kvmx_nfit_memdev {
	uint16_t type;
	uint16_t length;
	uint32_t device_handle;
	uint16_t phys_id;
	uint16_t region_id;
	uint16_t spa_index;
	uint16_t dcr_index;
	uint64_t region_len;
	uint64_t region_offset;
	uint64_t region_dpa;
	uint16_t interleave_index;
	uint16_t interleave_ways;
	uint16_t flags;
	uint16_t reserved;
} __attribute__((packed));

struct kvmx_nfit_flush_hint {
	uint16_t type;
	uint16_t length;
	uint32_t device_handle;
	uint16_t hint_count;
	uint8_t reserved[6];
	uint64_t hint_address[];
} __attribute__((packed));

#ifdef __cplusplus
#define KVMX_STATIC_ASSERT static_assert
#else
#define KVMX_STATIC_ASSERT _Static_assert
#endif
KVMX_STATIC_ASSERT(sizeof(struct kvmx_nfit_header) == 40, "NFIT header");
KVMX_STATIC_ASSERT(sizeof(struct kvmx_nfit_spa) == 56, "NFIT SPA");
KVMX_STATIC_ASSERT(sizeof(struct kvmx_nfit_memdev) == 48, "NFIT memdev");
KVMX_STATIC_ASSERT(sizeof(struct kvmx_nfit_flush_hint) == 16, "NFIT flush");

/* The SPA range type GUID of byte-addressable persistent memory. */
#define KVMX_NFIT_SPA_PM_GUID \
	{ 0x79, 0xd3, 0xf0, 0x66, 0xf3, 0xb4, 0x74, 0x40, \
	  0xac, 0x43, 0x0d, 0x33, 0x18, 0xb7, 0x8c, 0xdb }

/* Each hint of a DIMM sits on its own cache line of one page. */
#define KVMX_FLUSH_HINT_PAGE_SIZE 4096
#define KVMX_FLUSH_HINT_STRIDE 64
#define KVMX_FLUSH_HINT_MAX (KVMX_FLUSH_HINT_PAGE_SIZE / KVMX_FLUSH_HINT_STRIDE)

#endif /* KVMX_NFIT_H */
