"""A Hugging Face user's family, end to end (r26): tiny transformers models downloaded into a Hub
cache (``models--org--name/snapshots/<rev>/`` of links into ``../../blobs/``), packed from the
cache's repository folders, unpacked and loaded with ``from_pretrained``; every snapshot file
(``.gitattributes`` too) given back by ``unpack --exact``; and the messages for what a user
types wrong: a repository id, the cache's root, a blob removed, a PEFT adapter."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from test_many_tasks import one_error_line, run

transformers = pytest.importorskip("transformers")

REPOS = {"base": "org/gpt2-base", "chat": "alice/gpt2-chat", "code": "bob/gpt2-code"}


def _to_cache(hub: Path, folder: Path, repo: str, revision: str, main: bool = True) -> Path:
    """Put ``folder``'s files in ``hub`` as huggingface_hub stores a download: blobs named by
    content, the snapshot's files relative links to them, ``refs/main`` naming the snapshot."""
    repo_dir = hub / ("models--" + repo.replace("/", "--"))
    snap = repo_dir / "snapshots" / revision
    (repo_dir / "blobs").mkdir(parents=True, exist_ok=True)
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        blob = repo_dir / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, blob)
        link = snap / f.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, link.parent), link)
    if main:
        (repo_dir / "refs").mkdir(exist_ok=True)
        (repo_dir / "refs" / "main").write_text(revision)
    return snap


def _model(base: "transformers.GPT2LMHeadModel | None", seed: int):
    cfg = transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=64, n_positions=16)
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(cfg)
    if base is not None:
        model.load_state_dict(base.state_dict())
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_((torch.rand(p.shape, generator=g) < 0.1) * torch.randn(p.shape, generator=g) * 0.01)
    return model


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> dict:
    """A Hub cache of a tiny GPT-2 (tied embeddings, sharded) and two fine-tunes, each snapshot
    with its model card and ``.gitattributes``; ``alice/gpt2-chat`` also holds an older snapshot
    that ``refs/main`` does not name."""
    where = tmp_path_factory.mktemp("hub")
    cache = where / "hub"
    base = _model(None, 0)
    snaps = {}
    for i, (name, repo) in enumerate(REPOS.items()):
        model = base if name == "base" else _model(base, i)
        folder = where / "saved" / name
        model.save_pretrained(folder, max_shard_size="8KB", safe_serialization=True)
        (folder / "README.md").write_text(f"---\nlicense: mit\n---\n# {repo}\n")
        (folder / ".gitattributes").write_text("*.safetensors filter=lfs diff=lfs merge=lfs -text\n")
        snaps[name] = _to_cache(cache, folder, repo, f"{i + 1}" * 40)
    old = where / "saved" / "chat-old"
    _model(base, 9).save_pretrained(old, max_shard_size="8KB")
    _to_cache(cache, old, REPOS["chat"], "0" * 40, main=False)
    repos = {n: cache / ("models--" + r.replace("/", "--")) for n, r in REPOS.items()}
    return {"cache": cache, "snaps": snaps, "repos": repos, "where": where}


@pytest.fixture(scope="module")
def packed(hub) -> Path:
    """``tallpack pack --exact`` of the cache's repository folders, as a user lists them."""
    out = hub["where"] / "family.tallpack"
    run("-q", "pack", "--exact", "--base", hub["repos"]["base"], "-o", out, hub["repos"]["chat"], hub["repos"]["code"])
    return out


def _logits(folder: Path) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(torch.arange(8)[None]).logits


def test_cache_repository_folders_pack_their_refs_main_snapshots(hub, packed):
    import tallpack

    with tallpack.open(packed) as fam:
        assert fam.tasks == ("gpt2-chat", "gpt2-code")  # the repositories' names, not models--... or a hash
        chat = transformers.GPT2LMHeadModel.from_pretrained(hub["snaps"]["chat"])  # refs/main's, not the older one
        got = fam.state_dict("gpt2-chat", exact=True)
        assert torch.equal(got["transformer.h.0.mlp.c_fc.weight"], chat.transformer.h[0].mlp.c_fc.weight)


def test_unpack_exact_gives_every_snapshot_file_back(hub, packed):
    out = hub["where"] / "exact"
    run("-q", "unpack", packed, "--all", "--exact", "-o", out)
    for name in ("chat", "code"):
        snap, got = hub["snaps"][name], out / f"gpt2-{name}"
        assert sorted(p.name for p in got.iterdir()) == sorted(p.name for p in snap.iterdir())
        assert ".gitattributes" in {p.name for p in got.iterdir()}
        for f in snap.iterdir():
            assert (got / f.name).read_bytes() == f.read_bytes(), f.name
        assert torch.equal(_logits(got), _logits(snap))


def test_lossy_unpack_keeps_gitattributes_and_loads(hub, packed):
    out = hub["where"] / "lossy"
    run("-q", "unpack", packed, "--task", "gpt2-code", "-o", out)
    assert (out / ".gitattributes").read_bytes() == (hub["snaps"]["code"] / ".gitattributes").read_bytes()
    a, b = _logits(out), _logits(hub["snaps"]["code"])
    assert a.shape == b.shape and (a - b).norm() < 0.5 * b.norm()


def test_local_dir_download_keeps_gitattributes_not_its_cache(hub, tmp_path):
    """``hf download --local-dir``: real files, and huggingface_hub's metadata under ``.cache/``."""
    import tallpack

    local = tmp_path / "gpt2-local"
    shutil.copytree(hub["snaps"]["code"], local)  # copies the links' files
    meta = local / ".cache" / "huggingface" / "download"
    meta.mkdir(parents=True)
    (meta / "config.json.metadata").write_text("abc\n123\n")
    tallpack.pack(hub["snaps"]["base"], [local], tmp_path / "a.tallpack")
    with tallpack.open(tmp_path / "a.tallpack") as fam:
        assert ".gitattributes" in fam.files("gpt2-local")
        assert not any(n.startswith(".cache") for n in fam.files("gpt2-local"))


def test_old_local_dir_download_links_into_the_cache_blobs(hub, tmp_path):
    """huggingface_hub before 0.23: ``--local-dir`` made a download's large files links to the
    cache's ``blobs/`` (absolute); they are read, while a link elsewhere outside the folder, or to
    a file of the repository that is not a blob, is still refused."""
    import tallpack
    from tallpack.errors import CheckpointError

    local = tmp_path / "ld"
    snap = hub["snaps"]["code"]
    local.mkdir()
    for f in snap.iterdir():
        if f.name.endswith(".safetensors"):
            os.symlink(f.resolve(), local / f.name)  # into models--bob--gpt2-code/blobs/
        else:
            shutil.copyfile(f, local / f.name)
    tallpack.pack(hub["snaps"]["base"], {"ld": local}, tmp_path / "a.tallpack", exact=True)
    with tallpack.open(tmp_path / "a.tallpack") as fam:
        assert fam.verify() == []
    (tmp_path / "elsewhere").mkdir()
    shard = next(local.glob("*.safetensors"))
    blob = shard.resolve()
    outside = [tmp_path / "elsewhere" / "x.safetensors", hub["repos"]["code"] / "snapshots" / "x.safetensors"]
    for target in outside:
        shutil.copyfile(blob, target)
        shard.unlink()
        os.symlink(target, shard)
        with pytest.raises(CheckpointError, match="outside the input folder"):
            tallpack.pack(hub["snaps"]["base"], {"ld": local}, tmp_path / "b.tallpack")
    outside[1].unlink()  # the module's cache, as it was


def test_repository_of_several_snapshots_without_refs_main_names_them(hub, tmp_path):
    repo = tmp_path / "models--alice--gpt2-chat"
    shutil.copytree(hub["repos"]["chat"], repo, symlinks=True)
    (repo / "refs" / "main").unlink()
    line = one_error_line(run("pack", "--base", hub["snaps"]["base"], "-o", tmp_path / "x.tallpack", repo, ok=False))
    assert "a Hugging Face cache repository of 2 snapshots" in line and "0" * 40 in line
    assert f"snapshots/{'2' * 40}" in line  # the command to type
    assert not (tmp_path / "x.tallpack").exists()


def test_cache_root_given_as_a_task_names_its_repositories(hub, tmp_path):
    r = run("pack", "--base", hub["repos"]["base"], "-o", tmp_path / "x.tallpack", hub["cache"], ok=False)
    assert r.exit_code == 2 and "holds no model but 3 model folders" in r.output
    assert "models--alice--gpt2-chat" in r.output and "models--org--gpt2-base, " not in r.output.split("give")[1]


def test_glob_of_repositories_leaves_the_base_out(hub, tmp_path):
    """The base given as its snapshot, the tasks as a glob over the repositories that matches it too."""
    import tallpack

    out = tmp_path / "g.tallpack"
    run("-q", "pack", "--base", hub["snaps"]["base"], "-o", out, *sorted(hub["repos"].values()))
    with tallpack.open(out) as fam:
        assert fam.tasks == ("gpt2-chat", "gpt2-code")


def test_repository_id_points_at_the_cache(hub, tmp_path, monkeypatch):
    args = ("pack", "--base", "org/gpt2-base", "-o", tmp_path / "x.tallpack", "alice/gpt2-chat")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub["cache"]))
    line = one_error_line(run(*args, ok=False))
    assert line.endswith(f"download is in the cache: pass {hub['repos']['base']}"), line
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    line = one_error_line(run(*args, ok=False))
    assert "a Hugging Face repository id? tallpack reads local files only: download it first " \
           f"(hf download org/gpt2-base, into {tmp_path / 'empty' / 'models--org--gpt2-base'})" in line


def test_blob_removed_from_the_cache_is_named(hub, tmp_path):
    repo = tmp_path / "models--bob--gpt2-code"
    shutil.copytree(hub["repos"]["code"], repo, symlinks=True)
    shard = sorted((repo / "snapshots").glob("*/model-0000*.safetensors"))[-1]
    shard.resolve().unlink()
    line = one_error_line(run("pack", "--base", hub["repos"]["base"], "-o", tmp_path / "x.tallpack", repo, ok=False))
    assert f"{shard.name}: a link to a file that does not exist (../../blobs/" in line
    assert "the folder is incomplete" in line


def test_peft_adapter_is_named_as_such(hub, tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    save_file({"base_model.model.transformer.h.0.attn.c_attn.lora_A.weight": torch.zeros(4, 16),
               "base_model.model.transformer.h.0.attn.c_attn.lora_B.weight": torch.zeros(48, 4)},
              adapter / "adapter_model.safetensors")
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    line = one_error_line(run("pack", "--base", hub["repos"]["base"], "-o", tmp_path / "x.tallpack", adapter,
                              ok=False))
    assert "it is a PEFT adapter ('base_model.model.transformer.h.0.attn.c_attn.lora_A.weight')" in line
    assert "merge_and_unload()" in line and "--allow-mismatch" not in line
