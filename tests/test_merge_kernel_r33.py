"""A merged tensor built by the compiled loop (``merging.fused_merge``, ``_kernels.merge_apply``) has
the bits of torch's expressions (``merge_direction`` then ``apply_direction``, ``merging.FUSED``
off) for every dtype and merge path, and so do whole merged models, with the loop, without it
(``merging.FUSED`` off), and without the compiled module (``kernels._kernels`` None)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tallpack
import tallpack.merged as M
from tallpack import kernels, merging
from tallpack.merged import _overflowed
from tallpack.merging import Ties, apply_direction, fused_merge, merge_direction

pytestmark = pytest.mark.skipif(not kernels.COMPILED, reason="built without a C compiler: the torch path runs")

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
#: whether torch and the loop cast float32 to float16 with F16C (which keeps a NaN's payload)
_F16C = torch.backends.cpu.get_cpu_capability() != "DEFAULT"
#: float32 values where rounding, signs and the ends of the ranges show
SPECIAL = [0.0, -0.0, 1.0, -1.0, 1e-45, -1e-45, 1.1754942e-38, 3e-39, 5.9604645e-08, 6.1035156e-05, 65504.0,
           65520.0, 3.3895314e38, -3.4028235e38, 1.0009766, 1.00390625, 0.1, 1e30, float("inf"), float("-inf")]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).contiguous().view(torch.uint8)


def _values(draw, n: int, specials: bool, nan: bool) -> torch.Tensor:
    """n float32 values: random ones at several scales, some special ones, a NaN (random payload) or two."""
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    scale = draw(st.sampled_from([1e-3, 1.0, 3e4, 1e38]))
    v = torch.randn(n, generator=g) * scale
    if specials:
        at = torch.randint(0, n, (min(n, 40),), generator=g)
        v[at] = torch.tensor(SPECIAL)[torch.randint(0, len(SPECIAL), (at.numel(),), generator=g)]
    if nan:
        at = torch.randint(0, n, (2,), generator=g)
        payload = torch.randint(1, 1 << 22, (2,), generator=g, dtype=torch.int32) | 0x7F800000
        v.view(torch.int32)[at] = payload | (torch.randint(0, 2, (2,), generator=g, dtype=torch.int32) << 31)
    return v


def _torch_merge(theta: torch.Tensor, tau: torch.Tensor, alpha: float, masks, k: int, counts) -> tuple[torch.Tensor, bool]:
    """The torch expressions: ``merge_direction`` then ``apply_direction``, and ``_overflowed``."""
    merging.FUSED = False
    try:
        if masks is not None:
            d = merge_direction("consensus-ta", tau, iter(masks), None, k)
        elif counts is not None:
            d = merge_direction("ties", tau, None, {"counts": counts}, method=Ties())
        else:
            d = tau
        out = apply_direction(theta, d, alpha)
        return out, _overflowed(out, theta, d)
    finally:
        merging.FUSED = True


@settings(max_examples=300)
@given(st.data())
def test_fused_merge_has_torchs_bits(data) -> None:
    draw = data.draw
    dtype = draw(st.sampled_from(DTYPES))
    n = draw(st.sampled_from([1, 7, 8, 9, 33, 1023, 1024, 1025, 2500]))
    path = draw(st.sampled_from(["plain", "consensus", "ties"]))
    nan_in_tau = draw(st.booleans())
    theta = _values(draw, n, draw(st.booleans()), nan=False).to(dtype)
    tau = _values(draw, n, draw(st.booleans()), nan=nan_in_tau)
    alpha = draw(st.sampled_from([0.0, -0.0, 1.0, 0.25, 1 / 3, -0.7, 1e-30, 2.5e38, 0.1]))
    masks = counts = None
    k = 0
    if path == "consensus":
        T = draw(st.integers(1, 6))
        k = draw(st.integers(0, T + 1))
        g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
        masks = [torch.rand(n, generator=g) < draw(st.sampled_from([0.1, 0.5, 0.9])) for _ in range(T)]
    elif path == "ties":
        g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
        counts = torch.randint(0, 256, (n,), generator=g, dtype=torch.uint8)
    want, want_over = _torch_merge(theta, tau, alpha, masks, k, counts)
    got = fused_merge(theta, tau, alpha, masks, k, counts)
    assert got is not None
    out, flags = got
    assert out.dtype == want.dtype and out.shape == want.shape
    if dtype == torch.float16 and nan_in_tau and not _F16C:  # torch's scalar cast: a NaN's payload is open (spec 6.1.1)
        assert torch.equal(out.isnan(), want.isnan())
        keep = ~want.isnan()
        assert torch.equal(_bits(out[keep]), _bits(want[keep]))
    else:  # NaNs too (bfloat16's 0xFFFF, float16's payload as F16C keeps it)
        assert torch.equal(_bits(out), _bits(want))
    assert (flags == kernels.OUT_NOT_FINITE) == want_over, (flags, want_over)


@pytest.mark.parametrize("dtype", DTYPES)
def test_parts_and_shapes(dtype: torch.dtype) -> None:
    """A tensor of several parts on the helper threads, in its shape, into a given output: the bits of one part."""
    g = torch.Generator().manual_seed(3)
    theta = torch.randn(600, 700, generator=g).to(dtype)
    tau = torch.randn(600, 700, generator=g) * 1e-2
    masks = [torch.rand(600, 700, generator=g) < 0.4 for _ in range(3)]
    want, _ = _torch_merge(theta, tau, 0.4, masks, 2, None)
    out = torch.empty_like(theta)
    got = fused_merge(theta, tau, 0.4, masks, 2, None, out, parts=4)
    assert got is not None and got[0] is out and got[1] == 0
    assert torch.equal(_bits(out), _bits(want))


def test_what_the_loop_refuses_runs_in_torch() -> None:
    """float8, a non-contiguous base, a float64 direction, a tensor that requires grad: None, and
    ``apply_direction`` gives torch's bits."""
    theta = torch.randn(8, 6)
    tau = torch.randn(8, 6)
    assert fused_merge(theta.t(), tau.t().contiguous(), 0.5) is None
    assert fused_merge(theta, tau.double(), 0.5) is None
    assert fused_merge(theta.requires_grad_(), tau, 0.5) is None
    if hasattr(torch, "float8_e4m3fn"):
        f8 = torch.randn(8, 6).to(torch.float8_e4m3fn)
        assert fused_merge(f8, tau, 0.5) is None
        assert torch.equal(_bits(apply_direction(f8, tau, 0.5)), _bits((f8.float() + 0.5 * tau).clamp(-448, 448)
                                                                            .to(torch.float8_e4m3fn)))


def _family(dtype: torch.dtype, tasks: int) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(11)
    base = {"emb.weight": (torch.randn(520, 512, generator=g) * 0.02).to(dtype),  # not grouped (SMALL_ELEMENTS)
            "norm.weight": torch.ones(64).to(dtype), "norm.bias": torch.zeros(64).to(dtype),
            "fc.weight": (torch.randn(64, 64, generator=g) * 0.02).to(dtype)}
    fts = {}
    for t in range(tasks):
        ft = {}
        for name, v in base.items():
            delta = 3e-3 * torch.randn(v.shape, generator=g) * (torch.rand(v.shape, generator=g) < 0.3)
            ft[name] = (v.float() + delta).to(dtype)
        fts[f"t{t}"] = ft
    return base, fts


def _merged_all(fam: tallpack.Archive, model: str, k: int | None, alpha: float) -> dict[str, torch.Tensor]:
    return fam.merged(model, k=k, alpha=alpha)


@pytest.mark.parametrize("dtype, tasks, merge", [(torch.float32, 3, "ta"), (torch.bfloat16, 3, "ties"),
                                                 (torch.float16, 2, "ta"), (torch.float64, 3, "ties"),
                                                 (torch.bfloat16, 10, "ta")])  # 10: more masks than FUSED_MASKS
def test_merged_models_alike_with_without_loop_and_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          dtype: torch.dtype, tasks: int, merge: str) -> None:
    """Every model, k and alpha (one that overflows), the large tensor in several runs, the small
    ones in a group (built whole: the loop applies their directions)."""
    base, fts = _family(dtype, tasks)
    out = tmp_path / "f.tallpack"
    tallpack.pack(base, fts, out, merge=merge, chunk_elements=1 << 15)
    monkeypatch.setattr(M, "RUN_ELEMENTS", 1 << 16)
    with tallpack.open(out, cache_bytes=0) as fam:
        models = [m for m in merging.MERGED_MODELS if m.endswith(merge)]
        for model in models:
            for k in (range(0, tasks + 2) if model.startswith("consensus") else [None]):
                for alpha in (0.3, 1.0, 3e38):
                    fused = _merged_all(fam, model, k, alpha)
                    merging.FUSED = False
                    try:
                        plain = _merged_all(fam, model, k, alpha)
                    finally:
                        merging.FUSED = True
                    saved, kernels._kernels = kernels._kernels, None
                    try:
                        without = _merged_all(fam, model, k, alpha)
                    finally:
                        kernels._kernels = saved
                    eager = fam.merge_parts(model, k=k).state_dict(alpha)
                    for other in (plain, without, eager):
                        assert list(other) == list(fused)
                        for name in fused:
                            assert torch.equal(_bits(other[name]), _bits(fused[name])), (model, k, alpha, name)


def test_overflow_is_said_as_before(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """alpha past float16's range: the same tensors listed with the loop as without it."""
    base, fts = _family(torch.float16, 2)
    out = tmp_path / "f.tallpack"
    tallpack.pack(base, fts, out)
    with tallpack.open(out, cache_bytes=0) as fam:
        lists = []
        for fused in (True, False):
            merging.FUSED = fused
            try:
                model = fam.merge_parts("ta", lazy=True).state_dict(1e7, lazy=True)
                dict(model)
                lists.append(model.warn_overflow())
            finally:
                merging.FUSED = True
        assert lists[0] == lists[1] and "emb.weight" in lists[0]


def test_merge_apply_refuses_mismatched_buffers() -> None:
    f = np.zeros(8, np.float32)
    with pytest.raises(ValueError, match="merge_apply"):
        kernels._kernels.merge_apply(np.zeros(7, np.float32), 0, f, [], 0, b"", 1.0, np.zeros(8, np.float32))
    with pytest.raises(ValueError, match="merge_apply"):
        kernels._kernels.merge_apply(f, 4, f, [], 0, b"", 1.0, np.zeros(8, np.float32))
    with pytest.raises(ValueError):
        kernels._kernels.merge_apply(f, 0, f, [np.zeros(7, np.uint8)], 0, b"", 1.0, np.zeros(8, np.float32))
    with pytest.raises(ValueError, match="merge_apply"):
        kernels._kernels.merge_apply(f, 0, f, [], 0, np.zeros(3, np.uint8), 1.0, np.zeros(8, np.float32))
