"""The exact tier: every original bit and file comes back (issue 9)."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tallpack
from tallpack.encodings import exact as exact_mod
from tallpack.encodings.exact import forward, inverse, permute, unpermute

from strategies import families
from conftest import load_folder, written

FLOATS = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
FLOATS += [getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n)]
INTS = [torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool]


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and _bits(a) == _bits(b)


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.mark.parametrize("transform", ["sub", "xor"])
@pytest.mark.parametrize("dtype,n", [("bfloat16", 2), ("float16", 2), ("float8_e5m2", 1), ("float32", 4)])
def test_transforms_invert_on_every_bit_pattern(transform: str, dtype: str, n: int) -> None:
    u = {1: np.uint8, 2: np.uint16, 4: np.uint32}[n]
    rng = np.random.default_rng(0)
    if n <= 2:  # every pattern against random references, and every reference against random originals
        x = np.arange(1 << (8 * n), dtype=np.uint64).astype(u)
    else:
        x = rng.integers(0, 1 << 32, 1 << 16, dtype=np.uint64).astype(u)
    r = rng.permutation(x)
    for a, b in ((x, r), (r, x), (x, x)):
        z = forward(a, b, transform)
        s = permute(z, b, dtype, "exponent", 1000)
        assert np.array_equal(inverse(unpermute(s, b, dtype, "exponent", 1000), b, transform), a)
    assert not forward(x, x, transform).any()


def _special(dtype: torch.dtype, shape, g) -> torch.Tensor:
    """Random values with -0.0, subnormals and (for types that have them) extremes."""
    x = torch.randn(shape, generator=g) * 0.05
    flat = x.reshape(-1)  # set in float32, then cast (each exactly): torch 2.1 cannot fill float8 elements
    flat[0] = -0.0
    flat[1] = 0.0
    flat[2] = torch.finfo(dtype).tiny / 4  # a subnormal
    flat[3] = -torch.finfo(dtype).smallest_normal / 2
    return x.to(dtype)


def _family(dtypes, root: Path, specials: bool = True):
    g = torch.Generator().manual_seed(3)
    base = {f"w.{str(d)[6:]}": _special(d, (37, 11), g) for d in dtypes}
    base |= {f"i.{str(d)[6:]}": torch.randint(0, 2, (9,), generator=g).to(d) for d in INTS}
    base["nan.weight"] = torch.randn(20, generator=g)
    fts = {}
    for k, t in enumerate(["a", "b", "c"]):
        sd = {}
        for name, x in base.items():
            if x.is_floating_point():
                y = x.to(torch.float32) + 0.01 * torch.randn(x.shape, generator=g)
                y.reshape(-1)[0] = -0.0 if k else 0.0  # signed zeros where the base has -0.0
                y.reshape(-1)[5] = x.reshape(-1)[2].float()  # a subnormal (exactly: set in float32, as _special)
                sd[name] = y.to(x.dtype)
            else:
                sd[name] = (x.to(torch.int64) + k).to(x.dtype) if x.dtype != torch.bool else x ^ (k == 1)
        # NaN with payloads, infinities: stored per task, exactly
        nan = sd["nan.weight"].clone()
        nan.view(torch.int32)[:3] = torch.tensor([0x7FC00001, 0x7F800123, -0x00400001], dtype=torch.int32)
        nan[3], nan[4] = float("inf"), float("-inf")
        sd["nan.weight"] = nan
        fts[t] = sd
    return base, fts


def test_every_dtype_and_special_value_round_trips(tmp_path: Path) -> None:
    base, fts = _family(FLOATS, tmp_path)
    out = tmp_path / "f.tallpack"
    tallpack.pack(base, fts, out, exact=True, chunk_elements=64, threads=1)
    with tallpack.open(out) as fam:
        assert fam.format_version == written(8)  # the exact tier (1.2), masks (1.6) and merged vectors (1.8) derived
        assert fam.verify() == []
        refs = set()
        for t, sd in fts.items():
            got = fam.state_dict(t, exact=True)
            assert list(got) == list(sd)
            for k, v in sd.items():
                assert _same(got[k], v), (t, k)
                assert _same(fam.get_tensor(t, k, exact=True), v)
            lossy = fam.state_dict(t)  # the lossy path is unchanged
            assert not all(_same(lossy[k], sd[k]) for k in sd)
        for e in fam.manifest.tensors:
            for tt in e.tasks.values():
                if "exact" in tt.extras:
                    refs.add(tt.extras["exact"].reference)
        assert "tall" in refs or "base" in refs
        kinds = {e.name: e.kind for e in fam.manifest.tensors}
        assert kinds["nan.weight"] == "task-own" and all(kinds[f"w.{str(d)[6:]}"] == "merged" for d in FLOATS)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(families())
def test_random_families_round_trip_exactly(tmp_path: Path, fam_) -> None:
    base, tasks = fam_
    out = tmp_path / "h.tallpack"
    tallpack.pack(base, tasks, out, exact=True, chunk_elements=16, threads=1, allow_mismatch=True, overwrite=True)
    with tallpack.open(out) as fam:
        for t, sd in tasks.items():
            got = fam.state_dict(t, exact=True)
            assert list(got) == list(sd)
            for k, v in sd.items():
                assert _same(got[k], v), (t, k)


def test_single_safetensors_files_come_back_byte_identical(small_family, tmp_path: Path) -> None:
    out = tmp_path / "s.tallpack"
    tallpack.pack(small_family["base_path"], small_family["task_paths"], out, exact=True, chunk_elements=64)
    with tallpack.open(out) as fam:
        for t, src in small_family["task_paths"].items():
            p = tallpack.write_task(fam, t, tmp_path / f"out_{t}", exact=True)
            assert p.name == src.name and _sha(p) == _sha(src)
            assert fam.task_info(t).exact["files"][0]["sha256"] == _sha(src)


@pytest.mark.parametrize("weights", ["safetensors", "bin"])
def test_sharded_folders_come_back_byte_identical(hf_family, tmp_path: Path, weights: str) -> None:
    """Every file of each task's folder comes back: its shards, index and config byte for byte
    from the file records, its tokenizer, generation config and model card from the kept files
    (a .bin folder: its tensors exactly, as model.safetensors, and the same other files)."""
    tasks = {}
    for t, folder in hf_family["tasks"].items():
        tasks[t] = shutil.copytree(folder, tmp_path / "in" / t)
        (tasks[t] / "tokenizer.json").write_text(json.dumps({"model": {"vocab": {t: 0}}}))
        (tasks[t] / "README.md").write_text(f"# {t}\n")
        if weights == "bin":
            torch.save(load_folder(tasks[t]), tasks[t] / "pytorch_model.bin")
            for p in [*tasks[t].glob("*.safetensors"), tasks[t] / "model.safetensors.index.json"]:
                p.unlink()
    out = tmp_path / "hf.tallpack"
    tallpack.pack(hf_family["base"], tasks, out, exact=True)
    with tallpack.open(out) as fam:
        assert fam.verify() == []
        for t, folder in tasks.items():
            dest = tmp_path / "out" / t
            tallpack.write_task(fam, t, dest, exact=True)
            want = {p.name: _sha(p) for p in folder.iterdir() if weights == "safetensors" or p.suffix != ".bin"}
            got = {p.name: _sha(p) for p in dest.iterdir()}
            assert {"generation_config.json", "tokenizer.json", "README.md", "config.json"} <= set(want)
            if weights == "safetensors":
                assert len(want) > 6 and "model.safetensors.index.json" in want
                assert got == want
            else:
                assert got.pop("model.safetensors") and got == want
                original = torch.load(folder / "pytorch_model.bin", weights_only=True)
                rebuilt = load_folder(dest)
                assert set(rebuilt) == set(original) and all(_same(rebuilt[k], v) for k, v in original.items())


def test_pickle_inputs_give_exact_tensors(small_family, tmp_path: Path) -> None:
    paths = {}
    for t, sd in small_family["tasks"].items():
        paths[t] = tmp_path / f"{t}.pt"
        torch.save(sd, paths[t])
    out = tmp_path / "p.tallpack"
    tallpack.pack(small_family["base_path"], paths, out, exact=True, chunk_elements=64)
    with tallpack.open(out) as fam:
        assert fam.verify() == []
        rec = fam.task_info("a").exact["files"][0]
        assert rec["role"] == "torch" and rec["sha256"] == _sha(paths["a"])
        p = tallpack.write_task(fam, "a", tmp_path / "out", exact=True)
        from safetensors.torch import load_file

        got = load_file(p)
        for k, v in small_family["tasks"]["a"].items():
            assert _same(got[k], v)


def _residual_chunk(fam, encoding: str) -> tuple[str, str, int, int]:
    for e in fam.manifest.tensors:
        for t, tt in e.tasks.items():
            if "exact" in tt.extras and tt.encoding == encoding:
                c = tt.extras["exact"].residual.chunks[0]
                return t, e.name, c.offset, c.nbytes
    raise AssertionError(f"no residual of a {encoding} entry")


@pytest.mark.parametrize("derive", [True, False])
def test_corrupted_residual_fails_verify_and_exact_unpack(small_family, tmp_path: Path, monkeypatch,
                                                           derive: bool) -> None:
    """A damaged residual fails verify and exact reads; the lossy read of its tensor too where the
    mask is derived from the original (format 1.6), and only there."""
    monkeypatch.setattr(exact_mod, "MASK_POLICY", "derive" if derive else "store")
    out = tmp_path / "c.tallpack"  # merged vectors stored (format 1.8's derived ones: test_derived_merged.py)
    tallpack.pack(small_family["base_path"], small_family["task_paths"], out, exact=True, chunk_elements=64,
                  derive_merged=False)
    with tallpack.open(out) as fam:
        task, name, off, n = _residual_chunk(fam, "tall-derived" if derive else "tall")
        intact = fam.state_dict(task)
    data = bytearray(out.read_bytes())
    data[off + n // 2] ^= 0x10
    out.write_bytes(bytes(data))
    with tallpack.open(out) as fam:
        problems = fam.verify()
        assert problems and any("residual" in p for p in problems)
        with pytest.raises(tallpack.IntegrityError):
            for t in fam.tasks:
                tallpack.write_task(fam, t, tmp_path / f"o{t}", exact=True)
        if derive:
            with pytest.raises(tallpack.IntegrityError, match=name):
                fam.get_tensor(task, name)
        else:  # the lossy tier does not read the residual
            assert _same(fam.get_tensor(task, name), intact[name])
        for k in fam.keys(task):
            if k != name:
                assert _same(fam.get_tensor(task, k), intact[k])


def test_archive_without_the_tier_says_so(small_family, tmp_path: Path) -> None:
    out = tmp_path / "n.tallpack"
    tallpack.pack(small_family["base_path"], small_family["task_paths"], out, chunk_elements=64)
    with tallpack.open(out) as fam:
        assert fam.format_version == written(12)  # no exact tier; the default codec, small tensors grouped
        for call in (lambda: fam.state_dict("a", exact=True), lambda: fam.get_tensor("a", "head.w", exact=True),
                     lambda: tallpack.write_task(fam, "a", tmp_path / "x", exact=True)):
            with pytest.raises(tallpack.ExactTierMissingError, match="packed without --exact; repack with --exact"):
                call()
    r = subprocess.run([sys.executable, "-m", "tallpack", "unpack", str(out), "--task", "a", "--exact",
                        "-o", str(tmp_path / "y")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "packed without --exact" in r.stderr


def test_cli_pack_unpack_verify_exact(small_family, tmp_path: Path) -> None:
    out = tmp_path / "cli.tallpack"
    tasks = [f"{t}={p}" for t, p in small_family["task_paths"].items()]
    # in this process (click's runner): `pack --exact` in a process of its own is test_derived's
    # test_store_masks_option_keeps_format_1_3 (conftest.cli_pack)
    from click.testing import CliRunner
    from tallpack_cli.main import main

    run = lambda *a: CliRunner().invoke(main, [*a], catch_exceptions=False)
    r = run("pack", "--exact", "--base", str(small_family["base_path"]), *sum((["--task", t] for t in tasks), []),
            "-o", str(out), "--chunk-elements", "64")
    assert r.exit_code == 0, r.output
    r = run("unpack", str(out), "--task", "b", "--exact", "-o", str(tmp_path / "b"))
    assert r.exit_code == 0, r.output
    assert _sha(tmp_path / "b" / "b.safetensors") == _sha(small_family["task_paths"]["b"])
    r = run("verify", str(out))
    assert r.exit_code == 0 and r.stdout.startswith("ok"), r.output
    manifest = json.loads(json.dumps(tallpack.open(out).manifest.to_dict()))
    assert manifest["format_version"] == list(written(8))  # the exact tier with derived masks and merged vectors


def test_writer_keeps_planes_where_it_codes_smaller(tmp_path: Path) -> None:
    """Per task and tensor, the smaller residual codec: ``bitsplit`` (format 1.9) where the low bits
    are noise, byte planes where they are not (float32 weights that are bfloat16 values: the low
    16 bits of every residual are zero, which planes code to nothing and bitsplit would store)."""
    g = torch.Generator().manual_seed(5)
    base = {"noise": torch.randn(64, 64, generator=g), "rounded": torch.randn(64, 64, generator=g).bfloat16().float()}
    tasks = {t: {"noise": base["noise"] + 1e-3 * torch.randn(64, 64, generator=g),
                 "rounded": (base["rounded"] + 1e-2 * torch.randn(64, 64, generator=g)).bfloat16().float()}
             for t in "ab"}
    out = tmp_path / "p.tallpack"
    tallpack.pack(base, tasks, out, exact=True, codec="zstd")
    with tallpack.open(out) as fam:
        chosen = {(e.name, c["id"]) for e in fam.manifest.tensors for tt in e.tasks.values()
                  for c in tt.extras["exact"].residual.codecs}
        assert chosen == {("noise", "bitsplit"), ("rounded", "planes")}
        assert fam.format_version == (1, 9)
        for t, sd in tasks.items():
            assert all(_same(fam.get_tensor(t, k, exact=True), v) for k, v in sd.items())


def test_a_shard_size_with_the_exact_tier_is_refused(small_family, tmp_path: Path) -> None:
    """The originals come back as they were sharded: a --max-shard-size would do nothing, so it is
    an error (before anything is written), not ignored."""
    from click.testing import CliRunner
    from tallpack_cli.main import main

    out = tmp_path / "e.tallpack"
    tallpack.pack(small_family["base_path"], small_family["task_paths"], out, exact=True)
    with tallpack.open(out) as fam:
        for call in (lambda: tallpack.write_task(fam, "a", tmp_path / "a", exact=True, max_shard_size="1MB"),
                     lambda: tallpack.write_tasks(fam, None, tmp_path / "all", exact=True, max_shard_size="1MB")):
            with pytest.raises(tallpack.InvalidArgumentError, match="no effect with exact=True"):
                call()
    r = CliRunner().invoke(main, ["unpack", str(out), "--task", "a", "--exact", "--max-shard-size", "1MB",
                                  "-o", str(tmp_path / "c")])
    assert r.exit_code == 1 and r.output.count("\n") == 1 and "--max-shard-size" in r.output, r.output
    assert not any(tmp_path.glob("a")) and not (tmp_path / "all").exists() and not (tmp_path / "c").exists()


def test_a_residual_that_passes_its_checksum_but_not_the_hash_is_said_once_with_the_archive(small_family,
                                                                                              tmp_path: Path) -> None:
    """Damage the chunk checksum cannot see (the checksum rewritten with it): the original's hash
    catches it, in one line that names the archive, in verify as in exact reads."""
    import xxhash
    import zstandard

    from tallpack.container import FOOTER
    from test_fuzz import with_manifest

    out = tmp_path / "c.tallpack"
    tallpack.pack(small_family["base_path"], small_family["task_paths"], out, exact=True, codec="raw", group=False)
    raw = bytearray(out.read_bytes())
    m_off, m_len, *_ = FOOTER.unpack(bytes(raw[-FOOTER.size:]))
    manifest = json.loads(zstandard.ZstdDecompressor().decompress(bytes(raw[m_off:m_off + m_len])))
    entry = next(e for e in manifest["tensors"] if e["name"] == "body.w")
    chunk = entry["tasks"]["b"]["exact"]["residual"]["chunks"][0]
    raw[chunk[0] + chunk[1] - 1] ^= 0x01  # raw codec: still decodes, to other bits
    chunk[2] = xxhash.xxh3_64_intdigest(bytes(raw[chunk[0]:chunk[0] + chunk[1]]))
    bad = tmp_path / "bad.tallpack"
    bad.write_bytes(with_manifest(bytes(raw), manifest))
    with tallpack.open(bad) as fam:
        with pytest.raises(tallpack.IntegrityError, match=rf"^{bad}: .*'body.w'.*original's hash"):
            fam.get_tensor("b", "body.w", exact=True)
        problems = fam.verify()
    assert len(problems) == 1 and problems[0].startswith(f"{bad}: ") and "original's hash" in problems[0], problems


def _to_bin_shards(folder: Path) -> dict:
    """Turn a sharded safetensors folder into ``pytorch_model-0000i-of-0000N.bin`` shards and
    their index, as older transformers saved; returns the tensors."""
    from safetensors.torch import load_file

    index = json.loads((folder / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    weight_map, tensors = {}, {}
    for i, f in enumerate(files, 1):
        sd = load_file(folder / f)
        name = f"pytorch_model-{i:05d}-of-{len(files):05d}.bin"
        torch.save(sd, folder / name)
        weight_map |= dict.fromkeys(sd, name)
        tensors |= sd
        (folder / f).unlink()
    (folder / "model.safetensors.index.json").unlink()
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": index["metadata"],
                                                                     "weight_map": weight_map}))
    return tensors


def test_sharded_pickles_come_back_sharded_exactly(hf_family, tmp_path: Path) -> None:
    """A folder of pytorch_model-*.bin shards cannot be rebuilt byte for byte: its exact tensors
    come back in the safetensors shards a lossy unpack writes (not one file of the whole model),
    or in shards of max_shard_size; a safetensors task refuses max_shard_size, saying why."""
    from safetensors.torch import load_file

    folder = shutil.copytree(hf_family["tasks"]["cars"], tmp_path / "in" / "cars")
    original = _to_bin_shards(folder)
    n = len(list(folder.glob("pytorch_model-*.bin")))
    assert n > 2
    out = tmp_path / "bin.tallpack"
    tallpack.pack(hf_family["base"], {"cars": folder, "dtd": hf_family["tasks"]["dtd"]}, out, exact=True)
    with tallpack.open(out) as fam:
        tallpack.write_task(fam, "cars", tmp_path / "lossy")
        tallpack.write_task(fam, "cars", tmp_path / "exact", exact=True)
        lossy = sorted(p.name for p in (tmp_path / "lossy").iterdir())
        assert sorted(p.name for p in (tmp_path / "exact").iterdir()) == lossy
        assert "model.safetensors.index.json" in lossy and len([x for x in lossy if x.startswith("model-")]) == n
        got = load_folder(tmp_path / "exact")
        assert set(got) == set(original) and all(_same(got[k], v) for k, v in original.items())
        assert _sha(tmp_path / "exact" / "config.json") == _sha(folder / "config.json")

        limit = max(v.numel() * v.element_size() for v in original.values())
        tallpack.write_tasks(fam, ["cars"], tmp_path / "small", exact=True, max_shard_size=limit)
        shards = sorted((tmp_path / "small" / "cars").glob("model-*.safetensors"))
        assert len(shards) > n
        for p in shards:
            assert sum(v.numel() * v.element_size() for v in load_file(p).values()) <= limit
        got = load_folder(tmp_path / "small" / "cars")
        assert set(got) == set(original) and all(_same(got[k], v) for k, v in original.items())

        with pytest.raises(tallpack.InvalidArgumentError, match="task 'dtd'.*come back byte for byte"):
            tallpack.write_tasks(fam, None, tmp_path / "all", exact=True, max_shard_size="1MB")
        assert not (tmp_path / "all").exists()


def test_verify_shows_progress_while_it_checks_the_originals(small_family, tmp_path: Path) -> None:
    """verify's long part, rebuilding every original (safetensors files and a pickle's tensors)
    and the masks derived from them, has progress steps of its own, ending at its total; -q
    shows none."""
    from click.testing import CliRunner
    from tallpack_cli.main import main

    paths = dict(small_family["task_paths"])
    paths["a"] = tmp_path / "a.pt"
    torch.save(small_family["tasks"]["a"], paths["a"])
    out = tmp_path / "v.tallpack"
    tallpack.pack(small_family["base_path"], paths, out, exact=True, chunk_elements=64)
    calls: list[tuple[str, int, int]] = []
    with tallpack.open(out) as fam:
        assert fam.verify(progress=lambda *step: calls.append(step)) == []
        tensors, chunks = sum(len(fam.keys(t)) for t in fam.tasks), fam.chunk_count()
    checking = [(done, total) for desc, done, total in calls if desc == "checking originals"]
    assert checking == [(i, tensors) for i in range(1, tensors + 1)]
    assert calls.index(("checking originals", 1, tensors)) > max(i for i, c in enumerate(calls) if c[0] == "verifying")
    derived = [(done, total) for desc, done, total in calls if desc == "checking derived masks"]
    assert not derived or derived[-1][0] == derived[-1][1]
    r = CliRunner().invoke(main, ["verify", str(out)])
    assert r.exit_code == 0 and f"checking originals: {tensors}/{tensors}\n" in r.output, r.output
    r = CliRunner().invoke(main, ["-q", "verify", str(out)])
    assert r.exit_code == 0 and r.output == f"ok: {out}: {chunks} chunks intact\n", r.output


_SPECIAL_F32 = [0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-45, -1e-45, 1e-38, 3e38, -3e38]


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 300), st.floats(0, 4, width=32), st.integers(0, 2**32 - 1), st.booleans())
def test_the_exact_tiers_masks_are_tall_masks_bits(n, lam, seed, specials):
    """The references' masks (one compiled pass where it applies) have ``tall.tall_mask``'s bits,
    for any values: signed zeros, subnormals, infinities, NaN."""
    from tallpack.tall import tall_mask
    rng = np.random.default_rng(seed)
    tau, merged = (torch.from_numpy(rng.normal(0, 0.01, n).astype(np.float32)) for _ in range(2))
    if specials and n:
        for t in (tau, merged):
            t[rng.integers(0, n, n // 3 + 1)] = torch.tensor(rng.choice(_SPECIAL_F32, n // 3 + 1), dtype=torch.float32)
    assert torch.equal(exact_mod._mask(tau, merged, lam), tall_mask(tau, merged, lam))
    wide = tau.to(torch.float64)  # another dtype: the torch formula
    assert torch.equal(exact_mod._mask(wide, merged.to(torch.float64), lam), tall_mask(wide, merged.to(torch.float64), lam))


def test_exact_archives_do_not_depend_on_threads_or_the_compiled_loops(tmp_path: Path) -> None:
    """The residual work runs on the pack's threads (references, trial codings, residuals, their
    chunks' encodings): the archive is byte for byte that of one thread; a process without the
    compiled loops stores the same chunks (their numpy fallbacks give the same bytes; only the
    fidelity figures, summed in another order, differ in the last digits)."""
    base, fts = _family(FLOATS, tmp_path)
    fts["d"] = {k: v.clone() for k, v in fts["a"].items()}
    outs = {}
    for threads in (1, 3):
        outs[threads] = tmp_path / f"t{threads}.tallpack"
        tallpack.pack(base, fts, outs[threads], exact=True, chunk_elements=64, threads=threads)
    assert outs[1].read_bytes() == outs[3].read_bytes()
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import tallpack; from tallpack import kernels; "
            "assert not kernels.COMPILED; from test_exact import FLOATS, _family; base, fts = _family(FLOATS, None); "
            "fts['d'] = {k: v.clone() for k, v in fts['a'].items()}; "  # the same family, built again there (torch
            "tallpack.pack(base, fts, sys.argv[2], exact=True, chunk_elements=64, threads=3)")  # 2.1 pickles no float8)
    env = {**__import__("os").environ, "TALLPACK_NO_KERNELS": "1"}
    subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent), str(tmp_path / "numpy.tallpack")],
                   env=env, check=True, timeout=600)
    with tallpack.open(tmp_path / "numpy.tallpack") as a, tallpack.open(outs[1]) as b:
        assert [e.to_dict() for e in a.manifest.tensors] == [e.to_dict() for e in b.manifest.tensors]
    with tallpack.open(outs[3]) as fam:
        for t, sd in fts.items():
            got = fam.state_dict(t, exact=True)
            assert all(_same(got[k], v) for k, v in sd.items()), t
