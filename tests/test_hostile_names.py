"""Names an archive from a stranger controls (task names, folder-file names, exact-tier records)
reach the terminal escaped and never lead an output astray:

- a task name with control, format or bidi characters is shown quoted and escaped by ``inspect``,
  ``stats`` and the unknown-task and no-task messages (spec §9), never raw;
- ``unpack --all -o OUT`` refuses a task folder ``OUT/NAME`` that is a link out of ``OUT``, before
  writing anything (spec §3.6);
- a folder file with the name of a weight file an unpack writes is refused at open, naming the
  archive, the task and the file (spec §3.6);
- an exact-tier record listed twice, or a kept-file record of a weight file's name, is refused by
  ``verify`` and ``unpack --exact`` alike, naming the archive, the task and the record; a kept-file
  record whose bytes differ from the folder file of its name is a ``verify`` problem, and ``unpack
  --exact`` writes the record's bytes (spec §6.5).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import zstandard
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import tallpack
from tallpack.container import FOOTER
from tallpack.errors import FormatError, OutputError
from tallpack_cli.main import main

links = pytest.mark.skipif(not hasattr(os, "symlink") or os.name == "nt", reason="needs symbolic links")


def _st_model(folder: Path, base: dict[str, torch.Tensor] | None, seed: int) -> dict[str, torch.Tensor]:
    """A tiny sentence-transformers folder: the transformer at the top, 1_Pooling, and a 2_Dense
    module with its own weights."""
    g = torch.Generator().manual_seed(seed)
    sd = ({"embed.weight": torch.randn(16, 8, generator=g), "layer.0.weight": torch.randn(8, 8, generator=g),
           "2_Dense/linear.weight": torch.randn(4, 8, generator=g)} if base is None
          else {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()})
    (folder / "1_Pooling").mkdir(parents=True)
    (folder / "2_Dense").mkdir()
    save_file({k: v for k, v in sd.items() if "/" not in k}, folder / "model.safetensors")
    save_file({"linear.weight": sd["2_Dense/linear.weight"]}, folder / "2_Dense" / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    (folder / "tokenizer.json").write_text(json.dumps({"version": "1.0"}))
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"}]))
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 8}))
    (folder / "2_Dense" / "config.json").write_text(json.dumps({"in_features": 8, "out_features": 4}))
    return sd


@pytest.fixture(scope="module")
def archives(tmp_path_factory) -> dict[str, Path]:
    """The family (base, a, b) packed plain and with the exact tier: a few KB each."""
    root = tmp_path_factory.mktemp("hostile")
    base = _st_model(root / "base", None, 0)
    tasks = {t: root / t for t in ("a", "b")}
    for i, p in enumerate(tasks.values()):
        _st_model(p, base, i + 1)
    out = {"plain": root / "f.tallpack", "exact": root / "x.tallpack"}
    tallpack.pack(root / "base", tasks, out["plain"], chunk_elements=64, threads=1)
    tallpack.pack(root / "base", tasks, out["exact"], exact=True, chunk_elements=64, threads=1)
    with tallpack.open(out["plain"]) as fam:
        assert "2_Dense/linear.weight" in fam.keys("a") and "modules.json" in fam.files("a")
    return out


def crafted(src: Path, dest: Path, edit: Callable[[dict], object]) -> Path:
    """``src`` with its manifest passed through ``edit`` (a hostile writer), checksum and all valid."""
    raw = src.read_bytes()
    m_off, m_len, _, flags, end = FOOTER.unpack(raw[-FOOTER.size:])
    stored = raw[m_off:m_off + m_len]
    manifest = json.loads(zstandard.ZstdDecompressor().decompress(stored) if flags & 1 else stored)
    edit(manifest)
    stored = zstandard.ZstdCompressor().compress(json.dumps(manifest).encode())
    dest.write_bytes(raw[:m_off] + stored + FOOTER.pack(m_off, len(stored), zlib.crc32(stored), flags | 1, end))
    return dest


def rename_task(m: dict, old: str, new: str) -> None:
    for t in m["tasks"]:
        if t["name"] == old:
            t["name"] = new
    for e in m["tensors"]:
        if old in e.get("tasks", {}):
            e["tasks"] = {(new if k == old else k): v for k, v in e["tasks"].items()}


def cli(*args: object) -> tuple[int, str]:
    """Exit code and output (stdout and stderr) of one command; never a traceback."""
    r = CliRunner().invoke(main, ["-q", *map(str, args)])
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    return r.exit_code, r.output


def _error(out: str) -> str:
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), out
    assert "written twice" not in out and "Traceback" not in out
    return lines[0]


# -- task names reach the terminal escaped ---------------------------------------------------------

#: characters a terminal acts on or that hide or reorder text: controls (ESC, BEL), format
#: characters (the bidi override U+202E), line and paragraph separators, spaces other than U+0020
_HOSTILE = st.characters(whitelist_categories=("Cc", "Cf", "Zl", "Zp", "Zs"), blacklist_characters=" ")
_PLAIN = st.text(st.characters(blacklist_categories=("Cs",)), max_size=6)


@given(name=st.tuples(_PLAIN, _HOSTILE, _PLAIN).map("".join))
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_task_names_with_control_characters_never_reach_the_terminal_raw(archives, tmp_path, name):
    """A task renamed ``b\\x1b]0;PWNED\\x07...`` (or ``\\u202eb.exe``): ``inspect``, ``inspect
    --tensors``, ``stats``, ``stats --task zz``, ``unpack --task zz`` and ``unpack`` without a task
    show it escaped; no output holds a character that is not printable (but the line ends)."""
    arch = crafted(archives["plain"], tmp_path / "esc.tallpack", lambda m: rename_task(m, "b", name))
    outputs = {}
    for args in (["inspect", arch], ["inspect", "--tensors", arch], ["stats", arch], ["stats", arch, "--task", "zz"],
                 ["unpack", arch, "--task", "zz", "-o", tmp_path / "x"], ["unpack", arch, "-o", tmp_path / "x"]):
        code, out = cli(*args)
        outputs[args[0] + " " + str(args[1])] = out
        raw = sorted({c for c in out if not c.isprintable() and c != "\n"})
        assert not raw, (args, raw, out)
    assert repr(name) in outputs["stats " + str(arch)]  # the name is there, escaped
    assert not (tmp_path / "x").exists()


# -- unpack --all: a task's folder that is a link out of the output ----------------------------------

@links
@pytest.mark.parametrize("force", [False, True])
def test_unpack_all_refuses_a_task_folder_that_links_outside_the_output(archives, tmp_path, force):
    """``out/a -> ../elsewhere``: the archive's task ``a`` would be written (and with --force an
    existing model replaced) outside ``out``; refused in one line naming the link, nothing written."""
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "model.safetensors").write_text("KEEP")
    out = tmp_path / "out"
    out.mkdir()
    (out / "a").symlink_to(Path("..") / "elsewhere")
    code, text = cli("unpack", archives["plain"], "--all", "-o", out, *(["--force"] if force else []))
    line = _error(text)
    assert code == 1 and f"{out / 'a'} is a link to" in line and "leads outside" in line
    assert sorted(os.listdir(tmp_path / "elsewhere")) == ["model.safetensors"]
    assert (tmp_path / "elsewhere" / "model.safetensors").read_text() == "KEEP"
    assert sorted(os.listdir(out)) == ["a"]  # task b not written either: all or nothing
    code, text = cli("unpack", archives["plain"], "--task", "b", "--task", "a", "-o", out)
    assert code == 1 and "leads outside" in _error(text)
    with tallpack.open(archives["plain"]) as fam, pytest.raises(OutputError, match="leads outside"):
        tallpack.write_tasks(fam, None, out, overwrite=True)
    assert sorted(os.listdir(tmp_path / "elsewhere")) == ["model.safetensors"]


@links
def test_unpack_all_follows_a_task_folder_linked_inside_the_output(archives, tmp_path):
    """A link to a folder inside the output (``out/a -> real``) is followed, as elsewhere (spec §3.6)."""
    out = tmp_path / "out"
    (out / "real").mkdir(parents=True)
    (out / "a").symlink_to("real")
    code, text = cli("unpack", archives["plain"], "--all", "-o", out)
    assert code == 0, text
    assert (out / "real" / "model.safetensors").is_file() and (out / "b" / "2_Dense" / "model.safetensors").is_file()


# -- folder files named like the weights an unpack writes ---------------------------------------------

def _add_file(holder: dict, name: str, like: str = "config.json") -> None:
    holder["files"][name] = holder["files"][like]


@pytest.mark.parametrize("name", ["model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                                  "model-00001-of-00003.safetensors", "model.fp16.safetensors",
                                  "2_Dense/model.safetensors", "2_Dense/pytorch_model.bin"])
def test_a_folder_file_named_like_a_weight_file_is_refused_at_open(archives, tmp_path, name):
    """Such a file was dropped, written beside the weights, or made unpack fail with "written twice
    in one output" (naming neither archive nor task): now the archive is refused when opened,
    in one line naming the archive, the task (or the base) and the file."""
    arch = crafted(archives["plain"], tmp_path / "w.tallpack", lambda m: _add_file(m["tasks"][0], name))
    with pytest.raises(FormatError, match=rf"^{arch}: task 'a': folder file {name!r} has the name of a weight file"):
        tallpack.open(arch)
    code, text = cli("unpack", arch, "--task", "a", "-o", tmp_path / "out")
    assert code == 1 and f"task 'a': folder file {name!r}" in _error(text)
    assert not (tmp_path / "out").exists()
    code, text = cli("verify", arch)
    assert code == 1 and f"folder file {name!r}" in _error(text)
    base = crafted(archives["plain"], tmp_path / "b.tallpack", lambda m: _add_file(m["base"], name))
    code, text = cli("merge", base, "-o", tmp_path / "m")
    assert code == 1 and f"the base: folder file {name!r}" in _error(text)


def test_a_subfolder_weight_file_the_layout_does_not_name_is_still_a_folder_file(archives, tmp_path):
    """Weight files of a subfolder that is no component or module (a pipeline's ``unet_ema/``, a
    module's ``2_Dense/x/``) are kept as folder files (spec §3.6), and written back."""
    names = ["unet_ema/diffusion_pytorch_model.safetensors", "2_Dense/x/model.safetensors", "training_args.bin"]

    def edit(m: dict) -> None:
        for n in names:
            _add_file(m["tasks"][0], n)

    arch = crafted(archives["plain"], tmp_path / "k.tallpack", edit)
    code, text = cli("unpack", arch, "--task", "a", "-o", tmp_path / "out")
    assert code == 0, text
    for n in names:
        assert (tmp_path / "out" / n).read_bytes() == (tmp_path / "out" / "config.json").read_bytes()


# -- exact-tier records ----------------------------------------------------------------------------

def _records(m: dict, task: int = 0) -> list[dict]:
    return m["tasks"][task]["exact"]["files"]


def _record(name: str, data: bytes) -> dict:
    return {"name": name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "role": "file",
            "base64": base64.b64encode(data).decode()}


def _twice(m: dict) -> None:
    files = _records(m)
    files.append(dict(next(f for f in files if f["name"] == "config.json")))


@pytest.mark.parametrize("edit, record, why", [
    (_twice, "config.json", "is listed twice"),
    (lambda m: _records(m).append(_record("model.safetensors", b"x")), "model.safetensors", "is listed twice"),
    (lambda m: _records(m).append(_record("pytorch_model.bin", b"x")), "pytorch_model.bin",
     "has the name of a weight file"),
    (lambda m: _records(m).append(_record("2_Dense/model-00001-of-00002.safetensors", b"x")),
     "2_Dense/model-00001-of-00002.safetensors", "has the name of a weight file"),
], ids=["twice", "twice-weights", "file-named-weights", "module-shard"])
def test_exact_records_an_exact_unpack_cannot_write_fail_verify_too(archives, tmp_path, edit, record, why):
    """verify said "ok" of an archive whose ``unpack --exact`` always failed ("written twice in one
    output", naming only the output): now both say, in one line, the archive, the task and the record."""
    arch = crafted(archives["exact"], tmp_path / "r.tallpack", edit)
    code, text = cli("verify", arch)
    assert code == 1 and f"{arch}: task 'a': file record {record!r} {why}" in text, text
    assert "written twice" not in text and not text.startswith("ok")
    code, text = cli("unpack", arch, "--task", "a", "--exact", "-o", tmp_path / "out")
    assert code == 1 and _error(text) .startswith(f"error: {arch}: task 'a': file record {record!r} {why}")
    assert not (tmp_path / "out").exists()
    code, text = cli("unpack", arch, "--task", "b", "--exact", "-o", tmp_path / "ok")  # the other task is whole
    assert code == 0, text


def test_an_exact_record_that_differs_from_its_folder_file_is_a_verify_problem(archives, tmp_path, caplog):
    """A kept-file record ``modules.json`` whose bytes are not the folder file ``modules.json``'s:
    the writer takes both from one file, so the archive contradicts itself. ``verify`` says so
    (exit 1); ``unpack --exact`` writes the record's bytes (the exact tier is what it promises) with
    a warning, ``unpack`` the folder file's."""
    data = b'[{"idx": 0, "name": "0", "path": "", "type": "x"}]'
    arch = crafted(archives["exact"], tmp_path / "d.tallpack", lambda m: _records(m).append(_record("modules.json", data)))
    code, text = cli("verify", arch)
    assert code == 1 and f"task 'a': file record 'modules.json' (SHA-256 {hashlib.sha256(data).hexdigest()[:12]}" in text
    assert "differs from the folder file" in text and "task 'b'" not in text
    with tallpack.open(arch) as fam:
        tallpack.write_task(fam, "a", tmp_path / "x", exact=True)
        tallpack.write_task(fam, "a", tmp_path / "l")
    assert (tmp_path / "x" / "modules.json").read_bytes() == data
    assert "differs from the folder file" in caplog.text
    assert json.loads((tmp_path / "l" / "modules.json").read_text())[2]["path"] == "2_Dense"
    shutil.rmtree(tmp_path / "x")


# -- names the output cannot take: refused naming the archive and the task -------------------------------

def rename_tensor(m: dict, old: str, new: str) -> None:
    for e in m["tensors"]:
        if e["name"] == old:
            e["name"] = new
        for member in e.get("members") or ():
            if member[0] == old:
                member[0] = new
    for t in m["tasks"]:
        t["keys"] = [new if k == old else k for k in t["keys"]]


@pytest.mark.parametrize("old, new", [("embed.weight", "__metadata__"),
                                      ("2_Dense/linear.weight", "2_Dense/__metadata__")])
def test_a_tensor_named_like_safetensors_metadata_is_refused_naming_archive_and_task(archives, tmp_path, old, new):
    """safetensors keeps ``__metadata__`` (in each file: a module's ``2_Dense/__metadata__`` too):
    unpack and merge said "a tensor named '__metadata__' cannot be stored in safetensors", naming
    neither the archive nor the task; the archive still opens (its tensors read)."""
    arch = crafted(archives["plain"], tmp_path / "t.tallpack", lambda m: rename_tensor(m, old, new))
    with tallpack.open(arch) as fam:
        assert new in fam.keys("a") and fam.get_tensor("a", new).numel()
    code, text = cli("unpack", arch, "--task", "a", "-o", tmp_path / "out")
    assert code == 1 and _error(text) == (f"error: {arch}: task 'a': tensor {new!r} cannot be written: safetensors "
                                          "keeps the name '__metadata__' for a file's metadata")
    code, text = cli("merge", arch, "--task", "b", "-o", tmp_path / "m")
    assert code == 1 and _error(text).startswith(f"error: {arch}: task 'b': tensor {new!r} cannot be written")
    assert not (tmp_path / "out").exists() and not (tmp_path / "m").exists()


def test_a_task_name_that_cannot_be_a_folder_is_refused_naming_the_archive(archives, tmp_path):
    """Task ``..`` with ``unpack --all``: "bad task name '..'" read as if the user had typed it; now
    the line names the archive and says how to write that task (alone, into a folder named for it)."""
    arch = crafted(archives["plain"], tmp_path / "d.tallpack", lambda m: rename_task(m, "b", ".."))
    code, text = cli("unpack", arch, "--all", "-o", tmp_path / "out")
    line = _error(text)
    assert code == 1 and line.startswith(f"error: {arch}: task '..' cannot be a folder of {tmp_path / 'out'} ")
    assert "names a folder" in line and "--task NAME -o FOLDER" in line
    assert not (tmp_path / "out").exists()
    code, text = cli("unpack", arch, "--task", "..", "-o", tmp_path / "dots")
    assert code == 0 and (tmp_path / "dots" / "model.safetensors").is_file(), text
