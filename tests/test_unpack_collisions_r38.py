"""Task names that differ only in case or Unicode normalisation (``Cars`` and ``cars``; ``café``
composed, U+00E9, and decomposed, ``e`` U+0301) with ``unpack --all`` (``write_tasks``):

- on a file system that tells them apart (Linux's), each task is written in its own folder;
- on one that takes them for one name (macOS's and Windows' by default), the unpack is refused in
  one line naming the archive, the tasks, the output folder and what to do, before anything is
  written, ``--force`` or not: never one task written over the other, nor their files mixed. A
  probe in the output folder tells; where it is not asked (names it did not try), the unpack is
  refused as the second task's folder turns out to be the first's, and nothing is written either;
- at a URL (an object store tells them apart) each is written in its own folder, unless $TMPDIR,
  where the output is made before the upload, is on a file system that takes them for one: then
  refused alike, naming $TMPDIR, with nothing uploaded.

The folding file system is a real one: a small FUSE file system over a temporary folder
(``fusepy``), which looks names up as macOS's APFS does (case and normalisation ignored, case kept),
served by this file run as a program. Without FUSE (``/dev/fuse``, ``libfuse2``, ``fusepy``, root or
``fusermount``) those tests are skipped, saying why.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import tempfile
import time
import unicodedata
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load, save_file

import tallpack
from tallpack import outputs
from tallpack.errors import InvalidArgumentError
from tallpack_cli.main import main

NFC = unicodedata.normalize("NFC", "café")
NFD = unicodedata.normalize("NFD", "café")


def _key(name: str) -> str:
    return unicodedata.normalize("NFC", name).casefold()


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    """A family of a base and four small tasks: ``Cars``, ``cars``, ``café`` (NFC) and ``café`` (NFD)."""
    d = tmp_path_factory.mktemp("collide")
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(8, 8, generator=g), "b": torch.randn(8, generator=g)}
    save_file(base, d / "base.safetensors")
    tasks = {}
    for i, name in enumerate(["Cars", "cars", NFC, NFD]):
        tasks[name] = d / f"t{i}.safetensors"
        save_file({k: v + 0.1 * (i + 1) * torch.randn(v.shape, generator=g) for k, v in base.items()}, tasks[name])
    out = d / "f.tallpack"
    tallpack.pack(d / "base.safetensors", tasks, out, chunk_elements=64, threads=1)
    with tallpack.open(out) as fam:
        assert list(fam.tasks) == ["Cars", "cars", NFC, NFD]
    return out


def cli(*args: object) -> tuple[int, str]:
    """Exit code and output (stdout and stderr) of one command; never a traceback."""
    r = CliRunner().invoke(main, ["-q", *map(str, args)])
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    return r.exit_code, r.output


def _error(out: str) -> str:
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), out
    return lines[0]


def _folds_case(folder: Path) -> bool:
    (folder / "Probe-r38").touch()
    try:
        return (folder / "probe-R38").exists()
    finally:
        (folder / "Probe-r38").unlink()


def _load(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors, read whole (no memory map left holding the file open)."""
    return load(path.read_bytes())


def _tree(folder: Path) -> dict[str, bytes]:
    """Every file below ``folder``, by its path there, with its bytes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# -- a file system that tells the names apart: one folder each -----------------------------------------

def test_unpack_all_writes_names_alike_apart_where_the_file_system_tells_them_apart(archive, tmp_path):
    if _folds_case(tmp_path):
        pytest.skip(f"{tmp_path}: its file system ignores case (the folding tests below cover it)")
    out = tmp_path / "out"
    code, text = cli("unpack", archive, "--all", "-o", out)
    assert code == 0, text
    assert sorted(os.listdir(out)) == sorted(["Cars", "cars", NFC, NFD])
    with tallpack.open(archive) as fam:
        want = {t: {k: v.clone() for k, v in fam.state_dict(t).items()} for t in fam.tasks}
    for task, sd in want.items():
        got = _load(out / task / "model.safetensors")
        assert sorted(got) == sorted(sd) and all(torch.equal(got[k], sd[k]) for k in sd), task
    # each folder its own task's tensors, not another's
    assert not torch.equal(_load(out / "Cars" / "model.safetensors")["w"], want["cars"]["w"])
    assert not torch.equal(_load(out / NFC / "model.safetensors")["w"], want[NFD]["w"])


# -- a file system that takes them for one name: a FUSE file system like macOS's ---------------------

def _serve(backing: str, mount: str) -> None:
    """Serve ``backing`` at ``mount`` (in the foreground, until unmounted), looking each name up as
    APFS does: an entry whose name is the same once normalised (NFC) and case-folded is the one
    named; a new entry keeps the name it was given."""
    from fuse import FUSE, FuseOSError, Operations

    def real(path: str) -> str:
        at = backing
        for part in path.strip("/").split("/"):
            if not part:
                continue
            named = os.path.join(at, part)
            if not os.path.lexists(named) and os.path.isdir(at):
                named = next((os.path.join(at, e) for e in os.listdir(at) if _key(e) == _key(part)), named)
            at = named
        return at

    def oserror(fn):
        def call(self, path, *args):
            try:
                return fn(self, path, *args)
            except OSError as e:
                raise FuseOSError(e.errno or errno.EIO) from None
        return call

    class Folding(Operations):
        @oserror
        def getattr(self, path, fh=None):
            st = os.lstat(real(path))
            return {k: getattr(st, k) for k in ("st_mode", "st_ino", "st_nlink", "st_uid", "st_gid", "st_size",
                                                 "st_atime", "st_mtime", "st_ctime")}

        @oserror
        def access(self, path, mode):
            if not os.access(real(path), mode):
                raise FuseOSError(errno.EACCES)

        @oserror
        def readdir(self, path, fh):
            return [".", "..", *os.listdir(real(path))]

        @oserror
        def readlink(self, path):
            return os.readlink(real(path))

        @oserror
        def mkdir(self, path, mode):
            os.mkdir(real(path), mode)

        @oserror
        def rmdir(self, path):
            os.rmdir(real(path))

        @oserror
        def unlink(self, path):
            os.unlink(real(path))

        @oserror
        def symlink(self, path, target):
            os.symlink(target, real(path))

        @oserror
        def link(self, path, target):
            os.link(real(target), real(path))

        @oserror
        def rename(self, path, new):
            os.rename(real(path), real(new))

        @oserror
        def chmod(self, path, mode):
            os.chmod(real(path), mode)

        @oserror
        def chown(self, path, uid, gid):
            os.chown(real(path), -1 if uid in (-1, 2**32 - 1) else uid, -1 if gid in (-1, 2**32 - 1) else gid)

        @oserror
        def utimens(self, path, times=None):
            os.utime(real(path), times)

        @oserror
        def truncate(self, path, length, fh=None):
            os.truncate(real(path), length)

        @oserror
        def open(self, path, flags):
            return os.open(real(path), flags)

        @oserror
        def create(self, path, mode, fi=None):
            return os.open(real(path), os.O_RDWR | os.O_CREAT, mode)

        @oserror
        def read(self, path, size, offset, fh):
            return os.pread(fh, size, offset)

        @oserror
        def write(self, path, data, offset, fh):
            return os.pwrite(fh, data, offset)

        @oserror
        def fsync(self, path, datasync, fh):
            os.fsync(fh)

        def flush(self, path, fh):
            return 0

        def release(self, path, fh):
            os.close(fh)

        @oserror
        def statfs(self, path):
            st = os.statvfs(real(path))
            return {k: getattr(st, k) for k in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files",
                                                 "f_ffree", "f_favail", "f_flag", "f_namemax")}

    # no caching of names or attributes: every lookup asks (a name looked up in another case is one
    # the kernel must not know yet); inode numbers are the backing files' (a link is one file)
    FUSE(Folding(), mount, foreground=True, nothreads=True, use_ino=True, hard_remove=True, entry_timeout=0,
         attr_timeout=0, negative_timeout=0)


def _no_fuse() -> str | None:
    """Why a FUSE file system cannot be mounted here; None when it can be tried."""
    if not sys.platform.startswith("linux"):
        return "FUSE is tried on Linux only"
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    try:
        import fuse  # noqa: F401  (fusepy: finds libfuse.so.2 as it is imported)
    except ImportError:
        return "fusepy is not installed (pip install fusepy)"
    except OSError as e:  # "Unable to find libfuse"
        return f"fusepy finds no libfuse ({e}; Debian: apt-get install libfuse2 fuse)"
    if os.geteuid() != 0 and not shutil.which("fusermount"):
        return "not root, and no fusermount"
    return None


@pytest.fixture
def folding(tmp_path) -> Path:
    """A folder on a file system that ignores case and Unicode normalisation (FUSE, over a temporary folder)."""
    why = _no_fuse()
    if why:
        pytest.skip(f"no case-folding file system to test on: {why}")
    backing, mount = tmp_path / "backing", tmp_path / "mnt"
    backing.mkdir()
    mount.mkdir()
    server = subprocess.Popen([sys.executable, __file__, "serve", str(backing), str(mount)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while not os.path.ismount(mount):
            if server.poll() is not None:
                out = server.stdout.read().decode(errors="replace") if server.stdout else ""
                pytest.skip(f"no case-folding file system to test on: the FUSE mount failed: {out.strip()[-300:]}")
            if time.monotonic() > deadline:
                pytest.skip("no case-folding file system to test on: the FUSE mount did not come up in 30 s")
            time.sleep(0.05)
        # it folds indeed: otherwise the tests below would pass for nothing
        assert _folds_case(mount)
        (mount / NFC).mkdir()
        assert (mount / NFD).is_dir() and (mount / NFD).stat().st_ino == (mount / NFC).stat().st_ino
        (mount / NFC).rmdir()
        assert os.listdir(mount) == []
        yield mount
    finally:
        _unmount(mount)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def _unmount(mount: Path) -> None:
    """Unmount the FUSE file system; lazily (as soon as it is not in use) when it is busy."""
    unmount = ["fusermount", "-u"] if shutil.which("fusermount") else ["umount"]
    for lazy in ([], ["-z" if unmount[0] == "fusermount" else "-l"]):
        if not os.path.ismount(mount):
            return
        subprocess.run([*unmount, *lazy, str(mount)], capture_output=True, timeout=30)


def _shown(first: str, second: str) -> str:
    """How the message names two tasks: names that look alike (normalisation) escaped."""
    show = ascii if _key(first) == _key(second) and first.casefold() != second.casefold() else repr
    return f"{show(first)} and {show(second)}"


def _check_refusal(line: str, archive: Path, out: Path, first: str, second: str) -> None:
    """``line`` (the CLI's, or an exception's) names the archive, the two tasks, the output folder and what to do."""
    line = line.removeprefix("error: ")
    assert line.startswith(f"{archive}: tasks {_shown(first, second)} would be written in one folder"), line
    assert f" of {out}, whose file system does not tell their names apart" in line, line
    assert line.endswith("write them one at a time to different folders: unpack --task NAME -o FOLDER "
                         "(write_task(archive, NAME, FOLDER))"), line


@pytest.mark.parametrize("first, second", [("Cars", "cars"), (NFC, NFD)], ids=["case", "normalisation"])
def test_unpack_all_refuses_names_alike_on_a_folding_file_system(archive, folding, first, second):
    """Refused in one line, before anything is written: no output folder, nothing left of the probe."""
    out = folding / "out"
    code, text = cli("unpack", archive, "--all", "-o", out)
    assert code == 1
    line = _error(text)
    _check_refusal(line, archive, out, "Cars", "cars")
    assert f"(and so would {_shown(NFC, NFD)}) of {out}," in line  # every pair, in one line
    assert os.listdir(folding) == []
    # the two tasks alone, in the order given
    code, text = cli("unpack", archive, "--task", second, "--task", first, "-o", out)
    assert code == 1
    _check_refusal(_error(text), archive, out, second, first)
    assert os.listdir(folding) == []
    # each one alone, to a folder of its own, as the message says
    for i, task in enumerate([first, second]):
        code, text = cli("unpack", archive, "--task", task, "-o", folding / f"alone{i}")
        assert code == 0, text
    with tallpack.open(archive) as fam:
        for i, task in enumerate([first, second]):
            got, want = _load(folding / f"alone{i}" / "model.safetensors"), fam.state_dict(task)
            assert all(torch.equal(got[k], want[k]) for k in want)


def test_unpack_all_force_over_an_output_refuses_names_alike_on_a_folding_file_system(archive, folding):
    """``--force`` over an earlier output: refused the same, the earlier output left as it was."""
    out = folding / "out"
    assert cli("unpack", archive, "--task", "cars", "-o", out / "cars")[0] == 0
    (out / "notes.txt").write_text("mine")
    before = _tree(out)
    code, text = cli("unpack", archive, "--all", "-o", out, "--force")
    assert code == 1
    _check_refusal(_error(text), archive, out, "Cars", "cars")
    assert _tree(out) == before and sorted(os.listdir(out)) == ["cars", "notes.txt"]
    assert sorted(os.listdir(folding)) == ["out"]


@pytest.mark.parametrize("force", [False, True])
def test_a_task_folder_taken_by_an_earlier_task_is_refused_whatever_the_probe_said(archive, folding, monkeypatch,
                                                                                     force):
    """With the probe answering that nothing folds (names it did not try), the second task finds
    the first's folder as it is about to be written, and the whole unpack is refused: nothing written."""
    monkeypatch.setattr(outputs, "_folded", lambda folder, groups: [])
    out = folding / "out"
    if force:
        assert cli("unpack", archive, "--task", NFD, "-o", out / NFD)[0] == 0
    before = _tree(out) if force else None
    with tallpack.open(archive) as fam, pytest.raises(InvalidArgumentError) as e:
        tallpack.write_tasks(fam, ["Cars", "cars"], out, overwrite=force)
    line = str(e.value)
    assert "\n" not in line
    _check_refusal(line, archive, out, "Cars", "cars")
    assert (_tree(out) == before) if force else not out.exists()
    with tallpack.open(archive) as fam, pytest.raises(InvalidArgumentError) as e:
        tallpack.write_tasks(fam, [NFD, "Cars", NFC], out, overwrite=force)
    _check_refusal(str(e.value), archive, out, NFD, NFC)
    assert (_tree(out) == before) if force else not out.exists()
    assert sorted(os.listdir(folding)) == (["out"] if force else [])


# -- a URL: an object store tells the names apart; the local copy before the upload must too ---------

@pytest.fixture
def memory_root():
    import uuid

    import fsspec

    root = f"/tallpack-test-{uuid.uuid4().hex}"
    yield root
    fs = fsspec.filesystem("memory")
    if fs.exists(root):
        fs.rm(root, recursive=True)


def test_unpack_all_to_a_url_writes_names_alike_apart(archive, memory_root):
    """An object store tells the names apart, and so does the local copy before the upload (Linux's $TMPDIR)."""
    import fsspec

    if _folds_case(Path(tempfile.gettempdir())):
        pytest.skip(f"{tempfile.gettempdir()}: its file system ignores case")
    url = f"memory://{memory_root}/out"
    with tallpack.open(archive) as fam:
        assert tallpack.write_tasks(fam, None, url) == [f"{url}/{t}/model.safetensors" for t in fam.tasks]
        fs = fsspec.filesystem("memory")
        for t in fam.tasks:
            got, want = load(fs.cat(f"{memory_root}/out/{t}/model.safetensors")), fam.state_dict(t)
            assert all(torch.equal(got[k], want[k]) for k in want), t


def test_unpack_all_to_a_url_staged_on_a_folding_file_system_is_refused(archive, folding, memory_root, monkeypatch):
    """$TMPDIR on a file system that folds names: the upload's local copy would mix the tasks; refused
    in one line naming $TMPDIR, before anything is uploaded."""
    import fsspec

    monkeypatch.setattr(tempfile, "tempdir", str(folding))
    url = f"memory://{memory_root}/out"
    code, text = cli("unpack", archive, "--task", "Cars", "--task", "cars", "-o", url)
    assert code == 1
    line = _error(text)
    assert line.startswith(f"error: {archive}: tasks 'Cars' and 'cars' would be written in one folder of {folding}/")
    assert f"the copy of {url} made before the upload (under $TMPDIR)" in line and "set TMPDIR" in line, line
    assert line.endswith("unpack --task NAME -o FOLDER (write_task(archive, NAME, FOLDER))"), line
    assert not fsspec.filesystem("memory").exists(f"{memory_root}/out") and os.listdir(folding) == []


if __name__ == "__main__" and sys.argv[1:2] == ["serve"]:
    _serve(sys.argv[2], sys.argv[3])
