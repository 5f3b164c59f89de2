"""The review of this round's row reads (``exact.spans``: ``get_slice`` of exact originals and of
the lossy rebuilds of derived entries): the findings, each a test that failed before its fix."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

import tallpack
from tallpack import remote
from tallpack.encodings import exact
from test_exact_slices_r31 import CHUNK, COLS, ROWS, _bits, _family


@pytest.fixture(scope="module")
def derived_merged(tmp_path_factory) -> Path:
    """Three float32 tasks changing every weight: ``tall-derived-merged`` entries."""
    root = tmp_path_factory.mktemp("fam")
    base, tasks = _family(root, torch.float32, 1.0)
    out = root / "x.tallpack"
    tallpack.pack(base, tasks, str(out), exact=True, chunk_elements=CHUNK)
    with tallpack.open(out) as fam:
        assert {tt.encoding for tt in fam._tensors["emb"].tasks.values()} == {"tall-derived-merged"}
    return out


@pytest.mark.parametrize("exact_read", [True, False], ids=["exact", "lossy"])
def test_remote_rows_are_fetched_in_windows_each_chunk_once(http_server, derived_merged, monkeypatch, exact_read):
    """Rows of many chunks from a remote archive: their chunks fetched a window (PREFETCH_BYTES)
    at a time, as a whole read's runs (``exact.runs``), each once; not every array's chunks of the
    rows in one request, more than the remote cache keeps (MAX_CACHE, 256 MiB: a rank's share of
    an 8B model's embedding and its tasks' residuals), whose first chunks it then drops before
    they are read, and fetches again one by one."""
    name = f"windows-{exact_read}.tallpack"
    shutil.copy(derived_merged, http_server.root / name)
    monkeypatch.setattr(exact, "RUN_ELEMENTS", CHUNK)  # a run a chunk: many runs in the rows
    monkeypatch.setattr(exact, "PREFETCH_BYTES", 32 << 10)
    monkeypatch.setattr(remote, "MAX_CACHE", 128 << 10)  # the rows' chunks are several times more
    a, b = 100, ROWS - 100
    with tallpack.open(f"{http_server.url}/{name}", cache_bytes=0) as fam, tallpack.open(derived_merged) as local:
        want = local.get_tensor("t0", "emb", exact=exact_read)[a:b]
        entry = fam._tensors["emb"]
        tasks = ["t0"] if exact_read else list(fam.tasks)  # a lossy row of tau_MTL needs every task's
        refs = [entry.tasks[t].extras["exact"].residual for t in tasks] + [entry.arrays["base"]]
        chunks = [c for r in refs for c in r.chunks[a * COLS // CHUNK : -(-b * COLS // CHUNK)]]
        need = sum(c.nbytes for c in chunks)
        assert need > 4 * remote.MAX_CACHE
        http_server.reset()
        got = fam.get_slice("t0", "emb", exact=exact_read)[a:b]
        assert torch.equal(_bits(got), _bits(want))
        assert need <= http_server.served() <= need + 63 * len(chunks), (http_server.served(), need)
        biggest = max(c.nbytes for c in chunks)
        assert max(n for m, _, n in http_server.log if m == "GET") <= exact.PREFETCH_BYTES + len(refs) * (biggest + 63)


def test_the_test_servers_log_holds_an_answer_once_it_is_received(http_server):
    """The range server logs a request before it answers: a test that resets the log, then reads,
    counts no request answered before (an archive's manifest, its log entry written after the
    client had it: test_exact_slices_r31's byte counts failed one run in a few)."""
    import urllib.request

    (http_server.root / "log.bin").write_bytes(bytes(range(256)) * 64)
    http_server.reset()
    for i in range(200):
        req = urllib.request.Request(f"{http_server.url}/log.bin", headers={"Range": f"bytes={i}-{i + 4000}"})
        with urllib.request.urlopen(req) as r:
            assert len(r.read()) == 4001
        assert len(http_server.log) == i + 1, i


def _spliced(a: Path, b: Path, task: str, out: Path) -> None:
    """Archive ``a`` with ``task``'s exact field of tensor "emb" taken from ``b`` (the same family
    packed with other chunk_elements): its residual's chunks copied after ``a``'s data, 64-byte
    aligned. A valid archive (spec §3: each array has its own chunk_elements) no tallpack packs:
    the tasks' residuals of one tensor chunked unlike."""
    import json
    import zlib

    import zstandard

    from tallpack.container import FOOTER
    from test_fuzz import manifest_of

    raw_a, raw_b = a.read_bytes(), b.read_bytes()
    ma, mb = manifest_of(raw_a), manifest_of(raw_b)
    m_off, _, _, flags, end = FOOTER.unpack(raw_a[-FOOTER.size:])
    ex = next(e for e in mb["tensors"] if e["name"] == "emb")["tasks"][task]["exact"]
    data = bytearray(raw_a[:m_off])
    for offset, nbytes, _ in next(e for e in ma["tensors"] if e["name"] == "emb")["tasks"][task]["exact"]["residual"]["chunks"]:
        data[offset : offset + nbytes] = bytes(nbytes)  # ``a``'s own, no longer an array's: padding
    for c in ex["residual"]["chunks"]:
        data += bytes(-len(data) % 64)
        offset, nbytes = c[0], c[1]
        c[0] = len(data)
        data += raw_b[offset : offset + nbytes]
    data += bytes(-len(data) % 64)
    next(e for e in ma["tensors"] if e["name"] == "emb")["tasks"][task]["exact"] = ex
    stored = zstandard.ZstdCompressor().compress(json.dumps(ma).encode())
    out.write_bytes(bytes(data) + stored + FOOTER.pack(len(data), len(stored), zlib.crc32(stored), flags, end))


@pytest.mark.parametrize("cache_bytes", [0, None])
def test_lossy_rows_of_a_tensor_whose_residuals_are_chunked_unlike(tmp_path, cache_bytes):
    """A lossy slice of a ``tall-derived-merged`` tensor whose tasks' residuals have different
    chunk_elements (not read by ranges: ``exact.by_ranges``): the whole tensor's rows, as before
    this round (it went on to the row path of element-wise encodings: a RuntimeError)."""
    base, tasks = _family(tmp_path, torch.float32, 1.0)
    a, b, out = tmp_path / "a.tallpack", tmp_path / "b.tallpack", tmp_path / "x.tallpack"
    tallpack.pack(base, tasks, str(a), exact=True, chunk_elements=CHUNK)
    tallpack.pack(base, tasks, str(b), exact=True, chunk_elements=CHUNK + 8)
    _spliced(a, b, "t1", out)
    kw = {} if cache_bytes is None else {"cache_bytes": cache_bytes}
    with tallpack.open(out, **kw) as fam:
        entry = fam._tensors["emb"]
        assert {tt.extras["exact"].residual.chunk_elements for tt in entry.tasks.values()} == {CHUNK, CHUNK + 8}
        assert {tt.encoding for tt in entry.tasks.values()} == {"tall-derived-merged"}
        assert fam.verify() == []
        for t in fam.tasks:
            whole, original = fam.get_tensor(t, "emb"), fam.get_tensor(t, "emb", exact=True)
            for lo, hi in [(0, 1), (100, 200), (ROWS - 1, ROWS)]:
                assert torch.equal(_bits(fam.get_slice(t, "emb")[lo:hi]), _bits(whole[lo:hi])), (t, lo, hi)
                assert torch.equal(_bits(fam.get_slice(t, "emb", exact=True)[lo:hi]), _bits(original[lo:hi]))
