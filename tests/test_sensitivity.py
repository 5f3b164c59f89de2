"""The fidelity dial with a sensitivity: each element's squared error weighed (beyond the paper),
and the layer-input moments that make a linear layer's weighted error its output error."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from click.testing import CliRunner

import tallpack
from tallpack.errors import InvalidArgumentError
from tallpack_cli.main import main
from tallpack.sensitivity import input_moments
from test_fidelity import checkpoint_bytes, family

MERGED = ("a.weight", "a.bias", "b.weight", "b.bias")


def test_input_moments_are_each_linear_layers_input_mean_squares():
    g = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3))
    batches = [torch.randn(7, 5, generator=g), torch.randn(2, 3, 5, generator=g)]
    got = input_moments(model, batches)
    x = torch.cat([b.reshape(-1, 5) for b in batches]).double()
    h = torch.relu(model[0](x.float())).double()
    assert set(got) == {"0.weight", "2.weight"}
    assert got["0.weight"].shape == (1, 5) and got["2.weight"].shape == (1, 4)
    assert torch.allclose(got["0.weight"][0], (x * x).mean(0))
    assert torch.allclose(got["2.weight"][0], (h * h).mean(0))
    assert not model[0]._forward_pre_hooks  # the hooks are gone
    with pytest.raises(InvalidArgumentError, match="no nn.Linear"):
        input_moments(torch.nn.ReLU(), batches)
    tied = torch.nn.Sequential(torch.nn.Linear(5, 5), torch.nn.Linear(5, 5), torch.nn.Linear(5, 3))
    tied[1].weight = tied[0].weight  # one tensor, two names: a checkpoint keeps one, the error has two ways out
    assert set(input_moments(tied, batches)) == {"2.weight"}



def gpt2_config():
    from transformers import GPT2Config

    return GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=32)


def test_conv1d_moments_lie_along_the_weights_input_axis():
    """GPT-2's Conv1D weights are (in, out): its moments are (in, 1), so a weight's weighted error
    is the output error it makes. One element moved at a time, on a square layer (where the wrong
    axis would still broadcast) and a wide one (where it would not)."""
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(gpt2_config()).eval()
    batches = [torch.randint(0, 100, (2, 16)), torch.randint(0, 100, (3, 8))]
    got = input_moments(model, batches)
    for name in ("transformer.h.0.attn.c_proj", "transformer.h.1.mlp.c_fc"):
        layer = model.get_submodule(name)
        w = got[f"{name}.weight"]
        assert w.shape == (layer.weight.shape[0], 1)
        seen = []
        handle = layer.register_forward_pre_hook(lambda _m, args: seen.append(args[0].reshape(-1, args[0].shape[-1])))
        with torch.no_grad():
            for b in batches:
                model(b)
        handle.remove()
        x = torch.cat(seen).double()
        for i, j in ((0, 1), (5, 0), (31, 7)):
            dw = torch.zeros(layer.weight.shape, dtype=torch.float64)
            dw[i, j] = 0.3
            output_error = float(((x @ dw) ** 2).sum(1).mean())  # y = x @ W + b
            weighted = float((torch.broadcast_to(w, dw.shape) * dw * dw).sum())
            assert weighted == pytest.approx(output_error, rel=1e-9)


def test_the_readme_recipe_on_a_gpt2_family(tmp_path, caplog):
    """input_moments on real GPT-2 models (Conv1D blocks, lm_head tied to the token embeddings,
    which the checkpoint stores once), then pack and save as the README says. A model whose names
    are not the checkpoint's (the bare transformer, without its ``transformer.`` prefix) is still
    refused by name."""
    from transformers import AutoModelForCausalLM, GPT2LMHeadModel
    from safetensors import safe_open

    torch.manual_seed(0)
    model = GPT2LMHeadModel(gpt2_config())
    model.save_pretrained(tmp_path / "base")
    g = torch.Generator().manual_seed(1)
    tasks = {}
    for t in ("a", "b"):
        with torch.no_grad():
            for p in model.parameters():
                p.add_((torch.rand(p.shape, generator=g) < 0.3) * 0.02 * torch.randn(p.shape, generator=g))
        model.save_pretrained(tmp_path / t)
        tasks[t] = str(tmp_path / t)
    with safe_open(tmp_path / "a" / "model.safetensors", "pt") as f:
        stored = set(f.keys())
    assert "lm_head.weight" not in stored  # tied: transformers saves it once, as the embeddings

    models = {t: AutoModelForCausalLM.from_pretrained(p) for t, p in tasks.items()}
    val_batches = {t: [torch.randint(0, 100, (2, 16)) for _ in range(2)] for t in tasks}
    with caplog.at_level(logging.WARNING, logger="tallpack.sensitivity"):
        weights = {t: input_moments(models[t], val_batches[t]) for t in tasks}
    assert "tied weights left out (they weigh 1): lm_head.weight" in caplog.text
    assert set(weights["a"]) == {f"transformer.h.{i}.{m}.weight" for i in range(2)
                                 for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    assert set(weights["a"]) <= stored
    m = tallpack.pack(str(tmp_path / "base"), tasks, tmp_path / "fam.tallpack", fidelity=0.999, sensitivity=weights)
    assert m.stats["dial"]["measure"] == "weighted"
    assert all(info.fidelity["weighted"] >= 0.999 - 1e-9 for info in m.tasks)
    tallpack.sensitivity.save(weights, tmp_path / "weights.safetensors")
    again = tallpack.sensitivity.load(tmp_path / "weights.safetensors")
    assert {t: set(w) for t, w in again.items()} == {t: set(w) for t, w in weights.items()}
    with tallpack.open(tmp_path / "fam.tallpack") as fam:
        rebuilt = fam.state_dict("a")
        assert set(rebuilt) == stored

    bare = {t: input_moments(models[t].transformer, val_batches[t]) for t in tasks}
    with pytest.raises(InvalidArgumentError, match="names tensors it does not have: 'h.0.attn.c_attn.weight'"):
        tallpack.pack(str(tmp_path / "base"), tasks, tmp_path / "x.tallpack", fidelity=0.999, sensitivity=bare)

def sensitivity(fts) -> dict[str, dict[str, torch.Tensor]]:
    """Layer a's inputs: 6 of its 48 features carry signal, the rest are nearly always zero."""
    w = torch.full((1, 48), 1e-4)
    w[0, :6] = 1.0
    return {t: {"a.weight": w * (1 + i)} for i, t in enumerate(fts)}


def noisy_family():
    """The dense family, with large task updates on layer a's dead inputs: errors there are
    what the weights call harmless, so the two measures differ."""
    base, fts = family("dense")
    g = torch.Generator().manual_seed(7)
    for ft in fts.values():
        noise = torch.randn(64, 48, generator=g) * 0.3
        noise[:, :6] = 0
        ft["a.weight"] = ft["a.weight"] + noise
    return base, fts


def fidelities(path, fts, sens) -> dict[str, tuple[float, float]]:
    """Per task, recomputed from what the archive returns: (weight fidelity, weighted fidelity)."""
    out = {}
    with tallpack.open(path) as fam:
        for t, ft in fts.items():
            err = sq = werr = wsq = 0.0
            for k in MERGED:
                x = ft[k].double()
                d2 = (fam.get_tensor(t, k).double() - x) ** 2
                w = torch.broadcast_to(sens.get(t, {}).get(k, torch.ones(())).double(), x.shape)
                err, sq = err + float(d2.sum()), sq + float((x * x).sum())
                werr, wsq = werr + float((w * d2).sum()), wsq + float((w * x * x).sum())
            out[t] = (1 - math.sqrt(err / sq), 1 - math.sqrt(werr / wsq))
    return out


@pytest.mark.parametrize("target", [0.95, 0.99])
def test_a_target_is_met_in_the_weighted_fidelity_and_both_are_recorded(tmp_path, target):
    base, fts = noisy_family()
    sens = sensitivity(fts)
    m = tallpack.pack(base, fts, tmp_path / "w.tallpack", fidelity=target, sensitivity=sens)
    got = fidelities(tmp_path / "w.tallpack", fts, sens)
    assert m.stats["dial"]["measure"] == "weighted"
    for info in m.tasks:
        weight, weighted = got[info.name]
        assert weighted >= target - 1e-9
        assert info.fidelity["weighted"] == pytest.approx(weighted, abs=1e-6)
        assert info.fidelity["weight"] == pytest.approx(weight, abs=1e-6)
        assert info.fidelity["weighted_tall"] < target  # the target needed the dial
    assert any(abs(a - b) > 1e-3 for a, b in got.values())  # the measures differ here
    out = CliRunner().invoke(main, ["inspect", str(tmp_path / "w.tallpack")]).output
    header = next(line for line in out.splitlines() if line.startswith("task"))
    assert header.split()[8:11] == ["fidelity", "weighted", "score"]
    row = next(line for line in out.splitlines() if line.startswith("t0 "))
    assert f"{m.tasks[0].fidelity['weighted']:.4f}" in row.split()
    # without the weights the same target is met in the plain measure instead, and recorded so
    m = tallpack.pack(base, fts, tmp_path / "p.tallpack", fidelity=target)
    assert m.stats["dial"]["measure"] == "weight" and all("weighted" not in i.fidelity for i in m.tasks)
    assert all(w >= target - 1e-9 for w, _ in fidelities(tmp_path / "p.tallpack", fts, {}).values())


def test_a_budget_maximizes_the_weakest_task_in_the_weighted_measure(tmp_path):
    """At the same budget, the weakest task's weighted fidelity is at least as high with the weights
    as without (higher at 1.4x), and the archive spends the budget as fully."""
    base, fts = noisy_family()
    sens = sensitivity(fts)
    one = checkpoint_bytes(fts)
    gains = []
    for x in (1.4, 1.6):
        tallpack.pack(base, fts, tmp_path / "w.tallpack", budget=x, sensitivity=sens, overwrite=True)
        tallpack.pack(base, fts, tmp_path / "p.tallpack", budget=x, overwrite=True)
        sw, sp = (tmp_path / "w.tallpack").stat().st_size, (tmp_path / "p.tallpack").stat().st_size
        assert 0.97 * x * one <= sw <= x * one and 0.97 * x * one <= sp <= x * one
        w, p = fidelities(tmp_path / "w.tallpack", fts, sens), fidelities(tmp_path / "p.tallpack", fts, sens)
        gains.append(min(v[1] for v in w.values()) - min(v[1] for v in p.values()))
    assert min(gains) >= 0 and max(gains) > 1e-3, gains


def test_a_budget_below_the_estimate_but_above_the_smallest_archive_is_kept(tmp_path):
    """The estimate charges each array its worst overhead, which on a small family puts its idea of
    the smallest archive far above the real one: such a budget is written and measured, not
    refused; one below what the smallest archive measures is refused with that size."""
    from tallpack.dial import FidelityError

    base, fts = family("dense")
    one = checkpoint_bytes(fts)
    with pytest.raises(FidelityError, match=r"smallest archive the dial makes, (\d+) bytes; give --budget") as e:
        tallpack.pack(base, fts, tmp_path / "x.tallpack", budget=1.0)
    smallest = int(e.value.args[0].split("makes, ")[1].split(" bytes")[0])
    assert not (tmp_path / "x.tallpack").exists()
    x = math.ceil(100 * smallest / one) / 100
    tallpack.pack(base, fts, tmp_path / "x.tallpack", budget=x)
    assert (tmp_path / "x.tallpack").stat().st_size <= x * one


@pytest.mark.parametrize("bad, match", [
    ({"nope": {"a.weight": torch.ones(48)}}, "task 'nope'"),
    ({"t0": {"zz": torch.ones(48)}}, "tensors it does not have: 'zz'"),
    ({"t0": {"a.weight": torch.ones(47)}}, r"task 't0', tensor 'a.weight': not a tensor broadcastable to \[64, 48\]"),
    ({"t0": {"a.weight": -torch.ones(48)}}, "finite and non-negative"),
    ({"t0": {"a.weight": torch.full((48,), float("nan"))}}, "finite and non-negative"),
    ({"t0": [1, 2]}, "must map task names"),
])
def test_bad_sensitivities_are_refused_with_where(tmp_path, bad, match):
    base, fts = family("dense")
    with pytest.raises(InvalidArgumentError, match=match):
        tallpack.pack(base, fts, tmp_path / "x.tallpack", fidelity=0.97, sensitivity=bad)
    assert not (tmp_path / "x.tallpack").exists()


def test_a_sensitivity_needs_the_dial(tmp_path):
    base, fts = family("dense")
    with pytest.raises(InvalidArgumentError, match="give fidelity or budget"):
        tallpack.pack(base, fts, tmp_path / "x.tallpack", sensitivity=sensitivity(fts))


def test_the_command_line_reads_a_sensitivity_file_and_refuses_a_bad_one(tmp_path):
    """`tallpack pack --sensitivity FILE` on real files: the same archive as the Python call with
    the same weights (written by tallpack.sensitivity.save), and one error line for a bad file."""
    from safetensors.torch import save_file

    base, fts = noisy_family()
    save_file(base, tmp_path / "base.safetensors")
    args = ["pack", "--base", str(tmp_path / "base.safetensors"), "--fidelity", "0.95", "-f"]
    for t, ft in fts.items():
        save_file(ft, tmp_path / f"{t}.safetensors")
        args += ["--task", f"{t}={tmp_path / f'{t}.safetensors'}"]
    sens = sensitivity(fts)
    tallpack.sensitivity.save(sens, tmp_path / "w.safetensors")
    assert {t: {k: v.tolist() for k, v in d.items()} for t, d in tallpack.sensitivity.load(tmp_path / "w.safetensors").items()} \
        == {t: {k: v.float().tolist() for k, v in d.items()} for t, d in sens.items()}
    r = CliRunner().invoke(main, [*args, "--sensitivity", str(tmp_path / "w.safetensors"), "-o", str(tmp_path / "c.tallpack")])
    assert r.exit_code == 0, r.output
    m = tallpack.pack(str(tmp_path / "base.safetensors"), {t: str(tmp_path / f"{t}.safetensors") for t in fts},
                      tmp_path / "p.tallpack", fidelity=0.95, sensitivity=tallpack.sensitivity.load(tmp_path / "w.safetensors"))
    with tallpack.open(tmp_path / "c.tallpack") as c:
        assert c.manifest.stats["dial"]["measure"] == "weighted"
        assert [i.fidelity for i in c.manifest.tasks] == [i.fidelity for i in m.tasks]
    save_file({"no-slash": torch.ones(3)}, tmp_path / "bad.safetensors")
    for bad in ("bad.safetensors", "missing.safetensors"):
        r = CliRunner().invoke(main, [*args, "--sensitivity", str(tmp_path / bad), "-o", str(tmp_path / "x.tallpack")])
        assert r.exit_code == 1 and r.output.startswith("error: ") and len(r.output.strip().splitlines()) == 1, r.output
    assert not (tmp_path / "x.tallpack").exists()
