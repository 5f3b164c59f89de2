"""The dial's quantizers in numpy's passes and a reused buffer (``quantize_widths``,
``quant_encode_widths``, ``pack_codes``): the same codes, scales and dequantized values, bit for
bit, as the straightforward computation of their formulas (torch, fresh tensors, one bit at a time)."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tallpack.encodings.correction import quant_decode, quant_encode_widths
from tallpack.encodings.qtau import BITS, _half_up, dequantize, pack_codes, quantize_widths, unpack_codes

BLOCKS = (1, 7, 64)


def plain_blocks(x: torch.Tensor, block: int) -> tuple[torch.Tensor, int]:
    x = x.reshape(-1).to(torch.float32)
    n = x.numel()
    padded = torch.zeros(-(-n // block) * block, dtype=torch.float32)
    padded[:n] = x
    return padded.reshape(-1, block), n


def plain_qtau(tau: torch.Tensor, bits: int, block: int, half: bool) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
    """spec §6.1.8's quantization in torch: (codes, one uint8 each, unpacked; scales; deQ)."""
    blocks, n = plain_blocks(tau, block)
    qmax, offset = (1 << (bits - 1)) - 1, 1 << (bits - 1)
    s = (blocks.abs().amax(dim=1) / qmax).numpy()
    scales = (_half_up(s) if half else None)
    scales = s.astype(np.float32) if scales is None else scales
    used = torch.from_numpy(scales.astype(np.float32))
    safe = torch.where(used > 0, used, torch.ones_like(used))
    u = (blocks / safe[:, None]).round().clamp(-qmax, qmax) + offset
    deq = (u - offset) * used[:, None]
    return u.to(torch.uint8).reshape(-1)[:n].numpy(), scales, deq.reshape(-1)[:n]


def plain_quant(r: torch.Tensor, bits: int, block: int) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
    """A quant correction in torch: (q as int8, scales, the correction as the decoder gives it)."""
    blocks, n = plain_blocks(r, block)
    qmax = (1 << (bits - 1)) - 1
    scales = blocks.abs().amax(dim=1) / qmax
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = (blocks / safe[:, None]).round().clamp(-qmax, qmax).to(torch.int8)
    return q.reshape(-1)[:n].numpy(), scales.numpy(), (q.to(torch.float32) * scales[:, None]).reshape(-1)[:n]


def spec_stream(u: np.ndarray, bits: int) -> np.ndarray:
    """Codes as a little-endian bit stream, one bit at a time (only each code's low ``bits``)."""
    out = np.zeros(-(-u.size * bits // 8), np.uint8)
    for i, c in enumerate(u.tolist()):
        for j in range(bits):
            if c >> j & 1:
                out[(i * bits + j) // 8] |= 1 << ((i * bits + j) % 8)
    return out


def same(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> bool:
    a = a.numpy() if isinstance(a, torch.Tensor) else a
    b = b.numpy() if isinstance(b, torch.Tensor) else b
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


@st.composite
def vectors(draw) -> torch.Tensor:
    """Task vectors and residuals: sizes around the blocks' tails, zero and all-equal blocks,
    huge and tiny magnitudes, values rounding to 0 from either side, 16-bit sources."""
    block = draw(st.sampled_from(BLOCKS))
    tails = st.builds(lambda k, d: max(0, k * 64 + d), st.integers(0, 5), st.integers(-2, 2))
    n = draw(st.integers(0, 3) | tails | st.integers(0, 700))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    scale = draw(st.sampled_from([1e-40, 1e-30, 1e-6, 1e-3, 1.0, 1e4, 1e30, 3e38]))
    x = torch.randn(n, generator=g, dtype=torch.float64).mul_(scale).clamp_(-3e38, 3e38).to(torch.float32)
    x[torch.rand(n, generator=g) < 0.2] *= 1e-4
    x[torch.rand(n, generator=g) < 0.1] = 0.0
    x[torch.rand(n, generator=g) < 0.05] = -0.0
    if n >= 128 and draw(st.booleans()):
        x[:64] = 0.0  # blocks of zeros (scale 0)
        x[64:128] = x[-1].item()  # blocks of one value
    source = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    if source is torch.float16:
        x = x.clamp(-60000, 60000)
    return x.to(source), block


@settings(max_examples=80, deadline=None)
@given(xb=vectors(), widths=st.lists(st.sampled_from(BITS), min_size=1, max_size=7), half=st.booleans(),
       reuse=st.booleans())
def test_qtau_widths_match_the_plain_computation(xb, widths, half, reuse):
    x, block = xb
    n = x.numel()
    scratch = torch.full((n + block,), float("nan")) if reuse else None
    for bits, (codes, scales, deq) in zip(widths, quantize_widths(x, widths, block, half, scratch=scratch)):
        u, want_scales, want_deq = plain_qtau(x, bits, block, half)
        assert same(scales, want_scales)
        assert same(codes, spec_stream(u, bits) if bits <= 4 else u)
        assert deq is not None and same(deq, want_deq)
        assert same(deq, dequantize(codes, scales, bits, block, n))  # what a reader decodes
        if reuse:
            assert deq.data_ptr() == scratch.data_ptr() or n == 0  # worked in the caller's buffer
    for bits, (codes, scales, deq) in zip(widths, quantize_widths(x, widths, block, half, deq=False)):
        u, want_scales, _ = plain_qtau(x, bits, block, half)
        assert deq is None and same(codes, spec_stream(u, bits) if bits <= 4 else u) and same(scales, want_scales)


@settings(max_examples=80, deadline=None)
@given(xb=vectors(), widths=st.lists(st.sampled_from([4, 8]), min_size=1, max_size=3), reuse=st.booleans())
def test_quant_corrections_match_the_plain_computation(xb, widths, reuse):
    r, block = xb
    n = r.numel()
    scratch = torch.full((n + block,), float("nan")) if reuse else None
    for bits, (codes, scales, c) in zip(widths, quant_encode_widths(r, widths, block, scratch=scratch)):
        q, want_scales, want_c = plain_quant(r, bits, block)
        assert same(scales, want_scales)
        if bits == 8:
            assert same(codes, q)
        else:
            u = (q.astype(np.int16) + 8).astype(np.uint8)
            assert same(codes, spec_stream(np.append(u, np.uint8(8)) if n % 2 else u, 4)[: -(-n // 2)])
        assert c is not None and same(c, want_c)
        assert same(c, quant_decode(codes, scales, bits, block, n))


def test_without_a_buffer_each_width_keeps_its_own_values():
    """Without ``scratch`` every deQ stays as it was yielded; with one, each is the next's buffer."""
    tau = torch.randn(1000, generator=torch.Generator().manual_seed(3))
    got = [d for _, _, d in quantize_widths(tau, (2, 3, 8), 64)]
    for bits, d in zip((2, 3, 8), got):
        assert d is not None and same(d, plain_qtau(tau, bits, 64, True)[2])
    kept = [d for _, _, d in quant_encode_widths(tau, (4, 8), 64)]
    assert all(d is not None for d in kept) and same(kept[0], plain_quant(tau, 4, 64)[2])
    scratch = torch.empty(1064)
    views = [d for _, _, d in quantize_widths(tau, (2, 8), 64, scratch=scratch)]
    assert all(d is not None and d.data_ptr() == scratch.data_ptr() for d in views)
    small = torch.empty(10)  # too small: fresh tensors instead
    fresh = [d for _, _, d in quantize_widths(tau, (2, 8), 64, scratch=small)]
    assert same(fresh[1], plain_qtau(tau, 8, 64, True)[2])


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 300) | st.sampled_from([(1 << 20) - 1, (1 << 20) + 9]), bits=st.sampled_from(BITS),
       seed=st.integers(0, 2**31 - 1), wide=st.booleans())
def test_packed_codes_are_the_bit_stream(n, bits, seed, wide):
    """Codes shifted into words: the stream of spec §6.1.8, bit for bit, whatever the pieces; a
    code's bits above ``bits`` are left out, as the stream has no room for them."""
    u = np.random.default_rng(seed).integers(0, 256 if wide else 1 << bits, n).astype(np.uint8)
    got = pack_codes(u, bits)
    if bits > 4:
        assert same(got, u)
        return
    low = u & np.uint8((1 << bits) - 1)
    if n <= 300:
        assert same(got, spec_stream(u, bits))
    else:  # large: numpy's bit (un)packing as the reference
        bits_ = np.unpackbits(low[:, None], axis=1, bitorder="little")[:, :bits].reshape(-1)
        assert same(got, np.packbits(bits_, bitorder="little"))
    assert same(unpack_codes(got, bits, n), low)
