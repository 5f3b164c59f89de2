"""A long-running service's memory (round 35): the reading threads every open archive shares
(``container.ReadingThreads``), bounded whatever the number of archives open and ending when idle;
the buffers threads keep for their next read, let go when their thread ends and when the process
has stopped reading (``memory.settle``)."""

from __future__ import annotations

import threading
import time
import weakref
from concurrent.futures import CancelledError

import numpy as np
import pytest

from tallpack import container, memory
from tallpack.container import ReadingThreads
from tallpack.memory import ThreadBuffers


def wake(pool: ReadingThreads) -> None:
    """Idle threads look at ``IDLE_SECONDS`` again (a test lowers it)."""
    with pool._cv:
        pool._cv.notify_all()


def ended(pool: ReadingThreads, within: float = 10.0) -> bool:
    end = time.monotonic() + within
    while pool.threads and time.monotonic() < end:
        wake(pool)
        time.sleep(0.02)
    return pool.threads == 0


@pytest.fixture
def quick(monkeypatch) -> None:
    monkeypatch.setattr(container, "IDLE_SECONDS", 0.2)


def test_many_shares_hold_at_most_the_pools_threads(quick):
    """Sixteen archives' shares, each fed from its own threads at once, run on at most ``limit``
    threads (sixteen archives with pools of their own held sixteen pools' threads); the threads
    end once idle."""
    pool = ReadingThreads(3)
    shares = [pool.share() for _ in range(16)]
    seen: set[str] = set()
    most = 0
    lock = threading.Lock()

    def job(i: int) -> int:
        nonlocal most
        with lock:
            seen.add(threading.current_thread().name)
            most = max(most, pool.threads)
        time.sleep(0.002)
        return i * i

    def feed(share) -> list[int]:
        return [f.result() for f in [share.submit(job, i) for i in range(20)]]

    got: list[list[int]] = []
    feeders = [threading.Thread(target=lambda s=s: got.append(feed(s))) for s in shares]
    for t in feeders:
        t.start()
    for t in feeders:
        t.join(30)
    assert got == [[i * i for i in range(20)]] * 16
    assert most <= 3 and pool.threads <= 3
    assert ended(pool)
    # a thread the pool no longer counts is on its way out: it may take a moment on a busy machine
    end = time.monotonic() + 10
    while (left := [t for t in threading.enumerate() if t.name in seen and t.name.startswith("tallpack-read")]):
        assert time.monotonic() < end, left
        left[0].join(0.1)


def test_a_waiter_runs_work_no_thread_has_taken():
    """With every thread busy (other archives' reads), ``result()`` of queued work runs it on the
    waiting thread rather than waiting idle; cancelled work stays cancelled."""
    pool = ReadingThreads(1)
    share = pool.share()
    busy = threading.Event()
    blocker = share.submit(busy.wait, 10)
    here = share.submit(threading.current_thread)
    assert here.result(timeout=5) is threading.current_thread()
    dropped = share.submit(pow, 2, 3)
    assert dropped.cancel()
    busy.set()
    assert blocker.result() is True
    with pytest.raises(CancelledError):
        dropped.result()
    share.shutdown()


def test_a_shares_shutdown_waits_for_its_own_work_and_refuses_more():
    """An archive's close (its share's ``shutdown``) waits for what that archive submitted, not
    for the other archives' work, and takes no more (the reader turns that into
    ArchiveClosedError)."""
    pool = ReadingThreads(2)
    mine, other = pool.share(), pool.share()
    theirs = threading.Event()
    long = other.submit(theirs.wait, 10)
    done: list[int] = []
    mine.submit(lambda: (time.sleep(0.1), done.append(1)))
    mine.shutdown(wait=True)
    assert done == [1] and not long.done()
    with pytest.raises(RuntimeError, match="shutdown"):
        mine.submit(pow, 2, 2)
    theirs.set()
    assert long.result() is True
    other.shutdown()


def test_an_error_reaches_the_waiter_and_the_thread_goes_on():
    pool = ReadingThreads(1)
    share = pool.share()
    with pytest.raises(ZeroDivisionError):
        share.submit(lambda: 1 // 0).result()
    assert share.submit(pow, 3, 2).result() == 9
    share.shutdown()


def test_buffers_of_an_ended_thread_are_freed():
    """A thread's reused buffers go with the thread (``threading.local``), archive open or not."""
    slots = ThreadBuffers()
    refs: list[weakref.ref] = []

    def read() -> None:
        buf = slots.get("x", 1 << 16)
        refs.append(weakref.ref(buf.base))

    t = threading.Thread(target=read)
    t.start()
    t.join()
    assert refs and refs[0]() is None


def test_idle_reading_threads_let_go_of_every_threads_buffers(quick):
    """Once the reading threads have been idle for IDLE_SECONDS (the process has stopped reading),
    the buffers every thread kept for its next read are let go: a service's request threads,
    which live as long as the process, kept them until the last archive closed (``settle``)."""
    slots = ThreadBuffers()
    pool = container.reading_threads(2)
    refs: list[weakref.ref] = []
    go_on = threading.Event()

    def request() -> None:  # a request thread: reads, then waits for the next request
        buf = slots.get("x", 1 << 20)
        ctx = slots.held("ctx", lambda: np.zeros(4))
        refs.extend([weakref.ref(buf.base), weakref.ref(ctx)])
        del buf, ctx
        share = pool.share()
        share.submit(pow, 2, 2).result()  # it used the reading threads
        share.shutdown()
        go_on.wait(30)

    t = threading.Thread(target=request)
    t.start()
    try:
        end = time.monotonic() + 10
        while len(refs) < 2 and time.monotonic() < end:
            time.sleep(0.01)
        assert len(refs) == 2
        assert ended(pool)
        assert t.is_alive() and [r() for r in refs] == [None, None]
    finally:
        go_on.set()
        t.join()
    assert slots.get("x", 16).size == 16  # kept again from here on


def test_settle_gives_back_freed_memory():
    """``memory.settle`` hands the allocator's free pages back: after blocks of a few MB are
    freed on several threads (what reads do), the resident anonymous memory falls. Measured in a
    fresh process: in a test worker, earlier tests move glibc's mmap threshold and arenas."""
    import subprocess
    import sys

    if not sys.platform.startswith("linux") or memory._TRIM is None:
        pytest.skip("glibc's malloc_trim: Linux")
    code = """
import ctypes, threading
from tallpack import memory

def anon():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:")) << 10

libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
held = []

def churn():  # 2 MB blocks, touched and freed below a block still held: kept in the arena
    libc.free(libc.malloc(8 << 20))  # (glibc's mmap threshold grows past what is freed)
    blocks = []
    for _ in range(32):
        p = libc.malloc(2 << 20)
        ctypes.memset(p, 1, 2 << 20)
        blocks.append(p)
    held.append(libc.malloc(64))  # (freed at the end: the arena's top stays in use meanwhile)
    for p in blocks:
        libc.free(p)

threads = [threading.Thread(target=churn) for _ in range(4)]
for t in threads:
    t.start()
for t in threads:
    t.join()
before = anon()
memory.settle()
print(before, anon())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    before, after = map(int, out.stdout.split())
    assert after < before - (64 << 20), (before >> 20, after >> 20)


def test_a_thread_keeps_no_buffer_over_the_bound(monkeypatch):
    """A buffer of more than ``KEEP_BYTES`` (a whole large tensor, read without a cache) is fresh
    each time and not kept: each thread of a service kept one as large as the largest tensor it
    had decoded, for each input of it (base, merged vector), until idle. Smaller ones are kept."""
    monkeypatch.setattr(memory, "KEEP_BYTES", 1 << 20)
    slots = ThreadBuffers()
    small = slots.get("small", 1 << 20)
    assert slots.get("small", 1 << 20).ctypes.data == small.ctypes.data  # reused
    large = slots.get("large", (1 << 20) + 1)
    assert len(large) == (1 << 20) + 1
    gone = weakref.ref(large.base if large.base is not None else large)
    del large
    assert gone() is None
    assert "large" not in slots._local.__dict__
