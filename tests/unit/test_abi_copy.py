#!/usr/bin/python3
"""The kvmx.ko ABI (include/kvmx/kvmx-fha.h) and the guest protection ABI
(include/kvmx/kvmx-guest.h) are declared once, in kernel style.  QEMU's
patch series carries QEMU-style copies (QEMU's checkpatch.pl rejects the
kernel style) as include/hw/mem/kvmx-fha.h and include/hw/misc/kvmx-guest.h.

This checks that the series adds each copy exactly once and that the copy
has the same layout as kvmx's header: the same structs with the same sizeof
and alignment, the same members at the same offsetof with the same size,
and the same macros with the same values (evaluated in C, so ioctl numbers
are compared as numbers).  Struct and member names are read from the
headers by a small parser; a C program is generated for each header,
compiled with `cc` against that header alone, run, and the two dumps are
compared.

  --copy NAME=PATH   check PATH instead of the copy in the series (e.g.
                     --copy kvmx-fha.h=/path/to/kvmx-fha.h); also taken
                     from $KVMX_ABI_COPY, "NAME=PATH[,NAME=PATH]".

Exit 0: all match; 1: a difference (printed); 77: no C compiler (skip).
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
PATCHES = os.path.join(ROOT, 'qemu-patches')
# kvmx header name -> path of QEMU's copy in QEMU's tree
HEADERS = {
    'kvmx-fha.h': 'include/hw/mem/kvmx-fha.h',
    'kvmx-guest.h': 'include/hw/misc/kvmx-guest.h',
}

# Included before either header.  QEMU code includes "qemu/osdep.h" first,
# which gives stdint and QEMU_BUILD_BUG_* (qemu/compiler.h).
PRELUDE = r'''
#include <stdint.h>
#include <stddef.h>
#include <stdio.h>
#ifndef QEMU_BUILD_BUG_MSG
#define QEMU_BUILD_BUG_MSG(x, msg) _Static_assert(!(x), msg)
#endif
#ifndef QEMU_BUILD_BUG_ON
#define QEMU_BUILD_BUG_ON(x) QEMU_BUILD_BUG_MSG(x, "not expecting: " #x)
#endif
'''


class Unsupported(Exception):
    pass


# ---- series ----------------------------------------------------------------

def patch_files(patch_text, path):
    """(created, modified): contents of `path` if this patch creates it
    (None if not), and whether it changes an existing `path`."""
    lines = patch_text.splitlines(keepends=True)
    created, modified = None, False
    for i, line in enumerate(lines):
        if line.rstrip('\n') != f'+++ b/{path}':
            continue
        if i == 0 or lines[i - 1].rstrip('\n') != '--- /dev/null':
            modified = True
            continue
        out = []
        for body in lines[i + 1:]:
            if body.startswith('diff --git') or body == '-- \n':
                break
            if body.startswith('+'):
                out.append(body[1:])
        created = ''.join(out)
    return created, modified


def copy_from_series(series, target):
    """(text, patch) of the copy the series adds, or (None, why)."""
    created, modified = [], []
    for p in series:
        text = open(os.path.join(PATCHES, p)).read()
        c, m = patch_files(text, target)
        if c is not None:
            created.append((c, p))
        if m:
            modified.append(p)
    if len(created) != 1:
        where = ''.join(f'\n    {p}' for _, p in created)
        return None, f'{len(created)} patches add {target} (want 1){where}'
    if modified:
        return None, (f'{target} is changed after {created[0][1]} by '
                      + ', '.join(modified)
                      + '; fold the change into the patch that adds it')
    return created[0]


# ---- header parsing --------------------------------------------------------

def strip_comments(text):
    text = re.sub(r'/\*.*?\*/', ' ', text, flags=re.S)
    return re.sub(r'//[^\n]*', ' ', text)


def matching_brace(text, i):
    """Index of the '}' matching the '{' at text[i]."""
    depth = 0
    for j in range(i, len(text)):
        if text[j] == '{':
            depth += 1
        elif text[j] == '}':
            depth -= 1
            if depth == 0:
                return j
    raise Unsupported('unbalanced braces')


def split_top(text, sep):
    """Split at `sep` outside (), [] and {}."""
    parts, depth, cur = [], 0, ''
    for ch in text:
        if ch in '([{':
            depth += 1
        elif ch in ')]}':
            depth -= 1
        if ch == sep and depth == 0:
            parts.append(cur)
            cur = ''
        else:
            cur += ch
    parts.append(cur)
    return [p.strip() for p in parts if p.strip()]


def declarator_name(decl):
    """`*name[3]` -> ('name', is_array)."""
    if re.search(r':\s*\w+\s*$', decl):
        raise Unsupported(f'bit-field "{decl}"')
    m = re.match(r'^[\s*]*(?:const\s+)?(\w+)\s*((?:\[[^\]]*\]\s*)*)$', decl)
    if not m:
        raise Unsupported(f'cannot parse declarator "{decl}"')
    return m.group(1), bool(m.group(2))


def parse_members(body, prefix=''):
    """Member designators of a struct/union body, in order.  Anonymous
    unions/structs contribute their members directly; a named nested one
    contributes itself and its members (`u.a`, or `u[0].a` for an array)."""
    members = []
    for decl in split_top(body, ';'):
        decl = decl.strip()
        if '{' in decl:
            m = re.match(r'^(?:struct|union)\s*\w*\s*\{', decl)
            if not m:
                raise Unsupported(f'cannot parse member "{decl[:40]}..."')
            start = m.end() - 1
            end = matching_brace(decl, start)
            inner, names = decl[start + 1:end], decl[end + 1:].strip()
            if not names:
                members += parse_members(inner, prefix)
                continue
            for d in split_top(names, ','):
                name, is_array = declarator_name(d)
                members.append(prefix + name)
                sub = prefix + name + ('[0]' if is_array else '') + '.'
                members += parse_members(inner, sub)
            continue
        parts = split_top(decl, ',')
        first = re.match(r'^(.*?)([\s*]+\w+\s*(?:\[[^\]]*\]\s*)*)$', parts[0])
        if not first:
            raise Unsupported(f'cannot parse member "{decl}"')
        for d in [first.group(2)] + parts[1:]:
            members.append(prefix + declarator_name(d)[0])
    return members


def parse_structs(text):
    """{struct name: [member designators]}, in order of definition."""
    text = strip_comments(text)
    text = re.sub(r'^\s*#.*?(?<!\\)$', ' ', text, flags=re.M | re.S)
    structs = {}
    for m in re.finditer(r'\bstruct\s+(\w+)\s*\{', text):
        end = matching_brace(text, m.end() - 1)
        structs[m.group(1)] = parse_members(text[m.end():end])
    return structs


def macro_names(text):
    """Names of the macros the header itself #defines, in order."""
    text = strip_comments(text)
    names = []
    for m in re.finditer(r'^\s*#\s*define\s+(\w+)', text, flags=re.M):
        if m.group(1) not in names:
            names.append(m.group(1))
    return names


# ---- C programs ------------------------------------------------------------

def run(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def value_macros(cc, tmp, header, text):
    """{name: 'int' | 'str'}: the header's macros that have a value, as
    the preprocessor sees them in C.  Skipped: function-like macros, empty
    ones (include guards) and aliases of something that is not one of the
    header's macros (e.g. KVMX_FHA_ASSERT -> _Static_assert)."""
    src = os.path.join(tmp, 'macros.c')
    with open(src, 'w') as f:
        f.write(PRELUDE + f'#include "{header}"\n')
    r = run([cc, '-E', '-dM', src])
    if r.returncode:
        raise Unsupported(f'cc -E -dM failed:\n{r.stderr}')
    defs = {}
    for line in r.stdout.splitlines():
        m = re.match(r'#define (\w+)(\(?)\s*(.*)$', line)
        if m:
            defs[m.group(1)] = (m.group(2) == '(', m.group(3).strip())
    own = macro_names(text)
    out = {}
    for name in own:
        if name not in defs:
            continue            # #defined under a condition not taken
        funclike, value = defs[name]
        if funclike or not value:
            continue
        if re.fullmatch(r'[A-Za-z_]\w*', value) and value not in own:
            continue
        out[name] = 'str' if value.startswith('"') else 'int'
    return out


DUMP_HELPERS = r'''
static void dump_str(const char *name, const char *s, size_t size)
{
    printf("macro %s = \"", name);
    for (size_t i = 0; i + 1 < size; i++) {
        unsigned char c = s[i];
        if (c >= 0x20 && c < 0x7f && c != '"' && c != '\\') {
            putchar(c);
        } else {
            printf("\\x%02x", c);
        }
    }
    printf("\"\n");
}
#define DUMP_INT(name, x) do { \
    if ((x) * 0 - 1 < 0) { \
        printf("macro %s = %lld (signed, %zu bytes)\n", name, \
               (long long)(x), sizeof(x)); \
    } else { \
        printf("macro %s = %#llx (unsigned, %zu bytes)\n", name, \
               (unsigned long long)(x), sizeof(x)); \
    } \
} while (0)
'''


def dump(cc, tmp, header, text):
    """Run a program compiled against `header` alone; returns its lines."""
    structs = parse_structs(text)
    macros = value_macros(cc, tmp, header, text)
    c = [PRELUDE, f'#include "{header}"\n', DUMP_HELPERS,
         'int main(void)\n{\n']
    for s, members in structs.items():
        c.append(f'    printf("struct {s} size %zu align %zu\\n", '
                 f'sizeof(struct {s}), _Alignof(struct {s}));\n')
        for mem in members:
            c.append(f'    printf("member {s}.{mem} offset %zu size %zu\\n", '
                     f'offsetof(struct {s}, {mem}), '
                     f'sizeof(((struct {s} *)0)->{mem}));\n')
    for name, kind in macros.items():
        if kind == 'str':
            c.append(f'    dump_str("{name}", {name}, sizeof({name}));\n')
        else:
            c.append(f'    DUMP_INT("{name}", {name});\n')
    c.append('    return 0;\n}\n')
    src, exe = os.path.join(tmp, 'dump.c'), os.path.join(tmp, 'dump')
    with open(src, 'w') as f:
        f.write(''.join(c))
    r = run([cc, '-std=gnu11', '-w', '-o', exe, src])
    if r.returncode:
        raise Unsupported(f'compiling against {header} failed:\n{r.stderr}')
    r = run([exe])
    if r.returncode:
        raise Unsupported(f'{exe} failed: {r.stderr}')
    return r.stdout.splitlines()


def keyed(lines):
    """'member s.m offset 0 size 4' -> {'member s.m': 'offset 0 size 4'}"""
    out = {}
    for line in lines:
        if line.startswith('macro '):
            k, v = line.split(' = ', 1)
        else:
            kind, name, v = line.split(' ', 2)
            k = f'{kind} {name}'
        out[k] = v
    return out


def compare(cc, name, ours_text, copy_text, copy_label):
    with tempfile.TemporaryDirectory() as tmp:
        os.mkdir(os.path.join(tmp, 'kvmx'))
        os.mkdir(os.path.join(tmp, 'copy'))
        ours_h = os.path.join(tmp, 'kvmx', name)
        copy_h = os.path.join(tmp, 'copy', name)
        for path, text in ((ours_h, ours_text), (copy_h, copy_text)):
            with open(path, 'w') as f:
                f.write(text)
        try:
            ours = keyed(dump(cc, os.path.join(tmp, 'kvmx'), ours_h,
                              ours_text))
            copy = keyed(dump(cc, os.path.join(tmp, 'copy'), copy_h,
                              copy_text))
        except Unsupported as e:
            print(f'FAIL: {name}: {e}')
            return 1
    diffs = []
    for k, v in ours.items():
        if k not in copy:
            diffs.append(f'{k}: missing in {copy_label} '
                         f'(include/kvmx/{name}: {v})')
        elif copy[k] != v:
            diffs.append(f'{k}: include/kvmx/{name}: {v}; '
                         f'{copy_label}: {copy[k]}')
    for k, v in copy.items():
        if k not in ours:
            diffs.append(f'{k}: in {copy_label} ({v}) but not in '
                         f'include/kvmx/{name}')
    if diffs:
        print(f'FAIL: {copy_label} does not have the layout of '
              f'include/kvmx/{name}:')
        for d in diffs:
            print(f'  {d}')
        return 1
    count = {kind: sum(k.startswith(kind + ' ') for k in ours)
             for kind in ('struct', 'member', 'macro')}
    print(f'ok: {copy_label} has the layout of include/kvmx/{name} '
          f'({count["struct"]} structs, {count["member"]} members, '
          f'{count["macro"]} macros)')
    return 0


def parse_copies(specs):
    copies = {}
    for spec in specs:
        name, sep, path = spec.partition('=')
        if not sep or name not in HEADERS:
            sys.exit(f'bad copy "{spec}": want NAME=PATH, NAME one of '
                     + ', '.join(HEADERS))
        copies[name] = path
    return copies


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--copy', action='append', default=[],
                    metavar='NAME=PATH',
                    help='check PATH instead of the copy in the series')
    args = ap.parse_args()
    env = os.environ.get('KVMX_ABI_COPY', '')
    copies = parse_copies([s for s in env.split(',') if s] + args.copy)

    cc = shutil.which('cc')
    if not cc:
        print('SKIP: no C compiler (cc) in PATH to evaluate the headers')
        return 77

    series = [ln.strip() for ln in open(os.path.join(PATCHES, 'series'))
              if ln.strip() and not ln.startswith('#')]
    rc = 0
    for name, target in HEADERS.items():
        ours = open(os.path.join(ROOT, 'include', 'kvmx', name)).read()
        if name in copies:
            text, label = open(copies[name]).read(), f'{copies[name]}'
        else:
            text, patch = copy_from_series(series, target)
            if text is None:
                print(f'FAIL: {patch}')
                rc = 1
                continue
            label = f'{target} ({patch})'
        rc = max(rc, compare(cc, name, ours, text, label))
    return rc


if __name__ == '__main__':
    sys.exit(main())
