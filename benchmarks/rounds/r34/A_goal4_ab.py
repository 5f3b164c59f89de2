"""Goal 4 (raw), before and after, in one run: ``benchmarks/perf.py``'s own goal-4 child
(``--child get_tensor``: one warm-up call, then alternated ``get_tensor`` and
``safe_open().get_tensor()`` + clone) run from two source trees in turn, fresh processes,
alternating the trees' order each round.

    python benchmarks/rounds/r34/A_goal4_ab.py ROUNDS TREE_A TREE_B ARCHIVE [ARCHIVE ...]

Each tree must hold ``tallpack`` (its compiled loops built) and ``benchmarks/perf.py``. Prints,
per tree and archive, perf.py's figure (the median of the processes' medians, tallpack over
safetensors) and the median and best of the per-process ratios.
"""

from __future__ import annotations

import json
import os
import statistics as st
import subprocess
import sys

FAMILY = os.environ.get("A_FAMILY", "benchmarks/out/family-h512-v8000-L7-s0-g1")
NAME = os.environ.get("A_NAME", "layers.0.up.weight")


def child(tree: str, archive: str, task: str) -> dict:
    a = {"archive": archive, "task": task, "name": NAME, "path": os.path.abspath(f"{FAMILY}/{task}.safetensors"),
         "reps": 21, "cache_bytes": 512 << 20}
    env = dict(os.environ, PYTHONPATH=tree, OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
    out = subprocess.run([sys.executable, f"{tree}/benchmarks/perf.py", "--child", "get_tensor", json.dumps(a)],
                         env=env, capture_output=True, text=True, cwd="/tmp")
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    rounds, trees, archives = int(sys.argv[1]), sys.argv[2:4], sys.argv[4:]
    runs: dict[tuple[str, str], list[dict]] = {}
    for r in range(rounds):
        for tree in (trees if r % 2 == 0 else trees[::-1]):
            for arch in archives:
                runs.setdefault((tree, arch), []).append(child(tree, os.path.abspath(arch), "task1"))
    for arch in archives:
        for tree in trees:
            rs = runs[(tree, arch)]
            tp = st.median(st.median(x["tallpack"]) for x in rs)
            sf = st.median(st.median(x["safetensors"]) for x in rs)
            per = [st.median(x["tallpack"]) / st.median(x["safetensors"]) for x in rs]
            print(f"{os.path.basename(arch):18s} {tree:28s} tallpack {tp * 1e6:7.1f} us  safetensors {sf * 1e6:7.1f} us"
                  f"  perf.py ratio {tp / sf:5.2f}x  per process: median {st.median(per):5.2f}x best {min(per):5.2f}x")
    print("load average after:", os.getloadavg())


if __name__ == "__main__":
    main()
