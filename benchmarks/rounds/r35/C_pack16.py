"""Round 35, helper C: goal 5's 16-bit pack rows, one family at a time, alternated with zstd -3 -T2.

    python benchmarks/rounds/r35/C_pack16.py --rounds 5 [--dtypes float16,bfloat16,float32] [--sha]

Packs the float16/bfloat16 copies of perf.py's family (base + 4, perf.make_cast_family) in fresh
processes (the library on PYTHONPATH, default this checkout; --other adds a second checkout,
alternated), alternated with zstd over the same files; prints medians, per-round ratios and the
CPU seconds of each side (the pack's own, measured in its process; zstd's as a child's).
--sha prints each archive's SHA-256 (the archive must not change with a speed fix).
"""
from __future__ import annotations

import argparse
import hashlib
import resource
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))
import perf  # noqa: E402

CHILD = r"""
import json, resource, sys, time
import torch
import tallpack
base, out, tasks, threads = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])
r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
tallpack.pack(base, tasks, out, codec="planes", threads=threads, overwrite=True)
t1, r1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
cpu = r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime
print(json.dumps({"seconds": t1 - t0, "cpu": cpu, "tallpack": tallpack.__file__}))
"""


def pack(cf: dict, out: Path, pythonpath: str, threads: int) -> dict:
    env = {**os.environ, "PYTHONPATH": pythonpath}
    tasks = {t: str(p) for t, p in cf["tasks"].items()}
    done = subprocess.run([sys.executable, "-c", CHILD, str(cf["base"]), str(out), json.dumps(tasks), str(threads)],
                          capture_output=True, text=True, env=env, cwd="/", check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dtypes", default="float16,bfloat16")
    ap.add_argument("--other", default="")
    ap.add_argument("--this", default=str(REPO))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sha", action="store_true")
    a = ap.parse_args()
    fam = perf.make_family(REPO / "benchmarks" / "out", 26e6, perf.CAST_TASKS, 0)
    sides = {"this": a.this, **({"other": a.other} if a.other else {})}
    with tempfile.TemporaryDirectory(dir=REPO / "benchmarks" / "out") as tmp:
        for dtype in a.dtypes.split(","):
            if dtype == "float32":
                cf = {"base": fam["base"], "tasks": {t: fam["tasks"][t] for t in list(fam["tasks"])[:perf.CAST_TASKS]}}
            else:
                cf = perf.make_cast_family(fam, dtype)
            files = [Path(cf["base"]), *map(Path, cf["tasks"].values())]
            perf.warm(files)
            t: dict[str, list[float]] = {s: [] for s in sides} | {"zstd": []}
            cpu: dict[str, list[float]] = {s: [] for s in sides} | {"zstd": []}
            for i in range(a.rounds):
                order = list(sides) if i % 2 == 0 else list(sides)[::-1]
                for s in order:
                    r = pack(cf, Path(tmp) / f"{s}.tallpack", sides[s], a.threads)
                    t[s].append(r["seconds"])
                    cpu[s].append(r["cpu"])
                (Path(tmp) / "z").mkdir(exist_ok=True)
                c0, z0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
                subprocess.run(["zstd", "-3", f"-T{a.threads}", "-q", "-f", "--output-dir-flat", str(Path(tmp) / "z"),
                                *map(str, files)], check=True)
                t["zstd"].append(time.perf_counter() - z0)
                c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
                cpu["zstd"].append(c1.ru_utime + c1.ru_stime - c0.ru_utime - c0.ru_stime)
            zm = statistics.median(t["zstd"])
            line = [f"{dtype}: zstd {zm:.3f} s (cpu {statistics.median(cpu['zstd']):.2f} s)"]
            for s in sides:
                ratios = [x / z for x, z in zip(t[s], t["zstd"])]
                line.append(f"{s} {statistics.median(t[s]):.3f} s = {statistics.median(t[s]) / zm:.2f}x "
                            f"(per-round median {statistics.median(ratios):.2f}x, best {min(t[s]) / min(t['zstd']):.2f}x; "
                            f"cpu {statistics.median(cpu[s]):.2f} s)")
                if a.sha:
                    line.append(f"{s} sha256 {hashlib.sha256((Path(tmp) / f'{s}.tallpack').read_bytes()).hexdigest()[:16]}")
            print("; ".join(line), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
