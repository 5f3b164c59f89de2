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
        """Each task's tensor as it is; a streamed item's (``Item.streamed``: a large tensor stored
        per task, holding inf or NaN) read one task's copy at a time (``Item.task``), not all at once."""
        tts = {}
        for i, t in enumerate(item.tasks):
            x = item.task(i)
            tts[t] = TaskTensor(cls.name, dtype_name(x.dtype), tuple(x.shape), {"data": ctx.whole(x)})
            del x
        return TensorEntry(item.name, cls.kind, tts)

    @classmethod
    def inputs(cls, entry: TensorEntry, tt: TaskTensor) -> dict[str, tuple[ArrayRef, Use]]:
        return {"data": (tt.arrays["data"], Use.OUTPUT)}

    @classmethod
    def rebuild(cls, arrays: Mapping[str, torch.Tensor], entry: TensorEntry, tt: TaskTensor) -> torch.Tensor:
        return arrays["data"]
