"""Outputs and the dial's lines (r25 review F1, F5, F6).

- ``unpack --all`` keeps each task folder ``OUT/NAME`` inside ``OUT`` while it writes, not only
  before: a link put in place of ``OUT/b`` while task ``a`` is written (a concurrent process) is
  refused, nothing is written or replaced where it leads, and no task is left (all or nothing).
- An output folder that is a link to a folder that does not exist is refused with one line naming
  the link and where it leads; no folder is made through it.
- A fidelity target is printed as it was given (``0.99999``, never rounded to ``1``), and a score
  short of it reads below it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, strategies as st

import tallpack
import tallpack.outputs
from tallpack.dial import shown
from tallpack.errors import OutputError
from tallpack_cli.main import _unmet, main
from test_output_links import archives  # noqa: F401  (the fixture: the same tiny family, packed plain and exact)

links = pytest.mark.skipif(not hasattr(os, "symlink") or os.name == "nt", reason="needs symbolic links")


def _outside(tmp_path: Path) -> tuple[Path, Path]:
    """An output folder, and a folder beside it holding an earlier model that must stay as it is."""
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    (elsewhere / "model.safetensors").write_text("KEEP")
    return out, elsewhere


def _untouched(out: Path, elsewhere: Path) -> None:
    assert sorted(os.listdir(elsewhere)) == ["model.safetensors"]
    assert (elsewhere / "model.safetensors").read_text() == "KEEP"
    assert sorted(os.listdir(out)) == ["b"] and (out / "b").is_symlink()  # task a's folder went with the output


# -- F1: a task folder swapped for a link while the tasks before it are written -----------------

@links
@pytest.mark.parametrize("overwrite", [False, True])
def test_unpack_all_refuses_a_task_folder_made_a_link_out_while_an_earlier_task_is_written(
        archives, tmp_path, overwrite):
    """The reviewer's race, made deterministic: the progress of task a puts ``out/b -> ../elsewhere``
    in place once ``out/a`` exists (an exact unpack reports no progress: the next test covers it)."""
    out, elsewhere = _outside(tmp_path)

    def progress(desc, i, n):
        if (out / "a").is_dir() and not (out / "b").is_symlink():
            os.symlink("../elsewhere", out / "b")

    with tallpack.open(archives["plain"]) as fam, pytest.raises(OutputError) as e:
        tallpack.write_tasks(fam, None, out, progress=progress, overwrite=overwrite)
    assert (out / "b").is_symlink()  # the swap did happen
    msg = str(e.value)
    assert "\n" not in msg and f"{out / 'b'}" in msg and f"leads outside {out}" in msg and "elsewhere" in msg
    _untouched(out, elsewhere)


@links
@pytest.mark.parametrize("kind", ["plain", "exact"])
def test_unpack_all_refuses_a_task_folder_made_a_link_out_after_its_check(archives, tmp_path, monkeypatch, kind):
    """The swap between the task's check in write_tasks and its first file: each file staged is
    checked against the output folder again, and the folder's real path is the one at the check."""
    out, elsewhere = _outside(tmp_path)
    write_task = tallpack.outputs.write_task

    def swapping(archive, task, outdir, **kw):
        if task == "b":
            os.symlink("../elsewhere", out / "b")
        return write_task(archive, task, outdir, **kw)

    monkeypatch.setattr(tallpack.outputs, "write_task", swapping)
    with tallpack.open(archives[kind]) as fam, pytest.raises(OutputError) as e:
        tallpack.write_tasks(fam, None, out, exact=kind == "exact", overwrite=True)
    assert f"leads outside {out}" in str(e.value)
    _untouched(out, elsewhere)


@links
def test_unpack_all_still_writes_into_a_task_folder_linked_inside(archives, tmp_path):
    """A task folder that is a link to a folder inside the output stays allowed."""
    out = tmp_path / "out"
    (out / "real_b").mkdir(parents=True)
    os.symlink("real_b", out / "b")
    with tallpack.open(archives["plain"]) as fam:
        tallpack.write_tasks(fam, None, out)
    assert sorted(os.listdir(out / "real_b")) == ["config.json", "model.safetensors"]
    assert (out / "a" / "model.safetensors").is_file()


# -- F6: an output folder that is a link to a missing folder --------------------------------------

def cli(*args: object) -> tuple[int, str]:
    r = CliRunner().invoke(main, ["-q", *map(str, args)])
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception  # no traceback
    return r.exit_code, r.output


@links
@pytest.mark.parametrize("args,output", [
    (["unpack", "{a}", "--task", "a", "-o", "{o}"], "{o}"),
    (["unpack", "{a}", "--task", "a", "-o", "{o}", "--force"], "{o}"),
    (["unpack", "{a}", "--task", "a", "-o", "{o}/sub"], "{o}/sub"),
    (["unpack", "{a}", "--all", "-o", "{o}"], "{o}/a"),
    (["merge", "{a}", "-o", "{o}"], "{o}"),
])
def test_an_output_that_is_a_link_to_a_missing_folder_says_so(archives, tmp_path, args, output):
    o = tmp_path / "o3"
    os.symlink("nowhere", o)
    code, text = cli(*(a.format(a=archives["plain"], o=o) for a in args))
    assert code != 0
    [line] = text.strip().splitlines()
    assert line.startswith(f"error: {output.format(o=o)}: ")
    assert f"is a link to {tmp_path / 'nowhere'}, which does not exist" in line
    assert "File exists" not in line
    assert sorted(os.listdir(tmp_path)) == ["o3"]  # nothing made through the link


@links
def test_a_loop_of_links_as_the_output_says_so(archives, tmp_path):
    o = tmp_path / "loop"
    os.symlink("loop", o)
    with tallpack.open(archives["plain"]) as fam, pytest.raises(OutputError, match="a loop of links"):
        tallpack.write_task(fam, "a", o)


# -- F5: fidelity targets as given -----------------------------------------------------------

def test_a_target_is_shown_as_given():
    assert shown(0.99999) == "0.99999"
    assert shown(0.9999999) == "0.9999999"
    assert shown(0.999962, below=0.99999) == "0.99996"
    assert shown(0.91234, below=0.95) == "0.9123"


@given(st.floats(min_value=1e-6, max_value=1.0))
def test_a_target_reads_back_as_itself(target):
    assert float(shown(target)) == target


@given(st.floats(min_value=1e-3, max_value=1.0), st.floats(min_value=0.0, max_value=1.0))
def test_a_score_short_of_its_target_reads_below_it(target, fraction):
    score = target * fraction
    if score >= target:
        return
    assert float(shown(score, below=target)) < target


def test_the_result_line_says_the_target_and_a_short_score_as_they_are():
    dial = {"met": False, "target": 0.99999, "measure": "weight",
            "tasks": {"a": {"weight": 0.999962}, "b": {"weight": 0.999999}}}
    assert _unmet(dial) == "; fidelity target 0.99999 not reached for 1 task (a 0.99996)"


def test_the_exact_hint_says_the_target_as_given(tmp_path, caplog):
    """The dial's hint that --exact would be as small, for a target just below 1."""
    g = torch.Generator().manual_seed(0)
    shapes = {"a.weight": (256, 128), "b.weight": (128, 256), "a.bias": (256,)}
    base = {k: torch.randn(s, generator=g) * 0.05 for k, s in shapes.items()}
    fts = {f"t{i}": {k: (b + torch.randn(b.shape, generator=g) * 0.001).to(torch.bfloat16) for k, b in base.items()}
           for i in range(3)}
    base = {k: v.to(torch.bfloat16) for k, v in base.items()}
    with caplog.at_level(logging.WARNING, logger="tallpack.dial"):
        tallpack.pack(base, fts, tmp_path / "f.tallpack", fidelity=0.99999)
    [line] = [r.getMessage() for r in caplog.records if r.name == "tallpack.dial" and "--exact" in r.getMessage()]
    assert line.startswith("fidelity target 0.99999: --exact (exact=True) would take about ")
