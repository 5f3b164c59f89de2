"""A hostile server and a hostile archive, thought of by an attacker with intent (round 33):

- a server that answers a range request with an endless body (or a Content-Length far past the
  range) is read one byte past the range at most, then refused in one line: it was read into
  memory whole, until it ended or memory ran out;
- a server that drips its answer (slowloris: a byte at a time, each before the idle timeout) is
  given up on when it sends under 1 KiB a second for a minute, in one line; one that sends
  slowly but steadily is read;
- a folder file in a ``.git`` (or ``.hg``) folder is refused when the archive is opened: unpacked,
  it made the output folder a Git repository whose ``config`` ran the archive's command at the
  next ``git status`` (``core.fsmonitor``), which a shell prompt runs on ``cd``; so is a task
  named ``.git`` in ``unpack --all``, whose folder is ``OUT/.git``;
- a redirect to a ``file://`` (or other non-HTTP) URL, or a redirect loop, is said as such in one
  line (it was "no such archive"), the target's secrets left out; a redirect to another host
  does not take the Authorization header along;
- a checkpoint downloaded from a URL (pack's input) that the server sends endlessly is given up
  on at the size it announced, and one it drips is given up on as an archive's range is;
- a folder at a URL whose HTML listing page is endless (or untyped) is read to
  ``HTTP_LISTING_MAX`` and refused in one line (fsspec read it into memory whole), one dripped is
  given up on; an untyped binary file is still a file;
- code an archive carries (``modeling_*.py`` that ``trust_remote_code`` would import, a pickle
  ``extra/evil.bin`` whose loading runs a command) is written by unpack and never run by tallpack.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
import zstandard
from safetensors.torch import save_file

import tallpack
from tallpack.container import FOOTER

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


class _Answers(BaseHTTPRequestHandler):
    """A loopback server's handler: HEAD and GET both ``_answer`` (without and with the body), HTTP/1.1,
    no log lines."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def do_GET(self) -> None:
        self._answer(body=True)

    def _answer(self, body: bool) -> None:
        raise NotImplementedError


class _Loopback(ThreadingHTTPServer):
    """A server on loopback, serving on a thread of its own from the start, with ``handler``;
    ``stopped`` is set when the ``with`` block ends (a dripping answer is cut off then)."""

    daemon_threads = True

    def __init__(self, handler: type[BaseHTTPRequestHandler]):
        self.stopped = threading.Event()
        super().__init__(("127.0.0.1", 0), handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()
        self.port = self.server_address[1]

    def __enter__(self) -> "_Loopback":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopped.set()
        self.shutdown()
        self.server_close()


class _Hostile(_Loopback):
    """Serves one archive honestly at open (HEAD, header, footer, manifest), and answers a range of
    the data area as ``mode`` says: ``chunked``, an endless body; ``length``, a body of a
    Content-Length of 1 TiB; ``drip``, a byte every 0.3 s; ``headers``, its headers a byte every
    0.3 s; ``steady``, 4 KiB every 0.25 s (slow, but not slowloris). ``sent`` counts the bytes of
    those bodies."""

    def __init__(self, data: bytes, mode: str):
        self.data, self.mode, self.sent = data, mode, 0
        self.manifest_at = struct.unpack("<Q", data[-32:-24])[0]
        super().__init__(_HostileHandler)
        self.url = f"http://127.0.0.1:{self.port}/f.tallpack"


class _HostileHandler(_Answers):  # (its own HEAD and GET)
    server: _Hostile

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


# -- folder files in a repository's folder ---------------------------------------------------------

#: a Git config that runs a command at the next ``git status`` in its repository
_GIT_CONFIG = '[core]\n\trepositoryformatversion = 0\n\tfsmonitor = "echo PWNED >{flag}; false"\n'


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> Path:
    """A family of model folders (base, a): task a's folder has files of a Git repository's
    contents under plain names (``gitconfig``, ``HEADX``, ``readme.txt``), which a hostile writer
    renames."""
    root = tmp_path_factory.mktemp("vcs")
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(16, 16, generator=g)}
    for name, sd in (("base", base), ("a", {"w": base["w"] + 0.1})):
        (root / name).mkdir()
        save_file(sd, root / name / "model.safetensors")
        (root / name / "config.json").write_text('{"model_type": "bert"}')
    (root / "a" / "gitconfig").write_text(_GIT_CONFIG.format(flag=root / "pwned"))
    (root / "a" / "HEADX").write_text("ref: refs/heads/main\n")
    (root / "a" / "readme.txt").write_text("x\n")
    tallpack.pack(root / "base", {"a": root / "a"}, root / "f.tallpack", threads=1)
    return root


def _as_repository(src: Path, dest: Path, folder: str, task: str = "a") -> Path:
    """``src`` with task a's files renamed into ``folder`` as a repository's (``.git/config``,
    ``.git/HEAD``, ``.git/objects/...``, ``.git/refs/...``; ``""``: at the top) and the task
    renamed ``task``: a hostile writer's, checksums valid."""
    raw = src.read_bytes()
    m_off, m_len, _, flags, end = FOOTER.unpack(raw[-FOOTER.size:])
    m = json.loads(zstandard.ZstdDecompressor().decompress(raw[m_off:m_off + m_len]))
    files = m["tasks"][0]["files"]
    at = f"{folder}/" if folder else ""
    files.update({f"{at}config": files.pop("gitconfig"), f"{at}HEAD": files.pop("HEADX"),
                  f"{at}objects/pack/readme": files["readme.txt"], f"{at}refs/heads/readme": files.pop("readme.txt")})
    m["tasks"][0]["name"] = task
    for entry in m["tensors"]:
        entry["tasks"] = {(task if k == "a" else k): v for k, v in entry["tasks"].items()}
    stored = zstandard.ZstdCompressor().compress(json.dumps(m).encode())
    dest.write_bytes(raw[:m_off] + stored + FOOTER.pack(m_off, len(stored), zlib.crc32(stored), flags, end))
    return dest


@pytest.mark.parametrize("folder", [".git", "sub/.git", ".GIT", ".git.", "GIT~1", ".hg"])
def test_a_folder_file_in_a_repositorys_folder_is_refused_at_open(folders, tmp_path, folder):
    """``.git/config`` with ``core.fsmonitor`` set, ``.git/HEAD``, ``objects/`` and ``refs/``: an
    unpack wrote them, and ``git status`` in the output ran the archive's command. Refused at
    open in one line naming the archive, the task and the file, whatever the case (macOS and
    Windows fold it), trailing dot or 8.3 short name; nothing is written."""
    arch = _as_repository(folders / "f.tallpack", tmp_path / "evil.tallpack", folder)
    with pytest.raises(tallpack.FormatError) as e:
        tallpack.open(arch)
    text = str(e.value)
    assert text.startswith(f"{arch}: task 'a': file name '{folder}/") and "\n" not in text, text
    assert f"is in a {folder.rpartition('/')[2]!r} folder, a repository's" in text, text
    r = subprocess.run([sys.executable, "-m", "tallpack", "unpack", str(arch), "--task", "a", "-o", str(tmp_path / "out")],
                       capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.startswith("error: ") and "a repository's" in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()


def test_a_repositorys_files_under_other_names_are_written(folders, tmp_path):
    """Names that only look like a repository's (``.gitattributes``, ``.github/``, ``git/``,
    ``x.git``) are folder files as any other, written by an unpack."""
    arch = _as_repository(folders / "f.tallpack", tmp_path / "ok.tallpack", ".github")
    names = {".github/config", ".github/HEAD", ".github/objects/pack/readme", ".github/refs/heads/readme"}
    with tallpack.open(arch) as fam:
        assert names <= set(fam.files("a"))
        tallpack.write_task(fam, "a", tmp_path / "out")
    assert all((tmp_path / "out" / n).is_file() for n in names)
    from tallpack.folders import check_file_name

    for name in (".gitattributes", "git/config", "x.git/config", "a/.gitignore", "hg/x", ".hgrc"):
        assert check_file_name(name) == name


@pytest.mark.parametrize("task", [".git", ".Git", ".hg"])
def test_a_task_named_as_a_repositorys_folder_is_not_unpacked_into_one(folders, tmp_path, task):
    """Task ``.git`` whose files are ``config`` (``core.fsmonitor`` set), ``HEAD``, ``objects/``,
    ``refs/``: ``unpack --all -o OUT`` wrote them as ``OUT/.git/...``, and ``git status`` in
    ``OUT`` ran the archive's command. Refused before anything is written, as a task name that
    cannot be a folder is; such a name cannot be packed either."""
    arch = _as_repository(folders / "f.tallpack", tmp_path / "evil.tallpack", "", task)
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "tallpack", "unpack", str(arch), "--all", "-o", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.startswith(f"error: {arch}: task {task!r} cannot be a folder of "), r.stderr
    assert "a repository's folder" in r.stderr and not out.exists(), r.stderr
    with tallpack.open(arch) as fam, pytest.raises(tallpack.InvalidArgumentError, match="a repository's folder"):
        tallpack.write_tasks(fam, None, out)
    assert not out.exists()
    with pytest.raises(tallpack.InvalidArgumentError, match=rf"{task!r} names a repository's folder"):
        tallpack.pack(folders / "base", {task: folders / "a"}, tmp_path / "x.tallpack", threads=1)


# -- redirects -------------------------------------------------------------------------------------

class _Redirects(_Loopback):
    """Answers ``/NAME`` with a redirect to ``targets[NAME]`` (a path: its own; a URL: elsewhere),
    or, for a name it has no target for, serves ``data`` honouring ranges; ``auth`` records the
    Authorization header of each request, by name."""

    def __init__(self, data: bytes, targets: dict[str, str]):
        self.data, self.targets, self.auth = data, targets, []
        super().__init__(_RedirectHandler)


class _RedirectHandler(_Answers):
    server: _Redirects

    def _answer(self, body: bool) -> None:
        name = self.path.lstrip("/")
        self.server.auth.append((name, self.headers.get("Authorization")))
        target = self.server.targets.get(name)
        if target is not None:
            self.send_response(302)
            self.send_header("Location", target)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data = self.server.data
        a, b = (int(x) for x in self.headers["Range"].removeprefix("bytes=").split("-")) if "Range" in self.headers \
            else (0, len(data) - 1)
        self.send_response(206 if "Range" in self.headers else 200)
        self.send_header("Content-Length", str(b + 1 - a))
        self.end_headers()
        if body:
            self.wfile.write(data[a:b + 1])


def test_a_redirect_off_http_or_in_a_loop_is_said_as_such(family):
    """``file:///etc/passwd`` (with a signature in its query), ``ftp://``, ``/loop -> /loop``: aiohttp
    follows none of them, and fsspec reported each as a missing file, so the archive was "no such
    archive"; now one line that says what the server did, and no secret of the target."""
    targets = {"file.tallpack": "file:///etc/passwd?X-Amz-Signature=SECRET&v=1", "ftp.tallpack": "ftp://127.0.0.1/f",
               "loop.tallpack": "/loop.tallpack"}
    with _Redirects(family.read_bytes(), targets) as server:
        for name, said in (("file", "the server redirects to 'file:///etc/passwd?v=1', which is no HTTP(S) URL; "
                                    "not followed"),
                           ("ftp", "the server redirects to 'ftp://127.0.0.1/f', which is no HTTP(S) URL; not followed"),
                           ("loop", "too many redirects (the server redirects in a loop)")):
            url = f"http://127.0.0.1:{server.port}/{name}.tallpack"
            with pytest.raises(tallpack.RemoteError) as e:
                tallpack.open(url)
            assert str(e.value) == f"{url}: {said}"


def test_a_redirect_to_another_host_does_not_take_the_authorization_header(family):
    """A token given as a header (storage options) or as ``user:password@`` goes to the host named,
    not to the one it redirects to (another origin: ``localhost``, not ``127.0.0.1``), which is
    read without it."""
    with _Redirects(family.read_bytes(), {}) as other:
        with _Redirects(family.read_bytes(), {"f.tallpack": f"http://localhost:{other.port}/f.tallpack"}) as first:
            for url, opts in ((f"http://127.0.0.1:{first.port}/f.tallpack", {"headers": {"Authorization": "Bearer T0K"}}),
                              (f"http://me:PW@127.0.0.1:{first.port}/f.tallpack", None)):
                with tallpack.open(url, storage_options=opts) as fam:
                    assert fam.state_dict("a")["w"].shape == (64, 64)
            assert first.auth and all(a is not None for _, a in first.auth)  # given to the host named
            assert other.auth and all(a is None for _, a in other.auth), other.auth


# -- downloads (pack's inputs at URLs) ---------------------------------------------------------------

class _Downloads(_Loopback):
    """Serves ``files`` (name -> bytes) whole, but for ``hostile``: its HEAD announces its size, its
    GET sends an endless body (``mode`` ``chunked``) or drips it a byte every 0.3 s (``drip``)."""

    def __init__(self, files: dict[str, bytes], hostile: str, mode: str):
        self.files, self.hostile, self.mode, self.sent = files, hostile, mode, 0
        super().__init__(_DownloadHandler)
        self.url = f"http://127.0.0.1:{self.port}"


class _DownloadHandler(_Answers):  # (its own HEAD and GET)
    server: _Downloads

    def do_HEAD(self) -> None:
        data = self.server.files[self.path.lstrip("/")]
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")  # (no folder listing: fsspec reads none)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()

    def do_GET(self) -> None:
        name = self.path.lstrip("/")
        data = self.server.files[name]
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.close_connection = True
        if name != self.server.hostile:
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        try:
            if self.server.mode == "drip":
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                for i in range(len(data)):
                    self.wfile.write(data[i:i + 1])
                    self.wfile.flush()
                    if self.server.stopped.wait(0.3):
                        return
                return
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            block = b"\0" * (1 << 20)
            while self.server.sent < FLOOD:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(block), block))
                self.server.sent += len(block)
        except OSError:  # the client hung up
            pass


@pytest.mark.parametrize("mode", ["chunked", "drip"])
def test_a_checkpoint_at_a_url_sent_endlessly_or_dripped_is_given_up_on(family, tmp_path, monkeypatch, mode):
    """pack's input ``http://.../a.safetensors``, announced at its size (HEAD) and then sent as an
    endless body: the download filled the temporary folder (256 MiB here, the disk in the wild)
    before anything was checked; now it ends at the size announced, in one line. Dripped a byte
    every 0.3 s (the idle timeout here 1 s), it held pack for hours; now given up on after a
    window under 1 KiB a second. Nothing is written."""
    from tallpack import remote

    monkeypatch.setattr(remote, "HTTP_IDLE_TIMEOUT", 1)
    d = family.parent
    files = {f"{t}.safetensors": (d / f"{t}.safetensors").read_bytes() for t in ("base", "a")}
    with _Downloads(files, "a.safetensors", mode) as server:
        timer = threading.Timer(20, server.stopped.set)  # a download that waits on: cut off, and the test fails
        timer.start()
        with pytest.raises(tallpack.CheckpointError) as e:
            tallpack.pack(f"{server.url}/base.safetensors", {"a": f"{server.url}/a.safetensors"}, tmp_path / "x.tallpack",
                          threads=1)
        timer.cancel()
    text = str(e.value)
    assert text.startswith(f"{server.url}/a.safetensors: cannot download: ") and "\n" not in text, text
    if mode == "chunked":
        assert f"the server sent more than the {len(files['a.safetensors'])} bytes it announced" in text, text
        assert server.sent < 64 << 20, f"{server.sent >> 20} MiB downloaded for a file of 16 KB"
    else:
        assert "timed out (the server sent " in text and "under 1024 a second" in text, text
    assert not (tmp_path / "x.tallpack").exists()


# -- code an archive carries ------------------------------------------------------------------------

class _Payload:
    """Unpickled, it creates the file ``flag`` (what a hostile pickle does, with worse commands)."""

    def __init__(self, flag: Path):
        self.flag = flag

    def __reduce__(self):
        return (open, (str(self.flag), "w"))


def test_code_an_archive_carries_is_written_never_run(tmp_path):
    """A task folder with ``modeling_evil.py`` (``config.json``'s ``auto_map`` names it, as
    ``trust_remote_code`` models do) and a pickle in a subfolder (``extra/evil.bin``), each of
    which creates a flag file when imported or unpickled: open, read, verify, stats, unpack and
    merge write them byte for byte, and the flag is never made."""
    import pickle

    from tallpack.stats import compute

    flag = tmp_path / "ran"
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(16, 16, generator=g)}
    for name, sd in (("base", base), ("a", {"w": base["w"] + 0.1})):
        (tmp_path / name).mkdir()
        save_file(sd, tmp_path / name / "model.safetensors")
        (tmp_path / name / "config.json").write_text(json.dumps(
            {"model_type": "evil", "auto_map": {"AutoModel": "modeling_evil.EvilModel"}}))
    code = f"open({str(flag)!r}, 'w').close()\nclass EvilModel: pass\n"
    (tmp_path / "a" / "modeling_evil.py").write_text(code)
    (tmp_path / "a" / "extra").mkdir()
    (tmp_path / "a" / "extra" / "evil.bin").write_bytes(pickle.dumps(_Payload(flag)))
    arch = tmp_path / "f.tallpack"
    tallpack.pack(tmp_path / "base", {"a": tmp_path / "a"}, arch, threads=1)
    with tallpack.open(arch) as fam:
        assert {"modeling_evil.py", "extra/evil.bin"} <= set(fam.files("a"))
        assert fam.read_file("modeling_evil.py", "a").decode() == code
        fam.state_dict("a")
        assert not fam.verify()
        compute(fam)
        tallpack.write_task(fam, "a", tmp_path / "out")
        tallpack.write_merged(fam, tmp_path / "merged", task="a")
    for out in ("out", "merged"):
        assert (tmp_path / out / "modeling_evil.py").read_text() == code
        assert (tmp_path / out / "extra" / "evil.bin").read_bytes() == (tmp_path / "a" / "extra" / "evil.bin").read_bytes()
    assert not flag.exists() and "modeling_evil" not in sys.modules


# -- a folder at an HTTP URL whose listing page is endless ------------------------------------------

class _Listings(_Loopback):
    """Serves ``files`` (name -> bytes) whole, and the folder ``/m/`` as an HTML page linking to
    them, which ``mode`` makes hostile: ``chunked``, an endless page of links; ``drip``, its page a
    byte every 0.3 s; ``honest``, as is; ``nested``, every page linking one folder deeper. With
    ``untyped``, nothing has a Content-Type."""

    def __init__(self, files: dict[str, bytes], mode: str, untyped: bool = False):
        self.files, self.mode, self.untyped, self.sent = files, mode, untyped, 0
        super().__init__(_ListingHandler)
        self.url = f"http://127.0.0.1:{self.port}/m"


class _ListingHandler(_Answers):
    server: _Listings

    def _answer(self, body: bool) -> None:
        name, server = self.path.lstrip("/").removeprefix("m").strip("/"), self.server
        self.close_connection = True
        if server.mode == "nested":  # every page a listing of one folder deeper, for ever (``sent``: pages)
            name, server.files = "", {f"{self.path.rstrip('/')}/d/": b""}
            server.sent += body
        if name:
            data = server.files[name]
            self.send_response(200)
            if not server.untyped:
                self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if body:
                self.wfile.write(data)
            return
        page = "".join(f'<a href="{n}">{n}</a>\n' for n in server.files).encode()
        self.send_response(200)
        if not server.untyped:
            self.send_header("Content-Type", "text/html; charset=utf-8")
        if server.mode != "chunked":
            self.send_header("Content-Length", str(len(page)))
        else:
            self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        if not body:
            return
        try:
            if server.mode in ("honest", "nested"):
                self.wfile.write(page)
            elif server.mode == "drip":
                for i in range(len(page)):
                    self.wfile.write(page[i:i + 1])
                    self.wfile.flush()
                    if server.stopped.wait(0.3):
                        return
            else:
                block = page + b"<p>" + b"z" * (1 << 20) + b"</p>\n"
                while server.sent < FLOOD:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(block), block))
                    server.sent += len(block)
        except OSError:  # the client hung up
            pass


@pytest.mark.parametrize("mode", ["chunked", "untyped", "drip"])
def test_a_folder_at_a_url_whose_listing_is_endless_or_dripped_is_given_up_on(family, tmp_path, monkeypatch, mode):
    """pack's input ``http://.../m`` (a folder: an HTML page of links), its page sent endlessly
    (HTML, or untyped): fsspec read it into memory whole, until it ended or memory ran out (256 MiB
    here); now it is read to ``HTTP_LISTING_MAX`` (here 4 MiB) and refused in one line naming the
    URL and the limit. Dripped a byte every 0.3 s (the idle timeout here 1 s), it held pack for
    hours; now given up on after a window under 1 KiB a second."""
    from tallpack import remote

    monkeypatch.setattr(remote, "HTTP_IDLE_TIMEOUT", 1)
    monkeypatch.setattr(remote, "HTTP_LISTING_MAX", 4 << 20)
    d = family.parent
    files = {"model.safetensors": (d / "a.safetensors").read_bytes()}
    with _Listings(files, "chunked" if mode == "untyped" else mode, untyped=mode == "untyped") as server:
        timer = threading.Timer(20, server.stopped.set)  # a listing that waits on: cut off, and the test fails
        timer.start()
        with pytest.raises(tallpack.CheckpointError) as e:
            tallpack.pack(d / "base.safetensors", {"a": server.url}, tmp_path / "x.tallpack", threads=1)
        timer.cancel()
    text = str(e.value)
    assert text.startswith(f"{server.url}: cannot download: ") and "\n" not in text, text
    if mode == "drip":
        assert "timed out (" in text and "under 1024 a second" in text, text
    else:
        assert f"its folder listing is over the {4 << 20} bytes" in text, text
        assert server.sent < 64 << 20, f"{server.sent >> 20} MiB of listing read"
    assert not (tmp_path / "x.tallpack").exists()


def test_a_folder_at_a_url_with_an_honest_listing_is_packed(family, tmp_path):
    """The same server honest (its page a few links, HTML): the folder is downloaded and packed."""
    d = family.parent
    files = {"model.safetensors": (d / "a.safetensors").read_bytes()}
    with _Listings(files, "honest") as server:
        tallpack.pack(d / "base.safetensors", {"a": server.url}, tmp_path / "x.tallpack", threads=1)
    with tallpack.open(tmp_path / "x.tallpack") as fam:
        assert fam.task_info("a").source["path"] == server.url


def test_an_untyped_file_at_a_url_larger_than_a_listing_is_packed(family, tmp_path, monkeypatch):
    """A checkpoint served without a Content-Type is read as a listing page might be (fsspec's way
    to tell a folder), but binary: it is a file, however far past ``HTTP_LISTING_MAX`` (here 1 KiB)."""
    from tallpack import remote

    monkeypatch.setattr(remote, "HTTP_LISTING_MAX", 1024)
    d = family.parent
    files = {"model.safetensors": (d / "a.safetensors").read_bytes()}
    with _Listings(files, "honest", untyped=True) as server:
        tallpack.pack(d / "base.safetensors", {"a": f"{server.url}/model.safetensors"}, tmp_path / "x.tallpack",
                      threads=1)
    tallpack.pack(d / "base.safetensors", {"a": d / "a.safetensors"}, tmp_path / "y.tallpack", threads=1)
    with tallpack.open(tmp_path / "x.tallpack") as fam, tallpack.open(tmp_path / "y.tallpack") as local:
        assert torch.equal(fam.state_dict("a")["w"], local.state_dict("a")["w"])


def test_a_folder_at_a_url_nested_without_end_is_given_up_on(family, tmp_path, monkeypatch):
    """A listing whose every page links one folder deeper (small pages: the bytes' limit would take
    a million requests) is refused after ``HTTP_LISTING_PAGES`` pages (here 20), in one line."""
    from tallpack import remote

    monkeypatch.setattr(remote, "HTTP_LISTING_PAGES", 20)
    d = family.parent
    with _Listings({}, "nested") as server:
        with pytest.raises(tallpack.CheckpointError) as e:
            tallpack.pack(d / "base.safetensors", {"a": server.url}, tmp_path / "x.tallpack", threads=1)
        assert server.sent <= 21, server.sent
    text = str(e.value)
    assert text.startswith(f"{server.url}: cannot download: its folder listing is over the 20 pages"), text
    assert "\n" not in text
