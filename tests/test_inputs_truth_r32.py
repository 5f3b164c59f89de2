"""The packer stores a checkpoint's own bytes, whatever file holds them: every tensor an exact read
of the archive gives is, bit for bit, what ``torch.load(weights_only=True)`` or ``safe_open`` gives
for the file it was packed from (views, offsets, shared storages, wrappers, legacy files, shards,
tensors read a block at a time)."""

from __future__ import annotations

import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import tallpack


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The bytes of ``t`` in C order (NaN payloads and -0.0 kept)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def _same(got: torch.Tensor, want: torch.Tensor) -> bool:
    return got.dtype == want.dtype and got.shape == want.shape and torch.equal(_bits(got), _bits(want))


# -- found by hand -----------------------------------------------------------------------------------

def _alike_at_the_windows(w: torch.Tensor) -> torch.Tensor:
    """A copy of ``w`` that differs from it everywhere but its first, middle and last 64 bytes."""
    n = w.numel()
    other = w.clone()
    other[20:n // 2 - 20] += 1
    other[n // 2 + 20:n - 20] += 1
    return other


def test_a_copy_alike_at_its_first_middle_and_last_bytes_is_not_taken_for_the_weights(tmp_path):
    """A checkpoint that pickles a copy of the weights first, nested where it is not packed (an
    EMA's ``{"ema": {"state_dict": ...}}``), whose bytes are the weights' at the 64-byte windows
    compared but differ elsewhere, and whose record lies a page before the weights': the weights'
    own record is read (the copy's was, silently)."""
    paths = {}
    sds = {}
    for i, t in enumerate(("base", "a", "b")):
        w = torch.arange(1000, dtype=torch.float32) + i  # 4000 bytes: records a page apart
        sds[t] = {"w": w}
        torch.save({"ema": {"state_dict": {"w": _alike_at_the_windows(w)}}, "model": {"w": w}}, tmp_path / f"{t}.pt")
        paths[t] = str(tmp_path / f"{t}.pt")
    assert tallpack.sources.open_source(paths["a"]).get("w").equal(sds["a"]["w"])
    out = tmp_path / "fam.tallpack"
    tallpack.pack(paths["base"], {"a": paths["a"], "b": paths["b"]}, out, exact=True)
    with tallpack.open(out) as fam:
        for t in "ab":
            assert _same(fam.state_dict(t, exact=True)["w"], sds[t]["w"]), t


def _rewritten(src: Path, dst: Path, *, order: list[int] | None = None, align: int = 64, pad: int = 0,
               big: dict[str, int] | None = None) -> None:
    """``src`` (a torch.save zip) written again with Python's zipfile: its records in ``order``, each
    record's data aligned to ``align`` bytes (0: not aligned) by an extra field of ``pad`` bytes and
    more, and, with ``big`` (each storage record's element size by its key), as a big-endian machine
    (s390x) writes it: ``byteorder`` says ``big`` and the elements are byte-swapped."""
    with zipfile.ZipFile(src) as zin, open(dst, "wb") as raw:
        infos = zin.infolist()
        with zipfile.ZipFile(raw, "w", zipfile.ZIP_STORED) as zout:
            for info in ([infos[i] for i in order] if order is not None else infos):
                data = zin.read(info)
                key = info.filename.rsplit("/", 1)[-1]
                if big is not None and info.filename.endswith("/byteorder"):
                    data = b"big"
                elif big is not None and "/data/" in info.filename and big.get(key, 1) > 1:
                    data = np.frombuffer(data, dtype=f"u{big[key]}").byteswap().tobytes()
                zi = zipfile.ZipInfo(info.filename, date_time=(1980, 1, 1, 0, 0, 0))
                start = raw.tell() + 30 + len(info.filename.encode()) + 4 + pad  # (4: the extra field's head)
                n = pad + ((-start) % align if align else 0)
                zi.extra = struct.pack("<HH", 0xCAFE, n) + b"\0" * n
                zout.writestr(zi, data)


@pytest.mark.parametrize("n", [8, 1000, 1024])  # 1000 float32: the optimizer's record a page before the weights'
def test_a_big_endian_checkpoint_after_its_optimizer_packs_its_own_bytes(tmp_path, n):
    """A big-endian file (s390x) whose optimizer is pickled before its state dict, records aligned as
    torch.save aligns them: its weights' own record is read (the optimizer's was, where it lay a
    page before: the bytes were not compared for a big-endian file)."""
    g = torch.Generator().manual_seed(0)
    paths, sds = {}, {}
    for t in ("base", "a", "b"):
        w = torch.randn(n, generator=g)
        opt = {"state": {0: {"exp_avg": torch.randn(n, generator=g)}}, "param_groups": [{"params": [0]}]}
        torch.save({"optimizer": opt, "model": {"w": w}}, tmp_path / "le.pt")
        _rewritten(tmp_path / "le.pt", tmp_path / f"{t}.pt", big={"0": 4, "1": 4})
        assert _same(torch.load(tmp_path / f"{t}.pt", weights_only=True)["model"]["w"], w)
        paths[t], sds[t] = str(tmp_path / f"{t}.pt"), {"w": w}
    out = tmp_path / "fam.tallpack"
    tallpack.pack(paths["base"], {"a": paths["a"], "b": paths["b"]}, out, exact=True)
    with tallpack.open(out) as fam:
        assert _same(fam.base_tensor("w"), sds["base"]["w"])
        for t in "ab":
            assert _same(fam.state_dict(t, exact=True)["w"], sds[t]["w"]), t
