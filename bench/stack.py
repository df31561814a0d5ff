"""The local stack's start-up time per component and its idle memory.

    .venv/bin/python bench/stack.py [--idle 30] [--json PATH]

Starts `dagster-taskiq-demo up` (free ports, a fresh database), reads each component's start-up
time from its summary table, lets it idle (the auto-scaler keeps 0 workers), then sums the PSS of
each component's process tree (a process shared by two trees counts once) and stops it.
"""

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from harness import SERVER_URL, machine, write_json
from memory import _pss_kb, descendants

from dagster_taskiq_demo.emulator import free_port
from dagster_taskiq_demo.stack import create_database, drop_database, wait_for

ROW = re.compile(r'^│ (\S+)\s+│[^│]*│ (\d+)\s+│ ([\d.]+) s')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--idle', type=float, default=30.0, help='seconds idle before measuring')
    parser.add_argument('--json', type=Path)
    options = parser.parse_args()
    name = f'bench_stack_{uuid.uuid4().hex[:8]}'
    database_url = create_database(SERVER_URL, name)
    with tempfile.TemporaryDirectory() as folder:
        output = Path(folder) / 'up.out'
        command = [str(Path(sys.executable).with_name('dagster-taskiq-demo')), 'up']
        ports = ['--moto-port', str(free_port()), '--webserver-port', str(free_port())]
        env = {**os.environ, 'DATABASE_URL': database_url, 'COLUMNS': '200'}
        with output.open('wb') as out:
            up = subprocess.Popen(
                [*command, '--data-dir', f'{folder}/data', *ports],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
            )
        try:
            started = time.monotonic()
            wait_for(lambda: 'Ctrl-C stops' in output.read_text(), 300, 'the stack up')
            up_s = time.monotonic() - started
            rows = [ROW.match(line) for line in output.read_text().splitlines()]
            components = {m.group(1): (int(m.group(2)), float(m.group(3))) for m in rows if m}
            time.sleep(options.idle)  # the measured state: idle, not a wait on a condition
            counted: set[int] = set()
            figures: dict[str, Any] = {'machine': machine(), 'up_s': up_s, 'components': {}}
            for component, (pid, start_s) in components.items():
                tree = [p for p in descendants(pid) if p not in counted]
                counted.update(tree)
                pss_mb = sum(_pss_kb(p) for p in tree) / 1024
                figures['components'][component] = {
                    'start_s': start_s,
                    'processes': len(tree),
                    'pss_mb': pss_mb,
                }
            figures['up_process_pss_mb'] = _pss_kb(up.pid) / 1024
        finally:
            up.send_signal(signal.SIGTERM)
            up.wait(timeout=180)
            drop_database(SERVER_URL, name)
    print(f'stack up in {up_s:.1f} s (summary printed); idle {options.idle:.0f} s; {machine()}')
    print(f'{"component":<18} {"start s":>8} {"processes":>9} {"PSS MB":>8}')
    for component, figure in figures['components'].items():
        print(
            f'{component:<18} {figure["start_s"]:>8.1f} {figure["processes"]:>9}'
            f' {figure["pss_mb"]:>8.0f}'
        )
    total = sum(f['pss_mb'] for f in figures['components'].values())
    total += figures['up_process_pss_mb']
    print(f'{"up (supervisor)":<18} {"":>8} {1:>9} {figures["up_process_pss_mb"]:>8.0f}')
    print(f'{"total":<18} {"":>8} {"":>9} {total:>8.0f}')
    if options.json:
        write_json(options.json, figures)


if __name__ == '__main__':
    main()
