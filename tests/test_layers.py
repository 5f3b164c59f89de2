"""The layers of the code hold: import-linter's contracts in pyproject.toml (layers, a byte layer
without torch, no cycles); and mypy, with its settings there, finds no type errors."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_hold() -> None:
    exe = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    r = subprocess.run([exe, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "0 broken" in r.stdout


def test_byte_layer_imports_without_torch() -> None:
    """The byte layer (container, codecs, checksums) loads in an interpreter where torch is blocked."""
    code = ("import sys; sys.modules['torch'] = None\n"
            "import importlib.util, types\n"
            "pkg = types.ModuleType('tallpack'); pkg.__path__ = [str(__import__('pathlib').Path(%r))]\n"
            "sys.modules['tallpack'] = pkg\n"
            "import tallpack.container, tallpack.storage, tallpack.codecs\n"
            "print('ok')") % str(ROOT / "tallpack")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "ok", r.stderr[-2000:]


def test_types_check() -> None:
    """``mypy`` (``[tool.mypy]``: the package and the command line) reports no errors."""
    pytest.importorskip("mypy", reason="mypy is not installed (it is in the test extra: pip install -e .[test])")
    r = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-2000:]
    assert r.stdout.startswith("Success: no issues found"), r.stdout[-2000:]


def test_a_wheel_holds_every_package_and_runs(tmp_path) -> None:
    """A plain install (a wheel, ``pip install .``) left out ``tallpack.encodings``: the package
    list in pyproject.toml is explicit, so every package folder must be in it. The wheel, built
    here and imported without the editable install, reads archives and names its own version."""
    pytest.importorskip("setuptools", reason="setuptools is in the test extra: pip install -e .[test]")
    import sysconfig
    import zipfile

    r = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
                        "-q", "-w", str(tmp_path / "dist")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("tallpack-*.whl")
    with zipfile.ZipFile(wheel) as z:
        z.extractall(tmp_path / "site")
    folders = {p.parent.relative_to(ROOT).as_posix() for p in (ROOT / "tallpack").rglob("__init__.py")}
    shipped = {p.parent.relative_to(tmp_path / "site").as_posix() for p in (tmp_path / "site").rglob("__init__.py")}
    assert folders <= shipped, sorted(folders - shipped)
    code = ("import importlib.metadata, tallpack, tallpack.encodings.exact, tallpack_cli\n"
            "assert tallpack.__file__.startswith(%r), tallpack.__file__\n"
            "print(importlib.metadata.version('tallpack'), tallpack.__version__)") % str(tmp_path / "site")
    # every site-packages of this interpreter (a venv's and, with --system-site-packages, the
    # system's: torch and numpy may be in either), after the wheel's files
    sites = [p for p in sys.path if p.rstrip("/").endswith(("site-packages", "dist-packages"))]
    sites += [sysconfig.get_paths()["purelib"]]
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), *dict.fromkeys(sites)]), "PATH": "/usr/bin:/bin"}
    # -S: without site, the editable install's finder is not loaded; torch comes from PYTHONPATH
    r = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, timeout=120,
                       cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    meta, version = r.stdout.split()
    assert meta == version
    r = subprocess.run([sys.executable, "-S", "-m", "tallpack", "--version"], capture_output=True, text=True,
                       timeout=120, cwd=tmp_path, env=env)
    assert r.returncode == 0 and version in r.stdout, r.stdout + r.stderr[-2000:]
