"""How close do the stored masks come to their entropy, and would coding a family's masks jointly
pay? Measured on the demo family's TA archive (built and packed by this script if missing).

    python benchmarks/mask_coding.py [--root .tallpack-demo/family] [--lambda 0.4]

Per parameter and per task, side by side in the same run:
- stored: what the archive holds now (each task's mask bit-packed, zstd-3, per chunk);
- H(p): the bound for coding each mask alone with a memoryless model (sum over tensors);
- joint: the bound for coding the T masks of a parameter together, H(pattern) / T, where pattern
  is the parameter's T-bit vector of mask bits (empirical, per tensor);
- zstd-3 / zstd-19 of the masks bit-interleaved (one T-bit pattern per parameter, as bytes).
"""

from __future__ import annotations

import argparse
import math
from collections import Counter
from pathlib import Path

import numpy as np
import zstandard

import tallpack
from tallpack.demo import build_family


def entropy(counts) -> float:
    n = sum(counts)
    return -sum(c / n * math.log2(c / n) for c in counts if c)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", type=Path, default=Path(".tallpack-demo/family"))
    ap.add_argument("--lambda", dest="lam", type=float, default=tallpack.DEFAULT_LAMBDA)
    a = ap.parse_args()
    fam = build_family(a.root)
    out = Path("benchmarks/out")
    out.mkdir(parents=True, exist_ok=True)
    archive = out / f"mask_coding_{a.lam}.tallpack"
    tallpack.pack(fam.base, fam.tasks, archive, lambdas=a.lam, overwrite=True)
    stored_bits = indep_bits = joint_bits = 0.0
    z3 = z19 = 0
    n_params = 0
    with tallpack.open(archive) as arc:
        T = len(arc.tasks)
        for e in arc.manifest.tensors:
            if e.kind != "merged":
                continue
            masks = [arc.read_array(tt.arrays["mask"], e.name).reshape(-1).numpy() for tt in e.tasks.values()]
            n = masks[0].size
            n_params += n
            stored_bits += 8 * sum(tt.arrays["mask"].stored_nbytes for tt in e.tasks.values())
            indep_bits += sum(n * entropy([int(m.sum()), n - int(m.sum())]) for m in masks)
            pattern = np.zeros(n, np.uint32)
            for i, m in enumerate(masks):
                pattern |= m.astype(np.uint32) << i
            joint_bits += n * entropy(list(Counter(pattern.tolist()).values()))
            raw = pattern.astype(np.uint16 if T <= 16 else np.uint32).tobytes()
            z3 += 8 * len(zstandard.ZstdCompressor(level=3).compress(raw))
            z19 += 8 * len(zstandard.ZstdCompressor(level=19).compress(raw))
    per = lambda bits: bits / (n_params * T)  # noqa: E731
    rows = [("stored now (per task, bitpack + zstd-3, or the bits where zstd saves under 10%)", per(stored_bits)),
            ("bound, each mask alone: mean H(p)", per(indep_bits)),
            ("bound, masks jointly: H(pattern) / T", per(joint_bits)),
            ("interleaved patterns + zstd-3", per(z3)),
            ("interleaved patterns + zstd-19", per(z19))]
    print(f"demo family, {T} tasks, {n_params} masked parameters, lambda {a.lam}")
    print("| coding | bits per parameter per task |\n|---|---:|")
    for name, v in rows:
        print(f"| {name} | {v:.3f} |")


if __name__ == "__main__":
    main()
