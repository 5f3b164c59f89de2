"""Head to head: this checkout's tallpack against another checkout's, packing the same family.

Each round packs, in fresh processes: with this checkout's library, with the other's (their order
alternating from round to round), and runs ``zstd -3 -T2`` over the same files. Prints medians,
and each library's median ratio to zstd over the rounds (a ratio per round, so a slow stretch of
the machine moves both sides). Also checks that both archives hold the same data area.

    git worktree add /tmp/old f90c82f && (cd /tmp/old && python setup.py build_ext --inplace)
    python benchmarks/perf.py                       # once: generates the family
    python benchmarks/ab_pack.py --other /tmp/old --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ab_load import print_sides

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
FAMILY = HERE / "out" / "family-h512-v8000-L7-s0-g1"

CHILD = r"""
import json, sys, time
import torch  # imported before timing, by both sides
import tallpack
base, out, tasks = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
t0 = time.perf_counter()
tallpack.pack(base, tasks, out, codec="planes", level=3, threads=2, overwrite=True)
print(json.dumps({"seconds": time.perf_counter() - t0, "tallpack": tallpack.__file__}))
"""


def pack(base: Path, tasks: dict[str, str], out: Path, pythonpath: str) -> dict:
    env = {**os.environ, "PYTHONPATH": pythonpath}
    done = subprocess.run([sys.executable, "-c", CHILD, str(base), str(out), json.dumps(tasks)],
                          capture_output=True, text=True, env=env, cwd="/", check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def zstd(files: list[Path], outdir: Path) -> float:
    exe = shutil.which("zstd")
    if exe is None:
        raise SystemExit("ab_pack.py needs the zstd command line tool")
    outdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    subprocess.run([exe, "-3", "-T2", "-q", "-f", "--output-dir-flat", str(outdir), *map(str, files)], check=True)
    return time.perf_counter() - t0


def data_area(path: Path) -> bytes:
    raw = path.read_bytes()
    return raw[: struct.unpack("<Q", raw[-32:-24])[0]]  # header and chunks: everything before the manifest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--other", type=lambda s: Path(s).resolve(), required=True, help="the other checkout (its compiled module built in place)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--family", type=lambda s: Path(s).resolve(), default=FAMILY, help="a folder of base.safetensors and task*.safetensors")
    a = ap.parse_args(argv)
    base = a.family / "base.safetensors"
    tasks = {p.stem: str(p) for p in sorted(a.family.glob("task*.safetensors"))}
    sides = {"this": str(REPO), "other": str(a.other.resolve())}
    times: dict[str, list[float]] = {"this": [], "other": [], "zstd": []}
    files = {}
    with tempfile.TemporaryDirectory(dir=HERE / "out") as tmp:
        outs = {side: Path(tmp) / f"{side}.tallpack" for side in sides}
        for i in range(a.rounds):
            for side in (("this", "other") if i % 2 == 0 else ("other", "this")):
                r = pack(base, tasks, outs[side], sides[side])
                times[side].append(r["seconds"])
                files[side] = r["tallpack"]
            times["zstd"].append(zstd([base, *map(Path, tasks.values())], Path(tmp) / "zst"))
        same = data_area(outs["this"]) == data_area(outs["other"])
    print(f"pack of {len(tasks)} tasks ({a.family.name}), {a.rounds} rounds; zstd -3 -T2: "
          f"{statistics.median(times['zstd']):.2f} s; data areas {'identical' if same else 'DIFFER'}")
    print_sides(times, files, "zstd", "zstd", unit="s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
