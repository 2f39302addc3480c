#!/usr/bin/python3
"""scripts/kvmx-validate-domain on examples/libvirt/nvdimm-flush-hint.xml
and on broken variants of it: each mistake gives exit 1 and one line that
names it; good variants (other ways to share the backend, libvirt's default
alias, -global on the command line) pass.  No libvirt needed: the rules it
mirrors (default aliases, share=, the hint page's room) were checked against
libvirt 11.3 and the patched QEMU by tests/integration/test_libvirt.py and
virsh domxml-to-native."""
import os
import subprocess
import sys
import xml.etree.ElementTree as ET

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'lib'))
import kvmxtest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VALIDATE = os.path.join(ROOT, 'scripts', 'kvmx-validate-domain')
EXAMPLE = os.path.join(ROOT, 'examples', 'libvirt', 'nvdimm-flush-hint.xml')
QEMU_NS = 'http://libvirt.org/schemas/domain/qemu/1.0'
Q = '{%s}' % QEMU_NS
check = kvmxtest.Checks()


def example():
    ET.register_namespace('qemu', QEMU_NS)
    with open(EXAMPLE) as f:
        text = f.read().replace('@KVMX_REPO@', '/srv/kvmx') \
                       .replace('@VMDIR@', '/srv/vm')
    return ET.fromstring(text)


def nvdimm(dom):
    return dom.find("devices/memory[@model='nvdimm']")


def override(dom):
    return dom.find(f'{Q}override/{Q}device')


def prop(dom, name):
    return override(dom).find(f"{Q}frontend/{Q}property[@name='{name}']")


def add_dimm(dom, alias=None, slot=None):
    mem = ET.SubElement(dom.find('devices'), 'memory', model='dimm')
    if alias:
        ET.SubElement(mem, 'alias', name=alias)
    target = ET.SubElement(mem, 'target')
    ET.SubElement(target, 'size', unit='MiB').text = '128'
    ET.SubElement(target, 'node').text = '0'
    if slot is not None:
        ET.SubElement(mem, 'address', type='dimm', slot=str(slot))


def drop_user_alias(dom):
    nv = nvdimm(dom)
    nv.remove(nv.find('alias'))


def cmdline(dom, *args):
    cl = ET.SubElement(dom, f'{Q}commandline')
    for a in args:
        ET.SubElement(cl, f'{Q}arg', value=a)


def run(name, change, rc, says=(), stderr_says=()):
    dom = example()
    if change:
        change(dom)
    p = subprocess.run([VALIDATE, '-'], input=ET.tostring(dom, 'unicode'),
                       capture_output=True, text=True)
    errors = [ln for ln in p.stdout.splitlines() if ': error: ' in ln]
    ok = (p.returncode == rc and all(s in p.stdout for s in says) and
          all(s in p.stderr for s in stderr_says) and
          len(errors) == (1 if rc == 1 else 0))
    check(ok, f"{name}: rc={p.returncode} {(p.stdout + p.stderr).strip()!r}")


def main():
    # -- accepted ------------------------------------------------------------
    run('the example', None, 0, ['ok: ua-pmem0 flush-hint=on'])

    def shared_by_memory_backing(d):
        del nvdimm(d).attrib['access']
        mb = ET.SubElement(d, 'memoryBacking')
        ET.SubElement(mb, 'access', mode='shared')
    run('shared through <memoryBacking><access>', shared_by_memory_backing, 0)

    def shared_by_numa_cell(d):
        del nvdimm(d).attrib['access']
        d.find('cpu/numa/cell').set('memAccess', 'shared')
    run("shared through the NUMA cell's memAccess", shared_by_numa_cell, 0)

    def default_alias(d):
        drop_user_alias(d)
        override(d).set('alias', 'nvdimm0')
    run("libvirt's default alias nvdimm0", default_alias, 0,
        ['ok: nvdimm0 flush-hint=on'])

    def default_alias_after_dimm(d):
        drop_user_alias(d)
        d.find('devices').remove(nvdimm_el := nvdimm(d))
        add_dimm(d)
        d.find('devices').append(nvdimm_el)
        override(d).set('alias', 'nvdimm1')
    run('default alias follows the slot (dimm0, nvdimm1)',
        default_alias_after_dimm, 0, ['ok: nvdimm1 flush-hint=on'])

    def global_flag(d):
        d.remove(d.find(f'{Q}override'))
        cmdline(d, '-global', 'nvdimm.flush-hint=on')
    run('qemu:commandline -global nvdimm.flush-hint=on', global_flag, 0,
        ['ok: ua-pmem0 flush-hint=on'])

    def auto_private(d):
        nvdimm(d).set('access', 'private')
        prop(d, 'flush-hint').set('value', 'auto')
    run('flush-hint=auto on a private backend warns only', auto_private, 0,
        stderr_says=['flush-hint=auto will not trap'])

    def no_hints(d):
        d.remove(d.find(f'{Q}override'))
    run('no flush hints at all', no_hints, 0, ['no NVDIMM has flush hints'])

    # -- refused -------------------------------------------------------------
    def on_dimm(d):
        add_dimm(d, alias='ua-dimm0')
        override(d).set('alias', 'ua-dimm0')
    run('flush hints on a dimm', on_dimm, 1,
        ["'ua-dimm0', a <memory model='dimm'>"])

    def typo(d):
        override(d).set('alias', 'ua-pmem9')
    run('override alias that nothing has', typo, 1,
        ["alias 'ua-pmem9', but no device has that alias",
         'NVDIMM aliases: ua-pmem0'])

    def stale_default(d):
        drop_user_alias(d)
        add_dimm(d, slot=0)
        override(d).set('alias', 'nvdimm0')
    run('default alias nvdimm0 when a dimm has slot 0', stale_default, 1,
        ["alias 'nvdimm0', but no device", 'NVDIMM aliases: nvdimm1'])

    def on_serial(d):
        serial = d.find('devices/serial')
        ET.SubElement(serial, 'alias', name='ua-ser')
        override(d).set('alias', 'ua-ser')
    run('override alias of a device that is not memory', on_serial, 1,
        ["'ua-ser', a device that is not an NVDIMM"])

    def private(d):
        nvdimm(d).set('access', 'private')
    run("access='private'", private, 1, ["its access is 'private'",
                                         "add access='shared'"])

    def no_access(d):
        del nvdimm(d).attrib['access']
    run('no access at all (share=off)', no_access, 1,
        ["its access is 'default'"])

    def readonly(d):
        ET.SubElement(nvdimm(d).find('target'), 'readonly')
    run('read-only NVDIMM', readonly, 1, ['it is read-only'])

    def bool_type(d):
        prop(d, 'flush-hint').attrib.update(type='bool', value='true')
    run("flush-hint with type='bool'", bool_type, 1,
        ["has type 'bool', QEMU wants type='string'"])

    def bad_value(d):
        prop(d, 'flush-hint').set('value', 'yes')
    run("flush-hint='yes'", bad_value, 1, ["flush-hint='yes' is not one of"])

    def count_range(d):
        prop(d, 'flush-hint-count').set('value', '65')
    run('flush-hint-count=65', count_range, 1,
        ["flush-hint-count='65' is not 1 to 64"])

    def count_string(d):
        prop(d, 'flush-hint-count').set('type', 'string')
    run("flush-hint-count with type='string'", count_string, 1,
        ["QEMU wants type='unsigned'"])

    def bad_accel(d):
        ET.SubElement(override(d).find(f'{Q}frontend'), f'{Q}property',
                      name='flush-hint-accel', type='string', value='kvm')
    run("flush-hint-accel='kvm'", bad_accel, 1,
        ["flush-hint-accel='kvm' is not one of auto, kernel, user"])

    def no_acpi(d):
        d.remove(d.find('features'))
    run('no <acpi/>', no_acpi, 1, ['NVDIMMs need <features><acpi/>'])

    def no_room(d):
        mm = d.find('maxMemory')
        mm.set('unit', 'MiB')
        mm.text = '1280'
    run('maxMemory without room for the hint page', no_room, 1,
        ['raise maxMemory to at least 1282 MiB'])

    def set_flag(d):
        cmdline(d, '-set', 'device.ua-pmem0.flush-hint=on')
    run('qemu:commandline -set', set_flag, 1, ['use qemu:override'])

    p = subprocess.run([VALIDATE, '-'], input='<domain', capture_output=True,
                       text=True)
    check(p.returncode == 2 and 'cannot read' in p.stdout,
          f'unreadable XML: rc={p.returncode} {p.stdout.strip()!r}')
    return check.finish()


if __name__ == '__main__':
    sys.exit(main())
