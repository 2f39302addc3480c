#!/usr/bin/python3
"""Virtblock purging against bad input and a hostile environment.

QEMU runs with the qtest accelerator (the test reads guest memory itself,
as in test_purge_crash.py), a 4 MiB file NVDIMM with 64 KiB blocks.

  bad requests   purge-policy/purge-now/unpurge/purge-status with bad
                 values: each refused with invalid-request naming the field
                 (or purge-not-enabled), hostd and purging carry on
  no agent       a backend without purge-agent: purge-not-enabled
  disk full      a .vbd of 4 blocks: purge-now purges 4, the rest fail
                 with disk-full (counted), every block still reads right;
                 a table directory on a 1 MiB tmpfs: the .vbd cannot be
                 made, purge-failed says so, nothing changes
  changed behind hostd's back
                 - the table's superblocks damaged while hostd is down: the
                   NVDIMM is refused with the field named, and attaches
                   again once the table is put back;
                 - the backend's xattr removed: refused (xattr-mismatch);
                 - a purged block's disk copy overwritten: its fault-back
                   fails its checksum, the reader is never answered (no
                   zeros), purge-status says failed, errors.checksum 1;
                 - the disk file cut short: the fault-back fails with an I/O
                   error, same outcome.
  vhost-user     a vhost-user device (QEMU's vhost-user-blk) maps guest
                 memory in its own process, where a purged block would read
                 as zeros: QEMU refuses the device next to a purge-agent
                 backend, and a purge-agent backend next to the device
                 (object-add), each with an error naming the conflict; a
                 backend without an agent is still accepted
  migration      a VM whose NVDIMM is all purged migrates with hostd's
                 migrate: the source faults every block back as it sends
                 it, the destination's backend holds every block's bytes.
"""
import os
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'lib'))
import hostdctl  # noqa: E402
import kvmxtest  # noqa: E402
import kvmxvm  # noqa: E402
from purgeqemu import BLOCK, NBLOCKS, SIZE, Qemu, content  # noqa: E402

check = kvmxtest.Checks()
_n = [0]


def fresh(qemu, work, name):
    """A backend file of known contents, its QEMU, and the file's path."""
    d = os.path.join(work, name)
    os.makedirs(d)
    img = os.path.join(d, 'pmem.img')
    with open(img, 'wb') as f:
        for b in range(NBLOCKS):
            f.write(content(b, 0))
    _n[0] += 1
    return Qemu(qemu, d, img, _n[0]), img


def call(hostd, op, **kw):
    return hostd.call(op, **kw)


def attach_vm(hostd, name, q, **policy_args):
    r = hostd.call('attach', vm=name, qmp=q.hostd_qmp)
    assert 'result' in r, r
    hostd.wait_vm(name, lambda v: v['state'] == 'attached', 60)
    return hostd.call('purge-policy', vm=name, nvdimm='mem1',
                      block_size=BLOCK, **policy_args)


def policy(hostd, vm, **kw):
    """purge-policy, again while hostd is still resuming from its journal."""
    for _ in range(100):
        r = hostd.call('purge-policy', vm=vm, nvdimm='mem1', **kw)
        if r.get('error', {}).get('code') not in ('purge-busy',
                                                  'vm-not-connected'):
            return r
        time.sleep(0.1)
    return r


def all_right(q):
    data = q.read(0, NBLOCKS)
    return all(data[b * BLOCK:(b + 1) * BLOCK] == content(b, 0)
               for b in range(NBLOCKS))


def bad_requests(hostd, qemu, work):
    q, _ = fresh(qemu, work, 'bad')
    r = attach_vm(hostd, 'bad', q)
    check('result' in r, 'purging enabled on the VM for bad requests')
    cases = [
        (dict(op='purge-policy', vm='bad', nvdimm='mem1',
              policy={'min-idle-ms': -1}), 'min-idle-ms'),
        (dict(op='purge-policy', vm='bad', nvdimm='mem1',
              policy={'low-watermark': 2, 'high-watermark': 1}),
         'low-watermark'),
        (dict(op='purge-policy', vm='bad', nvdimm='mem1',
              policy={'rate': 0}), 'rate'),
        (dict(op='purge-policy', vm='bad', nvdimm='mem1',
              policy={'bogus': 1}), 'bogus'),
        (dict(op='purge-policy', vm='bad', nvdimm='mem1',
              policy={'enabled': 'yes'}), 'enabled'),
        (dict(op='purge-policy', vm='bad', nvdimm='mem1',
              policy=[1, 2]), 'policy'),
        (dict(op='purge-policy', vm='bad', nvdimm='mem1',
              block_size=100000), 'block_size'),
        (dict(op='purge-policy', vm='bad', nvdimm='mem1',
              block_size=1 << 40), 'block_size'),
        (dict(op='purge-policy', vm='bad', nvdimm='../x'), 'nvdimm'),
        (dict(op='purge-policy', vm='bad', nvdimm='m' * 65), 'nvdimm'),
        (dict(op='purge-policy', vm='bad', nvdimm='mem1',
              table_dir='rel/dir'), 'table_dir'),
        (dict(op='purge-policy', vm='bad', nvdimm='mem1',
              table_dir='/a,b'), 'table_dir'),
        (dict(op='purge-policy', vm='bad', nvdimm='mem1',
              probe_interval_ms=1), 'probe_interval_ms'),
        (dict(op='purge-now', vm='bad', nvdimm='mem1', first=-1), 'first'),
        (dict(op='purge-now', vm='bad', nvdimm='mem1',
              count='all'), 'count'),
        (dict(op='purge-now', vm='bad', nvdimm='mem1',
              ignore_idle=1), 'ignore_idle'),
        (dict(op='unpurge', vm='bad', nvdimm='mem1',
              ignore_idle=True), 'ignore_idle'),
        (dict(op='purge-status', nvdimm='mem1'), 'nvdimm'),
    ]
    for req, field in cases:
        op = req.pop('op')
        r = hostd.call(op, **req)
        err = r.get('error', {})
        check(err.get('code') == 'invalid-request' and
              field in err.get('message', ''),
              f'{op} {req}: invalid-request naming {field} '
              f'({err.get("message", r)})')
    r = hostd.call('purge-now', vm='bad', nvdimm='mem1', first=NBLOCKS)
    check(r.get('error', {}).get('code') == 'invalid-request',
          f'purge-now past the last block: {r.get("error")}')
    for op in ('purge-now', 'unpurge'):
        r = hostd.call(op, vm='bad', nvdimm='nope')
        check(r.get('error', {}).get('code') == 'purge-not-enabled',
              f'{op} on an NVDIMM without purging: purge-not-enabled')
    r = hostd.call('purge-policy', vm='bad', nvdimm='nope')
    check(r.get('error', {}).get('code') == 'purge-not-enabled',
          f'purge-policy on a backend that does not exist: '
          f'{r.get("error")}')
    r = hostd.call('purge-now', vm='bad', nvdimm='mem1', ignore_idle=True)
    check('result' in r and r['result']['blocks'] == NBLOCKS and
          all_right(q), 'after all that, purging and reading back work')
    q.kill()
    hostd.call('detach', vm='bad')


def plain_qemu(qemu, img, qmp, extra=()):
    """A qtest QEMU with a file NVDIMM without purge-agent, and a QMP
    socket for hostd (ready when it returns)."""
    p = subprocess.Popen(
        [qemu, '-machine', 'q35,nvdimm=on', '-accel', 'qtest', '-qtest',
         'null', '-display', 'none', '-nodefaults', '-m',
         '128M,slots=2,maxmem=1G', '-object',
         f'memory-backend-file,id=mem1,share=on,mem-path={img},size={SIZE}',
         '-device', 'nvdimm,id=nv0,memdev=mem1',
         '-qmp', f'unix:{qmp},server=on,wait=off'] + list(extra),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        if os.path.exists(qmp):
            break
        time.sleep(0.1)
    return p


def no_agent(hostd, qemu, work):
    d = os.path.join(work, 'noagent')
    os.makedirs(d)
    img = kvmxtest.backing_file(d, 'pmem.img', SIZE)
    qmp = os.path.join(d, 'hostd.qmp')
    p = plain_qemu(qemu, img, qmp)
    try:
        hostd.call('attach', vm='noagent', qmp=qmp)
        hostd.wait_vm('noagent', lambda v: v['state'] == 'attached', 60)
        r = hostd.call('purge-policy', vm='noagent', nvdimm='mem1')
        check(r.get('error', {}).get('code') == 'purge-not-enabled' and
              'purge-agent' in r['error']['message'],
              f'a backend without purge-agent: {r.get("error")}')
    finally:
        p.kill()
        p.wait()
        hostd.call('detach', vm='noagent')


def vhost_user(qemu, work):
    vub = kvmxvm.vhost_user_blk()
    if not vub:
        check(False, 'vhost-user: no vhost-user-blk (scripts/build makes it)')
        return
    d = os.path.join(work, 'vhost')
    os.makedirs(d)
    disk = kvmxtest.backing_file(d, 'vub.img', 1 << 20)
    sock = os.path.join(d, 'vub.sock')

    def backend():
        # It serves one connection and exits with it.
        if os.path.exists(sock):
            os.unlink(sock)
        p = subprocess.Popen([vub, '-s', sock, '-b', disk],
                             stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        for _ in range(100):
            if os.path.exists(sock):
                break
            time.sleep(0.1)
        return p

    base = [qemu, '-machine', 'q35,nvdimm=on', '-accel', 'qtest', '-qtest',
            'null', '-display', 'none', '-nodefaults',
            '-m', '128M,slots=2,maxmem=1G',
            '-object', 'memory-backend-memfd,id=ram,size=128M,share=on',
            '-machine', 'memory-backend=ram',
            '-chardev', f'socket,id=vub,path={sock}',
            '-device', 'vhost-user-blk-pci,chardev=vub,id=blk0']
    agent = ['-object', 'memory-backend-memfd,id=nv,size=4M,share=on,'
             f'purge-agent={os.path.join(d, "agent.sock")}',
             '-device', 'nvdimm,id=nv0,memdev=nv']

    # The device after a backend with an agent: QEMU does not start.
    b = backend()
    try:
        r = subprocess.run(base + agent, stdin=subprocess.DEVNULL,
                           capture_output=True, text=True, timeout=60)
    finally:
        b.kill()
        b.wait()
    why = [ln for ln in r.stderr.splitlines()
           if 'vhost-user cannot share guest memory with a memory backend '
              'that has a purge-agent' in ln]
    check(r.returncode != 0 and why,
          f'vhost-user device next to a purge agent refused '
          f'(rc {r.returncode}: {why[:1] or r.stderr.strip()[-300:]})')

    # An agent after the device (object-add): refused; without an agent
    # the same backend is fine.
    b = backend()
    qmp = os.path.join(d, 'qmp.sock')
    q = subprocess.Popen(base + ['-qmp', f'unix:{qmp},server=on,wait=off'],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            if os.path.exists(qmp):
                break
            time.sleep(0.1)
        m = kvmxvm.Qmp(qmp)
        desc = ''
        try:
            m.cmd('object-add', {
                'qom-type': 'memory-backend-memfd', 'id': 'nv',
                'size': 4 << 20, 'share': True,
                'purge-agent': os.path.join(d, 'agent2.sock')})
        except kvmxvm.QmpError as e:
            desc = e.desc
        check('purge-agent cannot be used while a vhost-user device maps '
              'guest memory' in desc,
              f'purge agent next to a vhost-user device refused ({desc})')
        try:
            m.cmd('object-add', {'qom-type': 'memory-backend-memfd',
                                 'id': 'nv3', 'size': 4 << 20, 'share': True})
            ok = True
        except kvmxvm.QmpError as e:
            ok = e.desc
        check(ok is True, f'the same backend without an agent: {ok}')
        m.close()
    finally:
        q.kill()
        q.wait()
        b.kill()
        b.wait()


def disk_full(hostd, qemu, work):
    q, img = fresh(qemu, work, 'full')
    r = attach_vm(hostd, 'full', q, disk_bytes=4 * BLOCK)
    check('result' in r, f'purging with room for 4 blocks ({r.get("error")})')
    r = hostd.call('purge-now', vm='full', nvdimm='mem1', ignore_idle=True)
    res = r.get('result', {})
    check(res.get('blocks') == 4 and res.get('failed', 0) > 0 and
          'slots' in res.get('error', ''),
          f'purge-now on a full disk: 4 purged, the rest refused ({res})')
    st = hostd.call('purge-status', vm='full', nvdimm='mem1')['result'][
        'nvdimms'][0]
    check(st['errors']['disk-full'] > 0 and st['purged'] == 4 and
          st['state'] == 'running',
          f"disk-full counted ({st['errors']}), 4 purged, still running")
    check(all_right(q), 'every block reads right')
    # Slots are free once the fault-backs are committed (every 2 s).
    for _ in range(20):
        r = hostd.call('purge-now', vm='full', nvdimm='mem1',
                       ignore_idle=True)
        if 'result' in r:
            break
        time.sleep(0.5)
    check('result' in r and r['result']['blocks'] == 4,
          f'the 4 slots are reused after the fault-backs ({r})')
    q.kill()
    hostd.call('detach', vm='full')

    # The table's directory on a 1 MiB file system: no room for the .vbd.
    small = os.path.join(work, 'small')
    os.makedirs(small)
    if subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=1m', 'tmpfs',
                       small], capture_output=True).returncode != 0:
        print('skip: cannot mount a tmpfs (not root?)')
        return
    try:
        q, img = fresh(qemu, work, 'tiny')
        r = attach_vm(hostd, 'tiny', q, table_dir=small)
        err = r.get('error', {})
        check(err.get('code') == 'purge-failed' and
              ('space' in err.get('message', '') or
               'ENOSPC' in err.get('message', '')),
              f'a table on a full file system: {err}')
        check(all_right(q), 'the VM runs on, its NVDIMM intact')
        q.kill()
        hostd.call('detach', vm='tiny')
    finally:
        subprocess.run(['umount', small])


def changed_behind(hostd, qemu, work):
    q, img = fresh(qemu, work, 'changed')
    r = attach_vm(hostd, 'changed', q)
    check('result' in r, 'purging enabled')
    r = hostd.call('purge-now', vm='changed', nvdimm='mem1', first=0,
                   count=16, ignore_idle=True)
    check(r.get('result', {}).get('blocks') == 16, 'blocks 0-15 purged')
    vbt = img + '.vbt'

    # The table damaged while hostd is down.
    hostd.kill()
    with open(vbt, 'r+b') as f:
        good = f.read(8192)
        f.seek(0)
        f.write(b'\0' * 8)
        f.seek(4096)
        f.write(b'\0' * 8)
    hostd.start()
    r = policy(hostd, 'changed', block_size=BLOCK)
    err = r.get('error', {})
    check(err.get('code') == 'purge-failed' and
          'magic' in err.get('message', ''),
          f'the damaged table is refused, naming what: {err}')
    r = hostd.call('purge-status', vm='changed')
    check(r.get('result', {}).get('nvdimms') == [],
          'hostd does not resume purging on a damaged table')
    with open(vbt, 'r+b') as f:
        f.write(good)
    r = policy(hostd, 'changed', block_size=BLOCK)
    check('result' in r and r['result']['purged'] == 16,
          f'with the table put back, purging resumes ({r.get("error")})')

    # The backend's tie to its table removed.
    hostd.kill()
    try:
        os.removexattr(img, 'user.kvmx.virtblock')
        removed = True
    except OSError as e:
        print(f'skip xattr case: {e}')
        removed = False
    hostd.start()
    if removed:
        r = policy(hostd, 'changed', block_size=BLOCK)
        err = r.get('error', {})
        check(err.get('code') == 'purge-failed' and
              'user.kvmx.virtblock' in err.get('message', ''),
              f'a backend without its xattr is refused: {err}')
    q.kill()
    hostd.call('detach', vm='changed')


def lost_block(hostd, qemu, work, how):
    """A purged block whose disk copy was changed (`overwrite`) or cut
    (`truncate`): never handed out."""
    q, img = fresh(qemu, work, f'lost-{how}')
    r = attach_vm(hostd, f'lost-{how}', q)
    r = hostd.call('purge-now', vm=f'lost-{how}', nvdimm='mem1',
                   ignore_idle=True)
    check(r.get('result', {}).get('blocks') == NBLOCKS, 'all purged')
    vbd = img + '.vbd'
    if how == 'overwrite':
        with open(vbd, 'r+b') as f:  # every slot: whichever holds block 5
            size = os.fstat(f.fileno()).st_size
            for off in range(4096 + 100, size, BLOCK):
                f.seek(off)
                f.write(b'X' * 16)
    else:
        os.truncate(vbd, 4096)
    got = {}

    def reader():
        try:
            got['data'] = q.read(5)
        except (EOFError, OSError, RuntimeError) as e:
            got['error'] = str(e)

    t = threading.Thread(target=reader)
    t.start()
    t.join(5)
    check(t.is_alive() and 'data' not in got,
          f'{how}: the read of the block is never answered (no zeros)')
    st = hostd.call('purge-status', vm=f'lost-{how}', nvdimm='mem1')[
        'result']['nvdimms'][0]
    key = 'checksum' if how == 'overwrite' else 'io'
    check(st['state'] == 'failed' and st['errors'][key] == 1 and
          st['lost'] == 1 and 'block 5' in (st['error'] or ''),
          f"{how}: purge-status failed, errors.{key} 1, block 5 named "
          f"({st['state']}, {st['errors']}, {st['error']})")
    q.kill()
    t.join(10)
    hostd.call('detach', vm=f'lost-{how}')


def migrate_purged(hostd, qemu, work):
    """A VM whose NVDIMM is all purged migrates (hostd's migrate): the
    source reads every block, which faults it back; the destination's
    backend ends up with every block's bytes."""
    q, img = fresh(qemu, work, 'msrc')
    r = attach_vm(hostd, 'msrc', q)
    r = hostd.call('purge-now', vm='msrc', nvdimm='mem1', ignore_idle=True)
    check(r.get('result', {}).get('blocks') == NBLOCKS, 'source all purged')
    d = os.path.join(work, 'mdst')
    os.makedirs(d)
    dimg = kvmxtest.backing_file(d, 'pmem.img', SIZE)
    dqmp = os.path.join(d, 'hostd.qmp')
    p = plain_qemu(qemu, dimg, dqmp, ['-incoming', 'defer'])
    try:
        hostd.call('attach', vm='mdst', qmp=dqmp)
        hostd.wait_vm('mdst', lambda v: v['state'] == 'attached', 60)
        r = hostd.call('migrate', vm='msrc', dest='mdst', wait=False)
        # The first line back is the job's first progress event.
        check('result' in r or r.get('event') == 'migration',
              f'migrate of a purged VM starts ({str(r)[:200]})')
        state = None
        for _ in range(600):
            st = hostd.call('migrate-status', vm='msrc').get('result', {})
            state = st.get('state')
            if state in ('completed', 'failed', 'cancelled', 'paused'):
                break
            time.sleep(0.1)
        check(state == 'completed', f'the migration completed ({state})')
        with open(dimg, 'rb') as f:
            data = f.read()
        check(all(data[b * BLOCK:(b + 1) * BLOCK] == content(b, 0)
                  for b in range(NBLOCKS)),
              'the destination NVDIMM holds every purged block\'s bytes')
        s = hostd.call('purge-status', vm='msrc', nvdimm='mem1')[
            'result']['nvdimms'][0]
        check(s['fault-backs'] == NBLOCKS,
              f"the source faulted each block back once ({s['fault-backs']})")
    finally:
        p.kill()
        p.wait()
        q.kill()
        hostd.call('detach', vm='mdst')
        hostd.call('detach', vm='msrc')


def main():
    qemu = kvmxvm.patched_qemu()
    work = kvmxtest.workdir('purge-faults-')
    hostd = hostdctl.Hostd(work)
    hostd.start()
    try:
        bad_requests(hostd, qemu, work)
        no_agent(hostd, qemu, work)
        vhost_user(qemu, work)
        disk_full(hostd, qemu, work)
        changed_behind(hostd, qemu, work)
        lost_block(hostd, qemu, work, 'overwrite')
        lost_block(hostd, qemu, work, 'truncate')
        migrate_purged(hostd, qemu, work)
    finally:
        hostd.stop()
    return check.finish(work)


if __name__ == '__main__':
    sys.exit(main())
