"""``tall-derived-merged``: a tensor of the exact tier whose merged vector is not stored either
(spec §6.1.9, format 1.8).

Where every task of a merged tensor is ``tall-derived`` (its original comes back from the base or
zero and its residual alone), tau_MTL is a function of the originals: :func:`derive_merged`, the
merge method's formula written element by element in float32, with the tasks in the manifest's
order. The writer checks, block by block, that this gives the bits the packer stored (and the
method's extra arrays, TIES ``counts``), and only then leaves them out: every task entry of the
tensor becomes ``tall-derived-merged`` (the ``tall-derived`` fields) and the tensor entry keeps only
``base``. A reader that does not know the encoding fails on those tensors alone (spec §8).

A lossy read of one task rebuilds every task's original of the tensor (each hash-checked), derives
tau_MTL (cached with the base, :class:`DerivedMerged`), then the task's mask as for ``tall-derived``.
A tensor of more than ``exact.RUNS_FROM`` elements is derived a run of chunks at a time from every
task's run of its original: tau_MTL and a run of each original held, not every original whole.
Where the reader's cache would not keep tau_MTL (``cache_bytes=0``, the CLI's ``unpack --task``),
its lossy read derives each run of it beside the task's output (:func:`task_in_runs`): never whole.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from .. import kernels
from .._torch import torch
from ..arrays import ArrayRef
from ..dtypes import tensor_to_bytes, torch_dtype
from ..errors import FormatError
from ..merging import MergeMethod, derive_merged, no_derived_merged
from ..tall import compiled_kind, elements, reconstruct, task_vector
from .base import ReadArray, TaskTensor, TensorEntry, Use, register
from .derived import (DERIVED_MERGED, DerivedMerged, TallDerived, check_derived_entry, check_set_bits, checked_mask,
                      mask_and_ones, merged_source)
from .exact import Original, by_ranges, in_runs, rebuild_exact, runs, spans
from .tall import COMPUTE_ELEMENTS


def rebuild_merged(read: ReadArray, entry: TensorEntry, order: list[str], method: MergeMethod,
                   where: str) -> dict[str, torch.Tensor]:
    """tau_MTL and the method's extras of a ``tall-derived-merged`` tensor, from every task's
    original (each checked against its hash), the tasks in ``order`` (the manifest's). A tensor
    of more than ``exact.RUNS_FROM`` elements is derived a run at a time (:func:`_derived_in_runs`).

    >>> rebuild_merged(fam.read_array, entry, list(fam.tasks), method, "tensor 'w'")["merged"]
    """
    if in_runs(read, entry, [entry.tasks[t] for t in order]):
        return _derived_in_runs(read, entry, order, method, where)[0]
    base = read(entry.arrays["base"], where + " (base)", Use.SHARED_INPUT)
    thetas = [rebuild_exact(read, entry, entry.tasks[t], f"{where}, task {t!r}") for t in order]
    return merged_from(base, thetas, method, where)


def _derived_in_runs(read: ReadArray, entry: TensorEntry, order: list[str], method: MergeMethod, where: str,
                     masks: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, tuple[torch.Tensor, int]]]:
    """:func:`rebuild_merged` a run of the residuals' chunks at a time (:func:`_each_run`), the
    run's arrays kept whole. Holds the arrays and a run of each original, not every original whole.
    With ``masks``, also every task's mask (of the base as stored, as ``task_masks``) and its set
    bits, from the same runs."""
    n, shape = entry.arrays["base"].numel, tuple(entry.arrays["base"].shape)
    out: dict[str, torch.Tensor] = {}
    held = {t: (torch.empty(shape, dtype=torch.bool), 0) for t in order} if masks else {}
    lams = [entry.tasks[t].params["lambda"] for t in order]

    def each(a: int, b: int, base: torch.Tensor, thetas: list[torch.Tensor], part: dict[str, torch.Tensor]) -> None:
        for k, v in part.items():
            out.setdefault(k, torch.empty(n, dtype=v.dtype))[a:b] = v
        if masks:
            for t, x, lam in zip(order, thetas, lams):
                mask, ones = held[t]
                bits, counted = mask_and_ones(x, base, part["merged"], lam)
                mask.view(-1)[a:b] = bits
                held[t] = mask, ones + (int(torch.count_nonzero(bits)) if counted is None else counted)
    _each_run(read, entry, order, method, where, each)
    return {k: v.reshape(shape) for k, v in out.items()}, held


def _each_run(read: ReadArray, entry: TensorEntry, order: list[str], method: MergeMethod, where: str,
              each: Callable[[int, int, torch.Tensor, list[torch.Tensor], dict[str, torch.Tensor]], None],
              threads: int = 1, span: tuple[int, int] | None = None) -> None:
    """Every run ``[a, b)`` of the residuals' chunks (``exact.runs``): the base's run, every task's
    run of its original (``exact.Original``, hashed as it comes, in ``order``; the tasks' on up to
    ``threads`` threads) and the run's arrays from :func:`merged_from` (element by element: the
    whole tensor's bits) given to ``each(a, b, base, thetas, arrays)``; every hash checked after
    the last run, in ``order``. With ``span`` (elements ``[start, stop)``), only the runs that
    hold them (``exact.spans``), and no hash checked (they cover every element)."""
    base_ref = entry.arrays["base"]
    originals = [Original(read, entry, entry.tasks[t], f"{where}, task {t!r}") for t in order]
    refs = [o.ex.residual for o in originals] + [base_ref]
    cuts = (runs(read, refs, where) if span is None
            else ((a, b) for a, b, _, _ in spans(read, refs, span[0], span[1], where)))
    for a, b in cuts:
        base = read(base_ref, where + " (base)", Use.INPUT, start=a, stop=b).reshape(-1)  # (one run: its shape)
        thetas: list[torch.Tensor] = [base] * len(originals)

        def rebuild(i: int, a: int = a, b: int = b, base: torch.Tensor = base, thetas: list = thetas) -> None:
            thetas[i] = originals[i].tensor(originals[i].run(a, b, base))
        in_tasks(len(originals), threads, rebuild)
        each(a, b, base, thetas, merged_from(base, thetas, method, where))
        del base, thetas
    if span is None:
        for o in originals:
            o.check()


def task_in_runs(read: ReadArray, entry: TensorEntry, order: list[str], method: MergeMethod, where: str,
                 task: str, task_where: str) -> torch.Tensor | None:
    """The lossy rebuild of ``task`` of a large ``tall-derived-merged`` tensor (``exact.in_runs``)
    with tau_MTL never whole: one pass (:func:`_each_run`) derives each run of it from every
    task's run of its original and rebuilds this task's run from its own original of the same
    pass. For a reader whose cache would not keep tau_MTL: holds the output and a run of each
    original. The same bits and errors as ``derived.rebuild_in_runs`` on tau_MTL derived whole
    (``where`` the derivation's, ``task_where`` the task's: its mask's set bits); None where the
    tensor is not derived in runs.

    >>> t = task_in_runs(fam.read_array, entry, order, method, "tensor 'w'", "cars", "task 'cars', tensor 'w'")
    """
    tt = entry.tasks[task]
    if not in_runs(read, entry, [entry.tasks[t] for t in order]) or not in_runs(read, entry, [tt]):
        return None
    i, lam = order.index(task), tt.params["lambda"]
    out = torch.empty(tt.shape, dtype=torch_dtype(tt.dtype))
    flat, ones = out.view(-1), 0

    def each(a: int, b: int, base: torch.Tensor, thetas: list[torch.Tensor], part: dict[str, torch.Tensor]) -> None:
        nonlocal ones
        merged = part["merged"].reshape(-1)
        mask, counted = mask_and_ones(thetas[i], base, merged, lam)
        ones += int(torch.count_nonzero(mask)) if counted is None else counted
        flat[a:b] = reconstruct(base.to(torch.float32), mask, merged, out.dtype)
    _each_run(read, entry, order, method, where, each)
    check_set_bits(ones, tt, task_where)
    return out


def task_rows(read: ReadArray, entry: TensorEntry, order: list[str], method: MergeMethod, where: str,
              task: str, start: int, stop: int, keep: Callable[[int, int, torch.Tensor], None] | None = None
              ) -> torch.Tensor | None:
    """Elements ``[start, stop)`` of the lossy rebuild of ``task`` of a ``tall-derived-merged``
    tensor (rows of it: ``get_slice``), from the chunks that hold them: each run of tau_MTL derived
    from every task's run of its original, as :func:`task_in_runs`, the same bits. Each chunk is
    checked against its checksum; the originals' hashes and the mask's set bits cover every
    element, so a part is not checked against them (whole reads and ``verify`` are). None where
    the tensor is not read by ranges (``exact.by_ranges``). ``keep(a, b, merged)``, if given, is
    handed each run ``[a, b)`` of tau_MTL derived on the way (flat; the reader keeps them)."""
    tt = entry.tasks[task]
    if not by_ranges(read, entry, [entry.tasks[t] for t in order]) or not 0 <= start <= stop <= entry.arrays["base"].numel:
        return None
    i, lam = order.index(task), tt.params["lambda"]
    out = torch.empty(stop - start, dtype=torch_dtype(tt.dtype))

    def each(a: int, b: int, base: torch.Tensor, thetas: list[torch.Tensor], part: dict[str, torch.Tensor]) -> None:
        lo, hi = max(a, start), min(b, stop)
        merged = part["merged"].reshape(-1)
        if keep is not None:
            keep(a, b, merged)
        mask = mask_and_ones(thetas[i], base, merged, lam)[0]
        out[lo - start : hi - start] = reconstruct(base.to(torch.float32), mask, merged, out.dtype)[lo - a : hi - a]
    if stop > start:
        _each_run(read, entry, order, method, where, each, span=(start, stop))
    return out


def in_tasks(count: int, threads: int, fn: Callable[[int], None]) -> None:
    """``fn(i)`` for each task ``i`` below ``count``, on up to ``threads`` threads (the first on
    this one; the compiled loops they call then run on their thread alone); one: this thread alone."""
    if threads <= 1 or count <= 1:
        for i in range(count):
            fn(i)
        return

    def part(first: int, end: int) -> None:
        with kernels.as_worker():
            for i in range(first, end):
                fn(i)
    kernels.in_parts(count, threads, part)


def checked_in_runs(read: ReadArray, entry: TensorEntry, order: list[str], method: MergeMethod, where: str,
                    feed: Callable[[str, memoryview], None], threads: int = 1) -> dict[str, int]:
    """Every task's original of a large ``tall-derived-merged`` tensor (``exact.in_runs``) rebuilt
    once, a run at a time, for ``verify``: each run's bytes given to ``feed(task, data)`` (its
    file's hash), the merged vector derived from the runs (never whole) and each task's mask's set
    bits counted from them; each original's hash checked after the last run (IntegrityError). The
    tasks' runs on up to ``threads`` threads (``feed`` is called from them, each task's in order).
    Returns each task's set bits, for the caller to compare with ``ones``.

    >>> ones = checked_in_runs(fam.read_array, entry, list(entry.tasks), method, "tensor 'w'", feed)
    """
    ones = dict.fromkeys(order, 0)
    lams = [entry.tasks[t].params["lambda"] for t in order]

    def each(a: int, b: int, base: torch.Tensor, thetas: list[torch.Tensor], part: dict[str, torch.Tensor]) -> None:
        def one(i: int) -> None:
            feed(order[i], tensor_to_bytes(thetas[i]))
            mask, counted = mask_and_ones(thetas[i], base, part["merged"], lams[i])
            ones[order[i]] += int(torch.count_nonzero(mask)) if counted is None else counted
        in_tasks(len(order), threads, one)
    _each_run(read, entry, order, method, where, each, threads)
    return ones


def merged_from(base: torch.Tensor, thetas: list[torch.Tensor], method: MergeMethod, where: str
                ) -> dict[str, torch.Tensor]:
    """:func:`rebuild_merged` from the originals at hand (``verify`` has them from checking the
    files' hashes): every task's, in the manifest's order, each of the base's shape."""
    shape, base = base.shape, base.reshape(-1)
    thetas = [x.reshape(-1) for x in thetas]
    out = _straight(base, thetas, method)
    if out is not None:
        return {k: v.reshape(shape) for k, v in out.items()}
    out = {}
    # element by element, so in blocks: T float32 task vectors of one block at a time, as the packer
    for a in range(0, base.numel(), COMPUTE_ELEMENTS):
        b = base[a : a + COMPUTE_ELEMENTS]
        part = derive_merged([task_vector(x[a : a + COMPUTE_ELEMENTS], b) for x in thetas], method)
        if part is None:
            raise FormatError(f"{where}: {no_derived_merged(method)}")
        for k, v in part.items():
            out.setdefault(k, torch.empty(base.numel(), dtype=v.dtype))[a : a + v.numel()] = v
    if not out:  # an empty tensor
        empty = derive_merged([torch.empty(0, dtype=torch.float32) for _ in thetas], method)
        if empty is None:
            raise FormatError(f"{where}: {no_derived_merged(method)}")
        out = empty
    return {k: v.reshape(shape) for k, v in out.items()}


def _straight(base: torch.Tensor, thetas: list[torch.Tensor], method: MergeMethod) -> dict[str, torch.Tensor] | None:
    """:func:`merged_from`'s arrays (flat) in one compiled pass over the originals, the task
    vectors never written to memory: the method's ``combine_inputs``, the packer's own loops (the
    same bits as ``derive_merged``). None where they do not apply (no compiled loops, another
    dtype, an empty tensor, a method the spec does not derive: the caller's blocks say why)."""
    kind = compiled_kind(base, thetas)
    if kind is None or not method.straight or not thetas or base.numel() == 0:
        return None
    # its arrays and their dtypes: float32 task vectors, whatever torch's default dtype (the compiled loops take no other)
    arrays = derive_merged([torch.empty(0, dtype=torch.float32) for _ in thetas], method)
    if arrays is None:
        return None
    out = {k: torch.empty(base.numel(), dtype=v.dtype) for k, v in arrays.items()}
    method.combine_inputs(elements(base), [elements(x) for x in thetas], kind, out["merged"].numpy(),
                          {k: v.numpy() for k, v in out.items() if k != "merged"}, kernels.default_threads())
    return out


def task_masks(read: ReadArray, entry: TensorEntry, order: list[str], method: MergeMethod, where: str
               ) -> tuple[torch.Tensor, Iterator[tuple[str, torch.Tensor]]]:
    """A ``tall-derived-merged`` tensor's merged vector, and every task's mask in ``order`` (the
    manifest's) one at a time, each original rebuilt once (checked against its hash) for both
    (``task_mask`` of each task rebuilds it again after the merged vector's derivation), each mask's
    set bits checked against ``ones``. Holds the tensor's originals until their masks are taken;
    a tensor of more than ``exact.RUNS_FROM`` elements, every mask (from runs of the originals).

    >>> merged, masks = task_masks(fam.read_array, entry, list(fam.tasks), method, "tensor 'w'")
    """
    if in_runs(read, entry, [entry.tasks[t] for t in order]):
        derived, held = _derived_in_runs(read, entry, order, method, where, masks=True)

        def checked() -> Iterator[tuple[str, torch.Tensor]]:
            for t in order:
                mask, ones = held.pop(t)
                check_set_bits(ones, entry.tasks[t], f"{where}, task {t!r}")
                yield t, mask
        return derived["merged"], checked()
    base = read(entry.arrays["base"], where + " (base)", Use.SHARED_INPUT).cpu()
    thetas = {t: rebuild_exact(read, entry, entry.tasks[t], f"{where}, task {t!r}") for t in order}
    merged = merged_from(base, list(thetas.values()), method, where)["merged"]

    def masks() -> Iterator[tuple[str, torch.Tensor]]:
        for t in order:
            yield t, checked_mask(thetas.pop(t), base, merged, entry.tasks[t], f"{where}, task {t!r}")
    return merged, masks()


@register
class TallDerivedMerged(TallDerived):
    name = DERIVED_MERGED
    kind = None  # written by the exact tier (exact.add_exact) in place of every ``tall-derived`` entry
    entry_arrays = ("base",)

    @classmethod
    def validate(cls, entry: TensorEntry, tt: TaskTensor, where: str) -> None:
        check_derived_entry(tt, where)
        if any(v.encoding != DERIVED_MERGED for v in entry.tasks.values()):
            raise FormatError(f"{where}: every task of a tall-derived-merged tensor must be tall-derived-merged")
        stored = [k for k in entry.arrays if k != "base"]
        if stored:
            raise FormatError(f"{where}: a tall-derived-merged tensor stores no {', '.join(stored)}")
        base = entry.arrays.get("base")
        if base is None or base.shape != tt.shape:
            raise FormatError(f"{where}: a tall-derived-merged tensor needs a base of the task's shape")
        ones = tt.params.get("ones")
        if type(ones) is not int or not 0 <= ones <= base.numel:
            raise FormatError(f"{where}: bad count of set mask bits {ones!r}")

    @classmethod
    def validate_tensor(cls, entry: TensorEntry, tt: TaskTensor, where: str) -> None:
        """Nothing more: ``validate`` checks the tensor entry (no merged vector) for every task."""

    @classmethod
    def inputs(cls, entry: TensorEntry, tt: TaskTensor) -> dict[str, tuple[ArrayRef | DerivedMerged, Use]]:
        return {"base": (entry.arrays["base"], Use.SHARED_INPUT),
                "merged": (merged_source(entry), Use.SHARED_INPUT),  # a DerivedMerged
                "exact/residual": (tt.extras["exact"].residual, Use.INPUT)}


__all__ = ["TallDerivedMerged", "checked_in_runs", "merged_from", "rebuild_merged", "task_in_runs", "task_masks"]
