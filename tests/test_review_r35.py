"""Round 35 review (helper R): inputs the round's changes were not tried on."""

from __future__ import annotations

import shutil
import threading

import pytest
import torch

import tallpack
import tallpack.remote
from tallpack.encodings import iter_arrays
from test_remote_r35 import _entry_bytes, exact  # noqa: F401 (exact: a fixture)


def _damage(src, dst, picks) -> None:
    """A copy of ``src`` with one byte of the last chunk of each (tensor, key) in ``picks`` flipped."""
    shutil.copy(src, dst)
    with tallpack.open(dst) as fam:
        refs = [ref for name, k, ref in iter_arrays(fam.manifest.tensors) if (name, k) in picks]
    assert len(refs) == len(picks)
    data = bytearray(dst.read_bytes())
    for ref in refs:
        c = ref.chunks[-1]
        data[c.offset + c.nbytes // 2] ^= 0x55
    dst.write_bytes(bytes(data))


@pytest.mark.parametrize("picks", [
    [("layers.0.w", "a/exact/residual"), ("layers.5.w", "base")],
    [("layers.1.w", "base"), ("layers.1.w", "c/exact/residual"), ("layers.11.w", "b/exact/residual")],
    [("layers.2.w", "a/exact/residual"), ("layers.2.w", "b/exact/residual"), ("layers.7.w", "c/exact/residual")],
])
@pytest.mark.parametrize("threads", [1, 4])
def test_remote_verify_reports_every_damaged_entry_as_a_local_one(http_server, exact, tmp_path,  # noqa: F811
                                                                  monkeypatch, picks, threads):
    """Damage in an early entry and in later ones, several tasks' residuals: the remote verify,
    which checks an exact entry's chunks just before its rebuild (22075ec), says what the local one says."""
    name = "r-" + "-".join(f"{n}-{k}".replace("/", "_") for n, k in picks) + ".tallpack"
    damaged = tmp_path / name
    _damage(exact["local"], damaged, set(picks))
    shutil.copy(damaged, http_server.root / name)
    with tallpack.open(damaged, threads=threads) as fam:
        local = [p.replace(fam.name, "ARCHIVE") for p in fam.verify()]
        keep = 4 * _entry_bytes(fam)
    monkeypatch.setattr(tallpack.remote, "KEEP_READ", keep)
    with tallpack.open(f"{http_server.url}/{name}", threads=threads) as fam:
        remote = [p.replace(fam.name, "ARCHIVE") for p in fam.verify()]
    assert sum("checksum mismatch" in p for p in local) >= len(picks)
    assert remote == local


@pytest.fixture(scope="module")
def exact_large(http_server, tmp_path_factory):
    """A bf16 family packed exact (masks and merged vectors derived) whose tensors are over the
    (lowered) RUNS_FROM: their originals are checked a run at a time, every task's together."""
    g = torch.Generator().manual_seed(7)
    base = {f"layers.{i}.w": (0.02 * torch.randn(48, 64, generator=g)).bfloat16() for i in range(3)}
    tasks = {t: {k: (v.float() + 0.002 * torch.randn(v.shape, generator=g) * (torch.rand(v.shape, generator=g) < 0.3)
                     ).bfloat16() for k, v in base.items()} for t in ("a", "b", "c")}
    local = tmp_path_factory.mktemp("exactlarge") / "large.tallpack"
    tallpack.pack(base, tasks, local, chunk_elements=256, exact=True)
    shutil.copy(local, http_server.root / "r-large.tallpack")
    return {"local": local, "url": f"{http_server.url}/r-large.tallpack"}


def test_remote_verify_checks_large_originals_in_runs_as_a_local_one(exact_large, monkeypatch):
    """verify's rebuild of the originals reads through ``_CheckedFirst.read_array`` from a remote
    source (22075ec); ``exact.in_runs`` asks that reader's signature for ``stop``: a wrapper taking
    ``*args, **kwargs`` made every large tensor's originals rebuilt whole, one task at a time, from
    a remote archive (the memory bound and the single pass of ``_Together`` lost)."""
    from tallpack import originals
    from tallpack.encodings import exact as exact_mod

    monkeypatch.setattr(exact_mod, "RUNS_FROM", 1024)
    monkeypatch.setattr(exact_mod, "RUN_ELEMENTS", 1024)
    calls: list[str] = []
    real = originals.checked_in_runs

    def counted(read, entry, *args, **kwargs):
        calls.append(entry.name)
        return real(read, entry, *args, **kwargs)

    monkeypatch.setattr(originals, "checked_in_runs", counted)
    with tallpack.open(exact_large["local"]) as fam:
        assert fam.verify() == []
    local, calls[:] = list(calls), []
    assert len(local) == 3
    with tallpack.open(exact_large["url"]) as fam:
        assert fam.verify() == []
    assert calls == local


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(64, 32, generator=g)}
    tasks = {t: {"w": base["w"] + 0.01 * torch.randn(64, 32, generator=g) * (torch.rand(64, 32, generator=g) < .3)}
             for t in "ab"}
    path = tmp_path_factory.mktemp("small") / "small.tallpack"
    tallpack.pack(base, tasks, path, chunk_elements=256)
    return path


@pytest.mark.parametrize("value", [0, 1])
def test_a_0d_uint8_tensor_index_is_a_mask_as_torch_takes_it(small, value):
    """torch takes a uint8 index tensor for a byte mask (as a bool one): ``t[tensor(1, uint8)]`` is
    ``t[None]``, ``t[tensor(0, uint8)]`` empty. 6e93d91 read it as the row of that number."""
    with tallpack.open(small) as fam:
        full = fam.get_tensor("a", "w")
        idx = torch.tensor(value, dtype=torch.uint8)
        got, want = fam.get_slice("a", "w")[idx], full[idx]
    assert got.shape == want.shape and torch.equal(got, want)


@pytest.mark.parametrize("idx", [torch.tensor(5, dtype=torch.int8), torch.tensor(-1), 3, -64, slice(70, 80),
                                 slice(10, 5), (slice(2, 4), 1), (torch.tensor(2), slice(None, 3))])
def test_slices_take_what_torch_takes(small, idx):
    with tallpack.open(small) as fam:
        full = fam.get_tensor("b", "w")
        got, want = fam.get_slice("b", "w")[idx], full[idx]
    assert got.shape == want.shape and torch.equal(got, want)


def test_an_exact_unpack_of_a_remote_archive_in_numpy_writes_the_originals(http_server, tmp_path, monkeypatch):
    """8600cd1's numpy rebuild reading a remote archive (its runs prefetched through ``_Bytes.source``),
    tensors rebuilt in runs: the original files, byte for byte."""
    from tallpack.encodings import exact as exact_mod
    from test_exact_numpy_r35 import _family, _sha

    monkeypatch.setattr(exact_mod, "RUNS_FROM", 256)
    monkeypatch.setattr(exact_mod, "RUN_ELEMENTS", 512)
    base, paths = _family(tmp_path / "f", torch.bfloat16, nan_task=False)
    arch = tmp_path / "n.tallpack"
    tallpack.pack(str(base), {k: str(v) for k, v in paths.items()}, str(arch), exact=True, chunk_elements=128)
    shutil.copy(arch, http_server.root / "r-numpy.tallpack")
    with tallpack.open(f"{http_server.url}/r-numpy.tallpack") as fam:
        for t in ("t0", "t2"):
            tallpack.write_task(fam, t, tmp_path / f"out-{t}", exact=True)
    for t in ("t0", "t2"):
        assert _sha(tmp_path / f"out-{t}" / f"{t}.safetensors") == _sha(paths[t])


def test_an_archives_close_does_not_wait_for_other_archives_work():
    """7e29f02: an archive's close (its share's ``shutdown``) waits for its own work; work of its
    still queued behind another archive's (a read that failed on its first array leaves the others
    queued; a stalled remote read holds the threads) waited for that other work to end. Its own
    pool's idle threads took it at once before; now the closing thread runs it."""
    from tallpack.container import ReadingThreads

    pool = ReadingThreads(1)
    other, mine = pool.share(), pool.share()
    release = threading.Event()
    long = other.submit(release.wait, 60)  # the only thread, busy with another archive's read
    left = mine.submit(pow, 2, 10)  # queued, and nobody waits on it (its read failed before it)
    closer = threading.Thread(target=mine.shutdown)
    closer.start()
    closer.join(5)
    try:
        assert not closer.is_alive(), "the close waits for another archive's work"
        assert left.result(timeout=1) == 1024 and not long.done()
    finally:
        release.set()
        closer.join()
        other.shutdown()


def test_an_empty_share_of_a_closed_archive_says_it_is_closed(small):
    """A slice handle taken before the close: every share's read says the archive is closed
    (7d4e26a says so for get_slice), but 6e93d91's empty share gave an empty tensor."""
    fam = tallpack.open(small)
    s = fam.get_slice("a", "w")
    fam.close()
    with pytest.raises(tallpack.ArchiveClosedError):
        s[0:3]
    with pytest.raises(tallpack.ArchiveClosedError):
        s[5:5]
