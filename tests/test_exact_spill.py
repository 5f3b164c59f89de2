"""The exact tier's passes against TALL's reference, for a tensor read a block at a time.

``exact.add_exact`` reads such a tensor once for the hashes and the sample, then once per task for
its residual. A task coded against TALL's reference (``base + m_t * tau_MTL``) read every task's
block in its pass to merge the block again: T x (T + 1) copies read for T such tasks. Now the scan
keeps each block's merged vector in a temporary file without a name (``exact._Spill``) when the
sample's choice may code a task against TALL's reference, and each pass reads the base's and its
task's blocks alone. The archive is the same, byte for byte, as when every tensor is read whole.
"""

from __future__ import annotations

import errno
import logging
import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import tallpack
from tallpack import inputs
from tallpack.encodings import exact

from conftest import pack_both_ways

CE = 1 << 14
N = 5 * CE + 100  # six blocks, the last a short one (the sample, SAMPLE_ELEMENTS, holds them all)
PER_PASS = -(-N // CE)


def _family(d: Path, dtype: torch.dtype = torch.float32, tasks: int = 3, sparse: bool = False
            ) -> tuple[Path, dict[str, Path]]:
    """A base and ``tasks`` fine-tunes of one tensor of six blocks (and a small one): task ``i``
    moves the ``i``-th run of the elements, every one of them (its TALL rebuild close: tasks coded
    against TALL's reference), or (``sparse``) a twentieth of them anywhere (against the base)."""
    g = torch.Generator().manual_seed(5)
    big = torch.randn(N, generator=g) * 0.02
    base = {"big.weight": big.to(dtype), "other.weight": torch.randn(16, 8, generator=g).to(dtype)}
    save_file(base, d / "base.safetensors")
    paths = {}
    for i in range(tasks):
        x = big.clone()
        if sparse:
            idx = torch.randperm(N, generator=g)[: N // 20]
            x[idx] += 0.05 * torch.randn(idx.numel(), generator=g)
        else:
            run = slice(i * N // tasks, (i + 1) * N // tasks)
            x[run] += 0.05 * torch.randn(x[run].numel(), generator=g)
        sd = {"big.weight": x.to(dtype), "other.weight": (base["other.weight"].float() + 0.01).to(dtype)}
        paths[f"t{i}"] = d / f"t{i}.safetensors"
        save_file(sd, paths[f"t{i}"])
    return d / "base.safetensors", paths


class _Reads:
    """Blocks read (``Streamed.block``: every copy; ``Streamed.pair``: the base's and a task's) while
    a task's residual is written (``exact._streamed_residuals``), and in all."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.passes = {"block": 0, "pair": 0}
        self.all = {"block": 0, "pair": 0}
        block, pair = inputs.Streamed.block, inputs.Streamed.pair

        def counted(kind: str, fn):
            def read(*args):
                self.all[kind] += 1
                f = sys._getframe(1)
                while f is not None and f.f_code.co_name != "_streamed_residuals":
                    f = f.f_back
                self.passes[kind] += f is not None
                return fn(*args)
            return read
        monkeypatch.setattr(inputs.Streamed, "block", counted("block", block))
        monkeypatch.setattr(inputs.Streamed, "pair", counted("pair", pair))


class _Files:
    """The spill files ``exact`` makes (``tempfile.TemporaryFile``), and the folders asked for."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, fail_after: int | None = None) -> None:
        self.made: list = []
        self.folders: list = []
        real = tempfile.TemporaryFile

        def made(*args, **kw):
            f = real(*args, **kw)
            self.made.append(f)
            self.folders.append(kw.get("dir"))
            if fail_after is not None:  # a disk that fills: the write after ``fail_after`` bytes
                write, written = f.write, [0]

                def full(b) -> int:
                    written[0] += memoryview(b).nbytes
                    if written[0] > fail_after:
                        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                    return write(b)
                f.write = full
            return f
        monkeypatch.setattr(exact.tempfile, "TemporaryFile", made)


def _deleted_files_open_in(folder: Path) -> list[str]:
    """This process's descriptors on files in ``folder`` that have no name (a spill still open)."""
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(folder)) and target.endswith("(deleted)"):
            out.append(target)
    return out


def _refs(archive: Path) -> list[str]:
    with tallpack.open(archive) as a:
        entry = next(e for e in a.manifest.tensors if e.name == "big.weight")
        return [tt.extras["exact"].reference for tt in entry.tasks.values()]


def _rebuilds(archive: Path, tasks: dict[str, Path]) -> None:
    with tallpack.open(archive) as a:
        for t, p in tasks.items():
            sd = a.state_dict(t, exact=True)
            for k, v in load_file(p).items():
                assert sd[k].dtype == v.dtype and torch.equal(sd[k].view(torch.uint8), v.view(torch.uint8)), (t, k)


@pytest.mark.parametrize("opts", [{"derive_merged": False}, {"derive_masks": False}])
@pytest.mark.parametrize("merge", ["ta", "ties"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_passes_against_tall_read_the_base_and_their_task_alone(tmp_path, monkeypatch, dtype, merge, opts):
    """Masks derived where that codes smaller (the merged vector stored: deriving it too would take
    every task off TALL's reference here), or always stored."""
    base, tasks = _family(tmp_path, dtype)
    reads, files = _Reads(monkeypatch), _Files(monkeypatch)
    whole, streamed, _, wholes = pack_both_ways(tmp_path, monkeypatch, base, tasks, chunk=CE, exact=True,
                                                merge=merge, group=False, **opts)
    assert streamed == whole and wholes == 0
    refs = _refs(tmp_path / "a0.tallpack")
    assert refs.count("tall") >= 2, refs  # (the family is made for it)
    # each task's pass: its base's and its own blocks; none reads every task's blocks
    assert reads.passes == {"block": 0, "pair": len(refs) * PER_PASS}, (reads.passes, refs)
    if merge == "ta":  # the kind, the writing, the exact tier's scan (TIES' statistics take passes of their own)
        assert reads.all["block"] == 3 * PER_PASS
    assert len(files.made) == 1 and files.folders == [str(tmp_path)]  # the streamed pack's, beside its archive
    assert all(f.closed for f in files.made) and not _deleted_files_open_in(tmp_path)
    _rebuilds(tmp_path / "a0.tallpack", tasks)


@pytest.mark.parametrize("count", [3, 8])
def test_block_reads_before_and_after(tmp_path, monkeypatch, count):
    """Copies of each block read by a streamed pack of T tasks all coded against TALL's reference:
    3 x (T + 1) (the kind, the writing, the scan) and 2 per task pass (2 T) where every pass read
    T + 1 (T x (T + 1)): 3 tasks 24 -> 18, 8 tasks 99 -> 43."""
    base, tasks = _family(tmp_path, tasks=count)
    reads = _Reads(monkeypatch)
    whole, streamed, _, _ = pack_both_ways(tmp_path, monkeypatch, base, tasks, chunk=CE, exact=True,
                                           derive_masks=False, group=False)
    assert streamed == whole and _refs(tmp_path / "a0.tallpack") == ["tall"] * count
    copies = (reads.all["block"] * (count + 1) + reads.all["pair"] * 2) / PER_PASS
    assert copies == 3 * (count + 1) + 2 * count, reads.all  # before: (3 + count) * (count + 1)


def test_derived_merged_vectors_are_the_ones_kept(tmp_path, monkeypatch):
    """The scan derives each block's merged vector as the reader does (format 1.8's derivation)
    and keeps that one; masks stored, every task coded against TALL's reference; TIES."""
    monkeypatch.setattr(exact, "MASK_POLICY", "store")
    base, tasks = _family(tmp_path, torch.bfloat16)
    reads, files = _Reads(monkeypatch), _Files(monkeypatch)
    whole, streamed, _, _ = pack_both_ways(tmp_path, monkeypatch, base, tasks, chunk=CE, exact=True, merge="ties",
                                           group=False)
    assert streamed == whole and _refs(tmp_path / "a0.tallpack") == ["tall"] * 3
    assert reads.passes == {"block": 0, "pair": 3 * PER_PASS} and len(files.made) == 1
    _rebuilds(tmp_path / "a0.tallpack", tasks)


def test_tall_derived_merged_needs_no_spill(tmp_path, monkeypatch):
    """Every mask derived and the merged vector too (``tall-derived-merged``): no task is coded
    against TALL's reference, nothing is written to disk."""
    monkeypatch.setattr(exact, "MASK_POLICY", "derive")
    base, tasks = _family(tmp_path)
    files = _Files(monkeypatch)
    whole, streamed, _, _ = pack_both_ways(tmp_path, monkeypatch, base, tasks, chunk=CE, exact=True, group=False)
    assert streamed == whole
    with tallpack.open(tmp_path / "a0.tallpack") as a:
        entry = next(e for e in a.manifest.tensors if e.name == "big.weight")
        assert {tt.encoding for tt in entry.tasks.values()} == {"tall-derived-merged"}
    assert files.made == []


@pytest.mark.parametrize("sparse", [True, False])
def test_tasks_off_tall_need_no_spill(tmp_path, monkeypatch, sparse):
    """The usual choice, masks and merged vector derived (``tall-derived-merged``; here where the
    sample's choice with each mask stored or derived alone would code tasks against TALL's
    reference), and tasks coded against the base: nothing is written to disk."""
    base, tasks = _family(tmp_path, torch.bfloat16, sparse=sparse)
    files = _Files(monkeypatch)
    whole, streamed, _, _ = pack_both_ways(tmp_path, monkeypatch, base, tasks, chunk=CE, exact=True, group=False)
    assert streamed == whole and "tall" not in _refs(tmp_path / "a0.tallpack")
    with tallpack.open(tmp_path / "a0.tallpack") as a:
        entry = next(e for e in a.manifest.tensors if e.name == "big.weight")
        assert {tt.encoding for tt in entry.tasks.values()} == {"tall-derived-merged"}
    assert files.made == []


def test_a_nan_in_a_later_block_of_one_tasks_tall_reference(tmp_path, monkeypatch):
    """A NaN in the fifth block of task t2's TALL reference (made here: the packer's own inputs give
    none) takes t2 off TALL's reference, as when the tensor is read whole; t0 and t1 stay on it,
    their passes reading the kept merged vectors."""
    rebuild = exact.reconstruct
    marker = 0.25  # the first base element of the fifth block, in t2's run

    def with_nan(b, mask, merged, dtype):
        out = rebuild(b, mask, merged, dtype)
        if b.numel() and float(b[0]) == marker and bool(mask.any()):
            out[3] = float("nan")
        return out
    monkeypatch.setattr(exact, "reconstruct", with_nan)
    base, tasks = _family(tmp_path)
    for p, value in [(base, marker), (tasks["t0"], marker), (tasks["t1"], marker), (tasks["t2"], marker + 0.01)]:
        sd = load_file(p)
        sd["big.weight"][4 * CE] = value  # (t0's and t1's masks there: all False)
        save_file(sd, p)
    reads, files = _Reads(monkeypatch), _Files(monkeypatch)
    whole, streamed, _, _ = pack_both_ways(tmp_path, monkeypatch, base, tasks, chunk=CE, exact=True,
                                           derive_masks=False, group=False)
    assert streamed == whole
    refs = _refs(tmp_path / "a0.tallpack")
    assert refs[:2] == ["tall", "tall"] and refs[2] != "tall", refs
    assert reads.passes == {"block": 0, "pair": 3 * PER_PASS} and len(files.made) == 1
    monkeypatch.setattr(exact, "reconstruct", rebuild)
    _rebuilds(tmp_path / "a0.tallpack", tasks)


def test_a_full_disk_falls_back_to_merging_each_block_again(tmp_path, monkeypatch, caplog):
    """The spill's third block's write fails with ENOSPC (injected: the test's disk is not full):
    the file is dropped, a warning says so, and each pass reads every task's blocks as before;
    the same bytes."""
    base, tasks = _family(tmp_path)
    reads, files = _Reads(monkeypatch), _Files(monkeypatch, fail_after=2 * CE * 4)
    with caplog.at_level(logging.WARNING, logger=exact.__name__):
        whole, streamed, _, _ = pack_both_ways(tmp_path, monkeypatch, base, tasks, chunk=CE, exact=True,
                                               derive_masks=False, group=False)
    assert streamed == whole and _refs(tmp_path / "a0.tallpack") == ["tall"] * 3
    assert reads.passes == {"block": 3 * PER_PASS, "pair": 0}
    assert "big.weight: the merged vectors could not be kept on disk" in caplog.text
    assert len(files.made) == 1 and files.made[0].closed and not _deleted_files_open_in(tmp_path)
    _rebuilds(tmp_path / "a0.tallpack", tasks)


def test_a_pack_failing_between_passes_leaves_no_spill(tmp_path, monkeypatch):
    """A task's file cut short after the scan (saved over by another program): the pack fails in
    the first pass, naming the file; the spill is closed (gone) and no archive is left."""
    base, tasks = _family(tmp_path)
    monkeypatch.setattr(inputs, "HOLD_BYTES", 0)
    files = _Files(monkeypatch)
    done = exact._Spill.done

    def cut_after_scan(self, blocks: int) -> None:
        done(self, blocks)
        victim = tasks["t1"]
        os.truncate(victim, os.path.getsize(victim) - 4 * CE)
    monkeypatch.setattr(exact._Spill, "done", cut_after_scan)
    out = tmp_path / "o.tallpack"
    with pytest.raises(tallpack.TallpackError, match="t1"):
        tallpack.pack(base, tasks, out, chunk_elements=CE, exact=True, derive_masks=False, group=False)
    assert not out.exists()
    assert len(files.made) == 1 and files.made[0].closed and not _deleted_files_open_in(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.safetensors", "t0.safetensors", "t1.safetensors",
                                                          "t2.safetensors"]
