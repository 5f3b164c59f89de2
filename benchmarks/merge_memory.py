"""Peak memory of writing a merged model, against unpacking one task of the same archive, in the
same run (and, with ``--other``, against another checkout's merge: before/after a change).

    python benchmarks/merge_memory.py [--params 100e6] [--tasks 4] [--dtype bfloat16] [--other /tmp/old]

Each write runs in a fresh process (``cwd=/``, the checkout on PYTHONPATH), torch imported before
the baseline; RssAnon (``/proc/self/status``: the mapped archive's pages are not counted) sampled
every 2 ms by a thread. Reports each peak over the baseline, the largest tensor and the model's
bytes, medians of ``--rounds`` runs alternated. Numbers go in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from pack_scale import make_family  # noqa: E402

CHILD = textwrap.dedent("""
    import gc, json, sys, threading, time, tallpack, torch
    def anon():
        return int(open("/proc/self/status").read().split("RssAnon:")[1].split()[0]) * 1024
    archive, out, what = sys.argv[1:4]
    fam = tallpack.open(archive, cache_bytes=0)
    gc.collect(); before = anon(); peak = [before]; done = []
    def sample():
        while not done:
            peak[0] = max(peak[0], anon()); time.sleep(0.002)
    th = threading.Thread(target=sample); th.start()
    t0 = time.perf_counter()
    if what == "merge":
        tallpack.write_merged(fam, out, alpha=0.5, overwrite=True)
    else:
        tallpack.write_task(fam, fam.tasks[0], out, overwrite=True)
    dt = time.perf_counter() - t0
    done.append(1); th.join()
    print(json.dumps({"grown": peak[0] - before, "seconds": dt, "file": tallpack.__file__}))
""")


def run(checkout: Path, archive: Path, out: Path, what: str) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(checkout), str(checkout / "cli")])}
    r = subprocess.run([sys.executable, "-c", CHILD, str(archive), str(out), what], capture_output=True,
                       text=True, env=env, cwd="/", check=True)
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["file"].startswith(str(checkout)), (got["file"], checkout)  # the checkout meant, not another
    return got


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=float, default=100e6)
    ap.add_argument("--tasks", type=int, default=4)
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--other", type=lambda s: Path(s).resolve(), help="another checkout (built in place)")
    a = ap.parse_args()
    here = HERE.parent
    with tempfile.TemporaryDirectory(dir=HERE / "out" if (HERE / "out").is_dir() else None) as tmp:
        root = Path(tmp)
        (root / "fam").mkdir()
        base, tasks, largest = make_family(root / "fam", a.params, a.tasks, getattr(torch, a.dtype))
        archive = root / "f.tallpack"
        import tallpack
        tallpack.pack(base, tasks, archive)
        model = base.stat().st_size
        runs: dict[str, list[dict]] = {}
        kinds = [("merge", here, "merge"), ("unpack", here, "unpack")]
        if a.other:
            kinds.append(("merge, other checkout", a.other, "merge"))
        for _ in range(a.rounds):
            for label, checkout, what in kinds:
                runs.setdefault(label, []).append(run(checkout, archive, root / "out", what))
    mb = 1 << 20
    print(f"family: {a.params:.3g} parameters, {a.dtype}, base + {a.tasks}; model {model / mb:.1f} MB, "
          f"largest tensor {largest / mb:.1f} MB; medians of {a.rounds}")
    unpack = statistics.median(r["grown"] for r in runs["unpack"])
    for label, rs in runs.items():
        grown = statistics.median(r["grown"] for r in rs)
        secs = statistics.median(r["seconds"] for r in rs)
        print(f"  {label:24s} peak RssAnon +{grown / mb:7.1f} MB ({grown / model:.2f}x the model, "
              f"{grown / largest:.1f}x the largest tensor, {grown / unpack:.2f}x unpack's) in {secs:.2f} s")


if __name__ == "__main__":
    main()
