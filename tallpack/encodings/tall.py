"""``tall``: the paper's TALL mask. Per tensor, the base theta_0 and the merged vector tau_MTL
are stored once (plus the merge method's extra arrays); per task, one bit-packed mask
``m_t = |tau_t| > lambda_t * |tau_MTL - tau_t|``. Rebuilt as ``theta_0 + m_t * tau_MTL`` (spec §6.1)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from math import prod

import numpy as np

from .. import kernels
from .._torch import torch
from ..arrays import ArrayRef
from ..container import ArrayBuilder, Encoded
from ..dtypes import dtype_name, narrow, tensor_to_bytes, torch_dtype
from ..elements import FLOATING
from ..errors import FormatError
from ..tall import (TALL_RANGE, Bits, Planar, Workspace, blocks, compiled_kind, elements, reconstruct,
                    reconstruct_parts, reconstruct_planar, tall_mask_tv_with_fidelity, tall_mask_with_fidelity)
from .base import EXTRA_ARRAYS, Encoding, Item, Later, TaskTensor, TensorEntry, Use, WriteContext, register


#: Elements of each sub-block the packer computes task vectors, merged vector and masks in
#: (chunks are cut from these): the working set of T float32 task vectors is T x 4 MiB.
COMPUTE_ELEMENTS = 1 << 20


def check_ones(tt: TaskTensor, where: str) -> None:
    """A task entry with a TALL mask (stored or derived) needs its ``ones`` count."""
    ones = tt.params.get("ones")
    if type(ones) is not int or not 0 <= ones <= prod(tt.shape):
        raise FormatError(f"{where}: bad count of set mask bits {ones!r}")


def check_merged_arrays(entry: TensorEntry, tt: TaskTensor, where: str) -> None:
    """What a task entry with a TALL mask needs of its tensor entry (``Encoding.validate_tensor``):
    the base, merged vector and merge-method arrays, all of the task's shape."""
    shape, arrays = tt.shape, entry.arrays
    base, merged = arrays.get("base"), arrays.get("merged")
    if base is None or merged is None:
        raise FormatError(f"{where}: masks without base and merged vector")
    if base.shape != shape or merged.shape != shape:
        raise FormatError(f"{where}: shape differs from the base's")
    if merged.dtype != "float32" or base.dtype not in FLOATING:
        raise FormatError(f"{where}: merged vector must be float32 and the base floating")
    for key, dtype in EXTRA_ARRAYS.items():
        ref = arrays.get(key)
        if ref is not None and (ref.shape != shape or ref.dtype != dtype):
            raise FormatError(f"{where}: {key} must be {dtype} of the base's shape")


def _straight(ctx: WriteContext, tasks: Sequence[str], kind: str, base: torch.Tensor, thetas: list[torch.Tensor],
              merged: torch.Tensor, extras: dict[str, torch.Tensor], masks: list[torch.Tensor], ones: list[int],
              at: int, groups: int) -> None:
    """One chunk's merged vector, extras and masks computed straight from the inputs, for a method
    that can (``MergeMethod.straight``: Task Arithmetic, TIES) and inputs the compiled loops take
    (``compiled_kind``): the method's ``combine_inputs`` (``kernels.tv_sum``, ``ties_merge``, in
    element ranges on up to ``ctx.threads`` threads), then each task's ``kernels.tall_mask_tv``
    (the tasks in ``groups`` groups at once, all but the first on helper threads), which compute
    the task vectors a block at a time on the stack instead of writing T float32 vectors to memory
    and reading them back twice. The same operations in the same order as ``blocks``, ``combine`` and
    ``tall_mask_with_fidelity``, so the same bits (tests compare the archives). In sub-blocks of
    COMPUTE_ELEMENTS, so that the masks read a merged vector still in cache. The chunk is elements
    [at, at + n) of its tensor (the fidelity sums' blocks count from the tensor's start)."""
    bb, xs = elements(base), [elements(x) for x in thetas]
    mv, mb = merged.numpy(), [m.view(torch.uint8).numpy() for m in masks]
    ev = {key: x.numpy() for key, x in extras.items()}
    n = bb.size
    for o in range(0, n, COMPUTE_ELEMENTS):
        e = min(n, o + COMPUTE_ELEMENTS)
        ctx.method.combine_inputs(bb[o:e], [x[o:e] for x in xs], kind, mv[o:e], {k: v[o:e] for k, v in ev.items()},
                                  ctx.threads)

        def run(first: int, end: int, o: int = o, e: int = e) -> None:
            for i in range(first, end):
                t = tasks[i]
                got = tall_mask_tv_with_fidelity(xs[i][o:e], bb[o:e], kind, mv[o:e], ctx.lambdas[t], mb[i][o:e],
                                                 ctx.fidelity[t], at + o)
                assert got is not None, "compiled_kind admitted arrays the compiled loops refuse"
                ones[i] += got
        kernels.in_parts(len(tasks), groups, run)


def narrow_dtypes(dtypes: Sequence[torch.dtype]) -> list[torch.dtype | None]:
    """Each task's dtype where its TALL rebuild can pass the dtype's range (float16, float8: below
    ``TALL_RANGE``, the bound on task vectors), else None (float32, bfloat16)."""
    return [dt if dt.is_floating_point and torch.finfo(dt).max < TALL_RANGE else None for dt in dtypes]


def _max_abs(t: torch.Tensor) -> float:
    """The largest |t| (NaN when t holds one; t is float32, 16-bit or float8)."""
    if t.numel() == 0:
        return 0.0
    if t.dtype in (torch.float16, torch.bfloat16, torch.float32) and t.is_contiguous():
        # |x|'s bits are x's without the sign, ordered as the magnitudes (a NaN's pass every
        # number's): the largest positive's are the largest signed value, the largest negative's
        # the largest unsigned one less the sign bit. Two numpy passes, no temporary, on this
        # thread: torch.aminmax of float16 took 30x as long, and of float32 on 2 threads took
        # 1.2-24 ms for 1M elements (its workers wait for the pack's own busy threads), 0.1 ms so.
        wide = t.dtype == torch.float32
        bits = t.reshape(-1).view(torch.int32 if wide else torch.int16).numpy()
        unsigned = bits.view(np.uint32 if wide else np.uint16)
        top = max(int(np.max(bits)), int(np.max(unsigned)) & (0x7FFFFFFF if wide else 0x7FFF))
        if t.dtype == torch.float16:
            return float(np.array([top], np.uint16).view(np.float16)[0])
        if t.dtype == torch.bfloat16:  # a bfloat16 is a float32's upper half
            return float(np.array([top << 16], np.uint32).view(np.float32)[0])
        return float(np.array([top], np.uint32).view(np.float32)[0])
    lo, hi = torch.aminmax(t if t.dtype in (torch.float32, torch.float16, torch.bfloat16) else t.to(torch.float32))
    return max(-float(lo), float(hi))


def check_overflow(ctx: WriteContext, name: str, tasks: Sequence[str], dtypes: Sequence[torch.dtype | None],
                   base: torch.Tensor, merged: torch.Tensor, masks: Sequence[torch.Tensor], offset: int) -> None:
    """Count in ``ctx.fidelity`` each task's elements of this block (at ``offset`` of tensor
    ``name``) that its rebuild ``cast_d(theta_0 + m_t * tau_MTL)`` gives as +-inf or NaN, the
    original being finite (a float16 or float8 sum past the dtype's range; ``dtypes`` from
    ``narrow_dtypes``). The rebuild is computed only where the block's largest |theta_0| plus its
    largest |tau_MTL| passes the dtype's largest value: fine-tuned weights never come near."""
    bound: float | None = None
    for t, dt, mask in zip(tasks, dtypes, masks):
        if dt is None:
            continue
        if bound is None:
            bound = _max_abs(base) + _max_abs(merged)
        if bound <= torch.finfo(dt).max:
            continue
        rec = narrow(torch.addcmul(base.to(torch.float32), mask.to(torch.float32), merged), dt)
        ctx.fidelity[t].add_overflow(name, torch.nonzero(~torch.isfinite(rec.to(torch.float32))).reshape(-1) + offset)


@register
class Tall(Encoding):
    name = "tall"
    kind = "merged"
    elementwise = True
    task_arrays = ("mask",)
    task_params = ("ones",)
    entry_arrays = ("base", "merged")

    @classmethod
    def validate(cls, entry: TensorEntry, tt: TaskTensor, where: str) -> None:
        mask = tt.arrays.get("mask")
        if mask is None or mask.dtype != "bool" or tt.dtype not in FLOATING:
            raise FormatError(f"{where}: a tall entry needs a bool mask and a floating dtype")
        check_ones(tt, where)

    @classmethod
    def validate_tensor(cls, entry: TensorEntry, tt: TaskTensor, where: str) -> None:
        check_merged_arrays(entry, tt, where)

    @classmethod
    def write(cls, ctx: WriteContext, item: Item) -> "TensorEntry | Later":
        """Stream the tensor block by block: base, tau_MTL, the method's extras and every mask."""
        tasks, w = item.tasks, ctx.writer
        base_dtype, dtypes = item.dtypes
        assert base_dtype is not None
        shape, ce = item.shape, ctx.chunk_elements
        b_dt = dtype_name(base_dtype)
        derivable = {"merged": "float32", **ctx.method.extra_arrays}  # held for the exact tier (format 1.8)
        hold = ctx.held_merged is not None
        entry_arrays: dict[str, _Held | ArrayBuilder] = {"base": w.begin_array(b_dt, shape, ctx.dense(b_dt), ce)}
        for key, dtype in derivable.items():
            entry_arrays[key] = _Held(ctx.dense(dtype)) if hold else w.begin_array(dtype, shape, ctx.dense(dtype), ce)
        held = ctx.held_masks is not None  # the exact tier decides later whether to store each mask
        mask_arrays: list[_Held | ArrayBuilder] = [
            _Held(ctx.masks) if held else w.begin_array("bool", shape, ctx.masks, ce) for _ in tasks]
        ones = [0] * len(tasks)
        arrays = [*entry_arrays.values(), *mask_arrays]
        ws = Workspace()
        groups = min(ctx.threads, len(tasks))  # the tasks' masks in this many groups at once
        spaces = {0: ws}  # each group's workspace, by its first task (only the loops without kernels use them)
        narrows = narrow_dtypes(dtypes)
        for k, (a, b, xs) in enumerate(item.blocks(ce)):  # (a streamed item's read a block at a time)
            # One chunk's merged vector, extras and masks, computed in sub-blocks: the T float32
            # task vectors (the largest working set) then take T x COMPUTE_ELEMENTS, not T x a chunk.
            assert b is not None
            kind = compiled_kind(b, xs) if ctx.method.straight else None  # see _straight
            n, side = b.numel(), k % 2  # what is being encoded (merged, masks) alternates between two sets
            merged = ws.get(f"merged{side}", n)
            masks = [ws.get(f"mask{i}.{side}", n, torch.bool) for i in range(len(tasks))]
            extras: dict[str, torch.Tensor] = {}
            if kind is not None:
                extras = {key: ws.get(f"{key}{side}", n, torch_dtype(dt))
                          for key, dt in ctx.method.extra_arrays.items()}
                _straight(ctx, tasks, kind, b, xs, merged, extras, masks, ones, a, groups)
            for o, (sb, taus) in zip(range(0, n, COMPUTE_ELEMENTS), () if kind is not None else
                                     blocks(b, xs, COMPUTE_ELEMENTS, ws)):
                s = slice(o, o + sb.numel())
                sub, sub_extras = ctx.method.combine_with_extras(taus, out=merged[s])  # TIES: selected once
                if sub.data_ptr() != merged[s].data_ptr():  # a method that cannot write into ``out``
                    merged[s].copy_(sub)
                for key, x in sub_extras.items():
                    if key not in extras:
                        extras[key] = ws.get(f"{key}{side}", n, x.dtype)
                    extras[key][s].copy_(x)

                def run(first: int, end: int, s: slice = s, taus: list = taus, at: int = a + o) -> None:
                    space = spaces.get(first)
                    if space is None:  # (the groups' first tasks are the same in every block)
                        space = spaces.setdefault(first, Workspace())
                    for i in range(first, end):
                        t = tasks[i]
                        ones[i] += tall_mask_with_fidelity(taus[i], merged[s], ctx.lambdas[t], masks[i][s],
                                                           ctx.fidelity[t], space, at)
                kernels.in_parts(len(tasks), groups, run)
            if any(narrows):
                check_overflow(ctx, item.name, tasks, narrows, b, merged, masks, a)
            parts = {"base": b, "merged": merged, **extras}
            jobs = [(a_.chain, tensor_to_bytes(parts[key])) for key, a_ in entry_arrays.items()]
            jobs += [(ctx.masks, tensor_to_bytes(m)) for m in masks]
            futures = w.submit(jobs)
            for arr, f in zip(arrays, futures):
                w.queue(arr.queued, f)
            w.drain(leave=len(futures))  # the chunk before this one written (this tensor's, or the last one's)
            del b, xs  # (a streamed item's blocks, let go before the next are read)

        # (names, not the tensors: a deferred entry, held to the end of the pack, would hold them)
        name, names = item.name, [dtype_name(x) for x in dtypes]

        def entry() -> TensorEntry:
            return TensorEntry(
                name, cls.kind,
                {t: TaskTensor(cls.name, dt, shape, {} if held else {"mask": _finish(k)}, {"ones": n})
                 for t, dt, k, n in zip(tasks, names, mask_arrays, ones)},
                {k: _finish(a) for k, a in entry_arrays.items()},
            )
        if ctx.defer and not (held or hold):
            return Later(entry)  # its last chunk written while the next tensor is computed
        w.drain()
        if held:
            assert ctx.held_masks is not None
            ctx.held_masks[item.name] = [_chunks(k) for k in mask_arrays]
        if hold:
            assert ctx.held_merged is not None
            ctx.held_merged[item.name] = {k: (dt, _chunks(entry_arrays.pop(k))) for k, dt in derivable.items()}
        return entry()

    @classmethod
    def plain_inputs(cls, entry: TensorEntry, tt: TaskTensor) -> dict[str, tuple[ArrayRef, Use]]:
        """The arrays of the plain TALL rebuild (§6.1.1), whatever optional fields the entry has."""
        return {"base": (entry.arrays["base"], Use.SHARED_INPUT), "merged": (entry.arrays["merged"], Use.SHARED_INPUT),
                "mask": (tt.arrays["mask"], Use.INPUT)}

    @classmethod
    def inputs(cls, entry: TensorEntry, tt: TaskTensor) -> dict[str, tuple[ArrayRef, Use]]:
        corr = tt.extras.get("correction")  # the fidelity dial's correction (encodings/correction.py)
        return corr.inputs(entry, tt) if corr is not None else cls.plain_inputs(entry, tt)

    @classmethod
    def fresh_output(cls, tt: TaskTensor) -> bool:
        return "correction" not in tt.extras  # reconstruct's output is always a new tensor

    @classmethod
    def planar_inputs(cls, entry: TensorEntry, tt: TaskTensor) -> tuple[str, ...]:
        corr = tt.extras.get("correction")  # the dial's corrections add to the same rebuild; exact ones do not
        base = entry.arrays["base"].dtype  # the loops join a base of the output's dtype (a float32 task of
        if tt.dtype == "float32" == base and (corr is None or corr.kind != "exact"):  # a 16-bit base: torch)
            return ("base", "merged")
        if tt.dtype in ("bfloat16", "float16") and corr is None and base == tt.dtype:
            return ("base", "merged")  # a 16-bit base and output (kernels.tall_planes_bf16, tall_planes_f16)
        return ()

    @classmethod
    def bit_inputs(cls, entry: TensorEntry, tt: TaskTensor) -> tuple[str, ...]:
        return ("mask",) if "correction" not in tt.extras else ()  # reconstruct and reconstruct_planar take Bits

    @classmethod
    def rebuild(cls, arrays: Mapping[str, torch.Tensor | Planar | Bits], entry: TensorEntry, tt: TaskTensor
                ) -> torch.Tensor:
        corr = tt.extras.get("correction")
        if corr is not None:
            return corr.rebuild(arrays, entry, tt)
        base, mask, merged = arrays["base"], arrays["mask"], arrays["merged"]
        assert not isinstance(mask, Planar)  # (planar_inputs: base and merged only)
        if isinstance(base, Planar) and isinstance(merged, Planar):
            return reconstruct_planar(base, mask, merged, tt.shape, torch_dtype(tt.dtype))
        assert isinstance(base, torch.Tensor) and isinstance(merged, torch.Tensor)
        return reconstruct(base, mask, merged, torch_dtype(tt.dtype))


    @classmethod
    def rebuild_parts(cls, arrays: Mapping[str, torch.Tensor | Planar | Bits], entry: TensorEntry, tt: TaskTensor,
                      parts) -> list[torch.Tensor]:
        if "correction" in tt.extras:
            return super().rebuild_parts(arrays, entry, tt, parts)
        base, mask, merged = arrays["base"], arrays["mask"], arrays["merged"]
        assert not isinstance(base, Bits) and not isinstance(mask, Planar) and not isinstance(merged, Bits)
        return reconstruct_parts(base, mask, merged, [(m.offset, m.shape) for m in parts], torch_dtype(tt.dtype))


class _Held:
    """An array's encoded chunks (a mask, the merged vector), kept in memory until the exact tier
    decides whether to store it."""

    def __init__(self, chain) -> None:
        self.chain = chain
        self.chunks: list[bytes | memoryview] = []

    def add(self, encoded: bytes | memoryview | Encoded) -> None:
        data = encoded.data if isinstance(encoded, Encoded) else encoded
        self.chunks.append(bytes(data))  # a codec's output may be a view of a buffer reused later

    queued = add


def _finish(a: _Held | ArrayBuilder) -> ArrayRef:
    assert isinstance(a, ArrayBuilder)  # (a held array is written by the exact tier)
    return a.finish()


def _chunks(a: _Held | ArrayBuilder) -> list[bytes | memoryview]:
    assert isinstance(a, _Held)
    return a.chunks
