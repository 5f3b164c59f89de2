"""The container: header, aligned chunked sections, a JSON manifest and a fixed footer.

This module knows bytes, arrays and checksums; it knows nothing about tasks or merging. The layout
(normative in ``spec/FORMAT.md``)::

    header   16 B   b"TALLPACK", u16 major, u16 minor, u32 reserved (0)
    chunks          each stored chunk starts at a multiple of ``alignment`` (zero padding between)
    manifest        UTF-8 JSON, zstd-compressed when footer flag bit 0 is set
    footer   32 B   u64 manifest offset, u64 manifest length, u32 crc32(manifest bytes),
                    u32 flags, b"TALLPEND"

All integers are little-endian. The writer streams: sections are written as they come and the
manifest, which indexes them, goes last.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import struct
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from concurrent.futures import wait as _wait
from contextlib import contextmanager
from operator import attrgetter, itemgetter
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple, NoReturn, cast

import numpy as np
import zstandard

from . import codecs as _codecs
from . import kernels
from .arrays import (DEFAULT_CHUNK_ELEMENTS, ArrayRef, Chunk, check_chunk_bytes,
                     check_chunk_elements, check_shape)
from .checksums import DEFAULT_CHECKSUM, checksum_function, crc32
from .elements import itemsize, numel
from .errors import (ArchiveClosedError, FormatError, IntegrityError, InvalidArgumentError, RemoteError, TallpackError,
                     UnsupportedVersionError)
from .fsutil import commit, left_behind, signals_held, temp_beside
from .memory import empty, settle
from .limits import (MAX_DEPTH, MAX_JSON_INT, MAX_MANIFEST_BYTES, MAX_NUMBER_CHARS, MIN_JSON_INT,
                     max_manifest_bytes)
from .storage import ByteSource

log = logging.getLogger(__name__)

MAGIC = b"TALLPACK"
END_MAGIC = b"TALLPEND"
#: The format version this reader implements (it reads every minor of this major).
MAJOR, MINOR = 1, 14
#: The minor version that introduced each optional feature (a checksum, a codec id, ...): a writer
#: writes the lowest minor version that covers the features it uses (spec §8).
FEATURE_MINOR: dict[str, int] = {"checksum:crc32": 0, "checksum:xxh3-64": 1, "codec:zstd": 0, "codec:bytegroup": 0,
                                 "codec:bitpack": 0, "field:exact": 2, "codec:planes": 3, "field:files": 4,
                                 "field:correction": 5, "encoding:tall-derived": 6, "encoding:qtau": 7,
                                 "encoding:tall-derived-merged": 8, "codec:bitsplit": 9, "codec:planes-exp": 11,
                                 "field:members": 12, "field:shared-base": 13,
                                 "field:aliases": 14}


def format_version(features: set[str] | frozenset[str]) -> tuple[int, int]:
    """The version a writer of these features writes, e.g. ``{"checksum:xxh3-64"} -> (1, 1)``."""
    return MAJOR, max((FEATURE_MINOR[f] for f in features), default=0)
HEADER = struct.Struct("<8sHHI")
FOOTER = struct.Struct("<QQII8s")
#: how far from its end a file whose last bytes are no footer is searched for one (bytes appended)
APPENDED_SEARCH = 1 << 20
#: how many footers found there have their manifest's CRC-32 checked: the last ones (a hostile tail
#: of many footers, each naming a manifest of up to MAX_MANIFEST_BYTES, would otherwise cost a pass
#: over the file for each)
APPENDED_CHECKS = 4
FLAG_MANIFEST_ZSTD = 1
ALIGNMENT = 64

#: A remote array is fetched in windows of at most this many stored bytes.
PREFETCH_BYTES = 64 << 20
#: A chunk of a larger array (which no batch prefetches) read from a remote source and not fetched
#: yet is fetched with the next ones (and the same chunks of the arrays read beside it: a rebuild's
#: base and merged vector), to this many stored bytes, and the next window in the background once
#: half of this one is read (``ContainerReader.read_ahead``). Before, each chunk was one request,
#: ``threads`` at a time, one after another: a 25M-element fp32 embedding (150 MB of base, merged
#: vector and mask) took 2.35 s far away (20 ms a request, 50 MB/s a connection), now 0.53 s; its
#: ``verify`` 2.94 -> 0.99 s. 16 MiB read it as fast (0.47 s; its rows of two chunks, 24 MB, are
#: larger than either window), but checked it one array at a time slower (1.20 s); 64 MiB was no
#: faster (0.55, 1.08 s) with more in flight. ``benchmarks/rounds/r37/remote_large.py --grid``.
READ_AHEAD_BYTES = 32 << 20
#: The requests a read-ahead window goes as are at most this large (a chunk larger is fetched in
#: pieces, joined): 8 of them a window, on as many connections at once. With MAX_REQUEST's 8 MiB
#: the embedding above took 0.76 s (verify 1.25), with 2 MiB 0.60 s (1.01).
READ_AHEAD_REQUEST = 4 << 20
__all__ = ["ArrayRef", "Chunk", "ContainerReader", "ContainerWriter", "DEFAULT_CHUNK_ELEMENTS", "check_json",
           "FEATURE_MINOR", "FOOTER", "HEADER", "MAJOR", "MINOR", "ReadingThreads", "reading_threads"]


class ContainerWriter:
    """Writes a container to a temporary file beside ``path``; ``finish`` renames it into place.

    Use as a context manager: leaving the block on an exception removes the temporary file, so a
    failed write never leaves a partial archive under the final name.
    """

    def __init__(self, path: str | os.PathLike, *, threads: int | None = None,
                 checksum: str = DEFAULT_CHECKSUM, features: frozenset[str] = frozenset(),
                 overwrite: bool = True):
        self.path = Path(path)
        self.overwrite = overwrite
        if self.path.is_dir():
            raise InvalidArgumentError(f"{self.path}: is a directory; give the archive's file name")
        parent = self.path.parent
        if not parent.is_dir():
            raise InvalidArgumentError(f"{parent}: output folder does not exist")
        self.checksum_name = checksum
        self._checksum = checksum_function(checksum)
        #: the lowest version whose features this archive uses (spec §8)
        self.version = format_version({f"checksum:{checksum}", *features})
        tmp: Path | None = None
        f: BinaryIO | None = None
        try:
            with signals_held():  # the temporary and its file object made together (a signal: after)
                fd, tmp = temp_beside(self.path)
                f = os.fdopen(fd, "wb")
            self._tmp, self._f = tmp, f
            f.write(HEADER.pack(MAGIC, *self.version, 0))
            self._pos = HEADER.size
            self._pool = ThreadPoolExecutor(threads or kernels.default_threads())
        except BaseException:  # no writer to abort yet: its temporary goes here
            if f is not None:
                f.close()
            if tmp is not None:
                tmp.unlink(missing_ok=True)
            raise
        #: chunks being encoded, each with where its result goes, in the order they are written
        self._queue: deque[tuple[Callable[[Encoded], None], Future]] = deque()
        self._done = False

    def use(self, feature: str) -> None:
        """Record a feature chosen while writing (a codec an array was stored with, the fidelity
        dial's choices); the header's version is rewritten by ``finish``."""
        self.version = max(self.version, format_version({feature}))

    def __enter__(self) -> "ContainerWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._done:
            self.abort()

    def _write(self, data) -> int:
        pad = -self._pos % ALIGNMENT
        if pad:
            self._f.write(b"\0" * pad)
            self._pos += pad
        offset = self._pos
        self._f.write(data)
        self._pos += len(data)
        return offset

    def encode(self, jobs: list[tuple[_codecs.Chain, memoryview]]) -> list[Encoded]:
        """Encode several chunks in parallel (zstd and numpy release the GIL)."""
        return [f.result() for f in self.submit(jobs)]

    def submit(self, jobs: list[tuple[_codecs.Chain, memoryview]]) -> list[Future]:
        """Start encoding chunks in the background, each checksummed there too; write each
        result, in order, with ``ArrayBuilder.add(future.result())``. The inputs must stay
        unchanged until then."""
        return [self._pool.submit(self._encoded, chain, data) for chain, data in jobs]

    def queue(self, add: Callable[[Encoded], None], future: Future) -> None:
        """Queue a chunk being encoded (``submit``) for ``add`` (``ArrayBuilder.queued``): queued
        chunks are written in the order they were queued, by ``drain``, or before anything else is
        written (``ArrayBuilder.add``, ``mark``, ``finish``...), so a writer can go on to its next
        tensor while the last one's chunks are still being encoded."""
        self._queue.append((add, future))

    def drain(self, leave: int = 0) -> None:
        """Write queued chunks, first queued first, until ``leave`` (the most recent) are left."""
        while len(self._queue) > leave:
            add, future = self._queue.popleft()
            add(future.result())

    def _encoded(self, chain: _codecs.Chain, data: memoryview) -> Encoded:
        stored = chain.encode(data)
        return Encoded(stored, self._checksum(stored))

    def begin_array(self, dtype: str, shape: tuple[int, ...], chain: _codecs.Chain,
                    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> "ArrayBuilder":
        """Start an array whose encoded chunks are then written in order with ``add``."""
        return ArrayBuilder(self, dtype, tuple(shape), chain, chunk_elements)

    def write_array(self, data: memoryview, dtype: str, shape: tuple[int, ...], chain: _codecs.Chain,
                    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> ArrayRef:
        """Encode ``data`` (the array's raw bytes) chunk by chunk and write it; returns its ref."""
        builder = self.begin_array(dtype, shape, chain, chunk_elements)
        step = chunk_elements * itemsize(dtype)
        if len(data) != builder.numel * itemsize(dtype):
            raise ValueError(f"{len(data)} bytes do not hold {shape} {dtype}")
        pieces = [data[i : i + step] for i in range(0, len(data), step)]
        for encoded in self.encode([(chain, p) for p in pieces]):
            builder.add(encoded)
        return builder.finish()

    def mark(self) -> tuple[int, tuple[int, int]]:
        """Where the file ends now (and the version so far), for ``rewind``."""
        self.drain()
        return self._pos, self.version

    def rewind(self, mark: tuple[int, tuple[int, int]]) -> None:
        """Drop everything written since ``mark`` (no chunk may be in flight): the fidelity
        dial's budget writes its tensors again once it knows what the archive really costs."""
        self.drain()
        self._f.flush()
        self._pos, self.version = mark[0], mark[1]
        self._f.seek(self._pos)
        self._f.truncate()

    def _serialized(self, manifest: dict[str, Any]) -> bytes:
        try:
            return json.dumps(manifest, separators=(",", ":"), allow_nan=False).encode()
        except (ValueError, TypeError) as e:  # NaN/Infinity (metadata is checked before: a last guard)
            raise InvalidArgumentError(f"{self.path}: the manifest cannot be stored: {e}") from None

    def _stored_manifest(self, manifest: dict[str, Any] | None, raw: bytes | None = None) -> tuple[bytes, int]:
        if raw is None:
            assert manifest is not None
            raw = self._serialized(manifest)
        if len(raw) > MAX_MANIFEST_BYTES:
            raise InvalidArgumentError(f"{self.path}: manifest of {len(raw)} bytes exceeds the format's "
                                       f"limit of {MAX_MANIFEST_BYTES} (too much metadata?)")
        stored, flags = zstandard.ZstdCompressor(level=9).compress(raw), FLAG_MANIFEST_ZSTD
        offset = self._pos + -self._pos % ALIGNMENT
        if len(raw) > max_manifest_bytes(offset + len(stored) + FOOTER.size):
            stored, flags = raw, 0  # compresses too well for a reader's bound (spec §7): store it as is
        return stored, flags

    def size_with(self, manifest: dict[str, Any]) -> int:
        """The file's size in bytes if it were finished now with ``manifest``."""
        self.drain()
        return self._pos + -self._pos % ALIGNMENT + len(self._stored_manifest(manifest)[0]) + FOOTER.size

    def finish(self, manifest: dict[str, Any], check: Callable[[Any], object] | None = None) -> Path:
        """Write the manifest and footer, then atomically rename the file to its final name;
        ``check`` (the reader's parse of a manifest) is given the manifest as a reader parses it."""
        self.drain()
        raw = self._serialized(manifest)
        del manifest  # only its bytes from here: a large family's manifest is not held twice while parsed
        try:  # the last guard: never an archive that no reader opens (spec §7); nothing is renamed
            parsed = _strict_loads(raw.decode("utf-8"))
        except (ValueError, RecursionError) as e:
            raise InvalidArgumentError(f"{self.path}: not written: its manifest would not be valid JSON "
                                       f"for readers ({str(e)[:200]})") from None
        if check is not None:
            try:
                check(parsed)
            except FormatError as e:
                raise InvalidArgumentError(f"{self.path}: not written: readers would refuse its manifest "
                                           f"({str(e)[:200]})") from None
        del parsed
        stored, flags = self._stored_manifest(None, raw)
        offset = self._write(stored)
        self._f.write(FOOTER.pack(offset, len(stored), crc32(stored), flags, END_MAGIC))
        self._f.seek(0)  # the version may have grown with features chosen while writing (``use``)
        self._f.write(HEADER.pack(MAGIC, *self.version, 0))
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        self._pool.shutdown()
        with signals_held():  # renamed and marked done together
            commit(self._tmp, self.path, overwrite=self.overwrite)
            self._done = True
        log.info("wrote %s (%d bytes)", self.path, self._pos + FOOTER.size)
        return self.path

    def abort(self) -> None:
        with signals_held():  # a second Ctrl-C while the encoders finish does not leave the temporary
            self._done = True
            self._queue.clear()
            try:
                self._tmp.unlink(missing_ok=True)  # first: the running encoders only hand back bytes
            except OSError as e:  # its folder made read-only meanwhile
                left_behind([self._tmp], e)
            try:
                self._f.close()  # flushes its buffer: on a full disk that fails again, after the unlink
            except OSError:
                pass
            self._pool.shutdown(cancel_futures=True)


class Encoded(NamedTuple):
    """A chunk as stored, and its checksum, both made on an encoding thread (``submit``)."""

    data: bytes | memoryview
    checksum: int


class ArrayBuilder:
    """An array being written chunk by chunk (chunks of several arrays may interleave)."""

    def __init__(self, writer: ContainerWriter, dtype: str, shape: tuple[int, ...],
                 chain: _codecs.Chain, chunk_elements: int):
        check_chunk_elements(chunk_elements)
        check_chunk_bytes(chunk_elements, shape, dtype)
        try:
            check_shape(shape)
        except ValueError as e:
            raise InvalidArgumentError(f"cannot store a tensor of shape {shape}: {e}") from None
        self._writer = writer
        self.dtype, self.shape, self.chain, self.chunk_elements = dtype, shape, chain, chunk_elements
        self.numel = numel(shape)
        self._chunks: list[Chunk] = []

    def add(self, encoded: bytes | memoryview | Encoded) -> None:
        """Write the array's next chunk as stored (its checksum computed here unless given), after
        the chunks queued before it (``ContainerWriter.queue``)."""
        self._writer.drain()
        self.queued(encoded)

    def queued(self, encoded: bytes | memoryview | Encoded) -> None:
        """``add`` for a chunk the writer's queue hands over (``ContainerWriter.drain``)."""
        data, checksum = encoded if isinstance(encoded, Encoded) else (encoded, self._writer._checksum(encoded))
        self._chunks.append(Chunk(self._writer._write(data), len(data), checksum))

    def finish(self) -> ArrayRef:
        """The array's ref, once every chunk is written (queued ones: after ``drain``)."""
        ref = ArrayRef(self.dtype, self.shape, tuple(self.chain.configs()), self.chunk_elements,
                       tuple(self._chunks))
        if len(self._chunks) != -(-self.numel // self.chunk_elements):
            raise ValueError(f"array of {self.numel} elements got {len(self._chunks)} chunks")
        for codec_id in self.chain.ids():  # the version covers the codecs actually stored
            self._writer.use(f"codec:{codec_id}")
        return ref


def _decompress_manifest(stored: memoryview, name: str, limit: int) -> bytes:
    try:
        announced = zstandard.frame_content_size(stored)
        if announced < 0:
            raise FormatError(f"{name}: manifest frame has no size")
        if announced > limit:
            raise FormatError(f"{name}: manifest frame announces {announced} bytes; a file of this size "
                              f"may hold at most {limit} (spec §7)")
        dobj = zstandard.ZstdDecompressor().decompressobj()
        raw = dobj.decompress(stored)
    except zstandard.ZstdError as e:
        raise FormatError(f"{name}: manifest cannot be decompressed: {e}") from None
    if not dobj.eof or dobj.unused_data or len(raw) != announced:
        raise FormatError(f"{name}: manifest frame is truncated or followed by other bytes")
    return raw


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("duplicate key in a JSON object")
    return out


def _no_constants(token: str):
    raise ValueError(f"{token} is not allowed")


def _int(text: str) -> int:
    if len(text) > MAX_NUMBER_CHARS:
        raise ValueError(f"integer of {len(text)} digits")
    v = int(text)
    if not MIN_JSON_INT <= v <= MAX_JSON_INT:
        raise ValueError(f"integer {v} outside [-2**63, 2**64)")
    return v


def _float(text: str) -> float:
    if len(text) > MAX_NUMBER_CHARS:
        raise ValueError(f"number of {len(text)} characters")
    v = float(text)
    if v in (float("inf"), float("-inf")):
        raise ValueError(f"number {text} overflows a float")
    return v


def _check_values(value: Any, numbers: bool) -> None:
    """Containers nest at most MAX_DEPTH deep (so nothing that walks the manifest later recurses
    deeply), and, when ``numbers``, every integer lies in [-2**63, 2**64) and every float is
    finite; one pass over the parsed containers, level by level."""
    level = [value] if isinstance(value, (dict, list)) else []
    for _ in range(MAX_DEPTH):
        deeper = []
        for v in level:
            for c in (v.values() if type(v) is dict else v):
                t = type(c)
                if t is dict or t is list:
                    deeper.append(c)
                elif not numbers:
                    continue
                elif t is int:
                    if not MIN_JSON_INT <= c <= MAX_JSON_INT:
                        raise ValueError(f"integer {str(c)[:40]} outside [-2**63, 2**64)")
                elif t is float and c in _INFINITIES:
                    raise ValueError("a number overflows a float")
        if not deeper:
            return
        level = deeper
    raise ValueError(f"containers nest deeper than {MAX_DEPTH}")


_INFINITIES = (float("inf"), float("-inf"))


def _bounded_int_parsing() -> bool:
    """Whether Python itself refuses integers of more than a few thousand digits (its default,
    ``sys.get_int_max_str_digits``), so that parsing one costs next to nothing and the range can
    be checked after parsing; with the limit turned off the parser's hooks refuse long numbers
    unparsed."""
    limit = getattr(sys, "get_int_max_str_digits", lambda: 0)()
    return 0 < limit <= 10_000


def _check(value: Any, numbers: bool) -> None:
    """``_check_values``, compiled when the kernels are (``_kernels.json_check``: the same verdicts)."""
    if kernels.json_check is not None:
        kernels.json_check(value, numbers, MAX_DEPTH)
    else:
        _check_values(value, numbers)


def _strict_loads(text: str) -> Any:
    """``text`` parsed as the manifest's strict JSON (``_parse_manifest``); ValueError or
    RecursionError says what breaks it."""
    pairs = kernels.json_pairs or _no_duplicates
    if _bounded_int_parsing():  # numbers checked after parsing (one hook call fewer per number)
        try:
            value = json.loads(text, object_pairs_hook=pairs, parse_constant=_no_constants)
        except ValueError as e:  # Python's own refusal of a huge integer, in the reader's words
            digits = re.search(r"value has (\d+) digits", str(e))
            if digits is None:
                raise
            raise ValueError(f"integer of {digits[1]} digits (integers lie in [-2**63, 2**64))") from None
        _check(value, numbers=True)
    else:
        value = json.loads(text, object_pairs_hook=pairs, parse_constant=_no_constants,
                           parse_int=_int, parse_float=_float)
        _check(value, numbers=False)
    # A lone surrogate can only come from a \uD800-\uDFFF escape (the UTF-8 decoder refuses encoded
    # ones): it is no Unicode character, and a name holding one cannot be written to a safetensors
    # header or a file name (spec §3). Only a text holding such an escape needs the walk.
    if "\\ud" in text or "\\uD" in text:
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as e:
            bad = e.object[e.start : e.end] if isinstance(e.object, str) else ""
            raise ValueError(f"a string holds a lone surrogate {ascii(bad)}, which is no Unicode "
                             "character (not UTF-8 text)") from None
    return value


def _parse_manifest(raw: bytes | memoryview, name: str) -> Any:
    """Strict JSON: UTF-8 with no lone surrogate escapes, no duplicate keys, no NaN/Infinity,
    numbers within int64 and finite floats, bounded nesting. The duplicate-key hook and the walk
    run compiled when the kernels are (a 480-tensor family's manifest: 22 against 9 ms,
    BENCHMARKS.md)."""
    try:
        return _strict_loads(bytes(raw).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise FormatError(f"{name}: manifest is not valid JSON: {str(e)[:200]}") from None


def check_json(value: Any, at: int = 0) -> None:
    """ValueError, saying what, unless ``value`` serializes to JSON that a reader's strict parser
    takes back (spec §3, §7): no NaN or Infinity, integers in [-2**63, 2**64), nesting at most 64,
    no lone surrogate in a string. Writers check what users give (metadata, a folder's
    config.json) with it before it goes into a manifest, ``at`` containers deep in it (the value
    of a key of the top-level ``metadata``: 2).

    >>> check_json({"x": 2**70})
    Traceback (most recent call last):
    ValueError: integer 1180591620717411303424 outside [-2**63, 2**64)
    """
    for _ in range(at):  # nesting counts from the manifest's top
        value = [value]
    try:
        text = json.dumps(value, allow_nan=False)
    except ValueError as e:
        if "circular" in str(e).lower():
            raise ValueError("it refers to itself (a circular reference)") from None
        raise ValueError("NaN or Infinity cannot be stored in the manifest (spec §3)") from None
    except TypeError as e:
        raise ValueError(str(e)) from None
    except RecursionError:
        raise ValueError(f"containers nest deeper than {MAX_DEPTH}") from None
    try:
        _strict_loads(text)
    except RecursionError:
        raise ValueError(f"containers nest deeper than {MAX_DEPTH}") from None
    try:  # a surrogate pair as two code points passes the parse, and reads back as one other character
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"a string holds {e.object[e.start:e.end]!r}: surrogates, which are no Unicode "
                         "characters (not UTF-8 text)") from None


#: The dtypes a reader may take as byte planes (``read_planar``), with their element sizes.
PLANAR_DTYPES = {"float32": 4, "bfloat16": 2, "float16": 2}

#: an array ref's chunks; a flattening of iterables (``check_layout``)
_chunks, _flat = attrgetter("chunks"), itertools.chain.from_iterable


_span_start = itemgetter(0, 1)


class ContainerReader:
    """Reads a container from a :class:`ByteSource`, trusting nothing in it.

    Opening checks the magic, the version, the footer and the manifest's checksum; every chunk's
    checksum is checked when it is read.
    """

    def __init__(self, source: ByteSource, name: str):
        self.source = source
        self.name = name
        # Chunks of a local file are checked the first time they are read while it is open (spec
        # §1); a remote source fetches its bytes anew for every read, so they are checked every time.
        self._remember_checked = bool(getattr(source, "check_once", False))
        self._checked: set[tuple[int, int, int]] = set()
        #: a remote source's (``RemoteFile.held``), for ``read_ahead``; None for a local file
        self._held: Callable[[int, int], bool] | None = getattr(source, "held", None)
        #: whether chunks are read ahead (``read_ahead``): a remote source
        self.remote = self._held is not None
        size = source.size
        if size < HEADER.size + FOOTER.size:
            self._not_tallpack(size)
        head = bytes(source.read(0, HEADER.size))
        magic, major, minor, reserved = HEADER.unpack(head)
        if magic != MAGIC:
            self._not_tallpack(size)
        if major != MAJOR:
            raise UnsupportedVersionError(
                f"{name}: format version {major}.{minor}; this tallpack reads {MAJOR}.x, upgrade it"
            )
        if reserved:
            raise UnsupportedVersionError(f"{name}: header field 'reserved' is set; a newer tallpack may read it")
        self.version = (major, minor)
        foot = bytes(source.read(size - FOOTER.size, FOOTER.size))
        m_off, m_len, m_crc, flags, end = FOOTER.unpack(foot)
        if end != END_MAGIC or (m_off + m_len != size - FOOTER.size and not flags & ~FLAG_MANIFEST_ZSTD):
            self._appended(size)
        if end != END_MAGIC:
            raise IntegrityError(f"{name}: footer missing (truncated or damaged archive)")
        self.data_end = m_off
        if flags & ~FLAG_MANIFEST_ZSTD:
            raise UnsupportedVersionError(f"{name}: unknown footer flags {flags:#x}; a newer tallpack may read it")
        if m_off < HEADER.size or m_off + m_len != size - FOOTER.size:
            raise IntegrityError(f"{name}: manifest offsets do not match the file size (truncated or damaged)")
        if m_len > MAX_MANIFEST_BYTES:
            raise FormatError(f"{name}: manifest of {m_len} bytes exceeds the limit")
        stored = source.read(m_off, m_len)
        if crc32(stored) != m_crc:
            raise IntegrityError(f"{name}: manifest checksum mismatch (damaged archive)")
        self._ends = (head, foot)  # for verify_ends
        raw: bytes | memoryview = stored
        if flags & FLAG_MANIFEST_ZSTD:
            raw = _decompress_manifest(stored, name, max_manifest_bytes(size))
        manifest = _parse_manifest(raw, name)
        if not isinstance(manifest, dict):
            raise FormatError(f"{name}: manifest is not a JSON object")
        self.manifest: dict[str, Any] = manifest
        self.checksum = checksum_function(manifest.get("checksum", "crc32"))
        #: the arrays ``register`` records (for ``verify_padding`` too), and their names until
        #: ``check_layout``
        self._refs: list[ArrayRef] = []
        self._wheres: list[str | tuple[str, str]] = []

    def take_manifest(self) -> dict[str, Any]:
        """The parsed manifest, handed over once: the reader keeps what it builds from it, and a
        large family's parsed JSON (hundreds of thousands of objects) would otherwise stay for
        every later pass of the garbage collector to walk."""
        manifest, self.manifest = self.manifest, {}
        return manifest

    def _appended(self, size: int) -> None:
        """Raise if the file is an archive with bytes after its footer (a download resumed over a
        whole one, ``cat >>``): the last footer in its last MiB whose manifest checks out."""
        start = max(HEADER.size, size - APPENDED_SEARCH)
        tail = bytes(self.source.read(start, size - start))
        at = tail.rfind(END_MAGIC, 0, len(tail) - 1)
        checks = APPENDED_CHECKS
        while at >= FOOTER.size - len(END_MAGIC) and checks:
            end = start + at + len(END_MAGIC)
            m_off, m_len, m_crc, flags, _ = FOOTER.unpack(tail[at + len(END_MAGIC) - FOOTER.size:at + len(END_MAGIC)])
            if HEADER.size <= m_off and m_off + m_len == end - FOOTER.size and m_len <= MAX_MANIFEST_BYTES \
                    and not flags & ~FLAG_MANIFEST_ZSTD:
                checks -= 1
                if crc32(self.source.read(m_off, m_len)) == m_crc:
                    raise IntegrityError(f"{self.name}: {size - end} bytes after the archive's footer, which ends at "
                                         f"byte {end} (appended to it?); the archive before them is whole if nothing "
                                         "else is damaged")
            at = tail.rfind(END_MAGIC, 0, at)

    def _not_tallpack(self, size: int):
        raise FormatError(f"{self.name}: not a tallpack archive ({size} bytes, no TALLPACK header)")

    def register(self, ref: ArrayRef, where: str | tuple[str, str]) -> None:
        """Record an array's chunk spans; ``check_layout`` then checks them against each other.
        ``where`` names the array, or is a pair (tensor, key) formatted only for an error."""
        self._refs.append(ref)
        self._wheres.append(where)

    def _spans(self) -> list[Chunk]:
        """Every registered chunk, sorted by offset, then size (then checksum)."""
        return sorted(_flat(map(_chunks, self._refs)))  # the chunks themselves: no tuple made per chunk

    def check_layout(self) -> None:
        """Every chunk lies in the data area, and no two overlap. The chunks are sorted as they
        are (nearly in file order already: fast), and the names let go once checked (an archive
        of 64,000 task entries has as many chunks)."""
        end, data_end = HEADER.size, self.data_end
        for off, n, _ in self._spans():
            if off < end or off + n > data_end:
                self._refuse_layout()
            end = off + n
        self._wheres = []

    def _refuse_layout(self) -> NoReturn:
        """The first chunk out of place, named as the check chunk by chunk names it: spans sorted by
        offset and size alone, stably, in the order the manifest lists their arrays (of two chunks
        copied to one place, the later entry's, which is the one a tampered manifest changed)."""
        spans = sorted(((c.offset, c.nbytes, i) for i, ref in enumerate(self._refs) for c in ref.chunks),
                       key=_span_start)
        end = HEADER.size
        for off, n, i in spans:
            if off < end or off + n > self.data_end:
                where = self._wheres[i]
                if not isinstance(where, str):
                    where = f"tensor {where[0]!r} ({where[1]})"
                raise FormatError(f"{self.name}: {where}: chunk at {off} overlaps another or the manifest")
            end = off + n
        raise AssertionError("a layout refused that the chunk-by-chunk check accepts")

    def verify_ends(self) -> list[str]:
        """The header, footer and manifest read again: as they were at open, and the manifest's
        checksum right (a file damaged or cut in place since, which the open archive does not
        read again, would not open again). A remote source first drops the ranges it kept from
        earlier reads (``RemoteFile.forget``): ``verify`` checks the bytes the server has now."""
        forget = getattr(self.source, "forget", None)
        if forget is not None:
            forget()
        try:
            size = self.source.size
            now = getattr(self.source, "current_size", None)
            if now is not None and now() != size:  # grown (appended to) or cut since it was opened
                return [f"{self.name}: the file is {now()} bytes, {size} when it was opened; it was changed in place"]
            head, foot = bytes(self.source.read(0, HEADER.size)), bytes(self.source.read(size - FOOTER.size, FOOTER.size))
            if (head, foot) != self._ends:
                return [f"{self.name}: {'header' if head != self._ends[0] else 'footer'} changed since the archive "
                        "was opened (damaged or replaced in place)"]
            m_off, m_len, m_crc, _, _ = FOOTER.unpack(foot)
            if crc32(self.source.read(m_off, m_len)) != m_crc:
                return [f"{self.name}: manifest checksum mismatch (damaged archive)"]
        except (ArchiveClosedError, RemoteError):  # not damage: verify cannot say, and fails
            raise
        except TallpackError as e:
            return [str(e)]
        return []

    def verify_padding(self) -> list[str]:
        """Bytes that no chunk covers (alignment padding) must be zero: no hidden data. Read up to
        PREFETCH_BYTES of gaps at a time (``read_many``: a remote source fetches them concurrently,
        not one request after another, a round trip each)."""
        gaps, end = [], HEADER.size
        for off, n, _ in [*self._spans(), (self.data_end, 0, 0)]:  # the manifest last
            if off > end:
                gaps.append((end, off - end))
            end = max(end, off + n)
        problems, batch, size = [], [], 0
        for i, (off, n) in enumerate(gaps):
            batch.append((off, n))
            size += n
            if i + 1 < len(gaps) and size + gaps[i + 1][1] <= PREFETCH_BYTES:
                continue
            for (at, k), got in zip(batch, self.source.read_many(batch)):
                if any(got):
                    problems.append(f"{self.name}: nonzero bytes in the padding at {at}..{at + k}")
            batch, size = [], 0
        return problems

    def read_chunk(self, ref: ArrayRef, i: int, where: str, out: memoryview | None = None, *,
                   recheck: bool = False, ahead: bool = False) -> bytes | bytearray | memoryview:
        """Chunk ``i`` of ``ref``, checked and decoded (into ``out`` when given: writable, the
        chunk's decoded size). A local file's chunk is checked once while open, unless ``recheck``
        (``verify``). ``ahead``: the chunks after it are read next (a remote source reads them
        ahead: ``read_ahead``)."""
        if ahead and self._held is not None:
            self.read_ahead((ref,), i, where, len(ref.chunks))
        stored = self._stored(ref, i, where, recheck)
        try:
            return ref.chain.decode(stored, ref.chunk_numel(i) * itemsize(ref.dtype), out)
        except FormatError as e:
            raise type(e)(f"{self.name}: {where}: chunk {i}: {e}") from None

    def read_planar(self, ref: ArrayRef, i: int, where: str, slot: str | None = None,
                    known: list[np.ndarray | None] | None = None, cheap: bool = False,
                    ahead: Sequence[ArrayRef] = ()) -> tuple[list[np.ndarray | None], int]:
        """Chunk ``i`` of a float32, bfloat16 or float16 array stored as byte planes of its elements
        (``ref.chain.planar_itemsize``), checked, as its planes and their rotation (``Chain.planar``;
        ``slot``: the thread's buffers that compressed planes are decoded into, None for fresh ones;
        ``known``: planes decoded by an earlier call, or None each; ``cheap``: nearly empty planes
        left undecoded, None; ``ahead``: ``ref`` and the arrays whose chunks are read beside its own,
        every chunk after this one read next: a remote source reads them ahead, ``read_ahead``)."""
        if ahead and self._held is not None:
            self.read_ahead(ahead, i, where, len(ref.chunks))
        stored = self._stored(ref, i, where)
        try:
            got = ref.chain.planar(stored, ref.chunk_numel(i) * itemsize(ref.dtype), slot, known, cheap)
        except FormatError as e:
            raise type(e)(f"{self.name}: {where}: chunk {i}: {e}") from None
        if got is None or PLANAR_DTYPES.get(ref.dtype) != ref.chain.planar_itemsize:
            raise ValueError(f"{where}: not a float32, bfloat16 or float16 array of byte planes")  # a caller's bug
        return got

    def planar_kept(self, ref: ArrayRef, i: int, where: str, known: list[np.ndarray | None] | None = None,
                    cheap: bool = False) -> int:
        """The bytes ``read_planar(ref, i, where, None, known, cheap)`` would decode into arrays of
        their own, from the chunk's plane lengths (checked against the chunk's size), without
        decoding it. The chunk's checksum is not checked here (``read_planar`` checks it): the
        answer only sizes what a cache keeps, and reading it costs a page of a mapped file, not
        a pass over the chunk."""
        c = ref.chunks[i]
        stored = self.source.read(c.offset, c.nbytes)
        codec = ref.chain.codecs[0] if ref.chain.codecs else None
        if not isinstance(codec, _codecs.Planes):
            raise ValueError(f"{where}: not an array of byte planes")  # a caller's bug
        try:
            return codec.kept_nbytes(stored, ref.chunk_numel(i) * itemsize(ref.dtype), known, cheap)
        except FormatError as e:
            self._stored(ref, i, where)  # a damaged chunk says so (IntegrityError), before what it garbles
            raise type(e)(f"{self.name}: {where}: chunk {i}: {e}") from None

    def read_bits(self, ref: ArrayRef, where: str, into: memoryview, chunks: range | None = None) -> memoryview:
        """A bool array stored bit-packed (``Chain.bits_chain``), decoded only to its packed bits, into
        ``into`` (writable, ceil(numel / 8) bytes): element i in bit i % 8 of byte i // 8, the chunks'
        bits end to end (each chunk but the last holds a multiple of 8 elements: ``chunk_elements``).
        With ``chunks``, only those chunks are read, into their place in ``into``."""
        packed = ref.chain.bits_chain
        if packed is None:
            raise ValueError(f"{where}: not a bit-packed array")  # a caller's bug
        if len(into) != (ref.numel + 7) // 8:
            raise ValueError(f"bits of {ref.numel} elements into a buffer of {len(into)}")
        remote, stop = self._held is not None, len(ref.chunks) if chunks is None else chunks.stop
        for i in range(len(ref.chunks)) if chunks is None else chunks:
            pos, size = i * ref.chunk_elements // 8, (ref.chunk_numel(i) + 7) // 8
            if remote:  # (every chunk from i to stop is read next)
                self.read_ahead((ref,), i, where, stop)
            stored = self._stored(ref, i, where)  # its error names the archive, tensor and chunk already
            try:
                packed.decode(stored, size, into[pos : pos + size])
            except FormatError as e:
                raise type(e)(f"{self.name}: {where}: chunk {i}: {e}") from None
        return into

    def _stored(self, ref: ArrayRef, i: int, where: str, recheck: bool = False) -> memoryview:
        """Chunk ``i``'s stored bytes, its checksum checked (once while open, unless ``recheck``)."""
        c = ref.chunks[i]
        try:  # (no context manager: this runs for every chunk read)
            stored = self.source.read(c.offset, c.nbytes)
        except TallpackError as e:
            raise _named(e, f"{where}, chunk {i}") from None
        key = (c.offset, c.nbytes, c.checksum)
        if recheck or key not in self._checked:
            if self.checksum(stored) != c.checksum:
                why = getattr(self.source, "changed", lambda: None)()  # replaced or written in place while open
                raise IntegrityError(f"{self.name}: {where}: checksum mismatch in chunk {i} "
                                     f"({why or 'damaged archive'})")
            if self._remember_checked:
                self._checked.add(key)
        return stored

    def read_ahead(self, refs: Sequence[ArrayRef], i: int, where: str, stop: int) -> None:
        """Before chunk ``i`` of ``refs[0]`` is read from a remote source, every chunk after it to
        ``stop`` read next, and chunk ``i`` of the other ``refs`` beside it (a rebuild's base and
        merged vector): unless that chunk is fetched or being fetched, fetch it and the same chunk
        of the others, then chunks ``i + 1``, ... of each, to READ_AHEAD_BYTES (these rows of chunks
        at least one); and once the row half that far ahead is not fetched, fetch it and the next
        rows, as much again, in the background while these decode. Threads reading chunks of the
        arrays at once fetch each window once: the first claims it, and the others' reads wait for
        it (``RemoteFile.prefetch``). A window of one small chunk is left to the read. No hole between the chunks is fetched with them: it holds other
        arrays' chunks (the tasks' masks), which this read fetched or will fetch on their own. A
        local file's callers do not call this (``_held`` is None)."""
        held, source = self._held, cast(Any, self.source)
        if held is None:
            return
        c = refs[0].chunks[i]
        if not held(c.offset, c.nbytes):
            window = _rows(refs, i, stop)
            if len(window) == 1 and c.nbytes <= READ_AHEAD_REQUEST:  # one request either way: read as before
                return
            with _reading(f"{where}, chunk {i}"):
                source.prefetch(window, bridge=0, ahead=True, max_request=READ_AHEAD_REQUEST)
        # the row half a window ahead, rows taken as large as this one (no walk over the rows between)
        j = i + max(1, -(-(READ_AHEAD_BYTES // 2) // max(_row_bytes(refs, i), 1)))
        if j < stop:
            c = refs[0].chunks[j]
            if not held(c.offset, c.nbytes):  # (a failure: the read of chunk j fetches it, and says so)
                source.prefetch(_rows(refs, j, stop), bridge=0, ahead=True, background=True,
                                max_request=READ_AHEAD_REQUEST)

    def prefetch(self, refs: list[ArrayRef], where: str | None = None) -> None:
        """Announce the chunks of ``refs`` as read next: a remote source fetches them together
        (coalesced; larger arrays are fetched in windows by ``read_array``); a local file needs
        nothing. A failed fetch names ``where`` (what they are read for: a tensor, a task)."""
        fetch = getattr(self.source, "prefetch", None)
        if fetch is not None and sum(ref.stored_nbytes for ref in refs) <= PREFETCH_BYTES:
            with _reading(where):
                fetch([(c.offset, c.nbytes) for ref in refs for c in ref.chunks])

    def read_array(self, ref: ArrayRef, where: str, start: int = 0, stop: int | None = None,
                   into: memoryview | None = None) -> bytes | bytearray | memoryview:
        """The decoded bytes of elements ``[start, stop)`` (default: the whole array), reading only
        the chunks that hold them; with ``into`` (writable, exactly the whole array's size), the
        whole array decoded into it."""
        stop = ref.numel if stop is None else stop
        if not 0 <= start <= stop <= ref.numel:
            raise IndexError(f"elements {start}:{stop} of an array of {ref.numel}")
        isz, ce = ref.itemsize, ref.chunk_elements
        if into is not None and ((start, stop) != (0, ref.numel) or len(into) != ref.nbytes):
            raise ValueError(f"decode of {ref.nbytes} bytes into a buffer of {len(into)}")
        if start == stop:
            return memoryview(b"")
        first, last = start // ce, (stop - 1) // ce
        if first == last and into is None:
            piece = self.read_chunk(ref, first, where)
            lo = (start - first * ce) * isz
            return memoryview(piece)[lo : lo + (stop - start) * isz] if (start, stop) != (0, ref.numel) else piece
        # not zeroed: every byte is written (a MemoryError is not the archive's fault: reader.Archive names it)
        out = into if into is not None else empty((stop - start) * isz).data
        pos, ahead = 0, first
        fetch = getattr(self.source, "prefetch", None)
        for i in range(first, last + 1):
            if fetch is not None and i == ahead:  # remote: the next chunks in one go, up to 64 MiB
                window: list[tuple[int, int]] = []
                size = 0
                for c in ref.chunks[i : last + 1]:
                    if window and size + c.nbytes > PREFETCH_BYTES:
                        break
                    window.append((c.offset, c.nbytes))
                    size += c.nbytes
                fetch(window)
                ahead = i + len(window)
            lo = max(start - i * ce, 0) * isz
            hi = (min(stop, (i + 1) * ce) - i * ce) * isz
            if lo == 0 and hi == ref.chunk_numel(i) * isz:  # a whole chunk: decoded in place
                self.read_chunk(ref, i, where, out[pos : pos + hi])
            else:
                out[pos : pos + hi - lo] = memoryview(self.read_chunk(ref, i, where)).cast("B")[lo:hi]
            pos += hi - lo
        return out

    def verify_chunks(self, ref: ArrayRef, where: str) -> None:
        for i, c in enumerate(ref.chunks):
            if self.checksum(self.source.read(c.offset, c.nbytes)) != c.checksum:
                why = getattr(self.source, "changed", lambda: None)()
                raise IntegrityError(f"{self.name}: {where}: checksum mismatch in chunk {i}{f' ({why})' if why else ''}")

    def close(self) -> None:
        self.source.close()


def _rows(refs: Sequence[ArrayRef], i: int, stop: int) -> list[tuple[int, int]]:
    """The ranges of chunks ``i``, ``i + 1``, ... (to ``stop``) of each of ``refs``, row by row, that
    store at most READ_AHEAD_BYTES (the first row whole); ``refs[0]``'s chunk ``i`` first."""
    out: list[tuple[int, int]] = []
    size = 0
    for j in range(i, stop):
        row = [(r.chunks[j].offset, r.chunks[j].nbytes) for r in refs if j < len(r.chunks)]
        n = sum(k for _, k in row)
        if out and size + n > READ_AHEAD_BYTES:
            break
        out += row
        size += n
    return out


def _row_bytes(refs: Sequence[ArrayRef], j: int) -> int:
    return sum(r.chunks[j].nbytes for r in refs if j < len(r.chunks))


@contextmanager
def _reading(where: str | None) -> Iterator[None]:
    """A remote source's failed fetch (``RemoteFile``: "... range read at N failed ...") says what
    it was fetched for: ``where`` (a tensor and task, a chunk)."""
    try:
        yield
    except TallpackError as e:
        raise _named(e, where) from None


def _named(e: TallpackError, where: str | None) -> TallpackError:
    """``e``, or for a remote source's failed fetch ("... range read at N failed ...") the same
    error saying what it was fetched for: ``where``."""
    text = str(e)
    if where is None or isinstance(e, ArchiveClosedError) or "range read at" not in text:
        return e
    return type(e)(f"{text} (reading {where})")


# -- reading threads, shared by every open archive ---------------------------------------------

#: How long a shared reading thread waits for work before it ends, and the buffers it kept with it.
IDLE_SECONDS = 10.0


class ReadingThreads:
    """The threads that every open archive of the process decodes on (zstd and the loops release
    the GIL): at most ``limit`` at once, whatever the number of archives open, each started when
    work comes and none is idle, each ending after ``IDLE_SECONDS`` without work (and with it its
    thread-local buffers and decompression contexts). Sixteen archives open with 8 threads each
    held 128 threads (and glibc an arena for each that allocated); now at most 8, and an idle
    service none. An archive submits through its own ``share()``, which its close waits on."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._cv = threading.Condition(threading.Lock())
        self._queue: deque[_Work] = deque()
        self._threads = 0  # started and not ended
        self._idle = 0  # waiting for work (each takes one item when woken)
        self._stopped = False  # the interpreter is shutting down

    @property
    def threads(self) -> int:
        """How many of the threads are alive now."""
        return self._threads

    def share(self) -> "ThreadShare":
        """A handle for one archive: its submissions, counted for its ``shutdown``."""
        return ThreadShare(self)

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        """Run ``fn(*args)`` on one of the threads; its future. A RuntimeError when no thread can
        be started and none is alive (memory, or the process's thread limit), or at interpreter
        shutdown (as ``ThreadPoolExecutor``'s)."""
        f = _Work(self, fn, args)
        with self._cv:
            if self._stopped:
                raise RuntimeError("cannot schedule new futures after interpreter shutdown")
            self._queue.append(f)
            if len(self._queue) > self._idle and self._threads < self.limit:
                self._start()
            self._cv.notify()
        return f

    def _claim(self, f: "_Work") -> bool:
        """Take ``f`` out of the queue for its waiter to run, if no thread has taken it yet."""
        with self._cv:
            try:
                self._queue.remove(f)
            except ValueError:  # taken (or never queued: interpreter shutdown)
                return False
            return True

    def _start(self) -> None:
        """Another thread (the lock held)."""
        t = threading.Thread(target=self._work, name=f"tallpack-read_{next(_thread_numbers)}",
                             daemon=_DAEMONS)
        self._threads += 1
        try:
            t.start()
        except BaseException:
            self._threads -= 1
            if self._threads == 0:  # no one else takes it: the caller hears why
                self._queue.pop()
                raise
            log.debug("a reading thread could not start; %d others take the work", self._threads)

    def _work(self) -> None:
        kernels.mark_worker()  # one tensor each: the loops run unsplit on these threads
        while (work := self._next()) is not None:
            work.run()
            del work  # nothing of it kept while this thread waits (its arguments, its result)

    def _next(self) -> "_Work | None":
        """The next work; None once this thread has ended its part, after IDLE_SECONDS without
        work (or at interpreter shutdown). The last to end lets go of what reads kept (``settle``)."""
        with self._cv:
            since = None
            while not self._queue:
                now = time.monotonic()
                since = since or now
                if self._stopped or now >= since + IDLE_SECONDS:
                    self._threads -= 1  # (with the lock held: a submit meanwhile starts another)
                    last = self._threads == 0 and not self._stopped
                    break
                self._idle += 1
                try:
                    self._cv.wait(since + IDLE_SECONDS - now)
                finally:
                    self._idle -= 1
            else:
                return self._queue.popleft()
        if last:  # every thread idle for IDLE_SECONDS: the process has stopped reading
            settle()
        return None

    def _stop(self) -> None:
        """At interpreter shutdown: no more work taken; idle threads end, busy ones after what
        is queued."""
        with self._cv:
            self._stopped = True
            self._cv.notify_all()

    def _after_fork_in_child(self) -> None:
        """A forked child has none of the threads, and the lock may be held: start afresh (the
        work queued in the parent is the parent's)."""
        self._cv = threading.Condition(threading.Lock())
        self._queue = deque()
        self._threads = self._idle = 0


class _Work(Future):
    """Work submitted to ``ReadingThreads``: a future whose waiter runs it itself when no thread
    has taken it yet (``result``), rather than waiting idle while the threads serve other
    archives' reads (every open archive shares them)."""

    def __init__(self, pool: ReadingThreads, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        super().__init__()
        self._pool: ReadingThreads | None = pool
        self._call: tuple[Callable[..., Any], tuple[Any, ...]] | None = (fn, args)

    def run(self) -> None:
        """Run it here (a reading thread, or its waiter), unless it was cancelled."""
        call, self._call, self._pool = self._call, None, None
        if call is None or not self.set_running_or_notify_cancel():
            return
        try:
            result = call[0](*call[1])
        except BaseException as e:  # noqa: BLE001 (handed to whoever waits on the future)
            self.set_exception(e)
        else:
            self.set_result(result)

    def run_if_queued(self) -> None:
        """Run it here if no thread has taken it yet (else it is running, or done)."""
        pool = self._pool
        if pool is not None and pool._claim(self):
            with kernels.as_worker():  # as on the threads: beside other work, loops run unsplit
                self.run()

    def result(self, timeout: float | None = None) -> Any:
        self.run_if_queued()
        return super().result(timeout)


class ThreadShare(Executor):
    """One archive's use of the shared reading threads (``ReadingThreads.share``): what it
    submits is counted, so that ``shutdown`` (the archive's close) refuses more and waits for its
    own work only, as its own ``ThreadPoolExecutor`` did."""

    def __init__(self, pool: ReadingThreads) -> None:
        self._pool = pool
        self._lock = threading.Lock()
        self._pending: set[Future] = set()
        self._shut = False

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        """Run ``fn(*args)`` on the shared threads, for this archive; its future."""
        if kwargs:
            raise TypeError("ThreadShare.submit takes positional arguments only")
        with self._lock:
            if self._shut:
                raise RuntimeError("cannot schedule new futures after shutdown")
            f = self._pool.submit(fn, *args)
            self._pending.add(f)
        f.add_done_callback(self._done)
        return f

    def _done(self, f: Future) -> None:
        with self._lock:
            self._pending.discard(f)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._shut = True
            pending = list(self._pending)
        if cancel_futures:
            for f in pending:
                f.cancel()
        if wait:
            # its work still queued (behind other archives' reads, or left by a read that failed
            # on its first array) runs here, as its own pool's idle threads took it: the close
            # waited for other archives' work otherwise (a stalled remote read: its timeouts)
            for f in pending:
                if isinstance(f, _Work):
                    f.run_if_queued()
            _wait(pending)


_thread_numbers = itertools.count()
_shared: ReadingThreads | None = None
_shared_lock = threading.Lock()
try:  # joined at interpreter shutdown before the non-daemon threads are (as concurrent.futures' are)
    _register_atexit = threading._register_atexit  # type: ignore[attr-defined]
    _DAEMONS = False
except AttributeError:  # (another Python): daemon threads, left at exit
    _DAEMONS = True


def reading_threads(threads: int) -> ReadingThreads:
    """The process's reading threads, their limit raised to ``threads`` if lower (at least the
    cores, up to 8: ``kernels.default_threads``)."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = ReadingThreads(kernels.default_threads())
            if not _DAEMONS:
                try:
                    _register_atexit(_shared._stop)
                except RuntimeError:  # first used while the interpreter shuts down: callers work alone
                    _shared._stopped = True
        _shared.limit = max(_shared.limit, threads)
        return _shared


def _after_fork_in_child() -> None:
    global _shared_lock
    _shared_lock = threading.Lock()
    if _shared is not None:
        _shared._after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
