"""A plain HTTP server on loopback that serves a folder and honours Range requests (the standard
library's SimpleHTTPRequestHandler ignores them), counting every request and byte it sends.
Like nginx, it sends an ETag (the file's modification time and size); ``status`` and ``cut``
make it misbehave for chosen names, as real servers do (an expired link, a dropped connection)."""

from __future__ import annotations

import http.client
import re
import socket
import struct
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


class RangeServer(ThreadingHTTPServer):
    """``RangeServer(folder)``: ``.url`` is its base URL, ``.log`` its ``(method, start, nbytes)``
    requests; ``.served()`` the body bytes sent since ``.reset()``. ``.status[name] = 403``
    answers every request for ``name`` (its path less the leading ``/``) with that status;
    ``.cut.add(name)`` sends half of each body for ``name`` and closes the connection;
    ``.stall.add(name)`` sends half of each body for ``name``, then nothing until ``.stop()``;
    ``.cut_after[name] = n`` serves ``name`` whole until ``n`` body bytes of it were sent (since
    it was set, or since ``.reset()``), then
    cuts every later body for it as ``cut`` does (a server that dies mid-read, after the open);
    ``.hangup.add(name)`` closes the connection of every request for ``name`` unanswered (a server
    killed while the request waited); ``.rst.add(name)`` does so with a reset ("Connection reset by
    peer"); ``.broken`` counts the bodies cut or stalled and the requests hung up on; ``.etags = False``
    sends no ETag."""

    daemon_threads = True
    request_queue_size = 256  # fsspec opens many connections at once; the default 5 drops them

    def __init__(self, root: Path):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.root = Path(root).resolve()
        self.log: list[tuple[str, int, int]] = []
        self.status: dict[str, int] = {}
        self.cut: set[str] = set()
        self.stall: set[str] = set()
        self.cut_after: dict[str, int] = {}
        self._sent: dict[str, int] = {}
        self.hangup: set[str] = set()
        self.rst: set[str] = set()
        self.broken = 0
        self.stopped = threading.Event()
        self.etags = True
        self._lock = threading.Lock()
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    def start(self) -> "RangeServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self.stopped.set()
        self.shutdown()
        self.server_close()

    def record(self, method: str, start: int, n: int) -> None:
        with self._lock:
            self.log.append((method, start, n))

    def handle_error(self, request, client_address) -> None:
        """Quiet about clients that hang up (a cut or stalled body, a cancelled request)."""
        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)

    def cutting(self, name: str, nbytes: int) -> bool:
        """Whether a body of ``nbytes`` for ``name`` is cut; counts the bytes sent for ``cut_after``."""
        with self._lock:
            limit, sent = self.cut_after.get(name), self._sent.get(name, 0)
            if limit is not None and sent < limit:
                self._sent[name] = sent + nbytes
            cut = name in self.cut or name in self.stall or (limit is not None and sent >= limit)
            self.broken += cut
            return cut

    def reset(self) -> None:
        with self._lock:
            self.log.clear()
            self._sent.clear()

    def served(self) -> int:
        return sum(n for m, _, n in self.log if m == "GET")

    def gets(self) -> int:
        return sum(1 for m, _, _ in self.log if m == "GET")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: RangeServer

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def _serve(self, body: bool) -> None:
        name = unquote(urlparse(self.path).path).lstrip("/")
        path = (self.server.root / name).resolve()
        refused = self.server.status.get(name)
        if refused is not None or not path.is_relative_to(self.server.root) or not path.is_file():
            self.send_response(refused or 404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if name in self.server.hangup or name in self.server.rst:
            with self.server._lock:
                self.server.broken += 1
            if name in self.server.rst:  # closed at once with a zero linger: an RST, not a FIN
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
            self.close_connection = True
            return
        size = path.stat().st_size
        start, end, status = 0, size, 200
        m = _RANGE.fullmatch(self.headers.get("Range", "").strip())
        if m and (m[1] or m[2]):
            if m[1]:
                start, end = int(m[1]), min(size, int(m[2]) + 1) if m[2] else size
            else:
                start, end = max(0, size - int(m[2])), size
            if start >= end:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
        data = b""
        if body:
            with open(path, "rb") as f:
                f.seek(start)
                data = f.read(end - start)
        cut = body and self.server.cutting(name, len(data))
        if not cut:  # logged before a byte is sent: a client that has its answer finds it in the log
            self.server.record("GET" if body else "HEAD", start, end - start if body else 0)
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(end - start))
        if self.server.etags:
            st = path.stat()
            self.send_header("ETag", f'"{st.st_mtime_ns:x}-{st.st_size:x}"')
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
        self.end_headers()
        if cut:
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            if name in self.server.stall:
                self.server.stopped.wait(60)
            self.close_connection = True
            return
        if body:
            self.wfile.write(data)


def relay(handler: BaseHTTPRequestHandler, upstream: str, headers: dict, body: bytes | None) -> bytes | None:
    """Send ``handler``'s request to ``upstream`` (``host:port``) with ``headers``, and its answer's
    status and headers back (a test proxy's first half); the answer's body, for the proxy to send
    (whole, cut or stalled), or None for a HEAD (answered already)."""
    conn = http.client.HTTPConnection(upstream, timeout=30)
    conn.putrequest(handler.command, handler.path, skip_host=True, skip_accept_encoding=True)
    for k, v in headers.items():
        conn.putheader(k, v)
    conn.endheaders(body or None)
    r = conn.getresponse()
    data = r.read()
    handler.send_response(r.status)
    for k, v in r.getheaders():
        if k.lower() not in ("transfer-encoding", "connection") and (k.lower() != "content-length"
                                                                     or handler.command == "HEAD"):
            handler.send_header(k, v)
    if handler.command != "HEAD":
        handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    return None if handler.command == "HEAD" else data
