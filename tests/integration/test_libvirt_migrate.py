#!/usr/bin/python3
"""virsh migrate --live --postcopy, then virsh migrate-postcopy, of a kvmx
domain (the patched QEMU, a file-backed, flush-hinted NVDIMM) under a real
libvirtd 11.3, on this one host (issue 12, item 3).

libvirt will not migrate a domain to the daemon it runs under: `virsh
migrate ... qemu:///system` fails with "Attempt to migrate guest to the
same host <uuid>", direct, --p2p or --unsafe alike (checked here).  So the
destination is a second libvirtd on this host, scripts/libvirtd-peer: its
own mount namespace, sockets and host UUID (docs/libvirt.md, "Migration").

The domain (examples/libvirt/nvdimm-flush-hint.xml, the guest script of
test_hostd_migrate.py: flushed NVDIMM data, 96 MiB of RAM, a loop that
dirties RAM and reads both back) opts in to kvmx-hostd too:
  - kvmx-hostctl migrate refuses it (libvirt migrates libvirt domains);
  - virsh migrate --live --postcopy --xml (the destination's own NVDIMM
    file and console) to the peer, virsh migrate-postcopy once precopy
    runs: the peer's libvirt reports the domain resumed in post-copy, the
    source's completed job had post-copy requests, the destination QEMU
    has the flush hints, its NVDIMM file holds the flushed data and is
    durable before any guest flush, the guest reads its RAM and NVDIMM
    back intact, and hostd shows the domain "migrated away".
Without a global IPv4 address for the peer's incoming migration the
migration part says SKIPPED.
"""
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'lib'))
import kvmxtest  # noqa: E402
import kvmxvm  # noqa: E402
import pagecache  # noqa: E402
from hostdctl import Hostd, hostd_binary  # noqa: E402
import test_libvirt as tl  # noqa: E402  (its domain helpers)

from test_hostd_migrate import SCRIPT, PMEM_OFF_MB, PMEM_MB  # noqa: E402

check = tl.check
SCRIPTS = tl.SCRIPTS
MIB = 1 << 20


def virsh_at(uri, *args, timeout=180):
    return subprocess.run(['virsh', '-c', uri] + [str(a) for a in args],
                          capture_output=True, text=True, timeout=timeout)



def console_text(path):
    try:
        return open(path, errors='replace').read().replace('\r\n', '\n')
    except OSError:
        return ''


def wait_text(path, regex, timeout, start=0):
    deadline = time.monotonic() + timeout
    rx = re.compile(regex)
    while True:
        m = rx.search(console_text(path), start)
        if m or time.monotonic() > deadline:
            return m
        time.sleep(0.5)


class Events:
    """virsh event --loop on a connection, collected in the background."""

    def __init__(self, uri, name):
        # Not --domain: at the destination the domain does not exist yet.
        self.name = name
        self.proc = subprocess.Popen(
            ['virsh', '-c', uri, 'event', '--all', '--loop', '--timestamp'],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines = []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        for line in self.proc.stdout:
            if f"domain '{self.name}'" in line or 'error' in line:
                self.lines.append(line.rstrip('\n'))

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.thread.join(5)
        return self.lines


def destination_xml(src_xml, work):
    """The migratable XML with the destination's own NVDIMM file and
    console (both QEMUs run on this host)."""
    dom = ET.fromstring(src_xml)
    path = dom.find("devices/memory[@model='nvdimm']/source/path")
    dst_img = os.path.join(work, 'pmem-dst.img')
    with open(dst_img, 'wb') as f:
        f.truncate(os.path.getsize(path.text))
    path.text = dst_img
    console = dom.find("devices/serial[@type='file']/source")
    dst_console = os.path.join(work, 'console-dst.log')
    console.set('path', dst_console)
    out = os.path.join(work, 'dest.xml')
    ET.register_namespace('qemu', tl.QEMU_NS)
    with open(out, 'w') as f:
        f.write(ET.tostring(dom, encoding='unicode'))
    return out, dst_img, dst_console


def run(work, qemu, root_qemu, peer_uri, hostd):
    name = tl.PREFIX + 'migrate'
    script = os.path.join(work, 'guest.sh')
    with open(script, 'w') as f:
        f.write(SCRIPT)
    console = os.path.join(work, 'console.log')
    dom = tl.render(name, work, qemu, script, os.path.join(work, 'ctl.sock'),
                    root_qemu)
    # No control channel: the guest script needs none.
    devices = dom.find('devices')
    for s in devices.findall("serial[@type='unix']"):
        devices.remove(s)
    meta = ET.SubElement(dom, 'metadata')
    ET.SubElement(meta, '{urn:kvmx:hostd:1}hostd', attach='yes')
    src_img = kvmxtest.backing_file(work, 'pmem.img', tl.pmem_size(dom))
    tl.define(dom, work, 'migrate')
    p = tl.virsh('start', name)
    if not check(p.returncode == 0,
                 f'virsh start {name} ({tl.one_line(p.stdout + p.stderr)})'):
        return
    m = wait_text(console, r'PMEM ([0-9a-f]{32})\n', 300)
    pmem = m[1] if m else None
    m = wait_text(console, r'RAM ([0-9a-f]{32})\n', 300)
    ram = m[1] if m else None
    if not check(pmem and ram and wait_text(console, r'CHK 1 ', 300),
                 'the guest wrote its NVDIMM and RAM data and checks them'):
        print(console_text(console)[-2000:])
        return

    if hostd:
        v = hostd.wait_vm(name, tl.attached, 60)
        check(v and tl.attached(v), f'hostd follows the domain ({v and v["state"]})')
        p = subprocess.run([os.path.join(os.path.dirname(hostd_binary()),
                                         'kvmx-hostctl'), '-s', hostd.sock,
                            'migrate', f'vm={name}', 'dest=anywhere',
                            '--postcopy'], capture_output=True, text=True)
        check(p.returncode == 1 and 'migration-unsupported' in p.stderr and
              'virsh migrate' in p.stderr,
              f'kvmx-hostctl migrate refuses a libvirt domain '
              f'({p.stderr.strip()})')

    # One libvirtd: never to itself, however asked.
    for extra in ([], ['--p2p'], ['--unsafe']):
        p = tl.virsh('migrate', '--live', '--postcopy', *extra, name, tl.URI)
        check(p.returncode != 0 and
              'Attempt to migrate guest to the same host' in p.stderr,
              f'virsh migrate {" ".join(extra)} to the same libvirtd fails: '
              f'{tl.one_line(p.stderr)}')

    if not peer_uri:
        print('SKIPPED: the migration to a second libvirtd (no peer)')
        return
    xml = tl.virsh('dumpxml', '--migratable', name).stdout
    dest_xml, dst_img, dst_console = destination_xml(xml, work)
    events = Events(peer_uri, name)
    src_events = Events(tl.URI, name)
    t0 = time.monotonic()
    # Precopy slowed down, so that migrate-postcopy finds it running.
    mig = subprocess.Popen(
        ['virsh', '-c', tl.URI, 'migrate', '--live', '--postcopy',
         '--bandwidth', '16', '--verbose', '--xml', dest_xml, name, peer_uri],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    processed = 0
    while time.monotonic() < deadline and mig.poll() is None:
        info = tl.virsh('domjobinfo', name).stdout
        m = re.search(r'Data processed:\s+([\d.]+) (\w+)', info)
        if m and float(m[1]) > 0:
            processed = m[0]
            break
        time.sleep(0.5)
    time.sleep(2)
    p = tl.virsh('migrate-postcopy', name)
    check(p.returncode == 0 and mig.poll() is None,
          f'virsh migrate-postcopy while precopy runs ({processed}; '
          f'{tl.one_line(p.stdout + p.stderr)})')
    try:
        out, err = mig.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        mig.kill()
        out, err = mig.communicate()
    took = time.monotonic() - t0
    check(mig.returncode == 0,
          f'virsh migrate --live --postcopy to the peer libvirtd completed '
          f'in {took:.1f} s ({tl.one_line(err)})')
    time.sleep(1)
    ev, sev = events.stop(), src_events.stop()
    print('--- events at the destination\n' + '\n'.join(ev))
    print('--- events at the source\n' + '\n'.join(sev))
    check(any('Post-copy' in line for line in ev) and
          any('Post-copy' in line for line in sev),
          'both libvirtds report the domain in post-copy')
    if mig.returncode != 0:
        return
    check(virsh_at(peer_uri, 'domstate', name).stdout.strip() == 'running' and
          tl.domstate(name) == 'shut off',
          'the domain runs at the peer, is shut off here')
    job = tl.virsh('domjobinfo', '--completed', name).stdout
    m = re.search(r'Postcopy requests:\s+(\d+)', job)
    check(m and int(m[1]) > 0,
          f'the destination faulted pages in ({m and m[0]})')
    p = virsh_at(peer_uri, 'qemu-monitor-command', name,
                 '{"execute":"query-nvdimm-flush"}')
    q = json.loads(p.stdout)['return'] if p.returncode == 0 else []
    check(q and q[0]['mode'] == 'trap' and q[0]['guest-flushes'] == 0,
          f'the destination QEMU has the flush hints (qemu:override went '
          f'along), no guest flush yet ({q})')
    if pagecache.available():
        st = pagecache.cachestat(dst_img)
        check(st['dirty'] == 0,
              f'the destination\'s NVDIMM file is durable before any guest '
              f'flush ({st})')
    check(kvmxtest.file_md5(dst_img, PMEM_OFF_MB, PMEM_MB) == pmem,
          'the flushed NVDIMM data is in the destination\'s file')
    n = len(re.findall(r'CHK \d+', console_text(dst_console)))
    m = wait_text(dst_console, r'CHK \d+ ([0-9a-f]{32}) ([0-9a-f]{32})\n', 300,
                  start=len(console_text(dst_console)))
    check(m and m[1] == ram and m[2] == pmem,
          f'the guest reads its RAM and NVDIMM intact at the peer ({n} '
          f'checks there before)')
    if hostd:
        v = hostd.wait_vm(name, lambda v: v['state'] == 'stopped', 15)
        check(v and 'migrated away' in v['last_error'],
              f'hostd: the domain stopped here, migrated away '
              f'({v and v["last_error"]})')
    virsh_at(peer_uri, 'destroy', name)


def main():
    kvmxtest.require_guest_image()
    qemu = kvmxvm.patched_qemu()
    if not tl.hold_libvirtd():
        return 1
    work = kvmxtest.workdir('libvirt-migrate-')
    peer_dir = tempfile.mkdtemp(prefix='kvmx-peer-', dir='/tmp')
    hostd = None
    t_start = time.monotonic()
    try:
        tl.reap_leftovers()
        os.chmod(work, 0o755)
        root_qemu = tl.qemu_as_root(qemu, work)
        peer = subprocess.run([SCRIPTS / 'libvirtd-peer', 'start', peer_dir],
                              capture_output=True, text=True)
        print(peer.stderr.strip())
        peer_uri = peer.stdout.strip() if peer.returncode == 0 else None
        if peer.returncode not in (0, 77):
            check(False, f'scripts/libvirtd-peer start: '
                         f'{tl.one_line(peer.stderr)}')
        if os.access(hostd_binary(), os.X_OK):
            hostd = Hostd(work, peer_dir, ['--libvirt', tl.URI])
            hostd.start()
        run(work, qemu, root_qemu, peer_uri, hostd)
    except (RuntimeError, subprocess.TimeoutExpired, OSError) as e:
        check(False, f'{type(e).__name__}: {e}')
    finally:
        if hostd:
            hostd.kill()
            if check.failures:
                print(f'--- hostd log tail\n{hostd.tail()}')
        subprocess.run([SCRIPTS / 'libvirtd-peer', 'stop', peer_dir],
                       capture_output=True, text=True)
        if check.failures:
            try:
                print('--- peer libvirtd log tail\n' +
                      open(os.path.join(peer_dir, 'libvirtd.log')).read()[-3000:])
            except OSError:
                pass
        subprocess.run(['rm', '-rf', peer_dir])
        tl.release_libvirtd()
    print(f'test_libvirt_migrate: {time.monotonic() - t_start:.1f} s')
    return check.finish(work)


if __name__ == '__main__':
    sys.exit(main())
