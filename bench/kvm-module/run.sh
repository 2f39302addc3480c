#!/usr/bin/env bash
# Kernel path (kvmx.ko) vs user path (read-only memslot + fdatasync in user
# space) for flush hint writes, in one nested run: boots the nested test
# guest (TCG, nested SVM), loads kvm/kvm_amd/kvmx.ko and runs
# kvmx-modtest, which times M flushes on each path and counts exits.
# Prints the BENCH lines: exits to user space per flush, VM exits per
# flush, microseconds per flush and the user/kernel ratio, for a backing
# file on ext4 (real fdatasync) and on tmpfs (a flush that costs nothing).
#
# On a host with VT-x/AMD-V and kvmx.ko loaded, kvmx-modtest can run there
# directly: build/tests/kvm-module/kvmx-modtest -m 200 -d DIR kernel user
# (DIR on the filesystem whose fdatasync you want to measure).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
scripts/build >/dev/null
scripts/mkguest --nested >/dev/null
meson test -C build kvm-module --verbose 2>&1 | grep '^BENCH kvm-module'
