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

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import xxhash

from ..arrays import ArrayRef
from ..dtypes import dtype_name, tensor_to_bytes, torch_dtype
from ..errors import FormatError, IntegrityError
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
#: The encodings an ``exact`` field may belong to: ``tall`` (its mask stored) and ``tall-derived``
#: (its mask derived from the original, ``encodings/derived.py``).
TALL_ENCODINGS = ("tall", "tall-derived")
TRANSFORMS = ("sub", "xor")
ORDERS = ("exponent", "none")
#: The references the writer tries (benchmarks narrow it to measure one against another).
CANDIDATES: tuple[str, ...] = REFERENCES
#: Where the writer may leave a mask out (``tall-derived``, format 1.6): ``"choose"``, where the
#: residual against the base or zero codes smaller than mask + residual against the best reference;
#: ``"store"``: never; ``"derive"``: always (benchmarks and tests set the last two).
MASK_POLICY = "choose"
#: Elements of each tensor the writer codes each candidate on before choosing.
SAMPLE_ELEMENTS = 1 << 18


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


def permute(z: np.ndarray, r: np.ndarray, dtype: str, order: str, ce: int) -> np.ndarray:
    """Within each chunk of ``ce`` elements, the stable order of R's exponent field."""
    if order == "none":
        return z
    out = np.empty_like(z)
    for a in range(0, z.size, ce):
        perm = np.argsort(order_key(r[a : a + ce], dtype), kind="stable")
        out[a : a + ce] = z[a : a + ce][perm]
    return out


def unpermute(s: np.ndarray, r: np.ndarray, dtype: str, order: str, ce: int) -> np.ndarray:
    if order == "none":
        return s
    out = np.empty_like(s)
    for a in range(0, s.size, ce):
        perm = np.argsort(order_key(r[a : a + ce], dtype), kind="stable")
        out[a : a + ce][perm] = s[a : a + ce]
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
        if tt.encoding == "tall-derived" and ex.reference == "tall":
            raise FormatError(f"{where}: a derived mask needs a residual against the base or zero")
        size = torch_dtype(tt.dtype).itemsize
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
        return read(entry.arrays["base"], where + " (base)", Use.SHARED_INPUT).to(torch.float32).to(dtype)
    return torch.zeros(tt.shape, dtype=dtype)


def has_exact(tt: TaskTensor) -> bool:
    """Whether ``tt`` is already the original bits or carries the exact tier."""
    return tt.encoding in ("dense", "shared") or "exact" in tt.extras


def rebuild_exact(read: ReadArray, entry: TensorEntry, tt: TaskTensor, where: str) -> torch.Tensor:
    """The original tensor of a ``tall`` entry with an ``exact`` field, checked against its hash."""
    ex: Exact = tt.extras["exact"]
    r = reference(read, entry, tt, ex.reference, where)
    rb = bits(r)
    stored = read(ex.residual, where + " (exact residual)", Use.INPUT)
    s = np.frombuffer(tensor_to_bytes(stored), rb.dtype)
    z = unpermute(s, rb, tt.dtype, ex.order, ex.residual.chunk_elements)
    x = inverse(z, rb, ex.transform)
    out = torch.from_numpy(x.view(np.uint8)).view(torch_dtype(tt.dtype)).reshape(tt.shape)
    if tensor_hash(out) != ex.xxh3:
        raise IntegrityError(f"{where}: the exact rebuild does not match the original's hash")
    return out


# -- writing --------------------------------------------------------------------------------------

def _tall_references(ctx: WriteContext, item: Item) -> list[torch.Tensor]:
    """Each task's TALL reconstruction, computed as the reader will (same arrays, same formula)."""
    base, ce = item.base, ctx.chunk_elements
    assert base is not None
    parts: list[list[torch.Tensor]] = [[] for _ in item.tasks]
    for b, taus in blocks(base, item.thetas, ce):
        merged = ctx.method.combine(taus)
        for i, (t, tau, x) in enumerate(zip(item.tasks, taus, item.thetas)):
            parts[i].append(reconstruct(b, tall_mask(tau, merged, ctx.lambdas[t]), merged, x.dtype))
    return [torch.cat(p).reshape(x.shape) if p else torch.empty(x.shape, dtype=x.dtype)
            for p, x in zip(parts, item.thetas)]


def _encoded_size(ctx: WriteContext, z: np.ndarray) -> int:
    return len(ctx.residuals(z.dtype.itemsize).encode(memoryview(z.view(np.uint8))))


def _write_mask(ctx: WriteContext, chunks: list, shape: tuple[int, ...]) -> ArrayRef:
    """Write a mask whose chunks ``Tall.write`` encoded and held (``WriteContext.held_masks``)."""
    builder = ctx.writer.begin_array("bool", shape, ctx.masks, ctx.chunk_elements)
    for c in chunks:
        builder.add(c)
    return builder.finish()


def add_exact(ctx: WriteContext, item: Item, entry: TensorEntry, tasks: set[str] | None = None) -> TensorEntry:
    """Give every ``tall`` task entry of ``entry`` (of ``tasks`` only, when given) its exact residual
    (others are exact already).

    Where ``Tall.write`` held the masks back (``ctx.held_masks``), each task's mask is stored only
    where that codes smaller: stored mask + residual against the best reference, or no mask (a
    ``tall-derived`` entry, whose reader derives the mask from the original) + residual against
    ``base`` or ``zero``; the sizes are those of the first ``SAMPLE_ELEMENTS`` elements, scaled."""
    held = ctx.held_masks.pop(item.name, None) if ctx.held_masks is not None else None
    if not any(tt.encoding == "tall" for tt in entry.tasks.values()):
        assert held is None
        return entry
    assert ctx.residuals is not None and item.base is not None
    assert held is None or tasks is None
    talls = _tall_references(ctx, item)
    ce, n = ctx.chunk_elements, SAMPLE_ELEMENTS
    for i, (t, x, rec) in enumerate(zip(item.tasks, item.thetas, talls)):
        tt = entry.tasks[t]
        if tasks is not None and (t not in tasks or "exact" in tt.extras):
            continue
        dt = dtype_name(x.dtype)
        xb = bits(x.contiguous())
        refs = {"tall": rec, "base": item.base.to(torch.float32).to(x.dtype), "zero": None}
        if torch.isnan(rec).any():  # a NaN's payload is unspecified: never code against it
            del refs["tall"]
        rbits = {k: (bits(v.contiguous()) if v is not None else np.zeros_like(xb)) for k, v in refs.items()}
        sizes = sorted((_encoded_size(ctx, permute(forward(xb[:n], rb[:n], tr), rb[:n], dt, "exponent", ce)), k, tr)
                       for k, rb in rbits.items() if k in CANDIDATES for tr in TRANSFORMS)
        _, ref, tr = sizes[0]
        derive = False
        if held is not None and MASK_POLICY != "store":
            scale = xb.size / max(1, min(n, xb.size))
            mask_bytes = sum(len(c) for c in held[i])
            with_mask = min(s * scale + mask_bytes for s, _, _ in sizes)
            without = [(s, k, r) for s, k, r in sizes if k != "tall"]
            if without and (MASK_POLICY == "derive" or without[0][0] * scale <= with_mask):
                derive, (_, ref, tr) = True, without[0]
        rb = rbits[ref]
        z = permute(forward(xb, rb, tr), rb, dt, "exponent", ce)
        udt = _UINT[x.element_size()][1]
        residual = ctx.writer.write_array(memoryview(z.view(np.uint8)), udt, tuple(x.shape),
                                          ctx.residuals(x.element_size()), ce)
        exact = Exact(ref, tr, "exponent", residual, tensor_hash(x))
        if derive:
            entry.tasks[t] = TaskTensor("tall-derived", tt.dtype, tt.shape, {},
                                        {"ones": tt.params["ones"], "lambda": ctx.lambdas[t]}, {"exact": exact})
            continue
        if held is not None:
            tt.arrays["mask"] = _write_mask(ctx, held[i], tt.shape)
        tt.extras["exact"] = exact
    return entry


__all__ = ["EXPONENT", "Exact", "TALL_ENCODINGS", "FIELDS", "add_exact", "has_exact", "rebuild_exact", "forward", "inverse"]
