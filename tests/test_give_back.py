"""``memory.give_back``: the C allocator's free pages handed back to the system after a large
tensor's work (glibc's ``malloc_trim``), a no-op elsewhere, called once per large tensor or pass
by the packer and the exact tier, never per chunk; the archive's bytes are the same with it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import tallpack
from tallpack import inputs, memory

CHUNK = 1 << 16
N = 5 * CHUNK + 1000  # six blocks of a streamed tensor


def _family(d: Path, tasks: int = 3) -> tuple[Path, dict[str, Path]]:
    g = torch.Generator().manual_seed(3)
    base = {"big.weight": (torch.randn(N, generator=g) * 0.02).to(torch.bfloat16),
            "other.weight": torch.randn(64, 32, generator=g).to(torch.bfloat16)}
    save_file(base, d / "base.safetensors")
    paths = {}
    for i in range(tasks):
        sd = {k: (v.float() + 1e-3 * torch.randn(v.shape, generator=g)).to(torch.bfloat16) for k, v in base.items()}
        paths[f"t{i}"] = d / f"t{i}.safetensors"
        save_file(sd, paths[f"t{i}"])
    return d / "base.safetensors", paths


class _Counted:
    """A stand-in for ``malloc_trim`` that counts its calls and trims for real where it can."""

    def __init__(self, real) -> None:
        self.real, self.calls = real, 0

    def __call__(self, pad: int) -> int:
        assert pad == 0
        self.calls += 1
        return self.real(pad) if self.real is not None else 1


def test_give_back_trims_large_work_only(monkeypatch):
    counted = _Counted(memory._TRIM)
    monkeypatch.setattr(memory, "_TRIM", counted)
    memory.give_back(memory.GIVE_BACK_FROM - 1)
    assert counted.calls == 0
    memory.give_back(memory.GIVE_BACK_FROM)
    assert counted.calls == 1


def test_give_back_is_a_no_op_off_glibc(monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    assert memory._malloc_trim() is None
    monkeypatch.setattr(memory, "_TRIM", memory._malloc_trim())
    memory.give_back(1 << 40)  # nothing to call: no error


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_malloc_trim_found_on_linux():
    trim = memory._malloc_trim()
    assert trim is not None and trim(0) in (0, 1)


def test_pack_exact_gives_back_per_tensor_and_pass_with_the_same_bytes(tmp_path, monkeypatch):
    """A streamed tensor packed with ``--exact``: a trim after its TALL write, after the exact
    tier's scan, after each task's residual pass and at its end (3 + tasks), none per block; the
    small tensor none; the archive the same bytes as with no trim at all."""
    base, tasks = _family(tmp_path)
    monkeypatch.setattr(inputs, "HOLD_BYTES", 0)
    monkeypatch.setattr(memory, "GIVE_BACK_FROM", N)  # the big tensor only
    archives = []
    for trim in (None, _Counted(memory._TRIM)):
        monkeypatch.setattr(memory, "_TRIM", trim)
        out = tmp_path / f"a{trim is None}.tallpack"
        tallpack.pack(base, tasks, out, chunk_elements=CHUNK, exact=True, overwrite=True)
        archives.append(out.read_bytes())
    assert isinstance(trim, _Counted) and trim.calls == 3 + len(tasks)
    assert archives[0] == archives[1]
    with tallpack.open(tmp_path / "aFalse.tallpack") as a:
        for t in tasks:
            assert a.state_dict(t, exact=True)["big.weight"].shape == (N,)


def test_pack_gives_back_once_per_large_tensor(tmp_path, monkeypatch):
    base, tasks = _family(tmp_path, tasks=2)
    monkeypatch.setattr(inputs, "HOLD_BYTES", 0)
    monkeypatch.setattr(memory, "GIVE_BACK_FROM", N)
    counted = _Counted(memory._TRIM)
    monkeypatch.setattr(memory, "_TRIM", counted)
    tallpack.pack(base, tasks, tmp_path / "a.tallpack", chunk_elements=CHUNK, overwrite=True)
    assert counted.calls == 1
