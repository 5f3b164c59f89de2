"""``torch``, imported on first use.

Importing torch takes one to three seconds, most of the CLI's start: ``tallpack --help``,
``--version`` and ``inspect`` need none of it. The modules that compute with tensors take
``torch`` from here; the first attribute read imports the real module, and every later read is
an ordinary module lookup (its names are copied over).
"""

from __future__ import annotations

import sys
import types
from collections.abc import Callable
from functools import wraps
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar


def imported() -> types.ModuleType:
    """The real ``torch``, imported with Ctrl-C (and SIGTERM) held until its import ends: torch
    cannot be imported again in a process whose first import was cut off (every later use fails:
    "partially initialized module 'torch'"), and the first import is the first call's (a notebook's
    interrupt button in a first ``pack`` or ``state_dict``). A Ctrl-C meanwhile takes effect after it."""
    if "torch" not in sys.modules:
        from .fsutil import signals_held

        with signals_held():
            import torch
    import torch
    return torch


class _Torch(types.ModuleType):
    def __getattr__(self, name: str) -> Any:
        real = imported()  # the real module, once
        self.__dict__.update({k: v for k, v in vars(real).items() if not k.startswith("__")})
        return getattr(real, name)


if TYPE_CHECKING:  # type checkers see torch itself, so the library's annotations stay typed
    import torch as torch
else:
    torch = _Torch("torch")


_P = ParamSpec("_P")
_R = TypeVar("_R")


def cpu_default(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """``fn`` run with the CPU as torch's default device. tallpack makes its buffers without a
    device and decodes into them with numpy: under ``with torch.device("meta")`` (a model built
    as a skeleton, then loaded in the same block) or ``torch.set_default_device("cuda")`` (a
    notebook's), they would be made there and fail to decode. Tensors come back on the CPU (or
    ``device=``) whatever the default, as safetensors' do. Without a torch function mode (the
    default device is then the CPU) nothing is entered: a device context costs every torch call
    a Python hop."""
    @wraps(fn)
    def run(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        if "torch" not in sys.modules:  # not imported yet (``verify`` needs none): no default device set
            return fn(*args, **kwargs)
        # sys.modules holds torch from the start of its import: while another thread imports it,
        # only an import statement waits for it to finish (the module's import lock)
        import torch as real

        modes = getattr(getattr(real, "_C", None), "_len_torch_function_stack", None)  # private: guarded
        if modes is not None and not modes():
            return fn(*args, **kwargs)
        with real.device("cpu"):
            return fn(*args, **kwargs)
    return run
