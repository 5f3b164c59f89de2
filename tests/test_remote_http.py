"""Archives anywhere: reading over plain HTTP (Range requests, a server started here), writing to
URLs (memory://, S3 on loopback), and every command on a URL."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

import tallpack
from tallpack import kernels
from tallpack.container import FOOTER, HEADER
from tallpack.encodings import encoding_for
from tallpack.remote import coalesce
from tallpack_cli.main import main
from conftest import written_str

pytest.importorskip("aiohttp")  # fsspec's HTTP file system


def run(*args):
    r = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return r.output


@pytest.fixture(scope="module")
def served(http_server, tmp_path_factory):
    """The small family packed with small chunks (every tensor several chunks), served over HTTP."""
    g = torch.Generator().manual_seed(1)
    base = {f"layers.{i}.w": torch.randn(64, 96, generator=g) for i in range(4)} | {"head": torch.randn(5, 96, generator=g)}
    tasks = {t: {k: v + 0.05 * torch.randn(v.shape, generator=g) * (torch.rand(v.shape, generator=g) < 0.4)
                 for k, v in base.items()} for t in ("a", "b", "c")}
    local = tmp_path_factory.mktemp("fam") / "fam.tallpack"
    tallpack.pack(base, tasks, local, chunk_elements=1024, group=False)  # per tensor (groups: test_groups.py)
    shutil.copy(local, http_server.root / "fam.tallpack")
    return {"local": local, "url": f"{http_server.url}/fam.tallpack", "tasks": tasks}


def _stored(fam, task, names):
    """Stored bytes (and chunks) of the arrays that rebuilding these tensors of ``task`` reads."""
    total = chunks = 0
    for name in names:
        entry, tt = fam._entry(task, name)
        enc = encoding_for(tt.encoding)
        for ref in [*tt.arrays.values(), *(entry.arrays[k] for k in enc.entry_arrays if k in entry.arrays)]:
            total += ref.stored_nbytes
            chunks += len(ref.chunks)
    return total, chunks


def test_http_reads_only_what_it_needs(http_server, served):
    http_server.reset()
    with tallpack.open(served["url"]) as fam, tallpack.open(served["local"]) as ref:
        m_len = FOOTER.unpack(served["local"].read_bytes()[-FOOTER.size:])[1]
        assert http_server.served() == HEADER.size + FOOTER.size + m_len  # open: header, footer, manifest
        assert http_server.gets() == 3

        http_server.reset()
        before = fam._c.source.fetched
        w = fam.get_tensor("b", "layers.2.w")  # tall: base, merged and b's mask, 6 chunks each
        assert torch.equal(w, ref.get_tensor("b", "layers.2.w"))
        need, chunks = _stored(fam, "b", ["layers.2.w"])
        # its chunks and the padding between, and holes bridged for at most 1/8 more (remote.BRIDGE_SHARE)
        assert need <= http_server.served() <= need + need // 8 + 63 * chunks
        assert http_server.gets() < chunks  # adjacent chunks coalesced
        assert fam._c.source.fetched - before == http_server.served()  # the source counts the same

        http_server.reset()
        sd = fam.state_dict("c")
        assert all(torch.equal(sd[k], v) for k, v in ref.state_dict("c").items())
        need, chunks = _stored(fam, "c", fam.keys("c"))
        entry = fam._tensors["layers.2.w"]
        kept = entry.arrays["base"].stored_nbytes + entry.arrays["merged"].stored_nbytes
        # layers.2.w's base and merged vector are in the cache from the get_tensor above: not fetched again
        assert need - kept <= http_server.served() <= need - kept + (need - kept) // 8 + 63 * chunks
        others = sum(tt.arrays["mask"].stored_nbytes for e in fam.manifest.tensors
                     for t, tt in e.tasks.items() if t != "c" and "mask" in tt.arrays)
        # no other task's masks, but those in holes bridged (at most 1/8 of what the task needs)
        assert http_server.served() <= served["local"].stat().st_size - others + (need - kept) // 8
        assert http_server.gets() < chunks


def test_coalesce():
    assert coalesce([(128, 10), (0, 10), (64, 10), (10_000, 5)]) == [(0, 138), (10_000, 10_005)]
    assert coalesce([(200, 10), (0, 10)]) == [(0, 10), (200, 210)]  # more than the padding apart
    assert coalesce([(0, 10), (64, 10)], max_request=50) == [(0, 10), (64, 74)]
    assert coalesce([(0, 0)]) == []


def test_every_command_takes_a_url(http_server, served, tmp_path):
    url = served["url"]
    assert f"format {written_str(3)}" in run("inspect", url)  # the planes-exp codec
    rows = json.loads(run("inspect", url, "--json", "--tensors"))["tensors"]
    assert {r["name"] for r in rows} >= {"layers.0.w", "head"}
    assert "ok:" in run("-q", "verify", url)
    run("-q", "unpack", url, "--task", "a", "-o", tmp_path / "a")
    run("-q", "merge", url, "--method", "consensus-ta", "-o", tmp_path / "m")
    assert "catastrophic" in run("-q", "stats", url)
    with tallpack.open(served["local"]) as ref:
        from safetensors.torch import load_file

        got = load_file(tmp_path / "a" / "model.safetensors")
        assert all(torch.equal(got[k], v) for k, v in ref.state_dict("a").items())


def test_writing_to_memory_urls(served, small_family):
    fsspec = pytest.importorskip("fsspec")
    mem = fsspec.filesystem("memory")
    with tallpack.open(served["local"]) as fam:
        tallpack.write_tasks(fam, None, "memory://out/tasks")
    assert mem.exists("/out/tasks/b/model.safetensors")
    p = small_family["task_paths"]
    run("-q", "pack", "--base", small_family["base_path"], "--task", f"a={p['a']}", "--task", f"b={p['b']}",
        "-o", "memory://out/fam.tallpack")
    assert "already exists" in CliRunner().invoke(main, ["pack", "--base", str(small_family["base_path"]), "--task",
                                                        str(p["a"]), "-o", "memory://out/fam.tallpack"]).output
    with tallpack.open("memory://out/fam.tallpack") as fam:
        assert torch.equal(fam.get_tensor("b", "head.w"), small_family["tasks"]["b"]["head.w"])
    out = run("unpack", "memory://out/fam.tallpack", "--task", "a", "-o", "memory://out/a")
    assert "memory://out/a/model.safetensors" in out and mem.exists("/out/a/model.safetensors")


def test_stats_fetches_a_tensors_masks_together(http_server, served):
    """`stats` reads every task's mask of a tensor: over HTTP one coalesced request a tensor, not
    one a mask, and the same figures as the local archive."""
    from tallpack.stats import compute

    with tallpack.open(served["url"]) as fam, tallpack.open(served["local"]) as ref:
        http_server.reset()
        remote = compute(fam)
        assert remote == compute(ref)
        masked = [e for e in fam.manifest.tensors if any("mask" in tt.arrays for tt in e.tasks.values())]
        masks = sum(1 for e in masked for tt in e.tasks.values() if "mask" in tt.arrays)
        # one coalesced request a tensor (2x: room for an HTTP retry under load); one a mask without
        assert http_server.gets() <= 2 * len(masked) < masks + len(masked)
        assert http_server.gets() < masks, (http_server.gets(), len(masked), masks)


def test_derived_merged_vectors_over_http(http_server, served, tmp_path):
    """Format 1.8 over HTTP: a lossy read of one task derives each merged vector from every task's
    residual, fetched with the rest of its batch (coalesced requests, not one per residual)."""
    local = tmp_path / "exact.tallpack"
    g = torch.Generator().manual_seed(2)
    base = {f"layers.{i}.w": torch.randn(64, 96, generator=g) for i in range(4)}
    tasks = {t: {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in base.items()} for t in ("a", "b", "c")}
    tallpack.pack(base, tasks, local, chunk_elements=1024, exact=True)
    shutil.copy(local, http_server.root / "exact.tallpack")
    with tallpack.open(f"{http_server.url}/exact.tallpack") as fam, tallpack.open(local) as ref:
        assert {tt.encoding for e in fam.manifest.tensors for tt in e.tasks.values()} == {"tall-derived-merged"}
        http_server.reset()
        got, want = fam.state_dict("b"), ref.state_dict("b")
        assert all(torch.equal(got[k], want[k]) for k in want)
        residuals = sum(len(e.tasks) for e in fam.manifest.tensors)
        assert http_server.gets() < residuals, http_server.gets()


def test_an_array_cached_in_part_is_fetched_with_the_rest(http_server, served):
    """An array whose planes pass the cache's budget keeps its first chunks (reader._decode_planar);
    a read fetches no byte more than a read without a cache does, in about as many requests
    (before: every chunk up to the budget fetched twice, and the rest one request a chunk)."""
    with tallpack.open(served["url"], cache_bytes=9000) as fam, tallpack.open(served["url"], cache_bytes=0) as plain:
        for task in ("a", "b", "c"):
            http_server.reset()
            want = plain.get_tensor(task, "layers.0.w")
            without, requests = http_server.served(), http_server.gets()
            http_server.reset()
            assert torch.equal(fam.get_tensor(task, "layers.0.w"), want)
            kept = [v for k, (v, _) in fam._cache._items.items() if k[0] == "planar"]
            if kernels.COMPILED:  # the planar path needs the compiled loops
                assert kept and all(0 < v.cut < 6 for v in kept)  # 6 chunks of 4 KB of planes; 2 fit
            assert http_server.served() <= without, (task, http_server.served(), without)
            assert http_server.gets() <= requests + 2, (task, http_server.gets(), requests)


def test_a_server_that_cannot_be_reached_is_not_a_missing_archive(http_server, served):
    """fsspec reports a refused connection as FileNotFoundError; tallpack says which it was."""
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(tallpack.TallpackError, match="cannot connect") as e:
        tallpack.open(f"http://127.0.0.1:{port}/fam.tallpack")
    assert not isinstance(e.value, tallpack.ArchiveNotFoundError) and "\n" not in str(e.value)
    with pytest.raises(tallpack.ArchiveNotFoundError, match="no such archive"):
        tallpack.open(f"{http_server.url}/nope.tallpack")


def test_a_server_that_ignores_range_requests_is_named_as_such(served, tmp_path):
    """Python's own file server answers a range request with the whole file: the error says so,
    not that the archive is truncated."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    shutil.copy(served["local"], tmp_path / "fam.tallpack")
    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(tmp_path)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(tallpack.TallpackError, match="ignored a range request") as e:
            tallpack.open(f"http://127.0.0.1:{server.server_address[1]}/fam.tallpack")
        assert "truncated" not in str(e.value) and "\n" not in str(e.value)
    finally:
        server.shutdown()
        server.server_close()


def test_model_folders_at_http_urls_are_packed_as_local_ones(hf_family, tmp_path):
    """A folder URL on a server that lists folders (Python's own, as HTML) is downloaded file by
    file, shards, index, config and all, and packs as the local folder does."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(hf_family["root"])))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        tallpack.pack(f"{url}/base", {"dtd": f"{url}/dtd"}, tmp_path / "url.tallpack")
    finally:
        server.shutdown()
        server.server_close()
    tallpack.pack(hf_family["base"], {"dtd": hf_family["tasks"]["dtd"]}, tmp_path / "local.tallpack")
    with tallpack.open(tmp_path / "url.tallpack") as a, tallpack.open(tmp_path / "local.tallpack") as b:
        assert a.task_info("dtd").source["path"] == f"{url}/dtd"
        sa, sb = a.state_dict("dtd"), b.state_dict("dtd")
        assert list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
        assert a.task_info("dtd").files == b.task_info("dtd").files and a.files("dtd")


def test_a_folder_at_a_url_written_again_without_force_keeps_its_old_layout(served):
    """Writing one file where shards were would remove the shards: without overwrite that is
    refused, as on a local disk, and nothing is removed; with it, the old layout goes."""
    import fsspec

    fs = fsspec.filesystem("memory")
    with tallpack.open(served["local"]) as fam:
        tallpack.write_task(fam, "a", "memory://again/out", max_shard_size="20KB")
        before = sorted(fs.ls("/again/out", detail=False))
        assert any("-of-" in p for p in before)
        with pytest.raises(tallpack.OutputExistsError, match="already exists"):
            tallpack.write_task(fam, "a", "memory://again/out")
        assert sorted(fs.ls("/again/out", detail=False)) == before
        tallpack.write_task(fam, "a", "memory://again/out", overwrite=True)
    names = [p.rsplit("/", 1)[-1] for p in fs.ls("/again/out", detail=False)]
    assert "model.safetensors" in names and not [n for n in names if "-of-" in n or n.endswith(".index.json")]
    fs.rm("/again", recursive=True)


def test_a_role_that_may_write_but_not_list_is_not_told_the_bucket_is_missing():
    """s3fs's exists() is False both for a missing bucket and for one a role may not head or list
    (S3 answers 403); only the bucket's own 404 refuses the write, and a 403 for an object that is
    not there is not an error."""
    from tallpack import staging

    class Store:
        protocol = ("s3", "s3a")

        def __init__(self, answer):
            self.answer = answer

        def exists(self, path):
            if "/" in path:
                raise PermissionError("Forbidden")
            return False

        def call_s3(self, method, **kw):
            raise self.answer

    assert staging._no_bucket(Store(FileNotFoundError("NoSuchBucket")), "b")
    assert not staging._no_bucket(Store(PermissionError("Forbidden")), "b")
    assert staging._exists(Store(None), "b/key") is False


@pytest.fixture
def own_server(tmp_path):
    """A Range server of this test's own (its misbehaviours set per test), serving ``tmp_path / "www"``."""
    from rangeserver import RangeServer

    (tmp_path / "www").mkdir()
    server = RangeServer(tmp_path / "www").start()
    yield server
    server.stop()


def _checkpoints(root, small_family, names):
    """The small family's base and task "a" as .safetensors files under ``names`` in ``root``."""
    from safetensors.torch import save_file

    save_file(small_family["base"], str(root / names[0]))
    save_file(small_family["tasks"]["a"], str(root / names[1]))


def test_inputs_at_signed_links_and_names_with_brackets_are_downloaded(own_server, small_family, tmp_path):
    """A presigned link's query string (its ``?``) and a ``[`` in a name are no glob patterns: the
    files download and pack as local ones; the archive records the URLs without the credentials."""
    _checkpoints(own_server.root, small_family, ["base.safetensors", "cars[v2].safetensors"])
    host = own_server.url.removeprefix("http://")
    base = f"{own_server.url}/base.safetensors?X-Amz-Credential=AKIA&X-Amz-Signature=abc123&versionId=7"
    task = f"http://user:s3cretpw@{host}/cars[v2].safetensors?sig=zz99"
    out = tmp_path / "url.tallpack"
    tallpack.pack(base, [task], out)
    tallpack.pack(small_family["base"], {"cars[v2]": small_family["tasks"]["a"]}, tmp_path / "local.tallpack")
    with tallpack.open(out) as a, tallpack.open(tmp_path / "local.tallpack") as b:
        assert a.tasks == ("cars[v2]",)  # named after the URL's path, as a local file would be
        assert a.task_info("cars[v2]").source["path"] == f"{own_server.url}/cars[v2].safetensors"
        assert a.manifest.base["path"] == f"{own_server.url}/base.safetensors?versionId=7"
        text = json.dumps(a.manifest.to_dict())
        assert not any(s in text for s in ("s3cretpw", "user:", "abc123", "AKIA", "zz99"))
        sa, sb = a.state_dict("cars[v2]"), b.state_dict("cars[v2]")
        assert sorted(sa) == sorted(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_refused_requests_are_not_missing_files(own_server, small_family, served, tmp_path):
    """An expired link (403) or a failing server (500) is named as such, for archives and pack
    inputs alike: fsspec reports both as FileNotFoundError."""
    _checkpoints(own_server.root, small_family, ["base.safetensors", "a.safetensors"])
    shutil.copy(served["local"], own_server.root / "fam.tallpack")
    for status, words in ((403, r"forbidden \(HTTP 403\)"), (500, r"server error \(HTTP 500")):
        own_server.status = {"fam.tallpack": status, "base.safetensors": status}
        with pytest.raises(tallpack.TallpackError, match=f"fam.tallpack: {words}") as e:
            tallpack.open(f"{own_server.url}/fam.tallpack")
        assert not isinstance(e.value, tallpack.ArchiveNotFoundError) and "\n" not in str(e.value)
        with pytest.raises(tallpack.CheckpointError, match=f"base.safetensors: cannot download: {words}") as e:
            tallpack.pack(f"{own_server.url}/base.safetensors", [f"{own_server.url}/a.safetensors"],
                          tmp_path / "x.tallpack")
        assert not isinstance(e.value, FileNotFoundError) and not (tmp_path / "x.tallpack").exists()
    own_server.status = {}
    with pytest.raises(tallpack.CheckpointNotFoundError, match="nope.safetensors: no such file"):
        tallpack.pack(f"{own_server.url}/nope.safetensors", [f"{own_server.url}/a.safetensors"], tmp_path / "x.tallpack")


def test_a_download_cut_short_is_one_error_naming_the_url(own_server, small_family, tmp_path):
    """A connection that closes before the whole body came (aiohttp's ClientPayloadError) is a
    CheckpointError naming the URL, not an internal error; nothing is written."""
    _checkpoints(own_server.root, small_family, ["base.safetensors", "a.safetensors"])
    own_server.cut.add("a.safetensors")
    with pytest.raises(tallpack.CheckpointError, match=r"a.safetensors: cannot download: .*truncated") as e:
        tallpack.pack(f"{own_server.url}/base.safetensors?token=t0k", [f"{own_server.url}/a.safetensors?token=t0k"],
                      tmp_path / "x.tallpack")
    assert "\n" not in str(e.value) and "t0k" not in str(e.value) and not (tmp_path / "x.tallpack").exists()


def _replace(path, flip):
    """A new file at ``path`` of the same size (a re-upload): its data bytes ``flip`` changed."""
    raw = bytearray(path.read_bytes())
    m_off = FOOTER.unpack(raw[-FOOTER.size:])[0]
    for i in range(HEADER.size, m_off, 97):
        raw[i] ^= flip
    new = path.with_name("new")
    new.write_bytes(raw)
    st = path.stat()
    os.utime(new, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    os.replace(new, path)


def test_an_archive_replaced_on_the_server_while_open_is_not_called_damaged(own_server, served):
    """The ETag taken at open is compared again when a chunk fails its checksum: an archive
    re-uploaded meanwhile says so (reopen it); one damaged in place, on a server without ETags,
    is still "damaged". Messages never show a URL's password."""
    path = own_server.root / "fam.tallpack"
    url = own_server.url.replace("http://", "http://user:s3cretpw@") + "/fam.tallpack"
    for etags, want in ((True, "changed on the server since it was opened"), (False, "damaged archive")):
        shutil.copy(served["local"], path)
        own_server.etags = etags
        with tallpack.open(url) as fam:
            fam.get_tensor("a", "head")
            _replace(path, 0x5A)
            with pytest.raises(tallpack.IntegrityError, match=want) as e:
                fam.get_tensor("b", "layers.0.w")
            assert "s3cretpw" not in str(e.value) and "\n" not in str(e.value)


@given(user=st.text(alphabet="abcxyz09", min_size=1, max_size=8),
       secret=st.text(alphabet="ABCXYZ789+/=%", min_size=6, max_size=20),
       param=st.sampled_from(["X-Amz-Signature", "X-Amz-Credential", "X-Amz-Security-Token", "Signature", "sig",
                              "token", "AWSAccessKeyId", "X-Goog-Signature"]))
def test_redact_removes_every_credential(user, secret, param):
    from urllib.parse import quote

    from tallpack.remote import redact

    url = f"https://{user}:{quote(secret, safe='')}@host:8443/a%20b/cars.safetensors?{param}={quote(secret, safe='')}&rev=2"
    shown = redact(url)
    assert shown == "https://host:8443/a%20b/cars.safetensors?rev=2"
    assert redact(shown) == shown and redact("s3://bucket/key[1].safetensors") == "s3://bucket/key[1].safetensors"


def test_a_server_that_stops_sending_is_given_up_on(own_server, small_family, served, tmp_path, monkeypatch):
    """HTTP requests wait at most HTTP_IDLE_TIMEOUT for each next byte (here 1 s), and have no bound
    on the whole transfer: a stalled download or archive is one error saying it timed out."""
    from tallpack import remote

    monkeypatch.setattr(remote, "HTTP_IDLE_TIMEOUT", 1)
    _checkpoints(own_server.root, small_family, ["base.safetensors", "a.safetensors"])
    shutil.copy(served["local"], own_server.root / "fam.tallpack")
    own_server.stall |= {"a.safetensors", "fam.tallpack"}
    with pytest.raises(tallpack.CheckpointError, match=r"a.safetensors: cannot download: timed out") as e:
        tallpack.pack(f"{own_server.url}/base.safetensors", [f"{own_server.url}/a.safetensors"], tmp_path / "x.tallpack")
    assert "\n" not in str(e.value) and not (tmp_path / "x.tallpack").exists()
    with pytest.raises(tallpack.TallpackError, match=r"fam.tallpack: range read at \d+ failed \(timed out"):
        tallpack.open(f"{own_server.url}/fam.tallpack")
    timeout = remote.with_timeouts("https://host/x", None)["client_kwargs"]["timeout"]
    assert timeout.total is None and timeout.sock_read == 1  # a long download that keeps going is not cut off
    assert remote.with_timeouts("https://h/x", {"client_kwargs": {"timeout": 5}}) == {"client_kwargs": {"timeout": 5}}


def test_two_task_urls_of_one_file_name_are_refused_not_merged_into_one(own_server, small_family, tmp_path):
    """.../a/model.safetensors and .../b/a/model.safetensors, given without names: both would be
    task 'a' (named after their folders), so the call is refused (one of them was silently dropped)."""
    from safetensors.torch import save_file

    for sub in ("a", "b/a"):
        (own_server.root / sub).mkdir(parents=True)
        save_file(small_family["tasks"]["a"], str(own_server.root / sub / "model.safetensors"))
    save_file(small_family["base"], str(own_server.root / "base.safetensors"))
    with pytest.raises(tallpack.InvalidArgumentError, match="task 'a' given twice"):
        tallpack.pack(f"{own_server.url}/base.safetensors",
                      [f"{own_server.url}/a/model.safetensors", f"{own_server.url}/b/a/model.safetensors"],
                      tmp_path / "x.tallpack")
    assert not (tmp_path / "x.tallpack").exists()
