import sys, time, torch, tempfile, os, statistics as st
root = sys.argv[1]; sys.path.insert(0, root)
import tallpack
assert tallpack.__file__.startswith(root), tallpack.__file__
d = "/tmp/r32/ptfam"
if not os.path.exists(f"{d}/base.pt"):
    os.makedirs(d, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    base = {f"l{i}.w": torch.randn(64, 64, generator=g) for i in range(500)} | {f"big{i}": torch.randn(1024, 1024, generator=g) for i in range(20)}
    torch.save({"model": base}, f"{d}/base.pt")
    for t in "ab":
        torch.save({"model": {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}}, f"{d}/{t}.pt")
ts = []
for r in range(5):
    t0 = time.perf_counter()
    tallpack.pack(f"{d}/base.pt", {t: f"{d}/{t}.pt" for t in "ab"}, f"{d}/x.tallpack", overwrite=True)
    ts.append(time.perf_counter() - t0)
print(root, "pack median %.3f s" % st.median(ts), ["%.2f" % x for x in ts])
