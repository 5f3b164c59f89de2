"""The compiled rebuilds with a byte mask (after ``unpack_bits``) against the same loops reading the
mask's stored bits (``bits=True``), one thread, hot caches: what reading a task's mask as bits
saves in the loops themselves (BENCHMARKS.md, tenth performance round). Checks that both give the
same bits, then prints a markdown table of the fastest of 5 repeats per loop and size.

    python benchmarks/mask_bits.py
"""

from __future__ import annotations

import argparse
import timeit

import numpy as np

from tallpack import _kernels as K


def fastest(fn, n: int) -> float:
    calls = 200 if n < 1 << 20 else 20
    return min(timeit.repeat(fn, number=calls, repeat=5)) / calls


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()  # --help, nothing to set
    rng = np.random.default_rng(0)
    print("| elements | loop | unpack_bits | byte mask | unpack + byte mask | bits | bits / (unpack + bytes) |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for n in (1 << 16, 1 << 20, 1 << 22):
        base = rng.standard_normal(n).astype(np.float32)
        merged = rng.standard_normal(n).astype(np.float32)
        mask = (rng.random(n) < 0.3).astype(np.uint8)
        bits = np.packbits(mask, bitorder="little")
        bp = [np.ascontiguousarray(base.view(np.uint8).reshape(n, 4)[:, j]) for j in range(4)]
        mp = [np.ascontiguousarray(merged.view(np.uint8).reshape(n, 4)[:, j]) for j in range(4)]
        o32, o16 = np.empty(n, np.float32), np.empty(n, np.uint16)
        loops = {
            "tall_f32": lambda m, b, o=o32: K.tall_f32(base, merged, m, o, b),
            "tall_planes": lambda m, b, o=o32: K.tall_planes(bp, 3, mp, 2, m, o, b),
            "tall_planes_bf16": lambda m, b, o=o16: K.tall_planes_bf16(bp[:2], 1, mp, 2, m, o, b),
            "tall_planes_f16": lambda m, b, o=o16: K.tall_planes_f16(bp[:2], 1, mp, 2, m, o, b),
        }
        unpacked = np.empty(n, np.uint8)
        unpack = fastest(lambda: K.unpack_bits(bits, unpacked), n)
        for name, run in loops.items():
            run(mask, False)
            want = (o32 if name == "tall_f32" or name == "tall_planes" else o16).copy()
            run(bits, True)
            got = o32 if name == "tall_f32" or name == "tall_planes" else o16
            assert got.tobytes() == want.tobytes(), name
            t_bytes = fastest(lambda: run(mask, False), n)
            t_bits = fastest(lambda: run(bits, True), n)
            print(f"| {n:,} | `{name}` | {unpack * 1e3:.3f} ms | {t_bytes * 1e3:.3f} ms | "
                  f"{(unpack + t_bytes) * 1e3:.3f} ms | {t_bits * 1e3:.3f} ms | {t_bits / (unpack + t_bytes):.2f} |")


if __name__ == "__main__":
    main()
