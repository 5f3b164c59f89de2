"""A hostile server and a hostile archive, thought of by an attacker with intent (round 33):

- a server that answers a range request with an endless body (or a Content-Length far past the
  range) is read one byte past the range at most, then refused in one line: it was read into
  memory whole, until it ended or memory ran out;
- a server that drips its answer (slowloris: a byte at a time, each before the idle timeout) is
  given up on when it sends under 1 KiB a second for a minute, in one line; one that sends
  slowly but steadily is read.
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


class _Hostile(ThreadingHTTPServer):
    """Serves one archive honestly at open (HEAD, header, footer, manifest), and answers a range of
    the data area as ``mode`` says: ``chunked``, an endless body; ``length``, a body of a
    Content-Length of 1 TiB; ``drip``, a byte every 0.3 s; ``headers``, its headers a byte every
    0.3 s; ``steady``, 4 KiB every 0.25 s (slow, but not slowloris). ``sent`` counts the bytes of
    those bodies."""

    daemon_threads = True

    def __init__(self, data: bytes, mode: str):
        super().__init__(("127.0.0.1", 0), _HostileHandler)
        self.data, self.mode, self.sent = data, mode, 0
        self.stopped = threading.Event()  # set: a dripping answer is cut off (a failing test ends)
        self.manifest_at = struct.unpack("<Q", data[-32:-24])[0]
        threading.Thread(target=self.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server_address[1]}/f.tallpack"

    def __enter__(self) -> "_Hostile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopped.set()
        self.shutdown()
        self.server_close()


class _HostileHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Hostile

    def log_message(self, *args) -> None:
        pass

    def do_HEAD(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.server.data)))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()

    def do_GET(self) -> None:
        data, mode = self.server.data, self.server.mode
        a, b = (int(x) for x in self.headers["Range"].removeprefix("bytes=").split("-"))
        body = data[a:b + 1]
        honest = a == 0 or a >= self.server.manifest_at  # what open reads: answered as asked
        self.close_connection = True
        try:
            if mode == "headers" and not honest:
                for c in b"HTTP/1.1 206 Partial Content\r\nContent-Length: %d\r\nX-Slow: %s\r\n\r\n" % (
                        len(body), b"z" * 1000):
                    self.wfile.write(bytes([c]))
                    self.wfile.flush()
                    if self.server.stopped.wait(0.3):
                        return
            self.send_response(206)
            if honest or mode in ("drip", "steady"):
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                step, pause = (1, 0.3) if mode == "drip" and not honest else (4096, 0.25) if mode == "steady" else (
                    len(body), 0)
                for i in range(0, len(body), step):
                    self.wfile.write(body[i:i + step])
                    self.wfile.flush()
                    if self.server.stopped.wait(pause):
                        return
                return
            chunked = mode == "chunked"
            self.send_header(*(("Transfer-Encoding", "chunked") if chunked else ("Content-Length", str(1 << 40))))
            self.end_headers()
            block = b"\0" * (1 << 20)
            while self.server.sent < FLOOD:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(block), block) if chunked else block)
                self.server.sent += len(block)
        except OSError:  # the client hung up
            pass


@pytest.mark.parametrize("mode", ["chunked", "length"])
def test_a_range_answered_with_an_endless_body_is_not_read_into_memory(family, mode):
    """The chunks of a 27 KB archive asked for by range, answered with 256 MiB and more: the read
    stops one byte past the range and says the server ignores ranges, in one line; the server
    sent a few MiB at most (what the sockets' buffers took), not the 256 MiB it had."""
    with _Hostile(family.read_bytes(), mode) as server, tallpack.open(server.url) as fam:
        with pytest.raises(tallpack.RemoteError) as e:
            fam.state_dict("a")
        text = str(e.value)
        assert "ignored a range request (it sent more than the" in text and "\n" not in text, text
        assert server.sent < 16 << 20, f"{server.sent >> 20} MiB read for a range of the 27 KB archive"


@pytest.mark.parametrize("mode", ["drip", "headers"])
def test_a_server_that_drips_a_byte_at_a_time_is_given_up_on(family, mode, monkeypatch):
    """Slowloris: a byte every 0.3 s, its body's or its headers', never waits the idle timeout
    (here 1 s) for a next byte, and held the read for hours (the 26 KB range at 3 B/s); it is
    given up on after a window (a second here, a minute by default) in which it sent under 1 KiB
    a second, in one line that says so."""
    from tallpack import remote

    monkeypatch.setattr(remote, "HTTP_IDLE_TIMEOUT", 1)
    with _Hostile(family.read_bytes(), mode) as server, tallpack.open(server.url) as fam:
        timer = threading.Timer(20, server.stopped.set)  # a read that waits on: cut off, and the test fails
        timer.start()
        with pytest.raises(tallpack.RemoteError) as e:
            fam.state_dict("a")
        timer.cancel()
    text = str(e.value)
    assert "range read at 64 failed (timed out (RateTimeout: " in text and "\n" not in text, text
    assert "under 1024 a second" in text or "no answer in 1 s" in text, text


def test_a_slow_server_that_keeps_sending_is_not_cut_off(family, monkeypatch):
    """4 KiB every 0.25 s (16 KiB/s), windows of 1 s: the 26 KB range takes two seconds and is read."""
    from tallpack import remote

    monkeypatch.setattr(remote, "HTTP_IDLE_TIMEOUT", 1)
    with _Hostile(family.read_bytes(), "steady") as server, tallpack.open(server.url) as fam:
        got = fam.state_dict("a")["w"]
    with tallpack.open(family) as local:
        assert torch.equal(got, local.state_dict("a")["w"])
