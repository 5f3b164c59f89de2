"""The compiled rebuild loops of two builds, alternated in one process, into outputs of three
kinds: reused (one buffer), heap (``torch.empty`` each call, as a read does: the allocator's reused
memory), and fresh (a new anonymous mapping each call: the kernel's zeroed pages, as a fresh process
gets). Thread CPU time (a loaded machine's waits are not counted) and wall, medians and 20th
percentiles, microseconds.

    python benchmarks/rounds/r35/A_stream_micro.py SO_A SO_B [ELEMENTS ...]

Env A_LOOPS (tall_f32,tall_f32_bits,bf16,f16), A_REPS (default 101).
"""

from __future__ import annotations

import importlib.util
import mmap
import os
import statistics as st
import sys
import time

import numpy as np
import torch


def load(path: str):
    spec = importlib.util.spec_from_file_location("_kernels", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def q(xs, p):
    xs = sorted(xs)
    return xs[int(p * (len(xs) - 1))]


def main() -> None:
    mods = [load(sys.argv[1]), load(sys.argv[2])]
    sizes = [int(x) for x in sys.argv[3:]] or [1 << 20]
    loops = os.environ.get("A_LOOPS", "tall_f32,tall_f32_bits,bf16,f16").split(",")
    reps = int(os.environ.get("A_REPS", "101"))
    rng = np.random.default_rng(0)
    for n in sizes:
        base = rng.standard_normal(n).astype(np.float32)
        merged = (rng.standard_normal(n) * 1e-3).astype(np.float32)
        mbytes = (rng.random(n) < 0.3).astype(np.uint8)
        mbits = np.packbits(mbytes, bitorder="little")
        p32 = [np.ascontiguousarray(merged.view(np.uint8).reshape(-1, 4)[:, j]) for j in range(4)]
        b16 = base.astype(np.float16)
        p16 = [np.ascontiguousarray(b16.view(np.uint8).reshape(-1, 2)[:, j]) for j in range(2)]
        for loop in loops:
            width = 4 if loop.startswith("tall_f32") else 2
            dt = np.float32 if width == 4 else np.uint16

            def call(mod, out):
                if loop == "tall_f32":
                    mod.tall_f32(base, merged, mbytes, out, False)
                elif loop == "tall_f32_bits":
                    mod.tall_f32(base, merged, mbits, out, True)
                else:
                    getattr(mod, "tall_planes_f16" if loop == "f16" else "tall_planes_bf16")(p16, 0, p32, 0, mbits, out, True)

            reused = np.empty(n, dt)
            for kind in ("reused", "heap", "fresh"):
                res = {0: [], 1: []}
                for i in range(reps):
                    for s in ((0, 1) if i % 2 == 0 else (1, 0)):
                        mm = None
                        if kind == "reused":
                            out = reused
                        elif kind == "heap":
                            out = torch.empty(n, dtype=torch.float32 if width == 4 else torch.int16).numpy()
                        else:
                            mm = mmap.mmap(-1, n * width)
                            out = np.frombuffer(mm, dt)
                        t0, c0 = time.perf_counter(), time.thread_time()
                        call(mods[s], out)
                        res[s].append((time.perf_counter() - t0, time.thread_time() - c0))
                        del out
                        if mm is not None:
                            mm.close()
                line = [f"{loop:13s} n={n:<8d} {kind:6s}"]
                for s in (0, 1):
                    w, c = [t[0] * 1e6 for t in res[s]], [t[1] * 1e6 for t in res[s]]
                    line.append(f"{'AB'[s]}: cpu med {st.median(c):7.1f} p20 {q(c, .2):7.1f} wall med {st.median(w):7.1f} p20 {q(w, .2):7.1f}")
                print(" | ".join(line), flush=True)
    print("load average after:", os.getloadavg())


if __name__ == "__main__":
    main()
