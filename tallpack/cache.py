"""A bounded cache: least recently used entries go first once their sizes pass a byte budget."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable
from typing import Any

#: The default budget of an open archive's cache of decoded arrays (base and merged vectors,
#: shared by every task): 1 GiB. ``tallpack.open(..., cache_bytes=0)`` turns it off.
DEFAULT_CACHE_BYTES = 1 << 30


class ByteLRU:
    """A thread-safe LRU mapping whose values each declare a size in bytes; ``put`` evicts the
    least recently used entries until the total fits ``budget``. A value larger than the budget
    is not kept."""

    def __init__(self, budget: int):
        if type(budget) is not int or budget < 0:
            raise ValueError(f"cache budget must be a non-negative integer of bytes, got {budget!r}")
        self.budget = budget
        self.size = 0
        self.hits = self.misses = 0
        self._items: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> Any | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return item[0]

    def put(self, key: Hashable, value: Any, nbytes: int, evict: bool = True) -> None:
        """Keep ``value``; with ``evict=False``, only if it fits beside what is kept (replacing
        ``key``'s own value), pushing nothing out."""
        if nbytes > self.budget:
            return
        with self._lock:
            if not evict:
                held = self._items.get(key)
                if self.size - (held[1] if held is not None else 0) + nbytes > self.budget:
                    return
            old = self._items.pop(key, None)
            if old is not None:
                self.size -= old[1]
            self._items[key] = (value, nbytes)
            self.size += nbytes
            while self.size > self.budget:
                _, (_, n) = self._items.popitem(last=False)
                self.size -= n

    def discard(self, key: Hashable) -> None:
        """Forget ``key``'s value, if kept."""
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.size -= old[1]

    def after_fork(self) -> None:
        """In a forked child: a new lock (one a parent thread held at the fork would stay held);
        the items stay, shared with the parent until either writes them."""
        self._lock = threading.Lock()

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.size = 0

    def __len__(self) -> int:
        return len(self._items)

    @property
    def room(self) -> int:
        """Bytes that can be kept without pushing anything out."""
        return self.budget - self.size

    def peek(self, key: Hashable) -> Any | None:
        """The value kept for ``key``, or None (neither a hit nor a use: the order is unchanged)."""
        with self._lock:
            item = self._items.get(key)
            return None if item is None else item[0]

    def __contains__(self, key: Hashable) -> bool:
        """Whether ``key`` is kept now (neither a hit nor a use: the order is unchanged)."""
        with self._lock:
            return key in self._items
