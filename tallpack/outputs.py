"""Outputs: write a rebuilt task, every task, or a merged model as a safetensors checkpoint folder.

A folder has the task's original shard files and index when the archive recorded them (or shards
of ``max_shard_size``), and the folder's other files (config, tokenizer, model card) when the
archive kept them. Every file of one call is written under a temporary name beside its target and
renamed into place only when all of them are complete (:func:`tallpack.fsutil.transaction`): a
call that fails (a full disk, a damaged archive) leaves no file under an output's name, removes its
temporaries and the folders it created, and leaves existing files as they were. An existing output
is replaced only with ``overwrite=True`` (``--force``). An output that is a URL is written locally,
then uploaded (:mod:`tallpack.staging`).
"""

from __future__ import annotations

import logging
import json
import os
import shutil
import tempfile
import unicodedata
from collections.abc import Collection, Iterator, Mapping, Sequence, Set
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import reader
from ._torch import torch
from .dtypes import torch_dtype
from .elements import itemsize, numel
from .encodings import Use
from .errors import InvalidArgumentError, UnsupportedVersionError
from .folders import MODULES, check_no_clash, component_of, write_files
from .fsutil import atomic_write, check_inside, check_not_read, make_folder, reading, transaction
from .manifest import task_name_problem
from .merging import check_alpha, default_alpha, is_consensus
from .merged import default_model
from .originals import _Bytes, rebuilt_whole, write_originals
from .progress import Labelled, ProgressLike
from .remote import redact
from .sharding import (INDEX, SINGLE, plain_weights, plan_by_size_as, plan_from_layout, planned_files, previous_in,
                       previous_weights, single_file, weights_among, write_shards)
from .staging import check_planned, local_path, staged
from .storage import is_url

if TYPE_CHECKING:
    from .reader import Archive

log = logging.getLogger(__name__)


def write_checkpoint(
    state_dict: Mapping[str, torch.Tensor],
    outdir: str | os.PathLike,
    *,
    metadata: Mapping[str, Any] | None = None,
    config: Mapping[str, Any] | None = None,
    layout: Mapping[str, Any] | None = None,
    max_shard_size: int | str | None = None,
    sizes: Mapping[str, int] | None = None,
    progress: ProgressLike = None,
    overwrite: bool = False,
    specs: Mapping[str, tuple[torch.dtype, tuple[int, ...]]] | None = None,
    also: Collection[str] = (),
    where: str | None = None,
    modules: bool = False,
) -> Path:
    """Write ``OUTDIR/model.safetensors`` (and ``config.json`` when given); returns the file's path.

    With ``max_shard_size`` (``"5GB"``), or a recorded ``layout`` (``{"shards": [[file, count],
    ...], "index_metadata": {...}}``, from the archive), shards and ``model.safetensors.index.json``
    instead; then the index's path is returned. ``sizes`` (bytes per tensor) spares reading a lazy
    ``state_dict`` to plan by size, and ``specs`` (dtype and shape per tensor) let a lazy one be read
    one tensor at a time while it is written. Existing files are replaced only with ``overwrite``.
    ``also`` names the files the caller adds to the folder afterwards (in the same transaction):
    one that is the folder of another or of a weight file is refused before anything is written
    (a FormatError that starts with ``where``). With ``overwrite``, the weight files of an earlier
    write in the folder that this one does not replace are removed: ``model.safetensors``, shards
    and their index, ``pytorch_model.bin`` and its shards and index, diffusers' same names, their
    variants (never a file of another name: an exact unpack's originals, which nothing tells
    apart from the checkpoints a family was packed from, are left, with a warning). A layout of a
    sentence-transformers model (its ``format``, or ``modules``: the folder files hold
    ``modules.json``) is sharded at its top only, each module's weights one file, as
    sentence-transformers loads them; the folder is returned, as a pipeline's is.

    >>> write_checkpoint(fam.state_dict("cars"), "cars/", metadata={"task": "cars"})
    """
    with transaction(overwrite=overwrite) as tx:
        out = make_folder(outdir)
        meta = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
        keys = list(state_dict)
        modules = modules or (layout or {}).get("format") == "sentence-transformers"
        plan = None
        if max_shard_size is not None:
            sizes = sizes or {k: state_dict[k].numel() * state_dict[k].element_size() for k in keys}
            # a pipeline: each component apart; a diffusers model: under diffusers' names
            plan = plan_by_size_as({k: sizes[k] for k in keys}, (layout or {}).get("shards"), max_shard_size,
                                   modules=modules)
        elif layout:
            plan = plan_from_layout(keys, layout.get("shards"))
        plan = plan or {single_file((layout or {}).get("shards")): keys}
        where = str(out) if where is None else where
        for fname, group in plan.items():  # (a component's file holds its names without the folder)
            reserved = "/".join([*fname.split("/")[:-1], "__metadata__"])
            if reserved in group:
                raise InvalidArgumentError(f"{where}: tensor {reserved!r} cannot be written: safetensors keeps the "
                                           "name '__metadata__' for a file's metadata")
        names = {*planned_files(plan), *(["config.json"] if config is not None else [])}
        check_no_clash([*names, *also], where)
        for fname in [*sorted(names), *also]:
            if "/" in fname:  # a component's: its folder not a link out of the output
                check_inside(out, out / fname)
            tx.check(out / fname)  # before anything is written
        check_planned(out / fname for fname in sorted(names))  # the same, at a URL written to
        # The weights of an earlier write in this folder that the new layout does not have (a
        # model.safetensors beside new shards would be loaded instead of them; shards and an index
        # of another layout would mislead) are removed when the new files are in place.
        tx.remove_found_on_commit(out, lambda: previous_in(out, plan) - names)
        target = write_shards(state_dict, plan, out, metadata=meta, sizes=sizes,
                              index_metadata=(layout or {}).get("index_metadata"), progress=progress, specs=specs,
                              components=_components(layout))
        if config is not None:
            atomic_write(out / "config.json", lambda tmp: tmp.write_text(json.dumps(config, indent=2) + "\n"))
        return out if modules else target  # a sentence-transformers model: its folder, with or without modules


def _components(layout: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    """A recorded pipeline layout's ``components`` (each one's index metadata), where it is an object."""
    c = (layout or {}).get("components")
    return c if isinstance(c, Mapping) else None


def task_metadata(archive: "Archive", task: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The safetensors metadata and HF config to write beside an unpacked task: tallpack's keys,
    and the original files' header metadata (a license, ...) but for its ``format`` (the files
    written are PyTorch's) and ``tallpack.*`` keys (an earlier unpack's, which would misdescribe
    this one)."""
    info = archive.task_info(task)
    meta = {"tallpack.task": task, "tallpack.lambda": info.lam, "tallpack.archive": os.path.basename(archive.name.rstrip("/"))}
    for k, v in info.metadata.items():
        if isinstance(v, str) and k != "format" and not k.startswith("tallpack."):
            meta.setdefault(k, v)
    config = info.metadata.get("config")
    return meta, config if isinstance(config, dict) else None  # a header's "config" string is not config.json


def _task_tensors(archive: "Archive", task: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Each of the task's tensors' dtype and shape."""
    return {k: archive.tensor_spec(task, k) for k in archive.keys(task)}


def _sizes(archive: "Archive", task: str) -> dict[str, int]:
    return {k: numel(shape) * itemsize(dt) for k, (dt, shape) in _task_tensors(archive, task).items()}


def _specs(archive: "Archive", task: str) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    return {k: (_dtype(archive, task, k, dt), tuple(shape)) for k, (dt, shape) in _task_tensors(archive, task).items()}


def _dtype(archive: "Archive", task: str | None, name: str, dt: str) -> torch.dtype:
    """The torch dtype of a tensor to be written, before any is: a uint32 one on torch 2.1 is named."""
    try:
        return torch_dtype(dt)
    except UnsupportedVersionError as e:
        raise UnsupportedVersionError(f"{archive.name}: {f'task {task!r}' if task else 'the base'}, tensor {name!r}: "
                                      f"{e}") from None


def _folder(archive: "Archive", state_dict: Mapping[str, torch.Tensor], out: Path, *, where: str, meta: dict[str, Any],
            config: Mapping[str, Any] | None, files: Mapping[str, str], layout: Mapping[str, Any] | None,
            max_shard_size: int | str | None, sizes: Mapping[str, int] | None, progress: ProgressLike,
            overwrite: bool, specs: Mapping[str, tuple[torch.dtype, tuple[int, ...]]] | None = None) -> Path:
    """Weights, then the kept folder files (never over a weight file or index), as one output;
    ``where`` (the archive and task) starts the error when the files' names cannot all be written."""
    with transaction(overwrite=overwrite):
        target = write_checkpoint(state_dict, out, metadata=meta, config=None if "config.json" in files else config,
                                  layout=layout, max_shard_size=max_shard_size, sizes=sizes, progress=progress,
                                  overwrite=overwrite, specs=specs, also=_kept_names(files), where=where,
                                  modules=MODULES in files)
        _kept_files(archive, files, out, owner=where.removeprefix(f"{archive.name}: "))
        _warn_originals_left(archive, out, {Path(target).name})
        return target


def _kept_names(files: Mapping[str, str], skip: Set[str] = frozenset()) -> list[str]:
    """The names of ``files`` that are written: not a weight file, the index or a name in ``skip``
    (a subfolder's weight file kept as a folder file, an ``unet_ema/``'s or an archive's from before
    sentence-transformers modules were packed, ``2_Dense/model.safetensors``, is written)."""
    return [n for n in files if not plain_weights(n) and n != INDEX and n not in skip]


def _kept_files(archive: "Archive", files: Mapping[str, str], out: Path, skip: Set[str] = frozenset(), *,
                owner: str = "") -> list[Path]:
    """The kept folder files ``files`` (name -> SHA-256) of ``owner`` (``task 'cars'``) into ``out``,
    never over a weight file, the index or a name in ``skip``."""
    kept = set(_kept_names(files, skip))
    read = _Bytes(archive).read  # bytes, not tensors: an exact unpack imports no torch
    return write_files(out, files, archive.manifest.files,
                       lambda ref, where, start, stop: read(ref, where, Use.INPUT, start=start, stop=stop).data,
                       skip=set(files) - kept, owner=owner)


def _originals(archive: "Archive") -> dict[str, int]:
    """The safetensors files an exact unpack of the archive's tasks writes (``cars.safetensors``,
    where a lossy unpack writes ``model.safetensors``), by name, with their sizes, from the exact
    tier's records. Without the exact tier, none."""
    names: dict[str, int] = {}
    for task in archive.tasks:
        records = (archive.task_info(task).exact or {}).get("files")
        for f in records if isinstance(records, list) else ():
            if (isinstance(f, dict) and f.get("role") == "safetensors" and plain_weights(f.get("name"))
                    and type(f.get("size")) is int):
                names[f["name"]] = f["size"]
    return names


def _warn_originals_left(archive: "Archive", out: Path, written: Set[str]) -> None:
    """Warn of safetensors files in ``out`` of an original's name and size (an earlier ``unpack
    --exact``, or the very file a task was packed from) beside the weights just written: they are
    never removed, since nothing tells the two apart, but a loader that globs ``*.safetensors``
    would take both. Names and sizes only: no file is read."""
    if is_url(out) or not Path(out).is_dir():
        return
    removed = previous_weights(Path(out))  # an earlier output's weight sets go at the commit (variants too)
    left = sorted(n for n, size in _originals(archive).items()
                  if n not in written and n not in removed and (Path(out) / n).is_file()
                  and (Path(out) / n).stat().st_size == size)
    if left:
        log.warning("%s: left %s beside the weights written (of an original's name: an earlier exact unpack, "
                    "or the file a task was packed from); remove %s if not wanted", out, ", ".join(left),
                    "it" if len(left) == 1 else "them")


def _sha256(path: Path) -> str | None:
    """A file's SHA-256 (hex), None when it cannot be read."""
    import hashlib

    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except OSError:
        return None
    return h.hexdigest()


def _warn_others_left(archive: "Archive", task: str, out: Path) -> None:
    """Warn of folder files of the archive's other tasks or base (tokenizer, generation config) in
    ``out`` that ``task``'s folder does not have: an earlier output into the same folder (``--force``
    replaces files, it removes none), which a loader would take as the task's own. Files the archive
    does not name are the user's and not mentioned. Names only: no file is read."""
    if is_url(out) or not Path(out).is_dir():
        return
    own = set(archive.files(task)) | ({"config.json"} if task_metadata(archive, task)[1] is not None else set())
    others = {n for t in archive.tasks if t != task for n in archive.files(t)} | set(archive.files())
    base = archive.files()
    # the base's own file, copied in (a tokenizer the task's folder lacked), is the user's choice: kept quietly
    left = sorted(n for n in others - own if (Path(out) / n).is_file()
                  and not (n in base and _sha256(Path(out) / n) == base[n]))
    if left:
        log.warning("%s: left %s, of another task's or the base's folder (an earlier output?), which task %r "
                    "does not have; remove %s if not wanted", out, ", ".join(left[:5]) + (
                        f" and {len(left) - 5} more" if len(left) > 5 else ""), task,
                    "it" if len(left) == 1 else "them")


def _staged(archive: "Archive", outdir: str | os.PathLike, storage_options: dict[str, Any] | None,
            overwrite: bool) -> AbstractContextManager[Path]:
    """``staging.staged`` for a folder of the archive's: at a URL, the weight files of an earlier
    output that the new one does not replace go (those of the archive's original names too)."""
    return staged(outdir, storage_options, overwrite=overwrite, stale=weights_among, folder=True)


def _reading(archive: "Archive") -> AbstractContextManager[None]:
    """While the block writes, an output file that is the archive itself (an archive named
    ``dd/model.safetensors`` unpacked into ``dd``) is refused, with or without ``overwrite``."""
    return reading(getattr(archive.source, "device_inode", None), archive.name)


def _refuse_archive_in(archive: "Archive", outdir: str | os.PathLike, files: Mapping[str, str],
                      layout: Mapping[str, Any] | None, exact: Mapping[str, Any] | None = None) -> None:
    """Before any work: InvalidArgumentError when the archive is one of the files the output in
    ``outdir`` writes or removes (weights, index, config, kept files, an earlier output's weights).
    Others it might write are refused as they are (:func:`_reading`)."""
    identity = getattr(archive.source, "device_inode", None)
    out = local_path(outdir)
    if identity is None or is_url(outdir) or not out.is_dir():
        return
    names = {SINGLE, INDEX, "config.json", *files, *previous_weights(out)}
    for records in ((layout or {}).get("shards"), (exact or {}).get("files")):
        for r in records if isinstance(records, list) else ():
            name = r.get("name") if isinstance(r, dict) else r[0] if isinstance(r, list) and r else None
            names |= {name} if isinstance(name, str) else set()
    with _reading(archive):
        for name in sorted(names):
            check_not_read(out / name)


def _check_call(fn: str, archive: object, outdir: object) -> None:
    """InvalidArgumentError unless ``archive`` is an open archive and ``outdir`` a path or URL."""
    if isinstance(archive, (str, bytes, os.PathLike)):
        raise InvalidArgumentError(f"{fn}: takes an open archive, not a path: pass tallpack.open({archive!r})")
    if not isinstance(archive, reader.Archive):
        raise InvalidArgumentError(f"{fn}: archive must be an open tallpack.Archive (tallpack.open(path)), "
                                   f"got {type(archive).__name__}")
    if not isinstance(outdir, (str, os.PathLike)):
        raise InvalidArgumentError(f"{fn}: outdir must be a folder's path or URL, got {type(outdir).__name__}")


def _shown(outdir: str | os.PathLike, local_root: Path, path: Path) -> Path | str:
    """``path`` as the user will find it: under the URL when the output is one."""
    if not is_url(outdir):
        return path
    rel = path.relative_to(local_root).as_posix()
    return os.fspath(outdir).rstrip("/") + ("" if rel == "." else f"/{rel}")  # the folder itself: no '/.'


def write_task(archive: "Archive", task: str, outdir: str | os.PathLike, *, exact: bool = False,
               max_shard_size: int | str | None = None, progress: ProgressLike = None,
               storage_options: dict[str, Any] | None = None, overwrite: bool = False) -> Path | str:
    """Rebuild one task and write it as a folder: ``model.safetensors`` (or the original's shards
    and index, or shards of ``max_shard_size``), plus its kept folder files (``config.json``,
    tokenizer, ...). ``outdir`` may be a URL. Returns the weights file or the index written (a
    diffusers pipeline's or sentence-transformers model's folder, whose weights are in its
    component or module folders too), under the URL for one.

    With ``exact=True`` (archives packed with the exact tier), the original files byte for byte
    (each checked against its SHA-256), the folder's other files (tokenizer, model card) among
    them; for PyTorch or in-memory inputs, which cannot be rebuilt byte for byte, the original
    tensors as safetensors files, sharded like the original (or by ``max_shard_size``): of a
    pipeline, those of its pickled components only. Returns the same as without it (the shard
    index where there is one, else the weights file; a pipeline's folder).

    >>> write_task(fam, "cars", "cars/")
    >>> write_task(fam, "cars", "s3://models/cars", max_shard_size="5GB")
    """
    _check_call("write_task", archive, outdir)
    info = archive.task_info(task)
    _warn_no_files(archive, task)
    if exact:
        archive.require_exact(task)
        _no_shard_size(archive, task, max_shard_size)
    _refuse_archive_in(archive, outdir, info.files, info.source, info.exact if exact else None)
    if exact:
        with (_reading(archive), _staged(archive, outdir, storage_options, overwrite) as local,
              transaction(overwrite=overwrite)):
            written, left = write_originals(archive, task, local)
            target = None
            stripped = info.source.get("stripped")
            if left and isinstance(stripped, str):  # (a safetensors file keeps its names: it was refused so)
                log.warning("%s: task %r: its exact tensors are written as safetensors under the names it was "
                            "packed with, without the prefix %r its checkpoint gave them (--strip-prefix)",
                            archive.name, task, stripped)
            if left or not written:  # pickles or tensors (a pipeline's pickled components): the exact
                # tensors, in the shards a lossy unpack writes; the safetensors files above stay as they are
                meta, _ = task_metadata(archive, task)
                sd = archive.state_dict(task, lazy=True, exact=True)
                target = write_checkpoint(_Only(sd, left), local, metadata=meta, where=f"{archive.name}: task {task!r}",
                                          layout=_only_components(info.source, left), max_shard_size=max_shard_size,
                                          sizes=_sizes(archive, task), specs=_specs(archive, task),
                                          progress=progress, overwrite=overwrite,
                                          modules=MODULES in archive.files(task))
            _warn_originals_left(archive, local, {Path(p).relative_to(local).as_posix()
                                                  for p in [*written, *([target] if target else [])]})
            # the folder's other files (tokenizer, generation config, model card), as a lossy unpack
            # writes them, each checked against its SHA-256; the recorded ones are written above
            _kept_files(archive, archive.files(task), local,
                        skip={Path(p).relative_to(local).as_posix() for p in written}, owner=f"task {task!r}")
            _warn_others_left(archive, task, local)
            if _components(info.source):  # a pipeline: its folder, as a lossy unpack names it
                return _shown(outdir, local, local)
            return _shown(outdir, local, Path(target) if target else _main_file([Path(p) for p in written]))
    meta, config = task_metadata(archive, task)
    with _reading(archive), _staged(archive, outdir, storage_options, overwrite) as local:
        path = _folder(archive, archive.state_dict(task, lazy=True), local, where=f"{archive.name}: task {task!r}",
                       meta=meta, config=config,
                       files=archive.files(task), layout=archive.task_info(task).source,
                       max_shard_size=max_shard_size, sizes=_sizes(archive, task), progress=progress,
                       overwrite=overwrite, specs=_specs(archive, task))
        _warn_others_left(archive, task, local)
        return _shown(outdir, local, path)


class _Only(Mapping[str, "torch.Tensor"]):
    """The tensors ``keys`` of a lazy state dict (a pipeline's pickled components), read when indexed."""

    def __init__(self, sd: Mapping[str, torch.Tensor], keys: Sequence[str]):
        self._sd, self._keys = sd, list(keys)
        self._names = frozenset(self._keys)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._names:
            raise KeyError(name)
        return self._sd[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def _only_components(layout: Mapping[str, Any] | None, keys: Sequence[str]) -> Mapping[str, Any] | None:
    """A pipeline's (or sentence-transformers model's) recorded layout reduced to the components
    of ``keys`` (the runs of the others left out, so that the counts add up); a single model's as it is."""
    shards = (layout or {}).get("shards")
    components = _components(layout)
    if layout is None or not isinstance(shards, list) or not components:
        return layout
    # a key of no component: a sentence-transformers model's transformer, at the top (runs of no folder)
    wanted = {component_of(k, components) for k in keys}
    runs = [r for r in shards if isinstance(r, list) and r and isinstance(r[0], str) and r[0].rpartition("/")[0] in wanted]
    return {**layout, "shards": runs}


def _without_count(layout: Mapping[str, Any], written: int) -> Mapping[str, Any]:
    """A recorded layout for a merged model of ``written`` tensors: where that is fewer than the
    original held (tensors left out), its index's ``total_parameters`` (transformers' count of the
    original model's parameters) no longer holds and is dropped; ``total_size`` is counted anew."""
    meta, shards = layout.get("index_metadata"), layout.get("shards")
    if not isinstance(meta, Mapping) or "total_parameters" not in meta or not isinstance(shards, list):
        return layout
    try:
        held = sum(int(count) for _, count in shards)
    except (TypeError, ValueError):
        return layout
    if written >= held:
        return layout
    return {**layout, "index_metadata": {k: v for k, v in meta.items() if k != "total_parameters"}}


def _main_file(paths: Sequence[Path]) -> Path:
    """The file an exact unpack names in its result: the shard index (any variant's) where there
    is one, as a lossy unpack names it, else the first weights file written."""
    for p in paths:
        if ".index" in p.name and p.name.endswith(".json"):
            return p
    return paths[0]


def _warn_no_files(archive: "Archive", task: str) -> None:
    """Warn that a task packed from a bare weights file is written with no config.json while the
    base's is in the archive. The base's files are not taken: the task's config may differ from the
    base's (its labels, tied weights), and a wrong config loads without a word."""
    base = archive.files()
    if archive.files(task) or "config.json" not in base or task_metadata(archive, task)[1] is not None:
        return
    log.warning("%s: task %r was packed from %s: its folder has no config.json, which from_pretrained "
                "needs; the base's files (%s) are in the archive, not copied, since the task's config may differ from "
                "the base's: tallpack.open(ARCHIVE).read_file('config.json') reads the base's", archive.name, task,
                _packed_from(archive.task_info(task).source), ", ".join(base))


def _packed_from(source: Mapping[str, Any]) -> str:
    """What a checkpoint without folder files was packed from, as its recorded source says."""
    return "tensors given in memory" if source.get("format") == "dict" else "a bare weights file"


def _no_shard_size(archive: "Archive", task: str, max_shard_size: int | str | None) -> None:
    """InvalidArgumentError for a ``max_shard_size`` with ``exact=True`` on a task whose original
    files come back byte for byte (safetensors inputs); pickle and in-memory inputs come back as
    new safetensors files, which it shards."""
    if max_shard_size is not None and rebuilt_whole(archive, task):
        raise InvalidArgumentError(f"{archive.name}: task {task!r}: max_shard_size (--max-shard-size) has no effect "
                                   "with exact=True (--exact): its original safetensors files come back byte for "
                                   "byte, shards and all (it shards only tasks packed from PyTorch files or tensors)")


def write_tasks(archive: "Archive", tasks: Sequence[str] | None, outdir: str | os.PathLike, *,
                exact: bool = False, max_shard_size: int | str | None = None, progress: ProgressLike = None,
                storage_options: dict[str, Any] | None = None, overwrite: bool = False) -> list[Path | str]:
    """Write several tasks (None: all), each as the folder ``OUTDIR/NAME`` (see :func:`write_task`),
    all or nothing: a failure leaves none of them.

    Every name is checked first (it must exist and be a safe folder name), so nothing is written
    when one is bad. Names that differ only in case or Unicode normalisation (``Cars`` and ``cars``)
    are refused, before anything is written, where the output's file system takes them for one
    folder (macOS's and Windows' by default), which a probe there tells; written apart elsewhere.
    """
    _check_call("write_tasks", archive, outdir)
    names = list(archive.tasks if tasks is None else tasks)
    for name in names:
        archive.task_info(name)
        why = task_name_problem(name)  # an archive's task name becomes a folder name
        if why is not None:
            raise InvalidArgumentError(f"{archive.name}: task {name!r} cannot be a folder of {outdir} ({why}); write "
                                       "it alone: write_task(archive, NAME, FOLDER) (unpack --task NAME -o FOLDER)")
        if exact:
            archive.require_exact(name)
            _no_shard_size(archive, name, max_shard_size)
    for name in names if not is_url(outdir) else ():
        # a task's folder is in the output the caller named: a link OUT/NAME (the archive picks
        # NAME) leading outside it is refused, before anything is written
        check_inside(local_path(outdir), local_path(outdir) / name / SINGLE)
        info = archive.task_info(name)
        _refuse_archive_in(archive, local_path(outdir) / name, info.files, info.source, info.exact if exact else None)
    with (_reading(archive), _staged(archive, outdir, storage_options, overwrite) as local,
          transaction(overwrite=overwrite) as tx):
        alike = _alike(names)
        folded = _folded(local, alike) if alike else None
        if folded:
            raise _one_folder(archive, folded, outdir, local)
        paths = []
        folders: dict[tuple[int, int] | None, str] = {}  # each task's folder as written: (device, inode) -> task
        for name in names:
            # the folder an earlier task of this call wrote, whatever the probe said (a file system
            # that takes names for one that the probe did not try): refused, not written into (a
            # link OUT/NAME to another task's folder is the transaction's to refuse, as before)
            earlier = folders.get(_identity(local / name))
            if earlier is not None:
                raise _one_folder(archive, [[earlier, name]], outdir, local)
            # again as the task is written (a link put in place of OUT/NAME while the tasks before
            # it were): its files as they are staged, and at the commit
            tx.confine(local, local / name / SINGLE)
            paths.append(write_task(archive, name, local / name, exact=exact, max_shard_size=max_shard_size,
                                    progress=Labelled(progress, name) if progress and len(names) > 1 else progress,
                                    overwrite=overwrite))  # each task's steps under its name
            if (written := _identity(local / name)) is not None:
                folders[written] = name
        return [_shown(outdir, local, Path(p)) for p in paths]


def _alike(names: Sequence[str]) -> list[list[str]]:
    """The groups of ``names`` that are one name to a file system that ignores case and Unicode
    normalisation (``Cars`` and ``cars``; ``café`` composed and decomposed), in their order."""
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(unicodedata.normalize("NFC", name).casefold(), []).append(name)
    return [g for g in groups.values() if len(g) > 1]


def _folded(folder: Path, groups: list[list[str]]) -> list[list[str]] | None:
    """Of each group of names, those that the file system of ``folder`` (or of its nearest
    existing folder above, where it is not made yet) takes for one: tried there, as files of those
    very names in a new, empty temporary folder (each created, then the others looked up: one that
    finds it is the same name there), removed again. None when no probe can be made there (a
    folder not writable: the output could not be written either)."""
    above = next((p for p in (folder, *folder.parents) if p.is_dir()), Path("."))
    try:
        probe = Path(tempfile.mkdtemp(prefix=".tallpack-probe-", dir=above))
    except OSError:
        return None
    try:
        found = []
        for group in groups:
            left = list(group)
            while left:
                first, *rest = left
                try:
                    fd = os.open(probe / first, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                except OSError:  # a name this file system refuses: the write says so
                    left = rest
                    continue
                try:
                    made = os.fstat(fd)
                finally:
                    os.close(fd)
                same = [n for n in rest if _identity(probe / n) == (made.st_dev, made.st_ino)]
                if same:
                    found.append([first, *same])
                left = [n for n in rest if n not in same]
        return found
    finally:
        shutil.rmtree(probe, ignore_errors=True)


def _identity(path: Path) -> tuple[int, int] | None:
    """The device and inode of the entry ``path`` names (a link itself, not where it leads); None
    when there is none."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _one_folder(archive: "Archive", groups: Sequence[Sequence[str]], outdir: str | os.PathLike,
                local: Path) -> InvalidArgumentError:
    """InvalidArgumentError for tasks that would be written in one folder of the output (each of
    ``groups``), whose file system takes their names for one: one task would replace the other,
    or their files mix."""
    tasks = " (and so would " + "; ".join(map(_names, groups[1:])) + ")" if groups[1:] else ""
    if is_url(outdir):
        where = (f"of {local}, the copy of {redact(os.fspath(outdir))} made before the upload (under $TMPDIR), whose "
                 "file system does not tell their names apart (case or Unicode normalisation); set TMPDIR to a folder "
                 "on a case-sensitive file system, or")
    else:
        where = (f"of {outdir}, whose file system does not tell their names apart (case or Unicode normalisation): one "
                 "would replace the other or their files mix;")
    return InvalidArgumentError(f"{archive.name}: tasks {_names(groups[0])} would be written in one folder{tasks} "
                                f"{where} write them one at a time to different folders: unpack --task NAME -o FOLDER "
                                "(write_task(archive, NAME, FOLDER))")


def _names(group: Sequence[str]) -> str:
    """``'Cars' and 'cars'``; names that differ in normalisation only, which look alike, with
    their non-ASCII characters escaped (``'caf\\xe9' and 'cafe\\u0301'``)."""
    show = ascii if len({unicodedata.normalize("NFC", n) for n in group}) < len(group) else repr
    return ", ".join(map(show, group[:-1])) + f" and {show(group[-1])}"


class WrittenModel(tuple[Path | str, int]):
    """``(path, tensors)``: the weights file (or index) written and its tensor count, unpacked as a
    pair; ``overflow`` names the tensors that alpha pushed past their dtype's range (inf)."""

    overflow: tuple[str, ...]

    def __new__(cls, path: Path | str, tensors: int, overflow: Sequence[str] = ()) -> "WrittenModel":
        self = super().__new__(cls, (path, tensors))
        self.overflow = tuple(overflow)
        return self

    def __getnewargs__(self) -> tuple[Any, ...]:  # copies and pickles (a worker's result) keep it whole
        return (*self, self.overflow)


def _merged_files(archive: "Archive", task: str | None, config: Mapping[str, Any] | None) -> dict[str, str]:
    """The folder files of a merged model: the task's, or the base's; for a base that has none
    (packed from a bare weights file), the files every task has alike when their ``config.json``
    is one and the same (said in one line). A folder left without a ``config.json`` while a task
    has one is warned of."""
    files = archive.files(task)
    where = f"{archive.name}: {f'task {task!r}' if task else 'the base'}"
    if task is None and not files and config is None and archive.tasks:
        by_task = [archive.files(t) for t in archive.tasks]
        alike = {n: h for n, h in by_task[0].items() if all(f.get(n) == h for f in by_task[1:])}
        if "config.json" in alike:
            differ = sorted({n for f in by_task for n in f} - set(alike))
            log.log(logging.WARNING if differ else logging.INFO, "%s has no folder files (packed from %s): the merged "
                    "model takes the ones every task has alike (%s)%s", where, _packed_from(archive.manifest.base),
                    ", ".join(alike), f"; not {', '.join(differ)}, which differ between tasks" if differ else "")
            return alike
    if "config.json" not in files and config is None and any("config.json" in archive.files(t) for t in archive.tasks):
        why = " and the tasks' differ" if task is None and not files else ""
        log.warning("%s has no config.json%s: the merged model's folder has none, which from_pretrained needs; "
                    "task=NAME (--task NAME) takes a task's files and its own tensors", where, why)
    return files


def write_merged(archive: "Archive", outdir: str | os.PathLike, method: str | None = None, *, k: int | None = None,
                 alpha: float | None = None, task: str | None = None, max_shard_size: int | str | None = None,
                 progress: ProgressLike = None, storage_options: dict[str, Any] | None = None,
                 overwrite: bool = False) -> WrittenModel:
    """Write a merged model (see :meth:`tallpack.Archive.merged`) with the folder files of the
    task (or, without one, of the base); returns ``(path, tensors)``: the weights file (or index)
    and its tensor count, with ``.overflow``, the tensors that ``alpha`` overflowed (warned)."""
    _check_call("write_merged", archive, outdir)
    method = default_model(archive.manifest) if method is None else method  # the archive's consensus model
    alpha = default_alpha(method, len(archive.tasks)) if alpha is None else check_alpha(alpha)
    where = archive.task_info(task) if task else None
    source = where.source if where else archive.manifest.base
    config = (where.metadata if where else archive.manifest.base.get("metadata", {})).get("config")
    config = config if isinstance(config, dict) else None  # a header's "config" string is not config.json
    files = _merged_files(archive, task, config)
    _refuse_archive_in(archive, outdir, files, source)
    parts = archive.merge_parts(method, k=k, lazy=True)  # k checked: numpy's ints taken, and only for consensus
    sd = parts.state_dict(alpha, task=task, lazy=True)  # built as written: one tensor's parts held at a time
    specs = {name: sd.spec(name) for name in sd}
    meta = {"tallpack.merge": method, **({"tallpack.k": parts.k} if is_consensus(method) else {}),
            "tallpack.alpha": alpha, "tallpack.tasks": list(archive.tasks)} | ({"tallpack.task": task} if task else {})
    with _reading(archive), _staged(archive, outdir, storage_options, overwrite) as local:
        path = _folder(archive, sd, local, where=f"{archive.name}: {f'task {task!r}' if task else 'the base'}",
                       meta=meta, config=config, files=files,
                       layout=_without_count(source, len(sd)), max_shard_size=max_shard_size,
                       sizes={k: numel(shape) * itemsize(dt) for k, (dt, shape) in specs.items()},
                       progress=progress, overwrite=overwrite,
                       specs={k: (_dtype(archive, task, k, dt), tuple(shape)) for k, (dt, shape) in specs.items()})
        overflow = sd.warn_overflow()
        return WrittenModel(_shown(outdir, local, path), len(sd), overflow)
