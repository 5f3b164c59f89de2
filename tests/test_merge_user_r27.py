"""A lazy merged model (``MergeParts.state_dict(alpha, lazy=True)``) as a user meets it: tied names
stay one tensor, a name asked for again and a group built again are counted once (held bytes,
overflowed tensors), and several threads indexing one model get the eager model's bits."""

from __future__ import annotations

import logging
import random
import threading
from pathlib import Path

import pytest
import torch

import tallpack
import tallpack.merged as merged_mod
from tallpack.merged import MergeParts

TIED, TARGET = "lm_head.weight", "wte.weight"


def _tied_family(root: Path, dtype: torch.dtype = torch.float32, scale: float = 0.02) -> Path:
    """A tied base and three fine-tunes saved with ``torch.save`` (``lm_head.weight`` the same
    tensor as ``wte.weight``), with 24 small tensors between them (stored in groups); packed."""
    g = torch.Generator().manual_seed(0)

    def model() -> dict[str, torch.Tensor]:
        sd: dict[str, torch.Tensor] = {TARGET: (torch.randn(64, 16, generator=g) * scale).to(dtype)}
        for i in range(12):
            sd[f"h.{i}.w"] = (torch.randn(8, 16, generator=g) * scale).to(dtype)
            sd[f"h.{i}.b"] = (torch.randn(16, generator=g) * scale).to(dtype)
        sd[TIED] = sd[TARGET]
        return sd

    torch.manual_seed(0)
    base = model()
    paths = {}
    for name in ("base", "a", "b", "c"):
        sd = {k: (v.float() + torch.randn(v.shape, generator=g) * scale * 0.5).to(dtype) if name != "base" else v
              for k, v in base.items() if k != TIED}
        sd[TIED] = sd[TARGET]
        paths[name] = root / f"{name}.pt"
        torch.save(sd, paths[name])
    out = root / "tied.tallpack"
    tallpack.pack(paths["base"], {t: paths[t] for t in "abc"}, out, merge="ta")
    return out


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(-1).view(torch.uint8)


@pytest.fixture
def tied(tmp_path: Path) -> Path:
    return _tied_family(tmp_path)


@pytest.mark.parametrize("task", [None, "a"])
def test_tied_names_are_one_tensor_after_the_held_copy_was_let_go(tied: Path, monkeypatch, task) -> None:
    """``merged()`` as the eager model: ``lm_head.weight`` is ``wte.weight`` (one tensor, not a
    second copy built again), even when the held copy went to make room for a group's members."""
    monkeypatch.setattr(merged_mod, "HELD_BYTES", 1)  # a model larger than what is held (a real GPT-2's wte)
    with tallpack.open(tied) as fam:
        assert fam.manifest.aliases == {TIED: TARGET}
        assert any(e.members for e in fam.manifest.tensors)
        eager = MergeParts(fam, "consensus-ta").state_dict(0.5, task=task)
        assert eager[TIED] is eager[TARGET]
        sd = fam.merged("consensus-ta", alpha=0.5, task=task)
        assert list(sd) == list(eager)
        assert all(torch.equal(_bits(sd[k]), _bits(eager[k])) for k in eager)
        assert sd[TIED] is sd[TARGET]


def test_a_name_asked_for_again_counts_its_held_bytes_once(tied: Path) -> None:
    with tallpack.open(tied) as fam:
        model = MergeParts(fam, "ta", lazy=True).state_dict(0.5, lazy=True)
        member = next(n for n in model if n.startswith("h."))
        for _ in range(3):
            model[member]  # the group built again each time: its other members held once
        model[TARGET]
        model[TARGET]
        held = sum(t.numel() * t.element_size() for t, _ in model._held.values())
        assert model._held_bytes == held > 0


def test_overflow_is_said_once_per_tensor_in_the_models_order(tmp_path: Path, monkeypatch, caplog) -> None:
    """A group built again (let go to make room, or a name asked for again) does not list its
    overflowed members twice: the count and names are the eager model's."""
    arch = _tied_family(tmp_path, torch.float16, scale=0.5)
    monkeypatch.setattr(merged_mod, "HELD_BYTES", 1)
    with tallpack.open(arch) as fam:
        parts = MergeParts(fam, "ta")
        eager = parts.warn_overflow(parts.state_dict(1e6), 1e6)
        assert len(eager) == 25
        model = MergeParts(fam, "ta", lazy=True).state_dict(1e6, lazy=True)
        for name in [*reversed(list(model)), *model]:
            model[name]
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="tallpack.merged"):
            assert model.warn_overflow() == eager
        assert "overflows 25 tensors" in caplog.text
        written = tallpack.write_merged(fam, tmp_path / "m", "ta", alpha=1e6)
        assert list(written.overflow) == eager


def test_threads_indexing_one_model_get_the_eager_bits(tied: Path, monkeypatch) -> None:
    """Six threads indexing every name of one lazy model in their own orders (held tensors let go
    at once: HELD_BYTES 1) each get the eager model's tensors, tied names one tensor."""
    monkeypatch.setattr(merged_mod, "HELD_BYTES", 1)
    with tallpack.open(tied) as fam:
        eager = MergeParts(fam, "consensus-ta").state_dict(0.5, task="b")
        model = MergeParts(fam, "consensus-ta", lazy=True).state_dict(0.5, task="b", lazy=True)
        names = list(model)
        got: list[dict[str, torch.Tensor]] = [{} for _ in range(6)]
        errors: list[BaseException] = []
        start = threading.Barrier(6)

        def work(i: int) -> None:
            order = names[:]
            random.Random(i).shuffle(order)
            start.wait()
            try:
                for n in order * 4:
                    got[i][n] = model[n]
            except BaseException as e:  # noqa: BLE001 (reported below)
                errors.append(e)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        for sd in got:
            assert all(torch.equal(_bits(sd[k]), _bits(eager[k])) for k in eager)
            assert sd[TIED] is sd[TARGET]
