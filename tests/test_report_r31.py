"""``inspect --tensors``' member densities: only damage is a warning; an archive closed meanwhile is
an error (as a cut connection is), not one warning per group."""

from __future__ import annotations

import logging

import pytest
import torch

import tallpack
from tallpack.errors import ArchiveClosedError
from tallpack.report import tensor_rows


def test_inspect_tensors_of_a_closed_archive_raises_not_a_warning_per_group(tmp_path, caplog):
    g = torch.Generator().manual_seed(31)
    base = {f"l{i}.b": torch.randn(300, generator=g) for i in range(40)}  # small tensors: stored in groups
    tasks = {t: {k: v + 0.05 * torch.randn(v.shape, generator=g) * (torch.rand(v.shape, generator=g) < 0.4)
                 for k, v in base.items()} for t in ("a", "b")}
    tallpack.pack(base, tasks, tmp_path / "g.tallpack")
    fam = tallpack.open(tmp_path / "g.tallpack", cache_bytes=0)
    assert any(e.members for e in fam.manifest.tensors)
    assert any(r.get("group") and r["density"] for r in tensor_rows(fam.manifest, fam.read_array, fam.packed_bits))
    fam.close()
    with caplog.at_level(logging.WARNING), pytest.raises(ArchiveClosedError):
        tensor_rows(fam.manifest, fam.read_array, fam.packed_bits)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
