"""``A_slices.py`` from two source trees, alternated in fresh processes (ROUNDS rounds, both
orders), then the median seconds of each: before/after of the kept tau_MTL rows.

    python benchmarks/rounds/r34/A_slices_ab.py ROUNDS TREE_A TREE_B DIR [A_slices.py options]
"""

from __future__ import annotations

import json
import os
import statistics as st
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    rounds, trees, d, extra = int(sys.argv[1]), sys.argv[2:4], sys.argv[4], sys.argv[5:]
    got: dict[tuple[str, str], list[dict]] = {}
    for r in range(rounds):
        for tree in (trees if r % 2 == 0 else trees[::-1]):
            for order in ("rank", "task"):
                env = dict(os.environ, PYTHONPATH=tree)
                out = subprocess.run([sys.executable, str(HERE / "A_slices.py"), d, "--order", order, *extra],
                                     env=env, capture_output=True, text=True, cwd="/tmp")
                if out.returncode:
                    raise SystemExit(out.stderr[-3000:])
                got.setdefault((tree, order), []).append(json.loads(out.stdout.strip().splitlines()[-1]))
    for (tree, order), rs in sorted(got.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        print(f"{order:5s} {tree:24s} median {st.median(r['seconds'] for r in rs):6.2f} s "
              f"(all {', '.join('%.2f' % r['seconds'] for r in rs)}), CPU median "
              f"{st.median(r['cpu_seconds'] for r in rs):6.2f} s (all {', '.join('%.2f' % r['cpu_seconds'] for r in rs)}), max RSS {max(r['maxrss_mb'] for r in rs)} MB, "
              f"cache {rs[-1]['cache_bytes_held'] >> 20} MiB")
    print("load average after:", os.getloadavg())


if __name__ == "__main__":
    main()
