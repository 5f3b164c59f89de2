"""Encodings: what is stored for one tensor, and how it is rebuilt, registered by name.

To add one, write a module here with a registered :class:`~tallpack.encodings.base.Encoding`
subclass, import it below, and describe it in ``spec/FORMAT.md`` §6.1 (with a golden file).
"""

from . import base_only, correction, dense, derived, derived_merged, exact, qtau, shared, tall  # noqa: F401  (registers them)
from .base import (BY_KIND, FIELDS, REGISTRY, Encoding, Item, Later, TaskTensor, TensorEntry, Use, WriteContext,
                   iter_arrays, settled)

__all__ = ["BY_KIND", "FIELDS", "REGISTRY", "Encoding", "Item", "Later", "TaskTensor", "TensorEntry", "Use", "WriteContext",
           "iter_arrays", "encoding_for", "settled"]


def encoding_for(name: str) -> type[Encoding] | None:
    """The registered encoding of that name, or None for one this reader does not know."""
    return REGISTRY.get(name)
