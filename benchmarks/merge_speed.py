"""A merged model's time against unpacking one task of the same archive, in the same process.

    python benchmarks/merge_speed.py                 # quiet machine
    python benchmarks/merge_speed.py --busy          # two spinning processes on the cores meanwhile
    python benchmarks/merge_speed.py --ab            # also the merge with the fused loop turned off

Archives: the perf family's (``perf.py``: 26M parameters, base + 4, ``planes``, Task Arithmetic;
float32, bfloat16, float16, from benchmarks/out/perf-work/) and a TIES one packed here once from
the same float32 family (benchmarks/out/merge-speed/). Each round times ``state_dict(task)`` and
``merged(model)`` for each model of each archive (``cache_bytes=0``: every read decodes), turn by
turn; prints the medians of ``--rounds`` rounds and the ratio merge / unpack (a shared machine
moves the times, less the ratio). With ``--ab``, each merge is also timed with
``tallpack.merging.FUSED`` off (the torch element-wise passes), alternated with it on.
``OMP_WAIT_POLICY`` is left as the environment sets it (a library user's process).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORK = HERE / "out" / "perf-work"
FAMILY = HERE / "out" / "family-h512-v8000-L7-s0-g1"
OWN = HERE / "out" / "merge-speed"


def ties_archive() -> Path:
    """The TIES archive of the perf family's base and first 4 tasks, packed once."""
    import tallpack
    out = OWN / "ties-4.tallpack"
    if not out.exists():
        OWN.mkdir(parents=True, exist_ok=True)
        tallpack.pack(str(FAMILY / "base.safetensors"), {f"task{i}": str(FAMILY / f"task{i}.safetensors")
                                                         for i in range(4)}, str(out), merge="ties", codec="planes")
    return out


def spinners(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while 1: pass"]) for _ in range(n)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--busy", action="store_true", help="two spinning processes while it measures")
    p.add_argument("--ab", action="store_true", help="also each merge with tallpack.merging.FUSED off")
    p.add_argument("--only", default="", help="comma-separated archive labels (f32,bf16,f16,ties)")
    a = p.parse_args()
    import tallpack
    from tallpack import merging
    archives = {"f32": (WORK / "planes-4.tallpack", ("consensus-ta", "ta")),
                "bf16": (WORK / "bf16-planes.tallpack", ("consensus-ta", "ta")),
                "f16": (WORK / "f16-planes.tallpack", ("consensus-ta", "ta")),
                "ties": (ties_archive(), ("consensus-ties", "ties"))}
    if a.only:
        archives = {k: v for k, v in archives.items() if k in a.only.split(",")}
    sides = [True, False] if a.ab and hasattr(merging, "FUSED") else [None]
    times: dict[tuple[str, str, object], list[float]] = {}
    procs = spinners(2) if a.busy else []
    try:
        opened = {k: tallpack.open(str(path), cache_bytes=0) for k, (path, _) in archives.items()}
        for k, fam in opened.items():  # warm: pages cached, pools started
            fam.state_dict(fam.tasks[0])
            for model in archives[k][1]:
                fam.merged(model)
        for r in range(a.rounds):
            for k, fam in opened.items():
                t0 = time.perf_counter()
                sd = fam.state_dict(fam.tasks[0])
                times.setdefault((k, "unpack", None), []).append(time.perf_counter() - t0)
                del sd
                for model in archives[k][1]:
                    for side in (sides if r % 2 == 0 else sides[::-1]):
                        if side is not None:
                            merging.FUSED = side
                        t0 = time.perf_counter()
                        sd = fam.merged(model)
                        times.setdefault((k, model, side), []).append(time.perf_counter() - t0)
                        del sd
        if sides != [None]:
            merging.FUSED = True
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    print(f"{'busy' if a.busy else 'quiet'}; load {os.getloadavg()[0]:.2f}; torch threads "
          f"{__import__('torch').get_num_threads()}; OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}")
    print("| archive | model | fused | median s | / unpack |")
    print("|---|---|---|---:|---:|")
    for (k, model, side), v in times.items():
        unpack = statistics.median(times[(k, "unpack", None)])
        med = statistics.median(v)
        label = "" if side is None else ("on" if side else "off")
        print(f"| {k} | {model} | {label} | {med:.3f} | {med / unpack:.2f} |")


if __name__ == "__main__":
    main()
