"""A base that holds one name of a tied weight (safetensors' ``save_model``, ``save_pretrained``)
and tasks that tie it (``torch.save(model.state_dict())``): the name the base dropped is an
alias of the one it holds (spec §3.8's writer), so the tensor is stored once, not once per task
as a task's own tensor (3.5x the archive on the model below), and read back tied."""

import logging

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_model

import tallpack

WTE, HEAD = "wte.weight", "lm_head.weight"
TASKS = ("t0", "t1", "t2")


class _Tied(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.wte = torch.nn.Embedding(400, 32)
        self.h = torch.nn.Linear(32, 32)
        self.lm_head = torch.nn.Linear(32, 400, bias=False)
        self.lm_head.weight = self.wte.weight


def _tuned(model: _Tied, seed: int) -> _Tied:
    g = torch.Generator().manual_seed(seed)
    m = _Tied()
    m.load_state_dict(model.state_dict())
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g) * (torch.rand(p.shape, generator=g) < 0.1))
    return m


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    d = tmp_path_factory.mktemp("held_once")
    torch.manual_seed(0)
    base = _Tied()
    save_model(base, str(d / "base.safetensors"))  # keeps one name of the tie
    torch.save(base.state_dict(), d / "base.pt")  # both names, one storage
    tasks = {}
    for i, t in enumerate(TASKS):
        tasks[t] = d / f"{t}.pt"
        torch.save(_tuned(base, i + 1).state_dict(), tasks[t])
    with safe_open(d / "base.safetensors", "pt") as f:
        held = list(f.keys())
    assert (WTE in held) != (HEAD in held)  # what save_model does to a tie, which this test is about
    return {"dir": d, "tasks": tasks, "held": HEAD if HEAD in held else WTE}


def test_the_dropped_name_is_an_alias_of_the_one_the_base_holds(family, caplog):
    d = family["dir"]
    with caplog.at_level(logging.WARNING, logger="tallpack"):
        tallpack.pack(d / "base.safetensors", family["tasks"], d / "st.tallpack", record_paths=False)
    assert not [r for r in caplog.records if "stored apart" in r.getMessage()]
    tallpack.pack(d / "base.pt", family["tasks"], d / "pt.tallpack", record_paths=False)
    held = family["held"]
    dropped = WTE if held == HEAD else HEAD
    with tallpack.open(d / "st.tallpack") as st, tallpack.open(d / "pt.tallpack") as pt:
        assert st.manifest.aliases == {dropped: held} and "aliases" in st.manifest.requires
        assert not [e for e in st.manifest.tensors if e.name == dropped]  # stored nowhere
        # the size a base with both names gives (its stored base tensor is the same values)
        assert st.size < 1.05 * pt.size
        for t in TASKS:
            orig = torch.load(family["tasks"][t], weights_only=True)
            sd, other = st.state_dict(t), pt.state_dict(t)
            assert list(sd) == list(orig)  # the task's order, both names
            assert sd[WTE] is sd[HEAD]  # one tensor, as torch.load gives it
            assert all(torch.equal(sd[k], other[k]) for k in sd)
            assert torch.equal(st.get_tensor(t, dropped), sd[held])


def test_exact_tier_and_merged_model(family, tmp_path):
    d = family["dir"]
    tallpack.pack(d / "base.safetensors", family["tasks"], tmp_path / "x.tallpack", exact=True)
    with tallpack.open(tmp_path / "x.tallpack") as fam:
        assert fam.verify() == []
        for t in TASKS:
            orig = torch.load(family["tasks"][t], weights_only=True)
            sd = fam.state_dict(t, exact=True)
            assert sd[WTE] is sd[HEAD] and all(torch.equal(sd[k], orig[k]) for k in orig)
        merged = fam.merged()
        assert merged[WTE] is merged[HEAD]


@pytest.mark.parametrize("untied", ["t1", "base"])
def test_a_tie_not_everywhere_is_still_stored_apart(family, tmp_path, caplog, untied):
    """One task that holds the names apart, or a base that holds both names apart: no alias
    (their values differ somewhere), and pack says so."""
    d = family["dir"]
    tasks = dict(family["tasks"])
    base = d / "base.safetensors"
    if untied == "base":
        sd = torch.load(d / "base.pt", weights_only=True)
        base = tmp_path / "untied_base.pt"
        torch.save({k: v.clone() for k, v in sd.items()}, base)
    else:
        sd = torch.load(tasks[untied], weights_only=True)
        tasks[untied] = tmp_path / "untied.pt"
        torch.save({k: v.clone() for k, v in sd.items()}, tasks[untied])
    with caplog.at_level(logging.WARNING, logger="tallpack"):
        tallpack.pack(base, tasks, tmp_path / "f.tallpack")
    assert [r for r in caplog.records if "stored apart" in r.getMessage()]
    with tallpack.open(tmp_path / "f.tallpack") as fam:
        assert fam.manifest.aliases == {}
        for t in TASKS:
            orig = torch.load(tasks[t], weights_only=True)
            assert list(fam.state_dict(t)) == list(orig)


def test_three_names_of_one_tensor(tmp_path):
    """A tensor under three names in every task, the base holding one: both others are aliases of it."""
    g = torch.Generator().manual_seed(5)
    w, h = torch.randn(64, 8, generator=g), torch.randn(8, 8, generator=g)
    from safetensors.torch import save_file
    save_file({"a": w, "h": h}, tmp_path / "base.safetensors")
    tasks = {}
    for i in range(2):
        v = w + 0.01 * torch.randn(w.shape, generator=g)
        tasks[f"t{i}"] = tmp_path / f"t{i}.pt"
        torch.save({"b": v, "h": h + 0.01, "a": v, "c": v}, tasks[f"t{i}"])
    tallpack.pack(tmp_path / "base.safetensors", tasks, tmp_path / "f.tallpack")
    with tallpack.open(tmp_path / "f.tallpack") as fam:
        assert fam.manifest.aliases == {"b": "a", "c": "a"}
        sd = fam.state_dict("t1")
        assert list(sd) == ["b", "h", "a", "c"] and sd["a"] is sd["b"] is sd["c"]
