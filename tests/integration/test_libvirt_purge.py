#!/usr/bin/python3
"""Virtblock purging of a libvirt domain: examples/libvirt/nvdimm-purge.xml
(docs/libvirt.md, "Virtblock purging") under a real libvirtd.

libvirt cannot add purge-agent to the NVDIMM's backend, so the example
gives the NVDIMM in <qemu:commandline>, and opts in to kvmx-hostd in its
<metadata>.  The test fills the NVDIMM's backend file with a known pattern
(a 64 KiB block each), runs hostd following libvirt (--libvirt), starts
the domain paused as the docs say, waits for hostd to attach it through
libvirt (no QMP socket of hostd's own: QEMU is reached through libvirt's
monitor), enables purging with 64 KiB blocks and purges every block:
the backend's allocation drops to nothing.  It then reads words of
scattered blocks through QEMU (HMP xp, through libvirt's monitor: QEMU's
main thread faults on the placeholders and waits for hostd): every word
is the pattern's, one fault-back per block read, the rest stays purged.
virsh destroy: hostd sees the agent go (state disconnected), and the
domain is gone.  SKIPPED where libvirtd cannot run (scripts/libvirtd-up
exits 77)."""
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'lib'))
sys.path.insert(0, os.path.dirname(__file__))
import hostdctl  # noqa: E402
import kvmxtest  # noqa: E402
import kvmxvm  # noqa: E402
import test_libvirt as tl  # noqa: E402

check = tl.check
EXAMPLE = tl.REPO / 'examples' / 'libvirt' / 'nvdimm-purge.xml'
MIB = 1 << 20
BLOCK = 64 << 10
SIZE = 32 * MIB            # as in the example
READ = [3, 17, 9, 30, 200, 123, 511]   # no two in a row: no read-ahead


def word(b, i):
    """The 8-byte word i of block b, as the backend was filled."""
    return (b << 32) | (i * 2654435761 & 0xffffffff)


def fill(path):
    import struct
    with open(path, 'wb') as f:
        for b in range(SIZE // BLOCK):
            f.write(b''.join(struct.pack('<Q', word(b, i))
                             for i in range(BLOCK // 8)))
        os.fsync(f.fileno())


def allocated(path):
    return os.stat(path).st_blocks * 512


def nvdimm_addr(name):
    p = tl.virsh('qemu-monitor-command', name,
                 json.dumps({'execute': 'query-memory-devices'}))
    if p.returncode != 0:
        raise RuntimeError(f'query-memory-devices: {tl.one_line(p.stderr)}')
    for d in json.loads(p.stdout)['return']:
        if d.get('type') == 'nvdimm' and d['data'].get('id') == 'nv0':
            return d['data']['addr']
    raise RuntimeError('no nvdimm nv0 in query-memory-devices')


def xp(name, addr):
    """Two 8-byte words at guest-physical `addr`, read by QEMU (HMP xp)."""
    out = tl.monitor(name, hmp=f'xp /2gx {addr:#x}')
    vals = [int(v, 16) for v in out.split(':', 1)[1].split()] if ':' in out \
        else []
    return vals


def run(work, qemu, root_qemu, hostd):
    name = tl.PREFIX + 'purge'
    img = os.path.join(work, 'pmem.img')
    fill(img)
    if not root_qemu:
        import pwd
        pw = pwd.getpwnam(tl.QEMU_USER)
        os.chown(work, pw.pw_uid, pw.pw_gid)
        os.chown(img, pw.pw_uid, pw.pw_gid)
    dom = tl.render(name, work, qemu, None, None, root_qemu, example=EXAMPLE)
    tl.define(dom, work, 'purge')
    p = tl.virsh('start', '--paused', name)
    if not check(p.returncode == 0, f'virsh start --paused {name} '
                 f'({tl.one_line(p.stdout + p.stderr)})'):
        return
    pids = tl.qemu_pids(name)
    print(f'QEMU runs as {tl.proc_user(pids[0]) if pids else "?"}')
    v = hostd.wait_vm(name, lambda v: v['state'] == 'attached', 60)
    check(v and v['state'] == 'attached' and v['source'] == 'libvirt' and
          v['qmp'] is None,
          f'hostd follows the domain through libvirt ({v})')
    r = hostd.call('purge-policy', vm=name, nvdimm='nv0mem',
                   block_size=BLOCK)
    if not check('result' in r, f'purging enabled on the domain\'s NVDIMM '
                                f'({r.get("error")})'):
        return
    before = allocated(img)
    r = hostd.call('purge-now', vm=name, nvdimm='nv0mem', ignore_idle=True)
    res = r.get('result', {})
    check(res.get('blocks') == SIZE // BLOCK,
          f'purge-now purged every block ({res or r.get("error")})')
    after = allocated(img)
    check(after == 0, f'backend allocation {before // MIB} MiB -> '
                      f'{after} B')
    base = nvdimm_addr(name)
    wrong = []
    for b in READ:
        got = xp(name, base + b * BLOCK + 8 * 100)
        want = [word(b, 100), word(b, 101)]
        if got != want:
            wrong.append((b, got, want))
    check(not wrong, f'QEMU reads {len(READ)} purged blocks through libvirt\'s '
                     f'monitor with the right words ({wrong[:2]})')
    s = hostd.call('purge-status', vm=name, nvdimm='nv0mem')['result'][
        'nvdimms'][0]
    check(s['fault-backs'] == len(READ) and
          s['purged'] == SIZE // BLOCK - len(READ),
          f'one fault-back per block read ({s["fault-backs"]}), the other '
          f'{s["purged"]} blocks stay purged')
    check(s['state'] == 'running' and not any(s['errors'].values()),
          f'purging state {s["state"]}, errors {s["errors"]}')
    p = tl.virsh('destroy', name)
    check(p.returncode == 0, f'virsh destroy ({tl.one_line(p.stderr)})')
    check(tl.gone(pids), 'QEMU gone after virsh destroy')
    state = None
    for _ in range(300):
        state = hostd.call('purge-status', vm=name, nvdimm='nv0mem')[
            'result']['nvdimms'][0]['state']
        if state == 'disconnected':
            break
        time.sleep(0.1)
    check(state == 'disconnected',
          f'hostd sees the agent go: purging {state}')


def main():
    kvmxtest.require_guest_image()
    qemu = kvmxvm.patched_qemu()
    if not tl.hold_libvirtd():
        return 1
    work = kvmxtest.workdir('libvirt-purge-')
    hostd = hostdctl.Hostd(work, extra_args=['--libvirt', tl.URI])
    try:
        tl.reap_leftovers()
        os.chmod(work, 0o755)
        root_qemu = tl.qemu_as_root(qemu, work)
        hostd.start()
        run(work, qemu, root_qemu, hostd)
    except (RuntimeError, subprocess.TimeoutExpired, OSError, KeyError) as e:
        check(False, f'{type(e).__name__}: {e}')
    finally:
        hostd.stop()
        tl.release_libvirtd()
    return check.finish(work)


if __name__ == '__main__':
    sys.exit(main())
