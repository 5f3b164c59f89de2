"""``torch``, imported on first use.

Importing torch takes one to three seconds, most of the CLI's start: ``tallpack --help``,
``--version`` and ``inspect`` need none of it. The modules that compute with tensors take
``torch`` from here; the first attribute read imports the real module, and every later read is
an ordinary module lookup (its names are copied over).
"""

from __future__ import annotations

import types
from typing import TYPE_CHECKING, Any


class _Torch(types.ModuleType):
    def __getattr__(self, name: str) -> Any:
        import torch  # the real module, once

        self.__dict__.update({k: v for k, v in vars(torch).items() if not k.startswith("__")})
        return getattr(torch, name)


if TYPE_CHECKING:  # type checkers see torch itself, so the library's annotations stay typed
    import torch as torch
else:
    torch = _Torch("torch")
