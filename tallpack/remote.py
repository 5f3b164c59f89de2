"""Remote archives: range reads through fsspec (s3://, gs://, http(s)://, ...)."""

from __future__ import annotations

from .errors import IntegrityError, TallpackError


class RemoteFile:
    """An archive in remote storage; each ``read`` is one range request."""

    def __init__(self, url: str, **storage_options):
        try:
            import fsspec
        except ImportError:
            raise TallpackError(f"{url}: reading remote archives needs fsspec (pip install fsspec)") from None
        self.url = url
        try:
            self._f = fsspec.open(url, "rb", block_size=0, **storage_options).open()
            self.size = int(self._f.size)
        except FileNotFoundError:
            raise TallpackError(f"{url}: no such archive") from None
        except Exception as e:
            raise TallpackError(f"{url}: cannot open ({type(e).__name__}: {e})") from None

    def read(self, offset: int, nbytes: int) -> memoryview:
        if offset < 0 or nbytes < 0 or offset + nbytes > self.size:
            raise IntegrityError(f"{self.url}: read past the end of the file (truncated?)")
        self._f.seek(offset)
        data = self._f.read(nbytes)
        if len(data) != nbytes:
            raise IntegrityError(f"{self.url}: short read at {offset} (truncated?)")
        return memoryview(data)

    def close(self) -> None:
        self._f.close()
