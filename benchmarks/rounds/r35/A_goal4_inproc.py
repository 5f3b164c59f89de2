"""Goal 4 (raw), two builds of the compiled loops in ONE process: perf.py's goal-4 measurement
(one warm-up call, then alternated calls), with each ``get_tensor`` run under the loops of build A
or build B in turn (``tallpack.kernels._kernels`` swapped between calls; the Python is this
checkout's) and ``safe_open().get_tensor(name).clone()`` between them. A shared, loaded machine
moves every side alike within one process, so the ratios hold where absolute times do not.

    python benchmarks/rounds/r35/A_goal4_inproc.py SO_A SO_B [SO ...] ARCHIVE [ARCHIVE ...]

SO_A and SO_B are built ``_kernels*.so`` files. Env: A_FAMILY (the family folder), A_NAME (the
tensor, default layers.0.up.weight), A_BASE_NORAW=1 (build A's
side also decodes raw mask frames with zstd, as before round 35), A_REPS (alternations, default 201), A_TASK (default task1).
Prints, per archive and build, the median and 20th percentile of wall and thread CPU time, and
their ratio to the clone's.
"""

from __future__ import annotations

import gc
import importlib.util
import os
import random
import statistics as st
import sys
import time

import torch
from safetensors import safe_open

import tallpack
from tallpack import codecs, kernels

FAMILY = os.environ.get("A_FAMILY", "/tmp/r35/A_work/out/family-h512-v8000-L7-s0-g1")
NAME = os.environ.get("A_NAME", "layers.0.up.weight")
REPS = int(os.environ.get("A_REPS", "201"))
TASK = os.environ.get("A_TASK", "task1")


def load(path: str, name: str):
    spec = importlib.util.spec_from_file_location("_kernels", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def q(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[int(p * (len(xs) - 1))]


INNER: list[float] = []


def _timed(fn):
    """kernels.tall_f32, its own thread CPU time recorded (the loop inside get_tensor)."""
    def run(*args, **kw):
        c0 = time.thread_time()
        try:
            return fn(*args, **kw)
        finally:
            INNER.append(time.thread_time() - c0)
    return run


NORAW = os.environ.get("A_BASE_NORAW", "") == "1"


def no_copy(buf, out) -> bool:
    return False


def main() -> None:
    copy_raw = getattr(codecs, "_copy_raw_frame", no_copy)
    sos = [a for a in sys.argv[1:] if a.endswith(".so")]
    mods = {"ABCDEFGH"[i]: load(p, str(i)) for i, p in enumerate(sos)}
    kernels.tall_f32 = _timed(kernels.tall_f32)
    for arch in [a for a in sys.argv[1:] if not a.endswith(".so")]:
        times: dict[str, list[tuple[float, float]]] = {k: [] for k in [*mods, "clone"]}
        inner: dict[str, list[float]] = {k: [] for k in mods}
        with tallpack.open(arch, cache_bytes=512 << 20) as fam, safe_open(f"{FAMILY}/{TASK}.safetensors", "pt") as f:
            ref = f.get_tensor(NAME).clone()
            for k in mods.values():
                kernels._kernels = k
                x = fam.get_tensor(TASK, NAME)  # warm-up, each build
            y = f.get_tensor(NAME).clone()
            rng = random.Random(0)
            gc.collect()
            for i in range(REPS):
                builds = list(mods)
                rng.shuffle(builds)  # each build call right after a clone, in a shuffled order
                for side in [x for k in builds for x in ("clone", k)]:
                    if side != "clone":
                        kernels._kernels = mods[side]
                        codecs._copy_raw_frame = copy_raw if side != "A" or not NORAW else no_copy
                    t0, c0 = time.perf_counter(), time.thread_time()
                    if side == "clone":
                        y = f.get_tensor(NAME).clone()
                    else:
                        x = fam.get_tensor(TASK, NAME)
                    times[side].append((time.perf_counter() - t0, time.thread_time() - c0))
                    if side != "clone" and INNER:
                        inner[side].append(INNER[-1])
                    INNER.clear()
                    if side != "clone" and i % 50 == 0:
                        assert torch.equal(x.view(torch.int32), fam.get_tensor(TASK, NAME).view(torch.int32))
            del x, y
        cl = times["clone"]
        for side in mods:
            w, c = [t[0] for t in times[side]], [t[1] for t in times[side]]
            cw, cc = [t[0] for t in cl], [t[1] for t in cl]
            print(f"{os.path.basename(arch):16s} {side}: wall med {st.median(w) * 1e6:7.1f} us p20 {q(w, .2) * 1e6:7.1f}"
                  f" | clone med {st.median(cw) * 1e6:7.1f} p20 {q(cw, .2) * 1e6:7.1f} | ratio med {st.median(w) / st.median(cw):5.2f}x"
                  f" p20 {q(w, .2) / q(cw, .2):5.2f}x | cpu ratio med {st.median(c) / st.median(cc):5.2f}x"
                  f" p20 {q(c, .2) / q(cc, .2):5.2f}x | loop cpu med {st.median(inner[side]) * 1e6:6.1f} p20 "
                  f"{q(inner[side], .2) * 1e6:6.1f} us, get_tensor cpu med {st.median(c) * 1e6:6.1f}")
    print("load average after:", os.getloadavg())


if __name__ == "__main__":
    main()
