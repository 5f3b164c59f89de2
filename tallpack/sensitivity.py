"""Where a model's weights matter: per-element weights for the fidelity dial's errors, from data.

The dial's data-free measure counts every weight's squared error alike. A linear layer's output
error ``(W' - W) x`` depends on its inputs: ``E|(W' - W) x|^2`` is, dropping the inputs'
correlations, ``sum_ij (W' - W)_ij^2 E[x_j^2]``. So weighing each weight's squared error by the
second moment of the input it multiplies points the dial's bytes at the weights whose errors reach
the output (inputs that are always zero, a dead pixel or a padding feature, get none). GPT-2's
``Conv1D`` is the same layer with its weight stored transposed, ``(in, out)``.

>>> weights = {t: input_moments(models[t], val_batches[t]) for t in models}
>>> tallpack.pack(base, tasks, "fam.tallpack", budget=2.0, sensitivity=weights)

This goes beyond the paper, whose masks and reconstruction are data-free.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from typing import Any

from safetensors import SafetensorError

from ._torch import torch
from .errors import InvalidArgumentError, quoted

__all__ = ["input_moments", "load", "save"]

log = logging.getLogger(__name__)


def _in_axis(module: torch.nn.Module) -> int | None:
    """The axis of ``module.weight`` its input features lie along: 1 for ``nn.Linear`` (out, in),
    0 for transformers' ``Conv1D`` (GPT-2's layers: (in, out), ``y = x @ W + b``; found by its
    class name and ``nf`` attribute, so transformers need not be imported); None for others."""
    if isinstance(module, torch.nn.Linear):
        return 1
    w = getattr(module, "weight", None)
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf") and isinstance(w, torch.Tensor) and w.ndim == 2:
        return 0
    return None


def _weight_name(module: str) -> str:
    return f"{module}.weight" if module else "weight"


def _tied(model: torch.nn.Module) -> set[int]:
    """The ids of the parameters ``model`` holds under more than one name (tied weights)."""
    names: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        names[id(p)] = names.get(id(p), 0) + 1
    return {i for i, n in names.items() if n > 1}


def input_moments(model: torch.nn.Module, batches: Iterable[Any]) -> dict[str, torch.Tensor]:
    """For every ``nn.Linear`` and transformers ``Conv1D`` (GPT-2's) of ``model``, the mean of its
    input's square per input feature, over ``batches`` (each one the model's positional input, or
    a tuple or dict of its inputs), laid along the weight's input axis: ``{"<module>.weight":
    tensor of shape (1, in)}`` for a Linear's (out, in) weight, ``(in, 1)`` for a Conv1D's
    (in, out). These are the weights of a ``sensitivity`` for the task whose model this is. Names
    are the model's own parameter names, which must be the checkpoint's. Biases are left out (they
    weigh 1, as does every tensor not listed), and so are tied weights (one tensor under two names,
    e.g. GPT-2's ``lm_head.weight``, its token embeddings): their error reaches the output by
    another way too, and a checkpoint keeps only one of the names.

    >>> input_moments(torch.nn.Linear(3, 2), [torch.ones(4, 3)])
    {'weight': tensor([[1., 1., 1.]], dtype=torch.float64)}
    """
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name: str):
        def record(_module: torch.nn.Module, args: tuple) -> None:
            x = args[0].detach().to(torch.float64)
            x = x.reshape(-1, x.shape[-1])
            sums[name] = sums.get(name, 0) + (x * x).sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]
        return record

    layers = {name: (m, axis) for name, m in model.named_modules() if (axis := _in_axis(m)) is not None}
    if not layers:
        raise InvalidArgumentError("input_moments: the model has no nn.Linear layer (nor a transformers Conv1D)")
    tied, left = _tied(model), []
    for name, (m, _) in list(layers.items()):
        if id(m.weight) in tied:
            left.append(_weight_name(name))
            del layers[name]
    if left:
        log.warning("input_moments: tied weights left out (they weigh 1): %s", ", ".join(left))
    handles = [m.register_forward_pre_hook(hook(name)) for name, (m, _) in layers.items()]
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
    out = {}
    for name, total in sums.items():
        moments = total / counts[name]
        out[_weight_name(name)] = moments[None, :] if layers[name][1] == 1 else moments[:, None]
    return out


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
