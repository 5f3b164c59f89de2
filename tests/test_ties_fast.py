"""TIES' compiled loops (kernels.ties_hist, ties_signs, ties_merge) and their numpy fallbacks
against TIES written plainly, element by element, as spec §6.1.9 derives it; and the pack's use of
them straight from the inputs (no task vector written to memory), never timed."""

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import tallpack
from tallpack import kernels
from tallpack.merging import Ties, derive_merged
from tallpack.tall import elements

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def plain_ties(taus, thresholds, majority):
    """Spec §6.1.9 in Python floats rounded to float32 one operation at a time: (merged bits,
    counts, elected-sign counts (> 0, < 0))."""
    f32 = np.float32
    n = len(taus[0])
    merged, counts, pos, neg = np.zeros(n, f32), np.zeros(n, np.uint8), 0, 0
    thr = [f32(t) for t in thresholds]
    for i in range(n):
        r = [f32(t[i]) * (f32(1) if abs(f32(t[i])) >= th else f32(0)) for t, th in zip(taus, thr)]
        s = f32(0)
        for v in r:
            s = f32(s + v)
        pos, neg = pos + (s > 0), neg + (s < 0)
        e = np.sign(s) if s != 0 else majority
        m = f32(0)
        for v in r:
            k = v * (f32(1) if (v > 0 if e > 0 else v < 0) else f32(0))
            m = f32(m + k)
            counts[i] += k != 0
        merged[i] = m
    return merged.view(np.int32), counts, (pos, neg)


@st.composite
def ties_inputs(draw):
    """A base and task blocks of one dtype with ties at the thresholds, zeros, -0.0, equal
    magnitudes, cancellations, and thresholds taken from the task vectors (or 0, or none kept)."""
    dtype = draw(st.sampled_from(list(DTYPES)))
    tasks, n = draw(st.integers(1, 5)), draw(st.integers(1, 70))
    width = 32 if dtype == "float32" else 16
    value = st.floats(-4.0, 4.0, width=width)
    pool = draw(st.lists(value, min_size=1, max_size=4)) + [0.0, -0.0]
    element = st.one_of(value, st.sampled_from(pool), st.sampled_from(pool).map(lambda v: -v))
    row = lambda: torch.tensor(draw(st.lists(element, min_size=n, max_size=n)), dtype=DTYPES[dtype])  # noqa: E731
    base = row() if draw(st.booleans()) else torch.zeros(n, dtype=DTYPES[dtype])
    thetas = [row() for _ in range(tasks)]
    if tasks > 1 and draw(st.booleans()):  # the same magnitudes, opposite signs: sums of exactly 0
        thetas[1][: n // 2] = 2 * base[: n // 2] - thetas[0][: n // 2]
    taus = [x.to(torch.float32) - base.to(torch.float32) for x in thetas]
    mags = sorted({abs(float(v)) for t in taus for v in t})
    thr = st.one_of(st.sampled_from(mags), st.sampled_from([0.0, 1e30]),
                    st.sampled_from(mags).map(lambda v: v * (1 + 1e-12)))
    return dtype, base, thetas, taus, [draw(thr) for _ in range(tasks)], draw(st.sampled_from([-1, 0, 1]))


@given(ties_inputs(), st.sampled_from([1, 2]))
@settings(max_examples=100, deadline=None)
@example(("float32", torch.zeros(3), [torch.tensor([1.0, -0.0, 2.0]), torch.tensor([-1.0, 0.0, -2.0])],
          [torch.tensor([1.0, -0.0, 2.0]), torch.tensor([-1.0, 0.0, -2.0])], [1.0, 0.0], -1), 1)
def test_ties_loops_give_the_plain_formulas_bits(case, parts):
    """merge and signs from the inputs (the task vectors computed on the way) and from the task
    vectors, compiled and numpy, equal the formula computed plainly."""
    dtype, base, thetas, taus, thresholds, majority = case
    merged, counts, signs = plain_ties([t.tolist() for t in taus], thresholds, majority)
    thr = np.array(thresholds, np.float64).astype(np.float32)
    bb, xs, ts = elements(base), [elements(x) for x in thetas], [t.numpy() for t in taus]
    n = len(merged)
    for b, ys, kind in ((bb, xs, dtype), (None, ts, "float32")):
        for merge in (lambda o, c: kernels.ties_merge(b, ys, kind, thr, float(majority), o, c, parts),
                      lambda o, c: kernels.ties_merge_numpy(b, ys, kind, thr, float(majority), o, c)):
            out, got = np.full(n, 7.0, np.float32), np.full(n, 9, np.uint8)
            merge(out, got)
            assert np.array_equal(out.view(np.int32), merged) and np.array_equal(got, counts)
        assert kernels.ties_signs(b, ys, kind, thr, parts) == signs
        assert kernels.ties_signs_numpy(b, ys, kind, thr) == signs
    m = Ties()
    m.thresholds, m.majority_sign = thresholds, majority
    got = derive_merged(taus, m)
    assert np.array_equal(got["merged"].numpy().view(np.int32), merged)
    assert np.array_equal(got["counts"].numpy(), counts)


@given(ties_inputs(), st.booleans())
@settings(max_examples=100, deadline=None)
def test_ties_histograms_count_the_magnitudes_bits(case, low):
    """ties_hist (compiled and numpy) counts the high 16 bits of |tau|'s float32 bits, or the low
    16 of those whose high bits are a given bin."""
    dtype, base, thetas, taus, _, _ = case
    bits = [t.abs().numpy().view(np.uint32) for t in taus]
    for theta, tau, v in zip(thetas, taus, bits):
        b = int(v[0] >> 16) if low else -1
        want = np.bincount(v[v >> 16 == b] & 0xFFFF if low else v >> 16, minlength=1 << 16)
        for args in ((elements(theta), elements(base), dtype), (tau.numpy(), None, "float32")):
            for hist_fn in (kernels.ties_hist, kernels.ties_hist_numpy):
                hist = np.zeros(1 << 16, np.int64)
                hist_fn(*args, b, hist)
                hist_fn(*args, b, hist)  # counts add up
                assert np.array_equal(hist, 2 * want)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_prepare_from_the_inputs_writes_no_task_vector(dtype):
    """prepare over the inputs' blocks gives the thresholds and majority sign of prepare over the
    task vectors (the exact k-th magnitudes), and allocates no tensor on the way: the task vectors
    are computed a block at a time in the compiled loops (before: three passes, each writing every
    task vector to fresh memory, most of TIES' 10x the TA pack)."""
    g = torch.Generator().manual_seed(1)
    base = torch.randn(5000, generator=g).to(DTYPES[dtype])
    thetas = [(base.float() + (torch.rand(5000, generator=g) < 0.4) * torch.randn(5000, generator=g) * 0.1
               ).to(base.dtype) for _ in range(3)]
    thetas[2][:40] = thetas[0][:40]  # ties at the threshold
    taus = [x.float() - base.float() for x in thetas]
    chunks = [(a, a + 999) for a in range(0, 5000, 999)]
    by_taus, by_inputs = Ties(0.2), Ties(0.2)
    by_taus.prepare(lambda: ([t[a:b] for t in taus] for a, b in chunks), 3)

    def inputs():
        return ((dtype, elements(base)[a:b], [elements(x)[a:b] for x in thetas]) for a, b in chunks)

    def no_passes():
        raise AssertionError("the task vectors' pass was taken")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        by_inputs.prepare(no_passes, 3, inputs)
    assert sum(e.self_cpu_memory_usage for e in prof.key_averages() if e.self_cpu_memory_usage > 0) == 0
    k = 5000 - int(5000 * 0.2)
    assert by_inputs.thresholds == by_taus.thresholds == [float(t.abs().kthvalue(k).values) for t in taus]
    assert by_inputs.majority_sign == by_taus.majority_sign


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_ties_archive_of_each_dtype_holds_the_plain_formulas_merged_vector(tmp_path, dtype):
    """A TIES pack (merged vectors and counts straight from the inputs, ``combine_inputs``) stores
    the bits of the formula computed plainly, for every element kind the compiled loops take."""
    g = torch.Generator().manual_seed(2)
    shapes = {"a": (40, 30), "b": (30,), "c": (3, 5)}
    base = {k: torch.randn(s, generator=g).to(DTYPES[dtype]) for k, s in shapes.items()}
    fts = {f"t{t}": {k: (v.float() + (torch.rand(v.shape, generator=g) < 0.5) * 0.1 * torch.randn(v.shape, generator=g)
                         ).to(v.dtype) for k, v in base.items()} for t in range(3)}
    save_file(base, str(tmp_path / "base.safetensors"))
    for t, sd in fts.items():
        save_file(sd, str(tmp_path / f"{t}.safetensors"))
    out = tmp_path / "ties.tallpack"
    tallpack.pack(str(tmp_path / "base.safetensors"), {t: str(tmp_path / f"{t}.safetensors") for t in fts}, out,
                  merge={"method": "ties", "top_k": 0.3}, group=False)
    with tallpack.open(out) as f:
        merge = f.manifest.merge
        entries = {e.name: e for e in f.manifest.tensors}
        for name in shapes:
            taus = [(fts[t][name].float() - base[name].float()).reshape(-1) for t in fts]
            merged, counts, _ = plain_ties([t.tolist() for t in taus], merge["thresholds"], merge["majority_sign"])
            got = {k: f.read_array(entries[name].arrays[k], name).reshape(-1).numpy() for k in ("merged", "counts")}
            assert np.array_equal(got["merged"].view(np.int32), merged) and np.array_equal(got["counts"], counts), name
