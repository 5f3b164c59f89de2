"""Where a model's weights matter: per-element weights for the fidelity dial's errors, from data.

The dial's data-free measure counts every weight's squared error alike. A linear layer's output
error ``(W' - W) x`` depends on its inputs: ``E|(W' - W) x|^2`` is, dropping the inputs'
correlations, ``sum_ij (W' - W)_ij^2 E[x_j^2]``. So weighing each weight's squared error by the
second moment of the input it multiplies points the dial's bytes at the weights whose errors reach
the output (inputs that are always zero, a dead pixel or a padding feature, get none).

>>> weights = {t: input_moments(models[t], val_batches[t]) for t in models}
>>> tallpack.pack(base, tasks, "fam.tallpack", budget=2.0, sensitivity=weights)

This goes beyond the paper, whose masks and reconstruction are data-free.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

from safetensors import SafetensorError

from ._torch import torch
from .errors import InvalidArgumentError, quoted

__all__ = ["input_moments", "load", "save"]


def input_moments(model: torch.nn.Module, batches: Iterable[Any]) -> dict[str, torch.Tensor]:
    """For every ``nn.Linear`` of ``model``, the mean of its input's square per input feature, over
    ``batches`` (each one the model's positional input, or a tuple or dict of its inputs), as
    ``{"<module>.weight": tensor of shape (1, in_features)}``: the weights of a ``sensitivity``
    for the task whose model this is. Names are the model's own parameter names, which must be the
    checkpoint's. Biases are left out (they weigh 1, as does every tensor not listed)."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name: str):
        def record(_module: torch.nn.Module, args: tuple) -> None:
            x = args[0].detach().to(torch.float64)
            x = x.reshape(-1, x.shape[-1])
            sums[name] = sums.get(name, 0) + (x * x).sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]
        return record

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear)]
    if not handles:
        raise InvalidArgumentError("input_moments: the model has no nn.Linear layer")
    try:
        with torch.no_grad():
            for batch in batches:
                if isinstance(batch, dict):
                    model(**batch)
                elif isinstance(batch, (tuple, list)):
                    model(*batch)
                else:
                    model(batch)
    finally:
        for h in handles:
            h.remove()
    if not counts:
        raise InvalidArgumentError("input_moments: no batch reached a linear layer (give at least one batch)")
    return {f"{name}.weight" if name else "weight": (sums[name] / counts[name])[None, :] for name in sums}


def save(weights: Mapping[str, Mapping[str, Any]], path: str | os.PathLike) -> None:
    """Write a sensitivity (task -> tensor name -> weights) as one safetensors file, keyed
    ``"TASK/TENSOR"`` (task names hold no '/'), for ``tallpack pack --sensitivity FILE``."""
    flat = {}
    for task, by_name in weights.items():
        if "/" in task:
            raise InvalidArgumentError(f"sensitivity: task name {task!r} holds a '/'")
        for name, w in by_name.items():
            flat[f"{task}/{name}"] = torch.as_tensor(w).detach().to("cpu", torch.float32).contiguous()
    from safetensors.torch import save_file  # imports torch: here, not when tallpack is imported

    save_file(flat, os.fspath(path))


def load(path: str | os.PathLike) -> dict[str, dict[str, torch.Tensor]]:
    """Read a sensitivity written by :func:`save`: task -> tensor name -> weights."""
    try:
        from safetensors.torch import load_file

        flat = load_file(os.fspath(path))
    except (OSError, SafetensorError) as e:
        raise InvalidArgumentError(f"{os.fspath(path)}: not a readable safetensors file of weights ({quoted(e)})") from None
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, w in flat.items():
        task, sep, name = key.partition("/")
        if not sep or not task or not name:
            raise InvalidArgumentError(f"{os.fspath(path)}: key {key!r} is not TASK/TENSOR")
        out.setdefault(task, {})[name] = w
    return out
