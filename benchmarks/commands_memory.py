"""Peak memory and time of every command on a family with one tensor too large to hold many copies
of (an LLM's embedding): pack (default, ``--exact``, ``--fidelity``), unpack (lossy, exact, and
lossy from the exact archive, whose merged vectors are derived), merge, verify, stats and
``get_tensor`` of the largest tensor; with ``--other``, the same commands of another checkout in
the same run (before/after a change).

    python benchmarks/commands_memory.py [--params 100e6] [--hidden 2048] [--vocab 128000] [--tasks 4]
                                         [--dtype bfloat16] [--commands pack,unpack,...] [--family DIR]
                                         [--other /tmp/old]

Each command runs in a fresh process (``cwd=/``, the checkout on PYTHONPATH), torch imported before
the baseline; RssAnon (``/proc/self/status``: page cache and mapped files are not counted) sampled
every 2 ms by a thread. Each checkout reads the archives its own pack wrote. ``--family`` reuses a
folder of ``base.safetensors`` and ``task*.safetensors`` (``make_family`` takes a minute for the
default 3.5 GB). Issue 8's bound for unpack: 3 x the largest tensor + 300 MB. Numbers go in
BENCHMARKS.md.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import sys
import tempfile
from pathlib import Path

from safetensors import safe_open

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from pack_scale import made_family, memory_options, run_child  # noqa: E402

CLI = "from tallpack_cli.main import main as cli\n"
PACK = "measured(lambda: tallpack.pack(sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], threads=2, overwrite=True{}))"
RUN_CLI = CLI + "measured(lambda: cli(args=json.loads(sys.argv[1]), standalone_mode=False))"
GET_TENSOR = """
fam = tallpack.open(sys.argv[1])
name = max(fam.keys(fam.tasks[1]), key=lambda k: torch.Size(fam.tensor_spec(fam.tasks[1], k)[1]).numel())
measured(lambda: fam.get_tensor(fam.tasks[1], name))
"""
#: Each command: its archive's kind ("": made by the default pack), and how it runs.
COMMANDS = ("pack", "pack_exact", "pack_dial", "unpack", "unpack_exact", "unpack_from_exact", "merge", "verify",
            "verify_exact", "stats", "get_tensor")


def _nbytes(f, name: str) -> int:
    """A safetensors tensor's bytes, from its header alone."""
    t = f.get_slice(name)
    n = 1
    for d in t.get_shape():
        n *= d
    return n * {"F32": 4, "BF16": 2, "F16": 2}.get(t.get_dtype(), 8)


def run(checkout: Path, what: str, base: Path, tasks: dict[str, Path], work: Path) -> dict:
    """One command of ``checkout`` on the family, in a fresh process: its peak and seconds."""
    arch = {k: work / f"{k}.tallpack" for k in ("a", "x", "d")}
    task = sorted(tasks)[1]
    if what.startswith("pack"):
        extra, out = {"pack": ("", arch["a"]), "pack_exact": (", exact=True", arch["x"]),
                      "pack_dial": (", fidelity=0.999", arch["d"])}[what]
        return run_child(checkout, PACK.format(extra), str(base), json.dumps({k: str(v) for k, v in tasks.items()}),
                         str(out))
    if what == "get_tensor":
        return run_child(checkout, GET_TENSOR, str(arch["a"]))
    args = {"unpack": ["unpack", str(arch["a"]), "--task", task, "-o", str(work / "u"), "-f"],
            "unpack_exact": ["unpack", str(arch["x"]), "--task", task, "--exact", "-o", str(work / "ux"), "-f"],
            "unpack_from_exact": ["unpack", str(arch["x"]), "--task", task, "-o", str(work / "ul"), "-f"],
            "merge": ["merge", str(arch["a"]), "-o", str(work / "m"), "-f"],
            "verify": ["verify", str(arch["a"])],
            "verify_exact": ["verify", str(arch["x"])],
            "stats": ["stats", str(arch["a"])]}[what]
    return run_child(checkout, RUN_CLI, json.dumps(["-q", *args]))


def main() -> None:
    def more(ap) -> None:
        ap.add_argument("--commands", default=",".join(COMMANDS), help="a comma-separated subset of: " + ", ".join(COMMANDS))
        ap.add_argument("--family", type=Path, help="a folder of base.safetensors and task*.safetensors to use")

    a = memory_options(__doc__, 100e6, shape=True, vocab=128000, more=more)
    commands = [c for c in a.commands.split(",") if c]
    unknown = set(commands) - set(COMMANDS)
    if unknown:
        raise SystemExit(f"unknown commands: {sorted(unknown)}; known: {', '.join(COMMANDS)}")
    here = HERE.parent
    sides = [("this checkout", here)] + ([("other checkout", a.other)] if a.other else [])
    mb = 1 << 20
    with contextlib.ExitStack() as stack:
        if a.family:
            base = a.family / "base.safetensors"
            tasks = {p.stem: p for p in sorted(a.family.glob("task*.safetensors"))[: a.tasks]}  # --tasks of them
            if len(tasks) < 2:
                raise SystemExit(f"{a.family}: {len(tasks)} task*.safetensors (two or more needed)")
            with safe_open(str(base), "pt") as f:
                largest = max(_nbytes(f, k) for k in f.keys())
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(dir=a.family)))
        else:
            root, base, tasks, largest = stack.enter_context(made_family(a))
        inputs = sum(f.stat().st_size for f in [base, *tasks.values()])
        for f in [base, *tasks.values()]:  # the page cache warm for every side
            with open(f, "rb") as fh:
                while fh.read(1 << 24):
                    pass
        works = {label: root / f"side{i}" for i, (label, _) in enumerate(sides)}
        for w in works.values():
            w.mkdir()
        rows: dict[str, dict[str, list[dict]]] = {c: {label: [] for label, _ in sides} for c in commands}
        for r in range(a.rounds):
            for c in commands:
                for label, checkout in sides if r % 2 == 0 else sides[::-1]:
                    rows[c][label].append(run(checkout, c, base, tasks, works[label]))
                    print(f"  {c} ({label}): +{rows[c][label][-1]['grown'] / mb:.1f} MB, "
                          f"{rows[c][label][-1]['seconds']:.2f} s", file=sys.stderr, flush=True)
    print(f"family: {a.params:.3g} parameters (hidden {a.hidden}, vocab {a.vocab}), {a.dtype}, base + {len(tasks)}; "
          f"inputs {inputs / mb:.0f} MB, largest tensor {largest / mb:.1f} MB; medians of {a.rounds}; "
          f"unpack's bound 3 x largest + 300 MB = {(3 * largest + 300 * mb) / mb:.0f} MB")
    head = "| command | " + " | ".join(f"{label}: peak RssAnon (x largest), time" for label, _ in sides) + " |"
    print(head)
    print("|---|" + "---|" * len(sides))
    for c in commands:
        cells = []
        for label, _ in sides:
            grown = statistics.median(x["grown"] for x in rows[c][label])
            secs = statistics.median(x["seconds"] for x in rows[c][label])
            cells.append(f"+{grown / mb:.1f} MB ({grown / largest:.2f}x), {secs:.2f} s")
        print(f"| {c} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
