"""Outputs and pack inputs at URLs.

An output (archive or folder) is written to a local staging folder, then uploaded with fsspec
(``put``) once complete, so a failed write leaves nothing at the URL. A pack input given as a URL
(a checkpoint file or a model folder: ``s3://...``, ``hf://org/model``, ...) is downloaded into a
temporary folder first, then read like a local one; the archive records the URL.

Local paths (and ``file://`` URLs) are written and read in place, as before. The staging folders
are temporary folders under ``$TMPDIR``: they need room for the whole output, or the inputs.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from .errors import CheckpointError, CheckpointNotFoundError, OutputError, TallpackError, quoted
from .storage import is_url

log = logging.getLogger(__name__)
_K = TypeVar("_K")


def local_path(target: str | os.PathLike) -> Path:
    """A local target as a path (``file://`` stripped)."""
    return Path(os.fspath(target).removeprefix("file://"))


def _fs(url: str, storage_options: dict[str, Any] | None):
    from fsspec.core import url_to_fs

    try:
        return url_to_fs(url, **(storage_options or {}))
    except ImportError as e:
        raise TallpackError(f"{url}: this kind of URL needs another package ({quoted(e)})") from None


def exists(target: str | os.PathLike, storage_options: dict[str, Any] | None = None) -> bool:
    """Whether a local path or a URL exists."""
    if not is_url(target):
        return local_path(target).exists()
    fs, path = _fs(os.fspath(target), storage_options)
    return bool(fs.exists(path))


@contextmanager
def staged(target: str | os.PathLike, storage_options: dict[str, Any] | None = None) -> Iterator[Path]:
    """A local path to write ``target`` at; for a URL, uploaded when the block succeeds.

    >>> with staged("s3://models/family.tallpack") as local:
    ...     write(local)      # then put to s3://models/family.tallpack
    """
    if not is_url(target):
        yield local_path(target)
        return
    url = os.fspath(target).rstrip("/")
    fs, rpath = _fs(url, storage_options)
    with tempfile.TemporaryDirectory(prefix="tallpack-stage-") as tmp:
        local = Path(tmp) / (Path(rpath).name or "out")
        yield local
        upload(local, fs, rpath, url)


def upload(local: Path, fs: Any, rpath: str, url: str) -> None:
    """Put a local file, or every file under a local folder, at ``rpath`` (same relative names)."""
    if local.is_dir():
        pairs = [(str(p), f"{rpath}/{p.relative_to(local).as_posix()}") for p in sorted(local.rglob("*")) if p.is_file()]
    elif local.is_file():
        pairs = [(str(local), rpath)]
    else:
        return
    total = sum(os.path.getsize(a) for a, _ in pairs)
    log.info("uploading %d file(s), %d bytes, to %s", len(pairs), total, url)
    try:
        for parent in sorted({b.rsplit("/", 1)[0] for _, b in pairs if "/" in b}):
            try:
                fs.makedirs(parent, exist_ok=True)
            except Exception:  # object stores have no folders; put works without them
                pass
        fs.put([a for a, _ in pairs], [b for _, b in pairs])
    except Exception as e:
        raise OutputError(f"{url}: upload failed ({type(e).__name__}: {quoted(e)})") from None


def size(target: str | os.PathLike, storage_options: dict[str, Any] | None = None) -> int:
    """The size of a local file or of the object at a URL."""
    if not is_url(target):
        return local_path(target).stat().st_size
    fs, path = _fs(os.fspath(target), storage_options)
    return int(fs.size(path))


@contextmanager
def fetched(inputs: Mapping[_K, Any], storage_options: dict[str, Any] | None = None
            ) -> Iterator[tuple[dict[_K, Any], dict[str, str]]]:
    """``inputs`` with every URL replaced by a local copy (a file, or a folder with all its files),
    and a map from each copy's path to its URL; the copies are removed when the block ends.
    Other inputs (paths, dicts of tensors) pass through.

    >>> with fetched({"base": "s3://models/base", "cars": "ft/cars"}) as (local, urls):
    ...     pack(local["base"], {"cars": local["cars"]}, "family.tallpack")
    """
    urls = {k: os.fspath(v) for k, v in inputs.items() if isinstance(v, (str, os.PathLike)) and is_url(v)}
    if not urls:
        yield dict(inputs), {}
        return
    with tempfile.TemporaryDirectory(prefix="tallpack-fetch-") as tmp:
        local, origin = dict(inputs), {}
        for i, (key, url) in enumerate(urls.items()):
            fs, rpath = _fs(url.rstrip("/"), storage_options)
            try:
                if not fs.exists(rpath):
                    raise CheckpointNotFoundError(f"{url}: no such file or folder")
                folder = fs.isdir(rpath)
                dest = Path(tmp) / str(i) / (Path(rpath).name or "input")
                dest.parent.mkdir()
                log.info("downloading %s", url)
                if folder:
                    dest.mkdir()
                    fs.get(rpath.rstrip("/") + "/", str(dest) + "/", recursive=True)
                else:
                    fs.get(rpath, str(dest))
            except TallpackError:
                raise
            except (OSError, ValueError) as e:
                raise CheckpointError(f"{url}: cannot download: {quoted(e)}") from None
            local[key] = dest
            origin[str(dest)] = url
        yield local, origin
