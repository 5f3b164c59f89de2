"""A family larger than the reader's cache: the first and the second task of one open archive,
against ``load_file`` + clone, at several cache budgets (and, with ``--other``, another checkout).

The decoded base and merged vectors of a bfloat16 family take 4 bytes an element in the cache
(the base's exponent plane, three planes of the float32 merged vector), twice the checkpoint.
Past about 250M parameters they pass the default 1 GiB, and with large vocabularies one tensor
alone does (an embedding of 393M elements here, as in recent models). This measures what the
cache does then:

    python benchmarks/cache_budget.py                         # 393M-element embedding, base + 2
    python benchmarks/cache_budget.py --other /tmp/old        # against another checkout
    python benchmarks/cache_budget.py --rows 8192 --cache-bytes 64000000,0   # small, fast

Each sample is a fresh process that opens the archive, reads the first task, then the second
(each timed alone), and reports what the cache holds; the alternative loads and clones the first
task's checkpoint in a fresh process. Sides alternate round by round; medians. The family is made
once under ``--out`` (about 3.2 GB of files at the default size).
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

CHILD = r"""
import gc, json, sys, time
import torch  # imported before timing, by every side
kind, path, cache = sys.argv[1], sys.argv[2], int(sys.argv[3])
gc.collect()
if kind == "st":
    from safetensors.torch import load_file
    t0 = time.perf_counter()
    sd = {k: v.clone() for k, v in load_file(path).items()}
    print(json.dumps({"seconds": time.perf_counter() - t0}))
else:
    import tallpack
    kw = {} if cache < 0 else {"cache_bytes": cache}
    t0 = time.perf_counter()
    with tallpack.open(path, **kw) as fam:
        sd = fam.state_dict(fam.tasks[0])
        t1 = time.perf_counter()
        del sd
        gc.collect()
        t2 = time.perf_counter()
        sd = fam.state_dict(fam.tasks[1])
        t3 = time.perf_counter()
        held = fam._cache.size
    print(json.dumps({"first": t1 - t0, "second": t3 - t2, "held": held, "tallpack": tallpack.__file__}))
"""


def make_family(out: Path, rows: int, cols: int, tasks: int) -> dict:
    """Base and ``tasks`` fine-tunes in bfloat16: an embedding of rows x cols, a norm; each task
    moves 10% of the elements by about 1e-3; then packed with the defaults."""
    import torch
    from safetensors.torch import save_file

    import tallpack

    root = out / f"family-r{rows}-c{cols}-t{tasks}"
    archive = root / "family.tallpack"
    paths = {"base": root / "base.safetensors", **{f"t{i}": root / f"t{i}.safetensors" for i in range(tasks)}}
    if not archive.exists():
        root.mkdir(parents=True, exist_ok=True)
        g = torch.Generator().manual_seed(0)
        base = {"embed": (0.02 * torch.randn(rows, cols, generator=g)).to(torch.bfloat16),
                "norm": torch.ones(cols, dtype=torch.bfloat16)}
        save_file(base, paths["base"])
        for i in range(tasks):
            ft = {k: (v.float() + 1e-3 * torch.randn(v.shape, generator=g) * (torch.rand(v.shape, generator=g) < 0.1)
                      ).to(torch.bfloat16) for k, v in base.items()}
            save_file(ft, paths[f"t{i}"])
            del ft
        tallpack.pack(paths["base"], {t: p for t, p in paths.items() if t != "base"}, archive, overwrite=True)
    return {"archive": archive, "original": paths["t0"], "member_bytes": paths["t0"].stat().st_size,
            "archive_bytes": archive.stat().st_size}


def run(kind: str, path: Path, cache: int, pythonpath: str | None) -> dict:
    env = dict(os.environ)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # both sides alike (perf.OMP_WAIT says why)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    out = subprocess.run([sys.executable, "-c", CHILD, kind, str(path), str(cache)],
                         capture_output=True, text=True, env=env, cwd="/", check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=96000)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--tasks", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cache-bytes", default=f"-1,0,{2_000_000_000}",
                    help="comma-separated budgets; -1: the library's default (default: -1,0,2e9)")
    ap.add_argument("--other", type=lambda s: Path(s).resolve(), help="another checkout (compiled in place)")
    ap.add_argument("--out", type=lambda s: Path(s).resolve(), default=HERE / "out" / "cache-budget")
    a = ap.parse_args(argv)
    fam = make_family(a.out, a.rows, a.cols, a.tasks)
    for p in (fam["archive"], fam["original"]):  # into the page cache
        with open(p, "rb") as f:
            while f.read(1 << 24):
                pass
    sides = {"this": str(REPO), **({"other": str(a.other)} if a.other else {})}
    print(f"embedding {a.rows}x{a.cols} bfloat16, base + {a.tasks}: a member is {fam['member_bytes'] / 1e6:.0f} MB, "
          f"the archive {fam['archive_bytes'] / 1e6:.0f} MB; {a.rounds} rounds, medians\n")
    print("| cache_bytes | side | first task | second task | cache holds | load_file + clone | first / alt | second / alt |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for cache in (int(float(x)) for x in a.cache_bytes.split(",")):
        got: dict[str, list[dict]] = {s: [] for s in sides}
        alt: list[float] = []
        for i in range(a.rounds):
            for side in (list(sides) if i % 2 == 0 else list(sides)[::-1]):
                got[side].append(run("tp", fam["archive"], cache, sides[side]))
            alt.append(run("st", fam["original"], -1, None)["seconds"])
        st = statistics.median(alt)
        for side, rs in got.items():
            first = statistics.median(r["first"] for r in rs)
            second = statistics.median(r["second"] for r in rs)
            held = statistics.median(r["held"] for r in rs)
            label = "default (1 GiB)" if cache < 0 else f"{cache:,}"
            print(f"| {label} | {side} ({Path(rs[0]['tallpack']).parent.parent}) | {first * 1e3:,.0f} ms | "
                  f"{second * 1e3:,.0f} ms | {held / 2**20:,.0f} MiB | {st * 1e3:,.0f} ms | {first / st:.1f}x | "
                  f"{second / st:.1f}x |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
