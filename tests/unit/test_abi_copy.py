#!/usr/bin/python3
"""The kvmx.ko ABI (include/kvmx/kvmx-fha.h) and the guest protection ABI
(include/kvmx/kvmx-guest.h) are declared once.  QEMU's patch series carries
them as linux-headers/linux/<name>; this checks that each copy the series
adds is byte for byte the same file."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PATCHES = os.path.join(ROOT, 'qemu-patches')
HEADERS = ['kvmx-fha.h', 'kvmx-guest.h']


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


def check(series, name):
    target = f'linux-headers/linux/{name}'
    copies = [added_file(open(os.path.join(PATCHES, p)).read(), target)
              for p in series]
    copies = [c for c in copies if c is not None]
    if len(copies) != 1:
        print(f'FAIL: {len(copies)} patches add {target} (want 1)')
        return 1
    ours = open(os.path.join(ROOT, 'include', 'kvmx', name)).read()
    if copies[0] != ours:
        print(f'FAIL: {target} in qemu-patches differs from '
              f'include/kvmx/{name}; re-copy it and re-export the series')
        return 1
    print(f'ok: {target} in the series is include/kvmx/{name}')
    return 0


def main():
    series = [ln.strip() for ln in open(os.path.join(PATCHES, 'series'))
              if ln.strip() and not ln.startswith('#')]
    return max(check(series, h) for h in HEADERS)


if __name__ == '__main__':
    sys.exit(main())
