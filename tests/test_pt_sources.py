"""Plain PyTorch checkpoints (.pt): damaged storage records, training-checkpoint wrappers."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
import torch

import tallpack
from tallpack.errors import CheckpointError, IncompatibleCheckpointsError
from tallpack.sources import open_source


def _sd(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a.weight": torch.randn(16, 8, generator=g), "b.weight": torch.randn(32, generator=g),
            "c.bias": torch.randn(8, generator=g)}


def _cut(src: Path, dst: Path, tensor: torch.Tensor, cut: int) -> None:
    """Rewrite the zip of ``src`` with the storage record holding ``tensor`` cut to ``cut`` bytes."""
    raw = tensor.numpy().tobytes()
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zo:
        for info in zin.infolist():
            d = zin.read(info)
            if "/data/" in info.filename and d == raw:
                d = d[:cut]
            zo.writestr(info, d)


@pytest.mark.parametrize("keep", [124, 100, 0])
def test_short_storage_record_refused(tmp_path: Path, keep: int) -> None:
    sd = _sd()
    torch.save(sd, tmp_path / "t.pt")
    _cut(tmp_path / "t.pt", tmp_path / "short.pt", sd["b.weight"], keep)  # 128 bytes whole
    with pytest.raises(CheckpointError, match=r"short\.pt: tensor 'b\.weight': its storage record .* holds") as e:
        open_source(tmp_path / "short.pt")
    assert "\n" not in str(e.value)
    torch.save(_sd(1), tmp_path / "base.pt")
    with pytest.raises(CheckpointError, match="b.weight"):
        tallpack.pack(tmp_path / "base.pt", [tmp_path / "short.pt", tmp_path / "t.pt"], tmp_path / "o.tallpack",
                      exact=True)


def test_intact_and_tied_storages_pass(tmp_path: Path) -> None:
    sd = _sd()
    sd["tied"] = sd["a.weight"]
    sd["view"] = sd["a.weight"][2:5]
    torch.save(sd, tmp_path / "t.pt")
    src = open_source(tmp_path / "t.pt")
    assert torch.equal(src.get("view"), sd["view"])
    assert src.aliases() == {"tied": "a.weight"}


def _optimizer(sd: dict[str, torch.Tensor]) -> dict:
    params = [torch.nn.Parameter(t.clone()) for t in sd.values()]
    opt = torch.optim.AdamW(params)
    sum(p.sum() for p in params).backward()
    opt.step()
    return opt.state_dict()


@pytest.mark.parametrize("key, extra", [
    ("model", {"iter_num": 5, "best_val_loss": torch.tensor(1.5), "config": {"lr": 0.1}}),  # nanoGPT
    ("model_state_dict", {"epoch": 3}),  # PyTorch's tutorial
    ("state_dict", {"epoch": 3, "global_step": 7}),  # Lightning
    ("module", {}),  # DeepSpeed
])
def test_training_checkpoint_unwrapped(tmp_path: Path, caplog: pytest.LogCaptureFixture, key: str, extra: dict) -> None:
    torch.save(_sd(0), tmp_path / "base.pt")
    tasks = []
    for i in (1, 2):
        sd = _sd(i)
        opt_key = "optimizer_state_dict" if key == "model_state_dict" else "optimizer"
        torch.save({key: sd, opt_key: _optimizer(sd), **extra}, tmp_path / f"t{i}.pt")
        tasks.append(tmp_path / f"t{i}.pt")
    torch.save({key: _sd(0), **extra}, tmp_path / "wrapped_base.pt")  # the base too
    with caplog.at_level("INFO", logger="tallpack.sources"):
        tallpack.pack(tmp_path / "wrapped_base.pt", tasks, tmp_path / "o.tallpack", exact=True)
    assert f"packing the state dict under {key!r}" in caplog.text
    with tallpack.open(tmp_path / "o.tallpack") as fam:
        got = fam.state_dict("t1", exact=True)
        assert set(got) == set(_sd(1))
        for name, t in _sd(1).items():
            assert torch.equal(got[name], t)


def test_two_state_dicts_refused(tmp_path: Path) -> None:
    torch.save({"model": _sd(1), "ema": _sd(2), "iter_num": 3}, tmp_path / "t.pt")
    with pytest.raises(CheckpointError, match=r"t\.pt: holds a training checkpoint.*'model', 'ema'.*torch\.save"):
        open_source(tmp_path / "t.pt")
    torch.save({"weights": _sd(1), "step": 3}, tmp_path / "u.pt")  # not a well-known key: not guessed
    with pytest.raises(CheckpointError, match=r"entry 'weights' holds a mapping of tensors.*ckpt\['weights'\]"):
        open_source(tmp_path / "u.pt")


def test_extra_entry_in_state_dict_says_drop_it(tmp_path: Path) -> None:
    torch.save({**_sd(1), "iter_num": 3}, tmp_path / "t.pt")
    with pytest.raises(CheckpointError, match=r"entry 'iter_num' is an int, not a tensor.*drop it"):
        open_source(tmp_path / "t.pt")


def _runs(tmp_path: Path) -> Path:
    """nanoGPT's out folders: runs/out-a/ckpt.pt, ..., and the base."""
    torch.save(_sd(0), tmp_path / "base.pt")
    for i, run in enumerate(("out-a", "out-b", "out-c"), 1):
        (tmp_path / "runs" / run).mkdir(parents=True)
        torch.save({"model": _sd(i), "iter_num": 10}, tmp_path / "runs" / run / "ckpt.pt")
    return tmp_path / "runs"


def test_files_of_one_name_named_after_their_folders(tmp_path: Path) -> None:
    runs = _runs(tmp_path)
    files = sorted(runs.glob("*/ckpt.pt"))
    tallpack.pack(tmp_path / "base.pt", files, tmp_path / "o.tallpack")
    with tallpack.open(tmp_path / "o.tallpack") as fam:
        assert list(fam.tasks) == ["out-a", "out-b", "out-c"]


def test_cli_run_folders_suggestion_works(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner
    from tallpack_cli.main import main

    _runs(tmp_path)
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(main, ["pack", "--no-progress", "--base", "base.pt", "-o", "o.tallpack", "runs"])
    assert r.exit_code == 2
    assert "runs/*/ckpt.pt" in r.output
    # what it says to type, as the shell expands it
    r = CliRunner().invoke(main, ["pack", "--no-progress", "--base", "base.pt", "-o", "o.tallpack",
                                  *sorted(str(p) for p in Path("runs").glob("*/ckpt.pt"))])
    assert r.exit_code == 0, r.output
    with tallpack.open(tmp_path / "o.tallpack") as fam:
        assert list(fam.tasks) == ["out-a", "out-b", "out-c"]
    # a run folder itself says which file to pass
    r = CliRunner().invoke(main, ["pack", "--no-progress", "--base", "base.pt", "-o", "p.tallpack", "runs/out-a"])
    assert r.exit_code == 1
    assert "it holds ckpt.pt (PyTorch file): pass the file itself (out-a=runs/out-a/ckpt.pt)" in r.output


class _Net(torch.nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.fc1 = torch.nn.Linear(8, 16)
        self.fc2 = torch.nn.Linear(16, 4)


def test_compiled_model_state_dict_read_under_the_models_names(tmp_path: Path) -> None:
    torch.save(_Net(0).state_dict(), tmp_path / "base.pt")
    compiled = torch.compile(_Net(1)).state_dict()  # wrapped, not compiled until run
    assert all(k.startswith("_orig_mod.") for k in compiled)
    torch.save(compiled, tmp_path / "a.pt")
    torch.save(_Net(2).state_dict(), tmp_path / "b.pt")
    tallpack.pack(tmp_path / "base.pt", [tmp_path / "a.pt", tmp_path / "b.pt"], tmp_path / "o.tallpack", exact=True)
    with tallpack.open(tmp_path / "o.tallpack") as fam:
        got = fam.state_dict("a", exact=True)
        _Net(0).load_state_dict(got, strict=True)  # loads into the uncompiled model
        for name, t in _Net(1).state_dict().items():
            assert torch.equal(got[name], t)
    # the base saved from the compiled model, the tasks plain
    torch.save(torch.compile(_Net(0)).state_dict(), tmp_path / "cbase.pt")
    tallpack.pack(tmp_path / "cbase.pt", [tmp_path / "b.pt"], tmp_path / "c.tallpack")


def test_ddp_prefix_named_in_the_error(tmp_path: Path) -> None:
    torch.save(_Net(0).state_dict(), tmp_path / "base.pt")
    torch.save({f"module.{k}": v for k, v in _Net(1).state_dict().items()}, tmp_path / "ddp.pt")
    torch.save(_Net(2).state_dict(), tmp_path / "b.pt")
    with pytest.raises(IncompatibleCheckpointsError) as e:
        tallpack.pack(tmp_path / "base.pt", {"a": tmp_path / "ddp.pt", "b": tmp_path / "b.pt"}, tmp_path / "o.tallpack")
    msg = str(e.value)
    assert "task 'a'" in msg and "its tensor names are the base's with 'module.' in front" in msg
    assert "removeprefix('module.')" in msg and "allow" not in msg and "\n" not in msg
    with pytest.raises(IncompatibleCheckpointsError, match="the base's tensor names are the task's with 'module.'"):
        tallpack.pack(tmp_path / "ddp.pt", [tmp_path / "b.pt"], tmp_path / "o.tallpack")
