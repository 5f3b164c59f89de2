"""The exact tier's read loops compiled (``kernels.bitjoin`` for codec ``bitsplit``'s decode,
``kernels.unpermute_key`` for the exponent order's inverse) give what their numpy twins give:
the same elements, and the same errors on damaged chunks."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tallpack import codecs, kernels
from tallpack.errors import CodecError

from test_codecs import residual_like as residuals  # (itemsize, block, elements) of every bit length

pytestmark = pytest.mark.skipif(not kernels.COMPILED, reason="the compiled loops are not built")
_UNSIGNED = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def _numpy_decode(c: codecs.BitSplit, buf: bytes, size: int):
    """``c``'s decode with the numpy join (the compiled one switched off), or the CodecError's text."""
    with pytest.MonkeyPatch.context() as m:
        m.setattr(codecs, "bitjoin", lambda *a: None)
        try:
            return bytes(c.decode(memoryview(buf), size))
        except CodecError as e:
            return str(e)


def _compiled_decode(c: codecs.BitSplit, buf: bytes, size: int):
    try:
        return bytes(c.decode(memoryview(buf), size))
    except CodecError as e:
        return str(e)


@given(residuals())
@settings(max_examples=100)
def test_bitjoin_decodes_what_numpy_decodes(case):
    itemsize, block, a = case
    c = codecs.BitSplit(itemsize, block)
    enc = c.encode(memoryview(a.view(np.uint8)))
    got = _compiled_decode(c, enc, a.nbytes)
    assert got == a.tobytes()
    assert got == _numpy_decode(c, enc, a.nbytes)


@given(residuals(), st.data())
@settings(max_examples=150)
def test_bitjoin_refuses_damage_as_numpy_does(case, data):
    """A byte of the chunk changed, or the chunk cut or lengthened: the same elements or the same error."""
    itemsize, block, a = case
    c = codecs.BitSplit(itemsize, block)
    enc = bytearray(c.encode(memoryview(a.view(np.uint8))))
    how = data.draw(st.sampled_from(["flip", "cut", "extend"]))
    if how == "flip" and enc:
        i = data.draw(st.integers(0, len(enc) - 1))
        enc[i] ^= data.draw(st.integers(1, 255))
    elif how == "cut" and enc:
        enc = enc[: data.draw(st.integers(0, len(enc) - 1))]
    else:
        enc += bytes([data.draw(st.integers(0, 255))])
    assert _compiled_decode(c, bytes(enc), a.nbytes) == _numpy_decode(c, bytes(enc), a.nbytes)


@pytest.mark.parametrize("itemsize", [1, 2, 4])
def test_bitjoin_on_large_chunks(itemsize):
    """Several blocks whose heads zstd codes, and the widest elements, at a chunk's usual size."""
    rng = np.random.default_rng(itemsize)
    dt = _UNSIGNED[itemsize]
    a = np.abs(rng.normal(0, 2.0 ** (6 * itemsize), 300_000)).astype(dt)
    a[::97] = np.iinfo(dt).max
    c = codecs.BitSplit(itemsize)
    enc = c.encode(memoryview(a.view(np.uint8)))
    assert _compiled_decode(c, enc, a.nbytes) == a.tobytes() == _numpy_decode(c, enc, a.nbytes)


@given(st.sampled_from([1, 2, 4, 8]), st.integers(0, 3000), st.data())
@settings(max_examples=120)
def test_unpermute_key_inverts_permute_key(k, n, data):
    """``unpermute_key`` is numpy's ``out[stable order] = src``, and undoes ``permute_key``."""
    bits = data.draw(st.integers(1, min(11, 8 * k)))
    shift = data.draw(st.integers(0, 8 * k - bits))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    dt = _UNSIGNED[k]
    key = rng.integers(0, np.iinfo(dt).max, n, dtype=dt, endpoint=True)
    if data.draw(st.booleans()):  # few distinct keys: long runs of ties
        key &= dt((0b11 << shift) & int(np.iinfo(dt).max))
    src = rng.integers(0, np.iinfo(dt).max, n, dtype=dt, endpoint=True)
    order = np.argsort((key >> dt(shift)) & dt((1 << bits) - 1), kind="stable")
    want = np.empty_like(src)
    want[order] = src
    out = np.empty_like(src)
    assert kernels.unpermute_key(src, key, shift, bits, out)
    assert np.array_equal(out, want)
    permuted = np.empty_like(src)
    assert kernels.permute_key(out, key, shift, bits, permuted)
    assert np.array_equal(permuted, src)


def test_unpermute_key_refuses_mismatched_arrays():
    a = np.zeros(10, np.uint16)
    with pytest.raises(ValueError, match="unpermute_key"):
        kernels.unpermute_key(a, np.zeros(9, np.uint16), 0, 4, np.empty_like(a))
