"""The manifest: what an archive holds, as frozen dataclasses with ``to_dict``/``from_dict``.

``from_dict`` validates at the boundary; a reader ignores keys it does not know (minor versions
only add), and refuses an archive whose structure it cannot trust.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .container import ArrayRef
from .dtypes import FLOATING
from .errors import FormatError, UnsupportedVersionError

# A task's tensor is stored as "tall", "dense" or "shared"; readers raise UnsupportedVersionError
# on other encodings when that tensor is read, so a minor version can add encodings.
#: Chunk checksum algorithms: CRC-32 (zlib's) of each chunk's stored bytes.
CHECKSUMS = ("crc32",)


def _arr(d: dict, key: str, where: str) -> ArrayRef | None:
    v = d.get(key)
    return None if v is None else ArrayRef.from_dict(v, f"{where} ({key})")


def _opt(ref: ArrayRef | None) -> dict | None:
    return None if ref is None else ref.to_dict()


@dataclass(frozen=True)
class TaskTensor:
    """One task's view of one tensor: its dtype/shape and the arrays that rebuild it."""

    encoding: str
    dtype: str
    shape: tuple[int, ...]
    mask: ArrayRef | None = None  # tall
    data: ArrayRef | None = None  # dense
    ones: int | None = None  # tall: set bits in the mask

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"encoding": self.encoding, "dtype": self.dtype, "shape": list(self.shape)}
        if self.mask is not None:
            d["mask"] = self.mask.to_dict()
            d["ones"] = self.ones
        if self.data is not None:
            d["data"] = self.data.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: Any, where: str) -> "TaskTensor":
        try:
            t = cls(d["encoding"], d["dtype"], tuple(d["shape"]), _arr(d, "mask", where),
                    _arr(d, "data", where), d.get("ones"))
        except (KeyError, TypeError):
            raise FormatError(f"{where}: malformed task entry") from None
        for ref in (t.mask, t.data):
            if ref is not None and ref.shape != t.shape:
                raise FormatError(f"{where}: array shape {ref.shape} differs from {t.shape}")
        if t.encoding == "tall":
            if t.mask is None or t.mask.dtype != "bool" or t.dtype not in FLOATING:
                raise FormatError(f"{where}: a tall entry needs a bool mask and a floating dtype")
            if type(t.ones) is not int or not 0 <= t.ones <= t.mask.numel:
                raise FormatError(f"{where}: bad count of set mask bits {t.ones!r}")
        if t.encoding == "dense" and (t.data is None or t.data.dtype != t.dtype):
            raise FormatError(f"{where}: a dense entry needs data of dtype {t.dtype}")
        return t


@dataclass(frozen=True)
class TensorEntry:
    """One tensor name of the family and everything stored for it."""

    name: str
    kind: str
    tasks: dict[str, TaskTensor]
    base: ArrayRef | None = None  # merged, base-only
    merged: ArrayRef | None = None  # merged: tau_MTL, float32
    counts: ArrayRef | None = None  # merged with TIES: entries in the disjoint sum, uint8
    data: ArrayRef | None = None  # shared

    def arrays(self) -> list[tuple[str, ArrayRef]]:
        out = [(k, a) for k, a in (("base", self.base), ("merged", self.merged),
                                   ("counts", self.counts), ("data", self.data)) if a is not None]
        for task, tt in self.tasks.items():
            out += [(f"{task}/{k}", a) for k, a in (("mask", tt.mask), ("data", tt.data)) if a is not None]
        return out

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "kind": self.kind,
                             "tasks": {k: v.to_dict() for k, v in self.tasks.items()}}
        for key in ("base", "merged", "counts", "data"):
            ref = getattr(self, key)
            if ref is not None:
                d[key] = ref.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: Any, tasks: set[str]) -> "TensorEntry":
        try:
            name = d["name"]
            where = f"tensor {name!r}"
            entry = cls(
                name, d["kind"],
                {t: TaskTensor.from_dict(v, f"{where}, task {t!r}") for t, v in d["tasks"].items()},
                _arr(d, "base", where), _arr(d, "merged", where), _arr(d, "counts", where),
                _arr(d, "data", where),
            )
        except (KeyError, TypeError, AttributeError):
            raise FormatError(f"malformed tensor entry {str(d)[:80]}") from None
        if not isinstance(name, str):
            raise FormatError(f"tensor name {name!r} is not a string")
        unknown = set(entry.tasks) - tasks
        if unknown:
            raise FormatError(f"{where}: entries for unknown tasks {sorted(unknown)}")
        for task, tt in entry.tasks.items():
            if tt.encoding == "tall":
                if entry.base is None or entry.merged is None:
                    raise FormatError(f"{where}: masks without base and merged vector")
                if entry.base.shape != tt.shape or entry.merged.shape != tt.shape:
                    raise FormatError(f"{where}, task {task!r}: shape differs from the base's")
                if entry.merged.dtype != "float32" or entry.base.dtype not in FLOATING:
                    raise FormatError(f"{where}: merged vector must be float32 and the base floating")
                if entry.counts is not None and (entry.counts.shape != tt.shape or entry.counts.dtype != "uint8"):
                    raise FormatError(f"{where}: counts must be uint8 of the base's shape")
            if tt.encoding == "shared":
                if entry.data is None or entry.data.shape != tt.shape or entry.data.dtype != tt.dtype:
                    raise FormatError(f"{where}, task {task!r}: shared data missing or of another shape/dtype")
        return entry


@dataclass(frozen=True)
class TaskInfo:
    """One member of the family: its name, lambda, mask density and fidelity, and where it came from."""

    name: str
    lam: float | None
    density: float | None
    fidelity: dict[str, Any]
    keys: tuple[str, ...]
    source: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "lambda": self.lam, "density": self.density,
                "fidelity": self.fidelity, "keys": list(self.keys), "source": self.source,
                "metadata": self.metadata}

    @classmethod
    def from_dict(cls, d: Any) -> "TaskInfo":
        try:
            info = cls(d["name"], d.get("lambda"), d.get("density"), dict(d.get("fidelity") or {}),
                       tuple(d["keys"]), dict(d.get("source") or {}), dict(d.get("metadata") or {}))
        except (KeyError, TypeError, ValueError):
            raise FormatError(f"malformed task entry {str(d)[:80]}") from None
        if not isinstance(info.name, str) or not all(isinstance(k, str) for k in info.keys):
            raise FormatError(f"task {info.name!r}: names must be strings")
        figures = [info.lam, info.density, *info.fidelity.values()]
        if not all(v is None or type(v) in (int, float) for v in figures):
            raise FormatError(f"task {info.name!r}: lambda, density and fidelity must be numbers")
        return info


@dataclass(frozen=True)
class Manifest:
    """The whole archive's index."""

    format_version: tuple[int, int]
    writer: str
    merge: dict[str, Any]
    tasks: tuple[TaskInfo, ...]
    tensors: tuple[TensorEntry, ...]
    base: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    checksum: str = "crc32"

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "tallpack",
            "format_version": list(self.format_version),
            "writer": self.writer,
            "checksum": self.checksum,
            "merge": self.merge,
            "base": self.base,
            "tasks": [t.to_dict() for t in self.tasks],
            "tensors": [t.to_dict() for t in self.tensors],
            "stats": self.stats,
            "metadata": self.metadata,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Manifest":
        if d.get("format") != "tallpack":
            raise FormatError("manifest does not say format: tallpack")
        if d.get("checksum", "crc32") not in CHECKSUMS:
            raise UnsupportedVersionError(f"unknown checksum {d.get('checksum')!r}; a newer tallpack may read it")
        try:
            tasks = tuple(TaskInfo.from_dict(t) for t in d["tasks"])
            names = {t.name for t in tasks}
            if len(names) != len(tasks):
                raise FormatError("duplicate task names in manifest")
            tensors = tuple(TensorEntry.from_dict(t, names) for t in d["tensors"])
            version = tuple(d["format_version"])
            m = cls((int(version[0]), int(version[1])), str(d.get("writer", "")), dict(d["merge"]),
                    tasks, tensors, dict(d.get("base") or {}), dict(d.get("stats") or {}),
                    dict(d.get("metadata") or {}), d.get("checksum", "crc32"))
        except FormatError:
            raise
        except (KeyError, TypeError, ValueError, IndexError):
            raise FormatError("manifest is missing required keys or has malformed ones") from None
        if type(m.stats.get("source_bytes", 0)) is not int:
            raise FormatError("stats.source_bytes must be an integer")
        if not isinstance(m.merge.get("method"), str):
            raise FormatError("merge.method must be a string")
        seen = set()
        for t in tensors:
            if t.name in seen:
                raise FormatError(f"tensor {t.name!r} appears twice in the manifest")
            seen.add(t.name)
        by_name = {t.name: t for t in tensors}
        for info in tasks:
            for key in info.keys:
                if key not in by_name or info.name not in by_name[key].tasks:
                    raise FormatError(f"task {info.name!r}: tensor {key!r} listed but not stored")
        return m
