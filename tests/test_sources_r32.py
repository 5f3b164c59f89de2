"""A PyTorch checkpoint whose state dict is not the first thing pickled (``{"optimizer": ...,
"model": state_dict}``): the packer reads each tensor's bytes at its own storage record, not at
another's of the same size (the optimizer's, left out), so the archive holds the model's weights."""

from __future__ import annotations

import pytest
import torch

import tallpack


def _checkpoint(w: torch.Tensor, b: torch.Tensor, first: str) -> dict:
    g = torch.Generator().manual_seed(7)
    opt = {"state": {0: {"exp_avg": torch.randn(w.shape, generator=g), "exp_avg_sq": torch.rand(w.shape, generator=g)},
                     1: {"exp_avg": torch.randn(b.shape, generator=g)}},
           "param_groups": [{"lr": 0.1, "params": [0, 1]}]}
    model = {"w": w, "b": b}
    return {"optimizer": opt, "model": model} if first == "optimizer" else {"model": model, "optimizer": opt}


@pytest.mark.parametrize("first", ["optimizer", "model"])
@pytest.mark.parametrize("n", [8, 1024])  # records of 256 bytes, and of a page and more
def test_state_dict_after_the_optimizer_packs_its_own_bytes(tmp_path, first, n):
    g = torch.Generator().manual_seed(0)
    w0, b0 = torch.randn(n, 8, generator=g), torch.randn(8, generator=g)
    torch.save(_checkpoint(w0, b0, first), tmp_path / "base.pt")
    tasks = {}
    for t in "ab":
        w, b = w0 + 0.01 * torch.randn(n, 8, generator=g), b0 + 0.01 * torch.randn(8, generator=g)
        torch.save(_checkpoint(w, b, first), tmp_path / f"{t}.pt")
        tasks[t] = {"w": w, "b": b}
    out = tmp_path / "fam.tallpack"
    tallpack.pack(str(tmp_path / "base.pt"), {t: str(tmp_path / f"{t}.pt") for t in tasks}, out, exact=True)
    with tallpack.open(out) as fam:
        assert torch.equal(fam.base_tensor("w"), w0)
        for t, sd in tasks.items():
            got = fam.state_dict(t, exact=True)
            assert all(torch.equal(got[k], v) for k, v in sd.items()), t
            assert (fam.state_dict(t)["w"] - sd["w"]).abs().max() < 0.1


def test_adapters_given_as_base_and_tasks_are_warned_of(tmp_path, caplog):
    """PEFT adapters given as the base and as every task share their names, so nothing refused them:
    they pack as given, with one warning that names an adapter's tensor and the merge to do first."""
    import logging

    g = torch.Generator().manual_seed(1)
    names = [f"model.layers.{i}.self_attn.q_proj.lora_{ab}.weight" for i in range(2) for ab in "AB"]
    base = {n: torch.randn(8, 32, generator=g) for n in names}
    tasks = {t: {n: v + 0.01 * torch.randn(v.shape, generator=g) for n, v in base.items()} for t in "ab"}
    with caplog.at_level(logging.WARNING, logger="tallpack"):
        tallpack.pack(base, tasks, tmp_path / "lora.tallpack")
    lines = [r.getMessage() for r in caplog.records if "PEFT adapter" in r.getMessage()]
    assert len(lines) == 1 and "lora_A.weight" in lines[0] and "merge_and_unload" in lines[0], caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tallpack"):  # a model's own weights: nothing said
        tallpack.pack({"w": base[names[0]]}, {t: {"w": sd[names[0]]} for t, sd in tasks.items()}, tmp_path / "m.tallpack")
    assert "adapter" not in caplog.text


def test_a_file_at_the_root_keeps_its_own_name_beside_one_of_its_name_elsewhere(monkeypatch):
    """Two paths of one file name, one in the root folder (``/x.pt`` and ``a/x.pt``): each is named
    after its folder, and the root's, which has no name, keeps the file's own (it was named '')."""
    from pathlib import Path

    from tallpack.sources import stems

    monkeypatch.setattr(Path, "exists", lambda self: True)  # (no file is written to /)
    assert stems(["/x.pt", "runs/a/x.pt"]) == ["x", "a"]
    assert stems(["/x/ckpt.pt", "/y/x/ckpt.pt"]) == ["ckpt", "y"]


def test_a_lightning_checkpoints_folder_suggests_the_runs_name(tmp_path):
    """Lightning's ``version_0/checkpoints/`` given as a task: the line names the file to pass, under
    the run's name (``version_0=...``), not ``checkpoints=...``."""
    from tallpack.errors import CheckpointError

    g = torch.Generator().manual_seed(3)
    base = {"w": torch.randn(8, 8, generator=g)}
    ck = tmp_path / "lightning_logs" / "version_0" / "checkpoints"
    ck.mkdir(parents=True)
    torch.save({"state_dict": {"w": base["w"] + 0.1}, "pytorch-lightning_version": "2.4.0"}, ck / "last.ckpt")
    with pytest.raises(CheckpointError) as e:
        tallpack.pack(base, {"a": str(ck)}, tmp_path / "f.tallpack")
    assert f"version_0={ck / 'last.ckpt'}" in str(e.value) and "checkpoints=" not in str(e.value), str(e.value)
