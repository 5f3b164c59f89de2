"""An unpack into a folder that holds another task's earlier output (``--force`` replaces files,
it removes none): the other task's folder files that this task has not are named in a warning,
since a loader would take them as this task's own (a tokenizer, a chat template)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import tallpack
from tallpack_cli.main import main


def _folder(path, tensors, extra):
    path.mkdir()
    save_file(tensors, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({"model_type": "toy", "hidden_size": 32}))
    for name, text in extra.items():
        (path / name).write_text(text)
    return path


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    root = tmp_path_factory.mktemp("fam")
    g = torch.Generator().manual_seed(5)
    base = {"w": torch.randn(32, 32, generator=g), "v": torch.randn(32, generator=g)}
    tune = lambda: {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    b = _folder(root / "base", base, {})
    a = _folder(root / "a", tune(), {"tokenizer.json": "{}"})
    c = _folder(root / "c", tune(), {"tokenizer.json": "{}", "chat_template.jinja": "{{ c }}", "special_tokens_map.json": "{}"})
    out = root / "fam.tallpack"
    tallpack.pack(str(b), {"a": str(a), "c": str(c)}, out, exact=True)
    return out


@pytest.mark.parametrize("exact", [False, True])
def test_other_tasks_files_left_in_the_folder_are_named(archive, tmp_path, caplog, exact):
    out = tmp_path / "out"
    with tallpack.open(archive) as fam:
        tallpack.write_task(fam, "c", out)
        with caplog.at_level(logging.WARNING, logger="tallpack"):
            tallpack.write_task(fam, "a", out, overwrite=True, exact=exact)
    lines = [r.getMessage() for r in caplog.records if "another task" in r.getMessage()]
    assert len(lines) == 1, caplog.text
    assert "chat_template.jinja, special_tokens_map.json" in lines[0] and "'a'" in lines[0]
    assert "tokenizer.json" not in lines[0]  # task a's own: replaced
    assert (out / "chat_template.jinja").is_file()  # named, not removed


def test_a_fresh_folder_or_the_users_own_files_warn_nothing(archive, tmp_path, caplog):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with tallpack.open(archive) as fam, caplog.at_level(logging.WARNING, logger="tallpack"):
        tallpack.write_task(fam, "c", out, overwrite=True)
        tallpack.write_task(fam, "c", out, overwrite=True)
    assert "another task" not in caplog.text


def test_the_command_line_shows_the_warning(archive, tmp_path):
    out = tmp_path / "out"
    assert CliRunner().invoke(main, ["unpack", str(archive), "--task", "c", "-o", str(out)]).exit_code == 0
    r = subprocess.run([sys.executable, "-m", "tallpack", "unpack", str(archive), "--task", "a", "-o", str(out), "-f",
                        "--exact"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    line = next(x for x in r.stderr.splitlines() if "another task" in x)
    assert "WARNING" in line and "chat_template" in line and "special_tokens_map.json" in line


def test_the_bases_own_file_copied_in_is_not_named(tmp_path, caplog):
    """A tokenizer the task's folder lacked, copied in from the base (the same bytes as the base's
    kept file), is the user's choice: no warning; another task's leftover still is named."""
    g = torch.Generator().manual_seed(6)
    base = {"w": torch.randn(16, 16, generator=g)}
    b = _folder(tmp_path / "base", base, {"tokenizer.json": '{"base": 1}'})
    a = _folder(tmp_path / "a", {"w": base["w"] + 0.01}, {})
    c = _folder(tmp_path / "c", {"w": base["w"] - 0.01}, {"chat_template.jinja": "{{ c }}"})
    arch = tmp_path / "fam.tallpack"
    tallpack.pack(str(b), {"a": str(a), "c": str(c)}, arch)
    out = tmp_path / "out"
    with tallpack.open(arch) as fam:
        tallpack.write_task(fam, "c", out)
        (out / "tokenizer.json").write_text('{"base": 1}')
        with caplog.at_level(logging.WARNING, logger="tallpack"):
            tallpack.write_task(fam, "a", out, overwrite=True)
    lines = [r.getMessage() for r in caplog.records if "another task" in r.getMessage()]
    assert len(lines) == 1 and "chat_template.jinja" in lines[0] and "tokenizer.json" not in lines[0], lines
