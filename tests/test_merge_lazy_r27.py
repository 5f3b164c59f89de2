"""A merged model built one tensor at a time (``MergeParts.state_dict(alpha, lazy=True)``, which
``write_merged`` and ``Archive.merged`` use) is the eager model bit for bit, and writing one holds
one tensor's parts, not the whole model's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import tallpack
from tallpack.merged import MergeParts
from tallpack.merging import MERGED_MODELS, apply_direction, consensus_mask

from conftest import anon_growth

GOLDEN = Path(__file__).parent / "golden"


def _models(fam: tallpack.Archive) -> list[str]:
    method = fam.manifest.merge.get("method")
    return [m for m in MERGED_MODELS if m.endswith(str(method))]


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], where: str) -> None:
    assert list(a) == list(b), where
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, (where, k)
        assert torch.equal(a[k].view(-1).view(torch.uint8), b[k].view(-1).view(torch.uint8)), (where, k)


def _ordered(got: dict[str, torch.Tensor], like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A file's tensors (safetensors sorts them) in ``like``'s order, every name of both kept."""
    assert set(got) == set(like)
    return {k: got[k] for k in like}


@pytest.mark.parametrize("path", sorted(GOLDEN.glob("*.tallpack")), ids=lambda p: p.stem)
def test_lazy_merged_model_is_the_eager_one_for_every_golden_archive(path: Path) -> None:
    with tallpack.open(path) as fam:
        models = _models(fam)
        assert models, fam.manifest.merge
        for model in models:
            parts = MergeParts(fam, model)
            for task in (None, *fam.tasks[:2]):
                for alpha in (None, 0.3, 1.0):
                    eager = parts.state_dict(alpha, task=task)
                    lazy = MergeParts(fam, model, lazy=True).state_dict(alpha, task=task, lazy=True)
                    assert len(lazy) == len(eager) and list(lazy) == list(eager)
                    for name in lazy:  # the manifest's specs are the tensors'
                        dt, shape = lazy.spec(name)
                        assert (str(eager[name].dtype).removeprefix("torch."), tuple(eager[name].shape)) == \
                            (dt, tuple(shape)), (path.name, model, name)
                    _same(dict(lazy), eager, f"{path.name} {model} task={task} alpha={alpha}")
                    held = parts.state_dict(alpha, task=task, lazy=True)  # from the parts already read
                    _same(dict(held), eager, f"held {path.name} {model} task={task} alpha={alpha}")
                    _same(fam.merged(model, alpha=alpha, task=task), eager, f"merged() {path.name} {model}")


def _family(n: int, tensors: int, tasks: int = 3, dtype: torch.dtype = torch.float32) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(tensors)
    base = {f"layer{i}.weight": (torch.randn(n, generator=g) * 0.02).to(dtype) for i in range(tensors)}
    base["norm.weight"] = torch.ones(64, dtype=dtype)
    fts = {f"t{t}": {k: (v.float() + 1e-3 * torch.randn(v.shape, generator=g)).to(dtype) for k, v in base.items()}
           for t in range(tasks)}
    return base, fts


@pytest.mark.parametrize("merge", ["ta", "ties"])
def test_written_merged_model_is_the_eager_one_and_shards_alike(tmp_path: Path, merge: str) -> None:
    base, fts = _family(5000, 6, dtype=torch.bfloat16)
    fts["t0"]["head.weight"] = torch.randn(10, 8).to(torch.bfloat16)  # a task's own tensor
    out = tmp_path / "f.tallpack"
    tallpack.pack(base, fts, out, merge=merge)
    with tallpack.open(out) as fam:
        for model in _models(fam):
            eager = MergeParts(fam, model).state_dict(0.7, task="t0")
            one = tallpack.write_merged(fam, tmp_path / f"{model}-one", model, alpha=0.7, task="t0")
            _same(_ordered(load_file(str(one[0])), eager), eager, model)
            sharded = tallpack.write_merged(fam, tmp_path / f"{model}-sharded", model, alpha=0.7, task="t0",
                                            max_shard_size="12KB")
            index = json.loads(Path(sharded[0]).read_text())
            got: dict[str, torch.Tensor] = {}
            for f in sorted(set(index["weight_map"].values())):
                got.update(load_file(str(Path(sharded[0]).parent / f)))
            assert len(set(index["weight_map"].values())) > 1
            _same(_ordered(got, eager), eager, f"{model} sharded")


def test_lazy_merged_model_counts_overflow_as_the_eager_one(tmp_path: Path, caplog) -> None:
    base = {"w": torch.full((64,), 60000.0, dtype=torch.float16), "v": torch.zeros(64, dtype=torch.float16)}
    fts = {t: {"w": torch.full((64,), 65000.0, dtype=torch.float16), "v": torch.ones(64, dtype=torch.float16)}
           for t in ("a", "b")}
    out = tmp_path / "o.tallpack"
    tallpack.pack(base, fts, out, merge="ta")
    with tallpack.open(out) as fam:
        parts = MergeParts(fam, "ta")
        eager_over = parts.warn_overflow(parts.state_dict(1.0), 1.0)
        model = MergeParts(fam, "ta", lazy=True).state_dict(1.0, lazy=True)
        dict(model)
        assert model.warn_overflow() == eager_over == ["w"]
        written = tallpack.write_merged(fam, tmp_path / "m", "ta", alpha=1.0)
        assert written.overflow == ("w",)
        assert "alpha 1 overflows 1 tensor of the ta model" in caplog.text


def test_a_lazy_merged_model_rebuilds_a_name_asked_for_again(tmp_path: Path) -> None:
    base, fts = _family(300, 40)  # small tensors: stored in groups
    out = tmp_path / "g.tallpack"
    tallpack.pack(base, fts, out)
    with tallpack.open(out) as fam:
        eager = fam.merged("consensus-ta", alpha=0.5)
        lazy = MergeParts(fam, "consensus-ta", lazy=True).state_dict(0.5, lazy=True)
        names = list(lazy)
        for name in [*reversed(names), *names, names[3], names[3]]:  # any order, twice
            assert torch.equal(lazy[name], eager[name]), name
        assert "nope" not in lazy
        with pytest.raises(KeyError):
            lazy["nope"]


def _merge_peak(archive: Path, outdir: Path) -> int:
    return anon_growth(f"fam = tallpack.open({str(archive)!r}, cache_bytes=0, threads=1)",
                       f"tallpack.write_merged(fam, {str(outdir)!r}, 'consensus-ta', alpha=0.5)")


def test_writing_a_merged_model_holds_a_few_tensors_not_the_model(tmp_path: Path) -> None:
    """24 tensors of 4 MB: the eager model held every tensor's base, float32 direction and output
    (about 72 tensors, 290 MB over the baseline); built as written, a few tensors' parts are."""
    n = 1 << 20
    base, fts = _family(n, 24)
    out = tmp_path / "big.tallpack"
    tallpack.pack(base, fts, out)
    del base, fts
    grown = _merge_peak(out, tmp_path / "merged")
    assert grown <= 16 * 4 * n, grown / 2**20
    with tallpack.open(out) as fam:  # and the file written is the eager model
        eager = fam.merged("consensus-ta", alpha=0.5)
        _same(_ordered(load_file(str(tmp_path / "merged" / "model.safetensors")), eager), eager, "big")


@settings(max_examples=60, deadline=None)
@given(tasks=st.integers(1, 600), k=st.integers(-2, 603), n=st.integers(1, 40), seed=st.integers(0, 2**31 - 1))
def test_consensus_counts_are_the_sum_of_the_masks(tasks: int, k: int, n: int, seed: int) -> None:
    # uint8 counts in blocks of 255 masks, summed as int32 past them: the int64 sum's comparison
    g = torch.Generator().manual_seed(seed)
    masks = [torch.rand(n, generator=g) < 0.9 for _ in range(tasks)]
    before = [m.clone() for m in masks]
    want = torch.stack([m.to(torch.int64) for m in masks]).sum(0) >= max(k, 0)
    assert torch.equal(consensus_mask(iter(masks), k), want)
    assert all(torch.equal(a, b) for a, b in zip(masks, before))  # the masks are not changed


@settings(max_examples=60, deadline=None)
@given(dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), alpha=st.floats(0.0, 2.0),
       seed=st.integers(0, 2**31 - 1), scale=st.sampled_from([1e-3, 1.0, 1e4]))
def test_apply_direction_is_the_formula_bit_for_bit(dtype: torch.dtype, alpha: float, seed: int, scale: float) -> None:
    g = torch.Generator().manual_seed(seed)
    theta = (torch.randn(257, generator=g) * scale).to(dtype)
    theta[:3] = torch.tensor([-0.0, 0.0, float("inf")])
    d = torch.randn(257, generator=g) * scale
    d[3] = -0.0
    alpha32 = torch.tensor(alpha, dtype=torch.float32)
    want = (theta.to(torch.float32) + alpha32 * d).to(dtype)
    before = theta.clone()
    got = apply_direction(theta, d, alpha)
    assert got.dtype == dtype and torch.equal(got.view(-1).view(torch.uint8), want.view(-1).view(torch.uint8))
    assert torch.equal(theta.view(torch.uint8), before.view(torch.uint8))  # theta_0 is not changed


@pytest.mark.parametrize("count", [2, 4])
def test_ties_thresholds_not_one_per_task_are_a_format_error(tmp_path: Path, count: int) -> None:
    # fuzz run 42: a TIES archive's thresholds for 4 tasks where it has 3 reached the C kernel of a
    # tensor every task changed alike (format 1.13) as a ValueError; every merged model refuses it
    import shutil

    from test_integrity import rewrite_manifest

    from tallpack.errors import FormatError

    path = tmp_path / "t.tallpack"
    shutil.copy(GOLDEN / "v1_13_shared_base_ties.tallpack", path)
    with tallpack.open(path) as fam:
        tasks = len(fam.tasks)
    assert tasks != count

    def edit(m: dict) -> None:
        m["merge"]["thresholds"] = [0.0] * count
    rewrite_manifest(path, edit)
    with tallpack.open(path) as fam:
        for model in _models(fam):
            with pytest.raises(FormatError, match=rf"{count} TIES thresholds for {tasks} tasks"):
                fam.merged(model)
