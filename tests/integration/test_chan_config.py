#!/usr/bin/python3
"""kvmx-chan's configuration, without a guest (TCG, QEMU paused):

  no-msi        on a machine without MSI (pc, a CPU without a local APIC,
                so no interrupt controller sets msi_nonbroken) the device
                realizes and uses INTx (before: "MSI is not supported by
                interrupt controller" and QEMU exited)
  q35           on q35 (MSI) it realizes as before
  properties    the limits a guest cannot change exist with their
                documented defaults (changes-per-sec 20, changes-burst 20)
  query         query-kvmx-chan shows the new counters (throttled,
                extents-free, extents-limit) with their idle values
  intx          the guest driver on INTx (Linux with pci=nomsi, as it
                would be on such a machine): it says INTx, and kvmx-prottest
                signal and deny pass, so events arrive by the INTx line
                (needs the guest image of scripts/mkguest; else skipped)
"""
import os
import re
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'lib'))
import kvmxtest  # noqa: E402
import kvmxvm  # noqa: E402

check = kvmxtest.Checks()
PCI_CAP_ID_MSI = 0x05


def find_chan(vm):
    for bus in vm.qmp.cmd('query-pci'):
        for d in bus['devices']:
            if d['id']['vendor'] == 0x1af4 and d['id']['device'] == 0x10f0:
                return d
    return None


def start(qemu, work, name, machine, cpu):
    vm = kvmxvm.Vm(qemu, ['-accel', 'tcg', '-machine', machine, '-cpu', cpu,
                          '-m', '64M', '-S',
                          '-device', 'kvmx-chan,id=chan0'], work, name)
    return vm


INTX_SCRIPT = r'''
insmod /opt/kvmx/kvmx_guest.ko || { echo INSMOD-FAILED; exit 4; }
dmesg | grep "kvmx_guest.*kvmx-chan v"
/opt/kvmx/kvmx-prottest signal; echo "SIGNAL-RC=$?"
/opt/kvmx/kvmx-prottest deny; echo "DENY-RC=$?"
'''


def intx(qemu, work):
    try:
        kvmxvm.guest_image()
    except kvmxvm.GuestImageMissing as e:
        print(f'SKIP intx: {e}')
        return
    with kvmxvm.start_guest(qemu, INTX_SCRIPT,
                            ['-device', 'kvmx-chan,id=chan0'], work, 'intx',
                            append_extra='pci=nomsi') as vm:
        vm.wait_console(r'DENY-RC=\d+|KVMX-GUEST-EXIT', 600)
        con = vm.console_text()
        kvmxvm.wait_guest_exit(vm, 60)
    m = re.search(r'kvmx-chan v\d+, (\w+),', con)
    check(m and m.group(1) == 'INTx',
          f'intx: the driver runs on INTx: {m.group(0) if m else None}')
    check('SIGNAL-RC=0' in con and 'DENY-RC=0' in con,
          'intx: kvmx-prottest signal and deny pass over INTx')


def main():
    qemu = kvmxvm.patched_qemu()
    work = kvmxtest.workdir('chancfg-')

    with start(qemu, work, 'nomsi', 'pc', 'qemu64,-apic') as vm:
        try:
            vm.start()
            ok, why = True, ''
        except kvmxvm.QemuExited as e:
            ok, why = False, str(e).splitlines()[-1]
        check(ok, f'no-msi: kvmx-chan realizes on a machine without MSI '
                  f'(INTx) {why}')
        if ok:
            d = find_chan(vm)
            check(d is not None and d.get('irq') is not None,
                  f'no-msi: the device is on the bus with an INTx line: '
                  f'{d and d.get("irq")}')
            out = vm.qmp.cmd('human-monitor-command',
                             **{'command-line': 'info qtree'})
            check('kvmx-chan' in out, 'no-msi: info qtree shows it')

    with start(qemu, work, 'q35', 'q35', 'max') as vm:
        vm.start()
        d = find_chan(vm)
        check(d is not None, 'q35: the device is there')
        props = {p['name']: p for p in vm.qmp.cmd(
            'device-list-properties', typename='kvmx-chan')}
        for name, default in (('changes-per-sec', 20), ('changes-burst', 20)):
            p = props.get(name)
            check(p is not None and p.get('default-value') == default,
                  f'properties: {name} defaults to {default}: {p}')
        i = vm.qmp.cmd('query-kvmx-chan')[0]
        check(i.get('throttled') == 0 and i.get('extents-free') == 4096 and
              i.get('extents-limit') == 'max-extents',
              f'query: throttled 0, extents-free 4096 (max-extents): '
              f'{ {k: i.get(k) for k in ("throttled", "extents-free", "extents-limit")} }')
    intx(qemu, work)
    return check.finish(work)


if __name__ == '__main__':
    sys.exit(main())
