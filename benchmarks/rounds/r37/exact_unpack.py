"""Round 37: the exact unpack of every task (``tallpack unpack ARCHIVE --all --exact -o OUT``) in a
fresh process, before and after the byte reads of an exact unpack kept the shared bases in the
archive's cache (``originals._Bytes``), alternated; and how many times each tree decodes the bases.

    python benchmarks/rounds/r37/exact_unpack.py --before /tmp/r37/wt_before2 [--rounds 5] [--dtype float32]

``--before`` is a checkout of the tree to compare with (``git worktree add /tmp/r37/wt_before2 HEAD``,
with the compiled ``_kernels*.so`` copied in); ``--after`` this one (default). The family: a base of
8 tensors of 8 to 32 MiB and 6 fine-tunes of it (base + 1% noise, a third of rows untouched), each
a ``model.safetensors``, packed with ``--exact`` once by this tree. Prints the medians of each
tree's wall time, CPU time and peak RSS (``os.wait4``), their ratios, the base decodes (elements
of bases the container decoded, over the bases' elements: one whole read of a base is 1), and
checks that both trees wrote the original files.
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
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
SIZES_MIB = [8, 12, 16, 20, 24, 28, 32, 8]  # above 16 MiB of float32 (4M elements), rebuilt in runs
TASKS = 6

#: run in the tree's own process: the library call behind the CLI, with the container's reads of
#: base arrays counted (a wrapper here, not in the library)
COUNT = r"""
import json, sys
import tallpack
from tallpack.container import ContainerReader
read, seen = ContainerReader.read_array, {"elements": 0.0}
def counted(self, ref, where, start=0, stop=None, *rest):
    if where.endswith("(base)"):
        seen["elements"] += ((ref.numel if stop is None else stop) - start) / ref.numel
    return read(self, ref, where, start, stop, *rest)
ContainerReader.read_array = counted
with tallpack.open(sys.argv[1]) as fam:
    tallpack.write_tasks(fam, None, sys.argv[2], exact=True, overwrite=True)
print(json.dumps(seen))
"""


def build(root: Path, dtype: str) -> Path:
    import torch
    from safetensors.torch import save_file

    import tallpack

    archive = root / "family.tallpack"
    if archive.exists():
        return archive
    g = torch.Generator().manual_seed(37)
    dt = getattr(torch, dtype)
    isz = torch.empty(0, dtype=dt).element_size()
    base = {f"layers.{i}.weight": torch.randn(mib * (1 << 20) // isz // 1024, 1024, generator=g).to(dt)
            for i, mib in enumerate(SIZES_MIB)}
    (root / "base").mkdir(parents=True, exist_ok=True)
    save_file(base, str(root / "base" / "model.safetensors"))
    tasks = {}
    for t in range(TASKS):
        sd = {}
        for name, w in base.items():
            d = 0.01 * torch.randn(w.shape, generator=g)
            d[: w.shape[0] // 3] = 0
            sd[name] = (w.float() + d).to(dt)
        (root / f"task{t}").mkdir(exist_ok=True)
        save_file(sd, str(root / f"task{t}" / "model.safetensors"))
        tasks[f"task{t}"] = str(root / f"task{t}")
    t0 = time.perf_counter()
    tallpack.pack(str(root / "base"), tasks, str(archive), exact=True)
    print(f"packed {archive} ({archive.stat().st_size / 2**20:.0f} MiB) in {time.perf_counter() - t0:.0f} s")
    return archive


def _env(tree: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(tree)}


def unpack(tree: Path, archive: Path, out: Path) -> tuple[float, float, float]:
    """One unpack in a fresh process: its wall time, CPU time (user + system) and peak RSS (MiB)."""
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-m", "tallpack", "unpack", str(archive), "--all", "--exact",
                              "-o", str(out)], env=_env(tree), cwd=tree, stdout=subprocess.DEVNULL)
    _, status, use = os.wait4(child.pid, 0)
    wall = time.perf_counter() - t0
    child.returncode = os.waitstatus_to_exitcode(status)
    assert child.returncode == 0, f"{tree}: unpack failed ({child.returncode})"
    return wall, use.ru_utime + use.ru_stime, use.ru_maxrss / 1024


def decodes(tree: Path, archive: Path, out: Path) -> float:
    shutil.rmtree(out, ignore_errors=True)
    got = subprocess.run([sys.executable, "-c", COUNT, str(archive), str(out)], env=_env(tree), check=True,
                         capture_output=True, text=True, cwd=tree)
    return json.loads(got.stdout.strip().splitlines()[-1])["elements"]


def same_files(root: Path, out: Path) -> bool:
    def sha(p: Path) -> str:
        return hashlib.sha256(p.read_bytes()).hexdigest()
    return all(sha(out / f"task{t}" / "model.safetensors") == sha(root / f"task{t}" / "model.safetensors")
               for t in range(TASKS))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--before", type=Path, required=True)
    ap.add_argument("--after", type=Path, default=REPO)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--work", type=Path, default=Path("/tmp/r37/exact/bench"))
    args = ap.parse_args()
    root = args.work / args.dtype
    archive = build(root, args.dtype)
    trees = {"before": args.before.resolve(), "after": args.after.resolve()}
    out = args.work / "out"
    counts = {}
    for side, tree in trees.items():
        counts[side] = decodes(tree, archive, out)
        assert same_files(root, out), f"{side}: files differ from the originals"
    runs: dict[str, list[tuple[float, float, float]]] = {side: [] for side in trees}
    for r in range(args.rounds):
        order = list(trees) if r % 2 == 0 else list(trees)[::-1]
        for side in order:
            runs[side].append(unpack(trees[side], archive, out))
            assert same_files(root, out), f"{side}: files differ from the originals"
    med = {side: [statistics.median(x[i] for x in rs) for i in range(3)] for side, rs in runs.items()}
    for side in trees:
        print(f"{side:>6}: median wall {med[side][0]:.2f} s ({', '.join(f'{x[0]:.2f}' for x in runs[side])}), "
              f"CPU {med[side][1]:.2f} s ({', '.join(f'{x[1]:.2f}' for x in runs[side])}), "
              f"peak RSS {med[side][2]:.0f} MiB; base decodes {counts[side]:g} "
              f"({len(SIZES_MIB)} tensors, {TASKS} tasks)")
    ratio = [med["after"][i] / med["before"][i] for i in range(3)]
    print(f"after/before: wall {ratio[0]:.3f}, CPU {ratio[1]:.3f}, peak RSS {ratio[2]:.2f}; "
          f"base decodes {counts['before']:g} -> {counts['after']:g}; files identical to the originals: yes")


if __name__ == "__main__":
    main()
