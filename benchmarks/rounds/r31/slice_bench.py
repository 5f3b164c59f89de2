import sys, time, torch, tallpack, statistics as st
from pathlib import Path
from safetensors import safe_open
from safetensors.torch import save_file
d = Path("/tmp/r31/slb"); d.mkdir(exist_ok=True)
if not (d / "x.tallpack").exists():
    g = torch.Generator().manual_seed(0)
    base = {"emb": torch.randn(32000, 2048, generator=g).to(torch.bfloat16)}  # 65.5M elements, 131 MB
    save_file(base, d / "base.safetensors")
    tasks = {}
    for t in range(3):
        v = base["emb"].float()
        sd = {"emb": (v + 0.01 * torch.randn(v.shape, generator=g) * (torch.rand(v.shape, generator=g) < 0.2)).to(torch.bfloat16)}
        save_file(sd, d / f"t{t}.safetensors"); tasks[f"t{t}"] = str(d / f"t{t}.safetensors"); del sd, v
    tallpack.pack(str(d / "base.safetensors"), tasks, str(d / "x.tallpack"), exact=True)
which = sys.argv[1]
n = 8
t0 = time.perf_counter()
with tallpack.open(d / "x.tallpack", cache_bytes=0) as fam:
    if which == "slice":
        x = fam.get_slice("t1", "emb", exact=True)[0 : 32000 // n]
    else:
        x = fam.get_tensor("t1", "emb", exact=True)[0 : 32000 // n].clone()
t1 = time.perf_counter()
with safe_open(d / "t1.safetensors", "pt") as f:
    y = f.get_slice("emb")[0 : 32000 // n].clone()
t2 = time.perf_counter()
assert torch.equal(x.view(torch.int16), y.view(torch.int16))
import resource
print(which, "tallpack %.3f s, safetensors slice %.3f s, ratio %.1fx, maxrss %d MB" % (t1 - t0, t2 - t1, (t1 - t0) / (t2 - t1), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10))
