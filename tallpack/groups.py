"""Tensor groups (format 1.12): many small tensors stored as one.

A checkpoint of hundreds of small tensors (norms, biases, the matrices of a narrow model) costs
a reader far more per tensor than per byte: arrays to parse at open, zstd frames of a few KB,
one rebuild call each. The packer lays such tensors end to end in one flat tensor (a *group*,
at most ``GROUP_ELEMENTS`` elements), which is stored and masked as any other, and records each
*member*'s offset and shape; the reader rebuilds a group once and hands back each member as a
tensor of its own. TALL masks, the merged vector and TIES are elementwise, so a member rebuilt
from its group has the bits it would have had stored alone (spec §3.7).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

from ._torch import torch
from .arrays import check_shape
from .elements import numel
from .errors import FormatError
from .limits import MAX_INT, MAX_NAME_CHARS

#: A member starts at a multiple of this many elements (so its mask bits start at a whole byte).
ALIGN = 8
#: The packer groups tensors of fewer elements than this (1 MB of float32) ...
SMALL_ELEMENTS = 1 << 18
#: ... into groups of at most this many elements (4 MB of float32: a get_tensor of one member
#: decodes at most this much of the base and merged vector, kept in the cache for the next) ...
GROUP_ELEMENTS = 1 << 20
#: ... and fewer for many tasks: the packer holds every task's copy of a group and computes as
#: many task vectors, about 12 bytes an element and task (``group_elements``).
GROUP_PACK_BYTES = 64 << 20


def group_elements(tasks: int) -> int:
    """The most elements the packer puts in one group of a family of ``tasks`` tasks: GROUP_ELEMENTS,
    or fewer where holding and packing it (about 12 bytes an element and task) would pass
    GROUP_PACK_BYTES; at least SMALL_ELEMENTS, a multiple of ALIGN."""
    n = GROUP_PACK_BYTES // (12 * max(tasks, 1))
    return max(SMALL_ELEMENTS, min(GROUP_ELEMENTS, n // ALIGN * ALIGN))

__all__ = ["ALIGN", "GROUP_ELEMENTS", "GROUP_PACK_BYTES", "Member", "SMALL_ELEMENTS", "concat", "group_elements",
           "layout", "parse_members"]


class Member(NamedTuple):
    """One tensor stored in a group: its name, its first element's index in the group, its shape."""

    name: str
    offset: int
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return numel(self.shape)

    def to_json(self) -> list[Any]:
        return [self.name, self.offset, list(self.shape)]


def layout(shapes: Sequence[Sequence[int]]) -> tuple[list[int], int]:
    """Each shape's offset when laid end to end, each at a multiple of ALIGN, and the total."""
    offsets, end = [], 0
    for s in shapes:
        offsets.append(end)
        end += -(-numel(tuple(s)) // ALIGN) * ALIGN
    return offsets, end


def parse_members(value: Any, length: int, where: str) -> tuple[Member, ...]:
    """A tensor entry's ``members``, checked (spec §3.7): each ``[name, offset, shape]`` with a
    unique name, an offset that is a multiple of ALIGN, members in order and not overlapping,
    all within the group's ``length`` elements."""
    if not isinstance(value, list) or not value:
        raise FormatError(f"{where}: members must be a non-empty list")
    out, end, names = [], 0, set()
    for m in value:
        if not isinstance(m, list) or len(m) != 3:
            raise FormatError(f"{where}: a member is [name, offset, shape]")
        name, offset, shape = m
        if not isinstance(name, str) or len(name) > MAX_NAME_CHARS or name in names:
            raise FormatError(f"{where}: member names must be distinct strings of at most {MAX_NAME_CHARS} characters")
        names.add(name)
        try:
            shape = check_shape(shape)
        except ValueError as e:
            raise FormatError(f"{where}, member {name!r}: {e}") from None
        if type(offset) is not int or not 0 <= offset <= MAX_INT or offset % ALIGN:
            raise FormatError(f"{where}, member {name!r}: the offset must be a non-negative multiple of {ALIGN}")
        if offset < end or offset + numel(shape) > length:
            raise FormatError(f"{where}, member {name!r}: members must lie in order, apart, within "
                              f"the group's {length} elements")
        end = offset + numel(shape)
        out.append(Member(name, offset, shape))
    return tuple(out)


def concat(tensors: Sequence[torch.Tensor], offsets: Sequence[int], length: int) -> torch.Tensor:
    """The tensors' elements at their offsets in one flat tensor of ``length`` (gaps zero)."""
    out = torch.zeros(length, dtype=tensors[0].dtype)
    for t, o in zip(tensors, offsets):
        out[o : o + t.numel()] = t.reshape(-1)
    return out
