"""Atomic file creation: write under a temporary name beside the target, rename when complete.

A temporary is named ``.{target}.{host}-{boot}-{pid}-{random}.partial``: ``host`` is a hash of the
host name and PID namespace (the space in which ``pid`` means something), ``boot`` a hash of the
kernel's boot id, ``pid`` the writer's process id. (A target whose name is too long for that, over
200 bytes, stands in it as its first 150 bytes, ``~`` and a hash of the whole name.) Its creator holds an exclusive ``flock`` on the
descriptor ``temp_beside`` returns for as long as that descriptor is open.

A writer killed outright (``kill -9``, power loss) leaves its temporary behind. Creating a new
temporary in a folder removes the earlier ones in that folder whose writer is certainly gone,
whatever their targets (a rerun that writes another shard layout leaves none of the old one's),
which takes all of:

- the name matches the pattern above (nothing else is touched: no other name, no folder or link);
- it was written on this host and PID namespace;
- its writer's pid is not alive now, or it was written during an earlier boot;
- no one holds the lock on it (taken with ``LOCK_EX | LOCK_NB`` while we remove it; on a file
  system without locks nothing is removed).

The pid test guards writers that closed their descriptor before renaming; the lock guards
writers the name misjudges (another machine of the same host name writing to a shared folder
looks like an earlier boot). A reused pid only keeps a stale file. Any doubt keeps the file: a
stale file left behind costs disk space, a live file removed costs someone's output.
Each removal is logged as a warning with the file's size.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
import secrets
import signal
import socket
import stat
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from functools import lru_cache
from pathlib import Path

from .errors import InvalidArgumentError, OutputError, OutputExistsError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no locks, so no cleanup either
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

_TAG = re.compile(r"([0-9a-f]{8})-([0-9a-f]{8})-([0-9]{1,10})-[0-9a-f]{8}")
#: a temporary's name: its target's stem, then the tag (which has no dots: the stem is the rest)
_TEMPORARY = re.compile(r"\.(.+)\.([0-9a-f]{8}-[0-9a-f]{8}-[0-9]{1,10}-[0-9a-f]{8})\.partial", re.S)
_FULL_DISK = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
              errno.EFBIG: "file too large (a file size limit was reached)"}


def full_disk(e: BaseException) -> str | None:
    """What a full disk's error means (``"no space left on device"``), for ``e`` or the error it
    was raised from; None for any other error."""
    seen: set[int] = set()
    cause: BaseException | None = e
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, OSError) and cause.errno in _FULL_DISK:
            return _FULL_DISK[cause.errno]
        cause = cause.__cause__ or cause.__context__
    return None


def _hash8(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:8]


@lru_cache(maxsize=None)
def _host_tag() -> str:
    try:
        pidns = str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        pidns = "?"
    return _hash8(f"{socket.gethostname()}\0{pidns}")


@lru_cache(maxsize=None)
def _boot_tag() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return _hash8(f.read().strip())
    except OSError:
        return "00000000"  # unknown: then only the pid and the lock decide


def _umask() -> int:
    """The process's umask, read without changing it where the system says it (Linux 4.7 and
    later): setting it to 0 and back, the only other way, leaves a moment in which a file another
    thread creates (a service's) gets no umask at all."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _umask_lock:  # tallpack's own threads, at least, never read one another's 0
        mask = os.umask(0)
        os.umask(mask)
    return mask


_umask_lock = threading.Lock()


def _new_umask_lock() -> None:
    global _umask_lock
    _umask_lock = threading.Lock()


if hasattr(os, "register_at_fork"):  # no fork while another thread has the umask at 0 (the child would keep it
    # at 0, and the lock held forever): the fork waits for the lock, and the child starts with one of its own
    os.register_at_fork(before=lambda: _umask_lock.acquire(), after_in_parent=lambda: _umask_lock.release(),
                        after_in_child=_new_umask_lock)


def _stem(name: str) -> str:
    """``name`` as it stands in its temporaries' names: whole, unless the temporary's name would
    then pass the file systems' 255 bytes."""
    raw = name.encode("utf-8", "surrogateescape")
    if len(raw) <= 200:
        return name
    return raw[:150].decode("utf-8", "ignore") + "~" + hashlib.sha256(raw).hexdigest()[:8]


def temp_beside(target: Path, *, swept: set[Path] | None = None) -> tuple[int, Path]:
    """An open, locked descriptor and the path of a new temporary file in ``target``'s folder,
    with the permissions a plain ``open`` would give (for others, none that an existing ``target``
    lacks).

    Keep the descriptor open until the file is renamed or removed: the lock on it tells other
    writers the file is in use. Earlier temporaries in the folder left by dead writers are removed.

    >>> fd, tmp = temp_beside(Path("family.tallpack"))
    >>> with os.fdopen(fd, "wb") as f: f.write(data)
    >>> commit(tmp, Path("family.tallpack"))

    ``swept`` (a set kept by the caller across calls, see :func:`remove_stale_temporaries`)
    spares listing a folder again for each of many files written into it.
    """
    target = Path(target)
    tag = f"{_host_tag()}-{_boot_tag()}-{os.getpid()}"
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        tmp = target.parent / f".{_stem(target.name)}.{tag}-{secrets.token_hex(4)}.partial"
        try:
            fd = os.open(tmp, flags, 0o666)  # the umask applies, as for a plain open
        except FileExistsError:
            continue
        except OSError as e:  # say it of the file asked for, not of a hidden temporary name
            raise type(e)(e.errno, e.strerror, str(target)) from None
        break
    else:  # pragma: no cover - 100 collisions of 32 random bits
        raise FileExistsError(errno.EEXIST, "no unused temporary name", str(target.parent))
    mode = 0o666 & ~_umask()
    try:  # the readers a file it may replace keeps out are kept out of the replacement too (the
        # writer's own read and write stay: the temporary is reopened by name; commit sets the mode)
        old = os.lstat(target)
        if stat.S_ISREG(old.st_mode):
            mode &= old.st_mode | 0o600
    except OSError:
        pass
    os.fchmod(fd, mode)  # a default ACL on the folder may not apply the umask alone
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # just created: no one else has it
        except OSError:  # a file system without locks: the pid in the name still guards the file
            pass
        try:
            remove_stale_temporaries(target, swept=swept)
        except OSError as e:  # cleanup must never cost the write itself
            log.debug("%s: could not look for stale temporaries: %s", target.parent, e)
    return fd, tmp


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # another user's process, or an answer we cannot read: assume alive
    return True


def remove_stale_temporaries(target: Path, *, swept: set[Path] | None = None) -> list[Path]:
    """Remove the temporaries in ``target``'s folder whose writers are gone, of any target (see
    the module docstring); returns the paths removed.

    With ``swept`` (the folders already looked at, filled here), each folder is listed once for
    all the files written into it, not once per file (which made writing many files into one
    folder quadratic); a temporary that appears after that listing is left for a later write to
    judge.
    """
    folder = Path(target).parent
    if fcntl is None:  # pragma: no cover
        return []
    if swept is not None:
        if folder in swept:
            return []
        swept.add(folder)
    host, boot = _host_tag(), _boot_tag()
    removed: list[Path] = []
    sizes, pids = 0, set()
    with os.scandir(folder) as entries:
        names = [e.name for e in entries if e.name.startswith(".") and e.name.endswith(".partial")]
    for name in names:
        m = _TEMPORARY.fullmatch(name)
        t = _TAG.fullmatch(m[2]) if m else None
        if not t or t[1] != host:
            continue  # not ours to judge: another pattern, host or PID namespace
        pid = int(t[3])
        if pid <= 0:
            continue
        if t[2] == boot and _pid_alive(pid):
            continue
        path = folder / name
        size = _remove_if_unlocked(path)
        if size is not None:
            removed.append(path)
            sizes += size
            pids.add(pid)
    if len(removed) == 1:
        log.warning("%s: removed a stale temporary file (%d bytes) left by an interrupted earlier write "
                    "(process %d)", removed[0], sizes, *pids)
    elif removed:  # a killed output of hundreds of shards: one line, not one each
        log.warning("%s: removed %d stale temporary files (%d bytes in all, e.g. %s) left by interrupted earlier "
                    "writes (process%s %s)", folder, len(removed), sizes, removed[0].name,
                    "es" if len(pids) > 1 else "", ", ".join(map(str, sorted(pids))))
    return removed


def _remove_if_unlocked(path: Path) -> int | None:
    """Remove ``path`` if it is a regular file no one holds a lock on; its size if removed."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | os.O_NONBLOCK
                     | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None  # gone already, a symlink, or not ours to read
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return None  # a live writer holds it
        try:  # the name must still be the file we locked
            now = os.stat(path, follow_symlinks=False)
            if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
                return None
            os.unlink(path)
        except OSError:
            return None
        return st.st_size
    finally:
        os.close(fd)


_NO_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.EMLINK, errno.ENOSYS}


#: how many of one output's temporaries keep their locked descriptor open until the renames; the
#: rest are closed once written (their names' pid guards them: module docstring), so an output of
#: thousands of files stays within any limit on open files (``ulimit -n``)
HELD_LOCKS = 32

#: how many outputs were put in place (renamed to their names) in this process: the command line
#: tells an interrupt that came after its output was written from one that left nothing
_committed = 0


def committed() -> int:
    """How many output files this process has renamed into place so far."""
    return _committed


def forget_commits(count: int) -> None:
    """Set the count back to ``count``: the files renamed since were a staged copy (of an output
    at a URL whose upload failed), not the output."""
    global _committed
    _committed = min(_committed, count)


@contextmanager
def signals_held() -> Iterator[None]:
    """Ctrl-C, SIGTERM and SIGHUP wait until the block ends, then take effect: the steps that make an
    output whole (its renames) or undo it (removing its temporaries) run to their end. Only the
    main thread gets signals, so elsewhere this does nothing; nor where a handler was set outside
    Python."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {k: signal.getsignal(k) for k in (signal.SIGINT, signal.SIGTERM)}
    if any(h is None for h in previous.values()):
        yield
        return
    hup = getattr(signal, "SIGHUP", None)  # (none on Windows; held where Python set its handler)
    if hup is not None and signal.getsignal(hup) is not None:
        previous[hup] = signal.getsignal(hup)
    held: list[int] = []
    for k in previous:
        signal.signal(k, lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        for k, h in previous.items():
            signal.signal(k, h)
        for signum in dict.fromkeys(held):
            signal.raise_signal(signum)  # now, with the handlers the block found


#: the files being read (an archive) that no output may replace or remove: (st_dev, st_ino) and name
_reading: ContextVar[tuple[tuple[tuple[int, int], str], ...]] = ContextVar("tallpack_reading", default=())


def file_identity(path: str | os.PathLike) -> tuple[int, int] | None:
    """The file at ``path`` as ``(st_dev, st_ino)`` (the same file under any name or link); None
    when there is none."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return st.st_dev, st.st_ino


@contextmanager
def reading(identity: tuple[int, int] | None, name: str) -> Iterator[None]:
    """Inside the block, an output that would replace or remove the file ``identity`` (the archive
    ``name`` being read, by any name: compared by device and inode) is refused by
    :func:`check_replaceable`, which every output checks its targets with before writing them.

    >>> with reading(file_identity("dd/model.safetensors"), "dd/model.safetensors"):
    ...     write_task(fam, "cars", "dd", overwrite=True)  # InvalidArgumentError
    """
    if identity is None:
        yield
        return
    token = _reading.set((*_reading.get(), (identity, name)))
    try:
        yield
    finally:
        _reading.reset(token)


def check_not_read(target: str | os.PathLike, st: os.stat_result | None = None) -> None:
    """InvalidArgumentError when ``target`` (its ``lstat``, ``st``, if already taken) is a file
    being read inside a :func:`reading` block."""
    if not _reading.get():
        return
    if st is None:
        try:
            st = os.lstat(target)
        except OSError:
            return
    for identity, name in _reading.get():
        if (st.st_dev, st.st_ino) == identity:
            also = "" if os.path.abspath(name) == os.path.abspath(target) else f" ({name})"
            raise InvalidArgumentError(f"{target}: is the archive being read{also}; write elsewhere")


def check_replaceable(target: str | os.PathLike) -> None:
    """OutputError when ``target`` exists and is not a regular file: an overwrite replaces old
    outputs, never a device (``-o /dev/null``), a FIFO, a socket, a folder or a link (whose file
    would be left as it was, the link replaced). InvalidArgumentError when it is the archive being
    read (see :func:`reading`): ``--force`` is meant for old outputs, not for the input."""
    try:
        st = os.lstat(target)
    except OSError:  # not there (or not reachable: the write says why)
        return
    check_not_read(target, st)
    mode = st.st_mode
    if stat.S_ISREG(mode):
        if _mount_point(target):
            raise _mounted(target)
        _check_sticky(target, st)
        return
    what = ("a symbolic link" if stat.S_ISLNK(mode) else "a folder" if stat.S_ISDIR(mode)
            else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a FIFO" if stat.S_ISFIFO(mode)
            else "a socket" if stat.S_ISSOCK(mode) else "not a regular file")
    raise OutputError(f"{target}: is {what}; outputs are written as regular files, and --force (overwrite=True) "
                      "replaces only those: name another path")


def _mount_point(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a mount point (a file bound there: ``docker run -v FILE:FILE``), which a
    rename cannot replace. Linux says so in /proc/self/mountinfo (a bind mount from the same file
    system has the same device as its folder); elsewhere, False."""
    try:
        with open("/proc/self/mountinfo", "rb") as f:
            info = f.read()
    except OSError:
        return False
    real = os.fsencode(os.path.realpath(path))
    for line in info.splitlines():
        fields = line.split(b" ")
        if len(fields) > 4 and re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m[1], 8)]), fields[4]) == real:
            return True
    return False


def _check_sticky(target: str | os.PathLike, st: os.stat_result) -> None:
    """OutputError when ``target`` (``st``: its ``lstat``) is another user's file in a folder of
    another user's with the sticky bit (/tmp, a shared scratch folder), where only its owner may
    replace it: found before the work, not at the rename."""
    uid = os.geteuid()
    if st.st_uid == uid or _capable(3) and _mapped(st.st_uid, "uid") and _mapped(st.st_gid, "gid"):
        return  # CAP_FOWNER: root replaces anyone's, but for an owner its user namespace does not map
    try:
        folder = os.stat(os.path.dirname(os.path.abspath(target)))
    except OSError:
        return
    if folder.st_mode & stat.S_ISVTX and folder.st_uid != uid:
        raise OutputError(f"{shortened(target)}: is another user's file (uid {st.st_uid}) in a folder with the sticky "
                          "bit, where only its owner may replace it: remove it as that user, or write elsewhere")


def _capable(cap: int) -> bool:
    """Whether this process has the capability numbered ``cap`` (Linux); elsewhere, whether it is root."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"CapEff:"):
                    return bool(int(line.split()[1], 16) >> cap & 1)
    except (OSError, ValueError, IndexError):
        pass
    return os.geteuid() == 0


def _mapped(ident: int, kind: str) -> bool:
    """Whether this process's user namespace maps the ``kind`` ("uid" or "gid") ``ident``: the
    kernel grants a capability over a file only where it maps the file's owner and group (one it
    does not shows as 65534). Where /proc does not say (not Linux), True."""
    try:
        with open(f"/proc/self/{kind}_map", "rb") as f:
            rows = [tuple(int(x) for x in line.split()) for line in f if line.strip()]
    except (OSError, ValueError):
        return True
    return any(len(r) == 3 and r[0] <= ident < r[0] + r[2] for r in rows)


def _mounted(target: str | os.PathLike) -> OutputError:
    err = OutputError(f"{shortened(target)}: is a mount point (a file mounted there, as docker -v FILE:FILE does), "
                      "which a rename cannot replace, and outputs are put in place by renames: write to another "
                      "path and copy the file there")
    err.errno = errno.EBUSY
    return err


def check_inside(root: str | os.PathLike, path: str | os.PathLike, doing: str = "write there") -> None:
    """OutputError when ``path``'s folder, its links followed, is not ``root`` (its links followed
    too: an output folder the user named may be a link) or a folder below it: a link in the
    output (``out/vae -> ../elsewhere``) leads an output's write or removal outside it. The line
    names the link and where it leads. A link to a folder inside ``root`` is followed.

    >>> check_inside("out", "out/vae/model.safetensors", "remove it")  # out/vae -> ../elsewhere
    OutputError: out/vae/model.safetensors: its folder leads outside out (out/vae is a link to /w/elsewhere); ...
    """
    real_root = os.path.realpath(root)
    folder = os.path.dirname(os.path.abspath(path))
    if _within(os.path.realpath(folder), real_root):
        link = _dangling_link(root, folder)
        if link is None:
            return
        raise OutputError(f"{shortened(path)}: its folder leads through {shortened(link)}, a link to "
                          f"{shortened(os.path.realpath(link))}, which does not exist; refusing to {doing}")
    link = _first_link(root, folder)
    via = f" ({shortened(link)} is a link to {shortened(os.path.realpath(link))})" if link else ""
    hint = "" if doing == "write there" else " (remove the link, or name another output folder)"
    raise OutputError(f"{shortened(path)}: its folder leads outside {shortened(root)}{via}; refusing to {doing}{hint}")


_REMOVE = "remove it as an earlier output's weights"


def _within(real: str, real_root: str) -> bool:
    return real == real_root or real.startswith(real_root.rstrip(os.sep) + os.sep)


def _links_below(root: str | os.PathLike, folder: str) -> Iterator[str]:
    """The links among the folders from ``root`` (not itself) down to ``folder``, outermost first."""
    base = os.path.abspath(root)
    rel = os.path.relpath(folder, base)
    if rel == os.curdir or rel.startswith(os.pardir):
        return
    p = Path(root)
    for part in Path(rel).parts:
        p = p / part
        if os.path.islink(p):
            yield str(p)


def _first_link(root: str | os.PathLike, folder: str) -> str | None:
    return next(_links_below(root, folder), None)


def _dangling_link(root: str | os.PathLike, folder: str) -> str | None:
    """A link below ``root`` on the way to ``folder`` that leads nowhere (a folder cannot be made
    through it)."""
    return next((link for link in _links_below(root, folder) if not os.path.exists(link)), None)


def commit(tmp: Path, target: Path, *, overwrite: bool = True, sync: bool = True) -> None:
    """Rename ``tmp`` to ``target`` and make the rename durable. With ``overwrite=False`` an
    existing ``target`` is never replaced (OutputExistsError), even one created a moment ago:
    the file is linked to its name, which fails if the name exists, and then unlinked. With
    ``sync=False`` the caller syncs the folder (once for many renames: :func:`sync_folder`)."""
    global _committed
    try:
        _put_in_place(tmp, target, overwrite)
    except OutputError:  # already says what is wrong with ``target``
        raise
    except OSError as e:  # a folder made read-only meanwhile: say it of the output, not of a hidden temporary
        if e.errno == errno.EBUSY and _mount_point(target):  # mounted there meanwhile
            raise _mounted(target) from None
        raise type(e)(e.errno, e.strerror, str(target)) from None
    _committed += 1
    if sync:
        sync_folder(target.parent)


def _put_in_place(tmp: Path, target: Path, overwrite: bool) -> None:
    if overwrite:
        check_replaceable(target)  # checked before the write too; a device may have appeared meanwhile
        _keep_permissions(tmp, target)
        os.replace(tmp, target)
        return
    try:
        os.link(tmp, target, follow_symlinks=False)
    except FileExistsError:
        raise OutputExistsError(f"{target}: already exists; pass --force (overwrite=True) to replace it") from None
    except OSError as e:
        if e.errno not in _NO_LINKS:
            raise
        if os.path.lexists(target):  # a file system without hard links: check, then rename
            raise OutputExistsError(f"{target}: already exists; pass --force (overwrite=True) "
                                    "to replace it") from None
        os.replace(tmp, target)
    else:
        os.unlink(tmp)


def _keep_permissions(tmp: Path, target: Path) -> None:
    """Give ``tmp``, about to replace the regular file ``target``, that file's owner, group and
    permissions where this process may (as ``cp`` or a shell's ``>`` over a file keep them): a
    model made private stays private. Where the group cannot be kept, the permissions are those
    both the old file and a new one would have (the old group's are not handed to another)."""
    try:
        old, new = os.lstat(target), os.lstat(tmp)
    except OSError:
        return
    if not stat.S_ISREG(old.st_mode):
        return
    mode = stat.S_IMODE(old.st_mode) & 0o777
    try:
        if (old.st_uid, old.st_gid) != (new.st_uid, new.st_gid):
            try:
                os.chown(tmp, old.st_uid, old.st_gid, follow_symlinks=False)  # root: the user's file stays theirs
            except OSError:  # EPERM; EINVAL: an owner this user namespace does not map (shown as 65534)
                try:
                    os.chown(tmp, -1, old.st_gid, follow_symlinks=False)  # a group the writer is in
                except OSError:
                    mode &= stat.S_IMODE(new.st_mode)
        os.chmod(tmp, mode)
    except OSError as e:  # a file system without owners or modes (FAT, some network shares)
        log.debug("%s: cannot keep the permissions of the file it replaces: %s", target, e)


def left_behind(paths: Iterable[Path], why: OSError) -> None:
    """Log, as one warning, the temporaries a failed output could not remove (its folder made
    read-only meanwhile): a tallpack write into that folder removes them once this process has
    ended (the sweep spares a live process's temporaries)."""
    paths = list(paths)
    if paths:
        log.warning("%s: could not remove %s of a failed output (%s); a tallpack write into that folder removes "
                    "%s once this process has ended", shortened(paths[0]),
                    "this temporary file" if len(paths) == 1 else f"this and {len(paths) - 1} other temporary files",
                    why.strerror or why, "it" if len(paths) == 1 else "them")


def sync_folder(folder: Path) -> None:
    """Make the renames in ``folder`` durable."""
    try:
        dfd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - some platforms cannot open folders
        return
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


@contextmanager
def writing(target: str | os.PathLike) -> Iterator[None]:
    """Turn a full disk (``ENOSPC``, ``EDQUOT``, ``EFBIG``) inside the block into a one-line
    :class:`OutputError` naming ``target``; other errors pass through unchanged.

    The block should write only to a temporary (and remove it on failure), so that the message's
    promise holds: nothing was written under ``target``'s name.

    >>> with writing(path):
    ...     fd, tmp = temp_beside(path)
    ...     ...  # write, then commit(tmp, path)
    """
    try:
        yield
    except OSError as e:
        if e.errno == errno.ENAMETOOLONG and not isinstance(e, OutputError):
            raise _too_long(target) from None
        if isinstance(e, OutputError) or e.errno not in _FULL_DISK:
            raise
        err = OutputError(f"{target}: {_FULL_DISK[e.errno]} while writing "
                          "(nothing was written under that name)")
        err.errno = e.errno  # not filename: OSError's str() would then drop the message
        raise err from None


def file_above(path: str | os.PathLike) -> Path | None:
    """The nearest existing entry above ``path`` when it is not a folder (a regular file where a
    folder is needed: the cause of ``NotADirectoryError``); None when it is a folder.

    >>> file_above("notes.txt/out/model.safetensors")
    PosixPath('notes.txt')
    """
    for p in Path(path).parents:
        try:
            mode = os.stat(p).st_mode
        except OSError:  # missing, or itself below a file: look further up
            continue
        return None if stat.S_ISDIR(mode) else p
    return None


def shortened(path: str | os.PathLike) -> str:
    """``path`` for a message: at most 300 characters (a too-long path may be thousands)."""
    shown = os.fspath(path)
    return shown if len(shown) <= 300 else f"{shown[:150]}...{shown[-100:]}"


def _too_long(path: str | os.PathLike) -> OutputError:
    """ENAMETOOLONG of ``path`` as one line (the path itself may be thousands of bytes)."""
    err = OutputError(f"{shortened(path)}: the path is too long for the file system (nothing was written under that name)")
    err.errno = errno.ENAMETOOLONG
    return err


# -- several files as one output --------------------------------------------------------------

_current: ContextVar["Transaction | None"] = ContextVar("tallpack_output_transaction", default=None)


class Transaction:
    """The files of one output (a folder of shards, config and tokenizer files): each written under
    a locked temporary name beside its target, all renamed into place only when every one is
    complete. A failure removes the temporaries and the folders this output created, and leaves
    existing files as they were; an existing file is replaced only with ``overwrite``. Every
    target is checked again before the first rename, and a rename that fails even so (a race, an
    I/O error) undoes the ones before it; a name that is both a file and another's folder in one
    output is refused, and so are two names of one file (through a link inside the output), a
    folder written into that leads elsewhere by the commit, and an earlier output's file to remove
    whose folder leads outside the output folder (:func:`check_inside`).

    Writers call :func:`atomic_write` and :func:`make_folder`, which join the transaction that
    :func:`transaction` opened in this context (or act alone when there is none).
    """

    def __init__(self, overwrite: bool):
        self.overwrite = overwrite
        self.created: list[Path] = []  # folders this output made, outermost first
        #: (locked descriptor, or None once closed; the temporary's device and inode; temporary, target)
        self.staged: list[tuple[int | None, tuple[int, int], Path, Path]] = []
        self._held = 0  # descriptors still open in ``staged``
        # the targets and folders above as sets, and each folder's temporaries judged once: an
        # output of many files costs time in proportion to their number, not its square
        self._targets: set[Path] = set()
        self._folders: set[Path] = set()
        self._swept: set[Path] = set()
        #: existing files this output replaces by others, each with the output folder it must stay in: removed on commit
        self.obsolete: list[tuple[Path, Path]] = []
        #: each folder written into, as its links led when its first file was staged: the renames
        #: into it are refused if it leads elsewhere by the commit (a link put in its place)
        self._real: dict[Path, str] = {}
        self._by_real: dict[str, Path] = {}  # each target's real path (its folder's links followed)
        #: folder -> the output folder it must stay in, and the file it was checked with (an ``unpack
        #: --all``'s task folder: :meth:`confine`)
        self._confined: dict[Path, tuple[Path, Path]] = {}
        #: (folder, find): ``find()`` names the files of an earlier output in ``folder`` that this one
        #: replaces by others; asked again at the commit, under the folder's lock (``remove_found_on_commit``)
        self.finders: list[tuple[Path, Callable[[], Iterable[str]]]] = []

    def check(self, target: Path) -> None:
        check_replaceable(target)
        if not self.overwrite and os.path.lexists(target):
            raise OutputExistsError(f"{target}: already exists; pass --force (overwrite=True) to replace it")

    def confine(self, root: Path, target: Path) -> None:
        """Keep the folder of ``target`` (a file this output will write there: an ``unpack
        --all``'s ``OUT/NAME/model.safetensors``) inside ``root``: checked now (:func:`check_inside`),
        where it leads kept as it is now; each folder made and file staged below it is checked
        again, and the commit refuses it if it leads elsewhere by then (a link put in its place
        while an earlier task was written)."""
        folder = target.parent
        self._real[folder] = os.path.realpath(folder)  # before the check: a swap after it is seen at the commit
        check_inside(root, target)
        self._confined[folder] = (root, target)

    def _check_confined(self, path: Path, doing: str = "write there") -> None:
        """:func:`check_inside` of ``path`` against the output folder its confined folder must stay in."""
        if not self._confined:
            return
        for p in (path, *path.parents):
            if p in self._confined:
                check_inside(self._confined[p][0], path, doing)
                return

    def folder(self, path: Path) -> Path:
        missing = [p for p in (path, *path.parents) if not p.exists()]
        for p in reversed(missing):
            self._check_confined(p)  # its folder, where it is made
            if p in self._targets:
                raise OutputError(f"{p}: a file of this output, and the folder of another; refusing to write either")
            p.mkdir()
            self.created.append(p)
            self._folders.add(p)
        return path

    def stage(self, target: Path, write: Callable[[Path], object]) -> None:
        if target in self._folders:
            raise OutputError(f"{target}: a file of this output, and the folder of another; refusing to write either")
        self.check(target)
        self._check_confined(target)  # again for each file: its folder may have been swapped for a link
        if target in self._targets:
            raise OutputError(f"{target}: written twice in one output")
        if target.parent not in self._real:
            self._real[target.parent] = os.path.realpath(target.parent)
        real = os.path.join(self._real[target.parent], target.name)
        if real in self._by_real:  # a link inside the output (vae -> unet) makes two names one file
            raise OutputError(f"{shortened(target)}: the same file as {shortened(self._by_real[real])} (a link in "
                              "the output leads one folder to the other); refusing to write either")
        with writing(target):
            with signals_held():  # made and recorded together: an abort finds every temporary
                fd, tmp = temp_beside(target, swept=self._swept)
                st = os.fstat(fd)
                self.staged.append((fd, (st.st_dev, st.st_ino), tmp, target))  # the lock guards tmp
                self._held += 1
                self._targets.add(target)
                self._by_real[real] = target
            write(tmp)
            if self._held > HELD_LOCKS:  # past that, the pid in the name alone guards it: an output
                with signals_held():     # of thousands of files fits any limit on open files
                    i = len(self.staged) - 1
                    os.close(fd)
                    self.staged[i] = (None, *self.staged[i][1:])
                    self._held -= 1

    def remove_found_on_commit(self, folder: Path, find: Callable[[], Iterable[str]]) -> None:
        """Remove the files ``find()`` names in ``folder`` (the weights of an earlier output there
        that this one's layout does not have) once the new files are in place; needs ``overwrite``
        for any it finds. ``find`` is asked now, so that a refusal comes before any work, and again
        at the commit under the folder's lock, so that what another output put there meanwhile
        (a concurrent ``unpack --force`` of another layout) is judged as it then stands. A file
        whose folder leads outside ``folder`` (through a link in it: ``vae -> ../elsewhere``) is
        refused, never removed."""
        for name in sorted(find()):
            self._check_removal(folder, folder / name)
        self.finders.append((folder, find))

    def _check_removal(self, folder: Path, target: Path) -> None:
        check_inside(folder, target, _REMOVE)
        self.check(target)

    def commit(self) -> None:
        # the lock is taken outside signals_held: Ctrl-C still ends a wait for another output's commit
        with folder_locks(self._locked()), signals_held():  # all the renames, or none left half done
            self._commit()

    def _locked(self) -> list[Path]:
        """The folders whose lock this output's commit holds: where it replaces earlier weights, and
        the folder that holds all its files (two outputs into one folder take turns, whole)."""
        folders = {folder for folder, _ in self.finders}
        parents = {str(target.parent) for _, _, _, target in self.staged}
        if parents:
            folders.add(Path(os.path.commonpath(sorted(parents))))
        return sorted(folders)

    def _commit(self) -> None:
        global _committed
        # this output's files by their real names: a link inside the output (vae -> unet) must not
        # make one of them an earlier output's file to remove
        ours = self._by_real
        listed = {target for _, target in self.obsolete}
        for folder, find in self.finders:  # the folder as the last output committed there left it
            for name in sorted(find()):
                target = folder / name
                if (target not in self._targets and target not in listed
                        and os.path.join(os.path.realpath(folder / os.path.dirname(name)), target.name) not in ours):
                    self._check_removal(folder, target)
                    self.obsolete.append((folder, target))
                    listed.add(target)
        self.finders = []
        for _, _, _, target in self.staged:  # all refusals before the first rename
            self.check(target)
            self._check_confined(target)
        for root, target in self._confined.values():  # those no file was written into directly too
            check_inside(root, target)
        for folder, was in self._real.items():
            if os.path.realpath(folder) != was:
                raise OutputError(f"{shortened(folder)}: now leads to {shortened(os.path.realpath(folder))}, not "
                                  f"{shortened(was)} where this output's files were written; refusing to put them there")
        before, done = _committed, []
        try:
            for _, ident, tmp, target in self.staged:
                existed = os.path.lexists(target)
                aside = _keep_aside(target) if existed and self.overwrite else None
                done.append((ident, target, existed, aside))
                commit(tmp, target, overwrite=self.overwrite, sync=False)
            for folder in dict.fromkeys(target.parent for _, _, _, target in self.staged):
                sync_folder(folder)  # once per folder, not per file
        except BaseException:
            # a rename failed after the checks (a race, an I/O error): the files put in place
            # before it go again, and the files they replaced come back
            for ident, target, existed, aside in reversed(done):
                _put_back(ident, target, existed, aside)
            _committed = before
            raise
        for _, _, _, aside in done:
            if aside is not None:
                _drop_aside(aside)
        self._close()
        self.staged = []
        self._targets = set()
        self._real, self._by_real = {}, {}
        confined, self._confined = self._confined, {}
        for folder, target in self.obsolete:
            try:
                check_inside(folder, target, _REMOVE)  # again: a link may have been put in meanwhile
                within = next((confined[p][0] for p in target.parents if p in confined), None)
                if within is not None:  # and the output folder its task folder must stay in
                    check_inside(within, target, _REMOVE)
            except OutputError as e:
                log.warning("%s", e)  # the output is in place: the earlier file is left, not refused
                continue
            try:
                target.unlink()
            except FileNotFoundError:
                pass
        self.obsolete = []

    def abort(self) -> None:
        with signals_held():  # a second Ctrl-C does not leave temporaries behind
            self._abort()

    def _abort(self) -> None:
        left: list[Path] = []
        why: OSError | None = None
        for _, _, tmp, _ in self.staged:  # each one tried: one that cannot go must not keep the others
            try:
                tmp.unlink(missing_ok=True)
            except OSError as e:
                left.append(tmp)
                why = e
        self._close()
        self.staged = []
        self._targets = set()
        self._real, self._by_real, self._confined = {}, {}, {}
        self.obsolete, self.finders = [], []
        for p in reversed(self.created):
            try:
                p.rmdir()  # only if empty: never anything someone else put there
            except OSError:
                pass
        if why is not None:
            left_behind(left, why)


    def _close(self) -> None:
        for fd, *_ in self.staged:
            if fd is not None:
                os.close(fd)
        self._held = 0


@contextmanager
def folder_locks(folders: Iterable[Path]) -> Iterator[None]:
    """Hold an exclusive lock for each folder (in sorted order, so two holders never wait on each
    other) for the block: the commits of outputs into one folder, by any process of this machine,
    take turns. The lock is an ``flock`` on a file named by the folder's device and inode in a
    folder of the user's under the temporary folder (``_lock_file``), not on the folder itself,
    which ``flock DIR command`` (the shell's way to serialise jobs on a folder) may hold for the
    whole command. A wait says so in one log line. A folder that cannot be locked (no room for the
    lock file, a file system without locks) is passed over."""
    held: list[tuple[int, Path | None]] = []  # each descriptor, and its lock file's path where it holds the lock
    try:
        for folder in sorted(folders):
            _lock(folder, held)
        yield
    finally:
        with signals_held():  # each lock file removed and closed, not left behind by a second Ctrl-C
            for fd, path in held:
                if path is not None:
                    _remove_lock_file(fd, path)
                os.close(fd)  # closing the last descriptor releases the lock


def _lock(folder: Path, held: list[tuple[int, Path | None]]) -> None:
    """Lock ``folder``'s lock file, appending its descriptor to ``held`` (with its path once locked).
    The holder before us may have removed the file as it let go (``_remove_lock_file``): the lock
    we got is then on a file no one else will open, so it is let go and taken again on the file
    now at the path."""
    waited = False
    while True:
        opened = _lock_file(folder)
        if opened is None:
            return
        fd, path = opened
        if any(p == path for _, p in held):  # one folder under two names (a link): locked once, not waited on for ever
            os.close(fd)
            return
        held.append((fd, None))
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not waited:
                log.info("%s: waiting for another tallpack output's files to be put in place there", folder)
                waited = True
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as e:
            log.debug("%s: cannot lock the folder: %s", folder, e)
            return
        if _same_file(fd, path):
            held[-1] = (fd, path)
            return
        held.pop()
        os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    """Whether ``fd`` is still the file at ``path`` (not removed, nor replaced by another)."""
    try:
        now, ours = os.stat(path, follow_symlinks=False), os.fstat(fd)
    except OSError:
        return False
    return ours.st_nlink > 0 and (now.st_dev, now.st_ino) == (ours.st_dev, ours.st_ino)


def _remove_lock_file(fd: int, path: Path) -> None:
    """Remove the lock file ``path`` while ``fd`` still holds its lock: a process that opened it
    meanwhile finds, once it has the lock, that the file is gone (``_lock``), and so no lock file
    is left for each folder ever written into."""
    try:
        if _same_file(fd, path):
            path.unlink()
    except OSError as e:
        log.debug("%s: cannot remove the lock file: %s", path, e)


def _last_resort(root: str) -> bool:
    """Whether ``root``, Python's temporary folder, is its last resort, the working folder ($TMPDIR,
    /tmp and /var/tmp not writable: a read-only container): no lock folder goes there, among the
    user's files (nor would processes started in other folders see it)."""
    named = [os.environ.get(v) for v in ("TMPDIR", "TEMP", "TMP")] + ["/tmp", "/var/tmp", "/usr/tmp"]
    try:
        if not os.path.samefile(root, os.getcwd()):
            return False
        return not any(os.path.isdir(d) and os.path.samefile(root, d) for d in named if d)
    except OSError:
        return False


def _lock_file(folder: Path) -> tuple[int, Path] | None:
    """An open descriptor of the lock file of ``folder`` (``TMPDIR/tallpack-locks-UID/DEV-INO``,
    zero bytes, removed by its holder as it lets go) and its path, or None where there can be none."""
    if fcntl is None:
        return None
    try:
        st = os.stat(folder)
        root = tempfile.gettempdir()
        if _last_resort(root):
            return None
        locks = Path(root) / f"tallpack-locks-{os.getuid()}"
        locks.mkdir(mode=0o700, exist_ok=True)
        if not _own_private_folder(locks):
            return None
        path = locks / f"{st.st_dev:x}-{st.st_ino:x}"
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
        try:
            return os.open(path, flags, 0o600), path
        except PermissionError:  # another owner's file in our private folder: no lock of ours, so stale
            log.debug("%s: replacing a lock file this user may not open", path)
            path.unlink(missing_ok=True)
            return os.open(path, flags, 0o600), path
    except OSError as e:
        log.debug("%s: cannot lock the folder: %s", folder, e)
        return None


_untrusted_warned: set[Path] = set()


def _own_private_folder(locks: Path) -> bool:
    """Whether ``locks`` is a folder (not a link) of this user's that no one else may write into.
    In a shared /tmp anyone may make it first: another user who can put files there could hold
    the lock of any output folder, and every output into it would wait for ever. Such a folder is
    passed over (outputs then take no lock), with one warning."""
    st = os.lstat(locks)
    if not stat.S_ISDIR(st.st_mode):
        return False
    if st.st_uid == os.getuid() and not st.st_mode & 0o022:
        return True
    if locks not in _untrusted_warned:
        _untrusted_warned.add(locks)
        whose = "is not yours" if st.st_uid != os.getuid() else "may be written by others"
        log.warning("%s: %s (owner %d, mode %o), so tallpack's output locks are not taken there: outputs into one "
                    "folder at once are not made to take turns; remove it, or set TMPDIR to a folder of your own",
                    locks, whose, st.st_uid, stat.S_IMODE(st.st_mode))
    return False


def _keep_aside(target: Path) -> Path | None:
    """A second name (a temporary's) for the existing file ``target``, so that it can be put back
    if the output it is replaced by fails; None where the file system has no hard links."""
    tag = f"{_host_tag()}-{_boot_tag()}-{os.getpid()}"
    aside = target.parent / f".{_stem(target.name)}.{tag}-{secrets.token_hex(4)}.partial"
    try:
        os.link(target, aside, follow_symlinks=False)
    except OSError as e:
        log.debug("%s: cannot keep the file it replaces: %s", target, e)
        return None
    return aside


def _drop_aside(aside: Path) -> None:
    """Remove the second name :func:`_keep_aside` gave a file; one that cannot go (a sticky
    folder, made read-only meanwhile) is named in a warning, not raised over the output's own
    error or success."""
    try:
        aside.unlink(missing_ok=True)
    except OSError as e:
        left_behind([aside], e)


def _put_back(ident: tuple[int, int], target: Path, existed: bool, aside: Path | None) -> None:
    """Undo one rename of a failed commit: ``target`` gets back the file it had (or none), if it
    still holds this output's file (device and inode ``ident``)."""
    try:
        now = os.lstat(target)
    except OSError:
        return
    if (now.st_dev, now.st_ino) != ident:
        if aside is not None:  # the earlier file is still in place
            _drop_aside(aside)
        return
    try:
        if aside is not None:
            os.replace(aside, target)
        elif not existed:
            target.unlink()
        else:
            log.warning("%s: replaced by a file of an output that failed, and the earlier file could not be kept", target)
    except OSError as e:
        log.warning("%s: could not be undone after a failed output: %s", target, e)


@contextmanager
def transaction(*, overwrite: bool = False) -> Iterator[Transaction]:
    """Group the files written inside the block into one all-or-nothing output (see
    :class:`Transaction`); nested blocks join the outer one."""
    outer = _current.get()
    if outer is not None:
        yield outer
        return
    tx = Transaction(overwrite)
    token = _current.set(tx)
    try:
        yield tx
    except BaseException:
        _current.reset(token)
        tx.abort()
        raise
    _current.reset(token)
    try:
        tx.commit()
    except BaseException:
        tx.abort()
        raise


def make_folder(path: str | os.PathLike) -> Path:
    """Create ``path`` and its parents as needed (inside a transaction, they are removed again if
    the output fails)."""
    p = Path(path)
    try:
        if p.exists() and not p.is_dir():
            raise InvalidArgumentError(f"{p}: exists and is not a folder")
        check_folders_above(p)
        check_no_dangling_link(p)
        tx = _current.get()
        if tx is not None:
            return tx.folder(p)
        p.mkdir(parents=True, exist_ok=True)
        return p
    except NotADirectoryError:  # a file put above it meanwhile
        check_folders_above(p)
        raise
    except OSError as e:
        if e.errno == errno.ENAMETOOLONG and not isinstance(e, OutputError):
            raise _too_long(p) from None
        raise


def check_folders_above(path: str | os.PathLike) -> None:
    """InvalidArgumentError when a regular file stands where a folder above ``path`` must be (an
    output ``notes.txt/out``): the folder cannot be created there, whatever ``overwrite`` says."""
    above = file_above(path)
    if above is not None:
        raise InvalidArgumentError(f"{above}: is a file, not a folder (it is above the output {path})")


def check_no_dangling_link(path: str | os.PathLike) -> None:
    """OutputError when ``path``, or a folder above it, is a link that leads nowhere (``out ->
    ../nowhere``): the folder is not made through it, which would put the output where the user did
    not name (a link to an unmounted disk's folder writes onto the disk below); the line says where
    it leads.

    >>> check_no_dangling_link("o3/a")  # o3 -> nowhere
    OutputError: o3/a: its folder o3 is a link to /w/nowhere, which does not exist; ...
    """
    p = Path(path)
    for q in reversed((p, *p.parents)):  # the outermost: the first a mkdir would meet
        if not os.path.islink(q):
            continue
        try:
            os.stat(q)
            continue  # it leads somewhere
        except OSError as e:
            if e.errno == errno.ELOOP:
                where = "a link in a loop of links"
            elif e.errno in (errno.ENOENT, errno.ENOTDIR):
                where = f"a link to {shortened(os.path.realpath(q))}, which does not exist"
            else:  # not ours to judge (a folder we may not read): the write says why
                continue
        what = "is" if q == p else f"its folder {shortened(q)} is"
        raise OutputError(f"{shortened(p)}: {what} {where}; create the folder it leads to, or name another output "
                          "(a folder is not made through a link)")


def remove_found_on_commit(folder: str | os.PathLike, find: Callable[[], Iterable[str]]) -> None:
    """Remove the files ``find()`` names in ``folder`` (an earlier output's, which the one being
    written replaces by others) once that output's files are in place: see
    :meth:`Transaction.remove_found_on_commit` (needs an open :func:`transaction`)."""
    tx = _current.get()
    if tx is None:
        raise RuntimeError("remove_found_on_commit outside a transaction")
    tx.remove_found_on_commit(Path(folder), find)


def atomic_write(target: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Write ``target`` through ``write(temporary_path)``: under a temporary name, renamed into
    place when complete (with the other files of the transaction, when one is open). A full disk
    is a one-line :class:`OutputError`."""
    target = Path(target)
    tx = _current.get()
    if tx is not None:
        tx.stage(target, write)
        return target
    with writing(target):
        fd, tmp = -1, None
        try:
            with signals_held():  # a signal lands after both are set, inside the try: tmp is removed
                fd, tmp = temp_beside(target)
            write(tmp)
            with signals_held():
                commit(tmp, target)
        except BaseException:
            if tmp is not None:
                try:
                    tmp.unlink(missing_ok=True)
                except OSError as e:  # the error that ended the write is the one to tell
                    left_behind([tmp], e)
            raise
        finally:
            if fd >= 0:
                os.close(fd)
    return target
