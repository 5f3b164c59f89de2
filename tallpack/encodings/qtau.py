"""``qtau``: a task's own quantized task vector in place of its TALL mask (spec §6.1.8, format 1.7).

Where TALL loses too much for a task and a tensor (conflicting fine-tunes, large updates), the
fidelity dial may store the task vector itself, quantized symmetrically per block::

    {"encoding": "qtau", "dtype": ..., "shape": ..., "bits": 2 ... 8, "block": 64,
     "ones": <set bits of the derived mask>, "codes": <uint8 ref, [code_bytes(n, bits)]>,
     "scales": <float16 | float32 ref, [ceil(n / block)]>}

rebuilt as ``cast_d(f32(theta_0) + deQ)`` with ``deQ[i] = f32(u_i - 2**(bits-1)) * scales[i // block]``,
``u_i`` the i-th code: up to 4 bits, the i-th ``bits``-wide field of the codes read as a
little-endian bit stream; from 5 bits, byte i (zstd codes bytes better than fields that straddle
them: ``BENCHMARKS.md``, "The fidelity dial"). No mask and
no residual are stored for that pair; when every task of a tensor is ``qtau`` the tensor's merged
vector may be absent too. Consumers that need masks (consensus merging, ``stats``) derive one from
the dequantized vector (:func:`task_masks`): an approximation, stated in the spec.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

import numpy as np

from .._torch import torch
from ..arrays import ArrayRef
from ..dtypes import narrow, torch_dtype
from ..elements import FLOATING
from ..errors import FormatError
from ..tall import tall_mask
from .base import EXTRA_ARRAYS, Encoding, ReadArray, TaskTensor, TensorEntry, Use, register
from .derived import has_mask, task_mask

BITS = (2, 3, 4, 5, 6, 7, 8)
#: The writer's block (one scale per block of 64 elements, as the quantization baseline).
BLOCK = 64
#: A float16 scale may exceed the float32 one by at most this factor (it is rounded up, so no
#: code clamps); beyond it, or beyond float16's range, the scales are stored as float32.
HALF_SLACK = 1 + 2.0 ** -8
#: Whether the writer tries float16 scales at all (benchmarks turn it off to measure what it buys).
HALF_SCALES = True


def _numel(shape: tuple[int, ...]) -> int:
    return int(np.prod(shape, dtype=np.int64)) if shape else 1


#: Codes of more bits than this are stored one byte each; of this many or fewer, as a bit stream.
PACKED_BITS = 4


def code_bytes(n: int, bits: int) -> int:
    """Bytes of ``n`` codes of ``bits`` bits: a bit stream up to ``PACKED_BITS``, else a byte each."""
    return -(-n * bits // 8) if bits <= PACKED_BITS else n


def _half_up(s: np.ndarray) -> np.ndarray | None:
    """The scales as float16 rounded up, or None when float16 would cost precision or range."""
    with np.errstate(over="ignore"):  # past float16's range: inf, refused below
        h = s.astype(np.float16)
        low = h.astype(np.float32) < s
        h[low] = np.nextafter(h[low], np.float16(np.inf))
    up = h.astype(np.float32)
    if not np.isfinite(up).all() or (up > s * np.float32(HALF_SLACK)).any():
        return None
    return h


def quantize(tau: torch.Tensor, bits: int, block: int = BLOCK,
             half: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-block quantization of flat float32 ``tau``: (uint8 code stream, scales).

    ``scale = max_block |tau| / qmax`` (qmax = 2**(bits-1) - 1), as float16 rounded up when that
    loses under 2**-8 of it (``half``, default ``HALF_SCALES``), else float32;
    ``q = clamp(round_half_even(tau / scale), -qmax, qmax)`` against the stored scale (0 where it
    is 0); codes ``u = q + 2**(bits-1)``.

    >>> codes, scales = quantize(torch.randn(1000), 3)
    """
    codes, scales, _ = next(quantize_widths(tau, (bits,), block, half, deq=False))
    return codes, scales


def float_blocks(x: torch.Tensor, block: int) -> tuple[torch.Tensor, int, int]:
    """``x`` flat in float32 as ``[blocks, block]`` rows (the last padded with zeros), with its
    element and block counts."""
    x = x.reshape(-1).to(torch.float32)
    n = x.numel()
    nb = -(-n // block)
    if n == nb * block:
        return x.reshape(nb, block), n, nb
    blocks = torch.zeros(nb * block, dtype=torch.float32)
    blocks[:n] = x
    return blocks.reshape(nb, block), n, nb


def quantize_widths(tau: torch.Tensor, widths: Iterable[int], block: int = BLOCK, half: bool | None = None,
                    *, deq: bool = True, scratch: torch.Tensor | None = None
                    ) -> Iterator[tuple[np.ndarray, np.ndarray, torch.Tensor | None]]:
    """``quantize`` at each of ``widths`` in turn, the blocks and their maxima found once, each with
    its deQ (``dequantize`` of the arrays, bit for bit, without unpacking them) when ``deq``.
    Given ``scratch`` (float32, at least the blocks' elements), every width is worked in it, so
    each deQ is a view of it that the next width overwrites (use it before asking for the next):
    fresh tensors of a large tensor's size cost more, in page faults, than the arithmetic.

    >>> [codes.size for codes, _, _ in quantize_widths(torch.randn(1000), (2, 8))]
    [250, 1000]
    """
    blocks, n, nb = float_blocks(tau, block)
    b = blocks.numpy()
    work_t = scratch_floats(scratch, nb * block)
    w = work_t.numpy().reshape(nb, block)
    # numpy's passes, not torch's: on few (or busy) cores torch's threads wait on each other at
    # every pass, several times the arithmetic (BENCHMARKS.md, twenty-fourth round)
    amax = block_maxima(b, w)
    u8 = np.empty(nb * block, np.uint8)
    first = True
    for bits in widths:
        scales, used = width_scales(amax, bits, half)
        if scratch is None and deq and not first:  # each deQ its own
            work_t = scratch_floats(None, nb * block)
            w = work_t.numpy().reshape(nb, block)
        first = False
        codes = quantized(b, used, bits, n, w, u8, deq)
        yield codes, scales, work_t[:n] if deq else None


def block_maxima(b: np.ndarray, work: np.ndarray) -> np.ndarray:
    """Each row's largest magnitude (``b``: ``float_blocks``' rows; ``work``: a buffer of its shape)."""
    return np.abs(b, out=work).max(axis=1) if b.shape[0] else np.zeros(0, np.float32)


def width_scales(amax: np.ndarray, bits: int, half: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The scales stored for blocks of largest magnitudes ``amax`` at ``bits`` (float16 only where
    every block's fits: ``quantize``), and the float32 scales the codes are made against."""
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits}")
    s = np.divide(amax, np.float32((1 << (bits - 1)) - 1))
    scales = _half_up(s) if (HALF_SCALES if half is None else half) else None
    scales = s.astype(np.float32) if scales is None else scales
    return np.ascontiguousarray(scales), scales.astype(np.float32)


def quantized(b: np.ndarray, used: np.ndarray, bits: int, n: int, work: np.ndarray, u8: np.ndarray,
              deq: bool = True) -> np.ndarray:
    """The codes of the first ``n`` elements of rows ``b`` against scales ``used`` (``width_scales``),
    worked in ``work`` (``b``'s shape; with ``deq``, left holding the deQ) and ``u8`` (its size)."""
    qmax, offset = (1 << (bits - 1)) - 1, 1 << (bits - 1)
    safe = np.where(used > 0, used, np.float32(1))
    u = np.divide(b, safe[:, None], out=work)  # round half to even, clamp: the codes, as floats
    np.add(np.clip(np.rint(u, out=u), -qmax, qmax, out=u), offset, out=u)
    with np.errstate(invalid="ignore"):  # (only a NaN of tau: its code is unspecified)
        u8[:] = u.reshape(-1)
    codes = pack_codes(u8[:n], bits)
    if deq:  # as dequantize computes it: f32(u) - offset (0.0 where q was -0.0), times the scale
        np.multiply(np.subtract(u, offset, out=u), used[:, None], out=u)
    return codes


def scratch_floats(scratch: torch.Tensor | None, n: int) -> torch.Tensor:
    """``n`` float32 elements of ``scratch`` (flat), or fresh ones where it is None or too small."""
    if scratch is not None and scratch.dtype == torch.float32 and scratch.is_contiguous() and scratch.numel() >= n:
        return scratch.reshape(-1)[:n]
    return torch.empty(n, dtype=torch.float32)


#: Codes handled at a time by the bit-stream (un)packers (a multiple of 8, so each piece starts on
#: a byte): their temporaries stay at 8 bytes a code of one piece, whatever the tensor's size.
_PIECE = 1 << 20


def pack_codes(u: np.ndarray, bits: int) -> np.ndarray:
    """Codes of ``bits`` bits as one little-endian bit stream (code i in bits [i*bits, (i+1)*bits)),
    or, above ``PACKED_BITS``, one byte each. Only a code's low ``bits`` bits are kept. Eight codes
    make ``bits`` whole bytes: each eight's codes are shifted into one little-endian word (2 and 4
    bits: into bytes), whose low ``bits`` bytes are the stream's."""
    u = u.astype(np.uint8, copy=False)
    if bits > PACKED_BITS:
        return u.copy()
    out = np.empty(code_bytes(u.size, bits), np.uint8)
    low = np.uint8((1 << bits) - 1)
    for a in range(0, u.size, _PIECE):
        size = min(_PIECE, u.size - a)
        m = code_bytes(size, bits)
        piece = np.zeros(-(-size // 8) * 8, np.uint8)  # the last eight padded with zero codes
        np.bitwise_and(u[a : a + size], low, out=piece[:size])
        if 8 % bits == 0:  # 8 // bits codes a byte
            g = piece.reshape(-1, 8 // bits)
            stream = g[:, 0].copy()
            for j in range(1, 8 // bits):
                stream |= g[:, j] << np.uint8(bits * j)
        else:
            g = piece.reshape(-1, 8)
            word = g[:, 0].astype(np.uint32)
            for j in range(1, 8):
                word |= g[:, j].astype(np.uint32) << np.uint32(bits * j)
            stream = word.astype("<u4", copy=False).view(np.uint8).reshape(-1, 4)[:, :bits].reshape(-1)
        out[a * bits // 8 : a * bits // 8 + m] = stream[:m]
    return out


def unpack_codes(codes: np.ndarray, bits: int, n: int) -> np.ndarray:
    """The ``n`` codes of ``pack_codes``, as uint8."""
    codes = codes.view(np.uint8)
    if bits > PACKED_BITS:
        return codes[:n]
    out = np.empty(n, np.uint8)
    for a in range(0, n, _PIECE):
        m = min(_PIECE, n - a)
        piece = codes[a * bits // 8 : a * bits // 8 + code_bytes(m, bits)]
        stream = np.unpackbits(piece, bitorder="little")[: m * bits].reshape(m, bits)
        out[a : a + m] = np.packbits(stream, axis=1, bitorder="little").reshape(-1)
    return out


def dequantize(codes: np.ndarray, scales: np.ndarray, bits: int, block: int, n: int) -> torch.Tensor:
    """Flat float32 ``deQ[i] = f32(u_i - 2**(bits-1)) * f32(scales[i // block])`` (one product)."""
    u = unpack_codes(codes, bits, n)
    q = torch.from_numpy(u.astype(np.float32) - np.float32(1 << (bits - 1)))
    s = torch.from_numpy(scales.astype(np.float32)).repeat_interleave(block)[:n]
    return q * s


def rebuilt(base: torch.Tensor, deq: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``cast_d(f32(theta_0) + deQ)``."""
    return narrow(base.reshape(-1).to(torch.float32).add(deq), dtype)


@register
class QTau(Encoding):
    name = "qtau"
    kind = None  # written by the fidelity dial beside tall entries (tensor kind "merged"), not by a kind
    shaped_arrays = False
    task_arrays = ("codes", "scales")
    task_params = ("bits", "block", "ones")
    entry_arrays = ("base",)

    @classmethod
    def validate(cls, entry: TensorEntry, tt: TaskTensor, where: str) -> None:
        super().validate(entry, tt, where)
        bits, block, ones = (tt.params.get(k) for k in ("bits", "block", "ones"))
        n = _numel(tt.shape)
        if bits not in BITS or type(bits) is not int or type(block) is not int or not 1 <= block <= 1 << 20:
            raise FormatError(f"{where}: bad bits {bits!r} or block {block!r} of a qtau entry")
        if type(ones) is not int or not 0 <= ones <= n:
            raise FormatError(f"{where}: bad count of set bits {ones!r} of the derived mask")
        codes, scales = tt.arrays["codes"], tt.arrays["scales"]
        if (codes.dtype != "uint8" or codes.shape != (code_bytes(n, bits),)
                or scales.dtype not in ("float16", "float32") or scales.shape != (-(-n // block),)):
            raise FormatError(f"{where}: a qtau entry needs uint8 codes of shape [{code_bytes(n, bits)}] and "
                              f"float16/float32 scales of shape [{-(-n // block)}]")
        base, merged = entry.arrays["base"], entry.arrays.get("merged")
        if tt.dtype not in FLOATING or base.dtype not in FLOATING or base.shape != tt.shape:
            raise FormatError(f"{where}: a qtau entry needs a floating dtype and a floating base of its shape")
        if merged is not None and (merged.dtype != "float32" or merged.shape != tt.shape):
            raise FormatError(f"{where}: merged vector must be float32 of the base's shape")
        for key, dtype in EXTRA_ARRAYS.items():
            ref = entry.arrays.get(key)
            if ref is not None and (ref.shape != tt.shape or ref.dtype != dtype):
                raise FormatError(f"{where}: {key} must be {dtype} of the base's shape")

    @classmethod
    def inputs(cls, entry: TensorEntry, tt: TaskTensor) -> dict[str, tuple[ArrayRef, Use]]:
        return {"base": (entry.arrays["base"], Use.SHARED_INPUT), "codes": (tt.arrays["codes"], Use.INPUT),
                "scales": (tt.arrays["scales"], Use.INPUT)}

    @classmethod
    def rebuild(cls, arrays: Mapping[str, torch.Tensor], entry: TensorEntry, tt: TaskTensor) -> torch.Tensor:
        return rebuilt(arrays["base"], deq_of(arrays["codes"], arrays["scales"], tt),
                       torch_dtype(tt.dtype)).reshape(tt.shape)


def deq_of(codes: torch.Tensor, scales: torch.Tensor, tt: TaskTensor) -> torch.Tensor:
    """deQ of a qtau task entry from its decoded arrays, on their device (decoded on the CPU)."""
    deq = dequantize(codes.reshape(-1).cpu().numpy(), scales.reshape(-1).cpu().numpy(), tt.params["bits"],
                     tt.params["block"], _numel(tt.shape))
    return deq.to(codes.device)


# -- for consumers of masks: consensus merging, stats ---------------------------------------------

def task_masks(read: ReadArray, entry: TensorEntry, lambdas: Mapping[str, float | None]
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """tau_MTL and every task's mask of a merged tensor, flat. Stored masks as stored; for a
    ``qtau`` task the derived mask ``|deQ_t| > lambda_t * |tau_MTL - deQ_t|`` (spec §6.1.7). When
    the tensor has no merged vector, tau_MTL is the float32 sum of the tasks' deQ in the order of
    ``lambdas`` (the manifest's task order)."""
    where = f"tensor {entry.name!r}"
    deqs: dict[str, torch.Tensor] = {}
    for t in lambdas:
        tt = entry.tasks.get(t)
        if tt is not None and tt.encoding == "qtau":
            deqs[t] = deq_of(read(tt.arrays["codes"], f"task {t!r}, {where} (codes)"),
                             read(tt.arrays["scales"], f"task {t!r}, {where} (scales)"), tt)
    if "merged" in entry.arrays:
        merged = read(entry.arrays["merged"], f"{where} (merged)").reshape(-1)
    else:
        if not deqs or len(deqs) != len(entry.tasks):
            raise FormatError(f"{where}: no merged vector and not every task is qtau")
        merged = torch.zeros_like(next(iter(deqs.values())))
        for d in deqs.values():
            merged = merged + d
    masks = {}
    for t in lambdas:
        tt = entry.tasks.get(t)
        if tt is None:
            continue
        if t in deqs:
            masks[t] = tall_mask(deqs[t], merged, float(lambdas[t] or 0.0))
        elif has_mask(tt):
            masks[t] = task_mask(read, entry, tt, f"task {t!r}, {where}").reshape(-1)
    return merged, masks
