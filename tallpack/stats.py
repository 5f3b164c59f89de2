"""Mask statistics of an archive: how many tasks use each weight, per-task and per-layer density.

The paper's view of a family (Wang, Dimitriadis et al. 2024, §5): over every masked weight, the
number of tasks whose mask keeps it. Weights no task uses are **catastrophic** (kept only by the
merged vector, they interfere), weights one task uses are **selfish**, weights two or more tasks
use are **consensus** weights (what Consensus Merging keeps). :func:`compute` reads the masks;
:func:`plot` draws the figure (matplotlib, an optional extra: ``pip install 'tallpack[plot]'``).
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ._torch import cpu_default
from .encodings.derived import DERIVED_MERGED, has_mask, task_mask
from .encodings.derived_merged import task_masks as derived_merged_masks
from .encodings.qtau import task_masks
from .errors import InvalidArgumentError, OutputError, OutputExistsError, TallpackError, TaskNotFoundError, memory_named
from .folders import component_of
from .fsutil import atomic_write, check_folders_above, check_replaceable, file_identity, reading
from .merging import METHODS, MergeMethod
from .progress import ProgressLike, track
from .report import TABLE_WIDTH, density_columns, show_name, wrap
from .staging import check_file_name
from .storage import is_url

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator, Sequence

    from ._torch import torch
    from .encodings.base import TensorEntry
    from .reader import Archive

#: at most this many layers labelled on the density-per-layer axis (and marked on its lines); a
#: model of thousands of numbered blocks has every n-th labelled
MAX_LAYER_TICKS = 40
_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")
#: a module list without a block name (``torch.nn.Sequential``): ``body.2.weight``
_INDEXED = re.compile(r"(?:^|\.)(\d+)\.")


def layer_ticks(blocks: int, other: bool) -> list[int]:
    """The positions labelled on the density-per-layer axis: every block up to MAX_LAYER_TICKS,
    else every n-th (a label per layer of a model of thousands took minutes to draw, unreadable),
    and "other" after them.

    >>> layer_ticks(3, True), layer_ticks(100, False)[:4]
    ([0, 1, 2, 3], [0, 3, 6, 9])
    """
    step = max(1, -(-blocks // MAX_LAYER_TICKS))
    return list(range(0, blocks, step)) + ([blocks] if other else [])


def _split(name: str, components: "Iterable[str]") -> tuple[str, str]:
    """(component, the rest) of a pipeline's name: the longest of ``components`` it starts with
    (a sentence-transformers Router's ``2_Router/query_0_Dense``), else its first folder
    (``unet``); ``""`` and the name for a name of none (a sentence-transformers transformer's)."""
    component = component_of(name, components)
    if component:
        return component, name[len(component) + 1:]
    first, slash, rest = name.partition("/")
    return (first, rest) if slash else ("", name)


def layer_of(name: str, *, pipeline: bool = False, components: "Iterable[str]" = ()) -> str:
    """``"layer 3"`` for ``model.layers.3.mlp.up_proj.weight`` (and ``h.3``, ``blocks.3``, ...,
    and the first index of a plain module list, ``body.3.weight``), ``"other"`` for embeddings,
    heads and norms outside the blocks. Of a diffusers ``pipeline`` (names ``COMPONENT/NAME``), each
    component's own: ``"text_encoder/layer 0"``, else the name up to its first index
    (``"unet/down_blocks.0"``, ``"vae/encoder.down_blocks.1"``), or ``"unet/other"``; the same of a
    sentence-transformers model's module (``"2_Dense/other"``), whose transformer's names have no ``/``.
    The component is the longest of ``components`` the name starts with (a Router's modules are
    each their own: ``"2_Router/query_0_Dense/other"``), else the name's first folder.

    >>> layer_of("unet/down_blocks.1.resnets.0.conv1.weight", pipeline=True)
    'unet/down_blocks.1'
    """
    component, rest = _split(name, components) if pipeline else ("", name)
    if not component:
        m = _LAYER.search(name) or _INDEXED.search(name)
        return f"layer {int(m[1])}" if m else "other"
    m = _LAYER.search(rest)
    if m:
        return f"{component}/layer {int(m[1])}"
    m = _INDEXED.search(rest)
    return f"{component}/{rest[:m.start(1)]}{int(m[1])}" if m else f"{component}/other"


def _layer_order(labels: list[str], pipeline: bool, components: "Iterable[str]" = ()) -> list[str]:
    """Layer labels in model order: by number, "other" last; of a pipeline, each component's
    together (in the order they come), numbers in numeric order within it, its "other" last (the
    labels of no component, a sentence-transformers transformer's, together as one, first).

    >>> _layer_order(["layer 10", "2_Dense/other", "other", "layer 2"], True)
    ['layer 2', 'layer 10', 'other', '2_Dense/other']
    """
    if not pipeline:
        return sorted(labels, key=lambda s: (s == "other", int(s.split()[-1]) if s != "other" else 0))
    components = list(components)
    first: dict[str, int] = {}
    for lay in labels:
        first.setdefault(_split(lay, components)[0], len(first))

    def key(lay: str) -> tuple:
        component, rest = _split(lay, components)
        parts = tuple((0, int(x), "") if x.isdigit() else (1, 0, x) for x in re.split(r"(\d+)", rest) if x)
        return component != "", first[component], rest == "other", parts  # the top model first

    return sorted(labels, key=key)


@dataclass
class MaskStats:
    """What :func:`compute` returns; ``to_dict`` is JSON-ready."""

    tasks: list[str]
    #: tasks_using[k] = number of masked weights that exactly k tasks use (k = 0..T)
    tasks_using: list[int]
    #: per task, the fraction of masked weights its mask keeps
    density: dict[str, float | None]
    #: layer label -> task -> density, layers in model order ("other" last); left out of the repr
    #: (what a prompt shows): thousands of characters for a real model
    layers: dict[str, dict[str, float | None]] = field(default_factory=dict, repr=False)

    @property
    def weights(self) -> int:
        return sum(self.tasks_using)

    def fractions(self) -> dict[str, float]:
        """Share of masked weights that are catastrophic (0 tasks), selfish (1), consensus (2+)."""
        n = self.weights or 1
        return {"catastrophic": self.tasks_using[0] / n,
                "selfish": (self.tasks_using[1] if len(self.tasks_using) > 1 else 0) / n,
                "consensus": sum(self.tasks_using[2:]) / n}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"weights": self.weights, "fractions": self.fractions()}


@cpu_default
def compute(archive: "Archive", *, progress: ProgressLike = None) -> MaskStats:
    """Read every mask once (tensor by tensor, memory bounded by one tensor's masks).

    >>> s = compute(fam); s.fractions()
    {'catastrophic': 0.41, 'selfish': 0.33, 'consensus': 0.26}
    """
    with memory_named(f"{archive.name}: mask statistics"):  # torch's allocator: not a TallpackError
        return _compute(archive, progress)


def _compute(archive: "Archive", progress: ProgressLike) -> MaskStats:
    tasks = list(archive.tasks)
    hist = np.zeros(len(tasks) + 1, dtype=np.int64)
    ones = {t: 0 for t in tasks}
    total = {t: 0 for t in tasks}
    per_layer: dict[str, dict[str, list[int]]] = {}
    lambdas = {t.name: t.lam for t in archive.manifest.tasks}
    # a diffusers pipeline's, or a sentence-transformers model's with module weights (spec §3.6; a
    # base without the modules of its tasks too)
    found = [c for s in (archive.manifest.base, *(archive.task_info(t).source for t in tasks))
             if isinstance(c := (s or {}).get("components"), dict)]
    pipeline = bool(found)
    components = {name for c in found for name in c}  # a Router's modules: 2_Router/query_0_Dense
    entries = [e for e in archive.manifest.tensors
               if any(has_mask(tt) or tt.encoding == "qtau" for tt in e.tasks.values())]
    method = _merge_method(archive)
    for e in track(entries, progress, "reading masks"):
        archive.prefetch([e.name])  # remote: the tensor's masks in one request, not one each
        count: np.ndarray | None = None
        # (layer, run of the mask) for each tensor: a group's members (format 1.12), each in its layer
        runs = [slice(x.offset, x.offset + x.numel) for x in e.members] if e.members else None
        pieces, at = [], 0  # the runs of the (gapless) mask, by layer; empty: the whole mask
        for x in e.members:
            pieces.append((layer_of(x.name, pipeline=pipeline, components=components), slice(at, at + x.numel)))
            at += x.numel
        whole = layer_of(e.name, pipeline=pipeline, components=components)
        layers = {lay: per_layer.setdefault(lay, {t: [0, 0] for t in tasks})
                  for lay in ([lay for lay, _ in pieces] if pieces else [whole])}
        # the fidelity dial's qtau tasks have a mask derived from their deQ (spec §6.1.8)
        derived: "Iterable[tuple[str, torch.Tensor]] | None" = None
        if any(tt.encoding == "qtau" for tt in e.tasks.values()):
            derived = task_masks(archive.read_array, e, lambdas)[1].items()
        elif method is not None and any(tt.encoding == DERIVED_MERGED for tt in e.tasks.values()):
            # every original rebuilt once, for the merged vector and its masks (spec §6.1.9), one
            # mask at a time
            derived = derived_merged_masks(archive.read_array, e, [t for t in tasks if t in e.tasks], method,
                                           f"{archive.name}: tensor {e.name!r}")[1]
        for t, mask in _masks(archive, e, derived):
            # counted by numpy: torch's bool sum widens every element to int64 (5-20x slower)
            m = mask.reshape(-1).cpu().numpy()
            if runs is not None:  # a group's members, without the gaps between them
                m = np.concatenate([m[r] for r in runs])
            n = int(np.count_nonzero(m))
            ones[t] += n
            total[t] += m.size
            if not pieces:
                layers[whole][t][0] += n
                layers[whole][t][1] += m.size
            for lay, r in pieces:
                layers[lay][t][0] += int(np.count_nonzero(m[r]))
                layers[lay][t][1] += r.stop - r.start
            if count is None:
                count = m.astype(np.uint8 if len(tasks) < 256 else np.uint16)
            else:
                np.add(count, m, out=count)
        if count is not None:
            hist += _histogram(count, len(tasks) + 1)

    def frac(k: int, n: int) -> float | None:
        return k / n if n else None

    order = _layer_order(list(per_layer), pipeline, components)
    return MaskStats(tasks, [int(v) for v in hist], {t: frac(ones[t], total[t]) for t in tasks},
                     {lay: {t: frac(*per_layer[lay][t]) for t in tasks} for lay in order})


def _merge_method(archive: "Archive") -> MergeMethod | None:
    """The archive's merge method, which derives its derived merged vectors; None where this
    tallpack does not know it or its parameters are bad (each mask is then read as a lossy read
    reads it, which says so)."""
    cls = METHODS.get(archive.manifest.merge.get("method", ""))
    try:
        return None if cls is None else cls.from_params(archive.manifest.merge)
    except TallpackError:
        return None


def _masks(archive: "Archive", e: "TensorEntry", derived: "Iterable[tuple[str, torch.Tensor]] | None"
           ) -> "Iterator[tuple[str, torch.Tensor]]":
    """(task, mask) of each task of ``e`` with a mask: those ``derived`` gives where given, else
    each task's as a lossy read has it (``task_mask``)."""
    if derived is not None:
        yield from derived
        return
    for t, tt in e.tasks.items():
        if has_mask(tt):
            yield t, task_mask(archive.read_array, e, tt, f"task {t!r}, tensor {e.name!r}")


def _histogram(count: np.ndarray, bins: int) -> np.ndarray:
    """How many elements of ``count`` hold each value 0..bins-1: a comparison per value for a few
    values (``np.bincount`` widens every element to intp first, 20x slower), else bincount."""
    if bins <= 64:
        return np.array([np.count_nonzero(count == k) for k in range(bins)], dtype=np.int64)
    return np.bincount(count, minlength=bins)[:bins]


def render(s: MaskStats, *, width: int | None = TABLE_WIDTH, tasks: "Sequence[str] | None" = None) -> str:
    """The text summary ``tallpack stats`` prints, its lines within ``width`` characters where they
    can be (None: one line each, as long as it comes): the counts of tasks using a weight end in one
    item for the tail that rounds to 0.0%, the lists go on over several lines, and the density per
    layer is min / median / max across the tasks past what fits (:func:`report.density_columns`);
    ``tasks``: a column for each of these tasks instead, however many.

    >>> print(render(compute(fam), width=100, tasks=["t03"]))  # doctest: +SKIP
    """
    unknown = [t for t in tasks or () if t not in s.density]
    if unknown:
        raise TaskNotFoundError(f"no task {unknown[0]!r} in these statistics; tasks are "
                                f"{', '.join(map(show_name, s.tasks))}")
    f = s.fractions()
    n = s.weights or 1
    lines = wrap(f"{s.weights} masked weights, {len(s.tasks)} task{'' if len(s.tasks) == 1 else 's'}: "
                 f"catastrophic {f['catastrophic']:.1%} (no task), selfish {f['selfish']:.1%} (one task), "
                 f"consensus {f['consensus']:.1%} (two or more)", width, 2) + [""]
    using = [f"{k}: {v / n:.1%}" for k, v in enumerate(s.tasks_using)]
    if width is not None and len("tasks using a weight:  " + "  ".join(using)) > width:
        using = _fold_tail(s.tasks_using, n)
    lines += _listing("tasks using a weight:  ", using, width)
    lines += [""] + _listing("density per task:     ", [f"{show_name(t)}: {'-' if d is None else f'{d:.3f}'}"
                                                         for t, d in s.density.items()], width)
    if s.layers:  # one row per layer, a column per task (names cut to their column), or their spread
        layers = [show_name(lay) for lay in s.layers]  # a pipeline's: the archive's component names
        label = max(6, *map(len, layers))
        shown = list(s.tasks if tasks is None else tasks)
        head, cells, note = density_columns(list(s.layers.values()), shown,
                                            None if width is None or tasks is not None else width - label - 1)
        lines += ["", "density per layer:", f"{'':<{label}} {head}".rstrip()]
        lines += [f"{lay:<{label}} {c}".rstrip() for lay, c in zip(layers, cells)]
        lines += [] if note is None else wrap(note, width)
    return "\n".join(lines)


def _fold_tail(tasks_using: list[int], n: int) -> list[str]:
    """``0: 8.9%``, ... with the longest tail of counts that is 0.0% in all as one item, ``8-20: 0.0%``
    (``none`` where no weight is in it)."""
    items = [f"{k}: {v / n:.1%}" for k, v in enumerate(tasks_using)]
    last = len(tasks_using) - 1
    for k in range(2, last):  # two or more counts in the tail
        tail = sum(tasks_using[k:])
        if f"{tail / n:.1%}" == "0.0%":
            return items[:k] + [f"{k}-{last}: {'none' if tail == 0 else f'{tail / n:.1%}'}"]
    return items


def _listing(label: str, items: list[str], width: int | None) -> list[str]:
    """``label`` and the items two spaces apart, over as many lines as ``width`` needs, each item
    whole and the lines after the first under the first item."""
    if width is None or len(label) + len("  ".join(items)) <= width:
        return [label + "  ".join(items)]
    rows, row = [], ""
    for item in items:
        if row and len(label) + len(row) + 2 + len(item) > width:
            rows.append(row)
            row = item
        else:
            row = f"{row}  {item}" if row else item
    return [(label if i == 0 else " " * len(label)) + r for i, r in enumerate([*rows, row])]


_COLOURS = {"catastrophic": "#c0392b", "selfish": "#e67e22", "consensus": "#27ae60"}


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise TallpackError("plotting needs matplotlib: pip install 'tallpack[plot]' "
                            "(or matplotlib itself)") from None
    return plt


#: formats matplotlib writes through other programs (pgf: a TeX installation), not offered
NEEDS_TOOLS = frozenset({"pgf"})


def _being_read(archive: "str | os.PathLike | Archive | None") -> tuple[tuple[int, int] | None, str]:
    """The archive's file (``(st_dev, st_ino)``; None for a URL or none given) and its name."""
    if archive is None or isinstance(archive, (str, os.PathLike)):
        text = "" if archive is None else os.fspath(archive)
        if not text or is_url(text):
            return None, text
        return file_identity(text.removeprefix("file://")), text
    return getattr(archive.source, "device_inode", None), archive.name


def check_plot_path(path: str | os.PathLike, *, overwrite: bool = False,
                    archive: "str | os.PathLike | Archive | None" = None) -> str:
    """The image format of ``path`` (its suffix, one matplotlib writes), checked before any work:
    InvalidArgumentError for another suffix or for the file of ``archive`` (the one the statistics
    are read from: a path or an open archive), OutputError for a folder or device or in a folder it
    cannot write into, and OutputExistsError for an existing file without ``overwrite``.

    >>> check_plot_path("stats.png", archive="family.tallpack")
    'png'
    """
    check_file_name(path, what="the plot's", example="stats.png")  # x.png/: Path would drop the /
    plt = _pyplot()
    known = set(plt.figure().canvas.get_supported_filetypes()) - NEEDS_TOOLS
    plt.close("all")
    fmt = Path(path).suffix.lower().removeprefix(".")
    if fmt not in known:
        raise InvalidArgumentError(f"{path}: the plot's name must end in an image format matplotlib writes "
                                   f"by itself ({', '.join('.' + k for k in sorted(known))}), e.g. stats.png")
    with reading(*_being_read(archive)):
        check_replaceable(path)
    if not overwrite and os.path.lexists(path):
        raise OutputExistsError(f"{path}: already exists; pass --force (overwrite=True) to replace it")
    check_folders_above(path)  # notes.txt/p.png: notes.txt is a file
    folder = Path(path).absolute().parent
    if not folder.is_dir():
        raise InvalidArgumentError(f"{path}: the folder {Path(path).parent} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):  # else found once every mask was read
        if hasattr(os, "statvfs") and os.statvfs(folder).f_flag & os.ST_RDONLY:  # (os.access says no for both)
            raise OutputError(f"{path}: Read-only file system (the folder {Path(path).parent} is on one)")
        raise OutputError(f"{path}: Permission denied (cannot write into the folder {Path(path).parent})")
    return fmt


def plot(s: MaskStats, path: str | Path, *, title: str | None = None, overwrite: bool = False,
         archive: "str | os.PathLike | Archive | None" = None) -> Path:
    """Draw the three panels (tasks using each weight; density per task; density per layer) to
    a PNG (or any image format matplotlib knows, from the suffix), written as every output is: under
    a temporary name, renamed when complete; an existing file is replaced only with ``overwrite``,
    and never when it is ``archive``'s (the archive ``s`` was read from: its path, or the archive)."""
    fmt = check_plot_path(path, overwrite=overwrite, archive=archive)
    plt = _pyplot()
    T = len(s.tasks)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8), gridspec_kw={"width_ratios": [1.1, 1, 1.5]})
    n = s.weights or 1

    ax = axes[0]
    ks = list(range(T + 1))
    cats = ["catastrophic" if k == 0 else "selfish" if k == 1 else "consensus" for k in ks]
    pct = [100 * v / n for v in s.tasks_using]
    ax.bar(ks, pct, color=[_COLOURS[c] for c in cats], edgecolor="black", linewidth=0.5)
    for k, p in zip(ks, pct):
        ax.annotate(f"{p:.1f}%", (k, p), ha="center", va="bottom", fontsize=8, xytext=(0, 2),
                    textcoords="offset points")
    from matplotlib.patches import Patch

    fr = s.fractions()
    ax.legend(handles=[Patch(color=_COLOURS[c], label=f"{c} {100 * fr[c]:.1f}%") for c in _COLOURS],
              loc="upper right", fontsize=8, frameon=False)
    ax.set_xticks(ks)
    ax.set_xlabel("number of tasks using the weight")
    ax.set_ylabel("% of masked weights")
    ax.set_title("How many tasks use each weight")
    ax.set_ylim(0, max(pct + [1]) * 1.25)

    ax = axes[1]
    dens = [100 * (s.density[t] or 0) for t in s.tasks]
    ax.barh(range(T), dens, color="#2e86c1")
    ax.set_yticks(range(T), labels=s.tasks, fontsize=8 if T <= 20 else 6)
    ax.invert_yaxis()
    for i, d in enumerate(dens):
        ax.annotate(f"{d:.1f}%", (d, i), va="center", fontsize=8, xytext=(2, 0), textcoords="offset points")
    ax.set_xlim(0, max(dens + [1]) * 1.2)
    ax.set_xlabel("mask density (% of weights kept)")
    ax.set_title("Density per task")

    ax = axes[2]
    layers = list(s.layers)
    blocks = [lay for lay in layers if lay != "other"]
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, t in enumerate(s.tasks):
        c = colours[i % len(colours)]
        ax.plot(range(len(blocks)), [100 * (s.layers[lay][t] or 0) for lay in blocks],
                marker="o" if len(blocks) <= MAX_LAYER_TICKS else None, markersize=3,
                linewidth=1, alpha=0.85, color=c, label=t)
        if "other" in s.layers:  # embeddings, heads, norms: not a layer, so not on the line
            ax.plot([len(blocks)], [100 * (s.layers["other"][t] or 0)], marker="s", markersize=4, color=c)
    if "other" in s.layers and blocks:
        ax.axvline(len(blocks) - 0.5, color="grey", linestyle=":", linewidth=1)
    ticks = layer_ticks(len(blocks), "other" in s.layers)
    labels = [layers[i].removeprefix("layer ") for i in ticks]
    ax.set_xticks(ticks, labels=labels,  # a pipeline's are long (unet/down_blocks.0): upright, they overlap
                  rotation=90 if len(ticks) > 16 or max(map(len, labels), default=0) > 8 else 0, fontsize=8)
    ax.set_xlabel("layer (other: tensors outside the blocks)")
    ax.set_ylabel("mask density (%)")
    ax.set_title("Density per layer")
    if T <= 20:
        ax.legend(fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(alpha=0.3)

    fig.suptitle(title or f"TALL masks: {T} task{'' if T == 1 else 's'}, {s.weights:,} masked weights", fontsize=11)
    fig.tight_layout()
    out = Path(path)
    try:
        with reading(*_being_read(archive)):  # checked again as the file is put in place
            atomic_write(out, lambda tmp: fig.savefig(tmp, dpi=120, format=fmt))
    finally:
        plt.close(fig)
    return out
