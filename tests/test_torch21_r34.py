"""torch 2.1 and 2.2, which pyproject allows (``torch>=2.1``), have no uint16/32/64 tensors: the
archive's own unsigned arrays (exact residuals, sparse correction indices) are read there as the
signed tensors of their width, the same bits; a checkpoint tensor of such a dtype cannot be held in
those versions and is refused, before any work, saying it needs torch>=2.3. These tests run on any
torch: each takes the path its torch takes, and the suite on the minimum versions checks the other."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

import tallpack
from tallpack.dtypes import array_dtype, as_numpy, cat, view_tensor
from tallpack.encodings.base import Use
from test_fidelity import family

UNSIGNED = {"uint16": np.uint16, "uint32": np.uint32, "uint64": np.uint64}


def _safetensors(path: Path, tensors: dict[str, tuple[str, np.ndarray]]) -> None:
    """A safetensors file written by its layout (8-byte header length, JSON header, data): torch
    2.1 cannot make one holding a uint32 tensor, which a checkpoint of a newer torch may hold."""
    header, blobs, at = {}, [], 0
    for name, (code, a) in tensors.items():
        data = np.ascontiguousarray(a).tobytes()
        header[name] = {"dtype": code, "shape": list(a.shape), "data_offsets": [at, at + len(data)]}
        blobs.append(data)
        at += len(data)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def test_a_uint32_checkpoint_tensor_packs_or_is_refused_before_any_work(tmp_path: Path) -> None:
    u = np.array([0, 1, 2**31, 2**32 - 1], np.uint32)
    w = np.random.default_rng(0).standard_normal((8, 8)).astype(np.float32)
    for i, name in enumerate(("base", "a", "b")):
        _safetensors(tmp_path / f"{name}.safetensors", {"w": ("F32", w + 0.01 * i), "u": ("U32", u + i)})
    tasks = {t: tmp_path / f"{t}.safetensors" for t in ("a", "b")}
    out = tmp_path / "x.tallpack"
    if not hasattr(torch, "uint32"):  # torch 2.1, 2.2
        with pytest.raises(tallpack.CheckpointError,
                           match=r"base\.safetensors: tensor 'u': dtype 'uint32' needs torch>=2\.3 \(this is torch "):
            tallpack.pack(tmp_path / "base.safetensors", tasks, out)
        assert not out.exists() and not list(tmp_path.glob("x.tallpack*"))
        return
    tallpack.pack(tmp_path / "base.safetensors", tasks, out)
    with tallpack.open(out) as fam:
        got = fam.get_tensor("b", "u")
        assert got.dtype == torch.uint32 and np.array_equal(got.numpy(), u + 2)
        assert fam.verify() == []
        written = tallpack.write_task(fam, "b", tmp_path / "b")  # (torch 2.1: "task 'b', tensor 'u': needs torch>=2.3")
    from safetensors.torch import load_file

    assert np.array_equal(load_file(written)["u"].numpy(), u + 2)


@pytest.mark.parametrize("name", sorted(UNSIGNED))
def test_unsigned_arrays_are_read_as_their_bits(name: str) -> None:
    """An archive's unsigned array, as the reader holds it (a uint tensor, or on torch 2.1 the
    signed one of its width), gives back the stored values, the top bit set too."""
    u = UNSIGNED[name]
    want = np.array([0, 1, np.iinfo(u).max // 2 + 1, np.iinfo(u).max], u)
    t = view_tensor(want.tobytes(), name, (4,))
    assert t.dtype == array_dtype(name) and t.element_size() == want.itemsize
    got = as_numpy(t, name)
    assert got.dtype == want.dtype and np.array_equal(got, want)
    signed = torch.from_numpy(want.view(f"i{want.itemsize}"))  # torch 2.1's stand-in: -1 for the largest
    assert np.array_equal(as_numpy(signed, name), want)
    assert as_numpy(torch.tensor([-1.5]), "float32").tolist() == [-1.5]  # other dtypes as they are


@pytest.mark.parametrize("dtype", [getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "bfloat16")
                                   if hasattr(torch, n)])
def test_cat_joins_the_bytes_of_every_float_dtype(dtype: torch.dtype) -> None:
    raw = np.random.default_rng(1).integers(0, 256, 2 * 7 + 2 * 5, dtype=np.uint8)
    parts = [torch.from_numpy(raw[:14].copy()).view(dtype), torch.from_numpy(raw[14:].copy()).view(dtype)]
    joined = cat(parts)
    assert joined.dtype == dtype and np.array_equal(joined.view(torch.uint8).numpy(), raw)


def test_exact_residuals_and_sparse_corrections_read_back(tmp_path: Path) -> None:
    """The arrays torch 2.1 holds as signed stand-ins: the exact tier's uint32 residuals give the
    originals bit for bit, and the sparse correction's uint32 indices put each kept entry where it
    belongs (the corrected read is closer to the fine-tune than the plain TALL one)."""
    base, fts = family("sparse")
    ex, sp, plain = tmp_path / "e.tallpack", tmp_path / "s.tallpack", tmp_path / "p.tallpack"
    tallpack.pack(base, fts, ex, exact=True)
    tallpack.pack(base, fts, sp, fidelity=0.99, corrections=("sparse",))
    tallpack.pack(base, fts, plain)
    with tallpack.open(ex) as fam:
        assert {tt.extras["exact"].residual.dtype for e in fam.manifest.tensors for tt in e.tasks.values()
                if "exact" in tt.extras} == {"uint32"}
        for task, sd in fts.items():
            got = fam.state_dict(task, exact=True)
            assert all(torch.equal(got[k].view(torch.uint8), v.view(torch.uint8)) for k, v in sd.items()), task
        assert fam.verify() == []
    with tallpack.open(sp) as fam, tallpack.open(plain) as ref:
        sparse = [(e.name, t, tt) for e in fam.manifest.tensors for t, tt in e.tasks.items()
                  if "correction" in tt.extras and tt.extras["correction"].kind == "sparse"]
        assert sparse, "no sparse correction: the family no longer makes one"
        for name, task, tt in sparse:
            ind = tt.extras["correction"].refs["indices"]
            got = as_numpy(fam.read_array(ind, name, Use.INPUT), ind.dtype)
            assert ind.dtype == "uint32" and got.dtype == np.uint32
            assert int(got.astype(np.uint64).sum()) < int(np.prod(tt.shape))
            x = fts[task][name]
            err = float((fam.get_tensor(task, name) - x).abs().max())
            assert err < float((ref.get_tensor(task, name) - x).abs().max()), (name, task)
        assert fam.verify() == []
