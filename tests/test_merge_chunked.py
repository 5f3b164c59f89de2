"""A large merged tensor built a run of chunks at a time straight into its output
(``tallpack.merged.CHUNKED_FROM``, ``MergeParts.build_in_runs``) is the one built whole, bit for
bit, and writing it holds its output and a run's buffers, not five float32 copies of it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import tallpack
import tallpack.merged as M
from tallpack.encodings import TensorEntry
from tallpack.merged import MergeParts
from tallpack.merging import MERGED_MODELS

from conftest import anon_growth, big_family

CE = 1 << 16  # chunk_elements: the large tensor has several chunks, and runs of several chunks
ALPHAS = (None, 0.3, 7.5)


def _family(dtype: torch.dtype, tasks: int = 3, n: int = 5 * CE + 1000) -> tuple[dict, dict]:
    """A base with one tensor of several chunks (and a tail), a small one and a tied pair; a task's own head."""
    g = torch.Generator().manual_seed(7)
    big = torch.randn(n // 100, 100, generator=g) * 0.02  # (a partial last run)
    base = {"big.weight": big.to(dtype), "norm.weight": torch.ones(64).to(dtype),
            "wte.weight": (torch.randn(300, 16, generator=g) * 0.02).to(dtype)}
    base["lm_head.weight"] = base["wte.weight"]  # tied
    fts = {}
    for t in range(tasks):
        ft = {k: (v.float() + 3e-3 * torch.randn(v.shape, generator=g)).to(dtype) for k, v in base.items()}
        ft["lm_head.weight"] = ft["wte.weight"]
        fts[f"t{t}"] = ft
    fts["t0"]["head.weight"] = torch.randn(4, 8).to(dtype)
    return base, fts


def _models(fam: tallpack.Archive) -> list[str]:
    return [m for m in MERGED_MODELS if m.endswith(str(fam.manifest.merge.get("method")))]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], where: str) -> None:
    assert list(a) == list(b), where
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, (where, k)
        assert torch.equal(_bits(a[k]), _bits(b[k])), (where, k)


def _built(fam: tallpack.Archive, model: str, alpha: float | None, task: str | None, k: int | None
           ) -> tuple[dict[str, torch.Tensor], list[str]]:
    lazy = MergeParts(fam, model, k, lazy=True).state_dict(alpha, task=task, lazy=True)
    return dict(lazy), lazy.warn_overflow()


def _runs_seen(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The tensors built in runs from now on (each time one is)."""
    seen: list[str] = []
    real = MergeParts.build_in_runs

    def spy(self: MergeParts, e: TensorEntry, alpha: float) -> tuple[torch.Tensor, bool] | None:
        got = real(self, e, alpha)
        if got is not None:
            seen.append(e.name)
        return got
    monkeypatch.setattr(MergeParts, "build_in_runs", spy)
    return seen


def _check(fam: tallpack.Archive, monkeypatch: pytest.MonkeyPatch, chunked: set[str], *,
           tasks: tuple[str | None, ...] = (None, "t0")) -> None:
    """Every model, alpha, task and k of ``fam``: the same bits with runs (tensors ``chunked``
    built in them, the others whole) as built whole; NaN and inf only where whole has them."""
    for model in _models(fam):
        for k in ((None, 3) if model.startswith("consensus-") else (None,)):
            for task in tasks:
                for alpha in ALPHAS:
                    monkeypatch.setattr(M, "CHUNKED_FROM", 1 << 60)
                    whole, over_whole = _built(fam, model, alpha, task, k)
                    monkeypatch.setattr(M, "CHUNKED_FROM", 2 * CE)
                    monkeypatch.setattr(M, "RUN_ELEMENTS", 2 * CE)
                    seen = _runs_seen(monkeypatch)
                    runs, over_runs = _built(fam, model, alpha, task, k)
                    monkeypatch.undo()
                    where = f"{model} k={k} task={task} alpha={alpha}"
                    assert set(seen) == chunked, where  # the large tensor did go through the runs
                    _same(runs, whole, where)
                    assert over_runs == over_whole, where
                    assert all(torch.isfinite(t.float()).all() for t in whole.values()) or over_whole, where


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("merge", ["ta", "ties"])
def test_runs_give_the_bits_of_the_whole_tensor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                dtype: torch.dtype, merge: str) -> None:
    base, fts = _family(dtype)
    out = tmp_path / "f.tallpack"
    tallpack.pack(base, fts, out, merge=merge, chunk_elements=CE)
    with tallpack.open(out) as fam:
        _check(fam, monkeypatch, {"big.weight"})


@pytest.mark.parametrize("derive", [False, True])
def test_runs_of_an_exact_archive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, derive: bool) -> None:
    """Stored masks beside the exact tier: in runs; masks (or a merged vector) derived from the
    originals: built whole, as before."""
    base, fts = _family(torch.bfloat16)
    out = tmp_path / "e.tallpack"
    tallpack.pack(base, fts, out, merge="ta", chunk_elements=CE, exact=True, derive_masks=derive)
    with tallpack.open(out) as fam:
        entry = next(e for e in fam.manifest.tensors if e.name == "big.weight")
        stored = {tt.encoding for tt in entry.tasks.values()} == {"tall"}
        assert stored != derive, {tt.encoding for tt in entry.tasks.values()}
        for model in _models(fam):
            monkeypatch.setattr(M, "CHUNKED_FROM", 1 << 60)
            whole, _ = _built(fam, model, 0.4, "t1", None)
            monkeypatch.setattr(M, "CHUNKED_FROM", 2 * CE)
            seen = _runs_seen(monkeypatch)
            runs, _ = _built(fam, model, 0.4, "t1", None)
            monkeypatch.undo()
            assert bool(seen) == (stored or (model == "ta" and "merged" in entry.arrays)), (model, seen)
            _same(runs, whole, model)


def test_a_fidelity_dial_archive_is_built_whole_as_before(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base, fts = _family(torch.float32)
    out = tmp_path / "d.tallpack"
    tallpack.pack(base, fts, out, merge="ta", chunk_elements=CE, fidelity=0.999)
    with tallpack.open(out) as fam:
        entry = next(e for e in fam.manifest.tensors if e.name == "big.weight")
        assert {tt.encoding for tt in entry.tasks.values()} == {"qtau"}  # (tau_MTL from the tasks' codes)
        _check(fam, monkeypatch, set(), tasks=(None,))


def test_overflow_of_a_tensor_built_in_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """float16 past its range in one run only: listed as built whole lists it; an alpha that
    stays in range lists nothing."""
    n = 5 * CE
    w = torch.zeros(n, dtype=torch.float16)
    w[3 * CE + 5] = 60000.0
    base = {"w": w}
    fts = {t: {"w": (w.float() + torch.linspace(-1e-2, 1e-2, n) * s).to(torch.float16)} for t, s in (("a", 1), ("b", -2))}
    fts["a"]["w"][3 * CE + 5] = 65000.0
    fts["b"]["w"][3 * CE + 5] = 65000.0
    out = tmp_path / "o.tallpack"
    tallpack.pack(base, fts, out, merge="ta", chunk_elements=CE)
    with tallpack.open(out) as fam:
        for alpha in (1.0, 0.5):
            whole, over_whole = _built(fam, "ta", alpha, None, None)
            monkeypatch.setattr(M, "CHUNKED_FROM", 2 * CE)
            seen = _runs_seen(monkeypatch)
            runs, over_runs = _built(fam, "ta", alpha, None, None)
            monkeypatch.undo()
            assert seen == ["w"]
            _same(runs, whole, str(alpha))
            assert over_runs == over_whole == (["w"] if alpha == 1.0 else []), alpha


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("merge", ["ta", "ties"])
def test_written_files_are_the_same_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, merge: str) -> None:
    base, fts = _family(torch.bfloat16)
    out = tmp_path / "w.tallpack"
    tallpack.pack(base, fts, out, merge=merge, chunk_elements=CE)
    with tallpack.open(out) as fam:
        for model in _models(fam):
            for task in (None, "t0"):
                whole = tallpack.write_merged(fam, tmp_path / f"{model}-{task}-whole", model, alpha=0.6, task=task)
                monkeypatch.setattr(M, "CHUNKED_FROM", 2 * CE)
                seen = _runs_seen(monkeypatch)
                runs = tallpack.write_merged(fam, tmp_path / f"{model}-{task}-runs", model, alpha=0.6, task=task)
                monkeypatch.undo()
                assert seen == ["big.weight"]
                assert _digests(Path(runs[0]).parent) == _digests(Path(whole[0]).parent), (model, task)
                assert runs.overflow == whole.overflow


def test_a_tensor_built_in_runs_holds_its_output_and_a_run(tmp_path: Path) -> None:
    """Peak memory of writing a merged model of one 32 MB float32 tensor (base and three tasks):
    built whole, about five float32 copies of it (base widened, tau_MTL, mask counts, alpha * d,
    the output); in runs (1M elements), the output and a few runs' buffers."""
    tasks = big_family(tmp_path)
    archive = tmp_path / "a.tallpack"
    tallpack.pack(str(tmp_path / "base.safetensors"), tasks, archive, chunk_elements=1 << 18)
    grown = {}
    for start, fused in ((1 << 60, False), (1 << 20, False), (1 << 60, True)):  # fused: in runs at any size
        setup = (f"import tallpack.merged as M; M.CHUNKED_FROM = {start}; tallpack.merging.FUSED = {fused}\n"
                 f"fam = tallpack.open({str(archive)!r}, cache_bytes=0, threads=1)")
        work = f"tallpack.write_merged(fam, {str(tmp_path / f'm-{start}-{fused}')!r}, 'consensus-ta', alpha=0.5)"
        grown[start, fused] = anon_growth(setup, work)
    mb = 1 << 20
    shown = json.dumps({("fused" if f else "whole" if s > 1e9 else "runs"): round(v / mb, 1)
                        for (s, f), v in grown.items()})
    print(shown)  # {"whole": 144.9, "runs": 62.9, "fused": 42.5}
    whole, runs = grown[1 << 60, False], grown[1 << 20, False]
    assert whole > 112 * mb, shown  # (the copies held whole: the measure sees them)
    assert runs < whole - 56 * mb, shown
    assert runs < 80 * mb, shown  # the 32 MB output and a few runs' buffers (1M elements)
    if tallpack.kernels.COMPILED:  # the compiled loop: in runs whatever CHUNKED_FROM
        assert grown[1 << 60, True] < 80 * mb, shown
