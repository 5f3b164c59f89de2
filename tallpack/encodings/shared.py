"""``shared``: a tensor equal (bit for bit) in every task that has it, stored once in the tensor
entry (frozen layers, buffers). Where the tasks agree on a value that is not the base's (1.13), the
entry keeps the base too, so that merged models follow the paper's formulas for it."""

from __future__ import annotations

from collections.abc import Mapping

from .._torch import torch
from ..arrays import ArrayRef
from ..dtypes import dtype_name
from ..errors import FormatError
from ..tall import in_tall_range, task_vector
from .base import Encoding, Item, TaskTensor, TensorEntry, Use, WriteContext, register


def keeps_base(item: Item) -> bool:
    """Whether a ``shared`` tensor also stores its base (format 1.13): planned merged (a floating
    tensor of the base's shape in every task), every task at one value that is not the base's, and
    task vectors a merge can sum (``in_tall_range``). Merged models then build it as any merged
    tensor, ``theta_0 + alpha * d`` with every tau_t the same; without the base they could only
    return the tasks' value, whatever alpha."""
    if item.planned != "merged" or item.base is None or not item.thetas:
        return False
    first, base = item.thetas[0], item.base
    same = (first.dtype == base.dtype and first.shape == base.shape
            and torch.equal(first.reshape(-1).view(torch.uint8), base.reshape(-1).view(torch.uint8)))
    return not same and in_tall_range(base, item.thetas[:1] * len(item.thetas))


def counts_for_fidelity(item: Item) -> bool:
    """Whether a ``shared`` tensor counts for the tasks' fidelity figures as a perfect rebuild
    (rec = tau_t, spec §6.4): planned merged, with task vectors in ``in_tall_range``, as the merge
    method's statistics take it. One out of range (a frozen causal mask of -inf: tau is NaN; values
    near float32's limit) would have been stored task-own (spec §6.3), which fidelity does not count:
    neither does it here, so that it neither wipes out the figures (NaN) nor makes them unwritable."""
    return item.planned == "merged" and item.base is not None and in_tall_range(item.base, item.thetas)


@register
class Shared(Encoding):
    name = "shared"
    kind = "shared"
    elementwise = True
    entry_arrays = ("data",)

    @classmethod
    def validate(cls, entry: TensorEntry, tt: TaskTensor, where: str) -> None:
        data = entry.arrays.get("data")
        if data is None or data.shape != tt.shape or data.dtype != tt.dtype:
            raise FormatError(f"{where}: shared data missing or of another shape/dtype")
        base = entry.arrays.get("base")
        if base is not None and entry.members:  # merged models would ignore it (spec §6.1.3)
            raise FormatError(f"{where}: a group of shared tensors holds a base (spec §6.1.3: only an entry "
                              "without members may)")

    @classmethod
    def write(cls, ctx: WriteContext, item: Item) -> TensorEntry:
        first = item.thetas[0]
        if counts_for_fidelity(item):  # stored exactly: counts for fidelity as a perfect rebuild
            assert item.base is not None
            tau = task_vector(first, item.base)  # every task's: their values are the same, bit for bit
            for t in item.tasks:
                ctx.fidelity[t].add_exact(tau)
        dt, shape = dtype_name(first.dtype), tuple(first.shape)
        arrays = {"data": ctx.whole(first)}
        if keeps_base(item):
            assert item.base is not None
            arrays["base"] = ctx.whole(item.base)
            ctx.writer.use("field:shared-base")
        return TensorEntry(item.name, cls.kind, {t: TaskTensor(cls.name, dt, shape) for t in item.tasks}, arrays)

    @classmethod
    def inputs(cls, entry: TensorEntry, tt: TaskTensor) -> dict[str, tuple[ArrayRef, Use]]:
        return {"data": (entry.arrays["data"], Use.OUTPUT)}

    @classmethod
    def rebuild(cls, arrays: Mapping[str, torch.Tensor], entry: TensorEntry, tt: TaskTensor) -> torch.Tensor:
        return arrays["data"]
