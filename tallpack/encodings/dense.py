"""``dense``: the task's tensor itself, stored per task (classification heads, tensors of another
shape, integer buffers that differ, tensors holding inf or NaN)."""

from __future__ import annotations

from collections.abc import Mapping

from .._torch import torch
from ..arrays import ArrayRef
from ..dtypes import dtype_name
from ..errors import FormatError
from .base import Encoding, Item, TaskTensor, TensorEntry, Use, WriteContext, register


@register
class Dense(Encoding):
    name = "dense"
    kind = "task-own"
    elementwise = True
    task_arrays = ("data",)

    @classmethod
    def validate(cls, entry: TensorEntry, tt: TaskTensor, where: str) -> None:
        data = tt.arrays.get("data")
        if data is None or data.dtype != tt.dtype:
            raise FormatError(f"{where}: a dense entry needs data of dtype {tt.dtype}")

    @classmethod
    def write(cls, ctx: WriteContext, item: Item) -> TensorEntry:
        return TensorEntry(item.name, cls.kind, {
            t: TaskTensor(cls.name, dtype_name(x.dtype), tuple(x.shape), {"data": ctx.whole(x)})
            for t, x in zip(item.tasks, item.thetas)})

    @classmethod
    def inputs(cls, entry: TensorEntry, tt: TaskTensor) -> dict[str, tuple[ArrayRef, Use]]:
        return {"data": (tt.arrays["data"], Use.OUTPUT)}

    @classmethod
    def rebuild(cls, arrays: Mapping[str, torch.Tensor], entry: TensorEntry, tt: TaskTensor) -> torch.Tensor:
        return arrays["data"]
