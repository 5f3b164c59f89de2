"""Data-driven choices, as in the paper: lambda per task (at pack time) and alpha (at merge time).

Both call a user's evaluator ``fn(task, state_dict) -> score`` (higher is better, of any sign:
an accuracy, or ``-loss``) on validation data. Evaluating needs whole models in memory, so
selection holds the base and tau_MTL (float32) plus one task's model at a time.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ._torch import torch
from .dtypes import torch_dtype
from .errors import InvalidArgumentError, TallpackError
from .inputs import PackInputs
from .merging import ALPHA_GRID, MergeMethod, check_alpha
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


def _grid(grid: Sequence[float] | None, default: Sequence[float], what: str,
          check: Callable[[Any], float] = float) -> list[float]:
    """The distinct values of ``grid`` (None: ``default``), each through ``check``, in order."""
    values = sorted(set(check(v) for v in (grid if grid is not None else default)))
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
    best on ``evaluate`` (raw scores, compared within the task, so any sign works); ties go to the
    smallest lambda, the densest mask."""
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
    """The alpha chosen for a merged model, with its per-task scores at every alpha tried and how
    they were normalized (``ratio`` or ``difference``: :func:`normalize`)."""

    method: str
    k: int
    alpha: float
    scores: dict[float, dict[str, float]]
    normalized: dict[float, float]
    reference: dict[str, float]
    normalization: str = "ratio"

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "k": self.k, "alpha": self.alpha,
                "scores": {str(a): s for a, s in self.scores.items()},
                "normalized": {str(a): v for a, v in self.normalized.items()},
                "reference": self.reference, "normalization": self.normalization}


def normalize(scores: Mapping[float, Mapping[str, float]],
              reference: Mapping[str, float]) -> tuple[dict[float, float], str]:
    """Each alpha's average normalized score over the tasks of ``reference``, and the rule used.
    ``ratio`` when every reference is positive: ``score / reference``, the paper's normalized
    accuracy. Otherwise (``-loss``, a zero reference) ``difference``: ``score - reference``, as a
    ratio by a negative reference reverses the order of the scores and one by zero means nothing;
    the difference keeps each task's order for any sign, and ranks alphas by the raw mean score.

    >>> normalize({0.5: {"a": -2.0}, 1.0: {"a": -3.0}}, {"a": -1.0})
    ({0.5: -1.0, 1.0: -2.0}, 'difference')
    """
    names = list(reference)
    rule = "ratio" if all(reference[t] > 0 for t in names) else "difference"
    if rule == "ratio":
        out = {a: sum(s[t] / reference[t] for t in names) / len(names) for a, s in scores.items()}
    else:
        out = {a: sum(s[t] - reference[t] for t in names) / len(names) for a, s in scores.items()}
    return out, rule


def select_alpha(archive: "Archive", method: str, evaluate: Evaluator, *, k: int = 2,
                 grid: Sequence[float] | None = None, tasks: Sequence[str] | None = None,
                 reference: Mapping[str, float] | None = None) -> AlphaSelection:
    """The alpha of ``grid`` (default 0.1..1.0) whose merged model has the best average
    normalized score over ``tasks``; a task's score is normalized by ``reference[task]``
    (default: the score of the archive's reconstruction of that task): divided by it when every
    reference is positive (accuracies: the paper's rule), else less it (``-loss``: the best mean
    score), see :func:`normalize`. Ties go to the smallest alpha.

    >>> sel = tallpack.select_alpha(fam, "consensus-ta", evaluate=fn)
    >>> model = fam.merged("consensus-ta", alpha=sel.alpha)
    """
    values = _grid(grid, ALPHA_GRID, "alpha", check_alpha)
    names = list(tasks) if tasks is not None else list(archive.tasks)
    for t in names:
        archive.task_info(t)
    missing = [t for t in names if reference is not None and t not in reference]
    if missing:
        raise InvalidArgumentError(f"reference has no score for task {missing[0]!r}: give one per task")
    ref = {t: float(reference[t]) if reference is not None else _score(evaluate, t, archive.state_dict(t))
           for t in names}
    for t, r in ref.items():
        if not math.isfinite(r):
            raise InvalidArgumentError(f"task {t!r}: the reference score is {r}; selection needs finite scores")
    parts = archive.merge_parts(method, k=k)
    k = parts.k  # a Python int (numpy's accepted)
    scores: dict[float, dict[str, float]] = {}
    for alpha in values:
        scores[alpha] = {t: _score(evaluate, t, parts.state_dict(alpha, task=t)) for t in names}
    normalized, rule = normalize(scores, ref)
    zero = [t for t in names if ref[t] == 0]
    if zero:  # an accuracy of 0 for a reconstruction is more likely a broken evaluator than a fact
        log.warning("%s k=%d: reference score 0 for %s: alphas ranked by score - reference, not the ratio",
                    method, k, ", ".join(map(repr, zero)))
    alpha = _best(normalized)
    log.info("%s k=%d: alpha %.2f (normalized %.4f, %s)", method, k, alpha, normalized[alpha], rule)
    return AlphaSelection(method, k, alpha, scores, normalized, ref, rule)
