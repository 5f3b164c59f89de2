"""Round 35: a zstd frame of raw blocks (``codecs.raw_frame``: the mask chunks zstd does not shrink)
is copied out without zstd's calls. Its bytes are zstd's, for every size around the block size, and
any damaged or differently laid out frame gives what zstd gives: the same bytes, or a CodecError."""

import numpy as np
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from tallpack.codecs import Zstd, _copy_raw_frame, mask_chain, raw_frame
from tallpack.errors import CodecError

_BLOCK = 1 << 17


def _zstd_says(frame: bytes, n: int) -> bytes | None:
    """What libzstd decodes ``frame`` to when it is exactly one whole frame of ``n`` bytes, else None."""
    try:
        if zstandard.frame_content_size(frame) != n:
            return None
        obj = zstandard.ZstdDecompressor().decompressobj()
        out = obj.decompress(frame)
    except zstandard.ZstdError:
        return None
    return out if obj.eof and not obj.unused_data and len(out) == n else None


def _ours(frame: bytes, n: int) -> bytes | None:
    out = bytearray(n)
    try:
        Zstd().decode_into(memoryview(frame), memoryview(out))
    except CodecError:
        return None
    got = Zstd().decode(memoryview(frame), n)
    assert bytes(got) == bytes(out)
    return bytes(out)


@pytest.mark.parametrize("n", [1, 4096, _BLOCK - 1, _BLOCK, _BLOCK + 1, 3 * _BLOCK + 5])
def test_a_raw_frame_gives_its_bytes(n):
    data = np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8).tobytes()
    frame = raw_frame(data)
    out = bytearray(n)
    assert _copy_raw_frame(memoryview(frame), memoryview(out)) and bytes(out) == data
    assert _ours(frame, n) == data == _zstd_says(frame, n)
    # and a mask chunk as the reader decodes it to its bits
    assert bytes(mask_chain(keep_below=0).bits_chain.decode(memoryview(frame), n, memoryview(bytearray(n)))) == data


def test_other_frames_are_left_to_zstd():
    data = bytes(range(256)) * 64
    packed = zstandard.ZstdCompressor(level=3, write_content_size=True).compress(data)
    assert not _copy_raw_frame(memoryview(packed), memoryview(bytearray(len(data))))
    assert _ours(packed, len(data)) == data
    frame = raw_frame(data)
    assert not _copy_raw_frame(memoryview(frame), memoryview(bytearray(len(data) + 1)))  # another size
    assert _ours(frame, len(data) + 1) is None


@given(st.integers(1, 2 * _BLOCK + 3), st.sampled_from(["cut", "flip", "extra", "set"]), st.integers(0, 2**32 - 1),
       st.integers(0, 255))
@settings(max_examples=80, deadline=None)
def test_a_damaged_raw_frame_decodes_as_zstd_decodes_it(n, how, where, value):
    """A cut, a changed byte (in the headers most often), an extra byte: our bytes are zstd's, or
    both refuse."""
    data = np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8).tobytes()
    frame = bytearray(raw_frame(data))
    heads = [0, 4, 5, 6, 13, 14, 15, 16] + ([17 + _BLOCK, 18 + _BLOCK, 19 + _BLOCK] if n > _BLOCK else [])
    k = heads[where % len(heads)] if where % 3 else where % len(frame)
    if how == "cut":
        frame = frame[: where % len(frame)]
    elif how == "flip":
        frame[k] ^= 1 << (where % 8)
    elif how == "set":
        frame[k] = value
    else:
        frame += bytes([value])
    frame = bytes(frame)
    assert _ours(frame, n) == _zstd_says(frame, n)


@pytest.mark.parametrize("n", [5000, _BLOCK + 7])
@pytest.mark.parametrize("block", [0, 1])
@pytest.mark.parametrize("change", [2, 4, 6, 1])
def test_a_block_of_another_type_or_end_is_left_to_zstd(n, block, change):
    """A block header's type bits (1 RLE, 2 compressed, 3 reserved) or last-block bit changed."""
    data = bytes(range(256)) * (n // 256) + bytes(n % 256)
    frame = bytearray(raw_frame(data))
    at = 14 if block == 0 or n <= _BLOCK else 17 + _BLOCK
    frame[at] ^= change
    frame = bytes(frame)
    assert _ours(frame, n) == _zstd_says(frame, n)
    assert not _copy_raw_frame(memoryview(frame), memoryview(bytearray(n)))
