"""Every rank of every task of a derived-merged tensor read as slices, in one process: the lead
"slices never fill the cache" (BENCHMARKS.md, thirty-first round).

    python benchmarks/rounds/r34/A_slices.py DIR [--ranks 8] [--cache-bytes N] [--order rank|task]

Builds (once, in DIR) a bfloat16 embedding of 16000 x 2048 with a base and 4 tasks, packed with
``--exact`` (its entries ``tall-derived-merged``), then reads ``get_slice(t, "emb")[rows]`` for
every rank's rows and every task, rank by rank (``--order rank``) or task by task, timing the
whole (wall and process CPU seconds: on a busy machine, the CPU time is the steadier figure), and checks each slice against the same rows of ``get_tensor`` from a second open archive.
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

import tallpack

ROWS, COLS, TASKS = 16000, 2048, 4


def family(d: Path) -> Path:
    out = d / "x.tallpack"
    if out.exists():
        return out
    d.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    base = {"emb": torch.randn(ROWS, COLS, generator=g).to(torch.bfloat16)}
    save_file(base, d / "base.safetensors")
    tasks = {}
    for t in range(TASKS):
        v = base["emb"].float()
        sd = {"emb": (v + 0.01 * torch.randn(v.shape, generator=g)
                      * (torch.rand(v.shape, generator=g) < 0.2)).to(torch.bfloat16)}
        save_file(sd, d / f"t{t}.safetensors")
        tasks[f"t{t}"] = str(d / f"t{t}.safetensors")
        del sd, v
    tallpack.pack(str(d / "base.safetensors"), tasks, str(out), exact=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("dir")
    ap.add_argument("--ranks", type=int, default=8)
    ap.add_argument("--cache-bytes", type=int, default=None)
    ap.add_argument("--order", choices=("rank", "task"), default="rank")
    ap.add_argument("--check", action="store_true", help="compare every slice with get_tensor's rows")
    a = ap.parse_args()
    path = family(Path(a.dir))
    kw = {} if a.cache_bytes is None else {"cache_bytes": a.cache_bytes}
    step = ROWS // a.ranks
    with tallpack.open(path, **kw) as fam:
        assert fam._tensors["emb"].tasks["t0"].encoding == "tall-derived-merged"
        jobs = [(t, r) for r in range(a.ranks) for t in fam.tasks]
        if a.order == "task":
            jobs.sort()
        got = {}
        c0, t0 = time.process_time(), time.perf_counter()
        for t, r in jobs:
            got[(t, r)] = fam.get_slice(t, "emb")[r * step : (r + 1) * step]
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        cached = len(fam._cache), fam._cache.size
    bad = 0
    if a.check:
        with tallpack.open(path, cache_bytes=0) as ref:
            for t in ref.tasks:
                whole = ref.get_tensor(t, "emb")
                bad += sum(not torch.equal(got[(t, r)].view(torch.int16), whole[r * step : (r + 1) * step].view(torch.int16))
                           for r in range(a.ranks))
    print(json.dumps({"tallpack": tallpack.__file__, "order": a.order, "ranks": a.ranks, "cache_bytes": a.cache_bytes,
                      "seconds": seconds, "cpu_seconds": cpu, "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10,
                      "cache_entries": cached[0], "cache_bytes_held": cached[1], "mismatches": bad}))
    if bad:
        sys.exit(1)


if __name__ == "__main__":
    main()
