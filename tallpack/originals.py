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
import os
import struct
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .container import _strict_loads
from .dtypes import dtype_name, tensor_to_bytes
from .errors import CheckpointError, FormatError, IntegrityError, OutOfMemoryError, TallpackError
from .folders import check_digest, check_file_name, check_no_clash, safe_target
from .fsutil import atomic_write, make_folder, remove_found_on_commit
from .limits import MAX_DEPTH
from .progress import ProgressLike, track
from .sharding import previous_weights
from .sources import _ST_DTYPES, Source

if TYPE_CHECKING:
    from .reader import Archive

_READ = 1 << 24
#: A safetensors header larger than this is refused (the safetensors library's own limit).
MAX_HEADER = 100_000_000


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
    files = []
    for path in src.weight_files:
        name = os.path.relpath(path, src.root).replace(os.sep, "/") if src.root else path.name
        sha, size = _sha256(path)
        f: dict[str, Any] = {"name": name, "size": size, "sha256": sha}
        if path.suffix == ".safetensors":
            f["role"] = "safetensors"
            f["header"] = _header_text(path)
            _layout(f, src.keys(), set(), str(path))  # refuse what cannot be rebuilt, at pack time
        else:
            f["role"] = "torch"
        files.append(f)
    for path in src.other_files:
        data = path.read_bytes()
        f = {"name": path.name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "role": "file"}
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
    spans = []
    for k, v in doc.items():
        if k == "__metadata__":
            continue
        dt = v.get("dtype") if isinstance(v, dict) else None
        if not (isinstance(dt, str) and dt in _ST_DTYPES and _naturals(v.get("data_offsets"), 2)
                and _naturals(v.get("shape"))):
            raise FormatError(f"{label}: bad safetensors header (tensor {k!r:.200} needs a known dtype, a shape "
                              "and two data_offsets, of non-negative integers)")
        spans.append((v["data_offsets"][0], v["data_offsets"][1], k, _ST_DTYPES[dt], tuple(v["shape"])))
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
    if role == "file" and not isinstance(f.get("base64" if "base64" in f else "text"), str):
        raise FormatError(f"{label}: a file record without its text or base64 content")


def _files(archive: "Archive", task: str) -> list[dict[str, Any]]:
    rec = archive.task_info(task).exact
    if rec is None:
        archive.require_exact(task)
    files = rec.get("files") if isinstance(rec, dict) else None
    if not isinstance(files, list) or not all(isinstance(f, dict) for f in files):
        raise FormatError(f"{archive.name}: task {task!r}: malformed file records")
    for f in files:
        _check_record(f, f"{archive.name}: task {task!r}")
    return files


def _pieces(archive: "Archive", task: str, f: dict[str, Any], seen: set) -> Iterator[bytes | memoryview]:
    """The bytes of one recorded file, in order."""
    where = f"{archive.name}: task {task!r}"
    label = f"{where}: file record {f['name']!r}"
    if f["role"] == "file" and "base64" in f:
        try:
            data = base64.b64decode(f["base64"], validate=True)
        except (binascii.Error, ValueError):
            raise FormatError(f"{label}: its base64 content is not valid base64") from None
        yield data
        return
    if f["role"] == "file":
        yield _utf8(f["text"], label, "text")
        return
    spans = _layout(f, set(archive.keys(task)), seen, where)
    header = f["header"].encode("utf-8")
    yield struct.pack("<Q", len(header)) + header
    # the next tensor is rebuilt while this one is hashed and written (numpy and zstd release the
    # GIL): at most two tensors in memory
    with ThreadPoolExecutor(1, thread_name_prefix="tallpack-ahead") as ahead:
        def fetch(i: int) -> Future | None:
            return ahead.submit(archive.get_tensor, task, spans[i][2], exact=True) if i < len(spans) else None

        nxt = fetch(0)
        for i, (begin, end, name, dtype, shape) in enumerate(spans):
            assert nxt is not None
            t, nxt = nxt.result(), fetch(i + 1)
            yield _checked_bytes(t, begin, end, name, dtype, shape, where)


def _checked_bytes(t, begin: int, end: int, name: str, dtype: str, shape: tuple, where: str) -> memoryview:
    """A rebuilt tensor's bytes, checked against its place in the file's header."""
    if dtype_name(t.dtype) != dtype or tuple(t.shape) != shape:
        raise FormatError(f"{where}: tensor {name!r} is not {dtype} {shape} as its file's header says")
    data = tensor_to_bytes(t)
    if len(data) != end - begin:
        raise FormatError(f"{where}: tensor {name!r} does not fill its {end - begin} bytes")
    return data


def _check(archive: "Archive", task: str, f: dict[str, Any], h, size: int) -> None:
    if h.hexdigest() != f.get("sha256") or size != f.get("size"):
        raise IntegrityError(f"{archive.name}: task {task!r}: rebuilt {f.get('name')!r} does not match the "
                             f"original's SHA-256 {f.get('sha256')} (damaged archive)")


def rebuildable(files: list[dict[str, Any]]) -> bool:
    """Whether the task's tensor files can be rebuilt (safetensors inputs; not pickles, not dicts)."""
    return any(f.get("role") == "safetensors" for f in files) and not any(f.get("role") == "torch" for f in files)


def rebuilt_whole(archive: "Archive", task: str) -> bool:
    """Whether an exact unpack of ``task`` writes its original tensor files byte for byte
    (safetensors inputs), rather than its exact tensors as new safetensors files."""
    return rebuildable(_files(archive, task))


def write_originals(archive: "Archive", task: str, outdir: str | os.PathLike) -> tuple[list[Path], bool]:
    """Write the task's recorded files into ``outdir``, each checked against its SHA-256.

    Returns the paths written and whether the tensor files were among them (safetensors inputs);
    for pickle or in-memory inputs only the folder's other files are written (the caller writes
    the exact tensors).
    """
    files = _files(archive, task)
    out = make_folder(outdir)
    written: list[Path] = []
    seen: set = set()
    tensor_files = rebuildable(files)
    chosen = [f for f in files if not (f["role"] == "torch" or (not tensor_files and (
        f["role"] == "safetensors" or f["name"].endswith(".index.json"))))]
    # every target checked before anything is written: none leaves the folder (spec §6.5), none
    # is another's folder (the task's kept files are written beside them)
    check_no_clash([*(f["name"] for f in chosen), *archive.files(task)], f"{archive.name}: task {task!r}")
    targets = [(f, safe_target(out, f["name"])) for f in chosen]
    for f, target in targets:

        def write(tmp: Path, f=f) -> None:
            h, size = hashlib.sha256(), 0
            with open(tmp, "wb") as fh:
                for piece in _pieces(archive, task, f, seen):
                    fh.write(piece)
                    h.update(piece)
                    size += len(piece)
                fh.flush()
                os.fsync(fh.fileno())
            _check(archive, task, f, h, size)

        written.append(atomic_write(target, write))
    if tensor_files:  # the weights of an earlier output here that these files do not replace
        ours = {p.relative_to(out).as_posix() for p in written}
        remove_found_on_commit(out, lambda: previous_weights(out) - ours)
    return written, tensor_files


def verify_originals(archive: "Archive", progress: ProgressLike = None) -> list[str]:
    """Rebuild every exact tensor and every recorded file of every task with the exact tier and
    check them against their hashes, a ``progress`` step per tensor; returns the problems found."""
    problems: list[str] = []
    tasks = [t for t in archive.tasks if archive.task_info(t).exact is not None]
    steps = iter(track(range(sum(len(archive.keys(t)) for t in tasks)), progress, "checking originals"))
    for task in tasks:
        try:
            files = _files(archive, task)
            seen: set = set()
            if rebuildable(files):
                for f in files:
                    if f.get("role") == "torch":
                        continue
                    h, size = hashlib.sha256(), 0
                    for i, piece in enumerate(_pieces(archive, task, f, seen)):
                        if i and f.get("role") == "safetensors":  # a tensor; the header comes first
                            next(steps, None)
                        h.update(piece)
                        size += len(piece)
                    _check(archive, task, f, h, size)
        except OutOfMemoryError:  # not damage
            raise
        except TallpackError as e:
            problems.append(str(e))
            continue
        for name in archive.keys(task):
            if name in seen:
                continue
            next(steps, None)
            try:
                archive.get_tensor(task, name, exact=True)
            except OutOfMemoryError:
                raise
            except TallpackError as e:
                problems.append(str(e))
    for _ in steps:  # the last step reported, and those of a task that failed before its tensors
        pass
    return problems
