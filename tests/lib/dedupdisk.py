"""The disk of the disk-dedup benchmarks (bench/dedup/migrate.py,
bench/dedup/readpath.py): an ext4 image of random files built without
root (`mkfs.ext4 -d`), the -blockdev/-device arguments for it, and
whether a QEMU has disk dedup.  The image layout and the arguments are
those of tests/integration/test_disk_dedup.py (which keeps its own copy:
it also builds a second image and a qcow2 one)."""
import os
import shutil
import subprocess
import time

MIB = 1 << 20
PAGE = 4096
FILE_SIZES_MIB = (1, 2, 3, 4, 5, 6, 7, 8, 12, 16)   # cycled; every 3rd - 1234


def run(cmd, **kw):
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True,
                       **kw)
    if p.returncode != 0:
        raise RuntimeError(f'{" ".join(map(str, cmd))}: exit {p.returncode}: '
                           f'{p.stderr.strip()}')
    return p


def build_image(work, data_mib, name='disk.raw'):
    """An ext4 image in `work` holding `data_mib` MiB of random files under
    /d; returns (path, number of files, seconds it took)."""
    t0 = time.monotonic()
    root = os.path.join(work, 'root')
    os.makedirs(os.path.join(root, 'd'))
    total, i = 0, 0
    while total < data_mib * MIB:
        size = FILE_SIZES_MIB[i % len(FILE_SIZES_MIB)] * MIB
        if i % 3 == 1:
            size -= 1234            # a partial last page
        size = min(size, data_mib * MIB - total)
        with open(os.path.join(root, 'd', f'f{i:03d}'), 'wb') as f:
            f.write(os.urandom(size))
        total += size
        i += 1
    img = os.path.join(work, name)
    image_mib = data_mib + data_mib // 4 + 32
    run(['mkfs.ext4', '-q', '-F', '-b', '4096', '-L', 'kvmxdedup',
         '-E', 'lazy_itable_init=0,lazy_journal_init=0', '-d', root,
         img, f'{image_mib}M'])
    shutil.rmtree(root)
    return img, i, time.monotonic() - t0


def image_args(img, node='d0', fmt='raw', direct=True, aio='threads'):
    """-blockdev for the image (node `node`), host page cache bypassed
    (direct=True, as for shared storage) or used."""
    d = 'true' if direct else 'false'
    f = (f'{{"driver":"file","filename":"{img}","cache":{{"direct":{d}}},'
         f'"aio":"{aio}"}}')
    return ['-blockdev', f'{{"driver":"{fmt}","node-name":"{node}",'
                         f'"cache":{{"direct":{d}}},"file":{f}}}']


def disk_args(img, tracked, node='d0', dev_id='vd0', direct=True,
              max_memory='16M', with_object=True, aio='threads'):
    """The image on a virtio-blk device; tracked: a kvmx-disk-dedup object
    dd0 records the device's reads (with_object=False: the device only,
    for a second disk of a VM that already has the object)."""
    args = image_args(img, node, direct=direct, aio=aio)
    dev = f'virtio-blk-pci,drive={node},id={dev_id}'
    if tracked:
        if with_object:
            args = ['-object', f'kvmx-disk-dedup,id=dd0,'
                    f'max-memory={max_memory}'] + args
        dev += ',disk-dedup=dd0'
    return args + ['-device', dev]


def dedup_support(qemu):
    """None if this QEMU has disk dedup, else what it lacks."""
    cmds = ('{"execute":"qmp_capabilities"}\n'
            '{"execute":"qom-list-types"}\n'
            '{"execute":"query-migrate-capabilities"}\n'
            '{"execute":"quit"}\n')
    p = subprocess.run([qemu, '-machine', 'none', '-nodefaults', '-display',
                        'none', '-S', '-qmp', 'stdio'], input=cmds,
                       capture_output=True, text=True, timeout=30)
    lacks = []
    if '"kvmx-disk-dedup"' not in p.stdout:
        lacks.append('no kvmx-disk-dedup object (qom-list-types)')
    if '"disk-dedup"' not in p.stdout:
        lacks.append('no disk-dedup migration capability')
    return '; '.join(lacks) or None


def tracking(vm):
    """query-kvmx-disk-dedup of the VM's one object ({} without one)."""
    objs = vm.qmp.cmd('query-kvmx-disk-dedup')
    return objs[0] if objs else {}


def change_blocks(img, blocks, page=4096):
    """Overwrite `blocks` (block numbers of `page` bytes) of the image file
    with random bytes, behind QEMU's back; returns a function that puts
    the old bytes back."""
    saved = {}
    fd = os.open(img, os.O_RDWR)
    try:
        for b in blocks:
            saved[b] = os.pread(fd, page, b * page)
            os.pwrite(fd, os.urandom(page), b * page)
        os.fsync(fd)
    finally:
        os.close(fd)

    def put_back():
        fd = os.open(img, os.O_RDWR)
        try:
            for b, data in saved.items():
                os.pwrite(fd, data, b * page)
            os.fsync(fd)
        finally:
            os.close(fd)
    return put_back
