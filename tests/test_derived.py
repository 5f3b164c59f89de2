"""Derived masks (format 1.6): where the exact tier codes a residual against the base, the mask is
not stored but derived from the original; every read must see exactly what a stored mask gives."""

from __future__ import annotations

import contextlib
import dataclasses
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
from tallpack.encodings import exact as exact_mod
from tallpack.encodings.derived import derive_mask, has_mask, task_mask
from tallpack.encodings.base import Use

from strategies import families
from tallpack.container import FOOTER
from test_fuzz import json_values, paths, with_manifest


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and _bits(a) == _bits(b)


@contextlib.contextmanager
def _policy(value: str):
    old, exact_mod.MASK_POLICY = exact_mod.MASK_POLICY, value
    try:
        yield
    finally:
        exact_mod.MASK_POLICY = old


def _pack(base, tasks, out: Path, policy: str | None, **kw) -> None:
    """Pack without the exact tier (``policy`` None) or with it under a mask policy."""
    kw = dict(chunk_elements=16, threads=1, allow_mismatch=True, overwrite=True) | kw
    if policy is None:  # one entry per tensor, as the exact tier writes (no groups), compared by name
        tallpack.pack(base, tasks, out, group=False, **kw)
        return
    with _policy(policy):  # derived masks alone (format 1.6); merged vectors derived too: test_derived_merged.py
        tallpack.pack(base, tasks, out, exact=True, **({"derive_merged": False} | kw))


def _masks(fam) -> dict[tuple[str, str], torch.Tensor]:
    """Every task's mask of every tensor, through the one function that serves stored and derived."""
    return {(t, e.name): task_mask(fam.read_array, e, tt, f"{t}/{e.name}").clone()
            for e in fam.manifest.tensors for t, tt in e.tasks.items() if has_mask(tt)}


def _odd_family() -> tuple[dict, dict]:
    """Ties at the strict '>', signed zeros, subnormals, large values, in float32, bfloat16, float16."""
    g = torch.Generator().manual_seed(3)
    base, tasks = {}, {"x": {}, "y": {}, "z": {}}
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        b = (torch.randn(200, generator=g) * 0.02).to(dt)
        b[:4] = torch.tensor([0.0, -0.0, 1.0, 0.0]).to(dt)
        b[4] = torch.finfo(dt).tiny / 4  # a subnormal
        b[5] = torch.finfo(dt).max / 8
        name = f"w.{str(dt).removeprefix('torch.')}"
        base[name] = b
        for i, t in enumerate(tasks):
            x = (b.float() + torch.randn(200, generator=g) * 0.01 * (i + 1)).to(dt)
            # element 0: tau = 1, 2, 0 give tau_MTL = 3 and, for "x" at lambda 0.5, |1| == 0.5 * |3 - 1|
            x[0] = float([1, 2, 0][i])
            x[1] = -0.0
            x[2] = b[2]  # unchanged: tau_t = 0
            x[4] = -b[4]
            tasks[t][name] = x
    return base, tasks


@pytest.mark.parametrize("merge", ["ta", {"method": "ties", "top_k": 0.3}])
def test_derived_masks_equal_stored_ones_on_odd_values(tmp_path: Path, merge) -> None:
    base, tasks = _odd_family()
    lambdas = {"x": 0.5, "y": 0.3, "z": 0.4}
    plain, derived = tmp_path / "p.tallpack", tmp_path / "d.tallpack"
    _pack(base, tasks, plain, None, merge=merge, lambdas=lambdas)
    _pack(base, tasks, derived, "derive", merge=merge, lambdas=lambdas)
    with tallpack.open(plain) as p, tallpack.open(derived) as d:
        assert d.format_version == written(6)
        assert {tt.encoding for e in d.manifest.tensors for tt in e.tasks.values()} == {"tall-derived"}
        want, got = _masks(p), _masks(d)
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
        assert not got[("x", "w.float32")][0]  # the tie: strict '>' leaves the bit unset
        for t in p.tasks:
            for k in p.keys(t):
                assert _same(d.get_tensor(t, k), p.get_tensor(t, k)), (t, k)
                assert _same(d.get_tensor(t, k, exact=True), tasks[t][k]), (t, k)
                assert _same(d.get_slice(t, k)[3:9], p.get_slice(t, k)[3:9]), (t, k)
        assert d.verify() == []


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(families(max_tasks=3, max_tensors=3), st.sampled_from(["choose", "derive", "store"]),
       st.sampled_from(["ta", "ties"]))
def test_random_families_with_derived_masks(tmp_path: Path, fam_, policy: str, merge: str) -> None:
    """Exact round trip; lossy reads bit-identical to an archive without the exact tier; every
    mask (derived or stored) equal to the stored one."""
    base, tasks = fam_
    plain, exact = tmp_path / "p.tallpack", tmp_path / "e.tallpack"
    _pack(base, tasks, plain, None, merge=merge)
    _pack(base, tasks, exact, policy, merge=merge)
    with tallpack.open(plain) as p, tallpack.open(exact) as e:
        want, got = _masks(p), _masks(e)
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
        encs = {tt.encoding for x in e.manifest.tensors for tt in x.tasks.values()}
        assert ("tall" not in encs) if policy == "derive" else ("tall-derived" not in encs) if policy == "store" else True
        for t, sd in tasks.items():
            lossy, lossy_e, orig = p.state_dict(t), e.state_dict(t), e.state_dict(t, exact=True)
            for k, v in sd.items():
                assert _same(lossy_e[k], lossy[k]), (t, k)
                assert _same(orig[k], v), (t, k)


def test_hash_is_checked_before_the_mask_is_derived(small_family, tmp_path: Path) -> None:
    """A residual that decodes (its chunk checksum intact) but to other bits fails on the original's
    hash, and a manifest whose ``ones`` disagrees with the derived mask fails too."""
    out = tmp_path / "d.tallpack"
    _pack(small_family["base_path"], small_family["task_paths"], out, "derive", chunk_elements=64)
    with tallpack.open(out) as fam:
        e = next(x for x in fam.manifest.tensors if x.name == "body.w")
        tt = e.tasks["a"]
        residual = tt.extras["exact"].residual

        def tampered(ref, where, use=Use.OUTPUT):
            t = fam.read_array(ref, where, use)  # (a residual as its reader reads it: torch 2.1 has no uint32 tensors)
            if ref is residual:
                t = t.clone()
                t.view(-1).view(torch.uint8)[5 * t.element_size()] ^= 1  # (bytes: torch 2.3 has no uint32 xor)
            return t

        with pytest.raises(tallpack.IntegrityError, match="hash"):
            task_mask(tampered, e, tt, "body.w")
        wrong = dataclasses.replace(tt, params=tt.params | {"ones": tt.params["ones"] + 1})
        with pytest.raises(tallpack.IntegrityError, match="set bits"):
            task_mask(fam.read_array, e, wrong, "body.w")
        assert int(task_mask(fam.read_array, e, tt, "body.w").sum()) == tt.params["ones"]


def test_stats_merge_inspect_verify_on_derived_masks(small_family, tmp_path: Path) -> None:
    """Everything that needs masks gets the derived ones: the same answers as stored masks."""
    plain, derived = tmp_path / "p.tallpack", tmp_path / "d.tallpack"
    _pack(small_family["base_path"], small_family["task_paths"], plain, "store", chunk_elements=64)
    _pack(small_family["base_path"], small_family["task_paths"], derived, "derive", chunk_elements=64)
    with tallpack.open(plain) as p, tallpack.open(derived) as d:
        assert stats.compute(d).to_dict() == stats.compute(p).to_dict()
        for model in ("consensus-ta", "ta"):
            mp, md = p.merged(model, alpha=0.4), d.merged(model, alpha=0.4)  # consensus: the default k = 2
            assert mp.keys() == md.keys() and all(_same(mp[k], md[k]) for k in mp)
        sp, sd = p.summary(), d.summary()
        assert [t["density"] for t in sd["tasks"]] == [t["density"] for t in sp["tasks"]]
        assert all(t["stored"].get("derived") == 2 and t["mask_bytes"] == 0 for t in sd["tasks"])
        assert "masks derived from the exact originals, not stored: 6 of 6" in report.render(sd)
        assert d.verify() == []
        assert d.size < p.size


def test_a_reader_without_tall_derived_reads_the_rest(small_family, tmp_path: Path, monkeypatch) -> None:
    """§8: a new encoding fails only on the tensors that use it (a 1.5 reader opens a 1.6 archive)."""
    out = tmp_path / "d.tallpack"
    _pack(small_family["base_path"], small_family["task_paths"], out, "derive", chunk_elements=64)
    monkeypatch.delitem(encodings.REGISTRY, "tall-derived")
    with tallpack.open(out) as fam:
        assert _same(fam.get_tensor("a", "head.w"), small_family["tasks"]["a"]["head.w"])
        with pytest.raises(tallpack.UnsupportedVersionError, match="tall-derived"):
            fam.get_tensor("a", "body.w")


def test_derive_mask_is_the_packers_formula() -> None:
    theta = torch.tensor([1.0, 0.1, -0.0, 3.0], dtype=torch.bfloat16)
    base = torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.bfloat16)
    merged = torch.tensor([3.0, 2.0, 0.0, 2.0])
    # |tau| = 1, 0.1, 0, 2 against 0.5 * |merged - tau| = 1, 0.95, 0, 0: the tie is not kept
    assert derive_mask(theta, base, merged, 0.5).tolist() == [False, False, False, True]


@pytest.fixture(scope="module")
def derived_bytes(tmp_path_factory) -> bytes:
    base, tasks = exact_family()
    out = tmp_path_factory.mktemp("derived") / "d.tallpack"
    _pack(base, tasks, out, "derive", merge="ties")
    return out.read_bytes()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_derived_entries_raise_only_tallpack_errors(derived_bytes, tmp_path, data) -> None:
    """Hostile tall-derived entries (lambda, ones, exact field, encoding): every read works or raises
    a TallpackError."""
    m_off, m_len, *_ = FOOTER.unpack(derived_bytes[-FOOTER.size:])
    manifest = json.loads(zstandard.ZstdDecompressor().decompress(derived_bytes[m_off:m_off + m_len]))
    entries = [tt for e in manifest["tensors"] for tt in e["tasks"].values() if tt["encoding"] == "tall-derived"]
    assert entries
    for _ in range(data.draw(st.integers(1, 3))):
        tt = data.draw(st.sampled_from(entries))
        path = data.draw(st.sampled_from([p for p in paths(tt) if p]))
        target = tt
        for key in path[:-1]:
            target = target[key]
        if data.draw(st.booleans()) and isinstance(target, dict):
            target.pop(path[-1], None)
        else:
            target[path[-1]] = data.draw(json_values | st.sampled_from(["tall", "base", "zero", "tall-derived"]))
    p = tmp_path / "m.tallpack"
    p.write_bytes(with_manifest(derived_bytes, manifest))
    try:
        with tallpack.open(p) as fam:
            for t in fam.tasks:
                fam.state_dict(t)
                fam.state_dict(t, exact=True)
            fam.verify()
            stats.compute(fam)
            fam.merged("consensus-ties", k=1)
    except tallpack.TallpackError:
        pass


def test_store_masks_option_keeps_format_1_3(small_family, tmp_path: Path) -> None:
    """``derive_masks=False`` (``pack --exact --store-masks``): every mask stored, the 1.3 format, the
    same lossy and exact reads."""
    stored, derived = tmp_path / "s.tallpack", tmp_path / "d.tallpack"
    # zstd: the version is the features' alone
    cli_pack(small_family, stored, "--exact", "--store-masks", "--chunk-elements", "64", "--codec", "zstd")
    tallpack.pack(small_family["base_path"], small_family["task_paths"], derived, exact=True, chunk_elements=64,
                  derive_merged=False, codec="zstd")
    with tallpack.open(stored) as s, tallpack.open(derived) as d:
        assert s.format_version == exact_version(s, 3) and d.format_version == exact_version(d, 6)
        assert {tt.encoding for e in s.manifest.tensors for tt in e.tasks.values()} == {"tall", "dense", "shared"}
        assert "tall-derived" in {tt.encoding for e in d.manifest.tensors for tt in e.tasks.values()}
        for t in s.tasks:
            for k in s.keys(t):
                assert _same(s.get_tensor(t, k), d.get_tensor(t, k)), (t, k)
                assert _same(s.get_tensor(t, k, exact=True), small_family["tasks"][t][k]), (t, k)


_SPECIAL = [0.0, -0.0, 1e-40, -1e-40, 1.0, -1.0, 3e38, float("inf"), float("-inf"), float("nan")]


@settings(max_examples=60, deadline=None)
@given(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), st.integers(0, 300),
       st.floats(0, 4, allow_nan=False), st.integers(0, 2**32 - 1))
def test_derive_mask_has_the_formulas_bits(dtype: torch.dtype, n: int, lam: float, seed: int) -> None:
    """``derive_mask`` (one compiled pass where it can: verify and lossy reads derive every mask
    with it) gives the bits of ``tall_mask(task_vector(theta, base), merged, lambda)``, the
    spec's float32 operations, on any values (ties, signed zeros, subnormals, inf, NaN)."""
    from tallpack.tall import tall_mask, task_vector

    g = torch.Generator().manual_seed(seed)
    pick = lambda: torch.tensor(_SPECIAL)[torch.randint(len(_SPECIAL), (n,), generator=g)]  # noqa: E731
    base = torch.where(torch.rand(n, generator=g) < 0.2, pick(), torch.randn(n, generator=g) * 0.02).to(dtype)
    theta = torch.where(torch.rand(n, generator=g) < 0.2, pick(), base.float() + torch.randn(n, generator=g) * 0.01)
    merged = torch.where(torch.rand(n, generator=g) < 0.2, pick(), torch.randn(n, generator=g) * 0.03)
    theta = theta.to(dtype)
    want = tall_mask(task_vector(theta, base), merged, lam)
    assert torch.equal(derive_mask(theta, base, merged, lam), want)
    assert torch.equal(derive_mask(theta.reshape(-1, 1), base.reshape(-1, 1), merged.reshape(-1, 1), lam),
                       want.reshape(-1, 1))


@pytest.mark.parametrize("derive_merged", [True, False], ids=["merged-derived", "merged-stored"])
def test_verify_checks_each_derived_mask_on_the_original_it_rebuilt(small_family, tmp_path: Path,
                                                                   derive_merged: bool) -> None:
    """verify rebuilds each original once: the masks derived from it are checked as it is rebuilt
    for its file's hash, not in a second pass that rebuilds every original again (where the
    tasks' files list their tensors in the same order, none is left for one)."""
    out = tmp_path / "d.tallpack"
    _pack(small_family["base_path"], small_family["task_paths"], out, "derive", chunk_elements=64,
          derive_merged=derive_merged)
    calls: list[tuple[str, int, int]] = []
    with tallpack.open(out) as fam:
        derived = [tt.encoding for e in fam.manifest.tensors for tt in e.tasks.values()
                   if tt.encoding in ("tall-derived", "tall-derived-merged")]
        assert derived.count("tall-derived-merged" if derive_merged else "tall-derived") >= 6
        assert fam.verify(progress=lambda *step: calls.append(step)) == []
        tensors = sum(len(fam.keys(t)) for t in fam.tasks)
    assert [c for c in calls if c[0] == "checking derived masks"] == []
    assert [c for c in calls if c[0] == "checking originals"][-1] == ("checking originals", tensors, tensors)


def test_verify_checks_derived_masks_against_the_manifest(small_family, tmp_path: Path) -> None:
    """verify derives every derived mask and compares its set bits with the manifest's ``ones``."""
    import json

    import zstandard
    from test_fuzz import FOOTER, with_manifest

    out = tmp_path / "d.tallpack"
    _pack(small_family["base_path"], small_family["task_paths"], out, "derive", chunk_elements=64)
    with tallpack.open(out) as fam:
        assert fam.verify() == []
    raw = out.read_bytes()
    m_off, m_len, *_ = FOOTER.unpack(raw[-FOOTER.size:])
    manifest = json.loads(zstandard.ZstdDecompressor().decompress(raw[m_off:m_off + m_len]))
    entry = next(e for e in manifest["tensors"] if e["name"] == "body.w")
    assert entry["tasks"]["a"]["encoding"] != "tall"
    entry["tasks"]["a"]["ones"] += 1
    (tmp_path / "w.tallpack").write_bytes(with_manifest(raw, manifest))
    with tallpack.open(tmp_path / "w.tallpack") as fam:
        problems = fam.verify()
    assert any("task 'a', tensor 'body.w'" in p and "set bits" in p for p in problems), problems
