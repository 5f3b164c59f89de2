"""Three small reliability findings: the folder locks' files go with their lock, a signal after the
``wrote`` line still ends in one line, and ``unpack --all`` on a terminal shows one bar."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
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


# -- a signal after the command's ``wrote`` line ------------------------------------------------

#: the ``tallpack`` command (its entry point, ``run``) in a child whose shutdown waits, after the
#: command, until its input closes: a signal lands after the ``wrote`` line, every time
AFTER_WROTE = """
import atexit, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)  # a background job's is ignored: Ctrl-C's own
def wait():
    print("exiting", flush=True)
    sys.stdin.read()
atexit.register(wait)
sys.argv = ["tallpack", *sys.argv[1:]]
from tallpack_cli import run
run()
"""


@pytest.fixture
def archive(tmp_path) -> Path:
    import tallpack

    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(64, 32, generator=g), "b": torch.randn(32, generator=g)}
    tasks = {t: {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in base.items()} for t in ("a", "b", "c")}
    out = tmp_path / "f.tallpack"
    tallpack.pack(base, tasks, out)
    return out


def _env() -> dict[str, str]:
    root = Path(__file__).resolve().parents[1]
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), str(root / "cli"), os.environ.get("PYTHONPATH", "")]))


@pytest.mark.parametrize("command, signum", [("unpack", signal.SIGTERM), ("unpack", signal.SIGINT),
                                             ("pack", signal.SIGTERM)])  # pack: the kernels' pool's threads
def test_a_signal_after_the_wrote_line_ends_in_one_line(archive, tmp_path, command, signum):
    """SIGTERM after ``wrote`` killed the process without a line (-15), Ctrl-C gave a traceback or
    exit 0: after the command, as during it, a signal ends the process with the line that says
    its output was written, and exit 143 or 130."""
    if command == "unpack":
        out = tmp_path / "out"
        args = ["unpack", str(archive), "--task", "a", "-o", str(out)]
        wrote = f"wrote {out / 'model.safetensors'}"
    else:
        from safetensors.torch import save_file

        for name in ("base", "a", "b"):
            save_file({"w": torch.randn(256, 64)}, tmp_path / f"{name}.safetensors")
        out = tmp_path / "g.tallpack"
        args = ["pack", "--base", str(tmp_path / "base.safetensors"), str(tmp_path / "a.safetensors"),
                str(tmp_path / "b.safetensors"), "-o", str(out), "-j", "2"]
        wrote = f"wrote {out}: 2 tasks"
    p = subprocess.Popen([sys.executable, "-c", AFTER_WROTE, *args],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    lines = [p.stdout.readline(), p.stdout.readline()]
    assert lines[0].startswith(wrote) and lines[1] == "exiting\n", (lines, p.stderr.read())
    p.send_signal(signum)
    _, err = p.communicate(timeout=60)
    what = "terminated (SIGTERM)" if signum == signal.SIGTERM else "interrupted"
    assert p.returncode == 128 + signum, err
    assert err.strip().splitlines()[-1] == f"error: {what} after its output was written" and "Traceback" not in err
    if command == "unpack":
        assert sorted(load_file(out / "model.safetensors")) == ["b", "w"]
    else:
        import tallpack

        with tallpack.open(out) as fam:
            assert list(fam.tasks) == ["a", "b"] and fam.verify() == []


#: an object that says when the interpreter's teardown collects it
TORN_DOWN = """
class Said:
    def __del__(self):
        print("torn down", flush=True)
said = Said()
"""


def test_the_command_keeps_its_exit_status_and_its_atexit_callbacks(archive, tmp_path):
    """The command's own process ends without Python's module teardown (a second of torch's, in
    which no signal can be told), but with its status (1 for an error) and after its atexit
    callbacks."""
    code = TORN_DOWN + AFTER_WROTE.replace("sys.stdin.read()", "print('callback ran', flush=True)")
    r = subprocess.run([sys.executable, "-c", code, "unpack", str(archive), "--task", "nope", "-o", str(tmp_path / "o")],
                       capture_output=True, text=True, env=_env(), timeout=60)
    assert (r.returncode, r.stdout) == (1, "exiting\ncallback ran\n"), r.stderr
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr


# -- unpack --all on a terminal: one bar ---------------------------------------------------------

def _on_a_terminal(args: list[str]) -> tuple[int, list[str]]:
    """``tallpack ARGS`` with a pseudo terminal (100 columns) as its input and outputs: its exit
    status and the lines as the terminal shows them at the end (each line's text after its last
    carriage return: a bar redrawn in place is one line)."""
    import fcntl
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    p = subprocess.Popen([sys.executable, "-m", "tallpack", *args], stdin=slave, stdout=slave, stderr=slave,
                         env=_env(), close_fds=True)
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child's side is closed
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    code = p.wait(60)
    text = b"".join(chunks).decode(errors="replace").replace("\r\n", "\n")
    return code, [line.split("\r")[-1] for line in text.split("\n") if line.split("\r")[-1]]


def test_unpack_all_on_a_terminal_leaves_one_bar(archive, tmp_path):
    """A bar per task was left on the terminal: one bar measures the whole call, named by the
    task at work as it runs, then one ``wrote`` line per task."""
    code, lines = _on_a_terminal(["unpack", str(archive), "--all", "-o", str(tmp_path / "out")])
    assert code == 0, lines
    bars = [line for line in lines if "%|" in line]
    assert len(bars) == 1 and bars[0].startswith("writing (3 tasks): 100%|"), lines
    assert lines[1:] == [f"wrote {tmp_path / 'out' / t / 'model.safetensors'}" for t in ("a", "b", "c")], lines


def test_one_bar_names_each_task_as_it_is_written():
    """The bar's text as the steps of three tasks come (``Labelled`` as ``write_tasks`` wraps each
    task's progress), and where it stands."""
    from tallpack.progress import Bar, Labelled, track

    seen = []
    with Bar(parts=3) as bar:
        for task in ("a", "b", "c"):
            for _ in track(range(4), Labelled(bar, task), "writing"):
                if bar._bar is not None:
                    seen.append((bar._bar.desc, bar._bar.n))
    assert seen[0] == ("a: writing (task 1 of 3)", 83) and seen[4] == ("b: writing (task 2 of 3)", 417)
    assert seen[-1] == ("c: writing (task 3 of 3)", 917) and bar._bar is None

