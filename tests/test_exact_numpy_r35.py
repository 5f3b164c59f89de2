"""An exact unpack of safetensors files in numpy alone (round 35): a fresh process that writes one
exact task imports no torch (seconds of its start), and writes the bytes torch's rebuild gives."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import tallpack
from tallpack.dtypes import tensor_to_bytes
from tallpack.encodings import exact
from tallpack.encodings.exact import NotInNumpy, _narrowed, _widened, original_bits
from tallpack.originals import _Bytes

_NAN16 = {torch.bfloat16: [0x7FC1, 0xFFC3, 0x7F81], torch.float16: [0x7E01, 0xFE05, 0x7C01]}


def _awkward(x: torch.Tensor) -> torch.Tensor:
    """``x`` with -0.0 and subnormals at its first places (an infinity would store it per task)."""
    x = x.clone()
    flat = x.view(-1)
    tiny = {torch.float32: 1e-45, torch.bfloat16: 1e-40, torch.float16: 6e-8}[x.dtype]
    flat[0], flat[1], flat[2] = -0.0, tiny, -tiny
    return x


def _family(root: Path, dtype: torch.dtype, base_dtype: torch.dtype | None = None, tasks: int = 3,
            nan_task: bool = True) -> tuple[Path, dict[str, Path]]:
    """Base and ``tasks`` fine-tunes as safetensors files: masked tensors with -0.0, subnormals and
    infinities, a NaN-holding tensor (stored per task), an empty one, a frozen one, integers, bools."""
    g = torch.Generator().manual_seed(3)
    bd = base_dtype or dtype
    w = torch.randn(48, 40, generator=g)
    base = {"w": w.to(bd), "b": torch.randn(40, generator=g).to(bd), "frozen": torch.randn(6, 5, generator=g).to(bd),
            "empty": torch.zeros(0, 7, dtype=bd), "ids": torch.arange(9), "flag": torch.tensor([True, False])}
    root.mkdir(parents=True)
    save_file(base, str(root / "base.safetensors"), metadata={"format": "pt"})
    paths = {}
    for t in range(tasks):
        sd = {"w": _awkward((w + 0.02 * torch.randn(w.shape, generator=g)).to(dtype)),
              "b": (base["b"].float() + 0.1 * torch.randn(40, generator=g)).to(dtype),
              "frozen": base["frozen"].to(dtype), "empty": torch.zeros(0, 7, dtype=dtype), "ids": torch.arange(9),
              "flag": torch.tensor([True, t % 2 == 0])}
        if nan_task:
            n = (torch.randn(30, generator=g)).to(dtype)
            if dtype in _NAN16:
                n.view(torch.int16)[:3] = torch.tensor(_NAN16[dtype], dtype=torch.int32).to(torch.int16)
            else:
                n.view(torch.int32)[:2] = torch.tensor([0x7FC00001, -0x3F2F], dtype=torch.int32)
            sd["nans"] = n
        paths[f"t{t}"] = root / f"t{t}.safetensors"
        save_file(sd, str(paths[f"t{t}"]), metadata={"format": "pt", "license": "x"})
    return root / "base.safetensors", paths


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


_CHILD = """
import json, sys
import tallpack
from tallpack_cli.main import main
got = {}
for arch, out in json.loads(sys.argv[1]):
    with tallpack.open(arch) as fam:
        tallpack.write_task(fam, "t1", out, exact=True)
    got[arch] = "torch" in sys.modules
main(["unpack", arch, "--task", "t2", "-o", out + "-cli", "--exact"], standalone_mode=False)
got["cli"] = "torch" in sys.modules
print(json.dumps(got))
"""


def test_an_exact_unpack_imports_no_torch(tmp_path: Path) -> None:
    """``write_task(..., exact=True)`` of a bfloat16, a float32 and a float16 family (and the
    command line's ``unpack --exact``) in a fresh process: the original files byte for byte, and
    torch never imported (it was, for the rebuild: one to three seconds of a fresh start)."""
    jobs, expected = [], {}
    for dtype in (torch.bfloat16, torch.float32, torch.float16):
        name = str(dtype).split(".")[1]
        base, paths = _family(tmp_path / name, dtype)
        arch = tmp_path / f"{name}.tallpack"
        tallpack.pack(str(base), {k: str(v) for k, v in paths.items()}, str(arch), exact=True)
        jobs.append((str(arch), str(tmp_path / f"out-{name}")))
        expected[name] = paths
    r = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(jobs)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got == {**{arch: False for arch, _ in jobs}, "cli": False}
    for name, paths in expected.items():
        assert _sha(tmp_path / f"out-{name}" / "t1.safetensors") == _sha(paths["t1"])
    assert _sha(tmp_path / "out-float16-cli" / "t2.safetensors") == _sha(expected["float16"]["t2"])


def _same_as_torch(arch: Path) -> int:
    """Every exact tensor's numpy rebuild against ``get_tensor(..., exact=True)``'s bytes; how many."""
    count = 0
    with tallpack.open(arch) as fam:
        read = _Bytes(fam).read
        for task in fam.tasks:
            for name in fam.keys(task):
                entry, tt = fam._entry(task, name)
                if "exact" not in tt.extras:
                    continue
                want = bytes(tensor_to_bytes(fam.get_tensor(task, name, exact=True)))
                assert bytes(original_bits(read, entry, tt, f"tensor {name!r}").view(np.uint8)) == want, (task, name)
                count += 1
    return count


@pytest.mark.parametrize("dtype,base_dtype,flags", [
    (torch.bfloat16, None, {}),
    (torch.float16, None, {"derive_masks": False}),  # "tall" references: base + mask * merged, narrowed
    (torch.float32, None, {"derive_merged": False}),
    (torch.bfloat16, torch.float32, {}),  # a float32 base narrowed to each task's dtype
    (torch.float16, torch.bfloat16, {"derive_masks": False}),
])
def test_the_numpy_rebuild_gives_torch_s_bits(tmp_path: Path, dtype, base_dtype, flags) -> None:
    """The numpy rebuild of each exact tensor is bit for bit ``get_tensor(..., exact=True)``'s,
    whatever reference the writer chose (base, zero, the TALL rebuild) and for a base of another
    dtype; and the files an exact unpack writes are the originals."""
    base, paths = _family(tmp_path / "f", dtype, base_dtype)
    arch = tmp_path / "a.tallpack"
    tallpack.pack(str(base), {k: str(v) for k, v in paths.items()}, str(arch), exact=True, **flags)
    assert _same_as_torch(arch) >= 6
    with tallpack.open(arch) as fam:
        tallpack.write_task(fam, "t0", tmp_path / "out", exact=True)
    assert _sha(tmp_path / "out" / "t0.safetensors") == _sha(paths["t0"])


def test_a_large_tensor_is_rebuilt_in_runs_in_numpy_too(tmp_path: Path, monkeypatch) -> None:
    """A tensor over ``RUNS_FROM`` elements is rebuilt a run of its residual's chunks at a time, as
    torch's path does (here with the bounds lowered and small chunks: several runs)."""
    monkeypatch.setattr(exact, "RUNS_FROM", 256)
    monkeypatch.setattr(exact, "RUN_ELEMENTS", 512)
    base, paths = _family(tmp_path / "f", torch.bfloat16, nan_task=False)
    arch = tmp_path / "a.tallpack"
    tallpack.pack(str(base), {k: str(v) for k, v in paths.items()}, str(arch), exact=True, chunk_elements=128)
    with tallpack.open(arch) as fam:
        entry, tt = fam._entry("t1", "w")
        assert exact.in_runs(_Bytes(fam).read, entry, [tt])
    assert _same_as_torch(arch) >= 6
    with tallpack.open(arch) as fam:
        tallpack.write_task(fam, "t1", tmp_path / "out", exact=True)
    assert _sha(tmp_path / "out" / "t1.safetensors") == _sha(paths["t1"])


def test_what_numpy_leaves_to_torch_still_comes_back(tmp_path: Path) -> None:
    """A float8 tensor's original, which numpy cannot rebuild, takes torch's path: the same file."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 32, generator=g)
    save_file({"w8": w.to(torch.float8_e4m3fn), "h": w.bfloat16()}, str(tmp_path / "base.safetensors"))
    paths = {}
    for t in range(2):
        paths[f"t{t}"] = str(tmp_path / f"t{t}.safetensors")
        save_file({"w8": (w + 0.3 * torch.randn(32, 32, generator=g)).to(torch.float8_e4m3fn),
                   "h": (w + 0.01 * torch.randn(32, 32, generator=g)).bfloat16()}, paths["t" + str(t)])
    arch = tmp_path / "a.tallpack"
    tallpack.pack(str(tmp_path / "base.safetensors"), paths, str(arch), exact=True)
    with tallpack.open(arch) as fam:
        entry, tt = fam._entry("t1", "w8")
        with pytest.raises(NotInNumpy):
            original_bits(_Bytes(fam).read, entry, tt, "tensor 'w8'")
        tallpack.write_task(fam, "t1", tmp_path / "out", exact=True)
    assert _sha(tmp_path / "out" / "t1.safetensors") == _sha(Path(paths["t1"]))


def test_a_rebuild_off_its_hash_is_refused(tmp_path: Path) -> None:
    """An exact rebuild whose bits do not hash to the manifest's xxh3 is an IntegrityError."""
    import dataclasses

    base, paths = _family(tmp_path / "f", torch.bfloat16, nan_task=False)
    arch = tmp_path / "a.tallpack"
    tallpack.pack(str(base), {k: str(v) for k, v in paths.items()}, str(arch), exact=True)
    with tallpack.open(arch) as fam:
        entry, tt = fam._entry("t1", "w")
        ex = tt.extras["exact"]
        off = dataclasses.replace(tt, extras={**tt.extras, "exact": dataclasses.replace(ex, xxh3=ex.xxh3 ^ 1)})
        with pytest.raises(tallpack.errors.IntegrityError, match="does not match the original's hash"):
            original_bits(_Bytes(fam).read, entry, off, "task 't1', tensor 'w'")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_narrowing_rounds_as_torch_does(dtype: str) -> None:
    """float32 values narrowed to bfloat16 or float16 in numpy are torch's ``.to()`` bits: every
    16-bit pattern widened (of both types), random float32 patterns and the ties and edges
    (subnormals, overflow to infinity); a NaN is left to torch."""
    rng = np.random.default_rng(0)
    every = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    parts = [_widened(every, "bfloat16"), _widened(every, "float16"),
             rng.integers(0, 1 << 32, 1 << 20, dtype=np.uint32).view(np.float32),
             (np.arange(-(1 << 12), 1 << 12, dtype=np.int64) + np.int64(0x33000000)).astype(np.uint32).view(np.float32),
             (np.arange(-(1 << 12), 1 << 12, dtype=np.int64) + np.int64(0x477FF000)).astype(np.uint32).view(np.float32),
             ((np.arange(1 << 16, dtype=np.uint32) << np.uint32(16)) | np.uint32(0x8000)).view(np.float32),  # bf16 ties
             ((np.arange(1 << 19, dtype=np.uint32) << np.uint32(13)) | np.uint32(0x1000)).view(np.float32)]  # f16 ties
    v = np.concatenate(parts)
    v = v[~np.isnan(v)]
    v = np.concatenate([v, -v])
    want = torch.from_numpy(v.copy()).to(getattr(torch, dtype)).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(_narrowed(v, dtype), want)
    with pytest.raises(NotInNumpy):
        _narrowed(np.array([1.0, np.nan], np.float32), dtype)
