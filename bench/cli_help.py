"""`catneuron <command> --help` wall time, process start included, as a user waits for it.

Each subcommand's help is run `--repeat` times as a fresh `catneuron` process (the
console script of this venv, or `python -m catneuron` where it is missing); the median
and the slowest are printed beside `python -c pass` (the interpreter's own start) and the
load average. With `--importtime`, the slowest subcommand's five largest top-level imports
(from `python -X importtime`) follow, to say where the time went.

    python bench/cli_help.py --repeat 5 --importtime

Target: every subcommand < 0.5 s.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from catneuron.cli import SUBCOMMANDS  # noqa: E402  (the dispatcher imports nothing heavy)

TARGET_S = 0.5


def catneuron_command() -> list[str]:
    script = Path(sys.executable).with_name("catneuron")
    if script.exists():
        return [str(script)]
    found = shutil.which("catneuron")
    return [found] if found else [sys.executable, "-m", "catneuron"]


def wall(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(
        command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT
    )
    return time.perf_counter() - start


def top_imports(command: list[str], n: int = 5) -> list[tuple[str, float]]:
    """The `n` largest top-level imports (cumulative seconds) of one `--help` run."""
    run = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "catneuron", *command],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    rows = []
    for line in run.stderr.splitlines():
        m = re.match(r"import time:\s+\d+ \|\s+(\d+) \| (\S.*)$", line)
        if m and not m.group(2).startswith(" "):
            rows.append((m.group(2).strip(), int(m.group(1)) / 1e6))
    return sorted(rows, key=lambda r: -r[1])[:n]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=5, help="runs per subcommand (median reported)")
    p.add_argument("--importtime", action="store_true", help="top imports of the slowest one")
    args = p.parse_args(argv)
    base = catneuron_command()
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"load average (1, 5, 15 min): {load}")
    bare = statistics.median(wall([sys.executable, "-c", "pass"]) for _ in range(args.repeat))
    print(f"{'python -c pass':<24} median {bare:6.3f} s")
    worst: tuple[float, str] = (0.0, "")
    failed = []
    for name in ["--help", *SUBCOMMANDS]:
        command = [name] if name == "--help" else [name, "--help"]
        times = [wall(base + command) for _ in range(args.repeat)]
        med = statistics.median(times)
        verdict = "ok" if med < TARGET_S else "SLOW"
        if med >= TARGET_S:
            failed.append(name)
        label = "catneuron " + " ".join(command)
        print(f"{label:<24} median {med:6.3f} s  max {max(times):6.3f} s  {verdict}")
        if med > worst[0]:
            worst = (med, name)
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.importtime and worst[1]:
        command = [worst[1]] if worst[1] == "--help" else [worst[1], "--help"]
        print(f"largest top-level imports of catneuron {' '.join(command)}:")
        for module, seconds in top_imports(command):
            print(f"  {module:<32} {seconds:6.3f} s")
    print(f"target < {TARGET_S} s: {'met' if not failed else 'missed by ' + ', '.join(failed)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
