import sys, statistics as st
sys.path.insert(0, "/work/main/benchmarks")
import perf
fam = "/tmp/r31/fam/family-h512-v8000-L7-s0-g1"
arch = sys.argv[2:]
res = {a: [] for a in arch}
for i in range(int(sys.argv[1])):
    for a in (arch if i % 2 == 0 else arch[::-1]):
        r = perf.run_child("get_tensor", {"archive": a, "task": "task1", "name": "layers.3.up.weight", "path": fam + "/task1.safetensors", "reps": 60, "floors": False})
        res[a].append(st.median(r["tallpack"]) / st.median(r["safetensors"]))
for a, v in res.items():
    print(a, "median %.2f  best %.2f" % (st.median(v), min(v)), " ".join("%.2f" % x for x in v))
