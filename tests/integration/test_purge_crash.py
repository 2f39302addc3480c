#!/usr/bin/python3
"""Virtblock purging survives SIGKILL of hostd or QEMU at random points.

A 4 MiB file-backed NVDIMM with 64 KiB blocks (64 blocks) in a QEMU run by
the qtest accelerator, so that the test itself reads and writes guest
physical memory (b64read/b64write) through QEMU's own accesses, as a vCPU
or device would.  Each round, while hostd purges blocks (purge-now) the
test writes new contents into random blocks (which faults purged ones
back), and either hostd or QEMU is killed at a random instant.  Both come
back (a new QEMU on the same file, a new hostd on the same table), and
every block must read exactly what was last written: 0 blocks lost or
wrong.  Rounds: $KVMX_PURGE_CRASH_ROUNDS (default 200).
"""
import json
import os
import random
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'lib'))
import hostdctl  # noqa: E402
import kvmxtest  # noqa: E402
import kvmxvm  # noqa: E402
from purgeqemu import BLOCK, NBLOCKS, Qemu, content  # noqa: E402

check = kvmxtest.Checks()


def attach(hostd, q):
    r = hostd.call('attach', vm='v', qmp=q.hostd_qmp)
    if 'error' in r and r['error']['code'] != 'vm-exists':
        raise RuntimeError(f'attach: {r}')
    hostd.wait_vm('v', lambda v: v['state'] == 'attached', 60)
    for _ in range(100):
        r = hostd.call('purge-policy', vm='v', nvdimm='mem1',
                       block_size=BLOCK, policy={'enabled': False})
        if 'result' in r:
            return r['result']
        if r['error']['code'] not in ('purge-busy', 'vm-not-connected'):
            raise RuntimeError(f'purge-policy: {r}')
        time.sleep(0.1)
    raise RuntimeError('purge-policy stayed busy')


def main():
    qemu = kvmxvm.patched_qemu()
    rounds = int(os.environ.get('KVMX_PURGE_CRASH_ROUNDS', '200'))
    seed = int(os.environ.get('KVMX_PURGE_CRASH_SEED', str(time.time_ns())))
    rng = random.Random(seed)
    print(f'seed {seed}, {rounds} rounds')
    work = kvmxtest.workdir('purge-crash-')
    img = os.path.join(work, 'pmem.img')
    version = [0] * NBLOCKS
    with open(img, 'wb') as f:
        for b in range(NBLOCKS):
            f.write(content(b, 0))
    hostd = hostdctl.Hostd(work)
    hostd.start()
    q = Qemu(qemu, work, img, 0)
    attach(hostd, q)
    kills = {'hostd': 0, 'qemu': 0}
    wrong_total = 0
    purged_seen = 0
    for rnd in range(rounds):
        # Purge a random run of blocks while writing others, then kill.
        first = rng.randrange(NBLOCKS)
        count = rng.randrange(1, NBLOCKS - first + 1)
        res = {}

        def purge():
            try:
                res['r'] = hostd.call('purge-now', vm='v', nvdimm='mem1',
                                      first=first, count=count,
                                      ignore_idle=True)
            except OSError as e:
                res['r'] = {'error': str(e)}

        stop = threading.Event()
        inflight = []          # the write not acknowledged yet, if any

        def writer():
            try:
                while not stop.is_set():
                    b = rng_w.randrange(NBLOCKS)
                    inflight[:] = [(b, version[b] + 1)]
                    q.write(b, content(b, version[b] + 1))
                    version[b] += 1
                    inflight.clear()
            except (EOFError, OSError, RuntimeError):
                pass

        rng_w = random.Random(rng.random())
        t = threading.Thread(target=purge)
        w = threading.Thread(target=writer)
        t.start()
        w.start()
        victim = rng.choice(('hostd', 'qemu'))
        time.sleep(rng.uniform(0, 0.4))
        kills[victim] += 1
        if victim == 'hostd':
            hostd.kill()
            hostd.start()
            attach(hostd, q)   # a write waiting for a fault-back goes on
            stop.set()
            w.join(120)
            t.join(60)
        else:
            q.kill()
            stop.set()
            w.join(60)
            t.join(60)
            q = Qemu(qemu, work, img, rnd + 1)
            attach(hostd, q)
        if 'result' in res.get('r', {}):
            purged_seen += res['r']['result']['blocks']
        # Every block reads what was last written; a write QEMU was doing
        # when it was killed may be there in part (16-byte units of either).
        data = q.read(0, NBLOCKS)
        wrong = []
        for b in range(NBLOCKS):
            got = data[b * BLOCK:(b + 1) * BLOCK]
            if got == content(b, version[b]):
                continue
            if inflight and inflight[0][0] == b:
                new_c, old_c = content(b, inflight[0][1]), content(b, version[b])
                if all(got[i:i + 16] in (new_c[i:i + 16], old_c[i:i + 16])
                       for i in range(0, BLOCK, 16)):
                    version[b] = inflight[0][1]
                    q.write(b, content(b, version[b]))
                    continue
            wrong.append((b, got[:16]))
        if wrong:
            print(f'round {rnd}: {len(wrong)} wrong blocks: {wrong[:4]}')
        wrong_total += len(wrong)
        s = hostd.call('purge-status', vm='v', nvdimm='mem1')
        st = s['result']['nvdimms'][0] if 'result' in s else {}
        if st.get('state') != 'running' or st.get('lost'):
            print(f'round {rnd}: status {json.dumps(st)[:300]}')
            wrong_total += 1
    print(f'kills {kills}; blocks purged by completed requests '
          f'{purged_seen}')
    check(wrong_total == 0,
          f'{rounds} rounds, {kills["hostd"]} hostd and {kills["qemu"]} QEMU '
          f'kills: 0 blocks lost or wrong ({wrong_total})')
    check(purged_seen > rounds, f'purging ran ({purged_seen} blocks)')
    # The NVDIMM still works: purge all, read all back.
    r = hostd.call('purge-now', vm='v', nvdimm='mem1', ignore_idle=True)
    check('result' in r and r['result']['blocks'] > 0,
          f'a last purge-now: {r.get("result", r)}')
    data = q.read(0, NBLOCKS)
    check(all(data[b * BLOCK:(b + 1) * BLOCK] == content(b, version[b])
              for b in range(NBLOCKS)), 'everything reads back afterwards')
    q.kill()
    hostd.stop()
    return check.finish(work)


if __name__ == '__main__':
    sys.exit(main())
