"""A second reader, written from spec/ alone (tests/spec_reader), against the reference reader.

Every golden archive and archives packed now through the CLI (codecs, TIES, the exact tier,
groups, aliases, bf16/f16/float8/float64 tensors, rebuilds that overflow their dtype) must
read to the same bits with both readers, task by task, tensor by tensor.
"""

from __future__ import annotations

import io
import json
import random
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from spec_reader import open_archive
from spec_reader.reader import F8_TABLES, FormatError, IntegrityError, SpecError, cast_f32

import tallpack
import tallpack.errors
from tallpack_cli.main import main as cli_main

GOLDEN = Path(__file__).parent / "golden"
GOLDENS = sorted(GOLDEN.glob("*.tallpack"))


def _bits(t: object) -> tuple[str, tuple[int, ...], bytes]:
    """(dtype, shape, bytes) of a numpy array or torch tensor, comparable across the two."""
    if isinstance(t, np.ndarray):
        arr = np.array(t, copy=True)
        dtype = str(torch.from_numpy(arr).dtype) if arr.dtype != bool else "torch.bool"
        return dtype, arr.shape, arr.tobytes()
    assert isinstance(t, torch.Tensor)
    t = t.detach().contiguous()
    raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return str(t.dtype), tuple(t.shape), raw


def _compare(path: Path) -> int:
    """Compare every task and tensor of an archive, lossy and (where stored) exact; count them."""
    spec = open_archive(path)
    ref = tallpack.open(path)
    assert spec.tasks == list(ref.tasks)
    compared = 0
    for task in spec.tasks:
        info = next(t for t in spec.manifest["tasks"] if t["name"] == task)
        modes = [False, True] if "exact" in info else [False]
        for exact in modes:
            want = ref.state_dict(task, exact=exact)
            got = spec.state_dict(task, exact=exact)
            assert list(got) == list(want), (path.name, task)
            for name in want:
                assert _bits(got[name]) == _bits(want[name]), (path.name, task, name, exact)
                compared += 1
    return compared


@pytest.mark.parametrize("path", GOLDENS, ids=[p.stem for p in GOLDENS])
def test_golden_archives_read_alike(path: Path) -> None:
    """Each golden archive: the spec reader gives the reference reader's bits, and the expected file's."""
    assert _compare(path) > 0
    spec = open_archive(path)
    for suffix, exact in ((".expected.safetensors", False), (".originals.safetensors", True)):
        expected = path.with_name(path.stem + suffix)
        if not expected.exists():
            continue
        with safe_open(expected, "pt") as f:
            for key in f.keys():
                task, name = key.split("/", 1)
                assert _bits(spec.tensor(task, name, exact=exact)) == _bits(f.get_tensor(key)), (key, exact)


def test_goldens_found() -> None:
    assert len(GOLDENS) >= 18


# -------------------------------------------------------------------------------------------------
# families packed now


def _pickles(dtype: torch.dtype) -> bool:
    """Whether ``torch.save`` takes tensors of ``dtype``: torch 2.1 pickles no float8 (nor do its .pt files hold any)."""
    try:
        torch.save(torch.zeros(1, dtype=dtype), io.BytesIO())
    except KeyError:
        return False
    return True


def _family(folder: Path, tasks: int, seed: int) -> list[str]:
    """A base and `tasks` fine-tunes as .pt files (tied weights kept as one storage): pack's args."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int, dtype: torch.dtype = torch.float32, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(shape, generator=g) * scale).to(dtype)

    base = {
        "emb.weight": r(64, 32),
        "blk.0.weight": r(96, 80),
        "blk.0.bias": r(80),
        "blk.0.scale": torch.randn((), generator=g),
        "half.weight": r(40, 24, dtype=torch.float16),
        "bf.weight": r(40, 24, dtype=torch.bfloat16),
        # full float64 precision: f32(B) is not B (§6.1.5's base reference goes through float32)
        "f64.weight": torch.randn((16, 8), generator=g, dtype=torch.float64),
        "e4.weight": r(32, dtype=torch.float8_e4m3fn),
        "e5.weight": r(32, dtype=torch.float8_e5m2),
        # near the top of each dtype: the rebuild overflows (inf, or 448 for e4m3fn)
        "edge16.weight": torch.tensor([65472.0, -65472.0, 1.0, 6e-8] * 8, dtype=torch.float16),
        "edgebf.weight": torch.tensor([3.3762e38, -3.3762e38, 1.0, 1e-38] * 8).to(torch.bfloat16),
        "edge8.weight": torch.tensor([416.0, -416.0, 1.0, 0.0] * 8).to(torch.float8_e4m3fn),
        "edge85.weight": torch.tensor([49152.0, -49152.0, 1.0, 0.0] * 8).to(torch.float8_e5m2),
        "sub.weight": torch.tensor([1e-45, -1e-45, 1e-39, -0.0, 0.0, 1.5, -2.5, 1.0] * 4),
        "negzero.weight": torch.full((64,), -0.0),
        "wide.weight": r(130, 128),  # over 16,384 elements: bitsplit residuals of two blocks
        "pos": torch.arange(20),
        "frozen.weight": r(8, 8),
        "only.base": r(8, 8),
    }
    base["lm_head.weight"] = base["emb.weight"]
    torch.save(base, folder / "base.pt")
    args = ["--base", str(folder / "base.pt")]
    for t in range(tasks):
        ft = {k: v.clone() for k, v in base.items() if k not in ("lm_head.weight", "only.base")}
        for k in ("emb.weight", "blk.0.weight", "blk.0.bias", "blk.0.scale", "half.weight", "bf.weight",
                  "f64.weight", "e4.weight", "e5.weight", "wide.weight"):
            ft[k] = (ft[k].double() + r(*ft[k].shape, scale=0.05 * (t + 1)).double()).to(ft[k].dtype)
        # two tasks move to the top, the others stay: the merged vector holds twice the step
        up = torch.tensor([1.0, -1.0, 0.0, 0.0] * 8) * (t < 2)
        ft["edge16.weight"] = (ft["edge16.weight"].float() + 32 * up).to(torch.float16)
        ft["edgebf.weight"] = (ft["edgebf.weight"].float() + 2.0**120 * up).to(torch.bfloat16)
        ft["edge8.weight"] = (ft["edge8.weight"].float() + 32 * up).to(torch.float8_e4m3fn)
        ft["edge85.weight"] = (ft["edge85.weight"].float() + 8192 * up).to(torch.float8_e5m2)
        ft["sub.weight"] = ft["sub.weight"] + torch.tensor([1e-45, 0, 2e-39, 1e-40, -1e-40, 1e-3, 0, 0.5] * 4) * (t + 1)
        # -0.0 + f32(0) * M is +0.0 where a task kept -0.0 and its mask is 0 (§6.1.1)
        ft["negzero.weight"] = torch.where(torch.arange(64) % 2 == 0, torch.tensor(0.5 * (t > 0)),
                                           r(64, scale=0.1)) * (1 if t else -1)
        ft["head.weight"] = r(t + 2, 32)  # task-own: a shape of its own per task
        if t == 0:
            ft["extra.bias"] = r(5)  # task-own: in one task only
        ft["lm_head.weight"] = ft["emb.weight"]  # tied: an alias (§3.8)
        torch.save(ft, folder / f"ft{t}.pt")
        args.append(f"t{t}={folder / f'ft{t}.pt'}")
    return args


def _folders(folder: Path) -> list[str]:
    """A base folder and two fine-tunes (one sharded) of safetensors files beside other files."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(5)
    base = {"w.a": torch.randn((64, 32), generator=g), "w.b": torch.randn((100,), generator=g).bfloat16(),
            "w.c": torch.randn((30,), generator=g).half(), "ids": torch.arange(10),
            "s": torch.randn((), generator=g)}

    def save(name: str, sd: dict[str, torch.Tensor], shards: bool) -> Path:
        out = folder / name
        out.mkdir(parents=True)
        (out / "config.json").write_text('{"model_type": "toy", "hidden": 32}')
        (out / "README.md").write_text(f"a model card of {name}")
        if not shards:
            save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
            return out
        keys = list(sd)
        files = {"model-00001-of-00002.safetensors": keys[:2], "model-00002-of-00002.safetensors": keys[2:]}
        for file, names in files.items():
            save_file({k: sd[k] for k in names}, str(out / file), metadata={"format": "pt"})
        index = {"metadata": {"total_size": 1}, "weight_map": {k: f for f, ks in files.items() for k in ks}}
        (out / "model.safetensors.index.json").write_text(json.dumps(index))
        return out

    args = ["--base", str(save("base", base, False))]
    for t in range(2):
        ft = {k: (v.double() + 0.05 * torch.randn(v.shape, generator=g).double()).to(v.dtype)
              if v.is_floating_point() else v for k, v in base.items()}
        args.append(f"f{t}={save(f'f{t}', ft, t == 1)}")
    return args


VARIANTS = {
    "default": [],
    "raw_ties": ["--codec", "raw", "--merge", "ties"],
    "bgzstd_crc_nogroup": ["--codec", "bytegroup-zstd", "--checksum", "crc32", "--no-group",
                           "--chunk-elements", "64"],
    "exact": ["--exact", "--chunk-elements", "256"],
    "exact_ties_zstd": ["--exact", "--merge", "ties", "--codec", "zstd", "--chunk-elements", "128"],
    "exact_store_merged": ["--exact", "--store-merged"],
    "exact_store_masks": ["--exact", "--store-masks", "--chunk-elements", "512"],
    "fidelity": ["--fidelity", "0.999"],
}


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each variant packed by the CLI (its click command, in this process: a pack takes milliseconds)."""
    if not _pickles(torch.float8_e4m3fn):
        pytest.skip("this torch pickles no float8 tensors, which the family's .pt files hold")
    folder = tmp_path_factory.mktemp("spec_family")
    family = _family(folder, 3, 0)
    many = folder / "many"
    many.mkdir()
    jobs = {name: family + opts for name, opts in VARIANTS.items()}
    jobs["exact_ties_16_tasks"] = _family(many, 16, 1) + ["--exact", "--merge", "ties"]
    jobs["folders_exact"] = _folders(folder / "folders") + ["--exact"]
    out: dict[str, Path] = {}
    for name, args in jobs.items():
        out[name] = folder / f"{name}.tallpack"
        cmd = ["pack", "-o", str(out[name]), "--keep-base-only", "--no-progress", "-j", "1", *args]
        result = CliRunner().invoke(cli_main, cmd)
        assert result.exit_code == 0, (name, result.output, result.exception)
    return out


@pytest.mark.parametrize("variant", [*VARIANTS, "exact_ties_16_tasks", "folders_exact"])
def test_packed_archives_read_alike(packed: dict[str, Path], variant: str) -> None:
    assert _compare(packed[variant]) >= 20


def test_packed_family_has_what_it_should(packed: dict[str, Path]) -> None:
    """The family exercises aliases, groups, every float dtype and the overflowing rebuilds."""
    spec = open_archive(packed["default"])
    assert spec.aliases == {"lm_head.weight": "emb.weight"}
    assert any("members" in e for e in spec.manifest["tensors"])
    dtypes = {te["dtype"] for e in spec.manifest["tensors"] for te in e["tasks"].values()}
    assert {"float32", "float16", "bfloat16", "float64", "float8_e4m3fn", "float8_e5m2"} <= dtypes
    kinds = {e["name"]: e["kind"] for e in spec.manifest["tensors"]}
    kinds.update({m[0]: e["kind"] for e in spec.manifest["tensors"] for m in e.get("members", [])})
    assert kinds["edge16.weight"] == kinds["edge8.weight"] == kinds["edge85.weight"] == "merged"
    assert np.isinf(spec.tensor("t0", "edge16.weight")[:2]).all()
    assert spec.tensor("t0", "edge85.weight")[:2].float().isinf().all()
    assert (spec.tensor("t0", "edge8.weight")[:2].float().abs() == 448).all()
    exact = open_archive(packed["exact_ties_zstd"])
    encodings = {te["encoding"] for e in exact.manifest["tensors"] for te in e["tasks"].values()}
    assert "tall-derived-merged" in encodings
    assert exact.manifest["merge"]["method"] == "ties"


# -------------------------------------------------------------------------------------------------
# the spec reader refuses what the spec says to refuse (so the comparisons above can fail)


def test_spec_reader_checks_chunk_checksums(tmp_path: Path) -> None:
    src = GOLDEN / "v1_0_ta.tallpack"
    data = bytearray(src.read_bytes())
    spec = open_archive(src)
    entry = next(e for e in spec.manifest["tensors"] if e["name"] == "embed.weight")
    offset = entry["base"]["chunks"][0][0]
    data[offset + 5] ^= 0x01
    bad = tmp_path / "bad.tallpack"
    bad.write_bytes(bytes(data))
    damaged = open_archive(bad)
    with pytest.raises(IntegrityError, match="checksum"):
        damaged.tensor("cars", "embed.weight")


def test_spec_reader_checks_manifest_crc(tmp_path: Path) -> None:
    data = bytearray((GOLDEN / "v1_0_ta.tallpack").read_bytes())
    data[-32 + 16] ^= 0xFF
    bad = tmp_path / "bad.tallpack"
    bad.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="CRC"):
        open_archive(bad)


def _rewrite(src: Path, dst: Path, manifest: dict) -> None:
    """The archive with another manifest, stored uncompressed (flag bit 0 clear)."""
    import json
    import struct
    import zlib

    data = src.read_bytes()
    moff = struct.unpack_from("<Q", data, len(data) - 32)[0]
    text = json.dumps(manifest).encode()
    footer = struct.pack("<QQII", moff, len(text), zlib.crc32(text), 0) + b"TALLPEND"
    dst.write_bytes(data[:moff] + text + footer)


def test_spec_reader_checks_exact_hash(tmp_path: Path) -> None:
    """An `xxh3` that differs from the rebuilt original fails the exact read (§6.1.5)."""
    src = GOLDEN / "v1_2_exact.tallpack"
    manifest = open_archive(src).manifest
    entry = next(e for e in manifest["tensors"] if any("exact" in te for te in e["tasks"].values()))
    task, te = next((t, te) for t, te in entry["tasks"].items() if "exact" in te)
    same = tmp_path / "same.tallpack"
    _rewrite(src, same, manifest)
    assert open_archive(same).tensor(task, entry["name"], exact=True) is not None
    te["exact"]["xxh3"] ^= 1
    bad = tmp_path / "bad.tallpack"
    _rewrite(src, bad, manifest)
    with pytest.raises(IntegrityError, match="xxh3"):
        open_archive(bad).tensor(task, entry["name"], exact=True)


def test_float8_and_bfloat16_casts_match_torch() -> None:
    """cast_d of §6.1.1 on every float32 neighbourhood that matters, against torch's casts."""
    values = np.concatenate([
        np.array([0.0, -0.0, np.inf, -np.inf, 448.0, 464.0, 465.0, 480.0, 57344.0, 61439.0, 61440.0,
                  65504.0, 65519.0, 65520.0, 3.3895e38, 3.4e38], np.float32),
        F8_TABLES["float8_e4m3fn"][np.isfinite(F8_TABLES["float8_e4m3fn"])],
        F8_TABLES["float8_e5m2"][np.isfinite(F8_TABLES["float8_e5m2"])],
        np.random.default_rng(0).standard_normal(4096).astype(np.float32) * 100,
        np.random.default_rng(1).standard_normal(4096).astype(np.float32) * 1e-3,
    ]).astype(np.float32)
    values = np.concatenate([values, -values, np.nextafter(values, np.float32(np.inf)),
                             np.nextafter(values, np.float32(-np.inf))])
    t = torch.from_numpy(values)
    for name in ("float16", "bfloat16", "float8_e5m2", "float8_e4m3fn"):
        dt = getattr(torch, name)
        want = t.to(dt)
        if name == "float8_e4m3fn":  # the spec: saturate, infinities included
            want = t.clamp(-448, 448).to(dt)
        got = cast_f32(values, name)
        want_bits = want.view(torch.uint8 if want.element_size() == 1 else torch.int16).numpy()
        assert np.array_equal(got.view(want_bits.dtype), want_bits), name


def test_spec_reader_rejects_a_header_manifest_version_mismatch(tmp_path: Path) -> None:
    data = bytearray((GOLDEN / "v1_0_ta.tallpack").read_bytes())
    data[10] = 3  # header says 1.3, the manifest 1.0
    bad = tmp_path / "bad.tallpack"
    bad.write_bytes(bytes(data))
    with pytest.raises(FormatError, match="format_version"):
        open_archive(bad)


def test_folder_files_and_original_files_rebuild(packed: dict[str, Path]) -> None:
    """§3.6 folder files and §6.5 original safetensors files: the input folders' bytes, hashes checked."""
    path = packed["folders_exact"]
    spec, ref = open_archive(path), tallpack.open(path)
    folders = path.parent / "folders"
    rebuilt = 0
    for task in spec.tasks:
        info = next(t for t in spec.manifest["tasks"] if t["name"] == task)
        for name in info["files"]:
            assert spec.file(name, task) == ref.read_file(name, task) == (folders / task / name).read_bytes()
        for record in info["exact"]["files"]:
            assert spec.original_file(task, record["name"]) == (folders / task / record["name"]).read_bytes()
            rebuilt += record["role"] == "safetensors"
    assert rebuilt == 3  # f0's model.safetensors and f1's two shards


# -------------------------------------------------------------------------------------------------
# the spec's own examples


def test_worked_example_of_section_1() -> None:
    data = (GOLDEN / "v1_0_ta.tallpack").read_bytes()
    assert len(data) == 8126
    assert data[:16] == bytes.fromhex("54414c4c5041434b0100000000000000")
    moff, mlen, crc, flags = struct.unpack_from("<QQII", data, len(data) - 32)
    assert (moff, mlen, crc, flags) == (6528, 1566, 0x804EEBEA, 1)
    assert zlib.crc32(data[moff:moff + mlen]) == crc and data[-8:] == b"TALLPEND"
    assert zlib.crc32(b"123456789") == 0xCBF43926
    import xxhash

    assert xxhash.xxh3_64_intdigest(b"") == 0x2D06800538D394C2


def test_bitsplit_example_of_section_5() -> None:
    from spec_reader.reader import decode_step

    encoded = bytes.fromhex("08000000 0004 0809 0c0d 1243 ff3f".replace(" ", ""))
    decoded = decode_step({"id": "bitsplit", "itemsize": 2, "block": 64}, encoded, 16, "example")
    assert np.frombuffer(decoded, "<u2").tolist() == [0, 1, 2, 3, 4, 5, 13, 65535]
    with pytest.raises(FormatError, match="padding"):
        decode_step({"id": "bitsplit", "itemsize": 2, "block": 64}, encoded[:-1] + b"\x7f", 16, "example")


# -------------------------------------------------------------------------------------------------
# manifests that break a MUST: both readers refuse them


def _entry(m: dict, name: str) -> dict:
    return next(e for e in m["tensors"] if e["name"] == name)


def _task_entry(m: dict, name: str) -> dict:
    return next(iter(_entry(m, name)["tasks"].values()))


def _set(obj: dict, key: str, value: object) -> None:
    obj[key] = value


BROKEN = {
    "requires an unknown name": ("v1_12_groups", lambda m: m["requires"].append("zzz")),
    "requires a name twice": ("v1_12_groups", lambda m: m["requires"].append("groups")),
    "member offset not a multiple of 8": ("v1_12_groups", lambda m: _entry(m, "tallpack.group.0")["members"][1].__setitem__(1, 121)),
    "members overlap": ("v1_12_groups", lambda m: _entry(m, "tallpack.group.0")["members"][1].__setitem__(1, 112)),
    "member past the group": ("v1_12_groups", lambda m: _entry(m, "tallpack.group.0")["members"][3].__setitem__(2, [100])),
    "member named as an entry": ("v1_12_groups", lambda m: _entry(m, "tallpack.group.0")["members"][3].__setitem__(0, "mixed.weight")),
    "a group in keys": ("v1_12_groups", lambda m: m["tasks"][0]["keys"].append("tallpack.group.0")),
    "members without requires": ("v1_12_groups", lambda m: m.pop("requires")),
    "alias of itself": ("v1_14_aliases", lambda m: m["aliases"].__setitem__("lm_head.weight", "lm_head.weight")),
    "alias of an alias": ("v1_14_aliases", lambda m: m["aliases"].__setitem__("mixed.tied", "frozen.tied")),
    "alias of a group": ("v1_14_aliases", lambda m: m["aliases"].__setitem__("mixed.tied", "tallpack.group.0")),
    "alias named as an entry": ("v1_14_aliases", lambda m: m["aliases"].__setitem__("head.weight", "mixed.weight")),
    "aliases without requires": ("v1_14_aliases", lambda m: _set(m, "requires", ["groups"])),
    "alias listed without its target": ("v1_14_aliases", lambda m: m["tasks"][0]["keys"].remove("embed.weight")),
    "chunk_elements 60": ("v1_0_ta", lambda m: _set(_entry(m, "embed.weight")["base"], "chunk_elements", 60)),
    "a chunk missing": ("v1_0_ta", lambda m: _entry(m, "embed.weight")["base"]["chunks"].pop()),
    "chunks overlap": ("v1_0_ta", lambda m: _entry(m, "embed.weight")["base"]["chunks"][1].__setitem__(0, 72)),
    "a chunk in the manifest": ("v1_0_ta", lambda m: _entry(m, "embed.weight")["base"]["chunks"][1].__setitem__(0, 8000)),
    "a codec parameter unknown": ("v1_0_ta", lambda m: _entry(m, "embed.weight")["base"]["codecs"][1].__setitem__("x", 1)),
    "bytegroup of another itemsize": ("v1_0_ta", lambda m: _entry(m, "embed.weight")["base"]["codecs"][0].__setitem__("itemsize", 2)),
    "an unknown codec": ("v1_0_ta", lambda m: _entry(m, "embed.weight")["base"]["codecs"][1].__setitem__("id", "lz4")),
    "a dimension 12.0": ("v1_0_ta", lambda m: _entry(m, "embed.weight")["base"]["shape"].__setitem__(0, 12.0)),
    "lambda -0.5": ("v1_0_ta", lambda m: _set(m["tasks"][0], "lambda", -0.5)),
    "density 1.5": ("v1_0_ta", lambda m: _set(m["tasks"][0], "density", 1.5)),
    "an undeclared task": ("v1_0_ta", lambda m: _entry(m, "embed.weight")["tasks"].__setitem__("nope", _task_entry(m, "embed.weight"))),
    "merged of float16": ("v1_0_ta", lambda m: _set(_entry(m, "embed.weight")["merged"], "dtype", "float16")),
    "a mask of uint8": ("v1_0_ta", lambda m: _set(_task_entry(m, "embed.weight")["mask"], "dtype", "uint8")),
    "no tasks and no base": ("v1_0_ta", lambda m: m["tensors"].append({"name": "x", "kind": "base-only", "tasks": {}})),
    "a correction on a dense entry": ("v1_0_ta", lambda m: _set(_task_entry(m, "head.weight"), "correction", {"kind": "exact"})),
    "an exact correction without exact": ("v1_0_ta", lambda m: _set(_task_entry(m, "embed.weight"), "correction", {"kind": "exact"})),
    "a key twice": ("v1_0_ta", lambda m: m["tasks"][0]["keys"].append("embed.weight")),
    "a chain of 5 codecs": ("v1_0_ta", lambda m: _set(_entry(m, "embed.weight")["base"], "codecs", [{"id": "bytegroup", "itemsize": 4}] * 4 + [{"id": "zstd", "level": 3}])),
    "manifest minor 1": ("v1_0_ta", lambda m: _set(m, "format_version", [1, 1])),
    "an unknown checksum": ("v1_0_ta", lambda m: _set(m, "checksum", "md5")),
    "no merge": ("v1_0_ta", lambda m: m.pop("merge")),
    "tall ones past numel": ("v1_0_ta", lambda m: _set(_task_entry(m, "embed.weight"), "ones", 10**6)),
    "derived against tall": ("v1_6_derived", lambda m: _task_entry(m, "embed.weight")["exact"].__setitem__("reference", "tall")),
    "derived without merged": ("v1_6_derived", lambda m: _entry(m, "embed.weight").pop("merged")),
    "exact transform add": ("v1_6_derived", lambda m: _task_entry(m, "embed.weight")["exact"].__setitem__("transform", "add")),
    "derived-merged with merged": ("v1_8_derived_merged", lambda m: _set(_entry(m, "embed.weight"), "merged", dict(_entry(m, "embed.weight")["base"]))),
    "majority_sign true": ("v1_8_derived_merged", lambda m: _set(m["merge"], "majority_sign", True)),
    "qtau bits 9": ("v1_7_qtau", lambda m: _set(_task_entry(m, "embed.weight"), "bits", 9)),
    "qtau block 0": ("v1_7_qtau", lambda m: _set(_task_entry(m, "embed.weight"), "block", 0)),
    "correction kind lowrank": ("v1_5_correction", lambda m: _set(_task_entry(m, "embed.weight")["correction"], "kind", "lowrank")),
    "quant correction of 6 bits": ("v1_5_correction", lambda m: _set(_task_entry(m, "block.0.weight")["correction"], "bits", 6)),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_both_readers_refuse_a_broken_manifest(tmp_path: Path, case: str) -> None:
    golden, mutate = BROKEN[case]
    src = GOLDEN / f"{golden}.tallpack"
    manifest = open_archive(src).manifest
    mutate(manifest)
    bad = tmp_path / "bad.tallpack"
    _rewrite(src, bad, manifest)
    with pytest.raises(Exception) as spec_error:
        open_archive(bad)
    assert isinstance(spec_error.value, SpecError)
    with pytest.raises(tallpack.errors.TallpackError):
        tallpack.open(bad)


def test_an_unknown_encoding_fails_only_its_tensor(tmp_path: Path) -> None:
    """§6.1: an unknown `encoding` fails when that tensor is read; the rest stays readable (§8)."""
    src = GOLDEN / "v1_0_ta.tallpack"
    manifest = open_archive(src).manifest
    _task_entry(manifest, "embed.weight")["encoding"] = "lora"
    _entry(manifest, "embed.weight")["kind"] = "adapter"  # kinds are informative for readers
    bad = tmp_path / "future.tallpack"
    _rewrite(src, bad, manifest)
    spec, ref = open_archive(bad), tallpack.open(bad)
    task = next(iter(_entry(manifest, "embed.weight")["tasks"]))
    for reader in (spec, ref):
        with pytest.raises(Exception, match="embed.weight"):
            reader.get_tensor(task, "embed.weight") if reader is ref else reader.tensor(task, "embed.weight")
    assert _bits(spec.tensor(task, "head.weight")) == _bits(ref.get_tensor(task, "head.weight"))


def test_both_readers_accept_the_rewritten_manifest(tmp_path: Path) -> None:
    """The rewrite alone (manifest stored uncompressed) breaks nothing: the refusals above are the rule's."""
    for golden in {g for g, _ in BROKEN.values()}:
        src = GOLDEN / f"{golden}.tallpack"
        same = tmp_path / f"{golden}.tallpack"
        _rewrite(src, same, open_archive(src).manifest)
        assert _compare(same) > 0


def test_lambda_is_read_as_binary64_then_rounded_to_binary32(tmp_path: Path) -> None:
    """f32(λ) of §6.1.7: the JSON text 1.0000000596046448 (λ = 1 + 2^-24, a binary32 midpoint) is
    1.0 through binary64 (ties to even) but 1 + 2^-23 rounded from the decimal directly (strtof);
    the stored `ones` agrees only with the first. The elements: |τ| = 1 + 2^-23, |M − τ| = 1."""
    base = {"w": torch.zeros(64), "v": torch.linspace(-1, 1, 64)}
    first = {"w": torch.full((64,), 1 + 2.0**-23), "v": base["v"] + 0.1}
    second = {"w": torch.full((64,), -1.0), "v": base["v"] - 0.05}
    for name, sd in (("base", base), ("a", first), ("b", second)):
        torch.save(sd, tmp_path / f"{name}.pt")
    out = tmp_path / "l.tallpack"
    cmd = ["pack", "--base", str(tmp_path / "base.pt"), "-o", str(out), "--no-progress", "--exact",
           "--store-merged", "--lambda", "1.0000000596046448", f"a={tmp_path / 'a.pt'}", f"b={tmp_path / 'b.pt'}"]
    result = CliRunner().invoke(cli_main, cmd)
    assert result.exit_code == 0, result.output
    spec = open_archive(out)
    entry = _entry(spec.manifest, "w")
    task_entry = entry["tasks"]["a"]
    assert task_entry["encoding"] == "tall-derived" and task_entry["ones"] == 64
    tau = spec.tensor("a", "w", exact=True).astype(np.float32) - spec.read_array(entry["base"])
    merged = spec.read_array(entry["merged"])
    via_binary64 = np.float32(float("1.0000000596046448"))
    direct = np.nextafter(np.float32(1.0), np.float32(2.0))  # the decimal's nearest binary32
    assert int((np.abs(tau) > via_binary64 * np.abs(merged - tau)).sum()) == 64
    assert int((np.abs(tau) > direct * np.abs(merged - tau)).sum()) == 0
    assert _compare(out) > 0


# -------------------------------------------------------------------------------------------------
# random families: dtypes mixed between base and tasks, subnormals, zeros of both signs, options


FLOATS = [d for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.float8_e4m3fn,
                       torch.float8_e5m2) if _pickles(d)]  # (.pt files: no float8 on torch 2.1)


def _random_values(rng: random.Random, g: torch.Generator, shape: tuple[int, ...]) -> torch.Tensor:
    x = torch.randn(shape, generator=g, dtype=torch.float64)  # full float64 precision
    kind = rng.choice(["normal", "subnormal", "tiny", "big", "zeros", "negzero"])
    if kind in ("subnormal", "tiny", "big"):
        return x * {"subnormal": 1e-40, "tiny": 1e-6, "big": 1e4}[kind]
    if kind in ("zeros", "negzero"):
        fill = torch.full(shape, 0.0 if kind == "zeros" else -0.0, dtype=torch.float64)
        return torch.where(torch.rand(shape, generator=g) < 0.5, fill, x)
    return x


def _random_family(folder: Path, seed: int) -> list[str]:
    """pack's arguments for a random family and random options (the search that found §6.1.5's float64 rule)."""
    rng, g = random.Random(seed), torch.Generator().manual_seed(seed)
    n_tasks = rng.randint(1, 5)
    base: dict[str, torch.Tensor] = {}
    tasks: list[dict[str, torch.Tensor]] = [{} for _ in range(n_tasks)]
    for i in range(rng.randint(1, 6)):
        shape = tuple(rng.choice([1, 3, 8, 17, 64, 100, 700]) for _ in range(rng.randint(0, 2)))
        dtype = rng.choice(FLOATS)
        b = _random_values(rng, g, shape)
        base[f"t{i}"] = b.to(dtype)
        same_dtype = rng.random() < 0.7
        for t in range(n_tasks):
            delta = _random_values(rng, g, shape) * rng.choice([1e-3, 1e-1, 1.0, 0.0])
            tasks[t][f"t{i}"] = (b + delta).to(dtype if same_dtype else rng.choice(FLOATS))
    torch.save(base, folder / "base.pt")
    args = ["--base", str(folder / "base.pt")]
    for t in range(n_tasks):
        torch.save(tasks[t], folder / f"f{t}.pt")
        args.append(f"x{t}={folder / f'f{t}.pt'}")
    if rng.random() < 0.5:
        args += ["--merge", "ties", "--ties-top-k", str(rng.choice([0.1, 0.5, 1.0]))]
    if rng.random() < 0.5:
        args += ["--exact"] + rng.choice([[], ["--store-masks"], ["--store-merged"]])
    elif rng.random() < 0.3:
        args += ["--fidelity", str(rng.choice([0.9, 0.99, 0.999]))]
    args += ["--codec", rng.choice(["raw", "zstd", "bytegroup-zstd", "planes"]),
             "--chunk-elements", str(8 * rng.randint(1, 20)),
             "--lambda", str(rng.choice([0.0, 0.1, 0.4, 1.0, 3.7, 1e-8]))]
    return args + (["--level", "10"] if rng.random() < 0.3 else [])


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 14, 19, 38, 43])  # 14 to 43: a float64 base reference
def test_random_families_read_alike(tmp_path: Path, seed: int) -> None:
    out = tmp_path / "a.tallpack"
    cmd = ["pack", "-o", str(out), "--no-progress", "-j", "1", "--allow-mismatch", *_random_family(tmp_path, seed)]
    result = CliRunner().invoke(cli_main, cmd)
    assert result.exit_code == 0, (result.output, result.exception)
    assert _compare(out) > 0


# -------------------------------------------------------------------------------------------------
# found on the way (a library bug, not the format's): left failing for the lead


def test_pt_file_whose_first_tensor_is_empty_packs(tmp_path: Path) -> None:
    """torch.save of {'a': empty, 'b': 3 floats} loads with torch.load; pack must take it too.

    tallpack 0.2.0.dev0 refuses it: "tensor 'b': its storage record '.../data/0' holds 0 bytes,
    the tensor's storage needs 12: the file is damaged (torch.load refuses it too)" (it is not,
    and torch.load does not). The same tensors in the other order, or as safetensors, pack.
    """
    torch.save({"a": torch.zeros(0), "b": torch.ones(3)}, tmp_path / "base.pt")
    torch.save({"a": torch.zeros(0), "b": torch.full((3,), 2.0)}, tmp_path / "ft.pt")
    assert torch.load(tmp_path / "base.pt")["b"].tolist() == [1.0, 1.0, 1.0]
    out = tmp_path / "a.tallpack"
    cmd = ["pack", "--base", str(tmp_path / "base.pt"), "-o", str(out), "--no-progress", f"ft={tmp_path / 'ft.pt'}"]
    result = CliRunner().invoke(cli_main, cmd)
    assert result.exit_code == 0, result.output
    assert open_archive(out).tensor("ft", "b").tolist() == [2.0, 2.0, 2.0]
