"""``dense``: the task's tensor itself, stored per task (classification heads, tensors of another
shape, integer buffers that differ, tensors holding inf or NaN)."""

from __future__ import annotations

import torch

from ..dtypes import dtype_name
from ..errors import FormatError
from .base import Encoding, Item, ReadArray, TaskTensor, TensorEntry, WriteContext, register


@register
class Dense(Encoding):
    name = "dense"
    kind = "task-own"
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
    def rebuild(cls, read: ReadArray, entry: TensorEntry, tt: TaskTensor, where: str) -> torch.Tensor:
        return read(tt.arrays["data"], where)
