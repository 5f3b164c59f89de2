"""Hypothesis strategies for tallpack's own objects, shared by the tests."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import strategies as st

from tallpack.manifest import task_name_problem

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

shapes = st.lists(st.integers(0, 7), min_size=0, max_size=3).map(tuple)
task_names = st.text(st.characters(whitelist_categories=("L", "N"), whitelist_characters="_-."),
                     min_size=1, max_size=12).filter(lambda s: task_name_problem(s) is None)  # ('.', '..', '.git')


def tensor(shape, dtype, seed: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g) * scale).to(dtype)
    return torch.randint(-5, 5, shape, generator=g).to(dtype)


@st.composite
def families(draw, max_tasks: int = 4, max_tensors: int = 4):
    """(base, {task: state dict}) with merged, shared, int and task-own tensors."""
    n_tasks = draw(st.integers(1, max_tasks))
    names = draw(st.lists(task_names, min_size=n_tasks, max_size=n_tasks, unique=True))
    seed = draw(st.integers(0, 2**16))
    base: dict[str, torch.Tensor] = {}
    specs = []
    for i in range(draw(st.integers(1, max_tensors))):
        shape = draw(shapes)
        dtype = draw(st.sampled_from(FLOAT_DTYPES + (torch.int64,)))
        frozen = draw(st.booleans())
        base[f"p{i}"] = tensor(shape, dtype, seed + i)
        specs.append((f"p{i}", shape, dtype, frozen))
    tasks = {}
    for j, name in enumerate(names):
        sd = {}
        for k, (key, shape, dtype, frozen) in enumerate(specs):
            if frozen or not dtype.is_floating_point:
                sd[key] = base[key].clone()
            else:
                delta = tensor(shape, torch.float32, seed * 31 + 7 * j + k, scale=0.01)
                sd[key] = (base[key].float() + delta).to(dtype)
        if draw(st.booleans()):
            sd["head"] = tensor((j + 1, 3), torch.float32, seed + 1000 + j)
        tasks[name] = sd
    return base, tasks


bool_arrays = st.integers(0, 300).flatmap(
    lambda n: st.binary(min_size=n, max_size=n).map(lambda b: np.frombuffer(b, np.uint8) & 1)
)
