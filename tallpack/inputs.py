"""The inputs of a pack: the opened base and task checkpoints and their plan, streamed tensor by
tensor (and block by block for the merge method's statistics)."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

from ._torch import torch
from .dtypes import torch_dtype
from .elements import numel
from .encodings import Item
from .errors import InvalidArgumentError
from .manifest import task_name_problem
from .plan import Kind, Plan, TensorPlan, aligned_base, make_plan, resolve, resolve_blocks, strip_prefix
from .sources import (Source, SourceLike, check_components, deepspeed_tag, is_hub_repo, is_training_state, open_source,
                      stems)
from .storage import is_url
from .tall import blocks, compiled_kind, elements, in_tall_range

#: What ``tallpack.pack`` takes as its tasks: a mapping of names to checkpoints, or a list of
#: paths (each named after its stem).
TasksLike = Mapping[str, SourceLike] | Sequence[SourceLike]


#: What makes a folder a model's (or a pipeline's, or sentence-transformers'): a weight file, a
#: shard index (``*.index.json``), or the file that lists its parts.
_WEIGHTS = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pth.tar", ".index.json")
_PARTS = ("model_index.json", "modules.json")


def _holds_model(folder: Path) -> bool:
    """Whether ``folder`` holds a model's files itself (a trainer's state files, ``optimizer.bin``, are none)."""
    try:
        return any((f.name in _PARTS or f.name.endswith(_WEIGHTS)) and not is_training_state(f.name)
                   for f in folder.iterdir() if not f.is_dir())
    except OSError:
        return False


def model_folders(path: SourceLike) -> list[Path]:
    """The model folders in ``path`` when it is a local folder that holds no model itself but
    folders that do (a folder of fine-tunes, given as one task), sorted; else ``[]``.

    >>> model_folders("ft")   # ft/cars/model.safetensors, ft/dtd/model.safetensors
    [PosixPath('ft/cars'), PosixPath('ft/dtd')]
    """
    if not isinstance(path, (str, os.PathLike)) or is_url(path):
        return []
    folder = Path(path)
    try:
        if not folder.is_dir() or _holds_model(folder) or is_hub_repo(folder):
            return []
        if folder.suffix == ".ckpt" and deepspeed_tag(folder) is not None:  # Lightning's: its model states file is
            return []  # no model (the LightningModule's wrapper's names): opening it names the conversion
        # a Hugging Face cache (~/.cache/huggingface/hub) holds repository folders, each a model's
        return sorted(d for d in folder.iterdir() if d.is_dir() and (_holds_model(d) or is_hub_repo(d)))
    except OSError:  # unreadable: opening it says why
        return []


def lone_file(folders: Sequence[Path]) -> str | None:
    """The file name every one of ``folders`` holds as its only weights, when that is a PyTorch
    file (nanoGPT's ``ckpt.pt``): a folder of no weight names a loader knows, whose file must be
    given itself (``runs/*/ckpt.pt``); else None."""
    found = set()
    for d in folders:
        try:
            files = [f.name for f in d.iterdir() if not f.is_dir() and (f.name in _PARTS or f.name.endswith(_WEIGHTS))
                     and not is_training_state(f.name)]
        except OSError:
            return None
        if len(files) != 1 or not files[0].endswith((".pt", ".pth", ".ckpt", ".pth.tar")):
            return None
        found.add(files[0])
    return found.pop() if len(found) == 1 else None


def open_tasks(tasks: TasksLike) -> dict[str, Source]:
    """Name and open every task; InvalidArgumentError for bad or repeated names, or a folder of
    model folders given as one task."""
    if isinstance(tasks, Mapping):
        items = list(tasks.items())
    else:
        for t in tasks:
            if isinstance(t, Mapping):
                raise InvalidArgumentError("a task given as a dict of tensors needs a name: pass {name: dict}")
        items = list(zip(stems(tasks), tasks))
    out: dict[str, Source] = {}
    try:
        named = isinstance(tasks, Mapping)  # else each name is taken from a path: said so, with how to name it
        for name, obj in items:
            why = task_name_problem(name)
            if why is not None:
                raise InvalidArgumentError(f"bad task name {name!r}: {why}" if named else
                                           f"bad task name {name!r}, taken from the path {obj}: {why}; "
                                           "name the tasks: pass a dict, {NAME: PATH}")
            if name in out:
                raise InvalidArgumentError(f"task {name!r} given twice; name tasks with NAME=PATH" if named else
                                           f"task {name!r} given twice (a name taken from the path {obj}); "
                                           "name the tasks: pass a dict, {NAME: PATH}")
            inside = model_folders(obj)
            if inside:
                shown = ", ".join(d.name for d in inside[:3]) + (", ..." if len(inside) > 3 else "")
                lone = lone_file(inside)
                raise InvalidArgumentError(
                    f"task {name!r}: {obj} holds no model but {len(inside)} model folder"
                    f"{'s' if len(inside) > 1 else ''} ({shown}): give each "
                    + (f"one's {lone} as a task (a list of their paths" if lone else "as a task (a list of their paths")
                    + " names each after its folder)")
            out[name] = open_source(obj, label=f"task {name!r}")
            out[name].task = name  # named by the errors of its files
    except BaseException:
        for s in out.values():
            s.close()
        raise
    return out


#: A tensor planned as merged whose copies (the base's and every task's) take more than this many
#: bytes together, and more than one block of ``chunk_elements``, is read a block at a time
#: (``Streamed``): the packer then holds a block of each copy, not T + 1 whole copies (an
#: embedding of 1 GB with 20 tasks: 21 GB). Smaller tensors are read whole, once.
HOLD_BYTES = 256 << 20


def _read(src: Source, name: str) -> torch.Tensor:
    """Tensor ``name`` of ``src`` in C order, as the packer takes it (views it as bytes): a view of a
    file's storage in another order (``x[::2]``, a transpose) made contiguous."""
    return src.get(name).contiguous()


class Streamed:
    """One tensor's inputs read from their files a block at a time (``encodings.Stream``)."""

    def __init__(self, name: str, base: Source, tasks: list[Source]):
        self.name, self.base, self.tasks = name, base, tasks
        self.shape: tuple[int, ...] = base.info(name).shape
        self.dtypes: tuple[torch.dtype | None, tuple[torch.dtype, ...]] = (
            torch_dtype(base.info(name).dtype), tuple(torch_dtype(s.info(name).dtype) for s in tasks))

    def whole(self) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        return _read(self.base, self.name), [_read(s, self.name) for s in self.tasks]

    def task(self, i: int) -> torch.Tensor:
        return _read(self.tasks[i], self.name)

    def block(self, start: int, stop: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        name = self.name
        return self.base.get_range(name, start, stop), [s.get_range(name, start, stop) for s in self.tasks]

    def pair(self, i: int, start: int, stop: int, base: bool) -> tuple[torch.Tensor | None, torch.Tensor]:
        name = self.name
        return (self.base.get_range(name, start, stop) if base else None), self.tasks[i].get_range(name, start, stop)


class PackInputs:
    """The opened inputs of a pack: base, tasks and their plan.

    ``load`` reads one tensor of every task and settles its kind (``plan.resolve``) once; every
    later stage uses that decision.
    """

    def __init__(self, base: SourceLike, tasks: TasksLike, *, allow_mismatch: bool = False,
                 chunk_elements: int, strip: str | None = None, exact: bool = False):
        self.base = open_source(base, label="base")
        self.tasks: dict[str, Source] = {}
        try:
            self.tasks = open_tasks(tasks)
            if strip is not None:  # (``exact``: whether the tasks' files are recorded, which names may not change)
                self.base, self.tasks = strip_prefix(self.base, self.tasks, strip, exact=exact)
            check_components(self.base, self.tasks, allow_mismatch=allow_mismatch)
            self.base = aligned_base(self.base, self.tasks)
            self.plan: Plan = make_plan(self.base, self.tasks, allow_mismatch=allow_mismatch)
        except BaseException:  # the inputs' open files closed now, not when collected
            self.close()
            raise
        self.chunk_elements = chunk_elements
        self._kinds: dict[str, Kind] = {}

    def load(self, entry: TensorPlan) -> Item:
        """One tensor of the base (when it has it) and of every task that has it, with its kind."""
        if entry.kind is Kind.BASE_ONLY:
            base = _read(self.base, entry.name) if entry.in_base else None
            return Item(entry.name, entry.kind.value, entry.kind.value, (), base, [])
        stream = self._stream(entry)
        base = _read(self.base, entry.name) if entry.in_base and stream is None else None
        if stream is not None:
            kind = self._kinds.get(entry.name)
            if kind is None:
                same = len(set(stream.dtypes[1])) == 1
                ce, n = self.chunk_elements, numel(stream.shape)
                kind = self._kinds[entry.name] = resolve_blocks(
                    entry.kind, len(entry.tasks), same, (stream.block(a, min(n, a + ce)) for a in range(0, n, ce)))
            if kind is Kind.SHARED:  # every task's copy the same, bit for bit: one read serves them all
                first = _read(stream.tasks[0], entry.name)
                return Item(entry.name, entry.kind.value, kind.value, entry.tasks, _read(self.base, entry.name),
                            [first] * len(entry.tasks))
            return Item(entry.name, entry.kind.value, kind.value, entry.tasks, None, [], stream)
        thetas = [_read(self.tasks[t], entry.name) for t in entry.tasks]
        kind = self._kinds.get(entry.name)
        if kind is None:
            kind = self._kinds[entry.name] = resolve(entry.kind, base, thetas)
        return Item(entry.name, entry.kind.value, kind.value, entry.tasks, base, thetas)

    def held_bytes(self, entry: TensorPlan) -> int:
        """The bytes :meth:`load` reads into memory for ``entry`` at most: every copy it reads
        whole (a streamed tensor's are read a block at a time when written)."""
        if entry.kind is not Kind.BASE_ONLY and self._stream(entry) is not None:
            return 0
        held = self.base.info(entry.name).nbytes if entry.in_base else 0
        return held + sum(self.tasks[t].info(entry.name).nbytes for t in entry.tasks)

    def _stream(self, entry: TensorPlan) -> Streamed | None:
        """The tensor's inputs to read a block at a time (see HOLD_BYTES), or None to read them whole."""
        if entry.kind is not Kind.MERGED or not entry.in_base:
            return None
        name, srcs = entry.name, [self.tasks[t] for t in entry.tasks]
        info = self.base.info(name)
        if (numel(info.shape) <= self.chunk_elements or info.nbytes + sum(s.info(name).nbytes for s in srcs) <= HOLD_BYTES
                or any(s.info(name).shape != info.shape for s in srcs)
                or not all(s.reads_ranges(name) for s in (self.base, *srcs))):
            return None
        return Streamed(name, self.base, srcs)

    def merged_items(self) -> Iterator[Item]:
        """Every tensor stored as ``merged``, loaded."""
        for entry in self.plan.tensors:
            if entry.kind is Kind.MERGED and self._kinds.get(entry.name, Kind.MERGED) is Kind.MERGED:
                item = self.load(entry)
                if item.kind == Kind.MERGED:
                    yield item

    def passes(self) -> Iterator[list[torch.Tensor]]:
        """One streaming pass, block by block, over the task vectors of every finite tensor planned
        as merged: the merge method's statistics (TIES' thresholds) cover the tensors stored once
        because every task left them unchanged, as in the official code's flattened model."""
        for item in self._counted():
            for _, base, thetas in item.blocks(self.chunk_elements):
                assert base is not None  # (planned merged: the base has it)
                for _, taus in blocks(base, thetas, self.chunk_elements):
                    yield taus

    def input_passes(self) -> Iterator[tuple[str, np.ndarray | None, list[np.ndarray]]]:
        """:meth:`passes` as ``merging.InputPasses``: the blocks as the inputs hold them where the
        compiled loops take them (``compiled_kind``), so that no task vector is written to memory;
        elsewhere, their float32 task vectors."""
        ce = self.chunk_elements
        for item in self._counted():
            for _, base, thetas in item.blocks(ce):
                assert base is not None  # (planned merged: the base has it)
                kind = compiled_kind(base, thetas)
                if kind is None:
                    for _, taus in blocks(base, thetas, ce):
                        yield "float32", None, [t.numpy() for t in taus]
                else:
                    yield kind, elements(base), [elements(x) for x in thetas]

    def _counted(self) -> Iterator[Item]:
        """The tensors the merge method's statistics cover, loaded (see :meth:`passes`)."""
        for entry in self.plan.tensors:
            if entry.kind is not Kind.MERGED:
                continue
            item = self.load(entry)
            if item.kind == Kind.MERGED or (item.kind == Kind.SHARED and in_tall_range(*_held(item))):
                yield item

    @property
    def source_bytes(self) -> int:
        return self.base.nbytes + sum(s.nbytes for s in self.tasks.values())

    def close(self) -> None:
        for s in (self.base, *self.tasks.values()):
            s.close()


def _held(item: Item) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A tensor planned as merged, its base and tasks' copies held whole."""
    assert item.base is not None  # (planned merged: the base has it)
    return item.base, item.thetas
