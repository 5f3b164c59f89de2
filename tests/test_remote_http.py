"""Archives anywhere: reading over plain HTTP (Range requests, a server started here), writing to
URLs (memory://, S3 on loopback), and every command on a URL."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner

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
        assert need <= http_server.served() <= need + 63 * chunks  # its chunks and the padding between
        assert http_server.gets() < chunks  # adjacent chunks coalesced
        assert fam._c.source.fetched - before == http_server.served()  # the source counts the same

        http_server.reset()
        sd = fam.state_dict("c")
        assert all(torch.equal(sd[k], v) for k, v in ref.state_dict("c").items())
        need, chunks = _stored(fam, "c", fam.keys("c"))
        entry = fam._tensors["layers.2.w"]
        kept = entry.arrays["base"].stored_nbytes + entry.arrays["merged"].stored_nbytes
        # layers.2.w's base and merged vector are in the cache from the get_tensor above: not fetched again
        assert need - kept <= http_server.served() <= need - kept + 63 * chunks
        others = sum(tt.arrays["mask"].stored_nbytes for e in fam.manifest.tensors
                     for t, tt in e.tasks.items() if t != "c" and "mask" in tt.arrays)
        assert http_server.served() <= served["local"].stat().st_size - others  # no other task's masks
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
