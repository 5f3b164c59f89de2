"""README claims checked as a newcomer meets them (review r26), on real checkpoint files."""

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import tallpack
from tallpack.errors import IncompatibleCheckpointsError
from tallpack_cli.main import main
from test_pt_sources import _Net


def _ddp(seed: int) -> dict[str, torch.Tensor]:
    return {f"module.{k}": v for k, v in _Net(seed).state_dict().items()}


def test_every_task_saved_from_ddp_is_named_in_the_error(tmp_path: Path) -> None:
    # README: "a DDP wrapper's `module.` prefix is named in the error". With every task saved from
    # DDP, the base was matched under 'module.' as if it were a bare model and the tasks had a head,
    # and the members came back under 'module.*' names that the unwrapped model does not load.
    torch.save(_Net(0).state_dict(), tmp_path / "base.pt")
    torch.save(_ddp(1), tmp_path / "a.pt")
    torch.save(_ddp(2), tmp_path / "b.pt")
    for tasks in ([tmp_path / "a.pt"], [tmp_path / "a.pt", tmp_path / "b.pt"]):
        with pytest.raises(IncompatibleCheckpointsError) as e:
            tallpack.pack(tmp_path / "base.pt", tasks, tmp_path / "o.tallpack")
        msg = str(e.value)
        assert "task 'a'" in msg and "its tensor names are the base's with 'module.' in front" in msg
        assert "removeprefix('module.')" in msg and "\n" not in msg
    assert not (tmp_path / "o.tallpack").exists()
    result = CliRunner().invoke(main, ["pack", "--base", str(tmp_path / "base.pt"), "-o", str(tmp_path / "o.tallpack"),
                                       str(tmp_path / "a.pt"), str(tmp_path / "b.pt")])
    assert result.exit_code == 1
    assert "error: " in result.output and "'module.' in front" in result.output


def test_a_bare_base_is_still_matched_under_its_tasks_prefix(tmp_path: Path) -> None:
    # the rule the DDP case no longer takes: a bare model's base, fine-tunes with a head
    torch.save(_Net(0).state_dict(), tmp_path / "base.pt")
    for i, name in enumerate("ab"):
        torch.save({f"net.{k}": v for k, v in _Net(i + 1).state_dict().items()} | {"head.weight": torch.ones(2, 4)},
                   tmp_path / f"{name}.pt")
    tallpack.pack(tmp_path / "base.pt", [tmp_path / "a.pt", tmp_path / "b.pt"], tmp_path / "o.tallpack")
    with tallpack.open(tmp_path / "o.tallpack") as fam:
        assert "net.fc1.weight" in fam.keys("a")
        assert torch.equal(fam.base_tensor("net.fc1.weight"), _Net(0).fc1.weight.detach())


def test_demo_help_says_how_long_each_size_takes() -> None:
    # the tiny demo takes a few seconds on two cores (4.4 s measured), the full one about a minute
    out = " ".join(CliRunner().invoke(main, ["demo", "--help"]).output.split())
    assert "tiny: a smaller family and demo (a few seconds; full: about a minute, on two cores)" in out
