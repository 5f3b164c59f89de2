import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from strategies import bool_arrays
from tallpack import codecs
from tallpack.errors import CodecError, UnsupportedVersionError


@given(bool_arrays)
def test_bitpack_round_trip_any_length(bits):
    chain = codecs.mask_chain()
    raw = bits.tobytes()
    encoded = chain.encode(memoryview(raw))
    assert bytes(chain.decode(memoryview(encoded), len(raw))) == raw


@given(st.binary(max_size=2000), st.sampled_from([1, 2, 4, 8]), st.sampled_from(codecs.DENSE_PRESETS))
def test_dense_presets_round_trip(data, itemsize, preset):
    data = data[: len(data) - len(data) % itemsize]
    chain = codecs.dense_chain(preset, itemsize)
    encoded = chain.encode(memoryview(data))
    assert bytes(chain.decode(memoryview(bytes(encoded)), len(data))) == data


@given(st.binary(min_size=8, max_size=512))
@settings(max_examples=30)
def test_encoders_never_change_their_input(data):
    data = data[: len(data) - len(data) % 4]
    buf = bytearray(data)
    for chain in (codecs.mask_chain(), codecs.dense_chain("bytegroup-zstd", 4), codecs.dense_chain("zstd", 4),
                  codecs.dense_chain("planes", 4)):
        chain.encode(memoryview(buf))
        assert bytes(buf) == data


def test_bitpack_is_lsb_first():
    raw = np.array([1, 0, 0, 0, 0, 0, 0, 0, 0, 1], np.uint8).tobytes()
    assert codecs.BitPack().encode(memoryview(raw)) == bytes([0b00000001, 0b00000010])


def test_bytegroup_makes_byte_planes():
    raw = bytes([1, 2, 3, 4, 5, 6])
    assert codecs.ByteGroup(2).encode(memoryview(raw)) == bytes([1, 3, 5, 2, 4, 6])


def test_configs_round_trip_through_the_registry():
    chain = codecs.dense_chain("bytegroup-zstd", 2, level=5)
    assert codecs.Chain.from_configs(chain.configs()).configs() == chain.configs()


def test_unknown_codec_says_upgrade():
    with pytest.raises(UnsupportedVersionError, match="unknown codec 'lz77'"):
        codecs.from_config({"id": "lz77"})


@pytest.mark.parametrize("config", [None, {"level": 3}, {"id": "zstd", "levle": 3}, {"id": "bytegroup", "itemsize": 0}])
def test_bad_codec_configs_are_format_errors(config):
    with pytest.raises(CodecError):
        codecs.from_config(config)


def test_zstd_refuses_a_frame_that_announces_another_size():
    frame = codecs.Zstd().encode(memoryview(b"x" * 100))
    with pytest.raises(CodecError, match="announces 100 bytes"):
        codecs.Zstd().decode(memoryview(frame), 10**9)
    with pytest.raises(CodecError):
        codecs.Zstd().decode(memoryview(frame + b"junk"), 100)


@given(st.integers(0, 3 << 17).map(lambda n: n if n % 5 else n - n % (1 << 17)), st.booleans(), st.integers(0, 2**32 - 1))
@settings(max_examples=40, deadline=None)
def test_raw_frames_are_zstd_frames_that_decode_to_their_input(n, into, seed):
    """``raw_frame``: one standard zstd frame of raw blocks (lengths around the 128 KiB block,
    zero included), which zstandard itself and every decode path of ours read back."""
    import random

    import zstandard

    data = random.Random(seed).randbytes(n)  # (hypothesis's randoms() draw every byte from its engine: minutes)
    frame = codecs.raw_frame(data)
    assert len(frame) == 14 + 3 * max(1, -(-n // (1 << 17))) + n
    assert zstandard.frame_content_size(frame) == n
    assert zstandard.ZstdDecompressor().decompress(frame) == data
    z = codecs.Zstd()
    if into:
        out = bytearray(n)
        z.decode_into(memoryview(frame), memoryview(out))
        assert bytes(out) == data
    else:
        assert bytes(z.decode(memoryview(frame), n)) == data
    with pytest.raises(CodecError):
        z.decode(memoryview(frame[:-1]), n) if n else z.decode(memoryview(frame + b"x"), n)


@pytest.mark.parametrize("density, raw", [(0.02, False), (0.12, False), (0.32, True), (0.5, True)])
def test_masks_that_zstd_barely_shrinks_are_stored_as_raw_blocks(density, raw):
    """A mask chunk is zstd-coded where that saves 10% (``MASK_KEEP_BELOW``), else a frame of raw
    blocks: its bits as they are, which the reader copies instead of decoding. Small chunks
    (under ``Zstd.RAW_FROM`` packed bytes) stay zstd-coded whatever they save."""
    rng = np.random.default_rng(0)
    chain = codecs.mask_chain()
    for n in (1 << 16, 1 << 20):
        mask = (rng.random(n) < density).astype(np.uint8).tobytes()
        stored = chain.encode(memoryview(mask))
        assert (stored == codecs.raw_frame(np.packbits(np.frombuffer(mask, np.uint8), bitorder="little"))) == raw
        assert bytes(chain.decode(memoryview(stored), n)) == mask
    small = (rng.random(8 * 1000) < density).astype(np.uint8).tobytes()
    stored = chain.encode(memoryview(small))
    assert stored == codecs.Zstd().encode(memoryview(codecs.BitPack().encode(memoryview(small))))


@pytest.mark.parametrize("density", [0.0, 0.02, 0.5])
def test_the_raw_presets_masks_are_stored_verbatim_at_every_density(density):
    """``codec="raw"`` (speed over size) keeps every mask chunk of ``Zstd.RAW_FROM`` packed bytes
    or more as a frame of raw blocks, however well zstd would code it; smaller ones as the default."""
    from tallpack.options import PackOptions

    rng = np.random.default_rng(2)
    raw_chain, default = PackOptions(codec="raw").validated().masks(), PackOptions().validated().masks()
    assert raw_chain.configs() == default.configs()  # the same recorded chain: nothing changes for readers
    mask = (rng.random(1 << 16) < density).astype(np.uint8).tobytes()
    stored = raw_chain.encode(memoryview(mask))
    assert stored == codecs.raw_frame(np.packbits(np.frombuffer(mask, np.uint8), bitorder="little"))
    assert bytes(default.decode(memoryview(stored), len(mask))) == mask
    assert (default.encode(memoryview(mask)) == stored) == (density == 0.5)
    small = (rng.random(8 * 1000) < density).astype(np.uint8).tobytes()
    assert raw_chain.encode(memoryview(small)) == default.encode(memoryview(small))


def test_dense_zstd_frames_are_zstds_own() -> None:
    """Only masks are written as raw blocks: the ``zstd`` codec of dense arrays keeps zstd's own
    frame, even for bytes it cannot shrink."""
    import zstandard

    data = np.random.default_rng(1).bytes(1 << 18)
    for chain in (codecs.dense_chain("zstd", 4), codecs.dense_chain("bytegroup-zstd", 4)):
        z = chain.codecs[-1]
        assert z.keep_below == 1.0
        assert z.encode(memoryview(data)) == zstandard.ZstdCompressor(level=z.level, write_content_size=True).compress(data)


def test_planes_keeps_random_planes_verbatim_and_compresses_the_rest():
    x = (np.random.default_rng(0).standard_normal(1 << 14) * 0.02).astype(np.float32)
    enc = codecs.Planes(4).encode(memoryview(x.view(np.uint8)))
    lengths = np.frombuffer(enc[:16], "<u4")
    n = x.size
    assert list(lengths[:2]) == [n, n]  # the low mantissa bytes are noise: stored as they are
    assert lengths[3] < n // 2  # sign and exponent: zstd
    assert bytes(codecs.Planes(4).decode(memoryview(enc), x.nbytes)) == x.tobytes()


@pytest.mark.parametrize("damage", ["lengths", "frame", "short"])
def test_planes_refuses_damaged_chunks(damage):
    x = np.arange(256, dtype=np.float32)
    enc = bytearray(codecs.Planes(4).encode(memoryview(x.view(np.uint8))))
    if damage == "lengths":
        enc[0] ^= 1
    elif damage == "frame":
        enc[-3] ^= 0xFF
    else:
        enc = enc[:-1]
    with pytest.raises(CodecError):
        codecs.Planes(4).decode(memoryview(bytes(enc)), x.nbytes)


@given(st.binary(max_size=4000), st.sampled_from([1, 2, 4, 8]),
       st.sampled_from([*codecs.DENSE_PRESETS, "masks"]))
def test_decoding_into_a_buffer_gives_the_same_bytes(data, itemsize, preset):
    """Large arrays are decoded chunk by chunk straight into the array (``decode(..., out)``)."""
    chain = (codecs.Chain([codecs.BitPack(), codecs.Zstd(3)]) if preset == "masks"
             else codecs.dense_chain(preset, itemsize, 3))
    if preset == "masks":
        data = bytes(b & 1 for b in data)
    data = data[: len(data) - len(data) % itemsize]
    enc = memoryview(bytes(chain.encode(memoryview(data))))
    out = np.full(len(data) + 2, 7, np.uint8)  # a guard byte either side
    got = chain.decode(enc, len(data), memoryview(out)[1:-1])
    assert bytes(got) == data == bytes(chain.decode(enc, len(data)))
    assert out[0] == 7 and out[-1] == 7
    if len(data):
        with pytest.raises(CodecError):
            chain.decode(enc, len(data), memoryview(np.empty(len(data) + 1, np.uint8)))


def test_planes_strong_levels_are_smaller_and_read_the_same():
    """From level 10, ``planes`` also tries zstd's optimal parser on the planes it keeps; the
    chunks stay readable by the same decoder, and an exponent plane gets smaller."""
    rng = np.random.default_rng(0)
    data = (rng.standard_normal(1 << 16).astype(np.float32) * 0.02).tobytes()
    fast, strong = codecs.dense_chain("planes", 4, 3), codecs.dense_chain("planes", 4, 19)
    assert fast.configs()[0]["level"] == 1 and strong.configs()[0]["level"] == 19
    a, b = bytes(fast.encode(memoryview(data))), bytes(strong.encode(memoryview(data)))
    assert len(b) < len(a)
    for enc in (a, b):
        assert bytes(fast.decode(memoryview(enc), len(data))) == data


_UNSIGNED = {1: np.uint8, 2: np.uint16, 4: np.uint32}


@st.composite
def residual_like(draw):
    """(itemsize, block, elements): unsigned integers of every bit length, as residuals have."""
    itemsize = draw(st.sampled_from([1, 2, 4]))
    block = draw(st.sampled_from([64, 128, 1 << 14]))
    raw = draw(st.binary(max_size=300 * itemsize))
    a = np.frombuffer(raw[: len(raw) - len(raw) % itemsize], _UNSIGNED[itemsize]).copy()
    shifts = np.frombuffer(draw(st.binary(min_size=a.size, max_size=a.size)), np.uint8) % (8 * itemsize + 1)
    a = np.where(shifts == 8 * itemsize, 0, a >> np.minimum(shifts, 8 * itemsize - 1).astype(a.dtype))
    return itemsize, block, a.astype(_UNSIGNED[itemsize])


@given(residual_like())
@settings(max_examples=60)
def test_bitsplit_round_trips_every_bit_length(case):
    itemsize, block, a = case
    c = codecs.BitSplit(itemsize, block)
    enc = c.encode(memoryview(a.view(np.uint8)))
    assert c.fits(a.nbytes, len(enc))
    assert bytes(c.decode(memoryview(enc), a.nbytes)) == a.tobytes()
    out = bytearray(a.nbytes)
    codecs.Chain.from_configs([c.config()]).decode(memoryview(enc), a.nbytes, memoryview(out))
    assert bytes(out) == a.tobytes()


def test_bitsplit_layout_is_the_specs_example():
    """spec §5: heads 4L + t, then the low bits as one little-endian bit stream."""
    a = np.array([0, 1, 2, 3, 4, 5, 13, 0xFFFF], np.uint16)
    enc = codecs.BitSplit(2).encode(memoryview(a.view(np.uint8)))
    assert enc == bytes.fromhex("08000000" "000408090c0d1243" "ff3f")


def test_bitsplit_codes_residuals_smaller_than_planes():
    """Differences of a few hundred ulps, zigzag-coded: the heads are narrow, the low bits noise."""
    rng = np.random.default_rng(0)
    z = (np.abs(rng.normal(0, 300, 1 << 16)).astype(np.uint32) * 2 + rng.integers(0, 2, 1 << 16)).astype(np.uint32)
    split = codecs.BitSplit(4).encode(memoryview(z.view(np.uint8)))
    planes = codecs.Planes(4).encode(memoryview(z.view(np.uint8)))
    assert len(split) < 0.97 * len(planes)


def _bitsplit_format_1_9(c: codecs.BitSplit, buf: memoryview) -> bytes:
    """BitSplit.encode as format 1.9 shipped it (numpy, the bit length from float64 ``frexp``): the
    stream every later encoder must give for the same input, so that its archives stay the same."""
    import struct

    import zstandard
    v = np.frombuffer(buf, dtype=_UNSIGNED[c.itemsize]).astype(np.uint32)
    length = np.frexp(v.astype(np.float64))[1].astype(np.uint8)
    width = codecs._BITSPLIT_WIDTH[length]
    heads = (length << 2) + ((v >> width).astype(np.uint8) - codecs._BITSPLIT_LEAD[length])
    low = v & ((np.uint32(1) << width) - np.uint32(1))
    cctx = zstandard.ZstdCompressor(compression_params=zstandard.ZstdCompressionParameters.from_level(
        1, min_match=7, write_content_size=True))
    stored = []
    for j in range(0, v.size, c.block):
        part = heads[j : j + c.block].tobytes()
        packed = cctx.compress(part)
        stored.append(packed if len(packed) <= c.KEEP_BELOW * len(part) and len(packed) != len(part) else part)
    return struct.pack(f"<{len(stored)}I", *(len(p) for p in stored)) + b"".join(stored) + codecs._pack_bits(low, width)


@given(residual_like(), st.integers(0, 3))
@settings(max_examples=80)
def test_bitsplit_encodes_as_format_1_9_did(case, offset):
    """The compiled split (or, with TALLPACK_NO_KERNELS=1, the numpy one without float64 copies) gives
    the bytes of the first encoder, for every bit length, block and alignment of the input."""
    itemsize, block, a = case
    c = codecs.BitSplit(itemsize, block)
    buf = memoryview(bytearray(offset) + a.tobytes())[offset:]  # misaligned when offset is not 0
    assert c.encode(buf) == _bitsplit_format_1_9(c, buf)
    heads = np.empty(a.size, np.uint8)
    assert codecs._split_numpy(buf, itemsize, heads) == codecs._pack_bits(*_low_and_width(a))


def _low_and_width(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    v = a.astype(np.uint32)
    width = codecs._BITSPLIT_WIDTH[np.frexp(v.astype(np.float64))[1].astype(np.uint8)]
    return v & ((np.uint32(1) << width) - np.uint32(1)), width


def test_bitsplit_encodes_large_residuals_as_format_1_9_did():
    """Several blocks of residual-like values (zstd codes the heads) and the widest elements."""
    rng = np.random.default_rng(5)
    for itemsize in (1, 2, 4):
        dt = _UNSIGNED[itemsize]
        a = np.abs(rng.normal(0, 2.0 ** (6 * itemsize), 70_000)).astype(dt)
        a[::97] = np.iinfo(dt).max
        c = codecs.BitSplit(itemsize)
        assert c.encode(memoryview(a.view(np.uint8))) == _bitsplit_format_1_9(c, memoryview(a.view(np.uint8)))


@pytest.mark.parametrize("damage", ["lengths", "head", "small-head", "frame", "short", "long", "padding"])
def test_bitsplit_refuses_damaged_chunks(damage):
    a = (np.arange(2000, dtype=np.uint32) * 37) % 5000
    c = codecs.BitSplit(4, 1024)
    enc = bytearray(c.encode(memoryview(a.view(np.uint8))))
    first = int.from_bytes(enc[:4], "little")
    if damage == "lengths":
        enc[4] ^= 0x40
    elif damage == "head":  # a bit length beyond 32
        enc = bytearray(codecs.BitSplit(4, 1024).encode(memoryview(np.zeros(8, np.uint32).view(np.uint8))))
        enc[4] = 33 << 2
    elif damage == "small-head":  # bit length 0 with t = 1: no such element
        enc = bytearray(codecs.BitSplit(4, 1024).encode(memoryview(np.zeros(8, np.uint32).view(np.uint8))))
        enc[4] = 1
    elif damage == "frame":
        enc[8 + first // 2] ^= 0xFF
    elif damage == "short":
        enc = enc[:-1]
    elif damage == "long":
        enc += b"\0"
    else:  # a set bit after the last element's low bits
        b = np.array([13, 13], np.uint32)  # 0b1101: one low bit each, so six bits of padding
        enc = bytearray(codecs.BitSplit(4).encode(memoryview(b.view(np.uint8))))
        enc[-1] |= 0x80
    n = a.nbytes if damage not in ("head", "small-head", "padding") else (32 if damage != "padding" else 8)
    with pytest.raises(CodecError):
        c.decode(memoryview(bytes(enc)), n)


@given(st.binary(max_size=600), st.sampled_from([1, 2, 4]), st.integers(0, 64))
@settings(max_examples=80)
def test_bitsplit_decodes_garbage_to_an_error_or_the_right_size(data, itemsize, n):
    """Any bytes: either n elements or a CodecError (never another exception, a hang or a large allocation)."""
    c = codecs.BitSplit(itemsize, 64)
    try:
        out = c.decode(memoryview(data), n * itemsize)
    except CodecError:
        return
    assert len(out) == n * itemsize


@pytest.mark.parametrize("config", [{"id": "bitsplit", "itemsize": 8}, {"id": "bitsplit", "itemsize": 4, "block": 100},
                                    {"id": "bitsplit", "itemsize": 4, "block": 8},
                                    {"id": "bitsplit", "itemsize": 4, "level": 3}])
def test_bitsplit_bad_configs_are_format_errors(config):
    with pytest.raises(CodecError):
        codecs.from_config(config)


# -- planes-exp (format 1.11): the exponent in a plane of its own ---------------------------------

@given(st.binary(max_size=3000), st.sampled_from([2, 4]), st.integers(1, 7), st.booleans())
@settings(max_examples=120)
def test_exponent_planes_round_trip_every_rotation(data, itemsize, r, into):
    """Any bytes (NaN payloads, infinities, signed zeros, subnormals among them) come back, for
    each rotation the format allows, whole or decoded into a buffer."""
    data = data[: len(data) - len(data) % itemsize]
    codec = codecs.ExponentPlanes(itemsize)
    original = codecs.ExponentPlanes._choose
    codecs.ExponentPlanes._choose = lambda self, lo, hi: r
    try:
        enc = memoryview(bytes(codec.encode(memoryview(data))))
    finally:
        codecs.ExponentPlanes._choose = original
    assert int.from_bytes(enc[:4], "little") == r
    if into:
        out = np.empty(len(data), np.uint8)
        codec.decode_into(enc, memoryview(out))
        assert out.tobytes() == data
    else:
        assert bytes(codec.decode(enc, len(data))) == data


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_exponent_planes_are_smaller_than_planes_on_weights(dtype):
    """Weight-like values: the exponent plane alone codes smaller than sign and exponent together,
    and from level 10 the chosen rotation (r > 1 here, |w| < 2) is smaller again."""
    import torch
    x = (torch.randn(1 << 16, generator=torch.Generator().manual_seed(0)) * 0.02).to(getattr(torch, dtype))
    data = memoryview(x.view(torch.uint8).numpy().tobytes())
    k = x.element_size()
    plain = codecs.dense_chain("planes", k, 3)
    exp, strong = codecs.dense_chain("planes", k, 3, dtype), codecs.dense_chain("planes", k, 19, dtype)
    assert plain.ids() == ["planes"] and exp.ids() == strong.ids() == ["planes-exp"]
    sizes = [len(c.encode(data)) for c in (plain, exp, strong)]
    assert sizes[0] > sizes[1] > sizes[2]
    s = bytes(strong.encode(data))
    assert int.from_bytes(s[:4], "little") > 1 and int.from_bytes(bytes(exp.encode(data))[:4], "little") == 1
    for c in (plain, exp, strong):
        assert bytes(c.decode(memoryview(bytes(c.encode(data))), len(data))) == bytes(data)


@pytest.mark.parametrize("damage", ["rotation", "zero rotation", "lengths", "short"])
def test_exponent_planes_refuse_damaged_chunks(damage):
    x = (np.random.default_rng(1).standard_normal(4096) * 0.02).astype(np.float32)
    codec = codecs.ExponentPlanes(4)
    enc = bytearray(codec.encode(memoryview(x.view(np.uint8))))
    if damage == "rotation":
        enc[0] = 8
    elif damage == "zero rotation":
        enc[0] = 0
    elif damage == "lengths":
        enc[4] ^= 1
    else:
        enc = enc[:-1]
    with pytest.raises(CodecError):
        codec.decode(memoryview(bytes(enc)), x.nbytes)


def test_exponent_planes_only_for_8_bit_exponents():
    with pytest.raises(CodecError, match="itemsize"):
        codecs.from_config({"id": "planes-exp", "itemsize": 8, "level": 1})
    assert codecs.dense_chain("planes", 2, 3, "float16").ids() == ["planes"]  # 5-bit exponent
    assert codecs.dense_chain("planes", 8, 3, "float64").ids() == ["planes"]


def test_fresh_buffers_withdraw_the_huge_page_advice():
    import sys

    from tallpack import memory

    small, large = memory.empty(1000), memory.empty(memory.ADVISED_FROM + 12345)
    assert small.size == 1000 and large.size == memory.ADVISED_FROM + 12345 and large.flags.writeable
    large[:] = 7
    assert int(large.sum()) == 7 * large.size
    if sys.platform.startswith("linux"):  # the buffer's whole pages lie in a mapping marked nohugepage
        page = memory.empty(memory.ADVISED_FROM)
        addr = -(-page.ctypes.data // 4096) * 4096 + 4096
        with open("/proc/self/smaps") as f:
            text = f.read()
        for block in _smaps_blocks(text):
            lo, hi = (int(x, 16) for x in block[0].split()[0].split("-"))
            if lo <= addr < hi:
                flags = next(line for line in block if line.startswith("VmFlags:"))
                assert " nh" in flags, flags
                break
        else:
            raise AssertionError("buffer not found in /proc/self/smaps")


def _smaps_blocks(text: str) -> list[list[str]]:
    blocks: list[list[str]] = []
    for line in text.splitlines():
        if line and line.split()[0].count("-") == 1 and ":" not in line.split()[0]:
            blocks.append([line])
        elif blocks:
            blocks[-1].append(line)
    return blocks
