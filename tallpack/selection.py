"""Data-driven choices, as in the paper: lambda per task (at pack time) and alpha (at merge time).

Both call a user's evaluator ``fn(task, state_dict) -> score`` (higher is better, of any sign:
an accuracy, or ``-loss``) on validation data: a number or per-example scores, as Python or numpy
numbers, arrays or torch tensors (``(pred == y).float().mean()`` and ``pred == y`` both do).
Evaluating needs whole models in memory, so selection holds the base and tau_MTL (float32) plus
one task's model at a time.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ._torch import torch
from .dtypes import torch_dtype
from .elements import numel
from .encodings import Item
from .errors import InvalidArgumentError
from .inputs import PackInputs
from .merging import ALPHA_GRID, MergeMethod, check_alpha, checked_grid, is_consensus, score_values
from .options import Evaluator, Score, check_lambda_grid
from .tall import LAMBDA_GRID, reconstruct, tall_mask, task_vector

if TYPE_CHECKING:
    from .reader import Archive

log = logging.getLogger(__name__)


#: Totals this close (relative) are a tie: the same scores summed in another order may differ in
#: the last bit, and a tie goes to the smallest value.
_TIE = 1e-12


def _best(scores: dict[float, float]) -> float:
    """The value with the highest score; ties (within :data:`_TIE`) go to the smallest value."""
    best = None
    for value in sorted(scores):
        if best is None or scores[value] - scores[best] > _TIE * max(abs(scores[value]), abs(scores[best])):
            best = value
    assert best is not None
    return best


def _check_evaluator(evaluate: object) -> None:
    if not callable(evaluate):
        raise InvalidArgumentError(f"evaluate must be a function fn(task, state_dict) -> score, got {evaluate!r}")


def tied_evaluator(evaluate: Evaluator, aliases: Mapping[str, str]) -> Evaluator:
    """``evaluate`` called with each alias (spec §3.8) of its state dict the target's very tensor,
    as the archive gives it: a tied ``lm_head.weight`` scored as the rebuilt ``wte.weight``, not as
    the checkpoint's original, which the archive never returns.

    >>> tied_evaluator(fn, {"lm_head.weight": "wte.weight"})("a", sd)  # fn sees sd's wte.weight twice
    """
    if not aliases:
        return evaluate

    def tied(task: str, sd: Mapping[str, torch.Tensor]) -> Score:
        sd = dict(sd)
        sd.update((a, sd[t]) for a, t in aliases.items() if a in sd and t in sd)
        return evaluate(task, sd)
    return tied


def _score(evaluate: Evaluator, task: str, sd: Mapping[str, torch.Tensor], at: str) -> float:
    """The evaluator's score of ``task`` (``at`` says on which model, for messages)."""
    return _mean(evaluate(task, sd), f"task {task!r} {at}: the evaluator's score")


def _mean(score: object, what: str) -> float:
    """A score (a number, or per-example scores) as one number, summed exactly so that the order of
    the examples does not matter."""
    values = score_values(score, what).reshape(-1).tolist()
    return math.fsum(values) / len(values)


@dataclass(frozen=True)
class LambdaSelection:
    """Each task's lambda and the score of every lambda tried."""

    chosen: dict[str, float]
    scores: dict[str, dict[float, float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"lambda": {"chosen": self.chosen,
                           "scores": {t: {str(k): v for k, v in s.items()} for t, s in self.scores.items()}}}


def select_lambdas(inputs: PackInputs, method: MergeMethod, evaluate: Evaluator, *,
                   grid: Sequence[float] | None = None, fixed: Mapping[str, float] | None = None) -> LambdaSelection:
    """For each task, the lambda of ``grid`` (default: the paper's) whose reconstruction scores
    best on ``evaluate`` (raw scores, compared within the task, so any sign works); ties go to the
    smallest lambda, the densest mask. Tasks in ``fixed`` keep its value, unscored."""
    fixed = dict(fixed or {})
    _check_evaluator(evaluate)
    values = check_lambda_grid(grid if grid is not None else LAMBDA_GRID)
    base: dict[str, torch.Tensor] = {}
    mtl: dict[str, torch.Tensor] = {}
    for item in inputs.merged_items():
        base[item.name], mtl[item.name] = _base_and_mtl(item, method, inputs.chunk_elements)
    chosen: dict[str, float] = {}
    scores: dict[str, dict[float, float]] = {}
    for task, src in inputs.tasks.items():
        if task in fixed:
            chosen[task] = fixed[task]
            log.info("task %s: lambda %.2f (given)", task, chosen[task])
            continue
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
            scores[task][lam] = _score(evaluate, task, sd, f"at lambda {lam}")
        chosen[task] = _best(scores[task])
        log.info("task %s: lambda %.2f (scores %s)", task, chosen[task], scores[task])
    return LambdaSelection(chosen, scores)


def _base_and_mtl(item: Item, method: MergeMethod, chunk_elements: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A merged tensor's base and tau_MTL, in its shape; a streamed item (``Item.streamed``: too large
    to hold every task's copy at once) read a block at a time (``combine`` is blockwise), never whole."""
    if not item.streamed:
        b = item.base
        assert b is not None
        return b, method.combine([task_vector(t, b) for t in item.thetas]).reshape(b.shape)
    base_dtype, n = item.dtypes[0], numel(item.shape)
    assert base_dtype is not None  # (planned merged: the base has it)
    b, mtl = torch.empty(n, dtype=base_dtype), torch.empty(n, dtype=torch.float32)
    for a, bb, xs in item.blocks(chunk_elements):
        assert bb is not None
        s = slice(a, a + bb.numel())
        b[s], mtl[s] = bb, method.combine([task_vector(x, bb) for x in xs])
        del bb, xs  # (before the next block is read)
    return b.reshape(item.shape), mtl.reshape(item.shape)


@dataclass(frozen=True)
class AlphaSelection:
    """The alpha chosen for a merged model, with its per-task scores at every alpha tried and how
    they were normalized (``ratio`` or ``difference``: :func:`normalize`)."""

    method: str
    k: int | None  # None for ta and ties, which take no k
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
        out = {a: math.fsum(s[t] / reference[t] for t in names) / len(names) for a, s in scores.items()}
    else:
        out = {a: math.fsum(s[t] - reference[t] for t in names) / len(names) for a, s in scores.items()}
    return out, rule


def _task_names(archive: "Archive", tasks: Sequence[str] | None) -> list[str]:
    """The tasks to score: ``tasks`` (each checked to be in the archive) or all of the archive's."""
    if tasks is None:
        return list(archive.tasks)
    if isinstance(tasks, (str, bytes)) or not isinstance(tasks, Iterable):
        raise InvalidArgumentError(f"tasks must be a list of task names, got {tasks!r}")
    names = list(tasks)
    if not names:
        raise InvalidArgumentError("tasks is empty: give at least one task name, or None for all")
    for t in names:
        archive.task_info(t)
    return names


def _reference(reference: Mapping[str, Any], names: list[str]) -> dict[str, float]:
    """Each task's reference score from the user's mapping (numbers, or per-example scores averaged)."""
    if not isinstance(reference, Mapping):
        raise InvalidArgumentError(f"reference must map task names to scores, got {type(reference).__name__}")
    missing = [t for t in names if t not in reference]
    if missing:
        raise InvalidArgumentError(f"reference has no score for task {missing[0]!r}: give one per task")
    return {t: _mean(reference[t], f"task {t!r}: the reference score") for t in names}


def select_alpha(archive: "Archive", method: str, evaluate: Evaluator, *, k: int | None = None,
                 grid: Sequence[float] | None = None, tasks: Sequence[str] | None = None,
                 reference: Mapping[str, Score] | None = None) -> AlphaSelection:
    """The alpha of ``grid`` (default 0.1..1.0) whose merged model has the best average
    normalized score over ``tasks``; a task's score is normalized by ``reference[task]``
    (default: the score of the archive's reconstruction of that task; the paper divides by the
    fine-tuned checkpoint's score, which ``reference`` takes): divided by it when every reference
    is positive (accuracies), else less it (``-loss``: the best mean score), see :func:`normalize`.
    Ties go to the smallest alpha.

    >>> sel = tallpack.select_alpha(fam, "consensus-ta", evaluate=fn)
    >>> model = fam.merged("consensus-ta", alpha=sel.alpha)
    """
    _check_evaluator(evaluate)
    values = checked_grid(grid if grid is not None else ALPHA_GRID, "grid", check_alpha)
    names = _task_names(archive, tasks)
    if reference is None:
        ref = {t: _score(evaluate, t, archive.state_dict(t), "on its reconstruction") for t in names}
    else:
        ref = _reference(reference, names)
    parts = archive.merge_parts(method, k=k)
    k = parts.k if is_consensus(method) else None  # a Python int; None for ta and ties (merged() takes no k there)
    scores: dict[float, dict[str, float]] = {}
    for alpha in values:
        scores[alpha] = {t: _score(evaluate, t, parts.state_dict(alpha, task=t), f"at alpha {alpha}")
                         for t in names}
    normalized, rule = normalize(scores, ref)
    zero = [t for t in names if ref[t] == 0]
    if zero:  # an accuracy of 0 for a reconstruction is more likely a broken evaluator than a fact
        log.warning("%s k=%s: reference score 0 for %s: alphas ranked by score - reference, not the ratio",
                    method, k, ", ".join(map(repr, zero)))
    alpha = _best(normalized)
    log.info("%s k=%s: alpha %.2f (normalized %.4f, %s)", method, k, alpha, normalized[alpha], rule)
    return AlphaSelection(method, k, alpha, scores, normalized, ref, rule)
