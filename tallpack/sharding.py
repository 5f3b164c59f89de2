"""Sharded safetensors output: which tensor goes in which file, and the index beside them.

Pure planning functions over names and sizes (as huggingface_hub's serialization does), then one
writer that saves shard by shard, so memory holds one shard's tensors at a time:

- ``plan_from_layout``: the original folder's shard files (recorded at pack time as runs of
  ``[file, tensor count]`` in the task's key order), so an unpacked folder has the same shard names
  and index as the one packed;
- ``plan_by_size``: shards of at most ``max_shard_size`` bytes (``"5GB"``: decimal units, as
  huggingface_hub), named ``model-00001-of-0000N.safetensors``; one shard is ``model.safetensors``.

Exactly the tensors given are written: a tied weight that the original files left out (a
``lm_head.weight`` tied to the embeddings) stays out, and transformers ties it again on load.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import struct
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from ._torch import torch
from .dtypes import SAFETENSORS_DTYPES, dtype_name, tensor_to_bytes
from .errors import FormatError, InvalidArgumentError
from .folders import (DIFFUSERS, MODULES, VARIANT_SETS, check_file_name, component_of, listed_components,
                      listed_modules, plain_name, safe_target, weight_variant)
from .fsutil import atomic_write
from .progress import ProgressLike, track

log = logging.getLogger(__name__)

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
#: diffusers' names of the same (a pipeline component's, ``unet/diffusion_pytorch_model.safetensors``)
DIFFUSERS_SINGLE = f"{DIFFUSERS}.safetensors"
DIFFUSERS_INDEX = f"{DIFFUSERS}.safetensors.index.json"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """Bytes from ``5GB``, ``500MB``, ``1.5GB`` (decimal, as huggingface_hub), ``2GiB`` (binary) or an int.

    >>> parse_size("5GB"), parse_size("500MB"), parse_size("1GiB")
    (5000000000, 500000000, 1073741824)
    """
    if isinstance(size, int) and not isinstance(size, bool):
        n = size
    else:
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", str(size))
        if not m or m[2].upper() not in _UNITS:
            raise InvalidArgumentError(f"bad size {size!r}: use a number of bytes or e.g. 5GB, 500MB, 2GiB")
        n = int(float(m[1]) * _UNITS[m[2].upper()])
    if n <= 0:
        raise InvalidArgumentError(f"bad size {size!r}: must be positive")
    return n


def shard_names(n: int) -> list[str]:
    """``model.safetensors`` for one shard, else ``model-0000i-of-0000n.safetensors``."""
    if n <= 1:
        return [SINGLE]
    return [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


def plan_by_size(sizes: Mapping[str, int], max_shard_size: int | str) -> dict[str, list[str]]:
    """Shards in the tensors' order, each at most ``max_shard_size`` bytes (a larger tensor is a
    shard alone): file name -> tensor names.

    >>> plan_by_size({"a": 6, "b": 6, "c": 3}, 10)
    {'model-00001-of-00002.safetensors': ['a'], 'model-00002-of-00002.safetensors': ['b', 'c']}
    """
    limit = parse_size(max_shard_size)
    groups: list[list[str]] = []
    size = 0
    for name, n in sizes.items():
        if not groups or (size + n > limit and groups[-1]):
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += n
    groups = groups or [[]]
    return dict(zip(shard_names(len(groups)), groups))


#: A shard's name, which only an index makes a model of.
_SHARD_NAME = re.compile(r".*-\d+-of-\d+\.safetensors")


def needs_index(plan: Mapping[str, Any] | Sequence[str]) -> bool:
    """Whether a plan's files make a model only with ``model.safetensors.index.json``: several
    files, or one shard (``model-00001-of-00001.safetensors``); one file of another name
    (``model.safetensors``, a PEFT adapter's ``adapter_model.safetensors``) is loaded by its name."""
    return len(plan) > 1 or any(_SHARD_NAME.fullmatch(f) for f in plan)


def _shard_file(name: Any) -> str | None:
    if (isinstance(name, str) and name.endswith(".safetensors") and name.isprintable() and "/" not in name
            and "\\" not in name and name not in (".safetensors",) and not name.startswith(".")):
        return name
    return None


def _layout_file(name: Any) -> tuple[str, str] | None:
    """A recorded run's file as ``(component, file)``: ``unet/diffusion_pytorch_model.safetensors``
    as ``("unet", "diffusion_pytorch_model.safetensors")``, a sentence-transformers Router's
    ``2_Router/query_0_Dense/model.safetensors`` as ``("2_Router/query_0_Dense", "model.safetensors")``
    (a reader that takes one-folder components only ignores such a layout), a plain name with component ``""``;
    None for any other name (a folder no file name may have, a hidden one)."""
    if not isinstance(name, str):
        return None
    component, _, f = name.rpartition("/")
    if component:
        try:
            check_file_name(component)
        except FormatError:
            return None
        if any(part.startswith(".") for part in component.split("/")):
            return None
    f2 = _shard_file(f)
    return None if f2 is None else (component, f2)


def _joined(component: str, f: str) -> str:
    return f"{component}/{f}" if component else f


def plan_from_layout(keys: Sequence[str], shards: Any) -> dict[str, list[str]] | None:
    """The recorded layout (runs of ``[file, count]`` over the original key order) applied to
    ``keys``: file name -> tensor names. None when the layout is missing, malformed or does not
    add up to ``len(keys)`` (a merged model's keys): then the caller decides (spec §3.6: such a
    layout is ignored). The layout comes from an archive, so it is checked before anything it
    declares is built: work and memory linear in ``len(keys)`` and the number of runs.

    >>> plan_from_layout(["a", "b", "c"], [["x.safetensors", 2], ["y.safetensors", 1]])
    {'x.safetensors': ['a', 'b'], 'y.safetensors': ['c']}
    """
    if not isinstance(shards, list) or not shards:
        return None
    components = any(isinstance(r, list) and r and isinstance(r[0], str) and "/" in r[0] for r in shards)
    if len(shards) > len(keys) and not components:  # more runs than tensors: only runs of 0 could explain it
        log.warning("ignoring a recorded shard layout of %d runs for %d tensors", len(shards), len(keys))
        return None
    runs: list[tuple[str, str, int]] = []
    total = 0
    for run in shards:
        if not (isinstance(run, list) and len(run) == 2 and type(run[1]) is int and run[1] >= 0):
            log.warning("ignoring a recorded shard layout with a run that is not [file name, count >= 0]")
            return None
        where = _layout_file(run[0])
        if where is None:
            log.warning("ignoring a recorded shard layout with a bad file name %.80r",
                        run[0] if isinstance(run[0], str) else type(run[0]).__name__)
            return None
        total += run[1]
        runs.append((*where, run[1]))
    if any(c for c, _, _ in runs):
        return _plan_components(keys, runs)
    if total != len(keys):  # a different key list (a merged model): match by position only if equal
        return None
    plan: dict[str, list[str]] = {}
    pos = 0
    for _, f, n in runs:
        plan.setdefault(f, []).extend(keys[pos : pos + n])
        pos += n
    return {f: names for f, names in plan.items() if names} or None


_SHARD_SUFFIX = re.compile(r"-\d+-of-\d+(?=\.safetensors$)")


def _stem(f: str) -> str:
    """The name of a recorded file's set, less the shard suffix and a variant, for the files of a
    layout of its own (``diffusion_pytorch_model.fp16-00001-of-00002.safetensors`` ->
    ``diffusion_pytorch_model``): a variant comes back under the plain name, which loads without
    ``variant=``."""
    return plain_name(_SHARD_SUFFIX.sub("", f)).removesuffix(".safetensors")


def _plan_components(keys: Sequence[str], runs: list[tuple[str, str, int]]) -> dict[str, list[str]] | None:
    """A layout of components (a diffusers pipeline's ``unet/...``, spec §3.6): each key
    ``COMPONENT/NAME`` goes to its component's files, the component's runs taken by position over
    its own keys when their counts add up, else (a merged model's keys) to one file of the
    component's first file name, unsharded and without a variant; a key of no recorded component to ``model.safetensors``.

    >>> plan_from_layout(["u/a", "u/b", "t/c"], [["u/x-00001-of-00002.safetensors", 1],
    ...                  ["u/x-00002-of-00002.safetensors", 1], ["t/model.safetensors", 1]])
    {'u/x-00001-of-00002.safetensors': ['u/a'], 'u/x-00002-of-00002.safetensors': ['u/b'], 't/model.safetensors': ['t/c']}
    """
    recorded: dict[str, list[tuple[str, int]]] = {}
    for c, f, n in runs:
        recorded.setdefault(c, []).append((f, n))
    groups: dict[str, list[str]] = {}
    for k in keys:
        groups.setdefault(component_of(k, recorded), []).append(k)
    plan: dict[str, list[str]] = {}
    for c, names in groups.items():
        mine = recorded.get(c, [])
        if sum(n for _, n in mine) == len(names):
            pos = 0
            for f, n in mine:
                plan.setdefault(_joined(c, f), []).extend(names[pos : pos + n])
                pos += n
        else:
            plan.setdefault(_joined(c, f"{_stem(mine[0][0])}.safetensors" if mine else SINGLE), []).extend(names)
    return {f: names for f, names in plan.items() if names} or None


def plan_components_by_size(sizes: Mapping[str, int], shards: Any, max_shard_size: int | str, *,
                            modules: bool = False) -> dict[str, list[str]] | None:
    """``plan_by_size`` for each component of a recorded component layout (spec §3.6), its shards
    named as its recorded files are, less a variant (``unet/diffusion_pytorch_model-00001-of-00003.safetensors``);
    None for a layout of no components (then one model is sharded as a whole). With ``modules`` (a
    sentence-transformers model's layout) only the top (the transformer's weights) is sharded: each
    module's weights stay one file (``2_Dense/model.safetensors``), the only one its loader takes,
    with a warning where they are larger than ``max_shard_size``."""
    plan = plan_from_layout(list(sizes), shards) if isinstance(shards, list) and any(
        isinstance(r, list) and r and isinstance(r[0], str) and "/" in r[0] for r in shards) else None
    if plan is None:
        return None
    limit = parse_size(max_shard_size)
    out: dict[str, list[str]] = {}
    groups: dict[str, tuple[str, list[str]]] = {}
    for fname, names in plan.items():
        c, _, f = fname.rpartition("/")
        groups.setdefault(c, (_stem(f), []))[1].extend(names)
    for c, (stem, names) in groups.items():
        if modules and c:
            size = sum(sizes[n] for n in names)
            if size > limit:
                log.warning("module %s/: its weights (%d bytes) kept in one file over the maximum shard size (%d "
                            "bytes): sentence-transformers loads a module's weights from one %s.safetensors only",
                            c, size, limit, stem)
            out[_joined(c, f"{stem}.safetensors")] = names
            continue
        mine = plan_by_size({n: sizes[n] for n in names}, limit)
        for f, group in mine.items():
            f = f.replace("model", stem, 1) if f != SINGLE else f"{stem}.safetensors"
            out[_joined(c, f)] = group
    return out


def plan_by_size_as(sizes: Mapping[str, int], shards: Any, max_shard_size: int | str, *,
                    modules: bool = False) -> dict[str, list[str]]:
    """``plan_components_by_size`` for a recorded component layout (with ``modules``, a
    sentence-transformers model's: its modules unsharded), else ``plan_by_size``, under
    diffusers' names where the recorded files had them (a single diffusers model folder, a
    ``unet/`` passed alone: ``diffusion_pytorch_model-00001-of-00002.safetensors``, which
    ``UNet2DConditionModel.from_pretrained`` loads, where ``model-...`` is not looked for).

    >>> plan_by_size_as({"a": 6, "b": 6}, [["diffusion_pytorch_model.safetensors", 2]], 10)
    {'diffusion_pytorch_model-00001-of-00002.safetensors': ['a'], 'diffusion_pytorch_model-00002-of-00002.safetensors': ['b']}
    """
    plan = plan_components_by_size(sizes, shards, max_shard_size, modules=modules)
    if plan is not None:
        return plan
    plan = plan_by_size(sizes, max_shard_size)
    if not _diffusers_layout(shards):
        return plan
    return {DIFFUSERS_SINGLE if f == SINGLE else f.replace("model", DIFFUSERS, 1): names for f, names in plan.items()}


def single_file(shards: Any) -> str:
    """The one file a model is written to when its recorded layout does not apply (a merged
    model's keys): ``diffusion_pytorch_model.safetensors`` for a diffusers model folder's layout
    (what diffusers loads), else ``model.safetensors``."""
    return DIFFUSERS_SINGLE if _diffusers_layout(shards) else SINGLE


def _diffusers_layout(shards: Any) -> bool:
    """Whether a recorded layout of no components names diffusers' files (a variant's too)."""
    if not (isinstance(shards, list) and shards and isinstance(shards[0], list) and shards[0]):
        return False
    where = _layout_file(shards[0][0])
    return where is not None and not where[0] and _stem(where[1]) == DIFFUSERS


def index_name(files: Sequence[str]) -> str:
    """The shard index that makes ``files`` (of one folder) a model: diffusers' for its names,
    transformers' for any other (a variant's shards' too, which a loader then takes without
    ``variant=``).

    >>> index_name(["diffusion_pytorch_model.fp16-00001-of-00002.safetensors"]), index_name(["model.safetensors"])
    ('diffusion_pytorch_model.safetensors.index.json', 'model.safetensors.index.json')
    """
    stem = _SHARD_SUFFIX.sub("", files[0]).removesuffix(".safetensors").split(".")[0] if files else ""
    return DIFFUSERS_INDEX if stem == DIFFUSERS else INDEX


def _by_folder(plan: Mapping[str, Any]) -> dict[str, list[str]]:
    """A plan's file names by component folder (``""``: the output folder itself)."""
    out: dict[str, list[str]] = {}
    for fname in plan:
        c, _, f = fname.rpartition("/")
        out.setdefault(c, []).append(f)
    return out


def planned_files(plan: Mapping[str, Any]) -> list[str]:
    """The files ``write_shards`` writes for ``plan``: its own and each folder's index where one is needed."""
    return [*plan, *(_joined(c, index_name(fs)) for c, fs in _by_folder(plan).items() if needs_index(fs))]


def planned_folders(plan: Mapping[str, Any]) -> list[str]:
    """The component folders of a plan (none for a single model's)."""
    return [c for c in _by_folder(plan) if c]


def write_shards(tensors: Mapping[str, torch.Tensor], plan: Mapping[str, list[str]], outdir: Path, *,
                 metadata: Mapping[str, str] | None = None, index_metadata: Mapping[str, Any] | None = None,
                 sizes: Mapping[str, int] | None = None, progress: ProgressLike = None,
                 specs: Mapping[str, tuple[torch.dtype, tuple[int, ...]]] | None = None,
                 components: Mapping[str, Any] | None = None) -> Path:
    """Write ``plan``'s files (each atomically) and, for more than one,
    ``model.safetensors.index.json``; returns the single file or the index.

    A plan of component files (``unet/diffusion_pytorch_model.safetensors``, from a pipeline's
    layout) writes each component's tensors without the ``unet/`` in front into its folder, with
    the folder's own index where its files need one (``index_name``; ``components[c]
    ["index_metadata"]`` in it), and returns the output folder.

    With ``specs`` (each tensor's dtype and shape, known without reading it) and a lazy
    ``tensors`` mapping, each tensor is read as it is written: one tensor in memory at a time;
    otherwise one shard at a time."""
    meta = {"format": "pt", **(metadata or {})}
    names = [n for group in plan.values() for n in group]
    steps = iter(track(names, progress, "writing", len(names)))
    weight_maps: dict[str, dict[str, str]] = {}  # component folder -> its index's weight_map
    totals: dict[str, int] = {}
    for fname, group in plan.items():
        c, _, f = fname.rpartition("/")
        inner = {n[len(c) + 1:] if c else n: n for n in group}  # name in the file (component stripped) -> key
        if specs is not None:
            shard: Mapping[str, Any] = _Progressing({i: (tensors, n) for i, n in inner.items()}, steps)
            shard_specs: Mapping[str, tuple[torch.dtype, tuple[int, ...]]] | None = \
                {i: specs[n] for i, n in inner.items()}
        else:
            shard, shard_specs = {}, None
            for i, name in inner.items():
                next(steps, None)
                shard[i] = tensors[name].contiguous()
        for i, name in inner.items():
            dt, shape = specs[name] if specs is not None else (shard[i].dtype, tuple(shard[i].shape))
            totals[c] = totals.get(c, 0) + (sizes[name] if sizes else _numel(shape) * dt.itemsize)
            weight_maps.setdefault(c, {})[i] = f
        target = safe_target(outdir, fname) if c else outdir / fname
        atomic_write(target, functools.partial(_write_file, tensors=shard, metadata=meta, specs=shard_specs))
        del shard
    for _ in steps:  # report the last step
        pass
    if index_metadata is not None and not isinstance(index_metadata, Mapping):  # from an archive: informative
        log.warning("ignoring recorded index metadata that is not an object (%s)", type(index_metadata).__name__)
        index_metadata = None
    main = None
    for c, files in _by_folder(plan).items():
        if not needs_index(files):  # model.safetensors, adapter_model.safetensors, ...: loaded by its name
            main = main or outdir / _joined(c, files[0])
            continue
        recorded = (components or {}).get(c) if c else None  # from an archive: informative, checked
        extra = (recorded.get("index_metadata") if isinstance(recorded, Mapping) else None) if c else index_metadata
        index = {"metadata": {**(extra if isinstance(extra, Mapping) else {}), "total_size": totals.get(c, 0)},
                 "weight_map": weight_maps.get(c, {})}
        path = safe_target(outdir, _joined(c, index_name(files))) if c else outdir / index_name(files)
        atomic_write(path, functools.partial(_write_index, index=index))
        main = main or path
    assert main is not None
    return outdir if planned_folders(plan) else main  # a pipeline: its folder


def _write_index(path: Path, index: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


_CODES = {name: code for code, name in SAFETENSORS_DTYPES.items()}


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


class _Progressing(Mapping):
    """``name -> tensor`` read from a lazy mapping (under its key there) when indexed, a progress step each."""

    def __init__(self, sources: Mapping[str, tuple[Mapping[str, torch.Tensor], str]], steps):
        self._sources, self._steps = sources, steps

    def __getitem__(self, name: str) -> torch.Tensor:
        next(self._steps, None)
        tensors, key = self._sources[name]
        return tensors[key]

    def __iter__(self):
        return iter(self._sources)

    def __len__(self) -> int:
        return len(self._sources)


def write_safetensors(f: IO[bytes], tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str],
                      specs: Mapping[str, tuple[torch.dtype, tuple[int, ...]]] | None = None) -> None:
    """Stream a safetensors file to ``f``: the 8-byte header length, the JSON header (padded to 8
    bytes), then each tensor's bytes, largest elements first so every tensor stays aligned.
    Streaming through our own file object lets a full disk surface as the OSError it is (and the
    file loads with safetensors' own ``load_file``). With ``specs`` (dtype and shape per name) the
    header is written without reading ``tensors``, and each tensor is read just before its bytes."""
    if "__metadata__" in tensors:
        raise InvalidArgumentError("a tensor named '__metadata__' cannot be stored in safetensors")
    if specs is None:
        specs = {k: (t.dtype, tuple(t.shape)) for k, t in tensors.items()}
    order = sorted(specs, key=lambda k: (-specs[k][0].itemsize, k))
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    pos = 0
    for k in order:
        dt, shape = specs[k]
        code = _CODES.get(dtype_name(dt))
        if code is None:
            raise InvalidArgumentError(f"tensor {k!r}: safetensors cannot store {dt}")
        n = _numel(shape) * dt.itemsize
        header[k] = {"dtype": code, "shape": list(shape), "data_offsets": [pos, pos + n]}
        pos += n
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    f.write(struct.pack("<Q", len(text)))
    f.write(text)
    for k in order:
        t = tensors[k]
        if t.dtype != specs[k][0] or tuple(t.shape) != tuple(specs[k][1]):
            raise InvalidArgumentError(f"tensor {k!r}: {t.dtype} {tuple(t.shape)}, the header says {specs[k]}")
        f.write(tensor_to_bytes(t))
        del t


def _write_file(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str],
                specs: Mapping[str, tuple[torch.dtype, tuple[int, ...]]] | None = None) -> None:
    with open(path, "wb") as f:
        write_safetensors(f, tensors, metadata, specs)
        f.flush()
        os.fsync(f.fileno())


def previous_in(folder: Path, plan: Mapping[str, Any]) -> set[str]:
    """``previous_weights`` of ``folder``, of each component folder of ``plan`` in it
    (``unet/diffusion_pytorch_model.safetensors``) and of each one the folder's earlier
    ``model_index.json`` lists (an earlier pipeline's ``vae/`` that this output lacks: left, its
    weights would load as this output's) or its earlier ``modules.json`` (a sentence-transformers
    model's ``2_Dense/``), by name relative to ``folder``. A listed folder may be a link; the
    transaction that removes these refuses one whose folder leads outside ``folder``
    (``fsutil.check_inside``), and a component named ``../x`` or by an absolute path is never listed."""
    folders = {*planned_folders(plan), *_listed_components(folder)}
    return previous_weights(folder) | {f"{c}/{n}" for c in sorted(folders) for n in previous_weights(folder / c)}


def _listed_components(folder: Path) -> list[str]:
    """The plain subfolder names ``folder/model_index.json`` lists as components (``"vae":
    ["diffusers", "AutoencoderKL"]``) and ``folder/modules.json`` as module folders (``2_Dense``,
    ``2_Dense/``; and a module folder's subfolders, a Router's ``2_Router/query_0_Dense``); none of
    a file that is missing or not such a document."""
    found: list[str] = []
    for index, listed in (("model_index.json", listed_components), (MODULES, listed_modules)):
        try:
            doc = json.loads((folder / index).read_bytes())
        except (OSError, ValueError, RecursionError):
            continue
        names = [k.rstrip("/") or k for k in listed(doc)] if index == MODULES else listed(doc)
        for k in names:
            if _component_folder(k) and (folder / k).is_dir():
                found.append(k)
                if index == MODULES:
                    try:
                        subs = sorted(e.name for e in os.scandir(folder / k) if e.is_dir(follow_symlinks=False))
                    except OSError:
                        subs = []
                    found += [f"{k}/{d}" for d in subs if not d.startswith(".") and _component_folder(d)]
    return found


def _component_folder(name: str) -> bool:
    try:
        check_file_name(name)
    except FormatError:
        return False
    return "/" not in name


def previous_weights(folder: Path) -> set[str]:
    """The weight files an earlier checkpoint write left in ``folder``: ``model.safetensors``, the
    index and the shards it names (plain ``.safetensors`` names in the folder only), the pickles a
    loader takes when the safetensors are missing (``pytorch_model.bin``,
    ``pytorch_model.bin.index.json`` and its ``.bin`` shards), diffusers' same names
    (``diffusion_pytorch_model.safetensors``, ...), and the same of a variant
    (``model.fp16.safetensors``, ``model.safetensors.index.fp16.json`` and its shards,
    ``pytorch_model.fp16.bin``, ``pytorch_model.bin.index.fp16.json`` and its ``.bin`` shards)."""
    try:
        names = os.listdir(folder)
    except OSError:
        return set()
    return weights_among({n for n in names if _weight_set(n) and (folder / n).is_file()},
                         lambda name: (folder / name).read_bytes(), lambda name: (folder / name).is_file())


def _weight_set(name: str) -> bool:
    """Whether ``name`` is one of transformers' weight-set names (a single file or a shard index),
    plain or of a variant, that a checkpoint write makes or leaves."""
    return name in _PLAIN_SETS or weight_variant(name) is not None


#: The plain weight-set names (no variant), in the order transformers and diffusers look for them, and
#: the shard indexes among them: a sentence-transformers module's pickled ``2_Dense/pytorch_model.bin``
#: left beside an output without that module would be loaded as the output's.
_PLAIN_SETS = (SINGLE, INDEX, "pytorch_model.bin", "pytorch_model.bin.index.json", DIFFUSERS_SINGLE, DIFFUSERS_INDEX,
               f"{DIFFUSERS}.bin", f"{DIFFUSERS}.bin.index.json")
_PLAIN_INDEXES = frozenset(n for n in _PLAIN_SETS if n.endswith(".index.json"))


def weights_among(present: set[str], read: Callable[[str], bytes], is_file: Callable[[str], bool]) -> set[str]:
    """``previous_weights`` of a folder anywhere (a URL's, ``staging.staged``): ``present`` the
    names of the files in it, ``read(name)`` a file's bytes, ``is_file(name)`` whether one exists."""
    found = {n for n in present if _weight_set(n)}
    for index in sorted(found):
        variant = weight_variant(index)
        if index not in _PLAIN_INDEXES and (variant is None or not VARIANT_SETS[variant[1]][2]):
            continue  # a single file
        try:
            weight_map = json.loads(read(index)).get("weight_map", {})
            values = list(weight_map.values()) if isinstance(weight_map, dict) else []
        except (OSError, ValueError, AttributeError, RecursionError):  # RecursionError: JSON nested too deep
            values = []
        # an unreadable index (or one naming files by anything but strings: not ours) is replaced;
        # the files it may name are left alone
        shards = set(values) if all(isinstance(v, str) for v in values) else set()
        suffix = ".bin" if ".bin.index" in index else ".safetensors"
        found |= {s for s in shards if plain_weights(s, suffix) and is_file(s)}
    return found


def plain_weights(name: object, suffix: str = ".safetensors") -> bool:
    """A ``.safetensors`` file name (or one of another ``suffix``) without a folder."""
    return isinstance(name, str) and name.endswith(suffix) and Path(name).name == name


