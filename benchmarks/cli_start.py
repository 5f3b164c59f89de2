"""Head to head: how long the command line takes for commands that build no tensors.

Each round runs every command in a fresh process with this checkout's library and with another
checkout's (order alternated round by round), and a bare interpreter (``python -c pass``) as the
floor. Times are wall clock around the whole process, as a user at a shell sees them. Prints each
side's median and the median, round by round, of this checkout's time over the other's.

    git worktree add /tmp/old 55d7771 && (cd /tmp/old && python setup.py build_ext --inplace)
    python benchmarks/cli_start.py --other /tmp/old --rounds 11

The archive is a small family packed on the fly (4 tensors of 256 x 256, base + 3), so the
commands' own work is a few milliseconds and the start (interpreter, imports) is what is timed.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Runs one checkout's command line: its library and its cli/ folder first on the path.
CHILD = r"""
import sys
root = sys.argv[1]
sys.path[:0] = [root, root + "/cli"]
sys.argv = ["tallpack", *sys.argv[2:]]
import main
main.main()
"""


def make_archive(folder: Path) -> Path:
    import torch
    from safetensors.torch import save_file

    import tallpack

    g = torch.Generator().manual_seed(0)
    base = {f"l{i}.w": torch.randn(256, 256, generator=g) for i in range(4)}
    save_file(base, folder / "base.safetensors")
    tasks = {}
    for t in range(3):
        save_file({k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}, folder / f"t{t}.safetensors")
        tasks[f"t{t}"] = folder / f"t{t}.safetensors"
    out = folder / "fam.tallpack"
    tallpack.pack(folder / "base.safetensors", tasks, out)
    return out


def timed(argv: list[str]) -> float:
    t0 = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, cwd="/")
    dt = time.perf_counter() - t0
    if done.returncode:  # the command's own error, not only its status
        raise SystemExit(f"{' '.join(argv[3:])}: exit status {done.returncode}\n{done.stderr.decode()[-3000:]}")
    return dt


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--other", type=lambda s: Path(s).resolve(), required=True, help="the other checkout")
    ap.add_argument("--rounds", type=int, default=11)
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        archive = make_archive(Path(tmp))
        commands = {"--version": ["--version"], "--help": ["--help"], "inspect": ["inspect", str(archive)],
                    "verify": ["verify", str(archive)]}
        sides = {"this": str(REPO), "other": str(a.other)}
        times = {(c, s): [] for c in commands for s in sides}
        floor = []
        for i in range(a.rounds):
            for c, args in commands.items():
                for s in (("this", "other") if i % 2 == 0 else ("other", "this")):
                    times[c, s].append(timed([sys.executable, "-c", CHILD, sides[s], *args]))
            floor.append(timed([sys.executable, "-c", "pass"]))
    print(f"{a.rounds} rounds, fresh processes, wall clock; python -c pass: {statistics.median(floor) * 1e3:.0f} ms")
    print(f"this: {REPO}\nother: {a.other}")
    print("| command | this | other | this / other (median of rounds) |")
    print("|---|---:|---:|---:|")
    for c in commands:
        t, o = times[c, "this"], times[c, "other"]
        r = statistics.median(x / y for x, y in zip(t, o))
        print(f"| `tallpack {c}` | {statistics.median(t) * 1e3:.0f} ms | {statistics.median(o) * 1e3:.0f} ms | {r:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
