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
