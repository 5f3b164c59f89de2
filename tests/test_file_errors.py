"""What the file system says, said of the user's files: an unreadable input, a full temporary
folder under a URL's output or input, an archive path that cannot be opened, an output below a
file, an old index of another tool's, and the temporaries a killed writer left in a folder."""

from __future__ import annotations

import json
import gc
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import uuid
from pathlib import Path

import fsspec
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import tallpack
from tallpack import fsutil
from tallpack.errors import CheckpointError, InvalidArgumentError, OutputError, TallpackError
from tallpack.sharding import INDEX, SINGLE, weights_among

ROOT = Path(tallpack.__file__).resolve().parents[1]


def _family(folder: Path, numel: int = 64) -> tuple[Path, Path]:
    """A base and one task as safetensors files (4 float32 tensors of ``numel`` elements each)."""
    g = torch.Generator().manual_seed(0)
    base = {f"layer{i}.weight": torch.randn(numel, generator=g) for i in range(4)}
    task = {k: v + 0.01 * torch.randn(numel, generator=g) for k, v in base.items()}
    folder.mkdir(parents=True, exist_ok=True)
    save_file(base, folder / "base.safetensors")
    save_file(task, folder / "t.safetensors")
    return folder / "base.safetensors", folder / "t.safetensors"


@pytest.fixture
def archive(tmp_path) -> Path:
    base, task = _family(tmp_path / "fam")
    out = tmp_path / "fam.tallpack"
    tallpack.pack(base, {"t": task}, out)
    return out


def _one_line(e: BaseException) -> str:
    text = str(e)
    assert "\n" not in text and "Traceback" not in text
    return text


# -- an unreadable input or archive: "Permission denied", not "No such file" -----------------------

UNREADABLE = """
    import sys
    import tallpack
    folder, base, single, archive, out = sys.argv[1:]
    for what, call in [("folder", lambda: tallpack.pack(base, {"t": folder}, out + "1")),
                       ("file", lambda: tallpack.pack(base, {"t": single}, out + "2")),
                       ("archive", lambda: tallpack.open(archive))]:
        try:
            call()
            print(what, "no error")
        except tallpack.TallpackError as e:
            print(what, type(e).__name__, str(e).replace("\\n", " "))
        except Exception as e:
            print(what, "NOT A TALLPACK ERROR", type(e).__name__, e)
"""


def test_an_unreadable_shard_file_or_archive_says_permission_denied(tmp_path, archive):
    """Run as root, permissions apply only without CAP_DAC_OVERRIDE: the child drops it."""
    base, task = _family(tmp_path / "in")
    folder = tmp_path / "in" / "hf"
    folder.mkdir()
    sd = load_file(task)
    keys = sorted(sd)
    save_file({k: sd[k] for k in keys[:2]}, folder / "model-00001-of-00002.safetensors")
    save_file({k: sd[k] for k in keys[2:]}, folder / "model-00002-of-00002.safetensors")
    (folder / INDEX).write_text(json.dumps({"weight_map": {k: f"model-0000{1 + (i >= 2)}-of-00002.safetensors"
                                                           for i, k in enumerate(keys)}}))
    shard = folder / "model-00002-of-00002.safetensors"
    for p in (shard, task, archive):
        p.chmod(0)
    prefix = ["setpriv", "--bounding-set=-all", "--inh-caps=-all"] if os.geteuid() == 0 else []
    if prefix and shutil.which("setpriv") is None:
        pytest.skip("setpriv is needed to drop root's permission override")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([*prefix, sys.executable, "-c", textwrap.dedent(UNREADABLE), str(folder), str(base),
                        str(task), str(archive), str(tmp_path / "out.tallpack")],
                       capture_output=True, text=True, env=env, timeout=300)
    if r.returncode != 0 and "setpriv" in r.stderr:
        pytest.skip(f"cannot drop capabilities here: {r.stderr.strip()}")
    lines = dict(line.split(" ", 1) for line in r.stdout.splitlines())
    assert lines["folder"] == f"CheckpointError {shard}: Permission denied", r.stdout + r.stderr
    assert lines["file"] == f"CheckpointError {task}: Permission denied", r.stdout + r.stderr
    assert lines["archive"].startswith("TallpackError ") and str(archive) in lines["archive"]
    assert "Permission denied" in lines["archive"]
    assert not list(tmp_path.glob("out.tallpack*"))


# -- a full $TMPDIR under a URL's output or input ------------------------------------------------

@pytest.fixture
def small_tmpdir(tmp_path, monkeypatch) -> Path:
    """A 128 KB file system as the temporary folder (skipped where mounting is not permitted)."""
    small = tmp_path / "small"
    small.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=128k", "tmpfs", str(small)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs: {r.stderr.decode().strip()}")
    monkeypatch.setattr(tempfile, "tempdir", str(small))
    try:
        yield small
    finally:
        gc.collect()  # (a failed download's temporary, held by a cycle through its error: fsspec 2023.1)
        if subprocess.run(["umount", str(small)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(small)], check=True)  # never left mounted


@pytest.fixture
def memory_root():
    root = f"/tallpack-test-{uuid.uuid4().hex}"
    yield root
    fs = fsspec.filesystem("memory")
    if fs.exists(root):
        fs.rm(root, recursive=True)


def test_a_full_tmpdir_under_a_url_output_names_the_url_and_the_folder(tmp_path, small_tmpdir, memory_root):
    base, task = _family(tmp_path / "fam", numel=64 << 10)  # 256 KB per tensor: more than the folder holds
    url = f"memory://{memory_root}/a.tallpack"
    with pytest.raises(OutputError) as info:
        tallpack.pack(base, {"t": task}, url)
    text = _one_line(info.value)
    assert text.startswith(f"{url}: no space left on device in the temporary folder {small_tmpdir} ($TMPDIR)")
    assert "tallpack-stage-" not in text and "try again" not in text
    assert list(small_tmpdir.iterdir()) == [] and not fsspec.filesystem("memory").exists(f"{memory_root}/a.tallpack")


@pytest.fixture
def big_archive(tmp_path) -> Path:
    """An archive of a 1 MB task (packed before the temporary folder is made small)."""
    base, task = _family(tmp_path / "big", numel=64 << 10)
    tallpack.pack(base, {"t": task}, tmp_path / "big.tallpack")
    return tmp_path / "big.tallpack"


def test_a_url_output_folder_too_large_for_tmpdir_names_the_url(big_archive, small_tmpdir, memory_root):
    url = f"memory://{memory_root}/t"
    with tallpack.open(big_archive) as fam, pytest.raises(OutputError) as info:
        tallpack.write_task(fam, "t", url)
    assert _one_line(info.value).startswith(f"{url}: no space left on device in the temporary folder {small_tmpdir}")
    assert list(small_tmpdir.iterdir()) == []


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_a_url_input_too_large_for_tmpdir_says_so_not_try_again(tmp_path, small_tmpdir, memory_root, kind):
    base, task = _family(tmp_path / "fam", numel=64 << 10)
    fs = fsspec.filesystem("memory")
    fs.put(str(base), f"{memory_root}/base.safetensors")
    if kind == "file":
        fs.put(str(task), f"{memory_root}/t.safetensors")
        url = f"memory://{memory_root}/t.safetensors"
    else:
        fs.put(str(task), f"{memory_root}/t/model.safetensors")
        url = f"memory://{memory_root}/t/model.safetensors"
    with pytest.raises(CheckpointError) as info:
        tallpack.pack(tmp_path / "fam" / "base.safetensors",
                      {"t": url if kind == "file" else f"memory://{memory_root}/t"}, tmp_path / "out.tallpack")
    text = _one_line(info.value)
    assert text.startswith(f"{url}: cannot download: no space left on device in the temporary folder "
                           f"{small_tmpdir} ($TMPDIR)")
    assert "try again" not in text and "broke off" not in text
    assert list(small_tmpdir.iterdir()) == [] and not (tmp_path / "out.tallpack").exists()


# -- an archive path that cannot be opened -------------------------------------------------------

def test_an_archive_path_that_cannot_be_opened_is_a_tallpack_error(tmp_path, archive):
    loop = tmp_path / "loop.tallpack"
    loop.symlink_to(loop)
    long_name = tmp_path / ("x" * 300 + ".tallpack")
    through = archive / "inner.tallpack"
    for path, says in [(loop, f"{loop}: cannot open the archive (Too many levels of symbolic links)"),
                       (through, f"{through}: no such archive ({archive} is a file, not a folder)"),
                       (long_name, "cannot open the archive: the path is too long for the file system"),
                       (f"{archive}/", f"{archive}/: no such archive ({archive} is a file, not a folder)")]:
        with pytest.raises(TallpackError) as info:
            tallpack.open(path)
        text = _one_line(info.value)
        assert says in text and len(text) < 500


# -- an output below a regular file --------------------------------------------------------------

def test_an_output_below_a_file_says_the_file_is_not_a_folder(tmp_path, archive):
    afile = tmp_path / "afile"
    afile.write_text("hi\n")
    base, task = _family(tmp_path / "fam2")
    with tallpack.open(archive) as fam:
        for call, out in [(lambda o: tallpack.write_task(fam, "t", o), afile / "sub"),
                          (lambda o: tallpack.write_merged(fam, o), afile / "sub" / "deeper"),
                          (lambda o: tallpack.write_tasks(fam, None, o), afile / "all"),
                          (lambda o: tallpack.pack(base, {"t": task}, o), afile / "x.tallpack")]:
            with pytest.raises(InvalidArgumentError) as info:
                call(out)
            assert _one_line(info.value).startswith(f"{afile}: is a file, not a folder (it is above the output {out}")
    assert afile.read_text() == "hi\n" and sorted(p.name for p in tmp_path.iterdir()) == [
        "afile", "fam", "fam.tallpack", "fam2"]


# -- an output that cannot be written: refused before any input is read ------------------------------

@pytest.mark.parametrize("how", ["ta", "ties", "evaluate"])
def test_a_missing_output_folder_is_refused_before_any_input_is_read(tmp_path, caplog, how):
    """TIES' thresholds and an evaluator's lambda selection read the whole family before the
    archive is opened: a mistyped output folder was reported only after them (minutes to hours)."""
    base, task = _family(tmp_path / "fam")
    scored: list[str] = []
    options = {"ta": {}, "ties": {"merge": "ties"},
               "evaluate": {"evaluate": lambda t, sd: scored.append(t) or 1.0}}[how]
    out = tmp_path / "missing" / "x.tallpack"
    with caplog.at_level("INFO", logger="tallpack"), pytest.raises(InvalidArgumentError) as info:
        tallpack.pack(base, {"t": task}, out, **options)
    assert _one_line(info.value) == f"{out.parent}: output folder does not exist"
    assert scored == [] and not [r for r in caplog.records if "thresholds" in r.getMessage()]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fam"]


@pytest.mark.parametrize("name", ["newdir/", "newdir//", "newdir/.", "newdir/..", ".", "newdir" + os.sep])
def test_an_archive_name_that_ends_as_a_folder_is_refused(tmp_path, name):
    """``-o newdir/`` wrote a regular file named ``newdir`` (``Path`` drops the ``/``)."""
    base, task = _family(tmp_path / "fam")
    (tmp_path / "w").mkdir()
    out = f"{tmp_path / 'w'}/{name}"
    with pytest.raises(InvalidArgumentError) as info:
        tallpack.pack(base, {"t": task}, out)
    inside = out if out.endswith(("/", os.sep)) else out + "/"
    assert _one_line(info.value) == f"{out}: names a folder; give the archive's file name, e.g. {inside}family.tallpack"
    assert list((tmp_path / "w").iterdir()) == []


def test_a_url_or_plot_name_that_ends_as_a_folder_is_refused(tmp_path, archive, memory_root):
    """The same for an archive at a URL (an object ``x`` was uploaded) and ``stats --plot x.png/``."""
    from click.testing import CliRunner
    from tallpack_cli.main import main

    base, task = _family(tmp_path / "fam2")
    with pytest.raises(InvalidArgumentError, match="names a folder; give the archive's file name"):
        tallpack.pack(base, {"t": task}, f"memory://{memory_root}/x/")
    assert not fsspec.filesystem("memory").exists(memory_root)
    result = CliRunner().invoke(main, ["stats", str(archive), "--plot", str(tmp_path / "x.png") + "/"])
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1] == (f"error: {tmp_path}/x.png/: names a folder; give the plot's file "
                                                      f"name, e.g. {tmp_path}/x.png/stats.png")
    assert not (tmp_path / "x.png").exists()


# -- an old index that is not ours -----------------------------------------------------------------

_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                     max_leaves=10)


@settings(max_examples=200, deadline=None)
@given(weight_map=st.dictionaries(st.text(max_size=5), _JSON, max_size=4))
def test_any_old_index_json_is_judged_without_crashing(weight_map):
    """An index naming its shards by strings is ours (the shards it names are an earlier write's);
    any other JSON in it is not, and names nothing."""
    weight_map = {**weight_map, "kept": "x.safetensors"}
    files = {INDEX: json.dumps({"weight_map": weight_map}).encode(), "x.safetensors": b""}
    found = weights_among({INDEX}, files.__getitem__, files.__contains__)
    strings = all(isinstance(v, str) for v in weight_map.values())
    assert found == ({INDEX, "x.safetensors"} if strings else {INDEX})


@pytest.mark.parametrize("index", ['{"weight_map": {"a": ["model.safetensors"]}}',
                                   '{"weight_map": {"a": {"x": 1}, "b": "keep.safetensors"}}',
                                   "[" * 200_000], ids=["list", "dict", "deep"])
def test_an_old_index_that_is_not_ours_is_replaced_and_names_nothing(tmp_path, archive, index):
    out = tmp_path / "out"
    out.mkdir()
    (out / INDEX).write_text(index)
    (out / "keep.safetensors").write_bytes(b"not ours")
    with tallpack.open(archive) as fam:
        tallpack.write_task(fam, "t", out, overwrite=True)
        tallpack.write_merged(fam, out, overwrite=True)
        url = f"memory:///tallpack-test-{uuid.uuid4().hex}/t"
        fs = fsspec.filesystem("memory")
        fs.pipe(url.removeprefix("memory://") + f"/{INDEX}", index.encode())
        fs.pipe(url.removeprefix("memory://") + "/keep.safetensors", b"not ours")
        try:
            tallpack.write_task(fam, "t", url, overwrite=True)
            assert fs.cat_file(url.removeprefix("memory://") + "/keep.safetensors") == b"not ours"
            assert fs.isfile(url.removeprefix("memory://") + f"/{SINGLE}")
        finally:
            fs.rm(url.removeprefix("memory://"), recursive=True)
    assert sorted(p.name for p in out.iterdir()) == ["keep.safetensors", SINGLE]
    assert (out / "keep.safetensors").read_bytes() == b"not ours"


# -- temporaries a killed writer left, of other names ----------------------------------------------

KILLED = """
    import os, sys
    from pathlib import Path
    from tallpack.fsutil import temp_beside
    for name in sys.argv[2:]:
        fd, tmp = temp_beside(Path(sys.argv[1]) / name)
        os.write(fd, b"x" * 1000)
    os.kill(os.getpid(), 9)
"""

HOLDING = """
    import os, sys
    from pathlib import Path
    from tallpack.fsutil import temp_beside
    fd, tmp = temp_beside(Path(sys.argv[1]))
    print(tmp, flush=True)
    sys.stdin.read()
"""


def _python(code: str, *args: str, **kw) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], env=env, text=True, **kw)


def _partials(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".partial"))


@pytest.mark.parametrize("max_shard_size", [None, "300B"])
def test_a_killed_writers_temporaries_go_with_the_next_write_of_another_layout(tmp_path, archive, max_shard_size,
                                                                               caplog):
    out = tmp_path / "out"
    out.mkdir()
    live = _python(HOLDING, str(out / "other.bin"), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    theirs = Path(live.stdout.readline().strip())  # a live writer of another name: never touched
    try:
        shards = [f"model-0000{i}-of-00009.safetensors" for i in range(1, 10)]  # a layout the new write has not
        assert _python(KILLED, str(out), *shards).wait() == -9
        assert len(_partials(out)) == 10
        with tallpack.open(archive) as fam, caplog.at_level("WARNING", logger="tallpack"):
            tallpack.write_task(fam, "t", out, max_shard_size=max_shard_size, overwrite=True)
        assert _partials(out) == [theirs.name]
        stale = [r.getMessage() for r in caplog.records if "stale temporary" in r.getMessage()]
        assert len(stale) == 1 and f"{out}: removed 9 stale temporary files" in stale[0], stale  # one line
    finally:
        live.stdin.close()
        live.wait()
    assert (out / (SINGLE if max_shard_size is None else INDEX)).is_file()
    assert fsutil.remove_stale_temporaries(out / "anything") == [theirs] and _partials(out) == []
