"""Merge methods: how the multi-task vector tau_MTL is built from the task vectors.

A method sees the family as a stream of blocks (one list of per-task float32 task vectors per
block); methods that need global statistics (TIES' per-task top-k threshold and its majority sign)
gather them in ``prepare`` over separate streaming passes, so no method holds the family in memory.
The formulas follow the official TALL-masks code (github nik-dim/tall_masks).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

#: A callable returning a fresh pass over the family: an iterator of blocks, each a list of
#: per-task float32 task vectors of the same shape.
Passes = Callable[[], Iterator[list[torch.Tensor]]]


class MergeMethod:
    """Builds tau_MTL block by block. ``name`` and ``params()`` are recorded in the manifest."""

    name: str

    def prepare(self, passes: Passes, num_tasks: int) -> None:
        """Gather global statistics; the default needs none."""

    def combine(self, taus: list[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def counts(self, taus: list[torch.Tensor]) -> torch.Tensor | None:
        """Per element, how many task vectors went into tau_MTL (for TIES' disjoint mean)."""
        return None

    def params(self) -> dict[str, Any]:
        return {"method": self.name}


class TaskArithmetic(MergeMethod):
    """``tau_MTL = sum_t tau_t``, summed in task order."""

    name = "ta"

    def combine(self, taus: list[torch.Tensor]) -> torch.Tensor:
        out = torch.zeros_like(taus[0])
        for tau in taus:
            out += tau
        return out


def kth_smallest_bits(histograms: Iterable[np.ndarray], k: int) -> tuple[int, int]:
    """From a 65536-bin histogram, the bin holding the k-th smallest (1-based) and the rank in it."""
    hist = sum(histograms)
    cum = np.cumsum(hist)
    b = int(np.searchsorted(cum, k))
    below = int(cum[b - 1]) if b else 0
    return b, k - below


class Ties(MergeMethod):
    """TIES-merging: trim each task to its top ``top_k`` magnitudes (one threshold over the whole
    model, entries equal to it kept), elect a sign per element, keep agreeing entries.

    ``combine`` is the disjoint *sum* (what TALL masks and Consensus TIES are built on, as in the
    official code); ``counts`` gives the divisor of the disjoint mean (the TIES merged model).
    """

    name = "ties"

    def __init__(self, top_k: float = 0.2):
        if not 0 < top_k <= 1:
            raise ValueError(f"TIES top_k must be in (0, 1], got {top_k}")
        self.top_k = top_k
        self.thresholds: list[float] | None = None
        self.majority_sign: float | None = None

    def prepare(self, passes: Passes, num_tasks: int) -> None:
        # Exact global k-th magnitude per task by radix selection on the float32 bit patterns
        # (monotone for non-negative floats): high 16 bits in one pass, low 16 bits in a second.
        high = [np.zeros(1 << 16, np.int64) for _ in range(num_tasks)]
        d = 0
        for taus in passes():
            d += taus[0].numel()
            for h, tau in zip(high, taus):
                bits = tau.abs().reshape(-1).view(torch.int32).numpy()
                h += np.bincount(bits >> 16, minlength=1 << 16)
        keep = int(d * self.top_k)
        k = d - keep  # official: kthvalue(d - int(d * K)); entries >= it are kept
        if k <= 0 or d == 0:
            self.thresholds = [0.0] * num_tasks
        else:
            sel = [kth_smallest_bits([h], k) for h in high]
            low = [np.zeros(1 << 16, np.int64) for _ in range(num_tasks)]
            for taus in passes():
                for (b, _), lo, tau in zip(sel, low, taus):
                    bits = tau.abs().reshape(-1).view(torch.int32).numpy()
                    lo += np.bincount(bits[(bits >> 16) == b] & 0xFFFF, minlength=1 << 16)
            self.thresholds = []
            for (b, rank), lo in zip(sel, low):
                lb, _ = kth_smallest_bits([lo], rank)
                self.thresholds.append(float(np.array([(b << 16) | lb], np.int32).view(np.float32)[0]))
        total = 0
        for taus in passes():
            total += int(self._elect(taus).sum())
        self.majority_sign = float(np.sign(total))
        log.info("TIES thresholds %s, majority sign %+g", self.thresholds, self.majority_sign)

    def _trimmed(self, taus: list[torch.Tensor]) -> torch.Tensor:
        assert self.thresholds is not None, "prepare() first"
        return torch.stack([tau * (tau.abs() >= thr) for tau, thr in zip(taus, self.thresholds)])

    def _elect(self, taus: list[torch.Tensor]) -> torch.Tensor:
        return torch.sign(self._trimmed(taus).sum(dim=0))

    def _selected(self, taus: list[torch.Tensor]) -> torch.Tensor:
        trimmed = self._trimmed(taus)
        sign = torch.sign(trimmed.sum(dim=0))
        sign[sign == 0] = self.majority_sign
        keep = torch.where(sign.unsqueeze(0) > 0, trimmed > 0, trimmed < 0)
        return trimmed * keep

    def combine(self, taus: list[torch.Tensor]) -> torch.Tensor:
        return self._selected(taus).sum(dim=0)

    def counts(self, taus: list[torch.Tensor]) -> torch.Tensor:
        return (self._selected(taus) != 0).sum(dim=0).to(torch.uint8)

    def params(self) -> dict[str, Any]:
        return {"method": self.name, "top_k": self.top_k, "thresholds": self.thresholds,
                "majority_sign": self.majority_sign}


METHODS: dict[str, Callable[..., MergeMethod]] = {"ta": TaskArithmetic, "ties": Ties}


def get_method(name: str, **kwargs: Any) -> MergeMethod:
    """A merge method by name: ``"ta"`` or ``"ties"`` (``top_k=0.2``)."""
    if name not in METHODS:
        raise ValueError(f"unknown merge method {name!r}; choose one of {', '.join(METHODS)}")
    if name == "ta":
        return TaskArithmetic()
    return Ties(**kwargs)


def consensus_mask(masks: list[torch.Tensor], k: int) -> torch.Tensor:
    """``m_cons = (sum_t m_t) >= k``: weights used by at least ``k`` tasks."""
    count = torch.zeros(masks[0].shape, dtype=torch.int32)
    for m in masks:
        count += m.to(torch.int32)
    return count >= k


# -- merged (multi-task) models -------------------------------------------------------------

#: The multi-task models an archive can produce, and the tau_MTL each needs at pack time.
MERGED_MODELS: dict[str, str] = {"ta": "ta", "ties": "ties", "consensus-ta": "ta", "consensus-ties": "ties"}
#: The paper's alpha grid.
ALPHA_GRID: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(1, 11))


def default_alpha(method: str, num_tasks: int) -> float:
    """The data-free alpha: 1.0 for TIES (its disjoint mean is already an average), ``1/T`` for
    the sums (TA and both consensus methods), which makes plain TA the average of the models."""
    return 1.0 if method == "ties" else 1.0 / max(1, num_tasks)


def merge_direction(method: str, tau_mtl: torch.Tensor, masks: list[torch.Tensor] | None = None,
                    counts: torch.Tensor | None = None, k: int = 2) -> torch.Tensor:
    """The float32 vector d of one tensor such that the merged model is ``theta_0 + alpha * d``.

    ``ta``: tau_MTL; ``ties``: the disjoint mean ``tau_MTL / max(counts, 1)``; ``consensus-*``:
    ``m_cons * tau_MTL`` with ``m_cons = (sum_t m_t) >= k``.
    """
    if method == "ta":
        return tau_mtl
    if method == "ties":
        assert counts is not None
        return tau_mtl / torch.clamp(counts.to(torch.float32), min=1)
    if method in ("consensus-ta", "consensus-ties"):
        assert masks is not None
        return consensus_mask(masks, k).to(torch.float32) * tau_mtl
    raise ValueError(f"unknown merged model {method!r}; choose one of {', '.join(MERGED_MODELS)}")


def apply_direction(theta_0: torch.Tensor, direction: torch.Tensor, alpha: float) -> torch.Tensor:
    """``theta_0 + alpha * d`` in float32 (alpha rounded to float32), cast to theta_0's dtype."""
    alpha32 = torch.tensor(alpha, dtype=torch.float32)
    return (theta_0.to(torch.float32) + alpha32 * direction).to(theta_0.dtype)
