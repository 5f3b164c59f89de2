"""Outputs under hostile conditions (twenty-sixth round): a disk that fills up at the last page, a
folder made read-only while an output is written. Real files, a real tmpfs where the test may mount
one (root), a real permission refusal (root's override dropped in a child with ``setpriv``)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import tallpack

ROOT = Path(tallpack.__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "tallpack"]


def _env() -> dict[str, str]:
    path = os.pathsep.join([str(ROOT), str(ROOT / "cli"), os.environ.get("PYTHONPATH", "")])
    return dict(os.environ, PYTHONPATH=path)


def _family(folder: Path, tasks: int = 2, n: int = 1 << 16) -> tuple[Path, list[Path]]:
    g = torch.Generator().manual_seed(0)
    base = {f"l{i}.w": torch.randn(n, generator=g) for i in range(3)}
    folder.mkdir(parents=True, exist_ok=True)
    save_file(base, folder / "base.safetensors")
    paths = []
    for t in range(tasks):
        ft = {k: v + (torch.rand(n, generator=g) < 0.2) * torch.randn(n, generator=g) * 0.01 for k, v in base.items()}
        paths.append(folder / f"t{t}.safetensors")
        save_file(ft, paths[-1])
    return folder / "base.safetensors", paths


def _everything(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# -- a disk that fills up --------------------------------------------------------------------------

@pytest.fixture
def small_tmpfs(tmp_path):
    """Mount a tmpfs of a chosen size (a callable taking bytes); skips where mounting is not allowed."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    mounted: list[Path] = []

    def mount(size: int) -> Path:
        where = tmp_path / f"fs{len(mounted)}"
        where.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", str(where)], check=False)


def test_a_disk_full_at_the_archives_last_page_leaves_no_temporary(tmp_path, small_tmpfs):
    """The manifest and footer are the last, buffered writes: their ENOSPC came again when the
    writer's abort closed the file, before it removed the temporary (a `.partial` beside the target,
    found by filling a tmpfs to 1 byte to 16 KB short of the archive)."""
    base, tasks = _family(tmp_path / "fam")
    args = ["pack", "--base", str(base), *map(str, tasks)]
    subprocess.run([*CLI, "-q", *args, "-o", str(tmp_path / "a.tallpack")], env=_env(), check=True)
    size = (tmp_path / "a.tallpack").stat().st_size
    pages = -(-size // 4096)
    disk = small_tmpfs((pages - 1) * 4096)  # one page short: the last write fails
    r = subprocess.run([*CLI, *args, "--no-progress", "-o", str(disk / "a.tallpack")], env=_env(),
                       capture_output=True, text=True)
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip().splitlines() == [
        f"error: {disk / 'a.tallpack'}: no space left on device while writing (nothing was written under that name)"]
    assert _everything(disk) == []


def test_unpack_all_on_a_disk_that_fills_up_leaves_nothing(tmp_path, small_tmpfs):
    """`unpack --all` of a family whose second task no longer fits: one line, exit 1, no task folder,
    no temporary."""
    base, tasks = _family(tmp_path / "fam", tasks=3)
    arch = tmp_path / "a.tallpack"
    subprocess.run([*CLI, "-q", "pack", "--base", str(base), *map(str, tasks), "-o", str(arch)], env=_env(), check=True)
    one = tasks[0].stat().st_size
    disk = small_tmpfs(one + one // 2)
    r = subprocess.run([*CLI, "-q", "unpack", "--all", str(arch), "-o", str(disk / "out")], env=_env(),
                       capture_output=True, text=True)
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {disk / 'out'}/t") and "no space left on device" in lines[0]
    assert _everything(disk) == []


# -- a folder made read-only while an output is written ----------------------------------------------

def _without_override(code: str, *args: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a child for which folder permissions hold (root's override dropped)."""
    prefix: list[str] = []
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("root ignores folder permissions, and setpriv is not here to drop that")
        prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner"]
    return subprocess.run([*prefix, sys.executable, "-c", textwrap.dedent(code), *args], env=_env(),
                          capture_output=True, text=True)


_READ_ONLY = """
    import logging, os, sys
    from pathlib import Path
    from tallpack import fsutil
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    root = Path(sys.argv[1])
    a, b = root / "a", root / "b"
    a.mkdir(); b.mkdir()
    os.chmod(a, 0o555)
    try:
        (a / "probe").touch()
    except PermissionError:
        os.chmod(a, 0o755)
    else:
        print("SKIP: permissions do not hold here"); sys.exit(0)
    try:
        with fsutil.transaction():
            fsutil.atomic_write(a / "x.safetensors", lambda tmp: tmp.write_bytes(b"x" * 1000))
            fsutil.atomic_write(b / "y.safetensors", lambda tmp: tmp.write_bytes(b"y" * 1000))
            os.chmod(a, 0o555)  # made read-only before the renames
    except OSError as e:
        print("ERROR", e.filename)
    finally:
        os.chmod(a, 0o755)
"""


def test_a_folder_made_read_only_names_the_output_and_the_other_temporaries_go(tmp_path):
    """The rename into a folder made read-only fails: the error names the output, not its hidden
    temporary, and the abort still removes the temporaries in the other, writable folders (it
    stopped at the first it could not remove: `unpack --all` left 19 tasks' temporaries and
    folders); the one it cannot remove is named in a warning."""
    r = _without_override(_READ_ONLY, str(tmp_path))
    if r.stdout.startswith("SKIP"):
        pytest.skip(r.stdout.strip())
    assert f"ERROR {tmp_path / 'a' / 'x.safetensors'}" in r.stdout, r.stdout + r.stderr
    assert [p.name for p in (tmp_path / "b").iterdir()] == []
    left = list((tmp_path / "a").iterdir())
    assert len(left) == 1 and left[0].name.endswith(".partial")
    assert "could not remove this temporary file of a failed output" in r.stderr
    assert left[0].name[:40] in r.stderr
