"""What writing fresh memory costs, by who allocates it: torch's allocator, numpy's (which advises
transparent huge pages from 4 MiB), and ``tallpack.memory.empty`` (numpy's, the advice withdrawn).

Each sample is a fresh process that allocates the tensors of one 26M-parameter member (float32:
an 8000x512 embedding, and 7 layers of four 512x512, two 2048x512 and a 512 norm; 104 MB) and
fills them, timing only that; the three ways alternate, medians of ``--repeats``. Prints a markdown table (BENCHMARKS.md, sixth
performance round) and the kernel's THP settings, which decide the result.

    python benchmarks/fresh_pages.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SIZES = [8000 * 512] + [512 * 512] * 28 + [2048 * 512] * 14 + [512] * 7  # perf.py's member, 7 layers
WAYS = {"torch": "torch.empty", "numpy": "numpy.empty (huge-page advice)", "tallpack": "tallpack.memory.empty"}


def child(way: str) -> None:
    import resource

    import numpy as np
    import torch

    from tallpack import memory

    def alloc(n: int) -> torch.Tensor:
        if way == "torch":
            return torch.empty(n)
        raw = np.empty(n * 4, np.uint8) if way == "numpy" else memory.empty(n * 4)
        return torch.from_numpy(raw.view(np.float32))

    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t0 = time.perf_counter()
    kept = [alloc(n).fill_(0.5) for n in SIZES]
    dt = time.perf_counter() - t0
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    print(json.dumps({"seconds": dt, "faults": faults, "n": len(kept)}))


def thp() -> str:
    out = []
    for name in ("enabled", "defrag"):
        try:
            out.append(f"{name}: {Path(f'/sys/kernel/mm/transparent_hugepage/{name}').read_text().strip()}")
        except OSError:
            out.append(f"{name}: unknown")
    return "; ".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a.child)
        return
    runs: dict[str, list[dict]] = {w: [] for w in WAYS}
    ways = list(WAYS)
    for i in range(a.repeats):  # the order turned every repeat, so no way always runs first
        for way in ways[i % len(ways):] + ways[: i % len(ways)]:
            out = subprocess.run([sys.executable, __file__, "--child", way], stdout=subprocess.PIPE, text=True,
                                 check=True, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
            runs[way].append(json.loads(out.stdout))
    base = statistics.median(r["seconds"] for r in runs["torch"])
    print(f"Transparent huge pages: {thp()}. {sum(SIZES) * 4 / 1e6:.0f} MB in {len(SIZES)} tensors, "
          f"medians of {a.repeats} fresh processes.\n")
    print("| allocator | fill time | against torch.empty | minor faults |")
    print("|---|---:|---:|---:|")
    for way, label in WAYS.items():
        sec = statistics.median(r["seconds"] for r in runs[way])
        faults = statistics.median(r["faults"] for r in runs[way])
        print(f"| {label} | {sec * 1e3:.1f} ms | {sec / base:.2f}x | {faults:,.0f} |")


if __name__ == "__main__":
    main()
