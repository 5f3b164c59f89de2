"""The tallpack error hierarchy.

Every error the library raises on bad input is a :class:`TallpackError`. Members also inherit the
matching built-in (``ValueError``, ``KeyError``, ``FileNotFoundError``), so callers may catch either.
Messages are one line that says what is wrong and where (file, tensor, task).
"""

from __future__ import annotations

import errno
import re
from collections.abc import Iterator
from contextlib import contextmanager

#: The most characters of another library's message that an error quotes (:func:`quoted`).
QUOTED_CHARS = 500


def quoted(e: BaseException, limit: int = QUOTED_CHARS) -> str:
    """Another library's exception message for quoting in one of ours: on one line (torch's and
    boto's messages may span several), at most ``limit`` characters."""
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class TallpackError(Exception):
    """Base class of every error tallpack raises on purpose."""


class FormatError(TallpackError, ValueError):
    """The file is not a valid tallpack archive (bad magic, malformed manifest, bad offsets)."""


class IntegrityError(FormatError):
    """The archive is damaged: a checksum does not match, or it is truncated."""


class UnsupportedVersionError(FormatError):
    """The archive (or one of its parts) needs a newer reader."""


class CodecError(FormatError):
    """A section could not be decoded with the codec the manifest names."""


class CheckpointError(TallpackError, ValueError):
    """An input checkpoint could not be read."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """An input path does not exist."""


class UnsafeCheckpointError(CheckpointError):
    """A PyTorch file needs code execution (a pickle beyond plain tensors) to load."""


class IncompatibleCheckpointsError(TallpackError, ValueError):
    """The checkpoints cannot form one family (for example shapes that do not match the base)."""


class _KeyErrorMessage(KeyError):
    # KeyError quotes its argument in str(); keep the one-line message readable.
    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class TaskNotFoundError(TallpackError, _KeyErrorMessage):
    """The archive holds no task of that name."""


class TensorNotFoundError(TallpackError, _KeyErrorMessage):
    """The task has no tensor of that name."""


class InvalidArgumentError(TallpackError, ValueError):
    """A function or command was called with a value it cannot use (an unknown codec, a bad lambda)."""


class ArchiveNotFoundError(TallpackError, FileNotFoundError):
    """The archive to open does not exist."""


class RemoteError(TallpackError):
    """A remote archive's server did not give the bytes asked for: it refused (HTTP 403, 500),
    could not be reached, cut the connection or stopped sending. Not damage: the message says
    what to do (try again, check the server or the link). No ``OSError``: code that turns an
    ``OSError`` into "cannot write the output" must not take a failed read for one."""


class OutputError(TallpackError, OSError):
    """An output could not be written (for example, the disk is full); nothing was written under
    the output's name. ``errno`` is the operating system's error number."""


class ExactTierMissingError(TallpackError, ValueError):
    """Exact output was asked of an archive (or task) packed without the exact tier."""


class ArchiveClosedError(TallpackError, ValueError):
    """The archive was read after ``close()`` (or while another thread closed it)."""


class OutputExistsError(OutputError, FileExistsError):
    """An output already exists; pass ``overwrite=True`` (``--force``) to replace it."""



#: The URL protocols whose fsspec packages (s3fs, aiohttp) the ``remote`` extra installs (pyproject.toml).
REMOTE_EXTRA_PROTOCOLS = frozenset({"s3", "s3a", "http", "https"})


def missing_package(url: str, e: ImportError) -> TallpackError:
    """The error for a URL whose fsspec package is not installed: fsspec's words and, where the
    ``remote`` extra holds the package, the line that installs it.

    >>> print(missing_package("s3://b/x", ImportError("Install s3fs to access S3")))
    s3://b/x: this kind of URL needs another package (Install s3fs to access S3): pip install 'tallpack[remote]'
    """
    protocol = url.split("://", 1)[0].rsplit("::", 1)[-1].lower()
    extra = ": pip install 'tallpack[remote]'" if protocol in REMOTE_EXTRA_PROTOCOLS else ""
    return TallpackError(f"{url}: this kind of URL needs another package ({quoted(e)}){extra}")


class OutOfMemoryError(TallpackError, MemoryError):
    """Memory (or a thread) could not be had for a read: the archive is not damaged; free memory,
    or read with fewer threads or a smaller cache."""


def out_of_memory(e: BaseException) -> bool:
    """Whether ``e`` says the process ran out of memory or threads: Python's ``MemoryError``, an
    ``OSError`` ENOMEM (a mapping refused), torch's allocator failing (a ``RuntimeError``), a
    thread that could not start, or safetensors' mapping failing."""
    if isinstance(e, MemoryError) or (isinstance(e, OSError) and e.errno == errno.ENOMEM):
        return True
    text = str(e)
    return not isinstance(e, TallpackError) and any(s in text for s in _OUT_OF_MEMORY)


@contextmanager
def memory_named(where: str) -> Iterator[None]:
    """Inside, running out of memory or threads (:func:`out_of_memory`) is an
    :class:`OutOfMemoryError` naming ``where`` (an archive and what was being built)."""
    try:
        yield
    except (MemoryError, RuntimeError, OSError) as e:
        if isinstance(e, TallpackError) or not out_of_memory(e):
            raise
        raise OutOfMemoryError(f"{where}: out of memory ({memory_detail(e)}; the archive is not damaged)") from None


def memory_detail(e: BaseException) -> str:
    """What ran out, in a few words, for an error that :func:`out_of_memory` recognised."""
    text = str(e)
    asked = re.search(r"(allocate|mmap) (\d+) bytes", text)
    if asked:
        return f"could not {'map' if asked.group(1) == 'mmap' else 'allocate'} {asked.group(2)} bytes"
    if "can't start new thread" in text:  # (not any "thread" or "lock": a path's "block_3.bin" is none)
        return "could not start a thread"
    if "can't allocate lock" in text:
        return "could not allocate a lock"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return quoted(e, 200) or type(e).__name__


#: What torch's CPU allocator, ``threading`` and the system (ENOMEM) say when memory or threads run out.
_OUT_OF_MEMORY = ("can't allocate memory", "DefaultCPUAllocator", "can't start new thread", "CUDA out of memory",
                  "can't allocate lock",  # threading.Lock() when the process is short of memory
                  "Cannot allocate memory",
                  "failed to map segment from shared object")  # a library (torch) that cannot be loaded: ENOMEM
