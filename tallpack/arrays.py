"""Array references: where an array's chunks lie in the file and how to decode them (spec §3.5)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import FrozenInstanceError
from operator import attrgetter
from typing import TYPE_CHECKING, Any, NamedTuple

from . import codecs as _codecs
from .elements import element, itemsize, numel
from .errors import FormatError
from .limits import MAX_CHAIN, MAX_CHUNK_BYTES, MAX_DIMS, MAX_INT, MAX_JSON_INT

DEFAULT_CHUNK_ELEMENTS = 1 << 22


@functools.lru_cache(maxsize=256)
def _chain(key: tuple[tuple[tuple[Any, ...], ...], ...]) -> _codecs.Chain:
    """Codec chains are immutable, so a manifest's hundreds of arrays share a few (opening 10x
    faster). ``key``: each codec's config as its items in order (``_codec_key``)."""
    return _codecs.Chain.from_configs([{item[0]: item[-1] for item in c} for c in key])


def _item_key(k: Any, v: Any) -> tuple:
    """A config item as a key that tells apart every value JSON can give: ``(k, v)`` for a str or
    an int, ``(k, type, v)`` for anything else, so that ``3``, ``3.0`` and ``True`` differ."""
    t = type(v)
    return (k, v) if t is str or t is int else (k, t, v)


def _codec_key(codecs: Any) -> tuple | None:
    """``_chain``'s key for a list of codec configs; None when they are not flat, hashable dicts."""
    try:
        key = tuple([tuple([_item_key(k, v) for k, v in c.items()]) for c in codecs])
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
    ``MAX_INT`` (so strides and byte sizes fit in 64 bits); ValueError otherwise. Equal shapes
    come back as one tuple (a manifest's tens of thousands of entries share a few shapes)."""
    if not isinstance(shape, (list, tuple)) or len(shape) > MAX_DIMS:
        raise ValueError(f"a shape is a list of at most {MAX_DIMS} dimensions")
    for d in shape:
        if type(d) is not int or d < 0:
            raise ValueError("shape dimensions must be non-negative integers")
    t = tuple(shape)
    seen = _SHAPES.get(t)  # (integers only: no 16.0 or True taken for 16 or 1)
    if seen is not None:
        return seen
    span = 1
    for d in t:
        span *= max(d, 1)
        if span > MAX_INT:
            raise ValueError("shape too large (its dimensions multiply past 2**63)")
    if len(_SHAPES) >= _MAX_SHARED:
        _SHAPES.clear()
    _SHAPES[t] = t
    return t


#: Shapes and array headers already seen, shared (``check_shape``, ``ArrayRef.from_dict``); each
#: cleared when it reaches ``_MAX_SHARED`` entries, so a manifest of all-distinct shapes costs no
#: more than before.
_MAX_SHARED = 4096
_SHAPES: dict[tuple[int, ...], tuple[int, ...]] = {}


class Chunk(NamedTuple):
    """One stored chunk: where it lies, its stored size, and its checksum (a tuple: a manifest
    has thousands, and a tuple is made several times faster than a frozen dataclass)."""

    offset: int
    nbytes: int
    checksum: int


class _Header(NamedTuple):
    """What refs with the same header share: their fields, the chain, and the sizes worked out
    once (``_check_header``): the element count and size, the chunk count, and what checks a
    chunk's stored size, ``fits(size, nbytes)`` with the size for a full chunk and for the last."""

    dtype: str
    shape: tuple[int, ...]
    codecs: tuple[dict, ...]
    chunk_elements: int
    chain: _codecs.Chain
    numel: int
    itemsize: int
    chunk_count: int
    fits: Callable[[int, int], bool]
    full: int
    last: int


_set = object.__setattr__
_new = object.__new__
_chunk = tuple.__new__  # Chunk(*c) without the Python-level __new__ of a NamedTuple


class ArrayRef:
    """Where an array's chunks lie and how to decode them.

    The array's elements, in C order, are cut into chunks of ``chunk_elements`` elements (the last
    one shorter); each chunk is encoded alone with ``codecs``. Immutable, and compared as the frozen
    dataclass it was: ``dtype``, ``shape``, ``codecs``, ``chunk_elements``, ``chunks``. A ref holds
    its chunks and its header, which the refs of the same dtype, shape, codecs and chunking share
    (an archive of 64,000 task entries holds as many refs, and a few headers).
    """

    __slots__ = ("_head", "chunks")
    _head: _Header
    chunks: tuple[Chunk, ...]

    def __init__(self, dtype: str, shape: tuple[int, ...], codecs: tuple[dict, ...], chunk_elements: int,
                 chunks: tuple[Chunk, ...]):
        # a writer's ref, checked as a reader checks one (ValueError or FormatError: a caller's bug)
        _set(self, "_head", _check_header(dtype, shape, list(codecs), chunk_elements))
        _set(self, "chunks", tuple(chunks))

    if TYPE_CHECKING:
        dtype: str
        shape: tuple[int, ...]
        codecs: tuple[dict, ...]
        chunk_elements: int
        chain: _codecs.Chain
        numel: int
        itemsize: int
    else:  # the header's fields, read by C (a property's getter in Python costs a frame per read)
        dtype = property(attrgetter("_head.dtype"), doc="The element type's spec name.")
        shape = property(attrgetter("_head.shape"))
        codecs = property(attrgetter("_head.codecs"), doc="The codec configs, in order.")
        chunk_elements = property(attrgetter("_head.chunk_elements"))
        chain = property(attrgetter("_head.chain"), doc="The codec chain; arrays with the same configs share it.")
        numel = property(attrgetter("_head.numel"))
        itemsize = property(attrgetter("_head.itemsize"))

    def __setattr__(self, name: str, value: Any) -> None:
        raise FrozenInstanceError(f"cannot assign to field {name!r}")

    def __delattr__(self, name: str) -> None:
        raise FrozenInstanceError(f"cannot delete field {name!r}")

    def _fields(self) -> tuple:
        h = self._head
        return h.dtype, h.shape, h.codecs, h.chunk_elements, self.chunks

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        assert isinstance(other, ArrayRef)
        return self._fields() == other._fields()

    def __hash__(self) -> int:  # as the dataclass's: a TypeError where its codecs hold dicts (unhashable)
        return hash(self._fields())

    def __repr__(self) -> str:
        h = self._head
        return (f"ArrayRef(dtype={h.dtype!r}, shape={h.shape!r}, codecs={h.codecs!r}, "
                f"chunk_elements={h.chunk_elements!r}, chunks={self.chunks!r})")

    def __reduce__(self) -> tuple:
        return ArrayRef, self._fields()

    def __setstate__(self, state: Any) -> None:
        """A ref pickled by tallpack before refs shared their headers (a frozen dataclass: its
        fields as the state), read as a new one."""
        d = state[1] if isinstance(state, tuple) else state
        if not isinstance(d, dict) or not {"dtype", "shape", "codecs", "chunk_elements", "chunks"} <= d.keys():
            raise TypeError("not the state of a pickled ArrayRef")
        _set(self, "_head", _check_header(d["dtype"], tuple(d["shape"]), list(d["codecs"]), d["chunk_elements"]))
        _set(self, "chunks", tuple(d["chunks"]))

    @property
    def nbytes(self) -> int:
        """Decoded size in bytes."""
        return self._head.numel * self._head.itemsize

    @property
    def stored_nbytes(self) -> int:
        return sum(c.nbytes for c in self.chunks)

    def chunk_numel(self, i: int) -> int:
        h = self._head
        return min(h.chunk_elements, h.numel - i * h.chunk_elements)

    def to_dict(self) -> dict[str, Any]:
        h = self._head
        return {
            "dtype": h.dtype,
            "shape": list(h.shape),
            "codecs": [dict(c) for c in h.codecs],
            "chunk_elements": h.chunk_elements,
            "chunks": [[c.offset, c.nbytes, c.checksum] for c in self.chunks],
        }

    @classmethod
    def from_dict(cls, d: Any, where: str | tuple[str, str]) -> "ArrayRef":
        """Parse and validate one array entry; ``where`` names it in error messages (a pair
        ``(entry, key)`` reads "entry (key)", formatted only when there is an error).

        Every check here runs before anything the entry declares is allocated: the chunk count
        follows from the shape, and each chunk's stored size must be able to hold its decoded
        size (spec §7), so declared sizes are backed by bytes in the file. The checks of the
        header (dtype, shape, codecs, chunking) are made once per distinct header, whose checked
        values the refs share: a manifest's tens of thousands of arrays have a few.
        """
        if not isinstance(d, dict):
            raise FormatError(f"{_where(where)}: malformed array entry")
        try:
            dtype, shape, codecs, chunk_elements, chunks = (
                d["dtype"], d["shape"], d["codecs"], d["chunk_elements"], d["chunks"])
        except KeyError:
            raise FormatError(f"{_where(where)}: malformed array entry") from None
        key = _header_key(dtype, shape, codecs, chunk_elements)
        try:
            head = None if key is None else _HEADERS.get(key)
        except TypeError:  # a codec config holding a list or an object: checked uncached
            key = head = None
        if head is None:
            try:
                head = _check_header(dtype, shape, codecs, chunk_elements)
            except FormatError as e:
                raise type(e)(f"{_where(where)}: {e}") from None
            except (TypeError, ValueError) as e:
                raise FormatError(f"{_where(where)}: {e}") from None
            if key is not None:
                if len(_HEADERS) >= _MAX_SHARED:
                    _HEADERS.clear()
                _HEADERS[key] = head
        count, fits, full = head.chunk_count, head.fits, head.full
        if type(chunks) is not list or len(chunks) != count:
            raise FormatError(f"{_where(where)}: {len(chunks) if isinstance(chunks, list) else 'no'} chunks "
                              f"cannot hold {head.numel} elements")
        parsed = []
        for i, c in enumerate(chunks):
            if type(c) is not list or len(c) != 3:
                raise FormatError(f"{_where(where)}: chunks must be [offset, nbytes, checksum] of non-negative integers")
            off, nbytes, checksum = c
            if (type(off) is not int or type(nbytes) is not int or type(checksum) is not int
                    or not (0 <= off <= MAX_INT and 0 <= nbytes <= MAX_INT and 0 <= checksum <= MAX_JSON_INT)):
                raise FormatError(f"{_where(where)}: chunks must be [offset, nbytes, checksum] of non-negative integers")
            if not fits(full if i < count - 1 else head.last, nbytes):
                size = chunk_elements if i < count - 1 else head.numel - i * chunk_elements
                raise FormatError(f"{_where(where)}: chunk {i} stores {nbytes} bytes, which cannot decode to "
                                  f"{size * head.itemsize} bytes with codecs {head.chain.ids()}")
            parsed.append(_chunk(Chunk, c))
        ref = _new(cls)  # the checked fields as they are
        _set(ref, "_head", head)
        _set(ref, "chunks", tuple(parsed))
        return ref


#: checked array headers (``_header_key`` -> ``_check_header``'s answer)
_HEADERS: dict[tuple, _Header] = {}


def _header_key(dtype: Any, shape: Any, codecs: Any, chunk_elements: Any) -> tuple | None:
    """A key for an array header that tells apart every value JSON can give (``3`` from ``3.0``
    and ``True``): one flat tuple, the shape and each codec's items counted before them, each item
    as ``_item_key`` gives it; None when the header is not of the plain types (its checks then
    run uncached and say what is wrong)."""
    if (type(dtype) is not str or type(shape) is not list or type(codecs) is not list
            or type(chunk_elements) is not int):
        return None
    for x in shape:
        if type(x) is not int:
            return None
    key = [dtype, chunk_elements, len(shape), *shape]
    for c in codecs:
        if type(c) is not dict:
            return None
        key.append(len(c))
        for k, v in c.items():
            t = type(v)
            if t is str or t is int:
                key += (k, v)
            else:
                key += (k, t, v)
    return tuple(key)


def _check_header(dtype: Any, shape: Any, codecs: Any, chunk_elements: Any) -> _Header:
    """Check an array header; returns what refs of this header share (``_Header``). FormatError,
    ValueError or TypeError says what is wrong."""
    element(dtype)
    shape = check_shape(shape)
    if not isinstance(codecs, list) or len(codecs) > MAX_CHAIN:
        raise ValueError(f"a codec chain is a list of at most {MAX_CHAIN} codecs")
    check_chunk_elements(chunk_elements)
    check_chunk_bytes(chunk_elements, shape, dtype)
    key = _codec_key(codecs)
    # not a list of flat dicts: from_configs says what is wrong
    chain = _codecs.Chain.from_configs(list(codecs)) if key is None else _chain(key)
    isz = itemsize(dtype)
    for c in chain.codecs:
        if isinstance(c, _codecs.ByteGroup) and c.itemsize != isz:
            raise FormatError(f"bytegroup itemsize {c.itemsize} for {dtype} elements")
        if isinstance(c, _codecs.BitPack) and dtype != "bool":  # spec §5: bits of bool arrays only
            raise FormatError(f"bitpack for {dtype} elements (it packs bool arrays only)")
    n = numel(shape)
    count = -(-n // chunk_elements)
    # each chunk's stored size must be able to hold its decoded size (``Chain.fits``): the sizes
    # the last codec sees for a full chunk and for the last one, worked out once per header
    sizes = [chunk_elements * isz, (n - (count - 1) * chunk_elements) * isz]
    for c in chain.codecs[:-1]:
        sizes = [c.encoded_size(x) for x in sizes]
    fits = chain.codecs[-1].fits if chain.codecs else int.__eq__
    # the refs that share this header share its configs (copies: the manifest's own are let go)
    return _Header(dtype, shape, tuple(dict(c) for c in codecs), chunk_elements, chain, n, isz, count, fits,
                   sizes[0], sizes[1])
