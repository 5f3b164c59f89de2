"""Data-driven choices, as in the paper: lambda per task (at pack time) and alpha (at merge time).

Both call a user's evaluator ``fn(task, state_dict) -> score`` (higher is better) on validation
data. Evaluating needs whole models in memory, so selection holds the base and tau_MTL (float32)
plus one task's model at a time.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ._torch import torch
from .dtypes import torch_dtype
from .errors import InvalidArgumentError, TallpackError
from .inputs import PackInputs
from .merging import ALPHA_GRID, MergeMethod
from .options import Evaluator
from .tall import LAMBDA_GRID, reconstruct, tall_mask, task_vector

if TYPE_CHECKING:
    from .reader import Archive

log = logging.getLogger(__name__)


def _best(scores: dict[float, float]) -> float:
    """The value with the highest score; ties go to the smallest value."""
    best = None
    for value in sorted(scores):
        if best is None or scores[value] > scores[best]:
            best = value
    assert best is not None
    return best


def _grid(grid: Sequence[float] | None, default: Sequence[float], what: str) -> list[float]:
    values = sorted(set(float(v) for v in (grid if grid is not None else default)))
    if not values:
        raise InvalidArgumentError(f"the {what} grid is empty")
    return values


def _score(evaluate: Evaluator, task: str, sd: Mapping[str, torch.Tensor]) -> float:
    score = float(np.mean(evaluate(task, sd)))  # a number, or per-example scores (the dial's bound)
    if score != score:
        raise TallpackError(f"task {task!r}: the evaluator returned NaN")
    return score


@dataclass(frozen=True)
class LambdaSelection:
    """Each task's lambda and the score of every lambda tried."""

    chosen: dict[str, float]
    scores: dict[str, dict[float, float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"lambda": {"chosen": self.chosen,
                           "scores": {t: {str(k): v for k, v in s.items()} for t, s in self.scores.items()}}}


def select_lambdas(inputs: PackInputs, method: MergeMethod, evaluate: Evaluator, *,
                   grid: Sequence[float] | None = None) -> LambdaSelection:
    """For each task, the lambda of ``grid`` (default: the paper's) whose reconstruction scores
    best on ``evaluate``; ties go to the smallest lambda, the densest mask."""
    values = _grid(grid, LAMBDA_GRID, "lambda")
    base: dict[str, torch.Tensor] = {}
    mtl: dict[str, torch.Tensor] = {}
    for item in inputs.merged_items():
        b = item.base
        assert b is not None
        base[item.name] = b
        mtl[item.name] = method.combine([task_vector(t, b) for t in item.thetas]).reshape(b.shape)
    chosen: dict[str, float] = {}
    scores: dict[str, dict[float, float]] = {}
    for task, src in inputs.tasks.items():
        exact = {n: src.get(n) for n in src.keys() if n not in mtl}
        taus = {n: task_vector(src.get(n), base[n]) for n in mtl}
        scores[task] = {}
        for lam in values:
            sd = {}
            for n in src.keys():
                if n in mtl:
                    mask = tall_mask(taus[n], mtl[n], lam)
                    sd[n] = reconstruct(base[n], mask, mtl[n], torch_dtype(src.info(n).dtype))
                else:
                    sd[n] = exact[n]
            scores[task][lam] = _score(evaluate, task, sd)
        chosen[task] = _best(scores[task])
        log.info("task %s: lambda %.2f (scores %s)", task, chosen[task], scores[task])
    return LambdaSelection(chosen, scores)


@dataclass(frozen=True)
class AlphaSelection:
    """The alpha chosen for a merged model, with its per-task scores at every alpha tried."""

    method: str
    k: int
    alpha: float
    scores: dict[float, dict[str, float]]
    normalized: dict[float, float]
    reference: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "k": self.k, "alpha": self.alpha,
                "scores": {str(a): s for a, s in self.scores.items()},
                "normalized": {str(a): v for a, v in self.normalized.items()},
                "reference": self.reference}


def select_alpha(archive: "Archive", method: str, evaluate: Evaluator, *, k: int = 2,
                 grid: Sequence[float] | None = None, tasks: Sequence[str] | None = None,
                 reference: Mapping[str, float] | None = None) -> AlphaSelection:
    """The alpha of ``grid`` (default 0.1..1.0) whose merged model has the best average
    normalized score over ``tasks``; a task's score is normalized by ``reference[task]``
    (default: the score of the archive's reconstruction of that task). Ties go to the
    smallest alpha.

    >>> sel = tallpack.select_alpha(fam, "consensus-ta", evaluate=fn)
    >>> model = fam.merged("consensus-ta", alpha=sel.alpha)
    """
    values = _grid(grid, ALPHA_GRID, "alpha")
    names = list(tasks) if tasks is not None else list(archive.tasks)
    for t in names:
        archive.task_info(t)
    ref = dict(reference) if reference is not None else {
        t: _score(evaluate, t, archive.state_dict(t)) for t in names}
    parts = archive.merge_parts(method, k=k)
    scores: dict[float, dict[str, float]] = {}
    normalized: dict[float, float] = {}
    for alpha in values:
        scores[alpha] = {t: _score(evaluate, t, parts.state_dict(alpha, task=t)) for t in names}
        normalized[alpha] = sum(scores[alpha][t] / ref[t] if ref[t] else 0.0 for t in names) / len(names)
    alpha = _best(normalized)
    log.info("%s k=%d: alpha %.2f (normalized %.4f)", method, k, alpha, normalized[alpha])
    return AlphaSelection(method, k, alpha, scores, normalized, ref)
