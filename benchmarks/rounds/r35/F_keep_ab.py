"""Round 35, helper F: the cost of not keeping a thread's buffers over ``memory.KEEP_BYTES``.

A bf16 family stored with ``--codec zstd`` (whole arrays decoded into the thread's buffers: base
48 MB, merged vector 96 MB for a 6144x4096 tensor), read with ``cache_bytes=0, threads=1`` by one
thread, ``get_tensor`` of the large tensor again and again, the bound at 64 MiB and off, alternated
in one process; medians. Also: what the thread keeps afterwards.

    python benchmarks/rounds/r35/F_keep_ab.py /tmp/r35F/big/bf16z.tallpack
"""

from __future__ import annotations

import statistics
import sys
import time

import numpy as np

import tallpack
from tallpack import memory


def main(path: str, rounds: int = 15) -> None:
    times: dict[str, list[float]] = {"kept (no bound)": [], "bound 64 MiB": []}
    with tallpack.open(path, cache_bytes=0, threads=1) as fam:
        fam.get_tensor("a", "emb")
        for i in range(rounds):
            for label, bound in (("kept (no bound)", 1 << 40), ("bound 64 MiB", 64 << 20))[:: 1 if i % 2 else -1]:
                memory.KEEP_BYTES = bound
                fam.get_tensor("a", "emb")  # the buffers as this bound leaves them
                t0 = time.perf_counter()
                fam.get_tensor("a", "emb")
                times[label].append(time.perf_counter() - t0)
                held = sum(v.nbytes for b in memory._ALL for v in b._local.__dict__.values() if isinstance(v, np.ndarray))
                if i == 0:
                    print(f"{label}: this thread keeps {held >> 20} MiB")
    for label, ts in times.items():
        print(f"{label}: median {1000 * statistics.median(ts):.1f} ms (min {1000 * min(ts):.1f}, n={len(ts)})")


if __name__ == "__main__":
    main(sys.argv[1])
