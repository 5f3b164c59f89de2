"""What is stored for one tensor, and the registry of encodings.

An **encoding** says what is stored for one tensor of one task and how to rebuild it. It is one
registered object (:class:`Encoding`) with

* its manifest fields: the array refs it keeps in the task entry (``task_arrays``), its other
  values (``task_params``) and the arrays of the tensor entry it needs (``entry_arrays``), all
  validated in ``validate``;
* ``write``: at pack time, store one tensor of the family (every task's copy of it) and return
  what the manifest records;
* ``rebuild``: at read time, rebuild one task's tensor from the arrays.

The task entry's ``encoding`` names it; the tensor entry's ``kind`` names what ``write`` produced.
A reader fails on an unknown encoding only when a tensor using it is read (spec §6.1).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from .._torch import torch
from ..arrays import ArrayRef, check_shape
from ..codecs import Chain
from ..dtypes import dtype_name, tensor_to_bytes
from ..elements import ELEMENTS, numel
from ..errors import FormatError
from ..groups import Member, parse_members
from ..limits import MAX_NAME_CHARS
from ..merging import METHODS

if TYPE_CHECKING:
    from ..container import ContainerWriter
    from .derived import DerivedMerged
    from ..merging import MergeMethod
    from ..tall import Fidelity

#: Array refs a tensor entry may hold, in the order the manifest writes them: the encodings'
#: (base, merged, data) and the merge methods' extra arrays (counts).
ENTRY_ARRAYS: tuple[str, ...] = ("base", "merged", *(k for m in METHODS.values() for k in m.extra_arrays), "data")
#: The merge methods' extra arrays: name -> dtype.
EXTRA_ARRAYS: dict[str, str] = {k: v for m in METHODS.values() for k, v in m.extra_arrays.items()}


def _name(v: object) -> bool:
    return isinstance(v, str) and len(v) <= MAX_NAME_CHARS


class _Empty(dict):
    """An empty dict that cannot be changed: the one that every parsed entry without task arrays,
    params or optional fields holds (a manifest of 64,000 task entries held three dicts each)."""

    __slots__ = ()

    def _refuse(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError("a parsed manifest entry is read-only")

    __setitem__ = __delitem__ = __ior__ = update = setdefault = pop = popitem = clear = _refuse

    def __reduce__(self) -> tuple:
        return _empty, ()


def _empty() -> Any:
    return EMPTY


#: The shared empty mapping of parsed entries (``_Empty``).
EMPTY: Any = _Empty()
#: Element type names as one string each (a manifest repeats "float32" once per task entry).
_DTYPES: dict[str, str] = {k: k for k in ELEMENTS}
_new = object.__new__
_set = object.__setattr__  # a frozen dataclass's fields, as its __init__ sets them (which is slower)


def _arrays(d: Mapping[str, Any], keys: tuple[str, ...], where: str) -> dict[str, ArrayRef]:
    out = {}
    for k in keys:
        v = d.get(k)
        if v is not None:
            out[k] = ArrayRef.from_dict(v, (where, k))
    return out or EMPTY


@dataclass(frozen=True, slots=True)
class TaskTensor:
    """One task's view of one tensor: its encoding, dtype and shape, and the encoding's fields.

    A parsed entry (``from_dict``) holds the shared read-only ``EMPTY`` for absent arrays, params
    and extras, and its encoding and dtype names as the registry's and ``ELEMENTS``' strings."""

    encoding: str
    dtype: str
    shape: tuple[int, ...]
    arrays: dict[str, ArrayRef] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    #: optional fields registered in FIELDS (the exact tier's ``exact``), parsed
    extras: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"encoding": self.encoding, "dtype": self.dtype, "shape": list(self.shape)}
        enc = REGISTRY.get(self.encoding)
        order = enc.field_order() if enc else (*self.arrays, *self.params)
        for k in order:
            if k in self.arrays:
                d[k] = self.arrays[k].to_dict()
            elif k in self.params:
                d[k] = self.params[k]
        for k, v in self.extras.items():
            d[k] = v.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: Any, where: str) -> "TaskTensor":
        if not isinstance(d, dict) or "encoding" not in d or "dtype" not in d or "shape" not in d:
            raise FormatError(f"{where}: malformed task entry")
        name, dtype = d["encoding"], d["dtype"]
        enc = REGISTRY.get(name) if isinstance(name, str) else None
        if enc is None and not _name(name):
            raise FormatError(f"{where}: the encoding is not a name")
        try:
            shape = check_shape(d["shape"])
        except ValueError as e:
            raise FormatError(f"{where}: {e}") from None
        known = _DTYPES.get(dtype) if isinstance(dtype, str) else None
        if known is None and not _name(dtype):
            raise FormatError(f"{where}: bad dtype")
        tt = _new(cls)  # a manifest has tens of thousands
        _set(tt, "dtype", known or dtype)
        _set(tt, "shape", shape)
        if enc is None:  # a newer encoding: this tensor fails when read, the rest stays readable
            for k, v in (("encoding", name), ("arrays", EMPTY), ("params", EMPTY), ("extras", EMPTY)):
                _set(tt, k, v)
            return tt
        _set(tt, "encoding", enc.name)
        arrays = _arrays(d, enc.task_arrays, where)
        _set(tt, "arrays", arrays)
        params = {}
        for k in enc.task_params:
            if k in d:
                params[k] = d[k]
        _set(tt, "params", params or EMPTY)
        _set(tt, "extras", EMPTY)
        if enc.shaped_arrays:
            for k, ref in arrays.items():
                if ref.shape != shape:
                    raise FormatError(f"{where}: array {k!r} has shape {ref.shape}, the tensor {shape}")
        if not _FIELD_KEYS.isdisjoint(d.keys()):
            _set(tt, "extras", {})
            for key, fcls in FIELDS.items():
                if d.get(key) is not None:
                    tt.extras[key] = fcls.from_dict(d[key], tt, f"{where} ({key})")
            if not tt.extras:
                _set(tt, "extras", EMPTY)
        return tt


@dataclass(frozen=True, slots=True)
class TensorEntry:
    """One tensor name of the family and everything stored for it."""

    name: str
    kind: str
    tasks: dict[str, TaskTensor]
    arrays: dict[str, ArrayRef] = field(default_factory=dict)
    #: a group's tensors (format 1.12, ``tallpack.groups``); empty for an entry of one tensor
    members: tuple[Member, ...] = ()

    def all_arrays(self) -> list[tuple[str, ArrayRef]]:
        """Every array of this entry, as ``(key, ref)``; task arrays keyed ``task/key``."""
        out = list(self.arrays.items())
        add = out.append  # (no comprehension per task: an open lists 64,000 task entries' arrays)
        for task, tt in self.tasks.items():
            for k, a in tt.arrays.items():
                add((f"{task}/{k}", a))
            for key, v in tt.extras.items():
                for k, a in v.arrays.items():
                    add((f"{task}/{key}/{k}", a))
        return out

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "kind": self.kind,
                             "tasks": {k: v.to_dict() for k, v in self.tasks.items()}}
        for key in ENTRY_ARRAYS:
            if key in self.arrays:
                d[key] = self.arrays[key].to_dict()
        if self.members:
            d["members"] = [m.to_json() for m in self.members]
        return d

    @classmethod
    def from_dict(cls, d: Any, tasks: set[str]) -> "TensorEntry":
        if not isinstance(d, dict) or not isinstance(d.get("tasks"), dict):
            raise FormatError("malformed tensor entry: not an object with a 'tasks' object")
        name, kind = d.get("name"), d.get("kind")
        if not _name(name) or not _name(kind):
            raise FormatError(f"tensor entry: name and kind must be strings of at most {MAX_NAME_CHARS} characters")
        where = f"tensor {name!r}"
        entry = _new(cls)  # as TaskTensor.from_dict
        _set(entry, "name", name)
        _set(entry, "kind", kind)
        wheres = {t: f"{where}, task {t!r}" for t in d["tasks"]}
        _set(entry, "tasks", {t: TaskTensor.from_dict(v, wheres[t]) for t, v in d["tasks"].items()})
        _set(entry, "arrays", _arrays(d, ENTRY_ARRAYS, where))
        _set(entry, "members", ())
        if d.get("members") is not None:
            _set(entry, "members", _group_members(entry, d["members"], where))
        if not tasks.issuperset(entry.tasks):
            raise FormatError(f"{where}: entries for unknown tasks {sorted(set(entry.tasks) - tasks)}")
        last: tuple[type[Encoding] | None, tuple[int, ...] | None] = (None, None)
        for task, tt in entry.tasks.items():
            enc = REGISTRY.get(tt.encoding)
            if enc is not None:
                enc.validate(entry, tt, wheres[task])
                if enc is not last[0] or tt.shape is not last[1]:  # a tensor's tasks: one encoding and shape
                    enc.validate_tensor(entry, tt, wheres[task])
                    last = (enc, tt.shape)
        return entry


def _group_members(entry: TensorEntry, value: Any, where: str) -> tuple[Member, ...]:
    """A group's members (spec §3.7): the group is a flat tensor of the same length in every
    task and array, and each member a run of its elements."""
    lengths = {tt.shape for tt in entry.tasks.values()} | {r.shape for r in entry.arrays.values()}
    if len(lengths) != 1 or len(next(iter(lengths))) != 1 or not entry.tasks:
        raise FormatError(f"{where}: a group is one flat tensor of the same length in every task and array")
    return parse_members(value, next(iter(lengths))[0], where)


# -- pack time -----------------------------------------------------------------------------------

@dataclass
class WriteContext:
    """What an encoding's ``write`` may use: the container, chains, the merge method, lambdas,
    and the per-task fidelity accumulators."""

    writer: "ContainerWriter"
    chunk_elements: int
    dense: Callable[[str], Chain]  # dtype name -> chain for dense arrays
    masks: Chain
    method: "MergeMethod"
    lambdas: dict[str, float]
    fidelity: dict[str, "Fidelity"]
    #: the exact tier: itemsize -> chain for residuals; None when packing without it
    residuals: Callable[[int], Chain] | None = None
    #: the exact tier with derived masks: ``Tall.write`` encodes each task's mask but holds its
    #: chunks here (tensor name -> per task, the encoded chunks) instead of writing them;
    #: ``exact.add_exact`` then writes each or derives it (format 1.6). None: masks are written.
    held_masks: dict[str, list[list[bytes | memoryview]]] | None = None
    #: the exact tier with derived merged vectors (format 1.8): ``Tall.write`` also holds the
    #: encoded chunks of the merged vector and the method's extra arrays here (tensor name ->
    #: key -> (dtype, chunks)); ``exact.add_exact`` writes them, or leaves them out where every
    #: task's mask is derived and the derivation gives the same bits. None: they are written.
    held_merged: dict[str, dict[str, tuple[str, list[bytes | memoryview]]]] | None = None
    #: threads the per-task work of a block may run on at once (the tasks' masks)
    threads: int = 1
    #: ``write`` may return a ``Later``: its tensor's last chunks still being encoded while the
    #: packer goes on (the packer resolves it once the writer has drained). Off for the exact tier
    #: and the fidelity dial, which read what was written.
    defer: bool = False

    def whole(self, t: torch.Tensor) -> ArrayRef:
        """Write a whole tensor as one dense array."""
        dt = dtype_name(t.dtype)
        return self.writer.write_array(tensor_to_bytes(t), dt, tuple(t.shape), self.dense(dt), self.chunk_elements)


class Later:
    """A tensor entry whose last chunks are queued in the writer (``WriteContext.defer``):
    ``entry()`` gives it once ``ContainerWriter.drain`` has written them."""

    __slots__ = ("entry",)

    def __init__(self, entry: Callable[[], TensorEntry]) -> None:
        self.entry = entry


def settled(ctx: WriteContext, written: "TensorEntry | Later") -> TensorEntry:
    """The entry a ``write`` gave: at once, or once the writer has written the chunks it queued."""
    if isinstance(written, Later):
        ctx.writer.drain()
        return written.entry()
    return written


class Stream(Protocol):
    """The inputs of one tensor, read from their files a block at a time (``inputs.Streamed``)."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def dtypes(self) -> tuple[torch.dtype | None, tuple[torch.dtype, ...]]:
        """The base's dtype (None: absent) and the tasks'."""
        ...

    def whole(self) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """The base and every task's tensor, read whole."""
        ...

    def block(self, start: int, stop: int) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """Elements ``[start, stop)`` of the base and of every task's tensor, flat, each read anew."""
        ...

    def task(self, i: int) -> torch.Tensor:
        """Task ``i``'s tensor alone, read whole."""
        ...

    def pair(self, i: int, start: int, stop: int, base: bool) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Elements ``[start, stop)`` of the base (with ``base``, else None) and of task ``i``'s
        tensor alone, flat, each read anew."""
        ...


class Item:
    """One tensor of the family at pack time: its name, the kind it was planned as and the kind it
    is stored as (``plan.resolve``), its tasks, and the tensors (``base`` None when absent).

    With a ``stream``, the tensors are read from their files only when ``base`` or ``thetas`` is
    first asked for; :meth:`blocks` reads them a block at a time instead, so that a tensor whose
    copies are too large to hold at once (``inputs.HOLD_BYTES``) costs a block of each."""

    __slots__ = ("name", "planned", "kind", "tasks", "_base", "_thetas", "_stream")

    def __init__(self, name: str, planned: str, kind: str, tasks: tuple[str, ...], base: torch.Tensor | None,
                 thetas: list[torch.Tensor], stream: Stream | None = None) -> None:
        self.name, self.planned, self.kind, self.tasks = name, planned, kind, tasks
        self._base, self._thetas, self._stream = base, thetas, stream

    def _hold(self) -> None:
        if self._stream is not None:
            self._base, self._thetas = self._stream.whole()
            self._stream = None

    @property
    def base(self) -> torch.Tensor | None:
        self._hold()
        return self._base

    @property
    def thetas(self) -> list[torch.Tensor]:
        self._hold()
        return self._thetas

    def task(self, i: int) -> torch.Tensor:
        """Task ``i``'s tensor: held, or (streamed) read whole, that task's copy alone, each time asked."""
        return self._thetas[i] if self._stream is None else self._stream.task(i)

    @property
    def streamed(self) -> bool:
        """Whether the tensors are still read a block at a time (``base``/``thetas`` not asked for)."""
        return self._stream is not None

    @property
    def shape(self) -> tuple[int, ...]:
        """The first task's shape (else the base's), without reading it."""
        if self._stream is not None:
            return self._stream.shape
        first = self._thetas[0] if self._thetas else self._base
        assert first is not None
        return tuple(first.shape)

    @property
    def dtypes(self) -> tuple[torch.dtype | None, tuple[torch.dtype, ...]]:
        """The base's dtype (None when absent) and each task's, without reading them."""
        if self._stream is not None:
            return self._stream.dtypes
        return (None if self._base is None else self._base.dtype), tuple(t.dtype for t in self._thetas)

    def blocks(self, elements: int) -> Iterator[tuple[int, torch.Tensor | None, list[torch.Tensor]]]:
        """``(start, base block, task blocks)`` for each run of ``elements`` elements of the flat
        tensors, in order: views of the tensors held, or each block read anew when streamed (every
        block a tensor of its own, which later blocks do not overwrite)."""
        n = numel(self.shape)
        if self._stream is not None:
            stream = self._stream
            for a in range(0, n, elements):
                b, xs = stream.block(a, min(n, a + elements))
                yield a, b, xs
            return
        base = None if self._base is None else self._base.reshape(-1)
        flats = [t.reshape(-1) for t in self._thetas]
        for a in range(0, n, elements):
            yield a, (None if base is None else base[a : a + elements]), [f[a : a + elements] for f in flats]

    def task_blocks(self, i: int, elements: int, base: bool = True
                    ) -> Iterator[tuple[int, torch.Tensor | None, torch.Tensor]]:
        """:meth:`blocks` of the base (with ``base``, else None) and of task ``i`` alone: a streamed
        item reads those two copies' blocks, not every task's."""
        n = numel(self.shape)
        if self._stream is not None:
            stream = self._stream
            for a in range(0, n, elements):
                b, x = stream.pair(i, a, min(n, a + elements), base)
                yield a, b, x
            return
        flat = self._thetas[i].reshape(-1)
        b_flat = None if self._base is None or not base else self._base.reshape(-1)
        for a in range(0, n, elements):
            yield a, (None if b_flat is None else b_flat[a : a + elements]), flat[a : a + elements]


class Use(enum.Enum):
    """How ``rebuild`` uses an input array, which tells the reader what it may hand over."""

    OUTPUT = "output"  # returned to the caller: a tensor of its own
    INPUT = "input"  # only read, for this task: may be a read-only view of the file
    SHARED_INPUT = "shared-input"  # only read, the same for every task: may also come from a cache


#: Reads one array of the archive as a tensor: ``read(ref, where, use=Use.OUTPUT)``.
ReadArray = Callable[..., "torch.Tensor"]


class Encoding:
    """One way of storing a tensor. Subclasses set the class attributes and the three methods."""

    name: ClassVar[str | None]  # the task entry's "encoding" (None: writes no task entries)
    kind: ClassVar[str | None]  # the tensor entry's "kind" that ``write`` produces (None: no ``write``)
    task_arrays: ClassVar[tuple[str, ...]] = ()
    task_params: ClassVar[tuple[str, ...]] = ()
    entry_arrays: ClassVar[tuple[str, ...]] = ()
    #: whether element i of the tensor depends only on element i of each input array, so a range
    #: of elements can be rebuilt from the same range of the inputs (``get_slice``)
    elementwise: ClassVar[bool] = False
    #: whether every task array has the tensor's shape (checked at open); False: ``validate`` checks
    shaped_arrays: ClassVar[bool] = True

    @classmethod
    def field_order(cls) -> tuple[str, ...]:
        return (*cls.task_arrays, *cls.task_params)

    @classmethod
    def validate(cls, entry: TensorEntry, tt: TaskTensor, where: str) -> None:
        """Check a task entry against its tensor entry; the default needs its arrays present."""
        for k in cls.task_arrays:
            if k not in tt.arrays:
                raise FormatError(f"{where}: a {cls.name} entry needs {k!r}")
        for k in cls.entry_arrays:
            if k not in entry.arrays:
                raise FormatError(f"{where}: a {cls.name} entry needs the tensor's {k!r} array")

    @classmethod
    def validate_tensor(cls, entry: TensorEntry, tt: TaskTensor, where: str) -> None:
        """Check what a task entry of this encoding needs of the tensor entry alone, given its
        shape (its base, its merged vector): called after ``validate``, once per tensor entry
        and shape rather than once per task. Must not depend on anything else of ``tt``."""

    @classmethod
    def write(cls, ctx: WriteContext, item: Item) -> "TensorEntry | Later":
        raise NotImplementedError

    @classmethod
    def inputs(cls, entry: TensorEntry, tt: TaskTensor) -> Mapping[str, tuple[ArrayRef | DerivedMerged, Use]]:
        """The arrays ``rebuild`` needs, by key, and how it uses each. The reader decodes them
        (in parallel, from its cache, or as views of the file, as each use allows)."""
        raise NotImplementedError

    @classmethod
    def rebuild(cls, arrays: Mapping[str, torch.Tensor], entry: TensorEntry, tt: TaskTensor) -> torch.Tensor:
        """The task's tensor from the decoded ``inputs``; must not modify them."""
        raise NotImplementedError

    @classmethod
    def rebuild_parts(cls, arrays: Mapping[str, Any], entry: TensorEntry, tt: TaskTensor,
                      parts: Sequence[Member]) -> list[torch.Tensor]:
        """A group's members (format 1.12): each ``parts`` member's elements of the rebuilt flat
        tensor, as a tensor of its own of the member's shape. By default the whole is rebuilt and
        each member copied out; an encoding may rebuild each straight into its own tensor."""
        return split_parts(cls.rebuild(arrays, entry, tt), parts)

    @classmethod
    def fresh_output(cls, tt: TaskTensor) -> bool:
        """Whether ``rebuild`` of this entry always returns a new tensor that shares no memory with
        its input arrays: the reader may then decode the inputs its cache does not keep into
        buffers it reuses from tensor to tensor (fresh memory costs as much as decoding)."""
        return False

    @classmethod
    def planar_inputs(cls, entry: TensorEntry, tt: TaskTensor) -> tuple[str, ...]:
        """Inputs that ``rebuild`` also takes as stored byte planes (a :class:`tallpack.tall.Planar`
        in place of the tensor) when every one of them is a float32, bfloat16 or float16 array stored as
        ``planes`` or ``planes-exp`` with the same chunks: the reader then skips joining them into
        elements, and its cache keeps only the planes that were compressed."""
        return ()

    @classmethod
    def bit_inputs(cls, entry: TensorEntry, tt: TaskTensor) -> tuple[str, ...]:
        """Bool inputs that ``rebuild`` also takes as their stored bits (a :class:`tallpack.tall.Bits`
        in place of the tensor) when each is stored bit-packed (codec ``bitpack`` first) with whole
        bytes per chunk: the reader then decodes them only to their bits, never to a byte each."""
        return ()


#: Encodings by the name task entries use.
REGISTRY: dict[str, type[Encoding]] = {}
#: Optional task-entry fields that any encoding's entry may carry, by key (``exact``: the exact
#: tier's residual, ``encodings/exact.py``). A class with ``from_dict(d, task_tensor, where)``
#: whose instances have ``to_dict()`` and ``arrays`` (name -> ArrayRef). Readers that do not know
#: a field ignore it (spec §8), so the entry's own encoding stays readable.
FIELDS: dict[str, Any] = {}
_FIELD_KEYS = FIELDS.keys()
#: The encoding whose ``write`` stores each kind of tensor.
BY_KIND: dict[str, type[Encoding]] = {}


def register(cls: type[Encoding]) -> type[Encoding]:
    """Class decorator: make an encoding known by its name and kind."""
    if cls.name is not None:
        assert cls.name not in REGISTRY, cls.name
        REGISTRY[cls.name] = cls
    if cls.kind is not None:
        assert cls.kind not in BY_KIND, cls.kind
        BY_KIND[cls.kind] = cls
    return cls


def register_field(key: str):
    """Class decorator: make an optional task-entry field known under ``key``."""
    def deco(cls):
        assert key not in FIELDS, key
        FIELDS[key] = cls
        return cls
    return deco


def split_parts(flat: torch.Tensor, parts: Sequence[Member]) -> list[torch.Tensor]:
    """Each member's elements of a group's rebuilt flat tensor, copied into a tensor of its own."""
    flat = flat.reshape(-1)
    return [flat[m.offset : m.offset + m.numel].clone().view(m.shape) for m in parts]


def iter_arrays(entries: Iterable[TensorEntry]) -> Iterator[tuple[str, str, ArrayRef]]:
    """``(tensor name, key, ref)`` for every array of every entry."""
    for e in entries:
        for key, ref in e.all_arrays():
            yield e.name, key, ref
