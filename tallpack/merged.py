"""Merged (multi-task) models built from an archive alone: TA, TIES and Consensus Merging.

``theta_0 + alpha * d`` for every tensor all tasks share, with d given by the merge method the
archive was packed with (:mod:`tallpack.merging`), and the base-only tensors the archive keeps as
they are. The alpha-independent parts are read once.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

from ._torch import cpu_default, torch
from .arrays import ArrayRef
from .elements import itemsize, numel
from .encodings import TensorEntry, Use, encoding_for
from .encodings.base import ReadArray, split_parts
from .encodings.derived import DerivedMerged, merged_source, task_mask
from .encodings.derived_merged import task_masks as derived_merged_masks
from .encodings.exact import TALL_ENCODINGS
from .encodings.qtau import task_masks
from .errors import FormatError, InvalidArgumentError, TallpackError, UnsupportedVersionError, memory_named
from .folders import component_of
from .manifest import Manifest
from .merging import (MERGED_MODELS, METHODS, MergeMethod, apply_direction, check_alpha, default_alpha, integer,
                      is_consensus, merge_direction, merged_model_method, missing_statistics)
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

    def read_array(self, ref: ArrayRef | DerivedMerged, where: str, use: Use = Use.OUTPUT) -> torch.Tensor: ...

    def keys(self, task: str) -> list[str]: ...

    def get_tensor(self, task: str, name: str) -> torch.Tensor: ...


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


def _finite(t: torch.Tensor) -> bool:
    """Whether every value of ``t`` is finite (float8 through float32: torch has no ``isfinite``
    for ``float8_e4m3fn``)."""
    return bool(torch.isfinite(t.float() if t.element_size() == 1 else t).all())


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


#: The most names of left-out tensors a warning lists.
SHOWN_NAMES = 5


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

    def __init__(self, family: Family, model: str, k: int | None = None):
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
        lambdas = {t.name: t.lam for t in manifest.tasks}
        # a remote archive fetches each tensor's arrays in one request, not one per array (stats' way)
        prefetch = getattr(family, "prefetch", None)
        self.parts: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        for e in manifest.tensors:
            where = f"tensor {e.name!r}"
            if not e.tasks and "base" in e.arrays:  # base-only (kept on request): no task changes it
                base = read(e.arrays["base"], f"{where} (base)")
                if e.members:
                    self.parts.update((m.name, (part, None)) for m, part in zip(e.members, split_parts(base, e.members)))
                else:
                    self.parts[e.name] = (base, None)
                continue
            if set(e.tasks) != set(self.tasks):
                continue
            encodings = {tt.encoding for tt in e.tasks.values()}
            unknown = sorted(x for x in encodings if encoding_for(x) is None)
            if unknown:
                raise UnsupportedVersionError(f"{name}: {where} is stored as {', '.join(map(repr, unknown))}, "
                                              "which this tallpack cannot merge; upgrade it")
            how = _how_merged(e)
            if how == "merged":
                if "base" not in e.arrays:
                    raise FormatError(f"{name}: {where} has no base")
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
                    for m in e.members:
                        run = slice(m.offset, m.offset + m.numel)
                        self.parts[m.name] = (base[run].view(m.shape), direction[run].view(m.shape))
                else:
                    self.parts[e.name] = (base, direction)
            elif how == "shared" and "base" in e.arrays and not e.members:
                # 1.13: every task at one value that is not the base's; merged as any merged
                # tensor, every tau_t the same (§6.1.3)
                data = read(e.arrays["data"], where)
                base = read(e.arrays["base"], f"{where} (base)")
                if base.shape != data.shape or not base.is_floating_point():
                    raise FormatError(f"{name}: {where} has a base of another shape or dtype kind than its data")
                self.parts[e.name] = (base, shared_direction(model, base, data, self.tasks, lambdas, k, method,
                                                                f"{name}: {where}"))
            elif how == "shared":
                data = read(e.arrays["data"], where)
                if e.members:  # a group (format 1.12): each member's run, a tensor of its own
                    self.parts.update((m.name, (part, None)) for m, part in zip(e.members, split_parts(data, e.members)))
                else:
                    self.parts[e.name] = (data, None)
        if manifest.tasks:  # in the checkpoints' order (a group's members were stored together)
            order = {name: i for i, name in enumerate(manifest.tasks[0].keys)}
            self.parts = dict(sorted(self.parts.items(), key=lambda kv: order.get(kv[0], len(order))))

    @cpu_default
    def state_dict(self, alpha: float | None = None, *, task: str | None = None) -> dict[str, torch.Tensor]:
        """The merged model at ``alpha``; with ``task``, completed with that task's own tensors.

        Every call returns tensors of its own (the ones no task changes, copied), so a caller may
        change one model in place without changing the next (``select_alpha``'s evaluations).

        >>> parts = fam.merge_parts("ta"); models = [parts.state_dict(a) for a in (0.2, 0.4)]
        """
        value = default_alpha(self.model, len(self.tasks)) if alpha is None else check_alpha(alpha)
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
                if d is not None and name in merged and t.is_floating_point()
                and not _finite(merged[name]) and _finite(t) and _finite(d)]
        if over:
            value = default_alpha(self.model, len(self.tasks)) if alpha is None else alpha
            names = ", ".join(map(repr, over[:SHOWN_NAMES])) + (", ..." if len(over) > SHOWN_NAMES else "")
            log.warning("%s: alpha %g overflows %d tensor%s of the %s model (inf where the base and the merged "
                        "vector are finite; %s): %s", self._family.name, value, len(over), "" if len(over) == 1 else "s",
                        self.model, merged[over[0]].dtype, names)
        return over

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
