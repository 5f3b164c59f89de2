"""A hostile server and a hostile archive, thought of by an attacker with intent (round 33):

- a server that answers a range request with an endless body (or a Content-Length far past the
  range) is read one byte past the range at most, then refused in one line: it was read into
  memory whole, until it ended or memory ran out.
"""

from __future__ import annotations

import struct
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import tallpack

#: how much an endless body sends before the server gives up (a client that reads it all holds it)
FLOOD = 256 << 20


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> Path:
    """A tiny family (base, a, b) of one 64x64 tensor: a 27 KB archive."""
    d = tmp_path_factory.mktemp("hostile_r33")
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(64, 64, generator=g)}
    save_file(base, d / "base.safetensors")
    for t in "ab":
        save_file({"w": base["w"] + 0.01 * torch.randn(64, 64, generator=g)}, d / f"{t}.safetensors")
    tallpack.pack(d / "base.safetensors", {t: d / f"{t}.safetensors" for t in "ab"}, d / "f.tallpack", threads=1)
    return d / "f.tallpack"


class _Flood(ThreadingHTTPServer):
    """Serves one archive honestly at open (HEAD, header, footer, manifest), and answers a range of
    the data area with an endless body (``chunked``) or one of a Content-Length of 1 TiB; ``sent``
    counts the bytes of those bodies."""

    daemon_threads = True

    def __init__(self, data: bytes, chunked: bool):
        super().__init__(("127.0.0.1", 0), _FloodHandler)
        self.data, self.chunked, self.sent = data, chunked, 0
        self.manifest_at = struct.unpack("<Q", data[-32:-24])[0]
        threading.Thread(target=self.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server_address[1]}/f.tallpack"


class _FloodHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Flood

    def log_message(self, *args) -> None:
        pass

    def do_HEAD(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.server.data)))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()

    def do_GET(self) -> None:
        data = self.server.data
        a, b = (int(x) for x in self.headers["Range"].removeprefix("bytes=").split("-"))
        self.send_response(206)
        if a == 0 or a >= self.server.manifest_at:  # what open reads: answered as asked
            self.send_header("Content-Length", str(b + 1 - a))
            self.end_headers()
            self.wfile.write(data[a:b + 1])
            return
        self.send_header(*(("Transfer-Encoding", "chunked") if self.server.chunked else ("Content-Length", str(1 << 40))))
        self.end_headers()
        block = b"\0" * (1 << 20)
        self.close_connection = True
        try:
            while self.server.sent < FLOOD:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(block), block) if self.server.chunked else block)
                self.server.sent += len(block)
        except OSError:  # the client hung up: what it should do
            pass


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "content-length"])
def test_a_range_answered_with_an_endless_body_is_not_read_into_memory(family, chunked):
    """The chunks of a 27 KB archive asked for by range, answered with 256 MiB and more: the read
    stops one byte past the range and says the server ignores ranges, in one line; the server
    sent a few MiB at most (what the sockets' buffers took), not the 256 MiB it had."""
    server = _Flood(family.read_bytes(), chunked)
    try:
        with tallpack.open(server.url) as fam:
            with pytest.raises(tallpack.RemoteError) as e:
                fam.state_dict("a")
        text = str(e.value)
        assert "ignored a range request (it sent more than the" in text and "\n" not in text, text
        assert server.sent < 16 << 20, f"{server.sent >> 20} MiB read for a range of the 27 KB archive"
    finally:
        server.shutdown()
        server.server_close()
