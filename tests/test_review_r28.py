"""Review of the twenty-eighth round (large tensors a block at a time; merged tensors built in runs):
corner cases found by reading the diff, each pinned here with its fix."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

import tallpack
import tallpack.merged as M

CE = 1 << 14


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def test_a_remote_consensus_merge_built_in_runs_fetches_its_tensor_at_once(http_server, tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A tensor built in runs from a remote archive prefetches its arrays as one built whole does:
    a consensus model read every chunk of every array in a request of its own (the writer
    interleaves the arrays' chunks, so a run's reads do not coalesce): 247 requests against 2."""
    pytest.importorskip("aiohttp")  # fsspec's HTTP file system
    g = torch.Generator().manual_seed(0)
    n = 40 * CE + 17
    base = {"big": torch.randn(n, generator=g) * 0.02, "s": torch.ones(4)}
    fts = {f"t{i}": {k: v + 1e-3 * torch.randn(v.shape, generator=g) for k, v in base.items()} for i in range(4)}
    local = tmp_path / "runs.tallpack"
    tallpack.pack(base, fts, local, chunk_elements=CE)
    shutil.copy(local, http_server.root / "runs.tallpack")
    url = f"{http_server.url}/runs.tallpack"
    got = {}
    for chunked in (1 << 60, CE):  # built whole, then in runs
        monkeypatch.setattr(M, "CHUNKED_FROM", chunked)
        with tallpack.open(url) as fam:
            http_server.reset()
            t = fam.merged("consensus-ta")["big"]
            got[chunked] = (t, http_server.gets())
    (whole, whole_gets), (runs, runs_gets) = got[1 << 60], got[CE]
    assert torch.equal(_bits(runs), _bits(whole))
    assert runs_gets <= whole_gets + 1, (runs_gets, whole_gets)
