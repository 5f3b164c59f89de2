"""A random search over damaged checkpoint files given to the packer (not run by pytest).

Writes a small family (safetensors, and the last task also as a PyTorch file), then, until the
time is up, damages the last task's file (cut, bytes overwritten anywhere or in its first 600
bytes, bytes inserted, a header number replaced: ``damage``) and packs. Every try must pack or raise a
``TallpackError`` whose message is one line; anything else is printed as a finding and its file
kept. ``tests/test_sources_safety.py`` runs the same damages under hypothesis.

    PYTHONPATH=. python tests/fuzz/damage_inputs.py /tmp/damage --seconds 150 --seed 1 [--streamed]
"""

from __future__ import annotations

import argparse
import collections
import logging
import random
import time
from pathlib import Path


HOWS = ("cut", "flip", "head", "grow", "number")


def damage(raw: bytes, how: str, at: float, value: int, count: int) -> bytes:
    """``raw`` cut, overwritten or grown at the fraction ``at`` of its length (``head``: within its
    first 600 bytes, where both formats keep their headers and zip directories start; ``number``:
    the digit of the first 600 bytes nearest ``at`` replaced by a large, negative or zero number)."""
    b = bytearray(raw)
    span = min(len(b), 600) if how in ("head", "number") else len(b)
    p = min(int(at * span), len(b) - 1)
    if how == "cut":
        return bytes(b[:p])
    if how == "grow":
        return bytes(b[:p] + bytes([value]) * count + b[p:])
    if how == "number":
        digits = [i for i, c in enumerate(b[:span]) if 48 <= c <= 57]
        if digits:
            i = min(digits, key=lambda i: abs(i - p))
            b[i : i + 1] = str((0, 9, 99999999999, 2**40, -1)[value % 5]).encode()
        return bytes(b)
    for i in range(count):  # "flip", "head": overwrite count bytes from p on
        b[min(p + i * 97, len(b) - 1)] = value
    return bytes(b)


def write_family(d: Path) -> dict[str, bytes]:
    """A small family in ``d`` (float32 and bfloat16 tensors): base.safetensors, t0.safetensors,
    and the last task as t1.safetensors and t1.pt; returns the last task's bytes in both forms."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(5)
    base = {"a.w": torch.randn(32, 16, generator=g), "a.b": torch.randn(16, generator=g),
            "emb": torch.randn(40, 8, generator=g).to(torch.bfloat16)}
    tasks = [{k: (v.float() + 0.01 * torch.randn(v.shape, generator=g)).to(v.dtype) for k, v in base.items()}
             for _ in range(2)]
    save_file(base, d / "base.safetensors")
    save_file(tasks[0], d / "t0.safetensors")
    save_file(tasks[1], d / "t1.safetensors")
    torch.save(tasks[1], d / "t1.pt")
    return {"safetensors": (d / "t1.safetensors").read_bytes(), "pt": (d / "t1.pt").read_bytes()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("work", type=Path)
    ap.add_argument("--seconds", type=float, default=120)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--streamed", action="store_true",
                    help="read every tensor of more than 64 elements a block of 64 at a time (inputs.HOLD_BYTES 0)")
    a = ap.parse_args()
    import tallpack
    from tallpack import inputs
    from tallpack.errors import TallpackError

    chunks = {}
    if a.streamed:
        inputs.HOLD_BYTES, chunks = 0, {"chunk_elements": 64}

    logging.getLogger("tallpack").setLevel(logging.ERROR)  # the packer's warnings about odd values
    d: Path = a.work
    d.mkdir(parents=True, exist_ok=True)
    good = write_family(d)
    rng = random.Random(a.seed)
    outcomes: collections.Counter = collections.Counter()
    findings = 0
    end = time.monotonic() + a.seconds
    while time.monotonic() < end:
        kind = rng.choice(sorted(good))
        how = rng.choice(HOWS)
        data = damage(good[kind], how, rng.random(), rng.randrange(256), rng.randint(1, 16))
        bad = d / f"bad.{kind}"
        bad.write_bytes(data)
        finding = None
        try:
            tallpack.pack(d / "base.safetensors", {"t0": d / "t0.safetensors", "t1": bad}, d / "out.tallpack",
                          overwrite=True, **chunks)
            outcomes["packed"] += 1
        except TallpackError as e:
            outcomes[type(e).__name__] += 1
            if "\n" in str(e):
                finding = f"a message of several lines: {e!r}"
        except Exception as e:  # noqa: BLE001  (what the search looks for)
            outcomes["other: " + type(e).__name__] += 1
            finding = repr(e)
        if finding:
            findings += 1
            keep = d / f"finding-{findings}.{kind}"
            keep.write_bytes(data)
            print(f"{keep} ({how}): {finding[:300]}")
    print(f"{sum(outcomes.values())} tries: {dict(outcomes)}; {findings} findings")


if __name__ == "__main__":
    main()
