"""Merged models and unpacked folders that from_pretrained can load: the base's tensors that no task
has (an untied base's lm_head.weight, the fine-tunes tied), and the folder files of a family whose
base, or a task, was packed from a bare weights file."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tallpack
from tallpack.merged import base_not_held
from strategies import families

transformers = pytest.importorskip("transformers")


def _llama(tied: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=16, tie_word_embeddings=tied)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def tie_family(tmp_path_factory) -> Path:
    """A Llama base saved untied (its file holds lm_head.weight) and two fine-tunes saved tied
    (theirs do not), as transformers writes them: base/, t1/, t2/."""
    root = tmp_path_factory.mktemp("tie")
    torch.manual_seed(0)
    base = _llama(tied=False)
    base.save_pretrained(root / "base")
    for i in (1, 2):
        m = _llama(tied=True)
        m.load_state_dict({k: v for k, v in base.state_dict().items() if k != "lm_head.weight"}, strict=False)
        m.tie_weights()
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=g) * (torch.rand(p.shape, generator=g) < 0.2))
        m.save_pretrained(root / f"t{i}")
    return root


def _tasks(root: Path, names=("t1", "t2")) -> dict[str, str]:
    return {t: str(root / t) for t in names}


def _loading_info(folder: Path) -> dict:
    _, info = transformers.AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    return {k: list(v) for k, v in info.items() if v}


def test_a_kept_base_only_tensor_is_in_the_merged_model(tie_family, tmp_path, caplog):
    """F3: with keep_base_only, the untied base's lm_head.weight is the merged model's (no task
    changes it), so the merged folder, written with the base's untied config, loads complete."""
    out = tmp_path / "k.tallpack"
    tallpack.pack(str(tie_family / "base"), _tasks(tie_family), out, keep_base_only=True)
    with tallpack.open(out) as fam, caplog.at_level(logging.WARNING):
        sd = fam.merged()
        assert torch.equal(sd["lm_head.weight"], fam.base_tensor("lm_head.weight"))
        assert "lm_head.weight" not in fam.merged(task="t1")  # a task's model is the task's: tied
        path, count = tallpack.write_merged(fam, tmp_path / "merged")
    assert count == len(sd)
    assert not [r for r in caplog.records if "left out" in r.getMessage() or "no copy" in r.getMessage()]
    assert _loading_info(tmp_path / "merged") == {}


def test_a_dropped_base_only_tensor_is_said_at_pack_and_at_merge(tie_family, tmp_path, caplog):
    """F3: without keep_base_only, pack names the base tensor it drops and how to keep it; a
    merged model, which the base's untied config makes need it, says it lacks it."""
    out = tmp_path / "d.tallpack"
    with caplog.at_level(logging.WARNING):
        tallpack.pack(str(tie_family / "base"), _tasks(tie_family), out)
    said = [r.getMessage() for r in caplog.records if r.name == "tallpack.plan"]
    assert len(said) == 1 and "'lm_head.weight'" in said[0] and "--keep-base-only" in said[0], said
    caplog.clear()
    with tallpack.open(out) as fam, caplog.at_level(logging.WARNING):
        assert base_not_held(fam.manifest) == 64 * 16 * 4  # lm_head.weight, float32
        assert "lm_head.weight" not in fam.merged()
        tallpack.write_merged(fam, tmp_path / "merged")
    said = [r.getMessage() for r in caplog.records if "holds no copy" in r.getMessage()]
    assert len(said) == 1 and "4096 bytes" in said[0] and "--keep-base-only" in said[0], said  # once an archive
    assert "lm_head.weight" in _loading_info(tmp_path / "merged")["missing_keys"]  # what the warning is about


def test_no_warning_when_nothing_is_dropped(tie_family, tmp_path, caplog):
    out = tmp_path / "n.tallpack"
    with caplog.at_level(logging.WARNING):
        tallpack.pack(str(tie_family / "t1"), _tasks(tie_family, ("t2",)), out)
        with tallpack.open(out) as fam:
            assert base_not_held(fam.manifest) == 0
            fam.merged()
    assert not [r for r in caplog.records if "not stored" in r.getMessage() or "no copy" in r.getMessage()]


@given(families(max_tasks=3, max_tensors=3), st.booleans())
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_merged_models_have_every_kept_base_only_tensor(tmp_path_factory, family, keep):
    """Any family with tensors only its base has: kept, they are in the merged model bit for bit
    and nothing is missing; dropped, the merged model lacks them and the archive says how much."""
    base, tasks = family
    extra = {"only.weight": torch.randn(5, 7), "only.index": torch.arange(20)}  # 140 and 160 bytes
    out = tmp_path_factory.mktemp("bo") / "f.tallpack"
    tallpack.pack(base | extra, tasks, out, keep_base_only=keep)
    with tallpack.open(out) as fam:
        sd = fam.merged("ta")
        for name, t in extra.items():
            assert (name in sd) == keep
            if keep:
                assert torch.equal(sd[name], t)
        not_held = base_not_held(fam.manifest)
        assert not_held == 0 if keep else 0 < not_held <= 300  # a task-only head counts as held


def _bare_base_family(root: Path, tie_family: Path) -> Path:
    """The base as a bare model.safetensors (no folder files beside it), the tasks folders."""
    bare = root / "bare"
    bare.mkdir()
    shutil.copy(tie_family / "t1" / "model.safetensors", bare / "model.safetensors")
    return bare / "model.safetensors"


def test_merge_of_a_bare_file_base_takes_the_files_every_task_has_alike(tie_family, tmp_path, caplog):
    """F2: a base packed from a bare .safetensors, tasks with one and the same config.json: the
    merged folder gets the tasks' files, so from_pretrained loads it; --task keeps the task's."""
    base = _bare_base_family(tmp_path, tie_family)
    out = tmp_path / "b.tallpack"
    tallpack.pack(str(base), _tasks(tie_family), out)
    with tallpack.open(out) as fam, caplog.at_level(logging.INFO, logger="tallpack.outputs"):
        assert fam.files() == {}
        tallpack.write_merged(fam, tmp_path / "merged")
        tallpack.write_merged(fam, tmp_path / "merged-t2", task="t2")
    names = sorted(p.name for p in (tmp_path / "merged").iterdir())
    assert names == sorted(["model.safetensors", *fam.files("t1")])
    assert (tmp_path / "merged" / "config.json").read_bytes() == (tie_family / "t1" / "config.json").read_bytes()
    said = [r for r in caplog.records if "every task has alike" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.INFO
    assert _loading_info(tmp_path / "merged") == {}
    assert sorted(p.name for p in (tmp_path / "merged-t2").iterdir()) == sorted(["model.safetensors",
                                                                               *fam.files("t2")])


def test_merge_of_a_bare_file_base_whose_tasks_differ_says_there_is_no_config(tie_family, tmp_path, caplog):
    """F2: the tasks' config.json differ: none is taken, and the warning says so and what to do."""
    base = _bare_base_family(tmp_path, tie_family)
    other = tmp_path / "t2"
    shutil.copytree(tie_family / "t2", other)
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps(cfg | {"max_position_embeddings": 32}))
    out = tmp_path / "b.tallpack"
    tallpack.pack(str(base), {"t1": str(tie_family / "t1"), "t2": str(other)}, out)
    with tallpack.open(out) as fam, caplog.at_level(logging.WARNING):
        tallpack.write_merged(fam, tmp_path / "merged")
    assert not (tmp_path / "merged" / "config.json").exists()
    said = [r.getMessage() for r in caplog.records if "no config.json" in r.getMessage()]
    assert len(said) == 1 and "the tasks' differ" in said[0] and "--task NAME" in said[0], said


def test_unpack_of_a_bare_file_task_says_the_base_files_are_not_taken(tie_family, tmp_path, caplog):
    """F2's last case: a task packed from a bare file, the base from a folder: the task comes back
    as it was packed (its config may not be the base's: here the base is untied, the task tied),
    with a warning naming the base's files in the archive."""
    task = tmp_path / "t1.safetensors"
    shutil.copy(tie_family / "t1" / "model.safetensors", task)
    out = tmp_path / "u.tallpack"
    tallpack.pack(str(tie_family / "base"), {"t1": str(task), "t2": str(tie_family / "t2")}, out)
    with tallpack.open(out) as fam, caplog.at_level(logging.WARNING, logger="tallpack.outputs"):
        tallpack.write_task(fam, "t1", tmp_path / "t1")
        tallpack.write_task(fam, "t2", tmp_path / "t2")
    assert [p.name for p in (tmp_path / "t1").iterdir()] == ["model.safetensors"]
    said = [r.getMessage() for r in caplog.records if r.name == "tallpack.outputs"]
    assert len(said) == 1 and "task 't1'" in said[0] and "config.json" in said[0], said


def _sharded(folder: Path, tensors: dict, total_parameters: int) -> None:
    from safetensors.torch import save_file

    folder.mkdir()
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for f, group in halves.items():
        save_file({n: tensors[n] for n in group}, folder / f, metadata={"format": "pt"})
    index = {"metadata": {"total_parameters": total_parameters, "total_size": 0},
             "weight_map": {n: f for f, group in halves.items() for n in group}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("left_out", [False, True])
def test_a_merged_models_index_claims_no_parameter_count_it_does_not_hold(tmp_path, left_out):
    """A merged model that leaves tensors out (a head of another shape in one task) copied the
    base index's total_parameters, which counted them; the count is dropped then (total_size is
    counted anew), and kept when every tensor is written."""
    g = torch.Generator().manual_seed(0)
    base = {f"layer.{i}.weight": torch.randn(16, 16, generator=g) for i in range(4)} | {"head.weight": torch.randn(3, 16)}
    total = sum(t.numel() for t in base.values())
    _sharded(tmp_path / "base", base, total)
    for i, t in enumerate(("a", "b")):
        sd = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        if left_out and t == "b":
            sd["head.weight"] = torch.randn(5, 16, generator=g)  # another shape: stored per task, left out
        _sharded(tmp_path / t, sd, total)
    tallpack.pack(tmp_path / "base", {t: tmp_path / t for t in ("a", "b")}, tmp_path / "f.tallpack")
    with tallpack.open(tmp_path / "f.tallpack") as fam:
        path, n = tallpack.write_merged(fam, tmp_path / "m", "ta", max_shard_size="2KB")
    index = json.loads(Path(path).read_text())
    assert n == len(base) - left_out and len(index["weight_map"]) == n
    assert ("total_parameters" in index["metadata"]) == (not left_out), index["metadata"]
    if not left_out:
        assert index["metadata"]["total_parameters"] == total


def test_a_merged_models_left_out_tensors_are_said_once_per_open_archive(tmp_path, caplog):
    """A server that builds merged models over and over (`fam.merged()` per request) logged the
    left-out warning at every call; it is said once per model of an open archive."""
    g = torch.Generator().manual_seed(1)
    base = {"w": torch.randn(16, 16, generator=g), "head.weight": torch.randn(3, 16, generator=g)}
    tasks = {t: {"w": base["w"] + 0.01 * torch.randn(16, 16, generator=g),
                 "head.weight": torch.randn(n, 16, generator=g)} for t, n in (("a", 3), ("b", 5))}
    tallpack.pack(base, tasks, tmp_path / "f.tallpack")

    def said() -> int:
        return sum("left out of the" in r.getMessage() for r in caplog.records)

    with caplog.at_level(logging.WARNING, logger="tallpack"):
        with tallpack.open(tmp_path / "f.tallpack") as fam:
            for _ in range(3):
                assert "head.weight" not in fam.merged()
            assert said() == 1
            fam.merged("ta")  # another model: said for it too
            assert said() == 2
        with tallpack.open(tmp_path / "f.tallpack") as fam:  # another open archive: said again
            fam.merged()
            assert said() == 3
