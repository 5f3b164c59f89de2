"""Users who are not root, and disks that are not simple (thirty-fourth round): the folder of
output locks under a shared temporary folder, the modes of files replaced with ``--force``.
Real files and processes; tests that need root (to own files as another user) skip without it."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import tallpack

ROOT = Path(tallpack.__file__).resolve().parents[1]


def _unprivileged() -> list[str]:
    """A prefix that runs a command bound by file permissions: root (these machines' user) is
    denied its override of them by dropping the capabilities that give it."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: permissions are not enforced")
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner"]  # (fowner: sticky folders)


def _tallpack(*args: object, env: dict[str, str] | None = None, timeout: float = 120,
              prefix: list[str] | None = None) -> subprocess.CompletedProcess:
    path = os.pathsep.join([str(ROOT), str(ROOT / "cli"), os.environ.get("PYTHONPATH", "")])
    return subprocess.run([*(prefix or []), sys.executable, "-m", "tallpack", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": path, **(env or {})}, timeout=timeout)


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    """A family of two tasks (200 KB of float32), packed by the command line."""
    root = tmp_path_factory.mktemp("disks")
    g = torch.Generator().manual_seed(0)
    base = {f"layer{i}.weight": torch.randn(128, 128, generator=g) for i in range(3)}
    save_file(base, root / "base.safetensors")
    for t in ("a", "b"):
        keep = torch.rand(128, 128, generator=g) < 0.3
        save_file({k: v + 0.01 * torch.randn(v.shape, generator=g) * keep for k, v in base.items()},
                  root / f"{t}.safetensors")
    out = root / "family.tallpack"
    r = _tallpack("-q", "pack", "--base", root / "base.safetensors", "-o", out, root / "a.safetensors",
                  root / "b.safetensors")
    assert r.returncode == 0, r.stderr
    return out


# -- the folder of output locks ----------------------------------------------------------------------

def _lock_path(tmpdir: Path, folder: Path) -> Path:
    st = os.stat(folder)
    return tmpdir / f"tallpack-locks-{os.getuid()}" / f"{st.st_dev:x}-{st.st_ino:x}"


def _until_held(lock: Path) -> None:
    """Return once another process holds the lock on ``lock``."""
    fd = os.open(lock, os.O_RDONLY)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return
            fcntl.flock(fd, fcntl.LOCK_UN)
            time.sleep(0.05)
    finally:
        os.close(fd)


def test_a_lock_folder_others_can_write_is_not_used(archive, tmp_path):
    """``$TMPDIR/tallpack-locks-UID`` in a shared /tmp can be made by anyone before the user's first
    output: another user who made it world-writable could create the lock file of any output folder
    and hold its lock, and every output of the user into that folder waited for ever ("waiting for
    another tallpack output's files"). A lock folder the user does not own, or that others may
    write into, is passed over with a warning: the output is written without the lock."""
    if shutil.which("flock") is None:
        pytest.skip("needs flock(1) to hold the lock from another process")
    tmpdir = tmp_path / "tmp"
    (tmpdir / f"tallpack-locks-{os.getuid()}").mkdir(parents=True)
    os.chmod(tmpdir / f"tallpack-locks-{os.getuid()}", 0o777)  # (as another user would leave it)
    out = tmp_path / "out"
    out.mkdir()
    lock = _lock_path(tmpdir, out)
    lock.touch()
    holder = subprocess.Popen(["flock", str(lock), "sleep", "300"])  # the other user, holding the lock
    try:
        _until_held(lock)
        try:
            r = _tallpack("unpack", archive, "--task", "a", "-o", out, env={"TMPDIR": str(tmpdir)}, timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail("the output waited for a lock held in a lock folder others can write into")
    finally:
        holder.kill()
        holder.wait()
    assert r.returncode == 0, r.stderr
    assert (out / "model.safetensors").is_file()
    assert "tallpack-locks" in r.stderr and "others" in r.stderr, r.stderr


def test_a_lock_folder_of_another_owner_is_not_used(tmp_path):
    """The same for a lock folder of another user's (mode 0700, as tallpack makes its own): root
    can write into it, and a tallpack run as root would then share its locks with that user."""
    if os.geteuid() != 0:
        pytest.skip("giving a folder to another user needs root")
    from tallpack import fsutil

    tmpdir = tmp_path / "tmp"
    locks = tmpdir / f"tallpack-locks-{os.getuid()}"
    locks.mkdir(parents=True, mode=0o700)
    os.chown(locks, 65534, 65534)
    out = tmp_path / "out"
    out.mkdir()
    old = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = str(tmpdir)
    import tempfile

    tempfile.tempdir = None
    try:
        assert fsutil._lock_file(out) is None
        assert list(locks.iterdir()) == []
    finally:
        tempfile.tempdir = None
        if old is None:
            del os.environ["TMPDIR"]
        else:
            os.environ["TMPDIR"] = old


def test_a_stale_lock_file_of_another_owner_in_the_users_lock_folder_is_replaced(archive, tmp_path):
    """A lock file the user may not open (another owner's, 0600: left by a run under another
    identity, or by hand) in the user's own lock folder turned off the lock of that output folder
    for good, silently: outputs into it no longer took turns. No one else may put a lock there, so
    it is stale: it is removed and the lock taken on a new file (removed again as it lets go)."""
    if os.geteuid() != 0:
        pytest.skip("a file of another owner needs root")
    tmpdir = tmp_path / "tmp"
    locks = tmpdir / f"tallpack-locks-{os.getuid()}"
    locks.mkdir(parents=True, mode=0o700)
    out = tmp_path / "out"
    out.mkdir()
    stale = _lock_path(tmpdir, out)
    stale.touch(mode=0o600)
    os.chown(stale, 65534, 65534)
    r = _tallpack("-q", "unpack", archive, "--task", "a", "-o", out, env={"TMPDIR": str(tmpdir)},
                  prefix=_unprivileged())
    assert r.returncode == 0, r.stderr
    assert (out / "model.safetensors").is_file()
    assert list(locks.iterdir()) == []  # taken (on a new file), and let go

# -- the modes of files replaced with --force --------------------------------------------------------

def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_force_keeps_the_permissions_of_the_file_it_replaces(archive, tmp_path):
    """A user who made a model private (``chmod 600``) or shared it with a group (``chmod 664``)
    and replaces it with ``--force`` keeps that choice, as ``cp``, ``torch.save`` and a shell's
    ``>`` over an existing file do: the new file was made from a temporary with the umask's mode
    (0644), so a private model became readable by everyone. A new file still takes the umask."""
    out = tmp_path / "out"
    r = _tallpack("-q", "unpack", archive, "--task", "a", "-o", out)
    assert r.returncode == 0, r.stderr
    umask = os.umask(0)
    os.umask(umask)
    assert _mode(out / "model.safetensors") == 0o666 & ~umask  # a new file: the umask's
    os.chmod(out / "model.safetensors", 0o600)
    r = _tallpack("-q", "unpack", archive, "--task", "b", "-o", out, "--force")
    assert r.returncode == 0, r.stderr
    assert _mode(out / "model.safetensors") == 0o600
    copy = tmp_path / "copy.tallpack"
    r = _tallpack("-q", "pack", "--base", archive.parent / "base.safetensors", "-o", copy, archive.parent / "a.safetensors")
    assert r.returncode == 0, r.stderr
    os.chmod(copy, 0o640)
    r = _tallpack("-q", "pack", "--base", archive.parent / "base.safetensors", "-o", copy, archive.parent / "b.safetensors",
                  "--force")
    assert r.returncode == 0, r.stderr
    assert _mode(copy) == 0o640
    r = _tallpack("-q", "merge", archive, "--method", "ta", "-o", tmp_path / "m")
    assert r.returncode == 0, r.stderr
    os.chmod(tmp_path / "m" / "model.safetensors", 0o660)
    r = _tallpack("-q", "merge", archive, "--method", "ta", "--alpha", "0.5", "-o", tmp_path / "m", "--force")
    assert r.returncode == 0, r.stderr
    assert _mode(tmp_path / "m" / "model.safetensors") == 0o660


def test_force_keeps_the_owner_and_group_where_it_may(archive, tmp_path):
    """Root replacing a user's model (a job run with sudo) leaves it the user's, as ``cp`` does:
    before, the user found a root-owned file in their folder that they could no longer change."""
    if os.geteuid() != 0:
        pytest.skip("giving a file to another user needs root")
    out = tmp_path / "out"
    assert _tallpack("-q", "unpack", archive, "--task", "a", "-o", out).returncode == 0
    os.chown(out / "model.safetensors", 65534, 65534)
    os.chmod(out / "model.safetensors", 0o640)
    r = _tallpack("-q", "unpack", archive, "--task", "b", "-o", out, "--force")
    assert r.returncode == 0, r.stderr
    st = (out / "model.safetensors").stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (65534, 65534, 0o640)


def test_force_never_widens_a_mode_whose_group_it_cannot_keep(archive, tmp_path):
    """Where the group cannot be kept (the writer is not in it), the old group's permissions would
    go to the writer's group, which the user never granted them to: the new file then takes the
    permissions both the old file and a new one would have, no wider than either."""
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("a writer that may not change a file's group needs root and setpriv here")
    out = tmp_path / "out"
    assert _tallpack("-q", "unpack", archive, "--task", "a", "-o", out).returncode == 0
    os.chown(out / "model.safetensors", 0, 65534)
    os.chmod(out / "model.safetensors", 0o664)
    path = os.pathsep.join([str(ROOT), str(ROOT / "cli"), os.environ.get("PYTHONPATH", "")])
    r = subprocess.run(["setpriv", "--bounding-set=-chown,-fowner", "sh", "-c", 'umask 022; exec "$@"', "-",
                        sys.executable, "-m", "tallpack", "-q", "unpack", str(archive), "--task", "b", "-o", str(out),
                        "--force"], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": path}, timeout=120)
    if r.returncode != 0 and "setpriv" in r.stderr:
        pytest.skip(f"setpriv refused: {r.stderr.strip()}")
    assert r.returncode == 0, r.stderr
    st = (out / "model.safetensors").stat()
    assert st.st_gid == 0  # (the writer's: it could not give the file to 65534)
    assert stat.S_IMODE(st.st_mode) == 0o644  # 0o664 & 0o644: group 0 is not given the write 65534 had


# -- read-only file systems ----------------------------------------------------------------------------

@pytest.fixture
def read_only(tmp_path):
    """A folder bound read-only onto another (a callable taking the folder); skips where mounting
    is not allowed (not root, or a container that refuses mounts)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("a read-only bind mount needs root")
    mounted: list[Path] = []

    def bind(folder: Path) -> Path:
        where = tmp_path / f"ro{len(mounted)}"
        where.mkdir()
        for args in (["--bind", str(folder), str(where)], ["-o", "remount,bind,ro", str(where)]):
            r = subprocess.run(["mount", *args], capture_output=True, text=True)
            if r.returncode != 0:
                if mounted or args[0] != "--bind":
                    subprocess.run(["umount", str(where)], check=False)
                pytest.skip(f"cannot mount read-only here: {r.stderr.strip()}")
        mounted.append(where)
        return where

    yield bind
    for where in mounted:
        subprocess.run(["umount", str(where)], check=False)


def test_an_archive_on_a_read_only_mount_is_read_and_outputs_there_say_why(archive, tmp_path, read_only):
    """An archive on a read-only file system opens, verifies and unpacks elsewhere (another file
    system than the output's); an output there is one line saying the file system is read-only:
    ``stats --plot`` said "Permission denied", which sends the user to chmod a folder they own."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "family.tallpack").write_bytes(archive.read_bytes())
    os.chmod(src, 0o777)
    ro = read_only(src)
    assert _tallpack("verify", ro / "family.tallpack").returncode == 0
    r = _tallpack("-q", "unpack", ro / "family.tallpack", "--all", "-o", tmp_path / "all")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (tmp_path / "all").iterdir()) == ["a", "b"]
    for args in (["unpack", ro / "family.tallpack", "--task", "a", "-o", ro / "out"],
                 ["merge", ro / "family.tallpack", "--method", "ta", "-o", ro, "--force"],
                 ["stats", ro / "family.tallpack", "--plot", ro / "stats.png"]):
        r = _tallpack("-q", *args)
        assert r.returncode == 1, r.stderr
        assert r.stderr.count("\n") == 1 and "Read-only file system" in r.stderr, r.stderr
    assert sorted(p.name for p in ro.iterdir()) == ["family.tallpack"]


def test_a_private_files_replacement_is_private_while_it_is_written(tmp_path):
    """The replacement of a ``chmod 600`` file was written for its whole write (minutes, for a large
    model) into a temporary of the umask's mode (0644) beside it, which anyone who may enter the
    folder could read; the temporary now takes no permission the file it replaces lacks."""
    from tallpack.fsutil import atomic_write, transaction

    target = tmp_path / "model.safetensors"
    target.write_bytes(b"old")
    os.chmod(target, 0o600)
    seen: list[int] = []

    def write(tmp: Path) -> None:
        seen.append(_mode(tmp))
        tmp.write_bytes(b"new")

    atomic_write(target, write)
    with transaction(overwrite=True):
        atomic_write(target, write)
    assert seen == [0o600, 0o600]
    assert target.read_bytes() == b"new" and _mode(target) == 0o600


def test_force_over_a_read_only_file_replaces_it_and_keeps_it_read_only(archive, tmp_path):
    """``chmod 444`` on a model (kept from accidental edits) and ``unpack --force`` over it: the
    replacement is read-only too, and writing it is not refused by the mode it will have (its
    temporary, reopened by name to be written, must stay the writer's to write)."""
    out = tmp_path / "out"
    assert _tallpack("-q", "unpack", archive, "--task", "a", "-o", out).returncode == 0
    os.chmod(out / "model.safetensors", 0o444)
    r = _tallpack("-q", "unpack", archive, "--task", "b", "-o", out, "--force", prefix=_unprivileged())
    assert r.returncode == 0, r.stderr
    assert _mode(out / "model.safetensors") == 0o444
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]


def test_force_over_another_users_file_in_a_sticky_folder_is_refused_before_the_work(archive, tmp_path):
    """In a folder with the sticky bit (/tmp, a shared scratch folder) only a file's owner may
    replace it. ``unpack --force`` over another user's model there wrote the whole output, failed
    at the rename, then failed again removing the second name it had given the old file to put it
    back (a link, the other user's file too, so not removable there): the error named that hidden
    ``.partial``, and the ``.partial`` stayed. It is now refused before the work, in one line, and nothing is left."""
    if os.geteuid() != 0:
        pytest.skip("a file of another user needs root")
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    os.chown(shared, 65534, 65534)
    theirs = shared / "model.safetensors"
    theirs.write_bytes(b"their model")
    os.chmod(theirs, 0o666)
    os.chown(theirs, 65534, 65534)
    r = _tallpack("unpack", archive, "--task", "a", "-o", shared, "--force", prefix=_unprivileged())
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1, r.stderr  # one line, no progress: refused before the work
    assert "model.safetensors: " in r.stderr and "sticky" in r.stderr and ".partial" not in r.stderr, r.stderr
    assert sorted(p.name for p in shared.iterdir()) == ["model.safetensors"]
    assert theirs.read_bytes() == b"their model"

def test_force_over_a_file_mounted_in_its_place_is_refused_before_the_work(archive, tmp_path):
    """A model file bound into a container (``docker run -v /host/model.safetensors:/out/...``)
    cannot be replaced by a rename, the way every output is put in place: ``unpack --force``
    wrote the whole model, then failed at the end with "Device or resource busy". It is now
    refused before anything is written, in one line saying why and what to do."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("a bind mount needs root")
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"placeholder")
    host = tmp_path / "host.safetensors"
    host.write_bytes(b"the host's model")
    r = subprocess.run(["mount", "--bind", str(host), str(out / "model.safetensors")], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot bind-mount a file here: {r.stderr.strip()}")
    try:
        r = _tallpack("unpack", archive, "--task", "a", "-o", out, "--force")  # (progress lines: on stderr)
        assert r.returncode == 1
        assert "mount point" in r.stderr and "model.safetensors" in r.stderr, r.stderr
        assert "writing" not in r.stderr, r.stderr  # refused before the work, not after it
        assert host.read_bytes() == b"the host's model"
        assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]
    finally:
        subprocess.run(["umount", str(out / "model.safetensors")], check=False)


def test_an_unreadable_shard_index_says_permission_denied(tmp_path):
    """A shard index the user may not read says so in one line, as any other unreadable input
    does (it said "not a readable shard index (PermissionError: [Errno 13] ...)")."""
    prefix = _unprivileged()
    for name in ("base", "ft"):
        folder = tmp_path / name
        folder.mkdir()
        save_file({"w": torch.ones(64) if name == "base" else torch.full((64,), 2.0)},
                  folder / "model-00001-of-00001.safetensors")
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": {"w": "model-00001-of-00001.safetensors"}}))
    (tmp_path / "ft" / "model.safetensors.index.json").chmod(0)
    r = _tallpack("pack", "--base", tmp_path / "base", "-o", tmp_path / "o.tallpack", tmp_path / "ft",
                  prefix=prefix)
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert "model.safetensors.index.json: Permission denied" in last and "Errno" not in last, r.stderr
    assert not (tmp_path / "o.tallpack").exists()
