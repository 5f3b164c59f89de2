"""Round 32's review: cases a demanding user meets in this round's changes (sources' storage
records, archives' descriptors, unpack warnings)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import tallpack.sources as sources
from tallpack.sources import open_source


def _steps(path: Path) -> int:
    """Python calls (generator steps included) in tallpack.sources while ``_check_records`` reads
    ``path``: the work it does, counted rather than timed."""
    tensors = torch.load(path, mmap=True, weights_only=True)
    tensors = tensors.get("model", tensors)
    calls = 0

    def count(frame, event, arg):
        nonlocal calls
        if event == "call" and frame.f_code.co_filename == sources.__file__:
            calls += 1

    sys.setprofile(count)
    try:
        sources._check_records(path, tensors)
    finally:
        sys.setprofile(None)
    return calls


@pytest.mark.parametrize("optimizer", [False, True])
def test_many_storages_of_one_size_are_matched_in_linear_steps(tmp_path, optimizer):
    # an MoE's experts, a stack of equal layers: storages of one size line up with the zip's records at
    # many shifts; each shift was checked storage by storage (N^2 steps: 10 s for 10,000 tensors, minutes
    # beside an Adam state of the same shapes)
    n = 600
    sd = {f"l{i}.w": torch.full((16,), float(i)) for i in range(n)}
    ck: dict = sd
    if optimizer:  # the optimizer's state first in the file: the weights' records are not the first ones
        state = {i: {"exp_avg": torch.full((16,), -1.0 - i), "exp_avg_sq": torch.full((16,), 2.0 + i)}
                 for i in range(n)}
        ck = {"optimizer": {"state": state, "param_groups": [{"params": list(range(n))}]}, "model": sd}
    path = tmp_path / "ck.pt"
    torch.save(ck, path)
    assert _steps(path) < 20 * n
    src = open_source(path)
    for i in (0, 1, n // 2, n - 1):  # and the weights are the model's, not the optimizer's
        assert np.array_equal(src.get(f"l{i}.w").numpy(), np.full(16, i, np.float32))


def test_an_archive_given_as_a_checkpoint_is_named_as_one(tmp_path):
    # (it was 'a Archive is a model, not a checkpoint: pass model.state_dict(), or the folder its
    # save_pretrained() writes': an archive's state_dict needs a task, and it has no save_pretrained)
    import tallpack
    from tallpack.errors import CheckpointError

    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(16, 16, generator=g)}
    path = tmp_path / "fam.tallpack"
    tallpack.pack(base, {"a": {"w": base["w"] + 0.01}}, path)
    with tallpack.open(path) as fam:
        with pytest.raises(CheckpointError) as e:
            tallpack.pack(base, {"b": fam}, tmp_path / "again.tallpack")
    said = str(e.value)
    assert "'b'" in said or said.startswith("b: "), said
    assert "archive" in said and "state_dict(TASK" in said and "save_pretrained" not in said, said
    with pytest.raises(CheckpointError, match=r"^a Linear is a model"):  # (a model is still named as one)
        open_source(torch.nn.Linear(2, 2))


def test_a_components_own_name_is_named_before_a_longer_name_of_another_component(tmp_path):
    # Stable Diffusion: the unet's conv_in.weight, the vae's encoder.conv_in.weight and decoder.conv_in.weight;
    # fam.get_tensor(task, "conv_in.weight") suggested 'vae/encoder.conv_in.weight', not 'unet/conv_in.weight'
    import tallpack
    from tallpack.errors import TensorNotFoundError

    g = torch.Generator().manual_seed(0)
    base = {n: torch.randn(8, 8, generator=g)
            for n in ("unet/conv_in.weight", "vae/encoder.conv_in.weight", "vae/decoder.conv_in.weight")}
    path = tmp_path / "pipe.tallpack"
    tallpack.pack(base, {"a": {k: v + 0.01 for k, v in base.items()}}, path)
    with tallpack.open(path) as fam:
        with pytest.raises(TensorNotFoundError, match=r"did you mean 'unet/conv_in\.weight'\?"):
            fam.get_tensor("a", "conv_in.weight")
        with pytest.raises(TensorNotFoundError, match=r"did you mean 'vae/encoder\.conv_in\.weight'"):
            fam.get_tensor("a", "encoder.conv_in.weight")


class _ReadOnlyViews(dict):
    """Each item a tensor viewed on read-only memory, as the reader views a mapped archive's raw arrays."""

    def __getitem__(self, key):
        from tallpack.dtypes import view_tensor

        return view_tensor(memoryview(dict.__getitem__(self, key)), "float32", (4,))


def test_a_fork_while_another_thread_views_read_only_memory_does_not_hang_the_child():
    # dtypes' lock that keeps threads' warning filters apart (no_user_warnings), held by a reading
    # thread at the fork, stayed held in the child: its first read-only view waited forever
    from conftest import forks_while_reading
    from tallpack.dtypes import view_tensor

    views = _ReadOnlyViews({f"t{i}": bytes(16) for i in range(64)})
    forks_while_reading(views, list(views), lambda: view_tensor(memoryview(bytes(8)), "float32", (2,)).numel() == 2,
                        "dtypes' warnings lock", forks=40)


def test_packing_a_timm_checkpoint_leaves_the_users_own_safe_globals(tmp_path):
    # torch's safe_globals context removes its classes on exit, the user's own add_safe_globals of
    # them too: after tallpack read a timm checkpoint, the user's torch.load(weights_only=True) of it failed
    import argparse

    path = tmp_path / "model_best.pth.tar"
    torch.save({"epoch": 3, "state_dict": {"w": torch.ones(4)}, "args": argparse.Namespace(lr=0.1)}, path)
    with torch.serialization.safe_globals([argparse.Namespace]):  # (the user's, as add_safe_globals makes it)
        assert open_source(path).keys() == ["w"]
        assert argparse.Namespace in torch.serialization.get_safe_globals()
        assert torch.load(path, weights_only=True)["args"].lr == 0.1
    assert argparse.Namespace not in torch.serialization.get_safe_globals()  # (and none of tallpack's left behind)


def test_a_task_name_taken_from_a_path_in_a_list_says_so_and_how_to_name_it(tmp_path):
    # Lightning names its checkpoints epoch=3-step=500.ckpt: pack(base, [that path]) said only
    # "bad task name 'epoch=3-step=500': it holds '/', '\' or '=' (NAME=PATH on the command line...)"
    import tallpack

    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(8, 8, generator=g)}
    torch.save(base, tmp_path / "base.pt")
    for name in ("epoch=3-step=500.ckpt", "a.pt"):
        (tmp_path / "b").mkdir(exist_ok=True)
        torch.save({"w": base["w"] + 0.01}, tmp_path / name)
        torch.save({"w": base["w"] + 0.02}, tmp_path / "b" / name)
    ckpt = str(tmp_path / "epoch=3-step=500.ckpt")
    with pytest.raises(tallpack.InvalidArgumentError) as e:
        tallpack.pack(str(tmp_path / "base.pt"), [ckpt], tmp_path / "x.tallpack")
    assert "'epoch=3-step=500'" in str(e.value) and ckpt in str(e.value) and "{NAME: PATH}" in str(e.value)
    with pytest.raises(tallpack.InvalidArgumentError) as e:  # tmp/a.pt and tmp/b/a.pt: the folders' names, tmp's 'b'
        paths = [str(tmp_path / "a.pt"), str(tmp_path / "b" / "a.pt"), str(tmp_path / "b.pt")]
        tallpack.pack(str(tmp_path / "base.pt"), paths, tmp_path / "x.tallpack")
    assert "given twice" in str(e.value) and "{NAME: PATH}" in str(e.value) and "NAME=PATH" not in str(e.value)


class _WindowsPathPickled:
    """Pickled as a Windows machine pickles ``pathlib.WindowsPath("C:/data")`` (no such path can be made here)."""

    def __reduce__(self):
        import pathlib

        if os.name == "nt":
            return (pathlib.PosixPath, ("/data",))
        return (pathlib.WindowsPath, ("C:\\data",))


def test_a_checkpoint_saved_on_another_system_with_a_path_in_its_hyperparameters_packs(tmp_path):
    # a Lightning checkpoint trained on Windows (hyper_parameters: {"data_dir": WindowsPath(...)}) was
    # 'not a readable PyTorch file (NotImplementedError: cannot instantiate 'WindowsPath' on your system)'
    path = tmp_path / "last.ckpt"
    torch.save({"pytorch-lightning_version": "2.4.0", "state_dict": {"w": torch.ones(4)},
                "hyper_parameters": {"data_dir": _WindowsPathPickled()}}, path)
    src = open_source(path)
    assert src.keys() == ["w"] and torch.equal(src.get("w"), torch.ones(4))
