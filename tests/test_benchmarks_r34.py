"""benchmarks/exact_vs_delta.py: its own delta baseline gives files back byte for byte, and its
``--quick`` path runs end to end (real zstd, real tallpack, tiny trained family)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "exact_vs_delta.py"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import exact_vs_delta

        yield exact_vs_delta
    finally:
        sys.path.remove(str(SCRIPT.parent))


def _files(tmp_path: Path) -> tuple[bytes, bytes]:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 33, generator=g) * 0.02
    odd = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-40, -1e-40, 3.0])
    base = {"w": w, "b16": w.to(torch.bfloat16), "odd": odd, "ids": torch.arange(7), "gone": torch.ones(3)}
    task = {"w": w + 1e-4 * torch.randn(64, 33, generator=g), "b16": (w * 1.01).to(torch.bfloat16),
            "odd": -odd.flip(0), "ids": torch.arange(7) * -3, "new": torch.randn(5, generator=g),
            "flag": torch.tensor([True, False, True])}
    save_file(base, tmp_path / "base.safetensors", metadata={"format": "pt"})
    save_file(task, tmp_path / "task.safetensors")
    return (tmp_path / "base.safetensors").read_bytes(), (tmp_path / "task.safetensors").read_bytes()


@pytest.mark.parametrize("mode", ["xor", "sub"])
def test_own_delta_round_trips(bench, tmp_path, mode):
    """Every tensor kind (float32, bfloat16, int64, bool, a tensor the base lacks, NaN, -0.0,
    subnormals) and the header come back byte for byte."""
    base, task = _files(tmp_path)
    blob = bench.delta_encode(task, base, mode)
    assert bench.delta_decode(blob, base) == task
    alone = bench.delta_encode(base, None, mode)
    assert bench.delta_decode(alone, None) == base
    kinds = {s["name"]: s["kind"] for s in json.loads(blob[8:8 + int.from_bytes(blob[:8], "little")])}
    assert kinds["w"] == kinds["b16"] == kinds["ids"] == mode and kinds["new"] == "planes"
    assert kinds["flag"] == "bytes"


def test_sub_delta_of_a_small_change_is_small(bench):
    """The ordered difference of floats one ulp apart is 1 or 2 (zigzag), across zero too."""
    b = np.array([1.0, -1.0, 0.0, -0.0], np.float32)
    t = np.nextafter(b, np.float32(np.inf))
    d = bench._delta(t.view(np.uint32), b.view(np.uint32), "sub", True)
    assert d.tolist() == [2, 2, 2, 4]  # -0.0 -> the smallest subnormal is two steps in the order (-0.0, +0.0, ...)
    back = bench._undelta(d, b.view(np.uint32), "sub", True)
    assert back.tobytes() == t.tobytes()


@pytest.mark.skipif(shutil.which("zstd") is None, reason="no zstd command line")
def test_quick_path_runs(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "cli")])}
    r = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--dtypes", "float32", "--tasks", "1",
                        "--methods", "patch-from -3,xor", "--no-zipnn", "--work", str(tmp_path / "w"),
                        "--out", str(tmp_path / "out")], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [line for line in r.stdout.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [row.split(" | ")[0] for row in rows] == ["| tallpack --exact", "| tallpack state_dict(exact=True)",
                                                   "| zstd --patch-from -3 --long=31", "| xor planes + zstd-3 (own)"]
    assert all(row.rstrip(" |").endswith(("yes", "n/a")) for row in rows), r.stdout
    res = json.loads((tmp_path / "out" / "exact_vs_delta.json").read_text())["families"][0]
    assert res["family"] == "trained float32" and res["tasks"] == 1
    assert all(m["round_trips"] in (True, None) for m in res["methods"].values())
    assert 0 < res["methods"]["tallpack --exact"]["bytes"] < res["files_bytes"]
