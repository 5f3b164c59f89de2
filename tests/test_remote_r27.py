"""Remote reads whose connection breaks (r27): a server that cuts the connection mid-read, resets
it, is killed or stalls, over HTTP (tests/rangeserver.py) and S3 (moto's server behind a proxy that
cuts): one RemoteError line naming the archive, the tensor or task, and what to do, without the
signed link's secrets; and fsspec's log records without them at DEBUG."""

from __future__ import annotations

import logging
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from click.testing import CliRunner

import tallpack
from tallpack.errors import RemoteError
from tallpack_cli.main import main
from rangeserver import relay

pytest.importorskip("aiohttp")  # fsspec's HTTP file system

SECRET = "X-Amz-Signature=SEKRIT5ig&X-Amz-Credential=AKIASEKRIT"
CUT = r"the connection was cut mid-transfer \((ClientPayloadError|ConnectionResetError)\)"
RETRY = r"; try again, and check the server if it keeps failing"


def _family() -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(27)
    base = {f"l{i}.w": torch.randn(128, 128, generator=g) for i in range(3)}
    tasks = {t: {k: v + 0.05 * torch.randn(v.shape, generator=g) * (torch.rand(v.shape, generator=g) < 0.4)
                 for k, v in base.items()} for t in ("a", "b", "c")}
    return base, tasks


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """A family packed with small chunks (one tensor: dozens of range requests) and TIES merging."""
    base, tasks = _family()
    path = tmp_path_factory.mktemp("r27") / "f.tallpack"
    tallpack.pack(base, tasks, path, chunk_elements=256, group=False, merge="ties")
    return path


@pytest.fixture
def server(tmp_path, packed):
    """A Range server of this test's own serving ``f.tallpack``; ``url`` is a signed-looking link to it."""
    import shutil

    from rangeserver import RangeServer

    (tmp_path / "www").mkdir()
    shutil.copy(packed, tmp_path / "www" / "f.tallpack")
    srv = RangeServer(tmp_path / "www").start()
    srv.signed = f"{srv.url}/f.tallpack?{SECRET}"
    yield srv
    srv.stop()


def _one_line(e: BaseException) -> str:
    text = str(e)
    assert "\n" not in text and "SEKRIT" not in text and "Response payload" not in text, text
    return text


@pytest.mark.parametrize("how", ["cut", "rst"])
def test_a_connection_cut_mid_read_is_one_remote_error(server, packed, how):
    """A server that closes the connection halfway through a body (aiohttp: "Response payload is
    not completed") or resets it ("Connection reset by peer"): a RemoteError naming the archive and
    the tensor or task, saying to try again; the archive reads whole once the server answers."""
    with tallpack.open(server.signed, cache_bytes=0) as fam, tallpack.open(packed) as local:
        getattr(server, how).add("f.tallpack")
        with pytest.raises(RemoteError) as e:
            fam.get_tensor("a", "l0.w")
        assert re.fullmatch(rf"http://127.0.0.1:\d+/f.tallpack: range read at \d+ failed \({CUT}\){RETRY} "
                            r"\(reading task 'a', tensor 'l0\.w'\)", _one_line(e.value))
        with pytest.raises(tallpack.TallpackError, match=rf"failed \({CUT}\){RETRY} \(reading task 'b'") as e:
            fam.state_dict("b")
        assert isinstance(e.value, RemoteError) and not isinstance(e.value, tallpack.FormatError)
        _one_line(e.value)
        assert server.broken > 0
        getattr(server, how).clear()
        assert torch.equal(fam.get_tensor("a", "l0.w"), local.get_tensor("a", "l0.w"))


@pytest.mark.parametrize("how", ["hangup", "rst"])
def test_a_server_that_hangs_up_at_open_is_not_a_missing_archive(server, how):
    """A server that closes (or resets) the connection before it answers: fsspec reports the failed
    HEAD and GET as FileNotFoundError, which read "no such archive" (or, reset, "cannot connect")."""
    getattr(server, how).add("f.tallpack")
    with pytest.raises(RemoteError, match=r"^http://127.0.0.1:\d+/f.tallpack: the connection was cut mid-transfer "
                                          rf"\((ServerDisconnectedError|ConnectionResetError)\){RETRY}$") as e:
        tallpack.open(server.signed)
    assert not isinstance(e.value, FileNotFoundError) and server.broken >= 2  # (its HEAD and its GET)
    _one_line(e.value)


def _cli(*args: object):
    r = CliRunner().invoke(main, ["-q", *map(str, args)], catch_exceptions=False)
    return r.exit_code, r.output


def _cli_cut(url: str, arm, tmp_path) -> None:
    """``unpack``, ``verify`` and ``merge`` of ``url`` with ``arm()`` called first (the server cuts
    every read after the open): each exits 1 with one ``error:`` line saying the connection was cut."""
    for cmd in (["unpack", url, "--task", "a", "-o", tmp_path / "a"], ["verify", url],
                ["merge", url, "-o", tmp_path / "m"]):
        arm()
        code, out = _cli(*cmd)
        assert code == 1, out
        lines = out.splitlines()
        assert len(lines) == 1 and "SEKRIT" not in out and "Traceback" not in out, out
        assert re.match(rf"error: \w+://[^ ]*f\.tallpack: range read at \d+ failed \({CUT}\){RETRY}", lines[0]), out
    assert not (tmp_path / "a").exists() and not (tmp_path / "m").exists()


def test_the_command_line_says_a_cut_connection_over_http(server, tmp_path):
    """A server that dies mid-read (after the archive opened) under ``unpack``, ``verify`` and
    ``merge``: one error line each, the signed link's secrets not in it."""
    server.reset()
    tallpack.open(server.signed).close()
    opened = server.served()  # what an open reads: the cut comes after it

    def arm() -> None:
        server.reset()
        server.cut_after["f.tallpack"] = opened

    _cli_cut(server.signed, arm, tmp_path)


def test_a_stalled_http_read_ends_at_its_first_timed_out_range(server, monkeypatch):
    """A server that stops sending mid-read: the read ends when the first of its concurrent range
    requests times out (HTTP_IDLE_TIMEOUT), the others cancelled, as on S3 (test_remote_r26), and
    not after every range has waited its own timeout; nothing more is asked of the stalled server."""
    from tallpack import remote

    monkeypatch.setattr(remote, "HTTP_IDLE_TIMEOUT", 1)
    with tallpack.open(server.signed, cache_bytes=0) as fam:
        server.reset()
        fam.get_tensor("a", "l0.w")
        ranges = server.gets()
        assert ranges > 3 * remote.CONCURRENT_REQUESTS  # many ranges: waiting for each would take minutes
        server.stall.add("f.tallpack")
        server.broken = 0
        with pytest.raises(RemoteError, match=rf"range read at \d+ failed \(timed out .*\){RETRY} \(reading task 'b', "
                                              r"tensor 'l1\.w'\)$") as e:
            fam.get_tensor("b", "l1.w")
        _one_line(e.value)
        assert server.broken <= remote.CONCURRENT_REQUESTS  # the first batch only: no probe, no further ranges


def test_verify_does_not_call_a_cut_connection_damage(server):
    with tallpack.open(server.signed) as fam:
        server.cut.add("f.tallpack")
        with pytest.raises(RemoteError):
            fam.verify()


# --- S3: moto's server behind a proxy that cuts -----------------------------------------------------------------

class CutProxy(ThreadingHTTPServer):
    """Forwards every request to ``upstream``; once ``cut_after`` bytes of GET bodies went through
    (None: never), each further GET body is sent half and the connection closed. ``stop()`` closes
    every connection too, as a killed server's do."""

    daemon_threads = True
    request_queue_size = 256

    def __init__(self, upstream: str):
        super().__init__(("127.0.0.1", 0), _Forward)
        self.upstream = upstream
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self.cut_after: int | None = None
        self.sent = 0
        self.lock = threading.Lock()
        self.connections: list[socket.socket] = []
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def process_request(self, request, client_address) -> None:
        with self.lock:
            self.connections.append(request)
        super().process_request(request, client_address)

    def arm(self, after: int = 0) -> None:
        with self.lock:
            self.cut_after, self.sent = after, 0

    def handle_error(self, request, client_address) -> None:  # clients hang up on cut bodies
        pass

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        with self.lock:
            for c in self.connections:
                try:
                    c.shutdown(socket.SHUT_RDWR)
                except OSError:  # closed already
                    pass


class _Forward(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: CutProxy

    def log_message(self, *args) -> None:
        pass

    def _go(self) -> None:
        n = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(n) if n else None
        data = relay(self, self.server.upstream, {k: v for k, v in self.headers.items() if k.lower() != "connection"},
                     body)
        if data is None:
            return
        srv = self.server
        with srv.lock:
            cut = self.command == "GET" and srv.cut_after is not None and srv.sent >= srv.cut_after
            srv.sent += len(data)
        if cut:
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _go


@pytest.fixture(scope="module")
def s3(packed):
    """moto's S3 on loopback holding ``family/f.tallpack``; its ``host:port``."""
    moto_server = pytest.importorskip("moto.server")
    s3fs = pytest.importorskip("s3fs")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    import boto3

    boto3.client("s3", aws_access_key_id="test", aws_secret_access_key="test", endpoint_url=f"http://{host}:{port}",
                 region_name="us-east-1").create_bucket(Bucket="family")
    s3fs.S3FileSystem(key="test", secret="test", client_kwargs={"endpoint_url": f"http://{host}:{port}",
                                                                "region_name": "us-east-1"}).put_file(
        str(packed), "family/f.tallpack")
    yield f"{host}:{port}"
    server.stop()


@pytest.fixture
def proxy(s3, monkeypatch):
    """A CutProxy in front of the S3 server, and storage options through it; s3fs tries a cut
    read once here (its 5 tries, with their back-off, end in the same error)."""
    import s3fs

    p = CutProxy(s3)
    monkeypatch.setattr(s3fs.S3FileSystem, "retries", 1)
    p.opts = {"key": "test", "secret": "test", "config_kwargs": {"retries": {"max_attempts": 1}},
              "client_kwargs": {"endpoint_url": p.url, "region_name": "us-east-1"}}
    yield p
    p.stop()


def test_an_s3_connection_cut_mid_read_is_one_remote_error(proxy, packed):
    with tallpack.open("s3://family/f.tallpack", storage_options=proxy.opts, cache_bytes=0) as fam:
        proxy.arm()
        with pytest.raises(RemoteError) as e:
            fam.get_tensor("a", "l0.w")
        assert re.fullmatch(rf"s3://family/f.tallpack: range read at \d+ failed \({CUT}\){RETRY} "
                            r"\(reading task 'a', tensor 'l0\.w'\)", _one_line(e.value))
        with pytest.raises(RemoteError, match=rf"failed \({CUT}\){RETRY} \(reading task 'b'\)$") as e:
            fam.state_dict("b")
        _one_line(e.value)
        proxy.cut_after = None
        with tallpack.open(packed) as local:
            assert torch.equal(fam.get_tensor("a", "l0.w"), local.get_tensor("a", "l0.w"))


def test_an_s3_server_killed_while_open_is_one_remote_error(proxy):
    """The server gone (nothing listens any more): reads and opens say they cannot connect, and to try again."""
    with tallpack.open("s3://family/f.tallpack", storage_options=proxy.opts) as fam:
        proxy.stop()
        with pytest.raises(RemoteError, match=rf"^s3://family/f.tallpack: range read at \d+ failed \(cannot connect "
                                              rf".*\){RETRY} \(reading task 'c', tensor 'l2\.w'\)$") as e:
            fam.get_tensor("c", "l2.w")
        _one_line(e.value)
    with pytest.raises(RemoteError, match=rf"^s3://family/f.tallpack: cannot connect .*{RETRY}$"):
        tallpack.open("s3://family/f.tallpack", storage_options=proxy.opts)


def test_the_command_line_says_a_cut_connection_over_s3(proxy, tmp_path, monkeypatch):
    import fsspec.config

    monkeypatch.setitem(fsspec.config.conf, "s3", dict(proxy.opts))
    with tallpack.open("s3://family/f.tallpack"):
        opened = proxy.sent  # what an open reads: the cut comes after it
    _cli_cut("s3://family/f.tallpack", lambda: proxy.arm(opened), tmp_path)


# --- fsspec's loggers at DEBUG ----------------------------------------------------------------------------------

def test_fsspec_records_at_debug_show_no_signed_link(server, caplog):
    """fsspec.asyn logs a failed background task with its exception (an aiohttp error quotes its
    URL), fsspec.caching its fetches: a logger's filter does not see its children's records, so
    each fsspec logger has its own; with an archive open, no record shows the signature, and a
    record with nothing to hide keeps its exception for other handlers."""
    import fsspec

    server.status["forbidden.tallpack"] = 403
    link = f"{server.url}/forbidden.tallpack?{SECRET}"
    caplog.set_level(logging.DEBUG)
    late = logging.getLogger("fsspec.r27test")  # made after tallpack was imported: found at open
    with tallpack.open(server.signed) as fam:
        fam.get_tensor("a", "l0.w")
        fs = fsspec.filesystem("http")
        with pytest.raises(Exception) as e:
            fs.cat_file(link)
        assert "SEKRIT" in str(e.value)  # aiohttp's ClientResponseError names the link whole
        logging.getLogger("fsspec.asyn").error("%s failed during asynchronous execution: %s", "deferred task",
                                               e.value, exc_info=e.value)
        logging.getLogger("fsspec.caching").debug("fetching %s", link)
        late.debug("GET %s", link)
        plain = RuntimeError("no link here")
        logging.getLogger("fsspec.asyn").error("teardown failed", exc_info=plain)
    shown = "\n".join(caplog.text.splitlines() + [r.getMessage() + (r.exc_text or "") for r in caplog.records])
    assert "forbidden.tallpack" in shown and "X-Amz" not in shown and "SEKRIT" not in shown
    assert [r for r in caplog.records if r.exc_info and r.exc_info[1] is plain]
