"""Outputs: write a rebuilt task, every task, or a merged model as a safetensors checkpoint folder.

Each file is written to a temporary name and renamed when complete.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file

from .errors import InvalidArgumentError
from .fsutil import commit, temp_beside
from .manifest import check_task_name
from .originals import write_originals

if TYPE_CHECKING:
    from .reader import Archive


def write_checkpoint(
    state_dict: Mapping[str, torch.Tensor],
    outdir: str | os.PathLike,
    *,
    metadata: Mapping[str, Any] | None = None,
    config: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``OUTDIR/model.safetensors`` (and ``config.json`` when given); returns the file's path.

    >>> write_checkpoint(fam.state_dict("cars"), "cars/", metadata={"task": "cars"})
    """
    out = Path(outdir)
    if out.exists() and not out.is_dir():
        raise InvalidArgumentError(f"{out}: exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    meta = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    target = out / "model.safetensors"
    _atomic(target, lambda tmp: save_file(dict(state_dict), str(tmp), metadata=meta))
    if config is not None:
        _atomic(out / "config.json", lambda tmp: tmp.write_text(json.dumps(config, indent=2) + "\n"))
    return target


def _atomic(target: Path, write) -> None:
    fd, tmp = temp_beside(target)
    os.close(fd)
    try:
        write(tmp)
        commit(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def task_metadata(archive: "Archive", task: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The safetensors metadata and HF config to write beside an unpacked task."""
    info = archive.task_info(task)
    meta = {"tallpack.task": task, "tallpack.lambda": info.lam, "tallpack.archive": os.path.basename(archive.name)}
    for k, v in info.metadata.items():
        if isinstance(v, str):
            meta.setdefault(k, v)
    return meta, info.metadata.get("config")


def write_task(archive: "Archive", task: str, outdir: str | os.PathLike, *, exact: bool = False) -> Path:
    """Rebuild one task and write it as ``OUTDIR/model.safetensors`` (+ its ``config.json``).

    With ``exact=True`` (archives packed with the exact tier), the original files byte for byte
    (each checked against its SHA-256); for PyTorch or in-memory inputs, the original tensors as
    ``model.safetensors``. Returns the first file written.

    >>> write_task(fam, "cars", "cars/")
    """
    if exact:
        archive.require_exact(task)
        paths, complete = write_originals(archive, task, outdir)
        if complete:
            return paths[0]
        meta, _ = task_metadata(archive, task)
        return write_checkpoint(archive.state_dict(task, exact=True), outdir, metadata=meta)
    meta, config = task_metadata(archive, task)
    return write_checkpoint(archive.state_dict(task), outdir, metadata=meta, config=config)


def write_tasks(archive: "Archive", tasks: Sequence[str] | None, outdir: str | os.PathLike, *,
                exact: bool = False) -> list[Path]:
    """Write several tasks (None: all), each as ``OUTDIR/NAME/model.safetensors``.

    Every name is checked first (it must exist and be a safe folder name), so nothing is written
    when one is bad.
    """
    names = list(archive.tasks if tasks is None else tasks)
    for name in names:
        archive.task_info(name)
        check_task_name(name)  # an archive's task name becomes a folder name
        if exact:
            archive.require_exact(name)
    return [write_task(archive, name, Path(outdir) / name, exact=exact) for name in names]


def write_merged(archive: "Archive", outdir: str | os.PathLike, method: str = "consensus-ta", *, k: int = 2,
                 alpha: float, task: str | None = None) -> tuple[Path, int]:
    """Write a merged model (see :meth:`tallpack.Archive.merged`); returns the file and its tensor count."""
    sd = archive.merged(method, k=k, alpha=alpha, task=task)
    meta = {"tallpack.merge": method, "tallpack.k": k, "tallpack.alpha": alpha,
            "tallpack.tasks": list(archive.tasks)} | ({"tallpack.task": task} if task else {})
    config = (archive.task_info(task).metadata if task else archive.manifest.base.get("metadata", {})).get("config")
    return write_checkpoint(sd, outdir, metadata=meta, config=config), len(sd)
