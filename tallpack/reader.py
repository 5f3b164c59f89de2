"""The reader: open an archive, rebuild one task's tensors on demand.

Only the chunks a call needs are read (pages of a memory-mapped file locally, range reads
remotely), and each chunk's checksum is checked before it is decoded. How a tensor is rebuilt is
its encoding's business (:mod:`tallpack.encodings`); the reader only dispatches.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from .arrays import ArrayRef
from .container import ContainerReader
from .dtypes import bytes_to_tensor
from .encodings import TaskTensor, TensorEntry, encoding_for, iter_arrays
from .errors import FormatError, TallpackError, TaskNotFoundError, TensorNotFoundError, UnsupportedVersionError
from .manifest import Manifest, TaskInfo
from .merged import MergeParts
from .report import summarize
from .storage import open_bytes

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
        for name, key, ref in iter_arrays(self.manifest.tensors):
            container.register(ref, f"tensor {name!r} ({key})")
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

    @property
    def size(self) -> int:
        """The archive's size in bytes."""
        return self._c.source.size

    def task_info(self, task: str) -> TaskInfo:
        """A task's lambda, mask density, fidelity figures and source."""
        try:
            return self._tasks[task]
        except (KeyError, TypeError):
            raise TaskNotFoundError(
                f"{self.name}: no task {task!r}; tasks are {', '.join(self.tasks)}"
            ) from None

    def keys(self, task: str) -> list[str]:
        """The task's tensor names, in its checkpoint's order."""
        return list(self.task_info(task).keys)

    def _entry(self, task: str, name: str) -> tuple[TensorEntry, TaskTensor]:
        self.task_info(task)
        entry = self._tensors.get(name) if isinstance(name, str) else None
        if entry is None or task not in entry.tasks:
            raise TensorNotFoundError(f"{self.name}: task {task!r} has no tensor {name!r}")
        return entry, entry.tasks[task]

    # -- reading -----------------------------------------------------------------------------
    def read_array(self, ref: ArrayRef, where: str) -> torch.Tensor:
        """One stored array, decoded, as a tensor of its dtype and shape."""
        try:
            buf = self._c.read_array(ref, where)
        except MemoryError:
            raise FormatError(f"{self.name}: {where}: too large to decode ({ref.nbytes} bytes)") from None
        try:
            return bytes_to_tensor(buf, ref.dtype, ref.shape)
        except FormatError as e:
            raise type(e)(f"{self.name}: {where}: {e}") from None

    def get_tensor(self, task: str, name: str) -> torch.Tensor:
        """One tensor of one task, reading only the chunks it needs."""
        entry, tt = self._entry(task, name)
        where = f"task {task!r}, tensor {name!r}"
        encoding = encoding_for(tt.encoding)
        if encoding is None:
            raise UnsupportedVersionError(
                f"{self.name}: {where} is stored as {tt.encoding!r}, which this tallpack cannot read; upgrade it"
            )
        return encoding.rebuild(self.read_array, entry, tt, where)

    def state_dict(self, task: str, *, lazy: bool = False) -> dict[str, torch.Tensor] | "LazyStateDict":
        """The task's whole state dict, with its original names, shapes and dtypes.

        With ``lazy=True``, a read-only mapping that rebuilds each tensor when it is indexed.
        """
        sd = LazyStateDict(self, task)
        return sd if lazy else {k: sd[k] for k in sd}

    def base_tensor(self, name: str) -> torch.Tensor | None:
        """theta_0 of a tensor, when the archive holds it (merged and base-only tensors)."""
        entry = self._tensors.get(name)
        if entry is None or "base" not in entry.arrays:
            return None
        return self.read_array(entry.arrays["base"], f"tensor {name!r} (base)")

    # -- merged models -----------------------------------------------------------------------
    def merge_parts(self, method: str, *, k: int = 2) -> MergeParts:
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
    def chunk_count(self) -> int:
        """Number of stored chunks."""
        return sum(len(ref.chunks) for _, _, ref in iter_arrays(self.manifest.tensors))

    def verify(self) -> list[str]:
        """Check every chunk's checksum and decode it, that padding is zero and that the header's
        version is the manifest's; returns the problems found (empty: intact)."""
        problems = self._c.verify_padding()
        if tuple(self.manifest.format_version) != self.format_version:  # the header's minor too
            problems.append(f"{self.name}: header says format {self.format_version[0]}.{self.format_version[1]}, "
                            f"manifest says {self.manifest.format_version[0]}.{self.manifest.format_version[1]}")
        for name, key, ref in iter_arrays(self.manifest.tensors):
            where = f"tensor {name!r} ({key})"
            try:
                for i in range(len(ref.chunks)):
                    self._c.read_chunk(ref, i, where)
            except TallpackError as e:
                problems.append(str(e))
        return problems

    def summary(self) -> dict[str, Any]:
        """What ``tallpack inspect`` shows: tasks, sizes, ratios, densities, fidelity."""
        return summarize(self.manifest, path=self.name, archive_bytes=self.size,
                         format_version=self.format_version)


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


def open(path: str | os.PathLike, *, storage_options: dict[str, Any] | None = None) -> Archive:  # noqa: A001
    """Open an archive for reading: a local path, or a URL that fsspec understands (each
    chunk is then one range request; ``storage_options`` go to fsspec).

    >>> with tallpack.open("family.tallpack") as fam:
    ...     sd = fam.state_dict("cars")
    >>> tallpack.open("s3://models/family.tallpack", storage_options={"anon": True})
    """
    source = open_bytes(path, storage_options)
    try:
        return Archive(ContainerReader(source, os.fspath(path)))
    except BaseException:
        source.close()
        raise
