"""The layers of the code hold: import-linter's contracts in pyproject.toml (layers, a byte layer
without torch, no cycles); and mypy, with its settings there, finds no type errors."""

from __future__ import annotations

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
