"""The fidelity dial on a tensor read a block at a time (``inputs.HOLD_BYTES``).

A tensor planned as merged whose copies are too large to hold at once stays streamed through the
dial: its TALL parts (base, tau_MTL, masks) are made block by block, and each task's copy is read
a run at a time (tests/test_dial_blockwise.py: no copy read whole, and the dial's memory). The
archive is the same, byte for byte, as when every tensor is read whole.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import tallpack
from tallpack import inputs

from conftest import dial_family, pack_both_ways

CHUNK = 1 << 16
N = 5 * CHUNK + 1000  # six blocks, the last a short one


def _family(d: Path, dtype: torch.dtype, tasks: int = 3) -> tuple[Path, dict[str, Path]]:
    """``conftest.dial_family`` of a tensor of six blocks."""
    return dial_family(d, dtype, N, tasks=tasks, seed=1, spikes=200)


def _pack_both(tmp: Path, monkeypatch, base: Path, tasks: dict[str, Path], *, by: str = "", **kw
               ) -> tuple[bytes, bytes, int]:
    """The archive with every tensor read whole, and with tensors read a block at a time; and how
    often the streamed tensor was read whole (every task's copy at once), by a caller in the
    module file ``by`` when given (``conftest.pack_both_ways``)."""
    whole, streamed, _, wholes = pack_both_ways(tmp, monkeypatch, base, tasks, chunk=CHUNK, by=by, **kw)
    return whole, streamed, wholes


def _stored(path: Path) -> dict[str, int]:
    """What the dial stored, counted over tasks (``stats.dial``)."""
    with tallpack.open(path) as a:
        counts: dict[str, int] = {}
        for rec in a.manifest.stats["dial"]["tasks"].values():
            for k, v in rec["stored"].items():
                counts[k] = counts.get(k, 0) + v
        return counts


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("merge", ["ta", "ties"])
@pytest.mark.parametrize("dial", [{"fidelity": 0.999}, {"fidelity": 0.98}, {"budget": 2.0}])
def test_dial_streamed_is_the_same_bytes(tmp_path, monkeypatch, dtype, merge, dial):
    base, tasks = _family(tmp_path, dtype)
    whole, streamed, wholes = _pack_both(tmp_path, monkeypatch, base, tasks, merge=merge, **dial)
    assert wholes == 0  # never every task's copy at once
    assert streamed == whole


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("opts", [{"fidelity": 0.9995, "corrections": ("sparse",)},
                                  {"fidelity": 0.9995, "corrections": ("quant4", "quant8")},
                                  {"fidelity": 0.9995, "corrections": ("qtau",)},
                                  {"fidelity": 1.0},
                                  {"budget": 1.5}])
def test_dial_streamed_options_and_threads(tmp_path, monkeypatch, threads, opts):
    base, tasks = _family(tmp_path, torch.bfloat16)
    whole, streamed, wholes = _pack_both(tmp_path, monkeypatch, base, tasks, threads=threads, **opts)
    assert wholes == 0
    assert streamed == whole
    stored = _stored(tmp_path / "a0.tallpack")
    assert sum(v for k, v in stored.items() if k != "tall") > 0, stored  # some correction written streamed


def test_dial_streamed_sensitivity(tmp_path, monkeypatch):
    base, tasks = _family(tmp_path, torch.float32)
    g = torch.Generator().manual_seed(2)
    sens = {t: {"big.weight": torch.rand(N, generator=g)} for t in tasks}
    whole, streamed, wholes = _pack_both(tmp_path, monkeypatch, base, tasks, fidelity=0.999, sensitivity=sens)
    assert wholes == 0
    assert streamed == whole


def test_dial_streamed_with_an_evaluator(tmp_path, monkeypatch):
    """With an evaluator the dial holds each task's rebuild to score it; the streamed tensor still
    gives the same archive and the dial does not read it whole (``select_lambdas``, which an
    evaluator runs, does)."""
    base, tasks = _family(tmp_path, torch.float32)
    from safetensors.torch import load_file

    originals = {t: load_file(p) for t, p in tasks.items()}

    def score(task, sd):  # closeness to the fine-tune, a stand-in for accuracy
        err = sum(float(((sd[k].float() - originals[task][k].float()) ** 2).sum()) for k in originals[task])
        return 1.0 / (1.0 + 50 * err)

    whole, streamed, wholes = _pack_both(tmp_path, monkeypatch, base, tasks, by="tallpack/dial.py", fidelity=0.99,
                                         evaluate=score, lambda_grid=[0.4])
    assert wholes == 0
    assert streamed == whole
