"""The fidelity dial's fast paths (performance, twenty-third round): each gives the same arrays,
the same floats and so the same archive, bit for bit, as the straightforward computation it
replaced (kept here as references)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import tallpack
from tallpack.dial import _Errors, _Scratch, overflow_error, same_bits
from tallpack.encodings import correction, qtau


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -- references: the code before the fast paths ---------------------------------------------------

def _pack_codes_ref(u: np.ndarray, bits: int) -> np.ndarray:
    if bits > qtau.PACKED_BITS:
        return u.copy()
    stream = np.unpackbits(u[:, None], axis=1, bitorder="little")[:, :bits].reshape(-1)
    return np.packbits(stream, bitorder="little")


def _quantize_ref(tau: torch.Tensor, bits: int, block: int, half: bool):
    """qtau's quantization in torch, as it was: (codes, scales, deQ)."""
    blocks, n, nb = qtau.float_blocks(tau, block)
    amax = blocks.abs().amax(dim=1)
    qmax, offset = (1 << (bits - 1)) - 1, 1 << (bits - 1)
    s = (amax / qmax).numpy()
    scales = qtau._half_up(s) if half else None
    scales = s.astype(np.float32) if scales is None else scales
    used = torch.from_numpy(scales.astype(np.float32))
    safe = torch.where(used > 0, used, torch.ones_like(used))
    u = (blocks / safe[:, None]).round_().clamp_(-qmax, qmax).add_(offset)
    codes = _pack_codes_ref(u.to(torch.uint8).reshape(-1)[:n].numpy(), bits)
    return codes, scales, u.sub_(offset).mul_(used[:, None]).reshape(-1)[:n]


def _quant_encode_ref(r: torch.Tensor, bits: int, block: int):
    """The quantized correction in torch, as it was: (codes, scales, correction)."""
    blocks, n, nb = qtau.float_blocks(r, block)
    amax = blocks.abs().amax(dim=1)
    qmax = (1 << (bits - 1)) - 1
    scales = amax / qmax
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = (blocks / safe[:, None]).round_().clamp_(-qmax, qmax).to(torch.int8)
    d = (q.to(torch.float32) * scales[:, None]).reshape(-1)[:n]
    q = q.reshape(-1)[:n]
    if bits == 8:
        return q.numpy().copy(), scales.numpy(), d
    u = (q.to(torch.int16) + 8).to(torch.uint8).numpy()
    if n % 2:
        u = np.append(u, np.uint8(8))
    return (u[0::2] | (u[1::2] << 4)).astype(np.uint8), scales.numpy(), d


def _vectors(n: int, seed: int, tiny: bool) -> torch.Tensor:
    """Task vectors with zeros, values that round to 0 from either side and, with ``tiny``, whole
    blocks of subnormals (where a scale loses precision and the clamp bites)."""
    g = _gen(seed)
    v = torch.randn(n, generator=g) * 1e-3
    v[torch.rand(n, generator=g) < 0.3] *= 1e-4
    v[torch.rand(n, generator=g) < 0.1] = 0.0
    if tiny and n:
        k = torch.randint(1, 40, (n,), generator=g).float()
        sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
        sub = sign * k * torch.tensor(1.4e-45)  # k times the smallest subnormal
        v[: n // 2] = sub[: n // 2]
    return v


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(a.reshape(-1).view(torch.int32), b.reshape(-1).view(torch.int32))


# -- the tests ------------------------------------------------------------------------------------

@settings(max_examples=80, deadline=None)
@given(n=st.integers(0, 2000), bits=st.sampled_from([2, 3, 4, 5, 8]), seed=st.integers(0, 2**31 - 1))
def test_code_streams_are_the_bit_packers(n, bits, seed):
    """Codes are packed eight at a time by shifts, not through a byte per bit: the same stream."""
    u = np.random.default_rng(seed).integers(0, 1 << bits, n).astype(np.uint8)
    got = qtau.pack_codes(u, bits)
    assert np.array_equal(got, _pack_codes_ref(u, bits))
    assert np.array_equal(qtau.unpack_codes(got, bits, n), u)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 700), seed=st.integers(0, 2**31 - 1), block=st.sampled_from([1, 7, 64]),
       half=st.booleans(), tiny=st.booleans())
def test_qtau_in_numpy_and_one_buffer_is_torchs_bit_for_bit(n, seed, block, half, tiny):
    """The dial quantizes in numpy (one thread) in one reused buffer: the codes, scales and deQ
    of torch's quantization, bit for bit, subnormal blocks (clamped codes) included."""
    tau = _vectors(n, seed, tiny)
    widths = (2, 3, 4, 5, 6, 8)
    scratch = torch.full((-(-n // block) * block + 5,), float("nan"))  # larger than needed, dirty
    for bits, (codes, scales, deq) in zip(widths, qtau.quantize_widths(tau, widths, block, half, scratch=scratch)):
        want_codes, want_scales, want_deq = _quantize_ref(tau, bits, block, half)
        assert np.array_equal(codes, want_codes) and codes.dtype == np.uint8
        assert scales.dtype == want_scales.dtype and np.array_equal(scales.view(np.uint8), want_scales.view(np.uint8))
        assert deq is not None and _same(deq, want_deq)
        assert _same(deq, qtau.dequantize(codes, scales, bits, block, n))


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 700), seed=st.integers(0, 2**31 - 1), block=st.sampled_from([1, 7, 64]),
       tiny=st.booleans())
def test_quantized_corrections_in_numpy_are_torchs_bit_for_bit(n, seed, block, tiny):
    """As qtau: the quantized corrections' codes, scales and decoded correction as torch made them."""
    r = _vectors(n, seed, tiny)
    scratch = torch.full((-(-n // block) * block,), float("nan"))
    for bits, (codes, scales, c) in zip((4, 8), correction.quant_encode_widths(r, (4, 8), block, scratch=scratch)):
        want_codes, want_scales, want_c = _quant_encode_ref(r, bits, block)
        assert codes.dtype == want_codes.dtype and np.array_equal(codes, want_codes)
        assert np.array_equal(scales.view(np.uint8), want_scales.view(np.uint8))
        assert c is not None and _same(c, want_c)
        assert _same(c, correction.quant_decode(codes, scales, bits, block, n))


@settings(max_examples=100, deadline=None)
@given(values=st.lists(st.sampled_from([0.0, 1e-3, 2e-3, 0.5, 0.25, 3.0, float("nan")]), max_size=200)
       | st.lists(st.floats(0, 1, width=32), max_size=200),
       ks=st.lists(st.integers(0, 220), min_size=1, max_size=6))
def test_the_largest_entries_for_several_k_are_topks(values, ks):
    """One partition finds every k's threshold; the sets are torch.topk's, sorted (ties at a
    threshold, and NaN, left to topk itself, as the writer has always chosen them)."""
    m = torch.tensor(values, dtype=torch.float32)
    got = correction.top_indices(m, ks)
    for k in ks:
        k = min(k, len(values))
        want = np.sort(torch.topk(m, k, sorted=False).indices.numpy()) if k else np.empty(0, np.int64)
        assert got[k].dtype == np.int64 and np.array_equal(got[k], want), (k, got[k], want)


def _plain_error(a: torch.Tensor, b: torch.Tensor, w: torch.Tensor | None):
    """The dial's error of a whole rebuild, as a formula (as ``test_fidelity``'s)."""
    d = a.reshape(-1).to(torch.float64) - b.reshape(-1).to(torch.float64)
    bad = ~torch.isfinite(d)
    over = int(torch.count_nonzero(bad))
    if over:
        d = torch.where(bad, overflow_error(a.dtype), d)
    sq = np.square(d.numpy())
    plain = float(np.add.reduce(sq))
    exact = plain == 0 and same_bits(a, b)
    return (plain, None, exact, over) if w is None else (float(np.add.reduce(sq * w.numpy())), plain, exact, over)


@settings(max_examples=80, deadline=None)
@given(n=st.integers(1, 3000), seed=st.integers(0, 2**31 - 1),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       weighted=st.booleans(), over_before=st.booleans(), over_after=st.booleans(), frac=st.floats(0, 1))
def test_a_sparse_rebuilds_error_from_its_changed_elements_is_the_whole_formula(
        n, seed, dtype, weighted, over_before, over_after, frac):
    """The error of the TALL rebuild with a sparse correction is summed from the kept squares
    with the corrected elements' own: the whole-tensor formula's float, to the bit, with elements
    past the dtype's range (float16) before or after the correction counted the same."""
    g = _gen(seed)
    x = (torch.randn(n, generator=g) * 0.1).to(dtype)
    plain = (x.float() + torch.randn(n, generator=g) * 1e-2).to(dtype)
    k = max(1, int(n * frac))
    idx = np.sort(torch.randperm(n, generator=g)[:k].numpy())
    new = (x.float()[idx] + torch.randn(k, generator=g) * 1e-4).to(dtype)
    if dtype == torch.float16:
        if over_before:
            plain[int(idx[0])] = math.inf  # mended by the correction
            plain[(int(idx[0]) + 1) % n] = -math.inf  # perhaps not
        if over_after:
            new[-1] = math.inf
    w = torch.rand(n, generator=g, dtype=torch.float64) if weighted else None
    errors = _Errors(x, w, _Scratch())
    errors(plain, keep=True)
    whole = plain.clone()
    whole[torch.from_numpy(idx)] = new
    got = errors.patched(idx, new)
    want = _plain_error(whole, x, w)
    if want[1 if weighted else 0] == 0:  # no error left: the whole rebuild's bits decide
        assert got is None
        return
    assert got is not None and (got[0], got[1], got[2]) == (want[0], want[1], want[3])
    assert errors.patched(idx, new) == got  # the kept squares are left as they were


def test_a_sparse_rebuild_with_no_error_left_is_measured_whole():
    """Where the patched rebuild has no squared error its bits decide (-0.0 is not 0.0): the
    patch answers None and the dial measures the whole rebuild."""
    x = torch.tensor([1.0, -0.0, 2.0])
    errors = _Errors(x, None)
    errors(torch.tensor([1.5, -0.0, 2.0]), keep=True)
    assert errors.patched(np.array([0]), torch.tensor([1.0])) is None


def _family(root, dtype):
    g = _gen(3)
    shapes = {"a.weight": (96, 64), "a.bias": (96,), "b.weight": (40, 96), "c.weight": (33, 7)}
    base = {k: torch.randn(s, generator=g) * 0.5 for k, s in shapes.items()}
    save_file({k: v.to(dtype) for k, v in base.items()}, str(root / "base.safetensors"))
    tasks = {}
    for i in range(3):
        ft = {k: (v + torch.randn(v.shape, generator=g) * 0.02 * (torch.rand(v.shape, generator=g) < 0.4)
                  + torch.randn(v.shape, generator=g) * 0.002).to(dtype) for k, v in base.items()}
        save_file(ft, str(root / f"t{i}.safetensors"))
        tasks[f"t{i}"] = str(root / f"t{i}.safetensors")
    return str(root / "base.safetensors"), tasks


def _straightforward_sparse(sq_err, rec32, idx, values, dtype):
    """The sparse candidate's rebuild whole, measured whole (the code before ``_Errors.patched``)."""
    c = torch.zeros(rec32.numel(), dtype=torch.float32)
    c[torch.from_numpy(idx)] = torch.from_numpy(values.astype(np.float32))
    return sq_err(narrow(rec32 + c, dtype))


from tallpack.dtypes import narrow  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kw", [{"fidelity": 0.999}, {"budget": 2.5}])
def test_the_dials_archives_are_the_straightforward_computations(tmp_path, monkeypatch, dtype, kw):
    """Packed with the fast paths and with the straightforward computation of each sparse
    candidate (topk per k, the whole rebuild measured), the archives are the same bytes."""
    import tallpack.dial as dial

    base, tasks = _family(tmp_path, dtype)
    fast = tmp_path / "fast.tp"
    tallpack.pack(base, tasks, str(fast), **kw)
    monkeypatch.setattr(dial.Dial, "_sparse_error", staticmethod(_straightforward_sparse))
    monkeypatch.setattr(dial, "top_indices", lambda m, ks: {
        k: np.sort(torch.topk(m, min(k, m.numel()), sorted=False).indices.numpy()) for k in ks})
    slow = tmp_path / "slow.tp"
    tallpack.pack(base, tasks, str(slow), **kw)
    assert fast.read_bytes() == slow.read_bytes()
