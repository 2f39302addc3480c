#!/usr/bin/python3
"""kvmx VMs through libvirt 11.3 (qemu:///system, TCG), with the real
libvirtd started by scripts/libvirtd-up.

The domain comes from examples/libvirt/nvdimm-flush-hint.xml (placeholders
filled in, a second serial port added as the test's control channel, the
guest script swapped for the test's):
  - scripts/kvmx-validate-domain accepts it; virsh define and start work;
    QEMU's command line carries the flush-hint properties of qemu:override;
  - in the guest region0/deep_flush reads 1; a synced write to /dev/pmem0
    raises guest and host flushes in query-nvdimm-flush, read through
    virsh qemu-monitor-command (QMP and HMP) and scripts/kvmx-flushstat;
    the backing file holds the data and is clean when the sync returns;
  - virsh destroy ends QEMU; the undefined domain is gone.
Broken variants: flush hints on a dimm, a private (share=off) backend with
access='private' or no access at all, maxMemory without room for the hint
page: the validator names each mistake, virsh start fails with QEMU's one
line, and the domain is shut off with no QEMU left.  An override whose
alias matches no device starts without flush hints (libvirt drops it): the
validator is what catches that one.

kvmx-hostd follows libvirt's lifecycle (started with --libvirt
qemu:///system before any domain): the domain of
examples/libvirt/hostd-protected.xml (opt-in metadata, a kvmx-chan device)
is attached once it starts and `protections` is answered through libvirt;
after kill -9 and a restart of hostd it is attached again; a protected
page written in the guest (kvmx-prottest signal) is a violation hostd
records under the domain's name; if libvirtd-up started libvirtd, libvirtd
is restarted and hostd reconnects and re-attaches; virsh destroy stops it
in hostd within seconds.  The other domains (no opt-in) never show up in
hostd.

Domains are called kvmx-test-<pid>-*; they are destroyed and undefined on
the way out (and those of dead test runs at the next start).  libvirtd is
held with libvirtd-up --hold and released at the end: if this test started
it and nothing else holds it or runs a domain, it is stopped.
"""
import hashlib
import json
import os
import pwd
import re
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'lib'))
import kvmxtest  # noqa: E402
import kvmxvm  # noqa: E402
from hostdctl import Hostd  # noqa: E402
import pagecache  # noqa: E402

REPO = kvmxvm.REPO_ROOT
SCRIPTS = REPO / 'scripts'
EXAMPLE = REPO / 'examples' / 'libvirt' / 'nvdimm-flush-hint.xml'
HOSTD_EXAMPLE = REPO / 'examples' / 'libvirt' / 'hostd-protected.xml'
BUILD = Path(os.environ.get('KVMX_BUILD_DIR') or REPO / 'build')
HOSTD = BUILD / 'hostd' / 'kvmx-hostd'
URI = 'qemu:///system'
QEMU_NS = 'http://libvirt.org/schemas/domain/qemu/1.0'
Q = '{%s}' % QEMU_NS
PREFIX = f'kvmx-test-{os.getpid()}-'
QEMU_USER = 'libvirt-qemu'

check = kvmxtest.Checks()
domains = []            # every domain this run defined (cleaned up at exit)

GUEST_SCRIPT = r'''
echo "DEEP_FLUSH=$(cat /sys/bus/nd/devices/region0/deep_flush)"
dd if=/dev/urandom of=/tmp/blk bs=1M count=1 2>/dev/null
echo READY
read ack </dev/ttyS1
dd if=/tmp/blk of=/dev/pmem0 bs=1M count=1 conv=fsync 2>/dev/null
echo "SYNCED $? $(md5sum /tmp/blk | cut -d' ' -f1)"
read ack </dev/ttyS1
'''

# The domain hostd follows: the driver loaded, then (on the host's word,
# once hostd has been restarted) one write to a protected page.
HOSTD_GUEST_SCRIPT = r'''
insmod /opt/kvmx/kvmx_guest.ko; echo "INSMOD $?"
echo READY
read ack </dev/ttyS1
/opt/kvmx/kvmx-prottest signal; echo "PROTTEST $?"
read ack </dev/ttyS1
'''


def virsh(*args, timeout=180):
    return subprocess.run(['virsh', '-c', URI] + [str(a) for a in args],
                          capture_output=True, text=True, timeout=timeout)


def one_line(text):
    return ' '.join(ln.strip() for ln in text.splitlines() if ln.strip())


def domstate(name):
    return virsh('domstate', name).stdout.strip()


def qemu_pids(name):
    """PIDs of processes whose command line names the domain (libvirt starts
    QEMU with -name guest=NAME,...)."""
    needle = f'guest={name},'.encode()
    pids = []
    for p in os.listdir('/proc'):
        if not p.isdigit():
            continue
        try:
            with open(f'/proc/{p}/cmdline', 'rb') as f:
                if needle in f.read():
                    pids.append(int(p))
        except OSError:
            pass
    return pids


def proc_user(pid):
    with open(f'/proc/{pid}/status') as f:
        uid = next(int(ln.split()[1]) for ln in f if ln.startswith('Uid:'))
    return pwd.getpwuid(uid).pw_name


def remove_domain(name):
    virsh('destroy', name)
    virsh('undefine', name)


def reap_leftovers():
    """Domains of test runs that died without cleaning up."""
    for name in virsh('list', '--all', '--name').stdout.split():
        m = re.match(r'kvmx-test-(\d+)-', name)
        if m and not os.path.exists(f'/proc/{m[1]}'):
            print(f'removing domain {name} left by a dead test run')
            remove_domain(name)


def reachable(path):
    """Whether QEMU, running as libvirt-qemu, can reach `path`: every
    directory above it searchable by others (libvirt itself gives QEMU the
    files it labels, not their directories)."""
    return all(d.stat().st_mode & stat.S_IXOTH for d in path.parents)


# -- the domain XML ------------------------------------------------------------
def render(name, work, qemu, script, ctl_sock, root_qemu=False,
           example=EXAMPLE):
    """The example with its placeholders filled in, for this test: our own
    QEMU and guest image, our guest script and a control serial port
    (each left out when None)."""
    ET.register_namespace('qemu', QEMU_NS)
    text = example.read_text().replace('@KVMX_REPO@', str(REPO)) \
                              .replace('@VMDIR@', str(work))
    dom = ET.fromstring(text)
    dom.find('name').text = name
    kernel, initrd = kvmxvm.guest_image()
    dom.find('os/kernel').text = str(kernel)
    dom.find('os/initrd').text = str(initrd)
    dom.find('devices/emulator').text = str(qemu)
    if script:
        dom.find("sysinfo[@type='fwcfg']/entry[@name='opt/kvmx/script']") \
           .set('file', str(script))
    if ctl_sock:
        devices = dom.find('devices')
        ctl = ET.SubElement(devices, 'serial', type='unix')
        ET.SubElement(ctl, 'source', mode='bind', path=str(ctl_sock))
        ET.SubElement(ctl, 'target', port='1')
    if root_qemu:
        sec = ET.SubElement(dom, 'seclabel', type='static', model='dac',
                            relabel='no')
        ET.SubElement(sec, 'label').text = '+0:+0'
    return dom


def xml_text(dom):
    return ET.tostring(dom, encoding='unicode')


def pmem_size(dom):
    size = dom.find("devices/memory[@model='nvdimm']/target/size")
    assert size.get('unit') == 'MiB', 'the example gives the size in MiB'
    return int(size.text) << 20


def validate(path):
    p = subprocess.run([SCRIPTS / 'kvmx-validate-domain', path],
                       capture_output=True, text=True)
    return p.returncode, one_line(p.stdout + p.stderr)


def define(dom, work, tag):
    path = os.path.join(work, f'{tag}.xml')
    with open(path, 'w') as f:
        f.write(xml_text(dom))
    domains.append(dom.find('name').text)
    p = virsh('define', path)
    check(p.returncode == 0, f'{tag}: virsh define ({one_line(p.stderr)})')
    return path


def monitor(name, hmp=None):
    if hmp:
        return virsh('qemu-monitor-command', name, '--hmp', hmp).stdout
    p = virsh('qemu-monitor-command', name,
              '{"execute":"query-nvdimm-flush"}')
    if p.returncode != 0:
        raise RuntimeError(f'query-nvdimm-flush: {one_line(p.stderr)}')
    return json.loads(p.stdout)['return']


def wait_console(path, regex, name, timeout):
    """Wait for `regex` in the console file; stop early if the domain ends."""
    deadline = time.monotonic() + timeout
    rx = re.compile(regex)
    while True:
        try:
            text = open(path, errors='replace').read().replace('\r\n', '\n')
        except OSError:
            text = ''
        m = rx.search(text)
        if m:
            return m, text
        if time.monotonic() > deadline or domstate(name) != 'running':
            raise RuntimeError(f'console did not show {regex!r} '
                               f'(domain {domstate(name)}); tail:\n'
                               f'{text[-2000:]}')
        time.sleep(0.5)


# -- the working domain ---------------------------------------------------------
def run_good(work, qemu, ctl_dir, root_qemu):
    name = PREFIX + 'good'
    script = os.path.join(work, 'guest.sh')
    with open(script, 'w') as f:
        f.write(GUEST_SCRIPT)
    console = os.path.join(work, 'console.log')
    ctl_sock = os.path.join(ctl_dir, 'ctl.sock')
    dom = render(name, work, qemu, script, ctl_sock, root_qemu)
    img = kvmxtest.backing_file(work, 'pmem.img', pmem_size(dom))
    path = define(dom, work, 'good')
    rc, out = validate(path)
    check(rc == 0 and 'ok: ua-pmem0 flush-hint=on' in out,
          f'kvmx-validate-domain accepts the example ({out})')

    p = virsh('start', name)
    if not check(p.returncode == 0,
                 f'virsh start {name} ({one_line(p.stdout + p.stderr)})'):
        return
    pids = qemu_pids(name)
    cmdline = b''
    if pids:
        with open(f'/proc/{pids[0]}/cmdline', 'rb') as f:
            cmdline = f.read()
    user = 'root' if root_qemu else QEMU_USER
    check(pids and proc_user(pids[0]) == user, f'QEMU runs as {user}')
    check(len(pids) == 1 and b'"id":"ua-pmem0"' in cmdline and
          b'"flush-hint":"on"' in cmdline and str(qemu).encode() in cmdline,
          f'one QEMU ({pids}), the patched one, with qemu:override\'s '
          'flush-hint on the nvdimm device ua-pmem0')

    _, text = wait_console(console, r'READY\n', name, 300)
    check('DEEP_FLUSH=1' in text, 'guest region0/deep_flush reads 1')
    q0 = monitor(name)
    check(len(q0) == 1 and q0[0]['id'] == 'ua-pmem0' and
          q0[0]['mode'] == 'trap' and q0[0]['host-flush'] == 'fdatasync',
          f'query-nvdimm-flush through virsh: ua-pmem0 traps ({q0})')

    with socket.socket(socket.AF_UNIX) as ctl:
        ctl.connect(ctl_sock)
        ctl.sendall(b'go\n')
        m, _ = wait_console(console, r'SYNCED (\d+) ([0-9a-f]{32})\n', name, 120)
        st = pagecache.cachestat(img) if pagecache.available() else None
        q1 = monitor(name)
        check(m[1] == '0', 'guest dd conv=fsync to /dev/pmem0 succeeded')
        g0, g1 = q0[0]['guest-flushes'], q1[0]['guest-flushes']
        h0, h1 = q0[0]['host-flushes'], q1[0]['host-flushes']
        check(g1 > g0 and h1 > h0 and q1[0]['host-flush-errors'] == 0,
              f'synced write raised guest flushes {g0}->{g1}, host flushes '
              f'{h0}->{h1}, no errors')
        if st is not None:
            check(st['dirty'] == 0 and st['writeback'] == 0,
                  f'backing file clean when the guest sync returned ({st})')
        with open(img, 'rb') as f:
            check(hashlib.md5(f.read(1 << 20)).hexdigest() == m[2],
                  'backing file holds what the guest wrote')
        hmp = monitor(name, hmp='info nvdimm-flush')
        check('ua-pmem0: mode trap' in hmp and
              f'guest flushes: {g1},' in hmp,
              f'HMP info nvdimm-flush through virsh ({one_line(hmp)})')
        p = subprocess.run([SCRIPTS / 'kvmx-flushstat', name],
                           capture_output=True, text=True)
        row = next((ln.split() for ln in p.stdout.splitlines()
                    if ln.startswith('ua-pmem0 ')), [])
        check(p.returncode == 0 and row[1:3] == ['trap', 'fdatasync'] and
              row[5] == str(g1),
              f'kvmx-flushstat prints the row ({p.stdout!r} {p.stderr!r})')

        p = virsh('destroy', name)
        check(p.returncode == 0, f'virsh destroy ({one_line(p.stderr)})')
    check(domstate(name) == 'shut off', 'destroyed domain is shut off')
    check(gone(pids), f'its QEMU {pids} is gone')
    p = virsh('undefine', name)
    check(p.returncode == 0 and virsh('dominfo', name).returncode != 0,
          'undefined domain no longer exists')


def gone(pids, timeout=15):
    deadline = time.monotonic() + timeout
    while any(os.path.exists(f'/proc/{p}') for p in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


# -- kvmx-hostd following libvirt -----------------------------------------------------
def attached(v):
    return v['state'] == 'attached'


def libvirtd_ours():
    """PID of libvirtd if scripts/libvirtd-up started it (so this test may
    restart it), else None."""
    p = subprocess.run([SCRIPTS / 'libvirtd-up', '--status'],
                       capture_output=True, text=True)
    m = re.search(r'^libvirtd: running, pid (\d+), started by libvirtd-up$',
                  p.stdout, re.M)
    return int(m[1]) if m else None


def restart_libvirtd(hostd, name):
    """Stop libvirtd under the running domain and start it again: hostd
    loses the connection, reconnects with backoff, resyncs, re-attaches."""
    pid = libvirtd_ours()
    if pid is None:
        print('note: libvirtd was not started by libvirtd-up here: '
              'not restarting it')
        return
    os.kill(pid, signal.SIGTERM)
    if not check(gone([pid], 30), f'libvirtd {pid} stopped'):
        return
    v = hostd.wait_vm(name, lambda v: v['state'] == 'disconnected', 15)
    check(v and v['state'] == 'disconnected' and
          'libvirt connection lost' in v['last_error'],
          f'libvirtd gone: hostd shows the domain disconnected ({v})')
    up = subprocess.run([SCRIPTS / 'libvirtd-up', '--hold', str(os.getpid())],
                        capture_output=True, text=True)
    if not check(up.returncode == 0,
                 f'libvirtd started again ({one_line(up.stderr)})'):
        return
    v = hostd.wait_vm(name, attached, 60)
    lv = hostd.call('stats')['result']['libvirt']
    check(v and attached(v) and lv['connected'] and lv['reconnects'] >= 1
          and lv['disconnects'] >= 1,
          f'hostd reconnected to libvirtd and re-attached the domain '
          f'({v and v["state"]}, {lv})')
    check(domstate(name) == 'running', 'the domain ran on meanwhile')


def run_hostd(work, qemu, ctl_dir, root_qemu, hostd):
    name = PREFIX + 'hostd'
    script = os.path.join(work, 'hostd-guest.sh')
    with open(script, 'w') as f:
        f.write(HOSTD_GUEST_SCRIPT)
    vmdir = os.path.join(work, 'hostd-vm')
    os.makedirs(vmdir)
    os.chmod(vmdir, 0o755)
    console = os.path.join(vmdir, 'console.log')
    ctl_sock = os.path.join(ctl_dir, 'hostd-ctl.sock')
    dom = render(name, vmdir, qemu, script, ctl_sock, root_qemu,
                 example=HOSTD_EXAMPLE)
    define(dom, work, 'hostd')
    p = virsh('metadata', name, 'urn:kvmx:hostd:1')
    check(p.returncode == 0 and 'attach="yes"' in p.stdout,
          f'libvirt keeps the opt-in metadata ({one_line(p.stdout)})')
    check(hostd.vm(name) is None, 'a defined domain is not in hostd yet')

    p = virsh('start', name)
    if not check(p.returncode == 0,
                 f'virsh start {name} ({one_line(p.stdout + p.stderr)})'):
        return
    t0 = time.monotonic()
    v = hostd.wait_vm(name, attached, 60)
    check(v and attached(v) and v['source'] == 'libvirt' and
          v['libvirt']['uri'] == URI and v['qmp'] is None and
          v['qemu'].startswith('10.'),
          f'hostd attached the started domain through libvirt in '
          f'{time.monotonic() - t0:.1f} s ({v})')
    check(v and v['devices'] and v['devices'][0]['id'] == 'chan0',
          'hostd learnt its kvmx-chan device (query-kvmx-chan via libvirt)')
    r = hostd.call('protections', vm=name)
    devs = r.get('result', {}).get('devices') or [{}]
    check(devs[0].get('id') == 'chan0' and 'entries' in devs[0],
          f'protections relayed through libvirt ({r})')

    _, text = wait_console(console, r'READY\n', name, 300)
    check('INSMOD 0' in text, 'guest: kvmx_guest.ko loaded')

    # kill -9 and a restart: the domain is attached again.
    hostd.kill()
    hostd.start()
    v = hostd.wait_vm(name, attached, 60)
    check(v and attached(v),
          f'after kill -9 and a restart hostd attached the running domain '
          f'again ({v})')

    with socket.socket(socket.AF_UNIX) as ctl:
        ctl.connect(ctl_sock)
        ctl.sendall(b'go\n')
        m, _ = wait_console(console, r'PROTTEST (\d+)\n', name, 120)
        check(m[1] == '0', 'guest: kvmx-prottest signal passes')
        deadline = time.monotonic() + 30
        while True:
            r = hostd.call('violations', vm=name)
            items = r.get('result', {}).get('violations', [])
            if items or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        check(items and items[0]['vm'] == name and
              items[0]['device'] == 'chan0' and
              items[0]['access'] == 'write' and
              items[0]['action'] == 'signal',
              f'hostd recorded the guest\'s violation under the domain name, '
              f'from libvirt\'s QEMU event ({items[:1]})')
        v = hostd.vm(name)
        check(v and v['violations'] >= 1, f'list-vms counts it ({v})')

        restart_libvirtd(hostd, name)

        p = virsh('destroy', name)
        check(p.returncode == 0, f'virsh destroy ({one_line(p.stderr)})')
        t0 = time.monotonic()
        v = hostd.wait_vm(name, lambda v: v['state'] == 'stopped', 10)
        check(v and v['state'] == 'stopped' and
              'destroyed' in v['last_error'],
              f'destroyed domain: hostd shows it stopped in '
              f'{time.monotonic() - t0:.1f} s ({v and v["state"]}, '
              f'{v and v["last_error"]})')
    r = hostd.call('protections', vm=name)
    check(r.get('error', {}).get('code') == 'vm-not-connected',
          f'no protections for a stopped domain ({r})')
    lv = hostd.call('stats')['result']['libvirt']
    check(lv['connected'] and lv['domains'] == 1 and
          lv['domains_attached'] == 0 and lv['uri'] == URI,
          f'stats: libvirt section ({lv})')
    virsh('undefine', name)


# -- broken domains ---------------------------------------------------------------
def dimm_override(dom):
    """Flush hints aimed at a plain DIMM."""
    mem = ET.SubElement(dom.find('devices'), 'memory', model='dimm')
    ET.SubElement(mem, 'alias', name='ua-dimm0')
    target = ET.SubElement(mem, 'target')
    ET.SubElement(target, 'size', unit='MiB').text = '128'
    ET.SubElement(target, 'node').text = '0'
    dom.find(f'{Q}override/{Q}device').set('alias', 'ua-dimm0')


def private_access(dom):
    dom.find("devices/memory[@model='nvdimm']").set('access', 'private')


def no_access(dom):
    del dom.find("devices/memory[@model='nvdimm']").attrib['access']


def no_room(dom):
    """maxMemory = RAM + the NVDIMM exactly: nothing left for the hint page."""
    mm = dom.find('maxMemory')
    mm.set('unit', 'MiB')
    mm.text = str(1024 + (pmem_size(dom) >> 20))


def alias_typo(dom):
    dom.find(f'{Q}override/{Q}device').set('alias', 'ua-pmem9')


BROKEN = (   # tag, change, what the validator says, what QEMU says
    ('dimm', dimm_override, "on 'ua-dimm0', a <memory model='dimm'>",
     "Property 'pc-dimm.flush-hint' not found"),
    ('private', private_access, "its access is 'private'",
     "memdev 'memua-pmem0' is not shared with the host (share=off)"),
    ('no-access', no_access, "add access='shared'",
     "memdev 'memua-pmem0' is not shared with the host (share=off)"),
    ('no-room', no_room, 'raise maxMemory to at least 1282 MiB',
     "needs 2 MiB of device memory beyond the NVDIMM's size"),
)


def run_broken(work, qemu, ctl_dir, root_qemu):
    script = os.path.join(work, 'idle.sh')
    with open(script, 'w') as f:
        f.write('while :; do sleep 60; done\n')
    kvmxtest.backing_file(work, 'pmem.img', 256 << 20)
    for tag, change, says, qemu_says in BROKEN:
        name = PREFIX + tag
        dom = render(name, work, qemu, script,
                     os.path.join(ctl_dir, f'{tag}.sock'), root_qemu)
        change(dom)
        path = define(dom, work, tag)
        rc, out = validate(path)
        check(rc == 1 and says in out and out.count('error:') == 1,
              f'{tag}: validator: one clear error ({out})')
        p = virsh('start', name)
        err = p.stderr.strip()
        check(p.returncode != 0 and qemu_says in err and
              'Failed to start domain' in err,
              f'{tag}: virsh start fails with QEMU\'s reason ({one_line(err)})')
        check(domstate(name) == 'shut off' and gone(qemu_pids(name), 5),
              f'{tag}: domain shut off, no QEMU left')
        virsh('undefine', name)

    # Silent: libvirt drops an override whose alias matches no device.
    name = PREFIX + 'typo'
    dom = render(name, work, qemu, script,
                 os.path.join(ctl_dir, 'typo.sock'), root_qemu)
    alias_typo(dom)
    path = define(dom, work, 'typo')
    rc, out = validate(path)
    check(rc == 1 and "alias 'ua-pmem9', but no device" in out,
          f'typo: validator names the alias nothing has ({out})')
    p = virsh('start', name)
    if check(p.returncode == 0, 'typo: libvirt starts the domain anyway'):
        q = monitor(name)
        check(len(q) == 1 and q[0]['mode'] == 'off',
              f'typo: and its NVDIMM has no flush hints ({q})')
    remove_domain(name)
    check(gone(qemu_pids(name)), 'typo: QEMU gone after destroy')


# -- main ---------------------------------------------------------------------------
def terminate(signum, frame):
    raise SystemExit(f'killed by signal {signum}')


def hold_libvirtd():
    """libvirtd for this test (scripts/libvirtd-up --hold): skips (77)
    where it cannot run; False when it would not start."""
    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGHUP, terminate)
    up = subprocess.run([SCRIPTS / 'libvirtd-up', '--hold', str(os.getpid())],
                        capture_output=True, text=True)
    print(up.stderr.strip())
    if up.returncode == 77:
        kvmxvm.skip(one_line(up.stderr))
    if up.returncode != 0:
        print('FAIL scripts/libvirtd-up could not start libvirtd')
        return False
    return True


def qemu_as_root(qemu, work):
    """Whether the domains must run QEMU as root: $KVMX_LIBVIRT_ROOT_QEMU,
    or a path QEMU needs that libvirt-qemu cannot reach."""
    root_qemu = bool(os.environ.get('KVMX_LIBVIRT_ROOT_QEMU'))
    for p in (qemu, kvmxvm.guest_image()[0], work):
        if not root_qemu and not reachable(Path(p)):
            print(f'note: {p} is not reachable by {QEMU_USER}: '
                  'QEMU runs as root (<seclabel model=dac>)')
            root_qemu = True
    return root_qemu


def release_libvirtd():
    """Removes this test's domains, checks no QEMU of them is left, and
    releases libvirtd."""
    for name in domains:
        remove_domain(name)
    left = [n for n in domains if qemu_pids(n)]
    check(not left, f'no QEMU of this test left ({left})')
    rel = subprocess.run([SCRIPTS / 'libvirtd-up', '--release',
                          str(os.getpid())], capture_output=True, text=True)
    print(rel.stderr.strip())


def main():
    kvmxtest.require_guest_image()
    qemu = kvmxvm.patched_qemu()
    if not hold_libvirtd():
        return 1
    work = kvmxtest.workdir('libvirt-')
    ctl_dir = work
    hostd = None
    try:
        reap_leftovers()
        os.chmod(work, 0o755)       # QEMU runs as libvirt-qemu
        if len(os.path.join(work, 'no-access.sock')) > 100:   # sun_path
            ctl_dir = tempfile.mkdtemp(prefix='kvmx-lv-')
            os.chmod(ctl_dir, 0o755)
        root_qemu = qemu_as_root(qemu, work)
        # hostd runs before any domain starts, and sees all of them.
        if check(os.access(HOSTD, os.X_OK), f'{HOSTD} is built'):
            # -o reconnect-max-ms: back in 1 s after a libvirtd restart.
            hostd = Hostd(work, ctl_dir, ['--libvirt', URI,
                                          '-o', 'reconnect-max-ms=1000'])
            hostd.start()
        run_good(work, qemu, ctl_dir, root_qemu)
        if hostd:
            run_hostd(work, qemu, ctl_dir, root_qemu, hostd)
        run_broken(work, qemu, ctl_dir, root_qemu)
        if hostd:
            vms = [v['vm'] for v in hostd.call('list-vms')['result']['vms']]
            check(vms == [PREFIX + 'hostd'],
                  f'hostd followed only the domain that opts in ({vms})')
            check(hostd.kill(signal.SIGTERM) == 0, 'hostd stops on SIGTERM')
    except (RuntimeError, subprocess.TimeoutExpired, OSError) as e:
        check(False, str(e))
    finally:
        if hostd:
            hostd.kill()
            if check.failures:
                print(f'--- hostd log tail\n{hostd.tail()}')
        release_libvirtd()
        if ctl_dir != work:
            subprocess.run(['rm', '-rf', ctl_dir])
    return check.finish(work)


if __name__ == '__main__':
    sys.exit(main())
