"""A second reader, written from spec/ alone (tests/spec_reader), against the reference reader.

Every golden archive and archives packed now through the CLI (codecs, TIES, the exact tier,
groups, aliases, bf16/f16/float8/float64 tensors, rebuilds that overflow their dtype) must
read to the same bits with both readers, task by task, tensor by tensor.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from spec_reader import open_archive
from spec_reader.reader import F8_TABLES, FormatError, IntegrityError, cast_f32

import tallpack

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
        "f64.weight": r(16, 8, dtype=torch.float64),
        "e4.weight": r(32, dtype=torch.float8_e4m3fn),
        "e5.weight": r(32, dtype=torch.float8_e5m2),
        # near the top of each dtype: the rebuild overflows (inf, or 448 for e4m3fn)
        "edge16.weight": torch.tensor([65472.0, -65472.0, 1.0, 6e-8] * 8, dtype=torch.float16),
        "edgebf.weight": torch.tensor([3.3762e38, -3.3762e38, 1.0, 1e-38] * 8).to(torch.bfloat16),
        "edge8.weight": torch.tensor([416.0, -416.0, 1.0, 0.0] * 8).to(torch.float8_e4m3fn),
        "edge85.weight": torch.tensor([49152.0, -49152.0, 1.0, 0.0] * 8).to(torch.float8_e5m2),
        "sub.weight": torch.tensor([1e-45, -1e-45, 1e-39, -0.0, 0.0, 1.5, -2.5, 1.0] * 4),
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
                  "f64.weight", "e4.weight", "e5.weight"):
            ft[k] = (ft[k].double() + r(*ft[k].shape, scale=0.05 * (t + 1)).double()).to(ft[k].dtype)
        # two tasks move to the top, the others stay: the merged vector holds twice the step
        up = torch.tensor([1.0, -1.0, 0.0, 0.0] * 8) * (t < 2)
        ft["edge16.weight"] = (ft["edge16.weight"].float() + 32 * up).to(torch.float16)
        ft["edgebf.weight"] = (ft["edgebf.weight"].float() + 2.0**120 * up).to(torch.bfloat16)
        ft["edge8.weight"] = (ft["edge8.weight"].float() + 32 * up).to(torch.float8_e4m3fn)
        ft["edge85.weight"] = (ft["edge85.weight"].float() + 8192 * up).to(torch.float8_e5m2)
        ft["sub.weight"] = ft["sub.weight"] + torch.tensor([1e-45, 0, 2e-39, 1e-40, -1e-40, 1e-3, 0, 0.5] * 4) * (t + 1)
        ft["head.weight"] = r(t + 2, 32)  # task-own: a shape of its own per task
        if t == 0:
            ft["extra.bias"] = r(5)  # task-own: in one task only
        ft["lm_head.weight"] = ft["emb.weight"]  # tied: an alias (§3.8)
        torch.save(ft, folder / f"ft{t}.pt")
        args.append(f"t{t}={folder / f'ft{t}.pt'}")
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
    "level10": ["--level", "10", "--chunk-elements", "1024"],
    "fidelity": ["--fidelity", "0.999"],
}


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each variant packed by the CLI, two processes at a time."""
    folder = tmp_path_factory.mktemp("spec_family")
    family = _family(folder, 3, 0)
    many = folder / "many"
    many.mkdir()
    jobs = {name: family + opts for name, opts in VARIANTS.items()}
    jobs["exact_ties_16_tasks"] = _family(many, 16, 1) + ["--exact", "--merge", "ties"]
    out: dict[str, Path] = {}
    names = list(jobs)
    for i in range(0, len(names), 2):
        procs = []
        for name in names[i:i + 2]:
            out[name] = folder / f"{name}.tallpack"
            cmd = [sys.executable, "-m", "tallpack", "pack", "-o", str(out[name]), "--keep-base-only",
                   "--no-progress", "-j", "1", *jobs[name]]
            procs.append((name, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)))
        for name, proc in procs:
            log = proc.communicate()[0].decode()
            assert proc.returncode == 0, (name, log)
    return out


@pytest.mark.parametrize("variant", [*VARIANTS, "exact_ties_16_tasks"])
def test_packed_archives_read_alike(packed: dict[str, Path], variant: str) -> None:
    assert _compare(packed[variant]) > 20


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
