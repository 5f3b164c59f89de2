"""Tied weights (format 1.14, spec §3.8) beyond reading them back: merged models completed with a
task's tensors, the names a merged model leaves out, a sensitivity or an evaluator at pack time.
Everywhere the alias is its target's very tensor, as the archive returns it."""

import logging

import pytest
import torch
from click.testing import CliRunner

import tallpack
from tallpack.errors import IncompatibleCheckpointsError, InvalidArgumentError
from tallpack.merged import left_out
from tallpack_cli.main import main

ALIAS, TARGET = "lm_head.weight", "wte.weight"


def _tie(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``sd`` with ``lm_head.weight`` the very tensor ``wte.weight`` is, last (as a tied model's
    ``state_dict()`` gives it)."""
    return {**sd, ALIAS: sd[TARGET]}


def _save(d, name: str, sd: dict[str, torch.Tensor]):
    torch.save(sd, d / f"{name}.pt")
    back = torch.load(d / f"{name}.pt", weights_only=True)
    assert back[ALIAS].data_ptr() == back[TARGET].data_ptr()  # the file holds them once
    return d / f"{name}.pt"


@pytest.fixture(scope="module")
def grown(tmp_path_factory):
    """A tied base and two fine-tunes that add 4 rows to the vocabulary: ``wte.weight`` (and so
    its alias) of another shape than the base's, stored per task."""
    d = tmp_path_factory.mktemp("grown")
    g = torch.Generator().manual_seed(0)
    b = {TARGET: torch.randn(64, 16, generator=g), "h.w": torch.randn(16, 16, generator=g),
         "h.b": torch.randn(16, generator=g), "ln.w": torch.randn(16, generator=g)}
    paths = {"base": _save(d, "base", _tie(b))}
    for i in range(2):
        t = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in b.items()}
        t[TARGET] = torch.cat([t[TARGET], torch.randn(4, 16, generator=g)])
        paths[f"t{i}"] = _save(d, f"t{i}", _tie(t))
    out = d / "grown.tallpack"
    tallpack.pack(paths["base"], {t: paths[t] for t in ("t0", "t1")}, out)
    return out


def test_merged_with_a_task_keeps_a_task_own_tie(grown):
    """``merged(task=...)`` completes the model with the task's ``wte.weight``: its alias is that
    same tensor (as ``state_dict(task)`` gives it), not a second copy."""
    with tallpack.open(grown) as fam:
        assert fam.manifest.aliases == {ALIAS: TARGET}
        sd = fam.state_dict("t0")
        for model in ("ta", "consensus-ta"):
            m = fam.merged(model, task="t0")
            assert list(m) == list(sd)
            assert m[ALIAS] is m[TARGET]
            assert torch.equal(m[TARGET], sd[TARGET])


def test_left_out_names_the_alias_too(grown, tmp_path, caplog):
    """A merged model without a task lacks both names of the tied weight; the warning and the
    CLI's result line count and name both."""
    with tallpack.open(grown) as fam:
        assert left_out(fam.manifest) == [TARGET, ALIAS]
        with caplog.at_level(logging.WARNING, logger="tallpack"):
            m = fam.merged("ta")
        assert TARGET not in m and ALIAS not in m
    said = [r.getMessage() for r in caplog.records if "every task has" in r.getMessage()]
    assert len(said) == 1 and "2 tensors" in said[0] and repr(ALIAS) in said[0] and repr(TARGET) in said[0]
    result = CliRunner().invoke(main, ["-q", "merge", str(grown), "-o", str(tmp_path / "m")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "2 tensors every task has left out" in result.output and repr(ALIAS) in result.output


def test_grown_vocabulary_of_a_tied_model_looks_fine_tuned(tmp_path):
    """A tied model of 3 tensor names (2 tensors) whose vocabulary grew: one tensor of two changed
    shape, which is a fine-tune (the alias is not counted as a second changed tensor)."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(8, 4, generator=g)
    base = _save(tmp_path, "base", {TARGET: w, "h.w": torch.randn(4, 4, generator=g), ALIAS: w})
    tw = torch.cat([w, torch.randn(2, 4, generator=g)])
    task = _save(tmp_path, "a", {TARGET: tw, "h.w": torch.load(base, weights_only=True)["h.w"] + 0.1, ALIAS: tw})
    tallpack.pack(base, {"a": task}, tmp_path / "a.tallpack")
    with tallpack.open(tmp_path / "a.tallpack") as fam:
        sd = fam.state_dict("a")
        assert sd[ALIAS] is sd[TARGET] and torch.equal(sd[TARGET], tw)
    # most of the tensors changing shape is still refused
    other = _save(tmp_path, "b", {TARGET: tw, "h.w": torch.randn(5, 4, generator=g), ALIAS: tw})
    with pytest.raises(IncompatibleCheckpointsError, match="2 of its 2 tensors"):
        tallpack.pack(base, {"a": other}, tmp_path / "b.tallpack")


@pytest.fixture(scope="module")
def tied_family(tmp_path_factory):
    """A tied base and three sparse fine-tunes, ``torch.save``d: ``lm_head.weight`` an alias."""
    d = tmp_path_factory.mktemp("tied")
    g = torch.Generator().manual_seed(2)
    b = {TARGET: torch.randn(256, 32, generator=g), "h.0.w": torch.randn(32, 32, generator=g),
         "h.0.b": torch.randn(32, generator=g), "ln.w": torch.ones(32)}
    base = _save(d, "base", _tie(b))
    tasks = {}
    for i, t in enumerate("abc"):
        sd = {k: v + 0.01 * torch.randn(v.shape, generator=g) * (torch.rand(v.shape, generator=g) < 0.3)
              for k, v in b.items()}
        tasks[t] = _save(d, t, _tie(sd))
    return base, tasks


def _sensitivity(names: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    return {t: dict(names, **{"h.0.w": torch.ones(32, 32)}) for t in "abc"}


def test_sensitivity_may_name_the_alias(tied_family, tmp_path):
    """A sensitivity naming ``lm_head.weight`` (from a tied model's ``state_dict()``) weighs the one
    tensor stored, ``wte.weight``: the archive is the one packed with the target named."""
    base, tasks = tied_family
    rows = torch.zeros(256, 1)
    rows[:32] = 10.0  # the first rows matter
    packed = {}
    for label, names in (("alias", {ALIAS: rows}), ("target", {TARGET: rows}), ("both", {ALIAS: rows, TARGET: rows})):
        out = tmp_path / f"{label}.tallpack"
        tallpack.pack(base, tasks, out, budget=1.5, sensitivity=_sensitivity(names))
        packed[label] = out.read_bytes()
    assert packed["alias"] == packed["target"] == packed["both"]
    with tallpack.open(tmp_path / "alias.tallpack") as fam:
        sd = fam.state_dict("a")
        assert sd[ALIAS] is sd[TARGET]


def test_sensitivity_of_both_names_must_agree(tied_family, tmp_path):
    base, tasks = tied_family
    names = {ALIAS: torch.ones(256, 32), TARGET: torch.full((256, 32), 2.0)}
    with pytest.raises(InvalidArgumentError) as e:
        tallpack.pack(base, tasks, tmp_path / "x.tallpack", budget=1.5, sensitivity=_sensitivity(names))
    msg = str(e.value)
    assert "\n" not in msg and repr(ALIAS) in msg and repr(TARGET) in msg and "task 'a'" in msg
    assert not (tmp_path / "x.tallpack").exists()
    with pytest.raises(InvalidArgumentError, match="'lm_head.weights'"):  # a misspelt name is still refused
        tallpack.pack(base, tasks, tmp_path / "x.tallpack", budget=1.5,
                      sensitivity=_sensitivity({"lm_head.weights": torch.ones(256, 32)}))


def _watching(seen: list):
    """An evaluator noting, per call, whether the alias is its target's very tensor."""
    def evaluate(task, sd):
        assert ALIAS in sd and TARGET in sd
        seen.append((task, sd[ALIAS] is sd[TARGET], sd[TARGET].clone()))
        return 1.0 + float(sd["h.0.b"].sum()) * 1e-3
    return evaluate


def test_lambda_selection_scores_the_tie_the_archive_returns(tied_family, tmp_path):
    """pack(evaluate=...): every state dict scored has the alias as the rebuilt target, the model
    the archive gives at that lambda, not the fine-tune's original output layer."""
    base, tasks = tied_family
    seen: list = []
    out = tmp_path / "e.tallpack"
    m = tallpack.pack(base, tasks, out, evaluate=_watching(seen), lambda_grid=[0.2, 0.4])
    assert len(seen) == 6 and all(tied for _, tied, _ in seen)
    original = torch.load(tasks["a"], weights_only=True)[TARGET]
    with tallpack.open(out) as fam:
        rebuilt = fam.state_dict("a")[TARGET]
    at = [0.2, 0.4].index(next(t.lam for t in m.tasks if t.name == "a"))
    scored = [sd for t, _, sd in seen if t == "a"][at]
    assert torch.equal(scored, rebuilt) and not torch.equal(scored, original)


def test_dial_and_select_alpha_score_the_tie(tied_family, tmp_path):
    """The fidelity dial's evaluations, and select_alpha's, see the alias as its target too."""
    base, tasks = tied_family
    seen: list = []
    out = tmp_path / "d.tallpack"
    tallpack.pack(base, tasks, out, evaluate=_watching(seen), lambda_grid=[0.4], fidelity=0.999)
    assert len(seen) > 3 and all(tied for _, tied, _ in seen)  # the lambda grid's 3, then the dial's
    seen.clear()
    with tallpack.open(out) as fam:
        tallpack.select_alpha(fam, "ta", _watching(seen), grid=[0.3, 0.6])
    assert seen and all(tied for _, tied, _ in seen)


def _family(d, tied: dict[str, bool]) -> dict:
    """Checkpoints ``name -> path`` of a small model, tied or untied per name (``base`` first)."""
    g = torch.Generator().manual_seed(3)
    b = {TARGET: torch.randn(32, 8, generator=g), "h.w": torch.randn(8, 8, generator=g)}
    paths = {}
    for name, tie in tied.items():
        sd = b if name == "base" else {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in b.items()}
        sd = _tie(sd) if tie else {**sd, ALIAS: sd[TARGET].clone()}
        torch.save(sd, d / f"{name}.pt")
        paths[name] = d / f"{name}.pt"
    return paths


@pytest.mark.parametrize("tied, why", [
    ({"base": True, "t0": True, "t1": True, "t2": False}, "task 't2' ("),
    ({"base": False, "t0": True, "t1": True}, "the base ("),
])
def test_a_tie_stored_apart_is_warned_of_naming_the_tied_tasks_and_why(tmp_path, caplog, tied, why):
    """A tie some checkpoint does not share is stored as two tensors: the tasks that tie them then
    read back two different tensors, which pack says (not a debug line only)."""
    paths = _family(tmp_path, tied)
    with caplog.at_level(logging.WARNING, logger="tallpack"):
        tallpack.pack(paths.pop("base"), paths, tmp_path / "f.tallpack")
    [line] = [r.getMessage() for r in caplog.records if "stored apart" in r.getMessage()]
    assert line.startswith(f"tensors '{TARGET}' and '{ALIAS}' are one tensor in tasks 't0', 't1' but are stored "
                           f"apart, since {why}") and "does not tie them" in line
    with tallpack.open(tmp_path / "f.tallpack") as fam:
        assert fam.manifest.aliases == {}


def test_a_tie_every_checkpoint_shares_is_not_warned_of(tmp_path, caplog):
    paths = _family(tmp_path, {"base": True, "t0": True, "t1": True})
    with caplog.at_level(logging.WARNING, logger="tallpack"):
        tallpack.pack(paths.pop("base"), paths, tmp_path / "f.tallpack")
    assert not [r for r in caplog.records if "stored apart" in r.getMessage()]
