"""Derived merged vectors (format 1.8): where every task of a merged tensor has its mask derived, the
merged vector is not stored but derived from every task's original; every read must see exactly what
the stored merged vector gives."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import torch
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tallpack
from conftest import cli_pack, exact_family, exact_version, written
from tallpack import encodings, report, stats
from tallpack.container import FOOTER
from tallpack.encodings import Use
from tallpack.encodings import exact as exact_mod
from tallpack.encodings.derived import DerivedMerged, merged_source
from tallpack.merging import Ties, TaskArithmetic, derive_merged

from strategies import families
from test_fuzz import json_values, paths, read_mutated, with_manifest

DM = "tall-derived-merged"


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and _bits(a) == _bits(b)


@contextlib.contextmanager
def _masks_derived():
    old, exact_mod.MASK_POLICY = exact_mod.MASK_POLICY, "derive"
    try:
        yield
    finally:
        exact_mod.MASK_POLICY = old


def _pack(base, tasks, out: Path, *, exact: bool = True, **kw) -> None:
    """Pack with every mask derived (so every merged tensor's merged vector may be too)."""
    kw = dict(chunk_elements=16, threads=1, allow_mismatch=True, overwrite=True) | kw
    with _masks_derived():
        tallpack.pack(base, tasks, out, exact=exact, **kw)


def _encodings(fam) -> set[str]:
    return {tt.encoding for e in fam.manifest.tensors for tt in e.tasks.values()}


def _merged_arrays(fam) -> dict[tuple[str, str], torch.Tensor]:
    """Every merged tensor's merged vector and merge-method arrays, through ``merged_source``."""
    method = fam.manifest.merge["method"]
    keys = ("merged", "counts") if method == "ties" else ("merged",)
    return {(e.name, k): fam.read_array(merged_source(e, k), f"{e.name} ({k})").clone()
            for e in fam.manifest.tensors if e.kind == "merged" for k in keys}


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(families(max_tasks=3, max_tensors=3), st.sampled_from(["ta", "ties"]))
def test_random_families_with_derived_merged_vectors(tmp_path: Path, fam_, merge: str) -> None:
    """Derived merged vectors (and TIES counts) equal the stored ones bit for bit; lossy reads are
    bit-identical to an archive without the exact tier; the originals come back."""
    base, tasks = fam_
    plain, exact = tmp_path / "p.tallpack", tmp_path / "e.tallpack"
    tallpack.pack(base, tasks, plain, merge=merge, chunk_elements=16, threads=1, allow_mismatch=True,
                  overwrite=True, group=False)  # one entry per tensor, as the exact tier writes
    _pack(base, tasks, exact, merge=merge)
    with tallpack.open(plain) as p, tallpack.open(exact) as e:
        want, got = _merged_arrays(p), _merged_arrays(e)
        assert want.keys() == got.keys() and all(_same(want[k], got[k]) for k in want)
        for x in e.manifest.tensors:
            if x.kind == "merged":  # the writer sums tasks in the order §6.1.9 derives them
                assert {tt.encoding for tt in x.tasks.values()} == {DM}, x.name
                assert set(x.arrays) == {"base"}
        for t, sd in tasks.items():
            lossy, lossy_e, orig = p.state_dict(t), e.state_dict(t), e.state_dict(t, exact=True)
            for k, v in sd.items():
                assert _same(lossy_e[k], lossy[k]), (t, k)
                assert _same(orig[k], v), (t, k)


def test_derive_merged_is_the_packers_formula() -> None:
    """The spec's element-by-element formula gives what the packer's merge methods compute."""
    g = torch.Generator().manual_seed(1)
    for T in (1, 2, 5, 8):
        taus = [torch.randn(999, generator=g) * 10.0 ** (i % 3 - 2) for i in range(T)]
        taus[0][:3] = torch.tensor([-0.0, 0.0, -0.0])
        ta = TaskArithmetic()
        assert _same(derive_merged(taus, ta)["merged"], ta.combine(taus))
        for sign in (-1.0, 0.0, 1.0):
            ties = Ties(0.3)
            ties.thresholds, ties.majority_sign = [float(t.abs().median()) for t in taus], sign
            got = derive_merged(taus, ties)
            assert _same(got["merged"], ties.combine(taus)) and _same(got["counts"], ties.extras(taus)["counts"])
    assert derive_merged([torch.ones(2)], Ties(0.3)) is None  # no thresholds: nothing to derive from


def test_corrupted_residual_fails_every_task_of_its_tensor(small_family, tmp_path: Path) -> None:
    """Every task's lossy read of a tensor depends on every task's residual: one damaged residual
    fails them all with IntegrityError (and verify), while the other tensors still read."""
    out = tmp_path / "c.tallpack"
    _pack(small_family["base_path"], small_family["task_paths"], out, chunk_elements=64)
    with tallpack.open(out) as fam:
        e = next(x for x in fam.manifest.tensors if x.name == "body.w")
        assert {tt.encoding for tt in e.tasks.values()} == {DM}
        c = e.tasks["b"].extras["exact"].residual.chunks[0]
    data = bytearray(out.read_bytes())
    data[c.offset + c.nbytes // 2] ^= 0x10
    out.write_bytes(bytes(data))
    with tallpack.open(out) as fam:
        for t in fam.tasks:
            with pytest.raises(tallpack.IntegrityError):
                fam.get_tensor(t, "body.w")
            assert _same(fam.get_tensor(t, "head.w"), small_family["tasks"][t]["head.w"])
            assert _same(fam.get_tensor(t, "body.b", exact=True), small_family["tasks"][t]["body.b"])
        with pytest.raises(tallpack.IntegrityError):
            fam.get_tensor("b", "body.w", exact=True)
        # an exact read needs only its own residual
        assert _same(fam.get_tensor("a", "body.w", exact=True), small_family["tasks"]["a"]["body.w"])
        problems = fam.verify()  # said once, not again by every task's rebuild that reads it
        assert len(problems) == 1 and "body.w" in problems[0] and "checksum mismatch" in problems[0], problems


def test_stats_merge_inspect_verify_on_derived_merged_vectors(small_family, tmp_path: Path) -> None:
    """Everything that needs the merged vector gets the derived one: the same answers as stored."""
    kw = dict(chunk_elements=64, merge={"method": "ties", "top_k": 0.4})
    stored, derived = tmp_path / "s.tallpack", tmp_path / "d.tallpack"
    _pack(small_family["base_path"], small_family["task_paths"], stored, derive_merged=False, **kw)
    _pack(small_family["base_path"], small_family["task_paths"], derived, **kw)
    with tallpack.open(stored) as s, tallpack.open(derived) as d:
        assert s.format_version == written(6) and d.format_version == written(8)
        assert DM in _encodings(d) and DM not in _encodings(s)
        assert stats.compute(d).to_dict() == stats.compute(s).to_dict()
        for model in ("consensus-ties", "ties"):
            ms, md = s.merged(model), d.merged(model)  # consensus: the default k = 2
            assert ms.keys() == md.keys() and all(_same(ms[k], md[k]) for k in ms)
        ss, sd = s.summary(), d.summary()
        assert sd["stored_bytes"]["merged"] == 0 == sd["stored_bytes"]["counts"] < ss["stored_bytes"]["merged"]
        assert sd["merged_derived"] == [2, 2] and ss["merged_derived"] == [0, 2]
        assert "merged vectors derived from the exact originals, not stored: 2 of 2 tensors" in report.render(sd)
        assert d.verify() == []
        assert d.size < s.size
        for t in d.tasks:
            for k in d.keys(t):
                assert _same(d.get_tensor(t, k), s.get_tensor(t, k)), (t, k)


def test_the_derived_merged_vector_is_cached_once_per_tensor(small_family, tmp_path: Path) -> None:
    """One task's lossy read derives the merged vector; the next task's read takes it from the
    cache (keyed by tensor name, apart from stored arrays); without a cache the answers are the same."""
    out = tmp_path / "d.tallpack"
    _pack(small_family["base_path"], small_family["task_paths"], out, chunk_elements=64)
    with tallpack.open(out) as fam, tallpack.open(out, cache_bytes=0) as bare:
        first = fam.state_dict("a")
        keys = {k for k in fam._cache._items if k[0] == "derived-merged"}
        assert keys == {("derived-merged", "body.w", "merged", None), ("derived-merged", "body.b", "merged", None)}
        hits = fam._cache.hits
        second = fam.state_dict("b")
        assert fam._cache.hits >= hits + 2
        for t, sd in (("a", first), ("b", second)):
            other = bare.state_dict(t)
            assert all(_same(sd[k], other[k]) for k in sd)
        e = next(x for x in fam.manifest.tensors if x.name == "body.w")
        ref = merged_source(e)
        assert isinstance(ref, DerivedMerged)
        out_copy = fam.read_array(ref, "body.w (merged)")  # Use.OUTPUT: the caller's own tensor
        out_copy.zero_()
        assert not torch.equal(fam.read_array(ref, "body.w (merged)", Use.SHARED_INPUT), out_copy)


def test_a_reader_without_tall_derived_merged_reads_the_rest(small_family, tmp_path: Path, monkeypatch) -> None:
    """§8: a 1.6 reader opens a 1.8 archive and fails only on the tensors whose merged vector is derived."""
    out = tmp_path / "d.tallpack"
    _pack(small_family["base_path"], small_family["task_paths"], out, chunk_elements=64)
    monkeypatch.delitem(encodings.REGISTRY, DM)
    with tallpack.open(out) as fam:
        assert _same(fam.get_tensor("a", "head.w"), small_family["tasks"]["a"]["head.w"])
        assert _same(fam.get_tensor("a", "frozen"), small_family["tasks"]["a"]["frozen"])
        with pytest.raises(tallpack.UnsupportedVersionError, match=DM):
            fam.get_tensor("a", "body.w")


def test_store_merged_option_keeps_format_1_6(small_family, tmp_path: Path) -> None:
    """``pack --exact --store-merged``: merged vectors stored (format 1.6), the same reads."""
    stored, derived = tmp_path / "s.tallpack", tmp_path / "d.tallpack"
    # zstd: the version is the features' alone
    cli_pack(small_family, stored, "--exact", "--store-merged", "--chunk-elements", "64", "--codec", "zstd")
    tallpack.pack(small_family["base_path"], small_family["task_paths"], derived, exact=True, chunk_elements=64,
                  codec="zstd")
    with tallpack.open(stored) as s, tallpack.open(derived) as d:
        assert s.format_version == exact_version(s, 6) and d.format_version == exact_version(d, 8)
        assert DM not in _encodings(s) and DM in _encodings(d)
        for t in s.tasks:
            for k in s.keys(t):
                assert _same(s.get_tensor(t, k), d.get_tensor(t, k)), (t, k)
                assert _same(d.get_tensor(t, k, exact=True), small_family["tasks"][t][k]), (t, k)


@pytest.fixture(scope="module")
def derived_path(tmp_path_factory) -> Path:
    base, tasks = exact_family()
    out = tmp_path_factory.mktemp("derived_merged") / "d.tallpack"
    _pack(base, tasks, out, merge="ties")
    return out


def _manifest(raw: bytes) -> dict:
    m_off, m_len, *_ = FOOTER.unpack(raw[-FOOTER.size:])
    return json.loads(zstandard.ZstdDecompressor().decompress(raw[m_off:m_off + m_len]))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_derived_merged_entries_raise_only_tallpack_errors(derived_path, tmp_path, data) -> None:
    """Hostile tall-derived-merged tensors (task fields, the tensor's arrays, the merge parameters):
    every read works or raises a TallpackError."""
    derived_bytes = derived_path.read_bytes()
    manifest = _manifest(derived_bytes)
    tensors = [e for e in manifest["tensors"] if any(tt["encoding"] == DM for tt in e["tasks"].values())]
    assert tensors
    targets = [*tensors, *(tt for e in tensors for tt in e["tasks"].values()), manifest["merge"]]
    for _ in range(data.draw(st.integers(1, 3))):
        target = data.draw(st.sampled_from(targets))
        path = data.draw(st.sampled_from([p for p in paths(target) if p] + [("merged",), ("counts",), ("encoding",)]))
        for key in path[:-1]:
            target = target[key]
        if data.draw(st.booleans()) and isinstance(target, dict):
            target.pop(path[-1], None)
        else:
            target[path[-1]] = data.draw(json_values | st.sampled_from(["tall", "tall-derived", DM, "base"]))
    read_mutated(tmp_path, derived_bytes, manifest, exact=True)


def test_malformed_derived_merged_tensors_are_refused(derived_path, tmp_path) -> None:
    """A tensor mixing tall-derived-merged with other encodings, one that still stores a merged
    vector, or TIES parameters for another number of tasks: FormatError, never a wrong tensor."""
    derived_bytes = derived_path.read_bytes()

    def edit(fn) -> Path:
        m = _manifest(derived_bytes)
        e = next(x for x in m["tensors"] if any(tt["encoding"] == DM for tt in x["tasks"].values()))
        fn(m, e)
        p = tmp_path / "m.tallpack"
        p.write_bytes(with_manifest(derived_bytes, m))
        return p

    mixed = edit(lambda m, e: e["tasks"]["a"].update(encoding="tall-derived"))
    with pytest.raises(tallpack.FormatError):
        tallpack.open(mixed)
    stored = edit(lambda m, e: e.update(merged=e["base"] if e["base"]["dtype"] == "float32" else e["base"]))
    with pytest.raises(tallpack.FormatError, match="stores no merged"):
        tallpack.open(stored)
    fewer = edit(lambda m, e: m["merge"].update(thresholds=m["merge"]["thresholds"][:2]))
    with tallpack.open(fewer) as fam:
        with pytest.raises(tallpack.FormatError, match="thresholds"):
            fam.state_dict("a")
