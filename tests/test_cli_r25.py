"""What the command line tells a user, end to end on real files (r25): a task the archive lacks
named on any command, the tensor table of long names at the width of a terminal or a file, and
the fidelity dial's hint that ``--exact`` would do better, kept in the result line."""

from __future__ import annotations

import json
import re
import shlex

import pytest
import torch
from click.testing import CliRunner

import tallpack
from tallpack_cli.main import main

TASKS = [f"task_{i:02d}" for i in range(14)]


def run(*args: object, ok: bool = True):
    r = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    if ok:
        assert r.exit_code == 0, r.output
    return r


def error_line(r) -> str:
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert r.exit_code != 0 and len(lines) == 1 and lines[0].startswith("error: "), r.output
    return lines[0]


@pytest.fixture(scope="module")
def many(tmp_path_factory):
    """An archive of 14 tasks (more than an error lists), a few KB."""
    where = tmp_path_factory.mktemp("many")
    g = torch.Generator().manual_seed(0)
    base = {f"model.layers.{i}.mlp.weight": torch.randn(32, generator=g) for i in range(3)}
    tallpack.pack(base, {t: {k: v + torch.randn(32, generator=g) * 0.01 for k, v in base.items()} for t in TASKS},
                  where / "my fam.tallpack")
    return where / "my fam.tallpack"


# -- a task the archive lacks ------------------------------------------------------------------

@pytest.mark.parametrize("args", [
    ["unpack", "{a}", "--task", "nope", "-o", "{o}"],
    ["unpack", "{a}", "--task", "task_01", "--task", "nope", "-o", "{o}"],
    ["merge", "{a}", "--task", "nope", "-o", "{o}"],
    ["stats", "{a}", "--task", "nope"],
    ["inspect", "{a}", "--tensors", "--task", "nope"],
])
def test_an_unknown_task_names_a_few_and_the_command_that_lists_them(many, tmp_path, args):
    r = run("-q", *(a.format(a=many, o=tmp_path / "out") for a in args), ok=False)
    line = error_line(r)
    assert r.exit_code == 1 and not (tmp_path / "out").exists()
    assert line == (f"error: {many}: no task 'nope'; it has 14 tasks: {', '.join(TASKS[:10])}, ... "
                    f"(tallpack inspect {shlex.quote(str(many))} lists them)")
    assert "fam.tasks" not in line


def test_an_unknown_task_close_to_one_says_which(many, tmp_path):
    line = error_line(run("unpack", many, "--task", "tsk_03", "-o", tmp_path / "out", ok=False))
    assert f"{many}: no task 'tsk_03' (did you mean 'task_03'?); it has 14 tasks: task_00, " in line


def test_the_library_message_is_plain_words(many):
    with tallpack.open(many) as fam, pytest.raises(tallpack.TaskNotFoundError) as e:
        fam.keys("nope")
    assert str(e.value) == f"{many}: no task 'nope'; it has 14 tasks: {', '.join(TASKS[:10])}, ..."


def test_unpack_without_a_task_lists_a_few_not_all(many, tmp_path):
    r = run("unpack", many, "-o", tmp_path / "out", ok=False)
    line = error_line(r)
    assert r.exit_code == 2
    assert (f"name a task with --task NAME (the archive has 14 tasks: task_00, task_01, task_02, ...; "
            f"tallpack inspect {shlex.quote(str(many))} lists them) or pass --all") in line
    assert "task_13" not in line
