"""``Archive.merged`` builds a merged model's tensors side by side on the archive's threads
(``MergedModel.whole`` with the archive's ``_share``): the same names, order, tied tensors and bits
as the lazily built model filled one tensor at a time (``dict(model)``), for TA, TIES and their
consensus models, with one thread and two, with and without a task's own tensors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import tallpack
from tallpack.merged import MergedModel
from tallpack.reader import Archive

MODELS = {"ta": ("ta", "consensus-ta"), "ties": ("ties", "consensus-ties")}


def _family(dtype: torch.dtype, tasks: int) -> tuple[dict, dict]:
    """Three tensors of 256K+ elements, 24 small ones (two groups of 16 and 8: the first over a
    quarter of the model, built alone), a tied pair, and a head each task has its own (another shape)."""
    g = torch.Generator().manual_seed(5)

    def model(shift: float, head: int) -> dict[str, torch.Tensor]:
        emb = torch.randn(1100, 512, generator=g) * 0.02 + shift
        sd = {"emb.weight": emb.to(dtype), "a.weight": (torch.randn(520, 512, generator=g) * 0.02 + shift).to(dtype),
              "b.weight": (torch.randn(520, 512, generator=g) * 0.02 + shift).to(dtype)}
        sd.update({f"small.{i}.weight": (torch.randn(256, 256, generator=g) * 0.02 + shift).to(dtype)
                   for i in range(24)})
        sd["out.weight"] = sd["emb.weight"]  # tied (format 1.14)
        sd["head.weight"] = torch.randn(head, 64, generator=g).to(dtype)
        return sd

    base = model(0.0, 2)
    fts = {}
    for t in range(tasks):
        ft = model(0.0, 3 + t)
        for name, v in base.items():  # a sparse change of the base's values, ties kept
            if name not in ("head.weight", "out.weight"):
                keep = torch.rand(v.shape, generator=g) < 0.7
                ft[name] = torch.where(keep, v, ft[name])
        ft["out.weight"] = ft["emb.weight"]
        fts[f"t{t}"] = ft
    return base, fts


@pytest.fixture(scope="module", params=[(torch.float32, "ta"), (torch.bfloat16, "ties"), (torch.float32, "ties")],
                ids=lambda p: f"{str(p[0]).removeprefix('torch.')}-{p[1]}")
def archive(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    dtype, merge = request.param
    base, fts = _family(dtype, 3)
    out = tmp_path_factory.mktemp("side") / f"{merge}.tallpack"
    tallpack.pack(base, fts, out, merge=merge, chunk_elements=1 << 15)
    return out, merge


def _one_at_a_time(fam: tallpack.Archive, model: str, task: str | None) -> dict[str, torch.Tensor]:
    return dict(fam.merge_parts(model, lazy=True).state_dict(0.3, task=task, lazy=True))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("task", [None, "t1"])
def test_side_by_side_has_the_bits_of_one_at_a_time(archive: tuple[Path, str], threads: int, task: str | None,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    path, merge = archive
    shared: list[list[int]] = []
    share = Archive._share

    def recorded(self: Archive, pool, jobs, sizes):  # noqa: ANN001 (the archive's own, recorded)
        shared.append(list(sizes))
        return share(self, pool, jobs, sizes)
    monkeypatch.setattr(Archive, "_share", recorded)
    with tallpack.open(path, threads=threads, cache_bytes=0) as fam:
        assert fam.manifest.aliases == {"out.weight": "emb.weight"}
        for model in MODELS[merge]:
            shared.clear()
            got = fam.merged(model, alpha=0.3, task=task)
            want = _one_at_a_time(fam, model, task)
            assert list(got) == list(want)
            for name, t in want.items():
                assert got[name].dtype == t.dtype and got[name].shape == t.shape, name
                assert torch.equal(got[name].reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)), name
            assert got["out.weight"] is got["emb.weight"]  # tied names: one tensor, as dict(model) gives
            if task is not None:
                assert got["head.weight"].shape == (4, 64)  # the task's own
            if threads == 1:
                assert not shared  # no pool: one at a time
            else:  # side by side, largest first: the three large tensors and the group of 8 (that of 16 alone)
                assert len(shared) == 1 and len(shared[0]) == 4 and shared[0] == sorted(shared[0], reverse=True)


def test_side_by_side_matches_eager_and_two_threads_match_one(archive: tuple[Path, str]) -> None:
    path, merge = archive
    with tallpack.open(path, threads=1) as one, tallpack.open(path, threads=2) as two:
        for model in MODELS[merge]:
            eager = one.merge_parts(model).state_dict(0.3)
            a, b = one.merged(model, alpha=0.3), two.merged(model, alpha=0.3)
            assert list(a) == list(b) == list(eager)
            assert all(torch.equal(a[n], b[n]) and torch.equal(a[n], eager[n]) for n in a)


def test_whole_without_share_is_dict(archive: tuple[Path, str]) -> None:
    path, merge = archive
    with tallpack.open(path, threads=2) as fam:
        model = fam.merge_parts(MODELS[merge][1], lazy=True).state_dict(0.3, lazy=True)
        assert isinstance(model, MergedModel)
        whole, filled = model.whole(), dict(model)
        assert list(whole) == list(filled) and all(torch.equal(whole[n], filled[n]) for n in whole)
