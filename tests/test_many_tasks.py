"""A family of many fine-tunes: tasks given by a shell glob, named after their folders, and the
command line's output kept short."""

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import tallpack
from tallpack.errors import InvalidArgumentError, TensorNotFoundError
from tallpack.progress import Labelled, LogLines, track
from tallpack.sources import stem
from tallpack_cli.main import main
from strategies import task_names


def run(*args, ok=True):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    if ok:
        assert result.exit_code == 0, result.output
    return result


def one_error_line(result) -> str:
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code != 0 and len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def _weights(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"body.w": torch.randn(32, 24, generator=g), "body.b": torch.randn(24, generator=g)}


@pytest.fixture
def folders(tmp_path) -> Path:
    """``fam/base`` and ``fam/t00`` .. ``fam/t05``, model folders as transformers writes them: single
    files, a sharded one (t02), a pickle (t03)."""
    fam = tmp_path / "fam"
    base = _weights(0)
    for i, name in enumerate(["base", *(f"t{i:02d}" for i in range(6))]):
        (fam / name).mkdir(parents=True)
        sd = base if name == "base" else {k: v + 0.05 * torch.randn(v.shape, generator=torch.Generator().manual_seed(i))
                                          for k, v in base.items()}
        if name == "t02":
            save_file({"body.w": sd["body.w"]}, fam / name / "model-00001-of-00002.safetensors")
            save_file({"body.b": sd["body.b"]}, fam / name / "model-00002-of-00002.safetensors")
            (fam / name / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {
                "body.w": "model-00001-of-00002.safetensors", "body.b": "model-00002-of-00002.safetensors"}}))
        elif name == "t03":
            torch.save(sd, fam / name / "pytorch_model.bin")
        else:
            save_file(sd, fam / name / "model.safetensors")
    return fam


def _names(archive: Path) -> list[str]:
    return [t["name"] for t in json.loads(run("inspect", archive, "--json").output)["tasks"]]


# -- F1: many tasks on the command line ------------------------------------------------------

def test_pack_takes_tasks_as_arguments_so_a_glob_gives_them(folders, tmp_path):
    tasks = sorted(folders.glob("t*"))  # what the shell makes of fam/t*
    run("pack", "--base", folders / "base", "-o", tmp_path / "g.tallpack", *tasks)
    assert _names(tmp_path / "g.tallpack") == [f"t{i:02d}" for i in range(6)]
    # --task fam/t*: the first is --task's, the others positional; NAME=PATH among them too
    run("pack", "--base", folders / "base", "-o", tmp_path / "h.tallpack", "--task", tasks[0],
        *tasks[1:4], f"six={tasks[4]}")
    assert _names(tmp_path / "h.tallpack") == ["t00", "t01", "t02", "t03", "six"]


def test_positional_tasks_follow_the_naming_and_duplicate_rules(folders, tmp_path):
    out = tmp_path / "g.tallpack"
    r = run("pack", "--base", folders / "base", "-o", out, "--task", folders / "t00", folders / "t00", ok=False)
    assert "task 't00' given twice (name tasks with NAME=PATH)" in one_error_line(r) and r.exit_code == 2
    r = run("pack", "--base", folders / "base", "-o", out, ok=False)
    assert "no task: give the fine-tuned members as TASK arguments" in one_error_line(r) and r.exit_code == 2
    assert not out.exists()


def test_a_weight_file_of_a_model_folder_is_named_after_the_folder(folders, tmp_path):
    paths = [folders / "t00" / "model.safetensors", folders / "t02" / "model.safetensors.index.json",
             folders / "t03" / "pytorch_model.bin", folders / "t04" / "model.safetensors"]
    run("pack", "--base", folders / "base", "-o", tmp_path / "g.tallpack", *paths)
    assert _names(tmp_path / "g.tallpack") == ["t00", "t02", "t03", "t04"]
    m = tallpack.pack(folders / "base", paths, tmp_path / "api.tallpack")  # the Python API names them alike
    assert [t.name for t in m.tasks] == ["t00", "t02", "t03", "t04"]
    save_file(_weights(9), folders / "chat.safetensors")  # a file of its own name keeps it
    run("pack", "--base", folders / "base", "-o", tmp_path / "c.tallpack", folders / "chat.safetensors")
    assert _names(tmp_path / "c.tallpack") == ["chat"]


def test_weight_file_urls_are_named_after_their_folders(folders, http_server, tmp_path):
    """The Python API's list of URLs: named as the same paths would be, not after their local copies."""
    import shutil

    shutil.copytree(folders, http_server.root / "fam")
    url = f"{http_server.url}/fam"
    m = tallpack.pack(f"{url}/base/model.safetensors", [f"{url}/t00/model.safetensors", f"{url}/t01/model.safetensors"],
                      tmp_path / "u.tallpack")
    assert [t.name for t in m.tasks] == ["t00", "t01"]


@settings(max_examples=60, deadline=None)
@given(name=task_names, file=st.sampled_from([
    "model.safetensors", "pytorch_model.bin", "diffusion_pytorch_model.safetensors", "model.fp16.safetensors",
    "model-00001-of-00002.safetensors", "model.safetensors.index.json", "pytorch_model.bin.index.json"]))
def test_stem_of_a_standard_weight_file_is_its_folder(name, file):
    assert stem(f"ft/{name}/{file}") == name
    assert stem(f"s3://bucket/ft/{name}/{file}") == name
    assert stem(f"https://huggingface.co/org/{name}/resolve/main/{file}") == name
    assert stem(f"ft/{name}/chat.safetensors") == "chat"  # a file of its own name keeps it


def test_a_folder_of_model_folders_as_one_task_says_what_to_type(folders, tmp_path):
    out = tmp_path / "g.tallpack"
    r = run("pack", "--base", folders / "base", "--task", folders, "-o", out, ok=False)
    line = one_error_line(r)
    assert r.exit_code == 2 and "holds no model but 7 model folders (base, t00, t01, ...)" in line
    assert f"tallpack pack --base {folders / 'base'} -o {out} {folders}/t0*" in line  # the base left out
    assert not out.exists()
    with pytest.raises(InvalidArgumentError, match="holds no model but 7 model folders .*give each as a task"):
        tallpack.pack(folders / "base", [folders], tmp_path / "api.tallpack")


# -- F3: a tied head ---------------------------------------------------------------------------

def test_a_tied_head_not_found_says_the_config_ties_it(hf_family, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "tied.tallpack"
    tallpack.pack(hf_family["base"], [hf_family["tasks"]["cars"]], out)
    with tallpack.open(out) as fam:
        with pytest.raises(TensorNotFoundError) as e:
            fam.get_tensor("cars", "lm_head.weight")
        message = str(e.value)
        assert "\n" not in message
        assert ("has no tensor 'lm_head.weight': its config ties it to the input embeddings "
                "'model.embed_tokens.weight' (tie_word_embeddings)") in message
        assert "model.load_state_dict(sd, strict=False), then model.tie_weights()" in message
        with pytest.raises(KeyError, match="ties it to the input embeddings"):
            fam.state_dict("cars", lazy=True)["lm_head.weight"]
        assert "lm_head.weight" not in fam.keys("cars")  # as the original file: not served
        model = AutoModelForCausalLM.from_pretrained(hf_family["base"])
        missing = model.load_state_dict(fam.state_dict("cars"), strict=False).missing_keys
        model.tie_weights()  # what the message says works
        assert missing == ["lm_head.weight"]
        assert torch.equal(model.lm_head.weight, fam.get_tensor("cars", "model.embed_tokens.weight"))


def test_an_untied_head_not_found_says_nothing_of_ties(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(tmp_path / "base")
    with torch.no_grad():
        model.model.norm.weight.add_(0.1)
    model.save_pretrained(tmp_path / "ft")
    tallpack.pack(tmp_path / "base", [tmp_path / "ft"], tmp_path / "u.tallpack")
    with tallpack.open(tmp_path / "u.tallpack") as fam:
        with pytest.raises(TensorNotFoundError) as e:
            fam.get_tensor("ft", "model.lm_head.weight")
        assert "ties" not in str(e.value) and "did you mean 'lm_head.weight', without 'model.'?" in str(e.value)


# -- F5: progress of a multi-task unpack -----------------------------------------------------

def test_unpack_all_writes_about_ten_progress_lines_for_the_whole_call(folders, tmp_path):
    archive = tmp_path / "g.tallpack"
    run("-q", "pack", "--base", folders / "base", "-o", archive, *(a for t in sorted(folders.glob("t*"))
                                                                   for a in ("--task", t)))
    r = run("unpack", archive, "--all", "-o", tmp_path / "out")  # CliRunner's stderr is no terminal
    progress = [line for line in r.stderr.splitlines() if "writing" in line]
    assert 1 <= len(progress) <= 11, r.stderr
    assert progress[-1] == "t05: writing: 2/2 (task 6 of 6)"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [f"t{i:02d}" for i in range(6)]
    r = run("unpack", archive, "--task", "t01", "--task", "t04", "-o", tmp_path / "two")
    assert [line for line in r.stderr.splitlines() if "writing" in line][-1] == "t04: writing: 2/2 (task 2 of 2)"


@settings(max_examples=80, deadline=None)
@given(totals=st.lists(st.integers(0, 60), min_size=2, max_size=30))
def test_log_lines_of_many_labelled_parts_are_about_ten(totals):
    lines: list[str] = []
    progress = LogLines(lines.append, parts=len(totals))
    for i, total in enumerate(totals):
        for _ in track(range(total), Labelled(progress, f"t{i}"), "writing", total):
            pass
    assert len(lines) <= 11
    if totals[-1]:
        assert lines[-1] == f"t{len(totals) - 1}: writing: {totals[-1]}/{totals[-1]} (task {len(totals)} of {len(totals)})"


def test_a_glob_that_matches_the_base_leaves_the_base_out(folders, tmp_path, caplog):
    """``pack --base fam/base -o f.tallpack fam/*``: the glob's match of the base is no task (it
    would count in 1/T and in the ratio), said in a warning; ``--task NAME=PATH`` still packs it."""
    everything = sorted(folders.iterdir())  # what the shell makes of fam/*: base among them
    assert folders / "base" in everything
    with caplog.at_level("WARNING"):
        run("pack", "--base", folders / "base", "-o", tmp_path / "g.tallpack", *everything)
    assert "base" not in _names(tmp_path / "g.tallpack")
    assert "is the base (--base), left out of the tasks" in caplog.text
    run("pack", "--base", folders / "base", "-o", tmp_path / "h.tallpack", f"same={folders / 'base'}", folders / "t00")
    assert _names(tmp_path / "h.tallpack") == ["same", "t00"]


def test_a_weight_file_of_a_model_folder_warns_that_the_folder_s_files_stay(folders, tmp_path, caplog):
    """``--task ft/cars/model.safetensors`` packs that file alone: its folder's config.json and
    tokenizer are not kept, which is said (the folder, given instead, keeps them); a weights file
    with no model folder around it is packed without a word."""
    (folders / "t01" / "config.json").write_text('{"model_type": "bert"}')
    with caplog.at_level("WARNING"):
        run("pack", "--base", folders / "base", "-o", tmp_path / "g.tallpack", folders / "t01" / "model.safetensors")
    assert "model.safetensors is packed as a file alone: its folder's config.json" in caplog.text
    assert f"give the folder, {folders / 't01'}, to keep them" in caplog.text
    caplog.clear()
    lone = tmp_path / "lone"
    lone.mkdir()
    save_file(_weights(9), lone / "chat.safetensors")
    with caplog.at_level("WARNING"):
        run("pack", "--base", folders / "base", "-o", tmp_path / "h.tallpack", lone / "chat.safetensors")
    assert "packed as a file alone" not in caplog.text
