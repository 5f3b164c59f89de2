"""Build the task D families: fp32 and bf16, 4 tasks, safetensors files; pack plain, raw, exact."""
import os
from pathlib import Path
import sys, time
import torch
from safetensors.torch import save_file
import tallpack

D = Path(os.environ.get("R34_REMOTE_DIR", "/tmp/r34/d"))

def family(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = {"embed.weight": torch.randn(4096, 512, generator=g) * 0.02}
    for i in range(6):
        base[f"layers.{i}.attn.weight"] = torch.randn(512, 512, generator=g) * 0.02
        base[f"layers.{i}.mlp.up.weight"] = torch.randn(1024, 512, generator=g) * 0.02
        base[f"layers.{i}.mlp.down.weight"] = torch.randn(512, 1024, generator=g) * 0.02
        base[f"layers.{i}.norm.weight"] = torch.ones(512) + 0.01 * torch.randn(512, generator=g)
        base[f"layers.{i}.mlp.up.bias"] = 0.01 * torch.randn(1024, generator=g)
    base = {k: v.to(dtype) for k, v in base.items()}
    tasks = {}
    for t in range(4):
        tasks[f"task{t}"] = {k: (v.float() + 0.002 * torch.randn(v.shape, generator=g)
                                 * (torch.rand(v.shape, generator=g) < 0.3)).to(dtype).contiguous() for k, v in base.items()}
    return base, tasks

for name, dt in [("fp32", torch.float32), ("bf16", torch.bfloat16)]:
    base, tasks = family(dt)
    src = D / "src" / name
    (src / "base").mkdir(parents=True, exist_ok=True)
    save_file(base, str(src / "base" / "model.safetensors"))
    for t, sd in tasks.items():
        (src / t).mkdir(exist_ok=True)
        save_file(sd, str(src / t / "model.safetensors"))
    taskpaths = {t: str(src / t) for t in tasks}
    for kind, kw in [("plain", {}), ("raw", {"codec": "raw"}), ("exact", {"exact": True})]:
        out = D / "www" / f"{name}-{kind}.tallpack"
        out.parent.mkdir(exist_ok=True)
        t0 = time.time()
        tallpack.pack(str(src / "base"), taskpaths, out, chunk_elements=1 << 16, overwrite=True, **kw)
        print(name, kind, out.stat().st_size, f"{time.time()-t0:.1f}s", flush=True)
