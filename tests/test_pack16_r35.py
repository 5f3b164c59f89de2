"""A float16 pack's overflow check (``encodings.tall.check_overflow``, spec §6.1.1) reads the
largest |theta_0| and |tau_MTL| of each block from their bits with numpy, on the packer's own
thread: torch's threaded reductions (``torch.aminmax`` of the float32 merged vector), run beside
the packer's loops, waited for its busy threads (1-25 ms a block; issue 8's goal 5, float16 row).
The same bound, so the same archives."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch.profiler import ProfilerActivity, profile

import tallpack
from tallpack import kernels
from tallpack.encodings.tall import _max_abs


def _reference(t: torch.Tensor) -> float:
    """The largest |t| in float64 (NaN when t holds one)."""
    x = t.to(torch.float64).abs()
    return math.nan if bool(torch.isnan(x).any()) else float(x.max())


def _same(got: float, want: float) -> bool:
    return (math.isnan(got) and math.isnan(want)) or got == want


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_max_abs_of_every_16_bit_pattern(dtype) -> None:
    every = torch.from_numpy(np.arange(1 << 16, dtype=np.uint16).view(np.int16).copy()).view(dtype)
    assert _same(_max_abs(every), math.nan)
    rng = np.random.default_rng(0)
    for _ in range(400):  # a NaN, inf, -0, subnormals, both signs, alone or together
        picks = torch.from_numpy(rng.choice(1 << 16, size=int(rng.integers(1, 9)), replace=False))
        block = every[picks].contiguous()
        assert _same(_max_abs(block), _reference(block)), block
    for vals in ([-0.0], [-65504.0, 1.0], [float("-inf")], [-1e-7, 5e-8]):
        block = torch.tensor(vals, dtype=dtype)
        assert _same(_max_abs(block), _reference(block)), block


def test_max_abs_of_float32_blocks() -> None:
    rng = np.random.default_rng(1)
    specials = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, -np.nan, 1e-45, -1e-45, -3.4e38, 3.4e38], np.float32)
    for i in range(400):
        n = int(rng.integers(1, 40))
        x = (rng.standard_normal(n) * 10.0 ** rng.integers(-44, 38)).astype(np.float32)
        if i % 2:
            x[rng.integers(0, n, size=2)] = rng.choice(specials, size=2)
        block = torch.from_numpy(x)
        assert _same(_max_abs(block), _reference(block)), block
    wide = torch.randn(3, 1000)
    assert _max_abs(wide[:, ::7]) == _reference(wide[:, ::7])  # not contiguous: torch's reduction
    assert _max_abs(torch.tensor([-2.0, 1.0]).to(torch.float8_e5m2)) == 2.0 and _max_abs(torch.zeros(0)) == 0.0


def _family(tmp_path, dtype: torch.dtype, extremes: bool = True) -> tuple[str, dict[str, str]]:
    """Base + 3 of ``dtype``: a 2-chunk matrix and a small tensor (grouped), as fine-tunes are;
    with ``extremes`` also one whose TALL rebuild passes float16's range for two tasks, one of
    subnormals, and one of -0 with one task's NaN and inf (stored task-own)."""
    g = torch.Generator().manual_seed(0)
    base = {"m": torch.randn(700, 300, generator=g) * 0.02, "s": torch.randn(64, generator=g)}
    if extremes:
        base |= {"big": torch.full((8,), 20000.0), "tiny": torch.full((16,), 3e-6), "odd": torch.zeros(16)}
    save_file({k: v.to(dtype).contiguous() for k, v in base.items()}, tmp_path / "base.safetensors")
    tasks = {}
    for t in range(3):
        sd = {k: v + 1e-3 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        if extremes:
            sd["big"] = base["big"] + 10000.0 * (t + 1)
            sd["tiny"] = torch.full((16,), -6e-8 * (t + 1))
            sd["odd"] = torch.tensor([-0.0, float("nan"), float("inf")] * 5 + [1.0]) if t == 1 else -torch.zeros(16)
        save_file({k: v.to(dtype).contiguous() for k, v in sd.items()}, tmp_path / f"t{t}.safetensors")
        tasks[f"t{t}"] = str(tmp_path / f"t{t}.safetensors")
    return str(tmp_path / "base.safetensors"), tasks


@pytest.mark.skipif(not kernels.COMPILED, reason="without the compiled loops the packer computes in torch")
def test_a_float16_pack_runs_no_torch_reduction(tmp_path) -> None:
    """Fails before this round: ``check_overflow`` took the merged vector's largest |x| with
    ``torch.aminmax`` (its threads waited for the packer's: 1.1 s of a 4.5 s pack under load)."""
    base, tasks = _family(tmp_path, torch.float16, extremes=False)  # (rebuilds past the range are torch's)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        tallpack.pack(base, tasks, tmp_path / "f16.tallpack", threads=2, chunk_elements=1 << 17)
    ran = {e.name for e in prof.events()}
    assert not {n for n in ran if any(w in n for w in ("min", "max", "abs", "sum", "isfinite"))}, ran


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_archives_and_overflow_figures_do_not_depend_on_threads(tmp_path, dtype) -> None:
    base, tasks = _family(tmp_path, dtype)
    digests = set()
    for threads in (1, 2):
        out = tmp_path / f"{threads}.tallpack"
        tallpack.pack(base, tasks, out, threads=threads, chunk_elements=1 << 17)
        digests.add(hashlib.sha256(out.read_bytes()).hexdigest())
    assert len(digests) == 1
    with tallpack.open(tmp_path / "1.tallpack") as fam:
        figures = {t.name: t.fidelity for t in fam.manifest.tasks}
        kinds = {e.name: e.kind for e in fam.manifest.tensors}
        assert kinds["odd"] == "task-own"  # t1's NaN and inf: stored as they are
        assert fam.get_tensor("t1", "odd").view(torch.uint8).equal(
            torch.tensor([-0.0, float("nan"), float("inf")] * 5 + [1.0]).to(dtype).view(torch.uint8))
    overflowed = {t: f.get("overflow", 0) for t, f in figures.items()}
    if dtype == torch.float16:  # 20000 + tau_MTL (60000) passes 65504 where a mask keeps it: t1's, t2's
        assert overflowed == {"t0": 0, "t1": 8, "t2": 8}, overflowed
    else:
        assert not any(overflowed.values()), overflowed
