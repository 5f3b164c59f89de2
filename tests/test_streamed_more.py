"""Tensors read a block at a time (``inputs.HOLD_BYTES``), tried as users meet them: files written by
safetensors, torch.save, transformers' save_pretrained (sharded) and diffusers; every pack compared
byte for byte with the same pack reading each tensor whole, and read back."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import tallpack
from tallpack import inputs
from tallpack.errors import CheckpointError

from conftest import pack_both_ways

CHUNK = 1 << 16  # with 4 blocks or more, tensors are past groups.SMALL_ELEMENTS: written alone, streamed


def _both(tmp: Path, monkeypatch, base, tasks, *, chunk: int = CHUNK, **kw) -> tuple[Path, int]:
    """Pack whole and streamed; assert the same bytes; the streamed archive and its block count."""
    whole, streamed, blocks, _ = pack_both_ways(tmp, monkeypatch, base, tasks, chunk=chunk, **kw)
    assert whole == streamed
    return tmp / "a0.tallpack", blocks


def _same(a: dict[str, torch.Tensor], b) -> None:
    assert set(a) == set(b.keys())
    for k, v in a.items():
        w = b[k]
        assert v.dtype == w.dtype and v.shape == w.shape, k
        assert torch.equal(v.contiguous().reshape(-1).view(torch.uint8), w.contiguous().reshape(-1).view(torch.uint8)), k


def _family(d: Path, n: int, *, dtype=torch.float32, tasks: int = 2, extra=None, save=save_file, ext="safetensors"):
    g = torch.Generator().manual_seed(n)
    base = {"big.weight": (torch.randn(n, generator=g) * 0.02).to(dtype), "small": torch.randn(8, generator=g)}
    if extra:
        base.update(extra)
    save(base, d / f"base.{ext}")
    paths = {}
    for i in range(tasks):
        sd = {k: (v.float() + 1e-3 * torch.randn(v.shape, generator=g)).to(v.dtype) if v.is_floating_point() and v.numel()
              else v.clone() for k, v in base.items()}
        save(sd, d / f"t{i}.{ext}")
        paths[f"t{i}"] = d / f"t{i}.{ext}"
    return d / f"base.{ext}", paths


@pytest.mark.parametrize("n,chunk", [(4 * CHUNK, CHUNK), (4 * CHUNK + 1, CHUNK), (5 * CHUNK - 1, CHUNK),
                                     (3 * 1024, 1024), (3 * 1024 + 1, 1024)])
def test_numel_on_and_off_a_block_edge(tmp_path, monkeypatch, n, chunk):
    """Beside a 0-d and an empty tensor; a tensor under SMALL_ELEMENTS is grouped (then read whole
    for writing, after its kind was settled a block at a time)."""
    base, tasks = _family(tmp_path, n, extra={"scalar": torch.tensor(1.5), "empty": torch.zeros(0, 4)})
    out, blocks = _both(tmp_path, monkeypatch, base, tasks, chunk=chunk)
    assert blocks >= (2 if chunk == CHUNK else 1) * -(-n // chunk)
    fam = tallpack.open(out)
    want = tallpack.open(tmp_path / f"a{1 << 60}.tallpack")
    for t in tasks:
        _same(dict(want.state_dict(t)), fam.state_dict(t))


N = 4 * CHUNK + 77  # five blocks, the last short


def _readback(out: Path, want: dict[str, dict[str, torch.Tensor]]) -> None:
    fam = tallpack.open(out)
    for t, sd in want.items():
        got = fam.state_dict(t)
        assert set(got.keys()) == set(sd)
        for k, v in sd.items():
            assert got[k].shape == v.shape and got[k].dtype == v.dtype, k


@pytest.mark.parametrize("opts", [{"merge": "ties"}, {"fidelity": 0.99}, {"budget": 1.5}, {"exact": True},
                                  {"keep_base_only": True}, {"threads": 1}, {"threads": 2},
                                  {"progress": True}, {"allow_mismatch": True}, {"lambdas": {"t0": 0.3, "t1": 0.7, "t2": 1.0}},
                                  {"group": False}])
def test_options(tmp_path, monkeypatch, opts):
    extra = {"only.base": torch.randn(N)}
    base, tasks = _family(tmp_path, N, tasks=3, extra=extra)
    if "keep_base_only" in opts or "allow_mismatch" in opts:  # a tensor no task has, one whose shape differs
        from safetensors.torch import load_file
        for i, p in enumerate(tasks.values()):
            sd = load_file(p)
            del sd["only.base"]
            if i == 1:
                sd["small"] = torch.randn(9)
            save_file(sd, p)
    calls = []
    if opts.get("progress"):
        opts = {"progress": lambda desc, done, total: calls.append((desc, done, total))}
    out, blocks = _both(tmp_path, monkeypatch, base, tasks, **opts)
    assert blocks >= 5
    fam = tallpack.open(out)
    for t in tasks:
        fam.state_dict(t)["big.weight"]
    if calls:
        assert calls[-1][1] == calls[-1][2], calls[-3:]


def _pt_family(d: Path, sds: list[dict[str, torch.Tensor]]) -> tuple[Path, dict[str, Path]]:
    paths = []
    for i, sd in enumerate(sds):
        torch.save(sd, d / f"m{i}.pt")
        paths.append(d / f"m{i}.pt")
    return paths[0], {f"t{i}": p for i, p in enumerate(paths[1:])}


def _noisy(sd: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: v + 1e-3 * torch.randn(v.shape, generator=g).to(v.dtype) for k, v in sd.items()}


@pytest.mark.parametrize("layout", ["offset", "strided", "tied", "tied-offset"])
def test_torch_files_of_views(tmp_path, monkeypatch, layout):
    """torch.save of a tensor that is part of a larger storage (at an offset, contiguous), of a
    strided one (read whole), and of a tied weight (one storage, two names)."""
    sds = []
    g = torch.Generator().manual_seed(0)
    first = torch.randn(N + 3000, generator=g) * 0.02
    for i in range(3):
        store = first + i * 1e-3 * torch.randn(N + 3000, generator=g)
        if layout == "offset":
            sd = {"big.weight": store[1000 : 1000 + N], "head": store[:1000]}
        elif layout == "strided":
            sd = {"big.weight": store[: 2 * (N // 2)][::2], "head": store[-10:]}
        elif layout == "tied":
            w = store[:N].reshape(-1, 1)
            sd = {"emb.weight": w, "lm_head.weight": w, "head": store[-10:].clone()}
        else:
            w = store[7 : 7 + N]
            sd = {"emb.weight": w, "lm_head.weight": w, "head": store[:7]}
        sds.append(sd)
    base, tasks = _pt_family(tmp_path, sds)
    out, blocks = _both(tmp_path, monkeypatch, base, tasks)
    assert blocks == 0 if layout == "strided" else blocks >= 10
    fam = tallpack.open(out)
    for t, sd in zip(tasks, sds[1:]):
        got = fam.state_dict(t)
        assert set(got.keys()) == set(sd)
        for k, v in sd.items():
            assert got[k].shape == v.shape
            assert (got[k].float() - v.float()).abs().max() < 0.1, k


def test_a_big_endian_torch_file(tmp_path, monkeypatch):
    from test_review2_r27 import _big_endian
    g = torch.Generator().manual_seed(0)
    first = torch.randn(N, generator=g) * 0.02
    sds = [{"big.weight": first + i * 1e-3 * torch.randn(N, generator=g),
            "b16": (first + i * 1e-3 * torch.randn(N, generator=g)).to(torch.bfloat16)} for i in range(3)]
    base, tasks = _pt_family(tmp_path, sds)
    for p in [base, *tasks.values()]:
        _big_endian(p, p.with_suffix(".be.pt"), {"0": 4, "1": 2})
    be = {k: p.with_suffix(".be.pt") for k, p in tasks.items()}
    out, blocks = _both(tmp_path, monkeypatch, base.with_suffix(".be.pt"), be)
    assert blocks >= 20
    fam = tallpack.open(out)
    for t, sd in zip(be, sds[1:]):
        got = fam.state_dict(t)
        for k, v in sd.items():
            assert (got[k].float() - v.float()).abs().max() < 0.05, k


def test_tasks_of_mixed_dtypes(tmp_path, monkeypatch):
    """Base bfloat16; one task float32, one bfloat16, one float16."""
    g = torch.Generator().manual_seed(0)
    b = torch.randn(N, generator=g) * 0.02
    save_file({"big.weight": b.to(torch.bfloat16)}, tmp_path / "base.safetensors")
    tasks = {}
    for i, dt in enumerate([torch.float32, torch.bfloat16, torch.float16]):
        save_file({"big.weight": (b + 1e-3 * torch.randn(N, generator=g)).to(dt)}, tmp_path / f"t{i}.safetensors")
        tasks[f"t{i}"] = tmp_path / f"t{i}.safetensors"
    out, blocks = _both(tmp_path, monkeypatch, tmp_path / "base.safetensors", tasks)
    assert blocks >= 10
    fam = tallpack.open(out)
    assert [fam.get_tensor(t, "big.weight").dtype for t in tasks] == [torch.float32, torch.bfloat16, torch.float16]


def test_float16_rebuilds_that_overflow_in_a_late_block(tmp_path, monkeypatch, caplog):
    """check_overflow runs per block: the positions are the tensor's, whichever way it is read."""
    g = torch.Generator().manual_seed(0)
    b = (torch.randn(N, generator=g) * 0.02).to(torch.float16)
    b[N - 5 : N - 2] = 60000
    save_file({"big.weight": b}, tmp_path / "base.safetensors")
    tasks = {}
    for i in range(3):
        x = b.float() + 1e-3 * torch.randn(N, generator=g)
        x[N - 5 : N - 2] = 65000
        save_file({"big.weight": x.to(torch.float16)}, tmp_path / f"t{i}.safetensors")
        tasks[f"t{i}"] = tmp_path / f"t{i}.safetensors"
    out, blocks = _both(tmp_path, monkeypatch, tmp_path / "base.safetensors", tasks)
    assert blocks >= 10
    warned = [r.getMessage() for r in caplog.records if "overflows" in r.getMessage()]
    assert len(warned) == 2 and warned[0] == warned[1] and "'big.weight' (3 elements)" in warned[0], warned


def _perturb(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1e-3 * torch.randn(p.shape, generator=g))


def _hf_ours(fam, task: str, model) -> None:
    """The archive's task against the model saved (shapes, dtypes, and values near)."""
    got = fam.state_dict(task)
    sd = model.state_dict()
    for k in got.keys():
        assert k in sd, k
        assert got[k].shape == sd[k].shape, k
        assert (got[k].float() - sd[k].float()).abs().max() < 0.02, k


def test_sharded_llama_folders_large_tensors_in_the_first_and_last_shards(tmp_path, monkeypatch):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=8200, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(tmp_path / "base", max_shard_size="300KB")
    shards = sorted(p.name for p in (tmp_path / "base").glob("*.safetensors"))
    assert len(shards) >= 3, shards
    models = {}
    for i in range(2):
        _perturb(model, i + 1)
        model.save_pretrained(tmp_path / f"t{i}", max_shard_size="300KB")
        models[f"t{i}"] = LlamaForCausalLM.from_pretrained(tmp_path / f"t{i}")
    import json
    where = json.loads((tmp_path / "base" / "model.safetensors.index.json").read_text())["weight_map"]
    assert where["lm_head.weight"] != shards[0] and where["model.embed_tokens.weight"] == shards[0], where
    out, blocks = _both(tmp_path, monkeypatch, tmp_path / "base", {t: tmp_path / t for t in models})
    assert blocks >= 2 * 2 * 5  # embed_tokens and lm_head, five blocks each, twice
    fam = tallpack.open(out)
    for t, m in models.items():
        _hf_ours(fam, t, m)


def test_a_bare_base_and_sequence_classification_tasks(tmp_path, monkeypatch):
    """BertModel as the base, BertForSequenceClassification fine-tunes (``bert.`` prefix), sharded."""
    from transformers import BertConfig, BertForSequenceClassification, BertModel
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=8200, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                     num_attention_heads=2, max_position_embeddings=64)
    bare = BertModel(cfg, add_pooling_layer=True)
    bare.save_pretrained(tmp_path / "base", max_shard_size="500KB")
    models = {}
    for i in range(2):
        m = BertForSequenceClassification(cfg)
        m.bert.load_state_dict(bare.state_dict())
        _perturb(m, i + 1)
        m.save_pretrained(tmp_path / f"t{i}", max_shard_size="500KB")
        models[f"t{i}"] = m
    out, blocks = _both(tmp_path, monkeypatch, tmp_path / "base", {t: tmp_path / t for t in models})
    assert blocks >= 10
    fam = tallpack.open(out)
    kinds = {e.name: e.kind for e in fam.manifest.tensors}
    assert kinds["bert.embeddings.word_embeddings.weight"] == "merged"
    for t, m in models.items():
        _hf_ours(fam, t, m)


@pytest.mark.parametrize("opts", [{}, {"group": False}, {"group": False, "exact": True}])
def test_a_diffusers_pipeline(tmp_path, monkeypatch, opts):
    """Components' tensors read a block at a time (``--no-group``: also for writing)."""
    from test_components import _family as _ldm
    roots = _ldm(tmp_path)
    out, blocks = _both(tmp_path, monkeypatch, roots["base"], {"a": roots["a"], "b": roots["b"]}, chunk=1024, **opts)
    assert blocks > 0
    fam = tallpack.open(out)
    assert any(k.startswith("unet/") for k in fam.state_dict("a").keys())


@pytest.mark.parametrize("how", ["cut", "removed", "rewritten"])
@pytest.mark.parametrize("when", [2, 9])  # while its kind is settled, while it is written
def test_an_input_changed_between_blocks(tmp_path, monkeypatch, how, when):
    """One CheckpointError line naming the file, and the task (and the tensor, when a read fails)."""
    base, tasks = _family(tmp_path, N, tasks=3)
    victim = tasks["t1"]
    count = [0]
    block = inputs.Streamed.block

    def change(self, start, stop):
        count[0] += 1
        if count[0] == when + 1:
            if how == "cut":
                os.truncate(victim, victim.stat().st_size // 2)
            elif how == "removed":
                victim.unlink()
            else:
                data = victim.read_bytes()
                victim.write_bytes(data[:-8] + b"\0" * 8)
        return block(self, start, stop)

    monkeypatch.setattr(inputs.Streamed, "block", change)
    monkeypatch.setattr(inputs, "HOLD_BYTES", 0)
    with pytest.raises(CheckpointError) as e:
        tallpack.pack(base, tasks, tmp_path / "a.tallpack", chunk_elements=CHUNK)
    msg = str(e.value)
    assert "\n" not in msg and str(victim) in msg and "'t1'" in msg, msg
    if how == "cut":
        assert "big.weight" in msg and "shrank" in msg
    assert not (tmp_path / "a.tallpack").exists()


CLI = r"""
import sys
import tallpack.inputs as I
I.HOLD_BYTES = int(sys.argv[1])
sys.argv = ["tallpack", *sys.argv[2:]]
from tallpack_cli import run
run()
"""


@pytest.mark.parametrize("extra", [[], ["--merge", "ties", "-j", "1"], ["--exact"], ["--fidelity", "0.99"], ["--progress"]])
def test_the_command_line(tmp_path, extra):
    """``tallpack pack --chunk-elements N`` in a process of its own, HOLD_BYTES 0 and past every tensor."""
    import subprocess
    import sys
    base, tasks = _family(tmp_path, N, tasks=2, dtype=torch.bfloat16)
    outs = []
    for hold in (1 << 60, 0):
        out = tmp_path / f"c{hold}.tallpack"
        args = ["pack", "--base", str(base), "-o", str(out), "--chunk-elements", str(CHUNK), *extra,
                *(f"{t}={p}" for t, p in tasks.items())]
        r = subprocess.run([sys.executable, "-c", CLI, str(hold), *args], capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]
    fam = tallpack.open(tmp_path / "c0.tallpack")
    assert fam.state_dict("t1")["big.weight"].dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.float64, torch.float8_e4m3fn])
def test_other_float_dtypes(tmp_path, monkeypatch, dtype):
    base, tasks = _family(tmp_path, N, tasks=3, dtype=dtype)
    out, blocks = _both(tmp_path, monkeypatch, base, tasks)
    assert blocks >= 10
    assert tallpack.open(out).get_tensor("t0", "big.weight").dtype == dtype


def test_a_large_shared_tensor_is_read_once_not_once_per_task(tmp_path):
    """A frozen embedding (every task's copy the same, found so a block at a time) is stored once:
    its base and one task's copy are read, not T + 1 copies (three tasks of 32 MB: two copies less)."""
    import json
    from conftest import anon_growth
    g = torch.Generator().manual_seed(0)
    big = torch.randn(8 << 20, generator=g) * 0.02
    save_file({"big.weight": big}, tmp_path / "base.safetensors")
    save_file({"big.weight": big + 1e-3}, tmp_path / "t0.safetensors")
    tasks = {f"t{i}": str(tmp_path / f"t{i}.safetensors") for i in range(3)}
    for t in ("t1", "t2"):
        (tmp_path / f"{t}.safetensors").write_bytes((tmp_path / "t0.safetensors").read_bytes())
    del big
    grown = {}
    for hold in (1 << 60, 1 << 20):
        setup = f"import tallpack.inputs as I; I.HOLD_BYTES = {hold}"
        work = (f"tallpack.pack({str(tmp_path / 'base.safetensors')!r}, {json.dumps(tasks)}, "
                f"{str(tmp_path / f'a{hold}.tallpack')!r}, chunk_elements={1 << 18}, threads=2)")
        grown[hold] = anon_growth(setup, work)
    assert (tmp_path / f"a{1 << 60}.tallpack").read_bytes() == (tmp_path / f"a{1 << 20}.tallpack").read_bytes()
    assert tallpack.open(tmp_path / f"a{1 << 20}.tallpack").manifest.tensors[0].kind == "shared"
    mb = 1 << 20
    assert grown[1 << 60] > 128 * mb, grown  # (the four copies held whole: the measure sees them)
    assert grown[1 << 20] < grown[1 << 60] - 40 * mb, {k: v / mb for k, v in grown.items()}


@pytest.mark.parametrize("opts", [{}, {"exact": True}, {"merge": "ties"}, {"fidelity": 0.99}])
def test_a_shared_tensor_read_once_packs_the_same_bytes(tmp_path, monkeypatch, opts):
    def frozen(d: Path):
        from safetensors.torch import load_file
        first = load_file(d / "t0.safetensors")["big.weight"]
        for i in (1, 2):
            sd = load_file(d / f"t{i}.safetensors")
            sd["big.weight"] = first
            save_file(sd, d / f"t{i}.safetensors")
    base, tasks = _family(tmp_path, N, tasks=3, extra={"mid.weight": torch.randn(N)})
    frozen(tmp_path)
    out, blocks = _both(tmp_path, monkeypatch, base, tasks, **opts)
    fam = tallpack.open(out)
    assert {e.name: e.kind for e in fam.manifest.tensors}["big.weight"] == "shared"
    assert torch.equal(fam.get_tensor("t2", "big.weight"), fam.get_tensor("t0", "big.weight"))


def _bin_shards(sd: dict[str, torch.Tensor], folder: Path) -> None:
    """``sd`` as transformers 4 saved it with safe_serialization=False: two .bin shards and their
    index, the last tensor (lm_head) in the second."""
    import json
    folder.mkdir()
    names = list(sd)
    parts = {"pytorch_model-00001-of-00002.bin": names[:-1], "pytorch_model-00002-of-00002.bin": names[-1:]}
    for f, keys in parts.items():
        torch.save({k: sd[k] for k in keys}, folder / f)
    index = {"metadata": {"total_size": 0}, "weight_map": {k: f for f, keys in parts.items() for k in keys}}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("case", ["subset", "dict-task", "legacy-pt", "bin-shards"])
def test_other_inputs(tmp_path, monkeypatch, case):
    """A tensor only some tasks have; a task given as a dict of tensors (read whole) beside files;
    a legacy (not zip) torch.save; transformers' .bin shards (a large tensor in a later shard)."""
    if case == "bin-shards":
        from transformers import LlamaConfig, LlamaForCausalLM
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=8200, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False)
        model = LlamaForCausalLM(cfg)
        for i, name in enumerate(["base", "t0", "t1"]):
            if i:
                _perturb(model, i)
            _bin_shards(model.state_dict(), tmp_path / name)
        base, tasks = tmp_path / "base", {"t0": tmp_path / "t0", "t1": tmp_path / "t1"}
        want = 2 * 2 * 5
    elif case == "legacy-pt":
        def legacy(sd, p):
            torch.save(sd, p, _use_new_zipfile_serialization=False)
        base, tasks = _family(tmp_path, N, tasks=2, save=legacy, ext="pt")
        want = 0
    else:
        base, tasks = _family(tmp_path, N, tasks=3)
        from safetensors.torch import load_file
        if case == "subset":
            sd = load_file(tasks["t1"])
            del sd["big.weight"]
            save_file(sd, tasks["t1"])
            want = 0  # (task-own: read whole)
        else:
            tasks = {**tasks, "t1": load_file(tasks["t1"])}
            want = 0
    out, blocks = _both(tmp_path, monkeypatch, base, tasks)
    assert (blocks >= want) if want else (blocks == 0), blocks
    fam = tallpack.open(out)
    for t in tasks:
        fam.state_dict(t)


def test_the_loader_reads_the_next_tensor_while_this_one_is_written(tmp_path, monkeypatch):
    """Two large tensors in a row: the second's kind is settled, a block at a time, on the loader
    thread while the first is written, a block at a time, on the caller's."""
    import threading
    base, tasks = _family(tmp_path, N, tasks=2, extra={"next.weight": torch.randn(N + 5) * 0.02})
    seen: list[tuple[str, str]] = []
    block = inputs.Streamed.block

    def noted(self, start, stop):
        seen.append((self.name, threading.current_thread().name))
        return block(self, start, stop)

    monkeypatch.setattr(inputs.Streamed, "block", noted)
    out, _ = _both(tmp_path, monkeypatch, base, tasks, threads=2)
    loader = {n for n, th in seen if th.startswith("tallpack-load")}
    writer = {n for n, th in seen if th == threading.main_thread().name}
    assert loader == writer == {"big.weight", "next.weight"}, seen


@pytest.mark.parametrize("merge", ["ta", "ties"])
def test_streamed_with_one_thread_or_three(tmp_path, monkeypatch, merge):
    base, tasks = _family(tmp_path, N, tasks=3, dtype=torch.bfloat16)
    monkeypatch.setattr(inputs, "HOLD_BYTES", 0)
    got = []
    for threads in (1, 3):
        tallpack.pack(base, tasks, tmp_path / f"j{threads}.tallpack", chunk_elements=CHUNK, threads=threads, merge=merge)
        got.append((tmp_path / f"j{threads}.tallpack").read_bytes())
    assert got[0] == got[1]
