"""The exact tier (``pack --exact``) of a tensor read a block at a time (``inputs.HOLD_BYTES``).

``exact.add_exact`` reads such a tensor a block at a time too: one pass for the tasks' hashes, the
TALL references' NaN check and the sample its choice is made on, then one pass per task for its
residual, a chunk per block. The archive is the same, byte for byte, as when every tensor is read
whole, and rebuilds every task's original bits.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import xxhash
from safetensors.torch import load_file, save_file

import tallpack
from tallpack import inputs
from tallpack.encodings import exact

from conftest import anon_growth, big_family, pack_both_ways

CHUNK = 1 << 16
N = 5 * CHUNK + 1000  # six blocks, the last a short one (the sample, SAMPLE_ELEMENTS, spans four)


def _family(d: Path, dtype: torch.dtype, tasks: int = 3, *, dtypes=None, edit=None) -> tuple[Path, dict[str, Path]]:
    """A base and ``tasks`` fine-tunes (task ``i`` of ``dtypes[i]`` when given): one tensor of six
    blocks and a small one; ``edit(i, task_sd)`` changes task ``i``'s before it is saved."""
    g = torch.Generator().manual_seed(1)
    base = {"big.weight": (torch.randn(N, generator=g) * 0.02).to(dtype),
            "other.weight": torch.randn(64, 32, generator=g).to(dtype)}
    save_file(base, d / "base.safetensors")
    paths = {}
    for i in range(tasks):
        dt = dtype if dtypes is None else dtypes[i]
        sd = {k: (v.float() + 1e-3 * torch.randn(v.shape, generator=g)).to(dt) for k, v in base.items()}
        if edit is not None:
            edit(i, sd)
        paths[f"t{i}"] = d / f"t{i}.safetensors"
        save_file(sd, paths[f"t{i}"])
    return d / "base.safetensors", paths


def _pack_both(tmp: Path, monkeypatch, base: Path, tasks: dict[str, Path], **kw) -> tuple[bytes, bytes, int]:
    """The archive packed with every tensor read whole and read a block at a time (``a0``,
    ``conftest.pack_both_ways``); how many times a streamed tensor was read whole all the same
    (0 expected)."""
    whole, streamed, _, wholes = pack_both_ways(tmp, monkeypatch, base, tasks, chunk=CHUNK, exact=True, **kw)
    return whole, streamed, wholes


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def _rebuilds(archive: Path, tasks: dict[str, Path]) -> None:
    with tallpack.open(archive) as a:
        for t, p in tasks.items():
            sd = a.state_dict(t, exact=True)
            for k, v in load_file(p).items():
                assert sd[k].dtype == v.dtype and _bits(sd[k]) == _bits(v), (t, k)


def _encodings(archive: Path) -> set[str]:
    with tallpack.open(archive) as a:
        return {tt.encoding for e in a.manifest.tensors if e.name == "big.weight" for tt in e.tasks.values()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("merge", ["ta", "ties"])
def test_streamed_exact_archives_are_the_same_bytes(tmp_path, monkeypatch, dtype, merge):
    base, tasks = _family(tmp_path, dtype)
    whole, streamed, read_whole = _pack_both(tmp_path, monkeypatch, base, tasks, merge=merge)
    assert read_whole == 0  # the exact tier read the tensor a block at a time too
    assert streamed == whole
    _rebuilds(tmp_path / "a0.tallpack", tasks)


@pytest.mark.parametrize("policy", ["store", "derive"])
@pytest.mark.parametrize("merge", ["ta", "ties"])
def test_streamed_exact_with_each_mask_policy(tmp_path, monkeypatch, policy, merge):
    """Masks always stored (residuals against the TALL reference), or always derived (and the
    merged vector too: ``tall-derived-merged``)."""
    monkeypatch.setattr(exact, "MASK_POLICY", policy)
    base, tasks = _family(tmp_path, torch.bfloat16)
    whole, streamed, read_whole = _pack_both(tmp_path, monkeypatch, base, tasks, merge=merge)
    assert read_whole == 0 and streamed == whole
    assert _encodings(tmp_path / "a0.tallpack") == {"store": {"tall"}, "derive": {"tall-derived-merged"}}[policy]
    _rebuilds(tmp_path / "a0.tallpack", tasks)


@pytest.mark.parametrize("opts", [{"derive_masks": False}, {"derive_merged": False}])
def test_streamed_exact_with_masks_or_merged_stored(tmp_path, monkeypatch, opts):
    base, tasks = _family(tmp_path, torch.float32)
    whole, streamed, read_whole = _pack_both(tmp_path, monkeypatch, base, tasks, **opts)
    assert read_whole == 0 and streamed == whole
    _rebuilds(tmp_path / "a0.tallpack", tasks)


@pytest.mark.parametrize("candidates,merged", [(("tall",), True), (("tall",), False), (("base",), True),
                                               (("zero",), False)])
def test_streamed_exact_against_each_reference(tmp_path, monkeypatch, candidates, merged):
    """Masks stored, each task coded against one reference: TALL's (its merged vector derived as
    the reader does, or not), the base's or zero."""
    monkeypatch.setattr(exact, "MASK_POLICY", "store")
    monkeypatch.setattr(exact, "CANDIDATES", candidates)
    base, tasks = _family(tmp_path, torch.float16)
    whole, streamed, read_whole = _pack_both(tmp_path, monkeypatch, base, tasks, merge="ties", derive_merged=merged)
    assert read_whole == 0 and streamed == whole
    with tallpack.open(tmp_path / "a0.tallpack") as a:
        big = next(e for e in a.manifest.tensors if e.name == "big.weight")
        assert {tt.extras["exact"].reference for tt in big.tasks.values()} == set(candidates)
    _rebuilds(tmp_path / "a0.tallpack", tasks)


def test_streamed_exact_never_codes_against_a_tall_reference_with_a_nan(tmp_path, monkeypatch):
    """A NaN in a later block of the TALL references (made here: the packer's own inputs give
    none) leaves that reference out, as when the tensor is read whole."""
    monkeypatch.setattr(exact, "MASK_POLICY", "store")
    rebuild = exact.reconstruct
    marker = 0.25  # the first base element of the fifth block

    def with_nan(b, mask, merged, dtype):
        out = rebuild(b, mask, merged, dtype)
        if b.numel() and float(b[0]) == marker:
            out[3] = float("nan")
        return out

    monkeypatch.setattr(exact, "reconstruct", with_nan)
    g = torch.Generator().manual_seed(2)
    big = torch.randn(N, generator=g) * 0.02
    big[4 * CHUNK] = marker
    save_file({"big.weight": big}, tmp_path / "base.safetensors")
    tasks = {}
    for i in range(2):
        tasks[f"t{i}"] = tmp_path / f"t{i}.safetensors"
        save_file({"big.weight": big + 1e-3 * torch.randn(N, generator=g)}, tasks[f"t{i}"])
    whole, streamed, read_whole = _pack_both(tmp_path, monkeypatch, tmp_path / "base.safetensors", tasks)
    assert read_whole == 0 and streamed == whole
    with tallpack.open(tmp_path / "a0.tallpack") as a:
        big_entry = next(e for e in a.manifest.tensors if e.name == "big.weight")
        assert {tt.extras["exact"].reference for tt in big_entry.tasks.values()} <= {"base", "zero"}
    monkeypatch.setattr(exact, "CANDIDATES", ("tall",))  # the same family coded against TALL's otherwise
    monkeypatch.setattr(exact, "reconstruct", rebuild)
    _pack_both(tmp_path, monkeypatch, tmp_path / "base.safetensors", tasks)
    with tallpack.open(tmp_path / "a0.tallpack") as a:
        big_entry = next(e for e in a.manifest.tensors if e.name == "big.weight")
        assert {tt.extras["exact"].reference for tt in big_entry.tasks.values()} == {"tall"}


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_streamed_exact_with_a_nan_or_inf_in_a_later_block(tmp_path, monkeypatch, value):
    """A task's NaN or inf in the fifth block: the tensor is stored task-own, exact as it is."""
    def edit(i, sd):
        if i == 1:
            sd["big.weight"][4 * CHUNK + 7] = value
    base, tasks = _family(tmp_path, torch.float32, edit=edit)
    whole, streamed, _ = _pack_both(tmp_path, monkeypatch, base, tasks)
    assert streamed == whole
    with tallpack.open(tmp_path / "a0.tallpack") as a:
        assert {e.name: e.kind for e in a.manifest.tensors}["big.weight"] == "task-own"
    _rebuilds(tmp_path / "a0.tallpack", tasks)


def test_streamed_exact_of_tasks_in_two_dtypes(tmp_path, monkeypatch):
    base, tasks = _family(tmp_path, torch.float32, dtypes=[torch.bfloat16, torch.float32, torch.bfloat16])
    whole, streamed, read_whole = _pack_both(tmp_path, monkeypatch, base, tasks)
    with tallpack.open(tmp_path / "a0.tallpack") as a:
        if {e.name: e.kind for e in a.manifest.tensors}["big.weight"] != "merged":
            pytest.skip("the packer stores tasks of two dtypes apart")
    assert read_whole == 0 and streamed == whole
    _rebuilds(tmp_path / "a0.tallpack", tasks)


def test_streamed_hash_is_the_whole_tensors():
    """xxh3 fed a block at a time (``exact._scan``) is the one-shot digest (``exact.tensor_hash``)."""
    x = torch.randn(3 * CHUNK + 5).to(torch.bfloat16)
    h = xxhash.xxh3_64()
    for a in range(0, x.numel(), CHUNK):
        h.update(x[a : a + CHUNK].contiguous().view(torch.uint8).numpy().tobytes())
    assert h.intdigest() == exact.tensor_hash(x)
    assert h.intdigest() != exact.tensor_hash(x[:-1])


def test_streamed_exact_holds_a_block_of_each_copy(tmp_path):
    """Peak memory of ``pack --exact`` of a tensor of 32 MB with three tasks: read whole, the four
    copies and the tasks' references (over 128 MB); a block at a time (1 MB blocks), a few blocks
    of each."""
    tasks = big_family(tmp_path)
    grown, took = {}, {}
    for hold in (1 << 60, 1 << 20):
        setup = f"import tallpack.inputs as I; I.HOLD_BYTES = {hold}"
        work = (f"tallpack.pack({str(tmp_path / 'base.safetensors')!r}, {json.dumps(tasks)}, "
                f"{str(tmp_path / f'a{hold}.tallpack')!r}, chunk_elements={1 << 18}, threads=2, exact=True)")
        start = time.perf_counter()
        grown[hold] = anon_growth(setup, work)
        took[hold] = time.perf_counter() - start
    mb = 1 << 20
    print({k: (round(v / mb), round(took[k], 1)) for k, v in grown.items()})  # (-s: MB grown, seconds)
    assert (tmp_path / f"a{1 << 60}.tallpack").read_bytes() == (tmp_path / f"a{1 << 20}.tallpack").read_bytes()
    assert grown[1 << 60] > 128 * mb, grown  # (the copies held whole: the measure sees them)
    assert grown[1 << 20] < grown[1 << 60] - 100 * mb, {k: v / mb for k, v in grown.items()}
