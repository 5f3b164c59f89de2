"""Head to head: opening an archive (``tallpack.open``) with this checkout's tallpack against another
checkout's: the open time (wall and CPU) and the memory the open archive holds, per task entry.
Each figure from a fresh process with tallpack imported before the clock starts, the two
checkouts alternated; medians. The archives are built here first (with this checkout) unless
they exist: one of 32 tasks x 2,000 ungrouped tensors of 16 elements (64,000 task entries,
``pack --no-group``) and an ordinary grouped one (8 tasks x 300 tensors, matrices and vectors).

    git worktree add -f /tmp/old HEAD && (cd /tmp/old && python setup.py build_ext --inplace)
    python benchmarks/ab_open.py --other /tmp/old
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent

BUILD = r"""
import sys
sys.path.insert(0, sys.argv[1])
import torch, tallpack
tasks, tensors, group, out = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "group", sys.argv[5]
g = torch.Generator().manual_seed(0)
if group:  # a small model's layers: matrices and their biases
    base = {f"layer.{i // 2}.{'weight' if i % 2 == 0 else 'bias'}": torch.randn((64, 64) if i % 2 == 0 else (64,),
            generator=g) for i in range(tensors)}
else:
    base = {f"layer.{i}.weight": torch.randn(16, generator=g) for i in range(tensors)}
fts = {f"t{k}": {n: v + 0.01 * torch.randn(v.shape, generator=g) for n, v in base.items()} for k in range(tasks)}
tallpack.pack(base, fts, out, group=group, progress=False, threads=2)
"""

MEASURE = r"""
import gc, sys, time, tracemalloc
sys.path.insert(0, sys.argv[1])
import torch, tallpack
path, mode = sys.argv[2], sys.argv[3]
if mode == "time":
    w, c = time.perf_counter(), time.process_time()
    fam = tallpack.open(path)
    print(time.perf_counter() - w, time.process_time() - c)
else:  # the bytes Python objects of the open archive hold, and the task entries
    tracemalloc.start()
    fam = tallpack.open(path)
    gc.collect()
    held = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    print(held, sum(len(e.tasks) for e in fam.manifest.tensors))
fam.close()
"""


def build(path: Path, tasks: int, tensors: int, group: bool) -> None:
    if not path.exists():
        print(f"building {path} ...", flush=True)
        subprocess.run([sys.executable, "-c", BUILD, str(HERE), str(tasks), str(tensors),
                        "group" if group else "flat", str(path)], check=True)


def run(root: str, archive: Path, mode: str) -> list[float]:
    out = subprocess.run([sys.executable, "-c", MEASURE, root, str(archive), mode], capture_output=True,
                         text=True, check=True)
    return [float(x) for x in out.stdout.split()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--other", required=True, help="the other checkout (its compiled module built in place)")
    ap.add_argument("--dir", default="/tmp/ab_open", help="where the archives are built (kept for later runs)")
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    folder = Path(a.dir)
    folder.mkdir(parents=True, exist_ok=True)
    archives = {"64,000 entries, --no-group": (folder / "many.tallpack", 32, 2000, False),
                "grouped, 8 x 300": (folder / "grouped.tallpack", 8, 300, True)}
    for path, *spec in archives.values():
        build(path, *spec)  # type: ignore[arg-type]
    roots = {"other": a.other, "this": str(HERE)}
    print(f"{'archive':28s} {'code':5s} {'wall ms':>9s} {'cpu ms':>9s} {'held MB':>9s} {'B/entry':>8s}")
    for label, (path, *_) in archives.items():
        wall: dict[str, list[float]] = {k: [] for k in roots}
        cpu: dict[str, list[float]] = {k: [] for k in roots}
        mem: dict[str, tuple[float, float]] = {}
        for i in range(a.rounds):  # the order swapped every round
            for name, root in (list(roots.items()) if i % 2 == 0 else list(roots.items())[::-1]):
                w, c = run(root, path, "time")
                wall[name].append(w)
                cpu[name].append(c)
        for name, root in roots.items():
            held, entries = run(root, path, "mem")
            mem[name] = (held, entries)
        for name in roots:
            held, entries = mem[name]
            print(f"{label:28s} {name:5s} {statistics.median(wall[name]) * 1e3:9.1f} "
                  f"{statistics.median(cpu[name]) * 1e3:9.1f} {held / 1e6:9.1f} {held / entries:8.0f}")
        print(f"{label:28s} this/other: wall {statistics.median(wall['this']) / statistics.median(wall['other']):.3f}x, "
              f"cpu {statistics.median(cpu['this']) / statistics.median(cpu['other']):.3f}x, "
              f"memory {mem['this'][0] / mem['other'][0]:.3f}x")


if __name__ == "__main__":
    main()
