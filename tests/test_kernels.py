"""The compiled hot loops (tallpack/_kernels.c) give the bytes of their numpy and torch fallbacks,
for every length, rotation, plane count and alignment; and a process can do without them."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tallpack import kernels
from tallpack.tall import Bits, reconstruct

_kernels = pytest.importorskip("tallpack._kernels", reason="built without a C compiler: the numpy loops run")

lengths = st.integers(0, 3000)


def _planes(n: int, k: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, n, dtype=np.uint8) for _ in range(k)]


def _dst(n: int, k: int, offset: int) -> np.ndarray:
    """An (n, k) uint8 output starting ``offset`` bytes into a buffer (misaligned when odd)."""
    return np.full(n * k + offset, 0xAB, np.uint8)[offset:].reshape(n, k)


@given(lengths, st.sampled_from([1, 2, 3, 4, 8, 16]), st.integers(0, 3), st.integers(0, 2**32 - 1))
def test_join_planes_matches_numpy(n, k, offset, seed):
    planes = _planes(n, k, seed)
    ours, ref = _dst(n, k, offset), _dst(n, k, offset)
    _kernels.join_planes(planes, ours)
    kernels._join_numpy(planes, ref)
    assert ours.tobytes() == ref.tobytes() == np.stack(planes, axis=1).tobytes()


@given(lengths, st.sampled_from([2, 4]), st.integers(1, 7), st.integers(0, 3), st.integers(0, 2**32 - 1))
def test_join_exponent_matches_numpy(n, k, r, offset, seed):
    low, s, t = _planes(n, k - 2, seed), *_planes(n, 2, seed + 1)
    ours, ref = _dst(n, k, offset), _dst(n, k, offset)
    _kernels.join_exponent(low, s, t, r, ours)
    kernels._join_numpy(low, ref)
    kernels._join_exponent_numpy(s, t, r, ref)
    assert ours.tobytes() == ref.tobytes()


def _numpy_split(src: np.ndarray, r: int) -> np.ndarray:
    """kernels.split_planes' numpy loop, whichever loops this process runs."""
    saved, kernels._kernels = kernels._kernels, None
    try:
        out = np.full((src.shape[1], src.shape[0]), 0xCD, np.uint8)
        kernels.split_planes(src, out, r)
    finally:
        kernels._kernels = saved
    return out


@given(lengths, st.sampled_from([1, 2, 3, 4, 8]), st.integers(0, 7), st.integers(0, 3), st.integers(0, 2**32 - 1))
def test_split_planes_matches_numpy_and_inverts_the_joins(n, k, r, offset, seed):
    """The writer's split (and rotation, r >= 1) against the numpy loop and the plain transpose,
    misaligned sources included; joining the planes back gives the elements."""
    if r and k not in (2, 4):
        r = 0  # the rotation is planes-exp's: 2- and 4-byte elements only
    src = np.stack(_planes(n, k, seed), axis=1) if n else np.empty((0, k), np.uint8)
    moved = np.empty(src.size + offset, np.uint8)[offset:].reshape(n, k)  # misaligned when offset is odd
    moved[...] = src
    ours = np.full((k, n), 0xCD, np.uint8)
    _kernels.split_planes(moved, k, r, ours)
    assert ours.tobytes() == _numpy_split(src, r).tobytes()
    if r == 0:
        assert ours.tobytes() == np.ascontiguousarray(src.T).tobytes()
        back = np.empty((n, k), np.uint8)
        _kernels.join_planes(list(ours), back)
    else:
        t, s = kernels.rotate(np.ascontiguousarray(src[:, k - 2]), np.ascontiguousarray(src[:, k - 1]), r)
        assert ours[k - 1].tobytes() == t.tobytes() and ours[k - 2].tobytes() == s.tobytes()
        back = np.empty((n, k), np.uint8)
        _kernels.join_exponent(list(ours[: k - 2]), ours[k - 2], ours[k - 1], r, back)
    assert back.tobytes() == src.tobytes()


@given(st.integers(0, 5000), st.integers(1, 7), st.integers(0, 2**32 - 1))
@settings(max_examples=40, deadline=None)
def test_join_exponent_inverts_the_writers_rotation(n, r, seed):
    x = np.random.default_rng(seed).standard_normal(n).astype(np.float32)
    b = x.view(np.uint8).reshape(n, 4)
    t, s = kernels.rotate(np.ascontiguousarray(b[:, 2]), np.ascontiguousarray(b[:, 3]), r)
    out = np.empty((n, 4), np.uint8)
    _kernels.join_exponent([np.ascontiguousarray(b[:, 0]), np.ascontiguousarray(b[:, 1])], s, t, r, out)
    assert out.tobytes() == x.tobytes()


def _specials(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    base, merged = torch.randn(n, generator=g), torch.randn(n, generator=g) * 1e-3
    for x in (base, merged):  # signed zeros, infinities, NaN, subnormals, values whose sum rounds
        x[::7] = -0.0
        x[1::11] = float("inf")
        x[2::13] = float("-inf")
        x[3::17] = float("nan")
        x[4::19] = 1e-40
        x[5::23] = 3e38
    return base, merged, torch.rand(n, generator=g) < 0.4


def _packed(mask: torch.Tensor) -> np.ndarray:
    """A bool mask's bits as codec ``bitpack`` stores them, the padding bits past its end set (the
    loops must not read them)."""
    m = mask.reshape(-1).numpy()
    packed = np.packbits(m, bitorder="little")
    if m.size % 8:
        packed[-1] |= np.uint8(0xFF << (m.size % 8) & 0xFF)
    return packed


# Lengths around the compiled loops' steps: 8 elements a stored byte, 32 a vector step, 4096 a block.
_bit_lengths = st.one_of(st.integers(0, 4000), st.sampled_from([4095, 4096, 4097, 8191, 8200, 12289]))


@given(_bit_lengths, st.integers(0, 2**31 - 1))
@settings(max_examples=60, deadline=None)
def test_tall_f32_is_bit_identical_to_addcmul(n, seed):
    """With the mask as bytes and as its stored bits."""
    base, merged, mask = _specials(n, seed)
    ref = torch.addcmul(base, mask.to(torch.float32), merged)
    for m, bits in ((mask.view(torch.uint8).numpy(), False), (_packed(mask), True)):
        out = torch.full((n,), 7.0)
        _kernels.tall_f32(base.numpy(), merged.numpy(), m, out.numpy(), bits)
        assert torch.equal(out.view(torch.int32), ref.view(torch.int32)), bits
    # and reconstruct, whichever loop this process runs, from a bool mask or its bits
    for m in (mask, Bits(_packed(mask), n, (n,))):
        assert torch.equal(reconstruct(base, m, merged, torch.float32).view(torch.int32), ref.view(torch.int32))


def _stored_planes(x: torch.Tensor, r: int) -> list[np.ndarray]:
    """float32 elements as the writer stores them: ``planes`` (r = 0), or ``planes-exp`` of rotation r."""
    b = x.numpy().view(np.uint8).reshape(-1, 4)
    planes = [np.ascontiguousarray(b[:, j]) for j in range(4)]
    if r:
        t, s = kernels.rotate(planes[2], planes[3], r)
        planes[2], planes[3] = s, t
    return planes


@given(_bit_lengths, st.integers(0, 7), st.integers(0, 7), st.integers(0, 2**31 - 1))
@settings(max_examples=60, deadline=None)
def test_tall_planes_is_bit_identical_to_addcmul(n, rb, rm, seed):
    """The one-pass rebuild from stored planes, compiled and numpy, against addcmul on the joined
    floats, for every pair of rotations (0: ``planes``)."""
    base, merged, mask = _specials(n, seed)
    ref = torch.addcmul(base, mask.to(torch.float32), merged)
    args = (_stored_planes(base, rb), rb, _stored_planes(merged, rm), rm, mask.view(torch.uint8).numpy())
    for run in (_kernels.tall_planes, kernels._tall_planes_numpy, kernels.tall_planes):
        out = torch.full((n,), 7.0)
        run(*args, out.numpy())
        assert torch.equal(out.view(torch.int32), ref.view(torch.int32)), run
    for run in (_kernels.tall_planes, kernels.tall_planes):  # the mask as its stored bits
        out = torch.full((n,), 7.0)
        run(*args[:4], _packed(mask), out.numpy(), *_bits_arg(run))
        assert torch.equal(out.view(torch.int32), ref.view(torch.int32)), run


def _bits_arg(run) -> tuple:
    """``bits`` as the last positional argument: the compiled loop's, or kernels.py's after ``threads``."""
    return (1, True) if run.__module__ == kernels.__name__ else (True,)


def _stored_bf16_planes(x: torch.Tensor, r: int) -> list[np.ndarray]:
    """bfloat16 elements as the writer stores them: two planes (r = 0), or ``planes-exp``'s S, T."""
    b = x.view(torch.int16).numpy().view(np.uint8).reshape(-1, 2)
    planes = [np.ascontiguousarray(b[:, j]) for j in range(2)]
    if r:
        t, s = kernels.rotate(planes[0], planes[1], r)
        planes = [s, t]
    return planes


_HALF_RUNS = {torch.bfloat16: (_kernels.tall_planes_bf16, kernels._tall_planes_bf16_numpy, kernels.tall_planes_bf16),
              torch.float16: (_kernels.tall_planes_f16, kernels._tall_planes_f16_numpy, kernels.tall_planes_f16)}


def _same_half(out: torch.Tensor, ref: torch.Tensor) -> bool:
    """Every bit equal, NaN aside (a NaN's payload is unspecified, spec 6.1.1)."""
    keep = ~ref.isnan()
    return torch.equal(out.isnan(), ref.isnan()) and torch.equal(out.view(torch.int16)[keep], ref.view(torch.int16)[keep])


@given(_bit_lengths, st.integers(0, 7), st.integers(0, 7), st.integers(0, 2**31 - 1),
       st.sampled_from([torch.bfloat16, torch.float16]))
@settings(max_examples=80, deadline=None)
def test_tall_planes_16_bit_is_bit_identical_to_addcmul_then_the_cast(n, rb, rm, seed, dtype):
    """The bfloat16 and float16 rebuilds from stored planes, compiled and numpy, against the
    spec's formula as torch computes it (addcmul in float32, then ``.to(dtype)``), for every pair
    of rotations; lengths not a multiple of 32 end in the compiled scalar loop."""
    base, merged, mask = _specials(n, seed)
    if dtype == torch.float16:
        merged[8::31] = 65519.0  # sums past float16's range, and just under its rounding to infinity
        merged[9::37] = 65520.0
        base = (base * 100).clamp(-7e4, 7e4)
    base = base.to(dtype)
    base.view(torch.int16)[6::29] = 0x0001  # subnormals
    merged[7::31] = 2.0 ** -8 * 3  # sums that sit halfway between two bfloat16 values
    ref = torch.addcmul(base.float(), mask.to(torch.float32), merged).to(dtype)
    args = (_stored_bf16_planes(base, rb), rb, _stored_planes(merged, rm), rm, mask.view(torch.uint8).numpy())
    for run in _HALF_RUNS[dtype]:
        out = torch.full((n,), 7.0, dtype=dtype)
        run(*args, out.view(torch.int16).numpy())
        assert _same_half(out, ref), run
    for run in (_HALF_RUNS[dtype][0], _HALF_RUNS[dtype][2]):  # the mask as its stored bits
        out = torch.full((n,), 7.0, dtype=dtype)
        run(*args[:4], _packed(mask), out.view(torch.int16).numpy(), *_bits_arg(run))
        assert _same_half(out, ref), run


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_tall_planes_16_bit_converts_every_value_as_torch(dtype):
    """Every 16-bit pattern as the base (widened, plus zero), and float32 values across the whole
    range as the merged vector (added to zero, then rounded): in runs of 31 elements (the scalar
    loop) and whole (the vector loop)."""
    g = torch.Generator().manual_seed(9)
    every = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype)
    spread = torch.randn(1 << 16, generator=g) * torch.exp2(torch.randint(-150, 130, (1 << 16,), generator=g).float())
    for base, merged, mask in ((every, torch.zeros(1 << 16), torch.zeros(1 << 16, dtype=torch.bool)),
                               (torch.zeros(1 << 16, dtype=dtype), spread, torch.ones(1 << 16, dtype=torch.bool))):
        ref = torch.addcmul(base.float(), mask.float(), merged).to(dtype)
        bp, mp, m8 = _stored_bf16_planes(base, 0), _stored_planes(merged, 0), mask.view(torch.uint8).numpy()
        for step in (31, 1 << 16):
            out = torch.empty(1 << 16, dtype=dtype)
            o = out.view(torch.int16).numpy()
            for a in range(0, 1 << 16, step):
                _HALF_RUNS[dtype][0]([p[a:a + step] for p in bp], 0, [p[a:a + step] for p in mp], 0,
                                     m8[a:a + step], o[a:a + step])
            assert _same_half(out, ref), step


@pytest.mark.skipif(not kernels.COMPILED, reason="the compiled loops are turned off")
def test_tall_f32_declines_unaligned_floats():
    buf = np.zeros(4 * 100 + 1, np.uint8)
    odd = buf[1:].view(np.float32)
    base, merged, mask = np.ones(100, np.float32), np.ones(100, np.float32), np.ones(100, np.uint8)
    assert not kernels.tall_f32(odd, merged, mask, np.empty(100, np.float32))
    assert not kernels.tall_f32(base, merged, mask, odd)
    base_t = torch.frombuffer(bytearray(buf[1:].tobytes()), dtype=torch.float32)  # whatever alignment torch gives
    assert torch.equal(reconstruct(base_t, torch.ones(100, dtype=torch.bool), torch.ones(100), torch.float32),
                       base_t + 1)


@pytest.mark.parametrize("call", [
    lambda: _kernels.join_planes([np.zeros(4, np.uint8)] * 2, np.zeros(10, np.uint8)),
    lambda: _kernels.join_planes([np.zeros(4, np.uint8), np.zeros(5, np.uint8)], np.zeros(8, np.uint8)),
    lambda: _kernels.join_planes([np.zeros(1, np.uint8)] * 17, np.zeros(17, np.uint8)),
    lambda: _kernels.join_planes([], np.zeros(0, np.uint8)),
    lambda: _kernels.split_planes(np.zeros(8, np.uint8), 4, 0, np.zeros(7, np.uint8)),
    lambda: _kernels.split_planes(np.zeros(9, np.uint8), 4, 0, np.zeros(9, np.uint8)),
    lambda: _kernels.split_planes(np.zeros(8, np.uint8), 0, 0, np.zeros(8, np.uint8)),
    lambda: _kernels.split_planes(np.zeros(8, np.uint8), 4, 8, np.zeros(8, np.uint8)),
    lambda: _kernels.split_planes(np.zeros(8, np.uint8), 1, 1, np.zeros(8, np.uint8)),
    lambda: _kernels.split_planes(np.zeros(8, np.uint8), 4, 1, np.zeros(8, np.uint8).tobytes()),
    lambda: _kernels.join_planes(5, np.zeros(8, np.uint8)),
    lambda: _kernels.join_planes([np.zeros(4, np.uint8)] * 2, b"\0" * 8),  # read-only output
    lambda: _kernels.join_planes([np.zeros(8, np.uint8)[::2]] * 2, np.zeros(8, np.uint8)),  # strided plane
    lambda: _kernels.join_exponent([], np.zeros(4, np.uint8), np.zeros(4, np.uint8), 0, np.zeros(8, np.uint8)),
    lambda: _kernels.join_exponent([], np.zeros(4, np.uint8), np.zeros(4, np.uint8), 8, np.zeros(8, np.uint8)),
    lambda: _kernels.join_exponent([np.zeros(4, np.uint8)], np.zeros(4, np.uint8), np.zeros(4, np.uint8), 1,
                                   np.zeros(12, np.uint8)),
    lambda: _kernels.join_exponent([], np.zeros(3, np.uint8), np.zeros(4, np.uint8), 1, np.zeros(8, np.uint8)),
    lambda: _kernels.tall_f32(np.zeros(4, np.float32), np.zeros(4, np.float32), np.zeros(3, np.uint8),
                              np.zeros(4, np.float32)),
    lambda: _kernels.tall_f32(np.zeros(9, np.float32), np.zeros(9, np.float32), np.zeros(1, np.uint8),
                              np.zeros(9, np.float32), True),  # 9 elements need 2 bytes of bits
    lambda: _kernels.tall_f32(np.zeros(8, np.float32), np.zeros(8, np.float32), np.zeros(8, np.uint8),
                              np.zeros(8, np.float32), True),  # bytes given as bits
    lambda: _kernels.tall_planes([np.zeros(9, np.uint8)] * 4, 0, [np.zeros(9, np.uint8)] * 4, 0,
                                 np.zeros(1, np.uint8), np.zeros(9, np.float32), True),
    lambda: _kernels.tall_planes_bf16([np.zeros(9, np.uint8)] * 2, 0, [np.zeros(9, np.uint8)] * 4, 0,
                                      np.zeros(9, np.uint8), np.zeros(9, np.uint16), True),
    lambda: _kernels.tall_planes_f16([np.zeros(17, np.uint8)] * 2, 0, [np.zeros(17, np.uint8)] * 4, 0,
                                     np.zeros(2, np.uint8), np.zeros(17, np.uint16), True),
    lambda: _kernels.unpack_bits(np.zeros(2, np.uint8), np.zeros(7, np.uint8)),
    lambda: _kernels.unpack_bits(np.zeros(1, np.uint8), b"\0" * 8),
    lambda: _kernels.tall_f32(np.zeros(4, np.float32), np.zeros(5, np.float32), np.zeros(4, np.uint8),
                              np.zeros(4, np.float32)),
    lambda: _kernels.tall_planes([np.zeros(4, np.uint8)] * 3, 0, [np.zeros(4, np.uint8)] * 4, 0,
                                 np.zeros(4, np.uint8), np.zeros(4, np.float32)),  # three planes
    lambda: _kernels.tall_planes([np.zeros(4, np.uint8)] * 4, 0, [np.zeros(4, np.uint8)] * 5, 0,
                                 np.zeros(4, np.uint8), np.zeros(4, np.float32)),  # five planes
    lambda: _kernels.tall_planes([np.zeros(4, np.uint8)] * 4, 0, [np.zeros(3, np.uint8)] * 4, 0,
                                 np.zeros(4, np.uint8), np.zeros(4, np.float32)),  # short planes
    lambda: _kernels.tall_planes([np.zeros(4, np.uint8)] * 4, 8, [np.zeros(4, np.uint8)] * 4, 0,
                                 np.zeros(4, np.uint8), np.zeros(4, np.float32)),  # rotation 8
    lambda: _kernels.tall_planes([np.zeros(4, np.uint8)] * 4, 0, [np.zeros(4, np.uint8)] * 4, -1,
                                 np.zeros(4, np.uint8), np.zeros(4, np.float32)),
    lambda: _kernels.tall_planes([np.zeros(4, np.uint8)] * 4, 0, [np.zeros(4, np.uint8)] * 4, 0,
                                 np.zeros(5, np.uint8), np.zeros(4, np.float32)),  # mask of another length
    lambda: _kernels.tall_planes([np.zeros(4, np.uint8)] * 4, 0, [np.zeros(4, np.uint8)] * 4, 0,
                                 np.zeros(4, np.uint8), np.zeros(17, np.uint8)[1:]),  # misaligned output
    lambda: _kernels.tall_planes([np.zeros(4, np.uint8)] * 4, 0, [np.zeros(4, np.uint8)] * 4, 0,
                                 np.zeros(4, np.uint8), b"\0" * 16),  # read-only output
    lambda: _kernels.tall_planes(None, 0, [np.zeros(4, np.uint8)] * 4, 0, np.zeros(4, np.uint8),
                                 np.zeros(4, np.float32)),
    lambda: _kernels.tall_planes_bf16([np.zeros(4, np.uint8)] * 4, 0, [np.zeros(4, np.uint8)] * 4, 0,
                                      np.zeros(4, np.uint8), np.zeros(4, np.uint16)),  # four base planes
    lambda: _kernels.tall_planes_bf16([np.zeros(4, np.uint8)] * 2, 0, [np.zeros(4, np.uint8)] * 2, 0,
                                      np.zeros(4, np.uint8), np.zeros(4, np.uint16)),  # two merged planes
    lambda: _kernels.tall_planes_bf16([np.zeros(4, np.uint8)] * 2, 0, [np.zeros(4, np.uint8)] * 4, 0,
                                      np.zeros(4, np.uint8), np.zeros(4, np.float32)),  # 4-byte output elements
    lambda: _kernels.tall_planes_bf16([np.zeros(4, np.uint8)] * 2, 0, [np.zeros(4, np.uint8)] * 4, 0,
                                      np.zeros(4, np.uint8), np.zeros(9, np.uint8)[1:]),  # misaligned output
    lambda: _kernels.tall_planes_bf16([np.zeros(4, np.uint8)] * 2, 8, [np.zeros(4, np.uint8)] * 4, 0,
                                      np.zeros(4, np.uint8), np.zeros(4, np.uint16)),  # rotation 8
    lambda: _kernels.tall_planes_bf16([np.zeros(4, np.uint8)] * 2, 0, [np.zeros(4, np.uint8)] * 4, 0,
                                      np.zeros(4, np.uint8), b"\0" * 8),  # read-only output
    lambda: _kernels.tall_planes_f16([np.zeros(4, np.uint8)] * 4, 0, [np.zeros(4, np.uint8)] * 4, 0,
                                     np.zeros(4, np.uint8), np.zeros(4, np.uint16)),  # four base planes
])
def test_kernels_reject_bad_buffers(call):
    with pytest.raises((ValueError, TypeError, BufferError)):
        call()


def test_a_process_can_turn_the_kernels_off():
    code = "import tallpack.kernels as k, tallpack.codecs as c; print(k.COMPILED)"
    env = {**os.environ, "TALLPACK_NO_KERNELS": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    # and this process uses them unless it was told not to
    assert kernels.COMPILED == (os.environ.get("TALLPACK_NO_KERNELS", "") in ("", "0"))


def test_version_says_which_loops_run():
    from click.testing import CliRunner

    from tallpack_cli.main import main

    out = CliRunner().invoke(main, ["--version"]).output
    assert ("(compiled kernels)" in out) == kernels.COMPILED


@given(st.integers(0, 3000), st.integers(0, 2**32 - 1))
def test_unpack_bits_matches_numpy(n, seed):
    packed = np.random.default_rng(seed).integers(0, 256, (n + 7) // 8, dtype=np.uint8)
    out = np.full(n, 9, np.uint8)
    _kernels.unpack_bits(packed, out)
    assert out.tobytes() == np.unpackbits(packed, count=n, bitorder="little").tobytes()



@given(st.integers(0, 3000), st.sampled_from([1, 2, 4]), st.integers(0, 3), st.integers(0, 2**32 - 1))
def test_bitsplit_matches_numpy(n, k, offset, seed):
    """The compiled split gives codecs._split_numpy's heads and low-bit stream, elements of every bit
    length (each shifted right by a random amount), at any alignment of the input."""
    from tallpack import codecs
    rng = np.random.default_rng(seed)
    dt = {1: np.uint8, 2: np.uint16, 4: np.uint32}[k]
    a = rng.integers(0, 2 ** (8 * k), n, dtype=dt) >> rng.integers(0, 8 * k, n).astype(dt)
    src = memoryview(bytearray(offset) + a.tobytes())[offset:]
    heads, low = np.full(n, 0xAB, np.uint8), np.full(-(-n * (8 * k - 3) // 8), 0xCD, np.uint8)
    got = _kernels.bitsplit(src, k, heads, low)
    ref_heads = np.empty(n, np.uint8)
    ref_low = codecs._split_numpy(src, k, ref_heads)
    assert heads.tobytes() == ref_heads.tobytes()
    assert low[:got].tobytes() == ref_low


@pytest.mark.parametrize("args", [
    (b"\0" * 8, 3, np.zeros(2, np.uint8), np.zeros(8, np.uint8)),  # itemsize 3
    (b"\0" * 7, 4, np.zeros(1, np.uint8), np.zeros(8, np.uint8)),  # not whole elements
    (b"\0" * 8, 4, np.zeros(3, np.uint8), np.zeros(8, np.uint8)),  # a head per element
    (b"\0" * 8, 4, np.zeros(2, np.uint8), np.zeros(7, np.uint8)),  # room for 2 x 29 low bits
    (b"\0" * 8, 4, np.zeros(2, np.uint8), b"\0" * 8),  # read-only output
])
def test_bitsplit_refuses_bad_buffers(args):
    with pytest.raises((ValueError, TypeError, BufferError)):
        _kernels.bitsplit(*args)


@given(st.integers(0, 3000), st.sampled_from([1, 2, 4, 8]), st.integers(0, 2**32 - 1), st.data())
def test_permute_key_is_numpys_stable_argsort(n, k, seed, data):
    """The counting sort gives the order of numpy's stable argsort of the key field, for every
    element size, field position and width (up to 11 bits: float64's exponent), few keys or many."""
    bits = data.draw(st.integers(1, min(11, 8 * k)))
    shift = data.draw(st.integers(0, 8 * k - bits))
    rng = np.random.default_rng(seed)
    dt = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[k]
    src = rng.integers(0, np.iinfo(dt).max, n, dtype=dt, endpoint=True)
    key = rng.integers(0, np.iinfo(dt).max, n, dtype=dt, endpoint=True)
    key[: n // 2] &= dt(~(((1 << bits) - 1) << shift) & np.iinfo(dt).max)  # many equal keys: stability shows
    out = np.full(n, 7, dt)
    assert kernels.permute_key(src, key, shift, bits, out) == kernels.COMPILED
    field = (key >> dt(shift)) & dt((1 << bits) - 1)
    assert out.tobytes() == src[np.argsort(field, kind="stable")].tobytes()


@pytest.mark.parametrize("args", [
    (np.zeros(4, np.uint32), np.zeros(4, np.uint32), 3, 0, 8, np.zeros(4, np.uint32)),  # itemsize 3
    (np.zeros(4, np.uint32), np.zeros(3, np.uint32), 4, 0, 8, np.zeros(4, np.uint32)),  # key length
    (np.zeros(4, np.uint32), np.zeros(4, np.uint32), 4, 0, 8, np.zeros(5, np.uint32)),  # out length
    (np.zeros(4, np.uint32), np.zeros(4, np.uint32), 4, 0, 12, np.zeros(4, np.uint32)),  # 12 key bits
    (np.zeros(4, np.uint32), np.zeros(4, np.uint32), 4, 25, 8, np.zeros(4, np.uint32)),  # past the element
    (np.zeros(4, np.uint32), np.zeros(4, np.uint32), 4, 0, 8, b"\0" * 16),  # read-only output
])
def test_permute_key_refuses_bad_buffers(args):
    with pytest.raises((ValueError, TypeError, BufferError)):
        _kernels.permute_key(*args)


def _split_rebuild(loop: str, base, merged, mask, out, threads: int) -> bool:
    """One of the TALL loops that split a large tensor across threads: ``tall_f32`` on floats, or
    ``tall_planes`` on stored planes (base as ``planes-exp``, merged as ``planes``); ``-bits``: the
    mask as its stored bits."""
    bits = loop.endswith("-bits")
    m = _packed(mask) if bits else mask.view(torch.uint8).numpy()
    if loop.startswith("f32"):
        return kernels.tall_f32(base.numpy(), merged.numpy(), m, out.numpy(), threads=threads, bits=bits)
    kernels.tall_planes(_stored_planes(base, 1), 1, _stored_planes(merged, 0), 0, m, out.numpy(), threads=threads,
                        bits=bits)
    return True


@pytest.mark.skipif(not kernels.COMPILED, reason="the compiled loops are turned off")
@pytest.mark.parametrize("loop", ["f32", "planes", "f32-bits", "planes-bits"])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_tall_loops_split_across_threads_give_the_same_bits(loop, threads):
    import threading

    n = 3 * kernels.SPLIT_ELEMENTS + 5 + threads  # cuts fall on whole bytes of a packed mask
    base, merged, mask = _specials(n, threads)
    ref = torch.addcmul(base, mask.to(torch.float32), merged)
    out = torch.empty(n)
    assert _split_rebuild(loop, base, merged, mask, out, threads)
    assert torch.equal(out.view(torch.int32), ref.view(torch.int32))
    # on a marked worker (the reader's threads) the loop runs on that thread alone, to the same bits
    seen = []

    def worker():
        kernels.mark_worker()
        o = torch.empty(n)
        seen.append(_split_rebuild(loop, base, merged, mask, o, threads) and torch.equal(o.view(torch.int32), ref.view(torch.int32)))

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert seen == [True]


# -- the manifest's strict JSON checks: the compiled twins give container.py's verdicts ---------------

_json_leaves = st.one_of(
    st.none(), st.booleans(), st.text(max_size=3),
    st.integers(-(1 << 70), 1 << 70),
    st.sampled_from([-(1 << 63), -(1 << 63) - 1, (1 << 64) - 1, 1 << 64, (1 << 63) - 1, 1 << 63]),
    st.floats(allow_nan=False), st.sampled_from([float("inf"), float("-inf"), 1e308, -0.0]))
_json_values = st.recursive(_json_leaves, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=2), inner, max_size=4)), max_leaves=25)


def _verdict(check, value, numbers: bool) -> str | None:
    try:
        check(value, numbers)
    except ValueError as e:
        return str(e)
    return None


def _nested(depth: int, leaf) -> object:
    value = leaf
    for i in range(depth):
        value = [value] if i % 2 else {"k": value}
    return value


@settings(max_examples=400, deadline=None)
@given(_json_values, st.booleans(), st.integers(1, 6))
def test_json_check_gives_the_verdicts_of_the_python_walk(value, numbers, depth):
    from tallpack import container
    value = _nested(depth, value)  # the walk starts at a container, as a manifest does
    py = _verdict(container._check_values, value, numbers)
    c = _verdict(lambda v, n: _kernels.json_check(v, n, container.MAX_DEPTH), value, numbers)
    assert (py is None) == (c is None), (py, c)  # with two problems, each may name a different one


@pytest.mark.parametrize("depth", [62, 63, 64, 65, 200])
def test_json_check_counts_nesting_as_the_python_walk(depth):
    from tallpack import container
    value = _nested(depth, 1)
    py = _verdict(container._check_values, value, True)
    c = _verdict(lambda v, n: _kernels.json_check(v, n, container.MAX_DEPTH), value, True)
    assert py == c
    assert (py is None) == (depth <= container.MAX_DEPTH)  # depth containers, the top one at depth 0


@given(st.lists(st.tuples(st.sampled_from("abcd"), st.integers()), max_size=6))
def test_json_pairs_refuses_duplicate_keys_as_the_python_hook(pairs):
    from tallpack import container
    try:
        want = container._no_duplicates(pairs)
    except ValueError:
        with pytest.raises(ValueError, match="duplicate key"):
            _kernels.json_pairs(pairs)
    else:
        assert _kernels.json_pairs(pairs) == want


def test_the_manifest_parse_uses_the_compiled_checks_when_they_are_built():
    assert (kernels.json_pairs is not None) == (kernels.json_check is not None) == kernels.COMPILED


# -- the packer's mask and fidelity pass -------------------------------------------------------------

_special = st.sampled_from([0.0, -0.0, 1e-45, -1e-45, 1e-38, 3.4e38, -3.4e38, 1.0, -1.0, 0.5, 0.25])


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 5000), st.sampled_from([0.2, 0.3, 0.4, 0.5, 0.6, 0.0, 1 / 3]), st.integers(0, 2**31),
       st.lists(st.tuples(st.integers(0, 4999), _special, _special), max_size=20))
def test_tall_mask_pass_gives_the_masks_bits_and_the_fidelity_sums(n, lam, seed, specials):
    from tallpack.tall import Fidelity, tall_mask, tall_mask_with_fidelity
    g = torch.Generator().manual_seed(seed)
    tau = torch.randn(n, generator=g) * (torch.rand(n, generator=g) < 0.5)
    merged = tau * torch.randint(-2, 3, (n,), generator=g) + torch.randn(n, generator=g) * (torch.rand(n, generator=g) < 0.3)
    for i, t, m in specials:  # zeros of both signs, subnormals, ties and overflow in |merged - tau|
        if i < n:
            tau[i], merged[i] = t, m
    want = tall_mask(tau, merged, lam)
    got = torch.empty(n, dtype=torch.bool)
    fid = Fidelity()
    ones = tall_mask_with_fidelity(tau, merged, lam, got, fid)
    assert torch.equal(got, want)
    assert ones == fid.ones == int(want.sum()) and fid.numel == n
    t64, r64 = tau.double(), want.double() * merged.double()
    for name, a, b in (("tau_sq", t64, t64), ("rec_sq", r64, r64), ("dot", r64, t64), ("err_sq", r64 - t64, r64 - t64)):
        scale = float((a * b).abs().sum())  # float32 sums are within a few ulps of the sum of magnitudes
        if scale < 1e38:  # past float32's range both ways overflow (inf), as torch's dots do
            assert abs(getattr(fid, name) - float(a @ b)) <= 1e-5 * scale + 1e-30, name


def test_tall_mask_pass_falls_back_to_torch_where_the_loop_does_not_apply():
    from tallpack.tall import Fidelity, tall_mask, tall_mask_with_fidelity
    tau, merged = torch.randn(1000), torch.randn(1000)
    unaligned = np.frombuffer(bytes(4001), np.uint8)[1:].view(np.float32)  # floats at an odd address
    assert kernels.tall_mask(unaligned, merged.numpy(), 0.4, np.empty(1000, np.uint8)) is None
    for t, m in ((tau[::2], merged[::2]), (tau.double(), merged.double())):  # strided, float64: torch's ops
        got, fid = torch.empty(t.numel(), dtype=torch.bool), Fidelity()
        assert tall_mask_with_fidelity(t, m, 0.4, got, fid) == int(tall_mask(t, m, 0.4).sum())
        assert torch.equal(got, tall_mask(t, m, 0.4))


@pytest.mark.parametrize("count,parts", [(0, 2), (1, 2), (5, 2), (8, 3), (3, 8)])
def test_in_parts_covers_every_index_once_and_waits_for_every_part(count, parts):
    import threading
    seen, lock = [], threading.Lock()

    def run(a, b):
        with lock:
            seen.extend(range(a, b))
    kernels.in_parts(count, parts, run)
    assert sorted(seen) == list(range(count))


def test_in_parts_raises_a_helpers_error_after_every_part_is_done():
    import threading
    import time
    done = threading.Event()

    def run(a, b):
        if a == 0:
            return
        time.sleep(0.05)
        done.set()
        raise RuntimeError("helper failed")
    with pytest.raises(RuntimeError, match="helper failed"):
        kernels.in_parts(2, 2, run)
    assert done.is_set()


def _drawn(kind: str, n: int, g: torch.Generator, specials: bool) -> torch.Tensor:
    """n values over many magnitudes in ``kind``; with ``specials``, some infinities, NaNs and zeros."""
    x = torch.randn(n, generator=g) * 10.0 ** torch.randint(-6, 4, (n,), generator=g)
    if specials:
        pick = torch.rand(n, generator=g) < 0.05
        some = torch.tensor([float("inf"), float("-inf"), float("nan"), 0.0, -0.0, 65504.0, 1e-7])
        x[pick] = some[torch.randint(0, len(some), (int(pick.sum()),), generator=g)]
    return x.to(getattr(torch, kind))


def _same_floats(a: np.ndarray, b: np.ndarray) -> bool:
    """Bit for bit, a NaN's payload aside."""
    return bool(np.array_equal(a.view(np.uint32), b.view(np.uint32))
                or np.array_equal(np.nan_to_num(a, nan=7.0), np.nan_to_num(b, nan=7.0)))


@settings(max_examples=80, deadline=None)
@given(st.sampled_from(list(kernels.KINDS)), st.integers(0, 5000), st.integers(1, 5), st.integers(0, 2**31),
       st.booleans(), st.sampled_from([0.0, 0.2, 0.4, 1 / 3]))
def test_the_packers_straight_loops_give_the_torch_paths_bits(kind, n, tasks, seed, specials, lam):
    """``tv_sum`` gives ``TaskArithmetic.combine`` of ``tall.task_vector``'s task vectors, and
    ``tall_mask_tv`` the mask and the fidelity sums ``tall_mask_f32`` gives on those task
    vectors: bit for bit, every dtype, infinities and NaNs included (a NaN's payload aside)."""
    from tallpack.merging import TaskArithmetic
    from tallpack.tall import elements, task_vector
    g = torch.Generator().manual_seed(seed)
    base, thetas = _drawn(kind, n, g, specials), [_drawn(kind, n, g, specials) for _ in range(tasks)]
    taus = [task_vector(t, base) for t in thetas]
    want = TaskArithmetic().combine(taus).numpy()
    got = np.full(n, 123.0, np.float32)
    assert kernels.tv_sum(elements(base), [elements(t) for t in thetas], kind, got)
    assert _same_floats(got, want)
    for t, tau in zip(thetas, taus):
        m_want, m_got = np.empty(n, np.uint8), np.full(n, 9, np.uint8)
        sums_want, sums_got = kernels.Sums(), kernels.Sums()
        s_want = kernels.tall_mask(tau.numpy(), want, lam, m_want, sums_want)
        s_got = kernels.tall_mask_tv(elements(t), elements(base), kind, want, lam, m_got, sums_got)
        assert np.array_equal(m_got, m_want)
        assert s_got is not None and s_want is not None
        assert s_got == s_want
        assert np.array_equal(np.array(sums_got.totals()), np.array(sums_want.totals()), equal_nan=True)


@pytest.mark.parametrize("kind", kernels.KINDS)
@pytest.mark.parametrize("parts", [2, 3])
def test_tv_sum_split_across_threads_gives_the_same_bits(kind, parts):
    from tallpack.tall import elements
    g = torch.Generator().manual_seed(parts)
    n = kernels.PARTS_FROM + 77
    base, thetas = _drawn(kind, n, g, False), [_drawn(kind, n, g, False) for _ in range(3)]
    one, split = np.empty(n, np.float32), np.empty(n, np.float32)
    assert kernels.tv_sum(elements(base), [elements(t) for t in thetas], kind, one, 1)
    assert kernels.tv_sum(elements(base), [elements(t) for t in thetas], kind, split, parts)
    assert np.array_equal(one.view(np.uint32), split.view(np.uint32))


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(list(kernels.KINDS)), st.integers(0, 3000), st.integers(0, 2**31), st.booleans())
def test_max_abs_diff_is_the_task_vectors_largest_magnitude(kind, n, seed, specials):
    """The largest |tau| of ``tall.task_vector``, and inf for any inf or NaN in it (an input's, or
    a difference that overflows: float32 values of +-3e38)."""
    from tallpack.tall import elements, task_vector
    g = torch.Generator().manual_seed(seed)
    base, theta = _drawn(kind, n, g, specials), _drawn(kind, n, g, specials)
    if kind == "float32" and n > 3:
        base[3], theta[3] = -3e38, 3e38  # finite, but their difference is not
    tau = task_vector(theta, base)
    got = kernels.max_abs_diff(elements(theta), elements(base), kind)
    if n == 0:
        assert got == 0.0
    elif bool(torch.isfinite(tau).all()):
        assert got == float(tau.abs().max())
    else:
        assert got == float("inf")


def test_the_packers_loops_refuse_bad_buffers():
    f32, f16 = np.zeros(8, np.float32), np.zeros(8, np.uint16)
    with pytest.raises(ValueError):
        _kernels.tv_sum(f16, [f16[:7]], 1, f32)  # a task of another length
    with pytest.raises(ValueError):
        _kernels.tv_sum(f16, [f16], 5, f32)  # no such kind
    with pytest.raises(ValueError):
        _kernels.tv_sum(f16, [], 1, f32)  # no task
    with pytest.raises(ValueError):
        _kernels.tall_mask_tv(f16, f16, 1, f32[:4], 0.4, np.empty(8, np.uint8), kernels.Sums().state,
                              0)  # merged too short
    with pytest.raises(ValueError):
        _kernels.max_abs_diff(np.zeros(3, np.uint8), np.zeros(3, np.uint8), 1)  # not whole 16-bit elements
    with pytest.raises(ValueError):
        _kernels.max_abs_diff(f16, f16[:4], 1)  # lengths differ
    unaligned = np.frombuffer(bytes(33), np.uint8)[1:].view(np.float32)
    assert kernels.tv_sum(unaligned, [unaligned], "float32", np.empty(8, np.float32)) is False
    assert kernels.max_abs_diff(unaligned, unaligned, "float32") is None


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity on this platform")
def test_default_threads_follow_the_cpus_the_process_may_use(tmp_path):
    # a container or `taskset` that leaves the process one CPU: readers, writers and the loops'
    # helpers use one thread, not one per CPU of the machine
    code = f"""
import os, torch, tallpack
from tallpack import kernels
os.sched_setaffinity(0, {{min(os.sched_getaffinity(0))}})
assert kernels.cores() == 1 and kernels.default_threads() == 1
base = {{"w": torch.zeros(64, 8)}}
tallpack.pack(base, {{"a": {{"w": torch.ones(64, 8)}}, "b": {{"w": -torch.ones(64, 8)}}}}, {str(tmp_path / "f.tallpack")!r})
with tallpack.open({str(tmp_path / "f.tallpack")!r}) as fam:
    assert fam.threads == 1, fam.threads
    fam.state_dict("a")
assert kernels._helper_pool()._max_workers == 1
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
    assert kernels.cores() == len(os.sched_getaffinity(0))


@pytest.mark.parametrize("call", ["signs_wrapping_length", "merge_256_tasks"])
def test_ties_loops_refuse_lengths_that_wrap_and_counts_that_overflow(call):
    """A length whose byte size wraps the signed size was let through (every size check passed on
    0 bytes) and the loop read past an empty buffer; 256 thetas wrapped the uint8 counts."""
    f32 = np.zeros(1, np.float32)
    with pytest.raises(ValueError):
        if call == "signs_wrapping_length":
            _kernels.ties_signs(b"", [np.zeros(0, np.float32)], 0, f32, 2**62)
        else:
            n = 4
            _kernels.ties_merge(b"", [np.zeros(n, np.float32)] * 256, 0, np.zeros(256, np.float32), 1.0,
                                np.zeros(n, np.float32), np.zeros(n, np.uint8))


@settings(max_examples=100, deadline=None)
@given(st.sampled_from([torch.float16, torch.bfloat16]), st.lists(st.integers(0, 0xFFFF), min_size=1, max_size=64))
def test_max_abs_of_16_bit_floats_from_their_bits_is_abs_max(dtype, patterns):
    """``encodings.tall._max_abs`` reads a 16-bit tensor's largest magnitude from its bits: the
    same value as ``abs().max()`` for every pattern (zeros, subnormals, inf; NaN when one is)."""
    from tallpack.encodings.tall import _max_abs
    x = torch.tensor(patterns, dtype=torch.int32).to(torch.int16).view(dtype)
    want = float(x.float().abs().max())
    got = _max_abs(x)
    assert got == want or (np.isnan(got) and np.isnan(want))
