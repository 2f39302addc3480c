#!/usr/bin/python3
"""virsh migrate --live of a kvmx domain with disk-backed page dedup
(issue 13, item 4), from the system libvirtd to scripts/libvirtd-peer on
this host, the disk on storage both see (one raw image file).

libvirt knows nothing of kvmx-disk-dedup: the domain XML passes it through
(docs/libvirt.md, "Disk dedup"):
  - <qemu:commandline> -object kvmx-disk-dedup,id=dd0 and, because libvirt
    sets only the migration capabilities it knows (disk-dedup is not one
    of them), -global migration.x-disk-dedup=on: the capability is on in
    both QEMUs from their start, before the destination reads the stream
    (return-path, which dedup wants, libvirt turns on itself for every
    migration that is not --tunnelled);
  - <qemu:override> disk-dedup=dd0 on the virtio-blk device libvirt builds
    for the disk (alias ua-disk0).
The guest reads DATA_MIB of files into its page cache, then prints the
md5 of their md5s every 2 s.  Checks: before the migration the source's
query-kvmx-disk-dedup lists the disk and its records, and query-migrate-
capabilities has disk-dedup on; `-set device.ua-disk0.
disk-dedup=dd0` (the other passthrough one might try) is refused by QEMU,
with its error; virsh migrate --live completes; the destination's
query-migrate has references resolved (most of the cached data), no
mismatch or read error; the guest's sum on the destination is the host's.
Prints how long the migration took.  SKIPPED without a peer or QEMU dedup.
"""
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'lib'))
sys.path.insert(0, os.path.dirname(__file__))
import kvmxtest  # noqa: E402
import kvmxvm  # noqa: E402
import test_libvirt as tl  # noqa: E402
import test_disk_dedup as tdd  # noqa: E402
from test_libvirt_migrate import virsh_at, console_text, wait_text  # noqa: E402

check = tl.check
SCRIPTS = tl.SCRIPTS
MIB = 1 << 20
PAGE = 4096
tdd.DATA_MIB = DATA_MIB = 64
tdd.IMAGE_MIB = DATA_MIB + DATA_MIB // 4 + tdd.PAT_MIB + 32
MEM_MIB = 512

GUEST_SCRIPT = r'''
mount -o noatime /dev/vda /mnt || { echo "MOUNT-FAILED"; exit 1; }
cat /mnt/d/* > /dev/null
echo READY
while :; do
  echo "SUM $(cd /mnt/d && md5sum * | md5sum | cut -c1-32)"
  sleep 2
done
'''

DOMAIN = '''<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>{name}</name>
  <memory unit='MiB'>{mem}</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>console=ttyS0 panic=-1 quiet kvmx.modules=virtio_blk,ext4</cmdline>
  </os>
  <sysinfo type='fwcfg'>
    <entry name='opt/kvmx/script' file='{script}'/>
  </sysinfo>
  <features><acpi/></features>
  <cpu mode='maximum'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>{qemu}</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw' cache='none' io='threads'/>
      <source file='{img}'/>
      <target dev='vda' bus='virtio'/>
      <alias name='ua-disk0'/>
    </disk>
    <serial type='file'>
      <source path='{console}'/>
      <target port='0'/>
    </serial>
    <memballoon model='none'/>
  </devices>
  <qemu:commandline>
    <qemu:arg value='-object'/>
    <qemu:arg value='kvmx-disk-dedup,id=dd0,max-memory=16M'/>
    <qemu:arg value='-global'/>
    <qemu:arg value='migration.x-disk-dedup=on'/>
  </qemu:commandline>
  <qemu:override>
    <qemu:device alias='ua-disk0'>
      <qemu:frontend>
        <qemu:property name='disk-dedup' type='string' value='dd0'/>
      </qemu:frontend>
    </qemu:device>
  </qemu:override>
</domain>
'''


def qmp_at(uri, name, cmd):
    p = virsh_at(uri, 'qemu-monitor-command', name,
                 json.dumps({'execute': cmd}))
    if p.returncode != 0:
        raise RuntimeError(f'{cmd} at {uri}: {tl.one_line(p.stderr)}')
    return json.loads(p.stdout)['return']


def host_sum(disk):
    import hashlib
    text = ''.join(f'{hashlib.md5(disk.data[n]).hexdigest()}  {n}\n'
                   for n in sorted(disk.data))
    return hashlib.md5(text.encode()).hexdigest()


def domain_xml(name, work, qemu, img, console, root_qemu):
    script = os.path.join(work, 'guest.sh')
    with open(script, 'w') as f:
        f.write(GUEST_SCRIPT)
    kernel, initrd = kvmxvm.guest_image()
    text = DOMAIN.format(name=name, mem=MEM_MIB, kernel=kernel, initrd=initrd,
                         script=script, qemu=qemu, img=img, console=console)
    ET.register_namespace('qemu', tl.QEMU_NS)
    dom = ET.fromstring(text)
    if root_qemu:
        sec = ET.SubElement(dom, 'seclabel', type='static', model='dac',
                            relabel='no')
        ET.SubElement(sec, 'label').text = '+0:+0'
    return dom


def set_refused(work, qemu, img):
    """-set device.<alias>.disk-dedup=dd0 against a -device in JSON (as
    libvirt writes it): QEMU's words."""
    p = subprocess.run(
        [qemu, '-machine', 'q35,accel=tcg', '-nodefaults', '-display', 'none',
         '-S', '-qmp', 'stdio', '-object', 'kvmx-disk-dedup,id=dd0',
         '-blockdev', json.dumps({'driver': 'file', 'filename': img,
                                  'node-name': 'f0', 'read-only': True}),
         '-device', json.dumps({'driver': 'virtio-blk-pci', 'drive': 'f0',
                                'id': 'ua-disk0'}),
         '-set', 'device.ua-disk0.disk-dedup=dd0'],
        input='{"execute":"qmp_capabilities"}\n{"execute":"quit"}\n',
        capture_output=True, text=True, timeout=60)
    err = p.stderr.strip()
    print(f'note: -set device.ua-disk0.disk-dedup=dd0 with a JSON -device: '
          f'exit {p.returncode}: {err}')
    check(p.returncode != 0 and 'ua-disk0' in err,
          f'-set on a -device given in JSON (libvirt\'s way) is refused by '
          f'QEMU: {err[:160]}')


def run(work, qemu, root_qemu, peer_uri, disk):
    name = tl.PREFIX + 'dedup'
    console = os.path.join(work, 'console.log')
    dom = domain_xml(name, work, qemu, disk.raw, console, root_qemu)
    tl.define(dom, work, 'dedup')
    p = tl.virsh('start', name)
    if not check(p.returncode == 0,
                 f'virsh start {name} with the passthrough '
                 f'({tl.one_line(p.stdout + p.stderr)})'):
        return
    if not check(wait_text(console, r'READY\n', 300) is not None,
                 'the guest read its files'):
        print(console_text(console)[-2000:])
        return
    m = wait_text(console, r'SUM ([0-9a-f]{32})\n', 60)
    want = host_sum(disk)
    check(m and m[1] == want, f'the guest\'s sum is the host\'s before '
          f'({m and m[1]} vs {want})')
    dd = qmp_at(tl.URI, name, 'query-kvmx-disk-dedup')
    imgs = dd[0].get('images', []) if dd else []
    check(dd and imgs and dd[0].get('records', 0) >= DATA_MIB * MIB // PAGE // 2,
          f'the source records its disk\'s pages ({dd and dd[0].get("records")} '
          f'records, images {imgs})')
    caps = {c['capability']: c['state']
            for c in qmp_at(tl.URI, name, 'query-migrate-capabilities')}
    check(caps.get('disk-dedup'),
          f'-global migration.x-disk-dedup=on: the capability is on from '
          f'the start (return-path {caps.get("return-path")}: libvirt sets '
          f'it when it migrates)')
    if not peer_uri:
        print('SKIPPED: the migration to a second libvirtd (no peer)')
        return
    # The destination's own console; the same disk (shared storage).
    xml = tl.virsh('dumpxml', '--migratable', name).stdout
    d = ET.fromstring(xml)
    dst_console = os.path.join(work, 'console-dst.log')
    d.find("devices/serial[@type='file']/source").set('path', dst_console)
    dest_xml = os.path.join(work, 'dest.xml')
    ET.register_namespace('qemu', tl.QEMU_NS)
    with open(dest_xml, 'w') as f:
        f.write(ET.tostring(d, encoding='unicode'))
    # libvirt cannot tell that a local file is shared storage ("Unsafe
    # migration: Migration without shared storage is unsafe"): checked,
    # then --unsafe, which on real shared storage (NFS, a cluster file
    # system) is not needed.
    p = tl.virsh('migrate', '--live', '--xml', dest_xml, name, peer_uri,
                 timeout=120)
    check(p.returncode != 0 and 'Migration without shared storage is unsafe'
          in p.stderr,
          f'without --unsafe libvirt takes the local image for unshared '
          f'storage ({tl.one_line(p.stderr)})')
    t0 = time.monotonic()
    p = tl.virsh('migrate', '--live', '--unsafe', '--verbose', '--xml',
                 dest_xml, name, peer_uri, timeout=600)
    took = time.monotonic() - t0
    check(p.returncode == 0,
          f'virsh migrate --live --unsafe to the peer completed in {took:.1f} s '
          f'({tl.one_line(p.stderr)})')
    print(f'numbers virsh migrate --live with dedup: {took:.1f} s')
    if p.returncode != 0:
        return
    job = tl.virsh('domjobinfo', '--completed', name).stdout
    print('--- domjobinfo --completed\n' + job)
    info = qmp_at(peer_uri, name, 'query-migrate')
    dd = info.get('disk-dedup') or {}
    print(f'numbers destination query-migrate disk-dedup: {dd}')
    check(dd.get('references-resolved', 0) >= DATA_MIB * MIB // PAGE // 2 and
          not dd.get('mismatches') and not dd.get('read-errors'),
          f'the destination read most of the cached data from the disk by '
          f'reference ({dd})')
    check(virsh_at(peer_uri, 'domstate', name).stdout.strip() == 'running',
          'the domain runs at the peer')
    start = len(console_text(dst_console))
    m = wait_text(dst_console, r'SUM ([0-9a-f]{32})\n', 120, start=start)
    check(m and m[1] == want, f'the guest\'s sum at the peer is the host\'s '
          f'({m and m[1]})')
    virsh_at(peer_uri, 'destroy', name)


def main():
    kvmxtest.require_guest_image()
    qemu = kvmxvm.patched_qemu()
    lacks = tdd.dedup_support(qemu)
    if lacks:
        kvmxvm.skip(f'this QEMU has no disk dedup: {lacks}')
    if not tl.hold_libvirtd():
        return 1
    work = kvmxtest.workdir('libvirt-dedup-')
    peer_dir = tempfile.mkdtemp(prefix='kvmx-peer-', dir='/tmp')
    t_start = time.monotonic()
    try:
        tl.reap_leftovers()
        os.chmod(work, 0o755)
        disk = tdd.Disk(work)
        disk.build(os.path.join(os.path.dirname(qemu), 'qemu-img'))
        set_refused(work, qemu, disk.raw)
        root_qemu = tl.qemu_as_root(qemu, work)
        peer = subprocess.run([SCRIPTS / 'libvirtd-peer', 'start', peer_dir],
                              capture_output=True, text=True)
        print(peer.stderr.strip())
        peer_uri = peer.stdout.strip() if peer.returncode == 0 else None
        if peer.returncode not in (0, 77):
            check(False, f'scripts/libvirtd-peer start: '
                         f'{tl.one_line(peer.stderr)}')
        run(work, qemu, root_qemu, peer_uri, disk)
    except (RuntimeError, subprocess.TimeoutExpired, OSError) as e:
        check(False, f'{type(e).__name__}: {e}')
    finally:
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
    print(f'test_libvirt_dedup: {time.monotonic() - t_start:.1f} s')
    return check.finish(work)


if __name__ == '__main__':
    sys.exit(main())
