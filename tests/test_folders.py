"""Hugging Face folders, complete: folder files kept (once per content), shards like the original,
tied weights as transformers saves them, and from_pretrained / AutoTokenizer on unpacked folders."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tallpack
from tallpack.errors import CheckpointError, FormatError, OutputError
from tallpack.folders import check_file_name, safe_target
from tallpack.manifest import Manifest
from conftest import expected_reconstruction
from tallpack.sharding import parse_size, plan_by_size
from conftest import written

transformers = pytest.importorskip("transformers")

WORDS = "the a cat dog sat on mat ran far fast slow red blue big small and then".split()


def _perturb(model, seed: int, scale: float = 0.02) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            touch = (torch.rand(p.shape, generator=g) < 0.3).to(p.dtype)
            p.add_((touch * scale * torch.randn(p.shape, generator=g)).to(p.dtype))


@pytest.fixture(scope="module")
def gpt2_family(tmp_path_factory) -> dict:
    """bf16 GPT-2 (tied lm_head) saved by transformers in 4 shards, with generation_config.json,
    a model card and a chat template; base and two fine-tunes."""
    from transformers import GPT2Config, GPT2LMHeadModel

    root = tmp_path_factory.mktemp("gpt2")
    cfg = GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(cfg).to(torch.bfloat16)
    paths = {}
    for i, name in enumerate(["base", "chat", "code"]):
        if i:
            _perturb(model, i)
        model.save_pretrained(root / name, max_shard_size="20KB")
        (root / name / "README.md").write_text(f"# tiny gpt2 {name}\n")
        (root / name / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
        paths[name] = root / name
    assert len(list(paths["base"].glob("model-*.safetensors"))) == 4
    return paths


@pytest.fixture(scope="module")
def bert_family(tmp_path_factory) -> dict:
    """Tiny BERT classifiers (different label counts: task-own heads) with a WordPiece tokenizer
    built from a vocab file; the tokenizer files are the same in every folder."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    root = tmp_path_factory.mktemp("bert")
    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tok = BertTokenizerFast(vocab_file=str(vocab))
    paths = {}
    for i, (name, labels) in enumerate([("base", 2), ("sst", 2), ("nli", 3)]):
        cfg = BertConfig(vocab_size=len(WORDS) + 5, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=32, num_labels=labels)
        torch.manual_seed(0)
        model = BertForSequenceClassification(cfg)
        if i:
            _perturb(model, 10 + i)
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        paths[name] = root / name
    return paths


def _pack(fam: dict, out: Path) -> Path:
    tallpack.pack(fam["base"], {k: v for k, v in fam.items() if k != "base"}, out)
    return out


def _by_hand(folder: Path, sd: dict, auto):
    """The reconstruction loaded by hand: a model built from the config, loaded with the state dict."""
    config = transformers.AutoConfig.from_pretrained(folder)
    model = auto.from_config(config).to(next(iter(sd.values())).dtype)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected
    model.tie_weights()
    return model.eval()


def test_gpt2_sharded_folder_unpacks_like_the_original(gpt2_family, tmp_path):
    from transformers import AutoModelForCausalLM

    arch = _pack(gpt2_family, tmp_path / "gpt2.tallpack")
    with tallpack.open(arch) as fam:
        assert fam.format_version == written(12)  # folder files; small tensors grouped (1.12)
        assert set(fam.files("chat")) == {"config.json", "generation_config.json", "README.md", "chat_template.jinja"}
        tallpack.write_task(fam, "chat", tmp_path / "chat")
        sd = fam.state_dict("chat")
    orig, out = gpt2_family["chat"], tmp_path / "chat"
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in orig.iterdir())
    index, want = (json.loads((d / "model.safetensors.index.json").read_text()) for d in (out, orig))
    assert index["weight_map"] == want["weight_map"]  # same shard names, same tensors in each
    assert index["metadata"]["total_size"] == want["metadata"]["total_size"]
    for f in ("generation_config.json", "README.md", "chat_template.jinja", "config.json"):
        assert (out / f).read_bytes() == (orig / f).read_bytes()
    assert "lm_head.weight" not in index["weight_map"]  # tied: left out, as transformers saved it

    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    hand = _by_hand(out, sd, AutoModelForCausalLM)
    ids = torch.tensor([[1, 5, 9, 3, 7, 2]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, hand(ids).logits)
    assert model.generation_config.eos_token_id == 2


def test_max_shard_size_reshards(gpt2_family, tmp_path):
    from tallpack_cli.main import main
    from click.testing import CliRunner

    arch = _pack(gpt2_family, tmp_path / "gpt2.tallpack")
    r = CliRunner().invoke(main, ["-q", "unpack", str(arch), "--task", "code", "-o", str(tmp_path / "code"),
                                  "--max-shard-size", "40KB"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    index = json.loads((tmp_path / "code" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert files == [f"model-0000{i}-of-00002.safetensors" for i in (1, 2)]
    assert all(os.path.getsize(tmp_path / "code" / f) <= 40_000 + 2_000 for f in files)  # + header
    # one shard is model.safetensors, without an index
    r = CliRunner().invoke(main, ["-q", "unpack", str(arch), "--task", "code", "-o", str(tmp_path / "one"),
                                  "--max-shard-size", "5GB"], catch_exceptions=False)
    assert sorted(p.name for p in (tmp_path / "one").glob("model*")) == ["model.safetensors"]
    assert transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "one") is not None


def test_force_replaces_the_whole_weight_layout(gpt2_family, tmp_path):
    """Unpacking over an earlier output with ``--force`` leaves no weights of the old layout: a
    model.safetensors beside new shards would be loaded instead of them, stale shards mislead."""
    from tallpack_cli.main import main
    from click.testing import CliRunner

    arch = _pack(gpt2_family, tmp_path / "gpt2.tallpack")
    out = tmp_path / "out"

    def unpack(task, size, force=True):
        args = ["-q", "unpack", str(arch), "--task", task, "-o", str(out), "--max-shard-size", size]
        return CliRunner().invoke(main, args + (["--force"] if force else []))

    assert unpack("code", "20KB", force=False).exit_code == 0
    three = sorted(p.name for p in out.glob("model*"))
    assert len(three) >= 4  # shards and the index
    r = unpack("chat", "5GB", force=False)  # the old shards are in the way: refused, nothing changed
    assert r.exit_code != 0 and "--force" in r.output
    assert sorted(p.name for p in out.glob("model*")) == three
    assert unpack("chat", "5GB").exit_code == 0
    assert sorted(p.name for p in out.glob("model*")) == ["model.safetensors"]
    assert unpack("code", "40KB").exit_code == 0  # and back: no model.safetensors beside the shards
    assert sorted(p.name for p in out.glob("model*")) == [
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json"]
    with tallpack.open(arch) as fam:
        want = fam.state_dict("code")
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    got = model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in want.items() if k in got)


def test_bert_with_tokenizer_loads_with_auto_classes(bert_family, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    arch = _pack(bert_family, tmp_path / "bert.tallpack")
    with tallpack.open(arch) as fam:
        tallpack.write_task(fam, "nli", tmp_path / "nli")
        sd = fam.state_dict("nli")
        files = {t: fam.files(t) for t in fam.tasks} | {"base": fam.files()}
        # each distinct content once: the tokenizer files are shared by all three folders
        distinct = {d for f in files.values() for d in f.values()}
        assert len(fam.manifest.files) == len(distinct)
        assert files["sst"]["tokenizer.json"] == files["nli"]["tokenizer.json"] == files["base"]["tokenizer.json"]
        assert files["sst"]["config.json"] != files["nli"]["config.json"]
        assert fam.read_file("tokenizer_config.json", "nli") == (bert_family["nli"] / "tokenizer_config.json").read_bytes()
    tok = AutoTokenizer.from_pretrained(tmp_path / "nli")
    want = AutoTokenizer.from_pretrained(bert_family["nli"])
    text = "the cat sat on the red mat"
    assert tok(text)["input_ids"] == want(text)["input_ids"]
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "nli").eval()
    assert model.config.num_labels == 3
    hand = _by_hand(tmp_path / "nli", sd, AutoModelForSequenceClassification)
    batch = tok([text, "a big dog ran far"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, hand(**batch).logits)


def test_merged_model_gets_the_base_files(bert_family, tmp_path):
    from transformers import AutoTokenizer

    arch = _pack(bert_family, tmp_path / "bert.tallpack")
    with tallpack.open(arch) as fam:
        tallpack.write_merged(fam, tmp_path / "merged", "ta", alpha=0.5, task="sst")
    assert AutoTokenizer.from_pretrained(tmp_path / "merged")("the cat")["input_ids"]
    assert transformers.AutoConfig.from_pretrained(tmp_path / "merged").num_labels == 2


# -- safety -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "a/../../b", "a\\b", "", "a//b", "./a", "a\0b", "C:x"])
def test_bad_file_names_are_refused(name):
    with pytest.raises(FormatError):
        check_file_name(name)


def test_a_manifest_naming_a_file_outside_the_folder_is_refused(bert_family, tmp_path):
    arch = _pack(bert_family, tmp_path / "bert.tallpack")
    with tallpack.open(arch) as fam:
        d = fam.manifest.to_dict()
    digest = next(iter(d["files"]))
    d["tasks"][0]["files"] = {"../../escape.txt": digest}
    with pytest.raises(FormatError, match="escape.txt"):
        Manifest.from_dict(d)
    d["tasks"][0]["files"] = {"ok.txt": "0" * 64}
    with pytest.raises(FormatError, match="not stored"):
        Manifest.from_dict(d)


def test_writing_never_follows_a_link_out_of_the_output(tmp_path):
    out, outside = tmp_path / "out", tmp_path / "outside"
    out.mkdir()
    outside.mkdir()
    (out / "sub").symlink_to(outside)
    with pytest.raises(OutputError, match="outside"):
        safe_target(out, "sub/tokenizer.json")
    assert safe_target(out, "nested/tokenizer.json") == out / "nested" / "tokenizer.json"


def test_input_links_are_followed_only_inside_the_folder(bert_family, tmp_path):
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(bert_family["sst"], folder)
    (folder / "special.json").symlink_to(folder / "tokenizer.json")  # inside: kept, as a file
    src = tallpack.sources.open_source(folder)
    assert src.files["special.json"].read_bytes() == (folder / "tokenizer.json").read_bytes()
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the archive")
    (folder / "notes.txt").symlink_to(secret)
    with pytest.raises(CheckpointError, match="outside the input folder"):
        tallpack.sources.open_source(folder)


def test_sizes_and_plans():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("500MB") == 500 * 10**6 and parse_size("2GiB") == 2 << 30
    assert parse_size(1234) == 1234
    with pytest.raises(tallpack.InvalidArgumentError):
        parse_size("5 parsecs")
    assert plan_by_size({"a": 6, "b": 6, "c": 3, "d": 30}, 10) == {
        "model-00001-of-00003.safetensors": ["a"], "model-00002-of-00003.safetensors": ["b", "c"],
        "model-00003-of-00003.safetensors": ["d"]}
    assert plan_by_size({"a": 1}, "1KB") == {"model.safetensors": ["a"]}


def test_a_folder_manifest_follows_the_schema(gpt2_family, tmp_path):
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((Path(__file__).resolve().parents[1] / "spec" / "manifest.schema.json").read_text())
    with tallpack.open(_pack(gpt2_family, tmp_path / "g.tallpack")) as fam:
        d = fam.manifest.to_dict()
    jsonschema.validate(d, schema)
    assert d["tasks"][0]["source"]["shards"][0] == ["model-00001-of-00004.safetensors", d["tasks"][0]["source"]["shards"][0][1]]
    d["tasks"][0]["files"]["../up"] = next(iter(d["files"]))
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(d, schema)


def test_sharded_pytorch_bin_folders_unpack_as_safetensors_shards(tmp_path):
    g = torch.Generator().manual_seed(3)
    base = {f"layers.{i}.w": torch.randn(8, 8, generator=g) for i in range(4)}
    folders = {}
    for name, scale in (("base", 0.0), ("ft", 0.1)):
        d = tmp_path / name
        d.mkdir()
        sd = {k: v + scale * torch.randn(v.shape, generator=g) for k, v in base.items()}
        parts = [dict(list(sd.items())[:2]), dict(list(sd.items())[2:])]
        weight_map = {}
        for i, part in enumerate(parts, 1):
            f = f"pytorch_model-0000{i}-of-00002.bin"
            torch.save(part, d / f)
            weight_map |= dict.fromkeys(part, f)
        (d / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {"total_size": 512}, "weight_map": weight_map}))
        (d / "training_args.bin").write_bytes(b"a pickle, never stored")
        (d / "config.json").write_text("{}")
        folders[name] = d
    tallpack.pack(folders["base"], {"ft": folders["ft"]}, tmp_path / "f.tallpack")
    with tallpack.open(tmp_path / "f.tallpack") as fam:
        assert set(fam.files("ft")) == {"config.json"}
        tallpack.write_task(fam, "ft", tmp_path / "out")
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == {"layers.0.w": "model-00001-of-00002.safetensors", "layers.1.w": "model-00001-of-00002.safetensors",
                                   "layers.2.w": "model-00002-of-00002.safetensors", "layers.3.w": "model-00002-of-00002.safetensors"}


def test_a_bare_base_model_matches_fine_tunes_with_a_head(bert_family, tmp_path):
    """The base saved as the bare ``BertModel`` (``embeddings.*``), the tasks as classifiers
    (``bert.embeddings.*``): the base's tensors are matched under the tasks' prefix, so the
    encoder is stored as merged tensors (it was refused, or with --allow-mismatch stored whole
    per task), and each task rebuilds as the paper's formula says."""
    from safetensors.torch import load_file
    from transformers import BertModel

    bare = tmp_path / "bare"
    BertModel.from_pretrained(bert_family["base"]).save_pretrained(bare)
    assert not any(k.startswith("bert.") for k in load_file(bare / "model.safetensors"))
    tasks = {k: v for k, v in bert_family.items() if k != "base"}
    out = tmp_path / "f.tallpack"
    tallpack.pack(bare, tasks, out)
    base = {f"bert.{k}": v for k, v in load_file(bare / "model.safetensors").items()}
    with tallpack.open(out) as fam:
        assert fam.manifest.base["prefix"] == "bert."
        kinds = {e.kind for e in fam.manifest.tensors for _ in (e.members or [e])}
        assert "merged" in kinds
        want = expected_reconstruction(base, {t: load_file(f / "model.safetensors") for t, f in tasks.items()},
                                       dict.fromkeys(tasks, 0.4))
        for t in tasks:
            got = fam.state_dict(t)
            assert len(want[t]) == len(base) and all(torch.equal(got[k], v) for k, v in want[t].items())


def _small(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"a.weight": torch.randn(16, 8, generator=g), "b.weight": torch.randn(8, generator=g)}


def test_a_single_weight_file_keeps_its_name_and_a_stale_one_is_left_out(tmp_path, caplog):
    """A folder's one weight file under another name (a PEFT adapter's adapter_model.safetensors)
    comes back under that name; a folder holding a single file beside shards is packed as
    transformers loads it (the single file), with a warning; a cache snapshot's task is named
    after its repository, a URL's without its query."""
    from safetensors.torch import load_file, save_file

    from tallpack.sources import stem

    base = _small(0)
    ada = tmp_path / "ada"
    ada.mkdir()
    tuned = {k: v + 0.01 for k, v in base.items()}
    save_file(tuned, ada / "adapter_model.safetensors")
    (ada / "adapter_config.json").write_text("{}")
    both = tmp_path / "models--org--both" / "snapshots" / ("a" * 40)
    both.mkdir(parents=True)
    loaded = {k: v - 0.01 for k, v in base.items()}
    save_file(loaded, both / "model.safetensors")
    save_file({"a.weight": base["a.weight"]}, both / "model-00001-of-00002.safetensors")
    save_file({"b.weight": base["b.weight"]}, both / "model-00002-of-00002.safetensors")
    (both / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"a.weight": "model-00001-of-00002.safetensors",
                                        "b.weight": "model-00002-of-00002.safetensors"}}))
    assert stem(both) == "both" and stem("https://h/x/cars.safetensors?X-Amz-Signature=a%2Fb") == "cars"
    tallpack.pack(base, [ada, both], tmp_path / "f.tallpack")
    assert "holds model.safetensors.index.json too; packing model.safetensors" in caplog.text
    with tallpack.open(tmp_path / "f.tallpack") as fam:
        assert fam.tasks == ("ada", "both")
        tallpack.write_task(fam, "ada", tmp_path / "u")
        tallpack.write_task(fam, "both", tmp_path / "b")
    assert sorted(p.name for p in (tmp_path / "u").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert set(load_file(tmp_path / "u" / "adapter_model.safetensors")) == set(base)
    assert torch.allclose(load_file(tmp_path / "b" / "model.safetensors")["a.weight"], loaded["a.weight"], atol=0.02)


def test_an_earlier_archive_in_a_folder_is_left_out(tmp_path, caplog):
    """An archive packed into the model folder (``-o model/family.tallpack``) was stored whole in
    the next archive of that folder, halving its ratio without a word: it is left out, warned."""
    from safetensors.torch import save_file

    base = _small(0)
    ft = tmp_path / "ft"
    ft.mkdir()
    save_file({k: v + 0.01 for k, v in base.items()}, ft / "model.safetensors")
    (ft / "config.json").write_text("{}")
    tallpack.pack(base, {"ft": ft}, ft / "first.tallpack")
    tallpack.pack(base, {"ft": ft}, tmp_path / "second.tallpack")
    assert f"{ft / 'first.tallpack'}: an archive, left out of the folder's files" in caplog.text
    with tallpack.open(tmp_path / "second.tallpack") as fam:
        assert set(fam.files("ft")) == {"config.json"}


def _llama(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.float16)
    if seed:
        _perturb(model, seed)
    return model


def test_a_sharded_variant_folder_packs_and_unpacks_under_its_shard_names(tmp_path, caplog):
    """``save_pretrained(variant="fp16", max_shard_size=...)`` writes ``model.fp16-0000i-of-0000n.safetensors``
    and ``model.safetensors.index.fp16.json``: the folder packs (it was refused: no model.safetensors,
    shard index or pytorch_model.bin), so does its index given as the input, and the task unpacks
    with the same shards, loaded by from_pretrained as the original with variant="fp16"; an exact
    unpack gives the original files back. Beside plain weights, the variant is left out, warned."""
    from transformers import LlamaForCausalLM

    from tallpack.sources import stem

    folders = {}
    for i, name in enumerate(["base", "ft"]):
        folders[name] = tmp_path / name
        _llama(i).save_pretrained(folders[name], variant="fp16", max_shard_size="20KB")
    shards = sorted(p.name for p in folders["ft"].glob("model.fp16-*.safetensors"))
    assert len(shards) > 1 and (folders["ft"] / "model.safetensors.index.fp16.json").is_file()
    tallpack.pack(folders["base"], {"ft": folders["ft"]}, tmp_path / "f.tallpack", exact=True)
    given = folders["ft"] / "model.safetensors.index.fp16.json"
    assert stem(given) == "ft"
    tallpack.pack(folders["base"] / "model.safetensors.index.fp16.json", [given], tmp_path / "g.tallpack")
    with tallpack.open(tmp_path / "f.tallpack") as fam, tallpack.open(tmp_path / "g.tallpack") as fam2:
        assert fam2.tasks == ("ft",) and fam2.task_info("ft").source["shards"] == fam.task_info("ft").source["shards"]
        tallpack.write_task(fam, "ft", tmp_path / "out")
        tallpack.write_task(fam, "ft", tmp_path / "exact", exact=True)
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("*.safetensors")) == shards
    orig = LlamaForCausalLM.from_pretrained(folders["ft"], variant="fp16").state_dict()
    back = LlamaForCausalLM.from_pretrained(out).state_dict()  # model.safetensors.index.json names them
    assert orig.keys() == back.keys() and all(torch.allclose(orig[k], back[k], atol=1e-3) for k in orig)
    for f in folders["ft"].iterdir():
        assert (tmp_path / "exact" / f.name).read_bytes() == f.read_bytes()

    caplog.clear()
    _llama(3).save_pretrained(folders["ft"])  # model.safetensors beside the fp16 shards
    tallpack.pack(folders["base"], {"ft": folders["ft"]}, tmp_path / "h.tallpack")
    assert ("holds model.safetensors.index.fp16.json too; packing model.safetensors, which transformers loads"
            in caplog.text)
    with tallpack.open(tmp_path / "h.tallpack") as fam:
        assert "model.safetensors.index.fp16.json" not in fam.files("ft")  # no index of shards not written


def test_pickled_and_ambiguous_variants(tmp_path):
    """``pytorch_model.fp16.bin`` (single or sharded, with ``pytorch_model.bin.index.fp16.json``) packs
    and unpacks as ``model.safetensors`` (shards ``model.fp16-0000i-of-00002.safetensors`` with
    ``model.safetensors.index.json``): what ``from_pretrained(folder)`` loads without ``variant=``; a
    folder with two variants and no plain weights is refused, saying what to do."""
    from safetensors.torch import load_file, save_file

    base = _small(0)
    single, sharded, both = (tmp_path / n for n in ("single", "sharded", "both"))
    for d in (single, sharded, both):
        d.mkdir()
    torch.save({k: v + 0.01 for k, v in base.items()}, single / "pytorch_model.fp16.bin")
    weight_map = {}
    for i, k in enumerate(base, 1):
        torch.save({k: base[k] - 0.01}, sharded / f"pytorch_model.fp16-0000{i}-of-00002.bin")
        weight_map[k] = f"pytorch_model.fp16-0000{i}-of-00002.bin"
    (sharded / "pytorch_model.bin.index.fp16.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    save_file(base, both / "model.fp16.safetensors")
    save_file(base, both / "model.bf16.safetensors")
    tallpack.pack(base, {"single": single, "sharded": sharded}, tmp_path / "f.tallpack")
    with tallpack.open(tmp_path / "f.tallpack") as fam:
        tallpack.write_task(fam, "single", tmp_path / "s")
        tallpack.write_task(fam, "sharded", tmp_path / "h")
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["model.safetensors"]
    assert set(load_file(tmp_path / "s" / "model.safetensors")) == set(base)
    index = json.loads((tmp_path / "h" / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == {"a.weight": "model.fp16-00001-of-00002.safetensors",
                                   "b.weight": "model.fp16-00002-of-00002.safetensors"}
    with pytest.raises(CheckpointError, match=r"holds weight variants 'bf16', 'fp16' and no plain weights.*move"):
        tallpack.pack(base, {"both": both}, tmp_path / "b.tallpack")
    with pytest.raises(CheckpointError, match="not a shard index of transformers' names"):
        (both / "adapter_model.safetensors.index.json").write_text("{}")
        tallpack.pack(base, {"both": both / "adapter_model.safetensors.index.json"}, tmp_path / "b.tallpack")


@given(st.text(st.characters(blacklist_characters="/\0", blacklist_categories=("Cs",)), min_size=1, max_size=20))
def test_variant_names_are_transformers_names(variant):
    """Every name transformers' ``_add_variant`` makes is read back with its variant, except one
    that looks like a shard (``x-00001-of-00002``), which is a shard of the variant before it."""
    from transformers.modeling_utils import _add_variant

    from tallpack.folders import SHARD, VARIANT_SETS, weight_variant

    names = ["model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json"]
    for order, (name, (pattern, _, _)) in enumerate(zip(names, VARIANT_SETS)):
        m = pattern.fullmatch(_add_variant(name, variant))
        assert m is not None and (m["v"] == variant or SHARD.fullmatch(variant))
        assert pattern.fullmatch(name) is None
        assert weight_variant(_add_variant(name, variant)) == (None if SHARD.fullmatch(variant) else (variant, order))


def test_subfolder_weights_are_kept_as_files(tmp_path, caplog):
    """A sentence-transformers folder (the model at the top, modules in subfolders, a Dense module's
    ``2_Dense/model.safetensors``): the module weights were dropped without a word, by pack, unpack,
    unpack --exact and verify alike. They are packed as tensors ``2_Dense/NAME`` (tests/test_st_modules.py),
    written back into ``2_Dense/``, byte for byte by unpack --exact; other frameworks' files
    (``onnx/model.onnx``) are still left out, and a weight file beside the model's (a ``value_head.safetensors``) is left out with a warning."""
    from safetensors.torch import load_file, save_file
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                     max_position_embeddings=16)
    torch.manual_seed(0)
    model = BertModel(cfg)
    folders = {}
    for i, name in enumerate(["base", "t1", "t2"]):
        d = folders[name] = tmp_path / name
        if i:
            _perturb(model, i)
        model.save_pretrained(d)
        (d / "modules.json").write_text(json.dumps([{"idx": 0, "path": ""}, {"idx": 1, "path": "2_Dense"}]))
        (d / "2_Dense").mkdir()
        (d / "2_Dense" / "config.json").write_text('{"in_features": 16, "out_features": 8}')
        save_file({"linear.weight": torch.full((8, 16), float(i))}, d / "2_Dense" / "model.safetensors")
        (d / "onnx").mkdir()
        (d / "onnx" / "model.onnx").write_bytes(b"another framework's copy")
        save_file({"v_head.weight": torch.ones(1, 16)}, d / "value_head.safetensors")
    tasks = {k: v for k, v in folders.items() if k != "base"}
    tallpack.pack(folders["base"], tasks, tmp_path / "f.tallpack", exact=True)
    assert f"{folders['t1']}: value_head.safetensors left out of the archive" in caplog.text
    with tallpack.open(tmp_path / "f.tallpack") as fam:
        assert set(fam.files("t1")) == {"config.json", "modules.json", "2_Dense/config.json"}
        assert fam.verify() == []
        lossy = {t: fam.get_tensor(t, "2_Dense/linear.weight") for t in tasks}
        for t in tasks:
            tallpack.write_task(fam, t, tmp_path / f"{t}-lossy")
            tallpack.write_task(fam, t, tmp_path / f"{t}-exact", exact=True)
    for t in tasks:
        for how in ("lossy", "exact"):
            dense = tmp_path / f"{t}-{how}" / "2_Dense" / "model.safetensors"
            if how == "exact":
                assert dense.read_bytes() == (folders[t] / "2_Dense" / "model.safetensors").read_bytes()
            else:
                assert torch.equal(load_file(dense)["linear.weight"], lossy[t])
            assert not (tmp_path / f"{t}-{how}" / "onnx").exists()
            assert not (tmp_path / f"{t}-{how}" / "value_head.safetensors").exists()


def test_a_trainers_state_is_left_out(tmp_path, caplog):
    """A trainer's output folder packed as a task: its checkpoint folders (Trainer's ``checkpoint-500/``
    with a full model and an optimizer, DeepSpeed's ``global_step500/``, accelerate's ``checkpoint_2/``)
    and state files anywhere (``optimizer.bin``, ``scheduler.pt``, ``random_states_0.pkl``,
    ``training_args.bin``) were packed whole as folder files (``.pkl``, subfolder ``.bin``): left out,
    named in one warning; a module's weights (``2_Dense/model.safetensors``) are still kept. Packed
    on its own, a checkpoint folder leaves out its ``trainer_state.json`` too."""
    from safetensors.torch import save_file

    base = _small(0)
    ft = tmp_path / "ft"
    for d in ("checkpoint-500/global_step500", "checkpoint_2", "2_Dense"):
        (ft / d).mkdir(parents=True)
    save_file({k: v + 0.01 for k, v in base.items()}, ft / "model.safetensors")
    (ft / "config.json").write_text("{}")
    save_file({k: v + 0.02 for k, v in base.items()}, ft / "checkpoint-500" / "model.safetensors")
    (ft / "checkpoint-500" / "optimizer.bin").write_bytes(b"\0" * 4096)
    (ft / "checkpoint-500" / "trainer_state.json").write_text("{}")
    (ft / "checkpoint-500" / "global_step500" / "mp_rank_00_model_states.pt").write_bytes(b"pt")
    (ft / "checkpoint_2" / "random_states_0.pkl").write_bytes(b"pickle")
    for name in ("optimizer.bin", "scheduler.pt", "random_states_0.pkl", "training_args.bin", "trainer_state.json"):
        (ft / name).write_bytes(b"state")
    save_file({"linear.weight": torch.ones(2, 2)}, ft / "2_Dense" / "model.safetensors")
    (ft / "2_Dense" / "scaler.pt").write_bytes(b"scaler")
    tallpack.pack(base, {"ft": ft}, tmp_path / "f.tallpack")
    with tallpack.open(tmp_path / "f.tallpack") as fam:
        assert set(fam.files("ft")) == {"config.json", "trainer_state.json", "2_Dense/model.safetensors"}
    left = [r.getMessage() for r in caplog.records if "a trainer's state" in r.getMessage()]
    assert left == [f"{ft}: 2_Dense/scaler.pt, checkpoint-500/, checkpoint_2/, optimizer.bin, random_states_0.pkl "
                    "and 2 more left out of the archive: a trainer's state (checkpoints, optimizer, scheduler, "
                    "random states, arguments), not the model's files"]
    assert "kept whole as folder files" not in caplog.text

    tallpack.pack(base, {"ckpt": ft / "checkpoint-500"}, tmp_path / "c.tallpack")
    with tallpack.open(tmp_path / "c.tallpack") as fam:
        assert fam.files("ckpt") == {}


def test_folder_files_are_stored_a_chunk_at_a_time(tmp_path):
    """A large kept file (a module's weights) was read whole into memory to hash and store it:
    it is read a few chunks at a time, and comes back byte for byte."""
    import tracemalloc

    from safetensors.torch import save_file

    base = _small(0)
    ft = tmp_path / "ft"
    (ft / "2_Dense").mkdir(parents=True)
    save_file({k: v + 0.01 for k, v in base.items()}, ft / "model.safetensors")
    big = ft / "2_Dense" / "model.safetensors"
    big.write_bytes(os.urandom(8 << 20))
    tracemalloc.start()
    try:
        tallpack.pack(base, {"ft": ft}, tmp_path / "f.tallpack", chunk_elements=1 << 16)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, peak
    with tallpack.open(tmp_path / "f.tallpack") as fam:
        assert fam.verify() == []
        tallpack.write_task(fam, "ft", tmp_path / "out")
    assert (tmp_path / "out" / "2_Dense" / "model.safetensors").read_bytes() == big.read_bytes()


def test_a_variant_folder_unpacks_and_merges_to_what_from_pretrained_loads(tmp_path):
    """``save_pretrained(variant="fp16")`` writes one ``model.fp16.safetensors``: its lossy unpack and
    merge wrote that name, which ``from_pretrained(folder)`` does not load (a sharded variant's wrote
    ``model.safetensors.index.json``, which it does): both now write transformers' plain names, and
    ``unpack --exact`` gives back the original file."""
    from transformers import LlamaForCausalLM

    folders = {}
    for i, name in enumerate(["base", "a", "b"]):
        folders[name] = tmp_path / name
        _llama(i).save_pretrained(folders[name], variant="fp16")
    assert (folders["a"] / "model.fp16.safetensors").is_file()
    tallpack.pack(folders["base"], {t: folders[t] for t in ("a", "b")}, tmp_path / "f.tallpack", exact=True)
    with tallpack.open(tmp_path / "f.tallpack") as fam:
        tallpack.write_task(fam, "a", tmp_path / "lossy")
        tallpack.write_task(fam, "a", tmp_path / "exact", exact=True)
        tallpack.write_merged(fam, tmp_path / "merged")
    orig = LlamaForCausalLM.from_pretrained(folders["a"], variant="fp16").state_dict()
    for out in ("lossy", "merged"):
        assert not list((tmp_path / out).glob("model.fp16*"))
        back = LlamaForCausalLM.from_pretrained(tmp_path / out).state_dict()
        assert orig.keys() == back.keys()
    assert all(torch.allclose(orig[k], back[k], atol=0.1) for k in orig)
    assert (tmp_path / "exact" / "model.fp16.safetensors").read_bytes() == \
        (folders["a"] / "model.fp16.safetensors").read_bytes()


@pytest.mark.parametrize("shard", ["20KB", None])
def test_an_earlier_variant_output_is_replaced(tmp_path, shard):
    """``unpack --exact`` of a variant folder writes its own names (``model.safetensors.index.fp16.json``
    and its shards, or ``model.fp16.safetensors``); a later ``unpack --force`` of another task left
    them beside its own weights, and ``from_pretrained(folder, variant="fp16")`` silently loaded the
    earlier task. They are removed, as an earlier plain output's weights are; other files stay."""
    from transformers import LlamaForCausalLM

    folders = {}
    for i, name in enumerate(["base", "a", "b"]):
        folders[name] = tmp_path / name
        _llama(i).save_pretrained(folders[name], variant="fp16", **({"max_shard_size": shard} if shard else {}))
    tallpack.pack(folders["base"], {t: folders[t] for t in ("a", "b")}, tmp_path / "f.tallpack", exact=True)
    out = tmp_path / "out"
    with tallpack.open(tmp_path / "f.tallpack") as fam:
        tallpack.write_task(fam, "a", out, exact=True)
        assert any(p.name.startswith("model.fp16") for p in out.iterdir())
        (out / "model.fp16.notes.txt").write_text("mine")
        tallpack.write_task(fam, "b", out, overwrite=True, max_shard_size="60KB")
    names = sorted(p.name for p in out.iterdir())
    assert not [n for n in names if "fp16" in n and n != "model.fp16.notes.txt"], names
    assert "model.fp16.notes.txt" in names and "config.json" in names
    orig = LlamaForCausalLM.from_pretrained(folders["b"], variant="fp16").state_dict()
    back = LlamaForCausalLM.from_pretrained(out).state_dict()
    assert all(torch.allclose(orig[k], back[k], atol=0.1) for k in orig)


@settings(deadline=None)  # the first example imports transformers
@given(st.sampled_from(["fp16", "bf16", "v1.2", "a-b"]),
       st.lists(st.text(st.characters(blacklist_characters="/\0", blacklist_categories=("Cs",)), min_size=1,
                        max_size=30), max_size=5))
def test_earlier_weights_are_transformers_weight_sets_only(variant, others):
    """``weights_among`` finds the plain and variant weight sets of an earlier output (and the shards
    their indexes name), never another file, whatever its name."""
    from transformers.modeling_utils import _add_variant

    from tallpack.folders import weight_variant
    from tallpack.sharding import weights_among

    # the plain weight-set names, which --force removes as an earlier output's (the pickles since c373f13)
    plain = ("model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json",
             "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json",
             "diffusion_pytorch_model.bin", "diffusion_pytorch_model.bin.index.json")
    others = [o for o in others if weight_variant(o) is None and o not in plain]
    index = _add_variant("model.safetensors.index.json", variant)
    bin_index = _add_variant("pytorch_model.bin.index.json", variant)
    sets = {_add_variant("model.safetensors", variant), _add_variant("pytorch_model.bin", variant), index, bin_index,
            "model.safetensors"}
    shards = {index: [f"model.{variant}-00001-of-00002.safetensors", "../up.safetensors", "config.json"],
              bin_index: [f"pytorch_model.{variant}-00001-of-00002.bin", "notes.txt"]}
    files = {n: json.dumps({"weight_map": {str(i): s for i, s in enumerate(shards.get(n, []))}}).encode()
             for n in sets | {s for v in shards.values() for s in v} | set(others)}
    found = weights_among(set(files), files.__getitem__, files.__contains__)
    assert found == sets | {shards[index][0], shards[bin_index][0]}
