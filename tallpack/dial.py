"""The fidelity dial: per task and merged tensor, the cheapest corrections that make every task
reconstructed at least as well as asked (``fidelity``), or the best fidelity within a size
(``budget``), from plain TALL masks at one end to the exact tier at the other.

How well a task is reconstructed (its *fidelity*) is, with an evaluator, its score relative to
the original checkpoint's score on the user's validation data; without one, the **weight
fidelity** ``1 - ||theta_hat - theta||_2 / ||theta||_2`` over the task's merged tensors (the
ones TALL approximates), computed from the rebuilt tensors exactly as the reader returns them.
``BENCHMARKS.md`` ("The fidelity dial") shows how it predicts accuracy.

For each (task, tensor) the packer measures, before writing any merged tensor (the tasks of a
tensor on up to ``threads`` threads at once, as memory allows: ``in_flight``; recorded in task
order, so the archive is the same bytes for any thread count), every candidate:
nothing; the largest ``k`` entries of the residual (several ``k``; ties at the cut: the lowest
indices); the residual quantized to 8 or 4 bits per block of 64; the exact residual; and,
instead of the mask, the task's own task vector quantized to 2, 3, 4, 5, 6 or 8 bits per block
of 64 (``qtau``, format 1.7: its cost is its arrays less the mask it replaces). Each has a size
in bytes (encoded with the archive's codecs, plus chunk padding and manifest) and a squared
error. Per tensor the candidates
on the lower convex hull of (bytes, error) form a ladder; per task, steps up the ladders are
taken greedily by *relative* error removed per byte, each tensor's squared error over its own
sum of squares (the classic bit-allocation rule, optimal at hull points, for the sum of the
tensors' relative errors: scale-free, so no tensor is starved for being small), until the task
meets the target in weight fidelity. A budget is met by bisecting on one common target: the
highest fidelity every task reaches within it (the weakest task first); where that leaves more
than 1% of the budget unspent (the estimate's per-array charges are generous), the packer writes
the merged tensors again with the slack measured (``refit``).

The merged vector of a tensor is shared, so no single task's ladder can pay for dropping it. After
the greedy choice, a tensor (Task Arithmetic archives only) whose every task is ``qtau`` loses its
merged vector; and a tensor where moving the remaining tasks to a ``qtau`` at least as accurate as
what they have costs less than its merged vector is switched so (no task's error grows).

Fidelity 1 is bit-exact: an option counts as exact only where its rebuild has the original's bits
(a squared error of 0 is not enough: ``-0.0`` rebuilt as ``0.0`` has none), and a task whose
rebuild differs from the original in any bit records a fidelity below 1 (``JUST_BELOW_ONE`` at most).

Where the exact tier (``pack --exact``) would be about as small as the archive decided, or smaller
(a target near 1: on bf16 fine-tunes the exact tier derives masks and merged vectors from the
originals, which no dial archive can), the dial says so in one warning with both sizes: it weighs
each task's exact residual as ``add_exact`` does, on the same sample (``exact_tier_cost``), so
nothing is packed twice.

A tensor too large to hold whole (``inputs.HOLD_BYTES``) has each task measured, and its masks,
qtau codes and corrections made, a run of whole chunks at a time (``_measure_streamed``), with the
same figures to the last bit (numpy's pairwise sums rebuilt across the runs: ``sums.PairwiseSum``)
and so the same archive; with an evaluator, its tasks are measured whole (each rebuild is held).
"""

from __future__ import annotations

import functools
import heapq
import json
import logging
import math
import statistics
import threading
from collections import deque
from collections.abc import Callable, Generator, Hashable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import zstandard

from ._torch import torch
from .arrays import ArrayRef
from .codecs import Chain
from .container import ALIGNMENT, FOOTER, HEADER
from . import kernels
from .dtypes import cat, dtype_name, narrow, tensor_to_bytes, torch_dtype
from .encodings import Item, TaskTensor, TensorEntry, WriteContext, iter_arrays, settled
from .elements import numel
from .encodings.base import EXTRA_ARRAYS
from .encodings.correction import (BLOCK, FLOAT16_MAX, Correction, magnitude_bits, quant_decode, quant_encode,
                                   quant_encode_widths, residual, sparse_decode, sparse_encode, sparse_encode_ks,
                                   sparse_kept)
from .encodings.exact import (RESIDUAL_CODECS, SAMPLE_ELEMENTS, _sample_sizes, add_exact, bits, forward,
                              permute)
from .encodings.qtau import BLOCK as QBLOCK
from .encodings.qtau import (PACKED_BITS, block_maxima, code_bytes, dequantize, float_blocks, quantize, quantize_widths,
                             quantized, rebuilt, width_scales)
from .encodings.tall import Tall
from .errors import InvalidArgumentError, TallpackError
from .memory import give_back  # (glibc's malloc_trim after a large tensor's work)
from .merging import MergeMethod, missing_statistics, score_values
from .options import Evaluator
from .report import format_size
from .sums import PairwiseSum, add_reduce
from .tall import blocks, compiled_kind, elements, tall_mask

log = logging.getLogger(__name__)
T = TypeVar("T")
#: The residual codecs the exact tier tries, ``planes`` among them (the dial's exact corrections use it).
EXACT_CODECS = ("planes", *(c for c in RESIDUAL_CODECS if c != "planes"))

#: Correction families a pack may use (``PackOptions.corrections``), cheapest first.
CORRECTIONS: tuple[str, ...] = ("sparse", "quant4", "quant8", "qtau", "exact")
#: Bits of the ``qtau`` candidates (the task's own quantized task vector).
QTAU_BITS: tuple[int, ...] = (2, 3, 4, 5, 6, 8)
#: The allocation rule: within a task, steps are taken by ``relative`` squared error removed per
#: byte (each tensor's error over its own sum of squares, so every tensor counts the same whatever
#: its scale), or by ``absolute`` squared error (the rule before; the benchmark compares them).
#: Across tasks (targets, a budget's max-min) the measure is the weight fidelity either way.
ORDER = "relative"
#: With a sensitivity: ``weighted``, targets and the max-min over tasks in the weighted fidelity;
#: ``plain``, in the weight fidelity (the weights then only order the steps within each task).
SENSITIVITY_TARGETS = "weighted"
#: Whether a merged vector no task needs is left out (benchmarks turn it off to measure what it buys).
DROP_MERGED = True
#: Fractions of a tensor's elements a sparse correction may keep.
SPARSE_FRACTIONS: tuple[float, ...] = (1 / 1024, 1 / 256, 1 / 64, 1 / 16, 1 / 4)
#: A budget's archive is written again when more than this fraction of the budget is left
#: unspent (tiny families, where the per-array charges below are large), at most ``MAX_WRITES``
#: times in all; ``REFIT_MARGIN`` of the budget (plus 256 bytes) is kept back on the new decision.
REFIT_SLACK, REFIT_MARGIN, MAX_WRITES = 0.01, 0.002, 5
#: Decisions a refit looks at for one not written yet (each a decision, no write) before it ends.
MAX_PROBES = 32
#: Bytes charged per stored array beyond its chunks (its manifest entry, compressed: about 40
#: measured on the benchmark's families), and per chunk (alignment padding, at most 63 bytes).
ARRAY_OVERHEAD, CHUNK_OVERHEAD = 64, 64
#: The highest fidelity a rebuild that is not the original bit for bit records (its squared error
#: may be 0: ``-0.0`` rebuilt as ``0.0``), so that a fidelity of 1 means bit-exact.
JUST_BELOW_ONE = math.nextafter(1.0, 0.0)
#: The dial warns that ``--exact`` is the better choice where the exact tier's estimated size is at
#: most this many times the dial's archive (both estimated alike): about as small, and lossless.
EXACT_HINT = 1.05
#: How far below a target (under 1) a fidelity may fall and still meet it: float residue.
TOLERANCE = 1e-12


def reaches(value: float, target: float) -> bool:
    """Whether a fidelity meets a target: within float residue, but a target of 1 only bit for bit.

    >>> reaches(1 - 1e-13, 0.99), reaches(JUST_BELOW_ONE, 1.0)
    (True, False)
    """
    return value >= 1.0 if target >= 1 else value >= target - TOLERANCE


def shown(value: float, *, below: float | None = None) -> str:
    """A fidelity for a message: a target as it was given (``0.99999``, never rounded to ``1``,
    which is the exact tier's); with ``below`` (the target a score falls short of), four decimals,
    or as many more as keep it reading below it (``0.99996``, not ``1.0000``).

    >>> shown(0.99999), shown(0.999962, below=0.99999), shown(0.91234, below=0.95)
    ('0.99999', '0.99996', '0.9123')
    """
    value = float(value)
    if below is None:
        return repr(value)
    for places in range(4, 17):
        text = f"{value:.{places}f}"
        if float(text) < below or value >= below:
            return text
    return repr(value)


def capped(value: float, bit_exact: bool) -> float:
    """A fidelity as recorded: 1 for a bit-exact rebuild, else at most ``JUST_BELOW_ONE``."""
    return 1.0 if bit_exact else min(value, JUST_BELOW_ONE)


def fidelity_of(err: float, theta_sq: float) -> float:
    """``1 - sqrt(err / theta_sq)``; for a task whose weights are all zero (``theta_sq`` 0), 1 when
    the error is 0 too and 0 otherwise, which meets no target (spec §6.4): any error is then
    infinitely large against the weights, and the dial must store what rebuilds the zeros.

    >>> fidelity_of(0.01, 1.0), fidelity_of(0.0, 0.0), fidelity_of(1e-30, 0.0)
    (0.9, 1.0, 0.0)
    """
    if theta_sq > 0:
        return 1.0 - math.sqrt(max(err, 0.0) / theta_sq)
    return 1.0 if err <= 0 else 0.0


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors of one dtype hold the same bits (``-0.0`` is not ``0.0``; NaN payloads count)."""
    return a.dtype == b.dtype and a.numel() == b.numel() and np.array_equal(bits(a.reshape(-1).contiguous()),
                                                                            bits(b.reshape(-1).contiguous()))


class FidelityError(TallpackError, ValueError):
    """A budget below the smallest archive the dial can make (the message says the minimum)."""


@dataclass(frozen=True)
class Option:
    """One candidate for one (task, tensor): ``kind`` None (nothing), ``sparse`` (``k`` entries),
    ``quant`` (``bits``), ``qtau`` (``bits``, replacing the mask) or ``exact``; its extra bytes,
    the squared error it leaves, and whether its rebuild is the original bit for bit."""

    kind: str | None
    cost: int
    err: float
    k: int = 0
    bits: int = 0
    #: the plain squared error when ``err`` is weighted by a sensitivity (None: ``err`` is plain)
    plain: float | None = None
    #: the rebuild has the original's bits (an ``err`` of 0 may not: ``-0.0`` rebuilt as ``0.0``)
    bit_exact: bool = False
    #: elements its rebuild gives as +-inf or NaN (a float16 or float8 sum past the dtype's range)
    overflow: int = 0

    @property
    def plain_err(self) -> float:
        return self.err if self.plain is None else self.plain

    @property
    def label(self) -> str:
        return {None: "tall", "sparse": "sparse", "quant": f"quant{self.bits}", "qtau": f"qtau{self.bits}",
                "exact": "exact"}[self.kind]


@dataclass(frozen=True)
class Step:
    """Moving one tensor of one task up its ladder: to ``option``, for ``cost`` bytes more,
    removing ``gain`` of squared error."""

    tensor: str
    option: Option
    cost: int
    gain: float


@dataclass
class TaskPlan:
    """One task's ladders and the greedy order of steps up them."""

    theta_sq: float = 0.0
    tall_err: float = 0.0
    #: with a sensitivity, ``theta_sq`` and ``tall_err`` are weighted; these are the plain sums
    plain_theta_sq: float = 0.0
    plain_tall_err: float = 0.0
    #: tensors whose plain TALL rebuild is not the original bit for bit
    tall_inexact: int = 0
    #: per tensor, the elements its plain TALL rebuild gives as +-inf or NaN (``Option.overflow``)
    tall_overflow: dict[str, int] = field(default_factory=dict)
    ladders: dict[str, list[Option]] = field(default_factory=dict)
    #: every qtau candidate measured, per tensor (the merged-vector pass picks among them)
    qtaus: dict[str, list[Option]] = field(default_factory=dict)
    steps: list[Step] = field(default_factory=list)
    #: per tensor, what one unit of its squared error weighs in the order of steps (``ORDER``)
    scale: dict[str, float] = field(default_factory=dict)
    #: cumulative (bytes, error) after each prefix of ``steps`` (index 0: none taken)
    cum_cost: list[int] = field(default_factory=list)
    cum_err: list[float] = field(default_factory=list)
    cum_plain: list[float] = field(default_factory=list)
    #: the number of tensors not rebuilt bit for bit after each prefix
    cum_inexact: list[int] = field(default_factory=list)

    def fidelity_at(self, p: int, weighted: bool = True) -> float:
        """The fidelity after the first ``p`` steps: weighted (as the steps were ordered) or plain;
        1 only where every tensor is rebuilt bit for bit (``capped``)."""
        value = self.weight_fidelity(self.cum_err[p]) if weighted else self.plain_fidelity(self.cum_plain[p])
        return capped(value, self.cum_inexact[p] == 0)

    def weight_fidelity(self, err: float) -> float:
        """1 - sqrt(err / sum of squares): the weight fidelity, weighted when a sensitivity is."""
        return fidelity_of(err, self.theta_sq)

    def plain_fidelity(self, err: float) -> float:
        """The (unweighted) weight fidelity of a plain squared error."""
        return fidelity_of(err, self.plain_theta_sq)

    def order(self) -> None:
        """The greedy sequence: best error removed per byte first, across tensors, each tensor's
        error weighed by ``scale`` (relative to its own size: ``ORDER``). A tensor's weight scales
        its whole ladder, so its hull is unchanged and its steps still come in order."""
        heap: list[tuple[float, int, str, int]] = []
        pos = dict.fromkeys(self.ladders, 0)
        tie = 0
        w = {name: self.scale.get(name, 1.0) if ORDER == "relative" else 1.0 for name in self.ladders}

        def push(name: str) -> None:
            nonlocal tie
            lad, i = self.ladders[name], pos[name]
            if i + 1 < len(lad):
                a, b = lad[i], lad[i + 1]
                heapq.heappush(heap, (-w[name] * (a.err - b.err) / max(b.cost - a.cost, 1), tie, name, i + 1))
                tie += 1

        for name in self.ladders:
            push(name)
        start = [lad[0] for lad in self.ladders.values()]  # nothing, or a qtau cheaper than the mask
        self.steps = []
        self.cum_cost, self.cum_err = [sum(o.cost for o in start)], [sum(o.err for o in start)]
        self.cum_plain = [sum(o.plain_err for o in start)]
        self.cum_inexact = [sum(not o.bit_exact for o in start)]
        while heap:
            _, _, name, i = heapq.heappop(heap)
            a, b = self.ladders[name][i - 1], self.ladders[name][i]
            self.steps.append(Step(name, b, b.cost - a.cost, a.err - b.err))
            self.cum_cost.append(self.cum_cost[-1] + b.cost - a.cost)
            self.cum_err.append(max(self.cum_err[-1] - (a.err - b.err), 0.0))
            self.cum_plain.append(max(self.cum_plain[-1] - (a.plain_err - b.plain_err), 0.0))
            self.cum_inexact.append(self.cum_inexact[-1] + a.bit_exact - b.bit_exact)
            pos[name] = i
            push(name)
        if all(lad[-1].err == 0 for lad in self.ladders.values()):
            self.cum_err[-1] = self.cum_plain[-1] = 0.0  # every tensor at its exact top: no float residue

    def chosen(self, p: int) -> dict[str, Option]:
        """Each tensor's option after the first ``p`` steps."""
        out = {name: lad[0] for name, lad in self.ladders.items()}
        for s in self.steps[:p]:
            out[s.tensor] = s.option
        return out


def hull(points: list[Option]) -> list[Option]:
    """The lower convex hull of (cost, err), from the cheapest to the most accurate; at an error
    of 0, a bit-exact option counts as more accurate than one that is not."""
    pts = sorted(points, key=lambda o: (o.cost, o.err, not o.bit_exact))
    best: list[Option] = []
    for o in pts:  # Pareto front first: each next point strictly more accurate
        if not best or (o.err, not o.bit_exact) < (best[-1].err, not best[-1].bit_exact):
            best.append(o)
    out: list[Option] = []
    for o in best:
        while len(out) >= 2:
            a, b = out[-2], out[-1]
            # b is above the segment a-o: drop it
            if (b.err - a.err) * (o.cost - a.cost) >= (o.err - a.err) * (b.cost - a.cost):
                out.pop()
            else:
                break
        out.append(o)
    return out


def plain_bytes(entries: list[TensorEntry]) -> int:
    """About the size of an archive of ``entries`` (chunks with padding, header, footer, and the
    manifest: its tensor entries compressed plus room for the rest), for the budget."""
    chunks = sum(ref.stored_nbytes + ALIGNMENT * len(ref.chunks) for _, _, ref in iter_arrays(entries))
    raw = json.dumps([e.to_dict() for e in entries], separators=(",", ":")).encode()
    return chunks + HEADER.size + FOOTER.size + len(zstandard.ZstdCompressor(level=9).compress(raw)) + 4096


def _array_cost(chain: Chain, arr: np.ndarray, ce: int) -> int:
    data = np.ascontiguousarray(arr).view(np.uint8).data.cast("B")
    step = ce * arr.dtype.itemsize
    pieces = [data[i : i + step] for i in range(0, len(data), step)] or [data]
    return sum(len(chain.encode(p)) + CHUNK_OVERHEAD for p in pieces) + ARRAY_OVERHEAD


def derives_merged(method: MergeMethod) -> bool:
    """Whether the exact tier can leave a merged vector of ``method`` out (spec §6.1.9)."""
    return method.name == "ta" or method.name == "ties" and not missing_statistics(method)


def _exact_cost(ctx: WriteContext, x: torch.Tensor, sizes: list[tuple[int, tuple[str, str, str]]],
                refs: Mapping[str, torch.Tensor | None]) -> int:
    """What ``add_exact`` will store for this task's tensor: the smallest ``planes`` coding of
    ``sizes`` (``exact._sizes``: the sample's codings, smallest first; ``planes`` is the dial's
    codec), the whole tensor coded, against ``refs`` (``exact._references``)."""
    assert ctx.residuals is not None
    ref, tr = next(how[:2] for _, how in sizes if how[2] == "planes")
    xb = bits(x.reshape(-1).contiguous())
    r = refs[ref]
    rb = bits(r.reshape(-1).contiguous()) if r is not None else np.zeros_like(xb)
    dt, ce, chain = dtype_name(x.dtype), ctx.chunk_elements, ctx.residuals(x.element_size())
    return _array_cost(chain, permute(forward(xb, rb, tr), rb, dt, "exponent", ce), ce) + 40


def exact_tier_cost(tier: TierCost, sizes: Mapping[str, list[tuple[int, tuple[str, str, str]]]], n: int, ce: int,
                    derivable: bool) -> int:
    """About the bytes ``pack --exact`` stores for one merged tensor (``add_exact``'s choice made
    on the same sample sizes, scaled): its base, and per task the residual with its mask, or
    against the base or zero without it (a derived mask); the merged vector too unless every mask
    is derived and the method's merged vector can be (spec §6.1.7, §6.1.9). ``sizes``: per task,
    ``exact._sizes``."""
    scale = n / max(1, min(SAMPLE_ELEMENTS, n))
    per_array = ARRAY_OVERHEAD + CHUNK_OVERHEAD * -(-n // max(ce, 1))
    each, derived, all_derived = 0.0, 0.0, True
    for t, s in sizes.items():
        with_mask = s[0][0] * scale + tier.masks[t]
        alone = next((b * scale for b, how in s if how[0] != "tall"), None)
        all_derived = all_derived and alone is not None
        each += with_mask if alone is None else min(with_mask, alone)
        derived += alone if alone is not None else with_mask
    best = each + tier.merged
    if derivable and all_derived:
        best = min(best, derived)
    return tier.base + int(best) + per_array * len(sizes)


def tall_parts(ctx: WriteContext, item: Item) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """tau_MTL and every task's mask of a merged tensor, flat, as the tall encoding writes them (a
    streamed item read a block at a time: ``_whole_parts``)."""
    parts = _whole_parts(ctx, item)
    read = _reader(item)
    return parts.merged, [parts.mask(ctx, item, i, read(i)) for i in range(len(item.tasks))]


def _tall_parts(ctx: WriteContext, item: Item, extras: bool = False
                ) -> tuple[torch.Tensor, list[torch.Tensor], dict[str, torch.Tensor] | None]:
    """``tall_parts`` and, with ``extras``, the method's extra arrays (``_extras``). Where the
    method and the inputs allow (``Tall.write``'s ``_straight``), in its compiled loops, which
    never write the task vectors to memory: the same bits as the blocks of ``blocks``, ``combine``
    and ``tall_mask`` (the methods that have them are elementwise, so one pass over the tensor).
    Else (an extras dict of None when ``extras`` is False) block by block in torch."""
    assert item.base is not None
    b_flat, flats = item.base.reshape(-1), [x.reshape(-1) for x in item.thetas]
    kind = compiled_kind(b_flat, flats) if ctx.method.straight else None
    if kind is not None:
        n = b_flat.numel()
        bb, xs = elements(b_flat), [elements(x) for x in flats]
        merged = torch.empty(n, dtype=torch.float32)
        ex = {k: torch.empty(n, dtype=torch_dtype(dt)) for k, dt in ctx.method.extra_arrays.items()}
        ctx.method.combine_inputs(bb, xs, kind, merged.numpy(), {k: v.numpy() for k, v in ex.items()}, ctx.threads)
        masks = [torch.empty(n, dtype=torch.bool) for _ in item.tasks]
        mv = merged.numpy()

        def run(first: int, end: int) -> None:
            for i in range(first, end):
                got = kernels.tall_mask_tv(xs[i], bb, kind, mv, ctx.lambdas[item.tasks[i]],
                                           masks[i].view(torch.uint8).numpy())
                assert got is not None, "compiled_kind admitted arrays the compiled loops refuse"
        kernels.in_parts(len(item.tasks), min(ctx.threads, len(item.tasks)), run)
        return merged, masks, ex if extras else None
    merged_parts: list[torch.Tensor] = []
    mask_parts: list[list[torch.Tensor]] = [[] for _ in item.tasks]
    for _, taus in blocks(item.base, item.thetas, ctx.chunk_elements):
        m = ctx.method.combine(taus)
        merged_parts.append(m)
        for i, (t, tau) in enumerate(zip(item.tasks, taus)):
            mask_parts[i].append(tall_mask(tau, m, ctx.lambdas[t]))
    cat = lambda ps, dt: torch.cat(ps) if ps else torch.empty(0, dtype=dt)  # noqa: E731
    return (cat(merged_parts, torch.float32), [cat(p, torch.bool) for p in mask_parts],
            _extras(ctx, item) if extras else None)


def _extras(ctx: WriteContext, item: Item) -> dict[str, torch.Tensor]:
    """The merge method's extra arrays (TIES ``counts``) of a whole tensor, flat."""
    assert item.base is not None
    parts = [ctx.method.extras(taus) for _, taus in blocks(item.base, item.thetas, ctx.chunk_elements)]
    return {k: torch.cat([p[k] for p in parts]) for k in ctx.method.extra_arrays} if parts else {}


@dataclass
class _Parts:
    """A merged tensor's base (flat, its own dtype), tau_MTL and the method's extra arrays, as
    ``_tall_parts`` makes them, and each task's mask: held (``masks``), or for a streamed item made
    again from the task's copy when its turn comes (``mask``: the same bits, ``tall_mask`` being
    elementwise), with each mask's stored bytes (``mask_costs``, ``_tensor_cost``) measured as the
    blocks went by. The float32 base whole (``base32``) only where asked for: the work a run at a
    time widens a run of the base (``widened``), exactly."""

    base: torch.Tensor
    merged: torch.Tensor
    extras: dict[str, torch.Tensor] | None
    masks: list[torch.Tensor] | None
    mask_costs: list[int] | None = None

    @functools.cached_property
    def base32(self) -> torch.Tensor:
        """The base widened to float32, whole (held from the first ask; the base itself if float32)."""
        return self.base.to(torch.float32)

    def widened(self, s: slice) -> torch.Tensor:
        """Elements ``s`` of ``base32``: of the whole where it is held, else the base's widened."""
        held = self.__dict__.get("base32")
        return (held if held is not None else self.base)[s].to(torch.float32)

    @property
    def n(self) -> int:
        return self.merged.numel()

    def mask(self, ctx: WriteContext, item: Item, i: int, x: torch.Tensor) -> torch.Tensor:
        """Task ``i``'s mask, flat (``x``: its copy)."""
        if self.masks is not None:
            return self.masks[i]
        return tall_mask(x.reshape(-1).to(torch.float32) - self.base32, self.merged, ctx.lambdas[item.tasks[i]])


def _whole_parts(ctx: WriteContext, item: Item, extras: bool = False) -> _Parts:
    """The base, flat, and ``_tall_parts``. A streamed item (``Item.streamed``: its copies too large
    to hold at once, ``inputs.HOLD_BYTES``) is read a block of ``chunk_elements`` at a time and
    stays streamed: each block's parts made as ``_tall_parts`` makes them (elementwise, or in the
    same blocks: the same bits), so the dial holds the base, tau_MTL and no mask, never every
    task's copy."""
    if not item.streamed:
        assert item.base is not None
        merged, masks, held = _tall_parts(ctx, item, extras)
        return _Parts(item.base.reshape(-1), merged, held, masks)
    n, base_dtype, ce = numel(item.shape), item.dtypes[0], ctx.chunk_elements
    assert base_dtype is not None  # (planned merged: the base has it)
    base, merged = torch.empty(n, dtype=base_dtype), torch.empty(n, dtype=torch.float32)
    costs = [ARRAY_OVERHEAD + 40] * len(item.tasks)  # (``_observe``'s charge per mask)
    ex: dict[str, torch.Tensor] | None = {} if extras else None
    for a, b, xs in item.blocks(ce):
        assert b is not None
        s = slice(a, a + b.numel())
        m, ms, e = _tall_parts(ctx, Item(item.name, item.planned, item.kind, item.tasks, b, xs), extras)
        base[s], merged[s] = b, m
        for i, mask in enumerate(ms):  # a block is whole chunks: the chunks' bytes of the whole mask
            costs[i] += _tensor_cost(ctx.masks, mask, ce) - ARRAY_OVERHEAD
        if ex is not None and e is not None:
            for k, v in e.items():
                ex.setdefault(k, torch.empty(n, dtype=v.dtype))[s] = v
        del b, xs, m, ms, e  # (the block's copies, let go before the next is read)
    return _Parts(base, merged, ex, None, costs)


def _reader(item: Item) -> Callable[[int], torch.Tensor]:
    """Task ``i``'s tensor, whole (``Item.task``: held, or for a streamed item read from that task's
    file alone: one task's copy at a time, never every task's as ``Stream.whole`` reads them), one
    read at a time. (A streamed item's tasks are read whole only where an evaluator holds them:
    elsewhere the dial reads them a run at a time, ``_task_runs``.)"""
    if not item.streamed:
        return item.task
    lock = threading.Lock()

    def read(i: int) -> torch.Tensor:
        with lock:
            return item.task(i)
    return read


@contextmanager
def torch_alone() -> Iterator[None]:
    """torch's operations on this thread alone for a while (its thread count restored after). The
    dial runs some twenty elementwise passes per task tensor between its numpy and zstd steps, each
    too short for torch's OpenMP workers to pay: they spin between them, and on a busy machine they
    wait for a core each time. On one thread a dial pack took a quarter of the CPU seconds and of
    the wall time (BENCHMARKS.md, twenty-fifth round); torch's results do not depend on its threads."""
    before = torch.get_num_threads()
    if before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


#: Bytes one task's measurement of a merged tensor works in, per element of the tensor (the
#: float64 error buffer, the rebuild, residual and task vector, the quantizers' work, the
#: candidates' arrays: a second task measured at once raised the live peak by 37 bytes an element
#: for float32 tasks, 51 for bfloat16; 59 and 78 while the errors kept two more float64 copies),
#: with a margin; the second pass's work per task is less; and per thread beside it (its stack and
#: malloc arena, which an address-space limit counts).
WORK_PER_ELEMENT, THREAD_BYTES = 128, 64 << 20
#: ``WORK_PER_ELEMENT`` of a streamed tensor's task, worked a run at a time (``_measure_streamed``;
#: its sparse cuts, tied or not, chosen a run at a time too): a second task measured at once raised
#: the pack's peak by 9 bytes an element for float32 tasks, 6 for bfloat16 (every cut tied; 24
#: while ``torch.topk`` chose on the whole magnitudes); with a margin.
STREAMED_WORK_PER_ELEMENT = 24
#: Bytes a task's measurement of a tensor held whole works in, per element, in fact (without
#: ``WORK_PER_ELEMENT``'s margin: ``memray`` at the peak of a bfloat16 family, 35 an element), and
#: the bytes from which such a tensor's tasks are measured a run at a time instead (``Dial._by_runs``:
#: the same figures, a run's work rather than the whole's).
WHOLE_WORK_PER_ELEMENT, RUNS_FROM = 40, 256 << 20
#: The share of the memory the process may still take (``memory_free``) that the tasks measured
#: beside the first may work in (``in_flight``): by the margin above, about a quarter in fact; the
#: rest is the packer's (the next tensor, read ahead; the writer's queue).
MEMORY_SHARE = 0.5
#: Tensors of fewer elements have their tasks measured one after another: each task then takes a
#: few milliseconds, most of them in Python (holding the interpreter's lock), and threads only
#: contend for it.
THREADS_FROM = 1 << 14


def in_flight(threads: int, tasks: int, elements: int, free: int | None, per_element: int = WORK_PER_ELEMENT) -> int:
    """How many of the ``tasks`` of a merged tensor of ``elements`` the dial measures at once: up to
    ``threads`` (one below ``THREADS_FROM`` elements), and beside the first only as many as keep
    their work (``per_element`` bytes an element, and ``THREAD_BYTES``, each) within
    ``MEMORY_SHARE`` of ``free``, the bytes the process may still take (None: not known, no cap).

    >>> in_flight(8, 20, 1 << 16, 4 << 30), in_flight(8, 20, 1 << 24, 5 << 30), in_flight(8, 3, 1 << 20, None)
    (8, 2, 3)
    >>> in_flight(8, 20, 1000, None), in_flight(8, 20, 1 << 24, 5 << 30, STREAMED_WORK_PER_ELEMENT)
    (1, 6)
    """
    parts = max(1, min(threads, tasks)) if elements >= THREADS_FROM else 1
    if parts > 1 and free is not None:
        parts = min(parts, 1 + int(MEMORY_SHARE * free) // (per_element * elements + THREAD_BYTES))
    return parts


def memory_free() -> int | None:
    """About the bytes this process may still take: the least of the machine's available memory
    (Linux's ``MemAvailable``), its cgroup's limit less its use (cgroup v2, seen from inside a
    container) and its address-space limit (``ulimit -v``) less what it maps; None where none is known."""
    found: list[int] = []
    try:
        with open("/proc/meminfo") as f:
            found += [int(line.split()[1]) << 10 for line in f if line.startswith("MemAvailable:")]
    except (OSError, ValueError, IndexError):
        pass
    try:
        with open("/sys/fs/cgroup/memory.max") as f, open("/sys/fs/cgroup/memory.current") as g:
            limit = f.read().strip()
            if limit != "max":
                found.append(int(limit) - int(g.read()))
    except (OSError, ValueError):
        pass
    try:
        import resource  # (Unix only)

        soft = resource.getrlimit(resource.RLIMIT_AS)[0]
        if soft != resource.RLIM_INFINITY:
            with open("/proc/self/statm") as f:
                found.append(soft - int(f.read().split()[0]) * resource.getpagesize())
    except (ImportError, OSError, ValueError, IndexError, AttributeError):
        pass
    return max(0, min(found)) if found else None


@dataclass(frozen=True)
class _Measured:
    """One task's measurements of one merged tensor (``Dial._measure``), recorded in task order."""

    sq: float  # the original's sum of squares, weighted with a sensitivity
    sq_plain: float | None  # its plain one with a sensitivity, else None
    scale: float  # ``TaskPlan.scale``
    tall: Option  # the plain TALL rebuild
    ladder: list[Option]
    qtaus: list[Option] | None  # every qtau measured (None: none)
    sizes: list[tuple[int, tuple[str, str, str]]] | None  # ``exact._sizes`` (None: an empty tensor)
    held: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.dtype] | None  # ``Dial._held``'s, with an evaluator


class _Scratch:
    """A float32 buffer of ``n`` elements for each thread that asks (the quantizers' ``scratch``)."""

    def __init__(self, n: int):
        self.n, self._local = n, threading.local()

    def get(self) -> torch.Tensor:
        buf = getattr(self._local, "buf", None)
        if buf is None:
            buf = self._local.buf = torch.empty(self.n, dtype=torch.float32)
        return buf


def _in_order(run: Callable[[int], T], count: int, parts: int,
              window: int | None = None) -> Generator[Callable[[], T], None, None]:
    """``run(i)`` for each i of ``range(count)``, up to ``parts`` at once on threads of their own
    (one: each on this thread when its turn comes), given in order as calls that return its result
    or raise its error. Runs begin in order, and none begins once one before it has failed (the
    caller stops at that error, or an earlier one: a run before it always runs). With ``window``,
    a run is handed to the threads only once fewer than ``window`` are handed and not yet given
    (their results wait for the caller: the window bounds what they hold). Closed
    (``contextlib.closing``) before its end, on an error say, it cancels the runs not begun and
    waits for those under way: no thread is left running."""
    if parts <= 1:
        for i in range(count):
            yield functools.partial(run, i)
        return
    failed, lock = [count], threading.Lock()  # the first run in order that failed (count: none)

    def alone(i: int) -> T:
        if failed[0] < i:  # (a run before it failed: raised first. Not "any run failed": a later
            raise _Skipped  # one may fail before a thread takes up this one, whose result is asked for)
        try:
            with kernels.as_worker():  # its loops on this thread alone
                return run(i)
        except BaseException:
            with lock:
                failed[0] = min(failed[0], i)
            raise

    pool = ThreadPoolExecutor(parts, thread_name_prefix="tallpack-dial")
    ahead = count if window is None else max(window, parts)
    try:
        futures: deque[Future[T]] = deque()
        for i in range(count):
            while len(futures) < ahead and i + len(futures) < count:
                futures.append(pool.submit(alone, i + len(futures)))
            yield futures.popleft().result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


class _Skipped(Exception):
    """A run ``_in_order`` did not begin, one before it having failed."""


def overflow_error(dtype: torch.dtype) -> float:
    """The error an element rebuilt as +-inf or NaN counts for (its original finite: a float16 or
    float8 rebuild past the dtype's range): twice the dtype's largest value, large enough that the
    dial mends it first, finite so that every figure is."""
    return 2.0 * float(torch.finfo(dtype).max)


def sum_squares(d: torch.Tensor, w: torch.Tensor | None = None, scratch: np.ndarray | None = None) -> float:
    """``Σ d²`` (or ``Σ w·d²``) of float64 ``d`` in numpy's pairwise order: the same float on every
    machine and thread count, where BLAS's ``dot`` sums in another order with each thread count (the
    dial's choices, and so an archive's bytes, followed the machine's cores). ``scratch``: a float64
    buffer of ``d``'s size to reuse."""
    x = d.reshape(-1).numpy()
    sq = np.square(x, out=scratch if scratch is not None and scratch.shape == x.shape else None)
    if w is not None:
        np.multiply(sq, w.reshape(-1).numpy(), out=sq)
    return add_reduce(sq)


def _squares(d: torch.Tensor, dtype: torch.dtype, w: torch.Tensor | None,
             scratch: np.ndarray | None = None) -> tuple[float, float | None, int]:
    """The sum of squares of float64 differences ``d`` as (weighted by ``w``, plain, elements
    that are +-inf or NaN), or (plain, None, ...) without weights (``sum_squares``); an element
    that is not finite counts as ``overflow_error(dtype)``. A finite plain sum has none: only then
    are they looked for."""
    plain = sum_squares(d, None, scratch)
    over = 0
    if not math.isfinite(plain):
        bad = ~torch.isfinite(d)
        over = int(torch.count_nonzero(bad))
        if over:
            d = torch.where(bad, overflow_error(dtype), d)
            plain = sum_squares(d, None, scratch)
    return (plain, None, over) if w is None else (sum_squares(d, w, scratch), plain, over)


#: dtypes numpy subtracts as torch does (names: torch is imported on first use, not with the module)
_NUMPY_FLOATS = frozenset({"float16", "float32", "float64"})


def _squared_sums(sq: np.ndarray, dtype: torch.dtype, w: torch.Tensor | None) -> tuple[float, float | None, int]:
    """``_squares`` of float64 differences held in ``sq``, squared there in place (the buffer is
    overwritten): the same floats, without a second buffer. The squares are finite where the
    differences are (those of float32 values stay far below float64's range), so an element that
    is not finite counts as ``overflow_error(dtype)`` squared."""
    np.square(sq, out=sq)
    plain = add_reduce(sq)
    over = 0
    if not math.isfinite(plain):
        bad = ~np.isfinite(sq)
        over = int(np.count_nonzero(bad))
        if over:
            e = overflow_error(dtype)
            sq[bad] = e * e
            plain = add_reduce(sq)
    if w is None:
        return plain, None, over
    np.multiply(sq, w.reshape(-1).numpy(), out=sq)
    return add_reduce(sq), plain, over


#: Elements of an original (bfloat16, float8) widened to float64 at a time by ``_Errors``.
_WIDEN_ELEMENTS = 1 << 16


class _Errors:
    """Squared errors of rebuilds against one (finite) original: called with a rebuild ``a``, its
    error as (weighted by ``w``, plain, bit-exact, elements of ``a`` that are +-inf or NaN), or
    (plain, None, ...) without weights; bit-exact only where the plain error is 0 and every bit is
    the same. An element of ``a`` that is not finite counts as ``overflow_error`` off. The dial
    measures some twenty rebuilds of each task's tensor: each difference is taken in one float64
    buffer, widened as it is subtracted, and squared and summed there (``_squared_sums``): fresh
    buffers cost more than the arithmetic, and each float64 copy of the tensor is twice a float32
    task's size in every task measured at once."""

    def __init__(self, original: torch.Tensor, w: torch.Tensor | None):
        self.original, self.w = original.reshape(-1), w
        self._d = torch.empty(self.original.numel(), dtype=torch.float64)
        self._np = self._d.numpy()
        numpy = str(self.original.dtype).removeprefix("torch.") in _NUMPY_FLOATS
        self._orig_np = self.original.numpy() if numpy else None

    def norm(self) -> tuple[float, float | None]:
        """The original's own sum of squares, as (weighted, plain) or (plain, None)."""
        sq, plain, _ = _squared_sums(self._d.copy_(self.original).numpy(), self.original.dtype, self.w)
        return sq, plain

    def __call__(self, a: torch.Tensor) -> tuple[float, float | None, bool, int]:
        a = a.reshape(-1)
        if self._orig_np is not None and str(a.dtype).removeprefix("torch.") in _NUMPY_FLOATS:
            # numpy widens both and subtracts in one pass (float64(a) - float64(original), exactly)
            np.subtract(a.numpy(), self._orig_np, out=self._np, dtype=np.float64)
        else:  # the original widened a piece at a time (exact): no float64 copy of it held
            d, step = self._d.copy_(a), _WIDEN_ELEMENTS
            for i in range(0, d.numel(), step):
                d[i : i + step].sub_(self.original[i : i + step].to(torch.float64))
        err, plain, over = _squared_sums(self._np, a.dtype, self.w)
        exact = (err if plain is None else plain) == 0 and same_bits(a, self.original)
        return err, plain, exact, over


# -- a streamed tensor's task measured a run of blocks at a time ------------------------------------
#
# A tensor too large to hold whole (``Item.streamed``) has each task measured a run of whole chunks
# (and whole blocks of 64) at a time, in two or three passes over the task's copy, with the same
# figures as ``Dial._measure`` on the whole: every squared error summed in numpy's pairwise order
# across the runs (``sums.PairwiseSum``), every array's stored bytes coded chunk by chunk as they
# fill (``_ArrayCost``), the qtau scales decided over the whole tensor (float16 only where every
# block's fits) before any code is made, the sparse entries selected by the k-th largest magnitude,
# found by a radix selection (the high 16 bits' counts, then the low ones' within its bin).

#: The most elements a task is worked in at a time (``_run_elements``), a multiple of the blocks:
#: about 80 bytes of work an element (float64 differences, float32 rebuilds and residuals).
RUN_ELEMENTS = 1 << 20


def _run_elements(ce: int) -> int:
    """Elements a streamed tensor's task is worked in at a time: whole quantization blocks
    (``BLOCK``, ``QBLOCK``), ``RUN_ELEMENTS`` at most, else whole chunks of ``ce`` (each array's
    chunks coded as they fill, a chunk's pieces held until then: ``_ArrayCost``, ``_Permuted``)."""
    assert BLOCK == QBLOCK and RUN_ELEMENTS % QBLOCK == 0
    whole = ce * (QBLOCK // math.gcd(ce, QBLOCK))
    return whole if whole <= RUN_ELEMENTS else RUN_ELEMENTS



def _task_runs(item: Item, i: int, run: int, lock: threading.Lock) -> Iterator[tuple[slice, torch.Tensor]]:
    """Task ``i``'s copy of a streamed item, flat, ``run`` elements at a time (``Item.task_blocks``:
    that task's file alone), each read under ``lock`` (one read at a time)."""
    blocks_of = item.task_blocks(i, run, base=False)
    while True:
        with lock:
            got = next(blocks_of, None)
        if got is None:
            return
        a, _, xb = got
        x = xb.reshape(-1)
        yield slice(a, a + x.numel()), x

class _ArrayCost:
    """``_array_cost`` of an array given a piece at a time, in order: each chunk of ``ce`` elements
    coded once it is whole (a piece's part held, copied, until then)."""

    def __init__(self, chain: Chain, ce: int, dtype: np.dtype):
        self.chain, self.ce, self.dtype = chain, ce, np.dtype(dtype)
        self._held: list[np.ndarray] = []
        self._count = self._chunks = 0
        self._cost = ARRAY_OVERHEAD

    def add(self, a: np.ndarray) -> None:
        a = a.reshape(-1)
        while a.size:
            take = min(self.ce - self._count, a.size)
            if take == self.ce:  # a whole chunk in the piece: coded where it is
                self._code(a[:take])
            else:
                self._held.append(a[:take].copy())
                self._count += take
                if self._count == self.ce:
                    self._code(np.concatenate(self._held))
            a = a[take:]

    def _code(self, chunk: np.ndarray) -> None:
        data = np.ascontiguousarray(chunk).view(np.uint8).data.cast("B")
        self._cost += len(self.chain.encode(data)) + CHUNK_OVERHEAD
        self._held, self._count, self._chunks = [], 0, self._chunks + 1

    @property
    def total(self) -> int:
        """The bytes, once every piece is in (the last chunk, or an empty array's one, coded now)."""
        if self._count or not self._chunks:
            self._code(np.concatenate(self._held) if self._held else np.empty(0, self.dtype))
        return self._cost


class _Permuted:
    """``permute`` of a residual given a piece at a time, in order, into ``cost``: each chunk of
    ``ce`` elements permuted once it is whole (its pieces, and their reference's, held until then)."""

    def __init__(self, cost: _ArrayCost, dtype: str, ce: int):
        self.cost, self.dtype, self.ce = cost, dtype, ce
        self._held: list[tuple[np.ndarray, np.ndarray]] = []
        self._count = 0

    def add(self, z: np.ndarray, r: np.ndarray) -> None:
        while z.size:
            take = min(self.ce - self._count, z.size)
            if take == self.ce:  # a whole chunk in the piece: permuted where it is
                self.cost.add(permute(z[:take], r[:take], self.dtype, "exponent", self.ce))
            else:
                self._held.append((z[:take].copy(), r[:take].copy()))
                self._count += take
                if self._count == self.ce:
                    self._flush()
            z, r = z[take:], r[take:]

    def _flush(self) -> None:
        if self._held:
            z, r = (np.concatenate(p) for p in zip(*self._held))
            self.cost.add(permute(z, r, self.dtype, "exponent", self.ce))
        self._held, self._count = [], 0

    @property
    def total(self) -> int:
        """``cost.total``, once every piece is in (the last chunk permuted now)."""
        self._flush()
        return self.cost.total


class _BlockSquares:
    """``_squared_sums`` of float64 differences given a block at a time, in order: the same floats
    (an element that is not finite counts as ``overflow_error(dtype)`` wherever it falls)."""

    def __init__(self, n: int, dtype: torch.dtype, weighted: bool):
        self.dtype, self.over, self.same = dtype, 0, True
        self._plain = PairwiseSum(n)
        self._weighted = PairwiseSum(n) if weighted else None

    def add(self, sq: np.ndarray, w: np.ndarray | None) -> bool:
        """One block's differences, squared in ``sq`` (overwritten); whether every one is 0."""
        np.square(sq, out=sq)
        top = float(sq.max()) if sq.size else 0.0
        if not math.isfinite(top):
            bad = ~np.isfinite(sq)
            self.over += int(np.count_nonzero(bad))
            e = overflow_error(self.dtype)
            sq[bad] = e * e
        self._plain.add(sq)
        if self._weighted is not None:
            assert w is not None
            np.multiply(sq, w, out=sq)
            self._weighted.add(sq)
        return top == 0

    def result(self) -> tuple[float, float | None, int]:
        plain = self._plain.value
        return (plain, None, self.over) if self._weighted is None else (self._weighted.value, plain, self.over)


class _BlockErrors(_BlockSquares):
    """``_Errors``'s figures of one rebuild given a block at a time: (weighted, plain, bit-exact,
    overflow) or (plain, None, ...)."""

    def add_rebuild(self, a: torch.Tensor, x: torch.Tensor, d: np.ndarray, w: np.ndarray | None) -> None:
        """Rebuild block ``a`` against the original's ``x`` (flat), worked in float64 ``d``."""
        d = d[: a.numel()]
        if (str(a.dtype).removeprefix("torch.") in _NUMPY_FLOATS
                and str(x.dtype).removeprefix("torch.") in _NUMPY_FLOATS):
            np.subtract(a.numpy(), x.numpy(), out=d, dtype=np.float64)
        else:
            torch.from_numpy(d).copy_(a).sub_(x.to(torch.float64))
        zero = self.add(d, w)
        self.same = self.same and zero and same_bits(a, x)  # (only where no error is left)

    def figures(self) -> tuple[float, float | None, bool, int]:
        err, plain, over = self.result()
        return err, plain, (err if plain is None else plain) == 0 and self.same, over


def _kth(counts: np.ndarray, k: int) -> tuple[int, int]:
    """The bin of ``counts`` (one per value, ascending) holding the k-th largest entry, and how many
    of that bin's entries are among the k largest."""
    above = np.cumsum(counts[::-1])[::-1]  # entries in this bin or a higher one
    h = int(np.count_nonzero(above >= k)) - 1
    return h, k - (int(above[h + 1]) if h + 1 < above.size else 0)


class _Sparse:
    """The entries each sparse candidate (``ks``) keeps of a streamed residual, given a run at a
    time, as ``sparse_encode_ks`` picks them from the whole (the k largest magnitudes, ties at the
    cut broken by the lowest index): each k-th largest magnitude found by a radix selection (the
    counts of the magnitudes' high 16 bits, :meth:`high`, then of the low ones within the k-th's
    bin, :meth:`low`; :meth:`settle`), and how many entries equal to it are kept; then, a pass over
    the runs in index order (:meth:`chooser`), those above it and the first that many equal to it."""

    def __init__(self, n: int, ks: Sequence[int]):
        self.n, self.ks = n, list(ks)
        self._high = np.zeros(1 << 16, np.int64)
        self._low: dict[int, np.ndarray] = {}
        self._bins: dict[int, tuple[int, int]] = {}
        self.top = 0
        self.cut: dict[int, tuple[np.uint32, int]] = {}  # k -> the k-th largest magnitude's bits, the ties kept

    def high(self, r: torch.Tensor) -> None:
        u = magnitude_bits(r)
        if u.size:
            self.top = max(self.top, int(u.max()))
            self._high += np.bincount(u >> np.uint32(16), minlength=1 << 16)

    def lows(self) -> bool:
        """After every run's :meth:`high`: whether a pass of :meth:`low` is wanted."""
        self._bins = {k: _kth(self._high, k) for k in self.ks if 0 < k < self.n}
        self._low = {h: np.zeros(1 << 16, np.int64) for h, _ in self._bins.values()}
        return bool(self._low)

    def low(self, r: torch.Tensor) -> None:
        u = magnitude_bits(r)
        top16 = u >> np.uint32(16)
        for h, counts in self._low.items():
            counts += np.bincount(u[top16 == h] & np.uint32(0xFFFF), minlength=1 << 16)

    def settle(self) -> None:
        """After every run's :meth:`low`: each k's cut and the ties it keeps."""
        for k, (h, need) in self._bins.items():
            lo, ties = _kth(self._low[h], need)
            self.cut[k] = (np.uint32((h << 16) | lo), ties)

    @property
    def half(self) -> bool:
        """Whether the values are stored as float16: the largest magnitude kept (the largest of all)
        within ``FLOAT16_MAX`` (a NaN's is not)."""
        return float(np.array(self.top, np.uint32).view(np.float32)) <= FLOAT16_MAX

    def chooser(self) -> Callable[[int, slice, np.ndarray], np.ndarray]:
        """``kept(k, s, u)``: the positions within run ``s`` (``u``, its residual's
        ``magnitude_bits``) of the entries candidate ``k`` keeps; for one pass, given every run in
        index order."""
        left = {k: ties for k, (_, ties) in self.cut.items()}
        at = dict.fromkeys(self.ks, 0)

        def kept(k: int, s: slice, u: np.ndarray) -> np.ndarray:
            if s.start != at[k]:  # (ties are kept by index: a run out of order would keep others)
                raise AssertionError(f"sparse runs out of order: {s.start} after {at[k]}")
            at[k] = s.stop
            if k not in self.cut:  # (k 0, or every entry)
                return np.arange(u.size if k >= self.n else 0, dtype=np.int64)
            local, took = sparse_kept(u, self.cut[k][0], left[k])
            left[k] -= took
            return local

        return kept


class _Gaps:
    """A sparse candidate's index gaps, given a run's kept positions at a time (``sparse_encode``'s)."""

    def __init__(self, n: int):
        self.dtype = np.uint64 if n > 0xFFFFFFFF else np.uint32
        self._last = 0

    def __call__(self, s: slice, local: np.ndarray) -> np.ndarray:
        idx = local.astype(np.int64) + s.start
        gaps = np.diff(idx, prepend=self._last).astype(self.dtype)
        self._last = int(idx[-1]) if idx.size else self._last
        return gaps


def _sparse_runs(n: int, k: int, residuals: Callable[[], Iterator[tuple[slice, torch.Tensor]]]) -> _Sparse:
    """A sparse candidate's choice (:class:`_Sparse`) of a streamed residual, ``residuals()`` giving
    it a run at a time (each call a pass over the task's copy): settled."""
    picks = _Sparse(n, [k])
    for _, r in residuals():
        picks.high(r)
    if picks.lows():
        for _, r in residuals():
            picks.low(r)
    picks.settle()
    return picks


def _streamed_correction(ctx: WriteContext, item: Item, i: int, option: Option, tp: _Parts,
                         lock: threading.Lock) -> dict[str, np.ndarray]:
    """``candidate_arrays`` of a sparse or quant correction of a streamed item's task ``i``, its
    residual made a run at a time (``_run_elements``): the same arrays, and of the tensor's size
    only they (a byte an element at most)."""
    n, run, lam = tp.n, _run_elements(ctx.chunk_elements), ctx.lambdas[item.tasks[i]]

    def residuals() -> Iterator[tuple[slice, torch.Tensor]]:
        for s, x in _task_runs(item, i, run, lock):
            b32, mg = tp.widened(s), tp.merged[s]
            yield s, residual(x, b32, tall_mask(x.to(torch.float32) - b32, mg, lam), mg)

    if option.kind == "quant":
        parts = [quant_encode(r, option.bits, BLOCK) for _, r in residuals()]  # (whole blocks: see quant_encode)
        return {"scales": np.concatenate([p[1] for p in parts]), "codes": np.concatenate([p[0] for p in parts])}
    assert option.kind == "sparse"
    picks = _sparse_runs(n, option.k, residuals)
    kept, gaps_of, gaps, values = picks.chooser(), _Gaps(n), [], []
    for s, r in residuals():
        local = kept(option.k, s, magnitude_bits(r))
        gaps.append(gaps_of(s, local))
        values.append(r.numpy()[local])
    v = np.concatenate(values)
    return {"indices": np.concatenate(gaps), "values": np.ascontiguousarray(v.astype(np.float16) if picks.half else v)}

def sensitivity_weights(weights: Any, shape: tuple[int, ...], where: str) -> torch.Tensor:
    """A sensitivity's weights for a tensor of ``shape``, flat in float64, as given: with a layer's
    input second moments each tensor's weighted error is its layer's output error, so tensors
    compare in the same units (zeros: an error there counts for nothing). InvalidArgumentError
    names ``where`` when they are not finite, non-negative and broadcastable to the shape."""
    try:
        w = torch.as_tensor(weights).detach().to("cpu", torch.float64)
        w = torch.broadcast_to(w, shape).reshape(-1)
    except (TypeError, ValueError, RuntimeError) as e:
        raise InvalidArgumentError(f"sensitivity of {where}: not a tensor broadcastable to {list(shape)} ({e})") from None
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
        raise InvalidArgumentError(f"sensitivity of {where}: weights must be finite and non-negative")
    return w


def candidate_arrays(option: Option, r: torch.Tensor) -> dict[str, np.ndarray]:
    """The arrays a sparse, quant or qtau candidate stores (``r``: the residual; for qtau, the task vector)."""
    if option.kind == "sparse":
        gaps, values = sparse_encode(r, option.k)
        return {"indices": gaps, "values": values}
    if option.kind == "qtau":
        codes, scales = quantize(r, option.bits, QBLOCK)
        return {"codes": codes, "scales": scales}
    codes, scales = quant_encode(r, option.bits, BLOCK)
    return {"scales": scales, "codes": codes}


def decoded(option: Option, arrays: Mapping[str, np.ndarray], n: int) -> torch.Tensor:
    if option.kind == "sparse":
        return sparse_decode(arrays["indices"], arrays["values"], n)
    if option.kind == "qtau":
        return dequantize(arrays["codes"], arrays["scales"], option.bits, QBLOCK, n)
    return quant_decode(arrays["codes"], arrays["scales"], option.bits, BLOCK, n)


def _chain(ctx: WriteContext, arr: np.ndarray) -> Chain:
    return ctx.dense(arr.dtype.name)  # numpy's names are the spec's


def _tensor_cost(chain: Chain, t: torch.Tensor, ce: int) -> int:
    """Stored bytes of a tensor written as one array (any dtype, bfloat16 included)."""
    data = tensor_to_bytes(t.reshape(-1).contiguous())
    step = ce * t.element_size()
    pieces = [data[i : i + step] for i in range(0, len(data), step)] or [data]
    return sum(len(chain.encode(p)) + CHUNK_OVERHEAD for p in pieces) + ARRAY_OVERHEAD


@dataclass(frozen=True)
class TierCost:
    """What the TALL tier stores for one merged tensor: base, merged vector (with the method's
    extra arrays) and each task's mask, in bytes."""

    base: int
    merged: int
    masks: dict[str, int]

    @property
    def total(self) -> int:
        return self.base + self.merged + sum(self.masks.values())


#: One-sided z of the lower confidence bound on a per-example score ratio (95%).
Z_LOWER = 1.645


def _wilson_upper(k: int, n: int, z: float = Z_LOWER) -> float:
    """The one-sided upper confidence bound of a rate seen k times in n (Wilson's score interval)."""
    p, z2 = k / n, z * z
    return (p + z2 / (2 * n) + z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))) / (1 + z2 / n)


def selection_z(configurations: int, alpha: float = 0.05) -> float:
    """The one-sided z that keeps a bound at ``1 - alpha`` for whichever of ``configurations``
    scored on the same validation data is chosen (Bonferroni): the dial keeps the cheapest that
    passes, and the best of many passes more easily than one does.

    >>> round(selection_z(1), 3), round(selection_z(10), 3)
    (1.645, 2.576)
    """
    return statistics.NormalDist().inv_cdf(1 - alpha / max(1, configurations))


def _positive(ref: np.ndarray, who: str) -> None:
    """InvalidArgumentError unless the reference scores above 0 on average: a ratio by a negative
    score reverses the order of the scores, and one by zero means nothing."""
    if not float(ref.mean()) > 0:
        raise InvalidArgumentError(f"{who} scores {float(ref.mean()):.4g}: a fidelity target is a fraction of its "
                                   "score, so the evaluator must score positive (an accuracy; for a loss, exp(-loss))")


def score_ratio(s: Any, ref: Any, z: float = Z_LOWER) -> float:
    """A task's fidelity from the evaluator's results on the reconstruction (``s``) and on the
    original (``ref``): each a number, or a 1-d sequence of per-example scores over the same
    examples. Numbers: ``s / ref``. Per-example scores, a lower 95% confidence bound of the ratio
    on unseen data of the same kind, so the validation set's size sets the margin: for 0/1 scores
    (correctness) ``(mean(ref) - U + gained / n) / mean(ref)``, U the upper bound (Wilson) of the
    reverse count; for other scores ``(mean(s) - z sd(s - ref) / sqrt(n)) / mean(ref)``; ``z``
    1.645 for one configuration (the dial, which tries several, passes a stricter one:
    :func:`selection_z`). Either is capped at 1: a reconstruction that beats the original on
    validation data is noise.

    >>> score_ratio([1, 1, 0, 1], [1, 1, 1, 1]) < 0.75
    True
    """
    a, b = np.asarray(s, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    if np.isnan(a).any() or np.isnan(b).any():
        raise TallpackError("the evaluator returned NaN")
    _positive(b, "the original")
    if a.ndim == 0 or a.size == 1 and b.size == 1:
        x, r = float(a.reshape(-1)[0]), float(b.reshape(-1)[0])
        ratio = x / r
    else:
        if a.shape != b.shape or a.ndim != 1:
            raise TallpackError(f"the evaluator returned per-example scores of shapes {a.shape} and {b.shape}")
        n, m = a.size, float(b.mean())
        if np.isin(a, (0.0, 1.0)).all() and np.isin(b, (0.0, 1.0)).all():
            lost, gained = int(((b == 1) & (a == 0)).sum()), int(((b == 0) & (a == 1)).sum())
            low = m - _wilson_upper(lost, n, z) + gained / n
        else:
            sd = float(np.std(a - b, ddof=1)) if n > 1 else 0.0
            low = float(a.mean()) - z * sd / math.sqrt(n)
        ratio = low / m
    return min(ratio, 1.0)


class Dial:
    """Measures each merged tensor's candidates before the packer writes it (``observe``),
    decides (``decide``), then writes each merged tensor as decided (``write_tensor``)."""

    def __init__(self, *, target: float | None, budget_bytes: int | None, allowed: Sequence[str],
                 evaluate: Evaluator | None = None,
                 sources: Mapping[str, Any] | None = None, unit_bytes: float = 0.0,
                 sensitivity: Mapping[str, Mapping[str, Any]] | None = None):
        self.target, self.budget_bytes, self.allowed = target, budget_bytes, tuple(allowed)
        #: per task and tensor, weights of each element's squared error (``PackOptions.sensitivity``)
        self.sensitivity = sensitivity
        self.evaluate, self.sources = evaluate, sources
        self.unit_bytes = unit_bytes  # one task checkpoint's bytes, the budget's unit
        self.plans: dict[str, TaskPlan] = {}
        self.tier: dict[str, TierCost] = {}
        #: per merged tensor, about what ``pack --exact`` would store for it (``exact_tier_cost``)
        self.exact_tier: dict[str, int] = {}
        #: qtau candidates (the dial never runs with the exact tier: ``PackOptions`` refuses it)
        self.qtau = "qtau" in self.allowed
        #: whether a merged vector may be dropped (Task Arithmetic: tau_MTL is a plain sum)
        self.droppable = False
        #: with an evaluator: per task and tensor, (f32 base, f32 TALL rebuild before the cast, residual, dtype)
        self._held: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.dtype]]] = {}
        self.choice: dict[str, dict[str, Option]] = {}
        #: with an evaluator: per task, the fidelity the original itself gets (below 1 with a bound)
        self.ceiling: dict[str, float] = {}
        self.z = Z_LOWER  # the confidence bound's z, once the evaluator is in use (_score_fn)
        self.dropped: set[str] = set()
        self.achieved: dict[str, dict[str, float]] = {}
        self.met = True
        self.below: dict[str, float] = {}
        #: the warning that the exact tier would be about as small (``_hint_exact``), else None:
        #: ``pack`` returns it on the manifest's ``hints``, for a caller to show beside its result
        self.hint: str | None = None
        #: bytes by which a budget's estimate is corrected, measured on the archive being written
        self.calibration = 0
        self._writes = 0
        #: (calibration, size, decision) of the fullest write within the budget
        self._within: tuple[int, int, Hashable] | None = None
        #: the bytes of each decision written (``_decision_key``), and the one written last
        self._sizes: dict[Hashable, int] = {}
        self._written: Hashable = None
        self._plain: int | None = None  # the archive's size as plain TALL (``decide``)
        self._lowered: dict[str, float] = {}  # tasks whose target was lowered to what they certify
        self._over: int | None = None  # the smallest calibration whose archive went over it
        self._final = False  # the write under way is the fullest within, written again: kept
        #: when the last decision wrote the smallest archive because the estimate said nothing
        #: fits: that estimate (``refit`` measures it)
        self._smallest: int | None = None
        self._force_smallest = False  # every write so far was over the budget: try the smallest

    @property
    def _weighted_targets(self) -> bool:
        return self.sensitivity is not None and SENSITIVITY_TARGETS == "weighted"

    @property
    def measure(self) -> str:
        """The weight-space measure of targets and of the max-min over tasks: ``weighted`` with a
        sensitivity, else ``weight``."""
        return "weighted" if self._weighted_targets else "weight"

    # -- pass 1 -------------------------------------------------------------------------------
    def observe(self, ctx: WriteContext, item: Item) -> None:
        """Measure the TALL tier and every candidate of every task's copy of one merged tensor."""
        with torch_alone():
            self._observe(ctx, item)
        give_back(numel(item.shape))

    def _observe(self, ctx: WriteContext, item: Item) -> None:
        tp = _whole_parts(ctx, item, extras=True)
        give_back(tp.n)  # (a streamed item's blocks, read and let go)
        base, merged, extras = tp.base, tp.merged, tp.extras
        assert extras is not None
        ce = ctx.chunk_elements
        self.droppable = DROP_MERGED and self.qtau and ctx.method.name == "ta"
        b_dt = dtype_name(base.dtype)
        mcost = _tensor_cost(ctx.dense("float32"), merged, ce) + sum(
            _tensor_cost(ctx.dense(EXTRA_ARRAYS[k]), v, ce) for k, v in extras.items())
        masks = tp.mask_costs if tp.masks is None else [_tensor_cost(ctx.masks, m, ce) + 40 for m in tp.masks]
        assert masks is not None
        tier = TierCost(_tensor_cost(ctx.dense(b_dt), base, ce), mcost, dict(zip(item.tasks, masks)))
        self.tier[item.name] = tier
        n = merged.numel()  # (an empty tensor: its base entry alone)
        bases: dict[torch.dtype, torch.Tensor] = {}  # the exact tier's base reference, once per dtype
        by_runs = self._by_runs(ctx, item)  # (``_measure_streamed``: the base widened and narrowed a run at a time)
        base32 = torch.empty(0) if by_runs else tp.base32
        for dt in item.dtypes[1] if n and not by_runs else ():  # made here, before the tasks share them
            if dt not in bases:
                bases[dt] = narrow(base32, dt)  # as ``_references``
        del base
        if not by_runs:  # (let go while the tasks are measured: they take the float32 base; a view would hold it)
            tp.base = tp.base.new_empty(0)
        scratch = _Scratch(n + max(QBLOCK, BLOCK))  # the quantizers' work: no fresh pages
        read = _reader(item)
        lock = threading.Lock()

        def measure(i: int) -> _Measured:
            if by_runs:  # (an evaluator holds each rebuild whole: ``held``)
                return self._measure_streamed(ctx, item, i, tp, tier, lock)
            x = read(i)  # (a streamed item with an evaluator: each task's copy read as its turn comes)
            return self._measure(ctx, item, i, x, base32, merged, tp.mask(ctx, item, i, x), tier, bases,
                                 scratch.get())

        sizes: dict[str, list[tuple[int, tuple[str, str, str]]]] = {}
        parts = in_flight(ctx.threads, len(item.tasks), n, memory_free() if ctx.threads > 1 else None,
                          STREAMED_WORK_PER_ELEMENT if by_runs else WORK_PER_ELEMENT)
        with closing(_in_order(measure, len(item.tasks), parts)) as results:
            for t, got in zip(item.tasks, results):
                plan = self.plans.setdefault(t, TaskPlan())
                m = got()  # a task's error is raised here, after the tasks before it are recorded
                give_back(n)  # (its work's buffers, while the next task's are made)
                plan.theta_sq += m.sq
                plan.plain_theta_sq += m.sq if m.sq_plain is None else m.sq_plain
                plan.scale[item.name] = m.scale
                plan.tall_err += m.tall.err
                plan.plain_tall_err += m.tall.plain_err
                plan.tall_inexact += not m.tall.bit_exact
                plan.tall_overflow[item.name] = m.tall.overflow
                if m.qtaus is not None:
                    plan.qtaus[item.name] = m.qtaus
                if m.sizes is not None:
                    sizes[t] = m.sizes
                plan.ladders[item.name] = m.ladder
                if self.evaluate is not None:
                    assert m.held is not None
                    self._held.setdefault(t, {})[item.name] = m.held
        self.exact_tier[item.name] = exact_tier_cost(tier, sizes, n, ce, derives_merged(ctx.method)) if n else tier.base

    def _by_runs(self, ctx: WriteContext, item: Item) -> bool:
        """Whether ``item``'s tasks are measured and corrected a run at a time (``_measure_streamed``):
        a streamed one, and one held whole whose measurement would work in more than ``RUNS_FROM``
        bytes (``WHOLE_WORK_PER_ELEMENT``) and span more than one run; not with an evaluator, which
        holds each rebuild whole."""
        if self.evaluate is not None:
            return False
        n = numel(item.shape)
        return item.streamed or (n > _run_elements(ctx.chunk_elements) and n * WHOLE_WORK_PER_ELEMENT > RUNS_FROM)

    def _measure(self, ctx: WriteContext, item: Item, i: int, x: torch.Tensor, base32: torch.Tensor,
                 merged: torch.Tensor, mask: torch.Tensor, tier: TierCost, bases: dict[torch.dtype, torch.Tensor],
                 scratch: torch.Tensor) -> _Measured:
        """Task ``i``'s candidates of one merged tensor (``x``: its copy), measured without touching
        the dial's state (the tasks of a tensor are measured on several threads at once:
        ``_observe`` records them)."""
        t, ce = item.tasks[i], ctx.chunk_elements
        xf = x.reshape(-1)
        given = (self.sensitivity or {}).get(t, {}).get(item.name)
        w = None if given is None else sensitivity_weights(given, tuple(x.shape), f"task {t!r}, tensor {item.name!r}")
        sq_err = _Errors(xf, w)
        rec32 = torch.addcmul(base32, mask.to(torch.float32), merged)
        r = xf.to(torch.float32) - rec32
        plain = narrow(rec32, x.dtype)
        sq, sq_plain = sq_err.norm()
        scale = 1.0 / (sq or _squares(base32.to(torch.float64), base32.dtype, w)[0] or 1.0)
        err0, plain0, exact0, over0 = sq_err(plain)
        opts = [Option(None, 0, err0, plain=plain0, bit_exact=exact0, overflow=over0)]
        qs: list[Option] | None = None
        sizes: list[tuple[int, tuple[str, str, str]]] | None = None
        n = r.numel()

        def priced(arrays: Mapping[str, np.ndarray]) -> int:
            return sum(_array_cost(_chain(ctx, a), a, ce) for a in arrays.values()) + 40

        if n and self.qtau:
            # measured even where TALL loses nothing (a task equal to the base: a zero task
            # vector, whose qtau is exact and nearly free): the merged-vector pass moves
            # such a task to qtau so that the others may drop the merged vector
            tau = xf.to(torch.float32) - base32
            qs = []
            deqs = quantize_widths(tau, QTAU_BITS, QBLOCK, scratch=scratch)
            for b, (codes, scales, deq) in zip(QTAU_BITS, deqs):
                assert deq is not None
                err, pe, same, over = sq_err(narrow(deq.add_(base32), x.dtype))  # as ``rebuilt``
                qs.append(Option("qtau", priced({"codes": codes, "scales": scales}) - tier.masks[t], err, bits=b,
                                 plain=pe, bit_exact=same, overflow=over))
            opts += qs
            del tau, deqs  # (not held through the corrections' work)
        if n and err0 > 0:  # (a correction adds to the TALL rebuild: none mends a -0.0 it lost)
            # each candidate's correction c as its decoder gives it, the rebuild as ``corrected``
            # (rec32 is its TALL part), without decoding the arrays again
            if "sparse" in self.allowed:
                # rec32 + c, c zero but at the k indices: rec32 + 0.0 (a -0.0 becomes +0.0),
                # the k entries added to; in one buffer, put back at those entries after each k
                work = torch.add(rec32, 0.0)
                ks = sorted({max(1, int(n * f)) for f in SPARSE_FRACTIONS})
                for k, gaps, values in sparse_encode_ks(r, ks):
                    idx = torch.from_numpy(np.cumsum(gaps.astype(np.int64)))
                    work[idx] = rec32[idx] + torch.from_numpy(values.astype(np.float32))
                    err, pe, same, over = sq_err(narrow(work, x.dtype))
                    work[idx] = rec32[idx] + 0.0
                    opts.append(Option("sparse", priced({"indices": gaps, "values": values}), err, k, 0, pe, same, over))
                del work
            widths = [b for b in (4, 8) if f"quant{b}" in self.allowed]
            for b, (codes, scales, cq) in zip(widths, quant_encode_widths(r, widths, BLOCK, scratch=scratch)):
                assert cq is not None
                err, pe, same, over = sq_err(narrow(rec32 + cq, x.dtype))
                opts.append(Option("quant", priced({"scales": scales, "codes": codes}), err, 0, b, pe, same, over))
        if n:  # the exact tier's residual, weighed as ``pack --exact`` would (``exact_tier_cost``)
            refs: dict[str, torch.Tensor | None] = {"tall": plain, "base": bases[x.dtype], "zero": None}
            if torch.isnan(plain).any():  # as ``exact._references``: never coded against a NaN
                del refs["tall"]
            sizes = _sample_sizes(ctx, x, refs, EXACT_CODECS)
            if not exact0 and "exact" in self.allowed:  # also where TALL errs by bits alone
                opts.append(Option("exact", _exact_cost(ctx, x, sizes, refs), 0.0, bit_exact=True))
        held = (base32, rec32, r, x.dtype) if self.evaluate is not None else None
        return _Measured(sq, sq_plain, scale, opts[0], hull(opts), qs, sizes, held)

    def _measure_streamed(self, ctx: WriteContext, item: Item, i: int, tp: _Parts, tier: TierCost,
                          lock: threading.Lock) -> _Measured:
        """``_measure`` of a streamed item's task ``i``, its copy read a run of blocks at a time
        (``_run_elements``): pass 1 the TALL rebuild, the original's norm, the quant corrections, the
        qtau blocks' maxima and the sparse magnitudes' high bits; pass 2 the qtau candidates (their
        scales decided), the exact residual's chunks and the sparse magnitudes' low bits; pass 3 the
        sparse candidates. The same figures as ``_measure`` on the whole copy, and no array of the
        tensor's size but the base and ``tau_MTL`` the tasks share (``tp``: the base widened a run at
        a time) and a sensitivity's weights."""
        t, ce, dt, merged = item.tasks[i], ctx.chunk_elements, item.dtypes[1][i], tp.merged
        n = merged.numel()
        lam, run = ctx.lambdas[t], _run_elements(ce)
        given = (self.sensitivity or {}).get(t, {}).get(item.name)
        wt = None if given is None else sensitivity_weights(given, item.shape, f"task {t!r}, tensor {item.name!r}")
        w = None if wt is None else wt.numpy()
        weighted = w is not None
        d = np.empty(run, np.float64)  # each difference's float64 work
        scratch = torch.empty(run + QBLOCK, dtype=torch.float32)

        def runs() -> Iterator[tuple[slice, np.ndarray | None, torch.Tensor, torch.Tensor, torch.Tensor,
                                     torch.Tensor, torch.Tensor]]:
            """Per run: its slice, weights, the copy's elements, the float32 base's, the TALL rebuild
            (float32), its residual and the rebuild in the task's dtype; read one run at a time."""
            for s, x in _task_runs(item, i, run, lock):
                b32, mg = tp.widened(s), merged[s]
                x32 = x.to(torch.float32)
                rec = torch.addcmul(b32, tall_mask(x32 - b32, mg, lam).to(torch.float32), mg)
                yield s, (None if w is None else w[s]), x, b32, rec, x32 - rec, narrow(rec, dt)

        def priced(costs: Sequence[_ArrayCost]) -> int:
            return sum(c.total for c in costs) + 40

        def cost_of(of: Any) -> _ArrayCost:
            dtype = np.dtype(of)
            return _ArrayCost(ctx.dense(dtype.name), ce, dtype)

        # -- pass 1
        norm, tall = _BlockSquares(n, dt, weighted), _BlockErrors(n, dt, weighted)
        widths = [b for b in (4, 8) if f"quant{b}" in self.allowed]
        quants = {b: (_BlockErrors(n, dt, weighted), cost_of(np.float32), cost_of(np.int8 if b == 8 else np.uint8))
                  for b in widths}
        sparse = "sparse" in self.allowed
        amax = np.empty(-(-n // QBLOCK), np.float32) if self.qtau else None
        ks = sorted({max(1, int(n * f)) for f in SPARSE_FRACTIONS}) if sparse and n else []
        picks = _Sparse(n, ks) if ks else None
        nan_plain = False
        sample = min(SAMPLE_ELEMENTS, n)
        xs: list[torch.Tensor] = []
        plains: list[torch.Tensor] = []
        for s, ws, x, b32, rec, r, plain in runs():
            m = x.numel()
            torch.from_numpy(d[:m]).copy_(x)
            norm.add(d[:m], ws)
            tall.add_rebuild(plain, x, d, ws)
            nan_plain = nan_plain or bool(torch.isnan(plain).any())
            if s.start < sample:
                xs.append(x[: sample - s.start].clone())
                plains.append(plain[: sample - s.start].clone())
            if amax is not None:
                rows, _, nb = float_blocks(x.to(torch.float32) - b32, QBLOCK)
                amax[s.start // QBLOCK : s.start // QBLOCK + nb] = block_maxima(
                    rows.numpy(), scratch[: nb * QBLOCK].numpy().reshape(nb, QBLOCK))
            for b, (codes, scales, cq) in zip(widths, quant_encode_widths(r, widths, BLOCK, scratch=scratch)):
                assert cq is not None
                errs, scale_cost, code_cost = quants[b]
                errs.add_rebuild(narrow(rec + cq, dt), x, d, ws)
                scale_cost.add(scales)
                code_cost.add(codes)
            if picks is not None:
                picks.high(r)
        sq, sq_plain, _ = norm.result()
        if sq:
            scale = 1.0 / sq
        else:  # (as ``_squares`` of the float32 base)
            base_sq = _BlockSquares(n, torch.float32, weighted)
            for a in range(0, n, run):
                m = min(run, n - a)
                torch.from_numpy(d[:m]).copy_(tp.widened(slice(a, a + m)))
                base_sq.add(d[:m], None if w is None else w[a : a + m])
            scale = 1.0 / (base_sq.result()[0] or 1.0)
        err0, plain0, exact0, over0 = tall.figures()
        opts = [Option(None, 0, err0, plain=plain0, bit_exact=exact0, overflow=over0)]
        lossy = bool(n) and err0 > 0
        # the exact tier's sample, and the reference of the dial's exact candidate
        x_sample = cat(xs) if xs else torch.empty(0, dtype=dt)
        refs: dict[str, torch.Tensor | None] = {"tall": cat(plains) if plains else x_sample,
                                                "base": narrow(tp.widened(slice(0, sample)), dt), "zero": None}
        if nan_plain:
            del refs["tall"]
        sizes = _sample_sizes(ctx, x_sample, refs, EXACT_CODECS) if n else None
        del xs, plains, x_sample
        exact_ref: tuple[str, str] | None = None
        if sizes is not None and not exact0 and "exact" in self.allowed:
            exact_ref = next(how[:2] for _, how in sizes if how[2] == "planes")
        # -- pass 2
        qtaus: dict[int, tuple[np.ndarray, np.ndarray, _BlockErrors, _ArrayCost]] = {}
        if amax is not None and n:
            for b in QTAU_BITS:
                stored, used = width_scales(amax, b)
                qtaus[b] = (stored, used, _BlockErrors(n, dt, weighted), cost_of(np.uint8))
        if not lossy:  # (a correction adds to the TALL rebuild: none mends a -0.0 it lost)
            picks = None
        low = picks is not None and picks.lows()
        exact_cost = None
        if exact_ref is not None:
            assert ctx.residuals is not None
            size = torch.empty(0, dtype=dt).element_size()
            exact_cost = _Permuted(_ArrayCost(ctx.residuals(size), ce, np.dtype(f"u{size}")), dtype_name(dt), ce)
        if qtaus or low or exact_cost is not None:
            u8 = np.empty(run, np.uint8)
            for s, ws, x, b32, rec, r, plain in runs():
                if qtaus:
                    rows, m, nb = float_blocks(x.to(torch.float32) - b32, QBLOCK)
                    work = scratch[: nb * QBLOCK]
                    for b, (_, used, errs, code_cost) in qtaus.items():
                        code_cost.add(quantized(rows.numpy(), used[s.start // QBLOCK : s.start // QBLOCK + nb], b, m,
                                                work.numpy().reshape(nb, QBLOCK), u8[: nb * QBLOCK]))
                        errs.add_rebuild(narrow(work[:m].add_(b32), dt), x, d, ws)  # as ``rebuilt``
                if low:
                    assert picks is not None
                    picks.low(r)
                if exact_cost is not None:
                    assert exact_ref is not None
                    ref, tr = exact_ref
                    xb = bits(x.contiguous())
                    rt = {"tall": plain, "base": narrow(b32, dt), "zero": None}[ref]  # (as ``_references``)
                    rb = bits(rt.contiguous()) if rt is not None else np.zeros_like(xb)
                    exact_cost.add(forward(xb, rb, tr), rb)
        qs: list[Option] | None = None
        if amax is not None and n:
            qs = []
            for b, (stored, _, errs, code_cost) in qtaus.items():
                err, pe, same, over = errs.figures()
                cost = code_cost.total + _array_cost(_chain(ctx, stored), stored, ce) + 40
                qs.append(Option("qtau", cost - tier.masks[t], err, bits=b, plain=pe, bit_exact=same, overflow=over))
            opts += qs
        # -- pass 3: the sparse candidates
        if picks is not None:
            picks.settle()
            half, kept = picks.half, picks.chooser()
            found = {k: (_BlockErrors(n, dt, weighted), _Gaps(n), cost_of(_Gaps(n).dtype),
                         cost_of(np.float16 if half else np.float32)) for k in ks}
            for s, ws, x, _, rec, r, _ in runs():
                u = magnitude_bits(r)
                for k, (errs, gaps, gap_cost, value_cost) in found.items():
                    local = kept(k, s, u)
                    gap_cost.add(gaps(s, local))
                    values = r.numpy()[local]
                    values = values.astype(np.float16) if half else values
                    value_cost.add(values)
                    work = torch.add(rec, 0.0)  # as ``_measure``'s: rec + 0.0, the k entries added to
                    where = torch.from_numpy(local)
                    work[where] = rec[where] + torch.from_numpy(values.astype(np.float32))
                    errs.add_rebuild(narrow(work, dt), x, d, ws)
            for k, (errs, _, gap_cost, value_cost) in found.items():
                err, pe, same, over = errs.figures()
                opts.append(Option("sparse", priced((gap_cost, value_cost)), err, k, 0, pe, same, over))
        if lossy:
            for b in widths:
                errs, scale_cost, code_cost = quants[b]
                err, pe, same, over = errs.figures()
                opts.append(Option("quant", priced((scale_cost, code_cost)), err, 0, b, pe, same, over))
        if exact_cost is not None:
            opts.append(Option("exact", exact_cost.total + 40, 0.0, bit_exact=True))
        return _Measured(sq, sq_plain, scale, opts[0], hull(opts), qs, sizes, None)

    def tier_bytes(self) -> int:
        """The TALL tier of every observed tensor, in bytes (what ``Tall.write`` would store)."""
        return sum(c.total for c in self.tier.values())

    # -- deciding -----------------------------------------------------------------------------
    def _score_fn(self) -> Callable[[str, Mapping[str, Option]], float]:
        """With an evaluator: the fidelity of a task with these options per tensor (``score_ratio``)."""
        evaluate, sources = self.evaluate, self.sources
        assert evaluate is not None and sources is not None
        memo: dict[tuple[str, frozenset], float] = {}
        ref: dict[str, Any] = {}
        warned: list[str] = []
        # Configurations a task may be scored in: the prefixes of its steps that a target's
        # bisection visits (a budget's search may visit every prefix), the plain and the full
        # rebuild, and one merged-vector switch per tensor; the bound holds for the one chosen.
        steps = max((len(p.steps) for p in self.plans.values()), default=0)
        visited = steps + 1 if self.budget_bytes is not None else math.ceil(math.log2(steps + 1))
        self.z = selection_z(2 + visited + len(self.tier))

        def score(t: str, chosen: Mapping[str, Option]) -> float:
            key = (t, frozenset((k, o) for k, o in chosen.items() if o.kind is not None))
            if key in memo:
                return memo[key]
            src = sources[t]
            if t not in ref:
                ref[t] = score_values(evaluate(t, {k: src.get(k) for k in src.keys()}),
                                      f"task {t!r} on the original: the evaluator's score")
                _positive(ref[t], f"task {t!r}: the original")
                # what the original itself certifies: a target above it asks for the impossible
                self.ceiling[t] = score_ratio(ref[t], ref[t], self.z)
                if np.asarray(ref[t]).size == 1 and not warned:
                    warned.append(t)
                    log.warning("the evaluator returns one number per evaluation: fidelity targets are met on "
                                "the validation data only; return per-example scores (a 1-d array) for a bound "
                                "that holds on unseen data")
            held = self._held[t]
            sd = {}
            for k in src.keys():
                if k not in held:
                    sd[k] = src.get(k)
                    continue
                base32, rec32, r, dtype = held[k]
                o = chosen.get(k)
                shape = src.info(k).shape
                if o is None or o.kind is None:
                    sd[k] = narrow(rec32, dtype).reshape(shape)
                elif o.kind == "exact":
                    sd[k] = src.get(k)
                elif o.kind == "qtau":
                    tau = src.get(k).reshape(-1).to(torch.float32) - base32
                    sd[k] = rebuilt(base32, decoded(o, candidate_arrays(o, tau), tau.numel()), dtype).reshape(shape)
                else:
                    c = decoded(o, candidate_arrays(o, r), r.numel())
                    sd[k] = narrow(rec32 + c, dtype).reshape(shape)
            got = score_values(evaluate(t, sd), f"task {t!r} on a reconstruction: the evaluator's score")
            memo[key] = score_ratio(got, ref[t], self.z)
            return memo[key]
        return score

    def _prefix(self, t: str, f: float, score: Callable[[str, Mapping[str, Option]], float] | None) -> int:
        """The shortest prefix of task t's steps that reaches fidelity ``f``."""
        plan = self.plans[t]
        last = len(plan.steps)
        if score is None:
            for p in range(last + 1):
                if reaches(plan.fidelity_at(p, self._weighted_targets), f):
                    return p
            return last
        if score(t, plan.chosen(0)) >= f:
            return 0
        f = min(f, self.ceiling[t])  # a validation set this small certifies at most the original's bound
        if score(t, plan.chosen(0)) >= f:
            return 0
        lo, hi = 0, last  # score(lo) < f; the last prefix is the original (or the best there is)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if score(t, plan.chosen(mid)) >= f:
                hi = mid
            else:
                lo = mid
        return hi

    def _switch(self, choices: dict[str, dict[str, Option]],
                keep: Callable[[str, dict[str, Option]], bool] | None = None) -> tuple[int, set[str]]:
        """The merged-vector pass, in place on ``choices`` (task -> tensor -> option): drop a
        tensor's merged vector when every task is qtau, or when moving the other tasks to a qtau
        at least as accurate as their option costs less than the merged vector (and, given
        ``keep``, every moved task's new choices pass it: with an evaluator, less weight error
        need not mean a better score). Returns the bytes saved and the tensors whose merged
        vector goes."""
        saved = 0
        dropped: set[str] = set()
        if not self.droppable:
            return 0, dropped
        for name, tier in self.tier.items():
            cur = {t: ch[name] for t, ch in choices.items() if name in ch}
            if not cur or any(o.kind == "exact" for o in cur.values()):
                continue
            moves, delta = {}, -tier.merged
            for t, o in cur.items():
                if o.kind == "qtau":
                    continue
                fit = [q for q in self.plans[t].qtaus.get(name, ()) if q.err <= o.err and q.bit_exact >= o.bit_exact]
                if not fit:
                    break
                moves[t] = min(fit, key=lambda q: (q.cost, q.err))
                delta += moves[t].cost - o.cost
            else:
                if delta < 0:
                    before = {t: choices[t][name] for t in moves}
                    for t, q in moves.items():
                        choices[t][name] = q
                    if keep is not None and not all(keep(t, choices[t]) for t in moves):
                        for t, o in before.items():
                            choices[t][name] = o
                        continue
                    saved -= delta
                    dropped.add(name)
        return saved, dropped

    def _total(self, ps: Mapping[str, int]) -> int:
        """The estimated bytes of the first ``ps[t]`` steps of each task t, less the merged vectors
        that go."""
        saved, _ = self._switch({t: self.plans[t].chosen(p) for t, p in ps.items()})
        return sum(self.plans[t].cum_cost[p] for t, p in ps.items()) - saved

    def _choose(self, spare: int | None, score: Callable[[str, Mapping[str, Option]], float] | None,
                smallest: bool) -> tuple[dict[str, dict[str, Option]], set[str]]:
        """Every task's options (task -> tensor -> option) and the tensors whose merged vector goes,
        within ``spare`` bytes (None: no budget), or the smallest archive. Changes no state."""
        tasks = list(self.plans)

        def fid(t: str, p: int) -> float:
            plan = self.plans[t]
            return score(t, plan.chosen(p)) if score is not None else plan.fidelity_at(p, self._weighted_targets)

        def cost(f: float) -> tuple[int, dict[str, int]]:
            ps = {t: self._prefix(t, f, score) for t in tasks}
            return self._total(ps), ps

        prefixes: dict[str, int]
        if smallest:
            prefixes = dict.fromkeys(tasks, 0)
        elif self.target is not None:
            total, prefixes = cost(self.target)
            if spare is not None and total > spare:
                prefixes = self._fill(self._max_min(spare, cost, fid), spare, score)
        else:
            assert spare is not None
            prefixes = self._fill(self._max_min(spare, cost, fid), spare, score)
        choices = {t: self.plans[t].chosen(prefixes[t]) for t in tasks}
        keep = None
        if score is not None:
            floor = {t: score(t, choices[t]) if self.target is None else min(self.target, score(t, choices[t]))
                     for t in tasks}
            keep = lambda t, ch: score(t, ch) >= floor[t]  # noqa: E731
        _, dropped = self._switch(choices, keep)
        return choices, dropped

    def decide(self, plain_bytes: int) -> None:
        """Choose every task's options; ``plain_bytes``: the archive's size as plain TALL."""
        for plan in self.plans.values():
            plan.order()
        self.choice, self.achieved, self.below, self.met, self._lowered = {}, {}, {}, True, {}
        score = self._score_fn() if self.evaluate is not None else None
        self._plain = plain_bytes
        spare = None if self.budget_bytes is None else self.budget_bytes - plain_bytes + self.calibration
        self._smallest = None
        least = self._total(dict.fromkeys(self.plans, 0))  # qtau may go below TALL
        smallest = spare is not None and (least > spare or self._force_smallest)
        if smallest:
            if not self._refits():  # the estimate is all there is
                self.too_small(plain_bytes + least, measured=False)
            # the estimate overcharges small families: write the smallest archive and measure it
            self._smallest = plain_bytes + least
        choices, self.dropped = self._choose(spare, score, smallest)
        self._written = _decision_key(choices, self.dropped)
        for t, ch in choices.items():
            self._achieve(t, ch, score)
        if self.below:
            self.met = False
        if not self._refits():  # else the last write's refit reports, once
            self._report()

    def _achieve(self, t: str, ch: Mapping[str, Option],
                 score: Callable[[str, Mapping[str, Option]], float] | None) -> None:
        """Record what task t gets with options ``ch``: its figures, and whether it misses the target."""
        plan = self.plans[t]
        self.choice[t] = {k: o for k, o in ch.items() if o.kind is not None}
        exact, exact_tall = all(o.bit_exact for o in ch.values()), plan.tall_inexact == 0
        rec = {"weight": capped(plan.plain_fidelity(sum(o.plain_err for o in ch.values())), exact),
               "weight_tall": capped(plan.plain_fidelity(plan.plain_tall_err), exact_tall)}
        if self.sensitivity is not None:  # the measure the dial used (targets are in it)
            rec |= {"weighted": capped(plan.weight_fidelity(sum(o.err for o in ch.values())), exact),
                    "weighted_tall": capped(plan.weight_fidelity(plan.tall_err), exact_tall)}
        want = self.target
        if score is not None:
            rec |= {"score": score(t, ch), "score_tall": score(t, {})}
            if self.ceiling[t] < 1.0:
                rec["score_ceiling"] = self.ceiling[t]
                if want is not None and want > self.ceiling[t]:
                    self._lowered[t] = want = self.ceiling[t]
        self.achieved[t] = rec
        got = rec["score"] if score is not None else rec[self.measure]
        if want is not None and not reaches(got, want):
            self.below[t] = got

    def estimates(self) -> tuple[int, int]:
        """The dial's archive as decided and the exact tier's (``pack --exact``: every task bit for
        bit), in bytes, estimated alike (the tensors the dial does not touch count the same in
        both: ``decide``'s plain bytes)."""
        assert self._plain is not None
        tall = self.tier_bytes()
        dial = self._plain + sum(o.cost for ch in self.choice.values() for o in ch.values()) - sum(
            self.tier[name].merged for name in self.dropped)
        return dial, self._plain - tall + sum(self.exact_tier.values())

    def _hint_exact(self) -> None:
        """Warn where the exact tier would be about as small as the dial's archive or smaller
        (``EXACT_HINT``; with a budget, within it): ``--exact`` then gives every task bit for bit,
        and packs faster. Both sizes are the dial's estimates (nothing is packed twice). Its log
        record carries ``exact_hint`` (the command line shows the hint in its result line instead)."""
        self.hint = None
        if self._plain is None or not self.tier:
            return
        dial, exact = self.estimates()
        log.info("dial: archive about %s; the exact tier's about %s (estimates)", format_size(dial), format_size(exact))
        budget = self.budget_bytes
        if exact > (EXACT_HINT * dial if budget is None else budget):
            return
        chosen = [o for ch in self.choice.values() for o in ch.values()]
        pairs = sum(len(plan.ladders) for plan in self.plans.values())
        what = (f"budget {budget / (self.unit_bytes or 1.0):.2f}x ({format_size(budget)})" if budget is not None
                else f"fidelity target {shown(self.target)}" if self.target is not None else "the dial")
        self.hint = (f"{what}: --exact (exact=True) would take about {format_size(exact)} against the dial's "
                     f"{format_size(dial)} (estimates) and keep every task bit for bit, faster to pack: use it instead "
                     f"({len(chosen)} of {pairs} task tensors needed a correction or their own quantized task vector, "
                     f"{sum(o.kind == 'exact' for o in chosen)} their exact residual)")
        log.warning("%s", self.hint, extra={"exact_hint": True})

    def _report(self) -> None:
        """Warn of targets lowered or not reached, with the figures of the archive written (once:
        a budget's earlier writes are discarded), and where ``--exact`` would be as small."""
        self._hint_exact()
        target = self.target
        if target is None:  # tasks fall short of a target only (lowered or not)
            return
        if self._lowered:
            log.warning("fidelity target %s lowered for %d task(s) to what their validation examples certify "
                        "(give more examples): %s", shown(target), len(self._lowered),
                        ", ".join(f"{t} ({shown(v, below=target)})" for t, v in self._lowered.items()))
        if self.below:
            what = "the budget" if self.budget_bytes is not None else "the corrections allowed"
            log.warning("fidelity target %s not reached within %s for %d task(s): %s", shown(target), what,
                        len(self.below), ", ".join(f"{t} (best {shown(v, below=target)})" for t, v in self.below.items()))

    def _fill(self, ps: dict[str, int], spare: int, score) -> dict[str, int]:
        """Spend what the bisection left of a budget: the weakest task that can take its next step
        within ``spare`` takes it, until none can (one common target moves every task at once, so
        it stops short). Without an evaluator only: with one, each try would cost an evaluation."""
        if score is not None:
            return ps

        stuck: set[str] = set()
        while True:
            open_ = [t for t in ps if t not in stuck and ps[t] < len(self.plans[t].steps)]
            if not open_:
                return ps
            t = min(open_, key=lambda t: self.plans[t].fidelity_at(ps[t], self._weighted_targets))
            trial = ps | {t: ps[t] + 1}
            if self._total(trial) <= spare:
                ps = trial
            else:
                stuck.add(t)

    def _max_min(self, spare: int, cost, fid) -> dict[str, int]:
        """The highest fidelity every task reaches within ``spare`` bytes (bisection)."""
        tasks = list(self.plans)
        if not tasks:  # no tensor to dial (none masked: tasks equal to the base, integers, NaN)
            return {}
        lo_f = min(fid(t, 0) for t in tasks)
        best = {t: 0 for t in tasks}
        total, ps = cost(1.0)
        if total <= spare:
            return ps
        lo, hi = lo_f, 1.0
        for _ in range(40):
            mid = (lo + hi) / 2
            total, ps = cost(mid)
            if total <= spare:
                lo, best = mid, ps
            else:
                hi = mid
            if hi - lo < 1e-6:
                break
        return best

    def too_small(self, smallest: int, *, measured: bool) -> None:
        """Raise the FidelityError of a budget below ``smallest`` bytes, the smallest archive the
        dial makes (``measured``: written and measured, else estimated)."""
        u, b = self.unit_bytes or 1.0, self.budget_bytes or 0
        raise FidelityError(
            f"budget {b / u:.2f}x ({b} bytes) is below the smallest archive the dial makes, "
            f"{'' if measured else 'about '}{smallest} bytes; give --budget (budget=) "
            f"{math.ceil(100 * smallest / u) / 100:.2f} or more, or drop it")

    def _refits(self) -> bool:
        """Whether a budget's archive is measured and written again (``refit``)."""
        return self.budget_bytes is not None and self.evaluate is None

    def refit(self, size: int) -> bool:
        """After the merged tensors are written, ``size`` the archive's bytes if finished now:
        whether to decide and write them again with the estimate corrected by what it missed.
        The estimate charges each array its worst padding and a generous manifest entry, so on a
        small family it may leave a few percent of a budget unspent: when more than
        ``REFIT_SLACK`` of it is, the dial decides again with that slack added (less a margin).
        More bytes can buy a step that costs more than they are (a tensor whose tasks were all
        ``qtau`` needing its merged vector back), so an archive that then exceeds the budget is
        followed by a bisection between the fullest write within it and the smallest over it; the
        last of ``MAX_WRITES`` writes is always the fullest within. A decision already written is
        not written again: its size is known, and the bisection goes on from it (``_key_at``). Only
        for a budget, without an evaluator (a new decision would score again).
        When it answers False, the archive written is kept, and its missed targets are warned of."""
        if not self._refits():
            return False
        again = not self._final and self._refit(size)
        if not again:
            self._report()
        return again

    def _refit(self, size: int) -> bool:
        """``refit`` for a write of ``size`` bytes, not the last."""
        budget = self.budget_bytes
        assert budget is not None
        self._writes += 1
        self._sizes[self._written] = size
        what = (f"the smallest archive takes {size} bytes, {self._smallest} estimated" if self._smallest is not None
                else f"{abs(budget - size)} bytes {'unspent' if size <= budget else 'over'}")
        key = self._written
        for _ in range(MAX_PROBES):
            nxt = self._next(size, key)
            if nxt is None:
                return self._settle(what)
            if self._force_smallest:
                log.info("budget: %s; writing the smallest archive", what)
                return True
            key = self._key_at(nxt)
            if key not in self._sizes:
                log.info("budget: %s; deciding again", what)
                self.calibration = nxt
                return True
            # that decision is written already: its size stands for a write, and the search goes on
            self.calibration, size, self._smallest = nxt, self._sizes[key], None
        if self._within is not None:
            return self._settle(what)
        log.info("budget: %s; writing the smallest archive", what)  # every decision looked at is over
        self._force_smallest = True
        return True

    def _next(self, size: int, key: Hashable) -> int | None:
        """The calibration to try after the decision ``key`` at this calibration measured ``size``
        bytes, or None to end on the fullest within the budget (``_force_smallest`` set: the
        smallest archive next)."""
        budget = self.budget_bytes
        assert budget is not None
        margin = int(REFIT_MARGIN * budget) + 256
        if self._smallest is not None:  # the smallest archive, written because the estimate was over
            if size > budget:
                if self._within is not None:
                    return None
                self.too_small(size, measured=True)
            self._note_within(size, key)
            if (budget - size <= max(REFIT_SLACK * budget, margin) or self._writes >= MAX_WRITES - 1
                    or self._force_smallest):  # (forced: the last try)
                return None
            return self._smallest - size - margin  # the estimate corrected by what it overcharged
        last = self._writes >= MAX_WRITES - 1  # one write left: the fullest within, if this is not it
        if size <= budget:
            self._note_within(size, key)
            if budget - size <= REFIT_SLACK * budget or last or self.target is not None and not self.below:
                return None  # close enough, no write left, or the target met: more bytes buy nothing
            grow = budget - size - margin
            nxt = self.calibration + grow if self._over is None else (self.calibration + self._over) // 2
        else:
            self._over = self.calibration if self._over is None else min(self._over, self.calibration)
            if self._within is None:
                if last:  # nothing within yet: the smallest archive is the last try, kept or refused
                    self._force_smallest = True
                    return self.calibration
                nxt = self.calibration - (size - budget + margin)  # the excess taken off
            elif last:
                return None
            else:  # just over: take the excess off (sizes follow the estimate but for jumps); else bisect
                over, mid = size - budget + 256, (self._within[0] + self.calibration) // 2
                nxt = self.calibration - over if self.calibration - over > mid else mid
        if self._within is not None and abs(nxt - self._within[0]) < margin and nxt != self.calibration:
            return None  # the bisection has closed in
        return nxt

    def _key_at(self, calibration: int) -> Hashable:
        """What the decision at ``calibration`` stores (``_decision_key``), found without writing."""
        assert self.budget_bytes is not None and self._plain is not None
        spare = self.budget_bytes - self._plain + calibration
        smallest = self._total(dict.fromkeys(self.plans, 0)) > spare
        return _decision_key(*self._choose(spare, None, smallest))

    def _note_within(self, size: int, key: Hashable) -> None:
        """Remember the decision ``key`` (``size`` bytes, within the budget) if it is the fullest so far."""
        if self._within is None or size >= self._within[1]:
            self._within = (self.calibration, size, key)

    def _settle(self, what: str) -> bool:
        """End the writes on the fullest archive within the budget: the one just written (``what``
        its measure, for the log), or that one written again (then marked final)."""
        assert self._within is not None
        calibration, size, key = self._within
        if key == self._written:
            return False
        log.info("budget: %s; writing again the fullest archive within it, %d bytes", what, size)
        self.calibration, self._final = calibration, True
        return True

    # -- pass 2 -------------------------------------------------------------------------------
    def finish(self, ctx: WriteContext, entries: list[TensorEntry | None], pending: Mapping[int, str],
               load: Callable[[str], Item]) -> None:
        """Decide on the size of the plain TALL archive, then write every merged tensor (the
        ``None`` places of ``entries``, named by ``pending``) as decided."""
        self.decide(plain_bytes([e for e in entries if e is not None]) + self.tier_bytes())
        for i, name in pending.items():
            entries[i] = self.write_tensor(ctx, load(name))

    def write_tensor(self, ctx: WriteContext, item: Item) -> TensorEntry:
        """One merged tensor as decided: its TALL tier (masks of the qtau tasks left out, the merged
        vector too when dropped), the qtau entries, the corrections. Each task's part (its task
        vector's figures, quantization, residual) on up to ``threads`` threads, as many as
        ``_observe`` measures at once; its arrays written in task order, so the bytes are the same
        for any thread count."""
        with torch_alone():
            entry = self._write_tensor(ctx, item)
        give_back(numel(item.shape))
        return entry

    def _write_tensor(self, ctx: WriteContext, item: Item) -> TensorEntry:
        qt = {t: o.bits for t in item.tasks
              if (o := self.choice.get(t, {}).get(item.name)) is not None and o.kind == "qtau"}
        by_runs = item.streamed or self._by_runs(ctx, item)  # (with an evaluator too: nothing held to read)
        parts = in_flight(ctx.threads, len(item.tasks), numel(item.shape), memory_free() if ctx.threads > 1 else None,
                          STREAMED_WORK_PER_ELEMENT if by_runs else WORK_PER_ELEMENT)
        tall: list[_Parts] = []  # (given over to ``_corrections``, which lets them go when it may)
        if qt:
            entry, tp = _write_mixed(ctx, item, qt, item.name in self.dropped, parts, by_runs)
            if tp is not None:
                tall.append(tp)
            del tp
        else:
            entry = settled(ctx, Tall.write(ctx, item))
        self._corrections(ctx, item, entry, parts, tall, by_runs)
        for t in item.tasks:  # what each task's rebuild still overflows, its correction applied
            o = self.choice.get(t, {}).get(item.name)
            plan = self.plans.get(t)
            if plan is not None and item.name in plan.tall_overflow:
                ctx.fidelity[t].set_overflow(item.name, o.overflow if o is not None else plan.tall_overflow[item.name])
        return entry

    def _corrections(self, ctx: WriteContext, item: Item, entry: TensorEntry, parts: int,
                     tall: list[_Parts], by_runs: bool) -> None:
        """The sparse, quant and exact corrections decided for ``item``'s tasks: the exact ones
        first (``add_exact``), then the others in task order, each task's residual encoded on the
        threads (``parts`` at once). ``tall``: the TALL parts (``_whole_parts``) when the caller
        has them, given over (the list emptied): made only for the corrections that need them,
        after the exact tier's work, and let go before it when none does. ``by_runs``: each
        residual made a run at a time (``_streamed_correction``)."""
        name = item.name
        todo = {t: o for t in item.tasks if (o := self.choice.get(t, {}).get(name)) is not None
                and o.kind in ("sparse", "quant", "exact")}
        held = tall.pop() if tall else None
        exact = {t for t, o in todo.items() if o.kind == "exact"}
        lossy = [i for i, t in enumerate(item.tasks) if t in todo and t not in exact]
        if not lossy:
            held = None
        if exact:
            add_exact(ctx, item, entry, tasks=exact)
            for t in exact:
                entry.tasks[t].extras["correction"] = Correction("exact")
        if not lossy:
            return
        tp = held if held is not None else _whole_parts(ctx, item)
        del held
        base32 = None if by_runs else tp.base32  # (widened here, before the threads share it)
        read = _reader(item)  # (a streamed item: ``_streamed_correction`` instead)

        lock = threading.Lock()

        def encoded(j: int) -> dict[str, np.ndarray]:
            i = lossy[j]
            if by_runs:  # its residual a run at a time
                return _streamed_correction(ctx, item, i, todo[item.tasks[i]], tp, lock)
            x = read(i)
            assert base32 is not None
            return candidate_arrays(todo[item.tasks[i]],
                                    residual(x, base32, tp.mask(ctx, item, i, x), tp.merged))

        with closing(_in_order(encoded, len(lossy), min(parts, len(lossy)), 2 * parts)) as results:
            for i, got in zip(lossy, results):
                t = item.tasks[i]
                o = todo[t]
                assert o.kind is not None  # (sparse or quant)
                refs = {k: _write(ctx, a) for k, a in got().items()}
                entry.tasks[t].extras["correction"] = Correction(o.kind, refs, o.bits or None,
                                                                 BLOCK if o.kind == "quant" else None)

    def record(self) -> dict[str, Any]:
        """What the manifest's ``stats.dial`` keeps: the request, and per task what was stored."""
        tasks = {}
        for t, plan in self.plans.items():
            counts: dict[str, int] = {}
            for name in plan.ladders:
                o = self.choice[t].get(name)
                label = o.label if o is not None else "tall"
                counts[label] = counts.get(label, 0) + 1
            tasks[t] = {**self.achieved[t], "stored": counts,
                        "bytes": sum(o.cost for o in self.choice[t].values())}
        return {"measure": "score" if self.evaluate is not None else self.measure, "target": self.target,
                "budget_bytes": self.budget_bytes, "met": self.met, "merged_dropped": len(self.dropped),
                **({"score_z": self.z} if self.evaluate is not None else {}), "tasks": tasks}


def _decision_key(choices: Mapping[str, Mapping[str, Option]], dropped: set[str]) -> Hashable:
    """What a decision stores, comparable: two equal keys write the same archive."""
    return (frozenset((t, k, o) for t, ch in choices.items() for k, o in ch.items() if o.kind is not None),
            frozenset(dropped))


def _write(ctx: WriteContext, a: np.ndarray) -> ArrayRef:
    return ctx.writer.write_array(np.ascontiguousarray(a).view(np.uint8).data.cast("B"), a.dtype.name,
                                  (a.size,), _chain(ctx, a), ctx.chunk_elements)


def _write_mixed(ctx: WriteContext, item: Item, qt: Mapping[str, int], drop: bool, parts: int,
                 by_runs: bool) -> tuple[TensorEntry, _Parts | None]:
    """A merged tensor where the tasks of ``qt`` store their own quantized task vector (``qtau``,
    ``bits``) and no mask; the merged vector (and the method's extras) left out when ``drop``.
    Each task's figures and quantization on up to ``parts`` threads, its arrays written in task
    order. Returns the entry, and the TALL parts (``_whole_parts``) for the corrections (None when
    ``drop``: every task is qtau, none has a correction). With ``by_runs`` (a streamed item, or a
    large held one: ``Dial._by_runs``) each task's copy is worked a run at a time (``_mixed_task``),
    and with ``drop`` the qtau masks counted a run at a time once the parts are let go
    (``_qtau_ones``)."""
    w, ce, shape = ctx.writer, ctx.chunk_elements, item.shape
    w.use("encoding:qtau")
    tp = _whole_parts(ctx, item, extras=not drop)
    merged, extras = tp.merged, tp.extras
    n = tp.n
    base32 = None if by_runs else tp.base32  # (widened here, before the threads share it)
    b_dt = dtype_name(tp.base.dtype)
    arrays = {"base": w.write_array(tensor_to_bytes(tp.base.contiguous()), b_dt, shape, ctx.dense(b_dt), ce)}
    read = _reader(item)
    if not drop:
        arrays["merged"] = w.write_array(tensor_to_bytes(merged), "float32", shape, ctx.dense("float32"), ce)
        assert extras is not None
        for k, v in extras.items():
            arrays[k] = w.write_array(tensor_to_bytes(v), EXTRA_ARRAYS[k], shape, ctx.dense(EXTRA_ARRAYS[k]), ce)
    scratch = _Scratch(n + QBLOCK)  # the quantizer's work: no fresh pages
    lock, run = threading.Lock(), _run_elements(ce)

    def task(i: int) -> tuple[int, tuple[np.ndarray, np.ndarray] | torch.Tensor, torch.Tensor | None]:
        """Task i's figures (the plain TALL ones, as for every merged tensor) and its arrays: (mask
        ones or qtau ones, its mask or, for a qtau task, (codes, scales), its deQ when ``drop``)."""
        if by_runs:  # a run at a time
            return _mixed_task(ctx, item, i, qt.get(item.tasks[i]), drop, tp, lock)
        t, x = item.tasks[i], read(i)
        assert base32 is not None
        tau = x.reshape(-1).to(torch.float32) - base32
        mask = tp.mask(ctx, item, i, x)
        ones = ctx.fidelity[t].add(tau, mask, merged)
        if t not in qt:
            return ones, mask, None
        # with ``drop`` the deQ outlives this call (the readers' reference sums it): its own memory
        codes, scales, deq = next(quantize_widths(tau, (qt[t],), QBLOCK, scratch=None if drop else scratch.get()))
        assert deq is not None  # (as ``dequantize`` gives it, bit for bit)
        if drop:
            return 0, (codes, scales), deq
        return int(torch.count_nonzero(tall_mask(deq, merged, ctx.lambdas[t]))), (codes, scales), None

    tts: dict[str, TaskTensor] = {}
    qs: dict[str, tuple[np.ndarray, np.ndarray, dict[str, ArrayRef], int]] = {}
    ref = None if drop and by_runs else torch.zeros_like(merged) if drop else merged
    with closing(_in_order(task, len(item.tasks), parts, 2 * parts)) as results:
        for t, dt, got in zip(item.tasks, item.dtypes[1], results):
            ones, q, deq = got()
            if isinstance(q, torch.Tensor):  # (its mask)
                tts[t] = TaskTensor("tall", dtype_name(dt), shape,
                                    {"mask": w.write_array(tensor_to_bytes(q), "bool", shape, ctx.masks, ce)},
                                    {"ones": ones})
                continue
            qs[t] = (*q, {"codes": _write(ctx, q[0]), "scales": _write(ctx, q[1])}, ones)
            if deq is not None:  # what readers use instead (spec §6.1.8): the float32 sum of the deQ, in task order
                assert ref is not None
                ref.add_(deq)
    if drop and by_runs:
        assert not set(item.tasks) - set(qt)  # (a merged vector is dropped only where every task is qtau)
        del tp, merged, extras  # (nothing left to use them: the base and tau_MTL let go)
        counted = _qtau_ones({t: (qs[t][0], qs[t][1], qt[t]) for t in qs}, ctx.lambdas, n, run, parts)
        for t in qt:
            qs[t] = (*qs[t][:3], counted[t])
    elif drop:  # each qtau mask against that sum, its deQ made again (not held: a tensor's size per task)
        assert ref is not None
        order = list(qt)

        def against(j: int) -> int:
            t = order[j]
            deq = dequantize(qs[t][0], qs[t][1], qt[t], QBLOCK, n)
            return int(torch.count_nonzero(tall_mask(deq, ref, ctx.lambdas[t])))

        with closing(_in_order(against, len(order), min(parts, len(order)), 2 * parts)) as counts:
            for t, count in zip(order, counts):
                qs[t] = (*qs[t][:3], count())
    for t, dt in zip(item.tasks, item.dtypes[1]):
        if t in qt:
            tts[t] = TaskTensor("qtau", dtype_name(dt), shape, qs[t][2],
                                {"bits": qt[t], "block": QBLOCK, "ones": qs[t][3]})
    return TensorEntry(item.name, "merged", {t: tts[t] for t in item.tasks}, arrays), None if drop else tp


def _qtau_ones(qs: Mapping[str, tuple[np.ndarray, np.ndarray, int]], lambdas: Mapping[str, float], n: int,
               run: int, parts: int) -> dict[str, int]:
    """With the merged vector dropped, each qtau task's mask ones (``qs``: its codes, scales and
    bits) against the float32 sum of every task's deQ in task order (spec §6.1.8: what readers use
    instead), a run at a time (``parts`` runs at once): each run of the sum made from the runs of
    the deQs, then each deQ's run made again (from its arrays: the same bits) and its mask counted.
    No deQ or sum is held whole."""
    def ones(j: int) -> dict[str, int]:
        a = j * run
        m = min(run, n - a)
        ref = torch.zeros(m, dtype=torch.float32)
        for codes, scales, bits in qs.values():
            ref.add_(_deq_run(codes, scales, bits, a, m))
        return {t: int(torch.count_nonzero(tall_mask(_deq_run(codes, scales, bits, a, m), ref, lambdas[t])))
                for t, (codes, scales, bits) in qs.items()}

    total = dict.fromkeys(qs, 0)
    with closing(_in_order(ones, -(-n // run), parts, 2 * parts)) as results:
        for got in results:
            for t, c in got().items():
                total[t] += c
    return total


def _mixed_task(ctx: WriteContext, item: Item, i: int, bits: int | None, drop: bool, tp: _Parts,
                lock: threading.Lock
                ) -> tuple[int, tuple[np.ndarray, np.ndarray] | torch.Tensor, torch.Tensor | None]:
    """``_write_mixed``'s work for task ``i`` of a streamed item (``bits``: its qtau's, None for a
    mask), its copy read a run at a time (``_run_elements``): its figures and its mask in one pass;
    for a qtau, its blocks' maxima then, the scales decided over the whole tensor (float16 only
    where every block's fits), its codes in a second pass. The same results (its deQ is not
    returned: with ``drop`` the caller makes it again a run at a time, ``_qtau_ones``); of the
    tensor's size only its mask or its codes (a byte an element at most)."""
    t, n, run, lam = item.tasks[i], tp.n, _run_elements(ctx.chunk_elements), ctx.lambdas[item.tasks[i]]
    mask = torch.empty(n, dtype=torch.bool) if bits is None else None
    amax = np.empty(-(-n // QBLOCK), np.float32)
    work = torch.empty(run, dtype=torch.float32)
    ones = 0
    for s, x in _task_runs(item, i, run, lock):
        b32, mg = tp.widened(s), tp.merged[s]
        tau = x.to(torch.float32) - b32
        block_mask = tall_mask(tau, mg, lam)
        ones += ctx.fidelity[t].add(tau, block_mask, mg, at=s.start)
        if mask is not None:
            mask[s] = block_mask
        else:
            rows, _, nb = float_blocks(tau, QBLOCK)
            amax[s.start // QBLOCK : s.start // QBLOCK + nb] = block_maxima(
                rows.numpy(), work[: nb * QBLOCK].numpy().reshape(nb, QBLOCK))
    if bits is None:
        assert mask is not None
        return ones, mask, None
    stored, used = width_scales(amax, bits)
    codes = np.empty(code_bytes(n, bits), np.uint8)
    u8 = np.empty(run, np.uint8)
    count = 0
    for s, x in _task_runs(item, i, run, lock):
        b32, mg = tp.widened(s), tp.merged[s]
        rows, m, nb = float_blocks(x.to(torch.float32) - b32, QBLOCK)
        got = quantized(rows.numpy(), used[s.start // QBLOCK : s.start // QBLOCK + nb], bits, m,
                        work[: nb * QBLOCK].numpy().reshape(nb, QBLOCK), u8[: nb * QBLOCK], deq=not drop)
        at = s.start * bits // 8 if bits <= PACKED_BITS else s.start  # (a run starts on a whole byte)
        codes[at : at + got.size] = got
        if not drop:
            count += int(torch.count_nonzero(tall_mask(work[:m], mg, lam)))
    return count, (codes, stored), None


def _deq_run(codes: np.ndarray, scales: np.ndarray, bits: int, a: int, m: int) -> torch.Tensor:
    """``dequantize`` of elements [a, a + m) of a qtau's arrays (``a`` on a whole block and byte)."""
    at = a * bits // 8 if bits <= PACKED_BITS else a
    return dequantize(codes[at : at + code_bytes(m, bits)], scales[a // QBLOCK : -(-(a + m) // QBLOCK)], bits, QBLOCK, m)
