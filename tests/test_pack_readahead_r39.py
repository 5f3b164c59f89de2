"""The packer's read-ahead (``packer._loaded``) is bounded by bytes: a tensor whose inputs
(T + 1 copies) take more than READ_AHEAD_BYTES is read only once the previous tensor's inputs are
let go, so a pack holds one large tensor's copies at a time, whatever the number of tasks (round 39:
16 tasks held T + 1 copies of an embedding beside T + 1 copies of the next 4 MB tensor)."""

from __future__ import annotations

import time
import weakref
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import tallpack
from tallpack import memory, packer
from tallpack.inputs import PackInputs

TASKS = 4
#: name -> elements, in the files' (and the plan's) order: large tensors next to each other,
#: small ones between them (read ahead), the largest last
SIZES = {"a.big": 1 << 18, "b.big": 1 << 18, "c.small": 4096, "d.small": 4096, "e.big": 3 << 17}


def _family(d: Path) -> tuple[str, dict[str, str]]:
    g = torch.Generator().manual_seed(39)
    base = {k: torch.randn(n, generator=g) * 0.02 for k, n in SIZES.items()}
    save_file(base, d / "base.safetensors")
    tasks = {}
    for t in range(TASKS):
        sd = {k: v + 1e-3 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        save_file(sd, d / f"t{t}.safetensors")
        tasks[f"t{t}"] = str(d / f"t{t}.safetensors")
    return str(d / "base.safetensors"), tasks


def _pack_watching(monkeypatch, base: str, tasks: dict[str, str], out: Path, ahead: int) -> dict[str, int]:
    """Pack with READ_AHEAD_BYTES = ``ahead``; for each tensor, the input bytes alive (loaded and not
    yet let go) when its load began, its own included."""
    monkeypatch.setattr(packer, "READ_AHEAD_BYTES", ahead)
    real = PackInputs.load
    live: dict[int, tuple[weakref.ref, int]] = {}
    seen: dict[str, int] = {}

    def load(self, entry):
        seen[entry.name] = sum(n for r, n in live.values() if r() is not None) + self.held_bytes(entry)
        item = real(self, entry)
        for x in {id(x): x for x in (item.base, *item.thetas) if x is not None}.values():
            live[id(x)] = (weakref.ref(x), x.numel() * x.element_size())
        return item

    def slow(n: int, real_give_back=memory.give_back) -> None:  # called while the tensor written is held:
        time.sleep(0.2)  # a load read ahead has begun by then (the loader's thread is idle)
        real_give_back(n)

    monkeypatch.setattr(PackInputs, "load", load)
    monkeypatch.setattr(memory, "give_back", slow)
    tallpack.pack(base, tasks, out, threads=2)
    monkeypatch.undo()
    return seen


def test_a_large_tensor_is_read_only_after_the_last_ones_inputs_are_let_go(tmp_path, monkeypatch) -> None:
    base, tasks = _family(tmp_path)
    copies = (TASKS + 1) * 4  # bytes of one element's copies (float32)
    largest, small = max(SIZES.values()) * copies, sum(n for k, n in SIZES.items() if "small" in k) * copies
    cap = 1 << 20  # the small tensors' copies (80 KB each) are read ahead; the large ones' (5-7.5 MB) are not
    bounded = _pack_watching(monkeypatch, base, tasks, tmp_path / "bounded.tallpack", cap)
    assert set(bounded) == set(SIZES)
    assert max(bounded.values()) <= largest + cap + small, bounded
    # the large tensors each alone: what was alive when one was read is its own copies (and small ones)
    for k, n in SIZES.items():
        if "big" in k:
            assert bounded[k] <= n * copies + small, (k, bounded)
    # the small ones are still read while the tensor before them is written
    assert bounded["c.small"] >= SIZES["b.big"] * copies, bounded

    unbounded = _pack_watching(monkeypatch, base, tasks, tmp_path / "unbounded.tallpack", 1 << 40)
    assert unbounded["b.big"] >= (SIZES["a.big"] + SIZES["b.big"]) * copies  # (what the bound prevents)
    assert (tmp_path / "bounded.tallpack").read_bytes() == (tmp_path / "unbounded.tallpack").read_bytes()

@pytest.mark.parametrize("ahead", [0, 1 << 40])
def test_every_tensor_is_loaded_once_in_order_whatever_the_bound(tmp_path, monkeypatch, ahead) -> None:
    base, tasks = _family(tmp_path)
    order: list[str] = []
    real = PackInputs.load

    def load(self, entry):
        order.append(entry.name)
        return real(self, entry)

    monkeypatch.setattr(packer, "READ_AHEAD_BYTES", ahead)
    monkeypatch.setattr(PackInputs, "load", load)
    tallpack.pack(base, tasks, tmp_path / "f.tallpack", threads=2)
    assert order == list(SIZES)
