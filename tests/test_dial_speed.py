"""The dial's fast paths give what the simple ones give (twenty-fifth round): the largest entries
of a residual for every sparse ``k`` from one partial sort (``sparse_encode_ks``), tau_MTL and the
masks from the packer's compiled loops (``dial._tall_parts``), torch on one thread while the dial
works (``torch_alone``). The archives are the same bytes either way."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import tallpack
from tallpack import kernels
from tallpack.dial import SPARSE_FRACTIONS, torch_alone
from tallpack.encodings.correction import sparse_encode, sparse_encode_ks


def ks_of(n: int) -> list[int]:
    return sorted({max(1, int(n * f)) for f in SPARSE_FRACTIONS} | {1, max(1, n // 2), n, n + 3})


def same_as_topk(r: torch.Tensor) -> None:
    ks = ks_of(r.numel())
    got = list(sparse_encode_ks(r, ks))
    assert [k for k, _, _ in got] == ks
    for k, gaps, values in got:
        want_gaps, want_values = sparse_encode(r, k)
        assert gaps.dtype == want_gaps.dtype and values.dtype == want_values.dtype, k
        assert np.array_equal(gaps, want_gaps), k
        assert np.array_equal(values.view(np.uint8), want_values.view(np.uint8)), k  # bit for bit


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 3000), st.integers(0, 2**16), st.sampled_from(["normal", "ties", "zeros", "nan", "inf", "big"]))
def test_sparse_encode_ks_gives_topks_entries(n, seed, kind):
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(n, generator=g) * (torch.rand(n, generator=g) < 0.3)  # mostly zeros, as residuals are
    if kind == "ties":  # a few magnitudes, each held many times: ties across every cut
        r = torch.round(r * 2) / 2
    elif kind == "zeros":
        r = torch.zeros(n)
    elif kind == "nan":
        r[torch.randint(0, n, (3,), generator=g)] = float("nan")
    elif kind == "inf":
        r[torch.randint(0, n, (2,), generator=g)] = float("-inf")
    elif kind == "big":  # values past float16's range: stored as float32
        r = r * 1e6
    same_as_topk(r)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_encode_ks_on_a_residual_of_a_million(dtype):
    """A residual as a fine-tune's gives one: few ties in float32 (the partial sort picks), many in
    bfloat16 (``topk`` picks at those cuts)."""
    g = torch.Generator().manual_seed(1)
    n = 1 << 20
    r = ((torch.randn(n, generator=g) * (torch.rand(n, generator=g) < 0.3)).to(dtype)).float()
    same_as_topk(r)


def test_torch_alone_restores_the_thread_count():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with torch_alone():
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with pytest.raises(KeyError), torch_alone():
            raise KeyError("x")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def family(path, dtype: torch.dtype, tasks: int = 3) -> tuple[str, dict[str, str]]:
    """A base and fine-tunes that move 30% of every tensor's entries (as ``benchmarks/ab_dial.py``'s),
    a few hundred KB."""
    g = torch.Generator().manual_seed(7)
    shapes = {"emb.weight": (512, 64), "attn.weight": (64, 192), "attn.bias": (192,), "norm.weight": (64,)}
    base = {k: torch.randn(s, generator=g) * 0.05 for k, s in shapes.items()}
    save_file({k: v.to(dtype) for k, v in base.items()}, str(path / "base.safetensors"))
    out = {}
    for t in range(tasks):
        ft = {k: (v + (torch.rand(v.shape, generator=g) < 0.3) * torch.randn(v.shape, generator=g) * 0.005).to(dtype)
              for k, v in base.items()}
        save_file(ft, str(path / f"t{t}.safetensors"))
        out[f"t{t}"] = str(path / f"t{t}.safetensors")
    return str(path / "base.safetensors"), out


@pytest.mark.skipif(not kernels.COMPILED, reason="the compiled loops are turned off: there is one path only")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("merge", ["ta", "ties"])
def test_dial_archives_are_the_same_with_or_without_the_compiled_loops(tmp_path, monkeypatch, dtype, merge):
    """tau_MTL and the masks the dial measures and writes come from the compiled loops where they
    can (``_tall_parts``); the torch blocks give the same bits, so the same archive."""
    base, tasks = family(tmp_path, dtype)
    opts = {"fidelity": 0.999, "merge": merge}
    tallpack.pack(base, tasks, tmp_path / "compiled.tallpack", **opts)
    monkeypatch.setattr(kernels, "COMPILED", False)
    tallpack.pack(base, tasks, tmp_path / "torch.tallpack", **opts)
    assert (tmp_path / "compiled.tallpack").read_bytes() == (tmp_path / "torch.tallpack").read_bytes()


@pytest.mark.parametrize("opts", [{"fidelity": 0.9999}, {"budget": 2.5}])
def test_dial_archives_do_not_depend_on_torchs_threads(tmp_path, opts):
    """The dial runs torch on one thread (``torch_alone``) and restores the count it found; an
    archive packed with torch on 1 or 2 threads is the same."""
    base, tasks = family(tmp_path, torch.bfloat16)
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            tallpack.pack(base, tasks, tmp_path / f"{threads}.tallpack", **opts)
            assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)
    assert (tmp_path / "1.tallpack").read_bytes() == (tmp_path / "2.tallpack").read_bytes()
