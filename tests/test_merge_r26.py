"""Merged models as a demanding user meets them (review r26): a consensus k over the task count,
an alpha past float32's range on the command line, the quiet result line of a merge that lacks
base tensors, and the error for a merged model the archive cannot give."""

from __future__ import annotations

import logging

import pytest
import torch
from click.testing import CliRunner

import tallpack
from tallpack.errors import InvalidArgumentError
from tallpack.merged import base_not_held
from tallpack.report import format_size
from tallpack_cli.main import main


def _pack(family: dict, out, names=None) -> str:
    tasks = {t: str(p) for t, p in family["task_paths"].items() if names is None or t in names}
    tallpack.pack(str(family["base_path"]), tasks, str(out))
    return str(out)


def _merge(*args: object):
    return CliRunner().invoke(main, ["-q", "merge", *map(str, args)], catch_exceptions=False)


def test_k_over_the_task_count_says_the_model_is_the_base(small_family, tmp_path, caplog):
    arch = _pack(small_family, tmp_path / "f.tallpack")
    with tallpack.open(arch) as fam, caplog.at_level(logging.WARNING, logger="tallpack.merged"):
        sd = fam.merged("consensus-ta", k=4, alpha=0.5)
        said = [r.getMessage() for r in caplog.records if "k=4 is more than" in r.getMessage()]
        fam.merged("consensus-ta", k=4, alpha=0.7)  # said once per open archive, not at every call
        again = [r.getMessage() for r in caplog.records if "k=4 is more than" in r.getMessage()]
        caplog.clear()
        fam.merged("consensus-ta", k=3, alpha=0.5)  # k = T keeps the weights every task uses: nothing said
        assert not [r for r in caplog.records if "is more than" in r.getMessage()]
        base = fam.merged("ta", alpha=0.0)
    assert len(said) == 1 and len(again) == 1
    assert "3 tasks" in said[0] and "is the base" in said[0] and "k=3" in said[0]
    assert torch.equal(sd["body.w"], base["body.w"]) and torch.equal(sd["body.b"], base["body.b"])
    r = _merge(arch, "--k", 4, "-o", tmp_path / "m")  # -q: the result line says it
    assert r.exit_code == 0, r.output
    assert "k=4 is over the 3 tasks: the model is the base (--k 3 keeps" in r.output
    r = _merge(arch, "--k", 3, "-o", tmp_path / "m3")
    assert r.exit_code == 0 and "is over" not in r.output, r.output
    shown = " ".join(CliRunner().invoke(main, ["merge", "--help"]).output.split())
    assert "over the number of tasks: none, the base" in shown


def test_one_task_archive_default_merge_is_flagged(small_family, tmp_path):
    arch = _pack(small_family, tmp_path / "one.tallpack", names=("a",))
    r = _merge(arch, "-o", tmp_path / "m")  # the default model: consensus-ta, k=2
    assert r.exit_code == 0, r.output
    assert "k=2 is over the 1 task: the model is the base (--k 1 keeps" in r.output


@pytest.mark.parametrize("alpha", ["1e39", "-3.5e38"])
def test_alpha_past_float32_is_a_usage_error_before_the_archive_is_read(tmp_path, alpha):
    out = tmp_path / "m"
    r = _merge(tmp_path / "missing.tallpack", f"--alpha={alpha}", "-o", out)
    assert r.exit_code == 2, r.output
    assert "past float32's range" in r.output and "merge --help" in r.output
    assert "missing.tallpack" not in r.output and not out.exists()


def test_quiet_result_line_names_the_base_tensors_the_archive_lacks(small_family, tmp_path):
    arch = _pack(small_family, tmp_path / "f.tallpack")
    with tallpack.open(arch) as fam:
        lacking = base_not_held(fam.manifest)  # the base's larger head, the tasks' own heads stored per task
    assert lacking > 0
    r = _merge(arch, "-o", tmp_path / "m")
    assert r.exit_code == 0, r.output
    assert f"{format_size(lacking)} of the base's tensors not in the archive left out (--keep-base-only" in r.output
    r = _merge(arch, "--task", "a", "-o", tmp_path / "ma")  # a task's tensors complete it: nothing lacks
    assert r.exit_code == 0 and "not in the archive" not in r.output, r.output


def test_a_model_of_another_merge_names_what_the_archive_gives(small_family, tmp_path):
    arch = _pack(small_family, tmp_path / "f.tallpack")
    with tallpack.open(arch) as fam, pytest.raises(InvalidArgumentError, match=r"packed with --merge ta, which gives "
                                                                                  r"ta and consensus-ta$"):
        fam.merged("consensus-ties")


def test_a_0d_tensor_alpha_is_its_number(small_family, tmp_path):
    arch = _pack(small_family, tmp_path / "f.tallpack")
    with tallpack.open(arch) as fam:
        grid, scores = torch.tensor([0.25, 0.5, 0.75]), torch.tensor([0.1, 0.9, 0.3])
        chosen = grid[scores.argmax()]  # what a torch user's selection gives: a 0-d tensor
        got, want = fam.merged("ta", alpha=chosen), fam.merged("ta", alpha=0.5)
        assert all(torch.equal(got[n], want[n]) for n in want)
        with pytest.raises(InvalidArgumentError, match="alpha must be a number"):
            fam.merged("ta", alpha=torch.tensor([0.5]))  # a 1-element vector is not a number
        with pytest.raises(InvalidArgumentError, match="alpha must be a number"):
            fam.merged("ta", alpha=torch.tensor(True))


def test_consensus_counts_masks_as_they_come_with_the_formula_bits():
    from tallpack.merging import consensus_mask, merge_direction

    masks = [torch.tensor([True, False, True, False]), torch.tensor([True, True, False, False])]
    assert consensus_mask(iter(masks), 2).tolist() == [True, False, False, False]  # an iterator: one held at a time
    tau = torch.tensor([-1.5, -2.0, 3.0, 0.5])
    d = merge_direction("consensus-ta", tau, iter(masks), k=2)
    want = consensus_mask(masks, 2).to(torch.float32) * tau  # the spec's 0.0/1.0 times tau_MTL
    assert d.tolist() == want.tolist() and torch.equal(torch.signbit(d), torch.signbit(want))
    assert torch.signbit(d[1])  # a dropped negative element is -0.0, as 0.0 * tau is
    with pytest.raises(InvalidArgumentError, match="no masks"):
        consensus_mask(iter([]), 1)


@pytest.mark.parametrize("exact, model", [(False, "consensus-ta"), (True, "consensus-ta"), (True, "ta")])
def test_a_remote_merge_fetches_each_tensor_in_one_request(http_server, tmp_path, exact, model):
    """Over HTTP, a merged model fetches each tensor's arrays together (base, merged vector, every
    task's mask; or every task's residual where they derive them), not one request an array."""
    pytest.importorskip("aiohttp")  # fsspec's HTTP file system
    g = torch.Generator().manual_seed(5)
    base = {f"layers.{i}.w": torch.randn(64, 96, generator=g) for i in range(4)}
    tasks = {t: {k: v + 0.05 * torch.randn(v.shape, generator=g) * (torch.rand(v.shape, generator=g) < 0.4)
                 for k, v in base.items()} for t in ("a", "b", "c")}
    name = f"merge-{exact}-{model}.tallpack"
    local = tmp_path / name
    tallpack.pack(base, tasks, local, chunk_elements=1024, group=False, exact=exact)
    local.replace(http_server.root / name)
    with tallpack.open(f"{http_server.url}/{name}") as fam, tallpack.open(http_server.root / name) as ref:
        arrays = sum(1 for e in fam.manifest.tensors for _ in e.all_arrays())
        http_server.reset()
        got = fam.merged(model, alpha=0.4)
        gets = http_server.gets()
        want = ref.merged(model, alpha=0.4)
    assert all(torch.equal(got[n], want[n]) for n in want)
    # one coalesced request a tensor (2x: room for an HTTP retry under load), against one an array
    assert gets <= 2 * len(base) < arrays, (gets, len(base), arrays)


def test_select_alpha_of_a_plain_merge_gives_a_k_that_merged_takes(tmp_path):
    """``select_alpha(fam, "ta")`` returned k=2, so ``merged(sel.method, k=sel.k, alpha=sel.alpha)``
    raised "k: only the consensus models use it": k is None for ta and ties."""
    g = torch.Generator().manual_seed(4)
    base = {"w": torch.randn(16, 16, generator=g)}
    tasks = {t: {"w": base["w"] + 0.05 * torch.randn(16, 16, generator=g)} for t in ("a", "b")}
    tallpack.pack(base, tasks, tmp_path / "f.tallpack")
    with tallpack.open(tmp_path / "f.tallpack") as fam:
        for method in ("ta", "consensus-ta"):
            sel = tallpack.select_alpha(fam, method, lambda t, sd: -float((sd["w"] - tasks[t]["w"]).norm()),
                                        grid=[0.3, 0.6])
            assert (sel.k is None) == (method == "ta") and sel.to_dict()["k"] == sel.k
            fam.merged(sel.method, k=sel.k, alpha=sel.alpha)
