"""Atomic file creation: write under a temporary name beside the target, rename when complete."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def temp_beside(target: Path) -> tuple[int, Path]:
    """An open descriptor and the path of a new temporary file in ``target``'s folder, with the
    permissions a plain ``open`` would give (mkstemp's are 0600)."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".partial")
    os.fchmod(fd, 0o666 & ~_umask())
    return fd, Path(tmp)


def commit(tmp: Path, target: Path) -> None:
    """Rename ``tmp`` to ``target`` and make the rename durable."""
    os.replace(tmp, target)
    try:
        dfd = os.open(target.parent, os.O_RDONLY)
    except OSError:  # pragma: no cover - some platforms cannot open folders
        return
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
