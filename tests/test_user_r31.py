"""A Hugging Face user's fine-tunes, end to end (r31): tiny transformers models (Llama-style, tied
and untied) saved as a user saves them, packed, unpacked and merged, and loaded back with
``from_pretrained`` as a user checks them."""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path

import pytest
import torch

import tallpack

transformers = pytest.importorskip("transformers")


def _llama(tied: bool = True) -> "transformers.LlamaForCausalLM":
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                                   tie_word_embeddings=tied)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def _fine_tune(model: "transformers.LlamaForCausalLM", seed: int) -> None:
    """Two optimizer steps on random tokens (a real, if tiny, fine-tune)."""
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3 * (seed % 3 + 1))
    model.train()
    for _ in range(2):
        ids = torch.randint(0, 64, (2, 8))
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def _load(folder: Path) -> tuple["transformers.PreTrainedModel", str]:
    """``from_pretrained(folder)`` and what transformers said while loading it."""
    said = io.StringIO()
    handler = logging.StreamHandler(said)
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        with contextlib.redirect_stdout(said), contextlib.redirect_stderr(said):
            model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    finally:
        logger.removeHandler(handler)
    return model, said.getvalue()


@pytest.fixture(scope="module")
def bin_base_family(tmp_path_factory) -> dict:
    """A tied base kept as ``pytorch_model.bin`` (``torch.save(model.state_dict())``: both
    ``lm_head.weight`` and ``model.embed_tokens.weight``, one tensor), and two fine-tunes saved
    by ``save_pretrained`` as safetensors (the tied weight once, under the embeddings' name)."""
    root = tmp_path_factory.mktemp("bin_base")
    model = _llama(tied=True)
    (root / "base").mkdir()
    model.config.save_pretrained(root / "base")
    torch.save(model.state_dict(), root / "base" / "pytorch_model.bin")
    tasks = {}
    for i, name in enumerate(("chat", "code")):
        ft = _llama(tied=True)
        ft.load_state_dict(model.state_dict())
        _fine_tune(ft, 10 + i)
        ft.save_pretrained(root / name)
        tasks[name] = root / name
    return {"root": root, "base": root / "base", "tasks": tasks}


def test_a_tied_pickled_base_with_safetensors_tasks_drops_nothing(bin_base_family, tmp_path, caplog):
    """The base's ``lm_head.weight`` is its embeddings under a second name, which the tasks'
    safetensors files leave out: no base tensor is dropped (no warning to pass
    ``--keep-base-only``), the checkpoints' bytes count the tied weight once, and with
    ``keep_base_only`` the merged model keeps its tie (it once held the base's untouched
    embeddings as ``lm_head.weight`` beside the merged ones: transformers then refused to tie
    them, and its logits were another model's)."""
    f = bin_base_family
    out = tmp_path / "fam.tallpack"
    with caplog.at_level(logging.WARNING, logger="tallpack"):
        m = tallpack.pack(f["base"], f["tasks"], out)
    assert not [r for r in caplog.records if "lm_head" in r.getMessage()], caplog.text
    base_bytes = (f["base"] / "pytorch_model.bin").stat().st_size
    assert m.base["bytes"] <= base_bytes  # the tied weight once, as the file holds it
    with tallpack.open(out) as fam:
        assert tallpack.merged.base_not_held(fam.manifest) == 0
        plain = Path(tallpack.write_merged(fam, tmp_path / "plain", "ta", alpha=0.5)[0]).parent
    kept = tmp_path / "kept.tallpack"
    tallpack.pack(f["base"], f["tasks"], kept, keep_base_only=True)
    with tallpack.open(kept) as fam:
        assert "lm_head.weight" not in fam.merged("ta", alpha=0.5)
        folder = Path(tallpack.write_merged(fam, tmp_path / "kept", "ta", alpha=0.5)[0]).parent
    a, said = _load(folder)
    assert "tie" not in said.lower(), said
    b, _ = _load(plain)
    ids = torch.arange(8)[None]
    with torch.no_grad():
        assert torch.equal(a(input_ids=ids).logits, b(input_ids=ids).logits)


def test_a_task_given_as_tensors_is_named_so_when_unpacked_without_config(bin_base_family, tmp_path, caplog):
    """``pack(base_folder, {"code": model.state_dict()})``: the unpacked folder has no
    ``config.json``, and the warning says the task was given as tensors, not "a bare weights
    file" (there was none); a base given so is named alike when a merge takes the tasks' files."""
    f = bin_base_family
    code = transformers.AutoModelForCausalLM.from_pretrained(f["tasks"]["code"]).state_dict()
    out = tmp_path / "fam.tallpack"
    tallpack.pack(f["base"], {"chat": f["tasks"]["chat"], "code": code}, out)
    with tallpack.open(out) as fam, caplog.at_level(logging.WARNING, logger="tallpack"):
        tallpack.write_task(fam, "code", tmp_path / "code")
    assert "task 'code' was packed from tensors given in memory: its folder has no config.json" in caplog.text
    base = torch.load(f["base"] / "pytorch_model.bin", weights_only=True)
    tallpack.pack(base, {"chat": f["tasks"]["chat"], "code": f["tasks"]["chat"]}, tmp_path / "b.tallpack")
    with tallpack.open(tmp_path / "b.tallpack") as fam, caplog.at_level(logging.INFO, logger="tallpack"):
        tallpack.write_merged(fam, tmp_path / "merged", "ta")
    assert "the base has no folder files (packed from tensors given in memory)" in caplog.text
    assert (tmp_path / "merged" / "config.json").is_file()


def test_inspect_tensors_tells_every_bert_tensor_apart(tmp_path):
    """``inspect --tensors`` of a BERT classifier family in 120 columns: each shortened name is
    another tensor's no longer (``output.dense.bias`` and ``output.LayerNorm.bias`` of a layer
    were both shown as ``bert.encoder.layer.1.output~bias``)."""
    from click.testing import CliRunner
    from tallpack_cli.main import main

    from tallpack.report import elide_all

    cfg = transformers.BertConfig(vocab_size=32, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=16, max_position_embeddings=16, num_labels=3)
    torch.manual_seed(0)
    base = transformers.BertForSequenceClassification(cfg).state_dict()
    tasks = {t: {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v for k, v in base.items()}
             for t in ("sst2", "mnli", "yelp")}
    tallpack.pack(base, tasks, tmp_path / "bert.tallpack")
    for columns in range(96, 125, 4):  # names shortened to several widths
        r = CliRunner(env={"COLUMNS": str(columns)}).invoke(
            main, ["inspect", str(tmp_path / "bert.tallpack"), "--tensors"], catch_exceptions=False)
        assert r.exit_code == 0, r.output
        rows = r.output.split("\ntensor ")[1].splitlines()[2:]
        names = [line.split()[0] for line in rows if line.split() and line.split()[1] in ("merged", "group")]
        assert "shortened" in r.output and len(names) == len(base) + 1  # every tensor and the group
        assert len(set(names)) == len(names), "\n".join(n for n in names if names.count(n) > 1)
    assert all(len(set(elide_all(list(base), n))) == len(base) for n in range(16, 61))


def test_one_shard_given_as_a_task_is_named_as_part_of_a_model(tmp_path, caplog):
    """``ft/code/model-00001-of-00003.safetensors`` (a glob that caught a shard) packs a third
    of the model's tensors: the warning says it is one of 3 shards, not only that the folder's
    config is left."""
    model = _llama(tied=False)
    model.save_pretrained(tmp_path / "base", max_shard_size="8KB")
    _fine_tune(model, 3)
    model.save_pretrained(tmp_path / "code", max_shard_size="8KB")
    shards = sorted((tmp_path / "code").glob("model-*.safetensors"))
    assert len(shards) > 1
    with caplog.at_level(logging.WARNING, logger="tallpack"):
        tallpack.pack(tmp_path / "base", [shards[0]], tmp_path / "f.tallpack")
    assert (f"{shards[0]} is packed as a file alone: it is one of {len(shards)} shards of a model, so the other "
            "shards' tensors are not packed, nor its folder's config.json and tokenizer (give the folder, "
            f"{tmp_path / 'code'}, to pack the whole model)") in caplog.text
