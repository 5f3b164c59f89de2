"""Checkpoints as training frameworks write them: Lightning ``.ckpt``, timm ``.pth.tar``, DeepSpeed,
accelerate ``save_state`` folders, torch.distributed.checkpoint folders, DDP prefixes, PEFT adapters.

Lightning, timm, DeepSpeed, accelerate and peft are not installed here: their files are written with
torch and safetensors under the keys, names and layouts those libraries use."""

from __future__ import annotations

import argparse
import fractions
import copy
import json
import logging
import pickle
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import tallpack
from tallpack.errors import CheckpointError, IncompatibleCheckpointsError, UnsafeCheckpointError
from tallpack.sources import open_source, stems


class _Lm(torch.nn.Module):
    """A tiny language model whose head is tied to its embedding (as GPT-2's)."""

    def __init__(self) -> None:
        super().__init__()
        self.wte = torch.nn.Embedding(40, 8)
        self.fc = torch.nn.Linear(8, 8)
        self.ln = torch.nn.LayerNorm(8)
        self.lm_head = torch.nn.Linear(8, 40, bias=False)
        self.lm_head.weight = self.wte.weight


def _model(seed: int) -> _Lm:
    """The base (seed 0) or a fine-tune of it: a tenth of its weights moved."""
    torch.manual_seed(0)
    m = _Lm()
    if seed:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in m.parameters():
                p.add_((torch.rand(p.shape, generator=g) < 0.1) * torch.randn(p.shape, generator=g) * 0.01)
    return m


def _hf_folder(m: _Lm, folder: Path) -> Path:
    """``m`` as save_pretrained writes it: the tied head left out, a config.json."""
    folder.mkdir(parents=True)
    sd = {k: v.contiguous() for k, v in m.state_dict().items() if k != "lm_head.weight"}
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps({"model_type": "tiny", "tie_word_embeddings": True}))
    return folder


def _optimizer(m: torch.nn.Module) -> tuple[dict, dict]:
    """An AdamW's and its scheduler's state after one step (on a copy: ``m`` keeps its weights)."""
    m = copy.deepcopy(m)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LinearLR(opt)
    for p in m.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    sched.step()
    return opt.state_dict(), sched.state_dict()


def _lightning(m: _Lm, path: Path) -> Path:
    """A Lightning ``ModelCheckpoint`` file of a LightningModule holding ``m`` as ``self.model``."""
    opt, sched = _optimizer(m)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"epoch": 3, "global_step": 500, "pytorch-lightning_version": "2.5.1",
                "state_dict": {f"model.{k}": v for k, v in m.state_dict().items()},
                "loops": {"fit_loop": {"state_dict": {}, "epoch_loop.state_dict": {"_batches_that_stepped": 500}}},
                "callbacks": {"ModelCheckpoint{'monitor': 'val_loss', 'mode': 'min'}": {
                    "monitor": "val_loss", "best_model_score": torch.tensor(0.42), "dirpath": "/runs/x",
                    "best_k_models": {"/runs/x/epoch=3-step=500.ckpt": torch.tensor(0.42)}}},
                "optimizer_states": [opt], "lr_schedulers": [sched],
                "hparams_name": "kwargs", "hyper_parameters": {"lr": 1e-3, "batch_size": 8}}, path)
    return path


def test_lightning_ckpt_and_timm_pth_tar_packed(tmp_path: Path) -> None:
    """Lightning's ``.ckpt`` and timm's (and PyTorch's ImageNet example's) ``.pth.tar`` are PyTorch
    files: read as ``.pt`` is (weights_only), the state dict unwrapped, the optimizer left out."""
    base = _lightning(_model(0), tmp_path / "base.ckpt")
    a = _lightning(_model(1), tmp_path / "a.ckpt")
    opt, _ = _optimizer(_model(2))
    torch.save({"epoch": 3, "arch": "tiny", "state_dict": _model(2).state_dict(), "optimizer": opt, "version": 2,
                "metric": 0.4}, tmp_path / "b.pth.tar")
    b = open_source(tmp_path / "b.pth.tar")
    b.close()
    torch.save({"epoch": 3, "state_dict": {f"model.{k}": v for k, v in _model(2).state_dict().items()}},
               tmp_path / "c.pth.tar")
    tallpack.pack(base, [a, tmp_path / "c.pth.tar"], tmp_path / "o.tallpack", exact=True)
    with tallpack.open(tmp_path / "o.tallpack") as fam:
        assert list(fam.tasks) == ["a", "c"]
        got = fam.state_dict("a", exact=True)
        want = {f"model.{k}": v for k, v in _model(1).state_dict().items()}
        assert got.keys() == want.keys()  # no optimizer state, no callback's tensors
        for k, v in want.items():
            assert torch.equal(got[k], v)


def test_lightning_default_file_name_as_a_task(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Lightning names its files ``epoch=3-step=500.ckpt``: given as a bare path, its task name is
    taken without the '=' a task name cannot hold, or the error says to name it."""
    from click.testing import CliRunner
    from tallpack_cli.main import main

    base = _lightning(_model(0), tmp_path / "base.ckpt")
    _lightning(_model(1), tmp_path / "run" / "checkpoints" / "epoch=3-step=500.ckpt")
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(main, ["pack", "--no-progress", "--base", str(base), "-o", "o.tallpack",
                                  "run/checkpoints/epoch=3-step=500.ckpt"])
    assert r.exit_code == 2, r.output
    assert "NAME=run/checkpoints/epoch=3-step=500.ckpt" in r.output, r.output
    r = CliRunner().invoke(main, ["pack", "--no-progress", "--base", str(base), "-o", "o.tallpack",
                                  "a=run/checkpoints/epoch=3-step=500.ckpt"])
    assert r.exit_code == 0, r.output


def test_ddp_prefix_named_when_the_task_holds_its_tied_head(tmp_path: Path) -> None:
    """A DataParallel/DDP state dict (``module.`` names) holds the tied head, which save_pretrained
    left out of the base: the error still names the prefix and how to drop it."""
    base = _hf_folder(_model(0), tmp_path / "base")
    torch.save(torch.nn.DataParallel(_model(1)).state_dict(), tmp_path / "dp.pt")
    torch.save({"state_dict": torch.nn.DataParallel(_model(2)).state_dict(), "epoch": 3}, tmp_path / "dp2.pt")
    for task in ("dp.pt", "dp2.pt"):
        with pytest.raises(IncompatibleCheckpointsError) as e:
            tallpack.pack(base, [tmp_path / task], tmp_path / "o.tallpack")
        assert "with 'module.' in front" in str(e.value) and "removeprefix('module.')" in str(e.value), str(e.value)


def test_dcp_folder_refused_with_the_conversion(tmp_path: Path) -> None:
    """A torch.distributed.checkpoint folder (``.metadata``, a pickle, and ``*.distcp``) is refused with
    the command that converts it; the converted file packs."""
    import torch.distributed.checkpoint as dcp
    pytest.importorskip("torch.distributed.checkpoint.format_utils", reason="this torch has no dcp_to_torch_save")
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    base = _hf_folder(_model(0), tmp_path / "base")
    with pytest.warns(UserWarning):  # "assuming the intent is to save in a single process"
        dcp.save(_model(1).state_dict(), checkpoint_id=str(tmp_path / "dcp"))
    assert (tmp_path / "dcp" / ".metadata").is_file() and list((tmp_path / "dcp").glob("*.distcp"))
    with pytest.raises(CheckpointError) as e:
        tallpack.pack(base, {"a": tmp_path / "dcp"}, tmp_path / "o.tallpack")
    msg = str(e.value)
    assert "torch.distributed.checkpoint" in msg and "dcp_to_torch" in msg and "\n" not in msg, msg
    assert str(tmp_path / "dcp") in msg
    dcp_to_torch_save(str(tmp_path / "dcp"), str(tmp_path / "a.pt"))  # what the message says to run
    tallpack.pack(base, {"a": tmp_path / "a.pt"}, tmp_path / "o.tallpack")
    # FSDP's sharded state dict in a Trainer's checkpoint folder: the model's DCP subfolder named
    ck = tmp_path / "run" / "checkpoint-500"
    opt, _ = _optimizer(_model(1))
    with pytest.warns(UserWarning):
        dcp.save({"optimizer": opt}, checkpoint_id=str(ck / "optimizer_0"))
        dcp.save({"model": _model(1).state_dict()}, checkpoint_id=str(ck / "pytorch_model_fsdp_0"))
    (ck / "config.json").write_text("{}")
    with pytest.raises(CheckpointError) as e:
        tallpack.pack(base, {"a": ck}, tmp_path / "q.tallpack")
    assert str(ck / "pytorch_model_fsdp_0") in str(e.value) and "FSDP" in str(e.value), str(e.value)
    dcp_to_torch_save(str(ck / "pytorch_model_fsdp_0"), str(tmp_path / "b.pt"))
    tallpack.pack(base, {"a": tmp_path / "a.pt", "b": tmp_path / "b.pt"}, tmp_path / "p.tallpack")


def test_deepspeed_zero3_placeholders_refused(tmp_path: Path) -> None:
    """ZeRO-3's ``mp_rank_00_model_states.pt`` holds empty placeholders (the weights are partitioned in
    the ``zero_pp_rank_*`` files): refused as such, with DeepSpeed's conversion, not as a shape mismatch."""
    base = _hf_folder(_model(0), tmp_path / "base")
    step = tmp_path / "ds" / "global_step500"
    step.mkdir(parents=True)
    sd = _model(1).state_dict()
    torch.save({"module": {k: torch.empty(0, dtype=v.dtype) for k, v in sd.items()}, "optimizer": None,
                "param_shapes": [{k: v.shape for k, v in sd.items()}], "global_steps": 500,
                "ds_config": {"zero_optimization": {"stage": 3}}, "ds_version": "0.16.4"},
               step / "mp_rank_00_model_states.pt")
    with pytest.raises(CheckpointError) as e:
        tallpack.pack(base, {"a": step / "mp_rank_00_model_states.pt"}, tmp_path / "o.tallpack")
    msg = str(e.value)
    assert "mp_rank_00_model_states.pt" in msg and "empty" in msg and "zero_to_fp32" in msg, msg
    # ZeRO-1/2 keep the whole weights under 'module': packed
    torch.save({"module": sd, "optimizer": None, "global_steps": 500, "ds_version": "0.16.4"},
               step / "mp_rank_00_model_states.pt")
    tallpack.pack(base, {"a": step / "mp_rank_00_model_states.pt"}, tmp_path / "o.tallpack")


def test_unsafe_pickle_names_what_it_holds(tmp_path: Path) -> None:
    """A file weights_only refuses says which object it pickles (a Fraction in the hyperparameters,
    a whole model), so the user knows which entry to drop."""
    torch.save({"epoch": 3, "state_dict": _model(1).state_dict(), "hparams": {"ratio": fractions.Fraction(1, 3)}},
               tmp_path / "odd.pth.tar")
    with pytest.raises(UnsafeCheckpointError) as e:
        open_source(tmp_path / "odd.pth.tar")
    assert "fractions.Fraction" in str(e.value) and "needs code execution" in str(e.value), str(e.value)
    torch.save(torch.nn.Linear(2, 2), tmp_path / "whole.pt")
    with pytest.raises(UnsafeCheckpointError) as e:
        open_source(tmp_path / "whole.pt")
    assert "torch.nn.modules.linear.Linear" in str(e.value) and "state_dict()" in str(e.value), str(e.value)
    assert "\n" not in str(e.value)


def test_accelerate_save_state_folder(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """``Accelerator.save_state``'s folder: the model packed, every state file (a second optimizer's,
    the sampler's, the custom objects' pickles) left out as a trainer's state, none kept as a folder file."""
    base = _hf_folder(_model(0), tmp_path / "base")
    acc = _hf_folder(_model(1), tmp_path / "acc")
    (acc / "config.json").unlink()  # save_state writes no config
    opt, sched = _optimizer(_model(1))
    for name, obj in (("optimizer.bin", opt), ("optimizer_1.bin", opt), ("scheduler.bin", sched),
                      ("scheduler_1.bin", sched), ("sampler.bin", {"epoch": 0}), ("dl_state_dict.bin", {"it": 3}),
                      ("scaler.pt", {"scale": 65536.0})):
        torch.save(obj, acc / name)
    for name, obj in (("random_states_0.pkl", {"step": 0, "random_state": random.getstate()}),
                      ("custom_checkpoint_0.pkl", {"ema_decay": 0.999})):
        (acc / name).write_bytes(pickle.dumps(obj))
    with caplog.at_level(logging.WARNING, logger="tallpack.sources"):
        tallpack.pack(base, {"a": acc}, tmp_path / "o.tallpack")
    with tallpack.open(tmp_path / "o.tallpack") as fam:
        assert fam.files("a") == {}
    said = [r.getMessage() for r in caplog.records if "a trainer's state" in r.getMessage()]
    assert len(said) == 1 and all(n in said[0] for n in ("custom_checkpoint_0.pkl", "dl_state_dict.bin",
                                                         "optimizer_1.bin", "and 4 more")), said
    assert not [r for r in caplog.records if "only the weights transformers loads" in r.getMessage()]


def test_trainer_checkpoint_folders_of_one_name_named_after_their_runs(tmp_path: Path) -> None:
    """``runs/*/checkpoint-500`` (Trainer's folders, one name in every run) are named after their run
    folders, as files of one name (``runs/*/ckpt.pt``) are after theirs."""
    base = _hf_folder(_model(0), tmp_path / "base")
    folders = [_hf_folder(_model(i), tmp_path / run / "checkpoint-500") for i, run in ((1, "run-a"), (2, "run-b"))]
    for f in folders:
        torch.save(_optimizer(_model(1))[0], f / "optimizer.pt")
    assert stems(folders) == ["run-a", "run-b"]
    tallpack.pack(base, folders, tmp_path / "o.tallpack")
    with tallpack.open(tmp_path / "o.tallpack") as fam:
        assert list(fam.tasks) == ["run-a", "run-b"]
        assert set(fam.files("run-a")) == {"config.json"}  # not optimizer.pt


def test_peft_adapter_folder_of_a_bin_named(tmp_path: Path) -> None:
    """An older PEFT adapter folder (``adapter_model.bin`` + ``adapter_config.json``) is named as an
    adapter to merge, as ``adapter_model.safetensors`` is, not as a folder without weights."""
    base = _hf_folder(_model(0), tmp_path / "base")
    ad = tmp_path / "lora"
    ad.mkdir()
    torch.save({"base_model.model.fc.lora_A.weight": torch.randn(4, 8),
                "base_model.model.fc.lora_B.weight": torch.zeros(8, 4)}, ad / "adapter_model.bin")
    (ad / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "target_modules": ["fc"]}))
    for task in (ad, ad / "adapter_model.bin"):
        with pytest.raises((CheckpointError, IncompatibleCheckpointsError)) as e:
            tallpack.pack(base, {"a": task}, tmp_path / "o.tallpack")
        assert "PEFT adapter" in str(e.value) and "merge_and_unload" in str(e.value), str(e.value)


def test_hub_base_with_lightning_tasks(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A base saved by save_pretrained, tasks from Lightning (``model.`` in front of every name): packed
    under the tasks' names, and the warning says what that means for a folder written with the base's
    config (a LightningModule's attribute is no name transformers strips)."""
    base = _hf_folder(_model(0), tmp_path / "base")
    tasks = [_lightning(_model(i), tmp_path / f"t{i}.ckpt") for i in (1, 2)]
    with caplog.at_level(logging.WARNING, logger="tallpack.plan"):
        tallpack.pack(base, tasks, tmp_path / "o.tallpack")
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "with 'model.' in front" in said and "LightningModule" in said and "without it" in said, said
    with tallpack.open(tmp_path / "o.tallpack") as fam:
        assert "model.fc.weight" in fam.keys("t1")


def test_diffusers_and_kohya_lora_named_as_adapters(tmp_path: Path) -> None:
    """LoRA files of diffusers' training scripts (``...to_q.lora.down.weight``) and kohya's
    (``lora_unet_..._to_q.lora_down.weight``) given as tasks are named as adapters to fuse first."""
    base = _hf_folder(_model(0), tmp_path / "base")
    save_file({"unet.fc.lora.down.weight": torch.randn(4, 8), "unet.fc.lora.up.weight": torch.zeros(8, 4)},
              tmp_path / "pytorch_lora_weights.safetensors")
    save_file({"lora_unet_fc.lora_down.weight": torch.randn(4, 8), "lora_unet_fc.lora_up.weight": torch.zeros(8, 4),
               "lora_unet_fc.alpha": torch.tensor(4.0)}, tmp_path / "kohya.safetensors")
    for f in ("pytorch_lora_weights.safetensors", "kohya.safetensors"):
        with pytest.raises(IncompatibleCheckpointsError) as e:
            tallpack.pack(base, [tmp_path / f], tmp_path / "o.tallpack")
        assert "a LoRA adapter" in str(e.value) and "fuse_lora()" in str(e.value), str(e.value)


def test_diffusers_training_checkpoint_names_its_model_folders(tmp_path: Path) -> None:
    """A diffusers training script's ``checkpoint-500/`` holds ``unet/`` and ``unet_ema/`` beside
    accelerate's state files: it is a folder of model folders (named), not a folder without weights."""
    base = _hf_folder(_model(0), tmp_path / "base")
    ck = tmp_path / "run" / "checkpoint-500"
    for sub in ("unet", "unet_ema"):
        _hf_folder(_model(1), ck / sub)
    torch.save(_optimizer(_model(1))[0], ck / "optimizer.bin")
    (ck / "random_states_0.pkl").write_bytes(pickle.dumps({"step": 0}))
    with pytest.raises(tallpack.errors.InvalidArgumentError) as e:
        tallpack.pack(base, {"a": ck}, tmp_path / "o.tallpack")
    assert "holds no model but 2 model folders (unet, unet_ema)" in str(e.value), str(e.value)


def test_names_of_one_name_taken_from_the_first_folders_that_differ(tmp_path: Path) -> None:
    """Paths of one name two levels deep (Lightning's ``version_*/checkpoints/last.ckpt``, a diffusers
    run's ``run*/checkpoint-500/unet``) are named after the nearest folders that tell them apart."""
    ckpts = [_lightning(_model(i), tmp_path / "logs" / f"version_{i}" / "checkpoints" / "last.ckpt") for i in (1, 2)]
    assert stems(ckpts) == ["version_1", "version_2"]
    unets = [_hf_folder(_model(i), tmp_path / f"run{i}" / "checkpoint-500" / "unet") for i in (1, 2)]
    assert stems(unets) == ["run1", "run2"]
    assert stems([tmp_path / "run1" / "checkpoint-500", tmp_path / "run2" / "checkpoint-500", ckpts[0]]) == \
        ["run1", "run2", "last"]


def test_trainer_state_files_given_as_models_named(tmp_path: Path) -> None:
    """A Trainer's ``optimizer.pt``, ``training_args.bin`` or an optimizer's state under another name,
    given as a model, is named as what it is, not as a pickle of objects or 'not a state dict'."""
    base = _hf_folder(_model(0), tmp_path / "base")
    ck = _hf_folder(_model(1), tmp_path / "checkpoint-500")
    opt, _ = _optimizer(_model(1))
    torch.save(opt, ck / "optimizer.pt")
    torch.save(argparse.Namespace(lr=0.1), ck / "training_args.bin")
    torch.save(opt, tmp_path / "adam.pt")
    for f, said in ((ck / "optimizer.pt", "a trainer's state file"),
                    (ck / "training_args.bin", "a trainer's state file"), (tmp_path / "adam.pt", "an optimizer's state")):
        with pytest.raises(CheckpointError) as e:
            tallpack.pack(base, {"a": f}, tmp_path / "o.tallpack")
        assert said in str(e.value) and str(f) in str(e.value), str(e.value)


def test_deepspeed_run_folder_names_its_model_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """DeepSpeed's save folder (``global_step500/`` holding the model states and ZeRO's optimizer
    states): the command line names the model states file to pass, not the optimizer's."""
    from click.testing import CliRunner
    from tallpack_cli.main import main

    _hf_folder(_model(0), tmp_path / "base")
    step = tmp_path / "ds" / "global_step500"
    step.mkdir(parents=True)
    torch.save({"module": _model(1).state_dict(), "optimizer": None, "ds_version": "0.16.4"},
               step / "mp_rank_00_model_states.pt")
    torch.save({"optimizer_state_dict": {"zero_stage": 2}, "ds_version": "0.16.4"},
               step / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    (tmp_path / "ds" / "latest").write_text("global_step500")
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(main, ["pack", "--no-progress", "--base", "base", "-o", "o.tallpack", "ds"])
    assert r.exit_code == 2 and "ds/global_step500/mp_rank_00_model_states.pt" in r.output, r.output
    r = CliRunner().invoke(main, ["pack", "--no-progress", "--base", "base", "-o", "o.tallpack", "ds/global_step500"])
    assert r.exit_code == 1 and "pass the file itself" in r.output and "optim_states" not in r.output, r.output
    r = CliRunner().invoke(main, ["pack", "--no-progress", "--base", "base", "-o", "o.tallpack",
                                  "ds/global_step500/mp_rank_00_model_states.pt"])
    assert r.exit_code == 0, r.output


def test_ema_copies_beside_the_state_dict_packed_as_their_loaders_do(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Lightning's WeightAveraging (EMA) callback saves the averaged weights as ``state_dict``, the
    current ones as ``current_model_state`` and ``averaging_state``; timm saves ``state_dict`` and
    ``state_dict_ema``. The ``state_dict`` their loaders take (Lightning's load_from_checkpoint, timm's
    load_checkpoint) is packed, with a warning naming the copy left out and how to pack it instead."""
    base = _hf_folder(_model(0), tmp_path / "base")
    ema, current = _model(1), _model(2)
    light = _lightning(ema, tmp_path / "light.ckpt")
    ck = torch.load(light, weights_only=True)
    ck["state_dict"] = {k.removeprefix("model."): v for k, v in ck["state_dict"].items()}  # no prefix: plain names
    ck["current_model_state"] = current.state_dict()
    ck["averaging_state"] = {"n_averaged": torch.tensor(500)}
    torch.save(ck, light)
    torch.save({"epoch": 3, "state_dict": current.state_dict(), "state_dict_ema": ema.state_dict(), "version": 2},
               tmp_path / "timm.pth.tar")
    with caplog.at_level(logging.WARNING, logger="tallpack.sources"):
        tallpack.pack(base, [light, tmp_path / "timm.pth.tar"], tmp_path / "o.tallpack", exact=True)
    with tallpack.open(tmp_path / "o.tallpack") as fam:
        assert torch.equal(fam.get_tensor("light", "fc.weight", exact=True), ema.fc.weight)
        assert torch.equal(fam.get_tensor("timm", "fc.weight", exact=True), current.fc.weight)
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "'current_model_state'" in said and "ckpt['current_model_state']" in said, said
    assert "'state_dict_ema'" in said and "ckpt['state_dict_ema']" in said, said
    # not Lightning's nor timm's: which is the model's is not guessed
    torch.save({"model": ema.state_dict(), "ema": current.state_dict()}, tmp_path / "two.pt")
    with pytest.raises(CheckpointError, match="'model', 'ema' hold a mapping of tensors"):
        open_source(tmp_path / "two.pt")


def test_timm_args_and_lightning_paths_are_rebuilt_not_refused(tmp_path: Path) -> None:
    """timm's train.py saves its ``args`` (an argparse.Namespace) and Lightning's hyperparameters often
    hold paths: weights_only rebuilds these classes (torch.serialization.safe_globals), so such
    checkpoints pack, their state dict unwrapped; nothing else is added to what the load allows."""
    import pathlib

    if not hasattr(torch.serialization, "safe_globals"):  # torch before 2.5: refused, as any other class
        pytest.skip("this torch has no torch.serialization.safe_globals")

    base = tmp_path / "base.pt"
    torch.save(_model(0).state_dict(), base)
    torch.save({"epoch": 3, "state_dict": _model(1).state_dict(),
                "args": argparse.Namespace(lr=0.1, data_dir=pathlib.Path("/data/imagenet"))}, tmp_path / "timm.pth.tar")
    torch.save({"epoch": 1, "state_dict": _model(2).state_dict(),
                "hyper_parameters": {"root": pathlib.PurePosixPath("/runs/a"), "lr": 0.01}}, tmp_path / "b.ckpt")
    tallpack.pack(str(base), {"a": str(tmp_path / "timm.pth.tar"), "b": str(tmp_path / "b.ckpt")}, tmp_path / "o.tallpack")
    with tallpack.open(tmp_path / "o.tallpack") as fam:
        assert list(fam.tasks) == ["a", "b"] and set(fam.keys("a")) == set(_model(1).state_dict())
