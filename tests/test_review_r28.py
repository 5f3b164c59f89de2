"""Review of the twenty-eighth round (large tensors a block at a time; merged tensors built in runs):
corner cases found by reading the diff, each pinned here with its fix."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

import tallpack
import tallpack.merged as M
from tallpack.encodings import Item
from tallpack.plan import TensorPlan

from conftest import pack_both_ways

CE = 1 << 14


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def test_a_remote_consensus_merge_built_in_runs_fetches_its_tensor_at_once(http_server, tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A tensor built in runs from a remote archive prefetches its arrays as one built whole does:
    a consensus model read every chunk of every array in a request of its own (the writer
    interleaves the arrays' chunks, so a run's reads do not coalesce): 247 requests against 2."""
    pytest.importorskip("aiohttp")  # fsspec's HTTP file system
    g = torch.Generator().manual_seed(0)
    n = 40 * CE + 17
    base = {"big": torch.randn(n, generator=g) * 0.02, "s": torch.ones(4)}
    fts = {f"t{i}": {k: v + 1e-3 * torch.randn(v.shape, generator=g) for k, v in base.items()} for i in range(4)}
    local = tmp_path / "runs.tallpack"
    tallpack.pack(base, fts, local, chunk_elements=CE)
    shutil.copy(local, http_server.root / "runs.tallpack")
    url = f"{http_server.url}/runs.tallpack"
    got = {}
    for chunked in (1 << 60, CE):  # built whole, then in runs
        monkeypatch.setattr(M, "CHUNKED_FROM", chunked)
        with tallpack.open(url) as fam:
            http_server.reset()
            t = fam.merged("consensus-ta")["big"]
            got[chunked] = (t, http_server.gets())
    (whole, whole_gets), (runs, runs_gets) = got[1 << 60], got[CE]
    assert torch.equal(_bits(runs), _bits(whole))
    assert runs_gets <= whole_gets + 1, (runs_gets, whole_gets)


N = 5 * CE + 100  # six blocks, the last a short one


def _streamed_family(d: Path, edit) -> tuple[Path, dict[str, Path]]:
    from safetensors.torch import save_file
    g = torch.Generator().manual_seed(3)
    base = {"big.weight": torch.randn(N, generator=g) * 0.02, "other": torch.randn(8, 8, generator=g)}
    save_file(base, d / "base.safetensors")
    tasks = {}
    for i in range(3):
        sd = {k: v + 1e-3 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        edit(i, sd)
        save_file(sd, d / f"t{i}.safetensors")
        tasks[f"t{i}"] = d / f"t{i}.safetensors"
    return d / "base.safetensors", tasks


@pytest.mark.parametrize("opts", [{}, {"exact": True}, {"fidelity": 0.999}])
def test_a_streamed_tensor_stored_per_task_is_read_one_task_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                       opts: dict) -> None:
    """A large tensor settled as task-own (a NaN in one task) was read whole, every task's copy and
    the base's at once (``Dense.write`` took ``Item.thetas``): now one task's copy at a time, the
    same bytes."""
    def edit(i: int, sd: dict) -> None:
        if i == 1:
            sd["big.weight"][N - 5] = float("nan")
    base, tasks = _streamed_family(tmp_path, edit)
    whole, streamed, _, wholes = pack_both_ways(tmp_path, monkeypatch, base, tasks, chunk=CE, **opts)
    assert streamed == whole
    assert wholes == 0
    with tallpack.open(tmp_path / "a0.tallpack") as fam:
        assert {e.name: e.kind for e in fam.manifest.tensors}["big.weight"] == "task-own"


def test_a_file_written_over_between_a_streamed_tensors_passes_is_what_the_pack_reports(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A large tensor is read in several passes (its kind, the dial's measures, the writing): a task's
    file written over in place after the first (NaN where there were numbers) failed the pack with
    "the manifest cannot be stored: Out of range float values" (the dial's figures NaN), not with the
    file's change. Now the changed file is the error, naming the task; no archive is left."""
    import os

    from tallpack import inputs
    from tallpack.errors import CheckpointError

    base, tasks = _streamed_family(tmp_path, lambda i, sd: None)
    monkeypatch.setattr(inputs, "HOLD_BYTES", 0)
    real = inputs.PackInputs.load

    def load(self: inputs.PackInputs, entry: TensorPlan) -> Item:
        item = real(self, entry)
        if entry.name == "big.weight" and item.streamed:  # its kind settled: then saved over, in place
            victim = tasks["t1"]
            st = os.stat(victim)
            with open(victim, "r+b") as f:
                f.seek(-4000, os.SEEK_END)
                f.write(b"\xff" * 4000)  # NaNs in the last block
            os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        return item
    monkeypatch.setattr(inputs.PackInputs, "load", load)
    out = tmp_path / "o.tallpack"
    with pytest.raises(CheckpointError, match=r"written over while it was packed.*task 't1'"):
        tallpack.pack(base, tasks, out, chunk_elements=CE, fidelity=0.999)
    assert not out.exists()


@pytest.mark.parametrize("merge", ["ta", "ties"])
def test_lambda_selection_reads_a_streamed_tensor_a_block_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                    merge: str) -> None:
    """``pack(evaluate=...)`` (lambda selection) took a streamed tensor's ``Item.base`` and
    ``Item.thetas``: the base and every task's copy read whole at once. Now its base and tau_MTL
    are built a block at a time; the scores, the lambdas chosen and the archive are the same."""
    base, tasks = _streamed_family(tmp_path, lambda i, sd: None)

    def evaluate(task: str, sd: dict[str, torch.Tensor]) -> float:
        return -float(sd["big.weight"].float().abs().sum()) - float(sd["other"].float().sum())
    whole, streamed, _, wholes = pack_both_ways(tmp_path, monkeypatch, base, tasks, chunk=CE, merge=merge,
                                                evaluate=evaluate, lambda_grid=[0.2, 0.4, 0.6], group=False)
    assert streamed == whole  # (group=False: N is small enough to group, else)
    assert wholes == 0


@pytest.mark.parametrize("opts", [{"exact": True}, {"exact": True, "derive_masks": False}, {"exact": True, "merge": "ties"}])
def test_a_streamed_residual_against_the_base_or_zero_reads_two_copies_not_every_tasks(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, opts: dict) -> None:
    """The exact tier's residual of a streamed tensor is written one task at a time, each a pass
    over the blocks: against the base or zero (a ``tall-derived`` task, the usual choice) every
    pass read the base's and every task's blocks, T x (T + 1) copies in all where 2 T are needed.
    Now such a pass reads the base's and that task's blocks alone; the same bytes."""
    from tallpack import inputs

    base, tasks = _streamed_family(tmp_path, lambda i, sd: None)
    seen = {"block": 0, "pair": 0}
    block, pair = inputs.Streamed.block, inputs.Streamed.pair

    def counted_block(self: inputs.Streamed, start: int, stop: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        seen["block"] += 1
        return block(self, start, stop)

    def counted_pair(self: inputs.Streamed, i: int, start: int, stop: int, base: bool
                     ) -> tuple[torch.Tensor | None, torch.Tensor]:
        seen["pair"] += 1
        return pair(self, i, start, stop, base)
    monkeypatch.setattr(inputs.Streamed, "block", counted_block)
    monkeypatch.setattr(inputs.Streamed, "pair", counted_pair)
    whole, streamed, _, _ = pack_both_ways(tmp_path, monkeypatch, base, tasks, chunk=CE, group=False, **opts)
    assert streamed == whole
    with tallpack.open(tmp_path / "a0.tallpack") as fam:
        entry = next(e for e in fam.manifest.tensors if e.name == "big.weight")
        refs = [tt.extras["exact"].reference for tt in entry.tasks.values()]
    per_pass = -(-N // CE)
    # every task's pass: the base's and its own blocks, against TALL's reference too (exact._Spill)
    assert seen["pair"] == len(refs) * per_pass, (seen, refs)
    if opts.get("merge") != "ties":  # (TIES' statistics take passes of their own)
        assert seen["block"] == 3 * per_pass, (seen, refs)  # its kind, the writing, the exact tier's scan
