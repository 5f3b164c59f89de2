"""Remote archives: range reads through fsspec (s3://, gs://, http(s)://, memory://, ...).

A read that the reader announces in advance (``prefetch``: every chunk one tensor, one array or
a batch of tensors needs) is fetched as few requests as possible: ranges closer than
``gap`` bytes are merged into one request (the gaps are alignment padding, at most 63 bytes
between neighbouring chunks), and the merged requests run concurrently (``cat_ranges``). The
fetched chunks wait in a small cache until read. ``requests`` and ``fetched`` count what went over
the wire.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

from .errors import ArchiveClosedError, ArchiveNotFoundError, IntegrityError, TallpackError, quoted

#: Ranges at most this far apart are fetched as one request: chunks separated only by alignment
#: padding (spec §1: under 64 bytes), so a read fetches its own bytes and hardly any others.
DEFAULT_GAP = 64
#: One merged request covers at most this many bytes (larger ones are split, and run concurrently).
MAX_REQUEST = 32 << 20
#: The prefetch cache holds at most this many bytes; older entries go first.
MAX_CACHE = 256 << 20


def coalesce(ranges: Sequence[tuple[int, int]], gap: int = DEFAULT_GAP,
             max_request: int = MAX_REQUEST) -> list[tuple[int, int]]:
    """Merge ``(offset, nbytes)`` ranges into ``(start, end)`` requests: sorted, overlapping or
    adjacent ones (at most ``gap`` bytes apart) joined, each request at most ``max_request``
    bytes unless one range alone is larger.

    >>> coalesce([(0, 10), (64, 10), (10000, 5)], gap=100)
    [(0, 74), (10000, 10005)]
    """
    out: list[list[int]] = []
    for off, n in sorted(r for r in ranges if r[1] > 0):
        end = off + n
        if out and off - out[-1][1] <= gap and end - out[-1][0] <= max_request:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([off, end])
    return [(a, b) for a, b in out]


class RemoteFile:
    """An archive in remote storage, read by range requests."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None, *, gap: int = DEFAULT_GAP):
        try:
            from fsspec.core import url_to_fs
        except ImportError:  # pragma: no cover - fsspec is a dependency
            raise TallpackError(f"{url}: reading remote archives needs fsspec") from None
        self.url = url
        self.gap = gap
        #: range requests made, and bytes they fetched
        self.requests = 0
        self.fetched = 0
        self._cache: dict[tuple[int, int], bytes] = {}
        self._cached = 0
        self._lock = threading.Lock()
        self.closed = False
        try:
            self._fs, self._path = url_to_fs(url, **(storage_options or {}))
            self.size = int(self._fs.size(self._path))
        except FileNotFoundError as e:
            cause = _connection_error(e)
            if cause is not None:  # fsspec's HTTP file system reports a failed connection as missing
                raise TallpackError(f"{url}: cannot connect ({type(cause).__name__}: {quoted(cause)})") from None
            raise ArchiveNotFoundError(f"{url}: no such archive") from None
        except ImportError as e:
            raise TallpackError(f"{url}: this kind of URL needs another package ({quoted(e)})") from None
        except Exception as e:
            raise TallpackError(f"{url}: cannot open ({type(e).__name__}: {quoted(e)})") from None

    def _check(self, offset: int, nbytes: int) -> None:
        if self.closed:
            raise ArchiveClosedError(f"{self.url}: the archive is closed")
        if offset < 0 or nbytes < 0 or offset + nbytes > self.size:
            raise IntegrityError(f"{self.url}: read past the end of the file (truncated?)")

    def _fetch(self, spans: list[tuple[int, int]]) -> list[bytes]:
        try:
            if len(spans) == 1:
                start, end = spans[0]
                data = [self._fs.cat_file(self._path, start=start, end=end)]
            else:
                data = self._fs.cat_ranges([self._path] * len(spans), [s for s, _ in spans],
                                           [e for _, e in spans], on_error="raise")
        except Exception as e:
            raise TallpackError(f"{self.url}: range read at {spans[0][0]} failed ({type(e).__name__}: {quoted(e)})") from None
        for (start, end), d in zip(spans, data):
            if len(d) > end - start:  # the whole file for a range: tallpack needs Range requests
                raise TallpackError(f"{self.url}: the server ignored a range request ({len(d)} bytes sent for "
                                    f"{end - start}); tallpack reads archives from servers that honour Range requests")
            if len(d) != end - start:
                raise IntegrityError(f"{self.url}: short read at {start} (changed or truncated?)")
        with self._lock:
            self.requests += len(spans)
            self.fetched += sum(len(d) for d in data)
        return data

    def read(self, offset: int, nbytes: int) -> memoryview:
        self._check(offset, nbytes)
        if nbytes == 0:
            return memoryview(b"")
        with self._lock:
            hit = self._cache.pop((offset, nbytes), None)
            if hit is not None:
                self._cached -= len(hit)
        if hit is not None:
            return memoryview(hit)
        return memoryview(self._fetch([(offset, offset + nbytes)])[0])

    def read_many(self, ranges: Sequence[tuple[int, int]]) -> list[memoryview]:
        """Several ``(offset, nbytes)`` ranges, fetched together (coalesced)."""
        self.prefetch(ranges)
        return [self.read(off, n) for off, n in ranges]

    def prefetch(self, ranges: Sequence[tuple[int, int]]) -> None:
        """Fetch these ranges now, coalesced, and keep them until they are read."""
        with self._lock:
            todo = [(o, n) for o, n in dict.fromkeys(ranges) if n > 0 and (o, n) not in self._cache]
        for o, n in todo:
            self._check(o, n)
        if not todo:
            return
        spans = coalesce(todo, self.gap)
        blocks = self._fetch(spans)
        with self._lock:
            j = 0
            for o, n in sorted(todo):
                while spans[j][1] < o + n:
                    j += 1
                start = spans[j][0]
                self._cache[(o, n)] = blocks[j][o - start : o - start + n]
                self._cached += n
            while self._cached > MAX_CACHE and self._cache:
                old = next(iter(self._cache))
                self._cached -= len(self._cache.pop(old))

    def close(self) -> None:
        with self._lock:
            self._cache.clear()
            self._cached = 0
        self.closed = True


def _connection_error(e: BaseException) -> BaseException | None:
    """The failed connection behind ``e`` (its causes and contexts), if one is there."""
    seen = set()
    c: BaseException | None = e.__cause__ or e.__context__
    while c is not None and id(c) not in seen:
        seen.add(id(c))
        if isinstance(c, ConnectionError) or "Connect" in type(c).__name__:
            return c
        c = c.__cause__ or c.__context__
    return None
