"""A random search over damaged checkpoint files given to the packer (not run by pytest).

Writes a small family (safetensors, and the last task also as a PyTorch file), then, until the
time is up, damages the last task's file (cut, bytes overwritten anywhere or in its first 600
bytes, bytes inserted, a header number replaced) and packs. Every try must pack or raise a
``TallpackError`` whose message is one line; anything else is printed as a finding and its file
kept. ``tests/test_sources_safety.py`` runs a few of the same damages under hypothesis.

    PYTHONPATH=. python tests/fuzz/damage_inputs.py /tmp/damage --seconds 150 --seed 1
"""

from __future__ import annotations

import argparse
import collections
import logging
import random
import time
from pathlib import Path


def damage(raw: bytes, rng: random.Random) -> tuple[str, bytes]:
    b = bytearray(raw)
    how = rng.choice(["cut", "flip", "head", "insert", "number"])
    if how == "cut":
        return how, bytes(b[: rng.randrange(len(b))])
    if how in ("flip", "head"):
        span = min(len(b), 600) if how == "head" else len(b)
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(span)] = rng.randrange(256)
    elif how == "insert":
        p = rng.randrange(len(b))
        b[p:p] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    else:  # a digit in the header replaced by a large, negative or zero number
        digits = [i for i, c in enumerate(b[:600]) if 48 <= c <= 57]
        if digits:
            i = rng.choice(digits)
            b[i : i + 1] = str(rng.choice([0, 9, 99999999999, 2**40, -1])).encode()
    return how, bytes(b)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("work", type=Path)
    ap.add_argument("--seconds", type=float, default=120)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    import torch
    from safetensors.torch import save_file

    import tallpack
    from tallpack.errors import TallpackError

    logging.getLogger("tallpack").setLevel(logging.ERROR)  # the packer's warnings about odd values
    d: Path = a.work
    d.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    base = {"a.weight": torch.randn(64, 32, generator=g), "a.bias": torch.randn(64, generator=g),
            "emb": torch.randn(100, 16, generator=g).to(torch.bfloat16)}
    tasks = [{k: (v.float() + 0.01 * torch.randn(v.shape, generator=g)).to(v.dtype) for k, v in base.items()}
             for _ in range(2)]
    save_file(base, d / "base.safetensors")
    save_file(tasks[0], d / "t0.safetensors")
    save_file(tasks[1], d / "t1.safetensors")
    torch.save(tasks[1], d / "t1.pt")
    good = {"safetensors": (d / "t1.safetensors").read_bytes(), "pt": (d / "t1.pt").read_bytes()}
    rng = random.Random(a.seed)
    outcomes: collections.Counter = collections.Counter()
    findings = 0
    end = time.monotonic() + a.seconds
    while time.monotonic() < end:
        kind = rng.choice(sorted(good))
        how, data = damage(good[kind], rng)
        bad = d / f"bad.{kind}"
        bad.write_bytes(data)
        finding = None
        try:
            tallpack.pack(d / "base.safetensors", {"t0": d / "t0.safetensors", "t1": bad}, d / "out.tallpack",
                          overwrite=True)
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
