import subprocess, sys, json, statistics as st, os
trees = {"old": "/tmp/r31/pw", "new": "/work/main"}
code = r'''
import sys, time, statistics as st, json
import torch, tallpack
from safetensors import safe_open
arch, name = sys.argv[1], "layers.3.up.weight"
path = "/tmp/r31/fam/family-h512-v8000-L7-s0-g1/task1.safetensors"
assert tallpack.__file__.startswith(sys.argv[2]), tallpack.__file__
with tallpack.open(arch) as fam, safe_open(path, "pt") as f:
    fam.get_tensor("task1", name); f.get_tensor(name).clone()
    tp, ts = [], []
    for i in range(60):
        for side in ((0, 1) if i % 2 == 0 else (1, 0)):
            t0 = time.perf_counter()
            if side == 0:
                x = fam.get_tensor("task1", name); tp.append(time.perf_counter() - t0)
            else:
                y = f.get_tensor(name).clone(); ts.append(time.perf_counter() - t0)
print(json.dumps(st.median(tp) / st.median(ts)))
'''
res = {k: {} for k in trees}
archs = sys.argv[2:]
for r in range(int(sys.argv[1])):
    for k in (list(trees) if r % 2 == 0 else list(trees)[::-1]):
        for a in archs:
            env = dict(os.environ, PYTHONPATH=trees[k])
            out = subprocess.run([sys.executable, "-c", code, a, trees[k]], env=env, capture_output=True, text=True, cwd="/tmp")
            if out.returncode:
                print(out.stderr[-2000:]); sys.exit(1)
            res[k].setdefault(a, []).append(json.loads(out.stdout.strip().splitlines()[-1]))
for k in trees:
    for a, v in res[k].items():
        print(k, a.split("/")[-1], "median %.2f best %.2f" % (st.median(v), min(v)))
