"""sentence-transformers model folders packed whole: the transformer's weights at the top under
their own names, each module folder's weights (``2_Dense/model.safetensors``) as tensors named
``MODULE/NAME`` (``2_Dense/linear.weight``), TALL-compressed like the rest and written back into
their folders; exact unpacks byte for byte; one-line errors for modules that do not match, and
no read outside the folder whatever ``modules.json`` says."""

from __future__ import annotations

import filecmp
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import sentence_transformers  # a test dependency (pyproject's "test" extra): missing, these tests fail, not skip
import tallpack
from conftest import cli_ok as _cli, expected_reconstruction, pack_ab as _pack
from tallpack.errors import CheckpointError
from tallpack.sources import open_source
from tallpack_cli.main import main

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"the a cat dog sat on mat ran fast slow big small red".split()]
SENTENCES = ["the cat sat on the mat", "a big dog ran fast", "red"]


def _family(root: Path, **save) -> dict[str, Path]:
    """A tiny BERT (hidden 32, 2 layers, a word-list tokenizer) as Transformer + Pooling + Dense +
    Normalize, saved by sentence-transformers' own save(): the base and two fine-tunes of its last
    layer and its Dense module (the embeddings and first layer untouched), each about 100 KB."""
    from sentence_transformers import SentenceTransformer
    from transformers import BertConfig, BertModel, BertTokenizerFast

    try:  # sentence-transformers 6 (sentence_transformers.models warns there), else 3-5
        from sentence_transformers.sentence_transformer import modules as models
    except ImportError:
        from sentence_transformers import models

    hf = root / "hf"
    hf.mkdir(parents=True)
    (hf / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    BertTokenizerFast(vocab_file=str(hf / "vocab.txt")).save_pretrained(hf)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=32)).save_pretrained(hf)
    model = SentenceTransformer(modules=[models.Transformer(str(hf), max_seq_length=16), models.Pooling(32, "mean"),
                                         models.Dense(32, 16), models.Normalize()], device="cpu")
    out = {}
    for i, name in enumerate(["base", "a", "b"]):
        if i:
            g = torch.Generator().manual_seed(i)
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if ".layer.1." in n or n.startswith("2."):  # the last layer and the Dense module
                        touch = (torch.rand(p.shape, generator=g) < 0.3).float()
                        p.add_(touch * 0.02 * torch.randn(p.shape, generator=g))
        model.save(str(root / name), **save)
        out[name] = root / name
    return out


def _load(folder: Path):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(folder), device="cpu")


def _state(folder: Path) -> dict[str, torch.Tensor]:
    """A model folder's weights as sentence-transformers loads them, named as the archive names
    them: the transformer's as transformers names them, a module's as ``2_Dense/NAME``."""
    model = _load(folder)
    out = {k: v for k, v in model[0].auto_model.state_dict().items()}
    out |= {f"2_Dense/{k}": v for k, v in model[2].state_dict().items()}
    return out


def _encode(folder: Path) -> torch.Tensor:
    return _load(folder).encode(SENTENCES, convert_to_tensor=True)


def _error(base: Path, task: Path, tmp_path: Path) -> str:
    r = CliRunner().invoke(main, ["pack", "--base", str(base), "--task", f"t={task}", "-o",
                                  str(tmp_path / "x.tallpack")])
    assert r.exit_code != 0 and "Traceback" not in r.output
    assert not (tmp_path / "x.tallpack").exists()
    return r.output


def _entry(archive, name: str):
    """The manifest entry holding tensor ``name`` (alone, or as a member of a group)."""
    return next(e for e in archive.manifest.tensors if e.name == name or any(m.name == name for m in e.members))


def _files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def fam(tmp_path_factory) -> dict[str, Path]:
    return _family(tmp_path_factory.mktemp("st"))


@pytest.fixture(scope="module")
def pickled(tmp_path_factory) -> dict[str, Path]:
    """The same family saved with safe_serialization=False: the Dense module as 2_Dense/pytorch_model.bin."""
    return _family(tmp_path_factory.mktemp("st_bin"), safe_serialization=False)


def test_modules_round_trip_through_the_cli(fam, tmp_path):
    """pack, unpack --all, merge, verify, inspect and stats of sentence-transformers folders: the
    Dense module's weights are TALL tensors 2_Dense/NAME (masked where fine-tuned), the transformer's
    keep their plain names, the untouched embeddings are stored once; each folder written loads in
    SentenceTransformer with the paper's theta_0 + m_t * tau_MTL for every tensor, the Dense's
    included, and embeds close to the original; the merge's 2_Dense is the merged one."""
    arch = _pack(fam, tmp_path / "st.tallpack")
    archive = tallpack.open(arch)
    keys = archive.keys("a")
    assert "embeddings.word_embeddings.weight" in keys and "2_Dense/linear.weight" in keys
    assert not any("/" in k for k in keys if not k.startswith("2_Dense/"))
    assert set(archive.files("a")) == {n for n in _files(fam["a"]) if n not in ("model.safetensors",
                                                                                "2_Dense/model.safetensors")}
    assert archive.task_info("a").source["format"] == "sentence-transformers"
    masked = _entry(archive, "2_Dense/linear.weight")
    assert masked.kind == "merged" and {tt.encoding for tt in masked.tasks.values()} == {"tall"}  # TALL, not a copy
    sd = archive.state_dict("a")
    assert "2_Dense/linear.weight" in sd
    assert torch.equal(archive.get_tensor("a", "2_Dense/linear.weight"), sd["2_Dense/linear.weight"])

    _cli("unpack", arch, "--all", "-o", tmp_path / "out")
    base = _state(fam["base"])
    tasks = {t: _state(fam[t]) for t in ("a", "b")}
    want = expected_reconstruction(base, tasks, {t: archive.task_info(t).lam for t in ("a", "b")})
    for t in ("a", "b"):
        out = tmp_path / "out" / t
        assert _files(out) == _files(fam[t])  # the module's weights back in 2_Dense/, under their name
        got = _state(out)
        assert set(got) == set(tasks[t])
        for k, v in got.items():
            assert torch.equal(v, want[t][k]), k
        cos = torch.nn.functional.cosine_similarity(_encode(out), _encode(fam[t]))
        assert cos.min() > 0.9, cos
    assert not torch.equal(want["a"]["2_Dense/linear.weight"], tasks["a"]["2_Dense/linear.weight"])  # masked

    _cli("merge", arch, "-o", tmp_path / "merged")
    merged = archive.merged()
    dense = load_file(tmp_path / "merged" / "2_Dense" / "model.safetensors")
    assert torch.equal(dense["linear.weight"], merged["2_Dense/linear.weight"])
    assert not torch.equal(dense["linear.weight"], base["2_Dense/linear.weight"])  # not the base's
    assert torch.equal(_load(tmp_path / "merged")[2].linear.weight, merged["2_Dense/linear.weight"])

    assert "ok:" in _cli("verify", arch).output
    assert "2 tasks" in _cli("inspect", arch).output or "task" in _cli("inspect", arch).output
    stats = json.loads(_cli("stats", arch, "--json").output)
    assert list(stats["layers"])[-1] == "2_Dense/other" and "layer 1" in stats["layers"]


def test_unchanged_module_costs_nothing_per_task(fam, tmp_path):
    """A Dense module no task changed is stored once (shared), as an untouched component is."""
    quiet = {}
    for t in ("a", "b"):
        quiet[t] = tmp_path / t
        shutil.copytree(fam[t], quiet[t])
        shutil.copy(fam["base"] / "2_Dense" / "model.safetensors", quiet[t] / "2_Dense" / "model.safetensors")
    archive = tallpack.open(_pack({"base": fam["base"], **quiet}, tmp_path / "q.tallpack"))
    assert _entry(archive, "2_Dense/linear.weight").kind == "shared"
    assert torch.equal(archive.get_tensor("b", "2_Dense/linear.weight"),
                       load_file(fam["base"] / "2_Dense/model.safetensors")["linear.weight"])


def test_exact_unpack_gives_every_file_back(fam, tmp_path):
    """unpack --exact: every file byte for byte, the module's model.safetensors too, and the same
    embeddings bit for bit; verify rebuilds them."""
    arch = _pack(fam, tmp_path / "ex.tallpack", "--exact")
    _cli("unpack", arch, "--all", "--exact", "-o", tmp_path / "out")
    for t in ("a", "b"):
        out = tmp_path / "out" / t
        assert _files(out) == _files(fam[t])
        for name in _files(fam[t]):
            assert filecmp.cmp(out / name, fam[t] / name, shallow=False), name
        assert torch.equal(_encode(out), _encode(fam[t]))
    records = tallpack.open(arch).task_info("a").exact["files"]
    assert {"name": "2_Dense/model.safetensors", "prefix": "2_Dense/"}.items() <= \
        next(f for f in records if f["name"] == "2_Dense/model.safetensors").items()
    assert "ok:" in _cli("verify", arch).output


def test_pickled_dense_module(pickled, tmp_path):
    """A Dense module saved as 2_Dense/pytorch_model.bin (safe_serialization=False) is packed as
    tensors too and comes back as 2_Dense/model.safetensors (as a pickled transformer comes back as
    model.safetensors), which sentence-transformers loads first: exact tensors and embeddings bit
    for bit from --exact, every other file byte for byte."""
    arch = _pack(pickled, tmp_path / "bin.tallpack", "--exact")
    archive = tallpack.open(arch)
    assert "2_Dense/linear.weight" in archive.keys("a")
    assert "2_Dense/pytorch_model.bin" not in archive.files("a")
    _cli("unpack", arch, "--all", "--exact", "-o", tmp_path / "exact")
    _cli("unpack", arch, "--task", "a", "-o", tmp_path / "lossy")
    for t in ("a", "b"):
        out = tmp_path / "exact" / t
        assert _files(out) == sorted(n.replace("2_Dense/pytorch_model.bin", "2_Dense/model.safetensors")
                                     for n in _files(pickled[t]))
        for name in _files(pickled[t]):
            if not name.endswith(".bin"):
                assert filecmp.cmp(out / name, pickled[t] / name, shallow=False), name
        assert torch.equal(_encode(out), _encode(pickled[t]))
    assert (tmp_path / "lossy" / "2_Dense" / "model.safetensors").is_file()
    assert torch.equal(_state(tmp_path / "lossy")["2_Dense/linear.weight"],
                       archive.get_tensor("a", "2_Dense/linear.weight"))
    assert "ok:" in _cli("verify", arch).output


def test_exact_unpack_of_a_pickled_transformer_beside_a_safetensors_module(fam, tmp_path):
    """A transformer saved as pytorch_model.bin beside 2_Dense/model.safetensors: the module's file
    comes back byte for byte, the transformer's exact tensors as model.safetensors (not the module's
    tensors a second time at the top)."""
    mixed = {}
    for t in ("base", "a", "b"):
        mixed[t] = tmp_path / t
        shutil.copytree(fam[t], mixed[t])
        torch.save(load_file(mixed[t] / "model.safetensors"), mixed[t] / "pytorch_model.bin")
        (mixed[t] / "model.safetensors").unlink()
    arch = _pack(mixed, tmp_path / "m.tallpack", "--exact")
    _cli("unpack", arch, "--task", "a", "--exact", "-o", tmp_path / "out")
    out = tmp_path / "out"
    assert filecmp.cmp(out / "2_Dense" / "model.safetensors", fam["a"] / "2_Dense" / "model.safetensors", shallow=False)
    assert set(load_file(out / "model.safetensors")) == set(load_file(fam["a"] / "model.safetensors"))
    assert torch.equal(_encode(out), _encode(fam["a"]))
    assert "ok:" in _cli("verify", arch).output


def test_task_without_modules_json_is_packed_without_the_module(fam, tmp_path, caplog):
    """A task that is a plain transformers folder (no modules.json, no module folders) beside a
    sentence-transformers base: allowed, as a pipeline task without a component is, and warned
    naming the task and the module; it unpacks as the plain folder it was, and a merge without
    --task lacks the module (said), --task a takes a's."""
    plain = tmp_path / "plain"
    shutil.copytree(fam["b"], plain)
    for name in ("modules.json", "1_Pooling", "2_Dense", "3_Normalize"):
        shutil.rmtree(plain / name) if (plain / name).is_dir() else (plain / name).unlink()
    with caplog.at_level(logging.WARNING, logger="tallpack"):
        tallpack.pack(fam["base"], {"a": fam["a"], "b": plain}, tmp_path / "p.tallpack")
    assert "task 'b'" in caplog.text and "has no module '2_Dense' of the base" in caplog.text
    archive = tallpack.open(tmp_path / "p.tallpack")
    assert not any(k.startswith("2_Dense/") for k in archive.keys("b")) and "2_Dense/linear.weight" in archive.keys("a")
    tallpack.write_task(archive, "b", tmp_path / "b")
    assert _files(tmp_path / "b") == _files(plain)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tallpack"):
        out = _cli("merge", tmp_path / "p.tallpack", "-o", tmp_path / "merged").output
    assert "the base's module '2_Dense' is left out" in caplog.text and "modules.json" in caplog.text
    assert "; module '2_Dense' left out, so the folder does not load" in out
    _cli("merge", tmp_path / "p.tallpack", "--task", "a", "-o", tmp_path / "merged_a")
    assert torch.equal(_load(tmp_path / "merged_a")[2].linear.weight, archive.get_tensor("a", "2_Dense/linear.weight"))


def test_module_of_another_model_is_refused(fam, tmp_path):
    """A task whose Dense module holds other tensor names is refused in one line naming the task's
    folder, the module and the base's module folder, although its transformer looks fine-tuned."""
    other = tmp_path / "other"
    shutil.copytree(fam["a"], other)
    dense = load_file(other / "2_Dense" / "model.safetensors")
    save_file({f"proj.{k}": v for k, v in dense.items()}, other / "2_Dense" / "model.safetensors")
    out = _error(fam["base"], other, tmp_path)
    assert out.count("\n") == 1 and f"task 't' ({other})" in out
    assert f"module '2_Dense' does not look fine-tuned from the base's ({fam['base']}/2_Dense)" in out


def test_unreadable_modules_json_packs_a_single_model(fam, tmp_path, caplog):
    """A modules.json that is not JSON (or not a list) is warned of, and the folder packed as a
    single model, as before modules were packed: the module's weight file kept as a folder file."""
    for i, text in enumerate(["{not json", '{"path": "2_Dense"}']):
        broken = tmp_path / f"broken{i}"
        shutil.copytree(fam["a"], broken)
        (broken / "modules.json").write_text(text)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="tallpack"):
            src = open_source(broken)
        assert f"{broken / 'modules.json'}: not a readable sentence-transformers module list" in caplog.text
        assert "\n" not in caplog.records[0].getMessage()
        assert src.kind == "hf-folder" and "2_Dense/model.safetensors" in src.files
        assert not any(k.startswith("2_Dense/") for k in src.keys())


@pytest.mark.parametrize("path", ["../outside", "/ABS", "1_Pooling/../../outside", "a/b", ".hidden"])
def test_module_path_leading_out_is_not_read(fam, tmp_path, caplog, path):
    """A module path of modules.json that is no plain subfolder name (outside the folder, absolute,
    nested, hidden) is warned of and not read: no tensor comes from where it leads."""
    model = tmp_path / "model"
    shutil.copytree(fam["a"], model)
    outside = tmp_path / "outside"
    outside.mkdir()
    save_file({"secret": torch.ones(3)}, outside / "model.safetensors")
    path = path.replace("/ABS", str(outside))
    doc = json.loads((model / "modules.json").read_text())
    doc.append({"idx": 4, "name": "4", "path": path, "type": "sentence_transformers.models.Dense"})
    (model / "modules.json").write_text(json.dumps(doc))
    with caplog.at_level(logging.WARNING, logger="tallpack"):
        src = open_source(model)
    assert f"module path {path!r} is not a plain subfolder name" in caplog.text
    assert not any("secret" in k for k in src.keys()) and "2_Dense/linear.weight" in src.keys()


def test_module_folder_linked_outside_is_refused(fam, tmp_path):
    """A module folder that is a link out of the model folder is refused, naming it, as any link
    out of a model folder is: nothing there is read."""
    model = tmp_path / "model"
    shutil.copytree(fam["a"], model)
    shutil.move(model / "2_Dense", tmp_path / "elsewhere")
    (model / "2_Dense").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(CheckpointError, match=r"2_Dense: is a symlink to .*outside the input folder"):
        open_source(model)


def test_top_tensor_named_as_a_module_tensor_is_refused(fam, tmp_path):
    """A tensor of the folder's own weights named MODULE/NAME as a module's tensor is: one line
    naming the tensor and the module folder, not one of the two read in place of the other."""
    model = tmp_path / "model"
    shutil.copytree(fam["a"], model)
    top = load_file(model / "model.safetensors")
    save_file({**top, "2_Dense/linear.weight": torch.zeros(1)}, model / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"tensor '2_Dense/linear.weight' of the folder's own weights has the "
                                              r"name of a tensor of its module folder 2_Dense/; rename one") as e:
        open_source(model)
    assert "\n" not in str(e.value)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(paths=st.lists(st.one_of(st.sampled_from(["", "2_Dense", "..", "../x", "/x", "x/..", "2_Dense/..", "."]),
                                st.text(alphabet="./_x", max_size=6), st.integers(), st.none()), max_size=5))
def test_any_modules_json_reads_only_plain_subfolders(tmp_path, paths):
    """Whatever the paths modules.json lists, a source's tensors come from the folder's own weights
    and its plain subfolders' only: a listed subfolder with weights is a module, MODULE/NAME."""
    root = tmp_path / f"m{abs(hash(tuple(map(str, paths))))}"
    (root / "2_Dense").mkdir(parents=True, exist_ok=True)
    save_file({"w": torch.zeros(2)}, root / "model.safetensors")
    save_file({"linear.weight": torch.zeros(2)}, root / "2_Dense" / "model.safetensors")
    (root / "modules.json").write_text(json.dumps([{"path": p} for p in paths]))
    keys = set(open_source(root).keys())
    assert keys == ({"w", "2_Dense/linear.weight"} if "2_Dense" in paths else {"w"})


def test_tensors_named_as_modules_pack_as_its_fine_tune(fam, tmp_path):
    """A task given as tensors (fam.state_dict("a") edited) with a module's names against a
    sentence-transformers base unpacks as the base's model folder, which loads."""
    archive = tallpack.open(_pack(fam, tmp_path / "st.tallpack"))
    edited = {k: v.clone() for k, v in archive.state_dict("a").items()}
    edited["2_Dense/linear.bias"] += 1
    tallpack.pack(fam["base"], {"e": edited}, tmp_path / "e.tallpack")
    again = tallpack.open(tmp_path / "e.tallpack")
    tallpack.write_task(again, "e", tmp_path / "e")
    assert _files(tmp_path / "e") == _files(fam["a"])
    assert torch.equal(_load(tmp_path / "e")[2].linear.bias, again.get_tensor("e", "2_Dense/linear.bias"))


def test_sentence_transformers_is_installed():
    """The test extra installs sentence-transformers: these tests never skip for want of it."""
    assert int(sentence_transformers.__version__.split(".")[0]) >= 3


def _without_dense(folder: Path, to: Path) -> Path:
    """A copy of a sentence-transformers folder without its Dense module (nor modules.json's entry)."""
    shutil.copytree(folder, to)
    shutil.rmtree(to / "2_Dense")
    (to / "modules.json").write_text(json.dumps([m for m in json.loads((to / "modules.json").read_text())
                                                 if m["path"] != "2_Dense"]))
    return to


@pytest.mark.parametrize("how", [("merge", "--method", "ta"), ("unpack", "--task", "a")])
def test_force_over_pickled_weights_leaves_none_a_loader_takes(fam, pickled, tmp_path, how):
    """--force over an earlier folder saved with safe_serialization=False (2_Dense/pytorch_model.bin,
    and a pickled transformer, plain and sharded, at the top) removes those pickles: a merge that
    leaves the module out then does not load (not with the earlier Dense), an unpack loads its own."""
    arch = tmp_path / "p.tallpack"
    tallpack.pack(fam["base"], {"a": fam["a"], "nodense": _without_dense(fam["b"], tmp_path / "nd")}, arch)
    out = tmp_path / "out"
    shutil.copytree(pickled["b"], out)
    top = load_file(out / "model.safetensors")
    torch.save(top, out / "pytorch_model.bin")
    names = sorted(top)
    for i, part in enumerate((names[:5], names[5:])):
        torch.save({k: top[k] for k in part}, out / f"pytorch_model-0000{i + 1}-of-00002.bin")
    (out / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"weight_map": {k: f"pytorch_model-0000{1 + (k not in names[:5])}-of-00002.bin" for k in names}}))
    assert (out / "2_Dense" / "pytorch_model.bin").is_file()
    _cli(*how[:1], arch, *how[1:], "-o", out, "--force")
    assert not [n for n in _files(out) if n.endswith(".bin") or n.endswith(".bin.index.json")], _files(out)
    if how[0] == "merge":  # module '2_Dense' left out: the folder does not load, rather than with b's Dense
        with pytest.raises(Exception, match="model.safetensors"):
            _load(out)
    else:
        got = _state(out)
        want = tallpack.open(arch).state_dict("a")
        assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in got)


@pytest.mark.parametrize("suffix", [".safetensors", ".bin"])
def test_single_file_with_module_tensors_is_not_warned_as_lacking_them(fam, tmp_path, caplog, suffix):
    """A task given as one weights file holding the module's tensors under the archive's names
    (fam.state_dict("a") saved, 2_Dense/linear.weight among them): no warning that it lacks the
    module, and the merge holds the merged Dense (as the warning would have said it does not)."""
    sd = {k: v.clone() for k, v in tallpack.open(_pack(fam, tmp_path / "st.tallpack")).state_dict("a").items()}
    flat = tmp_path / f"flat{suffix}"
    save_file(sd, flat) if suffix == ".safetensors" else torch.save(sd, flat)
    with caplog.at_level(logging.WARNING, logger="tallpack"):
        tallpack.pack(fam["base"], {"a": flat, "b": fam["b"]}, tmp_path / "f.tallpack")
    assert "has no module" not in caplog.text and "lacks it" not in caplog.text, caplog.text
    assert not caplog.records
    merged = tallpack.open(tmp_path / "f.tallpack").merged("ta")
    assert {"2_Dense/linear.weight", "2_Dense/linear.bias"} <= set(merged)


def test_max_shard_size_shards_the_transformer_only(fam, tmp_path, caplog):
    """unpack/merge --max-shard-size shard the transformer's weights at the top (which it loads
    sharded) and keep each module's in one 2_Dense/model.safetensors, the only file
    sentence-transformers loads for it (warned when larger than the size); the folders load with
    the archive's tensors. The same for a task packed from tensors (format "dict")."""
    arch = _pack(fam, tmp_path / "st.tallpack")
    archive = tallpack.open(arch)
    edited = {k: v.clone() for k, v in archive.state_dict("a").items()}
    tallpack.pack(fam["base"], {"e": edited}, tmp_path / "e.tallpack")
    with caplog.at_level(logging.WARNING, logger="tallpack"):
        _cli("unpack", arch, "--task", "a", "-o", tmp_path / "u", "--max-shard-size", "1KB")
        _cli("merge", arch, "--method", "ta", "-o", tmp_path / "m", "--max-shard-size", "20KB")
        tallpack.write_task(tallpack.open(tmp_path / "e.tallpack"), "e", tmp_path / "e", max_shard_size="20KB")
    assert "module 2_Dense/: its weights (2112 bytes) kept in one file over the maximum shard size" in caplog.text
    for out, want in ((tmp_path / "u", archive.state_dict("a")), (tmp_path / "m", archive.merged("ta")),
                      (tmp_path / "e", edited)):
        assert [n for n in _files(out) if n.startswith("2_Dense/")] == ["2_Dense/config.json",
                                                                        "2_Dense/model.safetensors"]
        assert len(list(out.glob("model-*-of-*.safetensors"))) > 1 and (out / "model.safetensors.index.json").is_file()
        got = _state(out)
        assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in got)


def _router_family(root: Path, fam: dict[str, Path]) -> dict[str, Path]:
    """The family's transformer and pooling with a Router (sentence-transformers 5+) of a query and
    a document Dense, which it saves in folders of their own: 2_Router/query_0_Dense/model.safetensors
    (modules.json lists 2_Router only). The fine-tunes change both Dense layers."""
    from sentence_transformers import SentenceTransformer

    try:
        from sentence_transformers.sentence_transformer import modules as models
    except ImportError:
        from sentence_transformers import models

    base = _load(fam["base"])
    torch.manual_seed(3)
    router = models.Router.for_query_document(query_modules=[models.Dense(32, 16)],
                                              document_modules=[models.Dense(32, 16)])
    model = SentenceTransformer(modules=[base[0], base[1], router], device="cpu")
    out = {}
    for i, name in enumerate(["base", "a", "b"]):
        if i:
            g = torch.Generator().manual_seed(i)
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if n.startswith("2."):
                        touch = (torch.rand(p.shape, generator=g) < 0.3).float()
                        p.add_(touch * 0.02 * torch.randn(p.shape, generator=g))
        model.save(str(root / name))
        out[name] = root / name
    return out


def test_router_modules_are_packed_and_merged(fam, tmp_path):
    """A Router's Dense modules (2_Router/query_0_Dense/model.safetensors, one level below the
    folder modules.json lists) are module tensors 2_Router/query_0_Dense/NAME, TALL-merged: the
    merge's Router holds the merged weights (not the base's files), and loads; unpack writes them
    back in their folders (--exact byte for byte, verify rebuilds them)."""
    rf = _router_family(tmp_path / "src", fam)
    assert (rf["a"] / "2_Router" / "query_0_Dense" / "model.safetensors").is_file()
    arch = _pack(rf, tmp_path / "r.tallpack", "--exact")
    archive = tallpack.open(arch)
    inner = [k for k in archive.keys("a") if k.startswith("2_Router/")]
    assert sorted(inner) == [f"2_Router/{d}_0_Dense/linear.{p}" for d in ("document", "query") for p in ("bias", "weight")]
    assert not [n for n in archive.files("a") if n.endswith(".safetensors")]
    _cli("merge", arch, "--method", "ta", "-o", tmp_path / "m")
    merged = archive.merged("ta")
    got = _load(tmp_path / "m")[2].state_dict()
    base = load_file(rf["base"] / "2_Router" / "query_0_Dense" / "model.safetensors")
    assert torch.equal(got["sub_modules.query.0.linear.weight"], merged["2_Router/query_0_Dense/linear.weight"])
    assert torch.equal(got["sub_modules.document.0.linear.bias"], merged["2_Router/document_0_Dense/linear.bias"])
    assert not torch.equal(got["sub_modules.query.0.linear.weight"], base["linear.weight"])  # not the base's
    _cli("unpack", arch, "--task", "a", "-o", tmp_path / "a")
    assert _files(tmp_path / "a") == _files(rf["a"])
    got = _load(tmp_path / "a")[2].state_dict()
    assert torch.equal(got["sub_modules.query.0.linear.weight"],
                       archive.get_tensor("a", "2_Router/query_0_Dense/linear.weight"))
    _cli("unpack", arch, "--task", "b", "--exact", "-o", tmp_path / "x")
    for name in _files(rf["b"]):
        assert filecmp.cmp(tmp_path / "x" / name, rf["b"] / name, shallow=False), name
    assert "ok:" in _cli("verify", arch).output


def test_stats_group_a_routers_modules_each_on_its_own(fam, tmp_path):
    """stats of a Router's family: each Dense module of the Router (its longest component,
    2_Router/query_0_Dense) has its own rows, not one 2_Router/other for both; the same from an
    archive that stores them in groups and from one that does not."""
    rf = _router_family(tmp_path / "src", fam)
    grouped, single = _pack(rf, tmp_path / "g.tallpack"), _pack(rf, tmp_path / "s.tallpack", "--no-group")
    with tallpack.open(grouped) as g, tallpack.open(single) as s:
        got = tallpack.stats.compute(g)
        assert got.to_dict() == tallpack.stats.compute(s).to_dict()
    modules = [lay for lay in got.layers if lay.startswith("2_Router/")]
    assert modules == ["2_Router/document_0_Dense/other", "2_Router/query_0_Dense/other"], list(got.layers)
    assert "2_Router/query_0_Dense/other" in _cli("stats", single).output
    components = ["2_Router/query_0_Dense", "2_Router/document_0_Dense", "2_Dense"]
    layer_of = tallpack.stats.layer_of
    assert layer_of("2_Router/query_0_Dense/linear.weight", pipeline=True, components=components) \
        == "2_Router/query_0_Dense/other"
    assert layer_of("2_Router/query_0_Dense/blocks.3.w", pipeline=True, components=components) \
        == "2_Router/query_0_Dense/layer 3"
    assert layer_of("2_Dense/linear.weight", pipeline=True, components=components) == "2_Dense/other"
    assert layer_of("unet/down_blocks.1.w", pipeline=True, components=components) == "unet/down_blocks.1"
    assert layer_of("encoder.layer.1.w", pipeline=True, components=components) == "layer 1"


def test_module_path_with_a_trailing_slash_is_packed_and_merged(fam, tmp_path, caplog):
    """A modules.json path "2_Dense/" (which sentence-transformers loads) is the module 2_Dense: packed
    as tensors without a warning, and the merge's 2_Dense holds the merged weights."""
    slash = {}
    for t in ("base", "a", "b"):
        slash[t] = tmp_path / t
        shutil.copytree(fam[t], slash[t])
        doc = json.loads((slash[t] / "modules.json").read_text())
        (slash[t] / "modules.json").write_text(json.dumps([{**m, "path": m["path"].replace("2_Dense", "2_Dense/")}
                                                           for m in doc]))
    with caplog.at_level(logging.WARNING, logger="tallpack"):
        arch = _pack(slash, tmp_path / "s.tallpack")
    assert not caplog.records, caplog.text
    archive = tallpack.open(arch)
    assert "2_Dense/linear.weight" in archive.keys("a") and "2_Dense/model.safetensors" not in archive.files("a")
    _cli("merge", arch, "--method", "ta", "-o", tmp_path / "m")
    assert torch.equal(_load(tmp_path / "m")[2].linear.weight, archive.merged("ta")["2_Dense/linear.weight"])


def test_module_weights_kept_as_files_are_warned_of(fam, tmp_path, caplog):
    """Weight files in a listed module's folder that are not packed as its tensors (two levels
    down) are warned of at pack: a merged model carries them as they are."""
    model = tmp_path / "model"
    shutil.copytree(fam["a"], model)
    (model / "2_Dense" / "x" / "y").mkdir(parents=True)
    save_file({"w": torch.zeros(2)}, model / "2_Dense" / "x" / "y" / "model.safetensors")
    with caplog.at_level(logging.WARNING, logger="tallpack"):
        src = open_source(model)
    assert "2_Dense/x/y/model.safetensors" in src.files
    assert "2_Dense/x/y/model.safetensors kept as folder files, not packed as the module's tensors" in caplog.text


def test_outputs_name_their_folder(fam, tmp_path):
    """merge and unpack of a sentence-transformers archive name the folder written, whether or not
    it has module weights (a merge that leaves the module out, a task without it), as a pipeline's do."""
    arch = tmp_path / "p.tallpack"
    tallpack.pack(fam["base"], {"a": fam["a"], "nodense": _without_dense(fam["b"], tmp_path / "nd")}, arch)
    for how, out in ((("merge", "--method", "ta"), tmp_path / "m"), (("unpack", "--task", "nodense"), tmp_path / "u"),
                     (("unpack", "--task", "a"), tmp_path / "a")):
        r = CliRunner().invoke(main, [*how[:1], str(arch), *how[1:], "-o", str(out)], catch_exceptions=False)
        assert r.exit_code == 0 and f"wrote {out}" in r.output and f"wrote {out}/" not in r.output, r.output
