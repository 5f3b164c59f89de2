"""Remote reads of large arrays (round 37): an array that stores more than a prefetch batch
(``container.PREFETCH_BYTES``) is no longer fetched a chunk a request, one after another, but
read ahead in windows (``container.READ_AHEAD_BYTES``), each window fetched once however many
threads read its chunks. Sizes are made small here (the module constants) so that a family of a
few MB has such an array; the plain HTTP server on loopback counts what is fetched
(``tests/rangeserver.py``)."""

from __future__ import annotations

import os
import shutil
import threading
import time

import pytest
import torch

import tallpack
import tallpack.container
import tallpack.reader
import tallpack.remote
from tallpack.errors import IntegrityError, RemoteError
from tallpack.reader import iter_arrays
from test_remote_r34 import _twice

pytest.importorskip("aiohttp")  # fsspec's HTTP file system

#: the sizes the tests read with: the embedding's base and merged vector (16 chunks of some 120 KB
#: each) are larger than a prefetch batch, and a window holds four of their chunks
PREFETCH = 512 << 10
WINDOW = 512 << 10


@pytest.fixture(scope="module")
def large(http_server, tmp_path_factory):
    """An fp32 family of three tasks with one large tensor (an embedding of 512 x 1024, in chunks
    of 32K elements) and two small ones, served over HTTP."""
    g = torch.Generator().manual_seed(37)
    base = {"embed": 0.02 * torch.randn(512, 1024, generator=g), "layers.0.w": 0.02 * torch.randn(64, 64, generator=g),
            "norm": torch.ones(1024)}
    tasks = {f"t{t}": {k: v + 0.002 * torch.randn(v.shape, generator=g) * (torch.rand(v.shape, generator=g) < 0.3)
                       for k, v in base.items()} for t in range(3)}
    local = tmp_path_factory.mktemp("large37") / "large.tallpack"
    tallpack.pack(base, tasks, local, chunk_elements=1 << 15)
    shutil.copy(local, http_server.root / "large37.tallpack")
    return {"local": local, "url": f"{http_server.url}/large37.tallpack", "name": "large37.tallpack"}


@pytest.fixture
def small_sizes(monkeypatch):
    """Prefetch batches and read-ahead windows of 512 KiB (the reader imports PREFETCH_BYTES too)."""
    monkeypatch.setattr(tallpack.container, "PREFETCH_BYTES", PREFETCH)
    monkeypatch.setattr(tallpack.reader, "PREFETCH_BYTES", PREFETCH)
    monkeypatch.setattr(tallpack.container, "READ_AHEAD_BYTES", WINDOW, raising=False)  # (raising: before r37)


def _embed(fam, keys=("base", "merged")) -> list:
    """The embedding's arrays of these keys (and every task's mask if ``"mask"`` is asked)."""
    return [ref for name, key, ref in iter_arrays(fam.manifest.tensors)
            if name == "embed" and (key in keys or ("mask" in keys and key.endswith("/mask")))]


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


def test_the_fixture_has_an_array_larger_than_a_prefetch_batch(large):
    with tallpack.open(large["local"]) as fam:
        refs = _embed(fam)
        assert all(ref.stored_nbytes > PREFETCH for ref in refs)
        assert all(len(ref.chunks) == 16 and ref.chain.planar_itemsize == 4 for ref in refs)


def test_a_large_array_is_read_ahead_the_same_bits_in_a_few_requests_each_byte_once(http_server, large,
                                                                                     small_sizes):
    # before: one request a chunk (48 for the embedding's base, merged vector and mask), each
    # waiting for the one before on its thread (48 waits on 1 thread, 24 on 2); now the base's and
    # merged vector's chunks of a row, side by side in the file, go as one request, four rows a
    # window, and the mask's chunks (between the rows, and read first) all at once
    with tallpack.open(large["local"]) as ref:
        want = {t: ref.get_tensor(t, "embed") for t in ref.tasks}
        chunks = sum(len(r.chunks) for r in _embed(ref, ("base", "merged", "t1/mask")))
        stored = sum(r.stored_nbytes for r in _embed(ref, ("base", "merged", "t1/mask")))
    with tallpack.open(large["url"], cache_bytes=0) as fam:
        http_server.reset()
        rounds = fam.source.rounds
        got = fam.get_tensor("t1", "embed")
        assert _same(got, want["t1"])
        assert fam.source.rounds - rounds <= chunks // 4
        assert http_server.gets() <= 2 * chunks // 3
        assert _twice(http_server.log) == 0
        assert http_server.served() <= stored + 4096  # (alignment padding between chunks, fetched with them)
        for t in ("t0", "t2"):  # the base and merged vector again, and another mask: the same bits
            assert _same(fam.get_tensor(t, "embed"), want[t])


def test_a_whole_state_dict_from_far_is_the_local_one(large, small_sizes):
    with tallpack.open(large["local"]) as ref:
        want = ref.state_dict("t2")
    with tallpack.open(large["url"], cache_bytes=0) as fam:
        got = fam.state_dict("t2")
    assert want.keys() == got.keys() and all(_same(got[k], want[k]) for k in want)


def test_a_range_larger_than_a_request_is_fetched_in_pieces_and_joined(http_server, large, small_sizes, monkeypatch):
    # a window's chunks larger than a request (READ_AHEAD_REQUEST) go as several at once, joined back
    monkeypatch.setattr(tallpack.remote, "MAX_REQUEST", 16 << 10)
    monkeypatch.setattr(tallpack.container, "READ_AHEAD_REQUEST", 16 << 10, raising=False)
    with tallpack.open(large["local"]) as ref:
        want = ref.get_tensor("t0", "embed")
    with tallpack.open(large["url"], cache_bytes=0) as fam:
        http_server.reset()
        assert _same(fam.get_tensor("t0", "embed"), want)
        assert max(n for m, _, n in http_server.log if m == "GET") <= 16 << 10
        assert _twice(http_server.log) == 0


def test_threads_reading_the_same_array_at_once_fetch_each_window_once(http_server, large, small_sizes):
    # two tasks' embeddings read side by side from one archive (no decoded cache): the same base
    # and merged vector, each chunk wanted by both threads (and the archive's threads) at once
    with tallpack.open(large["local"]) as ref:
        want = {t: ref.get_tensor(t, "embed") for t in ("t0", "t1")}
        stored = sum(r.stored_nbytes for r in _embed(ref, ("base", "merged", "t0/mask", "t1/mask")))
    for _ in range(3):
        with tallpack.open(large["url"], cache_bytes=0, threads=4) as fam:
            http_server.reset()
            start = threading.Barrier(2)
            got: dict[str, torch.Tensor] = {}

            def read(task: str) -> None:
                start.wait()
                got[task] = fam.get_tensor(task, "embed")

            threads = [threading.Thread(target=read, args=(t,)) for t in want]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert all(_same(got[t], want[t]) for t in want)
            assert _twice(http_server.log) == 0
            assert http_server.served() <= stored + 8192


def test_a_damaged_chunk_of_a_large_array_says_which_tensor_and_chunk(http_server, large, small_sizes, tmp_path):
    damaged = http_server.root / "damaged37.tallpack"
    shutil.copy(large["local"], damaged)
    with tallpack.open(damaged) as fam:
        c = _embed(fam, ("merged",))[0].chunks[9]
    with open(damaged, "r+b") as f:
        f.seek(c.offset + c.nbytes // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    with tallpack.open(damaged) as fam:
        with pytest.raises(IntegrityError) as local:
            fam.get_tensor("t1", "embed")
    with tallpack.open(f"{http_server.url}/damaged37.tallpack", cache_bytes=0) as fam:
        with pytest.raises(IntegrityError) as far:
            fam.get_tensor("t1", "embed")
        problems = fam.verify()
    said = "tensor 'embed' (merged): checksum mismatch in chunk 9 (damaged archive)"
    assert str(far.value).endswith(said) and str(local.value).endswith(said)
    assert len(problems) == 1 and problems[0].endswith(said)


def test_a_server_that_fails_mid_read_ahead_names_what_was_read(http_server, large, small_sizes):
    # the background window fails quietly; the read of its chunks fetches them itself, and says
    # which tensor and chunk it was reading when the server failed
    with tallpack.open(large["url"], cache_bytes=0) as fam:
        http_server.cut_after[large["name"]] = 200_000
        try:
            with pytest.raises(RemoteError) as e:
                fam.get_tensor("t1", "embed")
        finally:
            del http_server.cut_after[large["name"]]
            http_server.reset()
        assert "tensor 'embed'" in str(e.value) and ", chunk " in str(e.value)
        with tallpack.open(large["local"]) as ref:  # the same archive reads whole once the server does
            assert _same(fam.get_tensor("t1", "embed"), ref.get_tensor("t1", "embed"))


def test_verify_of_a_large_array_fetches_it_in_windows_once(http_server, large, small_sizes):
    with tallpack.open(large["local"]) as ref:
        size = ref.size
        chunks = sum(len(r.chunks) for r in _embed(ref, ("base", "merged")))
    with tallpack.open(large["url"]) as fam:
        http_server.reset()
        rounds = fam.source.rounds
        assert fam.verify() == []
        assert http_server.served() <= size + 4096
        assert fam.source.rounds - rounds <= chunks // 2


def test_a_local_archive_never_reads_ahead(large, small_sizes, monkeypatch):
    # a local file's reads pay nothing for it: the check is made once, at open
    def refuse(*args, **kwargs):
        raise AssertionError("read ahead from a local file")

    monkeypatch.setattr(tallpack.container.ContainerReader, "read_ahead", refuse, raising=False)
    with tallpack.open(large["local"], cache_bytes=0) as fam:
        assert fam._c._held is None
        fam.state_dict("t1")
        assert fam.verify() == []


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork here")
def test_a_forked_child_does_not_wait_for_its_parents_fetch(large):
    # a range claimed by a parent thread's fetch when a DataLoader worker forks: in the child that
    # fetch never ends, and a read of the range waited for it for ever
    with tallpack.open(large["url"], cache_bytes=0) as fam:
        c = _embed(fam)[0].chunks[3]
        done = threading.Event()  # (never set: the parent's fetch, still running)
        fam.source._pending[(c.offset, c.nbytes)] = (done, 0)
        pid = os.fork()
        if pid == 0:  # the child: read the range, and say whether it came
            ok = False
            try:
                ok = len(fam.source.read(c.offset, c.nbytes)) == c.nbytes
            finally:
                os._exit(0 if ok else 1)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            got, status = os.waitpid(pid, os.WNOHANG)
            if got:
                break
            time.sleep(0.05)
        else:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail("the child waited for its parent's fetch")
        del fam.source._pending[(c.offset, c.nbytes)]
        assert os.waitstatus_to_exitcode(status) == 0
