"""Folder files: the non-weight files of a model folder (config, generation config, tokenizer
files, model card, chat template, ...), stored in the archive and written back on unpack.

Each distinct content is stored once across the family, as a ``uint8`` array keyed by its SHA-256
(manifest ``files``, spec §3.6); each task (and the base) maps relative names to those keys.
Names are checked when written and when read: relative, ``/``-separated, no empty, ``.`` or
``..`` component, no backslash, NUL or other control character. Writing back never leaves the
output folder: a target whose folder resolves elsewhere (a link planted in the output) is refused.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import re
from collections.abc import Callable, Mapping, Set
from pathlib import Path
from typing import TYPE_CHECKING

from .arrays import ArrayRef
from .codecs import Chain, Zstd
from .errors import FormatError, IntegrityError, OutputError
from .fsutil import atomic_write, make_folder

if TYPE_CHECKING:
    from .container import ContainerWriter

log = logging.getLogger(__name__)

_SHA256 = re.compile(r"[0-9a-f]{64}")
#: Reads one stored array's decoded bytes (``read(ref, where)``).
ReadBytes = Callable[[ArrayRef, str], "bytes | bytearray | memoryview"]


def check_file_name(name: object) -> str:
    """A stored file's name: a plain relative path with ``/`` separators that stays in the folder."""
    why = None
    if not isinstance(name, str) or not name:
        why = "is not a non-empty string"
    elif "\\" in name or not name.isprintable():
        why = "holds a backslash or a control character"
    elif name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        why = "is an absolute path"
    elif any(part in ("", ".", "..") for part in name.split("/")):
        why = "has an empty, '.' or '..' component"
    if why:
        raise FormatError(f"file name {name!r} {why}; files must stay inside the folder")
    assert isinstance(name, str)  # (else ``why`` says so)
    return name


def check_digest(key: object) -> str:
    if not isinstance(key, str) or not _SHA256.fullmatch(key):
        raise FormatError(f"file key {str(key)[:80]!r} is not a lowercase hex SHA-256")
    return key


def check_file_map(files: object, where: str, stored: Mapping[str, ArrayRef]) -> dict[str, str]:
    """A task's (or the base's) ``files``: names checked, every digest stored in the archive."""
    if not isinstance(files, Mapping):
        raise FormatError(f"{where}: files must be an object")
    for name, digest in files.items():
        try:
            check_file_name(name)
            check_digest(digest)
        except FormatError as e:
            raise FormatError(f"{where}: {e}") from None
        if digest not in stored:
            raise FormatError(f"{where}: file {name!r} refers to content {digest[:12]}... that is not stored")
    return dict(files)


def check_blob(digest: str, ref: ArrayRef) -> None:
    check_digest(digest)
    if ref.dtype != "uint8" or len(ref.shape) != 1:
        raise FormatError(f"file content {digest[:12]}...: must be a 1-d uint8 array")


class FileStore:
    """Pack time: write each distinct file content once; ``add`` returns a source's name map."""

    def __init__(self, writer: "ContainerWriter", level: int, chunk_elements: int):
        self._writer, self._chunk_elements = writer, chunk_elements
        self._chain = Chain([Zstd(level)])
        self.blobs: dict[str, ArrayRef] = {}

    def add(self, files: Mapping[str, Path], label: str) -> dict[str, str]:
        out: dict[str, str] = {}
        for name, path in files.items():
            check_file_name(name)
            try:
                data = path.read_bytes()
            except OSError as e:
                raise OutputError(f"{path}: cannot read ({e.strerror or e})") from None
            digest = hashlib.sha256(data).hexdigest()
            if digest not in self.blobs:
                self.blobs[digest] = self._writer.write_array(memoryview(data), "uint8", (len(data),),
                                                              self._chain, self._chunk_elements)
            out[name] = digest
        if out:
            log.info("%s: %d folder files kept (%d distinct contents so far)", label, len(out), len(self.blobs))
        return out


def read_blob(read: ReadBytes, digest: str, ref: ArrayRef, where: str) -> bytes:
    """One stored file's bytes, checked against its SHA-256."""
    data = bytes(read(ref, where))
    if hashlib.sha256(data).hexdigest() != digest:
        raise IntegrityError(f"{where}: content does not match its SHA-256 (damaged archive)")
    return data


def safe_target(outdir: Path, name: str) -> Path:
    """Where file ``name`` goes in ``outdir``; refuses a name or a folder that leads outside."""
    check_file_name(name)
    target = outdir.joinpath(*name.split("/"))
    root = outdir.resolve()
    parent = make_folder(target.parent)
    if not parent.resolve().is_relative_to(root):
        raise OutputError(f"{target}: its folder leads outside {outdir}; refusing to write there")
    return target


def write_files(outdir: str | os.PathLike, files: Mapping[str, str], blobs: Mapping[str, ArrayRef],
                read: ReadBytes, *, skip: Set[str] = frozenset()) -> list[Path]:
    """Write a task's (or the base's) files into ``outdir``, each atomically; returns the paths."""
    out = Path(outdir)
    written = []
    for name, digest in files.items():
        if name in skip:
            continue
        target = safe_target(out, name)
        data = read_blob(read, digest, blobs[digest], f"file {name!r}")
        written.append(atomic_write(target, functools.partial(Path.write_bytes, data=data)))
    return written
