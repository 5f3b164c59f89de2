"""The command's process waits passively for OpenMP's threads (OMP_WAIT_POLICY=PASSIVE), unless the
environment chose a policy: torch's element-wise operations in a merge spin-waited for a busy core
(BENCHMARKS.md, thirty-second round). A process that imported torch already keeps its policy."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

SHOW = """
import os, sys
{pre}
import tallpack_cli.main as m
def fake(**kw):
    print("policy=" + os.environ.get("OMP_WAIT_POLICY", "-"))
m.main = fake
import tallpack_cli
tallpack_cli.run()
"""


@pytest.mark.parametrize("given, pre, expected", [
    (None, "", "PASSIVE"),
    ("ACTIVE", "", "ACTIVE"),  # the user's choice
    (None, "import torch", "-"),  # torch loaded first: its runtime read the policy already
])
def test_the_command_waits_passively_unless_told(given, pre, expected):
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if given:
        env["OMP_WAIT_POLICY"] = given
    r = subprocess.run([sys.executable, "-c", SHOW.format(pre=pre)], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"policy={expected}" in r.stdout, r.stdout + r.stderr


def test_sigterm_the_parent_ignores_stays_ignored(tmp_path):
    """A command started with SIGTERM ignored (a supervisor's choice, as nohup ignores SIGHUP) runs
    to its end through SIGTERMs: it used to install its own handler and end with exit 143."""
    import signal
    import time

    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(64, 64, generator=g)}
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file({"w": base["w"] + 0.01}, str(tmp_path / "a.safetensors"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    p = subprocess.Popen([sys.executable, "-m", "tallpack", "-q", "pack", "--base", str(tmp_path / "base.safetensors"),
                          str(tmp_path / "a.safetensors"), "-o", str(tmp_path / "f.tallpack")],
                         preexec_fn=lambda: signal.signal(signal.SIGTERM, signal.SIG_IGN), env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sent = 0
    while p.poll() is None:  # from the modules' load to the end
        p.send_signal(signal.SIGTERM)
        sent += 1
        time.sleep(0.05)
    out, err = p.communicate()
    assert sent > 3 and p.returncode == 0, (sent, p.returncode, err)
    assert (tmp_path / "f.tallpack").is_file()
