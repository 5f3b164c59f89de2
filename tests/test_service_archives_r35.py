"""A long-running service's threads and buffers with many archives open (round 35): every open
archive reads on the process's shared reading threads (``container.reading_threads``), so sixteen
archives hold one pool's threads, not sixteen; idle, they end, and what threads kept for their
next read goes with them."""

from __future__ import annotations

import threading
import time
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import tallpack
from tallpack import container, kernels, memory

TASKS = ["a", "b", "c"]


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("archives")
    g = torch.Generator().manual_seed(3)
    base = {f"layer{i}.w": torch.randn(256, 256, generator=g) for i in range(4)}
    save_file(base, d / "base.safetensors")
    tasks = {}
    for t in TASKS:
        sd = {k: v + 0.02 * torch.randn(v.shape, generator=g) * (torch.rand(v.shape, generator=g) < 0.4)
              for k, v in base.items()}
        save_file(sd, d / f"{t}.safetensors")
        tasks[t] = d / f"{t}.safetensors"
    out = d / "fam.tallpack"
    tallpack.pack(d / "base.safetensors", tasks, out, chunk_elements=16384)
    return out


def reading_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("tallpack-read")]


def test_sixteen_archives_read_on_one_pools_threads(family):
    """Sixteen archives open at once (threads=4 each), read from 8 threads: at most one pool's
    threads read for them all (each archive's own pool held 64 here), and every tensor is what
    one thread reads."""
    with tallpack.open(family, threads=1) as one:
        want = {t: one.state_dict(t) for t in TASKS}
    earlier = set(reading_threads())  # an earlier test's threads in this worker, idling out
    fams = [tallpack.open(family, threads=4, cache_bytes=0 if i % 2 else 8 << 20) for i in range(16)]
    most, errors = 0, []
    lock = threading.Lock()

    def request(i: int) -> None:
        nonlocal most
        try:
            for k in range(6):
                fam, t = fams[(i + 5 * k) % 16], TASKS[(i + k) % 3]
                got = fam.state_dict(t) if k % 2 else {n: fam.get_tensor(t, n) for n in want[t]}
                assert all(torch.equal(got[n], want[t][n]) for n in want[t]), (i, k)
                with lock:
                    most = max(most, len(set(reading_threads()) - earlier))
        except BaseException as e:  # noqa: BLE001 - what the test looks for
            errors.append(e)

    try:
        threads = [threading.Thread(target=request, args=(i,)) for i in range(8)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(120)
        assert not errors, errors
        # the shared threads' cap is the largest ``threads`` any archive of this process asked
        # for (an earlier test in this worker may have asked 8): far below 16 pools' 64
        bound = max(4, kernels.default_threads(), container.reading_threads(1).limit)
        now = len(set(reading_threads()) - earlier)
        assert bound <= 8 and most <= bound and now <= bound, (most, now, bound)
    finally:
        for fam in fams:
            fam.close()


def test_an_idle_service_keeps_no_reading_threads_nor_buffers(family, monkeypatch):
    """A request thread that read (without a cache: into buffers it keeps for its next read)
    and now waits for the next request, its archive open: once the reading threads have been
    idle for IDLE_SECONDS, they have ended and the request thread's buffers are let go (before,
    both stayed until the archive closed); the archive reads on, the same."""
    monkeypatch.setattr(container, "IDLE_SECONDS", 0.3)
    refs: list[weakref.ref] = []
    read, go_on = threading.Event(), threading.Event()
    with tallpack.open(family, cache_bytes=0, threads=2) as fam:
        first: dict[str, torch.Tensor] = {}

        def request() -> None:
            first.update(fam.state_dict("b"))
            first["one"] = fam.get_tensor("a", "layer2.w")
            for b in list(memory._ALL):  # what this thread kept for its next read
                refs.extend(weakref.ref(v) for v in b._local.__dict__.values() if isinstance(v, np.ndarray))
            read.set()
            go_on.wait(60)

        th = threading.Thread(target=request)
        th.start()
        try:
            assert read.wait(60)
            assert refs, "the request thread kept no buffers"
            pool = container.reading_threads(1)
            end = time.monotonic() + 15
            while (reading_threads() or any(r() is not None for r in refs)) and time.monotonic() < end:
                with pool._cv:
                    pool._cv.notify_all()  # idle threads look at IDLE_SECONDS again
                time.sleep(0.05)
            assert th.is_alive()
            assert not reading_threads()
            assert [r for r in refs if r() is not None] == []
        finally:
            go_on.set()
            th.join()
        again = fam.state_dict("b")
        assert all(torch.equal(again[n], first[n]) for n in again)
        assert torch.equal(fam.get_tensor("a", "layer2.w"), first["one"])
