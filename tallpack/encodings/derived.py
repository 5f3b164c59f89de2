"""``tall-derived``: a TALL task entry of the exact tier whose mask is not stored (spec §6.1.7,
format 1.6).

Where the exact residual is coded against the base (or zero), the original theta_t comes back
without the mask, and the mask then follows from it: ``m_t = tall_mask(f32(theta_t) - f32(theta_0),
tau_MTL, lambda_t)``, the packer's own float32 operations on the same inputs, so the same bits. The
writer stores a mask only where mask + residual against the TALL rebuild codes smaller than the
residual against the base alone (``exact.add_exact``). The entry::

    {"encoding": "tall-derived", "dtype", "shape", "ones": <set bits>, "lambda": <lambda_t>,
     "exact": {"reference": "base" | "zero", ...}}

Its lossy read is the ``tall`` one with the derived mask (the original's hash checked first).
Everything that needs a task's mask (stats, consensus merging, the rebuild) gets it through
:func:`task_mask`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

from .. import kernels
from .._torch import torch
from ..arrays import ArrayRef
from ..dtypes import torch_dtype
from ..errors import FormatError, IntegrityError
from ..tall import compiled_kind, elements, reconstruct, tall_mask, task_vector
from .base import Encoding, ReadArray, TaskTensor, TensorEntry, Use, register
from .exact import EXPONENT, TALL_ENCODINGS, Original, by_ranges, in_runs, rebuild_exact, runs, spans
from .tall import check_merged_arrays, check_ones


def derive_mask(theta: torch.Tensor, base: torch.Tensor, merged: torch.Tensor, lam: float) -> torch.Tensor:
    """``|tau_t| > lambda * |tau_MTL - tau_t|`` with ``tau_t = f32(theta) - f32(base)``, as the
    packer computed it (element by element, so the same bits whatever the blocking).

    >>> derive_mask(torch.tensor([1.0, 0.1]), torch.zeros(2), torch.tensor([1.0, 2.0]), 0.4)
    tensor([ True, False])
    """
    return mask_and_ones(theta, base, merged, lam)[0]


def mask_and_ones(theta: torch.Tensor, base: torch.Tensor, merged: torch.Tensor, lam: float
                  ) -> tuple[torch.Tensor, int | None]:
    """:func:`derive_mask`, and its set bits where the compiled pass counted them (None: not)."""
    kind = compiled_kind(base, [theta])
    if kind is not None and merged.dtype == torch.float32 and merged.device.type == "cpu" \
            and merged.is_contiguous() and base.numel() == theta.numel() == merged.numel():
        # one compiled pass, the task vector never written to memory: the packer's own loop
        # (``encodings.tall._straight``), the same bits
        mask = torch.empty(theta.shape, dtype=torch.bool)
        ones = kernels.tall_mask_tv(elements(theta.reshape(-1)), elements(base.reshape(-1)), kind,
                                    merged.reshape(-1).numpy(), lam, mask.view(torch.uint8).reshape(-1).numpy())
        if ones is not None:
            return mask, ones
    tau = task_vector(theta.reshape(-1), base.reshape(-1))
    return tall_mask(tau, merged.reshape(-1).to(torch.float32), lam).reshape(theta.shape), None


#: The encoding of a tensor whose merged vector is derived too (``encodings/derived_merged.py``).
DERIVED_MERGED = "tall-derived-merged"


@dataclass(frozen=True, eq=False)
class DerivedMerged:
    """Where a tensor's merged vector (``key`` "merged") or a merge-method array (``"counts"``)
    comes from when it is derived, not stored: the reader (``Archive.read_array``) computes it
    from every task's original (``derived_merged.rebuild_merged``) and caches it."""

    entry: TensorEntry
    key: str


def merged_source(entry: TensorEntry, key: str = "merged") -> "ArrayRef | DerivedMerged | None":
    """Where the tensor's merged vector (or a merge-method array, ``key``) is: the stored array,
    or, for a ``tall-derived-merged`` tensor, a :class:`DerivedMerged` that ``read_array`` derives;
    None where there is neither. Every consumer of the merged vector reads it through this, as
    ``read(merged_source(e), ...)``.

    >>> tau = fam.read_array(merged_source(entry), "tensor 'w' (merged)", Use.SHARED_INPUT)
    """
    if any(tt.encoding == DERIVED_MERGED for tt in entry.tasks.values()):
        return DerivedMerged(entry, key)
    return entry.arrays.get(key)


def has_mask(tt: TaskTensor) -> bool:
    """Whether a task entry has a TALL mask, stored (``tall``) or derived (``tall-derived``)."""
    return tt.encoding in TALL_ENCODINGS


def task_mask(read: ReadArray, entry: TensorEntry, tt: TaskTensor, where: str) -> torch.Tensor:
    """A task's TALL mask of one tensor: the stored one, or the one derived from the exact original
    (whose hash is checked first, and the derived mask's set bits against ``ones``).

    >>> m = task_mask(fam.read_array, entry, entry.tasks["cars"], "tensor 'w', task 'cars'")
    """
    if tt.encoding == "tall":
        return read(tt.arrays["mask"], where + " (mask)", Use.INPUT)
    if tt.encoding not in ("tall-derived", DERIVED_MERGED):
        raise FormatError(f"{where}: a {tt.encoding!r} entry has no mask")
    base = read(entry.arrays["base"], where + " (base)", Use.SHARED_INPUT)
    merged = read(merged_source(entry), where + " (merged)", Use.SHARED_INPUT)
    return _derived(read, entry, tt, base.cpu(), merged.cpu(), where)


def _derived(read: ReadArray, entry: TensorEntry, tt: TaskTensor, base: torch.Tensor, merged: torch.Tensor,
             where: str) -> torch.Tensor:
    """The mask of a ``tall-derived`` entry: the original first (its hash checked), then the mask,
    its set bits checked against ``ones``."""
    return checked_mask(rebuild_exact(read, entry, tt, where), base, merged, tt, where)


def checked_mask(theta: torch.Tensor, base: torch.Tensor, merged: torch.Tensor, tt: TaskTensor,
                 where: str) -> torch.Tensor:
    """The mask a ``tall-derived`` entry derives from its original ``theta`` (checked against its
    hash already), its set bits checked against ``ones``: ``verify`` checks the masks of the
    originals it rebuilt for their files' hashes with it, rather than rebuilding them again.

    >>> checked_mask(fam.get_tensor("cars", "w", exact=True), base, merged, entry.tasks["cars"], "w")
    """
    mask, counted = mask_and_ones(theta, base, merged, tt.params["lambda"])
    check_set_bits(int(torch.count_nonzero(mask)) if counted is None else counted, tt, where)
    return mask


def check_set_bits(ones: int, tt: TaskTensor, where: str) -> None:
    """Raise IntegrityError where a derived mask's set bits are not the entry's ``ones``."""
    if ones != tt.params["ones"]:
        raise IntegrityError(f"{where}: the derived mask has {ones} set bits, the manifest says {tt.params['ones']}")


def rebuild_in_runs(read: ReadArray, entry: TensorEntry, tt: TaskTensor, where: str) -> torch.Tensor | None:
    """The lossy rebuild of a large ``tall-derived`` or ``tall-derived-merged`` task entry
    (``exact.in_runs``) with only its merged vector read whole (shared: stored, or derived a run at
    a time and kept by the cache), the base and the residual a run at a time; None for an entry
    rebuilt whole. The same bits and errors as ``TallDerived.rebuild`` on the arrays read whole.

    >>> t = rebuild_in_runs(fam.read_array, entry, entry.tasks["cars"], "task 'cars', tensor 'w'")
    """
    if tt.encoding not in ("tall-derived", DERIVED_MERGED) or not in_runs(read, entry, [tt]):
        return None
    merged = read(merged_source(entry), where + " (merged)", Use.SHARED_INPUT).cpu()
    return _in_runs(read, entry, tt, None, merged, where)


def _in_runs(read: ReadArray, entry: TensorEntry, tt: TaskTensor, base: torch.Tensor | None, merged: torch.Tensor,
             where: str) -> torch.Tensor:
    """``TallDerived.rebuild`` of a large tensor (``exact.in_runs``) a run at a time, from its base
    at hand (None: read a run at a time) and merged vector: each run of the original
    (``exact.Original``), of its mask and of the rebuild straight into the output (element by
    element: the whole tensor's bits), not the original, the mask and float32 copies of the whole
    tensor; the hash checked after the last run, then the mask's set bits, as :func:`_derived`."""
    original = Original(read, entry, tt, where)
    out = torch.empty(tt.shape, dtype=original.dtype)
    flat, merged = out.view(-1), merged.reshape(-1)
    whole = None if base is None else base.reshape(-1)
    ones = 0
    refs = original.refs  # with the base where read a run at a time (a remote archive fetches them together)
    if whole is None and not any(r is entry.arrays["base"] for r in refs):
        refs = [*refs, entry.arrays["base"]]
    for a, b in runs(read, refs, where):
        part = whole[a:b] if whole is not None else read(entry.arrays["base"], where + " (base)", Use.INPUT,
                                                           start=a, stop=b).reshape(-1)  # (one run: its shape)
        theta = original.tensor(original.run(a, b, part))
        mask, counted = mask_and_ones(theta, part, merged[a:b], tt.params["lambda"])
        ones += int(torch.count_nonzero(mask)) if counted is None else counted
        flat[a:b] = reconstruct(part.to(torch.float32), mask, merged[a:b], original.dtype)
        del part, theta, mask
    original.check()
    check_set_bits(ones, tt, where)
    return out


def rows_of(read: ReadArray, entry: TensorEntry, tt: TaskTensor, where: str, start: int, stop: int,
            merged: torch.Tensor | None = None) -> torch.Tensor | None:
    """Elements ``[start, stop)`` of the lossy rebuild of a ``tall-derived`` task entry, or of a
    ``tall-derived-merged`` one whose tau_MTL is at hand (``merged``, flat: the reader's cache), from
    the chunks that hold them (``exact.spans``): each run of the original, of its mask and of the
    rebuild, as :func:`_in_runs`, the same bits. Each chunk is checked against its checksum; the
    original's hash and the mask's set bits cover every element, so a part is not checked against
    them (whole reads and ``verify`` are). None where it is not read by ranges (``exact.by_ranges``)."""
    source = merged_source(entry) if merged is None else None
    if tt.encoding not in TALL_ENCODINGS[1:] or not by_ranges(read, entry, [tt]) or (
            merged is None and not isinstance(source, ArrayRef)) or not 0 <= start <= stop <= tt.extras["exact"].residual.numel:
        return None
    original = Original(read, entry, tt, where)
    out = torch.empty(stop - start, dtype=original.dtype)
    base_ref, lam = entry.arrays["base"], tt.params["lambda"]
    refs = [*original.refs, *([] if any(r is base_ref for r in original.refs) else [base_ref]),
            *([source] if isinstance(source, ArrayRef) else [])]
    for a, b, lo, hi in spans(read, refs, start, stop, where):
        base = read(base_ref, where + " (base)", Use.INPUT, start=a, stop=b).reshape(-1)
        tau = (merged[a:b] if merged is not None
               else read(source, where + " (merged)", Use.INPUT, start=a, stop=b).reshape(-1))
        theta = original.tensor(original.run(a, b, base))
        mask = mask_and_ones(theta, base, tau, lam)[0]
        out[lo - start : hi - start] = reconstruct(base.to(torch.float32), mask, tau, original.dtype)[lo - a : hi - a]
        del base, tau, theta, mask
    return out


def check_derived_entry(tt: TaskTensor, where: str) -> None:
    """The fields of a task entry whose mask is derived: a floating dtype, lambda, the exact field."""
    if tt.dtype not in EXPONENT:
        raise FormatError(f"{where}: a {tt.encoding} entry needs a floating dtype")
    lam = tt.params.get("lambda")
    if not (type(lam) is int or type(lam) is float) or not math.isfinite(lam) or lam < 0:
        raise FormatError(f"{where}: bad lambda {lam!r}")
    if "exact" not in tt.extras:  # exact.Exact.from_dict checks its reference is base or zero
        raise FormatError(f"{where}: a {tt.encoding} entry needs its exact field")


@register
class TallDerived(Encoding):
    name = "tall-derived"
    kind = None  # written by the exact tier (exact.add_exact) in place of a ``tall`` entry
    task_params = ("ones", "lambda")
    entry_arrays: ClassVar[tuple[str, ...]] = ("base", "merged")

    @classmethod
    def validate(cls, entry: TensorEntry, tt: TaskTensor, where: str) -> None:
        check_derived_entry(tt, where)
        check_ones(tt, where)

    @classmethod
    def validate_tensor(cls, entry: TensorEntry, tt: TaskTensor, where: str) -> None:
        check_merged_arrays(entry, tt, where)

    @classmethod
    def inputs(cls, entry: TensorEntry, tt: TaskTensor) -> dict[str, tuple[ArrayRef | DerivedMerged, Use]]:
        return {"base": (entry.arrays["base"], Use.SHARED_INPUT), "merged": (entry.arrays["merged"], Use.SHARED_INPUT),
                "exact/residual": (tt.extras["exact"].residual, Use.INPUT)}

    @classmethod
    def rebuild(cls, arrays: Mapping[str, torch.Tensor], entry: TensorEntry, tt: TaskTensor) -> torch.Tensor:
        device = arrays["base"].device
        cpu = {k: v.cpu() for k, v in arrays.items()}
        by_ref = {id(ref): cpu[k] for k, (ref, _) in cls.inputs(entry, tt).items()}
        read: ReadArray = lambda ref, where, use=Use.OUTPUT, *, start=0, stop=None: (  # noqa: E731
            by_ref[id(ref)] if (start, stop) == (0, None) else by_ref[id(ref)].reshape(-1)[start:stop])
        where = f"tensor {entry.name!r}"
        if in_runs(read, entry, [tt]):
            out = _in_runs(read, entry, tt, cpu["base"], cpu["merged"], where)
        else:
            # the mask from the base as stored: of the original's dtype, the compiled pass takes them
            mask = _derived(read, entry, tt, cpu["base"], cpu["merged"], where)
            out = reconstruct(cpu["base"].to(torch.float32), mask, cpu["merged"], torch_dtype(tt.dtype))
        return out if device.type == "cpu" else out.to(device)
