"""Reading an archive from a real S3-compatible server (moto's, started on loopback)."""

import json

import pytest
import torch

import tallpack

moto_server = pytest.importorskip("moto.server")
s3fs = pytest.importorskip("s3fs")


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    opts = {"key": "test", "secret": "test", "client_kwargs": {"endpoint_url": f"http://{host}:{port}",
                                                               "region_name": "us-east-1"}}
    import boto3

    boto3.client("s3", aws_access_key_id="test", aws_secret_access_key="test",
                 **opts["client_kwargs"]).create_bucket(Bucket="family")
    fs = s3fs.S3FileSystem(**opts)
    yield fs, opts
    server.stop()


class CountingFS:
    """Counts the bytes that range reads fetch."""

    def __init__(self, fs):
        self.fs, self.fetched, self.requests = fs, 0, 0

    def __getattr__(self, name):
        return getattr(self.fs, name)

    def cat_file(self, path, start=None, end=None, **kw):
        data = self.fs.cat_file(path, start=start, end=end, **kw)
        self.fetched += len(data)
        self.requests += 1
        return data


def test_one_tensor_of_a_remote_archive_costs_its_bytes(s3, small_family, tmp_path):
    fs, opts = s3
    local = tmp_path / "f.tallpack"
    tallpack.pack(small_family["base"], small_family["tasks"], local, chunk_elements=512)
    fs.put(str(local), "family/f.tallpack")
    with tallpack.open("s3://family/f.tallpack", storage_options=opts) as fam, tallpack.open(local) as ref:
        assert fam.tasks == ref.tasks
        for t in fam.tasks:
            sd, want = fam.state_dict(t), ref.state_dict(t)
            assert all(torch.equal(sd[k], want[k]) for k in want)
        counting = CountingFS(fam._c.source._fs)
        fam._c.source._fs = counting
        fam._c.source.forget()  # the chunks the state dicts read and the source kept (KEEP_READ)
        head = fam.get_tensor("b", "head.w")
        assert torch.equal(head, small_family["tasks"]["b"]["head.w"])
        stored = fam._tensors["head.w"].tasks["b"].arrays["data"].stored_nbytes
        assert counting.fetched == stored and counting.requests == 1
        assert counting.fetched < local.stat().st_size / 20


def test_missing_remote_archive_is_one_clear_error(s3):
    _, opts = s3
    with pytest.raises(tallpack.TallpackError, match="no such archive"):
        tallpack.open("s3://family/nothere.tallpack", storage_options=opts)


def test_pack_and_unpack_to_s3_urls(s3, hf_family):
    """Outputs at URLs are staged locally, then uploaded: an archive, and a whole sharded folder."""
    fs, opts = s3
    url = "s3://family/hf.tallpack"
    tallpack.pack(hf_family["base"], hf_family["tasks"], url, storage_options=opts)
    with tallpack.open(url, storage_options=opts) as fam:
        assert set(fam.files("dtd")) >= {"config.json", "generation_config.json"}
        target = tallpack.write_task(fam, "dtd", "s3://family/out/dtd", storage_options=opts)
        want = fam.state_dict("dtd")
    assert target == "s3://family/out/dtd/model.safetensors.index.json"
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls("family/out/dtd"))
    assert names == sorted(p.name for p in hf_family["tasks"]["dtd"].iterdir())
    index = json.loads(fs.cat_file("family/out/dtd/model.safetensors.index.json"))
    from safetensors.torch import load

    got = {}
    for f in set(index["weight_map"].values()):
        got |= load(fs.cat_file(f"family/out/dtd/{f}"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_the_command_line_reads_s3_with_fsspec_configuration(s3, small_family, tmp_path, monkeypatch):
    """`FSSPEC_S3_*` variables (here: fsspec's configuration directly) reach every command."""
    import fsspec.config
    from click.testing import CliRunner

    from tallpack_cli.main import main

    fs, opts = s3
    monkeypatch.setitem(fsspec.config.conf, "s3", dict(opts))
    p = small_family["task_paths"]
    for args in (["pack", "--base", small_family["base_path"], "--task", p["a"], "-o", "s3://family/cli.tallpack"],
                 ["inspect", "s3://family/cli.tallpack", "--tensors"], ["verify", "s3://family/cli.tallpack"],
                 ["unpack", "s3://family/cli.tallpack", "--task", "a", "-o", "s3://family/cli-a"]):
        r = CliRunner().invoke(main, ["-q", *map(str, args)], catch_exceptions=False)
        assert r.exit_code == 0, r.output
    assert fs.exists("family/cli-a/model.safetensors")


def test_pack_reads_checkpoints_at_urls(s3, small_family, hf_family, tmp_path, monkeypatch):
    """Pack inputs may be URLs (files and model folders): they are downloaded, packed as local ones
    would be, and the archive records the URL; a missing one is one clear error."""
    import fsspec.config
    from click.testing import CliRunner

    from tallpack.errors import CheckpointNotFoundError
    from tallpack_cli.main import main

    fs, opts = s3
    fs.put(str(small_family["base_path"]), "family/in/base.safetensors")
    for n, p in small_family["task_paths"].items():
        fs.put(str(p), f"family/in/{n}.safetensors")
    fs.put(str(hf_family["base"]), "family/hf/base", recursive=True)
    fs.put(str(hf_family["tasks"]["dtd"]), "family/hf/dtd", recursive=True)
    assert fs.exists("family/hf/base/config.json")

    # Python: a folder URL (sharded Hugging Face model) and a local folder, side by side
    tallpack.pack("s3://family/hf/base", {"dtd": "s3://family/hf/dtd"}, tmp_path / "url.tallpack",
                  storage_options=opts)
    tallpack.pack(hf_family["base"], {"dtd": hf_family["tasks"]["dtd"]}, tmp_path / "local.tallpack")
    with tallpack.open(tmp_path / "url.tallpack") as a, tallpack.open(tmp_path / "local.tallpack") as b:
        assert a.manifest.base["path"] == "s3://family/hf/base"
        assert a.task_info("dtd").source["path"] == "s3://family/hf/dtd"
        sa, sb = a.state_dict("dtd"), b.state_dict("dtd")
        assert list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
        assert a.task_info("dtd").files == b.task_info("dtd").files  # config.json and the rest, kept

    # the command line: bare URLs are named after their last part
    monkeypatch.setitem(fsspec.config.conf, "s3", dict(opts))
    args = ["-q", "pack", "--base", "s3://family/in/base.safetensors", "--task", "s3://family/in/a.safetensors",
            "--task", "bee=s3://family/in/b.safetensors", "-o", str(tmp_path / "cli.tallpack")]
    r = CliRunner().invoke(main, args, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    with tallpack.open(tmp_path / "cli.tallpack") as fam:
        assert fam.tasks == ("a", "bee")
        assert torch.equal(fam.get_tensor("bee", "head.w"), small_family["tasks"]["b"]["head.w"])
    r = CliRunner().invoke(main, ["-q", "pack", "--base", "s3://family/in/nothere.safetensors", "--task",
                                  "s3://family/in/a.safetensors", "-o", str(tmp_path / "x.tallpack")])
    assert r.exit_code != 0 and "s3://family/in/nothere.safetensors: no such file or folder" in r.output
    assert not (tmp_path / "x.tallpack").exists()
    with pytest.raises(CheckpointNotFoundError):
        tallpack.pack("s3://family/in/base.safetensors", {"a": "s3://family/in/gone.safetensors"},
                      tmp_path / "y.tallpack", storage_options=opts)


def test_outputs_at_urls_replace_objects_only_when_asked(s3, small_family, hf_family, tmp_path):
    """As on a local disk: an existing object at a URL is replaced only with overwrite (--force),
    a folder written again loses the shards of its old layout, and a bucket is never created."""
    from click.testing import CliRunner

    from tallpack_cli.main import main

    fs, opts = s3
    url = "s3://family/again.tallpack"
    tallpack.pack(hf_family["base"], hf_family["tasks"], url, storage_options=opts)
    with pytest.raises(tallpack.OutputExistsError, match="already exists"):
        tallpack.pack(hf_family["base"], hf_family["tasks"], url, storage_options=opts)
    with tallpack.open(url, storage_options=opts) as fam:
        tallpack.write_task(fam, "dtd", "s3://family/again/dtd", storage_options=opts)  # sharded, as packed
        before = fs.cat_file("family/again/dtd/config.json")
        for write in (lambda **kw: tallpack.write_task(fam, "dtd", "s3://family/again/dtd", **kw),
                      lambda **kw: tallpack.write_merged(fam, "s3://family/again/dtd", "ta", alpha=0.3, **kw)):
            with pytest.raises(tallpack.OutputExistsError, match=r"s3://family/again/dtd/.* already exists"):
                write(storage_options=opts)
            assert fs.cat_file("family/again/dtd/config.json") == before
        assert len(fs.ls("family/again/dtd")) > 3
        import fsspec.config

        with pytest.MonkeyPatch.context() as mp:  # the command line: one line, before any tensor is written
            mp.setitem(fsspec.config.conf, "s3", dict(opts))
            r = CliRunner().invoke(main, ["unpack", url, "--task", "dtd", "-o", "s3://family/again/dtd"])
            assert r.exit_code == 1 and r.output.count("\n") == 1 and "already exists" in r.output, r.output
        tallpack.write_task(fam, "dtd", "s3://family/again/dtd", max_shard_size="10GB", storage_options=opts,
                            overwrite=True)  # one file now: the old shards and index go
        fs.invalidate_cache()
        assert not [p for p in fs.ls("family/again/dtd") if "-of-" in p or p.endswith(".index.json")]
        assert fs.exists("family/again/dtd/model.safetensors")
        with pytest.raises(tallpack.OutputError, match="no bucket 'nobucket'"):
            tallpack.write_task(fam, "dtd", "s3://nobucket/dtd", storage_options=opts)
    with pytest.raises(tallpack.OutputError, match="no bucket 'nobucket'"):
        tallpack.pack(small_family["base"], small_family["tasks"], "s3://nobucket/x.tallpack", storage_options=opts)
    assert "nobucket" not in [b.rstrip("/") for b in fs.ls("")]


def test_s3_inputs_with_brackets_and_presigned_links_are_downloaded(s3, small_family, tmp_path, monkeypatch):
    """A ``[`` in a key and a presigned link's query string are no glob patterns; the archive
    records the link without its signature."""
    import boto3
    import fsspec.config

    fs, opts = s3
    fs.put_file(str(small_family["base_path"]), "family/odd/my base.safetensors")
    fs.put_file(str(small_family["task_paths"]["a"]), "family/odd/cars[v2].safetensors")
    client = boto3.client("s3", aws_access_key_id="test", aws_secret_access_key="test", **opts["client_kwargs"])
    link = client.generate_presigned_url("get_object", Params={"Bucket": "family", "Key": "odd/my base.safetensors"},
                                         ExpiresIn=600)
    assert "Signature=" in link
    monkeypatch.setitem(fsspec.config.conf, "s3", dict(opts))  # (storage_options would go to the link too)
    tallpack.pack(link, {"cars": "s3://family/odd/cars[v2].safetensors"}, tmp_path / "odd.tallpack")
    with tallpack.open(tmp_path / "odd.tallpack") as fam:
        assert fam.task_info("cars").source["path"] == "s3://family/odd/cars[v2].safetensors"
        assert fam.manifest.base["path"] == link.split("?")[0]  # its signature and key id left out
        assert torch.equal(fam.get_tensor("cars", "body.w"), small_family["tasks"]["a"]["body.w"])


def test_an_s3_object_replaced_while_open_is_not_called_damaged(s3, small_family, tmp_path):
    """A reader holding an archive open while a new version is uploaded over its key is told the
    object changed (its ETag), not that the archive is damaged."""
    fs, opts = s3
    for name, lam in (("old", 0.4), ("new", 0.6)):
        tallpack.pack(small_family["base"], small_family["tasks"], tmp_path / f"{name}.tallpack",
                      chunk_elements=512, group=False, lambdas=lam)
    fs.put_file(str(tmp_path / "old.tallpack"), "family/swap.tallpack")
    with tallpack.open("s3://family/swap.tallpack", storage_options=opts) as fam:
        fam.get_tensor("a", "head.w")
        fs.put_file(str(tmp_path / "new.tallpack"), "family/swap.tallpack")
        with pytest.raises(tallpack.IntegrityError, match="changed on the server since it was opened.*reopen it"):
            for task in fam.tasks:
                for name in fam.keys(task):
                    fam.get_tensor(task, name)


def test_a_url_output_never_makes_one_name_both_a_file_and_a_folder(s3, small_family, hf_family):
    """As on a disk: an archive is never written where the URL holds a folder (objects below its
    name), nor a folder where it holds an object, with --force or not: one line, nothing uploaded
    (the upload used to put both under one name). Reading a folder as an archive says so."""
    fs, opts = s3
    folder, afile = "s3://family/kinds/adir", "s3://family/kinds/afile.tallpack"
    tallpack.pack(small_family["base"], small_family["tasks"], afile, storage_options=opts)
    with tallpack.open(afile, storage_options=opts) as fam:
        tallpack.write_task(fam, "a", folder, storage_options=opts)

    def listing():
        fs.invalidate_cache()
        return sorted(fs.find("family/kinds")) + sorted(fs.find("family/kinds", withdirs=True))

    before = listing()
    for overwrite in (False, True):
        with pytest.raises(tallpack.OutputError, match=f"^{folder}: is a folder; outputs are written as regular files"):
            tallpack.pack(small_family["base"], small_family["tasks"], folder, storage_options=opts, overwrite=overwrite)
        with tallpack.open(afile, storage_options=opts) as fam:
            for out in (afile, f"{afile}/sub"):
                for write in (lambda: tallpack.write_task(fam, "a", out, storage_options=opts, overwrite=overwrite),
                              lambda: tallpack.write_tasks(fam, ["a"], out, storage_options=opts, overwrite=overwrite),
                              lambda: tallpack.write_merged(fam, out, "ta", alpha=0.3, storage_options=opts,
                                                            overwrite=overwrite)):
                    with pytest.raises(tallpack.InvalidArgumentError, match=f"^{afile}: exists and is not a folder$"):
                        write()
    assert listing() == before
    # deeper: a kept file whose name is a folder at the URL
    fs.pipe("family/kinds/hf/config.json/note.txt", b"someone's")
    tallpack.pack(hf_family["base"], hf_family["tasks"], "s3://family/kinds/hf.tallpack", storage_options=opts)
    with tallpack.open("s3://family/kinds/hf.tallpack", storage_options=opts) as fam:
        with pytest.raises(tallpack.OutputError, match="^s3://family/kinds/hf/config.json: is a folder"):
            tallpack.write_task(fam, "dtd", "s3://family/kinds/hf", storage_options=opts, overwrite=True)
    fs.invalidate_cache()
    assert fs.find("family/kinds/hf") == ["family/kinds/hf/config.json/note.txt"]
    for url in (folder, "s3://family"):
        with pytest.raises(tallpack.FormatError, match=f"^{url}: is a directory, not a tallpack archive$"):
            tallpack.open(url, storage_options=opts)


def test_force_at_a_url_leaves_an_exact_unpacks_originals(s3, small_family, tmp_path):
    """As on a disk: at a URL, --force replaces a lossy output's model.safetensors when an exact
    unpack is written over it, but an exact unpack's a.safetensors (the original's bytes, which
    nothing tells from the file the task was packed from) stays."""
    fs, opts = s3
    packed = tmp_path / "e.tallpack"
    tasks = small_family["task_paths"]
    tallpack.pack(small_family["base_path"], {"a": tasks["a"], "b": tasks["b"]}, packed, exact=True)
    url = "s3://family/exact-then-lossy"
    with tallpack.open(packed) as fam:
        for i, (task, exact, expected) in enumerate([("a", True, ["a.safetensors"]),
                                                     ("a", False, ["a.safetensors", "model.safetensors"]),
                                                     ("b", True, ["a.safetensors", "b.safetensors"])]):
            tallpack.write_task(fam, task, url, exact=exact, storage_options=opts, overwrite=bool(i))
            fs.invalidate_cache()
            assert sorted(p.rsplit("/", 1)[1] for p in fs.ls(url.removeprefix("s3://"))) == expected
