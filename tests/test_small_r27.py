"""Three small reliability findings: the folder locks' files go with their lock, a signal after the
``wrote`` line still ends in one line, and ``unpack --all`` on a terminal shows one bar."""

from __future__ import annotations

import multiprocessing
import os
import tempfile
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tallpack import fsutil
from tallpack.fsutil import folder_locks
from tallpack.outputs import write_checkpoint


@pytest.fixture
def locks(tmp_path, monkeypatch) -> Path:
    """The folder of this user's lock files, under a temporary folder of this test's own."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    return tmp / f"tallpack-locks-{os.getuid()}"


def test_an_output_leaves_no_lock_file(tmp_path, locks):
    """Each folder ever written into left a file in ``TMPDIR/tallpack-locks-UID`` (a tester found
    2,357): its holder removes it as it lets go."""
    out = tmp_path / "o"
    for i in range(3):
        write_checkpoint({"w": torch.full((4,), float(i))}, out / str(i), overwrite=True)
    assert torch.equal(load_file(out / "2" / "model.safetensors")["w"], torch.full((4,), 2.0))
    assert locks.is_dir() and list(locks.iterdir()) == []


def _take_turns(out: Path, rounds: int, barrier) -> None:
    """In a child process: ``rounds`` times, hold the folder's lock and check no one else holds it
    (a name only the holder may have); the exit status counts the times someone did."""
    clashes = 0
    barrier.wait()
    for _ in range(rounds):
        with folder_locks([out]):
            try:
                fd = os.open(out / "holder", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                clashes += 1
                continue
            os.close(fd)
            os.sched_yield()  # the others, waiting, open the lock file meanwhile
            os.unlink(out / "holder")
    os._exit(min(clashes, 100))


def test_processes_writing_into_one_folder_still_take_turns(tmp_path, locks):
    """With the lock file removed on release, a process that opened it before the removal and got
    its lock after holds the lock of a file no one else will open: it must take the lock again on
    the file now at the path. Three processes, many rounds each: never two holders at once, and
    no lock file left."""
    out = tmp_path / "o"
    out.mkdir()
    ctx = multiprocessing.get_context("fork")  # fsutil alone: no thread pool of torch's is used
    barrier = ctx.Barrier(3)
    procs = [ctx.Process(target=_take_turns, args=(out, 300, barrier)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert list(locks.iterdir()) == [] and list(out.iterdir()) == []


def test_a_commit_waits_for_another_process_holding_its_folder(tmp_path, locks):
    """Commits into one folder by two processes take turns: the output is put in place once the
    other process lets go of the folder."""
    out = tmp_path / "o"
    out.mkdir()
    ctx = multiprocessing.get_context("fork")
    held, release = ctx.Event(), ctx.Event()

    def hold() -> None:
        with folder_locks([out]):
            held.set()
            release.wait(60)
        os._exit(0)

    p = ctx.Process(target=hold)
    p.start()
    assert held.wait(60)
    done = threading.Event()
    t = threading.Thread(target=lambda: (write_checkpoint({"w": torch.ones(4)}, out), done.set()), daemon=True)
    t.start()
    assert not done.wait(1.0)  # written, but not put in place while the other process holds the folder
    assert not (out / "model.safetensors").exists()
    release.set()
    p.join(60)
    t.join(60)
    assert done.is_set() and torch.equal(load_file(out / "model.safetensors")["w"], torch.ones(4))
    assert list(locks.iterdir()) == []


def test_one_folder_under_two_names_is_locked_once(tmp_path, locks):
    """A folder named twice (through a link) has one lock file: taken once, not waited on for ever."""
    out = tmp_path / "o"
    out.mkdir()
    (tmp_path / "link").symlink_to(out)
    done = threading.Event()

    def lock_both() -> None:
        with folder_locks([out, tmp_path / "link"]):
            done.set()

    t = threading.Thread(target=lock_both, daemon=True)
    t.start()
    assert done.wait(30), "the second name of the folder waited for its own lock"
    t.join(30)
    assert list(locks.iterdir()) == []
