"""The GPU check of the performance issue: ``device="cuda"`` gives the same bits as the CPU, and
how long loading a member onto the GPU takes next to ``safetensors.torch.load_file(device="cuda")``.

Run where a CUDA device is (the device tool of this workplace lends one to some tasks); it is one
short, prepared command, a few minutes on an H200 for the default family:

    python benchmarks/gpu_check.py --out $OUT            # writes gpu_check.json and gpu_check.md

Without CUDA it says so and exits with status 2. The device machine's image has torch,
safetensors and xxhash but not zstandard: carry its wheel (see /work/.library/device/README.md):
``python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
--platform manylinux2014_x86_64 -d .whl zstandard``, then start the command with
``python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export
PYTHONPATH=/tmp/site:$PWD``.

Each timed sample opens the archive anew (so nothing is cached on the GPU) and synchronizes the
device before the clock stops; the two sides are alternated, medians of ``--repeats``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import shutil
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))


def _bits(t):
    import torch
    t = t.detach().contiguous().reshape(-1)
    return t.view(torch.uint8) if t.numel() else t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=float, default=26e6, help="parameters per member (default 26e6)")
    ap.add_argument("--tasks", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out")
    ap.add_argument("--device", default="cuda", help="cuda (default); cpu only dry-runs this script")
    a = ap.parse_args(argv)
    import torch
    if a.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; nothing to check", file=sys.stderr)
        return 2
    import tallpack
    from perf import make_family
    from safetensors.torch import load_file

    dev = torch.device(a.device)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    a.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    fam = make_family(work, a.params, a.tasks)
    names = list(fam["tasks"])
    res: dict = {"card": torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu (dry run)", "torch": torch.__version__,
                 "params": fam["params"], "tasks": a.tasks, "repeats": a.repeats, "archives": {}}
    print(f"gpu_check: {res['card']}, torch {res['torch']}, {fam['params'] / 1e6:.1f}M params, {a.tasks} tasks")
    for codec in ("planes", "raw"):
        arch = work / f"{codec}.tallpack"
        tallpack.pack(fam["base"], {n: fam["tasks"][n] for n in names}, arch, codec=codec, overwrite=True)
        row: dict = {}
        # the same bits on the GPU as on the CPU, every task, whole state dicts and single tensors
        with tallpack.open(arch) as cpu, tallpack.open(arch) as gpu:
            for t in names:
                want = cpu.state_dict(t)
                got = gpu.state_dict(t, device=dev)
                assert all(v.device.type == dev.type for v in got.values())
                bad = [k for k in want if not torch.equal(_bits(want[k]), _bits(got[k].cpu()))]
                assert not bad, f"{codec}: task {t}: tensors differ on the GPU: {bad[:5]}"
                k = fam["tensor_4mb"]
                assert torch.equal(_bits(gpu.get_tensor(t, k, device=dev).cpu()), _bits(want[k]))
        row["same_bits"] = True

        def ours(task):
            sync()
            t0 = time.perf_counter()
            with tallpack.open(arch) as f:
                sd = f.state_dict(task, device=dev)
            sync()
            return time.perf_counter() - t0, len(sd)

        def theirs(task):
            sync()
            t0 = time.perf_counter()
            sd = load_file(str(fam["tasks"][task]), device=str(dev))
            sync()
            return time.perf_counter() - t0, len(sd)

        def second(task, other):
            with tallpack.open(arch) as f:
                f.state_dict(other, device=dev)
                sync()
                t0 = time.perf_counter()
                f.state_dict(task, device=dev)
                sync()
                return time.perf_counter() - t0, 0

        ours(names[0]), theirs(names[0])  # warm-up: CUDA context, kernels, page cache
        samples: dict = {"first": [], "second": [], "safetensors": []}
        for i in range(a.repeats):
            t = names[i % len(names)]
            order = ("first", "second", "safetensors") if i % 2 == 0 else ("safetensors", "second", "first")
            for side in order:
                fn = {"first": lambda: ours(t), "safetensors": lambda: theirs(t),
                      "second": lambda: second(t, names[(i + 1) % len(names)])}[side]
                samples[side].append(fn()[0])
        med = {k: statistics.median(v) for k, v in samples.items()}
        row.update({"samples": samples, "median_seconds": med,
                    "first_over_safetensors": med["first"] / med["safetensors"],
                    "second_over_safetensors": med["second"] / med["safetensors"]})
        res["archives"][codec] = row
        print(f"  {codec}: same bits on the GPU; first task {med['first'] * 1e3:.1f} ms, second "
              f"{med['second'] * 1e3:.1f} ms, load_file(device='{dev.type}') {med['safetensors'] * 1e3:.1f} ms "
              f"({row['first_over_safetensors']:.2f}x, {row['second_over_safetensors']:.2f}x)")
    (a.out / "gpu_check.json").write_text(json.dumps(res, indent=1))
    lines = [f"GPU check (`python benchmarks/gpu_check.py`) on {res['card']}, torch {res['torch']}: "
             f"{fam['params'] / 1e6:.1f}M float32 parameters a member, {a.tasks} tasks, medians of {a.repeats}.", "",
             "| codec | same bits as CPU | first task, fresh open | second task, open archive | "
             f"`load_file(device='{dev.type}')` | first / load_file | second / load_file |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for codec, row in res["archives"].items():
        m = row["median_seconds"]
        lines.append(f"| {codec} | yes | {m['first'] * 1e3:.1f} ms | {m['second'] * 1e3:.1f} ms | "
                     f"{m['safetensors'] * 1e3:.1f} ms | {row['first_over_safetensors']:.2f}x | "
                     f"{row['second_over_safetensors']:.2f}x |")
    (a.out / "gpu_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
