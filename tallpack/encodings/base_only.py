"""``base-only``: a base tensor that no task has, kept (on request) in the tensor entry's ``base``;
it has no task entries, so nothing is rebuilt from it (``Archive.base_tensor`` reads it)."""

from __future__ import annotations

from .base import Encoding, Item, TensorEntry, WriteContext, register


@register
class BaseOnly(Encoding):
    name = None
    kind = "base-only"
    entry_arrays = ("base",)

    @classmethod
    def write(cls, ctx: WriteContext, item: Item) -> TensorEntry:
        assert item.base is not None
        return TensorEntry(item.name, cls.kind, {}, {"base": ctx.whole(item.base)})
