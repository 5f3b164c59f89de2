"""Task D (round 35): the remote benchmark's families, packed four ways, into R35_REMOTE_DIR/www.

    python benchmarks/rounds/r35/D_build.py
"""
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import tallpack  # noqa: E402
from remote_bytes import family  # noqa: E402

D = Path(os.environ.get("R35_REMOTE_DIR", "/tmp/r35/d")) / "www"
D.mkdir(parents=True, exist_ok=True)
for dtype in (torch.bfloat16, torch.float32):
    base, tasks = family()
    base = {k: v.to(dtype) for k, v in base.items()}
    tasks = {t: {k: v.to(dtype) for k, v in sd.items()} for t, sd in tasks.items()}
    tag = str(dtype).split(".")[1]
    for exact in (False, True):
        out = D / f"{tag}{'-exact' if exact else ''}.tallpack"
        if not out.exists():
            tallpack.pack(base, tasks, out, chunk_elements=1 << 16, exact=exact)
        print(out, out.stat().st_size)
    if dtype == torch.bfloat16:  # default chunks (4M elements: a tensor a chunk), and 12 tasks
        out = D / "bfloat16-chunks4M.tallpack"
        if not out.exists():
            tallpack.pack(base, tasks, out)
        print(out, out.stat().st_size)
        out = D / "bfloat16-t12.tallpack"
        if not out.exists():
            b4 = {k: v for k, v in base.items() if int(k.split(".")[2]) < 4}
            g = torch.Generator().manual_seed(12)
            t12 = {f"task{t}": {k: (v.float() + 0.01 * torch.randn(v.shape, generator=g)
                                    * (torch.rand(v.shape, generator=g) < 0.3)).to(v.dtype) for k, v in b4.items()}
                   for t in range(12)}
            tallpack.pack(b4, t12, out, chunk_elements=1 << 16)
        print(out, out.stat().st_size)

# one large tensor (an embedding of 32M bf16 elements, 64 MiB) and two tasks: reads whose requests
# are larger than MAX_REQUEST (lead 2)
out = D / "bfloat16-big.tallpack"
if not out.exists():
    g = torch.Generator().manual_seed(2)
    big = {"embed.weight": torch.randn(8192, 4096, generator=g).bfloat16(),
           "norm.weight": torch.ones(4096).bfloat16()}
    tb = {f"task{t}": {k: (v.float() + 0.01 * torch.randn(v.shape, generator=g)
                           * (torch.rand(v.shape, generator=g) < 0.3)).to(v.dtype) for k, v in big.items()}
          for t in range(3)}
    tallpack.pack(big, tb, out)
print(out, out.stat().st_size)
