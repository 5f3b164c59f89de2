"""The fidelity dial says when ``--exact`` would be the better choice (r24 scale F4): a target so
high that its archive is about as large as the exact tier's, or larger (on bf16 the exact tier
derives masks and merged vectors from the originals, which no dial archive can), is one warning
with both sizes; an ordinary target says nothing."""

from __future__ import annotations

import logging
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

import tallpack

SHAPES = {"a.weight": (256, 128), "b.weight": (128, 256), "a.bias": (256,)}


def family(tasks: int = 3, seed: int = 0):
    """A bf16 base and fine-tunes with small dense updates everywhere (about 2% of the weights),
    as fine-tuning gives: a few hundred KB in all."""
    g = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(s, generator=g) * 0.05 for k, s in SHAPES.items()}
    fts = {f"t{i}": {k: (b + torch.randn(b.shape, generator=g) * 0.001).to(torch.bfloat16) for k, b in base.items()}
           for i in range(tasks)}
    return {k: v.to(torch.bfloat16) for k, v in base.items()}, fts


def hints(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "tallpack.dial" and r.levelno == logging.WARNING
            and "--exact" in r.getMessage()]


def kb(text: str, what: str) -> float:
    m = re.search(rf"{what} ([0-9.]+) KB", text)
    assert m, text
    return float(m.group(1)) * 1000


def test_a_target_above_the_exact_tier_says_so(tmp_path, caplog):
    base, fts = family()
    exact = tallpack.pack(base, fts, tmp_path / "x.tallpack", exact=True) and (tmp_path / "x.tallpack").stat().st_size
    with caplog.at_level(logging.WARNING, logger="tallpack.dial"):
        tallpack.pack(base, fts, tmp_path / "f.tallpack", fidelity=0.9999)
    [line] = hints(caplog)
    size = (tmp_path / "f.tallpack").stat().st_size
    assert size > exact  # the case the warning is for
    assert line.startswith("fidelity target 0.9999: --exact (exact=True) would take about ")
    assert "bit for bit" in line and "their exact residual" in line
    assert kb(line, "would take about") == pytest.approx(exact, rel=0.1)  # the estimate, nothing packed twice
    assert kb(line, "against the dial's") == pytest.approx(size, rel=0.1)


def test_an_ordinary_target_says_nothing(tmp_path, caplog):
    base, fts = family()
    with caplog.at_level(logging.INFO, logger="tallpack.dial"):
        tallpack.pack(base, fts, tmp_path / "f.tallpack", fidelity=0.99)
    assert hints(caplog) == []
    exact = tallpack.pack(base, fts, tmp_path / "x.tallpack", exact=True) and (tmp_path / "x.tallpack").stat().st_size
    assert (tmp_path / "f.tallpack").stat().st_size < exact
    # the estimates are there with -v
    assert any("the exact tier's about" in r.getMessage() for r in caplog.records if r.levelno == logging.INFO)


def test_a_budget_the_exact_tier_fits_says_so(tmp_path, caplog):
    base, fts = family()
    with caplog.at_level(logging.WARNING, logger="tallpack.dial"):
        tallpack.pack(base, fts, tmp_path / "f.tallpack", budget=2.5)
    [line] = hints(caplog)
    assert line.startswith("budget 2.50x (")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tallpack.dial"):
        tallpack.pack(base, fts, tmp_path / "g.tallpack", budget=1.2, overwrite=True)
    assert hints(caplog) == []  # the exact tier is over this budget


def test_cli_pack_shows_the_warning(tmp_path):
    """What the user of the command line sees: the warning on stderr, the archive written."""
    base, fts = family(tasks=2)
    save_file(base, str(tmp_path / "base.safetensors"))
    for t, ft in fts.items():
        save_file(ft, str(tmp_path / f"{t}.safetensors"))
    r = subprocess.run([sys.executable, "-m", "tallpack", "pack", "--base", str(tmp_path / "base.safetensors"),
                        *(a for t in fts for a in ("--task", str(tmp_path / f"{t}.safetensors"))),
                        "--fidelity", "0.9999", "--no-progress", "-o", str(tmp_path / "f.tallpack")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "hint: fidelity target 0.9999: --exact (exact=True) would take about" in r.stdout
    assert r.stdout.startswith("wrote ")
