"""Tests of the demo model family (tiny size only, so they run in a few seconds)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from tallpack.demo import TASKS, FamilyPaths, build_family, evaluate
from tallpack.demo import family as fam
from conftest import demo_copy


@pytest.fixture
def tiny(demo_tiny: FamilyPaths) -> FamilyPaths:
    """The tiny family, built once per session (conftest); building it is most of this file's time."""
    return demo_tiny


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _head(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in sd.items() if k.startswith("head.")}


def test_full_family_definition() -> None:
    assert len(TASKS) >= 8
    assert len(set(TASKS)) == len(TASKS)
    assert list(TASKS) == fam.SIZES["full"]["tasks"]
    assert set(fam.SIZES["tiny"]["tasks"]) <= set(TASKS)


def test_splits_are_disjoint_and_cover_digits() -> None:
    idx = fam._split_indices(0)
    all_idx = np.concatenate(list(idx.values()))
    assert len(all_idx) == len(set(all_idx.tolist())) == len(fam._digits()[1])
    assert not np.array_equal(fam._split_indices(1)["test"], idx["test"])


def test_tiny_family_layout(tiny: FamilyPaths) -> None:
    root = tiny.root
    cfg = json.loads((root / "family.json").read_text())
    assert cfg["size"] == "tiny" and cfg["seed"] == 0 and cfg["version"] == fam.FAMILY_VERSION
    assert list(tiny.tasks) == cfg["tasks"]
    assert tiny.base == root / "base"
    base_names: set[str] | None = None
    for folder in [tiny.base, *tiny.tasks.values()]:
        assert (folder / "model.safetensors").is_file()
        mcfg = json.loads((folder / "config.json").read_text())
        with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
            names = set(f.keys())
            head = f.get_tensor("head.weight")
            version = f.get_tensor("body.version")
            assert f.get_tensor("body.0.weight").dtype == torch.float32
        assert head.shape == (mcfg["num_classes"], mcfg["hidden_size"])
        assert version.dtype == torch.int64 and int(version) == 1
        if base_names is None:
            base_names = names
        assert names == base_names  # same tensor names everywhere; only head shapes differ
    assert not list(root.parent.glob(f".{root.name}.*"))  # no leftover temp folders


def test_deterministic(tiny: FamilyPaths, tmp_path: Path) -> None:
    """A second build gives the same bytes. It is also the rebuild of a folder whose family.json
    names a different configuration (here: seed 1), which replaces that folder."""
    root = demo_copy(tiny, tmp_path / "again")
    cfg = json.loads((root / "family.json").read_text())
    (root / "family.json").write_text(json.dumps({**cfg, "seed": 1}, indent=2, sort_keys=True) + "\n")
    ckpt = root / next(iter(tiny.tasks.values())).relative_to(tiny.root) / "model.safetensors"
    stamp = ckpt.stat().st_mtime_ns, ckpt.stat().st_ino
    again = build_family(root, size="tiny")
    assert json.loads((root / "family.json").read_text())["seed"] == 0
    assert (ckpt.stat().st_mtime_ns, ckpt.stat().st_ino) != stamp
    assert _files(again.root) == _files(tiny.root)


def test_cache_reuse_and_rebuild(tiny: FamilyPaths, tmp_path: Path) -> None:
    root = demo_copy(tiny, tmp_path / "fam")
    paths = build_family(root, size="tiny")
    ckpt = paths.tasks[next(iter(paths.tasks))] / "model.safetensors"
    stamp = ckpt.stat().st_mtime_ns, ckpt.stat().st_ino
    again = build_family(str(root), size="tiny")
    assert again == paths
    assert (ckpt.stat().st_mtime_ns, ckpt.stat().st_ino) == stamp
    # (A different configuration replacing the folder: test_deterministic, whose build it is.)

    # A folder without family.json (e.g. some unrelated data) is never overwritten.
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    with pytest.raises(ValueError):
        build_family(other, size="tiny")
    assert (other / "keep.txt").read_text() == "x"

    with pytest.raises(ValueError):
        build_family(tmp_path / "x", size="huge")


def test_evaluate(tiny: FamilyPaths) -> None:
    base = fam.load_state_dict(tiny.base)
    for task, folder in tiny.tasks.items():
        ft = fam.load_state_dict(folder)
        for split in ("val", "test"):
            acc_ft = evaluate(tiny.root, task, ft, split=split)
            acc_base = evaluate(tiny.root, task, {**base, **_head(ft)}, split=split)
            assert 0.0 <= acc_base <= 1.0 and 0.0 <= acc_ft <= 1.0
            assert acc_ft > 0.85
            # Fine-tunes beat "base body + own head" by a wide margin (>= 0.06 observed).
            assert acc_ft >= acc_base + 0.03, (task, split, acc_base, acc_ft)
        # Deterministic, dtype-tolerant, and consistent with load_model.
        assert evaluate(tiny.root, task, ft) == evaluate(tiny.root, task, ft)
        half = {k: v.half() if v.is_floating_point() else v for k, v in ft.items()}
        assert abs(evaluate(tiny.root, task, half) - evaluate(tiny.root, task, ft)) < 0.02
        model = fam.load_model(ft, task, tiny.root)
        x, y = fam._task_arrays(fam._TASK_SPECS[task], "test", 0)
        with torch.no_grad():
            acc = float((model(x).argmax(-1) == y).double().mean())
        assert acc == pytest.approx(evaluate(tiny.root, task, ft))


def test_evaluate_rejects_bad_input(tiny: FamilyPaths) -> None:
    task = next(iter(tiny.tasks))
    ft = fam.load_state_dict(tiny.tasks[task])
    with pytest.raises(KeyError):
        evaluate(tiny.root, task, {k: v for k, v in ft.items() if k != "body.0.bias"})
    with pytest.raises(KeyError):
        evaluate(tiny.root, task, {**ft, "extra": torch.zeros(1)})
    with pytest.raises(ValueError):
        evaluate(tiny.root, task, {**ft, "head.bias": torch.zeros(ft["head.bias"].numel() + 1)})
    with pytest.raises(ValueError):
        evaluate(tiny.root, task, ft, split="pretrain")
    with pytest.raises(KeyError):
        evaluate(tiny.root, "no-such-task", ft)
