"""A family of many mid-size tensors (64 x 270K elements, float32, base + 3): side by side vs one at a time."""
import os, statistics, sys, time
import torch, tallpack
from tallpack.merged import MergedModel
out = "/tmp/r33H/many.tallpack"
if not os.path.exists(out):
    g = torch.Generator().manual_seed(0)
    base = {f"l{i}.w": torch.randn(520, 520, generator=g) * 0.02 for i in range(64)}
    fts = {}
    for t in range(3):
        fts[f"t{t}"] = {k: v + 1e-3 * torch.randn(v.shape, generator=g) * (torch.rand(v.shape, generator=g) < 0.3) for k, v in base.items()}
    tallpack.pack(base, fts, out, merge="ta", codec="planes")
fam = tallpack.open(out, cache_bytes=0)
orig = MergedModel.whole
seq = lambda self, share=None: dict(self)
fam.state_dict("t0"); fam.merged("ta"); fam.merged("consensus-ta")
times = {}
for r in range(int(sys.argv[1]) if len(sys.argv) > 1 else 7):
    t0 = time.perf_counter(); sd = fam.state_dict("t0"); times.setdefault(("unpack", ""), []).append(time.perf_counter() - t0); del sd
    for m in ("consensus-ta", "ta"):
        for side in ((True, False) if r % 2 == 0 else (False, True)):
            MergedModel.whole = orig if side else seq
            t0 = time.perf_counter(); sd = fam.merged(m); times.setdefault((m, side), []).append(time.perf_counter() - t0); del sd
u = statistics.median(times[("unpack", "")])
for k, v in times.items():
    print(f"| many | {k[0]} | {k[1]} | {statistics.median(v):.3f} | {statistics.median(v) / u:.2f} |")
