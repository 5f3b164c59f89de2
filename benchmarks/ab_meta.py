"""Head to head: ``state_dict(task, device="meta")`` (a model's skeleton: shapes and dtypes) with
this checkout's tallpack against another checkout's, each in a fresh process with torch imported
before the clock starts, runs alternated; medians.

    python benchmarks/ab_meta.py --other /tmp/old --archive family.tallpack --task cars
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent

CODE = r"""
import sys, time
sys.path.insert(0, sys.argv[1])
import torch, tallpack
fam = tallpack.open(sys.argv[2])
t = time.perf_counter()
sd = fam.state_dict(sys.argv[3], device="meta")
print(time.perf_counter() - t)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--other", required=True, help="the other checkout (its compiled module built in place)")
    ap.add_argument("--archive", required=True)
    ap.add_argument("--task", required=True)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    times: dict[str, list[float]] = {"this": [], "other": []}
    sides = [("other", a.other), ("this", str(HERE))]
    for i in range(a.rounds):  # the order swapped every round
        for name, root in (sides if i % 2 == 0 else sides[::-1]):
            out = subprocess.run([sys.executable, "-c", CODE, root, a.archive, a.task], capture_output=True,
                                 text=True, check=True)
            times[name].append(float(out.stdout.strip().splitlines()[-1]))
    for name, v in times.items():
        print(f"{name:5s} median {statistics.median(v) * 1e3:9.2f} ms  ({', '.join(f'{x * 1e3:.1f}' for x in v)})")
    print(f"this / other: {statistics.median(times['this']) / statistics.median(times['other']):.4f}x")


if __name__ == "__main__":
    main()
