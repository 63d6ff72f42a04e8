"""Import time of the torch-free reader modules, each in a fresh interpreter (issue 13 §3).

Prints, per module: median and min wall seconds over N runs of ``python -c "import M"`` (the
interpreter's own start-up measured alone and subtracted), and whether torch got imported;
the load average (``os.getloadavg``) before and after.

    .venv/bin/python benchmarks/import_time.py [--runs 7] [module ...]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

DEFAULT = ["reverie.reports", "reverie.reports.render", "reverie.stages.compare"]


def wall(code: str) -> float:
    """Seconds of one fresh ``python -c code`` (start-up included)."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("modules", nargs="*", default=DEFAULT)
    a = ap.parse_args()
    print(f"load average before: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}")
    base = [wall("pass") for _ in range(a.runs)]
    b = statistics.median(base)
    print(f"{'interpreter start-up':<28} median {b:.3f} s  min {min(base):.3f} s")
    for m in a.modules:
        ts = [wall(f"import {m}") for _ in range(a.runs)]
        torch = subprocess.run([sys.executable, "-c", f"import sys, {m}; print('torch' in sys.modules)"],
                               capture_output=True, text=True, check=True).stdout.strip()
        print(f"{m:<28} median {statistics.median(ts) - b:.3f} s  min {min(ts) - min(base):.3f} s  (start-up excluded)  torch imported: {torch}")
    print(f"load average after: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}")


if __name__ == "__main__":
    main()
