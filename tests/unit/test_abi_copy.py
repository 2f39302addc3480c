#!/usr/bin/python3
"""The kvmx.ko ABI is declared once, in include/kvmx/kvmx-fha.h.  QEMU's
patch series carries it as linux-headers/linux/kvmx-fha.h; this checks the
copy the series adds is byte for byte the same file."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PATCHES = os.path.join(ROOT, 'qemu-patches')
TARGET = 'linux-headers/linux/kvmx-fha.h'


def added_file(patch_text, path):
    """Contents of a file the patch creates (None if it does not)."""
    lines = patch_text.splitlines(keepends=True)
    for i, line in enumerate(lines):
        if line.startswith(f'+++ b/{path}'):
            out = []
            for body in lines[i + 1:]:
                if body.startswith('diff --git') or body.startswith('-- \n'):
                    break
                if body.startswith('+'):
                    out.append(body[1:])
            return ''.join(out)
    return None


def main():
    series = [ln.strip() for ln in open(os.path.join(PATCHES, 'series'))
              if ln.strip() and not ln.startswith('#')]
    copies = [added_file(open(os.path.join(PATCHES, p)).read(), TARGET)
              for p in series]
    copies = [c for c in copies if c is not None]
    if len(copies) != 1:
        print(f'FAIL: {len(copies)} patches add {TARGET} (want 1)')
        return 1
    ours = open(os.path.join(ROOT, 'include', 'kvmx', 'kvmx-fha.h')).read()
    if copies[0] != ours:
        print(f'FAIL: {TARGET} in qemu-patches differs from '
              'include/kvmx/kvmx-fha.h; re-copy it and re-export the series')
        return 1
    print(f'ok: {TARGET} in the series is include/kvmx/kvmx-fha.h')
    return 0


if __name__ == '__main__':
    sys.exit(main())
