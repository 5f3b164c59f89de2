"""Every benchmark script still starts and parses its options, and every command BENCHMARKS.md
prints names a script that exists with options that script still takes.

The scripts run in this process (``runpy``, as ``__main__``) with ``--help``: argparse prints the
usage and exits 0 before any work, so torch and the library are imported once for all of them.
"""

from __future__ import annotations

import contextlib
import io
import re
import runpy
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "benchmarks"
SCRIPTS = sorted(p.name for p in BENCH.glob("*.py"))

_HELP: dict[str, str] = {}


def help_text(script: str) -> str:
    """What ``python benchmarks/<script> --help`` prints (run here, once per script)."""
    if script not in _HELP:
        out = io.StringIO()
        argv, path = sys.argv, list(sys.path)
        sys.argv = [str(BENCH / script), "--help"]
        sys.path.insert(0, str(BENCH))  # as ``python benchmarks/x.py`` puts the script's folder first
        try:
            with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as done:
                runpy.run_path(str(BENCH / script), run_name="__main__")
        finally:
            sys.argv, sys.path[:] = argv, path
        assert done.value.code in (0, None), f"{script} --help exited {done.value.code}"
        _HELP[script] = out.getvalue()
    return _HELP[script]


def test_scripts_found():
    assert "perf.py" in SCRIPTS and len(SCRIPTS) >= 20


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script):
    text = help_text(script)
    assert text.startswith("usage:"), f"{script} --help printed no usage (did it run its benchmark instead?)"
    assert "-h, --help" in text


def benchmarks_md_commands() -> list[tuple[str, list[str], str]]:
    """(script, its ``--options``, the command) of each ``benchmarks/<x>.py ...`` in backquotes in
    BENCHMARKS.md, a command wrapped over lines joined."""
    text = re.sub(r"\s*\n\s*", " ", (REPO / "BENCHMARKS.md").read_text())
    found = []
    for m in re.finditer(r"benchmarks/([a-z_0-9]+\.py)([^`]*)`", text):
        found.append((m.group(1), re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", m.group(2)), m.group(0)))
    return found


def test_benchmarks_md_commands_still_work():
    commands = benchmarks_md_commands()
    assert len(commands) > 50  # the pattern still finds the document's commands
    wrong = []
    for script, options, command in commands:
        if script not in SCRIPTS:
            wrong.append(f"{command!r}: no benchmarks/{script}")
            continue
        known = set(re.findall(r"--[a-z][a-z0-9-]*", help_text(script)))
        wrong += [f"{command!r}: benchmarks/{script} has no {o}" for o in options if o not in known]
    assert not wrong, "\n".join(wrong)


def test_the_command_check_can_fail():
    """The check above sees a removed option (its regular expression and the help text agree)."""
    known = set(re.findall(r"--[a-z][a-z0-9-]*", help_text("ab_load.py")))
    assert "--rounds" in known and "--no-such-option" not in known
