"""Mask statistics of exact archives whose masks and merged vectors are derived (spec §6.1.7,
§6.1.9): each original rebuilt once, in the compiled passes, the same mask bits as the
straightforward path (a task's mask as a lossy read derives it, and the formula written plainly)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import tallpack
from tallpack import merged as merged_mod
from tallpack import stats
from tallpack.dtypes import narrow
from tallpack.encodings import Use
from tallpack.encodings import derived as derived_mod
from tallpack.encodings import derived_merged as dm
from tallpack.encodings import exact as exact_mod
from tallpack.encodings.derived import task_mask
from tallpack.merging import METHODS, derive_merged

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MERGES = ("ta", {"method": "ties", "top_k": 0.4})


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


@contextlib.contextmanager
def _masks_derived():
    old, exact_mod.MASK_POLICY = exact_mod.MASK_POLICY, "derive"
    try:
        yield
    finally:
        exact_mod.MASK_POLICY = old


def _family(folder: Path, dtype: torch.dtype, seed: int = 0) -> tuple[dict, dict[str, Path]]:
    """Base + three tasks of ``dtype``: small layer tensors (grouped in a lossy archive) and an
    embedding of several chunks; task ``c`` leaves layer 1 alone."""
    g = torch.Generator().manual_seed(seed)
    base = {f"layers.{i}.w": torch.randn(300 + i, generator=g).to(dtype) for i in range(3)}
    base["embed.weight"] = torch.randn(50, 40, generator=g).to(dtype)
    save_file(base, folder / "base.safetensors")
    originals, paths = {}, {}
    for t in "abc":
        sd = {k: (v.float() + 0.05 * torch.randn(v.shape, generator=g)).to(dtype) for k, v in base.items()}
        if t == "c":
            sd["layers.1.w"] = base["layers.1.w"].clone()
        save_file(sd, folder / f"{t}.safetensors")
        originals[t], paths[t] = sd, folder / f"{t}.safetensors"
    return {"base": base, "tasks": originals}, paths


def _plain_masks(fam: dict, name: str, method, lambdas: dict[str, float]) -> dict[str, torch.Tensor]:
    """Every task's mask of one tensor, the spec's formula written plainly in torch."""
    base = fam["base"][name].float().reshape(-1)
    taus = [fam["tasks"][t][name].float().reshape(-1) - base for t in fam["tasks"]]
    merged = derive_merged(taus, method)["merged"]
    out = {}
    for t, tau in zip(fam["tasks"], taus):
        lam = torch.tensor(lambdas[t], dtype=torch.float32)
        out[t] = tau.abs() > lam * (merged - tau).abs()
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("merge", MERGES, ids=["ta", "ties"])
def test_stats_masks_of_derived_merged_tensors_are_the_straightforward_ones(tmp_path: Path, dtype, merge) -> None:
    """The masks stats counts (every original rebuilt once, the compiled passes) equal each task's
    mask as a lossy read derives it and the formula written plainly, bit for bit; stats of the
    exact archive equal those of the lossy archives, grouped and not, which store those masks."""
    fam, paths = _family(tmp_path, dtype)
    kw = dict(merge=merge, chunk_elements=64, threads=1, overwrite=True)
    exact, grouped, single = tmp_path / "x.tallpack", tmp_path / "g.tallpack", tmp_path / "s.tallpack"
    with _masks_derived():
        tallpack.pack(tmp_path / "base.safetensors", paths, exact, exact=True, **kw)
    tallpack.pack(tmp_path / "base.safetensors", paths, grouped, group=True, **kw)
    tallpack.pack(tmp_path / "base.safetensors", paths, single, group=False, **kw)
    with tallpack.open(exact) as x, tallpack.open(grouped) as g, tallpack.open(single) as s:
        assert any(e.members for e in g.manifest.tensors)  # the layers grouped: a group's runs counted
        method = METHODS[x.manifest.merge["method"]].from_params(x.manifest.merge)
        lambdas = {t.name: t.lam for t in x.manifest.tasks}
        for e in x.manifest.tensors:
            assert {tt.encoding for tt in e.tasks.values()} == {"tall-derived-merged"}, e.name
            fast = dict(dm.task_masks(x.read_array, e, list(x.tasks), method, f"tensor {e.name!r}")[1])
            plain = _plain_masks(fam, e.name, method, lambdas)
            for t, tt in e.tasks.items():
                slow = task_mask(x.read_array, e, tt, f"task {t!r}, tensor {e.name!r}")
                assert fast[t].dtype == slow.dtype == torch.bool
                assert _bits(fast[t]) == _bits(slow) == _bits(plain[t]), (e.name, t)
        want = stats.compute(s).to_dict()
        assert stats.compute(x).to_dict() == want == stats.compute(g).to_dict()
        assert stats.render(stats.compute(x)) == stats.render(stats.compute(s))


def test_stats_rebuilds_each_original_once(tmp_path: Path, monkeypatch) -> None:
    """stats of an exact archive rebuilds each task's original of a tensor once, for the derived
    merged vector and its mask alike (it rebuilt each twice: 25 s against verify's 4 s for 20
    tasks of 8 MB, finding r24 F2). The real rebuild runs; the calls are counted."""
    _, paths = _family(tmp_path, torch.bfloat16)
    out = tmp_path / "x.tallpack"
    with _masks_derived():
        tallpack.pack(tmp_path / "base.safetensors", paths, out, exact=True, chunk_elements=64, threads=1)
    calls: dict[tuple[str, str], int] = {}
    real = exact_mod.rebuild_exact

    def counted(read, entry, tt, where):
        task = next(t for t, v in entry.tasks.items() if v is tt)
        calls[entry.name, task] = calls.get((entry.name, task), 0) + 1
        return real(read, entry, tt, where)

    for module in (dm, derived_mod):
        monkeypatch.setattr(module, "rebuild_exact", counted)
    with tallpack.open(out) as fam:
        s = stats.compute(fam)
        assert s.weights > 0
        assert calls == {(e.name, t): 1 for e in fam.manifest.tensors for t in e.tasks}


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(DTYPES), st.lists(st.integers(0, 0xFFFF), min_size=0, max_size=40), st.booleans())
def test_the_base_reference_is_the_spec_cast(dtype, patterns, wide) -> None:
    """``base_reference`` (the base as it is, where it is its own reference) gives the bits of
    spec §6.1.5's ``cast_d(f32(theta_0))`` for every bit pattern, NaNs and infinities included."""
    if dtype == torch.float32:
        bits = torch.tensor([p | (p << 16 if wide else 0) for p in patterns], dtype=torch.int64).to(torch.int32)
    else:
        bits = torch.tensor(patterns, dtype=torch.int32).to(torch.int16)  # wraps to the same 16 bits
    base = bits.view(dtype)
    want = narrow(base.to(torch.float32), dtype)
    got = exact_mod.base_reference(base, dtype)
    assert got.dtype == want.dtype and _bits(got) == _bits(want)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_merged_from_compiled_pass_gives_the_spec_formula(dtype) -> None:
    """``merged_from``'s one compiled pass over the originals (the method's ``combine_inputs``)
    equals ``derive_merged`` of the float32 task vectors, TA and TIES (merged and counts)."""
    g = torch.Generator().manual_seed(3)
    base = torch.randn(5000, generator=g).to(dtype)
    thetas = [(base.float() + 0.1 * torch.randn(5000, generator=g)).to(dtype) for _ in range(4)]
    thetas[1][:7] = base[:7]  # zero task vectors, signed zeros in the sums
    taus = [x.float() - base.float() for x in thetas]
    ties = METHODS["ties"].from_params({"method": "ties", "top_k": 0.3, "thresholds": [0.05, 0.1, 0.0, 0.2],
                                        "majority_sign": -1})
    for method in (METHODS["ta"](), ties):
        got, want = dm.merged_from(base, thetas, method, "w"), derive_merged(taus, method)
        assert want is not None and got.keys() == want.keys()
        for k in want:
            assert got[k].dtype == want[k].dtype and _bits(got[k]) == _bits(want[k]), (method.name, k)


def _damaged_exact_archive(tmp_path: Path) -> Path:
    """An exact float16 archive whose task b's residual of ``embed.weight`` has one bit flipped."""
    _, paths = _family(tmp_path, torch.float16)
    out = tmp_path / "x.tallpack"
    with _masks_derived():
        tallpack.pack(tmp_path / "base.safetensors", paths, out, exact=True, chunk_elements=64, threads=1)
    with tallpack.open(out) as fam:
        e = next(x for x in fam.manifest.tensors if x.name == "embed.weight")
        c = e.tasks["b"].extras["exact"].residual.chunks[0]
        fam.read_array(e.arrays["base"], "base", Use.SHARED_INPUT)
    data = bytearray(out.read_bytes())
    data[c.offset + c.nbytes // 2] ^= 0x10
    out.write_bytes(bytes(data))
    return out


@pytest.mark.parametrize("command", ["stats", "consensus merge"])
def test_a_damaged_original_says_where(tmp_path: Path, command: str) -> None:
    """A damaged residual: stats, and a consensus merge, fail in one line naming the archive and
    the tensor."""
    out = _damaged_exact_archive(tmp_path)
    with tallpack.open(out) as fam, pytest.raises(tallpack.IntegrityError) as err:
        stats.compute(fam) if command == "stats" else fam.merged("consensus-ta")
    text = str(err.value)
    assert "\n" not in text and str(out) in text and "embed.weight" in text, text


@pytest.mark.parametrize("merge", MERGES, ids=["ta", "ties"])
def test_consensus_merge_rebuilds_each_original_once(tmp_path: Path, monkeypatch, merge) -> None:
    """A consensus merge of an exact archive rebuilds each task's original of a tensor once, for
    the derived merged vector and every mask alike (it rebuilt each twice: once for tau_MTL, again
    for the task's mask). The real rebuild runs; the calls are counted."""
    _, paths = _family(tmp_path, torch.bfloat16)
    out = tmp_path / "x.tallpack"
    with _masks_derived():
        tallpack.pack(tmp_path / "base.safetensors", paths, out, exact=True, merge=merge, chunk_elements=64, threads=1)
    calls: dict[tuple[str, str], int] = {}
    real = exact_mod.rebuild_exact

    def counted(read, entry, tt, where):
        task = next(t for t, v in entry.tasks.items() if v is tt)
        calls[entry.name, task] = calls.get((entry.name, task), 0) + 1
        return real(read, entry, tt, where)

    for module in (dm, derived_mod, merged_mod):
        monkeypatch.setattr(module, "rebuild_exact", counted, raising=False)
    with tallpack.open(out) as fam:
        model = fam.merged(f"consensus-{fam.manifest.merge['method']}")
        assert set(model) == {e.name for e in fam.manifest.tensors}
        assert calls == {(e.name, t): 1 for e in fam.manifest.tensors for t in e.tasks}


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("merge", MERGES, ids=["ta", "ties"])
def test_consensus_merge_of_exact_archive_is_the_lossy_archives(tmp_path: Path, dtype, merge) -> None:
    """The consensus model of an exact archive (merged vector and masks derived from the originals,
    each rebuilt once) has the bits of the lossy archive's, which stores both; k=1 too."""
    _, paths = _family(tmp_path, dtype)
    kw = dict(merge=merge, chunk_elements=64, threads=1)
    exact, lossy = tmp_path / "x.tallpack", tmp_path / "s.tallpack"
    with _masks_derived():
        tallpack.pack(tmp_path / "base.safetensors", paths, exact, exact=True, **kw)
    tallpack.pack(tmp_path / "base.safetensors", paths, lossy, group=False, **kw)
    with tallpack.open(exact) as x, tallpack.open(lossy) as s:
        model = f"consensus-{x.manifest.merge['method']}"
        for k in (None, 1):
            got, want = x.merged(model, k=k), s.merged(model, k=k)
            assert list(got) == list(want)
            for name in want:
                assert got[name].dtype == want[name].dtype == dtype
                assert _bits(got[name]) == _bits(want[name]), (name, k)
