"""A small, real, reproducible family of fine-tuned models built from scikit-learn's digits.

The family consists of one *base* checkpoint (an MLP body plus a 10-class head, pretrained on
plain 10-class digits) and several *fine-tuned* checkpoints, one per task.  Every task is a
variant of the digits data set (a transformed input and/or a different label set), so all
tasks share the 64-dimensional input and the body architecture; only the classification head
(``head.weight`` / ``head.bias``) differs in shape between tasks.  As in TALL masks
(arXiv 2405.07813) the head is a task-own tensor: merged or reconstructed bodies are always
evaluated with the task's own fine-tuned head.

Everything is seeded and runs on CPU in about a minute (``size="full"``) or a few seconds
(``size="tiny"``).  The result is cached on disk::

    ROOT/family.json                     # configuration (seed, sizes, tasks, version)
    ROOT/base/model.safetensors          # + config.json
    ROOT/tasks/<name>/model.safetensors  # + config.json

``evaluate(root, task, state_dict)`` measures the accuracy of any state dict with the task's
tensor names on the task's validation or test split, recomputing the (seeded) splits from
``family.json`` alone.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

from ..errors import TallpackError

__all__ = [
    "FAMILY_VERSION",
    "SIZES",
    "TASKS",
    "FamilyPaths",
    "TaskSpec",
    "build_family",
    "evaluate",
    "load_model",
    "load_state_dict",
    "make_model",
]

logger = logging.getLogger(__name__)

#: Bump when anything that changes the produced checkpoints changes.
FAMILY_VERSION = "tallpack-demo-family/1"

# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------

#: Sizes of the global, disjoint splits of the 1797 digits images (rest goes to training).
_N_PRETRAIN = 600
_N_VAL = 250
_N_TEST = 350
_SPLITS = ("train", "val", "test")


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    """The digits images (N, 8, 8) as float32 in [0, 16] and labels (N,) as int64."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise TallpackError("the demo needs scikit-learn (its digits data): pip install 'tallpack[demo]' "
                            "(or scikit-learn itself)") from None

    data = load_digits()
    return data.images.astype(np.float32), data.target.astype(np.int64)


@functools.lru_cache(maxsize=8)
def _split_indices(seed: int) -> dict[str, np.ndarray]:
    """Disjoint index sets ``pretrain``/``train``/``val``/``test`` of the digits, fixed by seed."""
    n = len(_digits()[1])
    perm = np.random.default_rng([seed, 1]).permutation(n)
    a = _N_PRETRAIN
    b = a + _N_VAL
    c = b + _N_TEST
    return {
        "pretrain": np.sort(perm[:a]),
        "val": np.sort(perm[a:b]),
        "test": np.sort(perm[b:c]),
        "train": np.sort(perm[c:]),
    }


def _shift(img: np.ndarray, dy: int, dx: int) -> np.ndarray:
    out = np.zeros_like(img)
    h, w = img.shape[-2:]
    ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
    xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
    out[..., yd, xd] = img[..., ys, xs]
    return out


@functools.lru_cache(maxsize=8)
def _pixel_permutation(seed: int) -> np.ndarray:
    return np.random.default_rng([seed, 2]).permutation(64)


_PRIMES = np.array([0, 0, 1, 1, 0, 1, 0, 1, 0, 0], dtype=np.int64)  # 2, 3, 5, 7


@dataclass(frozen=True)
class TaskSpec:
    """A digits variant: an input transform (on (N, 8, 8) images) and a label map."""

    name: str
    description: str
    num_classes: int
    transform: Callable[[np.ndarray, int], np.ndarray]  # (images, seed) -> images
    labels: Callable[[np.ndarray], np.ndarray]  # digit labels -> task labels


def _ident(y: np.ndarray) -> np.ndarray:
    return y


_TASK_SPECS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec(
            "hflip",
            "10-class digits, images mirrored left-right",
            10,
            lambda x, s: x[..., :, ::-1],
            _ident,
        ),
        TaskSpec(
            "vflip",
            "10-class digits, images flipped upside down",
            10,
            lambda x, s: x[..., ::-1, :],
            _ident,
        ),
        TaskSpec(
            "rot90",
            "10-class digits, images rotated by 90 degrees",
            10,
            lambda x, s: np.rot90(x, 1, axes=(-2, -1)),
            _ident,
        ),
        TaskSpec(
            "invert",
            "10-class digits, intensities inverted (16 - x)",
            10,
            lambda x, s: 16.0 - x,
            _ident,
        ),
        TaskSpec(
            "permuted",
            "10-class digits, pixels permuted by a fixed (seeded) permutation",
            10,
            lambda x, s: x.reshape(*x.shape[:-2], 64)[..., _pixel_permutation(s)].reshape(x.shape),
            _ident,
        ),
        TaskSpec(
            "shift_mod3",
            "digit mod 3 (3 classes), images shifted 2 pixels right and 1 down",
            3,
            lambda x, s: _shift(x, 1, 2),
            lambda y: y % 3,
        ),
        TaskSpec(
            "rot180_parity",
            "digit parity (2 classes), images rotated by 180 degrees",
            2,
            lambda x, s: x[..., ::-1, ::-1],
            lambda y: y % 2,
        ),
        TaskSpec(
            "transpose_ge5",
            "digit >= 5 (2 classes), images transposed",
            2,
            lambda x, s: np.swapaxes(x, -1, -2),
            lambda y: (y >= 5).astype(np.int64),
        ),
        TaskSpec(
            "invflip_prime",
            "digit is prime (2 classes), images mirrored and intensity-inverted",
            2,
            lambda x, s: 16.0 - x[..., :, ::-1],
            lambda y: _PRIMES[y],
        ),
        TaskSpec(
            "shift",
            "10-class digits, images shifted 2 pixels left and 1 up",
            10,
            lambda x, s: _shift(x, -1, -2),
            _ident,
        ),
    )
}

_PRETRAIN_SPEC = TaskSpec("digits", "plain 10-class digits (pretraining task)", 10, lambda x, s: x, _ident)

#: Names of the full family's tasks, in order.
TASKS: tuple[str, ...] = tuple(_TASK_SPECS)

# --------------------------------------------------------------------------------------------
# Sizes / training hyper-parameters
# --------------------------------------------------------------------------------------------

#: Per-size configuration.  Everything here goes into ``family.json``.
SIZES: dict[str, dict] = {
    "full": {
        "tasks": list(TASKS),
        "hidden": 256,
        "layers": 3,
        "features": 32,
        "batch_size": 64,
        "pretrain_epochs": 60,
        "pretrain_lr": 1e-3,
        "probe_epochs": 10,
        "probe_lr": 1e-2,
        "finetune_epochs": 30,
        "finetune_lr": 1e-3,
        "weight_decay": 0.0,
    },
    "tiny": {
        "tasks": ["hflip", "invert", "rot180_parity"],
        "hidden": 32,
        "layers": 2,
        "features": 32,
        "batch_size": 64,
        "pretrain_epochs": 15,
        "pretrain_lr": 3e-3,
        "probe_epochs": 3,
        "probe_lr": 1e-2,
        "finetune_epochs": 10,
        "finetune_lr": 3e-3,
        "weight_decay": 0.0,
    },
}


def _family_config(size: str, seed: int) -> dict:
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; expected one of {sorted(SIZES)}")
    return {
        "version": FAMILY_VERSION,
        "size": size,
        "seed": int(seed),
        "input_dim": 64,
        "pretrain_task": _PRETRAIN_SPEC.name,
        "splits": {"pretrain": _N_PRETRAIN, "val": _N_VAL, "test": _N_TEST},
        **SIZES[size],
        "num_classes": {t: _TASK_SPECS[t].num_classes for t in SIZES[size]["tasks"]},
    }


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


class DigitsMLP(nn.Module):
    """``body``: (Linear -> GELU) x layers -> LayerNorm; ``head``: Linear to num_classes.

    The body also carries an int64 scalar buffer ``body.version`` (identical in every
    checkpoint) so that the family contains a non-floating tensor.
    """

    def __init__(self, input_dim: int, hidden: int, layers: int, features: int, num_classes: int) -> None:
        super().__init__()
        mods: list[nn.Module] = []
        d = input_dim
        for i in range(layers):
            out = features if i == layers - 1 else hidden
            mods += [nn.Linear(d, out), nn.GELU()]
            d = out
        mods.append(nn.LayerNorm(d))
        self.body = nn.Sequential(*mods)
        self.body.register_buffer("version", torch.tensor(1, dtype=torch.int64))
        self.head = nn.Linear(d, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def make_model(config: Mapping, num_classes: int, *, seed: int | None = None) -> DigitsMLP:
    """A fresh model for a family config; initialized from ``seed`` without touching global RNG."""
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        return DigitsMLP(
            config["input_dim"], config["hidden"], config["layers"], config["features"], num_classes
        )


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def _task_arrays(spec: TaskSpec, split: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    images, digits = _digits()
    idx = _split_indices(seed)[split]
    x = np.ascontiguousarray(spec.transform(images[idx], seed), dtype=np.float32).reshape(len(idx), 64)
    y = spec.labels(digits[idx]).astype(np.int64)
    # Scale [0, 16] to roughly zero-mean, unit-range inputs.
    return torch.from_numpy((x / 8.0 - 1.0).astype(np.float32)), torch.from_numpy(y)


def _train(
    model: nn.Module,
    params: list[nn.Parameter],
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    weight_decay: float,
    gen: torch.Generator,
) -> None:
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    n = len(y)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, batch_size):
            b = perm[i : i + batch_size]
            loss = F.cross_entropy(model(x[b]), y[b])
            model.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(-1) == y).float().mean())


def _save_checkpoint(folder: Path, model: nn.Module, config: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _model_config(cfg: dict, task: str, description: str, num_classes: int, kind: str) -> dict:
    return {
        "architectures": ["DigitsMLP"],
        "model_type": "tallpack-digits-mlp",
        "kind": kind,
        "task": task,
        "description": description,
        "input_dim": cfg["input_dim"],
        "hidden_size": cfg["hidden"],
        "num_hidden_layers": cfg["layers"],
        "num_classes": num_classes,
        "family_version": cfg["version"],
        "seed": cfg["seed"],
    }


def _build_into(tmp: Path, cfg: dict) -> None:
    seed = cfg["seed"]
    common = dict(batch_size=cfg["batch_size"], weight_decay=cfg["weight_decay"])
    t0 = time.perf_counter()

    # Pretraining on plain 10-class digits (its own disjoint split).
    base = make_model(cfg, 10, seed=seed)
    x, y = _task_arrays(_PRETRAIN_SPEC, "pretrain", seed)
    gen = torch.Generator().manual_seed(seed)
    _train(
        base, list(base.parameters()), x, y,
        epochs=cfg["pretrain_epochs"], lr=cfg["pretrain_lr"], gen=gen, **common,
    )
    xv, yv = _task_arrays(_PRETRAIN_SPEC, "val", seed)
    logger.info("pretrained base: val acc %.3f (%.1fs)", _accuracy(base, xv, yv), time.perf_counter() - t0)
    _save_checkpoint(
        tmp / "base", base, _model_config(cfg, _PRETRAIN_SPEC.name, _PRETRAIN_SPEC.description, 10, "base")
    )
    base_body = {k: v for k, v in base.state_dict().items() if not k.startswith("head.")}

    for i, name in enumerate(cfg["tasks"]):
        spec = _TASK_SPECS[name]
        task_seed = seed * 1000 + 1 + i
        model = make_model(cfg, spec.num_classes, seed=task_seed)
        missing, unexpected = model.load_state_dict(base_body, strict=False)
        assert not unexpected and all(k.startswith("head.") for k in missing), (missing, unexpected)
        x, y = _task_arrays(spec, "train", seed)
        gen = torch.Generator().manual_seed(task_seed)
        # Linear probe (fresh head on the frozen base body), then full fine-tuning.
        _train(
            model, list(model.head.parameters()), x, y,
            epochs=cfg["probe_epochs"], lr=cfg["probe_lr"], gen=gen, **common,
        )
        _train(
            model, list(model.parameters()), x, y,
            epochs=cfg["finetune_epochs"], lr=cfg["finetune_lr"], gen=gen, **common,
        )
        xv, yv = _task_arrays(spec, "val", seed)
        logger.info(
            "fine-tuned %s (%d/%d): val acc %.3f (%.1fs)", name, i + 1, len(cfg["tasks"]), _accuracy(model, xv, yv),
            time.perf_counter() - t0
        )
        _save_checkpoint(
            tmp / "tasks" / name,
            model,
            _model_config(cfg, name, spec.description, spec.num_classes, "finetuned"),
        )

    # Written last: its presence marks a complete build.
    (tmp / "family.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FamilyPaths:
    """Where a built family lives."""

    root: Path
    base: Path  #: folder of the base checkpoint
    tasks: dict[str, Path]  #: task name -> folder of its fine-tuned checkpoint, in order


def _paths(root: Path, tasks: list[str]) -> FamilyPaths:
    return FamilyPaths(root=root, base=root / "base", tasks={t: root / "tasks" / t for t in tasks})


def _read_family(root: Path) -> dict | None:
    try:
        return json.loads((root / "family.json").read_text())
    except (OSError, ValueError):
        return None


def build_family(root: str | Path, *, size: str = "full", seed: int = 0, force: bool = False) -> FamilyPaths:
    """Build (or reuse) the demo family in ``root`` and return its paths.

    An existing folder is reused when its ``family.json`` matches the requested configuration
    (and ``force`` is false); otherwise the family is built in a temporary sibling folder and
    moved into place, replacing a previous family.  A non-empty ``root`` that is not a family
    folder is never deleted (``ValueError``).
    """
    root = Path(root).absolute()
    cfg = _family_config(size, seed)
    if not force and _read_family(root) == cfg:
        logger.info("reusing demo family in %s", root)
        return _paths(root, cfg["tasks"])
    if root.exists() and not root.is_dir():
        raise ValueError(f"{root} exists and is not a directory")
    if root.exists() and not (root / "family.json").exists() and any(root.iterdir()):
        raise ValueError(f"{root} exists, is not empty and is not a demo family folder")

    root.parent.mkdir(parents=True, exist_ok=True)
    logger.info("building demo family (size=%s, seed=%d) in %s", size, seed, root)
    t0 = time.perf_counter()
    # Build next to the target and move into place, so an interrupted build is never reused
    # (``family.json``, written last, marks a complete family).
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.building-", dir=root.parent))
    try:
        _build_into(tmp, cfg)
        os.chmod(tmp, 0o755)
        if root.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{root.name}.old-", dir=root.parent))
            try:
                os.replace(root, old / "family")
            except FileNotFoundError:  # removed concurrently
                pass
            try:
                os.replace(tmp, root)
            finally:
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, root)
    except OSError:
        # Another process may have put an identical family in place meanwhile.
        if _read_family(root) != cfg:
            raise
        logger.info("another process built the same family in %s; using it", root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("built demo family in %.1fs", time.perf_counter() - t0)
    _clear_eval_cache(root)
    return _paths(root, cfg["tasks"])


def load_state_dict(folder: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of the checkpoint in ``folder`` (``model.safetensors``)."""
    return load_file(str(Path(folder) / "model.safetensors"))


# -- evaluation ------------------------------------------------------------------------------

_EVAL_LOCK = threading.Lock()
_EVAL_CACHE: dict[tuple[str, str], tuple[dict, DigitsMLP, dict[str, tuple[torch.Tensor, torch.Tensor]]]] = {}


def _clear_eval_cache(root: Path) -> None:
    with _EVAL_LOCK:
        for key in [k for k in _EVAL_CACHE if k[0] == str(root)]:
            del _EVAL_CACHE[key]


def _eval_entry(
    root: str | Path, task: str
) -> tuple[DigitsMLP, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    root = Path(root).absolute()
    cfg = _read_family(root)
    if cfg is None:
        raise FileNotFoundError(f"no demo family in {root} (missing or unreadable family.json)")
    if task not in cfg["tasks"]:
        raise KeyError(f"unknown task {task!r}; this family has {cfg['tasks']}")
    key = (str(root), task)
    with _EVAL_LOCK:
        entry = _EVAL_CACHE.get(key)
        if entry is None or entry[0] != cfg:
            spec = _TASK_SPECS[task]
            model = make_model(cfg, spec.num_classes, seed=0).eval()
            for p in model.parameters():
                p.requires_grad_(False)
            data = {s: _task_arrays(spec, s, cfg["seed"]) for s in _SPLITS}
            entry = (cfg, model, data)
            _EVAL_CACHE[key] = entry
    return entry[1], entry[2]


def load_model(state_dict: Mapping[str, torch.Tensor], task: str, root: str | Path) -> nn.Module:
    """A fresh ``DigitsMLP`` for ``task`` of the family in ``root`` with ``state_dict`` loaded (strict)."""
    cfg = _read_family(Path(root).absolute())
    if cfg is None:
        raise FileNotFoundError(f"no demo family in {root}")
    if task not in cfg["tasks"]:
        raise KeyError(f"unknown task {task!r}; this family has {cfg['tasks']}")
    model = make_model(cfg, _TASK_SPECS[task].num_classes, seed=0)
    model.load_state_dict({k: torch.as_tensor(v) for k, v in state_dict.items()}, strict=True)
    return model.eval()


def evaluate(
    root: str | Path, task: str, state_dict: Mapping[str, torch.Tensor], *, split: str = "test"
) -> float:
    """Accuracy (0..1) of the model given by ``state_dict`` on ``task``'s split ("val" or "test").

    ``state_dict`` must hold exactly the task model's tensor names with matching shapes (any
    floating dtype; it is cast to float32).  Splits are recomputed from ``family.json`` and cached
    in-process, so repeated calls take a few milliseconds.
    """
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
    model, data = _eval_entry(root, task)
    expected: dict[str, torch.Tensor] = dict(model.named_parameters())
    expected.update(model.named_buffers())
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise KeyError(f"state dict does not match task {task!r}: missing {missing}, unexpected {unexpected}")
    tensors: dict[str, torch.Tensor] = {}
    for name, ref in expected.items():
        t = torch.as_tensor(state_dict[name])
        if tuple(t.shape) != tuple(ref.shape):
            raise ValueError(f"{name}: shape {tuple(t.shape)} != expected {tuple(ref.shape)}")
        tensors[name] = t.to(ref.dtype) if t.dtype != ref.dtype else t
    x, y = data[split]
    with torch.no_grad():
        logits = torch.func.functional_call(model, tensors, (x,))
        return float((logits.argmax(-1) == y).to(torch.float64).mean())
