"""Random access to an archive's bytes: a memory-mapped local file, or a remote object (fsspec)."""

from __future__ import annotations

import mmap
import os
from collections.abc import Sequence
from typing import Any, Protocol

from .errors import ArchiveNotFoundError, FormatError, IntegrityError


class ByteSource(Protocol):
    """Random access to an archive's bytes."""

    size: int

    def read(self, offset: int, nbytes: int) -> memoryview: ...

    def read_many(self, ranges: Sequence[tuple[int, int]]) -> list[memoryview]: ...

    def close(self) -> None: ...


class LocalFile:
    """A local archive, memory-mapped: reading a range touches only those pages."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        try:
            self._f = open(path, "rb")
        except FileNotFoundError:
            raise ArchiveNotFoundError(f"{path}: no such archive") from None
        except IsADirectoryError:
            raise FormatError(f"{path}: is a directory, not a tallpack archive") from None
        self.size = os.fstat(self._f.fileno()).st_size
        self._map = mmap.mmap(self._f.fileno(), 0, access=mmap.ACCESS_READ) if self.size else None
        self._view = memoryview(self._map) if self._map is not None else memoryview(b"")

    def read(self, offset: int, nbytes: int) -> memoryview:
        if offset < 0 or nbytes < 0 or offset + nbytes > self.size:
            raise IntegrityError(f"{self.path}: read past the end of the file (truncated?)")
        return self._view[offset : offset + nbytes]

    def read_many(self, ranges: Sequence[tuple[int, int]]) -> list[memoryview]:
        """Several ``(offset, nbytes)`` ranges (a remote source coalesces them; here each is a view)."""
        return [self.read(off, n) for off, n in ranges]

    def close(self) -> None:
        self._view.release()
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:  # a caller still holds a view; the map goes with the last one
                pass
        self._f.close()


def is_url(path: str | os.PathLike) -> bool:
    text = os.fspath(path)
    return "://" in text and not text.startswith("file://")


def open_bytes(path: str | os.PathLike, storage_options: dict[str, Any] | None = None) -> ByteSource:
    """A local path (or ``file://``) is memory-mapped; any other URL is read through fsspec."""
    text = os.fspath(path)
    if is_url(text):
        from .remote import RemoteFile

        return RemoteFile(text, storage_options)
    return LocalFile(text.removeprefix("file://"))
