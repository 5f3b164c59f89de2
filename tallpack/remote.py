"""Remote archives: range reads through fsspec (s3://, gs://, http(s)://, memory://, ...).

A read that the reader announces in advance (``prefetch``: every chunk one tensor, one array or
a batch of tensors needs) is fetched as few requests as possible: ranges closer than
``gap`` bytes are merged into one request (the gaps are alignment padding, at most 63 bytes
between neighbouring chunks), and the merged requests run concurrently (``cat_ranges``). The
fetched chunks wait in a small cache until read, and are kept a while after (``KEEP_READ``): a
rebuild that reads a chunk twice (the exact tier's) fetches it once. A range being fetched is
claimed: a read of it waits for that fetch, and no other prefetch asks for it again (threads
reading one large array's chunks, which the reader reads ahead in windows:
``container.READ_AHEAD_BYTES``, the next window fetched in the background). ``requests`` and
``fetched`` count what went over the wire, ``rounds`` the times a read waited for it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import sys
import threading
import traceback
import weakref
from collections.abc import Sequence
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from .errors import (ArchiveClosedError, ArchiveNotFoundError, FormatError, IntegrityError, RemoteError, TallpackError,
                     missing_package, quoted)

#: Ranges at most this far apart are always fetched as one request: chunks separated only by
#: alignment padding (spec §1: under 64 bytes).
DEFAULT_GAP = 64
#: A larger hole between two wanted ranges (other tasks' masks between a tensor's base and merged
#: chunks and this task's mask) is fetched with them when it is at most BRIDGE_MAX bytes and the
#: request's holes stay within BRIDGE_SHARE of the bytes it was asked for: a read fetches at most
#: 1/8 more, in fewer requests (a first remote ``state_dict`` of the benchmark's 4-task family
#: made 216 requests, now 106 for 4.9% more bytes, 1.09 -> 0.46 s at 20 ms a request; measured in
#: ``benchmarks/rounds/r35/D_net.py``). A fixed 16 KiB bridged that family's holes but no larger
#: ones (a tensor a chunk, more tasks: holes of whole masks), and 64 KiB fetched 43% more of a
#: 12-task family's; a hole of 1 MiB takes some 10-20 ms at one connection's 50-100 MB/s, about
#: the wait for a request's first byte that bridging it saves.
BRIDGE_MAX = 1 << 20
BRIDGE_SHARE = 1 / 8
#: One merged request covers at most this many bytes (larger ones are split, and run concurrently):
#: a 64 MiB window (``container.PREFETCH_BYTES``) goes as about CONCURRENT_REQUESTS requests at once.
#: A store far away sends each connection at its own rate (S3: some 50-100 MB/s), so a fetch takes
#: as long as its largest request: 66 MB of contiguous chunks at 20 ms and 50 MB/s a connection,
#: 1.48 s in 3 requests of up to 32 MiB, 0.43 s in 11 of up to 8 MiB (17 MB: 0.99 -> 0.51 s); on
#: plain loopback the same (about 1 s, bound by the CPU); Python's peak allocations the same (126 MiB,
#: every request in flight at once either way). ``benchmarks/rounds/r35/D_maxreq.py``.
MAX_REQUEST = 8 << 20
#: The prefetch cache holds at most this many bytes; older entries go first.
MAX_CACHE = 256 << 20
#: Bytes of prefetched ranges kept after they are read, the least recently read going first: the
#: exact tier's rebuilds read a chunk twice (a tensor's base and each task's residual, for its
#: derived merged vector and then for the task's own mask; ``merged()`` its base, for theta_0 and
#: for the merged vector), which fetched it twice. ``forget`` drops them (``verify`` reads anew).
KEEP_READ = 64 << 20
#: Query parameters that grant access (signed links of S3, GCS and Azure, tokens): never recorded
#: in an archive nor shown in a message (``redact``); compared in lower case.
SECRET_PARAMETERS = frozenset({
    "x-amz-signature", "x-amz-credential", "x-amz-security-token", "x-amz-algorithm", "x-amz-date",
    "x-amz-expires", "x-amz-signedheaders", "awsaccesskeyid", "signature", "expires",
    "x-goog-signature", "x-goog-credential", "x-goog-algorithm", "x-goog-date", "x-goog-expires",
    "x-goog-signedheaders", "googleaccessid", "sig", "token", "access_token", "api_key", "apikey", "key",
    "password", "secret", "auth", "authorization", "code"})
#: Seconds an HTTP request may wait for its connection, and for each next byte, before it is given
#: up (aiohttp's default instead bounds the whole request at 300 s: a large download failed however
#: steadily it went, and a server that accepted but never answered held a command for 10 minutes).
#: ``client_kwargs={"timeout": ...}`` in the storage options (or fsspec's configuration) replaces it.
HTTP_CONNECT_TIMEOUT = 30
HTTP_IDLE_TIMEOUT = 60
#: Bytes a second an HTTP range read must average over each ``HTTP_IDLE_TIMEOUT`` seconds, as
#: curl's ``--speed-limit``: a server that drips a byte a little faster than the idle timeout
#: (slowloris) held a read for days; one that sends steadily, however long, is not cut off.
HTTP_MIN_RATE = 1024
#: Bytes of an HTTP folder's listing (its HTML pages, all together) that pack reads, at
#: ``HTTP_MIN_RATE`` as a range: fsspec read a page whole, so an endless one grew memory until it ran out.
HTTP_LISTING_MAX = 16 << 20
#: The most pages of one HTTP folder's listing tallpack reads (its subfolders' included): a server of
#: endlessly nested small pages is refused, not asked a million times.
HTTP_LISTING_PAGES = 10_000
#: Range requests of one read in flight at once (botocore's pool holds 10 connections): a request
#: that is tried again (s3fs: 5 times) waits behind at most this many, so the first that fails
#: ends the read within its own tries, and the others are cancelled (fsspec's ``cat_ranges`` waited
#: for every range: a stalled S3 server held one tensor's 97 ranges for 12 minutes).
CONCURRENT_REQUESTS = 10
#: What identifies one version of an object in fsspec's ``info`` (S3, GCS, Azure, HTTP), strongest first.
IDENTITY_KEYS = ("VersionId", "generation", "version_id", "ETag", "etag", "LastModified", "Last-Modified",
                 "last_modified", "updated", "mtime")
#: What aiohttp and botocore call a connection that broke after it was made: the server closed or
#: reset it, or the response ended short of its Content-Length (a server killed mid-read).
CUT_ERRORS = frozenset({"ClientPayloadError", "ServerDisconnectedError", "ContentLengthError", "TransferEncodingError",
                        "ResponseStreamingError", "IncompleteReadError", "ConnectionClosedError"})
#: What a failed read whose server may answer next time says to do.
RETRY = "try again, and check the server if it keeps failing"
#: The loggers whose records may hold a signed link (fsspec's file systems and caches, the stores'
#: own): each gets a RedactingFilter. Filters of a logger do not see its children's records, so
#: each is named (and any other ``fsspec.*`` logger is found when an archive is opened).
REDACTED_LOGGERS = ("fsspec", "fsspec.http", "fsspec.asyn", "fsspec.caching", "fsspec.cached", "fsspec.reference",
                    "s3fs", "gcsfs", "adlfs")


def redact(url: str) -> str:
    """``url`` without the secrets it may carry: a ``user:password@`` part and the query parameters
    of a signed link or token (``SECRET_PARAMETERS``); what archives record and messages show.

    >>> redact("https://me:pw@host/cars.safetensors?X-Amz-Signature=ab&X-Amz-Credential=k&v=2")
    'https://host/cars.safetensors?v=2'
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    netloc = parts.netloc.rpartition("@")[2]
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        kept = [(k, v) for k, v in pairs if k.lower() not in SECRET_PARAMETERS]
        if len(kept) != len(pairs):
            query = urlencode(kept)
    if (netloc, query) == (parts.netloc, parts.query):
        return url
    return urlunsplit(parts._replace(netloc=netloc, query=query))


_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")


def redact_text(text: str) -> str:
    """``text`` with every URL in it ``redact``-ed.

    >>> redact_text("GET https://host/a?sig=zz&v=2 failed")
    'GET https://host/a?v=2 failed'
    """
    return _URL.sub(lambda m: redact(m[0]), text)


class RedactingFilter(logging.Filter):
    """Takes the credentials out of the URLs a library logs (fsspec's HTTP file system logs each
    signed link whole at DEBUG, which ``-vv`` shows), in its message and in the traceback it logs
    (a refused HEAD's aiohttp error names the link: ``url='...?X-Amz-Signature=...'``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            text = record.getMessage()
        except Exception:  # a library's malformed record: its handler reports it, as without this filter
            record.msg = redact_text(str(record.msg))  # (the report shows the message and its arguments)
            if isinstance(record.args, tuple):
                record.args = tuple(redact_text(a) if isinstance(a, str) else a for a in record.args)
            return True
        shown = redact_text(text)
        if shown != text:
            record.msg, record.args = shown, ()
        if record.exc_info and record.exc_info[1] is not None:
            text = "".join(traceback.format_exception(*record.exc_info)).rstrip("\n")
            shown = redact_text(text)
            if shown != text:  # formatted here, redacted, and kept as text only (else left for other handlers)
                record.exc_text, record.exc_info = shown, None
        elif record.exc_text:
            record.exc_text = redact_text(record.exc_text)
        return True


def redact_logs() -> None:
    """A RedactingFilter on each of ``REDACTED_LOGGERS`` and on every ``fsspec.*`` logger there is
    now, once each: a library user's DEBUG logging shows no signed link's secrets either (the
    command line's handler filters every record besides)."""
    names = {*REDACTED_LOGGERS, *(n for n in list(logging.root.manager.loggerDict) if n.startswith("fsspec."))}
    for name in names:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactingFilter) for f in logger.filters):
            logger.addFilter(RedactingFilter())


redact_logs()


def with_timeouts(url: str, storage_options: dict[str, Any] | None) -> dict[str, Any]:
    """``storage_options`` for ``url``: at an HTTP(S) URL, with timeouts on connecting and on each
    wait for data (``HTTP_IDLE_TIMEOUT``), none on the whole transfer, unless a timeout is given."""
    opts = dict(storage_options or {})
    if url.split("://", 1)[0].lower() not in ("http", "https"):
        return opts
    import fsspec.config

    client = {**fsspec.config.conf.get("http", {}).get("client_kwargs", {}), **opts.get("client_kwargs", {})}
    if "timeout" not in client:
        try:
            from aiohttp import ClientTimeout
        except ImportError:  # fsspec says what is missing
            return opts
        client["timeout"] = ClientTimeout(total=None, sock_connect=HTTP_CONNECT_TIMEOUT, sock_read=HTTP_IDLE_TIMEOUT)
        opts["client_kwargs"] = client
    return opts


def refusal(e: BaseException) -> str | None:
    """Why the server refused, behind ``e`` (its causes and contexts): ``"forbidden (HTTP 403)"``,
    ``"server error (HTTP 500)"``, ``"cannot connect (...)"``; None for a missing object (404) or
    anything else. fsspec's HTTP file system reports every failed request as FileNotFoundError
    (a redirect to a ``file://`` URL, or in a loop, was "no such archive")."""
    for c in _chain(e):
        redirect = _redirect(c)
        if redirect is not None:
            return redirect
        status = _status(c)
        if status is None or status == 404 or status < 400:
            continue
        try:
            phrase = HTTPStatus(status).phrase.lower()
        except ValueError:
            phrase = "refused"
        if status in (401, 403):
            return f"{phrase} (HTTP {status}): the link may have expired, or the credentials do not allow it"
        if status >= 500:
            return f"server error (HTTP {status}: {phrase}); try again later"
        return f"{phrase} (HTTP {status})"
    cause = _connection_error(e)
    if cause is not None:
        return f"cannot connect ({type(cause).__name__}: {quoted(cause)})"
    late = next((c for c in _chain(e) if _late(c)), None)
    if late is not None:  # (HTTP: no byte for HTTP_IDLE_TIMEOUT seconds)
        return f"timed out ({type(late).__name__}{': ' + quoted(late) if str(late) else ''})"
    return None


def lost(e: BaseException) -> str | None:
    """How the connection behind ``e`` broke after it was made (the server closed or reset it, the
    response ended short: a server killed mid-read), in a few words; None for anything else (a
    refusal, a connection never made, a timeout: ``refusal`` names those).

    >>> lost(aiohttp.ServerDisconnectedError())
    'the connection was cut mid-transfer (ServerDisconnectedError)'
    """
    for c in _chain(e):
        name = type(c).__name__
        if _late(c) or "Connector" in name:  # aiohttp's ClientConnectorError is a ClientOSError too
            return None
        if name in CUT_ERRORS or isinstance(c, (ConnectionResetError, ConnectionAbortedError, BrokenPipeError,
                                                 asyncio.IncompleteReadError)):
            return f"the connection was cut mid-transfer ({name})"
    return None


def upload_failure(e: BaseException, http: bool) -> str | None:
    """Why an upload (an HTTP PUT, an object store's writes) failed, in a few words, when the server
    does not take uploads: HTTP 405 or 501 (a plain web server: not a failure to try again), or, at
    an ``http`` URL, a connection cut mid-upload (such a server answers before the body is sent and
    closes the connection); None otherwise (``failure`` says why).

    >>> upload_failure(aiohttp.ClientResponseError(None, (), status=501), http=True)
    'the server does not take uploads (HTTP 501: not implemented)'
    """
    for c in _chain(e):
        status = _status(c)
        if status in (405, 501):
            return f"the server does not take uploads (HTTP {status}: {HTTPStatus(status).phrase.lower()})"
    cut = lost(e)
    if http and cut is not None:
        return f"{cut}; a network fault, or a plain web server that does not take uploads (HTTP PUT), which cuts them off so"
    return None


def failure(e: BaseException) -> str | None:
    """Why a request failed: a connection cut or reset (``lost``, first: ``refusal`` takes a reset
    for a connection never made), else a refusal or a timeout; None when neither says."""
    return lost(e) or refusal(e)


def _failed(e: BaseException) -> tuple[str, bool] | None:
    """``failure(e)``, and whether trying again may help (a cut connection, a server that could
    not be reached or stopped sending); None when neither says."""
    why = failure(e)
    if why is None:
        return None
    return why, lost(e) is not None or why.startswith(("cannot connect", "timed out"))


def _redirect(e: BaseException) -> str | None:
    """What is wrong with a redirect aiohttp did not follow: to a URL that is not HTTP(S) (a
    ``file://`` one), or one of too many (a loop); None for any other error."""
    name = type(e).__name__
    if name == "TooManyRedirects":
        return "too many redirects (the server redirects in a loop)"
    if name in ("NonHttpUrlRedirectClientError", "InvalidUrlRedirectClientError"):
        return f"the server redirects to {redact(str(e))!r}, which is no HTTP(S) URL; not followed"
    return None


def _late(e: BaseException) -> bool:
    return isinstance(e, TimeoutError) or "Timeout" in type(e).__name__


def _chain(e: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    c: BaseException | None = e
    while c is not None and all(c is not o for o in out):
        out.append(c)
        c = c.__cause__ or c.__context__
    return out


def _status(e: BaseException) -> int | None:
    """The HTTP status of an aiohttp response error, or of a botocore ClientError."""
    status = getattr(e, "status", None)
    if isinstance(status, int) and type(e).__name__.startswith("Client"):
        return status
    response = getattr(e, "response", None)
    if isinstance(response, dict):
        code = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return code if isinstance(code, int) else None
    return None


def identity(info: dict[str, Any]) -> dict[str, str]:
    """What tells one version of an object from another in its fsspec ``info``: its version, else
    its ETag, else its modification time (the first of ``IDENTITY_KEYS`` given)."""
    for key in IDENTITY_KEYS:
        value = info.get(key)
        if value not in (None, ""):
            return {key: str(value)}
    return {}


def coalesce(ranges: Sequence[tuple[int, int]], gap: int = DEFAULT_GAP, max_request: int = MAX_REQUEST,
             bridge: int = 0, share: float = BRIDGE_SHARE) -> list[tuple[int, int]]:
    """Merge ``(offset, nbytes)`` ranges into ``(start, end)`` requests: sorted, overlapping or
    adjacent ones (at most ``gap`` bytes apart) joined, and ones a hole of at most ``bridge``
    bytes apart while the request's holes stay within ``share`` of its ranges' bytes; each
    request at most ``max_request`` bytes unless one range alone is larger.

    >>> coalesce([(0, 10), (64, 10), (10000, 5)], gap=100)
    [(0, 74), (10000, 10005)]
    >>> coalesce([(0, 800), (900, 800), (5000, 800)], bridge=4096)   # 100 of 1600 bytes; not 3300 of 2400
    [(0, 1700), (5000, 5800)]
    """
    out: list[list[int]] = []  # start, end, bytes asked for, bytes of holes bridged
    for off, n in sorted(r for r in ranges if r[1] > 0):
        end = off + n
        if out and end - out[-1][0] <= max_request:
            last = out[-1]
            hole = off - last[1]
            if hole <= gap or (hole <= bridge and last[3] + hole <= share * (last[2] + n)):
                last[1] = max(last[1], end)
                last[2] += n
                last[3] += max(hole, 0) if hole > gap else 0
                continue
        out.append([off, end, n, 0])
    return [(a, b) for a, b, _, _ in out]


def split(spans: Sequence[tuple[int, int]], max_request: int = MAX_REQUEST) -> list[tuple[int, int]]:
    """``(start, end)`` requests with each larger than ``max_request`` cut into as few pieces of
    near equal size (a range of one large chunk: fetched on several connections at once).

    >>> split([(0, 10), (20, 45)], max_request=10)
    [(0, 10), (20, 29), (29, 38), (38, 45)]
    """
    out: list[tuple[int, int]] = []
    for start, end in spans:
        pieces = -(-(end - start) // max_request)
        if pieces <= 1:
            out.append((start, end))
            continue
        size = -(-(end - start) // pieces)
        out += [(a, min(a + size, end)) for a in range(start, end, size)]
    return out


class RemoteFile:
    """An archive in remote storage, read by range requests."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None, *, gap: int = DEFAULT_GAP):
        try:
            from fsspec.core import url_to_fs
        except ImportError:  # pragma: no cover - fsspec is a dependency
            raise TallpackError(f"{redact(url)}: reading remote archives needs fsspec") from None
        self.url = redact(url)  # what messages name: without the credentials a signed link carries
        redact_logs()  # fsspec's loggers made since tallpack was imported
        self.gap = gap
        #: range requests made, bytes they fetched, and the times a read waited for its requests
        #: (which ran concurrently): the round trips a read costs at a server far away
        self.requests = 0
        self.fetched = 0
        self.rounds = 0
        self._cache: dict[tuple[int, int], bytes] = {}  # prefetched, not read yet
        self._cached = 0
        self._kept: dict[tuple[int, int], bytes] = {}  # prefetched and read (KEEP_READ), least recent first
        self._kept_bytes = 0
        self._forgot = 0  # how many times forget() ran: a prefetch begun before one keeps nothing
        #: ranges a prefetch is fetching now, the event it sets when done and the thread that waits
        #: for it (0 for one in the background): a read of one in another thread waits for it, and
        #: another prefetch leaves it out (threads reading one large array's chunks)
        self._pending: dict[tuple[int, int], tuple[threading.Event, int]] = {}
        self._lock = threading.Lock()
        self.closed = False
        #: a small range read at open (the footer) and its bytes, read again when a read fails:
        #: other bytes there mean the server answers ranges wrongly (or the object was replaced)
        self._probe: tuple[int, bytes] | None = None
        #: how fsspec's file system was made, for a forked child to make its own (``_fs``)
        self._made = (url, storage_options)
        self._file_system: Any = None
        _OPEN.add(self)
        try:
            self._file_system, self._path = url_to_fs(url, **with_timeouts(url, storage_options))
            info = self._fs.info(self._path)
        except FileNotFoundError as e:
            failed = _failed(e)  # fsspec's HTTP file system reports any failed request as missing
            if failed is not None:
                raise RemoteError(self._failure(*failed)) from None
            raise ArchiveNotFoundError(f"{self.url}: no such archive") from None
        except ImportError as e:
            raise missing_package(self.url, e) from None
        except Exception as e:
            failed = _failed(e)
            if failed is not None:
                raise RemoteError(self._failure(*failed)) from None
            raise TallpackError(redact_text(f"{self.url}: cannot open ({type(e).__name__}: {quoted(e)})")) from None
        if info.get("type") == "directory":  # a prefix or a bucket: its "size" of 0 would read as an empty file
            raise FormatError(f"{self.url}: is a directory, not a tallpack archive")
        if info.get("size") is None:
            raise TallpackError(f"{self.url}: the server does not give the object's size; tallpack reads "
                                "archives from servers that do (Content-Length, Range requests)")
        self.size = int(info["size"])
        #: the version opened (ETag, version id or modification time): a failed read compares it again
        self.identity = identity(info)

    @property
    def _fs(self) -> Any:
        """fsspec's file system; in a forked child, one made there (``_after_fork_in_child``)."""
        if self._file_system is None:
            from fsspec.core import url_to_fs

            url, options = self._made
            self._file_system = url_to_fs(url, **with_timeouts(url, options))[0]
        return self._file_system

    @_fs.setter
    def _fs(self, fs: Any) -> None:
        self._file_system = fs

    def changed(self) -> str | None:
        """Why the object at the URL is no longer the one opened (removed, another size, ETag or
        version), or None when it is the same or the store will not say; asked after a read fails
        (a short read, a checksum that does not match), never before each read.

        >>> f = RemoteFile("s3://models/family.tallpack")   # then a new version is uploaded
        >>> f.changed()
        'changed on the server since it was opened (its ETag differs); reopen it'
        """
        self.forget()  # what was prefetched with the failed read may be as wrong: never served again
        try:
            self._fs.invalidate_cache(self._path)  # s3fs and others keep listings
            info = self._fs.info(self._path)
        except FileNotFoundError as e:
            if refusal(e) is None:
                return "removed from the server since it was opened"
            return None
        except Exception:
            return None
        size = info.get("size")
        if size is not None and int(size) != self.size:
            return (f"changed on the server since it was opened (now {int(size)} bytes, was {self.size}); "
                    "reopen it")
        now = identity(info)
        key = next(iter(self.identity), None)
        if key is not None and key in now and now[key] != self.identity[key]:
            return f"changed on the server since it was opened (its {key} differs); reopen it"
        return self._misread(key)

    def _misread(self, key: str | None) -> str | None:
        """Why the bytes read at open (``_probe``) come back different, or None: a server or proxy
        that answers Range requests with other bytes than asked for (a wrong Content-Range),
        which a checksum would otherwise call damage."""
        if self._probe is None:
            return None
        off, want = self._probe
        try:
            got = self._cat(off, off + len(want))
        except Exception:
            return None
        if got == want:
            return None
        where = f"the {len(want)} bytes at {off} differ from those read at open"
        if key is None:
            return (f"{where}: the object was replaced in place, or the server answers range requests with other "
                    "bytes than asked for; reopen it")
        return (f"the server answers range requests with other bytes than asked for ({where}, its {key} is the "
                "same): a misbehaving server or proxy, not a damaged archive")

    def _failure(self, text: str, retry: bool) -> str:
        """The one line a failed request raises: the archive, ``text`` (what failed and why), and
        what to do; any URL in it (an aiohttp message quotes its link) without its secrets."""
        return redact_text(f"{self.url}: {text}; {RETRY}" if retry else f"{self.url}: {text}")

    def _check(self, offset: int, nbytes: int) -> None:
        if self.closed:
            raise ArchiveClosedError(f"{self.url}: the archive is closed")
        if offset < 0 or nbytes < 0 or offset + nbytes > self.size:
            raise IntegrityError(f"{self.url}: read past the end of the file (truncated?)")

    def _fetch(self, spans: list[tuple[int, int]]) -> list[bytes]:
        try:
            if len(spans) == 1:
                start, end = spans[0]
                data = [self._cat(start, end)]
            elif getattr(self._fs, "async_impl", False):
                from fsspec.asyn import sync

                data = sync(self._fs.loop, self._gather, spans)
            else:
                data = self._fs.cat_ranges([self._path] * len(spans), [s for s, _ in spans],
                                           [e for _, e in spans], on_error="raise")
        except Exception as e:
            failed = _failed(e)
            if failed is None or not failed[1]:  # (not after a cut or a timeout: asking again would wait as long)
                changed = self.changed()  # a new version of another size: a 416 or a 404
                failed = (changed, False) if changed else failed or (f"{type(e).__name__}: {quoted(e)}", False)
            reason, retry = failed
            raise RemoteError(self._failure(f"range read at {spans[0][0]} failed ({reason})", retry)) from None
        for (start, end), d in zip(spans, data):
            if len(d) > end - start:  # the whole file for a range (over HTTP, one byte more is read at most)
                raise RemoteError(f"{self.url}: the server ignored a range request (it sent more than the "
                                  f"{end - start} bytes asked for); tallpack reads archives from servers that "
                                  "honour Range requests")
            if len(d) != end - start:
                why = self.changed()
                raise IntegrityError(f"{self.url}: {why}" if why else f"{self.url}: short read at {start} "
                                     "(changed or truncated?)")
        with self._lock:
            self.requests += len(spans)
            self.fetched += sum(len(d) for d in data)
            self.rounds += 1
            if self._probe is None and 0 < spans[0][0] and len(data[0]) <= 4096:  # the footer, at open
                self._probe = (spans[0][0], bytes(data[0]))
        return data

    def _cat(self, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of the object (over HTTP, at most one more: ``_http_range``)."""
        fs = self._fs
        if _http(fs):
            from fsspec.asyn import sync

            return sync(fs.loop, _http_range, fs, self._path, start, end)
        data: bytes = fs.cat_file(self._path, start=start, end=end)
        return data

    async def _cat_async(self, start: int, end: int) -> bytes:
        """``_cat`` on an async file system's event loop."""
        fs = self._fs
        if _http(fs):
            return await _http_range(fs, self._path, start, end)
        data: bytes = await fs._cat_file(self._path, start=start, end=end)
        return data

    async def _gather(self, spans: list[tuple[int, int]]) -> list[bytes]:
        """The spans, ``CONCURRENT_REQUESTS`` at a time; the first that fails cancels the rest."""
        limit = asyncio.Semaphore(CONCURRENT_REQUESTS)

        async def one(start: int, end: int) -> bytes:
            async with limit:
                return await self._cat_async(start, end)

        tasks = [asyncio.ensure_future(one(s, e)) for s, e in spans]
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def read(self, offset: int, nbytes: int) -> memoryview:
        self._check(offset, nbytes)
        if nbytes == 0:
            return memoryview(b"")
        key = (offset, nbytes)
        while True:
            with self._lock:
                hit = self._cache.pop(key, None)
                if hit is not None:
                    self._cached -= len(hit)
                else:
                    hit = self._kept.pop(key, None)
                    if hit is not None:
                        self._kept_bytes -= len(hit)
                if hit is not None:
                    self._keep(key, hit)
                    return memoryview(hit)
                pending = self._pending.get(key)
            if pending is None or pending[1] == threading.get_ident():  # (this thread's own fetch: not ended)
                return memoryview(self._fetch([(offset, offset + nbytes)])[0])
            pending[0].wait()  # another thread's prefetch: kept when it ends, unless it failed or was forgotten

    def _keep(self, key: tuple[int, int], data: bytes) -> None:
        """Keep a prefetched range just read (``KEEP_READ``), as the most recent; under ``_lock``."""
        if len(data) > KEEP_READ:
            return
        self._kept[key] = data
        self._kept_bytes += len(data)
        while self._kept_bytes > KEEP_READ:
            self._kept_bytes -= len(self._kept.pop(next(iter(self._kept))))

    @property
    def keep_bytes(self) -> int:
        """Bytes of ranges kept after they are read (``KEEP_READ``): ``verify`` reads what it
        fetched within that much."""
        return KEEP_READ

    def forget(self) -> None:
        """Drop every range fetched and not read, and every one kept after it was read: the next
        reads fetch from the server (``verify``; a failed read, whose neighbours may be as wrong)."""
        with self._lock:
            self._cache.clear()
            self._kept.clear()
            self._cached = self._kept_bytes = 0
            self._forgot += 1

    def read_many(self, ranges: Sequence[tuple[int, int]]) -> list[memoryview]:
        """Several ``(offset, nbytes)`` ranges, fetched together (coalesced; no hole bridged: its
        caller, ``verify``'s padding check, reads the chunks between them right after)."""
        self.prefetch(ranges, bridge=0)
        return [self.read(off, n) for off, n in ranges]

    def held(self, offset: int, nbytes: int) -> bool:
        """Whether a read of this range needs no request of its own: fetched and kept, or being
        fetched (``prefetch``). Without the lock: a hint, which ``prefetch(..., ahead=True)`` checks
        again under it."""
        key = (offset, nbytes)
        return key in self._cache or key in self._pending or key in self._kept

    def prefetch(self, ranges: Sequence[tuple[int, int]], *, bridge: int | None = None, ahead: bool = False,
                 background: bool = False, max_request: int = 0) -> None:
        """Fetch these ranges now, coalesced (holes up to ``bridge`` bytes fetched with them,
        ``BRIDGE_MAX`` unless given) into requests of at most ``max_request`` bytes (MAX_REQUEST
        unless given), and keep them until they are read. Ranges fetched, kept or
        being fetched by another thread are left out (a read of one waits for that fetch). With
        ``ahead``, nothing is fetched when the first range is held (``held``): a read-ahead that
        another thread claimed first. With ``background``, fetched on a thread of its own, and a
        failure left to the reads of those ranges (each then fetches its own, and says what failed).
        """
        with self._lock:
            if ahead and ranges and self.held(*ranges[0]):
                return
            todo = [(o, n) for o, n in dict.fromkeys(ranges) if n > 0 and not self.held(o, n)]
            for o, n in todo:
                self._check(o, n)
            if not todo:
                return
            claim = (todo, self._forgot, threading.Event())
            owner = (claim[2], 0 if background else threading.get_ident())
            for key in todo:
                self._pending[key] = owner
        if not background:
            return self._fill(claim, bridge, max_request or MAX_REQUEST)
        try:
            threading.Thread(target=self._fill, args=(claim, bridge, max_request or MAX_REQUEST, True),
                             name="tallpack-read-ahead", daemon=True).start()
        except RuntimeError:  # (no thread to be had: at exit) the reads fetch their own
            self._release(claim)

    def _fill(self, claim: tuple[list[tuple[int, int]], int, threading.Event], bridge: int | None, max_request: int,
              quiet: bool = False) -> None:
        """Fetch ``prefetch``'s claimed ranges and keep them, then release the claim (``quiet``: a
        failure raises nothing)."""
        todo, forgot, _ = claim
        try:
            spans = split(coalesce(todo, self.gap, max_request, BRIDGE_MAX if bridge is None else bridge), max_request)
            blocks = self._fetch(spans)
            with self._lock:
                if self._forgot != forgot:  # fetched (in part) before a forget(): what verify reads must come after it
                    return
                j = 0
                for o, n in sorted(todo):
                    while spans[j][1] <= o:
                        j += 1
                    if (o, n) in self._cache or (o, n) in self._kept:  # (claimed, so never: counted twice else)
                        continue
                    start, end = spans[j]
                    if o + n <= end:
                        data = blocks[j][o - start : o - start + n]
                    else:  # a range larger than a request: its pieces, joined
                        k = j
                        while spans[k][1] < o + n:
                            k += 1
                        data = b"".join([memoryview(blocks[j])[o - start :], *blocks[j + 1 : k],
                                         memoryview(blocks[k])[: o + n - spans[k][0]]])
                    self._cache[(o, n)] = data
                    self._cached += n
                while self._cached > MAX_CACHE and self._cache:
                    old = next(iter(self._cache))
                    self._cached -= len(self._cache.pop(old))
        except Exception:
            if not quiet:
                raise
        finally:
            self._release(claim)

    def _release(self, claim: tuple[list[tuple[int, int]], int, threading.Event]) -> None:
        """The claimed ranges no longer pending: the reads that wait on them look again."""
        todo, _, done = claim
        with self._lock:
            for key in todo:
                if self._pending.get(key, (None,))[0] is done:
                    del self._pending[key]
        done.set()

    def close(self) -> None:
        self.forget()
        self.closed = True


def _http(fs: Any) -> bool:
    """Whether ``fs`` is fsspec's HTTP(S) file system (its module is loaded when one was made)."""
    http = sys.modules.get("fsspec.implementations.http")
    return http is not None and isinstance(fs, http.HTTPFileSystem)


async def _http_range(fs: Any, path: str, start: int, end: int) -> bytes:
    """Bytes ``[start, end)`` at an HTTP(S) URL by a Range request, as fsspec's ``_cat_file`` gets
    them, but reading at most one byte more than asked: fsspec reads the whole body, so a server
    that answered a range with an endless (or a huge) body was read into memory until it ended or
    memory ran out, before the size was checked. Fewer bytes at the body's end are returned as
    they are (``_fetch`` calls that a short read). The server must send ``HTTP_MIN_RATE`` bytes a
    second over each ``HTTP_IDLE_TIMEOUT`` seconds (its answer's headers within the first), else
    ``RateTimeout``."""
    return (await http_get(fs, path, end - start, {"Range": f"bytes={start}-{end - 1}"}))[0]


async def http_get(fs: Any, path: str, want: int, headers: dict[str, str] | None = None,
                   kinds: tuple[str | None, ...] | None = None) -> tuple[bytes, str | None]:
    """The body at an HTTP(S) URL, read to ``want`` bytes and one more if it has more (at the rate
    ``_http_range`` says), and its Content-Type (without parameters; None if it has none). A body
    of another type than ``kinds`` (when given) is not read: ``b""``."""
    kw = fs.kwargs.copy()
    headers = {**kw.pop("headers", {}), **(headers or {})}
    session = await fs.set_session()
    window = HTTP_IDLE_TIMEOUT
    try:  # the answer's status and headers within one window
        r = await asyncio.wait_for(session.get(fs.encode_url(path), headers=headers, **kw), window)
    except asyncio.TimeoutError:
        raise RateTimeout(f"no answer in {window} s") from None
    async with r:
        fs._raise_not_found_for_status(r, path)
        kind = r.headers.get("Content-Type")
        kind = None if kind is None else kind.partition(";")[0].strip()
        if kinds is not None and kind not in kinds:
            return b"", kind
        body = r.content
        reading = asyncio.ensure_future(_read_range(body, want))
        seen = first = body.total_bytes  # (bytes received so far, however they are read)
        try:
            while not (await asyncio.wait({reading}, timeout=window))[0]:
                if body.total_bytes - seen < min(HTTP_MIN_RATE * window, want + 1 - (seen - first)):
                    r.close()
                    raise RateTimeout(f"{body.total_bytes - seen} bytes in {window} s, under {HTTP_MIN_RATE} a second")
                seen = body.total_bytes
        finally:  # (this read cancelled too: the other ranges' failed)
            reading.cancel()
        data = reading.result()
        if len(data) > want:
            r.close()  # the rest is not read (the connection is dropped, not drained)
        return data, kind


async def _read_range(body: Any, want: int) -> bytes:
    """``want`` bytes of a response's body (an aiohttp StreamReader) and one more if it has more;
    fewer if it ends first."""
    try:
        data: bytes = await body.readexactly(want)
    except asyncio.IncompleteReadError as e:
        return e.partial
    more = await body.read(1)  # the body's end, or a byte past it: the server's fault
    return data + more if more else data


class RateTimeout(Exception):
    """An HTTP server that sends under ``HTTP_MIN_RATE`` bytes a second (``_http_range``): ``refusal``
    says the read timed out, and why (not a TimeoutError, which fsspec replaces by its own)."""


#: Every remote file, for ``_after_fork_in_child``.
_OPEN: "weakref.WeakSet[RemoteFile]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    """A forked child (a DataLoader's fork workers) reads a remote archive its parent opened with a
    file system of its own, made when first used: an async one's (HTTP, s3, gcs) event loop is the
    parent's, which fsspec refuses in a child ("This class is not fork-safe"); and with a fresh
    lock, as one another parent thread held at the fork stays held. An older fsspec (2023.1) does not
    drop its event loop in a child itself (its thread is the parent's, and a read waits on it for
    ever): it is dropped here, as later fsspec does."""
    for f in list(_OPEN):
        f._lock = threading.Lock()
        f._pending = {}  # (a parent thread's fetch: never done here, and its reads would wait for ever)
        f._file_system = None
    asyn = sys.modules.get("fsspec.asyn")
    if _OPEN and asyn is not None and hasattr(asyn, "reset_lock"):
        asyn.reset_lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _connection_error(e: BaseException) -> BaseException | None:
    """The failed connection behind ``e`` (its causes and contexts), if one is there."""
    return next((c for c in _chain(e)[1:] if isinstance(c, ConnectionError) or "Connect" in type(c).__name__), None)
