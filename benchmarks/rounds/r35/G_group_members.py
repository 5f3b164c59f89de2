"""Round 35, helper G: a small tensor stored in a group (format 1.12; tensors under 262,144
elements) read alone decodes its group's chunks; with ``cache_bytes=0`` nothing is kept, so a
loader that reads every tensor alone (``get_slice`` per tensor, as a tensor-parallel rank does, or
``get_tensor``) decodes each group once per member. ``state_dict`` and a lazy state dict decode it
once. Times (min of 3, alternated) of one task of a Llama-style family (hidden 256, 4 layers,
vocab 8192: 28.6 MB float32; 37 of its 39 tensors in groups):

    python benchmarks/rounds/r35/G_group_members.py [--chunk-elements N]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

import tallpack

sys.path.insert(0, str(Path(__file__).parent))
from G_tp_ranks import family, pack, shard  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--chunk-elements", type=int, default=None)
    a = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        family(root, 256, 4, 8192)
        arch = root / "f.tallpack"
        pack(root, arch, *(["--chunk-elements", str(a.chunk_elements)] if a.chunk_elements else []))
        with tallpack.open(arch) as fam:
            grouped = sum(fam._member("chat", k) is not None for k in fam.keys("chat"))
            print(f"{grouped} of {len(fam.keys('chat'))} tensors in groups")
        modes = {
            "state_dict": lambda fam: fam.state_dict("chat"),
            "lazy, every tensor": lambda fam: [v for v in fam.state_dict("chat", lazy=True).values()],
            "get_tensor, every tensor": lambda fam: [fam.get_tensor("chat", k) for k in fam.keys("chat")],
            "get_slice, rank 0 of 4": lambda fam: [fam.get_slice("chat", k)[shard(fam.get_slice("chat", k).get_shape(), k, 0, 4)[1]]
                                                 for k in fam.keys("chat")],
        }
        for cache in (0, 1 << 30):
            times: dict[str, list[float]] = {}
            for _ in range(3):
                for label, run in modes.items():
                    with tallpack.open(arch, cache_bytes=cache) as fam:
                        t0 = time.perf_counter()
                        run(fam)
                        times.setdefault(label, []).append(time.perf_counter() - t0)
            print(f"cache_bytes={cache}: " + "; ".join(f"{k} {min(v):.3f} s" for k, v in times.items()), flush=True)


if __name__ == "__main__":
    main()
