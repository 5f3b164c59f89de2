"""Array references: where an array's chunks lie in the file and how to decode them (spec §3.5)."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, NamedTuple

from . import codecs as _codecs
from .elements import element, itemsize, numel
from .errors import FormatError
from .limits import MAX_CHAIN, MAX_CHUNK_BYTES, MAX_DIMS, MAX_INT, MAX_JSON_INT

DEFAULT_CHUNK_ELEMENTS = 1 << 22


@functools.lru_cache(maxsize=256)
def _chain(key: tuple[tuple[tuple[str, type, Any], ...], ...]) -> _codecs.Chain:
    """Codec chains are immutable, so a manifest's hundreds of arrays share a few (opening 10x
    faster). ``key``: each codec's config as (name, type, value) in its order, so that ``3``,
    ``3.0`` and ``True`` are told apart (``_codec_key``)."""
    return _codecs.Chain.from_configs([{k: v for k, _, v in c} for c in key])


def _codec_key(codecs: Any) -> tuple | None:
    """``_chain``'s key for a list of codec configs; None when they are not flat, hashable dicts."""
    try:
        key = tuple([tuple([(k, type(v), v) for k, v in c.items()]) for c in codecs])
        hash(key)
    except (AttributeError, TypeError):
        return None
    return key


def _where(where: str | tuple[str, str]) -> str:
    return where if isinstance(where, str) else f"{where[0]} ({where[1]})"
__all__ = ["ArrayRef", "Chunk", "DEFAULT_CHUNK_ELEMENTS", "MAX_CHUNK_BYTES", "check_chunk_bytes",
           "check_chunk_elements", "check_shape"]


def check_chunk_elements(n: object) -> int:
    """``chunk_elements`` must be a positive multiple of 8 (so bit-packed chunks are whole bytes)."""
    if type(n) is not int or n <= 0 or n % 8:
        raise ValueError(f"chunk_elements must be a positive multiple of 8, got {n!r}")
    return n


def check_chunk_bytes(chunk_elements: int, shape: tuple[int, ...], dtype: str) -> None:
    """A decoded chunk is at most ``MAX_CHUNK_BYTES``."""
    if min(chunk_elements, numel(shape)) * itemsize(dtype) > MAX_CHUNK_BYTES:
        raise ValueError(f"chunks of {chunk_elements} {dtype} elements exceed {MAX_CHUNK_BYTES} bytes")


def check_shape(shape: object) -> tuple[int, ...]:
    """A shape: at most ``MAX_DIMS`` non-negative integers whose nonzero ones multiply to at most
    ``MAX_INT`` (so strides and byte sizes fit in 64 bits); ValueError otherwise."""
    if not isinstance(shape, (list, tuple)) or len(shape) > MAX_DIMS:
        raise ValueError(f"a shape is a list of at most {MAX_DIMS} dimensions")
    span = 1
    for d in shape:
        if type(d) is not int or d < 0:
            raise ValueError("shape dimensions must be non-negative integers")
        span *= max(d, 1)
        if span > MAX_INT:
            raise ValueError("shape too large (its dimensions multiply past 2**63)")
    return tuple(shape)


class Chunk(NamedTuple):
    """One stored chunk: where it lies, its stored size, and its checksum (a tuple: a manifest
    has thousands, and a tuple is made several times faster than a frozen dataclass)."""

    offset: int
    nbytes: int
    checksum: int


@dataclass(frozen=True)
class ArrayRef:
    """Where an array's chunks lie and how to decode them.

    The array's elements, in C order, are cut into chunks of ``chunk_elements`` elements (the last
    one shorter); each chunk is encoded alone with ``codecs``.
    """

    dtype: str
    shape: tuple[int, ...]
    codecs: tuple[dict, ...]
    chunk_elements: int
    chunks: tuple[Chunk, ...]

    @functools.cached_property
    def numel(self) -> int:
        return numel(self.shape)

    @functools.cached_property
    def itemsize(self) -> int:
        return itemsize(self.dtype)

    @functools.cached_property
    def chain(self) -> _codecs.Chain:
        """The codec chain, built once (unknown codecs fail here); arrays with the same configs share it."""
        key = _codec_key(self.codecs)
        if key is None:  # not a list of flat dicts: from_configs says what is wrong
            return _codecs.Chain.from_configs(list(self.codecs))
        return _chain(key)

    @functools.cached_property
    def nbytes(self) -> int:
        """Decoded size in bytes."""
        return self.numel * self.itemsize

    @property
    def stored_nbytes(self) -> int:
        return sum(c.nbytes for c in self.chunks)

    def chunk_numel(self, i: int) -> int:
        return min(self.chunk_elements, self.numel - i * self.chunk_elements)

    def to_dict(self) -> dict[str, Any]:
        return {
            "dtype": self.dtype,
            "shape": list(self.shape),
            "codecs": list(self.codecs),
            "chunk_elements": self.chunk_elements,
            "chunks": [[c.offset, c.nbytes, c.checksum] for c in self.chunks],
        }

    @classmethod
    def from_dict(cls, d: Any, where: str | tuple[str, str]) -> "ArrayRef":
        """Parse and validate one array entry; ``where`` names it in error messages (a pair
        ``(entry, key)`` reads "entry (key)", formatted only when there is an error).

        Every check here runs before anything the entry declares is allocated: the chunk count
        follows from the shape, and each chunk's stored size must be able to hold its decoded
        size (spec §7), so declared sizes are backed by bytes in the file. The checks of the
        header (dtype, shape, codecs, chunking) are made once per distinct header: a manifest's
        hundreds of arrays share a few (opening an 8-task archive: 12.0 against 10.4 ms).
        """
        if not isinstance(d, dict):
            raise FormatError(f"{_where(where)}: malformed array entry")
        try:
            dtype, shape, codecs, chunk_elements, chunks = (
                d["dtype"], d["shape"], d["codecs"], d["chunk_elements"], d["chunks"])
        except KeyError:
            raise FormatError(f"{_where(where)}: malformed array entry") from None
        try:
            key = _header_key(dtype, shape, codecs, chunk_elements)
            head = _header(key) if key is not None else _check_header(dtype, shape, codecs, chunk_elements)
        except FormatError as e:
            raise type(e)(f"{_where(where)}: {e}") from None
        except (TypeError, ValueError) as e:
            raise FormatError(f"{_where(where)}: {e}") from None
        shape, chain, n, count, fits, full, last = head
        if type(chunks) is not list or len(chunks) != count:
            raise FormatError(f"{_where(where)}: {len(chunks) if isinstance(chunks, list) else 'no'} chunks "
                              f"cannot hold {n} elements")
        parsed = []
        for i, c in enumerate(chunks):
            if type(c) is not list or len(c) != 3:
                raise FormatError(f"{_where(where)}: chunks must be [offset, nbytes, checksum] of non-negative integers")
            off, nbytes, checksum = c
            if (type(off) is not int or type(nbytes) is not int or type(checksum) is not int
                    or not (0 <= off <= MAX_INT and 0 <= nbytes <= MAX_INT and 0 <= checksum <= MAX_JSON_INT)):
                raise FormatError(f"{_where(where)}: chunks must be [offset, nbytes, checksum] of non-negative integers")
            if not fits(full if i < count - 1 else last, nbytes):
                size = chunk_elements if i < count - 1 else n - i * chunk_elements
                raise FormatError(f"{_where(where)}: chunk {i} stores {nbytes} bytes, which cannot decode to "
                                  f"{size * itemsize(dtype)} bytes with codecs {chain.ids()}")
            parsed.append(Chunk(off, nbytes, checksum))
        ref = cls.__new__(cls)  # the checked fields as they are (a frozen dataclass's __init__ is slow)
        ref.__dict__.update(dtype=dtype, shape=shape, codecs=tuple(codecs), chunk_elements=chunk_elements,
                            chunks=tuple(parsed), chain=chain, numel=n)  # and cached properties, known
        return ref


def _header_key(dtype: Any, shape: Any, codecs: Any, chunk_elements: Any) -> tuple | None:
    """A hashable key for an array header that tells apart every value JSON can give (``3`` from
    ``3.0`` and ``True``); None when the header is not of the plain types (its checks then run
    uncached and say what is wrong)."""
    if (type(dtype) is not str or type(shape) is not list or type(codecs) is not list
            or type(chunk_elements) is not int or not all(type(x) is int for x in shape)):
        return None
    ck = _codec_key(codecs)
    return None if ck is None else (dtype, tuple(shape), ck, chunk_elements)


@functools.lru_cache(maxsize=1024)
def _header(key: tuple) -> tuple:
    dtype, shape, ck, chunk_elements = key
    return _check_header(dtype, list(shape), [{k: v for k, _, v in c} for c in ck], chunk_elements)


def _check_header(dtype: Any, shape: Any, codecs: Any, chunk_elements: Any) -> tuple:
    """Check an array header; returns (shape, chain, element count, chunk count, and what checks a
    chunk's stored size: ``fits(size, nbytes)`` with the size for a full chunk and for the last
    one). FormatError, ValueError or TypeError says what is wrong."""
    element(dtype)
    shape = check_shape(shape)
    if not isinstance(codecs, list) or len(codecs) > MAX_CHAIN:
        raise ValueError(f"a codec chain is a list of at most {MAX_CHAIN} codecs")
    check_chunk_elements(chunk_elements)
    check_chunk_bytes(chunk_elements, shape, dtype)
    key = _codec_key(codecs)
    # not a list of flat dicts: from_configs says what is wrong
    chain = _codecs.Chain.from_configs(list(codecs)) if key is None else _chain(key)
    for c in chain.codecs:
        if isinstance(c, _codecs.ByteGroup) and c.itemsize != itemsize(dtype):
            raise FormatError(f"bytegroup itemsize {c.itemsize} for {dtype} elements")
    n = numel(shape)
    count = -(-n // chunk_elements)
    # each chunk's stored size must be able to hold its decoded size (``Chain.fits``): the sizes
    # the last codec sees for a full chunk and for the last one, worked out once per header
    sizes = [chunk_elements * itemsize(dtype), (n - (count - 1) * chunk_elements) * itemsize(dtype)]
    for c in chain.codecs[:-1]:
        sizes = [c.encoded_size(x) for x in sizes]
    fits = chain.codecs[-1].fits if chain.codecs else int.__eq__
    return shape, chain, n, count, fits, sizes[0], sizes[1]
