"""Goal 4's calls timed by wall clock and by the process's CPU time (every thread's), from two
source trees alternated in fresh processes: on a machine whose load is far above its cores (this
round's: 6-14 on 2), wall-clock medians of 200 us calls measure the scheduler, while CPU time
measures the work (cache misses from the neighbours still count).

    python benchmarks/rounds/r34/A_goal4_cpu.py ROUNDS TREE_A TREE_B ARCHIVE [ARCHIVE ...]

In each process: one warm-up call each, then 200 alternated calls of ``get_tensor(task1,
layers.0.up.weight)`` on the open archive (``cache_bytes`` 512 MiB, as perf.py) and of
``safe_open().get_tensor()`` + clone, as perf.py's goal-4 child; prints per tree and archive the
median over processes of each side's median, and the ratio.
"""

from __future__ import annotations

import json
import os
import statistics as st
import subprocess
import sys

FAMILY = os.environ.get("A_FAMILY", "benchmarks/out/family-h512-v8000-L7-s0-g1")
CODE = r'''
import json, sys, time, statistics as st
import torch, tallpack
from safetensors import safe_open
arch, path, name = sys.argv[1], sys.argv[2], "layers.0.up.weight"
with tallpack.open(arch, cache_bytes=512 << 20) as fam, safe_open(path, "pt") as f:
    fam.get_tensor("task1", name); f.get_tensor(name).clone()
    w = {0: [], 1: []}; c = {0: [], 1: []}
    for i in range(200):
        for side in ((0, 1) if i % 2 == 0 else (1, 0)):
            c0, t0 = time.process_time(), time.perf_counter()
            x = fam.get_tensor("task1", name) if side == 0 else f.get_tensor(name).clone()
            w[side].append(time.perf_counter() - t0); c[side].append(time.process_time() - c0)
            del x
print(json.dumps({"wall": [st.median(w[0]), st.median(w[1])], "cpu": [st.median(c[0]), st.median(c[1])],
                  "file": tallpack.__file__}))
'''


def main() -> None:
    rounds, trees, archives = int(sys.argv[1]), sys.argv[2:4], sys.argv[4:]
    path = os.path.abspath(f"{FAMILY}/task1.safetensors")
    got: dict[tuple[str, str], list[dict]] = {}
    for r in range(rounds):
        for tree in (trees if r % 2 == 0 else trees[::-1]):
            for arch in archives:
                env = dict(os.environ, PYTHONPATH=tree, OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
                out = subprocess.run([sys.executable, "-c", CODE, os.path.abspath(arch), path], env=env,
                                     capture_output=True, text=True, cwd="/tmp")
                if out.returncode:
                    raise SystemExit(out.stderr[-3000:])
                res = json.loads(out.stdout.strip().splitlines()[-1])
                assert res["file"].startswith(tree), res["file"]
                got.setdefault((tree, arch), []).append(res)
    for arch in archives:
        for tree in trees:
            rs = got[(tree, arch)]
            line = []
            for k in ("wall", "cpu"):
                tp, sf = st.median(x[k][0] for x in rs), st.median(x[k][1] for x in rs)
                line.append(f"{k} {tp * 1e6:6.1f} / {sf * 1e6:6.1f} us = {tp / sf:4.2f}x")
            print(f"{os.path.basename(arch):16s} {tree:22s} " + "; ".join(line))
    print("load average after:", os.getloadavg())


if __name__ == "__main__":
    main()
