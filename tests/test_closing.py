"""The file changing under a reader, and closing while reading (issue 12, class 7); non-regular
files and the command line's one-line errors (class 8)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner

import tallpack
from tallpack.errors import ArchiveClosedError, FormatError, IntegrityError, TallpackError
from tallpack_cli.main import main

ROOT = Path(tallpack.__file__).resolve().parents[1]


@pytest.fixture
def archive(small_family, tmp_path) -> Path:
    out = tmp_path / "f.tallpack"
    tallpack.pack(small_family["base"], small_family["tasks"], out, chunk_elements=64)
    return out


def test_reading_after_close_is_a_tallpack_error(archive):
    fam = tallpack.open(archive)
    w = fam.get_tensor("a", "body.w")
    fam.close()
    fam.close()  # twice is fine
    with pytest.raises(ArchiveClosedError, match="closed"):
        fam.get_tensor("a", "body.w")
    with pytest.raises(ArchiveClosedError):
        fam.verify()
    assert w.sum().isfinite()


def test_closing_while_threads_read(archive):
    """Threads reading every tensor in a loop while the archive is closed under them: each ends
    with a finished read or an ArchiveClosedError, never another exception."""
    for _ in range(5):
        fam = tallpack.open(archive)
        errors: list[BaseException] = []
        started = threading.Barrier(5)

        def reader():
            started.wait()
            try:
                for _ in range(200):
                    for t in fam.tasks:
                        fam.state_dict(t)
            except TallpackError:
                pass
            except BaseException as e:  # noqa: BLE001 - what the test looks for
                errors.append(e)

        threads = [threading.Thread(target=reader) for _ in range(4)]
        for t in threads:
            t.start()
        started.wait()
        fam.close()
        for t in threads:
            t.join(60)
        assert errors == []


def test_a_file_truncated_while_open_is_an_integrity_error(archive):
    size = archive.stat().st_size
    fam = tallpack.open(archive)
    fam.get_tensor("a", "body.w")
    os.truncate(archive, size // 2)
    with pytest.raises(IntegrityError, match="shrank"):
        for t in fam.tasks:
            fam.state_dict(t)
    fam.close()


TRUNCATE_UNDER = """
    import os, sys
    import tallpack
    path = sys.argv[1]
    fam = tallpack.open(path)
    fam.state_dict("a")
    print("opened", flush=True)
    sys.stdin.readline()              # the other process truncates the file now
    try:
        for t in fam.tasks:
            fam.state_dict(t)
        print("read")
    except tallpack.TallpackError as e:
        print(type(e).__name__)
"""


def test_truncation_by_another_process_does_not_kill_the_reader(archive):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), *sys.path]))
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(TRUNCATE_UNDER), str(archive)], env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "opened"
    with open(archive, "r+b") as f:  # in place, as `truncate -s` or a careless copy would
        f.truncate(100)
    out, _ = proc.communicate("go\n", timeout=60)
    assert proc.returncode == 0, f"reader died with {proc.returncode}"  # not -SIGBUS
    assert out.strip() == "IntegrityError"


def test_an_archive_copied_over_in_place_while_open_says_so_not_damaged(tmp_path):
    """`cp new.tallpack served.tallpack` while a server has it open (the copy writes into the same
    file): the next read's checksum fails, and the error said "damaged archive" though the file
    is intact; it now says the file was written in place since it was opened, and to reopen it."""
    import torch

    g = torch.Generator().manual_seed(5)
    base = {"w": torch.randn(128, 128, generator=g)}
    served, new = tmp_path / "served.tallpack", tmp_path / "new.tallpack"
    tallpack.pack(base, {"a": {"w": base["w"] + 0.1}}, served, codec="raw")
    tallpack.pack({"w": base["w"] * 2}, {"a": {"w": base["w"] + 0.3}, "b": {"w": base["w"]}}, new, codec="raw")
    with tallpack.open(served, cache_bytes=0) as fam:
        with open(served, "r+b") as f:  # as cp does: the same inode, written from the start
            f.write(new.read_bytes())
        with pytest.raises(tallpack.IntegrityError) as e:
            fam.get_tensor("a", "w")
    msg = str(e.value)
    assert "written in place since it was opened" in msg and "reopen it" in msg and "damaged" not in msg, msg
    assert tallpack.open(served).verify() == []


NON_REGULAR = """
    import contextlib, io, json, sys
    from tallpack_cli.main import main
    results = []
    for path in sys.argv[2:]:
        for args in (["inspect", path], ["verify", path], ["unpack", path, "--all", "-o", sys.argv[1]],
                     ["merge", path, "-o", sys.argv[1]]):
            err = io.StringIO()
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
                try:
                    main(args, prog_name="tallpack")
                    code = 0
                except SystemExit as e:
                    code = e.code
            results.append([args[0], path, code, err.getvalue()])
    print(json.dumps(results))
"""


def test_non_regular_files_are_refused_without_blocking(tmp_path):
    fifo, folder = tmp_path / "pipe.tallpack", tmp_path / "d.tallpack"
    os.mkfifo(fifo)
    folder.mkdir()
    for path in (fifo, folder, Path("/dev/zero")):
        with pytest.raises(FormatError, match="not a regular file|is a directory"):
            tallpack.open(path)
    # the command line, in a child process: a regression that blocks fails by the timeout
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), *sys.path]))
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(NON_REGULAR), str(tmp_path / "o"),
                        str(fifo), str(folder), "/dev/zero"], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads(r.stdout)
    assert len(results) == 12
    for cmd, path, code, err in results:
        assert code == 1 and err.startswith("error: ") and err.count("\n") == 1, (cmd, path, err)
    assert not (tmp_path / "o").exists()


def test_an_unexpected_exception_is_still_one_line(archive, monkeypatch):
    def boom(self):
        raise AttributeError("'NoneType' object has no attribute 'x'")

    monkeypatch.setattr(tallpack.Archive, "summary", boom)
    r = CliRunner().invoke(main, ["inspect", str(archive)])
    assert r.exit_code == 1
    assert r.output.startswith("error: internal error: AttributeError") and "report it" in r.output
    assert r.output.count("\n") == 1


AT_EXIT = r"""
import atexit, sys, tallpack
fam = tallpack.open(sys.argv[1], cache_bytes=0, threads=2)
if sys.argv[2] == "used":
    fam.state_dict("a")  # the pool started: at exit its workers mark it shut down
def late():
    try:
        sd = fam.state_dict("a")
        print("read", sorted(sd), float(fam.get_tensor("a", "w").sum()))
    except Exception as e:
        print("failed", type(e).__name__, e)
atexit.register(late)
"""


@pytest.mark.parametrize("pool", ["unused", "used"])
def test_a_read_while_the_interpreter_shuts_down_is_done_on_the_calling_thread(tmp_path, pool) -> None:
    """An atexit handler (or a thread still running when the main one ends) reading a tensor of
    several chunks got concurrent.futures' RuntimeError ("cannot schedule new futures after
    interpreter shutdown", or, once the archive had read with its pool, "... after shutdown"); the
    calling thread now does the work the pool no longer takes."""
    import torch

    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(4096, generator=g)}
    tasks = {"a": {"w": base["w"] + 0.1 * torch.randn(4096, generator=g)}}
    tallpack.pack(base, tasks, tmp_path / "f.tallpack", chunk_elements=512)
    with tallpack.open(tmp_path / "f.tallpack") as fam:
        want = float(fam.get_tensor("a", "w").sum())
    r = subprocess.run([sys.executable, "-c", AT_EXIT, str(tmp_path / "f.tallpack"), pool], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.split() == ["read", "['w']", str(want)], r.stdout + r.stderr[-2000:]
