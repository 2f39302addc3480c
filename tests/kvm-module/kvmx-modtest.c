// SPDX-License-Identifier: GPL-2.0-or-later
/*
 * kvmx-modtest: tests of kvmx.ko (kvm-module/) through the raw KVM API.
 *
 * It runs where the module is loaded (inside the nested test VM, see
 * tests/integration/test_kvm_module.py): it makes small VMs itself
 * (KVM_CREATE_VM, memslots, one or more vCPUs running a few bytes of
 * 32-bit code), attaches flush hint pages through /dev/kvmx and checks
 * exits, counters, error codes and the page cache of the backing file.
 *
 *   kvmx-modtest [options] TEST...
 *     -m N          guest flushes per measured run (default 50)
 *     -d DIR        directory for the backing files (default /tmp); use a
 *                   disk filesystem (not tmpfs) so fdatasync has work to do
 *     -D PATH       an nd region's deep_flush attribute for the DEEP flushes
 *                   (e.g. /sys/bus/nd/devices/region0/deep_flush)
 *     -S DEV        a slow block device (null_blk with mbps) for "stall"
 *     -E DIR        configfs dir of a memory-backed null_blk device whose
 *                   sectors "flusherr" marks bad (its writes then fail)
 *     -X DAX,DF     a device DAX (/dev/daxR.N) and its region's deep_flush,
 *                   for "devdax"
 *     -k PATH       kvmx.ko, for the tests that unload and reload it
 *   TESTS: api errors ram kernel user deep detach memslot limits
 *          concurrent multivcpu vmclose stall flusherr abi perms devdax
 *          rmmod sigkill, or "all" (all but rmmod and sigkill, which unload
 *          the module); stall, flusherr, devdax do nothing without -S/-E/-X
 *
 * Output, one fact a line, for the harness:
 *   KVMX-CHECK ok|FAIL <test>: <what>
 *   KVMX-INFO <test>: <what>
 *   KVMX-BENCH key=value ...            (after "kernel" and "user")
 *   KVMX-MODTEST-RESULT passed=N failed=N
 * Exit status 0 when no check failed.
 *
 * The guest: 32-bit protected mode, flat segments, no paging, code at
 * CODE_GPA.  With esi = data address, ebp = stride, edi = flush hint
 * address (0: none), ecx = count it runs
 *     do { *(u32 *)esi = eax; esi += ebp; if (edi) *(u32 *)edi = eax; }
 *     while (--ecx);  hlt
 * so every flush hint write follows a store to a fresh page of the
 * "NVDIMM" (a memslot mapped from the backing file), as a guest's
 * nvdimm_flush() follows its data.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <linux/kvm.h>
#include <linux/magic.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <kvmx/kvmx-fha.h>

#define PAGE 4096ul

/* Guest-physical layout of the test VMs. */
#define CODE_GPA	0x1000ul
#define RAM_SIZE	(2ul << 20)	/* slot 0 at 0: code, scratch pages */
#define SCRATCH_GPA	0x20000ul	/* RAM pages tests write or attach */
#define MANY_GPA	0x80000ul	/* 257 RAM pages for the limits test */
#define PMEM_GPA	0x400000ul	/* slot 1: the backing file */
#define PMEM_SIZE	(4ul << 20)
#define FHA_GPA		0x800000ul	/* slot 2: the flush hint page */
#define EXTRA_GPA	0x900000ul	/* slot 3: a page the memslot test deletes */
#define RO_GPA		0xa00000ul	/* slot 4: read-only page */

enum { SLOT_RAM, SLOT_PMEM, SLOT_FHA, SLOT_EXTRA, SLOT_RO };

/* mov [esi],eax; add esi,ebp; test edi,edi; jz +2; mov [edi],eax;
 * dec ecx; jnz -13; hlt */
static const uint8_t guest_code[] = {
	0x89, 0x06, 0x01, 0xee, 0x85, 0xff, 0x74, 0x02,
	0x89, 0x07, 0x49, 0x75, 0xf3, 0xf4,
};

#ifndef __NR_cachestat
#define __NR_cachestat 451
#endif
struct cs_range { uint64_t off, len; };
struct cs_stat {
	uint64_t nr_cache, nr_dirty, nr_writeback, nr_evicted, nr_recently_evicted;
};

static const char *kvmx_dev = "/dev/kvmx";
static const char *sysdir = "/sys/class/misc/kvmx";
static const char *backing_dir = "/tmp";
static const char *deep_path;
static const char *ko_path;
static const char *slow_dev;	/* -S: a block device whose writes are slow */
static const char *err_dir;	/* -E: null_blk configfs dir of a device we fail */
static const char *dax_spec;	/* -X: DAXDEV,DEEP_FLUSH of a device DAX */
static const char *pmem_dev;	/* vm_new maps this device instead of a new file */
static unsigned int M = 50;
static const char *cur_test = "-";
static int n_pass, n_fail;
static unsigned int n_expect_errno;	/* expect_errno() calls so far */
static bool backing_is_tmpfs;

/* Filled by the "kernel" and "user" tests for the KVMX-BENCH line. */
static struct bench {
	bool have;
	double ns_per_flush;
	double user_exits_per_flush;
	double vm_exits_per_flush;
	double module_avg_ns;
} bench_kernel, bench_user;

/* ---- reporting ------------------------------------------------------- */

static bool check(bool ok, const char *fmt, ...)
{
	va_list ap;

	printf("KVMX-CHECK %s %s: ", ok ? "ok" : "FAIL", cur_test);
	va_start(ap, fmt);
	vprintf(fmt, ap);
	va_end(ap);
	printf("\n");
	fflush(stdout);
	if (ok)
		n_pass++;
	else
		n_fail++;
	return ok;
}

static void info(const char *fmt, ...)
{
	va_list ap;

	printf("KVMX-INFO %s: ", cur_test);
	va_start(ap, fmt);
	vprintf(fmt, ap);
	va_end(ap);
	printf("\n");
	fflush(stdout);
}

static void die(const char *fmt, ...)
{
	va_list ap;

	printf("KVMX-CHECK FAIL %s: fatal: ", cur_test);
	va_start(ap, fmt);
	vprintf(fmt, ap);
	va_end(ap);
	printf(" (errno %d %s)\nKVMX-MODTEST-RESULT passed=%d failed=%d\n",
	       errno, strerror(errno), n_pass, n_fail + 1);
	fflush(stdout);
	exit(1);
}

/* An ioctl (or any call returning -1/errno) that must fail with `want`. */
static bool expect_errno(long r, int want, const char *what)
{
	int e = errno;

	n_expect_errno++;
	if (r != -1)
		return check(false, "%s: expected %s, got success (%ld)",
			     what, strerrorname_np(want), r);
	return check(e == want, "%s -> %s%s%s", what, strerrorname_np(e),
		     e == want ? "" : ", expected ",
		     e == want ? "" : strerrorname_np(want));
}

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + ts.tv_nsec;
}

/* ---- /dev/kvmx ------------------------------------------------------- */

static int kvmx_open(void)
{
	int fd = open(kvmx_dev, O_RDWR | O_CLOEXEC);

	if (fd < 0)
		die("open %s", kvmx_dev);
	return fd;
}

static struct kvmx_fha_attach attach_args(int vm_fd, int backing_fd, uint64_t gpa)
{
	struct kvmx_fha_attach a;

	memset(&a, 0, sizeof(a));
	a.size = sizeof(a);
	a.flags = KVMX_FLUSH_FDATASYNC;
	a.vm_fd = vm_fd;
	a.backing_fd = backing_fd;
	a.deep_flush_fd = -1;
	a.gpa = gpa;
	return a;
}

/* Attach; returns the handle, or 0 with errno set. */
static uint32_t kvmx_attach(int kfd, struct kvmx_fha_attach *a)
{
	a->handle = 0;
	if (ioctl(kfd, KVMX_FHA_ATTACH, a) != 0)
		return 0;
	return a->handle;
}

static int kvmx_detach(int kfd, uint32_t handle)
{
	return ioctl(kfd, KVMX_FHA_DETACH, &handle);
}

static struct kvmx_fha_stats kvmx_stats(int kfd, uint32_t handle)
{
	struct kvmx_fha_stats st;

	memset(&st, 0, sizeof(st));
	st.size = sizeof(st);
	st.handle = handle;
	if (ioctl(kfd, KVMX_FHA_STATS, &st) != 0)
		die("KVMX_FHA_STATS(%u)", handle);
	return st;
}

/* Module-wide counter from sysfs; -1 if the module is not there. */
static long long counter(const char *name)
{
	char path[256], buf[64];
	long long v = -1;
	int fd;
	ssize_t n;

	snprintf(path, sizeof(path), "%s/%s", sysdir, name);
	fd = open(path, O_RDONLY);
	if (fd < 0)
		return -1;
	n = read(fd, buf, sizeof(buf) - 1);
	if (n > 0) {
		buf[n] = 0;
		v = strtoll(buf, NULL, 10);
	}
	close(fd);
	return v;
}

static long long module_refcnt(const char *mod)
{
	char path[256], buf[64];
	long long v = -1;
	int fd;
	ssize_t n;

	snprintf(path, sizeof(path), "/sys/module/%s/refcnt", mod);
	fd = open(path, O_RDONLY);
	if (fd < 0)
		return -1;
	n = read(fd, buf, sizeof(buf) - 1);
	if (n > 0) {
		buf[n] = 0;
		v = strtoll(buf, NULL, 10);
	}
	close(fd);
	return v;
}

/* ---- test VMs -------------------------------------------------------- */

#define MAX_VCPUS 8
#define NR_EXIT_REASONS 64

struct vcpu {
	int fd;
	struct kvm_run *run;
	int stats_fd;
	struct kvm_stats_header sh;
	char *descs;
	unsigned long exits[NR_EXIT_REASONS];	/* KVM_RUN returns, by reason */
	unsigned long fha_mmio;			/* MMIO writes to the FHA page */
};

struct vm {
	int kvm, fd;
	int ram_fd, pmem_fd, fha_fd, extra_fd;
	uint8_t *ram, *pmem, *fha, *extra;
	char pmem_path[512];
	bool pmem_is_dev;		/* a block device: not ours to unlink */
	int nvcpu;
	struct vcpu vcpu[MAX_VCPUS];
};

static int kvm_run_size;

static void *map_memfd(int *fdp, size_t size, const char *name)
{
	int fd = memfd_create(name, MFD_CLOEXEC);
	void *p;

	if (fd < 0 || ftruncate(fd, size) != 0)
		die("memfd %s", name);
	p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (p == MAP_FAILED)
		die("mmap %s", name);
	*fdp = fd;
	return p;
}

static int try_set_slot(struct vm *vm, uint32_t slot, uint64_t gpa, uint64_t size,
			void *hva, uint32_t flags)
{
	struct kvm_userspace_memory_region r = {
		.slot = slot, .flags = flags, .guest_phys_addr = gpa,
		.memory_size = size, .userspace_addr = (uintptr_t)hva,
	};

	return ioctl(vm->fd, KVM_SET_USER_MEMORY_REGION, &r);
}

static void set_slot(struct vm *vm, uint32_t slot, uint64_t gpa, uint64_t size,
		     void *hva, uint32_t flags)
{
	if (try_set_slot(vm, slot, gpa, size, hva, flags) != 0)
		die("KVM_SET_USER_MEMORY_REGION slot %u", slot);
}

static void stats_open(struct vcpu *v)
{
	size_t dsz;

	v->stats_fd = ioctl(v->fd, KVM_GET_STATS_FD, NULL);
	if (v->stats_fd < 0)
		die("KVM_GET_STATS_FD");
	if (pread(v->stats_fd, &v->sh, sizeof(v->sh), 0) != sizeof(v->sh))
		die("read stats header");
	dsz = (sizeof(struct kvm_stats_desc) + v->sh.name_size) * v->sh.num_desc;
	v->descs = malloc(dsz);
	if (!v->descs || pread(v->stats_fd, v->descs, dsz, v->sh.desc_offset) != (ssize_t)dsz)
		die("read stats descriptors");
}

/* A vCPU statistic by name (binary stats API); -1 if it does not exist. */
static long long vstat(struct vcpu *v, const char *name)
{
	size_t step = sizeof(struct kvm_stats_desc) + v->sh.name_size;
	uint64_t val;
	uint32_t i;

	for (i = 0; i < v->sh.num_desc; i++) {
		struct kvm_stats_desc *d = (void *)(v->descs + i * step);

		if (strcmp(d->name, name) == 0) {
			if (pread(v->stats_fd, &val, sizeof(val),
				  v->sh.data_offset + d->offset) != sizeof(val))
				die("read stat %s", name);
			return (long long)val;
		}
	}
	return -1;
}

static void vcpu_add(struct vm *vm)
{
	struct vcpu *v = &vm->vcpu[vm->nvcpu];
	struct kvm_sregs s;
	struct kvm_segment seg;

	v->fd = ioctl(vm->fd, KVM_CREATE_VCPU, vm->nvcpu);
	if (v->fd < 0)
		die("KVM_CREATE_VCPU %d", vm->nvcpu);
	v->run = mmap(NULL, kvm_run_size, PROT_READ | PROT_WRITE, MAP_SHARED, v->fd, 0);
	if (v->run == MAP_FAILED)
		die("mmap kvm_run");
	if (ioctl(v->fd, KVM_GET_SREGS, &s) != 0)
		die("KVM_GET_SREGS");
	/* Flat 4 GiB segments, 32-bit, protected mode without paging. */
	memset(&seg, 0, sizeof(seg));
	seg.base = 0;
	seg.limit = 0xffffffff;
	seg.present = 1;
	seg.s = 1;
	seg.db = 1;
	seg.g = 1;
	seg.type = 3;		/* data, read/write, accessed */
	seg.selector = 0x10;
	s.ds = s.es = s.fs = s.gs = s.ss = seg;
	seg.type = 11;		/* code, execute/read, accessed */
	seg.selector = 0x08;
	s.cs = seg;
	s.cr0 |= 1;		/* PE */
	s.cr0 &= ~(1ul << 31);	/* PG */
	s.efer = 0;
	if (ioctl(v->fd, KVM_SET_SREGS, &s) != 0)
		die("KVM_SET_SREGS");
	stats_open(v);
	vm->nvcpu++;
}

static void backing_create(struct vm *vm)
{
	static int seq;
	static pid_t seq_pid;	/* numbered per process: a forked child starts at 0 */
	uint8_t *zero;
	struct statfs sf;

	if (pmem_dev) {
		/* A block device: its page cache is the backing, as a file's. */
		snprintf(vm->pmem_path, sizeof(vm->pmem_path), "%s", pmem_dev);
		vm->pmem_is_dev = true;
		vm->pmem_fd = open(pmem_dev, O_RDWR | O_CLOEXEC);
		if (vm->pmem_fd < 0)
			die("open %s", pmem_dev);
		vm->pmem = mmap(NULL, PMEM_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED,
				vm->pmem_fd, 0);
		if (vm->pmem == MAP_FAILED)
			die("mmap %s", pmem_dev);
		backing_is_tmpfs = false;
		return;
	}
	if (seq_pid != getpid()) {
		seq_pid = getpid();
		seq = 0;
	}
	snprintf(vm->pmem_path, sizeof(vm->pmem_path), "%s/kvmx-modtest-%d-%d.img",
		 backing_dir, getpid(), seq++);
	vm->pmem_fd = open(vm->pmem_path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
	if (vm->pmem_fd < 0)
		die("create %s", vm->pmem_path);
	/* Allocate the blocks now, so a flush later only writes data. */
	zero = calloc(1, PMEM_SIZE);
	if (!zero || pwrite(vm->pmem_fd, zero, PMEM_SIZE, 0) != (ssize_t)PMEM_SIZE)
		die("fill %s", vm->pmem_path);
	free(zero);
	if (fsync(vm->pmem_fd) != 0)
		die("fsync %s", vm->pmem_path);
	vm->pmem = mmap(NULL, PMEM_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, vm->pmem_fd, 0);
	if (vm->pmem == MAP_FAILED)
		die("mmap %s", vm->pmem_path);
	if (fstatfs(vm->pmem_fd, &sf) == 0)
		backing_is_tmpfs = sf.f_type == TMPFS_MAGIC;
}

/*
 * A VM with the standard layout and `nvcpu` vCPUs; the flush hint page is
 * RAM, or a read-only memslot when fha_readonly (then guest writes to it
 * exit to us as KVM_EXIT_MMIO, which is how QEMU traps it today).
 */
static struct vm *vm_new(int nvcpu, bool fha_readonly)
{
	struct vm *vm = calloc(1, sizeof(*vm));
	int i;

	if (!vm)
		die("calloc");
	vm->kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (vm->kvm < 0)
		die("open /dev/kvm");
	if (!kvm_run_size) {
		kvm_run_size = ioctl(vm->kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
		if (kvm_run_size <= 0)
			die("KVM_GET_VCPU_MMAP_SIZE");
	}
	vm->fd = ioctl(vm->kvm, KVM_CREATE_VM, 0);
	if (vm->fd < 0)
		die("KVM_CREATE_VM");
	ioctl(vm->fd, KVM_SET_TSS_ADDR, 0xfffbd000ul);	/* VMX wants it; harmless */

	vm->ram = map_memfd(&vm->ram_fd, RAM_SIZE, "kvmx-ram");
	memcpy(vm->ram + CODE_GPA, guest_code, sizeof(guest_code));
	vm->fha = map_memfd(&vm->fha_fd, PAGE, "kvmx-fha");
	vm->extra = map_memfd(&vm->extra_fd, PAGE, "kvmx-extra");
	backing_create(vm);

	set_slot(vm, SLOT_RAM, 0, RAM_SIZE, vm->ram, 0);
	set_slot(vm, SLOT_PMEM, PMEM_GPA, PMEM_SIZE, vm->pmem, 0);
	set_slot(vm, SLOT_FHA, FHA_GPA, PAGE, vm->fha, fha_readonly ? KVM_MEM_READONLY : 0);
	set_slot(vm, SLOT_EXTRA, EXTRA_GPA, PAGE, vm->extra, 0);
	set_slot(vm, SLOT_RO, RO_GPA, PAGE, vm->extra, KVM_MEM_READONLY);
	for (i = 0; i < nvcpu; i++)
		vcpu_add(vm);
	return vm;
}

static void vm_free(struct vm *vm)
{
	int i;

	for (i = 0; i < vm->nvcpu; i++) {
		munmap(vm->vcpu[i].run, kvm_run_size);
		close(vm->vcpu[i].stats_fd);
		close(vm->vcpu[i].fd);
		free(vm->vcpu[i].descs);
	}
	close(vm->fd);
	close(vm->kvm);
	munmap(vm->ram, RAM_SIZE);
	munmap(vm->fha, PAGE);
	munmap(vm->extra, PAGE);
	munmap(vm->pmem, PMEM_SIZE);
	close(vm->ram_fd);
	close(vm->fha_fd);
	close(vm->extra_fd);
	close(vm->pmem_fd);
	if (!vm->pmem_is_dev)
		unlink(vm->pmem_path);
	free(vm);
}

/* Page-cache state of the backing file (cachestat(2)). */
static struct cs_stat backing_cache(struct vm *vm)
{
	struct cs_range r = { 0, 0 };
	struct cs_stat cs;

	memset(&cs, 0, sizeof(cs));
	if (syscall(__NR_cachestat, vm->pmem_fd, &r, &cs, 0) != 0)
		die("cachestat");
	return cs;
}

/*
 * After a flush: no dirty and no writeback pages in the backing file.  On
 * tmpfs there is nothing to check (fsync leaves shmem pages dirty).
 */
static void check_clean(struct vm *vm, const char *when)
{
	struct cs_stat cs;

	if (backing_is_tmpfs) {
		info("backing file on tmpfs: not checking the page cache %s", when);
		return;
	}
	cs = backing_cache(vm);
	check(cs.nr_dirty == 0 && cs.nr_writeback == 0,
	      "backing file clean %s: %llu dirty, %llu under writeback pages", when,
	      (unsigned long long)cs.nr_dirty, (unsigned long long)cs.nr_writeback);
}

struct run_args {
	uint64_t data;		/* first data page (guest-physical) */
	uint64_t stride;	/* added after each data store */
	uint64_t fha;		/* flush hint address, 0: none */
	uint32_t count;		/* loop iterations (0 = 2^32) */
	/* MMIO writes to [user_fha, +PAGE) are flush hints we handle: */
	uint64_t user_fha;
	int user_flush_fd;	/* fdatasync() it per such write; -1: no */
};

/*
 * Run the guest loop on a vCPU until HLT.  Returns 0 on HLT, -1 on any
 * other end (reported).  Counts every KVM_RUN return by exit reason.
 */
static int vcpu_run_loop(struct vcpu *v, const struct run_args *ra)
{
	struct kvm_regs regs;

	memset(&regs, 0, sizeof(regs));
	regs.rip = CODE_GPA;
	regs.rflags = 0x2;
	regs.rax = 0x4b564d58;	/* "KVMX" */
	regs.rsi = ra->data;
	regs.rbp = ra->stride;
	regs.rdi = ra->fha;
	regs.rcx = ra->count;
	if (ioctl(v->fd, KVM_SET_REGS, &regs) != 0)
		die("KVM_SET_REGS");

	for (;;) {
		struct kvm_run *run = v->run;

		if (ioctl(v->fd, KVM_RUN, 0) != 0) {
			if (errno == EINTR || errno == EAGAIN)
				continue;
			printf("KVMX-INFO %s: KVM_RUN: %s\n", cur_test, strerror(errno));
			return -1;
		}
		if (run->exit_reason < NR_EXIT_REASONS)
			v->exits[run->exit_reason]++;
		switch (run->exit_reason) {
		case KVM_EXIT_HLT:
			return 0;
		case KVM_EXIT_MMIO:
			if (ra->user_fha && run->mmio.is_write &&
			    run->mmio.phys_addr >= ra->user_fha &&
			    run->mmio.phys_addr < ra->user_fha + PAGE) {
				v->fha_mmio++;
				if (ra->user_flush_fd >= 0 && fdatasync(ra->user_flush_fd) != 0)
					die("fdatasync in the user path");
				continue;
			}
			printf("KVMX-INFO %s: unexpected MMIO %s at 0x%llx\n", cur_test,
			       run->mmio.is_write ? "write" : "read",
			       (unsigned long long)run->mmio.phys_addr);
			return -1;
		case KVM_EXIT_INTR:
			continue;
		default:
			printf("KVMX-INFO %s: unexpected exit reason %u (fail entry 0x%llx, "
			       "internal suberror %u)\n", cur_test, run->exit_reason,
			       (unsigned long long)run->fail_entry.hardware_entry_failure_reason,
			       run->internal.suberror);
			return -1;
		}
	}
}

static unsigned long exits_total(struct vcpu *v)
{
	unsigned long t = 0;
	int i;

	for (i = 0; i < NR_EXIT_REASONS; i++)
		t += v->exits[i];
	return t;
}

static void exits_reset(struct vcpu *v)
{
	memset(v->exits, 0, sizeof(v->exits));
	v->fha_mmio = 0;
}

/* ---- tests ----------------------------------------------------------- */

static void test_api(void)
{
	int kfd = kvmx_open();
	long v = ioctl(kfd, KVMX_GET_API_VERSION, 0);

	check(v == KVMX_API_VERSION, "KVMX_GET_API_VERSION = %ld (want %d)", v,
	      KVMX_API_VERSION);
	check(counter("api_version") == KVMX_API_VERSION, "sysfs api_version = %lld",
	      counter("api_version"));
	check(counter("attachments") == 0 && counter("vms") == 0,
	      "nothing attached at start (attachments %lld, vms %lld)",
	      counter("attachments"), counter("vms"));
	close(kfd);
}

static void test_errors(void)
{
	struct vm *vm = vm_new(1, false);
	int kfd = kvmx_open();
	long long att0 = counter("attachments"), rej0 = counter("rejected");
	unsigned int exp0 = n_expect_errno;
	struct kvmx_fha_attach a, base = attach_args(vm->fd, vm->pmem_fd, FHA_GPA);
	int devnull = open("/dev/null", O_RDWR | O_CLOEXEC);
	int pipefd[2], efd, rofd, closed_fd;
	char tmp[512];
	uint32_t h, bad;
	unsigned int i;
	long r;

	/* vm_fd: not a KVM VM */
	a = base; a.vm_fd = devnull;
	expect_errno(ioctl(kfd, KVMX_FHA_ATTACH, &a), EINVAL, "vm_fd /dev/null");
	a = base; a.vm_fd = vm->kvm;
	expect_errno(ioctl(kfd, KVMX_FHA_ATTACH, &a), EINVAL, "vm_fd is the /dev/kvm system fd");
	a = base; a.vm_fd = vm->vcpu[0].fd;
	expect_errno(ioctl(kfd, KVMX_FHA_ATTACH, &a), EINVAL, "vm_fd is a vCPU fd");
	a = base; a.vm_fd = kfd;
	expect_errno(ioctl(kfd, KVMX_FHA_ATTACH, &a), EINVAL, "vm_fd is /dev/kvmx itself");
	a = base; a.vm_fd = vm->vcpu[0].stats_fd;
	expect_errno(ioctl(kfd, KVMX_FHA_ATTACH, &a), EINVAL, "vm_fd is a KVM stats fd");
	a = base; a.vm_fd = -1;
	expect_errno(ioctl(kfd, KVMX_FHA_ATTACH, &a), EBADF, "vm_fd -1");
	closed_fd = dup(devnull);
	close(closed_fd);
	a = base; a.vm_fd = closed_fd;
	expect_errno(ioctl(kfd, KVMX_FHA_ATTACH, &a), EBADF, "vm_fd closed");
	a = base; a.vm_fd = 0x7fffffff;
	expect_errno(ioctl(kfd, KVMX_FHA_ATTACH, &a), EBADF, "vm_fd 0x7fffffff");

	/* gpa */
	a = base; a.gpa = 0x40000000;
	expect_errno(ioctl(kfd, KVMX_FHA_ATTACH, &a), EINVAL, "gpa 1 GiB, outside all memslots");
	a = base; a.gpa = 0x300000;
	expect_errno(ioctl(kfd, KVMX_FHA_ATTACH, &a), EINVAL, "gpa in a hole between memslots");
	a = base; a.gpa = 1ull << 60;
	expect_errno(ioctl(kfd, KVMX_FHA_ATTACH, &a), EINVAL, "gpa 2^60");
	a = base; a.gpa = ~0ull & ~(PAGE - 1);
	expect_errno(ioctl(kfd, KVMX_FHA_ATTACH, &a), EINVAL, "gpa 0xffff...f000");
	a = base; a.gpa = FHA_GPA + 8;
	expect_errno(ioctl(kfd, KVMX_FHA_ATTACH, &a), EINVAL, "gpa not 4 KiB aligned");
	a = base; a.gpa = FHA_GPA + 0x800;
	expect_errno(ioctl(kfd, KVMX_FHA_ATTACH, &a), EINVAL, "gpa 2 KiB aligned only");
	a = base; a.gpa = RO_GPA;
	expect_errno(ioctl(kfd, KVMX_FHA_ATTACH, &a), EINVAL, "gpa in a KVM_MEM_READONLY memslot");

	/* size, pads, reserved, flags */
	{
		/* below the version-0 size; the larger ones are in "abi" */
		static const uint32_t sizes[] = { 0, 4, 64, 71 };

		for (i = 0; i < sizeof(sizes) / sizeof(sizes[0]); i++) {
			snprintf(tmp, sizeof(tmp), "size %u", sizes[i]);
			a = base; a.size = sizes[i];
			expect_errno(ioctl(kfd, KVMX_FHA_ATTACH, &a), EINVAL, tmp);
		}
		a = base; a.size = 0xffffffff;
		expect_errno(ioctl(kfd, KVMX_FHA_ATTACH, &a), E2BIG, "size 0xffffffff");
	}
	a = base; a.pad = 1;
	expect_errno(ioctl(kfd, KVMX_FHA_ATTACH, &a), EINVAL, "pad nonzero");
	a = base; a.pad2 = 0x80000000u;
	expect_errno(ioctl(kfd, KVMX_FHA_ATTACH, &a), EINVAL, "pad2 nonzero");
	for (i = 0; i < 3; i++) {
		snprintf(tmp, sizeof(tmp), "reserved[%u] nonzero", i);
		a = base; a.reserved[i] = 1ull << (i * 16);
		expect_errno(ioctl(kfd, KVMX_FHA_ATTACH, &a), EINVAL, tmp);
	}
	a = base; a.flags = 0;
	expect_errno(ioctl(kfd, KVMX_FHA_ATTACH, &a), EINVAL, "flags 0 (nothing to flush)");
	a = base; a.flags = KVMX_FLUSH_FDATASYNC | (1u << 2);
	expect_errno(ioctl(kfd, KVMX_FHA_ATTACH, &a), EINVAL, "unknown flag 1<<2");
	a = base; a.flags = KVMX_FLUSH_FDATASYNC | 0x80000000u;
	expect_errno(ioctl(kfd, KVMX_FHA_ATTACH, &a), EINVAL, "unknown flag 1<<31");

	/* backing_fd / deep_flush_fd */
	a = base; a.backing_fd = -1;
	expect_errno(ioctl(kfd, KVMX_FHA_ATTACH, &a), EBADF, "FDATASYNC with backing_fd -1");
	a = base; a.backing_fd = closed_fd;
	expect_errno(ioctl(kfd, KVMX_FHA_ATTACH, &a), EBADF, "FDATASYNC with a closed backing_fd");
	if (pipe2(pipefd, O_CLOEXEC) != 0)
		die("pipe");
	a = base; a.backing_fd = pipefd[0];
	expect_errno(ioctl(kfd, KVMX_FHA_ATTACH, &a), EINVAL, "backing_fd a pipe (no fsync)");
	efd = eventfd(0, EFD_CLOEXEC);
	a = base; a.backing_fd = efd;
	expect_errno(ioctl(kfd, KVMX_FHA_ATTACH, &a), EINVAL, "backing_fd an eventfd (no fsync)");
	a = base; a.flags = KVMX_FLUSH_DEEP;
	expect_errno(ioctl(kfd, KVMX_FHA_ATTACH, &a), EINVAL,
		     "backing_fd given without FDATASYNC");
	a = base; a.deep_flush_fd = devnull;
	expect_errno(ioctl(kfd, KVMX_FHA_ATTACH, &a), EINVAL,
		     "deep_flush_fd given without DEEP");
	a = base; a.flags = KVMX_FLUSH_ALL;
	expect_errno(ioctl(kfd, KVMX_FHA_ATTACH, &a), EBADF, "DEEP with deep_flush_fd -1");
	rofd = open("/dev/null", O_RDONLY | O_CLOEXEC);
	a = base; a.flags = KVMX_FLUSH_ALL; a.deep_flush_fd = rofd;
	expect_errno(ioctl(kfd, KVMX_FHA_ATTACH, &a), EBADF, "DEEP with a read-only deep_flush_fd");
	{
		int full = open("/dev/full", O_WRONLY | O_CLOEXEC);

		a = base; a.flags = KVMX_FLUSH_ALL; a.deep_flush_fd = full;
		expect_errno(ioctl(kfd, KVMX_FHA_ATTACH, &a), EINVAL,
			     "DEEP with /dev/full (not a region's deep_flush)");
		close(full);
	}

	/* bad pointers */
	expect_errno(ioctl(kfd, KVMX_FHA_ATTACH, NULL), EFAULT, "ATTACH with a NULL argument");
	expect_errno(ioctl(kfd, KVMX_FHA_ATTACH, (void *)8), EFAULT, "ATTACH with pointer 8");
	expect_errno(ioctl(kfd, KVMX_FHA_DETACH, NULL), EFAULT, "DETACH with a NULL argument");
	expect_errno(ioctl(kfd, KVMX_FHA_STATS, NULL), EFAULT, "STATS with a NULL argument");
	expect_errno(ioctl(kfd, KVMX_FHA_STATS, (void *)-4096l), EFAULT,
		     "STATS with a kernel-half pointer");

	/* handles */
	bad = 0;
	expect_errno(ioctl(kfd, KVMX_FHA_DETACH, &bad), ENOENT, "DETACH handle 0");
	bad = 12345;
	expect_errno(ioctl(kfd, KVMX_FHA_DETACH, &bad), ENOENT, "DETACH unknown handle");
	{
		struct kvmx_fha_stats st = { .size = sizeof(st), .handle = 777 };

		expect_errno(ioctl(kfd, KVMX_FHA_STATS, &st), ENOENT, "STATS unknown handle");
		st.size = 87;
		expect_errno(ioctl(kfd, KVMX_FHA_STATS, &st), EINVAL, "STATS size 87");
		st.size = 0;
		expect_errno(ioctl(kfd, KVMX_FHA_STATS, &st), EINVAL, "STATS size 0");
	}

	/* duplicates, and the happy path in between */
	a = base;
	h = kvmx_attach(kfd, &a);
	check(h != 0, "valid ATTACH returns handle %u", h);
	a = base;
	expect_errno(ioctl(kfd, KVMX_FHA_ATTACH, &a), EEXIST, "same page again in the same file");
	{
		int kfd2 = kvmx_open();
		uint32_t h2;

		a = base;
		h2 = kvmx_attach(kfd2, &a);
		check(h2 != 0, "same page from another open file is allowed (handle %u)", h2);
		close(kfd2);
	}
	{
		struct kvmx_fha_stats st = kvmx_stats(kfd, h);

		check(st.size == sizeof(st) && st.handle == h && st.guest_flushes == 0 &&
		      st.host_flushes == 0 && st.error == 0 && st.failed_flushes == 0 &&
		      !st.reserved[0] && !st.reserved[1],
		      "STATS of a fresh attachment: all zero");
	}
	check(kvmx_detach(kfd, h) == 0, "DETACH %u", h);
	expect_errno(kvmx_detach(kfd, h), ENOENT, "DETACH the same handle twice");

	/* ioctl numbers that are not ours */
	{
		struct { unsigned long cmd; const char *name; } cmds[] = {
			{ _IO(KVMX_IO, 0x04), "_IO(KVMX_IO, 4)" },
			{ _IO(KVMX_IO, 0xff), "_IO(KVMX_IO, 0xff)" },
			{ _IOR(KVMX_IO, 0x00, int), "GET_API_VERSION encoded _IOR" },
			{ _IOWR(KVMX_IO, 0x01, char[64]), "ATTACH encoded with size 64" },
			{ _IOW(KVMX_IO, 0x02, uint64_t), "DETACH encoded with size 8" },
			{ _IOR(KVMX_IO, 0x03, struct kvmx_fha_stats), "STATS encoded _IOR" },
			{ KVM_RUN, "KVM_RUN" },
			{ KVM_CREATE_VM, "KVM_CREATE_VM" },
			{ 0, "0" },
			{ 0xffffffffu, "0xffffffff" },
			{ TCGETS, "TCGETS" },
		};

		for (i = 0; i < sizeof(cmds) / sizeof(cmds[0]); i++) {
			snprintf(tmp, sizeof(tmp), "ioctl %s", cmds[i].name);
			r = ioctl(kfd, cmds[i].cmd, &a);
			expect_errno(r, ENOTTY, tmp);
		}
	}

	/* A VM of another process: KVM's page-track rule (same mm). */
	{
		pid_t pid = fork();
		int st;

		if (pid == 0) {
			struct kvmx_fha_attach ca = base;
			int e = 0;

			if (ioctl(kfd, KVMX_FHA_ATTACH, &ca) != 0)
				e = errno;
			_exit(e);
		}
		waitpid(pid, &st, 0);
		check(WIFEXITED(st) && WEXITSTATUS(st) == EPERM,
		      "a child attaching its parent's VM (inherited fds) -> %s, expected EPERM",
		      WIFEXITED(st) ? (WEXITSTATUS(st) ? strerrorname_np(WEXITSTATUS(st)) : "success")
				    : "crash");
	}

	check(counter("attachments") == att0, "no attachment left behind (%lld)",
	      counter("attachments"));
	/* every refused ioctl counted: those above and the child's EPERM */
	check(counter("rejected") - rej0 == n_expect_errno - exp0 + 1,
	      "sysfs rejected +%lld == %u refused ioctls", counter("rejected") - rej0,
	      n_expect_errno - exp0 + 1);
	close(pipefd[0]);
	close(pipefd[1]);
	close(efd);
	close(rofd);
	close(devnull);
	close(kfd);
	check(counter("vms") == 0, "no notifier left after close (vms %lld)", counter("vms"));
	vm_free(vm);
}

/* Flush hint page as plain RAM, nothing attached: the writes stay in the guest. */
static void test_ram(void)
{
	struct vm *vm = vm_new(1, false);
	struct vcpu *v = &vm->vcpu[0];
	long long g0 = counter("guest_flushes"), m0 = vstat(v, "mmio_exits");
	struct run_args ra = { PMEM_GPA, PAGE, FHA_GPA, M, 0, -1 };
	struct cs_stat cs;

	check(vcpu_run_loop(v, &ra) == 0, "guest ran %u data + flush hint writes to HLT", M);
	check(exits_total(v) == 1 && v->exits[KVM_EXIT_HLT] == 1,
	      "one exit to user space (the HLT), got %lu", exits_total(v));
	check(vstat(v, "mmio_exits") - m0 == 0, "KVM mmio_exits +%lld",
	      vstat(v, "mmio_exits") - m0);
	check(counter("guest_flushes") == g0, "module counted no guest flush");
	cs = backing_cache(vm);
	if (!backing_is_tmpfs)
		check(cs.nr_dirty >= M, "nothing flushed: %llu dirty pages in the backing file",
		      (unsigned long long)cs.nr_dirty);
	check(*(uint32_t *)vm->fha == 0x4b564d58, "the writes reached the RAM page");
	vm_free(vm);
}

/* The kernel path: the page attached, flushes done by the module. */
static void test_kernel(void)
{
	struct vm *vm = vm_new(1, false);
	struct vcpu *v = &vm->vcpu[0];
	int kfd = kvmx_open();
	struct kvmx_fha_attach a = attach_args(vm->fd, vm->pmem_fd, FHA_GPA);
	struct kvmx_fha_stats st;
	struct cs_stat cs;
	uint32_t h;
	long long m0, e0, em0, x0;
	uint64_t t0, t1;

	h = kvmx_attach(kfd, &a);
	if (!check(h != 0, "attach the flush hint page (%s)", h ? "ok" : strerror(errno)))
		goto out;

	/* 1. data only: the backing file gets dirty, nothing is flushed */
	{
		struct run_args ra = { PMEM_GPA, PAGE, 0, 8, 0, -1 };

		check(vcpu_run_loop(v, &ra) == 0, "8 data writes");
	}
	cs = backing_cache(vm);
	if (!backing_is_tmpfs)
		check(cs.nr_dirty >= 8, "before the flush: %llu dirty pages",
		      (unsigned long long)cs.nr_dirty);
	else
		info("backing file on tmpfs: fdatasync has nothing to write");

	/* 2. one flush hint write makes them durable */
	{
		struct run_args ra = { PMEM_GPA + 8 * PAGE, PAGE, FHA_GPA, 1, 0, -1 };

		check(vcpu_run_loop(v, &ra) == 0, "1 data + 1 flush hint write");
	}
	st = kvmx_stats(kfd, h);
	check(st.guest_flushes == 1 && st.host_flushes == 1 && st.host_flush_errors == 0,
	      "one guest flush, one host flush (got %llu, %llu, errors %llu)",
	      (unsigned long long)st.guest_flushes, (unsigned long long)st.host_flushes,
	      (unsigned long long)st.host_flush_errors);
	check_clean(vm, "when the flush hint write returned");

	/* 3. measured: M x (data page + flush hint) */
	exits_reset(v);
	m0 = vstat(v, "mmio_exits");
	e0 = vstat(v, "exits");
	em0 = vstat(v, "insn_emulation");
	x0 = counter("guest_flushes");
	{
		struct run_args ra = { PMEM_GPA + 16 * PAGE, PAGE, FHA_GPA, M, 0, -1 };

		t0 = now_ns();
		check(vcpu_run_loop(v, &ra) == 0, "%u data + flush hint writes", M);
		t1 = now_ns();
	}
	st = kvmx_stats(kfd, h);
	check(exits_total(v) == 1 && v->exits[KVM_EXIT_HLT] == 1 && v->exits[KVM_EXIT_MMIO] == 0,
	      "no exit to user space but the final HLT (KVM_RUN returned %lu times, %lu MMIO)",
	      exits_total(v), v->exits[KVM_EXIT_MMIO]);
	check(vstat(v, "mmio_exits") - m0 == 0, "KVM mmio_exits +%lld",
	      vstat(v, "mmio_exits") - m0);
	check(vstat(v, "insn_emulation") - em0 >= M,
	      "KVM emulated the tracked writes in the kernel (insn_emulation +%lld >= %u)",
	      vstat(v, "insn_emulation") - em0, M);
	check(st.guest_flushes == 1 + M, "guest flushes %llu == %u",
	      (unsigned long long)st.guest_flushes, 1 + M);
	check(st.host_flushes >= 1 && st.host_flushes <= st.guest_flushes &&
	      st.host_flush_errors == 0, "host flushes %llu (>= 1, no errors)",
	      (unsigned long long)st.host_flushes);
	check(counter("guest_flushes") - x0 == M, "sysfs guest_flushes +%lld",
	      counter("guest_flushes") - x0);
	check(st.latency_min_ns > 0 && st.latency_min_ns <= st.latency_avg_ns &&
	      st.latency_avg_ns <= st.latency_max_ns,
	      "latency min %llu <= avg %llu <= max %llu ns",
	      (unsigned long long)st.latency_min_ns, (unsigned long long)st.latency_avg_ns,
	      (unsigned long long)st.latency_max_ns);
	check_clean(vm, "at the end");

	bench_kernel.have = true;
	bench_kernel.ns_per_flush = (double)(t1 - t0) / M;
	bench_kernel.user_exits_per_flush = (double)(exits_total(v) - 1) / M;
	bench_kernel.vm_exits_per_flush = (double)(vstat(v, "exits") - e0) / M;
	bench_kernel.module_avg_ns = st.latency_avg_ns;
	info("%u flushes in %.1f ms: %.1f us per flush, module latency avg %.1f us, "
	     "%.2f VM exits per flush", M, (t1 - t0) / 1e6, bench_kernel.ns_per_flush / 1e3,
	     st.latency_avg_ns / 1e3, bench_kernel.vm_exits_per_flush);
	check(kvmx_detach(kfd, h) == 0, "detach");
out:
	close(kfd);
	vm_free(vm);
}

/* The user path (QEMU today): a read-only memslot; each write exits as
 * KVM_EXIT_MMIO and we fdatasync() the backing file ourselves. */
static void test_user(void)
{
	struct vm *vm = vm_new(1, true);
	struct vcpu *v = &vm->vcpu[0];
	struct run_args ra = { PMEM_GPA + 16 * PAGE, PAGE, FHA_GPA, M, FHA_GPA, vm->pmem_fd };
	long long m0 = vstat(v, "mmio_exits"), e0 = vstat(v, "exits");
	long long g0 = counter("guest_flushes");
	uint64_t t0, t1;
	int kfd = kvmx_open();
	struct kvmx_fha_attach a = attach_args(vm->fd, vm->pmem_fd, FHA_GPA);

	expect_errno(ioctl(kfd, KVMX_FHA_ATTACH, &a), EINVAL,
		     "attaching a flush hint page in a read-only memslot");
	close(kfd);

	t0 = now_ns();
	check(vcpu_run_loop(v, &ra) == 0, "%u data + flush hint writes", M);
	t1 = now_ns();
	check(v->fha_mmio == M && v->exits[KVM_EXIT_MMIO] == M,
	      "%u KVM_EXIT_MMIO exits for %u flush hint writes (got %lu)", M, M,
	      v->exits[KVM_EXIT_MMIO]);
	check(vstat(v, "mmio_exits") - m0 == M, "KVM mmio_exits +%lld",
	      vstat(v, "mmio_exits") - m0);
	check(counter("guest_flushes") == g0, "the module saw none of them");
	check_clean(vm, "at the end");

	bench_user.have = true;
	bench_user.ns_per_flush = (double)(t1 - t0) / M;
	bench_user.user_exits_per_flush = (double)v->exits[KVM_EXIT_MMIO] / M;
	bench_user.vm_exits_per_flush = (double)(vstat(v, "exits") - e0) / M;
	info("%u flushes in %.1f ms: %.1f us per flush, %.2f VM exits per flush", M,
	     (t1 - t0) / 1e6, bench_user.ns_per_flush / 1e3, bench_user.vm_exits_per_flush);
	vm_free(vm);
}

static void print_bench(void)
{
	if (!bench_kernel.have || !bench_user.have)
		return;
	printf("KVMX-BENCH M=%u kernel_exits_per_flush=%.3f user_exits_per_flush=%.3f "
	       "kernel_vmexits_per_flush=%.3f user_vmexits_per_flush=%.3f "
	       "kernel_ns_per_flush=%.0f user_ns_per_flush=%.0f kernel_module_avg_ns=%.0f "
	       "user_over_kernel_latency=%.3f backing=%s\n", M,
	       bench_kernel.user_exits_per_flush, bench_user.user_exits_per_flush,
	       bench_kernel.vm_exits_per_flush, bench_user.vm_exits_per_flush,
	       bench_kernel.ns_per_flush, bench_user.ns_per_flush, bench_kernel.module_avg_ns,
	       bench_user.ns_per_flush / bench_kernel.ns_per_flush,
	       backing_is_tmpfs ? "tmpfs" : "disk");
	fflush(stdout);
}

/*
 * The deep flush file must be an nd region's sysfs deep_flush attribute:
 * anything else writable could block a vCPU in KVM_RUN (a full pipe).
 * Needs -D (e.g. /sys/bus/nd/devices/region0/deep_flush) for the flushes.
 */
static void test_deep(void)
{
	struct vm *vm = vm_new(1, false);
	struct vcpu *v = &vm->vcpu[0];
	int kfd = kvmx_open();
	struct kvmx_fha_attach a = attach_args(vm->fd, vm->pmem_fd, FHA_GPA);
	struct kvmx_fha_stats st;
	unsigned int k = M < 10 ? M : 10;
	char tmp[600], own[512];
	int dfd = -1, p[2], fd;
	uint32_t h;

	/* Writable files that are not a deep_flush attribute: refused. */
	if (pipe2(p, O_CLOEXEC | O_NONBLOCK) != 0)
		die("pipe");
	while (write(p[1], tmp, sizeof(tmp)) > 0)
		;	/* full: a write to it would block */
	a = attach_args(vm->fd, vm->pmem_fd, FHA_GPA);
	a.flags = KVMX_FLUSH_ALL; a.deep_flush_fd = p[1];
	expect_errno(ioctl(kfd, KVMX_FHA_ATTACH, &a), EINVAL, "DEEP to a full pipe");
	close(p[0]);
	close(p[1]);
	snprintf(own, sizeof(own), "/tmp/kvmx-modtest-deep-%d", getpid());
	fd = open(own, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
	a.deep_flush_fd = fd;
	expect_errno(ioctl(kfd, KVMX_FHA_ATTACH, &a), EINVAL,
		     "DEEP to a regular file (even one named like it)");
	close(fd);
	unlink(own);
	fd = memfd_create("deep_flush", MFD_CLOEXEC);
	a.deep_flush_fd = fd;
	expect_errno(ioctl(kfd, KVMX_FHA_ATTACH, &a), EINVAL, "DEEP to a memfd named deep_flush");
	close(fd);
	if (deep_path) {
		/* a writable sysfs file of the same region, not deep_flush */
		char *dir = strdup(deep_path), *slash = strrchr(dir, '/');

		if (slash)
			*slash = 0;
		snprintf(tmp, sizeof(tmp), "%s/read_only", dir);
		free(dir);
		fd = open(tmp, O_WRONLY | O_CLOEXEC);
		if (fd >= 0) {
			a.deep_flush_fd = fd;
			expect_errno(ioctl(kfd, KVMX_FHA_ATTACH, &a), EINVAL,
				     "DEEP to the region's sysfs read_only attribute");
			close(fd);
		} else {
			info("no %s: sysfs-but-not-deep_flush case not run", tmp);
		}
	}

	/*
	 * Device DAX has no page cache: FDATASYNC on a character device is
	 * refused (EOPNOTSUPP); the region's deep flush alone is accepted.
	 */
	{
		static const char *const chr[] = { "/dev/zero", "/dev/null", "/dev/kvmx" };
		unsigned int i;

		for (i = 0; i < 3; i++) {
			fd = open(chr[i], O_RDWR | O_CLOEXEC);
			a = attach_args(vm->fd, fd, FHA_GPA);
			snprintf(tmp, sizeof(tmp), "FDATASYNC of the character device %s", chr[i]);
			expect_errno(ioctl(kfd, KVMX_FHA_ATTACH, &a), EOPNOTSUPP, tmp);
			close(fd);
		}
	}

	if (!deep_path) {
		info("no -D deep_flush file: the flushes are not run");
		goto out;
	}
	dfd = open(deep_path, O_WRONLY | O_CLOEXEC);
	if (dfd < 0)
		die("open %s", deep_path);
	a = attach_args(vm->fd, vm->pmem_fd, FHA_GPA);
	a.flags = KVMX_FLUSH_ALL;
	a.deep_flush_fd = dfd;
	h = kvmx_attach(kfd, &a);
	if (!check(h != 0, "attach with FDATASYNC|DEEP, deep flush to %s", deep_path))
		goto out;
	{
		struct run_args ra = { PMEM_GPA, PAGE, FHA_GPA, k, 0, -1 };

		check(vcpu_run_loop(v, &ra) == 0, "%u data + flush hint writes", k);
	}
	st = kvmx_stats(kfd, h);
	check(st.guest_flushes == k && st.host_flushes >= 1 && st.host_flush_errors == 0 &&
	      st.error == 0 && st.failed_flushes == 0,
	      "guest flushes %llu, host flushes %llu, errors %llu",
	      (unsigned long long)st.guest_flushes, (unsigned long long)st.host_flushes,
	      (unsigned long long)st.host_flush_errors);
	printf("KVMX-DEEP host_flushes=%llu path=%s\n", (unsigned long long)st.host_flushes,
	       deep_path);
	check_clean(vm, "at the end");
	check(kvmx_detach(kfd, h) == 0, "detach");

	/* DEEP alone, no backing file (device DAX): only the deep flush. */
	{
		struct run_args ra = { PMEM_GPA, 0, SCRATCH_GPA, 3, 0, -1 };

		a = attach_args(vm->fd, -1, SCRATCH_GPA);
		a.flags = KVMX_FLUSH_DEEP;
		a.deep_flush_fd = dfd;
		h = kvmx_attach(kfd, &a);
		check(h != 0, "attach with DEEP alone, backing_fd -1 (%s)",
		      h ? "ok" : strerror(errno));
		check(vcpu_run_loop(v, &ra) == 0, "3 flush hint writes");
		st = kvmx_stats(kfd, h);
		check(st.guest_flushes == 3 && st.host_flushes == 3 && st.host_flush_errors == 0,
		      "3 guest flushes, 3 deep flushes, no error (%llu, %llu, %llu)",
		      (unsigned long long)st.guest_flushes, (unsigned long long)st.host_flushes,
		      (unsigned long long)st.host_flush_errors);
		printf("KVMX-DEEP-ONLY host_flushes=%llu\n", (unsigned long long)st.host_flushes);
		check(kvmx_detach(kfd, h) == 0, "detach");
	}
out:
	if (dfd >= 0)
		close(dfd);
	close(kfd);
	vm_free(vm);
}

/* After DETACH the page is plain RAM again: no flush, no exit. */
static void test_detach(void)
{
	struct vm *vm = vm_new(1, false);
	struct vcpu *v = &vm->vcpu[0];
	int kfd = kvmx_open();
	struct kvmx_fha_attach a = attach_args(vm->fd, vm->pmem_fd, FHA_GPA);
	struct kvmx_fha_attach b = attach_args(vm->fd, vm->pmem_fd, SCRATCH_GPA);
	long long g0, em0, base;
	uint32_t h1, h2;

	h1 = kvmx_attach(kfd, &a);
	h2 = kvmx_attach(kfd, &b);
	check(h1 && h2 && h1 != h2, "two attachments, handles %u and %u", h1, h2);
	{
		struct run_args ra = { PMEM_GPA, PAGE, FHA_GPA, 3, 0, -1 };

		check(vcpu_run_loop(v, &ra) == 0, "3 flush hint writes while attached");
	}
	check(kvmx_stats(kfd, h1).guest_flushes == 3, "counted 3");
	check(kvmx_detach(kfd, h1) == 0, "detach the flush hint page");
	check(counter("tracked") == 1, "sysfs tracked = 1 (%lld)", counter("tracked"));

	/*
	 * Emulations a run costs anyway: KVM skips the HLT by emulating it
	 * when the CPU has no next-RIP save (TCG's SVM has none).
	 */
	em0 = vstat(v, "insn_emulation");
	{
		struct run_args ra = { PMEM_GPA + 100 * PAGE, 0, 0, 1, 0, -1 };

		check(vcpu_run_loop(v, &ra) == 0, "a run without flush hint writes");
	}
	base = vstat(v, "insn_emulation") - em0;

	g0 = counter("guest_flushes");
	em0 = vstat(v, "insn_emulation");
	exits_reset(v);
	{
		struct run_args ra = { PMEM_GPA, PAGE, FHA_GPA, M, 0, -1 };

		check(vcpu_run_loop(v, &ra) == 0, "%u writes after detach", M);
	}
	check(counter("guest_flushes") == g0, "no flush counted after detach (+%lld)",
	      counter("guest_flushes") - g0);
	check(exits_total(v) == 1, "no exit but HLT (%lu)", exits_total(v));
	check(vstat(v, "insn_emulation") - em0 == base,
	      "writes no longer emulated (insn_emulation +%lld, a run without them +%lld)",
	      vstat(v, "insn_emulation") - em0, base);
	check(kvmx_stats(kfd, h2).guest_flushes == 0, "the other attachment saw nothing");
	{
		struct run_args ra = { PMEM_GPA, 0, SCRATCH_GPA, 1, 0, -1 };

		check(vcpu_run_loop(v, &ra) == 0, "one write to the other attached page");
	}
	check(kvmx_stats(kfd, h2).guest_flushes == 1, "... counted there");
	close(kfd);
	check(counter("attachments") == 0 && counter("vms") == 0 && counter("tracked") == 0,
	      "close detached the rest (attachments %lld, vms %lld, tracked %lld)",
	      counter("attachments"), counter("vms"), counter("tracked"));
	vm_free(vm);
}

/* track_remove_region: deleting the memslot drops the tracking. */
static void test_memslot(void)
{
	struct vm *vm = vm_new(1, false);
	struct vcpu *v = &vm->vcpu[0];
	int kfd = kvmx_open();
	struct kvmx_fha_attach a = attach_args(vm->fd, vm->pmem_fd, EXTRA_GPA);
	long long g0;
	uint32_t h, h2;

	h = kvmx_attach(kfd, &a);
	check(h != 0, "attach a page of memslot %d", SLOT_EXTRA);
	{
		struct run_args ra = { PMEM_GPA, 0, EXTRA_GPA, 2, 0, -1 };

		check(vcpu_run_loop(v, &ra) == 0, "2 writes");
	}
	check(kvmx_stats(kfd, h).guest_flushes == 2, "counted 2");

	set_slot(vm, SLOT_EXTRA, EXTRA_GPA, 0, vm->extra, 0);	/* delete */
	check(counter("tracked") == 0 && counter("attachments") == 1,
	      "memslot deleted: attachment kept, no longer tracked (tracked %lld)",
	      counter("tracked"));
	check(kvmx_stats(kfd, h).guest_flushes == 2, "its counters still readable");

	set_slot(vm, SLOT_EXTRA, EXTRA_GPA, PAGE, vm->extra, 0);	/* back */
	g0 = counter("guest_flushes");
	exits_reset(v);
	{
		struct run_args ra = { PMEM_GPA, 0, EXTRA_GPA, M, 0, -1 };

		check(vcpu_run_loop(v, &ra) == 0, "%u writes to the re-created memslot", M);
	}
	check(counter("guest_flushes") == g0 && exits_total(v) == 1,
	      "not tracked any more: no flush, no exit");
	check(kvmx_detach(kfd, h) == 0, "detach the untracked attachment");

	a = attach_args(vm->fd, vm->pmem_fd, EXTRA_GPA);
	h2 = kvmx_attach(kfd, &a);
	check(h2 != 0 && h2 != h, "attach again in the new memslot (handle %u)", h2);
	{
		struct run_args ra = { PMEM_GPA, 0, EXTRA_GPA, 1, 0, -1 };

		check(vcpu_run_loop(v, &ra) == 0, "1 write");
	}
	check(kvmx_stats(kfd, h2).guest_flushes == 1, "counted again");

	/*
	 * A memslot of address space 1 (SMM) over the same page going away
	 * says nothing about ours: the tracking stays.
	 */
	if (ioctl(vm->fd, KVM_CHECK_EXTENSION, KVM_CAP_MULTI_ADDRESS_SPACE) >= 2) {
		g0 = counter("guest_flushes");
		set_slot(vm, (1u << 16) | 7, EXTRA_GPA, PAGE, vm->extra, 0);
		set_slot(vm, (1u << 16) | 7, EXTRA_GPA, 0, vm->extra, 0);
		check(counter("tracked") == 1,
		      "deleting an SMM-address-space memslot over the page keeps it tracked");
		{
			struct run_args ra = { PMEM_GPA, 0, EXTRA_GPA, 1, 0, -1 };

			check(vcpu_run_loop(v, &ra) == 0, "1 write");
		}
		check(kvmx_stats(kfd, h2).guest_flushes == 2 && counter("guest_flushes") == g0 + 1,
		      "... and still flushed");
	} else {
		info("no second address space: SMM memslot case not run");
	}

	/*
	 * KVM (6.12 kvm_arch_prepare_memory_region) refuses to move a memslot
	 * of a VM that has an external page-track notifier; QEMU never moves
	 * memslots (it deletes and re-creates them).
	 */
	expect_errno(try_set_slot(vm, SLOT_EXTRA, EXTRA_GPA + 0x200000, PAGE, vm->extra, 0),
		     EINVAL, "KVM refuses a memslot move (KVM_MR_MOVE) while we track");
	check(counter("tracked") == 1, "still tracked after the refused move");
	/* Delete it again and close with the attachment untracked. */
	set_slot(vm, SLOT_EXTRA, EXTRA_GPA, 0, vm->extra, 0);
	check(counter("tracked") == 0 && counter("attachments") == 1,
	      "memslot deleted again: untracked (tracked %lld)", counter("tracked"));
	close(kfd);
	check(counter("attachments") == 0 && counter("vms") == 0,
	      "close cleaned up (attachments %lld, vms %lld)", counter("attachments"),
	      counter("vms"));
	vm_free(vm);
}

/* KVMX_MAX_ATTACH per open file. */
static void test_limits(void)
{
	struct vm *vm = vm_new(0, false);
	int kfd = kvmx_open();
	uint32_t *h = calloc(KVMX_MAX_ATTACH + 1, sizeof(*h));
	struct kvmx_fha_attach a;
	unsigned int i, ok = 0;
	int kfd2;

	for (i = 0; i < KVMX_MAX_ATTACH; i++) {
		a = attach_args(vm->fd, vm->pmem_fd, MANY_GPA + i * PAGE);
		h[i] = kvmx_attach(kfd, &a);
		ok += h[i] != 0;
	}
	check(ok == KVMX_MAX_ATTACH, "%u of %u attachments made", ok, KVMX_MAX_ATTACH);
	a = attach_args(vm->fd, vm->pmem_fd, MANY_GPA + KVMX_MAX_ATTACH * PAGE);
	expect_errno(ioctl(kfd, KVMX_FHA_ATTACH, &a), ENOSPC,
		     "attachment number KVMX_MAX_ATTACH + 1");
	kfd2 = kvmx_open();
	a = attach_args(vm->fd, vm->pmem_fd, MANY_GPA + KVMX_MAX_ATTACH * PAGE);
	h[KVMX_MAX_ATTACH] = kvmx_attach(kfd2, &a);
	check(h[KVMX_MAX_ATTACH] != 0, "the limit is per open file: another file may attach");
	close(kfd2);
	check(counter("vms") == 1 && counter("attachments") == KVMX_MAX_ATTACH,
	      "sysfs: vms %lld, attachments %lld", counter("vms"), counter("attachments"));
	for (i = 0, ok = 0; i < KVMX_MAX_ATTACH; i += 2)
		ok += kvmx_detach(kfd, h[i]) == 0;
	check(ok == KVMX_MAX_ATTACH / 2, "detached every other one");
	a = attach_args(vm->fd, vm->pmem_fd, MANY_GPA + KVMX_MAX_ATTACH * PAGE);
	check(kvmx_attach(kfd, &a) != 0, "room again after detaching");
	close(kfd);
	check(counter("attachments") == 0 && counter("vms") == 0 && counter("tracked") == 0,
	      "close released all %u", KVMX_MAX_ATTACH);
	free(h);
	vm_free(vm);
}

/* ---- concurrency ----------------------------------------------------- */

struct conc {
	struct vm *vm;
	int kfd;		/* shared by the threads */
	volatile int stop;
	unsigned long ops[8], errs[8];
	char first_err[8][128];
};
struct conc_thread {
	struct conc *c;
	int id;
};

static void conc_err(struct conc *c, int id, const char *what)
{
	if (!c->errs[id]++)
		snprintf(c->first_err[id], sizeof(c->first_err[id]), "%s: %s", what,
			 strerrorname_np(errno));
}

/* Threads 0..2: attach/stats/detach their own pages; thread 3 toggles the
 * flush hint page the vCPU is writing; thread 4 pokes at random handles. */
static void *conc_worker(void *arg)
{
	struct conc_thread *t = arg;
	struct conc *c = t->c;
	unsigned int seed = t->id * 7919 + 1;

	while (!c->stop) {
		if (t->id < 3) {
			uint64_t gpa = SCRATCH_GPA + (t->id * 16 + rand_r(&seed) % 16) * PAGE;
			struct kvmx_fha_attach a = attach_args(c->vm->fd, c->vm->pmem_fd, gpa);
			uint32_t h = kvmx_attach(c->kfd, &a);
			struct kvmx_fha_stats st = { .size = sizeof(st), .handle = h };

			if (!h) {
				conc_err(c, t->id, "attach");
				continue;
			}
			if (ioctl(c->kfd, KVMX_FHA_STATS, &st) != 0)
				conc_err(c, t->id, "stats");
			if (kvmx_detach(c->kfd, h) != 0)
				conc_err(c, t->id, "detach");
		} else if (t->id == 3) {
			struct kvmx_fha_attach a = attach_args(c->vm->fd, c->vm->pmem_fd, FHA_GPA);
			uint32_t h = kvmx_attach(c->kfd, &a);

			if (!h) {
				conc_err(c, t->id, "attach fha");
				continue;
			}
			usleep(rand_r(&seed) % 20000);
			if (kvmx_detach(c->kfd, h) != 0)
				conc_err(c, t->id, "detach fha");
		} else {
			struct kvmx_fha_stats st = { .size = sizeof(st),
						     .handle = rand_r(&seed) % 64 };
			uint32_t h = rand_r(&seed) % 64 + 1000000;

			/* Racing lookups: found or ENOENT, nothing else. */
			if (ioctl(c->kfd, KVMX_FHA_STATS, &st) != 0 && errno != ENOENT)
				conc_err(c, t->id, "stats random");
			if (kvmx_detach(c->kfd, h) == 0 || errno != ENOENT)
				conc_err(c, t->id, "detach nonexistent");
		}
		c->ops[t->id]++;
	}
	return NULL;
}

static void test_concurrent(void)
{
	struct conc c;
	struct conc_thread ts[5];
	pthread_t th[5];
	struct vcpu *v;
	unsigned int count = M * 4;
	long long g0;
	int i, r;

	memset(&c, 0, sizeof(c));
	c.vm = vm_new(1, false);
	c.kfd = kvmx_open();
	v = &c.vm->vcpu[0];
	g0 = counter("guest_flushes");
	for (i = 0; i < 5; i++) {
		ts[i].c = &c;
		ts[i].id = i;
		pthread_create(&th[i], NULL, conc_worker, &ts[i]);
	}
	{
		struct run_args ra = { PMEM_GPA, 0, FHA_GPA, count, 0, -1 };

		r = vcpu_run_loop(v, &ra);
	}
	c.stop = 1;
	for (i = 0; i < 5; i++)
		pthread_join(th[i], NULL);
	check(r == 0, "the vCPU finished %u flush hint writes while 5 threads "
	      "attached/detached", count);
	for (i = 0; i < 5; i++)
		check(c.errs[i] == 0, "thread %d: %lu operations, %lu errors%s%s", i, c.ops[i],
		      c.errs[i], c.errs[i] ? ", first: " : "", c.first_err[i]);
	info("the toggled page caught %lld of %u writes", counter("guest_flushes") - g0, count);
	check(counter("guest_flushes") - g0 <= count, "never more flushes than writes");
	check(counter("attachments") == 0 && counter("tracked") == 0,
	      "all detached (attachments %lld, tracked %lld)", counter("attachments"),
	      counter("tracked"));
	check(counter("vms") == 0, "notifier released with the last attachment (vms %lld)",
	      counter("vms"));
	close(c.kfd);
	vm_free(c.vm);
}

struct mv_arg {
	struct vcpu *v;
	struct run_args ra;
	int r;
};

static void *mv_run(void *p)
{
	struct mv_arg *m = p;

	m->r = vcpu_run_loop(m->v, &m->ra);
	return NULL;
}

/* Several vCPUs flushing at once: every write counted, flushes coalesce. */
static void test_multivcpu(void)
{
	enum { NV = 4 };
	struct vm *vm = vm_new(NV, false);
	int kfd = kvmx_open();
	struct kvmx_fha_attach a = attach_args(vm->fd, vm->pmem_fd, FHA_GPA);
	struct mv_arg args[NV];
	pthread_t th[NV];
	struct kvmx_fha_stats st;
	unsigned int k = M / 2 ? M / 2 : 1;
	uint32_t h;
	int i, ok = 0;

	h = kvmx_attach(kfd, &a);
	check(h != 0, "attach");
	for (i = 0; i < NV; i++) {
		args[i].v = &vm->vcpu[i];
		/* each vCPU stores to its own run of pages, then flushes */
		args[i].ra = (struct run_args){ PMEM_GPA + i * 64 * PAGE, PAGE, FHA_GPA, k, 0, -1 };
		pthread_create(&th[i], NULL, mv_run, &args[i]);
	}
	for (i = 0; i < NV; i++) {
		pthread_join(th[i], NULL);
		ok += args[i].r == 0;
	}
	check(ok == NV, "%d vCPUs x %u flush hint writes", NV, k);
	st = kvmx_stats(kfd, h);
	check(st.guest_flushes == (uint64_t)NV * k, "guest flushes %llu == %u",
	      (unsigned long long)st.guest_flushes, NV * k);
	check(st.host_flushes >= 1 && st.host_flushes <= st.guest_flushes &&
	      st.host_flush_errors == 0, "host flushes %llu <= guest flushes",
	      (unsigned long long)st.host_flushes);
	check_clean(vm, "at the end");
	printf("KVMX-COALESCE vcpus=%d guest_flushes=%llu host_flushes=%llu\n", NV,
	       (unsigned long long)st.guest_flushes, (unsigned long long)st.host_flushes);
	close(kfd);
	vm_free(vm);
}

/*
 * The VM's fds closed (and its memory unmapped) while still attached: the
 * module's reference keeps the VM until /dev/kvmx is closed, and then the
 * VM goes away from the module's release.
 */
static void test_vmclose(void)
{
	const char *vendor = module_refcnt("kvm_amd") >= 0 ? "kvm_amd" : "kvm_intel";
	long long vendor0 = module_refcnt(vendor);
	struct vm *vm = vm_new(1, false);
	int kfd = kvmx_open();
	struct kvmx_fha_attach a = attach_args(vm->fd, vm->pmem_fd, FHA_GPA);
	struct run_args ra = { PMEM_GPA, 0, FHA_GPA, 2, 0, -1 };
	uint32_t h = kvmx_attach(kfd, &a);

	check(h != 0 && vcpu_run_loop(&vm->vcpu[0], &ra) == 0, "attached, 2 flushes");
	vm_free(vm);
	check(module_refcnt(vendor) > vendor0,
	      "VM fds closed: the VM lives on, pinned by kvmx (%s refcnt %lld, was %lld)",
	      vendor, module_refcnt(vendor), vendor0);
	check(kvmx_stats(kfd, h).guest_flushes == 2, "its attachment still answers");
	close(kfd);
	check(counter("attachments") == 0 && counter("vms") == 0,
	      "closing /dev/kvmx released it (attachments %lld, vms %lld)",
	      counter("attachments"), counter("vms"));
	check(module_refcnt(vendor) == vendor0, "and the VM is gone (%s refcnt %lld)", vendor,
	      module_refcnt(vendor));
}

/* ---- a slow host flush ----------------------------------------------- */

static struct cs_stat range_cache(int fd, uint64_t off, uint64_t len)
{
	struct cs_range r = { off, len };
	struct cs_stat cs;

	memset(&cs, 0, sizeof(cs));
	if (syscall(__NR_cachestat, fd, &r, &cs, 0) != 0)
		die("cachestat");
	return cs;
}

static double ms_since(uint64_t t0)
{
	return (now_ns() - t0) / 1e6;
}

/* Create and delete a one-page memslot; returns the two times in ms. */
static void time_memslot_update(struct vm *vm, double *create_ms, double *delete_ms)
{
	uint64_t t0 = now_ns();

	set_slot(vm, 5, 0xb00000, PAGE, vm->extra, 0);
	*create_ms = ms_since(t0);
	t0 = now_ns();
	set_slot(vm, 5, 0xb00000, 0, vm->extra, 0);
	*delete_ms = ms_since(t0);
}

struct stall_vcpu {
	struct vcpu *v;
	struct run_args ra;
	int r;
	volatile int done;
	uint64_t t0, t1;
};

static void *stall_run(void *p)
{
	struct stall_vcpu *s = p;

	s->t0 = now_ns();
	s->r = vcpu_run_loop(s->v, &s->ra);
	s->t1 = now_ns();
	s->done = 1;
	return NULL;
}

/*
 * A host flush that takes seconds (the backing is a null_blk device
 * throttled to a few MiB/s, -S) must not hold up the VM's memslot
 * updates: KVM_SET_USER_MEMORY_REGION waits (synchronize_srcu) for every
 * vCPU inside kvm->srcu, and QEMU makes such updates under its big lock.
 * And the guest must still not run on before its flush is done: its store
 * after the flush hint write (the "marker") must not become visible while
 * the pages dirtied before the write are still dirty or under writeback.
 */
static void test_stall(void)
{
	struct stall_vcpu s;
	struct vm *vm;
	struct kvmx_fha_attach a;
	struct kvmx_fha_stats st;
	const uint64_t marker_off = PMEM_SIZE - PAGE;
	volatile uint32_t *marker;
	double base_c, base_d, c_ms = -1, d_ms = -1, flush_ms;
	long long marker_unflushed = -1;
	struct cs_stat cs;
	pthread_t th;
	uint32_t h;
	int kfd, i;

	if (!slow_dev) {
		info("no slow device (-S): not run");
		return;
	}
	pmem_dev = slow_dev;
	vm = vm_new(1, false);
	pmem_dev = NULL;
	kfd = kvmx_open();
	marker = (volatile uint32_t *)(vm->pmem + marker_off);

	/* What a memslot update costs here when nothing flushes. */
	time_memslot_update(vm, &base_c, &base_d);
	a = attach_args(vm->fd, vm->pmem_fd, FHA_GPA);
	h = kvmx_attach(kfd, &a);
	if (!check(h != 0, "attach with %s as the backing", slow_dev))
		goto out;

	/* Dirty all of it (the marker page zeroed), so the flush is slow. */
	if (fdatasync(vm->pmem_fd) != 0)
		die("fdatasync %s", slow_dev);
	for (i = 0; i < (int)(PMEM_SIZE / PAGE); i++)
		memset(vm->pmem + i * PAGE, 0x5a ^ i, PAGE);
	*marker = 0;
	cs = range_cache(vm->pmem_fd, 0, PMEM_SIZE);
	info("%llu dirty pages before the flush hint write",
	     (unsigned long long)cs.nr_dirty);

	/* data store to page 0, flush hint; then the marker store, flush hint */
	memset(&s, 0, sizeof(s));
	s.v = &vm->vcpu[0];
	s.ra = (struct run_args){ PMEM_GPA, marker_off, FHA_GPA, 2, 0, -1 };
	pthread_create(&th, NULL, stall_run, &s);

	/* Wait for the host flush to be under way. */
	for (i = 0; i < 10000 && !s.done; i++) {
		cs = range_cache(vm->pmem_fd, 0, marker_off);
		if (cs.nr_writeback > 0)
			break;
		usleep(1000);
	}
	check(!s.done && cs.nr_writeback > 0,
	      "the host flush is under way (%llu pages under writeback, %llu dirty)",
	      (unsigned long long)cs.nr_writeback, (unsigned long long)cs.nr_dirty);
	if (!s.done)
		time_memslot_update(vm, &c_ms, &d_ms);

	/* Watch for the marker until the vCPU is done. */
	while (!s.done) {
		if (marker_unflushed < 0 && *marker == 0x4b564d58) {
			cs = range_cache(vm->pmem_fd, 0, marker_off);
			marker_unflushed = cs.nr_dirty + cs.nr_writeback;
		}
		usleep(500);
	}
	pthread_join(th, NULL);
	st = kvmx_stats(kfd, h);
	flush_ms = st.latency_max_ns / 1e6;

	check(s.r == 0, "the vCPU ran its 2 flush hint writes to HLT");
	check(st.guest_flushes == 2 && st.host_flushes == 2 && st.host_flush_errors == 0,
	      "2 guest flushes, 2 host flushes (%llu, %llu, errors %llu)",
	      (unsigned long long)st.guest_flushes, (unsigned long long)st.host_flushes,
	      (unsigned long long)st.host_flush_errors);
	check(flush_ms >= 500, "the first flush was slow: %.0f ms", flush_ms);
	check(marker_unflushed <= 0,
	      "the guest's next store was not seen before its flush finished (%s)",
	      marker_unflushed < 0 ? "seen only after the vCPU finished"
				   : "seen with 0 unflushed pages");
	if (marker_unflushed > 0)
		info("marker seen while %lld pages were unflushed", marker_unflushed);
	cs = range_cache(vm->pmem_fd, 0, PMEM_SIZE);
	check(cs.nr_dirty == 0 && cs.nr_writeback == 0, "all clean at the end (%llu dirty)",
	      (unsigned long long)cs.nr_dirty);
	printf("KVMX-STALL flush_ms=%.1f slot_create_ms=%.1f slot_delete_ms=%.1f "
	       "idle_create_ms=%.1f idle_delete_ms=%.1f vcpu_run_ms=%.1f\n", flush_ms, c_ms,
	       d_ms, base_c, base_d, (s.t1 - s.t0) / 1e6);
	check(c_ms >= 0 && c_ms + d_ms < flush_ms / 4,
	      "memslot create + delete during the flush took %.1f + %.1f ms "
	      "(idle: %.1f + %.1f), the flush %.0f ms", c_ms, d_ms, base_c, base_d, flush_ms);
	check(kvmx_detach(kfd, h) == 0, "detach");
out:
	close(kfd);
	vm_free(vm);
}

/* ---- ABI versioning, features, permissions --------------------------- */

/*
 * Struct sizes work like copy_struct_from_user(): the version-0 size (an
 * old user) as before, a larger struct (a newer user) if what we do not
 * know is 0, E2BIG otherwise; STATS writes what it has and zeroes the rest.
 */
static void test_abi(void)
{
	struct vm *vm = vm_new(0, false);
	int kfd = kvmx_open();
	long feat = ioctl(kfd, KVMX_GET_FEATURES, 0);
	const long want = KVMX_FEATURE_ERROR_NOTIFY | KVMX_FEATURE_FLUSH_OUTSIDE_SRCU |
			  KVMX_FEATURE_SIZED_STRUCTS | KVMX_FEATURE_DEEP_ONLY;
	static uint8_t big[8192] __attribute__((aligned(8)));
	struct kvmx_fha_attach base = attach_args(vm->fd, vm->pmem_fd, FHA_GPA), *bp;
	struct kvmx_fha_stats *sp;
	char what[200];
	uint32_t h;
	unsigned int i;
	int devnull = open("/dev/null", O_RDWR | O_CLOEXEC), closed_fd, efd;

	check(feat == want, "KVMX_GET_FEATURES = 0x%lx (want 0x%lx)", feat, want);
	check(ioctl(kfd, KVMX_GET_API_VERSION, 0) == 1, "major still 1");

	/* An old (version-0) user: 72 bytes, no new flag, error fields 0. */
	{
		struct kvmx_fha_attach a = base;

		check(a.size == KVMX_FHA_ATTACH_SIZE_VER0 && sizeof(a) == 72,
		      "version-0 size is 72");
		h = kvmx_attach(kfd, &a);
		check(h != 0, "a version-0 attach (72 bytes) works");
		check(kvmx_detach(kfd, h) == 0, "detach");
	}
	/* A newer user: larger structs, unknown bytes 0: accepted. */
	{
		static const uint32_t sizes[] = { 73, 80, 128, 4096 };

		for (i = 0; i < sizeof(sizes) / sizeof(sizes[0]); i++) {
			memset(big, 0, sizeof(big));
			bp = (void *)big;
			*bp = base;
			bp->size = sizes[i];
			h = 0;
			if (ioctl(kfd, KVMX_FHA_ATTACH, bp) == 0)
				h = bp->handle;
			check(h != 0, "attach with size %u, tail zero: accepted (%s)", sizes[i],
			      h ? "ok" : strerrorname_np(errno));
			if (h)
				kvmx_detach(kfd, h);
		}
	}
	/* ... and with a byte we do not know set: E2BIG. */
	{
		static const uint32_t at[][2] = { { 73, 72 }, { 80, 79 }, { 4096, 4095 } };

		for (i = 0; i < 3; i++) {
			memset(big, 0, sizeof(big));
			bp = (void *)big;
			*bp = base;
			bp->size = at[i][0];
			big[at[i][1]] = 1;
			snprintf(what, sizeof(what), "size %u with byte %u nonzero", at[i][0], at[i][1]);
			expect_errno(ioctl(kfd, KVMX_FHA_ATTACH, bp), E2BIG, what);
		}
		memset(big, 0, sizeof(big));
		bp = (void *)big;
		*bp = base;
		bp->size = 4097;
		expect_errno(ioctl(kfd, KVMX_FHA_ATTACH, bp), E2BIG, "size 4097 (more than a page)");
	}
	/* A larger struct that runs off the end of readable memory. */
	{
		uint8_t *m = mmap(NULL, 2 * PAGE, PROT_READ | PROT_WRITE,
				  MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

		if (m == MAP_FAILED || munmap(m + PAGE, PAGE) != 0)
			die("mmap");
		bp = (void *)(m + PAGE - sizeof(*bp));
		*bp = base;
		bp->size = sizeof(*bp) + 16;
		expect_errno(ioctl(kfd, KVMX_FHA_ATTACH, bp), EFAULT,
			     "size 88 whose tail is not mapped");
		munmap(m, PAGE);
	}

	/* The error fields: 0 without the flag, checked with it. */
	{
		struct kvmx_fha_attach a;

		a = base; a.error_eventfd = devnull;
		expect_errno(ioctl(kfd, KVMX_FHA_ATTACH, &a), EINVAL,
			     "error_eventfd set without ERROR_NOTIFY");
		a = base; a.error_signal = SIGUSR1;
		expect_errno(ioctl(kfd, KVMX_FHA_ATTACH, &a), EINVAL,
			     "error_signal set without ERROR_NOTIFY");
		a = base; a.flags = KVMX_ATTACH_ERROR_NOTIFY; a.backing_fd = -1;
		a.error_eventfd = -1; a.error_signal = SIGUSR1;
		expect_errno(ioctl(kfd, KVMX_FHA_ATTACH, &a), EINVAL,
			     "ERROR_NOTIFY alone (nothing to flush)");
		{
			static const int sigs[] = { 0, -1, SIGKILL, SIGSTOP, 65, 1000 };

			for (i = 0; i < sizeof(sigs) / sizeof(sigs[0]); i++) {
				a = base; a.flags |= KVMX_ATTACH_ERROR_NOTIFY;
				a.error_eventfd = -1; a.error_signal = sigs[i];
				snprintf(what, sizeof(what), "ERROR_NOTIFY with signal %d", sigs[i]);
				expect_errno(ioctl(kfd, KVMX_FHA_ATTACH, &a), EINVAL, what);
			}
		}
		closed_fd = dup(devnull);
		close(closed_fd);
		a = base; a.flags |= KVMX_ATTACH_ERROR_NOTIFY; a.error_signal = SIGUSR1;
		a.error_eventfd = devnull;
		expect_errno(ioctl(kfd, KVMX_FHA_ATTACH, &a), EINVAL,
			     "error_eventfd /dev/null (not an eventfd)");
		a.error_eventfd = closed_fd;
		expect_errno(ioctl(kfd, KVMX_FHA_ATTACH, &a), EBADF, "error_eventfd closed");
		a.error_eventfd = -2;
		expect_errno(ioctl(kfd, KVMX_FHA_ATTACH, &a), EBADF, "error_eventfd -2");
		a.error_eventfd = -1;
		h = kvmx_attach(kfd, &a);
		check(h != 0, "ERROR_NOTIFY, SIGUSR1, no eventfd (-1): accepted");
		kvmx_detach(kfd, h);
		efd = eventfd(0, EFD_CLOEXEC);
		a.error_eventfd = efd;
		h = kvmx_attach(kfd, &a);
		check(h != 0, "ERROR_NOTIFY, SIGUSR1, an eventfd: accepted");
		close(efd);	/* the attachment holds the eventfd */
		{
			struct kvmx_fha_stats st = kvmx_stats(kfd, h);

			check(st.error == 0 && st.failed_flushes == 0, "fresh: no error");
		}
		check(ioctl(kfd, KVMX_FHA_CLEAR_ERROR, &h) == 0, "CLEAR_ERROR with no error: 0");
		kvmx_detach(kfd, h);
		expect_errno(ioctl(kfd, KVMX_FHA_CLEAR_ERROR, &h), ENOENT,
			     "CLEAR_ERROR of a detached handle");
		expect_errno(ioctl(kfd, KVMX_FHA_CLEAR_ERROR, NULL), EFAULT,
			     "CLEAR_ERROR with a NULL argument");
	}

	/* STATS: sizes */
	{
		struct kvmx_fha_attach a = base;

		h = kvmx_attach(kfd, &a);
		memset(big, 0xff, sizeof(big));
		sp = (void *)big;
		sp->size = 120;
		sp->handle = h;
		check(ioctl(kfd, KVMX_FHA_STATS, sp) == 0, "STATS with size 120");
		for (i = 88; i < 120 && big[i] == 0; i++)
			;
		check(sp->size == 88 && i == 120 && big[120] == 0xff,
		      "... answers size 88, zeroes bytes 88..119 and no further");
		sp->size = 4096;
		sp->handle = h;
		check(ioctl(kfd, KVMX_FHA_STATS, sp) == 0, "STATS with size 4096");
		sp->size = 4097;
		sp->handle = h;
		expect_errno(ioctl(kfd, KVMX_FHA_STATS, sp), E2BIG, "STATS size 4097");
		sp->size = 87;
		expect_errno(ioctl(kfd, KVMX_FHA_STATS, sp), EINVAL, "STATS size 87");
		kvmx_detach(kfd, h);
	}
	close(devnull);
	close(kfd);
	vm_free(vm);
}

/*
 * /dev/kvmx and the module-wide counters are root's: a flush rate says
 * something about other tenants.  api_version stays readable.
 */
static void test_perms(void)
{
	static const char *const ctrs[] = {
		"attachments", "tracked", "vms", "guest_flushes", "failed_flushes",
		"host_flushes", "host_flush_errors", "inline_flushes", "rejected",
	};
	char path[256];
	struct stat sb;
	unsigned int i, ok = 0;
	pid_t pid;
	int st;

	for (i = 0; i < sizeof(ctrs) / sizeof(ctrs[0]); i++) {
		snprintf(path, sizeof(path), "%s/%s", sysdir, ctrs[i]);
		if (stat(path, &sb) == 0 && (sb.st_mode & 0777) == 0400)
			ok++;
		else
			info("%s: mode %o", path, stat(path, &sb) ? 0 : sb.st_mode & 0777);
	}
	check(ok == sizeof(ctrs) / sizeof(ctrs[0]), "%u of %zu counters are mode 0400", ok,
	      sizeof(ctrs) / sizeof(ctrs[0]));
	snprintf(path, sizeof(path), "%s/api_version", sysdir);
	check(stat(path, &sb) == 0 && (sb.st_mode & 0777) == 0444, "api_version is 0444");

	/* As nobody (setresuid drops the capabilities). */
	pid = fork();
	if (pid == 0) {
		int bad = 0, fd;

		if (setresgid(65534, 65534, 65534) || setresuid(65534, 65534, 65534))
			_exit(100);
		for (i = 0; i < sizeof(ctrs) / sizeof(ctrs[0]); i++) {
			snprintf(path, sizeof(path), "%s/%s", sysdir, ctrs[i]);
			fd = open(path, O_RDONLY);
			if (fd >= 0 || errno != EACCES)
				bad |= 1;
			if (fd >= 0)
				close(fd);
		}
		snprintf(path, sizeof(path), "%s/api_version", sysdir);
		fd = open(path, O_RDONLY);
		if (fd < 0)
			bad |= 2;
		else
			close(fd);
		fd = open(kvmx_dev, O_RDWR);
		if (fd >= 0 || errno != EACCES)
			bad |= 4;
		_exit(bad);
	}
	waitpid(pid, &st, 0);
	check(WIFEXITED(st) && WEXITSTATUS(st) != 100, "child became uid 65534");
	check(WIFEXITED(st) && !(WEXITSTATUS(st) & 1), "uid 65534: every counter -> EACCES");
	check(WIFEXITED(st) && !(WEXITSTATUS(st) & 2), "uid 65534: api_version readable");
	check(WIFEXITED(st) && !(WEXITSTATUS(st) & 4), "uid 65534: /dev/kvmx -> EACCES");
}

/* ---- failed host flushes --------------------------------------------- */

/* The null_blk device behind -E (named after its configfs dir). */
static void err_dev(char *dev, size_t n)
{
	const char *slash = strrchr(err_dir, '/');

	snprintf(dev, n, "/dev/%s", slash ? slash + 1 : err_dir);
}

static bool err_badblocks(const char *op)
{
	char path[512];
	int fd, r;

	snprintf(path, sizeof(path), "%s/badblocks", err_dir);
	fd = open(path, O_WRONLY | O_CLOEXEC);
	if (fd < 0)
		die("open %s", path);
	r = write(fd, op, strlen(op));
	close(fd);
	return check(r == (int)strlen(op), "badblocks %s", op);
}

/* What QEMU does for SIG_IPI: blocked in the thread, open in KVM_RUN. */
static void vcpu_sigmask_open(struct vcpu *v, int sig)
{
	union {
		struct kvm_signal_mask m;
		uint8_t raw[sizeof(struct kvm_signal_mask) + 8];
	} km;
	sigset_t cur;

	pthread_sigmask(SIG_BLOCK, NULL, &cur);
	sigdelset(&cur, sig);
	km.m.len = 8;	/* the kernel's sigset_t */
	memcpy(km.m.sigset, &cur, 8);
	if (ioctl(v->fd, KVM_SET_SIGNAL_MASK, &km) != 0)
		die("KVM_SET_SIGNAL_MASK");
}

static bool sig_take(int sig)
{
	struct timespec zero = { 0, 0 };
	sigset_t set;

	sigemptyset(&set);
	sigaddset(&set, sig);
	return sigtimedwait(&set, NULL, &zero) == sig;
}

static uint64_t efd_take(int efd)
{
	uint64_t n = 0;

	if (read(efd, &n, sizeof(n)) != sizeof(n))
		return 0;
	return n;
}

static void vcpu_set_regs(struct vcpu *v, const struct run_args *ra)
{
	struct kvm_regs regs;

	memset(&regs, 0, sizeof(regs));
	regs.rip = CODE_GPA;
	regs.rflags = 0x2;
	regs.rax = 0x4b564d58;	/* "KVMX" */
	regs.rsi = ra->data;
	regs.rbp = ra->stride;
	regs.rdi = ra->fha;
	regs.rcx = ra->count;
	if (ioctl(v->fd, KVM_SET_REGS, &regs) != 0)
		die("KVM_SET_REGS");
}

/* KVM_RUN from where the vCPU is: 0 at HLT, EINTR, -1 anything else. */
static int vcpu_run_stop(struct vcpu *v)
{
	for (;;) {
		if (ioctl(v->fd, KVM_RUN, 0) != 0) {
			if (errno == EINTR)
				return v->run->exit_reason == KVM_EXIT_INTR ? EINTR : -1;
			if (errno == EAGAIN)
				continue;
			return -1;
		}
		if (v->run->exit_reason == KVM_EXIT_HLT)
			return 0;
		if (v->run->exit_reason != KVM_EXIT_INTR)
			return -1;
	}
}

struct fe_vcpu {
	struct vcpu *v;
	const struct run_args *ra;	/* NULL: go on from where it is */
	int r;
	bool sig;
	struct kvm_regs regs;
};

static void fe_run1(struct fe_vcpu *f)
{
	if (f->ra)
		vcpu_set_regs(f->v, f->ra);
	f->r = vcpu_run_stop(f->v);
	if (ioctl(f->v->fd, KVM_GET_REGS, &f->regs) != 0)
		die("KVM_GET_REGS");
	f->sig = sig_take(SIGUSR1);
}

static void *fe_thread(void *p)
{
	fe_run1(p);
	return NULL;
}

static void sig_noop(int sig)
{
	(void)sig;
}

/* Where the guest loop is right after its store to the flush hint page. */
#define AFTER_FHA_STORE (CODE_GPA + 10)

/*
 * A backing whose writes fail (-E: a null_blk device, its sectors marked
 * bad).  With KVMX_ATTACH_ERROR_NOTIFY a failed flush is never done: the
 * vCPU leaves KVM_RUN with EINTR right after its flush hint write, the
 * eventfd counts, later flushes fail at once, CLEAR_ERROR flushes again.
 * Without it (version 1) the guest goes on, but STATS shows the error.
 */
static void test_flusherr(void)
{
	struct vm *vm;
	struct vcpu *v0, *v1;
	struct kvmx_fha_attach a;
	struct kvmx_fha_stats st;
	struct fe_vcpu f, g;
	struct sigaction sa;
	sigset_t block, old;
	char dev[64], *bounce;
	long long gf0 = counter("failed_flushes"), in0 = counter("inline_flushes");
	volatile uint32_t *page;
	uint64_t t0, fail_us, fast_us, n;
	unsigned long long legacy_failed = 0;
	uint32_t h, h2;
	int kfd, efd;

	if (!err_dir) {
		info("no failing device (-E): not run");
		return;
	}
	err_dev(dev, sizeof(dev));
	pmem_dev = dev;
	vm = vm_new(2, false);
	pmem_dev = NULL;
	v0 = &vm->vcpu[0];
	v1 = &vm->vcpu[1];
	page = (volatile uint32_t *)vm->pmem;

	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = sig_noop;
	sigaction(SIGUSR1, &sa, NULL);
	sigemptyset(&block);
	sigaddset(&block, SIGUSR1);
	pthread_sigmask(SIG_BLOCK, &block, &old);
	while (sig_take(SIGUSR1))
		;
	vcpu_sigmask_open(v0, SIGUSR1);
	vcpu_sigmask_open(v1, SIGUSR1);

	efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
	kfd = kvmx_open();
	a = attach_args(vm->fd, vm->pmem_fd, FHA_GPA);
	a.flags |= KVMX_ATTACH_ERROR_NOTIFY;
	a.error_eventfd = efd;
	a.error_signal = SIGUSR1;
	h = kvmx_attach(kfd, &a);
	if (!check(h != 0, "attach %s with ERROR_NOTIFY, an eventfd and SIGUSR1", dev))
		goto out;
	err_badblocks("-0-32767");
	if (fdatasync(vm->pmem_fd) != 0)
		die("fdatasync %s", dev);
	/*
	 * Read every page into the page cache now: bad sectors fail reads
	 * too, and a guest store to a page not yet read would fault (EFAULT
	 * from KVM_RUN), not flush.
	 */
	{
		volatile uint8_t *p = vm->pmem;
		unsigned long i, sum = 0;

		for (i = 0; i < PMEM_SIZE; i += PAGE)
			sum += p[i];
		(void)sum;
	}

	/* 1. the device works: a flush as always */
	{
		struct run_args ra = { PMEM_GPA, PAGE, FHA_GPA, 1, 0, -1 };

		f = (struct fe_vcpu){ .v = v0, .ra = &ra };
		fe_run1(&f);
	}
	st = kvmx_stats(kfd, h);
	check(f.r == 0 && !f.sig && efd_take(efd) == 0 && st.error == 0 &&
	      st.failed_flushes == 0 && st.host_flushes == 1,
	      "working device: to HLT, no signal, no error (host flushes %llu)",
	      (unsigned long long)st.host_flushes);

	/* 2. writes to it fail from now on */
	page[2 * PAGE / 4] = 0;		/* the guest's next store goes here */
	err_badblocks("+0-8191");
	{
		struct run_args ra = { PMEM_GPA + PAGE, PAGE, FHA_GPA, 3, 0, -1 };

		f = (struct fe_vcpu){ .v = v0, .ra = &ra };
		t0 = now_ns();
		fe_run1(&f);
		fail_us = (now_ns() - t0) / 1000;
	}
	check(f.r == EINTR, "KVM_RUN -> EINTR, exit reason KVM_EXIT_INTR (%s, reason %u)",
	      f.r == EINTR ? "EINTR" : f.r == 0 ? "ran to HLT" : "other", v0->run->exit_reason);
	check(f.regs.rip == AFTER_FHA_STORE && f.regs.rcx == 3,
	      "stopped right after the flush hint store (rip 0x%llx, want 0x%lx; rcx %llu, want 3)",
	      (unsigned long long)f.regs.rip, AFTER_FHA_STORE, (unsigned long long)f.regs.rcx);
	check(page[2 * PAGE / 4] == 0, "the guest's next store did not happen");
	check(f.sig, "SIGUSR1 pending on the vCPU thread");
	n = efd_take(efd);
	check(n == 1, "eventfd +%llu (want 1)", (unsigned long long)n);
	st = kvmx_stats(kfd, h);
	check(st.error == -EIO && st.failed_flushes == 1 && st.host_flush_errors == 1 &&
	      st.host_flushes == 2 && st.guest_flushes == 2,
	      "STATS: error %d (want -EIO), failed %llu, host flush errors %llu, "
	      "host flushes %llu, guest flushes %llu", st.error,
	      (unsigned long long)st.failed_flushes, (unsigned long long)st.host_flush_errors,
	      (unsigned long long)st.host_flushes, (unsigned long long)st.guest_flushes);

	/* 3. while failed: the next flush fails at once, no host flush */
	f = (struct fe_vcpu){ .v = v0, .ra = NULL };
	t0 = now_ns();
	fe_run1(&f);
	fast_us = (now_ns() - t0) / 1000;
	check(f.r == EINTR && f.regs.rip == AFTER_FHA_STORE && f.regs.rcx == 2 && f.sig,
	      "resumed: its next flush hint write stops it again (rcx %llu, signal %d)",
	      (unsigned long long)f.regs.rcx, f.sig);
	check(page[2 * PAGE / 4] == 0x4b564d58, "... after the store that had not happened");
	n = efd_take(efd);
	st = kvmx_stats(kfd, h);
	check(n == 1 && st.failed_flushes == 2 && st.host_flushes == 2 &&
	      st.host_flush_errors == 1 && st.error == -EIO,
	      "no host flush tried: host flushes %llu, failed %llu, eventfd +%llu",
	      (unsigned long long)st.host_flushes, (unsigned long long)st.failed_flushes,
	      (unsigned long long)n);

	/* 4. two vCPUs at once: each is stopped, each thread gets its signal */
	{
		struct run_args rb = { PMEM_GPA + 64 * PAGE, PAGE, FHA_GPA, 2, 0, -1 };
		pthread_t t1, t2;

		f = (struct fe_vcpu){ .v = v0, .ra = NULL };
		g = (struct fe_vcpu){ .v = v1, .ra = &rb };
		pthread_create(&t1, NULL, fe_thread, &f);
		pthread_create(&t2, NULL, fe_thread, &g);
		pthread_join(t1, NULL);
		pthread_join(t2, NULL);
	}
	n = efd_take(efd);
	st = kvmx_stats(kfd, h);
	check(f.r == EINTR && g.r == EINTR && f.regs.rip == AFTER_FHA_STORE &&
	      g.regs.rip == AFTER_FHA_STORE && f.sig && g.sig,
	      "2 vCPUs flushing together: both stopped after their store, both signalled");
	check(n == 2 && st.failed_flushes == 4 && st.host_flushes == 2,
	      "eventfd +%llu, failed %llu, host flushes %llu", (unsigned long long)n,
	      (unsigned long long)st.failed_flushes, (unsigned long long)st.host_flushes);

	/*
	 * 5. the user repairs: device back; one fdatasync whose result does
	 * not count (it reports writeback errors since the module's last
	 * check: background writeback of the pages dirtied while failed may
	 * have failed too); data rewritten and fdatasync'd (this result
	 * counts); CLEAR_ERROR.
	 */
	err_badblocks("-0-8191");
	{
		int r1 = fdatasync(vm->pmem_fd), e1 = r1 ? errno : 0;

		info("first fdatasync after the repair: %s (errors not yet reported)",
		     r1 ? strerrorname_np(e1) : "0");
	}
	bounce = malloc(PMEM_SIZE);
	memcpy(bounce, vm->pmem, PMEM_SIZE);
	check(pwrite(vm->pmem_fd, bounce, PMEM_SIZE, 0) == (ssize_t)PMEM_SIZE,
	      "user space rewrote the data");
	check(fdatasync(vm->pmem_fd) == 0, "... and fdatasync'd it (%s)", strerror(errno));
	{
		/* what the device now holds, past the page cache */
		int dfd = open(dev, O_RDONLY | O_DIRECT | O_CLOEXEC);
		void *buf;
		bool ok = false;

		if (dfd >= 0 && posix_memalign(&buf, PAGE, 3 * PAGE) == 0) {
			ok = pread(dfd, buf, 3 * PAGE, 0) == 3 * PAGE &&
			     ((uint32_t *)buf)[PAGE / 4] == 0x4b564d58 &&
			     ((uint32_t *)buf)[2 * PAGE / 4] == 0x4b564d58;
			free(buf);
		}
		if (dfd >= 0)
			close(dfd);
		check(ok, "the device holds the guest's stores (O_DIRECT read)");
	}
	free(bounce);
	check(ioctl(kfd, KVMX_FHA_CLEAR_ERROR, &h) == 0, "CLEAR_ERROR");
	st = kvmx_stats(kfd, h);
	check(st.error == 0 && st.failed_flushes == 4, "error cleared, failed_flushes kept (%llu)",
	      (unsigned long long)st.failed_flushes);
	{
		struct run_args ra = { PMEM_GPA + 8 * PAGE, PAGE, FHA_GPA, 2, 0, -1 };

		f = (struct fe_vcpu){ .v = v0, .ra = &ra };
		fe_run1(&f);
	}
	n = efd_take(efd);
	st = kvmx_stats(kfd, h);
	check(f.r == 0 && !f.sig && n == 0, "2 flush hint writes run to HLT, no signal");
	check(st.host_flushes == 4 && st.error == 0 && st.failed_flushes == 4 &&
	      st.host_flush_errors == 1, "flushing again: host flushes %llu (want 4), error %d",
	      (unsigned long long)st.host_flushes, st.error);
	{
		struct cs_stat cs = range_cache(vm->pmem_fd, 0, PMEM_SIZE);

		check(cs.nr_dirty == 0 && cs.nr_writeback == 0, "backing clean (%llu dirty)",
		      (unsigned long long)cs.nr_dirty);
	}
	check(kvmx_detach(kfd, h) == 0, "detach");

	/* 6. version-1 user (no ERROR_NOTIFY): the guest goes on, STATS tells */
	a = attach_args(vm->fd, vm->pmem_fd, FHA_GPA);
	h2 = kvmx_attach(kfd, &a);
	check(h2 != 0, "attach without ERROR_NOTIFY");
	err_badblocks("+0-8191");
	{
		struct run_args ra = { PMEM_GPA + 16 * PAGE, PAGE, FHA_GPA, 2, 0, -1 };

		f = (struct fe_vcpu){ .v = v0, .ra = &ra };
		fe_run1(&f);
	}
	st = kvmx_stats(kfd, h2);
	legacy_failed = st.failed_flushes;
	check(f.r == 0 && !f.sig && efd_take(efd) == 0, "the guest ran on to HLT, no signal");
	check(st.error == -EIO && st.failed_flushes >= 1 && st.host_flush_errors >= 1 &&
	      st.host_flushes == 2, "STATS: error %d, failed %llu, host flushes %llu (tried both)",
	      st.error, (unsigned long long)st.failed_flushes,
	      (unsigned long long)st.host_flushes);
	err_badblocks("-0-8191");
	check(kvmx_detach(kfd, h2) == 0, "detach");
	check(counter("failed_flushes") - gf0 == 4 + (long long)legacy_failed,
	      "sysfs failed_flushes +%lld", counter("failed_flushes") - gf0);
	check(counter("inline_flushes") == in0, "no flush ran inside the notifier");
	printf("KVMX-FLUSHERR fail_us=%llu failfast_us=%llu legacy_failed=%llu\n",
	       (unsigned long long)fail_us, (unsigned long long)fast_us, legacy_failed);
out:
	close(kfd);
	close(efd);
	while (sig_take(SIGUSR1))
		;
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	vm_free(vm);
}

/*
 * A device DAX backend (-X /dev/daxR.N,/sys/.../regionR/deep_flush): no
 * page cache, so FDATASYNC of it is refused and the region's deep flush
 * alone makes the guest's stores durable.
 */
static void test_devdax(void)
{
	char dev[256], *comma;
	struct vm *vm;
	struct vcpu *v;
	struct kvmx_fha_attach a;
	struct kvmx_fha_stats st;
	unsigned int k = M < 10 ? M : 10, i, seen = 0;
	uint32_t h;
	int kfd, dfd;

	if (!dax_spec) {
		info("no device DAX (-X): not run");
		return;
	}
	snprintf(dev, sizeof(dev), "%s", dax_spec);
	comma = strchr(dev, ',');
	if (!comma)
		die("-X wants DAXDEV,DEEP_FLUSH");
	*comma = 0;
	pmem_dev = dev;
	vm = vm_new(1, false);
	pmem_dev = NULL;
	v = &vm->vcpu[0];
	kfd = kvmx_open();
	memset(vm->pmem, 0, k * PAGE);

	a = attach_args(vm->fd, vm->pmem_fd, FHA_GPA);
	expect_errno(ioctl(kfd, KVMX_FHA_ATTACH, &a), EOPNOTSUPP, "FDATASYNC of the device DAX");
	a.flags = KVMX_FLUSH_ALL;
	dfd = open(comma + 1, O_WRONLY | O_CLOEXEC);
	if (dfd < 0)
		die("open %s", comma + 1);
	a.deep_flush_fd = dfd;
	expect_errno(ioctl(kfd, KVMX_FHA_ATTACH, &a), EOPNOTSUPP,
		     "FDATASYNC|DEEP of the device DAX");
	a = attach_args(vm->fd, -1, FHA_GPA);
	a.flags = KVMX_FLUSH_DEEP;
	a.deep_flush_fd = dfd;
	h = kvmx_attach(kfd, &a);
	if (!check(h != 0, "DEEP alone on %s, deep flush %s", dev, comma + 1))
		goto out;
	{
		struct run_args ra = { PMEM_GPA, PAGE, FHA_GPA, k, 0, -1 };

		check(vcpu_run_loop(v, &ra) == 0, "%u data + flush hint writes to the device DAX", k);
	}
	for (i = 0; i < k; i++)
		seen += *(volatile uint32_t *)(vm->pmem + i * PAGE) == 0x4b564d58;
	check(seen == k, "the stores are in the device DAX mapping (%u of %u)", seen, k);
	st = kvmx_stats(kfd, h);
	check(st.guest_flushes == k && st.host_flushes == k && st.host_flush_errors == 0 &&
	      st.error == 0 && st.failed_flushes == 0,
	      "%llu guest flushes, %llu deep flushes, no error",
	      (unsigned long long)st.guest_flushes, (unsigned long long)st.host_flushes);
	printf("KVMX-DEVDAX host_flushes=%llu dev=%s\n", (unsigned long long)st.host_flushes, dev);
	check(kvmx_detach(kfd, h) == 0, "detach");
out:
	close(dfd);
	close(kfd);
	vm_free(vm);
}

/* ---- module unload --------------------------------------------------- */

static int mod_delete(void)
{
	return syscall(__NR_delete_module, "kvmx", O_NONBLOCK);
}

static bool mod_load(void)
{
	int fd, r, i;

	if (!ko_path) {
		check(false, "-k PATH to kvmx.ko is needed to reload the module");
		return false;
	}
	fd = open(ko_path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		die("open %s", ko_path);
	r = syscall(__NR_finit_module, fd, "", 0);
	close(fd);
	if (!check(r == 0, "module loaded again (%s)", r ? strerror(errno) : "ok"))
		return false;
	for (i = 0; i < 100 && access(kvmx_dev, F_OK) != 0; i++)
		usleep(20000);	/* devtmpfs makes the node asynchronously */
	return check(access(kvmx_dev, R_OK | W_OK) == 0, "%s is back", kvmx_dev);
}

static void test_rmmod(void)
{
	struct vm *vm = vm_new(1, false);
	int kfd = kvmx_open();
	struct kvmx_fha_attach a = attach_args(vm->fd, vm->pmem_fd, FHA_GPA);
	long long own;
	int r, e;

	own = module_refcnt("kvmx");
	check(own >= 1, "kvmx refcnt %lld while /dev/kvmx is open", own);
	r = mod_delete();
	e = errno;
	check(r == -1 && (e == EWOULDBLOCK || e == EBUSY),
	      "rmmod with /dev/kvmx open refused: %s", r ? strerrorname_np(e) : "it unloaded!");
	check(kvmx_attach(kfd, &a) != 0, "attach");
	r = mod_delete();
	e = errno;
	check(r == -1 && (e == EWOULDBLOCK || e == EBUSY),
	      "rmmod with an attachment refused: %s", r ? strerrorname_np(e) : "it unloaded!");
	close(kfd);
	/* The VM itself stays open: it does not pin kvmx. */
	r = mod_delete();
	check(r == 0, "rmmod after close succeeds (%s)", r ? strerror(errno) : "ok");
	if (r == 0)
		mod_load();
	vm_free(vm);
}

/* A process that attached is SIGKILLed mid-run, in the middle of flushes. */
static void test_sigkill(void)
{
	const char *vendor = module_refcnt("kvm_amd") >= 0 ? "kvm_amd" : "kvm_intel";
	long long vendor0 = module_refcnt(vendor), kvm0 = module_refcnt("kvm");
	long long g0 = counter("guest_flushes");
	int p[2], st, i, r;
	char c;
	pid_t pid;

	if (pipe(p) != 0)
		die("pipe");
	pid = fork();
	if (pid == 0) {
		struct vm *vm;
		int kfd;
		struct kvmx_fha_attach a;

		close(p[0]);
		vm = vm_new(2, false);
		kfd = kvmx_open();
		a = attach_args(vm->fd, vm->pmem_fd, FHA_GPA);
		if (!kvmx_attach(kfd, &a))
			_exit(3);
		a = attach_args(vm->fd, vm->pmem_fd, SCRATCH_GPA);
		if (!kvmx_attach(kfd, &a))
			_exit(3);
		if (write(p[1], "r", 1) != 1)
			_exit(4);
		{
			/* second vCPU in a thread, so the kill finds two in flight */
			struct mv_arg m = { &vm->vcpu[1],
					    { PMEM_GPA + 128 * PAGE, 0, SCRATCH_GPA, 0, 0, -1 }, 0 };
			struct run_args ra = { PMEM_GPA, 0, FHA_GPA, 0, 0, -1 };
			pthread_t t;

			pthread_create(&t, NULL, mv_run, &m);
			/* count 0: 2^32 iterations, i.e. until killed */
			for (;;)
				vcpu_run_loop(&vm->vcpu[0], &ra);
		}
	}
	close(p[1]);
	r = read(p[0], &c, 1);
	check(r == 1, "child attached two pages and runs two vCPUs");
	for (i = 0; i < 3000 && counter("guest_flushes") - g0 < 10; i++)
		usleep(10000);
	check(counter("guest_flushes") - g0 >= 10, "child is flushing (%lld so far)",
	      counter("guest_flushes") - g0);
	kill(pid, SIGKILL);
	waitpid(pid, &st, 0);
	check(WIFSIGNALED(st) && WTERMSIG(st) == SIGKILL, "child died of SIGKILL");
	close(p[0]);
	for (i = 0; i < 8; i++) {	/* its backing files (see backing_create) */
		char path[512];

		snprintf(path, sizeof(path), "%s/kvmx-modtest-%d-%d.img", backing_dir, pid, i);
		unlink(path);
	}
	for (i = 0; i < 500 && counter("attachments") != 0; i++)
		usleep(10000);
	check(counter("attachments") == 0 && counter("tracked") == 0 && counter("vms") == 0,
	      "nothing left: attachments %lld, tracked %lld, vms %lld",
	      counter("attachments"), counter("tracked"), counter("vms"));
	for (i = 0; i < 500 && module_refcnt(vendor) != vendor0; i++)
		usleep(10000);
	check(module_refcnt(vendor) == vendor0 && module_refcnt("kvm") == kvm0,
	      "%s refcnt %lld (was %lld), kvm refcnt %lld (was %lld): the VM is gone", vendor,
	      module_refcnt(vendor), vendor0, module_refcnt("kvm"), kvm0);
	check(module_refcnt("kvmx") == 0, "kvmx refcnt 0");
	r = mod_delete();
	if (check(r == 0, "rmmod kvmx after the kill (%s)", r ? strerror(errno) : "ok"))
		mod_load();
}

/* ---- main ------------------------------------------------------------ */

static const struct {
	const char *name;
	void (*fn)(void);
	bool in_all;
} tests[] = {
	{ "api", test_api, true },
	{ "errors", test_errors, true },
	{ "ram", test_ram, true },
	{ "kernel", test_kernel, true },
	{ "user", test_user, true },
	{ "deep", test_deep, true },
	{ "detach", test_detach, true },
	{ "memslot", test_memslot, true },
	{ "limits", test_limits, true },
	{ "concurrent", test_concurrent, true },
	{ "multivcpu", test_multivcpu, true },
	{ "vmclose", test_vmclose, true },
	{ "stall", test_stall, true },
	{ "flusherr", test_flusherr, true },
	{ "abi", test_abi, true },
	{ "perms", test_perms, true },
	{ "devdax", test_devdax, true },
	{ "rmmod", test_rmmod, false },
	{ "sigkill", test_sigkill, false },
};
#define NTESTS (sizeof(tests) / sizeof(tests[0]))

static void run_test(unsigned int i)
{
	int f0 = n_fail;

	cur_test = tests[i].name;
	printf("KVMX-TEST-BEGIN %s\n", cur_test);
	fflush(stdout);
	tests[i].fn();
	printf("KVMX-TEST-END %s %s\n", cur_test, n_fail == f0 ? "PASS" : "FAIL");
	fflush(stdout);
	if (!strcmp(cur_test, "user") || !strcmp(cur_test, "kernel"))
		print_bench();
}

int main(int argc, char **argv)
{
	unsigned int i;
	int opt, a;

	setvbuf(stdout, NULL, _IOLBF, 0);
	while ((opt = getopt(argc, argv, "m:d:D:k:S:E:X:")) != -1) {
		switch (opt) {
		case 'm':
			M = strtoul(optarg, NULL, 0);
			if (M == 0 || M > 200) {
				fprintf(stderr, "-m: 1..200\n");
				return 2;
			}
			break;
		case 'd':
			backing_dir = optarg;
			break;
		case 'D':
			deep_path = optarg;
			break;
		case 'k':
			ko_path = optarg;
			break;
		case 'S':
			slow_dev = optarg;
			break;
		case 'E':
			err_dir = optarg;
			break;
		case 'X':
			dax_spec = optarg;
			break;
		default:
			fprintf(stderr, "usage: %s [-m N] [-d DIR] [-D PATH] [-k KO] [-S DEV] [-E DIR] [-X DAX,DF] TEST...\n",
				argv[0]);
			return 2;
		}
	}
	if (optind >= argc) {
		fprintf(stderr, "no test named (see the source header)\n");
		return 2;
	}
	for (a = optind; a < argc; a++) {
		bool found = false;

		for (i = 0; i < NTESTS; i++) {
			if (!strcmp(argv[a], "all") ? tests[i].in_all : !strcmp(argv[a], tests[i].name)) {
				run_test(i);
				found = true;
			}
		}
		if (!found) {
			fprintf(stderr, "unknown test %s\n", argv[a]);
			return 2;
		}
	}
	printf("KVMX-MODTEST-RESULT passed=%d failed=%d\n", n_pass, n_fail);
	return n_fail ? 1 : 0;
}
