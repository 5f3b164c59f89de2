"""Corrections: per task and merged tensor, part of what TALL loses, stored beside the mask
(spec §6.1.6, format 1.5).

TALL rebuilds a task's tensor as ``theta_0 + m_t * tau_MTL``; what it loses is the residual
``r_t = f32(theta_t) - (f32(theta_0) + m_t * tau_MTL)``. A ``tall`` task entry may carry an optional
``correction`` field that stores part of it, cheapest first:

* ``sparse``: the k largest-magnitude entries of ``r_t``, ties at the cut broken by the lowest
  index (``sparse_select``; delta-coded indices, float16 or float32 values)::

      {"kind": "sparse", "indices": <uint32|uint64 ref, [k]>, "values": <float16|float32 ref, [k]>}

* ``quant``: all of ``r_t``, quantized symmetrically per block of ``block`` elements::

      {"kind": "quant", "bits": 8 | 4, "block": 64, "scales": <float32 ref>, "codes": <int8|uint8 ref>}

* ``exact``: the original bits, through the task entry's ``exact`` field (the exact tier, §6.1.5)::

      {"kind": "exact"}

A ``sparse`` or ``quant`` entry is rebuilt as ``cast_d((f32(theta_0) + m_t * tau_MTL) + C)`` in
float32, C the decoded correction (0 where none). Readers that do not know the field read the plain
TALL tier. Which correction each tensor gets is the fidelity dial's choice (``tallpack.dial``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .._torch import torch
from ..arrays import ArrayRef
from ..dtypes import as_numpy, narrow, torch_dtype
from ..errors import FormatError
from ..tall import Planar, reconstruct_planar
from .base import ReadArray, TaskTensor, TensorEntry, Use, register_field
from .exact import rebuild_exact
from .qtau import float_blocks, scratch_floats
from .tall import Tall

KINDS = ("sparse", "quant", "exact")
BITS = (8, 4)
#: The block of the writer's quantized corrections (one float32 scale per block).
BLOCK = 64
#: The largest magnitude a sparse value may have to be stored as float16 (its finite maximum is
#: 65504; below 2**-14 it loses precision, which for the largest entries of a residual is noise).
FLOAT16_MAX = 60000.0


# -- the arithmetic, shared by the writer, the dial and the reader ---------------------------------

def residual(theta: torch.Tensor, base: torch.Tensor, mask: torch.Tensor, merged: torch.Tensor) -> torch.Tensor:
    """``f32(theta_t) - (f32(theta_0) + m_t * tau_MTL)``, flat float32: what TALL loses."""
    rec = torch.addcmul(base.reshape(-1).to(torch.float32), mask.reshape(-1).to(torch.float32), merged.reshape(-1))
    return theta.reshape(-1).to(torch.float32) - rec


#: ``magnitude_bits``'s pattern of every NaN: above +inf's (0x7F800000), all NaNs one magnitude.
NAN_BITS = np.uint32(0x7F800001)
#: Elements ``sparse_select`` compares at a time (its boolean and index work stays this small).
SELECT_RUN = 1 << 20


def magnitude_bits(r: torch.Tensor | np.ndarray) -> np.ndarray:
    """``|r|``'s float32 bit patterns (uint32, a new array), ordered as the magnitudes are: -0.0
    and 0.0 one, every NaN ``NAN_BITS``, above +inf. ``r``: flat float32 (or its ``abs()``)."""
    a = r.numpy() if isinstance(r, torch.Tensor) else r
    u = np.abs(a).view(np.uint32)
    return np.minimum(u, NAN_BITS, out=u)


def sparse_kept(u: np.ndarray, cut: int | np.integer[Any], ties: int) -> tuple[np.ndarray, int]:
    """The positions (ascending) in ``u`` (magnitude bits, in index order) of the entries above
    ``cut`` and of the first ``ties`` equal to it; and how many equal to it are among them. Given
    a tensor's pieces in index order, each with the ties left after the ones before, the choice is
    the whole tensor's.

    >>> sparse_kept(np.uint32([3, 5, 3, 9, 3]), 3, 1)
    (array([0, 1, 3]), 1)
    """
    sel = np.greater(u, cut)
    took = 0
    if ties > 0:
        eq = np.flatnonzero(u == cut)[:ties]
        sel[eq] = True
        took = eq.size
    return np.flatnonzero(sel), took


def sparse_select(u: np.ndarray, ks: Iterable[int]) -> Iterator[tuple[int, np.ndarray]]:
    """``(k, indices)`` for each of ``ks``: the ``k`` entries of ``u`` (``magnitude_bits``) of
    largest magnitude, ties at the cut broken by the lowest index (those above the ``k``-th
    largest, then the first of those equal to it), ascending int64; every cut from one partial
    sort. ``k`` is clipped to ``[0, u.size]``.

    >>> [(k, i.tolist()) for k, i in sparse_select(np.uint32([1, 4, 4, 2, 4]), [1, 2, 4])]
    [(1, [1]), (2, [1, 2]), (4, [1, 2, 3, 4])]
    """
    n, ks = u.size, list(ks)
    kth = sorted({n - k for k in ks if 0 < k < n})
    part = np.partition(u, kth) if kth else u
    for k in ks:
        if not 0 < k < n:
            yield k, np.arange(max(0, min(k, n)), dtype=np.int64)
            continue
        cut = part[n - k]
        ties = int(np.count_nonzero(part[n - k :] == cut))  # (every entry above the cut is there too)
        picked = []
        for a in range(0, n, SELECT_RUN):
            local, took = sparse_kept(u[a : a + SELECT_RUN], cut, ties)
            ties -= took
            picked.append(local + a)
        yield k, np.concatenate(picked)


def sparse_arrays(r: torch.Tensor, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A sparse correction's arrays of flat ``r`` kept at ``idx`` (ascending): (index gaps, values).
    The first gap is the first index, each next one the difference to the previous index; values
    float16 where every one kept is within ``FLOAT16_MAX``, else float32."""
    gaps = np.diff(idx, prepend=0).astype(np.uint64 if r.numel() > 0xFFFFFFFF else np.uint32)
    vals = r.numpy()[idx]
    if vals.size == 0 or float(np.abs(vals).max()) <= FLOAT16_MAX:
        vals = vals.astype(np.float16)
    return gaps, np.ascontiguousarray(vals)


def sparse_encode(r: torch.Tensor, k: int, magnitude: torch.Tensor | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` largest-magnitude entries of flat float32 ``r``, ties at the cut broken by the
    lowest index (``sparse_select``; a NaN above every number): (index gaps, values), indices
    ascending (``sparse_arrays``). ``magnitude``: ``r.abs()``, when the caller has it.

    >>> sparse_encode(torch.tensor([0.5, -2.0, 0.5, 0.5]), 2)
    (array([0, 1], dtype=uint32), array([ 0.5, -2. ], dtype=float16))
    """
    return next(sparse_encode_ks(r, [k], magnitude))[1:]


def sparse_encode_ks(r: torch.Tensor, ks: Iterable[int], magnitude: torch.Tensor | None = None
                     ) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """``(k, *sparse_encode(r, k))`` for each of ``ks`` (ascending, distinct), their cuts found by
    one partial sort of the magnitudes (``sparse_select``)."""
    u = magnitude_bits(r if magnitude is None else magnitude)
    for k, idx in sparse_select(u, ks):
        yield (k, *sparse_arrays(r, idx))


def sparse_decode(gaps: np.ndarray, values: np.ndarray, numel: int, where: str = "sparse correction") -> torch.Tensor:
    """The flat float32 correction of a sparse one (checks the indices)."""
    if gaps.size != values.size:
        raise FormatError(f"{where}: {gaps.size} indices for {values.size} values")
    out = torch.zeros(numel, dtype=torch.float32)
    if gaps.size == 0:
        return out
    g = gaps.astype(np.uint64)
    if (g[1:] == 0).any():
        raise FormatError(f"{where}: indices must be strictly increasing")
    if int(g.astype(object).sum()) >= numel:  # exact integer sum: no wrap-around
        raise FormatError(f"{where}: an index lies beyond the tensor's {numel} elements")
    idx = torch.from_numpy(np.cumsum(g).astype(np.int64))
    out[idx] = torch.from_numpy(values.astype(np.float32))
    return out


def quant_encode(r: torch.Tensor, bits: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-block quantization of flat ``r``: (codes, float32 scales). 8 bits: int8 codes
    in [-127, 127]; 4 bits: two codes a byte (element 2j in the low nibble), each ``q + 8`` with q in
    [-7, 7]. ``scale = max|r| / qmax`` per block; ``q = round_half_even(r / scale)``."""
    codes, scales, _ = next(quant_encode_widths(r, (bits,), block, deq=False))
    return codes, scales


def quant_encode_widths(r: torch.Tensor, widths: Iterable[int], block: int, *, deq: bool = True,
                        scratch: torch.Tensor | None = None
                        ) -> Iterator[tuple[np.ndarray, np.ndarray, torch.Tensor | None]]:
    """``quant_encode`` at each of ``widths`` in turn, the blocks and their maxima found once, each
    with its ``quant_decode`` (bit for bit, without decoding the arrays) when ``deq``. As
    ``qtau.quantize_widths``, given ``scratch`` every width is worked in it, so that each
    correction is overwritten by the next width's."""
    blocks, n, nb = float_blocks(r, block)
    b = blocks.numpy()
    work_t = scratch_floats(scratch, nb * block)
    w = work_t.numpy().reshape(nb, block)
    amax = np.abs(b, out=w).max(axis=1)  # numpy's passes: see qtau.quantize_widths
    first = True
    for bits in widths:
        qmax = (1 << (bits - 1)) - 1
        scales = np.divide(amax, np.float32(qmax))
        safe = np.where(scales > 0, scales, np.float32(1))
        if scratch is None and deq and not first:  # each correction its own
            work_t = scratch_floats(None, nb * block)
            w = work_t.numpy().reshape(nb, block)
        first = False
        qf = np.clip(np.rint(np.divide(b, safe[:, None], out=w), out=w), -qmax, qmax, out=w)
        with np.errstate(invalid="ignore"):  # (only a NaN of r: its code is unspecified)
            q = qf.reshape(-1)[:n].astype(np.int8)
        d = None
        if deq:  # (an int's 0 is +0.0: adding 0.0 turns a rounded -0.0 into it, as the int8 codes would)
            np.multiply(np.add(qf, np.float32(0.0), out=qf), scales[:, None], out=qf)
            d = work_t[:n]
        if bits == 8:
            codes = q
        else:
            u = q.view(np.uint8) + np.uint8(8)  # q + 8 in [1, 15], modulo 256
            if n % 2:
                u = np.append(u, np.uint8(8))
            codes = u[0::2] | (u[1::2] << np.uint8(4))
        yield codes, scales.astype(np.float32), d


def quant_decode(codes: np.ndarray, scales: np.ndarray, bits: int, block: int, numel: int) -> torch.Tensor:
    """The flat float32 correction of a quantized one: ``f32(q[i]) * scales[i // block]``."""
    if bits == 8:
        q = torch.from_numpy(codes.view(np.int8).astype(np.float32))
    else:
        u = codes.view(np.uint8)
        both = np.empty(u.size * 2, dtype=np.int16)
        both[0::2] = (u & 0x0F).astype(np.int16) - 8
        both[1::2] = (u >> 4).astype(np.int16) - 8
        q = torch.from_numpy(both[:numel].astype(np.float32))
    s = torch.from_numpy(scales.astype(np.float32, copy=False)).repeat_interleave(block)[:numel]
    return q * s


def corrected(base: torch.Tensor, mask: torch.Tensor, merged: torch.Tensor, c: torch.Tensor,
              dtype: torch.dtype) -> torch.Tensor:
    """``cast_d((f32(theta_0) + m_t * tau_MTL) + C)``: the TALL rebuild plus a correction."""
    rec = torch.addcmul(base.to(torch.float32), mask.to(torch.float32), merged)
    return narrow(rec.add_(c.reshape(rec.shape)), dtype)


# -- the manifest field --------------------------------------------------------------------------

@register_field("correction")
@dataclass(frozen=True)
class Correction:
    kind: str
    refs: dict[str, ArrayRef] = field(default_factory=dict)
    bits: int | None = None
    block: int | None = None

    @property
    def arrays(self) -> dict[str, ArrayRef]:
        return self.refs

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"kind": self.kind}
        if self.kind == "quant":
            d |= {"bits": self.bits, "block": self.block}
        return d | {k: r.to_dict() for k, r in self.refs.items()}

    @classmethod
    def from_dict(cls, d: Any, tt: TaskTensor, where: str) -> "Correction":
        kind = d.get("kind") if isinstance(d, dict) else None
        if kind not in KINDS:
            raise FormatError(f"{where}: unknown correction kind {kind!r}; a newer tallpack may read it")
        if tt.encoding != "tall":
            raise FormatError(f"{where}: a correction belongs to a tall entry")
        n = int(np.prod(tt.shape, dtype=np.int64)) if tt.shape else 1
        try:
            if kind == "exact":
                if "exact" not in tt.extras:  # parsed first: exact.py registers its field first
                    raise FormatError(f"{where}: an exact correction needs the entry's exact field")
                return cls(kind)
            if kind == "sparse":
                refs = {k: ArrayRef.from_dict(d[k], (where, k)) for k in ("indices", "values")}
                ind, val = refs["indices"], refs["values"]
                if (ind.dtype not in ("uint32", "uint64") or val.dtype not in ("float16", "float32")
                        or len(ind.shape) != 1 or ind.shape != val.shape or ind.shape[0] > n):
                    raise FormatError(f"{where}: a sparse correction needs uint32/uint64 indices and "
                                      "float16/float32 values of one length, at most the tensor's size")
                return cls(kind, refs)
            bits, block = d["bits"], d["block"]
            if bits not in BITS or type(bits) is not int or type(block) is not int or not 1 <= block <= 1 << 20:
                raise FormatError(f"{where}: bad bits {bits!r} or block {block!r}")
            refs = {k: ArrayRef.from_dict(d[k], (where, k)) for k in ("scales", "codes")}
            sc, co = refs["scales"], refs["codes"]
            want = (n,) if bits == 8 else (-(-n // 2),)
            if (sc.dtype != "float32" or sc.shape != (-(-n // block),) or co.shape != want
                    or co.dtype != ("int8" if bits == 8 else "uint8")):
                raise FormatError(f"{where}: scales must be float32 of ceil(numel/block) and codes "
                                  f"{'int8' if bits == 8 else 'uint8'} of shape {list(want)}")
            return cls(kind, refs, bits, block)
        except (KeyError, TypeError, AttributeError):
            raise FormatError(f"{where}: malformed correction") from None

    # -- reading: called by the tall encoding ---------------------------------------------------
    def inputs(self, entry: TensorEntry, tt: TaskTensor) -> dict[str, tuple[ArrayRef, Use]]:
        plain = Tall.plain_inputs(entry, tt)
        if self.kind == "exact":
            return plain | {"exact/residual": (tt.extras["exact"].residual, Use.INPUT)}
        return plain | {f"correction/{k}": (r, Use.INPUT) for k, r in self.refs.items()}

    def rebuild(self, arrays: Mapping[str, torch.Tensor], entry: TensorEntry, tt: TaskTensor) -> torch.Tensor:
        dtype, n = torch_dtype(tt.dtype), int(np.prod(tt.shape, dtype=np.int64)) if tt.shape else 1
        if self.kind == "exact":
            by_ref = {id(ref): arrays[k] for k, (ref, _) in self.inputs(entry, tt).items()}
            read: ReadArray = lambda ref, where, use=Use.OUTPUT: by_ref[id(ref)]  # noqa: E731
            return rebuild_exact(read, entry, tt, "exact correction")
        a = {k: as_numpy(arrays[f"correction/{k}"].reshape(-1).cpu(), r.dtype) for k, r in self.refs.items()}
        if self.kind == "sparse":
            c = sparse_decode(a["indices"], a["values"], n)
        else:
            assert self.bits is not None and self.block is not None
            c = quant_decode(a["codes"], a["scales"], self.bits, self.block, n)
        base, merged = arrays["base"], arrays["merged"]
        if isinstance(base, Planar) and isinstance(merged, Planar):  # float32 on the CPU (Tall.planar_inputs)
            rec = reconstruct_planar(base, arrays["mask"], merged, tt.shape)  # addcmul's bits
            return rec.add_(c.reshape(rec.shape))
        c = c.to(base.device)  # decoded on the CPU; the rebuild runs where the inputs are
        return corrected(base, arrays["mask"], merged, c, dtype).reshape(tt.shape)

