"""A demanding user of remote archives (r26): a real S3 server (moto's) behind a real proxy on
loopback that misbehaves on request (stalls, 500s, wrong ranges), and signed links."""

from __future__ import annotations

import logging
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

import tallpack
import tallpack.remote
from rangeserver import relay

moto_server = pytest.importorskip("moto.server")
s3fs = pytest.importorskip("s3fs")


class FaultProxy(ThreadingHTTPServer):
    """Forwards every request to ``upstream``; ``rules`` is a list of ``(method, path pattern,
    action)``: an HTTP status answered instead, ``"stall"`` (half the body, then nothing) or
    ``"shift"`` (the range asked for, one byte later: a wrong Content-Range). ``log`` holds
    ``(method, path)`` of each request."""

    daemon_threads = True
    request_queue_size = 256

    def __init__(self, upstream: str):
        super().__init__(("127.0.0.1", 0), _Forward)
        self.upstream = upstream.split("://", 1)[1]
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self.rules: list[tuple[str, str, int | str]] = []
        self.log: list[tuple[str, str]] = []
        self.stopped = threading.Event()
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def gets(self) -> int:
        return sum(1 for m, _ in self.log if m == "GET")

    def stop(self) -> None:
        self.stopped.set()
        self.shutdown()
        self.server_close()


class _Forward(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: FaultProxy

    def log_message(self, *args) -> None:
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))
        raw = b""
        while True:  # forwarded as it came, framing and all
            line = self.rfile.readline()
            raw += line
            n = int(line.split(b";")[0], 16)
            if n == 0:
                while line not in (b"\r\n", b""):
                    line = self.rfile.readline()
                    raw += line
                return raw
            raw += self.rfile.read(n + 2)

    def _go(self) -> None:
        body, srv = self._body(), self.server
        srv.log.append((self.command, self.path))
        action = next((a for m, pat, a in srv.rules if m == self.command and re.search(pat, self.path)), None)
        if isinstance(action, int):
            self.send_response(action)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
        if action == "shift" and "Range" in headers:
            a, b = re.fullmatch(r"bytes=(\d+)-(\d+)", headers["Range"]).groups()
            headers["Range"] = f"bytes={int(a) + 1}-{int(b) + 1}"
        data = relay(self, srv.upstream, headers, body)
        if data is None:
            return
        if action == "stall":
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            srv.stopped.wait(60)
            self.close_connection = True
            return
        self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _go


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """moto's S3 on loopback with a bucket ``family`` holding ``f.tallpack`` (every tensor stored
    in many chunks), a FaultProxy in front of it, and storage options that go through the proxy
    and give up fast (one botocore attempt)."""
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    direct = {"key": "test", "secret": "test",
              "client_kwargs": {"endpoint_url": f"http://{host}:{port}", "region_name": "us-east-1"}}
    import boto3

    boto3.client("s3", aws_access_key_id="test", aws_secret_access_key="test",
                 **direct["client_kwargs"]).create_bucket(Bucket="family")
    fs = s3fs.S3FileSystem(**direct)
    g = torch.Generator().manual_seed(3)
    base = {f"l{i}.w": torch.randn(128, 128, generator=g) for i in range(3)}
    tasks = {t: {k: v + 0.05 * torch.randn(v.shape, generator=g) * (torch.rand(v.shape, generator=g) < 0.4)
                 for k, v in base.items()} for t in ("a", "b", "c")}
    local = tmp_path_factory.mktemp("r26") / "f.tallpack"
    tallpack.pack(base, tasks, local, chunk_elements=256, group=False)
    fs.put_file(str(local), "family/f.tallpack")
    proxy = FaultProxy(direct["client_kwargs"]["endpoint_url"])
    opts = {"key": "test", "secret": "test", "config_kwargs": {"retries": {"max_attempts": 1}},
            "client_kwargs": {"endpoint_url": proxy.url, "region_name": "us-east-1"}}
    yield {"fs": fs, "proxy": proxy, "opts": opts, "local": local, "base": base, "tasks": tasks}
    proxy.stop()
    server.stop()


@pytest.fixture
def proxy(s3):
    p = s3["proxy"]
    p.rules, p.log[:] = [], []
    yield p
    p.rules = []


def test_a_stalled_s3_read_ends_at_its_first_failed_range(s3, proxy, monkeypatch):
    """A read of many ranges from a server that stops sending ends when the first range has used
    its tries (s3fs: 5, each waiting read_timeout), the others cancelled: fsspec's cat_ranges
    waited for every range's tries, 10 at a time (one tensor of 97 ranges: 12 minutes)."""
    monkeypatch.setattr(tallpack.remote, "BRIDGE_MAX", 0)  # (bridged, the holes between them make one request)
    opts = {**s3["opts"], "config_kwargs": {"read_timeout": 0.3, "connect_timeout": 1,
                                            "retries": {"max_attempts": 1}}}
    with tallpack.open("s3://family/f.tallpack", storage_options=opts) as fam:
        proxy.log.clear()
        fam.get_tensor("a", "l0.w")
        ranges = proxy.gets()
        assert ranges > 40  # many ranges: the old wait was 5 tries of each
        proxy.rules = [("GET", r"f\.tallpack", "stall")]
        proxy.log.clear()
        with pytest.raises(tallpack.TallpackError, match=r"^s3://family/f.tallpack: range read at \d+ failed "
                                                         r"\(timed out") as e:
            fam.get_tensor("b", "l1.w")
        assert "\n" not in str(e.value)
        assert proxy.gets() < 2 * ranges  # was 5 * ranges


def test_a_server_that_sends_other_bytes_than_asked_is_not_called_damage(s3, proxy):
    """A wrong Content-Range (the bytes one further on): fsspec does not check it, the checksum
    fails, and the message says the server misbehaves rather than that the archive is damaged."""
    with tallpack.open("s3://family/f.tallpack", storage_options=s3["opts"]) as fam:
        proxy.rules = [("GET", r"f\.tallpack", "shift")]
        with pytest.raises(tallpack.IntegrityError, match=r"task 'a', tensor 'l2.w'.*checksum mismatch.*the server "
                                                          r"answers range requests with other bytes than asked for") as e:
            fam.get_tensor("a", "l2.w")
        assert "damaged archive" in str(e.value) and "\n" not in str(e.value)  # "..., not a damaged archive"
        proxy.rules = []  # and the chunks prefetched with the failed read are not served again
        assert torch.equal(fam.get_tensor("a", "l2.w"), tallpack.open(s3["local"]).get_tensor("a", "l2.w"))


def test_an_upload_that_fails_halfway_says_what_it_left(s3, proxy):
    """A folder is put file by file: a failed upload names the files it left there (an archive,
    one object: nothing), and says what to do."""
    fs, opts = s3["fs"], s3["opts"]
    with tallpack.open(s3["local"]) as fam:
        proxy.rules = [("PUT", r"/family/half/b/", 500)]
        with pytest.raises(tallpack.OutputError) as e:
            tallpack.write_tasks(fam, ["a", "b", "c"], "s3://family/half", storage_options=opts)
        fs.invalidate_cache()
        left = sorted(p.removeprefix("family/half/") for p in fs.find("family/half"))
        assert left == ["a/model.safetensors", "c/model.safetensors"]
        assert str(e.value) == ("s3://family/half: upload failed (server error (HTTP 500: internal server error); try "
                                "again later); 2 of 3 files were uploaded before it failed (a/model.safetensors, "
                                "c/model.safetensors): the output there is incomplete; write it again with --force "
                                "(overwrite=True), or remove them")
    proxy.rules = [("PUT", r"/family/one\.tallpack", 503)]
    with pytest.raises(tallpack.OutputError, match=r"^s3://family/one.tallpack: upload failed \(server error "
                                                   r"\(HTTP 503.*; nothing was written at the URL$"):
        tallpack.pack(s3["base"], s3["tasks"], "s3://family/one.tallpack", storage_options=opts)
    assert not fs.exists("family/one.tallpack")


def test_an_endpoint_that_does_not_answer_is_one_output_error(s3, tmp_path):
    """Packing to an S3 URL whose endpoint refuses connections: botocore's error escaped."""
    opts = {**s3["opts"], "config_kwargs": {"connect_timeout": 1, "retries": {"max_attempts": 1}},
            "client_kwargs": {"endpoint_url": "http://127.0.0.1:9", "region_name": "us-east-1"}}
    with pytest.raises(tallpack.OutputError, match=r"^s3://family/x.tallpack: cannot check the output \(cannot "
                                                   r"connect \(") as e:
        tallpack.pack(s3["base"], s3["tasks"], "s3://family/x.tallpack", storage_options=opts)
    assert "\n" not in str(e.value)


def test_a_signed_link_is_never_shown_nor_logged(http_server, s3, caplog):
    """Reading an archive at a signed link, and writing to one that fails: no message and no log
    record (fsspec's own DEBUG records included) shows the signature."""
    import shutil

    shutil.copy(s3["local"], http_server.root / "signed.tallpack")
    secret = "X-Amz-Signature=SEKRIT5ig&X-Amz-Credential=AKIASEKRIT"
    caplog.set_level(logging.DEBUG)
    with tallpack.open(f"{http_server.url}/signed.tallpack?{secret}") as fam:
        assert fam.get_tensor("c", "l0.w").shape == (128, 128)
        with pytest.raises(tallpack.OutputError, match=r"^http://127.0.0.1:\d+/out.tallpack: upload failed") as e:
            tallpack.pack(s3["base"], s3["tasks"], f"{http_server.url}/out.tallpack?{secret}")  # no PUT there
    assert "SEKRIT" not in str(e.value)
    logged = [r.getMessage() for r in caplog.records]
    assert any("signed.tallpack" in m for m in logged)  # fsspec's DEBUG records were taken
    assert not [m for m in logged if "SEKRIT" in m]


def test_a_failed_range_read_names_what_it_was_read_for(s3, proxy):
    """A fetch that fails says which tensor and task (or task, for a state dict) it was for, not
    only the byte offset."""
    with tallpack.open("s3://family/f.tallpack", storage_options=s3["opts"], cache_bytes=0) as fam:
        proxy.rules = [("GET", r"f\.tallpack", 500)]
        with pytest.raises(tallpack.TallpackError, match=r"range read at \d+ failed .*\(reading task 'a', "
                                                         r"tensor 'l2\.w'\)$"):
            fam.get_tensor("a", "l2.w")
        with pytest.raises(tallpack.TallpackError, match=r"range read at \d+ failed .*\(reading task 'b'"):
            fam.state_dict("b")


def test_a_folder_output_at_a_signed_link_is_refused_before_any_work(s3, http_server):
    """A folder's files would be put at ``<url>?<query>/<file>`` (or, on S3, into keys holding the
    query): a folder output at a URL with a query string is refused, its secrets not shown."""
    secret = "X-Amz-Signature=SEKRIT5ig&X-Amz-Credential=AKIASEKRIT"
    s3["fs"].invalidate_cache()
    before = set(s3["fs"].find("family"))  # (the module's other tests write there too)
    with tallpack.open(s3["local"]) as fam:
        for url in (f"{http_server.url}/out?{secret}", f"s3://family/out?{secret}"):
            with pytest.raises(tallpack.InvalidArgumentError, match="a folder cannot be written at a URL with a "
                                                                    "query string") as e:
                tallpack.write_tasks(fam, ["a", "b"], url, storage_options=s3["opts"] if url[:2] == "s3" else None)
            assert "SEKRIT" not in str(e.value)
    s3["fs"].invalidate_cache()
    assert set(s3["fs"].find("family")) == before
