"""The packer: stream a family through the plan, the merge method and the encodings into a container.

Memory is bounded by one tensor of every task at a time (the native tensors) plus float32 work
buffers of one chunk per task, never by the family's size.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
from collections.abc import Callable, Generator, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from pathlib import Path
from typing import Any, cast

from . import kernels, memory
from ._torch import imported, torch
from ._version import __version__
from .container import ContainerWriter
from .dial import Dial
from .elements import numel
from .encodings import BY_KIND, Item, Later, WriteContext, settled
from .encodings.exact import RESIDUAL_CODECS, add_exact
from .encodings.shared import keeps_base
from .errors import CheckpointError, InvalidArgumentError, OutputExistsError
from .folders import FileStore
from .fsutil import file_identity, writing
from .groups import GROUP_ELEMENTS, SMALL_ELEMENTS, Member, concat, group_elements, layout
from .inputs import PackInputs, TasksLike
from .manifest import Manifest, TaskInfo, TensorEntry, count_kinds
from .memory import release_thread_buffers
from .options import PackOptions, Validated
from .originals import record
from .plan import Kind, TensorPlan, warn_dropped
from .progress import track
from .selection import select_lambdas, tied_evaluator
from .sources import Source, SourceLike, family_aliases, stem, tied_in_base_alone
from .staging import check_file_output, exists, fetched, local_path, staged
from .remote import redact
from .storage import is_url
from .tall import TALL_RANGE, Fidelity

log = logging.getLogger(__name__)


def pack(base: SourceLike, tasks: TasksLike, out: str | os.PathLike, options: PackOptions | None = None,
         *, storage_options: dict[str, Any] | None = None, **overrides: Any) -> Manifest:
    """Pack a base model and its fine-tunes into one ``.tallpack`` archive; returns its manifest.

    ``tasks`` maps names to checkpoints (paths, folders or dicts of tensors); a list takes each
    path's stem as its name. Options are a :class:`~tallpack.options.PackOptions` or its fields as
    keywords: ``lambdas`` (one value or one per task; with ``evaluate`` each task's lambda is
    chosen from ``lambda_grid`` by its score, except the tasks ``lambdas`` maps), ``merge`` (``"ta"``, ``"ties"`` or
    ``{"method": "ties", "top_k": 0.3}``), ``codec``, ``level``, ``chunk_elements``, ...
    ``out`` may be a URL fsspec understands: the archive is written locally, then uploaded
    (``storage_options`` go to fsspec).

    >>> pack("base/", {"cars": "ft/cars", "dtd": "ft/dtd"}, "family.tallpack", lambdas=0.4)
    """
    try:
        opts = (options or PackOptions()).replace(**overrides)
    except TypeError as e:
        raise InvalidArgumentError(f"pack: {e}") from None
    v = opts.validated()
    opts = v.options  # numbers as Python's (numpy's scalars given)
    _check_pack_call(tasks, out)
    # never a device, a link or a folder, even with overwrite (URLs too), nor in a folder that is not there
    check_file_output(out, storage_options, what="the archive's", example="family.tallpack")
    there = exists(out, storage_options) if is_url(out) else os.path.lexists(local_path(out))
    if not opts.overwrite and there:  # before any input is read (or, at URLs, downloaded)
        raise OutputExistsError(f"{redact(str(out))}: already exists; pass --force (overwrite=True) to replace it")
    named: dict[str | int, SourceLike] = (dict(tasks.items()) if isinstance(tasks, Mapping)
                                          else {i: t for i, t in enumerate(tasks)})
    with fetched({"\0base": base, **named}, storage_options) as (local, origin):  # URL inputs, downloaded
        local_tasks = ({k: local[k] for k in tasks} if isinstance(tasks, Mapping)
                       else [local[i] for i in range(len(named))])
        if origin and not isinstance(tasks, Mapping):  # named after the URL's last part, as a path is
            if any(isinstance(t, Mapping) for t in tasks):
                raise InvalidArgumentError("a task given as a dict of tensors needs a name: pass {name: dict}")
            names = [stem(origin.get(str(v), v)) for v in local_tasks]  # named as its URL, less any query
            twice = next((n for i, n in enumerate(names) if n in names[:i]), None)
            if twice is not None:  # .../a/model.safetensors and .../b/model.safetensors: one would go
                raise InvalidArgumentError(f"task {twice!r} given twice; name tasks with NAME=PATH ({{name: url}})")
            local_tasks = dict(zip(names, local_tasks))
        imported()  # torch, whole whatever Ctrl-C does: the inputs' safe_open would import it unguarded
        fam = PackInputs(local["\0base"], local_tasks, allow_mismatch=opts.allow_mismatch,
                         chunk_elements=opts.chunk_elements, strip=opts.strip_prefix, exact=opts.exact)
        for src in (fam.base, *fam.tasks.values()):
            src.label = origin.get(src.label, src.label)  # errors and the manifest name the URL
        try:
            _refuse_own_inputs(out, fam)
        except BaseException:  # the inputs' open files closed now (_pack_opened closes them after)
            fam.close()
            raise
        replaced = file_identity(local_path(out)) if there and not is_url(out) else None
        manifest = _pack_opened(fam, opts, v, out, storage_options)
    _warn_open_on(replaced, out)
    return manifest


def _warn_open_on(replaced: tuple[int, int] | None, out: str | os.PathLike) -> None:
    """A warning when archives open in this process are on the file ``out`` replaced: they read
    the old archive (a notebook's cell that packs run again, the one that opened not)."""
    from .reader import _OPEN

    stale = [a for a in list(_OPEN) if replaced is not None and not a._closed
             and getattr(a.source, "device_inode", None) == replaced]
    if stale:
        log.warning("%s: replaced, but %s open in this process still read%s the old archive: open it again "
                    "(tallpack.open)", out, "an Archive" if len(stale) == 1 else f"{len(stale)} Archives",
                    "s" if len(stale) == 1 else "")


def _input_changed(fam: PackInputs) -> CheckpointError | None:
    """``Source.check_unchanged``'s refusal of an input file changed while it was packed, if one
    was: a pack that failed reports it rather than what the change led to (a tensor read a block
    at a time is read in several passes, which then disagree: a NaN the first did not see)."""
    for src in (fam.base, *fam.tasks.values()):
        try:
            src.check_unchanged()
        except CheckpointError as e:
            return e
    return None


def _check_pack_call(tasks: object, out: object) -> None:
    """InvalidArgumentError for ``tasks`` given as one checkpoint, or an ``out`` that is no path."""
    if isinstance(tasks, (str, bytes, os.PathLike)):
        raise InvalidArgumentError("tasks must be a mapping {name: checkpoint} or a list of checkpoints, "
                                   f"got a {type(tasks).__name__} (one task: [{tasks!r}])")
    if not hasattr(tasks, "__iter__"):
        raise InvalidArgumentError("tasks must be a mapping {name: checkpoint} or a list of checkpoints, "
                                   f"got a {type(tasks).__name__}")
    if isinstance(tasks, Mapping):
        tensor = next((k for k, v in tasks.items() if isinstance(v, torch.Tensor)), None)
        if tensor is not None:
            raise InvalidArgumentError(f"tasks maps {tensor!r} to a tensor: for one task's state dict, pass "
                                       "{name: state_dict}")
    if not isinstance(out, (str, os.PathLike)):
        raise InvalidArgumentError(f"out must be the archive's path or URL, got {type(out).__name__}")


def _refuse_own_inputs(out: str | os.PathLike, fam: PackInputs) -> None:
    """InvalidArgumentError when the archive would replace one of the files it is packed from
    (``overwrite`` allows replacing an old archive, not the checkpoints)."""
    if is_url(out) or not os.path.exists(out):
        return
    for src in (fam.base, *fam.tasks.values()):
        for path in (*src.weight_files, *src.other_files, *src.files.values()):
            try:
                same = os.path.samefile(out, path)
            except OSError:
                continue
            if same:
                raise InvalidArgumentError(f"{out}: is one of the files packed ({src.label}: {path}); "
                                           "write the archive elsewhere")


def _pack_opened(fam: PackInputs, opts: PackOptions, v: Validated, out: str | os.PathLike,
                 storage_options: dict[str, Any] | None) -> Manifest:
    try:
        names = list(fam.tasks)
        aliases = family_aliases(fam.base, fam.tasks)
        if aliases:  # a tied weight: stored once, its other names recorded (spec §3.8)
            log.info("%d tensor name(s) stored as aliases of another: %s", len(aliases),
                     ", ".join(f"{a!r} -> {t!r}" for a, t in list(aliases.items())[:5]))
        tied_alone = tied_in_base_alone(fam.base, fam.tasks, aliases)
        if tied_alone:  # the base's second name of a weight the tasks hold under another: not the base's own
            log.info("base: %s, tied to a tensor every task holds under another name, is left out as the tasks leave "
                     "it out", ", ".join(map(repr, tied_alone)))
        if aliases or tied_alone:
            fam.plan = dataclasses.replace(fam.plan, tensors=tuple(
                e for e in fam.plan.tensors if e.name not in aliases and e.name not in tied_alone))
        if v.method.max_tasks is not None and len(names) > v.method.max_tasks:
            raise InvalidArgumentError(f"{v.method.name} archives hold at most {v.method.max_tasks} tasks")
        lams = v.lambdas(names)
        log.info("plan: %d merged, %d task-own, %d base-only tensors", fam.plan.count(Kind.MERGED),
                 fam.plan.count(Kind.TASK_OWN), fam.plan.count(Kind.BASE_ONLY))
        if not opts.keep_base_only:
            warn_dropped(fam.base, fam.plan)
        v.method.prepare(fam.passes, len(names), fam.input_passes)
        selection = None
        if opts.evaluate is not None:
            given = opts.lambdas if isinstance(opts.lambdas, Mapping) else {}
            selection = select_lambdas(fam, v.method, tied_evaluator(opts.evaluate, aliases), grid=opts.lambda_grid,
                                       fixed={t: lams[t] for t in given})
            lams = selection.chosen
        with staged(out, storage_options, overwrite=opts.overwrite) as local:
            return _write(fam, v, lams, local, selection.to_dict() if selection else None, aliases,
                          dict.fromkeys(tied_alone, ""))
    except Exception as e:
        changed = None if isinstance(e, CheckpointError) else _input_changed(fam)  # (a file's own error says it)
        if changed is not None:  # the cause: a large tensor's passes (read a block at a time) then disagree
            raise changed from None
        raise
    finally:
        fam.close()
        release_thread_buffers()  # what reconstructing fidelity figures kept in this thread


def _write(fam: PackInputs, v: Validated, lams: dict[str, float], out: Path, selection: dict | None,
           aliases: dict[str, str], tied_alone: Mapping[str, str]) -> Manifest:
    opts = v.options
    once = {**aliases, **tied_alone}  # names of a tensor counted under another: its bytes once
    names = list(fam.tasks)
    fidelity = {t: Fidelity() for t in names}
    entries: list[TensorEntry | Later | None] = []
    tensors = track(fam.plan.tensors, opts.progress, "packing")
    dial = _dial(fam, v, aliases)
    sources = [fam.base, *fam.tasks.values()]
    features = (v.features() | ({"field:files"} if any(s.files for s in sources) else set())
                | ({"field:aliases"} if aliases else set()))
    with writing(out), ContainerWriter(out, threads=opts.threads, checksum=opts.checksum,
                                       features=frozenset(features), overwrite=opts.overwrite) as w:
        store = FileStore(w, opts.level, opts.chunk_elements)
        base_files = store.add(fam.base.files, "base")
        ctx = WriteContext(w, opts.chunk_elements, v.dense, v.masks(), v.method,
                           lams, fidelity, v.residuals if opts.exact or dial else None,
                           {} if v.derive_masks else None, {} if v.derive_merged else None,
                           threads=opts.threads or kernels.default_threads(), defer=not opts.exact and dial is None)
        pending: dict[int, str] = {}  # with the dial: merged tensors, written once it has decided
        groups = _Groups(ctx, {e.name for e in fam.plan.tensors}, group_elements(len(names))) if v.group else None

        def write_one(item: Item) -> None:
            if item.kind != item.planned and item.planned == Kind.MERGED and item.kind == Kind.TASK_OWN:
                log.warning("tensor %r: %s: stored per task, not masked (a merged model leaves it out; task=NAME, "
                            "--task NAME, takes a task's)", item.name, _out_of_range(item, opts.chunk_elements))
            if groups is not None and groups.add(item, entries):
                return
            if dial is not None and item.kind == Kind.MERGED:
                dial.observe(ctx, item)
                pending[len(entries)] = item.name
                entries.append(None)
                return
            written = BY_KIND[item.kind].write(ctx, item)
            memory.give_back(numel(item.shape))  # the write's buffers, before the next tensor's (or the exact's)
            entries.append(add_exact(ctx, item, settled(ctx, written), codecs=RESIDUAL_CODECS) if opts.exact
                           else written)

        with closing(_loaded(fam, tensors, opts.keep_base_only)) as loaded:  # (its loader ends before inputs close)
            for item in loaded:
                write_one(item)
                del item  # (its inputs let go before the next tensor's are read: see _loaded)
        if groups is not None:
            groups.flush_all(entries)
        done: list[TensorEntry | None] = [None if e is None else settled(ctx, e) for e in entries]
        task_files = {t: store.add(src.files, f"task {t!r}") for t, src in fam.tasks.items()}

        def described(src: Source) -> dict[str, Any]:
            d = src.describe()
            if once:  # its bytes as the file holds them: a tied weight once
                d["bytes"] = _bytes_once(src, once)
            return d if opts.record_paths else {k: v for k, v in d.items() if k != "path"}

        def manifest() -> Manifest:
            stored = [e for e in done if e is not None]  # every place is filled by now
            infos = []
            for t in names:
                src, fid = fam.tasks[t], fidelity[t]
                figures = fid.to_dict() | (dial.achieved[t] if dial is not None and t in dial.achieved else {})
                infos.append(TaskInfo(t, lams[t], fid.density if fid.numel else None, figures,
                                      tuple(src.keys()), described(src), src.metadata,
                                      record(src) if opts.exact else None, task_files[t]))
            return Manifest(
                w.version, f"tallpack {__version__}", v.method.params(), tuple(infos), tuple(stored),
                base=described(fam.base) | {"metadata": fam.base.metadata} | ({"files": base_files} if base_files else {}),
                stats={"source_bytes": sum(_bytes_once(s, once) for s in sources), "kinds": count_kinds(stored),
                       **({"selection": selection} if selection else {}),
                       **({"dial": dial.record()} if dial is not None else {})},
                metadata=dict(opts.metadata or {}), checksum=w.checksum_name, files=store.blobs,
                requires=(*(("groups",) if any(e.members for e in stored) else ()), *(("aliases",) if aliases else ())),
                aliases=aliases,
            )

        if dial is not None:  # the fidelity dial: decide on the TALL tier's size, then write merged tensors
            plans = {e.name: e for e in fam.plan.tensors}
            _write_dialed(dial, ctx, done, pending, lambda name: fam.load(plans[name]),
                          lambda: w.size_with(manifest().to_dict()))
        _warn_overflow(fidelity, "a higher --fidelity or --budget mends them" if dial is not None else
                       "the exact tier keeps them: read with exact=True (unpack --exact)" if opts.exact else
                       "pack with --exact or --fidelity to keep them")
        result = manifest()
        for src in sources:  # after the exact tier hashed the files (in ``manifest``)
            src.check_unchanged()
        w.finish(result.to_dict(), check=Manifest.from_dict)
    return result if dial is None or dial.hint is None else dataclasses.replace(result, hints=(dial.hint,))


class _Groups:
    """The packer's tensor groups (format 1.12, ``tallpack.groups``): merged and shared tensors
    of fewer than SMALL_ELEMENTS elements are held, per kind, dtype and set of tasks, and written
    together as one flat tensor of at most ``cap`` elements (``groups.group_elements``), whose
    entry lists them as its members."""

    def __init__(self, ctx: WriteContext, names: set[str], cap: int = GROUP_ELEMENTS):
        self.ctx, self.names, self.cap = ctx, set(names), cap
        self.held: dict[tuple, list[Item]] = {}
        self.ends: dict[tuple, int] = {}  # each held group's length so far (``layout``'s total)
        self.count = 0

    def add(self, item: Item, entries: list[TensorEntry | Later | None]) -> bool:
        """Hold ``item`` for a group (writing a full group to ``entries`` first); False when it is
        not a tensor to group."""
        base_dt, dts = item.dtypes  # (shapes and dtypes first: an item read a block at a time stays so)
        if not dts or not 0 < numel(item.shape) < SMALL_ELEMENTS:
            return False
        if item.kind == Kind.MERGED.value:  # base and every task of one dtype (the rebuild's)
            if base_dt is None or any(dt != base_dt for dt in dts):
                return False
        elif item.kind != Kind.SHARED.value:  # task-own tensors differ per task: stored alone
            return False
        elif keeps_base(item):  # tasks agreeing on another value than the base's keep it: alone
            return False
        first = item.thetas[0]  # (a tensor to group: held whole)
        base_dtype = item.base.dtype if item.base is not None and item.planned == Kind.MERGED.value else None
        key = (item.kind, item.planned, first.dtype, base_dtype, item.tasks)
        size = layout([first.shape])[1]
        if key in self.held and self.ends[key] + size > self.cap:
            self._flush(key, entries)
        self.held.setdefault(key, []).append(item)
        self.ends[key] = self.ends.get(key, 0) + size
        return True

    def flush_all(self, entries: list[TensorEntry | Later | None]) -> None:
        for key in list(self.held):
            self._flush(key, entries)

    def _flush(self, key: tuple, entries: list[TensorEntry | Later | None]) -> None:
        items = self.held.pop(key)
        del self.ends[key]
        if len(items) == 1:  # a group of one would only add a level
            entries.append(BY_KIND[key[0]].write(self.ctx, items[0]))
            return
        kind, planned, _, base_dtype = key[:4]
        tasks, shapes = items[0].tasks, [tuple(x.thetas[0].shape) for x in items]
        offsets, length = layout(shapes)
        members = tuple(Member(x.name, o, s) for x, o, s in zip(items, offsets, shapes))
        # (with a base dtype, every item has a base: ``add``)
        bases = cast("list[torch.Tensor]", [x.base for x in items]) if base_dtype is not None else None
        columns: list[list[torch.Tensor] | None] = [[x.thetas[i] for x in items] for i in range(len(tasks))]
        del items  # each task's members are let go once laid out: the group costs its size once, not twice
        base = concat(bases, offsets, length) if bases is not None else None
        bases = None
        flats = []
        for i, column in enumerate(columns):
            assert column is not None
            flats.append(concat(column, offsets, length))
            columns[i] = None
        written_name = self._name()
        written = BY_KIND[kind].write(self.ctx, Item(written_name, planned, kind, tasks, base, flats))
        if kind == Kind.MERGED.value:
            gap = length - sum(m.numel for m in members)
            for t in tasks:  # the gaps' elements are zero everywhere: no mask bit, no error
                self.ctx.fidelity[t].numel -= gap
                self.ctx.fidelity[t].split_overflow(written_name, [(m.name, m.offset, m.numel) for m in members])
        self.ctx.writer.use("field:members")
        if isinstance(written, Later):
            later = written
            entries.append(Later(lambda: dataclasses.replace(later.entry(), members=members)))
        else:
            entries.append(dataclasses.replace(written, members=members))

    def _name(self) -> str:
        """A group's entry name, unlike any tensor's."""
        while True:
            name = f"tallpack.group.{self.count}"
            self.count += 1
            if name not in self.names:
                self.names.add(name)
                return name


def _warn_overflow(fidelity: Mapping[str, Fidelity], remedy: str) -> None:
    """One warning naming the tensors that a task rebuilds as +-inf or NaN where its original is
    finite (``Fidelity.overflow``: a float16 or float8 TALL rebuild past the dtype's range), and
    ``remedy``, what to do."""
    found = [(t, name, n) for t, fid in fidelity.items() for name, n in fid.overflow.items()]
    if found:
        log.warning("%d tensor(s) rebuild as inf or NaN where the original is finite (the TALL rebuild overflows "
                    "the dtype there): %s; %s", len(found),
                    ", ".join(f"task {t!r} tensor {name!r} ({n} element{'s' if n > 1 else ''})"
                              for t, name, n in found[:5]) + (" ..." if len(found) > 5 else ""),
                    remedy)


def _write_dialed(dial: Dial, ctx: WriteContext, entries: list[TensorEntry | None], pending: dict[int, str],
                  load: Callable[[str], Item], size: Callable[[], int]) -> None:
    """Write the merged tensors as the dial decides; with a budget, while the dial asks (``refit``,
    given what the archive would be), drop them and write them again with its estimate corrected."""
    mark, figures = ctx.writer.mark(), copy.deepcopy(ctx.fidelity)
    dial.finish(ctx, entries, pending, load)
    while dial.refit(size()):
        ctx.writer.rewind(mark)
        ctx.fidelity.update(copy.deepcopy(figures))  # the plain TALL figures, added again as written
        for i in pending:
            entries[i] = None
        dial.finish(ctx, entries, pending, load)


#: The next tensor is loaded while this one is written (``_loaded``) when its inputs take at most
#: this many bytes; a larger one after this one's are let go: the read-ahead then adds at most
#: this much to a pack's memory, whatever the number of tasks (T + 1 copies of a 4 MB tensor
#: read ahead beside T + 1 copies of a 16 MB one: 16 tasks, 1.3 x the largest tensor per task).
READ_AHEAD_BYTES = 64 << 20


def _loaded(fam: PackInputs, tensors: Iterable[TensorPlan], keep_base_only: bool) -> Generator[Item, None, None]:
    """Each tensor to store, loaded (``PackInputs.load``: its inputs read, their finiteness and
    equality checked, its kind settled), the next one on a helper thread while the caller writes
    this one when it is small enough (READ_AHEAD_BYTES): the checks' first reads of the inputs
    then overlap the writing. The caller lets go of each item before asking for the next."""
    todo = (e for e in tensors if keep_base_only or e.kind is not Kind.BASE_ONLY)
    loader = ThreadPoolExecutor(1, thread_name_prefix="tallpack-load")
    ahead = None
    try:
        ahead = next((loader.submit(fam.load, e) for e in todo), None)
        while ahead is not None:
            item = ahead.result()
            later = next(todo, None)
            ahead = None
            if later is not None and fam.held_bytes(later) <= READ_AHEAD_BYTES:
                ahead, later = loader.submit(fam.load, later), None
            yield item
            del item  # (this tensor's inputs let go before a large next one's are read)
            if later is not None:
                ahead = loader.submit(fam.load, later)
    finally:
        if ahead is not None:
            ahead.cancel()
        _shut_down(loader)


def _shut_down(pool: ThreadPoolExecutor) -> None:
    """``pool.shutdown(wait=True)``, however many Ctrl-C's (or SIGTERMs) come meanwhile: the
    cleanup of the first one, which closes the inputs the pool's task reads only after it (one
    tensor's load); a second one printed "Exception ignored" and left the loader reading."""
    while True:
        try:
            pool.shutdown(wait=True)
            return
        except BaseException as e:  # noqa: BLE001 (a signal's, during the wait: the first is already unwinding)
            if isinstance(e, Exception):
                raise


def _out_of_range(item: Item, elements: int) -> str:
    """Why a tensor planned as merged is out of TALL's range (``tall.in_tall_range``), naming the
    tasks (read again a block at a time: a diverged fine-tune is rare)."""
    limit = TALL_RANGE / (len(item.tasks) + 1)
    nonfinite, large = [], []
    for i, t in enumerate(item.tasks):
        for _, b, x in item.task_blocks(i, elements):
            assert b is not None  # (planned merged: the base has it)
            if not bool(torch.isfinite(b.float()).all()):
                return "the base holds inf or NaN"
            if not bool(torch.isfinite(x.float()).all()):
                nonfinite.append(t)
                break
            if x.numel() and float((x.float() - b.float()).abs().max()) >= limit:
                large.append(t)
                break
    said = [f"task{'s' if len(ts) > 1 else ''} {', '.join(map(repr, ts))} {what}" for ts, what in (
        (nonfinite, "hold" + ("" if len(nonfinite) > 1 else "s") + " inf or NaN"),
        (large, f"differ{'' if len(large) > 1 else 's'} from the base by {limit:.3g} or more, too much for "
                "float32 sums")) if ts]
    return "; ".join(said) or "values out of TALL's range"


def _bytes_once(src: Source, aliases: Mapping[str, str]) -> int:
    """The bytes of a checkpoint's tensors, each tensor of several names (``aliases``) once."""
    return src.nbytes - sum(src.info(a).nbytes for a in aliases if a in src)


def _dial(fam: PackInputs, v: Validated, aliases: Mapping[str, str]) -> Dial | None:
    """The fidelity dial for these options, or None when off."""
    opts = v.options
    if not v.dial:
        return None
    one = sum(_bytes_once(s, aliases) for s in fam.tasks.values()) / len(fam.tasks)  # the average task checkpoint
    budget = None if opts.budget is None else int(opts.budget * one)
    sensitivity = None if opts.sensitivity is None else _check_sensitivity(opts.sensitivity, fam, aliases)
    evaluate = None if opts.evaluate is None else tied_evaluator(opts.evaluate, aliases)
    return Dial(target=opts.fidelity, budget_bytes=budget, allowed=opts.corrections,
                evaluate=evaluate, sources=fam.tasks, unit_bytes=one, sensitivity=sensitivity)


def _check_sensitivity(sensitivity: Mapping[str, Mapping[str, Any]], fam: PackInputs,
                       aliases: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """The sensitivity by the names stored: every task and tensor it names is in the family (a
    misspelt name would silently weigh nothing), and a tied weight's alias (spec §3.8) weighs its
    target, the one tensor stored; the weights themselves are checked when their tensor is measured."""
    out = {}
    for t, by_name in sensitivity.items():
        if t not in fam.tasks:
            raise InvalidArgumentError(f"sensitivity names task {t!r}, which is not one of the tasks packed")
        have = {e.name for e in fam.plan.tensors if t in e.tasks}
        unknown = sorted(n for n in by_name if n not in have and aliases.get(n) not in have)
        if unknown:
            raise InvalidArgumentError(f"sensitivity of task {t!r} names tensors it does not have: "
                                       f"{', '.join(map(repr, unknown[:5]))}{' ...' if len(unknown) > 5 else ''}")
        weights = {n: w for n, w in by_name.items() if n not in aliases}
        for n, w in by_name.items():
            target = aliases.get(n)
            if target is None:
                continue
            if target in weights and not _same_weights(weights[target], w):
                raise InvalidArgumentError(
                    f"sensitivity of task {t!r} gives {n!r} and {target!r} different weights, but they are one "
                    f"tensor (tied: {n!r} is stored as {target!r}); give one of them")
            weights.setdefault(target, w)
        out[t] = weights
    return out


def _same_weights(a: Any, b: Any) -> bool:
    """Whether two sensitivity weights are the same values (after broadcasting; False when either
    is no tensor, which measuring then refuses)."""
    if a is b:
        return True
    try:
        x, y = torch.broadcast_tensors(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64))
        return bool(torch.equal(x, y))
    except (TypeError, ValueError, RuntimeError):
        return False
