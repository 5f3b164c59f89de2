"""Head to head: `pack --merge ties` against `pack --merge ta`, with this checkout and another.

Each round packs the same family four times in fresh processes (TIES and TA, with this checkout's
library and with the other's, the order turning from round to round) and prints, per side and
dtype, the median times and the median of the per-round ratios TIES / TA (the ratio, not the
time, is what a shared machine leaves comparable). Also says whether both sides wrote the same
TIES archive, byte for byte.

    git worktree add /tmp/old HEAD && (cd /tmp/old && python setup.py build_ext --inplace)
    python benchmarks/ab_ties.py --other /tmp/old --rounds 5

The family (made once into benchmarks/out/ties-family-*): a base and 4 fine-tunes of 48 MB
(float32; 24 MB bfloat16), transformer-shaped (an 8000 x 512 embedding, 6 layers of attention,
MLP and norm weights), each fine-tune moving a random 30% of the weights.
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

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TASKS = 4

CHILD = r"""
import json, sys, time
import torch  # imported before timing, by both sides
import tallpack
root, out, merge = sys.argv[1], sys.argv[2], sys.argv[3]
tasks = {f"t{i}": f"{root}/t{i}.safetensors" for i in range(int(sys.argv[4]))}
t0 = time.perf_counter()
tallpack.pack(f"{root}/base.safetensors", tasks, out, merge=merge, overwrite=True)
print(json.dumps({"seconds": time.perf_counter() - t0, "tallpack": tallpack.__file__}))
"""


def shapes() -> dict[str, tuple[int, ...]]:
    s: dict[str, tuple[int, ...]] = {"embed.weight": (8000, 512)}
    for i in range(6):
        s |= {f"layers.{i}.attn.weight": (512, 1536), f"layers.{i}.attn.bias": (1536,),
              f"layers.{i}.mlp.weight": (512, 1024), f"layers.{i}.mlp.bias": (1024,),
              f"layers.{i}.norm.weight": (512,)}
    return s | {"head.weight": (10, 512)}


def family(dtype: str) -> Path:
    root = HERE / "out" / f"ties-family-{dtype}"
    if (root / f"t{TASKS - 1}.safetensors").exists():
        return root
    import torch
    from safetensors.torch import save_file
    dt = getattr(torch, dtype)
    root.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    base = {k: torch.randn(v, generator=g) * 0.05 for k, v in shapes().items()}
    save_file({k: v.to(dt) for k, v in base.items()}, str(root / "base.safetensors"))
    for t in range(TASKS):
        ft = {k: (v + (torch.rand(v.shape, generator=g) < 0.3) * torch.randn(v.shape, generator=g) * 0.005).to(dt)
              for k, v in base.items()}
        save_file(ft, str(root / f"t{t}.safetensors"))
    return root


def pack(root: Path, out: Path, merge: str, pythonpath: str) -> dict:
    env = {**os.environ, "PYTHONPATH": pythonpath}
    done = subprocess.run([sys.executable, "-c", CHILD, str(root), str(out), merge, str(TASKS)],
                          capture_output=True, text=True, env=env, cwd="/", check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--other", type=lambda s: Path(s).resolve(), required=True,
                    help="the other checkout (its compiled module built in place)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    a = ap.parse_args(argv)
    sides = {"this": str(REPO), "other": str(a.other)}
    print(f"| dtype | side | TIES (s) | TA (s) | TIES / TA | same TIES archive |\n|---|---|---:|---:|---:|---|")
    for dtype in a.dtypes.split(","):
        root = family(dtype)
        times = {(side, m): [] for side in sides for m in ("ties", "ta")}
        files: dict[str, str] = {}
        with tempfile.TemporaryDirectory(dir=HERE / "out") as tmp:
            outs = {key: Path(tmp) / f"{key[0]}-{key[1]}.tallpack" for key in times}
            for i in range(a.rounds):
                order = list(times) if i % 2 == 0 else list(reversed(times))
                for side, m in order:
                    r = pack(root, outs[side, m], m, sides[side])
                    times[side, m].append(r["seconds"])
                    files[side] = r["tallpack"]
            same = filecmp.cmp(outs["this", "ties"], outs["other", "ties"], shallow=False)
        for side in sides:
            ratios = [x / y for x, y in zip(times[side, "ties"], times[side, "ta"])]
            print(f"| {dtype} | {side} ({Path(files[side]).parent.parent}) | "
                  f"{statistics.median(times[side, 'ties']):.2f} | {statistics.median(times[side, 'ta']):.2f} | "
                  f"{statistics.median(ratios):.2f}x | {'yes' if same else 'NO'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
