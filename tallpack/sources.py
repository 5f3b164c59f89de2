"""Sources: read checkpoints tensor by tensor, whatever they are stored in.

``open_source`` accepts a ``.safetensors`` file, a Hugging Face model folder (single or sharded
safetensors, or ``pytorch_model.bin`` files; diffusers' ``diffusion_pytorch_model`` names too), a
diffusers pipeline folder (``model_index.json``; the weights of each component subfolder it lists
as tensors named ``COMPONENT/NAME``, spec §3.6; a single-file checkpoint at its top left out), a
sentence-transformers folder (``modules.json``; the transformer's weights at its top under their
own names, each module folder's that holds weights as ``MODULE/NAME``, ``2_Dense/linear.weight``),
a PyTorch state-dict file read with ``weights_only=True`` (``.bin``, ``.pt``, ``.pth``, Lightning's
``.ckpt``, timm's ``.pth.tar``; or a training checkpoint holding one under a key of :data:`WRAPPER_KEYS`,
``{"model": state_dict, "optimizer": ...}``; beside an EMA copy, the one Lightning's or timm's loader
takes), or a mapping of tensors. A source lists names, shapes and dtypes without
reading data, and loads one tensor at a time, read from its file into memory of its own (a
file cut in place while it is read is then a CheckpointError, not a crash: see ``_read_tensor``).

What is refused, at open time (before anything is written), with a one-line
:class:`~tallpack.errors.CheckpointError` naming the file (or label) and the tensor:

- tensors without plain dense data: sparse (COO, CSR, CSC, BSR, BSC), other layouts (mkldnn),
  nested, meta (no data), quantized tensors, and tensor subclasses other than ``Parameter`` and
  ``Buffer`` (fake, distributed or wrapper tensors). Views, transposes and slices are fine.
- a sharded folder with a tensor in two shards. (An index that lists a tensor no shard holds,
  names another shard than the one holding it, or leaves out one a shard holds is packed as
  transformers loads it, every tensor of every shard, with a warning.)

Paths in a model folder stay in the folder. The folder itself may be a link (the user named it),
and so may a single file passed directly. Inside a folder, links (of files or of subfolders) are
followed only when their target resolves inside the folder's resolved path; in a Hugging Face
cache snapshot (``<repo>/snapshots/<rev>/file -> ../../blobs/<hash>``), a target inside the same
cache repository folder (the one holding ``snapshots/`` and ``blobs/``) is allowed too, and from
any folder, a file directly in such a repository's ``blobs/`` (a ``--local-dir`` download of
huggingface_hub before 0.23 links its large files there). A shard
index's ``weight_map`` values must be strings naming plain relative files: no absolute paths, no
empty, ``.`` or ``..`` components, no backslashes or NUL characters. Anything else is refused,
naming the file and where it leads (or the index and its bad entry). The check runs before each
file is opened; it does not defend against a folder changed by someone else while it is read.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import functools
import json
import logging
import mmap
import os
import pathlib
import pickle
import re
import shlex
import threading
import urllib.parse
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Union

import numpy as np
from safetensors import safe_open

from ._torch import torch
from .container import _strict_loads, check_json
from .dtypes import SAFETENSORS_DTYPES as _ST_DTYPES
from .dtypes import dtype_name, no_user_warnings, torch_dtype
from .elements import itemsize, numel
from .errors import (CheckpointError, CheckpointNotFoundError, FormatError, IncompatibleCheckpointsError,
                     OutOfMemoryError, TallpackError, UnsafeCheckpointError, UnsupportedVersionError, memory_detail,
                     out_of_memory, quoted)
from .folders import (DIFFUSERS, MODULES, VARIANT_SETS, check_file_name, component_of, listed_components, listed_modules,
                      plain_name, weight_variant)
from .storage import is_url

try:  # (imported now: with no file descriptor left, an import fails)
    import resource
except ImportError:  # pragma: no cover - Windows
    resource = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

#: Anything ``open_source`` accepts.
SourceLike = Union[str, os.PathLike, Mapping[str, "torch.Tensor"], "Source"]

_TORCH_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
#: PyTorch files named ``.pth.tar`` (timm's and PyTorch's ImageNet example's training checkpoints).
_TORCH_TAR = ".pth.tar"


def _is_torch_file(path: Path) -> bool:
    """Whether ``path`` is named as a PyTorch file: ``.bin``, ``.pt``, ``.pth``, Lightning's ``.ckpt``
    or timm's ``.pth.tar`` (each read with ``weights_only=True``, whatever its name)."""
    return path.suffix in _TORCH_SUFFIXES or path.name.endswith(_TORCH_TAR)


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        return numel(self.shape) * itemsize(self.dtype)


def _of_task(src: Source, e: TallpackError) -> TallpackError:
    """``e``, an error of a file read mid-way (cut by a save over it, damaged), naming the task whose file it is."""
    if type(e) is not CheckpointError or src.task is None or f"task {src.task!r}" in str(e):
        return e
    return CheckpointError(f"{e} (the file of task {src.task!r})")


class Source:
    """A checkpoint, read lazily. Subclasses fill ``_infos`` (in the checkpoint's order)."""

    kind: str = "?"

    def __init__(self, label: str):
        self.label = label
        self._infos: dict[str, TensorInfo] = {}
        self.metadata: dict[str, Any] = {}
        #: the checkpoint's own files (for the exact tier's file records): tensor files, then
        #: others the folder holds (shard index, config.json); ``root`` is the folder they are named from
        self.weight_files: list[Path] = []
        self.other_files: list[Path] = []
        self.root: Path | None = None
        #: a model folder's other files (config, tokenizer, model card): relative name -> path
        self.files: dict[str, Path] = {}
        #: a sharded folder's layout: ``{"shards": [[file, tensor count], ...], "index_metadata": {...}}``
        self.layout: dict[str, Any] = {}
        #: the file each tensor is read from (sources of files), and that file's identity and size when opened
        self._where: dict[str, Path] = {}
        self._opened: dict[Path, tuple[int, int, int, int]] = {}
        #: the task this checkpoint is (set by ``inputs.open_tasks``), named by the errors of its files
        self.task: str | None = None

    def _remember(self, path: Path) -> BinaryIO:
        """Open ``path`` for the reads of its tensors (:func:`_read_tensor`) and note its identity,
        size and modification time (see ``check_unchanged``). The open file reads the file as it
        was opened when another replaces it, as a mapping did."""
        f = _opened_file(path)
        st = os.fstat(f.fileno())
        self._opened[path] = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        return f

    def _held(self, name: str, path: Path) -> None:
        """Note that ``path`` holds tensor ``name``; refuse a name two files hold (two shards of one
        folder): a loader takes the last one read, the shard index may name the other, and neither
        the user nor tallpack can tell which is the model's."""
        first = self._where.get(name)
        if first is not None:
            raise CheckpointError(f"{self.label}: tensor {name!r} is held by two shards, {_shown(first, self.label)} "
                                  f"and {_shown(path, self.label)}; keep the model's in one shard only (and "
                                  "name that shard in the index)")
        self._where[name] = path

    def check_unchanged(self) -> None:
        """Refuse, once everything was read, a file that changed since it was opened: written over
        in place (its mapped pages then mix the old and the new checkpoint, and the exact tier's
        hash, taken at the end, is the new file's), replaced or removed (a trainer saving its next
        checkpoint over the one being packed)."""
        for path, was in self._opened.items():
            try:
                st = os.stat(path)
                now = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
            except OSError:
                now = None
            if now != was:
                what = "removed" if now is None else "replaced" if now[:2] != was[:2] else "written over"
                raise CheckpointError(f"{path}: {what} while it was packed; pack it again once it is complete"
                                      + (f" (the file of task {self.task!r})" if self.task is not None else ""))

    def keys(self) -> list[str]:
        return list(self._infos)

    def info(self, name: str) -> TensorInfo:
        return self._infos[name]

    def __contains__(self, name: str) -> bool:
        return name in self._infos

    @property
    def nbytes(self) -> int:
        """Total size of the checkpoint's tensors."""
        return sum(i.nbytes for i in self._infos.values())

    def aliases(self) -> dict[str, str]:
        """The checkpoint's exact aliases: each name whose tensor is another's (a tied weight,
        which ``torch.save`` stores once) -> the first name of that tensor, in the checkpoint's
        order. Empty where a file cannot hold one (safetensors refuses shared tensors)."""
        return {}

    def get(self, name: str) -> torch.Tensor:
        """Load one tensor."""
        try:
            t = self._load(name)
        except TallpackError as e:
            raise _of_task(self, e) from None
        except Exception as e:  # a damaged file fails here, mid-read: say which tensor
            raise _of_task(self, CheckpointError(f"{self.label}: tensor {name!r} cannot be read: {quoted(e)}")) from None
        want = self._infos[name]
        if tuple(t.shape) != want.shape or dtype_name(t.dtype) != want.dtype:
            raise CheckpointError(f"{self.label}: tensor {name!r} does not match its header")
        t = _c_strides(t)
        if t.dtype == torch.bool and t.numel() and int(t.reshape(-1).view(torch.uint8).max()) > 1:
            raise CheckpointError(f"{self.label}: tensor {name!r} is bool but holds bytes other than 0 and 1")
        return t

    def _load(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def reads_ranges(self, name: str) -> bool:
        """Whether :meth:`get_range` can read part of tensor ``name`` from its file (a tensor laid
        out in C order in a file the source reads; not one held in memory, or a view of a storage
        in another order)."""
        return False

    def get_range(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Elements ``[start, stop)`` of tensor ``name`` in C order, as a new flat tensor read from
        its file (where :meth:`reads_ranges`): the packer's blocks of a tensor too large to hold
        every task's copy of at once."""
        info = self._infos[name]
        if not 0 <= start <= stop <= numel(info.shape):
            raise ValueError(f"elements [{start}, {stop}) of tensor {name!r} of shape {info.shape}")
        try:
            return self._load_range(name, start, stop)
        except TallpackError as e:
            raise _of_task(self, e) from None
        except Exception as e:  # a damaged file fails here, mid-read: say which tensor
            raise _of_task(self, CheckpointError(f"{self.label}: tensor {name!r} cannot be read: {quoted(e)}")) from None

    def _load_range(self, name: str, start: int, stop: int) -> torch.Tensor:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"format": self.kind, "path": self.label, "bytes": self.nbytes, **self.layout}

    def close(self) -> None:
        pass


def _c_strides(t: torch.Tensor) -> torch.Tensor:
    """``t``, when contiguous, viewed with C order's strides: torch calls a tensor contiguous whatever
    the strides of its dims of size 1, but views it as bytes only when its last stride is 1 (a
    column of a one-row weight, ``w[:, 0]``: shape (1,), stride (k,); the packer failed on it).
    Other views keep torch.load's strides (the packer's inputs are made contiguous: ``inputs``)."""
    if not t.is_contiguous():
        return t
    strides, n = [], 1
    for size in reversed(t.shape):
        strides.append(n)
        n *= max(size, 1)
    strides.reverse()
    return t if t.stride() == tuple(strides) else t.as_strided(t.shape, strides)


#: The most bytes (keys and values) of safetensors header metadata an input keeps (all its files together).
MAX_HEADER_METADATA = 64 << 10


class SafetensorsSource(Source):
    """One or more safetensors files (the shards of one model)."""

    kind = "safetensors"

    def __init__(self, label: str, files: list[Path]):
        super().__init__(label)
        self.weight_files = list(files)
        self._files: dict[Path, BinaryIO] = {}
        self._at: dict[str, int] = {}  # each tensor's first byte in its file
        used = 0
        try:
            for path in files:
                f = self._open(path)
                used = self._keep_metadata(path, f.metadata() or {}, used)
                at = _data_offsets(path, self._files[path])
                # the file's own order (its data offsets', as load_file gives it; safetensors 0.4 lists
                # names sorted), empty tensors at one offset by name: offset_keys() gives those in hash
                # order, which differs from one open to the next (and the archive's bytes with it)
                order = sorted(f.keys(), key=lambda n: (*at.get(n, (0, 0)), n))
                for name in order:
                    sl = f.get_slice(name)
                    st = sl.get_dtype()
                    if st not in _ST_DTYPES:
                        raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {st}")
                    try:  # before any work: a uint32 tensor on torch 2.1 (no such torch dtype there)
                        torch_dtype(_ST_DTYPES[st])
                    except UnsupportedVersionError as e:
                        raise CheckpointError(f"{path}: tensor {name!r}: {e}") from None
                    self._held(name, path)
                    self._infos[name] = TensorInfo(tuple(sl.get_shape()), _ST_DTYPES[st])
                    begin, end = at.get(name, (0, -1))
                    if end - begin != self._infos[name].nbytes:  # (safetensors checked them: never, but say so)
                        raise CheckpointError(f"{path}: tensor {name!r}: its data_offsets do not match its shape")
                    self._at[name] = begin
        except BaseException:
            self.close()
            raise

    def _keep_metadata(self, path: Path, meta: Mapping[str, Any], used: int) -> int:
        """A file's header metadata (``license``, ...) into ``metadata``, whose string entries an
        unpack writes back: a key's first file wins, up to ``MAX_HEADER_METADATA`` bytes in all
        (``used`` so far; returns the new count), each entry checked as the manifest will hold it."""
        left_out = []
        for k, v in sorted(meta.items(), key=lambda kv: str(kv[0])):  # safetensors gives them in hash order
            if not (isinstance(k, str) and isinstance(v, str)) or k in self.metadata:
                continue
            if k == "config":  # the slot of a folder's config.json (an object), which readers write out
                left_out.append(k)
                continue
            n = len(k.encode("utf-8", "surrogatepass")) + len(v.encode("utf-8", "surrogatepass"))
            try:
                check_json({k: v}, at=3)  # tasks[i].metadata (spec §3, §7): else no reader opens the archive
            except ValueError:
                n = MAX_HEADER_METADATA + 1
            if used + n > MAX_HEADER_METADATA:
                left_out.append(k)
                continue
            self.metadata[k] = v
            used += n
        if left_out:
            log.warning("%s: header metadata %s not kept (over %d bytes in all, not storable in the manifest, or "
                        "'config', the name of a folder's config.json there)",
                        path, ", ".join(f"{k[:80]!r}" for k in left_out[:5]) + (", ..." if len(left_out) > 5 else ""),
                        MAX_HEADER_METADATA)
        return used

    def _open(self, path: Path) -> Any:
        """``path`` opened for reading (kept in ``_files``), and safetensors' reader of it, for its
        header only: tensors are read from the open file (:func:`_read_tensor`), never from
        safetensors' mapping of it."""
        if not path.is_file():
            raise _not_a_file(path)
        _check_readable(path)
        try:
            self._files[path] = self._remember(path)
            return safe_open(str(path), framework="pt")
        except Exception as e:
            if out_of_memory(e):  # a mapping refused: not the file's fault
                raise OutOfMemoryError(f"{path}: out of memory while opening it ({memory_detail(e)})") from None
            raise CheckpointError(f"{path}: not a readable safetensors file ({quoted(e)})") from None

    def _load(self, name: str) -> torch.Tensor:
        info = self._infos[name]
        path = self._where[name]
        t = _empty(info.shape, torch_dtype(info.dtype))
        _read_tensor(_file(self._files, self._opened, path), path, name, self._at[name], t, self._opened[path][2])
        return t

    def reads_ranges(self, name: str) -> bool:
        return name in self._at

    def _load_range(self, name: str, start: int, stop: int) -> torch.Tensor:
        dt = torch_dtype(self._infos[name].dtype)
        path, t = self._where[name], _empty((stop - start,), dt)
        at = self._at[name] + start * t.element_size()
        _read_tensor(_file(self._files, self._opened, path), path, name, at, t, self._opened[path][2])
        return t

    def close(self) -> None:
        _close_all(self._files)


class TorchSource(Source):
    """PyTorch state-dict files, loaded with ``weights_only=True``: torch.load maps a zip file
    (the default since torch 1.6), for the tensors' names, shapes and places, and each tensor is
    read from the file on ``get`` (a legacy file is loaded whole: :func:`_mapped`)."""

    kind = "torch"

    def __init__(self, label: str, files: list[Path]):
        super().__init__(label)
        self.weight_files = list(files)
        self._tensors: dict[str, torch.Tensor] = {}  # mapped by torch.load: never touched, but for a legacy file's
        self._files: dict[Path, BinaryIO] = {}
        self._at: dict[str, int] = {}  # each tensor's storage's first byte in its file (zip files)
        self._swapped: set[Path] = set()  # files saved big-endian: their elements read are byte-swapped
        try:
            for path in files:
                if path.is_file():
                    _check_readable(path)
                    self._files[path] = self._remember(path)
                tensors, storages = _torch_load(path)
                if storages and _big_endian(path):
                    self._swapped.add(path)
                for name, t in tensors.items():
                    self._held(name, path)
                    self._tensors[name] = t
                    self._infos[name] = TensorInfo(tuple(t.shape), dtype_name(t.dtype))
                    at = storages.get(t.untyped_storage().data_ptr()) if t.numel() else None
                    if at is not None:
                        self._at[name] = at
        except BaseException:
            self.close()
            raise

    def _load(self, name: str) -> torch.Tensor:
        t = self._tensors[name]
        at = self._at.get(name)
        if at is None:  # empty, or a legacy file's (a mapping of tallpack's own unlinked copy, or in memory)
            return t.detach()
        # the bytes the tensor spans in its storage, read into a storage of their own, viewed as torch.load viewed them
        extent = 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
        out = _empty((extent,), t.dtype)
        path = self._where[name]
        at += int(t.storage_offset()) * t.element_size()
        _read_tensor(_file(self._files, self._opened, path), path, name, at, out, self._opened[path][2])
        if path in self._swapped:  # as torch.load swaps them (its mapping's were)
            out.untyped_storage().byteswap(out.dtype)
        return out.as_strided(t.shape, t.stride())

    def reads_ranges(self, name: str) -> bool:
        return name in self._at and self._tensors[name].is_contiguous()

    def _load_range(self, name: str, start: int, stop: int) -> torch.Tensor:
        t, path = self._tensors[name], self._where[name]
        out = _empty((stop - start,), t.dtype)
        at = self._at[name] + (int(t.storage_offset()) + start) * t.element_size()
        _read_tensor(_file(self._files, self._opened, path), path, name, at, out, self._opened[path][2])
        if path in self._swapped:
            out.untyped_storage().byteswap(out.dtype)
        return out

    def close(self) -> None:
        _close_all(self._files)

    def aliases(self) -> dict[str, str]:
        return exact_aliases(self._tensors)


#: Tensors of at least this many bytes are read into memory of tensors read before and freed
#: (:func:`_empty`), of at most REUSE_BYTES in all: fresh memory's pages, each faulted and zeroed
#: as a read fills it, cost four times the read itself (a pack of float32 checkpoints took 15%
#: longer than from the mappings it used before).
REUSE_FROM = 256 << 10
REUSE_BYTES = 64 << 20
_freed: dict[int, list[np.ndarray]] = {}  # bytes -> blocks of that size, free
_freed_bytes = [0]
#: the sources' open files (a source let go unclosed drops out): blocks are kept for reuse only while
#: there are some (none kept after a pack)
_files_open: "weakref.WeakSet[BinaryIO]" = weakref.WeakSet()
_pool_lock = threading.RLock()  # (reentrant: a collection inside may free a tensor, whose block is given back)


def _empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A new contiguous CPU tensor to read a tensor's bytes into, in a freed block of its size
    when there is one (its bytes are not zeroed: the read fills them all). Blocks are kept while
    some source's files are open (``_close_all`` of the last lets them go), under ``_pool_lock``."""
    n = numel(shape) * itemsize(dtype_name(dtype))
    if n < REUSE_FROM:
        return torch.empty(shape, dtype=dtype)
    with _pool_lock:
        blocks = _freed.get(n)
        block = blocks.pop() if blocks else None
        if block is not None:
            _freed_bytes[0] -= n
    if block is None:
        block = np.empty(n, dtype=np.uint8)
    held = block.view()  # what the tensor holds: once it is freed, ``block`` is given back
    weakref.finalize(held, _give_back, block).atexit = False
    return torch.from_numpy(held).view(dtype).view(shape)


def _give_back(block: np.ndarray) -> None:
    with _pool_lock:
        if not _files_open:  # (the last source let go unclosed: what it kept goes too)
            _let_go()
        if block.nbytes > REUSE_BYTES or not _files_open:
            return
        if _freed_bytes[0] + block.nbytes > REUSE_BYTES:  # (blocks of the sizes of tensors before: let go)
            _let_go()
        _freed.setdefault(block.nbytes, []).append(block)
        _freed_bytes[0] += block.nbytes


def _let_go() -> None:
    """Drop the blocks kept for reuse."""
    with _pool_lock:
        _freed.clear()
        _freed_bytes[0] = 0


def _opened_file(path: Path) -> BinaryIO:
    """``path`` opened for a source's reads, in ``_files_open`` until ``_close_all``."""
    f = open(path, "rb", buffering=0)  # noqa: SIM115 (the source holds it until ``close``)
    with _pool_lock:
        _files_open.add(f)
    return f


def _read_tensor(f: BinaryIO, path: Path, name: str, offset: int, out: torch.Tensor, size: int) -> None:
    """Fill ``out`` (a new contiguous tensor) with the bytes of file ``f`` from ``offset``.

    Tensors are read, never handed out as views of a mapping of the file: a file cut in place
    (a trainer saving over it) while the packer used such a view killed the process (SIGBUS);
    a read past the new end comes back short instead, refused here in one line. ``size``: the
    file's size when it was opened."""
    if not out.numel():
        return
    view = memoryview(out.reshape(-1).view(torch.uint8).numpy().data)
    got = 0
    while got < len(view):
        n = _pread_into(f, view[got:], offset + got)
        if n <= 0:
            now = os.fstat(f.fileno()).st_size
            raise CheckpointError(f"{path}: tensor {name!r}: the file shrank from {size} to {now} bytes while it was "
                                  "read (changed in place, by a save over it?); pack it again once it is complete")
        got += n


_seek_lock = threading.Lock()


def _pread_into(f: BinaryIO, view: memoryview, offset: int) -> int:
    """Read into ``view`` the bytes of ``f`` from ``offset`` (at most ``len(view)``); the count read.
    Where os.preadv is missing (Windows, macOS before 11), a seek and a read, one thread at a time."""
    if hasattr(os, "preadv"):
        return os.preadv(f.fileno(), [view], offset)
    with _seek_lock:
        f.seek(offset)
        return f.readinto(view) or 0  # type: ignore[attr-defined]  # (the sources' files are io.FileIO)


def _pread(f: BinaryIO, n: int, offset: int) -> bytes:
    """Up to ``n`` bytes of ``f`` from ``offset`` (os.pread, where there is one)."""
    if hasattr(os, "pread"):
        return os.pread(f.fileno(), n, offset)
    buf = bytearray(n)
    return bytes(buf[:_pread_into(f, memoryview(buf), offset)])


def _file(files: dict[Path, BinaryIO], opened: Mapping[Path, tuple[int, int, int, int]], path: Path) -> BinaryIO:
    """The open file ``path`` of a source, opened again after ``close`` (a source used again after
    a pack closed it) when it is still the file that was opened; else a CheckpointError."""
    f = files.get(path)
    if f is None:
        f = _opened_file(path)
        st = os.fstat(f.fileno())
        if (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) != opened[path]:
            _close_all({path: f})
            raise CheckpointError(f"{path}: changed since it was opened (saved over?); open it again")
        files[path] = f
    return f


def _close_all(files: dict[Path, BinaryIO]) -> None:
    """Close a source's files; the last of all sources' lets the blocks kept for reuse go."""
    for f in files.values():
        f.close()
    with _pool_lock:
        for f in files.values():
            _files_open.discard(f)
        if not _files_open:
            _let_go()
    files.clear()


def _data_offsets(path: Path, f: BinaryIO) -> dict[str, tuple[int, int]]:
    """Each tensor's first and past-last byte in the safetensors file ``f``, from its header
    (which safetensors has just checked: the offsets lie in the file, one after the other)."""
    head = _pread(f, 8, 0)
    n = int.from_bytes(head, "little") if len(head) == 8 else -1
    raw = _pread(f, n, 8) if 0 <= n <= MAX_HEADER else b""
    try:
        if len(raw) != n:
            raise ValueError("the header is cut short")
        header = _strict_loads(raw.decode("utf-8"))
        start = 8 + n
        return {k: (start + v["data_offsets"][0], start + v["data_offsets"][1])
                for k, v in header.items() if k != "__metadata__"}
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, RecursionError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file (its header: {quoted(e)})") from None


#: A safetensors header larger than this is refused (the safetensors library's own limit).
MAX_HEADER = 100_000_000


def exact_aliases(tensors: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """Each name whose tensor is an exact alias of an earlier one (the same storage, storage
    offset, shape, strides and dtype: ``lm_head.weight`` tied to ``transformer.wte.weight``) ->
    the first name of it. Views of part of a storage, or of another shape, are no aliases; nor
    are empty tensors (storages of no bytes tell nothing apart).

    >>> exact_aliases({"wte": w, "lm_head": w, "other": w[:2]})
    {'lm_head': 'wte'}
    """
    first: dict[tuple, str] = {}
    out: dict[str, str] = {}
    for name, t in tensors.items():
        if t.numel() == 0:
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if key in first:
            out[name] = first[key]
        else:
            first[key] = name
    return out


def family_aliases(base: Source, tasks: Mapping[str, Source]) -> dict[str, str]:
    """The aliases an archive of this family stores (spec §3.8): ``name -> target`` where
    ``name`` is an exact alias of ``target`` in the base and in every task (the base's target,
    the first of the tensor's names in its order), or where every task ties names of which the
    base holds one alone (the target: :func:`_held_once`). Elsewhere both are stored as tensors, as
    before; where some checkpoint ties a pair that is stored apart, a warning says which and why
    (their lossy reads give two tensors, no longer tied).

    >>> family_aliases(open_source("base.pt"), {"a": open_source("a.pt")})
    {'lm_head.weight': 'transformer.wte.weight'}
    """
    found = base.aliases()
    theirs = {t: s.aliases() for t, s in tasks.items()}
    if not found and not any(theirs.values()):
        return {}
    out = {}
    for name, target in found.items():
        for t, src in tasks.items():
            tied = theirs[t]
            if name not in src or target not in src or tied.get(name, name) != tied.get(target, target):
                _stored_apart(name, target, f"task {t!r} ({src.label}) "
                              + ("lacks one of them" if name not in src or target not in src else "does not tie them"),
                              [u for u in tasks if theirs[u].get(name) == target])
                break
        else:
            out[name] = target
    out.update(_held_once(base, found, theirs))
    apart: dict[tuple[str, str], list[str]] = {}  # pairs tasks tie that the base does not
    for t, tied in theirs.items():
        for name, target in tied.items():
            if found.get(name) != target and found.get(target) != name and name not in out and target not in out:
                apart.setdefault((name, target), []).append(t)
    for (name, target), which in apart.items():
        _stored_apart(name, target, f"the base ({base.label}) "
                      + ("lacks one of them" if name not in base or target not in base else "does not tie them"), which)
    return out


def _held_once(base: Source, found: Mapping[str, str], theirs: Mapping[str, Mapping[str, str]]) -> dict[str, str]:
    """Aliases of names that every task ties together where the base holds only one of them: a
    base written by safetensors' ``save_model`` (or ``save_pretrained``) keeps one name of a tied
    weight and drops the others, while tasks saved with ``torch.save`` hold them all as one
    tensor. Each dropped name becomes an alias of the one the base holds (the target), so the
    tensor is stored once and read tied, instead of once per task under the dropped name."""
    groups: list[frozenset[str]] | None = None  # each task's tied groups: a first name and its aliases
    for tied in theirs.values():
        by_first: dict[str, set[str]] = {}
        for name, first in tied.items():
            by_first.setdefault(first, {first}).add(name)
        mine = {frozenset(g) for g in by_first.values()}
        groups = list(mine) if groups is None else [g for g in groups if g in mine]
    out: dict[str, str] = {}
    for group in groups or ():
        held = [n for n in group if n in base]
        if len(held) != 1 or any(n in found or n in found.values() for n in group):
            continue  # the base holds them apart (or ties them itself: family_aliases' first loop)
        (target,) = held
        out.update((n, target) for n in sorted(group) if n != target)
        log.debug("tensors %s: one tensor in every task, of which the base holds %r alone: stored once",
                  ", ".join(map(repr, sorted(group))), target)
    return out


def tied_in_base_alone(base: Source, tasks: Mapping[str, Source], aliases: Mapping[str, str]) -> list[str]:
    """The base's names of a tied weight that no task holds while every task holds another name
    of it: a tied base saved with ``torch.save`` (``lm_head.weight`` is its embeddings) whose
    fine-tunes ``save_pretrained`` wrote as safetensors, which keep one name. Such a name is no
    tensor of the base's own: neither stored nor warned of as dropped (a copy kept by
    ``keep_base_only`` would hold the base's embeddings beside the merged ones and untie a
    merged model).

    >>> tied_in_base_alone(open_source("base/"), {"a": open_source("a/")}, {})
    ['lm_head.weight']
    """
    groups: dict[str, set[str]] = {}
    for name, first in base.aliases().items():
        groups.setdefault(first, {first}).add(name)
    out = []
    for group in groups.values():
        if any(n in aliases for n in group) or not any(all(n in s for s in tasks.values()) for n in group):
            continue  # stored as an alias (family_aliases), or no name of it that every task holds
        out += sorted(n for n in group if not any(n in s for s in tasks.values()))
    return out


def _stored_apart(name: str, target: str, why: str, tied_in: list[str]) -> None:
    """Warn that tasks which tie ``name`` to ``target`` get them stored apart, and why."""
    if not tied_in:
        log.debug("tensor %r: stored as a tensor of its own, not as an alias of %r: %s", name, target, why)
        return
    shown = ", ".join(map(repr, tied_in[:3])) + (f" and {len(tied_in) - 3} more" if len(tied_in) > 3 else "")
    log.warning("tensors %r and %r are one tensor in task%s %s but are stored apart, since %s: lossy reads of "
                "those tasks give two different tensors, no longer tied (exact=True / --exact gives the originals)",
                target, name, "s" if len(tied_in) > 1 else "", shown, why)


def _not_a_file(path: Path) -> CheckpointError:
    """The error for a checkpoint path that is no regular file: missing, or a FIFO, device, ..."""
    if os.path.exists(path):
        return CheckpointError(f"{path}: not a regular file")
    if os.path.islink(path):  # as a folder file's dangling link is named
        return CheckpointNotFoundError(_dangling(path))
    return CheckpointNotFoundError(f"{path}: no such file")


def _dangling(path: Path) -> str:
    """The message for a link to a file that does not exist (a cache blob removed, or never downloaded)."""
    return (f"{path}: a link to a file that does not exist ({os.readlink(path)}); the folder is incomplete "
            "(a Hugging Face cache whose file was removed, or a download cut off? download it again)")


def _check_readable(path: Path) -> None:
    """A CheckpointError saying why ``path`` cannot be opened for reading (permission denied, ...):
    safetensors' own message for every failed open is "No such file or directory". Also makes sure
    the process may open ``FILES_AHEAD`` more files (each input file is held open while it is
    packed, and its reader opens it again): see :func:`_room_for_files`."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    for again in (True, False):
        fds: list[int] = []
        try:
            fds.append(os.open(path, flags))
            fds += [os.dup(fds[0]) for _ in range(FILES_AHEAD)]
        except OSError as e:
            if e.errno != errno.EMFILE:
                raise CheckpointError(f"{path}: {e.strerror or quoted(e)}") from None
            if not (again and _room_for_files()):
                raise _too_many_files(path) from None
            continue
        finally:
            for fd in fds:
                os.close(fd)
        return


#: The files a source may open beyond the one it checks (its reader's, torch.load's, the zip's).
FILES_AHEAD = 4


def _room_for_files() -> bool:
    """Raise this process's soft limit of open files towards its hard one (pack holds every input
    file open: a family of many shards needs more than the usual 1024); whether it rose."""
    if resource is None:
        return False
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = max(4 * soft, 4096) if hard == resource.RLIM_INFINITY else min(hard, max(4 * soft, 4096))
        if want <= soft:
            return False
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    except (OSError, ValueError):
        return False
    log.info("open files: this process's limit raised from %d to %d (every input file is held open while packed)",
             soft, want)
    return True


def _too_many_files(path: Path) -> CheckpointError:
    """The error for an input file the process has no file descriptor left for."""
    try:
        limit = f"is {resource.getrlimit(resource.RLIMIT_NOFILE)[0]}" if resource is not None else "reached"
    except OSError:
        limit = "reached"
    return CheckpointError(f"{path}: too many open files (the limit, ulimit -n, {limit}; pack holds each input "
                           "file open while it packs): raise it (ulimit -n 65536) or merge the shards into fewer files")


#: Classes a training checkpoint commonly pickles beside its weights that weights_only may rebuild
#: without running code (an instance made and its attributes set, or a path made from strings):
#: timm's ``args`` (an ``argparse.Namespace``), Lightning's hyperparameters' paths.
_HARMLESS = (argparse.Namespace, pathlib.PosixPath, pathlib.PurePosixPath, pathlib.WindowsPath,
             pathlib.PureWindowsPath)


def _harmless_globals() -> contextlib.AbstractContextManager[Any]:
    """``torch.serialization.safe_globals(_HARMLESS)`` where torch has it (2.5 and later): the
    load stays ``weights_only``, only these classes are added to what it may rebuild. Those the
    process allows already are left out: the context removes its classes as it ends, and would take
    the user's own ``add_safe_globals`` of them away."""
    safe = getattr(torch.serialization, "safe_globals", None)
    held: list[Any] = getattr(torch.serialization, "get_safe_globals", list)()
    harmless: list[Any] = [c for c in _HARMLESS if c not in held]
    if _torch_at_least(2, 6):  # (a class under another's name)
        other, pure = ((pathlib.WindowsPath, pathlib.PureWindowsPath) if os.name != "nt"
                       else (pathlib.PosixPath, pathlib.PurePosixPath))
        for cls in [c for c in harmless if c.__module__.startswith("pathlib")]:
            # another system's concrete path, as its pure one (it cannot be made here: 'cannot
            # instantiate WindowsPath on your system'); and each path under both of its names: Python
            # 3.13 pickles ``pathlib._local.WindowsPath`` where earlier ones wrote ``pathlib.WindowsPath``
            made = pure if cls is other else cls
            names = {f"{module}.{cls.__name__}" for module in _PATH_MODULES}
            if made is cls:
                names.discard(f"{cls.__module__}.{cls.__qualname__}")  # (the class itself is that name)
            else:
                harmless.remove(cls)
            harmless += [(made, name) for name in sorted(names)]
    return safe(harmless) if safe is not None else contextlib.nullcontext()


#: The modules a pickled ``pathlib`` class is named in: ``pathlib`` up to Python 3.12, ``pathlib._local``
#: from 3.13.
_PATH_MODULES = ("pathlib", "pathlib._local")


def _torch_at_least(major: int, minor: int) -> bool:
    """Whether torch is this version or later (2.6: safe globals given as ``(class, name)``)."""
    found = re.match(r"(\d+)\.(\d+)", torch.__version__)
    return found is not None and (int(found.group(1)), int(found.group(2))) >= (major, minor)


def _torch_load(path: Path) -> tuple[dict[str, torch.Tensor], dict[int, int]]:
    """A PyTorch file's tensors (mapped by torch.load; see ``TorchSource``), and where in the file
    each of their storages starts (by the storage's data pointer; empty for a legacy file)."""
    if not path.is_file():
        raise _not_a_file(path)
    _check_readable(path)
    with open(path, "rb") as f:
        magic = f.read(2)
    if magic[:1] != b"\x80" and magic != b"PK":  # torch.save writes a zip, or (legacy) a pickle of protocol 2
        raise CheckpointError(f"{path}: not a PyTorch checkpoint (neither a zip archive nor a pickle)")
    legacy = False
    try:
        with no_user_warnings(), _harmless_globals():  # torch warns about pickle protocols; our error says enough
            try:
                # (the path as a str: torch 2.1 maps only a str, not a Path)
                obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e) and "zip" not in str(e):
                    raise
                obj = torch.load(path, map_location="cpu", weights_only=True)  # legacy, not zip
                legacy = True
    except pickle.UnpicklingError as e:
        if "weights_only" in str(e) or "Weights only" in str(e):
            # (newer torch: "Unsupported global: GLOBAL x.Y"; torch 2.3 and earlier: "Unsupported class x.Y")
            held = re.search(r"Unsupported (?:global: GLOBAL|class) (\S+)", str(e))
            what = f"{held.group(1)}, not only tensors" if held else "more than tensors"
            raise UnsafeCheckpointError(
                f"{path}: loading needs code execution (it pickles {what}: a whole model saved with torch.save(model), "
                "or a checkpoint whose other entries, arguments or hyperparameters, hold objects); tallpack only "
                "loads weights_only files: re-save the model's state dict alone (torch.save(model.state_dict(), "
                "'model.pt')) or as safetensors"
            ) from None
        raise CheckpointError(f"{path}: not a readable PyTorch file ({quoted(e)})") from None
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable PyTorch file ({type(e).__name__}: {quoted(e)})") from None
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: holds {_a(type(obj).__name__)}, not a state dict")
    tensors = _tensor_dict(str(path), _unwrapped(path, obj))
    if len(tensors) > 1 and not any(t.numel() for t in tensors.values()):
        raise CheckpointError(
            f"{path}: all its {len(tensors)} tensors are empty ({next(iter(tensors))!r}: shape "
            f"{tuple(next(iter(tensors.values())).shape)}), placeholders rather than weights: a DeepSpeed ZeRO-3 "
            "model file? its weights are partitioned in the zero_pp_rank_* files beside it: consolidate them with "
            "the zero_to_fp32.py DeepSpeed saves in the checkpoint folder (python zero_to_fp32.py CHECKPOINT_DIR OUT) "
            "and pack OUT")
    storages = {} if legacy else _check_records(path, tensors)
    tensors = _uncompiled(path, tensors)
    return (_mapped(path, tensors) if legacy else tensors), storages


#: The prefix torch.compile's wrapper puts before every name of a compiled model's state dict.
COMPILED_PREFIX = "_orig_mod."


#: A PEFT adapter's tensor names (LoRA, LoHa, LoKr, IA3, DoRA: ``...q_proj.lora_A.weight``).
_ADAPTER = re.compile(r"\.(lora_[AB]|lora_embedding_[AB]|lora_magnitude_vector|hada_w[12]_[ab]|lokr_w[12](_[ab])?"
                      r"|ia3_l)(\.|$)")


#: A LoRA file's tensor names other than PEFT's: diffusers' (``...to_q.lora.down.weight``,
#: ``...to_q_lora.up.weight``) and kohya's (``lora_unet_..._to_q.lora_down.weight``).
_LORA = re.compile(r"[._]lora[._](down|up)\.weight$")

#: The share of one side's names that, without its one prefix, must be the other's for the prefix to be named.
PREFIX_SHARE = 0.5

#: What to do with a PEFT adapter given as a model.
MERGE_ADAPTER = ("merge it into its base model first (PeftModel.from_pretrained(model, ADAPTER).merge_and_unload()"
                 ".save_pretrained(OUT)) and pack OUT")


def adapter(src: Source) -> str | None:
    """What ``src`` is when its tensors are an adapter's (PEFT's ``...lora_A.weight``, diffusers' or
    kohya's LoRA names), one of them named, and what to do, as the end of a sentence; else None."""
    lora = next((k for k in src.keys() if _ADAPTER.search(k)), None)
    if lora is not None:
        return f"a PEFT adapter ({lora!r}), not a model's weights; {MERGE_ADAPTER}"
    lora = next((k for k in src.keys() if _LORA.search(k)), None)
    if lora is not None:
        return (f"a LoRA adapter ({lora!r}, diffusers' or kohya's names), not a model's weights; fuse it into its "
                "base model first (pipe.load_lora_weights(ADAPTER); pipe.fuse_lora(); pipe.save_pretrained(OUT)) "
                "and pack OUT")
    return None


def prefix_hint(base: Source, task: Source) -> str | None:
    """Why a task shares no tensor name with the base when one side's names are the other's (most
    of them, all but a tied head) with one prefix in front (``module.``: saved from a DDP or
    DataParallel wrapper), or when one side is a PEFT adapter (LoRA's ``...lora_A.weight``) or
    another LoRA file (diffusers', kohya's), and what to do; else None."""
    for has, side in ((task, "it is"), (base, "the base is")):
        said = adapter(has)
        if said is not None:
            return f"{side} {said}"
    for has, other, side in ((task, base, "its"), (base, task, "the base's")):
        heads = {k.partition(".")[0] for k in has.keys()}
        if len(heads) != 1 or not has.keys() or any("." not in k for k in has.keys()):
            continue
        prefix = heads.pop() + "."
        # most names, not all: a state dict keeps a tied head that save_pretrained left out of the other side
        if sum(k.removeprefix(prefix) in other for k in has.keys()) >= PREFIX_SHARE * len(has.keys()):
            whose = "the base's" if side == "its" else "the task's"
            return (f"{side} tensor names are {whose} with {prefix!r} in front (a model saved from a DDP, "
                    f"DataParallel or other wrapper); pack with strip_prefix={prefix!r} (--strip-prefix {prefix}), "
                    f"or save the state dict without it ({{k.removeprefix({prefix!r}): v for k, v in sd.items()}})")
    return None


def _uncompiled(path: Path, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict of a torch.compile'd model under the model's own names: ``_orig_mod.`` is
    torch's wrapper, never a module of the model, and the uncompiled model (which the base or the
    other fine-tunes usually are) loads only the names without it (nanoGPT strips it too)."""
    if not tensors or not all(k.startswith(COMPILED_PREFIX) for k in tensors):
        return tensors
    log.info("%s: saved from a torch.compile'd model: its tensors are read without the %r in front of "
             "their names", path, COMPILED_PREFIX)
    return {k.removeprefix(COMPILED_PREFIX): t for k, t in tensors.items()}


#: The keys under which training checkpoints keep the model's state dict: Lightning's and
#: timm's ``state_dict``, nanoGPT's ``model``, PyTorch's tutorial ``model_state_dict``,
#: DeepSpeed's ``module``.
WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module")


def _a(word: str) -> str:
    return ("an " if word[:1].lower() in "aeiou" else "a ") + word


def _loaded_key(obj: Mapping, held: list) -> tuple[str, str] | None:
    """The entry a framework's own loader takes when a checkpoint holds several mappings of tensors,
    and whose checkpoint it is: Lightning's ``state_dict`` (its load_from_checkpoint's; WeightAveraging
    keeps the current weights in ``current_model_state`` beside the averaged ones), timm's ``state_dict``
    beside ``state_dict_ema`` (its load_checkpoint's without use_ema); else None."""
    if len(held) < 2 or "state_dict" not in held:
        return None
    if "pytorch-lightning_version" in obj:
        return "state_dict", "a Lightning"
    if set(held) == {"state_dict", "state_dict_ema"}:
        return "state_dict", "a timm"
    return None


def _unwrapped(path: Path, obj: Mapping) -> Mapping:
    """The state dict in a training checkpoint (``{"model": state_dict, "optimizer": ...,
    "iter_num": ...}``): the one entry that holds a mapping of tensors, when its key is one of
    :data:`WRAPPER_KEYS`; the other entries (optimizer state, counters) are not packed. Two such
    entries, or one under another key, are refused: which is the model's is not guessed."""
    if all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    held = [k for k, v in obj.items() if isinstance(v, Mapping) and v
            and any(isinstance(t, torch.Tensor) for t in v.values())]
    loaded = _loaded_key(obj, held)
    if loaded is not None:
        copies = [k for k in held if k != loaded[0]]
        log.warning("%s: %s checkpoint: packing %r, the state dict its loader takes; %s %s not packed (to pack %s "
                    "instead: torch.save(ckpt[%r], 'model.pt'))", path, loaded[1], loaded[0],
                    ", ".join(map(repr, copies)), "is" if len(copies) == 1 else "are",
                    "it" if len(copies) == 1 else "one", copies[0])
        held = [loaded[0]]
    if len(held) == 1 and held[0] in WRAPPER_KEYS:
        key = held[0]
        others = [str(k) for k in obj if k != key]
        log.info("%s: a training checkpoint: packing the state dict under %r%s", path, key,
                 f"; its other entries ({', '.join(others)}) are not packed" if others else "")
        return obj[key]
    if held:
        names = ", ".join(repr(k) for k in held)
        raise CheckpointError(
            f"{path}: holds a training checkpoint, not a state dict: {'entries' if len(held) > 1 else 'entry'} "
            f"{names} {'hold' if len(held) > 1 else 'holds'} a mapping of tensors; save the model's as a state "
            f"dict (torch.save(ckpt[{held[0]!r}], 'model.pt')) and pack that")
    if {"state", "param_groups"} <= set(obj) and isinstance(obj["param_groups"], list):
        raise CheckpointError(f"{path}: an optimizer's state (torch.optim's state_dict: 'state', 'param_groups'), not "
                              "a model's weights")
    nested = [k for k, v in obj.items() if isinstance(v, Mapping)]
    if nested and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: holds no tensors at its top nor a mapping of tensors under "
                              f"{', '.join(repr(k) for k in nested)}: not a state dict")
    return obj


def _big_endian(path: Path) -> bool:
    """Whether the PyTorch zip file ``path`` was saved on a big-endian machine (its ``byteorder``
    record says ``big``): torch.load swaps the elements of its storages, and so do its reads."""
    import zipfile
    import zlib

    try:
        with zipfile.ZipFile(path) as z:
            name = next((n for n in z.namelist() if n.endswith("/byteorder") and n.count("/") == 1), None)
            return name is not None and z.read(name).strip() == b"big"
    except (OSError, zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, EOFError, ValueError,
            RuntimeError, zlib.error) as e:  # (a damaged record's name: UnicodeDecodeError; encrypted: RuntimeError)
        raise CheckpointError(f"{path}: not a readable PyTorch file ({quoted(e)})") from None


#: The bytes ``_same_bytes`` compares at a time when it compares whole storages.
SAME_BYTES_STEP = 1 << 20


def _same_bytes(path: Path, at: Mapping[int, int], storages: Mapping[int, tuple[str, int]],
                swap: Mapping[int, int] | None = None, *, whole: bool = False) -> bool:
    """Whether the file's bytes at each offset ``at[p]`` are those of the storage mapped at ``p``
    (its first and last 64 bytes, and 64 from its middle; ``whole``: all of them; each storage is
    alive in the caller's tensors, so its memory may be read). ``swap``: each storage's element
    size, for a big-endian file (torch.load swapped the elements in memory)."""
    import ctypes

    with open(path, "rb") as f:
        for p, off in at.items():
            n = storages[p][1]
            size = swap[p] if swap else 1
            if whole:
                spans = [(a, min(SAME_BYTES_STEP, n - a)) for a in range(0, n, SAME_BYTES_STEP)]
            else:  # (the middle one starts at an element: a swap turns whole elements)
                spans = [(a, min(64, n - a)) for a in sorted({0, max(0, n // 2 - 32) // size * size, max(0, n - 64)})]
            for a, k in spans:
                got = _pread(f, k, off + a)  # (os.pread, where there is one)
                if size > 1 and len(got) == k:
                    got = np.frombuffer(got, dtype=f"u{size}").byteswap().tobytes()
                if got != ctypes.string_at(p + a, k):
                    return False
    return True


def _check_records(path: Path, tensors: Mapping[str, torch.Tensor]) -> dict[int, int]:
    """Where in the file each storage's record data starts (by the storage's data pointer in
    torch.load's mapping of the file), the bytes ``TorchSource`` reads. CheckpointError when a
    tensor's storage record in the zip is shorter than its storage, or compressed: torch.load(mmap=True)
    maps the storage from the record's offset without checking its size, so a damaged file would
    be read with whatever bytes follow the record."""
    import struct
    import zipfile

    records: dict[int, zipfile.ZipInfo] = {}  # data offset in the file -> storage record
    try:
        with zipfile.ZipFile(path) as z, open(path, "rb") as f:
            for info in z.infolist():
                if "/data/" not in info.filename or info.is_dir():
                    continue
                f.seek(info.header_offset)
                head = f.read(30)
                if len(head) < 30 or head[:4] != b"PK\x03\x04":
                    raise CheckpointError(f"{path}: storage record {info.filename!r} has no valid zip header: "
                                          "the file is damaged")
                n, m = struct.unpack("<HH", head[26:30])
                records[info.header_offset + 30 + n + m] = info
    except (OSError, zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, EOFError) as e:
        # (zipfile: NotImplementedError for a damaged version or method field, EOFError for a cut record)
        raise CheckpointError(f"{path}: not a readable PyTorch file ({quoted(e)})") from None
    storages: dict[int, tuple[str, int]] = {}  # data pointer -> (first tensor name, storage bytes)
    for name, t in tensors.items():
        st = t.untyped_storage()
        if st.nbytes() and st.data_ptr() not in storages:
            storages[st.data_ptr()] = (name, st.nbytes())
    if not storages:
        return {}
    offsets = sorted(records)
    ptrs = sorted(storages)
    # every storage is a slice of one mapping of the whole file (page-aligned, as mmap makes it), at
    # its record's offset. Where the tensors use fewer storages than the file holds (a checkpoint's
    # optimizer state, left out; an empty tensor's record of no bytes), several offsets may line up:
    # the mapping's start is the one that is page-aligned and where the file's bytes are the storages'
    # (a big-endian file's swapped: torch.load swaps its elements in memory), at a few windows, or
    # wholly where other records are alike there (a copy of the weights)
    swap = {p: tensors[name].element_size() for p, (name, _) in storages.items()} if _big_endian(path) else None
    # (checked storage by storage at every offset, a file of many storages of one size, which line up at
    # as many shifts, took N^2 steps: minutes for 10,000 tensors beside their optimizer's state. The
    # starts that line up the first, middle and last storages are found as sets; of those, the ones
    # where these storages' bytes are the file's, when there are any, are checked whole)
    probe = {p: storages[p] for p in (ptrs[0], ptrs[len(ptrs) // 2], ptrs[-1])}
    ends = set.intersection(*({p - c for c in offsets} for p in probe))
    starts = [ptrs[0] - c for c in offsets if ptrs[0] - c in ends]
    likely = [b for b in starts if _same_bytes(path, {p: p - b for p in probe}, probe, swap)]
    lined = [b for b in likely or starts if all(p - b in records for p in ptrs)]
    if not lined:
        raise CheckpointError(f"{path}: its tensors' storages do not match the zip's storage records: "
                              "the file is damaged")
    ranked = sorted(lined, key=lambda b: b % mmap.PAGESIZE != 0)  # (stable: the file's order otherwise)
    fit = [b for b in ranked if all(records[p - b].file_size >= storages[p][1] for p in ptrs)]
    alike = [b for b in fit if _same_bytes(path, {p: p - b for p in ptrs}, storages, swap)]
    if len(alike) > 1:  # other records alike at the bytes compared (a copy of the weights, an EMA's): all of them
        alike = [b for b in alike if _same_bytes(path, {p: p - b for p in ptrs}, storages, swap, whole=True)]
    if fit and not alike:
        raise CheckpointError(f"{path}: its tensors' bytes are not those of any of the zip's storage records "
                              "(changed while it was read?); pack it again once it is complete")
    base = alike[0] if alike else ranked[0]
    for p in ptrs:
        name, need = storages[p]
        info = records[p - base]
        if info.compress_type != 0:
            raise CheckpointError(f"{path}: tensor {name!r}: its storage record {info.filename!r} is compressed; "
                                  "PyTorch files store them uncompressed: re-save it with torch.save")
        if info.file_size < need:
            raise CheckpointError(f"{path}: tensor {name!r}: its storage record {info.filename!r} holds "
                                  f"{info.file_size} bytes, the tensor's storage needs {need}: the file is damaged "
                                  "(torch.load refuses it too)")
    return {p: p - base for p in ptrs}


def _mapped(path: Path, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A legacy (pre-zip) PyTorch file's tensors, which torch can only load whole, written once to
    a temporary zip file in $TMPDIR and mapped back from it: a family of such files is packed
    holding one of them in memory at a time (while it is converted), not all of them at once. The
    temporary is removed at once (its mapping keeps it until the tensors go: nobody else can cut
    it). Without room there, the tensors stay in memory, with a warning in our words (torch's, an
    ``[enforce fail at inline_container.cc] unexpected pos``, names no folder)."""
    import shutil
    import tempfile

    need = sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors.values()}.values())
    fix = "(set TMPDIR to a folder with room, or re-save the file with torch.save, to pack it without)"
    try:
        folder = tempfile.gettempdir()
    except FileNotFoundError:  # no folder can be written: $TMPDIR, /tmp, /var/tmp, the working folder
        log.warning("%s: a legacy (pre-zip) PyTorch file, kept in memory while it is packed (%.1f MB): no "
                    "temporary folder can be written %s", path, need / 1e6, fix)
        return tensors
    kept = (f"{path}: a legacy (pre-zip) PyTorch file, kept in memory while it is packed ({need / 1e6:.1f} MB): "
            f"no room for a copy in the temporary folder {folder} ")
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        free = None
    if free is not None and free < need + (1 << 20):  # (the zip's records and padding: well under a MB)
        log.warning("%s(%.1f MB free) %s", kept, free / 1e6, fix)
        return tensors
    try:
        with tempfile.NamedTemporaryFile(prefix=".tallpack-legacy-", suffix=".pt") as tmp:
            torch.save(tensors, tmp)  # shared storages (tied weights) stay shared
            tmp.flush()
            back = torch.load(tmp.name, map_location="cpu", weights_only=True, mmap=True)
    except (OSError, RuntimeError) as e:  # (filled meanwhile; torch's RuntimeError names neither folder nor cause)
        why = e.strerror if isinstance(e, OSError) and e.strerror else "writing it failed: full, or not writable?"
        log.warning("%s(%s) %s", kept, why, fix)
        log.debug("%s: torch's error: %s", path, quoted(e))
        return tensors
    return back


@functools.cache
def _kinds() -> tuple[tuple[type, ...], frozenset]:
    """The tensor classes that hold plain data, and the sparse layouts (built on first use: torch loads lazily)."""
    plain = tuple(c for c in (torch.Tensor, torch.nn.Parameter, getattr(torch.nn, "Buffer", None)) if c)
    return plain, frozenset({torch.sparse_coo, torch.sparse_csr, torch.sparse_csc, torch.sparse_bsr, torch.sparse_bsc})


def _why_unreadable(t: torch.Tensor) -> str | None:
    """Why ``t`` has no plain dense data tallpack can read, and what to do; None when it has."""
    if t.is_nested:
        return "is a nested tensor; store its components as separate dense tensors"
    plain, sparse = _kinds()
    if type(t) not in plain:
        return (f"is a {type(t).__name__} (a tensor subclass tallpack cannot read); "
                "convert it to a plain dense tensor first")
    if t.layout in sparse:
        return f"is a sparse tensor ({t.layout}); convert it to dense first (tensor.to_dense())"
    if t.layout != torch.strided:
        return f"has layout {t.layout}, not a dense one; convert it to dense first (tensor.to_dense())"
    if t.is_meta:
        return "is a meta tensor (a shape without data); load the real weights first"
    if t.is_quantized:
        return f"is a quantized tensor ({t.dtype}); dequantize it first (tensor.dequantize())"
    return None


def _tensor_dict(label: str, obj: Mapping) -> dict[str, torch.Tensor]:
    out = {}
    for name, t in obj.items():
        if not isinstance(name, str):
            raise CheckpointError(f"{label}: entry {name!r}: tensor names must be strings, got {type(name).__name__}")
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f"{label}: entry {name!r} is {_a(type(t).__name__)}, not a tensor; a state dict "
                                  "holds only tensors: drop it (torch.save({k: v for k, v in sd.items() "
                                  "if isinstance(v, torch.Tensor)}, ...))")
        why = _why_unreadable(t)
        if why:
            raise CheckpointError(f"{label}: tensor {name!r} {why}")
        try:
            dtype_name(t.dtype)
        except TallpackError:
            raise CheckpointError(f"{label}: tensor {name!r} has unsupported dtype {t.dtype}") from None
        out[name] = t
    return out


class DictSource(Source):
    """A mapping of names to tensors, already in memory."""

    kind = "dict"

    def __init__(self, label: str, tensors: Mapping[str, torch.Tensor]):
        super().__init__(label)
        self._tensors = _tensor_dict(label, tensors)
        for name, t in self._tensors.items():
            self._infos[name] = TensorInfo(tuple(t.shape), dtype_name(t.dtype))

    def _load(self, name: str) -> torch.Tensor:
        return self._tensors[name].detach().cpu()

    def aliases(self) -> dict[str, str]:
        return exact_aliases(self._tensors)

    def describe(self) -> dict[str, Any]:
        return {"format": self.kind, "bytes": self.nbytes, **self.layout}  # a layout: a pipeline's tensors


def is_hub_repo(path: Path) -> bool:
    """Whether ``path`` is a Hugging Face cache repository folder: ``models--org--name`` with
    ``snapshots/`` and ``blobs/`` in it (the name too: a model folder of one's own that holds such
    subfolders is read as it is, not as its snapshot)."""
    return (Path(os.path.abspath(path)).name.startswith("models--") and (path / "snapshots").is_dir()
            and (path / "blobs").is_dir())


def hub_snapshot(path: Path) -> Path | None:
    """The snapshot a Hugging Face cache repository folder stands for (``models--org--name``, which
    holds ``snapshots/``, ``blobs/`` and ``refs/``): the one ``refs/main`` names, which
    ``from_pretrained`` loads offline, or the folder's only snapshot; None for any other path.
    CheckpointError when it holds several snapshots and ``refs/main`` names none of them.

    >>> hub_snapshot(Path("~/.cache/huggingface/hub/models--org--gpt2").expanduser())
    PosixPath('.../models--org--gpt2/snapshots/e078b5...')
    """
    if not is_hub_repo(path):
        return None
    snapshots = path / "snapshots"
    try:
        revision = (path / "refs" / "main").read_text().strip()
    except (OSError, UnicodeDecodeError):
        revision = ""
    if revision and "/" not in revision and revision not in (".", "..") and (snapshots / revision).is_dir():
        log.info("%s: a Hugging Face cache repository; reading its snapshot %s (refs/main)", path, revision)
        return snapshots / revision
    try:
        found = sorted(d.name for d in snapshots.iterdir() if d.is_dir())
    except OSError as err:
        raise CheckpointError(f"{snapshots}: cannot list the folder ({err.strerror or err})") from None
    if len(found) == 1:
        log.info("%s: a Hugging Face cache repository; reading its only snapshot %s", path, found[0])
        return snapshots / found[0]
    if not found:
        raise CheckpointNotFoundError(f"{path}: a Hugging Face cache repository without a snapshot (a download "
                                      "cut off? download it again)")
    shown = ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
    raise CheckpointError(
        f"{path}: a Hugging Face cache repository of {len(found)} snapshots ({shown}) and no refs/main naming one; "
        f"pass the snapshot to pack ({shlex.quote(str(snapshots / found[-1]))})")


#: A Hugging Face repository id (``org/name``, or a canonical model's ``gpt2``).
_REPO_ID = re.compile(r"(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*")


def hub_cache() -> Path:
    """The Hugging Face cache folder, as huggingface_hub finds it: ``$HF_HUB_CACHE``, else
    ``$HF_HOME/hub``, else ``$XDG_CACHE_HOME/huggingface/hub`` (``~/.cache/huggingface/hub``)."""
    if os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE"):
        return Path(os.environ.get("HF_HUB_CACHE") or os.environ["HUGGINGFACE_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(home).expanduser() / "hub"


def _repo_id_hint(given: str) -> str:
    """For a path that does not exist but reads as a Hub repository id: where its download is in
    the local Hugging Face cache, or that tallpack reads local files only; else ''."""
    if not _REPO_ID.fullmatch(given) or given.endswith(tuple(_WEIGHT_SUFFIXES)):
        return ""
    repo = hub_cache() / ("models--" + given.replace("/", "--"))
    if is_hub_repo(repo):
        return f"; the Hugging Face repository {given}'s download is in the cache: pass {shlex.quote(str(repo))}"
    if "/" not in given:
        return ""
    return (f"; a Hugging Face repository id? tallpack reads local files only: download it first "
            f"(hf download {given}, into {shlex.quote(str(repo))}) and pass that folder")


def _roots(folder: Path) -> list[Path]:
    """Where the files of ``folder`` may resolve to: the folder, and for a Hugging Face cache
    snapshot (or a subfolder of one), its cache repository folder."""
    root = _resolve(folder, folder)
    for anc in (root, *root.parents):
        if anc.parent.name == "snapshots" and (anc.parent.parent / "blobs").is_dir():
            return [root, anc.parent.parent]
    return [root]


def _hub_blob(real: Path) -> bool:
    """Whether ``real`` (resolved) is a file directly in the ``blobs/`` folder of a Hugging Face
    cache repository (``models--org--name``, which holds ``snapshots/`` too): a download's bytes,
    named by their hash."""
    return real.parent.name == "blobs" and is_hub_repo(real.parent.parent) and real.is_file()


def _resolve(path: Path, shown: Path) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError) as e:  # a link loop
        raise CheckpointError(f"{shown}: cannot follow its links ({quoted(e)})") from None


def _in_folder(folder: Path, path: Path, roots: list[Path]) -> Path:
    """``path``, after checking that it resolves inside ``roots``."""
    real = _resolve(path, path)
    if any(real.is_relative_to(r) for r in roots):
        return path
    if _hub_blob(real):  # a --local-dir download of huggingface_hub before 0.23 links its large files there
        log.debug("%s: a link to %s, a file of a Hugging Face cache repository", path, real)
        return path
    how = "is a symlink to" if path.is_symlink() else "leads through a symlinked folder to"
    where = "the input folder" if len(roots) == 1 else "the input folder and its Hugging Face cache repository"
    raise CheckpointError(
        f"{path}: {how} {real}, outside {where}; copy the file into {folder} or pass the file itself"
    )


def _shard_name(index: Path, key: Any, value: Any) -> str:
    """A ``weight_map`` value, checked to be a plain relative file name."""
    if not isinstance(value, str):
        why = f"is not a string but a {type(value).__name__}"
    elif "\0" in value or "\\" in value:
        why = "holds a NUL or a backslash"
    elif value.startswith("/"):
        why = "is an absolute path"
    elif any(part in ("", ".", "..") for part in value.split("/")):
        why = "has an empty, '.' or '..' component"
    else:
        return value
    raise CheckpointError(
        f"{index}: weight_map entry {key!r} -> {value!r} {why}; shards must be named by plain "
        "file names relative to the folder"
    )


def _shown(path: Path, folder: str) -> str:
    """``path`` as named from ``folder`` (a shard, as its index names it), else in full."""
    try:
        return path.relative_to(folder).as_posix()
    except ValueError:
        return str(path)


def _read_index(index: Path) -> dict[str, str]:
    """A shard index's ``weight_map``: tensor name -> shard file, each file name checked."""
    try:
        doc = json.loads(index.read_text())
        weight_map = doc["weight_map"]
    except OSError as e:  # (unreadable: "Permission denied", as any other input file's error says)
        raise CheckpointError(f"{index}: {e.strerror or quoted(e)}") from None
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index}: not a readable shard index ({type(e).__name__}: {quoted(e)})") from None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: not a valid shard index (weight_map is a "
                              f"{type(weight_map).__name__}, not an object)")
    return {k: _shard_name(index, k, v) for k, v in weight_map.items()}


def _check_index(src: Source, folder: Path, index: Path, weight_map: dict[str, str]) -> None:
    """Warn, naming one tensor, where the index lists a tensor no shard holds (a tied weight that
    safetensors' conversion bot dropped from the shards but not from the index, which transformers
    ties again; otherwise an incomplete folder), names another shard for a tensor, or leaves out
    one a shard holds: transformers loads every tensor of every shard the index names, whatever its
    ``weight_map`` says, and so does the packer (the unpacked folder's index then says where each
    tensor is)."""
    wrong: list[str] = []
    absent: list[str] = []
    for name, shard in weight_map.items():
        held = src._where.get(name)
        if held is None:
            absent.append(f"maps tensor {name!r} to {shard}, which does not hold it (nor does any other shard)")
        elif held != folder / shard:
            wrong.append(f"maps tensor {name!r} to {shard}, but {_shown(held, str(folder))} holds it")
    unlisted = [f"does not list tensor {name!r}, which {_shown(held, str(folder))} holds"
                for name, held in src._where.items() if name not in weight_map]
    for what, why in ((absent, "; packing what the shards hold, as transformers loads it (a tied weight, "
                               "which safetensors' conversion leaves in the index, is tied again; any other "
                               "starts from random values: then the folder is incomplete)"),
                      (wrong, "; packing what the shards hold, as transformers loads it"),
                      (unlisted, "; packing what the shards hold, as transformers loads it")):
        if what:
            more = f" (and {len(what) - 1} more like it)" if len(what) > 1 else ""
            log.warning("%s: %s%s%s", index, what[0], more, why)


#: A folder's weights, in the order transformers' ``from_pretrained`` looks for them: the first
#: present is the model it loads (a single file before a shard index, safetensors before pickles).
#: Then diffusers' same names (a pipeline component's ``diffusion_pytorch_model.safetensors``).
_WEIGHT_SETS = (("model.safetensors", "safetensors", False), ("model.safetensors.index.json", "safetensors", True),
                ("pytorch_model.bin", "torch", False), ("pytorch_model.bin.index.json", "torch", True),
                (f"{DIFFUSERS}.safetensors", "safetensors", False),
                (f"{DIFFUSERS}.safetensors.index.json", "safetensors", True),
                (f"{DIFFUSERS}.bin", "torch", False), (f"{DIFFUSERS}.bin.index.json", "torch", True))
#: A weight file of transformers' or diffusers' own names (a weight set, a variant, a shard of
#: either): one not packed is another weight set of the folder, or a stale one.
_TRANSFORMERS_WEIGHTS = re.compile(r"((pytorch_)?model|diffusion_pytorch_model)(\.[^/]+?)?(-\d+-of-\d+)?"
                                   r"\.(safetensors|bin)")
def is_index_name(name: str) -> bool:
    """Whether ``name`` is a shard index's, plain or of a variant (``model.safetensors.index.json``,
    ``model.safetensors.index.fp16.json``): ``[^/]*model[^/]*\\.index(\\.[^/]+)?\\.json`` in full,
    checked in linear time (the expression backtracks: 0.3 ms a crafted 240-character name, and an
    archive holds thousands)."""
    if "/" in name or not name.endswith(".json"):
        return False
    stem = name[:-5]
    first = stem.find("model")
    if first < 0:
        return False
    i = stem.find(".index", first + 5)
    while i >= 0:
        rest = stem[i + 6:]
        if not rest or (rest[0] == "." and len(rest) > 1):
            return True
        i = stem.find(".index", i + 1)
    return False


def _weight_sets(folder: Path) -> list[tuple[str, str, bool, str | None]]:
    """The weight sets ``folder`` holds, as ``(file, kind, indexed, variant)``, in the order
    transformers' ``from_pretrained`` takes them: the plain names first (it loads the first of
    them without ``variant=``), then each variant's (sorted by variant) in the same order."""
    def present(name: str) -> bool:
        return (folder / name).is_file() or (folder / name).is_symlink()

    found: list[tuple[str, str, bool, str | None]] = [(*w, None) for w in _WEIGHT_SETS if present(w[0])]
    try:
        names = sorted(os.listdir(folder))
    except OSError as err:
        raise CheckpointError(f"{folder}: cannot list the folder ({err.strerror or err})") from None
    variants = sorted((*w, name) for name in names if (w := weight_variant(name)) is not None and present(name))
    return found + [(name, *VARIANT_SETS[order][1:], v) for v, order, name in variants]


def _folder_files(folder: Path, roots: list[Path], given: str | None = None
                  ) -> tuple[str, list[Path], Path | None, dict[str, str]]:
    """The weights' kind, their files, and the shard index and its ``weight_map`` when there is
    one: the weights transformers loads (or the index ``given``), the others (a stale single file
    beside shards, another variant) left out with a warning."""
    present = _weight_sets(folder)
    if given is not None:
        present = sorted(present, key=lambda w: w[0] != given)  # the index given first
        if not present or present[0][0] != given:
            raise CheckpointError(f"{folder / given}: not a shard index of transformers' names "
                                  "(model.safetensors.index.json, model.safetensors.index.VARIANT.json, "
                                  "pytorch_model.bin.index.json, ...) or diffusers' "
                                  "(diffusion_pytorch_model.safetensors.index.json, ...); pass the model folder")
    elif present and present[0][3] is not None and len({w[3] for w in present}) > 1:
        raise CheckpointError(
            f"{folder}: holds weight variants {', '.join(sorted({repr(w[3]) for w in present}))} and no plain "
            "weights: transformers loads none of them without variant=; move the others out of the folder, or "
            "pass the shard index of the one to pack (model.safetensors.index.VARIANT.json)")
    if present:
        name, kind, indexed, variant = present[0]
        if len(present) > 1:
            why = ("the index given" if given is not None else f"which transformers loads with variant={variant!r}"
                   if variant is not None else "which transformers loads")
            log.warning("%s: holds %s too; packing %s, %s, and leaving the others out",
                        folder, ", ".join(w[0] for w in present[1:]), name, why)
        path = _in_folder(folder, folder / name, roots)
        if indexed:
            weight_map = _read_index(path)
            return kind, [_in_folder(folder, folder / s, roots) for s in sorted(set(weight_map.values()))], path, \
                weight_map
        return kind, [path], None, {}
    found = sorted(folder.glob("*.safetensors"))
    if len(found) == 1:
        return "safetensors", [_in_folder(folder, found[0], roots)], None, {}
    dcp = _dcp_folder(folder)
    if dcp is not None:
        fsdp = ", an FSDP sharded state dict" if dcp != folder else ""
        raise CheckpointError(
            f"{dcp}: a torch.distributed.checkpoint (DCP) folder (.metadata, *.distcp{fsdp}), "
            "which tallpack does not read (its .metadata is a pickle); convert it into one file first (python -m "
            f"torch.distributed.checkpoint.format_utils dcp_to_torch {shlex.quote(str(dcp))} model.pt) and pack that")
    if (folder / "adapter_config.json").is_file():
        raise CheckpointError(f"{folder}: a PEFT adapter (adapter_config.json), not a model's weights; {MERGE_ADAPTER}")
    pickles = sorted(f.name for f in folder.iterdir()
                     if f.suffix != ".bin" and _is_torch_file(f) and not _TRAINING_STATE.fullmatch(f.name))
    # (Lightning's version_N/checkpoints/: the run's folder names the task)
    name = folder.parent.name if folder.name == "checkpoints" and folder.parent.name else folder.name
    held = (f"; it holds {', '.join(pickles[:3])}{', ...' if len(pickles) > 3 else ''} (PyTorch file"
            f"{'s' if len(pickles) > 1 else ''}): pass the file itself ({shlex.quote(f'{name}={folder / pickles[0]}')})"
            if pickles else "")
    raise CheckpointError(
        f"{folder}: no model.safetensors, shard index or pytorch_model.bin in this folder (nor a variant of them, "
        f"model.VARIANT.safetensors){held}"
    )


#: A DeepSpeed model-states file (``mp_rank_00_model_states.pt``; ZeRO-3's
#: ``zero_pp_rank_0_mp_rank_00_model_states.pt``).
_MODEL_STATES = re.compile(r"(zero_pp_rank_\d+_)?mp_rank_\d+_model_states\.pt")


def deepspeed_tag(folder: Path) -> str | None:
    """The checkpoint folder (its tag: ``global_step500``, Lightning's ``checkpoint``) of a
    DeepSpeed save folder, which holds a ``latest`` file naming that folder, of model-states and
    ZeRO's partitioned files; else None."""
    try:
        latest = folder / "latest"
        if not latest.is_file() or latest.stat().st_size > 4096:
            return None
        tag = latest.read_text(errors="replace").strip()
        if not tag or "/" in tag or tag.startswith(".") or not (folder / tag).is_dir():
            return None
        return tag if any(_MODEL_STATES.fullmatch(f.name) for f in (folder / tag).iterdir()) else None
    except OSError:
        return None


def _deepspeed_folder(folder: Path, tag: str) -> CheckpointError:
    """The refusal of a DeepSpeed save folder given as a model, with the conversion into one file:
    Lightning's (its DeepSpeed strategy saves a folder under the checkpoint's file name, ``last.ckpt/``,
    whose model states name the LightningModule's tensors after its wrapper, ``_forward_module.``), or
    DeepSpeed's own (whose ``zero_to_fp32.py`` it saves beside them)."""
    q = shlex.quote(str(folder))
    script = folder / "zero_to_fp32.py"  # (DeepSpeed's own module where the folder lacks its copy)
    script_run = f"python {shlex.quote(str(script))}" if script.is_file() else "python -m deepspeed.utils.zero_to_fp32"
    if folder.suffix == ".ckpt":
        how = (f"Lightning's DeepSpeed strategy saves its checkpoints so, under the file's name; consolidate it into "
               f"one file first (python -c \"from lightning.pytorch.utilities.deepspeed import "
               f"convert_zero_checkpoint_to_fp32_state_dict as c; c({str(folder)!r}, 'model.ckpt')\", or "
               f"{script_run} {q} model.pt) and pack that")
    else:
        how = (f"consolidate its weights into one file first ({script_run} {q} model.pt) and pack that, or, "
               "saved with ZeRO-1 or 2, pack the model states file "
               f"{shlex.quote(str(folder / tag / 'mp_rank_00_model_states.pt'))} (the weights in their training dtype)")
    return CheckpointError(f"{folder}: a DeepSpeed checkpoint folder (latest, {tag}/ of model states and ZeRO's "
                           f"partitions), not a model's folder: {how}")


def _dcp_folder(folder: Path) -> Path | None:
    """``folder`` when it is a torch.distributed.checkpoint folder (``.metadata`` and ``*.distcp``
    files), else its subfolder that holds a model's one (FSDP's sharded state dict in a Trainer's or
    accelerate's checkpoint, ``pytorch_model_fsdp_0/``, not ``optimizer_0/``); else None."""
    def is_dcp(d: Path) -> bool:
        return (d / ".metadata").is_file() and any(d.glob("*.distcp"))

    if is_dcp(folder):
        return folder
    try:
        inside = sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith(("optimizer", ".")))
    except OSError:
        return None
    return next((d for d in inside if is_dcp(d)), None)


def open_source(obj: SourceLike, *, label: str | None = None) -> Source:
    """Open a checkpoint for lazy reading.

    >>> src = open_source("ft/cars")          # a Hugging Face folder
    >>> src.keys()[:2], src.get("encoder.layer.0.attention.q.weight").shape
    """
    if isinstance(obj, Source):
        return obj
    if isinstance(obj, Mapping):
        return DictSource(label or "<dict>", obj)
    if not isinstance(obj, (str, os.PathLike)):
        said = f"{label}: " if label else ""
        if hasattr(obj, "tasks") and callable(getattr(obj, "task_info", None)):  # tallpack's own Archive
            raise CheckpointError(f"{said}a tallpack archive ({getattr(obj, 'name', '?')}) is not a checkpoint: "
                                  "pass a task's tensors (fam.state_dict(TASK, lazy=True)) or the folder tallpack "
                                  "unpack writes")
        if callable(getattr(obj, "state_dict", None)):  # a model in memory (torch.nn.Module, a PreTrainedModel)
            raise CheckpointError(f"{said}{_a(type(obj).__name__)} is a model, not a checkpoint: pass "
                                  "model.state_dict(), or the folder its save_pretrained() writes (which keeps its "
                                  "config.json)")
        raise CheckpointError(f"{said}cannot read a checkpoint from a {type(obj).__name__}")
    path = Path(os.fspath(obj).removeprefix("file://"))  # a file:// URL is a local path (as for archives)
    path = hub_snapshot(path) or path
    given = None
    if is_index_name(path.name) and path.is_file():  # a shard index: its folder, with these weights
        path, given = path.parent, path.name
    if path.is_dir():
        tag = deepspeed_tag(path)
        if tag is not None:
            raise _deepspeed_folder(path, tag)
        roots = _roots(path)
        components = _components(path, roots) if given is None else None
        if components is not None:
            return _open_pipeline(path, roots, components)
        modules = _modules(path, roots) if given is None else None
        if modules is not None:
            return _open_modules(path, roots, modules)
        src, weights = _open_folder(path, roots, given)
        src.files = _other_files(path, roots, weights)
        _note_kept_weights(src)
        return src
    if not path.exists():
        raise CheckpointNotFoundError(f"{path}: no such file or folder{_repo_id_hint(os.fspath(obj))}")
    if path.suffix == ".safetensors" or _is_torch_file(path):
        _note_folder_left(path)
    if path.suffix == ".safetensors":
        return SafetensorsSource(str(path), [path])
    if _is_torch_file(path):
        if is_training_state(path.name):  # (a pickle, which weights_only may refuse with another reason)
            raise CheckpointError(f"{path}: a trainer's state file (optimizer, scheduler, random states or arguments), "
                                  f"not a model's weights; give the model: its folder ({path.parent}) or weights file")
        return TorchSource(str(path), [path])
    raise CheckpointError(
        f"{path}: unknown checkpoint type; expected .safetensors, .bin/.pt/.pth/.ckpt/.pth.tar or a model folder"
    )


#: The files that make a folder beside a weights file a model's folder (whose other files a file
#: given alone leaves behind).
_MODEL_FOLDER_FILES = ("config.json", "model_index.json", "modules.json")


def _note_folder_left(path: Path) -> None:
    """Warn when a weights file given alone sits in a model folder: the folder's config and
    tokenizer files are then not packed, which its folder, given instead, would keep; or is one
    shard of several (``model-00001-of-00003.safetensors``): then the model's other tensors are not."""
    beside = [n for n in _MODEL_FOLDER_FILES if (path.parent / n).is_file()]
    shard = _ONE_SHARD.search(path.name)
    if shard is not None and int(shard.group(1)) > 1:  # a part of the model: its other shards' tensors left out
        log.warning("%s is packed as a file alone: it is one of %s shards of a model, so the other shards' tensors "
                    "are not packed%s (give the folder, %s, to pack the whole model)", path, int(shard.group(1)),
                    f", nor its folder's {beside[0]} and tokenizer" if beside else "", path.parent)
    elif beside:
        log.warning("%s is packed as a file alone: its folder's %s, tokenizer and other files are not kept "
                    "(give the folder, %s, to keep them)", path, beside[0], path.parent)


#: A shard's name ends in its number and the count (``model-00001-of-00003.safetensors``).
_ONE_SHARD = re.compile(r"-\d+-of-(\d+)\.(safetensors|bin)$")


#: A trainer's checkpoint folders (transformers' Trainer ``checkpoint-500``, accelerate's
#: ``checkpoint_3``, DeepSpeed's ``global_step500``): a training run's state, not the model's files.
_CHECKPOINT_FOLDER = re.compile(r"checkpoint[-_]\d+|global_step\d+")
#: A trainer's state files (optimizer, scheduler, loss scaler, random generators, arguments), anywhere
#: (Trainer's ``optimizer.pt``, ``rng_state.pth``; accelerate's ``optimizer.bin``, ``optimizer_1.bin`` of a second
#: optimizer, ``sampler.bin``, ``dl_state_dict.bin``, ``random_states_0.pkl``, ``custom_checkpoint_0.pkl`` of its
#: registered objects; DeepSpeed's ``zero_pp_rank_0_mp_rank_00_optim_states.pt``).
_TRAINING_STATE = re.compile(r"(optimizer|scheduler|sampler|dl_state_dict)(_\d+)?\.(bin|pt)|scaler\.pt"
                             r"|rng_state.*\.pth|random_states_.*\.pkl|custom_checkpoint_\d+\.pkl|training_args\.bin"
                             r"|(bf16_)?zero_pp_rank_\d+_mp_rank_\d+_optim_states\.pt")
def is_training_state(name: str) -> bool:
    """Whether a file name is a trainer's state file (``optimizer.bin``, ``rng_state.pth``, ...), no model's."""
    return _TRAINING_STATE.fullmatch(name) is not None


#: Hidden files kept with a folder's files: every Hugging Face repository's ``.gitattributes`` (which
#: files Git LFS stores), part of its download; other hidden entries (``.git``, ``.cache``) are left out.
_KEPT_HIDDEN = frozenset({".gitattributes"})
#: Weight files of other frameworks, left out of a folder's files (the archive stores the weights themselves).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx", ".npz")
#: Weight files a subfolder keeps as folder files (a pipeline's ``unet_ema/``, a sentence-transformers module's
#: ``2_Dense/model.safetensors`` of an unreadable ``modules.json``; a listed module's are packed as tensors):
#: PyTorch's, which are no other framework's copy of the model.
_MODULE_WEIGHTS = (".safetensors", ".bin")


def _other_files(folder: Path, roots: list[Path], weights: set[Path], tops: frozenset[str] | set[str] = frozenset({""}),
                 pipeline: bool = False) -> dict[str, Path]:
    """The folder's files other than the weights packed (config, tokenizer files, model card, chat
    template, a subfolder's module weights, ...), by relative name with ``/`` separators, in sorted order.

    Hidden entries (``.git``, ``.cache``) but ``.gitattributes`` are left out, and so are weight files of other frameworks
    (``.h5``, ``.onnx``, ...) and ``.pt``/``.pth``/``.ckpt`` files, anywhere. A trainer's state is
    left out with a warning naming it: its checkpoint folders (``checkpoint-500/``, ``global_step500/``)
    and state files anywhere (``optimizer.bin``, ``scheduler.pt``, ``random_states_0.pkl``, ...;
    ``training_args.bin`` alone is only logged), and ``trainer_state.json`` when the folder is a
    checkpoint folder itself. At the top, ``.safetensors``/``.bin`` files and shard indexes are left out too:
    the weights packed, or another weight set (a variant, a stale file; warned by ``_folder_files``),
    and any other one (a ``value_head.safetensors``) with a warning; the same in each folder of
    ``tops`` (a pipeline's components, a sentence-transformers model's module folders, whose weights
    are packed). In another subfolder they are kept, their bytes (a folder no index lists, which
    transformers does not load). Other non-regular files (fifos, sockets) are skipped with a
    warning. Links, of files or of subfolders, must resolve inside the folder (or its Hugging Face
    cache repository): the same rule as for the weights; a link to nothing is an error, as a weight
    file's is. At the top of a diffusers ``pipeline``, every weight file is a single-file
    checkpoint beside its components (``v1-5-pruned-emaonly.safetensors``), left out with a warning.
    """
    skip = {p.relative_to(folder).as_posix() for p in weights if p.is_relative_to(folder)}
    out: dict[str, Path] = {}
    seen: set[Path] = set()
    beside: list[str] = []  # top-level weight files of no weight set of transformers'
    training: list[str] = []  # a trainer's state: checkpoint folders and state files
    single: list[str] = []  # a pipeline's single-file checkpoints at its top
    in_checkpoint = _CHECKPOINT_FOLDER.fullmatch(_resolve(folder, folder).name) is not None

    def walk(d: Path, rel: str) -> None:
        real = _resolve(d, d)
        if real in seen:  # a link loop back into the tree
            return
        seen.add(real)
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError as err:
            raise CheckpointError(f"{d}: cannot list the folder ({err.strerror or err})") from None
        for e in entries:
            name = f"{rel}{e.name}"
            p = d / e.name
            if (e.name.startswith(".") and e.name not in _KEPT_HIDDEN) or name in skip:
                continue
            if (_TRAINING_STATE.fullmatch(e.name) or (_CHECKPOINT_FOLDER.fullmatch(e.name) and e.is_dir())
                    or (in_checkpoint and name == "trainer_state.json")):
                training.append(f"{name}/" if e.is_dir() else name)
                continue
            if e.name.endswith(_WEIGHT_SUFFIXES) or is_index_name(e.name):
                if pipeline and not rel:
                    single.append(name)
                elif rel in tops and e.name.endswith(_MODULE_WEIGHTS) and not _TRANSFORMERS_WEIGHTS.fullmatch(e.name):
                    beside.append(name)
                if rel in tops or not e.name.endswith((*_MODULE_WEIGHTS, ".json")):
                    continue
            if e.name.endswith(".tallpack"):  # an earlier archive of the family, packed into its folder
                log.warning("%s: an archive, left out of the folder's files", p)
                continue
            if e.is_symlink():
                _in_folder(folder, p, roots)
            if p.is_dir():
                walk(p, f"{name}/")
            elif p.is_file():
                try:
                    check_file_name(name)  # as readers check it: a name an archive cannot hold
                except FormatError as err:
                    log.warning("%s: left out of the archive: %s", folder, err)  # the name, escaped
                    continue
                out[name] = p
            elif p.exists():
                log.warning("%s: not a regular file; left out of the archive", p)
            elif e.is_symlink():  # as a weight file's dangling link is: the folder is not whole
                raise CheckpointNotFoundError(_dangling(p))
    walk(folder, "")
    if training:
        shown = ", ".join(training[:5]) + (f" and {len(training) - 5} more" if len(training) > 5 else "")
        level = logging.INFO if all(n.endswith("training_args.bin") for n in training) else logging.WARNING
        log.log(level, "%s: %s left out of the archive: a trainer's state (checkpoints, optimizer, scheduler, "
                "random states, arguments), not the model's files", folder, shown)
    if single:
        log.warning("%s: %s left out of the archive: a single-file checkpoint beside the diffusers pipeline's "
                    "components (DiffusionPipeline.from_pretrained loads the components, which are packed; such a "
                    "file is the same model in one file, for other tools), not written back by unpack", folder,
                    ", ".join(single))
    if beside:
        log.warning("%s: %s left out of the archive: only the weights transformers loads are kept at the top of "
                    "a model folder (a subfolder's weight files are kept as files)", folder, ", ".join(beside))
    return out


def _note_kept_weights(src: Source, why: str = "") -> None:
    """Say which subfolders' weight files are kept as folder files (stored whole, once per
    content, not as tensors), and warn when they outweigh half the model: another model's copy
    left in the folder, which a user may rather move out (a trainer's checkpoints are left out)."""
    kept = [n for n in src.files if n.endswith(_MODULE_WEIGHTS)]
    if not kept:
        return
    size = sum(src.files[n].stat().st_size for n in kept)
    shown = ", ".join(kept[:5]) + (f" and {len(kept) - 5} more" if len(kept) > 5 else "")
    if size > src.nbytes // 2:
        log.warning("%s: subfolder weight files %s (%d bytes) are kept whole as folder files, not packed as "
                    "tensors%s; move them out of the folder if they are not part of the model", src.label, shown,
                    size, why)
    else:
        log.info("%s: subfolder weight files %s kept as folder files (%d bytes)%s", src.label, shown, size, why)


def _layout(src: Source, index: Path) -> dict[str, Any]:
    """Which shard file held which tensors (runs in the source's key order) and the index's
    ``metadata``, so that an unpacked folder can be sharded like the original."""
    where = src._where
    shards: list[list[Any]] = []
    for name in src.keys():
        f = _written_name(where[name].name)
        if shards and shards[-1][0] == f:
            shards[-1][1] += 1
        else:
            shards.append([f, 1])
    try:
        meta = json.loads(index.read_text()).get("metadata")
    except (OSError, ValueError):
        meta = None
    return {"shards": shards, **({"index_metadata": meta} if isinstance(meta, dict) else {})}


def _written_name(f: str) -> str:
    """The name an unpack writes a weight file back as: a pickle as safetensors
    (``pytorch_model.fp16-00001-of-00002.bin`` as ``model.fp16-00001-of-00002.safetensors``), a
    variant's single file without its variant (``diffusion_pytorch_model.fp16.safetensors`` as
    ``diffusion_pytorch_model.safetensors``, which a loader takes without ``variant=``)."""
    f = plain_name(f)
    if f.endswith(".bin"):
        return f.removeprefix("pytorch_").removesuffix(".bin") + ".safetensors"
    return f


def _open_folder(path: Path, roots: list[Path], given: str | None = None) -> tuple[Source, set[Path]]:
    """One model folder's weights (its index, layout and ``config.json`` noted), without its other
    files; and the files of the weight set packed (shards and index), which are no folder files."""
    kind, files, index, weight_map = _folder_files(path, roots, given)
    src: Source = SafetensorsSource(str(path), files) if kind == "safetensors" else TorchSource(str(path), files)
    if index is not None:
        _check_index(src, path, index, weight_map)
    src.kind = "hf-folder"
    src.root = path
    others = ["model.safetensors.index.json", "pytorch_model.bin.index.json", "config.json"]
    if index is not None and kind == "safetensors" and index.name not in others:  # a variant's index, diffusers'
        others.insert(0, index.name)  # (a pickles' one is not written back, as their own index is not)
    src.other_files = [_in_folder(path, path / n, roots) for n in others if (path / n).is_file()]
    if index is not None:
        src.layout = _layout(src, index)
    elif _written_name(files[0].name) != "model.safetensors":
        # adapter_model.safetensors, diffusion_pytorch_model.safetensors, ...: unpacked under its own name;
        # a variant (model.fp16.safetensors) without it, which from_pretrained(folder) loads without
        # variant= (as a sharded one's index)
        src.layout = {"shards": [[_written_name(files[0].name), len(src.keys())]]}
    config = path / "config.json"
    if config.is_file() or config.is_symlink():
        _in_folder(path, config, roots)
    if config.is_file():
        try:
            value = json.loads(config.read_text())
            check_json(value, at=4)  # as a task's metadata.config (spec §3, §7): else no reader opens the archive
        except (ValueError, RecursionError) as e:  # it stays a folder file, its bytes as they are
            log.warning("%s: not kept in the archive's metadata (%s); stored as a folder file only",
                        config, str(e)[:200] if isinstance(e, ValueError) else "nested too deep")
        else:
            src.metadata["config"] = value
    return src, {*files, *([index] if index else [])}


#: The file that makes a folder a diffusers pipeline (its components in subfolders).
PIPELINE_INDEX = "model_index.json"


def _listed(folder: Path) -> list[str]:
    """The components ``model_index.json`` lists (``folders.listed_components``), sorted; an
    unreadable index, or one that is not a JSON object, is a one-line error."""
    index = folder / PIPELINE_INDEX
    try:
        doc = json.loads(index.read_text())
    except (OSError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{index}: not a readable diffusers pipeline index ({quoted(e)[:200]})") from None
    if not isinstance(doc, dict):
        raise CheckpointError(f"{index}: not a diffusers pipeline index (a JSON {type(doc).__name__}, not an object)")
    return sorted(listed_components(doc))


def _components(folder: Path, roots: list[Path]) -> list[str] | None:
    """A diffusers pipeline's components: the subfolders that ``model_index.json`` lists as
    components and that hold a weight set (``unet``, ``text_encoder``, ``vae``), sorted; None when
    ``folder`` is no pipeline (no ``model_index.json``; or no component weights, but weights at
    its top). Other subfolders (a trainer's ``checkpoint-500/``, an ``unet_ema/``) are no
    components: what a model folder's subfolders are (:func:`_other_files`)."""
    if not (folder / PIPELINE_INDEX).is_file():
        return None
    top = bool(_weight_sets(folder) or any(folder.glob("*.safetensors")))
    try:
        listed = _listed(folder)
    except CheckpointError:
        if top:  # a model folder with a stray file of that name
            return None
        raise
    found = []
    for name in listed:
        if not _folder_name(name) or not (folder / name).is_dir():
            continue
        _in_folder(folder, folder / name, roots)
        if _weight_sets(folder / name):
            found.append(name)
    if found:
        return found
    if top:
        return None  # a model folder with a stray model_index.json: its weights at the top
    raise CheckpointError(f"{folder}: a diffusers pipeline ({PIPELINE_INDEX}) with no component weights (no "
                          f"subfolder it lists holds {DIFFUSERS}.safetensors, model.safetensors, a shard index or "
                          "pytorch_model.bin)")


def _folder_name(name: str) -> bool:
    """Whether ``name`` (listed by a ``model_index.json``) is a plain, visible subfolder name that an
    archive can hold."""
    try:
        check_file_name(name)
    except FormatError:
        return False
    return "/" not in name and not name.startswith(".")


class ComponentsSource(Source):
    """A diffusers pipeline: each component subfolder's weights (opened as a model folder of its
    own) under the component's name and ``/`` (``unet/conv_in.weight``). A part named ``""`` (a
    sentence-transformers model's transformer, :class:`ModulesSource`) is the folder's own
    weights, under their own names."""

    kind = "diffusers-pipeline"

    def __init__(self, label: str, root: Path, parts: dict[str, Source]):
        super().__init__(label)
        self.parts, self.root = parts, root
        for c, part in parts.items():
            self._infos.update((_joined(c, k), info) for k, info in part._infos.items())
            self.weight_files += part.weight_files
            self.other_files += part.other_files
            for k, v in part.metadata.items():  # header metadata (a license); a component's config.json is a
                # folder file (the top's, a sentence-transformers transformer's, is its metadata, as a single model's)
                if k != "config" or not c:
                    self.metadata.setdefault(k, v)
        if len(self._infos) < sum(len(part._infos) for part in parts.values()):
            clash = next(k for k in parts[""].keys() if component_of(k, parts))
            raise CheckpointError(f"{label}: tensor {clash!r} of the folder's own weights has the name of a tensor "
                                  f"of its module folder {component_of(clash, parts)}/; rename one of them")
        #: each weight file's component and '/' (its tensors' names there lack it): the exact tier's ``prefix``
        self.prefixes = {p: f"{c}/" for c, part in parts.items() if c for p in part.weight_files}
        shards = [[_joined(c, f), n] for c, part in parts.items()
                  for f, n in (part.layout.get("shards") or [["model.safetensors", len(part.keys())]])]
        top = parts[""].layout if "" in parts else {}
        self.layout = {"shards": shards, **{k: v for k, v in top.items() if k == "index_metadata"}, "components": {
            c: {k: v for k, v in part.layout.items() if k == "index_metadata"} for c, part in parts.items() if c}}

    def part_of(self, name: str) -> tuple[str, str]:
        """The part a tensor name is of and its name there: ``("unet", "conv_in.weight")``; a name
        of no component (a sentence-transformers transformer's) is the ``""`` part's."""
        c = component_of(name, self.parts)
        if c and name[len(c) + 1:] in self.parts[c]:
            return c, name[len(c) + 1:]
        return "", name

    def get(self, name: str) -> torch.Tensor:
        c, rest = self.part_of(name)
        self.parts[c].task = self.task  # (its errors name the task)
        return self.parts[c].get(rest)  # checked, and its errors named, by the component's folder

    def reads_ranges(self, name: str) -> bool:
        c, rest = self.part_of(name)
        return self.parts[c].reads_ranges(rest)

    def get_range(self, name: str, start: int, stop: int) -> torch.Tensor:
        c, rest = self.part_of(name)
        self.parts[c].task = self.task
        return self.parts[c].get_range(rest, start, stop)

    def check_unchanged(self) -> None:
        for part in self.parts.values():
            part.task = self.task  # (its errors name the task)
            part.check_unchanged()

    def close(self) -> None:
        for part in self.parts.values():
            part.close()


def _joined(c: str, name: str) -> str:
    return f"{c}/{name}" if c else name


def _open_parts(path: Path, roots: list[Path], names: list[str]) -> tuple[dict[str, Source], set[Path]]:
    """Each subfolder of ``names`` (``""``: the folder itself) opened as a model folder, and the
    weight files they pack."""
    parts: dict[str, Source] = {}
    weights: set[Path] = set()
    try:
        for c in names:
            parts[c], packed = _open_folder(path / c if c else path, roots)
            weights |= packed
    except BaseException:
        for part in parts.values():
            part.close()
        raise
    return parts, weights


def _open_pipeline(path: Path, roots: list[Path], components: list[str]) -> Source:
    parts, weights = _open_parts(path, roots, components)
    src = ComponentsSource(str(path), path, parts)
    src.files = _other_files(path, roots, weights, tops={"", *(f"{c}/" for c in components)}, pipeline=True)
    _note_kept_weights(src, _why_kept(path, components, src.files))
    log.info("%s: a diffusers pipeline of components %s", path, ", ".join(components))
    return src


def _why_kept(path: Path, components: list[str], files: Mapping[str, Any]) -> str:
    """Why a pipeline's subfolder weight files are no component's: a folder ``model_index.json``
    lists that holds none of the weight names looked for (``unet/unet.safetensors``, or one level
    down), or a folder it does not list (an ``unet_ema/``)."""
    listed = set(_listed(path))
    folders = sorted({n.split("/")[0] for n in files if "/" in n and n.endswith(_MODULE_WEIGHTS)})
    odd = [f for f in folders if f in listed and f not in components]
    why = []
    if odd:
        why.append(f"{PIPELINE_INDEX} lists {', '.join(map(repr, odd))}, but {'/, '.join(odd)}/ "
                   f"{'holds' if len(odd) == 1 else 'hold'} no {DIFFUSERS}.safetensors, model.safetensors, shard "
                   "index or .bin weights at its top")
    if len(odd) < len(folders):
        why.append(f"not components: {PIPELINE_INDEX} lists {', '.join(sorted(listed))}")
    return f" ({'; '.join(why)})" if why else ""


class ModulesSource(ComponentsSource):
    """A sentence-transformers model folder (``modules.json``): the transformer's weights at its
    top under their own names (the ``""`` part), and each module folder's that holds weights
    (``2_Dense/model.safetensors``, or ``pytorch_model.bin``) under the module's path and ``/``
    (``2_Dense/linear.weight``), as a pipeline's components are."""

    kind = "sentence-transformers"


def _modules(folder: Path, roots: list[Path]) -> list[str] | None:
    """A sentence-transformers folder's module folders that hold a weight set (``2_Dense``), in
    ``modules.json``'s order; None when ``folder`` has no ``modules.json`` or none of its modules
    has a folder with weights (a transformer, pooling and normalization: a single model). An
    unreadable ``modules.json`` (the folder packed as a single model, as before modules were
    packed) and a module path that is no plain subfolder name (``../x``, ``/x``, ``a/b``, hidden)
    are warned of and left alone: nothing outside the folder is read, and such a module's files
    stay folder files. A module folder that is a link leading outside the folder is refused, as
    any link out of a model folder is."""
    index = folder / MODULES
    if not index.is_file():
        return None
    try:
        doc = json.loads(index.read_text())
        if not isinstance(doc, list):
            raise ValueError(f"a JSON {type(doc).__name__}, not a list of modules")
    except (OSError, ValueError, RecursionError) as e:
        log.warning("%s: not a readable sentence-transformers module list (%s); the folder is packed as one model, "
                    "its subfolders' weight files kept as folder files", index, quoted(e)[:200])
        return None
    found: list[str] = []
    for listed in listed_modules(doc):
        name = listed.rstrip("/") if listed.rstrip("/") else listed  # "2_Dense/", which sentence-transformers loads
        if not _folder_name(name):
            log.warning("%s: module path %r is not a plain subfolder name of the model folder (as 2_Dense); not "
                        "packed as a module (nothing outside the folder is read)", index, name[:200])
            continue
        sub = folder / name
        if name in found or not (sub.is_dir() or sub.is_symlink()):
            continue
        _in_folder(folder, sub, roots)  # a link out of the folder: refused
        if sub.is_dir() and _weight_sets(sub):
            found.append(name)
        elif sub.is_dir():  # a Router's (or Asym's) modules, each in a folder of its own: 2_Router/query_0_Dense
            found += [f"{name}/{d}" for d in _nested_modules(folder, sub, roots)]
    return found or None


def _nested_modules(folder: Path, sub: Path, roots: list[Path]) -> list[str]:
    """The subfolders of module folder ``sub`` that hold a weight set, sorted: a sentence-transformers
    Router's (and Asym's) own modules, which it saves in folders of their own (``2_Router/query_0_Dense``,
    named in its ``router_config.json``) and loads as modules are loaded."""
    try:
        names = sorted(e.name for e in os.scandir(sub) if e.is_dir())
    except OSError as err:
        raise CheckpointError(f"{sub}: cannot list the folder ({err.strerror or err})") from None
    found = []
    for d in names:
        if not _folder_name(d):
            continue
        _in_folder(folder, sub / d, roots)
        if _weight_sets(sub / d):
            found.append(d)
    return found


def _open_modules(path: Path, roots: list[Path], modules: list[str]) -> Source:
    top = bool(_weight_sets(path) or any(path.glob("*.safetensors")))  # (a static embedding model has none)
    parts, weights = _open_parts(path, roots, [*([""] if top else []), *modules])
    try:
        src = ModulesSource(str(path), path, parts)
    except BaseException:
        for part in parts.values():
            part.close()
        raise
    src.files = _other_files(path, roots, weights, tops={"", *(f"{m}/" for m in modules)})
    _note_kept_weights(src)
    _warn_module_files(src, path)
    log.info("%s: a sentence-transformers model with module weights %s", path, ", ".join(f"{m}/" for m in modules))
    return src


def _warn_module_files(src: Source, path: Path) -> None:
    """Warn of weight files in a folder of a module ``modules.json`` lists that are kept as folder
    files, not packed as tensors (a module's subfolder two levels down, or beside the module's own
    weights): a merged model writes them back as they are, the base's, not merged."""
    try:
        listed = {m.rstrip("/") for m in listed_modules(json.loads((path / MODULES).read_text()))}
    except (OSError, ValueError, RecursionError):
        return
    kept = sorted(n for n in src.files if n.endswith(_MODULE_WEIGHTS) and n.partition("/")[0] in listed)
    if kept:
        log.warning("%s: %s kept as folder files, not packed as the module's tensors (only a listed module folder's "
                    "weights, or one level of its subfolders', are): a merged model takes them as they are, the "
                    "base's, not merged", path, ", ".join(kept[:5]) + (f" and {len(kept) - 5} more" if len(kept) > 5
                                                                        else ""))


def _pipeline(src: Source) -> bool:
    """Whether ``src`` is a diffusers pipeline (not a sentence-transformers model, whose modules
    are beside a single model's weights)."""
    return isinstance(src, ComponentsSource) and not isinstance(src, ModulesSource)


def _parts(src: Source) -> Mapping[str, Source]:
    """A source's parts: a pipeline's components, a sentence-transformers model's top and modules;
    a single model's own weights as the top, ``""``."""
    return src.parts if isinstance(src, ComponentsSource) else {"": src}


def _matching_component(pipe: ComponentsSource, single: Source) -> str | None:
    """The component of ``pipe`` that the single model ``single`` is: the one of its folder's
    name (``unet``), else the one sharing the most tensor names with it; None when none shares any."""
    if single.root is not None and single.root.name in pipe.parts:
        return single.root.name
    names = set(single.keys())
    shared = {c: sum(n in names for n in part.keys()) for c, part in pipe.parts.items()}
    best = max(shared, key=lambda c: shared[c], default=None)
    return best if best is not None and shared[best] else None


def _as_pipeline(base: ComponentsSource, src: DictSource) -> bool:
    """Take tensors named ``COMPONENT/NAME``, each ``COMPONENT`` one of the base pipeline's, as a
    fine-tune of that pipeline: its layout the base's components' files (the base's shards where a
    component has the base's tensor names in their order, else one file of the base's name) and
    the base's folder files, so that an unpack writes a pipeline folder. False for other names.
    Of a sentence-transformers base, names of no module are the transformer's (at least one name
    must be a module's, ``2_Dense/linear.weight``: else the tensors are a single model's)."""
    names = src.keys()
    own: dict[str, list[str]] = {}
    for n in names:
        c = component_of(n, base.parts)
        rest = n[len(c) + 1:] if c else n
        if not rest:
            c, rest = "", n
        if c not in base.parts:
            return False
        own.setdefault(c, []).append(rest)
    if not any(own):
        return False
    recorded = base.layout.get("components") or {}
    shards: list[list[Any]] = []
    components: dict[str, Any] = {}
    top: dict[str, Any] = {}
    for c, inner in own.items():
        part = base.parts[c]
        runs = part.layout.get("shards") or [["model.safetensors", len(part.keys())]]
        same = inner == part.keys()
        if not same:
            runs = [[_SHARD_SUFFIX.sub("", plain_name(runs[0][0])), len(inner)]]
        if c:
            components[c] = recorded.get(c, {}) if same else {}
        elif same and "index_metadata" in base.layout:
            top["index_metadata"] = base.layout["index_metadata"]
        shards += [[_joined(c, f), n] for f, n in runs]
    src.layout = {"shards": shards, **top, "components": components}
    src.files = dict(base.files)
    log.info("%s: tensors of the base %s's %s %s, packed as its fine-tune", src.label,
             "pipeline" if _pipeline(base) else "model", "components" if _pipeline(base) else "modules",
             ", ".join(c or "(the transformer)" for c in own))
    return True


#: A shard's suffix (``-00001-of-00002``) before ``.safetensors``.
_SHARD_SUFFIX = re.compile(r"-\d+-of-\d+(?=\.safetensors$)")


def check_components(base: Source, tasks: Mapping[str, Source], *, allow_mismatch: bool = False) -> None:
    """Refuse a family that mixes diffusers pipelines and single model folders, or whose task
    holds a component whose tensors are not the base's component's (IncompatibleCheckpointsError,
    one line naming the folders and the component); warn of a component only the base, or only a
    task, has (its tensors are stored as the tensors only some tasks have are). The same of a
    sentence-transformers model's module folders (``2_Dense``), whose transformer is a single
    model: such a model and a plain model folder (no ``modules.json``, a task without the module)
    may be packed together."""
    ours = _pipeline(base)
    for task, src in tasks.items():
        if isinstance(base, ComponentsSource) and isinstance(src, DictSource) and _as_pipeline(base, src):
            continue  # the base pipeline's tensors, COMPONENT/NAME (fam.state_dict(task) edited)
        theirs = _pipeline(src)
        if ours != theirs and not allow_mismatch:
            pipe, single = (base, src) if ours else (src, base)
            assert isinstance(pipe, ComponentsSource)
            which = _matching_component(pipe, single)
            pipeline = f"a diffusers pipeline (components {', '.join(pipe.parts)})"
            whose = "the base" if ours else "the task"
            hint = (f"{whose}'s component folder {pipe.label}/{which}" if which else
                    f"the component folder of {whose} ({pipe.label}/COMPONENT) that {single.label} is")
            if ours and isinstance(src, DictSource):  # tensors: no folder to pass
                hint = f"name every tensor COMPONENT/NAME, COMPONENT one of {', '.join(pipe.parts)}"
            who = f"task {task!r}" if src.label == f"task {task!r}" else f"task {task!r} ({src.label})"
            raise IncompatibleCheckpointsError(
                f"{who}: {'a single model' if ours else pipeline}, but the base "
                f"({base.label}) is {pipeline if ours else 'a single model'}; pass pipeline folders for both, or "
                f"{hint}")
        if ours != theirs or not (ours or isinstance(base, ModulesSource) or isinstance(src, ModulesSource)):
            continue
        what = "component" if ours else "module"
        mine_all, theirs_all = _parts(base), _parts(src)
        for c, part in theirs_all.items():
            mine = mine_all.get(c)
            if not c:  # a sentence-transformers model's transformer: a single model, checked as one by the plan
                continue
            if mine is None:
                log.warning("task %r (%s): %s %r is not in the base (%s); its tensors are stored for the "
                            "tasks that have it", task, src.label, what, c, base.label)
                continue
            common = [n for n in part.keys() if n in mine]
            differ = [n for n in common if part.info(n).shape != mine.info(n).shape]
            if (not common or len(differ) * 2 > len(common)) and not allow_mismatch:
                why = (f"{len(differ)} of its {len(common)} tensors named as the base's differ in shape "
                       f"({differ[0]!r} {part.info(differ[0]).shape} vs {mine.info(differ[0]).shape})" if common
                       else "it shares no tensor name with the base's")
                raise IncompatibleCheckpointsError(
                    f"task {task!r} ({src.label}): {what} {c!r} does not look fine-tuned from the base's "
                    f"({base.label}/{c}): {why}; pass allow_mismatch=True (--allow-mismatch) to pack it anyway")
        # a single file's (or tensors') MODULE/NAME tensors are the module's, under the archive's names
        named = set() if isinstance(src, ComponentsSource) else \
            {c for c in mine_all if c and any(k.startswith(f"{c}/") for k in src.keys())}
        if named:
            log.info("task %r (%s): holds the tensors of %s %s under their archive names (%s/NAME); merged with the "
                     "base's, and unpacked as one weights file", task, src.label, what, ", ".join(map(repr, named)),
                     sorted(named)[0])
        missing = [c for c in mine_all if c and c not in theirs_all and c not in named]
        if missing:
            log.warning("task %r (%s): has no %s %s of the base (%s); stored for the tasks that have it, "
                        "with no copy of the base's: a merged %s lacks it (merge --task NAME takes a task's)",
                        task, src.label, what, ", ".join(map(repr, missing)), base.label,
                        "pipeline" if ours else "model")


def stem(obj: SourceLike) -> str:
    """The default task name of a path: the folder's name or the file's stem; a weight file of
    transformers' or diffusers' own names (``model.safetensors``, ``pytorch_model.bin``, a shard
    index) is named after its folder, as the folder itself is (for a URL, its last part less a
    checkpoint suffix, or its folder's for those names; a Hugging Face ``resolve`` URL's repository).

    >>> stem("ft/cars.safetensors"), stem("ft/cars/model.safetensors"), stem("ft/cars/")
    ('cars', 'cars', 'cars')
    """
    if isinstance(obj, (str, os.PathLike)) and is_url(obj):
        url = urllib.parse.urlsplit(os.fspath(obj))
        path = urllib.parse.unquote(url.path) if url.scheme in ("http", "https") else url.path  # as its local copy
        parts = [p for p in path.split("/") if p]  # no ?query
        name = parts[-1] if parts else ""
        if _own_weights(name) and len(parts) > 1:
            # .../REPO/resolve/REVISION/model.safetensors (the Hub's https URLs): the repository
            repo = parts[-4] if len(parts) >= 4 and parts[-3] == "resolve" else parts[-2]
            return repo.split("@", 1)[0]  # hf://org/repo@revision/...
        for suffix in (".safetensors", _TORCH_TAR, *_TORCH_SUFFIXES):
            name = name.removesuffix(suffix)
        return name
    p = Path(obj)  # type: ignore[arg-type]
    folder = p.is_dir()
    if not folder and _own_weights(p.name):  # its folder (".." and "." as the path says, links kept)
        p, folder = Path(os.path.abspath(p)).parent, True
    if folder and is_hub_repo(p):  # a cache repository's folder
        return p.name.rsplit("--", 1)[-1]
    if folder and p.parent.name == "snapshots" and p.parent.parent.name.startswith("models--"):
        return p.parent.parent.name.rsplit("--", 1)[-1]  # a Hugging Face cache snapshot: the repository's name
    return p.name if folder else p.name.removesuffix(_TORCH_TAR) if p.name.endswith(_TORCH_TAR) else p.stem


def stems(objs: Sequence[SourceLike]) -> list[str]:
    """The default task names of several paths: each one's :func:`stem`, but files or folders that
    share a name (nanoGPT's ``out-a/ckpt.pt``, ``out-b/ckpt.pt``; Trainer's ``run-a/checkpoint-500``,
    ``run-b/checkpoint-500``) each named after its folder, or the nearest folders up that differ
    (Lightning's ``version_0/checkpoints/last.ckpt``, ``version_1/...``: ``version_0``, ``version_1``).

    >>> stems(["runs/out-a/ckpt.pt", "runs/out-b/ckpt.pt", "ft/cars.pt"])
    ['out-a', 'out-b', 'cars']
    """
    names = [stem(o) for o in objs]
    out = list(names)
    paths = {i: o for i, o in enumerate(objs)
             if isinstance(o, (str, os.PathLike)) and not is_url(o) and Path(o).exists()}
    for name in set(names):
        at = [i for i in paths if names[i] == name]
        if len(at) < 2:
            continue
        folders = [Path(os.path.abspath(paths[i])).parent for i in at]
        for _ in range(STEM_LEVELS):  # the nearest folders that tell them apart (version_*/checkpoints/last.ckpt)
            up = [stem(f) or names[i] for i, f in zip(at, folders)]  # ('': the root folder, which has no name)
            if len(set(up)) == len(up):
                for i, u in zip(at, up):
                    out[i] = u
                break
            folders = [f.parent for f in folders]
    return out  # (none that differ: one path given twice, whose error names it)


#: How many folders up :func:`stems` looks for names that tell paths of one name apart.
STEM_LEVELS = 3


def _own_weights(name: str) -> bool:
    """Whether a file name is one of transformers' or diffusers' weight names (a shard index, a
    variant, a shard): a file that names nothing but its folder's model."""
    return bool(is_index_name(name) or _TRANSFORMERS_WEIGHTS.fullmatch(name))
