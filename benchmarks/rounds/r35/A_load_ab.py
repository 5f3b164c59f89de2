"""Goal 1's rows (a first task in a fresh process: open + ``state_dict``, every tensor built, as
``benchmarks/perf.py``'s ``load_tp`` child times it) under two or more builds of the compiled loops,
against ``load_file`` + clone, in fresh processes, the order shuffled each round. The Python is this
checkout's; each child imports the named ``_kernels*.so`` as ``tallpack._kernels``.

    python benchmarks/rounds/r35/A_load_ab.py ROUNDS ARCHIVE TASK_FILE SO_A SO_B [SO ...]

Prints per side the median and best wall time, user+system CPU and minor faults, and the ratio of
medians to load_file + clone's.
"""

from __future__ import annotations

import json
import os
import random
import resource
import statistics as st
import subprocess
import sys
import time


def child() -> None:
    so, arch, task = sys.argv[1], sys.argv[2], sys.argv[3]
    import gc

    import torch  # noqa: F401  (imported before timing, by every side)
    if so != "-":
        import importlib.util
        spec = importlib.util.spec_from_file_location("tallpack._kernels", so)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        sys.modules["tallpack._kernels"] = mod
        import tallpack
        from tallpack import kernels
        assert kernels._kernels is mod
    from safetensors.torch import load_file
    gc.collect()
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    if so == "-":
        sd = {k: v.clone() for k, v in load_file(task).items()}
    else:
        with tallpack.open(arch, cache_bytes=512 << 20) as fam:
            sd = fam.state_dict(os.path.basename(task).split(".")[0])
    sec = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"seconds": sec, "cpu": r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime,
                      "minflt": r1.ru_minflt - r0.ru_minflt, "n": len(sd)}))


def main() -> None:
    rounds, arch, task, sos = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4:]
    sides = {**{"ABCDEFGH"[i]: so for i, so in enumerate(sos)}, "st": "-"}
    runs: dict[str, list[dict]] = {k: [] for k in sides}
    env = dict(os.environ, OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
    rng = random.Random(0)
    for _ in range(rounds):
        order = list(sides)
        rng.shuffle(order)
        for k in order:
            out = subprocess.run([sys.executable, __file__, "--child", sides[k], arch, task], env=env,
                                 capture_output=True, text=True, check=True)
            runs[k].append(json.loads(out.stdout.strip().splitlines()[-1]))
    ref = st.median(r["seconds"] for r in runs["st"])
    ref_cpu = st.median(r["cpu"] for r in runs["st"])
    print(f"{os.path.basename(arch)}  {os.path.basename(task)}  rounds {rounds}")
    for k, rs in runs.items():
        s = [r["seconds"] for r in rs]
        c = [r["cpu"] for r in rs]
        print(f"  {k:3s} wall med {st.median(s) * 1e3:7.1f} ms best {min(s) * 1e3:7.1f}  cpu med {st.median(c) * 1e3:7.1f} ms"
              f"  minflt {st.median(r['minflt'] for r in rs):8.0f}  ratio wall {st.median(s) / ref:5.2f}x"
              f" cpu {st.median(c) / ref_cpu:5.2f}x  {sides[k]}")
    print("load average after:", os.getloadavg())


if __name__ == "__main__":
    if sys.argv[1] == "--child":
        sys.argv.pop(1)
        child()
    else:
        main()
