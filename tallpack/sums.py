"""Sums of float64 arrays given a piece at a time, the same floats as ``np.add.reduce`` of the whole.

numpy sums a contiguous float64 array pairwise (``pairwise_sum`` in its ``loops_utils.h.src``):
a run of at most 128 elements in eight accumulators, a longer one as the sum of its halves, the
first half ``n // 2`` rounded down to a multiple of 8. The fidelity dial's figures are such sums
over a whole tensor (the manifest records them, and its choices follow them), so a tensor worked
a block at a time must rebuild the same tree: :class:`PairwiseSum` sums each subtree that lies
within one piece with ``np.add.reduce`` and adds the subtrees as numpy does; a leaf cut by a
piece's end waits, copied (at most 128 elements), for the next piece.

numpy before 2.3 sums in blocks of its buffer size (``np.getbufsize()``, 8192 elements): each block
pairwise as above, the blocks' sums added in order. :class:`PairwiseSum` builds that tree there.
"""

from __future__ import annotations

from collections.abc import Generator

import numpy as np

#: numpy's ``PW_BLOCKSIZE``: runs this long or shorter are summed in eight accumulators.
LEAF = 128
#: Whether numpy sums a whole contiguous array as one tree (2.3 and later), not its buffer's blocks.
ONE_TREE = np.lib.NumpyVersion(np.__version__) >= "2.3.0"


def add_reduce(x: np.ndarray) -> float:
    """``np.add.reduce(x)`` as a float: numpy's pairwise sum along the first axis, whose bits the
    sums here and the dial's rely on. (numpy 2.5's stubs hide from mypy 2.4 the overload of
    ``reduce`` for a plain array, the first one, behind its ``@override``: hence the ignore.)"""
    return float(np.add.reduce(x))  # type: ignore[call-overload, unused-ignore]


class PairwiseSum:
    """``np.add.reduce`` of a float64 array of ``n`` elements fed in order, in pieces of any length
    (:meth:`add`); :attr:`value` once all ``n`` are in. The same float, but for the sign of a zero.

    >>> x = np.random.default_rng(0).random(1000)
    >>> s = PairwiseSum(1000)
    >>> for a in range(0, 1000, 300): s.add(x[a : a + 300])
    >>> s.value == float(np.add.reduce(x))
    True
    """

    def __init__(self, n: int):
        self.n = n
        self._start = self._end = 0  # the piece at hand: elements [_start, _end)
        self._piece = np.empty(0, np.float64)
        self._value: float | None = None
        self._run = self._node(0, n) if ONE_TREE else self._blocks(n, np.getbufsize())
        self._step()

    def _step(self) -> None:
        try:
            next(self._run)
        except StopIteration as done:
            self._value = float(0.0 + done.value)  # (numpy's reduce starts from its identity, 0.0)

    def add(self, piece: np.ndarray) -> None:
        """The next ``len(piece)`` elements (float64, 1-d, contiguous: numpy sums a strided array in
        buffered runs, another order; read now, not kept but for a cut leaf)."""
        if piece.dtype != np.float64 or piece.ndim != 1 or not piece.flags.c_contiguous:
            raise ValueError(f"a contiguous 1-d float64 piece, not {piece.dtype} of shape {piece.shape}")
        if piece.size == 0:
            return
        if self._value is not None or self._end + piece.size > self.n:
            raise ValueError(f"more than the {self.n} elements announced")
        self._start, self._end, self._piece = self._end, self._end + piece.size, piece
        self._step()
        self._piece = self._piece[:0]

    @property
    def value(self) -> float:
        """The sum, once every element is in."""
        if self._value is None:
            raise ValueError(f"{self._end} of {self.n} elements summed")
        return self._value

    def _blocks(self, n: int, block: int) -> Generator[None, None, float]:
        """numpy before 2.3: the pairwise sums of ``block`` elements at a time, added in order."""
        total = 0.0
        for s in range(0, n, block):
            total += yield from self._node(s, min(block, n - s))
        return total

    def _node(self, s: int, n: int) -> Generator[None, None, float]:
        """The pairwise sum of elements [s, s + n), each piece asked for (a yield) as it is needed."""
        e = s + n
        while n and s >= self._end:
            yield
        if self._start <= s and e <= self._end:  # the whole subtree in this piece
            return add_reduce(self._piece[s - self._start : e - self._start])
        if n <= LEAF:  # a leaf cut by the piece's end: its elements gathered, then summed as one
            got, pos = [], s
            while pos < e:
                while pos >= self._end:
                    yield
                stop = min(e, self._end)
                got.append(self._piece[pos - self._start : stop - self._start].copy())
                pos = stop
            return add_reduce(np.concatenate(got))
        half = n // 2
        half -= half % 8
        left = yield from self._node(s, half)
        right = yield from self._node(s + half, n - half)
        return left + right
