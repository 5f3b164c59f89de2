"""A sparse correction keeps the k entries of largest magnitude, ties at the cut broken by the
lowest index (a NaN above every number, all NaNs one magnitude, -0.0 and 0.0 one): on the whole
residual (``sparse_encode``, ``sparse_encode_ks``) and a run at a time (``dial._Sparse``), the
same entries, so that archives depend on no selection routine's internals."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tallpack
from tallpack import dial
from tallpack.encodings.correction import (FLOAT16_MAX, magnitude_bits, sparse_encode, sparse_encode_ks,
                                           sparse_select)

# a few values, each held many times, of both signs: ties across nearly every cut
FEW = np.array([0.0, -0.0, 0.25, -0.25, 1.0, -1.0, 3.0, np.inf, -np.inf, 7e4, np.nan], np.float32)


def reference(r: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The definition, simply: sort by (NaN first, then larger |r|, then lower index), take k, sort."""
    nan = np.isnan(r)
    mag = np.where(nan, 0.0, np.abs(r.astype(np.float64)))
    order = np.lexsort((np.arange(r.size), -mag, -nan.astype(np.int8)))
    idx = np.sort(order[: max(0, min(k, r.size))])
    vals = r[idx]
    if vals.size == 0 or float(np.abs(vals).max()) <= FLOAT16_MAX:  # (a NaN's max is not)
        vals = vals.astype(np.float16)
    return idx, vals


def residual_of(draw_values: list[int], pool: np.ndarray) -> np.ndarray:
    return pool[np.array(draw_values, dtype=np.int64)] if draw_values else np.zeros(0, np.float32)


def same(got: tuple[np.ndarray, np.ndarray], want: tuple[np.ndarray, np.ndarray], n: int) -> None:
    gaps, vals = got
    idx, wvals = want
    assert gaps.dtype == (np.uint64 if n > 0xFFFFFFFF else np.uint32)
    assert np.cumsum(gaps.astype(np.int64)).tolist() == idx.tolist()
    assert vals.dtype == wvals.dtype and vals.tobytes() == wvals.tobytes()  # bit for bit (NaN, -0.0)


pools = st.sampled_from([FEW[:7], FEW[:9], FEW, np.array([0.0, -0.0], np.float32),
                         np.array([0.5, -0.5, 0.5], np.float32)])


@settings(max_examples=200, deadline=None)
@given(pool=pools, data=st.data())
def test_sparse_encode_is_the_lowest_index_choice(pool, data):
    """Every k in [0, n] (and beyond): ``sparse_encode`` and ``sparse_encode_ks`` keep the
    definition's entries."""
    picks = data.draw(st.lists(st.integers(0, len(pool) - 1), max_size=120))
    r = residual_of(picks, pool)
    n = r.size
    t = torch.from_numpy(r)
    ks = list(range(0, n + 2))
    for k, gaps, vals in sparse_encode_ks(t, ks):
        same((gaps, vals), reference(r, k), n)
    for k in {0, n // 3, n // 2, n, n + 5}:
        same(sparse_encode(t, k), reference(r, k), n)
        same(sparse_encode(t, k, t.abs()), reference(r, k), n)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 20_000), seed=st.integers(0, 2**32 - 1), run=st.integers(1, 1 << 12))
def test_sparse_select_in_runs_of_its_own(n, seed, run):
    """The whole path's scan of the ties a run at a time (``SELECT_RUN``) keeps the first ones of
    the whole, whatever the run."""
    from tallpack.encodings import correction

    rng = np.random.default_rng(seed)
    r = rng.choice(FEW, n)
    ks = sorted({max(1, int(n * f)) for f in dial.SPARSE_FRACTIONS} | {n // 2})
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(correction, "SELECT_RUN", run)
        for k, idx in sparse_select(magnitude_bits(r), ks):
            assert idx.tolist() == reference(r, k)[0].tolist(), k


def runs_of(n: int, rng: np.random.Generator) -> list[slice]:
    cuts, a = [], 0
    while a < n:
        b = min(n, a + int(rng.integers(1, max(2, n // 3))))
        cuts.append(slice(a, b))
        a = b
    return cuts


@settings(max_examples=200, deadline=None)
@given(pool=pools, n=st.integers(1, 3000), seed=st.integers(0, 2**32 - 1))
def test_streamed_choice_is_the_lowest_index_choice(pool, n, seed):
    """Runs of random sizes (a run at a time, as a streamed tensor's): every candidate's entries
    and arrays, the definition's; runs out of order are refused (ties are kept by index)."""
    rng = np.random.default_rng(seed)
    r = rng.choice(pool, n)
    res = torch.from_numpy(r)
    cuts = runs_of(n, rng)
    ks = sorted({max(1, int(n * f)) for f in dial.SPARSE_FRACTIONS} | {1, n})
    picks = dial._Sparse(n, ks)
    for s in cuts:
        picks.high(res[s])
    if picks.lows():
        for s in cuts:
            picks.low(res[s])
    picks.settle()
    kept = picks.chooser()
    got: dict[int, list[np.ndarray]] = {k: [] for k in ks}
    gaps = {k: dial._Gaps(n) for k in ks}
    for s in cuts:
        u = magnitude_bits(res[s])
        for k in ks:
            got[k].append(gaps[k](s, kept(k, s, u)))
    for k in ks:
        idx, vals = reference(r, k)
        g = np.concatenate(got[k])
        assert np.cumsum(g.astype(np.int64)).tolist() == idx.tolist(), k
        v = r[idx]
        assert (v.astype(np.float16) if picks.half else v).tobytes() == vals.tobytes()
    if len(cuts) > 1:
        again = picks.chooser()
        with pytest.raises(AssertionError, match="out of order"):
            again(ks[0], cuts[1], magnitude_bits(res[cuts[1]]))


def test_magnitude_bits_order_the_magnitudes():
    """-0.0 and 0.0 one; a subnormal above them; every NaN (any sign, any payload) one, above +inf."""
    nans = np.array([0x7FC00000, 0xFFC00000, 0x7F800001, 0x7FFFFFFF], np.uint32).view(np.float32)
    r = np.concatenate([np.array([-0.0, 0.0, 1e-45, -1.0, np.inf, -np.inf], np.float32), nans])
    u = magnitude_bits(torch.from_numpy(r))
    assert u[0] == u[1] < u[2] < u[3] < u[4] == u[5] < u[6]
    assert len(set(u[6:].tolist())) == 1
    assert r.view(np.uint32)[6:].tolist() == nans.view(np.uint32).tolist()  # (the residual untouched)


def test_streamed_ties_hold_no_whole_magnitudes(tmp_path):
    """A bfloat16 family (every sparse cut tied), 8M elements, base and 3 tasks, streamed at fidelity
    0.999, sparse corrections only: the pack's peak stays under 24 bytes an element (144 MB here;
    the float32 base and ``tau_MTL`` are 8 of them; ``torch.topk`` on the whole magnitudes made it
    309 MB, 37 bytes an element)."""
    from safetensors.torch import save_file

    from conftest import anon_growth

    n = 8 << 20
    g = torch.Generator().manual_seed(0)
    big = torch.randn(n, generator=g) * 0.02
    save_file({"big.weight": big.to(torch.bfloat16)}, tmp_path / "base.safetensors")
    for i in range(3):
        noisy = (big + 1e-3 * torch.randn(n, generator=g)).to(torch.bfloat16)
        save_file({"big.weight": noisy}, tmp_path / f"t{i}.safetensors")
    setup = f"""
        from pathlib import Path
        from tallpack import inputs
        d = Path({str(tmp_path)!r})
        tasks = {{f"t{{i}}": d / f"t{{i}}.safetensors" for i in range(3)}}
        inputs.HOLD_BYTES = 0
    """
    work = """
        tallpack.pack(d / "base.safetensors", tasks, d / "a.tallpack", chunk_elements=1 << 18, fidelity=0.999,
                      corrections=("sparse",), threads=1)
    """
    grown = anon_growth(setup, work)
    with tallpack.open(tmp_path / "a.tallpack") as a:
        stored = {k for rec in a.manifest.stats["dial"]["tasks"].values() for k in rec["stored"]}
    assert "sparse" in stored, stored  # (chosen: made a run at a time too, not only measured)
    assert grown < 24 * n, grown >> 20
