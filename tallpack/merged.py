"""Merged (multi-task) models built from an archive alone: TA, TIES and Consensus Merging.

``theta_0 + alpha * d`` for every tensor all tasks share, with d given by the merge method the
archive was packed with (:mod:`tallpack.merging`), and the base-only tensors the archive keeps as
they are. The alpha-independent parts are read once.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from functools import partial
from typing import Any, Literal, Protocol, overload

from ._torch import cpu_default, torch
from .arrays import ArrayRef
from .dtypes import torch_dtype
from .elements import FLOAT_BITS, holds, itemsize, numel
from .encodings import TensorEntry, Use, encoding_for
from .encodings.base import ReadArray, split_parts
from .encodings.derived import DerivedMerged, merged_source, task_mask
from .encodings.derived_merged import task_masks as derived_merged_masks
from .encodings.exact import TALL_ENCODINGS
from .encodings.qtau import task_masks
from .errors import FormatError, InvalidArgumentError, TallpackError, UnsupportedVersionError, memory_named
from .folders import component_of
from . import kernels
from .kernels import IN_NOT_FINITE, OUT_NOT_FINITE, in_parts
from .manifest import Manifest
from .merging import (MERGED_MODELS, METHODS, MergeMethod, apply_direction, check_alpha, consensus_mask, default_alpha,
                      fusable_dtype, fused_merge, integer, is_consensus, merge_direction, merged_model_method,
                      missing_statistics)
from .tall import tall_mask, task_vector


#: The task encodings of a tensor that the merged models build from its base and merged vector
#: (spec §3.3: an entry's ``kind`` is informative; what is stored follows its tasks' encodings).
MERGED_ENCODINGS = frozenset((*TALL_ENCODINGS, "qtau"))

log = logging.getLogger(__name__)

#: per open archive, the merged models whose left-out tensors were said: once each, not at every
#: ``merged()`` call (a server building merged models over and over)
_SAID: "weakref.WeakKeyDictionary[Any, set[tuple[str, str, int]]]" = weakref.WeakKeyDictionary()


class Family(Protocol):
    """What merged models need of an open archive (:class:`tallpack.Archive` is one)."""

    name: str
    manifest: Manifest

    def read_array(self, ref: ArrayRef | DerivedMerged, where: str, use: Use = Use.OUTPUT, *, start: int = 0,
                   stop: int | None = None) -> torch.Tensor: ...

    def keys(self, task: str) -> list[str]: ...

    def get_tensor(self, task: str, name: str) -> torch.Tensor: ...

    def tensor_spec(self, task: str, name: str) -> tuple[str, tuple[int, ...]]: ...


def _how_merged(entry: TensorEntry) -> str | None:
    """How a merged model builds a tensor: ``"merged"`` (its encodings all in MERGED_ENCODINGS:
    from its base and merged vector), ``"shared"`` (stored once, for every task), or None: its
    tasks store it as their own, with no base to merge onto."""
    encodings = {tt.encoding for tt in entry.tasks.values()}
    if encodings and encodings <= MERGED_ENCODINGS:
        return "merged"
    return "shared" if encodings == {"shared"} and "data" in entry.arrays else None


def left_out(manifest: Manifest) -> list[str]:
    """The tensors every task has that a merged model leaves out, in the checkpoints' order: the
    ones the tasks store per task (absent from the base, of another shape or dtype than the
    base's, integers that differ between tasks, NaN or inf in a task). The archive holds no base
    of these to merge onto; ``merged(..., task=...)`` takes them from that task.

    >>> left_out(fam.manifest)
    ['classifier.weight', 'classifier.bias']
    """
    tasks = {t.name for t in manifest.tasks}
    names = [n for e in manifest.tensors if tasks and set(e.tasks) == tasks and _how_merged(e) is None
             for n in ([m.name for m in e.members] if e.members else [e.name])]
    order = {name: i for i, name in enumerate(manifest.tasks[0].keys)} if manifest.tasks else {}
    return sorted(_and_aliases(names, manifest), key=lambda n: order.get(n, len(order)))


def _and_aliases(names: list[str], manifest: Manifest) -> list[str]:
    """``names`` with the aliases (spec §3.8) of each: a tied weight's other names are left out of
    a merged model with it (``lm_head.weight`` with ``wte.weight``), and a model needs them too."""
    have = set(names)
    return names + [a for a, t in manifest.aliases.items() if t in have and a not in have]


def _overflowed(out: torch.Tensor, theta_0: torch.Tensor, d: torch.Tensor) -> bool:
    """Whether ``out = theta_0 + alpha * d`` went past its dtype's range: not finite where base and
    direction are (``out`` checked first: one pass over a tensor that did not overflow)."""
    return theta_0.is_floating_point() and not _finite(out) and _finite(theta_0) and _finite(d)


def _finite(t: torch.Tensor) -> bool:
    """Whether every value of ``t`` is finite (float8 through float32: torch has no ``isfinite``
    for ``float8_e4m3fn``)."""
    if t.numel() == 0:
        return True
    x = t.float() if t.element_size() == 1 else t
    try:
        lo, hi = torch.aminmax(x)  # NaN propagates; ~100x isfinite().all()
    except RuntimeError:  # torch 2.1 and 2.2 have no aminmax for float16 on the CPU
        return bool(torch.isfinite(x).all())
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))


def in_some_tasks(manifest: Manifest) -> list[str]:
    """The tensors that some tasks have and others lack, in the checkpoints' order (a causal LM's
    ``lm_head.weight`` in a family with a classifier task; one task's own head). A merged model
    leaves them out: the archive stores them per task, with no base to merge onto; ``merged(...,
    task=...)`` takes that task's.

    >>> in_some_tasks(fam.manifest)
    ['lm_head.weight', 'score.weight']
    """
    tasks = {t.name for t in manifest.tasks}
    names = set(_and_aliases([n for e in manifest.tensors if e.tasks and set(e.tasks) < tasks
                              for n in ([m.name for m in e.members] if e.members else [e.name])], manifest))
    order: dict[str, int] = {}
    for t in manifest.tasks:
        for name in t.keys:
            order.setdefault(name, len(order))
    return sorted(names, key=lambda n: order.get(n, len(order)))


def missing_components(manifest: Manifest) -> dict[str, list[str]]:
    """The components of the base's diffusers pipeline (spec §3.6) that a merged model (without
    ``task``) has no tensor of, each with the tasks that have it: only some tasks have it (stored
    per task, with no copy of the base's to merge onto), or none (base-only, not kept). The base's
    ``model_index.json`` lists them, so the pipeline folder written does not load without them.
    The same of a sentence-transformers base's module folders (``2_Dense``, ``modules.json``).

    >>> missing_components(fam.manifest)  # task 'sketch' packed from a pipeline without a vae
    {'vae': ['photo', 'anime']}
    """
    components = manifest.base.get("components")
    if not isinstance(components, dict):
        return {}
    tasks = {t.name for t in manifest.tasks}
    merged: set[str] = set()
    having: dict[str, set[str]] = {}
    for e in manifest.tensors:
        inside = (not e.tasks and "base" in e.arrays) or (set(e.tasks) == tasks and _how_merged(e) is not None)
        for n in ([m.name for m in e.members] if e.members else [e.name]):
            c = component_of(n, components)
            having.setdefault(c, set()).update(e.tasks)
            if inside:
                merged.add(c)
    order = [t.name for t in manifest.tasks]
    return {c: [t for t in order if t in having.get(c, ())] for c in components if c not in merged}


def base_not_held(manifest: Manifest) -> int:
    """Bytes of the base's tensors that the archive holds no copy of, from the base's recorded size:
    its base-only tensors when packed without ``keep_base_only`` (the format records neither their
    names nor their sizes), or the base's own version of a tensor the tasks store per task, where
    it is larger than every task's. An estimate from below (a tensor only tasks have counts as
    held): 0 when it holds them all, or cannot tell (the base's size not recorded).

    >>> base_not_held(fam.manifest)  # an untied base's lm_head.weight, the tasks tied
    12800
    """
    total = manifest.base.get("bytes")
    if type(total) is not int:
        return 0
    held = 0
    for e in manifest.tensors:
        if "base" in e.arrays:
            held += e.arrays["base"].nbytes
        elif e.tasks:  # shared or task-own: the base's copy, where it has one, counted at the largest task's size
            elements = sum(m.numel for m in e.members) if e.members else None
            held += max(itemsize(tt.dtype) * (numel(tt.shape) if elements is None else elements)
                        for tt in e.tasks.values())
    return max(0, total - held)


#: Consensus Merging's k when none is given (the paper's default: weights at least two tasks use)
DEFAULT_K = 2


def default_model(manifest: Manifest) -> str:
    """The merged model to build when none is named: Consensus Merging on the archive's own
    merged vector (``consensus-ta`` or ``consensus-ties``), the paper's recommendation."""
    method = manifest.merge.get("method") if isinstance(manifest.merge, dict) else None
    model = f"consensus-{method}"
    return model if MERGED_MODELS.get(model) == method else "consensus-ta"


#: A merged tensor of more elements than this, whose arrays are all stored and elementwise (base,
#: merged vector, stored masks, TIES' counts; not a group, the dial's, or one derived from the exact
#: originals), is built by a lazy merged model (``write_merged``, ``Archive.merged``) RUN_ELEMENTS at
#: a time straight into its output, allocated once in its dtype: peak memory the output and a run's
#: float32 buffers, not five or six float32 copies of the tensor (12 GB for an 8B model's 1 GB
#: bfloat16 embedding). The same bits: every step is elementwise. 4M elements (a 16 MB float32
#: tensor, one default chunk): a tensor of more than one default chunk is built in runs.
CHUNKED_FROM = 1 << 22
#: The elements of one run (rounded up to a whole number of the arrays' chunks, so that no chunk
#: is decoded twice): 1M, 4 MB float32 buffers.
RUN_ELEMENTS = 1 << 20
#: The most tasks whose masks of a run the compiled loop counts itself (each a byte an element); past
#: it, torch counts them as they come (``consensus_mask``) and the loop takes the one consensus mask.
FUSED_MASKS = 8
#: The most names of left-out tensors a warning lists.
SHOWN_NAMES = 5
#: The most bytes of built tensors a lazy merged model holds for names not indexed yet (a group's
#: other members, a tied tensor's other names), over the most recent one (as a lazy state dict's).
HELD_BYTES = 32 << 20


def shared_direction(model: str, base: torch.Tensor, data: torch.Tensor, tasks: tuple[str, ...],
                     lambdas: dict[str, float | None], k: int, method: MergeMethod, where: str = "") -> torch.Tensor:
    """d of a tensor every task changed to the same ``data``: the merge of T equal task vectors
    ``f32(data) - f32(base)``, with the masks and TIES trimming of §6.2, as if stored merged."""
    missing = missing_statistics(method)
    if missing:  # TIES' statistics, which the trimming needs (an archive whose writer left them out)
        raise FormatError(f"{where}: merge: {method.name} {' and '.join(missing)} missing from the manifest's "
                          "merge parameters, which a tensor every task changed alike needs (spec §6.1.3)")
    tau = task_vector(data, base).reshape(-1)
    taus = [tau] * len(tasks)
    mtl = method.combine(taus)
    masks = None
    if is_consensus(model):
        masks = []
        for t in tasks:
            lam = lambdas.get(t)
            if lam is None:
                raise FormatError(f"{where}: task {t!r} has no lambda, which its consensus mask needs")
            masks.append(tall_mask(tau, mtl, lam))
    extras = method.extras(taus) if not is_consensus(model) else None
    return merge_direction(model, mtl, masks, extras, k, method).reshape(base.shape)


def _derived_merged_masks(read: ReadArray, entry: TensorEntry, order: tuple[str, ...], method: MergeMethod,
                          name: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """tau_MTL of a ``tall-derived-merged`` tensor of archive ``name`` and every task's mask (in
    ``entry.tasks``' order), each original rebuilt once (checked against its hash), the derivation
    in ``order`` (the manifest's): the bits ``read(merged_source(entry))`` and ``task_mask`` give."""
    try:
        tau, pairs = derived_merged_masks(read, entry, list(order), method, f"tensor {entry.name!r}")
        by_task = dict(pairs)
        return tau, [by_task[t] for t in entry.tasks]
    except TallpackError as e:  # the reads name the archive; the hashes and the derivation do not
        if str(e).startswith(f"{name}: "):
            raise
        raise type(e)(f"{name}: {e}") from None


def _reads_every_array(entry: TensorEntry, consensus: bool) -> bool:
    """Whether a merged model reads every array of a merged tensor, so that fetching them all at
    once wastes nothing. A consensus model reads the masks (derived ones from the exact residuals),
    not what a ``tall`` entry stores beside its mask (the exact tier's residual, the dial's
    correction); a plain one reads no mask, only the residuals that derive its merged vector (format 1.8)."""
    encodings = {tt.encoding for tt in entry.tasks.values()}
    if not consensus:
        return encodings == {"tall-derived-merged"}
    return not any(tt.encoding == "tall" and ("exact" in tt.extras or "correction" in tt.extras)
                   for tt in entry.tasks.values())


def _with_aliases(merged: dict[str, torch.Tensor], aliases: Mapping[str, str], order: Sequence[str]
                  ) -> dict[str, torch.Tensor]:
    """A merged model with each alias (spec §3.8) of a tensor it has as that same tensor, placed
    where the first task's checkpoint lists it (tied weights stay tied)."""
    out = dict(merged)
    out.update((a, merged[t]) for a, t in aliases.items() if t in merged)
    at = {name: i for i, name in enumerate(order)}
    return dict(sorted(out.items(), key=lambda kv: at.get(kv[0], len(at))))


class MergeParts:
    """Alpha-independent parts of a merged model: for each tensor every task has, theta_0 and the
    direction d (float32), or the stored tensor itself when every task has it unchanged.

    Base-only tensors the archive keeps (``keep_base_only``) are in it as the base has them (no task
    changes them): a merged model has the base's tensors and files.

    ``left_out``: the tensors every task has that the merged model cannot include (:func:`left_out`);
    ``not_held``: the bytes of base tensors the archive has no copy of (:func:`base_not_held`);
    ``state_dict`` without ``task`` warns once that they are missing."""

    def __init__(self, family: Family, model: str, k: int | None = None, *, lazy: bool = False):
        manifest, name, read = family.manifest, family.name, family.read_array
        cls = merged_model_method(model)
        packed = manifest.merge.get("method")
        if cls.name != packed:
            gives = (" and ".join(METHODS[packed].merged_models()) if isinstance(packed, str) and packed in METHODS
                     else "no merged model")
            raise InvalidArgumentError(
                f"{name}: {model} needs an archive packed with --merge {cls.name}, "
                f"this one was packed with --merge {packed}, which gives {gives}")
        if k is not None and not is_consensus(model):  # an option without effect is an error
            raise InvalidArgumentError(f"k: only the consensus models use it, not {model!r}")
        value = DEFAULT_K if k is None else integer(k)
        if value is None or value < 0:
            raise InvalidArgumentError(f"k must be a non-negative integer, got {k!r}")
        k = value
        method = METHODS[packed].from_params(manifest.merge)
        thresholds = getattr(method, "thresholds", None)
        if thresholds is not None and len(thresholds) != len(manifest.tasks):  # one per task (spec §6.1.9)
            raise FormatError(f"{name}: merge: {len(thresholds)} TIES thresholds for {len(manifest.tasks)} tasks")
        self.model, self.k = model, k
        self.tasks = tuple(t.name for t in manifest.tasks)
        self._family = family
        if is_consensus(model) and k > len(self.tasks):
            self._say_base()
        k = min(k, len(self.tasks) + 1)  # any k over T keeps no weight (the base): one a tensor can compare
        self.left_out = tuple(left_out(manifest))
        self.in_some_tasks = tuple(in_some_tasks(manifest))
        self.not_held = base_not_held(manifest)
        self._warned = False
        self._method, self._k_used = method, k
        self._lambdas = {t.name: t.lam for t in manifest.tasks}
        # a remote archive fetches each tensor's arrays in one request, not one per array (stats' way)
        self._prefetch = getattr(family, "prefetch", None)
        #: the entries a merged model has tensors of, in the manifest's order (read in it)
        self._entries: list[TensorEntry] = []
        #: each tensor of the merged model: the entry that gives it, in the checkpoints' order
        self._entry_of: dict[str, TensorEntry] = {}
        for e in manifest.tensors:
            names = self._names(e)
            if names:
                self._entries.append(e)
                self._entry_of.update((n, e) for n in names)
        if manifest.tasks:  # in the checkpoints' order (a group's members were stored together)
            order = {name: i for i, name in enumerate(manifest.tasks[0].keys)}
            self._entry_of = dict(sorted(self._entry_of.items(), key=lambda kv: order.get(kv[0], len(order))))
        self._parts: dict[str, tuple[torch.Tensor, torch.Tensor | None]] | None = None
        if not lazy:
            self.parts  # noqa: B018 (read now: a damaged archive fails here, as before)

    @property
    def parts(self) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        """Each tensor's theta_0 and direction d (None: the tensor as it is), read on first use and
        kept (``select_alpha`` builds a model per alpha from them)."""
        if self._parts is None:
            got: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
            for e in self._entries:
                got.update(self.entry_parts(e))
            self._parts = {name: got[name] for name in self._entry_of}
        return self._parts

    def _names(self, e: TensorEntry) -> list[str]:
        """The tensors of the merged model that entry ``e`` gives (none: every task's own, or only
        some tasks have it), checked as far as the manifest tells, nothing read."""
        name = self._family.name
        if not e.tasks and "base" in e.arrays:  # base-only (kept on request): no task changes it
            return [m.name for m in e.members] if e.members else [e.name]
        if set(e.tasks) != set(self.tasks):
            return []
        unknown = sorted(x for x in {tt.encoding for tt in e.tasks.values()} if encoding_for(x) is None)
        if unknown:
            raise UnsupportedVersionError(f"{name}: tensor {e.name!r} is stored as {', '.join(map(repr, unknown))}, "
                                          "which this tallpack cannot merge; upgrade it")
        how = _how_merged(e)
        if how == "merged" and "base" not in e.arrays:
            raise FormatError(f"{name}: tensor {e.name!r} has no base")
        if how in ("merged", "shared"):
            return [m.name for m in e.members] if e.members else [e.name]
        return []

    def spec(self, name: str) -> tuple[str, tuple[int, ...]]:
        """The dtype (spec name) and shape of the merged model's tensor ``name``, from the manifest
        alone: a merged tensor has its base's, one stored alike for every task its data's."""
        e = self._entry_of[name]
        held = e.arrays["base"] if "base" in e.arrays and (not e.tasks or _how_merged(e) == "merged"
                                                           or not e.members) else e.arrays["data"]
        if e.members:
            return held.dtype, next(m.shape for m in e.members if m.name == name)
        return held.dtype, tuple(held.shape)

    def entry_parts(self, e: TensorEntry) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        """theta_0 and d (or the tensor as it is, and None) of each tensor entry ``e`` gives."""
        name, read, method, k = self._family.name, self._family.read_array, self._method, self._k_used
        model, lambdas, prefetch = self.model, self._lambdas, self._prefetch
        where = f"tensor {e.name!r}"
        if not e.tasks and "base" in e.arrays:  # base-only (kept on request): no task changes it
            base = read(e.arrays["base"], f"{where} (base)")
            if e.members:
                return {m.name: (part, None) for m, part in zip(e.members, split_parts(base, e.members))}
            return {e.name: (base, None)}
        how = _how_merged(e)
        if how == "merged":
            if prefetch is not None and _reads_every_array(e, is_consensus(model)):
                prefetch([e.name])
            sources = {x: merged_source(e, x) for x in ("merged", *method.extra_arrays)}
            base = read(e.arrays["base"], f"{where} (base)")
            masks: Iterable[torch.Tensor] | None = None
            extras = None
            if any(tt.encoding == "qtau" for tt in e.tasks.values()):  # the dial's (format 1.7, §6.1.8)
                tau, by_task = task_masks(read, e, lambdas)
                tau = tau.reshape(base.shape)
                masks = [m.reshape(base.shape) for m in by_task.values()]
            elif is_consensus(model) and isinstance(sources["merged"], DerivedMerged):
                # format 1.8 (§6.1.9): tau_MTL and every mask from one rebuild of each original
                # (not once for tau_MTL and again for each task's mask)
                tau, masks = _derived_merged_masks(read, e, self.tasks, method, name)
            elif sources["merged"] is None:
                raise FormatError(f"{name}: {where} has no merged vector")
            else:  # stored, or derived from the exact originals (format 1.8, §6.1.9)
                tau = read(sources["merged"], f"{where} (merged)")
            if is_consensus(model):
                if masks is None:  # read as they are counted: one task's mask held at a time
                    masks = (task_mask(read, e, tt, f"task {t!r}, {where}") for t, tt in e.tasks.items())
            else:
                missing = [x for x in method.extra_arrays if sources[x] is None]
                if missing:
                    raise FormatError(f"{name}: {where} has no {', '.join(missing)} for {model}")
                extras = {x: read(s, f"{where} ({x})") for x in method.extra_arrays
                          if (s := sources[x]) is not None}
            direction = merge_direction(model, tau, masks, extras, k, method)
            if e.members:  # a group (format 1.12): each member's run of the flat tensors
                base, direction = base.reshape(-1), direction.reshape(-1)
                return {m.name: (base[m.offset:m.offset + m.numel].view(m.shape),
                                 direction[m.offset:m.offset + m.numel].view(m.shape)) for m in e.members}
            return {e.name: (base, direction)}
        if "base" in e.arrays and not e.members:
            # 1.13: every task at one value that is not the base's; merged as any merged
            # tensor, every tau_t the same (§6.1.3)
            data = read(e.arrays["data"], where)
            base = read(e.arrays["base"], f"{where} (base)")
            if base.shape != data.shape or not base.is_floating_point():
                raise FormatError(f"{name}: {where} has a base of another shape or dtype kind than its data")
            return {e.name: (base, shared_direction(model, base, data, self.tasks, lambdas, k, method,
                                                    f"{name}: {where}"))}
        data = read(e.arrays["data"], where)
        if e.members:  # a group (format 1.12): each member's run, a tensor of its own
            return {m.name: (part, None) for m, part in zip(e.members, split_parts(data, e.members))}
        return {e.name: (data, None)}

    def _in_runs(self, e: TensorEntry) -> dict[str, ArrayRef] | None:
        """The stored arrays a merged tensor of entry ``e`` is built from, by key (``"base"``,
        ``"merged"``, the method's extras or each task's ``"mask"`` as ``"mask:TASK"``), when it is
        built RUN_ELEMENTS at a time (CHUNKED_FROM; any size where the compiled loop builds it:
        ``merging.fused_merge``); None: built whole, as ``entry_parts`` does."""
        base = e.arrays.get("base")
        if (e.members or not e.tasks or base is None or _how_merged(e) != "merged"
                or (base.numel <= CHUNKED_FROM and not (base.numel and fusable_dtype(base.dtype)))
                or any(tt.encoding == "qtau" for tt in e.tasks.values())):
            return None
        refs: dict[str, ArrayRef | DerivedMerged | None] = {"base": base, "merged": merged_source(e)}
        if is_consensus(self.model):
            if any(tt.encoding != "tall" for tt in e.tasks.values()):  # derived masks: from the exact originals
                return None
            refs.update((f"mask:{t}", tt.arrays.get("mask")) for t, tt in e.tasks.items())
        else:
            refs.update((x, merged_source(e, x)) for x in self._method.extra_arrays)
        got = {k: r for k, r in refs.items() if isinstance(r, ArrayRef) and r.numel == base.numel}
        return got if len(got) == len(refs) else None  # (one missing or odd: entry_parts says what is wrong)

    def build_in_runs(self, e: TensorEntry, alpha: float) -> tuple[torch.Tensor, bool] | None:
        """The merged tensor of entry ``e`` at ``alpha``, and whether ``alpha`` overflowed it, built
        RUN_ELEMENTS at a time into its output (``apply_direction`` and ``_overflowed`` on each run:
        the bits of the whole tensor's); None for an entry built whole (:meth:`_in_runs`)."""
        refs = self._in_runs(e)
        if refs is None:
            return None
        read, model, method, k = self._family.read_array, self.model, self._method, self._k_used
        where = f"tensor {e.name!r}"
        if self._prefetch is not None and _reads_every_array(e, is_consensus(model)):
            self._prefetch([e.name])  # remote: as ``entry_parts`` does, one coalesced fetch, not one a chunk
        base = refs["base"]
        ce = max(r.chunk_elements for r in refs.values())
        run = max(1, -(-RUN_ELEMENTS // ce)) * ce
        out: torch.Tensor | None = None
        out_finite = inputs_finite = True  # every run's part finite; base and d finite where checked
        flags = 0  # the compiled loop's, or'ed over the runs
        fused = fusable_dtype(base.dtype)
        for a in range(0, base.numel, run):
            b = min(base.numel, a + run)
            if fused:
                if out is None:
                    out = torch.empty(tuple(base.shape), dtype=torch_dtype(base.dtype))
                got = self._fused_run(e, refs, a, b, alpha, out)
                if got is not None:
                    flags |= got
                    continue
            theta = read(base, f"{where} (base)", Use.INPUT, start=a, stop=b)
            tau = read(refs["merged"], f"{where} (merged)", Use.INPUT, start=a, stop=b)
            masks: Iterable[torch.Tensor] | None = None
            extras = None
            if is_consensus(model):  # read as they are counted, in the tasks' order
                masks = (read(refs[f"mask:{t}"], f"task {t!r}, {where} (mask)", Use.INPUT, start=a, stop=b)
                         for t in e.tasks)
            else:
                extras = {x: read(refs[x], f"{where} ({x})", Use.INPUT, start=a, stop=b) for x in method.extra_arrays}
            d = merge_direction(model, tau, masks, extras, k, method)
            part = apply_direction(theta, d, alpha)
            if out is None:
                out = torch.empty(tuple(base.shape), dtype=part.dtype)
            out.view(-1)[a:b] = part.reshape(-1)  # (one run of the whole tensor: read in its shape)
            if theta.is_floating_point() and inputs_finite:
                # a run's part not finite, or a saturating cast (float8_e4m3fn: inf to 448): its base and d
                # are checked; where the part is finite without one, they are (inf or NaN in stays in)
                finite = _finite(part)
                out_finite = out_finite and finite
                if not finite or part.dtype == getattr(torch, "float8_e4m3fn", None):
                    inputs_finite = _finite(theta) and _finite(d)
            del theta, tau, masks, extras, d, part
        assert out is not None  # (at least one run)
        out_finite = out_finite and not flags & OUT_NOT_FINITE
        inputs_finite = inputs_finite and not flags & IN_NOT_FINITE
        return out, out.is_floating_point() and not out_finite and inputs_finite

    def _fused_run(self, e: TensorEntry, refs: dict[str, ArrayRef], a: int, b: int, alpha: float,
                   out: torch.Tensor) -> int | None:
        """Elements [a, b) of the merged tensor of entry ``e`` built into ``out`` by the compiled
        loop (``merging.fused_merge``), its arrays read side by side (this thread and tallpack's
        helpers: decoding releases the GIL): the loop's flags; None where it does not run (nothing
        written: the caller's torch path then reads them again)."""
        read, where, k, tasks = self._family.read_array, f"tensor {e.name!r}", self._k_used, list(e.tasks)
        consensus, method = is_consensus(self.model), self._method.name
        if not consensus and method not in ("ta", "ties"):  # (a method whose plain direction the loop does not know)
            return None
        masks = [f"mask:{t}" for t in tasks] if consensus and len(tasks) <= FUSED_MASKS else []
        keys = ["base", *masks, *(["counts"] if not consensus and method == "ties" else []), "merged"]
        said = {"base": f"{where} (base)", "merged": f"{where} (merged)", "counts": f"{where} (counts)",
                **{f"mask:{t}": f"task {t!r}, {where} (mask)" for t in tasks}}
        got: dict[str, torch.Tensor] = {}

        def reads(first: int, end: int) -> None:  # (the large arrays at the two ends: one for each thread)
            with kernels.as_worker():  # a read's own loops unsplit: no wait on the helpers from one of them
                for key in keys[first:end]:
                    got[key] = read(refs[key], said[key], Use.INPUT, start=a, stop=b).reshape(-1)
        in_parts(len(keys), getattr(self._family, "threads", 1), reads)
        held = [got[m] for m in masks]
        if consensus and not masks:  # counted as they come, one mask held at a time; then one mask, k = 1
            held = [consensus_mask((read(refs[f"mask:{t}"], said[f"mask:{t}"], Use.INPUT, start=a, stop=b).reshape(-1)
                                    for t in tasks), k)]
            k = 1
        done = fused_merge(got["base"], got["merged"], alpha, held or None, k, got.get("counts"), out.view(-1)[a:b],
                           getattr(self._family, "threads", 1))
        return None if done is None else done[1]

    @overload
    def state_dict(self, alpha: float | None = None, *, task: str | None = None,
                   lazy: Literal[False] = False) -> dict[str, torch.Tensor]: ...

    @overload
    def state_dict(self, alpha: float | None = None, *, task: str | None = None,
                   lazy: Literal[True]) -> "MergedModel": ...

    @cpu_default
    def state_dict(self, alpha: float | None = None, *, task: str | None = None,
                   lazy: bool = False) -> "dict[str, torch.Tensor] | MergedModel":
        """The merged model at ``alpha``; with ``task``, completed with that task's own tensors.

        Every call returns tensors of its own (the ones no task changes, copied), so a caller may
        change one model in place without changing the next (``select_alpha``'s evaluations).
        With ``lazy=True``, a read-only mapping that builds each tensor when it is indexed from
        that tensor's parts alone (kept by nothing): writing a model one tensor at a time holds
        one tensor's parts, not the whole model's (``write_merged``).

        >>> parts = fam.merge_parts("ta"); models = [parts.state_dict(a) for a in (0.2, 0.4)]
        """
        value = default_alpha(self.model, len(self.tasks)) if alpha is None else check_alpha(alpha)
        self._warn_precision()
        if lazy:
            if task is None:
                self._warn_left_out()
            return MergedModel(self, value, task)
        with memory_named(f"{self._family.name}: the {self.model} model"):  # torch's allocator: not a TallpackError
            merged = {name: t.clone() if d is None else apply_direction(t, d, value)
                      for name, (t, d) in self.parts.items()}
        aliases = self._family.manifest.aliases
        if aliases:  # (format 1.14) a tied weight's other names: the same tensor, in the checkpoints' order
            merged = _with_aliases(merged, aliases, self._family.manifest.tasks[0].keys)
        if task is None:
            self._warn_left_out()
            return merged
        names = self._family.keys(task)
        listed = set(names)
        tied = {a: t for a, t in aliases.items() if a in listed and t in listed}  # read once, as its target
        got = {name: merged[name] if name in merged else self._family.get_tensor(task, name)
               for name in names if name not in tied}
        return {name: got[tied.get(name, name)] for name in names}

    def warn_overflow(self, merged: dict[str, torch.Tensor], alpha: float | None) -> list[str]:
        """Warn once per call, and return, the tensors of a merged model that ``alpha`` pushed past
        their dtype's range (inf where base and direction are finite: a large alpha on a float16
        model). One pass over the model; ``select_alpha``'s evaluations do not make it."""
        over = [name for name, (t, d) in self.parts.items()
                if d is not None and name in merged and _overflowed(merged[name], t, d)]
        self.say_overflow(over, merged[over[0]].dtype if over else None, alpha)
        return over

    def say_overflow(self, over: Sequence[str], dtype: torch.dtype | None, alpha: float | None) -> None:
        """Warn that ``alpha`` overflowed the tensors ``over`` (of ``dtype``), if any."""
        if over:
            value = default_alpha(self.model, len(self.tasks)) if alpha is None else alpha
            names = ", ".join(map(repr, over[:SHOWN_NAMES])) + (", ..." if len(over) > SHOWN_NAMES else "")
            log.warning("%s: alpha %g overflows %d tensor%s of the %s model (inf where the base and the merged "
                        "vector are finite; %s): %s", self._family.name, value, len(over), "" if len(over) == 1 else "s",
                        self.model, dtype, names)

    def _say_base(self) -> None:
        """Warn (once per model and k of an open archive) that k is over the task count: no weight
        is used by k tasks, so every merged tensor stays at the base's value."""
        if not self._first_time(("base", self.model, self.k)):
            return
        n = len(self.tasks)
        log.warning("%s: k=%d is more than the archive's %d task%s, so no weight is used by k tasks: the %s model is "
                    "the base, every merged tensor unchanged; k=%d (--k %d) keeps the weights every task uses",
                    self._family.name, self.k, n, "" if n == 1 else "s", self.model, max(n, 1), max(n, 1))

    def _first_time(self, key: tuple[str, str, int]) -> bool:
        """Whether ``key`` is said for the first time of this open archive (a server building merged
        models over and over is told once)."""
        try:
            said = _SAID.setdefault(self._family, set())
        except TypeError:  # a family that takes no weak reference: once per MergeParts
            return True
        if key in said:
            return False
        said.add(key)
        return True

    def _warn_precision(self) -> None:
        """Warn once (per model of an open archive) of tensors built in the base's dtype that every
        task holds with more fraction bits (float32 fine-tunes of a bfloat16 base): the merge is
        float32, its cast to the base's dtype (spec §6.2) rounds away changes below its precision."""
        finer = [e for e in self._entries if "base" in e.arrays and e.tasks and e.arrays["base"].dtype in FLOAT_BITS
                 and all(FLOAT_BITS.get(tt.dtype, (0, 0))[1] > FLOAT_BITS[e.arrays["base"].dtype][1]
                         for tt in e.tasks.values())]
        if not finer or not self._first_time(("precision", self.model, 0)):
            return
        names = [m.name for e in finer for m in (e.members or (e,))]
        first = finer[0]
        base = first.arrays["base"].dtype
        held = list(dict.fromkeys(tt.dtype for tt in first.tasks.values()))  # (a float16 task beside float32 ones)
        tasks = " and ".join(held)
        keep = held[0] if len(held) == 1 and holds(held[0], base) else "float32"
        shown = ", ".join(map(repr, names[:SHOWN_NAMES])) + (", ..." if len(names) > SHOWN_NAMES else "")
        log.warning("%s: %d tensor%s of the %s model %s built in the base's %s, which the tasks hold in %s (%s): the "
                    "merge is computed in float32, then rounded to the base's dtype, losing changes below its "
                    "precision; for a %s merged model, pack a %s copy of the base (the same masks and rebuilds)",
                    self._family.name, len(names), "" if len(names) == 1 else "s", self.model,
                    "is" if len(names) == 1 else "are", base, tasks, shown, keep, keep)

    def _warn_left_out(self) -> None:
        """Say once which tensors every task has that this merged model lacks, and why (once per
        model of an open archive, not once per call)."""
        if self._warned:
            return
        self._warned = True
        if not self._first_time(("left out", self.model, self.k)):
            return
        for c, having in missing_components(self._family.manifest).items():
            if having:
                who = (f"only task{'s' if len(having) > 1 else ''} {', '.join(map(repr, having))} "
                       f"ha{'ve' if len(having) > 1 else 's'} it (stored per task, with no copy of the base's to "
                       "merge onto)")
                how = f"task={having[0]!r} (--task {having[0]}) takes that task's"
            else:
                who, how = "no task has it (base-only tensors, not kept)", "repack with --keep-base-only"
            st = self._family.manifest.base.get("format") == "sentence-transformers"
            log.warning("%s: the base's %s %r is left out of the %s model: %s; the %s folder written lists it (%s) "
                        "and does not load without it: %s", self._family.name, "module" if st else "pipeline component",
                        c, self.model, who, "model" if st else "pipeline", "modules.json" if st else "model_index.json",
                        how)
        some = self.in_some_tasks
        if some:
            shown = ", ".join(map(repr, some[:SHOWN_NAMES])) + (", ..." if len(some) > SHOWN_NAMES else "")
            log.warning("%s: %d tensor%s that only some tasks have %s left out of the %s model: %s (stored per task, "
                        "with no copy of the base's to merge onto); task=NAME (--task NAME) takes that task's", self._family.name,
                        len(some), "" if len(some) == 1 else "s", "is" if len(some) == 1 else "are", self.model, shown)
        if self.not_held:
            log.warning("%s: the base has %d bytes of tensors that this archive holds no copy of, left out of the %s "
                        "model (base-only tensors, which pack drops without keep_base_only=True (--keep-base-only), "
                        "or the base's own version of a tensor the tasks store per task); a model whose config needs "
                        "them (an untied lm_head.weight) loads them newly initialised: repack with --keep-base-only, "
                        "or take a task's tensors and files with task=NAME (--task NAME)", self._family.name,
                        self.not_held, self.model)
        n = len(self.left_out)
        if not n:
            return
        names = ", ".join(map(repr, self.left_out[:SHOWN_NAMES])) + (", ..." if n > SHOWN_NAMES else "")
        one = n == 1
        log.warning("%s: %d tensor%s that every task has %s left out of the %s model: %s (each task stores its own: "
                    "not in the base, another shape or dtype, integers that differ, NaN/inf, or task vectors too large "
                    "to sum in float32; no base to merge "
                    "onto); task=NAME (--task NAME) takes %s from that task", self._family.name, n, "" if one else "s",
                    "is" if one else "are", self.model, names, "it" if one else "them")


class MergedModel(Mapping[str, "torch.Tensor"]):
    """A merged model (``MergeParts.state_dict(alpha, lazy=True)``): a read-only mapping that
    builds each tensor when it is indexed, from its own entry's parts, which nothing keeps; ``in``,
    ``len`` and iteration answer from the manifest. The names and order are ``state_dict``'s.

    A group's other members (format 1.12), and a tied tensor's other names (format 1.14), are held
    until indexed: the most recent up to HELD_BYTES (an older one is built again if asked for).
    A tensor handed out that its caller still keeps is handed out again, as a dict would: tied
    names of a model being filled into a dict are one tensor, as the eager model's are.
    ``overflow`` lists the tensors built so far that ``alpha`` overflowed (``warn_overflow`` says so).
    A tensor of more than CHUNKED_FROM elements is built a run of chunks at a time into its output
    (``MergeParts.build_in_runs``): the same bits, the output and a run's buffers held.
    """

    def __init__(self, parts: MergeParts, alpha: float, task: str | None):
        self._parts, self._alpha, self._task = parts, alpha, task
        fam = parts._family
        aliases = fam.manifest.aliases
        entry_of = parts._entry_of
        #: each name: where its tensor comes from, ("merged", name) or ("task", name)
        self._source: dict[str, tuple[str, str]] = {}
        if task is None:
            names = [*entry_of, *(a for a, t in aliases.items() if t in entry_of and a not in entry_of)]
            at = {name: i for i, name in enumerate(fam.manifest.tasks[0].keys)} if fam.manifest.tasks else {}
            names.sort(key=lambda n: at.get(n, len(at)))  # stable: _with_aliases' order
            self._source = {n: ("merged", n if n in entry_of else aliases[n]) for n in names}
        else:
            names = fam.keys(task)
            listed = set(names)
            tied = {a: t for a, t in aliases.items() if a in listed and t in listed}
            for n in names:
                key = tied.get(n, n)
                if key in entry_of:
                    self._source[n] = ("merged", key)
                elif key in aliases and aliases[key] in entry_of:
                    self._source[n] = ("merged", aliases[key])
                else:
                    self._source[n] = ("task", key)
        self._keys = names
        #: the names that share each source (a tied tensor's): held until each has had it
        self._names_of: dict[tuple[str, str], list[str]] = {}
        for n, src in self._source.items():
            self._names_of.setdefault(src, []).append(n)
        self._held: OrderedDict[tuple[str, str], tuple[torch.Tensor, set[str]]] = OrderedDict()
        self._held_bytes = 0
        self._lock = threading.Lock()
        _MODELS[id(self)] = self  # a fresh lock in a forked child (_after_fork_in_child)
        self._task_sd: Mapping[str, torch.Tensor] | None = None
        #: each source's tensor last handed out, while the caller keeps it (tied names get one tensor)
        self._handed: dict[tuple[str, str], weakref.ref[torch.Tensor]] = {}
        self.overflow: list[str] = []
        self._overflow_dtypes: dict[str, torch.dtype] = {}  # each one's: the warning names the first's

    def spec(self, name: str) -> tuple[str, tuple[int, ...]]:
        """The dtype (spec name) and shape of tensor ``name``, from the manifest alone."""
        kind, key = self._source[name]
        if kind == "merged":
            return self._parts.spec(key)
        assert self._task is not None  # (a task's own tensor: only with a task)
        return self._parts._family.tensor_spec(self._task, key)

    @cpu_default
    def __getitem__(self, name: str) -> torch.Tensor:
        src = self._source[name]  # KeyError for a name the model lacks, as a dict
        with self._lock:
            got = self._take(src, name)
            if got is None:  # handed out before and still alive (a dict being filled): the same tensor, as tied
                got = self._handed[src]() if src in self._handed else None
            if got is not None:
                self._handed[src] = weakref.ref(got)
                return got
            built = self._build(src)
            out = built.pop(src)
            self._handed[src] = weakref.ref(out)
            for other, t in ((src, out), *built.items()):
                wanted = set(self._names_of.get(other, ())) - ({name} if other == src else set())
                if wanted:
                    old = self._held.pop(other, None)  # built again: its bytes counted once
                    if old is not None:
                        self._held_bytes -= old[0].nbytes
                    self._held[other] = (t, wanted)
                    self._held_bytes += t.nbytes
            while self._held_bytes > HELD_BYTES and len(self._held) > 1:  # the oldest go first
                _, (t, _) = self._held.popitem(last=False)
                self._held_bytes -= t.nbytes
            return out

    def _take(self, src: tuple[str, str], name: str) -> torch.Tensor | None:
        """The held tensor of ``src`` handed out as ``name``; let go once every name has had it."""
        held = self._held.get(src)
        if held is None or name not in held[1]:
            return None
        held[1].discard(name)
        if not held[1]:
            del self._held[src]
            self._held_bytes -= held[0].nbytes
        return held[0]

    def _build(self, src: tuple[str, str]) -> dict[tuple[str, str], torch.Tensor]:
        """The tensor of ``src``, with the other members of its group (built with it)."""
        kind, key = src
        parts = self._parts
        if kind == "task":
            assert self._task is not None  # (a task's own tensor: only with a task)
            if self._task_sd is None:
                fam = parts._family
                lazy = getattr(fam, "state_dict", None)
                self._task_sd = lazy(self._task, lazy=True) if lazy is not None else _TaskTensors(fam, self._task)
            return {src: self._task_sd[key]}
        entry = parts._entry_of[key]
        fam = parts._family
        with memory_named(f"{fam.name}: the {parts.model} model"):  # torch's allocator: not a TallpackError
            out = {}
            held = parts._parts  # read already (an eager MergeParts): not read again
            in_runs = parts.build_in_runs(entry, self._alpha) if held is None else None  # a large one (CHUNKED_FROM)
            if in_runs is not None:
                out[("merged", entry.name)], over = in_runs
                if over and entry.name not in self.overflow:
                    self.overflow.append(entry.name)
                    self._overflow_dtypes[entry.name] = in_runs[0].dtype
                return out
            got = ({m.name: held[m.name] for m in entry.members} if entry.members else {entry.name: held[entry.name]}
                   ) if held is not None else parts.entry_parts(entry)
            for n, (t, d) in got.items():
                if ("merged", n) not in self._names_of:
                    continue  # a member the model lacks (none: a group's members are all the model's)
                if d is None:
                    out[("merged", n)] = t.clone()
                    continue
                out[("merged", n)] = merged = apply_direction(t, d, self._alpha)
                if n not in self.overflow and _overflowed(merged, t, d):  # (a group built again: listed once)
                    self.overflow.append(n)
                    self._overflow_dtypes[n] = merged.dtype
        return out

    def whole(self, share: Callable[[list[Callable[[], Any]], list[int]], list[Any]] | None = None
              ) -> dict[str, torch.Tensor]:
        """Every tensor of the model, in its order, as ``dict(self)`` gives them (tied names: one
        tensor). With ``share(jobs, sizes)`` (the archive's ``_share``: each job's result, the jobs
        largest first by their inputs' decoded bytes), the merged tensors are built side by side,
        one entry a job (a group's members together); a task's own tensors then one at a time."""
        if share is None:
            return dict(self)
        firsts: dict[str, tuple[str, str]] = {}  # each entry the model has tensors of: one of its sources
        for src in self._names_of:
            if src[0] == "merged":
                firsts.setdefault(self._parts._entry_of[src[1]].name, src)
        sizes = {e: _input_bytes(self._parts._entry_of[src[1]], is_consensus(self._parts.model))
                 for e, src in firsts.items()}
        order = sorted(firsts, key=sizes.__getitem__, reverse=True)
        # one that would keep a thread busy while the others run out of work is built alone, its
        # loops split across the threads (as dict(self) builds each)
        alone = sum(sizes.values()) // (2 * max(1, getattr(self._parts._family, "threads", 1)))
        built: dict[tuple[str, str], torch.Tensor] = {}
        for e in order:
            if sizes[e] > alone:
                built.update(self._build(firsts[e]))
        rest = [e for e in order if sizes[e] <= alone]
        for got in share([partial(self._build, firsts[e]) for e in rest], [sizes[e] for e in rest]):
            built.update(got)
        return {name: built[src] if (src := self._source[name]) in built else self[name] for name in self._keys}

    def warn_overflow(self) -> list[str]:
        """Warn of, and return, the tensors built so far that ``alpha`` overflowed."""
        at = {name: i for i, name in enumerate(self._parts._entry_of)}
        over = sorted(self.overflow, key=lambda n: at.get(n, len(at)))  # the model's order, as the eager one's
        self._parts.say_overflow(over, self._overflow_dtypes[over[0]] if over else None, self._alpha)
        return over

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._source

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __reduce__(self) -> tuple[Any, ...]:
        """Sent to another process: the same model over its parts there (their archive opened
        again, ``Archive.__reduce__``), nothing built yet."""
        return MergedModel, (self._parts, self._alpha, self._task)


def _input_bytes(e: TensorEntry, consensus: bool) -> int:
    """The decoded bytes a merged model reads for entry ``e``: its own arrays (base, merged vector,
    the method's extras or the data), and each task's mask for a consensus model."""
    held = sum(r.nbytes for r in e.arrays.values() if isinstance(r, ArrayRef))
    if consensus:
        held += sum(r.nbytes for tt in e.tasks.values() if isinstance(r := tt.arrays.get("mask"), ArrayRef))
    return held


#: Every lazily built merged model, for ``_after_fork_in_child`` (by id: a Mapping is unhashable).
_MODELS: "weakref.WeakValueDictionary[int, MergedModel]" = weakref.WeakValueDictionary()


def _after_fork_in_child() -> None:
    """A merged model's lock is held while it builds a tensor: one that another parent thread was
    building at the fork stays held in the child, which has not that thread (a DataLoader's fork
    workers would wait on it forever). Each gets a fresh one there, as lazy state dicts do."""
    for model in list(_MODELS.values()):
        model._lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class _TaskTensors(Mapping[str, "torch.Tensor"]):
    """A family's task tensors by ``get_tensor`` (a family without lazy state dicts)."""

    def __init__(self, family: Family, task: str):
        self._family, self._task = family, task

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._family.get_tensor(self._task, name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._family.keys(self._task))

    def __len__(self) -> int:
        return len(self._family.keys(self._task))
