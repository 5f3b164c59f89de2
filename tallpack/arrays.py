"""Array references: where an array's chunks lie in the file and how to decode them (spec §3.5)."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from . import codecs as _codecs
from .elements import element, itemsize, numel
from .errors import FormatError

DEFAULT_CHUNK_ELEMENTS = 1 << 22
#: The largest decoded chunk a reader accepts (spec §7).
MAX_CHUNK_BYTES = 1 << 30


def check_chunk_elements(n: object) -> int:
    """``chunk_elements`` must be a positive multiple of 8 (so bit-packed chunks are whole bytes)."""
    if type(n) is not int or n <= 0 or n % 8:
        raise ValueError(f"chunk_elements must be a positive multiple of 8, got {n!r}")
    return n


def check_chunk_bytes(chunk_elements: int, shape: tuple[int, ...], dtype: str) -> None:
    if min(chunk_elements, numel(shape)) * itemsize(dtype) > MAX_CHUNK_BYTES:
        raise ValueError(f"chunks of {chunk_elements} {dtype} elements exceed {MAX_CHUNK_BYTES} bytes")


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
        """The codec chain, built once (unknown codecs fail here)."""
        return _codecs.Chain.from_configs(list(self.codecs))

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
    def from_dict(cls, d: Any, where: str) -> "ArrayRef":
        """Parse and validate one array entry; ``where`` names it in error messages."""
        try:
            dtype = d["dtype"]
            element(dtype)
            shape = tuple(d["shape"])
            codecs = tuple(d["codecs"])
            chunk_elements = d["chunk_elements"]
            chunks = tuple(Chunk(*c) for c in d["chunks"])
        except FormatError as e:
            raise type(e)(f"{where}: {e}") from None
        except (KeyError, TypeError, ValueError):
            raise FormatError(f"{where}: malformed array entry") from None
        ints = [*shape, chunk_elements] + [v for c in chunks for v in (c.offset, c.nbytes, c.checksum)]
        if not all(type(v) is int and v >= 0 for v in ints):
            raise FormatError(f"{where}: shape, chunk sizes and offsets must be non-negative integers")
        try:
            check_chunk_elements(chunk_elements)
            check_chunk_bytes(chunk_elements, shape, dtype)
        except ValueError as e:
            raise FormatError(f"{where}: {e}") from None
        ref = cls(dtype, shape, codecs, chunk_elements, chunks)
        if len(chunks) != -(-ref.numel // chunk_elements):
            raise FormatError(f"{where}: {len(chunks)} chunks cannot hold {ref.numel} elements")
        try:
            chain = ref.chain  # unknown codecs fail here, at open, not mid-read
        except FormatError as e:
            raise type(e)(f"{where}: {e}") from None
        for c in chain.codecs:
            if isinstance(c, _codecs.ByteGroup) and c.itemsize != ref.itemsize:
                raise FormatError(f"{where}: bytegroup itemsize {c.itemsize} for {dtype} elements")
        return ref
