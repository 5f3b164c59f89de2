"""The manifest: what an archive holds, as frozen dataclasses with ``to_dict``/``from_dict``.

``from_dict`` validates at the boundary; a reader ignores keys it does not know (minor versions
only add), and refuses an archive whose structure it cannot trust.
"""

from __future__ import annotations

import math
import reprlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, TypeGuard, cast

from .arrays import ArrayRef
from .checksums import checksum_function
from .encodings import TaskTensor, TensorEntry
from .errors import FormatError, InvalidArgumentError, UnsupportedVersionError
from .folders import check_blob, check_file_map, vcs_folder
from .limits import MAX_INT, MAX_NAME_CHARS, MAX_TASKS
from .merging import METHODS
from .sources import _TRANSFORMERS_WEIGHTS, is_index_name

__all__ = ["Manifest", "TaskInfo", "TaskTensor", "TensorEntry", "check_task_name", "count_kinds", "task_name_problem"]

#: What an archive may ``require`` of its reader (spec §3.1, 1.12): ``groups``, tensor entries
#: with ``members`` (§3.7); ``aliases`` (1.14), names of a stored tensor listed as tensors (§3.8).
KNOWN_REQUIRES = frozenset({"groups", "aliases"})
#: The kinds of tensor entries, in the order reports list them.
KINDS = ("merged", "shared", "task-own", "base-only")


def check_task_name(name: object) -> str:
    """A task name must be usable as a file name and on the command line: non-empty, at most 255
    bytes in UTF-8 (a file name's limit), no '/', '\\', '=', control characters or edge spaces, and
    not '.', '..' or a repository's folder ('.git', '.hg'). The error says which rule the name breaks."""
    why = task_name_problem(name)
    if why is None:
        return cast(str, name)
    raise InvalidArgumentError(f"bad task name {name!r}: {why}")


def task_name_problem(name: object) -> str | None:
    """Which rule of :func:`check_task_name` ``name`` breaks, in a few words; None: none."""
    if not isinstance(name, str) or not name:
        why = "it is empty" if name == "" else f"a task name is a string, not a {type(name).__name__}"
    elif name in (".", ".."):
        why = f"{name!r} names a folder"
    elif vcs_folder(name):  # unpacked: OUT/.git/config, a repository's
        why = f"{name!r} names a repository's folder, whose files run commands (Git's hooks and core.fsmonitor)"
    elif name != name.strip():
        why = "it starts or ends with a space"
    elif any(c in name for c in "/\\="):
        why = "it holds '/', '\\' or '=' (NAME=PATH on the command line; a folder name when unpacked)"
    elif not name.isprintable():
        why = "it holds a control character"
    elif len(name.encode("utf-8", "surrogatepass")) > 255:
        why = f"it is {len(name.encode('utf-8', 'surrogatepass'))} bytes in UTF-8; a folder name holds at most 255"
    else:
        return None
    return why


def count_kinds(entries: tuple[TensorEntry, ...] | list[TensorEntry]) -> dict[str, int]:
    """Number of tensors of each kind (a group, format 1.12, counts its members)."""
    c: Counter[str] = Counter()
    for e in entries:
        c[e.kind] += len(e.members) or 1
    return {k: c.get(k, 0) for k in KINDS}


def _number(v: object, lo: float = -math.inf, hi: float = math.inf) -> bool:
    """None, or a finite int or float in [lo, hi] (JSON integers are already within int64)."""
    return v is None or ((type(v) is int or type(v) is float) and math.isfinite(v) and lo <= v <= hi)


def _name(v: object) -> TypeGuard[str]:
    return isinstance(v, str) and len(v) <= MAX_NAME_CHARS


def _object(d: Any, key: str, where: str) -> dict[str, Any]:
    """``d[key]`` as a JSON object ({} when absent or null)."""
    v = d.get(key)
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise FormatError(f"{where}: {key!r} must be an object")
    return v


def _short(v: object) -> str:
    return reprlib.repr(v)


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
    #: the exact tier's record of the input's files (spec §6.5); None: packed without it
    exact: dict[str, Any] | None = None
    #: the folder's other files (1.4): relative name -> SHA-256 of a stored content
    files: dict[str, str] = field(default_factory=dict)

    def __repr__(self) -> str:  # (a prompt shows this: not every key, nor the config's metadata)
        fid = ", ".join(f"{k} {v:.3g}" for k, v in self.fidelity.items() if isinstance(v, (int, float)))
        return (f"<tallpack TaskInfo {self.name!r}: lambda {self.lam}, density "
                f"{'-' if self.density is None else f'{self.density:.3g}'}{', ' + fid if fid else ''}, "
                f"{len(self.keys)} tensors{', exact' if self.exact is not None else ''}>")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "lambda": self.lam, "density": self.density,
                "fidelity": self.fidelity, "keys": list(self.keys), "source": self.source,
                "metadata": self.metadata, **({"exact": self.exact} if self.exact is not None else {}),
                **({"files": self.files} if self.files else {})}

    @classmethod
    def from_dict(cls, d: Any) -> "TaskInfo":
        if not isinstance(d, dict) or not isinstance(d.get("keys"), list):
            raise FormatError(f"malformed task entry {_short(d)}")
        name = d.get("name")
        if not _name(name):
            raise FormatError(f"task {_short(name)}: the name must be a string of at most {MAX_NAME_CHARS} characters")
        where = f"task {name!r}"
        exact, files = d.get("exact"), d.get("files") or {}
        if exact is not None and not isinstance(exact, dict) or not isinstance(files, dict):
            raise FormatError(f"{where}: exact and files must be JSON objects")
        info = cls(name, d.get("lambda"), d.get("density"), _object(d, "fidelity", where),
                   tuple(d["keys"]), _object(d, "source", where), _object(d, "metadata", where),
                   None if exact is None else dict(exact), dict(files))
        if not all(_name(k) for k in info.keys):
            raise FormatError(f"{where}: keys must be strings of at most {MAX_NAME_CHARS} characters")
        if len(set(info.keys)) != len(info.keys):
            raise FormatError(f"{where}: a key is listed twice")
        if not _number(info.lam, 0) or not _number(info.density, 0, 1):
            raise FormatError(f"{where}: lambda must be a finite number >= 0, density one in [0, 1]")
        if not all(_number(v) for v in info.fidelity.values()):
            raise FormatError(f"{where}: fidelity figures must be finite numbers")
        if not _number(info.source.get("bytes"), 0):
            raise FormatError(f"{where}: source bytes must be a non-negative number")
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
    #: stored folder files (1.4): SHA-256 -> the content as a uint8 array
    files: dict[str, ArrayRef] = field(default_factory=dict)
    #: what a reader must know to read it (1.12): ``"groups"``, ``"aliases"``
    requires: tuple[str, ...] = ()
    #: (1.14) tensor names that are another stored tensor (a tied weight): alias -> target
    aliases: dict[str, str] = field(default_factory=dict)
    #: what ``pack`` advises of the archive it wrote, beside it and not recorded in it (the fidelity
    #: dial's hint that exact=True would be as small): empty for a manifest read from an archive
    hints: tuple[str, ...] = field(default=(), compare=False)

    def __repr__(self) -> str:  # (what a notebook cell ending in pack(...) shows: not every tensor's chunks)
        names = ", ".join(repr(t.name) for t in self.tasks[:8]) + (f", +{len(self.tasks) - 8}" if len(self.tasks) > 8 else "")
        return (f"<tallpack Manifest {'.'.join(map(str, self.format_version))}: {len(self.tasks)} tasks ({names}), "
                f"{len({k for t in self.tasks for k in t.keys})} tensors, merge {self.merge.get('method')!r}>")

    def to_dict(self) -> dict[str, Any]:
        files = {"files": {k: v.to_dict() for k, v in self.files.items()}} if self.files else {}
        return {
            "format": "tallpack",
            "format_version": list(self.format_version),
            **({"requires": list(self.requires)} if self.requires else {}),
            "writer": self.writer,
            "checksum": self.checksum,
            "merge": self.merge,
            "base": self.base,
            "tasks": [t.to_dict() for t in self.tasks],
            "tensors": [t.to_dict() for t in self.tensors],
            **({"aliases": dict(self.aliases)} if self.aliases else {}),
            "stats": self.stats,
            "metadata": self.metadata,
            **files,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Manifest":
        if d.get("format") != "tallpack":
            raise FormatError("manifest does not say format: tallpack")
        checksum_function(d.get("checksum", "crc32"))
        version = d.get("format_version")
        if (not isinstance(version, list) or len(version) != 2
                or not all(type(v) is int and 0 <= v < 1 << 16 for v in version)):
            raise FormatError(f"format_version must be two integers below 65536, got {_short(version)}")
        requires = d.get("requires", [])
        if not isinstance(requires, list) or not all(_name(r) for r in requires) or len(set(requires)) != len(requires):
            raise FormatError("requires must be a list of distinct names")
        unknown = [r for r in requires if r not in KNOWN_REQUIRES]
        if unknown:
            raise UnsupportedVersionError(f"the archive requires {', '.join(map(repr, unknown))}, which this "
                                          "tallpack does not know; upgrade it")
        if not all(isinstance(d.get(k), list) for k in ("tasks", "tensors")) or not isinstance(d.get("merge"), dict):
            raise FormatError("manifest is missing required keys or has malformed ones (tasks, tensors, merge)")
        if len(d["tasks"]) > MAX_TASKS:
            raise FormatError(f"manifest lists {len(d['tasks'])} tasks; at most {MAX_TASKS} are allowed")
        writer = d.get("writer", "")
        if not isinstance(writer, str):
            raise FormatError("writer must be a string")
        tasks = tuple(TaskInfo.from_dict(t) for t in d["tasks"])
        names = {t.name for t in tasks}
        if len(names) != len(tasks):
            raise FormatError("duplicate task names in manifest")
        tensors = tuple(TensorEntry.from_dict(t, names) for t in d["tensors"])
        base, stats = _object(d, "base", "base"), _object(d, "stats", "stats")
        blob_refs = _object(d, "files", "files")
        if not all(isinstance(k, str) for k in blob_refs):
            raise FormatError("file content keys must be strings")
        blobs = {k: ArrayRef.from_dict(v, f"file content {k[:12]}") for k, v in blob_refs.items()}
        aliases = _object(d, "aliases", "manifest")
        if aliases and "aliases" not in requires:
            raise FormatError("aliases in an archive that does not require 'aliases' (spec §3.8)")
        if not all(_name(k) and _name(v) for k, v in aliases.items()):
            raise FormatError(f"aliases must map names to names (strings of at most {MAX_NAME_CHARS} characters)")
        m = cls((version[0], version[1]), writer, d["merge"], tasks, tensors, base, stats,
                _object(d, "metadata", "manifest"), d.get("checksum", "crc32"), blobs, tuple(requires), dict(aliases))
        for digest, ref in blobs.items():
            check_blob(digest, ref)
        for info in tasks:
            check_file_map(info.files, f"task {info.name!r}", blobs)
            _check_no_weight_files(info.files, info.source, f"task {info.name!r}")
        check_file_map(base.get("files") or {}, "base", blobs)
        _check_no_weight_files(base.get("files") or {}, base, "the base")
        _object(base, "metadata", "base")
        if not _number(base.get("bytes"), 0):
            raise FormatError("base bytes must be a non-negative number")
        source_bytes = m.stats.get("source_bytes", 0)
        if type(source_bytes) is not int or not 0 <= source_bytes <= MAX_INT:
            raise FormatError("stats.source_bytes must be a non-negative integer")
        method = m.merge.get("method")
        if not isinstance(method, str):
            raise FormatError("merge.method must be a string")
        if method in METHODS:
            METHODS[method].from_params(m.merge)  # validates its parameters
        by_name: dict[str, TensorEntry] = {}
        for t in tensors:
            if t.name in by_name:
                raise FormatError(f"tensor {t.name!r} appears twice in the manifest")
            if not t.tasks and "base" not in t.arrays:  # §3.3: nothing to read, and no base for a merged model
                raise FormatError(f"tensor {t.name!r}: in no task and holds no base; an entry with no tasks "
                                  "must hold its base (spec §3.3)")
            by_name[t.name] = t
        groups = [t for t in tensors if t.members]
        if groups and "groups" not in requires:
            raise FormatError("tensor entries with members in an archive that does not require 'groups'")
        for g in groups:  # a group is not a tensor of any task: its members are
            del by_name[g.name]
        for g in groups:
            for member in g.members:
                if member.name in by_name:
                    raise FormatError(f"tensor {member.name!r} appears twice in the manifest (in group {g.name!r})")
                by_name[member.name] = g
        for g in groups:
            if g.name in by_name:
                raise FormatError(f"group {g.name!r} has the name of a tensor")
        _check_aliases(aliases, by_name, {g.name for g in groups})
        for info in tasks:
            listed = set(info.keys)
            for key in info.keys:
                target = aliases.get(key)
                if target is not None:
                    if target not in listed:
                        raise FormatError(f"task {info.name!r}: alias {key!r} listed without its target {target!r}")
                elif key not in by_name or info.name not in by_name[key].tasks:
                    raise FormatError(f"task {info.name!r}: tensor {key!r} listed but not stored")
        return m


def _check_no_weight_files(files: dict[str, str], layout: dict[str, Any], where: str) -> None:
    """Spec §3.6: no folder file has the name of a weight file that unpack or merge writes, or
    removes as an earlier output's weights: a shard of the recorded layout, or, at the folder's top
    and in each component or module folder the layout names, one of transformers' and diffusers'
    weight names (``model.safetensors``, ``pytorch_model.bin``, a variant's, a shard's) or a shard
    index. The writer never keeps one (it leaves weight files out there); an archive that has one
    is damaged or made by hand, and which of the two files an output would hold is not defined.
    A subfolder the layout does not name keeps its weight files as folder files (a pipeline's
    ``unet_ema/``)."""
    shards = layout.get("shards")
    runs = {r[0] for r in shards if isinstance(r, list) and r and isinstance(r[0], str)} if isinstance(shards, list) else set()
    components = layout.get("components")
    folders = {"", *(c for c in components if isinstance(c, str))} if isinstance(components, dict) else {""}
    folders |= {r.rpartition("/")[0] for r in runs}
    for name in files:
        folder, _, base = name.rpartition("/")
        if name in runs or (folder in folders and (_TRANSFORMERS_WEIGHTS.fullmatch(base) or is_index_name(base))):
            raise FormatError(f"{where}: folder file {name!r} has the name of a weight file that unpack and merge "
                              "write (or replace); a damaged or hand-made archive (spec §3.6)")


def _check_aliases(aliases: dict[str, str], stored: dict[str, TensorEntry], groups: set[str]) -> None:
    """Spec §3.8: each alias names no stored tensor or group, and its target is a stored tensor
    (an entry or a group's member), not an alias (so no chain and no cycle) nor the alias itself."""
    for alias, target in aliases.items():
        if alias == target:
            why = "names itself"
        elif alias in stored or alias in groups:
            why = "has the name of a stored tensor" if alias in stored else "has the name of a group"
        elif target in aliases:
            why = f"names another alias, {target!r} (a target must be a stored tensor)"
        elif target not in stored:
            why = "names no stored tensor" if target not in groups else "names a group, not a tensor"
        else:
            continue
        raise FormatError(f"alias {alias!r} -> {target!r}: {why} (spec §3.8)")
