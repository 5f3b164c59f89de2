"""The packer: stream a family through the plan, the merge method and the masks into a container.

Memory is bounded by one tensor of every task at a time (the native tensors) plus float32 work
buffers of one chunk per task, never by the family's size.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .codecs import Chain, dense_chain, mask_chain
from .container import DEFAULT_CHUNK_ELEMENTS, MAJOR, MINOR, ContainerWriter
from .dtypes import all_equal, dtype_name, itemsize, tensor_to_bytes
from .errors import TallpackError
from .manifest import Manifest, TaskInfo, TaskTensor, TensorEntry
from .merging import MergeMethod, get_method
from .plan import Plan, TensorPlan, make_plan
from .selection import Evaluator, select_lambdas
from .sources import Source, SourceLike, open_source, stem
from .tall import DEFAULT_LAMBDA, Fidelity, all_finite, tall_mask, task_vector

log = logging.getLogger(__name__)

def check_task_name(name: object) -> str:
    """A task name must be usable as a file name and on the command line: non-empty, no '/',
    '\\', '=', control characters or edge spaces, and not '.' or '..'."""
    if (not isinstance(name, str) or not name or name != name.strip() or name in (".", "..")
            or any(c in name for c in "/\\=") or not name.isprintable()):
        raise TallpackError(f"bad task name {name!r}: use a non-empty file-name-safe name without '=', '/' or '\\'")
    return name


def _task_sources(tasks: Mapping[str, SourceLike] | Sequence[SourceLike]) -> dict[str, Source]:
    if isinstance(tasks, Mapping):
        items = list(tasks.items())
    else:
        items = []
        for t in tasks:
            if isinstance(t, Mapping):
                raise TallpackError("a task given as a dict of tensors needs a name: pass {name: dict}")
            items.append((stem(t), t))
    out: dict[str, Source] = {}
    for name, obj in items:
        check_task_name(name)
        if name in out:
            raise TallpackError(f"task {name!r} given twice; name tasks with NAME=PATH")
        out[name] = open_source(obj, label=f"task {name!r}")
    return out


def _lambdas(lambdas: float | Mapping[str, float], tasks: Sequence[str]) -> dict[str, float]:
    if isinstance(lambdas, Mapping):
        unknown = set(lambdas) - set(tasks)
        if unknown:
            raise TallpackError(f"lambda given for unknown task(s) {sorted(unknown)}; tasks are {list(tasks)}")
        out = {t: float(lambdas.get(t, DEFAULT_LAMBDA)) for t in tasks}
    else:
        out = {t: float(lambdas) for t in tasks}
    for t, lam in out.items():
        if not math.isfinite(lam) or lam < 0:
            raise TallpackError(f"task {t!r}: lambda must be a finite number >= 0, got {lam}")
    return out


class PackInputs:
    """The opened inputs of a pack: base, tasks and their plan, with block-wise streaming."""

    def __init__(self, base: SourceLike, tasks, *, allow_mismatch: bool = False,
                 chunk_elements: int = DEFAULT_CHUNK_ELEMENTS):
        self.base = open_source(base, label="base")
        self.tasks = _task_sources(tasks)
        self.plan: Plan = make_plan(self.base, self.tasks, allow_mismatch=allow_mismatch)
        self.chunk_elements = chunk_elements

    def load(self, entry: TensorPlan) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        base = self.base.get(entry.name) if entry.in_base else None
        return base, [self.tasks[t].get(entry.name) for t in entry.tasks]

    def blocks(self, base: torch.Tensor, thetas: list[torch.Tensor]) -> Iterator[tuple[torch.Tensor, list[torch.Tensor]]]:
        """(base block, float32 task vectors) for each chunk of a merged tensor."""
        b_flat = base.reshape(-1)
        flats = [t.reshape(-1) for t in thetas]
        for a in range(0, b_flat.numel(), self.chunk_elements):
            b = b_flat[a : a + self.chunk_elements]
            yield b, [task_vector(f[a : a + self.chunk_elements], b) for f in flats]

    def passes(self) -> Iterator[list[torch.Tensor]]:
        """One streaming pass over every maskable tensor's task vectors, block by block."""
        for entry in self.plan.tensors:
            if entry.kind == "merged":
                base, thetas = self.load(entry)
                if all_finite(base, thetas):
                    for _, taus in self.blocks(base, thetas):
                        yield taus

    @property
    def source_bytes(self) -> int:
        return self.base.nbytes + sum(s.nbytes for s in self.tasks.values())

    def close(self) -> None:
        for s in (self.base, *self.tasks.values()):
            s.close()


def pack(
    base: SourceLike,
    tasks: Mapping[str, SourceLike] | Sequence[SourceLike],
    out: str | os.PathLike,
    *,
    lambdas: float | Mapping[str, float] = DEFAULT_LAMBDA,
    merge: str | MergeMethod = "ta",
    ties_top_k: float = 0.2,
    evaluate: Evaluator | None = None,
    lambda_grid: Sequence[float] | None = None,
    codec: str = "bytegroup-zstd",
    level: int = 3,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    keep_base_only: bool = False,
    allow_mismatch: bool = False,
    metadata: Mapping[str, Any] | None = None,
    threads: int | None = None,
    progress: bool = False,
) -> Manifest:
    """Pack a base model and its fine-tunes into one ``.tallpack`` archive.

    ``tasks`` maps names to checkpoints (paths, folders or dicts of tensors); a list takes each
    path's stem as its name. ``lambdas`` is one value or one per task; with ``evaluate`` each
    task's lambda is chosen from ``lambda_grid`` by its score instead. ``merge`` is ``"ta"`` or
    ``"ties"``. Returns the archive's manifest.

    >>> pack("base/", {"cars": "ft/cars", "dtd": "ft/dtd"}, "family.tallpack", lambdas=0.4)
    """
    try:
        dense_chain(codec, 4, level)
        method = get_method(merge, top_k=ties_top_k) if isinstance(merge, str) else merge
    except ValueError as e:
        raise TallpackError(str(e)) from None
    if not isinstance(chunk_elements, int) or chunk_elements <= 0 or chunk_elements % 8:
        raise TallpackError(f"chunk_elements must be a positive multiple of 8, got {chunk_elements!r}")
    fam = PackInputs(base, tasks, allow_mismatch=allow_mismatch, chunk_elements=chunk_elements)
    try:
        if method.name == "ties" and len(fam.tasks) > 255:
            raise TallpackError("TIES archives hold at most 255 tasks")
        names = list(fam.tasks)
        lams = _lambdas(lambdas, names)
        log.info("plan: %d merged, %d task-own, %d base-only tensors", fam.plan.count("merged"),
                 fam.plan.count("task-own"), fam.plan.count("base-only"))
        method.prepare(fam.passes, len(names))
        selection = None
        if evaluate is not None:
            selection = select_lambdas(fam, method, evaluate, grid=lambda_grid)
            lams = selection.chosen
        manifest = _write(fam, method, lams, Path(out), codec=codec, level=level,
                          keep_base_only=keep_base_only, metadata=dict(metadata or {}),
                          threads=threads, progress=progress,
                          selection=selection.to_dict() if selection else None)
    finally:
        fam.close()
    return manifest


def _write(fam: PackInputs, method: MergeMethod, lams: dict[str, float], out: Path, *, codec: str,
           level: int, keep_base_only: bool, metadata: dict, threads: int | None, progress: bool,
           selection: dict | None) -> Manifest:
    names = list(fam.tasks)
    ce = fam.chunk_elements
    masks_chain = mask_chain(level)
    fidelity = {t: Fidelity() for t in names}
    entries: list[TensorEntry] = []

    def dense(dtype: str) -> Chain:
        return dense_chain(codec, itemsize(dtype), level)

    tensors = fam.plan.tensors
    if progress:
        from tqdm.auto import tqdm
        tensors = tqdm(tensors, desc="packing", unit="tensor")
    with ContainerWriter(out, threads=threads) as w:

        def whole(t: torch.Tensor):
            dt = dtype_name(t.dtype)
            return w.write_array(tensor_to_bytes(t), dt, tuple(t.shape), dense(dt), ce)

        for entry in tensors:
            if entry.kind == "base-only":
                if keep_base_only:
                    entries.append(TensorEntry(entry.name, "base-only", {}, base=whole(fam.base.get(entry.name))))
                continue
            base, thetas = fam.load(entry)
            shape = tuple(thetas[0].shape)
            if len(thetas) > 1 and all_equal(thetas):
                ref = whole(thetas[0])
                dt = dtype_name(thetas[0].dtype)
                entries.append(TensorEntry(entry.name, "shared",
                                           {t: TaskTensor("shared", dt, shape) for t in entry.tasks}, data=ref))
                if entry.kind == "merged":
                    for t, x in zip(entry.tasks, thetas):
                        fidelity[t].add_exact(task_vector(x, base))
                continue
            if entry.kind == "merged" and not all_finite(base, thetas):
                # inf/NaN would make tau_t NaN and the rebuilt weight NaN: keep such tensors exact
                log.warning("tensor %r holds inf or NaN: stored per task, not masked", entry.name)
                entry = TensorPlan(entry.name, "task-own", entry.tasks, entry.in_base)
            if entry.kind == "task-own":
                entries.append(TensorEntry(entry.name, "task-own", {
                    t: TaskTensor("dense", dtype_name(x.dtype), tuple(x.shape), data=whole(x))
                    for t, x in zip(entry.tasks, thetas)}))
                continue
            entries.append(_write_merged(w, fam, entry, base, thetas, method, lams, fidelity,
                                         dense, masks_chain))

        infos = []
        for t in names:
            src = fam.tasks[t]
            fid = fidelity[t]
            infos.append(TaskInfo(t, lams[t], fid.density if fid.numel else None, fid.to_dict(),
                                  tuple(src.keys()), src.describe(), src.metadata))
        manifest = Manifest(
            (MAJOR, MINOR), f"tallpack {__version__}", method.params(), tuple(infos), tuple(entries),
            base=fam.base.describe() | {"metadata": fam.base.metadata},
            stats={"source_bytes": fam.source_bytes,
                   "kinds": {k: sum(e.kind == k for e in entries) for k in ("merged", "shared", "task-own", "base-only")},
                   **({"selection": selection} if selection else {})},
            metadata=metadata,
        )
        w.finish(manifest.to_dict())
    return manifest


def _write_merged(w: ContainerWriter, fam: PackInputs, entry: TensorPlan, base: torch.Tensor,
                  thetas: list[torch.Tensor], method: MergeMethod, lams: dict[str, float],
                  fidelity: dict[str, Fidelity], dense: Callable[[str], Chain],
                  masks_chain: Chain) -> TensorEntry:
    shape, ce = tuple(base.shape), fam.chunk_elements
    b_arr = w.begin_array(dtype_name(base.dtype), shape, dense(dtype_name(base.dtype)), ce)
    m_arr = w.begin_array("float32", shape, dense("float32"), ce)
    c_arr = w.begin_array("uint8", shape, dense("uint8"), ce) if method.name == "ties" else None
    k_arrs = [w.begin_array("bool", shape, masks_chain, ce) for _ in entry.tasks]
    ones = [0] * len(entry.tasks)
    for b, taus in fam.blocks(base, thetas):
        merged = method.combine(taus)
        masks = [tall_mask(tau, merged, lams[t]) for t, tau in zip(entry.tasks, taus)]
        for i, (t, tau, m) in enumerate(zip(entry.tasks, taus, masks)):
            fidelity[t].add(tau, m, merged)
            ones[i] += int(m.sum())
        jobs = [(b_arr.chain, tensor_to_bytes(b)), (m_arr.chain, tensor_to_bytes(merged))]
        if c_arr is not None:
            jobs.append((c_arr.chain, tensor_to_bytes(method.counts(taus))))
        jobs += [(masks_chain, tensor_to_bytes(m)) for m in masks]
        arrays = [b_arr, m_arr] + ([c_arr] if c_arr else []) + k_arrs
        for arr, encoded in zip(arrays, w.encode(jobs)):
            arr.add(encoded)
    return TensorEntry(
        entry.name, "merged",
        {t: TaskTensor("tall", dtype_name(x.dtype), shape, mask=k.finish(), ones=n)
         for t, x, k, n in zip(entry.tasks, thetas, k_arrs, ones)},
        base=b_arr.finish(), merged=m_arr.finish(), counts=c_arr.finish() if c_arr else None,
    )
