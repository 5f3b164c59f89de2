"""Plain PyTorch checkpoints (.pt): damaged storage records, training-checkpoint wrappers."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
import torch

import tallpack
from tallpack.errors import CheckpointError
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
