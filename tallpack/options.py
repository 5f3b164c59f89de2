"""Pack options: one frozen object that ``tallpack.pack`` and the command line share, with the
defaults in one place and every value validated before any input is read."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeAlias, cast

from .arrays import DEFAULT_CHUNK_ELEMENTS, check_chunk_elements
from .checksums import CHECKSUMS, DEFAULT_CHECKSUM
from .codecs import DENSE_PRESETS, Chain, Planes, dense_chain, mask_chain
from .container import check_json
from .elements import itemsize
from .errors import InvalidArgumentError
from .merging import MergeMethod, checked_grid, get_method, integer, real
from .progress import ProgressLike
from .tall import DEFAULT_LAMBDA

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt
    import torch

#: An evaluator's score, higher is better: a finite number, or per-example scores (one number per
#: example, 1-d), as Python numbers, numpy values or torch tensors (``(pred == y).float().mean()``
#: as it is; :func:`tallpack.merging.score_values` checks them at run time).
Score: TypeAlias = ("float | np.integer[Any] | np.floating[Any] | np.bool_ | npt.NDArray[Any] | torch.Tensor"
                    " | Sequence[float | np.integer[Any] | np.floating[Any] | torch.Tensor]")
#: A task evaluator: ``fn(task_name, state_dict) -> score`` (:data:`Score`), higher is better.
Evaluator: TypeAlias = "Callable[[str, Mapping[str, torch.Tensor]], Score]"
__all__ = ["DENSE_PRESETS", "Evaluator", "PackOptions", "Score"]


@dataclass(frozen=True)
class PackOptions:
    """How to pack a family. Every field has the default ``tallpack pack`` uses.

    ``merge`` is a method name (``"ta"``, ``"ties"``), a mapping with the method's options
    (``{"method": "ties", "top_k": 0.3}``) or a :class:`~tallpack.merging.MergeMethod`.
    ``overwrite=True`` replaces an existing archive (the command line's ``--force``); without it
    ``pack`` refuses to.

    >>> PackOptions(merge={"method": "ties", "top_k": 0.3}, codec="raw").validated().method.params()["top_k"]
    0.3
    """

    #: one value for every task or ``{task: value}`` (other tasks: the default 0.4). With
    #: ``evaluate``, a mapping fixes those tasks' lambdas and the rest are chosen; one value for
    #: every task is an error (``evaluate`` would choose them all)
    lambdas: float | Mapping[str, float] | None = None
    merge: str | Mapping[str, Any] | MergeMethod = "ta"
    evaluate: Evaluator | None = None
    lambda_grid: Sequence[float] | None = None
    codec: str = "planes"
    level: int = 3
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS
    keep_base_only: bool = False
    #: pack a task even when it does not look fine-tuned from the base (it shares no tensor name
    #: with it, or over half of the names it shares differ in shape), which is otherwise an error.
    #: Tensors whose shape differs from the base's are stored per task with or without it
    allow_mismatch: bool = False
    #: take this prefix off every tensor name of the base and the tasks that starts with it: a
    #: training wrapper's (a LightningModule's ``"model."``, DDP's ``"module."``), which the model's
    #: own loader (a folder with the base's config.json) does not take. An error when no name
    #: starts with it, where a name without it is the checkpoint's too, or with ``exact`` for a task
    #: of safetensors files (the exact tier gives them back byte for byte, with their names)
    strip_prefix: str | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)
    threads: int | None = None
    progress: ProgressLike = False  # True: a tqdm bar; or fn(desc, done, total)
    checksum: str = DEFAULT_CHECKSUM
    #: also store every task's original bits and files (the exact tier, format 1.2). Not with
    #: ``fidelity`` or ``budget`` (an error): every task already comes back bit for bit, and the
    #: originals set the size
    exact: bool = False
    #: with ``exact``, leave out each mask whose tensor codes smaller against the base without it
    #: (format 1.6: the reader derives it from the original, so lossy reads of those tensors cost
    #: about an exact read); False stores every mask (lossy reads as fast as without the tier).
    #: False without ``exact`` is an error (nothing to store differently)
    derive_masks: bool = True
    #: with ``derive_masks``, also leave out the merged vector of each tensor whose masks are all
    #: derived (format 1.8: a lossy read of one task of it then rebuilds every task's original);
    #: False stores every merged vector (an error without ``exact``)
    derive_merged: bool = True
    overwrite: bool = False
    #: record each input's path, as given, in the manifest (``source.path``: provenance only, never
    #: read back); False leaves the paths out, so an archive to be shared holds no local paths and
    #: packing the same files from another folder gives the same bytes
    record_paths: bool = True
    #: store merged (and shared) tensors of fewer than 262,144 elements in groups of up to 1M elements
    #: (format 1.12, ``tallpack.groups``): one rebuild per group instead of one per tensor. Not
    #: with ``exact`` or the fidelity dial, which work tensor by tensor: there the default True
    #: is ignored (the command line refuses an explicit ``--group`` with them)
    group: bool = True
    #: the fidelity dial (format 1.5, ``tallpack.dial``): reconstruct every task at least this well
    #: (with ``evaluate``: its score relative to the original's; else the weight fidelity, where 1
    #: is bit-exact), ...
    fidelity: float | None = None
    #: ... and/or keep the archive within this many times the average task checkpoint's bytes.
    #: Neither with ``exact`` (an error): the dial corrects the lossy reads of archives without it
    budget: float | None = None
    #: the corrections the dial may store, from ``sparse``, ``quant4``, ``quant8``, ``qtau`` (the
    #: task's own quantized task vector instead of its mask, format 1.7), ``exact``
    corrections: Sequence[str] = ("sparse", "quant4", "quant8", "qtau", "exact")
    #: with the dial: per task, per tensor name, weights of each element's squared error
    #: (broadcastable to the tensor: a linear layer's input second moments from
    #: ``tallpack.sensitivity.input_moments`` make its error the layer's output error); unlisted
    #: tensors weigh 1 everywhere (only merged tensors have errors to weigh), and targets are then
    #: in this *weighted* weight fidelity
    sensitivity: Mapping[str, Mapping[str, Any]] | None = None

    def replace(self, **changes: Any) -> "PackOptions":
        return dataclasses.replace(self, **changes)

    def validated(self) -> "Validated":
        """Check every option; InvalidArgumentError names the first bad one. The checked options
        (``Validated.options``) hold numbers as Python ints and floats (numpy's scalars accepted).

        >>> PackOptions(chunk_elements=np.int64(1024)).validated().options.chunk_elements
        1024
        """
        return self._plain_numbers()._checked()

    def _checked(self) -> "Validated":
        if type(self.level) is not int or not MIN_LEVEL <= self.level <= MAX_LEVEL:
            raise InvalidArgumentError(f"level must be an integer {MIN_LEVEL}..{MAX_LEVEL} (zstd's levels), "
                                       f"got {self.level!r}")
        dense_chain(self.codec, 4, self.level)  # an unknown codec: InvalidArgumentError
        try:
            check_chunk_elements(self.chunk_elements)
        except ValueError as e:
            raise InvalidArgumentError(str(e)) from None
        if self.checksum not in CHECKSUMS:
            raise InvalidArgumentError(f"unknown checksum {self.checksum!r}; choose one of {', '.join(CHECKSUMS)}")
        for key in ("overwrite", "group", "record_paths", "exact", "derive_masks", "derive_merged"):
            if not isinstance(getattr(self, key), bool):
                raise InvalidArgumentError(f"{key} must be True or False, got {getattr(self, key)!r}")
        _check_exact_tier(self)
        if self.strip_prefix is not None and (not isinstance(self.strip_prefix, str) or not self.strip_prefix):
            raise InvalidArgumentError(f"strip_prefix must be a non-empty string (a prefix of tensor names, "
                                       f"'model.'), got {self.strip_prefix!r}")
        if self.threads is not None and (type(self.threads) is not int or self.threads < 1):
            raise InvalidArgumentError(f"threads must be a positive integer, got {self.threads!r}")
        _check_dial(self)
        _check_metadata(self.metadata)
        if self.evaluate is not None and self.lambdas is not None and not isinstance(self.lambdas, Mapping):
            raise InvalidArgumentError("lambdas and evaluate conflict: evaluate chooses every task's lambda from "
                                       "lambda_grid; give lambdas as {task: value} to fix some tasks' instead")
        if self.lambda_grid is not None:
            if self.evaluate is None:
                raise InvalidArgumentError("lambda_grid is searched with evaluate: give evaluate too, or lambdas "
                                           "for fixed values")
            check_lambda_grid(self.lambda_grid)
        return Validated(self, get_method(self.merge))

    def _plain_numbers(self) -> "PackOptions":
        """These options with numpy's integer and real scalars as Python ints and floats (a value of
        another type is left for the checks to refuse)."""
        changes: dict[str, int | float | None] = {}
        for key in ("chunk_elements", "level", "threads"):
            changes[key] = integer(getattr(self, key))
        for key in ("fidelity", "budget", "lambdas"):
            changes[key] = real(getattr(self, key))
        return self.replace(**{k: v for k, v in changes.items() if v is not None})


@dataclass(frozen=True)
class Validated:
    """Options checked, with the merge method built."""

    options: PackOptions
    method: MergeMethod

    def dense(self, dtype: str) -> Chain:
        """The chain of a dense array of ``dtype`` (a spec dtype name)."""
        return dense_chain(self.options.codec, itemsize(dtype), self.options.level, dtype)

    @property
    def dial(self) -> bool:
        """Whether the fidelity dial is on (``fidelity`` or ``budget`` given)."""
        return self.options.fidelity is not None or self.options.budget is not None

    def features(self) -> frozenset[str]:
        """The optional format features these options use (they set the archive's minor version)."""
        # codecs are recorded as arrays are stored (ContainerWriter.use): ``planes-exp`` only
        # where a float32 or bfloat16 array was stored with it
        return frozenset(({"field:exact"} if self.options.exact else set())
                         | ({"field:correction"} if self.dial else set())
                         | ({"encoding:tall-derived"} if self.derive_masks else set())
                         | ({"encoding:tall-derived-merged"} if self.derive_merged else set()))

    @property
    def group(self) -> bool:
        """Whether small merged tensors are stored in groups (``PackOptions.group``)."""
        return bool(self.options.group) and not self.options.exact and not self.dial

    @property
    def derive_masks(self) -> bool:
        """Whether the exact tier may leave masks out (``tall-derived`` entries, format 1.6): with
        ``exact`` (never with the fidelity dial, whose corrections need a stored mask)."""
        return self.options.exact and bool(self.options.derive_masks) and not self.dial

    @property
    def derive_merged(self) -> bool:
        """Whether the exact tier may leave merged vectors out too (``tall-derived-merged``,
        format 1.8): where masks may be derived, unless ``derive_merged=False``."""
        return self.derive_masks and bool(self.options.derive_merged)

    def masks(self) -> Chain:
        """The masks' chain: zstd where it saves 10%, except with ``codec="raw"`` (speed over
        size), whose mask chunks of 4 KiB or more are kept verbatim: a read copies their bits."""
        return mask_chain(self.options.level, 0.0 if self.options.codec == "raw" else None)

    def residuals(self, dtype_itemsize: int) -> Chain:
        """The chain of the exact tier's residuals, whatever ``codec`` says: byte planes, each zstd
        or verbatim (``planes``), at zstd level 1 with long matches up to ``level`` 3 (as small as
        level 3 over all planes, or smaller, and faster both ways: BENCHMARKS.md), else at ``level``."""
        level = self.options.level
        return Chain([Planes(dtype_itemsize, 1 if level <= 3 else level)])

    def lambdas(self, tasks: Sequence[str]) -> dict[str, float]:
        """Each task's lambda: one value for all, or a mapping (other tasks get the default)."""
        lambdas = DEFAULT_LAMBDA if self.options.lambdas is None else self.options.lambdas
        if isinstance(lambdas, Mapping):
            unknown = set(lambdas) - set(tasks)
            if unknown:
                raise InvalidArgumentError(f"lambda given for unknown task(s) {sorted(unknown)}; tasks are {list(tasks)}")
            out = {t: lambdas.get(t, DEFAULT_LAMBDA) for t in tasks}
        else:
            out = dict.fromkeys(tasks, lambdas)
        checked = {t: real(lam) for t, lam in out.items()}
        for t, value in checked.items():
            if value is None or not math.isfinite(value) or value < 0:
                raise InvalidArgumentError(f"task {t!r}: lambda must be a finite number >= 0, got {out[t]!r}")
        return cast("dict[str, float]", checked)


def _lambda(value: object) -> float:
    checked = real(value)
    if checked is None or not math.isfinite(checked) or checked < 0:
        raise InvalidArgumentError(f"lambda_grid: lambda must be a finite number >= 0, got {value!r}")
    return checked


def check_lambda_grid(grid: object) -> list[float]:
    """The distinct lambdas of ``grid`` in increasing order, each a finite number >= 0;
    InvalidArgumentError otherwise.

    >>> check_lambda_grid([0.4, 0.25, 0.4])
    [0.25, 0.4]
    """
    return checked_grid(grid, "lambda_grid", _lambda)


def _check_metadata(metadata: Any) -> None:
    """User metadata goes into the manifest as it is: it must be JSON that readers take back
    (spec §3, §7), else the archive would open nowhere."""
    if metadata is None:
        return
    if not isinstance(metadata, Mapping):
        raise InvalidArgumentError(f"metadata must be a mapping of names to JSON values, got {type(metadata).__name__}")
    for key, value in metadata.items():
        try:
            check_json({key: value}, at=1)  # the manifest's ``metadata`` object, one level down
        except ValueError as e:
            raise InvalidArgumentError(f"metadata[{key!r}]: {e}") from None


def _check_exact_tier(o: PackOptions) -> None:
    """The exact tier's switches do nothing without it: refuse them rather than ignore them."""
    if o.exact:
        return
    for key, flag in (("derive_masks", "--store-masks"), ("derive_merged", "--store-merged")):
        if not getattr(o, key):
            raise InvalidArgumentError(f"{key}=False ({flag}) needs exact=True (--exact): without the exact tier "
                                       "every mask and merged vector is stored")


def _check_dial_without_exact(o: PackOptions) -> None:
    """The dial corrects lossy reads; with the exact tier every task already comes back bit for bit,
    at a size the originals set: refuse the two together rather than store both."""
    if not o.exact:
        return
    if o.budget is not None:
        raise InvalidArgumentError("budget (--budget) does not go with exact=True (--exact): the exact tier's size is "
                                   "set by the originals, which no budget bounds; drop one of them")
    if o.fidelity is not None:
        raise InvalidArgumentError("fidelity (--fidelity) does not go with exact=True (--exact): the exact tier "
                                   "already gives every task back bit for bit (exact=True reads, unpack --exact), and "
                                   "the dial corrects the lossy reads of archives without it; drop one of them")


#: The zstd levels ``level`` (``pack --level``) may take. zstd's negative "fast" levels are left
#: out: byte planes code at level 1 below level 10 whatever the level, and level 0 is zstd's 3.
MIN_LEVEL, MAX_LEVEL = 1, 22

#: The corrections the fidelity dial knows (``tallpack.dial.CORRECTIONS``).
_CORRECTIONS = ("sparse", "quant4", "quant8", "qtau", "exact")


def _check_dial(o: PackOptions) -> None:
    f, b = o.fidelity, o.budget
    if f is not None and (real(f) is None or not 0 < f <= 1):
        raise InvalidArgumentError(f"fidelity must be a number in (0, 1] (1: exact), got {f!r}")
    if b is not None and (real(b) is None or not math.isfinite(b) or b <= 0):
        raise InvalidArgumentError(f"budget must be a positive number (times one checkpoint's size), got {b!r}")
    _check_dial_without_exact(o)
    c = o.corrections
    if isinstance(c, (str, bytes)) or not isinstance(c, Collection):  # 'sparse' is no list of one
        raise InvalidArgumentError(f"corrections must be a sequence of names from {', '.join(_CORRECTIONS)} "
                                   f"(a list or tuple), got {c!r}")
    bad = [name for name in c if name not in _CORRECTIONS]
    if bad:
        raise InvalidArgumentError(f"unknown correction(s) {bad}; choose from {', '.join(_CORRECTIONS)}")
    if f is None and b is None and set(c) != set(_CORRECTIONS):  # the default (every one) is no choice
        raise InvalidArgumentError("corrections choose what the fidelity dial stores: give fidelity or budget too")
    s = o.sensitivity
    if s is not None:
        if f is None and b is None:
            raise InvalidArgumentError("sensitivity weighs the fidelity dial's errors: give fidelity or budget too")
        if not isinstance(s, Mapping) or not all(isinstance(t, str) and isinstance(v, Mapping) for t, v in s.items()):
            raise InvalidArgumentError("sensitivity must map task names to {tensor name: weights}")
