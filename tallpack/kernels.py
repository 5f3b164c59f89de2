"""The reader's hot loops: compiled when ``tallpack._kernels`` was built, else numpy.

``setup.py`` builds the C module when the machine installing tallpack has a C compiler; without
one the install still succeeds and these functions run their numpy fallbacks, which give the
same bytes in more passes over memory (BENCHMARKS.md measures both): the same tensors, stored
arrays and fidelity figures (``Sums``: one summation order, spec §6.4, for the compiled loop and
its numpy twin, whatever the CPU or thread count), so an archive packed without the loops is the
same file. ``TALLPACK_NO_KERNELS=1`` in the environment makes a process use the fallbacks (the
tests compare the two).
"""

from __future__ import annotations

import contextlib
import importlib
import math
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from types import ModuleType

import numpy as np


def _load() -> ModuleType | None:
    """The compiled module, or None: not built (no compiler at install time), or turned off."""
    if os.environ.get("TALLPACK_NO_KERNELS", "") not in ("", "0"):
        return None
    try:  # by name: a C module is no node in the layer contracts' import graph
        return importlib.import_module(f"{__package__}._kernels")
    except ImportError:
        return None


_kernels = _load()

#: Whether the compiled loops are in use (``tallpack --version`` says so).
COMPILED: bool = _kernels is not None

#: The compiled checks of the manifest's strict JSON (``_kernels.json_pairs``, ``json_check``), or
#: None: container.py's Python twins run (the same verdicts; the tests compare them).
json_pairs = getattr(_kernels, "json_pairs", None)
json_check = getattr(_kernels, "json_check", None)

#: Elements a numpy fallback handles per operation: a block whose planes stay in cache.
BLOCK = 1 << 16
#: Elements ``_join_exponent_numpy`` handles per operation (eight bytes to an operation).
ROTATION_BLOCK = 1 << 20


def join_planes(planes: Sequence[np.ndarray], dst: np.ndarray) -> None:
    """Byte planes into elements: ``dst[:, i] = planes[i]`` for a C-contiguous uint8 ``dst`` of
    shape (n, k) and k contiguous planes of n bytes (codecs ``bytegroup`` and ``planes``)."""
    if _kernels is not None:
        _kernels.join_planes(planes, dst)
    else:
        _join_numpy(planes, dst)


def join_exponent(low: Sequence[np.ndarray], s: np.ndarray, t: np.ndarray, r: int, dst: np.ndarray) -> None:
    """``planes-exp``'s planes into elements (codecs.ExponentPlanes): the k - 2 low byte planes
    as they are, and the two top byte columns of ``dst`` (uint8, shape (n, k), k 2 or 4) from
    the stored planes S and T of rotation ``r``."""
    if _kernels is not None:
        _kernels.join_exponent(low, s, t, r, dst)
    else:
        _join_numpy(low, dst)
        _join_exponent_numpy(s, t, r, dst)


def _join_numpy(planes: Sequence[np.ndarray], dst: np.ndarray) -> None:
    """The first ``len(planes)`` columns of ``dst``: one strided copy per plane and block (several
    times faster than numpy's transposed copy, about twice as fast as whole-array planes)."""
    n = dst.shape[0]
    for i, plane in enumerate(planes):
        for j in range(0, n, BLOCK):
            dst[j : j + BLOCK, i] = plane[j : j + BLOCK]


def split_planes(src: np.ndarray, out: np.ndarray, r: int = 0) -> None:
    """Elements into byte planes, the writer's side of ``join_planes``: ``out[i] = src[:, i]`` for
    a C-contiguous uint8 ``src`` (n, k) and ``out`` (k, n). With ``r`` from 1 to 7 (k 2 or 4), the
    two top planes are then stored as planes-exp's S and T of rotation ``r`` (:func:`rotate`):
    the writer's side of ``join_exponent``, in the same pass."""
    if _kernels is not None:
        _kernels.split_planes(src, src.shape[1], r, out)
        return
    n, k = src.shape
    for j in range(0, n, BLOCK):
        block = src[j : j + BLOCK]
        for i in range(k):
            out[i, j : j + BLOCK] = block[:, i]
    if r:
        out[k - 1], out[k - 2] = rotate(out[k - 2].copy(), out[k - 1].copy(), r)


def rotate(lo: np.ndarray, hi: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray]:
    """planes-exp's stored planes (T, S) of rotation ``r`` for the top byte ``hi`` of each element
    and the one below ``lo``: ``T = (hi << r | lo >> (8 - r)) & 0xFF``, ``S = (hi & ~keep) | (lo &
    keep)``, keep being ``0xFF >> r``."""
    keep = 0xFF >> r
    t = ((hi << r) | (lo >> (8 - r))).astype(np.uint8)
    s = (hi & (0xFF ^ keep)) | (lo & keep)
    return t, s


def _join_exponent_numpy(s: np.ndarray, t: np.ndarray, r: int, dst: np.ndarray) -> None:
    """The two top byte columns of ``dst`` from S and T, in blocks that stay in cache, eight
    bytes to a numpy operation: ``hi = (S & ~keep) | T >> r`` and ``lo = (T << (8 - r) & 0xFF) |
    (S & keep)``, keep being ``0xFF >> r``."""
    keep = 0xFF >> r
    spread = np.uint64(0x0101010101010101)
    s_hi, s_lo, t_top, t_low = (np.uint64(v) * spread for v in (0xFF ^ keep, keep, keep, 0xFF >> (8 - r)))
    right, left = np.uint64(r), np.uint64(8 - r)
    n = dst.shape[0]
    block = ROTATION_BLOCK
    whole = n - n % 8
    t1, t2 = np.empty(block // 8, np.uint64), np.empty(block // 8, np.uint64)
    s64, t64 = s[:whole].view(np.uint64), t[:whole].view(np.uint64)
    for j in range(0, whole, block):
        end = min(j + block, whole)
        ss, tt = s64[j // 8 : end // 8], t64[j // 8 : end // 8]
        a, b = t1[: ss.size], t2[: ss.size]
        np.bitwise_and(ss, s_hi, out=a)
        np.right_shift(tt, right, out=b)
        np.bitwise_and(b, t_top, out=b)
        np.bitwise_or(a, b, out=a)
        dst[j:end, -1] = a.view(np.uint8)
        np.bitwise_and(tt, t_low, out=a)
        np.left_shift(a, left, out=a)
        np.bitwise_and(ss, s_lo, out=b)
        np.bitwise_or(a, b, out=a)
        dst[j:end, -2] = a.view(np.uint8)
    st, tl = s[whole:n], t[whole:n]
    dst[whole:, -1] = (st & (0xFF ^ keep)) | (tl >> r)
    dst[whole:, -2] = ((tl << (8 - r)) & 0xFF) | (st & keep)


def unpack_bits(packed: np.ndarray, out: np.ndarray) -> None:
    """Bits to 0/1 bytes, element i from bit i % 8 of byte i // 8 (LSB first; codec ``bitpack``):
    ``out`` (uint8) of n elements, ``packed`` of ceil(n / 8) bytes."""
    if _kernels is not None:
        _kernels.unpack_bits(packed, out)
    else:
        out[:] = np.unpackbits(packed, count=out.size, bitorder="little")


def bitsplit(src: memoryview | np.ndarray, itemsize: int, heads: np.ndarray, low: np.ndarray) -> int | None:
    """Codec ``bitsplit``'s split (codecs.BitSplit.encode) in one compiled pass: each of the
    ``itemsize``-byte unsigned elements of ``src`` gets its head byte in ``heads`` (uint8, one per
    element), and its low bits are appended to one LSB-first bit stream in ``low`` (uint8, at least
    ``ceil(n * (8 * itemsize - 3) / 8)`` bytes); returns the stream's length in bytes. None, doing
    nothing, without the compiled loops (the caller then runs its numpy split: the same bytes)."""
    if _kernels is None:
        return None
    return _kernels.bitsplit(src, itemsize, heads, low)


def bitjoin(heads: np.ndarray, low: memoryview, itemsize: int, out: memoryview) -> int | None:
    """Codec ``bitsplit``'s elements (codecs.BitSplit.decode_into) from their head bytes and low-bit
    stream in one compiled pass, into ``out`` (``itemsize`` bytes an element, little-endian): 0, or
    which check failed (-1 a head names no element of ``itemsize`` bytes, -2 the stream is not as
    long as the heads say, -3 its padding bits are not zero; ``out`` then holds nothing of use).
    None, doing nothing, without the compiled loops (the caller then joins in numpy)."""
    if _kernels is None:
        return None
    return _kernels.bitjoin(heads, low, itemsize, out)


def permute_key(src: np.ndarray, key: np.ndarray, shift: int, bits: int, out: np.ndarray) -> bool:
    """``out = src[np.argsort((key >> shift) & (2**bits - 1), kind="stable")]`` in two compiled
    passes (a counting sort), for unsigned ``src`` and ``key`` of one itemsize and length, ``bits``
    at most 11 (the exact tier's exponent order, encodings/exact.py). False, doing nothing,
    without the compiled loops (the caller then sorts in numpy: the same order)."""
    if _kernels is None:
        return False
    _kernels.permute_key(src, key, src.itemsize, shift, bits, out)
    return True


def unpermute_key(src: np.ndarray, key: np.ndarray, shift: int, bits: int, out: np.ndarray) -> bool:
    """The inverse of :func:`permute_key` with the same ``key``: ``out[perm] = src``, ``perm`` that
    stable order, in two compiled passes. False, doing nothing, without the compiled loops."""
    if _kernels is None:
        return False
    _kernels.unpermute_key(src, key, src.itemsize, shift, bits, out)
    return True


#: Elements per part from which a rebuild outside a pool (``get_tensor``) splits its loop across
#: threads: parts of about a millisecond, against the 50-100 us a helper takes to wake. A 4 MB
#: float32 tensor is one part: split in two it took 5-15% longer, timed in turns in one process on
#: the 2-core machine here, and no less across processes (BENCHMARKS.md, twelfth round); a 16 MB
#: one is two.
SPLIT_ELEMENTS = 1 << 21
_local = threading.local()
_helpers: ThreadPoolExecutor | None = None
_helpers_lock = threading.Lock()


def _after_fork_in_child() -> None:
    """A forked child has none of the parent's helper threads: it starts its own when it needs them."""
    global _helpers, _helpers_lock
    _helpers, _helpers_lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def mark_worker() -> None:
    """Mark this thread as one of a pool that already runs loops side by side (the reader's
    threads, one tensor each): ``tall_f32`` then runs on it alone."""
    _local.worker = True


@contextlib.contextmanager
def as_worker() -> Iterator[None]:
    """Within the block, this thread is one of a pool's workers (:func:`mark_worker`)."""
    was = getattr(_local, "worker", False)
    _local.worker = True
    try:
        yield
    finally:
        _local.worker = was


def cores() -> int:
    """The CPUs this process may run on: its affinity (what ``taskset``, a cgroup's cpuset or a
    container runtime leaves it), else ``os.cpu_count()``; at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # no affinity on this platform
        return os.cpu_count() or 1


def default_threads() -> int:
    """The threads a reader or writer uses when not told: the usable cores, at most 8."""
    return min(8, cores())


def _helper_pool() -> ThreadPoolExecutor:
    global _helpers
    with _helpers_lock:
        if _helpers is None:
            _helpers = ThreadPoolExecutor(max(1, min(7, cores() - 1)), thread_name_prefix="tallpack-loop",
                                          initializer=mark_worker)  # a split from a helper: unsplit, never a wait on itself
        return _helpers


def tall_planes(base: Sequence[np.ndarray], rb: int, merged: Sequence[np.ndarray], rm: int, mask: np.ndarray,
                out: np.ndarray, threads: int = 1, bits: bool = False) -> None:
    """``out = base + mask * merged`` as ``tall_f32``, with base and merged given as the four
    stored byte planes of float32 elements and each one's rotation (``Planes.planar``: 0 for
    ``planes``, r for ``planes-exp``): joined on the way, no decoded copy of either. ``out`` is
    float32 of n elements, every plane n bytes, and ``mask`` n 0/1 bytes (with ``bits``, its
    ceil(n / 8) packed bytes, as ``tall_f32``)."""
    _from_planes("tall_planes", _tall_planes_numpy, base, rb, merged, rm, mask, out, threads, bits)


def _from_planes(name: str, fallback, base: Sequence[np.ndarray], rb: int, merged: Sequence[np.ndarray], rm: int,
                 mask: np.ndarray, out: np.ndarray, threads: int, bits: bool) -> None:
    """The compiled loop ``name`` over ``out`` in ``_split``'s parts, or ``fallback`` without the
    compiled loops or for an unaligned output (a packed mask unpacked first)."""
    if _kernels is None or not out.flags.aligned:
        fallback(base, rb, merged, rm, _unpacked(mask, out.size) if bits else mask, out)
        return
    run = getattr(_kernels, name)
    _split(out.size, threads, lambda a, b: run(
        [p[a:b] for p in base], rb, [p[a:b] for p in merged], rm, mask_part(mask, a, b, bits), out[a:b], bits))


def _unpacked(packed: np.ndarray, n: int) -> np.ndarray:
    out = np.empty(n, np.uint8)
    unpack_bits(packed, out)
    return out


def mask_part(mask: np.ndarray, a: int, b: int, bits: bool) -> np.ndarray:
    """Elements [a, b) of a mask of bytes, or of packed bits (``a`` then a multiple of 8: ``_split``'s
    cuts, a chunk's first element)."""
    return mask[a // 8 : (b + 7) // 8] if bits else mask[a:b]


def tall_planes_bf16(base: Sequence[np.ndarray], rb: int, merged: Sequence[np.ndarray], rm: int, mask: np.ndarray,
                     out: np.ndarray, threads: int = 1, bits: bool = False) -> None:
    """``tall_planes`` for a bfloat16 base and output: ``base`` the two stored byte planes of the
    bfloat16 elements (``planes``: r = 0; ``planes-exp``: S and T of rotation ``rb``), ``merged``
    float32's four, and ``out`` n 16-bit elements (any 2-byte dtype), each the float32 sum rounded
    to nearest even, as torch's ``addcmul(base.float(), mask.float(), merged).to(torch.bfloat16)``."""
    _from_planes("tall_planes_bf16", _tall_planes_bf16_numpy, base, rb, merged, rm, mask, out, threads, bits)


def tall_planes_f16(base: Sequence[np.ndarray], rb: int, merged: Sequence[np.ndarray], rm: int, mask: np.ndarray,
                    out: np.ndarray, threads: int = 1, bits: bool = False) -> None:
    """``tall_planes_bf16`` for a float16 base and output: each float32 sum rounded to float16
    to nearest even (overflow to infinity, subnormals kept), as torch's ``.to(torch.float16)``."""
    _from_planes("tall_planes_f16", _tall_planes_f16_numpy, base, rb, merged, rm, mask, out, threads, bits)


def _tall_planes_f16_numpy(base: Sequence[np.ndarray], rb: int, merged: Sequence[np.ndarray], rm: int,
                           mask: np.ndarray, out: np.ndarray) -> None:
    """``tall_planes_f16`` in numpy (numpy's float16 conversions round as IEEE does)."""
    _tall_planes_16_numpy(base, rb, merged, rm, mask, out.reshape(-1).view(np.float16),
                          lambda h: h.view("<f2").astype(np.float32), lambda v: v.astype(np.float16))


def _tall_planes_bf16_numpy(base: Sequence[np.ndarray], rb: int, merged: Sequence[np.ndarray], rm: int,
                            mask: np.ndarray, out: np.ndarray) -> None:
    """``tall_planes_bf16`` in numpy: the base's 16 bits widened to float32, the sum rounded to
    nearest even (a NaN gives 0xFFFF)."""
    def narrow(v: np.ndarray) -> np.ndarray:
        u = v.view(np.uint32)
        rounded = ((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)
        rounded[(u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)] = 0xFFFF
        return rounded

    _tall_planes_16_numpy(base, rb, merged, rm, mask, out.reshape(-1).view(np.uint16),
                          lambda h: (h.view("<u2").astype(np.uint32) << np.uint32(16)).view(np.float32), narrow)


def _tall_planes_16_numpy(base: Sequence[np.ndarray], rb: int, merged: Sequence[np.ndarray], rm: int,
                          mask: np.ndarray, dst: np.ndarray, widen, narrow) -> None:
    """The 16-bit rebuilds in numpy, in blocks: each side joined, the base widened, ``b + m * t``
    in float32, narrowed into ``dst``."""
    n = dst.size
    sides = (np.empty((min(n, BLOCK), 2), np.uint8), np.empty((min(n, BLOCK), 4), np.uint8))
    for a in range(0, n, BLOCK):
        b = min(n, a + BLOCK)
        bb, mb = sides[0][: b - a], sides[1][: b - a]
        _join_stored([p[a:b] for p in base], rb, bb)
        _join_stored([p[a:b] for p in merged], rm, mb)
        with np.errstate(invalid="ignore", over="ignore"):  # IEEE results, as the C loop's: inf * 0, overflow
            v = np.add(widen(bb.reshape(-1)), mask[a:b].astype(np.float32) * mb.view("<f4").reshape(-1))
            dst[a:b] = narrow(v)


def _join_stored(planes: Sequence[np.ndarray], r: int, dst: np.ndarray) -> None:
    """Stored planes into the elements of ``dst`` (uint8, (n, k)): ``planes`` as they are (r = 0),
    or ``planes-exp``'s k - 2 low planes, then S and T of rotation r."""
    if r:
        _join_numpy(planes[:-2], dst)
        _join_exponent_numpy(planes[-2], planes[-1], r, dst)
    else:
        _join_numpy(planes, dst)


def _tall_planes_numpy(base: Sequence[np.ndarray], rb: int, merged: Sequence[np.ndarray], rm: int,
                       mask: np.ndarray, out: np.ndarray) -> None:
    """``tall_planes`` in numpy, in blocks: each side joined, then ``b + m * t`` in float32 (the
    product is exact, so the sum's one rounding is ``addcmul``'s)."""
    n = out.size
    sides = [np.empty((min(n, BLOCK), 4), np.uint8) for _ in range(2)]
    for a in range(0, n, BLOCK):
        b = min(n, a + BLOCK)
        joined = []
        for planes, r, buf in ((base, rb, sides[0]), (merged, rm, sides[1])):
            dst = buf[: b - a]
            _join_stored([p[a:b] for p in planes], r, dst)
            joined.append(dst.view("<f4").reshape(-1).astype(np.float32, copy=False))
        with np.errstate(invalid="ignore", over="ignore"):  # IEEE results, as the C loop's: inf * 0, overflow
            np.add(joined[0], mask[a:b].astype(np.float32) * joined[1], out=out[a:b])


#: Elements of a fidelity block (spec §6.4; ``MASK_BLOCK`` in _kernels.c) and its float32 lanes.
SUM_BLOCK, SUM_LANES = 2048, 8
#: The exponent fields of float32: a block sum's bin.
_EXPONENTS = 256


#: The most elements :meth:`Sums.add` takes in one pass (its thread's scratch: 16 bytes each, 4 MB;
#: half as many cost 20% more time a call, in numpy's per-call overheads).
_SUMS_STEP = 128 * SUM_BLOCK


class Sums:
    """One task's fidelity sums (``tall.Fidelity``): sum tau^2, rec^2, rec*tau and (rec - tau)^2 over
    the elements of its tensors, in one order whatever the build, CPU or thread count (spec §6.4):
    each tensor in blocks of SUM_BLOCK elements from its start; within a block, float32 lane j
    (of SUM_LANES) adds the float32 products of the elements i with i % 8 == j, in index order, from
    +0.0; the block's sum is ``((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7))`` in float32; the
    blocks' sums are added exactly (each an integer multiple of 2^-149: its significand in a bin per
    exponent) and the total rounded once to float64 (:meth:`totals`). So the figures do not depend
    on how the packer cuts a tensor into calls, nor on the order of the tensors.

    ``state`` is what the compiled loops (``_kernels.tall_mask_f32``, ``tall_mask_tv``) update in
    place: int64 bins (4, 256), the open block's float32 lanes (4, 8), a float64 sum per figure of
    the blocks whose sum is +-inf or NaN, and the open block's element count. A call covers
    elements [at, at + n) of one tensor: ``at`` a multiple of SUM_BLOCK closes the block the tensor
    before left open; else the call goes on with the open block. :meth:`add` is the numpy twin.

    >>> s = Sums(); s.add(np.ones(3, np.float32), np.ones(3, np.float32)); s.totals()
    (3.0, 3.0, 3.0, 0.0)
    """

    def __init__(self) -> None:
        self.state = np.zeros(1045, np.int64)  # 8360 bytes, as _kernels.c's fidelity_state

    def __deepcopy__(self, memo: dict) -> "Sums":
        copy = Sums()
        copy.state[:] = self.state
        return copy

    @property
    def _bins(self) -> np.ndarray:
        return self.state[:1024].reshape(4, _EXPONENTS)

    @property
    def _lanes(self) -> np.ndarray:
        return self.state[1024:1040].view(np.float32).reshape(4, SUM_LANES)

    @property
    def _special(self) -> np.ndarray:
        return self.state[1040:1044].view(np.float64)

    def _begin(self, at: int) -> int:
        """Check that a call for elements from ``at`` may go on from here; returns the open block's
        elements (0 after closing the one a tensor before left)."""
        fill = int(self.state[1044])
        if at < 0 or (at % SUM_BLOCK and fill != at % SUM_BLOCK):
            raise ValueError(f"fidelity sums: elements from {at} do not follow the {fill} of the open block")
        if at % SUM_BLOCK == 0 and fill:
            self._close(self._lanes[:, None, :].copy())
            self._lanes[...] = 0
            fill = self.state[1044] = 0
        return fill

    def _close(self, lanes: np.ndarray) -> None:
        """Blocks' lanes (4, blocks, 8) into the bins."""
        lanes = lanes.astype(np.float32, copy=False)
        l0, l1, l2, l3, l4, l5, l6, l7 = (lanes[..., j] for j in range(SUM_LANES))
        with np.errstate(all="ignore"):  # float32, each addition rounded (IEEE: inf past the range)
            block = ((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7))
        u = block.view(np.uint32)
        e = (u >> 23) & 0xFF
        m = ((u & 0x7FFFFF) | np.where(e > 0, 0x800000, 0).astype(np.uint32)).astype(np.int64)
        m = np.where(u >> 31 != 0, -m, m)
        finite = e != 0xFF
        # One bincount for the four figures' bins: its float64 sums are exact (a significand is
        # under 2^24, so up to 2^29 blocks a call).
        at = (np.arange(4)[:, None] * _EXPONENTS + e)[finite]
        self.state[:4 * _EXPONENTS] += np.bincount(at, m[finite], 4 * _EXPONENTS).astype(np.int64)
        if not finite.all():
            for k in range(4):
                for v in block[k][~finite[k]]:  # +-inf or NaN: never within spec §6.3's bound
                    self._special[k] += float(v)

    def add(self, tau: np.ndarray, rec: np.ndarray, at: int = 0) -> None:
        """Elements [at, at + n) of a tensor: ``tau`` and ``rec`` float32 (n each), their sums in
        the compiled loops' order (the numpy twin: the same bits)."""
        tau = np.ascontiguousarray(tau, np.float32).reshape(-1)
        rec = np.ascontiguousarray(rec, np.float32).reshape(-1)
        if tau.size > _SUMS_STEP:  # in pieces: the scratch below stays a few MB whatever the tensor
            for a in range(0, tau.size, _SUMS_STEP):
                self.add(tau[a:a + _SUMS_STEP], rec[a:a + _SUMS_STEP], at + a)
            return
        fill = self._begin(at)
        n = tau.size
        if n == 0:
            return
        total = fill + n
        blocks = -(-total // SUM_BLOCK)
        rows = SUM_BLOCK // SUM_LANES
        # The blocks laid out (rows, blocks, 8), element i of block b at [i // 8, b, i % 8], so that
        # one vector addition per row adds it to every block's lanes (tau and rec moved there once,
        # not each of the four products); +0.0 where a block has no element (adding +0.0 changes no
        # lane: a lane is never -0.0).
        tt, rr, err = (_scratch(name, blocks * SUM_BLOCK).reshape(rows, blocks, SUM_LANES)
                       for name in ("sums.tau", "sums.rec", "sums.err"))
        _to_grid(tau, fill, tt)
        _to_grid(rec, fill, rr)
        # Row 0 the lanes each block starts from (the open block's, then +0.0). numpy reduces axis 0
        # of a C-contiguous array one row at a time, in order (the tests compare it with the C
        # loop): the lanes' additions in index order.
        grid = _scratch("sums.grid", (rows + 1) * blocks * SUM_LANES).reshape(rows + 1, blocks, SUM_LANES)
        lanes = np.empty((4, blocks, SUM_LANES), np.float32)
        start = self._lanes
        grid[0] = 0
        with np.errstate(all="ignore"):  # IEEE results, as the C loop's
            np.subtract(rr, tt, out=err)
            for k, (x, y) in enumerate(((tt, tt), (rr, rr), (rr, tt), (err, err))):
                np.multiply(x, y, out=grid[1:])
                grid[0, 0] = start[k]
                np.add.reduce(grid, axis=0, out=lanes[k])
        done = blocks if total % SUM_BLOCK == 0 else blocks - 1
        if done:
            self._close(lanes[:, :done])
        self._lanes[...] = lanes[:, done] if done < blocks else 0
        self.state[1044] = total % SUM_BLOCK

    def totals(self) -> tuple[float, float, float, float]:
        """The four sums, each rounded once to float64 from its exact value (the open block's
        sum included); a sum with a block past float32's range is that float64 sum of theirs."""
        bins, special = self._bins, self._special
        fill = int(self.state[1044])
        lanes = self._lanes.astype(np.float32)
        out = []
        for k in range(4):
            if special[k] != 0 or np.isnan(special[k]):
                out.append(float(special[k]))
                continue
            exact = sum(int(v) << max(e - 1, 0) for e, v in enumerate(bins[k].tolist()) if v)  # units of 2^-149
            if fill:
                l0, l1, l2, l3, l4, l5, l6, l7 = lanes[k]
                with np.errstate(all="ignore"):
                    last = float(((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7)))
                if not math.isfinite(last):
                    out.append(last)
                    continue
                exact += int(last * 2.0**149)
            out.append(exact / (1 << 149))  # int / int: correctly rounded
        return out[0], out[1], out[2], out[3]


def _scratch(name: str, n: int) -> np.ndarray:
    """n float32 elements of a buffer this thread reuses (``Sums.add``'s: fresh pages per call cost
    as much as its arithmetic); valid until its next use."""
    bufs = getattr(_local, "scratch", None)
    if bufs is None:
        bufs = _local.scratch = {}
    b = bufs.get(name)
    if b is None or b.size < n:
        b = bufs[name] = np.empty(n, np.float32)
    return b[:n]


def _to_grid(v: np.ndarray, fill: int, grid: np.ndarray) -> None:
    """``v``, elements from ``fill`` of a run of blocks, into ``grid`` (rows, blocks, 8): element i
    of block b at [i // 8, b, i % 8], +0.0 where a block has none."""
    rows = grid.shape[0]
    head = min(v.size, -fill % SUM_BLOCK)  # what completes the open block (none when fill is 0)
    full = (v.size - head) // SUM_BLOCK
    tail = v.size - head - full * SUM_BLOCK
    first = 1 if fill else 0
    if full:  # the bulk: each 8 elements (32 bytes) as one item, a 2-D transpose (4x faster than floats)
        items = np.dtype((np.void, SUM_LANES * 4))
        np.copyto(grid.view(items)[:, first:first + full, 0],
                  v[head:head + full * SUM_BLOCK].view(items).reshape(full, rows).T)
    for b, at, part in ((0, fill, v[:head]), (first + full, 0, v[v.size - tail:])):
        if part.size:
            block = np.zeros(SUM_BLOCK, np.float32)
            block[at:at + part.size] = part
            grid[:, b] = block.reshape(rows, SUM_LANES)


def tall_mask(tau: np.ndarray, merged: np.ndarray, lam: float, mask: np.ndarray, sums: Sums | None = None,
              at: int = 0) -> int | None:
    """The packer's TALL mask ``|tau| > lam * |merged - tau|`` (float32, lam rounded to float32)
    written into ``mask`` (n bytes), and the fidelity sums of ``rec = mask * merged`` against
    ``tau`` added to ``sums``, when given (elements [at, at + n) of a tensor), in one pass; returns
    the set bits. None, doing nothing, without the compiled loops or for unaligned floats (the
    caller then runs ``tall.tall_mask`` and ``Fidelity.add``: the same mask bits and sums)."""
    if _kernels is None or not (tau.flags.aligned and merged.flags.aligned):
        return None
    return _kernels.tall_mask_f32(tau, merged, lam, mask, (Sums() if sums is None else sums).state, at)


#: The element kinds ``tv_sum`` and ``tall_mask_tv`` widen to float32: float32, bfloat16 and
#: float16 (the 16-bit ones given as their bits).
KINDS = ("float32", "bfloat16", "float16")


def _fit(*arrays: np.ndarray) -> bool:
    return all(a.flags.aligned and a.flags.c_contiguous for a in arrays)


def tv_sum(base: np.ndarray, thetas: Sequence[np.ndarray], kind: str, out: np.ndarray, parts: int = 1) -> bool:
    """Task Arithmetic's merged vector of one block in one compiled pass: ``out = ((tau_0 + 0) +
    tau_1) + ...`` with ``tau_t = widen(thetas[t]) - widen(base)`` in float32, each widening exact
    (``kind``: one of KINDS), never written to memory: the same operations in the same order as
    ``tall.task_vector`` then ``TaskArithmetic.combine``, so the same bits. In up to ``parts``
    element ranges at once. False, doing nothing, without the compiled loops or for unaligned arrays."""
    if _kernels is None or not thetas or not _fit(base, out, *thetas):
        return False
    k = KINDS.index(kind)
    _run_cuts(_cuts(out.size, parts), lambda a, b: _kernels.tv_sum(base[a:b], [x[a:b] for x in thetas], k, out[a:b]))
    return True


def tall_mask_tv(theta: np.ndarray, base: np.ndarray, kind: str, merged: np.ndarray, lam: float, mask: np.ndarray,
                 sums: Sums | None = None, at: int = 0) -> int | None:
    """:func:`tall_mask` with ``tau = widen(theta) - widen(base)`` computed a block at a time on the
    way (``kind`` as for :func:`tv_sum`): the same mask bits and sums (into ``sums``, when given),
    the task vector never written to memory. None, doing nothing, without the compiled loops or for
    unaligned arrays."""
    if _kernels is None or not _fit(theta, base, merged):
        return None
    return _kernels.tall_mask_tv(theta, base, KINDS.index(kind), merged, lam, mask,
                                 (Sums() if sums is None else sums).state, at)


def max_abs_diff(theta: np.ndarray, base: np.ndarray, kind: str) -> float | None:
    """The largest ``|widen(theta) - widen(base)|`` in float32 (a task vector's largest magnitude,
    ``kind`` as for :func:`tv_sum`), in one compiled pass; ``inf`` when a difference is infinite or
    NaN; None without the compiled loops or for unaligned arrays."""
    if _kernels is None or not _fit(theta, base):
        return None
    bits = _kernels.max_abs_diff(theta, base, KINDS.index(kind))
    return math.inf if bits >= 0x7F800000 else float(np.array(bits, np.uint32).view(np.float32))


# -- TIES (merging.Ties): ``base`` None makes ``thetas`` the float32 task vectors themselves ----------

def ties_hist(theta: np.ndarray, base: np.ndarray | None, kind: str, b: int, hist: np.ndarray) -> None:
    """TIES' threshold selection over one task's block: ``hist`` (65536 int64 counts) += the counts
    of the high 16 bits of ``|tau|``'s float32 bits (``b`` < 0), or, among the elements whose high
    bits are ``b``, of their low 16 bits; ``tau = widen(theta) - widen(base)`` as :func:`tv_sum`."""
    if _kernels is not None and _fit(theta, hist, *(() if base is None else (base,))):
        _kernels.ties_hist(theta, _NO_BASE if base is None else base, KINDS.index(kind), b, hist)
    else:
        ties_hist_numpy(theta, base, kind, b, hist)


def ties_hist_numpy(theta: np.ndarray, base: np.ndarray | None, kind: str, b: int, hist: np.ndarray) -> None:
    """:func:`ties_hist` in numpy (the fallback: the same counts)."""
    for a in range(0, theta.size, BLOCK):
        bits = _tv_numpy(theta[a : a + BLOCK], None if base is None else base[a : a + BLOCK], kind).view(np.uint32)
        bits = bits & np.uint32(0x7FFFFFFF)
        if b >= 0:
            bits = bits[bits >> 16 == b] & np.uint32(0xFFFF)
        hist += np.bincount(bits >> 16 if b < 0 else bits, minlength=1 << 16)


def ties_signs(base: np.ndarray | None, thetas: Sequence[np.ndarray], kind: str, thresholds: np.ndarray,
               parts: int = 1) -> tuple[int, int]:
    """How many elements of one block have a TIES trimmed sum ``S = ((+0.0 + r_0) + r_1) + ...``
    above 0 and below 0, ``r_t = tau_t`` where ``|tau_t| >= thresholds[t]`` (float32), else 0."""
    n = thetas[0].size
    if _kernels is not None and _fit(thresholds, *thetas, *(() if base is None else (base,))):
        k, found = KINDS.index(kind), {}

        def run(a: int, b: int) -> None:
            found[a] = _kernels.ties_signs(_NO_BASE if base is None else base[a:b], [x[a:b] for x in thetas],
                                           k, thresholds, b - a)
        _run_cuts(_cuts(n, parts), run)
        return sum(p for p, _ in found.values()), sum(q for _, q in found.values())
    return ties_signs_numpy(base, thetas, kind, thresholds)


def ties_signs_numpy(base: np.ndarray | None, thetas: Sequence[np.ndarray], kind: str, thresholds: np.ndarray
                     ) -> tuple[int, int]:
    """:func:`ties_signs` in numpy (the fallback: the same counts)."""
    n, pos, neg = thetas[0].size, 0, 0
    for a in range(0, n, BLOCK):
        s = _ties_sum_numpy(base, thetas, kind, thresholds, a, min(n, a + BLOCK))[0]
        pos, neg = pos + int(np.count_nonzero(s > 0)), neg + int(np.count_nonzero(s < 0))
    return pos, neg


def ties_merge(base: np.ndarray | None, thetas: Sequence[np.ndarray], kind: str, thresholds: np.ndarray,
               majority: float, out: np.ndarray, counts: np.ndarray, parts: int = 1) -> None:
    """TIES' disjoint sum of one block (spec 6.1.9) into ``out`` (float32) and ``counts`` (uint8):
    ``out = (+0.0 + k_0) + k_1 + ...``, ``k_t = r_t`` (as :func:`ties_signs`) where its sign is the
    elected one, S's, or ``majority``'s where S is 0 (where both are 0, the negative ones), else 0;
    ``counts``: how many k_t are not 0. In up to ``parts`` element ranges at once."""
    if _kernels is not None and _fit(thresholds, out, counts, *thetas, *(() if base is None else (base,))):
        k = KINDS.index(kind)
        _run_cuts(_cuts(out.size, parts), lambda a, b: _kernels.ties_merge(
            _NO_BASE if base is None else base[a:b], [x[a:b] for x in thetas], k, thresholds, majority,
            out[a:b], counts[a:b]))
    else:
        ties_merge_numpy(base, thetas, kind, thresholds, majority, out, counts)


def ties_merge_numpy(base: np.ndarray | None, thetas: Sequence[np.ndarray], kind: str, thresholds: np.ndarray,
                     majority: float, out: np.ndarray, counts: np.ndarray) -> None:
    """:func:`ties_merge` in numpy (the fallback: the same bits)."""
    zero = np.float32(0)
    for a in range(0, out.size, BLOCK):
        b = min(out.size, a + BLOCK)
        s, taus = _ties_sum_numpy(base, thetas, kind, thresholds, a, b)
        positive = np.where(s != 0, s, np.float32(majority)) > 0
        m, c = out[a:b], counts[a:b]
        m[...], c[...] = 0, 0
        for tau, thr in zip(taus, thresholds):
            keep = (np.abs(tau) >= thr) & np.where(positive, tau > 0, tau < 0)
            m += np.where(keep, tau, zero)
            c += keep


def _ties_sum_numpy(base: np.ndarray | None, thetas: Sequence[np.ndarray], kind: str, thresholds: np.ndarray,
                    a: int, b: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """The trimmed sum S of elements [a, b) and their task vectors (the fallbacks' shared start)."""
    taus = [_tv_numpy(x[a:b], None if base is None else base[a:b], kind) for x in thetas]
    s = np.zeros(b - a, np.float32)  # +0.0, then the r_t in task order
    for tau, thr in zip(taus, thresholds):
        s += np.where(np.abs(tau) >= thr, tau, np.float32(0))
    return s, taus


def _tv_numpy(theta: np.ndarray, base: np.ndarray | None, kind: str) -> np.ndarray:
    """``widen(theta) - widen(base)`` in float32 (``theta`` itself without a base)."""
    if base is None:
        return theta.astype(np.float32, copy=False)
    return _widen(theta, kind) - _widen(base, kind)


def _widen(x: np.ndarray, kind: str) -> np.ndarray:
    if kind == "float32":
        return x.view(np.float32)
    if kind == "float16":
        return x.view(np.float16).astype(np.float32)
    return (x.view(np.uint16).astype(np.uint32) << 16).view(np.float32)  # bfloat16: its bits, widened exactly


#: The compiled TIES loops' "no base" (the thetas are the task vectors).
_NO_BASE = b""


#: The element kinds of ``merge_apply``'s base and output: ``KINDS`` and float64.
MERGE_KINDS = (*KINDS, "float64")
#: ``merge_apply``'s flags: the output holds an inf or NaN; the base or the direction does.
OUT_NOT_FINITE, IN_NOT_FINITE = 1, 2


def merge_apply(theta: np.ndarray, kind: str, d: np.ndarray, masks: Sequence[np.ndarray], k: int,
                counts: np.ndarray | None, alpha: np.float32, out: np.ndarray, parts: int = 1) -> int | None:
    """A merged model's tensor in one compiled pass: ``out = narrow(widen(theta) + alpha * d')`` in
    float32 (``kind``: one of MERGE_KINDS, theta's and out's, 16-bit floats as their bits; float64
    rounded to float32 first), ``d' = d * [sum of masks >= k]`` (0/1 bytes; none: d as it is), then
    ``/ max(counts, 1)`` when ``counts`` (uint8) is given: the bits of ``merging.merge_direction``
    and ``apply_direction``. In up to ``parts`` element ranges at once. Returns OUT_NOT_FINITE and
    IN_NOT_FINITE or'ed (theta or d' holds an inf or NaN); None, doing nothing, without the
    compiled loops or for unaligned arrays."""
    run = getattr(_kernels, "merge_apply", None)
    if run is None or not _fit(theta, d, out, *masks, *(() if counts is None else (counts,))):
        return None
    kd, none, flags = MERGE_KINDS.index(kind), b"", [0]

    def part(a: int, b: int) -> None:
        got = run(theta[a:b], kd, d[a:b], [m[a:b] for m in masks], k, none if counts is None else counts[a:b],
                  float(alpha), out[a:b])
        flags.append(got)  # (list.append: atomic across the helper threads)
    _run_cuts(_cuts(d.size, parts), part)
    result = 0
    for f in flags:
        result |= f
    return result


#: Elements from which ``tv_sum`` splits its pass (the helper's wake-up,
#: 50-100 us here, against about 0.2 ms of work).
PARTS_FROM = 1 << 17


def _cuts(n: int, parts: int) -> list[int]:
    """Range bounds for up to ``parts`` parts of ``n`` elements (multiples of 64), none smaller
    than half of ``PARTS_FROM``; one inside a pool's worker or for fewer than ``PARTS_FROM`` elements."""
    if getattr(_local, "worker", False) or n < PARTS_FROM:
        parts = 1
    parts = max(1, min(parts, n // (PARTS_FROM // 2)))
    return [n * i // parts // 64 * 64 for i in range(parts)] + [n]


def tall_f32(base: np.ndarray, merged: np.ndarray, mask: np.ndarray, out: np.ndarray, threads: int = 1,
             bits: bool = False) -> bool:
    """``out = base + mask * merged`` in one pass (float32 arrays, a 0/1 uint8 mask, all
    contiguous and of one length; with ``bits``, the mask's ceil(n / 8) bytes packed as codec
    ``bitpack`` stores them, which the loop reads as they are), bit-identical to
    ``torch.addcmul``; False, doing nothing, without the compiled loops or for unaligned floats
    (the caller then runs its torch path). A large tensor is split across up to ``threads``
    threads, unless this thread is a pool's worker (:func:`mark_worker`)."""
    if _kernels is None or not (base.flags.aligned and merged.flags.aligned and out.flags.aligned):
        return False
    if _parts(out.size, threads) == 1:  # most tensors: the arrays as they are, no flat views or slices
        _kernels.tall_f32(base, merged, mask, out, bits)
        return True
    base, merged, mask, out = base.reshape(-1), merged.reshape(-1), mask.reshape(-1), out.reshape(-1)
    _split(out.size, threads, lambda a, b: _kernels.tall_f32(base[a:b], merged[a:b], mask_part(mask, a, b, bits),
                                                             out[a:b], bits))
    return True


def _parts(n: int, threads: int) -> int:
    """How many parts ``_split`` cuts ``n`` elements into: one inside a pool's worker, else up to
    ``threads``, one per SPLIT_ELEMENTS."""
    return 1 if getattr(_local, "worker", False) else max(1, min(threads, n // SPLIT_ELEMENTS))


def in_parts(count: int, parts: int, run: Callable[[int, int], None]) -> None:
    """``run(a, b)`` over ``[0, count)`` in up to ``parts`` contiguous ranges at once: the first on
    this thread, the others on the helper threads (for work that mostly releases the GIL, as the
    compiled loops do). Inside a pool's worker (:func:`mark_worker`), one call. Returns once every
    range is done; the first error, after that."""
    parts = 1 if getattr(_local, "worker", False) else max(1, min(parts, count))
    _run_cuts([count * i // parts for i in range(parts + 1)], run)


def _split(n: int, threads: int, run) -> None:
    """``run(a, b)`` over ``[0, n)``: in one call, or, for a large ``n`` outside a pool's worker
    (:func:`mark_worker`), in up to ``threads`` parts, all but the first on the helper threads."""
    parts = _parts(n, threads)
    _run_cuts([n * i // parts // 64 * 64 for i in range(parts)] + [n], run)  # whole bytes of a packed mask


def _run_cuts(cuts: list[int], run: Callable[[int, int], None]) -> None:
    """``run`` over each range between consecutive ``cuts``: the first on this thread, the others on
    the helper threads; returns once every range is done (the first error, after that)."""
    if len(cuts) <= 2:
        run(cuts[0], cuts[-1])
        return
    futures = [_helper_pool().submit(run, a, b) for a, b in zip(cuts[1:-1], cuts[2:])]
    try:
        run(cuts[0], cuts[1])
    finally:
        errors = _all_done(futures)  # every range is done before anything is reused
    for e in errors:
        if e is not None:
            raise e


def _all_done(futures: list[Future]) -> list[BaseException | None]:
    """Each future's exception, once every one has ended: a Ctrl-C meanwhile (or another signal's
    exception: the command line's SIGTERM and SIGHUP) cancels those not started and waits for the
    running ones (a range each: milliseconds), then is raised, so that no helper still writes into
    an output the caller has given up."""
    interrupted: BaseException | None = None
    errors: list[BaseException | None] = []
    for f in futures:
        while True:
            try:
                errors.append(f.exception())
                break
            except CancelledError:
                errors.append(None)
                break
            except BaseException as e:  # noqa: BLE001 (a signal handler's: raised once the ranges end)
                interrupted = interrupted or e
                for other in futures:
                    other.cancel()
    if interrupted is not None:
        raise interrupted
    return errors
