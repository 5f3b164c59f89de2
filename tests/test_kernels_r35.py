"""Round 35: the rebuild loops write outputs of ``_kernels.STREAM_BYTES`` or more with non-temporal
stores (AVX2) after a head up to a 32-byte boundary, and end in the ordinary loops. The same bits as
the portable build and the numpy fallbacks, for lengths around the threshold and the 32-element step,
outputs at every alignment, masks as bytes and bits; nothing written outside the output."""

import numpy as np
import pytest

from tallpack import kernels
from test_kernels_r34 import _bits, _canon, _mask, _planes_of, portable  # noqa: F401 (portable: a fixture)

_kernels = pytest.importorskip("tallpack._kernels", reason="built without a C compiler: the numpy loops run")

_GUARD = 40  # elements past the output, which no loop may write


def _lengths(width: int) -> list[int]:
    """Lengths around the streaming threshold for elements of ``width`` bytes."""
    t = _kernels.STREAM_BYTES // width
    return [t - 1, t, t + 7, t + 33]


def _out(n: int, offset: int, dtype) -> tuple[np.ndarray, np.ndarray]:
    """An output of n elements ``offset`` elements past a 64-byte boundary (32-byte aligned only
    where offset * itemsize is a multiple of 32), in a buffer of sentinels with a guard after it."""
    size = np.dtype(dtype).itemsize
    raw = np.empty((n + offset + _GUARD) * size + 64, np.uint8)
    start = -raw.ctypes.data % 64
    buf = raw[start : start + (n + offset + _GUARD) * size].view(dtype)
    buf[:] = 0x5A
    return buf, buf[offset : offset + n]


def _guard_intact(buf: np.ndarray, offset: int, n: int) -> bool:
    return bool((buf[:offset] == 0x5A).all() and (buf[offset + n :] == 0x5A).all())


def test_the_threshold_is_one_mib():
    assert _kernels.STREAM_BYTES == 1 << 20


@pytest.mark.parametrize("bits", [False, True])
@pytest.mark.parametrize("offset", [0, 1, 7, 8])
@pytest.mark.parametrize("k", range(4))
def test_tall_f32_streamed_gives_the_same_bits(portable, k, offset, bits):  # noqa: F811
    n = _lengths(4)[k]
    rng = np.random.default_rng(1000 * k + 10 * offset + bits)
    base, merged, mask = _bits(n, rng, 4).view(np.float32), _bits(n, rng, 4).view(np.float32), _mask(n, rng, bits)
    m = np.unpackbits(mask, count=n, bitorder="little") if bits else mask
    with np.errstate(all="ignore"):
        want = _canon(base + m.astype(np.float32) * merged, 4)
    for module in (_kernels, portable):
        buf, out = _out(n, offset, np.float32)
        module.tall_f32(base, merged, mask, out, bits)
        assert np.array_equal(_canon(out, 4), want), module
        assert _guard_intact(buf, offset, n)
    # and through kernels.tall_f32, split across threads where the tensor is large enough
    buf, out = _out(n, offset, np.float32)
    assert kernels.tall_f32(base, merged, mask, out, threads=2, bits=bits)
    assert np.array_equal(_canon(out, 4), want) and _guard_intact(buf, offset, n)


@pytest.mark.parametrize("out_kind", ["f32", "bf16", "f16"])
@pytest.mark.parametrize("bits", [False, True])
@pytest.mark.parametrize("offset", [0, 1, 8, 9])
@pytest.mark.parametrize("k", [1, 3])
def test_rebuilds_from_planes_streamed_give_the_same_bits(portable, k, offset, bits, out_kind):  # noqa: F811
    """tall_planes, tall_planes_bf16 and tall_planes_f16 (rotations 3 and 5): this build, the
    portable one and the numpy twin."""
    width = 4 if out_kind == "f32" else 2
    n = _lengths(width)[k]
    rng = np.random.default_rng(7000 * k + 10 * offset + bits)
    base, merged, mask = _bits(n, rng, width), _bits(n, rng, 4), _mask(n, rng, bits)
    name = {"f32": "tall_planes", "bf16": "tall_planes_bf16", "f16": "tall_planes_f16"}[out_kind]
    args = (_planes_of(base, 3), 3, _planes_of(merged, 5), 5, mask)
    dtype = np.float32 if out_kind == "f32" else np.uint16
    want = np.full(n, 0x5A, dtype)
    getattr(kernels, f"_{name}_numpy")(*args[:4], np.unpackbits(mask, count=n, bitorder="little") if bits else mask,
                                      want)
    want = _canon(want, width, out_kind)
    for module in (_kernels, portable):
        buf, out = _out(n, offset, dtype)
        getattr(module, name)(*args, out, bits)
        assert np.array_equal(_canon(out, width, out_kind), want), module
        assert _guard_intact(buf, offset, n)


def test_bfloat16_nans_narrow_to_all_ones_in_every_build(portable):  # noqa: F811
    """bf16_rne8 finds NaN lanes by comparing each sum with itself: every NaN, of any sign and
    payload, still gives 0xFFFF, as the scalar loop (and torch's vectorized cast) give."""
    rng = np.random.default_rng(3)
    n = 4013  # the AVX2 loop's steps and the scalar tail
    payload = rng.integers(1, 1 << 23, n, dtype=np.uint32)
    payload[:23] = np.uint32(1) << np.arange(23, dtype=np.uint32)
    nans = (payload | np.uint32(0x7F800000) | (rng.integers(0, 2, n, dtype=np.uint32) << np.uint32(31))).view(np.float32)
    merged = np.where(rng.random(n) < 0.5, nans, rng.standard_normal(n).astype(np.float32))
    isnan = np.isnan(merged)
    for module in (_kernels, portable):
        out = np.full(n, 0x5A5A, np.uint16)
        module.tall_planes_bf16(_planes_of(np.zeros(n, np.uint16), 0), 0, _planes_of(merged, 0), 0, np.ones(n, np.uint8),
                                out)
        assert (out[isnan] == 0xFFFF).all() and not (out[~isnan] == 0xFFFF).any()
