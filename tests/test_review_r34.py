"""Round 34's review: bugs found in the round's changes, each with the test that showed it."""

from __future__ import annotations

import hashlib
import json

import torch
from safetensors.torch import save_file

import tallpack
from tallpack.sources import SafetensorsSource


def _empties(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {"w": torch.randn(32, 32, generator=g), "x": torch.randn(32, generator=g)}
    for n in "pqrstuv":  # empty tensors: all at one data offset
        sd[f"e.{n}"] = torch.zeros(0)
    return sd


def test_a_safetensors_files_empty_tensors_come_in_one_order_every_open(tmp_path):
    """safetensors' offset_keys() lists tensors of equal data offsets (empty ones) in hash order,
    another at each open: the task's key order, and the archive's bytes, changed run to run."""
    save_file(_empties(0), tmp_path / "m.safetensors")
    raw = (tmp_path / "m.safetensors").read_bytes()
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    want = sorted((k for k in header if k != "__metadata__"), key=lambda k: (*header[k]["data_offsets"], k))
    orders = set()
    for _ in range(8):
        src = SafetensorsSource("m", [tmp_path / "m.safetensors"])
        try:
            orders.add(tuple(src.keys()))
        finally:
            src.close()
    assert orders == {tuple(want)}


def test_an_archive_of_empty_tensors_is_the_same_bytes_each_pack(tmp_path):
    save_file(_empties(0), tmp_path / "base.safetensors")
    for i, t in enumerate("ab"):
        save_file({k: v + 0.01 * (i + 1) for k, v in _empties(0).items()}, tmp_path / f"{t}.safetensors")
    digests = set()
    for _ in range(2):
        tallpack.pack(tmp_path / "base.safetensors", {t: tmp_path / f"{t}.safetensors" for t in "ab"},
                      tmp_path / "f.tallpack", overwrite=True)
        digests.add(hashlib.sha256((tmp_path / "f.tallpack").read_bytes()).hexdigest())
    assert len(digests) == 1
