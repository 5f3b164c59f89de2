import os, sys
if sys.argv[1:] == ["p"]: os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
import time, sys, torch, tallpack, statistics as st
p = "/tmp/r32/p4.tallpack"
res = {}
with tallpack.open(p, cache_bytes=0) as fam:
    fam.state_dict("task1"); fam.merged()
    for r in range(5):
        for nt in (2, 1):
            torch.set_num_threads(nt)
            for kind in ("sd", "merge"):
                t0 = time.perf_counter()
                sd = fam.merged() if kind == "merge" else fam.state_dict("task1")
                res.setdefault((kind, nt), []).append(time.perf_counter() - t0)
                del sd
for k, v in sorted(res.items()):
    print(k, "median %.3f s" % st.median(v), ["%.2f" % x for x in v])
