"""TALL masks (Wang, Dimitriadis et al., ICML 2024): the per-element formulas, in float32.

These functions work on one block of one tensor; the packer streams a family through them.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._torch import torch
from . import kernels
from .dtypes import narrow
from .memory import ThreadBuffers

#: The paper's lambda grid; a task's mask is ``|tau_t| > lambda_t * |tau_MTL - tau_t|``.
LAMBDA_GRID: tuple[float, ...] = (0.2, 0.3, 0.4, 0.5, 0.6)
#: The data-free default lambda (see BENCHMARKS.md for how it compares with selected lambdas).
DEFAULT_LAMBDA = 0.4


class Workspace:
    """Named buffers reused from block to block, so the packer's arithmetic writes into memory it
    already has: fresh pages for every temporary cost the kernel's zeroing, as much as the
    arithmetic itself."""

    def __init__(self) -> None:
        self._bufs: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def get(self, name: str, n: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A 1-d buffer of ``n`` elements of ``dtype`` (float32 by default; its contents are whatever was there)."""
        dtype = torch.float32 if dtype is None else dtype
        b = self._bufs.get((name, dtype))
        if b is None or b.numel() < n:
            b = self._bufs[(name, dtype)] = torch.empty(n, dtype=dtype)
        return b[:n]


def task_vector(theta_t: torch.Tensor, theta_0: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``tau_t = theta_t - theta_0``, in float32: each widened (exactly), then subtracted.

    With ``out`` of ``theta_t``'s shape, a 16-bit ``theta_t`` is widened into ``out`` itself
    instead of a fresh temporary (the same bits; for bfloat16 blocks of 1M elements, 19 against
    1 ms for four tasks here, the temporaries' fresh pages being most of it)."""
    if out is None or theta_t.dtype == torch.float32 or out.shape != theta_t.shape or out.dtype != torch.float32:
        return torch.sub(theta_t.to(torch.float32), theta_0.to(torch.float32), out=out)
    out.copy_(theta_t)
    return out.sub_(theta_0.to(torch.float32))


def tall_mask(tau_t: torch.Tensor, tau_mtl: torch.Tensor, lam: float, out: torch.Tensor | None = None,
              ws: Workspace | None = None) -> torch.Tensor:
    """``m_t = |tau_t| > lambda * |tau_MTL - tau_t|``, strict as in the official code.

    ``lam`` is rounded to float32 and all arithmetic is float32, so any implementation gets the
    same bits. (The official code evaluates the formula on weights, ``|theta_0 - theta_t| >
    |(theta_0 + tau_MTL) - theta_t| * lambda``, which rounds otherwise: about one bit in 10^7
    differs, at elements on the boundary; tests/test_paper_r26.py pins one.)
    """
    lam32 = torch.tensor(lam, dtype=torch.float32)
    n = tau_t.numel()
    bound = torch.sub(tau_mtl, tau_t, out=ws.get("bound", n).view(tau_t.shape) if ws else None)
    bound.abs_().mul_(lam32)  # in place: the same operations, fewer fresh pages
    size = torch.abs(tau_t, out=ws.get("abs", n).view(tau_t.shape) if ws else None)
    return torch.gt(size, bound, out=out)


def tall_mask_with_fidelity(tau_t: torch.Tensor, tau_mtl: torch.Tensor, lam: float, out: torch.Tensor,
                            fidelity: "Fidelity", ws: Workspace | None = None, at: int = 0) -> int:
    """:func:`tall_mask` into ``out`` (bool) and :meth:`Fidelity.add` of it, the block being
    elements [at, at + n) of its tensor; returns the set bits. One compiled pass over a contiguous
    float32 block on the CPU (``kernels.tall_mask``: the same mask bits and sums, 2-3x faster than
    the dozen torch passes), else the two calls."""
    if tau_t.dtype == tau_mtl.dtype == torch.float32 and _one_pass(tau_t, out, tau_mtl):  # as tall_f32 needs
        ones = kernels.tall_mask(_flat(tau_t), _flat(tau_mtl), lam, _flat(out.view(torch.uint8)), fidelity.sums, at)
        if ones is not None:
            fidelity.count(ones, out.numel())
            return ones
    tall_mask(tau_t, tau_mtl, lam, out=out, ws=ws)
    return fidelity.add(tau_t, out, tau_mtl, ws, at)


def tall_mask_tv_with_fidelity(theta: np.ndarray, base: np.ndarray, kind: str, merged: np.ndarray, lam: float,
                               mask: np.ndarray, fidelity: "Fidelity", at: int) -> int | None:
    """``kernels.tall_mask_tv`` (the task vector computed on the way) with its sums added to
    ``fidelity``, the block being elements [at, at + n) of its tensor; returns the set bits, or
    None without the compiled loops (as ``tall_mask_tv``)."""
    ones = kernels.tall_mask_tv(theta, base, kind, merged, lam, mask, fidelity.sums, at)
    if ones is not None:
        fidelity.count(ones, mask.size)
    return ones


def blocks(base: torch.Tensor, thetas: list[torch.Tensor], chunk_elements: int, ws: Workspace | None = None
           ) -> Iterator[tuple[torch.Tensor, list[torch.Tensor]]]:
    """(base block, float32 task vectors) for each chunk of ``chunk_elements`` elements. With a
    workspace, the task vectors of one block are overwritten by the next."""
    b_flat = base.reshape(-1)
    flats = [t.reshape(-1) for t in thetas]
    for a in range(0, b_flat.numel(), chunk_elements):
        b = b_flat[a : a + chunk_elements]
        n = b.numel()
        b32 = b if b.dtype == torch.float32 else ws.get("base32", n).copy_(b) if ws else b.to(torch.float32)  # once
        yield b, [task_vector(f[a : a + chunk_elements], b32, ws.get(f"tau{i}", n) if ws else None)
                  for i, f in enumerate(flats)]


def compiled_kind(base: torch.Tensor, thetas: list[torch.Tensor]) -> str | None:
    """The ``kernels.tv_sum`` / ``kernels.tall_mask_tv`` kind of these flat tensors when the
    compiled loops can take them (one dtype among ``kernels.KINDS``, contiguous and aligned, on the
    CPU); else None."""
    kind = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(base.dtype)
    if kind is None or not kernels.COMPILED:
        return None
    ok = all(t.dtype == base.dtype and t.device.type == "cpu" and t.is_contiguous()
             and t.data_ptr() % t.element_size() == 0 for t in (base, *thetas))
    return kind if ok else None


def elements(t: torch.Tensor) -> np.ndarray:
    """A contiguous CPU tensor's elements as numpy: float32 as they are, 16-bit floats as their bits."""
    return t.numpy() if t.dtype == torch.float32 else t.view(torch.int16).numpy()


#: ``in_tall_range``'s bound: a merged tensor of T tasks has task vectors below TALL_RANGE / (T + 1).
TALL_RANGE = 2.0 ** 50


def in_tall_range(base: torch.Tensor, thetas: list[torch.Tensor]) -> bool:
    """Whether a tensor can be stored with TALL masks: every task vector finite (no inf or NaN in
    the inputs, no difference that overflows) and below ``TALL_RANGE / (T + 1)`` in magnitude, so
    that neither the merged vector nor the fidelity sums (float32 within blocks of
    ``kernels.SUM_BLOCK`` elements) overflow float32. (A merged vector that overflowed would rebuild the elements a mask leaves out
    as NaN, 0 * inf; fidelity sums that overflowed cannot be written to the manifest.) Fine-tuned
    weights are many orders of magnitude below it; a tensor that is not is stored exactly
    (task-own). One compiled pass over each task's and the base's values (``kernels.max_abs_diff``),
    on the calling thread only: torch's threaded reductions, run beside the packer's loops, spent
    more time waiting for each other than summing (BENCHMARKS.md, sixteenth round)."""
    limit = TALL_RANGE / (len(thetas) + 1)
    return all(_max_abs_diff(t, base) < limit for t in thetas)


def _max_abs_diff(theta: torch.Tensor, base: torch.Tensor) -> float:
    """The largest |theta - base| in float32 (inf or NaN when a difference is one); 0 when empty."""
    if theta.numel() == 0:
        return 0.0
    b, x = base.reshape(-1), theta.reshape(-1)
    kind = compiled_kind(b, [x])
    got = kernels.max_abs_diff(elements(x), elements(b), kind) if kind is not None else None
    return got if got is not None else float(task_vector(x, b).abs().max())


_scratch = ThreadBuffers()
#: The largest mask (elements) converted in a reused per-thread buffer (64 MB); larger ones get
#: a buffer of their own, freed after use.
SCRATCH_ELEMENTS = 1 << 24


def _float_mask(mask: torch.Tensor) -> torch.Tensor:
    """The mask as float32 in a buffer this thread reuses: a fresh one per tensor costs page faults
    that can take as long as the reconstruction itself."""
    n = mask.numel()
    if mask.device.type != "cpu" or not (1 << 16) <= n <= SCRATCH_ELEMENTS:
        return mask.to(torch.float32)
    buf = torch.from_numpy(_scratch.get("mask", 4 * n)).view(torch.float32)
    return buf.view(mask.shape).copy_(_bytes(mask))


def _one_pass(theta_0: torch.Tensor, mask: "torch.Tensor | Bits", tau_mtl: torch.Tensor) -> bool:
    """Whether the compiled loop (kernels.tall_f32) can rebuild this tensor: CPU, contiguous,
    one length, a bool mask (the loop reads any nonzero byte as 1, as a bool is), or the mask's
    stored bits (``Bits``: a contiguous array on the CPU, of the base's length)."""
    if isinstance(mask, Bits):
        return (kernels.COMPILED and theta_0.numel() == mask.numel == tau_mtl.numel() and theta_0.is_cpu
                and tau_mtl.is_cpu and theta_0.is_contiguous() and tau_mtl.is_contiguous())
    return (kernels.COMPILED and mask.dtype == torch.bool
            and theta_0.numel() == mask.numel() == tau_mtl.numel()
            and theta_0.is_cpu and mask.is_cpu and tau_mtl.is_cpu
            and theta_0.is_contiguous() and mask.is_contiguous() and tau_mtl.is_contiguous())


def _flat(t: torch.Tensor) -> np.ndarray:
    return t.reshape(-1).numpy()


def _numpy32(t: torch.Tensor) -> np.ndarray:
    """A tensor's elements as flat float32 numpy (on the CPU)."""
    return t.detach().reshape(-1).to(device="cpu", dtype=torch.float32).numpy()


def _bytes(mask: torch.Tensor) -> torch.Tensor:
    """A bool mask as its 0/1 bytes: torch converts uint8 to float32 about 4x faster than bool."""
    return mask.view(torch.uint8) if mask.dtype == torch.bool and mask.device.type == "cpu" else mask


class Bits:
    """A bool mask as its stored bits (codec ``bitpack``: element i in bit i % 8 of byte i // 8),
    for the rebuilds, which then read them as they are (``kernels.tall_f32``'s ``bits``): no byte
    per element is written and read back. ``packed`` holds ceil(numel / 8) bytes."""

    def __init__(self, packed: np.ndarray, numel: int, shape: Sequence[int]):
        if packed.dtype != np.uint8 or packed.size != (numel + 7) // 8:
            raise ValueError(f"{packed.size} bytes of bits for {numel} elements")  # a caller's bug
        self.packed, self.numel, self.shape = packed, numel, tuple(shape)

    def unpack(self) -> torch.Tensor:
        """The mask as a bool tensor of its shape, for the rebuilds that need one: in a buffer this
        thread reuses (up to SCRATCH_ELEMENTS; valid until its next ``unpack``), as the reader's
        decoded masks were."""
        n = self.numel
        out = _scratch.get("bits", n) if n <= SCRATCH_ELEMENTS else np.empty(n, np.uint8)
        kernels.unpack_bits(self.packed, out)
        return torch.from_numpy(out).view(torch.bool).reshape(self.shape)


def reconstruct(theta_0: torch.Tensor, mask: torch.Tensor | Bits, tau_mtl: torch.Tensor, dtype: torch.dtype
                ) -> torch.Tensor:
    """``theta_t = theta_0 + m_t * tau_MTL``, computed in float32 and cast to ``dtype``; ``mask``
    a bool tensor or its stored bits."""
    if theta_0.numel() == 0:  # numpy cannot hold some empty shapes ([0, 2**62]: too many bytes "per row")
        return torch.empty(theta_0.shape, dtype=dtype, device=theta_0.device)
    bits = isinstance(mask, Bits)
    if dtype == torch.float32 == theta_0.dtype == tau_mtl.dtype and _one_pass(theta_0, mask, tau_mtl):
        out = torch.empty(theta_0.shape, dtype=torch.float32)
        # contiguous (_one_pass), so their numpy views lie element by element as the loop reads them
        m = mask.packed if isinstance(mask, Bits) else _bytes(mask).numpy()
        if kernels.tall_f32(theta_0.numpy(), tau_mtl.numpy(), m, out.numpy(), threads=torch.get_num_threads(),
                            bits=bits):
            return out
    if isinstance(mask, Bits):
        mask = mask.unpack()
    # addcmul is bit-identical to base + (mask * tau): the product (tau or a signed zero) is exact,
    # so fusing it leaves a single rounding, that of the addition.
    return narrow(torch.addcmul(theta_0.to(torch.float32), _float_mask(mask), tau_mtl), dtype)


class Planar:
    """A float32, bfloat16 or float16 array as the stored byte planes of each of its chunks
    (``Chain.planar``), for :func:`reconstruct_planar`: ``chunk(i)`` gives chunk ``i``'s planes
    (four, or two) and their rotation. The reader makes them, with the planes decoded when asked
    or kept from an earlier read."""

    def __init__(self, numel: int, chunk_elements: int, chunk: Callable[[int], tuple[list[np.ndarray], int]],
                 each: Callable[[int, Callable[[int], Any]], list[Any]] | None = None):
        self.numel, self.chunk_elements, self.chunk = numel, chunk_elements, chunk
        #: how :func:`reconstruct_planar` runs its chunks: ``each(n, fn)`` is ``[fn(i) for i in
        #: range(n)]``, or the same on several threads (the reader's, for a large tensor); ``chunk``
        #: must then be callable from any of them
        self.each = each or (lambda n, fn: [fn(i) for i in range(n)])


@functools.cache
def _joins() -> dict[torch.dtype, str]:
    """The compiled rebuilds from byte planes (``kernels``' names), by output dtype."""
    return {torch.float32: "tall_planes", torch.bfloat16: "tall_planes_bf16", torch.float16: "tall_planes_f16"}


def _join(dtype: torch.dtype) -> Callable:
    name = _joins().get(dtype)
    if name is None:
        raise ValueError(f"no rebuild from byte planes into {dtype}")  # a caller's bug
    return getattr(kernels, name)


def reconstruct_planar(theta_0: Planar, mask: torch.Tensor | Bits, tau_mtl: Planar, shape: Sequence[int],
                       dtype: torch.dtype | None = None) -> torch.Tensor:
    """:func:`reconstruct` with ``theta_0`` and ``tau_MTL`` as byte planes of the same chunks:
    one pass per chunk joins both, adds and, for a bfloat16 or float16 ``dtype`` (float32 by
    default; ``theta_0`` then of that dtype too), rounds (``kernels.tall_planes``, ``tall_planes_bf16``,
    ``tall_planes_f16``; the same bits). ``mask`` is a bool tensor or its stored bits."""
    n = theta_0.numel
    bits = isinstance(mask, Bits)
    if not (n == tau_mtl.numel == (mask.numel if isinstance(mask, Bits) else mask.numel())
            and theta_0.chunk_elements == tau_mtl.chunk_elements > 0 and theta_0.chunk_elements % 8 == 0):
        raise ValueError("base, merged vector and mask differ in length or chunks")  # a caller's bug
    dtype = torch.float32 if dtype is None else dtype
    join = _join(dtype)
    out = torch.empty(tuple(shape), dtype=dtype)
    flat = _flat(out) if dtype == torch.float32 else _flat(out.view(torch.int16))
    if isinstance(mask, Bits):
        m = mask.packed
    else:
        m = _flat(_bytes(mask.reshape(-1)))
        if m.dtype != np.uint8:
            m = m.astype(np.uint8)
    ce = theta_0.chunk_elements

    def one(i: int) -> None:  # chunks write apart: they may run on several threads at once
        a = i * ce
        b = min(n, a + ce)
        base_planes, rb = theta_0.chunk(i)
        merged_planes, rm = tau_mtl.chunk(i)
        join(base_planes, rb, merged_planes, rm, kernels.mask_part(m, a, b, bits), flat[a:b],
             threads=torch.get_num_threads(), bits=bits)

    theta_0.each(-(-n // ce), one)
    return out


def reconstruct_parts(theta_0: torch.Tensor | Planar, mask: torch.Tensor | Bits, tau_mtl: torch.Tensor | Planar,
                      parts: Sequence, dtype: torch.dtype) -> list[torch.Tensor]:
    """:func:`reconstruct` (or :func:`reconstruct_planar`, for planes) of a group's members
    (format 1.12): ``parts`` are ``(offset, shape)`` of runs of the flat inputs, offsets multiples
    of 8; each member is rebuilt straight into a tensor of its own, the same bits as alone."""
    if isinstance(theta_0, Planar) and isinstance(tau_mtl, Planar):
        return _reconstruct_planar_parts(theta_0, mask, tau_mtl, parts, dtype)
    if isinstance(theta_0, Planar) or isinstance(tau_mtl, Planar):
        raise ValueError("base and merged vector must both be byte planes, or neither")  # a caller's bug
    base, merged = theta_0.reshape(-1), tau_mtl.reshape(-1)
    out = []
    for offset, shape in parts:
        n = math.prod(shape)
        if isinstance(mask, Bits):
            m: torch.Tensor | Bits = Bits(mask.packed[offset // 8 : (offset + n + 7) // 8], n, shape)
        else:
            m = mask.reshape(-1)[offset : offset + n].view(shape)
        out.append(reconstruct(base[offset : offset + n].view(shape), m, merged[offset : offset + n].view(shape), dtype))
    return out


def _reconstruct_planar_parts(theta_0: Planar, mask: torch.Tensor | Bits, tau_mtl: Planar, parts: Sequence,
                              dtype: torch.dtype) -> list[torch.Tensor]:
    """``reconstruct_parts`` from byte planes: chunk by chunk (each decoded once; only those that
    hold some member, on ``theta_0.each``'s threads), each member's run of the chunk joined into
    its own tensor (``kernels.tall_planes`` and its 16-bit kin)."""
    n = theta_0.numel
    bits = isinstance(mask, Bits)
    ce = theta_0.chunk_elements
    if not (n == tau_mtl.numel == (mask.numel if isinstance(mask, Bits) else mask.numel())
            and ce == tau_mtl.chunk_elements > 0
            and ce % 8 == 0 and all(o % 8 == 0 and o + math.prod(s) <= n for o, s in parts)):
        raise ValueError("base, merged vector, mask and members differ in length or chunks")  # a caller's bug
    join = _join(dtype)
    m = mask.packed if isinstance(mask, Bits) else _flat(_bytes(mask.reshape(-1))).astype(np.uint8, copy=False)
    outs = [torch.empty(tuple(s), dtype=dtype) for _, s in parts]
    flats = [_flat(o) if dtype == torch.float32 else _flat(o.view(torch.int16)) for o in outs]
    spans = sorted((o, o + math.prod(s), k) for k, (o, s) in enumerate(parts))
    threads, first = torch.get_num_threads(), 0
    work: list[tuple[int, int]] = []  # (chunk, its first span): the chunks that hold some member
    for i, a in enumerate(range(0, n, ce)):
        while first < len(spans) and spans[first][1] <= a:
            first += 1
        if first < len(spans) and spans[first][0] < min(n, a + ce):
            work.append((i, first))

    def one(j: int) -> None:  # chunks write apart: they may run on several threads at once
        i, first = work[j]
        a, b = i * ce, min(n, (i + 1) * ce)
        base_planes, rb = theta_0.chunk(i)
        merged_planes, rm = tau_mtl.chunk(i)
        for lo, hi, k in spans[first:]:
            if lo >= b:
                break
            x, y = max(lo, a), min(hi, b)
            if x < y:
                join([p[x - a : y - a] for p in base_planes], rb, [p[x - a : y - a] for p in merged_planes], rm,
                     kernels.mask_part(m, x, y, bits), flats[k][x - lo : y - lo], threads=threads, bits=bits)

    theta_0.each(len(work), one)
    return outs


#: The most flat positions of overflowing elements ``Fidelity`` keeps per tensor (a group's
#: elements, 1 << 20 at most, fit; a larger tensor's first ones are enough to name it).
OVERFLOW_POSITIONS = 1 << 20


@dataclass
class Fidelity:
    """Weight-space fidelity of one task's reconstructed task vector ``m_t * tau_MTL`` against
    ``tau_t``: sums over its tensors' elements in the one order of spec §6.4 (``kernels.Sums``:
    float32 lanes within blocks of 2048 elements, the blocks added exactly and rounded once), the
    compiled pass's and the numpy fallback's alike, so the figures are the same bits on every
    build, CPU and thread count."""

    sums: kernels.Sums = field(default_factory=kernels.Sums)
    ones: int = 0
    numel: int = 0
    #: per tensor, how many elements the task rebuilds as +-inf or NaN where its original is
    #: finite: ``cast_d(theta_0 + m_t * tau_MTL)`` (spec §6.1.1) past a float16 or float8 range,
    #: which the float32 figures above do not see; and the first OVERFLOW_POSITIONS of their flat
    #: positions (a group's, to name its members: ``split_overflow``)
    overflow: dict[str, int] = field(default_factory=dict)
    overflow_at: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def tau_sq(self) -> float:
        return self.sums.totals()[0]

    @property
    def rec_sq(self) -> float:
        return self.sums.totals()[1]

    @property
    def dot(self) -> float:
        return self.sums.totals()[2]

    @property
    def err_sq(self) -> float:
        return self.sums.totals()[3]

    def add(self, tau_t: torch.Tensor, mask: torch.Tensor, tau_mtl: torch.Tensor, ws: Workspace | None = None,
            at: int = 0) -> int:
        """Accumulate one block, elements [at, at + n) of its tensor (``kernels.Sums.add``, the
        compiled loop's numpy twin); returns its number of set mask bits."""
        if ws is None:
            rec = (mask.to(torch.float32) * tau_mtl).reshape(-1)
        else:
            rec = ws.get("rec", mask.numel())
            rec.copy_(_bytes(mask.reshape(-1))).mul_(tau_mtl.reshape(-1))
        self.sums.add(_numpy32(tau_t), _numpy32(rec), at)
        ones = int(torch.count_nonzero(mask))  # far faster than a bool sum
        self.count(ones, mask.numel())
        return ones

    def count(self, ones: int, numel: int) -> None:
        """Count a block's set mask bits and elements (its sums added elsewhere)."""
        self.ones += ones
        self.numel += numel

    def add_exact(self, tau_t: torch.Tensor) -> None:
        """A tensor stored exactly (rec = tau_t): counts for fidelity, not for mask density. Its
        sums are those of the mask pass of tau_t against itself (every element kept, rec = tau_t)."""
        tau = _numpy32(tau_t)
        self.sums.add(tau, tau, 0)

    def add_overflow(self, name: str, positions: torch.Tensor) -> None:
        """Count elements of tensor ``name`` (their flat ``positions``) rebuilt as +-inf or NaN."""
        if positions.numel() == 0:
            return
        self.overflow[name] = self.overflow.get(name, 0) + positions.numel()
        kept = self.overflow_at.get(name)
        room = OVERFLOW_POSITIONS - (0 if kept is None else kept.numel())
        if room > 0:
            more = positions.reshape(-1)[:room].to(torch.int64)
            self.overflow_at[name] = more if kept is None else torch.cat([kept, more])

    def set_overflow(self, name: str, count: int) -> None:
        """What tensor ``name`` rebuilds as +-inf or NaN, as decided elsewhere (the fidelity dial's
        corrections mend some)."""
        self.overflow_at.pop(name, None)
        if count:
            self.overflow[name] = count
        else:
            self.overflow.pop(name, None)

    def split_overflow(self, name: str, members: Sequence[tuple[str, int, int]]) -> None:
        """Move what a group ``name`` overflows to its members, ``(name, offset, numel)`` each."""
        if self.overflow.pop(name, None) is None:
            return
        at = self.overflow_at.pop(name)  # (a group is at most GROUP_ELEMENTS: every position is kept)
        for member, offset, n in members:
            self.add_overflow(member, at[(at >= offset) & (at < offset + n)] - offset)

    def to_dict(self) -> dict[str, float | None]:
        """``rel_l2 = |rec - tau| / |tau|`` and ``cosine(rec, tau)``; None where undefined. Both are
        float32 figures before the cast to the task's dtype: ``overflow``, present when not 0, counts
        the elements that cast gives +-inf or NaN."""
        tau_sq, rec_sq, dot, err_sq = self.sums.totals()
        rel = math.sqrt(err_sq / tau_sq) if tau_sq > 0 else (0.0 if err_sq == 0 else None)
        denom = math.sqrt(tau_sq * rec_sq)
        cos = dot / denom if denom > 0 else None
        over = sum(self.overflow.values())
        return {"rel_l2": rel, "cosine": cos, **({"overflow": over} if over else {})}

    @property
    def density(self) -> float:
        return self.ones / self.numel if self.numel else 0.0
