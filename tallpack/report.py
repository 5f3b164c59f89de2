"""The inspect report: what an archive holds, how large each part is, and how faithful each task is.

Built from the manifest alone (no chunk is read): :func:`summarize` gives a JSON-ready dict and
:func:`render` the text table ``tallpack inspect`` prints; :func:`tensor_rows` reads a group's masks
only when given a reader (``inspect --tensors``: each member's density).
"""

from __future__ import annotations

import logging
import math
import statistics
import textwrap
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from .arrays import ArrayRef
from .elements import numel
from .errors import ArchiveClosedError, OutOfMemoryError, RemoteError, TallpackError
from .manifest import Manifest, count_kinds

log = logging.getLogger(__name__)

#: Report names of stored arrays: tensor-entry keys, then task-entry keys (``task/key``).
_ENTRY_ROLES = {"base": "base", "merged": "merged", "counts": "counts", "data": "shared"}
_TASK_ROLES = {"mask": "masks", "data": "task_own", "codes": "qtau", "scales": "qtau"}
#: the most task names a note under the task table lists
SHOWN_TASKS = 5


def _entropy(p: float) -> float:
    if p <= 0 or p >= 1:
        return 0.0
    return -(p * math.log2(p) + (1 - p) * math.log2(1 - p))


def summarize(manifest: Manifest, *, path: str, archive_bytes: int,
              format_version: tuple[int, int]) -> dict[str, Any]:
    """Tasks, sizes, ratios, mask densities and their entropy bound, fidelity figures."""
    m = manifest
    stored = {"base": 0, "merged": 0, "masks": 0, "shared": 0, "task_own": 0, "counts": 0}
    names = [t.name for t in m.tasks]
    mask_bytes = dict.fromkeys(names, 0)
    mask_bits_bound = dict.fromkeys(names, 0.0)
    masked = dict.fromkeys(names, 0)
    stored_as: dict[str, dict[str, int]] = {t: {} for t in names}  # per task: tensors by what is stored
    extra_bytes = dict.fromkeys(names, 0)
    for e in m.tensors:
        for key, ref in e.arrays.items():
            role = _ENTRY_ROLES.get(key, key)
            stored[role] = stored.get(role, 0) + ref.stored_nbytes
        for t, tt in e.tasks.items():
            for key, ref in tt.arrays.items():
                role = _TASK_ROLES.get(key, key)
                stored[role] = stored.get(role, 0) + ref.stored_nbytes
                if role == "qtau":  # the dial's quantized task vectors, in place of masks
                    extra_bytes[t] += ref.stored_nbytes
            for key, v in tt.extras.items():  # the exact tier's residuals, the dial's corrections
                n = sum(ref.stored_nbytes for ref in v.arrays.values())
                role = "corrections" if key == "correction" else key
                stored[role] = stored.get(role, 0) + n
                extra_bytes[t] += n
            if tt.encoding in ("tall-derived", "tall-derived-merged"):  # exact tier, mask derived from the original
                stored_as[t]["derived"] = stored_as[t].get("derived", 0) + 1
            if tt.encoding == "tall":
                corr = tt.extras.get("correction")
                label = "tall" if corr is None else corr.kind + (str(corr.bits) if corr.bits else "")
                stored_as[t][label] = stored_as[t].get(label, 0) + 1
            elif tt.encoding == "qtau":
                label = f"qtau{tt.params['bits']}"
                stored_as[t][label] = stored_as[t].get(label, 0) + 1
            mask = tt.arrays.get("mask")
            if mask is not None:
                n = numel(tt.shape)
                mask_bytes[t] += mask.stored_nbytes
                masked[t] += n
                p = (tt.params.get("ones") or 0) / n if n else 0.0
                mask_bits_bound[t] += n * _entropy(p)
    source_bytes = int(m.stats.get("source_bytes", 0))
    merged_tensors = [e for e in m.tensors if e.kind == "merged"]
    derived_merged = sum(any(tt.encoding == "tall-derived-merged" for tt in e.tasks.values()) for e in merged_tensors)
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
            "stored": stored_as[info.name], "extra_bytes": extra_bytes[info.name],
        })
    return {
        "path": path,
        "format_version": f"{format_version[0]}.{format_version[1]}",
        "writer": m.writer,
        "merge": m.merge,
        "archive_bytes": archive_bytes,
        "source_bytes": source_bytes,
        "ratio": source_bytes / archive_bytes if archive_bytes else None,
        "stored_bytes": stored,
        "kinds": count_kinds(m.tensors),
        #: tensor groups (format 1.12): [groups, tensors in them]
        "groups": [sum(1 for e in m.tensors if e.members), sum(len(e.members) for e in m.tensors)],
        #: merged tensors whose merged vector is derived from the exact originals (format 1.8), of all
        "merged_derived": [derived_merged, len(merged_tensors)],
        #: (format 1.14) tensor names that are another stored tensor (tied weights, stored once)
        **({"aliases": dict(m.aliases)} if m.aliases else {}),
        "tasks": tasks,
        "metadata": m.metadata,
    }


def format_size(n: float) -> str:
    """Bytes in decimal units: ``format_size(1234567) == "1.2 MB"``."""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n}"


def show_name(text: object) -> str:
    """A name from the archive (a task's, a tensor's, a file's) as the terminal should see it: as
    it is when every character is printable, else quoted with control, format and bidi characters
    escaped (``'b\\x1b]0;...'``), so that an archive cannot set the terminal's title or colours.

    >>> show_name("cars"), show_name("b\\x1b[31m")
    ('cars', "'b\\x1b[31m'")
    """
    text = str(text)
    return text if text.isprintable() else repr(text)


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def render(s: dict[str, Any]) -> str:
    """The text table of a :func:`summarize` result."""
    lines = [f"{show_name(s['path'])}: tallpack format {s['format_version']}, written by {show_name(s['writer'])}",
             f"merge: {show_name(s['merge'].get('method'))}   tensors: " + ", ".join(f"{v} {k}" for k, v in s["kinds"].items())
             + (f" ({s['groups'][1]} of them in {s['groups'][0]} group{'s' if s['groups'][0] > 1 else ''})"
                if s.get("groups", [0])[0] else "")]
    aliases = s.get("aliases") or {}
    if aliases:
        lines.append("aliases (tied weights, stored once): " + ", ".join(
            f"{show_name(a)} = {show_name(t)}" for a, t in list(aliases.items())[:3]) + (" ..." if len(aliases) > 3 else ""))
    ratio = f"{s['ratio']:.2f}x" if s["ratio"] else "-"
    lines.append(f"size: {format_size(s['archive_bytes'])} from {format_size(s['source_bytes'])} of checkpoints ({ratio})")
    lines.append("stored: " + ", ".join(f"{k} {format_size(v)}" for k, v in s["stored_bytes"].items() if v))
    derived = sum(t["stored"].get("derived", 0) for t in s["tasks"])
    if derived:  # format 1.6: the exact tier rebuilds these masks from the originals
        lines.append(f"masks derived from the exact originals, not stored: {derived} of "
                     f"{derived + sum(t['stored'].get('tall', 0) for t in s['tasks'])}")
    k, n = s.get("merged_derived", (0, 0))
    if k:  # format 1.8: and these merged vectors from every task's original
        lines.append(f"merged vectors derived from the exact originals, not stored: {k} of {n} tensors")
    lines.append("")
    dial = any("weight" in t["fidelity"] for t in s["tasks"])
    weighted = any("weighted" in t["fidelity"] for t in s["tasks"])  # packed with a sensitivity
    w = max([20, *(len(show_name(t["name"])) for t in s["tasks"])])  # long task names keep the columns straight
    header = f"{'task':<{w}} {'lambda':>6} {'density':>8} {'rel_l2':>7} {'cosine':>7} {'mask b/p':>9} {'H(p)':>6}"
    if dial:  # the fidelity dial (format 1.4): achieved fidelity, and what each merged tensor holds
        header += (f" {'fidelity':>8}" + (f" {'weighted':>8}" if weighted else "")
                   + f" {'score':>6} {'+bytes':>8}  stored (merged tensors)")
    lines += [header, "-" * len(header)]
    for t in s["tasks"]:
        f = t["fidelity"]
        line = (f"{show_name(t['name']):<{w}} {_fmt(t['lambda'], '.2f' if t['lambda'] is None or t['lambda'] < 1000 else '.2g'):>6} {_fmt(t['density'], '.3f'):>8} "
                f"{_fmt(f.get('rel_l2'), '.3f'):>7} {_fmt(f.get('cosine'), '.3f'):>7} "
                f"{_fmt(t['mask_bits_per_param'], '.3f'):>9} {_fmt(t['mask_entropy_bits_per_param'], '.3f'):>6}")
        if dial:
            line += (f" {_fmt(f.get('weight'), '.4f'):>8}" + (f" {_fmt(f.get('weighted'), '.4f'):>8}" if weighted else "")
                     + f" {_fmt(f.get('score'), '.3f'):>6} "
                     f"{format_size(t['extra_bytes']):>8}  " + ", ".join(f"{k} {v}" for k, v in t["stored"].items()))
        lines.append(line)
    if dial:
        lines.append("density, rel_l2, cosine: the TALL mask's rebuild alone; fidelity and score: the rebuild as "
                     "stored, corrections included")
    far = [show_name(t["name"]) for t in s["tasks"] if (t["fidelity"].get("rel_l2") or 0) > 1]
    if far and not dial:  # (the dial's fidelity column says what its corrections reached)
        lines += wrap(f"rel_l2 above 1 ({', '.join(far[:SHOWN_TASKS])}{', ...' if len(far) > SHOWN_TASKS else ''}): "
                      "the TALL rebuild is farther from the fine-tune than the base is (fine-tunes that share "
                      "little, or one fine-tune packed twice, which tau_MTL counts twice): pack with --fidelity, "
                      "or --exact and read with exact=True (unpack --exact)", TABLE_WIDTH)
    over = [(t["name"], t["fidelity"]["overflow"]) for t in s["tasks"] if t["fidelity"].get("overflow")]
    if over:  # a float16/float8 rebuild past the dtype's range (spec §6.4)
        lines.append("rebuilt as inf or NaN where the original is finite (the dtype's range overflows): "
                     + ", ".join(f"{show_name(n)} {k} element{'s' if k > 1 else ''}" for n, k in over))
    return "\n".join(lines)


def _chain(ref) -> str:
    return "+".join(c.get("id", "?") for c in ref.codecs) or "raw"


def tensor_rows(manifest: Manifest, read: Callable[..., Any] | None = None,
                bits: Callable[[ArrayRef, str], np.ndarray] | None = None) -> list[dict[str, Any]]:
    """One row per tensor entry (``tallpack inspect --tensors``): kind, shape and dtype (of the
    first task that has it, or of the base; ``shapes`` and ``dtypes``, each task's, where the
    tasks' differ), stored bytes of every array it owns, the codec
    chains used, and the mask density per task (tasks without a mask for it: absent). The
    manifest counts a group's set bits as a whole; with ``read`` (an archive's ``read_array``) its
    masks are read to give each member's density too, and with ``bits`` (``Archive.packed_bits``)
    a stored mask is counted from its packed bits, in numpy, without torch."""
    rows = []
    for e in manifest.tensors:
        if e.members:
            rows += _group_rows(e, read, bits)
            continue
        first = next(iter(e.tasks.values()), None)
        ref = first if first is not None else e.arrays.get("base")
        arrays = [r for _, r in e.all_arrays()]
        density = {t: (tt.params.get("ones") or 0) / numel(tt.shape) if numel(tt.shape) else None
                   for t, tt in e.tasks.items() if "ones" in tt.params}
        shapes = {tuple(tt.shape) for tt in e.tasks.values()}
        dtypes = {tt.dtype for tt in e.tasks.values()}  # tasks fine-tuned in other dtypes (float32 of a bf16 base)
        rows.append({
            "name": e.name, "kind": e.kind,
            "shape": list(ref.shape) if ref is not None else None,
            "dtype": ref.dtype if ref is not None else None,
            **({"shapes": {t: list(tt.shape) for t, tt in e.tasks.items()}} if len(shapes) > 1 else {}),
            **({"dtypes": {t: tt.dtype for t, tt in e.tasks.items()}} if len(dtypes) > 1 else {}),
            "stored_bytes": sum(r.stored_nbytes for r in arrays),
            "codecs": sorted({_chain(r) for r in arrays}),
            "density": density,
        })
    return rows


def _group_rows(e, read: Callable[..., Any] | None, bits: Callable[[ArrayRef, str], np.ndarray] | None
                ) -> list[dict[str, Any]]:
    """A group's row (format 1.12: its stored bytes, codecs and the density over its members),
    then one row per member, naming the group (no bytes of its own; its density with ``read``)."""
    first = next(iter(e.tasks.values()))
    arrays = [r for _, r in e.all_arrays()]
    n = sum(m.numel for m in e.members)
    rows = [{"name": e.name, "kind": e.kind, "shape": list(first.shape), "dtype": first.dtype,
             "members": [m.name for m in e.members], "stored_bytes": sum(r.stored_nbytes for r in arrays),
             "codecs": sorted({_chain(r) for r in arrays}),
             "density": {t: (tt.params.get("ones") or 0) / n if n else None
                         for t, tt in e.tasks.items() if "ones" in tt.params}}]
    rows += [{"name": m.name, "kind": e.kind, "shape": list(m.shape), "dtype": first.dtype, "group": e.name,
              "stored_bytes": 0, "codecs": [], "density": {}} for m in e.members]
    if read is None and bits is None:
        return rows
    from .encodings.derived import has_mask, task_mask

    for t, tt in e.tasks.items():
        if not has_mask(tt):
            continue
        where = f"tensor group {e.name!r}, task {t!r}"
        ref = tt.arrays.get("mask")
        try:
            if bits is not None and tt.encoding == "tall" and ref is not None and ref.chain.bits_chain is not None:
                packed = bits(ref, where)  # members start at multiples of 8: whole bytes each
                counts = [int(np.unpackbits(packed[m.offset // 8 : (m.offset + m.numel + 7) // 8],
                                            bitorder="little")[: m.numel].sum()) for m in e.members]
            elif read is not None:
                flat = task_mask(read, e, tt, where).reshape(-1)
                counts = [int(flat[m.offset : m.offset + m.numel].sum()) for m in e.members]
            else:
                continue
        except (RemoteError, ArchiveClosedError, OutOfMemoryError):  # no damage: the next group would fail alike
            raise
        except TallpackError as err:  # a damaged mask: the table still shows what the manifest says
            log.warning("%s", err)
            continue
        for row, m, c in zip(rows[1:], e.members, counts):
            row["density"][t] = c / m.numel if m.numel else None
    return rows


#: the widest tensor-name column of ``render_tensors``; longer names overflow their row
NAME_COLUMN_MAX = 72
#: the width text tables fit where no terminal says otherwise (a file, a pipe, Python)
TABLE_WIDTH = 120
#: a task's density column: 8 characters and the space before it
_COLUMN = 9
#: the shortest a task's name is cut to at a density extreme (a task column's width)
_NAME_MIN = 8
#: the narrowest the tensor-name column gets to fit the table in its width (names elided to it)
TENSOR_NAME_MIN = 24


class Spread(NamedTuple):
    """The densities of one tensor (or layer) across tasks: the extremes, each with its tasks."""

    low: float
    low_tasks: list[str]
    median: float
    high: float
    high_tasks: list[str]


def spread(density: Mapping[str, float | None]) -> Spread | None:
    """Min, median and max of the tasks' densities (a task without a mask, None or absent, left
    out), each extreme with every task at it, in the given order; None where no task has one.

    >>> spread({"a": 0.2, "b": 0.1, "c": None, "d": 0.1})
    Spread(low=0.1, low_tasks=['b', 'd'], median=0.1, high=0.2, high_tasks=['a'])
    """
    known = {t: d for t, d in density.items() if d is not None}
    if not known:
        return None
    low, high = min(known.values()), max(known.values())
    return Spread(low, [t for t, d in known.items() if d == low], statistics.median(known.values()),
                  high, [t for t, d in known.items() if d == high])


def _cut(name: str, n: int) -> str:
    return name if len(name) <= n else name[: n - 1] + "~"


def _joined(parts: Sequence[str], keep: Mapping[int, str]) -> str:
    """The dotted ``parts`` whose indices ``keep`` has, each as it shows it (a part cut short ends
    in ``~``), each run of parts left out a ``~``."""
    out, gap = "", False
    for i in range(len(parts)):
        if i not in keep:
            gap = True
            continue
        out += ("" if out.endswith("~") else "~" if gap else "." if out else "") + keep[i]
        gap = False
    return out + ("~" if gap and not out.endswith("~") else "")


def elide(name: str, n: int, *, first: Sequence[int] = ()) -> str:
    """``name`` in at most ``n`` characters: dotted parts left out of its middle (``~`` where
    they were). Kept first: its last part, its numbers (layer indices), the parts of ``first``
    (indices; cut short where they do not fit whole), the part before its last, the part before
    each number, then the others from the start; a name no choice of parts shortens enough is
    cut in its middle.

    >>> elide("model.layers.31.self_attn.q_proj.weight", 30)
    'model.layers.31~q_proj.weight'
    """
    if len(name) <= n:
        return name
    parts = name.split(".")
    last = len(parts) - 1
    numbers = [i for i in range(last - 1, -1, -1) if parts[i].isdigit()]
    order = [last, *numbers, *first, last - 1, *(i - 1 for i in numbers), *range(last)]
    keep: dict[int, str] = {}
    for i in dict.fromkeys(i for i in order if 0 <= i <= last):
        shown = [parts[i]] + ([parts[i][:k] + "~" for k in range(len(parts[i]) - 1, 2, -1)] if i in first else [])
        keep |= next(({i: x} for x in shown if len(_joined(parts, keep | {i: x})) <= n), {})
    if last in keep:
        return _joined(parts, keep)
    head = max(0, (n - 1) // 2)
    return name[:head] + "~" + name[len(name) - (n - 1 - head):] if n > 1 else name[:n]


def elide_all(names: Sequence[str], n: int) -> list[str]:
    """Each of ``names`` elided to ``n`` characters (:func:`elide`); names that would be shortened
    alike keep first the parts that tell them apart (counted from their ends), again while names
    so shortened meet others (BERT's ``output.dense.bias`` and ``output.LayerNorm.bias``)."""
    out = [elide(x, n) for x in names]
    first: dict[int, list[int]] = {}  # by name, the parts kept first so far
    for _ in range(len(names)):
        alike: dict[str, list[int]] = {}
        for i, y in enumerate(out):
            alike.setdefault(y, []).append(i)
        before = list(out)
        for same in (same for same in alike.values() if len(same) > 1):
            split = [names[i].split(".") for i in same]
            for i, p in zip(same, split):
                mine = first.setdefault(i, [])
                mine += [j for j in (len(p) - k for k in _telling_apart(split) if k <= len(p)) if j not in mine]
                out[i] = elide(names[i], n, first=mine)
        if out == before:  # told apart, or as far as these widths allow
            break
    return out


def _telling_apart(split: Sequence[Sequence[str]]) -> list[int]:
    """The fewest parts, counted from the ends (2: the one before the last), nearest the end
    first, that tell dotted names (``split``) apart."""
    chosen: list[int] = []
    for k in range(2, max(map(len, split)) + 1):
        if len({tuple(p[-c] if c <= len(p) else None for c in chosen) for p in split}) == len(split):
            break
        if len({p[-k] if k <= len(p) else None for p in split}) > 1:
            chosen.append(k)
    return chosen


def _extreme(value: float, tasks: list[str], n: int) -> str:
    """``0.000 t00 +3``: the value, the first task at it (cut to ``n``), how many more share it."""
    return f"{value:.3f} {_cut(show_name(tasks[0]), n)}" + (f" +{len(tasks) - 1}" if len(tasks) > 1 else "")


def density_columns(rows: Sequence[Mapping[str, float | None]], tasks: Sequence[str], room: int | None
                    ) -> tuple[str, list[str], str | None]:
    """The density part of a table: its header, one cell per row, and the note to print under
    the table (None: none). A column per task where they fit in ``room`` characters (None:
    always), else min / median / max across the tasks, the first task at each extreme named (cut
    to fit; ``+N``: N more tasks at it), unless that is not a column narrower (a few tasks).

    >>> density_columns([{"a": 0.5, "b": 0.25}], ["a", "b"], None)[:2]
    ('       a        b', ['   0.500    0.250'])
    """
    per_task = (" ".join(f"{show_name(t)[:8]:>8}" for t in tasks),
                [" ".join(f"{_fmt(r.get(t), '.3f'):>8}" for t in tasks) for r in rows], None)
    if room is None or len(tasks) * _COLUMN - 1 <= room:
        return per_task
    spreads = [spread({t: r.get(t) for t in tasks}) for r in rows]
    at = [s.low_tasks[0] for s in spreads if s] + [s.high_tasks[0] for s in spreads if s]
    longest = max([len(show_name(t)) for t in at] or [1])
    for n in range(longest, min(_NAME_MIN, longest) - 1, -1):  # task names as long as the room allows
        lows = ["-" if s is None else _extreme(s.low, s.low_tasks, n) for s in spreads]
        highs = ["-" if s is None else _extreme(s.high, s.high_tasks, n) for s in spreads]
        wl, wh = max([len("min"), *map(len, lows)]), max([len("max"), *map(len, highs)])
        if wl + wh + 10 <= room:
            break
    if wl + wh + 10 + _COLUMN > len(tasks) * _COLUMN - 1:  # a few tasks: their own columns, as narrow
        return per_task
    header = f"{'min':<{wl}}  {'median':>6}  {'max':<{wh}}"
    cells = [f"{lo:<{wl}}  {_fmt(None if s is None else s.median, '.3f'):>6}  {hi:<{wh}}"
             for s, lo, hi in zip(spreads, lows, highs)]
    note = (f"min, max: the lowest and highest density of the {len(tasks)} tasks, and the first task at each "
            "(+N: N more at it); median: of the tasks with a mask; --task NAME: a task's own column")
    return header, cells, note


def wrap(text: str, width: int | None, indent: int = 0) -> list[str]:
    """``text`` as lines of at most ``width`` characters (None: one line), broken at spaces, the
    lines after the first indented by ``indent``."""
    if width is None or len(text) <= width:
        return [text]
    return textwrap.wrap(text, width, subsequent_indent=" " * indent, break_on_hyphens=False) or [text]


def _shape(r: dict[str, Any]) -> str:
    return "per task" if "shapes" in r else "x".join(map(str, r["shape"] or [])) or "scalar"


def render_tensors(rows: list[dict[str, Any]], tasks: list[str], *, width: int | None = TABLE_WIDTH,
                   spread_tasks: bool = True) -> str:
    """The text table of :func:`tensor_rows`: one density column per task where the table fits in
    ``width`` characters (None: always), else its other columns as narrow as their contents, long
    names elided in their middle to fit (:func:`elide_all`) and, with ``spread_tasks``, min /
    median / max across the tasks (see :func:`density_columns`).

    >>> print(render_tensors(tensor_rows(fam.manifest), fam.tasks, width=100))  # doctest: +SKIP
    """
    names = [show_name(r["name"]) for r in rows]  # control characters from the archive escaped
    # a very long name overflows its own row, not every row's column
    name_w = max([len("tensor"), *(len(n) for n in names if len(n) <= NAME_COLUMN_MAX)])
    chains = [", ".join(r["codecs"]) for r in rows if "group" not in r]
    kinds = ["group" if "members" in r else r["kind"] for r in rows]
    shapes, dtypes = [_shape(r) for r in rows], ["per task" if "dtypes" in r else r["dtype"] or "-" for r in rows]
    sizes = [format_size(r["stored_bytes"]) for r in rows]
    # as today's table where a column per task fits; else each column as wide as what it holds
    roomy = width is None or name_w + 46 + max([22, *map(len, chains)]) + len(tasks) * _COLUMN <= width
    if roomy:
        kind_w, shape_w, dtype_w, size_w, codecs = 9, 14, 9, 9, max([22, *map(len, chains)])
    else:
        def fit(title: str, cells: list[str]) -> int:
            return max([len(title), *map(len, cells)])

        kind_w, shape_w, dtype_w = fit("kind", kinds), fit("shape", shapes), fit("dtype", dtypes)
        size_w = fit("stored", [z for z, r in zip(sizes, rows) if "group" not in r])
        held = [len("in " + show_name(r["group"])) - size_w - 1 for r in rows if "group" in r]  # across both
        codecs = max([fit("codec", chains), *held])
    others = kind_w + shape_w + dtype_w + size_w + codecs + 6  # the columns after the name and their spaces
    densities = [r["density"] for r in rows]
    elided = False
    if not roomy and width is not None:  # names elided in their middle to what the narrowest densities leave
        head, cells, _ = density_columns(densities, tasks, 0 if spread_tasks else None)
        narrowest = max(map(len, [head, *cells]))
        room = max(TENSOR_NAME_MIN, len("tensor"), width - others - narrowest)
        if any(len(x) > room for x in names):
            name_w, elided = min(room, max(len(x) for x in names)), True
            names = elide_all(names, name_w)
    fixed = name_w + others
    head, dens, note = density_columns(densities, tasks, None if width is None or not spread_tasks else width - fixed)
    if elided:
        note = ("tensor names shortened to fit (~: parts left out); --json gives them whole"
                + ("" if note is None else f". {note}"))
    header = (f"{'tensor':<{name_w}} {'kind':<{kind_w}} {'shape':<{shape_w}} {'dtype':<{dtype_w}} {'stored':>{size_w}} "
              f"{'codec':<{codecs}} " + head)
    header = header if roomy else header.rstrip()
    lines = [header, "-" * len(header)]
    for r, name, kind, shape, dtype, size, d in zip(rows, names, kinds, shapes, dtypes, sizes, dens):
        # a group's member: where it is stored, in the stored and codec columns (the densities stay aligned)
        stored = (f"{'in ' + show_name(r['group']):<{size_w + 1 + codecs}}" if "group" in r
                  else f"{size:>{size_w}} {', '.join(r['codecs']):<{codecs}}")
        line = f"{name:<{name_w}} {kind:<{kind_w}} {shape:<{shape_w}} {dtype:<{dtype_w}} {stored} {d}"
        lines.append(line if roomy else line.rstrip())
    return "\n".join(lines + ([] if note is None else wrap(note, width)))
