"""Old against new code on the fidelity dial: the dial's pack time and its ratio to the lossy pack.

    python benchmarks/ab_dial.py --old /tmp/old_dial            # a worktree of the old commit, built
    python benchmarks/ab_dial.py --old /tmp/old_dial --family fp32 --opts '{"budget": 2.5}' --runs 5

Each measurement is a fresh process (after ``import torch``), old and new alternated, the lossy pack
of the same family in the same rounds; medians. The archives of old and new are compared byte for
byte (the fast paths must not change them). Without ``--family`` a transformer-shaped family
(base + 4 tasks, ``--width`` sets its size; ``--dtype bfloat16`` for the 16-bit one) is built in a
temporary folder.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent

_RUN = """
import json, sys, time, torch, tallpack
fam, out, kw = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
tasks = {p.stem: str(p) for p in sorted(__import__("pathlib").Path(fam).glob("t*.safetensors"))}
t, c = time.perf_counter(), time.process_time()
tallpack.pack(f"{fam}/base.safetensors", tasks, out, overwrite=True, **kw)
print(json.dumps({"s": time.perf_counter() - t, "cpu": time.process_time() - c}))
"""


def make_family(root: Path, width: int, dtype: str, tasks: int = 4) -> None:
    """Base + ``tasks`` fine-tunes of a small transformer's shapes (embedding, attention, MLP,
    norms, head); each fine-tune moves 30% of every tensor's entries."""
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    shapes = {"embed.weight": (16 * width, width)}
    for i in range(6):
        shapes |= {f"layers.{i}.attn.weight": (width, 3 * width), f"layers.{i}.attn.bias": (3 * width,),
                   f"layers.{i}.mlp.weight": (width, 2 * width), f"layers.{i}.mlp.bias": (2 * width,),
                   f"layers.{i}.norm.weight": (width,)}
    shapes["head.weight"] = (10, width)
    dt = getattr(torch, dtype)
    base = {k: torch.randn(v) * 0.05 for k, v in shapes.items()}
    root.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(dt).contiguous() for k, v in base.items()}, str(root / "base.safetensors"))
    for t in range(tasks):
        g = torch.Generator().manual_seed(100 + t)
        ft = {k: (v + (torch.rand(v.shape, generator=g) < 0.3) * torch.randn(v.shape, generator=g) * 0.005)
              .to(dt).contiguous() for k, v in base.items()}
        save_file(ft, str(root / f"t{t}.safetensors"))


def run(tree: Path, fam: Path, out: Path, opts: dict) -> dict[str, float]:
    """One pack in a fresh process: its wall and CPU seconds (every thread's)."""
    env = dict(os.environ, PYTHONPATH=f"{tree}{os.pathsep}{tree / 'cli'}")
    # in the tree: ``python -c`` puts its folder first on the path, so run from elsewhere both
    # sides would import the tallpack found there
    got = subprocess.run([sys.executable, "-c", _RUN, str(fam), str(out), json.dumps(opts)], env=env, cwd=tree,
                         capture_output=True, text=True, check=True)
    return json.loads(got.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", required=True, type=Path, help="a built worktree of the old code")
    ap.add_argument("--new", type=Path, default=HERE, help="the new code (default: this repository)")
    ap.add_argument("--family", type=Path, help="a folder of base.safetensors and t*.safetensors")
    ap.add_argument("--width", type=int, default=512, help="the built family's width (512: about 48 MB a float32 member)")
    ap.add_argument("--dtype", default="float32", help="the built family's dtype")
    ap.add_argument("--opts", default='{"fidelity": 0.999}', help="pack options of the dial, JSON")
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    opts = json.loads(a.opts)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        fam = a.family
        if fam is None:
            fam = work / "family"
            make_family(fam, a.width, a.dtype)
        times: dict[str, list[dict[str, float]]] = {"lossy": [], "old": [], "new": []}
        for i in range(a.runs):
            order = ("old", "new") if i % 2 == 0 else ("new", "old")
            times["lossy"].append(run(a.new, fam, work / "lossy.tp", {}))
            for who in order:
                times[who].append(run(a.old if who == "old" else a.new, fam, work / f"{who}.tp", opts))
        same = filecmp.cmp(work / "old.tp", work / "new.tp", shallow=False)
        print(f"family {fam} {a.dtype if a.family is None else ''} options {opts}, {a.runs} runs, medians "
              "(wall s, and CPU s of every thread: on a shared machine the wall follows the load)")
        print("| | lossy pack | dial old | dial new | old / lossy | new / lossy | old / new | same bytes |")
        print("|---|---:|---:|---:|---:|---:|---:|---|")
        for key in ("s", "cpu"):
            med = {k: statistics.median(x[key] for x in v) for k, v in times.items()}
            print(f"| {'wall' if key == 's' else 'CPU'} | {med['lossy']:.2f} | {med['old']:.2f} | {med['new']:.2f} "
                  f"| {med['old'] / med['lossy']:.1f}x | {med['new'] / med['lossy']:.1f}x | {med['old'] / med['new']:.2f} "
                  f"| {'yes' if same else 'NO'} |")
        print("raw:", json.dumps({k: [[round(x['s'], 2), round(x['cpu'], 2)] for x in v] for k, v in times.items()}))
        if not same:
            sys.exit(1)


if __name__ == "__main__":
    main()
