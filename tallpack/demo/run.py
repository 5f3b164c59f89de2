"""The demo's main job: build (or reuse) the demo family, pack it, inspect it, unpack one task
and score the reconstruction against the original on held-out test data."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors.torch import load_file

from ..outputs import write_task
from ..packer import pack
from ..reader import open as open_archive
from .family import build_family, evaluate, load_state_dict

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoResult:
    archive: Path
    summary: dict[str, Any]
    unpacked: Path
    task: str
    #: task -> (fine-tuned test accuracy, reconstructed test accuracy)
    scores: dict[str, tuple[float, float]]
    seconds: dict[str, float]
    #: the same family packed with the fidelity dial (``fidelity=DIAL_TARGET``), beyond the paper
    dial_archive: Path
    #: task -> reconstructed test accuracy from ``dial_archive``
    dial_scores: dict[str, float]
    #: the average task checkpoint's bytes (the unit of the archives' sizes)
    checkpoint_bytes: float


#: The demo's fidelity-dial target (weight fidelity): on the demo family every task then keeps at
#: least 99.7% of its test accuracy (BENCHMARKS.md, "The fidelity dial").
DIAL_TARGET = 0.97


def run_demo(workdir: str | Path = ".tallpack-demo", *, size: str = "full", task: str | None = None) -> DemoResult:
    """Build the demo family in ``workdir``, pack it with lambdas selected on validation data,
    unpack ``task`` (default: the first) and score every reconstruction on the test split."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    seconds = {}
    t0 = time.perf_counter()
    fam = build_family(workdir / "family", size=size)
    seconds["build"] = time.perf_counter() - t0
    root = fam.root

    t0 = time.perf_counter()
    archive = workdir / "family.tallpack"
    pack(fam.base, fam.tasks, archive, evaluate=lambda t, sd: evaluate(root, t, sd, split="val"), overwrite=True)
    seconds["pack"] = time.perf_counter() - t0

    task = task or next(iter(fam.tasks))
    scores = {}
    with open_archive(archive) as arc:
        summary = arc.summary()
        t0 = time.perf_counter()
        unpacked = Path(write_task(arc, task, workdir / "unpacked" / task, overwrite=True))  # local: a Path
        seconds["unpack"] = time.perf_counter() - t0
        for name, folder in fam.tasks.items():
            rebuilt = load_file(unpacked) if name == task else arc.state_dict(name)
            scores[name] = (evaluate(root, name, load_state_dict(folder)), evaluate(root, name, rebuilt))

    # beyond the paper: the fidelity dial keeps every task close to its original, for a few bytes
    t0 = time.perf_counter()
    dial_archive = workdir / "family-fidelity.tallpack"
    pack(fam.base, fam.tasks, dial_archive, fidelity=DIAL_TARGET, overwrite=True)
    seconds["dial"] = time.perf_counter() - t0
    with open_archive(dial_archive) as arc:
        dial_scores = {name: evaluate(root, name, arc.state_dict(name)) for name in fam.tasks}
    one = sum(f.stat().st_size for folder in fam.tasks.values() for f in Path(folder).rglob("*.safetensors")) / len(fam.tasks)
    return DemoResult(archive, summary, unpacked, task, scores, seconds, dial_archive, dial_scores, one)
