"""Diffusers pipeline folders, packed and unpacked whole: every component's weights as tensors named
``COMPONENT/NAME`` (``unet/conv_in.weight``), written back into their own folders under their own
names (sharded like the original, with their own index), the other files kept; exact unpacks byte
for byte; one-line errors for families that mix pipelines and single models."""

from __future__ import annotations

import filecmp
import json
import logging
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import diffusers  # a test dependency (pyproject's "test" extra): missing, these tests fail, not skip
import tallpack
from conftest import cli_ok as _cli, expected_reconstruction, pack_ab as _pack
from tallpack.errors import IncompatibleCheckpointsError
from tallpack.folders import component_of
from tallpack.sharding import DIFFUSERS_SINGLE, _by_folder, plan_by_size_as, plan_components_by_size, plan_from_layout
from tallpack_cli.main import main

diffusers.utils.logging.set_verbosity_error()


def _models(seed: int = 0):
    from diffusers import UNet2DModel, VQModel

    torch.manual_seed(seed)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=8)
    vqvae = VQModel(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                    up_block_types=("UpDecoderBlock2D",), block_out_channels=(8,), layers_per_block=1,
                    latent_channels=3, num_vq_embeddings=16, norm_num_groups=8, vq_embed_dim=3)
    return unet, vqvae


def _perturb(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            touch = (torch.rand(p.shape, generator=g) < 0.2).float()
            p.add_(touch * 0.01 * torch.randn(p.shape, generator=g))


def _family(root: Path, **save) -> dict[str, Path]:
    """An LDM pipeline (unet, vqvae, scheduler) saved by diffusers: the base and two DreamBooth-like
    fine-tunes of its unet (the vqvae untouched), each a few hundred KB."""
    from diffusers import DDIMScheduler, LDMPipeline

    unet, vqvae = _models()
    out = {}
    for i, name in enumerate(["base", "a", "b"]):
        if i:
            _perturb(unet, i)
        LDMPipeline(vqvae=vqvae, unet=unet, scheduler=DDIMScheduler()).save_pretrained(root / name, **save)
        out[name] = root / name
    return out


def _state(folder: Path) -> dict[str, torch.Tensor]:
    """A pipeline folder's weights as diffusers loads them, named as the archive names them."""
    pipe = diffusers.DiffusionPipeline.from_pretrained(folder)
    return {f"{c}/{k}": v for c in ("unet", "vqvae") for k, v in getattr(pipe, c).state_dict().items()}


def _files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> dict[str, Path]:
    return _family(tmp_path_factory.mktemp("ldm"))


def test_pipeline_round_trip_through_the_cli(plain, tmp_path):
    """pack, unpack --all, merge and verify of diffusers pipelines: the fine-tuned unet masked,
    the untouched vqvae stored once, each task's folder loaded by DiffusionPipeline.from_pretrained
    with the paper's theta_0 + m_t * tau_MTL, its files under their own names."""
    arch = _pack(plain, tmp_path / "ldm.tallpack")
    fam = tallpack.open(arch)
    keys = fam.keys("a")
    assert keys[0].startswith("unet/") and any(k.startswith("vqvae/") for k in keys)
    assert set(fam.files("a")) == {"model_index.json", "scheduler/scheduler_config.json", "unet/config.json",
                                   "vqvae/config.json"}
    kinds = fam.manifest.stats["kinds"]
    vq = sum(k.startswith("vqvae/") for k in keys)
    assert kinds.get("shared", 0) >= vq > 0 and kinds.get("merged", 0) > 0  # the untouched vqvae: stored once
    sd = fam.state_dict("a")
    assert torch.equal(fam.get_tensor("a", "unet/conv_in.weight"), sd["unet/conv_in.weight"])
    _cli("unpack", arch, "--all", "-o", tmp_path / "out")
    base = _state(plain["base"])
    tasks = {t: _state(plain[t]) for t in ("a", "b")}
    want = expected_reconstruction(base, tasks, {t: fam.task_info(t).lam for t in ("a", "b")})
    for t in ("a", "b"):
        out = tmp_path / "out" / t
        assert _files(out) == _files(plain[t])  # the same names, weights in their component folders
        got = _state(out)
        assert set(got) == set(tasks[t])
        for k, v in got.items():
            assert torch.equal(v, want[t][k]), k
        assert all(torch.equal(got[k], tasks[t][k]) for k in got if k.startswith("vqvae/"))  # shared, exact
    assert any(not torch.equal(want["a"][k], tasks["a"][k]) for k in want["a"])  # the masks did something
    _cli("merge", arch, "-o", tmp_path / "merged")
    merged = fam.merged()
    got = _state(tmp_path / "merged")
    assert _files(tmp_path / "merged") == _files(plain["base"])
    assert all(torch.equal(got[k], merged[k]) for k in got)
    assert "ok" in _cli("verify", arch).output


def test_exact_unpack_gives_every_file_back(tmp_path):
    """--exact of a pipeline whose unet is sharded (diffusers' own shard names and index) gives
    back every file byte for byte; verify rebuilds and checks them."""
    fam = _family(tmp_path / "src", max_shard_size="100KB")
    assert len(list((fam["a"] / "unet").glob("diffusion_pytorch_model-*.safetensors"))) > 2
    arch = _pack(fam, tmp_path / "ldm.tallpack", "--exact")
    record = tallpack.open(arch).task_info("a").exact
    names = {f["name"]: f.get("prefix") for f in record["files"]}
    assert names["unet/diffusion_pytorch_model.safetensors.index.json"] is None
    assert names["vqvae/diffusion_pytorch_model.safetensors"] == "vqvae/"
    _cli("unpack", arch, "--task", "a", "--exact", "-o", tmp_path / "a")
    assert _files(tmp_path / "a") == _files(fam["a"])
    for name in _files(fam["a"]):
        assert filecmp.cmp(fam["a"] / name, tmp_path / "a" / name, shallow=False), name
    assert "ok" in _cli("verify", arch).output


def test_sharded_component_is_sharded_again(tmp_path):
    """A lossy unpack writes a sharded unet in the original's shards, with its own
    diffusion_pytorch_model.safetensors.index.json (index metadata kept), which diffusers loads."""
    fam = _family(tmp_path / "src", max_shard_size="100KB")
    arch = _pack(fam, tmp_path / "ldm.tallpack")
    _cli("unpack", arch, "--task", "b", "-o", tmp_path / "b")
    assert _files(tmp_path / "b") == _files(fam["b"])
    name = "diffusion_pytorch_model.safetensors.index.json"
    index, orig = (json.loads((d / "unet" / name).read_text()) for d in (tmp_path / "b", fam["b"]))
    assert index["weight_map"] == orig["weight_map"]
    assert index["metadata"]["total_size"] == orig["metadata"]["total_size"]
    got, want = _state(tmp_path / "b"), tallpack.open(arch).state_dict("b")
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in got)
    # shards of a size asked for instead: each component sharded apart, in its folder, with its own index
    _cli("unpack", arch, "--task", "b", "-o", tmp_path / "c", "--max-shard-size", "5GB")
    assert [n for n in _files(tmp_path / "c") if n.endswith((".safetensors", ".index.json"))] == \
        ["unet/diffusion_pytorch_model.safetensors", "vqvae/diffusion_pytorch_model.safetensors"]
    _cli("unpack", arch, "--task", "b", "-o", tmp_path / "d", "--max-shard-size", "150KB")
    shards = sorted((tmp_path / "d" / "unet").glob("diffusion_pytorch_model-*-of-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "d" / "unet" / name).is_file()
    assert not list((tmp_path / "d").glob("*.safetensors"))
    got = _state(tmp_path / "d")
    assert all(torch.equal(got[k], want[k]) for k in got)


def test_variant_component_unpacks_under_the_plain_name(tmp_path):
    """A pipeline saved with variant="fp16" names its weights diffusion_pytorch_model.fp16.safetensors;
    an unpack writes diffusion_pytorch_model.safetensors, which loads without variant=; --exact
    gives back the variant's names."""
    fam = _family(tmp_path / "src", variant="fp16")
    assert (fam["a"] / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    arch = _pack(fam, tmp_path / "ldm.tallpack", "--exact")
    _cli("unpack", arch, "--task", "a", "-o", tmp_path / "a")
    assert (tmp_path / "a" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert not list((tmp_path / "a").rglob("*.fp16.*"))
    got, want = _state(tmp_path / "a"), tallpack.open(arch).state_dict("a")
    assert all(torch.equal(got[k], want[k]) for k in got)
    _cli("unpack", arch, "--task", "a", "--exact", "-o", tmp_path / "x")
    for name in _files(fam["a"]):
        assert filecmp.cmp(fam["a"] / name, tmp_path / "x" / name, shallow=False), name


def test_force_over_another_layout_leaves_no_stale_component_weights(tmp_path):
    fam = _family(tmp_path / "src", max_shard_size="100KB")
    arch = _pack(fam, tmp_path / "ldm.tallpack")
    out = tmp_path / "a"
    _cli("unpack", arch, "--task", "a", "-o", out)
    sharded = sorted(p.name for p in (out / "unet").glob("diffusion_pytorch_model*"))
    assert len(sharded) > 3
    plain = _pack(_family(tmp_path / "one"), tmp_path / "one.tallpack")
    _cli("unpack", plain, "--task", "a", "-o", out, "--force")
    assert sorted(p.name for p in (out / "unet").glob("diffusion_pytorch_model*")) == \
        ["diffusion_pytorch_model.safetensors"]
    assert _state(out) is not None


def test_bare_sharded_unet_folder_gets_diffusers_index(tmp_path):
    """A single diffusers model folder (a pipeline's unet/ passed alone), sharded, packs (its
    shard index is diffusers') and unpacks with diffusers' index name, which UNet2DModel loads."""
    from diffusers import UNet2DModel

    unet, _ = _models()
    unet.save_pretrained(tmp_path / "base", max_shard_size="100KB")
    _perturb(unet, 1)
    unet.save_pretrained(tmp_path / "a", max_shard_size="100KB")
    _cli("pack", "--base", tmp_path / "base", "--task", f"a={tmp_path / 'a'}", "-o", tmp_path / "u.tallpack")
    _cli("unpack", tmp_path / "u.tallpack", "--task", "a", "-o", tmp_path / "out")
    assert _files(tmp_path / "out") == _files(tmp_path / "a")
    got = UNet2DModel.from_pretrained(tmp_path / "out").state_dict()
    want = tallpack.open(tmp_path / "u.tallpack").state_dict("a")
    assert all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("shard", ["100KB", "10GB"])
def test_single_diffusers_model_resharded_keeps_diffusers_names(tmp_path, shard):
    """A single diffusers model folder (sharded or not) unpacked or merged with --max-shard-size is
    sharded under diffusers' names and index (one file: diffusion_pytorch_model.safetensors), which
    UNet2DModel.from_pretrained loads; model-0000i-of-0000n it does not look for."""
    from diffusers import UNet2DModel

    unet, _ = _models()
    unet.save_pretrained(tmp_path / "base", max_shard_size=shard)
    _perturb(unet, 1)
    unet.save_pretrained(tmp_path / "a", max_shard_size=shard)
    arch = tmp_path / "u.tallpack"
    _cli("pack", "--base", tmp_path / "base", "--task", f"a={tmp_path / 'a'}", "-o", arch)
    fam = tallpack.open(arch)
    for cmd, size, want in (("unpack", "50KB", fam.state_dict("a")), ("unpack", "10MB", fam.state_dict("a")),
                            ("merge", "50KB", fam.merged())):
        out = tmp_path / f"{cmd}-{size}"
        _cli(cmd, arch, *(["--task", "a"] if cmd == "unpack" else []), "-o", out, "--max-shard-size", size)
        weights = [n for n in _files(out) if n != "config.json"]
        assert weights == ["diffusion_pytorch_model.safetensors"] if size == "10MB" else \
            all(n.startswith("diffusion_pytorch_model") for n in weights) and len(weights) > 2, weights
        got = UNet2DModel.from_pretrained(out).state_dict()
        assert all(torch.equal(got[k], want[k]) for k in want)


def _error(base: Path, task: Path, tmp_path: Path) -> str:
    r = CliRunner().invoke(main, ["pack", "--base", str(base), "--task", f"t={task}", "-o",
                                  str(tmp_path / "x.tallpack")])
    assert r.exit_code != 0 and "Traceback" not in r.output
    assert not (tmp_path / "x.tallpack").exists()
    return r.output


def test_mixing_pipelines_and_single_models_is_refused(plain, tmp_path):
    """One line, naming the pipeline's component folder that the single model is (by its folder's
    name, else by the tensor names it shares), and whose components they are."""
    out = _error(plain["base"], plain["a"] / "unet", tmp_path)
    assert out.count("\n") == 1 and "task 't'" in out and "is a diffusers pipeline (components unet, vqvae)" in out
    assert out.rstrip().endswith(f"the base's component folder {plain['base'] / 'unet'}")
    out = _error(plain["base"] / "vqvae", plain["a"], tmp_path)
    assert out.count("\n") == 1 and "a diffusers pipeline (components unet, vqvae), but the base" in out
    assert "is a single model;" in out and out.rstrip().endswith(f"the task's component folder {plain['a'] / 'vqvae'}")
    bare = tmp_path / "vq.safetensors"  # no folder name to go by: the component sharing its tensor names
    bare.write_bytes((plain["a"] / "vqvae" / "diffusion_pytorch_model.safetensors").read_bytes())
    out = _error(plain["base"], bare, tmp_path)
    assert out.rstrip().endswith(f"the base's component folder {plain['base'] / 'vqvae'}")
    with pytest.raises(IncompatibleCheckpointsError, match="a single model"):
        tallpack.pack(plain["base"], {"t": plain["a"] / "unet"}, tmp_path / "y.tallpack")


def test_component_of_another_model_is_refused(plain, tmp_path):
    """A task whose vqvae is another model (no tensor name in common) is refused naming the
    component, although its unet alone would make it look fine-tuned from the base."""
    import shutil

    from diffusers import UNet2DModel

    other = tmp_path / "other"
    shutil.copytree(plain["a"], other)
    shutil.rmtree(other / "vqvae")
    UNet2DModel(sample_size=8, block_out_channels=(8, 8), norm_num_groups=8, layers_per_block=1,
                down_block_types=("DownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "UpBlock2D")).save_pretrained(other / "vqvae")
    out = _error(plain["base"], other, tmp_path)
    assert out.count("\n") == 1 and "component 'vqvae' does not look fine-tuned from the base's" in out


def test_missing_component_is_stored_for_the_tasks_that_have_it(plain, tmp_path, caplog):
    """A task without the base's vqvae: warned, naming the task and the component; its vqvae
    tensors are the ones only some tasks have (stored for those tasks), its unet masked as usual."""
    import shutil

    partial = tmp_path / "partial"
    shutil.copytree(plain["b"], partial)
    shutil.rmtree(partial / "vqvae")
    with caplog.at_level(logging.WARNING, logger="tallpack"):
        tallpack.pack(plain["base"], {"a": plain["a"], "b": partial}, tmp_path / "p.tallpack")
    assert "task 'b'" in caplog.text and "has no component 'vqvae'" in caplog.text
    fam = tallpack.open(tmp_path / "p.tallpack")
    assert not any(k.startswith("vqvae/") for k in fam.keys("b"))
    a = fam.state_dict("a")
    want = _state(plain["a"])
    assert all(torch.equal(a[k], want[k]) for k in a if k.startswith("vqvae/"))
    _cli("unpack", tmp_path / "p.tallpack", "--task", "b", "-o", tmp_path / "b")
    assert not (tmp_path / "b" / "vqvae").exists()
    assert (tmp_path / "b" / "unet" / "diffusion_pytorch_model.safetensors").is_file()


_COMPONENT = st.sampled_from(["unet", "vae", "text_encoder"])


@settings(max_examples=60, deadline=None)
@given(counts=st.lists(st.tuples(_COMPONENT, st.integers(1, 4), st.integers(1, 3)), min_size=1, max_size=4,
                       unique_by=lambda c: c[0]),
       drop=st.integers(0, 3))
def test_component_layout_plans_every_key_into_its_component(counts, drop):
    """A component layout (spec §3.6) puts every key in exactly one file of its own component's
    folder: by position where the component's counts add up, else (a merged model that left
    tensors out) in one unsharded file of the component's name."""
    keys, shards = [], []
    for c, files, per in counts:
        names = [f"{c}/w{i}" for i in range(files * per)]
        keys += names
        shards += [[f"{c}/diffusion_pytorch_model-{i + 1:05d}-of-{files:05d}.safetensors", per] for i in range(files)]
    kept = keys[drop:] if drop < len(keys) else keys
    plan = plan_from_layout(kept, shards)
    assert plan is not None
    placed = [k for names in plan.values() for k in names]
    assert sorted(placed) == sorted(kept)
    for f, names in plan.items():
        assert all(k.split("/")[0] == f.split("/")[0] for k in names)
    if kept == keys:
        assert list(plan) == [s[0] for s in shards]


@settings(max_examples=60, deadline=None)
@given(counts=st.lists(st.tuples(_COMPONENT, st.integers(1, 4), st.integers(1, 3)), min_size=1, max_size=4,
                       unique_by=lambda t: t[0]),
       drop=st.integers(0, 3), limit=st.integers(1, 40))
def test_variant_layout_of_its_own_is_written_under_the_plain_names(counts, drop, limit):
    """A component saved as a variant's shards (``diffusion_pytorch_model.fp16-00001-of-00002``)
    whose output has a layout of its own (a maximum shard size, or a merge that left tensors out)
    gets plain names, which from_pretrained loads without variant=: one file
    ``diffusion_pytorch_model.safetensors``, or shards named for the index beside them."""
    keys, shards = [], []
    for c, files, per in counts:
        names = [f"{c}/w{i}" for i in range(files * per)]
        keys += names
        shards += [[f"{c}/diffusion_pytorch_model.fp16-{i + 1:05d}-of-{files:05d}.safetensors", per]
                   for i in range(files)]
    kept = keys[drop:] if 0 < drop < len(keys) else keys
    changed = {k.split("/")[0] for k in keys if k not in kept}  # as recorded where a component's keys are
    plans = [(plan_components_by_size(dict.fromkeys(kept, 10), shards, limit), {c for c, _, _ in counts})]
    if changed:
        plans.append((plan_from_layout(kept, shards), changed))
    for plan, own in plans:
        assert plan is not None
        assert sorted(k for names in plan.values() for k in names) == sorted(kept)
        for folder, files in _by_folder(plan).items():
            if folder not in own:
                continue
            assert not [f for f in files if ".fp16" in f]
            assert files == [DIFFUSERS_SINGLE] if len(files) == 1 else \
                all(f.startswith("diffusion_pytorch_model-") for f in files)


def test_sharded_variant_pipeline_with_a_shard_size_loads(tmp_path):
    """A pipeline saved with variant="fp16" in shards, unpacked with a --max-shard-size each
    component fits in: one plain-named file per component, which loads without variant=."""
    fam = _family(tmp_path / "src", variant="fp16", max_shard_size="100KB")
    assert list((fam["a"] / "unet").glob("diffusion_pytorch_model.fp16-*-of-*.safetensors"))
    arch = _pack(fam, tmp_path / "ldm.tallpack")
    _cli("unpack", arch, "--task", "a", "-o", tmp_path / "a", "--max-shard-size", "10MB")
    assert [n for n in _files(tmp_path / "a") if n.endswith((".safetensors", ".json")) and "/" in n
            and not n.endswith("config.json")] == \
        ["unet/diffusion_pytorch_model.safetensors", "vqvae/diffusion_pytorch_model.safetensors"]
    got, want = _state(tmp_path / "a"), tallpack.open(arch).state_dict("a")
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in got)


def test_exact_unpack_of_a_pipeline_mixing_pickles_and_safetensors(tmp_path):
    """A pipeline saved with safe_serialization=False beside a component of safetensors (as
    transformers 5 writes its text encoder whatever it is asked): --exact gives the safetensors
    component back byte for byte and the pickled one's exact tensors as safetensors; verify
    checks the rebuilt file."""
    from safetensors.torch import save_file

    fam = _family(tmp_path / "src", safe_serialization=False)
    for d in fam.values():  # the vqvae's weights as safetensors, the unet's a pickle
        pickle = d / "vqvae" / "diffusion_pytorch_model.bin"
        save_file(torch.load(pickle, weights_only=True), d / "vqvae" / "diffusion_pytorch_model.safetensors",
                  metadata={"format": "pt"})
        pickle.unlink()
    assert (fam["a"] / "unet" / "diffusion_pytorch_model.bin").is_file()
    arch = _pack(fam, tmp_path / "mixed.tallpack", "--exact")
    out = _cli("unpack", arch, "--task", "a", "--exact", "-o", tmp_path / "a").output
    assert out.strip() == f"wrote {tmp_path / 'a'}"
    name = "vqvae/diffusion_pytorch_model.safetensors"
    assert filecmp.cmp(fam["a"] / name, tmp_path / "a" / name, shallow=False)
    written = tmp_path / "a" / "unet" / "diffusion_pytorch_model.safetensors"
    want = torch.load(fam["a"] / "unet" / "diffusion_pytorch_model.bin", weights_only=True)
    got = load_file(written)
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in got)
    assert not (tmp_path / "a" / "unet" / "diffusion_pytorch_model.bin").exists()
    for other in ("model_index.json", "unet/config.json", "vqvae/config.json"):
        assert filecmp.cmp(fam["a"] / other, tmp_path / "a" / other, shallow=False), other
    assert _state(tmp_path / "a") is not None
    # --force over it again: the byte-for-byte file and the new one both stay
    _cli("unpack", arch, "--task", "a", "--exact", "-o", tmp_path / "a", "--force")
    assert filecmp.cmp(fam["a"] / name, tmp_path / "a" / name, shallow=False) and written.is_file()
    assert "ok" in _cli("verify", arch).output


def _without_vqvae(folder: Path, to: Path) -> Path:
    """A copy of a pipeline folder without its vqvae (nor model_index.json's entry for it)."""
    import shutil

    shutil.copytree(folder, to)
    shutil.rmtree(to / "vqvae")
    index = json.loads((to / "model_index.json").read_text())
    del index["vqvae"]
    (to / "model_index.json").write_text(json.dumps(index))
    return to


def test_merge_without_a_component_some_task_lacks_says_so(plain, tmp_path, caplog):
    """A task without the base's vqvae: the archive holds no copy of the base's (stored per task),
    so the merged pipeline lacks it and does not load; the warning and the result line name the
    component and how to get a loadable one (--task NAME), which loads."""
    partial = _without_vqvae(plain["b"], tmp_path / "partial")
    arch = tmp_path / "p.tallpack"
    _cli("pack", "--base", plain["base"], "--task", f"a={plain['a']}", "--task", f"b={partial}", "-o", arch)
    fam = tallpack.open(arch)
    from tallpack.merged import missing_components

    assert missing_components(fam.manifest) == {"vqvae": ["a"]}
    with caplog.at_level(logging.WARNING, logger="tallpack"):
        out = _cli("merge", arch, "--method", "ta", "-o", tmp_path / "m").output
    assert "pipeline component 'vqvae' left out, so the folder does not load (--task a takes that task's)" in out
    assert "the base's pipeline component 'vqvae' is left out" in caplog.text and "--task a" in caplog.text
    with pytest.raises(Exception):
        diffusers.DiffusionPipeline.from_pretrained(tmp_path / "m")
    out = _cli("merge", arch, "--method", "ta", "--task", "a", "-o", tmp_path / "ma").output
    assert "left out" not in out
    got, want = _state(tmp_path / "ma"), fam.merged("ta", task="a")
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in got)


@pytest.mark.parametrize("how", [("merge", "--method", "ta"), ("unpack", "--task", "b"),
                                 ("unpack", "--task", "b", "--exact")])
def test_force_over_a_pipeline_removes_the_weights_of_a_component_the_new_one_lacks(plain, tmp_path, how):
    """An output without the vqvae written with --force over an earlier one that had it removes
    the earlier vqvae's weights (as at a URL): left, diffusers would load them as this output's."""
    partial = _without_vqvae(plain["b"], tmp_path / "partial")
    arch = tmp_path / "p.tallpack"
    _cli("pack", "--base", plain["base"], "--task", f"a={plain['a']}", "--task", f"b={partial}", "-o", arch, "--exact")
    out = tmp_path / "out"
    _cli("unpack", arch, "--task", "a", "-o", out)
    assert (out / "vqvae" / "diffusion_pytorch_model.safetensors").is_file()
    _cli(*how[:1], arch, *how[1:], "-o", out, "--force")
    assert not [n for n in _files(out) if n.startswith("vqvae/") and n.endswith(".safetensors")]
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()


def _single_file(folder: Path, name: str = "v1-5-pruned-emaonly.safetensors") -> None:
    """The pipeline's components also saved as one file at its top (``unet.NAME``, ...), as on the Hub."""
    from safetensors.torch import save_file

    sd = {f"{c}.{k}": v for c in ("unet", "vqvae")
          for k, v in load_file(folder / c / "diffusion_pytorch_model.safetensors").items()}
    save_file(sd, folder / name)


def test_single_file_checkpoint_beside_the_components_is_left_out(tmp_path, caplog):
    """A Hub-style pipeline folder (model_index.json, the component folders and the same model as
    one file at the top) packs its components as tensors, the top file left out with a warning
    naming it; the merged pipeline is the tasks' merge, not the base."""
    fam = _family(tmp_path / "src")
    for d in fam.values():
        _single_file(d)
    with caplog.at_level(logging.WARNING, logger="tallpack"):
        arch = _pack(fam, tmp_path / "top.tallpack")
    assert "v1-5-pruned-emaonly.safetensors left out of the archive: a single-file checkpoint" in caplog.text
    arch_fam = tallpack.open(arch)
    assert all(k.startswith(("unet/", "vqvae/")) for k in arch_fam.keys("a"))
    assert "v1-5-pruned-emaonly.safetensors" not in arch_fam.files("a")
    _cli("merge", arch, "--method", "ta", "-o", tmp_path / "m")
    assert not (tmp_path / "m" / "v1-5-pruned-emaonly.safetensors").exists()
    got, want, base = _state(tmp_path / "m"), arch_fam.merged("ta"), _state(fam["base"])
    assert all(torch.equal(got[k], want[k]) for k in got)
    assert any(not torch.equal(got[k], base[k]) for k in got)
    # a base of that kind with tasks without the top file: one family of pipelines
    _cli("pack", "--base", fam["base"], "--task", f"a={plain_copy(fam['a'], tmp_path / 'plain-a')}",
         "-o", tmp_path / "mixed.tallpack")


def plain_copy(folder: Path, to: Path) -> Path:
    import shutil

    shutil.copytree(folder, to)
    (to / "v1-5-pruned-emaonly.safetensors").unlink()
    return to


def test_only_the_components_model_index_lists_are_packed(plain, tmp_path, caplog):
    """A trainer's checkpoint-500/ in a pipeline folder is left out (one warning, not then packed
    as a component); an unet_ema/ that model_index.json does not list is kept as folder files,
    as in a single model's folder, said so."""
    import shutil

    ck = tmp_path / "ck"
    shutil.copytree(plain["a"], ck)
    (ck / "checkpoint-500").mkdir()
    shutil.copy(plain["b"] / "unet" / "diffusion_pytorch_model.safetensors", ck / "checkpoint-500" / "model.safetensors")
    (ck / "checkpoint-500" / "optimizer.bin").write_bytes(b"y")
    shutil.copytree(plain["b"] / "unet", ck / "unet_ema")
    with caplog.at_level(logging.INFO, logger="tallpack"):
        tallpack.pack(plain["base"], {"ck": ck}, tmp_path / "ck.tallpack")
    assert "checkpoint-500/ left out of the archive: a trainer's state" in caplog.text
    assert "'checkpoint-500'" not in caplog.text and "component 'unet_ema'" not in caplog.text
    assert "unet_ema/diffusion_pytorch_model.safetensors" in caplog.text and "not components" in caplog.text
    fam = tallpack.open(tmp_path / "ck.tallpack")
    assert {k.split("/")[0] for k in fam.keys("ck")} == {"unet", "vqvae"}
    assert "unet_ema/diffusion_pytorch_model.safetensors" in fam.files("ck")
    assert not any(n.startswith("checkpoint-500") for n in fam.files("ck"))
    _cli("unpack", tmp_path / "ck.tallpack", "--task", "ck", "-o", tmp_path / "out")
    assert not (tmp_path / "out" / "checkpoint-500").exists()
    assert filecmp.cmp(ck / "unet_ema" / "diffusion_pytorch_model.safetensors",
                       tmp_path / "out" / "unet_ema" / "diffusion_pytorch_model.safetensors", shallow=False)


@pytest.mark.parametrize("where", ["unet/unet.safetensors", "unet/sub/diffusion_pytorch_model.safetensors"])
def test_listed_component_without_weight_names_says_why(plain, tmp_path, caplog, where):
    """A component model_index.json lists whose weights are under another name or one folder
    down: the warning says that model_index.json lists it and that its folder holds none of the
    names looked for, not that it is unlisted."""
    import shutil

    odd = tmp_path / "odd"
    shutil.copytree(plain["a"], odd)
    (odd / where).parent.mkdir(exist_ok=True)
    (odd / "unet" / "diffusion_pytorch_model.safetensors").rename(odd / where)
    with caplog.at_level(logging.WARNING, logger="tallpack"):
        tallpack.pack(plain["base"], {"odd": odd}, tmp_path / "odd.tallpack")
    assert f"{where} (" in caplog.text
    assert "model_index.json lists 'unet', but unet/ holds no diffusion_pytorch_model.safetensors" in caplog.text
    assert "not components" not in caplog.text


def test_tensors_named_as_a_pipeline_pack_as_its_fine_tune(tmp_path):
    """A task given as tensors named COMPONENT/NAME (fam.state_dict("a") edited, packed again)
    against a pipeline base is that pipeline's fine-tune: it unpacks as the base's pipeline folder
    (the base's shards where a component has all the base's tensors, one file where not, the
    base's folder files), which loads; other names are refused in one line saying what to pass."""
    fam = _family(tmp_path / "src", max_shard_size="100KB")
    arch = tallpack.open(_pack(fam, tmp_path / "ldm.tallpack"))
    edited = {k: v.clone() for k, v in arch.state_dict("a").items()}
    edited["unet/conv_in.bias"] += 1
    partial = {k: v for k, v in edited.items() if k != "vqvae/encoder.conv_in.bias"}
    tallpack.pack(fam["base"], {"e": edited, "p": partial}, tmp_path / "e.tallpack")
    again = tallpack.open(tmp_path / "e.tallpack")
    tallpack.write_task(again, "e", tmp_path / "e")
    assert _files(tmp_path / "e") == _files(fam["a"])
    got, want = _state(tmp_path / "e"), again.state_dict("e")
    assert set(got) == set(edited) and all(torch.equal(got[k], want[k]) for k in got)
    tallpack.write_task(again, "p", tmp_path / "p")
    assert [n for n in _files(tmp_path / "p") if n.startswith("vqvae/")] == \
        ["vqvae/config.json", "vqvae/diffusion_pytorch_model.safetensors"]
    with pytest.raises(IncompatibleCheckpointsError) as e:
        tallpack.pack(fam["base"], {"x": {"conv_in.weight": edited["unet/conv_in.weight"]}}, tmp_path / "x.tallpack")
    msg = str(e.value)
    assert "\n" not in msg and msg.count("task 'x'") == 1 and "folder of the base" not in msg
    assert "name every tensor COMPONENT/NAME, COMPONENT one of unet, vqvae" in msg


def test_pipeline_outputs_name_their_folder(plain, tmp_path):
    """write_task and write_merged name a pipeline's output folder, lossy or exact, at a URL
    without a trailing '/.'."""
    import uuid

    import fsspec

    arch = _pack(plain, tmp_path / "ldm.tallpack", "--exact")
    fam = tallpack.open(arch)
    root = f"/tallpack-test-{uuid.uuid4().hex}"
    try:
        assert tallpack.write_task(fam, "a", f"memory://{root}/a") == f"memory://{root}/a"
        assert tallpack.write_task(fam, "a", f"memory://{root}/x", exact=True) == f"memory://{root}/x"
        assert tallpack.write_merged(fam, f"memory://{root}/m/")[0] == f"memory://{root}/m"
    finally:
        fsspec.filesystem("memory").rm(root, recursive=True)
    assert tallpack.write_task(fam, "a", tmp_path / "x", exact=True) == tmp_path / "x"
    assert _cli("unpack", arch, "--task", "b", "-o", tmp_path / "b").output.strip() == f"wrote {tmp_path / 'b'}"


def test_stats_layers_of_a_pipeline_are_per_component(plain, tmp_path):
    """Density per layer of a pipeline: each component's blocks apart (unet/down_blocks.0), not
    every component's block 0 in one row."""
    from tallpack import stats

    fam = tallpack.open(_pack(plain, tmp_path / "ldm.tallpack"))
    layers = list(stats.compute(fam).layers)
    assert layers and all(lay.startswith(("unet/", "vqvae/")) for lay in layers)
    assert "unet/down_blocks.0" in layers and "unet/up_blocks.1" in layers
    assert layers.index("unet/down_blocks.0") < layers.index("unet/down_blocks.1") < layers.index("unet/other")


@settings(max_examples=100, deadline=None)
@given(component=st.from_regex(r"[a-z_]{1,12}", fullmatch=True),
       name=st.from_regex(r"([a-z_]{1,8}\.([0-9]{1,3}\.)?){0,4}weight", fullmatch=True))
def test_layer_of_a_pipeline_tensor_stays_in_its_component(component, name):
    """A pipeline tensor's layer is its component's, whatever the name; a plain model's is as before."""
    from tallpack.stats import layer_of

    label = layer_of(f"{component}/{name}", pipeline=True)
    assert label.startswith(f"{component}/")
    assert (label == f"{component}/other") == (layer_of(name) == "other")  # a block wherever a plain model has one
    assert layer_of(f"{component}/{name}") == layer_of(f"{component}/{name}", pipeline=False)


@pytest.mark.parametrize("how", [("merge", "--method", "ta"), ("unpack", "--task", "a")])
def test_force_over_pickled_components_leaves_none_a_loader_takes(plain, tmp_path, how):
    """--force over an earlier pipeline saved with safe_serialization=False (each component's
    diffusion_pytorch_model.bin; the vqvae's also as .bin shards and their index) removes those
    pickles: a merge that leaves the vqvae out does not load (not with the earlier vqvae), an
    unpack loads its own weights."""
    import shutil

    partial = _without_vqvae(plain["b"], tmp_path / "partial")
    arch = tmp_path / "p.tallpack"
    _cli("pack", "--base", plain["base"], "--task", f"a={plain['a']}", "--task", f"b={partial}", "-o", arch)
    out = _family(tmp_path / "bin", safe_serialization=False)["b"]
    vq = torch.load(out / "vqvae" / "diffusion_pytorch_model.bin")
    names = sorted(vq)
    for i, part in enumerate((names[:3], names[3:])):
        torch.save({k: vq[k] for k in part}, out / "vqvae" / f"diffusion_pytorch_model-0000{i + 1}-of-00002.bin")
    (out / "vqvae" / "diffusion_pytorch_model.bin.index.json").write_text(json.dumps(
        {"weight_map": {k: f"diffusion_pytorch_model-0000{1 + (k not in names[:3])}-of-00002.bin" for k in names}}))
    shutil.rmtree(tmp_path / "bin" / "a")  # (the family's other folders, not needed)
    _cli(*how[:1], arch, *how[1:], "-o", out, "--force")
    assert not [n for n in _files(out) if n.endswith((".bin", ".bin.index.json"))], _files(out)
    if how[0] == "merge":  # vqvae left out: the folder does not load, rather than with the earlier vqvae
        with pytest.raises(Exception):
            diffusers.DiffusionPipeline.from_pretrained(out)
    else:
        got, want = _state(out), tallpack.open(arch).state_dict("a")
        assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in got)


@settings(max_examples=60, deadline=None)
@given(counts=st.lists(st.tuples(st.sampled_from(["", "2_Dense", "2_Router", "2_Router/query_0_Dense",
                                                  "2_Router/document_0_Dense"]), st.integers(1, 3)),
                       min_size=1, max_size=5, unique_by=lambda c: c[0]).filter(lambda cs: any(c for c, _ in cs)),
       drop=st.integers(0, 2), limit=st.none() | st.integers(1, 10))
def test_nested_component_layout_plans_every_key_into_its_own_folder(counts, drop, limit):
    """Components of several folders (a sentence-transformers Router's 2_Router/query_0_Dense, spec
    §3.6) beside one-folder ones: every key goes to a file of the longest recorded component it
    is named under, written there without that component's name; by size too, modules unsharded."""
    keys, shards = [], []
    for c, n in counts:
        keys += [f"{c}/w{i}" if c else f"w{i}" for i in range(n)]
        shards.append([f"{c}/model.safetensors" if c else "model.safetensors", n])
    kept = keys[drop:] if drop < len(keys) else keys
    plan = (plan_from_layout(kept, shards) if limit is None else
            plan_by_size_as(dict.fromkeys(kept, 4), shards, limit, modules=True))
    assert plan is not None
    assert sorted(k for names in plan.values() for k in names) == sorted(kept)
    components = [c for c, _ in counts if c]
    for f, names in plan.items():
        folder = f.rpartition("/")[0]
        assert all(component_of(k, components) == folder for k in names), (f, names)
        if folder and limit is not None:
            assert f == f"{folder}/model.safetensors"
