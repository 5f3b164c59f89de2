"""Packing and loading on 1, 2, 4, ... threads, each beside its alternative on as many threads.

The performance issue asks for packing faster than ``zstd -3 -T2`` and loading near memory
speed "on every core". This run packs the goals' float32 family (base + 8, built by
``perf.make_family`` if missing) with ``threads=n`` alternated with ``zstd -3 -Tn`` over the same
files (python-zstandard with n threads where the command is missing), and loads one member (``tallpack.open(threads=n).state_dict``, fresh process) alternated
with ``load_file`` + clone, for each n (torch limited to n threads in every child, both sides) up to the machine's cores. Prints a markdown table: each
side's median seconds, their ratio, and each side's speed-up over its own one-thread time.

    python benchmarks/cores.py [--threads 1 2 4 8 16] [--rounds 3] [--out benchmarks/out]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

PACK = r"""
import gc, json, sys, time
import torch  # imported before timing
import tallpack
base, out, tasks, threads = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(threads)  # torch's own arithmetic on n threads too, as zstd -Tn
gc.collect()
t0 = time.perf_counter()
tallpack.pack(base, tasks, out, codec="planes", level=3, threads=threads, overwrite=True)
print(json.dumps({"seconds": time.perf_counter() - t0}))
"""

LOAD = r"""
import gc, json, sys, time
import torch
kind, path, task, threads = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
torch.set_num_threads(threads)  # both sides: load_file's clone on n threads, as tallpack's work
if kind == "st":
    from safetensors.torch import load_file
    gc.collect()
    t0 = time.perf_counter()
    sd = {k: v.clone() for k, v in load_file(path).items()}
else:
    import tallpack
    gc.collect()  # the import's debt of the collector, on both sides (perf.py's _settle)
    t0 = time.perf_counter()
    with tallpack.open(path, threads=threads) as fam:
        sd = fam.state_dict(task)
print(json.dumps({"seconds": time.perf_counter() - t0}))
"""


def child(code: str, *args: str) -> float:
    env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ}  # both sides alike (perf.OMP_WAIT says why)
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True, cwd="/",
                          env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])["seconds"]


ZSTD_LIB = r"""
import sys, time, zstandard
out, threads, files = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
t0 = time.perf_counter()
for f in files:  # as the command line does: one .zst a file, level 3, n worker threads
    with open(f, "rb") as src, open(f"{out}/{f.rsplit('/', 1)[-1]}.zst", "wb") as dst:
        zstandard.ZstdCompressor(level=3, threads=threads).copy_stream(src, dst)
print(time.perf_counter() - t0)
"""


def zstd(files: list[Path], outdir: Path, threads: int) -> float:
    """``zstd -3 -Tn`` over ``files``; where the command line tool is missing (the device
    machines), the same through python-zstandard's ``ZstdCompressor(level=3, threads=n)``."""
    shutil.rmtree(outdir, ignore_errors=True)
    outdir.mkdir(parents=True)
    if shutil.which("zstd") is None:
        done = subprocess.run([sys.executable, "-c", ZSTD_LIB, str(outdir), str(threads), *map(str, files)],
                              capture_output=True, text=True, check=True)
        return float(done.stdout.strip())
    t0 = time.perf_counter()
    subprocess.run(["zstd", "-3", f"-T{threads}", "-q", "-f", "--output-dir-flat", str(outdir), *map(str, files)],
                   check=True)
    return time.perf_counter() - t0


def main() -> None:
    cores = os.cpu_count() or 1
    default = [n for n in (1, 2, 4, 8, 16, 32, 64) if n <= cores] or [1]
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, nargs="+", default=default)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--params", type=float, default=26e6)
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--out", type=Path, default=HERE / "out")
    a = ap.parse_args()
    zstd_label = "zstd -3 -Tn" if shutil.which("zstd") else "zstandard level 3, n threads"
    from perf import make_family, warm

    fam = make_family(a.out, a.params, a.tasks)
    work = a.out / "cores-work"
    work.mkdir(parents=True, exist_ok=True)
    files = [fam["base"], *fam["tasks"].values()]
    tasks = {t: str(p) for t, p in fam["tasks"].items()}
    archive = work / "cores.tallpack"
    original = work / "alt-task1.safetensors"
    shutil.copyfile(fam["tasks"]["task1"], original)  # written in this run, as the archive is
    rows = []
    for n in a.threads:
        warm(files)
        os.sync()
        packs, zs, ours, theirs = [], [], [], []
        for r in range(a.rounds):  # alternated, the order swapped every round
            for side in (("pack", "zstd") if r % 2 == 0 else ("zstd", "pack")):
                os.sync()
                if side == "pack":
                    packs.append(child(PACK, str(fam["base"]), str(archive), json.dumps(tasks), str(n)))
                else:
                    zs.append(zstd(files, work / "zstd", n))
        warm([archive, original])
        for r in range(a.rounds):
            for side in (("tp", "st") if r % 2 == 0 else ("st", "tp")):
                if side == "tp":
                    ours.append(child(LOAD, "tp", str(archive), "task1", str(n)))
                else:
                    theirs.append(child(LOAD, "st", str(original), "task1", str(n)))
        row = {"threads": n, "pack": statistics.median(packs), "zstd": statistics.median(zs),
               "load": statistics.median(ours), "load_file": statistics.median(theirs),
               "samples": {"pack": packs, "zstd": zs, "load": ours, "load_file": theirs}}
        rows.append(row)
        print(f"threads {n}: pack {row['pack']:.2f} s, zstd {row['zstd']:.2f} s, "
              f"load {row['load'] * 1e3:.0f} ms, load_file + clone {row['load_file'] * 1e3:.0f} ms", flush=True)
    (a.out / "cores.json").write_text(json.dumps({"cores": cores, "rows": rows}, indent=1))
    first = rows[0]
    print(f"\n{cores} cores; float32 family of {fam['params'] / 1e6:.1f}M parameters a member, base + {a.tasks}; "
          f"medians of {a.rounds}, alternated\n")
    print(f"| threads | pack | {zstd_label} | pack / zstd | pack speed-up | zstd speed-up "
          "| state_dict | load_file + clone | ratio | state_dict speed-up |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['threads']} | {r['pack']:.2f} s | {r['zstd']:.2f} s | {r['pack'] / r['zstd']:.2f}x "
              f"| {first['pack'] / r['pack']:.2f}x | {first['zstd'] / r['zstd']:.2f}x "
              f"| {r['load'] * 1e3:.0f} ms | {r['load_file'] * 1e3:.0f} ms | {r['load'] / r['load_file']:.2f}x "
              f"| {first['load'] / r['load']:.2f}x |")


if __name__ == "__main__":
    main()
