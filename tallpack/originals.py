"""The original files of an exact-tier archive: recorded at pack time, rebuilt byte for byte at
exact unpack, and checked by ``verify`` (spec §6.5).

At pack time each task records its checkpoint's files: name (relative to the model folder),
size and SHA-256; for a safetensors file also its header (the JSON text after the 8-byte length,
padding included), from which the file is rebuilt: the length, the header, then each tensor's
original bytes at its ``data_offsets``. Other files of a model folder (the shard index,
``config.json``) are kept whole. PyTorch pickle files are recorded (name, size, hash) but not
rebuilt: their tensors come back exactly, as ``model.safetensors``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import os
import struct
from collections import deque
from collections.abc import Generator, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ._torch import torch
from .arrays import ArrayRef
from .container import _strict_loads
from .dtypes import dtype_name, tensor_to_bytes, torch_dtype
from .elements import numel
from .encodings.base import TensorEntry, Use
from .encodings.derived import DERIVED_MERGED, checked_mask, rebuild_in_runs, task_mask
from .encodings.derived_merged import checked_in_runs, merged_from
from .encodings.exact import TALL_ENCODINGS, NotInNumpy, ReadBytes, in_runs, original_bits
from .errors import (ArchiveClosedError, CheckpointError, FormatError, IntegrityError, OutOfMemoryError, RemoteError,
                     TallpackError, memory_named)
from .folders import check_digest, check_file_name, check_no_clash, component_of, safe_target
from .fsutil import atomic_write, make_folder, remove_found_on_commit
from .limits import MAX_DEPTH
from .merging import METHODS, MergeMethod
from .progress import ProgressLike, track
from .sharding import previous_in
from .sources import _ST_DTYPES, _TRANSFORMERS_WEIGHTS, MAX_HEADER, Source

if TYPE_CHECKING:
    from .reader import Archive

log = logging.getLogger(__name__)

_READ = 1 << 24


def _sha256(path: Path) -> tuple[str, int]:
    h, n = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while block := f.read(_READ):
            h.update(block)
            n += len(block)
    return h.hexdigest(), n


def _header_text(path: Path) -> str:
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise CheckpointError(f"{path}: too short for a safetensors file")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER:
            raise CheckpointError(f"{path}: safetensors header of {n} bytes")
        header = f.read(n)
    try:
        return header.decode("utf-8")
    except UnicodeDecodeError:
        raise CheckpointError(f"{path}: safetensors header is not UTF-8; it cannot be stored exactly") from None


def record(src: Source) -> dict[str, Any]:
    """What the exact tier keeps of one input's files (``tasks[i].exact`` in the manifest)."""
    src.check_unchanged()  # a file changed since its tensors were read: refused before its hash is taken
    files = []
    prefixes: dict[Path, str] = getattr(src, "prefixes", {})  # a pipeline's component of each file

    def named(path: Path) -> str:
        return os.path.relpath(path, src.root).replace(os.sep, "/") if src.root else path.name

    for path in src.weight_files:
        try:
            sha, size = _sha256(path)
        except OSError as e:  # removed (or made unreadable) while it was packed: name it, and the task
            task = f" (the file of task {src.task!r})" if src.task is not None else ""
            what = "removed" if isinstance(e, FileNotFoundError) else f"unreadable ({e.strerror or e})"
            raise CheckpointError(f"{path}: {what} while it was packed; pack it again once it is complete{task}") \
                from None
        f: dict[str, Any] = {"name": named(path), "size": size, "sha256": sha}
        if path.suffix == ".safetensors":
            f["role"] = "safetensors"
            f["header"] = _header_text(path)
            if prefixes.get(path):
                f["prefix"] = prefixes[path]
            _layout(f, src.keys(), set(), str(path))  # refuse what cannot be rebuilt, at pack time
        else:
            f["role"] = "torch"
        files.append(f)
    for path in src.other_files:
        data = path.read_bytes()
        f = {"name": named(path), "size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "role": "file"}
        try:
            f["text"] = data.decode("utf-8")
        except UnicodeDecodeError:
            f["base64"] = base64.b64encode(data).decode()
        files.append(f)
    return {"format": src.kind, "files": files}


def _layout(f: dict[str, Any], keys, seen: set, where: str) -> list[tuple[int, int, str, str, tuple]]:
    """The tensors of a recorded safetensors file in data order: (begin, end, name, dtype, shape),
    checked to cover the data area exactly. The header comes from an archive (or a file being
    packed): it is parsed as strictly as the manifest (nesting, numbers), and every field checked."""
    label = f"{where}: file record {f.get('name')!r}"
    header = _utf8(f.get("header"), label, "header")
    try:
        doc = _strict_loads(f["header"])
    except RecursionError:
        raise FormatError(f"{label}: bad safetensors header (containers nest deeper than {MAX_DEPTH})") from None
    except ValueError as e:
        raise FormatError(f"{label}: bad safetensors header ({str(e)[:200]})") from None
    if not isinstance(doc, dict):
        raise FormatError(f"{label}: bad safetensors header (not a JSON object)")
    prefix = f.get("prefix", "")  # a pipeline component's file: its tensors are the task's PREFIX + name
    if not _prefix_ok(prefix, f.get("name")):
        raise FormatError(f"{label}: prefix {prefix!r:.80} is not the record's folder followed by '/'")
    spans = []
    for k, v in doc.items():
        if k == "__metadata__":
            continue
        dt = v.get("dtype") if isinstance(v, dict) else None
        if not (isinstance(dt, str) and dt in _ST_DTYPES and _naturals(v.get("data_offsets"), 2)
                and _naturals(v.get("shape"))):
            raise FormatError(f"{label}: bad safetensors header (tensor {k!r:.200} needs a known dtype, a shape "
                              "and two data_offsets, of non-negative integers)")
        spans.append((v["data_offsets"][0], v["data_offsets"][1], prefix + k, _ST_DTYPES[dt], tuple(v["shape"])))
    spans.sort()
    pos = 0
    for begin, end, name, _, _ in spans:
        if begin != pos or end < begin or name not in keys or name in seen:
            raise FormatError(f"{label}: tensor {name!r:.200} is not laid out "
                              "contiguously or is not one of the task's tensors")
        seen.add(name)
        pos = end
    if 8 + len(header) + pos != f.get("size"):
        raise FormatError(f"{label}: header and tensors do not add up to {f.get('size')} bytes")
    return spans


def _prefix_ok(prefix: Any, name: Any) -> bool:
    """Whether a record's ``prefix`` (spec §6.5) is ``""`` or the folder of its ``name`` and a
    ``/`` (``unet/`` of ``unet/diffusion_pytorch_model.safetensors``, a Router module's
    ``2_Router/query_0_Dense/``), the folder of one component."""
    if prefix == "":
        return True
    return (isinstance(prefix, str) and isinstance(name, str) and prefix.endswith("/") and name.startswith(prefix)
            and "/" not in name[len(prefix):] and _name_ok(prefix[:-1]))


def _name_ok(name: str) -> bool:
    try:
        check_file_name(name)
    except FormatError:
        return False
    return True


def _naturals(value: Any, n: int | None = None) -> bool:
    """Whether ``value`` is a list of non-negative integers (of ``n`` of them)."""
    return (isinstance(value, list) and (n is None or len(value) == n)
            and all(type(x) is int and x >= 0 for x in value))


def _utf8(text: Any, label: str, field: str) -> bytes:
    if not isinstance(text, str):
        raise FormatError(f"{label}: no {field} text")
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate escape in the manifest
        raise FormatError(f"{label}: its {field} is not Unicode text") from None


_ROLES = ("safetensors", "torch", "file")


def _check_record(f: dict[str, Any], where: str) -> None:
    """A file record's fields, checked before any of it is used: FormatError naming the record."""
    try:
        check_file_name(f.get("name"))
    except FormatError as e:
        raise FormatError(f"{where}: file record: {e}") from None
    label = f"{where}: file record {f['name']!r}"
    role, size = f.get("role"), f.get("size")
    if role not in _ROLES:
        raise FormatError(f"{label}: role {role!r:.40} is none of {', '.join(_ROLES)}")
    if type(size) is not int or size < 0:
        raise FormatError(f"{label}: size {size!r:.40} is not a non-negative integer")
    try:
        check_digest(f.get("sha256"))
    except FormatError as e:
        raise FormatError(f"{label}: {e}") from None
    if role == "safetensors" and not isinstance(f.get("header"), str):
        raise FormatError(f"{label}: a safetensors record without its header text")
    if role == "safetensors" and not _prefix_ok(f.get("prefix", ""), f["name"]):
        raise FormatError(f"{label}: prefix {f.get('prefix')!r:.80} is not the record's folder followed by '/'")
    if role == "file" and not isinstance(f.get("base64" if "base64" in f else "text"), str):
        raise FormatError(f"{label}: a file record without its text or base64 content")


def _files(archive: "Archive", task: str) -> list[dict[str, Any]]:
    rec = archive.task_info(task).exact
    if rec is None:
        archive.require_exact(task)
    files = rec.get("files") if isinstance(rec, dict) else None
    if not isinstance(files, list) or not all(isinstance(f, dict) for f in files):
        raise FormatError(f"{archive.name}: task {task!r}: malformed file records")
    where = f"{archive.name}: task {task!r}"
    for f in files:
        _check_record(f, where)
    _check_names(files, archive.files(task), where)
    return files


def _check_names(files: list[dict[str, Any]], kept: dict[str, str], where: str) -> None:
    """Records an exact unpack can write side by side (spec §6.5), checked before any is used, so
    that ``verify`` refuses what the unpack would: each name once; no ``"file"`` record of a weight
    file's name (``model.safetensors``, a shard's, ``pytorch_model.bin``) at the top or in a folder
    of the task's weight records, where the unpack writes weights (a subfolder's kept weight file,
    a pipeline's ``unet_ema/...``, is a record of its own folder); no name another's folder (the
    task's folder files too: ``config.json`` and ``config.json/x``)."""
    seen: set[str] = set()
    for f in files:
        if f["name"] in seen:
            raise FormatError(f"{where}: file record {f['name']!r} is listed twice")
        seen.add(f["name"])
    weights = {_folder(f["name"]) for f in files if f["role"] in ("safetensors", "torch")} | {""}
    for f in files:
        folder, _, base = f["name"].rpartition("/")
        if f["role"] == "file" and folder in weights and _TRANSFORMERS_WEIGHTS.fullmatch(base):
            raise FormatError(f"{where}: file record {f['name']!r} has the name of a weight file, as a kept file "
                              "(role 'file'); a damaged or hand-made archive (spec §6.5)")
    check_no_clash([*seen, *kept], where)


def _disagreeing(files: list[dict[str, Any]], kept: dict[str, str], where: str) -> list[str]:
    """A line for each ``"file"`` record whose SHA-256 is not that of the task's folder file of the
    same name: the writer takes both from one file, so the archive contradicts itself; an exact
    unpack writes the record's bytes, a lossy one the folder file's."""
    return [f"{where}: file record {f['name']!r} (SHA-256 {f['sha256'][:12]}...) differs from the folder file of "
            f"that name ({kept[f['name']][:12]}...): unpack --exact writes the record's bytes, unpack the folder "
            "file's (a damaged or hand-made archive)"
            for f in files if f["role"] == "file" and f["name"] in kept and kept[f["name"]] != f["sha256"]]


def _parts(archive: "Archive", task: str, f: dict[str, Any], seen: set
           ) -> tuple[bytes, list[tuple[int, int, str, str, tuple]]]:
    """One recorded file: its bytes before the tensors (a kept file's all), and its tensors' places
    ``(begin, end, name, dtype, shape)`` in data order, whose bytes are their exact rebuilds."""
    where = f"{archive.name}: task {task!r}"
    label = f"{where}: file record {f['name']!r}"
    if f["role"] == "file" and "base64" in f:
        try:
            return base64.b64decode(f["base64"], validate=True), []
        except (binascii.Error, ValueError):
            raise FormatError(f"{label}: its base64 content is not valid base64") from None
    if f["role"] == "file":
        return _utf8(f["text"], label, "text"), []
    spans = _layout(f, set(archive.keys(task)), seen, where)
    header = f["header"].encode("utf-8")
    return struct.pack("<Q", len(header)) + header, spans


def _pieces(archive: "Archive", task: str, f: dict[str, Any], seen: set) -> Iterator[bytes | memoryview]:
    """The bytes of one recorded file, in order."""
    where = f"{archive.name}: task {task!r}"
    head, spans = _parts(archive, task, f, seen)
    yield head
    if not spans:
        return
    # the next tensor is rebuilt while this one is hashed and written (numpy and zstd release the
    # GIL): at most two tensors in memory
    read = _Bytes(archive).read
    with ThreadPoolExecutor(1, thread_name_prefix="tallpack-ahead") as ahead:
        def fetch(i: int) -> Future | None:
            return ahead.submit(_original, archive, read, task, spans[i][2]) if i < len(spans) else None

        nxt = fetch(0)
        for i, (begin, end, name, dtype, shape) in enumerate(spans):
            assert nxt is not None
            (data, got_dtype, got_shape), nxt = nxt.result(), fetch(i + 1)
            _check_kind(got_dtype, got_shape, name, dtype, shape, where)
            _check_size(len(data), begin, end, name, where)
            yield data


class _Bytes:
    """An archive's arrays read as bytes, without torch (:data:`exact.ReadBytes`): an exact unpack
    of safetensors files builds no tensor, and a fresh process spares torch's import (seconds).
    ``source`` is the archive's, through which ``exact.runs`` prefetches a remote one's chunks."""

    def __init__(self, archive: "Archive"):
        self.archive = archive
        self.source = archive.source

    def read(self, ref: ArrayRef, where: str, use: Use = Use.OUTPUT, *, start: int = 0, stop: int | None = None
             ) -> np.ndarray:
        """Elements ``[start, stop)`` of ``ref`` as bytes (uint8; read-only where a view of the
        file or of the cache), checked as ``Archive.read_array`` checks them. A ``Use.SHARED_INPUT``
        (a base, the same for every task) is decoded whole and kept in the archive's cache, when
        it fits, and every read of it after that, whole or a run of it, is a view of the kept
        bytes: an exact unpack of every task decodes each base once."""
        stop = ref.numel if stop is None else stop
        if use is Use.SHARED_INPUT and ref.chunks:
            kept = self._kept(ref, where)
            if kept is not None:
                return kept[start * ref.itemsize : stop * ref.itemsize]
        return self._decoded(ref, where, start, stop)

    def _kept(self, ref: ArrayRef, where: str) -> np.ndarray | None:
        """The whole array's bytes from the cache, else decoded and kept there if the cache has
        room for them (``Archive._room``: while a task is read whole, beside what it holds); None
        where it has not (``cache_bytes=0``): each read then decodes only its own elements."""
        archive = self.archive
        key = ("bytes", ref.chunks[0].offset, ref.dtype, ref.shape)  # (as reader's _cache_key: not a tensor's)
        hit = archive._cache.get(key)
        if hit is not None or ref.nbytes > archive._room():
            return hit
        data = self._decoded(ref, where, 0, ref.numel)
        if data.flags.writeable:  # decoded, not a view of the file (which costs nothing to read again)
            data.flags.writeable = False  # shared by every task's rebuild: none may write into it
            archive._keep(key, data, ref.nbytes)
        return data

    def _decoded(self, ref: ArrayRef, where: str, start: int, stop: int) -> np.ndarray:
        archive = self.archive
        try:
            buf = archive._c.read_array(ref, where, start, stop)
        except OutOfMemoryError:
            raise
        except MemoryError:
            raise archive._out_of_memory(where, ref.nbytes) from None
        data = np.frombuffer(buf, np.uint8)
        if ref.dtype == "bool" and "bitpack" not in ref.chain.ids() and len(data) and int(np.max(data)) > 1:
            raise FormatError(f"{archive.name}: {where}: a bool array holds bytes other than 0 and 1 (spec §4)")
        return data


def _original(archive: "Archive", read: ReadBytes, task: str, name: str) -> tuple[memoryview, str, tuple]:
    """A task's original tensor ``name`` as its bytes, dtype and shape: from the stored bits
    (``dense``, ``shared``) or rebuilt in numpy (``exact.original_bits``), else, where only torch
    gives the bits (a group's member, a 16-bit base with NaNs, float8, ...), ``get_tensor(...,
    exact=True)``'s: the same bytes either way."""
    target = archive._resolve(task, name)
    if archive._member(task, target) is None:
        entry, tt = archive._entry(task, target)
        where = f"task {task!r}, tensor {target!r}"
        if tt.encoding in ("dense", "shared"):  # the original bits, stored (``Dense`` and ``Shared.rebuild``)
            ref = (tt.arrays if tt.encoding == "dense" else entry.arrays)["data"]
            return read(ref, f"{where} (data)", Use.OUTPUT).data, ref.dtype, tuple(ref.shape)
        if tt.encoding in TALL_ENCODINGS and "exact" in tt.extras:
            try:
                with memory_named(f"{archive.name}: {where}"):  # its output or a run's
                    bits = original_bits(read, entry, tt, where)
                return bits.view(np.uint8).data, tt.dtype, tuple(tt.shape)
            except NotInNumpy:
                pass
            except IntegrityError as e:  # a hash that does not match: say which archive, as get_tensor does
                text = str(e)
                raise IntegrityError(text if text.startswith(f"{archive.name}:") else f"{archive.name}: {text}"
                                     ) from None
    t = archive.get_tensor(task, name, exact=True)
    return tensor_to_bytes(t), dtype_name(t.dtype), tuple(t.shape)


def _checked_bytes(t, begin: int, end: int, name: str, dtype: str, shape: tuple, where: str) -> memoryview:
    """A rebuilt tensor's bytes, checked against its place in the file's header."""
    _check_kind(dtype_name(t.dtype), tuple(t.shape), name, dtype, shape, where)
    data = tensor_to_bytes(t)
    _check_size(len(data), begin, end, name, where)
    return data


def _check_kind(got_dtype: str, got_shape: tuple, name: str, dtype: str, shape: tuple, where: str) -> None:
    if got_dtype != dtype or got_shape != shape:
        raise FormatError(f"{where}: tensor {name!r} is not {dtype} {shape} as its file's header says")


def _check_size(nbytes: int, begin: int, end: int, name: str, where: str) -> None:
    if nbytes != end - begin:
        raise FormatError(f"{where}: tensor {name!r} does not fill its {end - begin} bytes")


def _check(archive: "Archive", task: str, f: dict[str, Any], h, size: int) -> None:
    if h.hexdigest() != f.get("sha256") or size != f.get("size"):
        raise IntegrityError(f"{archive.name}: task {task!r}: rebuilt {f.get('name')!r} does not match the "
                             f"original's SHA-256 {f.get('sha256')} (damaged archive)")


def _folder(name: str) -> str:
    """A record's folder: a pipeline's component (``unet`` of ``unet/diffusion_pytorch_model.bin``),
    a sentence-transformers module (``2_Dense`` of ``2_Dense/pytorch_model.bin``), else ``""``."""
    return name.rpartition("/")[0]


def _key_folders(keys: list[str], files: list[dict[str, Any]]) -> dict[str, str]:
    """Each tensor's folder among the task's recorded weight files: ``unet`` of ``unet/conv_in.weight``
    where ``unet/`` holds weights, else ``""`` (a sentence-transformers model's transformer at the
    top, whose names are its own; every tensor of an in-memory input)."""
    folders = {_folder(f["name"]) for f in files if f.get("role") in ("safetensors", "torch")} - {""}
    return {k: component_of(k, folders) for k in keys}


def _not_rebuilt(files: list[dict[str, Any]]) -> set[str]:
    """The folders whose tensor files cannot be rebuilt: those holding a pickle (a pipeline saved
    with ``safe_serialization=False`` keeps a safetensors text encoder beside pickled unet and vae:
    each component folder on its own), and ``""`` where no file holds tensors (an in-memory input)."""
    weights = [f for f in files if f.get("role") in ("safetensors", "torch")]
    if not weights:
        return {""}
    return {_folder(f["name"]) for f in weights if f.get("role") == "torch"}


def _rebuilt(f: dict[str, Any], not_rebuilt: set[str]) -> bool:
    """Whether the record ``f`` is written back byte for byte: not a pickle, nor a safetensors file
    or shard index of a folder whose tensors are written anew."""
    if f["role"] == "torch":
        return False
    return not ((f["role"] == "safetensors" or f["name"].endswith(".index.json")) and _folder(f["name"]) in not_rebuilt)


def rebuildable(files: list[dict[str, Any]]) -> bool:
    """Whether the task's tensor files can be rebuilt (safetensors inputs; not pickles, not dicts)."""
    return not _not_rebuilt(files)


def rebuilt_whole(archive: "Archive", task: str) -> bool:
    """Whether an exact unpack of ``task`` writes its original tensor files byte for byte
    (safetensors inputs), rather than its exact tensors as new safetensors files."""
    return rebuildable(_files(archive, task))


def _write_file(archive: "Archive", task: str, f: dict[str, Any], seen: set, tmp: Path) -> None:
    """One recorded file rebuilt into ``tmp``, checked against its SHA-256."""
    h, size = hashlib.sha256(), 0
    with open(tmp, "wb") as fh:
        for piece in _pieces(archive, task, f, seen):
            fh.write(piece)
            h.update(piece)
            size += len(piece)
        fh.flush()
        os.fsync(fh.fileno())
    _check(archive, task, f, h, size)


def write_originals(archive: "Archive", task: str, outdir: str | os.PathLike) -> tuple[list[Path], list[str]]:
    """Write the task's recorded files into ``outdir``, each checked against its SHA-256.

    Returns the paths written and the task's tensors that no file written holds: none for
    safetensors inputs; for pickle or in-memory inputs (only the folder's other files are
    written), every tensor; for a pipeline, the tensors of its components saved as pickles (its
    safetensors components are written byte for byte). The caller writes those exact tensors.
    """
    files = _files(archive, task)
    out = make_folder(outdir)
    written: list[Path] = []
    seen: set = set()
    not_rebuilt = _not_rebuilt(files)
    chosen = [f for f in files if _rebuilt(f, not_rebuilt)]
    for line in _disagreeing(files, archive.files(task), f"{archive.name}: task {task!r}"):
        log.warning("%s", line)
    # every target checked before anything is written: none leaves the folder (spec §6.5); none
    # is another's folder, the task's kept files' included (``_files``)
    targets = [(f, safe_target(out, f["name"])) for f in chosen]
    # a whole task read, shared arrays in the same order as every task's: the cache keeps what fits
    # beside what it holds (``Archive._scanning``), so the next task finds the same bases there
    with archive._scanning():
        for f, target in targets:
            written.append(atomic_write(target, partial(_write_file, archive, task, f, seen)))
    weights = {f["name"] for f in chosen if f["role"] == "safetensors" or f["name"].endswith(".index.json")}
    if weights:  # the weights of an earlier output here (a pipeline's: in its folders) these do not replace
        ours = {p.relative_to(out).as_posix() for p in written}
        remove_found_on_commit(out, lambda: previous_in(out, dict.fromkeys(weights)) - ours)
    keys = archive.keys(task)
    return written, [k for k, c in _key_folders(keys, files).items() if c in not_rebuilt]


#: The most bytes of originals that ``verify`` holds for the derived masks of tensors whose other
#: tasks' originals have not come yet (tasks whose files list their tensors in different orders);
#: beyond it, the oldest are let go and those masks derived again afterwards. Tasks whose files
#: agree hold one tensor's originals at a time, unless they pass it together: a large tensor's
#: masks are then checked at the end, each task's a run at a time (``derived.rebuild_in_runs``).
#: (A large ``tall-derived-merged`` tensor's originals are rebuilt together a run at a time,
#: :class:`_Together`, and held by none.)
WAITING_BYTES = 1 << 28


def verify_originals(archive: "Archive", progress: ProgressLike = None) -> list[str]:
    """Rebuild every exact tensor and every recorded file of every task with the exact tier and
    check them against their hashes, a ``progress`` step per tensor, and every derived mask
    (``tall-derived`` entries) against the manifest's set bits; returns the problems found.

    Each original is rebuilt once, for its file's hash and for the masks derived from it: the tasks
    are checked side by side, a tensor of each in turn, so that a tensor's originals of every task
    (from which a derived merged vector comes) are at hand together; a large ``tall-derived-merged``
    tensor's, every task's together a run at a time (:class:`_Together`). A mask that was not checked
    on the way (a rebuild that failed, a task without the exact tier, files in other orders) is
    derived again at the end, as a lossy read derives it (``task_mask``).
    """
    tasks = [t for t in archive.tasks if archive.task_info(t).exact is not None]
    steps = iter(track(range(sum(len(archive.keys(t)) for t in tasks)), progress, "checking originals"))
    said: dict[str, list[str]] = {t: [] for t in tasks}
    # the rebuilds that failed (not a file record's problems: the masks derive from the originals all
    # the same), and below the masks that did not check: their tensors' other masks are not derived again
    named: list[str] = []
    masks = _Masks(archive, tasks)
    together = _Together(archive, masks)
    # (task, its check, the tensor it asks for, its file's hash so far, that tensor's rebuild once
    # submitted): one each, taken in turn; the next one's tensor is rebuilt while this one's is
    # hashed and its masks derived
    queue: deque[list[Any]] = deque()

    def advance(task: str, check: Generator[tuple[str, Any], Any, None], value: Any) -> None:
        try:
            if isinstance(value, TallpackError):
                name, h = check.throw(value)
            else:
                name, h = check.send(value)
        except StopIteration:
            masks.done(task)
            return
        except (OutOfMemoryError, RemoteError, ArchiveClosedError):  # not damage: verify cannot say, and fails
            raise
        except TallpackError as e:
            said[task].append(str(e))
            masks.done(task)
            return
        queue.append([task, check, name, h, None])

    def one(task: str, check: Generator[tuple[str, Any], Any, None], name: str, rebuilt: Future | None) -> None:
        try:
            t = rebuilt.result() if rebuilt is not None else archive.get_tensor(task, name, exact=True)
        except (OutOfMemoryError, RemoteError, ArchiveClosedError):
            raise
        except TallpackError as e:
            named.append(str(e))
            advance(task, check, e)
        else:
            masks.saw(task, name, t)
            advance(task, check, t)

    # the next tensor rebuilt on a thread of its own while this one is hashed; none for an archive
    # opened with one thread (``threads=1``: verify then starts no thread at all)
    with ThreadPoolExecutor(1, thread_name_prefix="tallpack-ahead") if archive.threads > 1 else nullcontext() as ahead:
        def submit_next() -> None:
            if ahead is not None and queue and queue[0][4] is None and not together.wanted(queue[0][0], queue[0][2]):
                with memory_named(f"{archive.name}: checking the originals"):  # (its thread may not start)
                    queue[0][4] = ahead.submit(archive.get_tensor, queue[0][0], queue[0][2], exact=True)

        for task in tasks:
            advance(task, _checking(archive, task, steps, said[task]), None)
        while queue:
            first = queue.popleft()
            group = together.take(first, queue)
            submit_next()
            if group is None:
                one(first[0], first[1], first[2], first[4])
            else:  # every task's original of a large tensor at once, a run at a time
                for task, check, value in together.check(group):
                    if value is None:  # not checked: each task's rebuilt as before, to say what it finds
                        one(task, check, group[0][2], None)
                    else:
                        advance(task, check, value)
            del first, group  # (a rebuilt tensor with it)
            submit_next()
    for _ in steps:  # the last step reported, and those of a task that failed before its tensors
        pass
    problems = [p for t in tasks for p in said[t]]
    left = [(entry, t, tt) for entry in archive.manifest.tensors for t, tt in entry.tasks.items()
            if tt.encoding in TALL_ENCODINGS and tt.encoding != "tall" and (entry.name, t) not in masks.checked]
    for entry, t, tt in track(left, progress, "checking derived masks"):  # set bits against the manifest's
        if any(f"tensor {entry.name!r}" in p for p in named):
            continue  # an original of it did not rebuild, or another task's mask of it failed: said already
        where = f"{archive.name}: task {t!r}, tensor {entry.name!r}"
        try:  # a large tensor's mask a run at a time (the rebuild checks its set bits), else whole
            with memory_named(f"{archive.name}: checking the derived masks"):
                if rebuild_in_runs(archive.read_array, entry, tt, where) is None:
                    task_mask(archive.read_array, entry, tt, where)
        except (OutOfMemoryError, RemoteError, ArchiveClosedError):
            raise
        except TallpackError as e:
            problems.append(str(e))
            named.append(str(e))  # (one problem a tensor: its other tasks' masks not derived again)
    return problems


def _checking(archive: "Archive", task: str, steps: Iterator[int], said: list[str]
              ) -> Generator[tuple[str, Any], Any, None]:
    """One task's share of :func:`verify_originals`: yields the name of each tensor it needs (and
    its file's hash so far, None for a tensor of no file), and is sent its exact rebuild, a
    :class:`_Fed` (its bytes given to a copy of that hash), or the error of that rebuild in return.
    A file's tensor that does not rebuild ends the task (raised); any other is said in ``said``, and
    the next one asked for."""
    files = _files(archive, task)
    said.extend(_disagreeing(files, archive.files(task), f"{archive.name}: task {task!r}"))
    seen: set = set()
    not_rebuilt = _not_rebuilt(files)
    # the files of safetensors inputs (a pipeline's safetensors components; a sentence-transformers
    # module's beside a pickled transformer)
    if "" not in not_rebuilt or any(f["role"] == "safetensors" and _rebuilt(f, not_rebuilt) for f in files):
        where = f"{archive.name}: task {task!r}"
        for f in files:
            if not _rebuilt(f, not_rebuilt):
                continue
            head, spans = _parts(archive, task, f, seen)
            h, size = hashlib.sha256(head), len(head)
            for begin, end, name, dtype, shape in spans:
                t = yield name, h
                next(steps, None)
                if isinstance(t, _Fed):  # rebuilt in runs beside the other tasks', its bytes fed to a copy of h
                    _check_kind(t.dtype, t.shape, name, dtype, shape, where)
                    _check_size(t.nbytes, begin, end, name, where)
                    h, size = t.h, size + t.nbytes
                    continue
                data = _checked_bytes(t, begin, end, name, dtype, shape, where)
                h.update(data)
                size += len(data)
                del t, data  # not held while this task waits for its next tensor
            _check(archive, task, f, h, size)
    for name in archive.keys(task):
        if name in seen:
            continue
        next(steps, None)
        try:
            yield name, None
        except TallpackError as e:
            said.append(str(e))


class _Masks:
    """The derived masks ``verify`` checks on the originals it rebuilt for their files' hashes:
    ``tall-derived`` ones at once, ``tall-derived-merged`` ones once every task's original of the
    tensor has come (the merged vector derives from them all); ``checked`` says which passed."""

    def __init__(self, archive: "Archive", tasks: list[str]):
        self.archive = archive
        self.entries = {e.name: e for e in archive.manifest.tensors}
        self.coming = set(tasks)  # the tasks whose originals are still being rebuilt
        self.waiting: dict[str, dict[str, torch.Tensor]] = {}  # tensor -> task -> original, oldest first
        self.checked: set[tuple[str, str]] = set()  # (tensor, task)
        self._method: MergeMethod | None = None

    def saw(self, task: str, name: str, theta: torch.Tensor) -> None:
        entry = self.entries.get(name)
        tt = entry.tasks.get(task) if entry is not None else None
        if entry is None or tt is None or tt.encoding not in ("tall-derived", DERIVED_MERGED):
            return
        if tt.encoding == "tall-derived":
            self._check(entry, {task: theta})
            return
        order = [t for t in self.archive.tasks if t in entry.tasks]
        if theta.numel() * theta.element_size() * len(order) > WAITING_BYTES:
            return  # every task's original of it would pass the bound: its masks checked at the end, in runs
        got = self.waiting.pop(name, {})
        if any(t not in got and t not in self.coming for t in order):
            return  # a task's original will not come: derived again at the end
        got[task] = theta
        if len(got) == len(order):
            self._check(entry, {t: got[t] for t in order})
            return
        self.waiting[name] = got  # (last: the newest)
        held = sum(x.numel() * x.element_size() for g in self.waiting.values() for x in g.values())
        for other in list(self.waiting):
            if held <= WAITING_BYTES or other == name:
                break
            held -= sum(x.numel() * x.element_size() for x in self.waiting.pop(other).values())

    def done(self, task: str) -> None:
        """No more originals of ``task`` come: the tensors that wait for one are let go."""
        self.coming.discard(task)
        for name in [n for n, got in self.waiting.items() if task not in got]:
            del self.waiting[name]

    def _check(self, entry: TensorEntry, originals: dict[str, torch.Tensor]) -> None:
        where = f"{self.archive.name}: tensor {entry.name!r}"
        read = self.archive.read_array
        try:
            base = read(entry.arrays["base"], where + " (base)", Use.SHARED_INPUT).cpu()
            if entry.tasks[next(iter(originals))].encoding == DERIVED_MERGED:
                if self._method is None:
                    merge = self.archive.manifest.merge
                    self._method = METHODS[merge.get("method", "")].from_params(merge)
                merged = merged_from(base, list(originals.values()), self._method, where)["merged"]
            else:
                merged = read(entry.arrays["merged"], where + " (merged)", Use.SHARED_INPUT).cpu()
            for t, theta in originals.items():
                checked_mask(theta, base, merged, entry.tasks[t], where)
        except MemoryError:  # OutOfMemoryError too: not damage
            raise
        except Exception:  # noqa: BLE001 - whatever it is, the end's task_mask says it as a lossy read does
            return
        self.checked.update((entry.name, t) for t in originals)


@dataclass(frozen=True)
class _Fed:
    """What ``verify`` sends a task's check for a tensor rebuilt with the other tasks'
    (:class:`_Together`), checked against its hash: its file's hash so far (a copy) given the
    original's bytes, and the dtype, shape and size the rebuilt tensor has."""

    h: Any
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


class _Together:
    """The large ``tall-derived-merged`` tensors (``exact.in_runs``) whose originals ``verify``
    rebuilds once, every task's together, a run at a time (``derived_merged.checked_in_runs``):
    each run's bytes fed to each task's file hash, the merged vector derived from the runs (never
    whole) and each task's mask's set bits counted from them. Rebuilt one task at a time, each
    original came three times (its file's hash, the merged vector, its mask) and the merged vector
    whole. Where not every task asks for the tensor at once (files listing their tensors in other
    orders, a task that failed) or the pass finds anything wrong, each task's original is rebuilt
    as before, which says what is wrong in the same words."""

    def __init__(self, archive: "Archive", masks: _Masks):
        self.archive, self.masks = archive, masks
        self._wanted: dict[str, tuple[TensorEntry, list[str]] | None] = {}
        self._method: MergeMethod | None = None
        merge = archive.manifest.merge
        method = METHODS.get(merge.get("method", ""))
        try:
            self._method = None if method is None else method.from_params(merge)
        except Exception:  # noqa: BLE001 - each task's rebuild says what is wrong with it, as before
            self._method = None

    def wanted(self, task: str, name: str) -> bool:
        """Whether ``task``'s original of ``name`` is rebuilt together with the other tasks'."""
        if name not in self._wanted:
            entry = self.masks.entries.get(name)
            self._wanted[name] = None
            if entry is not None and self._method is not None and all(
                    tt.encoding == DERIVED_MERGED and "exact" in tt.extras for tt in entry.tasks.values()):
                order = [t for t in self.archive.tasks if t in entry.tasks]
                if in_runs(self.archive.read_array, entry, [entry.tasks[t] for t in order]):
                    self._wanted[name] = entry, order
        archive = self.archive
        return (self._wanted[name] is not None and archive._resolve(task, name) == name
                and archive._member(task, name) is None)

    def take(self, first: list[Any], queue: deque[list[Any]]) -> list[list[Any]] | None:
        """``first`` (a request: task, check, tensor, hash, rebuild) and every other task's request
        for its tensor, taken from ``queue``, in the manifest's order of tasks; None where the
        tensor is not rebuilt together, or a task of it does not ask for it now."""
        task, _, name, _, rebuilt = first
        if rebuilt is not None or not self.wanted(task, name):
            return None
        wanted = self._wanted[name]
        assert wanted is not None
        found = {task: first}
        for item in queue:
            if item[2] == name and item[0] in wanted[1] and item[4] is None and self.wanted(item[0], name):
                found[item[0]] = item
        if set(found) != set(wanted[1]):
            return None
        taken = {id(item) for item in found.values()}
        rest = [item for item in queue if id(item) not in taken]
        queue.clear()
        queue.extend(rest)
        return [found[t] for t in wanted[1]]

    def check(self, group: list[list[Any]]) -> list[tuple[str, Any, _Fed | None]]:
        """Each task of ``group`` (from :meth:`take`), its check and what to send it: a
        :class:`_Fed`, or None where the pass found anything wrong (each task's original is then
        rebuilt on its own). Masks whose set bits are the manifest's are marked checked."""
        name = group[0][2]
        wanted = self._wanted[name]
        assert wanted is not None and self._method is not None
        entry, order = wanted
        fed = {item[0]: (item[3].copy() if item[3] is not None else None) for item in group}

        def feed(task: str, data: memoryview) -> None:
            h = fed[task]
            if h is not None:
                h.update(data)
        try:
            with memory_named(f"{self.archive.name}: checking the originals"):
                ones = checked_in_runs(self.archive.read_array, entry, order, self._method, f"tensor {name!r}", feed,
                                       self.archive.threads)
        except (OutOfMemoryError, RemoteError, ArchiveClosedError):  # not damage: verify cannot say, and fails
            raise
        except Exception as e:  # noqa: BLE001 - each task's rebuild says what is wrong, as before
            # (said at debug level, so that a fault of this pass itself, which would only show as
            # slowness, can be seen with -vv)
            log.debug("%s: tensor %r: originals rebuilt one task at a time (%s: %s)", self.archive.name, name,
                      type(e).__name__, e)
            return [(item[0], item[1], None) for item in group]
        out: list[tuple[str, Any, _Fed | None]] = []
        for item in group:
            tt = entry.tasks[item[0]]
            if ones[item[0]] == tt.params["ones"]:  # else derived again at the end, which says it
                self.masks.checked.add((name, item[0]))
            nbytes = numel(tt.shape) * torch_dtype(tt.dtype).itemsize
            out.append((item[0], item[1], _Fed(fed[item[0]], tt.dtype, tuple(tt.shape), nbytes)))
        return out
