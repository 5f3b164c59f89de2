"""Merge methods: how the multi-task vector tau_MTL is built from the task vectors.

A method sees the family as a stream of blocks (one list of per-task float32 task vectors per
block, or the inputs' blocks as they are, for the compiled loops that compute the task vectors on
the way); methods that need global statistics (TIES' per-task top-k threshold and its majority
sign) gather them in ``prepare`` over separate streaming passes, so no method holds the family in
memory.
The formulas follow the official TALL-masks code (github nik-dim/tall_masks).
"""

from __future__ import annotations

import logging
import math
import numbers
import reprlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from . import kernels
from ._torch import torch
from .dtypes import narrow
from .errors import FormatError, InvalidArgumentError

log = logging.getLogger(__name__)

#: A callable returning a fresh pass over the family: an iterator of blocks, each a list of
#: per-task float32 task vectors of the same shape.
Passes = Callable[[], Iterator[list["torch.Tensor"]]]
#: The same pass as the inputs give it: blocks ``(kind, base, thetas)`` of flat numpy arrays, whose
#: task vectors are ``widen(theta) - widen(base)`` in float32 (``kind`` one of ``kernels.KINDS``,
#: 16-bit floats as their bits, as ``kernels.tv_sum`` takes them), or, where ``base`` is None, the
#: float32 task vectors themselves (kind ``"float32"``).
InputPasses = Callable[[], Iterator[tuple[str, "np.ndarray | None", list[np.ndarray]]]]


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
    #: ``combine_inputs`` computes ``combine_with_extras`` straight from the inputs in compiled
    #: loops that never write the task vectors to memory: the packer then does, and computes the
    #: masks the same way (``kernels.tall_mask_tv``).
    straight: ClassVar[bool] = False

    def prepare(self, passes: Passes, num_tasks: int, inputs: InputPasses | None = None) -> None:
        """Gather global statistics over ``passes`` (or ``inputs``, the same blocks as the inputs
        give them, where the method takes those); the default needs none."""

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

    def combine_inputs(self, base: np.ndarray, thetas: list[np.ndarray], kind: str, out: np.ndarray,
                       extras: dict[str, np.ndarray], parts: int = 1) -> None:
        """``combine_with_extras`` of one block given as the inputs hold it (an ``InputPasses``
        block with a base, of the ``kernels.tv_sum`` kind ``kind``), into ``out`` and ``extras``
        (flat numpy arrays, one per ``extra_arrays`` key), in up to ``parts`` element ranges at
        once: the same bits. Only for a method that is ``straight``."""
        raise NotImplementedError

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
    """``tau_MTL = sum_t tau_t``, summed in task order (the official code's ``torch.sum`` over the
    task axis orders its additions by the flattened model's size: the same sum, another last bit
    on some elements when there are many tasks)."""

    name = "ta"
    straight = True

    def combine(self, taus: list[torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
        out = torch.add(taus[0], 0.0, out=out)  # (+0.0 + tau_1): a -0.0 becomes +0.0, as the spec's sum does
        for tau in taus[1:]:
            out += tau
        return out

    def combine_inputs(self, base: np.ndarray, thetas: list[np.ndarray], kind: str, out: np.ndarray,
                       extras: dict[str, np.ndarray], parts: int = 1) -> None:
        ran = kernels.tv_sum(base, thetas, kind, out, parts)
        assert ran, "combine_inputs without the compiled loops, or for arrays they refuse"


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
    straight = True
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

    def prepare(self, passes: Passes, num_tasks: int, inputs: InputPasses | None = None) -> None:
        # Exact global k-th magnitude per task by radix selection on the float32 bit patterns
        # (monotone for non-negative floats): high 16 bits in one pass, low 16 bits in a second;
        # the elected signs' total in a third. Each pass in compiled loops that compute the task
        # vectors a block at a time from the inputs (``kernels.ties_hist``, ``ties_signs``), the
        # tasks or element ranges side by side: counts, the same whatever the threads.
        source = inputs if inputs is not None else _input_passes(passes)
        threads = kernels.default_threads()
        high = np.zeros((num_tasks, 1 << 16), np.int64)
        d = 0
        for kind, base, xs in source():
            d += xs[0].size
            _histograms(kind, base, xs, [-1] * num_tasks, high, threads)
        keep = int(d * self.top_k)
        k = d - keep  # official: kthvalue(d - int(d * K)); entries >= it are kept
        if k <= 0 or d == 0:
            self.thresholds = [0.0] * num_tasks
        else:
            sel = [kth_smallest_bits([h], k) for h in high]
            low = np.zeros_like(high)
            for kind, base, xs in source():
                _histograms(kind, base, xs, [b for b, _ in sel], low, threads)
            self.thresholds = []
            for (b, rank), lo in zip(sel, low):
                lb, _ = kth_smallest_bits([lo], rank)
                self.thresholds.append(float(np.array([(b << 16) | lb], np.int32).view(np.float32)[0]))
        thresholds, total = _float32s(self.thresholds), 0  # the elected signs' sum, counted exactly
        for kind, base, xs in source():
            pos, neg = kernels.ties_signs(base, xs, kind, thresholds, threads)
            total += pos - neg
        self.majority_sign = int(np.sign(total))
        log.info("TIES thresholds %s, majority sign %+d", self.thresholds, self.majority_sign)

    # Sums run over the tasks in task order, element by element, as spec §6.1.9 derives them
    # (``torch.sum(dim=0)`` of stacked tasks orders its additions by the tensor's length, so the
    # last bit of a sum would depend on how the tensor is laid out: alone, or in a group of small
    # tensors, format 1.12): ``kernels.ties_merge``, one pass over the task vectors (or the inputs)
    # that writes tau_MTL and counts and nothing else, for ``derive_merged`` too.
    def _merge(self, taus: list[torch.Tensor], out: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """tau_MTL (the disjoint sum, into ``out`` when given) and how many tasks each element's
        sum took (uint8), computed once."""
        assert self.thresholds is not None and self.majority_sign is not None, "prepare() first"
        return _ties_block(taus, self.thresholds, self.majority_sign, out)

    def combine_inputs(self, base: np.ndarray, thetas: list[np.ndarray], kind: str, out: np.ndarray,
                       extras: dict[str, np.ndarray], parts: int = 1) -> None:
        assert self.thresholds is not None and self.majority_sign is not None, "prepare() first"
        kernels.ties_merge(base, thetas, kind, _float32s(self.thresholds), float(self.majority_sign), out,
                           extras["counts"], parts)

    def combine(self, taus: list[torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
        return self._merge(taus, out)[0]

    def extras(self, taus: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """``counts``: per element, how many task vectors went into tau_MTL (the disjoint mean's divisor)."""
        return self.combine_with_extras(taus)[1]

    def combine_with_extras(self, taus: list[torch.Tensor], out: torch.Tensor | None = None
                            ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        merged, counts = self._merge(taus, out)
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


def _input_passes(passes: Passes) -> InputPasses:
    """``passes`` as ``InputPasses``: each block's float32 task vectors, without a base."""
    return lambda: (("float32", None, [_elements32(t) for t in taus]) for taus in passes())


def _elements32(t: torch.Tensor) -> np.ndarray:
    """A float32 tensor's elements, flat and contiguous, as numpy (a view where it can be)."""
    return t.detach().cpu().to(torch.float32).reshape(-1).contiguous().numpy()


def _float32s(values: list[float]) -> np.ndarray:
    """Thresholds rounded to float32 (spec §6.1.9), as a tensor compared with a Python float rounds
    it; one past float32's range (a manifest may hold one) is inf, which trims every entry."""
    with np.errstate(over="ignore"):
        return np.array(values, np.float64).astype(np.float32)


def _histograms(kind: str, base: np.ndarray | None, xs: list[np.ndarray], bins: list[int], hists: np.ndarray,
                threads: int) -> None:
    """``kernels.ties_hist`` of each task's block into its row of ``hists``, the tasks side by side."""
    def run(first: int, end: int) -> None:
        for t in range(first, end):
            kernels.ties_hist(xs[t], base, kind, bins[t], hists[t])
    kernels.in_parts(len(xs), threads, run)


def _ties_block(taus: list[torch.Tensor], thresholds: list[float], majority: float, out: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """TIES' disjoint sum of one block of float32 task vectors (into ``out`` when given) and its
    counts: ``kernels.ties_merge``, the formula of ``derive_merged``'s docstring."""
    shape = taus[0].shape
    into = out if out is not None and out.is_contiguous() and out.dtype == torch.float32 else None
    merged = torch.empty(shape, dtype=torch.float32) if into is None else into
    counts = torch.empty(shape, dtype=torch.uint8)
    kernels.ties_merge(None, [_elements32(t) for t in taus], "float32", _float32s(thresholds), float(majority),
                       merged.reshape(-1).numpy(), counts.reshape(-1).numpy())
    if out is not None and into is None:
        merged = out.copy_(merged)
    return merged, counts


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

    A 0-d tensor or array (``grid[scores.argmax()]`` in torch) is taken as its number; one that
    requires grad is refused (no gradient would reach it).

    >>> check_alpha(np.float32(0.25)), check_alpha(torch.tensor(0.5))
    (0.25, 0.5)
    """
    if isinstance(alpha, torch.Tensor) and alpha.requires_grad:  # it would get no gradient, and no word said so
        raise InvalidArgumentError("alpha is taken as a number, so a tensor that requires grad gets no gradient through "
                                   "the merged model: pass alpha.item(); to differentiate a merge, build "
                                   "theta_0 + alpha * d from fam.merge_parts(method).parts")
    number = alpha
    if isinstance(alpha, (torch.Tensor, np.ndarray)) and alpha.ndim == 0:
        try:
            number = alpha.item()
        except RuntimeError:  # a meta tensor holds no value
            number = None
    value = real(number)
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
        return {"merged": TaskArithmetic().combine(taus)}
    thresholds, majority = getattr(method, "thresholds", None), getattr(method, "majority_sign", None)
    if method.name != "ties" or thresholds is None or majority is None:
        return None
    if len(thresholds) != len(taus):
        raise FormatError(f"merge: {len(thresholds)} TIES thresholds for {len(taus)} tasks")
    merged, counts = _ties_block(taus, thresholds, majority)  # tests compare it with the formula written plainly
    return {"merged": merged, "counts": counts}


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


#: the most masks a uint8 count holds (consensus_mask): past it, blocks of counts are summed as int32
_UINT8_MAX = 255


def consensus_mask(masks: Iterable[torch.Tensor], k: int) -> torch.Tensor:
    """``m_cons = (sum_t m_t) >= k``: weights used by at least ``k`` tasks. ``masks`` may be an
    iterator: each is counted as it comes, so the tasks' masks need not be held at once.

    >>> consensus_mask(iter([torch.tensor([True, False]), torch.tensor([True, True])]), 2)
    tensor([ True, False])
    """
    # Counted as uint8, each boolean mask added as its bytes (0 or 1): a same-dtype add, about 40x
    # faster than adding booleans to wider counts, and a quarter of int32's memory; every 255
    # masks, the block's counts go into int32 ones (an archive holds up to 65536 tasks).
    block: torch.Tensor | None = None
    total: torch.Tensor | None = None
    for n, m in enumerate(masks):
        bits = (m if m.dtype == torch.bool else m.to(torch.bool)).view(torch.uint8)
        if block is None:
            block = bits.clone()
        else:
            block.add_(bits)
        if (n + 1) % _UINT8_MAX == 0:
            total = block.to(torch.int32) if total is None else total.add_(block)
            block = None
    if total is not None and block is not None:
        total.add_(block)
    count = total if total is not None else block
    if count is None:
        raise InvalidArgumentError("consensus_mask: no masks")
    if k > torch.iinfo(count.dtype).max:  # compared in the count's dtype, k would wrap
        return torch.zeros(count.shape, dtype=torch.bool, device=count.device)
    return count >= max(k, 0)  # (a count is never negative: any k <= 0 keeps every weight)


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


def merge_direction(model: str, tau_mtl: torch.Tensor, masks: Iterable[torch.Tensor] | None = None,
                    extras: Mapping[str, torch.Tensor] | None = None, k: int = 2,
                    method: MergeMethod | None = None) -> torch.Tensor:
    """The float32 vector d of one tensor such that the merged model is ``theta_0 + alpha * d``.

    Plain models: the method's ``plain_direction`` (TA: tau_MTL; TIES: the disjoint mean
    ``tau_MTL / max(counts, 1)``); ``consensus-*``: ``m_cons * tau_MTL`` with
    ``m_cons = (sum_t m_t) >= k`` (``masks`` counted as they come: an iterator holds one at a time).
    """
    if is_consensus(model):
        merged_model_method(model)
        assert masks is not None
        # tau_MTL times the boolean mask, promoted as it goes: the bits of 0.0/1.0 times tau_MTL
        # (-0.0 where a negative element is dropped), without a float32 copy of the mask
        return tau_mtl * consensus_mask(masks, k)
    method = method or merged_model_method(model)()
    return method.plain_direction(tau_mtl, extras or {})


def apply_direction(theta_0: torch.Tensor, direction: torch.Tensor, alpha: float) -> torch.Tensor:
    """``theta_0 + alpha * d`` in float32 (alpha rounded to float32), cast to theta_0's dtype."""
    got = fused_merge(theta_0, direction, alpha)
    if got is not None:
        return got[0]
    alpha32 = torch.tensor(alpha, dtype=torch.float32, device=direction.device)
    out = theta_0.to(torch.float32, copy=True)  # summed in place: one float32 buffer fewer (a + b is b + a)
    return narrow(out.add_(alpha32 * direction), theta_0.dtype)


#: Whether merged tensors are built by the compiled loop (``kernels.merge_apply``) where it runs:
#: one pass a tensor, on this thread and tallpack's helpers, not torch's ten element-wise passes,
#: each an OpenMP parallel region (BENCHMARKS.md). The same bits either way; benchmarks turn it off.
FUSED = True
#: The torch dtypes ``kernels.merge_apply`` takes, by its kinds.
_MERGE_KINDS = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16", "float64": "float64"}


def _flat(t: torch.Tensor) -> np.ndarray:
    """A contiguous CPU tensor's elements as flat numpy (16-bit floats as their bits, bool as bytes)."""
    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.view(torch.int16)
    elif t.dtype == torch.bool:
        t = t.view(torch.uint8)
    return t.reshape(-1).numpy()


def fusable_dtype(dtype: str) -> bool:
    """Whether :func:`fused_merge` builds a merged tensor of a base of ``dtype`` (a spec name)."""
    return FUSED and kernels.COMPILED and dtype in _MERGE_KINDS


def fusable(theta_0: torch.Tensor) -> bool:
    """Whether :func:`fused_merge` builds a merged tensor of base ``theta_0``."""
    return theta_0.device.type == "cpu" and fusable_dtype(str(theta_0.dtype).removeprefix("torch."))


def fused_merge(theta_0: torch.Tensor, d: torch.Tensor, alpha: float, masks: list[torch.Tensor] | None = None,
                k: int = 0, counts: torch.Tensor | None = None, out: torch.Tensor | None = None,
                parts: int = 1) -> tuple[torch.Tensor, int] | None:
    """``apply_direction(theta_0, merge_direction(...), alpha)`` in one compiled pass (the same
    bits): ``d`` tau_MTL (or the direction), masked by ``consensus_mask(masks, k)`` when ``masks``
    are given, divided by ``max(counts, 1)`` when ``counts`` are (TIES' disjoint mean); into
    ``out`` when given (contiguous, theta_0's dtype), in up to ``parts`` ranges at once. Returns the
    tensor and ``kernels.merge_apply``'s flags; None where the loop does not run (no compiled
    loops, another dtype or device, a tensor not contiguous: the caller's torch path then runs)."""
    tensors = [theta_0, d, *(masks or ()), *(() if counts is None else (counts,)), *(() if out is None else (out,))]
    if (not fusable(theta_0) or d.dtype != torch.float32 or d.shape != theta_0.shape
            or any(t.device.type != "cpu" or not t.is_contiguous() or t.numel() != d.numel() for t in tensors)
            or any(m.dtype != torch.bool for m in masks or ()) or (counts is not None and counts.dtype != torch.uint8)
            or (out is not None and out.dtype != theta_0.dtype) or (masks is not None and not 0 < len(masks) < 65536)
            or any(t.requires_grad for t in tensors)):
        return None
    if out is None:
        out = torch.empty(theta_0.shape, dtype=theta_0.dtype)
    with np.errstate(over="ignore"):
        alpha32 = np.float32(alpha)  # as torch.tensor(alpha, dtype=torch.float32) rounds it
    flags = kernels.merge_apply(_flat(theta_0), _MERGE_KINDS[str(theta_0.dtype).removeprefix("torch.")], _flat(d),
                                [_flat(m) for m in masks or ()], min(max(int(k), 0), 1 << 16) if masks else 0,
                                None if counts is None else _flat(counts), alpha32, _flat(out), parts)
    return None if flags is None else (out, flags)

