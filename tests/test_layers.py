"""The layers of the code hold: import-linter's contracts in pyproject.toml (layers, a byte layer
without torch, no cycles)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

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
