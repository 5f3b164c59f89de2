"""Remote reads fetch each byte once (round 34): the bytes and requests a plain HTTP server on
loopback counts (``tests/rangeserver.py``) for the reads that read a chunk twice, an exact
archive's above all, and the requests that waited one after another."""

from __future__ import annotations

import shutil

import pytest
import torch

import tallpack
import tallpack.remote
from tallpack.reader import iter_arrays

pytest.importorskip("aiohttp")  # fsspec's HTTP file system


@pytest.fixture(scope="module")
def exact(http_server, tmp_path_factory):
    """A bf16 family of three tasks packed with the exact tier (masks and merged vectors derived from
    the originals, format 1.8) in small chunks, served over HTTP."""
    g = torch.Generator().manual_seed(34)
    base = {f"layers.{i}.w": (0.02 * torch.randn(64, 96, generator=g)).bfloat16() for i in range(3)}
    tasks = {t: {k: (v.float() + 0.002 * torch.randn(v.shape, generator=g) * (torch.rand(v.shape, generator=g) < 0.3)
                     ).bfloat16() for k, v in base.items()} for t in ("a", "b", "c")}
    local = tmp_path_factory.mktemp("exact") / "exact.tallpack"
    tallpack.pack(base, tasks, local, chunk_elements=1024, exact=True)
    shutil.copy(local, http_server.root / "exact.tallpack")
    return {"local": local, "url": f"{http_server.url}/exact.tallpack", "tasks": tasks}


def _twice(log: list[tuple[str, int, int]]) -> int:
    """Bytes the server sent more than once (overlaps of the GETs' ranges)."""
    spans = sorted((s, s + n) for m, s, n in log if m == "GET")
    total = covered = 0
    end = -1
    for a, b in spans:
        total += b - a
        if b > end:
            covered += b - max(a, end)
            end = b
    return total - covered


def _gaps(fam) -> list[tuple[int, int, int]]:
    """The padding between the archive's chunks: (start, end, bytes)."""
    out, end = [], 0
    for off, n, _ in fam._c._spans():
        if end and off > end:
            out.append((end, off, off - end))
        end = max(end, off + n)
    return out


def _stored(fam, keys: set[str]) -> int:
    return sum(ref.stored_nbytes for _, key, ref in iter_arrays(fam.manifest.tensors) if key in keys)


def test_a_lossy_read_of_an_exact_archive_fetches_each_chunk_once(http_server, exact):
    # a derived merged vector is rebuilt from every task's original, then the task's mask from its
    # own: its residual (and the base) were fetched again for the second (the residual: 12% of a
    # bf16 family's state dict fetched twice; merged(): the base, 30% of the archive)
    with tallpack.open(exact["url"]) as fam, tallpack.open(exact["local"]) as ref:
        http_server.reset()
        assert torch.equal(fam.get_tensor("b", "layers.1.w"), ref.get_tensor("b", "layers.1.w"))
        assert http_server.gets() and _twice(http_server.log) == 0
        http_server.reset()
        sd = fam.state_dict("a")
        assert all(torch.equal(sd[k], v) for k, v in ref.state_dict("a").items())
        assert _twice(http_server.log) == 0
    with tallpack.open(exact["url"]) as fam, tallpack.open(exact["local"]) as ref:
        http_server.reset()
        merged = fam.merged()
        assert all(torch.equal(merged[k], v) for k, v in ref.merged().items())
        assert _twice(http_server.log) == 0


def test_an_exact_state_dict_fetches_the_base_and_its_residuals_only(http_server, exact):
    # state_dict(exact=True) prefetched what the lossy read needs: every task's residual (a
    # derived merged vector's), which an exact read never reads (a 31 MB bf16 archive: 31.4 MB
    # fetched for the 17.8 MB that task's exact read needs)
    with tallpack.open(exact["url"]) as fam, tallpack.open(exact["local"]) as ref:
        http_server.reset()
        sd = fam.state_dict("b", exact=True)
        assert all(torch.equal(sd[k], t) for k, t in exact["tasks"]["b"].items())
        need = _stored(ref, {"base", "b/exact/residual"})
        chunks = sum(len(r.chunks) for _, k, r in iter_arrays(ref.manifest.tensors) if k in {"base", "b/exact/residual"})
        assert need <= http_server.served() <= need + 63 * chunks
        assert _twice(http_server.log) == 0


def test_a_second_lossy_task_of_an_exact_archive_fetches_its_residuals_only(http_server, exact, monkeypatch):
    # the merged vector derived for the first task is in the cache, yet each later task prefetched
    # every task's residual again to derive it (a 31 MB bf16 archive: 16.4 MB fetched for the
    # second task's 4.5 MB, when what the first task fetched is no longer kept: KEEP_READ)
    monkeypatch.setattr(tallpack.remote, "KEEP_READ", 0)
    with tallpack.open(exact["url"]) as fam, tallpack.open(exact["local"]) as ref:
        fam.state_dict("a")
        http_server.reset()
        sd = fam.state_dict("b")
        assert all(torch.equal(sd[k], v) for k, v in ref.state_dict("b").items())
        need = _stored(ref, {"b/exact/residual"})
        assert need <= http_server.served() <= need + 63 * len(ref.keys("b")) * 4


def test_verify_waits_on_the_server_a_few_times_not_once_a_padding_gap(http_server, exact):
    # the padding between chunks was read one gap at a time, each a request waited for in turn (a
    # 28 MB archive: 911 of them, 61 s at 20 ms a request); and every chunk fetched a second time
    # for the originals' rebuilds
    with tallpack.open(exact["url"]) as fam:
        source = fam.source
        gaps = len(_gaps(fam))
        rounds, requests = source.rounds, source.requests
        http_server.reset()
        assert fam.verify() == []
        assert gaps > 50
        assert source.rounds - rounds <= 10  # the ends, the padding, the chunks, in a few waits
        assert source.requests - requests == http_server.gets()
        padding = sum(n for _, _, n in _gaps(fam))
        assert _twice(http_server.log) <= padding + 128  # the padding (in the chunks' requests too), the ends
