"""Full disks and existing outputs (issue 12, class 5): outputs are staged under temporary names
and renamed when every file of the call is complete; existing files need --force / overwrite=True;
a full disk is one line and leaves nothing (no partial file, no half-written folder)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, safe_open, save_file

import tallpack
from conftest import RUN_CLI
from tallpack.errors import OutputExistsError
from tallpack.outputs import write_checkpoint
from tallpack_cli.main import main

ROOT = Path(tallpack.__file__).resolve().parents[1]


def cli(*args) -> tuple[int, str]:
    r = CliRunner().invoke(main, [str(a) for a in args])
    return r.exit_code, r.output


@pytest.fixture
def archive(small_family, tmp_path) -> Path:
    out = tmp_path / "f.tallpack"
    tallpack.pack(small_family["base"], small_family["tasks"], out, chunk_elements=256)
    return out


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else b"<dir>"
            for p in sorted(folder.rglob("*"))}


def test_pack_refuses_an_existing_archive_unless_overwrite(small_family, tmp_path):
    out = tmp_path / "f.tallpack"
    out.write_bytes(b"precious")
    with pytest.raises(OutputExistsError, match="already exists; pass --force"):
        tallpack.pack(small_family["base"], small_family["tasks"], out)
    assert out.read_bytes() == b"precious"
    tallpack.pack(small_family["base"], small_family["tasks"], out, overwrite=True)
    with tallpack.open(out) as fam:
        assert fam.verify() == []


def test_pack_with_force_never_replaces_one_of_its_inputs(small_family, hf_family, tmp_path):
    """--force replaces an old archive, not a checkpoint being packed: a task file, the base, a
    shard or a kept file of a folder, or a link to one, named as the output is refused, unchanged."""
    base, a = small_family["base_path"], small_family["task_paths"]["a"]
    folder = hf_family["tasks"]["cars"]
    shard = sorted(folder.glob("model-*.safetensors"))[0]
    (tmp_path / "link.safetensors").symlink_to(a)
    cases = [(["--task", f"a={a}"], a), (["--task", f"a={a}"], base), (["--task", f"a={a}"], tmp_path / "link.safetensors"),
             (["--task", f"cars={folder}"], shard), (["--task", f"cars={folder}"], folder / "config.json")]
    for tasks, out in cases:
        b = hf_family["base"] if "cars" in tasks[1] else base
        before = Path(out).read_bytes()
        r = CliRunner().invoke(main, ["-q", "pack", "--force", "--base", str(b), *tasks, "-o", str(out)])
        why = "is a symbolic link" if Path(out).is_symlink() else "is one of the files packed"  # refused either way
        assert r.exit_code == 1 and why in r.output, (out, r.output)
        assert len(r.output.strip().splitlines()) == 1 and Path(out).read_bytes() == before, out
    with pytest.raises(tallpack.InvalidArgumentError, match="is one of the files packed"):
        tallpack.pack(base, {"a": a}, a, overwrite=True)


def test_force_replaces_only_regular_files(small_family, archive, tmp_path):
    """--force replaces an old output, never a FIFO, a device or a link (the link's file would be
    left as it was); `-o /dev/null` is told so, not to add --force."""
    fifo, link, target = tmp_path / "fifo", tmp_path / "link.tallpack", tmp_path / "real.tallpack"
    os.mkfifo(fifo)
    target.write_bytes(b"old")
    link.symlink_to(target)
    base, tasks = small_family["base_path"], small_family["task_paths"]
    for out, what in ((fifo, "is a FIFO"), (link, "is a symbolic link")):
        code, text = cli("pack", "--base", base, "--task", tasks["a"], "-o", out, "--force")
        assert code == 1 and text.count("\n") == 1 and f"{out}: {what}" in text, text
        with pytest.raises(tallpack.OutputError, match=what):
            tallpack.pack(base, {"a": tasks["a"]}, out, overwrite=True)
    assert fifo.is_fifo() and link.is_symlink() and target.read_bytes() == b"old"
    for null in ("/dev/null", "file:///dev/null"):  # never with --force
        code, text = cli("pack", "--base", base, "--task", tasks["a"], "-o", null)
        assert code == 1 and "/dev/null: is a device" in text and "pass --force" not in text, text
    with pytest.raises(OutputExistsError):  # file:// checked before the work, as a path is
        tallpack.pack(base, {"a": tasks["a"]}, f"file://{target}")
    assert target.read_bytes() == b"old"
    out = tmp_path / "unpacked"
    out.mkdir()
    os.mkfifo(out / "model.safetensors")
    code, text = cli("unpack", archive, "--task", "a", "-o", out, "--force")
    assert code == 1 and "model.safetensors: is a FIFO" in text, text
    assert (out / "model.safetensors").is_fifo() and sorted(p.name for p in out.iterdir()) == ["model.safetensors"]


def test_unpack_and_merge_refuse_existing_outputs(archive, tmp_path):
    out = tmp_path / "a"
    assert cli("unpack", archive, "--task", "a", "-o", out)[0] == 0
    before = tree(out)
    code, text = cli("unpack", archive, "--task", "b", "-o", out)
    assert code == 1 and text.startswith("error: ") and "already exists; pass --force" in text
    assert text.count("\n") == 1 and tree(out) == before
    assert cli("unpack", archive, "--task", "b", "-o", out, "--force")[0] == 0
    assert load_file(out / "model.safetensors")["head.w"].shape[0] == 3  # task b's head

    m = tmp_path / "merged"
    assert cli("merge", archive, "--method", "ta", "-o", m)[0] == 0
    code, text = cli("merge", archive, "--method", "ta", "-o", m)
    assert code == 1 and "already exists" in text
    assert cli("merge", archive, "--method", "ta", "-o", m, "-f")[0] == 0
    with pytest.raises(OutputExistsError):
        tallpack.write_task(tallpack.open(archive), "a", out)


def test_unpack_all_is_all_or_nothing_when_one_output_exists(archive, tmp_path):
    out = tmp_path / "all"
    (out / "c").mkdir(parents=True)
    (out / "c" / "model.safetensors").write_bytes(b"someone's model")
    code, text = cli("unpack", archive, "--all", "-o", out)
    assert code == 1 and "c/model.safetensors: already exists" in text
    assert tree(out) == {"c": b"<dir>", "c/model.safetensors": b"someone's model"}  # a and b not written
    assert cli("unpack", archive, "--all", "-o", out, "--force")[0] == 0
    assert sorted(p.name for p in out.iterdir()) == ["a", "b", "c"]


def test_a_failure_half_way_through_unpack_all_leaves_nothing(archive, tmp_path, monkeypatch):
    out = tmp_path / "x" / "deep" / "all"
    calls = []
    real = tallpack.Archive.state_dict

    def failing(self, task, **kw):
        calls.append(task)
        if len(calls) == 3:
            raise tallpack.IntegrityError("simulated damage in the last task")
        return real(self, task, **kw)

    monkeypatch.setattr(tallpack.Archive, "state_dict", failing)
    code, text = cli("unpack", archive, "--all", "-o", out)
    assert code == 1 and "simulated damage" in text
    assert not (tmp_path / "x").exists()  # no folder, no temporary left


def test_our_safetensors_files_load_everywhere(tmp_path):
    g = torch.Generator().manual_seed(0)
    sd = {"z.f32": torch.randn(3, 4, generator=g), "a.bf16": torch.randn(5, generator=g).bfloat16(),
          "m.bool": torch.tensor([True, False, True]), "i.i64": torch.arange(7), "e.empty": torch.zeros(0, 2),
          "s.scalar": torch.tensor(2.5, dtype=torch.float64), "t.f16": torch.randn(2, 2, generator=g).half(),
          "nc": torch.randn(4, 3, generator=g).t(), "u8": torch.arange(5, dtype=torch.uint8)}
    path = write_checkpoint(sd, tmp_path / "o", metadata={"k": "v", "n": 3}, config={"model_type": "x"})
    back = load_file(path)
    assert set(back) == set(sd) and all(torch.equal(back[k], v) and back[k].dtype == v.dtype for k, v in sd.items())
    with safe_open(path, "pt") as f:
        assert f.metadata() == {"format": "pt", "k": "v", "n": "3"}  # "format" as transformers writes it
    assert json.loads((tmp_path / "o" / "config.json").read_text()) == {"model_type": "x"}
    ref = tmp_path / "ref.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, ref, metadata={"format": "pt", "k": "v", "n": "3"})
    assert path.stat().st_size == ref.stat().st_size


FULL = RUN_CLI + textwrap.dedent("""
    import json, resource, signal, sys
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
    limit, runs = int(sys.argv[1]), json.loads(sys.argv[2])
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    print(json.dumps([run_cli(args) for args in runs]))
""")


@pytest.fixture
def big_family(tmp_path) -> dict:
    """A family whose members are about 1 MB each, so a 300 KB file size limit stops every write."""
    g = torch.Generator().manual_seed(1)
    base = {"w": torch.randn(256, 1024, generator=g)}
    save_file(base, tmp_path / "base.safetensors")
    for t in "ab":
        save_file({"w": base["w"] + 0.01 * torch.randn(256, 1024, generator=g)}, tmp_path / f"{t}.safetensors")
    return {t: tmp_path / f"{t}.safetensors" for t in ("base", "a", "b")}


def test_a_full_disk_is_one_line_and_leaves_nothing(big_family, tmp_path):
    """pack, unpack --all and merge under a file size limit (RLIMIT_FSIZE, in a child process):
    one line each, exit 1, nothing left in the output folder."""
    archive = tmp_path / "f.tallpack"
    tallpack.pack(big_family["base"], {"a": big_family["a"], "b": big_family["b"]}, archive, codec="raw")
    out = tmp_path / "out"
    out.mkdir()
    runs = [["-q", "pack", "--base", big_family["base"], "--task", big_family["a"], "--task", big_family["b"],
             "--codec", "raw", "-o", out / "g.tallpack"],
            ["-q", "unpack", archive, "--all", "-o", out / "all"],  # -q: no progress lines, errors only
            ["-q", "merge", archive, "--method", "ta", "-o", out / "merged"]]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), *sys.path]))
    r = subprocess.run([sys.executable, "-c", FULL, "300000",
                        json.dumps([[str(a) for a in args] for args in runs])],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    for args, (code, stdout, stderr) in zip(runs, json.loads(r.stdout)):
        assert code == 1 and stdout == "", (args[0], stdout, stderr)
        assert stderr.count("\n") == 1 and stderr.startswith("error: "), stderr
        assert "file too large (a file size limit was reached) while writing" in stderr
        assert list(out.iterdir()) == [], args[0]


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc, where no file can be created")
def test_a_failed_write_names_the_file_asked_for_not_its_temporary(small_family):
    with pytest.raises(OSError) as e:
        tallpack.pack(small_family["base_path"], small_family["task_paths"], "/proc/x.tallpack")
    assert e.value.filename == "/proc/x.tallpack"
    r = CliRunner().invoke(main, ["-q", "pack", "--base", str(small_family["base_path"]),
                                  "--task", f"a={small_family['task_paths']['a']}", "-o", "/proc/x.tallpack"])
    assert r.exit_code != 0 and r.output.strip().startswith("error: /proc/x.tallpack: ") and ".partial" not in r.output


# -- folder files whose names cannot all be written; long names; large contents ----------------

def _folder_model(folder: Path, sd: dict, *, extra: dict[str, bytes]) -> Path:
    """A model folder of two shards and an index, as transformers writes one, plus ``extra`` files."""
    folder.mkdir(parents=True)
    keys = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": keys[:1], "model-00002-of-00002.safetensors": keys[1:]}
    for name, part in shards.items():
        save_file({k: sd[k] for k in part}, folder / name, metadata={"format": "pt"})
    index = {"metadata": {"total_size": 0}, "weight_map": {k: f for f, ks in shards.items() for k in ks}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    for name, data in extra.items():
        (folder / name).write_bytes(data)
    return folder


@pytest.fixture
def folder_archive(tmp_path) -> Path:
    """An archive of a folder family (shards, index, config.json, tokenizer.json) with one task."""
    g = torch.Generator().manual_seed(3)
    base = {"a.w": torch.randn(16, 8, generator=g), "b.w": torch.randn(32, generator=g)}
    task = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    extra = {"config.json": b'{"model_type": "x"}', "tokenizer.json": b'{"tok": 1}'}
    out = tmp_path / "fam.tallpack"
    tallpack.pack(_folder_model(tmp_path / "base", base, extra=extra),
                  {"cars": _folder_model(tmp_path / "cars", task, extra=extra)}, out)
    return out


def _add_names(archive: Path, names: list[str]) -> None:
    """Give task 'cars' more folder files, holding the content of its tokenizer.json."""
    from test_integrity import rewrite_manifest

    def edit(m):
        files = m["tasks"][0]["files"]
        files.update({name: files["tokenizer.json"] for name in names})
    rewrite_manifest(archive, edit)


@pytest.mark.parametrize("names, clash", [
    (["model.safetensors.index.json/x"], ("model.safetensors.index.json", "model.safetensors.index.json/x")),
    (["model-00002-of-00002.safetensors/x"], ("model-00002-of-00002.safetensors", "model-00002-of-00002.safetensors/x")),
    (["config.json/x"], ("config.json", "config.json/x")),
    (["zz", "zz/y/w"], ("zz", "zz/y/w")),
])
def test_a_file_name_that_is_the_folder_of_another_is_refused_before_anything_is_written(
        folder_archive, tmp_path, names, clash):
    """A kept file 'model.safetensors.index.json/x' (or 'zz' beside 'zz/y') could only be written by
    making a folder where a file goes: refused at once, one line naming the archive, the task and
    both names; no shard left behind, no false 'already exists' (the unpack used to leave the
    shards and say the index existed)."""
    _add_names(folder_archive, names)
    out = tmp_path / "o"
    with tallpack.open(folder_archive) as fam:
        with pytest.raises(tallpack.FormatError) as e:
            tallpack.write_task(fam, "cars", out)
        assert str(e.value) == (f"{fam.name}: task 'cars': files {clash[0]!r} and {clash[1]!r} cannot both be "
                                "written: the first would have to be the second's folder")
        assert not out.exists()
        out.mkdir()
        with pytest.raises(tallpack.FormatError):
            tallpack.write_task(fam, "cars", out, overwrite=True)
        assert list(out.iterdir()) == []
        with pytest.raises(tallpack.FormatError):
            tallpack.write_merged(fam, tmp_path / "m", "ta", alpha=0.5, task="cars")
    code, text = cli("unpack", folder_archive, "--all", "-o", tmp_path / "all")
    assert code == 1 and text.count("\n") == 1 and "cannot both be written" in text, text
    assert not (tmp_path / "all").exists()


def test_an_output_whose_last_rename_fails_is_undone(tmp_path):
    """The files of one output are renamed into place one after another: when a later rename fails
    (its folder moved away meanwhile), the earlier ones are undone, and a file they replaced comes
    back."""
    from tallpack.fsutil import atomic_write, make_folder, transaction

    def write(text):
        return lambda tmp: tmp.write_text(text)

    out = tmp_path / "o"
    out.mkdir()
    (out / "a.txt").write_text("old")
    for overwrite in (False, True):
        with pytest.raises(FileNotFoundError):
            with transaction(overwrite=overwrite):
                atomic_write(out / "new.txt", write("new"))
                if overwrite:
                    atomic_write(out / "a.txt", write("replaced"))
                atomic_write(make_folder(out / "sub") / "b.txt", write("b"))
                (out / "sub").rename(tmp_path / f"moved{overwrite}")
        assert tree(out) == {"a.txt": b"old"}


def test_an_output_checks_all_its_names_before_the_first_rename(tmp_path):
    """A name taken by someone else while the output was written (a file, or a folder with
    --force) stops the output before any of its files is renamed into place."""
    from tallpack.fsutil import atomic_write, transaction

    out = tmp_path / "o"
    out.mkdir()
    (out / "a.txt").write_text("old")
    for overwrite, taken in ((False, "file"), (True, "folder")):
        with pytest.raises(tallpack.OutputError, match="already exists" if taken == "file" else "is a folder"):
            with transaction(overwrite=overwrite):
                atomic_write(out / "a.txt" if overwrite else out / "new.txt", lambda tmp: tmp.write_text("new"))
                atomic_write(out / "z.txt", lambda tmp: tmp.write_text("z"))
                (out / "z.txt").mkdir() if taken == "folder" else (out / "z.txt").write_text("theirs")
        assert (out / "a.txt").read_text() == "old" and not (out / "new.txt").exists()
        (out / "z.txt").rmdir() if taken == "folder" else (out / "z.txt").unlink()


@pytest.mark.parametrize("name, why", [("a" * 256, "a component longer than 255 bytes"),
                                       ("é" * 128, "a component longer than 255 bytes"),
                                       ("a/" * 2048 + "b", "longer than 4096 bytes")],
                         ids=["256 bytes", "128 two-byte letters", "4097 bytes"])
def test_file_names_no_file_system_can_hold_are_refused_at_open(folder_archive, name, why):
    from tallpack.folders import check_file_name

    with pytest.raises(tallpack.FormatError, match=why):
        check_file_name(name)
    _add_names(folder_archive, [name])
    with pytest.raises(tallpack.FormatError, match=why):
        tallpack.open(folder_archive)


def test_long_names_that_fit_are_written_and_a_path_too_long_is_an_output_error(folder_archive, tmp_path):
    """A 255-byte name is written (its temporary's name is shortened to fit); a name that fits
    but makes the whole path too long for the file system is a TallpackError, not a bare OSError."""
    long_name, deep = "n" * 255, "d/" * 1900 + "x"
    _add_names(folder_archive, [long_name, deep])
    with tallpack.open(folder_archive) as fam:
        with pytest.raises(tallpack.OutputError, match="too long for the file system"):
            tallpack.write_task(fam, "cars", tmp_path / ("o" * 200) / ("o" * 200))
        assert not (tmp_path / ("o" * 200)).exists()
    rewrite = __import__("test_integrity").rewrite_manifest
    rewrite(folder_archive, lambda m: m["tasks"][0]["files"].pop(deep))
    with tallpack.open(folder_archive) as fam:
        tallpack.write_task(fam, "cars", tmp_path / "o")
        assert (tmp_path / "o" / long_name).read_bytes() == fam.read_file("tokenizer.json", "cars")
    assert not [p for p in (tmp_path / "o").iterdir() if p.name.endswith(".partial")]


BLOB = """
    import resource, sys, tallpack
    with tallpack.open(sys.argv[1]) as fam:
        tallpack.write_task(fam, "cars", sys.argv[2])
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def _add_blob(archive: Path, names: list[str], size: int, chunk: int) -> None:
    """Give task 'cars' the files ``names``, all holding one ``size``-byte content (zeros) stored in
    zstd chunks of ``chunk`` bytes: a few KB in the archive."""
    import hashlib
    import zlib

    import zstandard

    from tallpack.checksums import checksum_function
    from tallpack.container import FOOTER

    raw = archive.read_bytes()
    m_off, m_len, _, flags, end = FOOTER.unpack(raw[-FOOTER.size:])
    m = json.loads(zstandard.ZstdDecompressor().decompress(raw[m_off:m_off + m_len]))
    area = bytearray(raw[:m_off])
    frame = zstandard.ZstdCompressor(write_content_size=True).compress(bytes(chunk))
    cs = checksum_function(m.get("checksum", "crc32"))
    chunks = []
    for _ in range(size // chunk):
        area += b"\0" * (-len(area) % 64)
        chunks.append([len(area), len(frame), cs(frame)])
        area += frame
    area += b"\0" * (-len(area) % 64)
    digest = hashlib.sha256(bytes(size)).hexdigest()
    m["files"][digest] = {"dtype": "uint8", "shape": [size], "codecs": [{"id": "zstd", "level": 3}],
                          "chunk_elements": chunk, "chunks": chunks}
    m["tasks"][0]["files"].update({name: digest for name in names})
    stored = zstandard.ZstdCompressor().compress(json.dumps(m).encode())
    archive.write_bytes(bytes(area) + stored + FOOTER.pack(len(area), len(stored), zlib.crc32(stored), flags, end))


def test_a_large_folder_file_is_decoded_once_and_streamed_a_chunk_at_a_time(folder_archive, tmp_path):
    """A 96 MiB content (4 MiB chunks) held by three names: each name gets its bytes, and the
    unpack's peak memory grows by far less than the content (it held the file about three times
    over per name before, decoded once per name)."""
    plain = tmp_path / "plain.tallpack"
    plain.write_bytes(folder_archive.read_bytes())
    names = ["big.bin", "sub/big.bin", "again.bin"]
    _add_blob(folder_archive, names, 96 << 20, 4 << 20)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), *sys.path]))

    def peak_kib(archive, out):
        r = subprocess.run([sys.executable, "-c", textwrap.dedent(BLOB), str(archive), str(out)],
                           capture_output=True, text=True, env=env, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        return int(r.stdout)

    grown = peak_kib(folder_archive, tmp_path / "o") - peak_kib(plain, tmp_path / "p")
    for name in names:
        f = tmp_path / "o" / name
        assert f.stat().st_size == 96 << 20 and f.read_bytes() == bytes(96 << 20)
    assert grown < 48 << 10, f"peak memory grew by {grown} KiB for a 96 MiB file"


@pytest.mark.parametrize("codec", ["planes", "zstd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_an_empty_group_member_of_a_huge_shape_reads_as_an_empty_tensor(tmp_path, codec, dtype):
    """A group member of shape [0, 2**62] (no elements; numpy cannot hold the shape) comes back as
    an empty tensor of that shape from every read, as a tensor stored alone does (every read of
    the task failed with numpy's 'array is too big')."""
    from test_integrity import rewrite_manifest

    g = torch.Generator().manual_seed(5)
    base = {f"t{i}": torch.randn(4, 8, generator=g).to(dtype) for i in range(3)}
    fts = {t: {k: (v.float() + 0.05 * torch.randn(v.shape, generator=g)).to(dtype) for k, v in base.items()}
           for t in ("a", "b")}
    path = tmp_path / "g.tallpack"
    tallpack.pack(base, fts, path, codec=codec)
    shape = (0, 2**62)

    def edit(m):
        group = next(e for e in m["tensors"] if e.get("members") and e["kind"] == "merged")
        group["members"][0][2] = list(shape)
        edit.name = group["members"][0][0]
    rewrite_manifest(path, edit)
    with tallpack.open(path) as fam:
        for t in fts:
            sd, lazy = fam.state_dict(t), fam.state_dict(t, lazy=True)
            for got in (sd[edit.name], lazy[edit.name], fam.get_tensor(t, edit.name), fam.get_slice(t, edit.name)[:]):
                assert got.shape == shape and got.dtype == dtype
            assert fam.get_slice(t, edit.name).get_shape() == list(shape)
            assert all(torch.equal(sd[k], lazy[k]) for k in sd if k != edit.name)
        out = tallpack.write_task(fam, "a", tmp_path / "o")
        tallpack.write_merged(fam, tmp_path / "m", "ta", alpha=0.5)
    with safe_open(out, "pt") as f:
        assert f.get_slice(edit.name).get_shape() == list(shape)


def _work(fn) -> int:
    """How many function calls (Python's and C's) ``fn()`` makes: a measure of its work that,
    unlike time, does not depend on the machine."""
    count = 0

    def counter(frame, event, arg):
        nonlocal count
        count += event in ("call", "c_call")
    sys.setprofile(counter)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return count


def test_unpacking_many_kept_files_costs_in_proportion_to_their_number(folder_archive, tmp_path):
    """Each file of an output used to list its whole folder (for stale temporaries, full of this
    output's own) and search the files staged before it: 10,000 kept files took minutes. Four
    times the files is now about four times the work, not sixteen."""
    work = {}
    for n in (0, 100, 400):
        archive = tmp_path / f"{n}.tallpack"
        archive.write_bytes(folder_archive.read_bytes())
        _add_names(archive, [f"extra/f{i}" for i in range(n // 2)] + [f"f{i}" for i in range(n // 2)])
        with tallpack.open(archive) as fam:
            work[n] = _work(lambda: tallpack.write_task(fam, "cars", tmp_path / f"out{n}"))
        assert len(list((tmp_path / f"out{n}").rglob("f*"))) == n
        assert not list((tmp_path / f"out{n}").rglob("*.partial"))
    assert work[400] - work[0] < 5 * (work[100] - work[0]), work


def test_force_never_replaces_the_archive_being_read(small_family, tmp_path):
    """An output file that is the archive itself (an archive named dd/model.safetensors unpacked
    into dd, a plot named as the archive, a hard link to it) is refused before any work, with or
    without --force, one line naming it; the archive and the folder stay as they were. Pack
    already refused writing over its inputs."""
    pytest.importorskip("matplotlib")
    base, tasks = small_family["base_path"], small_family["task_paths"]
    packed = tmp_path / "f.tallpack"
    tallpack.pack(base, {"a": tasks["a"], "b": tasks["b"]}, packed, exact=True)
    dd = tmp_path / "dd"
    dd.mkdir()
    cases = {  # the archive's name -> the command that would write over it
        dd / "model.safetensors": [("unpack", "--task", "a", "-o", dd), ("merge", "--method", "ta", "-o", dd),
                                   ("merge", "--method", "ta", "--task", "a", "-o", dd)],
        dd / "a.safetensors": [("unpack", "--task", "a", "--exact", "-o", dd)],  # the original's name
        dd / "b" / "config.json": [("unpack", "--all", "-o", dd)],
        dd / "arch.png": [("stats", "--plot", dd / "arch.png")],
    }
    for name, commands in cases.items():
        name.parent.mkdir(exist_ok=True)
        name.write_bytes(packed.read_bytes())
        before = tree(dd)
        for command in commands:
            for force in ((), ("--force",)):
                code, text = cli("-q", command[0], name, *command[1:], *force)
                assert code == 1 and text == f"error: {name}: is the archive being read; write elsewhere\n", (command, text)
                assert tree(dd) == before, command
        name.unlink()
        if name.parent != dd:
            name.parent.rmdir()
    link = dd / "model.safetensors"
    os.link(packed, link)  # another name of the same file: compared by identity, not by name
    with tallpack.open(packed) as fam:
        for write in (lambda: tallpack.write_task(fam, "a", dd, overwrite=True),
                      lambda: tallpack.write_merged(fam, dd, "ta", alpha=0.3, overwrite=True)):
            with pytest.raises(tallpack.InvalidArgumentError, match=f"^{link}: is the archive being read .{packed}.; "):
                write()
    os.link(packed, dd / "plot.png")
    code, text = cli("-q", "stats", packed, "--plot", dd / "plot.png", "--force")
    assert code == 1 and text == f"error: {dd / 'plot.png'}: is the archive being read ({packed}); write elsewhere\n"
    assert tree(dd) == {"model.safetensors": packed.read_bytes(), "plot.png": packed.read_bytes()}
    with tallpack.open(link) as fam:
        assert fam.verify() == []


def test_force_leaves_an_exact_unpacks_originals_with_a_warning(small_family, tmp_path, caplog):
    """An exact unpack of a file task writes the original's name (a.safetensors), a lossy one
    model.safetensors. --force replaces a lossy output's layout (model.safetensors, shards, index)
    in either direction, but never a file of an original's name: its bytes are the original's, so
    nothing tells it from the checkpoint the task was packed from. It is left, with a warning."""
    tasks = small_family["task_paths"]
    packed = tmp_path / "e.tallpack"
    tallpack.pack(small_family["base_path"], {"a": tasks["a"], "b": tasks["b"]}, packed, exact=True)
    out = tmp_path / "u"
    steps = [("a", True, ["a.safetensors"], None),
             ("a", False, ["a.safetensors", "model.safetensors"], "left a.safetensors"),
             ("b", True, ["a.safetensors", "b.safetensors"], "left a.safetensors"),
             ("b", False, ["a.safetensors", "b.safetensors", "model.safetensors"], "left a.safetensors, b.safetensors")]
    with tallpack.open(packed) as fam:
        for i, (task, exact, expected, warned) in enumerate(steps):
            caplog.clear()
            tallpack.write_task(fam, task, out, exact=exact, overwrite=bool(i))
            assert sorted(p.name for p in out.iterdir()) == expected, (task, exact)
            assert (warned or "left ") in caplog.text if warned else "left " not in caplog.text


@pytest.mark.parametrize("exact", [False, True])
def test_force_never_removes_the_checkpoints_a_family_was_packed_from(tmp_path, exact):
    """A folder holding the original fine-tunes (cars.safetensors, dtd.safetensors), unpacked into
    with --force: only the files of a lossy output's layout go (model.safetensors, shards, index);
    files of the originals' names stay, with or without the exact tier, which writes the same
    bytes (the reviewer's find: both originals were deleted)."""
    import torch
    from safetensors.torch import save_file

    models = tmp_path / "models"
    models.mkdir()
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(32, 8, generator=g)}
    save_file(base, models / "base.safetensors")
    for t in ("cars", "dtd"):
        save_file({"w": base["w"] + 0.01 * torch.randn(32, 8, generator=g)}, models / f"{t}.safetensors")
    before = {p.name: p.read_bytes() for p in models.iterdir()}
    tallpack.pack(models / "base.safetensors", [models / "cars.safetensors", models / "dtd.safetensors"],
                  tmp_path / "f.tallpack", exact=exact)
    with tallpack.open(tmp_path / "f.tallpack") as fam:
        tallpack.write_task(fam, "cars", models, overwrite=True)
        tallpack.write_merged(fam, models, "ta", alpha=0.5, overwrite=True)
    after = {p.name: p.read_bytes() for p in models.iterdir()}
    assert all(after[n] == b for n, b in before.items()), sorted(after)


NOFILE_UNPACK = r"""
import resource, sys
resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[1]), int(sys.argv[1])))
from tallpack_cli import run
sys.argv = ["tallpack", "-q", *sys.argv[2:]]
run()
"""


def test_an_output_of_more_files_than_the_open_file_limit_is_written(tmp_path):
    """Every staged temporary kept its locked descriptor open until the renames, so a folder of
    more files than ``ulimit -n`` allows (1,024 on many machines: a repository with many files)
    failed with "Too many open files" naming a hidden temporary; past fsutil.HELD_LOCKS they are
    closed once written."""
    g = torch.Generator().manual_seed(3)
    base = {"a.w": torch.randn(16, 8, generator=g), "b.w": torch.randn(32, generator=g)}
    task = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    extra = {f"file{i:03d}.txt": f"{i}\n".encode() for i in range(300)}
    out = tmp_path / "many.tallpack"
    tallpack.pack(_folder_model(tmp_path / "base", base, extra={}),
                  {"cars": _folder_model(tmp_path / "cars", task, extra=extra)}, out)
    for args in (["unpack", str(out), "--task", "cars", "-o", str(tmp_path / "u")],
                 ["merge", str(out), "--task", "cars", "-o", str(tmp_path / "m")]):
        r = subprocess.run([sys.executable, "-c", NOFILE_UNPACK, "200", *args], capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
    written = tree(tmp_path / "u")
    assert all(written[name] == data for name, data in extra.items())
    assert not [p for p in (tmp_path / "u").iterdir() if p.name.endswith(".partial")]


class _Paused(dict):
    """A state dict whose last tensor waits for ``go``: its write is held open between the
    moment it planned its layout and its commit."""

    def __init__(self, tensors, go, reached):
        super().__init__(tensors)
        self.go, self.reached, self.last = go, reached, list(tensors)[-1]

    def __getitem__(self, key):
        if key == self.last:
            self.reached.set()
            assert self.go.wait(30)
        return super().__getitem__(key)


@pytest.mark.parametrize("first, second", [(None, "300B"), ("300B", None), ("200B", "600B")],
                         ids=["one file, then shards", "shards, then one file", "six shards, then two"])
def test_two_outputs_of_other_layouts_into_one_folder_leave_the_last_ones_files_alone(tmp_path, first, second):
    """Two writes with --force into one folder at once (two `unpack --force` of other tasks or
    shard sizes): the one that commits last leaves its own layout alone, whatever the other put
    there after it planned its own, never a mix of both (a model.safetensors beside another
    layout's index, or the shards of an index that was replaced)."""
    import threading

    out = tmp_path / "o"
    tensors = {f"w{i}": torch.full((16,), float(i)) for i in range(6)}
    go, reached = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def slow():
        try:
            write_checkpoint(_Paused(tensors, go, reached), out, max_shard_size=first, overwrite=True,
                             sizes={k: v.numel() * v.element_size() for k, v in tensors.items()})
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    t = threading.Thread(target=slow)
    t.start()
    assert reached.wait(30)  # the slow write has planned its layout, and waits before its commit
    write_checkpoint({k: v * 2 for k, v in tensors.items()}, out, max_shard_size=second, overwrite=True)
    go.set()
    t.join(30)
    assert not errors
    files = sorted(p.name for p in out.iterdir())
    if first is None:
        assert files == ["model.safetensors"]
    else:
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert files == sorted({*index["weight_map"].values(), "model.safetensors.index.json"})
    loaded = {}
    for f in files:
        if f.endswith(".safetensors"):
            loaded.update(load_file(out / f))
    assert sorted(loaded) == sorted(tensors) and all(torch.equal(loaded[k], tensors[k]) for k in tensors)


def test_an_outputs_commit_waits_for_another_commit_into_its_folder(tmp_path):
    """Commits into one folder take turns (a lock on the folder, held by any process): no output's
    renames interleave with another's."""
    import threading

    from tallpack.fsutil import folder_locks

    out = tmp_path / "o"
    out.mkdir()
    done = threading.Event()

    def write():
        write_checkpoint({"w": torch.ones(4)}, out, overwrite=True)
        done.set()

    with folder_locks([out]):
        t = threading.Thread(target=write)
        t.start()
        assert not done.wait(1.0)  # written, but not put in place while the folder is held
        assert not (out / "model.safetensors").exists()
    t.join(30)
    assert done.is_set() and torch.equal(load_file(out / "model.safetensors")["w"], torch.ones(4))


def test_an_exact_unpack_of_a_sharded_folder_names_its_index(hf_family, tmp_path):
    """`unpack --exact` of a sharded folder named its first shard in the result line, where the
    lossy unpack names the index."""
    out = tmp_path / "f.tallpack"
    tallpack.pack(hf_family["base"], {"cars": hf_family["tasks"]["cars"]}, out, exact=True)
    with tallpack.open(out) as fam:
        exact = tallpack.write_task(fam, "cars", tmp_path / "x", exact=True)
        lossy = tallpack.write_task(fam, "cars", tmp_path / "l")
    assert Path(exact).name == Path(lossy).name == "model.safetensors.index.json", (exact, lossy)


def test_an_output_into_a_folder_another_tool_holds_an_flock_on_is_written(tmp_path):
    """`flock OUT tallpack unpack ... -o OUT` (the shell's way to serialise jobs on a folder)
    hung for ever at the commit when tallpack locked the folder itself; its lock is elsewhere."""
    import fcntl
    import threading

    out = tmp_path / "o"
    out.mkdir()
    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        done = threading.Event()
        t = threading.Thread(target=lambda: (write_checkpoint({"w": torch.ones(4)}, out), done.set()), daemon=True)
        t.start()
        assert done.wait(60), "the write waited for the folder's flock"
    finally:
        os.close(fd)
    assert torch.equal(load_file(out / "model.safetensors")["w"], torch.ones(4))
