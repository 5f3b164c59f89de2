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


def _perf():
    """benchmarks/perf.py as a module (its children run the same file)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("perf_r33", BENCH / "perf.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_perf_checks_the_values_its_loads_return(tmp_path):
    """perf.py's reference (the paper's formula over the original files, not the library) is what
    the archive gives, bit for bit, for float32 and bfloat16 members, whole and one rank's rows;
    a load whose values differ fails its child, naming the tensor, and the run with it."""
    import json

    import torch
    from safetensors.torch import save_file

    import tallpack

    perf = _perf()
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(64, 48, generator=g) * 0.02, "n": torch.ones(48),
            "h": (torch.randn(40, 8, generator=g) * 0.02).to(torch.bfloat16)}
    save_file(base, tmp_path / "base.safetensors")
    tasks = {}
    for t in range(3):
        sd = {k: (v.float() + 2e-3 * torch.randn(v.shape, generator=g) * (torch.rand(v.shape, generator=g) < 0.3)
                  ).to(v.dtype) for k, v in base.items()}
        tasks[f"task{t}"] = tmp_path / f"task{t}.safetensors"
        save_file(sd, tasks[f"task{t}"])
    arch = tmp_path / "f.tallpack"
    tallpack.pack(str(tmp_path / "base.safetensors"), {k: str(v) for k, v in tasks.items()}, arch)
    ref = perf.reference(tmp_path / "base.safetensors", tasks, "task1", tmp_path / "ref.json")
    rows = perf.reference(tmp_path / "base.safetensors", tasks, "task1", tmp_path / "rows.json", rows_div=8)
    with tallpack.open(arch, cache_bytes=0) as fam:
        sd = fam.state_dict("task1")
        perf.check_values(sd, ref, "whole")  # returns: the same bits
        perf.check_values({k: fam.get_slice("task1", k)[0 : max(1, fam.get_slice("task1", k).get_shape()[0] // 8)]
                           for k in sd}, rows, "rows")
        assert not torch.equal(sd["w"], base["w"])  # the reference is not the base's
    with pytest.raises(SystemExit):  # another task's values are not task1's
        perf.check_values(sd, perf.reference(tmp_path / "base.safetensors", tasks, "task2", tmp_path / "r2.json"), "t2")
    wrong = json.loads(Path(ref).read_text())
    wrong["w"] = perf.digest(sd["w"] + 1e-6)
    (tmp_path / "wrong.json").write_text(json.dumps(wrong))
    with pytest.raises(perf.ValueMismatch, match="tensor 'w'"):
        perf.run_child("load_tp", {"archive": str(arch), "task": "task1", "ref": str(tmp_path / "wrong.json")})
