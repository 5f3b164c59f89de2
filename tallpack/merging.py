"""Merge methods: how the multi-task vector tau_MTL is built from the task vectors.

A method sees the family as a stream of blocks (one list of per-task float32 task vectors per
block); methods that need global statistics (TIES' per-task top-k threshold and its majority sign)
gather them in ``prepare`` over separate streaming passes, so no method holds the family in memory.
The formulas follow the official TALL-masks code (github nik-dim/tall_masks).
"""

from __future__ import annotations

import logging
import math
import numbers
import reprlib
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from ._torch import torch
from .dtypes import narrow
from .errors import FormatError, InvalidArgumentError

log = logging.getLogger(__name__)

#: A callable returning a fresh pass over the family: an iterator of blocks, each a list of
#: per-task float32 task vectors of the same shape.
Passes = Callable[[], Iterator[list["torch.Tensor"]]]


@dataclass(frozen=True)
class Option:
    """A user-settable parameter of a merge method (``pack(merge={"method": ..., name: value})``,
    ``--{method}-{name}`` on the command line)."""

    name: str
    type: type
    default: Any
    help: str
    #: the values a number may take (None: unbounded), shown and checked by the command line
    low: float | None = None
    high: float | None = None
    low_open: bool = False


class MergeMethod:
    """How tau_MTL is built, block by block; registered by ``name`` in :data:`METHODS`.

    A method records ``params()`` in the manifest (and is rebuilt from them by ``from_params``),
    may store extra arrays per merged tensor (``extra_arrays``: name -> dtype, filled by
    ``extras``), and names the merged models an archive of it can produce: the plain one
    (``name``) and Consensus Merging (``consensus-{name}``).
    """

    name: ClassVar[str]
    options: ClassVar[tuple[Option, ...]] = ()
    extra_arrays: ClassVar[dict[str, str]] = {}
    max_tasks: ClassVar[int | None] = None
    #: ``combine`` is the plain sum ``((tau_0 + 0) + tau_1) + ...`` in task order, with no extras:
    #: the packer may then compute it, and the masks, straight from the inputs in compiled loops
    #: that never write the task vectors to memory (``kernels.tv_sum``, ``kernels.tall_mask_tv``).
    plain_sum: ClassVar[bool] = False

    def prepare(self, passes: Passes, num_tasks: int) -> None:
        """Gather global statistics; the default needs none."""

    def combine(self, taus: list[torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
        """tau_MTL of one block (into ``out`` when given and the method can)."""
        raise NotImplementedError

    def extras(self, taus: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """The extra arrays of one block (keys of ``extra_arrays``)."""
        return {}

    def combine_with_extras(self, taus: list[torch.Tensor], out: torch.Tensor | None = None
                            ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(combine(taus, out), extras(taus))``, for a method whose two share their work computed once."""
        return self.combine(taus, out), self.extras(taus)

    def params(self) -> dict[str, Any]:
        return {"method": self.name}

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> "MergeMethod":
        """The method a manifest's ``merge`` object describes (validated)."""
        return cls()

    # -- merged models built from an archive of this method ------------------------------------
    @classmethod
    def merged_models(cls) -> tuple[str, str]:
        return cls.name, f"consensus-{cls.name}"

    def plain_direction(self, tau_mtl: torch.Tensor, extras: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """d of the plain merged model, ``theta_0 + alpha * d``."""
        return tau_mtl

    def plain_alpha(self, num_tasks: int) -> float:
        """The data-free alpha of the plain model: ``1/T`` (a sum of T task vectors)."""
        return 1.0 / max(1, num_tasks)


class TaskArithmetic(MergeMethod):
    """``tau_MTL = sum_t tau_t``, summed in task order."""

    name = "ta"
    plain_sum = True

    def combine(self, taus: list[torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
        out = torch.add(taus[0], 0.0, out=out)  # (+0.0 + tau_1): a -0.0 becomes +0.0, as the spec's sum does
        for tau in taus[1:]:
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
    options = (Option("top_k", float, 0.2, "TIES: fraction of each task vector kept.", low=0, high=1, low_open=True),)
    extra_arrays = {"counts": "uint8"}
    max_tasks = 255  # counts are uint8

    def __init__(self, top_k: float = 0.2):
        value = real(top_k)
        if value is None or not 0 < value <= 1:
            raise InvalidArgumentError(f"TIES top_k must be in (0, 1], got {top_k!r}")
        self.top_k = value
        self.thresholds: list[float] | None = None
        #: -1, 0 or 1, written as a JSON integer (archives before tallpack 0.2 hold -1.0 and the like)
        self.majority_sign: int | float | None = None

    def prepare(self, passes: Passes, num_tasks: int) -> None:
        # Exact global k-th magnitude per task by radix selection on the float32 bit patterns
        # (monotone for non-negative floats): high 16 bits in one pass, low 16 bits in a second.
        high = [np.zeros(1 << 16, np.int64) for _ in range(num_tasks)]
        halves = _Halves()
        d = 0
        for taus in passes():
            d += taus[0].numel()
            for h, tau in zip(high, taus):
                h += np.bincount(halves(tau)[0], minlength=1 << 16)
        keep = int(d * self.top_k)
        k = d - keep  # official: kthvalue(d - int(d * K)); entries >= it are kept
        if k <= 0 or d == 0:
            self.thresholds = [0.0] * num_tasks
        else:
            sel = [kth_smallest_bits([h], k) for h in high]
            low = [np.zeros(1 << 16, np.int64) for _ in range(num_tasks)]
            for taus in passes():
                for (b, _), lo, tau in zip(sel, low, taus):
                    hi, low16 = halves(tau)
                    lo += np.bincount(low16[hi == b], minlength=1 << 16)
            self.thresholds = []
            for (b, rank), lo in zip(sel, low):
                lb, _ = kth_smallest_bits([lo], rank)
                self.thresholds.append(float(np.array([(b << 16) | lb], np.int32).view(np.float32)[0]))
        total = 0  # the sum of the elected signs, counted exactly (a float32 sum is exact to 2**24 only)
        for taus in passes():
            elected = self._trimmed_sum(taus).cpu().numpy()
            total += int(np.count_nonzero(elected > 0)) - int(np.count_nonzero(elected < 0))
        self.majority_sign = int(np.sign(total))
        log.info("TIES thresholds %s, majority sign %+d", self.thresholds, self.majority_sign)

    # Sums run over the tasks in task order, element by element (``_sum``), as spec §6.1.9 derives
    # them: ``torch.sum(dim=0)`` of stacked tasks orders its additions by the tensor's length (for
    # short ones, several accumulators), so the last bit of a sum would depend on how the tensor is
    # laid out (alone, or in a group of small tensors, format 1.12).
    #
    # The formula is ``derive_merged``'s, computed with a few buffers written in place: every
    # temporary of a block costs fresh pages, and bool masks (``tau * (|tau| >= thr)``) cost more
    # than the arithmetic (25-35x the TA pack). ``|x| >= thr_t`` is ``x > cut_t``, cut_t the float32
    # just below thr_t (``hardshrink``, ``torch.threshold``). Where s is the elected sign (+1 or -1),
    # ``k_t = s * a_t`` with ``a_t = s * tau_t`` where ``s * tau_t >= thr_t`` (and > 0), else 0; as
    # rounding is symmetric, ``(+0.0 + k_1) + k_2 ... = s * ((+0.0 + a_1) + a_2 ...)``, up to the
    # sign of a zero, which a final ``+ 0.0`` makes +0.0 as the sum in task order does. For finite
    # task vectors (every merged tensor's: ``tall.in_tall_range``), the bits of ``derive_merged``.
    def _cuts(self) -> list[float]:
        """Per task, the float32 below which an entry's magnitude is trimmed: ``|x| >= thr`` is
        ``|x| > cut`` (0.0 for a threshold <= 0, where every entry is kept)."""
        assert self.thresholds is not None, "prepare() first"
        cuts = []
        for thr in self.thresholds:
            thr32 = np.float32(thr)  # a tensor compared with a Python float: the float rounded to float32
            cuts.append(float(np.nextafter(thr32, np.float32(-np.inf))) if thr32 > 0 else 0.0)
        return cuts

    def _trimmed_sum(self, taus: list[torch.Tensor], scratch: torch.Tensor | None = None) -> torch.Tensor:
        """``(+0.0 + r_1) + r_2 + ...``, r_t = tau_t where ``|tau_t| >= thr_t``, else 0 (a new tensor)."""
        total = torch.zeros_like(taus[0], dtype=torch.float32)
        scratch = torch.empty_like(total) if scratch is None else scratch
        for tau, cut in zip(taus, self._cuts()):
            total += torch.ops.aten.hardshrink.out(tau, cut, out=scratch)  # tau where |tau| > cut, else 0
        return total

    def _merge(self, taus: list[torch.Tensor], out: torch.Tensor | None, counts: bool
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """tau_MTL (the disjoint sum, into ``out`` when given) and, with ``counts``, how many tasks
        each element's sum took (uint8), computed once."""
        assert self.majority_sign is not None, "prepare() first"
        scratch = torch.empty_like(taus[0], dtype=torch.float32)
        sign = self._trimmed_sum(taus, scratch)
        torch.sign(sign, out=sign)
        sign.masked_fill_(sign == 0, 1.0 if self.majority_sign > 0 else -1.0)  # 0: the r_t < 0 are kept
        out = torch.zeros_like(sign) if out is None else out.zero_()
        taken = torch.zeros_like(sign) if counts else None
        for tau, cut in zip(taus, self._cuts()):
            a = torch.mul(tau, sign, out=scratch)
            torch.threshold_(a, cut, 0.0)
            out += a
            if taken is not None:
                taken += torch.sign(a, out=a)  # 1 where the task is kept
        out *= sign
        out += 0.0  # -0.0 (an element no task kept, elected -1) is +0.0, as in the sum in task order
        return out, None if taken is None else taken.to(torch.uint8)

    def combine(self, taus: list[torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
        return self._merge(taus, out, counts=False)[0]

    def extras(self, taus: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """``counts``: per element, how many task vectors went into tau_MTL (the disjoint mean's divisor)."""
        return self.combine_with_extras(taus)[1]

    def combine_with_extras(self, taus: list[torch.Tensor], out: torch.Tensor | None = None
                            ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        merged, counts = self._merge(taus, out, counts=True)
        assert counts is not None
        return merged, {"counts": counts}

    def params(self) -> dict[str, Any]:
        return {"method": self.name, "top_k": self.top_k, "thresholds": self.thresholds,
                "majority_sign": self.majority_sign}

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> "Ties":
        try:
            m = cls(params.get("top_k", 0.2))
        except InvalidArgumentError as e:
            raise FormatError(f"merge: {e}") from None
        thresholds, sign = params.get("thresholds"), params.get("majority_sign")
        if thresholds is not None and (not isinstance(thresholds, list) or not all(_finite(v) for v in thresholds)):
            raise FormatError("merge: TIES thresholds must be a list of finite numbers")
        if sign is not None and (type(sign) not in (int, float) or sign not in (-1, 0, 1)):  # not a boolean (spec §3)
            raise FormatError(f"merge: TIES majority_sign must be -1, 0 or 1, got {sign!r}")
        m.thresholds, m.majority_sign = thresholds, sign
        return m

    def plain_direction(self, tau_mtl: torch.Tensor, extras: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The disjoint mean ``tau_MTL / max(counts, 1)``."""
        return tau_mtl / torch.clamp(extras["counts"].to(torch.float32), min=1)

    def plain_alpha(self, num_tasks: int) -> float:
        """1.0: the disjoint mean is already an average."""
        return 1.0


class _Halves:
    """The high and low 16 bits of ``|tau|``'s float32 bit patterns (numpy views), ``|tau|`` written
    into one buffer reused from block to block (a fresh one a block and task cost its pages)."""

    def __init__(self) -> None:
        self._buf = torch.empty(0, dtype=torch.float32)
        self._high = 1 if sys.byteorder == "little" else 0

    def __call__(self, tau: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        n = tau.numel()
        if self._buf.numel() < n:
            self._buf = torch.empty(n, dtype=torch.float32)
        halves = torch.abs(tau.reshape(-1), out=self._buf[:n]).view(torch.int32).numpy().view(np.uint16)
        return halves[self._high :: 2], halves[1 - self._high :: 2]


def _finite(v: object) -> bool:
    return (type(v) is int or type(v) is float) and math.isfinite(v)


# -- numbers given as arguments --------------------------------------------------------------

def real(value: object) -> float | None:
    """``value`` as a Python float when it is a real number (numpy's scalars too: a grid from
    ``np.linspace``, an ``argmax``), else None; a bool is not a number here, nor one too large for
    a float.

    >>> real(np.float32(0.5)), real(True)
    (0.5, None)
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        return None
    try:
        return float(value)
    except OverflowError:  # an int past 1e308
        return None


def _plain(value: object) -> object:
    """``value`` with torch tensors (in lists and tuples too) as numpy arrays: detached, on the CPU,
    complex kept complex (refused by :func:`score_values`, not silently made real)."""
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu()
        return (t.float() if t.dtype == torch.bfloat16 else t).numpy()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _described(value: object) -> str:
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return f"a {type(value).__name__} of shape {tuple(value.shape)} and dtype {value.dtype}"
    return reprlib.repr(value)


def score_values(value: object, what: str) -> np.ndarray:
    """An evaluator's score (or a reference score) as a float64 array: 0-d for a number, 1-d for
    per-example scores. Python and numpy numbers, numpy arrays, torch tensors (detached, moved to
    the CPU) and lists of them are taken; InvalidArgumentError, naming ``what``, for anything else
    or a score that is not finite.

    >>> score_values(torch.tensor([True, False]), "the score").tolist()
    [1.0, 0.0]
    """
    number = real(value)
    try:
        array = np.asarray(number if number is not None else _plain(value))
    except (TypeError, ValueError):  # a ragged list
        array = np.asarray(None)
    if array.dtype.kind not in "biuf" or array.ndim > 1 or array.size == 0:
        raise InvalidArgumentError(f"{what} must be a number or per-example scores (a 1-d sequence of numbers), "
                                   f"got {_described(value)}")
    array = array.astype(np.float64)
    bad = array[~np.isfinite(array)]
    if bad.size:
        raise InvalidArgumentError(f"{what} {'is' if array.ndim == 0 else 'holds'} {bad[0]}; scores must be finite")
    return array


def integer(value: object) -> int | None:
    """``value`` as a Python int when it is an integer (numpy's too), else None (a bool too).

    >>> integer(np.int64(2)), integer(2.0)
    (2, None)
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        return None
    return int(value)


def check_alpha(alpha: object) -> float:
    """``alpha`` as a Python float, when it is a real number that stays finite rounded to float32
    (as :func:`apply_direction` uses it: 1e39 would make every merged weight inf or NaN);
    InvalidArgumentError otherwise.

    >>> check_alpha(np.float32(0.25))
    0.25
    """
    value = real(alpha)
    if value is None or not math.isfinite(value) or not torch.isfinite(torch.tensor(value, dtype=torch.float32, device="cpu")):
        raise InvalidArgumentError(f"alpha must be a number finite in float32 (|alpha| < 3.4e38), got {alpha!r}")
    return value


def checked_grid(grid: object, name: str, check: Callable[[Any], float]) -> list[float]:
    """The distinct values of ``grid`` (a sequence of numbers: a list, a 1-d numpy array or tensor),
    each through ``check``, in increasing order; InvalidArgumentError naming ``name`` otherwise.

    >>> checked_grid(np.array([0.5, 0.25, 0.5]), "grid", check_alpha)
    [0.25, 0.5]
    """
    values = grid.tolist() if isinstance(grid, (np.ndarray, torch.Tensor)) else grid
    if isinstance(values, (str, bytes, Mapping)) or not isinstance(values, Iterable):
        raise InvalidArgumentError(f"{name} must be a sequence of numbers, got {_described(grid)}")
    out = sorted(set(check(v) for v in values))
    if not out:
        raise InvalidArgumentError(f"{name} is empty: give at least one value")
    return out


def derive_merged(taus: list[torch.Tensor], method: MergeMethod) -> dict[str, torch.Tensor] | None:
    """tau_MTL (``"merged"``) and the method's extra arrays from the float32 task vectors, in
    task order, element by element (spec §6.1.9); None for a method the spec does not derive.

    TA: ``((+0.0 + tau_1) + tau_2) + ...``. TIES with thresholds thr_t and majority sign s0:
    ``r_t = tau_t * [|tau_t| >= thr_t]``, ``s = sign((+0.0 + r_1) + r_2 + ...)`` (s0 where 0),
    ``k_t = r_t * [s > 0 ? r_t > 0 : r_t < 0]``, tau_MTL = ``(+0.0 + k_1) + k_2 + ...``,
    ``counts`` = the number of t with ``k_t != 0``.

    >>> derive_merged([torch.tensor([1.0]), torch.tensor([-0.5])], TaskArithmetic())["merged"]
    tensor([0.5000])
    """
    if method.name == "ta":
        return {"merged": _sum(taus)}
    thresholds, majority = getattr(method, "thresholds", None), getattr(method, "majority_sign", None)
    if method.name != "ties" or thresholds is None or majority is None:
        return None
    if len(thresholds) != len(taus):
        raise FormatError(f"merge: {len(thresholds)} TIES thresholds for {len(taus)} tasks")
    trimmed = [tau * (tau.abs() >= torch.tensor(thr, dtype=torch.float32, device=tau.device)) for tau, thr in zip(taus, thresholds)]
    sign = torch.sign(_sum(trimmed))
    positive = torch.where(sign == 0, torch.tensor(float(majority), device=sign.device), sign) > 0
    kept = [r * torch.where(positive, r > 0, r < 0) for r in trimmed]
    counts = torch.zeros(taus[0].shape, dtype=torch.uint8)
    for k in kept:
        counts += (k != 0).to(torch.uint8)
    return {"merged": _sum(kept), "counts": counts}


def missing_statistics(method: MergeMethod) -> list[str]:
    """The global statistics a method rebuilt from a manifest lacks (TIES' ``thresholds`` and
    ``majority_sign``, which its trimming needs); empty for a method that has none."""
    return [key for key in ("thresholds", "majority_sign") if hasattr(method, key) and getattr(method, key) is None]


def no_derived_merged(method: MergeMethod) -> str:
    """Why ``derive_merged`` gives nothing for ``method`` (a format error where an archive needs
    it, spec §6.1.9), e.g. "merge: TIES majority_sign is missing from the manifest's merge
    parameters"."""
    if method.name != "ties":
        return f"merge method {method.name!r} gives no derived merged vector"
    missing = missing_statistics(method)
    return (f"merge: TIES {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing from the "
            "manifest's merge parameters, which a derived merged vector needs (spec §6.1.9)")


def _sum(xs: list[torch.Tensor]) -> torch.Tensor:
    out = torch.add(xs[0], 0.0)  # +0.0 + x_1: a -0.0 becomes +0.0
    for x in xs[1:]:
        out += x
    return out


#: Merge methods by name.
METHODS: dict[str, type[MergeMethod]] = {m.name: m for m in (TaskArithmetic, Ties)}


def get_method(spec: "str | Mapping[str, Any] | MergeMethod", **options: Any) -> MergeMethod:
    """A merge method: by name (``"ta"``, ``"ties"``) with its options as keywords, as a mapping
    ``{"method": "ties", "top_k": 0.3}``, or an instance, returned as is.

    >>> get_method("ties", top_k=0.3).params()["top_k"]
    0.3
    """
    if isinstance(spec, MergeMethod):
        return spec
    name: object = spec
    if isinstance(spec, Mapping):
        options = {k: v for k, v in spec.items() if k != "method"} | options
        name = spec.get("method")
    cls = METHODS.get(name) if isinstance(name, str) else None
    if cls is None:
        raise InvalidArgumentError(f"unknown merge method {name!r}; choose one of {', '.join(METHODS)}")
    known = {o.name for o in cls.options}
    unknown = set(options) - known
    if unknown:
        raise InvalidArgumentError(f"merge method {name!r} has no option(s) {sorted(unknown)}; "
                                   f"its options: {sorted(known) or 'none'}")
    return cls(**options)


def consensus_mask(masks: list[torch.Tensor], k: int) -> torch.Tensor:
    """``m_cons = (sum_t m_t) >= k``: weights used by at least ``k`` tasks."""
    count = torch.zeros(masks[0].shape, dtype=torch.int32)
    for m in masks:
        count += m.to(torch.int32)
    return count >= k


# -- merged (multi-task) models -------------------------------------------------------------

#: The multi-task models an archive can produce, and the merge method (tau_MTL) each needs.
MERGED_MODELS: dict[str, str] = {model: m.name for m in METHODS.values() for model in m.merged_models()}
#: The paper's alpha grid.
ALPHA_GRID: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(1, 11))


def merged_model_method(model: str) -> type[MergeMethod]:
    """The merge method whose archives give ``model``; InvalidArgumentError for unknown models."""
    if model not in MERGED_MODELS:
        raise InvalidArgumentError(f"unknown merged model {model!r}; choose one of {', '.join(MERGED_MODELS)}")
    return METHODS[MERGED_MODELS[model]]


def is_consensus(model: str) -> bool:
    return model.startswith("consensus-")


def default_alpha(model: str, num_tasks: int) -> float:
    """The data-free alpha: 1.0 for TIES (its disjoint mean is already an average), ``1/T`` for
    the sums (TA and both consensus models), which makes plain TA the average of the models."""
    cls = merged_model_method(model)
    return 1.0 / max(1, num_tasks) if is_consensus(model) else cls().plain_alpha(num_tasks)


def merge_direction(model: str, tau_mtl: torch.Tensor, masks: list[torch.Tensor] | None = None,
                    extras: Mapping[str, torch.Tensor] | None = None, k: int = 2,
                    method: MergeMethod | None = None) -> torch.Tensor:
    """The float32 vector d of one tensor such that the merged model is ``theta_0 + alpha * d``.

    Plain models: the method's ``plain_direction`` (TA: tau_MTL; TIES: the disjoint mean
    ``tau_MTL / max(counts, 1)``); ``consensus-*``: ``m_cons * tau_MTL`` with
    ``m_cons = (sum_t m_t) >= k``.
    """
    if is_consensus(model):
        merged_model_method(model)
        assert masks is not None
        return consensus_mask(masks, k).to(torch.float32) * tau_mtl
    method = method or merged_model_method(model)()
    return method.plain_direction(tau_mtl, extras or {})


def apply_direction(theta_0: torch.Tensor, direction: torch.Tensor, alpha: float) -> torch.Tensor:
    """``theta_0 + alpha * d`` in float32 (alpha rounded to float32), cast to theta_0's dtype."""
    alpha32 = torch.tensor(alpha, dtype=torch.float32, device=direction.device)
    return narrow(theta_0.to(torch.float32) + alpha32 * direction, theta_0.dtype)
