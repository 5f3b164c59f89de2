"""Views of a mapped archive's raw arrays kept across reads (``Archive._views``): a second read of a
raw tensor's base and merged vector reads no chunk again, with the same checks a read makes (the
archive open, the file not shrunk), and the same bits."""

from __future__ import annotations

import os

import pytest
import torch

import tallpack
from tallpack.errors import ArchiveClosedError, IntegrityError


@pytest.fixture
def raw(tmp_path):
    g = torch.Generator().manual_seed(31)
    base = {"w": torch.randn(512, 256, generator=g), "v": torch.randn(300, 64, generator=g)}
    tasks = {t: {k: v + 0.05 * torch.randn(v.shape, generator=g) * (torch.rand(v.shape, generator=g) < 0.3)
                 for k, v in base.items()} for t in ("a", "b")}
    path = tmp_path / "raw.tallpack"
    tallpack.pack(base, tasks, path, codec="raw", group=False)
    return path


def _chunk_reads(fam, monkeypatch) -> list[str]:
    """What each stored chunk read is for (``ContainerReader._stored``: every array's path)."""
    reads: list[str] = []
    stored = fam._c._stored

    def counting(ref, i, where, *args, **kwargs):
        reads.append(where)
        return stored(ref, i, where, *args, **kwargs)
    monkeypatch.setattr(fam._c, "_stored", counting)
    return reads


def test_a_raw_tensor_read_again_reads_only_its_mask(raw, monkeypatch):
    with tallpack.open(raw) as fam, tallpack.open(raw, cache_bytes=0) as plain:
        first = {t: fam.get_tensor(t, "w") for t in fam.tasks}
        reads = _chunk_reads(fam, monkeypatch)
        for t in fam.tasks:
            again = fam.get_tensor(t, "w")
            assert torch.equal(again, first[t]) and again.data_ptr() != first[t].data_ptr()
            assert torch.equal(again, plain.get_tensor(t, "w"))
        assert reads and all("(mask)" in w for w in reads), reads  # base and merged: the kept views
        again.add_(1)  # the caller's own: the next read is not changed
        assert torch.equal(fam.get_tensor("b", "w"), first["b"])
        sd = fam.state_dict("a")
        assert all(torch.equal(sd[k], v) for k, v in plain.state_dict("a").items())


def test_a_kept_view_still_says_a_file_shrunk_or_closed(raw):
    fam = tallpack.open(raw)
    fam.get_tensor("a", "w")
    assert fam._views
    os.truncate(raw, raw.stat().st_size // 2)
    with pytest.raises(IntegrityError, match="shrank"):
        fam.get_tensor("a", "w")
    fam.close()
    assert not fam._views
    with pytest.raises(ArchiveClosedError):
        fam.get_tensor("a", "w")


def test_compressed_arrays_keep_no_views(tmp_path):
    g = torch.Generator().manual_seed(3)
    base = {"w": torch.randn(512, 256, generator=g)}
    tasks = {t: {"w": base["w"] + 0.05 * torch.randn(512, 256, generator=g)} for t in ("a", "b")}
    tallpack.pack(base, tasks, tmp_path / "planes.tallpack")
    with tallpack.open(tmp_path / "planes.tallpack") as fam:
        fam.get_tensor("a", "w")
        assert not fam._views


def test_a_remote_archive_keeps_no_views(http_server, raw):
    """Over HTTP nothing is mapped: each read fetches (or takes from the remote file's cache) and
    checks its chunks, as before."""
    pytest.importorskip("aiohttp")
    import shutil

    shutil.copy(raw, http_server.root / "views.tallpack")
    with tallpack.open(f"{http_server.url}/views.tallpack") as fam, tallpack.open(raw) as local:
        for _ in range(2):
            assert torch.equal(fam.get_tensor("a", "w"), local.get_tensor("a", "w"))
        assert not fam._views
