"""Review of round 27's input reads (tensors read with preadv into memory of their own) and dial threads.

Each test failed before its fix: the command or file it names is real (torch.save's zip files,
safetensors files), compared bit for bit with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch

from tallpack.sources import open_source


def _big_endian(src: Path, dst: Path, itemsizes: dict[str, int]) -> None:
    """``src`` (a torch.save zip) as a big-endian machine (s390x) writes it: the ``byteorder``
    record says ``big`` and each storage record's elements are byte-swapped (``itemsizes``: each
    record's element size, by its key)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info)
            key = info.filename.rsplit("/", 1)[-1]
            if info.filename.endswith("/byteorder"):
                data = b"big"
            elif "/data/" in info.filename and key in itemsizes and itemsizes[key] > 1:
                data = np.frombuffer(data, dtype=f"u{itemsizes[key]}").byteswap().tobytes()
            zout.writestr(info.filename, data)


def test_a_big_endian_torch_file_reads_as_torch_load_reads_it(tmp_path: Path) -> None:
    """A file saved on a big-endian machine: torch.load swaps its elements to the machine's order;
    the reads of its tensors did not (float32 1.0 came back as 4.6e-41)."""
    g = torch.Generator().manual_seed(0)
    big = torch.randn(300, 300, generator=g)  # over 256 KB: a block of the reuse pool
    sd = {"f32": big, "bf16": big[:10].to(torch.bfloat16), "i64": torch.arange(7), "bool": big[0] > 0,
          "view": big[3:40:2, 5:9]}  # a slice of f32's storage at an offset, strided
    torch.save(sd, tmp_path / "le.pt")
    _big_endian(tmp_path / "le.pt", tmp_path / "be.pt", {"0": 4, "1": 2, "2": 8, "3": 1})
    want = torch.load(tmp_path / "be.pt", weights_only=True)
    assert torch.equal(want["f32"], big)  # (the file is what torch reads as the tensors saved)
    src = open_source(tmp_path / "be.pt")
    try:
        for name, t in want.items():
            got = src.get(name)
            assert got.dtype == t.dtype and got.shape == t.shape
            assert torch.equal(got.contiguous().reshape(-1).view(torch.uint8), t.contiguous().reshape(-1).view(torch.uint8)), name
    finally:
        src.close()
