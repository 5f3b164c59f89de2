"""Peak memory of writing a merged model, against unpacking one task of the same archive, in the
same run (and, with ``--other``, against another checkout's merge: before/after a change).

    python benchmarks/merge_memory.py [--params 100e6] [--tasks 4] [--dtype bfloat16] [--other /tmp/old]

Each write runs in a fresh process (``cwd=/``, the checkout on PYTHONPATH), torch imported before
the baseline; RssAnon (``/proc/self/status``: the mapped archive's pages are not counted) sampled
every 2 ms by a thread. Reports each peak over the baseline, the largest tensor and the model's
bytes, medians of ``--rounds`` runs alternated. Numbers go in BENCHMARKS.md.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path


HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from pack_scale import made_family, memory_options, run_child  # noqa: E402

CHILD = """
archive, out, what = sys.argv[1:4]
fam = tallpack.open(archive, cache_bytes=0)
if what == "merge":
    measured(lambda: tallpack.write_merged(fam, out, alpha=0.5, overwrite=True))
else:
    measured(lambda: tallpack.write_task(fam, fam.tasks[0], out, overwrite=True))
"""


def run(checkout: Path, archive: Path, out: Path, what: str) -> dict:
    return run_child(checkout, CHILD, str(archive), str(out), what)


def main() -> None:
    a = memory_options(__doc__, 100e6)
    here = HERE.parent
    with made_family(a) as (root, base, tasks, largest):
        archive = root / "f.tallpack"
        import tallpack
        tallpack.pack(base, tasks, archive)
        model = base.stat().st_size
        runs: dict[str, list[dict]] = {}
        kinds = [("merge", here, "merge"), ("unpack", here, "unpack")]
        if a.other:
            kinds.append(("merge, other checkout", a.other, "merge"))
        for _ in range(a.rounds):
            for label, checkout, what in kinds:
                runs.setdefault(label, []).append(run(checkout, archive, root / "out", what))
    mb = 1 << 20
    print(f"family: {a.params:.3g} parameters, {a.dtype}, base + {a.tasks}; model {model / mb:.1f} MB, "
          f"largest tensor {largest / mb:.1f} MB; medians of {a.rounds}")
    unpack = statistics.median(r["grown"] for r in runs["unpack"])
    for label, rs in runs.items():
        grown = statistics.median(r["grown"] for r in rs)
        secs = statistics.median(r["seconds"] for r in rs)
        print(f"  {label:24s} peak RssAnon +{grown / mb:7.1f} MB ({grown / model:.2f}x the model, "
              f"{grown / largest:.1f}x the largest tensor, {grown / unpack:.2f}x unpack's) in {secs:.2f} s")


if __name__ == "__main__":
    main()
