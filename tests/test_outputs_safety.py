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


FULL = """
    import contextlib, io, json, resource, signal, sys
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
    from tallpack_cli.main import main
    limit, runs = int(sys.argv[1]), json.loads(sys.argv[2])
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    results = []
    for args in runs:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main(args, prog_name="tallpack")
                code = 0
            except SystemExit as e:
                code = e.code
        results.append([code, out.getvalue(), err.getvalue()])
    print(json.dumps(results))
"""


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
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(FULL), "300000",
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
