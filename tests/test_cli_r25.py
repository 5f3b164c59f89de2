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
from hypothesis import given
from hypothesis import strategies as st

import tallpack
from tallpack.report import elide
from tallpack_cli.main import main
from test_many_tasks import one_error_line as error_line, run

TASKS = [f"task_{i:02d}" for i in range(14)]


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


def test_a_few_tasks_listed_whole_need_no_pointer(tmp_path):
    """An archive of a few tasks: the message names them all, so it points nowhere else."""
    g = torch.Generator().manual_seed(1)
    base = {"w": torch.randn(16, generator=g)}
    tallpack.pack(base, {t: {"w": base["w"] + 0.01} for t in ("a", "b")}, tmp_path / "f.tallpack")
    line = error_line(run("stats", tmp_path / "f.tallpack", "--task", "nope", ok=False))
    assert line == f"error: {tmp_path / 'f.tallpack'}: no task 'nope'; tasks are a, b"
    line = error_line(run("unpack", tmp_path / "f.tallpack", "-o", tmp_path / "o", ok=False))
    assert "(the archive has 2 tasks: a, b) or pass --all" in line and "lists them" not in line


# -- the tensor table of long names --------------------------------------------------------------

LONG = ([f"model.layers.{i}.self_attn.{p}_proj.weight" for i in (0, 7, 31) for p in "qk"]
        + [f"model.layers.{i}.mlp.experts.{p}_proj_blocks.scales.weight" for i in (0, 31) for p in ("gate_up", "down")]
        + ["model.embed_tokens.weight"])


@pytest.fixture(scope="module")
def long_names(tmp_path_factory):
    """12 tasks of tensors named as a large model's (up to 61 characters), each tensor its own
    row (no groups), a mask and a dense codec each: a few KB."""
    where = tmp_path_factory.mktemp("long")
    g = torch.Generator().manual_seed(1)
    base = {k: torch.randn(64, generator=g) for k in LONG}
    tasks = {f"t{i:02d}": {k: v + torch.randn(64, generator=g) * 0.01 for k, v in base.items()} for i in range(12)}
    tallpack.pack(base, tasks, where / "long.tallpack", group=False)
    return where / "long.tallpack"


def table(text: str) -> list[str]:
    """The lines of the tensor table and its notes (after the header of ``inspect --tensors``)."""
    lines = text.splitlines()
    return lines[next(i for i, line in enumerate(lines) if line.startswith("tensor ")):]


@pytest.mark.parametrize("env", [{}, {"COLUMNS": "120"}, {"COLUMNS": "140"}])
@pytest.mark.parametrize("chosen", [[], ["--task", "t03"]])
def test_inspect_tensors_fits_its_width_names_elided_in_the_middle(long_names, env, chosen):
    r = CliRunner(env=env).invoke(main, ["inspect", str(long_names), "--tensors", *chosen], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    width = int(env.get("COLUMNS", 120))
    rows = table(r.output)
    assert max(map(len, rows)) <= width, "\n".join(rows)
    names = [line.split()[0] for line in rows[2:2 + len(LONG)]]
    assert ("--json gives them whole" in r.output) == (names != LONG)
    assert len(set(names)) == len(LONG)  # still told apart
    for full, shown in zip(LONG, names):
        assert shown == full or "~" in shown
        assert shown.endswith(full.split(".")[-1])  # the last part, and the layer number, visible
        layer = re.search(r"\.(\d+)\.", full)
        assert layer is None or re.search(rf"(^|[.~]){layer.group(1)}([.~]|$)", shown), (full, shown)
    if width == 120:  # too narrow for whole names
        assert names != LONG and ("min" in rows[0]) == (not chosen)
        assert chosen or "model.layers.31~q_proj.weight" in names


def test_inspect_tensors_json_keeps_whole_names(long_names):
    rows = json.loads(run("inspect", long_names, "--tensors", "--json").output)["tensors"]
    assert [row["name"] for row in rows] == LONG


def test_a_roomy_table_is_not_elided(long_names):
    r = CliRunner(env={"COLUMNS": "400"}).invoke(main, ["inspect", str(long_names), "--tensors"])
    assert r.exit_code == 0 and "~" not in "\n".join(table(r.output)) and "shortened" not in r.output
    assert all(name in r.output for name in LONG)


@given(parts=st.lists(st.one_of(st.from_regex(r"[a-z_]{1,20}", fullmatch=True), st.integers(0, 99).map(str)),
                      min_size=1, max_size=8),
       n=st.integers(12, 80))
def test_elide_keeps_a_name_within_its_width(parts, n):
    name = ".".join(parts)
    shown = elide(name, n)
    assert len(shown) <= n and (shown == name) == (len(name) <= n)
    if len(name) > n and len(parts[-1]) + 1 <= n:
        assert shown.endswith(("." + parts[-1], "~" + parts[-1])) or shown == parts[-1]


# -- the fidelity dial's hint that --exact would do better ---------------------------------------

def bf16_family(where, tasks: int = 2) -> list[str]:
    """A bf16 base and fine-tunes with small dense updates everywhere, as safetensors files (a
    few hundred KB): a high fidelity target costs about what the exact tier does. The
    arguments of ``pack`` for it."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    shapes = {"a.weight": (256, 128), "b.weight": (128, 256), "a.bias": (256,)}
    base = {k: torch.randn(s, generator=g) * 0.05 for k, s in shapes.items()}
    save_file({k: v.to(torch.bfloat16) for k, v in base.items()}, str(where / "base.safetensors"))
    args = ["pack", "--base", str(where / "base.safetensors")]
    for i in range(tasks):
        save_file({k: (b + torch.randn(b.shape, generator=g) * 0.001).to(torch.bfloat16) for k, b in base.items()},
                   str(where / f"t{i}.safetensors"))
        args += ["--task", str(where / f"t{i}.safetensors")]
    return args


def pack_cli(*args: str):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "tallpack", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("quiet", [[], ["-q"]])
def test_pack_shows_the_exact_hint_with_its_result_once(tmp_path, quiet):
    r = pack_cli(*quiet, *bf16_family(tmp_path), "--fidelity", "0.9999", *([] if quiet else ["--no-progress"]),
                 "-o", str(tmp_path / "f.tallpack"))
    assert r.returncode == 0, r.stderr
    wrote, hint = r.stdout.splitlines()
    assert wrote.startswith(f"wrote {tmp_path / 'f.tallpack'}: 2 tasks, ")
    assert hint.startswith("hint: fidelity target 0.9999: --exact (exact=True) would take about ")
    assert "keep every task bit for bit" in hint
    assert "--exact" not in r.stderr  # said once, as a result (kept with -q), not as a warning too


def test_pack_with_an_ordinary_target_has_no_hint(tmp_path):
    r = pack_cli("-q", *bf16_family(tmp_path), "--fidelity", "0.99", "-o", str(tmp_path / "f.tallpack"))
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.splitlines()) == 1 and "hint" not in r.stdout


def test_the_library_returns_the_hint_and_still_logs_it(tmp_path, caplog):
    import logging

    args = bf16_family(tmp_path)
    base, tasks = args[2], args[4::2]
    with caplog.at_level(logging.WARNING, logger="tallpack.dial"):
        m = tallpack.pack(base, tasks, tmp_path / "f.tallpack", fidelity=0.9999)
    [hint] = m.hints
    assert [r.getMessage() for r in caplog.records if getattr(r, "exact_hint", False)] == [hint]
    assert hint.startswith("fidelity target 0.9999: --exact (exact=True) would take about ")
    with tallpack.open(tmp_path / "f.tallpack") as fam:  # not recorded in the archive
        assert fam.manifest.hints == () and "would take" not in json.dumps(fam.manifest.to_dict())
