"""The exact tier: per task and merged tensor, the residual that turns a reference into the
original bits (spec §6.1.5).

A ``tall`` task entry keeps its lossy fields and gains an optional ``exact`` field::

    "exact": {"reference": "tall" | "base" | "zero", "transform": "sub" | "xor",
              "order": "exponent", "residual": <array ref, uint of the task's itemsize>,
              "xxh3": <xxh3-64 of the original tensor's bytes>}

Readers that do not know the field still read the lossy tier. The original is rebuilt as
``inverse(transform)(residual, R)`` with R the reference's bits; within each chunk the residual
is stored in the stable order of R's exponent field, which groups elements of like magnitude
(ulp) so zstd sees narrower distributions. ``sub`` is the difference of the bit patterns as
ordered integers, zigzag-coded (small steps in ulps become small numbers); ``xor`` is ZipLLM's
BitX. The writer picks, per task and tensor, the combination that codes smallest on a sample.

``dense`` and ``shared`` entries hold the original bits already and need no residual.
"""

from __future__ import annotations

import inspect
import logging
import math
import os
import tempfile
from dataclasses import dataclass
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np
import xxhash

from .. import kernels, memory
from .._torch import torch
from ..arrays import ArrayRef
from ..container import PREFETCH_BYTES, ArrayBuilder
from ..container import _reading as fetching  # a failed remote fetch names what it was for
from ..codecs import BitSplit, Chain
from ..dtypes import cat, dtype_name, narrow, tensor_to_bytes, torch_dtype
from ..elements import itemsize, numel
from ..errors import FormatError, IntegrityError, OutputError
from ..merging import derive_merged
from ..tall import blocks, reconstruct, tall_mask
from .base import FIELDS, Item, ReadArray, TaskTensor, TensorEntry, Use, WriteContext, register_field
from .tall import Tall

#: The exponent field of each floating type: (exponent bits, mantissa bits).
EXPONENT: dict[str, tuple[int, int]] = {
    "float64": (11, 52), "float32": (8, 23), "float16": (5, 10), "bfloat16": (8, 7),
    "float8_e4m3fn": (4, 3), "float8_e5m2": (5, 2),
}
_UINT = {1: (np.uint8, "uint8"), 2: (np.uint16, "uint16"), 4: (np.uint32, "uint32"), 8: (np.uint64, "uint64")}
REFERENCES = ("tall", "base", "zero")
#: The encodings an ``exact`` field may belong to: ``tall`` (its mask stored), ``tall-derived``
#: (its mask derived from the original, ``encodings/derived.py``) and ``tall-derived-merged`` (the
#: tensor's merged vector derived too, ``encodings/derived_merged.py``).
TALL_ENCODINGS = ("tall", "tall-derived", "tall-derived-merged")
#: Those whose original must come back without the mask: a residual against the base or zero.
DERIVED_ENCODINGS = TALL_ENCODINGS[1:]
TRANSFORMS = ("sub", "xor")
ORDERS = ("exponent", "none")
#: The references the writer tries (benchmarks narrow it to measure one against another).
CANDIDATES: tuple[str, ...] = REFERENCES
#: Where the writer may leave a mask out (``tall-derived``, format 1.6): ``"choose"``, where the
#: residual against the base or zero codes smaller than mask + residual against the best reference;
#: ``"store"``: never; ``"derive"``: always (benchmarks and tests set the last two).
MASK_POLICY = "choose"
#: Where the writer may leave a tensor's merged vector out (``tall-derived-merged``, format 1.8):
#: ``"derive"`` where every task's mask is derived and the derivation gives the stored bits;
#: ``"store"``: never (benchmarks set it).
MERGED_POLICY = "derive"
#: Elements of each tensor the writer codes each candidate on before choosing.
SAMPLE_ELEMENTS = 1 << 18
#: The residual codecs the writer tries (benchmarks narrow it): ``planes`` (byte planes, the
#: archive's residual chain) and ``bitsplit`` (format 1.9: each element's bit length and two bits
#: below its leading one, zstd-coded, then its low bits verbatim; itemsizes 1, 2 and 4).
RESIDUAL_CODECS: tuple[str, ...] = ("planes", "bitsplit")

#: Reads elements ``[start, stop)`` of one array as their bytes, without torch:
#: ``read(ref, where, use, *, start=0, stop=None) -> np.ndarray`` (uint8; read-only where it is a
#: view of the file). Its ``__self__.source`` is the archive's, through which :func:`runs` prefetches.
ReadBytes = Callable[..., np.ndarray]

log = logging.getLogger(__name__)


# -- the transforms, on bit patterns as unsigned integers (numpy, wrapping arithmetic) -------------

def _ordered(u: np.ndarray) -> np.ndarray:
    """Bit patterns as integers ordered like the floats they encode (an involution): a set sign
    bit flips the other bits."""
    n = u.dtype.itemsize * 8
    low = u.dtype.type((1 << (n - 1)) - 1)
    return u ^ ((u >> u.dtype.type(n - 1)) * low)


def forward(x: np.ndarray, r: np.ndarray, transform: str) -> np.ndarray:
    """The residual of original bits ``x`` against reference bits ``r``."""
    if transform == "xor":
        return x ^ r
    n = x.dtype.itemsize * 8
    d = _ordered(x) - _ordered(r)
    return (d << x.dtype.type(1)) ^ (x.dtype.type(0) - (d >> x.dtype.type(n - 1)))


def inverse(z: np.ndarray, r: np.ndarray, transform: str) -> np.ndarray:
    if transform == "xor":
        return z ^ r
    d = (z >> z.dtype.type(1)) ^ (z.dtype.type(0) - (z & z.dtype.type(1)))
    return _ordered(_ordered(r) + d)


def order_key(r: np.ndarray, dtype: str) -> np.ndarray:
    e, m = EXPONENT[dtype]
    key = (r >> r.dtype.type(m)) & r.dtype.type((1 << e) - 1)
    return key.astype(np.uint8 if e <= 8 else np.uint16)


def _orders(r: np.ndarray, dtype: str, ce: int):
    """For each chunk of ``ce`` elements: its slice and the stable order of R's exponent field."""
    for a in range(0, r.size, ce):
        yield slice(a, a + ce), np.argsort(order_key(r[a : a + ce], dtype), kind="stable")


def permute(z: np.ndarray, r: np.ndarray, dtype: str, order: str, ce: int) -> np.ndarray:
    """Within each chunk of ``ce`` elements, the stable order of R's exponent field."""
    if order == "none":
        return z
    out = np.empty_like(z)
    for a in range(0, r.size, ce):
        _in_order(z[a : a + ce], r[a : a + ce], dtype, out[a : a + ce])
    return out


def _in_order(z: np.ndarray, r: np.ndarray, dtype: str, out: np.ndarray) -> None:
    """One chunk of ``permute`` into ``out``: a compiled counting sort, else numpy's stable argsort."""
    e, m = EXPONENT[dtype]
    if not kernels.permute_key(z, r, m, e, out):
        out[:] = z[np.argsort(order_key(r, dtype), kind="stable")]


def unpermute(s: np.ndarray, r: np.ndarray, dtype: str, order: str, ce: int) -> np.ndarray:
    """The inverse of :func:`permute`."""
    if order == "none":
        return s
    out = np.empty_like(s)
    e, m = EXPONENT[dtype]
    for a in range(0, r.size, ce):
        sl = slice(a, a + ce)
        # a compiled counting sort's inverse, else numpy's stable argsort (8 bytes an element)
        if not kernels.unpermute_key(s[sl], r[sl], m, e, out[sl]):
            out[sl][np.argsort(order_key(r[sl], dtype), kind="stable")] = s[sl]
    return out


def bits(t: torch.Tensor) -> np.ndarray:
    """A tensor's elements as unsigned integers of its itemsize (a flat view, or a copy)."""
    return np.frombuffer(tensor_to_bytes(t), _UINT[t.element_size()][0])


def tensor_hash(t: torch.Tensor) -> int:
    return xxhash.xxh3_64_intdigest(tensor_to_bytes(t))


# -- the manifest field --------------------------------------------------------------------------

@register_field("exact")
@dataclass(frozen=True)
class Exact:
    reference: str
    transform: str
    order: str
    residual: ArrayRef
    xxh3: int

    @property
    def arrays(self) -> dict[str, ArrayRef]:
        return {"residual": self.residual}

    def to_dict(self) -> dict[str, Any]:
        return {"reference": self.reference, "transform": self.transform, "order": self.order,
                "residual": self.residual.to_dict(), "xxh3": self.xxh3}

    @classmethod
    def from_dict(cls, d: Any, tt: TaskTensor, where: str) -> "Exact":
        try:
            ex = cls(d["reference"], d["transform"], d["order"], ArrayRef.from_dict(d["residual"], where),
                     d["xxh3"])
        except (KeyError, TypeError):
            raise FormatError(f"{where}: malformed exact entry") from None
        if ex.reference not in REFERENCES or ex.transform not in TRANSFORMS or ex.order not in ORDERS:
            raise FormatError(f"{where}: unknown reference, transform or order "
                              f"{ex.reference!r}/{ex.transform!r}/{ex.order!r}; a newer tallpack may read it")
        if tt.encoding not in TALL_ENCODINGS or tt.dtype not in EXPONENT:
            raise FormatError(f"{where}: an exact residual belongs to a tall entry of a floating dtype")
        if tt.encoding in DERIVED_ENCODINGS and ex.reference == "tall":
            raise FormatError(f"{where}: a derived mask needs a residual against the base or zero")
        size = itemsize(tt.dtype)  # (from the spec's table: opening an archive imports no torch)
        if ex.residual.dtype != _UINT[size][1] or ex.residual.shape != tt.shape:
            raise FormatError(f"{where}: residual must be {_UINT[size][1]} of the tensor's shape")
        if type(ex.xxh3) is not int or not 0 <= ex.xxh3 < 1 << 64:
            raise FormatError(f"{where}: bad xxh3 {ex.xxh3!r}")
        return ex


# -- reading --------------------------------------------------------------------------------------

def reference(read: ReadArray, entry: TensorEntry, tt: TaskTensor, ref: str, where: str) -> torch.Tensor:
    """The reference R of spec §6.1.5, as a tensor of the task's dtype and shape."""
    dtype = torch_dtype(tt.dtype)
    if ref == "tall":
        arrays = {k: read(a, f"{where} ({k})", use) for k, (a, use) in Tall.plain_inputs(entry, tt).items()}
        return reconstruct(arrays["base"], arrays["mask"], arrays["merged"], dtype)  # §6.1.1, uncorrected
    if ref == "base":
        return base_reference(read(entry.arrays["base"], where + " (base)", Use.SHARED_INPUT), dtype)
    return torch.zeros(tt.shape, dtype=dtype)


#: The 16-bit floating types' bit patterns above which, the sign bit aside, a value is a NaN.
_NAN_ABOVE = {"bfloat16": 0x7F80, "float16": 0x7C00}  # by name: no torch at import (the CLI starts without it)


def base_reference(base: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The ``base`` reference of spec §6.1.5, ``cast_d(f32(theta_0))``. A base of the task's own
    dtype (float32, bfloat16 or float16) without NaNs is its own reference (widened exactly, it
    narrows back to the same bits), given as it is: two conversions of every element spared on each
    task's rebuild (torch's threaded ``Tensor.to`` was half the time of ``stats`` of an exact
    archive on a loaded machine).

    >>> base_reference(torch.tensor([1.5], dtype=torch.bfloat16), torch.bfloat16)
    tensor([1.5000], dtype=torch.bfloat16)
    """
    if base.dtype == dtype and base.device.type == "cpu":
        if dtype == torch.float32:  # ``.to(float32)`` of float32 is the tensor itself, NaNs too
            return base
        above = _NAN_ABOVE.get(dtype_name(dtype))
        if above is not None:  # a NaN narrows to torch's own pattern: those take torch's path
            u = bits(base)
            if not ((u & np.uint16(0x7FFF)) > np.uint16(above)).any():
                return base
    return narrow(base.to(torch.float32), dtype)


def has_exact(tt: TaskTensor) -> bool:
    """Whether ``tt`` is already the original bits or carries the exact tier."""
    return tt.encoding in ("dense", "shared") or "exact" in tt.extras


def rebuild_exact(read: ReadArray, entry: TensorEntry, tt: TaskTensor, where: str) -> torch.Tensor:
    """The original tensor of a ``tall`` entry with an ``exact`` field, checked against its hash.

    A tensor of more than RUNS_FROM elements, where ``read`` takes element ranges, is rebuilt a
    run of its residual's chunks at a time straight into its output (:class:`Original`): the same
    bits, the output and a run's temporaries held, not the reference, the residual and the
    transforms' copies of the whole tensor.
    """
    ex: Exact = tt.extras["exact"]
    if in_runs(read, entry, [tt]):
        return Original(read, entry, tt, where).whole()
    r = reference(read, entry, tt, ex.reference, where)
    rb = bits(r)
    stored = read(ex.residual, where + " (exact residual)", Use.INPUT)
    s = np.frombuffer(tensor_to_bytes(stored), rb.dtype)
    z = unpermute(s, rb, tt.dtype, ex.order, ex.residual.chunk_elements)
    x = inverse(z, rb, ex.transform)
    out = torch.from_numpy(x.view(np.uint8)).view(torch_dtype(tt.dtype)).reshape(tt.shape)
    _check_hash(tensor_hash(out), ex, where)
    return out


def _check_hash(digest: int, ex: Exact, where: str) -> None:
    if digest != ex.xxh3:
        raise IntegrityError(f"{where}: the exact rebuild does not match the original's hash")


#: A tensor of more elements than this is rebuilt exactly a run of its residual's chunks at a time
#: (:class:`Original`), where the reader takes element ranges: an 8B model's 1 GB bfloat16
#: embedding held once, not five or six times (reference, residual, their transforms' copies). 4M
#: elements, as ``merged.CHUNKED_FROM``; smaller ones are rebuilt whole.
RUNS_FROM = 1 << 22
#: The elements of one run, rounded up to whole chunks of the arrays read (1M: a few MB a task).
RUN_ELEMENTS = 1 << 20
#: The elements the inverse transform of a run takes at a time (its several temporaries: 1 MB each).
_INVERSE_ELEMENTS = 1 << 18


def _takes_ranges(read: ReadArray | ReadBytes) -> bool:
    """Whether ``read`` reads element ranges (``start``/``stop``, as ``Archive.read_array``);
    the rebuilds from arrays already read (``Encoding.rebuild``) may pass one that does not."""
    try:
        return "stop" in inspect.signature(read).parameters
    except (TypeError, ValueError):
        return False


def _reference_refs(entry: TensorEntry, tt: TaskTensor) -> list[Any]:
    """The arrays a task's exact reference reads (stored ones, or a derived merged vector)."""
    ref = tt.extras["exact"].reference
    if ref == "tall":
        return [r for r, _ in Tall.plain_inputs(entry, tt).values()]
    return [entry.arrays.get("base")] if ref == "base" else []


def in_runs(read: ReadArray | ReadBytes, entry: TensorEntry, tts: list[TaskTensor]) -> bool:
    """Whether the originals of these task entries (of one tensor, each with an ``exact`` field) are
    rebuilt in runs: more than RUNS_FROM elements, and :func:`by_ranges`."""
    residuals = [tt.extras["exact"].residual for tt in tts]
    if not residuals or residuals[0].numel <= RUNS_FROM:  # (most tensors: nothing more to look at)
        return False
    return by_ranges(read, entry, tts)


def by_ranges(read: ReadArray | ReadBytes, entry: TensorEntry, tts: list[TaskTensor]) -> bool:
    """Whether the originals of these task entries can be rebuilt a range of elements at a time: a
    ``read`` that takes element ranges, every array read a stored one of the tensor's elements, the
    residuals chunked alike."""
    residuals = [tt.extras["exact"].residual for tt in tts]
    if not residuals:
        return False
    n = residuals[0].numel
    refs = residuals + [r for tt in tts for r in _reference_refs(entry, tt)]
    return (len({r.chunk_elements for r in residuals}) == 1
            and all(isinstance(r, ArrayRef) and r.numel == n for r in refs) and _takes_ranges(read))


def spans(read: ReadArray, refs: list[ArrayRef], start: int, stop: int, where: str
          ) -> Iterator[tuple[int, int, int, int]]:
    """The runs ``[a, b)`` of whole chunks of ``refs[0]`` (a residual: ``unpermute`` is per chunk)
    that hold elements ``[start, stop)``, up to RUN_ELEMENTS each, with the part ``[lo, hi)`` of
    each in that range; from a remote archive, every array's chunks of the runs fetched a window
    (:func:`_fetch`, up to PREFETCH_BYTES) in one request, as :func:`runs` (rows of a tensor:
    ``original_rows``, and the lossy rows of derived entries). Not all the rows' at once: those of
    many rows (a rank's share of a large embedding, every task's residual) outgrow the remote
    cache, which would drop the first before they are read, to be fetched again."""
    n, ce = refs[0].numel, refs[0].chunk_elements
    a, b = start // ce * ce, min(n, -(-stop // ce) * ce)
    if stop <= start:
        return
    fetch = getattr(getattr(getattr(read, "__self__", None), "source", None), "prefetch", None)
    step = max(1, -(-RUN_ELEMENTS // ce)) * ce
    fetched = a  # the runs below this element were fetched
    for c in range(a, b, step):
        if fetch is not None and c >= fetched:
            fetched = _fetch(fetch, refs, c, step, where, b)
        e = min(b, c + step)
        yield c, e, max(c, start), min(e, stop)


def runs(read: ReadArray | ReadBytes, refs: list[ArrayRef], where: str) -> Iterator[tuple[int, int]]:
    """The runs ``[a, b)`` in which arrays ``refs`` (the first a residual) are read: RUN_ELEMENTS
    rounded up to whole chunks of them all (of the residual where their chunks do not nest). From
    a remote archive, each window of runs' chunks (up to PREFETCH_BYTES) is fetched in one
    coalesced request first, as a whole array's read fetches its chunks, not one request a run."""
    n, ce = refs[0].numel, refs[0].chunk_elements
    every = math.lcm(*(r.chunk_elements for r in refs))
    step = every if every <= max(RUN_ELEMENTS, ce) else ce
    run = max(1, -(-RUN_ELEMENTS // step)) * step
    fetch = getattr(getattr(getattr(read, "__self__", None), "source", None), "prefetch", None)
    fetched = 0  # the runs below this element were fetched
    for a in range(0, n, run):
        if fetch is not None and a >= fetched:
            fetched = _fetch(fetch, refs, a, run, where)
        yield a, min(n, a + run)


def _fetch(fetch: Callable[[list[tuple[int, int]]], None], refs: list[ArrayRef], a: int, run: int, where: str,
           end: int | None = None) -> int:
    """Fetch the chunks of the runs from element ``a`` on (to ``end``, default the array's),
    up to PREFETCH_BYTES (one run at least), in one request; returns the element the fetched
    runs end at."""
    n, size = refs[0].numel if end is None else end, 0
    ranges: list[tuple[int, int]] = []
    while a < n:
        b = min(n, a + run)
        more = [(c.offset, c.nbytes) for r in refs
                for c in r.chunks[a // r.chunk_elements : -(-b // r.chunk_elements)]]
        nbytes = sum(k for _, k in more)
        if ranges and size + nbytes > PREFETCH_BYTES:
            break
        ranges += more
        size += nbytes
        a = b
    with fetching(where):
        fetch(ranges)
    return a


class Original:
    """A task's original of one tensor rebuilt a run at a time (:func:`runs`): each run's bits
    from the same runs of the reference's arrays and of the residual (``unpermute`` is per chunk,
    the transforms and references element by element: the whole tensor's bits), its xxh3 computed
    over the runs as they come; :meth:`check` compares it with the manifest's after the last."""

    def __init__(self, read: ReadArray, entry: TensorEntry, tt: TaskTensor, where: str) -> None:
        self.read, self.entry, self.tt, self.where = read, entry, tt, where
        self.ex: Exact = tt.extras["exact"]
        self.dtype = torch_dtype(tt.dtype)
        self.uint = _UINT[self.dtype.itemsize][0]
        self.hash = xxhash.xxh3_64()

    @property
    def refs(self) -> list[ArrayRef]:
        """The arrays it reads: its residual first."""
        return [self.ex.residual, *_reference_refs(self.entry, self.tt)]

    def run(self, a: int, b: int, base: torch.Tensor | None = None, into: np.ndarray | None = None) -> np.ndarray:
        """The original's bits ``[a, b)`` (runs in order, from 0), into ``into`` where given;
        ``base``: the base's elements ``[a, b)`` where the caller read them already."""
        ex, where, read = self.ex, self.where, self.read
        if ex.reference == "tall":
            arrays = {k: read(r, f"{where} ({k})", Use.INPUT, start=a, stop=b)
                      for k, (r, _) in Tall.plain_inputs(self.entry, self.tt).items()}
            rb = bits(reconstruct(arrays["base"], arrays["mask"], arrays["merged"], self.dtype))
            del arrays
        elif ex.reference == "base":
            if base is None:
                base = read(self.entry.arrays["base"], where + " (base)", Use.INPUT, start=a, stop=b)
            rb = bits(base_reference(base, self.dtype))
        else:
            rb = np.zeros(b - a, self.uint)
        stored = read(ex.residual, where + " (exact residual)", Use.INPUT, start=a, stop=b)
        z = unpermute(np.frombuffer(tensor_to_bytes(stored), rb.dtype), rb, self.tt.dtype, ex.order,
                      ex.residual.chunk_elements)
        del stored
        x = np.empty(b - a, self.uint) if into is None else into
        for c in range(0, b - a, _INVERSE_ELEMENTS):  # element by element: its temporaries a block's
            x[c : c + _INVERSE_ELEMENTS] = inverse(z[c : c + _INVERSE_ELEMENTS], rb[c : c + _INVERSE_ELEMENTS],
                                                   ex.transform)
        self.hash.update(x.view(np.uint8).data)
        return x

    def tensor(self, x: np.ndarray) -> torch.Tensor:
        """Bits as a flat tensor of the original's dtype (no copy)."""
        return torch.from_numpy(x.view(np.uint8)).view(self.dtype)

    def check(self) -> None:
        """Raise IntegrityError where the runs' bits do not hash to the manifest's xxh3."""
        _check_hash(self.hash.intdigest(), self.ex, self.where)

    def whole(self) -> torch.Tensor:
        """The original, every run rebuilt into it, then checked."""
        out = np.empty(self.ex.residual.numel, self.uint)
        for a, b in runs(self.read, self.refs, self.where):
            self.run(a, b, into=out[a:b])
        self.check()
        return self.tensor(out).reshape(self.tt.shape)


def original_rows(read: ReadArray, entry: TensorEntry, tt: TaskTensor, where: str, start: int, stop: int
                  ) -> torch.Tensor | None:
    """Elements ``[start, stop)`` of a task's original (rows of it: ``get_slice(..., exact=True)``),
    from the chunks of its residual and reference arrays that hold them, a run at a time
    (:func:`spans`, :meth:`Original.run`); a flat tensor of the original's dtype. Each chunk read is
    checked against its checksum, as every read's; the original's XXH3-64 covers every element, so
    a part is not checked against it (a whole read and ``verify`` do). None where it cannot be read
    by ranges (:func:`by_ranges`: the caller rebuilds it whole)."""
    if not (0 <= start <= stop <= tt.extras["exact"].residual.numel and by_ranges(read, entry, [tt])):
        return None
    original = Original(read, entry, tt, where)
    out = np.empty(stop - start, original.uint)
    for a, b, lo, hi in spans(read, original.refs, start, stop, where):
        if (lo, hi) == (a, b):  # a run inside the rows: straight into the output
            original.run(a, b, into=out[a - start : b - start])
        else:  # the first or last: its elements in the rows
            out[lo - start : hi - start] = original.run(a, b)[lo - a : hi - a]
    return original.tensor(out)


# -- reading in numpy: an exact unpack without torch -------------------------------------------------

#: The floating types whose originals :func:`original_bits` rebuilds in numpy, with their bits' type.
NUMPY_FLOATS = {"float32": np.uint32, "bfloat16": np.uint16, "float16": np.uint16}


class NotInNumpy(Exception):
    """A rebuild :func:`original_bits` leaves to torch, which gives the same bits: a reference
    holding NaNs (whose payloads torch's conversions set), a dtype other than float32, bfloat16 or
    float16, a merged vector derived or not float32. Never seen by users: the caller takes the
    torch path (``Archive.get_tensor(..., exact=True)``)."""


def _widened(u: np.ndarray, dtype: str) -> np.ndarray:
    """Bit patterns of ``dtype`` as float32 values (exact, as torch's ``.to(torch.float32)``)."""
    if dtype == "float32":
        return u.view(np.float32)
    if dtype == "bfloat16":
        return (u.astype(np.uint32) << np.uint32(16)).view(np.float32)
    return u.view(np.float16).astype(np.float32)


def _narrowed(v: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values without NaN as bit patterns of ``dtype``, rounded to nearest even as the
    spec's ``cast_d`` (torch's ``Tensor.to``): overflow to infinity, subnormals kept. A NaN's
    payload is torch's to set: :class:`NotInNumpy`."""
    if np.isnan(v).any():
        raise NotInNumpy("a NaN to narrow")
    if dtype == "float32":
        return v.view(np.uint32)
    if dtype == "bfloat16":
        u = v.view(np.uint32)
        return ((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)
    with np.errstate(over="ignore"):  # (to infinity, as IEEE and torch round)
        return v.astype(np.float16).view(np.uint16)


def _has_nan(u: np.ndarray, dtype: str) -> bool:
    above = _NAN_ABOVE.get(dtype)
    if above is None:
        return bool(np.isnan(u.view(np.float32)).any())
    return bool(((u & np.uint16(0x7FFF)) > np.uint16(above)).any())


def _reference_bits(read: ReadBytes, entry: TensorEntry, tt: TaskTensor, ref: str, where: str, a: int, b: int
                    ) -> np.ndarray:
    """Elements ``[a, b)`` of the reference R of spec §6.1.5 as bit patterns, as :func:`reference`
    and :func:`base_reference` give them; :class:`NotInNumpy` where torch must."""
    uint = NUMPY_FLOATS[tt.dtype]
    if ref == "zero":
        return np.zeros(b - a, uint)
    if ref == "base":
        base = entry.arrays["base"]
        if base.dtype not in NUMPY_FLOATS:
            raise NotInNumpy(f"a {base.dtype} base")
        u = read(base, where + " (base)", Use.SHARED_INPUT, start=a, stop=b).view(NUMPY_FLOATS[base.dtype])
        if base.dtype == tt.dtype and (tt.dtype == "float32" or not _has_nan(u, tt.dtype)):
            return u  # its own reference (base_reference)
        return _narrowed(_widened(u, base.dtype), tt.dtype)
    inputs = Tall.plain_inputs(entry, tt)  # "tall": base + mask * merged in float32, narrowed (§6.1.1)
    (base, base_use), (merged, merged_use), (mask, mask_use) = (inputs[k] for k in ("base", "merged", "mask"))
    if not isinstance(merged, ArrayRef) or merged.dtype != "float32" or base.dtype not in NUMPY_FLOATS:
        raise NotInNumpy("a merged vector not stored as float32")
    b32 = _widened(read(base, f"{where} (base)", base_use, start=a, stop=b).view(NUMPY_FLOATS[base.dtype]), base.dtype)
    m32 = read(merged, f"{where} (merged)", merged_use, start=a, stop=b).view(np.float32)
    m = read(mask, f"{where} (mask)", mask_use, start=a, stop=b)
    with np.errstate(invalid="ignore", over="ignore"):  # IEEE results (inf * 0: NaN, which is left to torch)
        v = np.add(b32, m.astype(np.float32) * m32)  # the product exact: addcmul's one rounding
    return _narrowed(v, tt.dtype)


def original_bits(read: ReadBytes, entry: TensorEntry, tt: TaskTensor, where: str) -> np.ndarray:
    """The original of a ``tall`` entry with an ``exact`` field as flat bit patterns (numpy
    unsigned integers of its itemsize), checked against its hash: :func:`rebuild_exact`'s bits
    without torch (an exact unpack in a fresh process does not import it: seconds). A tensor of
    more than RUNS_FROM elements is rebuilt a run at a time, as :class:`Original` does.
    :class:`NotInNumpy` where only torch's path gives the bits."""
    if tt.dtype not in NUMPY_FLOATS:
        raise NotInNumpy(f"a {tt.dtype} tensor")
    ex: Exact = tt.extras["exact"]
    n, uint = ex.residual.numel, NUMPY_FLOATS[tt.dtype]
    out = np.empty(n, uint)
    h = xxhash.xxh3_64()
    refs = [ex.residual, *_reference_refs(entry, tt)]
    for a, b in runs(read, refs, where) if in_runs(read, entry, [tt]) else [(0, n)]:
        rb = _reference_bits(read, entry, tt, ex.reference, where, a, b)
        stored = read(ex.residual, where + " (exact residual)", Use.INPUT, start=a, stop=b).view(uint)
        z = unpermute(stored, rb, tt.dtype, ex.order, ex.residual.chunk_elements)
        del stored
        for c in range(a, b, _INVERSE_ELEMENTS):  # element by element: its temporaries a block's
            e = min(b, c + _INVERSE_ELEMENTS)
            out[c:e] = inverse(z[c - a : e - a], rb[c - a : e - a], ex.transform)
        h.update(out[a:b].view(np.uint8).data)
    _check_hash(h.intdigest(), ex, where)
    return out


# -- writing --------------------------------------------------------------------------------------

def _tall_references(ctx: WriteContext, item: Item, check: bool) -> tuple[list[torch.Tensor], bool]:
    """Each task's TALL reconstruction, computed as the reader will (same arrays, same formula);
    with ``check``, also whether the reader can derive the merged vector and the method's arrays
    (``merging.derive_merged``, spec §6.1.9, whose code the packer's merge shares): the references
    are then built from that derivation. Each block's tasks run on up to ``ctx.threads`` threads."""
    base, ce = item.base, ctx.chunk_elements
    assert base is not None
    parts: list[list[torch.Tensor]] = [[] for _ in item.tasks]
    same = check
    for b, taus in blocks(base, item.thetas, ce):
        # the reader's derivation itself (spec §6.1.9), which the packer's merge shares its code with
        derived = derive_merged(taus, ctx.method) if same else None
        same = derived is not None
        merged = derived["merged"] if derived is not None else ctx.method.combine(taus)

        def one(i: int, b: torch.Tensor = b, taus: list[torch.Tensor] = taus, merged: torch.Tensor = merged) -> None:
            lam, x = ctx.lambdas[item.tasks[i]], item.thetas[i]
            parts[i].append(reconstruct(b, _mask(taus[i], merged, lam), merged, x.dtype))
        _each(ctx, len(item.tasks), one)
    return [(p[0] if len(p) == 1 else cat(p)).reshape(x.shape) if p else torch.empty(x.shape, dtype=x.dtype)
            for p, x in zip(parts, item.thetas)], same  # one chunk (most tensors): no copy


@dataclass
class _Sample:
    """The first SAMPLE_ELEMENTS elements of a streamed item's tasks, of their TALL references and
    of the base reference (of each dtype), which the exact tier's choice is made on (``_scan``)."""

    x: dict[int, torch.Tensor]
    tall: dict[int, torch.Tensor]
    base: dict[torch.dtype, torch.Tensor]

    def refs(self, i: int) -> dict[str, torch.Tensor | None]:
        """``_references``'s, of the sample, TALL's always (a NaN found later drops its sizes)."""
        return {"tall": self.tall[i], "base": self.base[self.x[i].dtype], "zero": None}


@dataclass
class _Scan:
    """What the exact tier needs of a streamed item before it writes (``_scan``): each task's
    xxh3, whether its TALL reference holds a NaN anywhere, and how many of the blocks' merged
    vectors the reader derives (``derived``; all of them: ``derivable``)."""

    hashes: dict[int, int]
    nan: dict[int, bool]
    derived: int
    derivable: bool


def _scan(ctx: WriteContext, item: Item, todo: list[int], check: bool,
          sampled: Callable[[_Sample, bool], bool], spill: "_Spill") -> _Scan:
    """One pass over a streamed item's blocks for ``_Scan``, the TALL references built as
    ``_tall_references`` builds them, a block at a time (each task's on up to ``ctx.threads``).
    Once the sample is read, ``sampled(sample, derivable)`` (the blocks' merged vectors derived
    so far) says whether a task may be coded against TALL's reference: then each block's merged
    vector goes to ``spill`` for the tasks' passes."""
    ce, n = ctx.chunk_elements, numel(item.shape)
    sample = min(n, SAMPLE_ELEMENTS)
    hashers = {i: xxhash.xxh3_64() for i in todo}
    nan = {i: False for i in todo}
    xs_kept: dict[int, list[torch.Tensor]] = {i: [] for i in todo}
    talls: dict[int, list[torch.Tensor]] = {i: [] for i in todo}
    bases: dict[torch.dtype, list[torch.Tensor]] = {}

    def decide() -> None:
        spill.want(sampled(_Sample({i: cat(p) for i, p in xs_kept.items()},
                                   {i: cat(p) for i, p in talls.items()},
                                   {dt: cat(p) for dt, p in bases.items()}), check and derived == count))
        for kept in (xs_kept, talls, bases):  # (the sample, let go)
            kept.clear()
    count = derived = 0
    for a, b, xs in item.blocks(ce):
        assert b is not None
        for i in todo:
            hashers[i].update(tensor_to_bytes(xs[i]))
        merged, taus = _block_merged(ctx, b, xs, check and derived == count)
        if merged is not None:
            derived += 1
        else:
            merged = ctx.method.combine(taus)
        count += 1
        keep = max(0, min(b.numel(), sample - a))  # of this block, in the sample

        def one(k: int, b: torch.Tensor = b, xs: list[torch.Tensor] = xs, taus: list[torch.Tensor] = taus,
                merged: torch.Tensor = merged) -> None:
            i = todo[k]
            rec = reconstruct(b, _mask(taus[i], merged, ctx.lambdas[item.tasks[i]]), merged, xs[i].dtype)
            nan[i] = nan[i] or bool(torch.isnan(rec).any())
            if keep:
                talls[i].append(rec[:keep].clone())
        _each(ctx, len(todo), one)
        if keep:
            for i in todo:
                xs_kept[i].append(xs[i][:keep].clone())
            for dt in {xs[i].dtype for i in todo}:
                bases.setdefault(dt, []).append(narrow(b[:keep].to(torch.float32), dt))
        spill.add(merged)
        last = a < sample <= a + b.numel()  # of the sample
        del b, xs, taus, merged  # (before the next block is read, or the sample coded)
        if last:
            decide()
    if not sample:  # (an empty tensor)
        decide()
    spill.done(count)
    return _Scan({i: h.intdigest() for i, h in hashers.items()}, nan, derived, check and derived == count)


class _Spill:
    """Each block's merged vector (float32) of a streamed item, as ``_scan`` built it, kept for the
    passes of the tasks coded against TALL's reference: with it, such a pass reads the base's and
    its task's blocks (``Item.task_blocks``), not every task's, and merges nothing.

    The blocks' vectors are held until ``want`` says whether a task may need them (the choice on
    the scan's sample), then written to a temporary file in ``folder`` (the archive's: the disk the
    user gave it) or dropped. The file has no name (``tempfile.TemporaryFile``): the system frees
    it when it is closed (``close``: ``add_exact`` returns or fails) or its process dies. A write
    that fails (a full disk) drops the file, and each pass merges its blocks anew (``usable``
    False), as before: the same bytes."""

    def __init__(self, folder: str | None, name: str) -> None:
        self.folder, self.name = folder, name
        self._held: list[np.ndarray] | None = []  # until ``want``
        self._file: IO[bytes] | None = None
        self._sizes: list[int] = []
        self.usable = False

    def __enter__(self) -> "_Spill":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add(self, merged: torch.Tensor) -> None:
        assert merged.dtype == torch.float32
        v = merged.contiguous().reshape(-1).numpy()
        self._sizes.append(v.size)
        if self._held is not None:
            self._held.append(v.copy())
        elif self._file is not None:
            self._write(v)

    def want(self, wanted: bool) -> None:
        held, self._held = self._held or [], None
        if not wanted:
            return
        try:
            self._file = tempfile.TemporaryFile(dir=self.folder)
        except OSError as e:
            self._failed(e)
            return
        log.debug("%s: each block's merged vector kept in a temporary file (%d bytes)", self.name, 4 * sum(self._sizes))
        for v in held:
            self._write(v)

    def _write(self, v: np.ndarray) -> None:
        if self._file is None:  # (a write failed: dropped)
            return
        try:
            self._file.write(v.view(np.uint8).data)
        except OSError as e:
            self._failed(e)

    def _failed(self, e: OSError) -> None:
        log.warning("%s: the merged vectors could not be kept on disk (%s): each task coded against TALL's "
                    "reference reads every task's blocks", self.name, e)
        self.close()

    def done(self, blocks: int) -> None:
        """The scan read all ``blocks``: the vectors are usable if every one was written."""
        if self._file is not None:
            try:
                self._file.flush()
            except OSError as e:
                self._failed(e)
        self.usable = self._file is not None and len(self._sizes) == blocks

    def merged(self) -> Iterator[torch.Tensor]:
        """Each block's merged vector, read back in order."""
        f = self._file
        assert self.usable and f is not None
        f.seek(0)
        for n in self._sizes:
            v = np.empty(n, np.float32)
            try:
                got = f.readinto(v.view(np.uint8).data)  # type: ignore[attr-defined]
            except OSError as e:
                raise OutputError(f"{self.name}: the exact tier's temporary file of merged vectors could not "
                                  f"be read back ({e})") from e
            if got != v.nbytes:
                raise OutputError(f"{self.name}: the exact tier's temporary file of merged vectors came back "
                                  f"short ({got} of {v.nbytes} bytes)")
            yield torch.from_numpy(v)

    def close(self) -> None:
        f, self._file, self._held, self.usable = self._file, None, None, False
        if f is not None:
            f.close()


def _spill_folder(ctx: WriteContext) -> str | None:
    """Where ``_Spill`` writes: the archive's folder (None: ``tempfile``'s default)."""
    path = getattr(ctx.writer, "path", None)
    return None if path is None else os.fspath(Path(path).parent)


def _block_merged(ctx: WriteContext, b: torch.Tensor, xs: list[torch.Tensor], derive: bool
                  ) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
    """A block's merged vector as the reader derives it (spec §6.1.9), with ``derive`` and where
    the method derives it (else None), and its float32 task vectors."""
    ((_, taus),) = blocks(b, xs, b.numel())
    derived = derive_merged(taus, ctx.method) if derive else None
    return (None if derived is None else derived["merged"]), taus


def _streamed_residuals(ctx: WriteContext, item: Item, i: int, ref: str, transform: str, scan: _Scan,
                        spill: _Spill) -> Iterator[np.ndarray]:
    """Task ``i``'s residual against ``ref``, a block (one chunk) at a time, each block read anew.
    Against the base or zero, only the base's and the task's blocks are read (``Item.task_blocks``),
    not every task's; against TALL's reference too, with each block's merged vector read back from
    ``spill``, as ``_scan`` built it. Without it (a full disk), every task's blocks are read and
    the merged vector built again: derived in the first ``scan.derived`` blocks, combined in the
    others, as ``_tall_references`` builds it."""
    dtype, ce = item.dtypes[1][i], ctx.chunk_elements
    if ref != "tall":
        for _, b, x in item.task_blocks(i, ce, base=ref == "base"):
            against = None if b is None else narrow(b.to(torch.float32), dtype)
            del b
            yield _residual(ctx, x, against, transform)
            del against, x  # (before the next block is read)
        return
    lam = ctx.lambdas[item.tasks[i]]
    if spill.usable:
        for (_, b, x), merged in zip(item.task_blocks(i, ce), spill.merged(), strict=True):
            assert b is not None
            ((_, (tau,)),) = blocks(b, [x], b.numel())  # task i's vector, as ``_block_merged`` gives it
            r = reconstruct(b, _mask(tau, merged, lam), merged, dtype)
            del b, tau, merged
            yield _residual(ctx, x, r, transform)
            del r, x
        return
    for k, (_, b, xs) in enumerate(item.blocks(ce)):
        assert b is not None
        merged_k, taus = _block_merged(ctx, b, xs, k < scan.derived)
        merged = ctx.method.combine(taus) if merged_k is None else merged_k
        r = reconstruct(b, _mask(taus[i], merged, lam), merged, dtype)
        x = xs[i]
        del b, xs, taus, merged, merged_k
        yield _residual(ctx, x, r, transform)


def _mask(tau: torch.Tensor, merged: torch.Tensor, lam: float) -> torch.Tensor:
    """``tall.tall_mask``'s bits: in one compiled pass where it applies (``kernels.tall_mask``)."""
    if tau.dtype == merged.dtype == torch.float32 and tau.is_contiguous() and merged.is_contiguous():
        out = torch.empty(tau.shape, dtype=torch.bool)
        if kernels.tall_mask(tau.reshape(-1).numpy(), merged.reshape(-1).numpy(), lam,
                             out.view(torch.uint8).reshape(-1).numpy()) is not None:
            return out
    return tall_mask(tau, merged, lam)


def _each(ctx: WriteContext, count: int, fn: Callable[[int], object]) -> None:
    """``fn(k)`` for each k below ``count``, on up to ``ctx.threads`` threads (the first on this
    one; the loops they call then run on their thread alone)."""
    def run(a: int, end: int) -> None:
        with kernels.as_worker():
            for k in range(a, end):
                fn(k)
    kernels.in_parts(count, ctx.threads, run)


def _chains(ctx: WriteContext, itemsize: int, codecs: tuple[str, ...]) -> dict[str, Chain]:
    """The residual chains of ``codecs`` for elements of ``itemsize`` bytes, by name (``planes``
    where none of them applies)."""
    assert ctx.residuals is not None
    out = {"planes": ctx.residuals(itemsize)}
    if "bitsplit" in codecs and itemsize in BitSplit.ITEMSIZES:
        out["bitsplit"] = Chain([BitSplit(itemsize)])
        if "planes" not in codecs:
            del out["planes"]
    return out


def _write_held(ctx: WriteContext, chunks: list, shape: tuple[int, ...], dtype: str = "bool",
                chain=None) -> ArrayRef:
    """Write an array whose chunks ``Tall.write`` encoded and held (``WriteContext.held_masks``,
    ``held_merged``)."""
    builder = ctx.writer.begin_array(dtype, shape, ctx.masks if chain is None else chain, ctx.chunk_elements)
    for c in chunks:
        builder.add(c)
    return builder.finish()


def add_exact(ctx: WriteContext, item: Item, entry: TensorEntry, tasks: set[str] | None = None,
              codecs: tuple[str, ...] = ("planes",)) -> TensorEntry:
    """Give every ``tall`` task entry of ``entry`` (of ``tasks`` only, when given) its exact residual
    (others are exact already), coded with whichever of ``codecs`` (names of ``RESIDUAL_CODECS``)
    codes it smallest: the exact tier passes ``RESIDUAL_CODECS``; the fidelity dial's exact
    corrections, whose size estimate assumes ``planes``, keep the default.

    Where ``Tall.write`` held the masks back (``ctx.held_masks``), each task's mask is stored only
    where that codes smaller: stored mask + residual against the best reference, or no mask (a
    ``tall-derived`` entry, whose reader derives the mask from the original) + residual against
    ``base`` or ``zero``; the sizes are those of the first ``SAMPLE_ELEMENTS`` elements, scaled.
    Where it also held the merged vector (``ctx.held_merged``), deriving every mask and leaving
    the merged vector out (``tall-derived-merged``, format 1.8) is weighed against that choice.

    A tensor read a block at a time (``Item.streamed``) is read once for the hashes and the sample,
    then once per task, its base's and its own blocks: each block's merged vector, where a task
    may be coded against TALL's reference, kept from the first pass in a temporary file (``_Spill``,
    4 bytes an element) that is gone when this returns or fails."""
    with _Spill(_spill_folder(ctx), item.name) as spill:
        return _add_exact(ctx, item, entry, tasks, codecs, spill)


def _add_exact(ctx: WriteContext, item: Item, entry: TensorEntry, tasks: set[str] | None,
               codecs: tuple[str, ...], spill: _Spill) -> TensorEntry:
    held = ctx.held_masks.pop(item.name, None) if ctx.held_masks is not None else None
    merged_held = ctx.held_merged.pop(item.name, None) if ctx.held_merged is not None else None
    if not any(tt.encoding == "tall" for tt in entry.tasks.values()):
        assert held is None and merged_held is None
        return entry
    assert ctx.residuals is not None and item.dtypes[0] is not None
    assert held is None or tasks is None
    check = merged_held is not None and MERGED_POLICY == "derive"
    todo = [i for i, t in enumerate(item.tasks)
            if tasks is None or (t in tasks and "exact" not in entry.tasks[t].extras)]
    codecs = tuple(c for c in codecs if c in RESIDUAL_CODECS) or ("planes",)
    sizes: dict[int, list[tuple[int, How]]] = {}
    streamed = item.streamed
    if streamed:  # too large to hold whole (``inputs.HOLD_BYTES``): a block at a time
        def sampled(sample: _Sample, derivable: bool) -> bool:
            """The sample's sizes; whether a task may be coded against TALL's reference: ``_choose``
            before a NaN is seen (a NaN takes a task off TALL's reference; the others keep their
            choice, or all derive their masks). Where the merged vectors of the blocks after the
            sample turn out not derivable after all (the method derives all blocks or none), a
            task on TALL's reference finds no spill and merges its blocks again: the same bytes."""
            _each(ctx, len(todo), lambda k: sizes.__setitem__(
                todo[k], _sample_sizes(ctx, sample.x[todo[k]], sample.refs(todo[k]), codecs)))
            chosen = _choose(item, todo, sizes, held, merged_held, derivable)
            return any(how[0] == "tall" for how, _ in chosen.values())
        scan = _scan(ctx, item, todo, check, sampled, spill)
        memory.give_back(numel(item.shape))  # the scan's blocks' buffers, before the tasks' passes
        derivable, hashes = scan.derivable, scan.hashes
        for i in todo:
            if scan.nan[i]:  # a NaN's payload is unspecified: never code against it (``_references``)
                sizes[i] = [s for s in sizes[i] if s[1][0] != "tall"]
        residuals: Callable[[int, str, str], Iterator[np.ndarray]] = (
            lambda i, ref, tr: _streamed_residuals(ctx, item, i, ref, tr, scan, spill))
    else:
        talls, derivable = _tall_references(ctx, item, check)
        bases: dict[torch.dtype, torch.Tensor] = {}  # the base reference, once per dtype (not per task)
        refs = {i: _references(item, i, talls[i], bases) for i in todo}
        _each(ctx, len(todo), lambda k: sizes.__setitem__(todo[k], _sizes(ctx, item, todo[k], refs[todo[k]], codecs)))
        hashes = {i: tensor_hash(item.thetas[i]) for i in todo}
        residuals = lambda i, ref, tr: iter((_residual(ctx, item.thetas[i], refs[i][ref], tr),))
    choice = _choose(item, todo, sizes, held, merged_held, derivable)
    w, ce = ctx.writer, ctx.chunk_elements
    shape, dtypes = item.shape, item.dtypes[1]
    for i in todo:
        t, tt, size = item.tasks[i], entry.tasks[item.tasks[i]], dtypes[i].itemsize
        (ref, tr, codec), derive = choice[i]
        parts = residuals(i, ref, tr)
        z: np.ndarray | None = next(parts)  # (while the last task's residual is being encoded)
        if held is not None and not derive:
            tt.arrays["mask"] = _write_held(ctx, held[i], tt.shape)
        chain = _chains(ctx, size, codecs)[codec]
        builder = w.begin_array(_UINT[size][1], shape, chain, ce)
        while z is not None:  # the whole residual, or (streamed) a block's, which is one chunk
            data, step = z.view(np.uint8).data, ce * z.itemsize
            futures = w.submit([(chain, data[a : a + step]) for a in range(0, len(data), step)])
            for f in futures:
                w.queue(builder.queued, f)
            w.drain(leave=max(len(futures), ctx.threads if streamed else 0))  # two residuals (or a few blocks') at most
            z = next(parts, None)
        if streamed:  # this task's pass over the blocks, its buffers freed
            memory.give_back(numel(shape))
        exact = _Pending(builder, ref, tr, hashes[i])
        if derive:
            entry.tasks[t] = TaskTensor("tall-derived", tt.dtype, tt.shape, {},
                                        {"ones": tt.params["ones"], "lambda": ctx.lambdas[t]}, {"exact": exact})
        else:
            tt.extras["exact"] = exact
    w.drain()
    for tt in entry.tasks.values():
        pending = tt.extras.get("exact")
        if isinstance(pending, _Pending):
            tt.extras["exact"] = pending.finished()
    if merged_held is not None:
        _merged_vector(ctx, entry, merged_held, derivable)
    memory.give_back(numel(shape))
    return entry


#: How a task's residual is coded: (reference, transform, residual codec).
How = tuple[str, str, str]


def _choose(item: Item, todo: list[int], sizes: dict[int, list[tuple[int, How]]], held: list | None,
            merged_held: dict | None, derivable: bool) -> dict[int, tuple[How, bool]]:
    """Per task: how its residual is coded, and whether its mask is derived. Each task's mask is
    derived where the residual against base or zero codes smaller than mask + best residual; then,
    where the merged vector may be derived too, deriving every mask wins if it costs no more than
    that choice plus the merged vector's (and the method's arrays') bytes."""
    choice = {i: (sizes[i][0][1], False) for i in todo}
    if held is None or MASK_POLICY == "store":
        return choice
    cost = 0.0  # the per-task choice, scaled from the sample to the tensor
    best: dict[int, tuple[float, How] | None] = {}
    for i in todo:
        n = numel(item.shape)
        scale = n / max(1, min(SAMPLE_ELEMENTS, n))
        with_mask = min(s * scale + sum(len(c) for c in held[i]) for s, _ in sizes[i])
        best[i] = next(((s * scale, how) for s, how in sizes[i] if how[0] != "tall"), None)
        b = best[i]
        if b is not None and (MASK_POLICY == "derive" or b[0] <= with_mask):
            choice[i] = (b[1], True)
            cost += b[0]
        else:
            cost += with_mask
    if derivable and all(best.values()):
        merged_bytes = sum(len(c) for _, chunks in (merged_held or {}).values() for c in chunks)
        if sum(b[0] for b in best.values() if b) <= cost + merged_bytes:
            return {i: (b[1], True) for i, b in best.items() if b}
    return choice


def _references(item: Item, i: int, rec: torch.Tensor, bases: dict[torch.dtype, torch.Tensor]
                ) -> dict[str, torch.Tensor | None]:
    """The references task ``i`` may be coded against (None: zero); ``bases`` keeps the base
    reference of each dtype for the item's other tasks."""
    assert item.base is not None
    x = item.thetas[i]
    if x.dtype not in bases:
        bases[x.dtype] = narrow(item.base.to(torch.float32), x.dtype)
    refs: dict[str, torch.Tensor | None] = {"tall": rec, "base": bases[x.dtype], "zero": None}
    if torch.isnan(rec).any():  # a NaN's payload is unspecified: never code against it
        del refs["tall"]
    return refs


def _sizes(ctx: WriteContext, item: Item, i: int, refs: dict[str, torch.Tensor | None],
           codecs: tuple[str, ...]) -> list[tuple[int, How]]:
    """(coded bytes of the first SAMPLE_ELEMENTS elements, how), smallest first."""
    return _sample_sizes(ctx, item.thetas[i], refs, codecs)


def _sample_sizes(ctx: WriteContext, x: torch.Tensor, refs: dict[str, torch.Tensor | None],
                  codecs: tuple[str, ...]) -> list[tuple[int, How]]:
    """``_sizes`` of task tensor ``x`` (or its first SAMPLE_ELEMENTS elements, flat) against ``refs``
    (the same elements of each)."""
    n, ce = SAMPLE_ELEMENTS, ctx.chunk_elements
    xb = bits(x.contiguous().reshape(-1)[:n])
    chains = _chains(ctx, x.element_size(), codecs)
    out = []
    for k, r in refs.items():
        if k not in CANDIDATES:
            continue
        rb = bits(r.contiguous().reshape(-1)[:n]) if r is not None else np.zeros_like(xb)
        # numpy sorts each chunk's order once for both transforms; a zero reference's is the identity
        orders = None if r is None or kernels.COMPILED else list(_orders(rb, dtype_name(x.dtype), ce))
        for tr in TRANSFORMS:
            z = forward(xb, rb, tr)
            if r is not None:
                z = _permuted(z, orders) if orders is not None else permute(z, rb, dtype_name(x.dtype), "exponent", ce)
            out += [(len(chain.encode(z.view(np.uint8).data)), (k, tr, name)) for name, chain in chains.items()]
    return sorted(out)


def _permuted(z: np.ndarray, orders: list[tuple[slice, np.ndarray]]) -> np.ndarray:
    """``permute`` with each chunk's order given."""
    out = np.empty_like(z)
    for s, perm in orders:
        out[s] = z[s][perm]
    return out


def _residual(ctx: WriteContext, x: torch.Tensor, r: torch.Tensor | None, transform: str) -> np.ndarray:
    """Task tensor ``x``'s stored residual against reference ``r`` (None: zero): the transform,
    then each chunk in the stable order of R's exponent field; chunks on up to ``ctx.threads``
    threads."""
    xb, ce, dtype = bits(x.contiguous()), ctx.chunk_elements, dtype_name(x.dtype)
    rb = bits(r.contiguous()) if r is not None else np.zeros_like(xb)
    out = np.empty_like(xb)

    def chunk(k: int) -> None:
        s = slice(k * ce, (k + 1) * ce)
        z = forward(xb[s], rb[s], transform)
        if r is None:  # a zero reference's exponent order is the identity
            out[s] = z
        else:
            _in_order(z, rb[s], dtype, out[s])
    _each(ctx, -(-xb.size // ce), chunk)
    return out


@dataclass
class _Pending:
    """An ``exact`` field whose residual's chunks are still being encoded and written."""

    builder: ArrayBuilder
    reference: str
    transform: str
    xxh3: int

    def finished(self) -> Exact:
        return Exact(self.reference, self.transform, "exponent", self.builder.finish(), self.xxh3)


def _merged_vector(ctx: WriteContext, entry: TensorEntry, held: dict[str, tuple[str, list]],
                   derivable: bool) -> None:
    """Leave the merged vector and the method's arrays out where every task is ``tall-derived``
    and the derivation gives their bits (``tall-derived-merged``, format 1.8); else write them."""
    if derivable and all(tt.encoding == "tall-derived" for tt in entry.tasks.values()):
        for t, tt in entry.tasks.items():
            entry.tasks[t] = TaskTensor("tall-derived-merged", tt.dtype, tt.shape, {}, tt.params, tt.extras)
        return
    shape = entry.arrays["base"].shape
    for key, (dtype, chunks) in held.items():
        entry.arrays[key] = _write_held(ctx, chunks, shape, dtype, ctx.dense(dtype))


__all__ = ["EXPONENT", "Exact", "TALL_ENCODINGS", "FIELDS", "add_exact", "has_exact", "rebuild_exact", "forward", "inverse"]
