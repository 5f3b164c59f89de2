"""How small can the exact tier's residuals get? Entropy estimates against what we spend (issue 9).

    python benchmarks/residual_entropy.py [--demo .tallpack-demo/family] [--hidden 256]

For the residual of every task against the base (the exact tier's layout once masks and merged
vectors are derived: ``sub`` transform, zigzag-coded ordered difference), on the merged tensors of
the synthetic bf16 and fp32 families (``pack_scale.make_family``: the same per-element statistics as
the full families, at a smaller width) and the demo family, prints bytes per family:

* BitX's (XOR with the base, byte planes, zstd-3), ``planes`` (format 1.8's coding: exponent order,
  byte planes, zstd-1) and ``bitsplit`` (1.9's, in the same order);
* the code length of an adaptive model (counts from the elements already coded, additive 1/2) of
  each element's bit length and the two bits below its leading one, the lower bits counted as raw,
  given a context the decoder has: none; the reference's exponent; the exponent and the previous
  element's bit length; the exponent and the previous task's bit length at the same element (the
  other tasks' residuals); the exponent and the tensor's row and column scales of |delta| (stored:
  one byte a row and a column, counted). An adaptive code length is achievable, so it bounds the
  entropy under that model from above; it is not a lower bound;
* for the synthetic fp32 family, the true conditional entropy given the base: the mean of
  ``-log2(p(delta) * ulp(x))`` under the generator's own mixture of normals (what no coder can beat).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import zstandard
from safetensors import safe_open

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
log = logging.getLogger("residual_entropy")


def _load(path: Path) -> dict[str, torch.Tensor]:
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
    out = {}
    for f in files:
        with safe_open(str(f), "pt") as h:
            out |= {k: h.get_tensor(k) for k in h.keys()}
    return out


def _bits(t: torch.Tensor) -> np.ndarray:
    u = {2: (torch.int16, np.uint16), 4: (torch.int32, np.uint32)}[t.element_size()]
    return t.contiguous().reshape(-1).view(u[0]).numpy().view(u[1])


def bit_length(z: np.ndarray) -> np.ndarray:
    return np.frexp(z.astype(np.float64))[1].astype(np.int64)


def adaptive_bits(sym: np.ndarray, ctx: np.ndarray, nsym: int, alpha: float = 0.5) -> float:
    """Code length (bits) of ``sym`` given ``ctx`` under adaptive counts in element order."""

    def rank(key: np.ndarray) -> np.ndarray:  # how often each key occurred before this element
        o = np.argsort(key, kind="stable")
        ks = key[o]
        start = np.r_[0, np.flatnonzero(ks[1:] != ks[:-1]) + 1]
        idx = np.arange(key.size) - np.repeat(start, np.diff(np.r_[start, key.size]))
        r = np.empty_like(idx)
        r[o] = idx
        return r

    return float(np.sum(np.log2((rank(ctx) + alpha * nsym) / (rank(ctx * nsym + sym) + alpha))))


def model_bits(z: np.ndarray, ctx: np.ndarray) -> float:
    """(bit length, two bits below the leading one) coded adaptively given ``ctx``; the rest raw."""
    k = bit_length(z)
    raw = np.maximum(k - 3, 0)
    top = np.where(k >= 3, (z.astype(np.int64) >> raw) & 3, z.astype(np.int64) - ((1 << np.maximum(k - 1, 0)) * (k > 0)))
    return adaptive_bits(k * 4 + top, ctx.astype(np.int64), 33 * 4) + float(raw.sum())


def bitx_bytes(x: np.ndarray, r: np.ndarray) -> int:
    a = (x ^ r).view(np.uint8).reshape(-1, x.itemsize)
    return len(zstandard.ZstdCompressor(level=3).compress(np.ascontiguousarray(a.T).tobytes()))


def coded_bytes(z: np.ndarray, r: np.ndarray, dtype: str, codec: str) -> int:
    from tallpack.codecs import BitSplit, Planes
    from tallpack.encodings.exact import permute

    ce = 1 << 22
    s = permute(z, r, dtype, "exponent", ce)
    c = Planes(z.itemsize) if codec == "planes" else BitSplit(z.itemsize)
    return sum(len(c.encode(memoryview(s[a : a + ce].view(np.uint8)))) for a in range(0, s.size, ce))


def measure(name: str, base: dict, tasks: list[dict], true_mixture: tuple | None = None) -> dict:
    from tallpack.encodings.exact import EXPONENT, forward

    tot: dict[str, float] = {}

    def add(k: str, v: float) -> None:
        tot[k] = tot.get(k, 0.0) + v

    for key, b in base.items():
        if not b.is_floating_point() or any(key not in t or t[key].shape != b.shape for t in tasks):
            continue
        dtype = str(b.dtype).removeprefix("torch.")
        r = _bits(b)
        e = ((r >> EXPONENT[dtype][1]) & 255).astype(np.int64)
        zs = [forward(_bits(t[key]), r, "sub") for t in tasks]
        for i, (t, z) in enumerate(zip(tasks, zs)):
            x = _bits(t[key])
            add("elements", z.size)
            add("bitx", bitx_bytes(x, r))
            add("planes (1.8)", coded_bytes(z, r, dtype, "planes"))
            add("bitsplit (1.9)", coded_bytes(z, r, dtype, "bitsplit"))
            add("H | none", model_bits(z, np.zeros_like(e)) / 8)
            add("H | exponent", model_bits(z, e) / 8)
            k = bit_length(z)
            add("H | exponent, previous element", model_bits(z, e * 40 + np.r_[0, k[:-1]]) / 8)
            other = bit_length(zs[i - 1]) if i else np.zeros_like(k)
            add("H | exponent, previous task", model_bits(z, e * 40 + other) / 8)
            d = (t[key].double() - b.double()).abs()
            if b.dim() == 2:
                rows, cols = d.mean(1, keepdim=True).clamp_min(1e-30), d.mean(0, keepdim=True).clamp_min(1e-30)
                scale = (rows * cols / d.mean().clamp_min(1e-30)).reshape(-1).numpy()
                side = b.shape[0] + b.shape[1]
            else:
                scale, side = np.full(z.size, max(d.mean().item(), 1e-30)), 1
            c = np.clip(np.round(np.log2(scale)) - (e - 150), -60, 60).astype(np.int64) + 64
            add("H | row and column scales over the ulp", model_bits(z, c) / 8 + side)
            if true_mixture is not None:
                (p1, s1), (p2, s2) = true_mixture
                delta = (t[key].double() - b.double()).numpy().ravel()
                dens = sum(p * np.exp(-0.5 * (delta / s) ** 2) / (s * np.sqrt(2 * np.pi)) for p, s in true_mixture)
                ulp = np.spacing(np.abs(t[key].numpy().ravel())).astype(np.float64)
                add("H true (the generator's distribution)", float(-np.log2(dens * ulp).sum()) / 8)
    out = {"family": name, **{k: round(v) for k, v in tot.items()}}
    log.info("%s", json.dumps(out))
    for k, v in tot.items():
        if k != "elements":
            print(f"{name:18s} {k:40s} {v:14.0f}  {v / tot['bitx']:.3f} of BitX  {8 * v / tot['elements']:6.2f} bits/element")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--demo", default=".tallpack-demo/family", help="demo family folder (skipped when absent)")
    ap.add_argument("--hidden", type=int, default=256, help="width of the synthetic families")
    ap.add_argument("--out", type=Path, default=HERE / "out")
    a = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from pack_scale import make_family

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in (torch.bfloat16, torch.float32):
            root = Path(tmp) / str(dtype)
            root.mkdir()
            params = 4 * 12 * a.hidden**2 / (1 if dtype == torch.bfloat16 else 2)
            base, tasks, _ = make_family(root, params, 4, dtype, hidden=a.hidden, vocab=8 * a.hidden)
            # pack_scale's fine-tunes: N(0, 1e-4) on 90% of the weights, N(0, 2.1e-3) on 10%
            mixture = ((0.9, 1e-4), (0.1, 1e-4 + 2e-3)) if dtype == torch.float32 else None
            results.append(measure(f"synthetic {str(dtype)[6:]}", _load(base), [_load(p) for p in tasks.values()],
                                   mixture))
    demo = Path(a.demo)
    if (demo / "base").exists():
        results.append(measure("demo", _load(demo / "base"),
                               [_load(p) for p in sorted((demo / "tasks").iterdir())]))
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "residual_entropy.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
