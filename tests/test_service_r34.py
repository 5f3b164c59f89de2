"""A long-running service (round 34): one process serving many tasks of open archives for days,
from a pool of request threads. What it holds must come back to flat: descriptors, mappings and
cached bytes, also when an archive is closed while other threads still read it."""

from __future__ import annotations

import gc
import os
import random
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import tallpack
from tallpack.errors import ArchiveClosedError, TallpackError

TASKS = ["a", "b", "c", "d"]


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> Path:
    """A float32 family of four tasks (a few MB), packed with small chunks: reads take long
    enough for other threads to meet them."""
    d = tmp_path_factory.mktemp("service")
    g = torch.Generator().manual_seed(0)
    base = {f"layer{i}.w": torch.randn(256, 256, generator=g) for i in range(4)}
    base["embed"] = torch.randn(512, 256, generator=g)
    save_file(base, d / "base.safetensors")
    tasks = {}
    for t in TASKS:
        sd = {k: v + 0.02 * torch.randn(v.shape, generator=g) * (torch.rand(v.shape, generator=g) < 0.5)
              for k, v in base.items()}
        sd["head.w"] = torch.randn(10, 256, generator=g)
        save_file(sd, d / f"{t}.safetensors")
        tasks[t] = d / f"{t}.safetensors"
    out = d / "fam.tallpack"
    tallpack.pack(d / "base.safetensors", tasks, out, chunk_elements=16384)
    return out


def mapped(path: Path) -> int:
    """How many of this process's mappings are of ``path``'s file."""
    with open("/proc/self/maps") as f:
        return sum(1 for line in f if line.rstrip().endswith(str(path)))


def descriptors(path: Path) -> int:
    """How many of this process's open descriptors are ``path``'s file."""
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            n += os.readlink(f"/proc/self/fd/{fd}") == str(path)
        except OSError:  # (the listing's own descriptor, gone)
            pass
    return n


def test_a_view_out_at_close_takes_the_mapping_with_it(family):
    """A view of the mapped file still held when the archive closes (a reader thread's, mid-read)
    keeps the mapping only as long as the view lives: the file is unmapped and its descriptor
    closed when the view goes, not when the closed archive object is collected."""
    fam = tallpack.open(family)
    view = fam.source.read(0, 16)
    fam.close()
    assert bytes(view[:8]) == b"TALLPACK"  # still readable: it keeps the mapping
    del view
    assert (mapped(family), descriptors(family)) == (0, 0)
    assert fam._closed  # (the closed archive is still referenced here)


def test_closing_while_threads_read_leaves_nothing_held(family):
    """Request threads reading while another closes the archive: each read ends whole or with
    ArchiveClosedError, and once they are done the closed archive (still referenced, as a
    service's registry or an in-flight request's frame holds it) keeps no cached bytes, no
    mapping and no descriptor of the file. Before, a read finishing after ``close`` put what it
    decoded back into the cache, and the mapping stayed while any reader's view was alive at
    ``close``: until the archive object itself was collected."""
    for rnd in range(12):
        fam = tallpack.open(family, cache_bytes=64 << 20)
        errors: list[BaseException] = []
        go = threading.Barrier(4)

        def reader(i: int) -> None:
            go.wait()
            t = TASKS[i % len(TASKS)]
            try:
                while True:
                    fam.state_dict(t)
                    fam.get_tensor(t, "layer1.w")
                    fam.get_slice(t, "embed")[3:40]
            except ArchiveClosedError:
                pass
            except BaseException as e:  # noqa: BLE001 - what the test looks for
                errors.append(e)

        threads = [threading.Thread(target=reader, args=(i,)) for i in range(3)]
        for th in threads:
            th.start()
        go.wait()
        time.sleep(random.Random(rnd).uniform(0.0, 0.05))  # early: while the cache fills
        fam.close()
        for th in threads:
            th.join(60)
        assert not any(th.is_alive() for th in threads), "a reader hangs after close"
        assert not errors, errors
        gc.collect()
        held = (fam._cache.size, len(fam._cache), len(fam._views), mapped(family), descriptors(family))
        assert held == (0, 0, 0, 0, 0), f"round {rnd}: cache bytes, entries, views, mappings, descriptors {held}"
        with pytest.raises(ArchiveClosedError):
            fam.get_tensor("a", "layer1.w")
        del fam
        gc.collect()


def test_closed_thread_buffers_keep_nothing():
    """An archive's per-thread buffers once it is closed (``ThreadBuffers.close``): a thread still
    reading gets fresh ones, which go with its read; none is kept for the thread's next call (a
    service's request threads live as long as the process)."""
    from tallpack.memory import ThreadBuffers

    slots = ThreadBuffers()
    kept = slots.get("x", 64)
    assert slots.get("x", 64).ctypes.data == kept.ctypes.data  # reused while open
    slots.close()
    one, two = slots.get("x", 64), slots.get("x", 64)
    assert one.ctypes.data != kept.ctypes.data and len(one) == 64
    assert not slots._local.__dict__  # nothing kept for the next call
    del one, two
    assert slots.held("ctx", list) is not slots.held("ctx", list)
