"""Random access to an archive's bytes: a memory-mapped local file, or a remote object (fsspec).

What a local reader guarantees when the file changes under it (RELIABILITY.md): every ``read``
first checks the file's size (``fstat``) and raises IntegrityError if the file has shrunk, since
touching a page past the new end of a mapping raises SIGBUS, which Python cannot catch. A file
truncated *between* that check and the use of the bytes can still end the process with SIGBUS;
a file rewritten in place without shrinking gives checksum errors (or, for a chunk already
checked, the bytes read at that moment). Writers never do either: they write a new file and rename.
"""

from __future__ import annotations

import errno
import mmap
import os
import stat
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from .errors import ArchiveClosedError, ArchiveNotFoundError, FormatError, IntegrityError, TallpackError, quoted
from .fsutil import file_above, shortened


class ByteSource(Protocol):
    """Random access to an archive's bytes."""

    size: int

    def read(self, offset: int, nbytes: int) -> memoryview: ...

    def read_many(self, ranges: Sequence[tuple[int, int]]) -> list[memoryview]: ...

    def close(self) -> None: ...


def _open_regular(path: str) -> int:
    """A read-only descriptor of ``path``, which must be a regular file. Opened non-blocking and
    checked with ``fstat`` on the descriptor itself, so a FIFO or a device never blocks the open
    and cannot be swapped in between a check and the open."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise ArchiveNotFoundError(f"{path}: no such archive") from None
    except IsADirectoryError:
        raise FormatError(f"{path}: is a directory, not a tallpack archive") from None
    except NotADirectoryError:
        above = file_above(path)
        if above is None and str(path).endswith(("/", os.sep)) and os.path.isfile(str(path).rstrip("/" + os.sep)):
            above = Path(str(path).rstrip("/" + os.sep))  # "fam.tallpack/": the archive itself, given as a folder
        why = f" ({above} is a file, not a folder)" if above is not None else ""
        raise ArchiveNotFoundError(f"{path}: no such archive{why}") from None
    except OSError as e:
        if e.errno == errno.ENXIO:  # a socket, or a FIFO without a writer on some systems
            raise FormatError(f"{path}: not a regular file, not a tallpack archive") from None
        if e.errno == errno.ENAMETOOLONG:
            raise TallpackError(f"{shortened(path)}: cannot open the archive: the path is too long "
                                "for the file system") from None
        # a link loop, permission denied, an I/O error: what the system says, of the path given
        raise TallpackError(f"{path}: cannot open the archive ({e.strerror or quoted(e)})") from None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise FormatError(f"{path}: is a directory, not a tallpack archive")
        if not stat.S_ISREG(mode):
            raise FormatError(f"{path}: not a regular file (a pipe, device or socket); "
                              "tallpack reads archives from regular files only")
    except BaseException:
        os.close(fd)
        raise
    return fd


class LocalFile:
    """A local archive, memory-mapped: reading a range touches only those pages.

    ``read`` may be called from several threads, and concurrently with ``close``: a read after
    (or racing with) ``close`` raises ArchiveClosedError; a view returned before ``close`` stays
    valid, because it keeps the mapping alive.
    """

    #: The reader checks each chunk of a mapped file once while it is open (see ContainerReader).
    check_once = True
    #: Views of a mapped file cost no memory of their own: the reader keeps them out of its cache.
    mapped = True

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        # a bare descriptor, closed once (by ``close``, or quietly when the source is collected),
        # not a file object: one still open at exit (a service's archive, which the process
        # closes) would warn at shutdown, naming only its number
        self._fd = _open_regular(self.path)
        self._close_fd = weakref.finalize(self, os.close, self._fd)
        self._close_fd.atexit = False
        try:
            st = os.fstat(self._fd)
            self._map = mmap.mmap(self._fd, 0, access=mmap.ACCESS_READ) if st.st_size else None
        except BaseException:
            self._close_fd()
            raise
        self.size = st.st_size
        #: the file as ``(st_dev, st_ino)``: outputs refuse to replace it, whatever name they give it
        self.device_inode = (st.st_dev, st.st_ino)
        self._stamp = (st.st_size, st.st_mtime_ns, st.st_ctime_ns)  # for ``changed``
        self._view = memoryview(self._map) if self._map is not None else memoryview(b"")
        self.closed = False

    def read(self, offset: int, nbytes: int) -> memoryview:
        if offset < 0 or nbytes < 0 or offset + nbytes > self.size:
            raise IntegrityError(f"{self.path}: read past the end of the file (truncated?)")
        if self.closed:
            raise ArchiveClosedError(f"{self.path}: the archive is closed")
        if nbytes:
            try:
                now = os.fstat(self._fd).st_size
            except (OSError, ValueError):  # the descriptor was closed by a racing close()
                raise ArchiveClosedError(f"{self.path}: the archive is closed") from None
            if now < offset + nbytes:
                if self.closed:  # closed meanwhile: the descriptor's number may be another file's now
                    raise ArchiveClosedError(f"{self.path}: the archive is closed")
                raise IntegrityError(f"{self.path}: the file shrank to {now} bytes while open "
                                     f"(it was {self.size}); it was changed in place")
        try:
            return self._view[offset : offset + nbytes]
        except ValueError:  # released by a racing close()
            raise ArchiveClosedError(f"{self.path}: the archive is closed") from None

    def current_size(self) -> int:
        """The file's size now (``size`` is the size when it was opened)."""
        try:
            now = os.fstat(self._fd).st_size
        except (OSError, ValueError):  # the descriptor was closed by a racing close()
            raise ArchiveClosedError(f"{self.path}: the archive is closed") from None
        if self.closed:  # closed meanwhile: the descriptor's number may be another file's now
            raise ArchiveClosedError(f"{self.path}: the archive is closed")
        return now

    def changed(self) -> str | None:
        """Why the file is no longer as it was opened (written in place: another size or
        modification time), or None; asked after a checksum fails, never before each read."""
        try:
            st = os.fstat(self._fd)
        except (OSError, ValueError):
            return None
        if (st.st_size, st.st_mtime_ns, st.st_ctime_ns) == self._stamp:
            return None
        size = f"now {st.st_size} bytes, was {self.size}" if st.st_size != self.size else "modified since"
        return f"the file was written in place since it was opened ({size}); reopen it"

    def read_many(self, ranges: Sequence[tuple[int, int]]) -> list[memoryview]:
        """Several ``(offset, nbytes)`` ranges (a remote source coalesces them; here each is a view)."""
        return [self.read(off, n) for off, n in ranges]

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._view.release()
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:  # a view is still out (a racing reader's): the map goes with the last one
                pass
            self._map = None  # (held here, an open map would stay mapped until the archive is collected)
        self._close_fd()


def is_url(path: str | bytes | os.PathLike) -> bool:
    text = os.fsdecode(path)
    return "://" in text and not text.startswith("file://")


def open_bytes(path: str | bytes | os.PathLike, storage_options: dict[str, Any] | None = None) -> ByteSource:
    """A local path (or ``file://``) is memory-mapped; any other URL is read through fsspec."""
    text = os.fsdecode(path)
    if is_url(text):
        from .remote import RemoteFile

        return RemoteFile(text, storage_options)
    return LocalFile(text.removeprefix("file://"))
