"""Head to head: this checkout's tallpack against another checkout's, loading one task.

Each round runs, in fresh processes and in this order: a load with this checkout's library, the
same load with the other checkout's, and ``load_file`` + clone of the task's original. Rounds
alternate the two libraries' order. Prints medians, and each library's median ratio to the
alternative over the rounds (a ratio per round, so a slow stretch of the machine moves both sides),
and whether the two libraries returned the same tensors (a SHA-256 of each load's, after the clock;
exit status 1 where they differ).

    git worktree add /tmp/old f90c82f && (cd /tmp/old && python setup.py build_ext --inplace)
    python benchmarks/perf.py                       # once: writes the archives and the alternative
    python benchmarks/ab_load.py --other /tmp/old --rounds 11
    python benchmarks/ab_load.py --other /tmp/old --rounds 11 --cache-bytes 0
    python benchmarks/ab_load.py --other /tmp/old --rounds 11 --second
    python benchmarks/ab_load.py --other /tmp/old --rounds 5 --steady 6
    python benchmarks/ab_load.py --other /tmp/old --rounds 11 --slice 8

``--steady R`` times the steady state instead: in each process the archive is opened and its
first task read, untimed, then every other task is read R times over (the median of those loads);
the alternative loads and clones its file 3 x R times in one process. Memory freed by one load is
reused by the next on both sides, so fresh pages count for little.

``--slice N`` times one rank of N-way tensor parallelism instead: a fresh process reads the first
``rows // N`` rows of every tensor of the task (``get_slice(task, name)[0:rows // N]``), against
``safe_open(original).get_slice(name)[0:rows // N]`` + clone of each.

Uses the archives ``perf.py`` leaves in ``benchmarks/out/perf-work`` (planes, 8 tasks) and its copy
of the task's original. The other checkout needs its compiled module built in place, as above.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
WORK = HERE / "out" / "perf-work"

CHILD = r"""
import gc, json, sys, time
import torch  # imported before timing, by every side
def digest(sd):  # the tensors' names, dtypes and bytes, after the clock: both checkouts must agree
    import hashlib
    h = hashlib.sha256()
    for k in sorted(sd):
        t = sd[k].contiguous()
        h.update(f"{k} {t.dtype} {tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()
# a full collection before each timed load (perf.py's _settle says why)
kind, path, task, warm, cache = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
steady, n = int(sys.argv[6]), int(sys.argv[7])
if n and kind == "st":
    from safetensors import safe_open
    gc.collect()
    t0 = time.perf_counter()
    with safe_open(path, "pt") as f:
        sd = {k: f.get_slice(k)[0 : max(1, f.get_slice(k).get_shape()[0] // n)].clone() for k in f.keys()}
    print(json.dumps({"seconds": time.perf_counter() - t0}))
elif n:
    import tallpack
    kw = {} if cache < 0 else {"cache_bytes": cache}
    gc.collect()
    t0 = time.perf_counter()
    with tallpack.open(path, **kw) as fam:
        sd = {}
        for k in fam.keys(task):
            part = fam.get_slice(task, k)
            sd[k] = part[0 : max(1, part.get_shape()[0] // n)]
    s = time.perf_counter() - t0
    print(json.dumps({"seconds": s, "tallpack": tallpack.__file__, "digest": digest(sd)}))
elif steady and kind == "st":
    from safetensors.torch import load_file
    ts = []
    for _ in range(3 * steady):
        t0 = time.perf_counter()
        sd = {k: v.clone() for k, v in load_file(path).items()}
        ts.append(time.perf_counter() - t0)
        del sd
    print(json.dumps({"seconds": sorted(ts)[len(ts) // 2]}))
elif steady:
    import tallpack
    kw = {} if cache < 0 else {"cache_bytes": cache}
    ts = []
    with tallpack.open(path, **kw) as fam:
        fam.state_dict(fam.tasks[0])
        for _ in range(steady):
            for t in fam.tasks[1:]:
                t0 = time.perf_counter()
                sd = fam.state_dict(t)
                ts.append(time.perf_counter() - t0)
                del sd
    print(json.dumps({"seconds": sorted(ts)[len(ts) // 2], "tallpack": tallpack.__file__}))
elif kind == "st":
    from safetensors.torch import load_file
    gc.collect()
    t0 = time.perf_counter()
    sd = {k: v.clone() for k, v in load_file(path).items()}
    print(json.dumps({"seconds": time.perf_counter() - t0}))
else:
    import tallpack
    kw = {} if cache < 0 else {"cache_bytes": cache}
    if warm:
        with tallpack.open(path, **kw) as fam:
            fam.state_dict(warm)
            gc.collect()
            t0 = time.perf_counter()
            sd = fam.state_dict(task)
            s = time.perf_counter() - t0
    else:
        gc.collect()
        t0 = time.perf_counter()
        with tallpack.open(path, **kw) as fam:
            sd = fam.state_dict(task)
        s = time.perf_counter() - t0
    print(json.dumps({"seconds": s, "tallpack": tallpack.__file__, "digest": digest(sd)}))
"""


def run(kind: str, path: Path, task: str, warm: str, cache: int, pythonpath: str | None, steady: int = 0,
        n: int = 0) -> dict:
    env = dict(os.environ)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # both sides alike (perf.OMP_WAIT says why)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    out = subprocess.run([sys.executable, "-c", CHILD, kind, str(path), task, warm, str(cache), str(steady), str(n)],
                         capture_output=True, text=True, env=env, cwd="/", check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--other", type=lambda s: Path(s).resolve(), required=True, help="the other checkout (its compiled module built in place)")
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--archive", type=lambda s: Path(s).resolve(), default=WORK / "planes-8.tallpack")
    ap.add_argument("--original", type=lambda s: Path(s).resolve(), default=WORK / "alt-task1.safetensors")
    ap.add_argument("--task", default="task1")
    ap.add_argument("--cache-bytes", type=int, default=-1, help="open with this cache_bytes (default: the library's)")
    ap.add_argument("--second", action="store_true", help="time a second task (--warm-task first, untimed)")
    ap.add_argument("--warm-task", default="task0", help="with --second, the task read first (default task0)")
    ap.add_argument("--steady", type=int, default=0, metavar="R",
                    help="time the steady state: every task but the first, R times over, in one process")
    ap.add_argument("--slice", type=int, default=0, metavar="N",
                    help="time one rank of N-way tensor parallelism: the first rows // N rows of every tensor")
    a = ap.parse_args(argv)
    warm = a.warm_task if a.second else ""
    sides = {"this": str(REPO), "other": str(a.other.resolve())}
    times: dict[str, list[float]] = {"this": [], "other": [], "alt": []}
    files = {}
    digests: dict[str, set[str]] = {"this": set(), "other": set()}
    for i in range(a.rounds):
        for side in (("this", "other") if i % 2 == 0 else ("other", "this")):
            r = run("tp", a.archive, a.task, warm, a.cache_bytes, sides[side], a.steady, a.slice)
            times[side].append(r["seconds"])
            files[side] = r["tallpack"]
            if r.get("digest"):
                digests[side].add(r["digest"])
        times["alt"].append(run("st", a.original, a.task, "", -1, None, a.steady, a.slice)["seconds"])
    what = (f"one rank of {a.slice}: the first rows // {a.slice} rows of every tensor, fresh process "
            "(against safe_open + get_slice + clone)" if a.slice
            else f"steady state (every task after the first, {a.steady} times over, one process; medians)" if a.steady
            else f"second task (after {warm}, same open archive)" if a.second
            else "first task (open + state_dict + close)")
    cache = "the default cache" if a.cache_bytes < 0 else f"cache_bytes={a.cache_bytes}"
    print(f"{what}, {cache}, {a.rounds} rounds; alternative {'its slices' if a.slice else 'load_file + clone'}: "
          f"{statistics.median(times['alt']) * 1e3:.1f} ms")
    print_sides(times, files, "alt", "the alternative")
    if a.steady:
        print("  tensors not compared (--steady keeps none)")
        return 0
    same = len(digests["this"]) == 1 and digests["this"] == digests["other"]
    print(f"  the two checkouts' tensors: {'identical' if same else 'DIFFER'} (SHA-256 of names, dtypes, shapes, bytes)")
    return 0 if same else 1


def print_sides(times: dict[str, list[float]], files: dict[str, str], alt: str, alt_name: str,
                unit: str = "ms") -> None:
    """Each side's median time and its median ratio, round by round, to ``times[alt]``."""
    scale = 1e3 if unit == "ms" else 1.0
    for side in ("this", "other"):
        ratios = [t / s for t, s in zip(times[side], times[alt])]
        print(f"  {side:5s} {files[side]}: {statistics.median(times[side]) * scale:.{1 if unit == 'ms' else 2}f} "
              f"{unit}, {statistics.median(ratios):.2f}x of {alt_name} (median of per-round ratios)")


if __name__ == "__main__":
    sys.exit(main())
