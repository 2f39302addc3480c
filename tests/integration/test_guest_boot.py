#!/usr/bin/python3
"""Boot the kvmx test guest under TCG with one NVDIMM and check that
/dev/pmem0 works and that what the guest writes lands in the host file.

QEMU: $KVMX_QEMU, else /usr/bin/qemu-system-x86_64 (stock).
Exit codes: 0 pass, 1 fail, 77 skip (no guest image / no QEMU).
Work files (console log, stderr, backing file) are kept on failure.
"""
import hashlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))
import kvmxvm  # noqa: E402

NV_SIZE = 256 << 20
MIB = 1 << 20

GUEST_SCRIPT = r"""
nd=/sys/bus/nd/devices
echo "guest kernel $(uname -r)"
if [ ! -b /dev/pmem0 ]; then
    echo "FAIL: no /dev/pmem0"; ls /dev $nd; exit 10
fi
echo "PMEM0-PRESENT"
if [ ! -e $nd/region0/deep_flush ]; then
    echo "FAIL: no $nd/region0/deep_flush"; ls $nd/region0; exit 11
fi
dd if=/dev/urandom of=/dev/pmem0 bs=1M count=1 oflag=direct conv=fsync || exit 12
sum=$(dd if=/dev/pmem0 bs=1M count=1 iflag=direct 2>/dev/null | md5sum) || exit 13
echo "PMEM0-MD5 ${sum%% *}"
echo "DEEP-FLUSH $(cat $nd/region0/deep_flush)"
"""


def main():
    qemu = kvmxvm.default_qemu()
    if not (os.path.isfile(qemu) and os.access(qemu, os.X_OK)):
        kvmxvm.skip(f"QEMU binary not found: {qemu}")
    try:
        kvmxvm.guest_image()
    except kvmxvm.GuestImageMissing as e:
        kvmxvm.skip(str(e))

    workdir = Path(tempfile.mkdtemp(prefix="kvmx-guest-boot-",
                                    dir=os.environ.get("KVMX_TEST_TMPDIR")))
    backing = workdir / "nv0.img"
    with open(backing, "wb") as f:
        f.truncate(NV_SIZE)
    extra = [
        "-machine", "nvdimm=on",
        "-m", "1G,slots=2,maxmem=4G",
        "-object", f"memory-backend-file,id=mem1,share=on,mem-path={backing},"
                   f"size={NV_SIZE}",
        "-device", "nvdimm,id=nv0,memdev=mem1",
    ]
    print(f"qemu: {qemu}\nworkdir: {workdir}", flush=True)

    failures = []
    t0 = time.monotonic()
    try:
        with kvmxvm.start_guest(qemu, GUEST_SCRIPT, extra, workdir, "boot") as vm:
            vm.wait_console(r"kvmx-init: running", 240)
            t_init = time.monotonic()
            rc = kvmxvm.wait_guest_exit(vm, 300)
            t_end = time.monotonic()
            console = vm.console_text()
    except (TimeoutError, RuntimeError) as e:
        print(f"FAIL: guest did not complete: {e}")
        print(f"(work files kept in {workdir})")
        return 1
    print(f"timing: boot to /init script {t_init - t0:.1f}s, "
          f"script {t_end - t_init:.1f}s, total {t_end - t0:.1f}s")

    print("---- guest console (script part) ----")
    print(console[console.find("kvmx-init:"):].rstrip())
    print("-------------------------------------")

    if rc != 0:
        failures.append(f"guest script exit code {rc}, expected 0")
    if "PMEM0-PRESENT" not in console:
        failures.append("/dev/pmem0 did not appear in the guest")
    guest_md5 = None
    for line in console.splitlines():
        if line.startswith("PMEM0-MD5 "):
            guest_md5 = line.split()[1]
    with open(backing, "rb") as f:
        host_data = f.read(MIB)
    host_md5 = hashlib.md5(host_data).hexdigest()
    if guest_md5 is None:
        failures.append("guest did not report the md5 of /dev/pmem0")
    elif guest_md5 != host_md5:
        failures.append(f"backing file's first MiB md5 {host_md5} != guest's {guest_md5}")
    if host_data == bytes(MIB):
        failures.append("backing file's first MiB is all zeros (write not seen)")

    if failures:
        for f in failures:
            print(f"FAIL: {f}")
        print(f"(work files kept in {workdir})")
        return 1
    print(f"PASS: guest wrote 1 MiB to /dev/pmem0, host file md5 {host_md5} matches")
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
