"""Codecs: small named objects that turn a chunk's bytes into stored bytes and back.

A section's codec chain is a list of configs in the manifest, e.g.
``[{"id": "bytegroup", "itemsize": 2}, {"id": "zstd", "level": 3}]``, applied in order when
writing and in reverse when reading. Every codec but the last must be *size-preserving or
size-determined* (its output size follows from its input size), so a reader knows each decoded
size before it decodes, and never allocates more than the manifest announced.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, cast

import numpy as np
import zstandard

from .errors import CodecError, InvalidArgumentError, UnsupportedVersionError
from .kernels import bitjoin, bitsplit, join_exponent, join_planes, rotate, split_planes, unpack_bits
from .memory import ThreadBuffers, empty
from .limits import ZSTD_MAX_RATIO


class Codec:
    """One step of a codec chain. Subclasses set ``id`` and implement ``encode``/``decode``."""

    id: ClassVar[str]

    def encode(self, buf: memoryview) -> bytes | memoryview:
        raise NotImplementedError

    def decode(self, buf: memoryview, size: int) -> bytes | bytearray | memoryview:
        """Decode ``buf``, whose decoded length must be ``size`` bytes."""
        raise NotImplementedError

    def decode_into(self, buf: memoryview, out: memoryview) -> None:
        """Decode ``buf`` into ``out`` (writable, exactly the decoded size): the reader decodes
        the chunks of a large array straight into the array. Codecs that can, override this."""
        out[:] = memoryview(self.decode(buf, len(out))).cast("B")

    def encoded_size(self, size: int) -> int | None:
        """The encoded size of ``size`` input bytes, or None when it depends on the data."""
        return None

    def fits(self, size: int, nbytes: int) -> bool:
        """Whether ``nbytes`` encoded bytes can decode to ``size`` bytes (checked at open, before
        anything is read: a declared size must be backed by stored bytes)."""
        return self.encoded_size(size) == nbytes

    def config(self) -> dict[str, Any]:
        return {"id": self.id}


_contexts = ThreadBuffers()  # each thread's zstd decompression context


def _decompressor() -> zstandard.ZstdDecompressor:
    """This thread's decompressor, made once (making one costs about as much as decoding a small
    frame) and let go with the threads' buffers; each operation on it starts afresh."""
    return _contexts.held("zstd", zstandard.ZstdDecompressor)


#: zstd's largest block (RFC 8878 3.1.1.2.4: Block_Maximum_Size); a raw frame's window (below).
_ZSTD_BLOCK = 1 << 17


def raw_frame(buf: memoryview | bytes) -> bytes:
    """``buf`` as one zstd frame of raw blocks (RFC 8878): the magic number; a frame header with an
    8-byte Frame_Content_Size and a 128 KiB window (descriptor 0x38: exponent 7); then blocks of up
    to 128 KiB, each a 3-byte header (last-block bit, type 0 = raw, size) and the bytes as they are.
    Any zstd decoder reads it, copying rather than decoding."""
    data = memoryview(buf).cast("B")
    n = len(data)
    parts = [struct.pack("<IBBQ", 0xFD2FB528, 0xC0, 0x38, n)]
    for pos in range(0, max(n, 1), _ZSTD_BLOCK):
        size = min(_ZSTD_BLOCK, n - pos)
        parts.append((int(pos + size >= n) | size << 3).to_bytes(3, "little"))
        parts.append(bytes(data[pos : pos + size]))
    return b"".join(parts)


#: ``raw_frame``'s first 6 bytes: the magic number, the frame header descriptor (an 8-byte
#: Frame_Content_Size, no checksum, no dictionary) and the window descriptor (128 KiB).
_RAW_FRAME_HEAD = struct.pack("<IBB", 0xFD2FB528, 0xC0, 0x38)


def _copy_raw_frame(buf: memoryview, out: memoryview) -> bool:
    """Whether ``buf`` is one frame of raw blocks, laid out as ``raw_frame`` writes it, of exactly
    ``len(out)`` (> 0) bytes; if so its blocks are copied into ``out``: what any zstd decoder gives,
    without its calls (a mask chunk zstd did not shrink, ``MASK_KEEP_BELOW``). False for anything
    else (``out`` then partly written): the caller decodes it with zstd, which says what is wrong."""
    n, end = len(out), len(buf)
    if end < 17 or buf[:6] != _RAW_FRAME_HEAD or int.from_bytes(buf[6:14], "little") != n:
        return False
    pos, got = 14, 0
    while pos + 3 <= end:
        head = buf[pos] | buf[pos + 1] << 8 | buf[pos + 2] << 16
        size, pos = head >> 3, pos + 3
        if head & 6 or size > _ZSTD_BLOCK or pos + size > end or got + size > n:  # not a raw block, or too long
            return False
        out[got : got + size] = buf[pos : pos + size]
        pos, got = pos + size, got + size
        if head & 1:  # the last block
            return pos == end and got == n
    return False


@dataclass(frozen=True)
class Zstd(Codec):
    """zstd, one frame per chunk, with the content size in the frame header."""

    level: int = 3
    #: The writer's choice, not recorded: a frame that zstd does not shrink below this fraction of
    #: its input is written with raw blocks instead (still one standard frame, which every zstd
    #: decoder copies out at memory speed; ``mask_chain``'s, see ``MASK_KEEP_BELOW``).
    keep_below: float = field(default=1.0, compare=False, repr=False)
    id: ClassVar[str] = "zstd"

    def __post_init__(self) -> None:
        if type(self.level) is not int or not -(1 << 17) <= self.level <= 22:
            raise CodecError(f"zstd: bad level {self.level!r}")

    def encode(self, buf: memoryview) -> bytes:
        if self.keep_below <= 0 and len(buf) >= self.RAW_FROM:  # kept verbatim whatever zstd would do
            return raw_frame(buf)
        packed = zstandard.ZstdCompressor(level=self.level, write_content_size=True).compress(buf)
        if self.keep_below < 1 and len(buf) >= self.RAW_FROM and len(packed) > self.keep_below * len(buf):
            return raw_frame(buf)
        return packed

    #: ``keep_below`` applies from this input size on: a smaller frame decodes in a few
    #: microseconds either way (and the golden archives' small masks keep their bytes).
    RAW_FROM: ClassVar[int] = 4096

    def fits(self, size: int, nbytes: int) -> bool:
        # no frame decodes to more than ZSTD_MAX_RATIO times its size (limits.py says why)
        return 0 < nbytes and size <= ZSTD_MAX_RATIO * nbytes

    def decode(self, buf: memoryview, size: int) -> memoryview:
        try:
            announced = zstandard.frame_content_size(buf)
        except zstandard.ZstdError as e:
            raise CodecError(f"zstd: not a zstd frame ({e})") from None
        if announced != size:
            raise CodecError(f"zstd: frame announces {announced} bytes, manifest says {size}")
        # The frame's announced size was checked above, and zstd checks the data against it, so
        # decoding never allocates more than the manifest announced. Decoding straight into a
        # buffer we own saves the copy a read-only bytes result would cost later.
        out = empty(size)
        self._into(buf, out.data)
        return out.data

    def decode_into(self, buf: memoryview, out: memoryview) -> None:
        try:
            announced = zstandard.frame_content_size(buf)
        except zstandard.ZstdError as e:
            raise CodecError(f"zstd: not a zstd frame ({e})") from None
        if announced != len(out):
            raise CodecError(f"zstd: frame announces {announced} bytes, manifest says {len(out)}")
        self._into(buf, out)

    #: Frames that decode to at most this many bytes are decoded in one call and copied: for
    #: small frames (most masks) cheaper than a stream reader; larger ones stream into ``view``.
    ONE_SHOT_BYTES: ClassVar[int] = 1 << 18

    @classmethod
    def _into(cls, buf: memoryview, view: memoryview) -> None:
        """Decode one frame (whose announced size the caller checked is ``len(view)``) into ``view``."""
        size, got = len(view), 0
        if size and _copy_raw_frame(buf, view):
            return
        dctx = _decompressor()
        try:
            if size == 0:  # decompress returns an empty frame's b"" without looking past it
                obj = dctx.decompressobj()
                if obj.decompress(buf) or not obj.eof or obj.unused_data:
                    raise CodecError("zstd: not exactly one empty frame")
                return
            if size <= cls.ONE_SHOT_BYTES:
                out = dctx.decompress(buf, max_output_size=size, allow_extra_data=False)
                if len(out) != size:
                    raise CodecError(f"zstd: decoded {len(out)} bytes, expected {size}")
                view[:] = out
                return
            with dctx.stream_reader(buf, read_size=max(1, len(buf)), read_across_frames=True) as r:
                while got < size:
                    n = r.readinto(view[got:])
                    if not n:
                        break
                    got += n
                trailing = r.read(1)
        except zstandard.ZstdError as e:
            raise CodecError(f"zstd: {e}") from None
        if got != size:
            raise CodecError(f"zstd: truncated frame: decoded {got} bytes, expected {size}")
        if trailing:
            raise CodecError("zstd: more data after the frame")

    def config(self) -> dict[str, Any]:
        return {"id": self.id, "level": self.level}


@dataclass(frozen=True)
class ByteGroup(Codec):
    """Split each ``itemsize``-byte element into byte planes (all byte 0s, then all byte 1s, ...).

    Exponent bytes of floats land together, where an entropy coder finds their redundancy.
    """

    itemsize: int
    id: ClassVar[str] = "bytegroup"

    def __post_init__(self) -> None:
        if type(self.itemsize) is not int or not 1 <= self.itemsize <= 16:
            raise CodecError(f"bytegroup: bad itemsize {self.itemsize!r}")

    def encode(self, buf: memoryview) -> memoryview:
        a = np.frombuffer(buf, dtype=np.uint8)
        if a.size % self.itemsize:
            raise CodecError("bytegroup: input is not a whole number of elements")
        src = a.reshape(-1, self.itemsize)
        out = np.empty((self.itemsize, src.shape[0]), np.uint8)
        split_planes(src, out)
        return out.reshape(-1).data

    def decode(self, buf: memoryview, size: int) -> memoryview:
        if len(buf) != size or size % self.itemsize:
            raise CodecError(f"bytegroup: got {len(buf)} bytes, expected {size}")
        out = empty(size)
        self._join(buf, out)
        return out.data

    def decode_into(self, buf: memoryview, out: memoryview) -> None:
        if len(buf) != len(out) or len(out) % self.itemsize:
            raise CodecError(f"bytegroup: got {len(buf)} bytes, expected {len(out)}")
        self._join(buf, np.frombuffer(out, np.uint8))

    def _join(self, buf: memoryview, out: np.ndarray) -> None:
        src = np.frombuffer(buf, dtype=np.uint8).reshape(self.itemsize, -1)
        join_planes(list(src), out.reshape(-1, self.itemsize))

    def encoded_size(self, size: int) -> int:
        return size

    def config(self) -> dict[str, Any]:
        return {"id": self.id, "itemsize": self.itemsize}


@dataclass(frozen=True)
class BitPack(Codec):
    """Booleans (one byte each, 0 or 1) to bits, 8 to a byte, element i in bit i % 8 (LSB first)."""

    id: ClassVar[str] = "bitpack"

    def encode(self, buf: memoryview) -> bytes:
        return np.packbits(np.frombuffer(buf, dtype=np.uint8) != 0, bitorder="little").tobytes()

    def decode(self, buf: memoryview, size: int) -> memoryview:
        out = empty(size)
        self.decode_into(buf, out.data)
        return out.data

    def decode_into(self, buf: memoryview, out: memoryview) -> None:
        if len(buf) != math.ceil(len(out) / 8):
            raise CodecError(f"bitpack: got {len(buf)} bytes for {len(out)} elements")
        unpack_bits(np.frombuffer(buf, dtype=np.uint8), np.frombuffer(out, np.uint8))

    def encoded_size(self, size: int) -> int:
        return math.ceil(size / 8)


_PLANE_SIZES = "<{}I"
_scratch = ThreadBuffers()  # _plane's reused buffers, per thread


@dataclass(frozen=True)
class Planes(Codec):
    """Byte planes, each stored alone: zstd where it pays, verbatim where it does not.

    Encoded: ``itemsize`` little-endian u32 lengths, then the planes in order. A plane whose length
    is the plane size n (the element count) is stored verbatim; any other length is one zstd frame
    of n bytes. Float weights have one or two compressible planes (sign and exponent) and random
    mantissa planes: storing those verbatim saves decoding them, and zstd with long minimum matches
    codes the exponent plane closer to its entropy than one frame over all planes does.
    """

    itemsize: int
    level: int = 1
    id: ClassVar[str] = "planes"
    #: a compressed plane must be at most this fraction of its size, else it is stored verbatim
    KEEP_BELOW: ClassVar[float] = 0.98

    def __post_init__(self) -> None:
        if type(self.itemsize) is not int or not 1 <= self.itemsize <= 16:
            raise CodecError(f"{self.id}: bad itemsize {self.itemsize!r}")
        if type(self.level) is not int or not -(1 << 17) <= self.level <= 22:
            raise CodecError(f"{self.id}: bad level {self.level!r}")

    #: Bytes before the plane lengths (``ExponentPlanes``: its rotation).
    PREFIX: ClassVar[int] = 0

    def fits(self, size: int, nbytes: int) -> bool:
        # k lengths, then each plane verbatim or one zstd frame (at most ZSTD_MAX_RATIO its size)
        k = self.itemsize
        head = self.PREFIX + 4 * k
        return size % k == 0 and head <= nbytes <= head + size and size <= ZSTD_MAX_RATIO * max(1, nbytes - head) * k

    #: Levels from this one on spend more effort on the planes that compress (see ``_compressors``).
    STRONG_FROM: ClassVar[int] = 10

    def _compressors(self) -> list[zstandard.ZstdCompressor]:
        """Level 1 with long minimum matches; from ``STRONG_FROM`` on, then also zstd's optimal
        parser in a 128 KiB window (about 10x slower to encode): on exponent planes it codes
        literals close to their entropy (2.72 bits an fp32 exponent byte against 2.95) and the
        frames it makes decode about 1.5x faster (BENCHMARKS.md). Decoding needs neither setting."""
        fast = zstandard.ZstdCompressionParameters.from_level(1, min_match=7, write_content_size=True)
        out = [zstandard.ZstdCompressor(compression_params=fast)]
        if self.level >= self.STRONG_FROM:
            strong = zstandard.ZstdCompressionParameters(
                strategy=zstandard.STRATEGY_BTOPT, window_log=17, chain_log=12, hash_log=12, search_log=2,
                min_match=7, target_length=8, write_content_size=True)
            out.append(zstandard.ZstdCompressor(compression_params=strong))
        return out

    def _split(self, buf: memoryview) -> tuple[bytes, memoryview]:
        """The chunk's prefix and its byte planes, in stored order."""
        return b"", self._planes_of(buf)

    def _planes_of(self, buf: memoryview, r: int = 0) -> memoryview:
        """The byte planes of ``buf`` (with planes-exp's rotation ``r``, ``kernels.split_planes``),
        in this thread's reused buffer: ``encode`` copies out what it keeps, and a fresh buffer
        per chunk costs its page faults (for a 4M-element float32 chunk, 16 MB: about 8 ms here)."""
        k = self.itemsize
        a = np.frombuffer(buf, dtype=np.uint8)
        if a.size % k:
            raise CodecError(f"{self.id}: input is not a whole number of elements")
        out = _scratch.get("split", a.size)
        split_planes(a.reshape(-1, k), out.reshape(k, -1), r)
        return out.data

    def encode(self, buf: memoryview) -> bytes:
        prefix, planes = self._split(buf)
        n = len(planes) // self.itemsize
        first, *more = self._compressors()
        stored = []
        for i in range(self.itemsize):
            plane = planes[i * n : (i + 1) * n]
            packed = first.compress(plane) if n else b""
            keep = len(packed) <= self.KEEP_BELOW * n and len(packed) != n
            for cctx in more if keep else ():  # only planes that compress at all get more effort
                other = cctx.compress(plane)
                if len(other) < len(packed) and len(other) != n:
                    packed = other
            stored.append(packed if keep else plane)
        return b"".join([prefix, struct.pack(_PLANE_SIZES.format(self.itemsize), *(len(p) for p in stored)), *stored])

    def decode(self, buf: memoryview, size: int) -> memoryview:
        k = self.itemsize
        head = self.PREFIX + 4 * k
        if size % k or len(buf) < head:
            raise CodecError(f"{self.id}: {len(buf)} bytes cannot hold {size} bytes of {k}-byte elements")
        out = empty(size)
        self._decode(buf, out)
        return out.data

    def decode_into(self, buf: memoryview, out: memoryview) -> None:
        k = self.itemsize
        head = self.PREFIX + 4 * k
        if len(out) % k or len(buf) < head:
            raise CodecError(f"{self.id}: {len(buf)} bytes cannot hold {len(out)} bytes of {k}-byte elements")
        self._decode(buf, np.frombuffer(out, np.uint8))

    def _decode(self, buf: memoryview, out: np.ndarray) -> None:
        k = self.itemsize
        n = out.size // k
        # zstd-coded planes go to buffers this thread reuses (and without ``cheap``, none is None)
        planes = cast("list[np.ndarray]", self._planes(buf, n, "plane"))
        dst = out.reshape(n, k)
        if self.HELD:
            join_exponent(planes[: k - 2], planes[k - 2], planes[k - 1], _rotation(buf), dst)
        else:
            join_planes(planes, dst)

    #: With ``cheap``, ``planar`` leaves undecoded (None) the planes coded in under 1/CHEAP of their
    #: size: nearly empty (a bfloat16 family's merged vector's lowest plane), they decode at over
    #: 10 GB/s, so the reader's cache holds them only once an array has been read a few times
    #: (``reader.KEEP_CHEAP_FROM_USE``; BENCHMARKS.md, tenth round).
    CHEAP: ClassVar[int] = 64

    def _planes(self, buf: memoryview, n: int, slot: str | None,
                known: Sequence[np.ndarray | None] | None = None, cheap: bool = False) -> list[np.ndarray | None]:
        """The chunk's ``itemsize`` planes of ``n`` bytes, in stored order: views of ``buf`` where
        verbatim, else decoded (into this thread's buffers ``slot0``, ``slot1``, ...; with ``slot``
        None, into fresh arrays), or ``known[i]`` where given (decoded before); with ``cheap``, None
        for a plane coded in under ``n // CHEAP`` bytes (see CHEAP)."""
        k = self.itemsize
        head = self.PREFIX + 4 * k
        if len(buf) < head:
            raise CodecError(f"{self.id}: {len(buf)} bytes cannot hold {k} plane lengths")
        lengths = struct.unpack_from(_PLANE_SIZES.format(k), buf, self.PREFIX)
        if head + sum(lengths) != len(buf):
            raise CodecError(f"{self.id}: plane lengths do not add up to the chunk's size")
        planes: list[np.ndarray | None] = []
        pos = head
        for i, length in enumerate(lengths):
            old = known[i] if known is not None else None
            if old is not None and old.size == n:
                planes.append(old)
            elif cheap and length != n and length * self.CHEAP < n:
                planes.append(None)
            else:
                planes.append(_plane(buf[pos : pos + length], n, None if slot is None else f"{slot}{i}"))
            pos += length
        return planes

    def kept_nbytes(self, buf: memoryview, size: int, known: Sequence[np.ndarray | None] | None = None,
                    cheap: bool = False) -> int:
        """What ``planar(buf, size, None, known, cheap)`` would give as arrays of their own (the
        planes it decodes, and ``known``'s), in bytes, read from the plane lengths alone: a
        reader's cache can tell whether a chunk fits before decoding it. The lengths are checked
        as ``planar`` checks them."""
        k, n = self.itemsize, size // self.itemsize
        head = self.PREFIX + 4 * k
        if size % k or len(buf) < head:
            raise CodecError(f"{self.id}: {len(buf)} bytes cannot hold {k} plane lengths")
        lengths = struct.unpack_from(_PLANE_SIZES.format(k), buf, self.PREFIX)
        if head + sum(lengths) != len(buf):
            raise CodecError(f"{self.id}: plane lengths do not add up to the chunk's size")
        return n * sum(1 for i, length in enumerate(lengths)
                       if (known is not None and (old := known[i]) is not None and old.size == n)
                       or (length != n and not (cheap and length * self.CHEAP < n)))

    def planar(self, buf: memoryview, size: int, slot: str | None = None,
               known: Sequence[np.ndarray | None] | None = None, cheap: bool = False
               ) -> tuple[list[np.ndarray | None], int]:
        """The chunk of ``size`` decoded bytes as its stored planes (see ``_planes``; None only
        with ``cheap``) and the rotation that joins them (0: plane j is byte j of each element;
        ``planes-exp``: its r), for a reader that joins them in its own loop (``kernels.tall_planes``)."""
        if size % self.itemsize:
            raise CodecError(f"{self.id}: {size} bytes are not whole {self.itemsize}-byte elements")
        planes = self._planes(buf, size // self.itemsize, slot, known, cheap)
        return planes, _rotation(buf) if self.HELD else 0

    #: How many top planes ``_decode`` leaves to a subclass's join (``ExponentPlanes``: 2).
    HELD: ClassVar[int] = 0

    def config(self) -> dict[str, Any]:
        return {"id": self.id, "itemsize": self.itemsize, "level": self.level}


_BITSPLIT_MAX_WIDTH = {1: 5, 2: 13, 4: 29}


@dataclass(frozen=True)
class BitSplit(Codec):
    """Unsigned integers split into a head byte each, zstd-coded per block, and verbatim low bits.

    For an element v of bit length L (0 for v = 0), the head byte is ``4 * L + t``, t being the two
    bits below v's leading one (``v - 2**(L-1)`` when L is 1 or 2); the ``max(L - 3, 0)`` bits
    below those are the element's low bits. Encoded: one little-endian u32 length per block of
    ``block`` elements, then each block's head bytes (verbatim when the length is the block's
    element count, else one zstd frame of that many bytes), then every element's low bits as one
    little-endian bit stream (element i's in the bits that follow element i-1's; the last byte's
    unused bits zero). Exact-tier residuals (small differences in ulps, in the reference's exponent
    order) have heads whose distribution is narrow within a block and low bits that are noise:
    zstd's per-block Huffman tables code the heads close to their entropy given the exponent, which
    byte planes, cut at byte boundaries rather than at each element's bit length, do not.
    """

    itemsize: int
    block: int = 1 << 14
    id: ClassVar[str] = "bitsplit"
    ITEMSIZES: ClassVar[tuple[int, ...]] = (1, 2, 4)
    KEEP_BELOW: ClassVar[float] = 0.98

    def __post_init__(self) -> None:
        if type(self.itemsize) is not int or self.itemsize not in _BITSPLIT_MAX_WIDTH:
            raise CodecError(f"bitsplit: bad itemsize {self.itemsize!r} (1, 2 or 4)")
        if type(self.block) is not int or not 64 <= self.block <= 1 << 20 or self.block % 8:
            raise CodecError(f"bitsplit: bad block {self.block!r} (a multiple of 8 in [64, 2**20])")

    def _max_low_bytes(self, n: int) -> int:
        return -(-n * _BITSPLIT_MAX_WIDTH[self.itemsize] // 8)

    def fits(self, size: int, nbytes: int) -> bool:
        if size % self.itemsize:
            return False
        n = size // self.itemsize
        head = 4 * -(-n // self.block)
        return head <= nbytes <= head + n + self._max_low_bytes(n) and n <= ZSTD_MAX_RATIO * max(1, nbytes - head)

    def encode(self, buf: memoryview) -> bytes:
        k = self.itemsize
        if len(buf) % k:
            raise CodecError(f"bitsplit: {len(buf)} bytes is not a whole number of {k}-byte elements")
        n = len(buf) // k
        heads = np.empty(n, np.uint8)
        low = np.empty(self._max_low_bytes(n), np.uint8)
        got = bitsplit(buf, k, heads, low)  # the compiled pass, else numpy's (the same bytes)
        stream = low[:got].data if got is not None else _split_numpy(buf, k, heads)
        cctx = _bitsplit_compressor()
        stored: list[bytes | memoryview] = []
        for j in range(0, n, self.block):
            part = heads[j : j + self.block].data
            packed = cctx.compress(part)
            stored.append(packed if len(packed) <= self.KEEP_BELOW * len(part) and len(packed) != len(part) else part)
        sizes = struct.pack(f"<{len(stored)}I", *(len(p) for p in stored))
        return b"".join([sizes, *stored, stream])

    def decode(self, buf: memoryview, size: int) -> memoryview:
        out = empty(size)
        self.decode_into(buf, out.data)
        return out.data

    def decode_into(self, buf: memoryview, out: memoryview) -> None:
        k = self.itemsize
        if len(out) % k:
            raise CodecError(f"bitsplit: {len(out)} bytes is not a whole number of {k}-byte elements")
        n = len(out) // k
        nblocks = -(-n // self.block)
        if len(buf) < 4 * nblocks:
            raise CodecError("bitsplit: chunk too short for its block lengths")
        lengths = struct.unpack_from(f"<{nblocks}I", buf, 0)
        pos = 4 * nblocks
        if pos + sum(lengths) > len(buf):
            raise CodecError("bitsplit: block lengths exceed the chunk")
        heads = np.empty(n, np.uint8)
        zstd = Zstd()
        for j, length in enumerate(lengths):
            dst = heads[j * self.block : (j + 1) * self.block]
            piece = buf[pos : pos + length]
            if length == dst.size:
                dst[:] = np.frombuffer(piece, np.uint8)
            elif length > dst.size:
                raise CodecError(f"bitsplit: block {j} stores {length} bytes for {dst.size} heads")
            else:
                zstd.decode_into(piece, dst.data)
            pos += length
        got = bitjoin(heads, buf[pos:], k, out)  # the compiled pass, else numpy's below (the same checks)
        if got is not None:
            if got == -2:  # (the numpy join's words, its numbers worked out only here)
                total = int(np.take(_head_table(k), heads).astype(np.int64).__rshift__(8).sum())
                raise CodecError(f"bitsplit: {len(buf) - pos} bytes of low bits, the heads say {-(-total // 8)}")
            if got:
                raise CodecError(_BITJOIN_ERRORS[got])
            return
        # one table lookup per element: its low bits' width and leading bits, or _BAD_HEAD
        looked = np.take(_head_table(k), heads)
        if n and (looked == _BAD_HEAD).any():
            raise CodecError("bitsplit: a head byte names no element of this itemsize")
        width = looked >> np.uint32(8)
        low = _unpack_bits(buf[pos:], width)
        np.bitwise_and(looked, np.uint32(0xFF), out=looked)
        np.left_shift(looked, width, out=looked)
        np.bitwise_or(looked, low, out=looked)
        np.frombuffer(out, _UNSIGNED[k])[:] = looked

    def config(self) -> dict[str, Any]:
        return {"id": self.id, "itemsize": self.itemsize, "block": self.block}


_UNSIGNED: dict[int, np.dtype[Any]] = {1: np.dtype("<u1"), 2: np.dtype("<u2"), 4: np.dtype("<u4")}
#: Head bytes' t field must be below this, by bit length 0, 1, 2 and 3 or more.
_BITSPLIT_T_LIMIT = np.array([1, 1, 2, 4], np.uint8)
#: By bit length L (0 to 32): the low bits' width, and the leading bits' value ``v >> width`` less t.
_BITSPLIT_WIDTH = np.array([max(n - 3, 0) for n in range(33)], np.uint32)
_BITSPLIT_LEAD = np.array([min(1 << n >> 1, 4) for n in range(33)], np.uint8)


_compressors = threading.local()


def _bitsplit_compressor() -> zstandard.ZstdCompressor:
    """This thread's compressor of head blocks (level 1, 7-byte matches; one per thread, as a
    compressor may not be shared by threads at once)."""
    c = getattr(_compressors, "bitsplit", None)
    if c is None:
        c = _compressors.bitsplit = zstandard.ZstdCompressor(
            compression_params=zstandard.ZstdCompressionParameters.from_level(1, min_match=7, write_content_size=True))
    return c


def _split_numpy(buf: memoryview, itemsize: int, heads: np.ndarray) -> bytes:
    """``kernels.bitsplit`` in numpy: the head bytes into ``heads``; returns the low bits' stream.
    The bit length is read from the exponent of the element as a float (exact: float32 holds
    every 16-bit integer, float64 every 32-bit one)."""
    v = np.frombuffer(buf, dtype=_UNSIGNED[itemsize])
    if itemsize == 4:
        v = v.astype(np.uint32, copy=False)
        exp = (v.astype(np.float64).view(np.uint64) >> np.uint64(52)).astype(np.uint32)
        length = (np.maximum(exp, np.uint32(1022)) - np.uint32(1022)).astype(np.uint8)
    else:
        exp = v.astype(np.float32).view(np.uint32) >> np.uint32(23)
        length = (np.maximum(exp, np.uint32(126)) - np.uint32(126)).astype(np.uint8)
        v = v.astype(np.uint32)
    width = _BITSPLIT_WIDTH[length]
    np.left_shift(length, np.uint8(2), out=heads)
    heads += (v >> width).astype(np.uint8) - _BITSPLIT_LEAD[length]
    return _pack_bits(v & ((np.uint32(1) << width) - np.uint32(1)), width)


_BAD_HEAD = np.uint32(0xFFFFFFFF)
#: ``kernels.bitjoin``'s failures, in the words of the numpy join's checks.
_BITJOIN_ERRORS = {-1: "bitsplit: a head byte names no element of this itemsize",
                   -3: "bitsplit: nonzero padding after the low bits"}
_HEAD_TABLES: dict[int, np.ndarray] = {}


def _head_table(itemsize: int) -> np.ndarray:
    """By head byte: ``width << 8 | leading bits`` of the element it names, or ``_BAD_HEAD``
    where it names none of ``itemsize`` bytes (bit length above 8 * itemsize, or t too large)."""
    table = _HEAD_TABLES.get(itemsize)
    if table is None:
        h = np.arange(256)
        length, t = h >> 2, h & 3
        valid = (length <= 8 * itemsize) & (t < _BITSPLIT_T_LIMIT[np.minimum(length, 3)])
        lead = _BITSPLIT_LEAD[np.minimum(length, 32)].astype(np.uint32) + t.astype(np.uint32)
        table = np.where(valid, (_BITSPLIT_WIDTH[np.minimum(length, 32)] << np.uint32(8)) | lead, _BAD_HEAD)
        table = _HEAD_TABLES[itemsize] = table.astype(np.uint32)
    return table


def _pack_bits(values: np.ndarray, widths: np.ndarray) -> bytes:
    """``values[i]`` (below ``2**widths[i]``, widths at most 29) as one little-endian bit stream."""
    ends = np.cumsum(widths, dtype=np.uint64)
    total = int(ends[-1]) if ends.size else 0
    words = np.zeros(total // 64 + 2, np.uint64)
    if total:
        offsets = ends - widths
        word, shift = offsets >> np.uint64(6), offsets & np.uint64(63)
        v = values.astype(np.uint64)
        starts = np.flatnonzero(np.r_[True, word[1:] != word[:-1]])  # offsets ascend: runs of one word
        words[word[starts]] |= np.bitwise_or.reduceat(v << shift, starts)
        # the bits that spill into the next word (v >> 64 is undefined in numpy: shift by 63, then 1)
        spill = (v >> (np.uint64(63) - shift)) >> np.uint64(1)
        words[word[starts] + np.uint64(1)] |= np.bitwise_or.reduceat(spill, starts)
    return words.astype("<u8").tobytes()[: -(-total // 8)]


def _unpack_bits(stream: memoryview, widths: np.ndarray) -> np.ndarray:
    """The inverse of :func:`_pack_bits` (as uint32); the stream must be exactly as long as the
    widths say, with its unused last bits zero."""
    # bit offsets fit 32 bits for any chunk whose widths (at most 29 each) sum below 2**32
    offsets: np.ndarray = np.cumsum(widths, dtype=np.uint32 if widths.size < (1 << 32) // 29 else np.int64)
    total = int(offsets[-1]) if offsets.size else 0
    if len(stream) != -(-total // 8):
        raise CodecError(f"bitsplit: {len(stream)} bytes of low bits, the heads say {-(-total // 8)}")
    if total % 8 and stream[-1] >> (total % 8):
        raise CodecError("bitsplit: nonzero padding after the low bits")
    padded = np.zeros(len(stream) + 8, np.uint8)
    padded[: len(stream)] = np.frombuffer(stream, np.uint8)
    windows = np.ndarray((len(stream) + 1,), np.dtype("<u8"), padded, 0, (1,))  # 8 bytes from each byte
    np.subtract(offsets, widths, out=offsets, casting="unsafe")  # each element's first bit
    got = np.take(windows, offsets >> 3)
    shift = offsets & 7
    got >>= shift if shift.dtype == np.uint32 else shift.astype(np.uint8)  # at most 7 + 29 bits: in the window
    low = got.astype(np.uint32)
    mask = np.left_shift(np.uint32(1), widths, dtype=np.uint32)
    mask -= np.uint32(1)
    low &= mask
    return low


def _plane(piece: memoryview, n: int, slot: str | None) -> np.ndarray:
    """A stored plane of ``n`` bytes: itself when verbatim (its length is ``n``), else decoded
    from its zstd frame into this thread's buffer ``slot`` (None: a fresh array)."""
    if len(piece) == n:
        return np.frombuffer(piece, np.uint8)
    plane = empty(n) if slot is None else _scratch.get(slot, n)  # a fresh plane per chunk costs page faults
    Zstd().decode_into(piece, plane.data)
    return plane


#: ``ExponentPlanes``' zstd parameters: the fast strategy with a 64-entry hash table and 7-byte
#: minimum matches, so an exponent plane is coded almost wholly as Huffman literals.
_NEAR_LITERAL = zstandard.ZstdCompressionParameters(
    strategy=zstandard.STRATEGY_FAST, window_log=17, hash_log=6, chain_log=6, search_log=1, min_match=7,
    target_length=0, write_content_size=True)


@dataclass(frozen=True)
class ExponentPlanes(Planes):
    """``planes`` with the exponent of float32 and bfloat16 in a plane of its own (format 1.11).

    In these types the two top bytes hold the sign, the 8-bit exponent and the mantissa's top 7
    bits, so a plain top plane mixes the random sign into the exponent, and the plane below holds
    the exponent's lowest bit among random mantissa bits. Here each chunk chooses a rotation r,
    1 <= r <= 7, and stores, in place of the top byte ``hi`` and the one below ``lo``:

    - the plane ``T = (hi << r | lo >> (8 - r)) & 0xFF``: the exponent without its r - 1 top bits,
      then the mantissa's r - 1 top bits (r = 1: exactly the exponent);
    - the plane ``S = (hi & ~(0xFF >> r)) | (lo & (0xFF >> r))``: the sign, the exponent's r - 1
      top bits, the rest of the mantissa's top byte.

    The reader joins ``hi = (S & ~(0xFF >> r)) | T >> r`` and ``lo = (T << (8 - r) & 0xFF) |
    (S & (0xFF >> r))``. Weights rarely use the exponent's top bits (|w| < 2 keeps the first at 0),
    so moving them to S costs little there, and the mantissa's top bits, which depend on the
    exponent, are coded with it in T. Encoded: r as a little-endian u32, then ``planes``' layout.
    Planes are coded by zstd set to code literals (the fast strategy with a 64-entry hash table
    and 7-byte minimum matches): Huffman near the entropy, faster both ways than level 1.

    Below ``STRONG_FROM`` the writer uses r = 1 (T is the exponent, S is verbatim): 1.3% smaller
    than ``planes`` on fp32 weights and about as fast to decode. From it, the writer picks r from
    1 to 4 by the planes' entropy on a sample of the chunk: about 0.3% smaller again, but S is
    then Huffman-coded too, and decoding takes about 1.45x as long (BENCHMARKS.md).
    """

    id: ClassVar[str] = "planes-exp"
    HELD: ClassVar[int] = 2
    PREFIX: ClassVar[int] = 4
    #: The rotations the writer tries from ``STRONG_FROM`` on (below it: 1).
    ROTATIONS: ClassVar[tuple[int, ...]] = (1, 2, 3, 4)
    #: Elements of a chunk the writer estimates each rotation's cost on.
    SAMPLE: ClassVar[int] = 1 << 16

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.itemsize not in (2, 4):
            raise CodecError(f"planes-exp: itemsize must be 2 (bfloat16) or 4 (float32), got {self.itemsize!r}")

    def _compressors(self) -> list[zstandard.ZstdCompressor]:
        return [zstandard.ZstdCompressor(compression_params=_NEAR_LITERAL)]

    def _split(self, buf: memoryview) -> tuple[bytes, memoryview]:
        k = self.itemsize
        flat = np.frombuffer(buf, dtype=np.uint8)
        src = flat[: flat.size - flat.size % k].reshape(-1, k)  # (a partial element: _planes_of refuses it)
        r = self._choose(src[:, k - 2], src[:, k - 1])
        return struct.pack("<I", r), self._planes_of(buf, r)  # the planes and the rotation in one pass

    def _choose(self, lo: np.ndarray, hi: np.ndarray) -> int:
        """The rotation whose planes T and S have the least zero-order entropy on a sample (S is
        counted at 8 bits where zstd would store it verbatim)."""
        if lo.size == 0 or self.level < self.STRONG_FROM:
            return 1
        step = max(1, lo.size // self.SAMPLE)
        lo, hi = lo[::step], hi[::step]

        def bits(x: np.ndarray) -> float:
            counts = np.bincount(x, minlength=256)
            p = counts[counts > 0] / x.size
            return float(-(p * np.log2(p)).sum())

        def cost(r: int) -> float:
            t, s = rotate(lo, hi, r)
            hs = bits(s)
            return bits(t) + (8.0 if hs > 8 * self.KEEP_BELOW else hs)

        return min(self.ROTATIONS, key=cost)


def _rotation(buf: memoryview) -> int:
    (r,) = struct.unpack_from("<I", buf, 0)
    if not 1 <= r <= 7:
        raise CodecError(f"planes-exp: bad rotation {r}")
    return r


REGISTRY: dict[str, type[Codec]] = {c.id: c for c in (Zstd, ByteGroup, BitPack, Planes, ExponentPlanes, BitSplit)}


def from_config(config: Any) -> Codec:
    """The codec a manifest config names, e.g. ``from_config({"id": "zstd", "level": 3})``."""
    if not isinstance(config, dict) or not isinstance(config.get("id"), str):
        raise CodecError(f"bad codec config {config!r}")
    cls = REGISTRY.get(config["id"])
    if cls is None:
        raise UnsupportedVersionError(f"unknown codec {config['id']!r}: a newer tallpack may read it")
    kwargs = {k: v for k, v in config.items() if k != "id"}
    # the parameters a config records (every codec is a dataclass; a writer's choice that is not
    # recorded, as zstd's ``keep_below``, is no parameter)
    fields = [f for f in dataclasses.fields(cls) if f.compare]  # type: ignore[arg-type]
    unknown = sorted(set(kwargs) - {f.name for f in fields})
    if unknown:  # configs are closed (spec §5): a new parameter comes with a new id
        raise CodecError(f"codec {config['id']!r}: unknown parameter {', '.join(map(repr, unknown))}; "
                         f"it takes {', '.join(repr(f.name) for f in fields) or 'none'}")
    missing = [f.name for f in fields if f.name not in kwargs and f.default is dataclasses.MISSING]
    if missing:
        raise CodecError(f"codec {config['id']!r}: parameter {', '.join(map(repr, missing))} missing")
    return cls(**kwargs)


class Chain:
    """An ordered codec pipeline; only the last step may have a data-dependent size."""

    def __init__(self, codecs: list[Codec]):
        for c in codecs[:-1]:
            if c.encoded_size(1 << 20) is None:
                raise CodecError(f"codec {c.id!r} must be last in a chain")
        self.codecs = list(codecs)

    @classmethod
    def from_configs(cls, configs: Any) -> "Chain":
        if not isinstance(configs, list):
            raise CodecError(f"codec chain must be a list, got {configs!r}")
        return cls([from_config(c) for c in configs])

    def configs(self) -> list[dict[str, Any]]:
        return [c.config() for c in self.codecs]

    def ids(self) -> list[str]:
        return [c.id for c in self.codecs]

    def fits(self, size: int, nbytes: int) -> bool:
        """Whether a chunk of ``size`` decoded bytes can be stored in ``nbytes`` bytes."""
        if not self.codecs:
            return size == nbytes
        for c in self.codecs[:-1]:
            encoded = c.encoded_size(size)
            assert encoded is not None  # (__init__: every codec but the last is size-determined)
            size = encoded
        return self.codecs[-1].fits(size, nbytes)

    def encode(self, buf: memoryview) -> bytes | memoryview:
        out: bytes | memoryview = buf
        for c in self.codecs:
            out = c.encode(memoryview(out))
        return out

    def planar(self, buf: memoryview, size: int, slot: str | None = None,
               known: Sequence[np.ndarray | None] | None = None, cheap: bool = False
               ) -> tuple[list[np.ndarray | None], int] | None:
        """A chunk as its stored byte planes and their rotation (``Planes.planar``), or None when
        this chain is not one ``planes`` or ``planes-exp`` codec of 2- or 4-byte elements."""
        if not self.planar_itemsize:
            return None
        planes = self.codecs[0]
        assert isinstance(planes, Planes)  # (planar_itemsize: the one codec is planes)
        return planes.planar(buf, size, slot, known, cheap)

    @functools.cached_property
    def bits_chain(self) -> "Chain | None":
        """For a chain that starts with ``bitpack`` (masks), the rest of it: what decodes a chunk to
        its packed bits, for readers that take the bits as they are (``kernels.tall_f32``'s
        ``bits``); None for any other chain."""
        if self.codecs and isinstance(self.codecs[0], BitPack):
            return Chain(self.codecs[1:])
        return None

    @property
    def planar_itemsize(self) -> int:
        """The element size (2 or 4) whose planes ``planar`` gives for this chain; 0: none."""
        if len(self.codecs) == 1 and isinstance(self.codecs[0], Planes) and self.codecs[0].itemsize in (2, 4):
            return self.codecs[0].itemsize
        return 0

    def decode(self, buf: memoryview, size: int, out: memoryview | None = None
               ) -> bytes | bytearray | memoryview:
        """The decoded bytes; with ``out`` (writable, ``size`` bytes), decoded into it and returned."""
        sizes = [size]
        for c in self.codecs[:-1]:
            encoded = c.encoded_size(sizes[-1])
            assert encoded is not None  # (__init__: every codec but the last is size-determined)
            sizes.append(encoded)
        if out is not None and len(out) != size:
            raise CodecError(f"decode into {len(out)} bytes, expected {size}")
        res: bytes | bytearray | memoryview = buf
        steps = list(zip(reversed(self.codecs), reversed(sizes)))
        for j, (c, s) in enumerate(steps):
            if out is not None and j == len(steps) - 1:
                c.decode_into(memoryview(res), out)
                return out
            res = c.decode(memoryview(res), s)
        if len(res) != size:
            raise CodecError(f"decoded {len(res)} bytes, expected {size}")
        if out is not None:  # no codecs: the stored bytes are the data
            out[:] = memoryview(res).cast("B")
            return out
        return res


#: Named presets for dense sections (base, merged vector, task-own tensors).
DENSE_PRESETS = ("raw", "zstd", "bytegroup-zstd", "planes")


#: The dtypes whose 8-bit exponent straddles the top two bytes (``ExponentPlanes``).
EXPONENT_PLANES_DTYPES = ("float32", "bfloat16")


def dense_chain(preset: str, itemsize: int, level: int = 3, dtype: str | None = None) -> Chain:
    """The chain of a dense preset: ``raw`` loads fastest; ``planes`` (byte planes, each zstd or
    verbatim; for float32 and bfloat16 with the exponent in a plane of its own) is the smallest
    and decodes fastest of the compressed ones; ``bytegroup-zstd`` (one frame over the planes) and
    ``zstd`` are what format 1.0 offered. Without ``dtype``, ``planes`` keeps plain byte planes."""
    if preset == "raw":
        return Chain([])
    if preset == "zstd":
        return Chain([Zstd(level)])
    if preset == "planes" and dtype in EXPONENT_PLANES_DTYPES:  # from level 10, rotations chosen
        return Chain([ExponentPlanes(itemsize, 1 if level < Planes.STRONG_FROM else level)])
    if preset == "planes":  # level 1 with long matches, or more effort from level 10 (Planes)
        return Chain([Planes(itemsize, 1 if level < Planes.STRONG_FROM else level)] if itemsize > 1 else [Zstd(level)])
    if preset == "bytegroup-zstd":
        return Chain(([ByteGroup(itemsize)] if itemsize > 1 else []) + [Zstd(level)])
    raise InvalidArgumentError(f"unknown codec {preset!r}; choose one of {', '.join(DENSE_PRESETS)}")


#: A mask chunk (of at least ``Zstd.RAW_FROM`` packed bytes) is stored zstd-coded only where that
#: saves at least 10%; else as a frame of raw blocks. Masks of density about 0.31 to 0.69 save
#: less (zstd gets close to their entropy), and decoding them costs about 0.7 ns a packed byte: a
#: 1M-element mask 95 us, against 150 us to rebuild its float32 tensor from raw arrays
#: (BENCHMARKS.md, eleventh round).
MASK_KEEP_BELOW = 0.90


def mask_chain(level: int = 3, keep_below: float | None = None) -> Chain:
    """The chain for TALL masks: bit-packed, then zstd where it saves ``keep_below`` (default
    ``MASK_KEEP_BELOW``; 0 keeps every chunk of ``Zstd.RAW_FROM`` bytes or more verbatim, as the
    ``raw`` preset does)."""
    return Chain([BitPack(), Zstd(level, keep_below=MASK_KEEP_BELOW if keep_below is None else keep_below)])
