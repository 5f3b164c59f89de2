"""Outputs and pack inputs at URLs.

An output (archive or folder) is written to a local staging folder, then uploaded with fsspec
(``put``) once complete, so a failed write leaves nothing at the URL. A pack input given as a URL
(a checkpoint file or a model folder: ``s3://...``, ``hf://org/model``, ...) is downloaded into a
temporary folder first, then read like a local one; the archive records the URL, less the
credentials a link may carry (``remote.redact``: a password, the signature of a presigned link).

Local paths (and ``file://`` URLs) are written and read in place, as before. The staging folders
are temporary folders under ``$TMPDIR``: they need room for the whole output, or the inputs.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

from .errors import (CheckpointError, CheckpointNotFoundError, InvalidArgumentError, OutputError, OutputExistsError,
                     TallpackError, missing_package, quoted)
from .fsutil import check_folders_above, check_replaceable, committed, forget_commits, full_disk
from . import remote
from .remote import RETRY, failure, lost, redact, refusal, upload_failure, with_timeouts
from .storage import is_url

log = logging.getLogger(__name__)
_K = TypeVar("_K")

#: fsspec protocols whose paths start with a bucket (or container), which tallpack never creates:
#: a mistyped one is an error, not a new bucket in the user's account
BUCKET_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oci", "oss", "r2"})

#: ``sharding.weights_among``: the weight files of an earlier write in a folder, which a write with
#: ``overwrite`` removes when its own layout does not have them (a model.safetensors beside new shards)
Stale = Callable[[set[str], Callable[[str], bytes], Callable[[str], bool]], set[str]]

#: the staging folders of the URLs being written: folder -> (file system, path, URL, overwrite)
_active: dict[Path, tuple[Any, str, str, bool]] = {}


def local_path(target: str | os.PathLike) -> Path:
    """A local target as a path (``file://`` stripped)."""
    return Path(os.fspath(target).removeprefix("file://"))


def _fs(url: str, storage_options: dict[str, Any] | None):
    from fsspec.core import url_to_fs

    try:
        return url_to_fs(url, **with_timeouts(url, storage_options))
    except ImportError as e:
        raise missing_package(redact(url), e) from None


def exists(target: str | os.PathLike, storage_options: dict[str, Any] | None = None) -> bool:
    """Whether a local path or a URL exists."""
    if not is_url(target):
        return local_path(target).exists()
    url = os.fspath(target)
    fs, path = _fs(url, storage_options)
    return _exists(fs, path, redact(url))


def check_file_name(target: str | os.PathLike, *, what: str = "the output's", example: str = "out") -> None:
    """InvalidArgumentError for an output written as one file whose name ends in a separator, ``.``
    or ``..`` (``newdir/``): it names a folder, and ``Path`` would drop the ``/`` and write a file
    ``newdir``. ``what`` and ``example`` complete the message (``the archive's``, ``family.tallpack``).

    >>> check_file_name("newdir/", what="the archive's", example="family.tallpack")
    Traceback (most recent call last):
    tallpack.errors.InvalidArgumentError: newdir/: names a folder; give the archive's file name, e.g. newdir/family.tallpack
    """
    raw = os.fspath(target)
    path = urlsplit(raw).path if is_url(raw) else raw.removeprefix("file://")
    last = path
    for sep in {"/", os.sep, os.altsep or "/"}:
        last = last.rsplit(sep, 1)[-1]
    if last in ("", ".", ".."):
        inside = raw if raw.endswith(("/", os.sep)) else raw + "/"
        raise InvalidArgumentError(f"{raw}: names a folder; give {what} file name, e.g. {inside}{example}")


def check_file_output(target: str | os.PathLike, storage_options: dict[str, Any] | None = None, *,
                      what: str = "the output's", example: str = "out") -> None:
    """Before any work, for an output written as one file: never a name that ends as a folder's
    (``check_file_name``), a device, a link or a folder, ``overwrite`` or not
    (``fsutil.check_replaceable``), nor below a folder that does not exist; at a URL, never a
    folder (objects below its name)."""
    check_file_name(target, what=what, example=example)
    if not is_url(target):
        path = local_path(target)
        check_folders_above(path)
        check_replaceable(path)
        if not path.parent.is_dir():  # as the writer would find it, but before any input is read
            raise InvalidArgumentError(f"{path.parent}: output folder does not exist")
        return
    url = os.fspath(target).rstrip("/")
    fs, rpath = _fs(url, storage_options)
    if _isdir(fs, rpath):
        raise _a_folder(redact(url))


@contextmanager
def staged(target: str | os.PathLike, storage_options: dict[str, Any] | None = None, *, overwrite: bool = False,
           stale: Stale | None = None, folder: bool = False) -> Iterator[Path]:
    """A local path to write ``target`` at (a file, or with ``folder`` a folder); for a URL,
    uploaded when the block succeeds. A URL's existing objects are replaced only with ``overwrite``
    (checked before the block for the target itself, before the upload for every file of a
    folder), and its bucket must exist. As on a disk, a file is never written where the URL holds
    a folder (objects below its name), nor a folder where it holds an object, ``overwrite`` or not:
    one name would then be both, which no file system can copy.

    >>> with staged("s3://models/family.tallpack") as local:
    ...     write(local)      # then put to s3://models/family.tallpack
    """
    if not is_url(target):
        yield local_path(target)
        return
    raw = os.fspath(target).rstrip("/")
    url = redact(raw)  # what messages and logs name: never a signed link's credentials
    if folder and urlsplit(raw).query:  # its files' URLs would go after the query (or into an S3 key)
        raise InvalidArgumentError(f"{url}: a folder cannot be written at a URL with a query string (a signed link "
                                   "names one object); give the folder's URL (s3://bucket/prefix), or write it to a "
                                   "local folder and upload its files")
    fs, rpath = _fs(raw, storage_options)
    _check_target(fs, rpath, url, overwrite, folder)
    try:
        with tempfile.TemporaryDirectory(prefix="tallpack-stage-") as tmp:
            # (a signed link's query is no part of the name: logs show the local path)
            local = Path(tmp) / (Path(rpath.split("?", 1)[0]).name or "out")
            _active[local] = (fs, rpath, url, overwrite)
            before = committed()
            try:
                try:
                    yield local
                finally:
                    del _active[local]
                upload(local, fs, rpath, url, overwrite=overwrite, stale=stale)
            except BaseException:
                forget_commits(before)  # the staged copy is not the output: nothing was written at the URL
                raise
    except OSError as e:  # the staging folder is full: say so of the URL, not of a temporary folder now gone
        why = full_disk(e)
        if why is None or not _names_temp(e):
            raise
        err = OutputError(f"{url}: {why} in the temporary folder {tempfile.gettempdir()} ($TMPDIR), where an "
                          "output at a URL is written whole before its upload (nothing was written at the URL); "
                          "set TMPDIR to a folder with room for the whole output")
        err.errno = e.errno
        raise err from None


def _names_temp(e: OSError) -> bool:
    """Whether ``e`` is about a path in the temporary folder (``$TMPDIR``)."""
    root = os.path.realpath(tempfile.gettempdir())
    text = f"{e.filename or ''} {e}"
    return root in text or tempfile.gettempdir() in text


def check_planned(paths: Iterable[Path]) -> None:
    """Before they are written: each of ``paths`` in a folder being staged for a URL must not
    exist at the URL, unless that write may overwrite (the upload checks every file again)."""
    for p in paths:
        for root, (fs, rpath, url, overwrite) in list(_active.items()):
            if overwrite or not p.is_relative_to(root):
                continue
            rel = p.relative_to(root).as_posix()
            dest = rpath if rel == "." else f"{rpath}/{rel}"
            if _exists(fs, dest):
                raise OutputExistsError(f"{url}{dest[len(rpath):]}: already exists; pass --force (overwrite=True) "
                                        "to replace it")


def _check_target(fs: Any, rpath: str, url: str, overwrite: bool, folder: bool = False) -> None:
    """Before any work: the bucket exists, the target is of its kind where it exists (a folder's
    name no object, a file's no folder), and no existing object (without ``overwrite``)."""
    if _buckets(fs):
        bucket = rpath.split("/", 1)[0]
        if _no_bucket(fs, bucket):
            raise OutputError(f"{url}: there is no bucket {bucket!r} (tallpack does not create buckets)")
    if folder and _isfile(fs, rpath):
        raise _not_a_folder(url)
    parts = rpath.split("/")
    for i in range(2 if _buckets(fs) else 1, len(parts)):  # a folder above it that is an object
        if _isfile(fs, "/".join(parts[:i])):
            raise _not_a_folder(url[:len(url) - len("/".join(parts[i:])) - 1])
    if not folder and _isdir(fs, rpath):
        raise _a_folder(url)
    if not overwrite and not folder and _exists(fs, rpath):
        raise OutputExistsError(f"{url}: already exists; pass --force (overwrite=True) to replace it")


def _not_a_folder(url: str) -> InvalidArgumentError:
    return InvalidArgumentError(f"{url}: exists and is not a folder")  # as fsutil.make_folder says it


def _a_folder(url: str) -> OutputError:
    return OutputError(f"{url}: is a folder; outputs are written as regular files, and --force (overwrite=True) "
                       "replaces only those: name another path")  # as fsutil.check_replaceable says it


def _check_kinds(fs: Any, rpath: str, url: str, written: list[str]) -> None:
    """Before the upload: no file of it is a folder at the URL (objects below its name), and no
    folder it needs is an object there. One listing of ``rpath``; a store that will not list is
    not asked again (the target itself was checked before the work)."""
    try:
        fs.invalidate_cache(rpath)
        existing = {str(p) for p in fs.find(rpath)}
    except Exception:
        return
    folders = set()
    for key in existing:
        while "/" in key and len(key) > len(rpath):
            key = key.rsplit("/", 1)[0]
            folders.add(key)
    for b in written:
        if b in folders:
            raise _a_folder(url + b[len(rpath):])
        parent = b
        while "/" in parent and len(parent) > len(rpath):
            parent = parent.rsplit("/", 1)[0]
            if parent in existing:
                raise _not_a_folder(url + parent[len(rpath):])


def _buckets(fs: Any) -> bool:
    """Whether the file system's paths start with a bucket (object stores have no folders either)."""
    return bool(({fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)) & BUCKET_PROTOCOLS)


def _no_bucket(fs: Any, bucket: str) -> bool:
    """True only when the store says the bucket does not exist: a role that may write but not
    list or head it is told nothing (s3fs's ``exists`` is False for both), and its upload goes on."""
    try:
        if fs.exists(bucket):
            return False
    except Exception:
        return False
    ask = getattr(fs, "call_s3", None)  # s3fs: the bucket's own answer tells missing from forbidden
    if ask is None:
        return False  # other stores: the upload says what is wrong, and never creates a bucket
    try:
        ask("head_bucket", Bucket=bucket)
    except FileNotFoundError:
        return True
    except Exception:
        return False
    return False


def _exists(fs: Any, path: str, shown: str | None = None) -> bool:
    """Whether an object is there; False where the store will not say (S3 answers 403 for a key
    that is not there to a role that may not list its bucket). An endpoint that does not answer is
    an OutputError naming ``shown`` (default: ``path``, its secrets taken out)."""
    try:
        return bool(fs.exists(path))
    except PermissionError:
        return False
    except Exception as e:  # botocore's own errors, a connection refused
        raise OutputError(f"{shown or redact(path)}: cannot check the output ({_failure(e)})") from None


def _isdir(fs: Any, path: str) -> bool:
    try:
        return bool(fs.isdir(path))
    except Exception:
        return False


def _isfile(fs: Any, path: str) -> bool:
    try:
        return bool(fs.isfile(path))
    except Exception:
        return False


def upload(local: Path, fs: Any, rpath: str, url: str, *, overwrite: bool = False, stale: Stale | None = None) -> None:
    """Put a local file, or every file under a local folder, at ``rpath`` (same relative names):
    an existing object is replaced only with ``overwrite``; then, with ``stale``, the weight files
    of an earlier write that the new layout does not have are removed."""
    if local.is_dir():
        pairs = [(str(p), f"{rpath}/{p.relative_to(local).as_posix()}") for p in sorted(local.rglob("*")) if p.is_file()]
    elif local.is_file():
        pairs = [(str(local), rpath)]
    else:
        return
    _check_kinds(fs, rpath, url, [b for _, b in pairs])
    old = _stale_objects(fs, rpath, [b for _, b in pairs], stale) if stale is not None and local.is_dir() else []
    if not overwrite:  # files the write would replace, or remove (an old layout's shards): as on a disk
        taken = [b for _, b in pairs if _exists(fs, b)] + old
        if taken:
            shown = url + taken[0][len(rpath):]
            more = f" (and {len(taken) - 1} more)" if len(taken) > 1 else ""
            raise OutputExistsError(f"{shown}: already exists{more}; pass --force (overwrite=True) to replace it")
    total = sum(os.path.getsize(a) for a, _ in pairs)
    log.info("uploading %d file(s), %d bytes, to %s", len(pairs), total, url)
    try:
        for parent in sorted({b.rsplit("/", 1)[0] for _, b in pairs if "/" in b}) if not _buckets(fs) else ():
            try:  # (object stores have no folders, and s3fs's makedirs would create a missing bucket)
                fs.makedirs(parent, exist_ok=True)
            except Exception:
                pass
        _put(fs, [a for a, _ in pairs], [b for _, b in pairs])
        for path in old:
            log.info("removing %s, a weight file of the earlier output", path)
            fs.rm_file(path)
    except Exception as e:
        why = upload_failure(e, url.split("://", 1)[0].lower() in ("http", "https")) or _failure(e)
        raise OutputError(f"{url}: upload failed ({why}){_left(fs, rpath, pairs, overwrite)}") from None
    except BaseException as e:  # Ctrl-C or SIGTERM: s3fs aborts its multipart upload on errors only
        _abort_uploads(fs, [b for _, b in pairs])
        left = _left(fs, rpath, pairs, overwrite, interrupted=url)
        if left and not left.endswith("nothing was written at the URL"):  # the command line's signal line says it
            setattr(e, "left_at_url", left.removeprefix("; "))
            if hasattr(e, "add_note"):  # Python 3.11: shown under a traceback
                getattr(e, "add_note")(left.removeprefix("; "))
        raise


def _put(fs: Any, lpaths: list[str], rpaths: list[str]) -> None:
    """``fs.put``; on Ctrl-C or SIGTERM an async file system's transfers are cancelled and waited
    for (fsspec's ``sync`` leaves them running in its thread until the process ends: a file put
    after the command said what it left, a multipart upload opened after it was aborted)."""
    loop = getattr(fs, "loop", None) if getattr(fs, "async_impl", False) else None
    if loop is None:
        fs.put(lpaths, rpaths)
        return
    done = asyncio.run_coroutine_threadsafe(fs._put(lpaths, rpaths), loop)
    try:
        done.result()
    except BaseException:
        done.cancel()
        concurrent.futures.wait([done], timeout=10)
        raise


def _abort_uploads(fs: Any, keys: list[str]) -> None:
    """Abort the multipart uploads open at ``keys`` on S3, as an interrupted ``put`` leaves them:
    their parts stay stored (and billed) on the server, listed by no ``ls``. Best effort."""
    if not hasattr(fs, "call_s3"):
        return
    for path in keys:
        bucket, key, _ = fs.split_path(path)
        try:
            found = fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=key).get("Uploads", [])
            for up in found:
                if up.get("Key") == key:
                    log.info("aborting the interrupted upload of %s", path)
                    fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=up["UploadId"])
        except Exception as e:
            log.warning("s3://%s: an interrupted upload may be left open on the server (%s); abort it there, or "
                        "let a lifecycle rule remove it", path, _failure(e))


def _left(fs: Any, rpath: str, pairs: list[tuple[str, str]], overwrite: bool, *, interrupted: str | None = None) -> str:
    """What a failed upload left at the URL, as the end of its message: nothing, or the files put
    before it failed (a folder is put file by file, and nothing takes them back); ``interrupted``:
    the URL of an upload cut off by a signal, named in the text (the command line's only line)."""
    where = f"at {interrupted}" if interrupted else "there"
    if overwrite:
        return (f"; files already {where} may be the earlier output's or this one's: write it again" if len(pairs) > 1
                else "")
    try:
        fs.invalidate_cache()
        there = [b for _, b in pairs if fs.exists(b)]
    except Exception:
        return ""
    if not there:
        return "; nothing was written at the URL"
    names = ", ".join(b[len(rpath) + 1:] or b for b in there[:3]) + (", ..." if len(there) > 3 else "")
    when = f"to {interrupted} before it ended" if interrupted else "before it failed"
    return (f"; {len(there)} of {len(pairs)} files were uploaded {when} ({names}): the output there is "
            "incomplete; write it again with --force (overwrite=True), or remove them")


def _stale_objects(fs: Any, rpath: str, written: list[str], stale: Stale) -> list[str]:
    """The weight files of an earlier write in each folder the upload writes to, that it does not write."""
    out: list[str] = []
    for folder in sorted({b.rsplit("/", 1)[0] for b in written}):
        if not _isdir(fs, folder):
            continue
        try:
            present = {str(p).rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(folder, detail=False)}
        except Exception:
            continue
        mine = {b.rsplit("/", 1)[1] for b in written if b.rsplit("/", 1)[0] == folder}
        found = stale(present, lambda name: fs.cat_file(f"{folder}/{name}"),
                      lambda name: bool(fs.isfile(f"{folder}/{name}")))
        out += [f"{folder}/{name}" for name in sorted(found - mine)]
    return out


def size(target: str | os.PathLike, storage_options: dict[str, Any] | None = None) -> int:
    """The size of a local file or of the object at a URL."""
    if not is_url(target):
        return local_path(target).stat().st_size
    fs, path = _fs(os.fspath(target), storage_options)
    return int(fs.size(path))


@contextmanager
def fetched(inputs: Mapping[_K, Any], storage_options: dict[str, Any] | None = None
            ) -> Iterator[tuple[dict[_K, Any], dict[str, str]]]:
    """``inputs`` with every URL replaced by a local copy (a file, or a folder with all its files),
    and a map from each copy's path to its URL (``redact``-ed: what archives record and errors
    show); the copies are removed when the block ends. Other inputs (paths, dicts of tensors) pass
    through. A TallpackError raised in the block names the URL, not the copy.

    >>> with fetched({"base": "s3://models/base", "cars": "ft/cars"}) as (local, urls):
    ...     pack(local["base"], {"cars": local["cars"]}, "family.tallpack")
    """
    urls = {k: os.fspath(v) for k, v in inputs.items() if isinstance(v, (str, os.PathLike)) and is_url(v)}
    if not urls:
        yield dict(inputs), {}
        return
    with tempfile.TemporaryDirectory(prefix="tallpack-fetch-") as tmp:
        local, origin = dict(inputs), {}
        for i, (key, url) in enumerate(urls.items()):
            shown = redact(url)
            fs, rpath = _fs(url.rstrip("/"), storage_options)
            dest = Path(tmp) / str(i) / _local_name(fs, rpath)
            dest.parent.mkdir()
            _download(fs, rpath, shown, dest)
            local[key] = dest
            origin[str(dest)] = shown
        try:
            yield local, origin
        except TallpackError as e:  # "/tmp/tallpack-fetch-.../0/cars.safetensors: ..." names its URL
            if len(e.args) == 1 and isinstance(e.args[0], str):
                text = e.args[0]
                for path, shown in origin.items():
                    text = text.replace(path, shown)
                e.args = (text,)
            raise


def _local_name(fs: Any, rpath: str) -> str:
    """The name of a URL's local copy: the last part of its path (an HTTP URL's without its query
    string, %-escapes decoded), so that a checkpoint keeps its suffix."""
    if _protocols(fs) & {"http", "https"}:
        rpath = unquote(urlsplit(rpath).path)
    name = rpath.rstrip("/").rsplit("/", 1)[-1]
    return "input" if name in ("", ".", "..") or "\0" in name else name


def _protocols(fs: Any) -> set[str]:
    return {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)


def _download(fs: Any, rpath: str, shown: str, dest: Path) -> None:
    """The file or folder at ``rpath`` into ``dest``; a CheckpointError naming ``shown`` (the URL)
    for anything that goes wrong: a missing object, a refusal (HTTP 403, 500), a transfer cut short."""
    try:
        info = fs.info(rpath)
    except FileNotFoundError as e:
        why = failure(e)  # fsspec's HTTP file system reports any failed request as missing
        if why is None:
            raise CheckpointNotFoundError(f"{shown}: no such file or folder") from None
        raise CheckpointError(f"{shown}: cannot download: {why}") from None
    except Exception as e:
        raise CheckpointError(f"{shown}: cannot download: {_failure(e)}") from None
    log.info("downloading %s", shown)
    try:
        if remote._http(fs):
            found = _http_folder(fs, rpath.rstrip("/"), shown)
            folder = found is not None
        else:
            found, folder = None, info.get("type") == "directory" or fs.isdir(rpath)
        if folder:
            dest.mkdir()
            _get_folder(fs, rpath.rstrip("/"), dest, shown, found)
        else:
            _get_file(fs, rpath, dest, info.get("size"), shown)
    except TallpackError:
        raise
    except Exception as e:  # aiohttp's, botocore's and fsspec's own errors too; never KeyboardInterrupt
        if full_disk(e) is not None:
            raise _no_room(shown, e) from None
        raise CheckpointError(f"{shown}: cannot download: {_failure(e)}") from None


def _no_room(shown: str, e: BaseException, after: str = "") -> CheckpointError:
    """A full temporary folder while ``shown`` was downloaded: retrying cannot help, more room can."""
    return CheckpointError(f"{shown}: cannot download: {full_disk(e)} in the temporary folder "
                           f"{tempfile.gettempdir()} ($TMPDIR){after}; inputs at URLs are downloaded there "
                           "whole before packing: set TMPDIR to a folder with room for them")


def _get_file(fs: Any, rpath: str, dest: Path, size: Any, shown: str) -> None:
    """One file, by ``get_file`` (``get`` would take the ``?`` of a signed link or the ``[`` of a key
    for a pattern); a copy of another size than the store announced is an error (a transfer cut short)."""
    try:
        fs.get_file(rpath, str(dest), callback=_received(size, shown))
    except FileNotFoundError as e:
        raise CheckpointError(f"{shown}: cannot download: {failure(e) or 'removed while downloading'}") from None
    except CheckpointError:  # (the callback's: too much, or too slow)
        raise
    except Exception as e:
        got = dest.stat().st_size if dest.is_file() else 0
        if full_disk(e) is not None:
            raise _no_room(shown, e, f", after {got} of {size} bytes") from None
        why = refusal(e) if lost(e) is None else None  # a cut or reset: said as the transfer broken off, below
        if why is not None:  # a timeout: no byte came for that long
            raise CheckpointError(f"{shown}: cannot download: {why}, after {got} of {size} bytes") from None
        if isinstance(size, int) and got < size:
            raise CheckpointError(f"{shown}: cannot download: the transfer broke off after {got} of {size} bytes "
                                  f"(truncated; {type(e).__name__}); try again") from None
        raise
    got = dest.stat().st_size
    if isinstance(size, int) and got != size:
        raise CheckpointError(f"{shown}: cannot download: {got} bytes received of {size} (truncated); try again")


def _received(size: Any, shown: str) -> Any:
    """A callback for fsspec's ``get_file`` that counts what it receives as it comes: a download of
    more bytes than the store announced (a server that answers with an endless body filled the
    temporary folder), or one that sends under ``HTTP_MIN_RATE`` bytes a second over
    ``HTTP_IDLE_TIMEOUT`` seconds (a byte at a time, each just before the idle timeout:
    slowloris), ends in a CheckpointError naming ``shown``."""
    from fsspec.callbacks import Callback

    class Received(Callback):
        def __init__(self) -> None:
            super().__init__()
            self.window = remote.HTTP_IDLE_TIMEOUT
            self.ends: float | None = None  # the window's end, from the first bytes
            self.since = 0

        def relative_update(self, inc: int | None = 1) -> None:
            inc = inc or 0
            self.value += inc
            self.since += inc
            announced = size if isinstance(size, int) else None
            if announced is not None and self.value > announced:
                raise CheckpointError(f"{shown}: cannot download: the server sent more than the {announced} "
                                      "bytes it announced")
            if self.ends is None:
                if inc:  # (its first bytes: the wait for the answer is the idle timeout's)
                    self.ends = time.monotonic() + self.window
            elif time.monotonic() >= self.ends:
                left = math.inf if announced is None else announced - (self.value - self.since)
                if self.since < min(remote.HTTP_MIN_RATE * self.window, left):
                    raise CheckpointError(f"{shown}: cannot download: timed out (the server sent {self.since} bytes "
                                          f"in {self.window} s, under {remote.HTTP_MIN_RATE} a second), after "
                                          f"{self.value} of {size} bytes; {RETRY}")
                self.ends, self.since = time.monotonic() + self.window, 0

    return Received()


def _failure(e: BaseException) -> str:
    return failure(e) or f"{type(e).__name__}: {quoted(e)}"


def _get_folder(fs: Any, rpath: str, dest: Path, shown: str, found: dict[str, Any] | None = None) -> None:
    """Every file below the folder ``rpath`` (those in ``found`` when given) into ``dest``, file by
    file under the same relative names (fsspec's recursive ``get`` trips over the folder entries an
    HTTP listing gives). Names that would land outside ``dest`` are refused."""
    found = fs.find(rpath, detail=True) if found is None else found
    for path in sorted(found):
        path = str(path)
        if not path.startswith(rpath + "/"):
            continue  # a listing's link to elsewhere (an HTTP page may link anywhere)
        rel = path[len(rpath) + 1:]
        parts = rel.split("/")
        if not rel or any(p in ("", ".", "..") for p in parts) or "\\" in rel:
            raise CheckpointError(f"{shown}/{rel}: a file name that would leave the folder")
        target = dest.joinpath(*parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        _get_file(fs, path, target, found[path].get("size"), f"{shown}/{rel}")


def _http_folder(fs: Any, url: str, shown: str) -> dict[str, dict[str, Any]] | None:
    """The files below ``url`` that its HTML listing pages link to, as fsspec's HTTP ``find`` finds
    them (None where its page links to nothing below it, or is binary: a file), reading at most
    ``HTTP_LISTING_MAX`` bytes of pages in all: fsspec read each page whole (an untyped file's too),
    so an endless one grew memory until it ran out."""
    from fsspec.asyn import sync

    found: dict[str, dict[str, Any]] = {}
    left, folders, seen = remote.HTTP_LISTING_MAX, [url], set()
    while folders:
        folder = folders.pop()
        if folder in seen:
            continue
        seen.add(folder)
        if len(seen) > remote.HTTP_LISTING_PAGES:
            raise CheckpointError(f"{shown}: cannot download: its folder listing is over the "
                                  f"{remote.HTTP_LISTING_PAGES} pages tallpack reads of one "
                                  "(tallpack.remote.HTTP_LISTING_PAGES)")
        try:
            page, _ = sync(fs.loop, remote.http_get, fs, folder, left, kinds=("text/html", None))
        except FileNotFoundError:
            if folder == url:
                return None
            continue  # (as fsspec's ``find``: a folder it cannot list is left out)
        if b"\0" in page:  # (an untyped file, not an HTML page)
            if folder == url:
                return None
            continue
        left -= len(page)
        if left < 0:
            raise CheckpointError(f"{shown}: cannot download: its folder listing is over the {remote.HTTP_LISTING_MAX} "
                                  "bytes tallpack reads of one (tallpack.remote.HTTP_LISTING_MAX)")
        links = _links(fs, folder, page.decode("utf-8", errors="ignore"))
        if folder == url and not links:
            return None
        for link in sorted(links):
            if link.endswith("/"):
                folders.append(link.rstrip("/"))
            else:
                found[link] = {"name": link, "size": None, "type": "file"}
    return found


def _links(fs: Any, url: str, text: str) -> set[str]:
    """The URLs below ``url`` that its HTML page ``text`` links to, as fsspec's HTTP ``ls`` takes them."""
    from fsspec.implementations.http import ex, ex2

    links = [u[2] for u in ex.findall(text)] + (ex2.findall(text) if fs.simple_links else [])
    out, parts, under = set(), urlsplit(url), url.rstrip("/") + "/"
    for link in links:
        if link.startswith("/") and len(link) > 1:  # an absolute path on this server
            link = f"{parts.scheme}://{parts.netloc}{link}"
        if link.startswith("http"):
            if link.replace("https", "http").startswith(under.replace("https", "http")):  # (either scheme)
                out.add(link)
        elif link not in ("..", "../"):
            out.add(under + link.lstrip("/"))
    return out
