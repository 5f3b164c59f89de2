"""Round 35, helper C: goal 5's 16-bit pack rows, one family at a time, alternated with zstd -3 -T2.

    python benchmarks/rounds/r35/C_pack16.py --rounds 5 [--dtypes float16,bfloat16,float32] [--sha]

Packs the float16/bfloat16 copies of perf.py's family (base + 4, perf.make_cast_family) in fresh
processes (the library on PYTHONPATH, default this checkout; --other adds a second checkout,
alternated), alternated with zstd over the same files; prints medians and per-round ratios.
--sha prints each archive's SHA-256 (the archive must not change with a speed fix).
"""
from __future__ import annotations

import argparse
import hashlib
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
import json, sys, time
import torch
import tallpack
base, out, tasks, threads = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])
t0 = time.perf_counter()
tallpack.pack(base, tasks, out, codec="planes", threads=threads, overwrite=True)
print(json.dumps({"seconds": time.perf_counter() - t0, "tallpack": tallpack.__file__}))
"""


def pack(cf: dict, out: Path, pythonpath: str, threads: int) -> float:
    env = {**os.environ, "PYTHONPATH": pythonpath}
    tasks = {t: str(p) for t, p in cf["tasks"].items()}
    done = subprocess.run([sys.executable, "-c", CHILD, str(cf["base"]), str(out), json.dumps(tasks), str(threads)],
                          capture_output=True, text=True, env=env, cwd="/", check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])["seconds"]


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
            for i in range(a.rounds):
                order = list(sides) if i % 2 == 0 else list(sides)[::-1]
                for s in order:
                    t[s].append(pack(cf, Path(tmp) / f"{s}.tallpack", sides[s], a.threads))
                (Path(tmp) / "z").mkdir(exist_ok=True)
                z0 = time.perf_counter()
                subprocess.run(["zstd", "-3", f"-T{a.threads}", "-q", "-f", "--output-dir-flat", str(Path(tmp) / "z"),
                                *map(str, files)], check=True)
                t["zstd"].append(time.perf_counter() - z0)
            zm = statistics.median(t["zstd"])
            line = [f"{dtype}: zstd {zm:.3f} s"]
            for s in sides:
                ratios = [x / z for x, z in zip(t[s], t["zstd"])]
                line.append(f"{s} {statistics.median(t[s]):.3f} s = {statistics.median(t[s]) / zm:.2f}x "
                            f"(per-round median {statistics.median(ratios):.2f}x, best {min(t[s]) / min(t['zstd']):.2f}x)")
                if a.sha:
                    line.append(f"{s} sha256 {hashlib.sha256((Path(tmp) / f'{s}.tallpack').read_bytes()).hexdigest()[:16]}")
            print("; ".join(line), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
