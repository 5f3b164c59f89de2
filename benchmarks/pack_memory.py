"""Peak memory and time of packing a family whose largest tensors are too large to hold every
task's copy of at once (an LLM's embedding and MLP matrices), against ``zstd -3 -T2`` over the
same files in the same run (and, with ``--other``, against another checkout's pack: before/after
a change).

    python benchmarks/pack_memory.py [--params 200e6] [--hidden 2048] [--vocab 32000] [--tasks 4]
                                     [--dtype bfloat16] [--rounds 3] [--other /tmp/old]

Each pack runs in a fresh process (``cwd=/``, the checkout on PYTHONPATH), torch imported before
the baseline; RssAnon (``/proc/self/status``: page cache and mapped files are not counted)
sampled every 2 ms by a thread. The family's files are read once before the first round (page
cache warm for every side). Reports each side's median peak over the baseline, against the
largest tensor, and its median time against zstd's of the same round. Numbers go in
BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from pack_scale import make_family  # noqa: E402

CHILD = textwrap.dedent("""
    import gc, json, sys, threading, time, torch, tallpack
    def anon():
        return int(open("/proc/self/status").read().split("RssAnon:")[1].split()[0]) * 1024
    base, out, tasks = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    gc.collect(); before = anon(); peak = [before]; done = []
    def sample():
        while not done:
            peak[0] = max(peak[0], anon()); time.sleep(0.002)
    th = threading.Thread(target=sample); th.start()
    t0 = time.perf_counter()
    tallpack.pack(base, tasks, out, threads=2, overwrite=True)
    dt = time.perf_counter() - t0
    done.append(1); th.join()
    print(json.dumps({"grown": peak[0] - before, "seconds": dt, "file": tallpack.__file__}))
""")


def pack(checkout: Path, base: Path, tasks: dict[str, Path], out: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(checkout), str(checkout / "cli")])}
    r = subprocess.run([sys.executable, "-c", CHILD, str(base), str(out), json.dumps({k: str(v) for k, v in tasks.items()})],
                       capture_output=True, text=True, env=env, cwd="/", check=True)
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["file"].startswith(str(checkout)), (got["file"], checkout)  # the checkout meant, not another
    got["size"] = out.stat().st_size
    return got


def zstd(files: list[Path], outdir: Path) -> float:
    exe = shutil.which("zstd")
    if exe is None:
        raise SystemExit("pack_memory.py needs the zstd command line tool")
    outdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    subprocess.run([exe, "-3", "-T2", "-q", "-f", "--output-dir-flat", str(outdir), *map(str, files)], check=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=float, default=200e6)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--tasks", type=int, default=4)
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--other", type=lambda s: Path(s).resolve(), help="another checkout (built in place)")
    a = ap.parse_args()
    here = HERE.parent
    with tempfile.TemporaryDirectory(dir=HERE / "out" if (HERE / "out").is_dir() else None) as tmp:
        root = Path(tmp)
        (root / "fam").mkdir()
        base, tasks, largest = make_family(root / "fam", a.params, a.tasks, getattr(torch, a.dtype),
                                           hidden=a.hidden, vocab=a.vocab)
        files = [base, *tasks.values()]
        inputs = sum(f.stat().st_size for f in files)
        for f in files:  # the page cache warm for every side
            with open(f, "rb") as fh:
                while fh.read(1 << 24):
                    pass
        sides = [("this checkout", here)] + ([("other checkout", a.other)] if a.other else [])
        runs: dict[str, list[dict]] = {label: [] for label, _ in sides}
        zs: list[float] = []
        for r in range(a.rounds):
            zs.append(zstd(files, root / "zst"))
            shutil.rmtree(root / "zst")
            for label, checkout in sides if r % 2 == 0 else sides[::-1]:
                got = pack(checkout, base, tasks, root / "out.tallpack")
                got["ratio"] = got["seconds"] / zs[-1]
                runs[label].append(got)
    mb = 1 << 20
    print(f"family: {a.params:.3g} parameters (hidden {a.hidden}, vocab {a.vocab}), {a.dtype}, base + {a.tasks}; "
          f"inputs {inputs / mb:.0f} MB, largest tensor {largest / mb:.1f} MB; medians of {a.rounds}; "
          f"zstd -3 -T2 {statistics.median(zs):.2f} s")
    for label, rs in runs.items():
        grown = statistics.median(r["grown"] for r in rs)
        secs = statistics.median(r["seconds"] for r in rs)
        ratio = statistics.median(r["ratio"] for r in rs)
        print(f"  {label:16s} peak RssAnon +{grown / mb:7.1f} MB ({grown / largest:.1f}x the largest tensor, "
              f"{grown / inputs:.2f}x the inputs); {secs:.2f} s, {ratio:.2f}x zstd's; archive {rs[-1]['size'] / mb:.1f} MB")


if __name__ == "__main__":
    main()
