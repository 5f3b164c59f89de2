"""Families as people fine-tune them (r33): a tiny transformers Llama saved by ``save_pretrained``
in one dtype and fine-tuned in another (a bfloat16 base, float32 fine-tunes trained from it; a
float16 task beside them), a task with NaN in it, packed and read back as a user does."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import tallpack
from tallpack.elements import FLOAT_BITS, holds
from tallpack.report import render_tensors, tensor_rows

transformers = pytest.importorskip("transformers")


def _llama() -> "transformers.LlamaForCausalLM":
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                                   tie_word_embeddings=False)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def _fine_tune(model: "transformers.LlamaForCausalLM", seed: int, scale: float) -> None:
    """Changes of a fine-tune at a small learning rate: ``scale`` on a third of the weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            step = torch.randn(p.shape, generator=g) * scale * (torch.rand(p.shape, generator=g) < 0.3)
            p.add_(step.to(p.dtype))


def _load(folder: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> dict[str, Path]:
    """A bfloat16 base (``save_pretrained`` of the model in bfloat16) and fine-tunes of it: two
    trained in float32 (the base widened, then changed by about 2e-4: a small learning rate), one
    in bfloat16 and one in float16."""
    root = tmp_path_factory.mktemp("mixed")
    base = _llama().to(torch.bfloat16)
    base.save_pretrained(root / "base")
    out = {"base": root / "base"}
    for name, dtype, seed in (("a32", torch.float32, 1), ("b32", torch.float32, 2), ("c16", torch.bfloat16, 3),
                              ("d16", torch.float16, 4)):
        m = _llama().to(torch.bfloat16)
        m.load_state_dict(base.state_dict())
        m.to(dtype)
        _fine_tune(m, seed, 2e-4 if dtype == torch.float32 else 1e-2)
        m.save_pretrained(root / name)
        out[name] = root / name
    return out


def test_inspect_names_each_tasks_dtype_where_they_differ(mixed, tmp_path):
    # inspect --tensors gave one dtype per tensor, the first task's ('bfloat16'), for a tensor that
    # two tasks hold in float32 and one in float16: now "per task", as a shape that differs is,
    # and --json lists each task's dtype under "dtypes"
    arch = tmp_path / "mixed.tallpack"
    tallpack.pack(mixed["base"], {t: mixed[t] for t in ("c16", "a32", "d16")}, arch)
    with tallpack.open(arch) as fam:
        rows = {r["name"]: r for r in tensor_rows(fam.manifest, fam.read_array)}
        table = render_tensors(list(rows.values()), list(fam.tasks), width=None)
    row = rows["lm_head.weight"]
    assert row["dtypes"] == {"c16": "bfloat16", "a32": "float32", "d16": "float16"}
    line = next(x for x in table.splitlines() if x.startswith("lm_head.weight "))
    assert "per task" in line and "bfloat16" not in line
    # one dtype in every task: no "dtypes", the dtype itself in the table
    same = tmp_path / "same.tallpack"
    tallpack.pack(mixed["base"], {t: mixed[t] for t in ("a32", "b32")}, same)
    with tallpack.open(same) as fam:
        rows = {r["name"]: r for r in tensor_rows(fam.manifest)}
    assert "dtypes" not in rows["lm_head.weight"] and rows["lm_head.weight"]["dtype"] == "float32"


def test_float32_tasks_of_a_bfloat16_base_rebuild_as_the_paper_says(mixed, tmp_path):
    # what holds up (r33): tau_t = theta_t - f32(theta_0) exactly (a bfloat16 base widens without
    # rounding), masks and rebuilds the paper's, in each task's own dtype; --exact bit for bit
    arch = tmp_path / "x.tallpack"
    tasks = {t: mixed[t] for t in ("a32", "c16", "d16")}
    tallpack.pack(mixed["base"], tasks, arch, exact=True)
    base = _load(mixed["base"])
    orig = {t: _load(p) for t, p in tasks.items()}
    with tallpack.open(arch) as fam:
        for t in tasks:
            sd, ex = fam.state_dict(t), fam.state_dict(t, exact=True)
            for n, b in base.items():
                taus = {u: orig[u][n].float() - b.float() for u in tasks}
                mtl = sum(taus.values())
                mask = taus[t].abs() > 0.4 * (mtl - taus[t]).abs()
                assert sd[n].dtype == orig[t][n].dtype
                assert torch.equal(sd[n], (b.float() + mask * mtl).to(orig[t][n].dtype)), (t, n)
                assert torch.equal(ex[n].view(torch.uint8), orig[t][n].view(torch.uint8)), (t, n)


def test_merge_says_when_the_bases_dtype_rounds_the_tasks_changes(mixed, tmp_path, caplog):
    # float32 fine-tunes of a bfloat16 base: the merged model is built in float32 and cast to the
    # base's bfloat16 (spec §6.2), where changes of 2e-4 on weights of 0.02 mostly round away,
    # without a word. Now a warning names the two dtypes and what keeps the precision.
    arch = tmp_path / "f.tallpack"
    tallpack.pack(mixed["base"], {t: mixed[t] for t in ("a32", "b32")}, arch)
    caplog.clear()  # (pack's own warnings)
    with tallpack.open(arch) as fam, caplog.at_level(logging.WARNING, logger="tallpack"):
        m = fam.merged("ta", alpha=0.5)
        parts = fam.merge_parts("ta").parts
    b, d = parts["model.layers.0.mlp.up_proj.weight"]
    assert m["model.layers.0.mlp.up_proj.weight"].dtype == torch.bfloat16
    wanted = b.float() + 0.5 * d
    lost = (m["model.layers.0.mlp.up_proj.weight"].float() - wanted).norm() / (0.5 * d).norm()
    assert lost > 0.3  # the problem: a third or more of the merge's change is rounding error
    said = [r.getMessage() for r in caplog.records if "bfloat16" in r.getMessage() and "float32" in r.getMessage()]
    assert said and "precision" in said[0], [r.getMessage() for r in caplog.records]
    # a task in the base's own dtype beside them: the model rounds nothing that task holds, no word
    other = tmp_path / "g.tallpack"
    tallpack.pack(mixed["base"], {t: mixed[t] for t in ("a32", "c16")}, other)
    caplog.clear()
    with tallpack.open(other) as fam, caplog.at_level(logging.WARNING, logger="tallpack"):
        fam.merged("ta", alpha=0.5)
    assert not [r for r in caplog.records if "precision" in r.getMessage()]


def test_pack_does_not_call_an_exact_widening_a_rounding(mixed, tmp_path, caplog):
    # float32 tasks of a bfloat16 base: the base widens exactly, so the masks are those of a float32
    # copy of the base; the warning said "rounding to the task's dtype counts as fine-tuning
    # (denser masks, a larger archive)", true only of a narrowing (a float32 base, float16 tasks)
    with caplog.at_level(logging.WARNING, logger="tallpack"):
        tallpack.pack(mixed["base"], {t: mixed[t] for t in ("a32", "b32")}, tmp_path / "w.tallpack")
    said = [r.getMessage() for r in caplog.records if "differ in dtype" in r.getMessage()]
    assert said and not any("rounding" in s or "denser" in s for s in said), said
    assert any("bfloat16" in s and "merged model" in s for s in said), said


def test_nan_in_one_task_is_named_with_its_task(mixed, tmp_path, caplog):
    # one fine-tune diverged (NaN in one tensor): pack stores that tensor per task for every task and a
    # merged model leaves it out, but the warning named the tensor only, not the task that holds the NaN
    sd = _load(mixed["a32"])
    sd["model.layers.0.mlp.up_proj.weight"][3, 4] = float("nan")
    with caplog.at_level(logging.WARNING, logger="tallpack"):
        tallpack.pack(mixed["base"], {"ok": mixed["b32"], "diverged": sd}, tmp_path / "n.tallpack")
    said = [r.getMessage() for r in caplog.records if "model.layers.0.mlp.up_proj.weight" in r.getMessage()]
    assert said and "'diverged'" in said[0] and "'ok'" not in said[0], said


def test_holds_is_what_a_cast_keeps():
    # every value of each 8- and 16-bit floating type cast to another and back: exact where holds() says
    for narrow in FLOAT_BITS:
        bits = torch.finfo(getattr(torch, narrow)).bits
        if bits > 16:
            continue
        raw = torch.arange(1 << bits, dtype=torch.int32)
        x = (raw.to(torch.uint8) if bits == 8 else raw.to(torch.int16)).view(getattr(torch, narrow))
        for wide in FLOAT_BITS:
            back = x.to(getattr(torch, wide)).to(x.dtype).float()
            kept = bool(((back == x.float()) | (back.isnan() & x.float().isnan())).all())
            assert kept == holds(wide, narrow), (narrow, wide)


def test_inspect_says_what_a_rel_l2_above_1_means(mixed, tmp_path):
    # the same fine-tune packed twice under two names (and a third task): tau_MTL counts its task
    # vector twice, so each copy's TALL rebuild is off by about the whole of it (rel_l2 1.0-1.1) and
    # inspect showed the figure alone; now a note under the table says what it means and what to do
    from tallpack_cli.main import main

    arch = tmp_path / "dup.tallpack"
    tallpack.pack(mixed["base"], {"a": mixed["a32"], "again": mixed["a32"], "b": mixed["b32"]}, arch)
    with tallpack.open(arch) as fam:
        far = [t for t in fam.tasks if fam.task_info(t).fidelity["rel_l2"] > 1]
    assert far == ["a", "again"]
    import contextlib
    import io
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main(["inspect", str(arch)], standalone_mode=False)
    text = " ".join(out.getvalue().split())  # (the note is wrapped to the table's width)
    assert "rel_l2 above 1 (a, again): the TALL rebuild is farther" in text and "--fidelity" in text, text
    lines = out.getvalue().splitlines()
    at = next(i for i, x in enumerate(lines) if x.startswith("rel_l2 above 1"))
    assert max(map(len, lines[at:])) <= 120
    # a family whose rebuilds are nearer than the base: no note
    near = tmp_path / "near.tallpack"
    tallpack.pack(mixed["base"], {"a": mixed["a32"], "b": mixed["b32"]}, near)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main(["inspect", str(near)], standalone_mode=False)
    assert "rel_l2 above 1" not in out.getvalue()


def test_tasks_of_one_dtype_get_one_dtype_warning(mixed, tmp_path, caplog):
    # three float32 fine-tunes and a float16 one of a bfloat16 base: one line per dtype, not per task
    with caplog.at_level(logging.WARNING, logger="tallpack"):
        tallpack.pack(mixed["base"], {"a": mixed["a32"], "b": mixed["b32"], "c": mixed["a32"], "d": mixed["d16"]},
                      tmp_path / "one.tallpack")
    said = [r.getMessage() for r in caplog.records if "differ in dtype" in r.getMessage()]
    assert len(said) == 2, said
    assert said[0].startswith("task 'a' (and 2 more tasks in float32): ") and "widens exactly" in said[0]
    assert said[1].startswith("task 'd': ") and "float16" in said[1] and "rounding" in said[1]
