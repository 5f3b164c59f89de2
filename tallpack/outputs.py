"""Outputs: write a rebuilt task (or a merged model) as a safetensors checkpoint folder."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .errors import TallpackError
from .fsutil import commit, temp_beside


def write_checkpoint(
    state_dict: Mapping[str, torch.Tensor],
    outdir: str | os.PathLike,
    *,
    metadata: Mapping[str, Any] | None = None,
    config: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``OUTDIR/model.safetensors`` (and ``config.json`` when given); returns the file's path.

    Each file is written to a temporary name and renamed when complete.

    >>> write_checkpoint(fam.state_dict("cars"), "cars/", metadata={"task": "cars"})
    """
    out = Path(outdir)
    if out.exists() and not out.is_dir():
        raise TallpackError(f"{out}: exists and is not a folder")
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


def task_metadata(archive, task: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The safetensors metadata and HF config to write beside an unpacked task."""
    info = archive.task_info(task)
    meta = {"tallpack.task": task, "tallpack.lambda": info.lam, "tallpack.archive": os.path.basename(archive.name)}
    for k, v in info.metadata.items():
        if isinstance(v, str):
            meta.setdefault(k, v)
    return meta, info.metadata.get("config")
