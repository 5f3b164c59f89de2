"""Links in an output folder (spec §3.6): every file an output writes or removes stays inside the
folder. An earlier pipeline's or module's folder that is a link out of it (``out/vae ->
../elsewhere``) is refused, with one line naming the link and where it leads, and nothing outside
is removed or changed (``unpack``, ``unpack --exact``, ``merge``, with ``--force``); a link to a
folder inside the output is followed, and never makes one of the output's own files an earlier
output's; the output folder itself may be a link (the user named it); a component named
``../x`` or by an absolute path is never listed, so never cleaned."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import tallpack
from tallpack.errors import OutputError
from tallpack.folders import safe_target
from tallpack.fsutil import atomic_write, remove_found_on_commit, transaction
from tallpack_cli.main import main

pytestmark = pytest.mark.skipif(not hasattr(os, "symlink") or os.name == "nt", reason="needs symbolic links")

WEIGHTS = ("model.safetensors", "diffusion_pytorch_model.safetensors", "pytorch_model.bin")


def _model(folder: Path, base: dict[str, torch.Tensor] | None, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = ({"embed.weight": torch.randn(16, 8, generator=g), "layer.weight": torch.randn(8, 8, generator=g)}
          if base is None else {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()})
    folder.mkdir(parents=True)
    save_file(sd, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    return sd


@pytest.fixture(scope="module")
def archives(tmp_path_factory) -> dict[str, Path]:
    """A tiny transformers-style family (base, a, b: one model.safetensors and a config each),
    packed plain and with the exact tier: a few KB."""
    root = tmp_path_factory.mktemp("links")
    base = _model(root / "base", None, 0)
    tasks = {t: root / t for t in ("a", "b")}
    for i, p in enumerate(tasks.values()):
        _model(p, base, i + 1)
    out = {"plain": root / "f.tallpack", "exact": root / "x.tallpack"}
    tallpack.pack(root / "base", tasks, out["plain"], chunk_elements=64, threads=1)
    tallpack.pack(root / "base", tasks, out["exact"], exact=True, chunk_elements=64, threads=1)
    return out


def cli(*args: object) -> tuple[int, str]:
    r = CliRunner().invoke(main, ["-q", *map(str, args)])
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception  # no traceback
    return r.exit_code, r.output


def snapshot(folder: Path) -> dict[str, bytes | str]:
    """Every entry under ``folder`` (links not followed): a file's bytes, a link's target."""
    out: dict[str, bytes | str] = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for n in [*dirnames, *filenames]:
            p = Path(dirpath) / n
            rel = str(p.relative_to(folder))
            out[rel] = f"-> {os.readlink(p)}" if p.is_symlink() else "<dir>" if p.is_dir() else p.read_bytes()
    return out


def elsewhere(tmp_path: Path) -> Path:
    """A folder outside the output holding weight files of the names a sweep looks for."""
    e = tmp_path / "elsewhere"
    e.mkdir()
    for n in WEIGHTS:
        (e / n).write_bytes(b"KEEP " + n.encode())
    return e


COMMANDS = {
    "unpack": lambda a: ("unpack", a["plain"], "--task", "a"),
    "unpack --exact": lambda a: ("unpack", a["exact"], "--task", "a", "--exact"),
    "merge": lambda a: ("merge", a["plain"]),
}
LISTS = {  # the earlier output's document that lists a folder, and the folder
    "pipeline": ("model_index.json", {"_class_name": "P", "vae": ["diffusers", "AutoencoderKL"]}, "vae"),
    "modules": ("modules.json", [{"idx": 0, "path": ""}, {"idx": 1, "path": "2_Dense"}], "2_Dense"),
}


@pytest.mark.parametrize("listed", sorted(LISTS))
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_force_never_removes_weights_through_a_linked_folder(archives, tmp_path, command, listed):
    index, doc, folder = LISTS[listed]
    outside = elsewhere(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / folder).symlink_to("../elsewhere")
    (out / index).write_text(json.dumps(doc))
    (out / "model.safetensors").write_bytes(b"an earlier output")
    before, before_out = snapshot(outside), snapshot(out)
    rc, output = cli(*COMMANDS[command](archives), "-o", out, "--force")
    assert rc == 1
    lines = output.strip().splitlines()
    assert len(lines) == 1, output
    link = out / folder
    assert lines[0] == (f"error: {link}/diffusion_pytorch_model.safetensors: its folder leads outside {out} "
                        f"({link} is a link to {outside.resolve()}); refusing to remove it as an earlier output's "
                        "weights (remove the link, or name another output folder)")
    assert snapshot(outside) == before  # nothing outside removed or changed
    assert snapshot(out) == before_out  # refused before anything was written


def test_without_force_a_linked_folder_is_refused_too(archives, tmp_path):
    outside = elsewhere(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "vae").symlink_to(outside)
    (out / "model_index.json").write_text(json.dumps(LISTS["pipeline"][1]))
    before = snapshot(outside)
    rc, output = cli("unpack", archives["plain"], "--task", "a", "-o", out)
    assert rc == 1 and "its folder leads outside" in output and len(output.strip().splitlines()) == 1
    assert snapshot(outside) == before


def test_a_linked_folder_without_weights_is_left_alone(archives, tmp_path):
    """Nothing to remove through the link: the output is written, the link and its folder kept."""
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "notes.txt").write_text("mine")
    out = tmp_path / "out"
    out.mkdir()
    (out / "vae").symlink_to(outside)
    (out / "model_index.json").write_text(json.dumps(LISTS["pipeline"][1]))
    before = snapshot(outside)
    rc, output = cli("unpack", archives["plain"], "--task", "a", "-o", out, "--force")
    assert rc == 0, output
    assert snapshot(outside) == before and (out / "vae").is_symlink() and (out / "model.safetensors").is_file()


def test_the_output_folder_itself_may_be_a_link(archives, tmp_path):
    """``-o link``: the user named it; --force replaces the earlier weights in the folder it leads
    to (its top and its listed component folders), and nothing else."""
    real, outside = tmp_path / "real", elsewhere(tmp_path)
    (real / "vae").mkdir(parents=True)
    (real / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"stale")
    (real / "pytorch_model.bin").write_bytes(b"stale")
    (real / "model_index.json").write_text(json.dumps(LISTS["pipeline"][1]))
    link = tmp_path / "link"
    link.symlink_to(real)
    before = snapshot(outside)
    rc, output = cli("unpack", archives["plain"], "--task", "a", "-o", link, "--force")
    assert rc == 0, output
    with tallpack.open(archives["plain"]) as fam:
        want = fam.state_dict("a")
    got = load_file(real / "model.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    assert not (real / "pytorch_model.bin").exists()
    assert not (real / "vae" / "diffusion_pytorch_model.safetensors").exists()
    assert snapshot(outside) == before and link.is_symlink()


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_link_to_the_output_itself_never_removes_the_new_weights(archives, tmp_path, command):
    """``out/vae -> .``: ``vae/model.safetensors`` is the output's own ``model.safetensors``, not an
    earlier output's: it is kept (the sweep compares real paths)."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "vae").symlink_to(".")
    (out / "model_index.json").write_text(json.dumps(LISTS["pipeline"][1]))
    (out / "model.safetensors").write_bytes(b"an earlier output")
    rc, output = cli(*COMMANDS[command](archives), "-o", out, "--force")
    assert rc == 0, output
    assert load_file(out / "model.safetensors")  # written, and still there


def test_a_link_to_a_folder_inside_is_followed(archives, tmp_path):
    """``out/vae -> old_vae`` (inside): its stale weights are the output folder's, and go."""
    out = tmp_path / "out"
    (out / "old_vae").mkdir(parents=True)
    (out / "old_vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"stale")
    (out / "old_vae" / "config.json").write_text("{}")
    (out / "vae").symlink_to("old_vae")
    (out / "model_index.json").write_text(json.dumps(LISTS["pipeline"][1]))
    rc, output = cli("unpack", archives["plain"], "--task", "a", "-o", out, "--force")
    assert rc == 0, output
    assert sorted(os.listdir(out / "old_vae")) == ["config.json"] and (out / "vae").is_symlink()


@pytest.mark.parametrize("listed", ["../elsewhere", "/ABS", "elsewhere/../../elsewhere", "./../elsewhere"])
@pytest.mark.parametrize("index", ["model_index.json", "modules.json"])
def test_a_component_named_outside_is_never_listed(archives, tmp_path, listed, index):
    outside = elsewhere(tmp_path)
    name = str(outside) if listed == "/ABS" else listed
    out = tmp_path / "out"
    out.mkdir()
    doc = {name: ["diffusers", "AutoencoderKL"]} if index == "model_index.json" else [{"path": name}]
    (out / index).write_text(json.dumps(doc))
    before = snapshot(outside)
    rc, output = cli("unpack", archives["plain"], "--task", "a", "-o", out, "--force")
    assert rc == 0, output
    assert snapshot(outside) == before


def test_writing_makes_no_folder_through_a_link_out(tmp_path):
    """The refusal comes before any folder is made: none appears outside."""
    out, outside = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    outside.mkdir()
    (out / "2_Router").symlink_to(outside)
    with pytest.raises(OutputError) as e:
        safe_target(out, "2_Router/query_0_Dense/model.safetensors")
    assert str(e.value) == (f"{out}/2_Router/query_0_Dense/model.safetensors: its folder leads outside {out} "
                            f"({out}/2_Router is a link to {outside.resolve()}); refusing to write there")
    assert os.listdir(outside) == []


def test_a_dangling_link_is_one_line(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "vae").symlink_to("gone")  # would lead inside, to nothing
    with pytest.raises(OutputError, match=r"vae, a link to .*gone, which does not exist; refusing to write there"):
        safe_target(out, "vae/config.json")
    assert sorted(os.listdir(out)) == ["vae"]


def test_a_link_put_in_after_the_check_is_refused_at_the_commit(tmp_path):
    """A component folder that was inside when the output began and is a link out by its commit:
    the commit asks again, refuses, and removes nothing (the new files are not put in place)."""
    outside = elsewhere(tmp_path)
    out = tmp_path / "out"
    (out / "vae").mkdir(parents=True)
    (out / "vae" / "model.safetensors").write_bytes(b"stale")
    before = snapshot(outside)
    with pytest.raises(OutputError, match=r"vae/model.safetensors: its folder leads outside .*is a link to"):
        with transaction(overwrite=True):
            atomic_write(out / "model.safetensors", lambda tmp: tmp.write_bytes(b"new"))
            remove_found_on_commit(out, lambda: [n for n in ("vae/model.safetensors",) if (out / n).exists()])
            shutil.rmtree(out / "vae")
            (out / "vae").symlink_to(outside)
    assert snapshot(outside) == before and not (out / "model.safetensors").exists()


def test_a_folder_written_into_that_becomes_a_link_is_refused_at_the_commit(tmp_path):
    outside = elsewhere(tmp_path)
    out = tmp_path / "out"
    (out / "unet").mkdir(parents=True)
    before = snapshot(outside)
    with pytest.raises(OutputError, match=r"unet: now leads to .*elsewhere, not .*out/unet where this output's"):
        with transaction(overwrite=True):
            atomic_write(out / "unet" / "model.safetensors", lambda tmp: tmp.write_bytes(b"new"))
            (out / "unet").rename(out / "moved")
            (out / "unet").symlink_to(outside)
    assert snapshot(outside) == before


def test_two_names_of_one_file_in_one_output_are_refused(tmp_path):
    """``out/vae -> unet`` (inside): ``vae/x`` and ``unet/x`` are one file, which would hold
    whichever was renamed last."""
    out = tmp_path / "out"
    (out / "unet").mkdir(parents=True)
    (out / "vae").symlink_to("unet")
    with pytest.raises(OutputError, match=r"vae/x.safetensors: the same file as .*unet/x.safetensors"):
        with transaction(overwrite=True):
            atomic_write(out / "unet" / "x.safetensors", lambda tmp: tmp.write_bytes(b"unet"))
            atomic_write(out / "vae" / "x.safetensors", lambda tmp: tmp.write_bytes(b"vae"))
    assert os.listdir(out / "unet") == []
