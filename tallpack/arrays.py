"""Array references: where an array's chunks lie in the file and how to decode them (spec §3.5)."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from . import codecs as _codecs
from .elements import element, itemsize, numel
from .errors import FormatError
from .limits import MAX_CHAIN, MAX_CHUNK_BYTES, MAX_DIMS, MAX_INT, MAX_JSON_INT

DEFAULT_CHUNK_ELEMENTS = 1 << 22


@functools.lru_cache(maxsize=256)
def _chain(key: tuple[tuple[tuple[str, Any], ...], ...]) -> _codecs.Chain:
    """Codec chains are immutable, so a manifest's hundreds of arrays share a few (opening 10x faster)."""
    return _codecs.Chain.from_configs([dict(c) for c in key])


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


@dataclass(frozen=True)
class Chunk:
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

    @property
    def numel(self) -> int:
        return numel(self.shape)

    @property
    def itemsize(self) -> int:
        return itemsize(self.dtype)

    @functools.cached_property
    def chain(self) -> _codecs.Chain:
        """The codec chain, built once (unknown codecs fail here); arrays with the same configs share it."""
        try:
            key = tuple(tuple(sorted(c.items())) for c in self.codecs)
            hash(key)
        except (AttributeError, TypeError):  # not a list of flat dicts: from_configs says what is wrong
            return _codecs.Chain.from_configs(list(self.codecs))
        return _chain(key)

    @property
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
        size (spec §7), so declared sizes are backed by bytes in the file.
        """
        if not isinstance(d, dict):
            raise FormatError(f"{_where(where)}: malformed array entry")
        try:
            dtype = d["dtype"]
            element(dtype)
            shape = check_shape(d["shape"])
            codecs, chunk_elements, chunks = d["codecs"], d["chunk_elements"], d["chunks"]
            if not isinstance(codecs, list) or len(codecs) > MAX_CHAIN:
                raise ValueError(f"a codec chain is a list of at most {MAX_CHAIN} codecs")
            check_chunk_elements(chunk_elements)
            check_chunk_bytes(chunk_elements, shape, dtype)
        except FormatError as e:
            raise type(e)(f"{_where(where)}: {e}") from None
        except KeyError:
            raise FormatError(f"{_where(where)}: malformed array entry") from None
        except (TypeError, ValueError) as e:
            raise FormatError(f"{_where(where)}: {e}") from None
        n = numel(shape)
        if not isinstance(chunks, list) or len(chunks) != -(-n // chunk_elements):
            raise FormatError(f"{_where(where)}: {len(chunks) if isinstance(chunks, list) else 'no'} chunks "
                              f"cannot hold {n} elements")
        for c in chunks:
            if (not isinstance(c, list) or len(c) != 3
                    or not all(type(v) is int for v in c)
                    or not (0 <= c[0] <= MAX_INT and 0 <= c[1] <= MAX_INT and 0 <= c[2] <= MAX_JSON_INT)):
                raise FormatError(f"{_where(where)}: chunks must be [offset, nbytes, checksum] of non-negative integers")
        ref = cls(dtype, shape, tuple(codecs), chunk_elements, tuple(Chunk(*c) for c in chunks))
        try:
            chain = ref.chain  # unknown codecs fail here, at open, not mid-read
        except FormatError as e:
            raise type(e)(f"{_where(where)}: {e}") from None
        for c in chain.codecs:
            if isinstance(c, _codecs.ByteGroup) and c.itemsize != ref.itemsize:
                raise FormatError(f"{_where(where)}: bytegroup itemsize {c.itemsize} for {dtype} elements")
        full = chunk_elements * ref.itemsize
        last = len(ref.chunks) - 1
        for i, c in enumerate(ref.chunks):
            size = full if i < last else ref.chunk_numel(i) * ref.itemsize
            if not chain.fits(size, c.nbytes):
                raise FormatError(f"{_where(where)}: chunk {i} stores {c.nbytes} bytes, which cannot decode to "
                                  f"{size} bytes with codecs {chain.ids()}")
        return ref
