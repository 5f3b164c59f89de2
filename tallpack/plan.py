"""The plan: align tensor names across the base and the tasks, and decide each tensor's kind.

The kind is decided here and nowhere else: ``make_plan`` from names, shapes and dtypes alone,
then ``resolve`` once per tensor from its data (a tensor equal in every task is stored once; one
holding inf or NaN is stored per task). Every later stage (packer, merge statistics, lambda
selection) reads that decision.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ._torch import torch
from .arrays import check_shape
from .dtypes import all_equal
from .elements import FLOATING, holds, numel
from .errors import IncompatibleCheckpointsError, InvalidArgumentError
from .limits import MAX_NAME_CHARS, MAX_TASKS
from .sources import ComponentsSource, Source, adapter, prefix_hint
from .tall import in_tall_range

log = logging.getLogger(__name__)


class Kind(str, enum.Enum):
    """How a tensor name of the family is stored (the manifest's ``kind``)."""

    MERGED = "merged"  # base + merged vector + one mask per task
    SHARED = "shared"  # equal in every task: stored once
    TASK_OWN = "task-own"  # stored per task
    BASE_ONLY = "base-only"  # in no task: stored only on request

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class TensorPlan:
    name: str
    kind: Kind  # from names, shapes and dtypes: MERGED, TASK_OWN or BASE_ONLY
    tasks: tuple[str, ...]  # the tasks that have this tensor, in task order
    in_base: bool


@dataclass(frozen=True)
class Plan:
    tasks: tuple[str, ...]
    tensors: tuple[TensorPlan, ...]

    def count(self, kind: Kind) -> int:
        return sum(t.kind == kind for t in self.tensors)


def resolve(planned: Kind, base: torch.Tensor | None, thetas: list[torch.Tensor]) -> Kind:
    """The kind a tensor is stored as, given its data: ``SHARED`` when more than one task has it
    and all are equal (bit for bit); ``TASK_OWN`` for a would-be merged tensor holding inf or NaN
    (tau_t would be NaN) or values so large that float32 sums could overflow (``in_tall_range``);
    otherwise as planned."""
    if planned is Kind.BASE_ONLY:
        return planned
    if len(thetas) > 1 and all_equal(thetas):
        return Kind.SHARED
    if planned is Kind.MERGED:
        assert base is not None  # (planned merged: the base has it)
        if not in_tall_range(base, thetas):
            return Kind.TASK_OWN
    return planned


def resolve_blocks(planned: Kind, tasks: int, same_layout: bool,
                   blocks: Iterable[tuple[torch.Tensor, list[torch.Tensor]]]) -> Kind:
    """:func:`resolve` of a tensor given as its blocks (base block, task blocks), read one at a
    time: the same decision. ``same_layout``: whether the tasks' copies share dtype and shape
    (their bytes can then be equal). One pass, which stops once the tensor is known to differ
    between tasks and to be out of range."""
    if planned is Kind.BASE_ONLY:
        return planned
    equal, in_range = tasks > 1 and same_layout, planned is Kind.MERGED
    for base, thetas in blocks:
        if equal:
            equal = all_equal(thetas)
        if in_range:
            in_range = in_tall_range(base, thetas)
        if not equal and not in_range:
            break
    if equal:
        return Kind.SHARED
    if planned is Kind.MERGED and not in_range:
        return Kind.TASK_OWN
    return planned


class _Named(Source):
    """A checkpoint seen under other names: each of its tensors ``names[name]`` as ``name`` (in
    the checkpoint's order); ``described``: what the manifest's ``source`` says of the renaming."""

    def __init__(self, inner: Source, names: dict[str, str], described: dict[str, Any]):
        super().__init__(inner.label)
        self.inner, self.kind, self.task, self._inner_names = inner, inner.kind, inner.task, names
        self._described = described
        self._infos = {k: inner.info(v) for k, v in names.items()}
        self.metadata, self.files, self.layout = inner.metadata, inner.files, inner.layout
        self.weight_files, self.other_files, self.root = inner.weight_files, inner.other_files, inner.root

    def get(self, name: str) -> torch.Tensor:
        return self.inner.get(self._inner_names[name])

    def reads_ranges(self, name: str) -> bool:
        return self.inner.reads_ranges(self._inner_names[name])

    def get_range(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self.inner.get_range(self._inner_names[name], start, stop)

    def check_unchanged(self) -> None:
        self.inner.check_unchanged()  # the files are the inner source's (it read them)

    def aliases(self) -> dict[str, str]:
        outer = {v: k for k, v in self._inner_names.items()}
        return {outer[k]: outer[v] for k, v in self.inner.aliases().items()}

    def describe(self) -> dict:
        return self.inner.describe() | self._described

    def close(self) -> None:
        self.inner.close()


class Renamed(_Named):
    """The base seen under its tasks' names: each of its tensors ``name`` as ``prefix + name``
    (a bare model, ``embeddings.*``, fine-tuned with a head, ``bert.embeddings.*``)."""

    def __init__(self, inner: Source, prefix: str):
        super().__init__(inner, {prefix + k: k for k in inner.keys()}, {"prefix": prefix})
        self.prefix = prefix


class Stripped(_Named):
    """A checkpoint whose tensor names lose ``prefix`` where they start with it (a training
    wrapper's: a LightningModule's ``model.``, DDP's ``module.``): see :func:`strip_prefix`."""

    def __init__(self, inner: Source, prefix: str):
        super().__init__(inner, {k.removeprefix(prefix): k for k in inner.keys()}, {"stripped": prefix})
        self.prefix = prefix


def strip_prefix(base: Source, tasks: dict[str, Source], prefix: str, *, exact: bool = False
                 ) -> tuple[Source, dict[str, Source]]:
    """The base and the tasks with ``prefix`` taken off each tensor name that starts with it
    (``PackOptions.strip_prefix``); an input none of whose names starts with it is left as it is.
    InvalidArgumentError when no name of any input starts with it; IncompatibleCheckpointsError
    where a name without it is one the checkpoint holds too, or (``exact``) where a task's
    safetensors file would lose its names: the exact tier gives such a file back byte for byte,
    its names included, which a renamed task no longer has.

    >>> base, tasks = strip_prefix(base, {"a": open_source("a.ckpt")}, "model.")
    >>> tasks["a"].keys()[:1]
    ['fc.weight']
    """
    inputs = {"the base": base, **{f"task {t!r}": s for t, s in tasks.items()}}
    if not any(k.startswith(prefix) for s in inputs.values() for k in s.keys()):
        shown = "; ".join(f"{what}: {s.keys()[0]!r}, ..." for what, s in inputs.items() if s.keys())
        raise InvalidArgumentError(f"strip_prefix {prefix!r} (--strip-prefix): no tensor name of the base or of any "
                                   f"task starts with it ({shown[:300]}); give the prefix their names have")
    out = {}
    for what, src in inputs.items():
        if not any(k.startswith(prefix) for k in src.keys()):
            out[what] = src
            continue
        if isinstance(src, ComponentsSource):
            raise InvalidArgumentError(f"{src.label}: {what} is a pipeline or a sentence-transformers model, whose "
                                       "tensor names are its folders'; strip_prefix (--strip-prefix) renames a "
                                       "model's own tensors")
        bare = next((k for k in src.keys() if k.startswith(prefix)
                     and (k.removeprefix(prefix)[:1] in ("", ".") or not prefix.endswith("."))), None)
        if bare is not None:  # 'module' for 'module.': no model names a tensor '.weight' (or ''); 'mod': 'ule.weight'
            raise InvalidArgumentError(f"strip_prefix {prefix!r} (--strip-prefix) would leave the tensor {bare!r} of "
                                       f"{what} as {bare.removeprefix(prefix)!r}; give the whole prefix, up to its "
                                       "last '.'")
        taken = next((k for k in src.keys() if k.startswith(prefix) and k.removeprefix(prefix) in src), None)
        if taken is not None:
            raise IncompatibleCheckpointsError(
                f"{src.label}: {what}: stripping {prefix!r} from {taken!r} gives {taken.removeprefix(prefix)!r}, a "
                "tensor it holds too; two tensors cannot have one name: pack it without strip_prefix (--strip-prefix)")
        if exact and what != "the base" and any(p.suffix == ".safetensors" for p in src.weight_files):
            raise IncompatibleCheckpointsError(
                f"{src.label}: {what}: its safetensors file names its tensors with {prefix!r} in front, and the exact "
                "tier (exact=True, --exact) gives that file back byte for byte, names included; pack it without "
                "strip_prefix (--strip-prefix) to keep the names, or without exact to rename its tensors")
        out[what] = Stripped(src, prefix)
        log.info("%s (%s): %r taken off its tensor names", what, src.label, prefix)
    return out.pop("the base"), dict(zip(tasks, out.values()))


#: A prefix is taken when the base's names with it cover at least this share of the base.
PREFIX_COVER = 0.5

#: Prefixes that a training wrapper puts before every name (DDP's and DataParallel's ``module``),
#: never a model's ``base_model_prefix``: a base is not matched under them.
WRAPPER_PREFIXES = ("module.",)


def aligned_base(base: Source, tasks: dict[str, Source]) -> Source:
    """The base, renamed when no task shares a tensor name with it but every task names the
    base's tensors with one prefix in front (Hugging Face's ``base_model_prefix``: the bare
    ``BertModel`` as the base, ``BertForSequenceClassification`` fine-tunes); else as it is."""
    names = base.keys()
    if not names or not tasks or any(n in src for src in tasks.values() for n in names):
        return base
    prefix = None
    for src in tasks.values():
        counts: dict[str, int] = {}
        for k in src.keys():
            head, dot, rest = k.partition(".")
            if dot and rest in base:
                counts[head + dot] = counts.get(head + dot, 0) + 1
        best = max(counts.items(), key=lambda kv: kv[1], default=None)
        if best is None or best[1] < PREFIX_COVER * len(names) or prefix not in (None, best[0]):
            return base
        prefix = best[0]
    assert prefix is not None
    if prefix in WRAPPER_PREFIXES:  # a DDP-saved family, not a bare base: the fine-tune check names the prefix
        return base
    log.warning("base %s: its tensors are named as the tasks' with %r in front (a bare model as the base, the "
                "tasks with a head); matched by those names, which the archive, its unpacked tasks and merged models "
                "keep (where %r is a training wrapper's, a LightningModule's self.model, and not the model's own, "
                "pack with strip_prefix=%r (--strip-prefix %s) to store them without it: a model folder written "
                "with the base's config.json does not load such names)", base.label, prefix, prefix, prefix, prefix)
    return Renamed(base, prefix)


def make_plan(base: Source, tasks: dict[str, Source], *, allow_mismatch: bool = False) -> Plan:
    """Classify every tensor name of the family.

    A tensor is ``merged`` when it is floating, in the base and in every task with the base's
    shape; ``task-own`` when only some tasks have it or shapes differ; ``base-only`` when no task
    has it. Raises IncompatibleCheckpointsError when a task does not look fine-tuned from the base
    (unless ``allow_mismatch``).
    """
    if not tasks:
        raise IncompatibleCheckpointsError("a family needs at least one task")
    if len(tasks) > MAX_TASKS:
        raise IncompatibleCheckpointsError(f"{len(tasks)} tasks; an archive holds at most {MAX_TASKS}")
    names: dict[str, None] = dict.fromkeys(base.keys())
    for src in tasks.values():
        names.update(dict.fromkeys(src.keys()))
    long = next((n for n in names if len(n) > MAX_NAME_CHARS), None)
    if long is not None:
        raise IncompatibleCheckpointsError(
            f"tensor name {long[:60]!r}... has {len(long)} characters; the format allows {MAX_NAME_CHARS}")
    for label, src in (("the base", base), *((f"task {t!r}", s) for t, s in tasks.items())):
        for name in src.keys():  # before any work: a shape the format cannot hold (safetensors can)
            try:
                check_shape(src.info(name).shape)
            except ValueError as e:
                raise IncompatibleCheckpointsError(f"{src.label}: {label}, tensor {name!r}: cannot be stored: {e}") \
                    from None
            # A surrogate code point (a pickle or a dict keeps one) is no Unicode character: no manifest
            # holds it (spec §3), and a pair of them would come back from the JSON as another name.
            # (check_json takes a pair, which its JSON round trip joins into one character.)
            if not name.isascii():
                try:
                    name.encode("utf-8")
                except UnicodeEncodeError as e:
                    raise IncompatibleCheckpointsError(
                        f"{src.label}: {label}, tensor {name!r}: its name cannot be stored (it holds "
                        f"{ascii(e.object[e.start:e.end])}: surrogates, which are no Unicode characters, not UTF-8 "
                        "text); rename the tensor") from None
    if not allow_mismatch:
        for task, src in tasks.items():
            _check_task(base, task, src)
    said = adapter(base)  # base and tasks alike adapters: they share names, and nothing else would say so
    if said is not None:
        log.warning("base %s: %s (packed as given, but TALL's masks are meant for a fine-tune's weights, not for "
                    "an adapter's factors)", base.label, said)
    out = []
    for name in names:
        have = tuple(t for t, src in tasks.items() if name in src)
        in_base = name in base
        if not have:
            kind = Kind.BASE_ONLY
        elif in_base and len(have) == len(tasks) and _maskable(base, name, tasks.values()):
            kind = Kind.MERGED
        else:
            kind = Kind.TASK_OWN
        out.append(TensorPlan(name, kind, have, in_base))
    _warn_dtypes(base, tasks, out)
    _warn_untied_copies(base, tasks, out)
    return Plan(tuple(tasks), tuple(out))


#: A tensor of at least this many bytes stored per task as a copy of another is warned of.
COPY_BYTES = 1 << 20


def _warn_untied_copies(base: Source, tasks: dict[str, Source], plan: list[TensorPlan]) -> None:
    """Warn of a tensor that every task holds, the base does not, and that equals, bit for bit in
    every task, another that the base holds, without being one tensor with it: a tied weight saved
    twice (torch.distributed.checkpoint's dcp_to_torch_save, a state dict of clones) beside a base
    that save_pretrained wrote (which keeps one name of a tie). It is stored per task, dense, where a
    tied one would be an alias (``sources.family_aliases``): four tasks of an 8000 x 256 embedding
    made 38 MB, tied 10.8 MB. Not stored once by tallpack: an alias reads as one tensor, tied, whose
    lossy read would be the other's rebuild, not this tensor's copy."""
    srcs = list(tasks.values())
    for e in plan:
        if e.kind is not Kind.TASK_OWN or e.in_base or len(e.tasks) != len(tasks):
            continue
        info = srcs[0].info(e.name)
        if info.nbytes < COPY_BYTES or any(e.name in s.aliases() for s in srcs):
            continue
        heads: list[torch.Tensor] = []  # (its first elements in each task, read once a candidate is seen)
        for other in base.keys():
            if not all(other in s and s.info(other) == info == s.info(e.name) for s in srcs):
                continue
            heads = heads or [_head(s, e.name) for s in srcs]  # first elements first: layers of one shape differ there
            if all(torch.equal(h, _head(s, other)) for s, h in zip(srcs, heads)) and all(
                    torch.equal(s.get(e.name), s.get(other)) for s in srcs):
                log.warning("tensors %r and %r are equal bit for bit in every task, but not one tensor (a tied weight "
                            "saved twice, as dcp_to_torch_save writes it), and the base holds %r alone: %r is stored "
                            "in every task, dense (%.1f MB each); tie them before saving (sd[%r] = sd[%r]; "
                            "torch.save(sd, PATH)) and it is stored once", e.name, other, other, e.name,
                            info.nbytes / 1e6, e.name, other)
                break


def _head(src: Source, name: str, n: int = 256) -> torch.Tensor:
    """The first ``n`` elements of tensor ``name``: read alone where the source reads ranges."""
    k = min(n, numel(src.info(name).shape))
    return src.get_range(name, 0, k) if src.reads_ranges(name) else src.get(name).reshape(-1)[:k]


#: The most names of dropped base-only tensors the pack warning lists.
SHOWN_DROPPED = 5


def warn_dropped(base: Source, plan: Plan) -> list[str]:
    """Warn once, and return, the base-only tensors a pack without ``keep_base_only`` drops: a
    merged model written with the base's config may need them (an untied base's ``lm_head.weight``
    whose fine-tunes are tied), and nothing in the archive names them afterwards.

    >>> warn_dropped(base, plan)
    ['lm_head.weight']
    """
    names = [t.name for t in plan.tensors if t.kind is Kind.BASE_ONLY]
    if names:
        shown = ", ".join(map(repr, names[:SHOWN_DROPPED])) + (", ..." if len(names) > SHOWN_DROPPED else "")
        one = len(names) == 1
        them = "it" if one else "them"
        log.warning("base %s: %d tensor%s that no task has %s not stored: %s; a merged model, written with the base's "
                    "files, lacks %s (a config that needs %s loads %s newly initialised): keep_base_only=True "
                    "(--keep-base-only) keeps %s", base.label, len(names), "" if one else "s", "is" if one else "are",
                    shown, them, them, them, them)
    return names


def _warn_dtypes(base: Source, tasks: dict[str, Source], plan: list[TensorPlan]) -> None:
    # Merged all the same (tau_t in float32, the task rebuilt in its own dtype), but where a task
    # was converted from the base's dtype, the rounding counts as fine-tuning: a float16 copy of a
    # float32 fine-tune's 10% changes gives masks of over 80% density. One warning for the tasks
    # of one dtype (twenty float32 fine-tunes of a bfloat16 base: one line, not twenty).
    alike: dict[tuple[str, str], list[tuple[str, int, str]]] = {}
    for task, src in tasks.items():
        differ = [e.name for e in plan if e.kind is Kind.MERGED and src.info(e.name).dtype != base.info(e.name).dtype]
        if differ:
            n = differ[0]
            alike.setdefault((src.info(n).dtype, base.info(n).dtype), []).append((task, len(differ), n))
    for (mine, theirs), said in alike.items():
        (task, count, n), more = said[0], len(said) - 1
        who = f"task {task!r}" + (f" (and {more} more task{'s' if more > 1 else ''} in {mine})" if more else "")
        if holds(mine, theirs):  # float32 fine-tunes of a bfloat16 base: no rounding, but merged models narrow
            log.warning("%s: %d merged tensor(s) differ in dtype from the base (%r: %s, base %s); the base widens "
                        "exactly (masks and rebuilds as a %s base gives), but merged models come out in the base's "
                        "%s, which rounds away changes below its precision: a %s copy of the base keeps them", who,
                        count, n, mine, theirs, mine, theirs, mine)
        else:
            log.warning("%s: %d merged tensor(s) differ in dtype from the base (%r: %s, base %s); rounding to the "
                        "task's dtype counts as fine-tuning (denser masks, a larger archive): a base in the tasks' "
                        "dtype avoids it", who, count, n, mine, theirs)


def _maskable(base: Source, name: str, tasks) -> bool:
    b = base.info(name)
    return b.dtype in FLOATING and all(
        s.info(name).shape == b.shape and s.info(name).dtype in FLOATING for s in tasks
    )


def _check_task(base: Source, task: str, src: Source) -> None:
    tied = src.aliases()  # a tied weight is one tensor of the task, whatever its names
    common = [n for n in src.keys() if n in base and n not in tied]
    differ = [n for n in common if src.info(n).shape != base.info(n).shape]
    if not common or len(differ) * 2 > len(common):
        examples = ", ".join(
            f"{n!r} {tuple(src.info(n).shape)} vs base {tuple(base.info(n).shape)}" for n in differ[:3]
        )
        what = (f"{len(differ)} of its {len(common)} tensors named as in the base differ in shape ({examples})"
                if common else "it shares no tensor name with the base")
        hint = None if common else prefix_hint(base, src)  # a wrapper's prefix: no mismatch to allow
        in_memory = src.kind == "dict"  # its label already names the task, and there is no path to check
        raise IncompatibleCheckpointsError(
            f"task {task!r}{'' if in_memory else f' ({src.label})'} does not look fine-tuned from the base: "
            + (hint or f"{what}; check the {'tensors given' if in_memory else 'paths'}, or pass allow_mismatch=True "
               "(--allow-mismatch) to pack it anyway")
        )
