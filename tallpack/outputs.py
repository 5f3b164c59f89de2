"""Outputs: write a rebuilt task, every task, or a merged model as a safetensors checkpoint folder.

Every file is written under a temporary name beside its target and renamed into place only when
all the files of the call are complete: a call that fails (a full disk, a damaged archive) leaves
no file under an output's name, removes its temporaries and the folders it created, and leaves
existing files as they were. An existing output is replaced only with ``overwrite=True``
(``--force``).
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import torch

from .dtypes import tensor_to_bytes
from .errors import InvalidArgumentError, OutputExistsError
from .fsutil import commit, temp_beside, writing
from .manifest import check_task_name

if TYPE_CHECKING:
    from .reader import Archive

#: safetensors' dtype names.
_ST_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
for _name, _st in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2"), ("uint16", "U16"),
                   ("uint32", "U32"), ("uint64", "U64")):
    if hasattr(torch, _name):
        _ST_DTYPES[getattr(torch, _name)] = _st


def write_safetensors(f: IO[bytes], tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> None:
    """Stream a safetensors file to ``f``: the 8-byte header length, the JSON header (padded to 8
    bytes), then each tensor's bytes, largest elements first so every tensor stays aligned.
    Streaming through our own file object lets a full disk surface as the OSError it is."""
    if "__metadata__" in tensors:
        raise InvalidArgumentError("a tensor named '__metadata__' cannot be stored in safetensors")
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    pos = 0
    for k in order:
        t = tensors[k]
        if t.dtype not in _ST_DTYPES:
            raise InvalidArgumentError(f"tensor {k!r}: safetensors cannot store {t.dtype}")
        n = t.numel() * t.element_size()
        header[k] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [pos, pos + n]}
        pos += n
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    f.write(struct.pack("<Q", len(text)))
    f.write(text)
    for k in order:
        f.write(tensor_to_bytes(tensors[k]))


class _Outputs:
    """The files of one call: checked, staged under temporary names, renamed together at the end."""

    def __init__(self, overwrite: bool):
        self.overwrite = overwrite
        self.created: list[Path] = []  # folders this call made, outermost first
        self.staged: list[tuple[int, Path, Path]] = []  # (locked descriptor, temporary, target)

    def folder(self, outdir: str | os.PathLike) -> Path:
        out = Path(outdir)
        if out.exists() and not out.is_dir():
            raise InvalidArgumentError(f"{out}: exists and is not a folder")
        missing = [p for p in (out, *out.parents) if not p.exists()]
        for p in reversed(missing):
            p.mkdir()
            self.created.append(p)
        return out

    def check(self, target: Path) -> None:
        if not self.overwrite and (target.exists() or target.is_symlink()):
            raise OutputExistsError(f"{target}: already exists; pass --force (overwrite=True) to replace it")

    def stage(self, target: Path, write: Callable[[IO[bytes]], None]) -> None:
        with writing(target):
            fd, tmp = temp_beside(target)
            self.staged.append((fd, tmp, target))  # the descriptor stays open: its lock guards tmp
            with os.fdopen(fd, "wb", closefd=False) as f:
                write(f)
            os.fsync(fd)

    def commit(self) -> None:
        while self.staged:
            fd, tmp, target = self.staged[0]
            commit(tmp, target, overwrite=self.overwrite)
            os.close(fd)
            self.staged.pop(0)

    def abort(self) -> None:
        for fd, tmp, _ in self.staged:
            tmp.unlink(missing_ok=True)
            os.close(fd)
        self.staged = []
        for p in reversed(self.created):
            try:
                p.rmdir()  # only if empty: never anything someone else put there
            except OSError:
                pass

    def __enter__(self) -> "_Outputs":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                self.commit()
            except BaseException:
                self.abort()
                raise
        else:
            self.abort()


def _checkpoint_files(outdir: Path, config: Any) -> list[Path]:
    return [outdir / "model.safetensors"] + ([outdir / "config.json"] if config is not None else [])


def _stage_checkpoint(outs: _Outputs, state_dict: Mapping[str, torch.Tensor], outdir: str | os.PathLike,
                      metadata: Mapping[str, Any] | None, config: Mapping[str, Any] | None) -> Path:
    out = outs.folder(outdir)
    meta = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    target = out / "model.safetensors"
    outs.stage(target, lambda f: write_safetensors(f, state_dict, meta))
    if config is not None:
        text = (json.dumps(config, indent=2) + "\n").encode()
        outs.stage(out / "config.json", lambda f: f.write(text))
    return target


def write_checkpoint(
    state_dict: Mapping[str, torch.Tensor],
    outdir: str | os.PathLike,
    *,
    metadata: Mapping[str, Any] | None = None,
    config: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``OUTDIR/model.safetensors`` (and ``config.json`` when given); returns the file's path.
    An existing file is replaced only with ``overwrite=True``.

    >>> write_checkpoint(fam.state_dict("cars"), "cars/", metadata={"task": "cars"})
    """
    with _Outputs(overwrite) as outs:
        for p in _checkpoint_files(Path(outdir), config):
            outs.check(p)
        return _stage_checkpoint(outs, state_dict, outdir, metadata, config)


def task_metadata(archive: "Archive", task: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The safetensors metadata and HF config to write beside an unpacked task."""
    info = archive.task_info(task)
    meta = {"tallpack.task": task, "tallpack.lambda": info.lam, "tallpack.archive": os.path.basename(archive.name)}
    for k, v in info.metadata.items():
        if isinstance(v, str):
            meta.setdefault(k, v)
    return meta, info.metadata.get("config")


def write_task(archive: "Archive", task: str, outdir: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Rebuild one task and write it as ``OUTDIR/model.safetensors`` (+ its ``config.json``).

    >>> write_task(fam, "cars", "cars/")
    """
    return write_tasks(archive, [task], outdir, overwrite=overwrite, subfolders=False)[0]


def write_tasks(archive: "Archive", tasks: Sequence[str] | None, outdir: str | os.PathLike, *,
                overwrite: bool = False, subfolders: bool = True) -> list[Path]:
    """Write several tasks (None: all), each as ``OUTDIR/NAME/model.safetensors``.

    All or nothing: every name and every output is checked first (each name must exist and be a
    safe folder name; no output may exist unless ``overwrite``), each task is written under
    temporary names, and the files are renamed into place only when every task is written. A
    failure half-way leaves no new file or folder behind.
    """
    names = list(archive.tasks if tasks is None else tasks)
    plan = []
    for name in names:
        archive.task_info(name)
        if subfolders:
            check_task_name(name)  # an archive's task name becomes a folder name
        meta, config = task_metadata(archive, name)
        folder = Path(outdir) / name if subfolders else Path(outdir)
        plan.append((name, folder, meta, config))
    with _Outputs(overwrite) as outs:
        for _, folder, _, config in plan:
            for p in _checkpoint_files(folder, config):
                outs.check(p)
        return [_stage_checkpoint(outs, archive.state_dict(name), folder, meta, config)
                for name, folder, meta, config in plan]


def write_merged(archive: "Archive", outdir: str | os.PathLike, method: str = "consensus-ta", *, k: int = 2,
                 alpha: float, task: str | None = None, overwrite: bool = False) -> tuple[Path, int]:
    """Write a merged model (see :meth:`tallpack.Archive.merged`); returns the file and its tensor count."""
    meta = {"tallpack.merge": method, "tallpack.k": k, "tallpack.alpha": alpha,
            "tallpack.tasks": list(archive.tasks)} | ({"tallpack.task": task} if task else {})
    config = (archive.task_info(task).metadata if task else archive.manifest.base.get("metadata", {})).get("config")
    with _Outputs(overwrite) as outs:
        for p in _checkpoint_files(Path(outdir), config):
            outs.check(p)
        sd = archive.merged(method, k=k, alpha=alpha, task=task)
        return _stage_checkpoint(outs, sd, outdir, meta, config), len(sd)
