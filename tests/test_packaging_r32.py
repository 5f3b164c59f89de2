"""Packaging as a newcomer and a publisher meet it (r32): what the sdist holds (a packager builds
and tests from it), which extra a missing optional package needs, and what the command line
imports before it has work to do."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]


def _tallpack(*args: str, cwd: Path, block: tuple[str, ...] = (),
              report: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """``tallpack ARGS`` in a fresh interpreter where the modules ``block`` names cannot be imported
    (as where their package is not installed); its last line of stderr, with ``report``, says which
    of those modules the command imported (``imported: [...]``)."""
    code = ("import atexit, sys\n"
            f"for m in {block!r}: sys.modules[m] = None\n"
            f"if {report!r}: atexit.register(lambda: print('imported:', [m for m in {report!r} if m in sys.modules], "
            "file=sys.stderr))\n"
            f"sys.argv = ['tallpack', *{list(args)!r}]\n"
            "from tallpack_cli import run\n"
            "run()\n")
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> Path:
    """A base and two fine-tunes, safetensors files, in a folder."""
    d = tmp_path_factory.mktemp("family")
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(64, 32, generator=g), "b": torch.randn(64, generator=g)}
    save_file(base, d / "base.safetensors")
    for t in ("cars", "dtd"):
        save_file({k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}, d / f"{t}.safetensors")
    return d


# --- optional extras: the error names the extra to install -------------------------------------


def test_the_demo_without_scikit_learn_names_its_extra(tmp_path) -> None:
    """`pip install tallpack` then `tallpack demo` said "internal error: ModuleNotFoundError: No module
    named 'sklearn' (a bug in tallpack: please report it ...)": scikit-learn is in the demo extra."""
    r = _tallpack("demo", "--size", "tiny", "--dir", str(tmp_path / "demo"), cwd=tmp_path, block=("sklearn",))
    assert r.returncode == 1, r.stdout + r.stderr[-2000:]
    assert "internal error" not in r.stderr, r.stderr[-2000:]
    assert "pip install 'tallpack[demo]'" in r.stderr, r.stderr[-2000:]
    assert len(r.stderr.strip().splitlines()[-1]) < 300


def test_an_s3_output_without_s3fs_names_the_remote_extra(family, tmp_path) -> None:
    """fsspec's own words ("Install s3fs to access S3") did not say that the remote extra holds it."""
    r = _tallpack("pack", "--base", str(family / "base.safetensors"), str(family / "cars.safetensors"),
                  "-o", "s3://bucket/family.tallpack", cwd=tmp_path, block=("s3fs",))
    assert r.returncode == 1, r.stdout + r.stderr[-2000:]
    assert "s3://bucket/family.tallpack" in r.stderr and "s3fs" in r.stderr, r.stderr[-2000:]
    assert "pip install 'tallpack[remote]'" in r.stderr, r.stderr[-2000:]


def test_a_signed_output_link_without_aiohttp_is_named_without_its_secrets(family, tmp_path) -> None:
    """The message of a missing package named the output URL as given: password and signature too."""
    r = _tallpack("pack", "--base", str(family / "base.safetensors"), str(family / "cars.safetensors"), "-o",
                  "https://me:pw@host/family.tallpack?X-Amz-Signature=SECRET", cwd=tmp_path, block=("aiohttp",))
    assert r.returncode == 1, r.stdout + r.stderr[-2000:]
    assert "https://host/family.tallpack" in r.stderr and "pip install 'tallpack[remote]'" in r.stderr, r.stderr
    assert "SECRET" not in r.stderr and "pw" not in r.stderr, r.stderr


def test_an_s3_archive_without_s3fs_names_the_remote_extra(tmp_path) -> None:
    """Reading (`inspect s3://...`) goes through tallpack/remote.py, which says the same as fsspec."""
    r = _tallpack("inspect", "s3://bucket/family.tallpack", cwd=tmp_path, block=("s3fs",))
    assert r.returncode == 1, r.stdout + r.stderr[-2000:]
    assert "pip install 'tallpack[remote]'" in r.stderr, r.stderr[-2000:]


def test_a_url_no_extra_covers_names_its_package_only(tmp_path) -> None:
    """gcsfs is in no extra of ours: the error names the package, not an extra that lacks it."""
    r = _tallpack("pack", "--base", "b.safetensors", "c.safetensors", "-o", "gs://bucket/family.tallpack",
                  cwd=tmp_path, block=("gcsfs",))
    assert r.returncode == 1, r.stdout + r.stderr[-2000:]
    assert "gcsfs" in r.stderr and "tallpack[" not in r.stderr, r.stderr[-2000:]


# --- start-up: what the command line imports before it has work to do --------------------------


def test_help_inspect_and_verify_import_neither_torch_nor_fsspec(family, tmp_path) -> None:
    """`tallpack --help`, `inspect` and `verify` of a lossy local archive need neither torch (about a
    second to import) nor fsspec (README: "Start time"); a top-level import of either would slow them."""
    archive = tmp_path / "family.tallpack"
    r = _tallpack("-q", "pack", "--base", str(family / "base.safetensors"), str(family / "cars.safetensors"),
                  str(family / "dtd.safetensors"), "-o", str(archive), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    heavy = ("torch", "fsspec", "transformers", "s3fs", "tqdm")
    for args in (["--help"], ["inspect", str(archive)], ["inspect", "--tensors", str(archive)],
                 ["-q", "verify", str(archive)], ["inspect", "missing.tallpack"]):
        r = _tallpack(*args, cwd=tmp_path, report=heavy)
        assert r.returncode == (1 if "missing.tallpack" in args else 0), (args, r.stdout, r.stderr[-2000:])
        assert r.stderr.splitlines()[-1] == "imported: []", (args, r.stderr[-2000:])


# --- the sdist: what a packager builds and tests from -------------------------------------------


@pytest.fixture(scope="module")
def sdist(tmp_path_factory) -> tuple[list[str], str, list[str]]:
    """The sdist's file names (without the top folder), its PKG-INFO and setuptools' warnings: built
    from a copy of the files git knows (tracked, and new ones it does not ignore), as a clean clone
    would, so the checkout's own build outputs (``*.egg-info``, ``build/``) are neither read nor written."""
    pytest.importorskip("setuptools", reason="setuptools is in the test extra: pip install -e .[test]")
    git = shutil.which("git")
    if git is None or not (ROOT / ".git").exists():
        pytest.skip("needs the git checkout (its list of files)")
    names = subprocess.run([git, "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True, timeout=60).stdout.decode().split("\0")
    src = tmp_path_factory.mktemp("src")
    for name in filter(None, names):
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    out = tmp_path_factory.mktemp("dist")
    code = ("import sys, warnings\n"
            "warnings.simplefilter('always')\n"
            "from setuptools import build_meta\n"
            "print(build_meta.build_sdist(sys.argv[1]))\n")
    r = subprocess.run([sys.executable, "-c", code, str(out)], cwd=src, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    with tarfile.open(out / r.stdout.split()[-1]) as tar:
        files = [m.name.split("/", 1)[1] for m in tar.getmembers() if m.isfile()]
        top = tar.getmembers()[0].name.split("/")[0]
        info = tar.extractfile(f"{top}/PKG-INFO").read().decode()  # type: ignore[union-attr]
    caught = [line for line in r.stderr.splitlines() if "Warning" in line]
    return files, info, caught


def test_the_sdist_holds_the_whole_test_suite_and_the_spec(sdist) -> None:
    """setuptools' defaults shipped tests/test_*.py without conftest.py, strategies.py or the golden
    archives (54 of the files failed to collect), and neither spec/ nor a license."""
    files = set(sdist[0])
    tracked = subprocess.run(["git", "ls-files", "tests", "spec"], cwd=ROOT, capture_output=True, text=True,
                             check=True, timeout=60).stdout.split()
    missing = sorted(set(tracked) - files)
    assert missing == [], missing[:20]
    assert {"LICENSE", "README.md", "pyproject.toml", "setup.py", "tallpack/_kernels.c", "tallpack/py.typed",
            "cli/main.py"} <= files, sorted(files)[:40]


def test_the_sdist_holds_no_build_outputs_or_benchmarks(sdist) -> None:
    files = sdist[0]
    wrong = [f for f in files if f.endswith((".so", ".pyd", ".pyc", ".o")) or "__pycache__" in f
             or f.startswith(("benchmarks/", "build/", ".tallpack-demo/", "tests/fuzz/corpus/"))]
    assert wrong == [], wrong[:20]


def test_the_license_is_an_spdx_expression_with_its_file(sdist) -> None:
    """``license = { text = ... }`` is deprecated (setuptools: builds stop working after 2027-02-18);
    PEP 639: ``license = "Apache-2.0"`` and ``license-files``, so the text travels with the package."""
    _, info, caught = sdist
    assert "License-Expression: Apache-2.0" in info, info[:1500]
    assert "License-File: LICENSE" in info, info[:1500]
    assert not [w for w in caught if "license" in w.lower()], caught


def test_the_license_file_is_the_apache_license() -> None:
    """pyproject.toml declares Apache-2.0; the license asks that its text go with every copy."""
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text
