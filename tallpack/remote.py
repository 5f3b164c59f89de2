"""Remote archives: range reads through fsspec (s3://, gs://, http(s)://, ...)."""

from __future__ import annotations

from typing import Any

from .errors import ArchiveClosedError, ArchiveNotFoundError, IntegrityError, TallpackError


class RemoteFile:
    """An archive in remote storage; each ``read`` is one range request for exactly those bytes."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None):
        try:
            from fsspec.core import url_to_fs
        except ImportError:  # pragma: no cover - fsspec is a dependency
            raise TallpackError(f"{url}: reading remote archives needs fsspec") from None
        self.url = url
        self.closed = False
        try:
            self._fs, self._path = url_to_fs(url, **(storage_options or {}))
            self.size = int(self._fs.size(self._path))
        except FileNotFoundError:
            raise ArchiveNotFoundError(f"{url}: no such archive") from None
        except ImportError as e:
            raise TallpackError(f"{url}: this kind of URL needs another package ({e})") from None
        except Exception as e:
            raise TallpackError(f"{url}: cannot open ({type(e).__name__}: {e})") from None

    def read(self, offset: int, nbytes: int) -> memoryview:
        if offset < 0 or nbytes < 0 or offset + nbytes > self.size:
            raise IntegrityError(f"{self.url}: read past the end of the file (truncated?)")
        if self.closed:
            raise ArchiveClosedError(f"{self.url}: the archive is closed")
        if nbytes == 0:
            return memoryview(b"")
        try:
            data = self._fs.cat_file(self._path, start=offset, end=offset + nbytes)
        except Exception as e:
            raise TallpackError(f"{self.url}: range read at {offset} failed ({type(e).__name__}: {e})") from None
        if len(data) != nbytes:
            raise IntegrityError(f"{self.url}: short read at {offset} (changed or truncated?)")
        return memoryview(data)

    def close(self) -> None:
        self.closed = True
