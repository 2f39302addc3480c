"""What the benchmark runners share: a description of the machine, and
writing results/<stamp>.{json,txt,png} next to the runner."""
import datetime
import json
import os
import platform
import re
import sys


def machine_info():
    cpu = ''
    for line in open('/proc/cpuinfo'):
        if line.startswith('model name'):
            cpu = line.split(':', 1)[1].strip()
            break
    return {'cpu': cpu, 'cores': os.cpu_count(), 'kernel': platform.release(),
            'hw_virt': bool(re.search(r'\b(vmx|svm)\b',
                                      open('/proc/cpuinfo').read()))}


def new_results(**extra):
    """The common head of a results dict: machine, command line, date."""
    return {'machine': machine_info(), 'command': ' '.join(sys.argv),
            'date': datetime.datetime.utcnow().isoformat(timespec='seconds'),
            **extra}


def save(res, here, report, plot, name=None):
    """Write here/results/<stamp>.json, .txt (report(res)) and .png
    (plot(res, path)); print the report and where it went.  name: a
    prefix (<name>-<stamp>.*) for directories shared by several runners."""
    outdir = os.path.join(here, 'results')
    os.makedirs(outdir, exist_ok=True)
    stamp = res['date'].replace(':', '')
    if name:
        stamp = f'{name}-{stamp}'
    with open(os.path.join(outdir, f'{stamp}.json'), 'w') as f:
        json.dump(res, f, indent=1)
    text = report(res)
    with open(os.path.join(outdir, f'{stamp}.txt'), 'w') as f:
        f.write(text + '\n')
    plot(res, os.path.join(outdir, f'{stamp}.png'))
    print(text)
    rel = os.path.relpath(outdir, os.path.dirname(os.path.dirname(here)))
    print(f'\nresults: {rel}/{stamp}.{{json,txt,png}}')
