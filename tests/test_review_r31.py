"""Review of the thirty-first round's read paths: a large ``tall-derived-merged`` tensor read from
an archive whose cache would not keep its merged vector (``cache_bytes=0``)."""

from __future__ import annotations

import pytest
import torch

import tallpack
from tallpack import originals
from tallpack.errors import ArchiveClosedError

from test_derived_runs_r30 import NAME, _Counts, _pack
from test_exact_read_runs import _bits


@pytest.mark.parametrize("device", ["cpu", torch.device("cpu"), "cpu:0"])
def test_device_cpu_reads_as_the_default_does(tmp_path, monkeypatch, device):
    """``device="cpu"`` (as safetensors' ``safe_open`` is often called) reads a large tensor as no
    device does: tau_MTL derived a run at a time beside the output (``task_in_runs``), never whole
    with the base and every residual read whole (twice the memory of the run-wise read: 586
    against 295 MB for a 64 MB bfloat16 tensor of 3 tasks); the same bits."""
    chunk = 4096
    path = _pack(tmp_path, monkeypatch, torch.bfloat16, 3, "ta", chunk)
    counts = _Counts(monkeypatch, chunk, 2 * chunk)
    with tallpack.open(path, cache_bytes=0) as a:
        want = {t: _bits(a.get_tensor(t, NAME)) for t in ("t0", "t1", "t2")}
        want_sd = {k: _bits(v) for k, v in a.state_dict("t1").items()}
        assert counts.task == 3 + 1 and counts.whole == 0
        got = {t: _bits(a.get_tensor(t, NAME, device=device)) for t in ("t0", "t1", "t2")}
        got_sd = {k: _bits(v) for k, v in a.state_dict("t1", device=device).items()}
        lazy = _bits(a.state_dict("t2", lazy=True, device=device)[NAME])
    assert got == want and got_sd == want_sd and lazy == want["t2"]
    assert counts.whole == 0 and counts.task == 2 * (3 + 1) + 1


@pytest.mark.parametrize("at", ["chunks", "together", "one"])
def test_verify_of_an_archive_closed_meanwhile_raises(tmp_path, monkeypatch, at):
    """An archive closed (by another thread) while ``verify`` runs is not a damaged one: verify
    raises ArchiveClosedError, as for a close before it (``verify_ends``), from its chunk checks,
    the pass over a large tensor's originals together (``originals._Together``) or a tensor
    rebuilt alone, rather than returning "the archive is closed" among the problems found."""
    chunk = 4096
    path = _pack(tmp_path, monkeypatch, torch.bfloat16, 3, "ta", chunk)
    _Counts(monkeypatch, chunk, 2 * chunk)
    a = tallpack.open(path, threads=1)
    if at == "chunks":
        read_chunk = a._c.read_chunk

        def closing(*args, **kw):
            a.close()
            return read_chunk(*args, **kw)
        monkeypatch.setattr(a._c, "read_chunk", closing)
    elif at == "together":
        pass_ = originals.checked_in_runs

        def closing(*args, **kw):
            a.close()
            return pass_(*args, **kw)
        monkeypatch.setattr(originals, "checked_in_runs", closing)
    else:
        get_tensor = a.get_tensor

        def closing(task, name, **kw):
            if name != NAME:
                a.close()
            return get_tensor(task, name, **kw)
        monkeypatch.setattr(a, "get_tensor", closing)
    with pytest.raises(ArchiveClosedError):
        print(a.verify())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_cuda_still_rebuilds_there(tmp_path, monkeypatch):
    """The CPU read as no device; another device as before: every read on it, the CPU's bits."""
    chunk = 4096
    path = _pack(tmp_path, monkeypatch, torch.bfloat16, 3, "ta", chunk)
    _Counts(monkeypatch, chunk, 2 * chunk)
    with tallpack.open(path, cache_bytes=0) as a:
        want = {k: _bits(v) for k, v in a.state_dict("t1").items()}
        got = a.state_dict("t1", device="cuda")
        one = a.get_tensor("t1", NAME, device="cuda")
    assert {v.device.type for v in got.values()} == {"cuda"} and one.device.type == "cuda"
    assert {k: _bits(v.cpu()) for k, v in got.items()} == want and _bits(one.cpu()) == want[NAME]
