"""Goal 6 alone (the dense codec against ZipNN on the same bytes), on perf.py's family.

    python benchmarks/rounds/r36/lead_goal6.py DIR [--reps 5]

DIR: a folder perf.py --out left (its family is reused, or made there). Prints perf.py's goal-6 rows.
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import perf  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("out", type=Path)
ap.add_argument("--reps", type=int, default=5)
a = ap.parse_args()
fam = perf.make_family(a.out, 26e6, 8, 0)
rep, details = perf.Report(), {}
rep.load.mark()
perf.goal_codec(fam, a.reps, rep, details)
print(json.dumps([{k: r[k] for k in ("what", "ours", "alternative", "unit", "ratio", "met", "alt_label")}
                  for r in rep.rows], indent=1))
