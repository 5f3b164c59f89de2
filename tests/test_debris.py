"""What a killed or starved write leaves behind: stale temporaries are cleared by the next write
into the same folder (only those, only when their writer is gone), and a full disk is one line."""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import tallpack
from tallpack import fsutil
from tallpack.errors import OutputError, TallpackError
from tallpack.fsutil import temp_beside, writing

ROOT = Path(tallpack.__file__).resolve().parents[1]


def _python(code: str, *args: str, **kw) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, **kw)


def _partials(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.name.endswith(".partial"))


def _name(target: Path, *, boot: str | None = None, pid: int | None = None, host: str | None = None) -> Path:
    """A temporary's name as ``temp_beside`` makes it (by default: this process, this boot)."""
    tag = f"{host or fsutil._host_tag()}-{boot or fsutil._boot_tag()}-{pid or os.getpid()}-0badc0de"
    return target.parent / f".{target.name}.{tag}.partial"


def _earlier_boot() -> str:
    return "0" * 8 if fsutil._boot_tag() != "0" * 8 else "1" * 8


def _locked(path: Path) -> bool:
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def _removed_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "tallpack.fsutil" and r.levelno == logging.WARNING]


HOLD = """
    import os, sys
    from pathlib import Path
    from tallpack.fsutil import temp_beside
    fd, tmp = temp_beside(Path(sys.argv[1]))
    os.write(fd, b"x" * 12345)
    if sys.argv[2] == "close":
        os.close(fd)        # as a writer that writes by path after creating the file
    print(tmp, flush=True)
    if sys.argv[2] == "kill":
        os.kill(os.getpid(), 9)
    sys.stdin.read()        # hold until the test closes our stdin
"""


def test_temporaries_carry_their_writer_and_a_lock(tmp_path):
    target = tmp_path / "f.tallpack"
    fd, tmp = temp_beside(target)
    assert re.fullmatch(rf"\.f\.tallpack\.[0-9a-f]{{8}}-[0-9a-f]{{8}}-{os.getpid()}-[0-9a-f]{{8}}\.partial", tmp.name)
    assert _locked(tmp)
    os.close(fd)
    assert not _locked(tmp)
    umask = os.umask(0)
    os.umask(umask)
    assert tmp.stat().st_mode & 0o777 == 0o666 & ~umask


def test_a_killed_writers_temporary_is_removed_by_the_next(tmp_path, caplog):
    target = tmp_path / "f.tallpack"
    proc = _python(HOLD, str(target), "kill")
    left = Path(proc.stdout.readline().strip())
    assert proc.wait() == -signal.SIGKILL and left.exists() and left.stat().st_size == 12345
    caplog.set_level(logging.WARNING, "tallpack.fsutil")
    fd, tmp = temp_beside(target)
    os.close(fd)
    assert _partials(tmp_path) == [tmp]
    [msg] = _removed_warnings(caplog)
    assert str(left) in msg and "12345 bytes" in msg and "\n" not in msg


@pytest.mark.parametrize("mode", ["open", "close"])
def test_live_writers_are_never_touched(tmp_path, caplog, mode):
    """Another process writing (holding its descriptor, or having closed it and writing by path),
    and two writers of this process at once: each keeps its file."""
    caplog.set_level(logging.WARNING, "tallpack.fsutil")
    target = tmp_path / "f.tallpack"
    proc = _python(HOLD, str(target), mode)
    theirs = Path(proc.stdout.readline().strip())
    try:
        fd1, mine1 = temp_beside(target)
        fd2, mine2 = temp_beside(target)
        assert _partials(tmp_path) == sorted([theirs, mine1, mine2])
        assert theirs.stat().st_size == 12345 and _removed_warnings(caplog) == []
    finally:
        proc.stdin.close()
        proc.wait()
    os.close(fd1)
    os.close(fd2)
    fd3, mine3 = temp_beside(target)  # the other process has ended: its file goes, ours stay
    os.close(fd3)
    assert _partials(tmp_path) == sorted([mine1, mine2, mine3])
    assert len(_removed_warnings(caplog)) == 1


def test_a_held_lock_keeps_a_file_whatever_its_name_says(tmp_path):
    target = tmp_path / "f.tallpack"
    stale = _name(target, boot=_earlier_boot())  # an earlier boot: its pid means nothing now
    stale.write_bytes(b"x" * 10)
    fd = os.open(stale, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # someone (over a shared file system, say) still holds it
    assert fsutil.remove_stale_temporaries(target) == [] and stale.exists()
    os.close(fd)
    assert fsutil.remove_stale_temporaries(target) == [stale] and not stale.exists()


def test_nothing_but_the_exact_pattern_is_removed(tmp_path):
    target = tmp_path / "f.tallpack"
    old = _earlier_boot()
    stale = _name(target, boot=old)
    others = [
        _name(tmp_path / "other.tallpack", boot=old),        # another target (an old shard layout's)
        _name(tmp_path / "f.tallpack.x", boot=old),          # a target whose name extends ours
    ]
    kept = [
        _name(target, boot=old, host="ffffffff" if fsutil._host_tag() != "ffffffff" else "eeeeeeee"),
        tmp_path / ".f.tallpack.abcd1234.partial",           # an older tallpack's mkstemp name
        tmp_path / ".f.tallpack.partial",
        tmp_path / f"{stale.name[1:]}",                       # no leading dot
        tmp_path / f"{stale.name}.bak",
        tmp_path / stale.name.replace("-0badc0de", "-0badc0de-1"),
        tmp_path / stale.name.replace(f"-{os.getpid()}-", "-0-"),
    ]
    for p in [stale, *others, *kept]:
        p.write_bytes(b"data")
    (tmp_path / "sub").mkdir()
    as_dir = _name(target, boot=old, pid=1)
    as_dir.mkdir()                                           # the pattern, but a folder
    elsewhere = tmp_path / "sub" / "precious.bin"
    elsewhere.write_bytes(b"keep me")
    as_link = _name(target, boot=old, pid=2)
    as_link.symlink_to(elsewhere)                            # the pattern, but a link
    assert sorted(fsutil.remove_stale_temporaries(target)) == sorted([stale, *others])
    assert all(p.exists() for p in kept) and as_dir.is_dir() and as_link.is_symlink()
    assert elsewhere.read_bytes() == b"keep me"


PACK_FOREVER = """
    import sys
    import tallpack
    base, a, b, out = sys.argv[1:]
    while True:
        tallpack.pack(base, {"a": a, "b": b}, out, codec="zstd", level=19, threads=1, overwrite=True)
"""


def _writing(folder: Path) -> bool:
    """Whether a temporary in ``folder`` has data in it (the writer is mid-write)."""
    for p in _partials(folder):
        try:
            if p.stat().st_size > 0:
                return True
        except FileNotFoundError:  # renamed into place meanwhile
            pass
    return False


@pytest.fixture
def mb_family(tmp_path) -> dict:
    """A float32 family of about 4 MB per member, as safetensors files."""
    g = torch.Generator().manual_seed(0)
    base = {f"l{i}.w": torch.randn(512, 512, generator=g) for i in range(4)}
    save_file(base, tmp_path / "base.safetensors")
    for t in ("a", "b"):
        save_file({k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()},
                  tmp_path / f"{t}.safetensors")
    return {t: tmp_path / f"{t}.safetensors" for t in ("base", "a", "b")}


def test_kill_9_during_pack_then_the_next_pack_clears_the_debris(mb_family, tmp_path, caplog):
    out = tmp_path / "out" / "f.tallpack"
    out.parent.mkdir()
    left: list[Path] = []
    for _ in range(5):  # the kill may land between two packs, with no temporary open: try again
        proc = _python(PACK_FOREVER, *(str(mb_family[t]) for t in ("base", "a", "b")), str(out))
        deadline = time.monotonic() + 60
        while not _writing(out.parent) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL
        left = _partials(out.parent)
        if left:
            break
    assert len(left) == 1 and left[0].name.startswith(".f.tallpack.")
    size = left[0].stat().st_size
    assert size > 0
    caplog.set_level(logging.WARNING, "tallpack.fsutil")
    tallpack.pack(mb_family["base"], {"a": mb_family["a"], "b": mb_family["b"]}, out, overwrite=True)
    assert _partials(out.parent) == []
    assert _removed_warnings(caplog) == [
        f"{left[0]}: removed a stale temporary file ({size} bytes) left by an interrupted earlier "
        f"write (process {proc.pid})"]
    with tallpack.open(out) as fam:
        assert fam.verify() == []


CLI_PACK = """
    import sys
    from tallpack_cli.main import main
    base, a, b, out = sys.argv[1:]
    sys.argv = ["tallpack", "pack", "--base", base, "--task", a, "--task", b, "-o", out, "--codec", "zstd",
                "--level", "19", "-j", "1"]
    main()
"""


def test_sigterm_during_pack_cleans_up_as_ctrl_c_does(mb_family, tmp_path):
    """SIGTERM (a timeout, docker stop, a preempted job) unwinds the command as Ctrl-C does: one
    line, exit 143, and no temporary left beside the output."""
    out = tmp_path / "out" / "f.tallpack"
    out.parent.mkdir()
    for _ in range(5):  # the signal may land after the pack finished: try again
        proc = _python(CLI_PACK, *(str(mb_family[t]) for t in ("base", "a", "b")), str(out),
                       stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while not _writing(out.parent) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.005)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        if proc.returncode != 0:
            break
        out.unlink()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert err.strip().splitlines()[-1] == "error: terminated (SIGTERM); nothing was written"
    assert "Traceback" not in err and _partials(out.parent) == [] and not out.exists()


def test_signals_wait_while_an_output_is_put_in_place(tmp_path):
    """Ctrl-C during the renames that make an output whole (or the removals that undo it) takes
    effect when they are done: all of the output's files are in place, or none."""
    from tallpack.fsutil import signals_held, transaction

    # a shell's background job starts with SIGINT ignored, and Python keeps it so: Ctrl-C's handler here
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _signals_wait(tmp_path, signals_held, transaction)
    finally:
        signal.signal(signal.SIGINT, previous)


def _signals_wait(tmp_path, signals_held, transaction) -> None:
    steps = []
    with pytest.raises(KeyboardInterrupt):
        with signals_held():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # the signal has arrived: it waits
            steps.append("after the signal")
    assert steps == ["after the signal"]

    def write(tmp):
        tmp.write_text("x")

    real_commit = fsutil.Transaction._commit

    def interrupted_commit(self):  # Ctrl-C between the first rename and the second
        fd, _, tmp, target = self.staged[0]
        fsutil.commit(tmp, target, overwrite=self.overwrite)
        os.close(fd)
        self.staged.pop(0)
        os.kill(os.getpid(), signal.SIGINT)
        real_commit(self)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fsutil.Transaction, "_commit", interrupted_commit)
        with pytest.raises(KeyboardInterrupt):
            with transaction() as tx:
                for name in ("a", "b", "c"):
                    tx.stage(tmp_path / name, write)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"]  # all renamed, then the signal


# -- a full disk ------------------------------------------------------------------------------------

@pytest.mark.parametrize("code, words", [
    (errno.ENOSPC, "no space left on device"),
    (errno.EDQUOT, "disk quota exceeded"),
    (errno.EFBIG, "file too large (a file size limit was reached)"),
])
def test_writing_turns_a_full_disk_into_one_line(tmp_path, code, words):
    target = tmp_path / "f.tallpack"
    with pytest.raises(OutputError) as e:
        with writing(target):
            raise OSError(code, os.strerror(code))
    assert str(e.value) == f"{target}: {words} while writing (nothing was written under that name)"
    assert isinstance(e.value, TallpackError) and isinstance(e.value, OSError) and e.value.errno == code


def test_writing_lets_other_errors_through(tmp_path):
    err = PermissionError(errno.EACCES, "Permission denied")
    with pytest.raises(PermissionError) as e:
        with writing(tmp_path / "f"):
            raise err
    assert e.value is err


FILL = """
    import json, os, resource, signal, sys
    from pathlib import Path
    from tallpack.errors import OutputError, TallpackError
    from tallpack.fsutil import commit, temp_beside, writing
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # so the write fails with EFBIG, not a signal
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
    target = Path(sys.argv[1])
    try:
        with writing(target):
            fd, tmp = temp_beside(target)
            try:
                with os.fdopen(fd, "wb") as f:
                    for _ in range(8):
                        f.write(b"x" * (1 << 19))
                commit(tmp, target)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
    except OutputError as e:
        print(json.dumps({"msg": str(e), "errno": e.errno, "tallpack": isinstance(e, TallpackError)}))
"""


def test_a_file_size_limit_while_writing_is_one_line_and_leaves_nothing(tmp_path):
    target = tmp_path / "f.tallpack"
    proc = _python(FILL, str(target))
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    got = json.loads(out)
    assert got["errno"] == errno.EFBIG and got["tallpack"]
    assert got["msg"] == (f"{target}: file too large (a file size limit was reached) while writing "
                          "(nothing was written under that name)")
    assert list(tmp_path.iterdir()) == []
