"""Fresh buffers for decoded bytes.

numpy advises the kernel to back every array of 4 MiB or more with transparent huge pages. Where
the kernel must compact memory to find them (``defrag`` set to ``madvise``, as on the virtual
machines here) filling such an array costs about three times what filling ordinary pages does
(BENCHMARKS.md, sixth performance round), and a first task writes hundreds of MB of decoded base
and merged vector. Large buffers are therefore anonymous private maps of their own, which get the
pages torch's allocator would; small ones come from numpy.
"""

from __future__ import annotations

import mmap

import numpy as np

#: From this size on, a buffer is a map of its own (numpy's threshold for its huge-page advice).
MAP_FROM = 1 << 22
_FLAGS = getattr(mmap, "MAP_PRIVATE", 0) | getattr(mmap, "MAP_ANONYMOUS", 0)


def empty(nbytes: int) -> np.ndarray:
    """``nbytes`` uninitialized, writable bytes (uint8) owned by the caller; MemoryError when the
    system cannot give them."""
    if nbytes < MAP_FROM or not (getattr(mmap, "MAP_PRIVATE", 0) and getattr(mmap, "MAP_ANONYMOUS", 0)):
        return np.empty(nbytes, np.uint8)
    try:
        return np.frombuffer(mmap.mmap(-1, nbytes, flags=_FLAGS), np.uint8)
    except (OSError, OverflowError, ValueError) as e:
        raise MemoryError(f"cannot map {nbytes} bytes: {e}") from None
