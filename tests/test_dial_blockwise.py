"""The fidelity dial's work on a streamed tensor a run of blocks at a time (``Dial._measure_streamed``).

Each task of a tensor too large to hold whole (``inputs.HOLD_BYTES``) is measured, and its
corrections made, a run of whole chunks at a time: every figure the same float as on the whole
copy (numpy's pairwise sums rebuilt across the runs: ``sums.PairwiseSum``), every array's stored
bytes coded chunk by chunk, so the archive is the same bytes as when every tensor is read whole.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tallpack
from tallpack import dial, inputs
from tallpack.codecs import dense_chain
from tallpack.sums import PairwiseSum

from conftest import anon_growth, big_family, dial_family, pack_both_ways


@settings(max_examples=200, deadline=None)
@given(n=st.one_of(st.integers(0, 3000), st.integers(3000, 100_000)), cut=st.integers(1, 5000),
       seed=st.integers(0, 2**32 - 1), spread=st.booleans())
def test_pairwise_sum_in_pieces_is_numpys(n, cut, seed, spread):
    """Pieces of any lengths (cuts anywhere, leaves of the pairwise tree cut too) sum to
    ``np.add.reduce`` of the whole, bit for bit."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(n) ** 2
    if spread:  # magnitudes 16 decades apart: any other order of additions rounds otherwise
        x *= 10.0 ** rng.integers(-8, 8, n)
    s, a = PairwiseSum(n), 0
    while a < n:
        step = int(rng.integers(1, 2 * cut + 1))
        s.add(x[a : a + step])
        a += step
    assert s.value == float(np.add.reduce(x))


def test_pairwise_sum_refuses_too_many_or_too_few():
    s = PairwiseSum(10)
    s.add(np.ones(4))
    with pytest.raises(ValueError):
        s.value
    with pytest.raises(ValueError):
        s.add(np.ones(7))
    with pytest.raises(ValueError):  # (numpy would sum it in another order)
        s.add(np.ones(8)[::2])


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 5000), ce=st.sampled_from([8, 64, 1000]), cut=st.integers(1, 3000),
       dtype=st.sampled_from(["uint8", "float16", "uint32"]))
def test_array_cost_in_pieces_is_the_whole_ones(n, ce, cut, dtype):
    rng = np.random.default_rng(n)
    a = (rng.integers(0, 7, n)).astype(dtype)
    chain = dense_chain("planes", a.itemsize, 3, dtype)
    cost = dial._ArrayCost(chain, ce, np.dtype(dtype))
    for s in range(0, n, cut):
        cost.add(a[s : s + cut])
    assert cost.total == dial._array_cost(chain, a, ce)


CHUNK = 1000  # not a multiple of 64: runs of 8 chunks
N = 23 * CHUNK + 37  # not a multiple of the run


def _family(d: Path, dtype: torch.dtype, tasks: int = 3, n: int = N) -> tuple[Path, dict[str, Path]]:
    """``conftest.dial_family`` of a tensor of ``n`` elements (not a multiple of the run)."""
    return dial_family(d, dtype, n, tasks=tasks, seed=3, spikes=100)


class _Count:
    """Counts of the dial's streamed measurements and of sparse cuts that tie (more entries of the
    k-th largest magnitude than are kept)."""

    def __init__(self, monkeypatch):
        self.streamed = self.tied = 0
        measure, settle = dial.Dial._measure_streamed, dial._Sparse.settle

        def counted(this, *a, **k):
            self.streamed += 1
            return measure(this, *a, **k)

        def settled(this):
            settle(this)
            for k, (cut, ties) in this.cut.items():
                h = int(cut) >> 16
                self.tied += int(this._low[h][int(cut) & 0xFFFF]) > ties

        monkeypatch.setattr(dial.Dial, "_measure_streamed", counted)
        monkeypatch.setattr(dial._Sparse, "settle", settled)


def _same(tmp: Path, monkeypatch, base: Path, tasks: dict[str, Path], **kw) -> None:
    whole, streamed, _, wholes = pack_both_ways(tmp, monkeypatch, base, tasks, chunk=CHUNK, **kw)
    assert wholes == 0
    assert streamed == whole


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("merge", ["ta", "ties"])
@pytest.mark.parametrize("dial_opts", [{"fidelity": 0.999}, {"fidelity": 0.98}, {"budget": 3.0}])
def test_blockwise_dial_is_the_same_bytes(tmp_path, monkeypatch, dtype, merge, dial_opts):
    base, tasks = _family(tmp_path, dtype)
    count = _Count(monkeypatch)
    _same(tmp_path, monkeypatch, base, tasks, merge=merge, **dial_opts)
    assert count.streamed >= len(tasks)  # each task of the streamed tensor measured a run at a time


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("corrections", [("sparse",), ("quant4",), ("quant8",), ("qtau",), ("exact",)])
@pytest.mark.parametrize("fidelity", [0.9995, 0.95])
def test_blockwise_each_correction_alone(tmp_path, monkeypatch, threads, corrections, fidelity):
    base, tasks = _family(tmp_path, torch.float32)
    _same(tmp_path, monkeypatch, base, tasks, fidelity=fidelity, corrections=corrections, threads=threads)
    with tallpack.open(tmp_path / "a0.tallpack") as a:
        stored = {k for rec in a.manifest.stats["dial"]["tasks"].values() for k in rec["stored"]}
    assert stored - {"tall"}, stored  # the correction was chosen somewhere


def test_blockwise_sparse_cut_and_ties(tmp_path, monkeypatch):
    """float32 residuals: each sparse cut found by the radix selection, none tied; float16 and
    bfloat16 ones, many equal magnitudes: ties across the cut, the lowest indices kept, a run at a
    time as on the whole (``torch.topk`` nowhere). Same bytes."""
    count = _Count(monkeypatch)

    def no_topk(*a, **k):
        raise AssertionError("torch.topk called")

    monkeypatch.setattr(torch, "topk", no_topk)
    for dtype, ties in ((torch.float32, False), (torch.float16, True), (torch.bfloat16, True)):
        d = tmp_path / str(dtype)
        d.mkdir()
        base, tasks = _family(d, dtype)
        count.tied = 0
        _same(d, monkeypatch, base, tasks, fidelity=0.9995, corrections=("sparse",))
        assert (count.tied > 0) == ties, (dtype, count.tied)
        with tallpack.open(d / "a0.tallpack") as a:
            stored = {k for rec in a.manifest.stats["dial"]["tasks"].values() for k in rec["stored"]}
        assert "sparse" in stored, (dtype, stored)



@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("sensitive", [False, True])
def test_blockwise_figures_are_the_same_floats(tmp_path, monkeypatch, dtype, sensitive):
    """Every figure a task's measurement gives (sums of squares, each candidate's error and bytes,
    the exact tier's sample sizes) is the same float a run at a time as on the whole copy: the
    archive's bytes alone would not show a last bit (a fidelity near 1 hides it)."""
    base, tasks = _family(tmp_path, dtype)
    got: dict[str, list] = {"whole": [], "runs": []}
    measure, streamed = dial.Dial._measure, dial.Dial._measure_streamed

    def whole(self, ctx, item, i, *a, **k):
        m = measure(self, ctx, item, i, *a, **k)
        got["whole"].append((item.name, i, m))
        return m

    def runs(self, ctx, item, i, *a, **k):
        m = streamed(self, ctx, item, i, *a, **k)
        got["runs"].append((item.name, i, m))
        return m

    monkeypatch.setattr(dial.Dial, "_measure", whole)
    monkeypatch.setattr(dial.Dial, "_measure_streamed", runs)
    g = torch.Generator().manual_seed(5)
    sens = {t: {"big.weight": torch.rand(N, generator=g)} for t in tasks} if sensitive else None
    _same(tmp_path, monkeypatch, base, tasks, fidelity=0.999, sensitivity=sens)
    whole_, runs_ = (sorted(got[k], key=lambda g: g[:2]) for k in ("whole", "runs"))  # (threads: any order)
    assert [w[:2] for w in whole_] == [r[:2] for r in runs_]  # (both tensors streamed: 2 chunks or more)
    for (_, _, a), (_, _, b) in zip(whole_, runs_):
        assert (a.sq, a.sq_plain, a.scale, a.tall, a.qtaus, a.sizes) == (b.sq, b.sq_plain, b.scale, b.tall, b.qtaus,
                                                                          b.sizes)
        assert a.ladder == b.ladder
        assert len(a.ladder) > 2  # (candidates of several kinds compared)

@settings(max_examples=150, deadline=None)
@given(n=st.integers(1, 4000), run=st.sampled_from([64, 128, 512, 1024]), fraction=st.sampled_from(dial.SPARSE_FRACTIONS),
       values=st.sampled_from(["spread", "few", "zeros"]), special=st.sampled_from([None, "nan", "inf", "big"]),
       seed=st.integers(0, 2**32 - 1))
def test_sparse_choice_a_run_at_a_time_is_sparse_encodes(n, run, fraction, values, special, seed):
    """The entries a sparse correction keeps, found a run at a time (the radix selection, ties at
    the cut kept by the lowest index as the runs come), and its arrays: those of ``sparse_encode``
    (and ``sparse_encode_ks``) on the whole residual."""
    from tallpack.encodings.correction import magnitude_bits, sparse_encode, sparse_encode_ks

    rng = np.random.default_rng(seed)
    if values == "spread":
        r = rng.standard_normal(n).astype(np.float32) * 10.0 ** rng.integers(-6, 2, n).astype(np.float32)
    elif values == "few":  # many equal magnitudes, of both signs: ties across the cut
        r = rng.choice(np.float32([-2.0, -0.5, 0.0, 0.25, 0.5, 1.0, 2.0]), n)
    else:
        r = np.zeros(n, np.float32)
        r[rng.integers(0, n, 3)] = 1.0
    if special is not None:
        r[rng.integers(0, n)] = {"nan": np.nan, "inf": -np.inf, "big": 1e6}[special]
    res = torch.from_numpy(r)
    k = max(1, int(n * fraction))

    def residuals():
        return ((slice(a, min(n, a + run)), res[a : a + run]) for a in range(0, n, run))

    picks = dial._sparse_runs(n, k, residuals)
    chosen, gaps_of, gaps, kept = picks.chooser(), dial._Gaps(n), [], []
    for s, piece in residuals():
        local = chosen(k, s, magnitude_bits(piece))
        gaps.append(gaps_of(s, local))
        kept.append(piece.numpy()[local])
    v = np.concatenate(kept)
    v = v.astype(np.float16) if picks.half else v
    want = sparse_encode(res, k)
    assert np.concatenate(gaps).tobytes() == want[0].tobytes() and v.tobytes() == want[1].tobytes()
    assert v.dtype == want[1].dtype and np.concatenate(gaps).dtype == want[0].dtype
    (_, g2, v2), = sparse_encode_ks(res, [k])
    assert g2.tobytes() == want[0].tobytes() and v2.tobytes() == want[1].tobytes()


@pytest.mark.parametrize("opts", [{"fidelity": 0.999}, {"fidelity": 0.9, "corrections": ("qtau",)}, {"budget": 3.0}])
def test_blockwise_reads_no_copy_whole(tmp_path, monkeypatch, opts):
    """The dial reads each task's copy of the streamed tensor a run at a time, to measure it, to
    write its masks or qtau codes and its corrections: never whole (``Source.get``)."""
    base, tasks = _family(tmp_path, torch.bfloat16)
    from tallpack import sources

    reads: list[str] = []
    get = sources.Source.get

    def counted(self, name, *a, **k):
        if name == "big.weight":
            reads.append(getattr(self, "task", None) or "base")
        return get(self, name, *a, **k)

    monkeypatch.setattr(sources.Source, "get", counted)
    monkeypatch.setattr(inputs, "HOLD_BYTES", 0)
    tallpack.pack(base, tasks, tmp_path / "a.tallpack", chunk_elements=CHUNK, **opts)
    assert reads == []
    with tallpack.open(tmp_path / "a.tallpack") as a:
        stored = {k for rec in a.manifest.stats["dial"]["tasks"].values() for k in rec["stored"]}
    assert stored - {"tall"}, stored

def test_blockwise_memory(tmp_path):
    """A 32 MB float32 tensor, base and 3 tasks, fidelity 0.999: a streamed task measured a run at
    a time, not with its copy and a dozen whole working arrays. Read whole, the four copies (128 MB)
    are held; until round 39 twice (the pack's loop kept the last tensor it loaded while the dial
    read it again): 370 against 131 MiB, now 244 against 133 MiB."""
    big_family(tmp_path)
    setup = f"""
        from pathlib import Path
        from tallpack import inputs
        d = Path({str(tmp_path)!r})
        tasks = {{f"t{{i}}": d / f"t{{i}}.safetensors" for i in range(3)}}
    """
    growth = {}
    for hold in (1 << 60, 0):
        work = f"""
            inputs.HOLD_BYTES = {hold}
            tallpack.pack(d / "base.safetensors", tasks, d / "a{hold}.tallpack", chunk_elements=1 << 18,
                          fidelity=0.999, threads=1)
        """
        growth[hold] = anon_growth(setup, work)
    assert (tmp_path / "a0.tallpack").read_bytes() == (tmp_path / f"a{1 << 60}.tallpack").read_bytes()
    print({k: v >> 20 for k, v in growth.items()})
    assert growth[0] < growth[1 << 60] - (96 << 20), growth  # three of the four copies at least
