"""Round 36, helper H: ``tallpack`` as shell scripts, Makefiles and CI jobs use it. Exit statuses
per failure kind, stdout that holds only data, ``-`` where a script would write it, output cut
short under ``PYTHONUNBUFFERED=1`` (Docker's and CI's usual setting), byte-identical archives from
two runs, file modes that follow the umask, and paths with spaces, non-ASCII letters and links.
Through click's runner and through real ``tallpack`` processes, on files written by safetensors,
torch.save and transformers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from tallpack_cli.main import main


def _cli(*args: object) -> subprocess.CompletedProcess:
    """``python -m tallpack ARGS`` in a fresh process (this test's ``tallpack_cli`` and its environment)."""
    return subprocess.run([sys.executable, "-m", "tallpack", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})


def _invoke(*args: object, cwd: Path | None = None):
    """``tallpack ARGS`` through click's runner, in ``cwd`` when given."""
    runner = CliRunner()
    if cwd is None:
        return runner.invoke(main, list(map(str, args)))
    old = Path.cwd()
    os.chdir(cwd)
    try:
        return runner.invoke(main, list(map(str, args)))
    finally:
        os.chdir(old)


@pytest.fixture
def family(small_family) -> dict:
    """small_family's safetensors files plus a task saved by torch.save (a name with a space)."""
    d = small_family["dir"]
    sd = {k: v.clone() for k, v in small_family["base"].items()}
    sd["body.w"] = sd["body.w"] + 0.03
    torch.save(sd, d / "pt task.pt")
    return {**small_family, "pt": d / "pt task.pt"}


@pytest.fixture
def packed(family, tmp_path) -> Path:
    out = tmp_path / "family.tallpack"
    r = _invoke("-q", "pack", "--base", family["base_path"], "-o", out, family["task_paths"]["a"],
                family["task_paths"]["b"], family["pt"])
    assert r.exit_code == 0, r.output + r.stderr
    return out


# -- 1. '-' as a path: a script's way to say stdin/stdout --------------------------------------------------------

_DASH_COMMANDS = {
    "pack -o -": lambda a, f: ["pack", "--base", f["base_path"], "-o", "-", f["task_paths"]["a"]],
    "unpack -o -": lambda a, f: ["unpack", a, "--all", "-o", "-"],
    "merge -o -": lambda a, f: ["merge", a, "-o", "-"],
    "stats --plot -": lambda a, f: ["stats", a, "--plot", "-"],
    "inspect -": lambda a, f: ["inspect", "-"],
    "verify -": lambda a, f: ["verify", "-"],
    "unpack - ": lambda a, f: ["unpack", "-", "--all", "-o", "out"],
}


@pytest.mark.parametrize("what", list(_DASH_COMMANDS))
def test_dash_for_stdin_or_stdout_is_a_usage_error_and_writes_nothing(what, packed, family, tmp_path):
    """``tallpack pack ... -o - | aws s3 cp - s3://...`` is how a script streams; tallpack writes
    files by name only. Before: a file (pack) or folder (unpack, merge) named ``-`` in the working
    directory, exit 0, and the upload of nothing. Now: exit 2 before any work, saying so."""
    work = tmp_path / "work"
    work.mkdir()
    r = _invoke(*_DASH_COMMANDS[what](packed, family), cwd=work)
    assert r.exit_code == 2, (r.exit_code, r.output, r.stderr)
    assert "'-'" in r.stderr and "not supported" in r.stderr, r.stderr
    assert list(work.iterdir()) == [], list(work.iterdir())


def test_dot_slash_dash_is_still_a_file_named_dash(packed, tmp_path):
    """The way out the refusal names: ``./-`` is an ordinary path."""
    shutil.copyfile(packed, tmp_path / "-")
    r = _invoke("verify", "./-", cwd=tmp_path)
    assert r.exit_code == 0, r.output + r.stderr


# -- 2. output cut short under PYTHONUNBUFFERED=1 ----------------------------------------------------------------

def _many_tensors(tmp_path: Path) -> Path:
    """An archive whose ``inspect --tensors`` table is ~150 KB: over a pipe's 64 KiB."""
    g = torch.Generator().manual_seed(3)
    base = {f"layer.{i}.w": torch.randn(4, 4, generator=g) for i in range(1500)}
    save_file(base, tmp_path / "base.safetensors")
    for t in "pq":
        save_file({k: v + 0.01 * torch.randn(4, 4, generator=g) for k, v in base.items()}, tmp_path / f"{t}.safetensors")
    out = tmp_path / "many.tallpack"
    r = _invoke("-q", "pack", "--base", tmp_path / "base.safetensors", "-o", out, tmp_path / "p.safetensors",
                tmp_path / "q.safetensors")
    assert r.exit_code == 0, r.output + r.stderr
    return out


@pytest.mark.parametrize("unbuffered", [
    pytest.param(False, id="buffered"),
    pytest.param(True, id="PYTHONUNBUFFERED=1"),
])
def test_reader_gone_mid_output_exits_141_with_or_without_pythonunbuffered(unbuffered, tmp_path):
    """``tallpack inspect X --tensors | head -1`` with ``set -o pipefail``: the documented 141, no
    traceback, whether or not the job's environment sets ``PYTHONUNBUFFERED=1`` (Dockerfiles,
    GitHub Actions). The reader takes the first line after the command began to write, then leaves:
    the write in progress is cut short, the case test_leads_r33's (a reader gone before the first
    write) does not reach."""
    arch = _many_tensors(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    if unbuffered:
        env["PYTHONUNBUFFERED"] = "1"
    p = subprocess.Popen([sys.executable, "-m", "tallpack", "inspect", str(arch), "--tensors"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert b"many.tallpack: tallpack format" in p.stdout.readline()
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 141, (p.returncode, err)
    assert "Traceback" not in err and "error" not in err.lower(), err


# -- 3. reproducible archives ------------------------------------------------------------------------------------

def test_two_packs_give_byte_identical_archives(family, tmp_path):
    """A Makefile's rebuild, or a nightly job's, changes no byte when its inputs have not: no
    timestamp or order from the run. With --no-paths also from another working directory (paths
    are recorded as given, for provenance, by default)."""
    d = family["dir"]
    args = ["-q", "pack", "--base", "base.safetensors", "a.safetensors", "b.safetensors", "pt task.pt"]
    assert _invoke(*args, "-o", tmp_path / "one.tallpack", cwd=d).exit_code == 0
    assert _invoke(*args, "-o", tmp_path / "two.tallpack", cwd=d).exit_code == 0
    assert (tmp_path / "one.tallpack").read_bytes() == (tmp_path / "two.tallpack").read_bytes()

    sub = d / "sub"
    sub.mkdir()
    files = ["base.safetensors", "a.safetensors", "b.safetensors", "pt task.pt"]
    here = ["-q", "pack", "--no-paths", "-o", tmp_path / "n1.tallpack", "--base", *files]
    up = ["-q", "pack", "--no-paths", "-o", tmp_path / "n2.tallpack", "--base", *(f"../{f}" for f in files)]
    assert _invoke(*here, cwd=d).exit_code == 0
    assert _invoke(*up, cwd=sub).exit_code == 0
    assert (tmp_path / "n1.tallpack").read_bytes() == (tmp_path / "n2.tallpack").read_bytes()


# -- 4. file modes follow the umask ------------------------------------------------------------------------------

@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_outputs_take_the_umask_not_a_temporary_files_0600(umask, packed, tmp_path):
    """Archives and folders written under a temporary name and renamed keep the modes a plain
    ``open`` would give (a web server or another CI user reads them), not mkstemp's 0600."""
    old = os.umask(umask)
    try:
        assert _invoke("-q", "pack", "-f", "--base", tmp_path / "base.safetensors", "-o", tmp_path / "m.tallpack",
                       tmp_path / "a.safetensors").exit_code == 0
        assert _invoke("-q", "unpack", packed, "--all", "-o", tmp_path / "u").exit_code == 0
        assert _invoke("-q", "merge", packed, "-o", tmp_path / "g").exit_code == 0
    finally:
        os.umask(old)
    assert (tmp_path / "m.tallpack").stat().st_mode & 0o777 == 0o666 & ~umask
    for f in [*(tmp_path / "u").rglob("*"), *(tmp_path / "g").rglob("*"), tmp_path / "u", tmp_path / "g"]:
        want = (0o777 if f.is_dir() else 0o666) & ~umask
        assert f.stat().st_mode & 0o777 == want, (f, oct(f.stat().st_mode))


# -- 5. stdout is data, stderr the rest; exit statuses per failure kind -----------------------------------------

def test_json_on_stdout_is_one_object_even_with_vv_and_stderr_has_no_colour(packed):
    """``tallpack -vv inspect X --json | jq``: logs and progress on stderr, no escape codes there
    when it is no terminal; stdout parses whole."""
    for cmd in (["inspect", packed, "--json"], ["stats", packed, "--json"], ["inspect", packed, "--json", "--tensors"]):
        r = _cli("-vv", *cmd)
        assert r.returncode == 0, r.stderr
        assert isinstance(json.loads(r.stdout), dict)
        assert "\x1b[" not in r.stderr and "\r" not in r.stderr, r.stderr


def test_exit_status_per_failure_kind_is_the_same_across_subcommands(packed, tmp_path):
    """0 done, 1 an error (missing or damaged archive, output that exists), 2 a usage error: what
    ``set -e`` and a CI step test. Errors are one line on stderr, nothing on stdout."""
    missing = tmp_path / "nope.tallpack"
    for cmd in (["inspect", missing], ["verify", missing], ["stats", missing], ["unpack", missing, "--all", "-o",
                tmp_path / "x"], ["merge", missing, "-o", tmp_path / "y"]):
        r = _invoke(*cmd)
        assert r.exit_code == 1 and r.stdout == "" and r.stderr.count("\n") == 1, (cmd, r.exit_code, r.output, r.stderr)
    for cmd in (["inspect", packed, "--nope"], ["verify"], ["unpack", packed, "--all"], ["merge", packed, "--k", "-1",
                "-o", tmp_path / "z"]):
        r = _invoke(*cmd)
        assert r.exit_code == 2 and r.stdout == "", (cmd, r.exit_code, r.stdout, r.stderr)

    damaged = tmp_path / "damaged.tallpack"
    data = bytearray(packed.read_bytes())
    data[len(data) // 3] ^= 0xFF
    damaged.write_bytes(bytes(data))
    r = _invoke("verify", damaged)
    assert r.exit_code == 1 and r.stdout == "" and "checksum mismatch" in r.stderr, (r.exit_code, r.output, r.stderr)

    again = ["-q", "pack", "--base", tmp_path / "base.safetensors", "-o", packed, tmp_path / "a.safetensors"]
    before = packed.read_bytes()
    r = _invoke(*again)
    assert r.exit_code == 1 and "exists" in r.stderr and packed.read_bytes() == before, (r.exit_code, r.stderr)
    assert _invoke(*again[:1], again[1], "-f", *again[2:]).exit_code == 0


# -- 6. a transformers folder through paths with spaces, non-ASCII letters and a link -----------------------------

def test_hf_folders_under_spaces_unicode_and_a_link_pack_unpack_verify_after_copy(hf_family, tmp_path):
    """save_pretrained folders under 'my models/ünï cödé', reached through a symlinked folder and
    relative paths, packed and unpacked by the real command; the archive copied elsewhere verifies."""
    home = tmp_path / "my models" / "ünï cödé"
    home.mkdir(parents=True)
    for name in ("base", "cars", "dtd"):
        shutil.copytree(hf_family["root"] / name, home / name)
    (tmp_path / "link to models").symlink_to(home, target_is_directory=True)
    work = tmp_path / "work dir"
    work.mkdir()
    r = subprocess.run([sys.executable, "-m", "tallpack", "-q", "pack", "--base", "../link to models/base",
                        "-o", "fam ily.tallpack", "../link to models/cars", "../link to models/dtd"],
                       cwd=work, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("wrote fam ily.tallpack: 2 tasks"), r.stdout
    copy = tmp_path / "ćopy" / "fam ily.tallpack"
    copy.parent.mkdir()
    shutil.copy2(work / "fam ily.tallpack", copy)
    r = _cli("verify", copy)
    assert r.returncode == 0 and r.stdout.startswith("ok: "), (r.stdout, r.stderr)
    r = _cli("-q", "unpack", copy, "--task", "dtd", "-o", tmp_path / "out dir" / "dtd ñ")
    assert r.returncode == 0, r.stderr
    out = tmp_path / "out dir" / "dtd ñ"
    assert (out / "config.json").read_bytes() == (home / "dtd" / "config.json").read_bytes()
    assert (out / "model.safetensors.index.json").exists()
