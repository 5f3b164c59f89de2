"""Peak memory and time of packing a family whose largest tensors are too large to hold every
task's copy of at once (an LLM's embedding and MLP matrices), against ``zstd -3 -T2`` over the
same files in the same run (and, with ``--other``, against another checkout's pack: before/after
a change).

    python benchmarks/pack_memory.py [--params 200e6] [--hidden 2048] [--vocab 32000] [--tasks 4]
                                     [--dtype bfloat16] [--rounds 3] [--other /tmp/old]

Each pack runs in a fresh process (``cwd=/``, the checkout on PYTHONPATH), torch imported before
the baseline; RssAnon (``/proc/self/status``: page cache and mapped files are not counted)
sampled every 2 ms by a thread. The family's files are read once before the first round (page
cache warm for every side). Reports each side's median peak over the baseline, against the
largest tensor, and its median time against zstd's of the same round. Numbers go in
BENCHMARKS.md.
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
from pathlib import Path


HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from ab_pack import zstd  # noqa: E402
from pack_scale import made_family, memory_options, run_child  # noqa: E402

CHILD = """
base, out, tasks = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
measured(lambda: tallpack.pack(base, tasks, out, threads=2, overwrite=True))
"""


def pack(checkout: Path, base: Path, tasks: dict[str, Path], out: Path) -> dict:
    got = run_child(checkout, CHILD, str(base), str(out), json.dumps({k: str(v) for k, v in tasks.items()}))
    got["size"] = out.stat().st_size
    return got


def main() -> None:
    a = memory_options(__doc__, 200e6, shape=True)
    here = HERE.parent
    with made_family(a) as (root, base, tasks, largest):
        files = [base, *tasks.values()]
        inputs = sum(f.stat().st_size for f in files)
        for f in files:  # the page cache warm for every side
            with open(f, "rb") as fh:
                while fh.read(1 << 24):
                    pass
        sides = [("this checkout", here)] + ([("other checkout", a.other)] if a.other else [])
        runs: dict[str, list[dict]] = {label: [] for label, _ in sides}
        zs: list[float] = []
        for r in range(a.rounds):
            zs.append(zstd(files, root / "zst"))
            shutil.rmtree(root / "zst")
            for label, checkout in sides if r % 2 == 0 else sides[::-1]:
                got = pack(checkout, base, tasks, root / "out.tallpack")
                got["ratio"] = got["seconds"] / zs[-1]
                runs[label].append(got)
    mb = 1 << 20
    print(f"family: {a.params:.3g} parameters (hidden {a.hidden}, vocab {a.vocab}), {a.dtype}, base + {a.tasks}; "
          f"inputs {inputs / mb:.0f} MB, largest tensor {largest / mb:.1f} MB; medians of {a.rounds}; "
          f"zstd -3 -T2 {statistics.median(zs):.2f} s")
    for label, rs in runs.items():
        grown = statistics.median(r["grown"] for r in rs)
        secs = statistics.median(r["seconds"] for r in rs)
        ratio = statistics.median(r["ratio"] for r in rs)
        print(f"  {label:16s} peak RssAnon +{grown / mb:7.1f} MB ({grown / largest:.1f}x the largest tensor, "
              f"{grown / inputs:.2f}x the inputs); {secs:.2f} s, {ratio:.2f}x zstd's; archive {rs[-1]['size'] / mb:.1f} MB")


if __name__ == "__main__":
    main()
