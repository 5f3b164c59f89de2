"""Round 35, helper E: one exact task back in a fresh process, before and after its rebuild left
torch out (``tallpack unpack ARCHIVE --task T -o OUT --exact``, timed as a subprocess).

    python benchmarks/rounds/r35/E_exact_start.py --before /tmp/main-before [--rounds 5]

``--before`` is a checkout of the tree to compare with (a ``git worktree`` of the earlier commit,
with the compiled ``_kernels*.so`` copied in); ``--after`` this one (default). For each dtype it
trains ``exact_vs_delta.trained_family`` (bf16, fp32, fp16; 8 tasks, hidden 256, vocab 4096),
packs it with ``--exact`` once (with this tree), then runs the unpack of one task with each tree
in turn, ``rounds`` times each, alternated: medians of the wall time, whether torch was imported
(``-X importtime``, a run of its own), and that both trees wrote the same bytes (SHA-256 of every
file).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO / "benchmarks"))


#: what is unpacked: one task (``--task task0``), or with ``--all-tasks`` every task (``--all``)
WHICH = ["--task", "task0"]


def _unpack(tree: Path, archive: Path, out: Path, importtime: bool = False) -> tuple[float, str]:
    cmd = [sys.executable, *(["-X", "importtime"] if importtime else []), "-m", "tallpack", "unpack", str(archive),
           *WHICH, "-o", str(out), "--exact", "-f"]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    t0 = time.perf_counter()  # (run outside any checkout: ``-m`` puts the working folder first on sys.path)
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=out.parent)
    wall = time.perf_counter() - t0
    if p.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
    return wall, p.stderr


def _shas(out: Path) -> dict[str, str]:
    return {str(f.relative_to(out)): hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(out.rglob("*"))
            if f.is_file()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", type=Path, required=True)
    ap.add_argument("--after", type=Path, default=REPO)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dtypes", default="bfloat16,float32,float16")
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--all-tasks", action="store_true", help="time unpack --all --exact (every task, one process)")
    a = ap.parse_args()
    if a.all_tasks:
        WHICH[:] = ["--all"]
    from exact_vs_delta import trained_family

    trees = {"before": a.before.resolve(), "after": a.after.resolve()}
    results = []
    with tempfile.TemporaryDirectory(prefix="exact-start-") as tmp:
        work = (a.work or Path(tmp)).absolute()
        for dtype in a.dtypes.split(","):
            root = work / dtype
            archive = root / "family.tallpack"
            if (root / "info.json").exists():  # (a --work kept from an earlier run: the same family)
                info = json.loads((root / "info.json").read_text())
                paths = {f"task{t}": root / "files" / f"task{t}.safetensors" for t in range(a.tasks)}
            else:
                shutil.rmtree(root, ignore_errors=True)
                (root / "files").mkdir(parents=True)
                base, paths, info = trained_family(root / "files", dtype, a.tasks, 256, 2, 4096, 10, pretrain_steps=20)
                subprocess.run([sys.executable, "-m", "tallpack", "pack", "--exact", "--no-progress", "--base",
                                str(base), "-o", str(archive), *(f"{k}={v}" for k, v in paths.items())], check=True,
                               env={**os.environ, "PYTHONPATH": str(trees["after"])}, capture_output=True, cwd=root)
                (root / "info.json").write_text(json.dumps(info))
            row: dict = {"dtype": dtype, "params": info["params"], "archive_bytes": archive.stat().st_size,
                         "original_bytes": paths["task0"].stat().st_size}
            for name, tree in trees.items():  # torch imported? and the bytes written
                out = root / f"out-{name}"
                _, err = _unpack(tree, archive, out, importtime=True)
                row[f"{name}_imports_torch"] = any(line.rstrip().endswith("| torch") for line in err.splitlines())
                row[f"{name}_shas"] = _shas(out)
            row["same_bytes"] = row.pop("before_shas") == row.pop("after_shas")
            written = _shas(root / "out-after")
            row["original_sha_matches"] = all(
                written.get(f"{t}/{t}.safetensors" if a.all_tasks else f"{t}.safetensors")
                == hashlib.sha256(paths[t].read_bytes()).hexdigest() for t in (paths if a.all_tasks else ["task0"]))
            times: dict[str, list[float]] = {k: [] for k in trees}
            for _ in range(a.rounds):
                for name, tree in trees.items():
                    times[name].append(_unpack(tree, archive, root / f"out-{name}")[0])
            for name in trees:
                row[f"{name}_s"] = statistics.median(times[name])
                row[f"{name}_all_s"] = [round(t, 3) for t in times[name]]
            row["ratio"] = row["after_s"] / row["before_s"]
            results.append(row)
            print(json.dumps(row), flush=True)
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    print(json.dumps({"load": load}))
    print(f"\nunpack {' '.join(WHICH)} --exact")
    print("| family | task file | archive | before (s) | after (s) | after/before | torch before/after | same bytes |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| trained {r['dtype']} ({r['params']:,} params) | {r['original_bytes'] / 1e6:.1f} MB | "
              f"{r['archive_bytes'] / 1e6:.1f} MB | {r['before_s']:.2f} | {r['after_s']:.2f} | {r['ratio']:.2f} | "
              f"{'yes' if r['before_imports_torch'] else 'no'}/{'yes' if r['after_imports_torch'] else 'no'} | "
              f"{'yes' if r['same_bytes'] and r['original_sha_matches'] else 'NO'} |")


if __name__ == "__main__":
    main()
