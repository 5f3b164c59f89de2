"""A PyTorch practitioner's archive (r32): one model in memory, its fine-tunes swapped in from a
tallpack archive many times, and research code around it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tallpack


def _mlp() -> torch.nn.Sequential:
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))


@pytest.fixture(scope="module")
def mlp_family(tmp_path_factory) -> Path:
    """A small MLP and two fine-tunes of a few SGD steps each, packed from their state dicts."""
    torch.manual_seed(0)
    base = _mlp()
    tasks = {}
    for i, name in enumerate(("a", "b")):
        model = _mlp()
        model.load_state_dict(base.state_dict())
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(3):
            x = torch.randn(16, 8)
            torch.nn.functional.cross_entropy(model(x), torch.full((16,), i)).backward()
            opt.step()
            opt.zero_grad()
        tasks[name] = {k: v.clone() for k, v in model.state_dict().items()}
    out = tmp_path_factory.mktemp("mlp") / "mlp.tallpack"
    tallpack.pack(base.state_dict(), tasks, out)
    return out


def test_an_archive_open_at_exit_leaves_no_unclosed_file_warning(mlp_family: Path) -> None:
    """A service keeps its archive open for its whole life: at exit the process closes it, with no
    warning (``Archive._finalizer``). The file under the mapping warned at shutdown all the same,
    naming only a descriptor (``ResourceWarning: unclosed file <_io.BufferedReader name=3>``),
    under ``python -X dev`` or ``-W always``."""
    code = ("import tallpack, torch\n"
            f"fam = tallpack.open({str(mlp_family)!r})\n"
            "model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))\n"
            "model.load_state_dict(fam.state_dict('a'))\n"
            "print('served')\n")
    r = subprocess.run([sys.executable, "-X", "dev", "-W", "always", "-c", code], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "served"
    assert "ResourceWarning" not in r.stderr, r.stderr
