"""``shared``: a tensor equal (bit for bit) in every task that has it, stored once in the tensor
entry (frozen layers, buffers)."""

from __future__ import annotations

from collections.abc import Mapping

from .._torch import torch
from ..arrays import ArrayRef
from ..dtypes import dtype_name
from ..errors import FormatError
from ..tall import task_vector
from .base import Encoding, Item, TaskTensor, TensorEntry, Use, WriteContext, register


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

    @classmethod
    def write(cls, ctx: WriteContext, item: Item) -> TensorEntry:
        first = item.thetas[0]
        if item.planned == "merged":  # stored exactly: counts for fidelity as a perfect rebuild
            assert item.base is not None  # (planned merged: the base has it)
            for t, x in zip(item.tasks, item.thetas):
                ctx.fidelity[t].add_exact(task_vector(x, item.base))
        dt, shape = dtype_name(first.dtype), tuple(first.shape)
        return TensorEntry(item.name, cls.kind, {t: TaskTensor(cls.name, dt, shape) for t in item.tasks},
                           {"data": ctx.whole(first)})

    @classmethod
    def inputs(cls, entry: TensorEntry, tt: TaskTensor) -> dict[str, tuple[ArrayRef, Use]]:
        return {"data": (entry.arrays["data"], Use.OUTPUT)}

    @classmethod
    def rebuild(cls, arrays: Mapping[str, torch.Tensor], entry: TensorEntry, tt: TaskTensor) -> torch.Tensor:
        return arrays["data"]
