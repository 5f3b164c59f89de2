"""The Python API inside a program of its own (r25's downstream tester): torch's default dtype set
to another than float32, a service's first reads from several threads before torch is imported,
and the cyclic garbage collector paused while state dicts are read from several threads."""

from __future__ import annotations

import contextlib
import gc
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tallpack

DEFAULTS = (torch.float64, torch.bfloat16, torch.float16)


def _family(dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """A base and three fine-tunes of ``dtype``, each touching a third of the elements (the exact
    tier then derives every mask and merged vector), with an empty tensor and an integer one."""
    g = torch.Generator().manual_seed(1)
    base = {"w": torch.randn(48, 40, generator=g).to(dtype), "b": torch.randn(40, generator=g).to(dtype),
            "empty": torch.randn(0, 8, generator=g).to(dtype), "steps": torch.arange(5)}
    tasks = {}
    for t in ("a", "b", "c"):
        sd = dict(base)
        for k in ("w", "b", "empty"):
            touch = (torch.rand(base[k].shape, generator=g) < 0.3).float()
            sd[k] = (base[k].float() + touch * 0.02 * torch.randn(base[k].shape, generator=g)).to(dtype)
        tasks[t] = sd
    return base, tasks


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _reads(path: Path) -> dict[str, torch.Tensor]:
    """Every read path of the archive at ``path``, each from a freshly opened archive (no cache
    shared between them): whole, lazy and exact state dicts, get_tensor, get_slice, merged models."""
    out: dict[str, torch.Tensor] = {}
    with tallpack.open(path) as fam:
        tasks, names, exact = fam.tasks, fam.keys(fam.tasks[0]), _has_exact(fam)
    for t in tasks:
        with tallpack.open(path) as fam:
            out |= {f"sd/{t}/{k}": v for k, v in fam.state_dict(t).items()}
        with tallpack.open(path) as fam:
            out |= {f"lazy/{t}/{k}": v for k, v in fam.state_dict(t, lazy=True).items()}
        for k in names:
            with tallpack.open(path) as fam:
                out[f"get/{t}/{k}"] = fam.get_tensor(t, k)
            with tallpack.open(path) as fam:
                out[f"slice/{t}/{k}"] = fam.get_slice(t, k)[1:3]
        with tallpack.open(path) as fam:
            if exact:
                out |= {f"exact/{t}/{k}": v for k, v in fam.state_dict(t, exact=True).items()}
                out[f"exact-get/{t}/w"] = fam.get_tensor(t, "w", exact=True)
    with tallpack.open(path) as fam:
        out |= {f"merged/{k}": v for k, v in fam.merged().items()}
    with tallpack.open(path) as fam:
        out |= {f"merged-a/{k}": v for k, v in fam.merged(task=tasks[0]).items()}
    return out


def _has_exact(fam) -> bool:
    return any("exact" in tt.extras for e in fam.manifest.tensors for tt in e.tasks.values())


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> dict[str, Path]:
    """Default, ``--exact`` and ``--fidelity`` archives of a float32 and a bfloat16 family."""
    root = tmp_path_factory.mktemp("r25api")
    out = {}
    for dt in (torch.float32, torch.bfloat16):
        base, tasks = _family(dt)
        for label, kw in (("default", {}), ("exact", {"exact": True}), ("fidelity", {"fidelity": 0.999})):
            path = root / f"{label}-{str(dt)[6:]}.tallpack"
            tallpack.pack(base, tasks, path, **kw)
            out[path.stem] = path
    return out


@pytest.fixture(scope="module")
def archives(packed) -> dict[str, tuple[Path, dict[str, torch.Tensor]]]:
    """``packed``'s archives, each with its reads under torch's own default dtype (float32)."""
    return {stem: (path, _reads(path)) for stem, path in packed.items()}


@pytest.mark.parametrize("default", DEFAULTS, ids=lambda d: str(d)[6:])
def test_reads_under_another_default_dtype_equal_those_under_float32(archives, default) -> None:
    """F1: with ``torch.set_default_dtype(float64)`` (or a 16-bit one), every read of every kind of
    archive gives the tensors it gives under float32: an ``--exact`` archive's derived merged
    vectors were made in the default dtype and its lossy reads and merged() raised ValueError or
    TypeError from the compiled loops."""
    with tallpack.open(archives["exact-float32"][0]) as fam:  # the case the finding is about
        assert any(tt.encoding == "tall-derived-merged" for e in fam.manifest.tensors for tt in e.tasks.values())
    for stem, (path, want) in archives.items():
        with _default_dtype(default):
            got = _reads(path)
        assert got.keys() == want.keys(), stem
        differ = [k for k in want if got[k].dtype != want[k].dtype or not torch.equal(got[k], want[k])]
        assert differ == [], (stem, differ[:5])


FIRST_READS = """
import sys, threading, time
import tallpack

assert "torch" not in sys.modules
fam = tallpack.open(sys.argv[1])
reads = [lambda t: fam.get_tensor(t, "w"), lambda t: fam.state_dict(t),
         lambda t: fam.state_dict(t, lazy=True)["w"], lambda t: fam.get_slice(t, "w")[1:3]]
errors, first_done = [], threading.Event()

def first_request(i):
    # the other requests come while the first imports torch (or once it is done, should it never)
    while i and "torch" not in sys.modules and not first_done.is_set():
        time.sleep(0.0005)
    try:
        reads[i % len(reads)](fam.tasks[i % len(fam.tasks)])
    except BaseException as e:
        errors.append(f"{type(e).__name__}: {e}")
    finally:
        if not i:
            first_done.set()

threads = [threading.Thread(target=first_request, args=(i,)) for i in range(8)]
[t.start() for t in threads]
[t.join() for t in threads]
print(errors)
"""


def test_first_reads_from_several_threads_before_torch_is_imported(packed) -> None:
    """F2: a program that imported tallpack only (not torch) and reads from 8 threads (a service's
    first requests, the 7 later ones while the first imports torch): every thread gets its tensor.
    Those that came while another thread was importing torch saw its half-made module and raised
    AttributeError ("partially initialized module 'torch' has no attribute 'device")."""
    for _ in range(3):
        r = subprocess.run([sys.executable, "-c", FIRST_READS, str(packed["default-float32"])],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        assert r.stdout.strip() == "[]", r.stdout[-2000:]


# -- the cyclic garbage collector, paused while state dicts are read (r25 API tester's lead) ------

@contextlib.contextmanager
def _gc_state(enabled: bool) -> Iterator[None]:
    """The collector on or off for the test, as it was after."""
    was = gc.isenabled()
    gc.enable() if enabled else gc.disable()
    try:
        yield
    finally:
        gc.enable() if was else gc.disable()


@settings(max_examples=200, deadline=None)
@given(user_on=st.booleans(), order=st.lists(st.integers(0, 3), min_size=1, max_size=6).flatmap(
    lambda ids: st.permutations(ids + ids)))  # each reader's turns: it enters, then leaves
def test_the_collector_is_paused_until_the_last_reader_leaves(user_on, order) -> None:
    """Readers entering and leaving ``_gc_paused`` in any overlapping order (each its own state
    dict, in another thread; the helper keeps no per-thread state): the collector is off while any
    is inside, and as the user had it once the last has left. Each reader saved the collector's
    state on entering and restored it on leaving, so the first to leave turned it on under the
    others (and a reader that found it off as another left could leave it off for good)."""
    from tallpack.reader import _gc_paused

    with _gc_state(user_on):
        inside: dict[int, contextlib.AbstractContextManager] = {}
        for k, who in enumerate(order):
            if who in inside:  # its second turn: it leaves
                inside.pop(who).__exit__(None, None, None)
            else:
                inside[who] = _gc_paused()
                inside[who].__enter__()
            assert gc.isenabled() == (user_on and not inside), (order[: k + 1], user_on)
        assert not inside and gc.isenabled() == user_on


def test_overlapping_state_dicts_in_threads_leave_the_collector_as_it_was(packed) -> None:
    """Two threads in ``_gc_paused`` at once, the first to enter leaving first: the collector
    stays off until the second leaves, then is on again; an exception inside restores it too; a
    user who turned it off finds it off. Then real state dicts from 4 threads, each failing once on
    a damaged archive: the collector as the user had it after."""
    from tallpack.reader import _gc_paused

    def reader(entered: threading.Event, leave: threading.Event, fail: bool) -> None:
        with contextlib.suppress(RuntimeError), _gc_paused():
            entered.set()
            leave.wait(60)
            if fail:
                raise RuntimeError("inside")

    for user_on in (True, False):
        with _gc_state(user_on):
            events = [(threading.Event(), threading.Event()) for _ in range(2)]
            threads = [threading.Thread(target=reader, args=(*ev, i == 0)) for i, ev in enumerate(events)]
            for t, (entered, _) in zip(threads, events):
                t.start()
                assert entered.wait(60)
            assert not gc.isenabled()
            events[0][1].set()  # the first leaves (by an exception)
            threads[0].join(60)
            assert not gc.isenabled()
            events[1][1].set()
            threads[1].join(60)
            assert gc.isenabled() == user_on

    good = packed["exact-float32"]
    bad = good.with_name("damaged.tallpack")
    data = bytearray(good.read_bytes())
    with tallpack.open(good) as fam:  # a byte of the base of "w", which every task reads
        ref = next(e.arrays["base"] for e in fam.manifest.tensors if e.name == "w")
    data[ref.chunks[0].offset + 8] ^= 0xFF
    bad.write_bytes(bytes(data))
    for user_on in (True, False):
        with _gc_state(user_on), tallpack.open(good) as fam, tallpack.open(bad) as broken:
            errors: list[BaseException] = []

            def load(i: int) -> None:
                for k in range(6):
                    try:
                        (broken if k == i % 6 else fam).state_dict(fam.tasks[(i + k) % len(fam.tasks)])
                    except tallpack.TallpackError as e:
                        errors.append(e)

            threads = [threading.Thread(target=load, args=(i,)) for i in range(4)]
            [t.start() for t in threads]
            [t.join(120) for t in threads]
            assert len(errors) == 4 and gc.isenabled() == user_on


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
def test_a_child_forked_while_a_thread_reads_has_its_collector_on(packed) -> None:
    """A child forked while another thread of the parent is inside ``_gc_paused`` (a state dict
    read as a DataLoader forks its workers) has not that thread, which would have turned the
    collector on again: the child's collector is on, and its own state dicts pause and restore it."""
    from tallpack.reader import _gc_paused

    entered, leave = threading.Event(), threading.Event()

    def reader() -> None:
        with _gc_paused():
            entered.set()
            leave.wait(60)

    with _gc_state(True), tallpack.open(packed["default-float32"]) as fam:
        t = threading.Thread(target=reader)
        t.start()
        try:
            assert entered.wait(60) and not gc.isenabled()
            pid = os.fork()
            if pid == 0:  # the child: exit 0 only if the collector is on before and after a state dict
                ok = False
                try:
                    before = gc.isenabled()
                    fam.state_dict(fam.tasks[0])
                    ok = before and gc.isenabled()
                finally:
                    os._exit(0 if ok else 1)
            _, status = os.waitpid(pid, 0)
        finally:
            leave.set()
            t.join(60)
        assert os.waitstatus_to_exitcode(status) == 0
        assert gc.isenabled()
