"""The reader: open an archive, rebuild one task's tensors on demand.

Only the chunks a call needs are read (pages of a memory-mapped file locally, range reads
remotely), and each chunk's checksum is checked before it is decoded.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from .container import ArrayRef, ContainerReader, LocalFile
from .dtypes import bytes_to_tensor, numel, torch_dtype
from .errors import (FormatError, TallpackError, TaskNotFoundError,
                     TensorNotFoundError, UnsupportedVersionError)
from .manifest import Manifest, TaskInfo, TaskTensor, TensorEntry
from .merging import MERGED_MODELS, apply_direction, default_alpha, merge_direction
from .tall import reconstruct

log = logging.getLogger(__name__)


class Archive:
    """An open ``.tallpack`` archive. Use :func:`tallpack.open`.

    >>> with tallpack.open("family.tallpack") as fam:
    ...     fam.tasks, fam.keys("cars")[:3]
    ...     w = fam.get_tensor("cars", "encoder.layer.3.weight")
    """

    def __init__(self, container: ContainerReader):
        self._c = container
        self.name = container.name
        self.manifest = Manifest.from_dict(container.manifest)
        if self.manifest.format_version[0] != container.version[0]:
            raise FormatError(f"{self.name}: manifest says format {self.manifest.format_version}, "
                              f"header says {container.version}")
        self._tensors: dict[str, TensorEntry] = {t.name: t for t in self.manifest.tensors}
        self._tasks: dict[str, TaskInfo] = {t.name: t for t in self.manifest.tasks}
        for entry in self.manifest.tensors:
            for key, ref in entry.arrays():
                container.register(ref, f"tensor {entry.name!r} ({key})")
        container.check_layout()

    # -- context manager -------------------------------------------------------------------
    def __enter__(self) -> "Archive":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._c.close()

    def __repr__(self) -> str:
        return f"<tallpack.Archive {self.name!r}: {len(self.tasks)} tasks>"

    # -- what is inside ----------------------------------------------------------------------
    @property
    def tasks(self) -> tuple[str, ...]:
        """Task names, in pack order."""
        return tuple(self._tasks)

    @property
    def format_version(self) -> tuple[int, int]:
        return self._c.version

    def task_info(self, task: str) -> TaskInfo:
        """A task's lambda, mask density, fidelity figures and source."""
        try:
            return self._tasks[task]
        except KeyError:
            raise TaskNotFoundError(
                f"{self.name}: no task {task!r}; tasks are {', '.join(self.tasks)}"
            ) from None

    def keys(self, task: str) -> list[str]:
        """The task's tensor names, in its checkpoint's order."""
        return list(self.task_info(task).keys)

    def _entry(self, task: str, name: str) -> tuple[TensorEntry, TaskTensor]:
        self.task_info(task)
        entry = self._tensors.get(name)
        if entry is None or task not in entry.tasks:
            raise TensorNotFoundError(f"{self.name}: task {task!r} has no tensor {name!r}")
        return entry, entry.tasks[task]

    # -- reading -----------------------------------------------------------------------------
    def _array(self, ref: ArrayRef, where: str) -> torch.Tensor:
        try:
            buf = self._c.read_array(ref, where)
        except MemoryError:
            raise FormatError(f"{self.name}: {where}: too large to decode ({ref.nbytes} bytes)") from None
        return bytes_to_tensor(buf, ref.dtype, ref.shape)

    def get_tensor(self, task: str, name: str) -> torch.Tensor:
        """One tensor of one task, reading only the chunks it needs."""
        entry, tt = self._entry(task, name)
        where = f"task {task!r}, tensor {name!r}"
        if tt.encoding == "tall":
            assert entry.base is not None and entry.merged is not None and tt.mask is not None
            base = self._array(entry.base, where + " (base)")
            merged = self._array(entry.merged, where + " (merged)")
            mask = self._array(tt.mask, where + " (mask)")
            return reconstruct(base, mask, merged, torch_dtype(tt.dtype))
        if tt.encoding == "dense":
            assert tt.data is not None
            return self._array(tt.data, where)
        if tt.encoding == "shared":
            assert entry.data is not None
            return self._array(entry.data, where)
        raise UnsupportedVersionError(
            f"{self.name}: {where} is stored as {tt.encoding!r}, which this tallpack cannot read; upgrade it"
        )

    def state_dict(self, task: str, *, lazy: bool = False) -> dict[str, torch.Tensor] | "LazyStateDict":
        """The task's whole state dict, with its original names, shapes and dtypes.

        With ``lazy=True``, a read-only mapping that rebuilds each tensor when it is indexed.
        """
        sd = LazyStateDict(self, task)
        return sd if lazy else {k: sd[k] for k in sd}

    def base_tensor(self, name: str) -> torch.Tensor | None:
        """theta_0 of a tensor, when the archive holds it (merged and base-only tensors)."""
        entry = self._tensors.get(name)
        if entry is None or entry.base is None:
            return None
        return self._array(entry.base, f"tensor {name!r} (base)")

    # -- merged models -----------------------------------------------------------------------
    def merge_parts(self, method: str, *, k: int = 2) -> "MergeParts":
        """The pieces of a merged model that do not depend on alpha (base and direction per
        tensor), computed once; ``MergeParts.state_dict(alpha)`` then builds models quickly."""
        return MergeParts(self, method, k)

    def merged(self, method: str = "consensus-ta", *, k: int = 2, alpha: float | None = None,
               task: str | None = None) -> dict[str, torch.Tensor]:
        """The multi-task model: ``theta_0 + alpha * d`` for every tensor all tasks share.

        ``method`` is ``ta``, ``ties``, ``consensus-ta`` or ``consensus-ties`` (the archive must
        have been packed with the matching ``merge``). Tensors equal in every task come back as
        stored. With ``task``, the task's own tensors (its classification head) are added, in
        the task's order, so the result loads into that task's model. ``alpha`` defaults to the
        data-free :func:`tallpack.merging.default_alpha`.

        >>> sd = fam.merged("consensus-ta", k=2, alpha=0.4)
        """
        return self.merge_parts(method, k=k).state_dict(alpha, task=task)

    # -- checking ----------------------------------------------------------------------------
    def verify(self) -> list[str]:
        """Check every chunk's checksum and decode it, and that padding is zero; returns the
        problems found (empty: intact)."""
        problems = self._c.verify_padding()
        for entry in self.manifest.tensors:
            for key, ref in entry.arrays():
                where = f"tensor {entry.name!r} ({key})"
                try:
                    for i in range(len(ref.chunks)):
                        self._c.read_chunk(ref, i, where)
                except TallpackError as e:
                    problems.append(str(e))
        return problems

    def summary(self) -> dict[str, Any]:
        """What ``tallpack inspect`` shows: tasks, sizes, ratios, densities, fidelity."""
        m = self.manifest
        stored = {"base": 0, "merged": 0, "masks": 0, "shared": 0, "task_own": 0, "counts": 0}
        mask_bytes = {t: 0 for t in self.tasks}
        mask_bits_bound = {t: 0.0 for t in self.tasks}
        masked = {t: 0 for t in self.tasks}
        for e in m.tensors:
            for key, ref in (("base", e.base), ("merged", e.merged), ("counts", e.counts), ("shared", e.data)):
                if ref is not None:
                    stored[key] += ref.stored_nbytes
            for t, tt in e.tasks.items():
                if tt.data is not None:
                    stored["task_own"] += tt.data.stored_nbytes
                if tt.mask is not None:
                    n = numel(tt.shape)
                    stored["masks"] += tt.mask.stored_nbytes
                    mask_bytes[t] += tt.mask.stored_nbytes
                    masked[t] += n
                    p = (tt.ones or 0) / n if n else 0.0
                    mask_bits_bound[t] += n * _entropy(p)
        archive_bytes = self._c.source.size
        source_bytes = int(m.stats.get("source_bytes", 0))
        tasks = []
        for info in m.tasks:
            n = masked[info.name]
            tasks.append({
                "name": info.name, "lambda": info.lam, "density": info.density,
                "fidelity": info.fidelity, "tensors": len(info.keys),
                "source_bytes": info.source.get("bytes"),
                "mask_bytes": mask_bytes[info.name],
                "mask_bits_per_param": 8 * mask_bytes[info.name] / n if n else None,
                "mask_entropy_bits_per_param": mask_bits_bound[info.name] / n if n else None,
            })
        return {
            "path": self.name,
            "format_version": f"{self.format_version[0]}.{self.format_version[1]}",
            "writer": m.writer,
            "merge": m.merge,
            "archive_bytes": archive_bytes,
            "source_bytes": source_bytes,
            "ratio": source_bytes / archive_bytes if archive_bytes else None,
            "stored_bytes": stored,
            "kinds": {k: sum(e.kind == k for e in m.tensors) for k in ("merged", "shared", "task-own", "base-only")},
            "tasks": tasks,
            "metadata": m.metadata,
        }


class MergeParts:
    """Alpha-independent parts of a merged model: for each shared tensor, theta_0 and the
    direction d (float32), or the stored tensor itself when every task has it unchanged."""

    def __init__(self, archive: Archive, method: str, k: int):
        if method not in MERGED_MODELS:
            raise TallpackError(f"unknown merge method {method!r}; choose one of {', '.join(MERGED_MODELS)}")
        packed = archive.manifest.merge.get("method")
        if MERGED_MODELS[method] != packed:
            raise TallpackError(
                f"{archive.name}: {method} needs an archive packed with --merge {MERGED_MODELS[method]}, "
                f"this one was packed with --merge {packed}"
            )
        if not isinstance(k, int) or k < 0:
            raise TallpackError(f"k must be a non-negative integer, got {k!r}")
        self.archive, self.method, self.k = archive, method, k
        tasks = set(archive.tasks)
        self.parts: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        for e in archive.manifest.tensors:
            if set(e.tasks) != tasks:
                continue
            if e.kind == "merged":
                base = archive._array(e.base, f"tensor {e.name!r} (base)")
                tau = archive._array(e.merged, f"tensor {e.name!r} (merged)")
                masks = counts = None
                if method.startswith("consensus"):
                    masks = [archive._array(tt.mask, f"task {t!r}, tensor {e.name!r} (mask)")
                             for t, tt in e.tasks.items()]
                if method == "ties":
                    if e.counts is None:
                        raise FormatError(f"{archive.name}: tensor {e.name!r} has no TIES counts")
                    counts = archive._array(e.counts, f"tensor {e.name!r} (counts)")
                self.parts[e.name] = (base, merge_direction(method, tau, masks, counts, k))
            elif e.kind == "shared" and e.data is not None:
                self.parts[e.name] = (archive._array(e.data, f"tensor {e.name!r}"), None)

    def state_dict(self, alpha: float | None = None, *, task: str | None = None) -> dict[str, torch.Tensor]:
        """The merged model at ``alpha``; with ``task``, completed with that task's own tensors."""
        if alpha is None:
            alpha = default_alpha(self.method, len(self.archive.tasks))
        if not math.isfinite(alpha):
            raise TallpackError(f"alpha must be a finite number, got {alpha}")
        merged = {name: t if d is None else apply_direction(t, d, alpha) for name, (t, d) in self.parts.items()}
        if task is None:
            return merged
        return {name: merged[name] if name in merged else self.archive.get_tensor(task, name)
                for name in self.archive.keys(task)}


def _entropy(p: float) -> float:
    if p <= 0 or p >= 1:
        return 0.0
    return -(p * math.log2(p) + (1 - p) * math.log2(1 - p))


class LazyStateDict(Mapping):
    """A read-only mapping over one task's tensors, each rebuilt when indexed."""

    def __init__(self, archive: Archive, task: str):
        self._archive = archive
        self._task = task
        self._keys = archive.keys(task)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._archive.get_tensor(self._task, name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def _byte_source(path: str | os.PathLike, storage_options: dict[str, Any] | None):
    text = os.fspath(path)
    if "://" in text and not text.startswith("file://"):
        from .remote import RemoteFile
        return RemoteFile(text, storage_options)
    return LocalFile(text.removeprefix("file://"))


def open(path: str | os.PathLike, *, storage_options: dict[str, Any] | None = None) -> Archive:  # noqa: A001
    """Open an archive for reading: a local path, or a URL that fsspec understands (each
    chunk is then one range request; ``storage_options`` go to fsspec).

    >>> with tallpack.open("family.tallpack") as fam:
    ...     sd = fam.state_dict("cars")
    >>> tallpack.open("s3://models/family.tallpack", storage_options={"anon": True})
    """
    source = _byte_source(path, storage_options)
    try:
        return Archive(ContainerReader(source, os.fspath(path)))
    except BaseException:
        source.close()
        raise
