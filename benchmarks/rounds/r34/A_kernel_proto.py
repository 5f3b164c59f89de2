"""Prototypes of ``tall_f32``'s bit loop (``A_kernel_proto.c``, not the library's), timed on a raw
archive's 4 MB tensor against the library's loop and torch's clone, each into a fresh output,
in turns (400 rounds), in one process. The prototypes give the library's bits (checked first).

    python benchmarks/rounds/r34/A_kernel_proto.py RAW_ARCHIVE

v0: the library's AVX2 bit loop, 8 elements an iteration; v1: 32 an iteration, the mask's 4 bytes
loaded once; v2: v1 with non-temporal stores (no read for ownership of the fresh output's lines);
vadd: base + merged (the traffic of 2 reads, 1 write); vcopy: memcpy (1 read, 1 write).
"""

from __future__ import annotations

import ctypes
import statistics as st
import subprocess
import sys
import time
from pathlib import Path

import torch

import tallpack
from tallpack import kernels
from tallpack.reader import Use

SO = Path("/tmp/tallpack_kernel_proto.so")


def main() -> None:
    subprocess.run(["gcc", "-O3", "-mavx2", "-ffp-contract=off", "-shared", "-fPIC",
                    str(Path(__file__).with_name("A_kernel_proto.c")), "-o", str(SO)], check=True)
    lib = ctypes.CDLL(str(SO))
    name = "layers.0.up.weight"
    P = ctypes.c_void_p

    def call(fn, b, m, k, o) -> None:
        fn(P(b.ctypes.data), P(m.ctypes.data), P(k.ctypes.data), P(o.ctypes.data), ctypes.c_ssize_t(b.size))
    with tallpack.open(sys.argv[1]) as fam:
        e = fam._tensors[name]
        base = fam.read_array(e.arrays["base"], "b", Use.SHARED_INPUT).numpy().reshape(-1)
        merged = fam.read_array(e.arrays["merged"], "m", Use.SHARED_INPUT).numpy().reshape(-1)
        bits = fam._read_bits(e.tasks["task1"].arrays["mask"], "mask", None).packed
        n = base.size
        ref = torch.empty(n).numpy()
        kernels.tall_f32(base, merged, bits, ref, 1, bits=True)
        for v in ("v0", "v1", "v2"):
            o = torch.empty(n).numpy()
            call(getattr(lib, v), base, merged, bits, o)
            assert o.tobytes() == ref.tobytes(), v
        res: dict[str, list[float]] = {}
        for _ in range(400):
            for v in ("library", "v0", "v1", "v2", "vadd", "vcopy", "torch clone"):
                t0 = time.perf_counter()
                o = torch.empty(n)
                if v == "library":
                    kernels.tall_f32(base, merged, bits, o.numpy(), 1, bits=True)
                elif v == "torch clone":
                    o = torch.from_numpy(base).clone()
                else:
                    call(getattr(lib, v), base, merged, bits, o.numpy())
                res.setdefault(v, []).append(time.perf_counter() - t0)
                del o
    for v, ts in res.items():
        print(f"{v:12s} median {st.median(ts) * 1e6:6.1f} us, best {min(ts) * 1e6:6.1f} us")


if __name__ == "__main__":
    main()
