"""Fresh buffers for decoded bytes.

numpy advises the kernel to back every array of 4 MiB or more with transparent huge pages. Where
the kernel must compact memory to find them (``defrag`` set to ``madvise``, as on the virtual
machines here) filling such an array for the first time costs about three times what filling
ordinary pages does (BENCHMARKS.md, sixth performance round), and a first task writes hundreds of
MB of decoded base and merged vector. Large buffers therefore take numpy's allocation (so memory
freed by earlier decodes is reused) with that advice withdrawn: the pages torch's allocator gives.

``give_back`` hands the C allocator's free pages back to the system after a large tensor's work;
``settle`` lets go of what a process that has stopped reading keeps for its next read.
"""

from __future__ import annotations

import ctypes
import mmap
import sys
import threading
import weakref
from collections.abc import Callable
from typing import TypeVar

import numpy as np

T = TypeVar("T")

#: From this size on numpy advises huge pages, and ``empty`` withdraws the advice.
ADVISED_FROM = 1 << 22
_PAGE = mmap.PAGESIZE
_MADV_NOHUGEPAGE = 15  # Linux's value (asm-generic/mman-common.h)


def _madvise():
    """libc's ``madvise``, on Linux; None elsewhere (there numpy gives no advice either)."""
    if not sys.platform.startswith("linux"):
        return None
    try:  # the process's own symbols, libc's among them (no search for the library, no subprocess)
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return fn


_advise = _madvise()


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``; None elsewhere (another C library, another system)."""
    if not sys.platform.startswith("linux"):
        return None
    try:  # the process's own symbols, libc's among them (as ``_madvise``)
        fn = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn


_TRIM = _malloc_trim()
#: Work on this many elements or more is followed by ``give_back``'s trim; less is not worth it.
GIVE_BACK_FROM = 1 << 20


def give_back(elements: int) -> None:
    """After the work on a large tensor (``elements``: its size, or the part just done): the C
    allocator's free pages handed back to the system (glibc's ``malloc_trim``; nothing elsewhere).
    Such work frees hundreds of MB of buffers of a few MB each, on several threads; glibc keeps
    freed memory in its arenas (below its mmap threshold, which grows to 32 MB as large blocks are
    freed), where the next tensor's work, of other sizes, reuses it only in part: the resident
    memory stood 0.5 to 1 GB above the live heap. A few milliseconds a call: once per large tensor
    or pass, never per chunk. No process-wide malloc setting is changed."""
    if _TRIM is not None and elements >= GIVE_BACK_FROM:
        _TRIM(0)


def empty(nbytes: int) -> np.ndarray:
    """``nbytes`` uninitialized, writable bytes (uint8) owned by the caller, in ordinary pages."""
    out = np.empty(nbytes, np.uint8)
    if nbytes >= ADVISED_FROM and _advise is not None:
        start = -(-out.ctypes.data // _PAGE) * _PAGE  # the whole pages inside the buffer
        end = (out.ctypes.data + nbytes) // _PAGE * _PAGE
        _advise(start, end - start, _MADV_NOHUGEPAGE)  # advice only: a failure changes nothing
    return out


#: The largest buffer a thread keeps for its next call (``ThreadBuffers.get``): a chunk's planes
#: and masks (4M elements by default: 16 MB at most) are kept; a whole tensor larger than this, read
#: without a cache, is decoded into a fresh buffer each time, as on the reading threads. Without the
#: bound each thread of a service kept buffers as large as the largest tensor it had decoded.
KEEP_BYTES = 64 << 20


class ThreadBuffers:
    """Named buffers that each thread reuses from call to call (``get``), so that a chunk or
    tensor at a time costs no fresh page faults. ``release`` drops every thread's buffers at once
    (a buffer in use stays alive until its user lets go)."""

    def __init__(self) -> None:
        self._local = threading.local()
        self._closed = False
        _ALL.add(self)

    def get(self, name: str, nbytes: int) -> np.ndarray:
        """``nbytes`` of this thread's buffer ``name``, made (or grown) with ``empty`` and kept for
        the next call: a fresh buffer per chunk or tensor costs its page faults again. One of more
        than ``KEEP_BYTES`` is fresh and not kept (a whole large tensor's, on each thread)."""
        slots = self._local.__dict__
        if self._closed or nbytes > KEEP_BYTES:  # (read after ``_local``: ``close`` sets it first)
            return empty(nbytes)
        buf = slots.get(name)
        if buf is None or buf.size < nbytes:
            slots.pop(name, None)  # the old one is freed before the larger one is made
            buf = slots[name] = empty(nbytes)
        return buf[:nbytes]

    def held(self, name: str, make: Callable[[], T]) -> T:
        """This thread's object ``name`` (a decompression context, say), made by ``make`` the
        first time and released with the buffers."""
        slots = self._local.__dict__
        if self._closed:
            return make()
        obj = slots.get(name)
        if obj is None:
            obj = slots[name] = make()
        return obj

    def release(self) -> None:
        self._local = threading.local()  # the old one, and every thread's buffers in it, are freed

    def close(self) -> None:
        """``release``, and keep nothing from now on: ``get`` and ``held`` hand out fresh objects
        (an archive closed while other threads still read it keeps none of their buffers)."""
        self._closed = True
        self.release()


_ALL: "weakref.WeakSet[ThreadBuffers]" = weakref.WeakSet()


def release_thread_buffers() -> None:
    """Drop the reused buffers of every thread (the reader calls this when its last open archive
    closes: a thread that read from it would otherwise keep them for its lifetime)."""
    for b in list(_ALL):
        b.release()


def settle() -> None:
    """What a process that has stopped reading (the shared reading threads idle, ``container.
    ReadingThreads``) keeps for a next read, let go: every thread's reused buffers (a service's
    request threads live as long as the process) and the C allocator's free pages (glibc keeps the
    memory reads freed in each thread's arena: 8 request threads on a 20 MB task held 0.5 GB free
    there). Tens of milliseconds, once per idle spell; the next read makes its buffers again."""
    release_thread_buffers()
    if _TRIM is not None:
        _TRIM(0)
