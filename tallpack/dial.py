"""The fidelity dial: per task and merged tensor, the cheapest corrections that make every task
reconstructed at least as well as asked (``fidelity``), or the best fidelity within a size
(``budget``), from plain TALL masks at one end to the exact tier at the other.

How well a task is reconstructed (its *fidelity*) is, with an evaluator, its score relative to
the original checkpoint's score on the user's validation data; without one, the **weight
fidelity** ``1 - ||theta_hat - theta||_2 / ||theta||_2`` over the task's merged tensors (the
ones TALL approximates), computed from the rebuilt tensors exactly as the reader returns them.
``BENCHMARKS.md`` ("The fidelity dial") shows how it predicts accuracy.

For each (task, tensor) the packer measures, after writing the TALL tier, every candidate:
nothing; the largest ``k`` entries of the residual (several ``k``); the residual quantized to 8
or 4 bits per block of 64; the exact residual. Each has a size in bytes (encoded with the
archive's codecs, plus chunk padding and manifest) and a squared error. Per tensor the candidates
on the lower convex hull of (bytes, error) form a ladder; per task, steps up the ladders are
taken greedily by error removed per byte (the classic bit-allocation rule, optimal at hull
points), until the task meets the target. A budget is met by bisecting on one common target:
the highest fidelity every task reaches within it (the weakest task first).
"""

from __future__ import annotations

import heapq
import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import zstandard

from .codecs import Chain
from .container import ALIGNMENT, FOOTER, HEADER
from .dtypes import dtype_name
from .encodings import Item, TensorEntry, WriteContext, iter_arrays
from .encodings.correction import (BLOCK, Correction, corrected, quant_decode, quant_encode, residual,
                                   sparse_decode, sparse_encode)
from .encodings.exact import (CANDIDATES, SAMPLE_ELEMENTS, TRANSFORMS, add_exact, bits, forward, permute)
from .errors import TallpackError
from .options import Evaluator
from .tall import blocks, tall_mask

log = logging.getLogger(__name__)

#: Correction families a pack may use (``PackOptions.corrections``), cheapest first.
CORRECTIONS: tuple[str, ...] = ("sparse", "quant4", "quant8", "exact")
#: Fractions of a tensor's elements a sparse correction may keep.
SPARSE_FRACTIONS: tuple[float, ...] = (1 / 1024, 1 / 256, 1 / 64, 1 / 16, 1 / 4)
#: Bytes charged per stored array beyond its chunks (its manifest entry, compressed, generously),
#: and per chunk (alignment padding, at most 63 bytes).
ARRAY_OVERHEAD, CHUNK_OVERHEAD = 160, 64


class FidelityError(TallpackError, ValueError):
    """A budget below what the plain TALL archive needs (the message says the minimum)."""


@dataclass(frozen=True)
class Option:
    """One candidate for one (task, tensor): ``kind`` None (nothing), ``sparse`` (``k`` entries),
    ``quant`` (``bits``) or ``exact``; its extra bytes and the squared error it leaves."""

    kind: str | None
    cost: int
    err: float
    k: int = 0
    bits: int = 0

    @property
    def label(self) -> str:
        return {None: "tall", "sparse": "sparse", "quant": f"quant{self.bits}", "exact": "exact"}[self.kind]


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
    ladders: dict[str, list[Option]] = field(default_factory=dict)
    steps: list[Step] = field(default_factory=list)
    #: cumulative (bytes, error) after each prefix of ``steps`` (index 0: none taken)
    cum_cost: list[int] = field(default_factory=list)
    cum_err: list[float] = field(default_factory=list)

    def weight_fidelity(self, err: float) -> float:
        return 1.0 - math.sqrt(max(err, 0.0) / self.theta_sq) if self.theta_sq > 0 else 1.0

    def order(self) -> None:
        """The greedy sequence: best error removed per byte first, across tensors (hull ladders
        have decreasing slopes, so each tensor's steps come in order)."""
        heap: list[tuple[float, int, str, int]] = []
        pos = dict.fromkeys(self.ladders, 0)
        tie = 0

        def push(name: str) -> None:
            nonlocal tie
            lad, i = self.ladders[name], pos[name]
            if i + 1 < len(lad):
                a, b = lad[i], lad[i + 1]
                heapq.heappush(heap, (-(a.err - b.err) / max(b.cost - a.cost, 1), tie, name, i + 1))
                tie += 1

        for name in self.ladders:
            push(name)
        self.steps, self.cum_cost, self.cum_err = [], [0], [self.tall_err]
        while heap:
            _, _, name, i = heapq.heappop(heap)
            a, b = self.ladders[name][i - 1], self.ladders[name][i]
            self.steps.append(Step(name, b, b.cost - a.cost, a.err - b.err))
            self.cum_cost.append(self.cum_cost[-1] + b.cost - a.cost)
            self.cum_err.append(max(self.cum_err[-1] - (a.err - b.err), 0.0))
            pos[name] = i
            push(name)
        if all(lad[-1].err == 0 for lad in self.ladders.values()):
            self.cum_err[-1] = 0.0  # every tensor at its exact top: no float residue

    def chosen(self, p: int) -> dict[str, Option]:
        """Each tensor's option after the first ``p`` steps."""
        out: dict[str, Option] = {}
        for s in self.steps[:p]:
            out[s.tensor] = s.option
        return out


def hull(points: list[Option]) -> list[Option]:
    """The lower convex hull of (cost, err), from the cheapest to the most accurate."""
    pts = sorted(points, key=lambda o: (o.cost, o.err))
    best: list[Option] = []
    for o in pts:  # Pareto front first: each next point strictly more accurate
        if not best or o.err < best[-1].err:
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
    data = memoryview(np.ascontiguousarray(arr).view(np.uint8)).cast("B")
    step = ce * arr.dtype.itemsize
    pieces = [data[i : i + step] for i in range(0, len(data), step)] or [data]
    return sum(len(chain.encode(p)) + CHUNK_OVERHEAD for p in pieces) + ARRAY_OVERHEAD


def _exact_cost(ctx: WriteContext, x: torch.Tensor, rec: torch.Tensor, base: torch.Tensor) -> int:
    """What ``add_exact`` will store for this task's tensor (the same choice on the same sample)."""
    assert ctx.residuals is not None
    xb = bits(x.contiguous())
    refs = {"tall": rec, "base": base.to(torch.float32).to(x.dtype), "zero": None}
    if torch.isnan(rec).any():
        del refs["tall"]
    rbits = {k: (bits(v.contiguous()) if v is not None else np.zeros_like(xb)) for k, v in refs.items()}
    dt, ce, n = dtype_name(x.dtype), ctx.chunk_elements, SAMPLE_ELEMENTS
    chain = ctx.residuals(x.element_size())

    def size(z: np.ndarray) -> int:
        return len(chain.encode(memoryview(z.view(np.uint8))))

    _, ref, tr = min((size(permute(forward(xb[:n], rb[:n], t), rb[:n], dt, "exponent", ce)), k, t)
                     for k, rb in rbits.items() if k in CANDIDATES for t in TRANSFORMS)
    rb = rbits[ref]
    return _array_cost(chain, permute(forward(xb, rb, tr), rb, dt, "exponent", ce), ce) + 40


def tall_parts(ctx: WriteContext, item: Item) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """tau_MTL and every task's mask of a merged tensor, flat, as the tall encoding wrote them."""
    assert item.base is not None
    merged_parts: list[torch.Tensor] = []
    mask_parts: list[list[torch.Tensor]] = [[] for _ in item.tasks]
    for _, taus in blocks(item.base, item.thetas, ctx.chunk_elements):
        m = ctx.method.combine(taus)
        merged_parts.append(m)
        for i, (t, tau) in enumerate(zip(item.tasks, taus)):
            mask_parts[i].append(tall_mask(tau, m, ctx.lambdas[t]))
    cat = lambda ps, dt: torch.cat(ps) if ps else torch.empty(0, dtype=dt)  # noqa: E731
    return cat(merged_parts, torch.float32), [cat(p, torch.bool) for p in mask_parts]


def _sq(a: torch.Tensor, b: torch.Tensor) -> float:
    d = a.reshape(-1).to(torch.float64) - b.reshape(-1).to(torch.float64)
    return float(torch.dot(d, d))


def candidate_arrays(option: Option, r: torch.Tensor) -> dict[str, np.ndarray]:
    """The arrays a sparse or quant correction stores for residual ``r``."""
    if option.kind == "sparse":
        gaps, values = sparse_encode(r, option.k)
        return {"indices": gaps, "values": values}
    codes, scales = quant_encode(r, option.bits, BLOCK)
    return {"scales": scales, "codes": codes}


def decoded(option: Option, arrays: Mapping[str, np.ndarray], n: int) -> torch.Tensor:
    if option.kind == "sparse":
        return sparse_decode(arrays["indices"], arrays["values"], n)
    return quant_decode(arrays["codes"], arrays["scales"], option.bits, BLOCK, n)


def _chain(ctx: WriteContext, arr: np.ndarray) -> Chain:
    return ctx.dense(arr.dtype.name)  # numpy's names are the spec's


class Dial:
    """Collects each merged tensor's candidates while the packer writes the TALL tier, decides,
    then writes the chosen corrections (``observe``, ``decide``, ``write``)."""

    def __init__(self, *, target: float | None, budget_bytes: int | None, allowed: Sequence[str],
                 exact_paid: bool, evaluate: Evaluator | None = None,
                 sources: Mapping[str, Any] | None = None, unit_bytes: float = 0.0):
        self.target, self.budget_bytes, self.allowed = target, budget_bytes, tuple(allowed)
        self.exact_paid, self.evaluate, self.sources = exact_paid, evaluate, sources
        self.unit_bytes = unit_bytes  # one task checkpoint's bytes, the budget's unit
        self.plans: dict[str, TaskPlan] = {}
        #: with an evaluator: per task and tensor, (f32 TALL rebuild before the cast, residual, dtype)
        self._held: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor, torch.dtype]]] = {}
        self.choice: dict[str, dict[str, Option]] = {}
        self.achieved: dict[str, dict[str, float]] = {}
        self.met = True
        self.below: dict[str, float] = {}

    # -- pass 1 -------------------------------------------------------------------------------
    def observe(self, ctx: WriteContext, item: Item) -> None:
        """Measure every candidate of every task's copy of one merged tensor."""
        assert item.base is not None
        merged, masks = tall_parts(ctx, item)
        base32 = item.base.reshape(-1).to(torch.float32)
        ce = ctx.chunk_elements
        for t, x, mask in zip(item.tasks, item.thetas, masks):
            plan = self.plans.setdefault(t, TaskPlan())
            xf = x.reshape(-1)
            rec32 = torch.addcmul(base32, mask.to(torch.float32), merged)
            r = xf.to(torch.float32) - rec32
            plain = rec32.to(x.dtype)
            plan.theta_sq += _sq(xf, torch.zeros(1))
            err0 = _sq(plain, xf)
            plan.tall_err += err0
            opts = [Option(None, 0, err0)]
            n = r.numel()
            if n and err0 > 0:
                cands: list[Option] = []
                if "sparse" in self.allowed:
                    for k in sorted({max(1, int(n * f)) for f in SPARSE_FRACTIONS}):
                        cands.append(Option("sparse", 0, 0.0, k=k))
                cands += [Option("quant", 0, 0.0, bits=b) for b in (4, 8) if f"quant{b}" in self.allowed]
                for o in cands:
                    arrays = candidate_arrays(o, r)
                    cost = sum(_array_cost(_chain(ctx, a), a, ce) for a in arrays.values()) + 40
                    err = _sq(corrected(base32, mask, merged, decoded(o, arrays, n), x.dtype), xf)
                    opts.append(Option(o.kind, cost, err, o.k, o.bits))
                if "exact" in self.allowed:
                    cost = 40 if self.exact_paid else _exact_cost(ctx, x.reshape(-1), plain, item.base.reshape(-1))
                    opts.append(Option("exact", cost, 0.0))
            plan.ladders[item.name] = hull(opts)
            if self.evaluate is not None:
                self._held.setdefault(t, {})[item.name] = (rec32, r, x.dtype)

    # -- deciding -----------------------------------------------------------------------------
    def _score_fn(self) -> Callable[[str, int], float]:
        """With an evaluator: the score of a task after the first p steps, relative to the original's."""
        assert self.evaluate is not None and self.sources is not None
        memo: dict[tuple[str, int], float] = {}
        ref: dict[str, float] = {}

        def score(t: str, p: int) -> float:
            if (t, p) in memo:
                return memo[(t, p)]
            src = self.sources[t]
            if t not in ref:
                ref[t] = float(self.evaluate(t, {k: src.get(k) for k in src.keys()}))
            plan, held = self.plans[t], self._held[t]
            chosen = plan.chosen(p)
            sd = {}
            for k in src.keys():
                if k not in held:
                    sd[k] = src.get(k)
                    continue
                rec32, r, dtype = held[k]
                o = chosen.get(k)
                shape = src.info(k).shape
                if o is None or o.kind is None:
                    sd[k] = rec32.to(dtype).reshape(shape)
                elif o.kind == "exact":
                    sd[k] = src.get(k)
                else:
                    c = decoded(o, candidate_arrays(o, r), r.numel())
                    sd[k] = (rec32 + c).to(dtype).reshape(shape)
            s = float(self.evaluate(t, sd))
            if s != s:
                raise TallpackError(f"task {t!r}: the evaluator returned NaN")
            memo[(t, p)] = s / ref[t] if ref[t] else (1.0 if s >= ref[t] else 0.0)
            return memo[(t, p)]
        return score

    def _prefix(self, t: str, f: float, score: Callable[[str, int], float] | None) -> int:
        """The shortest prefix of task t's steps that reaches fidelity ``f``."""
        plan = self.plans[t]
        last = len(plan.steps)
        if score is None:
            for p in range(last + 1):
                if plan.weight_fidelity(plan.cum_err[p]) >= f - 1e-12:
                    return p
            return last
        if score(t, 0) >= f:
            return 0
        lo, hi = 0, last  # score(lo) < f; the last prefix is the original (or the best there is)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if score(t, mid) >= f:
                hi = mid
            else:
                lo = mid
        return hi

    def decide(self, plain_bytes: int) -> None:
        """Choose every task's corrections; ``plain_bytes``: the archive's size without them."""
        for plan in self.plans.values():
            plan.order()
        score = self._score_fn() if self.evaluate is not None else None
        tasks = list(self.plans)
        spare = None if self.budget_bytes is None else self.budget_bytes - plain_bytes
        if spare is not None and spare < 0:
            u = self.unit_bytes or 1.0
            raise FidelityError(
                f"budget {self.budget_bytes / u:.2f}x ({self.budget_bytes} bytes) is below the plain TALL "
                f"archive, about {plain_bytes} bytes; give --budget {math.ceil(100 * plain_bytes / u) / 100:.2f} "
                "or more (that stores TALL masks only), or drop --budget")

        def fid(t: str, p: int) -> float:
            return score(t, p) if score is not None else self.plans[t].weight_fidelity(self.plans[t].cum_err[p])

        def cost(f: float) -> tuple[int, dict[str, int]]:
            ps = {t: self._prefix(t, f, score) for t in tasks}
            return sum(self.plans[t].cum_cost[p] for t, p in ps.items()), ps

        prefixes: dict[str, int]
        if self.target is not None:
            total, prefixes = cost(self.target)
            if spare is not None and total > spare:
                prefixes = self._max_min(spare, cost, fid)
        else:
            assert spare is not None
            prefixes = self._max_min(spare, cost, fid)
        for t in tasks:
            p = prefixes[t]
            plan = self.plans[t]
            self.choice[t] = {k: o for k, o in plan.chosen(p).items() if o.kind is not None}
            rec = {"weight": plan.weight_fidelity(plan.cum_err[p]),
                   "weight_tall": plan.weight_fidelity(plan.tall_err)}
            if score is not None:
                rec |= {"score": score(t, p), "score_tall": score(t, 0)}
            self.achieved[t] = rec
            if self.target is not None and fid(t, p) < self.target - 1e-12:
                self.below[t] = fid(t, p)
        if self.below:
            self.met = False
            what = "the budget" if spare is not None else "the corrections allowed"
            log.warning("fidelity target %.4g not reached within %s for %d task(s): %s", self.target, what,
                        len(self.below), ", ".join(f"{t} (best {v:.4f})" for t, v in self.below.items()))

    def _max_min(self, spare: int, cost, fid) -> dict[str, int]:
        """The highest fidelity every task reaches within ``spare`` bytes (bisection)."""
        tasks = list(self.plans)
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

    # -- pass 2 -------------------------------------------------------------------------------
    def finish(self, ctx: WriteContext, entries: list[TensorEntry], load: Callable[[str], Item]) -> None:
        """Decide on the size of the TALL tier just written, then write the corrections."""
        self.decide(plain_bytes(entries))
        self.write(ctx, load, {e.name: e for e in entries})

    def write(self, ctx: WriteContext, items: Callable[[str], Item], entries: Mapping[str, TensorEntry]) -> None:
        """Store the chosen corrections (``items`` loads a tensor of the family by name)."""
        names = {k for ch in self.choice.values() for k in ch}
        for name in [e for e in entries if e in names]:
            item, entry = items(name), entries[name]
            assert item.base is not None
            merged, masks = tall_parts(ctx, item)
            base32 = item.base.reshape(-1).to(torch.float32)
            exact = {t for t in item.tasks if (o := self.choice.get(t, {}).get(name)) is not None and o.kind == "exact"}
            if exact:
                add_exact(ctx, item, entry, tasks=exact)
            for t, x, mask in zip(item.tasks, item.thetas, masks):
                o = self.choice.get(t, {}).get(name)
                if o is None:
                    continue
                tt = entry.tasks[t]
                if o.kind == "exact":
                    tt.extras["correction"] = Correction("exact")
                    continue
                r = residual(x, base32, mask, merged)
                refs = {}
                for k, a in candidate_arrays(o, r).items():
                    refs[k] = ctx.writer.write_array(memoryview(np.ascontiguousarray(a).view(np.uint8)).cast("B"),
                                                     a.dtype.name, (a.size,),
                                                     _chain(ctx, a), ctx.chunk_elements)
                tt.extras["correction"] = Correction(o.kind, refs, o.bits or None,
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
        return {"measure": "score" if self.evaluate is not None else "weight", "target": self.target,
                "budget_bytes": self.budget_bytes, "met": self.met, "tasks": tasks}

