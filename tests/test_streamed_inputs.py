"""Tensors too large to hold every task's copy of at once are read a block at a time.

A tensor planned as merged whose copies (base and tasks) take more than ``inputs.HOLD_BYTES``
together is read from its files one block of ``chunk_elements`` at a time, for the checks that
settle its kind (``plan.resolve_blocks``), the merge method's statistics and the writing: the
packer holds a block of each copy instead of T + 1 whole copies. The archive is the same, byte for
byte, as when every tensor is read whole.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import tallpack
from tallpack import inputs
from tallpack.plan import Kind, resolve, resolve_blocks

from conftest import anon_growth, big_family, pack_both_ways

CHUNK = 1 << 16
N = 5 * CHUNK + 1000  # a tensor of six blocks, the last a short one, and not grouped (SMALL_ELEMENTS)


def _family(d: Path, dtype: torch.dtype, kind: str = "safetensors", tasks: int = 3, *, edit=None
            ) -> tuple[Path, dict[str, Path]]:
    """A base and ``tasks`` fine-tunes: one tensor of six blocks (``big.weight``) and a small one;
    ``edit(i, task_sd, base_sd)`` changes task ``i``'s before it is saved."""
    g = torch.Generator().manual_seed(0)
    base = {"big.weight": (torch.randn(N, generator=g) * 0.02).to(dtype),
            "other.weight": torch.randn(64, 32, generator=g).to(dtype)}
    paths = {}
    for i in range(-1, tasks):
        sd = base if i < 0 else {k: (v.float() + 1e-3 * torch.randn(v.shape, generator=g)).to(dtype)
                                 for k, v in base.items()}
        if edit is not None and i >= 0:
            edit(i, sd, base)
        p = d / f"m{i + 1}.{kind}"
        save_file(sd, p) if kind == "safetensors" else torch.save(sd, p)
        paths[f"t{i}"] = p
    return paths.pop("t-1"), paths


def _pack_both(tmp: Path, monkeypatch, base: Path, tasks: dict[str, Path], **kw) -> tuple[bytes, bytes, int]:
    """The archive packed with every tensor read whole, and with tensors read a block at a time;
    and how many blocks were read (``conftest.pack_both_ways``)."""
    whole, streamed, blocks, _ = pack_both_ways(tmp, monkeypatch, base, tasks, chunk=CHUNK, **kw)
    return whole, streamed, blocks


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("merge", ["ta", "ties"])
def test_streamed_archives_are_the_same_bytes(tmp_path, monkeypatch, dtype, merge):
    base, tasks = _family(tmp_path, dtype)
    whole, streamed, blocks = _pack_both(tmp_path, monkeypatch, base, tasks, merge=merge)
    assert blocks >= 12  # the checks' pass and the writing's, six blocks each (TIES: its statistics' too)
    assert streamed == whole


@pytest.mark.parametrize("opts", [{"codec": "raw"}, {"level": 10}, {"exact": True}, {"fidelity": 0.999},
                                  {"lambdas": 0.3, "checksum": "crc32"}])
def test_streamed_archives_with_other_options(tmp_path, monkeypatch, opts):
    base, tasks = _family(tmp_path, torch.float32)
    whole, streamed, blocks = _pack_both(tmp_path, monkeypatch, base, tasks, **opts)
    assert blocks >= 6
    assert streamed == whole


def test_streamed_from_torch_files(tmp_path, monkeypatch):
    base, tasks = _family(tmp_path, torch.bfloat16, "pt")
    whole, streamed, blocks = _pack_both(tmp_path, monkeypatch, base, tasks)
    assert blocks >= 12
    assert streamed == whole


def test_a_tensor_stored_transposed_in_a_torch_file_is_read_whole(tmp_path, monkeypatch):
    """A ``.pt`` tensor saved as a view in another order cannot be read a range at a time."""
    base = {"big.weight": (torch.randn(N) * 0.02).reshape(N // 8, 8).t().contiguous().t(), "b": torch.ones(3)}
    torch.save(base, tmp_path / "base.pt")
    tasks = {}
    for i in range(2):
        sd = {"big.weight": (base["big.weight"] + 1e-3 * torch.randn(base["big.weight"].shape)), "b": torch.ones(3)}
        torch.save({"big.weight": sd["big.weight"].t().contiguous().t(), "b": sd["b"]}, tmp_path / f"t{i}.pt")
        tasks[f"t{i}"] = tmp_path / f"t{i}.pt"
    whole, streamed, blocks = _pack_both(tmp_path, monkeypatch, tmp_path / "base.pt", tasks)
    assert blocks == 0
    assert streamed == whole


@pytest.mark.parametrize("case", ["nan", "equal", "huge", "equal-to-base"])
def test_streamed_tensors_settle_the_same_kind(tmp_path, monkeypatch, case):
    """A NaN or a value past TALL's range in the last block (task-own), or every task equal
    (shared; also at the base's value), settled as when the tensor is read whole."""
    def edit(i, sd, base):
        big = sd["big.weight"]
        if case == "nan" and i == 1:
            big[N - 3] = float("nan")
        elif case == "huge" and i == 2:
            big[N - 2] = 3e38
        elif case == "equal":
            big.copy_(torch.arange(N, dtype=torch.float32) * 1e-6)
        elif case == "equal-to-base":
            sd["big.weight"] = base["big.weight"].clone()
    base, tasks = _family(tmp_path, torch.float32, edit=edit)
    whole, streamed, _ = _pack_both(tmp_path, monkeypatch, base, tasks)
    assert streamed == whole
    kinds = {e.name: e.kind for e in tallpack.open(tmp_path / "a0.tallpack").manifest.tensors}
    assert kinds["big.weight"] == {"nan": "task-own", "huge": "task-own", "equal": "shared",
                                   "equal-to-base": "shared"}[case]


def _split(t: torch.Tensor, cuts: list[int]) -> list[torch.Tensor]:
    edges = sorted({0, t.numel(), *(c % (t.numel() + 1) for c in cuts)})
    return [t[a:b] for a, b in zip(edges, edges[1:])]


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 4), st.integers(1, 300), st.lists(st.integers(0, 300), max_size=4),
       st.sampled_from(["plain", "nan", "inf", "equal", "huge", "base-equal"]), st.integers(0, 299),
       st.sampled_from([Kind.MERGED, Kind.TASK_OWN]))
def test_resolve_blocks_decides_as_resolve(tasks, n, cuts, what, at, planned):
    g = torch.Generator().manual_seed(n * 7 + tasks)
    base = torch.randn(n, generator=g)
    thetas = [base + 1e-3 * torch.randn(n, generator=g) for _ in range(tasks)]
    at %= n
    if what == "nan":
        thetas[-1][at] = float("nan")
    elif what == "inf":
        thetas[0][at] = float("inf")
    elif what == "equal":
        thetas = [thetas[0].clone() for _ in thetas]
    elif what == "huge":
        thetas[0][at] = 2.0 ** 49
    elif what == "base-equal":
        thetas = [base.clone() for _ in thetas]
    want = resolve(planned, base, thetas)
    pieces = list(zip(_split(base, cuts), zip(*[_split(t, cuts) for t in thetas])))
    got = resolve_blocks(planned, tasks, True, ((b, list(xs)) for b, xs in pieces))
    assert got == want


def test_resolve_blocks_of_tasks_in_different_dtypes_never_shared():
    base = torch.zeros(4)
    thetas = [torch.ones(4), torch.ones(4)]
    assert resolve_blocks(Kind.MERGED, 2, False, [(base, thetas)]) is Kind.MERGED
    assert resolve_blocks(Kind.MERGED, 2, True, [(base, thetas)]) is Kind.SHARED


def test_streamed_base_under_a_prefix(tmp_path, monkeypatch):
    """A bare base whose tasks name its tensors with a prefix (``plan.Renamed``) is read in ranges too."""
    base, tasks = _family(tmp_path, torch.float32)
    from safetensors.torch import load_file
    for t, p in tasks.items():
        save_file({f"model.{k}": v for k, v in load_file(p).items()}, p)
    whole, streamed, blocks = _pack_both(tmp_path, monkeypatch, base, tasks)
    assert blocks >= 12
    assert streamed == whole


def test_packing_holds_a_block_of_each_copy(tmp_path):
    """Peak memory of packing a tensor of 32 MB with three tasks: read whole, the four copies
    (128 MB) are held at once; read a block at a time (1 MB blocks), a few blocks of each."""
    tasks = big_family(tmp_path)
    grown = {}
    for hold in (1 << 60, 1 << 20):
        setup = f"import tallpack.inputs as I; I.HOLD_BYTES = {hold}"
        work = (f"tallpack.pack({str(tmp_path / 'base.safetensors')!r}, {json.dumps(tasks)}, "
                f"{str(tmp_path / 'a.tallpack')!r}, chunk_elements={1 << 18}, threads=2, overwrite=True)")
        grown[hold] = anon_growth(setup, work)
    mb = 1 << 20
    assert grown[1 << 60] > 128 * mb, grown  # (the copies held whole: the measure sees them)
    assert grown[1 << 20] < grown[1 << 60] - 80 * mb, {k: v / mb for k, v in grown.items()}
