"""Post-copy workloads W1-W5 (issue 12) between two QEMUs in two network
namespaces: shared by tests/integration/test_migrate_prefetch.py and
bench/migrate/prefetch.py.

A run boots the Debian test guest on the source, lets the workload prepare
its memory, migrates with an immediate switch to post-copy, tells the
guest (now on the destination) to start, and collects what the workload
and both QEMUs report.
"""
import os
import re
import time

import kvmxtest
import kvmxvm

# name -> (kvmx-memwalk layout, walk, what it is)
WORKLOADS = {
    'W1': ('seq', 'seq', 'sequential scan'),
    'W2': ('scatter', 'seq', 'guest-virtual order, pages scattered in '
           'guest-physical memory'),
    'W3': ('seq', 'stride:4', 'strided scan (every 4th page, 4 passes)'),
    'W4': ('seq', 'random', 'uniform random access'),
}

# W5: records written to a file on the DAX-mounted NVDIMM, each fsynced,
# before and during the migration; all must be there afterwards.
W5_SCRIPT = r'''
. /usr/lib/kvmx/pmem-fsdax.sh
dev=$(pmem_fsdax) && mkfs.ext4 -q -F -b 4096 -E lazy_itable_init=0 "$dev" &&
  mount -t ext4 -o dax "$dev" /mnt || exit 1
grep -q 'dax' /proc/mounts || { echo "W5: no DAX mount"; exit 1; }
i=0
echo W5-READY
while [ ! -e /tmp/stop ]; do
  printf 'record %08d\n' $i >> /mnt/log
  sync /mnt/log || { echo "W5: sync failed at $i"; exit 1; }
  i=$((i+1))
  [ $i -eq 200 ] && echo W5-200
  # Poll without reading (-t 0), then read the whole line: busybox's
  # "read -t 0.05 cmd" drops the bytes it has read when the deadline passes
  # mid-line, and a post-copy fault can stall the guest longer than that.
  if read -t 0; then read cmd; [ "$cmd" = stop ] && break; fi
  sleep 0.05
done
echo "W5-WROTE $i"
n=$(grep -c '^record ' /mnt/log)
last=$(tail -n 1 /mnt/log)
echo "W5-HAVE $n $last"
# As for the memory walks: wait, so that the guest does not power off (and
# its QEMU end) while the host still queries the migration's end state; on
# a slow host post-copy may still be running here.
read ack
'''

NVDIMM_SIZE = 256 << 20


def memwalk_script(workload, mib):
    layout, walk, _ = WORKLOADS[workload]
    # The guest waits for an ack at the end, so that QEMU is still there
    # for the host's queries.
    return (f'/opt/kvmx/kvmx-memwalk --mib {mib} --layout {layout} '
            f'--walk {walk}\necho "MEMWALK-RC $?"\nread ack\n')


def set_caps(vm, caps):
    vm.qmp.cmd('migrate-set-capabilities', capabilities=[
        {'capability': k, 'state': v} for k, v in caps.items()])


def wait_status(vm, want, timeout=300):
    deadline = time.monotonic() + timeout
    while True:
        info = vm.qmp.cmd('query-migrate')
        st = info.get('status')
        if st in want or time.monotonic() > deadline:
            return st, info
        time.sleep(0.1)


def variant_caps(variant):
    caps = {'postcopy-ram': True, 'postcopy-blocktime': True}
    if variant.get('preempt'):
        caps['postcopy-preempt'] = True
    if variant.get('prefetch'):
        caps['postcopy-prefetch'] = True
    return caps


def run(qemu, work, link, workload, variant, mib=256, mem='1G',
        nvdimm=False, port=4444, timeout=900):
    """One migration of one workload; returns a dict of results (raises
    on a hard failure, e.g. QEMU died)."""
    name = f"{workload}-{variant['name']}"
    args = []
    if nvdimm:
        img = kvmxtest.backing_file(work, f'{name}-src.img', NVDIMM_SIZE)
        dimg = kvmxtest.backing_file(work, f'{name}-dst.img', NVDIMM_SIZE)
        dev = 'nvdimm,id=nv0,memdev=mem1,flush-hint=on'
        args = kvmxtest.nvdimm_args(img, NVDIMM_SIZE, device=dev)
        dargs = kvmxtest.nvdimm_args(dimg, NVDIMM_SIZE, device=dev)
    else:
        dargs = []
    script = W5_SCRIPT if workload == 'W5' else memwalk_script(workload, mib)
    res = {'workload': workload, 'variant': variant['name']}
    if variant.get('prefetch'):
        # How long the destination takes to index the page tables.
        dargs = dargs + ['-trace', 'postcopy_prefetch_start']
    caps = variant_caps(variant)
    uri = f'tcp:{link.dst_ip}:{port}'
    with kvmxvm.start_guest(qemu, script, args, work, f'{name}-src', mem=mem,
                            prefix=link.src_exec) as src:
        if workload == 'W5':
            src.wait_console(r'W5-200\n', 600)
        else:
            m = src.wait_console(r'FILLED (\d+)\n', 600)
            res['pages'] = int(m[1])
        with kvmxvm.start_guest(qemu, None, dargs + ['-incoming', 'defer'],
                                work, f'{name}-dst', mem=mem,
                                prefix=link.dst_exec) as dst:
            set_caps(dst, caps)
            if variant.get('prefetch'):
                params = {'postcopy-prefetch-mode': variant['prefetch']}
                if variant.get('window'):
                    params['postcopy-prefetch-window'] = variant['window']
                dst.qmp.cmd('migrate-set-parameters', **params)
            dst.qmp.cmd('migrate-incoming', uri=uri)
            set_caps(src, dict(caps, events=True))
            if variant.get('prefetch'):
                src.qmp.cmd('migrate-set-parameters', **{
                    'postcopy-prefetch-mode': variant['prefetch']})
            t0 = time.monotonic()
            src.qmp.cmd('migrate', uri=uri)
            # Post-copy from the start: the workload's pages are still on
            # the source when the guest goes on here.
            src.qmp.cmd('migrate-start-postcopy')
            st, _ = wait_status(dst, ('postcopy-active', 'completed',
                                      'failed'), 300)
            deadline = time.monotonic() + 300
            while (dst.qmp.cmd('query-status')['status'] != 'running' and
                   time.monotonic() < deadline):
                time.sleep(0.05)
            res['switch_s'] = time.monotonic() - t0
            mark = len(dst.console_text())
            if workload == 'W5':
                time.sleep(2.0)
                dst.send_serial(b'stop\n')
                m = dst.wait_console(r'W5-HAVE (\d+) record (\d+)\n', 600,
                                     start=mark)
                w = dst.wait_console(r'W5-WROTE (\d+)\n', 60, start=mark)
                res['w5_wrote'] = int(w[1])
                res['w5_have'] = int(m[1])
                res['w5_last'] = int(m[2])
            else:
                dst.send_serial(b'go\n')
                m = dst.wait_console(r'WALK-DONE (\d+) (\d+) (\d+)\n',
                                     timeout, start=mark)
                res['walked'], res['bad'] = int(m[1]), int(m[2])
                res['walk_ms'] = int(m[3])
            st, sinfo = wait_status(src, ('completed', 'failed',
                                          'cancelled'), timeout)
            res['status'] = st
            res['error'] = sinfo.get('error-desc', '')
            _, dinfo = wait_status(dst, ('completed', 'failed'), 120)
            ram = sinfo.get('ram', {})
            res['total_ms'] = sinfo.get('total-time', 0)
            res['bytes'] = ram.get('transferred', 0)
            res['requests'] = ram.get('postcopy-requests', 0)
            res['pt_pages_sent'] = sinfo.get('postcopy-page-table-pages', 0)
            res['blocktime_ms'] = dinfo.get('postcopy-blocktime', 0)
            res['vcpu_blocktime_ms'] = dinfo.get('postcopy-vcpu-blocktime',
                                                 [])
            res['prefetch'] = dinfo.get('postcopy-prefetch', {})
            res['dst_running'] = (dst.qmp.cmd('query-status')['status'] ==
                                  'running')
            m = re.search(r'postcopy_prefetch_start (\d+) tables, (\d+) '
                          r'entries indexed in (\d+) us', dst.stderr_text())
            if m:
                res['index_tables'] = int(m[1])
                res['index_us'] = int(m[3])
            if workload != 'W5':
                rc = dst.wait_console(r'MEMWALK-RC (\d+)\r?\n', 120, start=mark)
                res['guest_rc'] = int(rc[1])
    return res


def summary(r):
    p = r.get('prefetch', {})
    s = (f"{r['workload']} {r['variant']}: {r['status']}, "
         f"requests {r['requests']}")
    if 'walked' in r:
        s += f", walk {r['walk_ms']} ms, bad {r['bad']}"
    s += (f", blocktime {r['blocktime_ms']} ms, total {r['total_ms']} ms, "
          f"{r['bytes'] >> 20} MiB")
    if p:
        s += (f", prefetched {p.get('pages-prefetched')} hits {p.get('hits')}"
              f" late {p.get('late-hits')} wasted {p.get('pages-wasted')}"
              f" remote {p.get('remote-faults')} pt-entries "
              f"{p.get('page-table-entries')}")
    return s
